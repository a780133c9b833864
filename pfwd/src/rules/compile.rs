//! Compilation of rules into the kernel's map layout: the rules array, the (hook, interface, protocol, port)
//! buckets and the level masks.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use pfwd_common::maps::{
    BUCKET_SLOTS, BackendEntry, Bucket, BucketKey, COMPANION_SLOTS, MAX_BACKEND_RULES, MAX_BUCKETS, MAX_RULES,
    PROTO_ANY, RuleEntry, hook, kind, level, rule_flag,
};

use super::error::RuleError;
use super::model::{PortRange, Proto, Rule, Target, net_mask};
use super::precedence::precedence_order;

/// The contents of the rules array, the bucket hash map and `Config::level_mask` / `Config::snat_level_mask`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    /// `(slot, entry)`, one per rule, in slot order; slot = index in the input (see [`compile`] for the rules
    /// `--hairpin` adds).
    pub entries: Vec<(u32, RuleEntry)>,
    /// Slots within a bucket are in rank order (best first). PREROUTING and POSTROUTING rules have separate buckets
    /// (`BucketKey::hook`).
    pub buckets: HashMap<BucketKey, Bucket>,
    /// [`level`] bits of the levels that have at least one PREROUTING bucket.
    pub level_mask: u32,
    /// [`level`] bits of the levels that have at least one POSTROUTING bucket (only IF_PROTO, PROTO, IF, ANY: these
    /// rules have no port).
    pub snat_level_mask: u32,
    /// [`level`] bits of the levels that have at least one OUTPUT (`--local`) bucket.
    pub local_level_mask: u32,
    /// `(slot, Maglev table)` of each rule with several backends ([`super::maglev::entries`]), in slot order.
    pub tables: Vec<(u32, Vec<BackendEntry>)>,
}

pub(crate) fn bucket_key(hook: u8, ifindex: u32, proto: u8, dport: u16) -> BucketKey {
    // Bank 0: the loader moves the buckets into the bank it writes.
    BucketKey { ifindex, dport, proto, hook, ..Default::default() }
}

/// The rules both data paths run: `rules` in their order, then the companion ([`Rule::hairpin_companion`]) of each
/// `--hairpin` rule, each distinct companion once (the first rule's: it is the older one, or the earlier in the
/// list). The companions are ordinary rules with their owner's id and compete under the precedence contract like
/// any rule written by hand. The second value gives, per returned rule, the index of the rule that added it (None
/// for `rules` themselves). Without `--hairpin` rules, `rules` is returned as is.
pub fn with_companions(rules: &[Rule]) -> (Cow<'_, [Rule]>, Vec<Option<usize>>) {
    let mut seen = HashSet::new();
    let extra: Vec<(usize, Rule)> = rules
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, r.hairpin_companion()?)))
        .filter(|(_, c)| seen.insert(c.dedup_key()))
        .collect();
    let mut owners = vec![None; rules.len()];
    if extra.is_empty() {
        return (Cow::Borrowed(rules), owners);
    }
    owners.extend(extra.iter().map(|(i, _)| Some(*i)));
    let all = rules.iter().cloned().chain(extra.into_iter().map(|(_, c)| c)).collect();
    (Cow::Owned(all), owners)
}

