//! [`RuleError`]: everything that can be wrong with a rule, a rule set or a config file.

use pfwd_common::maps::{INDEX_ENTRIES, INDEX_SLOTS, MAX_BACKEND_RULES, MAX_CLASSES, MAX_RULES};

/// Everything that can be wrong with a rule, a rule set or a config file. Messages quote the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("bad CIDR {input:?}: {reason}")]
    BadCidr { input: String, reason: String },
    #[error("bad port {input:?}: {reason}")]
    BadPort { input: String, reason: String },
    #[error("bad port range {input:?}: {reason}")]
    BadPortRange { input: String, reason: String },
    #[error("bad protocol {input:?}: expected tcp or udp (omit -p to match every protocol)")]
    BadProto { input: String },
    #[error("bad interface name {input:?}: {reason}")]
    BadIface { input: String, reason: String },
    #[error("bad --to {input:?}: {reason}")]
    BadTo { input: String, reason: String },
    #[error("a rule translates one IP family, but {detail}: write one rule per family")]
    MixedFamilies { detail: String },
    #[error("IPv6 is not usable here (no IPv6 in the kernel, or no ip6tables), so this IPv6 rule cannot be applied")]
    NoIpv6Here,
    #[error("bad rule kind {input:?}: expected {KINDS}")]
    BadKind { input: String },
    #[error("unknown option {0:?}")]
    UnknownOption(String),
    #[error("unexpected argument {0:?}")]
    UnexpectedArgument(String),
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("{0} given twice")]
    Repeated(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("missing rule kind: expected {KINDS}")]
    MissingKind,
    #[error("{kind} needs {what}")]
    MissingTarget { kind: &'static str, what: String },
    #[error("{option} does not apply to {kind}; {hint}")]
    WrongTarget { option: String, kind: &'static str, hint: String },
    #[error("--dport needs -p tcp or -p udp (iptables rejects a port without a protocol)")]
    PortNeedsProto,
    #[error("redirect needs -p tcp or -p udp (it rewrites the destination port)")]
    RedirectNeedsProto,
    #[error(
        "--to with a port needs -p tcp or -p udp (iptables: \"Need TCP, UDP, SCTP or DCCP with port specification\")"
    )]
    ToPortNeedsProto,
    #[error("--to-ports needs -p tcp or -p udp (iptables: \"Need TCP, UDP, SCTP or DCCP with port specification\")")]
    ToPortsNeedsProto,
    #[error("duplicate of rule {of}")]
    Duplicate { of: u32 },
    #[error("no rule with id {0}")]
    NoSuchRule(u32),
    #[error("rule {id}: {error}")]
    InRule { id: u32, error: Box<RuleError> },
    #[error("interface {iface:?} (rule {id}, {option}) is not attached")]
    IfaceNotAttached { id: u32, iface: String, option: &'static str },
    #[error(
        "rules {ids} have the same matches apart from negations (`!`) and -d local, which they carry: at most {} \
         such rules may share them",
        INDEX_SLOTS
    )]
    IndexFull { ids: String },
    #[error("{0} rules; at most {MAX_RULES} are supported")]
    TooManyRules(usize),
    #[error(
        "{count} different match shapes in one hook (which of -i/-o and -p a rule has, and the prefix lengths of its \
         -s, -d and of the blocks its --dport range splits into); at most {MAX_CLASSES} are supported"
    )]
    TooManyClasses { count: usize },
    #[error("more than {MAX_BACKEND_RULES} rules with several backends")]
    TooManyBackendRules,
    #[error(
        "the rules need {count} index keys, more than the {INDEX_ENTRIES} the kernel's rule index holds (a rule takes \
         one, or one per prefix block of its --dport range: up to 30; `pfwd status` shows the count)"
    )]
    TooManyIndexKeys { count: usize },
    #[error("bad TOML: {0}")]
    Toml(String),
    #[error("{0}")]
    Invalid(String),
    #[error("duplicate of [[rule]] #{0} (same match and target)")]
    DuplicateInFile(usize),
    #[error("id {id} is already used by [[rule]] #{index}")]
    DuplicateId { id: u32, index: usize },
    /// An error in the config file: `index` is the 1-based position of the `[[rule]]`.
    #[error("[[rule]] #{index}{}: {error}", field_label(.field))]
    Config { index: usize, field: Option<&'static str>, error: Box<RuleError> },
}

pub(super) const KINDS: &str = "\"dnat\", \"redirect\", \"snat\" or \"masquerade\"";

fn field_label(field: &Option<&'static str>) -> String {
    field.map(|f| format!(", field {f}")).unwrap_or_default()
}
