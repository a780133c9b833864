//! The rule lookup of a new flow's first packet (tuple space search): the packet's tuple is masked to each class
//! ([`Class`]: one shape of rule matches) of its hook and looked up in the rule index; among the matching rules the
//! one with the lowest rank wins (ranks come from userspace, which uses the same order for the iptables export).
//! One index lookup per class, so the cost grows with the number of match shapes, not of rules; classes come in
//! ascending `min_rank`, so the walk stops as soon as no later class can beat what it has found.
//!
//! [`Walk::probe`] is generic over the map lookups: the kernel programs run it once per class from a `bpf_loop`
//! callback over their maps, userspace ([`find_rule`]) over the output of `rules::compile`, so the precedence tests
//! test the walk the kernel runs.
use crate::{
    Addr, Addr6, Class, FlowTuple, INDEX_SLOTS, IndexEntry, IndexKey, IndexKey4, PROTO_TCP, PROTO_UDP, RuleEntry,
    Tuple6, class_flag, masked, rule_flag,
};

/// Whether `a` masked by `mask` is `net`, word by word (no masked copy: the kernel's stack is small).
#[inline(always)]
fn in_net(a: &Addr6, mask: &Addr6, net: &Addr6) -> bool {
    a[0] & mask[0] == net[0] && a[1] & mask[1] == net[1] && a[2] & mask[2] == net[2] && a[3] & mask[3] == net[3]
}

impl RuleEntry {
    /// Whether the rule's filters (family, interface, protocol, source and destination networks, each possibly
    /// negated; `-d local`) match the packet `t` (wide form, [`Addr::wide`]) of family `family` seen on `ifindex`
    /// (the incoming interface at PREROUTING, the outgoing one at POSTROUTING). `is_local` says whether an address
    /// (wide form, of `family`) is this host's; it is only asked for `-d local` rules.
    #[inline(always)]
    pub fn matches(&self, t: &Tuple6, family: u8, ifindex: u32, is_local: &mut impl FnMut(&Addr6) -> bool) -> bool {
        let not = |flag: u8| self.flags & flag != 0;
        (self.family == crate::family::ANY || self.family == family)
            && (self.ifindex == 0 || (self.ifindex == ifindex) != not(rule_flag::NOT_IFACE))
            && (self.proto == crate::PROTO_ANY || self.proto == t.proto)
            && in_net(&t.saddr, &self.src_mask, &self.src_net) != not(rule_flag::NOT_SRC)
            && in_net(&t.daddr, &self.dst_mask, &self.dst_net) != not(rule_flag::NOT_DST)
            && (!not(rule_flag::DST_LOCAL) || is_local(&t.daddr))
    }

    /// Whether this rule wins over a rule of rank `rank` and id `id` (lowest `(rank, id)` wins).
    #[inline(always)]
    pub fn beats(&self, rank: u64, id: u32) -> bool {
        self.rank < rank || (self.rank == rank && self.id < id)
    }
}

/// A key of the rule index, as a walk builds it for a packet and a class: the wide [`IndexKey`] (userspace, IPv6
/// packets), or its IPv4 form [`IndexKey4`], which the kernel's IPv4 packets probe (`IndexKey::narrow` of the
/// same key: 20 bytes hashed instead of 44).
pub trait ProbeKey {
    /// Makes this the key of the walk's packet in `class`: its tuple masked to the class's shape.
    fn fill(&mut self, walk: &Walk, class: &Class);
}

impl ProbeKey for IndexKey {
    #[inline(always)]
    fn fill(&mut self, walk: &Walk, class: &Class) {
        let t = &walk.t;
        *self = IndexKey {
            ifindex: if class.flags & class_flag::IFACE != 0 { walk.ifindex } else { 0 },
            saddr: masked(&t.saddr, &class.src_mask),
            daddr: masked(&t.daddr, &class.dst_mask),
            dport: t.dport & class.port_mask,
            proto: if class.flags & class_flag::PROTO != 0 { t.proto } else { 0 },
            hook: walk.hook,
            port_plen: class.port_plen,
            src_plen: class.src_plen,
            dst_plen: class.dst_plen,
            family: class.family,
        };
    }
}

