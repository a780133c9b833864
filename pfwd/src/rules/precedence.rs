//! Precedence: which rule wins when several match (the contract documented in [`super`]), shared by the kernel's
//! rank ([`super::compile`]) and the iptables export's rule order.

use std::cmp::Ordering;

use super::model::{Rule, prefix_len};

/// Order of two rules under the precedence contract (see the module docs): `Less` means `a` wins over `b`.
/// Equal only for rules with the same matches and id (then list order decides).
pub fn precedence_cmp(a: &Rule, b: &Rule) -> Ordering {
    precedence_key(a).cmp(&precedence_key(b))
}

/// The precedence contract as one number for rules of either family (lowest wins): the fields of [`rank`], with
/// room for IPv6 prefix lengths (128 minus the source's, 257 minus twice the destination's plus `-d local`). Rules
/// of two families never meet a packet together; for IPv4 rules and rules without addresses it orders as
/// [`rank`] does.
pub fn precedence_key(r: &Rule) -> u128 {
    let s = Specificity::of(r, 128);
    let specificity = u128::from(s.no_dport) << 35
        | u128::from(s.width) << 19
        | u128::from(s.no_proto) << 18
        | u128::from(s.no_iface) << 17
        | u128::from(128 - s.src) << 9
        | u128::from(257 - s.dst);
    specificity << 32 | u128::from(r.id)
}

/// The fields of the precedence contract, most significant first; prefix lengths capped at `max_plen`.
struct Specificity {
    no_dport: bool,
    width: u16,
    no_proto: bool,
    no_iface: bool,
    /// The source prefix length.
    src: u8,
    /// Twice the destination prefix length, plus one for `-d local`.
    dst: u16,
}

impl Specificity {
    fn of(r: &Rule, max_plen: u8) -> Specificity {
        // A negated match is the least specific of its kind (`! -s 10.0.0.0/8` covers nearly everything): it ranks
        // like no match at all. `-d local` ranks just above no `-d` (a set of a few addresses, but not one network).
        let plen = |n| prefix_len(n).min(max_plen);
        Specificity {
            no_dport: r.dport.is_none(),
            width: r.dport.map_or(0, |p| p.width()),
            no_proto: r.proto.is_none(),
            // `-o` ranks like `-i`: a rule only ever has the one of its hook.
            no_iface: r.hook_iface().is_none() || r.not.iface,
            src: if r.not.src { 0 } else { plen(r.src) },
            dst: if r.not.dst { 0 } else { 2 * u16::from(plen(r.dst)) } + u16::from(r.dst_local),
        }
    }
}

/// The kernel's rank of `r`: [`precedence_key`] without the id (the kernel breaks ties of rank by the rule's id,
/// which its entry holds), so rules of both families rank as the precedence contract says. A function of the rule
/// alone, so adding or deleting a rule never re-ranks the others.
pub fn rank(r: &Rule) -> u64 {
    (precedence_key(r) >> 32) as u64
}

/// Indices into `rules`, most specific first (see the module docs). The iptables export emits rules in this order so
/// that its first match is pfwd's choice: ascending [`rank`], the kernel's own order; equal ranks keep list order.
pub fn precedence_order(rules: &[Rule]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rules.len()).collect();
    // Stable sort: equal keys keep list order, which is the documented final tie-break.
    order.sort_by_cached_key(|&i| precedence_key(&rules[i]));
    order
}

#[cfg(test)]
mod tests {

