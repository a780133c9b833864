//! BPF map names, keys and values, the global counters and the conntrack entry's state logic. Both sides use these
//! definitions, so the layout is defined exactly once.
//!
//! Every key and value derives `bytemuck::{Pod, Zeroable}`: the derive refuses a type with implicit padding or a
//! field that is not plain data, so the padding is always explicit (`_pad` fields, zeroed) and the bytes the kernel
//! hashes are exactly the ones both sides wrote. aya's `Pod` (the `user` feature) is implemented from it.
use bytemuck::{Pod, Zeroable};

/// Map and program names as they appear in the object file. The kernel side must spell them in its attributes
/// (`#[map(name = ...)]`, the program function names); the loader uses these constants, and a test of the loader
/// checks that the embedded object has every one of them.
pub mod names {
    pub const RULES: &str = "PFWD_RULES";
    pub const INDEX: &str = "PFWD_INDEX";
    /// The IPv4 form of [`INDEX`]'s keys of IPv4 and both-family rules ([`IndexKey4`](super::IndexKey4)), which
    /// IPv4 packets probe.
    pub const INDEX4: &str = "PFWD_INDEX4";
    pub const CLASSES: &str = "PFWD_CLASSES";
    /// Confirmed flows (see `ct_state::CONFIRMED`); a flood of new flows never evicts them.
    pub const CONNTRACK: &str = "PFWD_CT";
    /// Unconfirmed flows (see [`unconfirmed_ct_entries`](super::unconfirmed_ct_entries)): under pressure, they are
    /// the ones its LRU evicts.
    pub const CONNTRACK_NEW: &str = "PFWD_CT_NEW";
    pub const RULE_COUNTERS: &str = "PFWD_RULE_CNT";
    pub const STATS: &str = "PFWD_STATS";
    pub const IFACES: &str = "PFWD_IFACES";
    /// The XDP fast path's shortcut to [`IFACES`]' link-layer addresses ([`IfaceMacSlot`](super::IfaceMacSlot)).
    pub const IFACE_MACS: &str = "PFWD_IFACE_MACS";
    pub const CONFIG: &str = "PFWD_CONFIG";
    pub const SOCKETS: &str = "PFWD_SOCKETS";
    /// The IPv6 sockets' translations, as [`SOCKETS`] holds the IPv4 ones'.
    pub const SOCKETS6: &str = "PFWD_SOCKETS6";
    pub const FRAGS: &str = "PFWD_FRAGS";
    pub const RECORD: &str = "PFWD_RECORD";
    pub const LOCAL_ADDRS: &str = "PFWD_LOCAL_ADDRS";
    /// The IPv6 flows' tables, as [`CONNTRACK`] and [`CONNTRACK_NEW`] are the IPv4 flows'.
    pub const CONNTRACK6: &str = "PFWD_CT6";
    pub const CONNTRACK6_NEW: &str = "PFWD_CT6_NEW";
    /// IPv6 fragmented datagrams, as [`FRAGS`] holds IPv4 ones.
    pub const FRAGS6: &str = "PFWD_FRAGS6";
    /// This host's IPv6 addresses, as [`LOCAL_ADDRS`] holds the IPv4 ones.
    pub const LOCAL_ADDRS6: &str = "PFWD_LOCAL_ADDRS6";
    /// The Maglev tables of rules with several backends ([`BackendKey`](super::BackendKey)).
    pub const BACKENDS: &str = "PFWD_BACKENDS";
    /// Per-backend counters ([`BackendCounterKey`](super::BackendCounterKey)).
    pub const BACKEND_COUNTERS: &str = "PFWD_BACKEND_CNT";
    /// The interfaces the XDP fast path may send packets to (`pfwd attach --xdp`): a devmap keyed by ifindex.
    pub const XDP_TX: &str = "PFWD_XDP_TX";
    /// How many entries have been inserted into [`CONNTRACK_NEW`] (index 0) and [`CONNTRACK6_NEW`] (index 1): see
    /// [`unconfirmed_check_inserts`](super::unconfirmed_check_inserts).
    pub const CT_NEW_INSERTS: &str = "PFWD_CT_NEW_INS";
    /// Every map, in the order `pfwd status` reports their memory.
    pub const MAPS: [&str; 24] = [
        RULES,
        INDEX,
        INDEX4,
        CLASSES,
        CONNTRACK,
        CONNTRACK_NEW,
        CONNTRACK6,
        CONNTRACK6_NEW,
        RULE_COUNTERS,
        STATS,
        IFACES,
        IFACE_MACS,
        CONFIG,
        SOCKETS,
        SOCKETS6,
        FRAGS,
        FRAGS6,
        RECORD,
        LOCAL_ADDRS,
        LOCAL_ADDRS6,
        BACKENDS,
        BACKEND_COUNTERS,
        XDP_TX,
        CT_NEW_INSERTS,
    ];

    /// The tcx programs (`#[classifier]` functions of pfwd-ebpf).
    pub const PROG_INGRESS: &str = "pfwd_ingress";
    pub const PROG_EGRESS: &str = "pfwd_egress";
    /// The XDP fast path (`#[xdp]`), attached with `pfwd attach --xdp`.
    pub const PROG_XDP: &str = "pfwd_xdp";
    /// The programs they tail-call through the `TAIL` program array (slots [`super::tail`]): their IPv6 halves and
    /// their IPv4 ICMP error handlers.
    pub const PROG_INGRESS6: &str = "pfwd_ingress6";
    pub const PROG_EGRESS6: &str = "pfwd_egress6";
    pub const PROG_INGRESS_ICMP4: &str = "pfwd_ingress_icmp4";
    pub const PROG_EGRESS_ICMP4: &str = "pfwd_egress_icmp4";
    /// The program array (pinned by the loader as `prog_tail`, `prog_tail_l3`).
    pub const TAIL: &str = "TAIL";
    /// Every tail-called program, with its slot.
    pub const TAIL_PROGRAMS: [(&str, u32); 4] = [
        (PROG_INGRESS6, super::tail::INGRESS6),
        (PROG_EGRESS6, super::tail::EGRESS6),
        (PROG_INGRESS_ICMP4, super::tail::INGRESS_ICMP4),
        (PROG_EGRESS_ICMP4, super::tail::EGRESS_ICMP4),
    ];
    /// The cgroup socket hooks of `--local` rules (`#[cgroup_sock_addr]` functions).
    pub const PROG_CONNECT4: &str = "pfwd_connect4";
    pub const PROG_SENDMSG4: &str = "pfwd_sendmsg4";
    pub const PROG_RECVMSG4: &str = "pfwd_recvmsg4";
    pub const PROG_GETPEERNAME4: &str = "pfwd_getpeername4";
    pub const PROG_CONNECT6: &str = "pfwd_connect6";
    pub const PROG_SENDMSG6: &str = "pfwd_sendmsg6";
    pub const PROG_RECVMSG6: &str = "pfwd_recvmsg6";
    pub const PROG_GETPEERNAME6: &str = "pfwd_getpeername6";
}

/// Slots of the `TAIL` program array: the programs the tc programs tail-call.
pub mod tail {
    pub const INGRESS6: u32 = 0;
    pub const EGRESS6: u32 = 1;
    pub const INGRESS_ICMP4: u32 = 2;
    pub const EGRESS_ICMP4: u32 = 3;
    pub const SLOTS: u32 = 4;
}

