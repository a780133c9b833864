//! The import's spec parser: the options of one nat PREROUTING, POSTROUTING or OUTPUT rule ([`parse_spec`]), and
//! [`build_rules`], which turns them into pfwd rules.
//!
//! `build_rules` runs iptables' own checks first (the `-j` target against the chain, matches, `-m multiport`, target
//! options), then maps the options to a rule's fields in one place ([`rule_fields`]), then checks the finished rule
//! (iptables' "a port needs a protocol", what pfwd's `--local` rules cannot express, and pfwd's own validation).

use ipnet::IpNet;

use super::lex::split_inline;
use super::{Bad, Res, bad};
use crate::iptables::chains::NatHook;
use crate::rules::draft::{cli_field, cli_spelling, spec};
use crate::rules::{Field, Kind, PortRange, Proto, Rule, RuleDraft, RuleError, Syntax, Target, parse_cidr};

/// An option as written and its value.
#[derive(Debug, Clone, Copy)]
pub(super) struct Opt<'a> {
    pub(super) name: &'a str,
    pub(super) value: &'a str,
}

/// The options of a nat PREROUTING, POSTROUTING or OUTPUT rule, unchecked.
#[derive(Debug, Default)]
pub(super) struct Spec<'a> {
    pub(super) iface: Option<Opt<'a>>,
    pub(super) oface: Option<Opt<'a>>,
    proto: Option<Opt<'a>>,
    src: Option<Opt<'a>>,
    dst: Option<Opt<'a>>,
    dport: Option<Opt<'a>>,
    dports: Option<Opt<'a>>,
    comment: Option<Opt<'a>>,
    matches: Vec<Opt<'a>>,
    pub(super) jump: Option<Opt<'a>>,
    to_dest: Option<Opt<'a>>,
    to_source: Option<Opt<'a>>,
    /// `--to`: iptables' abbreviation of `--to-destination` (DNAT) or `--to-source` (SNAT).
    to: Option<Opt<'a>>,
    to_ports: Option<Opt<'a>>,
    /// `! -s`, `! -d`, `! -i`, `! -o` (iptables' negation).
    not_src: bool,
    not_dst: bool,
    not_iface: bool,
    not_oface: bool,
    /// `-m addrtype --dst-type LOCAL`.
    dst_type: Option<Opt<'a>>,
    /// `-m statistic`: `--mode random --probability P` or `--mode nth --every N --packet K`.
    stat_mode: Option<Opt<'a>>,
    probability: Option<Opt<'a>>,
    every: Option<Opt<'a>>,
    packet: Option<Opt<'a>>,
}

/// The share of the connections reaching it that a `-m statistic` line takes: a line of a ladder that spreads
/// connections over several DNAT backends (the importer joins the ladder into one rule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Share(pub(super) f64);

/// The `-m statistic` share of a rule, if it has one. Only what a ladder of backends uses is accepted.
pub(super) fn statistic_share(toks: &[&str]) -> Res<Option<Share>> {
    share_of(&parse_spec(toks)?)
}

/// [`statistic_share`] of a parsed spec.
pub(super) fn share_of(s: &Spec) -> Res<Option<Share>> {
    if !has_match(s, "statistic") {
        if let Some(o) = s.stat_mode.or(s.probability).or(s.every).or(s.packet) {
            return Err(bad(o.name, "needs -m statistic before it"));
        }
        return Ok(None);
    }
    let Some(mode) = s.stat_mode else { return Err(bad("statistic", "-m statistic needs --mode random or nth")) };
    let num = |o: Option<Opt>, what: &str| -> Res<f64> {
        let o = o.ok_or_else(|| bad(mode.value, format!("--mode {} needs {what}", mode.value)))?;
        o.value.parse::<f64>().map_err(|_| bad(o.value, format!("bad {what} {:?}", o.value)))
    };
    let share = match mode.value {
        "random" => num(s.probability, "--probability")?,
        "nth" => {
            let (every, packet) = (num(s.every, "--every")?, s.packet.map_or(Ok(0.0), |p| num(Some(p), "--packet"))?);
            if every < 1.0 || packet >= every {
                return Err(bad(mode.value, "--every N --packet K needs K < N"));
            }
            // One packet (here: connection, as the rule sees only first packets) in N.
            1.0 / every
        }
        m => return Err(bad(m, "only --mode random and nth are supported")),
    };
    if !(share > 0.0 && share < 1.0) {
        return Err(bad(mode.value, "a share between 0 and 1 (exclusive)"));
    }
    if !matches!(s.jump.map(|j| j.value), Some("DNAT")) {
        return Err(bad("statistic", "-m statistic is supported in a ladder of -j DNAT lines (several backends) only"));
    }
    Ok(Some(Share(share)))
}

