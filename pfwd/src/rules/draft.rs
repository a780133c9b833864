//! The one rule grammar. Every way of writing a rule (the CLI's `pfwd add`, a TOML `[[rule]]` table, an iptables
//! `-A PREROUTING ...` line) produces a [`RuleDraft`]: the rule kind plus the options in the order they were given,
//! each with its value as text and its spelling as written. [`RuleDraft::into_rule`] is the single place that checks
//! which options a kind takes, parses the values and validates the whole rule, so all front ends accept and reject
//! the same rules with the same messages (naming the option as the user wrote it).
//!
//! [`FIELDS`] lists every option once with its spellings in each syntax: a new option is one entry here, its parsing in
//! `into_rule`, and its field in [`Rule`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::RuleError;
use super::model::{Family, PortRange, Rule, Target, wrong_hook};
use super::value::{parse_cidr, parse_dnat_to, parse_port, parse_proto_opt, parse_snat_to, validate_iface};

/// What a rule does: the iptables target it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dnat,
    Redirect,
    Snat,
    Masquerade,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Dnat, Kind::Redirect, Kind::Snat, Kind::Masquerade];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Dnat => "dnat",
            Kind::Redirect => "redirect",
            Kind::Snat => "snat",
            Kind::Masquerade => "masquerade",
        }
    }

    /// SNAT and MASQUERADE act where packets leave (POSTROUTING), DNAT and REDIRECT where they arrive (PREROUTING).
    pub fn is_postrouting(self) -> bool {
        matches!(self, Kind::Snat | Kind::Masquerade)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = RuleError;
    /// `dnat` or iptables' `DNAT` (any case).
    fn from_str(s: &str) -> Result<Self, RuleError> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| RuleError::BadKind { input: s.to_string() })
    }
}

/// Which syntax a draft was written in; decides how options are named in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// `pfwd add` arguments (and iptables lines, whose option names pfwd's CLI accepts too).
    Cli,
    /// A `[[rule]]` table of a config file.
    Toml,
}

/// One option of the rule grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    Local,
    Iface,
    Oface,
    Proto,
    Src,
    Dst,
    Dport,
    /// `--dst-type local`: the destination is one of this host's addresses (also `-d local`).
    DstType,
    /// DNAT's new destination, SNAT's new source.
    To,
    /// REDIRECT's port.
    ToPort,
    /// MASQUERADE's source port range.
    ToPorts,
    /// DNAT's inside network for hairpin NAT.
    Hairpin,
    /// `-4` / `-6`: the one family a rule without addresses applies to.
    Family,
}

/// How one [`Field`] is written and which kinds take it.
#[derive(Debug)]
pub struct FieldSpec {
    pub field: Field,
    /// CLI (and iptables) spellings, the documented one first.
    pub cli: &'static [&'static str],
    /// The TOML key.
    pub toml: &'static str,
    /// Value placeholder for `--help` and messages; `None` for a flag.
    pub value: Option<&'static str>,
    /// Whether the TOML value is a string (quoted in messages) rather than a number or boolean.
    pub toml_string: bool,
    pub kinds: &'static [Kind],
    /// `--help` text.
    pub help: &'static str,
}

const PRE: &[Kind] = &[Kind::Dnat, Kind::Redirect];
const POST: &[Kind] = &[Kind::Snat, Kind::Masquerade];
const ALL: &[Kind] = &Kind::ALL;

/// Every option of the grammar, in the order `--help` shows them.
pub const FIELDS: &[FieldSpec] = &[
    FieldSpec {
        field: Field::Local,
        cli: &["--local"],
        toml: "local",
        value: None,
        toml_string: false,
        kinds: PRE,
        help: "Apply to connections made by local processes (the iptables OUTPUT chain) instead of arriving \
               packets. eBPF mode translates TCP and UDP at connect/send time with cgroup socket hooks (applications \
               still see the address they asked for); ICMP and raw sockets are not covered there (use --mode \
               iptables for those). Not with -i or -s.",
    },
    FieldSpec {
        field: Field::Iface,
        cli: &["-i", "--in-interface"],
        toml: "iface",
        value: Some("IFACE"),
        toml_string: true,
        kinds: PRE,
        help: "Only packets arriving on this (attached) interface; `! -i IFACE` (or `-i !IFACE`): on any attached \
               interface but this one.",
    },
    FieldSpec {
        field: Field::Oface,
        cli: &["-o", "--out-interface"],
        toml: "oface",
        value: Some("IFACE"),
        toml_string: true,
        kinds: POST,
        help: "Only packets leaving through this (attached) interface; `! -o IFACE` (or `-o !IFACE`): through any \
               attached interface but this one.",
    },
    FieldSpec {
        field: Field::Proto,
        cli: &["-p", "--protocol"],
        toml: "proto",
        value: Some("tcp|udp|all"),
        toml_string: true,
        kinds: ALL,
        help: "Only this protocol (needed with ports). Omit it, or say all, to match every protocol.",
    },
    FieldSpec {
        field: Field::Src,
        cli: &["-s", "--source", "--src"],
        toml: "src",
        value: Some("ADDR[/LEN]"),
        toml_string: true,
        kinds: ALL,
        help: "Only from this source address or CIDR; `! -s CIDR` (or `-s !CIDR`): from anywhere else.",
    },
    FieldSpec {
        field: Field::Dst,
        cli: &["-d", "--destination", "--dst"],
        toml: "dst",
        value: Some("ADDR[/LEN]|local"),
        toml_string: true,
        kinds: ALL,
        help: "Only to this destination address or CIDR; `! -d CIDR`: to anywhere else. `-d local`: to any \
               address of this host (iptables' -m addrtype --dst-type LOCAL; see --dst-type).",
    },
    FieldSpec {
        field: Field::DstType,
        cli: &["--dst-type"],
        toml: "dst_type",
        value: Some("local"),
        toml_string: true,
        kinds: ALL,
        help: "Only to an address of this host (iptables' -m addrtype --dst-type LOCAL); `-d local` says the same. \
               With -d NETWORK too, both must hold (Docker's `! -d 127.0.0.0/8 --dst-type local`).",
    },
    FieldSpec {
        field: Field::Dport,
        cli: &["--dport", "--destination-port"],
        toml: "dport",
        value: Some("PORT[-PORT]"),
        toml_string: false,
        kinds: ALL,
        help: "Only to this destination port or range (PORT, LO-HI or LO:HI; needs -p). For snat and masquerade, \
               the destination port of the packet as it leaves (after any dnat).",
    },
    FieldSpec {
        field: Field::To,
        cli: &["--to", "--to-destination", "--to-source"],
        toml: "to",
        value: Some("ADDR[:PORT][@W][,...]"),
        toml_string: true,
        kinds: &[Kind::Dnat, Kind::Snat],
        help: "dnat: the new destination, ADDR (keeps the port) or ADDR:PORT (needs -p); or several backends, \
               comma-separated, each ADDR[:PORT] with an optional @WEIGHT (default 1), ADDR also an address range \
               A.B.C.D-A.B.C.E: a new connection goes to one of them by consistent hashing of its addresses and \
               ports (Maglev; adding or removing a backend moves only about its share), and stays there. snat: the \
               new source, ADDR, or ADDR:LO-HI to take source ports from when the original one is taken (needs -p).",
    },
    FieldSpec {
        field: Field::ToPort,
        cli: &["--to-port", "--to-ports"],
        toml: "to_port",
        value: Some("PORT"),
        toml_string: false,
        kinds: &[Kind::Redirect],
        help: "The new destination port.",
    },
    FieldSpec {
        field: Field::ToPorts,
        cli: &["--to-ports", "--to-port"],
        toml: "to_ports",
        value: Some("LO-HI"),
        toml_string: true,
        kinds: &[Kind::Masquerade],
        help: "Source ports to use when the original one is taken: LO-HI, or one PORT (needs -p).",
    },
    FieldSpec {
        field: Field::Hairpin,
        cli: &["--hairpin"],
        toml: "hairpin",
        value: Some("CIDR"),
        toml_string: true,
        kinds: &[Kind::Dnat],
        help: "Hairpin NAT (NAT loopback) for hosts of this inside network: they may connect to the public address \
               (-d, required) too, and reach the --to address with replies from the address they used. Their \
               connections are source-NATed to the router's address on the interface toward --to (the rule adds a \
               `masquerade -p PROTO -s CIDR -d TO` with its id, shown by `pfwd export`), so the backend sees the \
               router, not the inside host. That masquerade also applies to other connections from CIDR to the --to \
               address that the router forwards (none when CIDR is the backend's own subnet: those do not cross the \
               router). Not with -i (the rule must also match where inside hosts arrive) or --local; -s, if given, \
               must contain CIDR.",
    },
    FieldSpec {
        field: Field::Family,
        cli: &["-4", "-6", "--ipv4", "--ipv6"],
        toml: "family",
        value: None,
        toml_string: true,
        kinds: ALL,
        help: "IPv4 only. A rule's family follows its addresses; a rule without any (redirect -p tcp --dport 80 \
               --to-port 3000, masquerade -o eth1) applies to IPv4 and IPv6 alike unless -4 or -6 restricts it. \
               In a config file: family = \"ipv4\" or \"ipv6\".",
    },
];

