//! The nftables export: pfwd's rules as an `nft -f` script in a table of its own, `inet pfwd` (inspection, migration
//! away from pfwd). Same chains and order as the iptables export, in nftables' syntax.

use ipnet::IpNet;

use super::chains::{COMMENT_PREFIX, HAIRPIN_SUFFIX, NAT_HOOKS, NatHook, hook_order};
use crate::rules::model::{Family, fmt_addr_port};
use crate::rules::{Rule, Target, with_companions};

fn nft_net(n: IpNet) -> String {
    let n = n.trunc();
    if n.prefix_len() == n.max_prefix_len() { n.addr().to_string() } else { n.to_string() }
}

/// nft's name of a rule's family in an `inet` table: `ip` or `ip6` (address matches, and the `dnat`/`snat` that
/// must say which family they translate).
fn nft_family(r: &Rule) -> &'static str {
    if r.family() == Some(Family::Ipv6) { "ip6" } else { "ip" }
}

fn nft_iface_set(ifaces: &[String]) -> String {
    let names: Vec<String> = ifaces.iter().map(|i| format!("\"{i}\"")).collect();
    format!("{{ {} }}", names.join(", "))
}

/// A DNAT to several backends: `numgen random` over the total weight, mapped by intervals to the backends (each a
/// share as wide as its weight). Random, like the iptables ladder, in the Maglev table's proportions.
fn nft_backends(r: &Rule) -> String {
    let total: u32 = r.backends.iter().map(|b| b.weight).sum();
    let mut from = 0;
    let mut items = Vec::with_capacity(r.backends.len());
    for b in &r.backends {
        let to = from + b.weight - 1;
        let key = if to == from { from.to_string() } else { format!("{from}-{to}") };
        items.push(match b.port {
            Some(p) => format!("{key} : {} . {p}", b.addr),
            None => format!("{key} : {}", b.addr),
        });
        from = to + 1;
    }
    // Validation keeps a rule's backends all with a port or all without.
    format!("dnat {} to numgen random mod {total} map {{ {} }}", nft_family(r), items.join(", "))
}

/// One rule; `companion`: the masquerade a `--hairpin` rule adds, tagged `pfwd:ID-hairpin`.
fn nft_rule(r: &Rule, companion: bool) -> String {
    let mut s = nft_matches(r);
    s.push(match r.target {
        Target::Dnat { .. } if !r.backends.is_empty() => nft_backends(r),
        _ => nft_action(r),
    });
    s.push(format!("comment \"{}\"", nft_comment(r.id, companion)));
    s.join(" ")
}

/// The interface names among `rules` and `ifaces` that nft cannot take: its strings have no escape for `"` (which the
/// kernel allows in names) and treat `\` specially. Checked before anything is written, so such a name cannot end a
/// string early and add statements of its own.
pub fn check_nft_names<'a>(rules: &'a [Rule], ifaces: &'a [String]) -> Result<(), crate::rules::RuleError> {
    let bad = |n: &str| n.contains(['"', '\\']);
    let named = rules.iter().flat_map(|r| r.iface.iter().chain(r.oface.iter()).map(move |n| (Some(r.id), n)));
    match named.chain(ifaces.iter().map(|n| (None, n))).find(|(_, n)| bad(n)) {
        None => Ok(()),
        Some((id, n)) => Err(crate::rules::RuleError::Unsupported(format!(
            "interface name {n:?}{} cannot be written in an nftables rule (nft strings have no escape for '\"' or \
             '\\'): use --mode iptables for it",
            id.map(|i| format!(" (rule {i})")).unwrap_or_default()
        ))),
    }
}

/// A rule's comment: `pfwd:ID`, or `pfwd:ID-hairpin` for the masquerade a `--hairpin` rule adds.
pub fn nft_comment(id: u32, companion: bool) -> String {
    format!("{COMMENT_PREFIX}{id}{}", if companion { HAIRPIN_SUFFIX } else { "" })
}

