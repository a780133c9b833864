//! Rule sets and packet streams from a seed. Packets are built with etherparse; a stream is generated as it runs
//! (replies and ICMP errors are built from what the programs actually put out), and recorded as concrete
//! (hook, frame) steps so that a divergence can be replayed and minimised.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpFragOffset, IpNumber, Ipv4Header,
    Ipv6FlowLabel, Ipv6Header, TcpHeader, UdpHeader,
    icmpv4::{DestUnreachableHeader, ParameterProblemHeader, TimeExceededCode},
};
use pfwd::rules::Rule;

use crate::model::Hook;
use crate::model::packet::{self, Addr, ETH, Frag, IPV6_HLEN, L4, Parsed};

/// SplitMix64: small, fast, and the same stream for the same seed everywhere.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.u64() % n.max(1)
    }

    /// True with probability `pct`%.
    pub fn pct(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

const fn a(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

/// Small address and port pools, so flows collide, share reply tuples and hit the rules often.
const CLIENTS: [Ipv4Addr; 4] = [a(10, 0, 1, 2), a(10, 0, 1, 3), a(192, 168, 1, 7), a(192, 168, 5, 9)];
const CPORTS: [u16; 7] = [40000, 40001, 5000, 20001, 20002, 80, 1023];
const DSTS: [Ipv4Addr; 4] = [a(10, 0, 1, 1), a(203, 0, 113, 10), a(10, 0, 2, 2), a(10, 9, 3, 4)];
const DPORTS: [u16; 7] = [53, 80, 8080, 8081, 8000, 8002, 9000];
const HOP: Ipv4Addr = a(198, 51, 100, 1);

const fn b(x: u16, y: u16, z: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, x, y, 0, 0, 0, z)
}

/// The IPv6 pools (documentation and unique-local addresses only): 2001:db8:1::1 is lo's address.
const CLIENTS6: [Ipv6Addr; 4] = [b(1, 0, 2), b(1, 0, 3), b(5, 0, 9), Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7)];
const DSTS6: [Ipv6Addr; 4] = [b(1, 0, 1), b(0xff, 0, 0x10), b(2, 0, 2), b(9, 3, 4)];
/// Share of new conversations that are IPv6 (%).
const IPV6_PCT: u64 = 30;

/// A model address as an `IpAddr` of its family.
fn ip_addr(a: Addr, v6: bool) -> IpAddr {
    if v6 { IpAddr::V6(Ipv6Addr::from(a)) } else { IpAddr::V4(Ipv4Addr::from(a as u32)) }
}

/// A random valid rule set of 1 to 5 rules (3% of the time none) (ids 1..), every kind, overlapping matches.
pub fn rules(rng: &mut Rng) -> Vec<Rule> {
    // Now and then none: fragments of unknown datagrams then pass instead of being dropped.
    if rng.pct(3) {
        return Vec::new();
    }
    let n = 1 + rng.below(5) as usize;
    let mut out: Vec<Rule> = Vec::new();
    let mut tries = 0;
    while out.len() < n && tries < 100 {
        tries += 1;
        let text = rule_text(rng);
        let argv: Vec<&str> = text.split_whitespace().collect();
        let Ok(mut r) = pfwd::cli::parse_rule(&argv) else { continue };
        if pfwd::rules::check_duplicate(&out, &r).is_err() {
            continue;
        }
        r.id = out.len() as u32 + 1;
        out.push(r);
    }
    out
}

/// A rule change for the middle of a stream: some of `current` kept (same ids), some dropped, some new ones added
/// (new ids), still valid and without duplicates.
pub fn changed_rules(rng: &mut Rng, current: &[Rule]) -> Vec<Rule> {
    let mut out: Vec<Rule> = current.iter().filter(|_| rng.pct(70)).cloned().collect();
    let mut next_id = current.iter().map(|r| r.id).max().unwrap_or(0) + 1;
    for _ in 0..rng.below(3) {
        for _ in 0..20 {
            let text = rule_text(rng);
            let argv: Vec<&str> = text.split_whitespace().collect();
            let Ok(mut r) = pfwd::cli::parse_rule(&argv) else { continue };
            if pfwd::rules::check_duplicate(&out, &r).is_err() {
                continue;
            }
            r.id = next_id;
            next_id += 1;
            out.push(r);
            break;
        }
    }
    out
}

