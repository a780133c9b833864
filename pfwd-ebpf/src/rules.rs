//! Rule lookup for the first packet of a flow: the tuple space search of `pfwd_common::lookup` (shared with
//! userspace, whose precedence tests run the same probe) over this program's maps, one class per `bpf_loop`
//! iteration, so the verifier checks the probe once whatever the number of classes.
use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_loop;
use pfwd_common::{RuleEntry, RuleSet, Tuple, Walk, class_index, hook};

use crate::maps::{CLASSES, INDEX, LOCAL_ADDRS, RULES};

/// Finds the rule of `hook` (PREROUTING: DNAT/REDIRECT for a flow arriving on `ifindex`; POSTROUTING:
/// SNAT/MASQUERADE for a flow leaving through it; OUTPUT: `--local` rules, ifindex 0) with the lowest rank among
/// those matching `t` in the rule set `set`. Returns the rule's slot and its entry.
#[inline(always)]
pub fn find(t: &Tuple, ifindex: u32, hook: u8, set: &RuleSet) -> Option<(u32, &'static RuleEntry)> {
    let count = match hook {
        hook::PREROUTING => set.counts.pre,
        hook::POSTROUTING => set.counts.post,
        _ => set.counts.local,
    };
    let mut walk = Walk::new(t, ifindex, hook, (set.generation, set.bank));
    // SAFETY: the callback only reads `walk` through the context pointer while bpf_loop runs.
    unsafe { bpf_loop(count, probe_class as *mut c_void, &mut walk as *mut Walk as *mut c_void, 0) };
    if !walk.found {
        return None;
    }
    RULES.get(walk.best_slot).map(|r| (walk.best_slot, r))
}

/// The `bpf_loop` callback: probes class `i` of the walk's hook and bank. Returns 1 to end the loop.
extern "C" fn probe_class(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `find` passes a pointer to its Walk, alive for the whole loop.
    let walk = unsafe { &mut *(ctx as *mut Walk) };
    let Some(class) = CLASSES.get(class_index(walk.bank as u32, walk.hook, i)) else { return 1 };
    let more = walk.probe(
        class,
        // SAFETY: plain read of a map value, which stays valid for the program's run.
        |k| unsafe { INDEX.get(k) },
        |slot| RULES.get(slot),
        // SAFETY: plain lookup; only presence matters.
        |daddr| unsafe { LOCAL_ADDRS.get(&daddr) }.is_some(),
    );
    if more { 0 } else { 1 }
}
