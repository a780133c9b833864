//! iptables and nftables interop: export pfwd's rules as `iptables-restore` / `nft -f` input (the iptables fallback
//! data path, inspection, migration away from pfwd) and import what iptables users already have (`iptables-save`
//! dumps and `iptables -t nat -A PREROUTING|POSTROUTING|OUTPUT ...` command lines).
//!
//! Everything here is text in, text out; running the tools is the caller's job.
//!
//! # Export
//!
//! pfwd keeps its rules in chains of its own ([`CHAINS`]) that built-in chains jump to ([`hook_rules`]), so applying
//! or removing them never touches anyone else's rules. DNAT/REDIRECT rules go into `PFWD-PREROUTING`, SNAT/MASQUERADE
//! rules into `PFWD-POSTROUTING`, `--local` DNAT/REDIRECT rules (connections made by local processes) into
//! `PFWD-OUTPUT`, each in [`precedence_order`], which makes iptables' first match the rule pfwd itself would pick.
//! Each rule carries `-m comment --comment "pfwd:ID"`, placed
//! where `iptables-save` prints it (after the matches, before `-j`), so counters can be mapped back to rule ids.
//!
//! # Import
//!
//! [`import`] is all or nothing: the first line pfwd cannot represent faithfully aborts with an [`ImportError`]
//! naming the line and the offending token. `-m multiport --dports a,b,c` is expanded into one rule per port or
//! range. Rules that are fine but behave differently under pfwd's precedence are reported as warnings.

use ipnet::Ipv4Net;

use crate::rules::{
    PortRange, Proto, Rule, Target, parse_cidr, parse_port, parse_snat_to, parse_to, precedence_order, validate_iface,
};

/// pfwd's nat chain for DNAT/REDIRECT, jumped to from `PREROUTING`.
pub const PREROUTING_CHAIN: &str = "PFWD-PREROUTING";
/// pfwd's nat chain for SNAT/MASQUERADE, jumped to from `POSTROUTING`.
pub const POSTROUTING_CHAIN: &str = "PFWD-POSTROUTING";
/// pfwd's nat chain for `--local` DNAT/REDIRECT (connections made by local processes), jumped to from `OUTPUT`.
pub const OUTPUT_CHAIN: &str = "PFWD-OUTPUT";
/// pfwd's filter chain, jumped to from `FORWARD`.
pub const FORWARD_CHAIN: &str = "PFWD-FORWARD";
/// Comment prefix tagging each exported rule with its id: `pfwd:7`.
pub const COMMENT_PREFIX: &str = "pfwd:";

/// One of pfwd's own chains and the built-in chain that jumps to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfwdChain {
    pub table: &'static str,
    pub name: &'static str,
    pub builtin: &'static str,
    /// Interface options of the jump when pfwd is restricted to some interfaces: one jump per interface and option.
    /// Empty: the chain is not tied to an interface, and one jump without options serves every interface.
    pub iface_options: &'static [&'static str],
}

/// pfwd's chains in script order. A new chain is one entry here plus its body in `chain_specs`; the scripts, hooks
/// and the importer's bookkeeping check pick it up.
pub const CHAINS: &[PfwdChain] = &[
    PfwdChain { table: "nat", name: PREROUTING_CHAIN, builtin: "PREROUTING", iface_options: &["-i"] },
    // iptables refuses -i in POSTROUTING: SNAT is tied to the interface packets leave through.
    PfwdChain { table: "nat", name: POSTROUTING_CHAIN, builtin: "POSTROUTING", iface_options: &["-o"] },
    // Local connections do not arrive on an interface, and iptables refuses -i in OUTPUT: one jump for all.
    PfwdChain { table: "nat", name: OUTPUT_CHAIN, builtin: "OUTPUT", iface_options: &[] },
    PfwdChain { table: "filter", name: FORWARD_CHAIN, builtin: "FORWARD", iface_options: &["-i", "-o"] },
];

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

/// A jump from a built-in chain into one of pfwd's chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub table: &'static str,
    /// The built-in chain holding the jump.
    pub chain: &'static str,
    /// Rule spec after the chain name, e.g. `-i eth0 -j PFWD-PREROUTING`.
    pub args: Vec<String>,
}

impl Hook {
    /// Arguments for `iptables` (program name not included): `-t TABLE -A CHAIN ARGS...`.
    pub fn append_args(&self) -> Vec<String> {
        self.argv("-A")
    }

    /// `-t TABLE -C CHAIN ARGS...`: exit status 0 when the jump exists.
    pub fn check_args(&self) -> Vec<String> {
        self.argv("-C")
    }

    /// `-t TABLE -D CHAIN ARGS...`.
    pub fn delete_args(&self) -> Vec<String> {
        self.argv("-D")
    }

    /// Whether the jump carries no `-i`/`-o` (nat `OUTPUT`, or every jump of `hook_rules(None)`): it is shared by
    /// all attached interfaces, so detaching one interface must leave it in place.
    pub fn is_shared(&self) -> bool {
        !self.args.iter().any(|a| a == "-i" || a == "-o")
    }

    /// The jump as an `iptables-restore` line inside `*TABLE`.
    pub fn restore_line(&self) -> String {
        format!("-A {} {}", self.chain, self.args.join(" "))
    }

    fn argv(&self, command: &str) -> Vec<String> {
        let mut argv = vec!["-t".to_string(), self.table.to_string(), command.to_string(), self.chain.to_string()];
        argv.extend(self.args.iter().cloned());
        argv
    }
}

/// The jumps into pfwd's chains: without `-i`/`-o` when `ifaces` is `None`, else one per interface and option
/// (nat `PREROUTING -i IF` and `POSTROUTING -o IF`; filter `FORWARD -i IF` and `-o IF`) plus the one jump of a chain
/// without interface options (nat `OUTPUT -j PFWD-OUTPUT`), whatever the list holds. An empty list means no jumps at
/// all.
pub fn hook_rules(ifaces: Option<&[String]>) -> Vec<Hook> {
    let mut hooks = Vec::new();
    for c in CHAINS {
        let hook = |mut args: Vec<String>| {
            args.extend(["-j".to_string(), c.name.to_string()]);
            Hook { table: c.table, chain: c.builtin, args }
        };
        match ifaces {
            None => hooks.push(hook(Vec::new())),
            Some(list) if c.iface_options.is_empty() => {
                if !list.is_empty() {
                    hooks.push(hook(Vec::new()));
                }
            }
            Some(list) => {
                for iface in list {
                    for opt in c.iface_options {
                        hooks.push(hook(vec![opt.to_string(), iface.clone()]));
                    }
                }
            }
        }
    }
    hooks
}

/// A prefix as `iptables-save` prints it (`10.0.0.1/32`); `/0` matches everything and iptables-save omits it.
fn ipt_net(n: Option<Ipv4Net>) -> Option<String> {
    n.filter(|n| n.prefix_len() > 0).map(|n| n.trunc().to_string())
}

/// One rule in `iptables-save` canonical form, without the leading `-A CHAIN`.
fn rule_spec(r: &Rule) -> String {
    let mut s = Vec::new();
    if let Some(n) = ipt_net(r.src) {
        s.push(format!("-s {n}"));
    }
    if let Some(n) = ipt_net(r.dst) {
        s.push(format!("-d {n}"));
    }
    if let Some(i) = &r.iface {
        s.push(format!("-i {i}"));
    }
    if let Some(o) = &r.oface {
        s.push(format!("-o {o}"));
    }
    if let Some(p) = r.proto {
        s.push(format!("-p {p}"));
        if let Some(d) = r.dport {
            let port = if d.lo == d.hi { d.lo.to_string() } else { format!("{}:{}", d.lo, d.hi) };
            s.push(format!("-m {p} --dport {port}"));
        }
    }
    s.push(format!("-m comment --comment \"{COMMENT_PREFIX}{}\"", r.id));
    s.push(match r.target {
        Target::Dnat { addr, port: Some(p) } => format!("-j DNAT --to-destination {addr}:{p}"),
        Target::Dnat { addr, port: None } => format!("-j DNAT --to-destination {addr}"),
        Target::Redirect { port } => format!("-j REDIRECT --to-ports {port}"),
        // PortRange prints `LO-HI` (or one port), the form iptables-save uses for both targets.
        Target::Snat { addr, ports: Some(r) } => format!("-j SNAT --to-source {addr}:{r}"),
        Target::Snat { addr, ports: None } => format!("-j SNAT --to-source {addr}"),
        Target::Masquerade { ports: Some(r) } => format!("-j MASQUERADE --to-ports {r}"),
        Target::Masquerade { ports: None } => "-j MASQUERADE".to_string(),
    });
    s.join(" ")
}

/// The netfilter hook a rule is matched at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NatHook {
    /// DNAT/REDIRECT of arriving packets.
    Prerouting,
    /// SNAT/MASQUERADE of leaving packets.
    Postrouting,
    /// `--local` DNAT/REDIRECT of connections made by local processes.
    Output,
}

/// In the import's order (and the order of the nat chains in the scripts).
const NAT_HOOKS: [NatHook; 3] = [NatHook::Prerouting, NatHook::Postrouting, NatHook::Output];

fn nat_hook(r: &Rule) -> NatHook {
    if r.is_postrouting() {
        NatHook::Postrouting
    } else if r.local {
        NatHook::Output
    } else {
        NatHook::Prerouting
    }
}

/// Indices of the rules of one hook, most specific first.
fn hook_order(rules: &[Rule], hook: NatHook) -> Vec<usize> {
    precedence_order(rules).into_iter().filter(|&i| nat_hook(&rules[i]) == hook).collect()
}

