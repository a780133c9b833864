//! The rule model: what one rule matches ([`Proto`], [`PortRange`], prefixes, interfaces) and does ([`Target`]),
//! its checks ([`Rule::validate`]), duplicate detection, and its printing in CLI syntax. Values are parsed in
//! [`super::value`]; rules are written by users through [`super::draft`].

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use pfwd_common::maps::{MAX_BACKENDS, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};

use super::draft::Kind;
use super::error::RuleError;
use super::value::{check_to_addr, port_number, validate_iface};

/// Transport protocol a rule matches. Absent (`None` in [`Rule`]) means every protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IP protocol number, as stored in [`RuleEntry::proto`] and [`IndexKey::proto`].
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
        // Compared in place, not lowercased into a new string (every imported rule with -p comes here twice).
        let is = |name: &str| s.eq_ignore_ascii_case(name);
        if is("tcp") || s == "6" {
            Ok(Proto::Tcp)
        } else if is("udp") || s == "17" {
            Ok(Proto::Udp)
        } else {
            Err(RuleError::BadProto { input: s.to_string() })
        }
    }
}

/// An IP family. A rule's family follows its addresses ([`Rule::family`]); a rule without any applies to both,
/// unless `-4` / `-6` restrict it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        if addr.is_ipv4() { Family::Ipv4 } else { Family::Ipv6 }
    }

    pub fn of_net(net: &IpNet) -> Family {
        Family::of(net.addr())
    }

    /// The CLI flag restricting a rule to this family.
    pub fn flag(self) -> &'static str {
        match self {
            Family::Ipv4 => "-4",
            Family::Ipv6 => "-6",
        }
    }

    /// The config file's and the JSON's name.
    pub fn key(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

/// `ADDR` or, for an IPv6 address with a port, `[ADDR]` (ip6tables' form, so the port's colon is not read as part of
/// the address).
pub fn fmt_addr_port(addr: IpAddr, port: Option<&dyn fmt::Display>) -> String {
    match (addr, port) {
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    }
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
    Dnat { addr: IpAddr, port: Option<u16> },
    /// `-j REDIRECT --to-ports PORT`: to the incoming interface's primary address.
    Redirect { port: u16 },
    /// `-j SNAT --to-source ADDR[:LO-HI]`: the source becomes `addr`; the source port is kept when free, else taken
    /// from `ports` (`None`: from 1024-65535).
    Snat { addr: IpAddr, ports: Option<PortRange> },
    /// `-j MASQUERADE [--to-ports LO-HI]`: SNAT to the outgoing interface's current primary address.
    Masquerade { ports: Option<PortRange> },
}

impl Target {
    pub fn kind(&self) -> Kind {
        match self {
            Target::Dnat { .. } => Kind::Dnat,
            Target::Redirect { .. } => Kind::Redirect,
            Target::Snat { .. } => Kind::Snat,
            Target::Masquerade { .. } => Kind::Masquerade,
        }
    }

    pub fn kind_name(&self) -> &'static str {
        self.kind().name()
    }

    /// SNAT and MASQUERADE rewrite the source where packets leave (iptables POSTROUTING); DNAT and REDIRECT the
    /// destination where they arrive (PREROUTING).
    pub fn is_postrouting(&self) -> bool {
        self.kind().is_postrouting()
    }
}

/// The target in CLI syntax: `--to ADDR[:PORT]`, `--to-port PORT`, `--to ADDR[:LO-HI]`, `[--to-ports LO-HI]`
/// (empty for a masquerade without ports).
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Dnat { addr, port: Some(p) } => write!(f, "--to {}", fmt_addr_port(*addr, Some(p))),
            Target::Dnat { addr, port: None } => write!(f, "--to {addr}"),
            Target::Redirect { port } => write!(f, "--to-port {port}"),
            Target::Snat { addr, ports: Some(r) } => write!(f, "--to {}", fmt_addr_port(*addr, Some(r))),
            Target::Snat { addr, ports: None } => write!(f, "--to {addr}"),
            Target::Masquerade { ports: Some(r) } => write!(f, "--to-ports {r}"),
            Target::Masquerade { ports: None } => Ok(()),
        }
    }
}