const UNDERSTOOD: &str = "pfwd reads [!] -i, [!] -o, -p, [!] -s, [!] -d, --dport, \
                          -m tcp|udp|comment|multiport, -m addrtype --dst-type LOCAL, -m statistic (ladders), \
                          -j DNAT --to-destination, -j REDIRECT --to-ports, -j SNAT --to-source and \
                          -j MASQUERADE --to-ports";

/// `jump`: the `-j` target seen so far (target options come after it).
fn unknown_option(tok: &str, jump: Option<&str>) -> Bad {
    let (name, _) = split_inline(tok);
    let message = match name {
        "--sport" | "--source-port" | "--sports" | "--source-ports" | "--ports" => {
            "source ports are not supported: pfwd matches destination ports (--dport, --dports)".to_string()
        }
        "--random" | "--random-fully" | "--persistent"
            if matches!(jump.and_then(Jump::from_name), Some(Jump::Snat | Jump::Masquerade)) =>
        {
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
pub(super) fn parse_spec<'a>(toks: &[&'a str]) -> Res<Spec<'a>> {
    let mut s = Spec::default();
    let mut i = 0;
    // A `!` seen: it negates the option right after it.
    let mut negate = false;
    while i < toks.len() {
        let tok = toks[i];
        if tok == "!" {
            if negate {
                return Err(bad(tok, "multiple ! flags not allowed"));
            }
            negate = true;
            i += 1;
            continue;
        }
        if tok.starts_with('!') {
            return Err(bad(tok, "a ! goes before the option it negates, as its own word (! -s NET)"));
        }
        if negate {
            negate = false;
            let flag = match split_inline(tok).0 {
                "-s" | "--source" | "--src" => &mut s.not_src,
                "-d" | "--destination" | "--dst" => &mut s.not_dst,
                "-i" | "--in-interface" => &mut s.not_iface,
                "-o" | "--out-interface" => &mut s.not_oface,
                _ => {
                    return Err(bad(tok, "negation (!) is supported on -s, -d, -i and -o only"));
                }
            };
            *flag = true;
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
            "--dst-type" => &mut s.dst_type,
            "--mode" => &mut s.stat_mode,
            "--probability" => &mut s.probability,
            "--every" => &mut s.every,
            "--packet" => &mut s.packet,
            "-m" | "--match" => {
                let value = take_value(toks, &mut i, tok, inline)?;
                // Now rather than later: the match's own options would otherwise be reported as unknown.
                if !matches!(value, "tcp" | "udp" | "comment" | "multiport" | "addrtype" | "statistic") {
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
    if negate {
        return Err(bad("!", "a ! at the end negates nothing (it goes before -s, -d, -i or -o)"));
    }
    Ok(s)
}

fn take_value<'a>(toks: &[&'a str], i: &mut usize, tok: &str, inline: Option<&'a str>) -> Res<&'a str> {
    let value = match inline {
        Some(v) => Some(v),
        None => {
            // An interface name may start with '-' (`-i -x`: iptables takes the next word, and iptables-save prints
            // it so); for other options such a word is the next option, the value missing.
            let iface = matches!(split_inline(tok).0, "-i" | "--in-interface" | "-o" | "--out-interface");
            let v = toks.get(*i).copied().filter(|v| iface || !v.starts_with('-'));
            if v.is_some() {
                *i += 1;
            }
            v
        }
    };
    match value {
        Some(v) if v.starts_with('!') => {
            Err(bad(v, "a ! goes before the option it negates, as its own word (! -s NET), not after it"))
        }
        Some(v) if !v.is_empty() || tok == "--comment" => Ok(v),
        _ => Err(bad(tok, format!("{} needs a value", split_inline(tok).0))),
    }
}

const NEED_PROTO: &str = "iptables: Need TCP, UDP, SCTP or DCCP with port specification";

/// A `-s`/`-d` value; `/0` is the same as no match.
fn net_opt(o: Option<Opt>) -> Res<Option<IpNet>> {
    let Some(o) = o else { return Ok(None) };
    if o.value.contains(',') {
        return Err(bad(o.value, "address lists are not supported; write one rule per address"));
    }
    let net = parse_cidr(o.value).map_err(|e| bad(o.value, e.to_string()))?;
    Ok(Some(net).filter(|n| n.prefix_len() > 0))
}

/// A `-j` target pfwd converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Jump {
    Dnat,
    Redirect,
    Snat,
    Masquerade,
}

impl Jump {
    const ALL: [Jump; 4] = [Jump::Dnat, Jump::Redirect, Jump::Snat, Jump::Masquerade];

    /// The name after `-j`, as iptables spells it.
    fn name(self) -> &'static str {
        match self {
            Jump::Dnat => "DNAT",
            Jump::Redirect => "REDIRECT",
            Jump::Snat => "SNAT",
            Jump::Masquerade => "MASQUERADE",
        }
    }

    /// The pfwd rule kind this target becomes.
    fn kind(self) -> Kind {
        match self {
            Jump::Dnat => Kind::Dnat,
            Jump::Redirect => Kind::Redirect,
            Jump::Snat => Kind::Snat,
            Jump::Masquerade => Kind::Masquerade,
        }
    }

    /// `-j NAME`, spelled exactly: iptables' target names are case-sensitive.
    pub(super) fn from_name(name: &str) -> Option<Jump> {
        Jump::ALL.into_iter().find(|j| j.name() == name)
    }

    /// The nat chains iptables takes the target in: DNAT and REDIRECT before routing, SNAT and MASQUERADE after.
    fn chains(self) -> &'static str {
        match self {
            Jump::Dnat | Jump::Redirect => "PREROUTING and OUTPUT",
            Jump::Snat | Jump::Masquerade => "POSTROUTING",
        }
    }

    /// Whether iptables takes the target in the hook's chains.
    fn works_in(self, hook: NatHook) -> bool {
        match self {
            Jump::Dnat | Jump::Redirect => hook != NatHook::Postrouting,
            Jump::Snat | Jump::Masquerade => hook == NatHook::Postrouting,
        }
    }
}

