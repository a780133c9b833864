//! The importer: reads a text line by line (lexer, command parser, spec parser), keeps the rules in each nat chain
//! in iptables' order, skips pfwd's own bookkeeping lines and other tables, and at the end drops duplicates and warns
//! where pfwd's precedence picks another rule than iptables' first match.

use ipnet::Ipv4Net;

use super::command::{Command, Head, NAT_TABLE, check_table, jump_of, parse_head};
use super::lex::{check_dashes, is_counters, logical_lines, tokenize};
use super::spec::{Jump, build_rules, parse_spec};
use super::{Bad, Import, ImportError, Res, bad};
use crate::iptables::chains::{CHAINS, NAT_HOOKS, NatHook};
use crate::rules::{Rule, precedence_order};

/// Reads `iptables-save` output (with or without `-c` counters; any tables) and/or lines of
/// `[sudo] iptables [-w] -t nat -A|-I PREROUTING|POSTROUTING|OUTPUT ...` commands (`\` continuations, blank lines and
/// `#` comments are fine). nat `PREROUTING` and `PFWD-PREROUTING` rules with `-j DNAT` or `-j REDIRECT`, nat
/// `POSTROUTING` and `PFWD-POSTROUTING` rules with `-j SNAT` or `-j MASQUERADE`, and nat `OUTPUT` and `PFWD-OUTPUT`
/// rules with `-j DNAT` or `-j REDIRECT` (which become `--local` rules) are imported; pfwd's own chain declarations
/// and jumps are skipped; rules of other tables are skipped with a warning; everything else (negation, unsupported
/// matches or targets, `-o`/`-s` in OUTPUT, nat INPUT, and whatever iptables itself would reject) is an error naming
/// the line.
///
/// Rules are returned in iptables' first-match order, PREROUTING rules first, then POSTROUTING ones, then OUTPUT ones
/// (`-I` inserts, pfwd's chains sit where the built-in chain jumps to them). A later exact duplicate of a rule (same
/// match and target) is dropped with a warning: iptables would keep it, but it can never match since the first copy
/// catches every packet it would.
///
/// iptables takes the first matching rule, pfwd the most specific one ([`precedence_order`]). When a rule that
/// iptables checks later would win in pfwd over an earlier one that can match the same packets and does something
/// else, a warning says so.
pub fn import(text: &str) -> Result<Import, ImportError> {
    let mut importer = Importer::default();
    for (line_no, line) in logical_lines(text) {
        importer.line(line_no, &line).map_err(|b| ImportError {
            line_no,
            line: line.clone(),
            token: b.token,
            message: b.message,
        })?;
    }
    Ok(importer.finish())
}

/// One iptables rule in a chain: the pfwd rules it became (indices into `Importer::rules`; several for multiport),
/// or the jump into pfwd's chain.
#[derive(Debug)]
enum Entry {
    Rules(Vec<usize>),
    Jump,
}

/// The rules of one hook as iptables holds them: its built-in nat chain (`PREROUTING`) and pfwd's chain
/// (`PFWD-PREROUTING`), each in iptables' order.
#[derive(Debug, Default)]
struct HookChains {
    builtin: Vec<Entry>,
    pfwd: Vec<Entry>,
}

impl HookChains {
    /// iptables' order of the hook's rules: the built-in chain, with pfwd's chain where the first jump to it is (or
    /// after everything).
    fn order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = Vec::new();
        let pfwd: Vec<usize> = self.pfwd.iter().flat_map(entry_rules).collect();
        let mut jumped = false;
        for e in &self.builtin {
            match e {
                Entry::Rules(ids) => order.extend(ids),
                Entry::Jump if !jumped => {
                    jumped = true;
                    order.extend(&pfwd);
                }
                Entry::Jump => {}
            }
        }
        if !jumped {
            order.extend(&pfwd);
        }
        order
    }
}

fn entry_rules(e: &Entry) -> Vec<usize> {
    match e {
        Entry::Rules(ids) => ids.clone(),
        Entry::Jump => Vec::new(),
    }
}

/// An imported rule and the line it came from.
#[derive(Debug, Clone)]
struct Imported {
    rule: Rule,
    line_no: usize,
}