fn rule_text(rng: &mut Rng) -> String {
    // The rule's family: IPv4 addresses, IPv6 addresses, or none at all (REDIRECT and MASQUERADE only, for both
    // families unless `-4`/`-6` says one; the IPv4 kinds without -s/-d are such rules too).
    let fam = rng.below(100);
    let (v6, bare) = ((50..85).contains(&fam), fam >= 85);
    let kind = if bare {
        rng.pick(&["redirect", "masquerade"])
    } else {
        rng.pick(&["dnat", "dnat", "dnat", "redirect", "snat", "snat", "masquerade", "masquerade"])
    };
    let post = kind == "snat" || kind == "masquerade";
    let mut s = kind.to_string();
    if bare && rng.pct(30) {
        s += rng.pick(&[" -4", " -6"]);
    }
    // iptables' `!` now and then on -i/-o, -s and -d; `-d local` on some DNAT/REDIRECT rules.
    let bang = |rng: &mut Rng| if rng.pct(20) { " !" } else { "" };
    if rng.pct(30) {
        s += bang(rng);
        s += if post { " -o lo" } else { " -i lo" };
    }
    let proto = if kind == "redirect" || rng.pct(if post { 50 } else { 70 }) { rng.pick(&["tcp", "udp"]) } else { "" };
    if !proto.is_empty() {
        s += &format!(" -p {proto}");
    }
    if !bare && rng.pct(25) {
        s += bang(rng);
        let src = if v6 {
            rng.pick(&["2001:db8:1::/64", "2001:db8:1::2", "2001:db8::/32", "fd00::/8", "2001:db8:5::9"])
        } else {
            rng.pick(&["10.0.1.0/24", "192.168.1.7", "192.168.0.0/16", "10.0.1.2", "10.0.0.0/8"])
        };
        s += &format!(" -s {src}");
    }
    if rng.pct(10) {
        s += " --dst-type local";
    }
    if !bare && rng.pct(30) {
        s += bang(rng);
        let d = match (post, v6) {
            (true, false) => rng.pick(&["10.0.2.2", "10.0.2.0/24", "203.0.113.10", "10.0.0.0/8"]),
            (false, false) => rng.pick(&["10.0.1.1", "203.0.113.10", "10.0.0.0/8", "10.9.0.0/16"]),
            (true, true) => rng.pick(&["2001:db8:2::2", "2001:db8:2::/64", "2001:db8:ff::10", "2001:db8::/32"]),
            (false, true) => rng.pick(&["2001:db8:1::1", "2001:db8:ff::10", "2001:db8::/32", "2001:db8:9::/48"]),
        };
        s += &format!(" -d {d}");
    }
    if !proto.is_empty() && rng.pct(if post { 30 } else { 70 }) {
        // Single ports, short ranges, and ranges the kernel splits into many prefix blocks: everything, and
        // everything but 8080 (two rules).
        let p = rng.pick(&[
            "53",
            "80",
            "8080",
            "8081",
            "8000-8003",
            "8080-8081",
            "50-60",
            "9000",
            "1-65535",
            "1-8079",
            "8081-65535",
            "1024-65535",
        ]);
        s += &format!(" --dport {p}");
    }
    let ports = ["20000-20001", "20000-20003", "40000-40002", "5000", "1000-1100", "20001-20002"];
    match kind {
        "dnat" => {
            let to = if v6 {
                rng.pick(&["2001:db8:2::2", "2001:db8:2::3", "2001:db8:1::3", "fd00::2"])
            } else {
                rng.pick(&["10.0.2.2", "10.0.2.3", "127.0.0.1", "10.0.1.3"])
            };
            let port = (!proto.is_empty() && rng.pct(50)).then(|| rng.pick(&[9000, 80, 53, 8080]));
            let one = |to: &str, port: Option<u16>| match port {
                None => to.to_string(),
                Some(p) if v6 => format!("[{to}]:{p}"),
                Some(p) => format!("{to}:{p}"),
            };
            if rng.pct(15) {
                // Several backends, some weighted.
                let list = if v6 {
                    ["2001:db8:2::2", "2001:db8:2::3", "2001:db8:2::4"]
                } else {
                    ["10.0.2.2", "10.0.2.3", "10.0.2.4"]
                };
                let n = 2 + rng.below(2) as usize;
                let parts: Vec<String> = list[..n]
                    .iter()
                    .map(|b| if rng.pct(30) { format!("{}@{}", one(b, port), 1 + rng.below(3)) } else { one(b, port) })
                    .collect();
                s += &format!(" --to {}", parts.join(","));
            } else {
                s += &format!(" --to {}", one(to, port));
            }
        }
        "redirect" => s += &format!(" --to-port {}", rng.pick(&[3128, 80, 8080])),
        "snat" => {
            let to = if v6 {
                rng.pick(&["2001:db8:ff::5", "2001:db8:2::1"])
            } else {
                rng.pick(&["203.0.113.5", "10.0.2.1"])
            };
            if !proto.is_empty() && rng.pct(60) {
                let to = if v6 { format!("[{to}]") } else { to.to_string() };
                s += &format!(" --to {to}:{}", rng.pick(&ports));
            } else {
                s += &format!(" --to {to}");
            }
        }
        _ => {
            if !proto.is_empty() && rng.pct(50) {
                s += &format!(" --to-ports {}", rng.pick(&ports));
            }
        }
    }
    s
}

