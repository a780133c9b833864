//! Compilation of rules into the kernel's map layout: the rules array, the rule index (tuple space search: one
//! entry per (hook, masked matches) key) and each hook's classes (match shapes). See `pfwd_common::lookup`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use pfwd_common::maps::{
    Addr6, BackendEntry, COMPANION_SLOTS, Class, GEN_FOREVER, INDEX_ENTRIES, INDEX_SLOTS, IndexKey, MAX_BACKEND_RULES,
    MAX_CLASSES, MAX_RULES, PROTO_ANY, RuleEntry, class_flag, family, hook, kind, rule_flag,
};

use super::error::RuleError;
use super::model::{Family, PortRange, Proto, Rule, Target, prefix_len};
use super::precedence::rank;
use crate::fasthash::FastMap;

/// The contents of the rules array, the rule index and the class lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    /// `(slot, entry)`, one per rule, in input order (see [`compile`] for the slots and the rules `--hairpin`
    /// adds). Every entry is visible in every generation; the loader sets the generations.
    pub entries: Vec<(u32, RuleEntry)>,
    /// Every index key's rules (slots), all of them, in rank order (best first). The kernel's entry of a key lists
    /// them up to the first unconditional one ([`Compiled::index`]).
    pub members: FastMap<IndexKey, Vec<u32>>,
    /// The classes of each hook ([`hook`] PREROUTING, POSTROUTING, OUTPUT), in ascending `min_rank`.
    pub classes: [Vec<Class>; 3],
    /// `(slot, Maglev table)` of each rule with several backends ([`super::maglev::entries`]), in input order.
    pub tables: Vec<(u32, Vec<BackendEntry>)>,
    /// The position in `entries` of each slot.
    pub positions: FastMap<u32, usize>,
}

/// Matches a rule may carry that its index keys do not hold: a rule without them matches every packet of its keys.
pub(super) const CONDITIONAL: u8 =
    rule_flag::NOT_SRC | rule_flag::NOT_DST | rule_flag::NOT_IFACE | rule_flag::DST_LOCAL;

/// What the kernel's entry of a key with the rules `slots` (rank order) lists: the rules up to the first that
/// matches every packet of the key (each key holds its rule's matches exactly, and a port block lies inside its
/// range, so for a rule without negations or `-d local` nothing after it can win there).
pub fn listed<'s, 'e>(slots: &'s [u32], entry: impl Fn(u32) -> Option<&'e RuleEntry>) -> &'s [u32] {
    match slots.iter().position(|s| entry(*s).is_some_and(|e| e.flags & CONDITIONAL == 0)) {
        Some(first) => &slots[..=first],
        None => slots,
    }
}

impl Compiled {
    /// These rules without those `keep` refuses (by slot and entry); the classes stay (a class without keys only
    /// costs a lookup).
    pub fn restricted(&self, keep: impl Fn(u32, &RuleEntry) -> bool) -> Compiled {
        let entries: Vec<(u32, RuleEntry)> = self.entries.iter().filter(|(s, e)| keep(*s, e)).copied().collect();
        let positions: FastMap<u32, usize> = entries.iter().enumerate().map(|(i, (s, _))| (*s, i)).collect();
        let members = self
            .members
            .iter()
            .map(|(k, slots)| (*k, slots.iter().copied().filter(|s| positions.contains_key(s)).collect::<Vec<u32>>()))
            .filter(|(_, slots)| !slots.is_empty())
            .collect();
        let tables = self.tables.iter().filter(|(s, _)| positions.contains_key(s)).cloned().collect();
        Compiled { entries, members, classes: self.classes.clone(), tables, positions }
    }

    /// The entry of the rule in `slot`.
    pub fn entry(&self, slot: u32) -> Option<&RuleEntry> {
        self.positions.get(&slot).map(|&i| &self.entries[i].1)
    }

    /// The rule index as the kernel holds it: each key's slots as [`listed`].
    pub fn index(&self) -> HashMap<IndexKey, Vec<u32>> {
        self.members.iter().map(|(k, slots)| (*k, self.listed(slots).to_vec())).collect()
    }

    /// What the kernel's entry of a key with these rules lists ([`listed`]).
    pub fn listed<'s>(&self, slots: &'s [u32]) -> &'s [u32] {
        listed(slots, |s| self.entry(s))
    }
}

/// The prefix blocks `(first port, prefix length)` that make up the port range `lo..=hi`, largest first from `lo`:
/// at most 30 for any range (1-65535 takes 16). A rule is indexed once per block, so a range costs a few index
/// entries instead of one per port.
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    let mut blocks = Vec::new();
    while lo <= hi {
        // The largest aligned block starting at `lo` that ends within the range.
        let mut size = if lo == 0 { 1 << 16 } else { lo & lo.wrapping_neg() };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        blocks.push((lo as u16, 16 - size.trailing_zeros() as u8));
        lo += size;
    }
    blocks
}

