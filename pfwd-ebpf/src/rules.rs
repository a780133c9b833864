//! Rule lookup for the first packet of a flow: a fixed number of hash lookups (one per bucket level that holds rules),
//! so the cost does not grow with the number of rules. Among matching rules the lowest rank wins; ranks come from
//! userspace, which uses the same order for the iptables export.
use pfwd_common::{BUCKET_SLOTS, BucketKey, PROTO_ANY, PROTO_TCP, PROTO_UDP, RuleEntry, Tuple, level};

use crate::maps::{BUCKETS, RULES};

/// The best matching rule so far: its slot and rank (the rule itself is re-read at the end, to keep the stack small).
struct Best {
    slot: u32,
    rank: u32,
    found: bool,
}

#[inline(always)]
fn matches(r: &RuleEntry, t: &Tuple, ifindex: u32) -> bool {
    (r.ifindex == 0 || r.ifindex == ifindex)
        && (r.proto == PROTO_ANY || r.proto == t.proto)
        && t.saddr & r.src_mask == r.src_net
        && t.daddr & r.dst_mask == r.dst_net
}

#[inline(always)]
fn scan(key: BucketKey, t: &Tuple, ifindex: u32, best: &mut Best) {
    let Some(bucket) = (unsafe { BUCKETS.get(&key) }) else { return };
    let len = bucket.len as usize;
    for i in 0..BUCKET_SLOTS {
        if i >= len {
            break;
        }
        let slot = bucket.slots[i];
        let Some(r) = RULES.get(slot) else { continue };
        if (!best.found || r.rank < best.rank) && matches(r, t, ifindex) {
            best.slot = slot;
            best.rank = r.rank;
            best.found = true;
        }
    }
}

/// Finds the rule of `hook` (PREROUTING: DNAT/REDIRECT for a flow arriving on `ifindex`; POSTROUTING:
/// SNAT/MASQUERADE for a flow leaving through it) with the lowest rank among those matching `t`.
#[inline(always)]
pub fn find(t: &Tuple, ifindex: u32, hook: u8, mask: u32) -> Option<(u32, &'static RuleEntry)> {
    let mut best = Best { slot: 0, rank: 0, found: false };
    let key = |ifindex: u32, proto: u8, dport: u16| BucketKey { ifindex, dport, proto, hook };
    if t.proto == PROTO_TCP || t.proto == PROTO_UDP {
        if mask & level::IF_PROTO_PORT != 0 {
            scan(key(ifindex, t.proto, t.dport), t, ifindex, &mut best);
        }
        if mask & level::PROTO_PORT != 0 {
            scan(key(0, t.proto, t.dport), t, ifindex, &mut best);
        }
        if mask & level::IF_PROTO != 0 {
            scan(key(ifindex, t.proto, 0), t, ifindex, &mut best);
        }
        if mask & level::PROTO != 0 {
            scan(key(0, t.proto, 0), t, ifindex, &mut best);
        }
    }
    if mask & level::IF != 0 {
        scan(key(ifindex, PROTO_ANY, 0), t, ifindex, &mut best);
    }
    if mask & level::ANY != 0 {
        scan(key(0, PROTO_ANY, 0), t, ifindex, &mut best);
    }
    if !best.found {
        return None;
    }
    RULES.get(best.slot).map(|r| (best.slot, r))
}
