//! Packet-level tests of the build of the tc programs for layer-3 interfaces (tun, WireGuard, PPP), whose packets
//! start at the IP header: packets without an Ethernet header through `prog_ingress_l3`/`prog_egress_l3` with
//! BPF_PROG_TEST_RUN, compared with packets built independently with etherparse.
//!
//! How BPF_PROG_TEST_RUN presents the data to a tc program (net/bpf/test_run.c, `bpf_prog_test_run_skb`): it runs
//! `eth_type_trans` on the first 14 bytes, so skb->protocol comes from bytes 12-13, then pushes the 14 bytes back: the
//! program sees the data exactly as given. Given an IP packet, bytes 12-13 are the first two bytes of the source
//! address, so skb->protocol is IPv4 (0x0800) exactly when the source address begins `8.0.`. The layer-3 programs
//! take the family from skb->protocol (there is no ethertype), so these tests use addresses in 8.0.0.0/16 for every
//! packet that must be translated, and one test shows a packet whose skb->protocol is not IPv4 is left alone. That a
//! real tun device delivers packets at offset 0 with skb->protocol set is covered end to end (tests/tests/tunnel.rs).
mod common;

use common::*;
use std::net::Ipv4Addr;

use etherparse::{
    Icmpv4Header, Icmpv4Type, IpFragOffset, IpNumber, Ipv4Header, Ipv4Slice, SlicedPacket, TcpHeader, TransportSlice,
    UdpHeader, icmpv4::DestUnreachableHeader,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(8, 0, 1, 7);
const PUBLIC: Ipv4Addr = Ipv4Addr::new(8, 0, 2, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(8, 0, 3, 3);
const ROUTER_ON_PATH: Ipv4Addr = Ipv4Addr::new(8, 0, 3, 254);
const SNAT_TO: Ipv4Addr = Ipv4Addr::new(8, 0, 9, 9);
const CPORT: u16 = 40_000;

fn ip_header(src: Ipv4Addr, dst: Ipv4Addr, proto: IpNumber, payload_len: usize) -> Ipv4Header {
    let mut ip = Ipv4Header::new(0, 61, proto, src.octets(), dst.octets()).unwrap();
    ip.identification = 0x4d2c;
    ip.set_payload_len(payload_len).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    ip
}

/// A TCP packet starting at the IP header (no Ethernet header), every checksum computed by etherparse.
fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, syn: bool) -> Vec<u8> {
    let payload = b"pfwd layer-3 payload";
    let ip = ip_header(src, dst, IpNumber::TCP, TcpHeader::MIN_LEN + payload.len());
    let mut t = TcpHeader::new(sport, dport, 0x1234_5678, 29_200);
    t.syn = syn;
    t.ack = !syn;
    t.acknowledgment_number = if syn { 0 } else { 0x0bad_cafe };
    t.checksum = t.calc_checksum_ipv4(&ip, payload).unwrap();
    let mut out = vec![];
    ip.write_raw(&mut out).unwrap();
    out.extend_from_slice(&t.to_bytes());
    out.extend_from_slice(payload);
    out
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    udp_payload(src, sport, dst, dport, b"pfwd layer-3 datagram")
}

fn udp_payload(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let ip = ip_header(src, dst, IpNumber::UDP, UdpHeader::LEN + payload.len());
    let mut u = UdpHeader::without_ipv4_checksum(sport, dport, payload.len()).unwrap();
    u.checksum = u.calc_checksum_ipv4(&ip, payload).unwrap();
    let mut out = vec![];
    ip.write_raw(&mut out).unwrap();
    out.extend_from_slice(&u.to_bytes());
    out.extend_from_slice(payload);
    out
}

/// An ICMP error from `src` to `dst` embedding `inner` (an IP packet), starting at the IP header.
fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let icmp = Icmpv4Header::with_checksum(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port), inner);
    let ip = ip_header(src, dst, IpNumber::ICMP, icmp.header_len() + inner.len());
    let mut out = vec![];
    ip.write_raw(&mut out).unwrap();
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(inner);
    out
}

fn describe(pkt: &[u8]) -> String {
    match SlicedPacket::from_ip(pkt) {
        Ok(p) => format!("{:?} {:?}", p.net, p.transport),
        Err(e) => format!("unparsable ({e}): {pkt:02x?}"),
    }
}