/// A prefix length's mask in the maps' wide form (network order, see `pfwd_common::Addr::wide`): the first `plen`
/// bits of the address's bytes, so the same for an IPv4 prefix (in the first word) and an IPv6 one.
fn addr_mask(plen: u8) -> Addr6 {
    let bits: u128 = if plen == 0 { 0 } else { !0u128 << (128 - u32::from(plen.min(128))) };
    wide_bytes(bits.to_be_bytes())
}

/// 16 bytes in network order as the maps' four words.
fn wide_bytes(b: [u8; 16]) -> Addr6 {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// An address of either family in the maps' wide form: IPv4 in the first word, IPv6 in all four.
pub(crate) fn wide(a: IpAddr) -> Addr6 {
    match a {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => wide_bytes(a.octets()),
    }
}

/// A network of either family as the maps' `(net, mask)` in wide form; `(0, 0)` for none.
fn wide_net(n: Option<IpNet>) -> (Addr6, Addr6) {
    let Some(n) = n else { return ([0; 4], [0; 4]) };
    let mask = addr_mask(n.prefix_len());
    (pfwd_common::masked(&wide(n.network()), &mask), mask)
}

/// The maps' [`family`] of a rule.
fn family_code(r: &Rule) -> u8 {
    match r.family() {
        Some(Family::Ipv4) => family::V4,
        Some(Family::Ipv6) => family::V6,
        None => family::ANY,
    }
}

/// The rules both data paths run: `rules` in their order, then the companion ([`Rule::hairpin_companion`]) of each
/// `--hairpin` rule, each distinct companion once (the first rule's: it is the older one, or the earlier in the
/// list). The companions are ordinary rules with their owner's id and compete under the precedence contract like
/// any rule written by hand. The second value gives, per returned rule, the index of the rule that added it (None
/// for `rules` themselves). Without `--hairpin` rules, `rules` is returned as is.
pub fn with_companions(rules: &[Rule]) -> (Cow<'_, [Rule]>, Vec<Option<usize>>) {
    let extra = companions(rules);
    let mut owners = vec![None; rules.len()];
    if extra.is_empty() {
        return (Cow::Borrowed(rules), owners);
    }
    owners.extend(extra.iter().map(|(i, _)| Some(*i)));
    let all = rules.iter().cloned().chain(extra.into_iter().map(|(_, c)| c)).collect();
    (Cow::Owned(all), owners)
}

/// The companions of the `--hairpin` rules among `rules` (see [`with_companions`]): `(position of the owner,
/// companion)`, each distinct companion once.
pub fn companions<'r>(rules: impl IntoIterator<Item = &'r Rule>) -> Vec<(usize, Rule)> {
    let mut seen = HashSet::new();
    rules
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, r.hairpin_companion()?)))
        .filter(|(_, c)| seen.insert(c.dedup_key()))
        .collect()
}

/// Builds the kernel's view of `rules`, each in the slot of its position (see [`compile_at`]).
pub fn compile(rules: &[Rule], ifindex: &dyn Fn(&str) -> Option<u32>) -> Result<Compiled, RuleError> {
    compile_at(rules, &|pos| pos as u32, ifindex)
}

/// Builds the kernel's view of `rules`: rule `pos` in slot `slot(pos)`, and the rule a `--hairpin` rule adds (see
/// [`with_companions`]) in [`COMPANION_SLOTS`] + its owner's slot; rank = [`rank`]. `ifindex` maps an interface name to
/// its index, or `None` when pfwd is not attached to it (an error: the rule could never match). Each rule is indexed
/// in its hook under its own matches: the interface (the incoming one, `-i`, for DNAT/REDIRECT; the outgoing one,
/// `-o`, for SNAT/MASQUERADE), protocol, each prefix block of its port range ([`port_blocks`]), source and
/// destination networks; a negated match and `-d local` are indexed as "any" and checked on the rule itself. A key
/// lists its rules in rank order up to the first that matches all of its packets (one without negations or `-d
/// local`): so only such conditional rules can crowd a key, at most [`INDEX_SLOTS`] of them.
pub fn compile_at(
    rules: &[Rule],
    slot: &dyn Fn(usize) -> u32,
    ifindex: &dyn Fn(&str) -> Option<u32>,
) -> Result<Compiled, RuleError> {
    if rules.len() > MAX_RULES as usize {
        return Err(RuleError::TooManyRules(rules.len()));
    }
    let (all, slots) = expanded(rules, slot);
    let rules: Vec<(u32, &Rule)> = slots.into_iter().zip(all.iter()).collect();
    build(&rules, ifindex)
}