/// A transport header to build.
#[derive(Clone, Copy, Debug)]
pub enum Spec {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
        csum: bool,
    },
    Echo {
        id: u16,
        request: bool,
    },
    /// A protocol without ports (GRE).
    Gre,
}

/// An IPv4 datagram, or an IPv6 packet (TCP or UDP, no extension headers; the IPv4-only fields unused), to build.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: Spec,
    pub payload_len: usize,
    pub options: Vec<u8>,
    pub ttl: u8,
    pub ident: u16,
    pub df: bool,
    pub mf: bool,
    pub frag_offset: u16,
}

impl Pkt {
    fn new(rng: &mut Rng, src: IpAddr, dst: IpAddr, l4: Spec) -> Self {
        let mut p = Pkt {
            src,
            dst,
            l4,
            payload_len: rng.pick(&[0, 0, 1, 7, 18, 64]),
            options: vec![],
            ttl: rng.pick(&[1, 61, 64, 255]),
            ident: rng.u64() as u16,
            df: rng.pct(50),
            mf: false,
            frag_offset: 0,
        };
        if p.v6() {
            return p;
        }
        if rng.pct(8) {
            p.options = options(rng);
        }
        if rng.pct(3) {
            if rng.pct(50) {
                p.mf = true;
            } else {
                p.frag_offset = 1 + rng.below(200) as u16;
                p.mf = rng.pct(50);
            }
        }
        p
    }

    pub fn v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// The IP datagram's bytes (no Ethernet header), every checksum computed by etherparse.
    pub fn ip_bytes(&self, rng_payload: u8) -> Vec<u8> {
        let payload: Vec<u8> = (0..self.payload_len).map(|i| rng_payload.wrapping_add(i as u8 * 37)).collect();
        if let (IpAddr::V6(src), IpAddr::V6(dst)) = (self.src, self.dst) {
            return self.ip6_bytes(src, dst, &payload);
        }
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (self.src, self.dst) else { panic!("mixed families") };
        let (proto, hlen) = match self.l4 {
            Spec::Tcp { .. } => (IpNumber::TCP, TcpHeader::MIN_LEN),
            Spec::Udp { .. } => (IpNumber::UDP, UdpHeader::LEN),
            Spec::Echo { .. } => (IpNumber::ICMP, 8),
            Spec::Gre => (IpNumber::GRE, 4),
        };
        let mut ip = Ipv4Header::new(0, self.ttl, proto, src.octets(), dst.octets()).expect("header");
        ip.identification = self.ident;
        ip.dont_fragment = self.df;
        ip.more_fragments = self.mf;
        ip.fragment_offset = IpFragOffset::try_new(self.frag_offset).expect("offset");
        ip.options = self.options.as_slice().try_into().expect("options");
        ip.set_payload_len(hlen + payload.len()).expect("length");
        ip.header_checksum = ip.calc_header_checksum();
        let mut out = Vec::with_capacity(96);
        ip.write_raw(&mut out).expect("write");
        match self.l4 {
            Spec::Tcp { sport, dport, flags } => {
                let mut t = tcp_header(sport, dport, flags);
                t.checksum = t.calc_checksum_ipv4(&ip, &payload).expect("tcp checksum");
                out.extend_from_slice(&t.to_bytes());
            }
            Spec::Udp { sport, dport, csum } => {
                let mut u = UdpHeader::without_ipv4_checksum(sport, dport, payload.len()).expect("udp");
                if csum {
                    u.checksum = u.calc_checksum_ipv4(&ip, &payload).expect("udp checksum");
                }
                out.extend_from_slice(&u.to_bytes());
            }
            Spec::Echo { id, request } => {
                let e = IcmpEchoHeader { id, seq: 7 };
                let ty = if request { Icmpv4Type::EchoRequest(e) } else { Icmpv4Type::EchoReply(e) };
                out.extend_from_slice(&Icmpv4Header::with_checksum(ty, &payload).to_bytes());
            }
            Spec::Gre => out.extend_from_slice(&[0, 0, 0x08, 0]),
        }
        out.extend_from_slice(&payload);
        out
    }