#[derive(Default)]
struct Importer {
    /// The `*table` of an `iptables-save` section.
    save_table: Option<String>,
    /// Imported rules in input order.
    rules: Vec<Imported>,
    /// The chains of each hook, indexed by [`NatHook`] (in [`NAT_HOOKS`] order: the order of the result).
    chains: [HookChains; NAT_HOOKS.len()],
    warnings: Vec<String>,
}

impl Importer {
    fn line(&mut self, line_no: usize, line: &str) -> Res<()> {
        let tokens = tokenize(line)?;
        let mut toks: &[String] = &tokens;
        if toks.first().is_some_and(|t| is_counters(t)) {
            toks = &toks[1..];
        }
        let Some(first) = toks.first() else { return Ok(()) };
        if let Some(table) = first.strip_prefix('*') {
            check_table(first, table)?;
            self.save_table = Some(table.to_string());
            return Ok(());
        }
        // Chain declarations: bookkeeping, whatever the table.
        if first.starts_with(':') {
            return Ok(());
        }
        if first == "COMMIT" {
            self.save_table = None;
            return Ok(());
        }
        let save_table = self.save_table.clone();
        let (default_table, args) = if first.starts_with(['-', '!']) || check_dashes(first).is_err() {
            // A rule line without a `*table` header is most likely a nat rule pasted from iptables-save.
            (save_table.as_deref().unwrap_or(NAT_TABLE), toks)
        } else {
            let mut rest = toks;
            if rest.first().is_some_and(|t| t == "sudo") {
                rest = &rest[1..];
                while rest.first().is_some_and(|t| t.starts_with('-')) {
                    rest = &rest[1..];
                }
            }
            let Some(program) = rest.first() else { return Err(bad(first, "expected an iptables command")) };
            match program.rsplit('/').next().unwrap_or(program) {
                "iptables" | "iptables-nft" | "iptables-legacy" => {}
                p if p.starts_with("ip6tables") => {
                    return Err(bad(program, "IPv6 rules are not supported; pfwd forwards IPv4"));
                }
                _ => return Err(bad(program, "not an iptables command or an iptables-save line")),
            }
            // iptables' default table.
            ("filter", &rest[1..])
        };
        let head = parse_head(args, default_table)?;
        if head.table == NAT_TABLE { self.nat_line(line_no, head) } else { self.other_table(line_no, line, head) }
    }

    fn nat_line(&mut self, line_no: usize, head: Head) -> Res<()> {
        let tok = head.command_tok;
        match head.command {
            Command::Append | Command::Insert => {}
            Command::Policy => {
                return match head.policy {
                    Some("ACCEPT") => Ok(()),
                    Some(p @ "DROP") => Err(bad(p, "a DROP policy in the nat table is not supported")),
                    Some(p) => Err(bad(p, "iptables: bad policy name (ACCEPT or DROP)")),
                    None => Err(bad(tok, "iptables: -P requires a chain and a policy")),
                };
            }
            Command::NewChain | Command::Zero => return Ok(()),
            // A script's preamble often flushes first; after rules were read it would drop them.
            Command::Flush | Command::DeleteChain if self.rules.is_empty() => return Ok(()),
            Command::Flush | Command::DeleteChain => {
                return Err(bad(tok, "removes rules read above; remove those lines (or this one) instead"));
            }
            Command::Modify => {
                return Err(bad(tok, "changes existing rules; pfwd imports rule additions (-A, -I) only"));
            }
            Command::Query => return Err(bad(tok, "does not add a rule (give pfwd iptables-save -t nat output)")),
        }
        let chain = head.chain.unwrap_or_default();
        // NETMAP first: the message should name what the user wrote, not the chain it lives in.
        if let Some(j @ "NETMAP") = jump_of(&head.spec) {
            return Err(bad(
                j,
                format!("valid iptables, but pfwd does not support {j} yet (only DNAT, REDIRECT, SNAT and MASQUERADE)"),
            ));
        }
        let Some(hook) = NAT_HOOKS.into_iter().find(|h| chain == h.builtin() || chain == h.pfwd_chain()) else {
            return Err(unsupported_chain(chain));
        };
        let spec = parse_spec(&head.spec)?;
        // iptables' own checks: the incoming interface is unknown after routing and for local connections, the
        // outgoing one before routing.
        match (hook, spec.iface, spec.oface) {
            (NatHook::Postrouting, Some(i), _) => return Err(bad(i.name, "iptables: Can't use -i with POSTROUTING")),
            (NatHook::Output, Some(i), _) => return Err(bad(i.name, "iptables: Can't use -i with OUTPUT")),
            (NatHook::Prerouting, _, Some(o)) => return Err(bad(o.name, "iptables: Can't use -o with PREROUTING")),
            _ => {}
        }
        let entry = match spec.jump {
            Some(j) if j.value == hook.pfwd_chain() && chain == hook.builtin() => Entry::Jump,
            _ => {
                let mut ids = Vec::new();
                for rule in build_rules(&spec, tok, hook)? {
                    self.rules.push(Imported { rule, line_no });
                    ids.push(self.rules.len() - 1);
                }
                Entry::Rules(ids)
            }
        };
        let chains = &mut self.chains[hook as usize];
        let list = if chain == hook.pfwd_chain() { &mut chains.pfwd } else { &mut chains.builtin };
        let at = match head.position {
            Some(n) if n > list.len() + 1 => {
                return Err(bad(&n.to_string(), "iptables: Index of insertion too big."));
            }
            Some(n) => n - 1,
            None if head.command == Command::Insert => 0,
            None => list.len(),
        };
        list.insert(at, entry);
        Ok(())
    }