/// `rules` with the rules their `--hairpin` adds ([`with_companions`]), and the slot of each: rule `pos` in
/// `slot(pos)`, a companion in [`COMPANION_SLOTS`] + its owner's slot.
pub fn expanded<'r>(rules: &'r [Rule], slot: &dyn Fn(usize) -> u32) -> (Cow<'r, [Rule]>, Vec<u32>) {
    let (all, owners) = with_companions(rules);
    let slots = owners
        .iter()
        .enumerate()
        .map(|(pos, owner)| match owner {
            Some(owner) => COMPANION_SLOTS + slot(*owner),
            None => slot(pos),
        })
        .collect();
    (all, slots)
}

/// Builds the kernel's view of `rules` (already [`expanded`]: companions included), each `(slot, rule)`; see
/// [`compile_at`].
pub fn build(rules: &[(u32, &Rule)], ifindex: &dyn Fn(&str) -> Option<u32>) -> Result<Compiled, RuleError> {
    for (_, r) in rules {
        // The index relies on "a port implies a protocol", which validate() guarantees.
        r.validate().map_err(|e| RuleError::InRule { id: r.id, error: Box::new(e) })?;
    }
    // The closure may be a syscall (if_nametoindex), so ask once per name.
    let mut ifindexes: FastMap<&str, u32> = FastMap::default();
    let mut rule_ifindex = vec![0u32; rules.len()];
    for (pos, (_, r)) in rules.iter().enumerate() {
        if let Some(name) = r.hook_iface() {
            if r.not.iface {
                // `! -i IFACE`: every attached interface but IFACE. When IFACE is not attached, that is every one.
                rule_ifindex[pos] = ifindex(name).unwrap_or(0);
                continue;
            }
            let idx = match ifindexes.get(name) {
                Some(&i) => i,
                None => {
                    // ifindex 0 would turn the rule into "any interface", so treat it as not attached.
                    let i = ifindex(name).filter(|&i| i != 0).ok_or_else(|| RuleError::IfaceNotAttached {
                        id: r.id,
                        iface: name.to_string(),
                        option: if r.is_postrouting() { "-o" } else { "-i" },
                    })?;
                    ifindexes.insert(name, i);
                    i
                }
            };
            rule_ifindex[pos] = idx;
        }
    }

    let mut c = Compiled { entries: Vec::with_capacity(rules.len()), ..Default::default() };
    c.members.reserve(rules.len());
    c.positions.reserve(rules.len());
    // Per hook, each class shape's lowest rank.
    let mut shapes: [FastMap<Class, u64>; 3] = Default::default();
    for (pos, &(slot, r)) in rules.iter().enumerate() {
        if !r.backends.is_empty() {
            if c.tables.len() >= MAX_BACKEND_RULES as usize {
                return Err(RuleError::TooManyBackendRules);
            }
            c.tables.push((slot, super::maglev::entries(&r.backends)));
        }
        let entry = rule_entry(r, rank(r), rule_ifindex[pos]);
        let hook = if r.is_postrouting() {
            hook::POSTROUTING
        } else if r.local {
            hook::OUTPUT
        } else {
            hook::PREROUTING
        };
        for (key, class) in index_keys(r, &entry, hook) {
            let min = shapes[hook as usize].entry(class).or_insert(entry.rank);
            *min = (*min).min(entry.rank);
            c.members.entry(key).or_default().push(slot);
        }
        c.positions.insert(slot, c.entries.len());
        c.entries.push((slot, entry));
    }
    let entry = |s: &u32| &c.entries[c.positions[s]].1;
    for slots in c.members.values_mut() {
        slots.sort_by_key(|s| (entry(s).rank, entry(s).id, *s));
        let listed = listed(slots, |s| Some(entry(&s)));
        if listed.len() > INDEX_SLOTS {
            let ids: Vec<String> = listed.iter().map(|s| entry(s).id.to_string()).collect();
            return Err(RuleError::IndexFull { ids: ids.join(", ") });
        }
    }
    if c.members.len() > INDEX_ENTRIES as usize {
        return Err(RuleError::TooManyIndexKeys { count: c.members.len() });
    }
    for (h, shapes) in shapes.into_iter().enumerate() {
        if shapes.len() > MAX_CLASSES as usize {
            return Err(RuleError::TooManyClasses { count: shapes.len() });
        }
        let mut classes: Vec<Class> = shapes.into_iter().map(|(k, min_rank)| Class { min_rank, ..k }).collect();
        // Ties broken by shape, so the order is the same every time.
        classes.sort_by_key(|k| (k.min_rank, k.flags, k.family, k.port_plen, k.src_plen, k.dst_plen));
        c.classes[h] = classes;
    }
    Ok(c)
}

