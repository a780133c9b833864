//! The iptables data path (`--mode iptables`, and what `auto` falls back to): pfwd's rules as iptables NAT rules in
//! pfwd's own chains, hooked from the built-in chains of the attached interfaces only.
//!
//! Chain contents are applied with `iptables-restore --noflush`, which replaces pfwd's chains atomically and never
//! touches rules or chains it does not own. Detach deletes exactly the hooks and chains pfwd added, and the tables
//! too when pfwd created them, so `iptables-save` reads as it did before attach.
//!
//! Both families: IPv4 rules (and rules for both) go to iptables, IPv6 rules (and rules for both) to ip6tables, each
//! with the same chains and hooks ([`Tools`]).
use std::{
    io::Write,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use pfwd_common::RuleCounters;

use crate::rules::model::Family;
use crate::{
    iptables,
    record::Record,
    report::{ConntrackEntry, FlowTuple, Nat},
    rules::Rule,
};

/// Every chain pfwd owns starts with this (PFWD-PREROUTING, PFWD-FORWARD, ...).
const CHAIN_PREFIX: &str = "PFWD-";

/// Tables pfwd writes to (in each family).
pub const TABLES: [&str; 2] = ["nat", "filter"];

/// One family's commands: `iptables`, `iptables-save`, `iptables-restore`, or the `ip6tables` ones.
#[derive(Debug, Clone, Copy)]
struct Tools {
    family: Family,
    cmd: &'static str,
    save: &'static str,
    restore: &'static str,
    /// The nft family of its tables (iptables-nft tables are nft tables).
    nft: &'static str,
    /// How [`existing_tables`] and the record name its tables: `nat` for IPv4, `ip6:nat` for IPv6.
    table_prefix: &'static str,
}

const FAMILIES: [Tools; 2] = [
    Tools {
        family: Family::Ipv4,
        cmd: "iptables",
        save: "iptables-save",
        restore: "iptables-restore",
        nft: "ip",
        table_prefix: "",
    },
    Tools {
        family: Family::Ipv6,
        cmd: "ip6tables",
        save: "ip6tables-save",
        restore: "ip6tables-restore",
        nft: "ip6",
        table_prefix: "ip6:",
    },
];

impl Tools {
    fn iptables(&self, args: &[String]) -> Result<String> {
        // -w: wait for the xtables lock instead of failing when another command holds it.
        let mut all = vec!["-w".to_string(), "10".to_string()];
        all.extend_from_slice(args);
        run(self.cmd, &all, None)
    }

    fn restore(&self, extra: &[&str], script: &str) -> Result<String> {
        let mut args: Vec<String> = vec!["-w".into(), "10".into()];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push("--noflush".into());
        run(self.restore, &args, Some(script))
    }

    fn save(&self, args: &[&str]) -> Result<String> {
        run(self.save, &args.iter().map(|a| a.to_string()).collect::<Vec<_>>(), None)
    }

    /// The name [`existing_tables`] gives `table` of this family.
    fn table_name(&self, table: &str) -> String {
        format!("{}{table}", self.table_prefix)
    }
}

/// Runs `cmd ARGS` (feeding `stdin`), its stdout on success; an error with its stderr otherwise.
pub(crate) fn run(cmd: &str, args: &[String], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd} (is the iptables or nftables package installed?)"))?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the iptables command is usable here (ip6tables is used when IPv6 is: [`ipv6_usable`]).
pub fn available() -> Result<()> {
    run(FAMILIES[0].cmd, &["--version".into()], None).map(|_| ())
}

/// Whether IPv6 rules can be applied here: the kernel has IPv6 (`ipv6.disable=1` removes `/proc/net/if_inet6`) and
/// ip6tables runs. Without it iptables mode works for IPv4 alone, and refuses IPv6 rules.
pub fn ipv6_usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        std::path::Path::new("/proc/net/if_inet6").exists() && run(FAMILIES[1].cmd, &["--version".into()], None).is_ok()
    })
}