/// Rule slots (rule bodies are addressed by slot; the user-facing id is stored inside). A cap well above the 100,000
/// rules the design is measured at; the rules array and the per-CPU counters are preallocated to it.
pub const MAX_RULES: u32 = 131_072;
/// Slot of the rule a `--hairpin` rule adds (its masquerade), past the user rules' slots: `COMPANION_SLOTS + slot`
/// for the rule in `slot`. The rules array holds both halves; the counters array only the first, so the companion's
/// packets are counted once, by the DNAT rule that owns it.
pub const COMPANION_SLOTS: u32 = MAX_RULES;
/// Entries of the rules array: the user rules' slots and their companions'.
pub const RULE_ENTRIES: u32 = COMPANION_SLOTS + MAX_RULES;
/// Class banks: the kernel reads the class lists of the active generation's bank ([`Config::generation`] & 1) while
/// userspace writes the other, then flips.
pub const CLASS_BANKS: u32 = 2;

/// The slot of the user rule that owns the rule in `slot`: itself, or for a companion the rule that added it.
pub const fn owner_slot(slot: u32) -> u32 {
    if slot >= COMPANION_SLOTS { slot - COMPANION_SLOTS } else { slot }
}
/// Rules sharing one index entry: the same hook, interface, protocol, port block, source and destination network
/// (a negated match and `-d local` count as "any" there). Checked in one bounded loop.
pub const INDEX_SLOTS: usize = 16;
/// Entries of the rule index (not preallocated). A rule takes one entry per prefix block of its port range (at most
/// 30 for 1-65535) and rules with the same matches share one, so this holds 100,000 rules of ten blocks each.
pub const INDEX_ENTRIES: u32 = 1_048_576;
/// Classes (distinct match shapes, see [`Class`]) per hook. A lookup probes each class at most once (fewer once it
/// has found the best rule), so many shapes cost first packets time; the verifier checks the probe once however
/// many there are.
pub const MAX_CLASSES: u32 = 1024;
/// Entries of the class array: every hook's classes, in both banks.
pub const CLASS_ENTRIES: u32 = CLASS_BANKS * 3 * MAX_CLASSES;

/// Index in the class array of the `i`th class of `hook` in `bank`.
#[inline(always)]
pub const fn class_index(bank: u32, hook: u8, i: u32) -> u32 {
    (bank * 3 + hook as u32) * MAX_CLASSES + i
}
/// [`RuleEntry::gen_until`] of a rule that has not been deleted.
pub const GEN_FOREVER: u32 = u32::MAX;
/// Default conntrack size: two entries per flow, so this holds 256k concurrent flows.
pub const DEFAULT_CT_ENTRIES: u32 = 524_288;
/// The smallest unconfirmed-flow table (entries), whatever the conntrack size.
pub const MIN_CT_NEW_ENTRIES: u32 = 256;

/// Entries of the unconfirmed-flow table (`PFWD_CT_NEW`) that go with a conntrack table of `ct_entries`: a quarter
/// of it, at least [`MIN_CT_NEW_ENTRIES`]. It only has to hold the flows in their first round trip (a handshake), so
/// a quarter is generous; at the default size that is 65,536 flows being set up at once.
pub const fn unconfirmed_ct_entries(ct_entries: u32) -> u32 {
    let quarter = ct_entries / 4;
    if quarter < MIN_CT_NEW_ENTRIES { MIN_CT_NEW_ENTRIES } else { quarter }
}

/// How many inserts into an unconfirmed-flow table of `entries` may pass before a flow in it checks its other entry
/// again ([`CtEntryOf::checked_inserts`]): an eighth of the table.
///
/// The check is there because the table's LRU evicts: a one-way flow looks up only its own entry, and the other one
/// (which its first reply needs) would be the first to go. A lookup marks an entry referenced, and an LRU evicts
/// entries in about the order they were last referenced, so an entry referenced when its flow checked it is only
/// evicted once most of the table has been filled by newer inserts since. An eighth leaves a wide margin for the
/// kernel's approximate LRU (its lists are rotated and shrunk in batches). When nothing is inserted, nothing is
/// evicted and a flow needs no check; in a flood of new flows, a flow checks on nearly every packet.
pub const fn unconfirmed_check_inserts(entries: u32) -> u32 {
    let eighth = entries / 8;
    if eighth == 0 { 1 } else { eighth }
}
pub const MAX_IFACES: u32 = 256;
/// This host's IPv4 addresses that `-d local` matches.
pub const MAX_LOCAL_ADDRS: u32 = 4096;
/// Datagrams whose fragments are being tracked at once (an LRU: under pressure the oldest are forgotten, and their
/// remaining fragments are dropped as unknown).
pub const MAX_FRAG_DATAGRAMS: u32 = 16_384;
/// How long the translation of a datagram's first fragment applies to its later fragments. Fragments of one datagram
/// follow each other within milliseconds; the IP id (16 bits) is reused by a busy sender within seconds.
pub const FRAG_TIMEOUT_NS: u64 = 5_000_000_000;

pub const PROTO_ANY: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// An IPv6 address as the maps hold it: four 32-bit words, each in network order (the 16 bytes as they sit in the
/// packet).
pub type Addr6 = [u32; 4];

/// The address families a rule may be restricted to (`RuleEntry::family`, `IndexKey::family`), and a packet's.
pub mod family {
    /// A rule for both families (it has no address).
    pub const ANY: u8 = 0;
    pub const V4: u8 = 4;
    pub const V6: u8 = 6;
}

/// An address of one family as the maps hold it (network order): `u32` for IPv4, [`Addr6`] for IPv6. The flow
/// tables, fragments and the code that keeps them are generic over it; the rule engine holds every address in its
/// wide form ([`Addr::wide`]) and tells the families apart by [`family`].
pub trait Addr: Copy + Default + PartialEq + Eq + core::hash::Hash + core::fmt::Debug + 'static {
    /// [`family`] of addresses of this type.
    const FAMILY: u8;
    /// The rule engine's form: an IPv4 address in the first word, the others 0.
    fn wide(self) -> Addr6;
    /// Whether this is the unspecified address (0.0.0.0, ::): "none" in the maps.
    fn is_unspecified(&self) -> bool;
    /// A 32-bit summary for [`flow_hash`]: the address itself for IPv4, its words mixed for IPv6.
    fn hash_word(&self) -> u32;
    /// The change to a checksum covering this address when it goes from `old` to `new`, as the packet holds them
    /// ([`crate::checksum::change_u32`] of each word).
    fn csum_change(old: &Self, new: &Self) -> u32;
}

impl Addr for u32 {
    const FAMILY: u8 = family::V4;
    #[inline(always)]
    fn wide(self) -> Addr6 {
        [self, 0, 0, 0]
    }
    #[inline(always)]
    fn is_unspecified(&self) -> bool {
        *self == 0
    }
    #[inline(always)]
    fn hash_word(&self) -> u32 {
        *self
    }
    #[inline(always)]
    fn csum_change(old: &u32, new: &u32) -> u32 {
        crate::checksum::change_u32(*old, *new)
    }
}

impl Addr for Addr6 {
    const FAMILY: u8 = family::V6;
    #[inline(always)]
    fn wide(self) -> Addr6 {
        self
    }
    #[inline(always)]
    fn is_unspecified(&self) -> bool {
        self[0] | self[1] | self[2] | self[3] == 0
    }
    #[inline(always)]
    fn hash_word(&self) -> u32 {
        self[0] ^ self[1].rotate_left(8) ^ self[2].rotate_left(16) ^ self[3].rotate_left(24)
    }
    #[inline(always)]
    fn csum_change(old: &Addr6, new: &Addr6) -> u32 {
        let c = crate::checksum::change_u32;
        c(old[0], new[0]) + c(old[1], new[1]) + c(old[2], new[2]) + c(old[3], new[3])
    }
}

