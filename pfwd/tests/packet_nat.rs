//! Packet-level tests of source NAT and ICMP translation in the eBPF data path: SNAT, MASQUERADE, ICMP echo
//! identifier allocation, ICMP error translation and full NAT (DNAT + SNAT), with real packets through the loaded
//! `pfwd_ingress`/`pfwd_egress` programs (BPF_PROG_TEST_RUN). Every expected packet is built independently with
//! etherparse, and every checksum is checked with etherparse or the plain one's-complement sum in this file, never
//! with pfwd's own checksum code.
//!
//! The fixture is shared with `packet.rs` (tests/common): in BPF_PROG_TEST_RUN a tc program sees the packet on lo
//! (ifindex 1), so every fixture registers lo with the address
//! 10.0.1.1 and the rules use `-o lo` or no interface. Needs root (BPF); each test pins into its own directory.
mod common;

use common::*;
use std::{net::Ipv4Addr, time::Duration};

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpNumber, Ipv4Header, Ipv4HeaderSlice, NetHeaders,
    PacketHeaders, TransportHeader,
    icmpv4::{DestUnreachableHeader, ParameterProblemHeader, TimeExceededCode},
};
use pfwd_common::{CtEntry, PROTO_ICMP, PROTO_TCP, Tuple, ct_flag, ct_hook, ct_state, dir, names};

/// TCX_NEXT as the test run reports it (the programs return -1 for passed and translated packets alike).
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const CLIENT2: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 3);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const BACKEND2: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The router's address on the backend side (full NAT's SNAT address).
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// The SNAT address.
const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
/// A router on the path (sends time-exceeded errors).
const HOP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const CPORT: u16 = 40_000;

// ---------------------------------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------------------------------

/// An IPv4 packet description; `bytes()` serializes it (with Ethernet) with every checksum computed by etherparse.
#[derive(Clone, Debug)]
struct Pkt {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    l4: L4,
    payload: Vec<u8>,
    ttl: u8,
    ident: u16,
    options: Vec<u8>,
}

impl Pkt {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Pkt { src, dst, l4, payload: b"pfwd nat test payload".to_vec(), ttl: 61, ident: 0x4d2c, options: vec![] }
    }

    fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Self {
        let ack = if flags & ACK != 0 { 0x0bad_cafe } else { 0 };
        Pkt::new(src, dst, L4::Tcp { sport, dport, seq: 0x1234_5678, ack, flags })
    }

    fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Pkt::new(src, dst, L4::Udp { sport, dport, csum: true })
    }

    fn echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, reply: bool) -> Self {
        Pkt::new(src, dst, L4::Echo { id, seq: 3, reply })
    }

    /// The same packet from `src:port` (for an echo, `port` is the identifier: both "ports" of its tuple).
    fn from(&self, src: Ipv4Addr, port: u16) -> Self {
        let mut p = self.clone();
        p.src = src;
        match &mut p.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
            L4::Echo { id, .. } => *id = port,
        }
        p
    }

    /// The same packet to `dst:port` (for an echo, `port` is the identifier).
    fn to(&self, dst: Ipv4Addr, port: u16) -> Self {
        let mut p = self.clone();
        p.dst = dst;
        match &mut p.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
            L4::Echo { id, .. } => *id = port,
        }
        p
    }

    fn ports(&self) -> (u16, u16) {
        match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (sport, dport),
            L4::Echo { id, .. } => (id, id),
        }
    }

    fn flags(mut self, f: u8) -> Self {
        if let L4::Tcp { flags, ack, .. } = &mut self.l4 {
            *flags = f;
            *ack = if f & ACK != 0 { 0x0bad_cafe } else { 0 };
        }
        self
    }

    fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    fn without_udp_checksum(mut self) -> Self {
        if let L4::Udp { csum, .. } = &mut self.l4 {
            *csum = false;
        }
        self
    }

    /// The IP packet (no Ethernet header).
    fn ip_bytes(&self) -> Vec<u8> {
        let (src, dst, ttl, ident, options) = (self.src, self.dst, self.ttl, self.ident, &self.options[..]);
        let ip = Ip4 { src, dst, ttl, ident, df: false, mf: false, frag_offset: 0, options };
        ip.packet(&self.l4, &self.payload)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = eth().to_vec();
        out.extend_from_slice(&self.ip_bytes());
        out
    }
}

fn eth() -> [u8; 14] {
    Ethernet2Header { source: [2, 0, 0, 0, 0, 1], destination: [2, 0, 0, 0, 0, 2], ether_type: EtherType::IPV4 }
        .to_bytes()
}

/// An ICMP error frame from `src` to `dst` of type `ty`, embedding `inner` (an IP packet, possibly cut short), with
/// every checksum computed by etherparse.
fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, ty: Icmpv4Type, inner: &[u8]) -> Vec<u8> {
    icmp_error_with_options(src, dst, ty, inner, &[])
}

/// As [`icmp_error`], with IPv4 options in the outer header.
fn icmp_error_with_options(src: Ipv4Addr, dst: Ipv4Addr, ty: Icmpv4Type, inner: &[u8], options: &[u8]) -> Vec<u8> {
    let icmp = Icmpv4Header::with_checksum(ty, inner);
    let mut ip = Ipv4Header::new(0, 64, IpNumber::ICMP, src.octets(), dst.octets()).unwrap();
    ip.identification = 0x0e11;
    ip.options = options.try_into().expect("IPv4 options: a multiple of 4, at most 40 bytes");
    ip.set_payload_len(icmp.header_len() + inner.len()).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = eth().to_vec();
    ip.write_raw(&mut out).unwrap();
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(inner);
    out
}

fn port_unreachable() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
}

fn ttl_exceeded() -> Icmpv4Type {
    Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit)
}

/// Offset of the embedded IP packet in an ICMP error frame built by [`icmp_error`].
const INNER: usize = 14 + 20 + 8;

// ---------------------------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------------------------

/// Headers of a frame, for failure messages.
fn describe(frame: &[u8]) -> String {
    match PacketHeaders::from_ethernet_slice(frame) {
        Ok(h) => format!("{:?}\n{:?}\npayload {:02x?}", h.net, h.transport, h.payload.slice()),
        Err(e) => format!("unparsable ({e}): {frame:02x?}"),
    }
}

/// The one's-complement sum of `data` as 16-bit big-endian words, folded: 0xffff for data with a valid checksum.
fn ones_sum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Recomputes the IPv4 header checksum and the TCP/UDP/ICMP checksum of parsed headers with etherparse.
fn assert_headers_valid(h: &PacketHeaders, what: &str) {
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else { panic!("{what}: no IPv4 header") };
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "{what}: IPv4 header checksum");
    let payload = h.payload.slice();
    match &h.transport {
        Some(TransportHeader::Tcp(t)) => {
            assert_eq!(t.checksum, t.calc_checksum_ipv4(ip, payload).unwrap(), "{what}: TCP checksum")
        }
        // 0 means "no checksum"; etherparse sends a computed 0 as 0xffff, as RFC 768 requires.
        Some(TransportHeader::Udp(u)) if u.checksum != 0 => {
            assert_eq!(u.checksum, u.calc_checksum_ipv4(ip, payload).unwrap(), "{what}: UDP checksum")
        }
        Some(TransportHeader::Icmpv4(i)) => {
            let expect = Icmpv4Header::with_checksum(i.icmp_type.clone(), payload).checksum;
            assert_eq!(i.checksum, expect, "{what}: ICMP checksum")
        }
        _ => {}
    }
}

