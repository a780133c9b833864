//! The model against etherparse: its checksum arithmetic, its parser, and hand-computed translations. No root.

use etherparse::PacketBuilder;

use super::packet::{self, ETH, Frag, Parsed};
use super::{FragCounters, Hook, Model, Observed, Verdict};

const CLIENT: [u8; 4] = [192, 168, 1, 7];
const ROUTER: [u8; 4] = [10, 0, 1, 1];
const BACKEND: [u8; 4] = [10, 0, 2, 2];
const PUBLIC: [u8; 4] = [203, 0, 113, 5];

fn rule(id: u32, args: &str) -> pfwd::rules::Rule {
    let argv: Vec<&str> = args.split_whitespace().collect();
    let mut r = pfwd::cli::parse_rule(&argv).unwrap();
    r.id = id;
    r
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool) -> Vec<u8> {
    let b =
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src, dst, 61).tcp(sport, dport, 7, 1000);
    let b = if syn { b.syn() } else { b.ack(9) };
    let mut out = Vec::new();
    b.write(&mut out, b"hello, model").unwrap();
    out
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 61)
        .udp(sport, dport)
        .write(&mut out, b"datagram")
        .unwrap();
    out
}

fn expect_next(m: &mut Model, hook: Hook, frame: &[u8]) -> Vec<u8> {
    let e = m.step(hook, frame, &Observed { dropped: false, data: frame }).unwrap();
    match e.verdict {
        Verdict::Next(b) => b,
        Verdict::Drop => panic!("dropped: {}", e.why),
    }
}

#[test]
fn incremental_update_equals_recomputation() {
    // Every address and port of a TCP and a UDP datagram changed through the model's rewriter: etherparse's full
    // recomputation gives the same checksums.
    for frame in [tcp(CLIENT, 40000, ROUTER, 8080, true), udp(CLIENT, 5000, ROUTER, 53)] {
        let Parsed::Ipv4(ip) = packet::parse(&frame) else { panic!("parse") };
        let mut out = frame.clone();
        let fields = packet::csum_fields(&ip);
        let mut w = packet::Rewriter { f: &mut out };
        w.set32(ETH + 16, u32::from_be_bytes(BACKEND), &fields);
        w.set16(ip.l4_at + 2, 9000, &fields[1..]);
        assert_eq!(crate::check::validity(&out), Some((true, Some(true))), "{out:02x?}");
        let h = etherparse::PacketHeaders::from_ethernet_slice(&out).unwrap();
        let Some(etherparse::NetHeaders::Ipv4(iph, _)) = h.net else { panic!() };
        assert_eq!(iph.header_checksum, iph.calc_header_checksum());
    }
}

#[test]
fn ones_sum_of_a_valid_header_is_ffff() {
    let f = udp(CLIENT, 1, ROUTER, 2);
    assert_eq!(packet::ones_sum(&f[ETH..ETH + 20]), 0xffff);
    assert!(packet::csum_equivalent(0, 0xffff) && !packet::csum_equivalent(1, 0xffff));
}