/// `a` masked by `m`, word by word.
#[inline(always)]
pub const fn masked(a: &Addr6, m: &Addr6) -> Addr6 {
    [a[0] & m[0], a[1] & m[1], a[2] & m[2], a[3] & m[3]]
}

/// Implements `bytemuck::{Zeroable, Pod}` for instances of the generic map types, after checking their size is the
/// sum of their fields' (no implicit padding), which the derive cannot check for a generic type.
macro_rules! pod_instances {
    ($($t:ty = $size:expr),* $(,)?) => {$(
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
        // SAFETY: #[repr(C)], every field plain data, and (checked above) no padding between or after the fields.
        unsafe impl Zeroable for $t {}
        // SAFETY: as above.
        unsafe impl Pod for $t {}
    )*};
}

/// What a rule does to the first packet of a flow.
pub mod kind {
    /// Rewrite the destination to `to_addr[:to_port]` (prerouting, at ingress).
    pub const DNAT: u8 = 1;
    /// Rewrite the destination to the incoming interface's primary address and `to_port`.
    pub const REDIRECT: u8 = 2;
    /// Rewrite the source to `to_addr`, the port kept or allocated in `to_port..=to_port_hi` (postrouting, at
    /// egress of the outgoing interface).
    pub const SNAT: u8 = 3;
    /// SNAT to the outgoing interface's current primary address.
    pub const MASQUERADE: u8 = 4;
}

/// Which hook a rule belongs to (`IndexKey::hook`).
pub mod hook {
    /// DNAT / REDIRECT rules, matched at ingress (iptables PREROUTING).
    pub const PREROUTING: u8 = 0;
    /// SNAT / MASQUERADE rules, matched at egress (iptables POSTROUTING).
    pub const POSTROUTING: u8 = 1;
    /// `--local` DNAT / REDIRECT rules for connections of local processes, matched at connect/sendmsg by cgroup
    /// socket hooks (iptables OUTPUT).
    pub const OUTPUT: u8 = 2;
}

/// A class: one shape of rule matches (which of interface and protocol a rule fixes, and the prefix lengths of its
/// destination port block, source and destination networks) in one hook. A new flow's first packet is looked up
/// once per class of its hook, with its tuple masked to the class's shape, in the rule index (tuple space search,
/// as Open vSwitch does): the cost grows with the number of shapes, not of rules. Classes are kept in ascending
/// `min_rank`, so the walk stops at the first class that cannot beat the best rule found.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Class {
    /// The lowest rank of the class's rules (it may be lower than the actual lowest after a deletion: that only
    /// costs an extra lookup).
    pub min_rank: u64,
    /// Masks of the tuple's fields, in the tuple's byte order (addresses network order in their wide form, see
    /// [`Addr::wide`]; port host order).
    pub src_mask: Addr6,
    pub dst_mask: Addr6,
    pub port_mask: u16,
    /// The prefix lengths behind the masks (part of the index key, so shapes never share keys).
    pub port_plen: u8,
    pub src_plen: u8,
    pub dst_plen: u8,
    /// [`class_flag`] bits.
    pub flags: u8,
    /// [`family`] of the class's rules, 0 for rules of both families: a packet of the other family skips the class
    /// without looking it up (IPv6 rules cost IPv4 packets no index lookup, and the other way round).
    pub family: u8,
    pub _pad: u8,
}

/// `Class::flags` bits.
pub mod class_flag {
    /// The rules fix the interface (the key holds the packet's ifindex, else 0).
    pub const IFACE: u8 = 1 << 0;
    /// The rules fix the protocol (the key holds the packet's protocol, else 0); only TCP and UDP have rules of
    /// their own.
    pub const PROTO: u8 = 1 << 1;
}

/// A key of the rule index: a rule's matches, or a packet's tuple masked to a [`Class`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct IndexKey {
    /// 0 = any interface (the incoming one for PREROUTING rules, the outgoing one for POSTROUTING rules).
    pub ifindex: u32,
    /// Network order, wide form ([`Addr::wide`]), masked.
    pub saddr: Addr6,
    pub daddr: Addr6,
    /// Host order, masked to the port block.
    pub dport: u16,
    /// 0 = any protocol.
    pub proto: u8,
    /// [`hook`].
    pub hook: u8,
    pub port_plen: u8,
    pub src_plen: u8,
    pub dst_plen: u8,
    /// [`family`]: 0 for rules of both families.
    pub family: u8,
}

impl IndexKey {
    /// Whether the wide index ([`names::INDEX`], which IPv6 packets probe) holds this key: not for an IPv4 rule's,
    /// which only IPv4 packets can meet (in [`names::INDEX4`]).
    #[inline(always)]
    pub fn in_wide_index(&self) -> bool {
        self.family != family::V4
    }

    /// The key's IPv4 form, for the index IPv4 packets probe ([`names::INDEX4`]); None for an IPv6 rule's key.
    #[inline(always)]
    pub fn narrow(&self) -> Option<IndexKey4> {
        (self.family != family::V6).then_some(IndexKey4 {
            ifindex: self.ifindex,
            saddr: self.saddr[0],
            daddr: self.daddr[0],
            dport: self.dport,
            proto: self.proto,
            hook: self.hook,
            port_plen: self.port_plen,
            src_plen: self.src_plen,
            dst_plen: self.dst_plen,
            family: self.family,
        })
    }
}

/// An [`IndexKey`] of an IPv4 or both-family rule in IPv4 form: the same fields with 32-bit addresses, 20 bytes
/// instead of 44. IPv4 packets probe these ([`names::INDEX4`]), so their lookups hash no more than before IPv6.
/// The loader writes an IPv4 rule's keys only here, a both-family rule's keys to both indexes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct IndexKey4 {
    pub ifindex: u32,
    /// Network order, masked.
    pub saddr: u32,
    pub daddr: u32,
    pub dport: u16,
    pub proto: u8,
    pub hook: u8,
    pub port_plen: u8,
    pub src_plen: u8,
    pub dst_plen: u8,
    /// [`family`]: 0 or [`family::V4`], which stay apart as in [`IndexKey`].
    pub family: u8,
}

impl IndexKey4 {
    /// The [`IndexKey`] this is the IPv4 form of ([`IndexKey::narrow`] undone: IPv4 addresses are held wide with
    /// their first word set).
    pub fn widen(&self) -> IndexKey {
        IndexKey {
            ifindex: self.ifindex,
            saddr: [self.saddr, 0, 0, 0],
            daddr: [self.daddr, 0, 0, 0],
            dport: self.dport,
            proto: self.proto,
            hook: self.hook,
            port_plen: self.port_plen,
            src_plen: self.src_plen,
            dst_plen: self.dst_plen,
            family: self.family,
        }
    }
}

/// The rules of one index key, in rank order (best first). Rules being added or deleted are listed here with the
/// others; [`RuleEntry::gen_from`] and `gen_until` say which generation sees them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IndexEntry {
    pub len: u32,
    /// Rule slots; the first `len` are valid.
    pub slots: [u32; INDEX_SLOTS],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RuleEntry {
    /// Precedence: among matching rules the lowest `(rank, id)` wins. The rank is the rule's specificity (see
    /// `pfwd::rules::precedence`), a function of the rule alone, so adding a rule never re-ranks the others.
    pub rank: u64,
    /// The generations ([`Config::generation`]) that see the rule: `gen_from <= generation < gen_until`.
    pub gen_from: u32,
    pub gen_until: u32,
    /// The user-facing rule id (`pfwd list`), the last tie-break of precedence.
    pub id: u32,
    /// Source and destination filters, network order, wide form ([`Addr::wide`]); a zero mask matches everything.
    pub src_net: Addr6,
    pub src_mask: Addr6,
    pub dst_net: Addr6,
    pub dst_mask: Addr6,
    /// DNAT / SNAT target address, network order, wide form (unused by REDIRECT and MASQUERADE).
    pub to_addr: Addr6,
    /// DNAT / REDIRECT: the target port, 0 keeps the original port. SNAT / MASQUERADE: the low end of the source
    /// port range; 0 = keep the source port when free, else allocate from 1024-65535.
    pub to_port: u16,
    /// SNAT / MASQUERADE: the high end of the source port range.
    pub to_port_hi: u16,
    pub kind: u8,
    /// Rule protocol (PROTO_ANY matches every protocol).
    pub proto: u8,
    /// [`rule_flag`] bits: negated matches, `-d local`.
    pub flags: u8,
    /// [`family`]: the family the rule's addresses are of, or 0 for a rule of both families.
    pub family: u8,
    /// 0 = any interface; the incoming one for DNAT/REDIRECT, the outgoing one for SNAT/MASQUERADE.
    pub ifindex: u32,
}