/// Every checksum of `frame`, recomputed with etherparse (and, for ICMP, also with the plain sum over the message).
fn assert_checksums_valid(frame: &[u8]) {
    let h = PacketHeaders::from_ethernet_slice(frame).unwrap_or_else(|e| panic!("unparsable output: {e}"));
    assert_headers_valid(&h, &describe(frame));
    if frame[14 + 9] == 1 {
        let ihl = (frame[14] & 0x0f) as usize * 4;
        let tot = u16::from_be_bytes([frame[16], frame[17]]) as usize;
        assert_eq!(ones_sum(&frame[14 + ihl..14 + tot]), 0xffff, "ICMP message sum of {}", describe(frame));
    }
}

/// The embedded packet of an ICMP error: its IP header checksum, and (when `complete`, i.e. the whole datagram is
/// embedded) its TCP/UDP/ICMP checksum, recomputed with etherparse.
fn assert_inner_valid(inner: &[u8], complete: bool) {
    let ip = Ipv4HeaderSlice::from_slice(inner).unwrap_or_else(|e| panic!("embedded IP header: {e}")).to_header();
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "embedded IPv4 header checksum of {inner:02x?}");
    if complete {
        let h = PacketHeaders::from_ip_slice(inner).unwrap_or_else(|e| panic!("embedded packet: {e}"));
        assert_headers_valid(&h, &format!("embedded packet {:?} {:?}", h.net, h.transport));
    }
}

/// The program translated the packet into exactly `want` (built independently, so this checks every rewritten field,
/// every field that must not change and every checksum) and let it continue.
#[track_caller]
fn assert_frame(r: &Run, want: &[u8]) {
    assert_eq!(r.ret, NEXT, "return value (translated packets continue)");
    assert_checksums_valid(&r.data);
    assert!(r.data == want, "wrong translation\n got: {}\nwant: {}", describe(&r.data), describe(want));
}

#[track_caller]
fn assert_translated(r: &Run, expected: &Pkt) {
    assert_frame(r, &expected.bytes());
}

/// The program passed `input` byte for byte.
#[track_caller]
fn assert_untouched(r: &Run, input: &[u8]) {
    assert_eq!(r.ret, NEXT, "return value (untranslated packets continue)");
    assert!(r.data == input, "packet was modified\n got: {}\nwant: {}", describe(&r.data), describe(input));
}

/// The frame passes byte for byte or is dropped, never rewritten.
#[track_caller]
fn expect_passed_or_dropped(name: &str, r: &Run, frame: &[u8]) {
    match r.ret {
        NEXT => assert!(r.data == frame, "{name}: modified\n got: {:02x?}\nwant: {frame:02x?}", r.data),
        DROP => {}
        other => panic!("{name}: unexpected return value {other}"),
    }
}

/// Sends `pkt` through egress and returns the source port (or echo identifier) it was given, after checking that
/// the output is exactly `pkt` from `addr:that port`, with every checksum right.
#[track_caller]
fn snat_port(f: &Fixture, pkt: &Pkt, addr: Ipv4Addr) -> u16 {
    let r = f.egress(&pkt.bytes());
    assert_eq!(r.ret, NEXT, "return value of the first packet of {pkt:?}");
    let h = PacketHeaders::from_ethernet_slice(&r.data).unwrap_or_else(|e| panic!("unparsable output: {e}"));
    let port = match &h.transport {
        Some(TransportHeader::Tcp(t)) => t.source_port,
        Some(TransportHeader::Udp(u)) => u.source_port,
        Some(TransportHeader::Icmpv4(Icmpv4Header { icmp_type: Icmpv4Type::EchoRequest(e), .. })) => e.id,
        other => panic!("unexpected output transport {other:?}"),
    };
    assert_translated(&r, &pkt.from(addr, port));
    port
}

/// The reply `reply` (to the SNAT address) comes back through ingress as `restored`.
#[track_caller]
fn expect_reply(f: &Fixture, reply: &Pkt, restored: &Pkt) {
    assert_translated(&f.ingress(&reply.bytes()), restored);
}

// ---------------------------------------------------------------------------------------------------------------
// 1. SNAT of a TCP flow
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn snat_tcp_rewrites_the_source_and_restores_replies() {
    let f = Fixture::new(&[rule(1, "snat --to 203.0.113.5")]);
    let syn = Pkt::tcp(CLIENT, CPORT, BACKEND, 80, SYN);
    // The source port is free: kept.
    assert_translated(&f.egress(&syn.bytes()), &syn.from(PUBLIC, CPORT));
    let syn_ack = Pkt::tcp(BACKEND, 80, PUBLIC, CPORT, SYN | ACK).payload(b"");
    assert_translated(&f.ingress(&syn_ack.bytes()), &syn_ack.to(CLIENT, CPORT));
    // Later packets both ways.
    let data = syn.clone().flags(ACK | PSH).payload(b"GET / HTTP/1.1\r\n\r\n");
    assert_translated(&f.egress(&data.bytes()), &data.from(PUBLIC, CPORT));
    let resp = syn_ack.clone().flags(ACK | PSH).payload(b"HTTP/1.1 200 OK\r\n\r\n");
    assert_translated(&f.ingress(&resp.bytes()), &resp.to(CLIENT, CPORT));

    let ct = f.conntrack();
    assert_eq!(ct.len(), 2, "{ct:#?}");
    let find = |k: Tuple| ct.iter().find(|(t, _)| *t == k).unwrap_or_else(|| panic!("no entry {k:?} in {ct:#?}")).1;
    let orig = find(tuple(CLIENT, CPORT, BACKEND, 80, PROTO_TCP));
    assert_eq!(orig.xlat, tuple(PUBLIC, CPORT, BACKEND, 80, PROTO_TCP));
    assert_eq!((orig.dir, orig.hook, orig.rule_slot), (dir::ORIGINAL, ct_hook::EGRESS, slot_of(1)));
    let reply = find(tuple(BACKEND, 80, PUBLIC, CPORT, PROTO_TCP));
    assert_eq!(reply.xlat, tuple(BACKEND, 80, CLIENT, CPORT, PROTO_TCP));
    assert_eq!((reply.dir, reply.hook, reply.rule_slot), (dir::REPLY, ct_hook::INGRESS, slot_of(1)));
    assert_eq!(f.stat("new_flows"), 1);
    let c = f.counters(slot_of(1));
    assert_eq!((c.packets, c.flows, c.drops), (4, 1, 0));

    // Each direction only on its own hook: the original direction at ingress, a reply at egress are left alone.
    let orig_in = data.bytes();
    assert_untouched(&f.ingress(&orig_in), &orig_in);
    let reply_out = resp.bytes();
    assert_untouched(&f.egress(&reply_out), &reply_out);
}

