//! Forwarding rules: the data model, the CLI and TOML syntaxes, precedence, and compilation into the BPF map layout.
//!
//! A rule is what a user would write as `iptables -t nat -A PREROUTING ... -j DNAT/REDIRECT` (a PREROUTING rule,
//! matched where packets arrive) or `iptables -t nat -A POSTROUTING ... -j SNAT/MASQUERADE` (a POSTROUTING rule,
//! matched where packets leave), restricted to what the kernel program can match: optional interface (incoming `-i`
//! for PREROUTING, outgoing `-o` for POSTROUTING), protocol (tcp/udp), source and destination prefixes and, for
//! PREROUTING, a destination port range. The same [`Rule`] is produced by the CLI ([`parse_args`]), the config file
//! ([`parse_config`]) and the JSON state file (serde), so all three agree on validation.
//!
//! # Precedence
//!
//! This is the contract shared by the kernel data path ([`compile`]) and the iptables export ([`precedence_order`]):
//! when several rules match a packet, **the most specific rule wins**. Two rules are compared field by field and the
//! first difference decides:
//!
//! 1. a rule with `--dport` beats one without; between two, the narrower range (fewer ports) wins;
//! 2. a rule with `-p` beats one without;
//! 3. a rule with `-i` (PREROUTING) or `-o` (POSTROUTING) beats one without;
//! 4. the longer source prefix wins (no `-s` counts as `/0`);
//! 5. the longer destination prefix wins (no `-d` counts as `/0`);
//! 6. the older rule (lower id) wins; rules with equal ids (e.g. 0, not yet assigned) keep their list order.
//!
//! The rank of a rule is its position in that order. The kernel picks the matching rule with the lowest rank; the
//! iptables export emits rules in the same order, so iptables' first match is the same rule. PREROUTING and
//! POSTROUTING rules share one order but never compete: each hook only looks at its own rules.
//!
//! Two rules with the same match and the same target are duplicates and are rejected. Two rules with the same match
//! but different targets are allowed: rule 6 above makes the older one win and the newer one is shadowed (never used
//! until the older one is removed), just like appending a second identical match in iptables.

use std::cmp::{Ordering, Reverse};
use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use pfwd_common::maps::{
    BUCKET_SLOTS, Bucket, BucketKey, MAX_BUCKETS, MAX_RULES, PROTO_ANY, PROTO_TCP, PROTO_UDP, RuleEntry, hook, kind,
    level,
};
use serde::{Deserialize, Serialize};

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
    MissingTarget { kind: &'static str, what: &'static str },
    #[error("{option} does not apply to {kind}; {hint}")]
    WrongTarget { option: String, kind: &'static str, hint: &'static str },
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
    #[error("interface {iface:?} (rule {id}) is not attached")]
    IfaceNotAttached { id: u32, iface: String },
    #[error(
        "too many rules share interface {iface}, protocol {proto}, port {port} (rules {ids}): at most {} rules may share one",
        BUCKET_SLOTS
    )]
    BucketFull { iface: String, proto: String, port: String, ids: String },
    #[error("{0} rules; at most {MAX_RULES} are supported")]
    TooManyRules(usize),
    #[error("more than {MAX_BUCKETS} (interface, protocol, port) combinations; each port of a --dport range uses one")]
    TooManyBuckets,
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

const KINDS: &str = "\"dnat\", \"redirect\", \"snat\" or \"masquerade\"";

fn field_label(field: &Option<&'static str>) -> String {
    field.map(|f| format!(", field {f}")).unwrap_or_default()
}

/// Transport protocol a rule matches. Absent (`None` in [`Rule`]) means every protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IP protocol number, as stored in [`RuleEntry::proto`] and [`BucketKey::proto`].
    pub fn code(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = RuleError;
    /// Case-insensitive like iptables, and the protocol numbers are accepted too.
    fn from_str(s: &str) -> Result<Self, RuleError> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" | "6" => Ok(Proto::Tcp),
            "udp" | "17" => Ok(Proto::Udp),
            _ => Err(RuleError::BadProto { input: s.to_string() }),
        }
    }
}

/// `-p` value: like iptables, `all` means "no protocol filter".
fn parse_proto_opt(s: &str) -> Result<Option<Proto>, RuleError> {
    if s.eq_ignore_ascii_case("all") { Ok(None) } else { s.parse().map(Some) }
}

/// A destination port range, inclusive. A single port has `lo == hi`. Port 0 is never valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        PortRange { lo: port, hi: port }
    }

    /// Number of ports minus one; the precedence key (narrower is more specific).
    pub fn width(&self) -> u16 {
        self.hi.saturating_sub(self.lo)
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    fn check(&self) -> Result<(), RuleError> {
        if self.lo == 0 || self.lo > self.hi {
            return Err(RuleError::BadPortRange {
                input: self.to_string(),
                reason: "expected 1-65535 with low <= high".into(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi { write!(f, "{}", self.lo) } else { write!(f, "{}-{}", self.lo, self.hi) }
    }
}

/// Parses a port number 1-65535; returns the reason on failure so callers can name their own input.
fn port_number(s: &str) -> Result<u16, &'static str> {
    // `u16::from_str` accepts a leading '+', which iptables does not.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected a port number 1-65535");
    }
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 is not allowed (1-65535)"),
        Ok(p) => Ok(p),
        Err(_) => Err("out of range (1-65535)"),
    }
}

/// Parses a single port 1-65535 (`--to-port`, the port in `--to`).
pub fn parse_port(s: &str) -> Result<u16, RuleError> {
    port_number(s).map_err(|r| RuleError::BadPort { input: s.to_string(), reason: r.to_string() })
}

impl FromStr for PortRange {
    type Err = RuleError;
    /// `80`, `8000-8099`, or iptables' `8000:8099`.
    fn from_str(s: &str) -> Result<Self, RuleError> {
        let bad = |reason: &str| RuleError::BadPortRange { input: s.to_string(), reason: reason.to_string() };
        let (lo, hi) = match s.split_once(['-', ':']) {
            Some((lo, hi)) => (port_number(lo).map_err(bad)?, port_number(hi).map_err(bad)?),
            None => {
                let p = port_number(s).map_err(bad)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(bad("the low port is above the high port"));
        }
        Ok(PortRange { lo, hi })
    }
}

// The state file stores ranges in the same text form the CLI uses; an integer is accepted for a single port.
impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port or port range such as \"80\" or \"8000-8099\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortRange, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortRange, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortRange, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

/// What happens to a matching packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    /// `-j DNAT --to-destination ADDR[:PORT]`; `port: None` keeps the original destination port.
    Dnat { addr: Ipv4Addr, port: Option<u16> },
    /// `-j REDIRECT --to-ports PORT`: to the incoming interface's primary address.
    Redirect { port: u16 },
    /// `-j SNAT --to-source ADDR[:LO-HI]`: the source becomes `addr`; the source port is kept when free, else taken
    /// from `ports` (`None`: from 1024-65535).
    Snat { addr: Ipv4Addr, ports: Option<PortRange> },
    /// `-j MASQUERADE [--to-ports LO-HI]`: SNAT to the outgoing interface's current primary address.
    Masquerade { ports: Option<PortRange> },
}

impl Target {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Target::Dnat { .. } => "dnat",
            Target::Redirect { .. } => "redirect",
            Target::Snat { .. } => "snat",
            Target::Masquerade { .. } => "masquerade",
        }
    }

    /// SNAT and MASQUERADE rewrite the source where packets leave (iptables POSTROUTING); DNAT and REDIRECT the
    /// destination where they arrive (PREROUTING).
    pub fn is_postrouting(&self) -> bool {
        matches!(self, Target::Snat { .. } | Target::Masquerade { .. })
    }
}

/// The target in CLI syntax: `--to ADDR[:PORT]`, `--to-port PORT`, `--to ADDR[:LO-HI]`, `[--to-ports LO-HI]`
/// (empty for a masquerade without ports).
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Dnat { addr, port: Some(p) } => write!(f, "--to {addr}:{p}"),
            Target::Dnat { addr, port: None } => write!(f, "--to {addr}"),
            Target::Redirect { port } => write!(f, "--to-port {port}"),
            Target::Snat { addr, ports: Some(r) } => write!(f, "--to {addr}:{r}"),
            Target::Snat { addr, ports: None } => write!(f, "--to {addr}"),
            Target::Masquerade { ports: Some(r) } => write!(f, "--to-ports {r}"),
            Target::Masquerade { ports: None } => Ok(()),
        }
    }
}

/// One forwarding rule. Absent match fields match everything. Prefixes are kept normalized (host bits cleared).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// User-facing id (`pfwd list`); 0 means not yet assigned.
    #[serde(default)]
    pub id: u32,
    /// Incoming interface (`-i`); PREROUTING rules only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iface: Option<String>,
    /// Outgoing interface (`-o`); POSTROUTING rules only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<Proto>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<PortRange>,
    /// `--local`: applies to connections made by local processes (iptables OUTPUT) instead of arriving packets.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    pub target: Target,
}

/// See [`Rule::dedup_key`]: interfaces, protocol, (network, mask) of source and destination, ports, `--local`, target.
pub type DedupKey =
    (Option<String>, Option<String>, Option<Proto>, (u32, u32), (u32, u32), Option<PortRange>, bool, Target);

/// `(network, mask)` in host order; an absent prefix is `0/0`, so `None` and `0.0.0.0/0` behave the same.
fn net_mask(n: Option<Ipv4Net>) -> (u32, u32) {
    match n {
        Some(n) => {
            let mask = u32::from(n.netmask());
            (u32::from(n.addr()) & mask, mask)
        }
        None => (0, 0),
    }
}

fn prefix_len(n: Option<Ipv4Net>) -> u8 {
    n.map_or(0, |n| n.prefix_len())
}

impl Rule {
    /// Clears host bits of the prefixes (iptables accepts `192.168.1.5/24` and means `192.168.1.0/24`).
    pub fn normalize(&mut self) {
        self.src = self.src.map(|n| n.trunc());
        self.dst = self.dst.map(|n| n.trunc());
    }

