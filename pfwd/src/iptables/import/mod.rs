//! The iptables import: what iptables users already have (`iptables-save` dumps and
//! `iptables -t nat -A PREROUTING|POSTROUTING|OUTPUT ...` command lines) as pfwd rules.
//!
//! [`import_onto`] also applies a script's nat deletions (`-D CHAIN N`, `-D CHAIN <rule>`, `-F [CHAIN]`, `-X`), in
//! order, to the running instance's rules and the script's own, and says line by line what each did.
//!
//! [`import`] is all or nothing: the first line pfwd cannot represent faithfully aborts with an [`ImportError`]
//! naming the line and the offending token. `-m multiport --dports a,b,c` is expanded into one rule per port or
//! range. Rules that are fine but behave differently under pfwd's precedence are reported as warnings.
//!
//! A line goes through four stages, one file each: `lex` (logical lines, shell-like words, fake dashes), `command`
//! (table, command and chain, found anywhere in the line as iptables' getopt does), `spec` (the rule options, and
//! `build_rules`, which turns them into pfwd rules) and `importer` (the chains' order, pfwd's own bookkeeping
//! lines, duplicates and precedence warnings).

mod command;
mod importer;
mod lex;
mod spec;

pub use importer::{import, import_onto};

use crate::rules::Rule;

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

/// A successful import: the rules to add (id 0, validated, normalized) in iptables' first-match order, the existing
/// rules to remove, and notes about lines that were skipped, deleted or flushed, or will behave differently under pfwd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Import {
    /// Rules the text adds and does not delete again further down.
    pub rules: Vec<Rule>,
    pub warnings: Vec<String>,
    /// Ids of the existing rules ([`import_onto`]) the text deletes or flushes: sorted, each once.
    pub removed: Vec<u32>,
    /// One line per input line that deleted, flushed or did nothing with a note, in input order, e.g.
    /// `line 4: -D PREROUTING 2: deletes rule 7 (dnat -p tcp --dport 80 --to 10.0.2.2)`.
    pub actions: Vec<String>,
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
