//! Packet-level tests of the eBPF data path: real packets through the loaded `pfwd_ingress`/`pfwd_egress` programs
//! with BPF_PROG_TEST_RUN, checked against packets built independently with etherparse (never with pfwd's own
//! checksum code).
//!
//! In BPF_PROG_TEST_RUN a tc program sees the packet on the loopback device, so every fixture registers interface 1
//! (lo) with the address 10.0.1.1 and rules use `-i lo` or no interface. Needs root (BPF); each test pins into its own
//! directory, so tests run in parallel.
mod common;

use common::*;
use std::net::Ipv4Addr;

use etherparse::{EtherType, Ethernet2Header, Icmpv4Header, NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use pfwd_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, RuleCounters, Tuple, config_flag, ct_flag, ct_state, dir};

const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const BACKEND2: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 7);
const CPORT: u16 = 40_000;

// ---------------------------------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------------------------------

/// An Ethernet + IPv4 packet description; `bytes()` serializes it with every checksum computed by etherparse.
#[derive(Clone, Debug)]
struct Pkt {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    l4: L4,
    payload: Vec<u8>,
    ttl: u8,
    ident: u16,
    options: Vec<u8>,
    df: bool,
    mf: bool,
    frag_offset: u16,
}

impl Pkt {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Pkt {
            src,
            dst,
            l4,
            payload: b"pfwd test payload".to_vec(),
            ttl: 61,
            ident: 0x4d2c,
            options: vec![],
            df: false,
            mf: false,
            frag_offset: 0,
        }
    }

    fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Self {
        let ack = if flags & ACK != 0 { 0x0bad_cafe } else { 0 };
        Pkt::new(src, dst, L4::Tcp { sport, dport, seq: 0x1234_5678, ack, flags })
    }

    /// A client SYN to `dst:dport` (with data, so the payload is checked too).
    fn syn(dst: Ipv4Addr, dport: u16) -> Self {
        Pkt::tcp(CLIENT, CPORT, dst, dport, SYN)
    }

    fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Pkt::new(src, dst, L4::Udp { sport, dport, csum: true })
    }

    fn echo(src: Ipv4Addr, dst: Ipv4Addr, reply: bool) -> Self {
        Pkt::new(src, dst, L4::Echo { id: 0x77, seq: 3, reply })
    }

    fn ports(&self) -> (u16, u16) {
        match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (sport, dport),
            L4::Echo { .. } => (0, 0),
        }
    }

    fn set_ports(&mut self, s: u16, d: u16) {
        match &mut self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (*sport, *dport) = (s, d),
            L4::Echo { .. } => assert!(s == 0 && d == 0, "ICMP has no ports"),
        }
    }

    /// The same packet with another destination (what DNAT should produce).
    fn to(&self, dst: Ipv4Addr, dport: u16) -> Self {
        let mut p = self.clone();
        p.dst = dst;
        p.set_ports(self.ports().0, dport);
        p
    }

    /// The same packet with another source (what reply translation should produce).
    fn from(&self, src: Ipv4Addr, sport: u16) -> Self {
        let mut p = self.clone();
        p.src = src;
        p.set_ports(sport, self.ports().1);
        p
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

    fn ip4(&self) -> Ip4<'_> {
        let (src, dst, ttl, ident, options) = (self.src, self.dst, self.ttl, self.ident, &self.options[..]);
        Ip4 { src, dst, ttl, ident, df: self.df, mf: self.mf, frag_offset: self.frag_offset, options }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = eth(EtherType::IPV4).to_vec();
        out.extend_from_slice(&self.ip4().packet(&self.l4, &self.payload));
        out
    }
}

fn eth(ty: EtherType) -> [u8; 14] {
    Ethernet2Header { source: [2, 0, 0, 0, 0, 1], destination: [2, 0, 0, 0, 0, 2], ether_type: ty }.to_bytes()
}

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

/// Recomputes every checksum of `frame` with etherparse and compares it with the one in the packet.
fn assert_checksums_valid(frame: &[u8]) {
    let h = PacketHeaders::from_ethernet_slice(frame).unwrap_or_else(|e| panic!("unparsable output: {e}"));
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else { panic!("no IPv4 header in {}", describe(frame)) };
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 header checksum of {}", describe(frame));
    let payload = h.payload.slice();
    match &h.transport {
        Some(TransportHeader::Tcp(t)) => {
            assert_eq!(t.checksum, t.calc_checksum_ipv4(ip, payload).unwrap(), "TCP checksum of {}", describe(frame))
        }
        // 0 means "no checksum"; etherparse sends a computed 0 as 0xffff, as RFC 768 requires.
        Some(TransportHeader::Udp(u)) if u.checksum != 0 => {
            assert_eq!(u.checksum, u.calc_checksum_ipv4(ip, payload).unwrap(), "UDP checksum of {}", describe(frame))
        }
        Some(TransportHeader::Icmpv4(i)) => {
            let expect = Icmpv4Header::with_checksum(i.icmp_type.clone(), payload).checksum;
            assert_eq!(i.checksum, expect, "ICMP checksum of {}", describe(frame))
        }
        _ => {}
    }
}

/// The program translated `input` into exactly `expected` (built independently, so this checks every rewritten
/// field, every field that must not change and all checksums) and let it continue.
#[track_caller]
fn assert_translated(r: &Run, expected: &Pkt) {
    assert_eq!(r.ret, NEXT, "return value (translated packets continue)");
    assert_checksums_valid(&r.data);
    let want = expected.bytes();
    assert!(r.data == want, "wrong translation\n got: {}\nwant: {}", describe(&r.data), describe(&want));
}

/// The program passed `input` byte for byte.
#[track_caller]
fn assert_untouched(r: &Run, input: &[u8]) {
    assert_eq!(r.ret, NEXT, "return value (untranslated packets continue)");
    assert!(r.data == input, "packet was modified\n got: {}\nwant: {}", describe(&r.data), describe(input));
}

/// Sends `pkt` through ingress and expects it translated to `to:dport`.
#[track_caller]
fn expect_dnat(f: &Fixture, pkt: &Pkt, to: Ipv4Addr, dport: u16) {
    assert_translated(&f.ingress(&pkt.bytes()), &pkt.to(to, dport));
}

#[track_caller]
fn expect_no_dnat(f: &Fixture, pkt: &Pkt) {
    let bytes = pkt.bytes();
    assert_untouched(&f.ingress(&bytes), &bytes);
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Each rule kind on a new flow
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn dnat_with_port_rewrites_address_and_port() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080), BACKEND, 9000);
}

#[test]
fn dnat_of_udp_with_port() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")]);
    expect_dnat(&f, &Pkt::udp(CLIENT, 5555, ROUTER, 53), BACKEND, 5353);
}

#[test]
fn dnat_without_port_keeps_the_port() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2")]);
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080), BACKEND, 8080);
}

#[test]
fn redirect_goes_to_the_interface_address() {
    let f = Fixture::new(&[rule(1, "redirect -i lo -p tcp --dport 80 --to-port 3128")]);
    // A transparent proxy: the client talks to some outside address.
    expect_dnat(&f, &Pkt::syn(Ipv4Addr::new(203, 0, 113, 5), 80), ROUTER, 3128);
}

#[test]
fn redirect_on_an_interface_without_address_drops() {
    let f = Fixture::new(&[rule(1, "redirect -p tcp --dport 80 --to-port 3128")]);
    f.kernel().set_iface(LO, None, None, None).unwrap();
    let r = f.ingress(&Pkt::syn(ROUTER, 80).bytes());
    assert_eq!(r.ret, DROP);
    assert_eq!(f.stat("redirect_no_address_drops"), 1);
    assert!(f.conntrack().is_empty());
}

#[test]
fn dnat_to_localhost() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 127.0.0.1:17355")]);
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080), Ipv4Addr::LOCALHOST, 17355);
}

#[test]
fn port_range_to_one_port() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8000-8099 --to 10.0.2.2:9000")]);
    for (i, port) in [8000, 8042, 8099].into_iter().enumerate() {
        // A new client port per packet: each is a new flow.
        let pkt = Pkt::syn(ROUTER, port).from(CLIENT, CPORT + i as u16);
        expect_dnat(&f, &pkt, BACKEND, 9000);
    }
    expect_no_dnat(&f, &Pkt::syn(ROUTER, 7999));
    expect_no_dnat(&f, &Pkt::syn(ROUTER, 8100));
}

#[test]
fn port_range_keeping_the_port() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 8000-8099 --to 10.0.2.2")]);
    expect_dnat(&f, &Pkt::udp(CLIENT, 5000, ROUTER, 8042), BACKEND, 8042);
    expect_dnat(&f, &Pkt::udp(CLIENT, 5001, ROUTER, 8099), BACKEND, 8099);
}