/// `-6`'s `--help` (`-4` shares [`FIELDS`]' entry and its text).
pub const IPV6_HELP: &str = "IPv6 only (see -4). IPv6 addresses are written as ip6tables writes them: -d 2001:db8::/32, \
                             --to 2001:db8::2, and with a port --to [2001:db8::2]:8080.";

/// The fields iptables' `!` may negate.
pub const NEGATABLE: [Field; 5] = [Field::Src, Field::Dst, Field::Iface, Field::Oface, Field::DstType];

/// `-d local`: this host's addresses (iptables' `-m addrtype --dst-type LOCAL`).
pub const DST_LOCAL: &str = "local";

/// `-4`/`-6` (a flag: the spelling says which) or the config file's `family = "ipv4"`.
fn parse_family(written: &str, value: &str) -> Result<Family, RuleError> {
    match (written, value.to_ascii_lowercase().as_str()) {
        ("-4" | "--ipv4", "") | (_, "ipv4" | "4") => Ok(Family::Ipv4),
        ("-6" | "--ipv6", "") | (_, "ipv6" | "6") => Ok(Family::Ipv6),
        _ => Err(RuleError::Invalid(format!("bad family {value:?}: expected \"ipv4\" or \"ipv6\""))),
    }
}

/// Splits iptables' negation off a value: `!10.0.0.0/8` (or `! 10.0.0.0/8`) is (true, `10.0.0.0/8`).
fn negation(value: &str) -> (bool, &str) {
    match value.strip_prefix('!') {
        Some(rest) => (true, rest.trim_start()),
        None => (false, value),
    }
}

/// iptables spellings that belong to one kind only.
pub const KIND_SPELLINGS: &[(&str, Kind)] = &[("--to-destination", Kind::Dnat), ("--to-source", Kind::Snat)];

pub fn spec(field: Field) -> &'static FieldSpec {
    FIELDS.iter().find(|s| s.field == field).expect("every field has a spec")
}

/// The field a CLI spelling stands for in a rule of `kind` (`--to-ports` is redirect's port and masquerade's
/// range); `None` for a spelling the grammar does not know.
pub fn cli_field(spelling: &str, kind: Kind) -> Option<Field> {
    let mut found = FIELDS.iter().filter(|s| s.cli.contains(&spelling));
    let first = found.next()?;
    Some(std::iter::once(first).chain(found).find(|s| s.kinds.contains(&kind)).unwrap_or(first).field)
}

/// The static copy of a CLI spelling (drafts keep `&'static str` so errors can carry them).
pub fn cli_spelling(spelling: &str) -> Option<&'static str> {
    FIELDS.iter().flat_map(|s| s.cli.iter().copied()).find(|&s| s == spelling)
}

/// An error and the option (as written) it is about, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftError {
    pub option: Option<&'static str>,
    pub error: RuleError,
}

impl From<RuleError> for DraftError {
    fn from(error: RuleError) -> Self {
        DraftError { option: None, error }
    }
}

impl fmt::Display for DraftError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for DraftError {}

/// A rule as written, not yet checked: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleDraft {
    pub kind: Kind,
    pub syntax: Syntax,
    /// An explicit id (config files may fix ids); `None` lets pfwd assign one.
    pub id: Option<u32>,
    /// `(field, spelling as written, value)` in the order given; flags have an empty value.
    options: Vec<(Field, &'static str, String)>,
}

impl RuleDraft {
    pub fn new(kind: Kind, syntax: Syntax) -> Self {
        RuleDraft { kind, syntax, id: None, options: Vec::new() }
    }

    /// Adds an option. A field given twice is an error naming the second spelling. A value starting with `!`
    /// (iptables' negation, `! -s NET` on the CLI, `src = "!NET"` in TOML) is taken for -s, -d, -i and -o only.
    pub fn set(&mut self, field: Field, written: &'static str, value: &str) -> Result<(), DraftError> {
        let at = |error| DraftError { option: Some(written), error };
        if let Some((_, first, _)) = self.options.iter().find(|(f, _, _)| *f == field) {
            // `-4 --ipv4` says one family twice; `-4 -6` two.
            if field == Field::Family && parse_family(first, "").ok() != parse_family(written, "").ok() {
                return Err(at(RuleError::Unsupported(format!(
                    "{first} and {written} together: a rule is for one family, or (with neither) for both"
                ))));
            }
            return Err(at(RuleError::Repeated(written.to_string())));
        }
        if value.starts_with('!') && !NEGATABLE.contains(&field) {
            return Err(at(RuleError::Unsupported(format!(
                "negation (!) applies to -s, -d, -i and -o only, not {written}"
            ))));
        }
        self.options.push((field, written, value.to_string()));
        Ok(())
    }

    /// How `field` is written in this draft's syntax, with its value placeholder: `--to ADDR[:PORT]` or
    /// `to = "ADDR[:PORT]"`.
    fn usage(&self, field: Field) -> String {
        let s = spec(field);
        let value = match field {
            Field::To if self.kind == Kind::Snat => "ADDR[:LO-HI]",
            Field::To => "ADDR[:PORT]",
            _ => s.value.unwrap_or(""),
        };
        match self.syntax {
            Syntax::Cli => format!("{} {value}", s.cli[0]),
            Syntax::Toml if s.toml_string => format!("{} = \"{value}\"", s.toml),
            Syntax::Toml => format!("{} = {value}", s.toml),
        }
    }

