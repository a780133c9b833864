//! The iptables export: pfwd's rules as `iptables-restore` input, for the iptables fallback data path
//! ([`nat_chain_script`]) and for users ([`export_iptables`]).
//!
//! DNAT/REDIRECT rules go into `PFWD-PREROUTING`, SNAT/MASQUERADE rules into `PFWD-POSTROUTING`, `--local`
//! DNAT/REDIRECT rules (connections made by local processes) into `PFWD-OUTPUT`, each in precedence order, which makes
//! iptables' first match the rule pfwd itself would pick. Each rule carries `-m comment --comment "pfwd:ID"`, placed
//! where `iptables-save` prints it (after the matches, before `-j`), so counters can be mapped back to rule ids.

use ipnet::IpNet;

use super::chains::{
    CHAINS, COMMENT_PREFIX, FORWARD_CHAIN, HAIRPIN_SUFFIX, Hook, NatHook, PfwdChain, hook_order, hook_rules,
};
use crate::rules::model::{Family, fmt_addr_port};
use crate::rules::{Rule, Target, with_companions};

/// The tables holding pfwd chains, in [`CHAINS`] order.
fn tables() -> Vec<&'static str> {
    let mut tables = Vec::new();
    for c in CHAINS {
        if !tables.contains(&c.table) {
            tables.push(c.table);
        }
    }
    tables
}

/// A prefix as `iptables-save` prints it (`10.0.0.1/32`); `/0` matches everything and iptables-save omits it.
fn ipt_net(n: Option<IpNet>) -> Option<String> {
    n.filter(|n| n.prefix_len() > 0).map(|n| n.trunc().to_string())
}

/// The prefix that matches every address of the rule's family, as iptables-save prints it.
fn any_net(r: &Rule) -> &'static str {
    if r.family() == Some(Family::Ipv6) { "::/0" } else { "0.0.0.0/0" }
}