/// Builds the kernel's view of `rules`. Slot = index in `rules`, and [`COMPANION_SLOTS`] + the index of its owner for
/// the rule a `--hairpin` rule adds (see [`with_companions`]); rank = position in [`precedence_order`] of them all.
/// `ifindex` maps an interface name to its index, or `None` when pfwd is not attached to it (an error: the rule
/// could never match). Each rule goes into the bucket(s) of its own (interface, protocol, port) level of its hook; a
/// port range takes one bucket per port. The interface is the incoming one (`-i`) for DNAT/REDIRECT, the outgoing
/// one (`-o`) for SNAT/MASQUERADE.
pub fn compile(rules: &[Rule], ifindex: &dyn Fn(&str) -> Option<u32>) -> Result<Compiled, RuleError> {
    if rules.len() > MAX_RULES as usize {
        return Err(RuleError::TooManyRules(rules.len()));
    }
    for r in rules {
        // The bucket levels rely on "a port implies a protocol", which validate() guarantees.
        r.validate().map_err(|e| RuleError::InRule { id: r.id, error: Box::new(e) })?;
    }
    let (all, owners) = with_companions(rules);
    let rules = &all[..];
    let slot_of = |pos: usize| match owners[pos] {
        Some(owner) => COMPANION_SLOTS + owner as u32,
        None => pos as u32,
    };
    let order = precedence_order(rules);
    let mut ranks = vec![0u32; rules.len()];
    for (rank, &pos) in order.iter().enumerate() {
        ranks[pos] = rank as u32;
    }
    // The closure may be a syscall (if_nametoindex), so ask once per name.
    let mut ifindexes: HashMap<&str, u32> = HashMap::new();
    let mut rule_ifindex = vec![0u32; rules.len()];
    for (pos, r) in rules.iter().enumerate() {
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
                    let i = ifindex(name)
                        .filter(|&i| i != 0)
                        .ok_or_else(|| RuleError::IfaceNotAttached { id: r.id, iface: name.to_string() })?;
                    ifindexes.insert(name, i);
                    i
                }
            };
            rule_ifindex[pos] = idx;
        }
    }

    let mut entries = Vec::with_capacity(rules.len());
    let mut tables = Vec::new();
    for (pos, r) in rules.iter().enumerate() {
        if !r.backends.is_empty() {
            if tables.len() >= MAX_BACKEND_RULES as usize {
                return Err(RuleError::TooManyBackendRules);
            }
            tables.push((slot_of(pos), super::maglev::entries(&r.backends)));
        }
        let (src_net, src_mask) = net_mask(r.src);
        let (dst_net, dst_mask) = net_mask(r.dst);
        let be = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
        // SNAT/MASQUERADE ports 0..=0 tell the kernel "keep the source port when free, else 1024-65535".
        let range = |p: Option<PortRange>| p.map_or((0, 0), |p| (p.lo, p.hi));
        let (kind, to_addr, (to_port, to_port_hi)) = match r.target {
            Target::Dnat { addr, port } => (kind::DNAT, be(addr), (port.unwrap_or(0), 0)),
            Target::Redirect { port } => (kind::REDIRECT, 0, (port, 0)),
            Target::Snat { addr, ports } => (kind::SNAT, be(addr), range(ports)),
            Target::Masquerade { ports } => (kind::MASQUERADE, 0, range(ports)),
        };
        // Map values are network order: the bytes as they sit in the packet.
        let ne = |v: u32| u32::from_ne_bytes(v.to_be_bytes());
        let flag = |on: bool, f: u8| if on { f } else { 0 };
        let flags = flag(r.not.src, rule_flag::NOT_SRC)
            | flag(r.not.dst, rule_flag::NOT_DST)
            | flag(r.not.iface, rule_flag::NOT_IFACE)
            | flag(r.dst_local, rule_flag::DST_LOCAL)
            | flag(!r.backends.is_empty(), rule_flag::BACKENDS);
        let entry = RuleEntry {
            rank: ranks[pos],
            id: r.id,
            src_net: ne(src_net),
            src_mask: ne(src_mask),
            dst_net: ne(dst_net),
            dst_mask: ne(dst_mask),
            to_addr,
            to_port,
            to_port_hi,
            kind,
            proto: r.proto.map_or(PROTO_ANY, Proto::code),
            flags,
            _pad: 0,
            ifindex: rule_ifindex[pos],
        };
        entries.push((slot_of(pos), entry));
    }

    let mut buckets: HashMap<BucketKey, Bucket> = HashMap::with_capacity(rules.len());
    // The positions (in `rules`) of each bucket's rules; turned into slots at the end.
    let mut members: HashMap<BucketKey, Vec<usize>> = HashMap::with_capacity(rules.len());
    let (mut level_mask, mut snat_level_mask, mut local_level_mask) = (0, 0, 0);
    // Filling in precedence order keeps each bucket's slots sorted by rank.
    for &pos in &order {
        let r = &rules[pos];
        // A negated interface matches on the others: the rule is looked up with the any-interface buckets.
        let ifx = if r.not.iface { 0 } else { rule_ifindex[pos] };
        let proto = r.proto.map_or(PROTO_ANY, Proto::code);
        let (hook, mask) = if r.is_postrouting() {
            (hook::POSTROUTING, &mut snat_level_mask)
        } else if r.local {
            (hook::OUTPUT, &mut local_level_mask)
        } else {
            (hook::PREROUTING, &mut level_mask)
        };
        // Rules with --dport (of either hook) land on the port levels, the others on the portless ones.
        *mask |= match (ifx != 0, proto != PROTO_ANY, r.dport.is_some()) {
            (true, true, true) => level::IF_PROTO_PORT,
            (false, true, true) => level::PROTO_PORT,
            (true, true, false) => level::IF_PROTO,
            (false, true, false) => level::PROTO,
            (true, false, _) => level::IF,
            (false, false, _) => level::ANY,
        };
        let (lo, hi) = r.dport.map_or((0, 0), |p| (p.lo, p.hi));
        for port in lo..=hi {
            let key = bucket_key(hook, ifx, proto, port);
            if members.len() >= MAX_BUCKETS as usize && !members.contains_key(&key) {
                return Err(RuleError::TooManyBuckets);
            }
            let m = members.entry(key).or_default();
            if m.len() >= BUCKET_SLOTS {
                let mut ids: Vec<String> = m.iter().map(|&p| rules[p].id.to_string()).collect();
                ids.push(r.id.to_string());
                return Err(RuleError::BucketFull {
                    iface: r.hook_iface().map_or_else(|| "any".into(), |i| i.to_string()),
                    proto: r.proto.map_or_else(|| "any".into(), |p| p.to_string()),
                    port: if port == 0 { "any".into() } else { port.to_string() },
                    ids: ids.join(", "),
                });
            }
            m.push(pos);
        }
    }
    for (key, m) in members {
        let mut b = Bucket::default();
        for (i, &pos) in m.iter().enumerate() {
            b.slots[i] = slot_of(pos);
        }
        b.len = m.len() as _;
        buckets.insert(key, b);
    }
    Ok(Compiled { entries, buckets, level_mask, snat_level_mask, local_level_mask, tables })
}

