//! The nftables data path (`--mode nft`, and what `auto` picks before iptables when eBPF cannot run): pfwd's rules in
//! one table of its own, `inet pfwd_nat`, for IPv4 and IPv6 alike. Nothing outside that table is touched; detach
//! deletes it, so `nft list ruleset` reads as it did before attach.
//!
//! Constant time: a plain port forward (DNAT on one interface, protocol and port to one address and port) is an
//! element of a translation map keyed by (interface, protocol, port) ([`translation`]); another rule with one
//! protocol and one destination port sits in a chain of its own protocol and port (`pre_tcp_80`), reached through
//! one verdict-map lookup per packet (`meta l4proto . th dport vmap @pre_ports`); the rules with a port range or
//! without a port follow in the hook's chain, in precedence order. A rule
//! with one port is more specific than any rule with a range or none (precedence rule 1), so the chain the map picks
//! holds the best candidates, in precedence order, and when none of them matches, the packet goes on through the rest
//! as the precedence contract wants. The rule set's size then costs new connections nothing (iptables walks it).
//!
//! Like iptables, netfilter consults the nat chains for a connection's first packet only; conntrack does the rest.
//! The interfaces pfwd is attached to are the set `@ifaces`; the record ([`crate::record`]) is kept as comments in the
//! chain `record`, which nothing jumps to.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use anyhow::{Context, Result};
use pfwd_common::RuleCounters;

use crate::fallback::BackendCount;
use crate::iptables::{self, NAT_HOOKS, NatHook};
use crate::record::{COMMENT_PREFIX, Record};
use crate::rules::{Proto, Rule, Target, with_companions};

/// pfwd's table (family inet: both IPv4 and IPv6).
pub const TABLE: &str = "pfwd_nat";
/// The chain holding the record.
const RECORD_CHAIN: &str = "record";

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String> {
    crate::fallback::run("nft", &args.iter().map(|a| a.to_string()).collect::<Vec<_>>(), stdin)
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

/// One line of a chain: its text, with the counter statement (of the count kept under `counted`, the rule's
/// comment) between `before` and `after` when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    before: String,
    counted: Option<String>,
    after: String,
}

impl Line {
    fn plain(text: String) -> Line {
        Line { before: text, counted: None, after: String::new() }
    }

    fn render(&self, counts: &BTreeMap<String, RuleCounters>) -> String {
        match &self.counted {
            Some(c) => format!("{}{} {}", self.before, counter(counts.get(c)), self.after),
            None => self.before.clone(),
        }
    }
}

/// One rule's line (for a rule with several backends: a `numgen` verdict map into a chain per backend, each with its
/// own counter; `chains` collects those).
fn rule_line(r: &Rule, companion: bool, chains: &mut BTreeMap<String, Vec<Line>>) -> Line {
    let comment = iptables::nft_comment(r.id, companion);
    let matches = iptables::nft_matches(r);
    let lead = |parts: &[String]| if parts.is_empty() { String::new() } else { format!("{} ", parts.join(" ")) };
    if matches!(r.target, Target::Dnat { .. }) && !r.backends.is_empty() {
        // Each backend's share of `numgen random mod TOTAL` jumps to its chain, which counts and translates.
        let total: u32 = r.backends.iter().map(|b| b.weight).sum();
        let mut from = 0;
        let mut items = Vec::new();
        for (k, b) in r.backends.iter().enumerate() {
            let to = from + b.weight - 1;
            let key = if to == from { from.to_string() } else { format!("{from}-{to}") };
            let chain = format!("lb_{}_{k}", r.id);
            let tag = format!("{comment} backend {k}");
            // nft takes a port translation only after a protocol match, which the jumping rule's does not count as.
            let proto = r.proto.map(|p| format!("meta l4proto {p} ")).unwrap_or_default();
            let after = format!("{} comment \"{tag}\"", iptables::nft_dnat(r, b.addr, b.port));
            items.push(format!("{key} : jump {chain}"));
            chains.insert(chain, vec![Line { before: proto, counted: Some(tag), after }]);
            from = to + 1;
        }
        return Line::plain(format!("{}numgen random mod {total} vmap {{ {} }}", lead(&matches), items.join(", ")));
    }
    let after = format!("{} comment \"{comment}\"", iptables::nft_action(r));
    Line { before: lead(&matches), counted: Some(comment), after }
}

/// Where a hook's rules go (indices into the rules, each list in precedence order): the chain of each (protocol,
/// port) for rules with one protocol and one port, reached through the hook's verdict map, and the hook's own chain
/// for the others (after the map).
struct Layout {
    by_port: BTreeMap<(Proto, u16), Vec<usize>>,
    rest: Vec<usize>,
}

fn layout(all: &[Rule], hook: NatHook) -> Layout {
    let mut by_port: BTreeMap<(Proto, u16), Vec<usize>> = BTreeMap::new();
    let mut rest = Vec::new();
    for i in iptables::hook_order(all, hook) {
        match (all[i].proto, all[i].dport) {
            (Some(p), Some(d)) if d.lo == d.hi => by_port.entry((p, d.lo)).or_default().push(i),
            _ => rest.push(i),
        }
    }
    Layout { by_port, rest }
}

