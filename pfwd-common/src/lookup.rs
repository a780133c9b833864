//! The rule lookup of a new flow's first packet: which buckets it is looked up in, in which order, and which rule wins
//! (the matching one with the lowest rank; ranks come from userspace, which uses the same order for the iptables
//! export). A fixed number of bucket lookups, one per level that holds rules, so the cost does not grow with the
//! number of rules.
//!
//! [`find_rule`] is generic over the map lookups: the kernel programs run it over their maps, userspace tests over
//! the output of `rules::compile`, so the precedence tests test the walk the kernel runs. It stays verifiable: no
//! loop over the levels (each is an `if`), one bounded loop of [`BUCKET_SLOTS`] per bucket, everything inlined.
use crate::{BUCKET_SLOTS, Bucket, BucketKey, PROTO_ANY, PROTO_TCP, PROTO_UDP, RuleEntry, Tuple, level, rule_flag};

impl RuleEntry {
    /// Whether the rule's filters (interface, protocol, source and destination networks, each possibly negated;
    /// `-d local`) match the packet `t` seen on `ifindex` (the incoming interface at PREROUTING, the outgoing one at
    /// POSTROUTING). `is_local` says whether an address is this host's; it is only asked for `-d local` rules.
    #[inline(always)]
    pub fn matches(&self, t: &Tuple, ifindex: u32, is_local: &mut impl FnMut(u32) -> bool) -> bool {
        let not = |flag: u8| self.flags & flag != 0;
        (self.ifindex == 0 || (self.ifindex == ifindex) != not(rule_flag::NOT_IFACE))
            && (self.proto == PROTO_ANY || self.proto == t.proto)
            && (t.saddr & self.src_mask == self.src_net) != not(rule_flag::NOT_SRC)
            && (t.daddr & self.dst_mask == self.dst_net) != not(rule_flag::NOT_DST)
            && (!not(rule_flag::DST_LOCAL) || is_local(t.daddr))
    }
}

/// The best matching rule so far: its slot and rank (the rule itself is re-read at the end, to keep the stack small).
struct Best {
    slot: u32,
    rank: u32,
    found: bool,
}

#[inline(always)]
fn scan<'a, R, L>(bucket: Option<&'a Bucket>, t: &Tuple, ifindex: u32, rule: &mut R, is_local: &mut L, best: &mut Best)
where
    R: FnMut(u32) -> Option<&'a RuleEntry>,
    L: FnMut(u32) -> bool,
{
    let Some(bucket) = bucket else { return };
    let len = bucket.len as usize;
    for i in 0..BUCKET_SLOTS {
        if i >= len {
            break;
        }
        let slot = bucket.slots[i];
        let Some(r) = rule(slot) else { continue };
        if (!best.found || r.rank < best.rank) && r.matches(t, ifindex, is_local) {
            best.slot = slot;
            best.rank = r.rank;
            best.found = true;
        }
    }
}