#[test]
fn dnat_translation_by_hand() {
    let mut m = Model::default();
    m.reset(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:9000")]);
    let got = expect_next(&mut m, Hook::Ingress, &tcp(CLIENT, 40000, ROUTER, 8080, true));
    // The same SYN written to the backend by etherparse: every byte, checksums included.
    assert_eq!(got, tcp(CLIENT, 40000, BACKEND, 9000, true));
    // The reply leaves with the router's address and port.
    let back = expect_next(&mut m, Hook::Egress, &tcp(BACKEND, 9000, CLIENT, 40000, false));
    assert_eq!(back, tcp(ROUTER, 8080, CLIENT, 40000, false));
    // A mid-stream packet of another connection opens nothing.
    let other = tcp(CLIENT, 40001, ROUTER, 8080, false);
    assert_eq!(expect_next(&mut m, Hook::Ingress, &other), other);
}

#[test]
fn udp_without_checksum_stays_zero() {
    let mut m = Model::default();
    m.reset(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")]);
    let mut f = udp(CLIENT, 5000, ROUTER, 53);
    f[ETH + 20 + 6..ETH + 20 + 8].copy_from_slice(&[0, 0]);
    let got = expect_next(&mut m, Hook::Ingress, &f);
    assert_eq!(&got[ETH + 26..ETH + 28], &[0, 0]);
    assert_eq!(&got[ETH + 16..ETH + 20], &BACKEND);
}

#[test]
fn snat_keeps_a_free_port_and_rejects_a_bad_kernel_choice() {
    let mut m = Model::default();
    m.reset(&[rule(1, "snat -p tcp --to 203.0.113.5:20000-20001")]);
    let syn = tcp(CLIENT, 20001, BACKEND, 80, true);
    let kept = tcp(PUBLIC, 20001, BACKEND, 80, true);
    assert_eq!(expect_next(&mut m, Hook::Egress, &syn), kept);
    // Another client, same port: the kernel must move it into the range, and not onto the taken 20001.
    let syn2 = tcp([10, 0, 1, 9], 20001, BACKEND, 80, true);
    let bad = tcp(PUBLIC, 20001, BACKEND, 80, true);
    assert!(m.step(Hook::Egress, &syn2, &Observed { dropped: false, data: &bad }).is_err());
    let outside = tcp(PUBLIC, 30000, BACKEND, 80, true);
    assert!(m.step(Hook::Egress, &syn2, &Observed { dropped: false, data: &outside }).is_err());
    let good = tcp(PUBLIC, 20000, BACKEND, 80, true);
    let e = m.step(Hook::Egress, &syn2, &Observed { dropped: false, data: &good }).unwrap();
    assert_eq!(e.verdict, Verdict::Next(good));
    // The range is full now: a third flow may (must) be dropped.
    let syn3 = tcp([10, 0, 1, 10], 20001, BACKEND, 80, true);
    let e = m.step(Hook::Egress, &syn3, &Observed { dropped: true, data: &syn3 }).unwrap();
    assert_eq!(e.verdict, Verdict::Drop);
}

#[test]
fn parser_rejects_broken_headers() {
    let good = tcp(CLIENT, 1, ROUTER, 2, true);
    assert!(matches!(packet::parse(&good), Parsed::Ipv4(_)));
    let mut ihl4 = good.clone();
    ihl4[ETH] = 0x44;
    assert!(matches!(packet::parse(&ihl4), Parsed::Malformed(_)));
    let mut long = good.clone();
    long[ETH + 2..ETH + 4].copy_from_slice(&2000u16.to_be_bytes());
    assert!(matches!(packet::parse(&long), Parsed::Malformed(_)));
    let mut first = good.clone();
    first[ETH + 6] |= 0x20;
    assert!(matches!(packet::parse(&first), Parsed::Ipv4(ip) if ip.frag == Frag::First && ip.tuple().is_some()));
    let mut later = good.clone();
    later[ETH + 7] = 3;
    assert!(matches!(packet::parse(&later), Parsed::Ipv4(ip) if ip.frag == Frag::Later && ip.tuple().is_none()));
    let mut doff = good;
    doff[ETH + 20 + 12] = 0x40;
    assert!(matches!(packet::parse(&doff), Parsed::Malformed(_)));
}

/// The fragment of the datagram `frame` holding its IP payload bytes `from..to` (MF set unless it ends the datagram),
/// its header checksum recomputed.
fn fragment(frame: &[u8], from: usize, to: usize) -> Vec<u8> {
    let payload = &frame[ETH + 20..];
    let mut f = frame[..ETH + 20].to_vec();
    f.extend_from_slice(&payload[from..to]);
    let mf = if to < payload.len() { 0x2000 } else { 0 };
    f[ETH + 2..ETH + 4].copy_from_slice(&((20 + to - from) as u16).to_be_bytes());
    f[ETH + 6..ETH + 8].copy_from_slice(&(mf | (from / 8) as u16).to_be_bytes());
    f[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let c = !packet::ones_sum(&f[ETH..ETH + 20]);
    f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
    f
}

fn expect_drop(m: &mut Model, hook: Hook, frame: &[u8]) {
    let e = m.step(hook, frame, &Observed { dropped: true, data: frame }).unwrap();
    assert_eq!(e.verdict, Verdict::Drop, "{}", e.why);
}

#[test]
fn later_fragments_get_what_their_first_got() {
    let mut m = Model::default();
    m.reset(&[rule(1, "dnat -p udp --dport 53 --to 10.0.2.2:5353")]);
    let whole = udp(CLIENT, 5000, ROUTER, 53);
    let (first, second) = (fragment(&whole, 0, 8), fragment(&whole, 8, 16));
    // Before its first fragment, a later one is unknown: dropped, as the instance has a NAT rule.
    expect_drop(&mut m, Hook::Ingress, &second);
    let got = expect_next(&mut m, Hook::Ingress, &first);
    assert_eq!(&got[ETH + 16..ETH + 20], &BACKEND);
    assert_eq!(packet::be16(&got, ETH + 20 + 2), 5353);
    // Now the later fragment: the first's addresses, a valid header checksum, nothing else changed.
    let out = expect_next(&mut m, Hook::Ingress, &second);
    assert_eq!(&out[ETH + 16..ETH + 20], &BACKEND);
    assert_eq!(packet::ones_sum(&out[ETH..ETH + 20]), 0xffff);
    assert_eq!(out[ETH + 20..], second[ETH + 20..]);
    // At the other hook the datagram is another one: unknown there.
    expect_drop(&mut m, Hook::Egress, &second);
    // A first fragment too short for the UDP header is a later one: this one is of the same datagram (source,
    // destination, protocol, IP id), so it is translated too; another IP id makes it unknown.
    let mut other = udp(CLIENT, 5001, ROUTER, 53);
    assert_eq!(&expect_next(&mut m, Hook::Ingress, &fragment(&other, 0, 0))[ETH + 16..ETH + 20], &BACKEND);
    other[ETH + 4] = 7;
    expect_drop(&mut m, Hook::Ingress, &fragment(&other, 0, 0));
    assert_eq!(m.frag_counters, FragCounters { translated: 2, unknown_drops: 3, passed: 0 });
}

#[test]
fn unknown_fragments_pass_without_rules_and_drops_are_remembered() {
    let mut m = Model::default();
    m.reset(&[]);
    let whole = udp(CLIENT, 5000, ROUTER, 53);
    let second = fragment(&whole, 8, 16);
    assert_eq!(expect_next(&mut m, Hook::Ingress, &second), second);
    assert_eq!(m.frag_counters, FragCounters { translated: 0, unknown_drops: 0, passed: 1 });
    // With SNAT to a one-port range taken by a first flow, a second flow's first fragment is dropped, and so its rest.
    m.reset(&[rule(1, "snat -p udp --to 203.0.113.5:20000")]);
    expect_next(&mut m, Hook::Egress, &udp(CLIENT, 20000, BACKEND, 53));
    let other = udp([10, 0, 1, 9], 20000, BACKEND, 53);
    let first = fragment(&other, 0, 8);
    assert!(m.step(Hook::Egress, &first, &Observed { dropped: true, data: &first }).unwrap().verdict == Verdict::Drop);
    expect_drop(&mut m, Hook::Egress, &fragment(&other, 8, 16));
    assert_eq!(m.frag_counters, FragCounters { translated: 0, unknown_drops: 1, passed: 0 });
}

const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const ROUTER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const BACKEND6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const PUBLIC6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];

fn tcp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, syn: bool) -> Vec<u8> {
    let b =
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv6(src, dst, 61).tcp(sport, dport, 7, 1000);
    let b = if syn { b.syn() } else { b.ack(9) };
    let mut out = Vec::new();
    b.write(&mut out, b"hello, model").unwrap();
    out
}

fn udp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src, dst, 61)
        .udp(sport, dport)
        .write(&mut out, b"datagram")
        .unwrap();
    out
}