/// What the rules make of the table: the hooks' verdict maps (name -> elements), their base chains (name -> header
/// and lines) and the chains they jump to (per port, per backend).
#[derive(Debug, PartialEq, Eq)]
struct Model {
    maps: BTreeMap<String, Vec<String>>,
    /// The translation maps ([`DNAT4`], [`DNAT6`]): element key -> element.
    dnat: BTreeMap<&'static str, BTreeMap<String, Elem>>,
    base: Vec<(String, String, Vec<Line>)>,
    chains: BTreeMap<String, Vec<Line>>,
}

/// The translation map of IPv4 DNAT rules and of IPv6 ones (see [`translation`]).
const DNAT4: &str = "pre_dnat4";
const DNAT6: &str = "pre_dnat6";

/// A translation map's type: (incoming interface, protocol, port) to (address, port); `counter` gives every element
/// its own.
fn dnat_map_type(map: &str) -> String {
    let addr = if map == DNAT6 { "ipv6_addr" } else { "ipv4_addr" };
    format!("type ifname . inet_proto . inet_service : {addr} . inet_service; counter;")
}

/// One rule in a translation map: where it translates to (`10.0.2.2 . 8080`) and its counter's comment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Elem {
    to: String,
    comment: String,
}

impl Elem {
    /// The element as `nft` takes it, its count (by comment) carried over.
    fn render(&self, key: &str, counts: &BTreeMap<String, RuleCounters>) -> String {
        format!("{key} {} comment \"{}\" : {}", counter(counts.get(&self.comment)), self.comment, self.to)
    }
}

/// Where a rule goes when a translation map can hold it: a DNAT on one incoming interface, of one protocol and one
/// port, to one address and port, with nothing else to match (the common port forward). Its map, key
/// (`"eth0" . tcp . 80`) and element. Such rules cost `nft -f` one map element each instead of a chain and a rule
/// (10,000 of them load in a fifth of the time), and the packet one lookup.
fn translation(r: &Rule, companion: bool) -> Option<(&'static str, String, Elem)> {
    let Target::Dnat { addr, port: Some(to_port) } = r.target else { return None };
    let (Some(iface), Some(p), Some(d)) = (&r.iface, r.proto, r.dport) else { return None };
    let plain = !companion
        && d.lo == d.hi
        && !r.not.iface
        && r.oface.is_none()
        && r.src.is_none()
        && r.dst.is_none()
        && !r.local
        && !r.dst_local
        && r.hairpin.is_none()
        && r.backends.is_empty()
        && r.family.is_none_or(|f| f == crate::rules::model::Family::of(addr));
    if !plain {
        return None;
    }
    let map = if addr.is_ipv4() { DNAT4 } else { DNAT6 };
    let comment = iptables::nft_comment(r.id, false);
    Some((map, format!("\"{iface}\" . {p} . {}", d.lo), Elem { to: format!("{addr} . {to_port}"), comment }))
}

/// Takes out of `by_port` (a prerouting layout's) the ports whose rules the translation maps can all hold, each
/// under a key of its own (rules on different interfaces or of different families: no order among them to keep),
/// and returns their elements with each one's rule (an index into `all`). The other ports keep their chains, where
/// the rules are tried in precedence order.
fn take_translations(
    all: &[Rule],
    owners: &[Option<usize>],
    by_port: &mut BTreeMap<(Proto, u16), Vec<usize>>,
) -> Vec<(&'static str, String, Elem, usize)> {
    let mut out = Vec::new();
    by_port.retain(|_, ids| {
        let elems: Option<Vec<_>> =
            ids.iter().map(|&i| translation(&all[i], owners[i].is_some()).map(|(m, k, e)| (m, k, e, i))).collect();
        let Some(elems) = elems else { return true };
        let keys: HashSet<(&str, &String)> = elems.iter().map(|(m, k, ..)| (*m, k)).collect();
        if keys.len() < elems.len() {
            return true;
        }
        out.extend(elems);
        false
    });
    out
}