/// The body of one of pfwd's chains: rule specs without the leading `-A CHAIN`.
fn chain_specs(chain: &PfwdChain, rules: &[Rule]) -> Vec<String> {
    let hook = match chain.name {
        PREROUTING_CHAIN => NatHook::Prerouting,
        POSTROUTING_CHAIN => NatHook::Postrouting,
        OUTPUT_CHAIN => NatHook::Output,
        // A packet conntrack cannot track is never NATed; dropping it keeps it from leaving with the original
        // (untranslated) addresses.
        FORWARD_CHAIN => return vec!["-m conntrack --ctstate INVALID -j DROP".to_string()],
        _ => return Vec::new(),
    };
    hook_order(rules, hook).into_iter().map(|i| rule_spec(&rules[i])).collect()
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
pub fn nat_chain_script(rules: &[Rule]) -> String {
    restore_script(rules, &[])
}

/// The human-facing iptables export: [`nat_chain_script`] plus the jumps of [`hook_rules`], with a header on how to
/// apply it.
pub fn export_iptables(rules: &[Rule], ifaces: Option<&[String]>) -> String {
    let chains: Vec<String> = CHAINS.iter().map(|c| format!("{} ({})", c.name, c.table)).collect();
    let builtins: Vec<&str> = CHAINS.iter().map(|c| c.builtin).collect();
    let mut out = format!(
        "# pfwd rules for iptables ({} rules, most specific first: iptables' first match is pfwd's choice).\n\
         # Apply with: iptables-restore --noflush < FILE\n\
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

fn nft_net(n: Ipv4Net) -> String {
    let n = n.trunc();
    if n.prefix_len() == 32 { n.addr().to_string() } else { n.to_string() }
}

fn nft_iface_set(ifaces: &[String]) -> String {
    let names: Vec<String> = ifaces.iter().map(|i| format!("\"{i}\"")).collect();
    format!("{{ {} }}", names.join(", "))
}

fn nft_rule(r: &Rule) -> String {
    let mut s = Vec::new();
    if let Some(i) = &r.iface {
        s.push(format!("iifname \"{i}\""));
    }
    if let Some(o) = &r.oface {
        s.push(format!("oifname \"{o}\""));
    }
    if let Some(n) = r.src.filter(|n| n.prefix_len() > 0) {
        s.push(format!("ip saddr {}", nft_net(n)));
    }
    if let Some(n) = r.dst.filter(|n| n.prefix_len() > 0) {
        s.push(format!("ip daddr {}", nft_net(n)));
    }
    match (r.proto, r.dport) {
        (Some(p), Some(d)) => s.push(format!("{p} dport {d}")),
        (Some(p), None) => s.push(format!("meta l4proto {p}")),
        (None, _) => {}
    }
    s.push(match r.target {
        Target::Dnat { addr, port: Some(p) } => format!("dnat to {addr}:{p}"),
        Target::Dnat { addr, port: None } => format!("dnat to {addr}"),
        Target::Redirect { port } => format!("redirect to :{port}"),
        Target::Snat { addr, ports: Some(r) } => format!("snat to {addr}:{r}"),
        Target::Snat { addr, ports: None } => format!("snat to {addr}"),
        Target::Masquerade { ports: Some(r) } => format!("masquerade to :{r}"),
        Target::Masquerade { ports: None } => "masquerade".to_string(),
    });
    s.push(format!("comment \"{COMMENT_PREFIX}{}\"", r.id));
    s.join(" ")
}

/// The same rules as an nftables script in its own table `ip pfwd` (`nft -f FILE`). It starts by creating and
/// deleting the table, so applying it again replaces the previous copy. With `ifaces`, the NAT rules and the
/// invalid-packet drop only apply to those interfaces (incoming for prerouting, outgoing for postrouting), like the
/// iptables jumps; the `--local` rules (chain output) apply to every local connection, whatever the list (an empty
/// list means no NAT at all, as without jumps).
pub fn export_nft(rules: &[Rule], ifaces: Option<&[String]>) -> String {
    let mut out = format!(
        "# pfwd rules for nftables ({} rules, most specific first). Apply with: nft -f FILE\n\
         # Everything lives in table ip pfwd; the next two lines remove a previous copy, so re-applying replaces it.\n\
         table ip pfwd {{}}\n\
         delete table ip pfwd\n\n\
         table ip pfwd {{\n",
        rules.len()
    );
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
        for i in hook_order(rules, hook) {
            out.push_str(&format!("\t\t{}\n", nft_rule(&rules[i])));
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
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------------------------------

/// Why an import failed: the 1-based line (the first physical line of a `\`-continued one), its text, the offending
/// token and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line_no}: {line}: {token:?}: {message}")]
pub struct ImportError {
    pub line_no: usize,
    pub line: String,
    pub token: String,
    pub message: String,
}

/// A successful import: the rules (id 0, validated, normalized) in iptables' first-match order, and notes about
/// lines that were skipped or will behave differently under pfwd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Import {
    pub rules: Vec<Rule>,
    pub warnings: Vec<String>,
}

/// A problem within one line; [`import`] adds the line.
struct Bad {
    token: String,
    message: String,
}

fn bad(token: &str, message: impl Into<String>) -> Bad {
    Bad { token: token.to_string(), message: message.into() }
}

type Res<T> = Result<T, Bad>;

const NAT_TABLE: &str = "nat";
const TABLES: &[&str] = &["filter", "nat", "mangle", "raw", "security"];

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

/// Joins `\`-continued lines; each logical line keeps the number of its first physical line.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        let part = if acc.is_empty() { raw.trim() } else { raw.trim_start() };
        // A comment ends at the newline even when it ends in a backslash, as in sh.
        let continued = part.trim_end().strip_suffix('\\').filter(|_| !(acc.is_empty() && part.starts_with('#')));
        match continued {
            Some(body) => {
                acc.push_str(body.trim_end());
                acc.push(' ');
                pending = Some((start, acc));
            }
            None => {
                acc.push_str(part.trim_end());
                out.push((start, acc));
            }
        }
    }
    if let Some((start, acc)) = pending {
        out.push((start, acc.trim_end().to_string()));
    }
    out
}

/// Splits a line like sh does for the cases that occur in iptables scripts: quotes, backslash escapes, and a `#`
/// comment starting a word.
fn tokenize(line: &str) -> Res<Vec<String>> {
    let mut tokens = Vec::new();
    let mut cur = String::new();
    let mut in_token = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_token {
                    tokens.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            '#' if !in_token => break,
            '\'' => {
                in_token = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => cur.push(ch),
                        None => return Err(bad("'", "unterminated quote")),
                    }
                }
            }
            '"' => {
                in_token = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => cur.push(ch),
                            Some(ch) => {
                                cur.push('\\');
                                cur.push(ch);
                            }
                            None => return Err(bad("\"", "unterminated quote")),
                        },
                        Some(ch) => cur.push(ch),
                        None => return Err(bad("\"", "unterminated quote")),
                    }
                }
            }
            '\\' => {
                in_token = true;
                if let Some(ch) = chars.next() {
                    cur.push(ch);
                }
            }
            c => {
                in_token = true;
                cur.push(c);
            }
        }
    }
    if in_token {
        tokens.push(cur);
    }
    Ok(tokens)
}

/// `[packets:bytes]`, the prefix `iptables-save -c` puts on rules.
fn is_counters(tok: &str) -> bool {
    tok.strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.split_once(':'))
        .is_some_and(|(p, b)| !p.is_empty() && !b.is_empty() && p.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit()))
}

/// Dashes that word processors and web pages substitute for `-`/`--`.
const FAKE_DASHES: &[(char, &str)] =
    &[('–', "an en dash"), ('—', "an em dash"), ('−', "a minus sign"), ('‐', "a Unicode hyphen")];

/// Rejects `–dport` and friends with the spelling that works.
fn check_dashes(tok: &str) -> Res<()> {
    let is_dash = |c: char| c == '-' || FAKE_DASHES.iter().any(|(d, _)| *d == c);
    let lead: String = tok.chars().take_while(|&c| is_dash(c)).collect();
    let Some(&(dash, name)) = lead.chars().find_map(|c| FAKE_DASHES.iter().find(|(d, _)| *d == c)) else {
        return Ok(());
    };
    let rest = &tok[lead.len()..];
    let fix = if rest.chars().count() == 1 { format!("-{rest}") } else { format!("--{rest}") };
    Err(bad(tok, format!("{name} ({dash}) is not an option prefix; use {fix}")))
}

fn check_table(tok: &str, table: &str) -> Res<()> {
    if TABLES.contains(&table) {
        Ok(())
    } else {
        Err(bad(tok, format!("unknown table {table:?} (iptables has {})", TABLES.join(", "))))
    }
}

/// `--opt=value` → (`--opt`, `value`); short options never take `=`.
fn split_inline(tok: &str) -> (&str, Option<&str>) {
    match tok.split_once('=') {
        Some((name, value)) if name.starts_with("--") => (name, Some(value)),
        _ => (tok, None),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Append,
    Insert,
    Policy,
    NewChain,
    Flush,
    DeleteChain,
    Zero,
    /// `-D`, `-R`, `-E`: change existing rules or chains.
    Modify,
    /// `-L`, `-S`, `-C`: read-only.
    Query,
}

fn command_of(name: &str) -> Option<Command> {
    Some(match name {
        "-A" | "--append" => Command::Append,
        "-I" | "--insert" => Command::Insert,
        "-P" | "--policy" => Command::Policy,
        "-N" | "--new-chain" => Command::NewChain,
        "-F" | "--flush" => Command::Flush,
        "-X" | "--delete-chain" => Command::DeleteChain,
        "-Z" | "--zero" => Command::Zero,
        "-D" | "--delete" | "-R" | "--replace" | "-E" | "--rename-chain" => Command::Modify,
        "-L" | "--list" | "-S" | "--list-rules" | "-C" | "--check" => Command::Query,
        _ => return None,
    })
}

/// A line split into its command and the rule spec that follows.
struct Head<'a> {
    table: &'a str,
    command: Command,
    command_tok: &'a str,
    chain: Option<&'a str>,
    /// `-I CHAIN N`: 1-based.
    position: Option<usize>,
    policy: Option<&'a str>,
    spec: Vec<&'a str>,
}

/// Finds the table, the command and its positional arguments anywhere in the line, like iptables' getopt does.
fn parse_head<'a>(args: &'a [String], default_table: &'a str) -> Res<Head<'a>> {
    let mut table = default_table;
    let mut command: Option<(Command, &str)> = None;
    let (mut chain, mut position, mut policy) = (None, None, None);
    let mut spec = Vec::new();
    let positional = |j: usize| args.get(j).map(String::as_str).filter(|v| !v.starts_with(['-', '!']));
    let mut i = 0;
    while i < args.len() {
        let tok = args[i].as_str();
        check_dashes(tok)?;
        let (name, inline) = split_inline(tok);
        i += 1;
        match name {
            "-t" | "--table" => {
                let value = inline.or_else(|| positional(i)).ok_or_else(|| bad(tok, "needs a table name (-t nat)"))?;
                if inline.is_none() {
                    i += 1;
                }
                check_table(value, value)?;
                table = value;
            }
            // `-w` takes an optional number of seconds.
            "-w" | "--wait" => {
                if inline.is_none() && positional(i).is_some_and(|v| v.parse::<f64>().is_ok()) {
                    i += 1;
                }
            }
            "-W" | "--wait-interval" => {
                if inline.is_none() && positional(i).is_some() {
                    i += 1;
                }
            }
            "-v" | "--verbose" | "-n" | "--numeric" | "-4" | "--ipv4" => {}
            "-6" | "--ipv6" => return Err(bad(tok, "IPv6 rules are not supported; pfwd forwards IPv4")),
            _ => match command_of(name) {
                Some(c) => {
                    if let Some((_, prev)) = command {
                        return Err(bad(tok, format!("a second command after {prev}; give one command per line")));
                    }
                    command = Some((c, tok));
                    chain = inline.or_else(|| positional(i));
                    if inline.is_none() && chain.is_some() {
                        i += 1;
                    }
                    if c == Command::Insert
                        && let Some(n) = positional(i).filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
                    {
                        match n.parse::<usize>() {
                            Ok(n) if n > 0 => position = Some(n),
                            _ => return Err(bad(n, "invalid rule number (iptables counts from 1)")),
                        }
                        i += 1;
                    }
                    if c == Command::Policy {
                        policy = positional(i);
                        if policy.is_some() {
                            i += 1;
                        }
                    }
                }
                None => spec.push(tok),
            },
        }
    }
    let Some((command, command_tok)) = command else {
        let tok = args.last().map_or("", String::as_str);
        return Err(bad(tok, "no command: expected -A CHAIN or -I CHAIN followed by the rule"));
    };
    match command {
        Command::Policy if chain.is_none() || policy.is_none() => {
            return Err(bad(command_tok, "iptables: -P requires a chain and a policy"));
        }
        Command::Append | Command::Insert if chain.is_none() => {
            return Err(bad(command_tok, format!("{command_tok} needs a chain name (e.g. {command_tok} PREROUTING)")));
        }
        _ => {}
    }
    Ok(Head { table, command, command_tok, chain, position, policy, spec })
}