/// The rules array entry of `r` (visible in every generation).
fn rule_entry(r: &Rule, rank: u64, ifindex: u32) -> RuleEntry {
    let (src_net, src_mask) = wide_net(r.src);
    let (dst_net, dst_mask) = wide_net(r.dst);
    // SNAT/MASQUERADE ports 0..=0 tell the kernel "keep the source port when free, else 1024-65535".
    let range = |p: Option<PortRange>| p.map_or((0, 0), |p| (p.lo, p.hi));
    let (kind, to_addr, (to_port, to_port_hi)) = match r.target {
        Target::Dnat { addr, port } => (kind::DNAT, wide(addr), (port.unwrap_or(0), 0)),
        Target::Redirect { port } => (kind::REDIRECT, [0; 4], (port, 0)),
        Target::Snat { addr, ports } => (kind::SNAT, wide(addr), range(ports)),
        Target::Masquerade { ports } => (kind::MASQUERADE, [0; 4], range(ports)),
    };
    let flag = |on: bool, f: u8| if on { f } else { 0 };
    let flags = flag(r.not.src, rule_flag::NOT_SRC)
        | flag(r.not.dst, rule_flag::NOT_DST)
        | flag(r.not.iface, rule_flag::NOT_IFACE)
        | flag(r.dst_local, rule_flag::DST_LOCAL)
        | flag(!r.backends.is_empty(), rule_flag::BACKENDS);
    RuleEntry {
        rank,
        gen_from: 0,
        gen_until: GEN_FOREVER,
        id: r.id,
        src_net,
        src_mask,
        dst_net,
        dst_mask,
        to_addr,
        to_port,
        to_port_hi,
        kind,
        proto: r.proto.map_or(PROTO_ANY, Proto::code),
        flags,
        family: family_code(r),
        ifindex,
    }
}

/// The index keys of rule `r` (whose entry is `e`) in `hook`, with their classes (`min_rank` 0): one per prefix
/// block of its port range, or one without a port. Negated matches are indexed as "any".
fn index_keys(r: &Rule, e: &RuleEntry, hook: u8) -> Vec<(IndexKey, Class)> {
    let ifindex = if r.not.iface { 0 } else { e.ifindex };
    let (src_plen, dst_plen) =
        (if r.not.src { 0 } else { prefix_len(r.src) }, if r.not.dst { 0 } else { prefix_len(r.dst) });
    let (src_mask, dst_mask) = (addr_mask(src_plen), addr_mask(dst_plen));
    let blocks = match r.dport {
        Some(p) => port_blocks(p.lo, p.hi),
        None => vec![(0, 0)],
    };
    blocks
        .into_iter()
        .map(|(port, port_plen)| {
            let key = IndexKey {
                ifindex,
                saddr: pfwd_common::masked(&e.src_net, &src_mask),
                daddr: pfwd_common::masked(&e.dst_net, &dst_mask),
                dport: port,
                proto: e.proto,
                hook,
                port_plen,
                src_plen,
                dst_plen,
                family: e.family,
            };
            (key, class_of(&key))
        })
        .collect()
}

/// The class (match shape, `min_rank` 0) an index key belongs to: its prefix lengths, and whether it names an
/// interface and a protocol.
pub fn class_of(key: &IndexKey) -> Class {
    let flags = if key.ifindex != 0 { class_flag::IFACE } else { 0 }
        | if key.proto != PROTO_ANY { class_flag::PROTO } else { 0 };
    class_shaped(flags, key.family, key.port_plen, key.src_plen, key.dst_plen)
}