#[test]
fn address_only_dnat_applies_to_tcp_udp_and_icmp() {
    let f = Fixture::new(&[rule(1, "dnat -d 10.0.1.1 --to 10.0.2.2")]);
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080), BACKEND, 8080);
    expect_dnat(&f, &Pkt::udp(CLIENT, 5000, ROUTER, 53), BACKEND, 53);
    // ICMP's checksum has no pseudo-header: only the IP header checksum changes.
    expect_dnat(&f, &Pkt::echo(CLIENT, ROUTER, false), BACKEND, 0);
    assert_eq!(f.stat("new_flows"), 3);
    let ct = f.conntrack();
    for (key, xlat) in [
        (tuple(CLIENT, 5000, ROUTER, 53, PROTO_UDP), tuple(CLIENT, 5000, BACKEND, 53, PROTO_UDP)),
        // An echo's identifier stands in for both ports of its tuple (so SNAT can translate it like a port).
        (tuple(CLIENT, 0x77, ROUTER, 0x77, PROTO_ICMP), tuple(CLIENT, 0x77, BACKEND, 0x77, PROTO_ICMP)),
    ] {
        assert!(ct.iter().any(|(t, e)| *t == key && e.xlat == xlat && e.dir == dir::ORIGINAL), "{key:?} in {ct:#?}");
    }
    // The echo reply gets its source restored.
    let reply = Pkt::echo(BACKEND, CLIENT, true);
    assert_translated(&f.egress(&reply.bytes()), &reply.from(ROUTER, 0));
}

#[test]
fn dont_fragment_packets_are_translated() {
    // DF is not a fragment: only MF and the offset are.
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    let mut pkt = Pkt::syn(ROUTER, 8080);
    pkt.df = true;
    expect_dnat(&f, &pkt, BACKEND, 9000);
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Established flows, and TCP without a SYN
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn later_packets_of_a_flow_are_translated_the_same_way() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080), BACKEND, 9000);
    let data = Pkt::syn(ROUTER, 8080).flags(ACK | PSH).payload(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    expect_dnat(&f, &data, BACKEND, 9000);
    expect_dnat(&f, &data.clone().flags(ACK).payload(b""), BACKEND, 9000);
    assert_eq!(f.stat("new_flows"), 1);
    assert_eq!(f.counters(slot_of(1)).packets, 3, "every packet of the flow counts to its rule");
}

#[test]
fn mid_stream_tcp_without_a_flow_is_not_translated() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    for flags in [ACK, ACK | PSH, SYN | ACK, RST, RST | ACK, FIN | ACK, SYN | RST] {
        expect_no_dnat(&f, &Pkt::syn(ROUTER, 8080).flags(flags));
    }
    assert!(f.conntrack().is_empty(), "no flow may be created by mid-stream packets");
    assert_eq!(f.stat("new_flows"), 0);
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Replies
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn reply_source_is_restored_at_egress() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080), BACKEND, 9000);
    let syn_ack = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, SYN | ACK).payload(b"");
    assert_translated(&f.egress(&syn_ack.bytes()), &syn_ack.from(ROUTER, 8080));
    let data = syn_ack.clone().flags(ACK | PSH).payload(b"HTTP/1.1 200 OK\r\n\r\n");
    assert_translated(&f.egress(&data.bytes()), &data.from(ROUTER, 8080));
}

#[test]
fn reply_of_a_udp_flow_is_restored() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")]);
    expect_dnat(&f, &Pkt::udp(CLIENT, 5555, ROUTER, 53), BACKEND, 5353);
    let reply = Pkt::udp(BACKEND, 5353, CLIENT, 5555);
    assert_translated(&f.egress(&reply.bytes()), &reply.from(ROUTER, 53));
}

#[test]
fn reply_without_a_flow_passes_unchanged() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    let syn_ack = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, SYN | ACK).bytes();
    assert_untouched(&f.egress(&syn_ack), &syn_ack);
    // A flow exists, but for another client port.
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080), BACKEND, 9000);
    let other = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT + 1, SYN | ACK).bytes();
    assert_untouched(&f.egress(&other), &other);
}

#[test]
fn each_direction_is_only_translated_on_its_own_hook() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    let syn = Pkt::syn(ROUTER, 8080);
    expect_dnat(&f, &syn, BACKEND, 9000);
    // The original direction seen at egress, and a reply seen at ingress, are left alone.
    let original = syn.clone().flags(ACK).bytes();
    assert_untouched(&f.egress(&original), &original);
    let reply = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, SYN | ACK).bytes();
    assert_untouched(&f.ingress(&reply), &reply);
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Conntrack and counters
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn new_flow_creates_both_conntrack_entries() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080), BACKEND, 9000);

    let ct = f.conntrack();
    assert_eq!(ct.len(), 2, "{ct:#?}");
    let find = |k: Tuple| ct.iter().find(|(t, _)| *t == k).unwrap_or_else(|| panic!("no entry {k:?} in {ct:#?}")).1;
    let orig = find(tuple(CLIENT, CPORT, ROUTER, 8080, PROTO_TCP));
    assert_eq!(orig.xlat, tuple(CLIENT, CPORT, BACKEND, 9000, PROTO_TCP));
    assert_eq!((orig.dir, orig.rule_slot, orig.state), (dir::ORIGINAL, slot_of(1), 0));
    let reply = find(tuple(BACKEND, 9000, CLIENT, CPORT, PROTO_TCP));
    assert_eq!(reply.xlat, tuple(ROUTER, 8080, CLIENT, CPORT, PROTO_TCP));
    assert_eq!((reply.dir, reply.rule_slot, reply.state), (dir::REPLY, slot_of(1), 0));
    assert!(orig.created_s != 0 && orig.last_seen_ns / 1_000_000_000 == u64::from(orig.created_s));
    // The programs' clock is the jiffies clock set at load, and userspace reads the same one (within a USER_HZ
    // tick): ages shown by `pfwd conntrack` and expiry decisions agree with the programs'.
    let cfg = f.kernel().config().expect("config");
    assert_eq!(cfg.tick_ns, pfwd::clock::tick_ns());
    assert!(cfg.tick_ns != 0);
    let now = pfwd::clock::now_ns(&cfg);
    assert!(now.abs_diff(orig.last_seen_ns) < 200_000_000, "kernel {} vs userspace {now}", orig.last_seen_ns);
    assert!(now / 1_000_000_000 - u64::from(orig.created_s) <= 1, "created {} s, now {now} ns", orig.created_s);

    // The reply marks both entries.
    let syn_ack = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, SYN | ACK);
    assert_translated(&f.egress(&syn_ack.bytes()), &syn_ack.from(ROUTER, 8080));
    for (t, e) in f.conntrack() {
        assert_eq!(e.state, ct_state::SEEN_REPLY, "{t:?}");
    }
}

#[test]
fn counters_count_packets_bytes_and_flows() {
    let f =
        Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000"), rule(2, "dnat -p udp --to 10.0.2.3")]);
    let syn = Pkt::syn(ROUTER, 8080).bytes();
    let syn_ack = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, SYN | ACK).payload(b"").bytes();
    let ack = Pkt::syn(ROUTER, 8080).flags(ACK).payload(b"").bytes();
    assert_eq!(f.ingress(&syn).ret, NEXT);
    assert_eq!(f.egress(&syn_ack).ret, NEXT);
    assert_eq!(f.ingress(&ack).ret, NEXT);

    // Bytes count the IP packet (header and payload), as iptables does: the frame minus its Ethernet header.
    let ip_len = |frame: &[u8]| (frame.len() - 14) as u64;
    let bytes = ip_len(&syn) + ip_len(&syn_ack) + ip_len(&ack);
    assert_eq!(f.counters(slot_of(1)), RuleCounters { packets: 3, bytes, flows: 1, drops: 0 });
    assert_eq!(f.counters(slot_of(2)), RuleCounters::default(), "the udp rule saw nothing");
    assert_eq!(f.stat("new_flows"), 1);

    // A second flow of the same rule.
    let syn2 = Pkt::syn(ROUTER, 8080).from(CLIENT, CPORT + 1).bytes();
    assert_eq!(f.ingress(&syn2).ret, NEXT);
    let c = f.counters(slot_of(1));
    assert_eq!((c.packets, c.bytes, c.flows), (4, bytes + ip_len(&syn2), 2));
    assert_eq!(f.stat("new_flows"), 2);
}

// ---------------------------------------------------------------------------------------------------------------
// 5. Filters and precedence
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn source_prefix_filter() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp -s 192.168.1.0/24 --dport 8080 --to 10.0.2.2:9000")]);
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080), BACKEND, 9000);
    expect_no_dnat(&f, &Pkt::syn(ROUTER, 8080).from(Ipv4Addr::new(192, 168, 2, 7), CPORT));
}

#[test]
fn source_address_filter() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp -s 192.168.1.1 --dport 8080 --to 10.0.2.2:9000")]);
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080).from(Ipv4Addr::new(192, 168, 1, 1), CPORT), BACKEND, 9000);
    expect_no_dnat(&f, &Pkt::syn(ROUTER, 8080).from(Ipv4Addr::new(192, 168, 1, 2), CPORT));
}