fn model(rules: &[Rule]) -> Model {
    let (all, owners) = with_companions(rules);
    let mut m = Model { maps: BTreeMap::new(), dnat: BTreeMap::new(), base: Vec::new(), chains: BTreeMap::new() };
    for hook in NAT_HOOKS {
        let name = hook_name(hook);
        let Layout { mut by_port, rest } = layout(&all, hook);
        if hook == NatHook::Prerouting {
            for (map, key, e, _) in take_translations(&all, &owners, &mut by_port) {
                m.dnat.entry(map).or_default().insert(key, e);
            }
        }
        let (chain, priority) = match hook {
            NatHook::Prerouting => ("prerouting", "dstnat"),
            NatHook::Postrouting => ("postrouting", "srcnat"),
            // nft 1.0.6 refuses the keyword dstnat in the output hook; -100 is its value.
            NatHook::Output => ("output", "-100"),
        };
        let mut lines = Vec::new();
        // Only the attached interfaces (incoming for prerouting, outgoing for postrouting); local connections
        // (output) are not tied to one.
        match hook {
            NatHook::Prerouting => lines.push(Line::plain("iifname != @ifaces accept".into())),
            NatHook::Postrouting => lines.push(Line::plain("oifname != @ifaces accept".into())),
            NatHook::Output => {}
        }
        if hook == NatHook::Prerouting {
            // A miss in a map ends the line (nft's break): the packet goes on to the next.
            for (map, fam, nfproto) in [(DNAT4, "ip", "ipv4"), (DNAT6, "ip6", "ipv6")] {
                if m.dnat.contains_key(map) {
                    lines.push(Line::plain(format!(
                        "meta nfproto {nfproto} dnat {fam} to iifname . meta l4proto . th dport map @{map}"
                    )));
                }
            }
        }
        if !by_port.is_empty() {
            let map = format!("{name}_ports");
            lines.push(Line::plain(format!("meta l4proto . th dport vmap @{map}")));
            let mut items = Vec::new();
            for ((p, port), ids) in by_port {
                let target = format!("{name}_{p}_{port}");
                items.push(format!("{p} . {port} : jump {target}"));
                let body = ids.into_iter().map(|i| rule_line(&all[i], owners[i].is_some(), &mut m.chains)).collect();
                m.chains.insert(target, body);
            }
            m.maps.insert(map, items);
        }
        lines.extend(rest.into_iter().map(|i| rule_line(&all[i], owners[i].is_some(), &mut m.chains)));
        let header = format!("type nat hook {chain} priority {priority}; policy accept;");
        m.base.push((chain.to_string(), header, lines));
    }
    m
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
    let m = model(rules);
    for (map, items) in &m.maps {
        out.push_str(&format!(
            "\tmap {map} {{\n\t\ttype inet_proto . inet_service : verdict;\n\t\telements = {{ {} }};\n\t}}\n\n",
            items.join(", ")
        ));
    }
    for (map, elems) in &m.dnat {
        let items: Vec<String> = elems.iter().map(|(k, e)| e.render(k, counts)).collect();
        out.push_str(&format!(
            "\tmap {map} {{\n\t\t{}\n\t\telements = {{ {} }};\n\t}}\n\n",
            dnat_map_type(map),
            items.join(", ")
        ));
    }
    let chain = |out: &mut String, name: &str, header: Option<&str>, lines: &[Line]| {
        out.push_str(&format!("\tchain {name} {{\n"));
        if let Some(h) = header {
            out.push_str(&format!("\t\t{h}\n"));
        }
        for l in lines {
            out.push_str(&format!("\t\t{}\n", l.render(counts)));
        }
        out.push_str("\t}\n\n");
    };
    for (name, header, lines) in &m.base {
        chain(&mut out, name, Some(header), lines);
    }
    for (name, lines) in &m.chains {
        chain(&mut out, name, None, lines);
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

/// Chains a change rewrites: above this many, one full replace is cheaper than reading their counters one by one.
const MAX_REWRITTEN: usize = 32;

/// The `nft -f` script that changes the table from model `a` to model `b`, touching only what differs: new and
/// removed per-port and backend chains and map elements, and the chains whose lines change (flushed and written
/// again, with the counters in `counts`). Empty when nothing changes.
fn change_script(a: &Model, b: &Model, counts: &BTreeMap<String, RuleCounters>) -> String {
    let t = format!("inet {TABLE}");
    let mut s = String::new();
    let write = |s: &mut String, chain: &str, lines: &[Line]| {
        for l in lines {
            s.push_str(&format!("add rule {t} {chain} {}\n", l.render(counts)));
        }
    };
    // 1. New chains, then the contents of every new or changed jump target.
    for name in b.chains.keys().filter(|n| !a.chains.contains_key(*n)) {
        s.push_str(&format!("add chain {t} {name}\n"));
    }
    for (name, lines) in &b.chains {
        match a.chains.get(name) {
            Some(old) if old == lines => {}
            Some(_) => {
                s.push_str(&format!("flush chain {t} {name}\n"));
                write(&mut s, name, lines);
            }
            None => write(&mut s, name, lines),
        }
    }
    // 2. New maps and elements (their chains exist now).
    let set = |m: &BTreeMap<String, Vec<String>>, map: &str| -> HashSet<String> {
        m.get(map).map(|v| v.iter().cloned().collect()).unwrap_or_default()
    };
    for (map, items) in &b.maps {
        let had = set(&a.maps, map);
        if !a.maps.contains_key(map) {
            s.push_str(&format!("add map {t} {map} {{ type inet_proto . inet_service : verdict; }}\n"));
        }
        let added: Vec<&String> = items.iter().filter(|i| !had.contains(*i)).collect();
        if !added.is_empty() {
            let added: Vec<&str> = added.iter().map(|i| i.as_str()).collect();
            s.push_str(&format!("add element {t} {map} {{ {} }}\n", added.join(", ")));
        }
    }
    // New translation maps, then their new elements; an element whose translation changes is deleted and added again.
    for (map, elems) in &b.dnat {
        let had = a.dnat.get(*map);
        let changed: Vec<&str> = match had {
            None => {
                s.push_str(&format!("add map {t} {map} {{ {} }}\n", dnat_map_type(map)));
                Vec::new()
            }
            Some(had) => {
                elems.iter().filter(|(k, e)| had.get(*k).is_some_and(|o| o != *e)).map(|(k, _)| k.as_str()).collect()
            }
        };
        if !changed.is_empty() {
            s.push_str(&format!("delete element {t} {map} {{ {} }}\n", changed.join(", ")));
        }
        let added: Vec<String> = elems
            .iter()
            .filter(|(k, e)| had.and_then(|h| h.get(*k)) != Some(*e))
            .map(|(k, e)| e.render(k, counts))
            .collect();
        if !added.is_empty() {
            s.push_str(&format!("add element {t} {map} {{ {} }}\n", added.join(", ")));
        }
    }
    // 3. The base chains whose lines change.
    for ((name, _, old), (_, _, lines)) in a.base.iter().zip(&b.base) {
        if old != lines {
            s.push_str(&format!("flush chain {t} {name}\n"));
            write(&mut s, name, lines);
        }
    }
    // 4. Elements and maps no longer wanted, then the chains nothing jumps to any more.
    for (map, items) in &a.maps {
        let keep = set(&b.maps, map);
        let gone: Vec<&str> = items
            .iter()
            .filter(|i| !keep.contains(*i))
            // An element is named by its key (`tcp . 80`), without its verdict.
            .map(|i| i.split(" : ").next().unwrap_or(i))
            .collect();
        if !b.maps.contains_key(map) {
            s.push_str(&format!("delete map {t} {map}\n"));
        } else if !gone.is_empty() {
            s.push_str(&format!("delete element {t} {map} {{ {} }}\n", gone.join(", ")));
        }
    }
    for (map, elems) in &a.dnat {
        match b.dnat.get(*map) {
            None => s.push_str(&format!("delete map {t} {map}\n")),
            Some(keep) => {
                let gone: Vec<&str> = elems.keys().filter(|k| !keep.contains_key(*k)).map(String::as_str).collect();
                if !gone.is_empty() {
                    s.push_str(&format!("delete element {t} {map} {{ {} }}\n", gone.join(", ")));
                }
            }
        }
    }
    // All flushed before any is deleted: a removed port chain may jump to a removed backend chain.
    let removed: Vec<&String> = a.chains.keys().filter(|n| !b.chains.contains_key(*n)).collect();
    for name in &removed {
        s.push_str(&format!("flush chain {t} {name}\n"));
    }
    for name in &removed {
        s.push_str(&format!("delete chain {t} {name}\n"));
    }
    s
}

/// Changes the table from `old` rules to `new` ones with only what differs (see [`change_script`]), carrying the
/// counters of the rewritten chains; a change that rewrites many chains replaces the table instead ([`sync`]).
pub fn change(old: &[Rule], new: &[Rule], ifaces: &[String], rec: &Record) -> Result<()> {
    let (a, b) = (model(old), model(new));
    let Some(reads) = counts_to_read(&a, &b) else { return sync(new, ifaces, rec) };
    let mut counts = BTreeMap::new();
    for read in reads {
        let argv = read.argv();
        let out = nft(&argv.iter().map(String::as_str).collect::<Vec<_>>(), None)?;
        counts.extend(read.parse(&out)?);
    }
    let script = change_script(&a, &b, &counts);
    if !script.is_empty() {
        nft(&["-f", "-"], Some(&script)).context("changing pfwd's nftables table")?;
    }
    Ok(())
}

/// One read of counts before a change: a chain, or some elements of a translation map (only those: listing a map of
/// 10,000 elements costs nft 0.4 s).
#[derive(Debug, PartialEq, Eq)]
enum Read<'m> {
    Chain(&'m str),
    Elems(&'static str, Vec<&'m str>),
}

impl Read<'_> {
    /// nft's arguments for it.
    fn argv(&self) -> Vec<String> {
        match self {
            Read::Chain(c) => ["-j", "list", "chain", "inet", TABLE, c].map(String::from).to_vec(),
            Read::Elems(m, keys) => {
                let keys = format!("{{ {} }}", keys.join(", "));
                ["get", "element", "inet", TABLE, m, &keys].map(String::from).to_vec()
            }
        }
    }

    /// The counts (by comment) in nft's answer.
    fn parse(&self, out: &str) -> Result<BTreeMap<String, RuleCounters>> {
        match self {
            Read::Chain(_) => parse_counters(out),
            Read::Elems(..) => Ok(parse_element_counters(out)),
        }
    }
}

/// The counts of the elements `nft get element` prints (it has no JSON form): `KEY counter packets N bytes M comment
/// "C" : VALUE`, several per line or one.
fn parse_element_counters(text: &str) -> BTreeMap<String, RuleCounters> {
    let mut out = BTreeMap::new();
    for part in text.split("counter packets ").skip(1) {
        let words: Vec<&str> = part.splitn(5, ' ').collect();
        let [packets, "bytes", bytes, "comment", rest] = words.as_slice() else { continue };
        let (Ok(packets), Ok(bytes)) = (packets.parse::<u64>(), bytes.parse::<u64>()) else { continue };
        let Some(comment) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) else { continue };
        let sum: &mut RuleCounters = out.entry(comment.to_string()).or_default();
        sum.packets += packets;
        sum.bytes += bytes;
        sum.flows += packets;
    }
    out
}