/// The program let the packet continue as exactly `want` (which was built with valid checksums).
#[track_caller]
fn assert_output(r: &Run, want: &[u8]) {
    assert_eq!(r.ret, NEXT, "return value");
    assert!(r.data == want, "wrong output\n got: {}\nwant: {}", describe(&r.data), describe(want));
}

/// The source port the SNAT of the first packet chose (the output must otherwise be `pkt` from `addr`).
fn snat_udp(f: &Fixture, sport: u16, dst: Ipv4Addr, dport: u16, addr: Ipv4Addr) -> u16 {
    let r = f.egress(&udp(CLIENT, sport, dst, dport));
    assert_eq!(r.ret, NEXT);
    let p = SlicedPacket::from_ip(&r.data).unwrap_or_else(|e| panic!("unparsable output {e}"));
    let Some(TransportSlice::Udp(u)) = p.transport else { panic!("not UDP: {}", describe(&r.data)) };
    let port = u.source_port();
    assert_output(&r, &udp(addr, port, dst, dport));
    port
}

#[test]
fn dnat_tcp_and_its_replies() {
    let f = Fixture::layer3(&[rule(1, "dnat -i lo -p tcp --dport 80 --to 8.0.3.3:8080")]);
    assert_output(&f.ingress(&tcp(CLIENT, CPORT, PUBLIC, 80, true)), &tcp(CLIENT, CPORT, BACKEND, 8080, true));
    assert_output(&f.egress(&tcp(BACKEND, 8080, CLIENT, CPORT, false)), &tcp(PUBLIC, 80, CLIENT, CPORT, false));
    assert_output(&f.ingress(&tcp(CLIENT, CPORT, PUBLIC, 80, false)), &tcp(CLIENT, CPORT, BACKEND, 8080, false));
    let c = f.counters(slot_of(1));
    assert_eq!((c.flows, c.packets), (1, 3), "the rule counted the flow and its three packets");
}

#[test]
fn dnat_udp_and_its_reply() {
    let f = Fixture::layer3(&[rule(1, "dnat -i lo -p udp --dport 5000 --to 8.0.3.3:6000")]);
    assert_output(&f.ingress(&udp(CLIENT, CPORT, PUBLIC, 5000)), &udp(CLIENT, CPORT, BACKEND, 6000));
    assert_output(&f.egress(&udp(BACKEND, 6000, CLIENT, CPORT)), &udp(PUBLIC, 5000, CLIENT, CPORT));
}

#[test]
fn redirect_goes_to_the_interface_address() {
    let f = Fixture::layer3(&[rule(1, "redirect -i lo -p tcp --dport 80 --to-port 3128")]);
    assert_output(&f.ingress(&tcp(CLIENT, CPORT, PUBLIC, 80, true)), &tcp(CLIENT, CPORT, ROUTER, 3128, true));
}

#[test]
fn snat_and_its_reply() {
    let f = Fixture::layer3(&[rule(1, "snat -o lo -s 8.0.1.0/24 --to 8.0.9.9")]);
    let port = snat_udp(&f, CPORT, BACKEND, 53, SNAT_TO);
    assert_output(&f.ingress(&udp(BACKEND, 53, SNAT_TO, port)), &udp(BACKEND, 53, CLIENT, CPORT));
}

#[test]
fn icmp_error_about_a_translated_flow_is_translated() {
    let f = Fixture::layer3(&[rule(1, "dnat -i lo -p udp --dport 5000 --to 8.0.3.3:6000")]);
    let sent = udp(CLIENT, CPORT, PUBLIC, 5000);
    let translated = udp(CLIENT, CPORT, BACKEND, 6000);
    assert_output(&f.ingress(&sent), &translated);
    // A router behind the tunnel reports the translated datagram unreachable; the client must see its own datagram.
    let err = icmp_error(ROUTER_ON_PATH, CLIENT, &translated);
    assert_output(&f.egress(&err), &icmp_error(ROUTER_ON_PATH, CLIENT, &sent));
    assert_eq!(f.stat("icmp_errors_translated"), 1);
}