    /// The IPv6 packet's bytes: the fixed header (the TTL as hop limit, the IP id as flow label), then TCP, UDP or
    /// an ICMPv6 echo with the checksum etherparse computes over the IPv6 pseudo-header (always present).
    fn ip6_bytes(&self, src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
        let (proto, hlen) = match self.l4 {
            Spec::Tcp { .. } => (IpNumber::TCP, TcpHeader::MIN_LEN),
            Spec::Udp { .. } => (IpNumber::UDP, UdpHeader::LEN),
            Spec::Echo { .. } => (IpNumber::IPV6_ICMP, 8),
            Spec::Gre => panic!("no IPv6 GRE in the fuzzer"),
        };
        let ip = Ipv6Header {
            traffic_class: (self.ident >> 8) as u8,
            flow_label: Ipv6FlowLabel::try_new(self.ident as u32).expect("flow label"),
            payload_length: (hlen + payload.len()) as u16,
            next_header: proto,
            hop_limit: self.ttl,
            source: src.octets(),
            destination: dst.octets(),
        };
        let mut out = Vec::with_capacity(96);
        ip.write(&mut out).expect("write");
        match self.l4 {
            Spec::Tcp { sport, dport, flags } => {
                let mut t = tcp_header(sport, dport, flags);
                t.checksum = t.calc_checksum_ipv6(&ip, payload).expect("tcp checksum");
                out.extend_from_slice(&t.to_bytes());
            }
            Spec::Udp { sport, dport, .. } => {
                let mut u = UdpHeader::without_ipv4_checksum(sport, dport, payload.len()).expect("udp");
                u.checksum = u.calc_checksum_ipv6(&ip, payload).expect("udp checksum");
                out.extend_from_slice(&u.to_bytes());
            }
            Spec::Echo { id, request } => {
                let e = IcmpEchoHeader { id, seq: 7 };
                let ty = if request { Icmpv6Type::EchoRequest(e) } else { Icmpv6Type::EchoReply(e) };
                let h = Icmpv6Header::with_checksum(ty, src.octets(), dst.octets(), payload).expect("icmpv6");
                out.extend_from_slice(&h.to_bytes());
            }
            Spec::Gre => unreachable!(),
        }
        out.extend_from_slice(payload);
        out
    }
}

fn options(rng: &mut Rng) -> Vec<u8> {
    let len = rng.pick(&[4usize, 8, 12, 40]);
    let mut o: Vec<u8> = (0..len).map(|_| rng.pick(&[1u8, 1, 1, 0])).collect();
    if rng.pct(50) {
        o[..4].copy_from_slice(&[0x94, 4, 0, 0]); // router alert
    }
    o
}

/// An Ethernet frame around the IP datagram `ip` (its ethertype by the IP version).
pub fn eth(ip: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH + ip.len());
    let ty = if ip.first().is_some_and(|v| v >> 4 == 6) { packet::ETHERTYPE_IPV6 } else { packet::ETHERTYPE_IPV4 };
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&ty.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// An ICMP error frame from `src` to `dst` about the datagram `inner` (possibly cut short).
fn icmp_error(rng: &mut Rng, src: Ipv4Addr, dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let ty = match rng.below(5) {
        0 => Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        1 => Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host),
        2 => Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }),
        3 => Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
        _ => Icmpv4Type::ParameterProblem(ParameterProblemHeader::PointerIndicatesError(20)),
    };
    let icmp = Icmpv4Header::with_checksum(ty, inner);
    let mut ip = Ipv4Header::new(0, 64, IpNumber::ICMP, src.octets(), dst.octets()).expect("header");
    ip.identification = rng.u64() as u16;
    if rng.pct(5) {
        ip.options = options(rng).as_slice().try_into().expect("options");
    }
    ip.set_payload_len(icmp.header_len() + inner.len()).expect("length");
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    ip.write_raw(&mut out).expect("write");
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(inner);
    eth(&out)
}

/// One conversation of the stream: what its client sent first, and the last frames that came out of the programs
/// in each direction (for replies and ICMP errors).
struct Conv {
    /// A stable name: positions in `Stream::convs` shift as old conversations go, while fragments wait in the queue.
    id: u64,
    first: Pkt,
    /// The forward direction's frame after the last hook it went through (a first fragment, if it was cut).
    out_fwd: Option<Vec<u8>>,
    /// A later fragment of the forward direction after the last hook (for ICMP errors that quote one).
    out_later: Option<Vec<u8>>,
    /// A reply's frame after the last hook.
    out_reply: Option<Vec<u8>>,
    /// Goes through ingress then egress (forwarded), or egress only (locally generated).
    forwarded: bool,
}

/// Which frame of its conversation a send's output is.
#[derive(Clone, Copy, Debug)]
enum Part {
    Fwd,
    FwdLater,
    Reply,
}

/// What the stream asks to be sent next: a frame and the hooks it crosses in turn (each hook gets the previous one's
/// output).
pub struct Send {
    pub frame: Vec<u8>,
    pub hooks: &'static [Hook],
    conv: Option<(u64, Part)>,
}

const FORWARDED: &[Hook] = &[Hook::Ingress, Hook::Egress];
const LOCAL_OUT: &[Hook] = &[Hook::Egress];
const LOCAL_IN: &[Hook] = &[Hook::Ingress];

/// Share of TCP/UDP/echo/GRE datagrams sent as fragments (%), and of ICMP errors.
const FRAGMENTED_PCT: u64 = 10;
const FRAGMENTED_ERROR_PCT: u64 = 8;