#[test]
fn snat_only_opens_flows_with_a_syn() {
    let f = Fixture::new(&[rule(1, "snat -o lo --to 203.0.113.5")]);
    for flags in [ACK, ACK | PSH, SYN | ACK] {
        let p = Pkt::tcp(CLIENT, CPORT, BACKEND, 80, flags).bytes();
        assert_untouched(&f.egress(&p), &p);
    }
    // A reply at ingress with no flow opens nothing either.
    let p = Pkt::tcp(BACKEND, 80, PUBLIC, CPORT, SYN | ACK).bytes();
    assert_untouched(&f.ingress(&p), &p);
    assert!(f.conntrack().is_empty());
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Port allocation
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn taken_port_is_reallocated_and_one_port_serves_many_destinations() {
    let f = Fixture::new(&[rule(1, "snat --to 203.0.113.5")]);
    let a = Pkt::tcp(CLIENT, CPORT, BACKEND, 80, SYN);
    let b = Pkt::tcp(CLIENT2, CPORT, BACKEND, 80, SYN);
    let c = Pkt::tcp(CLIENT2, CPORT, BACKEND2, 80, SYN);
    assert_eq!(snat_port(&f, &a, PUBLIC), CPORT);
    let pb = snat_port(&f, &b, PUBLIC);
    assert_ne!(pb, CPORT, "the second client's port to the same destination must differ");
    assert!(pb >= 1024, "allocated port {pb} outside the default range 1024-65535");
    // Another destination: the reply tuple differs, so the port is free again.
    assert_eq!(snat_port(&f, &c, PUBLIC), CPORT, "one port serves different destinations");

    // Each reply finds its own client.
    let reply = |dst_port: u16, from: Ipv4Addr| Pkt::tcp(from, 80, PUBLIC, dst_port, SYN | ACK);
    expect_reply(&f, &reply(CPORT, BACKEND), &reply(CPORT, BACKEND).to(CLIENT, CPORT));
    expect_reply(&f, &reply(pb, BACKEND), &reply(pb, BACKEND).to(CLIENT2, CPORT));
    expect_reply(&f, &reply(CPORT, BACKEND2), &reply(CPORT, BACKEND2).to(CLIENT2, CPORT));
    // Later packets keep their ports.
    let b_ack = b.clone().flags(ACK);
    assert_translated(&f.egress(&b_ack.bytes()), &b_ack.from(PUBLIC, pb));
    assert_eq!(f.stat("new_flows"), 3);
    assert_eq!(f.conntrack().len(), 6);
}

/// A confirmed flow (moved to the confirmed table) still owns its port: port allocation searches both tables.
#[test]
fn a_confirmed_flow_keeps_its_port() {
    let f = Fixture::new(&[rule(1, "snat --to 203.0.113.5")]);
    let a = Pkt::tcp(CLIENT, CPORT, BACKEND, 80, SYN);
    assert_eq!(snat_port(&f, &a, PUBLIC), CPORT);
    let syn_ack = Pkt::tcp(BACKEND, 80, PUBLIC, CPORT, SYN | ACK).payload(b"");
    expect_reply(&f, &syn_ack, &syn_ack.to(CLIENT, CPORT));
    // The client's ACK leaves at egress, where SNAT flows have their original direction: it confirms the flow.
    let ack = a.clone().flags(ACK).payload(b"");
    assert_translated(&f.egress(&ack.bytes()), &ack.from(PUBLIC, CPORT));
    assert_eq!(f.stat("flows_confirmed"), 1);
    assert!(f.conntrack().iter().all(|(_, e)| e.is_confirmed()), "{:#?}", f.conntrack());
    let b = Pkt::tcp(CLIENT2, CPORT, BACKEND, 80, SYN);
    let pb = snat_port(&f, &b, PUBLIC);
    assert_ne!(pb, CPORT, "the port of a confirmed flow was given to another");
    let data = Pkt::tcp(BACKEND, 80, PUBLIC, CPORT, ACK | PSH);
    expect_reply(&f, &data, &data.to(CLIENT, CPORT));
}

#[test]
fn port_range_is_used_until_exhausted_then_freed_by_expiry() {
    let f = Fixture::new(&[rule(1, "snat -o lo -p udp --to 203.0.113.5:20000-20003")]);
    let client = |i: u8| Ipv4Addr::new(10, 0, 1, 10 + i);
    // A source port inside the range is kept when free.
    let first = Pkt::udp(client(0), 20_002, BACKEND, 53);
    assert_eq!(snat_port(&f, &first, PUBLIC), 20_002);
    let mut flows = vec![(first, 20_002)];
    // Outside the range: allocated inside it.
    for i in 1..4 {
        let p = Pkt::udp(client(i), 5000, BACKEND, 53);
        let port = snat_port(&f, &p, PUBLIC);
        assert!((20_000..=20_003).contains(&port), "port {port} outside 20000-20003");
        flows.push((p, port));
    }
    let mut ports: Vec<u16> = flows.iter().map(|(_, p)| *p).collect();
    ports.sort();
    assert_eq!(ports, [20_000, 20_001, 20_002, 20_003], "four flows, four different ports");

    // The fifth concurrent flow finds no free port: dropped and counted.
    let fifth = Pkt::udp(client(4), 5000, BACKEND, 53);
    let r = f.egress(&fifth.bytes());
    assert_eq!(r.ret, DROP, "fifth flow with the range exhausted");
    assert_eq!(f.stat("snat_port_exhausted_drops"), 1);
    let c = f.counters(slot_of(1));
    assert_eq!((c.packets, c.flows, c.drops), (4, 4, 1));
    assert_eq!(f.conntrack().len(), 8, "no entry for the dropped flow");

    // Existing flows keep their ports, both ways.
    for (p, port) in &flows {
        assert_translated(&f.egress(&p.bytes()), &p.from(PUBLIC, *port));
        let reply = Pkt::udp(BACKEND, 53, PUBLIC, *port);
        expect_reply(&f, &reply, &reply.to(p.src, p.ports().0));
    }
    assert_eq!(f.stat("new_flows"), 4);

    // After the flows expire, a new flow gets a port again.
    f.timeouts(|c| c.udp_timeout = 1);
    std::thread::sleep(Duration::from_millis(1500));
    let port = snat_port(&f, &fifth, PUBLIC);
    assert!((20_000..=20_003).contains(&port), "port {port} outside 20000-20003");
    let reply = Pkt::udp(BACKEND, 53, PUBLIC, port);
    expect_reply(&f, &reply, &reply.to(fifth.src, 5000));
    assert_eq!(f.stat("snat_port_exhausted_drops"), 1);
    assert_eq!(f.stat("new_flows"), 5);
}

// ---------------------------------------------------------------------------------------------------------------
// 3. MASQUERADE
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn masquerade_udp_uses_the_interface_address() {
    let f = Fixture::new(&[rule(1, "masquerade -o lo -p udp")]);
    // In a test run the FIB lookup for lo finds no source for this destination, so pfwd's recorded address is used.
    let dns = Pkt::udp(CLIENT, 5353, BACKEND, 53);
    assert_translated(&f.egress(&dns.bytes()), &dns.from(ROUTER, 5353));
    let reply = Pkt::udp(BACKEND, 53, ROUTER, 5353);
    expect_reply(&f, &reply, &reply.to(CLIENT, 5353));

    // No checksum (0) stays 0, both ways.
    let bare = Pkt::udp(CLIENT, 6000, BACKEND, 53).without_udp_checksum();
    let r = f.egress(&bare.bytes());
    assert_translated(&r, &bare.from(ROUTER, 6000));
    assert_eq!(&r.data[14 + 20 + 6..14 + 20 + 8], &[0, 0], "UDP checksum 0 must stay 0");
    let bare_reply = Pkt::udp(BACKEND, 53, ROUTER, 6000).without_udp_checksum();
    let r = f.ingress(&bare_reply.bytes());
    assert_translated(&r, &bare_reply.to(CLIENT, 6000));
    assert_eq!(&r.data[14 + 20 + 6..14 + 20 + 8], &[0, 0]);

    // A changed interface address applies to new flows; the live flow keeps its address.
    let other = Ipv4Addr::new(10, 0, 1, 100);
    f.kernel().set_iface(LO, Some(other), None, None).unwrap();
    let new = Pkt::udp(CLIENT, 7000, BACKEND, 53);
    assert_translated(&f.egress(&new.bytes()), &new.from(other, 7000));
    assert_translated(&f.egress(&dns.bytes()), &dns.from(ROUTER, 5353));
}

#[test]
fn masquerade_with_ports_allocates_in_range_keeping_a_zero_checksum() {
    let f = Fixture::new(&[rule(1, "masquerade -p udp --to-ports 30000-30009")]);
    let bare = Pkt::udp(CLIENT, 6000, BACKEND, 53).without_udp_checksum();
    let r = f.egress(&bare.bytes());
    assert_eq!(r.ret, NEXT);
    let port = u16::from_be_bytes([r.data[14 + 20], r.data[14 + 21]]);
    assert!((30_000..=30_009).contains(&port), "port {port} outside 30000-30009");
    assert_translated(&r, &bare.from(ROUTER, port));
    assert_eq!(&r.data[14 + 20 + 6..14 + 20 + 8], &[0, 0], "UDP checksum 0 must stay 0 when the port changes");
    let with_sum = Pkt::udp(CLIENT, 6001, BACKEND, 53);
    let port2 = snat_port(&f, &with_sum, ROUTER);
    assert!((30_000..=30_009).contains(&port2) && port2 != port);
}

#[test]
fn masquerade_without_an_interface_address_drops() {
    let f = Fixture::new(&[rule(1, "masquerade -o lo")]);
    f.kernel().set_iface(LO, None, None, None).unwrap();
    let r = f.egress(&Pkt::udp(CLIENT, 5353, BACKEND, 53).bytes());
    assert_eq!(r.ret, DROP);
    assert_eq!(f.counters(slot_of(1)).drops, 1);
    assert!(f.conntrack().is_empty());
}

#[test]
fn snat_of_a_protocol_without_ports_rewrites_the_address_only() {
    let f = Fixture::new(&[rule(1, "snat --to 203.0.113.5")]);
    // GRE (47): the IP payload is opaque and must stay as it is.
    let gre = |src: Ipv4Addr, dst: Ipv4Addr| {
        let body = [0u8, 0, 0x08, 0, 1, 2, 3, 4];
        let mut ip = Ipv4Header::new(body.len() as u16, 64, IpNumber::GRE, src.octets(), dst.octets()).unwrap();
        ip.header_checksum = ip.calc_header_checksum();
        let mut out = eth().to_vec();
        ip.write_raw(&mut out).unwrap();
        out.extend_from_slice(&body);
        out
    };
    assert_frame(&f.egress(&gre(CLIENT, BACKEND)), &gre(PUBLIC, BACKEND));
    assert_frame(&f.ingress(&gre(BACKEND, PUBLIC)), &gre(BACKEND, CLIENT));
    // A second client to the same destination would share the reply tuple: it cannot be told apart, so it is not
    // translated into the first one's.
    let r = f.egress(&gre(CLIENT2, BACKEND));
    assert!(r.ret == DROP || r.data == gre(CLIENT2, BACKEND), "second flow translated into the first one's tuple");
    assert_frame(&f.ingress(&gre(BACKEND, PUBLIC)), &gre(BACKEND, CLIENT));
}

// ---------------------------------------------------------------------------------------------------------------
// 4. ICMP echo through SNAT
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn echo_identifier_is_translated_when_taken_and_restored_in_replies() {
    let f = Fixture::new(&[rule(1, "snat --to 203.0.113.5")]);
    let id = 0x77;
    let a = Pkt::echo(CLIENT, BACKEND, id, false);
    let b = Pkt::echo(CLIENT2, BACKEND, id, false);
    // The first keeps its identifier; the second, to the same destination, gets another one (ICMP checksum checked
    // by assert_translated inside).
    assert_eq!(snat_port(&f, &a, PUBLIC), id);
    let xb = snat_port(&f, &b, PUBLIC);
    assert_ne!(xb, id, "the second client's identifier to the same destination must differ");
    assert!(xb >= 1024, "identifier {xb} outside the default range");
    // Later requests of both keep their identifiers.
    assert_translated(&f.egress(&a.bytes()), &a.from(PUBLIC, id));
    assert_translated(&f.egress(&b.bytes()), &b.from(PUBLIC, xb));

    // Replies: identifier and address restored, each to its own client.
    let reply_a = Pkt::echo(BACKEND, PUBLIC, id, true);
    expect_reply(&f, &reply_a, &reply_a.to(CLIENT, id));
    let reply_b = Pkt::echo(BACKEND, PUBLIC, xb, true);
    expect_reply(&f, &reply_b, &reply_b.to(CLIENT2, id));

    let ct = f.conntrack();
    let orig = ct.iter().find(|(t, _)| *t == tuple(CLIENT2, id, BACKEND, id, PROTO_ICMP)).expect("flow").1;
    assert_eq!(orig.xlat, tuple(PUBLIC, xb, BACKEND, xb, PROTO_ICMP));
    // The same identifier to another destination keeps it.
    assert_eq!(snat_port(&f, &Pkt::echo(CLIENT2, BACKEND2, id, false), PUBLIC), id);
    assert_eq!(f.stat("new_flows"), 3);
}

// ---------------------------------------------------------------------------------------------------------------
// 5. ICMP errors
// ---------------------------------------------------------------------------------------------------------------

/// Checks an error translated into exactly `want`, including the embedded packet's checksums (`complete`: the
/// whole embedded datagram is present, so its L4 checksum can be recomputed).
#[track_caller]
fn assert_error_translated(r: &Run, want: &[u8], complete: bool) {
    assert_frame(r, want);
    assert_inner_valid(&r.data[INNER..], complete);
}

#[test]
fn icmp_error_about_a_dnat_flow_is_translated_at_egress() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 8080 --to 10.0.2.2:9000")]);
    let sent = Pkt::udp(CLIENT, 5000, ROUTER, 8080);
    assert_translated(&f.ingress(&sent.bytes()), &sent.to(BACKEND, 9000));
    // The backend's port unreachable about the datagram as it received it (with its UDP checksum, non-zero).
    let inner = sent.to(BACKEND, 9000).ip_bytes();
    assert_ne!(&inner[26..28], &[0, 0], "construction: embedded UDP checksum present");
    let err = icmp_error(BACKEND, CLIENT, port_unreachable(), &inner);
    // Reaches the client from the address it talked to, about the datagram it sent.
    let want = icmp_error(ROUTER, CLIENT, port_unreachable(), &sent.ip_bytes());
    // The wrong hook leaves it alone.
    assert_untouched(&f.ingress(&err), &err);
    let r = f.egress(&err);
    assert_error_translated(&r, &want, true);
    assert_eq!(&r.data[INNER + 16..INNER + 20], &ROUTER.octets(), "embedded destination");
    assert_eq!(&r.data[INNER + 22..INNER + 24], &8080u16.to_be_bytes(), "embedded destination port");
    assert_eq!(&r.data[14 + 12..14 + 16], &ROUTER.octets(), "outer source");
    assert_eq!(f.stat("icmp_errors_translated"), 1);

    // The same error with only the 8 bytes of UDP header that RFC 792 requires.
    let err = icmp_error(BACKEND, CLIENT, port_unreachable(), &inner[..28]);
    let want = icmp_error(ROUTER, CLIENT, port_unreachable(), &sent.ip_bytes()[..28]);
    assert_error_translated(&f.egress(&err), &want, false);
    assert_eq!(f.stat("icmp_errors_translated"), 2);
}