/// Cuts the IP packet `whole` into fragments of `first_payload` bytes and the rest.
fn fragments(whole: &[u8], first_payload: usize) -> [Vec<u8>; 2] {
    let ip = Ipv4Slice::from_slice(whole).unwrap();
    let hdr = ip.header().to_header();
    let payload = ip.payload().payload;
    let part = |data: &[u8], offset: usize, more: bool| {
        let mut h = hdr.clone();
        h.more_fragments = more;
        h.fragment_offset = IpFragOffset::try_new((offset / 8) as u16).unwrap();
        h.set_payload_len(data.len()).unwrap();
        h.header_checksum = h.calc_header_checksum();
        let mut out = vec![];
        h.write_raw(&mut out).unwrap();
        out.extend_from_slice(data);
        out
    };
    [part(&payload[..first_payload], 0, true), part(&payload[first_payload..], first_payload, false)]
}

#[test]
fn fragments_are_translated_like_their_first() {
    let f = Fixture::layer3(&[rule(1, "dnat -i lo -p udp --dport 5000 --to 8.0.3.3:6000")]);
    let data = [0x5au8; 600];
    let [first, later] = fragments(&udp_payload(CLIENT, CPORT, PUBLIC, 5000, &data), 296);
    let [want_first, want_later] = fragments(&udp_payload(CLIENT, CPORT, BACKEND, 6000, &data), 296);
    assert_output(&f.ingress(&first), &want_first);
    assert_output(&f.ingress(&later), &want_later);
    assert_eq!(f.stat("fragments_translated"), 1);
}

/// The packet: a source address beginning with the bytes 08 00 (what an Ethernet build would take for the
/// IPv4 ethertype, and then read the IP header 14 bytes too far). The layer-3 build reads it from offset 0.
#[test]
fn a_source_address_beginning_08_00_is_read_from_the_ip_header() {
    let f = Fixture::layer3(&[rule(1, "dnat -i lo -p udp --dport 5000 --to 10.9.0.1:6000")]);
    let src = Ipv4Addr::new(8, 0, 69, 0);
    assert_output(&f.ingress(&udp(src, CPORT, PUBLIC, 5000)), &udp(src, CPORT, Ipv4Addr::new(10, 9, 0, 1), 6000));
}

/// On a layer-3 device the family comes from skb->protocol, not from the first nibble: a packet the kernel says is
/// not IPv4 passes untouched, however much its bytes look like a matching IPv4 packet. (BPF_PROG_TEST_RUN sets
/// skb->protocol from bytes 12-13: here 0x0a00, from the source 10.0.x.x.)
#[test]
fn a_packet_skb_protocol_says_is_not_ipv4_is_left_alone() {
    let f = Fixture::layer3(&[rule(1, "dnat -i lo -p udp --dport 5000 --to 8.0.3.3:6000")]);
    let pkt = udp(Ipv4Addr::new(10, 0, 1, 7), CPORT, PUBLIC, 5000);
    assert_output(&f.ingress(&pkt), &pkt);
    assert_eq!(f.counters(slot_of(1)).flows, 0);
    assert!(f.conntrack().is_empty(), "no flow may be created: {:?}", f.conntrack());
}

/// Both builds share the maps: a flow the layer-3 build created is the same flow for the Ethernet build (a flow
/// coming in on a tunnel and leaving on an Ethernet interface is translated back there).
#[test]
fn both_builds_share_the_conntrack_table() {
    let f = Fixture::layer3(&[rule(1, "dnat -i lo -p udp --dport 5000 --to 8.0.3.3:6000")]);
    assert_output(&f.ingress(&udp(CLIENT, CPORT, PUBLIC, 5000)), &udp(CLIENT, CPORT, BACKEND, 6000));
    let ethernet = aya::programs::SchedClassifier::from_pin(f.kernel().pin_dir().join("prog_egress"))
        .expect("pinned Ethernet egress program");
    let eth_hdr = [2u8, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    let mut frame = eth_hdr.to_vec();
    frame.extend_from_slice(&udp(BACKEND, 6000, CLIENT, CPORT));
    let mut want = eth_hdr.to_vec();
    want.extend_from_slice(&udp(PUBLIC, 5000, CLIENT, CPORT));
    let r = run(&ethernet, &frame);
    assert_eq!((r.ret, r.data == want), (NEXT, true), "Ethernet egress output {:02x?}", r.data);
}