/// Turns a parsed nat rule into pfwd rules: one, or one per port of `-m multiport --dports`. `hook`: the built-in
/// chain the rule is in (or that jumps to pfwd's chain holding it).
pub(super) fn build_rules(s: &Spec, command_tok: &str, hook: NatHook) -> Res<Vec<Rule>> {
    // iptables' own rules: the target against the chain, matches, -m multiport, each target's options.
    let jump = nat_jump(s, command_tok, hook)?;
    let proto = protocol(s)?;
    check_matches(s, proto)?;
    let dports = dest_ports(s, proto)?;
    check_target_options(s, jump, proto)?;
    // The options as a rule, checked; then one rule per destination port, each validated as pfwd validates any rule.
    let mut rule = rule_fields(s, jump, hook)?;
    check_rule(s, &rule, jump, hook)?;
    let mut rules = Vec::with_capacity(dports.len());
    for (k, &dport) in dports.iter().enumerate() {
        // A copy for each port but the last, which takes the rule itself (the usual single port: no copy).
        let placeholder = Rule::new(rule.target);
        let base = if k + 1 < dports.len() { rule.clone() } else { std::mem::replace(&mut rule, placeholder) };
        let mut rule = Rule { dport, ..base };
        rule.normalize();
        rule.validate().map_err(|e| bad(command_tok, e.to_string()))?;
        rules.push(rule);
    }
    Ok(rules)
}

/// The `-j` target, when iptables takes it in the hook's chains and pfwd converts it.
fn nat_jump(s: &Spec, command_tok: &str, hook: NatHook) -> Res<Jump> {
    let expected = if hook == NatHook::Postrouting { "-j SNAT or -j MASQUERADE" } else { "-j DNAT or -j REDIRECT" };
    let v = s.jump.ok_or_else(|| bad(command_tok, format!("no target: expected {expected}")))?.value;
    match Jump::from_name(v) {
        Some(jump) if jump.works_in(hook) => Ok(jump),
        Some(jump) => Err(bad(
            v,
            format!(
                "{v} only works in nat {} (iptables: RULE_APPEND failed (Invalid argument): rule in chain {})",
                jump.chains(),
                hook.builtin()
            ),
        )),
        None if Jump::ALL.iter().any(|j| v.eq_ignore_ascii_case(j.name())) => {
            Err(bad(v, format!("target names are upper case: -j {}", v.to_ascii_uppercase())))
        }
        None if matches!(v, "ACCEPT" | "RETURN") => {
            Err(bad(v, "exceptions (-j ACCEPT/RETURN in nat) are not supported: every pfwd rule translates"))
        }
        None => Err(bad(
            v,
            format!(
                "target {v} is not supported: pfwd converts -j DNAT and -j REDIRECT (PREROUTING, OUTPUT), -j SNAT \
                 and -j MASQUERADE (POSTROUTING)"
            ),
        )),
    }
}