    /// Lines outside the nat table: pfwd's own jumps and chains are skipped, NAT targets are an error (iptables
    /// rejects them there), anything else is skipped with a warning.
    fn other_table(&mut self, line_no: usize, line: &str, head: Head) -> Res<()> {
        let jump = jump_of(&head.spec);
        let pfwd_chain = |c: &str| CHAINS.iter().any(|p| p.name == c);
        if head.chain.is_some_and(pfwd_chain) || jump.is_some_and(pfwd_chain) {
            return Ok(());
        }
        match head.command {
            Command::NewChain | Command::Flush | Command::DeleteChain | Command::Zero => return Ok(()),
            Command::Policy if head.policy == Some("ACCEPT") => return Ok(()),
            Command::Query => {
                return Err(bad(head.command_tok, "does not add a rule (give pfwd iptables-save -t nat output)"));
            }
            _ => {}
        }
        if let Some(j) = jump.filter(|j| Jump::from_name(j).is_some()) {
            return Err(bad(j, format!("{j} is only valid in the nat table: add -t nat")));
        }
        if head.table == "filter"
            && let Some(c @ ("PREROUTING" | "POSTROUTING")) = head.chain
        {
            return Err(bad(c, format!("the filter table has no {c} chain: add -t nat")));
        }
        self.warnings.push(format!(
            "line {line_no}: not imported ({} table; pfwd converts nat PREROUTING and OUTPUT DNAT/REDIRECT and \
             POSTROUTING SNAT/MASQUERADE rules): {line}",
            head.table
        ));
        Ok(())
    }

    fn finish(mut self) -> Import {
        let order: Vec<usize> = self.chains.iter().flat_map(HookChains::order).collect();

        let mut kept: Vec<&Imported> = Vec::new();
        for i in order {
            let Imported { rule, line_no } = &self.rules[i];
            match kept.iter().find(|k| k.rule.same_match_and_target(rule)) {
                Some(first) => self.warnings.push(format!(
                    "line {line_no}: duplicate of line {} (\"{rule}\"); dropped, it could never match",
                    first.line_no
                )),
                None => kept.push(&self.rules[i]),
            }
        }

        let rules: Vec<Rule> = kept.iter().map(|k| k.rule.clone()).collect();
        let mut rank = vec![0; rules.len()];
        for (pos, i) in precedence_order(&rules).into_iter().enumerate() {
            rank[i] = pos;
        }
        for later in 0..rules.len() {
            for earlier in 0..later {
                let (a, b) = (&rules[earlier], &rules[later]);
                if rank[later] < rank[earlier] && a.target != b.target && may_overlap(a, b) {
                    let (la, lb) = (kept[earlier].line_no, kept[later].line_no);
                    self.warnings.push(format!(
                        "line {lb} (\"{b}\") overlaps line {la} (\"{a}\"): iptables uses line {la} for packets both \
                         match, pfwd the more specific line {lb}"
                    ));
                }
            }
        }
        Import { rules, warnings: self.warnings }
    }
}