impl IndexEntry {
    /// The entry listing `slots` (at most [`INDEX_SLOTS`]; compile refuses more).
    pub fn from_slots(slots: &[u32]) -> IndexEntry {
        let mut e = IndexEntry { len: slots.len().min(INDEX_SLOTS) as u32, ..Default::default() };
        e.slots[..e.len as usize].copy_from_slice(&slots[..e.len as usize]);
        e
    }
}

impl RuleEntry {
    /// Whether generation `gen` sees the rule.
    #[inline(always)]
    pub const fn visible(&self, generation: u32) -> bool {
        self.gen_from <= generation && generation < self.gen_until
    }
}

/// `RuleEntry::flags` bits.
pub mod rule_flag {
    /// `! -s`: the source must be outside `src_net/src_mask`.
    pub const NOT_SRC: u8 = 1 << 0;
    /// `! -d`: the destination must be outside `dst_net/dst_mask`.
    pub const NOT_DST: u8 = 1 << 1;
    /// `! -i` / `! -o`: any interface but `ifindex` (the rule is indexed under any interface).
    pub const NOT_IFACE: u8 = 1 << 2;
    /// `-d local`: the destination must be an address of this host (the kernel asks the FIB).
    pub const DST_LOCAL: u8 = 1 << 3;
    /// DNAT to several backends: `to_addr`/`to_port` are unused; a new flow's backend is the entry of the rule's
    /// Maglev table ([`BackendKey`](super::BackendKey)) at [`flow_hash`](super::flow_hash) of its tuple modulo
    /// [`MAGLEV_SIZE`](super::MAGLEV_SIZE).
    pub const BACKENDS: u8 = 1 << 4;
}

/// Entries of each Maglev table (a prime). Every rule with several backends has one table, so it stays the same size when backends come and go (which is what keeps the other backends' flows where they are). At least
/// 100 entries per backend keep the spread within about 1% of the weights for up to 40 backends; with the most
/// backends a rule may have ([`MAX_BACKENDS`]), each still gets 16 entries.
pub const MAGLEV_SIZE: u32 = 4093;
/// Backends of one rule.
pub const MAX_BACKENDS: usize = 255;
/// Rules with several backends (their tables are in the backends map), twice over: a table is only freed once its
/// rule's deletion is seen by every program.
pub const MAX_BACKEND_RULES: u32 = 256;
/// Entries of the backends map: every table.
pub const BACKEND_ENTRIES: u32 = 2 * MAX_BACKEND_RULES * MAGLEV_SIZE;
/// Entries of the per-backend counters: the backends of every rule, and as many again for backends removed from a
/// rule while their flows go on.
pub const BACKEND_COUNTER_ENTRIES: u32 = 2 * MAX_BACKEND_RULES * MAX_BACKENDS as u32;

/// One entry of a rule's Maglev table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendKey {
    /// The rule's slot: a slot's table is written before the rule becomes visible and removed after it is gone.
    pub rule: u32,
    /// 0..[`MAGLEV_SIZE`].
    pub index: u32,
}

/// The backend a Maglev table entry sends new flows to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendEntry {
    /// Network order, wide form ([`Addr::wide`]): of the rule's family.
    pub addr: Addr6,
    /// Host order; 0 keeps the original destination port.
    pub port: u16,
    pub _pad: u16,
}

/// Per-backend counters' key: the rule's slot and the backend as the flows were translated to it (address network
/// order, port host order), so a backend removed from the rule keeps counting the flows it still has.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BackendCounterKey {
    pub slot: u32,
    /// Wide form ([`Addr::wide`]).
    pub addr: Addr6,
    pub port: u16,
    pub _pad: u16,
}

/// The hash of a new flow's original tuple that picks its backend (a Murmur3-style mix of the addresses, ports and
/// protocol: 32-bit multiplies and rotates, which the BPF instruction set has). Userspace uses the same function to
/// measure the spread.
#[inline(always)]
pub fn flow_hash<A: Addr>(t: &FlowTuple<A>) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let words = [t.saddr.hash_word(), t.daddr.hash_word(), ((t.sport as u32) << 16) | t.dport as u32, t.proto as u32];
    let mut h: u32 = 0x9747_b28c;
    let mut i = 0;
    while i < words.len() {
        let k = words[i].wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h = (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 1;
    }
    h ^= 16;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Per-rule counters (a per-CPU array indexed by rule slot; userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RuleCounters {
    /// Packets translated by this rule, both directions.
    pub packets: u64,
    /// Their IP bytes (IP header and payload, as iptables counts).
    pub bytes: u64,
    /// Flows (connections) this rule created.
    pub flows: u64,
    /// New flows this rule had to drop (SNAT: no free port in the range; REDIRECT: no interface address).
    pub drops: u64,
}

/// The global counters (a per-CPU array indexed by the variant's value): why a packet passed untranslated or was
/// dropped, and the other events of the data path. The kernel counts them and returns them as the reason a new flow
/// was refused; `pfwd status` prints them by [`Stat::name`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stat {
    /// Unused (per-packet totals are the sum of the rule counters).
    Unused = 0,
    /// New flows created.
    NewFlows = 1,
    /// IPv4 fragments passed untouched although pfwd could not tell their datagram: a later fragment seen before
    /// its first fragment (or a first fragment too short to hold the ports) on an instance without NAT rules or on an
    /// interface pfwd is not attached to. With rules, such fragments are dropped instead ([`Stat::FragmentsDropped`]).
    Fragments = 2,
    /// Truncated or malformed IPv4/L4 headers passed untouched.
    Malformed = 3,
    /// REDIRECT or MASQUERADE on an interface without an IPv4 address: dropped, as iptables does.
    NoIfaceAddr = 4,
    /// Conntrack insert failed (new flow passed untranslated).
    CtInsertFailed = 5,
    /// Expired flows removed on lookup (their packets then pass untranslated, as new traffic).
    ExpiredRemoved = 6,
    /// New flows dropped because a live flow already translates to the same tuple (replies would be ambiguous).
    CtClash = 7,
    /// TCP SYN-ACKs matching the reply entry of a closed flow: a new, untranslated connection on the same ports;
    /// the stale flow is removed and the packet passes.
    StaleRemoved = 8,
    /// New SNAT/MASQUERADE flows dropped: no free port in the rule's range.
    SnatExhausted = 9,
    /// ICMP errors about translated flows, translated (outer and embedded headers).
    IcmpErrorsXlated = 10,
    /// Later fragments of a translated datagram, rewritten like its first fragment.
    FragmentsXlated = 11,
    /// Fragments dropped because their datagram's translation is unknown: a later fragment seen before the first
    /// (out of order, or its first was lost or evicted), or a first fragment too short to hold the ports. Passing
    /// them untranslated could leak an untranslated address and could never be reassembled with the rest.
    FragmentsDropped = 12,
    /// Flows that became confirmed (TCP: a reply, then an ACK from the original side; others: a reply) and moved
    /// from the unconfirmed-flow table to the confirmed one.
    FlowsConfirmed = 13,
    /// A packet of an unconfirmed flow found its other entry gone, evicted from the full unconfirmed-flow table (a
    /// flood of new flows), and put it back. Flows evicted whole are not seen, so this is a lower bound.
    UnconfirmedRestored = 14,
    /// Packets the XDP fast path (`--xdp`) translated and sent to their egress interface itself; every other
    /// packet went on to the tc programs.
    XdpForwarded = 15,
    /// Forwarded packets the egress program handled from what the ingress program had just found about them (the
    /// handoff, which tc ingress leaves for egress on the same CPU), without a conntrack lookup of its own: it
    /// applied their flow's translation as ingress handed it over, or knew it had nothing to do.
    EgressHandoffs = 16,
}

impl Stat {
    /// Entries of the stats array.
    pub const COUNT: u32 = 17;
    /// Every counter, in index order (`ALL[i] as u32 == i`).
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::Unused,
        Stat::NewFlows,
        Stat::Fragments,
        Stat::Malformed,
        Stat::NoIfaceAddr,
        Stat::CtInsertFailed,
        Stat::ExpiredRemoved,
        Stat::CtClash,
        Stat::StaleRemoved,
        Stat::SnatExhausted,
        Stat::IcmpErrorsXlated,
        Stat::FragmentsXlated,
        Stat::FragmentsDropped,
        Stat::FlowsConfirmed,
        Stat::UnconfirmedRestored,
        Stat::XdpForwarded,
        Stat::EgressHandoffs,
    ];

    /// Index in the stats array.
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// The name `pfwd status` (and its `--json`) shows.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Unused => "",
            Stat::NewFlows => "new_flows",
            Stat::Fragments => "fragments_passed",
            Stat::Malformed => "malformed_passed",
            Stat::NoIfaceAddr => "redirect_no_address_drops",
            Stat::CtInsertFailed => "conntrack_insert_failed",
            Stat::ExpiredRemoved => "expired_flows_removed",
            Stat::CtClash => "conntrack_clash_drops",
            Stat::StaleRemoved => "stale_flows_removed",
            Stat::SnatExhausted => "snat_port_exhausted_drops",
            Stat::IcmpErrorsXlated => "icmp_errors_translated",
            Stat::FragmentsXlated => "fragments_translated",
            Stat::FragmentsDropped => "fragments_unknown_drops",
            Stat::FlowsConfirmed => "flows_confirmed",
            Stat::UnconfirmedRestored => "unconfirmed_entries_restored",
            Stat::XdpForwarded => "xdp_forwarded",
            Stat::EgressHandoffs => "egress_handoffs",
        }
    }
}

