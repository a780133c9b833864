//! Helpers shared by the rules tests (and the iptables tests): rules spelled the CLI way, parsed through the real
//! CLI (`pfwd add`), a small deterministic generator and a random valid rule.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::rules::*;

/// `pfwd add <s>` through the real CLI parser and the grammar.
pub(crate) fn p(s: &str) -> Result<Rule, String> {
    crate::cli::parse_rule(&s.split_whitespace().collect::<Vec<_>>())
}

pub(crate) fn ok(s: &str) -> Rule {
    p(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

pub(crate) fn err(s: &str) -> String {
    match p(s) {
        Ok(r) => panic!("{s}: accepted as {r}"),
        Err(e) => e.to_string(),
    }
}

pub(crate) fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

pub(crate) fn ip(s: &str) -> IpAddr {
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
pub(crate) fn random_rule(rng: &mut Rng) -> Rule {
    let post = rng.chance(30);
    let proto = match rng.below(3) {
        0 => None,
        1 => Some(Proto::Tcp),
        _ => Some(Proto::Udp),
    };
    // A quarter of the rules are IPv6 ones (every address of a rule is of one family).
    let v6 = rng.chance(25);
    let rand_net = |rng: &mut Rng| -> IpNet {
        if v6 {
            let len = rng.below(129) as u8;
            let a = Ipv6Addr::from(u128::from(rng.next()) << 64 | u128::from(rng.next()));
            return Ipv6Net::new(a, len).unwrap().trunc().into();
        }
        let len = rng.below(33) as u8;
        Ipv4Net::new(Ipv4Addr::from(rng.next() as u32), len).unwrap().trunc().into()
    };
    let rand_addr = |rng: &mut Rng| -> IpAddr {
        if v6 {
            // Global unicast (2000::/3), never ::1 (refused for DNAT) or an IPv4-mapped address.
            Ipv6Addr::from(0x2000u128 << 112 | (u128::from(rng.next()) << 64 | u128::from(rng.next())) >> 3).into()
        } else {
            Ipv4Addr::from((rng.below(0xdfff_ffff) + 1) as u32).into()
        }
    };
    let port = |rng: &mut Rng| (rng.below(65535) + 1) as u16;
    let range = |rng: &mut Rng| {
        let a = port(rng);
        let b = if rng.chance(50) { a } else { port(rng) };
        PortRange { lo: a.min(b), hi: a.max(b) }
    };
    let dport = if proto.is_some() && rng.chance(if post { 30 } else { 60 }) { Some(range(rng)) } else { None };
    let iface = if rng.chance(40) { Some(rng.pick(&["eth0", "wg0", "veth-a.1", "br_lan", "x"]).into()) } else { None };
    let target = if post {
        let ports = if proto.is_some() && rng.chance(60) { Some(range(rng)) } else { None };
        if rng.chance(50) { Target::Snat { addr: rand_addr(rng), ports } } else { Target::Masquerade { ports } }
    } else if proto.is_some() && rng.chance(40) {
        Target::Redirect { port: port(rng) }
    } else {
        let addr = rand_addr(rng);
        let port = if proto.is_some() && rng.chance(60) { Some(port(rng)) } else { None };
        Target::Dnat { addr, port }
    };
    let (iface, oface) = if post { (None, iface) } else { (iface, None) };
    let mut r = Rule {
        id: rng.below(1000) as u32 + 1,
        iface,
        oface,
        proto,
        src: if rng.chance(50) { Some(rand_net(rng)) } else { None },
        dst: if rng.chance(50) { Some(rand_net(rng)) } else { None },
        dport,
        local: false,
        hairpin: None,
        target,
        not: Negated::default(),
        dst_local: false,
        backends: Vec::new(),
        family: None,
    };
    // Negations (iptables' `!`) on what the rule has, and `-d local` for some DNAT/REDIRECT rules.
    r.not.src = r.src.is_some_and(|n| n.prefix_len() > 0) && rng.chance(15);
    r.not.dst = r.dst.is_some_and(|n| n.prefix_len() > 0) && rng.chance(15);
    r.not.iface = r.hook_iface().is_some() && rng.chance(15);
    r.dst_local = rng.chance(15);
    // --hairpin: a dnat rule with -d and without -i; the inside network within -s.
    if matches!(r.target, Target::Dnat { .. })
        && r.iface.is_none()
        && r.dst.is_some_and(|d| d.prefix_len() > 0)
        && r.not.is_none()
        && rng.chance(50)
    {
        let within = r.src.unwrap_or_else(|| rand_net(rng));
        let len = within.prefix_len().max(rng.below(u64::from(within.max_prefix_len()) + 1) as u8);
        r.hairpin = Some(IpNet::new(within.addr(), len).unwrap().trunc());
    }
    r
}

pub(crate) fn ifindex(name: &str) -> Option<u32> {
    match name {
        "eth0" => Some(2),
        "eth1" => Some(3),
        _ => None,
    }
}