/// `-p`; `all` (or `0`) is the same as no match.
fn protocol(s: &Spec) -> Res<Option<Proto>> {
    match s.proto {
        None => Ok(None),
        Some(o) if o.value.eq_ignore_ascii_case("all") || o.value == "0" => Ok(None),
        Some(o) => o.value.parse::<Proto>().map(Some).map_err(|_| {
            bad(o.value, "protocol not supported: pfwd forwards tcp and udp (omit -p to match every protocol)")
        }),
    }
}

fn has_match(s: &Spec, name: &str) -> bool {
    s.matches.iter().any(|o| o.value == name)
}

/// iptables' rules for matches: `-m tcp` and `-m udp` need that protocol, `--comment` needs `-m comment`.
fn check_matches(s: &Spec, proto: Option<Proto>) -> Res<()> {
    let proto_name = proto.map(|p| match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    });
    for m in &s.matches {
        match m.value {
            "tcp" | "udp" if proto_name != Some(m.value) => {
                return Err(bad(m.value, format!("-m {0} needs -p {0}", m.value)));
            }
            _ => {}
        }
    }
    if let Some(c) = s.comment.filter(|_| !has_match(s, "comment")) {
        return Err(bad(c.name, "needs -m comment before it (iptables: unknown option \"--comment\")"));
    }
    Ok(())
}

/// The destination ports, one pfwd rule each: none, `--dport`'s, or each of `-m multiport --dports`.
fn dest_ports(s: &Spec, proto: Option<Proto>) -> Res<Vec<Option<PortRange>>> {
    let range = |d: Opt, part: &str| part.parse().map_err(|e: RuleError| bad(d.value, e.to_string()));
    let mut dports: Vec<Option<PortRange>> = vec![None];
    if let Some(d) = s.dport {
        if proto.is_none() {
            return Err(bad(d.name, format!("needs -p tcp or -p udp (iptables: unknown option \"{}\")", d.name)));
        }
        dports = vec![Some(range(d, d.value)?)];
    }
    if let Some(d) = s.dports {
        if !has_match(s, "multiport") {
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
        dports = parts.iter().map(|p| range(d, p).map(Some)).collect::<Res<_>>()?;
    }
    if s.proto.is_none() && has_match(s, "multiport") {
        return Err(bad("multiport", "multiport needs -p tcp or -p udp"));
    }
    Ok(dports)
}

/// The option holding a DNAT or SNAT address: the full name, or `--to`, which abbreviates it.
fn to_addr<'a>(s: &Spec<'a>, jump: Jump) -> Option<Opt<'a>> {
    match jump {
        Jump::Dnat => s.to_dest.or(s.to),
        Jump::Snat => s.to_source.or(s.to),
        Jump::Redirect | Jump::Masquerade => None,
    }
}