    pub fn kind_name(&self) -> &'static str {
        self.target.kind_name()
    }

    /// A SNAT/MASQUERADE rule (matched at egress, iptables POSTROUTING) rather than DNAT/REDIRECT (PREROUTING).
    pub fn is_postrouting(&self) -> bool {
        self.target.is_postrouting()
    }

    /// The interface the rule is tied to: the incoming one for PREROUTING rules, the outgoing one for POSTROUTING.
    pub fn hook_iface(&self) -> Option<&str> {
        if self.is_postrouting() { self.oface.as_deref() } else { self.iface.as_deref() }
    }

    /// Checks the combinations iptables rejects, and field values a hand-written state file could get wrong.
    pub fn validate(&self) -> Result<(), RuleError> {
        if let Some(i) = &self.iface {
            validate_iface(i)?;
        }
        if let Some(o) = &self.oface {
            validate_iface(o)?;
        }
        let post = self.is_postrouting();
        if post && self.iface.is_some() {
            return Err(wrong_hook(&self.target, "-i"));
        }
        if post && self.dport.is_some() {
            return Err(wrong_hook(&self.target, "--dport"));
        }
        if !post && self.oface.is_some() {
            return Err(wrong_hook(&self.target, "-o"));
        }
        if self.local {
            if post {
                return Err(RuleError::Unsupported(format!(
                    "--local applies to dnat and redirect (locally generated connections), not {}",
                    self.kind_name()
                )));
            }
            if self.iface.is_some() {
                return Err(RuleError::Unsupported(
                    "-i does not apply to --local rules: local connections do not arrive on an interface".into(),
                ));
            }
            if self.src.is_some() {
                return Err(RuleError::Unsupported(
                    "-s is not supported with --local: a local connection's source is chosen after it is translated"
                        .into(),
                ));
            }
        }
        if let Some(p) = &self.dport {
            p.check()?;
            if self.proto.is_none() {
                return Err(RuleError::PortNeedsProto);
            }
        }
        match self.target {
            Target::Redirect { port } => {
                if port == 0 {
                    return Err(RuleError::BadPort {
                        input: "0".into(),
                        reason: "port 0 is not allowed (1-65535)".into(),
                    });
                }
                if self.proto.is_none() {
                    return Err(RuleError::RedirectNeedsProto);
                }
            }
            Target::Dnat { addr, port } => {
                check_to_addr(addr)
                    .map_err(|r| RuleError::BadTo { input: self.target.to_string(), reason: r.into() })?;
                if port == Some(0) {
                    return Err(RuleError::BadTo {
                        input: self.target.to_string(),
                        reason: "port 0 is not allowed (1-65535)".into(),
                    });
                }
                if port.is_some() && self.proto.is_none() {
                    return Err(RuleError::ToPortNeedsProto);
                }
            }
            Target::Snat { addr, ports } => {
                check_to_addr(addr)
                    .map_err(|r| RuleError::BadTo { input: self.target.to_string(), reason: r.into() })?;
                if let Some(r) = ports {
                    r.check()?;
                    if self.proto.is_none() {
                        return Err(RuleError::ToPortNeedsProto);
                    }
                }
            }
            Target::Masquerade { ports } => {
                if let Some(r) = ports {
                    r.check()?;
                    if self.proto.is_none() {
                        return Err(RuleError::ToPortsNeedsProto);
                    }
                }
            }
        }
        Ok(())
    }

    /// A key equal for two rules exactly when [`Rule::same_match_and_target`] holds, so duplicates among many
    /// rules are found with a hash set instead of comparing every pair.
    pub fn dedup_key(&self) -> DedupKey {
        (
            self.iface.clone(),
            self.oface.clone(),
            self.proto,
            net_mask(self.src),
            net_mask(self.dst),
            self.dport,
            self.local,
            self.target,
        )
    }

    /// True when both rules match the same packets and do the same thing (ids are ignored). Such a pair is a
    /// duplicate. Same match with a different target is not a duplicate: precedence picks the older rule.
    pub fn same_match_and_target(&self, other: &Rule) -> bool {
        self.iface == other.iface
            && self.oface == other.oface
            && self.proto == other.proto
            && net_mask(self.src) == net_mask(other.src)
            && net_mask(self.dst) == net_mask(other.dst)
            && self.dport == other.dport
            && self.local == other.local
            && self.target == other.target
    }
}

/// Order of two rules under the precedence contract (see the module docs): `Less` means `a` wins over `b`.
/// Equal for rules that differ only in their position in the list (then list order decides).
pub fn precedence_cmp(a: &Rule, b: &Rule) -> Ordering {
    precedence_key(a).cmp(&precedence_key(b))
}

type PrecedenceKey = (bool, u16, bool, bool, Reverse<u8>, Reverse<u8>, u32);

fn precedence_key(r: &Rule) -> PrecedenceKey {
    (
        r.dport.is_none(),
        r.dport.map_or(0, |p| p.width()),
        r.proto.is_none(),
        // `-o` ranks like `-i`: a rule only ever has the one of its hook.
        r.hook_iface().is_none(),
        Reverse(prefix_len(r.src)),
        Reverse(prefix_len(r.dst)),
        r.id,
    )
}

/// Indices into `rules`, most specific first (see the module docs). The iptables export emits rules in this order so
/// that its first match is pfwd's choice; a rule's rank in the kernel is its position here.
pub fn precedence_order(rules: &[Rule]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rules.len()).collect();
    // Stable sort: equal keys keep list order, which is the documented final tie-break.
    order.sort_by_cached_key(|&i| precedence_key(&rules[i]));
    order
}

/// The error for `-i`/`--dport` on a SNAT/MASQUERADE rule or `-o` on a DNAT/REDIRECT one (`option` as written, or
/// the TOML field). iptables refuses `-i` in POSTROUTING and `-o` in PREROUTING; pfwd's POSTROUTING rules have no
/// port level.
fn wrong_hook(target: &Target, option: &str) -> RuleError {
    let hint = match (target, option) {
        (Target::Snat { .. }, "iface") => "SNAT happens where packets leave: use oface",
        (Target::Masquerade { .. }, "iface") => "MASQUERADE happens where packets leave: use oface",
        (Target::Snat { .. }, "-i" | "--in-interface") => "SNAT happens where packets leave: use -o",
        (Target::Masquerade { .. }, "-i" | "--in-interface") => "MASQUERADE happens where packets leave: use -o",
        (Target::Snat { .. } | Target::Masquerade { .. }, _) => {
            "snat and masquerade rules match -o, -p, -s and -d (the source port is what they rewrite)"
        }
        (Target::Dnat { .. }, "oface") => "DNAT happens where packets arrive: use iface",
        (Target::Redirect { .. }, "oface") => "REDIRECT happens where packets arrive: use iface",
        (Target::Dnat { .. }, _) => "DNAT happens where packets arrive: use -i",
        (Target::Redirect { .. }, _) => "REDIRECT happens where packets arrive: use -i",
    };
    RuleError::WrongTarget { option: option.to_string(), kind: target.kind_name(), hint }
}

/// Checks an interface name the way the kernel does (`dev_valid_name`); whether it exists is checked at attach time.
pub fn validate_iface(name: &str) -> Result<(), RuleError> {
    let bad = |reason: &str| RuleError::BadIface { input: name.to_string(), reason: reason.to_string() };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() >= 16 {
        return Err(bad("longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(bad("not a valid name"));
    }
    if name.contains(['/', ':']) || name.chars().any(char::is_whitespace) {
        return Err(bad("must not contain '/', ':' or whitespace"));
    }
    // iptables' `eth+` means every eth*; the data path matches one ifindex, so say so instead of matching nothing.
    if name.ends_with('+') {
        return Err(bad("interface wildcards (eth+) are not supported; add one rule per interface"));
    }
    Ok(())
}

fn parse_ipv4(s: &str) -> Result<Ipv4Addr, &'static str> {
    s.parse().map_err(|_| "not an IPv4 address (expected A.B.C.D; names are not resolved)")
}

fn check_to_addr(addr: Ipv4Addr) -> Result<(), &'static str> {
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
        return Err("not a unicast address");
    }
    Ok(())
}

/// `-s`/`-d` value: `A.B.C.D` (= /32), `A.B.C.D/LEN` or `A.B.C.D/M.M.M.M`. Host bits are cleared like iptables does.
pub fn parse_cidr(s: &str) -> Result<Ipv4Net, RuleError> {
    let bad = |reason: &str| RuleError::BadCidr { input: s.to_string(), reason: reason.to_string() };
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr = parse_ipv4(addr).map_err(bad)?;
    let len = match len {
        None => 32,
        Some(l) if l.contains('.') => {
            let m = u32::from(parse_ipv4(l).map_err(|_| bad("bad netmask"))?);
            // Only contiguous masks can be expressed as a prefix (and matched by the kernel's mask-and-compare).
            if m.leading_ones() + m.trailing_zeros() != 32 {
                return Err(bad("netmask is not contiguous"));
            }
            m.leading_ones() as u8
        }
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= 32 && l.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(bad("prefix length must be 0-32")),
        },
    };
    Ok(Ipv4Net::new(addr, len).map_err(|_| bad("prefix length must be 0-32"))?.trunc())
}

/// DNAT `--to` value: `ADDR` (keep the port) or `ADDR:PORT`.
pub fn parse_to(s: &str) -> Result<(Ipv4Addr, Option<u16>), RuleError> {
    let bad = |reason: &str| RuleError::BadTo { input: s.to_string(), reason: reason.to_string() };
    let (addr, port) = match s.split_once(':') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    // iptables takes `ADDR-ADDR` and `:PORT-PORT` for load spreading; pfwd translates to exactly one destination.
    if addr.contains('-') {
        return Err(bad("address ranges are not supported"));
    }
    let addr = parse_ipv4(addr).map_err(bad)?;
    check_to_addr(addr).map_err(bad)?;
    let port = match port {
        None => None,
        Some(p) if p.contains('-') => return Err(bad("port ranges are not supported")),
        Some(p) => Some(port_number(p).map_err(bad)?),
    };
    Ok((addr, port))
}

/// SNAT `--to` value: `ADDR`, `ADDR:PORT` or `ADDR:LO-HI`, the ports being the range new source ports come from.
pub fn parse_snat_to(s: &str) -> Result<(Ipv4Addr, Option<PortRange>), RuleError> {
    let bad = |reason: &str| RuleError::BadTo { input: s.to_string(), reason: reason.to_string() };
    let (addr, ports) = match s.split_once(':') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    // iptables spreads over `ADDR-ADDR`; pfwd's kernel side allocates ports for one address.
    if addr.contains('-') {
        return Err(bad("address ranges are not supported"));
    }
    let addr = parse_ipv4(addr).map_err(bad)?;
    check_to_addr(addr).map_err(bad)?;
    let ports = match ports {
        None => None,
        Some(p) => {
            let (lo, hi) = p.split_once('-').unwrap_or((p, p));
            let (lo, hi) = (port_number(lo).map_err(bad)?, port_number(hi).map_err(bad)?);
            if lo > hi {
                return Err(bad("the low port is above the high port"));
            }
            Some(PortRange { lo, hi })
        }
    };
    Ok((addr, ports))
}

fn fmt_net(n: &Ipv4Net) -> String {
    let n = n.trunc();
    if n.prefix_len() == 32 { n.addr().to_string() } else { n.to_string() }
}

/// The rule in pfwd CLI syntax (without the id), e.g.
/// `dnat -i eth0 -p tcp -s 192.168.1.0/24 --dport 59999 --to 127.0.0.1:17355` or
/// `snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099`. [`parse_args`] reads it back.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind_name())?;
        if self.local {
            f.write_str(" --local")?;
        }
        if let Some(i) = &self.iface {
            write!(f, " -i {i}")?;
        }
        if let Some(o) = &self.oface {
            write!(f, " -o {o}")?;
        }
        if let Some(p) = self.proto {
            write!(f, " -p {p}")?;
        }
        if let Some(s) = &self.src {
            write!(f, " -s {}", fmt_net(s))?;
        }
        if let Some(d) = &self.dst {
            write!(f, " -d {}", fmt_net(d))?;
        }
        if let Some(p) = self.dport {
            write!(f, " --dport {p}")?;
        }
        match self.target {
            Target::Masquerade { ports: None } => Ok(()),
            t => write!(f, " {t}"),
        }
    }
}