#[test]
fn icmp_error_about_a_dnat_flow_with_udp_checksum_zero_keeps_it_zero() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 8080 --to 10.0.2.2:9000")]);
    let sent = Pkt::udp(CLIENT, 5000, ROUTER, 8080).without_udp_checksum();
    assert_translated(&f.ingress(&sent.bytes()), &sent.to(BACKEND, 9000));
    let err = icmp_error(BACKEND, CLIENT, port_unreachable(), &sent.to(BACKEND, 9000).ip_bytes());
    let want = icmp_error(ROUTER, CLIENT, port_unreachable(), &sent.ip_bytes());
    let r = f.egress(&err);
    assert_error_translated(&r, &want, true);
    assert_eq!(&r.data[INNER + 26..INNER + 28], &[0, 0]);
}

#[test]
fn icmp_error_from_a_router_about_an_snat_flow_is_translated_at_ingress() {
    let f = Fixture::new(&[rule(1, "snat --to 203.0.113.5")]);
    let syn = Pkt::tcp(CLIENT, CPORT, BACKEND, 80, SYN);
    assert_eq!(snat_port(&f, &syn, PUBLIC), CPORT);
    let inner = syn.from(PUBLIC, CPORT).ip_bytes();
    // A router on the path: its own source stays, the destination and the embedded source are restored.
    let err = icmp_error(HOP, PUBLIC, ttl_exceeded(), &inner);
    let want = icmp_error(HOP, CLIENT, ttl_exceeded(), &syn.ip_bytes());
    assert_untouched(&f.egress(&err), &err);
    let r = f.ingress(&err);
    assert_error_translated(&r, &want, true);
    assert_eq!(&r.data[14 + 12..14 + 16], &HOP.octets(), "outer source");
    assert_eq!(&r.data[14 + 16..14 + 20], &CLIENT.octets(), "outer destination");
    assert_eq!(&r.data[INNER + 12..INNER + 16], &CLIENT.octets(), "embedded source");
    assert_eq!(&r.data[INNER + 20..INNER + 22], &CPORT.to_be_bytes(), "embedded source port");

    // Only the 8 bytes of TCP RFC 792 requires (no TCP checksum in the error).
    let err = icmp_error(HOP, PUBLIC, ttl_exceeded(), &inner[..28]);
    let want = icmp_error(HOP, CLIENT, ttl_exceeded(), &syn.ip_bytes()[..28]);
    assert_error_translated(&f.ingress(&err), &want, false);
    assert_eq!(f.stat("icmp_errors_translated"), 2);
}

