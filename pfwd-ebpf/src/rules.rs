//! Rule lookup for the first packet of a flow: the tuple space search of `pfwd_common::lookup` (shared with
//! userspace, whose precedence tests run the same probe) over this program's maps, one class per `bpf_loop`
//! iteration, so the verifier checks the probe once whatever the number of classes.
//!
//! In the tc programs the walk and its probe key live in a per-CPU scratch value, not on the stack: the callback's
//! frame is added to its callers' against the verifier's 512-byte limit.
//!
//! IPv4 packets probe `INDEX4`, the IPv4 form of the index (20-byte keys: what they hashed before IPv6), IPv6
//! packets the wide `INDEX`; each family's callbacks are their own functions (`Indexed`), so a program compiles
//! only its family's.
use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_loop;
use pfwd_common::{
    Addr, FlowTuple, IndexEntry, IndexKey, IndexKey4, ProbeKey, RuleEntry, RuleSet, Walk, class_index, family, hook,
};

use crate::maps::{CLASSES, INDEX, INDEX4, LOCAL_ADDRS, LOCAL_ADDRS6, RULES, SCRATCH, Scratch};

/// A probe key type with its index map and its place in the scratch value.
trait Indexed: ProbeKey + Default + 'static {
    fn index(key: &Self) -> Option<&'static IndexEntry>;
    /// The key's field of the scratch value `s` (a field pointer: the walk beside it is borrowed too).
    fn in_scratch(s: *mut Scratch) -> *mut Self;
}

impl Indexed for IndexKey {
    #[inline(always)]
    fn index(key: &Self) -> Option<&'static IndexEntry> {
        // SAFETY: plain read of a map value, which stays valid for the program's run.
        unsafe { INDEX.get(key) }
    }
    #[inline(always)]
    fn in_scratch(s: *mut Scratch) -> *mut Self {
        // SAFETY: a field address, nothing is read.
        unsafe { &raw mut (*s).key }
    }
}

impl Indexed for IndexKey4 {
    #[inline(always)]
    fn index(key: &Self) -> Option<&'static IndexEntry> {
        // SAFETY: as above.
        unsafe { INDEX4.get(key) }
    }
    #[inline(always)]
    fn in_scratch(s: *mut Scratch) -> *mut Self {
        // SAFETY: as above.
        unsafe { &raw mut (*s).key4 }
    }
}

/// Finds the rule of `hook` (PREROUTING: DNAT/REDIRECT for a flow arriving on `ifindex`; POSTROUTING:
/// SNAT/MASQUERADE for a flow leaving through it; OUTPUT: `--local` rules, ifindex 0) with the lowest rank among
/// those matching `t` in the rule set `set`. Returns the rule's slot and its entry.
///
/// The tc programs keep the walk in this CPU's scratch value: they run with bottom halves disabled, so nothing else
/// on the CPU uses it meanwhile. The socket hooks run in process context, where a tc program (or, preempted,
/// another socket hook) may run on the same CPU in the middle of their walk: they keep theirs on the stack
/// (`on_stack`), which their small frames can afford.
#[inline(always)]
pub fn find<A: Addr>(
    t: &FlowTuple<A>,
    ifindex: u32,
    hook: u8,
    set: &RuleSet,
    on_stack: bool,
) -> Option<(u32, &'static RuleEntry)> {
    let count = match hook {
        hook::PREROUTING => set.counts.pre,
        hook::POSTROUTING => set.counts.post,
        _ => set.counts.local,
    };
    let (slot, found) = if on_stack {
        let mut walk = Walk::new(t, ifindex, hook, (set.generation, set.bank));
        let callback = if A::FAMILY == family::V4 {
            probe_on_stack::<IndexKey4> as *mut c_void
        } else {
            probe_on_stack::<IndexKey> as *mut c_void
        };
        // SAFETY: the callback only uses `walk` through the context pointer while bpf_loop runs.
        unsafe { bpf_loop(count, callback, &mut walk as *mut Walk as *mut c_void, 0) };
        (walk.best_slot, walk.found)
    } else {
        let scratch = SCRATCH.get_ptr_mut(0)?;
        // SAFETY: this CPU's scratch value; nothing else uses it while a tc program runs (see above).
        let w = unsafe { &mut (*scratch).walk };
        // Field by field, and only what the walk reads before it has found a rule (`best_*` are read once `found`
        // is set): a whole `Walk` stored at once compiled to a call of the memset subprogram for its zeroes
        // (measured: 7% of a packet's cost when no rule matches).
        w.t = t.wide();
        w.ifindex = ifindex;
        w.generation = set.generation;
        w.hook = hook;
        w.bank = set.bank as u8;
        w.found = false;
        w.family = A::FAMILY;
        let callback = if A::FAMILY == family::V4 {
            probe_in_scratch::<IndexKey4> as *mut c_void
        } else {
            probe_in_scratch::<IndexKey> as *mut c_void
        };
        // SAFETY: a plain helper call; the callback finds the walk in the scratch value.
        unsafe { bpf_loop(count, callback, core::ptr::null_mut(), 0) };
        // SAFETY: as above.
        let w = unsafe { &(*scratch).walk };
        (w.best_slot, w.found)
    };
    if !found {
        return None;
    }
    RULES.get(slot).map(|r| (slot, r))
}

/// The `bpf_loop` callback of the tc programs: probes class `i` with the walk in the scratch value. Returns 1 to
/// end the loop.
extern "C" fn probe_in_scratch<K: Indexed>(i: u32, _ctx: *mut c_void) -> i64 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: this CPU's scratch value, which `find` filled; the walk and the key are separate fields.
    let (walk, key) = unsafe { (&mut (*scratch).walk, &mut *K::in_scratch(scratch)) };
    probe(i, walk, key)
}

/// The `bpf_loop` callback of the socket hooks: the walk is on `find`'s stack, the probe key on the callback's own
/// (in the caller's frame, every iteration's key would be state the verifier compares).
extern "C" fn probe_on_stack<K: Indexed>(i: u32, ctx: *mut c_void) -> i64 {
    let mut key = K::default();
    // SAFETY: `find` passes a pointer to its Walk, alive for the whole loop.
    probe(i, unsafe { &mut *(ctx as *mut Walk) }, &mut key)
}

/// Probes class `i` of the walk's hook and bank, with `key` as the probe key's memory. Returns 1 to end the loop.
#[inline(always)]
fn probe<K: Indexed>(i: u32, walk: &mut Walk, key: &mut K) -> i64 {
    let family = walk.family;
    let Some(class) = CLASSES.get(class_index(walk.bank as u32, walk.hook, i)) else { return 1 };
    let more = walk.probe(
        class,
        key,
        K::index,
        |slot| RULES.get(slot),
        |daddr| {
            if family == family::V4 {
                // SAFETY: a plain lookup; only presence matters.
                unsafe { LOCAL_ADDRS.get(&daddr[0]) }.is_some()
            } else {
                // SAFETY: as above.
                unsafe { LOCAL_ADDRS6.get(daddr) }.is_some()
            }
        },
    );
    if more { 0 } else { 1 }
}