/// Parses the CLI syntax: `dnat|redirect [-i IF] [-p tcp|udp] [-s NET] [-d NET] [--dport P[-P]]` followed by
/// `--to ADDR[:PORT]` (dnat) or `--to-port PORT` (redirect), or `snat|masquerade [-o IF] [-p tcp|udp] [-s NET]
/// [-d NET]` followed by `--to ADDR[:LO-HI]` (snat) or an optional `--to-ports LO-HI` (masquerade). iptables' long
/// option names and `--opt=value` work too. The result is validated and has id 0.
pub fn parse_args(args: &[&str]) -> Result<Rule, RuleError> {
    let (&kind, rest) = args.split_first().ok_or(RuleError::MissingKind)?;
    // A placeholder target of the right kind, so hook and option checks can name it; replaced below.
    let placeholder = Ipv4Addr::UNSPECIFIED;
    let mut target = match kind {
        "dnat" | "DNAT" => Target::Dnat { addr: placeholder, port: None },
        "redirect" | "REDIRECT" => Target::Redirect { port: 0 },
        "snat" | "SNAT" => Target::Snat { addr: placeholder, ports: None },
        "masquerade" | "MASQUERADE" => Target::Masquerade { ports: None },
        _ => {
            return Err(RuleError::BadKind { input: kind.to_string() });
        }
    };
    let kind_name = target.kind_name();
    let mut rule = Rule {
        id: 0,
        iface: None,
        oface: None,
        proto: None,
        src: None,
        dst: None,
        dport: None,
        local: false,
        target: Target::Redirect { port: 0 },
    };
    // Each option may appear once; `seen` holds the canonical names given so far.
    let mut seen: Vec<&'static str> = Vec::new();
    let mut to_given = false;
    let mut it = rest.iter();
    while let Some(&arg) = it.next() {
        if arg == "!" || arg.starts_with('!') {
            return Err(RuleError::Unsupported("negation (!) is not supported".into()));
        }
        if arg == "--local" {
            if rule.local {
                return Err(RuleError::Repeated(arg.to_string()));
            }
            rule.local = true;
            continue;
        }
        let (opt, inline) = match arg.split_once('=') {
            Some((o, v)) if o.starts_with("--") => (o, Some(v)),
            _ => (arg, None),
        };
        let canon = match opt {
            "-i" | "--in-interface" => "-i",
            "-o" | "--out-interface" => "-o",
            "-p" | "--protocol" => "-p",
            "-s" | "--source" | "--src" => "-s",
            "-d" | "--destination" | "--dst" => "-d",
            "--dport" | "--destination-port" => "--dport",
            "--to" | "--to-destination" | "--to-source" => "--to",
            "--to-port" | "--to-ports" => "--to-port",
            _ if opt.starts_with('-') => return Err(RuleError::UnknownOption(opt.to_string())),
            _ => return Err(RuleError::UnexpectedArgument(arg.to_string())),
        };
        let value = match inline {
            Some(v) => v,
            None => match it.next() {
                Some(&v) => v,
                None => return Err(RuleError::MissingValue(opt.to_string())),
            },
        };
        if value.starts_with('!') {
            return Err(RuleError::Unsupported("negation (!) is not supported".into()));
        }
        if seen.contains(&canon) {
            return Err(RuleError::Repeated(opt.to_string()));
        }
        seen.push(canon);
        let wrong = |hint| RuleError::WrongTarget { option: opt.to_string(), kind: kind_name, hint };
        match (canon, &mut target) {
            // Caught here rather than by validate() so the error names the option as written.
            ("-i" | "--dport", Target::Snat { .. } | Target::Masquerade { .. }) => {
                return Err(wrong_hook(&target, opt));
            }
            ("-o", Target::Dnat { .. } | Target::Redirect { .. }) => return Err(wrong_hook(&target, opt)),
            ("-i", _) => {
                validate_iface(value)?;
                rule.iface = Some(value.to_string());
            }
            ("-o", _) => {
                validate_iface(value)?;
                rule.oface = Some(value.to_string());
            }
            ("-p", _) => rule.proto = parse_proto_opt(value)?,
            ("-s", _) => rule.src = Some(parse_cidr(value)?),
            ("-d", _) => rule.dst = Some(parse_cidr(value)?),
            ("--dport", _) => rule.dport = Some(value.parse()?),
            ("--to", Target::Dnat { .. }) if opt == "--to-source" => {
                return Err(wrong("dnat takes --to ADDR[:PORT] (--to-destination)"));
            }
            ("--to", Target::Snat { .. }) if opt == "--to-destination" => {
                return Err(wrong("snat takes --to ADDR[:LO-HI] (--to-source)"));
            }
            ("--to", Target::Dnat { addr, port }) => {
                (*addr, *port) = parse_to(value)?;
                to_given = true;
            }
            ("--to", Target::Snat { addr, ports }) => {
                (*addr, *ports) = parse_snat_to(value)?;
                to_given = true;
            }
            ("--to", Target::Redirect { .. }) => return Err(wrong("redirect takes --to-port PORT")),
            ("--to", Target::Masquerade { .. }) => {
                return Err(wrong("masquerade uses the outgoing interface's address; ports: --to-ports LO-HI"));
            }
            (_, Target::Redirect { port }) => {
                if value.contains(['-', ':']) {
                    return Err(RuleError::BadPort {
                        input: value.into(),
                        reason: "port ranges are not supported".into(),
                    });
                }
                *port = parse_port(value)?;
                to_given = true;
            }
            (_, Target::Masquerade { ports }) => *ports = Some(value.parse()?),
            (_, Target::Dnat { .. }) => return Err(wrong("dnat takes --to ADDR[:PORT]")),
            (_, Target::Snat { .. }) => return Err(wrong("snat takes --to ADDR[:LO-HI]")),
        }
    }
    if !to_given {
        match target {
            Target::Dnat { .. } => return Err(RuleError::MissingTarget { kind: "dnat", what: "--to ADDR[:PORT]" }),
            Target::Redirect { .. } => {
                return Err(RuleError::MissingTarget { kind: "redirect", what: "--to-port PORT" });
            }
            Target::Snat { .. } => return Err(RuleError::MissingTarget { kind: "snat", what: "--to ADDR[:LO-HI]" }),
            // The address is the interface's and the port is kept when free: nothing is required.
            Target::Masquerade { .. } => {}
        }
    }
    rule.target = target;
    rule.validate()?;
    Ok(rule)
}

/// Rejects `new` if it duplicates one of `existing` (used when adding a rule); the error names the existing id.
pub fn check_duplicate(existing: &[Rule], new: &Rule) -> Result<(), RuleError> {
    match existing.iter().find(|r| r.same_match_and_target(new)) {
        Some(r) => Err(RuleError::Duplicate { of: r.id }),
        None => Ok(()),
    }
}

/// The next free id: one above the highest in use, so ids are never reused while their rule exists.
pub fn next_id(rules: &[Rule]) -> u32 {
    rules.iter().map(|r| r.id).max().unwrap_or(0).saturating_add(1)
}

/// Removes and returns the rule with `id`.
pub fn remove_by_id(rules: &mut Vec<Rule>, id: u32) -> Result<Rule, RuleError> {
    match rules.iter().position(|r| r.id == id) {
        Some(i) => Ok(rules.remove(i)),
        None => Err(RuleError::NoSuchRule(id)),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// TOML config
// ---------------------------------------------------------------------------------------------------------------

const CONFIG_FIELDS: &[&str] =
    &["id", "kind", "local", "iface", "oface", "proto", "src", "dst", "dport", "to", "to_port", "to_ports"];

/// Parses a config file of `[[rule]]` tables (fields: `kind`, `iface` (dnat, redirect), `oface` (snat, masquerade),
/// `proto`, `src`, `dst`, `dport` (dnat, redirect), `to` for dnat (`ADDR[:PORT]`) and snat (`ADDR[:LO-HI]`),
/// `to_port` for redirect, `to_ports` for masquerade, and an optional `id`). Every rule is validated; duplicates and
/// repeated ids are rejected. Errors name the 1-based `[[rule]]` position and the field.
pub fn parse_config(text: &str) -> Result<Vec<Rule>, RuleError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| RuleError::Toml(e.to_string()))?;
    let mut rules = Vec::new();
    for (key, value) in &table {
        if key != "rule" {
            return Err(RuleError::Toml(format!("unknown top-level key {key:?}; rules go in [[rule]] tables")));
        }
        let Some(array) = value.as_array() else {
            return Err(RuleError::Toml("`rule` must be an array of tables ([[rule]])".into()));
        };
        for (i, item) in array.iter().enumerate() {
            let index = i + 1;
            let Some(t) = item.as_table() else {
                return Err(RuleError::Toml(format!("[[rule]] #{index} is not a table")));
            };
            rules.push(rule_from_table(t).map_err(|(field, e)| RuleError::Config {
                index,
                field,
                error: Box::new(e),
            })?);
        }
    }
    // Hash maps from key to first position, so a 10,000-rule file is checked in linear time.
    let (mut by_key, mut by_id) = (HashMap::new(), HashMap::new());
    for (i, r) in rules.iter().enumerate() {
        let in_rule = |field, error| RuleError::Config { index: i + 1, field, error: Box::new(error) };
        if let Some(j) = by_key.insert(r.dedup_key(), i) {
            return Err(in_rule(None, RuleError::DuplicateInFile(j + 1)));
        }
        if r.id != 0
            && let Some(j) = by_id.insert(r.id, i)
        {
            return Err(in_rule(Some("id"), RuleError::DuplicateId { id: r.id, index: j + 1 }));
        }
    }
    Ok(rules)
}

type FieldError = (Option<&'static str>, RuleError);

fn rule_from_table(t: &toml::Table) -> Result<Rule, FieldError> {
    if let Some(k) = t.keys().find(|k| !CONFIG_FIELDS.contains(&k.as_str())) {
        let msg = format!("unknown field {k:?}; expected one of {}", CONFIG_FIELDS.join(", "));
        return Err((None, RuleError::Invalid(msg)));
    }
    // Wraps a value error with the field it came from.
    fn at<T>(field: &'static str, r: Result<T, RuleError>) -> Result<T, FieldError> {
        r.map_err(|e| (Some(field), e))
    }
    let string = |field: &'static str| -> Result<Option<&str>, FieldError> {
        match t.get(field) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err((Some(field), RuleError::Invalid(format!("expected a string, got {}", v.type_str())))),
        }
    };
    // Ports may be written as integers or strings; integers are range-checked by the same parser as strings.
    let number_or_string = |field: &'static str| -> Result<Option<String>, FieldError> {
        match t.get(field) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(toml::Value::Integer(n)) => Ok(Some(n.to_string())),
            Some(v) => {
                Err((Some(field), RuleError::Invalid(format!("expected a number or string, got {}", v.type_str()))))
            }
        }
    };

    let id = match t.get("id") {
        None => 0,
        Some(toml::Value::Integer(n)) => {
            u32::try_from(*n).map_err(|_| (Some("id"), RuleError::Invalid(format!("id {n} out of range"))))?
        }
        Some(v) => {
            return Err((Some("id"), RuleError::Invalid(format!("expected an integer, got {}", v.type_str()))));
        }
    };
    let kind = string("kind")?;
    let placeholder = Ipv4Addr::UNSPECIFIED;
    let mut target = match kind {
        Some("dnat") => Target::Dnat { addr: placeholder, port: None },
        Some("redirect") => Target::Redirect { port: 0 },
        Some("snat") => Target::Snat { addr: placeholder, ports: None },
        Some("masquerade") => Target::Masquerade { ports: None },
        Some(k) => {
            return Err((Some("kind"), RuleError::BadKind { input: k.to_string() }));
        }
        None => {
            return Err((Some("kind"), RuleError::Invalid(format!("missing; expected {KINDS}"))));
        }
    };
    // Interface and port fields of the other hook, named by their TOML field.
    let misplaced: &[&str] = if target.is_postrouting() { &["iface", "dport"] } else { &["oface"] };
    if let Some(&f) = misplaced.iter().find(|f| t.contains_key(**f)) {
        return Err((Some(f), wrong_hook(&target, f)));
    }
    let iface_field = |field: &'static str| -> Result<Option<String>, FieldError> {
        match string(field)? {
            Some(i) => {
                at(field, validate_iface(i))?;
                Ok(Some(i.to_string()))
            }
            None => Ok(None),
        }
    };
    let iface = iface_field("iface")?;
    let oface = iface_field("oface")?;
    let proto = match string("proto")? {
        Some(p) => at("proto", parse_proto_opt(p))?,
        None => None,
    };
    let src = string("src")?.map(|s| at("src", parse_cidr(s))).transpose()?;
    let dst = string("dst")?.map(|s| at("dst", parse_cidr(s))).transpose()?;
    let dport = number_or_string("dport")?.map(|s| at("dport", s.parse::<PortRange>())).transpose()?;
    let to = string("to")?;
    let to_port = number_or_string("to_port")?;
    let to_ports = number_or_string("to_ports")?;
    // Which target fields this kind takes; the others are errors that say where they belong.
    let (wants_to, wants_to_port, wants_to_ports) = match target {
        Target::Dnat { .. } | Target::Snat { .. } => (true, false, false),
        Target::Redirect { .. } => (false, true, false),
        Target::Masquerade { .. } => (false, false, true),
    };
    let instead = match target {
        Target::Dnat { .. } => "for dnat write to = \"ADDR:PORT\"",
        Target::Redirect { .. } => "redirect takes to_port = PORT",
        Target::Snat { .. } => "for snat write to = \"ADDR:LO-HI\"",
        Target::Masquerade { .. } => "masquerade takes to_ports = \"LO-HI\"",
    };
    if to.is_some() && !wants_to {
        return Err((Some("to"), RuleError::Invalid(format!("to is for dnat and snat; {instead}"))));
    }
    if to_port.is_some() && !wants_to_port {
        return Err((Some("to_port"), RuleError::Invalid(format!("to_port is for redirect; {instead}"))));
    }
    if to_ports.is_some() && !wants_to_ports {
        return Err((Some("to_ports"), RuleError::Invalid(format!("to_ports is for masquerade; {instead}"))));
    }
    match &mut target {
        Target::Dnat { addr, port } => {
            let to = to.ok_or((Some("to"), RuleError::MissingTarget { kind: "dnat", what: "to = \"ADDR[:PORT]\"" }))?;
            (*addr, *port) = at("to", parse_to(to))?;
        }
        Target::Redirect { port } => {
            let p = to_port
                .ok_or((Some("to_port"), RuleError::MissingTarget { kind: "redirect", what: "to_port = PORT" }))?;
            *port = at("to_port", parse_port(&p))?;
        }
        Target::Snat { addr, ports } => {
            let to =
                to.ok_or((Some("to"), RuleError::MissingTarget { kind: "snat", what: "to = \"ADDR[:LO-HI]\"" }))?;
            (*addr, *ports) = at("to", parse_snat_to(to))?;
        }
        Target::Masquerade { ports } => {
            *ports = to_ports.map(|p| at("to_ports", p.parse::<PortRange>())).transpose()?;
        }
    }
    let local = match t.get("local") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(_) => return Err((Some("local"), RuleError::Invalid("local must be true or false".into()))),
    };
    let rule = Rule { id, iface, oface, proto, src, dst, dport, local, target };
    rule.validate().map_err(|e| (None, e))?;
    Ok(rule)
}

