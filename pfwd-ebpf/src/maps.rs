//! The instance's BPF maps and the counter updates. All are pinned by name, so every pfwd command (and every program
//! load) of one network namespace shares them through bpffs. The names must equal `pfwd_common::names` (the map
//! attribute takes only a literal); the loader's tests check the built object has each of them.
use crate::parse::{ErrWork, Work};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray},
};
use pfwd_common::{
    Addr6, BACKEND_COUNTER_ENTRIES, BACKEND_ENTRIES, BackendCounterKey, BackendEntry, BackendKey, CLASS_ENTRIES, Class,
    Config, CtEntry, CtEntry6, CtEntryOf, DEFAULT_CT_ENTRIES, FlowTuple, FragEntry, FragEntry6, FragKey, FragKey6,
    IFACE_MAC_SLOTS, INDEX_ENTRIES, IfaceInfo, IndexEntry, IndexKey, IndexKey4, MAX_FRAG_DATAGRAMS, MAX_IFACES,
    MAX_LOCAL_ADDRS, MAX_RULES, MAX_SOCKETS, RULE_ENTRIES, RecordText, RuleCounters, RuleEntry, SockKey, SockKey6,
    SockOrig, SockOrig6, Stat, Tuple, Tuple6, Walk, unconfirmed_ct_entries,
};

/// Rule bodies by slot (`pfwd_common::lookup`).
#[map(name = "PFWD_RULES")]
pub static RULES: Array<RuleEntry> = Array::pinned(RULE_ENTRIES, 0);

/// The rule index: the rules of each (hook, masked matches) key. Not preallocated, which also makes an update
/// replace the entry whole for readers (the old one is freed after them).
#[map(name = "PFWD_INDEX")]
pub static INDEX: HashMap<IndexKey, IndexEntry> = HashMap::pinned(INDEX_ENTRIES, BPF_F_NO_PREALLOC);

/// `INDEX`'s keys of IPv4 and both-family rules in IPv4 form (`IndexKey::narrow`), which IPv4 packets probe: a
/// 20-byte key hashes in less than half the time of a 44-byte one.
#[map(name = "PFWD_INDEX4")]
pub static INDEX4: HashMap<IndexKey4, IndexEntry> = HashMap::pinned(INDEX_ENTRIES, BPF_F_NO_PREALLOC);

/// Each hook's classes (`pfwd_common::class_index`), in both class banks.
#[map(name = "PFWD_CLASSES")]
pub static CLASSES: Array<Class> = Array::pinned(CLASS_ENTRIES, 0);

/// Confirmed flows (`ct_state::CONFIRMED`): the established path is one lookup here.
#[map(name = "PFWD_CT")]
pub static CONNTRACK: LruHashMap<Tuple, CtEntry> = LruHashMap::pinned(DEFAULT_CT_ENTRIES, 0);

/// Unconfirmed flows, until they are confirmed (then `conntrack` moves them to `CONNTRACK`). A flood of new flows
/// fills and evicts only this table. The loader sizes it (`pfwd_common::unconfirmed_ct_entries`).
#[map(name = "PFWD_CT_NEW")]
pub static CONNTRACK_NEW: LruHashMap<Tuple, CtEntry> =
    LruHashMap::pinned(unconfirmed_ct_entries(DEFAULT_CT_ENTRIES), 0);

/// The IPv6 flows, as `CONNTRACK` and `CONNTRACK_NEW` hold the IPv4 ones (the loader sizes them alike).
#[map(name = "PFWD_CT6")]
pub static CONNTRACK6: LruHashMap<Tuple6, CtEntry6> = LruHashMap::pinned(DEFAULT_CT_ENTRIES, 0);

#[map(name = "PFWD_CT6_NEW")]
pub static CONNTRACK6_NEW: LruHashMap<Tuple6, CtEntry6> =
    LruHashMap::pinned(unconfirmed_ct_entries(DEFAULT_CT_ENTRIES), 0);

