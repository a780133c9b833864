//! The nftables data path (`--mode nft`, and what `auto` picks before iptables when eBPF cannot run): pfwd's rules in
//! one table of its own, `inet pfwd_nat`, for IPv4 and IPv6 alike. Nothing outside that table is touched; detach
//! deletes it, so `nft list ruleset` reads as it did before attach.
//!
//! Constant time: a rule with one protocol and one destination port (most port forwards) sits in a chain of its own
//! protocol and port (`pre_tcp_80`), reached through one verdict-map lookup per packet (`meta l4proto . th dport vmap
//! @pre_ports`); the rules with a port range or without a port follow in the hook's chain, in precedence order. A rule
//! with one port is more specific than any rule with a range or none (precedence rule 1), so the chain the map picks
//! holds the best candidates, in precedence order, and when none of them matches, the packet goes on through the rest
//! as the precedence contract wants. The rule set's size then costs new connections nothing (iptables walks it).
//!
//! Like iptables, netfilter consults the nat chains for a connection's first packet only; conntrack does the rest.
//! The interfaces pfwd is attached to are the set `@ifaces`; the record ([`crate::record`]) is kept as comments in the
//! chain `record`, which nothing jumps to.
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use pfwd_common::RuleCounters;

use crate::fallback::BackendCount;
use crate::iptables::{self, NAT_HOOKS, NatHook};
use crate::record::{COMMENT_PREFIX, Record};
use crate::rules::{Rule, Target, with_companions};

/// pfwd's table (family inet: both IPv4 and IPv6).
pub const TABLE: &str = "pfwd_nat";
/// The chain holding the record.
const RECORD_CHAIN: &str = "record";

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is the nftables package installed?)")?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether nft and a kernel with nftables NAT are usable here: a throwaway table with a nat chain is checked
/// (`nft -c`, nothing is created).
pub fn available() -> Result<()> {
    nft(
        &["-c", "-f", "-"],
        Some("table inet pfwd_probe {\n\tchain p {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t}\n}\n"),
    )
    .map(|_| ())
}

/// The short name of a hook in chain and map names.
fn hook_name(hook: NatHook) -> &'static str {
    match hook {
        NatHook::Prerouting => "pre",
        NatHook::Postrouting => "post",
        NatHook::Output => "out",
    }
}

/// A rule's counter statement: its current counts carried over (`nft -f` replaces the table, and with it the
/// counters, so they are written back), or zero.
fn counter(counts: Option<&RuleCounters>) -> String {
    match counts {
        Some(c) => format!("counter packets {} bytes {}", c.packets, c.bytes),
        None => "counter".to_string(),
    }
}

/// One rule's lines (more than one for a rule with several backends: a `numgen` verdict map into a chain per
/// backend, each with its own counter). `extra` collects the chains the rule needs.
fn rule_lines(
    r: &Rule,
    companion: bool,
    counts: &BTreeMap<String, RuleCounters>,
    extra: &mut Vec<(String, Vec<String>)>,
) -> String {
    let comment = iptables::nft_comment(r.id, companion);
    let tag = |suffix: &str| format!("{comment}{suffix}");
    let matches = iptables::nft_matches(r);
    let mut parts = matches.clone();
    if matches!(r.target, Target::Dnat { .. }) && !r.backends.is_empty() {
        // Each backend's share of `numgen random mod TOTAL` jumps to its chain, which counts and translates.
        let total: u32 = r.backends.iter().map(|b| b.weight).sum();
        let mut from = 0;
        let mut items = Vec::new();
        for (k, b) in r.backends.iter().enumerate() {
            let to = from + b.weight - 1;
            let key = if to == from { from.to_string() } else { format!("{from}-{to}") };
            let chain = format!("lb_{}_{k}", r.id);
            let key_tag = format!(" backend {k}");
            // nft takes a port translation only after a protocol match, which the jumping rule's does not count as.
            let proto = r.proto.map(|p| format!("meta l4proto {p} ")).unwrap_or_default();
            let body = format!(
                "{proto}{} {} comment \"{}\"",
                counter(counts.get(&tag(&key_tag))),
                iptables::nft_dnat(r, b.addr, b.port),
                tag(&key_tag)
            );
            items.push(format!("{key} : jump {chain}"));
            extra.push((chain, vec![body]));
            from = to + 1;
        }
        parts.push(format!("numgen random mod {total} vmap {{ {} }}", items.join(", ")));
        return parts.join(" ");
    }
    parts.push(counter(counts.get(&comment)));
    parts.push(iptables::nft_action(r));
    parts.push(format!("comment \"{comment}\""));
    parts.join(" ")
}