/// The target (`-j X`) of a rule spec, found without parsing the rest.
fn jump_of<'a>(spec: &[&'a str]) -> Option<&'a str> {
    spec.iter().enumerate().find_map(|(i, t)| match split_inline(t) {
        ("-j" | "--jump", Some(v)) => Some(v),
        ("-j" | "--jump", None) => spec.get(i + 1).copied(),
        _ => None,
    })
}

/// An option as written and its value.
#[derive(Debug, Clone, Copy)]
struct Opt<'a> {
    name: &'a str,
    value: &'a str,
}

/// The options of a nat PREROUTING, POSTROUTING or OUTPUT rule, unchecked.
#[derive(Debug, Default)]
struct Spec<'a> {
    iface: Option<Opt<'a>>,
    oface: Option<Opt<'a>>,
    proto: Option<Opt<'a>>,
    src: Option<Opt<'a>>,
    dst: Option<Opt<'a>>,
    dport: Option<Opt<'a>>,
    dports: Option<Opt<'a>>,
    comment: Option<Opt<'a>>,
    matches: Vec<Opt<'a>>,
    jump: Option<Opt<'a>>,
    to_dest: Option<Opt<'a>>,
    to_source: Option<Opt<'a>>,
    /// `--to`: iptables' abbreviation of `--to-destination` (DNAT) or `--to-source` (SNAT).
    to: Option<Opt<'a>>,
    to_ports: Option<Opt<'a>>,
}

const UNDERSTOOD: &str = "pfwd reads -i, -o, -p, -s, -d, --dport, -m tcp|udp|comment|multiport, \
                          -j DNAT --to-destination, -j REDIRECT --to-ports, -j SNAT --to-source and \
                          -j MASQUERADE --to-ports";

/// `jump`: the `-j` target seen so far (target options come after it).
fn unknown_option(tok: &str, jump: Option<&str>) -> Bad {
    let (name, _) = split_inline(tok);
    let message = match name {
        "--sport" | "--source-port" | "--sports" | "--source-ports" | "--ports" => {
            "source ports are not supported: pfwd matches destination ports (--dport, --dports)".to_string()
        }
        "--random" | "--random-fully" | "--persistent" if matches!(jump, Some("SNAT" | "MASQUERADE")) => {
            format!("{name} is not supported: pfwd keeps the source port when free, else picks a free one in the range")
        }
        "--random" | "--random-fully" | "--persistent" => {
            format!("{name} is not supported: pfwd translates to exactly one destination")
        }
        "-g" | "--goto" => "--goto is not supported; use -j DNAT, REDIRECT, SNAT or MASQUERADE".to_string(),
        "-f" | "--fragment" => "fragment matching is not supported".to_string(),
        _ if name.starts_with('-') => format!("unknown option {name}; {UNDERSTOOD}"),
        _ => format!("unexpected argument {name:?} (a value without its option?); {UNDERSTOOD}"),
    };
    bad(tok, message)
}

/// Parses the rule options of a nat PREROUTING, POSTROUTING or OUTPUT line. Checks that need the whole rule come
/// later, in `build_rules`.
fn parse_spec<'a>(toks: &[&'a str]) -> Res<Spec<'a>> {
    let mut s = Spec::default();
    let mut i = 0;
    while i < toks.len() {
        let tok = toks[i];
        if tok.starts_with('!') {
            return Err(bad(tok, "negation (!) is not supported: pfwd rules only match positively"));
        }
        if tok == "--" {
            let hint = toks.get(i + 1).map_or(String::new(), |next| format!("; write --{next}"));
            return Err(bad(tok, format!("a lone \"--\" is not an option (a space after --?){hint}")));
        }
        let (name, inline) = split_inline(tok);
        i += 1;
        if name == "-c" || name == "--set-counters" {
            // Packet and byte counters (`iptables-restore` syntax): nothing to keep.
            i += 2;
            continue;
        }
        let targets = match name {
            "--to-destination" => Some("-j DNAT"),
            "--to-source" => Some("-j SNAT"),
            "--to" => Some("-j DNAT or -j SNAT"),
            "--to-ports" | "--to-port" => Some("-j REDIRECT or -j MASQUERADE"),
            _ => None,
        };
        if let Some(targets) = targets.filter(|_| s.jump.is_none()) {
            return Err(bad(tok, format!("{name} is a target option: it goes after {targets}")));
        }
        let slot = match name {
            "-i" | "--in-interface" => &mut s.iface,
            "-o" | "--out-interface" => &mut s.oface,
            "-p" | "--protocol" => &mut s.proto,
            "-s" | "--source" | "--src" => &mut s.src,
            "-d" | "--destination" | "--dst" => &mut s.dst,
            "--dport" | "--destination-port" => &mut s.dport,
            "--dports" | "--destination-ports" => &mut s.dports,
            "--comment" => &mut s.comment,
            "-j" | "--jump" => &mut s.jump,
            "--to-destination" => &mut s.to_dest,
            "--to-source" => &mut s.to_source,
            "--to" => &mut s.to,
            "--to-ports" | "--to-port" => &mut s.to_ports,
            "-m" | "--match" => {
                let value = take_value(toks, &mut i, tok, inline)?;
                // Now rather than later: the match's own options would otherwise be reported as unknown.
                if !matches!(value, "tcp" | "udp" | "comment" | "multiport") {
                    return Err(bad(
                        value,
                        format!(
                            "match -m {value} is not supported: pfwd matches interface, protocol, addresses and \
                             destination ports"
                        ),
                    ));
                }
                s.matches.push(Opt { name, value });
                continue;
            }
            _ => return Err(unknown_option(tok, s.jump.map(|j| j.value))),
        };
        let value = take_value(toks, &mut i, tok, inline)?;
        if slot.is_some() {
            return Err(bad(tok, format!("{name} given twice (iptables: multiple {name} flags not allowed)")));
        }
        *slot = Some(Opt { name, value });
    }
    Ok(s)
}

fn take_value<'a>(toks: &[&'a str], i: &mut usize, tok: &str, inline: Option<&'a str>) -> Res<&'a str> {
    let value = match inline {
        Some(v) => Some(v),
        None => {
            let v = toks.get(*i).copied().filter(|v| !v.starts_with('-'));
            if v.is_some() {
                *i += 1;
            }
            v
        }
    };
    match value {
        Some(v) if v.starts_with('!') => Err(bad(v, "negation (!) is not supported: pfwd rules only match positively")),
        Some(v) if !v.is_empty() || tok == "--comment" => Ok(v),
        _ => Err(bad(tok, format!("{} needs a value", split_inline(tok).0))),
    }
}

const NEED_PROTO: &str = "iptables: Need TCP, UDP, SCTP or DCCP with port specification";

/// A `-s`/`-d` value; `/0` is the same as no match.
fn net_opt(o: Option<Opt>) -> Res<Option<Ipv4Net>> {
    let Some(o) = o else { return Ok(None) };
    if o.value.contains(',') {
        return Err(bad(o.value, "address lists are not supported; write one rule per address"));
    }
    let net = parse_cidr(o.value).map_err(|e| bad(o.value, e.to_string()))?;
    Ok(Some(net).filter(|n| n.prefix_len() > 0))
}