#[test]
fn destination_filters() {
    let f = Fixture::new(&[
        rule(1, "dnat -p tcp -d 10.9.0.0/16 --dport 80 --to 10.0.2.2:9000"),
        rule(2, "dnat -p tcp -d 10.0.1.1 --dport 81 --to 10.0.2.2:9001"),
    ]);
    expect_dnat(&f, &Pkt::syn(Ipv4Addr::new(10, 9, 3, 4), 80), BACKEND, 9000);
    expect_no_dnat(&f, &Pkt::syn(Ipv4Addr::new(10, 8, 3, 4), 80));
    expect_dnat(&f, &Pkt::syn(ROUTER, 81), BACKEND, 9001);
    expect_no_dnat(&f, &Pkt::syn(Ipv4Addr::new(10, 0, 1, 2), 81));
}

#[test]
fn protocol_filter() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2"), rule(2, "dnat -p tcp --to 10.0.2.3")]);
    expect_no_dnat(&f, &Pkt::echo(CLIENT, ROUTER, false));
    expect_dnat(&f, &Pkt::syn(ROUTER, 53), BACKEND2, 53);
    expect_dnat(&f, &Pkt::udp(CLIENT, 5000, ROUTER, 53), BACKEND, 53);
    expect_no_dnat(&f, &Pkt::udp(CLIENT, 5000, ROUTER, 54));
}

#[test]
fn most_specific_rule_wins() {
    // Listed least specific first, so list order cannot be what decides.
    let x = Ipv4Addr::new(10, 0, 3, 1);
    let y = Ipv4Addr::new(10, 0, 3, 2);
    let z = Ipv4Addr::new(10, 0, 3, 3);
    let w = Ipv4Addr::new(10, 0, 3, 4);
    let f = Fixture::new(&[
        rule(1, "dnat -d 10.0.1.1 --to 10.0.3.3"),
        rule(2, "dnat -p tcp --dport 8000-8099 --to 10.0.3.2"),
        rule(3, "dnat -p tcp --dport 8080 --to 10.0.3.1:9000"),
        rule(4, "dnat -p tcp -s 192.168.5.0/24 --dport 8080 --to 10.0.3.4"),
        rule(5, "dnat -i lo -p tcp --dport 8081 --to 10.0.3.4"),
    ]);
    let from = |n: u16| Pkt::syn(ROUTER, 1).from(CLIENT, CPORT + n);
    expect_dnat(&f, &from(1).to(ROUTER, 8080), x, 9000);
    expect_dnat(&f, &from(2).to(ROUTER, 8085), y, 8085);
    expect_dnat(&f, &from(3).to(ROUTER, 9999), z, 9999);
    expect_dnat(&f, &Pkt::udp(CLIENT, 5000, ROUTER, 8080), z, 8080);
    // A source prefix beats none; an interface beats none (both at equal port width).
    expect_dnat(&f, &from(4).to(ROUTER, 8080).from(Ipv4Addr::new(192, 168, 5, 9), CPORT), w, 8080);
    expect_dnat(&f, &from(5).to(ROUTER, 8081), w, 8081);
    // Same match, different targets: the older rule (lower id) wins whatever the list order.
    let f = Fixture::new(&[
        rule(7, "dnat -p tcp --dport 80 --to 10.0.3.2"),
        rule(6, "dnat -p tcp --dport 80 --to 10.0.3.1"),
    ]);
    expect_dnat(&f, &Pkt::syn(ROUTER, 80), x, 80);
}

#[test]
fn negated_matches_and_dst_local() {
    let f = Fixture::new(&[
        rule(1, "dnat -p tcp ! -s 192.168.1.0/24 --dport 8080 --to 10.0.2.2:9000"),
        rule(2, "dnat -p tcp -d local --dport 8081 --to 10.0.2.3:9000"),
        rule(3, "dnat ! -i lo -p tcp --dport 8082 --to 10.0.2.2"),
        rule(4, "dnat -p tcp ! -d 10.0.1.1 --dport 8083 --to 10.0.2.2"),
    ]);
    let elsewhere = Ipv4Addr::new(198, 51, 100, 1);
    // ! -s: the client's network is excluded, other sources are translated.
    expect_no_dnat(&f, &Pkt::syn(ROUTER, 8080));
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080).from(Ipv4Addr::new(203, 0, 113, 5), 40_001), BACKEND, 9000);
    // -d local: the router's own address only.
    expect_dnat(&f, &Pkt::syn(ROUTER, 8081), BACKEND2, 9000);
    expect_no_dnat(&f, &Pkt::syn(elsewhere, 8081));
    // ! -i lo: the test runs on lo.
    expect_no_dnat(&f, &Pkt::syn(ROUTER, 8082));
    // ! -d: every destination but the router's address.
    expect_no_dnat(&f, &Pkt::syn(ROUTER, 8083));
    expect_dnat(&f, &Pkt::syn(elsewhere, 8083), BACKEND, 8083);
    // The address set follows what userspace writes (pfwd refreshes it at every rule change and on address events).
    f.kernel().set_local_addrs(&[elsewhere.into()]).unwrap();
    expect_dnat(&f, &Pkt::syn(elsewhere, 8081).from(CLIENT, 40_002), BACKEND2, 9000);
    expect_no_dnat(&f, &Pkt::syn(ROUTER, 8081).from(CLIENT, 40_003));
}

// ---------------------------------------------------------------------------------------------------------------
// 6. UDP checksum edge cases
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn udp_without_checksum_keeps_it_zero() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")]);
    let mut pkt = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    pkt.l4 = L4::Udp { sport: 5555, dport: 53, csum: false };
    let r = f.ingress(&pkt.bytes());
    assert_translated(&r, &pkt.to(BACKEND, 5353));
    assert_eq!(&r.data[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
    // The reply, also without checksum.
    let mut reply = Pkt::udp(BACKEND, 5353, CLIENT, 5555);
    reply.l4 = L4::Udp { sport: 5353, dport: 5555, csum: false };
    assert_translated(&f.egress(&reply.bytes()), &reply.from(ROUTER, 53));
}

#[test]
fn udp_checksum_computing_to_zero_is_sent_as_ffff() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")]);
    // Pick the first payload word so that the translated packet's one's-complement sum is 0xffff (checksum 0): with
    // the word at 0 the checksum is c = ~sum, and adding c to the sum gives 0xffff.
    let mut pkt = Pkt::udp(CLIENT, 5555, ROUTER, 53).payload(&[0, 0, 1, 2, 3, 4]);
    let c = {
        let out = pkt.to(BACKEND, 5353).bytes();
        u16::from_be_bytes([out[14 + 26], out[14 + 27]])
    };
    assert_ne!(c, 0xffff, "construction assumes a non-zero checksum with the word at 0");
    pkt.payload[..2].copy_from_slice(&c.to_be_bytes());
    let expected = pkt.to(BACKEND, 5353);
    let want = expected.bytes();
    assert_eq!(&want[14 + 26..14 + 28], &[0xff, 0xff], "construction: the translated checksum computes to 0");
    let r = f.ingress(&pkt.bytes());
    assert_translated(&r, &expected);
}

#[test]
fn udp_checksum_sent_as_ffff_is_updated_correctly() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")]);
    // As above, but the incoming packet is the one whose checksum computes to 0 (so it carries 0xffff, "-0").
    let mut pkt = Pkt::udp(CLIENT, 5555, ROUTER, 53).payload(&[0, 0, 9, 8, 7]);
    let c = {
        let out = pkt.bytes();
        u16::from_be_bytes([out[14 + 26], out[14 + 27]])
    };
    pkt.payload[..2].copy_from_slice(&c.to_be_bytes());
    assert_eq!(&pkt.bytes()[14 + 26..14 + 28], &[0xff, 0xff], "construction: the input checksum computes to 0");
    assert_translated(&f.ingress(&pkt.bytes()), &pkt.to(BACKEND, 5353));
}

// ---------------------------------------------------------------------------------------------------------------
// 7. IP options
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn ip_options_move_the_ports_and_stay_untouched() {
    let f =
        Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000"), rule(2, "dnat -p udp --to 10.0.2.3")]);
    let mut syn = Pkt::syn(ROUTER, 8080);
    syn.options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    expect_dnat(&f, &syn, BACKEND, 9000);
    let mut reply = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, SYN | ACK);
    reply.options = vec![1, 1, 1, 0];
    assert_translated(&f.egress(&reply.bytes()), &reply.from(ROUTER, 8080));

    // The longest header (IHL 15) with a timestamp-like option, on UDP.
    let mut udp = Pkt::udp(CLIENT, 5000, ROUTER, 53);
    udp.options = (0..40).map(|i| if i < 36 { 1 } else { 0 }).collect();
    udp.options[..4].copy_from_slice(&[0x44, 4, 5, 0]);
    expect_dnat(&f, &udp, BACKEND2, 53);
}

// ---------------------------------------------------------------------------------------------------------------
// 8. Malformed and foreign packets
// ---------------------------------------------------------------------------------------------------------------