#[test]
fn icmp_error_about_an_snat_flow_with_a_reallocated_port() {
    let f = Fixture::new(&[rule(1, "snat --to 203.0.113.5")]);
    assert_eq!(snat_port(&f, &Pkt::tcp(CLIENT, CPORT, BACKEND, 80, SYN), PUBLIC), CPORT);
    let syn = Pkt::tcp(CLIENT2, CPORT, BACKEND, 80, SYN);
    let port = snat_port(&f, &syn, PUBLIC);
    assert_ne!(port, CPORT);
    // The embedded packet has IP options, which move its TCP header.
    let mut syn_opt = syn.clone();
    syn_opt.options = vec![1, 1, 1, 0];
    let inner = syn_opt.from(PUBLIC, port).ip_bytes();
    for ty in [
        ttl_exceeded(),
        Icmpv4Type::ParameterProblem(ParameterProblemHeader::PointerIndicatesError(20)),
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }),
    ] {
        let err = icmp_error(HOP, PUBLIC, ty.clone(), &inner);
        let want = icmp_error(HOP, CLIENT2, ty.clone(), &syn_opt.ip_bytes());
        assert_error_translated(&f.ingress(&err), &want, true);
        // From the backend itself (port unreachable style): its source is the embedded destination and stays.
        let err = icmp_error(BACKEND, PUBLIC, ty.clone(), &inner);
        let want = icmp_error(BACKEND, CLIENT2, ty, &syn_opt.ip_bytes());
        assert_error_translated(&f.ingress(&err), &want, true);
    }
    assert_eq!(f.stat("icmp_errors_translated"), 6);
}

#[test]
fn icmp_error_from_the_client_about_a_reply_is_translated_in_the_original_direction() {
    // SNAT: the client reports the reply as undeliverable; the error leaves through egress like the client's packets.
    let f = Fixture::new(&[rule(1, "snat -p udp --to 203.0.113.5:20000-20009")]);
    let sent = Pkt::udp(CLIENT, 5000, BACKEND, 53);
    let port = snat_port(&f, &sent, PUBLIC);
    let reply = Pkt::udp(BACKEND, 53, PUBLIC, port);
    let delivered = reply.to(CLIENT, 5000);
    expect_reply(&f, &reply, &delivered);
    let err = icmp_error(CLIENT, BACKEND, port_unreachable(), &delivered.ip_bytes());
    assert_untouched(&f.ingress(&err), &err);
    let want = icmp_error(PUBLIC, BACKEND, port_unreachable(), &reply.ip_bytes());
    assert_error_translated(&f.egress(&err), &want, true);

    // DNAT: the client reports the reply (sent from the address it talked to); the error enters through ingress.
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 8080 --to 10.0.2.2:9000")]);
    let sent = Pkt::udp(CLIENT, 5000, ROUTER, 8080);
    assert_translated(&f.ingress(&sent.bytes()), &sent.to(BACKEND, 9000));
    let reply = Pkt::udp(BACKEND, 9000, CLIENT, 5000);
    assert_translated(&f.egress(&reply.bytes()), &reply.from(ROUTER, 8080));
    let err = icmp_error(CLIENT, ROUTER, port_unreachable(), &reply.from(ROUTER, 8080).ip_bytes());
    assert_untouched(&f.egress(&err), &err);
    let want = icmp_error(CLIENT, BACKEND, port_unreachable(), &reply.ip_bytes());
    assert_error_translated(&f.ingress(&err), &want, true);
    assert_eq!(f.stat("icmp_errors_translated"), 1);
}