/// The whole table as an `nft -f` script that replaces any earlier copy in one transaction: `ifaces` in `@ifaces`,
/// the rules (with their companions) with `counts` (by comment) carried over, and the record.
pub fn script(rules: &[Rule], ifaces: &[String], rec: &Record, counts: &BTreeMap<String, RuleCounters>) -> String {
    let mut out = format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n\ntable inet {TABLE} {{\n");
    let names: Vec<String> = ifaces.iter().map(|i| format!("\"{i}\"")).collect();
    out.push_str("\tset ifaces {\n\t\ttype ifname;\n");
    if !names.is_empty() {
        out.push_str(&format!("\t\telements = {{ {} }};\n", names.join(", ")));
    }
    out.push_str("\t}\n\n");
    let (all, owners) = with_companions(rules);
    let mut extra: Vec<(String, Vec<String>)> = Vec::new();
    for hook in NAT_HOOKS {
        let name = hook_name(hook);
        // (protocol, port) -> that chain's rules, in precedence order; then the others.
        let mut by_port: BTreeMap<(String, u16), Vec<String>> = BTreeMap::new();
        let mut rest = Vec::new();
        for i in iptables::hook_order(&all, hook) {
            let r = &all[i];
            let line = rule_lines(r, owners[i].is_some(), counts, &mut extra);
            match (r.proto, r.dport) {
                (Some(p), Some(d)) if d.lo == d.hi => by_port.entry((p.to_string(), d.lo)).or_default().push(line),
                _ => rest.push(line),
            }
        }
        if !by_port.is_empty() {
            let items: Vec<String> =
                by_port.keys().map(|(p, port)| format!("{p} . {port} : jump {name}_{p}_{port}")).collect();
            out.push_str(&format!(
                "\tmap {name}_ports {{\n\t\ttype inet_proto . inet_service : verdict;\n\t\telements = {{ {} }};\n\t}}\n\n",
                items.join(", ")
            ));
            for ((p, port), lines) in by_port {
                extra.push((format!("{name}_{p}_{port}"), lines));
            }
        }
        let (chain, priority) = match hook {
            NatHook::Prerouting => ("prerouting", "dstnat"),
            NatHook::Postrouting => ("postrouting", "srcnat"),
            // nft 1.0.6 refuses the keyword dstnat in the output hook; -100 is its value.
            NatHook::Output => ("output", "-100"),
        };
        out.push_str(&format!("\tchain {chain} {{\n\t\ttype nat hook {chain} priority {priority}; policy accept;\n"));
        // Only the attached interfaces (incoming for prerouting, outgoing for postrouting); local connections
        // (output) are not tied to one.
        match hook {
            NatHook::Prerouting => out.push_str("\t\tiifname != @ifaces accept\n"),
            NatHook::Postrouting => out.push_str("\t\toifname != @ifaces accept\n"),
            NatHook::Output => {}
        }
        if out.contains(&format!("map {name}_ports ")) {
            out.push_str(&format!("\t\tmeta l4proto . th dport vmap @{name}_ports\n"));
        }
        for line in rest {
            out.push_str(&format!("\t\t{line}\n"));
        }
        out.push_str("\t}\n\n");
    }
    for (chain, lines) in extra {
        out.push_str(&format!("\tchain {chain} {{\n"));
        for line in lines {
            out.push_str(&format!("\t\t{line}\n"));
        }
        out.push_str("\t}\n\n");
    }
    // Forwarded packets conntrack finds invalid (iptables mode's PFWD-FORWARD): dropped on attached interfaces.
    out.push_str(
        "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname @ifaces ct state invalid drop\n\t\toifname @ifaces ct state invalid drop\n\t}\n\n",
    );
    out.push_str(&format!("\tchain {RECORD_CHAIN} {{\n"));
    for item in record_items(rec) {
        out.push_str(&format!("\t\taccept comment \"{COMMENT_PREFIX} {item}\"\n"));
    }
    out.push_str("\t}\n}\n");
    out
}

/// The record's items, as the iptables record writes them (`sysctl KEY VALUE`).
fn record_items(rec: &Record) -> Vec<String> {
    rec.sysctls.iter().map(|(k, v)| format!("sysctl {k} {v}")).collect()
}

/// Makes the table hold exactly `rules`, for `ifaces`, with `rec` (one `nft -f` transaction); the counters of the
/// rules that stay are carried over.
pub fn sync(rules: &[Rule], ifaces: &[String], rec: &Record) -> Result<()> {
    let counts = comment_counters().unwrap_or_default();
    nft(&["-f", "-"], Some(&script(rules, ifaces, rec, &counts))).context("applying pfwd's nftables table")?;
    Ok(())
}

/// Replaces the record (the chain's contents only).
pub fn write_record(rec: &Record) -> Result<()> {
    let mut s = format!("flush chain inet {TABLE} {RECORD_CHAIN}\n");
    for item in record_items(rec) {
        s.push_str(&format!("add rule inet {TABLE} {RECORD_CHAIN} accept comment \"{COMMENT_PREFIX} {item}\"\n"));
    }
    nft(&["-f", "-"], Some(&s)).context("writing pfwd's record chain")?;
    Ok(())
}

/// Adds `iface` to the attached interfaces.
pub fn attach(iface: &str) -> Result<()> {
    nft(&["add", "element", "inet", TABLE, "ifaces", &format!("{{ \"{iface}\" }}")], None).map(|_| ())
}

/// Removes `iface` from the attached interfaces (nothing when it is not there).
pub fn detach(iface: &str) -> Result<()> {
    let listed = nft(&["list", "set", "inet", TABLE, "ifaces"], None).unwrap_or_default();
    if !listed.contains(&format!("\"{iface}\"")) {
        return Ok(());
    }
    nft(&["delete", "element", "inet", TABLE, "ifaces", &format!("{{ \"{iface}\" }}")], None).map(|_| ())
}

/// Whether pfwd's table exists (in this namespace). False when nft is not usable here.
pub fn leftovers() -> bool {
    nft(&["list", "table", "inet", TABLE], None).is_ok()
}

/// Deletes pfwd's table, if there.
pub fn unload() -> Result<()> {
    if leftovers() {
        nft(&["delete", "table", "inet", TABLE], None).context("deleting pfwd's nftables table")?;
    }
    Ok(())
}

/// The record kept in the table, if the table is there.
pub fn read_record() -> Option<Record> {
    let text = nft(&["list", "chain", "inet", TABLE, RECORD_CHAIN], None).ok()?;
    let mut rec = Record::default();
    for line in text.lines() {
        let Some(item) = line.split_once(COMMENT_PREFIX).and_then(|(_, rest)| rest.split('"').next()) else {
            continue;
        };
        if let ["sysctl", key, value] = item.split_whitespace().collect::<Vec<_>>().as_slice() {
            rec.sysctls.push((key.to_string(), value.to_string()));
        }
    }
    Some(rec)
}

/// Every counted rule of the table by its comment (`pfwd:3`, `pfwd:3 backend 1`...), summed.
fn comment_counters() -> Result<BTreeMap<String, RuleCounters>> {
    let text = nft(&["-j", "list", "table", "inet", TABLE], None)?;
    let json: serde_json::Value = serde_json::from_str(&text).context("reading nft's JSON")?;
    let mut out: BTreeMap<String, RuleCounters> = BTreeMap::new();
    for item in json["nftables"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let rule = &item["rule"];
        let Some(comment) = rule["comment"].as_str() else { continue };
        let Some(c) = rule["expr"].as_array().and_then(|e| e.iter().find_map(|x| x.get("counter"))) else { continue };
        let (packets, bytes) = (c["packets"].as_u64().unwrap_or(0), c["bytes"].as_u64().unwrap_or(0));
        let sum = out.entry(comment.to_string()).or_default();
        sum.packets += packets;
        sum.bytes += bytes;
        sum.flows += packets;
    }
    Ok(out)
}

/// Per-rule counters (`pfwd:ID`; a rule with several backends sums its backends' chains). As in iptables mode,
/// netfilter consults NAT rules only for a connection's first packet, so packets == flows.
pub fn counters() -> Result<Vec<(u32, RuleCounters)>> {
    let mut out: BTreeMap<u32, RuleCounters> = BTreeMap::new();
    for (comment, c) in comment_counters()? {
        let Some(id) = comment.strip_prefix(iptables::COMMENT_PREFIX) else { continue };
        // `pfwd:3` and `pfwd:3 backend 1` count for rule 3; `pfwd:3-hairpin` (the companion) does not.
        let Ok(id) = id.split(' ').next().unwrap_or_default().parse::<u32>() else { continue };
        let sum = out.entry(id).or_default();
        sum.packets += c.packets;
        sum.bytes += c.bytes;
        sum.flows += c.flows;
    }
    Ok(out.into_iter().collect())
}

/// Per-backend counters of rules with several backends: each backend chain's, with its address and port (from the
/// rules in `rules`, by the backend's position).
pub fn backend_counters(rules: &[Rule]) -> Result<Vec<BackendCount>> {
    let counts = comment_counters()?;
    let mut out = Vec::new();
    for r in rules.iter().filter(|r| !r.backends.is_empty()) {
        for (k, b) in r.backends.iter().enumerate() {
            let comment = format!("{}{} backend {k}", iptables::COMMENT_PREFIX, r.id);
            if let Some(c) = counts.get(&comment) {
                out.push((r.id, b.addr, b.port, *c));
            }
        }
    }
    Ok(out)
}