/// Sets the IPv4 total length and fixes the header checksum (so only the field under test is wrong).
fn set_tot_len(frame: &mut [u8], len: u16) {
    frame[16..18].copy_from_slice(&len.to_be_bytes());
    fix_ip_checksum(frame);
}

fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let end = (14 + ihl.max(20)).min(frame.len());
    let sum =
        frame[14..end].chunks(2).fold(0u32, |s, c| s + u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32);
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    frame[24..26].copy_from_slice(&csum.to_be_bytes());
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

/// Broken variants of a well-formed TCP frame without options (and of `udp`, a UDP one), each wrong in one way.
fn malformed_variants(tcp: &[u8], udp: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    // (An IPv4 frame shorter than an IP header cannot be tested: BPF_PROG_TEST_RUN refuses it with EINVAL.)
    let variant = |base: &[u8], edit: &dyn Fn(&mut Vec<u8>)| {
        let mut t = base.to_vec();
        edit(&mut t);
        t
    };
    vec![
        (
            "truncated TCP header",
            variant(tcp, &|t| {
                t.truncate(14 + 20 + 10);
                set_tot_len(t, 30);
            }),
        ),
        (
            "IHL 4",
            variant(tcp, &|t| {
                t[14] = 0x44;
                fix_ip_checksum(t);
            }),
        ),
        ("IHL 0", variant(tcp, &|t| t[14] = 0x40)),
        (
            "tot_len beyond the packet",
            variant(tcp, &|t| {
                let len = t.len() - 14 + 10;
                set_tot_len(t, len as u16)
            }),
        ),
        ("tot_len below the IHL", variant(tcp, &|t| set_tot_len(t, 16))),
        ("TCP doff 4", variant(tcp, &|t| t[14 + 20 + 12] = 0x40)),
        ("TCP doff 0", variant(tcp, &|t| t[14 + 20 + 12] = 0x00)),
        ("IP version 6 in an IPv4 ethertype", variant(tcp, &|t| t[14] = 0x65)),
        (
            // IHL 6 claims the TCP ports as an option word, leaving 16 bytes for TCP.
            "IHL 6 with a 16-byte TCP header",
            variant(tcp, &|t| {
                t[14] = 0x46;
                set_tot_len(t, 40);
            }),
        ),
        (
            "truncated UDP header",
            variant(udp, &|t| {
                t.truncate(14 + 20 + 4);
                set_tot_len(t, 24);
            }),
        ),
    ]
}

#[test]
fn malformed_ipv4_passes_untouched() {
    // Rules that would translate these packets if they were well formed, including a catch-all.
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000"), rule(2, "dnat --to 10.0.2.3")]);
    // Flows, so that the broken replies at egress have entries to (wrongly) match.
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080).payload(b""), BACKEND, 9000);
    expect_dnat(&f, &Pkt::udp(CLIENT, 5000, ROUTER, 53).payload(b""), BACKEND2, 53);
    let ct_before = f.conntrack().len();
    let malformed_before = f.stat("malformed_passed");

    let client = malformed_variants(
        &Pkt::syn(ROUTER, 8080).from(CLIENT, 999).payload(b"").bytes(),
        &Pkt::udp(CLIENT, 5001, ROUTER, 53).payload(b"").bytes(),
    );
    for (name, frame) in &client {
        expect_passed_or_dropped(&format!("{name} at ingress"), &f.ingress(frame), frame);
    }
    let replies = malformed_variants(
        &Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, SYN | ACK).payload(b"").bytes(),
        &Pkt::udp(BACKEND2, 53, CLIENT, 5000).payload(b"").bytes(),
    );
    for (name, frame) in &replies {
        expect_passed_or_dropped(&format!("{name} at egress"), &f.egress(frame), frame);
    }
    assert_eq!(f.conntrack().len(), ct_before, "no flow from a malformed packet");
    assert_eq!(f.stat("malformed_passed") - malformed_before, (client.len() + replies.len()) as u64);
}