/// The packet stream of one rule set.
pub struct Stream {
    convs: Vec<Conv>,
    next_id: u64,
    /// Fragments of datagrams already begun, in the order they are to be sent (other traffic may come in between).
    queue: VecDeque<Send>,
    /// How many of each fragment case were generated (the run's report adds them up).
    pub made: BTreeMap<String, u64>,
}

impl Default for Stream {
    fn default() -> Self {
        Self::new()
    }
}

impl Stream {
    pub fn new() -> Self {
        Stream { convs: Vec::new(), next_id: 0, queue: VecDeque::new(), made: BTreeMap::new() }
    }

    fn count(&mut self, what: impl Into<String>) {
        *self.made.entry(what.into()).or_default() += 1;
    }

    /// The next frame to send.
    pub fn next(&mut self, rng: &mut Rng) -> Send {
        // A datagram's fragments mostly follow each other, sometimes with other traffic in between.
        let mut s = match self.queue.pop_front() {
            Some(s) if rng.pct(80) => s,
            Some(s) => {
                self.queue.push_front(s);
                self.pick(rng)
            }
            None => self.pick(rng),
        };
        if rng.pct(12) {
            if packet::be16(&s.frame, 12) == packet::ETHERTYPE_IPV6 {
                mutate6(rng, &mut s.frame);
            } else {
                mutate(rng, &mut s.frame);
            }
        }
        s
    }

    fn pick(&mut self, rng: &mut Rng) -> Send {
        let roll = rng.below(100);
        if self.convs.is_empty() || roll < 25 || self.convs.len() < 3 && roll < 50 {
            return self.start(rng);
        }
        let i = if rng.pct(60) {
            self.convs.len() - 1 - rng.below(self.convs.len().min(4) as u64) as usize
        } else {
            rng.below(self.convs.len() as u64) as usize
        };
        let c = &self.convs[i];
        let id = c.id;
        if roll < 55 {
            // The client again, same tuple.
            let mut p = c.first.clone();
            p.l4 = match p.l4 {
                Spec::Tcp { sport, dport, .. } => Spec::Tcp {
                    sport,
                    dport,
                    flags: rng.pick(&[0x10, 0x18, 0x18, 0x11, 0x04, 0x14, 0x02, 0x12, 0x03, 0x00]),
                },
                Spec::Udp { sport, dport, .. } => Spec::Udp { sport, dport, csum: rng.pct(85) || p.v6() },
                other => other,
            };
            p.payload_len = rng.pick(&[0, 5, 30]);
            let hooks = if c.forwarded { FORWARDED } else { LOCAL_OUT };
            return self.datagram(rng, p, hooks, Some((id, Part::Fwd)), "the client again");
        }
        if roll < 85 {
            // A reply to what came out, or an error about it.
            let Some(mut out) = c.out_fwd.clone() else { return self.start(rng) };
            let hooks = if c.forwarded { FORWARDED } else { LOCAL_IN };
            let mut quoted = "a whole datagram";
            if roll >= 75
                && rng.pct(30)
                && let Some(later) = &c.out_later
            {
                // An error quoting a later fragment (which no router sends, RFC 1812): never translated as an error.
                out = later.clone();
                quoted = "a later fragment";
            }
            let Some(ip) = packet::parse(&out).ip() else { return self.start(rng) };
            if roll < 75 {
                let Some(t) = ip.tuple() else { return self.start(rng) };
                let (src, dst) = (ip_addr(t.dst, ip.v6), ip_addr(t.src, ip.v6));
                let l4 = match ip.l4 {
                    L4::Tcp { .. } => Spec::Tcp {
                        sport: t.dport,
                        dport: t.sport,
                        flags: rng.pick(&[0x12, 0x12, 0x10, 0x18, 0x11, 0x14, 0x04]),
                    },
                    L4::Udp { .. } => Spec::Udp { sport: t.dport, dport: t.sport, csum: rng.pct(85) || ip.v6 },
                    L4::Echo { id, .. } => Spec::Echo { id, request: false },
                    _ => Spec::Gre,
                };
                let p = Pkt::new(rng, src, dst, l4);
                return self.datagram(rng, p, hooks, Some((id, Part::Reply)), "a reply");
            }
            // An ICMP error about the forward datagram, from its destination or a router on the way. (Not about an
            // IPv6 one: the model does not predict ICMPv6.)
            if ip.v6 {
                return self.start(rng);
            }
            if ip.frag == Frag::First {
                quoted = "a first fragment";
            }
            let (src, dst) = (Ipv4Addr::from(ip.dst as u32), Ipv4Addr::from(ip.src as u32));
            let esrc = if rng.pct(60) { src } else { HOP };
            let inner = &out[ETH..ip.end];
            let cut = if rng.pct(40) { (ip.l4_at - ETH + 8).min(inner.len()) } else { inner.len() };
            let frame = icmp_error(rng, esrc, dst, &inner[..cut]);
            self.count(format!("ICMP error quoting {quoted}"));
            return self.error(rng, frame, hooks);
        }
        // The client reports a reply it got as undeliverable.
        let Some(reply) = c.out_reply.clone() else { return self.start(rng) };
        let Parsed::Ipv4(ip) = packet::parse(&reply) else { return self.start(rng) };
        let inner = &reply[ETH..ip.end];
        let hooks = if c.forwarded { FORWARDED } else { LOCAL_OUT };
        let frame = icmp_error(rng, Ipv4Addr::from(ip.dst as u32), Ipv4Addr::from(ip.src as u32), inner);
        self.error(rng, frame, hooks)
    }

