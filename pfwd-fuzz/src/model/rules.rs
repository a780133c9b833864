//! Rule matching and precedence as the README documents them ("Which rule wins"), over pfwd's rule type.

use std::cmp::Reverse;
use std::net::Ipv4Addr;

use pfwd::rules::{Rule, Target};

use super::packet::{TCP, Tuple, UDP};

/// The interface the fuzzer's programs see (BPF_PROG_TEST_RUN runs tc programs on lo) and its address.
pub const IFACE: &str = "lo";
pub const IFACE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);

/// What a matching rule does to a new flow.
#[derive(Clone, Debug)]
pub enum Action {
    /// New destination; `port: None` keeps the port. With several backends (`--to a,b,...`) the destination is one
    /// of `backends`, chosen by the kernel (README: by hashing the flow's tuple); `addr`/`port` are the first.
    Dnat { addr: u32, port: Option<u16>, backends: Vec<(u32, Option<u16>)> },
    /// New source address; the source port is kept when free, else allocated in `ports` (default 1024-65535).
    Snat { addr: u32, ports: Option<(u16, u16)> },
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
    pub src: Option<(u32, u32, u8)>,
    pub dst: Option<(u32, u32, u8)>,
    pub dport: Option<(u16, u16)>,
    /// iptables' `!` on -s, -d and -i/-o (README: a negated match matches what is outside it).
    pub not_src: bool,
    pub not_dst: bool,
    pub not_iface: bool,
    /// `-d local`: the destination is one of this host's addresses (the fuzzer's host has one: lo's).
    pub dst_local: bool,
    pub action: Action,
}

/// The fuzzer drives the kernel's IPv4 data path: its rules have IPv4 addresses only.
fn net(n: Option<ipnet::IpNet>) -> Option<(u32, u32, u8)> {
    n.map(|n| match n {
        ipnet::IpNet::V4(n) => {
            let mask = u32::from(n.netmask());
            (u32::from(n.addr()) & mask, mask, n.prefix_len())
        }
        ipnet::IpNet::V6(_) => unreachable!("the fuzzer generates IPv4 rules"),
    })
}

fn v4(a: std::net::IpAddr) -> u32 {
    match a {
        std::net::IpAddr::V4(a) => a.into(),
        std::net::IpAddr::V6(_) => unreachable!("the fuzzer generates IPv4 rules"),
    }
}

impl MRule {
    pub fn from_rule(r: &Rule) -> MRule {
        let iface = r.hook_iface().map(|i| i == IFACE);
        let action = match r.target {
            Target::Dnat { addr, port } => {
                let backends = r.backends.iter().map(|b| (v4(b.addr), b.port)).collect();
                Action::Dnat { addr: v4(addr), port, backends }
            }
            Target::Redirect { port } => {
                Action::Dnat { addr: IFACE_ADDR.into(), port: Some(port), backends: Vec::new() }
            }
            Target::Snat { addr, ports } => Action::Snat { addr: v4(addr), ports: ports.map(|p| (p.lo, p.hi)) },
            // MASQUERADE: the address the kernel would use through the outgoing interface. In BPF_PROG_TEST_RUN on lo
            // the FIB lookup yields no source for the fuzzer's destinations, so pfwd uses lo's recorded address.
            Target::Masquerade { ports } => {
                Action::Snat { addr: IFACE_ADDR.into(), ports: ports.map(|p| (p.lo, p.hi)) }
            }
        };
        MRule {
            id: r.id,
            postrouting: r.is_postrouting(),
            local: r.local && !r.is_postrouting(),
            iface,
            proto: r.proto.map(|p| p.code()),
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

    fn matches(&self, t: &Tuple) -> bool {
        let inside =
            |n: Option<(u32, u32, u8)>, a: u32, not: bool| n.is_none_or(|(net, mask, _)| (a & mask == net) != not);
        self.iface.is_none_or(|on_lo| on_lo != self.not_iface)
            && self.proto.is_none_or(|p| p == t.proto)
            && inside(self.src, t.src, self.not_src)
            && inside(self.dst, t.dst, self.not_dst)
            && (!self.dst_local || t.dst == u32::from(IFACE_ADDR))
            && self.dport.is_none_or(|(lo, hi)| (t.proto == TCP || t.proto == UDP) && (lo..=hi).contains(&t.dport))
    }

    /// README "Which rule wins": with --dport beats without, narrower range beats wider; with -p; with -i/-o; the
    /// longer source prefix; the longer destination prefix; the older rule. A negated match counts as none;
    /// `--dst-type local` ranks just above the same -d without it.
    fn rank(&self) -> impl Ord {
        let src = if self.not_src { 0 } else { 2 * self.src.map_or(0, |s| s.2) };
        let dst = if self.not_dst { 0 } else { 2 * self.dst.map_or(0, |d| d.2) } + u8::from(self.dst_local);
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

/// The most specific rule of the PREROUTING (`postrouting == false`) or POSTROUTING set matching a new flow.
pub fn lookup<'a>(rules: &'a [MRule], postrouting: bool, t: &Tuple) -> Option<&'a MRule> {
    rules.iter().filter(|r| r.postrouting == postrouting && r.matches(t)).min_by_key(|r| r.rank())
}