/// One attached interface. The programs only translate on interfaces present in this map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IfaceInfo {
    /// Primary IPv4 address (network order), used by REDIRECT; 0 when the interface has none.
    pub addr: u32,
    pub flags: u32,
    /// Primary IPv6 address (the global one the kernel would use as a source; network order), used by REDIRECT of
    /// IPv6; :: when the interface has none.
    pub addr6: Addr6,
    /// The link-layer address (Ethernet-type interfaces; zeros otherwise): the XDP fast path forwards only frames
    /// sent to it, as the stack does (a frame for another host, seen in promiscuous mode, is not forwarded).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Slots of [`names::IFACE_MACS`]: the XDP fast path's copy of attached interfaces' link-layer addresses, where it
/// finds its ingress interface's without a hash lookup (an array lookup is inlined by the verifier; the hash lookup
/// of [`names::IFACES`] was a tenth of the fast path's cost).
pub const IFACE_MAC_SLOTS: u32 = 256;

/// An interface's entry in [`names::IFACE_MACS`]: at index `ifindex % IFACE_MAC_SLOTS`, one 64-bit word (read and
/// written whole) holding which interface owns the slot (a tag, `ifindex / IFACE_MAC_SLOTS + 1`, in the low 16 bits;
/// 0 is a free slot) and its address above it. Interfaces whose slot another one owns, or whose ifindex is too large
/// for a tag, are found in [`names::IFACES`] instead: a slot is only a shortcut to what that map says.
pub struct IfaceMacSlot;

impl IfaceMacSlot {
    const TAG_BITS: u32 = 16;
    const TAG_MASK: u64 = (1 << Self::TAG_BITS) - 1;

    /// The slot index of `ifindex`.
    #[inline(always)]
    pub const fn index(ifindex: u32) -> u32 {
        ifindex % IFACE_MAC_SLOTS
    }

    /// `ifindex`'s tag; None when it is too large to have one.
    #[inline(always)]
    pub const fn tag(ifindex: u32) -> Option<u64> {
        let tag = ifindex / IFACE_MAC_SLOTS + 1;
        if tag as u64 > Self::TAG_MASK { None } else { Some(tag as u64) }
    }

    /// The word of `ifindex` with address `mac`; None when `ifindex` cannot have a slot.
    #[inline(always)]
    pub const fn word(ifindex: u32, mac: [u8; 6]) -> Option<u64> {
        match Self::tag(ifindex) {
            Some(tag) => Some(tag | Self::mac_bits(mac)),
            None => None,
        }
    }

    /// `mac` in a word's address bits.
    #[inline(always)]
    pub const fn mac_bits(mac: [u8; 6]) -> u64 {
        Self::mac_bits_of(u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]), u16::from_ne_bytes([mac[4], mac[5]]))
    }

    /// [`mac_bits`](Self::mac_bits) of an address read as a word (its first four bytes) and a half-word (the last
    /// two) in memory order: two loads where the fast path reads it from the frame. (The programs are built for the
    /// host's byte order, so the loader's words and the program's loads agree.)
    #[inline(always)]
    pub const fn mac_bits_of(first4: u32, last2: u16) -> u64 {
        (first4 as u64 | (last2 as u64) << 32) << Self::TAG_BITS
    }

    /// Whether `word`, read at `ifindex`'s index, is `ifindex`'s (its tag is `tag`).
    #[inline(always)]
    pub const fn owned(word: u64, tag: u64) -> bool {
        word & Self::TAG_MASK == tag
    }

    /// The interface that owns `word`, read at index `index`; None for a free slot.
    pub const fn owner(word: u64, index: u32) -> Option<u32> {
        let tag = (word & Self::TAG_MASK) as u32;
        if tag == 0 { None } else { Some((tag - 1) * IFACE_MAC_SLOTS + index) }
    }
}

/// One fragmented datagram at one hook: the fields that identify a datagram (RFC 791: source, destination,
/// protocol, identification), as its fragments carry them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKeyOf<A> {
    pub saddr: A,
    pub daddr: A,
    /// The identification: 16 bits in IPv4, 32 in IPv6's fragment header.
    pub id: u32,
    pub proto: u8,
    /// [`ct_hook`]: the same datagram is seen at both hooks of a forwarded flow, translated at most at one.
    pub hook: u8,
    pub _pad: u16,
}
pub type FragKey = FragKeyOf<u32>;
pub type FragKey6 = FragKeyOf<Addr6>;

/// What the first fragment of a datagram got, applied to its later fragments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntryOf<A> {
    /// The addresses the later fragments get (network order); equal to the key's for [`frag_action::PASS`].
    pub saddr: A,
    pub daddr: A,
    /// The rule slot whose counters the later fragments' bytes go to ([`frag_action::XLATE`]).
    pub rule_slot: u32,
    /// [`frag_action`].
    pub action: u32,
    /// When the first fragment was seen (CLOCK_MONOTONIC_COARSE, ns).
    pub seen_ns: u64,
}
pub type FragEntry = FragEntryOf<u32>;
pub type FragEntry6 = FragEntryOf<Addr6>;