/// What a change from model `a` to `b` reads before it writes ([`change_script`]): the chains and elements that hold
/// the counts of rules written again: the rules of rewritten chains, rules that move (between a port's chain and a
/// translation map, as rules join or leave their port) and changed elements. None when there are so many chains to
/// read that one full replace is cheaper.
fn counts_to_read<'m>(a: &'m Model, b: &'m Model) -> Option<Vec<Read<'m>>> {
    let mut chains: BTreeSet<&str> =
        b.chains.iter().filter(|(n, l)| a.chains.get(*n).is_some_and(|o| o != *l)).map(|(n, _)| n.as_str()).collect();
    chains.extend(a.base.iter().zip(&b.base).filter(|(x, y)| x.2 != y.2).map(|(x, _)| x.0.as_str()));
    let mut elems: BTreeMap<&'static str, BTreeSet<&str>> = BTreeMap::new();
    let (was, is) = (places(a), places(b));
    for (comment, place) in &is {
        let Some(old) = was.get(comment) else { continue };
        let elem_changed = match (old, place) {
            (Place::Elem(m, k), Place::Elem(..)) => a.dnat[m].get(*k) != b.dnat.get(m).and_then(|e| e.get(*k)),
            _ => false,
        };
        if old != place || elem_changed {
            match old {
                Place::Chain(c) => drop(chains.insert(c)),
                Place::Elem(m, k) => drop(elems.entry(m).or_default().insert(k)),
            }
        }
    }
    let mut reads: Vec<Read> = chains.into_iter().map(Read::Chain).collect();
    reads.extend(elems.into_iter().map(|(m, keys)| Read::Elems(m, keys.into_iter().collect())));
    (reads.len() <= MAX_REWRITTEN).then_some(reads)
}