    fn start(&mut self, rng: &mut Rng) -> Send {
        let v6 = rng.pct(IPV6_PCT);
        let (src, dst) = if v6 {
            (IpAddr::V6(rng.pick(&CLIENTS6)), IpAddr::V6(rng.pick(&DSTS6)))
        } else {
            (IpAddr::V4(rng.pick(&CLIENTS)), IpAddr::V4(rng.pick(&DSTS)))
        };
        let (sport, dport) = (rng.pick(&CPORTS), rng.pick(&DPORTS));
        // IPv6: TCP, UDP and echo only (the model does not predict other ICMPv6 or other protocols over IPv6).
        let kinds = if v6 { 19 } else { 20 };
        let l4 = match rng.below(kinds) {
            0..=8 => Spec::Tcp { sport, dport, flags: if rng.pct(90) { packet::SYN } else { 0x10 } },
            9..=14 => Spec::Udp { sport, dport, csum: rng.pct(80) || v6 },
            15..=18 => Spec::Echo { id: rng.pick(&[0x77, 0x78, 1, 40000]), request: true },
            _ => Spec::Gre,
        };
        let p = Pkt::new(rng, src, dst, l4);
        let forwarded = rng.pct(70);
        let id = self.next_id;
        self.next_id += 1;
        self.convs.push(Conv { id, first: p.clone(), out_fwd: None, out_later: None, out_reply: None, forwarded });
        if self.convs.len() > 64 {
            self.convs.remove(0);
        }
        self.datagram(rng, p, if forwarded { FORWARDED } else { LOCAL_OUT }, Some((id, Part::Fwd)), "a new client")
    }

    /// The datagram `p` as sent: mostly whole, sometimes (with more payload) cut into fragments.
    fn datagram(
        &mut self,
        rng: &mut Rng,
        mut p: Pkt,
        hooks: &'static [Hook],
        conv: Option<(u64, Part)>,
        who: &str,
    ) -> Send {
        let seed = rng.u64() as u8;
        // IPv6 packets are sent whole: the model does not predict IPv6 fragments.
        if p.v6() || p.mf || p.frag_offset != 0 || !rng.pct(FRAGMENTED_PCT) {
            return Send { frame: eth(&p.ip_bytes(seed)), hooks, conv };
        }
        p.payload_len = rng.pick(&[9, 24, 40, 64, 100, 180]);
        p.df = false;
        let what = match p.l4 {
            Spec::Tcp { .. } => "TCP",
            Spec::Udp { .. } => "UDP",
            Spec::Echo { .. } => "echo",
            Spec::Gre => "GRE",
        };
        self.count(format!("fragmented {what} datagram: {who}"));
        self.fragments(rng, &p.ip_bytes(seed), hooks, conv)
    }

    /// The ICMP error `frame` as sent: mostly whole, sometimes cut into fragments.
    fn error(&mut self, rng: &mut Rng, frame: Vec<u8>, hooks: &'static [Hook]) -> Send {
        if !rng.pct(FRAGMENTED_ERROR_PCT) || frame.len() < ETH + 20 + 16 {
            return Send { frame, hooks, conv: None };
        }
        self.count("fragmented ICMP error");
        self.fragments(rng, &frame[ETH..], hooks, None)
    }