/// `dnat ip|ip6 to ADDR[:PORT]` for one of a rule's backends.
pub fn nft_dnat(r: &Rule, addr: std::net::IpAddr, port: Option<u16>) -> String {
    format!("dnat {} to {}", nft_family(r), fmt_addr_port(addr, port.as_ref().map(disp)))
}

/// A rule's translation (for a rule with several backends: to its first; see [`nft_backends`]).
pub fn nft_action(r: &Rule) -> String {
    let fam = nft_family(r);
    match r.target {
        Target::Dnat { addr, port } => nft_dnat(r, addr, port),
        Target::Redirect { port } => format!("redirect to :{port}"),
        Target::Snat { addr, ports } => format!("snat {fam} to {}", fmt_addr_port(addr, ports.as_ref().map(disp))),
        Target::Masquerade { ports: Some(r) } => format!("masquerade to :{r}"),
        Target::Masquerade { ports: None } => "masquerade".to_string(),
    }
}

/// A rule's matches, in nft's syntax for an `inet` table.
pub fn nft_matches(r: &Rule) -> Vec<String> {
    let mut s = Vec::new();
    // iptables' `!` is nft's `!=`.
    let ne = |negated: bool| if negated { "!= " } else { "" };
    if let Some(i) = &r.iface {
        s.push(format!("iifname {}\"{i}\"", ne(r.not.iface)));
    }
    if let Some(o) = &r.oface {
        s.push(format!("oifname {}\"{o}\"", ne(r.not.iface)));
    }
    let fam = nft_family(r);
    if let Some(n) = r.src.filter(|n| n.prefix_len() > 0) {
        s.push(format!("{fam} saddr {}{}", ne(r.not.src), nft_net(n)));
    }
    if let Some(n) = r.dst.filter(|n| n.prefix_len() > 0) {
        s.push(format!("{fam} daddr {}{}", ne(r.not.dst), nft_net(n)));
    }
    // A one-family rule without an address match (`-4`, or only its --to says the family): the table is inet.
    if let Some(f) = r.family()
        && r.src.is_none_or(|n| n.prefix_len() == 0)
        && r.dst.is_none_or(|n| n.prefix_len() == 0)
    {
        s.push(format!("meta nfproto {}", f.key()));
    }
    if r.dst_local {
        // `-m addrtype --dst-type LOCAL`.
        s.push("fib daddr type local".into());
    }
    match (r.proto, r.dport) {
        (Some(p), Some(d)) => s.push(format!("{p} dport {d}")),
        (Some(p), None) => s.push(format!("meta l4proto {p}")),
        (None, _) => {}
    }
    s
}

fn disp<T: std::fmt::Display>(x: &T) -> &dyn std::fmt::Display {
    x
}