#[cfg(test)]
mod tests {

    use std::net::Ipv4Addr;

    use pfwd_common::maps::*;

    use super::bucket_key;
    use crate::rules::tests::*;
    use crate::rules::*;

    #[test]
    fn compile_entries_and_buckets() {
        let rules = vec![
            Rule { id: 1, ..ok("redirect -p tcp --dport 80 --to-port 3000") },
            Rule { id: 2, ..ok("dnat -i eth0 -p tcp -s 192.168.1.0/24 --dport 59999 --to 127.0.0.1:17355") },
            Rule { id: 3, ..ok("dnat -d 203.0.113.20 --to 10.0.0.6") },
            Rule { id: 4, ..ok("dnat -p udp --dport 8000-8002 --to 10.0.0.7") },
        ];
        let c = compile(&rules, &ifindex).unwrap();
        assert_eq!(c.level_mask, level::PROTO_PORT | level::IF_PROTO_PORT | level::ANY);
        let e = |slot: usize| c.entries[slot].1;
        assert_eq!(c.entries.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        // Ranks: the single ports first (interface rule ahead), then the range, then the catch-all.
        assert_eq!([e(0).rank, e(1).rank, e(2).rank, e(3).rank], [1, 0, 3, 2]);
        assert_eq!(
            e(1),
            RuleEntry {
                rank: 0,
                id: 2,
                src_net: u32::from_ne_bytes([192, 168, 1, 0]),
                src_mask: u32::from_ne_bytes([255, 255, 255, 0]),
                dst_net: 0,
                dst_mask: 0,
                to_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                to_port: 17355,
                to_port_hi: 0,
                kind: kind::DNAT,
                proto: PROTO_TCP,
                flags: 0,
                _pad: 0,
                ifindex: 2,
            }
        );
        assert_eq!((e(0).kind, e(0).to_addr, e(0).to_port, e(0).ifindex), (kind::REDIRECT, 0, 3000, 0));
        assert_eq!((e(2).proto, e(2).dst_mask, e(2).to_port), (PROTO_ANY, u32::MAX, 0));
        assert_eq!(e(2).dst_net, u32::from_ne_bytes([203, 0, 113, 20]));
        let slots = |ifx, proto, port| {
            let b = c.buckets[&bucket_key(hook::PREROUTING, ifx, proto, port)];
            b.slots[..b.len as usize].to_vec()
        };
        assert_eq!(c.buckets.len(), 1 + 1 + 1 + 3);
        assert_eq!(slots(0, PROTO_TCP, 80), vec![0]);
        assert_eq!(slots(2, PROTO_TCP, 59999), vec![1]);
        assert_eq!(slots(0, 0, 0), vec![2]);
        for port in 8000..=8002 {
            assert_eq!(slots(0, PROTO_UDP, port), vec![3]);
        }
        assert_eq!(compile(&[], &ifindex).unwrap(), Compiled::default());
    }

    #[test]
    fn compile_errors() {
        let r = Rule { id: 5, ..ok("dnat -i eth9 -p tcp --dport 80 --to 10.0.0.1") };
        assert_eq!(compile(&[r], &ifindex).unwrap_err().to_string(), "interface \"eth9\" (rule 5) is not attached");

        // Nine rules in one (eth0, tcp, 80) bucket; the ranged ones share it through port 80.
        let rules: Vec<Rule> = (1..=9)
            .map(|i| Rule { id: i, ..ok(&format!("dnat -i eth0 -p tcp --dport 80-{} --to 10.0.0.{i}", 79 + i)) })
            .collect();
        compile(&rules[..8], &ifindex).unwrap();
        let e = compile(&rules, &ifindex).unwrap_err().to_string();
        assert!(
            e.contains("interface eth0, protocol tcp, port 80") && e.contains("at most 8 rules may share one"),
            "{e}"
        );
        let rules: Vec<Rule> =
            (1..=9).map(|i| Rule { id: i, ..ok(&format!("dnat -s 10.0.0.{i} --to 10.0.1.1")) }).collect();
        let e = compile(&rules, &ifindex).unwrap_err().to_string();
        assert!(e.contains("interface any, protocol any, port any"), "{e}");

        let many = vec![ok("dnat --to 10.0.0.1"); MAX_RULES as usize + 1];
        assert!(compile(&many, &ifindex).unwrap_err().to_string().contains("16385 rules"));

        // Five full-range rules on different (interface, protocol) pairs exceed the bucket map.
        let rules: Vec<Rule> = ["-p tcp", "-p udp", "-i eth0 -p tcp", "-i eth0 -p udp", "-i eth1 -p tcp"]
            .iter()
            .map(|m| ok(&format!("dnat {m} --dport 1-65535 --to 10.0.0.1")))
            .collect();
        compile(&rules[..4], &ifindex).unwrap();
        assert_eq!(compile(&rules, &ifindex).unwrap_err(), RuleError::TooManyBuckets);

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
                target: Target::Dnat { addr: Ipv4Addr::from(0x0a00_0000 + i), port: Some(80) },
                not: Negated::default(),
                dst_local: false,
                backends: Vec::new(),
            })
            .collect();
        let start = std::time::Instant::now();
        let c = compile(&rules, &ifindex).unwrap();
        let took = start.elapsed();
        assert_eq!((c.entries.len(), c.buckets.len()), (10_000, 10_000));
        // Timing is only meaningful with optimizations (`cargo test --release`).
        if !cfg!(debug_assertions) {
            assert!(took < std::time::Duration::from_millis(10), "compile took {took:?}");
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
        assert_eq!(c.level_mask, level::PROTO_PORT | level::ANY);
        assert_eq!(c.snat_level_mask, level::IF_PROTO | level::PROTO | level::IF | level::ANY);
        let e = |slot: usize| c.entries[slot].1;
        assert_eq!(
            e(1),
            RuleEntry {
                rank: e(1).rank,
                id: 2,
                src_net: u32::from_ne_bytes([10, 0, 2, 0]),
                src_mask: u32::from_ne_bytes([255, 255, 255, 0]),
                dst_net: 0,
                dst_mask: 0,
                to_addr: u32::from_ne_bytes([203, 0, 113, 5]),
                to_port: 20000,
                to_port_hi: 20099,
                kind: kind::SNAT,
                proto: PROTO_TCP,
                flags: 0,
                _pad: 0,
                ifindex: 3,
            }
        );
        assert_eq!(
            (e(2).kind, e(2).to_addr, e(2).to_port, e(2).to_port_hi, e(2).ifindex),
            (kind::MASQUERADE, 0, 0, 0, 3)
        );
        assert_eq!((e(3).to_port, e(3).to_port_hi, e(3).proto, e(3).ifindex), (1024, 1027, PROTO_UDP, 0));
        assert_eq!((e(4).kind, e(4).to_port, e(4).to_port_hi), (kind::SNAT, 0, 0), "no range: the kernel's default");
        assert_eq!(e(4).dst_net, u32::from_ne_bytes([198, 51, 100, 0]));
        assert_eq!((e(0).kind, e(0).to_port, e(0).to_port_hi), (kind::DNAT, 0, 0), "hi unused by DNAT");
        let slots = |at, ifx, proto| {
            let b = c.buckets[&bucket_key(at, ifx, proto, 0)];
            b.slots[..b.len as usize].to_vec()
        };
        let post = hook::POSTROUTING;
        assert_eq!(c.buckets.len(), 2 + 4);
        assert_eq!(slots(post, 3, PROTO_TCP), vec![1]);
        assert_eq!(slots(post, 3, PROTO_ANY), vec![2]);
        assert_eq!(slots(post, 0, PROTO_UDP), vec![3]);
        // The catch-all DNAT and the SNAT without -o/-p share (0, 0, 0) but not the hook.
        assert_eq!(slots(post, 0, PROTO_ANY), vec![4]);
        assert_eq!(slots(hook::PREROUTING, 0, PROTO_ANY), vec![5]);
        assert_eq!(c.buckets[&bucket_key(hook::PREROUTING, 0, PROTO_TCP, 80)].slots[0], 0);

        // -o must name an attached interface, like -i.
        let r = Rule { id: 9, ..ok("masquerade -o eth9") };
        assert_eq!(compile(&[r], &ifindex).unwrap_err().to_string(), "interface \"eth9\" (rule 9) is not attached");
        // Nine rules in one POSTROUTING bucket.
        let rules: Vec<Rule> =
            (1..=9).map(|i| Rule { id: i, ..ok(&format!("snat -o eth1 -s 10.0.0.{i} --to 203.0.113.1")) }).collect();
        compile(&rules[..8], &ifindex).unwrap();
        let e = compile(&rules, &ifindex).unwrap_err().to_string();
        assert!(e.contains("interface eth1, protocol any, port any") && e.contains("at most 8"), "{e}");
        // ...which does not fill the PREROUTING bucket of the same key.
        let mut mixed: Vec<Rule> = rules[..8].to_vec();
        mixed.extend((1..=8).map(|i| Rule { id: 10 + i, ..ok(&format!("dnat -i eth1 -s 10.0.0.{i} --to 10.9.0.1")) }));
        compile(&mixed, &ifindex).unwrap();
    }

