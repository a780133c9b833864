//! Live translations chosen by a filter, in both modes: `pfwd conntrack --flush` and `pfwd del --flows` end them, so
//! the current rules decide the next packet of those flows (like `conntrack -D` / `conntrack -F` after an iptables
//! rule change).
//!
//! A flow is matched on its original tuple (as it first arrived: `-s`, `-d`, `-p`, `--dport`) and on the rule that
//! translated it (`--rule`). In eBPF mode the entry records its rule. netfilter's conntrack does not, so in iptables
//! mode a translated connection belongs to a pfwd rule when the rule's match covers the original tuple and its target
//! explains the translation (see [`rule_of`]); connections no pfwd rule explains are never touched.

use std::net::IpAddr;

use ipnet::IpNet;
use pfwd_common::{CtEntryOf, FlowTuple as CtTuple, PROTO_TCP, PROTO_UDP, dir};

use crate::loader::CtFamily;
use crate::report::{ConntrackEntry, FlowTuple, Nat};
use crate::rules::model::Family;
use crate::rules::{PortRange, Proto, Rule, Target, precedence_order};

/// Which flows to end. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// Only flows translated by one of these rules.
    pub rules: Option<Vec<u32>>,
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub proto: Option<Proto>,
    pub dport: Option<PortRange>,
}

impl FlowFilter {
    /// Does a flow whose first packet was `proto src -> dst:dport` pass the tuple part of the filter?
    fn matches_tuple(&self, proto: u8, src: IpAddr, dst: IpAddr, dport: u16) -> bool {
        self.src.is_none_or(|n| n.contains(&src))
            && self.dst.is_none_or(|n| n.contains(&dst))
            && self.proto.is_none_or(|p| p.code() == proto)
            && self.dport.is_none_or(|r| (proto == PROTO_TCP || proto == PROTO_UDP) && r.contains(dport))
    }

    fn matches_rule(&self, rule: Option<u32>) -> bool {
        match (&self.rules, rule) {
            (None, _) => true,
            (Some(ids), Some(id)) => ids.contains(&id),
            (Some(_), None) => false,
        }
    }
}

/// eBPF mode: the conntrack keys to delete (both directions of each chosen flow) and the number of live flows among
/// them. `rule_id` maps an entry's rule slot to the rule's id (None for a slot no rule holds any more).
pub fn ebpf_select<A: CtFamily>(
    entries: &[(CtTuple<A>, CtEntryOf<A>)],
    rule_id: impl Fn(u32) -> Option<u32>,
    live: impl Fn(&CtEntryOf<A>) -> bool,
    filter: &FlowFilter,
) -> (Vec<CtTuple<A>>, usize) {
    let mut keys = Vec::new();
    let mut flows = 0;
    for (key, e) in entries {
        // Each flow has one original-direction entry; its key is the tuple as the flow's first packet had it.
        if e.dir != dir::ORIGINAL
            || !filter.matches_tuple(key.proto, key.saddr.ip(), key.daddr.ip(), key.dport)
            || !filter.matches_rule(rule_id(e.rule_slot))
        {
            continue;
        }
        keys.push(*key);
        keys.push(e.xlat.reversed());
        flows += live(e) as usize;
    }
    (keys, flows)
}

fn addr_of(a: Option<IpAddr>) -> Option<IpAddr> {
    a
}

fn proto_code(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(PROTO_TCP),
        "udp" => Some(PROTO_UDP),
        "icmp" => Some(1),
        "icmpv6" => Some(58),
        _ => name.parse().ok(),
    }
}