#[test]
fn ipv6_dnat_translation_by_hand() {
    let mut m = Model::default();
    m.reset(&[rule(1, "dnat -p tcp --dport 8080 --to [2001:db8:2::2]:9000")]);
    let got = expect_next(&mut m, Hook::Ingress, &tcp6(CLIENT6, 40000, ROUTER6, 8080, true));
    // The same SYN written to the backend by etherparse: every byte, the pseudo-header checksum included.
    assert_eq!(got, tcp6(CLIENT6, 40000, BACKEND6, 9000, true));
    let back = expect_next(&mut m, Hook::Egress, &tcp6(BACKEND6, 9000, CLIENT6, 40000, false));
    assert_eq!(back, tcp6(ROUTER6, 8080, CLIENT6, 40000, false));
    // The IPv4 rule set's families stay apart: an IPv4 SYN to the same port is not the IPv6 rule's.
    let v4 = tcp(CLIENT, 40000, ROUTER, 8080, true);
    assert_eq!(expect_next(&mut m, Hook::Ingress, &v4), v4);
}

#[test]
fn address_less_rules_apply_to_both_families_unless_restricted() {
    let mut m = Model::default();
    m.reset(&[rule(1, "redirect -p udp --dport 53 --to-port 5353")]);
    // IPv6: to lo's IPv6 address; IPv4: to lo's IPv4 address.
    let got = expect_next(&mut m, Hook::Ingress, &udp6(CLIENT6, 5000, BACKEND6, 53));
    assert_eq!(got, udp6(CLIENT6, 5000, ROUTER6, 5353));
    let got = expect_next(&mut m, Hook::Ingress, &udp(CLIENT, 5000, BACKEND, 53));
    assert_eq!(got, udp(CLIENT, 5000, ROUTER, 5353));
    m.reset(&[rule(1, "masquerade -4")]);
    let v6 = udp6(CLIENT6, 5000, BACKEND6, 53);
    assert_eq!(expect_next(&mut m, Hook::Egress, &v6), v6);
    m.reset(&[rule(1, "snat -p udp --to [2001:db8:ff::5]:20000-20001")]);
    let got = expect_next(&mut m, Hook::Egress, &udp6(CLIENT6, 20001, BACKEND6, 53));
    assert_eq!(got, udp6(PUBLIC6, 20001, BACKEND6, 53));
    assert_eq!(crate::check::validity(&got), Some((true, Some(true))));
}

fn echo6(src: [u8; 16], dst: [u8; 16], id: u16, request: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv6(src, dst, 61);
    let b = if request { b.icmpv6_echo_request(id, 7) } else { b.icmpv6_echo_reply(id, 7) };
    let mut out = Vec::new();
    b.write(&mut out, b"ping").unwrap();
    out
}

#[test]
fn ipv6_echo_through_masquerade_by_hand() {
    let mut m = Model::default();
    m.reset(&[rule(1, "masquerade -o lo")]);
    // The ICMPv6 checksum covers the pseudo-header: etherparse's echo from lo's address, byte for byte.
    let got = expect_next(&mut m, Hook::Egress, &echo6(CLIENT6, BACKEND6, 0x77, true));
    assert_eq!(got, echo6(ROUTER6, BACKEND6, 0x77, true));
    assert_eq!(crate::check::validity(&got), Some((true, Some(true))));
    let back = expect_next(&mut m, Hook::Ingress, &echo6(BACKEND6, ROUTER6, 0x77, false));
    assert_eq!(back, echo6(BACKEND6, CLIENT6, 0x77, false));
}