/// Where a counted rule sits in a model: a chain's line, or a translation map's element (map, key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place<'m> {
    Chain(&'m str),
    Elem(&'static str, &'m str),
}

/// Every counter's comment in `m` with its place.
fn places(m: &Model) -> HashMap<&str, Place<'_>> {
    let mut out = HashMap::new();
    let chains = m.base.iter().map(|(n, _, l)| (n, l)).chain(m.chains.iter());
    for (name, lines) in chains {
        for c in lines.iter().filter_map(|l| l.counted.as_deref()) {
            out.insert(c, Place::Chain(name.as_str()));
        }
    }
    for (map, elems) in &m.dnat {
        for (key, e) in elems {
            out.insert(e.comment.as_str(), Place::Elem(map, key.as_str()));
        }
    }
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
    parse_counters(&nft(&["-j", "list", "table", "inet", TABLE], None)?)
}

/// [`comment_counters`] from `nft -j list table` output.
fn parse_counters(text: &str) -> Result<BTreeMap<String, RuleCounters>> {
    let json: serde_json::Value = serde_json::from_str(text).context("reading nft's JSON")?;
    let mut out: BTreeMap<String, RuleCounters> = BTreeMap::new();
    let mut add = |comment: &str, c: &serde_json::Value| {
        let (packets, bytes) = (c["packets"].as_u64().unwrap_or(0), c["bytes"].as_u64().unwrap_or(0));
        let sum = out.entry(comment.to_string()).or_default();
        sum.packets += packets;
        sum.bytes += bytes;
        sum.flows += packets;
    };
    for item in json["nftables"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let rule = &item["rule"];
        if let Some(comment) = rule["comment"].as_str()
            && let Some(c) = rule["expr"].as_array().and_then(|e| e.iter().find_map(|x| x.get("counter")))
        {
            add(comment, c);
        }
        // A translation map's elements: `[{"elem": {"val": KEY, "comment": C, "counter": {..}}}, VALUE]`.
        for pair in item["map"]["elem"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let elem = &pair[0]["elem"];
            if let Some(comment) = elem["comment"].as_str() {
                add(comment, &elem["counter"]);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::tests::{Netns, random_rules, with_id, with_local};
    use crate::rules::model::Family;
    use crate::rules::tests::Rng;
    use crate::rules::{PortRange, precedence_order};

    fn rec() -> Record {
        Record { sysctls: vec![("net/ipv4/ip_forward".into(), "0".into())], created_tables: vec![] }
    }

    #[test]
    fn script_format() {
        let rules = vec![
            with_id(1, "redirect -p tcp --dport 80 --to-port 3000"),
            with_id(2, "dnat -i eth0 -p tcp -s 10.0.1.0/24 --dport 80 --to 10.0.2.2:8080"),
            with_id(3, "dnat -p tcp --dport 8000-8099 --to 10.0.2.2"),
            with_id(4, "dnat -p udp --dport 53 --to [2001:db8::53]"),
            with_id(5, "masquerade -o eth1 -6"),
            with_id(6, "dnat -p tcp --dport 81 --to 10.0.2.2:9000,10.0.2.3:9000@2"),
            // Plain port forwards: in the translation maps, one per family.
            with_id(7, "dnat -i eth0 -p udp --dport 5000 --to 10.0.2.2:5001"),
            with_id(8, "dnat -i eth1 -p udp --dport 5000 --to [2001:db8::2]:5002"),
            // A plain one sharing its port with one that is not: both in the port's chain, in precedence order.
            with_id(9, "dnat -i eth1 -p tcp --dport 80 --to 10.0.2.9:80"),
        ];
        let counts: BTreeMap<String, RuleCounters> =
            [("pfwd:1".to_string(), RuleCounters { packets: 7, bytes: 420, flows: 7, drops: 0 })].into();
        let s = script(&rules, &["eth0".into(), "eth1".into()], &rec(), &counts);
        let want = [
            // One transaction that replaces an earlier copy.
            "table inet pfwd_nat {}\ndelete table inet pfwd_nat\n\ntable inet pfwd_nat {\n",
            "\tset ifaces {\n\t\ttype ifname;\n\t\telements = { \"eth0\", \"eth1\" };\n\t}\n",
            // The single-port rules behind the map, the more specific first; the range rule after it.
            "\tmap pre_ports {\n\t\ttype inet_proto . inet_service : verdict;\n\t\telements = { tcp . 80 : jump \
             pre_tcp_80, tcp . 81 : jump pre_tcp_81, udp . 53 : jump pre_udp_53 };\n\t}\n",
            "\tmap pre_dnat4 {\n\t\ttype ifname . inet_proto . inet_service : ipv4_addr . inet_service; counter;\n\t\t\
             elements = { \"eth0\" . udp . 5000 counter comment \"pfwd:7\" : 10.0.2.2 . 5001 };\n\t}\n",
            "\tmap pre_dnat6 {\n\t\ttype ifname . inet_proto . inet_service : ipv6_addr . inet_service; counter;\n\t\t\
             elements = { \"eth1\" . udp . 5000 counter comment \"pfwd:8\" : 2001:db8::2 . 5002 };\n\t}\n",
            // The maps first (a miss goes on to the next line); a rule whose only address is its --to is kept to
            // that family.
            "\t\tiifname != @ifaces accept\n\t\tmeta nfproto ipv4 dnat ip to iifname . meta l4proto . th dport map \
             @pre_dnat4\n\t\tmeta nfproto ipv6 dnat ip6 to iifname . meta l4proto . th dport map @pre_dnat6\n\t\t\
             meta l4proto . th dport vmap @pre_ports\n\t\tmeta nfproto ipv4 tcp dport 8000-8099 counter dnat ip to \
             10.0.2.2 comment \"pfwd:3\"\n\t}\n",
            "\tchain pre_tcp_80 {\n\t\tiifname \"eth0\" ip saddr 10.0.1.0/24 tcp dport 80 counter dnat ip to \
             10.0.2.2:8080 comment \"pfwd:2\"\n\t\tiifname \"eth1\" meta nfproto ipv4 tcp dport 80 counter dnat ip \
             to 10.0.2.9:80 comment \"pfwd:9\"\n\t\ttcp dport 80 counter packets 7 bytes 420 redirect to :3000 \
             comment \"pfwd:1\"\n\t}\n",
            "\tchain pre_udp_53 {\n\t\tmeta nfproto ipv6 udp dport 53 counter dnat ip6 to 2001:db8::53 comment \
             \"pfwd:4\"\n\t}\n",
            // Several backends: a numgen verdict map into a counted chain per backend.
            "\t\tmeta nfproto ipv4 tcp dport 81 numgen random mod 3 vmap { 0 : jump lb_6_0, 1-2 : jump lb_6_1 }\n",
            "\tchain lb_6_1 {\n\t\tmeta l4proto tcp counter dnat ip to 10.0.2.3:9000 comment \"pfwd:6 backend 1\"\n",
            "\t\toifname != @ifaces accept\n\t\toifname \"eth1\" meta nfproto ipv6 counter masquerade comment \
             \"pfwd:5\"\n",
            "\t\tiifname @ifaces ct state invalid drop\n\t\toifname @ifaces ct state invalid drop\n",
            "\tchain record {\n\t\taccept comment \"pfwd-record sysctl net/ipv4/ip_forward 0\"\n\t}\n}\n",
        ];
        for w in want {
            assert!(s.contains(w), "missing:\n{w}\nin:\n{s}");
        }
    }

    /// Random rule sets rich in plain port forwards (what the translation maps hold) that share interfaces, ports
    /// and ids with each other and with the other random rules, so ports move between the maps and their chains as
    /// rules come and go.
    fn forward_heavy_rules(rng: &mut Rng, max: u64) -> Vec<Rule> {
        let mut rules = random_rules(rng, max / 2);
        for _ in 0..rng.below(max / 2 + 1) {
            let iface = ["eth0", "wg0"][rng.below(2) as usize];
            let proto = ["tcp", "udp"][rng.below(2) as usize];
            let to = match rng.chance(30) {
                true => format!("[2001:db8::{}]", 1 + rng.below(3)),
                false => format!("10.0.2.{}", 1 + rng.below(3)),
            };
            let spec =
                format!("dnat -i {iface} -p {proto} --dport {} --to {to}:{}", 79 + rng.below(4), 8000 + rng.below(3));
            let r = with_id(rng.below(50) as u32 + 1, &spec);
            if !rules.iter().any(|o| o.same_match_and_target(&r)) {
                rules.push(r);
            }
        }
        rules
    }

    /// The split into maps and chains keeps the precedence contract: for a packet of each (interface, family,
    /// protocol, port), a translation map's element is the first rule in precedence order that can match it (the
    /// element's rule matches every such packet: the map ends the search), and without one the rules nft tries
    /// (that port's chain, then the hook's own chain) are the rules that can match it, in precedence order.
    #[test]
    fn map_chains_keep_the_precedence_order() {
        let mut rng = Rng(0x5eed_1234);
        let mut hits = 0;
        for case in 0..400 {
            let rules = if case % 2 == 0 { random_rules(&mut rng, 30) } else { forward_heavy_rules(&mut rng, 30) };
            let owners = vec![None; rules.len()];
            for hook in NAT_HOOKS {
                let Layout { mut by_port, rest } = layout(&rules, hook);
                let elems = match hook {
                    NatHook::Prerouting => take_translations(&rules, &owners, &mut by_port),
                    _ => Vec::new(),
                };
                // What the maps hold, as the model fills them (a later element under the same key would replace).
                let held: BTreeMap<(&str, &str), usize> =
                    elems.iter().map(|(m, k, _, i)| ((*m, k.as_str()), *i)).collect();
                let order: Vec<usize> = precedence_order(&rules)
                    .into_iter()
                    .filter(|&i| iptables::hook_order(&rules, hook).contains(&i))
                    .collect();
                let mut ports: Vec<(Proto, u16)> =
                    by_port.keys().copied().chain([(Proto::Tcp, 1), (Proto::Udp, 65535)]).collect();
                ports.extend(elems.iter().map(|(.., i)| (rules[*i].proto.unwrap(), rules[*i].dport.unwrap().lo)));
                for (p, port) in ports {
                    for (iface, family) in
                        ["eth0", "wg0", "br_lan"].into_iter().flat_map(|i| [(i, Family::Ipv4), (i, Family::Ipv6)])
                    {
                        let can_match = |i: &usize| {
                            let r = &rules[*i];
                            r.proto.is_none_or(|q| q == p)
                                && r.dport.is_none_or(|d: PortRange| d.contains(port))
                                && r.iface.as_ref().is_none_or(|n| (n == iface) != r.not.iface)
                                && r.applies_to(family)
                        };
                        let want: Vec<usize> = order.iter().copied().filter(can_match).collect();
                        let map = if family == Family::Ipv4 { DNAT4 } else { DNAT6 };
                        let key = format!("\"{iface}\" . {p} . {port}");
                        if let Some(i) = held.get(&(map, key.as_str())) {
                            hits += 1;
                            assert_eq!(want.first(), Some(i), "{key} {family:?}: {rules:#?}");
                            // Nothing about the packet beyond the key can make the rule miss it.
                            let r = &rules[*i];
                            let unconditional = r.src.is_none() && r.dst.is_none() && !r.dst_local;
                            assert!(unconditional && r.backends.is_empty(), "{key} {family:?}: {r:#?}");
                            continue;
                        }
                        let tried: Vec<usize> = by_port
                            .get(&(p, port))
                            .into_iter()
                            .flatten()
                            .chain(rest.iter())
                            .copied()
                            .filter(can_match)
                            .collect();
                        assert_eq!(tried, want, "{p} {port} {iface} {family:?}, hook {hook:?}: {rules:#?}");
                    }
                }
            }
        }
        assert!(hits > 500, "only {hits} packets met a translation map");
    }

    /// `nft list table` reduced to what the rules decide: each chain's and map's lines by name (listing order follows
    /// creation, which a change and a full write do not share), counters left out, map elements sorted.
    fn normalized(listing: &str) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        let mut current: Option<(String, Vec<String>)> = None;
        // An element list nft prints over several lines is read as one.
        let mut joined: Vec<String> = Vec::new();
        for line in listing.lines().map(str::trim) {
            match joined.last_mut() {
                Some(open) if is_open_list(open) => {
                    open.push(' ');
                    open.push_str(line);
                }
                _ => joined.push(line.to_string()),
            }
        }
        fn is_open_list(l: &str) -> bool {
            l.starts_with("elements = {") && !l.ends_with('}')
        }
        for line in joined.iter().map(String::as_str) {
            if let Some(name) = line.strip_prefix("chain ").or_else(|| line.strip_prefix("map ")) {
                current = Some((name.trim_end_matches(" {").to_string(), Vec::new()));
            } else if line == "}" {
                if let Some((name, lines)) = current.take() {
                    out.insert(name, lines);
                }
            } else if let Some((_, lines)) = current.as_mut() {
                let words: Vec<&str> = line.split_whitespace().collect();
                // `counter packets N bytes M` -> `counter`.
                let mut kept = Vec::new();
                let mut skip = 0;
                for (i, w) in words.iter().enumerate() {
                    if skip > 0 {
                        skip -= 1;
                        continue;
                    }
                    kept.push(*w);
                    if *w == "counter" && words.get(i + 1) == Some(&"packets") {
                        skip = 4;
                    }
                }
                let mut l = kept.join(" ");
                if let Some(items) = l.strip_prefix("elements = { ").and_then(|r| r.strip_suffix(" }")) {
                    let mut items: Vec<&str> = items.split(", ").collect();
                    items.sort_unstable();
                    l = format!("elements = {{ {} }}", items.join(", "));
                }
                lines.push(l);
            }
        }
        out
    }

    /// A change applied with [`change_script`] leaves the table as a full write of the new rules does, over random
    /// sequences of rule sets (rules added, removed, and rules of one port or one chain changed).
    #[test]
    fn changes_equal_a_full_write() {
        let Some(ns) = Netns::scratch() else { return };
        let mut rng = Rng(0x0c4a_96e5);
        let ifaces = ["eth0".to_string()];
        let listing = |ns: &Netns| ns.run(&["nft", "list", "table", "inet", TABLE], "");
        let mut rules = random_rules(&mut rng, 12);
        ns.run(&["nft", "-f", "-"], &script(&rules, &ifaces, &rec(), &BTreeMap::new()));
        for step in 0..40 {
            let mut next = rules.clone();
            // Drop some, keep the rest, add a few new ones (random sets reuse a small value space, so they share ports).
            next.retain(|_| rng.chance(75));
            let more = if step % 2 == 0 { random_rules(&mut rng, 4) } else { forward_heavy_rules(&mut rng, 8) };
            for r in more {
                if !next.iter().any(|o| o.same_match_and_target(&r)) {
                    next.push(r);
                }
            }
            let script = change_script(&model(&rules), &model(&next), &BTreeMap::new());
            if !script.is_empty() {
                ns.run(&["nft", "-f", "-"], &script);
            }
            let changed = normalized(&listing(&ns));
            ns.run(&["nft", "-f", "-"], &super::script(&next, &ifaces, &rec(), &BTreeMap::new()));
            let full = normalized(&listing(&ns));
            assert_eq!(changed, full, "step {step}: change script\n{script}");
            rules = next;
        }
        ns.run(&["nft", "delete", "table", "inet", TABLE], "");
    }

    /// A change carries the counts of rules it writes again: rules moving from a translation map into their port's
    /// chain (a rule that is not a plain forward joins the port) and back, and an element whose translation changes.
    #[test]
    fn moved_rules_keep_their_counts() {
        let Some(ns) = Netns::scratch() else { return };
        let plain = vec![
            with_id(5, "dnat -i eth0 -p udp --dport 80 --to 10.0.2.2:8080"),
            with_id(7, "dnat -i eth0 -p tcp --dport 81 -s 10.9.0.0/16 --to 10.0.2.3:81"),
        ];
        let mut joined = plain.clone();
        joined.push(with_id(6, "dnat -i eth0 -p udp --dport 80 -s 10.9.0.0/16 --to 10.0.2.9:80"));
        joined[1] = with_id(7, "dnat -i eth0 -p tcp --dport 81 --to 10.0.2.3:81");
        let mut retargeted = joined.clone();
        retargeted[1] = with_id(7, "dnat -i eth0 -p tcp --dport 81 --to 10.0.2.4:82");
        let counts: BTreeMap<String, RuleCounters> = [5, 7]
            .map(|id| (format!("pfwd:{id}"), RuleCounters { packets: id, bytes: 60 * id, flows: id, drops: 0 }))
            .into();
        ns.run(&["nft", "-f", "-"], &script(&plain, &["eth0".into()], &rec(), &counts));
        for (from, to) in [(&plain, &joined), (&joined, &retargeted), (&retargeted, &plain)] {
            let (a, b) = (model(from), model(to));
            let mut carried = BTreeMap::new();
            for r in counts_to_read(&a, &b).unwrap() {
                let argv = r.argv();
                let mut argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                argv.insert(0, "nft");
                carried.extend(r.parse(&ns.run(&argv, "")).unwrap());
            }
            ns.run(&["nft", "-f", "-"], &change_script(&a, &b, &carried));
            let now = parse_counters(&ns.run(&["nft", "-j", "list", "table", "inet", TABLE], "")).unwrap();
            for (comment, c) in &counts {
                assert_eq!(now.get(comment).map(|n| n.packets), Some(c.packets), "{comment} after {to:#?}");
            }
        }
        ns.run(&["nft", "delete", "table", "inet", TABLE], "");
    }

    /// The real nft takes the script, replaces the table with it again (counters carried), and its JSON listing
    /// reads back as the counts written.
    #[test]
    fn real_nft_takes_the_table() {
        let Some(ns) = Netns::scratch() else { return };
        let mut rng = Rng(0xfeed);
        for round in 0..20 {
            let mut rules = if round % 2 == 0 { random_rules(&mut rng, 25) } else { forward_heavy_rules(&mut rng, 25) };
            if round == 0 {
                rules = with_local();
            }
            let counts: BTreeMap<String, RuleCounters> = rules
                .iter()
                .filter(|r| r.backends.is_empty())
                .map(|r| {
                    let c = RuleCounters { packets: u64::from(r.id), bytes: 60 * u64::from(r.id), flows: 0, drops: 0 };
                    (format!("pfwd:{}", r.id), c)
                })
                .collect();
            let text = script(&rules, &["eth0".into(), "wg0".into()], &rec(), &counts);
            ns.run(&["nft", "-f", "-"], &text);
            ns.run(&["nft", "-f", "-"], &text);
            let read = parse_counters(&ns.run(&["nft", "-j", "list", "table", "inet", TABLE], "")).unwrap();
            for (comment, c) in &counts {
                // Rules sharing an id (random sets may repeat ids) are summed (those with backends count per backend).
                let copies =
                    rules.iter().filter(|r| r.backends.is_empty() && format!("pfwd:{}", r.id) == *comment).count()
                        as u64;
                let got = read.get(comment).unwrap_or_else(|| panic!("{comment} not counted:\n{text}"));
                assert_eq!((got.packets, got.bytes), (c.packets * copies, c.bytes * copies), "{comment}");
            }
        }
        ns.run(&["nft", "delete", "table", "inet", TABLE], "");
    }
}