    /// What this kind's target looks like in this syntax, for hints.
    fn target_usage(&self) -> String {
        match self.kind {
            Kind::Dnat | Kind::Snat => format!("{} takes {}", self.kind, self.usage(Field::To)),
            Kind::Redirect => format!("redirect takes {}", self.usage(Field::ToPort)),
            Kind::Masquerade => {
                format!("masquerade takes {} (its address is the outgoing interface's)", self.usage(Field::ToPorts))
            }
        }
    }

    /// The error for an option this kind does not take.
    fn not_for_kind(&self, field: Field, written: &'static str) -> RuleError {
        if matches!(field, Field::Iface | Field::Oface) {
            return wrong_hook(self.kind, written);
        }
        if field == Field::Local {
            return RuleError::Unsupported(format!(
                "{written} applies to dnat and redirect (locally generated connections), not {}",
                self.kind
            ));
        }
        if field == Field::Hairpin {
            return RuleError::Unsupported(format!("{written} applies to dnat rules only, not {}", self.kind));
        }
        let owners: Vec<&str> = spec(field).kinds.iter().map(|k| k.name()).collect();
        let owners = owners.join(" and ");
        match self.syntax {
            Syntax::Cli => {
                let hint = format!("{} ({written} is for {owners})", self.target_usage());
                RuleError::WrongTarget { option: written.to_string(), kind: self.kind.name(), hint }
            }
            // In a table the field names itself in the error's prefix: say where it belongs.
            Syntax::Toml => RuleError::Invalid(format!("{written} is for {owners}; {}", self.target_usage())),
        }
    }

    /// Checks and parses the draft into a validated, normalized [`Rule`] (id 0 unless the draft has one).
    pub fn into_rule(self) -> Result<Rule, DraftError> {
        let rule = self.parse()?;
        rule.validate()?;
        Ok(rule)
    }

    /// Checks which options the kind takes and parses their values into a normalized [`Rule`], without the
    /// whole-rule checks of [`Rule::validate`] (for front ends that name their own errors for those first, like the
    /// iptables import, and then validate).
    pub fn parse(self) -> Result<Rule, DraftError> {
        let kind = self.kind;
        let mut rule = Rule {
            id: self.id.unwrap_or(0),
            // The target is set below, once every option is read.
            ..Rule::new(Target::Masquerade { ports: None })
        };
        let (mut to, mut to_port, mut to_ports) = (None, None, None);
        for (field, written, value) in &self.options {
            let (field, written) = (*field, *written);
            let at = |error| DraftError { option: Some(written), error };
            if !spec(field).kinds.contains(&kind) {
                return Err(at(self.not_for_kind(field, written)));
            }
            if let Some((_, only)) = KIND_SPELLINGS.iter().find(|(s, _)| *s == written)
                && *only != kind
            {
                return Err(at(self.not_for_kind(field, written)));
            }
            let (negated, value) = negation(value.as_str());
            match field {
                Field::Local => rule.local = true,
                Field::Iface => {
                    validate_iface(value).map_err(at)?;
                    rule.iface = Some(value.to_string());
                    rule.not.iface = negated;
                }
                Field::Oface => {
                    validate_iface(value).map_err(at)?;
                    rule.oface = Some(value.to_string());
                    rule.not.iface = negated;
                }
                Field::Proto => rule.proto = parse_proto_opt(value).map_err(at)?,
                Field::Src => {
                    rule.src = Some(parse_cidr(value).map_err(at)?);
                    rule.not.src = negated;
                }
                Field::Dst if value == DST_LOCAL => {
                    if negated {
                        let why = "! -d local is not supported (match the networks to exclude instead)";
                        return Err(at(RuleError::Unsupported(why.into())));
                    }
                    rule.dst_local = true;
                }
                Field::Dst => {
                    rule.dst = Some(parse_cidr(value).map_err(at)?);
                    rule.not.dst = negated;
                }
                Field::Dport => rule.dport = Some(value.parse().map_err(at)?),
                Field::DstType => {
                    if negated || !value.eq_ignore_ascii_case(DST_LOCAL) {
                        let why = format!("bad --dst-type {value:?}: only local is supported (this host's addresses)");
                        return Err(at(RuleError::Unsupported(why)));
                    }
                    rule.dst_local = true;
                }
                Field::To => to = Some((written, value)),
                Field::ToPort => to_port = Some((written, value)),
                Field::ToPorts => to_ports = Some((written, value)),
                Field::Hairpin => rule.hairpin = Some(parse_cidr(value).map_err(at)?),
                Field::Family => rule.family = Some(parse_family(written, value).map_err(at)?),
            }
        }
        let missing = |field: Field| DraftError {
            option: Some(match self.syntax {
                Syntax::Cli => spec(field).cli[0],
                Syntax::Toml => spec(field).toml,
            }),
            error: RuleError::MissingTarget { kind: kind.name(), what: self.usage(field) },
        };
        let at = |written: &'static str| move |error| DraftError { option: Some(written), error };
        rule.target = match kind {
            Kind::Dnat => {
                let (w, v) = to.ok_or_else(|| missing(Field::To))?;
                let backends = parse_dnat_to(v).map_err(at(w))?;
                rule.set_dnat_backends(backends);
                rule.target
            }
            Kind::Snat => {
                let (w, v) = to.ok_or_else(|| missing(Field::To))?;
                let (addr, ports) = parse_snat_to(v).map_err(at(w))?;
                Target::Snat { addr, ports }
            }
            Kind::Redirect => {
                let (w, v) = to_port.ok_or_else(|| missing(Field::ToPort))?;
                if v.contains(['-', ':']) {
                    let reason = "port ranges are not supported".into();
                    return Err(at(w)(RuleError::BadPort { input: v.into(), reason }));
                }
                Target::Redirect { port: parse_port(v).map_err(at(w))? }
            }
            // The address is the interface's and the port is kept when free: nothing is required.
            Kind::Masquerade => {
                Target::Masquerade { ports: to_ports.map(|(w, v)| v.parse::<PortRange>().map_err(at(w))).transpose()? }
            }
        };
        rule.normalize();
        Ok(rule)
    }
}

#[cfg(test)]
mod tests {

    use crate::rules::model::Family;
    use crate::rules::tests::*;
    use crate::rules::*;

    #[test]
    fn display_examples() {
        let r = ok("dnat -i eth0 -p tcp -s 192.168.1.0/24 --dport 59999 --to 127.0.0.1:17355");
        assert_eq!(r.to_string(), "dnat -i eth0 -p tcp -s 192.168.1.0/24 --dport 59999 --to 127.0.0.1:17355");
        let r = ok("redirect -p tcp --dport 80 --to-port 3000");
        assert_eq!(r.to_string(), "redirect -p tcp --dport 80 --to-port 3000");
        assert_eq!(r.target, Target::Redirect { port: 3000 });
        // /32 prints bare; host bits were cleared at parse time.
        let r = ok("dnat -s 10.0.0.7/32 -d 203.0.113.10/255.255.255.0 --to 10.0.0.2");
        assert_eq!(r.to_string(), "dnat -s 10.0.0.7 -d 203.0.113.0/24 --to 10.0.0.2");
    }