/// iptables mode: the pfwd rule behind a netfilter translation, if any. Rules are tried in precedence order (the
/// order of pfwd's chains, so the first that explains the entry is the one netfilter used, as long as the rules have
/// not changed since): DNAT/REDIRECT rules for a destination translation, SNAT/MASQUERADE rules for a source one.
/// Interfaces are not compared (conntrack does not record them).
pub fn rule_of(e: &ConntrackEntry, rules: &[Rule]) -> Vec<u32> {
    let (Some(proto), Some(src), Some(dst)) = (proto_code(&e.proto), addr_of(e.original.src), addr_of(e.original.dst))
    else {
        return vec![];
    };
    let dport = e.original.dport.unwrap_or(0);
    let locals = crate::netif::local_addrs();
    let covers = |r: &Rule| {
        // A rule of the other family never translated this connection (an IPv6 address is "not in" an IPv4 `! -s`).
        r.applies_to(Family::of(src))
            && r.proto.is_none_or(|p| p.code() == proto)
            && r.src.is_none_or(|n| n.contains(&src) != r.not.src)
            && r.dst.is_none_or(|n| n.contains(&dst) != r.not.dst)
            && (!r.dst_local || locals.contains(&dst))
            && r.dport.is_none_or(|d| d.contains(dport))
    };
    let t: &FlowTuple = &e.translated;
    let explains = |r: &Rule| match r.target {
        // Any of its backends (the first is the target).
        Target::Dnat { .. } => r
            .dnat_backends()
            .iter()
            .any(|b| addr_of(t.dst) == Some(b.addr) && t.dport == Some(b.port.unwrap_or(dport)) && e.nat != Nat::Snat),
        Target::Redirect { port } => t.dport == Some(port) && e.nat != Nat::Snat,
        Target::Snat { addr, ports } => {
            addr_of(t.src) == Some(addr)
                && ports.is_none_or(|p| t.sport.is_some_and(|s| p.contains(s) || Some(s) == e.original.sport))
                && e.nat != Nat::Dnat
        }
        Target::Masquerade { .. } => t.src != e.original.src && e.nat != Nat::Dnat,
    };
    let mut ids = Vec::new();
    // One destination rule and one source rule at most: the first of each hook that explains the entry.
    for post in [false, true] {
        let hit = precedence_order(rules)
            .into_iter()
            .map(|i| &rules[i])
            .filter(|r| r.is_postrouting() == post)
            .find(|r| covers(r) && explains(r));
        ids.extend(hit.map(|r| r.id));
    }
    ids
}

/// iptables mode: the translated connections the filter chooses, given netfilter's list and pfwd's rules.
pub fn iptables_select(entries: Vec<ConntrackEntry>, rules: &[Rule], filter: &FlowFilter) -> Vec<ConntrackEntry> {
    entries
        .into_iter()
        .filter(|e| {
            let ids = rule_of(e, rules);
            let (Some(proto), Some(src), Some(dst)) =
                (proto_code(&e.proto), addr_of(e.original.src), addr_of(e.original.dst))
            else {
                return false;
            };
            // Only pfwd's translations: an entry no rule explains is someone else's.
            !ids.is_empty()
                && filter.matches_tuple(proto, src, dst, e.original.dport.unwrap_or(0))
                && (filter.rules.is_none() || ids.iter().any(|id| filter.matches_rule(Some(*id))))
        })
        .collect()
}