/// `FragEntry::action`: what happens to the later fragments.
pub mod frag_action {
    /// Untouched: the datagram is not translated at this hook.
    pub const PASS: u32 = 0;
    /// Rewritten at the IP level to the entry's addresses.
    pub const XLATE: u32 = 1;
    /// Dropped, as the first fragment was.
    pub const DROP: u32 = 2;
}

/// What `pfwd detach` needs to undo when the controller's state file is gone (the earlier values of the sysctls pfwd
/// changed, the tables it created), kept with the data path itself: JSON text, written by userspace before the
/// changes it describes; the programs never read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct RecordText {
    pub len: u32,
    pub _pad: u32,
    pub text: [u8; 4096],
}

/// `Config::flags` bits.
pub mod config_flag {
    /// Emit a log event for every new flow and every drop (set by `pfwd run`, which has a reader).
    pub const LOG_EVENTS: u32 = 1 << 0;
    /// Also log every translated packet (very verbose; `pfwd run --trace`).
    pub const LOG_PACKETS: u32 = 1 << 1;
    /// Forwarded packets of pfwd's flows skip the IP stack (FIB lookup + `bpf_redirect_neigh`); `--fast-forward`.
    pub const FAST_FORWARD: u32 = 1 << 2;
    /// Userspace's own mark (the programs do not read it): a rule change made its writes that packets cannot see
    /// yet (before the flip) ahead of saving its state. The flip clears it; found set, a pfwd was killed between the
    /// two, and the next change reads the rules back from the maps instead of trusting the saved ones.
    pub const STAGED: u32 = 1 << 3;
    /// Userspace's record (the programs do not read it): the loader could give the programs `sk_buff.ip_summed`
    /// (`kern_ctx`), so they update TCP/UDP checksums by hand where the skb allows; without it, every L4 checksum
    /// goes through `bpf_l4_csum_replace`. `pfwd status` shows which.
    pub const L4_CSUM_BY_HAND: u32 = 1 << 4;
}

/// Single-entry array holding the instance's settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// The rule generation packets are matched in: a rule is seen when `gen_from <= generation < gen_until`, and the
    /// class lists of bank `generation & 1` are walked. A rule change writes the new rules (invisible, `gen_from` =
    /// next generation), the rules it deletes (`gen_until` = next generation), the index entries (listing both) and
    /// the other bank's class lists, then moves this field on in one write: a packet sees the old rule set or the
    /// new one, never a mix.
    pub generation: u32,
    /// Each class bank's class counts.
    pub classes: [ClassCounts; CLASS_BANKS as usize],
    pub flags: u32,
    /// Idle timeouts, in seconds. `tcp_syn_timeout` applies to a TCP flow until it is confirmed (SYN sent, or
    /// SYN-ACK seen but not yet the client's ACK).
    pub tcp_syn_timeout: u32,
    pub tcp_established_timeout: u32,
    pub tcp_close_timeout: u32,
    pub udp_timeout: u32,
    pub other_timeout: u32,
    /// The kernel's tick in ns (1e9 / HZ), set at load: the programs' clock is then `jiffies * tick_ns`, from the
    /// `bpf_jiffies64` helper, which the verifier inlines into one load (where `bpf_ktime_get_coarse_ns`, the same
    /// tick precision, is a call: about a tenth of an established packet's cost). 0: the programs call the helper.
    pub tick_ns: u32,
    /// When userspace last moved [`Config::generation`] on (CLOCK_MONOTONIC, ns; the programs do not read it): the
    /// next change waits for readers of the old class bank only if it comes soon after.
    pub flipped_ns: u64,
    /// The instance's network namespace cookie: the cgroup socket hooks see every namespace's sockets and must act
    /// only in this one.
    pub netns_cookie: u64,
}

/// How many classes each hook has, in one class bank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ClassCounts {
    /// PREROUTING (DNAT, REDIRECT).
    pub pre: u32,
    /// POSTROUTING (SNAT, MASQUERADE).
    pub post: u32,
    /// OUTPUT (`--local`).
    pub local: u32,
}

/// The rule set a packet is matched in: the generation, its class bank, and that bank's class counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub generation: u32,
    pub bank: u32,
    pub counts: ClassCounts,
}

impl Config {
    /// The active rule set, read once (the generation is read a single time, so a concurrent flip cannot pair one
    /// bank's number with the other's counts: userspace never changes the active bank's counts).
    #[inline(always)]
    pub fn active(&self) -> RuleSet {
        let generation = self.generation;
        let bank = generation & (CLASS_BANKS - 1);
        RuleSet { generation, bank, counts: self.classes[bank as usize] }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            generation: 0,
            classes: [ClassCounts::default(); CLASS_BANKS as usize],
            flags: 0,
            tcp_syn_timeout: 10,
            tcp_established_timeout: 6 * 3600,
            tcp_close_timeout: 10,
            udp_timeout: 60,
            other_timeout: 30,
            tick_ns: 0,
            flipped_ns: 0,
            netns_cookie: 0,
        }
    }
}

/// A flow tuple of either family ([`Tuple`], [`Tuple6`]). Addresses network order, ports host order. For protocols
/// without ports, ports are 0; an ICMP echo's identifier is both ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowTuple<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Padding as two fields, not `[u8; 3]`: the kernel build zeroes and copies an odd-sized array with a call to
    /// a memset subprogram, a measurable share of the per-packet cost.
    pub _pad: u8,
    pub _pad2: u16,
}

pub type Tuple = FlowTuple<u32>;
pub type Tuple6 = FlowTuple<Addr6>;

impl<A: Addr> FlowTuple<A> {
    #[inline(always)]
    pub const fn new(saddr: A, daddr: A, sport: u16, dport: u16, proto: u8) -> Self {
        FlowTuple { saddr, daddr, sport, dport, proto, _pad: 0, _pad2: 0 }
    }

    /// A copy made field by field. In the kernel build, `*a = *b` between two references may alias, and compiles
    /// to a call of the memmove subprogram; separate loads and stores do not.
    #[inline(always)]
    pub fn copied(&self) -> Self {
        FlowTuple::new(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }

    /// The same flow seen from the other end.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        FlowTuple::new(self.daddr, self.saddr, self.dport, self.sport, self.proto)
    }

    /// The rule engine's form of the tuple ([`Addr::wide`]).
    #[inline(always)]
    pub fn wide(&self) -> Tuple6 {
        FlowTuple::new(self.saddr.wide(), self.daddr.wide(), self.sport, self.dport, self.proto)
    }
}

/// Conntrack entry direction.
pub mod dir {
    /// Keyed by the tuple as it arrived (before translation); applied at ingress.
    pub const ORIGINAL: u8 = 0;
    /// Keyed by the reply tuple as the backend sends it; applied at egress.
    pub const REPLY: u8 = 1;
}

/// Where a conntrack entry is applied. DNAT flows: original direction at ingress, replies at egress. SNAT flows:
/// original direction at egress (after routing), replies at ingress.
pub mod ct_hook {
    pub const INGRESS: u8 = 0;
    pub const EGRESS: u8 = 1;
}