/// Most total weight of one rule's backends: each backend keeps at least a few entries of the rule's Maglev table.
pub const MAX_TOTAL_WEIGHT: u32 = 1000;

/// One backend of a DNAT rule with several (`--to 10.0.2.2:80,10.0.2.3:80@2`): its address, port (`None` keeps the
/// original destination port) and weight (its share of new flows is its weight over the total).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    pub addr: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

fn is_one(w: &u32) -> bool {
    *w == 1
}

impl Backend {
    pub fn new(addr: IpAddr, port: Option<u16>) -> Self {
        Backend { addr, port, weight: 1 }
    }
}

/// `ADDR[:PORT][@WEIGHT]`, the weight only when it is not 1.
impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&fmt_addr_port(self.addr, self.port.as_ref().map(|p| p as &dyn fmt::Display)))?;
        if self.weight != 1 {
            write!(f, "@{}", self.weight)?;
        }
        Ok(())
    }
}

/// Backends as `--to` takes them: comma-separated.
pub fn fmt_backends(backends: &[Backend]) -> String {
    backends.iter().map(Backend::to_string).collect::<Vec<_>>().join(",")
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
    pub src: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<PortRange>,
    /// `--local`: applies to connections made by local processes (iptables OUTPUT) instead of arriving packets.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    pub target: Target,
    /// `--hairpin CIDR` (DNAT only): hosts of this inside network may use the public address too; their
    /// connections are masqueraded by the rule's [`Rule::hairpin_companion`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hairpin: Option<IpNet>,
    /// `!` before `-s`, `-d`, `-i` or `-o` (iptables' negation): the rule matches what is *not* that network or
    /// interface.
    #[serde(default, skip_serializing_if = "Negated::is_none")]
    pub not: Negated,
    /// `-d local` (iptables' `-m addrtype --dst-type LOCAL`): the destination is one of this host's addresses, as
    /// the routing table says when the packet arrives (so it follows address changes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dst_local: bool,
    /// A DNAT rule's backends when it has several (empty otherwise, the target being the one): every one, the first
    /// also in `target` (so code that looks at the target's address sees the first backend). Set it with
    /// [`Rule::set_dnat_backends`]; read it with [`Rule::dnat_backends`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// `-4` / `-6`: the family of a rule that has no address (which otherwise applies to both). A rule with
    /// addresses has theirs, and [`Rule::normalize`] drops a restriction that says the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
}

/// Which matches of a rule are negated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Negated {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub src: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dst: bool,
    /// `! -i` or `! -o` (the rule's one interface).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub iface: bool,
}

impl Negated {
    pub fn is_none(&self) -> bool {
        !(self.src || self.dst || self.iface)
    }
}

/// See [`Rule::dedup_key`]: interfaces, protocol, family, (network, mask) of source and destination, ports,
/// `--local`, target, hairpin network, negations and `-d local`.
pub type DedupKey = (
    Option<String>,
    Option<String>,
    (Option<Proto>, Option<Family>),
    (u128, u128),
    (u128, u128),
    Option<PortRange>,
    bool,
    Target,
    Option<(u128, u128)>,
    (Negated, bool),
    Vec<Backend>,
);

/// `(network, mask)` of an IPv4 prefix in host order; an absent prefix is `0/0`, so `None` and `0.0.0.0/0` behave
/// the same. (The kernel's IPv4 rule index; callers hold IPv4 rules only.)
pub(super) fn net_mask(n: Option<IpNet>) -> (u32, u32) {
    match n {
        Some(IpNet::V4(n)) => {
            let mask = u32::from(n.netmask());
            (u32::from(n.addr()) & mask, mask)
        }
        _ => (0, 0),
    }
}

/// `(network, mask)` of a prefix of either family as 128-bit numbers (IPv4 in the low 32 bits; the rule's family
/// tells them apart): what duplicate detection compares.
fn net_mask_any(n: Option<IpNet>) -> (u128, u128) {
    match n {
        Some(IpNet::V4(_)) => {
            let (net, mask) = net_mask(n);
            (net.into(), mask.into())
        }
        Some(IpNet::V6(n)) => {
            let mask = u128::from(n.netmask());
            (u128::from(n.addr()) & mask, mask)
        }
        None => (0, 0),
    }
}