/// How many entries have been inserted into `CONNTRACK_NEW` (0) and `CONNTRACK6_NEW` (1): an unconfirmed flow
/// checks its other entry again after `conntrack::check_inserts()` of them.
#[map(name = "PFWD_CT_NEW_INS")]
pub static CT_NEW_INSERTS: Array<u64> = Array::pinned(2, 0);

#[map(name = "PFWD_RULE_CNT")]
pub static RULE_COUNTERS: PerCpuArray<RuleCounters> = PerCpuArray::pinned(MAX_RULES, 0);

#[map(name = "PFWD_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);

#[map(name = "PFWD_IFACES")]
pub static IFACES: HashMap<u32, IfaceInfo> = HashMap::pinned(MAX_IFACES, 0);

/// The XDP fast path's shortcut to `IFACES`' link-layer addresses (`pfwd_common::IfaceMacSlot`).
#[map(name = "PFWD_IFACE_MACS")]
pub static IFACE_MACS: Array<u64> = Array::pinned(IFACE_MAC_SLOTS, 0);

#[map(name = "PFWD_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "PFWD_SOCKETS")]
pub static SOCKETS: LruHashMap<SockKey, SockOrig> = LruHashMap::pinned(MAX_SOCKETS, 0);

#[map(name = "PFWD_SOCKETS6")]
pub static SOCKETS6: LruHashMap<SockKey6, SockOrig6> = LruHashMap::pinned(MAX_SOCKETS, 0);

/// Fragmented datagrams in flight: what their first fragment got (`fragment`).
#[map(name = "PFWD_FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragEntry> = LruHashMap::pinned(MAX_FRAG_DATAGRAMS, 0);

/// IPv6 fragmented datagrams in flight.
#[map(name = "PFWD_FRAGS6")]
pub static FRAGS6: LruHashMap<FragKey6, FragEntry6> = LruHashMap::pinned(MAX_FRAG_DATAGRAMS, 0);

/// Userspace's record of what detach must undo (`pfwd_common::RecordText`); no program reads it.
#[map(name = "PFWD_RECORD")]
pub static RECORD: Array<RecordText> = Array::pinned(1, 0);

/// This host's IPv4 addresses (network order; the value is unused), kept by userspace: what `-d local` matches.
#[map(name = "PFWD_LOCAL_ADDRS")]
pub static LOCAL_ADDRS: HashMap<u32, u8> = HashMap::pinned(MAX_LOCAL_ADDRS, 0);

/// This host's IPv6 addresses, as `LOCAL_ADDRS` holds the IPv4 ones.
#[map(name = "PFWD_LOCAL_ADDRS6")]
pub static LOCAL_ADDRS6: HashMap<Addr6, u8> = HashMap::pinned(MAX_LOCAL_ADDRS, 0);

/// The Maglev tables of rules with several backends, both banks' (see `pfwd_common::BackendKey`). Not preallocated:
/// most instances have none.
#[map(name = "PFWD_BACKENDS")]
pub static BACKENDS: HashMap<BackendKey, BackendEntry> = HashMap::pinned(BACKEND_ENTRIES, BPF_F_NO_PREALLOC);

/// Per-backend counters of rules with several backends (`packets`, `bytes`, `flows`; per CPU), created by the first
/// packet to a backend.
#[map(name = "PFWD_BACKEND_CNT")]
pub static BACKEND_COUNTERS: PerCpuHashMap<BackendCounterKey, RuleCounters> =
    PerCpuHashMap::pinned(BACKEND_COUNTER_ENTRIES, BPF_F_NO_PREALLOC);

/// The interfaces the XDP fast path may send packets to, keyed by ifindex: those pfwd attached with `--xdp`, which
/// can transmit redirected frames (`xdp`).
#[map(name = "PFWD_XDP_TX")]
pub static XDP_TX: DevMapHash = DevMapHash::pinned(MAX_IFACES, 0);