#[test]
fn icmp_error_with_outer_ip_options_is_translated() {
    let f = Fixture::new(&[rule(1, "snat --to 203.0.113.5")]);
    let syn = Pkt::tcp(CLIENT, CPORT, BACKEND, 80, SYN);
    assert_eq!(snat_port(&f, &syn, PUBLIC), CPORT);
    let options = [0x94, 4, 0, 0, 1, 1, 1, 0]; // router alert, NOP NOP NOP EOL
    let err = icmp_error_with_options(HOP, PUBLIC, ttl_exceeded(), &syn.from(PUBLIC, CPORT).ip_bytes(), &options);
    let want = icmp_error_with_options(HOP, CLIENT, ttl_exceeded(), &syn.ip_bytes(), &options);
    let r = f.ingress(&err);
    assert_frame(&r, &want);
    assert_inner_valid(&r.data[INNER + options.len()..], true);
    assert_eq!(f.stat("icmp_errors_translated"), 1);
}

/// Sets up two echo flows through SNAT to 203.0.113.5 (the second one's identifier translated) and returns the
/// second one's request and its translated identifier.
fn two_echo_flows(f: &Fixture) -> (Pkt, u16) {
    assert_eq!(snat_port(f, &Pkt::echo(CLIENT, BACKEND, 0x77, false), PUBLIC), 0x77);
    let b = Pkt::echo(CLIENT2, BACKEND, 0x77, false);
    let xb = snat_port(f, &b, PUBLIC);
    assert_ne!(xb, 0x77);
    (b, xb)
}

#[test]
fn icmp_error_about_an_echo_restores_the_embedded_identifier() {
    let f = Fixture::new(&[rule(1, "snat --to 203.0.113.5")]);
    let (b, xb) = two_echo_flows(&f);
    let host_unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host);
    let err = icmp_error(HOP, PUBLIC, host_unreachable.clone(), &b.from(PUBLIC, xb).ip_bytes());
    let want = icmp_error(HOP, CLIENT2, host_unreachable, &b.ip_bytes());
    let r = f.ingress(&err);
    assert_eq!(r.ret, NEXT);
    assert_eq!(f.stat("icmp_errors_translated"), 1);
    assert_eq!(r.data.len(), want.len());
    // Every byte but the embedded echo's own checksum (checked by the next test) and the outer ICMP checksum that
    // covers it, which is checked by recomputation instead.
    let echo_check = INNER + 20 + 2;
    let icmp_check = 14 + 20 + 2;
    for (i, (got, exp)) in r.data.iter().zip(&want).enumerate() {
        if ![echo_check, echo_check + 1, icmp_check, icmp_check + 1].contains(&i) {
            assert_eq!(got, exp, "byte {i}\n got: {}\nwant: {}", describe(&r.data), describe(&want));
        }
    }
    assert_checksums_valid(&r.data);
    assert_inner_valid(&r.data[INNER..], false);
    assert_eq!(&r.data[INNER + 24..INNER + 26], &0x77u16.to_be_bytes(), "embedded echo identifier");
    assert_eq!(&r.data[INNER + 12..INNER + 16], &CLIENT2.octets(), "embedded source");
    assert_eq!(&r.data[14 + 16..14 + 20], &CLIENT2.octets(), "outer destination");
}

#[test]
fn icmp_error_about_an_echo_restores_the_embedded_echo_checksum() {
    // The embedded echo here is complete (header and data), so its checksum is checkable: after the identifier is
    // restored it must be the checksum the client sent (Linux's NAT fixes it too: icmp_manip_pkt on the inner
    // header).
    let f = Fixture::new(&[rule(1, "snat --to 203.0.113.5")]);
    let (b, xb) = two_echo_flows(&f);
    let host_unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host);
    let err = icmp_error(HOP, PUBLIC, host_unreachable.clone(), &b.from(PUBLIC, xb).ip_bytes());
    let want = icmp_error(HOP, CLIENT2, host_unreachable, &b.ip_bytes());
    let r = f.ingress(&err);
    assert_inner_valid(&r.data[INNER..], true);
    assert_error_translated(&r, &want, true);
}

#[test]
fn icmp_error_about_an_unknown_flow_passes_byte_identical() {
    let f = Fixture::new(&[rule(1, "snat --to 203.0.113.5"), rule(2, "dnat -p udp --dport 8080 --to 10.0.2.2:9000")]);
    assert_eq!(snat_port(&f, &Pkt::tcp(CLIENT, CPORT, BACKEND, 80, SYN), PUBLIC), CPORT);
    let unknown = [
        // Another source port.
        Pkt::tcp(PUBLIC, CPORT + 1, BACKEND, 80, SYN).ip_bytes(),
        // Another destination.
        Pkt::tcp(PUBLIC, CPORT, BACKEND2, 80, SYN).ip_bytes(),
        // Another protocol on the same ports.
        Pkt::udp(PUBLIC, CPORT, BACKEND, 80).ip_bytes(),
        // An echo no one sent.
        Pkt::echo(PUBLIC, BACKEND, 0x99, false).ip_bytes(),
    ];
    for inner in &unknown {
        for (src, dst) in [(HOP, PUBLIC), (BACKEND, PUBLIC), (BACKEND, CLIENT)] {
            let err = icmp_error(src, dst, ttl_exceeded(), inner);
            assert_untouched(&f.ingress(&err), &err);
            assert_untouched(&f.egress(&err), &err);
        }
    }
    assert_eq!(f.stat("icmp_errors_translated"), 0);
    assert_eq!(f.conntrack().len(), 2, "errors open no flows");
}

