//! Rule lookup for the first packet of a flow: the bucket walk of `pfwd_common::lookup` (shared with userspace, whose
//! precedence tests run the same function) over this program's maps.
use pfwd_common::{RuleEntry, Tuple, find_rule, rule_index};

use crate::maps::{BUCKETS, LOCAL_ADDRS, RULES};

/// Finds the rule of `hook` (PREROUTING: DNAT/REDIRECT for a flow arriving on `ifindex`; POSTROUTING:
/// SNAT/MASQUERADE for a flow leaving through it; OUTPUT: `--local` rules, ifindex 0) with the lowest rank among
/// those matching `t`, in rule bank `bank`, looking only at the bucket levels in `mask`. Returns the rule's slot
/// (the same in either bank) and its entry.
#[inline(always)]
pub fn find(t: &Tuple, ifindex: u32, hook: u8, (bank, mask): (u32, u32)) -> Option<(u32, &'static RuleEntry)> {
    find_rule(
        t,
        ifindex,
        hook,
        (bank, mask),
        // SAFETY: plain read of a map value, which stays valid for the program's run.
        |k| unsafe { BUCKETS.get(k) },
        |slot| RULES.get(rule_index(bank, slot)),
        // SAFETY: plain lookup; only presence matters.
        |daddr| unsafe { LOCAL_ADDRS.get(&daddr) }.is_some(),
    )
}
