//! Rule matching and precedence as the README documents them ("Which rule wins"), over pfwd's rule type.

use std::cmp::Reverse;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pfwd::rules::{Rule, Target};

use super::packet::{Addr, TCP, Tuple, UDP};

/// The interface the fuzzer's programs see (BPF_PROG_TEST_RUN runs tc programs on lo) and its address.
pub const IFACE: &str = "lo";
pub const IFACE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// lo's IPv6 address as the fuzzer registers it (REDIRECT's target, MASQUERADE's source, `-d local`).
pub const IFACE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

/// The interface's address of a family (`v6`), as the model's [`Addr`].
pub fn iface_addr(v6: bool) -> Addr {
    if v6 { u128::from(IFACE_ADDR6) } else { u32::from(IFACE_ADDR) as Addr }
}

/// What a matching rule does to a new flow.
#[derive(Clone, Debug)]
pub enum Action {
    /// New destination; `port: None` keeps the port. With several backends (`--to a,b,...`) the destination is one
    /// of `backends`, chosen by the kernel (README: by hashing the flow's tuple); `addr`/`port` are the first.
    Dnat { addr: Addr, port: Option<u16>, backends: Vec<(Addr, Option<u16>)> },
    /// New source address; the source port is kept when free, else allocated in `ports` (default 1024-65535).
    Snat { addr: Addr, ports: Option<(u16, u16)> },
    /// REDIRECT: DNAT to the incoming interface's address of the packet's family (iptables and ip6tables alike).
    Redirect { port: u16 },
    /// MASQUERADE: SNAT to the outgoing interface's address of the packet's family. In BPF_PROG_TEST_RUN on lo the
    /// FIB lookup yields no source for the fuzzer's destinations, so pfwd uses lo's recorded address.
    Masquerade { ports: Option<(u16, u16)> },
}