    /// A `--hairpin` rule adds its masquerade in the companion half of the rules array, at its own slot's place,
    /// ranked and bucketed like any POSTROUTING rule; equal companions are added once.
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
        let c = compile(&rules, &ifindex).unwrap();
        let slots: Vec<u32> = c.entries.iter().map(|(s, _)| *s).collect();
        assert_eq!(slots, [0, 1, 2, 3, COMPANION_SLOTS + 1, COMPANION_SLOTS + 3]);
        let e = c.entries[4].1;
        assert_eq!((e.kind, e.id, e.ifindex, e.proto), (kind::MASQUERADE, 2, 0, PROTO_TCP));
        assert_eq!(
            (e.src_net, e.src_mask),
            (u32::from_ne_bytes([10, 0, 2, 0]), u32::from_ne_bytes([255, 255, 255, 0]))
        );
        assert_eq!((e.dst_net, e.dst_mask), (u32::from_ne_bytes([10, 0, 2, 2]), u32::MAX));
        let slots = |at, ifx, proto, port| {
            let b = c.buckets[&bucket_key(at, ifx, proto, port)];
            b.slots[..b.len as usize].to_vec()
        };
        assert_eq!(slots(hook::POSTROUTING, 0, PROTO_TCP, 0), [COMPANION_SLOTS + 1]);
        assert_eq!(slots(hook::POSTROUTING, 0, PROTO_UDP, 0), [COMPANION_SLOTS + 3]);
        assert_eq!(slots(hook::POSTROUTING, 3, PROTO_ANY, 0), [0]);
        // The DNAT rules themselves are unchanged: no -i, so they also match where inside hosts arrive.
        assert_eq!(slots(hook::PREROUTING, 0, PROTO_TCP, 8080), [1]);
        assert_eq!(c.level_mask, level::PROTO_PORT);
        assert_eq!(c.snat_level_mask, level::PROTO | level::IF);
        // Companions rank like hand-written rules: -p (contract rule 2) beats -o (rule 3).
        let rank = |slot: u32| c.entries.iter().find(|(s, _)| *s == slot).unwrap().1.rank;
        assert!(rank(COMPANION_SLOTS + 1) < rank(0));
        // Without --hairpin rules nothing is added, and the rules are not copied.
        let (plain, owners) = with_companions(&rules[..1]);
        assert!(matches!(plain, std::borrow::Cow::Borrowed(_)) && owners == [None]);
    }
}