#[test]
fn non_ipv4_passes_untouched() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000"), rule(2, "dnat --to 10.0.2.3")]);
    let mut arp = eth(EtherType::ARP).to_vec();
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1]);
    arp.extend_from_slice(&CLIENT.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&ROUTER.octets());
    let mut ipv6 = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(
            [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
            [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            64,
        )
        .tcp(CPORT, 8080, 1, 1000)
        .syn()
        .write(&mut ipv6, b"")
        .unwrap();
    // An IPv4 packet behind a VLAN tag is not parsed either.
    let mut vlan = eth(EtherType::VLAN_TAGGED_FRAME).to_vec();
    vlan.extend_from_slice(&[0, 5, 8, 0]);
    vlan.extend_from_slice(&Pkt::syn(ROUTER, 8080).bytes()[14..]);
    for (name, frame) in [("ARP", arp), ("IPv6", ipv6), ("VLAN", vlan)] {
        let r = f.ingress(&frame);
        assert_eq!(r.ret, NEXT, "{name}");
        assert!(r.data == frame, "{name} modified");
        let r = f.egress(&frame);
        assert_eq!(r.ret, NEXT, "{name}");
        assert!(r.data == frame, "{name} modified at egress");
    }
    assert!(f.conntrack().is_empty());
}

#[test]
fn ethernet_padding_is_kept() {
    // Short frames are padded to 60 bytes; the padding is outside the IP packet and must not affect checksums.
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")]);
    let pkt = Pkt::udp(CLIENT, 5555, ROUTER, 53).payload(b"hi");
    let mut frame = pkt.bytes();
    frame.resize(60, 0xa5);
    let r = f.ingress(&frame);
    assert_eq!(r.ret, NEXT);
    let mut want = pkt.to(BACKEND, 5353).bytes();
    want.resize(60, 0xa5);
    assert!(r.data == want, "got: {:02x?}\nwant: {want:02x?}", r.data);
    assert_checksums_valid(&r.data);
}

// ---------------------------------------------------------------------------------------------------------------
// 9. TCP state and rule changes
// ---------------------------------------------------------------------------------------------------------------

/// A rule change is one step for packets: while the rule set switches back and forth between two sets whose rules
/// are in different slots, index keys and classes (so an entry-by-entry update would pass through states with
/// neither rule), every new flow is translated by the old set or the new one, never by neither. The fixture's
/// `sync` takes the incremental path, as `pfwd add`/`del` do.
#[test]
fn a_rule_change_is_atomic_for_packets() {
    let a = [rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")];
    let b = [rule(2, "dnat -p tcp -s 192.168.1.0/24 --to 10.0.2.3")];
    let f = Fixture::new(&a);
    let done = std::sync::atomic::AtomicBool::new(false);
    let (seen_a, seen_b) = std::thread::scope(|s| {
        let packets = s.spawn(|| {
            let (mut seen_a, mut seen_b) = (0u32, 0u32);
            for port in (1024..=u16::MAX).cycle().take(500_000) {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let syn = Pkt::syn(ROUTER, 8080).from(CLIENT, port);
                let r = f.ingress(&syn.bytes());
                assert_eq!(r.ret, NEXT);
                let h = PacketHeaders::from_ethernet_slice(&r.data).unwrap();
                let Some(NetHeaders::Ipv4(ip, _)) = &h.net else { panic!("not IPv4") };
                match Ipv4Addr::from(ip.destination) {
                    BACKEND => seen_a += 1,
                    BACKEND2 => seen_b += 1,
                    other => panic!("a SYN sent to {other}: translated by neither rule set (port {port})"),
                }
                // Forget the flow, so the port can come round again as a new flow.
                f.kernel().conntrack_delete(&f.conntrack().into_iter().map(|(t, _)| t).collect::<Vec<_>>()).unwrap();
            }
            (seen_a, seen_b)
        });
        for i in 0..200 {
            f.sync(if i % 2 == 0 { &b } else { &a });
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        packets.join().unwrap()
    });
    assert!(seen_a > 0 && seen_b > 0, "both rule sets were seen: {seen_a} / {seen_b}");
}

/// A change killed after writing ahead of its state (`Kernel::stage`, which runs while the store is written) and
/// before its flip changes nothing for packets, and leaves a mark: the next change, planned from the saved rules,
/// reads the kernel back instead, so it ends with exactly its own rules, none of the abandoned change's, and keeps
/// the one the abandoned change had marked to go.
#[test]
fn a_change_abandoned_after_writing_ahead_is_undone_by_the_next() {
    let a =
        [rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000"), rule(2, "dnat -p udp --dport 53 --to 10.0.2.2:5353")];
    let f = Fixture::new(&a);
    let k = f.kernel();
    // The abandoned change deletes rule 2 and adds rule 3.
    let b = [a[0].clone(), rule(3, "dnat -p tcp --dport 8081 --to 10.0.2.3")];
    let compiled = pfwd::loader::compile_stored(&b, &lo_index).unwrap();
    let planned = k.plan_sync(&a, &b, &compiled, &lo_index).unwrap().expect("a planned change");
    assert!(k.stage(planned).unwrap().is_staged());
    let staged = k.config().unwrap();
    assert_ne!(staged.flags & config_flag::STAGED, 0);
    // Killed here: never flipped. Packets still see `a`.
    expect_dnat(&f, &Pkt::udp(CLIENT, 5555, ROUTER, 53), BACKEND, 5353);
    expect_no_dnat(&f, &Pkt::syn(ROUTER, 8081).from(CLIENT, 40_001));
    // The next change starts from the saved rules, `a`, and adds rule 4.
    let c = [a[0].clone(), a[1].clone(), rule(4, "dnat -p tcp --dport 8082 --to 10.0.2.3")];
    assert!(k.plan_sync(&a, &c, &pfwd::loader::compile_stored(&c, &lo_index).unwrap(), &lo_index).unwrap().is_none());
    f.sync(&c);
    let cfg = k.config().unwrap();
    assert_eq!(cfg.flags & config_flag::STAGED, 0, "the flip clears the mark");
    assert_ne!(cfg.generation, staged.generation);
    expect_dnat(&f, &Pkt::udp(CLIENT, 5556, ROUTER, 53), BACKEND, 5353);
    expect_no_dnat(&f, &Pkt::syn(ROUTER, 8081).from(CLIENT, 40_002));
    expect_dnat(&f, &Pkt::syn(ROUTER, 8082).from(CLIENT, 40_003), BACKEND2, 8082);
}

/// An IPv4 rule's index keys are written to the IPv4 index only (IPv6 packets, which probe the wide one, never meet
/// them), a both-family rule's to both, an IPv6 rule's to the wide one; `index_keys` still counts every key. A
/// wide index that also holds IPv4 rules' keys (as an older pfwd wrote it) is read back without them, and a change
/// read back from the maps ends with exactly the compiled keys.
#[test]
fn ipv4_rules_keys_are_in_the_ipv4_index_only() {
    use aya::maps::{HashMap, MapData};
    use pfwd_common::{IndexEntry, IndexKey, IndexKey4, family, names};
    let rules = [
        rule(1, "dnat -p tcp -d 10.0.1.1 --dport 8080 --to 10.0.2.2:9000"),
        // No address: both families.
        rule(2, "redirect -i lo -p udp --dport 53 --to-port 5353"),
        rule(3, "dnat -p tcp -d 2001:db8:1::1 --dport 80 --to [2001:db8:2::2]:80"),
    ];
    let f = Fixture::new(&rules);
    let k = f.kernel();
    let dir = k.pin_dir().to_path_buf();
    let maps = || {
        let wide: HashMap<MapData, IndexKey, IndexEntry> =
            HashMap::try_from(aya::maps::Map::HashMap(MapData::from_pin(dir.join(names::INDEX)).unwrap())).unwrap();
        let narrow: HashMap<MapData, IndexKey4, IndexEntry> =
            HashMap::try_from(aya::maps::Map::HashMap(MapData::from_pin(dir.join(names::INDEX4)).unwrap())).unwrap();
        (wide, narrow)
    };
    let check = |rules: &[pfwd::state::StoredRule]| {
        let compiled = pfwd::loader::compile_stored(rules, &lo_index).unwrap();
        let keys: Vec<IndexKey> = compiled.index().into_keys().collect();
        let (wide, narrow) = maps();
        let mut in_wide: Vec<IndexKey> = wide.keys().map(Result::unwrap).filter(IndexKey::in_wide_index).collect();
        let mut in_narrow: Vec<IndexKey> = narrow.keys().map(|k| k.unwrap().widen()).collect();
        let sorted = |v: &mut Vec<IndexKey>| v.sort_unstable_by_key(|k| format!("{k:?}"));
        let mut want_wide: Vec<IndexKey> = keys.iter().copied().filter(IndexKey::in_wide_index).collect();
        let mut want_narrow: Vec<IndexKey> = keys.iter().copied().filter(|k| k.family != family::V6).collect();
        for v in [&mut in_wide, &mut in_narrow, &mut want_wide, &mut want_narrow] {
            sorted(v);
        }
        assert_eq!(in_wide, want_wide);
        assert_eq!(in_narrow, want_narrow);
        assert_eq!(k.index_keys().unwrap(), (keys.len() as u64, want_narrow.len() as u64));
        let families: Vec<u8> = keys.iter().map(|k| k.family).collect();
        assert!([family::V4, 0, family::V6].iter().all(|f| families.contains(f)), "{families:?}");
    };
    check(&rules);
    assert!(
        maps().0.keys().map(Result::unwrap).all(|k| k.family != family::V4),
        "no IPv4 rule's key in the wide index"
    );
    // What an older pfwd left: the IPv4 rule's key in the wide index too.
    let (mut wide, narrow) = maps();
    for item in narrow.iter() {
        let (k4, e) = item.unwrap();
        if k4.family == family::V4 {
            wide.insert(k4.widen(), e, 0).unwrap();
        }
    }
    // A change read back from the maps: the IPv4 rule moves to another port.
    let moved =
        [rule(1, "dnat -p tcp -d 10.0.1.1 --dport 8081 --to 10.0.2.2:9000"), rules[1].clone(), rules[2].clone()];
    k.sync_rules(None, &moved, &lo_index).unwrap();
    expect_dnat(&f, &Pkt::syn(ROUTER, 8081).from(CLIENT, 40_010), BACKEND, 9000);
    expect_no_dnat(&f, &Pkt::syn(ROUTER, 8080).from(CLIENT, 40_011));
    expect_dnat(&f, &Pkt::udp(CLIENT, 5557, Ipv4Addr::new(203, 0, 113, 5), 53), ROUTER, 5353);
    check(&moved);
}

#[test]
fn closed_flow_reopens_with_the_current_rule_while_live_flows_keep_theirs() {
    let old = [rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")];
    let f = Fixture::new(&old);
    let closing = Pkt::syn(ROUTER, 8080).from(CLIENT, 41_000);
    let live = Pkt::syn(ROUTER, 8080).from(CLIENT, 42_000);
    for p in [&closing, &live] {
        expect_dnat(&f, p, BACKEND, 9000);
        let syn_ack = Pkt::tcp(BACKEND, 9000, CLIENT, p.ports().0, SYN | ACK);
        assert_translated(&f.egress(&syn_ack.bytes()), &syn_ack.from(ROUTER, 8080));
    }
    // Both sides close `closing`.
    expect_dnat(&f, &closing.clone().flags(FIN | ACK), BACKEND, 9000);
    let fin_back = Pkt::tcp(BACKEND, 9000, CLIENT, 41_000, FIN | ACK);
    assert_translated(&f.egress(&fin_back.bytes()), &fin_back.from(ROUTER, 8080));
    // The client's FIN-ACK after the SYN-ACK also confirmed the flow.
    let closed = ct_state::SEEN_REPLY | ct_state::CONFIRMED | ct_state::FIN_ORIGINAL | ct_state::FIN_REPLY;
    let states: Vec<u8> =
        f.conntrack().iter().filter(|(t, _)| t.sport == 41_000 || t.dport == 41_000).map(|(_, e)| e.state).collect();
    assert_eq!(states, [closed, closed]);

    // Same rule (same slot), new target.
    f.sync(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.3:9100")]);
    expect_dnat(&f, &closing, BACKEND2, 9100);
    let syn_ack = Pkt::tcp(BACKEND2, 9100, CLIENT, 41_000, SYN | ACK);
    assert_translated(&f.egress(&syn_ack.bytes()), &syn_ack.from(ROUTER, 8080));
    // The live flow keeps its translation both ways.
    expect_dnat(&f, &live.clone().flags(ACK | PSH), BACKEND, 9000);
    let reply = Pkt::tcp(BACKEND, 9000, CLIENT, 42_000, ACK | PSH);
    assert_translated(&f.egress(&reply.bytes()), &reply.from(ROUTER, 8080));
    assert_eq!(f.stat("new_flows"), 3);
}

#[test]
fn half_closed_flow_is_not_reopened() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    let syn = Pkt::syn(ROUTER, 8080);
    expect_dnat(&f, &syn, BACKEND, 9000);
    expect_dnat(&f, &syn.clone().flags(FIN | ACK), BACKEND, 9000);
    f.sync(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.3")]);
    // Only one side finished: a SYN (e.g. a retransmission) still belongs to the old flow.
    expect_dnat(&f, &syn, BACKEND, 9000);
    assert_eq!(f.stat("new_flows"), 1);
}

#[test]
fn reset_flow_reopens() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    let syn = Pkt::syn(ROUTER, 8080);
    expect_dnat(&f, &syn, BACKEND, 9000);
    let rst = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, RST | ACK).payload(b"");
    assert_translated(&f.egress(&rst.bytes()), &rst.from(ROUTER, 8080));
    f.sync(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.3")]);
    expect_dnat(&f, &syn, BACKEND2, 8080);
}

#[test]
fn removing_a_rule_keeps_live_flows() {
    let f = Fixture::new(&[
        rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000"),
        rule(2, "dnat -p udp --dport 53 --to 10.0.2.2:5353"),
    ]);
    let syn = Pkt::syn(ROUTER, 8080);
    let dns = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    expect_dnat(&f, &syn, BACKEND, 9000);
    expect_dnat(&f, &dns, BACKEND, 5353);
    f.sync(&[]);
    expect_dnat(&f, &syn.clone().flags(ACK), BACKEND, 9000);
    expect_dnat(&f, &dns, BACKEND, 5353);
    // New flows are no longer translated.
    expect_no_dnat(&f, &syn.from(CLIENT, CPORT + 1));
    expect_no_dnat(&f, &dns.from(CLIENT, 5556));
    // A flow that was never translated has no conntrack entry.
    assert_eq!(f.conntrack().len(), 4);
    assert_eq!(f.stat("new_flows"), 2);
}

#[test]
fn expired_flow_starts_over_with_the_current_rule() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")]);
    f.timeouts(|c| c.udp_timeout = 1);
    let dns = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    expect_dnat(&f, &dns, BACKEND, 5353);
    f.sync(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.3")]);
    // Within the timeout the flow keeps its translation...
    expect_dnat(&f, &dns, BACKEND, 5353);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // ...after it, the next packet is a new flow under the current rule.
    expect_dnat(&f, &dns, BACKEND2, 53);
    assert_eq!(f.stat("new_flows"), 2);
}

#[test]
fn reply_of_an_expired_flow_removes_the_flow_and_passes() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")]);
    f.timeouts(|c| c.udp_timeout = 1);
    expect_dnat(&f, &Pkt::udp(CLIENT, 5555, ROUTER, 53), BACKEND, 5353);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // The flow is over: its stale reply entry must not capture unrelated traffic on the same ports later (e.g. a
    // direct connection to the backend port), so the packet passes as new traffic and both entries go.
    let reply = Pkt::udp(BACKEND, 5353, CLIENT, 5555).bytes();
    assert_untouched(&f.egress(&reply), &reply);
    assert_eq!(f.stat("expired_flows_removed"), 1);
    assert!(f.conntrack().is_empty(), "expired flow left entries: {:?}", f.conntrack());
}

/// Opens client:41000 -> router:8080 (rule target 10.0.2.2:9000), closes it from both sides, moves the rule to
/// 10.0.2.3:9100 and reopens the same ports, which now go to the new backend.
fn reopen_to_a_new_backend(f: &Fixture) -> Pkt {
    let syn = Pkt::syn(ROUTER, 8080).from(CLIENT, 41_000);
    expect_dnat(f, &syn, BACKEND, 9000);
    let syn_ack = Pkt::tcp(BACKEND, 9000, CLIENT, 41_000, SYN | ACK);
    assert_translated(&f.egress(&syn_ack.bytes()), &syn_ack.from(ROUTER, 8080));
    expect_dnat(f, &syn.clone().flags(FIN | ACK), BACKEND, 9000);
    let fin = Pkt::tcp(BACKEND, 9000, CLIENT, 41_000, FIN | ACK);
    assert_translated(&f.egress(&fin.bytes()), &fin.from(ROUTER, 8080));
    f.sync(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.3:9100")]);
    expect_dnat(f, &syn, BACKEND2, 9100);
    let syn_ack = Pkt::tcp(BACKEND2, 9100, CLIENT, 41_000, SYN | ACK);
    assert_translated(&f.egress(&syn_ack.bytes()), &syn_ack.from(ROUTER, 8080));
    syn
}

#[test]
fn late_packet_of_the_old_backend_does_not_touch_the_reopened_flow() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    let syn = reopen_to_a_new_backend(&f);
    // The old backend retransmits its FIN (the client's last ACK was lost) after a retransmission timeout, i.e.
    // after the once-a-second refresh throttle that would otherwise skip the update.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let fin = Pkt::tcp(BACKEND, 9000, CLIENT, 41_000, FIN | ACK);
    assert_eq!(f.egress(&fin.bytes()).ret, NEXT);
    let ct = f.conntrack();
    let orig = ct.iter().find(|(t, _)| *t == tuple(CLIENT, 41_000, ROUTER, 8080, PROTO_TCP)).expect("flow").1;
    assert_eq!(orig.xlat, tuple(CLIENT, 41_000, BACKEND2, 9100, PROTO_TCP));
    assert_eq!(orig.state, ct_state::SEEN_REPLY, "the new connection is open, not closed: {orig:?}");
    expect_dnat(&f, &syn.flags(ACK), BACKEND2, 9100);
}

#[test]
fn expiry_of_the_old_flow_does_not_delete_the_reopened_flow() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    f.timeouts(|c| c.tcp_close_timeout = 1);
    let syn = reopen_to_a_new_backend(&f);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // A late packet of the old backend finds its (expired) entry and removes it, and with it its "peer".
    let late = Pkt::tcp(BACKEND, 9000, CLIENT, 41_000, FIN | ACK).bytes();
    assert_untouched(&f.egress(&late), &late);
    // The new connection (established, 6 h timeout) must still be translated.
    expect_dnat(&f, &syn.flags(ACK | PSH), BACKEND2, 9100);
}

#[test]
fn flows_translated_to_the_same_tuple_keep_their_own_replies() {
    let f = Fixture::new(&[
        rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000"),
        rule(2, "dnat -p tcp --dport 8081 --to 10.0.2.2:9000"),
    ]);
    // One client port to two services (Linux reuses a local port for different destinations).
    expect_dnat(&f, &Pkt::syn(ROUTER, 8080), BACKEND, 9000);
    let second = Pkt::syn(ROUTER, 8081).bytes();
    let r = f.ingress(&second);
    // Translating the second flow would clash with the first; it may be dropped or passed, but the first flow's
    // replies must still come from router:8080.
    assert!(r.ret == DROP || r.data == second, "second flow translated into the first one's tuple");
    let syn_ack = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, SYN | ACK);
    assert_translated(&f.egress(&syn_ack.bytes()), &syn_ack.from(ROUTER, 8080));
}

#[test]
fn interface_without_pfwd_is_not_translated() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    f.kernel().detach("lo", LO).unwrap();
    expect_no_dnat(&f, &Pkt::syn(ROUTER, 8080));
    assert!(f.conntrack().is_empty());
}

// ---------------------------------------------------------------------------------------------------------------
// 10. A full conntrack table
// ---------------------------------------------------------------------------------------------------------------

/// Many more flows than the table holds: the LRU evicts old entries, and no packet is ever translated wrongly. Each
/// flow's destination port picks its backend, so a packet of an evicted flow (recreated from the rules) and a packet
/// of a live flow must both reach the right one, and every reply must be restored to its own flow's address.
#[test]
fn a_full_table_evicts_old_flows_and_never_corrupts_live_ones() {
    let f = Fixture::with_conntrack(
        &[rule(1, "dnat -p udp --dport 8000-8001 --to 10.0.2.2"), rule(2, "dnat -p udp --dport 8002 --to 10.0.2.3:53")],
        64,
    );
    let backend = |dport: u16| if dport == 8002 { (BACKEND2, 53) } else { (BACKEND, dport) };
    let flows: Vec<(u16, u16)> = (0..600u16).map(|i| (10_000 + i, 8000 + i % 3)).collect();
    for &(sport, dport) in &flows {
        let (to, port) = backend(dport);
        expect_dnat(&f, &Pkt::udp(CLIENT, sport, ROUTER, dport), to, port);
    }
    // Unanswered, the flows are unconfirmed: they fill the unconfirmed table (256 entries at this size), never the
    // confirmed one.
    let (confirmed, unconfirmed) = (table(&f, pfwd_common::names::CONNTRACK), table(&f, NEW_TABLE));
    assert!(confirmed.is_empty(), "unconfirmed flows in the confirmed table: {confirmed:?}");
    let capacity = pfwd_common::unconfirmed_ct_entries(64) as usize;
    assert!(unconfirmed.len() <= capacity + 16, "the table grew past its size: {} entries", unconfirmed.len());
    // Every flow again, old (evicted, recreated) and recent (live) alike, then its reply.
    for &(sport, dport) in flows.iter().rev().chain(flows.iter()) {
        let (to, port) = backend(dport);
        expect_dnat(&f, &Pkt::udp(CLIENT, sport, ROUTER, dport), to, port);
        let reply = Pkt::udp(to, port, CLIENT, sport);
        assert_translated(&f.egress(&reply.bytes()), &reply.from(ROUTER, dport));
    }
    assert!(f.stat("new_flows") > 600, "old flows must have been evicted and recreated");
    // Answered, each flow was confirmed and moved to the confirmed table, which holds 64 entries.
    let confirmed = table(&f, pfwd_common::names::CONNTRACK).len();
    assert!(confirmed <= 64 + 16, "the confirmed table grew past its size: {confirmed} entries");
}

/// Within a refresh interval a flow's packets write nothing to its entries, unconfirmed or confirmed (no cache line
/// of the shared tables dirtied per packet), and a flow confirmed by its reply counts its idle time from then, not
/// from a refresh interval before (it used to: a confirmed flow left idle expired a second early).
#[test]
fn packets_within_the_refresh_interval_write_nothing_and_confirming_keeps_the_time() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")]);
    let query = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    let answer = Pkt::udp(BACKEND, 5353, CLIENT, 5555);
    // The claims below hold within a refresh interval: a host so loaded that this test's packets take longer
    // (each takes microseconds) would see a due refresh, so those comparisons are made only when the steps took
    // well under a second, which they do unless the test thread was held off the CPU.
    let quick = |since: std::time::Instant| since.elapsed() < std::time::Duration::from_millis(900);
    let start = std::time::Instant::now();
    expect_dnat(&f, &query, BACKEND, 5353);
    let created = table(&f, NEW_TABLE);
    assert_eq!(created.len(), 2);
    // Some clock ticks later (jiffies: at most 10 ms each), so that a write of the time would show.
    let ticks = || std::thread::sleep(std::time::Duration::from_millis(50));
    ticks();
    for _ in 0..3 {
        expect_dnat(&f, &query, BACKEND, 5353);
    }
    let unconfirmed = table(&f, NEW_TABLE);
    if quick(start) {
        assert_eq!(unconfirmed, created, "unconfirmed: more queries within a second rewrote an entry");
    }

    assert_translated(&f.egress(&answer.bytes()), &answer.from(ROUTER, 53));
    let confirmed = table(&f, pfwd_common::names::CONNTRACK);
    assert_eq!(confirmed.len(), 2, "the answer confirmed the flow");
    let t0 = created[0].1.last_seen_ns;
    for (k, e) in &confirmed {
        assert!(e.last_seen_ns >= t0, "{k:?}: confirmed with its time set back: {} < {t0}", e.last_seen_ns);
        assert_ne!(e.flags & ct_flag::UNCHECKED, 0, "{k:?}: the first packet after the move checks the pair");
    }
    // That first packet checks both entries and clears the mark in both; later ones write nothing.
    expect_dnat(&f, &query, BACKEND, 5353);
    let checked = table(&f, pfwd_common::names::CONNTRACK);
    assert!(checked.iter().all(|(_, e)| e.flags & ct_flag::UNCHECKED == 0), "{checked:#?}");
    let start = std::time::Instant::now();
    ticks();
    expect_dnat(&f, &query, BACKEND, 5353);
    assert_translated(&f.egress(&answer.bytes()), &answer.from(ROUTER, 53));
    let after = table(&f, pfwd_common::names::CONNTRACK);
    if quick(start) {
        assert_eq!(after, checked, "confirmed: packets within a second rewrote an entry");
    }
}

