//! `pfwd add`'s rule options. They are built from the grammar's option table ([`FIELDS`]), so the CLI, the TOML
//! config and the iptables import share one list: clap parses the structure (the kind subcommand, every spelling,
//! `--help`), and hands the options, in the order and spelling they were written, to a [`RuleDraft`], which checks
//! and parses them like every other syntax.

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches, Parser, Subcommand};

use crate::rules::draft::{KIND_SPELLINGS, cli_field, cli_spelling, spec};
use crate::rules::{DraftError, FIELDS, Field, Kind, Rule, RuleDraft, RuleError, Syntax};

#[derive(Subcommand)]
pub(super) enum AddCmd {
    /// Rewrite the destination (iptables -t nat -A PREROUTING ... -j DNAT --to-destination ADDR[:PORT]).
    #[command(alias = "DNAT")]
    Dnat(RuleArgs<0>),
    /// Send to this machine, on the incoming interface's address (iptables ... -j REDIRECT --to-ports PORT).
    #[command(alias = "REDIRECT")]
    Redirect(RuleArgs<1>),
    /// Rewrite the source where packets leave through an attached interface (iptables -t nat -A POSTROUTING ...
    /// -j SNAT --to-source ADDR[:PORTS]).
    ///
    /// Matches packets by the interface they leave through (-o), protocol, source and destination; the first packet
    /// of each flow picks the translation, and replies are translated back automatically. The source port is kept
    /// when free, else a free one is taken from the range (1024-65535 without one).
    #[command(alias = "SNAT")]
    Snat(RuleArgs<2>),
    /// SNAT to the outgoing interface's current address, for dynamic addresses (iptables ... -j MASQUERADE).
    ///
    /// The address is the interface's primary IPv4 address when the flow starts; replies are translated back
    /// automatically. The source port is kept when free, else a free one is taken from --to-ports (1024-65535
    /// without it).
    #[command(alias = "MASQUERADE")]
    Masquerade(RuleArgs<3>),
}

impl AddCmd {
    /// The validated rule (id 0).
    pub(super) fn into_rule(self) -> Result<Rule, DraftError> {
        match self {
            AddCmd::Dnat(a) => a.draft()?.into_rule(),
            AddCmd::Redirect(a) => a.draft()?.into_rule(),
            AddCmd::Snat(a) => a.draft()?.into_rule(),
            AddCmd::Masquerade(a) => a.draft()?.into_rule(),
        }
    }
}

/// The options of one `pfwd add KIND` as given: `K` indexes [`Kind::ALL`].
pub(super) struct RuleArgs<const K: usize> {
    /// `(position, spelling, value)`; flags have an empty value.
    given: Vec<(usize, &'static str, String)>,
    /// Stray words: a value without its option, or a `!` not followed by an option (a `!` right before an option,
    /// iptables' `! -s NET`, becomes part of that option's value, `!NET`).
    extra: Vec<String>,
}

const EXTRA: &str = "extra";

impl<const K: usize> RuleArgs<K> {
    const KIND: Kind = Kind::ALL[K];

    fn draft(&self) -> Result<RuleDraft, DraftError> {
        if let Some(word) = self.extra.first() {
            return Err(if word == "!" {
                RuleError::Unsupported("a ! must come right before the -s, -d, -i or -o it negates".into())
            } else {
                RuleError::UnexpectedArgument(word.clone())
            }
            .into());
        }
        let mut draft = RuleDraft::new(Self::KIND, Syntax::Cli);
        for (_, spelling, value) in &self.given {
            let field = cli_field(spelling, Self::KIND).expect("clap only knows the table's spellings");
            draft.set(field, spelling, value)?;
        }
        Ok(draft)
    }
}

/// Every CLI spelling once (`--to-ports` is redirect's port and masquerade's range: one clap argument).
fn spellings() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = FIELDS.iter().flat_map(|s| s.cli.iter().copied()).collect();
    let mut seen = std::collections::HashSet::new();
    all.retain(|s| seen.insert(*s));
    all
}

