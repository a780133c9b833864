//! Rule sets and packet streams from a seed. Packets are built with etherparse; a stream is generated as it runs
//! (replies and ICMP errors are built from what the programs actually put out), and recorded as concrete
//! (hook, frame) steps so that a divergence can be replayed and minimised.

use std::net::Ipv4Addr;

use etherparse::{
    IcmpEchoHeader, Icmpv4Header, Icmpv4Type, IpFragOffset, IpNumber, Ipv4Header, TcpHeader, UdpHeader,
    icmpv4::{DestUnreachableHeader, ParameterProblemHeader, TimeExceededCode},
};
use pfwd::rules::Rule;

use crate::model::Hook;
use crate::model::packet::{self, ETH, L4, Parsed};

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

/// A random valid rule set of 1 to 5 rules (ids 1..), every kind, overlapping matches.
pub fn rules(rng: &mut Rng) -> Vec<Rule> {
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

fn rule_text(rng: &mut Rng) -> String {
    let kind = rng.pick(&["dnat", "dnat", "dnat", "redirect", "snat", "snat", "masquerade", "masquerade"]);
    let post = kind == "snat" || kind == "masquerade";
    let mut s = kind.to_string();
    if rng.pct(30) {
        s += if post { " -o lo" } else { " -i lo" };
    }
    let proto = if kind == "redirect" || rng.pct(if post { 50 } else { 70 }) { rng.pick(&["tcp", "udp"]) } else { "" };
    if !proto.is_empty() {
        s += &format!(" -p {proto}");
    }
    if rng.pct(25) {
        s += &format!(" -s {}", rng.pick(&["10.0.1.0/24", "192.168.1.7", "192.168.0.0/16", "10.0.1.2", "10.0.0.0/8"]));
    }
    if rng.pct(30) {
        let d = if post {
            rng.pick(&["10.0.2.2", "10.0.2.0/24", "203.0.113.10", "10.0.0.0/8"])
        } else {
            rng.pick(&["10.0.1.1", "203.0.113.10", "10.0.0.0/8", "10.9.0.0/16"])
        };
        s += &format!(" -d {d}");
    }
    if !post && !proto.is_empty() && rng.pct(70) {
        let p = rng.pick(&["53", "80", "8080", "8081", "8000-8003", "8080-8081", "50-60", "9000"]);
        s += &format!(" --dport {p}");
    }
    let ports = ["20000-20001", "20000-20003", "40000-40002", "5000", "1000-1100", "20001-20002"];
    match kind {
        "dnat" => {
            let to = rng.pick(&["10.0.2.2", "10.0.2.3", "127.0.0.1", "10.0.1.3"]);
            if !proto.is_empty() && rng.pct(50) {
                s += &format!(" --to {to}:{}", rng.pick(&[9000, 80, 53, 8080]));
            } else {
                s += &format!(" --to {to}");
            }
        }
        "redirect" => s += &format!(" --to-port {}", rng.pick(&[3128, 80, 8080])),
        "snat" => {
            let to = rng.pick(&["203.0.113.5", "10.0.2.1"]);
            if !proto.is_empty() && rng.pct(60) {
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

/// An IPv4 datagram to build.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
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
    fn new(rng: &mut Rng, src: Ipv4Addr, dst: Ipv4Addr, l4: Spec) -> Self {
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

    /// The IP datagram's bytes (no Ethernet header), every checksum computed by etherparse.
    pub fn ip_bytes(&self, rng_payload: u8) -> Vec<u8> {
        let payload: Vec<u8> = (0..self.payload_len).map(|i| rng_payload.wrapping_add(i as u8 * 37)).collect();
        let (proto, hlen) = match self.l4 {
            Spec::Tcp { .. } => (IpNumber::TCP, TcpHeader::MIN_LEN),
            Spec::Udp { .. } => (IpNumber::UDP, UdpHeader::LEN),
            Spec::Echo { .. } => (IpNumber::ICMP, 8),
            Spec::Gre => (IpNumber::GRE, 4),
        };
        let mut ip = Ipv4Header::new(0, self.ttl, proto, self.src.octets(), self.dst.octets()).expect("header");
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
                let mut t = TcpHeader::new(sport, dport, 0x1234_5678, 29_200);
                t.acknowledgment_number = if flags & packet::ACK != 0 { 0x0bad_cafe } else { 0 };
                t.fin = flags & packet::FIN != 0;
                t.syn = flags & packet::SYN != 0;
                t.rst = flags & packet::RST != 0;
                t.psh = flags & 0x08 != 0;
                t.ack = flags & packet::ACK != 0;
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
}

fn options(rng: &mut Rng) -> Vec<u8> {
    let len = rng.pick(&[4usize, 8, 12, 40]);
    let mut o: Vec<u8> = (0..len).map(|_| rng.pick(&[1u8, 1, 1, 0])).collect();
    if rng.pct(50) {
        o[..4].copy_from_slice(&[0x94, 4, 0, 0]); // router alert
    }
    o
}

pub fn eth(ip: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH + ip.len());
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
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
    first: Pkt,
    /// The forward direction's frame after the last hook it went through.
    out_fwd: Option<Vec<u8>>,
    /// A reply's frame after the last hook.
    out_reply: Option<Vec<u8>>,
    /// Goes through ingress then egress (forwarded), or egress only (locally generated).
    forwarded: bool,
}

/// What the stream asks to be sent next: a frame and the hooks it crosses in turn (each hook gets the previous one's
/// output).
pub struct Send {
    pub frame: Vec<u8>,
    pub hooks: &'static [Hook],
    conv: Option<(usize, bool)>,
}

const FORWARDED: &[Hook] = &[Hook::Ingress, Hook::Egress];
const LOCAL_OUT: &[Hook] = &[Hook::Egress];
const LOCAL_IN: &[Hook] = &[Hook::Ingress];

/// The packet stream of one rule set.
pub struct Stream {
    convs: Vec<Conv>,
}

impl Default for Stream {
    fn default() -> Self {
        Self::new()
    }
}

impl Stream {
    pub fn new() -> Self {
        Stream { convs: Vec::new() }
    }

    /// The next frame to send.
    pub fn next(&mut self, rng: &mut Rng) -> Send {
        let mut s = self.pick(rng);
        if rng.pct(12) {
            mutate(rng, &mut s.frame);
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
        let payload = rng.u64() as u8;
        if roll < 55 {
            // The client again, same tuple.
            let mut p = c.first.clone();
            p.l4 = match p.l4 {
                Spec::Tcp { sport, dport, .. } => Spec::Tcp {
                    sport,
                    dport,
                    flags: rng.pick(&[0x10, 0x18, 0x18, 0x11, 0x04, 0x14, 0x02, 0x12, 0x03, 0x00]),
                },
                Spec::Udp { sport, dport, .. } => Spec::Udp { sport, dport, csum: rng.pct(85) },
                other => other,
            };
            p.payload_len = rng.pick(&[0, 5, 30]);
            let hooks = if c.forwarded { FORWARDED } else { LOCAL_OUT };
            return Send { frame: eth(&p.ip_bytes(payload)), hooks, conv: Some((i, true)) };
        }
        if roll < 85 {
            // A reply to what came out, or an error about it.
            let Some(out) = c.out_fwd.clone() else { return self.start(rng) };
            let Parsed::Ipv4(ip) = packet::parse(&out) else { return self.start(rng) };
            let Some(t) = ip.tuple() else { return self.start(rng) };
            let hooks = if c.forwarded { FORWARDED } else { LOCAL_IN };
            let (src, dst) = (Ipv4Addr::from(t.dst), Ipv4Addr::from(t.src));
            if roll < 75 {
                let l4 = match ip.l4 {
                    L4::Tcp { .. } => Spec::Tcp {
                        sport: t.dport,
                        dport: t.sport,
                        flags: rng.pick(&[0x12, 0x12, 0x10, 0x18, 0x11, 0x14, 0x04]),
                    },
                    L4::Udp { .. } => Spec::Udp { sport: t.dport, dport: t.sport, csum: rng.pct(85) },
                    L4::Echo { id, .. } => Spec::Echo { id, request: false },
                    _ => Spec::Gre,
                };
                let p = Pkt::new(rng, src, dst, l4);
                return Send { frame: eth(&p.ip_bytes(payload)), hooks, conv: Some((i, false)) };
            }
            // An ICMP error about the forward datagram, from its destination or a router on the way.
            let esrc = if rng.pct(60) { src } else { HOP };
            let inner = &out[ETH..ip.end];
            let cut = if rng.pct(40) { (ip.l4_at - ETH + 8).min(inner.len()) } else { inner.len() };
            return Send { frame: icmp_error(rng, esrc, dst, &inner[..cut]), hooks, conv: None };
        }
        // The client reports a reply it got as undeliverable.
        let Some(reply) = c.out_reply.clone() else { return self.start(rng) };
        let Parsed::Ipv4(ip) = packet::parse(&reply) else { return self.start(rng) };
        let inner = &reply[ETH..ip.end];
        let hooks = if c.forwarded { FORWARDED } else { LOCAL_OUT };
        let frame = icmp_error(rng, Ipv4Addr::from(ip.dst), Ipv4Addr::from(ip.src), inner);
        Send { frame, hooks, conv: None }
    }

    fn start(&mut self, rng: &mut Rng) -> Send {
        let src = rng.pick(&CLIENTS);
        let dst = rng.pick(&DSTS);
        let (sport, dport) = (rng.pick(&CPORTS), rng.pick(&DPORTS));
        let l4 = match rng.below(20) {
            0..=8 => Spec::Tcp { sport, dport, flags: if rng.pct(90) { packet::SYN } else { 0x10 } },
            9..=14 => Spec::Udp { sport, dport, csum: rng.pct(80) },
            15..=18 => Spec::Echo { id: rng.pick(&[0x77, 0x78, 1, 40000]), request: true },
            _ => Spec::Gre,
        };
        let p = Pkt::new(rng, src, dst, l4);
        let forwarded = rng.pct(70);
        let frame = eth(&p.ip_bytes(rng.u64() as u8));
        self.convs.push(Conv { first: p, out_fwd: None, out_reply: None, forwarded });
        if self.convs.len() > 64 {
            self.convs.remove(0);
        }
        Send { frame, hooks: if forwarded { FORWARDED } else { LOCAL_OUT }, conv: Some((self.convs.len() - 1, true)) }
    }

    /// Records what came out of the last hook for `s` (None: dropped).
    pub fn observed(&mut self, s: &Send, out: Option<&[u8]>) {
        let Some((i, fwd)) = s.conv else { return };
        let Some(c) = self.convs.get_mut(i) else { return };
        let out = out.map(|o| o.to_vec());
        if fwd {
            c.out_fwd = out.or(c.out_fwd.take());
        } else {
            c.out_reply = out.or(c.out_reply.take());
        }
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