impl ProbeKey for IndexKey4 {
    /// Only for IPv4 walks, whose wide addresses are 0 past the first word (so this is the wide key, narrowed).
    #[inline(always)]
    fn fill(&mut self, walk: &Walk, class: &Class) {
        let t = &walk.t;
        *self = IndexKey4 {
            ifindex: if class.flags & class_flag::IFACE != 0 { walk.ifindex } else { 0 },
            saddr: t.saddr[0] & class.src_mask[0],
            daddr: t.daddr[0] & class.dst_mask[0],
            dport: t.dport & class.port_mask,
            proto: if class.flags & class_flag::PROTO != 0 { t.proto } else { 0 },
            hook: walk.hook,
            port_plen: class.port_plen,
            src_plen: class.src_plen,
            dst_plen: class.dst_plen,
            family: class.family,
        };
    }
}

/// One rule lookup: what it looks for and the best rule found so far. In the kernel it is the `bpf_loop` context,
/// so it is plain data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Walk {
    /// The packet's tuple in the rule engine's wide form ([`Addr::wide`]).
    pub t: Tuple6,
    /// The interface the packet was seen on (0 at OUTPUT).
    pub ifindex: u32,
    /// The generation whose rules are seen ([`RuleEntry::visible`]).
    pub generation: u32,
    pub best_rank: u64,
    pub best_id: u32,
    pub best_slot: u32,
    /// [`crate::hook`].
    pub hook: u8,
    /// The class bank walked (the kernel callback reads the classes from it).
    pub bank: u8,
    pub found: bool,
    /// The packet's [`crate::family`].
    pub family: u8,
    pub _pad: u32,
}

impl Walk {
    pub fn new<A: Addr>(t: &FlowTuple<A>, ifindex: u32, hook: u8, (generation, bank): (u32, u32)) -> Self {
        Walk {
            t: t.wide(),
            ifindex,
            generation,
            best_rank: 0,
            best_id: 0,
            best_slot: 0,
            hook,
            bank: bank as u8,
            found: false,
            family: A::FAMILY,
            _pad: 0,
        }
    }

    /// Looks the packet up in `class`: masks its tuple to the class's shape into `key`, finds that key's index
    /// entry and takes its first visible matching rule if it beats the best so far. Returns false when the walk is
    /// over: this class (and so every later one, classes being in ascending `min_rank`) cannot beat the best. (The
    /// key is the caller's, so the kernel can keep it off its small stack.)
    #[inline(always)]
    pub fn probe<'a, K, I, R, L>(
        &mut self,
        class: &Class,
        key: &mut K,
        mut index: I,
        mut rule: R,
        mut is_local: L,
    ) -> bool
    where
        K: ProbeKey,
        I: FnMut(&K) -> Option<&'a IndexEntry>,
        R: FnMut(u32) -> Option<&'a RuleEntry>,
        L: FnMut(&Addr6) -> bool,
    {
        // A class whose best rank ties with the best found may still hold a lower id.
        if self.found && class.min_rank > self.best_rank {
            return false;
        }
        if class.family != 0 && class.family != self.family {
            // Rules of the other family.
            return true;
        }
        let has_ports = self.t.proto == PROTO_TCP || self.t.proto == PROTO_UDP;
        if class.flags & class_flag::PROTO != 0 && !has_ports {
            // Only TCP and UDP have rules of their own (`-p` is tcp or udp).
            return true;
        }
        key.fill(self, class);
        let t = &self.t;
        let Some(entry) = index(key) else { return true };
        let len = entry.len as usize;
        for i in 0..INDEX_SLOTS {
            if i >= len {
                break;
            }
            let slot = entry.slots[i];
            let Some(r) = rule(slot) else { continue };
            if !r.visible(self.generation) {
                continue;
            }
            if self.found && !r.beats(self.best_rank, self.best_id) {
                // The entry is in rank order: nothing after this can win either.
                break;
            }
            if r.matches(t, self.family, self.ifindex, &mut is_local) {
                self.best_slot = slot;
                self.best_rank = r.rank;
                self.best_id = r.id;
                self.found = true;
                break;
            }
        }
        true
    }
}