impl Action {
    /// The action for a packet of a family (`v6`): REDIRECT and MASQUERADE become DNAT and SNAT to lo's address.
    pub fn resolve(&self, v6: bool) -> Action {
        match *self {
            Action::Redirect { port } => Action::Dnat { addr: iface_addr(v6), port: Some(port), backends: Vec::new() },
            Action::Masquerade { ports } => Action::Snat { addr: iface_addr(v6), ports },
            ref other => other.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct MRule {
    pub id: u32,
    pub postrouting: bool,
    /// An OUTPUT rule (`--local`): not a PREROUTING or POSTROUTING rule.
    pub local: bool,
    /// `-i`/`-o`: None matches every interface; Some(matches lo).
    pub iface: Option<bool>,
    pub proto: Option<u8>,
    /// The family the rule translates: Some(true) IPv6, Some(false) IPv4, None both (a rule without addresses and
    /// without `-4`/`-6`).
    pub v6: Option<bool>,
    /// `-s`/`-d` as (network, mask, prefix length).
    pub src: Option<(Addr, Addr, u8)>,
    pub dst: Option<(Addr, Addr, u8)>,
    pub dport: Option<(u16, u16)>,
    /// iptables' `!` on -s, -d and -i/-o (README: a negated match matches what is outside it).
    pub not_src: bool,
    pub not_dst: bool,
    pub not_iface: bool,
    /// `-d local`: the destination is one of this host's addresses (the fuzzer's host has one: lo's).
    pub dst_local: bool,
    pub action: Action,
}

impl MRule {
    /// The rule's kind for the coverage summary ("redirect", "masquerade without addresses", ...).
    pub fn kind(&self) -> String {
        let kind = match self.action {
            Action::Dnat { .. } => "dnat",
            Action::Snat { .. } => "snat",
            Action::Redirect { .. } => "redirect",
            Action::Masquerade { .. } => "masquerade",
        };
        let bare = self.src.is_none()
            && self.dst.is_none()
            && !matches!(self.action, Action::Dnat { .. } | Action::Snat { .. });
        match (bare, self.v6) {
            (false, _) => kind.to_string(),
            (true, None) => format!("{kind} without addresses, both families"),
            (true, Some(_)) => format!("{kind} without addresses, one family"),
        }
    }
}

fn net(n: Option<ipnet::IpNet>) -> Option<(Addr, Addr, u8)> {
    n.map(|n| {
        let (addr, mask) = (addr(n.addr()), addr(n.netmask()));
        (addr & mask, mask, n.prefix_len())
    })
}

fn addr(a: IpAddr) -> Addr {
    match a {
        IpAddr::V4(a) => u32::from(a) as Addr,
        IpAddr::V6(a) => a.into(),
    }
}

/// The family a rule translates, by ip(6)tables' semantics: that of its addresses (`-s`, `-d`, the DNAT or SNAT
/// address; pfwd refuses mixed ones), else its `-4`/`-6`, else both.
fn family(r: &Rule) -> Option<bool> {
    let target = match r.target {
        Target::Dnat { addr, .. } | Target::Snat { addr, .. } => Some(addr),
        Target::Redirect { .. } | Target::Masquerade { .. } => None,
    };
    let first = r.src.map(|n| n.addr()).or(r.dst.map(|n| n.addr())).or(target);
    first.map(|a| a.is_ipv6()).or(r.family.map(|f| f == pfwd::rules::model::Family::Ipv6))
}

impl MRule {
    pub fn from_rule(r: &Rule) -> MRule {
        let iface = r.hook_iface().map(|i| i == IFACE);
        let action = match r.target {
            Target::Dnat { addr: a, port } => {
                let backends = r.backends.iter().map(|b| (addr(b.addr), b.port)).collect();
                Action::Dnat { addr: addr(a), port, backends }
            }
            Target::Redirect { port } => Action::Redirect { port },
            Target::Snat { addr: a, ports } => Action::Snat { addr: addr(a), ports: ports.map(|p| (p.lo, p.hi)) },
            Target::Masquerade { ports } => Action::Masquerade { ports: ports.map(|p| (p.lo, p.hi)) },
        };
        MRule {
            id: r.id,
            postrouting: r.is_postrouting(),
            local: r.local && !r.is_postrouting(),
            iface,
            proto: r.proto.map(|p| p.code()),
            v6: family(r),
            src: net(r.src),
            dst: net(r.dst),
            dport: r.dport.map(|p| (p.lo, p.hi)),
            not_src: r.not.src,
            not_dst: r.not.dst,
            not_iface: r.not.iface,
            dst_local: r.dst_local,
            action,
        }
    }

    /// Whether the rule matches the new flow `t` of a family (`v6`).
    fn matches(&self, t: &Tuple, v6: bool) -> bool {
        let inside =
            |n: Option<(Addr, Addr, u8)>, a: Addr, not: bool| n.is_none_or(|(net, mask, _)| (a & mask == net) != not);
        self.v6.is_none_or(|f| f == v6)
            && self.iface.is_none_or(|on_lo| on_lo != self.not_iface)
            && self.proto.is_none_or(|p| p == t.proto)
            && inside(self.src, t.src, self.not_src)
            && inside(self.dst, t.dst, self.not_dst)
            && (!self.dst_local || t.dst == iface_addr(v6))
            && self.dport.is_none_or(|(lo, hi)| (t.proto == TCP || t.proto == UDP) && (lo..=hi).contains(&t.dport))
    }

    /// README "Which rule wins": with --dport beats without, narrower range beats wider; with -p; with -i/-o; the
    /// longer source prefix; the longer destination prefix; the older rule. A negated match counts as none;
    /// `--dst-type local` ranks just above the same -d without it.
    fn rank(&self) -> impl Ord {
        let src = if self.not_src { 0 } else { 2 * self.src.map_or(0, |s| s.2 as u16) };
        let dst = if self.not_dst { 0 } else { 2 * self.dst.map_or(0, |d| d.2 as u16) } + u16::from(self.dst_local);
        (
            self.dport.is_none(),
            self.dport.map_or(0, |(lo, hi)| hi - lo),
            self.proto.is_none(),
            self.iface.is_none() || self.not_iface,
            Reverse(src),
            Reverse(dst),
            self.id,
        )
    }
}

/// The most specific rule of the PREROUTING (`postrouting == false`) or POSTROUTING set matching a new flow of a
/// family (`v6`).
pub fn lookup<'a>(rules: &'a [MRule], postrouting: bool, t: &Tuple, v6: bool) -> Option<&'a MRule> {
    rules.iter().filter(|r| r.postrouting == postrouting && r.matches(t, v6)).min_by_key(|r| r.rank())
}