/// If the table evicted just one direction of a live flow, the flow's next refresh puts it back, so its replies are
/// translated again (an eviction must not turn a live flow into one that leaks untranslated replies). For an
/// unconfirmed flow (only the query seen) in the unconfirmed table, and for a confirmed one in the confirmed table.
#[test]
fn an_evicted_reply_entry_is_restored_by_the_flow() {
    // 4096 entries: the unconfirmed table has 1024, and a flow there checks its other entry every 128 inserts.
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")]);
    let check = pfwd_common::unconfirmed_check_inserts(pfwd_common::unconfirmed_ct_entries(4096));
    let query = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    let reply = Pkt::udp(BACKEND, 5353, CLIENT, 5555);
    let reply_key = tuple(BACKEND, 5353, CLIENT, 5555, PROTO_UDP);
    expect_dnat(&f, &query, BACKEND, 5353);
    ct_map(&f, NEW_TABLE).remove(&reply_key).expect("removing the unconfirmed reply entry");
    // Nothing went into the table since the flow was created, so nothing can have evicted its entry: its next packet
    // does not look (a lookup on every packet of a one-way flow is what the insert count saves).
    expect_dnat(&f, &query, BACKEND, 5353);
    assert_eq!(f.stat("unconfirmed_entries_restored"), 0);
    // New flows, two inserts each, until a check is due: the flow's next packet repairs the entry.
    for i in 0..check.div_ceil(2) as u16 {
        expect_dnat(&f, &Pkt::udp(CLIENT, 20_000 + i, ROUTER, 53), BACKEND, 5353);
    }
    expect_dnat(&f, &query, BACKEND, 5353);
    assert_eq!(f.stat("unconfirmed_entries_restored"), 1);
    assert_translated(&f.egress(&reply.bytes()), &reply.from(ROUTER, 53));
    assert_eq!(f.stat("flows_confirmed"), 1, "the reply confirmed the flow");

    ct_map(&f, pfwd_common::names::CONNTRACK).remove(&reply_key).expect("removing the confirmed reply entry");
    // A confirmed flow's next packet after the once-a-second refresh interval repairs it.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    expect_dnat(&f, &query, BACKEND, 5353);
    assert_translated(&f.egress(&reply.bytes()), &reply.from(ROUTER, 53));
    assert_eq!(table(&f, pfwd_common::names::CONNTRACK).len(), 2);
    assert_eq!(f.stat("unconfirmed_entries_restored"), 1, "counts only unconfirmed flows");
}