/// Writes rules in the [`parse_config`] format (ids included when assigned); `parse_config(&to_config(r)) == r`
/// for valid, normalized rules.
pub fn to_config(rules: &[Rule]) -> String {
    // toml's own string formatting does the quoting and escaping.
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut out = String::from("# pfwd rules: each [[rule]] is one rule; fields mirror the CLI flags.\n");
    for r in rules {
        out.push_str("\n[[rule]]\n");
        if r.id != 0 {
            out.push_str(&format!("id = {}\n", r.id));
        }
        out.push_str(&format!("kind = {}\n", q(r.kind_name())));
        if r.local {
            out.push_str("local = true\n");
        }
        if let Some(i) = &r.iface {
            out.push_str(&format!("iface = {}\n", q(i)));
        }
        if let Some(o) = &r.oface {
            out.push_str(&format!("oface = {}\n", q(o)));
        }
        if let Some(p) = r.proto {
            out.push_str(&format!("proto = {}\n", q(&p.to_string())));
        }
        if let Some(s) = &r.src {
            out.push_str(&format!("src = {}\n", q(&fmt_net(s))));
        }
        if let Some(d) = &r.dst {
            out.push_str(&format!("dst = {}\n", q(&fmt_net(d))));
        }
        match r.dport {
            Some(p) if p.lo == p.hi => out.push_str(&format!("dport = {}\n", p.lo)),
            Some(p) => out.push_str(&format!("dport = {}\n", q(&p.to_string()))),
            None => {}
        }
        match r.target {
            Target::Dnat { addr, port: Some(p) } => out.push_str(&format!("to = {}\n", q(&format!("{addr}:{p}")))),
            Target::Dnat { addr, port: None } => out.push_str(&format!("to = {}\n", q(&addr.to_string()))),
            Target::Redirect { port } => out.push_str(&format!("to_port = {port}\n")),
            Target::Snat { addr, ports: Some(r) } => out.push_str(&format!("to = {}\n", q(&format!("{addr}:{r}")))),
            Target::Snat { addr, ports: None } => out.push_str(&format!("to = {}\n", q(&addr.to_string()))),
            Target::Masquerade { ports: Some(r) } => out.push_str(&format!("to_ports = {}\n", q(&r.to_string()))),
            Target::Masquerade { ports: None } => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Compilation to map data
// ---------------------------------------------------------------------------------------------------------------

/// The contents of the rules array, the bucket hash map and `Config::level_mask` / `Config::snat_level_mask`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    /// `(slot, entry)`, one per rule, in slot order; slot = index in the input.
    pub entries: Vec<(u32, RuleEntry)>,
    /// Slots within a bucket are in rank order (best first). PREROUTING and POSTROUTING rules have separate buckets
    /// (`BucketKey::hook`).
    pub buckets: HashMap<BucketKey, Bucket>,
    /// [`level`] bits of the levels that have at least one PREROUTING bucket.
    pub level_mask: u32,
    /// [`level`] bits of the levels that have at least one POSTROUTING bucket (only IF_PROTO, PROTO, IF, ANY: these
    /// rules have no port).
    pub snat_level_mask: u32,
    /// [`level`] bits of the levels that have at least one OUTPUT (`--local`) bucket.
    pub local_level_mask: u32,
}

fn bucket_key(hook: u8, ifindex: u32, proto: u8, dport: u16) -> BucketKey {
    BucketKey { ifindex, dport, proto, hook }
}

/// Builds the kernel's view of `rules`. Slot = index in `rules`; rank = position in [`precedence_order`].
/// `ifindex` maps an interface name to its index, or `None` when pfwd is not attached to it (an error: the rule
/// could never match). Each rule goes into the bucket(s) of its own (interface, protocol, port) level of its hook; a
/// port range takes one bucket per port. The interface is the incoming one (`-i`) for DNAT/REDIRECT, the outgoing
/// one (`-o`) for SNAT/MASQUERADE.
pub fn compile(rules: &[Rule], ifindex: &dyn Fn(&str) -> Option<u32>) -> Result<Compiled, RuleError> {
    if rules.len() > MAX_RULES as usize {
        return Err(RuleError::TooManyRules(rules.len()));
    }
    for r in rules {
        // The bucket levels rely on "a port implies a protocol", which validate() guarantees.
        r.validate().map_err(|e| RuleError::InRule { id: r.id, error: Box::new(e) })?;
    }
    let order = precedence_order(rules);
    let mut ranks = vec![0u32; rules.len()];
    for (rank, &slot) in order.iter().enumerate() {
        ranks[slot] = rank as u32;
    }
    // The closure may be a syscall (if_nametoindex), so ask once per name.
    let mut ifindexes: HashMap<&str, u32> = HashMap::new();
    let mut rule_ifindex = vec![0u32; rules.len()];
    for (slot, r) in rules.iter().enumerate() {
        if let Some(name) = r.hook_iface() {
            let idx = match ifindexes.get(name) {
                Some(&i) => i,
                None => {
                    // ifindex 0 would turn the rule into "any interface", so treat it as not attached.
                    let i = ifindex(name)
                        .filter(|&i| i != 0)
                        .ok_or_else(|| RuleError::IfaceNotAttached { id: r.id, iface: name.to_string() })?;
                    ifindexes.insert(name, i);
                    i
                }
            };
            rule_ifindex[slot] = idx;
        }
    }

    let mut entries = Vec::with_capacity(rules.len());
    for (slot, r) in rules.iter().enumerate() {
        let (src_net, src_mask) = net_mask(r.src);
        let (dst_net, dst_mask) = net_mask(r.dst);
        let be = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
        // SNAT/MASQUERADE ports 0..=0 tell the kernel "keep the source port when free, else 1024-65535".
        let range = |p: Option<PortRange>| p.map_or((0, 0), |p| (p.lo, p.hi));
        let (kind, to_addr, (to_port, to_port_hi)) = match r.target {
            Target::Dnat { addr, port } => (kind::DNAT, be(addr), (port.unwrap_or(0), 0)),
            Target::Redirect { port } => (kind::REDIRECT, 0, (port, 0)),
            Target::Snat { addr, ports } => (kind::SNAT, be(addr), range(ports)),
            Target::Masquerade { ports } => (kind::MASQUERADE, 0, range(ports)),
        };
        // Map values are network order: the bytes as they sit in the packet.
        let ne = |v: u32| u32::from_ne_bytes(v.to_be_bytes());
        let entry = RuleEntry {
            rank: ranks[slot],
            id: r.id,
            src_net: ne(src_net),
            src_mask: ne(src_mask),
            dst_net: ne(dst_net),
            dst_mask: ne(dst_mask),
            to_addr,
            to_port,
            to_port_hi,
            kind,
            proto: r.proto.map_or(PROTO_ANY, Proto::code),
            _pad: [0; 2],
            ifindex: rule_ifindex[slot],
        };
        entries.push((slot as u32, entry));
    }

    let mut buckets: HashMap<BucketKey, Bucket> = HashMap::with_capacity(rules.len());
    let (mut level_mask, mut snat_level_mask, mut local_level_mask) = (0, 0, 0);
    // Filling in precedence order keeps each bucket's slots sorted by rank.
    for &slot in &order {
        let r = &rules[slot];
        let ifx = rule_ifindex[slot];
        let proto = r.proto.map_or(PROTO_ANY, Proto::code);
        let (hook, mask) = if r.is_postrouting() {
            (hook::POSTROUTING, &mut snat_level_mask)
        } else if r.local {
            (hook::OUTPUT, &mut local_level_mask)
        } else {
            (hook::PREROUTING, &mut level_mask)
        };
        // validate() keeps --dport off POSTROUTING rules, so they land on the four portless levels.
        *mask |= match (ifx != 0, proto != PROTO_ANY, r.dport.is_some()) {
            (true, true, true) => level::IF_PROTO_PORT,
            (false, true, true) => level::PROTO_PORT,
            (true, true, false) => level::IF_PROTO,
            (false, true, false) => level::PROTO,
            (true, false, _) => level::IF,
            (false, false, _) => level::ANY,
        };
        let (lo, hi) = r.dport.map_or((0, 0), |p| (p.lo, p.hi));
        for port in lo..=hi {
            let key = bucket_key(hook, ifx, proto, port);
            if buckets.len() >= MAX_BUCKETS as usize && !buckets.contains_key(&key) {
                return Err(RuleError::TooManyBuckets);
            }
            let b = buckets.entry(key).or_default();
            if b.len as usize >= BUCKET_SLOTS {
                let mut ids: Vec<String> = b.slots.iter().map(|&s| rules[s as usize].id.to_string()).collect();
                ids.push(r.id.to_string());
                return Err(RuleError::BucketFull {
                    iface: r.hook_iface().map_or_else(|| "any".into(), |i| i.to_string()),
                    proto: r.proto.map_or_else(|| "any".into(), |p| p.to_string()),
                    port: if port == 0 { "any".into() } else { port.to_string() },
                    ids: ids.join(", "),
                });
            }
            b.slots[b.len as usize] = slot as u32;
            b.len += 1;
        }
    }
    Ok(Compiled { entries, buckets, level_mask, snat_level_mask, local_level_mask })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn p(s: &str) -> Result<Rule, RuleError> {
        parse_args(&s.split_whitespace().collect::<Vec<_>>())
    }

    fn ok(s: &str) -> Rule {
        p(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        match p(s) {
            Ok(r) => panic!("{s}: accepted as {r}"),
            Err(e) => e.to_string(),
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// Tiny deterministic xorshift64 generator: reproducible property tests without a dependency (the iptables
    /// tests use it too).
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len() as u64) as usize]
        }
        pub(crate) fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// Random valid rule over the whole value space (for syntax round trips), PREROUTING or POSTROUTING.
    fn random_rule(rng: &mut Rng) -> Rule {
        let post = rng.chance(30);
        let proto = match rng.below(3) {
            0 => None,
            1 => Some(Proto::Tcp),
            _ => Some(Proto::Udp),
        };
        let rand_net = |rng: &mut Rng| {
            let len = rng.below(33) as u8;
            Ipv4Net::new(Ipv4Addr::from(rng.next() as u32), len).unwrap().trunc()
        };
        let port = |rng: &mut Rng| (rng.below(65535) + 1) as u16;
        let range = |rng: &mut Rng| {
            let a = port(rng);
            let b = if rng.chance(50) { a } else { port(rng) };
            PortRange { lo: a.min(b), hi: a.max(b) }
        };
        let dport = if !post && proto.is_some() && rng.chance(60) { Some(range(rng)) } else { None };
        let iface =
            if rng.chance(40) { Some(rng.pick(&["eth0", "wg0", "veth-a.1", "br_lan", "x"]).into()) } else { None };
        let target = if post {
            let ports = if proto.is_some() && rng.chance(60) { Some(range(rng)) } else { None };
            if rng.chance(50) {
                Target::Snat { addr: Ipv4Addr::from((rng.below(0xdfff_ffff) + 1) as u32), ports }
            } else {
                Target::Masquerade { ports }
            }
        } else if proto.is_some() && rng.chance(40) {
            Target::Redirect { port: port(rng) }
        } else {
            let addr = Ipv4Addr::from((rng.below(0xdfff_ffff) + 1) as u32);
            let port = if proto.is_some() && rng.chance(60) { Some(port(rng)) } else { None };
            Target::Dnat { addr, port }
        };
        let (iface, oface) = if post { (None, iface) } else { (iface, None) };
        Rule {
            id: rng.below(1000) as u32 + 1,
            iface,
            oface,
            proto,
            src: if rng.chance(50) { Some(rand_net(rng)) } else { None },
            dst: if rng.chance(50) { Some(rand_net(rng)) } else { None },
            dport,
            local: false,
            target,
        }
    }

    // ---- grammar: individual fields ----

    #[test]
    fn proto_parsing() {
        assert_eq!("tcp".parse::<Proto>().unwrap(), Proto::Tcp);
        assert_eq!("UDP".parse::<Proto>().unwrap(), Proto::Udp);
        assert_eq!("6".parse::<Proto>().unwrap(), Proto::Tcp);
        assert_eq!(Proto::Udp.to_string(), "udp");
        let e = "icmp".parse::<Proto>().unwrap_err().to_string();
        assert!(e.contains("\"icmp\"") && e.contains("tcp or udp"), "{e}");
        assert_eq!(ok("dnat -p all --to 10.0.0.1").proto, None);
    }

    #[test]
    fn port_range_parsing() {
        assert_eq!("80".parse::<PortRange>().unwrap(), PortRange::single(80));
        assert_eq!("8000-8099".parse::<PortRange>().unwrap(), PortRange { lo: 8000, hi: 8099 });
        assert_eq!("8000:8099".parse::<PortRange>().unwrap(), PortRange { lo: 8000, hi: 8099 });
        assert_eq!("65535".parse::<PortRange>().unwrap(), PortRange::single(65535));
        assert_eq!(PortRange { lo: 8000, hi: 8099 }.to_string(), "8000-8099");
        assert_eq!(PortRange::single(80).to_string(), "80");
        for bad in ["0", "0-10", "10-5", "abc", "80-", "-80", "+80", "65536", "1-2-3", "", " 80", "80x", "99999999999"]
        {
            let e = bad.parse::<PortRange>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad port range {bad:?}")), "{bad}: {e}");
        }
        assert!("10-5".parse::<PortRange>().unwrap_err().to_string().contains("low port is above"));
        assert!("0".parse::<PortRange>().unwrap_err().to_string().contains("port 0"));
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(parse_cidr("192.168.1.1").unwrap(), net("192.168.1.1/32"));
        assert_eq!(parse_cidr("192.168.1.0/24").unwrap(), net("192.168.1.0/24"));
        assert_eq!(parse_cidr("192.168.1.5/24").unwrap(), net("192.168.1.0/24"), "host bits cleared like iptables");
        assert_eq!(parse_cidr("10.1.2.3/255.255.0.0").unwrap(), net("10.1.0.0/16"));
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap(), net("0.0.0.0/0"));
        for (bad, why) in [
            ("10.0.0.300/24", "not an IPv4 address"),
            ("10.0.0.0/33", "0-32"),
            ("10.0.0.0/", "0-32"),
            ("10.0.0.0/+8", "0-32"),
            ("example.com", "names are not resolved"),
            ("10.0.0", "not an IPv4 address"),
            ("10.0.0.0/255.0.255.0", "not contiguous"),
            ("", "not an IPv4 address"),
        ] {
            let e = parse_cidr(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad CIDR {bad:?}: ")) && e.contains(why), "{bad}: {e}");
        }
        assert_eq!(
            parse_cidr("10.0.0.300/24").unwrap_err().to_string(),
            "bad CIDR \"10.0.0.300/24\": not an IPv4 address (expected A.B.C.D; names are not resolved)"
        );
    }

    #[test]
    fn to_parsing() {
        assert_eq!(parse_to("127.0.0.1:17355").unwrap(), (ip("127.0.0.1"), Some(17355)));
        assert_eq!(parse_to("10.0.0.2").unwrap(), (ip("10.0.0.2"), None));
        for (bad, why) in [
            ("10.0.0.2:0", "port 0"),
            ("10.0.0.2:65536", "out of range"),
            ("10.0.0.2:", "expected a port"),
            ("10.0.0.2:80-90", "port ranges"),
            ("10.0.0.1-10.0.0.5", "address ranges"),
            ("host:80", "not an IPv4 address"),
            ("0.0.0.0", "not a unicast"),
            ("224.0.0.1:80", "not a unicast"),
        ] {
            let e = parse_to(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad --to {bad:?}: ")) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn iface_validation() {
        for good in ["eth0", "wg0", "veth-a.1", "123456789012345"] {
            validate_iface(good).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("1234567890123456", "15 bytes"),
            ("eth0/1", "'/'"),
            ("eth0:1", "':'"),
            ("et h0", "whitespace"),
            ("..", "not a valid"),
            ("eth+", "wildcards"),
        ] {
            let e = validate_iface(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad interface name {bad:?}: ")) && e.contains(why), "{bad}: {e}");
        }
    }

    // ---- grammar: whole rules ----

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
            ("", "missing rule kind"),
            (
                "netmap --to 1.2.3.4",
                "bad rule kind \"netmap\": expected \"dnat\", \"redirect\", \"snat\" or \"masquerade\"",
            ),
            ("dnat -p tcp --sport 80 --to 1.2.3.4", "unknown option \"--sport\""),
            ("dnat -p tcp 80 --to 1.2.3.4", "unexpected argument \"80\""),
            ("dnat -p tcp --to", "--to needs a value"),
            ("dnat -p tcp -p udp --to 1.2.3.4", "-p given twice"),
            ("dnat -p tcp --protocol udp --to 1.2.3.4", "--protocol given twice"),
            ("dnat ! -s 10.0.0.1 --to 1.2.3.4", "negation"),
            ("dnat -s !10.0.0.1 --to 1.2.3.4", "negation"),
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
    fn validation_rules() {
        // IP-only DNAT: no protocol needed when the port is kept.
        let r = ok("dnat -d 203.0.113.10 --to 10.0.0.2");
        assert_eq!(r.proto, None);
        // Hand-built rules (e.g. from a state file) are checked the same way.
        let mut r = ok("redirect -p tcp --dport 80 --to-port 3000");
        r.dport = Some(PortRange { lo: 90, hi: 80 });
        assert!(r.validate().unwrap_err().to_string().contains("bad port range"));
        r.dport = None;
        r.proto = None;
        assert_eq!(r.validate().unwrap_err(), RuleError::RedirectNeedsProto);
        let r = Rule {
            id: 0,
            iface: None,
            oface: None,
            proto: None,
            src: None,
            dst: None,
            dport: None,
            local: false,
            target: Target::Dnat { addr: ip("10.0.0.1"), port: Some(80) },
        };
        assert_eq!(r.validate().unwrap_err(), RuleError::ToPortNeedsProto);
    }

    #[test]
    fn display_parse_round_trip_property() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..5000 {
            let r = random_rule(&mut rng);
            r.validate().unwrap_or_else(|e| panic!("generator made an invalid rule {r}: {e}"));
            let text = r.to_string();
            let mut back = p(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            back.id = r.id;
            assert_eq!(back, r, "{text}");
            // The state file (JSON) round-trips too.
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), r, "{json}");
        }
        zero_prefix_round_trips();
    }

    /// `0.0.0.0/0` survives a round trip and means the same as no prefix.
    fn zero_prefix_round_trips() {
        let r = ok("dnat -s 0.0.0.0/0 --to 10.0.0.1");
        assert_eq!(r.src, Some(net("0.0.0.0/0")));
        assert_eq!(p(&r.to_string()).unwrap(), r);
        assert!(r.same_match_and_target(&ok("dnat --to 10.0.0.1")));
    }

    #[test]
    fn json_state_format() {
        let r = Rule { id: 3, ..ok("dnat -i eth0 -p tcp --dport 8000-8099 --to 10.0.0.2") };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": 3, "iface": "eth0", "proto": "tcp", "dport": "8000-8099",
                               "target": {"kind": "dnat", "addr": "10.0.0.2", "port": null}})
        );
        let back: Rule = serde_json::from_value(serde_json::json!({
            "id": 4, "proto": "udp", "dport": 53, "src": "10.0.0.0/8", "target": {"kind": "redirect", "port": 5353}
        }))
        .unwrap();
        assert_eq!(back, Rule { id: 4, ..ok("redirect -p udp -s 10.0.0.0/8 --dport 53 --to-port 5353") });
        let e = serde_json::from_value::<Rule>(
            serde_json::json!({"dport": "0", "target": {"kind": "redirect", "port": 1}}),
        );
        assert!(e.unwrap_err().to_string().contains("bad port range \"0\""));
    }

    // ---- duplicates ----

    #[test]
    fn duplicates() {
        let a = Rule { id: 1, ..ok("dnat -p tcp -s 192.168.1.1 --dport 80 --to 10.0.0.2") };
        let b = Rule { id: 2, ..ok("dnat -p tcp -s 192.168.1.1/32 --dport 80 --to 10.0.0.2") };
        assert!(a.same_match_and_target(&b), "ids are ignored, /32 is the bare address");
        let c = Rule { id: 3, ..ok("dnat -p tcp -s 192.168.1.1 --dport 80 --to 10.0.0.3") };
        assert!(!a.same_match_and_target(&c), "same match, different target: allowed, precedence decides");
        let d = Rule { id: 4, ..ok("dnat -p udp -s 192.168.1.1 --dport 80 --to 10.0.0.2") };
        assert!(!a.same_match_and_target(&d));
        let rules = vec![a.clone(), c.clone()];
        assert_eq!(check_duplicate(&rules, &b).unwrap_err().to_string(), "duplicate of rule 1");
        check_duplicate(&rules, &d).unwrap();
        // The older of two same-match rules wins.
        assert_eq!(precedence_order(&[c.clone(), a.clone()]), vec![1, 0]);
        assert_eq!(next_id(&rules), 4);
        let mut rules = rules;
        assert_eq!(remove_by_id(&mut rules, 7).unwrap_err().to_string(), "no rule with id 7");
        assert_eq!(remove_by_id(&mut rules, 3).unwrap(), c);
        assert_eq!(rules, vec![a]);
    }

    // ---- TOML ----

    const SEED_TOML: &str = r#"
# each [[rule]] is one rule; fields mirror the CLI flags
[[rule]]
kind = "redirect"
proto = "tcp"
dport = "59999"
to_port = 80

[[rule]]
kind = "redirect"
proto = "tcp"
dport = 80
to_port = 3000

[[rule]]
kind = "dnat"
iface = "eth0"
proto = "tcp"
dport = 59999
to = "127.0.0.1:17355"

[[rule]]
kind = "dnat"
proto = "tcp"
dport = 2222
to = "192.168.50.7:22"

[[rule]]
kind = "dnat"
proto = "udp"
src = "192.168.1.1"
dport = 53
to = "10.0.0.53"

[[rule]]
kind = "dnat"
proto = "tcp"
src = "192.168.1.0/24"
dport = 443
to = "10.0.0.3:8443"

[[rule]]
kind = "dnat"
proto = "tcp"
dst = "203.0.113.10"
dport = 80
to = "10.0.0.4"

[[rule]]
kind = "dnat"
proto = "tcp"
dst = "203.0.113.0/24"
dport = 80
to = "10.0.0.5"

[[rule]]
kind = "dnat"
dst = "203.0.113.20"
to = "10.0.0.6"

[[rule]]
kind = "dnat"
proto = "tcp"
dport = "8000-8099"
to = "10.0.0.7:9000"

[[rule]]
kind = "dnat"
proto = "udp"
dport = "8000:8099"
to = "10.0.0.7"

[[rule]]
kind = "dnat"
iface = "eth0"
proto = "tcp"
src = "192.168.1.0/24"
dst = "203.0.113.10"
dport = 59999
to = "127.0.0.1:17355"
"#;

    const SEED_CLI: &[&str] = &[
        "redirect -p tcp --dport 59999 --to-port 80",
        "redirect -p tcp --dport 80 --to-port 3000",
        "dnat -i eth0 -p tcp --dport 59999 --to 127.0.0.1:17355",
        "dnat -p tcp --dport 2222 --to 192.168.50.7:22",
        "dnat -p udp -s 192.168.1.1 --dport 53 --to 10.0.0.53",
        "dnat -p tcp -s 192.168.1.0/24 --dport 443 --to 10.0.0.3:8443",
        "dnat -p tcp -d 203.0.113.10 --dport 80 --to 10.0.0.4",
        "dnat -p tcp -d 203.0.113.0/24 --dport 80 --to 10.0.0.5",
        "dnat -d 203.0.113.20 --to 10.0.0.6",
        "dnat -p tcp --dport 8000-8099 --to 10.0.0.7:9000",
        "dnat -p udp --dport 8000-8099 --to 10.0.0.7",
        "dnat -i eth0 -p tcp -s 192.168.1.0/24 -d 203.0.113.10 --dport 59999 --to 127.0.0.1:17355",
    ];

    #[test]
    fn toml_seed_cases() {
        let rules = parse_config(SEED_TOML).unwrap();
        let shown: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(shown, SEED_CLI);
        let from_cli: Vec<Rule> = SEED_CLI.iter().map(|s| ok(s)).collect();
        assert_eq!(rules, from_cli);
        // Spot-check the decoded values, not just their printing.
        assert_eq!(rules[0].target, Target::Redirect { port: 80 });
        assert_eq!(rules[0].dport, Some(PortRange::single(59999)));
        assert_eq!(rules[2].target, Target::Dnat { addr: ip("127.0.0.1"), port: Some(17355) });
        assert_eq!(rules[4].src, Some(net("192.168.1.1/32")));
        assert_eq!(rules[8].proto, None);
        assert_eq!(rules[10].target, Target::Dnat { addr: ip("10.0.0.7"), port: None });
        // And back out.
        assert_eq!(parse_config(&to_config(&rules)).unwrap(), rules);
        assert_eq!(parse_config("").unwrap(), vec![]);
        assert_eq!(parse_config("# nothing yet\n").unwrap(), vec![]);
    }

    #[test]
    fn toml_round_trip_property() {
        let mut rng = Rng(42);
        for _ in 0..50 {
            let mut rules: Vec<Rule> = Vec::new();
            for _ in 0..40 {
                let mut r = random_rule(&mut rng);
                r.id = rules.len() as u32 + if rng.chance(50) { 1 } else { 0 } * 1000;
                if !rules.iter().any(|o| o.same_match_and_target(&r) || (r.id != 0 && o.id == r.id)) {
                    rules.push(r);
                }
            }
            let text = to_config(&rules);
            assert_eq!(parse_config(&text).unwrap_or_else(|e| panic!("{e}\n{text}")), rules);
        }
    }

    #[test]
    fn toml_errors_name_rule_and_field() {
        let one = |body: &str| parse_config(&format!("[[rule]]\nkind = \"dnat\"\nto = \"10.0.0.1\"\n[[rule]]\n{body}"));
        for (body, want) in [
            ("kind = \"dnat\"\nprot = \"tcp\"\nto = \"1.2.3.4\"", "[[rule]] #2: unknown field \"prot\""),
            (
                "kind = \"dnat\"\nproto = \"tcp\"\ndport = 0\nto = \"1.2.3.4\"",
                "[[rule]] #2, field dport: bad port range \"0\"",
            ),
            (
                "kind = \"dnat\"\nproto = \"tcp\"\ndport = 70000\nto = \"1.2.3.4\"",
                "field dport: bad port range \"70000\"",
            ),
            (
                "kind = \"dnat\"\nproto = \"tcp\"\ndport = \"9-1\"\nto = \"1.2.3.4\"",
                "field dport: bad port range \"9-1\"",
            ),
            (
                "kind = \"dnat\"\nproto = \"tcp\"\ndport = 1.5\nto = \"1.2.3.4\"",
                "field dport: expected a number or string, got float",
            ),
            (
                "kind = \"dnat\"\nsrc = \"10.0.0.300/24\"\nto = \"1.2.3.4\"",
                "[[rule]] #2, field src: bad CIDR \"10.0.0.300/24\"",
            ),
            ("kind = \"dnat\"\ndst = 5\nto = \"1.2.3.4\"", "field dst: expected a string, got integer"),
            ("kind = \"dnat\"\niface = \"a/b\"\nto = \"1.2.3.4\"", "field iface: bad interface name \"a/b\""),
            ("kind = \"dnat\"\nproto = \"icmp\"\nto = \"1.2.3.4\"", "field proto: bad protocol \"icmp\""),
            ("proto = \"tcp\"\nto = \"1.2.3.4\"", "[[rule]] #2, field kind: missing"),
            ("kind = \"netmap\"\nto = \"1.2.3.4\"", "field kind: bad rule kind \"netmap\""),
            ("kind = \"dnat\"\nproto = \"tcp\"", "field to: dnat needs to = \"ADDR[:PORT]\""),
            ("kind = \"dnat\"\nto = \"1.2.3.4:80\"", "[[rule]] #2: --to with a port needs -p tcp or -p udp"),
            ("kind = \"dnat\"\nto = \"1.2.3.4\"\nto_port = 80", "field to_port: to_port is for redirect"),
            ("kind = \"redirect\"\nproto = \"tcp\"", "field to_port: redirect needs to_port = PORT"),
            ("kind = \"redirect\"\nproto = \"tcp\"\nto_port = 0", "field to_port: bad port \"0\""),
            ("kind = \"redirect\"\nproto = \"tcp\"\nto = \"1.2.3.4\"", "field to: to is for dnat"),
            ("kind = \"redirect\"\ndport = 80\nto_port = 3000", "[[rule]] #2: --dport needs -p tcp or -p udp"),
            ("kind = \"redirect\"\nto_port = 3000", "[[rule]] #2: redirect needs -p tcp or -p udp"),
            ("kind = \"dnat\"\nto = \"10.0.0.1\"", "[[rule]] #2: duplicate of [[rule]] #1"),
            ("kind = \"dnat\"\nto = \"10.0.0.2\"\nid = -1", "field id: id -1 out of range"),
        ] {
            let e = one(body).unwrap_err().to_string();
            assert!(e.contains(want), "{body:?}: got {e:?}, want {want:?}");
        }
        let e = parse_config(
            "[[rule]]\nid = 5\nkind = \"dnat\"\nto = \"10.0.0.1\"\n[[rule]]\nid = 5\nkind = \"dnat\"\nto = \"10.0.0.2\"\n",
        );
        assert_eq!(e.unwrap_err().to_string(), "[[rule]] #2, field id: id 5 is already used by [[rule]] #1");
        assert!(parse_config("[[rule]\n").unwrap_err().to_string().starts_with("bad TOML"));
        assert!(parse_config("rules = 1\n").unwrap_err().to_string().contains("unknown top-level key \"rules\""));
        assert!(parse_config("rule = 1\n").unwrap_err().to_string().contains("array of tables"));
    }

    // ---- precedence ----

    #[test]
    fn precedence_picks_most_specific() {
        let rules: Vec<Rule> = [
            (1, "dnat --to 10.0.0.1"),                                     // 0: catch-all
            (2, "dnat -p tcp --to 10.0.0.2"),                              // 1: protocol only
            (3, "dnat -p tcp --dport 80-89 --to 10.0.0.3"),                // 2: range
            (4, "dnat -p tcp --dport 80 --to 10.0.0.4"),                   // 3: single port
            (5, "dnat -i eth0 -p tcp --dport 80 --to 10.0.0.5"),           // 4: + interface
            (6, "dnat -p tcp -s 192.168.1.0/24 --dport 80 --to 10.0.0.6"), // 5: + source
            (7, "dnat -i eth0 --to 10.0.0.7"),                             // 6: interface only
            (8, "dnat -s 192.168.1.1 --to 10.0.0.8"),                      // 7: source only
            (9, "dnat -s 192.168.1.1 -d 203.0.113.1 --to 10.0.0.9"),       // 8: source + destination
            (10, "dnat -d 203.0.113.1 --to 10.0.0.10"),                    // 9: destination only
        ]
        .iter()
        .map(|(id, s)| Rule { id: *id, ..ok(s) })
        .collect();
        assert_eq!(precedence_order(&rules), vec![4, 5, 3, 2, 1, 6, 8, 7, 9, 0]);
        // Older rule wins a tie; equal ids keep list order.
        let a = Rule { id: 9, ..ok("dnat -p tcp --dport 80 --to 10.0.0.1") };
        let b = Rule { id: 2, ..ok("dnat -p tcp --dport 81 --to 10.0.0.2") };
        assert_eq!(precedence_order(&[a.clone(), b.clone()]), vec![1, 0]);
        let (a0, b0) = (Rule { id: 0, ..a }, Rule { id: 0, ..b });
        assert_eq!(precedence_order(&[a0, b0]), vec![0, 1]);
    }

    // ---- compile ----

    fn ifindex(name: &str) -> Option<u32> {
        match name {
            "eth0" => Some(2),
            "eth1" => Some(3),
            _ => None,
        }
    }

    #[test]
    fn compile_entries_and_buckets() {
        let rules = vec![
            Rule { id: 1, ..ok("redirect -p tcp --dport 80 --to-port 3000") },
            Rule { id: 2, ..ok("dnat -i eth0 -p tcp -s 192.168.1.0/24 --dport 59999 --to 127.0.0.1:17355") },
            Rule { id: 3, ..ok("dnat -d 203.0.113.20 --to 10.0.0.6") },
            Rule { id: 4, ..ok("dnat -p udp --dport 8000-8002 --to 10.0.0.7") },
        ];
        let c = compile(&rules, &ifindex).unwrap();
        assert_eq!(c.level_mask, level::PROTO_PORT | level::IF_PROTO_PORT | level::ANY);
        let e = |slot: usize| c.entries[slot].1;
        assert_eq!(c.entries.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        // Ranks: the single ports first (interface rule ahead), then the range, then the catch-all.
        assert_eq!([e(0).rank, e(1).rank, e(2).rank, e(3).rank], [1, 0, 3, 2]);
        assert_eq!(
            e(1),
            RuleEntry {
                rank: 0,
                id: 2,
                src_net: u32::from_ne_bytes([192, 168, 1, 0]),
                src_mask: u32::from_ne_bytes([255, 255, 255, 0]),
                dst_net: 0,
                dst_mask: 0,
                to_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                to_port: 17355,
                to_port_hi: 0,
                kind: kind::DNAT,
                proto: PROTO_TCP,
                _pad: [0; 2],
                ifindex: 2,
            }
        );
        assert_eq!((e(0).kind, e(0).to_addr, e(0).to_port, e(0).ifindex), (kind::REDIRECT, 0, 3000, 0));
        assert_eq!((e(2).proto, e(2).dst_mask, e(2).to_port), (PROTO_ANY, u32::MAX, 0));
        assert_eq!(e(2).dst_net, u32::from_ne_bytes([203, 0, 113, 20]));
        let slots = |ifx, proto, port| {
            let b = c.buckets[&bucket_key(hook::PREROUTING, ifx, proto, port)];
            b.slots[..b.len as usize].to_vec()
        };
        assert_eq!(c.buckets.len(), 1 + 1 + 1 + 3);
        assert_eq!(slots(0, PROTO_TCP, 80), vec![0]);
        assert_eq!(slots(2, PROTO_TCP, 59999), vec![1]);
        assert_eq!(slots(0, 0, 0), vec![2]);
        for port in 8000..=8002 {
            assert_eq!(slots(0, PROTO_UDP, port), vec![3]);
        }
        assert_eq!(compile(&[], &ifindex).unwrap(), Compiled::default());
    }

    #[test]
    fn compile_errors() {
        let r = Rule { id: 5, ..ok("dnat -i eth9 -p tcp --dport 80 --to 10.0.0.1") };
        assert_eq!(compile(&[r], &ifindex).unwrap_err().to_string(), "interface \"eth9\" (rule 5) is not attached");

        // Nine rules in one (eth0, tcp, 80) bucket; the ranged ones share it through port 80.
        let rules: Vec<Rule> = (1..=9)
            .map(|i| Rule { id: i, ..ok(&format!("dnat -i eth0 -p tcp --dport 80-{} --to 10.0.0.{i}", 79 + i)) })
            .collect();
        compile(&rules[..8], &ifindex).unwrap();
        let e = compile(&rules, &ifindex).unwrap_err().to_string();
        assert!(
            e.contains("interface eth0, protocol tcp, port 80") && e.contains("at most 8 rules may share one"),
            "{e}"
        );
        let rules: Vec<Rule> =
            (1..=9).map(|i| Rule { id: i, ..ok(&format!("dnat -s 10.0.0.{i} --to 10.0.1.1")) }).collect();
        let e = compile(&rules, &ifindex).unwrap_err().to_string();
        assert!(e.contains("interface any, protocol any, port any"), "{e}");

        let many = vec![ok("dnat --to 10.0.0.1"); MAX_RULES as usize + 1];
        assert!(compile(&many, &ifindex).unwrap_err().to_string().contains("16385 rules"));

        // Five full-range rules on different (interface, protocol) pairs exceed the bucket map.
        let rules: Vec<Rule> = ["-p tcp", "-p udp", "-i eth0 -p tcp", "-i eth0 -p udp", "-i eth1 -p tcp"]
            .iter()
            .map(|m| ok(&format!("dnat {m} --dport 1-65535 --to 10.0.0.1")))
            .collect();
        compile(&rules[..4], &ifindex).unwrap();
        assert_eq!(compile(&rules, &ifindex).unwrap_err(), RuleError::TooManyBuckets);

        // Hand-built invalid rules are caught before they reach the maps.
        let mut bad = ok("dnat -p tcp --dport 80 --to 10.0.0.1");
        bad.id = 3;
        bad.proto = None;
        assert_eq!(
            compile(&[bad], &ifindex).unwrap_err().to_string(),
            format!("rule 3: {}", RuleError::PortNeedsProto)
        );
    }

    #[test]
    fn compile_10k_rules_is_fast() {
        let rules: Vec<Rule> = (0..10_000u32)
            .map(|i| Rule {
                id: i + 1,
                iface: None,
                oface: None,
                proto: Some(if i % 2 == 0 { Proto::Tcp } else { Proto::Udp }),
                src: None,
                dst: None,
                dport: Some(PortRange::single(1000 + (i / 2) as u16)),
                local: false,
                target: Target::Dnat { addr: Ipv4Addr::from(0x0a00_0000 + i), port: Some(80) },
            })
            .collect();
        let start = std::time::Instant::now();
        let c = compile(&rules, &ifindex).unwrap();
        let took = start.elapsed();
        assert_eq!((c.entries.len(), c.buckets.len()), (10_000, 10_000));
        // Timing is only meaningful with optimizations (`cargo test --release`).
        if !cfg!(debug_assertions) {
            assert!(took < std::time::Duration::from_millis(10), "compile took {took:?}");
        }
    }

    // ---- SNAT / MASQUERADE ----

    #[test]
    fn snat_to_parsing() {
        let r = |lo, hi| Some(PortRange { lo, hi });
        assert_eq!(parse_snat_to("203.0.113.5").unwrap(), (ip("203.0.113.5"), None));
        assert_eq!(parse_snat_to("203.0.113.5:20000-20099").unwrap(), (ip("203.0.113.5"), r(20000, 20099)));
        assert_eq!(parse_snat_to("203.0.113.5:1024").unwrap(), (ip("203.0.113.5"), r(1024, 1024)));
        for (bad, why) in [
            ("203.0.113.5:0", "port 0"),
            ("203.0.113.5:0-10", "port 0"),
            ("203.0.113.5:2000-1000", "low port is above"),
            ("203.0.113.5:1000:2000", "expected a port"),
            ("203.0.113.5:1000-70000", "out of range"),
            ("203.0.113.5:", "expected a port"),
            ("203.0.113.5-203.0.113.9", "address ranges"),
            ("0.0.0.0", "not a unicast"),
            ("gw", "not an IPv4 address"),
        ] {
            let e = parse_snat_to(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad --to {bad:?}: ")) && e.contains(why), "{bad}: {e}");
        }
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
            (
                "snat -p tcp --dport 80 --to 1.2.3.4",
                "--dport does not apply to snat; snat and masquerade rules match -o",
            ),
            ("masquerade -p tcp --destination-port 80", "--destination-port does not apply to masquerade"),
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

    #[test]
    fn snat_json_state_format() {
        let r = Rule { id: 5, ..ok("snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099") };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"id": 5, "oface": "eth1", "proto": "tcp", "src": "10.0.2.0/24",
                               "target": {"kind": "snat", "addr": "203.0.113.5", "ports": "20000-20099"}})
        );
        let m = Rule { id: 6, ..ok("masquerade -o eth1") };
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": 6, "oface": "eth1", "target": {"kind": "masquerade", "ports": null}})
        );
        assert_eq!(serde_json::from_value::<Rule>(json).unwrap(), m);
        // Old state files (no oface, no ports) still read.
        let back: Rule =
            serde_json::from_value(serde_json::json!({"id": 7, "target": {"kind": "masquerade"}})).unwrap();
        assert_eq!(back, Rule { id: 7, ..ok("masquerade") });
    }

    #[test]
    fn snat_duplicates_and_precedence() {
        let a = Rule { id: 1, ..ok("snat -o eth1 --to 203.0.113.5") };
        let b = Rule { id: 2, ..ok("snat -o eth1 --to 203.0.113.5") };
        let c = Rule { id: 3, ..ok("snat -o eth0 --to 203.0.113.5") };
        let d = Rule { id: 4, ..ok("masquerade -o eth1") };
        assert!(a.same_match_and_target(&b));
        assert!(!a.same_match_and_target(&c), "another out interface");
        assert!(!a.same_match_and_target(&d), "same match, other target");
        assert_eq!(check_duplicate(&[a.clone(), c.clone()], &b).unwrap_err(), RuleError::Duplicate { of: 1 });
        // -o ranks like -i: after -p, before the prefixes.
        let rules: Vec<Rule> = [
            (1, "masquerade"),
            (2, "masquerade -s 10.0.0.0/8"),
            (3, "masquerade -o eth1"),
            (4, "masquerade -o eth1 -p tcp"),
            (5, "snat -p udp -s 10.1.0.0/16 --to 203.0.113.5"),
        ]
        .iter()
        .map(|(id, s)| Rule { id: *id, ..ok(s) })
        .collect();
        assert_eq!(precedence_order(&rules), vec![3, 4, 2, 1, 0]);
    }

    const SNAT_TOML: &str = r#"