/// `conntrack -D` arguments that delete exactly this connection (its original tuple).
pub fn conntrack_delete_args(e: &ConntrackEntry) -> Vec<String> {
    let mut args = vec!["-D".to_string(), "-p".into(), e.proto.clone()];
    let o = &e.original;
    // The tool looks in the IPv4 table unless told otherwise.
    if o.src.is_some_and(|a| a.is_ipv6()) {
        args.extend(["-f".into(), "ipv6".into()]);
    }
    if let Some(s) = o.src {
        args.extend(["--orig-src".into(), s.to_string()]);
    }
    if let Some(d) = o.dst {
        args.extend(["--orig-dst".into(), d.to_string()]);
    }
    match e.proto.as_str() {
        "tcp" | "udp" => {
            if let Some(p) = o.sport {
                args.extend(["--orig-port-src".into(), p.to_string()]);
            }
            if let Some(p) = o.dport {
                args.extend(["--orig-port-dst".into(), p.to_string()]);
            }
        }
        // An echo request's identifier (pfwd lists it as both ports).
        "icmp" => {
            if let Some(id) = o.sport {
                args.extend(["--icmp-type".into(), "8".into(), "--icmp-code".into(), "0".into()]);
                args.extend(["--icmp-id".into(), id.to_string()]);
            }
        }
        _ => {}
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::parse_rule;

    fn rule(id: u32, s: &str) -> Rule {
        Rule { id, ..parse_rule(&s.split_whitespace().collect::<Vec<_>>()).unwrap() }
    }

    fn entry(proto: &str, o: (&str, u16, &str, u16), t: (&str, u16, &str, u16), nat: Nat) -> ConntrackEntry {
        let ft = |(s, sp, d, dp): (&str, u16, &str, u16)| FlowTuple {
            src: Some(s.parse().unwrap()),
            sport: Some(sp),
            dst: Some(d.parse().unwrap()),
            dport: Some(dp),
        };
        let (original, translated) = (ft(o), ft(t));
        let reply =
            FlowTuple { src: translated.dst, sport: translated.dport, dst: translated.src, dport: translated.sport };
        ConntrackEntry {
            age_s: None,
            expires_in_s: None,
            idle_s: None,
            nat,
            original,
            proto: proto.into(),
            reply,
            rule: None,
            state: None,
            translated,
        }
    }

    #[test]
    fn netfilter_entries_are_attributed_by_match_and_target() {
        let rules = vec![
            rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000"),
            rule(2, "dnat -p tcp --dport 8080 -s 10.0.1.0/24 --to 10.0.2.3"),
            rule(3, "redirect -p udp --dport 53 --to-port 5353"),
            rule(4, "masquerade -o eth1"),
            rule(5, "snat -p udp --to 203.0.113.5:20000-20099"),
        ];
        let dnat = entry("tcp", ("10.0.9.9", 4000, "10.0.1.1", 8080), ("10.0.9.9", 4000, "10.0.2.2", 9000), Nat::Dnat);
        assert_eq!(rule_of(&dnat, &rules), [1]);
        // The more specific rule 2 covers 10.0.1.0/24 and explains this one (port kept).
        let dnat2 = entry("tcp", ("10.0.1.2", 4000, "10.0.1.1", 8080), ("10.0.1.2", 4000, "10.0.2.3", 8080), Nat::Dnat);
        assert_eq!(rule_of(&dnat2, &rules), [2]);
        let redir = entry("udp", ("10.0.1.2", 999, "10.0.1.1", 53), ("10.0.1.2", 999, "10.0.1.1", 5353), Nat::Dnat);
        assert_eq!(rule_of(&redir, &rules), [3]);
        let masq = entry("tcp", ("10.0.1.2", 999, "8.8.8.8", 53), ("10.0.2.1", 999, "8.8.8.8", 53), Nat::Snat);
        assert_eq!(rule_of(&masq, &rules), [4]);
        let snat = entry("udp", ("10.0.1.2", 999, "8.8.8.8", 53), ("203.0.113.5", 20001, "8.8.8.8", 53), Nat::Snat);
        assert_eq!(rule_of(&snat, &rules), [5]);
        let both =
            entry("tcp", ("10.0.9.9", 4000, "10.0.1.1", 8080), ("10.0.2.1", 4000, "10.0.2.2", 9000), Nat::DnatSnat);
        assert_eq!(rule_of(&both, &rules), [1, 4]);
        // Someone else's translation (a DNAT to an address no rule names) is not pfwd's.
        let other = entry("tcp", ("10.0.9.9", 4000, "10.0.1.1", 8080), ("10.0.9.9", 4000, "10.7.7.7", 80), Nat::Dnat);
        assert!(rule_of(&other, &rules).is_empty());

        let all = vec![dnat.clone(), dnat2.clone(), redir.clone(), other.clone()];
        let by_rule = FlowFilter { rules: Some(vec![1]), ..Default::default() };
        assert_eq!(iptables_select(all.clone(), &rules, &by_rule), std::slice::from_ref(&dnat));
        let by_src = FlowFilter { src: Some("10.0.1.0/24".parse().unwrap()), ..Default::default() };
        assert_eq!(iptables_select(all.clone(), &rules, &by_src), [dnat2.clone(), redir.clone()]);
        let by_port = FlowFilter { proto: Some(Proto::Udp), dport: Some(PortRange::single(53)), ..Default::default() };
        assert_eq!(iptables_select(all.clone(), &rules, &by_port), [redir]);
        // No filter: every pfwd translation, never the foreign one.
        assert_eq!(iptables_select(all, &rules, &FlowFilter::default()).len(), 3);
    }

    /// A rule of one family never explains a connection of the other (found in review: an IPv6 masquerade was put
    /// on a `masquerade -4` rule, and an IPv4 `! -s` rule "covered" every IPv6 connection).
    #[test]
    fn netfilter_entries_are_attributed_within_their_family() {
        let rules = vec![
            rule(1, "masquerade -4 -o eth0"),
            rule(2, "masquerade -6 -o eth1"),
            rule(3, "dnat ! -s 10.0.0.0/8 -p tcp --dport 80 --to 10.0.2.2"),
            rule(4, "redirect -p tcp --dport 80 --to-port 3000"),
        ];
        let masq6 =
            entry("tcp", ("fd00::2", 999, "2001:db8::9", 53), ("2001:db8:2::1", 999, "2001:db8::9", 53), Nat::Snat);
        assert_eq!(rule_of(&masq6, &rules), [2]);
        let masq4 = entry("tcp", ("10.0.1.2", 999, "8.8.8.8", 53), ("10.0.2.1", 999, "8.8.8.8", 53), Nat::Snat);
        assert_eq!(rule_of(&masq4, &rules), [1]);
        // Rule 3 (IPv4) does not cover an IPv6 client; the redirect for both families explains it.
        let redir6 = entry(
            "tcp",
            ("2001:db8:1::2", 4000, "2001:db8:1::1", 80),
            ("2001:db8:1::2", 4000, "2001:db8:1::1", 3000),
            Nat::Dnat,
        );
        assert_eq!(rule_of(&redir6, &rules), [4]);
        let icmp6 = proto_code("icmpv6");
        assert_eq!(icmp6, Some(58));
    }

    #[test]
    fn ebpf_selection_takes_both_directions() {
        let t = |s: [u8; 4], sp, d: [u8; 4], dp| {
            pfwd_common::Tuple::new(u32::from_ne_bytes(s), u32::from_ne_bytes(d), sp, dp, PROTO_TCP)
        };
        let orig = t([10, 0, 1, 2], 4000, [10, 0, 1, 1], 8080);
        let xlat = t([10, 0, 1, 2], 4000, [10, 0, 2, 2], 9000);
        let e = |d, slot, x: pfwd_common::Tuple| pfwd_common::CtEntry {
            xlat: x,
            rule_slot: slot,
            dir: d,
            ..Default::default()
        };
        let entries = vec![(orig, e(dir::ORIGINAL, 7, xlat)), (xlat.reversed(), e(dir::REPLY, 7, orig.reversed()))];
        let id = |slot| (slot == 7).then_some(1);
        let (keys, n) = ebpf_select(&entries, id, |_| true, &FlowFilter::default());
        assert_eq!((keys, n), (vec![orig, xlat.reversed()], 1));
        let other_rule = FlowFilter { rules: Some(vec![2]), ..Default::default() };
        assert_eq!(ebpf_select(&entries, id, |_| true, &other_rule).1, 0);
        let by_dst = FlowFilter { dst: Some("10.0.1.1/32".parse().unwrap()), ..Default::default() };
        assert_eq!(ebpf_select(&entries, id, |_| true, &by_dst).1, 1, "filters see the original tuple");
        let translated_dst = FlowFilter { dst: Some("10.0.2.2/32".parse().unwrap()), ..Default::default() };
        assert_eq!(ebpf_select(&entries, id, |_| true, &translated_dst).1, 0);
    }
}