/// The families pfwd writes here: IPv4, and IPv6 when [`ipv6_usable`].
fn families() -> impl Iterator<Item = &'static Tools> {
    FAMILIES.iter().filter(|t| t.family == Family::Ipv4 || ipv6_usable())
}

/// Every table pfwd may write to, as [`existing_tables`] names them.
pub fn all_tables() -> Vec<String> {
    families().flat_map(|t| TABLES.iter().map(|table| t.table_name(table))).collect()
}

/// Tables that exist now, of both families (`nat`, `ip6:nat`...). Plain `iptables-save` lists only existing tables
/// (with `-t` it prints an empty one).
pub fn existing_tables() -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in families() {
        let dump = t.save(&[])?;
        out.extend(
            TABLES
                .iter()
                .filter(|table| dump.lines().any(|l| l == format!("*{table}")))
                .map(|table| t.table_name(table)),
        );
    }
    Ok(out)
}

/// Replaces the contents of pfwd's chains with `rules` (creating the chains when missing), in both families' tables.
/// Counters of rules that stay are carried over (`iptables-restore -c`), so adding or removing one rule does not zero
/// the others.
pub fn sync_rules(rules: &[Rule]) -> Result<()> {
    for t in families() {
        sync_family(t, rules)?;
    }
    Ok(())
}

fn sync_family(t: &Tools, rules: &[Rule]) -> Result<()> {
    let counters = family_counters(t).unwrap_or_default();
    // A rule's total goes to its first line only (a rule with several backends has one per backend).
    let mut carried = std::collections::HashSet::new();
    let script: String = iptables::nat_chain_script(rules, t.family)
        .lines()
        .map(|line| {
            let id = line
                .split(|c: char| c == '"' || c.is_whitespace())
                .find_map(|t| t.strip_prefix(iptables::COMMENT_PREFIX));
            match counters.iter().find(|(i, _)| Some(i.to_string().as_str()) == id) {
                Some((i, c)) if line.starts_with("-A ") && carried.insert(*i) => {
                    format!("[{}:{}] {line}\n", c.packets, c.bytes)
                }
                _ => format!("{line}\n"),
            }
        })
        .collect();
    t.restore(&["-c"], &script).with_context(|| format!("applying pfwd's {} chains", t.cmd))?;
    Ok(())
}

/// Changes pfwd's chains from `old` rules to `new` ones with only the lines that differ (one `iptables-restore`, no
/// counters read or rewritten): a rule change then costs what it changes, not what is installed. The chains must
/// hold `old` exactly; see [`crate::iptables::nat_change_script`].
pub fn change_rules(old: &[Rule], new: &[Rule]) -> Result<()> {
    for t in families() {
        let Some(script) = iptables::nat_change_script(old, new, t.family) else { continue };
        t.restore(&[], &script).with_context(|| format!("changing pfwd's {} chains", t.cmd))?;
    }
    Ok(())
}

/// Writes the record ([`crate::record`]) as the `PFWD-RECORD` chain (replacing what it held).
pub fn write_record(rec: &Record) -> Result<()> {
    // The record lives in the IPv4 nat table only; it lists the tables of both families.
    FAMILIES[0].restore(&[], &rec.iptables_script()).context("writing pfwd's record chain")?;
    Ok(())
}

/// The record in iptables, if there is one.
pub fn read_record() -> Option<Record> {
    Record::from_iptables_save(&run("iptables-save", &["-t".into(), "nat".into()], None).ok()?)
}

/// Adds the jumps into pfwd's chains for `iface` (idempotent), in both families.
pub fn attach(iface: &str) -> Result<()> {
    for t in families() {
        for hook in iptables::hook_rules(Some(&[iface.to_string()])) {
            if t.iptables(&hook.check_args()).is_err() {
                t.iptables(&hook.append_args())?;
            }
        }
    }
    Ok(())
}