/// Finds the rule of `hook` ([`crate::hook`]) with the lowest rank among those matching `t` seen on `ifindex`
/// (PREROUTING: arriving on it; POSTROUTING: leaving through it; OUTPUT: 0), walking `classes` (the hook's classes,
/// in ascending `min_rank`) in generation `generation`. Returns its slot and the rule. The kernel runs the same
/// [`Walk::probe`] per class from `bpf_loop`.
#[inline(always)]
pub fn find_rule<'a, A, I, R, L>(
    t: &FlowTuple<A>,
    ifindex: u32,
    at: (u8, u32),
    classes: &[Class],
    index: I,
    rule: R,
    is_local: L,
) -> Option<(u32, &'a RuleEntry)>
where
    A: Addr,
    I: FnMut(&IndexKey) -> Option<&'a IndexEntry>,
    R: FnMut(u32) -> Option<&'a RuleEntry>,
    L: FnMut(&Addr6) -> bool,
{
    find_rule_keyed(t, ifindex, at, classes, index, rule, is_local)
}

/// [`find_rule`] over an index of keys of type `K`: [`IndexKey4`] is how the kernel looks up IPv4 packets.
#[inline(always)]
pub fn find_rule_keyed<'a, A, K, I, R, L>(
    t: &FlowTuple<A>,
    ifindex: u32,
    (hook, generation): (u8, u32),
    classes: &[Class],
    mut index: I,
    mut rule: R,
    mut is_local: L,
) -> Option<(u32, &'a RuleEntry)>
where
    A: Addr,
    K: ProbeKey + Default,
    I: FnMut(&K) -> Option<&'a IndexEntry>,
    R: FnMut(u32) -> Option<&'a RuleEntry>,
    L: FnMut(&Addr6) -> bool,
{
    let mut walk = Walk::new(t, ifindex, hook, (generation, 0));
    let mut key = K::default();
    for class in classes {
        if !walk.probe(class, &mut key, &mut index, &mut rule, &mut is_local) {
            break;
        }
    }
    if !walk.found {
        return None;
    }
    rule(walk.best_slot).map(|r| (walk.best_slot, r))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{GEN_FOREVER, PROTO_ICMP, hook};
    use std::{cell::RefCell, collections::HashMap, vec, vec::Vec};

    /// A hand-built rules array, index and class list, as `rules::compile` would fill them.
    #[derive(Default)]
    struct Maps {
        rules: HashMap<u32, RuleEntry>,
        index: HashMap<IndexKey, IndexEntry>,
        classes: Vec<Class>,
    }

    /// A class fixing interface and/or protocol, with the given port, source and destination prefix lengths.
    fn class(iface: bool, proto: bool, port_plen: u8, src_plen: u8, dst_plen: u8) -> Class {
        let mask32 = |p: u8| if p == 0 { 0 } else { u32::from_be(!0u32 << (32 - p)) };
        Class {
            min_rank: 0,
            src_mask: mask32(src_plen).wide(),
            dst_mask: mask32(dst_plen).wide(),
            port_mask: if port_plen == 0 { 0 } else { !0u16 << (16 - port_plen) },
            port_plen,
            src_plen,
            dst_plen,
            flags: if iface { class_flag::IFACE } else { 0 } | if proto { class_flag::PROTO } else { 0 },
            family: if src_plen + dst_plen > 0 { crate::family::V4 } else { 0 },
            _pad: 0,
        }
    }

    impl Maps {
        /// Puts rule `slot` (with `rank`, visible from generation 0) under `key` of `class` (keys must be masked
        /// already) and keeps the class list sorted by min rank.
        fn add(&mut self, slot: u32, rank: u64, c: Class, key: IndexKey, rule: RuleEntry) {
            let entry = RuleEntry { rank, gen_from: 0, gen_until: GEN_FOREVER, ..rule };
            self.rules.insert(slot, entry);
            let e = self.index.entry(key).or_default();
            let at = e.slots[..e.len as usize].iter().position(|s| self.rules[s].rank > rank).unwrap_or(e.len as usize);
            e.slots.copy_within(at..e.len as usize, at + 1);
            e.slots[at] = slot;
            e.len += 1;
            match self.classes.iter_mut().find(|k| Class { min_rank: 0, ..**k } == c) {
                Some(k) => k.min_rank = k.min_rank.min(rank),
                None => self.classes.push(Class { min_rank: rank, ..c }),
            }
            self.classes.sort_by_key(|k| k.min_rank);
        }

        fn find(&self, t: &crate::Tuple, ifindex: u32, hook: u8, generation: u32) -> Option<u32> {
            find_rule(
                t,
                ifindex,
                (hook, generation),
                &self.classes,
                |k| self.index.get(k),
                |s| self.rules.get(&s),
                |_| false,
            )
            .map(|(s, _)| s)
        }
    }

    fn key(hook: u8, ifindex: u32, proto: u8, c: &Class, (dport, saddr, daddr): (u16, u32, u32)) -> IndexKey {
        IndexKey {
            ifindex,
            saddr: saddr.wide(),
            daddr: daddr.wide(),
            dport,
            proto,
            hook,
            port_plen: c.port_plen,
            src_plen: c.src_plen,
            dst_plen: c.dst_plen,
            family: c.family,
        }
    }

    fn tcp(dport: u16) -> crate::Tuple {
        crate::Tuple {
            saddr: 0x0100_000a,
            daddr: 0x0200_000a,
            sport: 40000,
            dport,
            proto: PROTO_TCP,
            _pad: 0,
            _pad2: 0,
        }
    }

    #[test]
    fn the_key_is_the_tuple_masked_to_the_class() {
        let keys = RefCell::new(vec![]);
        let classes = [
            class(true, true, 16, 0, 0),
            class(false, true, 12, 24, 0),
            class(false, false, 0, 0, 32),
            class(true, true, 0, 8, 8),
        ];
        let t = crate::Tuple { saddr: u32::from_be(0x0a01_0203), daddr: u32::from_be(0xc000_0201), ..tcp(0x1234) };
        find_rule(
            &t,
            3,
            (hook::PREROUTING, 0),
            &classes,
            |k| {
                keys.borrow_mut().push(*k);
                None
            },
            |_| None,
            |_| false,
        );
        let pre = hook::PREROUTING;
        let be = u32::from_be;
        assert_eq!(
            keys.into_inner(),
            vec![
                key(pre, 3, PROTO_TCP, &classes[0], (0x1234, 0, 0)),
                key(pre, 0, PROTO_TCP, &classes[1], (0x1230, be(0x0a01_0200), 0)),
                key(pre, 0, 0, &classes[2], (0, 0, be(0xc000_0201))),
                key(pre, 3, PROTO_TCP, &classes[3], (0, be(0x0a00_0000), be(0xc000_0000))),
            ]
        );
        // Without ports only the protocol-less classes are looked up.
        let icmp = crate::Tuple { proto: PROTO_ICMP, ..t };
        let mut n = 0;
        find_rule(
            &icmp,
            3,
            (pre, 0),
            &classes,
            |_| {
                n += 1;
                None
            },
            |_| None,
            |_| false,
        );
        assert_eq!(n, 1);
    }

    #[test]
    fn lowest_rank_wins_across_classes_and_the_walk_stops_early() {
        let pre = hook::PREROUTING;
        let mut m = Maps::default();
        let any = RuleEntry::default();
        let port = class(true, true, 16, 0, 0);
        let catch_all = class(false, false, 0, 0, 0);
        let dst = class(false, true, 0, 0, 32);
        m.add(1, 5, port, key(pre, 3, PROTO_TCP, &port, (80, 0, 0)), RuleEntry { ifindex: 3, proto: PROTO_TCP, ..any });
        m.add(2, 2, catch_all, key(pre, 0, 0, &catch_all, (0, 0, 0)), any);
        let to3 = RuleEntry { proto: PROTO_TCP, dst_net: [0x0300_000a, 0, 0, 0], dst_mask: [!0, 0, 0, 0], ..any };
        m.add(3, 1, dst, key(pre, 0, PROTO_TCP, &dst, (0, 0, 0x0300_000a)), to3);
        let t = tcp(80);
        assert_eq!(m.find(&t, 3, pre, 0), Some(2), "rank 2 beats rank 5; rank 1 is under another key");
        let to3t = crate::Tuple { daddr: 0x0300_000a, ..t };
        assert_eq!(m.find(&to3t, 3, pre, 0), Some(3));
        assert_eq!(m.find(&crate::Tuple { dport: 81, ..t }, 3, pre, 0), Some(2));
        // Other hooks have their own keys.
        assert_eq!(m.find(&t, 3, hook::POSTROUTING, 0), None);
        // Non-TCP/UDP packets only see the protocol-less classes.
        let icmp = crate::Tuple { proto: PROTO_ICMP, ..to3t };
        assert_eq!(m.find(&icmp, 3, pre, 0), Some(2));
        // Once rank 1 is found the classes after it (min rank 2 and 5) are not looked up.
        let mut looked = 0;
        let found = find_rule(
            &to3t,
            3,
            (pre, 0),
            &m.classes,
            |k| {
                looked += 1;
                m.index.get(k)
            },
            |s| m.rules.get(&s),
            |_| false,
        );
        assert_eq!((found.map(|f| f.0), looked), (Some(3), 1));
    }

    #[test]
    fn entries_are_walked_in_rank_order_by_generation() {
        let post = hook::POSTROUTING;
        let mut m = Maps::default();
        let c = class(true, false, 0, 0, 0);
        let k = key(post, 3, 0, &c, (0, 0, 0));
        let src = |net: u32, mask: u32| RuleEntry {
            src_net: net.wide(),
            src_mask: mask.wide(),
            family: crate::family::V4,
            ifindex: 3,
            ..Default::default()
        };
        m.add(7, 9, c, k, src(0x0100_000a, !0));
        m.add(8, 4, c, k, src(0x0000_000b, 0xff));
        assert_eq!(m.index[&k].slots[..2], [8, 7], "rank order");
        let t = tcp(0);
        assert_eq!(m.find(&t, 3, post, 0), Some(7), "the rank 4 rule's source filter does not match");
        let from_b = crate::Tuple { saddr: 0x0500_000b, ..t };
        assert_eq!(m.find(&from_b, 3, post, 0), Some(8));
        // A rule outside its generations is skipped: one being added (seen from 5) and one deleted (seen until 5).
        m.rules.get_mut(&8).unwrap().gen_from = 5;
        assert_eq!(m.find(&from_b, 3, post, 4), None);
        assert_eq!(m.find(&from_b, 3, post, 5), Some(8));
        m.rules.get_mut(&8).unwrap().gen_until = 6;
        assert_eq!(m.find(&from_b, 3, post, 6), None);
        // A slot past the entry's length is ignored even if it holds a rule; a slot with no rule is skipped.
        m.index.get_mut(&k).unwrap().len = 1;
        assert_eq!(m.find(&t, 3, post, 0), None);
        m.index.get_mut(&k).unwrap().slots[0] = 99;
        m.index.get_mut(&k).unwrap().len = 2;
        assert_eq!(m.find(&t, 3, post, 0), Some(7));
    }
}