/// A nat chain other than the hooks' built-in chains and pfwd's.
fn unsupported_chain(chain: &str) -> Bad {
    match chain {
        "INPUT" => bad(
            chain,
            format!(
                "valid iptables, but pfwd does not support nat {chain} rules yet (only PREROUTING, POSTROUTING and \
                 OUTPUT)"
            ),
        ),
        c if NAT_HOOKS.iter().any(|h| c.eq_ignore_ascii_case(h.builtin())) => {
            bad(c, format!("chain names are case-sensitive: {}", c.to_ascii_uppercase()))
        }
        c => bad(
            c,
            format!(
                "rules in chain {c} are not supported; pfwd imports nat PREROUTING, POSTROUTING and OUTPUT rules (put \
                 them there)"
            ),
        ),
    }
}

/// Whether some packet could match both rules; conservative (may say yes when no packet does, never the reverse).
fn may_overlap(a: &Rule, b: &Rule) -> bool {
    fn either_or_equal<T: PartialEq>(x: &Option<T>, y: &Option<T>) -> bool {
        x.is_none() || y.is_none() || x == y
    }
    let nets = |x: Option<Ipv4Net>, y: Option<Ipv4Net>| match (x, y) {
        (Some(x), Some(y)) => x.contains(&y.network()) || y.contains(&x.network()),
        _ => true,
    };
    let ports = match (a.dport, b.dport) {
        (Some(x), Some(y)) => x.lo <= y.hi && y.lo <= x.hi,
        _ => true,
    };
    // Rules of different hooks (PREROUTING, POSTROUTING, OUTPUT) never see the same lookup.
    NatHook::of(a) == NatHook::of(b)
        && either_or_equal(&a.iface, &b.iface)
        && either_or_equal(&a.oface, &b.oface)
        && either_or_equal(&a.proto, &b.proto)
        && ports
        && nets(a.src, b.src)
        && nets(a.dst, b.dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::tests::{err, ok, rule};

    #[test]
    fn import_snat_masquerade() {
        for (line, want) in [
            ("iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE", "masquerade -o eth0"),
            (
                "iptables -t nat -A POSTROUTING -s 10.0.2.0/24 -o eth1 -p tcp -j SNAT --to-source 203.0.113.5:20000-20099",
                "snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099",
            ),
            (
                "iptables -t nat -A POSTROUTING -d 198.51.100.0/24 -j SNAT --to 203.0.113.6",
                "snat -d 198.51.100.0/24 --to 203.0.113.6",
            ),
            (
                "sudo iptables -w -t nat -I POSTROUTING --out-interface wg0 --protocol udp --jump MASQUERADE --to-ports 1024-1027",
                "masquerade -o wg0 -p udp --to-ports 1024-1027",
            ),
            ("-A POSTROUTING -p tcp -m tcp -j MASQUERADE --to-ports 5000", "masquerade -p tcp --to-ports 5000"),
            (
                "iptables -t nat -A POSTROUTING -p tcp -j SNAT --to-source=203.0.113.7:5000",
                "snat -p tcp --to 203.0.113.7:5000",
            ),
        ] {
            let got = ok(line);
            assert_eq!(got.rules, vec![rule(want)], "{line}");
            assert!(got.warnings.is_empty(), "{line}: {:?}", got.warnings);
        }

        // An iptables-save dump: PREROUTING rules come first, each hook in its own first-match order with pfwd's
        // chain where the jump is; the hooks never warn about each other.
        let dump = "\
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:PFWD-PREROUTING - [0:0]
:PFWD-POSTROUTING - [0:0]
[1:60] -A POSTROUTING -s 10.9.0.0/16 -o eth0 -j MASQUERADE
-A POSTROUTING -o eth0 -j PFWD-POSTROUTING
-A POSTROUTING -j MASQUERADE
-A PREROUTING -i eth0 -j PFWD-PREROUTING
-A PFWD-POSTROUTING -s 10.9.2.0/24 -o eth0 -p tcp -m comment --comment \"pfwd:7\" -j SNAT --to-source 203.0.113.5:20000-20099
-A PFWD-PREROUTING -p tcp -m tcp --dport 80 -m comment --comment \"pfwd:1\" -j REDIRECT --to-ports 3000
COMMIT
";
        let got = ok(dump);
        let want = [
            "redirect -p tcp --dport 80 --to-port 3000",
            "masquerade -o eth0 -s 10.9.0.0/16",
            "snat -o eth0 -p tcp -s 10.9.2.0/24 --to 203.0.113.5:20000-20099",
            "masquerade",
        ];
        assert_eq!(got.rules, want.map(rule));
        // pfwd ranks -p above -s: the SNAT rule wins over the earlier MASQUERADE where both match.
        assert_eq!(got.warnings.len(), 1, "{:#?}", got.warnings);
        assert!(got.warnings[0].starts_with("line 10 (\"snat -o eth0 -p tcp"), "{}", got.warnings[0]);
        assert!(got.warnings[0].contains("overlaps line 6 (\"masquerade -o eth0 -s 10.9.0.0/16\")"));
        // Already in pfwd's order: nothing to say, whatever the other hook holds.
        let got = ok("iptables -t nat -A POSTROUTING -o eth0 -p tcp -j MASQUERADE\n\
                      iptables -t nat -A POSTROUTING -j MASQUERADE\n\
                      iptables -t nat -A PREROUTING -j DNAT --to 10.0.0.1\n");
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
        assert_eq!(got.rules.len(), 3);
        assert!(!got.rules[0].is_postrouting() && got.rules[1].is_postrouting());
    }

    #[test]
    fn import_local_rules() {
        for (line, want) in [
            // The classic forms: connections this host makes to a port or an address go elsewhere.
            (
                "iptables -t nat -A OUTPUT -p tcp --dport 1111 -j DNAT --to-destination 127.0.0.1:80",
                "dnat --local -p tcp --dport 1111 --to 127.0.0.1:80",
            ),
            (
                "iptables -t nat -A OUTPUT -d 211.45.70.13 -j DNAT --to 192.168.255.151",
                "dnat --local -d 211.45.70.13 --to 192.168.255.151",
            ),
            (
                "sudo iptables -t nat -I OUTPUT -p tcp -d 127.0.0.1 --dport 80 -j REDIRECT --to-ports 8080",
                "redirect --local -p tcp -d 127.0.0.1 --dport 80 --to-port 8080",
            ),
            (
                "iptables -t nat -A OUTPUT -p udp -m multiport --dports 53 -j DNAT --to-destination 10.0.2.3:5353",
                "dnat --local -p udp --dport 53 --to 10.0.2.3:5353",
            ),
            (
                "-A OUTPUT -d 198.51.100.13/32 -p tcp -m tcp --dport 1111 -j DNAT --to-destination 127.0.0.1:80",
                "dnat --local -p tcp -d 198.51.100.13 --dport 1111 --to 127.0.0.1:80",
            ),
            (
                "-A PFWD-OUTPUT -p udp -m comment --comment \"pfwd:15\" -j REDIRECT --to-ports 53",
                "redirect --local -p udp --to-port 53",
            ),
        ] {
            let got = ok(line);
            assert_eq!(got.rules, vec![rule(want)], "{line}");
            assert!(got.rules[0].local, "{line}");
            assert!(got.warnings.is_empty(), "{line}: {:?}", got.warnings);
        }

        // A dump: PREROUTING, then POSTROUTING, then OUTPUT rules, each hook in its own first-match order with
        // pfwd's chain where the jump is; overlap warnings only within one hook.
        let dump = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:PFWD-OUTPUT - [0:0]
-A OUTPUT -d 10.9.0.0/16 -j DNAT --to-destination 10.0.2.9
-A OUTPUT -j PFWD-OUTPUT
-A OUTPUT -d 192.0.2.0/24 -p tcp -m tcp --dport 22 -j DNAT --to-destination 10.0.2.8
-A PREROUTING -j DNAT --to-destination 10.0.2.1
-A POSTROUTING -j MASQUERADE
-A PFWD-OUTPUT -d 10.9.1.0/24 -p tcp -m tcp --dport 80 -m comment --comment \"pfwd:11\" -j REDIRECT --to-ports 8080
COMMIT
";
        let got = ok(dump);
        let want = [
            "dnat --to 10.0.2.1",
            "masquerade",
            "dnat --local -d 10.9.0.0/16 --to 10.0.2.9",
            "redirect --local -p tcp -d 10.9.1.0/24 --dport 80 --to-port 8080",
            "dnat --local -p tcp -d 192.0.2.0/24 --dport 22 --to 10.0.2.8",
        ];
        assert_eq!(got.rules, want.map(rule));
        // The port rule is more specific than the OUTPUT rule before it that covers its addresses; the PREROUTING
        // catch-all, which every OUTPUT rule would beat in one hook, is not mentioned.
        assert_eq!(
            got.warnings,
            ["line 11 (\"redirect --local -p tcp -d 10.9.1.0/24 --dport 80 --to-port 8080\") overlaps line 6 (\"dnat \
                 --local -d 10.9.0.0/16 --to 10.0.2.9\"): iptables uses line 6 for packets both match, pfwd the more \
                 specific line 11"]
        );
        // -I and positions work in OUTPUT like elsewhere; PREROUTING and OUTPUT rules with the same match are not
        // duplicates.
        let got = ok("iptables -t nat -A OUTPUT -p tcp --dport 1 -j REDIRECT --to-ports 1\n\
                      iptables -t nat -I OUTPUT -p tcp --dport 2 -j REDIRECT --to-ports 2\n\
                      iptables -t nat -I OUTPUT 2 -p tcp --dport 3 -j REDIRECT --to-ports 3\n\
                      iptables -t nat -A PREROUTING -p tcp --dport 1 -j REDIRECT --to-ports 1\n\
                      iptables -t nat -A OUTPUT -p tcp --dport 1 -j REDIRECT --to-ports 1\n");
        let ports: Vec<(bool, u16)> = got.rules.iter().map(|r| (r.local, r.dport.unwrap().lo)).collect();
        assert_eq!(ports, [(false, 1), (true, 2), (true, 3), (true, 1)]);
        assert_eq!(got.warnings.len(), 1, "{:?}", got.warnings);
        assert!(got.warnings[0].starts_with("line 5: duplicate of line 1 (\"redirect --local -p tcp --dport 1"));
    }

    #[test]
    fn import_iptables_save_dump() {
        let dump = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Nov 26 11:30:45 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [12:720]
:OUTPUT ACCEPT [0:0]
:PFWD-FORWARD - [0:0]
[120:7200] -A FORWARD -i eth0 -j PFWD-FORWARD
[4:240] -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
[0:0] -A PFWD-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
# Completed on Thu Nov 26 11:30:45 2026
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Nov 26 11:30:45 2026
*nat
:PREROUTING ACCEPT [5:300]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:PFWD-PREROUTING - [0:0]
[3:180] -A PREROUTING -s 10.0.0.0/8 -d 1.2.3.4/32 -i eth0 -p tcp -m tcp --dport 80 -m comment --comment hi -j DNAT --to-destination 1.2.3.5:80
[5:300] -A PREROUTING -i eth0 -j PFWD-PREROUTING
[0:0] -A PREROUTING -p udp -m udp --dport 53 -j REDIRECT --to-ports 5353
[2:120] -A PFWD-PREROUTING -i eth0 -p tcp -m tcp --dport 59999 -m comment --comment \"pfwd:1\" -j DNAT --to-destination 127.0.0.1:17355
[0:0] -A PFWD-PREROUTING -p tcp -m tcp --dport 8000:8099 -m comment --comment \"pfwd:3\" -j DNAT --to-destination 10.0.2.2
[0:0] -A PFWD-PREROUTING -d 203.0.113.10/32 -m comment --comment \"pfwd:2\" -j DNAT --to-destination 10.0.2.2
COMMIT
# Completed on Thu Nov 26 11:30:45 2026
";
        let got = ok(dump);
        // PREROUTING order, with pfwd's chain where PREROUTING jumps to it.
        let want = [
            "dnat -i eth0 -p tcp -s 10.0.0.0/8 -d 1.2.3.4 --dport 80 --to 1.2.3.5:80",
            "dnat -i eth0 -p tcp --dport 59999 --to 127.0.0.1:17355",
            "dnat -p tcp --dport 8000-8099 --to 10.0.2.2",
            "dnat -d 203.0.113.10 --to 10.0.2.2",
            "redirect -p udp --dport 53 --to-port 5353",
        ];
        assert_eq!(got.rules, want.map(rule));
        // The udp rule is more specific than the catch-all before it and overlaps it: pfwd changes who wins.
        assert_eq!(got.warnings.len(), 2, "{:#?}", got.warnings);
        assert!(got.warnings[0].starts_with("line 8: not imported (filter table;"), "{}", got.warnings[0]);
        assert!(got.warnings[0].ends_with("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"));
        assert_eq!(
            got.warnings[1],
            "line 21 (\"redirect -p udp --dport 53 --to-port 5353\") overlaps line 24 (\"dnat -d 203.0.113.10 --to \
             10.0.2.2\"): iptables uses line 24 for packets both match, pfwd the more specific line 21"
        );
    }

    #[test]
    fn import_orders_like_iptables() {
        let got = ok("iptables -t nat -A PREROUTING -p tcp --dport 1 -j REDIRECT --to-ports 1\n\
                      iptables -t nat -A PREROUTING -p tcp --dport 2 -j REDIRECT --to-ports 2\n\
                      iptables -t nat -I PREROUTING -p tcp --dport 3 -j REDIRECT --to-ports 3\n\
                      iptables -t nat -I PREROUTING 3 -p tcp --dport 4 -j REDIRECT --to-ports 4\n\
                      iptables -t nat -I PREROUTING 5 -p tcp --dport 5 -j REDIRECT --to-ports 5\n");
        let ports: Vec<u16> = got.rules.iter().map(|r| r.dport.unwrap().lo).collect();
        assert_eq!(ports, [3, 1, 4, 2, 5]);
        // No jump into PFWD-PREROUTING: its rules come after PREROUTING's.
        let got = ok("*nat\n-A PFWD-PREROUTING -p tcp --dport 1 -j REDIRECT --to-ports 1\n\
                      -A PREROUTING -p tcp --dport 2 -j REDIRECT --to-ports 2\nCOMMIT\n");
        let ports: Vec<u16> = got.rules.iter().map(|r| r.dport.unwrap().lo).collect();
        assert_eq!(ports, [2, 1]);
    }

    #[test]
    fn duplicates_and_precedence_warnings() {
        let got = ok("iptables -t nat -A PREROUTING -p tcp -j DNAT --to 10.0.0.1\n\
                      iptables -t nat -A PREROUTING -p tcp --dport 80 -j DNAT --to 10.0.0.2\n\
                      iptables -t nat -A PREROUTING -p udp --dport 53 -j DNAT --to 10.0.0.3\n\
                      iptables -t nat -A PREROUTING -p tcp --dport 80 -j DNAT --to 10.0.0.2\n\
                      iptables -t nat -A PREROUTING -p tcp --dport 443 -j DNAT --to 10.0.0.1\n\
                      iptables -t nat -A PREROUTING -s 10.9.0.0/16 -p tcp --dport 80 -j DNAT --to 10.0.0.9\n");
        assert_eq!(got.rules.len(), 5);
        assert_eq!(
            got.warnings,
            [
                "line 4: duplicate of line 2 (\"dnat -p tcp --dport 80 --to 10.0.0.2\"); dropped, it could never match",
                "line 2 (\"dnat -p tcp --dport 80 --to 10.0.0.2\") overlaps line 1 (\"dnat -p tcp --to 10.0.0.1\"): \
                 iptables uses line 1 for packets both match, pfwd the more specific line 2",
                "line 6 (\"dnat -p tcp -s 10.9.0.0/16 --dport 80 --to 10.0.0.9\") overlaps line 1 (\"dnat -p tcp --to \
                 10.0.0.1\"): iptables uses line 1 for packets both match, pfwd the more specific line 6",
                "line 6 (\"dnat -p tcp -s 10.9.0.0/16 --dport 80 --to 10.0.0.9\") overlaps line 2 (\"dnat -p tcp \
                 --dport 80 --to 10.0.0.2\"): iptables uses line 2 for packets both match, pfwd the more specific line 6",
            ]
        );
        // Most specific first already: nothing to say.
        let got = ok("iptables -t nat -A PREROUTING -p tcp --dport 80 -j DNAT --to 10.0.0.2\n\
                      iptables -t nat -A PREROUTING -p tcp -j DNAT --to 10.0.0.1\n\
                      iptables -t nat -A PREROUTING -i eth1 -j DNAT --to 10.0.0.3\n\
                      iptables -t nat -A PREROUTING -d 10.1.0.0/16 -j DNAT --to 10.0.0.4\n\
                      iptables -t nat -A PREROUTING -d 10.2.0.0/16 -j DNAT --to 10.0.0.5\n");
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }

    #[test]
    fn bookkeeping_is_skipped() {
        let got = ok("iptables -t nat -N PFWD-PREROUTING\n\
                      iptables -t nat -A PREROUTING -i eth0 -j PFWD-PREROUTING\n\
                      iptables -N PFWD-FORWARD\n\
                      iptables -A FORWARD -o eth0 -j PFWD-FORWARD\n\
                      iptables -A PFWD-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
                      iptables -t nat -P PREROUTING ACCEPT\n\
                      iptables -P INPUT ACCEPT\n\
                      iptables -t nat -Z\n");
        assert_eq!(got, Import::default());
        let got = ok("iptables -P FORWARD DROP\niptables -A INPUT -p tcp --dport 22 -j ACCEPT\n");
        assert_eq!(got.warnings.len(), 2);
        assert!(got.warnings[1].starts_with("line 2: not imported (filter table;"), "{:?}", got.warnings);
    }

    #[test]
    fn import_line_rejections() {
        for (line, token, message) in [
            ("iptables -t nat -P PREROUTING", "-P", "iptables: -P requires a chain and a policy"),
            ("iptables -P FORWARD", "-P", "-P requires a chain and a policy"),
            ("iptables -t nat -P PREROUTING DROP", "DROP", "not supported"),
            (
                "iptables -t nat -A OUTPUT -o eth0 -p tcp --dport 80 -j DNAT --to 10.0.2.2:8080",
                "-o",
                "valid iptables, but pfwd does not support -o in OUTPUT",
            ),
            (
                "iptables -t nat -A POSTROUTING -o eth0 -j NETMAP --to 10.9.0.0/16",
                "NETMAP",
                "valid iptables, but pfwd does not support NETMAP yet",
            ),
            ("iptables -t nat -A INPUT -d 10.0.2.2 -j ACCEPT", "INPUT", "nat INPUT rules yet"),
            ("iptables -t nat -A INPUT -j SNAT --to 1.2.3.4", "INPUT", "nat INPUT rules yet"),
            ("iptables -t nat -A prerouting -p tcp -j DNAT --to 10.0.2.2", "prerouting", "case-sensitive"),
            ("iptables -t nat -A DOCKER -p tcp -j DNAT --to 10.0.2.2", "DOCKER", "rules in chain DOCKER"),
            (
                "iptables -A PREROUTING -p tcp --dport 80 -j REDIRECT --to-port 3000",
                "REDIRECT",
                "only valid in the nat table: add -t nat",
            ),
            (
                "iptables -A PREROUTING -p tcp --dport 80 -j ACCEPT",
                "PREROUTING",
                "the filter table has no PREROUTING chain",
            ),
            ("iptables -t nat", "nat", "no command"),
            ("iptables -t nat -A", "-A", "-A needs a chain name"),
            ("iptables -t nat -A PREROUTING -I PREROUTING", "-I", "a second command"),
            ("iptables -t nat -I PREROUTING 0 -p tcp -j DNAT --to 10.0.2.2", "0", "invalid rule number"),
            ("iptables -t nat -I PREROUTING 2 -p tcp -j DNAT --to 10.0.2.2", "2", "Index of insertion too big"),
            ("iptables -t nat -D PREROUTING 1", "-D", "changes existing rules"),
            ("iptables -t nat -L -n", "-L", "does not add a rule"),
            ("iptables -t nta -A PREROUTING", "nta", "unknown table"),
            ("iptables -t nat -A PREROUTING -6 -p tcp -j DNAT --to 10.0.2.2", "-6", "IPv6"),
            ("ip6tables -t nat -A PREROUTING -p tcp -j DNAT --to 10.0.2.2", "ip6tables", "IPv6"),
            ("sysctl -w net.ipv4.ip_forward=1", "sysctl", "not an iptables command"),
            ("sudo", "sudo", "expected an iptables command"),
            ("iptables -t nat -A PREROUTING -m comment --comment \"oops", "\"", "unterminated quote"),
            ("*natt", "*natt", "unknown table"),
        ] {
            let e = err(&format!("\n{line}\n"));
            assert_eq!((e.line_no, e.token.as_str()), (2, token), "{line}: {e}");
            assert!(e.message.contains(message), "{line}: {e}");
        }
        // A flush after rules would drop them: refuse rather than guess.
        let e = err("iptables -t nat -A PREROUTING -p tcp -j DNAT --to 10.0.2.2\niptables -t nat -F PREROUTING\n");
        assert_eq!((e.line_no, e.token.as_str()), (2, "-F"));
    }
}