[[rule]]
kind = "snat"
oface = "eth1"
proto = "tcp"
src = "10.0.2.0/24"
to = "203.0.113.5:20000-20099"

[[rule]]
kind = "snat"
dst = "198.51.100.0/24"
to = "203.0.113.6"

[[rule]]
kind = "masquerade"
oface = "eth1"

[[rule]]
kind = "masquerade"
oface = "eth1"
proto = "udp"
to_ports = "1024-1027"

[[rule]]
kind = "masquerade"
proto = "tcp"
to_ports = 5000
"#;

    #[test]
    fn toml_snat_masquerade() {
        let rules = parse_config(SNAT_TOML).unwrap();
        let shown: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            shown,
            [
                "snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099",
                "snat -d 198.51.100.0/24 --to 203.0.113.6",
                "masquerade -o eth1",
                "masquerade -o eth1 -p udp --to-ports 1024-1027",
                "masquerade -p tcp --to-ports 5000",
            ]
        );
        assert_eq!(rules[4].target, Target::Masquerade { ports: Some(PortRange::single(5000)) });
        let text = to_config(&rules);
        assert!(text.contains("kind = \"snat\"\noface = \"eth1\"\n"), "{text}");
        assert!(text.contains("to = \"203.0.113.5:20000-20099\"\n") && text.contains("to_ports = \"1024-1027\"\n"));
        assert_eq!(parse_config(&text).unwrap(), rules);

        let one = |body: &str| parse_config(&format!("[[rule]]\nkind = \"masquerade\"\n[[rule]]\n{body}"));
        for (body, want) in [
            (
                "kind = \"snat\"\niface = \"eth0\"\nto = \"1.2.3.4\"",
                "[[rule]] #2, field iface: iface does not apply to snat; SNAT happens where packets leave: use oface",
            ),
            ("kind = \"masquerade\"\nproto = \"tcp\"\ndport = 80", "field dport: dport does not apply to masquerade"),
            (
                "kind = \"dnat\"\noface = \"eth1\"\nto = \"1.2.3.4\"",
                "field oface: oface does not apply to dnat; DNAT happens where packets arrive: use iface",
            ),
            ("kind = \"snat\"\noface = \"a/b\"\nto = \"1.2.3.4\"", "field oface: bad interface name \"a/b\""),
            ("kind = \"snat\"\nproto = \"tcp\"", "field to: snat needs to = \"ADDR[:LO-HI]\""),
            ("kind = \"snat\"\nto = \"1.2.3.4:80-90\"", "[[rule]] #2: --to with a port needs -p tcp or -p udp"),
            ("kind = \"snat\"\nto = \"1.2.3.4\"\nto_ports = \"1-2\"", "field to_ports: to_ports is for masquerade"),
            ("kind = \"masquerade\"\nto = \"1.2.3.4\"", "field to: to is for dnat and snat; masquerade takes to_ports"),
            ("kind = \"masquerade\"\nproto = \"tcp\"\nto_port = 80", "field to_port: to_port is for redirect"),
            ("kind = \"masquerade\"\nto_ports = \"1024-1027\"", "[[rule]] #2: --to-ports needs -p tcp or -p udp"),
            ("kind = \"masquerade\"\nproto = \"tcp\"\nto_ports = \"9-1\"", "field to_ports: bad port range \"9-1\""),
            ("kind = \"dnat\"\nproto = \"tcp\"\nto = \"1.2.3.4\"\nto_ports = 80", "field to_ports: to_ports is for"),
            ("kind = \"masquerade\"", "[[rule]] #2: duplicate of [[rule]] #1"),
        ] {
            let e = one(body).unwrap_err().to_string();
            assert!(e.contains(want), "{body:?}: got {e:?}, want {want:?}");
        }
    }

    #[test]
    fn compile_postrouting() {
        let rules = vec![
            Rule { id: 1, ..ok("dnat -p tcp --dport 80 --to 10.0.0.1") },
            Rule { id: 2, ..ok("snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099") },
            Rule { id: 3, ..ok("masquerade -o eth1") },
            Rule { id: 4, ..ok("masquerade -p udp --to-ports 1024-1027") },
            Rule { id: 5, ..ok("snat -d 198.51.100.0/24 --to 203.0.113.6") },
            Rule { id: 6, ..ok("dnat --to 10.0.0.2") },
        ];
        let c = compile(&rules, &ifindex).unwrap();
        assert_eq!(c.level_mask, level::PROTO_PORT | level::ANY);
        assert_eq!(c.snat_level_mask, level::IF_PROTO | level::PROTO | level::IF | level::ANY);
        let e = |slot: usize| c.entries[slot].1;
        assert_eq!(
            e(1),
            RuleEntry {
                rank: e(1).rank,
                id: 2,
                src_net: u32::from_ne_bytes([10, 0, 2, 0]),
                src_mask: u32::from_ne_bytes([255, 255, 255, 0]),
                dst_net: 0,
                dst_mask: 0,
                to_addr: u32::from_ne_bytes([203, 0, 113, 5]),
                to_port: 20000,
                to_port_hi: 20099,
                kind: kind::SNAT,
                proto: PROTO_TCP,
                _pad: [0; 2],
                ifindex: 3,
            }
        );
        assert_eq!(
            (e(2).kind, e(2).to_addr, e(2).to_port, e(2).to_port_hi, e(2).ifindex),
            (kind::MASQUERADE, 0, 0, 0, 3)
        );
        assert_eq!((e(3).to_port, e(3).to_port_hi, e(3).proto, e(3).ifindex), (1024, 1027, PROTO_UDP, 0));
        assert_eq!((e(4).kind, e(4).to_port, e(4).to_port_hi), (kind::SNAT, 0, 0), "no range: the kernel's default");
        assert_eq!(e(4).dst_net, u32::from_ne_bytes([198, 51, 100, 0]));
        assert_eq!((e(0).kind, e(0).to_port, e(0).to_port_hi), (kind::DNAT, 0, 0), "hi unused by DNAT");
        let slots = |at, ifx, proto| {
            let b = c.buckets[&bucket_key(at, ifx, proto, 0)];
            b.slots[..b.len as usize].to_vec()
        };
        let post = hook::POSTROUTING;
        assert_eq!(c.buckets.len(), 2 + 4);
        assert_eq!(slots(post, 3, PROTO_TCP), vec![1]);
        assert_eq!(slots(post, 3, PROTO_ANY), vec![2]);
        assert_eq!(slots(post, 0, PROTO_UDP), vec![3]);
        // The catch-all DNAT and the SNAT without -o/-p share (0, 0, 0) but not the hook.
        assert_eq!(slots(post, 0, PROTO_ANY), vec![4]);
        assert_eq!(slots(hook::PREROUTING, 0, PROTO_ANY), vec![5]);
        assert_eq!(c.buckets[&bucket_key(hook::PREROUTING, 0, PROTO_TCP, 80)].slots[0], 0);

        // -o must name an attached interface, like -i.
        let r = Rule { id: 9, ..ok("masquerade -o eth9") };
        assert_eq!(compile(&[r], &ifindex).unwrap_err().to_string(), "interface \"eth9\" (rule 9) is not attached");
        // Nine rules in one POSTROUTING bucket.
        let rules: Vec<Rule> =
            (1..=9).map(|i| Rule { id: i, ..ok(&format!("snat -o eth1 -s 10.0.0.{i} --to 203.0.113.1")) }).collect();
        compile(&rules[..8], &ifindex).unwrap();
        let e = compile(&rules, &ifindex).unwrap_err().to_string();
        assert!(e.contains("interface eth1, protocol any, port any") && e.contains("at most 8"), "{e}");
        // ...which does not fill the PREROUTING bucket of the same key.
        let mut mixed: Vec<Rule> = rules[..8].to_vec();
        mixed.extend((1..=8).map(|i| Rule { id: 10 + i, ..ok(&format!("dnat -i eth1 -s 10.0.0.{i} --to 10.9.0.1")) }));
        compile(&mixed, &ifindex).unwrap();
    }

    // ---- kernel simulation: the kernel and the iptables export agree ----

    struct Packet {
        /// The incoming interface at PREROUTING, the outgoing one at POSTROUTING.
        ifindex: u32,
        proto: u8,
        dport: u16,
        saddr: Ipv4Addr,
        daddr: Ipv4Addr,
    }

    /// What the BPF programs do: at ingress (PREROUTING) look up every level in `level_mask`, at egress
    /// (POSTROUTING) the four portless levels in `snat_level_mask` with the outgoing interface; check each slot,
    /// lowest rank wins.
    fn kernel_lookup(c: &Compiled, at: u8, pkt: &Packet) -> Option<usize> {
        let with_ports = pkt.proto == PROTO_TCP || pkt.proto == PROTO_UDP;
        let (mask, levels) = if at == hook::PREROUTING {
            (
                c.level_mask,
                vec![
                    (level::IF_PROTO_PORT, pkt.ifindex, pkt.proto, pkt.dport, with_ports),
                    (level::PROTO_PORT, 0, pkt.proto, pkt.dport, with_ports),
                    (level::IF_PROTO, pkt.ifindex, pkt.proto, 0, with_ports),
                    (level::PROTO, 0, pkt.proto, 0, with_ports),
                    (level::IF, pkt.ifindex, 0, 0, true),
                    (level::ANY, 0, 0, 0, true),
                ],
            )
        } else {
            (
                c.snat_level_mask,
                vec![
                    (level::IF_PROTO, pkt.ifindex, pkt.proto, 0, true),
                    (level::PROTO, 0, pkt.proto, 0, true),
                    (level::IF, pkt.ifindex, 0, 0, true),
                    (level::ANY, 0, 0, 0, true),
                ],
            )
        };
        let saddr = u32::from_ne_bytes(pkt.saddr.octets());
        let daddr = u32::from_ne_bytes(pkt.daddr.octets());
        let mut best: Option<(u32, usize)> = None;
        for (bit, ifx, proto, port, applies) in levels {
            if !applies || mask & bit == 0 {
                continue;
            }
            let Some(b) = c.buckets.get(&bucket_key(at, ifx, proto, port)) else {
                continue;
            };
            for &slot in &b.slots[..b.len as usize] {
                let e = &c.entries[slot as usize].1;
                let hit = (e.ifindex == 0 || e.ifindex == pkt.ifindex)
                    && (e.proto == PROTO_ANY || e.proto == pkt.proto)
                    && saddr & e.src_mask == e.src_net
                    && daddr & e.dst_mask == e.dst_net;
                if hit && best.is_none_or(|(rank, _)| e.rank < rank) {
                    best = Some((e.rank, slot as usize));
                }
            }
        }
        best.map(|(_, slot)| slot)
    }

    /// What iptables does with the exported order: the first rule of the hook's chain that matches. `ifname` is
    /// the incoming interface for PREROUTING (`-i`), the outgoing one for POSTROUTING (`-o`).
    fn first_match(rules: &[Rule], order: &[usize], post: bool, ifname: Option<&str>, pkt: &Packet) -> Option<usize> {
        let in_net = |n: &Option<Ipv4Net>, a: Ipv4Addr| n.is_none_or(|n| n.contains(&a));
        order.iter().copied().filter(|&i| rules[i].is_postrouting() == post).find(|&i| {
            let r = &rules[i];
            (r.hook_iface().is_none() || r.hook_iface() == ifname)
                && r.proto.is_none_or(|p| p.code() == pkt.proto)
                && r.dport.is_none_or(|d| d.contains(pkt.dport))
                && in_net(&r.src, pkt.saddr)
                && in_net(&r.dst, pkt.daddr)
        })
    }

    #[test]
    fn kernel_lowest_rank_equals_iptables_first_match() {
        // A small value space so rules overlap a lot.
        let ifaces = [None, Some("eth0"), Some("eth1")];
        let nets = [None, Some("10.0.0.0/8"), Some("10.1.0.0/16"), Some("10.1.2.3/32"), Some("10.1.2.0/24")];
        let ranges = [None, Some("80"), Some("81"), Some("80-81"), Some("79-82"), Some("1-100")];
        let addrs = ["10.1.2.3", "10.1.2.4", "10.2.0.1", "192.168.0.1"].map(ip);
        let mut rng = Rng(7);
        let (mut sets, mut packets, mut matched) = (0, [0; 2], [0; 2]);
        while sets < 300 {
            // Up to 24 rules per hook: SNAT/MASQUERADE rules share ranks with the DNAT rules, interleaved in the
            // list, but live in their own hook.
            let n = 1 + rng.below(48) as usize;
            let rules: Vec<Rule> = (0..n)
                .map(|i| {
                    let proto = rng.pick(&[None, Some(Proto::Tcp), Some(Proto::Udp)]);
                    let post = i % 2 == 1;
                    let dport =
                        if !post && proto.is_some() { rng.pick(&ranges).map(|s| s.parse().unwrap()) } else { None };
                    let iface = rng.pick(&ifaces).map(String::from);
                    let port = Some(i as u16 + 1).filter(|_| proto.is_some());
                    let target = match (post, rng.chance(50)) {
                        (false, _) => Target::Dnat { addr: ip("192.0.2.1"), port },
                        (true, true) => Target::Snat { addr: ip("192.0.2.1"), ports: port.map(PortRange::single) },
                        (true, false) => Target::Masquerade { ports: port.map(PortRange::single) },
                    };
                    Rule {
                        // Some equal ids, to exercise the list-order tie-break.
                        id: rng.below(n as u64) as u32,
                        iface: iface.clone().filter(|_| !post),
                        oface: iface.filter(|_| post),
                        proto,
                        src: rng.pick(&nets).map(net),
                        dst: rng.pick(&nets).map(net),
                        dport,
                        local: false,
                        target,
                    }
                })
                .collect();
            let c = match compile(&rules, &ifindex) {
                Ok(c) => c,
                Err(RuleError::BucketFull { .. }) => continue,
                Err(e) => panic!("{e}"),
            };
            sets += 1;
            let order = precedence_order(&rules);
            for _ in 0..200 {
                let proto = rng.pick(&[PROTO_TCP, PROTO_UDP, 1]);
                let dport = rng.pick(&[0, 1, 79, 80, 81, 82, 100, 101, 443]);
                let (saddr, daddr) = (rng.pick(&addrs), rng.pick(&addrs));
                let dport = if proto == 1 { 0 } else { dport };
                for (h, at) in [hook::PREROUTING, hook::POSTROUTING].into_iter().enumerate() {
                    let (ifname, ifx) = rng.pick(&[("eth0", 2), ("eth1", 3)]);
                    let pkt = Packet { ifindex: ifx, proto, dport, saddr, daddr };
                    let post = at == hook::POSTROUTING;
                    let want = first_match(&rules, &order, post, Some(ifname), &pkt);
                    assert_eq!(kernel_lookup(&c, at, &pkt), want, "hook {at}, rules: {rules:#?}");
                    packets[h] += 1;
                    matched[h] += want.is_some() as u32;
                }
            }
        }
        // Guard against a vacuous test: most packets should hit something, in both hooks.
        for h in 0..2 {
            assert!(matched[h] > packets[h] / 2, "hook {h}: {matched:?}/{packets:?}");
        }
    }
}