/// Removes the jumps for `iface`. Jumps shared by all interfaces (nat `OUTPUT -j PFWD-OUTPUT`) stay: other
/// interfaces are still attached; `unload` removes them with everything else.
pub fn detach(iface: &str) -> Result<()> {
    for t in families() {
        for hook in iptables::hook_rules(Some(&[iface.to_string()])).into_iter().filter(|h| !h.is_shared()) {
            if t.iptables(&hook.check_args()).is_ok() {
                t.iptables(&hook.delete_args())?;
            }
        }
    }
    Ok(())
}

/// Whether iptables holds any of pfwd's chains or jumps into them (in this namespace). False when iptables is not
/// usable here.
pub fn leftovers() -> bool {
    families().any(|t| t.save(&[]).is_ok_and(|dump| has_pfwd_lines(&dump)))
}

fn has_pfwd_lines(dump: &str) -> bool {
    dump.lines().any(|l| {
        l.strip_prefix(':').is_some_and(|c| c.starts_with(CHAIN_PREFIX))
            || l.split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| w[0] == "-j" && w[1].starts_with(CHAIN_PREFIX))
    })
}

/// Removes everything pfwd added: hooks (for any interface), then its chains, then the tables it created. Everything
/// is found in `iptables-save` by the chain prefix, so this also removes what a killed pfwd left unrecorded; tables
/// are removed only when recorded as created by pfwd and empty of others' rules.
pub fn unload(created_tables: &[String]) -> Result<()> {
    let mut errors = vec![];
    for t in families() {
        unload_family(t, created_tables, &mut errors);
    }
    if errors.is_empty() { Ok(()) } else { bail!("removing pfwd's iptables rules: {}", errors.join("; ")) }
}

fn unload_family(t: &Tools, created_tables: &[String], errors: &mut Vec<String>) {
    // Hooks are found by their target, so a hook for an interface that has since disappeared goes too.
    for table in TABLES {
        let listing = t.save(&["-t", table]).unwrap_or_default();
        for line in listing.lines() {
            let Some(rest) = line.strip_prefix("-A ") else { continue };
            let args: Vec<String> = rest.split_whitespace().map(String::from).collect();
            let builtin = args.first().is_some_and(|c| !c.starts_with(CHAIN_PREFIX));
            let jumps_to_pfwd = args.windows(2).any(|w| w[0] == "-j" && w[1].starts_with(CHAIN_PREFIX));
            if builtin && jumps_to_pfwd {
                let mut del = vec!["-t".to_string(), table.to_string(), "-D".to_string()];
                del.extend(args);
                if let Err(e) = t.iptables(&del) {
                    errors.push(format!("{e:#}"));
                }
            }
        }
        for line in listing.lines() {
            let Some(chain) = line.strip_prefix(':').and_then(|l| l.split_whitespace().next()) else { continue };
            if chain.starts_with(CHAIN_PREFIX) {
                for op in ["-F", "-X"] {
                    if let Err(e) = t.iptables(&["-t".into(), table.into(), op.into(), chain.into()]) {
                        errors.push(format!("{e:#}"));
                    }
                }
            }
        }
        if created_tables.iter().any(|c| *c == t.table_name(table)) {
            let listing = t.save(&["-t", table]).unwrap_or_default();
            let has_rules = listing.lines().any(|l| l.starts_with("-A "));
            if !has_rules {
                // iptables cannot delete a table; nft can, and iptables-nft tables are nft tables.
                let _ = run("nft", &["delete".into(), "table".into(), t.nft.into(), table.into()], None);
            }
        }
    }
}

/// The counters and rest of each line of `iptables-save -c` output tagged `pfwd:ID`, with the id.
fn counted_lines(dump: &str) -> impl Iterator<Item = (u32, RuleCounters, &str)> {
    dump.lines().filter_map(|line| {
        let (counts, rest) = line.strip_prefix('[').and_then(|l| l.split_once(']'))?;
        let id = rest.split(|c: char| c == '"' || c.is_whitespace()).find_map(|t| t.strip_prefix("pfwd:"))?;
        let (Ok(id), Some((p, b))) = (id.parse::<u32>(), counts.split_once(':')) else { return None };
        let (packets, bytes) = (p.parse().unwrap_or(0), b.parse().unwrap_or(0));
        Some((id, RuleCounters { packets, bytes, flows: packets, drops: 0 }, rest))
    })
}