/// A word of an `iptables-restore` line: as is, or double-quoted when it holds a character that either reader would
/// take for syntax (a quote, a backslash, `#`). iptables-restore and pfwd's import both read `"..."` with `\\` and
/// `\"` escapes; unquoted, iptables-restore takes a backslash literally where the import (which also reads shell
/// commands) takes it as an escape. Interface names are the only such words: the kernel refuses only `/`, `:` and
/// whitespace in them.
pub(super) fn restore_word(word: &str) -> String {
    if !word.contains(['"', '\'', '\\', '#']) {
        return word.to_string();
    }
    format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `--probability P` as `iptables-save` prints it: iptables keeps P in 31 bits and prints 11 decimals.
fn probability(p: f64) -> String {
    let fixed = (p * f64::from(0x8000_0000u32)).round();
    format!("{:.11}", fixed / f64::from(0x8000_0000u32))
}

/// A DNAT rule with several backends as iptables' `-m statistic --mode random` ladder, one line per backend (each
/// tagged with the rule's id): line `k` takes its backend's weight over the weight of the backends from `k` on, the
/// last takes what is left. `matches` is the rule's match part, `comment` its comment match. New connections are
/// spread at random in the same proportions as the kernel's Maglev table spreads them by hash (netfilter's
/// conntrack then keeps each connection with its backend, as pfwd's does).
fn ladder(r: &Rule, matches: &str, comment: &str) -> Vec<String> {
    let mut left: u32 = r.backends.iter().map(|b| b.weight).sum();
    let last = r.backends.len() - 1;
    r.backends
        .iter()
        .enumerate()
        .map(|(k, b)| {
            let stat = if k == last {
                String::new()
            } else {
                format!(
                    "-m statistic --mode random --probability {} ",
                    probability(f64::from(b.weight) / f64::from(left))
                )
            };
            left -= b.weight;
            let to = fmt_addr_port(b.addr, b.port.as_ref().map(|p| p as &dyn std::fmt::Display));
            let sep = if matches.is_empty() { "" } else { " " };
            format!("{matches}{sep}{stat}{comment} -j DNAT --to-destination {to}")
        })
        .collect()
}

/// One rule in `iptables-save` canonical form, without the leading `-A CHAIN`: one line, or for a DNAT rule with
/// several backends one line per backend ([`ladder`]). `companion`: the rule is the one a `--hairpin` rule adds,
/// tagged `pfwd:ID-hairpin` (its connections are counted by the rule's own line).
fn rule_spec(r: &Rule, companion: bool) -> Vec<String> {
    let mut s = Vec::new();
    // iptables-save's form of a negation: `! -s NET`.
    let bang = |negated: bool| if negated { "! " } else { "" };
    match ipt_net(r.src) {
        Some(n) => s.push(format!("{}-s {n}", bang(r.not.src))),
        // `! -s 0.0.0.0/0` matches nothing; iptables-save prints it with the /0.
        None if r.not.src => s.push(format!("! -s {}", any_net(r))),
        None => {}
    }
    match ipt_net(r.dst) {
        Some(n) => s.push(format!("{}-d {n}", bang(r.not.dst))),
        None if r.not.dst => s.push(format!("! -d {}", any_net(r))),
        None => {}
    }
    if let Some(i) = &r.iface {
        s.push(format!("{}-i {}", bang(r.not.iface), restore_word(i)));
    }
    if let Some(o) = &r.oface {
        s.push(format!("{}-o {}", bang(r.not.iface), restore_word(o)));
    }
    if let Some(p) = r.proto {
        s.push(format!("-p {p}"));
        if let Some(d) = r.dport {
            let port = if d.lo == d.hi { d.lo.to_string() } else { format!("{}:{}", d.lo, d.hi) };
            s.push(format!("-m {p} --dport {port}"));
        }
    }
    if r.dst_local {
        s.push("-m addrtype --dst-type LOCAL".into());
    }
    let comment =
        format!("-m comment --comment \"{COMMENT_PREFIX}{}{}\"", r.id, if companion { HAIRPIN_SUFFIX } else { "" });
    if matches!(r.target, Target::Dnat { .. }) && !r.backends.is_empty() {
        return ladder(r, &s.join(" "), &comment);
    }
    s.push(comment);
    s.push(match r.target {
        Target::Dnat { addr, port: Some(p) } => format!("-j DNAT --to-destination {}", fmt_addr_port(addr, Some(&p))),
        Target::Dnat { addr, port: None } => format!("-j DNAT --to-destination {addr}"),
        Target::Redirect { port } => format!("-j REDIRECT --to-ports {port}"),
        // PortRange prints `LO-HI` (or one port), the form iptables-save uses for both targets.
        Target::Snat { addr, ports: Some(r) } => format!("-j SNAT --to-source {}", fmt_addr_port(addr, Some(&r))),
        Target::Snat { addr, ports: None } => format!("-j SNAT --to-source {addr}"),
        Target::Masquerade { ports: Some(r) } => format!("-j MASQUERADE --to-ports {r}"),
        Target::Masquerade { ports: None } => "-j MASQUERADE".to_string(),
    });
    vec![s.join(" ")]
}

/// The body of one of pfwd's chains: rule specs without the leading `-A CHAIN`.
fn chain_specs(chain: &PfwdChain, rules: &[Rule]) -> Vec<String> {
    if chain.name == FORWARD_CHAIN {
        // A packet conntrack cannot track is never NATed; dropping it keeps it from leaving with the original
        // (untranslated) addresses.
        return vec!["-m conntrack --ctstate INVALID -j DROP".to_string()];
    }
    let Some(hook) = NatHook::of_pfwd_chain(chain.name) else { return Vec::new() };
    let (rules, owners) = with_companions(rules);
    hook_order(&rules, hook).into_iter().flat_map(|i| rule_spec(&rules[i], owners[i].is_some())).collect()
}

/// `iptables-restore --noflush` input that turns pfwd's nat chains from `old`'s content into `new`'s with only the
/// lines that change: `-D` for lines no longer wanted, then `-I CHAIN N` for new ones in ascending final position (so
/// each `N` is the line's place in the final chain). Rules kept keep their lines, their place relative to each other
/// (the precedence order is a total order of the rules themselves) and their counters. `None` when nothing changes.
/// Needs the chains to hold exactly `old`'s lines (pfwd checks that no change was interrupted before using it).
pub fn nat_change_script(old: &[Rule], new: &[Rule], family: Family) -> Option<String> {
    let (old, new) = (of_family(old, family), of_family(new, family));
    let (old, new) = (old.as_slice(), new.as_slice());
    let mut out = String::new();
    for table in tables() {
        let mut body = String::new();
        for c in CHAINS.iter().filter(|c| c.table == table && NatHook::of_pfwd_chain(c.name).is_some()) {
            let (before, after) = (chain_specs(c, old), chain_specs(c, new));
            let kept: std::collections::HashSet<&String> = after.iter().collect();
            let had: std::collections::HashSet<&String> = before.iter().collect();
            let mut len = before.len();
            if after.is_empty() && !before.is_empty() {
                // Everything goes (a flush): one -F, where each -D would search the chain.
                body.push_str(&format!("-F {}\n", c.name));
                len = 0;
            } else {
                for line in before.iter().filter(|l| !kept.contains(l)) {
                    body.push_str(&format!("-D {} {line}\n", c.name));
                    len -= 1;
                }
            }
            // In ascending order every line before the new one is in place, so position i + 1 is right; one that
            // lands at the end is appended (iptables-nft finds an insert position by walking the chain: a bulk
            // import onto a short chain took twice as long as `-I`).
            for (i, line) in after.iter().enumerate().filter(|(_, l)| !had.contains(l)) {
                if i == len {
                    body.push_str(&format!("-A {} {line}\n", c.name));
                } else {
                    body.push_str(&format!("-I {} {} {line}\n", c.name, i + 1));
                }
                len += 1;
            }
        }
        if !body.is_empty() {
            out.push_str(&format!("*{table}\n{body}COMMIT\n"));
        }
    }
    (!out.is_empty()).then_some(out)
}

fn restore_script(rules: &[Rule], hooks: &[Hook]) -> String {
    let mut out = String::new();
    for table in tables() {
        let chains: Vec<&PfwdChain> = CHAINS.iter().filter(|c| c.table == table).collect();
        out.push_str(&format!("*{table}\n"));
        for c in &chains {
            out.push_str(&format!(":{} - [0:0]\n", c.name));
        }
        for h in hooks.iter().filter(|h| h.table == table) {
            out.push_str(&format!("{}\n", h.restore_line()));
        }
        for c in &chains {
            for spec in chain_specs(c, rules) {
                out.push_str(&format!("-A {} {spec}\n", c.name));
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// `iptables-restore --noflush` input that (re)defines pfwd's chains and nothing else. Under `--noflush`, declaring
/// an existing user chain flushes it, so applying this replaces pfwd's rules atomically (per table). Jumps into the
/// chains are not included: see [`hook_rules`].
pub fn nat_chain_script(rules: &[Rule], family: Family) -> String {
    restore_script(&of_family(rules, family), &[])
}

/// The rules that apply to `family` (its own and those for both), which its `iptables`/`ip6tables` table holds.
pub fn of_family(rules: &[Rule], family: Family) -> Vec<Rule> {
    rules.iter().filter(|r| r.applies_to(family)).cloned().collect()
}

/// The command that applies and lists a family's rules: `iptables` or `ip6tables`.
pub fn tool(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "iptables",
        Family::Ipv6 => "ip6tables",
    }
}

/// The human-facing iptables export: [`nat_chain_script`] plus the jumps of [`hook_rules`], with a header on how to
/// apply it.
pub fn export_iptables(rules: &[Rule], ifaces: Option<&[String]>, family: Family) -> String {
    let rules = &of_family(rules, family);
    let tool = tool(family);
    let chains: Vec<String> = CHAINS.iter().map(|c| format!("{} ({})", c.name, c.table)).collect();
    let builtins: Vec<&str> = CHAINS.iter().map(|c| c.builtin).collect();
    let mut out = format!(
        "# pfwd rules for {tool} ({} rules, most specific first: {tool}' first match is pfwd's choice).\n\
         # Apply with: {tool}-restore --noflush < FILE\n\
         # It only touches pfwd's own chains, {}:\n\
         # --noflush keeps every other chain, and declaring a pfwd chain flushes it, so its rules are replaced.\n\
         # The -A {} lines add the jumps into pfwd's chains. Applying the file again adds\n\
         # them again (harmless, but duplicated): to re-apply, leave those lines out.\n",
        rules.len(),
        chains.join(", "),
        builtins.join("/"),
    );
    out.push_str(&restore_script(rules, &hook_rules(ifaces)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::tests::{local_sample, sample, with_id, with_local, with_post};

    #[test]
    fn chain_script_format() {
        assert_eq!(
            nat_chain_script(&sample(), Family::Ipv4),
            "*nat\n\
             :PFWD-PREROUTING - [0:0]\n\
             :PFWD-POSTROUTING - [0:0]\n\
             :PFWD-OUTPUT - [0:0]\n\
             -A PFWD-PREROUTING -i eth0 -p tcp -m tcp --dport 59999 -m comment --comment \"pfwd:4\" -j DNAT --to-destination 127.0.0.1:17355\n\
             -A PFWD-PREROUTING -s 192.168.1.0/24 -p udp -m udp --dport 53 -m comment --comment \"pfwd:5\" -j DNAT --to-destination 10.0.2.3:5353\n\
             -A PFWD-PREROUTING -p tcp -m tcp --dport 80 -m comment --comment \"pfwd:1\" -j REDIRECT --to-ports 3000\n\
             -A PFWD-PREROUTING -p tcp -m tcp --dport 8000:8099 -m comment --comment \"pfwd:3\" -j DNAT --to-destination 10.0.2.2\n\
             -A PFWD-PREROUTING -d 203.0.113.10/32 -m comment --comment \"pfwd:2\" -j DNAT --to-destination 10.0.2.2\n\
             COMMIT\n\
             *filter\n\
             :PFWD-FORWARD - [0:0]\n\
             -A PFWD-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
             COMMIT\n"
        );
        // No rules: the chains are still declared, which empties them.
        assert!(nat_chain_script(&[], Family::Ipv4).starts_with(
            "*nat\n:PFWD-PREROUTING - [0:0]\n:PFWD-POSTROUTING - [0:0]\n:PFWD-OUTPUT - [0:0]\nCOMMIT\n*filter\n"
        ));
        // A /0 prefix matches everything; iptables-save would drop it, so the export does too.
        let mut any = with_id(9, "dnat -p tcp --to 10.0.0.1");
        any.src = Some("0.0.0.0/0".parse().unwrap());
        assert!(nat_chain_script(&[any], Family::Ipv4).contains("-A PFWD-PREROUTING -p tcp -m comment"));
    }

    #[test]
    fn iptables_export_has_header_and_hooks() {
        let ifaces = vec!["eth0".to_string()];
        let text = export_iptables(&sample(), Some(&ifaces), Family::Ipv4);
        assert!(text.starts_with("# pfwd rules for iptables (5 rules"), "{text}");
        assert!(text.contains("# Apply with: iptables-restore --noflush < FILE\n"));
        let body: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body[..7],
            [
                "*nat",
                ":PFWD-PREROUTING - [0:0]",
                ":PFWD-POSTROUTING - [0:0]",
                ":PFWD-OUTPUT - [0:0]",
                "-A PREROUTING -i eth0 -j PFWD-PREROUTING",
                "-A POSTROUTING -o eth0 -j PFWD-POSTROUTING",
                "-A OUTPUT -j PFWD-OUTPUT",
            ]
        );
        let filter = body.iter().position(|l| *l == "*filter").unwrap();
        assert_eq!(
            body[filter..],
            [
                "*filter",
                ":PFWD-FORWARD - [0:0]",
                "-A FORWARD -i eth0 -j PFWD-FORWARD",
                "-A FORWARD -o eth0 -j PFWD-FORWARD",
                "-A PFWD-FORWARD -m conntrack --ctstate INVALID -j DROP",
                "COMMIT",
            ]
        );
        // The rules are the chain script's, unchanged.
        for line in nat_chain_script(&sample(), Family::Ipv4).lines() {
            assert!(body.contains(&line), "{line}");
        }
    }

    #[test]
    fn postrouting_export_formats() {
        let ifaces = vec!["eth0".to_string()];
        let text = export_iptables(&with_post(), Some(&ifaces), Family::Ipv4);
        let body: Vec<&str> =
            text.lines().filter(|l| l.starts_with("-A POSTROUTING") || l.starts_with("-A PFWD-POST")).collect();
        assert_eq!(
            body,
            [
                "-A POSTROUTING -o eth0 -j PFWD-POSTROUTING",
                "-A PFWD-POSTROUTING -s 10.0.2.0/24 -o eth0 -p tcp -m comment --comment \"pfwd:7\" -j SNAT --to-source 203.0.113.5:20000-20099",
                "-A PFWD-POSTROUTING -o wg0 -p udp -m comment --comment \"pfwd:8\" -j MASQUERADE --to-ports 1024-1027",
                "-A PFWD-POSTROUTING -p tcp -m comment --comment \"pfwd:10\" -j SNAT --to-source 203.0.113.7:5000",
                "-A PFWD-POSTROUTING -o eth0 -m comment --comment \"pfwd:6\" -j MASQUERADE",
                "-A PFWD-POSTROUTING -d 198.51.100.0/24 -m comment --comment \"pfwd:9\" -j SNAT --to-source 203.0.113.6",
            ]
        );
        // The PREROUTING chain is unchanged by POSTROUTING rules.
        let pre = |t: &str| t.lines().filter(|l| l.starts_with("-A PFWD-PRE")).map(String::from).collect::<Vec<_>>();
        assert_eq!(pre(&text), pre(&nat_chain_script(&sample(), Family::Ipv4)));
        assert!(text.starts_with("# pfwd rules for iptables (10 rules"), "{text}");
    }

    #[test]
    fn local_export_formats() {
        let ifaces = vec!["eth0".to_string(), "wg0".to_string()];
        let text = export_iptables(&with_local(), Some(&ifaces), Family::Ipv4);
        let output: Vec<&str> = text.lines().filter(|l| !l.starts_with('#') && l.contains("OUTPUT")).collect();
        assert_eq!(
            output,
            [
                ":PFWD-OUTPUT - [0:0]",
                "-A OUTPUT -j PFWD-OUTPUT",
                "-A PFWD-OUTPUT -d 198.51.100.13/32 -p tcp -m tcp --dport 1111 -m comment --comment \"pfwd:11\" -j DNAT --to-destination 127.0.0.1:80",
                "-A PFWD-OUTPUT -p tcp -m tcp --dport 8080 -m comment --comment \"pfwd:12\" -j REDIRECT --to-ports 80",
                "-A PFWD-OUTPUT -p udp -m udp --dport 5000:5009 -m comment --comment \"pfwd:14\" -j DNAT --to-destination 10.0.2.4",
                "-A PFWD-OUTPUT -p udp -m comment --comment \"pfwd:15\" -j REDIRECT --to-ports 53",
                "-A PFWD-OUTPUT -d 198.51.100.0/24 -m comment --comment \"pfwd:13\" -j DNAT --to-destination 10.0.2.13",
            ]
        );
        assert!(text.starts_with("# pfwd rules for iptables (15 rules"), "{text}");
        assert!(text.contains("# The -A PREROUTING/POSTROUTING/OUTPUT/FORWARD lines add the jumps"), "{text}");
        // The other chains are exactly what they are without local rules: a local rule never lands in PREROUTING.
        let others = |t: &str| {
            t.lines().filter(|l| l.starts_with("-A ") && !l.contains("OUTPUT")).map(String::from).collect::<Vec<_>>()
        };
        assert_eq!(others(&text), others(&export_iptables(&with_post(), Some(&ifaces), Family::Ipv4)));
        // The chain script holds the same lines, without the jump.
        let script = nat_chain_script(&with_local(), Family::Ipv4);
        let script_output: Vec<&str> = script.lines().filter(|l| l.contains("OUTPUT")).collect();
        assert_eq!(script_output, [&output[..1], &output[2..]].concat());
        // Only local rules: PFWD-PREROUTING stays empty.
        assert!(!nat_chain_script(&local_sample(), Family::Ipv4).contains("-A PFWD-PREROUTING"));
    }

    /// A `--hairpin` rule exports as its DNAT plus the MASQUERADE it adds, tagged `pfwd:ID-hairpin`, in precedence
    /// order with the other rules; the import of that export gives the two rules back.
    /// Several backends: a `-m statistic` ladder, one line per backend with the rule's id, taking each backend's
    /// share of what the lines before it left (weights included), in iptables-save's own number format.
    #[test]
    fn backends_export_as_a_statistic_ladder() {
        let rules = vec![with_id(3, "dnat -i eth0 -p tcp --dport 80 --to 10.0.2.2:8080,10.0.2.3:8080@2,10.0.2.4:8080")];
        let script = nat_chain_script(&rules, Family::Ipv4);
        let lines: Vec<&str> = script.lines().filter(|l| l.starts_with("-A PFWD-PREROUTING")).collect();
        let m = "-A PFWD-PREROUTING -i eth0 -p tcp -m tcp --dport 80";
        let c = "-m comment --comment \"pfwd:3\" -j DNAT --to-destination";
        assert_eq!(
            lines,
            [
                format!("{m} -m statistic --mode random --probability 0.25000000000 {c} 10.0.2.2:8080"),
                format!("{m} -m statistic --mode random --probability 0.66666666651 {c} 10.0.2.3:8080"),
                format!("{m} {c} 10.0.2.4:8080"),
            ]
        );
        // Without matches or ports.
        let plain = nat_chain_script(&[with_id(4, "dnat --to 10.0.2.2,10.0.2.3")], Family::Ipv4);
        assert!(plain.contains(
            "-A PFWD-PREROUTING -m statistic --mode random --probability 0.50000000000 -m comment --comment \"pfwd:4\" \
             -j DNAT --to-destination 10.0.2.2\n-A PFWD-PREROUTING -m comment --comment \"pfwd:4\" -j DNAT \
             --to-destination 10.0.2.3\n"
        ), "{plain}");
        assert_eq!(probability(1.0 / 3.0), "0.33333333349");
    }

    #[test]
    fn hairpin_export() {
        let rules = vec![
            with_id(1, "masquerade -o eth0"),
            with_id(2, "dnat -p tcp -d 203.0.113.10 --dport 8080 --to 10.0.2.2:80 --hairpin 10.0.2.0/24"),
        ];
        let script = nat_chain_script(&rules, Family::Ipv4);
        let lines: Vec<&str> = script.lines().filter(|l| l.starts_with("-A PFWD-P")).collect();
        assert_eq!(
            lines,
            [
                "-A PFWD-PREROUTING -d 203.0.113.10/32 -p tcp -m tcp --dport 8080 -m comment --comment \"pfwd:2\" -j DNAT --to-destination 10.0.2.2:80",
                "-A PFWD-POSTROUTING -s 10.0.2.0/24 -d 10.0.2.2/32 -p tcp -m comment --comment \"pfwd:2-hairpin\" -j MASQUERADE",
                "-A PFWD-POSTROUTING -o eth0 -m comment --comment \"pfwd:1\" -j MASQUERADE",
            ]
        );
        assert!(export_iptables(&rules, None, Family::Ipv4).starts_with("# pfwd rules for iptables (2 rules"));
        let back = crate::iptables::import(&script).unwrap().rules;
        let shown: Vec<String> = back.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            shown,
            [
                "dnat -p tcp -d 203.0.113.10 --dport 8080 --to 10.0.2.2:80",
                "masquerade -p tcp -s 10.0.2.0/24 -d 10.0.2.2",
                // From iptables: IPv4 (the exported rule was for both families; the IPv6 export has it too).
                "masquerade -4 -o eth0",
            ]
        );
    }

    /// The IPv6 export (`ip6tables-restore` input) holds the rules for IPv6 and those for both; the IPv4 export the
    /// others and those for both. Addresses as ip6tables-save prints them (`/128`, `[ADDR]:PORT`).
    #[test]
    fn export_per_family() {
        let rules = vec![
            with_id(1, "redirect -p tcp --dport 80 --to-port 3000"),
            with_id(2, "redirect -6 -p tcp --dport 81 --to-port 3001"),
            with_id(3, "masquerade -4 -o eth0"),
            with_id(4, "dnat -i eth0 -p tcp -d 2001:db8::10 --dport 8080 --to [2001:db8::2]:80"),
            with_id(5, "dnat -d 203.0.113.10 --to 10.0.2.2"),
            with_id(6, "dnat -p tcp ! -s fd00::/8 --dport 443 --to [2001:db8::2]:8443,[2001:db8::3]:8443@3"),
            with_id(7, "snat -o eth0 -p udp -s fd00::/64 --to [2001:db8::1]:20000-20099"),
            with_id(8, "dnat -d 2001:db8::11 --to 2001:db8::2 --hairpin 2001:db8:2::/64"),
            with_id(9, "dnat --local -p tcp -d 2001:db8::12 --dport 25 --to [::1]:2525"),
            with_id(10, "masquerade -6 -o eth0"),
        ];
        let nat = ["-A PFWD-PREROUTING ", "-A PFWD-POSTROUTING ", "-A PFWD-OUTPUT "];
        let lines =
            |t: &str| t.lines().filter(|l| nat.iter().any(|p| l.starts_with(p))).map(String::from).collect::<Vec<_>>();
        let c = |id: &str| format!("-m comment --comment \"pfwd:{id}\"");
        let v6 = export_iptables(&rules, None, Family::Ipv6);
        assert!(
            v6.starts_with("# pfwd rules for ip6tables (8 rules, most specific first: ip6tables' first match"),
            "{v6}"
        );
        assert!(v6.contains("# Apply with: ip6tables-restore --noflush < FILE\n"), "{v6}");
        assert_eq!(
            lines(&v6),
            [
                format!(
                    "-A PFWD-PREROUTING -d 2001:db8::10/128 -i eth0 -p tcp -m tcp --dport 8080 {} -j DNAT --to-destination [2001:db8::2]:80",
                    c("4")
                ),
                format!("-A PFWD-PREROUTING -p tcp -m tcp --dport 80 {} -j REDIRECT --to-ports 3000", c("1")),
                format!("-A PFWD-PREROUTING -p tcp -m tcp --dport 81 {} -j REDIRECT --to-ports 3001", c("2")),
                format!(
                    "-A PFWD-PREROUTING ! -s fd00::/8 -p tcp -m tcp --dport 443 -m statistic --mode random --probability 0.25000000000 {} -j DNAT --to-destination [2001:db8::2]:8443",
                    c("6")
                ),
                format!(
                    "-A PFWD-PREROUTING ! -s fd00::/8 -p tcp -m tcp --dport 443 {} -j DNAT --to-destination [2001:db8::3]:8443",
                    c("6")
                ),
                format!("-A PFWD-PREROUTING -d 2001:db8::11/128 {} -j DNAT --to-destination 2001:db8::2", c("8")),
                format!(
                    "-A PFWD-POSTROUTING -s fd00::/64 -o eth0 -p udp {} -j SNAT --to-source [2001:db8::1]:20000-20099",
                    c("7")
                ),
                format!("-A PFWD-POSTROUTING -o eth0 {} -j MASQUERADE", c("10")),
                format!("-A PFWD-POSTROUTING -s 2001:db8:2::/64 -d 2001:db8::2/128 {} -j MASQUERADE", c("8-hairpin")),
                format!(
                    "-A PFWD-OUTPUT -d 2001:db8::12/128 -p tcp -m tcp --dport 25 {} -j DNAT --to-destination [::1]:2525",
                    c("9")
                ),
            ]
        );
        // The same rules as nat_chain_script's, and the same chains and jumps as the IPv4 export.
        assert_eq!(lines(&v6), lines(&nat_chain_script(&rules, Family::Ipv6)));
        let v4 = export_iptables(&rules, None, Family::Ipv4);
        assert!(v4.starts_with("# pfwd rules for iptables (3 rules"), "{v4}");
        assert_eq!(
            lines(&v4),
            [
                format!("-A PFWD-PREROUTING -p tcp -m tcp --dport 80 {} -j REDIRECT --to-ports 3000", c("1")),
                format!("-A PFWD-PREROUTING -d 203.0.113.10/32 {} -j DNAT --to-destination 10.0.2.2", c("5")),
                format!("-A PFWD-POSTROUTING -o eth0 {} -j MASQUERADE", c("3")),
            ]
        );
        let others = |t: &str| {
            t.lines()
                .filter(|l| !l.starts_with("-A PFWD-") && !l.starts_with('#'))
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(others(&v6), others(&v4));
        // `! -s 0/0` in the family's own spelling (hand-built: the grammar refuses it, it matches nothing).
        let mut none = with_id(11, "redirect -6 -p tcp --to-port 80");
        none.not.src = true;
        assert!(nat_chain_script(&[none], Family::Ipv6).contains("-A PFWD-PREROUTING ! -s ::/0 -p tcp"));
    }

    /// A change script of one family touches that family's lines only: changing an IPv6 rule leaves the IPv4
    /// chains alone, and a rule for both changes both.
    #[test]
    fn change_script_per_family() {
        let old = vec![
            with_id(1, "redirect -p tcp --dport 80 --to-port 3000"),
            with_id(2, "dnat -p tcp --dport 22 --to [2001:db8::9]:22"),
            with_id(3, "dnat -p tcp --dport 22 --to 10.0.2.9:22"),
        ];
        let mut new = old.clone();
        new[1] = with_id(2, "dnat -p tcp --dport 22 --to [2001:db8::8]:22");
        assert_eq!(nat_change_script(&old, &new, Family::Ipv4), None);
        let v6 = nat_change_script(&old, &new, Family::Ipv6).unwrap();
        assert_eq!(
            v6,
            "*nat\n\
             -D PFWD-PREROUTING -p tcp -m tcp --dport 22 -m comment --comment \"pfwd:2\" -j DNAT --to-destination [2001:db8::9]:22\n\
             -A PFWD-PREROUTING -p tcp -m tcp --dport 22 -m comment --comment \"pfwd:2\" -j DNAT --to-destination [2001:db8::8]:22\n\
             COMMIT\n"
        );
        // Dropping the IPv4 rule: IPv4 lines only.
        let without_v4 = &old[..2];
        let v4 = nat_change_script(&old, without_v4, Family::Ipv4).unwrap();
        assert!(v4.contains("-D PFWD-PREROUTING -p tcp -m tcp --dport 22 -m comment --comment \"pfwd:3\""), "{v4}");
        assert_eq!(nat_change_script(&old, without_v4, Family::Ipv6), None);
        // Adding a rule for both: a line in each.
        let both = &[old[0].clone()][..];
        for family in [Family::Ipv4, Family::Ipv6] {
            let script = nat_change_script(&old[1..], &old, family).unwrap();
            assert!(script.contains("-I PFWD-PREROUTING 1 -p tcp -m tcp --dport 80"), "{family}: {script}");
        }
        for family in [Family::Ipv4, Family::Ipv6] {
            let script = nat_change_script(both, &[], family).unwrap();
            assert!(script.contains("-F PFWD-PREROUTING\n"), "{family}: {script}");
        }
        assert_eq!((tool(Family::Ipv4), tool(Family::Ipv6)), ("iptables", "ip6tables"));
        assert_eq!(of_family(&old, Family::Ipv6).iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2]);
    }
}