    use std::cmp::Ordering;
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr};

    use ipnet::IpNet;
    use pfwd_common::maps::*;

    use super::{precedence_key, rank};
    use crate::rules::model::Family;
    use crate::rules::tests::*;
    use crate::rules::*;

    #[test]
    fn precedence_picks_most_specific() {
        let rules: Vec<Rule> = [
            (1, "dnat --to 10.0.0.1"),                                     // 0: catch-all
            (2, "dnat -p tcp --to 10.0.0.2"),                              // 1: protocol only
            (3, "dnat -p tcp --dport 80-89 --to 10.0.0.3"),                // 2: range
            (4, "dnat -p tcp --dport 80 --to 10.0.0.4"),                   // 3: single port
            (5, "dnat -i eth0 -p tcp --dport 80 --to 10.0.0.5"),           // 4: + interface
            (6, "dnat -p tcp -s 192.168.1.0/24 --dport 80 --to 10.0.0.6"), // 5: + source
            (7, "dnat -i eth0 --to 10.0.0.7"),                             // 6: interface only
            (8, "dnat -s 192.168.1.1 --to 10.0.0.8"),                      // 7: source only
            (9, "dnat -s 192.168.1.1 -d 203.0.113.1 --to 10.0.0.9"),       // 8: source + destination
            (10, "dnat -d 203.0.113.1 --to 10.0.0.10"),                    // 9: destination only
        ]
        .iter()
        .map(|(id, s)| Rule { id: *id, ..ok(s) })
        .collect();
        assert_eq!(precedence_order(&rules), vec![4, 5, 3, 2, 1, 6, 8, 7, 9, 0]);
        // Older rule wins a tie; equal ids keep list order.
        let a = Rule { id: 9, ..ok("dnat -p tcp --dport 80 --to 10.0.0.1") };
        let b = Rule { id: 2, ..ok("dnat -p tcp --dport 81 --to 10.0.0.2") };
        assert_eq!(precedence_order(&[a.clone(), b.clone()]), vec![1, 0]);
        let (a0, b0) = (Rule { id: 0, ..a }, Rule { id: 0, ..b });
        assert_eq!(precedence_order(&[a0, b0]), vec![0, 1]);
    }

    #[test]
    fn snat_duplicates_and_precedence() {
        let a = Rule { id: 1, ..ok("snat -o eth1 --to 203.0.113.5") };
        let b = Rule { id: 2, ..ok("snat -o eth1 --to 203.0.113.5") };
        let c = Rule { id: 3, ..ok("snat -o eth0 --to 203.0.113.5") };
        let d = Rule { id: 4, ..ok("masquerade -o eth1") };
        assert!(a.same_match_and_target(&b));
        assert!(!a.same_match_and_target(&c), "another out interface");
        assert!(!a.same_match_and_target(&d), "same match, other target");
        assert_eq!(check_duplicate(&[a.clone(), c.clone()], &b).unwrap_err(), RuleError::Duplicate { of: 1 });
        // -o ranks like -i: after -p, before the prefixes.
        let rules: Vec<Rule> = [
            (1, "masquerade"),
            (2, "masquerade -s 10.0.0.0/8"),
            (3, "masquerade -o eth1"),
            (4, "masquerade -o eth1 -p tcp"),
            (5, "snat -p udp -s 10.1.0.0/16 --to 203.0.113.5"),
        ]
        .iter()
        .map(|(id, s)| Rule { id: *id, ..ok(s) })
        .collect();
        assert_eq!(precedence_order(&rules), vec![3, 4, 2, 1, 0]);
    }

    /// For rules of both families, the key orders exactly as the kernel's rank with its id tie-break: the
    /// iptables export and the eBPF data path pick the same rule.
    #[test]
    fn precedence_key_orders_as_the_kernel() {
        let mut rng = Rng(0x51ed_2701);
        let mut rules = Vec::new();
        while rules.len() < 400 {
            let mut r = random_rule(&mut rng);
            if r.family() == Some(Family::Ipv6) && rng.chance(50) {
                continue;
            }
            if r.family().is_none() && rng.chance(50) {
                r.family = Some(if rng.chance(50) { Family::Ipv4 } else { Family::Ipv6 });
            }
            // Ties on everything but the id, and equal ids too, now and then.
            r.id = if rng.chance(30) { 1 + rng.below(3) as u32 } else { r.id };
            rules.push(r);
        }
        // Rules of each sort: with IPv4 addresses, without any, with -4.
        let with_addrs = rules.iter().filter(|r| r.family.is_none() && r.family().is_some()).count();
        let both = rules.iter().filter(|r| r.family().is_none()).count();
        let restricted = rules.iter().filter(|r| r.family.is_some()).count();
        assert!(with_addrs > 200 && both > 5 && restricted > 5, "{with_addrs} {both} {restricted}");
        let kernel = |r: &Rule| (rank(r), r.id);
        for a in &rules {
            for b in &rules {
                assert_eq!(precedence_key(a).cmp(&precedence_key(b)), kernel(a).cmp(&kernel(b)), "{a} / {b}");
                assert_eq!(precedence_cmp(a, b), kernel(a).cmp(&kernel(b)), "{a} / {b}");
            }
        }
        let mut by_rank: Vec<usize> = (0..rules.len()).collect();
        by_rank.sort_by_key(|&i| kernel(&rules[i]));
        assert_eq!(precedence_order(&rules), by_rank);
    }

    /// IPv6 prefixes order by their whole length, the source's before the destination's as for IPv4, in the key
    /// and in the kernel's rank alike.
    #[test]
    fn ipv6_prefix_lengths_order() {
        let rules: Vec<Rule> = [
            (1, "dnat -p tcp --to 2001:db8::9"),                  // 0: no prefix
            (2, "dnat -p tcp -d 2001:db8::/48 --to 2001:db8::9"), // 1: /48
            (3, "dnat -p tcp -d 2001:db8::/64 --to 2001:db8::9"), // 2: /64
            (4, "dnat -p tcp -d 2001:db8::1 --to 2001:db8::9"),   // 3: /128
            (5, "dnat -p tcp -d 2001:db8::/33 --to 2001:db8::9"), // 4: /33
            (6, "dnat -p tcp -s 2001:db8::/16 --to 2001:db8::9"), // 5: any -s beats any -d
            (7, "dnat -p tcp -s 2001:db8::/64 --to 2001:db8::9"), // 6
            (8, "dnat -p tcp -s 2001:db8::/64 -d 2001:db8::/120 --to 2001:db8::9"), // 7
            (9, "dnat -p tcp ! -d 2001:db8::1 --to 2001:db8::9"), // 8: a negation ranks as none
            (10, "dnat -p tcp -d local --to 2001:db8::9"),        // 9: -d local above none
            (11, "dnat -p tcp -d ::/0 --to 2001:db8::9"),         // 10: /0 is none
        ]
        .iter()
        .map(|(id, s)| Rule { id: *id, ..ok(s) })
        .collect();
        assert_eq!(precedence_order(&rules), vec![7, 6, 5, 3, 2, 1, 4, 9, 0, 8, 10]);
        let (d48, d64, d128, none) = (&rules[1], &rules[2], &rules[3], &rules[0]);
        assert_eq!(precedence_cmp(d64, d48), Ordering::Less, "the longer /64 beats the /48");
        assert_eq!(precedence_cmp(d128, none), Ordering::Less, "-d /128 beats no -d");
        assert_eq!(precedence_cmp(d128, d64), Ordering::Less);
        // Beyond 32 bits of prefix, too.
        assert!(rank(d64) < rank(d48));
        assert!(precedence_key(d64) < precedence_key(d48));
        // The match fields still come first: a port beats any prefix.
        let port = Rule { id: 12, ..ok("dnat -p tcp --dport 80 --to 2001:db8::9") };
        assert_eq!(precedence_cmp(&port, &rules[7]), Ordering::Less);
    }

    struct Packet {
        /// The incoming interface at PREROUTING, the outgoing one at POSTROUTING.
        ifindex: u32,
        proto: u8,
        dport: u16,
        saddr: IpAddr,
        daddr: IpAddr,
    }

    /// What the BPF programs do: walk the hook's classes, look the masked tuple up in the index, lowest rank wins.
    fn kernel_lookup(c: &Compiled, at: u8, pkt: &Packet) -> Option<usize> {
        match (pkt.saddr, pkt.daddr) {
            (IpAddr::V4(_), IpAddr::V4(_)) => lookup_as::<u32>(c, at, pkt),
            _ => lookup_as::<Addr6>(c, at, pkt),
        }
    }

    /// [`kernel_lookup`] of a packet of the family of `A`.
    fn lookup_as<A: crate::loader::CtFamily>(c: &Compiled, at: u8, pkt: &Packet) -> Option<usize> {
        let t = FlowTuple::new(A::of_ip(pkt.saddr), A::of_ip(pkt.daddr), 0, pkt.dport, pkt.proto);
        // The kernel program's own walk (pfwd_common::find_rule), over the compiled maps.
        let index: HashMap<IndexKey, IndexEntry> =
            c.index().iter().map(|(k, slots)| (*k, IndexEntry::from_slots(slots))).collect();
        let wide: HashMap<IndexKey, IndexEntry> =
            index.iter().filter(|(k, _)| k.in_wide_index()).map(|(k, e)| (*k, *e)).collect();
        let rule = |slot: u32| c.entries.get(slot as usize).map(|(_, e)| e);
        let is_local = |a: &Addr6| A::FAMILY == 4 && LOCAL.iter().any(|l| compile::wide(IpAddr::V4(*l)) == *a);
        let classes = &c.classes[at as usize];
        let found = pfwd_common::find_rule(&t, pkt.ifindex, (at, 0), classes, |k| index.get(k), rule, is_local)
            .map(|(slot, _)| slot as usize);
        if A::FAMILY == family::V6 {
            // IPv6 packets probe the wide index, which the loader gives no IPv4 rule's key: the same rule.
            let probed = pfwd_common::find_rule(&t, pkt.ifindex, (at, 0), classes, |k| wide.get(k), rule, is_local)
                .map(|(slot, _)| slot as usize);
            assert_eq!(probed, found, "the wide index without IPv4 rules' keys finds another rule");
        }
        if A::FAMILY == family::V4 {
            // IPv4 packets probe the IPv4 index, whose keys the loader writes as `IndexKey::narrow`: the same rule.
            let index4: HashMap<IndexKey4, IndexEntry> =
                index.iter().filter_map(|(k, e)| Some((k.narrow()?, *e))).collect();
            let narrow =
                pfwd_common::find_rule_keyed(&t, pkt.ifindex, (at, 0), classes, |k| index4.get(k), rule, is_local)
                    .map(|(slot, _)| slot as usize);
            assert_eq!(narrow, found, "the IPv4 index finds another rule");
        }
        found
    }

    /// This host's addresses in the brute-force test (what `-d local` matches).
    const LOCAL: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(192, 168, 0, 1)];

    /// What iptables does with the exported order: the first rule of the hook's chain that matches. `ifname` is
    /// the incoming interface for PREROUTING (`-i`), the outgoing one for POSTROUTING (`-o`).
    fn first_match(rules: &[Rule], order: &[usize], post: bool, ifname: Option<&str>, pkt: &Packet) -> Option<usize> {
        // iptables' `!` inverts a match's result.
        let in_net = |n: &Option<IpNet>, a: IpAddr, not: bool| n.is_none_or(|n| n.contains(&a) != not);
        order.iter().copied().filter(|&i| rules[i].is_postrouting() == post).find(|&i| {
            let r = &rules[i];
            (r.hook_iface().is_none() || (r.hook_iface() == ifname) != r.not.iface)
                && r.proto.is_none_or(|p| p.code() == pkt.proto)
                && r.dport.is_none_or(|d| d.contains(pkt.dport))
                && in_net(&r.src, pkt.saddr, r.not.src)
                && in_net(&r.dst, pkt.daddr, r.not.dst)
                && (!r.dst_local || LOCAL.iter().any(|l| IpAddr::V4(*l) == pkt.daddr))
        })
    }

    #[test]
    fn kernel_lowest_rank_equals_iptables_first_match() {
        // A small value space so rules overlap a lot.
        let ifaces = [None, Some("eth0"), Some("eth1")];
        let nets = [None, Some("10.0.0.0/8"), Some("10.1.0.0/16"), Some("10.1.2.3/32"), Some("10.1.2.0/24")];
        // Ranges that split into many prefix blocks and overlap one another.
        let ranges = [
            None,
            Some("80"),
            Some("81"),
            Some("80-81"),
            Some("79-82"),
            Some("1-100"),
            Some("1-65535"),
            Some("23-65535"),
            Some("100-1000"),
        ];
        let addrs = ["10.1.2.3", "10.1.2.4", "10.2.0.1", "192.168.0.1"].map(ip);
        let mut rng = Rng(7);
        let (mut sets, mut packets, mut matched) = (0, [0; 2], [0; 2]);
        while sets < 300 {
            // Up to 24 rules per hook: SNAT/MASQUERADE rules share ranks with the DNAT rules, interleaved in the
            // list, but live in their own hook.
            let n = 1 + rng.below(48) as usize;
            let mut ids: Vec<u32> = (1..=n as u32).collect();
            for i in (1..n).rev() {
                ids.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let rules: Vec<Rule> = (0..n)
                .map(|i| {
                    let proto = rng.pick(&[None, Some(Proto::Tcp), Some(Proto::Udp)]);
                    let post = i % 2 == 1;
                    let dport = if proto.is_some() { rng.pick(&ranges).map(|s| s.parse().unwrap()) } else { None };
                    let iface = rng.pick(&ifaces).map(String::from);
                    let port = Some(i as u16 + 1).filter(|_| proto.is_some());
                    let target = match (post, rng.chance(50)) {
                        (false, _) => Target::Dnat { addr: ip("192.0.2.1"), port },
                        (true, true) => Target::Snat { addr: ip("192.0.2.1"), ports: port.map(PortRange::single) },
                        (true, false) => Target::Masquerade { ports: port.map(PortRange::single) },
                    };
                    let (src, dst) = (rng.pick(&nets).map(net), rng.pick(&nets).map(net));
                    // iptables' `!` on what the rule has, and `-d local` for some DNAT rules without -d.
                    let not = Negated {
                        src: src.is_some_and(|n| n.prefix_len() > 0) && rng.chance(20),
                        dst: dst.is_some_and(|n| n.prefix_len() > 0) && rng.chance(20),
                        iface: iface.is_some() && rng.chance(20),
                    };
                    Rule {
                        // Ids in another order than the list (ids are unique in any state: the last tie-break).
                        id: ids[i],
                        iface: iface.clone().filter(|_| !post),
                        oface: iface.filter(|_| post),
                        proto,
                        src,
                        dst,
                        dport,
                        local: false,
                        hairpin: None,
                        target,
                        not,
                        dst_local: rng.chance(15),
                        backends: Vec::new(),
                        family: None,
                    }
                })
                .collect();
            let c = match compile(&rules, &ifindex) {
                Ok(c) => c,
                Err(RuleError::IndexFull { .. }) => continue,
                Err(e) => panic!("{e}"),
            };
            sets += 1;
            let order = precedence_order(&rules);
            for _ in 0..200 {
                let proto = rng.pick(&[PROTO_TCP, PROTO_UDP, 1]);
                let dport = rng.pick(&[0, 1, 22, 23, 79, 80, 81, 82, 100, 101, 443, 1000, 1001, 65535]);
                let (saddr, daddr) = (rng.pick(&addrs), rng.pick(&addrs));
                let dport = if proto == 1 { 0 } else { dport };
                for (h, at) in [hook::PREROUTING, hook::POSTROUTING].into_iter().enumerate() {
                    let (ifname, ifx) = rng.pick(&[("eth0", 2), ("eth1", 3)]);
                    let pkt = Packet { ifindex: ifx, proto, dport, saddr, daddr };
                    let post = at == hook::POSTROUTING;
                    let want = first_match(&rules, &order, post, Some(ifname), &pkt);
                    assert_eq!(kernel_lookup(&c, at, &pkt), want, "hook {at}, rules: {rules:#?}");
                    packets[h] += 1;
                    matched[h] += want.is_some() as u32;
                }
            }
        }
        // Guard against a vacuous test: most packets should hit something, in both hooks.
        for h in 0..2 {
            assert!(matched[h] > packets[h] / 2, "hook {h}: {matched:?}/{packets:?}");
        }
    }
}
