//! Precedence: which rule wins when several match (the contract documented in [`super`]), shared by the kernel's
//! rank ([`super::compile`]) and the iptables export's rule order.

use std::cmp::Ordering;

use super::model::{Rule, prefix_len};

/// Order of two rules under the precedence contract (see the module docs): `Less` means `a` wins over `b`.
/// Equal only for rules with the same matches and id (then list order decides).
pub fn precedence_cmp(a: &Rule, b: &Rule) -> Ordering {
    rank(a).cmp(&rank(b))
}

/// The kernel's rank of `r` (lowest wins): the precedence contract packed into 64 bits, most significant first:
/// no `--dport` (1 bit), the port range's width (16), no `-p` (1), no (or a negated) `-i`/`-o` (1), 32 minus the
/// source prefix length (6), 65 minus twice the destination prefix length (plus one for `-d local`) (7), then the
/// rule's id (32). A function of the rule alone, so adding or deleting a rule never re-ranks the others.
pub fn rank(r: &Rule) -> u64 {
    // A negated match is the least specific of its kind (`! -s 10.0.0.0/8` covers nearly everything): it ranks like
    // no match at all. `-d local` ranks just above no `-d` (it is a set of a few addresses, but not one network).
    let src = if r.not.src { 0 } else { prefix_len(r.src) };
    let dst = if r.not.dst { 0 } else { 2 * prefix_len(r.dst) } + u8::from(r.dst_local);
    let specificity = u64::from(r.dport.is_none()) << 31
        | u64::from(r.dport.map_or(0, |p| p.width())) << 15
        | u64::from(r.proto.is_none()) << 14
        // `-o` ranks like `-i`: a rule only ever has the one of its hook.
        | u64::from(r.hook_iface().is_none() || r.not.iface) << 13
        | u64::from(32 - src) << 7
        | u64::from(65 - dst);
    specificity << 32 | u64::from(r.id)
}

/// Indices into `rules`, most specific first (see the module docs). The iptables export emits rules in this order so
/// that its first match is pfwd's choice: ascending [`rank`], the kernel's own order; equal ranks keep list order.
pub fn precedence_order(rules: &[Rule]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rules.len()).collect();
    // Stable sort: equal keys keep list order, which is the documented final tie-break.
    order.sort_by_cached_key(|&i| rank(&rules[i]));
    order
}

#[cfg(test)]
mod tests {

    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    use ipnet::Ipv4Net;
    use pfwd_common::maps::*;

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

    struct Packet {
        /// The incoming interface at PREROUTING, the outgoing one at POSTROUTING.
        ifindex: u32,
        proto: u8,
        dport: u16,
        saddr: Ipv4Addr,
        daddr: Ipv4Addr,
    }

    /// What the BPF programs do: walk the hook's classes, look the masked tuple up in the index, lowest rank wins.
    fn kernel_lookup(c: &Compiled, at: u8, pkt: &Packet) -> Option<usize> {
        let t = Tuple {
            saddr: u32::from_ne_bytes(pkt.saddr.octets()),
            daddr: u32::from_ne_bytes(pkt.daddr.octets()),
            sport: 0,
            dport: pkt.dport,
            proto: pkt.proto,
            _pad: 0,
            _pad2: 0,
        };
        // The kernel program's own walk (pfwd_common::find_rule), over the compiled maps.
        let index: HashMap<IndexKey, IndexEntry> =
            c.index().iter().map(|(k, slots)| (*k, IndexEntry::from_slots(slots))).collect();
        let rule = |slot: u32| c.entries.get(slot as usize).map(|(_, e)| e);
        let is_local = |a: u32| LOCAL.contains(&Ipv4Addr::from(a.to_ne_bytes()));
        let classes = &c.classes[at as usize];
        pfwd_common::find_rule(&t, pkt.ifindex, (at, 0), classes, |k| index.get(k), rule, is_local)
            .map(|(slot, _)| slot as usize)
    }

    /// This host's addresses in the brute-force test (what `-d local` matches).
    const LOCAL: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(192, 168, 0, 1)];

    /// What iptables does with the exported order: the first rule of the hook's chain that matches. `ifname` is
    /// the incoming interface for PREROUTING (`-i`), the outgoing one for POSTROUTING (`-o`).
    fn first_match(rules: &[Rule], order: &[usize], post: bool, ifname: Option<&str>, pkt: &Packet) -> Option<usize> {
        // iptables' `!` inverts a match's result.
        let in_net = |n: &Option<Ipv4Net>, a: Ipv4Addr, not: bool| n.is_none_or(|n| n.contains(&a) != not);
        order.iter().copied().filter(|&i| rules[i].is_postrouting() == post).find(|&i| {
            let r = &rules[i];
            (r.hook_iface().is_none() || (r.hook_iface() == ifname) != r.not.iface)
                && r.proto.is_none_or(|p| p.code() == pkt.proto)
                && r.dport.is_none_or(|d| d.contains(pkt.dport))
                && in_net(&r.src, pkt.saddr, r.not.src)
                && in_net(&r.dst, pkt.daddr, r.not.dst)
                && (!r.dst_local || LOCAL.contains(&pkt.daddr))
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