#[test]
fn truncated_icmp_errors_are_never_rewritten_wrongly() {
    let f = Fixture::new(&[rule(1, "snat --to 203.0.113.5")]);
    let syn = Pkt::tcp(CLIENT, CPORT, BACKEND, 80, SYN);
    assert_eq!(snat_port(&f, &syn, PUBLIC), CPORT);
    let inner = syn.from(PUBLIC, CPORT).ip_bytes();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("embedded IP header cut", icmp_error(HOP, PUBLIC, ttl_exceeded(), &inner[..12])),
        ("embedded IP header only", icmp_error(HOP, PUBLIC, ttl_exceeded(), &inner[..20])),
        ("embedded L4 cut to 4 bytes", icmp_error(HOP, PUBLIC, ttl_exceeded(), &inner[..24])),
        ("embedded L4 cut to 7 bytes", icmp_error(HOP, PUBLIC, ttl_exceeded(), &inner[..27])),
        ("from the backend, embedded header cut", icmp_error(BACKEND, PUBLIC, port_unreachable(), &inner[..16])),
    ];
    // The embedded IHL claims options that are not there.
    let mut ihl = inner[..28].to_vec();
    ihl[0] = 0x4f;
    cases.push(("embedded IHL beyond the data", icmp_error(HOP, PUBLIC, ttl_exceeded(), &ihl)));
    // The outer total length ends inside the embedded ports (the rest is trailing padding).
    let mut short = icmp_error(HOP, PUBLIC, ttl_exceeded(), &inner[..28]);
    let tot = (20 + 8 + 20 + 2) as u16;
    short[16..18].copy_from_slice(&tot.to_be_bytes());
    short[24..26].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&short[14..34]);
    short[24..26].copy_from_slice(&c.to_be_bytes());
    cases.push(("outer total length ends in the embedded ports", short));
    for (name, frame) in &cases {
        expect_passed_or_dropped(&format!("{name} at ingress"), &f.ingress(frame), frame);
        expect_passed_or_dropped(&format!("{name} at egress"), &f.egress(frame), frame);
    }
    assert_eq!(f.stat("icmp_errors_translated"), 0);
    // The flow is still translated both ways.
    let ack = syn.clone().flags(ACK);
    assert_translated(&f.egress(&ack.bytes()), &ack.from(PUBLIC, CPORT));
    let reply = Pkt::tcp(BACKEND, 80, PUBLIC, CPORT, SYN | ACK);
    expect_reply(&f, &reply, &reply.to(CLIENT, CPORT));
}

// ---------------------------------------------------------------------------------------------------------------
// 6. Full NAT: DNAT at ingress, then SNAT at egress
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn full_nat_translates_both_ways_through_both_hooks() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:80"), rule(2, "snat -o lo --to 10.0.2.1")]);
    let syn = Pkt::tcp(CLIENT, CPORT, ROUTER, 8080, SYN);
    let r = f.ingress(&syn.bytes());
    let dnated = syn.to(BACKEND, 80);
    assert_translated(&r, &dnated);
    let r = f.egress(&r.data);
    let natted = dnated.from(GW, CPORT);
    assert_translated(&r, &natted);

    let syn_ack = Pkt::tcp(BACKEND, 80, GW, CPORT, SYN | ACK);
    let r = f.ingress(&syn_ack.bytes());
    let un_snated = syn_ack.to(CLIENT, CPORT);
    assert_translated(&r, &un_snated);
    let r = f.egress(&r.data);
    assert_translated(&r, &un_snated.from(ROUTER, 8080));

    // Later packets of both directions.
    let ack = syn.clone().flags(ACK | PSH).payload(b"request");
    let r = f.ingress(&ack.bytes());
    assert_translated(&r, &ack.to(BACKEND, 80));
    assert_translated(&f.egress(&r.data), &ack.to(BACKEND, 80).from(GW, CPORT));
    let resp = syn_ack.clone().flags(ACK | PSH).payload(b"response");
    let r = f.ingress(&resp.bytes());
    assert_translated(&r, &resp.to(CLIENT, CPORT));
    assert_translated(&f.egress(&r.data), &resp.to(CLIENT, CPORT).from(ROUTER, 8080));

    assert_eq!(f.stat("new_flows"), 2);
    assert_eq!(f.conntrack().len(), 4);
    assert_eq!(f.counters(slot_of(1)).flows, 1);
    assert_eq!(f.counters(slot_of(2)).flows, 1);

    // An error from the backend about the client's packet: translated back through both hooks in turn.
    let err = icmp_error(BACKEND, GW, port_unreachable(), &natted.ip_bytes());
    let r = f.ingress(&err);
    assert_error_translated(&r, &icmp_error(BACKEND, CLIENT, port_unreachable(), &dnated.ip_bytes()), true);
    let r = f.egress(&r.data);
    assert_error_translated(&r, &icmp_error(ROUTER, CLIENT, port_unreachable(), &syn.ip_bytes()), true);
    assert_eq!(f.stat("icmp_errors_translated"), 2);
}

// ---------------------------------------------------------------------------------------------------------------
// The handoff: tc ingress tells tc egress what it found about the packet (pfwd-ebpf/src/handoff.rs), so that a
// forwarded packet costs one conntrack lookup, not two. The fixture keeps each test on one CPU, as forwarding does.
// ---------------------------------------------------------------------------------------------------------------

/// The entry `key`, from whichever table holds it.
#[track_caller]
fn ct_entry(f: &Fixture, key: &Tuple) -> CtEntry {
    f.conntrack().into_iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no entry {key:?}")).1
}

/// One conntrack table, writable (to plant or remove entries between the two hooks).
fn ct_table(f: &Fixture, name: &str) -> aya::maps::HashMap<aya::maps::MapData, Tuple, CtEntry> {
    let data = aya::maps::MapData::from_pin(f.kernel().pin_dir().join(name)).expect("pinned conntrack map");
    aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap()
}

/// A DNAT flow (client -> 10.0.1.1:8080 -> backend:80) through its handshake, each packet through both hooks.
fn dnat_handshake(f: &Fixture) -> Pkt {
    let syn = Pkt::tcp(CLIENT, CPORT, ROUTER, 8080, SYN);
    for (pkt, want) in [
        (syn.clone(), syn.to(BACKEND, 80)),
        (Pkt::tcp(BACKEND, 80, CLIENT, CPORT, SYN | ACK), Pkt::tcp(ROUTER, 8080, CLIENT, CPORT, SYN | ACK)),
        (syn.clone().flags(ACK), syn.to(BACKEND, 80).flags(ACK)),
    ] {
        let r = f.ingress(&pkt.bytes());
        assert_translated(&f.egress(&r.data), &want);
    }
    syn
}

#[test]
fn egress_takes_a_dnat_replys_translation_from_ingress_without_a_lookup() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:80")]);
    let syn = Pkt::tcp(CLIENT, CPORT, ROUTER, 8080, SYN);
    let r = f.ingress(&syn.bytes());
    assert_translated(&f.egress(&r.data), &syn.to(BACKEND, 80));
    // The flow's first packet through egress settled it there: nothing found or opened for it.
    let key = tuple(CLIENT, CPORT, ROUTER, 8080, PROTO_TCP);
    assert_eq!(ct_entry(&f, &key).flags & (ct_flag::SETTLED | ct_flag::EGRESS_TOO), ct_flag::SETTLED);
    assert_eq!(f.stat("egress_handoffs"), 0, "a new flow's first packet is looked up at egress");

    // The reply: ingress finds its flow (translated at egress), records it and hands the translation over. Its
    // entry is removed between the hooks: egress translates it all the same, so it did not look it up.
    let syn_ack = Pkt::tcp(BACKEND, 80, CLIENT, CPORT, SYN | ACK);
    let r = f.ingress(&syn_ack.bytes());
    assert_untouched(&r, &syn_ack.bytes());
    assert_ne!(ct_entry(&f, &key).state & ct_state::SEEN_REPLY, 0, "ingress recorded the reply in the flow");
    let reply_key = tuple(BACKEND, 80, CLIENT, CPORT, PROTO_TCP);
    let reply_entry = ct_entry(&f, &reply_key);
    assert_eq!(f.kernel().conntrack_delete(&[reply_key]).unwrap(), 1);
    assert_translated(&f.egress(&r.data), &syn_ack.from(ROUTER, 8080));
    assert_eq!(f.stat("egress_handoffs"), 1);
    assert_eq!(f.counters(slot_of(1)).packets, 2);

    // With the entry back: a packet ingress did not describe (another identification) is looked up at egress, and
    // translated by the entry.
    let table = if reply_entry.is_confirmed() { names::CONNTRACK } else { names::CONNTRACK_NEW };
    ct_table(&f, table).insert(reply_key, reply_entry, 0).unwrap();
    let r = f.ingress(&syn_ack.bytes());
    let mut other = syn_ack.clone();
    other.ident ^= 0x0101;
    assert_translated(&f.egress(&other.bytes()), &other.from(ROUTER, 8080));
    assert_eq!(f.stat("egress_handoffs"), 1);
    // And every packet empties the slot: the one ingress did describe, coming after another, is looked up too.
    let planted = CtEntry { xlat: tuple(PUBLIC, 999, CLIENT, CPORT, PROTO_TCP), ..reply_entry };
    ct_table(&f, table).insert(reply_key, planted, 0).unwrap();
    assert_translated(&f.egress(&r.data), &syn_ack.from(PUBLIC, 999));
    assert_eq!(f.stat("egress_handoffs"), 1);
}