    #[test]
    fn negation_and_dst_local() {
        // iptables' form, and the value form; both print back in iptables' form.
        let a = ok("masquerade -s 172.17.0.0/16 ! -o docker0");
        let b = ok("masquerade -s 172.17.0.0/16 -o !docker0");
        assert_eq!(a, b);
        assert_eq!((a.oface.as_deref(), a.not), (Some("docker0"), Negated { iface: true, ..Default::default() }));
        assert_eq!(a.to_string(), "masquerade ! -o docker0 -s 172.17.0.0/16");
        let r = ok("dnat ! -i docker0 -p tcp ! -s 10.0.0.0/8 ! -d 192.0.2.0/24 --dport 80 --to 10.0.0.2");
        assert_eq!(r.not, Negated { src: true, dst: true, iface: true });
        assert_eq!(ok(&r.to_string()), r, "{r}");
        let l = ok("dnat -d local -p tcp --dport 8080 --to 172.17.0.2:80");
        assert!(l.dst_local && l.dst.is_none());
        assert_eq!(l.to_string(), "dnat -p tcp -d local --dport 8080 --to 172.17.0.2:80");
        assert_eq!(ok(&l.to_string()), l);
        // Docker's OUTPUT form: a -d network and --dst-type local together; -d local and --dst-type local are one.
        let o = ok("dnat --local ! -d 127.0.0.0/8 --dst-type local -p tcp --dport 8080 --to 172.17.0.2:80");
        assert!(o.dst_local && o.not.dst && o.local);
        assert_eq!(
            o.to_string(),
            "dnat --local -p tcp ! -d 127.0.0.0/8 --dst-type local --dport 8080 --to 172.17.0.2:80"
        );
        assert_eq!(ok(&o.to_string()), o);
        assert_eq!(ok("dnat --dst-type local --to 10.0.0.2"), ok("dnat -d local --to 10.0.0.2"));
        assert_eq!(ok("snat -d local -p tcp --dport 80 --to 10.0.0.2").dport, Some(PortRange::single(80)));
        // Different negations are different rules, not duplicates.
        assert!(
            !ok("dnat -s 10.0.0.0/8 --to 10.0.0.2").same_match_and_target(&ok("dnat ! -s 10.0.0.0/8 --to 10.0.0.2"))
        );
    }

    #[test]
    fn long_forms_and_order() {
        let a = ok("dnat --in-interface eth0 --protocol tcp --source 192.168.1.0/24 --destination 203.0.113.10 \
                    --destination-port 8000:8099 --to-destination 10.0.0.2:9000");
        let b = ok("dnat --to=10.0.0.2:9000 --dport=8000-8099 -d 203.0.113.10 -s 192.168.1.0/24 -p tcp -i eth0");
        assert_eq!(a, b);
        assert_eq!(a.dport, Some(PortRange { lo: 8000, hi: 8099 }));
        assert_eq!(a.dst, Some(net("203.0.113.10/32")));
        let r = ok("REDIRECT -p udp --to-ports 53");
        assert_eq!(r.target, Target::Redirect { port: 53 });
        assert_eq!(r.dport, None);
    }

    #[test]
    fn grammar_errors_name_the_input() {
        for (cmd, want) in [
            // Without a kind, clap prints the usage with the kinds to choose from.
            ("", "dnat"),
            ("", "masquerade"),
            ("netmap --to 1.2.3.4", "unrecognized subcommand 'netmap'"),
            ("dnat -p tcp --sport 80 --to 1.2.3.4", "unexpected argument '--sport'"),
            ("dnat -p tcp 80 --to 1.2.3.4", "unexpected argument \"80\""),
            ("dnat -p tcp --to", "a value is required for '--to"),
            ("dnat -p tcp -p udp --to 1.2.3.4", "-p given twice"),
            ("dnat -p tcp --protocol udp --to 1.2.3.4", "--protocol given twice"),
            ("dnat -p tcp ! --dport 80 --to 1.2.3.4", "negation (!) applies to -s, -d, -i and -o only"),
            ("dnat -p tcp --dport !80 --to 1.2.3.4", "negation (!) applies to -s, -d, -i and -o only"),
            ("dnat -s 10.0.0.1 --to 1.2.3.4 !", "a ! must come right before"),
            ("dnat ! -s 0.0.0.0/0 --to 1.2.3.4", "would match nothing"),
            ("dnat ! -d local --to 1.2.3.4", "! -d local is not supported"),
            ("dnat -d local -d 10.0.0.1 --to 1.2.3.4", "-d given twice"),
            ("dnat --dst-type unicast --to 1.2.3.4", "only local is supported"),
            ("dnat ! --dst-type local --to 1.2.3.4", "only local is supported"),
            ("dnat ! -s 10.0.0.0/8 -d 203.0.113.1 --to 10.0.0.2 --hairpin 10.0.0.0/24", "does not go with ! -s"),
            ("dnat -p tcp --dport 80", "dnat needs --to ADDR[:PORT]"),
            ("redirect -p tcp --dport 80", "redirect needs --to-port PORT"),
            ("dnat -p tcp --to-port 80", "--to-port does not apply to dnat"),
            ("redirect -p tcp --to 1.2.3.4", "--to does not apply to redirect"),
            ("redirect -p tcp --to-port 8000-8010", "bad port \"8000-8010\": port ranges"),
            ("redirect -p tcp --to-port 0", "bad port \"0\""),
            ("dnat -p sctp --to 1.2.3.4", "bad protocol \"sctp\""),
            ("dnat -s 10.0.0.300/24 --to 1.2.3.4", "bad CIDR \"10.0.0.300/24\""),
            ("dnat -d 10.0.0.0/40 --to 1.2.3.4", "bad CIDR \"10.0.0.0/40\""),
            ("dnat -p tcp --dport 0 --to 1.2.3.4", "bad port range \"0\""),
            ("dnat -i eth+ --to 1.2.3.4", "bad interface name \"eth+\""),
            ("dnat --to 1.2.3.4:99999 -p tcp", "bad --to \"1.2.3.4:99999\""),
            (
                "dnat --dport 80 --to 1.2.3.4",
                "--dport needs -p tcp or -p udp (iptables rejects a port without a protocol)",
            ),
            ("redirect --to-port 80", "redirect needs -p tcp or -p udp"),
            ("dnat --to 1.2.3.4:80", "Need TCP, UDP, SCTP or DCCP with port specification"),
        ] {
            let e = err(cmd);
            assert!(e.contains(want), "{cmd:?}: got {e:?}, want {want:?}");
        }
    }