/// The class (`min_rank` 0) with these [`class_flag`]s and prefix lengths; the masks follow from the lengths.
pub fn class_shaped(flags: u8, family: u8, port_plen: u8, src_plen: u8, dst_plen: u8) -> Class {
    Class {
        min_rank: 0,
        src_mask: addr_mask(src_plen),
        dst_mask: addr_mask(dst_plen),
        port_mask: if port_plen == 0 { 0 } else { !0u16 << (16 - port_plen) },
        port_plen,
        src_plen,
        dst_plen,
        flags,
        family,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {

    use std::net::Ipv4Addr;

    use pfwd_common::maps::*;

    use super::port_blocks;
    use crate::rules::tests::*;
    use crate::rules::*;

    /// The index keys listing `slot`, as (hook, ifindex, proto, dport, port prefix length, src and dst prefix
    /// lengths), sorted.
    fn keys(c: &Compiled, slot: u32) -> Vec<(u8, u32, u8, u16, u8, u8, u8)> {
        let mut k: Vec<_> = c
            .index()
            .into_iter()
            .filter(|(_, s)| s.contains(&slot))
            .map(|(k, _)| (k.hook, k.ifindex, k.proto, k.dport, k.port_plen, k.src_plen, k.dst_plen))
            .collect();
        k.sort_unstable();
        k
    }

    /// The kernel's index holds 1,048,576 keys: a rule set that needs more is refused by name, not by the kernel.
    #[test]
    fn more_index_keys_than_the_kernel_holds_are_refused() {
        // 16 keys a rule (1-65535 is 16 prefix blocks), each rule with its own source.
        let n = INDEX_ENTRIES / 16 + 1;
        let base = ok("dnat -p tcp -s 10.0.0.1 --dport 1-65535 --to 10.0.1.1");
        let rules: Vec<Rule> = (0..n)
            .map(|i| Rule {
                id: i + 1,
                src: Some(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap().into()),
                ..base.clone()
            })
            .collect();
        let err = compile(&rules, &ifindex).unwrap_err();
        assert!(matches!(err, RuleError::TooManyIndexKeys { count: 1_048_592 }), "{err}");
    }

    #[test]
    fn port_ranges_split_into_prefix_blocks() {
        assert_eq!(port_blocks(80, 80), [(80, 16)]);
        assert_eq!(port_blocks(8000, 8002), [(8000, 15), (8002, 16)]);
        assert_eq!(port_blocks(1, 21), [(1, 16), (2, 15), (4, 14), (8, 13), (16, 14), (20, 15)]);
        assert_eq!(port_blocks(1, 65535).len(), 16);
        assert_eq!(port_blocks(0, 65535), [(0, 0)]);
        // Every range: blocks aligned, in order, covering it exactly, never more than 30.
        let mut rng = Rng(3);
        for _ in 0..2000 {
            let (a, b) = (rng.below(65536) as u16, rng.below(65536) as u16);
            let (lo, hi) = (a.min(b), a.max(b));
            let blocks = port_blocks(lo, hi);
            assert!(blocks.len() <= 30, "{lo}-{hi}: {}", blocks.len());
            let mut next = u32::from(lo);
            for (start, plen) in blocks {
                let size = 1u32 << (16 - plen);
                assert_eq!((u32::from(start), u32::from(start) % size), (next, 0), "{lo}-{hi}");
                next += size;
            }
            assert_eq!(next, u32::from(hi) + 1, "{lo}-{hi}");
        }
    }

    #[test]
    fn compile_entries_and_index() {
        let rules = vec![
            Rule { id: 1, ..ok("redirect -p tcp --dport 80 --to-port 3000") },
            Rule { id: 2, ..ok("dnat -i eth0 -p tcp -s 192.168.1.0/24 --dport 59999 --to 127.0.0.1:17355") },
            Rule { id: 3, ..ok("dnat -d 203.0.113.20 --to 10.0.0.6") },
            Rule { id: 4, ..ok("dnat -p udp --dport 8000-8002 --to 10.0.0.7") },
        ];
        let c = compile(&rules, &ifindex).unwrap();
        let e = |slot: usize| c.entries[slot].1;
        assert_eq!(c.entries.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        // Ranks: the single ports first (interface rule ahead), then the range, then the catch-all.
        assert!(e(1).rank < e(0).rank && e(0).rank < e(3).rank && e(3).rank < e(2).rank);
        assert_eq!(
            e(1),
            RuleEntry {
                rank: precedence::rank(&rules[1]),
                gen_from: 0,
                gen_until: GEN_FOREVER,
                id: 2,
                src_net: [u32::from_ne_bytes([192, 168, 1, 0]), 0, 0, 0],
                src_mask: [u32::from_ne_bytes([255, 255, 255, 0]), 0, 0, 0],
                dst_net: [0; 4],
                dst_mask: [0; 4],
                to_addr: [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0],
                to_port: 17355,
                to_port_hi: 0,
                kind: kind::DNAT,
                proto: PROTO_TCP,
                flags: 0,
                family: family::V4,
                ifindex: 2,
            }
        );
        assert_eq!((e(0).kind, e(0).to_addr, e(0).to_port, e(0).ifindex), (kind::REDIRECT, [0; 4], 3000, 0));
        assert_eq!((e(2).proto, e(2).dst_mask, e(2).to_port), (PROTO_ANY, [u32::MAX, 0, 0, 0], 0));
        assert_eq!(e(2).dst_net, [u32::from_ne_bytes([203, 0, 113, 20]), 0, 0, 0]);
        let pre = hook::PREROUTING;
        assert_eq!(keys(&c, 0), [(pre, 0, PROTO_TCP, 80, 16, 0, 0)]);
        assert_eq!(keys(&c, 1), [(pre, 2, PROTO_TCP, 59999, 16, 24, 0)]);
        assert_eq!(keys(&c, 2), [(pre, 0, PROTO_ANY, 0, 0, 0, 32)]);
        // A range: one key per prefix block, not per port.
        assert_eq!(keys(&c, 3), [(pre, 0, PROTO_UDP, 8000, 15, 0, 0), (pre, 0, PROTO_UDP, 8002, 16, 0, 0)]);
        assert_eq!(c.members.len(), 5);
        let k1 = c.members.keys().find(|k| k.dport == 59999).unwrap();
        assert_eq!(k1.saddr, [u32::from_ne_bytes([192, 168, 1, 0]), 0, 0, 0]);
        // Classes: one per shape, in ascending lowest rank. Rules 1 and 4's single-port shapes differ in the
        // family: rule 4 translates to an IPv4 address, so it is an IPv4 rule; rule 1 serves both families.
        let shapes: Vec<(u8, u8, u8, u8)> =
            c.classes[pre as usize].iter().map(|k| (k.flags, k.port_plen, k.src_plen, k.dst_plen)).collect();
        let (i, p) = (class_flag::IFACE, class_flag::PROTO);
        assert_eq!(shapes, [(i | p, 16, 24, 0), (p, 16, 0, 0), (p, 15, 0, 0), (p, 16, 0, 0), (0, 0, 0, 32)]);
        let families: Vec<u8> = c.classes[pre as usize].iter().map(|k| k.family).collect();
        assert_eq!(families, [family::V4, family::ANY, family::V4, family::V4, family::V4]);
        assert_eq!(c.classes[pre as usize][1].min_rank, e(0).rank);
        assert!(c.classes[1].is_empty() && c.classes[2].is_empty());
        assert_eq!(compile(&[], &ifindex).unwrap(), Compiled::default());
    }

    #[test]
    fn compile_errors() {
        let r = Rule { id: 5, ..ok("dnat -i eth9 -p tcp --dport 80 --to 10.0.0.1") };
        assert_eq!(compile(&[r], &ifindex).unwrap_err().to_string(), "interface \"eth9\" (rule 5, -i) is not attached");

        // Any number of rules may share a port: 100 ranges through port 80 (their common blocks list only the best
        // of them), and 100 sources on it.
        let rules: Vec<Rule> =
            (1..=100)
                .map(|i| Rule { id: i, ..ok(&format!("dnat -i eth0 -p tcp --dport 80-{} --to 10.0.0.1", 79 + i)) })
                .chain((1..=100).map(|i| Rule {
                    id: 100 + i,
                    ..ok(&format!("dnat -p tcp -s 10.0.0.{i} --dport 80 --to 10.0.1.1"))
                }))
                .collect();
        let c = compile(&rules, &ifindex).unwrap();
        assert!(c.index().values().all(|s| s.len() == 1));
        // Only rules indexed under the very same key (matches that differ only in negations) are limited.
        let rules: Vec<Rule> = (1..=17)
            .map(|i| Rule { id: i, ..ok(&format!("dnat -p tcp ! -s 10.0.0.{i} --dport 80 --to 10.0.1.1")) })
            .collect();
        compile(&rules[..16], &ifindex).unwrap();
        let e = compile(&rules, &ifindex).unwrap_err().to_string();
        assert!(e.starts_with("rules 1, 2, 3,") && e.contains("at most 16 such rules"), "{e}");

        let many = vec![ok("dnat --to 10.0.0.1"); MAX_RULES as usize + 1];
        assert!(compile(&many, &ifindex).unwrap_err().to_string().contains("131073 rules"));

        // Full-range rules on every (interface, protocol) pair: a few keys each.
        let rules: Vec<Rule> =
            ["-p tcp", "-p udp", "-i eth0 -p tcp", "-i eth0 -p udp", "-i eth1 -p tcp", "-i eth1 -p udp"]
                .iter()
                .map(|m| ok(&format!("dnat {m} --dport 1-65535 --to 10.0.0.1")))
                .collect();
        assert_eq!(compile(&rules, &ifindex).unwrap().members.len(), 6 * 16);

        // More match shapes than classes.
        let rules: Vec<Rule> = (0..=32u32)
            .flat_map(|a| (1..=32u32).map(move |b| (a, b)))
            .map(|(a, b)| Rule {
                id: a * 100 + b,
                ..ok(&format!("dnat -s 10.0.0.0/{a} -d 10.0.0.0/{b} --to 10.0.1.1"))
            })
            .collect();
        compile(&rules[..MAX_CLASSES as usize], &ifindex).unwrap();
        assert_eq!(compile(&rules, &ifindex).unwrap_err(), RuleError::TooManyClasses { count: 33 * 32 });

        // Hand-built invalid rules are caught before they reach the maps.
        let mut bad = ok("dnat -p tcp --dport 80 --to 10.0.0.1");
        bad.id = 3;
        bad.proto = None;
        assert_eq!(
            compile(&[bad], &ifindex).unwrap_err().to_string(),
            format!("rule 3: {}", RuleError::PortNeedsProto)
        );
    }

    #[test]
    fn compile_10k_rules_is_fast() {
        let rules: Vec<Rule> = (0..10_000u32)
            .map(|i| Rule {
                id: i + 1,
                iface: None,
                oface: None,
                proto: Some(if i % 2 == 0 { Proto::Tcp } else { Proto::Udp }),
                src: None,
                dst: None,
                dport: Some(PortRange::single(1000 + (i / 2) as u16)),
                local: false,
                hairpin: None,
                target: Target::Dnat { addr: Ipv4Addr::from(0x0a00_0000 + i).into(), port: Some(80) },
                not: Negated::default(),
                dst_local: false,
                backends: Vec::new(),
                family: None,
            })
            .collect();
        let start = std::time::Instant::now();
        let c = compile(&rules, &ifindex).unwrap();
        let took = start.elapsed();
        assert_eq!((c.entries.len(), c.members.len(), c.classes[0].len()), (10_000, 10_000, 1));
        // Timing is only meaningful with optimizations (`cargo test --release`).
        if !cfg!(debug_assertions) {
            assert!(took < std::time::Duration::from_millis(50), "compile took {took:?}");
        }
    }

    #[test]
    fn compile_postrouting() {
        let rules = vec![
            Rule { id: 1, ..ok("dnat -p tcp --dport 80 --to 10.0.0.1") },
            Rule { id: 2, ..ok("snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099") },
            Rule { id: 3, ..ok("masquerade -o eth1") },
            Rule { id: 4, ..ok("masquerade -p udp --to-ports 1024-1027") },
            Rule { id: 5, ..ok("snat -d 198.51.100.0/24 --to 203.0.113.6") },
            Rule { id: 6, ..ok("dnat --to 10.0.0.2") },
        ];
        let c = compile(&rules, &ifindex).unwrap();
        let e = |slot: usize| c.entries[slot].1;
        assert_eq!(
            e(1),
            RuleEntry {
                rank: e(1).rank,
                gen_from: 0,
                gen_until: GEN_FOREVER,
                id: 2,
                src_net: [u32::from_ne_bytes([10, 0, 2, 0]), 0, 0, 0],
                src_mask: [u32::from_ne_bytes([255, 255, 255, 0]), 0, 0, 0],
                dst_net: [0; 4],
                dst_mask: [0; 4],
                to_addr: [u32::from_ne_bytes([203, 0, 113, 5]), 0, 0, 0],
                to_port: 20000,
                to_port_hi: 20099,
                kind: kind::SNAT,
                proto: PROTO_TCP,
                flags: 0,
                family: family::V4,
                ifindex: 3,
            }
        );
        assert_eq!(
            (e(2).kind, e(2).to_addr, e(2).to_port, e(2).to_port_hi, e(2).ifindex),
            (kind::MASQUERADE, [0; 4], 0, 0, 3)
        );
        assert_eq!((e(3).to_port, e(3).to_port_hi, e(3).proto, e(3).ifindex), (1024, 1027, PROTO_UDP, 0));
        assert_eq!((e(4).kind, e(4).to_port, e(4).to_port_hi), (kind::SNAT, 0, 0), "no range: the kernel's default");
        assert_eq!(e(4).dst_net, [u32::from_ne_bytes([198, 51, 100, 0]), 0, 0, 0]);
        assert_eq!((e(0).kind, e(0).to_port, e(0).to_port_hi), (kind::DNAT, 0, 0), "hi unused by DNAT");
        let (pre, post) = (hook::PREROUTING, hook::POSTROUTING);
        assert_eq!(keys(&c, 1), [(post, 3, PROTO_TCP, 0, 0, 24, 0)]);
        assert_eq!(keys(&c, 2), [(post, 3, PROTO_ANY, 0, 0, 0, 0)]);
        assert_eq!(keys(&c, 3), [(post, 0, PROTO_UDP, 0, 0, 0, 0)]);
        assert_eq!(keys(&c, 4), [(post, 0, PROTO_ANY, 0, 0, 0, 24)]);
        // The catch-all DNAT and an SNAT without matches would share a key but not the hook.
        assert_eq!(keys(&c, 5), [(pre, 0, PROTO_ANY, 0, 0, 0, 0)]);
        assert_eq!(keys(&c, 0), [(pre, 0, PROTO_TCP, 80, 16, 0, 0)]);
        assert_eq!((c.classes[pre as usize].len(), c.classes[post as usize].len()), (2, 4));

        // -o must name an attached interface, like -i.
        let r = Rule { id: 9, ..ok("masquerade -o eth9") };
        assert_eq!(compile(&[r], &ifindex).unwrap_err().to_string(), "interface \"eth9\" (rule 9, -o) is not attached");
    }

    /// A `--hairpin` rule adds its masquerade in the companion half of the rules array, at its own slot's place,
    /// ranked and indexed like any POSTROUTING rule; equal companions are added once.
    #[test]
    fn compile_hairpin() {
        let rules = vec![
            Rule { id: 1, ..ok("masquerade -o eth1") },
            Rule { id: 2, ..ok("dnat -p tcp -d 203.0.113.10 --dport 8080 --to 10.0.2.2:80 --hairpin 10.0.2.0/24") },
            Rule { id: 3, ..ok("dnat -p tcp -d 203.0.113.10 --dport 8443 --to 10.0.2.2:443 --hairpin 10.0.2.0/24") },
            Rule { id: 4, ..ok("dnat -p udp -d 203.0.113.10 --dport 53 --to 10.0.2.3 --hairpin 10.0.2.0/24") },
        ];
        let (all, owners) = with_companions(&rules);
        let shown: Vec<String> = all.iter().map(|r| format!("{} {r}", r.id)).collect();
        assert_eq!(
            shown[4..],
            [
                "2 masquerade -p tcp -s 10.0.2.0/24 -d 10.0.2.2".to_string(),
                "4 masquerade -p udp -s 10.0.2.0/24 -d 10.0.2.3".to_string()
            ],
            "rule 3's companion is rule 2's"
        );
        assert_eq!(owners, [None, None, None, None, Some(1), Some(3)]);
        // Slots come from the caller; companions go to the companion half at their owner's slot.
        let c = compile::compile_at(&rules, &|pos| 10 + pos as u32, &ifindex).unwrap();
        let slots: Vec<u32> = c.entries.iter().map(|(s, _)| *s).collect();
        assert_eq!(slots, [10, 11, 12, 13, COMPANION_SLOTS + 11, COMPANION_SLOTS + 13]);
        let e = c.entries[4].1;
        assert_eq!((e.kind, e.id, e.ifindex, e.proto), (kind::MASQUERADE, 2, 0, PROTO_TCP));
        assert_eq!(
            (e.src_net, e.src_mask),
            ([u32::from_ne_bytes([10, 0, 2, 0]), 0, 0, 0], [u32::from_ne_bytes([255, 255, 255, 0]), 0, 0, 0])
        );
        assert_eq!((e.dst_net, e.dst_mask), ([u32::from_ne_bytes([10, 0, 2, 2]), 0, 0, 0], [u32::MAX, 0, 0, 0]));
        let post = hook::POSTROUTING;
        assert_eq!(keys(&c, COMPANION_SLOTS + 11), [(post, 0, PROTO_TCP, 0, 0, 24, 32)]);
        assert_eq!(keys(&c, COMPANION_SLOTS + 13), [(post, 0, PROTO_UDP, 0, 0, 24, 32)]);
        assert_eq!(keys(&c, 10), [(post, 3, PROTO_ANY, 0, 0, 0, 0)]);
        // The DNAT rules themselves are unchanged: no -i, so they also match where inside hosts arrive.
        assert_eq!(keys(&c, 11), [(hook::PREROUTING, 0, PROTO_TCP, 8080, 16, 0, 32)]);
        // Companions rank like hand-written rules: -p (contract rule 2) beats -o (rule 3).
        assert!(c.entry(COMPANION_SLOTS + 11).unwrap().rank < c.entry(10).unwrap().rank);
        // Without --hairpin rules nothing is added, and the rules are not copied.
        let (plain, owners) = with_companions(&rules[..1]);
        assert!(matches!(plain, std::borrow::Cow::Borrowed(_)) && owners == [None]);
    }
}