/// Turns a parsed nat rule into pfwd rules: one, or one per port of `-m multiport --dports`. `hook`: the built-in
/// chain the rule is in (or that jumps to pfwd's chain holding it).
fn build_rules(s: &Spec, command_tok: &str, hook: NatHook) -> Res<Vec<Rule>> {
    let post = hook == NatHook::Postrouting;
    let expected = if post { "-j SNAT or -j MASQUERADE" } else { "-j DNAT or -j REDIRECT" };
    let jump = s.jump.ok_or_else(|| bad(command_tok, format!("no target: expected {expected}")))?;
    let here = match hook {
        NatHook::Prerouting => "PREROUTING",
        NatHook::Postrouting => "POSTROUTING",
        NatHook::Output => "OUTPUT",
    };
    let kind = match jump.value {
        v @ ("DNAT" | "REDIRECT") if !post => v,
        v @ ("SNAT" | "MASQUERADE") if post => v,
        v @ ("DNAT" | "REDIRECT" | "SNAT" | "MASQUERADE") => {
            let there = if post { "PREROUTING and OUTPUT" } else { "POSTROUTING" };
            return Err(bad(
                v,
                format!(
                    "{v} only works in nat {there} (iptables: RULE_APPEND failed (Invalid argument): rule in chain {here})"
                ),
            ));
        }
        v if ["dnat", "redirect", "snat", "masquerade"].iter().any(|k| v.eq_ignore_ascii_case(k)) => {
            return Err(bad(v, format!("target names are upper case: -j {}", v.to_ascii_uppercase())));
        }
        v @ ("ACCEPT" | "RETURN") => {
            return Err(bad(v, "exceptions (-j ACCEPT/RETURN in nat) are not supported: every pfwd rule translates"));
        }
        v => {
            return Err(bad(
                v,
                format!(
                    "target {v} is not supported: pfwd converts -j DNAT and -j REDIRECT (PREROUTING, OUTPUT), -j SNAT \
                     and -j MASQUERADE (POSTROUTING)"
                ),
            ));
        }
    };
    let proto = match s.proto {
        None => None,
        Some(o) if o.value.eq_ignore_ascii_case("all") || o.value == "0" => None,
        Some(o) => Some(o.value.parse::<Proto>().map_err(|_| {
            bad(o.value, "protocol not supported: pfwd forwards tcp and udp (omit -p to match every protocol)")
        })?),
    };
    let proto_name = proto.map(|p| p.to_string());
    let has_match = |m: &str| s.matches.iter().any(|o| o.value == m);
    for m in &s.matches {
        match m.value {
            "tcp" | "udp" if proto_name.as_deref() != Some(m.value) => {
                return Err(bad(m.value, format!("-m {0} needs -p {0}", m.value)));
            }
            _ => {}
        }
    }
    if let Some(c) = s.comment.filter(|_| !has_match("comment")) {
        return Err(bad(c.name, "needs -m comment before it (iptables: unknown option \"--comment\")"));
    }
    // iptables takes --dport in POSTROUTING, but pfwd's SNAT buckets have no port level.
    if let Some(d) = s.dport.or(s.dports).filter(|_| post) {
        return Err(bad(
            d.name,
            "destination ports in POSTROUTING are not supported: pfwd's SNAT/MASQUERADE rules match -o, -p, -s and -d",
        ));
    }
    let mut dports: Vec<Option<PortRange>> = vec![None];
    if let Some(d) = s.dport {
        if proto.is_none() {
            return Err(bad(d.name, format!("needs -p tcp or -p udp (iptables: unknown option \"{}\")", d.name)));
        }
        dports = vec![Some(d.value.parse().map_err(|e: crate::rules::RuleError| bad(d.value, e.to_string()))?)];
    }
    if let Some(d) = s.dports {
        if !has_match("multiport") {
            return Err(bad(d.name, format!("needs -m multiport before it (iptables: unknown option \"{}\")", d.name)));
        }
        if proto.is_none() {
            return Err(bad(d.name, "multiport needs -p tcp or -p udp"));
        }
        if let Some(single) = s.dport {
            return Err(bad(single.name, format!("use either {} or -m multiport {}", single.name, d.name)));
        }
        let parts: Vec<&str> = d.value.split(',').collect();
        // iptables' limit: 15 ports, a range counting as two.
        if parts.iter().map(|p| if p.contains(':') { 2 } else { 1 }).sum::<usize>() > 15 {
            return Err(bad(d.value, "iptables: too many ports specified (multiport takes at most 15)"));
        }
        dports = parts
            .iter()
            .map(|p| p.parse().map(Some).map_err(|e: crate::rules::RuleError| bad(d.value, e.to_string())))
            .collect::<Res<_>>()?;
    }
    if s.proto.is_none() && has_match("multiport") {
        return Err(bad("multiport", "multiport needs -p tcp or -p udp"));
    }
    let iface_opt = |o: Option<Opt>| -> Res<Option<String>> {
        match o {
            Some(o) => {
                validate_iface(o.value).map_err(|e| bad(o.value, e.to_string()))?;
                Ok(Some(o.value.to_string()))
            }
            None => Ok(None),
        }
    };
    let (iface, oface) = (iface_opt(s.iface)?, iface_opt(s.oface)?);
    let (src, dst) = (net_opt(s.src)?, net_opt(s.dst)?);
    // `--to` abbreviates --to-destination or --to-source, so it may not come with either.
    let full = match kind {
        "DNAT" => s.to_dest,
        "SNAT" => s.to_source,
        _ => None,
    };
    if let (Some(to), Some(_)) = (s.to, full) {
        return Err(bad(to.name, format!("given twice (iptables: {kind}: option \"--to\" can only be used once)")));
    }
    let addr_opt = full.or(s.to);
    // Options of the other targets, named with what this one takes instead.
    let (takes, foreign) = match kind {
        "DNAT" => (
            "DNAT takes --to-destination ADDR[:PORT]",
            vec![(s.to_source, "-j SNAT"), (s.to_ports, "-j REDIRECT and -j MASQUERADE")],
        ),
        "SNAT" => (
            "SNAT takes --to-source ADDR[:LO-HI]",
            vec![(s.to_dest, "-j DNAT"), (s.to_ports, "-j REDIRECT and -j MASQUERADE")],
        ),
        "REDIRECT" => (
            "REDIRECT takes --to-ports PORT",
            vec![(s.to_dest, "-j DNAT"), (s.to_source, "-j SNAT"), (s.to, "-j DNAT and -j SNAT")],
        ),
        _ => (
            "MASQUERADE takes --to-ports LO-HI and uses the outgoing interface's address",
            vec![(s.to_dest, "-j DNAT"), (s.to_source, "-j SNAT"), (s.to, "-j DNAT and -j SNAT")],
        ),
    };
    if let Some((o, targets)) = foreign.into_iter().find_map(|(o, t)| o.map(|o| (o, t))) {
        return Err(bad(o.name, format!("is for {targets}; {takes}")));
    }
    let target = match kind {
        "DNAT" => {
            let to = addr_opt.ok_or_else(|| bad(jump.value, "DNAT needs --to-destination ADDR[:PORT]"))?;
            let (addr, port) = parse_to(to.value).map_err(|e| bad(to.value, e.to_string()))?;
            if port.is_some() && proto.is_none() {
                return Err(bad(to.name, format!("a port needs -p tcp or -p udp ({NEED_PROTO})")));
            }
            Target::Dnat { addr, port }
        }
        "SNAT" => {
            let to = addr_opt.ok_or_else(|| bad(jump.value, "SNAT needs --to-source ADDR[:LO-HI]"))?;
            let (addr, ports) = parse_snat_to(to.value).map_err(|e| bad(to.value, e.to_string()))?;
            if ports.is_some() && proto.is_none() {
                return Err(bad(to.name, format!("a port needs -p tcp or -p udp ({NEED_PROTO})")));
            }
            Target::Snat { addr, ports }
        }
        "REDIRECT" => {
            let to = s.to_ports.ok_or_else(|| {
                bad(jump.value, "REDIRECT without --to-ports keeps the original port; pfwd needs --to-ports PORT")
            })?;
            if to.value.contains(['-', ':']) {
                return Err(bad(to.value, "port ranges in --to-ports are not supported: pfwd redirects to one port"));
            }
            let port = parse_port(to.value).map_err(|e| bad(to.value, e.to_string()))?;
            if proto.is_none() {
                return Err(bad(to.name, format!("needs -p tcp or -p udp ({NEED_PROTO})")));
            }
            Target::Redirect { port }
        }
        _ => {
            let ports = match s.to_ports {
                None => None,
                Some(to) => {
                    if to.value.contains(':') {
                        return Err(bad(to.value, "iptables: Invalid port:port syntax - use dash"));
                    }
                    if proto.is_none() {
                        return Err(bad(to.name, format!("needs -p tcp or -p udp ({NEED_PROTO})")));
                    }
                    Some(to.value.parse().map_err(|e: crate::rules::RuleError| bad(to.value, e.to_string()))?)
                }
            };
            Target::Masquerade { ports }
        }
    };
    // Valid iptables (checked last, so iptables' own errors come first) that pfwd's --local rules cannot express: they
    // translate in the socket hooks (connect, sendmsg), before routing picks the outgoing interface and the source.
    let local = hook == NatHook::Output;
    if let Some(o) = s.oface.filter(|_| local) {
        return Err(bad(
            o.name,
            "valid iptables, but pfwd does not support -o in OUTPUT: local connections are translated when they are \
             made, before routing picks the outgoing interface",
        ));
    }
    if let Some(o) = s.src.filter(|_| local && src.is_some()) {
        return Err(bad(
            o.name,
            "valid iptables, but pfwd does not support -s in OUTPUT: local connections are translated when they are \
             made, and the source address is chosen after that (by routing, for the new destination)",
        ));
    }
    dports
        .into_iter()
        .map(|dport| {
            let mut rule =
                Rule { id: 0, iface: iface.clone(), oface: oface.clone(), proto, src, dst, dport, local, target };
            rule.normalize();
            rule.validate().map_err(|e| bad(command_tok, e.to_string()))?;
            Ok(rule)
        })
        .collect()
}

/// One iptables rule in a chain: the pfwd rules it became (several for multiport), or the jump into pfwd's chain.
#[derive(Debug)]
enum Entry {
    Rules(Vec<usize>),
    Jump,
}