    /// Cuts the IP datagram `ip` into fragments and queues them, in an order that is mostly but not always the
    /// sender's: the first, then the later ones shuffled; sometimes a later one before the first, the first lost,
    /// a fragment duplicated, a fragment overlapping others, or a first fragment too short for its transport header.
    /// Returns the first to send.
    fn fragments(&mut self, rng: &mut Rng, ip: &[u8], hooks: &'static [Hook], conv: Option<(u64, Part)>) -> Send {
        let ihl = (ip[0] & 0x0f) as usize * 4;
        let total = ip.len() - ihl;
        let header: usize = match ip[9] {
            packet::TCP => 20,
            packet::UDP | packet::ICMP => 8,
            _ => 0,
        };
        // An ICMP error's first fragment is translated as an error only if it holds the quoted IP header and 8 bytes.
        let quote = if ip[9] == packet::ICMP && packet::is_icmp_error(ip[ihl]) { 8 + 20 + 8 } else { header };
        // The first fragment: the transport header (or the quote) and some data, in 8-byte units; sometimes less.
        let mut first = if header > 0 && rng.pct(12) {
            if header == 20 { rng.pick(&[8, 16]) } else { rng.pick(&[0, 4]) }
        } else if quote > header && rng.pct(20) {
            8 * (1 + rng.below(4) as usize)
        } else {
            quote.div_ceil(8).max(1) * 8 + 8 * rng.below(3) as usize
        };
        if first >= total {
            first = (total - 1) / 8 * 8;
        }
        if first < header {
            self.count("tiny first fragment (shorter than its transport header)");
        }
        let mut pieces = vec![(0, first)];
        // Later fragments start at multiples of 8 (a tiny first of 0 or 4 bytes leaves a gap before the second).
        let mut at = first.div_ceil(8).max(1) * 8;
        while at < total {
            let end = (at + 8 * (1 + rng.below(8) as usize)).min(total);
            pieces.push((at, end));
            at = end;
        }
        let mut corrupt = vec![false; pieces.len()];
        if total > 8 && rng.pct(10) {
            // A fragment overlapping others, with the same bytes or (half the time) different ones.
            let from = 8 * (1 + rng.below(((total - 1) / 8) as u64) as usize);
            pieces.push((from, (from + 8 * (1 + rng.below(4) as usize)).min(total)));
            corrupt.push(rng.pct(50));
            self.count("overlapping fragment");
        }
        let frame = |i: usize| {
            let (from, to) = pieces[i];
            let mut f = ip[..ihl].to_vec();
            f.extend(ip[ihl + from..ihl + to].iter().map(|b| if corrupt[i] { !b } else { *b }));
            let flags = if to < total { 0x2000 } else { 0 } | (from / 8) as u16;
            f[2..4].copy_from_slice(&((ihl + to - from) as u16).to_be_bytes());
            f[6..8].copy_from_slice(&flags.to_be_bytes());
            let mut f = eth(&f);
            fix_ip_checksum(&mut f);
            f
        };
        let later_conv = match conv {
            Some((id, Part::Fwd)) => Some((id, Part::FwdLater)),
            _ => None,
        };
        let mut order: Vec<Send> = Vec::with_capacity(pieces.len() + 2);
        let mut laters: Vec<Send> =
            (1..pieces.len()).map(|i| Send { frame: frame(i), hooks, conv: later_conv }).collect();
        for i in (1..laters.len()).rev() {
            laters.swap(i, rng.below(i as u64 + 1) as usize);
        }
        if rng.pct(8) {
            self.count("first fragment lost");
        } else {
            order.push(Send { frame: frame(0), hooks, conv });
            if rng.pct(6) {
                // The first fragment again (a retransmission), somewhere among the later ones.
                let at = rng.below(laters.len() as u64 + 1) as usize;
                laters.insert(at, Send { frame: frame(0), hooks, conv: None });
                self.count("first fragment sent twice");
            }
        }
        if !laters.is_empty() && rng.pct(12) {
            // A later fragment overtakes the first.
            order.insert(0, laters.remove(0));
            self.count("a later fragment before the first");
        }
        order.extend(laters);
        if rng.pct(12) {
            let i = rng.below(order.len() as u64) as usize;
            let dup = Send { frame: order[i].frame.clone(), hooks, conv: None };
            let at = i + 1 + rng.below((order.len() - i) as u64) as usize;
            order.insert(at, dup);
            self.count("duplicated fragment");
        }
        self.count(format!("fragments: {} sent", if order.len() > 4 { "5+".into() } else { order.len().to_string() }));
        let mut order = order.into_iter();
        let now = order.next().expect("at least one fragment");
        self.queue.extend(order);
        now
    }

    /// Records what came out of the last hook for `s` (None: dropped).
    pub fn observed(&mut self, s: &Send, out: Option<&[u8]>) {
        let Some((id, part)) = s.conv else { return };
        let Some(c) = self.convs.iter_mut().find(|c| c.id == id) else { return };
        let out = out.map(|o| o.to_vec());
        let slot = match part {
            Part::Fwd => &mut c.out_fwd,
            Part::FwdLater => &mut c.out_later,
            Part::Reply => &mut c.out_reply,
        };
        *slot = out.or(slot.take());
    }
}