/// `CtEntry::flags` bits (the same in both entries of a flow).
pub mod ct_flag {
    /// The flow's rule has several backends: its packets are counted per backend too (the backend is the
    /// original direction's new destination, the reply direction's source).
    pub const BACKENDS: u8 = 1 << 0;
    /// The packets this flow translates at ingress have more to do at egress: the tuple they are translated to is
    /// another flow's, translated there (the second half of a full NAT: DNAT at ingress, then SNAT at egress). Set
    /// when the flow, or that other flow, is created (`conntrack::create` looks the translated tuple up).
    pub const EGRESS_TOO: u8 = 1 << 1;
    /// A packet this flow translated at ingress has passed egress, which settled the flow's NAT there (a flow of its
    /// translated tuple found or opened, or none): later ones never open a flow at egress, as netfilter settles a
    /// connection's NAT with its first packet, and without [`EGRESS_TOO`] egress leaves them alone without a
    /// lookup (the handoff, `pfwd-ebpf/src/handoff.rs`).
    pub const SETTLED: u8 = 1 << 2;
    /// The flow was just confirmed (moved to the confirmed table): its next packet checks that both entries made it
    /// (an insert into a full table may evict one of a pair) and restores a missing one, then clears the bit.
    pub const UNCHECKED: u8 = 1 << 3;
}

/// Conntrack state bits (kept identical in both entries of a flow).
pub mod ct_state {
    pub const SEEN_REPLY: u8 = 1 << 0;
    pub const FIN_ORIGINAL: u8 = 1 << 1;
    pub const FIN_REPLY: u8 = 1 << 2;
    pub const RST: u8 = 1 << 3;
    /// The flow is confirmed, like netfilter's ASSURED: TCP once a reply was seen and then an ACK (without SYN or
    /// RST) from the original side, which a spoofed SYN never sends; other protocols once a reply was seen.
    /// Confirmed flows live in the confirmed table (`PFWD_CT`), the others in the unconfirmed one (`PFWD_CT_NEW`):
    /// an entry has this bit exactly when it is in `PFWD_CT`.
    pub const CONFIRMED: u8 = 1 << 4;
}

/// A conntrack entry: the packet whose tuple equals the key is rewritten to `xlat`. The other direction's key is
/// `xlat.reversed()`, so the pair can refresh each other without storing a back-pointer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntryOf<A> {
    pub xlat: FlowTuple<A>,
    /// Rule slot that created the flow (for counters).
    pub rule_slot: u32,
    /// [`dir`]: which way the flow's packets go (for TCP state: who sent the FIN).
    pub dir: u8,
    pub state: u8,
    /// [`ct_hook`]: where this entry is applied.
    pub hook: u8,
    /// [`ct_flag`] bits.
    pub flags: u8,
    /// The low 32 bits of the unconfirmed-flow table's insert count (`names::CT_NEW_INSERTS`) when this entry's
    /// flow last found both its entries there: the next check is due [`unconfirmed_check_inserts`] inserts later
    /// (differences wrap). Unused in the confirmed table.
    pub checked_inserts: u32,
    /// The programs' clock (CLOCK_MONOTONIC_COARSE) at creation, in whole seconds: only shown, as the flow's age
    /// (32 bits keep the entry at 40 bytes).
    pub created_s: u32,
    /// The programs' clock at the last packet, in ns (refreshed at most once a second).
    pub last_seen_ns: u64,
}

pub type CtEntry = CtEntryOf<u32>;
pub type CtEntry6 = CtEntryOf<Addr6>;

pod_instances!(
    Tuple = 16,
    Tuple6 = 40,
    CtEntry = 40,
    CtEntry6 = 64,
    FragKey = 16,
    FragKey6 = 40,
    FragEntry = 24,
    FragEntry6 = 48,
);

impl<A: Addr> CtEntryOf<A> {
    /// Whether the TCP flow is over: reset, or closed from both sides (the state bits are only set for TCP).
    #[inline(always)]
    pub const fn is_closed(&self) -> bool {
        self.state & ct_state::RST != 0
            || self.state & (ct_state::FIN_ORIGINAL | ct_state::FIN_REPLY)
                == (ct_state::FIN_ORIGINAL | ct_state::FIN_REPLY)
    }

    /// Whether the flow is confirmed (in the confirmed table): see [`ct_state::CONFIRMED`].
    #[inline(always)]
    pub const fn is_confirmed(&self) -> bool {
        self.state & ct_state::CONFIRMED != 0
    }

    /// Idle timeout for this entry's protocol and state, in nanoseconds. An unconfirmed TCP flow has the SYN
    /// timeout, whether or not the SYN-ACK was seen.
    #[inline(always)]
    pub fn timeout_ns(&self, cfg: &Config) -> u64 {
        let secs = match self.xlat.proto {
            PROTO_TCP => {
                if self.is_closed() {
                    cfg.tcp_close_timeout
                } else if !self.is_confirmed() {
                    cfg.tcp_syn_timeout
                } else {
                    cfg.tcp_established_timeout
                }
            }
            PROTO_UDP => cfg.udp_timeout,
            _ => cfg.other_timeout,
        };
        secs as u64 * 1_000_000_000
    }

    /// Saturating: a clock read a tick behind the entry's last update (another CPU, or userspace's coarser
    /// reading) is "just seen", never "long ago".
    #[inline(always)]
    pub fn expired(&self, now_ns: u64, cfg: &Config) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.timeout_ns(cfg)
    }
}

/// Local-socket translations (`--local` rules): a socket (by cookie) and the address it was sent to after
/// translation, so replies (`recvmsg`) and `getpeername` can show the address the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockKey {
    pub cookie: u64,
    /// Translated address (network order) and port (host order).
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// The original destination of a local-socket translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockOrig {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

pub const MAX_SOCKETS: u32 = 65_536;

/// [`SockKey`] of an IPv6 socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockKey6 {
    pub cookie: u64,
    pub addr: Addr6,
    pub port: u16,
    pub _pad: u16,
    pub _pad2: u32,
}