    #[test]
    fn display_parse_round_trip_property() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut families = [0; 3];
        for _ in 0..5000 {
            let mut r = random_rule(&mut rng);
            // A rule without addresses is for both families, or restricted by -4 / -6.
            if r.family().is_none() {
                r.family = rng.pick(&[None, Some(Family::Ipv4), Some(Family::Ipv6)]);
            }
            families[match r.family() {
                None => 0,
                Some(Family::Ipv4) => 1,
                Some(Family::Ipv6) => 2,
            }] += 1;
            r.validate().unwrap_or_else(|e| panic!("generator made an invalid rule {r}: {e}"));
            let text = r.to_string();
            let mut back = p(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            back.id = r.id;
            assert_eq!(back, r, "{text}");
            // The state file (JSON) round-trips too.
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), r, "{json}");
        }
        // Rules for both families, IPv4 ones and IPv6 ones, in numbers.
        assert!(families.iter().all(|&n| n > 100), "{families:?}");
        zero_prefix_round_trips();
    }

    /// `0.0.0.0/0` survives a round trip and means the same as no prefix (in the rule's family: `-s 0.0.0.0/0`
    /// makes a rule without other addresses an IPv4 one, like -4).
    fn zero_prefix_round_trips() {
        let r = ok("dnat -s 0.0.0.0/0 --to 10.0.0.1");
        assert_eq!(r.src, Some(net("0.0.0.0/0")));
        assert_eq!(p(&r.to_string()).unwrap(), r);
        assert!(r.same_match_and_target(&ok("dnat --to 10.0.0.1")));
        let r = ok("redirect -p tcp -d ::/0 --to-port 80");
        assert_eq!((r.dst, r.family()), (Some(net("::/0")), Some(Family::Ipv6)));
        assert_eq!(p(&r.to_string()).unwrap(), r);
        assert!(r.same_match_and_target(&ok("redirect -6 -p tcp --to-port 80")));
        assert!(!r.same_match_and_target(&ok("redirect -p tcp --to-port 80")));
        assert!(
            ok("redirect -p tcp -s 0.0.0.0/0 --to-port 80")
                .same_match_and_target(&ok("redirect -4 -p tcp --to-port 80"))
        );
    }

    /// `-4` / `-6`: the family of a rule without addresses (printed back, and read back); with addresses the
    /// family is theirs, and a restriction that says otherwise is refused.
    #[test]
    fn family_flags() {
        let r = ok("redirect -6 -p tcp --dport 80 --to-port 3000");
        assert_eq!((r.family, r.family()), (Some(Family::Ipv6), Some(Family::Ipv6)));
        assert_eq!(r.to_string(), "redirect -6 -p tcp --dport 80 --to-port 3000");
        assert_eq!(ok(&r.to_string()), r);
        assert_eq!(ok("redirect -p tcp --ipv6 --dport 80 --to-port 3000"), r, "--ipv6, anywhere among the options");
        let v4 = ok("masquerade -4 -o eth1");
        assert_eq!((v4.family(), v4.to_string()), (Some(Family::Ipv4), "masquerade -4 -o eth1".to_string()));
        assert_eq!(ok("masquerade --ipv4 -o eth1"), v4);
        // Without: both families.
        let both = ok("redirect -p tcp --dport 80 --to-port 3000");
        assert_eq!(both.family(), None);
        assert!(both.applies_to(Family::Ipv4) && both.applies_to(Family::Ipv6));
        assert!(r.applies_to(Family::Ipv6) && !r.applies_to(Family::Ipv4));
        // Not duplicates: different packets.
        assert!(!r.same_match_and_target(&both));
        assert!(!r.same_match_and_target(&ok("redirect -4 -p tcp --dport 80 --to-port 3000")));
        assert_ne!(r.dedup_key(), both.dedup_key());
        // A restriction the addresses say anyway is dropped: the same rule, and a duplicate of it.
        let plain = ok("dnat -d 10.0.0.1 --to 10.0.0.2");
        let restricted = ok("dnat -4 -d 10.0.0.1 --to 10.0.0.2");
        assert_eq!(restricted, plain);
        assert_eq!((restricted.family, restricted.family()), (None, Some(Family::Ipv4)));
        assert_eq!(restricted.to_string(), "dnat -d 10.0.0.1 --to 10.0.0.2");
        assert!(restricted.same_match_and_target(&plain));
        assert_eq!(
            check_duplicate(&[Rule { id: 1, ..plain }], &restricted).unwrap_err().to_string(),
            "duplicate of rule 1"
        );
        assert_eq!(ok("dnat -6 -p tcp --to [2001:db8::2]:80"), ok("dnat -p tcp --to [2001:db8::2]:80"));
        // IPv6 rules print as they were written (brackets with a port), and read back.
        for shown in [
            "dnat -i eth0 -p tcp -s 2001:db8:1::/48 -d 2001:db8::10 --dport 8080 --to [2001:db8::2]:80",
            "dnat -p tcp ! -d fd00::/8 --dport 80 --to [2001:db8::2]:80,[2001:db8::3]:80@2",
            "dnat -d 2001:db8::10 --to 2001:db8::2 --hairpin 2001:db8:2::/64",
            "snat -o eth1 -p udp -s fd00::/64 --to [2001:db8::1]:20000-20099",
            "dnat --local -p tcp --dport 8080 --to [::1]:80",
        ] {
            let r = ok(shown);
            assert_eq!(r.to_string(), shown);
            assert_eq!(r.family(), Some(Family::Ipv6), "{shown}");
            assert_eq!(ok(shown), r);
        }

        for (cmd, want) in [
            ("redirect -4 -6 -p tcp --to-port 80", "-4 and -6 together: a rule is for one family"),
            ("redirect -6 -p tcp --ipv4 --to-port 80", "-6 and --ipv4 together"),
            ("redirect -6 -6 -p tcp --to-port 80", "'-6' cannot be used multiple times"),
            ("redirect -4 --ipv4 -p tcp --to-port 80", "--ipv4 given twice"),
            (
                "dnat -6 --to 10.0.0.2",
                "a rule translates one IP family, but -6 is IPv6, --to 10.0.0.2 is IPv4: write one rule per family",
            ),
            ("dnat -4 -p tcp --to [2001:db8::2]:80", "-4 is IPv4, --to 2001:db8::2 is IPv6"),
            ("masquerade -4 -s fd00::/8", "-4 is IPv4, -s fd00:: is IPv6"),
            ("dnat -s 10.0.0.0/8 --to 2001:db8::2", "-s 10.0.0.0 is IPv4, --to 2001:db8::2 is IPv6"),
            ("dnat -d 2001:db8::1 --to 10.0.0.2", "-d 2001:db8::1 is IPv6, --to 10.0.0.2 is IPv4"),
            ("snat -s 10.0.0.0/8 -d 2001:db8::/32 --to 10.0.0.1", "-s 10.0.0.0 is IPv4, -d 2001:db8:: is IPv6"),
            ("dnat --to 10.0.0.2,2001:db8::3", "--to 10.0.0.2 is IPv4, --to 2001:db8::3 is IPv6"),
            ("dnat -d 2001:db8::10 --to 2001:db8::2 --hairpin 10.0.2.0/24", "--hairpin 10.0.2.0 is IPv4"),
            // IPv6 has no route_localnet: arriving packets cannot be sent to ::1.
            ("dnat -p tcp --dport 80 --to ::1", "--to ::1 works for --local rules only"),
            ("dnat -p tcp --dport 80 --to [::1]:8080", "(IPv6 has no route_localnet); use redirect --to-port PORT"),
            ("dnat -p tcp --dport 80 --to [2001:db8::2]:80,[::1]:80", "--to ::1 works for --local rules only"),
            ("dnat -p tcp --to ::ffff:10.0.0.2", "IPv4-mapped"),
        ] {
            let e = err(cmd);
            assert!(e.contains(want), "{cmd:?}: got {e:?}, want {want:?}");
        }
        assert_eq!(ok("dnat --local -p tcp --dport 80 --to ::1").target, Target::Dnat { addr: ip("::1"), port: None });
        // IPv4's loopback needs route_localnet, which pfwd sets: still fine without --local.
        ok("dnat -p tcp --dport 80 --to 127.0.0.1:8080");
        // A hand-built (state file) rule gets the same check.
        let mut hand = ok("redirect -p tcp --to-port 80");
        hand.family = Some(Family::Ipv6);
        hand.src = Some(net("10.0.0.0/8"));
        assert_eq!(
            hand.validate().unwrap_err(),
            RuleError::MixedFamilies { detail: "-6 is IPv6, -s 10.0.0.0 is IPv4".into() }
        );
    }

    /// The config file's `family`: written by to_config for a rule that has one, read back; other values refused.
    #[test]
    fn family_in_toml() {
        let r = ok("redirect -6 -p tcp --dport 80 --to-port 3000");
        let one = std::slice::from_ref(&r);
        let written = to_config(one);
        assert!(written.contains("kind = \"redirect\"\nfamily = \"ipv6\"\n"), "{written}");
        assert_eq!(parse_config(&written).unwrap(), one);
        let toml = "[[rule]]\nkind = \"masquerade\"\noface = \"eth1\"\nfamily = \"ipv4\"\n";
        assert_eq!(parse_config(toml).unwrap(), [ok("masquerade -4 -o eth1")]);
        // No family: none written, and both families.
        let both = ok("redirect -p tcp --dport 80 --to-port 3000");
        assert!(!to_config(std::slice::from_ref(&both)).contains("family"));
        // An IPv6 rule with addresses: its family is theirs, nothing to write.
        let v6 = ok("dnat -p tcp -d 2001:db8::10 --dport 80 --to [2001:db8::2]:8080");
        let written = to_config(std::slice::from_ref(&v6));
        assert!(!written.contains("family") && written.contains("to = \"[2001:db8::2]:8080\"\n"), "{written}");
        assert_eq!(parse_config(&written).unwrap(), [v6]);
        for (value, want) in [
            ("\"ipx\"", "[[rule]] #1, field family: bad family \"ipx\": expected \"ipv4\" or \"ipv6\""),
            ("\"\"", "bad family \"\""),
            ("6", "field family"),
        ] {
            let e = parse_config(&format!("[[rule]]\nkind = \"masquerade\"\nfamily = {value}\n")).unwrap_err();
            assert!(e.to_string().contains(want), "{value}: {e}");
        }
        let e = parse_config("[[rule]]\nkind = \"dnat\"\nfamily = \"ipv6\"\nto = \"10.0.0.2\"\n").unwrap_err();
        assert!(e.to_string().contains("-6 is IPv6, --to 10.0.0.2 is IPv4"), "{e}");
    }

    #[test]
    fn snat_masquerade_grammar() {
        let r = ok("snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099");
        assert_eq!(r.to_string(), "snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099");
        assert_eq!(
            (r.oface.as_deref(), r.iface.as_deref(), r.target),
            (
                Some("eth1"),
                None,
                Target::Snat { addr: ip("203.0.113.5"), ports: Some(PortRange { lo: 20000, hi: 20099 }) }
            )
        );
        assert!(r.is_postrouting() && r.target.is_postrouting());
        assert_eq!((r.kind_name(), r.hook_iface()), ("snat", Some("eth1")));
        let r = ok("masquerade -o eth1");
        assert_eq!(r.to_string(), "masquerade -o eth1");
        assert_eq!(r.target, Target::Masquerade { ports: None });
        let r = ok("masquerade -o eth1 -p udp --to-ports 1024-1027");
        assert_eq!(r.to_string(), "masquerade -o eth1 -p udp --to-ports 1024-1027");
        assert_eq!(r.target, Target::Masquerade { ports: Some(PortRange { lo: 1024, hi: 1027 }) });
        assert_eq!(ok("masquerade").to_string(), "masquerade");
        assert_eq!(
            ok("snat -d 198.51.100.0/24 --to 203.0.113.5").to_string(),
            "snat -d 198.51.100.0/24 --to 203.0.113.5"
        );
        // iptables spellings, single ports as one-port ranges, --opt=value.
        let a = ok("SNAT --out-interface eth1 --protocol tcp --source 10.0.2.0/24 --to-source 203.0.113.5:20000");
        let b = ok("snat --to=203.0.113.5:20000-20000 -s 10.0.2.5/24 -p tcp -o eth1");
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000");
        let m = ok("MASQUERADE -p tcp --to-port 5000");
        assert_eq!(m.target, Target::Masquerade { ports: Some(PortRange::single(5000)) });
        assert_eq!(m.to_string(), "masquerade -p tcp --to-ports 5000");
        assert!(!ok("dnat --to 10.0.0.1").is_postrouting());
        assert_eq!(ok("dnat -i eth0 --to 10.0.0.1").hook_iface(), Some("eth0"));
    }

    #[test]
    fn snat_masquerade_errors() {
        for (cmd, want) in [
            ("snat -i eth0 --to 1.2.3.4", "-i does not apply to snat; SNAT happens where packets leave: use -o"),
            ("snat --in-interface eth0 --to 1.2.3.4", "--in-interface does not apply to snat; SNAT happens where"),
            ("masquerade -i eth0", "-i does not apply to masquerade; MASQUERADE happens where packets leave: use -o"),
            ("masquerade --dport 80", "--dport needs -p tcp or -p udp"),
            ("dnat -o eth1 --to 1.2.3.4", "-o does not apply to dnat; DNAT happens where packets arrive: use -i"),
            ("redirect -p tcp --out-interface eth1 --to-port 80", "--out-interface does not apply to redirect"),
            ("snat --to 1.2.3.4:1000-2000", "--to with a port needs -p tcp or -p udp (iptables: \"Need TCP, UDP"),
            ("snat --to 1.2.3.4:1000", "Need TCP, UDP, SCTP or DCCP with port specification"),
            ("masquerade --to-ports 1024-1027", "--to-ports needs -p tcp or -p udp (iptables: \"Need TCP, UDP"),
            ("snat -p tcp", "snat needs --to ADDR[:LO-HI]"),
            ("snat -p tcp --to-port 80", "--to-port does not apply to snat; snat takes --to ADDR[:LO-HI]"),
            ("snat --to-destination 1.2.3.4", "--to-destination does not apply to snat"),
            ("dnat --to-source 1.2.3.4", "--to-source does not apply to dnat"),
            ("masquerade --to 1.2.3.4", "--to does not apply to masquerade"),
            ("masquerade -p tcp --to-ports 2000-1000", "bad port range \"2000-1000\""),
            ("masquerade -p tcp --to-ports 0", "bad port range \"0\""),
            ("snat -p tcp --to 1.2.3.4:9-1", "bad --to \"1.2.3.4:9-1\""),
            ("snat --to 255.255.255.255", "not a unicast"),
            ("snat -o eth+ --to 1.2.3.4", "bad interface name \"eth+\""),
            ("snat -o eth0 -o eth1 --to 1.2.3.4", "-o given twice"),
            ("snat --to 1.2.3.4 --to-source 1.2.3.5", "--to-source given twice"),
        ] {
            let e = err(cmd);
            assert!(e.contains(want), "{cmd:?}: got {e:?}, want {want:?}");
        }
        // Hand-built rules (state file) get the same checks.
        let mut r = ok("snat -o eth1 -p tcp --to 1.2.3.4:1000-2000");
        r.iface = Some("eth0".into());
        assert_eq!(
            r.validate().unwrap_err().to_string(),
            "-i does not apply to snat; SNAT happens where packets leave: use -o"
        );
        r.iface = None;
        r.proto = None;
        assert_eq!(r.validate().unwrap_err(), RuleError::ToPortNeedsProto);
        r.target = Target::Masquerade { ports: Some(PortRange { lo: 0, hi: 5 }) };
        assert!(r.validate().unwrap_err().to_string().contains("bad port range \"0-5\""));
        r.target = Target::Masquerade { ports: Some(PortRange { lo: 1, hi: 5 }) };
        assert_eq!(r.validate().unwrap_err(), RuleError::ToPortsNeedsProto);
        r.target = Target::Snat { addr: ip("224.0.0.1"), ports: None };
        assert!(r.validate().unwrap_err().to_string().contains("not a unicast"));
        let mut d = ok("dnat --to 10.0.0.1");
        d.oface = Some("eth1".into());
        assert!(d.validate().unwrap_err().to_string().starts_with("-o does not apply to dnat"));
    }

    /// The same rule spelled the three ways users write rules (CLI, TOML, an iptables line) becomes the same
    /// [`Rule`]; `-p all` is accepted by all three and means no protocol filter.
    #[test]
    fn cli_toml_and_iptables_agree() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "dnat -i eth0 -p tcp -s 192.168.1.0/24 --dport 8000-8099 --to 10.0.0.2:9000",
                "kind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\nsrc = \"192.168.1.0/24\"\ndport = \"8000-8099\"\n\
                 to = \"10.0.0.2:9000\"",
                "-A PREROUTING -i eth0 -p tcp -s 192.168.1.0/24 --dport 8000:8099 -j DNAT --to-destination 10.0.0.2:9000",
            ),
            (
                "redirect -p udp --dport 53 --to-port 5353",
                "kind = \"redirect\"\nproto = \"udp\"\ndport = 53\nto_port = 5353",
                "-A PREROUTING -p udp -m udp --dport 53 -j REDIRECT --to-ports 5353",
            ),
            (
                "dnat -p all -d 203.0.113.10 --to 10.0.0.2",
                "kind = \"dnat\"\nproto = \"all\"\ndst = \"203.0.113.10\"\nto = \"10.0.0.2\"",
                "-A PREROUTING -p all -d 203.0.113.10 -j DNAT --to-destination 10.0.0.2",
            ),
            (
                "dnat --local -p tcp --dport 1111 --to 127.0.0.1:80",
                "kind = \"dnat\"\nlocal = true\nproto = \"tcp\"\ndport = 1111\nto = \"127.0.0.1:80\"",
                "-A OUTPUT -p tcp --dport 1111 -j DNAT --to-destination 127.0.0.1:80",
            ),
            (
                "snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099",
                "kind = \"snat\"\noface = \"eth1\"\nproto = \"tcp\"\nsrc = \"10.0.2.0/24\"\nto = \"203.0.113.5:20000-20099\"",
                "-A POSTROUTING -o eth1 -p tcp -s 10.0.2.0/24 -j SNAT --to-source 203.0.113.5:20000-20099",
            ),
            (
                "masquerade -o eth1 -p udp --to-ports 1024-2047",
                "kind = \"masquerade\"\noface = \"eth1\"\nproto = \"udp\"\nto_ports = \"1024-2047\"",
                "-A POSTROUTING -o eth1 -p udp -j MASQUERADE --to-ports 1024-2047",
            ),
        ];
        for (cli, toml, ipt) in cases {
            let from_cli = ok(cli);
            let from_toml = parse_config(&format!("[[rule]]\n{toml}\n")).unwrap_or_else(|e| panic!("{toml}: {e}"));
            let from_ipt = crate::iptables::import(&format!("*nat\n{ipt}\nCOMMIT\n"))
                .unwrap_or_else(|e| panic!("{ipt}: {e:?}"))
                .rules;
            assert_eq!(from_toml, std::slice::from_ref(&from_cli), "TOML {toml:?} vs CLI {cli:?}");
            // An iptables line is an IPv4 rule: the CLI's with -4 (which a rule with IPv4 addresses has anyway).
            let ipv4 = ok(&format!("{cli} -4"));
            assert_eq!(from_ipt, std::slice::from_ref(&ipv4), "iptables {ipt:?} vs CLI {cli:?} -4");
            assert_eq!(from_cli.family().is_none(), ipv4.family != from_cli.family, "{cli}");
        }
        // And the same mistakes are refused by the grammar, with the option named as written.
        assert!(err("snat -i eth0 --to 1.2.3.4").starts_with("-i does not apply to snat"));
        let toml = parse_config("[[rule]]\nkind = \"snat\"\niface = \"eth0\"\nto = \"1.2.3.4\"\n").unwrap_err();
        assert_eq!(
            toml.to_string(),
            "[[rule]] #1, field iface: iface does not apply to snat; SNAT happens where packets leave: use oface"
        );
    }

    /// Several DNAT backends: `--to A,B,C` with `@WEIGHT`s and address ranges, printed back, in TOML (a string or a
    /// list), JSON, and their checks. One backend stays exactly what it was.
    #[test]
    fn several_backends_grammar() {
        let r = ok("dnat -p tcp --dport 80 --to 10.0.2.2:80,10.0.2.3:80@2,10.0.2.4:8080");
        let b = |a: &str, port: u16, weight: u32| Backend { addr: ip(a), port: Some(port), weight };
        assert_eq!(r.backends, vec![b("10.0.2.2", 80, 1), b("10.0.2.3", 80, 2), b("10.0.2.4", 8080, 1)]);
        assert_eq!(r.target, Target::Dnat { addr: ip("10.0.2.2"), port: Some(80) }, "the first is the target");
        assert_eq!(r.dnat_backends(), r.backends);
        let shown = "dnat -p tcp --dport 80 --to 10.0.2.2:80,10.0.2.3:80@2,10.0.2.4:8080";
        assert_eq!(r.to_string(), shown);
        assert_eq!(ok(shown), r);
        // iptables' address range: every address, each with the port (and weight).
        let range = ok("dnat -p tcp --to 10.0.0.1-10.0.0.3:8080");
        assert_eq!(range.backends, vec![b("10.0.0.1", 8080, 1), b("10.0.0.2", 8080, 1), b("10.0.0.3", 8080, 1)]);
        assert_eq!(range.to_string(), "dnat -p tcp --to 10.0.0.1:8080,10.0.0.2:8080,10.0.0.3:8080");
        // A weight applies to each address of the range; weights only count in proportion (kept in lowest terms).
        let weighted = ok("dnat --to 10.0.0.1-10.0.0.2@3,10.0.0.9@6");
        assert_eq!(weighted.backends.iter().map(|x| x.weight).collect::<Vec<_>>(), [1, 1, 2]);
        // One backend is the plain target, as before (a weight on it means nothing and is dropped).
        let one = ok("dnat -p tcp --to 10.0.2.2:80");
        assert!(one.backends.is_empty());
        assert_eq!(one.dnat_backends(), vec![b("10.0.2.2", 80, 1)]);
        assert_eq!(ok("dnat -p tcp --to 10.0.2.2:80@5"), one);
        assert_eq!(ok("dnat -p tcp --to 10.0.2.2-10.0.2.2:80"), one);
        assert!(!serde_json::to_string(&one).unwrap().contains("backends"));
        // Not a duplicate of the same match with other backends.
        assert!(!r.same_match_and_target(&ok("dnat -p tcp --dport 80 --to 10.0.2.2:80,10.0.2.3:80")));
        // TOML: the same string, or a list; written back as the string.
        let one_rule = std::slice::from_ref(&r);
        let toml = "[[rule]]\nkind = \"dnat\"\nproto = \"tcp\"\ndport = 80\n";
        let listed = format!("{toml}to = [\"10.0.2.2:80\", \"10.0.2.3:80@2\", \"10.0.2.4:8080\"]\n");
        assert_eq!(parse_config(&listed).unwrap(), one_rule);
        let written = to_config(one_rule);
        assert!(written.contains("to = \"10.0.2.2:80,10.0.2.3:80@2,10.0.2.4:8080\"\n"), "{written}");
        assert_eq!(parse_config(&written).unwrap(), one_rule);
        let e = parse_config(&format!("{toml}to = [\"10.0.2.2:80\", 7]\n")).unwrap_err().to_string();
        assert!(e.contains("field to: expected a string or a list of strings, got integer"), "{e}");
        // JSON (the state file, `list --json`).
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["backends"],
            serde_json::json!([{"addr": "10.0.2.2", "port": 80}, {"addr": "10.0.2.3", "port": 80, "weight": 2},
                               {"addr": "10.0.2.4", "port": 8080}])
        );
        assert_eq!(serde_json::from_value::<Rule>(json).unwrap(), r);

        for (cmd, want) in [
            ("dnat -p tcp --to 10.0.2.2:80,10.0.2.2:80", "10.0.2.2:80 is given twice"),
            ("dnat --to 10.0.2.2:80,10.0.2.3:80", "--to with a port needs -p tcp"),
            ("dnat -p tcp --to 10.0.2.2:80,10.0.2.3", "give every backend a port, or none"),
            ("dnat --to 10.0.2.2,10.0.2.3@0", "bad weight \"0\""),
            ("dnat --to 10.0.2.2,10.0.2.3@x", "bad weight \"x\""),
            ("dnat --to 10.0.2.2,10.0.2.3@+2", "bad weight"),
            ("dnat --to 10.0.2.2,", "bad --to \"10.0.2.2,\": not an IP address"),
            ("dnat --to 10.0.0.9-10.0.0.1", "first address is above its last"),
            ("dnat --to 10.0.0.0-10.0.1.0", "more than 255 backends"),
            ("dnat --to 10.0.2.2,0.0.0.0", "not a unicast"),
            ("dnat --to 10.0.2.2@600,10.0.2.3@601", "the weights add up to 1201; at most 1000"),
            ("dnat -p tcp --to 10.0.2.2:80-90,10.0.2.3", "port ranges are not supported"),
            ("dnat --local --to 10.0.2.2,10.0.2.3", "not supported with --local"),
            ("dnat -d 203.0.113.1 --to 10.0.2.2,10.0.2.3 --hairpin 10.0.2.0/24", "--hairpin takes a rule with one"),
            ("snat --to 10.0.2.2,10.0.2.3", "bad --to \"10.0.2.2,10.0.2.3\""),
            ("snat --to 10.0.2.2-10.0.2.3", "address ranges are not supported"),
        ] {
            let e = err(cmd);
            assert!(e.contains(want), "{cmd:?}: got {e:?}, want {want:?}");
        }
        // A hand-written state file gets the same checks.
        let mut bad = r.clone();
        bad.target = Target::Dnat { addr: ip("10.9.9.9"), port: Some(80) };
        assert!(bad.validate().unwrap_err().to_string().contains("the first being the target"));
        bad.backends.truncate(1);
        bad.target = Target::Dnat { addr: ip("10.0.2.2"), port: Some(80) };
        assert!(bad.validate().unwrap_err().to_string().contains("two or more"));
    }

    /// `--hairpin CIDR`: its spellings in the CLI and TOML, its checks, and the iptables import never producing it.
    #[test]
    fn hairpin_grammar() {
        let r = ok("dnat -p tcp -d 203.0.113.10 --dport 8080 --to 10.0.2.2:80 --hairpin 10.0.2.7/24");
        assert_eq!(r.hairpin, Some(net("10.0.2.0/24")), "host bits cleared");
        assert_eq!(r.to_string(), "dnat -p tcp -d 203.0.113.10 --dport 8080 --to 10.0.2.2:80 --hairpin 10.0.2.0/24");
        assert_eq!(p(&r.to_string()).unwrap(), r);
        let toml = "[[rule]]\nkind = \"dnat\"\nproto = \"tcp\"\ndst = \"203.0.113.10\"\ndport = 8080\n\
                    to = \"10.0.2.2:80\"\nhairpin = \"10.0.2.0/24\"\n";
        let one = std::slice::from_ref(&r);
        assert_eq!(parse_config(toml).unwrap(), one);
        assert!(to_config(one).ends_with("to = \"10.0.2.2:80\"\nhairpin = \"10.0.2.0/24\"\n"));
        assert_eq!(parse_config(&to_config(one)).unwrap(), one);
        // Old state files (no field) load, and a rule without it writes none.
        let plain = ok("dnat -p tcp -d 203.0.113.10 --dport 8080 --to 10.0.2.2:80");
        assert!(!serde_json::to_string(&plain).unwrap().contains("hairpin"));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"hairpin\":\"10.0.2.0/24\""), "{json}");
        assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), r);
        // Not a duplicate of the same rule without --hairpin.
        assert!(!r.same_match_and_target(&plain));
        assert_ne!(r.dedup_key(), plain.dedup_key());
        assert!(ok("dnat -s 10.0.0.0/8 -d 203.0.113.10 --to 10.0.2.2 --hairpin 10.0.2.0/24").hairpin.is_some());

        for (cmd, want) in [
            ("dnat -d 203.0.113.10 --to 10.0.2.2 --hairpin", "a value is required for '--hairpin"),
            ("dnat -d 203.0.113.10 --to 10.0.2.2 --hairpin 10.0.2.300/24", "bad CIDR \"10.0.2.300/24\""),
            ("dnat --to 10.0.2.2 --hairpin 10.0.2.0/24", "--hairpin needs -d, the public address"),
            ("dnat -d 0.0.0.0/0 --to 10.0.2.2 --hairpin 10.0.2.0/24", "--hairpin needs -d"),
            ("dnat -i eth0 -d 203.0.113.10 --to 10.0.2.2 --hairpin 10.0.2.0/24", "--hairpin does not go with -i"),
            ("dnat --local -d 203.0.113.10 --to 10.0.2.2 --hairpin 10.0.2.0/24", "does not apply to --local"),
            (
                "dnat -s 192.168.0.0/16 -d 203.0.113.10 --to 10.0.2.2 --hairpin 10.0.2.0/24",
                "--hairpin 10.0.2.0/24: -s 192.168.0.0/16 does not contain it",
            ),
            (
                "redirect -p tcp --to-port 80 --hairpin 10.0.2.0/24",
                "--hairpin applies to dnat rules only, not redirect",
            ),
            ("masquerade --hairpin 10.0.2.0/24", "--hairpin applies to dnat rules only, not masquerade"),
        ] {
            let e = err(cmd);
            assert!(e.contains(want), "{cmd:?}: got {e:?}, want {want:?}");
        }
        let e = parse_config("[[rule]]\nkind = \"dnat\"\nto = \"10.0.2.2\"\nhairpin = \"10.0.2.0/24\"\n").unwrap_err();
        assert!(e.to_string().contains("--hairpin needs -d"), "{e}");
        let e = parse_config("[[rule]]\nkind = \"snat\"\nto = \"1.2.3.4\"\nhairpin = \"10.0.2.0/24\"\n").unwrap_err();
        assert!(e.to_string().contains("field hairpin: hairpin applies to dnat rules only"), "{e}");
        // The iptables import cannot produce it: iptables has no such option.
        let line =
            "*nat\n-A PREROUTING -d 203.0.113.10/32 -j DNAT --to-destination 10.0.2.2 --hairpin 10.0.2.0/24\nCOMMIT\n";
        assert!(crate::iptables::import(line).is_err());
    }
}