impl<const K: usize> Args for RuleArgs<K> {
    fn augment_args(mut cmd: Command) -> Command {
        let kind = Self::KIND;
        for spelling in spellings() {
            let field = cli_field(spelling, kind).expect("a table spelling");
            let s = spec(field);
            // --help shows each option this kind takes once, by its first spelling; the rest are accepted (and
            // refused with a hint when they do not apply) but hidden.
            let shown = s.kinds.contains(&kind) && (s.cli[0] == spelling || spelling == "-6");
            let mut arg = Arg::new(spelling).hide(!shown);
            arg = match spelling.strip_prefix("--") {
                Some(long) => arg.long(long),
                None => arg.short(spelling.chars().nth(1).expect("-x")),
            };
            // --to means the new destination for dnat and the new source for snat.
            let mut help = match (field, kind) {
                (Field::To, Kind::Dnat) => {
                    "The new destination: ADDR keeps the port, ADDR:PORT also rewrites it (needs -p)."
                }
                (Field::To, Kind::Snat) => {
                    "The new source: ADDR, or ADDR:LO-HI to take source ports from that range when the original one is \
                     taken (ADDR:PORT for one port; needs -p)."
                }
                (Field::Family, _) if spelling == "-6" => crate::rules::draft::IPV6_HELP,
                _ => s.help,
            }
            .to_string();
            let also: Vec<&str> = s.cli[1..]
                .iter()
                .copied()
                .filter(|a| field != Field::Family || *a == if spelling == "-6" { "--ipv6" } else { "--ipv4" })
                .filter(|a| KIND_SPELLINGS.iter().all(|(sp, k)| sp != a || *k == kind))
                .collect();
            if !also.is_empty() {
                help.push_str(&format!(" (Also: {}.)", also.join(", ")));
            }
            arg = arg.help(help);
            arg = match s.value {
                None => arg.action(ArgAction::SetTrue),
                Some(_) if field == Field::To && kind == Kind::Snat => {
                    arg.action(ArgAction::Append).value_name("ADDR[:LO-HI]")
                }
                Some(v) => arg.action(ArgAction::Append).value_name(v),
            };
            cmd = cmd.arg(arg);
        }
        cmd.arg(Arg::new(EXTRA).action(ArgAction::Append).hide(true))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl<const K: usize> FromArgMatches for RuleArgs<K> {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut given = Vec::new();
        for spelling in spellings() {
            let spelling = cli_spelling(spelling).expect("a table spelling");
            if spec(cli_field(spelling, Self::KIND).expect("a table spelling")).value.is_none() {
                if m.get_flag(spelling) {
                    given.push((m.index_of(spelling).unwrap_or(0), spelling, String::new()));
                }
                continue;
            }
            if let (Some(at), Some(values)) = (m.indices_of(spelling), m.get_many::<String>(spelling)) {
                given.extend(at.zip(values).map(|(i, v)| (i, spelling, v.clone())));
            }
        }
        // In the order written, so "given twice" names the second one.
        given.sort_by_key(|(i, _, _)| *i);
        let mut extra = vec![];
        if let (Some(at), Some(words)) = (m.indices_of(EXTRA), m.get_many::<String>(EXTRA)) {
            for (i, word) in at.zip(words) {
                // iptables' `! -s NET`: the `!` negates the option written right after it (whose value is at i + 2).
                let next = given.iter_mut().find(|(j, s, v)| *j == i + 2 && !v.is_empty() && !s.is_empty());
                match next {
                    Some((_, _, value)) if word == "!" && !value.starts_with('!') => value.insert(0, '!'),
                    _ => extra.push(word.clone()),
                }
            }
        }
        Ok(RuleArgs { given, extra })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// `pfwd add ARGS...` through the real CLI parser and the grammar, as the `add` command does: the validated rule,
/// or the error pfwd would print. For tests and tools that spell rules the CLI way.
pub fn parse_rule(args: &[&str]) -> Result<Rule, String> {
    let argv = ["pfwd", "add"].into_iter().chain(args.iter().copied());
    match super::Cli::try_parse_from(argv).map_err(|e| e.to_string())?.cmd {
        super::Cmd::Add(add) => add.into_rule().map_err(|e| e.to_string()),
        _ => unreachable!("parsed as `pfwd add`"),
    }
}