/// The same rules as an nftables script in its own table `inet pfwd` (`nft -f FILE`), both families in one table. It starts by creating and
/// deleting the table, so applying it again replaces the previous copy. With `ifaces`, the NAT rules and the
/// invalid-packet drop only apply to those interfaces (incoming for prerouting, outgoing for postrouting), like the
/// iptables jumps; the `--local` rules (chain output) apply to every local connection, whatever the list (an empty
/// list means no NAT at all, as without jumps).
pub fn export_nft(rules: &[Rule], ifaces: Option<&[String]>) -> Result<String, crate::rules::RuleError> {
    check_nft_names(rules, ifaces.unwrap_or_default())?;
    let mut out = format!(
        "# pfwd rules for nftables ({} rules, most specific first). Apply with: nft -f FILE\n\
         # Everything lives in table inet pfwd (IPv4 and IPv6); the next two lines remove a previous copy, so\n\
         # re-applying replaces it.\n\
         table inet pfwd {{}}\n\
         delete table inet pfwd\n\n\
         table inet pfwd {{\n",
        rules.len()
    );
    let (all, owners) = with_companions(rules);
    for hook in NAT_HOOKS {
        // -100 is dstnat's value; nft 1.0.6 refuses the keyword dstnat in the output hook.
        let (name, priority, iface_key) = match hook {
            NatHook::Prerouting => ("prerouting", "dstnat", Some("iifname")),
            NatHook::Postrouting => ("postrouting", "srcnat", Some("oifname")),
            NatHook::Output => ("output", "-100", None),
        };
        out.push_str(&format!("\tchain {name} {{\n\t\ttype nat hook {name} priority {priority}; policy accept;\n"));
        match (ifaces, iface_key) {
            (None, _) => {}
            // nft has no empty anonymous sets; an unconditional accept means "no NAT" like having no jumps.
            (Some([]), _) => out.push_str("\t\taccept comment \"pfwd: no interfaces\"\n"),
            // accept ends this chain only: the packet goes on un-NATed, like iptables without a jump for it.
            (Some(list), Some(key)) => out.push_str(&format!("\t\t{key} != {} accept\n", nft_iface_set(list))),
            // Like the single OUTPUT jump: local connections are not tied to an attached interface.
            (Some(_), None) => {}
        }
        for i in hook_order(&all, hook) {
            out.push_str(&format!("\t\t{}\n", nft_rule(&all[i], owners[i].is_some())));
        }
        out.push_str("\t}\n\n");
    }
    out.push_str("\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n");
    match ifaces {
        None => out.push_str("\t\tct state invalid drop\n"),
        Some([]) => {}
        Some(list) => {
            let set = nft_iface_set(list);
            out.push_str(&format!(
                "\t\tiifname {set} ct state invalid drop\n\t\toifname {set} ct state invalid drop\n"
            ));
        }
    }
    out.push_str("\t}\n}\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::tests::{local_sample, post_sample, sample, with_id, with_local, with_post};

    #[test]
    fn nft_export_format() {
        let mut rules = sample();
        rules.push(with_id(6, "redirect -p udp --to-port 53"));
        rules.push(with_id(7, "dnat -p tcp -s 10.9.0.0/16 --to 10.0.2.9:22"));
        let text = export_nft(&rules, None).unwrap();
        // One inet table for both families: a rule whose only address is its --to says its family with
        // `meta nfproto`, the REDIRECTs (no address) apply to both.
        let want = "table inet pfwd {}\n\
                    delete table inet pfwd\n\n\
                    table inet pfwd {\n\
                    \tchain prerouting {\n\
                    \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
                    \t\tiifname \"eth0\" meta nfproto ipv4 tcp dport 59999 dnat ip to 127.0.0.1:17355 comment \"pfwd:4\"\n\
                    \t\tip saddr 192.168.1.0/24 udp dport 53 dnat ip to 10.0.2.3:5353 comment \"pfwd:5\"\n\
                    \t\ttcp dport 80 redirect to :3000 comment \"pfwd:1\"\n\
                    \t\tmeta nfproto ipv4 tcp dport 8000-8099 dnat ip to 10.0.2.2 comment \"pfwd:3\"\n\
                    \t\tip saddr 10.9.0.0/16 meta l4proto tcp dnat ip to 10.0.2.9:22 comment \"pfwd:7\"\n\
                    \t\tmeta l4proto udp redirect to :53 comment \"pfwd:6\"\n\
                    \t\tip daddr 203.0.113.10 dnat ip to 10.0.2.2 comment \"pfwd:2\"\n\
                    \t}\n\n\
                    \tchain postrouting {\n\
                    \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
                    \t}\n\n\
                    \tchain output {\n\
                    \t\ttype nat hook output priority -100; policy accept;\n\
                    \t}\n\n\
                    \tchain forward {\n\
                    \t\ttype filter hook forward priority filter; policy accept;\n\
                    \t\tct state invalid drop\n\
                    \t}\n\
                    }\n";
        assert!(text.starts_with("# pfwd rules for nftables (7 rules"), "{text}");
        assert!(text.ends_with(want), "{text}");
        let ifaces = vec!["eth0".to_string(), "wg0".to_string()];
        let text = export_nft(&rules, Some(&ifaces)).unwrap();
        assert!(text.contains(
            "policy accept;\n\t\tiifname != { \"eth0\", \"wg0\" } accept\n\t\tiifname \"eth0\" meta nfproto ipv4 tcp"
        ));
        assert!(text.contains(
            "\t\tiifname { \"eth0\", \"wg0\" } ct state invalid drop\n\t\toifname { \"eth0\", \"wg0\" } ct state invalid drop\n"
        ));
    }

    /// A `"` in an interface name would end nft's string and let the rest of the name be statements (found in
    /// review: `! -i 'y"drop#'` became `iifname != "y" drop`): refused, naming the rule, before anything is written.
    #[test]
    fn names_nft_cannot_quote_are_refused() {
        let r = Rule { iface: Some("y\"drop#".into()), ..with_id(7, "dnat -i eth0 -p tcp --dport 81 --to 10.0.2.2") };
        let e = export_nft(&[r], None).unwrap_err().to_string();
        assert!(e.contains("interface name \"y\\\"drop#\" (rule 7) cannot be written in an nftables rule"), "{e}");
        let e = check_nft_names(&[], &["a\\b".to_string()]).unwrap_err().to_string();
        assert!(e.contains("use --mode iptables"), "{e}");
        check_nft_names(&sample(), &["eth0".to_string(), "veth-a.1".to_string()]).unwrap();
    }

    #[test]
    fn postrouting_nft_format() {
        let ifaces = vec!["eth0".to_string()];
        let nft = export_nft(&with_post(), Some(&ifaces)).unwrap();
        let want = "\tchain postrouting {\n\
                    \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
                    \t\toifname != { \"eth0\" } accept\n\
                    \t\toifname \"eth0\" ip saddr 10.0.2.0/24 meta l4proto tcp snat ip to 203.0.113.5:20000-20099 comment \"pfwd:7\"\n\
                    \t\toifname \"wg0\" meta l4proto udp masquerade to :1024-1027 comment \"pfwd:8\"\n\
                    \t\tmeta nfproto ipv4 meta l4proto tcp snat ip to 203.0.113.7:5000 comment \"pfwd:10\"\n\
                    \t\toifname \"eth0\" masquerade comment \"pfwd:6\"\n\
                    \t\tip daddr 198.51.100.0/24 snat ip to 203.0.113.6 comment \"pfwd:9\"\n\
                    \t}\n\n\
                    \tchain output {\n";
        assert!(nft.contains(want), "{nft}");
        // No POSTROUTING rule ever lands in the prerouting chain, and vice versa.
        let prerouting = &nft[nft.find("chain prerouting").unwrap()..nft.find("chain postrouting").unwrap()];
        assert!(!prerouting.contains("snat") && !prerouting.contains("masquerade"), "{prerouting}");
        assert_eq!(prerouting.matches("comment \"pfwd:").count(), sample().len());
        assert!(
            export_nft(&post_sample(), Some(&[]))
                .unwrap()
                .contains("priority srcnat; policy accept;\n\t\taccept comment \"pfwd: no interfaces\"\n")
        );
    }

    #[test]
    fn local_nft_format() {
        let ifaces = vec!["eth0".to_string(), "wg0".to_string()];
        let nft = export_nft(&with_local(), Some(&ifaces)).unwrap();
        let want = "\tchain output {\n\
                    \t\ttype nat hook output priority -100; policy accept;\n\
                    \t\tip daddr 198.51.100.13 tcp dport 1111 dnat ip to 127.0.0.1:80 comment \"pfwd:11\"\n\
                    \t\ttcp dport 8080 redirect to :80 comment \"pfwd:12\"\n\
                    \t\tmeta nfproto ipv4 udp dport 5000-5009 dnat ip to 10.0.2.4 comment \"pfwd:14\"\n\
                    \t\tmeta l4proto udp redirect to :53 comment \"pfwd:15\"\n\
                    \t\tip daddr 198.51.100.0/24 dnat ip to 10.0.2.13 comment \"pfwd:13\"\n\
                    \t}\n\n\
                    \tchain forward {\n";
        assert!(nft.contains(want), "{nft}");
        // Not filtered by interface (no accept line), the same without an interface list.
        assert!(export_nft(&with_local(), None).unwrap().contains(want));
        let prerouting = &nft[nft.find("chain prerouting").unwrap()..nft.find("chain postrouting").unwrap()];
        assert_eq!(prerouting.matches("comment \"pfwd:").count(), sample().len(), "{prerouting}");
        // No interfaces: no NAT at all, local connections included (like iptables without jumps).
        assert!(
            export_nft(&local_sample(), Some(&[]))
                .unwrap()
                .contains("priority -100; policy accept;\n\t\taccept comment \"pfwd: no interfaces\"\n")
        );
    }

    /// Negations and `-d local` (they were dropped: `! -s NET` came out as `ip saddr NET`).
    #[test]
    fn negation_and_dst_local_nft() {
        let rules = vec![
            with_id(1, "dnat ! -i eth1 -p tcp -d local --dport 81 --to 10.0.2.3"),
            with_id(2, "dnat ! -s 10.0.0.0/8 ! -d 203.0.113.1 --to 10.0.2.2"),
            with_id(3, "masquerade ! -o eth0 -s 172.17.0.0/16"),
        ];
        let nft = export_nft(&rules, None).unwrap();
        assert!(
            nft.contains(
                "\t\tiifname != \"eth1\" meta nfproto ipv4 fib daddr type local tcp dport 81 dnat ip to 10.0.2.3"
            ),
            "{nft}"
        );
        assert!(nft.contains("\t\tip saddr != 10.0.0.0/8 ip daddr != 203.0.113.1 dnat ip to 10.0.2.2"), "{nft}");
        assert!(nft.contains("\t\toifname != \"eth0\" ip saddr 172.17.0.0/16 masquerade"), "{nft}");
    }

    #[test]
    fn backends_nft() {
        let rules = vec![
            with_id(3, "dnat -p tcp --dport 80 --to 10.0.2.2:8080,10.0.2.3:8080@2,10.0.2.4:8080"),
            with_id(4, "dnat -d 203.0.113.9 --to 10.0.2.2,10.0.2.3"),
        ];
        let nft = export_nft(&rules, None).unwrap();
        assert!(
            nft.contains(
                "\t\tmeta nfproto ipv4 tcp dport 80 dnat ip to numgen random mod 4 map { 0 : 10.0.2.2 . 8080, 1-2 : \
                 10.0.2.3 . 8080, 3 : 10.0.2.4 . 8080 } comment \"pfwd:3\"\n"
            ),
            "{nft}"
        );
        assert!(nft.contains(
            "\t\tip daddr 203.0.113.9 dnat ip to numgen random mod 2 map { 0 : 10.0.2.2, 1 : 10.0.2.3 } comment \"pfwd:4\"\n"
        ), "{nft}");
    }

    #[test]
    fn hairpin_nft() {
        let rules = vec![with_id(2, "dnat -p udp -d 203.0.113.10 --dport 53 --to 10.0.2.3 --hairpin 10.0.2.0/24")];
        let nft = export_nft(&rules, None).unwrap();
        assert!(
            nft.contains("\t\tip daddr 203.0.113.10 udp dport 53 dnat ip to 10.0.2.3 comment \"pfwd:2\"\n"),
            "{nft}"
        );
        assert!(
            nft.contains(
                "priority srcnat; policy accept;\n\t\tip saddr 10.0.2.0/24 ip daddr 10.0.2.3 meta l4proto udp masquerade \
                 comment \"pfwd:2-hairpin\"\n\t}"
            ),
            "{nft}"
        );
    }

    /// IPv6 rules in the inet table: `ip6` matches, `dnat ip6 to [ADDR]:PORT`, `meta nfproto` for a rule of one
    /// family without an address match; rules for both families have neither.
    #[test]
    fn ipv6_nft() {
        let rules = vec![
            with_id(1, "dnat -p tcp -d 2001:db8::10 --dport 80 --to [2001:db8::2]:8080"),
            with_id(2, "redirect -6 -p tcp --dport 8080 --to-port 3000"),
            with_id(3, "redirect -p tcp --dport 8081 --to-port 3001"),
            with_id(4, "dnat -p tcp --dport 443 --to [2001:db8::2]:8443,[2001:db8::3]:8443@2"),
            with_id(5, "dnat ! -s fd00::/8 -d 2001:db8::/64 --to 2001:db8::2,2001:db8::3"),
            with_id(6, "dnat -p udp -d 2001:db8::10 --dport 53 --to 2001:db8::3 --hairpin 2001:db8:2::/64"),
            with_id(7, "snat -o eth1 -p tcp -s fd00::/64 --to [2001:db8::1]:20000-20099"),
            with_id(8, "masquerade -6 -o eth1"),
            with_id(9, "masquerade -4 -o eth1"),
            with_id(10, "snat -o eth1 --to 2001:db8::1"),
            with_id(11, "dnat --local -p tcp -d 2001:db8::10 --dport 8080 --to [::1]:80"),
        ];
        let nft = export_nft(&rules, None).unwrap();
        let chain = |name: &str| {
            let start = nft.find(&format!("chain {name} {{")).unwrap();
            let body = &nft[start..start + nft[start..].find("\t}").unwrap()];
            body.lines().skip(2).map(|l| l.trim().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(
            chain("prerouting"),
            [
                "ip6 daddr 2001:db8::10 tcp dport 80 dnat ip6 to [2001:db8::2]:8080 comment \"pfwd:1\"",
                "ip6 daddr 2001:db8::10 udp dport 53 dnat ip6 to 2001:db8::3 comment \"pfwd:6\"",
                "meta nfproto ipv6 tcp dport 8080 redirect to :3000 comment \"pfwd:2\"",
                "tcp dport 8081 redirect to :3001 comment \"pfwd:3\"",
                "meta nfproto ipv6 tcp dport 443 dnat ip6 to numgen random mod 3 map { 0 : 2001:db8::2 . 8443, 1-2 : \
                 2001:db8::3 . 8443 } comment \"pfwd:4\"",
                "ip6 saddr != fd00::/8 ip6 daddr 2001:db8::/64 dnat ip6 to numgen random mod 2 map { 0 : 2001:db8::2, \
                 1 : 2001:db8::3 } comment \"pfwd:5\"",
            ]
        );
        assert_eq!(
            chain("postrouting"),
            [
                "oifname \"eth1\" ip6 saddr fd00::/64 meta l4proto tcp snat ip6 to [2001:db8::1]:20000-20099 comment \
                 \"pfwd:7\"",
                "ip6 saddr 2001:db8:2::/64 ip6 daddr 2001:db8::3 meta l4proto udp masquerade comment \"pfwd:6-hairpin\"",
                "oifname \"eth1\" meta nfproto ipv6 masquerade comment \"pfwd:8\"",
                "oifname \"eth1\" meta nfproto ipv4 masquerade comment \"pfwd:9\"",
                "oifname \"eth1\" meta nfproto ipv6 snat ip6 to 2001:db8::1 comment \"pfwd:10\"",
            ]
        );
        assert_eq!(chain("output"), ["ip6 daddr 2001:db8::10 tcp dport 8080 dnat ip6 to [::1]:80 comment \"pfwd:11\""]);
        assert!(nft.contains("\n\t\tct state invalid drop\n"), "both families' invalid packets: {nft}");
    }
}