pub(super) fn prefix_len(n: Option<IpNet>) -> u8 {
    n.map_or(0, |n| n.prefix_len())
}

impl Rule {
    /// A rule doing `target` that matches everything (id 0): the base the front ends and `--hairpin` fill in, so a new
    /// field is defaulted in one place.
    pub fn new(target: Target) -> Rule {
        Rule {
            id: 0,
            iface: None,
            oface: None,
            proto: None,
            src: None,
            dst: None,
            dport: None,
            local: false,
            target,
            hairpin: None,
            not: Negated::default(),
            dst_local: false,
            backends: Vec::new(),
            family: None,
        }
    }

    /// Every address the rule names, with the option that names it (for messages): what its family follows. An
    /// iterator, not a list: [`Rule::family`] asks for the first one of every rule, many times per change.
    fn addresses(&self) -> impl Iterator<Item = (&'static str, IpAddr)> + '_ {
        let to = match self.target {
            Target::Dnat { addr, .. } | Target::Snat { addr, .. } => Some(("--to", addr)),
            _ => None,
        };
        (self.src.map(|n| ("-s", n.addr())).into_iter())
            .chain(self.dst.map(|n| ("-d", n.addr())))
            .chain(self.hairpin.map(|n| ("--hairpin", n.addr())))
            .chain(to)
            .chain(self.backends.iter().map(|b| ("--to", b.addr)))
    }

    /// The one family the rule applies to, or `None` for both (a rule without addresses or `-4`/`-6`). For a rule
    /// that mixes families (refused by [`Rule::validate`]) the family of its first address.
    pub fn family(&self) -> Option<Family> {
        self.addresses().next().map(|(_, a)| Family::of(a)).or(self.family)
    }

    /// Whether the rule applies to packets of `family`.
    pub fn applies_to(&self, family: Family) -> bool {
        self.family().is_none_or(|f| f == family)
    }

    /// A rule translates one family: its addresses (and `-4`/`-6`) must agree.
    fn check_family(&self) -> Result<(), RuleError> {
        // Named (formatted) only when they disagree: this runs for every rule of every change.
        #[derive(Clone, Copy)]
        enum Named {
            Flag(Family),
            Addr(&'static str, IpAddr),
        }
        let family = |n: Named| match n {
            Named::Flag(f) => f,
            Named::Addr(_, a) => Family::of(a),
        };
        let name = |n: Named| match n {
            Named::Flag(f) => f.flag().to_string(),
            Named::Addr(opt, a) => format!("{opt} {a}"),
        };
        let mut named =
            self.family.map(Named::Flag).into_iter().chain(self.addresses().map(|(o, a)| Named::Addr(o, a)));
        if let Some(first) = named.next()
            && let Some(other) = named.find(|n| family(*n) != family(first))
        {
            let (f, g) = (family(first), family(other));
            return Err(RuleError::MixedFamilies { detail: format!("{} is {f}, {} is {g}", name(first), name(other)) });
        }
        Ok(())
    }

    /// Clears host bits of the prefixes (iptables accepts `192.168.1.5/24` and means `192.168.1.0/24`).
    pub fn normalize(&mut self) {
        self.src = self.src.map(|n| n.trunc());
        self.dst = self.dst.map(|n| n.trunc());
        self.hairpin = self.hairpin.map(|n| n.trunc());
        // `-4 -d 10.0.0.1` is `-d 10.0.0.1`: the restriction is kept only where the addresses do not say it.
        let first = self.addresses().next().map(|(_, a)| a);
        if let Some(a) = first
            && self.family == Some(Family::of(a))
        {
            self.family = None;
        }
        // Weights only matter in proportion (`@4,@2` is `@2,@1`): the smallest whole ones, so that equal rules
        // compare equal whichever way they were written (an iptables ladder gives the proportions only).
        let gcd = self.backends.iter().map(|b| b.weight).fold(0, gcd);
        if gcd > 1 {
            for b in &mut self.backends {
                b.weight /= gcd;
            }
        }
    }

    /// The rule a `--hairpin CIDR` DNAT rule adds: `masquerade [-p PROTO] -s CIDR -d TO` with the same id, so
    /// connections from the inside network that the DNAT sends back toward the inside leave with the router's
    /// address on the interface toward the backend, and the replies come back through the router to be
    /// un-NATed. It has no `-o`: the outgoing interface is the one toward the backend, whichever that is.
    pub fn hairpin_companion(&self) -> Option<Rule> {
        let (inside, Target::Dnat { addr, .. }) = (self.hairpin?, self.target) else { return None };
        Some(Rule {
            id: self.id,
            proto: self.proto,
            src: Some(inside),
            dst: Some(IpNet::from(addr)),
            ..Rule::new(Target::Masquerade { ports: None })
        })
    }

    /// A DNAT rule's backends: its several ones, or its one target with weight 1 (none for other kinds).
    pub fn dnat_backends(&self) -> Vec<Backend> {
        match self.target {
            Target::Dnat { .. } if !self.backends.is_empty() => self.backends.clone(),
            Target::Dnat { addr, port } => vec![Backend::new(addr, port)],
            _ => Vec::new(),
        }
    }

    /// Makes the rule a DNAT to `backends` (at least one): one backend is a plain target (its weight means nothing
    /// then and is dropped), several are kept in [`Rule::backends`] with the first as the target.
    pub fn set_dnat_backends(&mut self, backends: Vec<Backend>) {
        let first = backends[0];
        self.target = Target::Dnat { addr: first.addr, port: first.port };
        self.backends = if backends.len() > 1 { backends } else { Vec::new() };
    }

    /// Checks a rule's several backends (see `--to`'s help).
    fn check_backends(&self) -> Result<(), RuleError> {
        let b = &self.backends;
        if b.is_empty() {
            return Ok(());
        }
        let input = fmt_backends(b);
        let bad = |reason: String| Err(RuleError::BadTo { input: input.clone(), reason });
        let Target::Dnat { addr, port } = self.target else {
            return bad(format!("several backends are for dnat rules, not {}", self.kind_name()));
        };
        if b.len() < 2 || (addr, port) != (b[0].addr, b[0].port) {
            return bad("the backends list must have two or more, the first being the target".into());
        }
        if b.len() > MAX_BACKENDS {
            return bad(format!("{} backends; at most {MAX_BACKENDS} are supported", b.len()));
        }
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        for x in b {
            check_to_addr(x.addr).map_err(|r| RuleError::BadTo { input: input.clone(), reason: r.into() })?;
            if x.port == Some(0) {
                return bad("port 0 is not allowed (1-65535)".into());
            }
            if x.weight == 0 {
                return bad(format!("{}: a weight is 1 or more", x.addr));
            }
            if !seen.insert((x.addr, x.port)) {
                return bad(format!("{} is given twice", Backend { weight: 1, ..*x }));
            }
            total += x.weight;
        }
        if total > MAX_TOTAL_WEIGHT {
            return bad(format!("the weights add up to {total}; at most {MAX_TOTAL_WEIGHT}"));
        }
        if b.iter().any(|x| x.port.is_some()) && self.proto.is_none() {
            return Err(RuleError::ToPortNeedsProto);
        }
        if b.iter().any(|x| x.port.is_some() != b[0].port.is_some()) {
            return bad("give every backend a port, or none (to keep the original port)".into());
        }
        if self.local {
            return Err(RuleError::Unsupported(
                "several backends are not supported with --local (local connections are translated at connect \
                 time, before their source port is known)"
                    .into(),
            ));
        }
        if self.hairpin.is_some() {
            return Err(RuleError::Unsupported("--hairpin takes a rule with one backend".into()));
        }
        Ok(())
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
            return Err(wrong_hook(self.target.kind(), "-i"));
        }
        if !post && self.oface.is_some() {
            return Err(wrong_hook(self.target.kind(), "-o"));
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
        self.check_family()?;
        self.check_negation_and_local()?;
        self.check_backends()?;
        if let Some(inside) = self.hairpin {
            self.check_hairpin(inside)?;
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
                // Every backend: `--to [2001:db8::2]:80,[::1]:80` would send some arriving connections to ::1.
                // (check_backends made the first backend the target; no list is built for the usual one backend.)
                let loopback6 = |a: IpAddr| a.is_ipv6() && a.is_loopback();
                if !self.local && (loopback6(addr) || self.backends.iter().any(|b| loopback6(b.addr))) {
                    return Err(RuleError::Unsupported(
                        "--to ::1 works for --local rules only: Linux does not route arriving packets to ::1 (IPv6 \
                         has no route_localnet); use redirect --to-port PORT, which delivers them to the same local \
                         service on the address they arrived at"
                            .into(),
                    ));
                }
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

    /// `!` needs something to negate; `-d local` replaces a -d network and applies where packets arrive.
    fn check_negation_and_local(&self) -> Result<(), RuleError> {
        let no = |why: &str| Err(RuleError::Unsupported(why.into()));
        if self.not.src && prefix_len(self.src) == 0 {
            return no("! -s needs a network to exclude (! -s 0.0.0.0/0 or ::/0 would match nothing)");
        }
        if self.not.dst && prefix_len(self.dst) == 0 {
            return no(if self.dst_local {
                "! -d local is not supported (match the networks to exclude instead)"
            } else {
                "! -d needs a network to exclude (! -d 0.0.0.0/0 or ::/0 would match nothing)"
            });
        }
        if self.not.iface && self.hook_iface().is_none() {
            return no("! -i / ! -o needs an interface to exclude");
        }
        Ok(())
    }

    /// `--hairpin CIDR`'s checks: see its `--help`.
    fn check_hairpin(&self, inside: IpNet) -> Result<(), RuleError> {
        let no = |why: &str| Err(RuleError::Unsupported(format!("--hairpin {why}")));
        if !matches!(self.target, Target::Dnat { .. }) {
            return no(&format!("applies to dnat rules only, not {}", self.kind_name()));
        }
        if self.local {
            return no("does not apply to --local rules: local connections are not forwarded");
        }
        if self.iface.is_some() {
            return no("does not go with -i: the rule must also match connections arriving from the inside network \
                 (say which address is public with -d instead)");
        }
        if self.not.dst || self.not.src {
            return no("does not go with ! -s or ! -d: say the public address with -d and the inside network with \
                 --hairpin");
        }
        if prefix_len(self.dst) == 0 {
            return no("needs -d, the public address inside hosts connect to: without it, every connection from the \
                 inside network to that port, whatever its destination, would be sent to the --to address");
        }
        if let Some(src) = self.src
            && !src.contains(&inside)
        {
            return no(&format!(
                "{}: -s {} does not contain it, so the rule would never match its hosts",
                fmt_net(&inside),
                fmt_net(&src)
            ));
        }
        Ok(())
    }

    /// A key equal for two rules exactly when [`Rule::same_match_and_target`] holds, so duplicates among many
    /// rules are found with a hash set instead of comparing every pair.
    pub fn dedup_key(&self) -> DedupKey {
        (
            self.iface.clone(),
            self.oface.clone(),
            (self.proto, self.family()),
            net_mask_any(self.src),
            net_mask_any(self.dst),
            self.dport,
            self.local,
            self.target,
            self.hairpin.map(|n| net_mask_any(Some(n))),
            (self.not, self.dst_local),
            self.backends.clone(),
        )
    }

    /// True when both rules match the same packets and do the same thing (ids are ignored). Such a pair is a
    /// duplicate. Same match with a different target is not a duplicate: precedence picks the older rule.
    pub fn same_match_and_target(&self, other: &Rule) -> bool {
        self.iface == other.iface
            && self.oface == other.oface
            && self.proto == other.proto
            && self.family() == other.family()
            && net_mask_any(self.src) == net_mask_any(other.src)
            && net_mask_any(self.dst) == net_mask_any(other.dst)
            && self.dport == other.dport
            && self.local == other.local
            && self.target == other.target
            && self.hairpin.map(|n| net_mask_any(Some(n))) == other.hairpin.map(|n| net_mask_any(Some(n)))
            && self.not == other.not
            && self.dst_local == other.dst_local
            && self.backends == other.backends
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The error for `-i`/`--dport` on a SNAT/MASQUERADE rule or `-o` on a DNAT/REDIRECT one (`option` as written, or
/// the TOML field). iptables refuses `-i` in POSTROUTING and `-o` in PREROUTING; pfwd's POSTROUTING rules have no
/// port level.
pub(super) fn wrong_hook(kind: Kind, option: &str) -> RuleError {
    let hint = match (kind, option) {
        (Kind::Snat, "iface") => "SNAT happens where packets leave: use oface",
        (Kind::Masquerade, "iface") => "MASQUERADE happens where packets leave: use oface",
        (Kind::Snat, "-i" | "--in-interface") => "SNAT happens where packets leave: use -o",
        (Kind::Masquerade, "-i" | "--in-interface") => "MASQUERADE happens where packets leave: use -o",
        (Kind::Snat | Kind::Masquerade, _) => {
            "snat and masquerade rules match -o, -p, -s, -d and --dport (the source port is what they rewrite)"
        }
        (Kind::Dnat, "oface") => "DNAT happens where packets arrive: use iface",
        (Kind::Redirect, "oface") => "REDIRECT happens where packets arrive: use iface",
        (Kind::Dnat, _) => "DNAT happens where packets arrive: use -i",
        (Kind::Redirect, _) => "REDIRECT happens where packets arrive: use -i",
    };
    RuleError::WrongTarget { option: option.to_string(), kind: kind.name(), hint: hint.into() }
}

pub(super) fn fmt_net(n: &IpNet) -> String {
    let n = n.trunc();
    if n.prefix_len() == n.max_prefix_len() { n.addr().to_string() } else { n.to_string() }
}

/// The rule in pfwd CLI syntax (without the id), e.g.
/// `dnat -i eth0 -p tcp -s 192.168.1.0/24 --dport 59999 --to 127.0.0.1:17355` or
/// `snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099`. `pfwd add` reads it back.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind_name())?;
        if let Some(family) = self.family {
            write!(f, " {}", family.flag())?;
        }
        if self.local {
            f.write_str(" --local")?;
        }
        // A name starting with '-' is valid (the kernel and iptables take `-i -x`) but would read as an option:
        // attached with `=`, `pfwd add` reads it back.
        let sep = |name: &str| if name.starts_with('-') { "=" } else { " " };
        // iptables' form: `! -s 10.0.0.0/8` (pfwd add reads it back).
        let bang = |negated: bool| if negated { " !" } else { "" };
        if let Some(i) = &self.iface {
            write!(f, "{} -i{}{i}", bang(self.not.iface), sep(i))?;
        }
        if let Some(o) = &self.oface {
            write!(f, "{} -o{}{o}", bang(self.not.iface), sep(o))?;
        }
        if let Some(p) = self.proto {
            write!(f, " -p {p}")?;
        }
        if let Some(s) = &self.src {
            write!(f, "{} -s {}", bang(self.not.src), fmt_net(s))?;
        }
        match (&self.dst, self.dst_local) {
            (Some(d), local) => {
                write!(f, "{} -d {}", bang(self.not.dst), fmt_net(d))?;
                if local {
                    f.write_str(" --dst-type local")?;
                }
            }
            (None, true) => f.write_str(" -d local")?,
            (None, false) => {}
        }
        if let Some(p) = self.dport {
            write!(f, " --dport {p}")?;
        }
        match self.target {
            Target::Masquerade { ports: None } => {}
            Target::Dnat { .. } if !self.backends.is_empty() => write!(f, " --to {}", fmt_backends(&self.backends))?,
            t => write!(f, " {t}")?,
        }
        if let Some(h) = &self.hairpin {
            write!(f, " --hairpin {}", fmt_net(h))?;
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {

    use crate::rules::model::Family;
    use crate::rules::tests::*;
    use crate::rules::*;

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
        let r = Rule::new(Target::Dnat { addr: ip("10.0.0.1"), port: Some(80) });
        assert_eq!(r.validate().unwrap_err(), RuleError::ToPortNeedsProto);
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

    /// Found by the `cli_rule` fuzz target: `pfwd add snat -o-hth1 ...` was accepted, and printed as `-o -hth1`,
    /// which `pfwd add` rejects (a value starting with '-' reads as an option).
    #[test]
    fn display_reads_back_interface_names_starting_with_a_dash() {
        for (args, shown) in [
            (
                "snat -o-hth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000",
                "snat -o=-hth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000",
            ),
            ("dnat -i=-x --to 10.0.0.2", "dnat -i=-x --to 10.0.0.2"),
            ("masquerade --out-interface=- -p udp", "masquerade -o=- -p udp"),
            ("redirect -i=-a=b -p tcp --to-port 80", "redirect -i=-a=b -p tcp --to-port 80"),
        ] {
            let r = ok(args);
            assert_eq!(r.to_string(), shown);
            assert_eq!(ok(shown), r, "{shown}");
        }
        assert_eq!(ok("dnat -i eth0 --to 10.0.0.2").to_string(), "dnat -i eth0 --to 10.0.0.2");
    }

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

    /// IPv6 addresses and `-4`/`-6` in the state file: the family only when the rule has one of its own (old
    /// state files, without it, read as before).
    #[test]
    fn ipv6_json_state_format() {
        let r = Rule { id: 8, ..ok("dnat -p tcp -d 2001:db8::/32 --dport 80 --to [2001:db8::2]:8080") };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": 8, "proto": "tcp", "dst": "2001:db8::/32", "dport": "80",
                               "target": {"kind": "dnat", "addr": "2001:db8::2", "port": 8080}})
        );
        assert_eq!(serde_json::from_value::<Rule>(json).unwrap(), r);
        let m = Rule { id: 9, ..ok("masquerade -6 -o eth1") };
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": 9, "oface": "eth1", "family": "ipv6", "target": {"kind": "masquerade", "ports": null}})
        );
        assert_eq!(serde_json::from_value::<Rule>(json).unwrap(), m);
        assert!(!serde_json::to_string(&ok("masquerade -o eth1")).unwrap().contains("family"));
        let e = serde_json::from_value::<Rule>(serde_json::json!({"family": "ipx", "target": {"kind": "masquerade"}}));
        assert!(e.unwrap_err().to_string().contains("ipx"));
    }

    #[test]
    fn family_of_rules() {
        for (rule, family) in [
            ("masquerade", None),
            ("redirect -p tcp --to-port 80", None),
            ("masquerade -6", Some(Family::Ipv6)),
            ("redirect -4 -p tcp --to-port 80", Some(Family::Ipv4)),
            ("masquerade -s fd00::/8", Some(Family::Ipv6)),
            ("masquerade -d 10.0.0.0/8", Some(Family::Ipv4)),
            ("redirect -p tcp -d ::/0 --to-port 80", Some(Family::Ipv6)),
            ("dnat --to 2001:db8::2", Some(Family::Ipv6)),
            ("snat --to 10.0.0.1", Some(Family::Ipv4)),
            ("dnat --to 2001:db8::2,2001:db8::3", Some(Family::Ipv6)),
        ] {
            let r = ok(rule);
            assert_eq!(r.family(), family, "{rule}");
            assert_eq!(r.applies_to(Family::Ipv4), family != Some(Family::Ipv6), "{rule}");
            assert_eq!(r.applies_to(Family::Ipv6), family != Some(Family::Ipv4), "{rule}");
        }
        // A --hairpin rule's companion masquerade is of the rule's family.
        let h = ok("dnat -d 2001:db8::10 --to 2001:db8::2 --hairpin 2001:db8:2::/64").hairpin_companion().unwrap();
        assert_eq!(
            (h.family(), h.to_string()),
            (Some(Family::Ipv6), "masquerade -s 2001:db8:2::/64 -d 2001:db8::2".into())
        );
        assert_eq!((Family::Ipv6.flag(), Family::Ipv6.key(), Family::Ipv6.to_string()), ("-6", "ipv6", "IPv6".into()));
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
}