#[derive(Default)]
struct Importer {
    /// The `*table` of an `iptables-save` section.
    save_table: Option<String>,
    /// Imported rules with their line number, in input order.
    rules: Vec<(Rule, usize)>,
    /// nat `PREROUTING` and `PFWD-PREROUTING` in iptables' order.
    prerouting: Vec<Entry>,
    pfwd_chain: Vec<Entry>,
    /// nat `POSTROUTING` and `PFWD-POSTROUTING` in iptables' order.
    postrouting: Vec<Entry>,
    pfwd_post_chain: Vec<Entry>,
    /// nat `OUTPUT` and `PFWD-OUTPUT` in iptables' order.
    output: Vec<Entry>,
    pfwd_output_chain: Vec<Entry>,
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
        let hook = match chain {
            "PREROUTING" | PREROUTING_CHAIN => NatHook::Prerouting,
            "POSTROUTING" | POSTROUTING_CHAIN => NatHook::Postrouting,
            "OUTPUT" | OUTPUT_CHAIN => NatHook::Output,
            "INPUT" => {
                return Err(bad(
                    chain,
                    format!(
                        "valid iptables, but pfwd does not support nat {chain} rules yet (only PREROUTING, \
                         POSTROUTING and OUTPUT)"
                    ),
                ));
            }
            c if ["PREROUTING", "POSTROUTING", "OUTPUT"].iter().any(|b| c.eq_ignore_ascii_case(b)) => {
                return Err(bad(c, format!("chain names are case-sensitive: {}", c.to_ascii_uppercase())));
            }
            c => {
                return Err(bad(
                    c,
                    format!(
                        "rules in chain {c} are not supported; pfwd imports nat PREROUTING, POSTROUTING and OUTPUT \
                         rules (put them there)"
                    ),
                ));
            }
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
        let (builtin, pfwd_chain) = match hook {
            NatHook::Prerouting => ("PREROUTING", PREROUTING_CHAIN),
            NatHook::Postrouting => ("POSTROUTING", POSTROUTING_CHAIN),
            NatHook::Output => ("OUTPUT", OUTPUT_CHAIN),
        };
        let entry = match spec.jump {
            Some(j) if j.value == pfwd_chain && chain == builtin => Entry::Jump,
            _ => {
                let mut ids = Vec::new();
                for rule in build_rules(&spec, tok, hook)? {
                    self.rules.push((rule, line_no));
                    ids.push(self.rules.len() - 1);
                }
                Entry::Rules(ids)
            }
        };
        let list = match (hook, chain == pfwd_chain) {
            (NatHook::Prerouting, false) => &mut self.prerouting,
            (NatHook::Prerouting, true) => &mut self.pfwd_chain,
            (NatHook::Postrouting, false) => &mut self.postrouting,
            (NatHook::Postrouting, true) => &mut self.pfwd_post_chain,
            (NatHook::Output, false) => &mut self.output,
            (NatHook::Output, true) => &mut self.pfwd_output_chain,
        };
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
        if let Some(j @ ("DNAT" | "REDIRECT" | "SNAT" | "MASQUERADE")) = jump {
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
        let mut order = chain_order(&self.prerouting, &self.pfwd_chain);
        order.extend(chain_order(&self.postrouting, &self.pfwd_post_chain));
        order.extend(chain_order(&self.output, &self.pfwd_output_chain));

        let mut kept: Vec<(Rule, usize)> = Vec::new();
        for i in order {
            let (rule, line) = &self.rules[i];
            match kept.iter().find(|(k, _)| k.same_match_and_target(rule)) {
                Some((_, first)) => self.warnings.push(format!(
                    "line {line}: duplicate of line {first} (\"{rule}\"); dropped, it could never match"
                )),
                None => kept.push((rule.clone(), *line)),
            }
        }

        let rules: Vec<Rule> = kept.iter().map(|(r, _)| r.clone()).collect();
        let mut rank = vec![0; rules.len()];
        for (pos, i) in precedence_order(&rules).into_iter().enumerate() {
            rank[i] = pos;
        }
        for later in 0..rules.len() {
            for earlier in 0..later {
                let (a, b) = (&rules[earlier], &rules[later]);
                if rank[later] < rank[earlier] && a.target != b.target && may_overlap(a, b) {
                    let (la, lb) = (kept[earlier].1, kept[later].1);
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

/// iptables' order of one hook: the built-in chain, with pfwd's chain where the first jump to it is (or after
/// everything).
fn chain_order(builtin: &[Entry], pfwd_chain: &[Entry]) -> Vec<usize> {
    let mut order: Vec<usize> = Vec::new();
    let pfwd: Vec<usize> = pfwd_chain.iter().flat_map(entry_rules).collect();
    let mut jumped = false;
    for e in builtin {
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

fn entry_rules(e: &Entry) -> Vec<usize> {
    match e {
        Entry::Rules(ids) => ids.clone(),
        Entry::Jump => Vec::new(),
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
    nat_hook(a) == nat_hook(b)
        && either_or_equal(&a.iface, &b.iface)
        && either_or_equal(&a.oface, &b.oface)
        && either_or_equal(&a.proto, &b.proto)
        && ports
        && nets(a.src, b.src)
        && nets(a.dst, b.dst)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::cli::parse_rule as parse_args;

    fn rule(s: &str) -> Rule {
        parse_args(&s.split_whitespace().collect::<Vec<_>>()).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn with_id(id: u32, s: &str) -> Rule {
        Rule { id, ..rule(s) }
    }

    fn ok(text: &str) -> Import {
        import(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn err(text: &str) -> ImportError {
        match import(text) {
            Ok(i) => panic!("{text}: accepted as {:?}", i.rules.iter().map(ToString::to_string).collect::<Vec<_>>()),
            Err(e) => e,
        }
    }

    /// The sample from the module's design: one rule of each shape.
    fn sample() -> Vec<Rule> {
        vec![
            with_id(1, "redirect -p tcp --dport 80 --to-port 3000"),
            with_id(2, "dnat -d 203.0.113.10 --to 10.0.2.2"),
            with_id(3, "dnat -p tcp --dport 8000-8099 --to 10.0.2.2"),
            with_id(4, "dnat -i eth0 -p tcp --dport 59999 --to 127.0.0.1:17355"),
            with_id(5, "dnat -p udp -s 192.168.1.0/24 --dport 53 --to 10.0.2.3:5353"),
        ]
    }

    /// Rules in precedence order, PREROUTING ones first, then POSTROUTING, then OUTPUT (the import's order: chain by
    /// chain), compared by match and target (ids are not imported).
    fn assert_same_rules(got: &[Rule], want: &[Rule]) {
        let want: Vec<&Rule> = NAT_HOOKS.into_iter().flat_map(|h| hook_order(want, h)).map(|i| &want[i]).collect();
        let same = got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| g.same_match_and_target(w));
        let show = |rs: Vec<&Rule>| rs.iter().map(|r| r.to_string()).collect::<Vec<_>>();
        assert!(same, "got {:#?}\nwant {:#?}", show(got.iter().collect()), show(want));
        assert!(got.iter().all(|r| r.id == 0));
    }

    // ---- export ----

    #[test]
    fn chain_script_format() {
        assert_eq!(
            nat_chain_script(&sample()),
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
        assert!(nat_chain_script(&[]).starts_with(
            "*nat\n:PFWD-PREROUTING - [0:0]\n:PFWD-POSTROUTING - [0:0]\n:PFWD-OUTPUT - [0:0]\nCOMMIT\n*filter\n"
        ));
        // A /0 prefix matches everything; iptables-save would drop it, so the export does too.
        let mut any = with_id(9, "dnat -p tcp --to 10.0.0.1");
        any.src = Some("0.0.0.0/0".parse().unwrap());
        assert!(nat_chain_script(&[any]).contains("-A PFWD-PREROUTING -p tcp -m comment"));
    }

    #[test]
    fn hooks() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let all = hook_rules(None);
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].append_args(), s(&["-t", "nat", "-A", "PREROUTING", "-j", "PFWD-PREROUTING"]));
        assert_eq!(all[1].append_args(), s(&["-t", "nat", "-A", "POSTROUTING", "-j", "PFWD-POSTROUTING"]));
        assert_eq!(all[2].append_args(), s(&["-t", "nat", "-A", "OUTPUT", "-j", "PFWD-OUTPUT"]));
        assert_eq!(all[3].check_args(), s(&["-t", "filter", "-C", "FORWARD", "-j", "PFWD-FORWARD"]));
        assert!(all.iter().all(Hook::is_shared));
        let ifaces = s(&["eth0", "wg0"]);
        let some = hook_rules(Some(&ifaces));
        let lines: Vec<String> = some.iter().map(|h| format!("{} {}", h.table, h.restore_line())).collect();
        assert_eq!(
            lines,
            [
                "nat -A PREROUTING -i eth0 -j PFWD-PREROUTING",
                "nat -A PREROUTING -i wg0 -j PFWD-PREROUTING",
                "nat -A POSTROUTING -o eth0 -j PFWD-POSTROUTING",
                "nat -A POSTROUTING -o wg0 -j PFWD-POSTROUTING",
                "nat -A OUTPUT -j PFWD-OUTPUT",
                "filter -A FORWARD -i eth0 -j PFWD-FORWARD",
                "filter -A FORWARD -o eth0 -j PFWD-FORWARD",
                "filter -A FORWARD -i wg0 -j PFWD-FORWARD",
                "filter -A FORWARD -o wg0 -j PFWD-FORWARD",
            ]
        );
        assert_eq!(some[6].delete_args(), s(&["-t", "filter", "-D", "FORWARD", "-o", "eth0", "-j", "PFWD-FORWARD"]));
        assert_eq!(
            some[2].delete_args(),
            s(&["-t", "nat", "-D", "POSTROUTING", "-o", "eth0", "-j", "PFWD-POSTROUTING"])
        );
        assert!(hook_rules(Some(&[])).is_empty());
        // The OUTPUT jump is one for any non-empty list, and the only jump shared by the interfaces.
        for n in 1..=3 {
            let list: Vec<String> = (0..n).map(|i| format!("eth{i}")).collect();
            let hooks = hook_rules(Some(&list));
            let output: Vec<&Hook> = hooks.iter().filter(|h| h.chain == "OUTPUT").collect();
            assert_eq!(output.len(), 1, "{hooks:?}");
            assert_eq!(output[0].delete_args(), s(&["-t", "nat", "-D", "OUTPUT", "-j", "PFWD-OUTPUT"]));
            assert_eq!(hooks.iter().filter(|h| h.is_shared()).collect::<Vec<_>>(), output);
            assert_eq!(hooks.len(), 1 + 4 * n);
        }
    }

    #[test]
    fn iptables_export_has_header_and_hooks() {
        let ifaces = vec!["eth0".to_string()];
        let text = export_iptables(&sample(), Some(&ifaces));
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
        for line in nat_chain_script(&sample()).lines() {
            assert!(body.contains(&line), "{line}");
        }
    }

    #[test]
    fn nft_export_format() {
        let mut rules = sample();
        rules.push(with_id(6, "redirect -p udp --to-port 53"));
        rules.push(with_id(7, "dnat -p tcp -s 10.9.0.0/16 --to 10.0.2.9:22"));
        let text = export_nft(&rules, None);
        let want = "table ip pfwd {}\n\
                    delete table ip pfwd\n\n\
                    table ip pfwd {\n\
                    \tchain prerouting {\n\
                    \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
                    \t\tiifname \"eth0\" tcp dport 59999 dnat to 127.0.0.1:17355 comment \"pfwd:4\"\n\
                    \t\tip saddr 192.168.1.0/24 udp dport 53 dnat to 10.0.2.3:5353 comment \"pfwd:5\"\n\
                    \t\ttcp dport 80 redirect to :3000 comment \"pfwd:1\"\n\
                    \t\ttcp dport 8000-8099 dnat to 10.0.2.2 comment \"pfwd:3\"\n\
                    \t\tip saddr 10.9.0.0/16 meta l4proto tcp dnat to 10.0.2.9:22 comment \"pfwd:7\"\n\
                    \t\tmeta l4proto udp redirect to :53 comment \"pfwd:6\"\n\
                    \t\tip daddr 203.0.113.10 dnat to 10.0.2.2 comment \"pfwd:2\"\n\
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
        let text = export_nft(&rules, Some(&ifaces));
        assert!(text.contains("policy accept;\n\t\tiifname != { \"eth0\", \"wg0\" } accept\n\t\tiifname \"eth0\" tcp"));
        assert!(text.contains(
            "\t\tiifname { \"eth0\", \"wg0\" } ct state invalid drop\n\t\toifname { \"eth0\", \"wg0\" } ct state invalid drop\n"
        ));
    }

    /// SNAT/MASQUERADE rules of each shape, ids after [`sample`]'s.
    fn post_sample() -> Vec<Rule> {
        vec![
            with_id(6, "masquerade -o eth0"),
            with_id(7, "snat -o eth0 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099"),
            with_id(8, "masquerade -o wg0 -p udp --to-ports 1024-1027"),
            with_id(9, "snat -d 198.51.100.0/24 --to 203.0.113.6"),
            with_id(10, "snat -p tcp --to 203.0.113.7:5000"),
        ]
    }

    fn with_post() -> Vec<Rule> {
        sample().into_iter().chain(post_sample()).collect()
    }

    #[test]
    fn postrouting_export_formats() {
        let ifaces = vec!["eth0".to_string()];
        let text = export_iptables(&with_post(), Some(&ifaces));
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
        assert_eq!(pre(&text), pre(&nat_chain_script(&sample())));
        assert!(text.starts_with("# pfwd rules for iptables (10 rules"), "{text}");

        let nft = export_nft(&with_post(), Some(&ifaces));
        let want = "\tchain postrouting {\n\
                    \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
                    \t\toifname != { \"eth0\" } accept\n\
                    \t\toifname \"eth0\" ip saddr 10.0.2.0/24 meta l4proto tcp snat to 203.0.113.5:20000-20099 comment \"pfwd:7\"\n\
                    \t\toifname \"wg0\" meta l4proto udp masquerade to :1024-1027 comment \"pfwd:8\"\n\
                    \t\tmeta l4proto tcp snat to 203.0.113.7:5000 comment \"pfwd:10\"\n\
                    \t\toifname \"eth0\" masquerade comment \"pfwd:6\"\n\
                    \t\tip daddr 198.51.100.0/24 snat to 203.0.113.6 comment \"pfwd:9\"\n\
                    \t}\n\n\
                    \tchain output {\n";
        assert!(nft.contains(want), "{nft}");
        // No POSTROUTING rule ever lands in the prerouting chain, and vice versa.
        let prerouting = &nft[nft.find("chain prerouting").unwrap()..nft.find("chain postrouting").unwrap()];
        assert!(!prerouting.contains("snat") && !prerouting.contains("masquerade"), "{prerouting}");
        assert_eq!(prerouting.matches("comment \"pfwd:").count(), sample().len());
        assert!(
            export_nft(&post_sample(), Some(&[]))
                .contains("priority srcnat; policy accept;\n\t\taccept comment \"pfwd: no interfaces\"\n")
        );
    }

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
    fn import_postrouting_rejections() {
        const A: &str = "iptables -t nat -A POSTROUTING";
        for (body, token, message) in [
            ("-i eth0 -j MASQUERADE", "-i", "iptables: Can't use -i with POSTROUTING"),
            ("--in-interface eth0 -j MASQUERADE", "--in-interface", "Can't use -i with POSTROUTING"),
            ("-p tcp --dport 80 -j MASQUERADE", "--dport", "destination ports in POSTROUTING are not supported"),
            ("-p tcp -m multiport --dports 80,81 -j MASQUERADE", "--dports", "destination ports in POSTROUTING"),
            ("-p tcp -j MASQUERADE --to-ports 1000:1002", "1000:1002", "Invalid port:port syntax - use dash"),
            ("-j MASQUERADE --to-ports 1000-1002", "--to-ports", "Need TCP, UDP, SCTP or DCCP with port specification"),
            ("-j SNAT --to-source 1.2.3.4:1000", "--to-source", "Need TCP, UDP, SCTP or DCCP"),
            ("-p tcp -j MASQUERADE --to-ports 0-5", "0-5", "port 0"),
            ("-j SNAT", "SNAT", "SNAT needs --to-source ADDR[:LO-HI]"),
            ("-o eth0", "-A", "no target: expected -j SNAT or -j MASQUERADE"),
            ("-j DNAT --to 10.0.2.2", "DNAT", "DNAT only works in nat PREROUTING"),
            ("-p tcp -j REDIRECT --to-ports 80", "REDIRECT", "REDIRECT only works in nat PREROUTING"),
            ("-j snat --to 1.2.3.4", "snat", "upper case: -j SNAT"),
            ("-j SNAT --to-source 1.2.3.4-1.2.3.9", "1.2.3.4-1.2.3.9", "address ranges"),
            ("-p tcp -j SNAT --to-source 1.2.3.4:1000:2000", "1.2.3.4:1000:2000", "bad --to"),
            ("-j SNAT --to-destination 1.2.3.4", "--to-destination", "is for -j DNAT; SNAT takes --to-source"),
            ("-p tcp -j SNAT --to-source 1.2.3.4 --to-ports 80", "--to-ports", "SNAT takes --to-source"),
            ("-j SNAT --to 1.2.3.4 --to-source 1.2.3.5", "--to", "given twice"),
            ("-j SNAT --to-source 1.2.3.4 --to-source 1.2.3.5", "--to-source", "given twice"),
            ("-j MASQUERADE --to 1.2.3.4", "--to", "MASQUERADE takes --to-ports LO-HI"),
            ("-j MASQUERADE --random", "--random", "pfwd keeps the source port when free"),
            ("-j SNAT --to-source 1.2.3.4 --persistent", "--persistent", "keeps the source port"),
            ("--to-source 1.2.3.4 -j SNAT", "--to-source", "goes after -j SNAT"),
            ("-o eth+ -j MASQUERADE", "eth+", "wildcards"),
            ("! -o eth0 -j MASQUERADE", "!", "negation"),
            ("-j ACCEPT", "ACCEPT", "exceptions"),
        ] {
            let text = format!("{A} -o eth9 -j MASQUERADE\n{A} {body}\n");
            let e = err(&text);
            assert_eq!((e.line_no, e.token.as_str()), (2, token), "{body}: {e}");
            assert!(e.message.contains(message), "{body}: {e}");
        }
        for (line, token, message) in [
            ("iptables -t nat -A PREROUTING -j SNAT --to 1.2.3.4", "SNAT", "SNAT only works in nat POSTROUTING"),
            ("iptables -t nat -A PREROUTING -j MASQUERADE", "MASQUERADE", "only works in nat POSTROUTING"),
            (
                "iptables -t nat -A PREROUTING --out-interface eth0 -j DNAT --to 1.2.3.4",
                "--out-interface",
                "-o with PREROUTING",
            ),
            ("iptables -t nat -A postrouting -j MASQUERADE", "postrouting", "case-sensitive: POSTROUTING"),
            ("iptables -t nat -A OUTPUT -j MASQUERADE", "MASQUERADE", "MASQUERADE only works in nat POSTROUTING"),
            ("iptables -A POSTROUTING -j MASQUERADE", "MASQUERADE", "only valid in the nat table"),
            ("iptables -A POSTROUTING -j ACCEPT", "POSTROUTING", "the filter table has no POSTROUTING chain"),
            ("-A PFWD-POSTROUTING -i eth0 -j MASQUERADE", "-i", "Can't use -i with POSTROUTING"),
        ] {
            let e = err(&format!("\n{line}\n"));
            assert_eq!((e.line_no, e.token.as_str()), (2, token), "{line}: {e}");
            assert!(e.message.contains(message), "{line}: {e}");
        }
    }

    /// `--local` rules of each shape, ids after [`post_sample`]'s.
    fn local_sample() -> Vec<Rule> {
        vec![
            with_id(11, "dnat --local -p tcp -d 198.51.100.13 --dport 1111 --to 127.0.0.1:80"),
            with_id(12, "redirect --local -p tcp --dport 8080 --to-port 80"),
            with_id(13, "dnat --local -d 198.51.100.0/24 --to 10.0.2.13"),
            with_id(14, "dnat --local -p udp --dport 5000-5009 --to 10.0.2.4"),
            with_id(15, "redirect --local -p udp --to-port 53"),
        ]
    }

    /// Rules of all three hooks.
    fn with_local() -> Vec<Rule> {
        with_post().into_iter().chain(local_sample()).collect()
    }

    #[test]
    fn local_export_formats() {
        let ifaces = vec!["eth0".to_string(), "wg0".to_string()];
        let text = export_iptables(&with_local(), Some(&ifaces));
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
        assert_eq!(others(&text), others(&export_iptables(&with_post(), Some(&ifaces))));
        // The chain script holds the same lines, without the jump.
        let script = nat_chain_script(&with_local());
        let script_output: Vec<&str> = script.lines().filter(|l| l.contains("OUTPUT")).collect();
        assert_eq!(script_output, [&output[..1], &output[2..]].concat());
        // Only local rules: PFWD-PREROUTING stays empty.
        assert!(!nat_chain_script(&local_sample()).contains("-A PFWD-PREROUTING"));

        let nft = export_nft(&with_local(), Some(&ifaces));
        let want = "\tchain output {\n\
                    \t\ttype nat hook output priority -100; policy accept;\n\
                    \t\tip daddr 198.51.100.13 tcp dport 1111 dnat to 127.0.0.1:80 comment \"pfwd:11\"\n\
                    \t\ttcp dport 8080 redirect to :80 comment \"pfwd:12\"\n\
                    \t\tudp dport 5000-5009 dnat to 10.0.2.4 comment \"pfwd:14\"\n\
                    \t\tmeta l4proto udp redirect to :53 comment \"pfwd:15\"\n\
                    \t\tip daddr 198.51.100.0/24 dnat to 10.0.2.13 comment \"pfwd:13\"\n\
                    \t}\n\n\
                    \tchain forward {\n";
        assert!(nft.contains(want), "{nft}");
        // Not filtered by interface (no accept line), the same without an interface list.
        assert!(export_nft(&with_local(), None).contains(want));
        let prerouting = &nft[nft.find("chain prerouting").unwrap()..nft.find("chain postrouting").unwrap()];
        assert_eq!(prerouting.matches("comment \"pfwd:").count(), sample().len(), "{prerouting}");
        // No interfaces: no NAT at all, local connections included (like iptables without jumps).
        assert!(
            export_nft(&local_sample(), Some(&[]))
                .contains("priority -100; policy accept;\n\t\taccept comment \"pfwd: no interfaces\"\n")
        );
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
    fn import_output_rejections() {
        const A: &str = "iptables -t nat -A OUTPUT";
        for (body, token, message) in [
            // What iptables itself rejects.
            ("-i eth0 -j DNAT --to 10.0.2.2", "-i", "iptables: Can't use -i with OUTPUT"),
            ("--in-interface lo -j DNAT --to 10.0.2.2", "--in-interface", "Can't use -i with OUTPUT"),
            (
                "-j SNAT --to-source 1.2.3.4",
                "SNAT",
                "SNAT only works in nat POSTROUTING (iptables: RULE_APPEND failed (Invalid argument): rule in chain \
                 OUTPUT)",
            ),
            ("-s 10.0.0.1 -j MASQUERADE", "MASQUERADE", "MASQUERADE only works in nat POSTROUTING"),
            ("-p tcp -j REDIRECT", "REDIRECT", "pfwd needs --to-ports PORT"),
            ("-j REDIRECT --to-ports 80", "--to-ports", "Need TCP, UDP, SCTP or DCCP"),
            ("-d 10.0.0.1 -j DNAT --to 10.0.2.2:80", "--to", "Need TCP, UDP"),
            ("-d 10.0.0.1", "-A", "no target: expected -j DNAT or -j REDIRECT"),
            ("-o eth0 -s 10.0.0.1 -j SNAT --to 1.2.3.4", "SNAT", "SNAT only works in nat POSTROUTING"),
            // Valid iptables that pfwd's --local rules cannot express.
            ("-o eth0 -j DNAT --to 10.0.2.2", "-o", "valid iptables, but pfwd does not support -o in OUTPUT"),
            ("--out-interface lo -p tcp -j REDIRECT --to-ports 80", "--out-interface", "does not support -o in OUTPUT"),
            (
                "-s 10.0.0.1 -j DNAT --to 10.0.2.2",
                "-s",
                "valid iptables, but pfwd does not support -s in OUTPUT: local connections are translated when they \
                 are made, and the source address is chosen after that",
            ),
            ("--source 10.0.0.0/8 -p tcp --dport 80 -j REDIRECT --to-ports 8080", "--source", "-s in OUTPUT"),
            ("! -d 10.0.0.1 -j DNAT --to 10.0.2.2", "!", "negation"),
            ("-j NETMAP --to 10.9.0.0/16", "NETMAP", "does not support NETMAP yet"),
        ] {
            let text = format!("{A} -p tcp --dport 1 -j REDIRECT --to-ports 2\n{A} {body}\n");
            let e = err(&text);
            assert_eq!((e.line_no, e.token.as_str()), (2, token), "{body}: {e}");
            assert!(e.message.contains(message), "{body}: {e}");
        }
        // -s 0.0.0.0/0 matches every source: nothing to refuse.
        assert!(ok(&format!("{A} -s 0.0.0.0/0 -d 10.0.0.1 -j DNAT --to 10.0.2.2")).rules[0].local);
        for (line, token, message) in [
            ("-A PFWD-OUTPUT -i eth0 -j DNAT --to 10.0.2.2", "-i", "Can't use -i with OUTPUT"),
            ("-A PFWD-OUTPUT -s 10.0.0.1 -j DNAT --to 10.0.2.2", "-s", "-s in OUTPUT"),
            ("iptables -t nat -A output -j DNAT --to 10.0.2.2", "output", "case-sensitive: OUTPUT"),
            ("iptables -A OUTPUT -j DNAT --to 10.0.2.2", "DNAT", "only valid in the nat table: add -t nat"),
            ("iptables -t nat -A POSTROUTING -j DNAT --to 10.0.2.2", "DNAT", "only works in nat PREROUTING and OUTPUT"),
        ] {
            let e = err(&format!("\n{line}\n"));
            assert_eq!((e.line_no, e.token.as_str()), (2, token), "{line}: {e}");
            assert!(e.message.contains(message), "{line}: {e}");
        }
    }

    // ---- round trip ----

    use crate::rules::tests::Rng;

    /// A random valid rule, a third of them SNAT/MASQUERADE and a fifth of the others `--local`; half the time from a
    /// small value space so rules overlap and collide.
    fn random_rule(rng: &mut Rng) -> Rule {
        let small = rng.chance(50);
        let post = rng.chance(33);
        let local = !post && rng.chance(20);
        let proto = [None, Some(Proto::Tcp), Some(Proto::Udp)][rng.below(3) as usize];
        let port = |rng: &mut Rng| if small { 79 + rng.below(4) as u16 } else { (rng.below(65535) + 1) as u16 };
        let net = |rng: &mut Rng| {
            let len = if small { [0, 8, 24, 32][rng.below(4) as usize] } else { rng.below(33) as u8 };
            let addr =
                if small { Ipv4Addr::new(10, 1, 2, rng.below(3) as u8) } else { Ipv4Addr::from(rng.next() as u32) };
            Ipv4Net::new(addr, len).unwrap().trunc()
        };
        let range = |rng: &mut Rng| {
            let (a, b) = (port(rng), if rng.chance(50) { None } else { Some(port(rng)) });
            let b = b.unwrap_or(a);
            PortRange { lo: a.min(b), hi: a.max(b) }
        };
        let dport = (!post && proto.is_some() && rng.chance(60)).then(|| range(rng));
        let iface = rng.chance(40).then(|| ["eth0", "wg0", "veth-a.1", "br_lan"][rng.below(4) as usize].to_string());
        let target = if post {
            let ports = (proto.is_some() && rng.chance(60)).then(|| range(rng));
            if rng.chance(50) {
                Target::Snat { addr: Ipv4Addr::from((rng.below(0xdfff_fffe) + 1) as u32), ports }
            } else {
                Target::Masquerade { ports }
            }
        } else if proto.is_some() && rng.chance(40) {
            Target::Redirect { port: port(rng) }
        } else {
            let addr = Ipv4Addr::from((rng.below(0xdfff_fffe) + 1) as u32);
            Target::Dnat { addr, port: (proto.is_some() && rng.chance(60)).then(|| port(rng)) }
        };
        let src = rng.chance(50).then(|| net(rng));
        Rule {
            id: rng.below(50) as u32 + 1,
            // --local rules have neither -i nor -s.
            iface: iface.clone().filter(|_| !post && !local),
            oface: iface.filter(|_| post),
            proto,
            src: src.filter(|_| !local),
            dst: rng.chance(50).then(|| net(rng)),
            dport,
            local,
            target,
        }
    }

    /// A random rule set without duplicates (pfwd refuses those on add).
    fn random_rules(rng: &mut Rng, max: u64) -> Vec<Rule> {
        let mut rules: Vec<Rule> = Vec::new();
        for _ in 0..rng.below(max + 1) {
            let r = random_rule(rng);
            r.validate().unwrap();
            if !rules.iter().any(|o| o.same_match_and_target(&r)) {
                rules.push(r);
            }
        }
        rules
    }

    #[test]
    fn export_import_round_trip_property() {
        let mut rng = Rng(0x5eed_1234);
        let ifaces = [vec![], vec!["eth0".to_string()], vec!["eth0".to_string(), "wg0".to_string()]];
        let (mut total, mut local) = (0, 0);
        for case in 0..3000 {
            let rules = random_rules(&mut rng, 12);
            total += rules.len();
            local += rules.iter().filter(|r| r.local).count();
            let hooks = match case % 4 {
                0 => None,
                n => Some(&ifaces[n - 1][..]),
            };
            for text in [export_iptables(&rules, hooks), nat_chain_script(&rules)] {
                let got = import(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
                assert_same_rules(&got.rules, &rules);
                // The export is already in pfwd's order, so nothing can be reordered.
                assert!(got.warnings.is_empty(), "{:?}", got.warnings);
            }
        }
        assert!(total > 10_000, "{total}");
        assert!(local > 1_000, "{local}");
    }

    // ---- import: what users have ----

    #[test]
    fn import_classic_commands() {
        for (line, want) in [
            (
                "iptables -t nat -A PREROUTING -p tcp --dport 59999 -j REDIRECT --to-port 80",
                "redirect -p tcp --dport 59999 --to-port 80",
            ),
            (
                "sudo iptables -t nat -A PREROUTING -i eth0 -p tcp --dport 59999 -j DNAT --to 127.0.0.1:17355",
                "dnat -i eth0 -p tcp --dport 59999 --to 127.0.0.1:17355",
            ),
            (
                "iptables -t nat -I PREROUTING -p tcp -d 198.51.100.7 --dport 80 -j DNAT --to-destination 10.0.2.2:8080",
                "dnat -p tcp -d 198.51.100.7 --dport 80 --to 10.0.2.2:8080",
            ),
            (
                "iptables -t nat -A PREROUTING -s 192.168.1.0/24 -p udp -m udp --dport 8000:8099 -j DNAT --to-destination 10.0.2.2",
                "dnat -p udp -s 192.168.1.0/24 --dport 8000-8099 --to 10.0.2.2",
            ),
            (
                "iptables -t nat -A PREROUTING -d 203.0.113.10 -j DNAT --to 10.0.2.2",
                "dnat -d 203.0.113.10 --to 10.0.2.2",
            ),
            // Path, -w, -t after the command, --opt=value.
            (
                "/usr/sbin/iptables -w -A PREROUTING -t nat -p tcp --dport=80 -j REDIRECT --to-ports=3000",
                "redirect -p tcp --dport 80 --to-port 3000",
            ),
            (
                "sudo -E iptables-nft --wait 5 --table nat --append PREROUTING --in-interface wg0 --protocol TCP \
                 --source 192.168.1.5/24 --destination-port 22 --jump DNAT --to-destination 10.0.2.2:22",
                "dnat -i wg0 -p tcp -s 192.168.1.0/24 --dport 22 --to 10.0.2.2:22",
            ),
            // Quoted comment, -p all, a netmask, a /0 that means "anything".
            (
                "iptables -t nat -A PREROUTING -p tcp --dport 80 -m comment --comment \"web 'front' #1\" -j REDIRECT --to-ports 3000",
                "redirect -p tcp --dport 80 --to-port 3000",
            ),
            (
                "iptables -t nat -A PREROUTING -p all -s 0.0.0.0/0 -d 10.0.0.1/255.255.255.0 -j DNAT --to 10.0.2.2",
                "dnat -d 10.0.0.0/24 --to 10.0.2.2",
            ),
            // A bare iptables-save line: nat is assumed.
            (
                "-A PREROUTING -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 3000",
                "redirect -p tcp --dport 80 --to-port 3000",
            ),
            (
                "iptables -t nat -A PREROUTING -p tcp --dport 80 -j DNAT --to 10.0.2.2:8080   # trailing comment",
                "dnat -p tcp --dport 80 --to 10.0.2.2:8080",
            ),
        ] {
            let got = ok(line);
            assert_eq!(got.rules, vec![rule(want)], "{line}");
            assert!(got.warnings.is_empty(), "{line}: {:?}", got.warnings);
        }
    }

    #[test]
    fn import_script_with_continuations_and_comments() {
        let text = "#!/bin/sh\n\
                    # forward the web server\n\
                    \n\
                    iptables -t nat -F\n\
                    iptables -t nat -A PREROUTING -i eth0 \\\n\
                    \x20   -p tcp --dport 443 \\\n\
                    \x20   -j DNAT --to-destination 10.0.2.2\n\
                    iptables -t nat -A PREROUTING -p udp --dport 53 -j REDIRECT --to-ports 5353\r\n";
        let got = ok(text);
        let want =
            [rule("dnat -i eth0 -p tcp --dport 443 --to 10.0.2.2"), rule("redirect -p udp --dport 53 --to-port 5353")];
        assert_eq!(got.rules, want);
        // An error in a continued line names its first line and shows it joined.
        let e = err(
            "\niptables -t nat -A PREROUTING \\\n  -p tcp --dport 443 \\\n  -j DNAT --to-destination 10.0.2.2:99999\n",
        );
        assert_eq!((e.line_no, e.token.as_str()), (2, "10.0.2.2:99999"));
        assert_eq!(e.line, "iptables -t nat -A PREROUTING -p tcp --dport 443 -j DNAT --to-destination 10.0.2.2:99999");
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
    fn multiport_expands() {
        let got =
            ok("iptables -t nat -A PREROUTING -p tcp -m multiport --dports 80,443,8000:8099 -j DNAT --to 10.0.2.2");
        let want = ["80", "443", "8000-8099"].map(|p| rule(&format!("dnat -p tcp --dport {p} --to 10.0.2.2")));
        assert_eq!(got.rules, want);
        let got = ok("iptables -t nat -A PREROUTING -p udp -m multiport --dports 53,53 -j REDIRECT --to-ports 5353");
        assert_eq!(got.rules.len(), 1);
        assert_eq!(
            got.warnings,
            [
                "line 1: duplicate of line 1 (\"redirect -p udp --dport 53 --to-port 5353\"); dropped, it could never match"
            ]
        );
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
    fn error_display() {
        let e = err("# port 80\n\niptables -t nat -A PREROUTING -p tcp –dport 80 -j REDIRECT --to-port 3000\n");
        assert_eq!(
            e.to_string(),
            "line 3: iptables -t nat -A PREROUTING -p tcp –dport 80 -j REDIRECT --to-port 3000: \"–dport\": an en dash \
             (–) is not an option prefix; use --dport"
        );
    }

    #[test]
    fn import_rejections() {
        const A: &str = "iptables -t nat -A PREROUTING";
        for (body, token, message) in [
            // What iptables itself rejects.
            ("-p tcp –dport 80 -j REDIRECT --to-port 3000", "–dport", "use --dport"),
            ("-p tcp --dport 80 -j DNAT —to 10.0.2.2", "—to", "an em dash (—) is not an option prefix; use --to"),
            ("–p tcp --dport 80 -j REDIRECT --to-port 3000", "–p", "use -p"),
            ("-p tcp --dport 80 -j DNAT -- to 10.0.2.2", "--", "a space after --?); write --to"),
            ("-d 10.0.0.1 -j DNAT --to-destination 10.0.2.2:80", "--to-destination", "Need TCP, UDP, SCTP or DCCP"),
            ("-p all -j DNAT --to 10.0.2.2:80", "--to", "Need TCP, UDP, SCTP or DCCP with port specification"),
            ("-j REDIRECT --to-ports 3000", "--to-ports", "Need TCP, UDP"),
            ("--dport 80 -j REDIRECT --to-port 3000", "--dport", "needs -p tcp or -p udp"),
            ("-p tcp --dport 80 --frob 1 -j REDIRECT --to-port 3000", "--frob", "unknown option --frob"),
            ("-p tcp -x -j REDIRECT --to-port 3000", "-x", "unknown option -x"),
            ("-p tcp --dport -j REDIRECT --to-port 3000", "--dport", "--dport needs a value"),
            ("-p tcp --dport 80 -j DNAT --to-destination", "--to-destination", "needs a value"),
            ("-p tcp --dport 80 -j", "-j", "-j needs a value"),
            ("-i", "-i", "-i needs a value"),
            ("-p tcp -p udp --dport 80 -j REDIRECT --to-port 3000", "-p", "given twice"),
            ("-p tcp --to-destination 10.0.2.2 -j DNAT", "--to-destination", "goes after -j DNAT"),
            ("-p tcp --dport 80 -j dnat --to 10.0.2.2", "dnat", "upper case: -j DNAT"),
            ("-p tcp --dport 80 -j DNAT --to-ports 80", "--to-ports", "is for -j REDIRECT"),
            ("-p tcp --dport 80 -j REDIRECT --to 10.0.2.2", "--to", "is for -j DNAT"),
            ("-p tcp -o eth0 -j REDIRECT --to-port 3000", "-o", "Can't use -o with PREROUTING"),
            ("-p tcp -m tcp --dport 80 -m multiport --dports 1,2 -j REDIRECT --to-port 1", "--dport", "use either"),
            ("-m udp -p tcp --dport 80 -j REDIRECT --to-port 1", "udp", "-m udp needs -p udp"),
            ("-p tcp --dports 80,81 -j REDIRECT --to-port 1", "--dports", "needs -m multiport"),
            ("-p tcp --dport 80 --comment x -j REDIRECT --to-port 1", "--comment", "needs -m comment"),
            ("-p tcp --dport 0 -j REDIRECT --to-port 1", "0", "port 0"),
            ("-p tcp --dport 80 -j DNAT --to 10.0.2.2:99999", "10.0.2.2:99999", "out of range"),
            ("-s 10.0.0.300 -j DNAT --to 10.0.2.2", "10.0.0.300", "bad CIDR"),
            ("-p tcp -j", "-j", "needs a value"),
            ("-p tcp --dport 80", "-A", "no target: expected -j DNAT or -j REDIRECT"),
            ("-p tcp --dport 80 -j REDIRECT", "REDIRECT", "pfwd needs --to-ports PORT"),
            ("-p tcp --dport 80 -j DNAT", "DNAT", "DNAT needs --to-destination"),
            // Valid iptables that pfwd cannot represent.
            ("! -s 10.0.0.0/8 -p tcp --dport 80 -j REDIRECT --to-port 3000", "!", "negation (!) is not supported"),
            ("-s ! 10.0.0.0/8 -p tcp --dport 80 -j REDIRECT --to-port 3000", "!", "negation"),
            ("-p tcp ! --dport 80 -j REDIRECT --to-port 3000", "!", "negation"),
            ("-p icmp -j DNAT --to 10.0.2.2", "icmp", "pfwd forwards tcp and udp"),
            ("-p tcp --sport 1024 -j REDIRECT --to-port 3000", "--sport", "source ports are not supported"),
            ("-p tcp -m state --state NEW -j REDIRECT --to-port 3000", "state", "match -m state is not supported"),
            (
                "-p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15:16 -j REDIRECT --to-port 1",
                "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15:16",
                "too many ports",
            ),
            ("-p tcp --dport 80 -j REDIRECT --to-ports 8000-8010", "8000-8010", "port ranges in --to-ports"),
            ("-p tcp --dport 80 -j DNAT --to 10.0.0.1-10.0.0.5", "10.0.0.1-10.0.0.5", "address ranges"),
            ("-p tcp --dport 80 -j DNAT --to 10.0.2.2 --random", "--random", "exactly one destination"),
            ("-i eth+ -p tcp --dport 80 -j REDIRECT --to-port 1", "eth+", "wildcards"),
            ("-s 10.0.0.1,10.0.0.2 -j DNAT --to 10.0.2.2", "10.0.0.1,10.0.0.2", "address lists"),
            ("-p tcp -j ACCEPT", "ACCEPT", "exceptions"),
            ("-p tcp -j DOCKER", "DOCKER", "target DOCKER is not supported"),
            ("-p tcp --dport 80 -j DNAT --to 10.0.2.2 stray", "stray", "unexpected argument"),
            ("-p tcp --dport 80 -j DNAT --to 10.0.2.2 --to 10.0.2.3", "--to", "given twice"),
        ] {
            let text = format!("# comment\n{A} -p udp --dport 1 -j REDIRECT --to-ports 2\n{A} {body}\n");
            let e = err(&text);
            assert_eq!((e.line_no, e.token.as_str()), (3, token), "{body}: {e}");
            assert!(e.message.contains(message), "{body}: {e}");
            assert_eq!(e.line, format!("{A} {body}"));
        }
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

    // ---- the real tools ----

    /// A scratch network namespace, deleted on drop (also when the test panics).
    struct Netns(String);

    impl Netns {
        fn create() -> Option<Netns> {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("pfwd-ipt-test-{}-{n}", std::process::id());
            let ok = std::process::Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
            ok.then_some(Netns(name))
        }

        /// Runs `argv` inside the namespace; panics with its stderr unless it succeeds.
        fn run(&self, argv: &[&str], stdin: &str) -> String {
            use std::io::Write;
            use std::process::{Command, Stdio};
            let mut child = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.0))
                .args(argv)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "{argv:?} failed: {}\ninput:\n{stdin}", String::from_utf8_lossy(&out.stderr));
            stdout
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// The rules of pfwd's chains, chain by chain (iptables-save prints the tables in its own order).
    fn pfwd_lines(save: &str) -> Vec<&str> {
        let in_chain = |c: &PfwdChain| {
            let prefix = format!("-A {} ", c.name);
            save.lines().filter(move |l| l.starts_with(&prefix))
        };
        CHAINS.iter().flat_map(in_chain).collect()
    }

    #[test]
    fn real_tools_accept_the_exports() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for a scratch network namespace");
            return;
        }
        let Some(ns) = Netns::create() else {
            eprintln!("skipped: cannot create a network namespace");
            return;
        };
        let ifaces = vec!["eth0".to_string(), "wg0".to_string()];
        let rules = with_local();
        let export = export_iptables(&rules, Some(&ifaces));
        ns.run(&["iptables-restore", "--noflush", "--test"], &export);
        ns.run(&["iptables-restore", "--noflush"], &export);
        let save = ns.run(&["iptables-save"], "");
        let back = import(&save).unwrap_or_else(|e| panic!("{e}\n{save}"));
        assert_same_rules(&back.rules, &rules);
        assert!(back.warnings.is_empty(), "{:?}", back.warnings);
        // Our lines are exactly what iptables-save prints back (canonical form, comment placement).
        assert_eq!(pfwd_lines(&save), pfwd_lines(&export), "{save}");
        for hook in hook_rules(Some(&ifaces)) {
            let argv = hook.check_args();
            let argv: Vec<&str> = std::iter::once("iptables").chain(argv.iter().map(String::as_str)).collect();
            ns.run(&argv, "");
        }
        assert_eq!(save.matches("-A OUTPUT -j PFWD-OUTPUT\n").count(), 1, "{save}");
        assert_eq!(pfwd_lines(&save).iter().filter(|l| l.starts_with("-A PFWD-OUTPUT ")).count(), local_sample().len());
        // The classic OUTPUT commands, applied by iptables itself, read back as --local rules.
        for (argv, want) in [
            (
                "-t nat -A OUTPUT -p tcp --dport 1111 -j DNAT --to-destination 127.0.0.1:80",
                "dnat --local -p tcp --dport 1111 --to 127.0.0.1:80",
            ),
            (
                "-t nat -A OUTPUT -d 211.45.70.13 -j DNAT --to 192.168.255.151",
                "dnat --local -d 211.45.70.13 --to 192.168.255.151",
            ),
        ] {
            let argv: Vec<&str> = std::iter::once("iptables").chain(argv.split(' ')).collect();
            ns.run(&argv, "");
            let save = ns.run(&["iptables-save", "-t", "nat"], "");
            let back = import(&save).unwrap_or_else(|e| panic!("{e}\n{save}"));
            assert!(back.rules.iter().any(|r| r.same_match_and_target(&rule(want))), "{want}: {save}");
            let mut del = argv.clone();
            del[3] = "-D";
            ns.run(&del, "");
        }

        // Re-applying the chain script replaces pfwd's rules and leaves the jumps alone; random sets check the
        // canonical form over many shapes.
        let mut rng = Rng(42);
        for _ in 0..25 {
            let rules = random_rules(&mut rng, 10);
            let script = nat_chain_script(&rules);
            ns.run(&["iptables-restore", "--noflush"], &script);
            let save = ns.run(&["iptables-save"], "");
            assert_eq!(pfwd_lines(&save), pfwd_lines(&script), "{save}");
            assert_same_rules(&import(&save).unwrap().rules, &rules);
            assert_eq!(save.matches("-A PREROUTING -i eth0 -j PFWD-PREROUTING\n").count(), 1, "{save}");

            let nft = export_nft(&rules, if rules.len().is_multiple_of(2) { None } else { Some(&ifaces) });
            ns.run(&["nft", "-c", "-f", "-"], &nft);
        }

        // nft: check, then apply twice (the second run replaces the first).
        let nft = export_nft(&with_local(), Some(&ifaces));
        ns.run(&["nft", "-c", "-f", "-"], &nft);
        ns.run(&["nft", "-f", "-"], &nft);
        ns.run(&["nft", "-f", "-"], &nft);
        let listed = ns.run(&["nft", "list", "table", "ip", "pfwd"], "");
        assert_eq!(listed.matches("comment \"pfwd:").count(), with_local().len(), "{listed}");
        assert!(listed.contains("type nat hook postrouting priority srcnat; policy accept;"), "{listed}");
        assert!(listed.contains("type nat hook output priority -100; policy accept;"), "{listed}");
        assert!(listed.contains("tcp dport 8080 redirect to :80 comment \"pfwd:12\""), "{listed}");
        // Two "policy accept" and "accept comment" per NAT chain (prerouting, postrouting, output), and the forward
        // chain's policy.
        assert_eq!(export_nft(&[], Some(&[])).matches("accept").count(), 7);
        ns.run(&["nft", "-c", "-f", "-"], &export_nft(&[], Some(&[])));
    }
}