/// Finds the rule of `hook` ([`crate::hook`]) with the lowest rank among those matching `t`, for a packet seen on
/// `ifindex` (PREROUTING: arriving on it; POSTROUTING: leaving through it; OUTPUT: 0). Returns its slot and the rule.
///
/// `mask` holds the [`level`]s that have buckets of this hook (`Config::level_mask`, `snat_level_mask` or
/// `local_level_mask`); the other levels are not looked up. The buckets are looked up in this order, the first four
/// only for TCP and UDP (other protocols have no rules of their own, `-p` being tcp or udp):
/// (ifindex, proto, dport), (any, proto, dport), (ifindex, proto, any), (any, proto, any), (ifindex, any, any),
/// (any, any, any). The order decides nothing: the lowest rank does.
///
/// `bank` is the rule bank whose buckets are looked up ([`crate::Config::active`]); `bucket` looks a key up in the
/// buckets map, `rule` a slot in that bank of the rules array, `is_local` whether an address is this host's (asked
/// only for `-d local` rules).
#[inline(always)]
pub fn find_rule<'a, B, R, L>(
    t: &Tuple,
    ifindex: u32,
    hook: u8,
    (bank, mask): (u32, u32),
    mut bucket: B,
    mut rule: R,
    mut is_local: L,
) -> Option<(u32, &'a RuleEntry)>
where
    B: FnMut(&BucketKey) -> Option<&'a Bucket>,
    R: FnMut(u32) -> Option<&'a RuleEntry>,
    L: FnMut(u32) -> bool,
{
    let mut best = Best { slot: 0, rank: 0, found: false };
    let key =
        |ifindex: u32, proto: u8, dport: u16| BucketKey { ifindex, dport, proto, hook, bank: bank as u8, _pad: [0; 3] };
    if t.proto == PROTO_TCP || t.proto == PROTO_UDP {
        if mask & level::IF_PROTO_PORT != 0 {
            scan(bucket(&key(ifindex, t.proto, t.dport)), t, ifindex, &mut rule, &mut is_local, &mut best);
        }
        if mask & level::PROTO_PORT != 0 {
            scan(bucket(&key(0, t.proto, t.dport)), t, ifindex, &mut rule, &mut is_local, &mut best);
        }
        if mask & level::IF_PROTO != 0 {
            scan(bucket(&key(ifindex, t.proto, 0)), t, ifindex, &mut rule, &mut is_local, &mut best);
        }
        if mask & level::PROTO != 0 {
            scan(bucket(&key(0, t.proto, 0)), t, ifindex, &mut rule, &mut is_local, &mut best);
        }
    }
    if mask & level::IF != 0 {
        scan(bucket(&key(ifindex, PROTO_ANY, 0)), t, ifindex, &mut rule, &mut is_local, &mut best);
    }
    if mask & level::ANY != 0 {
        scan(bucket(&key(0, PROTO_ANY, 0)), t, ifindex, &mut rule, &mut is_local, &mut best);
    }
    if !best.found {
        return None;
    }
    rule(best.slot).map(|r| (best.slot, r))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{PROTO_ICMP, hook};
    use std::{collections::HashMap, vec, vec::Vec};

    const ALL_LEVELS: u32 =
        level::IF_PROTO_PORT | level::PROTO_PORT | level::IF_PROTO | level::PROTO | level::IF | level::ANY;

    /// A hand-built rules array and buckets map, as `rules::compile` would fill them.
    #[derive(Default)]
    struct Maps {
        rules: HashMap<u32, RuleEntry>,
        buckets: HashMap<BucketKey, Bucket>,
    }

    impl Maps {
        /// Puts rule `slot` (with `rank`) into the bucket `(hook, ifindex, proto, dport)`.
        fn add(&mut self, slot: u32, rank: u32, key: (u8, u32, u8, u16), rule: RuleEntry) {
            let (hook, ifindex, proto, dport) = key;
            self.rules.insert(slot, RuleEntry { rank, ..rule });
            let b = self.buckets.entry(BucketKey { ifindex, dport, proto, hook, ..Default::default() }).or_default();
            b.slots[b.len as usize] = slot;
            b.len += 1;
        }

        fn find(&self, t: &Tuple, ifindex: u32, hook: u8, mask: u32) -> Option<u32> {
            find_rule(t, ifindex, hook, (0, mask), |k| self.buckets.get(k), |s| self.rules.get(&s), |_| false)
                .map(|(s, _)| s)
        }
    }

    fn tcp(dport: u16) -> Tuple {
        Tuple { saddr: 0x0100_000a, daddr: 0x0200_000a, sport: 40000, dport, proto: PROTO_TCP, _pad: [0; 3] }
    }

    /// Records the keys the walk looks up.
    fn walk(t: &Tuple, ifindex: u32, hook: u8, mask: u32) -> Vec<(u32, u8, u16)> {
        let mut keys = vec![];
        let none = |_: u32| -> Option<&RuleEntry> { None };
        find_rule(
            t,
            ifindex,
            hook,
            (1, mask),
            |k| {
                assert_eq!((k.hook, k.bank), (hook, 1), "the hook's buckets of the bank asked for");
                keys.push((k.ifindex, k.proto, k.dport));
                None
            },
            none,
            |_| false,
        );
        keys
    }

    #[test]
    fn bucket_keys_in_order_per_level() {
        let t = tcp(80);
        let all = walk(&t, 3, hook::PREROUTING, ALL_LEVELS);
        assert_eq!(
            all,
            vec![(3, PROTO_TCP, 80), (0, PROTO_TCP, 80), (3, PROTO_TCP, 0), (0, PROTO_TCP, 0), (3, 0, 0), (0, 0, 0)]
        );
        // Only the levels in the mask are looked up.
        assert_eq!(walk(&t, 3, hook::POSTROUTING, level::IF_PROTO | level::ANY), vec![(3, PROTO_TCP, 0), (0, 0, 0)]);
        assert_eq!(walk(&t, 3, hook::PREROUTING, 0), vec![]);
        // Without ports only the protocol-less levels exist.
        let icmp = Tuple { proto: PROTO_ICMP, sport: 7, dport: 7, ..t };
        assert_eq!(walk(&icmp, 3, hook::PREROUTING, ALL_LEVELS), vec![(3, 0, 0), (0, 0, 0)]);
        let udp = Tuple { proto: PROTO_UDP, ..t };
        assert_eq!(walk(&udp, 0, hook::OUTPUT, level::PROTO_PORT)[..], [(0, PROTO_UDP, 80)]);
    }

    #[test]
    fn lowest_rank_wins_across_levels() {
        let pre = hook::PREROUTING;
        let mut m = Maps::default();
        let any = RuleEntry::default();
        m.add(1, 5, (pre, 3, PROTO_TCP, 80), RuleEntry { ifindex: 3, proto: PROTO_TCP, ..any });
        m.add(2, 2, (pre, 0, 0, 0), any);
        m.add(3, 1, (pre, 0, PROTO_TCP, 0), RuleEntry { proto: PROTO_TCP, dst_net: 0x0300_000a, dst_mask: !0, ..any });
        let t = tcp(80);
        assert_eq!(m.find(&t, 3, pre, ALL_LEVELS), Some(2), "rank 2 beats rank 5; rank 1 does not match");
        let to3 = Tuple { daddr: 0x0300_000a, ..t };
        assert_eq!(m.find(&to3, 3, pre, ALL_LEVELS), Some(3));
        // A level missing from the mask is not looked at, even though its bucket exists.
        assert_eq!(m.find(&to3, 3, pre, ALL_LEVELS & !level::PROTO), Some(2));
        assert_eq!(m.find(&t, 3, pre, level::IF_PROTO_PORT), Some(1));
        // Another interface: the interface's buckets are other keys.
        assert_eq!(m.find(&t, 4, pre, level::IF_PROTO_PORT | level::PROTO_PORT), None);
        // Other hooks have their own buckets.
        assert_eq!(m.find(&t, 3, hook::POSTROUTING, ALL_LEVELS), None);
        // Non-TCP/UDP packets only see the protocol-less levels.
        let icmp = Tuple { proto: PROTO_ICMP, ..to3 };
        assert_eq!(m.find(&icmp, 3, pre, ALL_LEVELS), Some(2));
    }

    #[test]
    fn bucket_len_bounds_the_slots_and_filters_apply() {
        let post = hook::POSTROUTING;
        let mut m = Maps::default();
        let src = |net: u32, mask: u32| RuleEntry { src_net: net, src_mask: mask, ifindex: 3, ..Default::default() };
        m.add(7, 9, (post, 3, 0, 0), src(0x0100_000a, !0));
        m.add(8, 4, (post, 3, 0, 0), src(0x0000_000b, 0xff));
        let t = tcp(0);
        assert_eq!(m.find(&t, 3, post, level::IF), Some(7), "the rank 4 rule's source filter does not match");
        assert_eq!(m.find(&Tuple { saddr: 0x0500_000b, ..t }, 3, post, level::IF), Some(8));
        // A slot past the bucket's length is ignored even if it holds a rule.
        m.buckets.get_mut(&BucketKey { ifindex: 3, hook: post, ..Default::default() }).unwrap().len = 1;
        assert_eq!(m.find(&Tuple { saddr: 0x0500_000b, ..t }, 3, post, level::IF), None);
        // A slot the rules array does not have is skipped.
        m.add(99, 0, (post, 0, 0, 0), RuleEntry::default());
        m.rules.remove(&99);
        assert_eq!(m.find(&t, 3, post, level::IF | level::ANY), Some(7));
    }
}