// ---------------------------------------------------------------------------------------------------------------
// 12. Confirmed and unconfirmed flows: a flood of new flows never evicts established ones
// ---------------------------------------------------------------------------------------------------------------

const NEW_TABLE: &str = pfwd_common::names::CONNTRACK_NEW;

fn ct_map(f: &Fixture, name: &str) -> aya::maps::HashMap<aya::maps::MapData, Tuple, pfwd_common::CtEntry> {
    use aya::maps::{Map, MapData};
    let data = MapData::from_pin(f.kernel().pin_dir().join(name)).expect("pinned conntrack map");
    aya::maps::HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap()
}

/// The entries of one conntrack table, by map name.
fn table(f: &Fixture, name: &str) -> Vec<(Tuple, pfwd_common::CtEntry)> {
    ct_map(f, name).iter().map(|r| r.expect("reading a conntrack entry")).collect()
}

/// The two tables' keys, sorted: (confirmed, unconfirmed).
fn keys(f: &Fixture) -> (Vec<Tuple>, Vec<Tuple>) {
    let keys_of = |name| sorted(table(f, name).into_iter().map(|(t, _)| t).collect());
    (keys_of(pfwd_common::names::CONNTRACK), keys_of(NEW_TABLE))
}

fn sorted(mut k: Vec<Tuple>) -> Vec<Tuple> {
    k.sort_by_key(|t| (t.saddr, t.sport, t.daddr, t.dport));
    k
}

/// SYN, SYN-ACK and the client's ACK of `client:sport` through the 8080 -> 10.0.2.2:9000 rule, each checked.
fn handshake(f: &Fixture, client: Ipv4Addr, sport: u16) {
    let syn = Pkt::tcp(client, sport, ROUTER, 8080, SYN);
    expect_dnat(f, &syn, BACKEND, 9000);
    let syn_ack = Pkt::tcp(BACKEND, 9000, client, sport, SYN | ACK).payload(b"");
    assert_translated(&f.egress(&syn_ack.bytes()), &syn_ack.from(ROUTER, 8080));
    expect_dnat(f, &syn.flags(ACK).payload(b""), BACKEND, 9000);
}

#[test]
fn a_new_flow_is_unconfirmed_until_the_clients_ack_then_both_entries_move() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    let orig = tuple(CLIENT, CPORT, ROUTER, 8080, PROTO_TCP);
    let reply = tuple(BACKEND, 9000, CLIENT, CPORT, PROTO_TCP);
    let both = sorted(vec![orig, reply]);
    let syn = Pkt::syn(ROUTER, 8080);
    expect_dnat(&f, &syn, BACKEND, 9000);
    assert_eq!(keys(&f), (vec![], both.clone()), "a new flow lands in the unconfirmed table");
    assert!(f.conntrack().iter().all(|(_, e)| !e.is_confirmed() && e.state == 0));

    // The SYN-ACK alone does not confirm it, nor a retransmitted SYN, nor an ACK from the server's side.
    let syn_ack = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, SYN | ACK);
    assert_translated(&f.egress(&syn_ack.bytes()), &syn_ack.from(ROUTER, 8080));
    expect_dnat(&f, &syn, BACKEND, 9000);
    let server_ack = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, ACK);
    assert_translated(&f.egress(&server_ack.bytes()), &server_ack.from(ROUTER, 8080));
    assert_eq!(keys(&f), (vec![], both.clone()), "SYN-ACK seen, no ACK from the client yet");
    assert!(f.conntrack().iter().all(|(_, e)| e.state == ct_state::SEEN_REPLY));
    assert_eq!(f.stat("flows_confirmed"), 0);

    // The client's ACK confirms it: both entries move to the confirmed table, with their translation.
    expect_dnat(&f, &syn.clone().flags(ACK), BACKEND, 9000);
    assert_eq!(keys(&f), (both, vec![]), "confirmed: both entries in the confirmed table, none left behind");
    let ct = f.conntrack();
    assert!(ct.iter().all(|(_, e)| e.state == ct_state::SEEN_REPLY | ct_state::CONFIRMED), "{ct:#?}");
    let find = |k: Tuple| ct.iter().find(|(t, _)| *t == k).expect("entry").1;
    assert_eq!(find(orig).xlat, tuple(CLIENT, CPORT, BACKEND, 9000, PROTO_TCP));
    assert_eq!((find(orig).dir, find(orig).rule_slot), (dir::ORIGINAL, slot_of(1)));
    assert_eq!(find(reply).xlat, tuple(ROUTER, 8080, CLIENT, CPORT, PROTO_TCP));
    assert_eq!((find(reply).dir, find(reply).rule_slot), (dir::REPLY, slot_of(1)));
    assert_eq!(f.stat("flows_confirmed"), 1);
    // And the flow goes on both ways, counted as one flow.
    expect_dnat(&f, &syn.clone().flags(ACK | PSH), BACKEND, 9000);
    let data = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, ACK | PSH);
    assert_translated(&f.egress(&data.bytes()), &data.from(ROUTER, 8080));
    assert_eq!((f.stat("new_flows"), f.stat("flows_confirmed"), f.counters(slot_of(1)).flows), (1, 1, 1));
}