/// Breaks a frame in one way: bit flips, truncation, a bad IHL or total length, a bad checksum, padding. The frame
/// stays at least an Ethernet and an IPv4 header long (BPF_PROG_TEST_RUN refuses shorter IPv4 frames).
pub fn mutate(rng: &mut Rng, f: &mut Vec<u8>) {
    let min = ETH + 20;
    match rng.below(7) {
        0 => {
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(f.len() as u64) as usize;
                f[i] ^= 1 << rng.below(8);
            }
        }
        1 if f.len() > min => {
            let n = min + rng.below((f.len() - min) as u64) as usize;
            f.truncate(n);
            if rng.pct(50) {
                set_tot_len(f, (n - ETH) as u16);
            }
        }
        2 => {
            f[ETH] = 0x40 | rng.below(16) as u8;
            if rng.pct(50) {
                fix_ip_checksum(f);
            }
        }
        3 => {
            let len = rng.below(f.len() as u64 + 20) as u16;
            f[ETH + 2..ETH + 4].copy_from_slice(&len.to_be_bytes());
            if rng.pct(50) {
                fix_ip_checksum(f);
            }
        }
        4 => {
            // A checksum field: the IP header's, or the transport's.
            let ihl = (f[ETH] & 0x0f) as usize * 4;
            let at = match (rng.below(2), f[ETH + 9]) {
                (0, _) => ETH + 10,
                (_, packet::TCP) => ETH + ihl + 16,
                (_, packet::UDP) => ETH + ihl + 6,
                _ => ETH + ihl + 2,
            };
            if at + 1 < f.len() {
                f[at + rng.below(2) as usize] ^= 1 << rng.below(8);
            }
        }
        5 => {
            let n = 1 + rng.below(20) as usize;
            f.extend((0..n).map(|_| rng.u64() as u8));
        }
        _ => {
            // Another protocol number in the IP header (checksum kept right).
            f[ETH + 9] = rng.pick(&[0u8, 1, 6, 17, 47, 132]);
            fix_ip_checksum(f);
        }
    }
}

/// Breaks an IPv6 TCP/UDP/echo frame in one of the ways the model predicts (it stays a plain IPv6 header followed
/// by TCP, UDP or an echo, or becomes one the data path must pass untouched): bit flips in the transport header
/// (never an ICMPv6 type) or payload, in the transport checksum, in an address; changes to traffic class, flow
/// label or hop limit; truncation; padding.
pub fn mutate6(rng: &mut Rng, f: &mut Vec<u8>) {
    let l4 = ETH + IPV6_HLEN;
    let proto = f[ETH + 6];
    let csum = l4
        + match proto {
            packet::TCP => 16,
            packet::UDP => 6,
            _ => 2,
        };
    match rng.below(6) {
        0 => {
            for _ in 0..1 + rng.below(3) {
                let mut i = l4 + rng.below((f.len() - l4) as u64) as usize;
                if proto == packet::ICMPV6 && i == l4 {
                    i += 1; // the code, not the type: another ICMPv6 message is not modelled
                }
                f[i] ^= 1 << rng.below(8);
            }
        }
        1 if csum + 1 < f.len() => f[csum + rng.below(2) as usize] ^= 1 << rng.below(8),
        2 => f[ETH + 8 + rng.below(32) as usize] ^= 1 << rng.below(8),
        3 => f[rng.pick(&[ETH + 1, ETH + 2, ETH + 3, ETH + 7])] ^= 1 << rng.below(8),
        4 if f.len() > l4 + 1 => {
            // Cut short: the payload length then says more than the frame holds, or (half the time) is corrected
            // and the transport header may be cut.
            let n = l4 + 1 + rng.below((f.len() - l4 - 1) as u64) as usize;
            f.truncate(n);
            if rng.pct(50) {
                f[ETH + 4..ETH + 6].copy_from_slice(&((n - l4) as u16).to_be_bytes());
            }
        }
        _ => {
            let n = 1 + rng.below(20) as usize;
            f.extend((0..n).map(|_| rng.u64() as u8));
        }
    }
}

fn set_tot_len(f: &mut [u8], len: u16) {
    f[ETH + 2..ETH + 4].copy_from_slice(&len.to_be_bytes());
    fix_ip_checksum(f);
}

fn fix_ip_checksum(f: &mut [u8]) {
    let ihl = ((f[ETH] & 0x0f) as usize * 4).max(20);
    f[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let end = (ETH + ihl).min(f.len());
    let c = !packet::ones_sum(&f[ETH..end]);
    f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
}

/// The TCP header of a generated packet with `flags` (checksum left to the caller: it covers the family's
/// pseudo-header).
fn tcp_header(sport: u16, dport: u16, flags: u8) -> TcpHeader {
    let mut t = TcpHeader::new(sport, dport, 0x1234_5678, 29_200);
    t.acknowledgment_number = if flags & packet::ACK != 0 { 0x0bad_cafe } else { 0 };
    t.fin = flags & packet::FIN != 0;
    t.syn = flags & packet::SYN != 0;
    t.rst = flags & packet::RST != 0;
    t.psh = flags & 0x08 != 0;
    t.ack = flags & packet::ACK != 0;
    t
}