/// [`SockOrig`] of an IPv6 socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockOrig6 {
    pub addr: Addr6,
    pub port: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    /// Implements `aya::Pod` for types that are `bytemuck::Pod`, which the compiler checks here.
    macro_rules! aya_pod_from_bytemuck {
        ($($t:ty),* $(,)?) => {$(
            const _: () = {
                const fn is_bytemuck_pod<T: bytemuck::Pod>() {}
                is_bytemuck_pod::<$t>()
            };
            // SAFETY: the type is bytemuck::Pod (checked just above): #[repr(C)], no padding, every field plain
            // data, so every byte pattern is a valid value — what aya::Pod requires.
            unsafe impl aya::Pod for $t {}
        )*};
    }

    aya_pod_from_bytemuck!(
        Tuple6,
        CtEntry6,
        FragKey6,
        FragEntry6,
        IndexKey,
        IndexKey4,
        IndexEntry,
        Class,
        RuleEntry,
        RuleCounters,
        IfaceInfo,
        Config,
        ClassCounts,
        Tuple,
        CtEntry,
        FragKey,
        FragEntry,
        RecordText,
        SockKey,
        SockOrig,
        SockKey6,
        SockOrig6,
        BackendKey,
        BackendEntry,
        BackendCounterKey
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<IndexKey>(), 44);
        assert_eq!(size_of::<IndexKey4>(), 20);
        assert_eq!(size_of::<Class>(), 48);
        assert_eq!(size_of::<ClassCounts>(), 12);
        assert_eq!(size_of::<FragKey>(), 16);
        assert_eq!(size_of::<FragEntry>(), 24);
        assert_eq!(size_of::<IndexEntry>(), 4 + 4 * INDEX_SLOTS);
        assert_eq!(size_of::<RuleEntry>(), 112);
        assert_eq!(size_of::<IfaceInfo>(), 32);
        assert_eq!(size_of::<Tuple>(), 16);
        assert_eq!(size_of::<CtEntry>(), 40);
        assert_eq!(size_of::<Config>(), 72);
        assert_eq!(size_of::<SockKey>(), 16);
        assert_eq!(size_of::<SockOrig>(), 8);
        assert_eq!(size_of::<BackendKey>(), 8);
        assert_eq!(size_of::<BackendEntry>(), 20);
        assert_eq!(size_of::<BackendCounterKey>(), 24);
    }

    #[test]
    fn stats_are_indexed_by_their_value_and_keep_their_names() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(s.index(), i as u32, "{s:?}");
        }
        // The names are output (`pfwd status`, `--json`): changing one breaks scripts.
        let names = Stat::ALL.map(Stat::name);
        assert_eq!(
            names,
            [
                "",
                "new_flows",
                "fragments_passed",
                "malformed_passed",
                "redirect_no_address_drops",
                "conntrack_insert_failed",
                "expired_flows_removed",
                "conntrack_clash_drops",
                "stale_flows_removed",
                "snat_port_exhausted_drops",
                "icmp_errors_translated",
                "fragments_translated",
                "fragments_unknown_drops",
                "flows_confirmed",
                "unconfirmed_entries_restored",
                "xdp_forwarded",
                "egress_handoffs",
            ]
        );
    }

    #[test]
    fn closed_means_reset_or_fin_both_ways() {
        let e = |state| CtEntry { state, ..Default::default() };
        assert!(!e(0).is_closed());
        assert!(!e(ct_state::SEEN_REPLY).is_closed());
        assert!(!e(ct_state::SEEN_REPLY | ct_state::FIN_ORIGINAL).is_closed());
        assert!(!e(ct_state::FIN_REPLY).is_closed());
        assert!(e(ct_state::FIN_ORIGINAL | ct_state::FIN_REPLY).is_closed());
        assert!(e(ct_state::RST).is_closed());
        assert!(e(ct_state::SEEN_REPLY | ct_state::RST).is_closed());
    }

    #[test]
    fn iface_mac_slots_name_their_owner() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        for ifindex in [1, 2, 255, 256, 257, 1000, 65_000, 16_000_000] {
            let w = IfaceMacSlot::word(ifindex, mac).expect("a slot");
            let (i, tag) = (IfaceMacSlot::index(ifindex), IfaceMacSlot::tag(ifindex).unwrap());
            assert!(i < IFACE_MAC_SLOTS);
            assert!(IfaceMacSlot::owned(w, tag), "ifindex {ifindex}");
            assert_eq!(IfaceMacSlot::owner(w, i), Some(ifindex));
            // What the fast path compares: the word of the owner with the frame's address.
            assert_eq!(w, tag | IfaceMacSlot::mac_bits(mac));
            assert_ne!(w, tag | IfaceMacSlot::mac_bits([0x02, 0x11, 0x22, 0x33, 0x44, 0x56]));
            // Another interface of the same index does not own it.
            let other = ifindex + IFACE_MAC_SLOTS;
            assert_eq!(IfaceMacSlot::index(other), i);
            assert!(!IfaceMacSlot::owned(w, IfaceMacSlot::tag(other).unwrap()));
        }
        assert_eq!(
            IfaceMacSlot::mac_bits(mac),
            IfaceMacSlot::mac_bits_of(u32::from_ne_bytes([0x02, 0x11, 0x22, 0x33]), u16::from_ne_bytes([0x44, 0x55]))
        );
        // Every address bit is kept, none reaches the tag.
        let all = IfaceMacSlot::word(3, [0xff; 6]).unwrap();
        assert_eq!(all, 1 | (0xffff_ffff_ffff << 16));
        // A free slot has no owner and is owned by no tag (tags start at 1).
        assert_eq!(IfaceMacSlot::owner(0, 7), None);
        assert!(!IfaceMacSlot::owned(0, IfaceMacSlot::tag(7).unwrap()));
        // ifindex values beyond the tag's 16 bits have no slot.
        assert_eq!(IfaceMacSlot::tag(u32::MAX), None);
        assert_eq!(IfaceMacSlot::word(65_535 * IFACE_MAC_SLOTS, mac), None);
        assert!(IfaceMacSlot::word(65_535 * IFACE_MAC_SLOTS - 1, mac).is_some());
    }

    #[test]
    fn unconfirmed_table_is_a_quarter_with_a_floor() {
        assert_eq!(unconfirmed_ct_entries(DEFAULT_CT_ENTRIES), DEFAULT_CT_ENTRIES / 4);
        assert_eq!(unconfirmed_ct_entries(4096), 1024);
        assert_eq!(unconfirmed_ct_entries(1024), MIN_CT_NEW_ENTRIES);
        assert_eq!(unconfirmed_ct_entries(64), MIN_CT_NEW_ENTRIES);
    }

    #[test]
    fn a_check_is_due_every_eighth_of_the_unconfirmed_table() {
        assert_eq!(unconfirmed_check_inserts(unconfirmed_ct_entries(DEFAULT_CT_ENTRIES)), 16_384);
        assert_eq!(unconfirmed_check_inserts(MIN_CT_NEW_ENTRIES), 32);
        assert_eq!(unconfirmed_check_inserts(4), 1);
    }

    #[test]
    fn udp_and_other_timeouts_do_not_depend_on_confirmation() {
        let cfg = Config::default();
        for (proto, secs) in [(PROTO_UDP, 60), (PROTO_ICMP, 30)] {
            let mut e = CtEntry { xlat: Tuple { proto, ..Default::default() }, ..Default::default() };
            assert_eq!(e.timeout_ns(&cfg), secs * 1_000_000_000);
            e.state = ct_state::SEEN_REPLY | ct_state::CONFIRMED;
            assert_eq!(e.timeout_ns(&cfg), secs * 1_000_000_000);
        }
    }

    #[test]
    fn zeroed_values_are_the_zero_defaults() {
        // Zeroable and Default agree wherever Default is derived (Config's defaults are real timeouts).
        assert_eq!(bytemuck::bytes_of(&Tuple::zeroed()), bytemuck::bytes_of(&Tuple::default()));
        assert_eq!(CtEntry::zeroed(), CtEntry::default());
        assert_eq!(RuleEntry::zeroed(), RuleEntry::default());
        assert_eq!(Config::zeroed().tcp_syn_timeout, 0);
    }

    #[test]
    fn tcp_timeouts_follow_state() {
        let cfg = Config::default();
        let mut e = CtEntry { xlat: Tuple { proto: PROTO_TCP, ..Default::default() }, ..Default::default() };
        assert_eq!(e.timeout_ns(&cfg), 10_000_000_000, "SYN sent");
        e.state = ct_state::SEEN_REPLY;
        assert_eq!(e.timeout_ns(&cfg), 10_000_000_000, "SYN-ACK seen, not yet the ACK: still unconfirmed");
        e.state |= ct_state::CONFIRMED;
        assert_eq!(e.timeout_ns(&cfg), 6 * 3600 * 1_000_000_000);
        e.state |= ct_state::FIN_ORIGINAL;
        assert_eq!(e.timeout_ns(&cfg), 6 * 3600 * 1_000_000_000, "half-close keeps the flow");
        e.state |= ct_state::FIN_REPLY;
        assert_eq!(e.timeout_ns(&cfg), 10_000_000_000);
        e.state = ct_state::SEEN_REPLY | ct_state::CONFIRMED | ct_state::RST;
        assert_eq!(e.timeout_ns(&cfg), 10_000_000_000);
        assert!(e.expired(e.last_seen_ns + 10_000_000_001, &cfg));
        assert!(!e.expired(e.last_seen_ns + 9_000_000_000, &cfg));
    }
}