/// iptables' rules for target options: each target takes its own, and `--to` may not come with the option it
/// abbreviates.
fn check_target_options(s: &Spec, jump: Jump, proto: Option<Proto>) -> Res<()> {
    let full = match jump {
        Jump::Dnat => s.to_dest,
        Jump::Snat => s.to_source,
        Jump::Redirect | Jump::Masquerade => None,
    };
    if let (Some(to), Some(_)) = (s.to, full) {
        let kind = jump.name();
        return Err(bad(to.name, format!("given twice (iptables: {kind}: option \"--to\" can only be used once)")));
    }
    // Options of the other targets, named with what this one takes instead.
    let (takes, foreign) = match jump {
        Jump::Dnat => (
            "DNAT takes --to-destination ADDR[:PORT]",
            vec![(s.to_source, "-j SNAT"), (s.to_ports, "-j REDIRECT and -j MASQUERADE")],
        ),
        Jump::Snat => (
            "SNAT takes --to-source ADDR[:LO-HI]",
            vec![(s.to_dest, "-j DNAT"), (s.to_ports, "-j REDIRECT and -j MASQUERADE")],
        ),
        Jump::Redirect => (
            "REDIRECT takes --to-ports PORT",
            vec![(s.to_dest, "-j DNAT"), (s.to_source, "-j SNAT"), (s.to, "-j DNAT and -j SNAT")],
        ),
        Jump::Masquerade => (
            "MASQUERADE takes --to-ports LO-HI and uses the outgoing interface's address",
            vec![(s.to_dest, "-j DNAT"), (s.to_source, "-j SNAT"), (s.to, "-j DNAT and -j SNAT")],
        ),
    };
    if let Some((o, targets)) = foreign.into_iter().find_map(|(o, t)| o.map(|o| (o, t))) {
        return Err(bad(o.name, format!("is for {targets}; {takes}")));
    }
    if let Some(to) = s.to_ports.filter(|_| jump == Jump::Masquerade) {
        if to.value.contains(':') {
            return Err(bad(to.value, "iptables: Invalid port:port syntax - use dash"));
        }
        if proto.is_none() {
            return Err(bad(to.name, format!("needs -p tcp or -p udp ({NEED_PROTO})")));
        }
    }
    Ok(())
}