#[test]
fn egress_leaves_a_settled_flows_packets_alone_and_looks_up_any_other() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:80")]);
    let syn = dnat_handshake(&f);
    let data = syn.clone().flags(ACK | PSH).payload(b"request");
    let dnated = data.to(BACKEND, 80);
    let r = f.ingress(&data.bytes());
    assert_translated(&r, &dnated);
    // An entry for the translated tuple at egress, planted between the hooks: egress, told by ingress that the flow
    // is settled with nothing to do there, does not look it up.
    let key = tuple(CLIENT, CPORT, ROUTER, 8080, PROTO_TCP);
    let live = ct_entry(&f, &key);
    assert_ne!(live.flags & ct_flag::SETTLED, 0);
    let planted_key = tuple(CLIENT, CPORT, BACKEND, 80, PROTO_TCP);
    let planted = CtEntry {
        xlat: tuple(PUBLIC, 999, BACKEND, 80, PROTO_TCP),
        hook: ct_hook::EGRESS,
        dir: dir::ORIGINAL,
        flags: 0,
        ..live
    };
    let table = if live.is_confirmed() { names::CONNTRACK } else { names::CONNTRACK_NEW };
    ct_table(&f, table).insert(planted_key, planted, 0).unwrap();
    let before = f.stat("egress_handoffs");
    assert_untouched(&f.egress(&r.data), &dnated.bytes());
    assert_eq!(f.stat("egress_handoffs"), before + 1);
    // The same packet with another identification is not the one ingress described: egress looks it up, and the
    // planted entry translates it.
    let mut other = dnated.clone();
    other.ident ^= 0x0101;
    assert_translated(&f.egress(&other.bytes()), &other.from(PUBLIC, 999));
    assert_eq!(f.stat("egress_handoffs"), before + 1);
}

#[test]
fn full_nat_flows_find_each_other_and_egress_still_looks_their_packets_up() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:80"), rule(2, "snat -o lo --to 10.0.2.1")]);
    let syn = Pkt::tcp(CLIENT, CPORT, ROUTER, 8080, SYN);
    let r = f.ingress(&syn.bytes());
    assert_translated(&f.egress(&r.data), &syn.to(BACKEND, 80).from(GW, CPORT));
    // The SNAT flow, opened at egress on the DNAT flow's translated tuple, marks both flows: packets either
    // translates at ingress have the other's entry to meet at egress.
    let dnat_key = tuple(CLIENT, CPORT, ROUTER, 8080, PROTO_TCP);
    let snat_reply_key = tuple(BACKEND, 80, GW, CPORT, PROTO_TCP);
    for k in [dnat_key, snat_reply_key] {
        assert_ne!(ct_entry(&f, &k).flags & ct_flag::EGRESS_TOO, 0, "{k:?}");
    }
    assert_ne!(ct_entry(&f, &dnat_key).flags & ct_flag::SETTLED, 0);
    // Both directions, later packets: still looked up at egress (the other flow's entry there).
    let before = f.stat("egress_handoffs");
    let syn_ack = Pkt::tcp(BACKEND, 80, GW, CPORT, SYN | ACK);
    for (pkt, want) in [
        (syn_ack.clone(), syn_ack.to(CLIENT, CPORT).from(ROUTER, 8080)),
        (syn.clone().flags(ACK), syn.to(BACKEND, 80).from(GW, CPORT).flags(ACK)),
        (syn_ack.clone().flags(ACK | PSH), syn_ack.to(CLIENT, CPORT).from(ROUTER, 8080).flags(ACK | PSH)),
    ] {
        let r = f.ingress(&pkt.bytes());
        assert_translated(&f.egress(&r.data), &want);
    }
    assert_eq!(f.stat("egress_handoffs"), before, "no packet of a full NAT skips its lookup at egress");
    assert_eq!(f.stat("new_flows"), 2);
}

#[test]
fn a_snat_rule_added_mid_flow_does_not_apply_to_a_settled_udp_flow() {
    // As in netfilter, a flow's NAT at egress is settled by its first packet there; a flow whose first packet never
    // got there (lost on the way) is settled by the next.
    let dnat = rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353");
    let f = Fixture::new(std::slice::from_ref(&dnat));
    let q = Pkt::udp(CLIENT, CPORT, ROUTER, 53);
    let r = f.ingress(&q.bytes());
    assert_translated(&f.egress(&r.data), &q.to(BACKEND, 5353));
    let lost = Pkt::udp(CLIENT, CPORT + 1, ROUTER, 53);
    assert_translated(&f.ingress(&lost.bytes()), &lost.to(BACKEND, 5353));
    f.sync(&[dnat.clone(), rule(2, "masquerade -o lo -p udp")]);
    let r = f.ingress(&q.bytes());
    assert_untouched(&f.egress(&r.data), &q.to(BACKEND, 5353).bytes());
    // The same when egress gets the packet without the handoff (it waited between the hooks; here, another
    // identification): looked up, and still no new flow.
    let mut waited = q.to(BACKEND, 5353);
    waited.ident ^= 0x0101;
    assert_untouched(&f.egress(&waited.bytes()), &waited.bytes());
    let r = f.ingress(&lost.bytes());
    let r = f.egress(&r.data);
    let port = u16::from_be_bytes([r.data[34], r.data[35]]);
    assert_translated(&r, &lost.to(BACKEND, 5353).from(ROUTER, port));
    assert_eq!(f.stat("new_flows"), 3);
    // A new flow meets the rule.
    let new = Pkt::udp(CLIENT, CPORT + 2, ROUTER, 53);
    let r = f.egress(&f.ingress(&new.bytes()).data);
    let port = u16::from_be_bytes([r.data[34], r.data[35]]);
    assert_translated(&r, &new.to(BACKEND, 5353).from(ROUTER, port));
}