/// Per-rule counters from the nat rules (`pfwd:ID` comments), the lines of one rule summed (a rule with several
/// backends has one line per backend). netfilter consults NAT rules only for the first packet of a connection, so
/// packets == flows here.
pub fn counters() -> Result<Vec<(u32, RuleCounters)>> {
    let mut dump = String::new();
    for t in families() {
        dump.push_str(&t.save(&["-c", "-t", "nat"])?);
    }
    Ok(sum_by_rule(&dump))
}

/// One family's per-rule counters.
fn family_counters(t: &Tools) -> Result<Vec<(u32, RuleCounters)>> {
    Ok(sum_by_rule(&t.save(&["-c", "-t", "nat"])?))
}

fn sum_by_rule(dump: &str) -> Vec<(u32, RuleCounters)> {
    let mut out: Vec<(u32, RuleCounters)> = vec![];
    for (id, c, _) in counted_lines(dump) {
        match out.iter_mut().find(|(i, _)| *i == id) {
            Some((_, sum)) => {
                sum.packets += c.packets;
                sum.bytes += c.bytes;
                sum.flows += c.flows;
            }
            None => out.push((id, c)),
        }
    }
    out
}

/// One DNAT line's counters: (rule id, backend address, port, counters).
pub type BackendCount = (u32, IpAddr, Option<u16>, RuleCounters);

/// Per-backend counters of rules with several backends: each DNAT line's, by its `--to-destination`.
pub fn backend_counters() -> Result<Vec<BackendCount>> {
    let mut dump = String::new();
    for t in families() {
        dump.push_str(&t.save(&["-c", "-t", "nat"])?);
    }
    Ok(counted_lines(&dump)
        .filter_map(|(id, c, rest)| {
            let to = rest.split_once("--to-destination ")?.1.split_whitespace().next()?;
            let (addr, port) = crate::rules::parse_to(to).ok()?;
            Some((id, addr, port, c))
        })
        .collect())
}