#[test]
fn a_reset_after_the_syn_ack_does_not_confirm() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    let syn = Pkt::syn(ROUTER, 8080);
    expect_dnat(&f, &syn, BACKEND, 9000);
    let syn_ack = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, SYN | ACK);
    assert_translated(&f.egress(&syn_ack.bytes()), &syn_ack.from(ROUTER, 8080));
    expect_dnat(&f, &syn.clone().flags(RST | ACK).payload(b""), BACKEND, 9000);
    assert_eq!(keys(&f).0, vec![], "a reset flow stays unconfirmed");
    assert_eq!(f.stat("flows_confirmed"), 0);
}

#[test]
fn a_udp_or_echo_reply_confirms_the_flow() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353"), rule(2, "dnat --to 10.0.2.3")]);
    let query = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    expect_dnat(&f, &query, BACKEND, 5353);
    // More queries without an answer: still unconfirmed.
    expect_dnat(&f, &query, BACKEND, 5353);
    assert_eq!(keys(&f).0, vec![]);
    let answer = Pkt::udp(BACKEND, 5353, CLIENT, 5555);
    assert_translated(&f.egress(&answer.bytes()), &answer.from(ROUTER, 53));
    let udp = sorted(vec![tuple(CLIENT, 5555, ROUTER, 53, PROTO_UDP), tuple(BACKEND, 5353, CLIENT, 5555, PROTO_UDP)]);
    assert_eq!(keys(&f), (udp.clone(), vec![]), "the reply confirmed the UDP flow");

    let ping = Pkt::echo(CLIENT, ROUTER, false);
    assert_translated(&f.ingress(&ping.bytes()), &ping.to(BACKEND2, 0));
    assert_eq!(keys(&f).1.len(), 2, "the echo request is unconfirmed");
    let pong = Pkt::echo(BACKEND2, CLIENT, true);
    assert_translated(&f.egress(&pong.bytes()), &pong.from(ROUTER, 0));
    assert_eq!((keys(&f).0.len(), keys(&f).1.len()), (4, 0), "the echo reply confirmed it");
    assert_eq!(f.stat("flows_confirmed"), 2);
}

/// A tiny table (64 entries: 32 flows), 20 established connections, then a burst of 4,096 new flows from spoofed
/// sources, each answered by the server (as a real one answers a SYN flood): the established connections all keep
/// their translation both ways, and a new connection after the burst works.
#[test]
fn a_burst_of_new_flows_far_larger_than_the_table_leaves_confirmed_flows_intact() {
    let f = Fixture::with_conntrack(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")], 64);
    for i in 0..20u16 {
        handshake(&f, CLIENT, 41_000 + i);
    }
    assert_eq!(keys(&f).0.len(), 40);
    for i in 0..4096u32 {
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 51, 100, 0)) + (i % 256));
        let sport = 1024 + (i / 256) as u16;
        let syn = Pkt::tcp(src, sport, ROUTER, 8080, SYN).payload(b"");
        let r = f.ingress(&syn.bytes());
        assert_eq!(r.ret, NEXT, "SYN {i} of the burst");
        let syn_ack = Pkt::tcp(BACKEND, 9000, src, sport, SYN | ACK).payload(b"");
        assert_eq!(f.egress(&syn_ack.bytes()).ret, NEXT);
    }
    let (confirmed, unconfirmed) = keys(&f);
    eprintln!(
        "after 4096 spoofed SYNs: {} confirmed entries, {} unconfirmed, new_flows {}, unconfirmed_entries_restored {}",
        confirmed.len(),
        unconfirmed.len(),
        f.stat("new_flows"),
        f.stat("unconfirmed_entries_restored")
    );
    assert_eq!(confirmed.len(), 40, "the burst touched the confirmed table");
    let cap = pfwd_common::unconfirmed_ct_entries(64) as usize;
    assert!(unconfirmed.len() <= cap + 16, "{} unconfirmed entries in a table of {cap}", unconfirmed.len());
    for i in 0..20u16 {
        let data = Pkt::tcp(CLIENT, 41_000 + i, ROUTER, 8080, ACK | PSH);
        expect_dnat(&f, &data, BACKEND, 9000);
        let back = Pkt::tcp(BACKEND, 9000, CLIENT, 41_000 + i, ACK | PSH);
        assert_translated(&f.egress(&back.bytes()), &back.from(ROUTER, 8080));
    }
    // A new connection after the burst.
    handshake(&f, Ipv4Addr::new(192, 168, 1, 8), 50_000);
    assert_eq!(keys(&f).0.len(), 42);
    assert_eq!(f.stat("flows_confirmed"), 21);
}

/// New flows cycling a tiny unconfirmed table (256 entries: a flow there checks its other entry every 32 inserts)
/// many times over, and a one-way flow sending a packet after every 15 of them (30 inserts): it looks its reply
/// entry up only when a check is due, and that entry is never evicted, because an entry referenced fewer inserts ago
/// than a check interval's is safe in the LRU (`pfwd_common::unconfirmed_check_inserts`). Its reply is translated.
#[test]
fn a_one_way_flow_keeps_its_reply_entry_while_new_flows_cycle_the_table() {
    let f = Fixture::with_conntrack(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")], 64);
    let entries = pfwd_common::unconfirmed_ct_entries(64);
    assert_eq!(pfwd_common::unconfirmed_check_inserts(entries), 32);
    let query = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    let reply = Pkt::udp(BACKEND, 5353, CLIENT, 5555);
    let reply_key = tuple(BACKEND, 5353, CLIENT, 5555, PROTO_UDP);
    expect_dnat(&f, &query, BACKEND, 5353);
    // 20 times the table's size in inserts.
    let rounds = entries * 20 / 30;
    for round in 0..rounds {
        for i in 0..15 {
            let n = round * 15 + i;
            let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 51, 100, 0)) + n % 256);
            let other = Pkt::udp(src, 1024 + (n / 256) as u16, ROUTER, 53);
            assert_eq!(f.ingress(&other.bytes()).ret, NEXT, "new flow {n}");
        }
        expect_dnat(&f, &query, BACKEND, 5353);
        // (A lookup from userspace does not mark the entry referenced.)
        assert!(ct_map(&f, NEW_TABLE).get(&reply_key, 0).is_ok(), "round {round}: the reply entry was evicted");
    }
    assert_eq!(f.stat("new_flows"), u64::from(rounds * 15 + 1));
    // The table did cycle: the first new flow's entries are long gone.
    let first = tuple(Ipv4Addr::new(198, 51, 100, 0), 1024, ROUTER, 53, PROTO_UDP);
    assert!(ct_map(&f, NEW_TABLE).get(&first, 0).is_err(), "the first new flow is still there");
    assert_eq!(f.stat("unconfirmed_entries_restored"), 0);
    assert_translated(&f.egress(&reply.bytes()), &reply.from(ROUTER, 53));
}

/// An unconfirmed TCP flow expires after the SYN timeout; a confirmed one does not.
#[test]
fn an_unconfirmed_flow_expires_after_the_syn_timeout() {
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    f.timeouts(|c| c.tcp_syn_timeout = 1);
    handshake(&f, CLIENT, 41_000);
    let syn = Pkt::syn(ROUTER, 8080);
    expect_dnat(&f, &syn, BACKEND, 9000);
    let syn_ack = Pkt::tcp(BACKEND, 9000, CLIENT, CPORT, SYN | ACK);
    assert_translated(&f.egress(&syn_ack.bytes()), &syn_ack.from(ROUTER, 8080));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // The half-open flow is gone: the server's retransmitted SYN-ACK passes untranslated and removes it.
    let late = syn_ack.bytes();
    assert_untouched(&f.egress(&late), &late);
    assert_eq!(f.stat("expired_flows_removed"), 1);
    assert_eq!(keys(&f).1, vec![], "expired unconfirmed entries removed");
    // The confirmed one lives on (established timeout).
    expect_dnat(&f, &Pkt::tcp(CLIENT, 41_000, ROUTER, 8080, ACK), BACKEND, 9000);
    assert_eq!(keys(&f).0.len(), 2);
}