/// Per-CPU working memory of a new flow's rule lookup (`rules`): kept off the BPF stack, whose 512 bytes the
/// programs' call chains share. Not pinned: nothing outside one program run reads it.
#[repr(C)]
pub struct Scratch {
    pub walk: Walk,
    pub key: IndexKey,
    pub key4: IndexKey4,
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The programs the attached tc programs tail-call: their IPv6 halves and their IPv4 ICMP error handlers
/// (`pfwd_common::tail`); filled and pinned by the loader (each load, Ethernet and layer-3 builds, has its own).
#[map]
pub static TAIL: ProgramArray = ProgramArray::with_max_entries(tail::SLOTS, 0);

pub use pfwd_common::tail;

/// Per-CPU working memory of IPv6 packets (`parse::Work`; IPv4's is on the stack). Not pinned, as `SCRATCH`.
#[map]
pub static WORK6: PerCpuArray<Work<Addr6>> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU working memory of ICMP errors (`parse::ErrWork`), of each family.
#[map]
pub static ERR_WORK4: PerCpuArray<ErrWork<u32>> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static ERR_WORK6: PerCpuArray<ErrWork<Addr6>> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's IPv6 working memory.
#[inline(always)]
pub fn work6() -> Option<&'static mut Work<Addr6>> {
    // SAFETY: this CPU's value; the tc programs, the only users, run with bottom halves disabled, so nothing else
    // on this CPU uses it meanwhile.
    WORK6.get_ptr_mut(0).map(|w| unsafe { &mut *w })
}

/// This CPU's ICMP error working memory, of each family.
#[inline(always)]
pub fn err_work4() -> Option<&'static mut ErrWork<u32>> {
    // SAFETY: as for `work6`.
    ERR_WORK4.get_ptr_mut(0).map(|w| unsafe { &mut *w })
}

#[inline(always)]
pub fn err_work6() -> Option<&'static mut ErrWork<Addr6>> {
    // SAFETY: as for `work6`.
    ERR_WORK6.get_ptr_mut(0).map(|w| unsafe { &mut *w })
}

/// Per-CPU working memory of a new flow's creation (`conntrack::create`) and its SNAT port search: the keys and the
/// entry, off the stack as `Work` is.
#[repr(C)]
pub struct CtScratch<A> {
    pub reply_key: FlowTuple<A>,
    pub ours: FlowTuple<A>,
    pub entry: CtEntryOf<A>,
}

#[map]
pub static CT_SCRATCH4: PerCpuArray<CtScratch<u32>> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static CT_SCRATCH6: PerCpuArray<CtScratch<Addr6>> = PerCpuArray::with_max_entries(1, 0);

/// Counts a packet of `bytes` (and a flow if `new_flow`) for the backend `addr:port` (wide form) of the rule in
/// `slot`. Not inlined: its key stays off the callers' stack frame.
#[inline(never)]
pub fn count_backend(slot: u32, addr: &Addr6, port: u16, bytes: u32, new_flow: bool) {
    let key = BackendCounterKey { slot, addr: *addr, port, _pad: 0 };
    let mut c = BACKEND_COUNTERS.get_ptr_mut(&key);
    if c.is_none() {
        // A full map refuses: that backend is then not counted.
        let _ = BACKEND_COUNTERS.insert(&key, &RuleCounters::default(), BPF_NOEXIST as u64);
        c = BACKEND_COUNTERS.get_ptr_mut(&key);
    }
    if let Some(c) = c {
        // SAFETY: per-CPU value, only this CPU writes it while we run.
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes as u64;
        if new_flow {
            c.flows += 1;
        }
    }
}

/// Counts one event in the global counters.
#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(v) = STATS.get_ptr_mut(stat.index()) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
pub fn count_rule_drop(slot: u32) {
    if let Some(c) = RULE_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { (*c).drops += 1 };
    }
}

/// Adds bytes to a rule's counters without counting a packet: a later fragment's payload (its datagram was counted
/// as one packet, by its first fragment, as iptables counts the reassembled datagram).
#[inline(always)]
pub fn count_rule_bytes(slot: u32, bytes: u32) {
    if let Some(c) = RULE_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { (*c).bytes += bytes as u64 };
    }
}

#[inline(always)]
pub fn count_rule(slot: u32, bytes: u32, new_flow: bool) {
    if let Some(c) = RULE_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: as above.
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes as u64;
        if new_flow {
            c.flows += 1;
        }
    }
}