/// The one place iptables options become a rule's fields: they are written into the same [`RuleDraft`] as the CLI's
/// and the config file's, which parses them. Every field but the destination port, which `-m multiport` may
/// multiply (see [`dest_ports`]). The iptables-specific forms (`-p 0`, `/0`, address lists, REDIRECT without a
/// port) are handled here first, with iptables' words.
fn rule_fields(s: &Spec, jump: Jump, hook: NatHook) -> Res<Rule> {
    let mut draft = RuleDraft::new(jump.kind(), Syntax::Cli);
    let mut given: Vec<(Field, Opt)> = Vec::new();
    given.extend(s.iface.map(|o| (Field::Iface, o)));
    // -o in OUTPUT is valid iptables that pfwd cannot express: `check_rule` says so, in those words.
    given.extend(s.oface.filter(|_| hook != NatHook::Output).map(|o| (Field::Oface, o)));
    if let (Some(o), Some(p)) = (s.proto, protocol(s)?) {
        let value = match p {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        given.push((Field::Proto, Opt { name: o.name, value }));
    }
    // `/0` matches everything, like no -s/-d at all (negated, nothing: refused).
    for (o, not, field) in [(s.src, s.not_src, Field::Src), (s.dst, s.not_dst, Field::Dst)] {
        match (net_opt(o)?, o) {
            (Some(_), Some(o)) => given.push((field, o)),
            (None, Some(o)) if not => return Err(bad(o.value, "! with 0.0.0.0/0 matches nothing")),
            _ => {}
        }
    }
    if let Some(t) = s.dst_type {
        if !has_match(s, "addrtype") {
            return Err(bad(t.name, "needs -m addrtype before it"));
        }
        if t.value != "LOCAL" {
            return Err(bad(t.value, "only --dst-type LOCAL is supported (-d local)"));
        }
        given.push((Field::DstType, Opt { name: "--dst-type", value: crate::rules::draft::DST_LOCAL }));
    } else if has_match(s, "addrtype") {
        return Err(bad("addrtype", "-m addrtype without --dst-type LOCAL is not supported"));
    }
    let j = jump.name();
    match jump {
        Jump::Dnat => {
            let to = to_addr(s, jump).ok_or_else(|| bad(j, "DNAT needs --to-destination ADDR[:PORT]"))?;
            // iptables takes one address or range (A-B: the rule's backends); pfwd's lists and weights are its own.
            if to.value.contains([',', '@']) {
                return Err(bad(to.value, "not iptables: --to-destination takes ADDR[-ADDR][:PORT]"));
            }
            given.push((Field::To, to));
        }
        Jump::Snat => {
            let to = to_addr(s, jump).ok_or_else(|| bad(j, "SNAT needs --to-source ADDR[:LO-HI]"))?;
            given.push((Field::To, to));
        }
        Jump::Redirect => {
            let to = s.to_ports.ok_or_else(|| {
                bad(j, "REDIRECT without --to-ports keeps the original port; pfwd needs --to-ports PORT")
            })?;
            if to.value.contains(['-', ':']) {
                return Err(bad(to.value, "port ranges in --to-ports are not supported: pfwd redirects to one port"));
            }
            given.push((Field::ToPort, to));
        }
        Jump::Masquerade => given.extend(s.to_ports.map(|o| (Field::ToPorts, o))),
    }
    // pfwd translates OUTPUT's connections, made by local processes, in its --local rules.
    if hook == NatHook::Output {
        draft.set(Field::Local, "--local", "").map_err(|e| bad(j, e.to_string()))?;
    }
    for &(field, o) in &given {
        // iptables accepts unambiguous abbreviations pfwd's table does not list: name those by the field.
        let written = cli_spelling(split_inline(o.name).0).unwrap_or(spec(field).cli[0]);
        let negated = match field {
            Field::Src => s.not_src,
            Field::Dst => s.not_dst,
            Field::Iface => s.not_iface,
            Field::Oface => s.not_oface,
            _ => false,
        };
        let value = if negated { format!("!{}", o.value) } else { o.value.to_string() };
        draft.set(field, written, &value).map_err(|e| bad(o.name, e.to_string()))?;
    }
    draft.parse().map_err(|e| {
        // A bad value is named by the value, anything else by the option (or the command).
        let field = e.option.and_then(|w| cli_field(w, jump.kind()));
        let opt = given.iter().find(|(f, _)| Some(*f) == field);
        let token = match (&e.error, opt) {
            (
                RuleError::BadCidr { .. }
                | RuleError::BadPort { .. }
                | RuleError::BadPortRange { .. }
                | RuleError::BadProto { .. }
                | RuleError::BadIface { .. }
                | RuleError::BadTo { .. },
                Some((_, o)),
            ) => o.value,
            (_, Some((_, o))) => o.name,
            (_, None) => j,
        };
        bad(token, e.error.to_string())
    })
}

/// Checks on the rule built from the spec: iptables' "a port needs a protocol", then valid iptables (checked last,
/// so iptables' own errors come first) that pfwd's --local rules cannot express: they translate in the socket hooks
/// (connect, sendmsg), before routing picks the outgoing interface and the source.
fn check_rule(s: &Spec, rule: &Rule, jump: Jump, hook: NatHook) -> Res<()> {
    if rule.proto.is_none() {
        let port_opt = match rule.target {
            Target::Dnat { port: Some(_), .. } | Target::Snat { ports: Some(_), .. } => {
                to_addr(s, jump).map(|o| (o, "a port needs -p tcp or -p udp"))
            }
            Target::Redirect { .. } => s.to_ports.map(|o| (o, "needs -p tcp or -p udp")),
            // MASQUERADE's ports are checked with its other options, before they are read.
            Target::Dnat { port: None, .. } | Target::Snat { ports: None, .. } | Target::Masquerade { .. } => None,
        };
        if let Some((o, message)) = port_opt {
            return Err(bad(o.name, format!("{message} ({NEED_PROTO})")));
        }
    }
    let local = hook == NatHook::Output;
    if let Some(o) = s.oface.filter(|_| local) {
        return Err(bad(
            o.name,
            "valid iptables, but pfwd does not support -o in OUTPUT: local connections are translated when they are \
             made, before routing picks the outgoing interface",
        ));
    }
    if let Some(o) = s.src.filter(|_| local && rule.src.is_some()) {
        return Err(bad(
            o.name,
            "valid iptables, but pfwd does not support -s in OUTPUT: local connections are translated when they are \
             made, and the source address is chosen after that (by routing, for the new destination)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::iptables::tests::{err, ok, rule};

    /// Found by the `import` fuzz target (through the export round trip): iptables takes `-i -x` (Linux allows an
    /// interface called `-x`) and iptables-save prints it so; the import said "-i needs a value".
    #[test]
    fn interface_names_starting_with_a_dash() {
        let got = ok("-A PREROUTING -i -x -p tcp -j DNAT --to 1.2.3.4\n-A POSTROUTING -o - -j MASQUERADE\n");
        assert_eq!(got.rules, [rule("dnat -i=-x -p tcp --to 1.2.3.4"), rule("masquerade -4 -o=-")]);
        assert!(err("-A PREROUTING -p tcp --dport -j REDIRECT --to-port 1").message.contains("--dport needs a value"));
    }

    /// iptables' address range in `--to-destination` is a rule with a backend per address.
    #[test]
    fn address_range_is_backends() {
        let got = ok("-A PREROUTING -p tcp --dport 80 -j DNAT --to-destination 10.0.0.1-10.0.0.3:8080\n\
                      -A PREROUTING -d 203.0.113.1/32 -j DNAT --to-destination 10.0.1.1-10.0.1.2\n");
        assert_eq!(
            got.rules,
            [
                rule("dnat -p tcp --dport 80 --to 10.0.0.1:8080,10.0.0.2:8080,10.0.0.3:8080"),
                rule("dnat -d 203.0.113.1 --to 10.0.1.1,10.0.1.2"),
            ]
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
            ("-s ! 10.0.0.0/8 -p tcp --dport 80 -j REDIRECT --to-port 3000", "!", "goes before the option"),
            ("-p tcp ! --dport 80 -j REDIRECT --to-port 3000", "--dport", "negation (!) is supported on -s, -d, -i"),
            ("! ! -s 10.0.0.0/8 -j DNAT --to 10.0.2.2", "!", "multiple ! flags"),
            ("! -s 0.0.0.0/0 -j DNAT --to 10.0.2.2", "0.0.0.0/0", "matches nothing"),
            ("-m addrtype --src-type LOCAL -j DNAT --to 10.0.2.2", "--src-type", "unknown option"),
            ("-m addrtype --dst-type UNICAST -j DNAT --to 10.0.2.2", "UNICAST", "only --dst-type LOCAL"),
            ("--dst-type LOCAL -j DNAT --to 10.0.2.2", "--dst-type", "needs -m addrtype"),
            ("-p icmp -j DNAT --to 10.0.2.2", "icmp", "pfwd forwards tcp and udp"),
            ("-p tcp --sport 1024 -j REDIRECT --to-port 3000", "--sport", "source ports are not supported"),
            ("-p tcp -m state --state NEW -j REDIRECT --to-port 3000", "state", "match -m state is not supported"),
            (
                "-p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15:16 -j REDIRECT --to-port 1",
                "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15:16",
                "too many ports",
            ),
            ("-p tcp --dport 80 -j REDIRECT --to-ports 8000-8010", "8000-8010", "port ranges in --to-ports"),
            ("-p tcp --dport 80 -j DNAT --to 10.0.0.1,10.0.0.5", "10.0.0.1,10.0.0.5", "not iptables"),
            ("-p tcp --dport 80 -j DNAT --to 10.0.0.1@2", "10.0.0.1@2", "not iptables"),
            ("-p tcp --dport 80 -j DNAT --to 10.0.0.5-10.0.0.1", "10.0.0.5-10.0.0.1", "first address is above"),
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
    }

    #[test]
    fn import_postrouting_rejections() {
        const A: &str = "iptables -t nat -A POSTROUTING";
        for (body, token, message) in [
            ("-i eth0 -j MASQUERADE", "-i", "iptables: Can't use -i with POSTROUTING"),
            ("--in-interface eth0 -j MASQUERADE", "--in-interface", "Can't use -i with POSTROUTING"),
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

    #[test]
    fn negation_and_addrtype_local_import() {
        // Docker's own rules: masquerade what leaves any interface but its bridge, DNAT what arrives on the others
        // for any local address.
        let i = ok("iptables -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n\
                    iptables -t nat -A PREROUTING ! -i docker0 -p tcp -m tcp --dport 8080 -m addrtype --dst-type LOCAL \
                    -j DNAT --to-destination 172.17.0.2:80\n\
                    iptables -t nat -A PREROUTING ! -s 10.0.0.0/8 ! -d 192.0.2.1 -p udp --dport 53 -j REDIRECT --to-ports 5353\n");
        let mut texts: Vec<String> = i.rules.iter().map(ToString::to_string).collect();
        texts.sort();
        assert_eq!(
            texts,
            [
                "dnat ! -i docker0 -p tcp -d local --dport 8080 --to 172.17.0.2:80",
                "masquerade ! -o docker0 -s 172.17.0.0/16",
                "redirect -p udp ! -s 10.0.0.0/8 ! -d 192.0.2.1 --dport 53 --to-port 5353",
            ]
        );
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
}