/// netfilter's connection count in this namespace (all connections, not only translated ones).
pub fn conntrack_count() -> u64 {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Connections netfilter translated by destination (what pfwd's rules create), from the `conntrack` tool;
/// None when the tool is missing.
pub fn dnat_flows() -> Option<u64> {
    let mut n = 0;
    for f in CONNTRACK_FAMILIES {
        let out = run("conntrack", &["-L".into(), "-f".into(), f.into(), "--dst-nat".into()], None).ok()?;
        n += out.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    }
    Some(n)
}

/// `conntrack -f` values: the tool lists IPv4 connections only unless told otherwise.
const CONNTRACK_FAMILIES: [&str; 2] = ["ipv4", "ipv6"];

/// netfilter's translated connections (from `conntrack -L`), as `pfwd conntrack` lists them: entries whose reply
/// tuple is not simply the original reversed. Empty when the conntrack tool is missing.
pub fn conntrack_list() -> Vec<ConntrackEntry> {
    let mut out = Vec::new();
    for f in CONNTRACK_FAMILIES {
        // One family's listing failing (no IPv6 here) leaves the other's.
        let Ok(text) = run("conntrack", &["-L".into(), "-f".into(), f.into()], None) else { continue };
        out.extend(text.lines().filter_map(parse_conntrack_line));
    }
    out
}

/// Deletes these connections from netfilter's table (each by its exact original tuple); returns how many were
/// deleted. A connection that ended meanwhile is not an error.
pub fn conntrack_delete(entries: &[ConntrackEntry]) -> Result<usize> {
    let mut deleted = 0;
    for e in entries {
        // `conntrack -D` exits non-zero when nothing matched (the connection is already gone).
        if run("conntrack", &crate::flows::conntrack_delete_args(e), None).is_ok() {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// One line of `conntrack -L`, when it is a translated connection.
fn parse_conntrack_line(line: &str) -> Option<ConntrackEntry> {
    // e.g. "tcp 6 431999 ESTABLISHED src=A dst=B sport=1 dport=2 src=C dst=D sport=3 dport=4 [ASSURED] ..."
    // or   "icmp 1 29 src=A dst=B type=8 code=0 id=7 src=C dst=D type=0 code=0 id=9 mark=0 ..."
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |k: &str, nth: usize| words.iter().filter_map(|w| w.strip_prefix(k)).nth(nth);
    let port = |k: &str, nth: usize| field(k, nth).and_then(|v| v.parse::<u16>().ok());
    let addr = |k: &str, nth: usize| field(k, nth).and_then(|v| v.parse::<IpAddr>().ok());
    let tuple = |nth: usize| {
        // An ICMP echo's identifier stands in for both ports, as in pfwd's own tables.
        let (sport, dport) = match field("id=", nth) {
            Some(id) => (id.parse().ok(), id.parse().ok()),
            None => (port("sport=", nth), port("dport=", nth)),
        };
        FlowTuple { dport, dst: addr("dst=", nth), sport, src: addr("src=", nth) }
    };
    let (o, r) = (tuple(0), tuple(1));
    let dnat = r.src != o.dst || r.sport != o.dport;
    let snat = r.dst != o.src || r.dport != o.sport;
    let nat = match (dnat, snat) {
        (true, true) => Nat::DnatSnat,
        (true, false) => Nat::Dnat,
        (false, true) => Nat::Snat,
        (false, false) => return None,
    };
    Some(ConntrackEntry {
        age_s: None,
        expires_in_s: words.get(2).and_then(|w| w.parse().ok()),
        idle_s: None,
        nat,
        original: o,
        proto: words.first()?.to_string(),
        reply: r,
        rule: None,
        state: words.get(3).filter(|w| !w.contains('=')).map(|w| w.to_string()),
        // What the original packets were translated to: the reply tuple reversed.
        translated: FlowTuple { dport: r.sport, dst: r.src, sport: r.dport, src: r.dst },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_lines() {
        let dnat = "udp      17 29 src=10.9.0.2 dst=10.9.0.1 sport=45313 dport=5000 [UNREPLIED] src=10.9.0.1 \
                    dst=10.9.0.2 sport=6000 dport=45313 mark=0 use=1";
        let e = parse_conntrack_line(dnat).unwrap();
        assert_eq!((e.nat, e.proto.as_str(), e.state.as_deref(), e.expires_in_s), (Nat::Dnat, "udp", None, Some(29.0)));
        assert_eq!(e.translated.dport, Some(6000));
        assert_eq!(e.translated.dst, Some("10.9.0.1".parse().unwrap()));
        let json = serde_json::to_value(&e).unwrap();
        assert!(json.get("age_s").is_none() && json["rule"].is_null(), "{json}");

        let tcp = "tcp      6 431999 ESTABLISHED src=10.0.1.2 dst=10.0.1.1 sport=40000 dport=80 src=10.0.2.2 \
                   dst=10.0.2.1 sport=9000 dport=2000 [ASSURED] mark=0 use=1";
        let e = parse_conntrack_line(tcp).unwrap();
        assert_eq!((e.nat, e.state.as_deref()), (Nat::DnatSnat, Some("ESTABLISHED")));

        // An echo's identifier stands for both ports.
        let echo = "icmp     1 29 src=10.0.1.2 dst=10.0.2.2 type=8 code=0 id=7 src=10.0.2.2 dst=10.0.2.1 type=0 \
                    code=0 id=7 mark=0 use=1";
        let e = parse_conntrack_line(echo).unwrap();
        assert_eq!((e.nat, e.original.sport, e.original.dport), (Nat::Snat, Some(7), Some(7)));
        assert_eq!(e.translated.src, Some("10.0.2.1".parse().unwrap()));

        let plain =
            "tcp 6 10 TIME_WAIT src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2 src=10.0.0.2 dst=10.0.0.1 sport=2 dport=1";
        assert!(parse_conntrack_line(plain).is_none());
    }
}
