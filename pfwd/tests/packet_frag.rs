//! Packet-level tests of IPv4 fragment tracking: datagrams built whole with etherparse, cut into fragments here,
//! run fragment by fragment through the loaded programs (BPF_PROG_TEST_RUN), and the output fragments put back
//! together and compared with the translated datagram built independently (so the L4 checksum of the first
//! fragment is checked over the whole datagram). Every output fragment's IP header checksum is checked on its own.
mod common;

use common::*;
use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, MapData};
use etherparse::{
    EtherType, Ethernet2Header, IcmpEchoHeader, Icmpv4Header, Icmpv4Type, IpFragOffset, IpNumber, Ipv4Header,
    Ipv4Slice, TcpHeader, UdpHeader,
};
use pfwd_common::{FragEntry, FragKey, names};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 7);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const INSIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 5);
/// Fragment payload size of a 1500-byte MTU (a multiple of 8, as every fragment but the last must be).
const MTU_PAYLOAD: usize = 1480;

fn eth() -> Vec<u8> {
    Ethernet2Header { source: [2, 0, 0, 0, 0, 1], destination: [2, 0, 0, 0, 0, 2], ether_type: EtherType::IPV4 }
        .to_bytes()
        .to_vec()
}

fn ip_header(src: Ipv4Addr, dst: Ipv4Addr, proto: IpNumber, payload_len: usize, id: u16) -> Ipv4Header {
    let mut ip = Ipv4Header::new(0, 64, proto, src.octets(), dst.octets()).unwrap();
    ip.identification = id;
    ip.set_payload_len(payload_len).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    ip
}

/// A whole UDP datagram (Ethernet frame) with `len` bytes of patterned payload and its checksum.
fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, len: usize, id: u16) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    let ip = ip_header(src, dst, IpNumber::UDP, UdpHeader::LEN + len, id);
    let mut u = UdpHeader::without_ipv4_checksum(sport, dport, len).unwrap();
    u.checksum = u.calc_checksum_ipv4(&ip, &payload).unwrap();
    let mut out = eth();
    ip.write_raw(&mut out).unwrap();
    out.extend_from_slice(&u.to_bytes());
    out.extend_from_slice(&payload);
    out
}

/// A whole ICMP echo request with `len` bytes of payload.
fn echo(src: Ipv4Addr, dst: Ipv4Addr, ident: u16, len: usize, id: u16) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
    let icmp = Icmpv4Header::with_checksum(Icmpv4Type::EchoRequest(IcmpEchoHeader { id: ident, seq: 1 }), &payload);
    let ip = ip_header(src, dst, IpNumber::ICMP, 8 + len, id);
    let mut out = eth();
    ip.write_raw(&mut out).unwrap();
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(&payload);
    out
}

/// An ICMP error from `src` to `dst` embedding `inner` (an IP packet).
fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, inner: &[u8], id: u16) -> Vec<u8> {
    let ty = Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit);
    let icmp = Icmpv4Header::with_checksum(ty, inner);
    let ip = ip_header(src, dst, IpNumber::ICMP, icmp.header_len() + inner.len(), id);
    let mut out = eth();
    ip.write_raw(&mut out).unwrap();
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(inner);
    out
}

/// The IP header and payload of a frame.
fn split(frame: &[u8]) -> (Ipv4Header, Vec<u8>) {
    let s = Ipv4Slice::from_slice(&frame[14..]).unwrap_or_else(|e| panic!("not IPv4: {e}"));
    (s.header().to_header(), s.payload().payload.to_vec())
}

/// Cuts a whole datagram into fragments of at most `size` payload bytes (a multiple of 8), as a router would.
fn fragment(frame: &[u8], size: usize) -> Vec<Vec<u8>> {
    let (ip, payload) = split(frame);
    assert!(ip.fragment_offset.value() == 0 && !ip.more_fragments, "already a fragment");
    payload
        .chunks(size)
        .enumerate()
        .map(|(i, chunk)| {
            let mut h = ip.clone();
            h.fragment_offset = IpFragOffset::try_new((i * size / 8) as u16).unwrap();
            h.more_fragments = (i + 1) * size < payload.len();
            h.set_payload_len(chunk.len()).unwrap();
            h.header_checksum = h.calc_header_checksum();
            let mut out = eth();
            h.write_raw(&mut out).unwrap();
            out.extend_from_slice(chunk);
            out
        })
        .collect()
}

/// Puts fragments (in any order) back together into the whole datagram, checking each fragment's header checksum
/// and that all agree on the datagram's identity.
fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut first: Option<Ipv4Header> = None;
    let mut payload = vec![];
    for f in frags {
        let (h, data) = split(f);
        assert_eq!(h.header_checksum, h.calc_header_checksum(), "IP header checksum of a fragment: {h:?}");
        if let Some(k) = &first {
            assert_eq!(
                (k.source, k.destination, k.identification, k.protocol),
                (h.source, h.destination, h.identification, h.protocol),
                "fragments of one datagram"
            );
        }
        let off = h.fragment_offset.byte_offset() as usize;
        if payload.len() < off + data.len() {
            payload.resize(off + data.len(), 0);
        }
        payload[off..off + data.len()].copy_from_slice(&data);
        if off == 0 || first.is_none() {
            first = Some(h);
        }
    }
    let mut h = first.expect("no fragments");
    h.fragment_offset = IpFragOffset::ZERO;
    h.more_fragments = false;
    h.set_payload_len(payload.len()).unwrap();
    h.header_checksum = h.calc_header_checksum();
    let mut out = eth();
    h.write_raw(&mut out).unwrap();
    out.extend_from_slice(&payload);
    out
}

/// Runs each fragment through `prog` in the given order; every one must continue (translated or passed).
fn run_all(f: &Fixture, egress: bool, frags: &[Vec<u8>], order: &[usize]) -> Vec<Vec<u8>> {
    order
        .iter()
        .map(|&i| {
            let r = if egress { f.egress(&frags[i]) } else { f.ingress(&frags[i]) };
            assert_eq!(r.ret, NEXT, "fragment {i} should continue");
            r.data
        })
        .collect()
}

#[track_caller]
fn assert_same(got: &[u8], want: &[u8]) {
    if got != want {
        let (gh, gp) = split(got);
        let (wh, wp) = split(want);
        panic!(
            "wrong datagram\n got: {gh:?} ({} payload bytes)\nwant: {wh:?} ({} payload bytes)\nfirst payload difference at {:?}",
            gp.len(),
            wp.len(),
            gp.iter().zip(&wp).position(|(a, b)| a != b)
        );
    }
}

#[test]
fn dnat_translates_every_fragment_of_a_datagram_and_of_its_reply() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 5353 --to 10.0.2.2:53")]);
    for (n, len) in [(0u16, 3000usize), (1, 8000), (2, 1473), (3, 60_000)] {
        let id = 0x1000 + n;
        let sport = 40_000 + n;
        let frags = fragment(&udp(CLIENT, sport, ROUTER, 5353, len, id), MTU_PAYLOAD);
        let order: Vec<usize> = (0..frags.len()).collect();
        let out = run_all(&f, false, &frags, &order);
        assert_same(&reassemble(&out), &udp(CLIENT, sport, BACKEND, 53, len, id));

        // The reply, fragmented by the backend, is translated back at egress.
        let reply = fragment(&udp(BACKEND, 53, CLIENT, sport, len, id + 0x100), MTU_PAYLOAD);
        let out = run_all(&f, true, &reply, &order);
        assert_same(&reassemble(&out), &udp(ROUTER, 5353, CLIENT, sport, len, id + 0x100));
    }
    let c = f.counters(slot_of(1));
    assert_eq!(c.flows, 4);
    // Each datagram counts once, with its reassembled length (as iptables counts it after defragmentation).
    let datagrams: u64 = [3000u64, 8000, 1473, 60_000].iter().map(|l| 2 * (20 + 8 + l)).sum();
    assert_eq!((c.packets, c.bytes), (8, datagrams));
    assert_eq!(f.stat("fragments_unknown_drops"), 0);
    assert_eq!(f.stat("fragments_passed"), 0);
    assert!(f.stat("fragments_translated") > 80, "{}", f.stat("fragments_translated"));
}

#[test]
fn later_fragments_may_arrive_in_any_order_and_twice_after_the_first() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 5353 --to 10.0.2.2:53")]);
    let frags = fragment(&udp(CLIENT, 40_000, ROUTER, 5353, 6000, 0x2222), MTU_PAYLOAD);
    assert_eq!(frags.len(), 5);
    // The first, then the rest backwards, with a duplicate of one of them and of the first.
    let out = run_all(&f, false, &frags, &[0, 4, 3, 3, 2, 0, 1]);
    assert_eq!(out[2], out[3], "a duplicate is translated the same way");
    assert_eq!(out[0], out[5]);
    assert_same(&reassemble(&out), &udp(CLIENT, 40_000, BACKEND, 53, 6000, 0x2222));
    // An overlapping fragment (offset inside the first one's data) is rewritten at the IP level like the others;
    // the receiver decides what to do with the overlap.
    let (mut h, data) = split(&frags[1]);
    h.fragment_offset = IpFragOffset::try_new(100).unwrap();
    h.set_payload_len(64).unwrap();
    h.header_checksum = h.calc_header_checksum();
    let mut overlap = eth();
    h.write_raw(&mut overlap).unwrap();
    overlap.extend_from_slice(&data[..64]);
    let r = f.ingress(&overlap);
    assert_eq!(r.ret, NEXT);
    let (oh, od) = split(&r.data);
    assert_eq!((oh.source, oh.destination), (CLIENT.octets(), BACKEND.octets()));
    assert_eq!(oh.header_checksum, oh.calc_header_checksum());
    assert_eq!(od, data[..64]);
}

#[test]
fn a_fragment_before_its_first_is_dropped_and_counted_where_rules_could_apply() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 5353 --to 10.0.2.2:53")]);
    let frags = fragment(&udp(CLIENT, 40_000, ROUTER, 5353, 3000, 0x3333), MTU_PAYLOAD);
    assert_eq!(f.ingress(&frags[2]).ret, DROP, "the last fragment before the first");
    assert_eq!(f.stat("fragments_unknown_drops"), 1);
    // The first and the remaining one still go through translated (the datagram cannot be completed, but nothing
    // untranslated leaves).
    let out = run_all(&f, false, &frags, &[0, 1]);
    let (h, _) = split(&out[1]);
    assert_eq!(h.destination, BACKEND.octets());
    assert_eq!(f.stat("fragments_translated"), 1);

    // Without any NAT rule, pfwd cannot be asked to translate it: it passes, counted.
    let plain = Fixture::new(&[]);
    let r = plain.ingress(&frags[2]);
    assert_eq!((r.ret, &r.data), (NEXT, &frags[2]));
    assert_eq!(plain.stat("fragments_passed"), 1);
    assert_eq!(plain.stat("fragments_unknown_drops"), 0);
}

#[test]
fn fragments_of_untranslated_datagrams_pass_untouched_in_any_order_after_the_first() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 5353 --to 10.0.2.2:53")]);
    let frags = fragment(&udp(CLIENT, 40_000, ROUTER, 9999, 4000, 0x4444), MTU_PAYLOAD);
    let out = run_all(&f, false, &frags, &[0, 2, 1]);
    assert_eq!(out, [frags[0].clone(), frags[2].clone(), frags[1].clone()]);
    assert_eq!(f.stat("fragments_unknown_drops") + f.stat("fragments_translated") + f.stat("fragments_passed"), 0);
}

#[test]
fn a_first_fragment_too_short_for_the_ports_is_dropped_with_its_datagram() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 5353 --to 10.0.2.2:53")]);
    let whole = udp(CLIENT, 40_000, ROUTER, 5353, 100, 0x5555);
    // RFC 1858's tiny fragment: a first fragment (MF set) carrying only 4 bytes of the UDP header.
    let (mut h, payload) = split(&whole);
    h.more_fragments = true;
    h.set_payload_len(4).unwrap();
    h.header_checksum = h.calc_header_checksum();
    let mut tiny = eth();
    h.write_raw(&mut tiny).unwrap();
    tiny.extend_from_slice(&payload[..4]);
    assert_eq!(f.ingress(&tiny).ret, DROP);
    assert_eq!(f.stat("fragments_unknown_drops"), 1);
    assert!(f.conntrack().is_empty(), "no flow from a packet without ports");

    // A TCP first fragment holding only 8 of its 20 header bytes (ports, no flags) is not translated either.
    let f = Fixture::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:80")]);
    let mut t = TcpHeader::new(40_000, 8080, 1, 1000);
    t.syn = true;
    let ip = ip_header(CLIENT, ROUTER, IpNumber::TCP, 20, 0x5556);
    t.checksum = t.calc_checksum_ipv4(&ip, &[]).unwrap();
    let mut h = ip.clone();
    h.more_fragments = true;
    h.set_payload_len(8).unwrap();
    h.header_checksum = h.calc_header_checksum();
    let mut first = eth();
    h.write_raw(&mut first).unwrap();
    first.extend_from_slice(&t.to_bytes()[..8]);
    assert_eq!(f.ingress(&first).ret, DROP);
    assert!(f.conntrack().is_empty());
}

#[test]
fn masquerade_translates_fragments_both_ways() {
    let f = Fixture::new(&[rule(1, "masquerade -o lo -p udp")]);
    let frags = fragment(&udp(INSIDE, 5000, REMOTE, 53, 3000, 0x6666), MTU_PAYLOAD);
    let out = run_all(&f, true, &frags, &[0, 1, 2]);
    let whole = reassemble(&out);
    let (_, payload) = split(&whole);
    let sport = u16::from_be_bytes([payload[0], payload[1]]);
    assert_same(&whole, &udp(ROUTER, sport, REMOTE, 53, 3000, 0x6666));
    let reply = fragment(&udp(REMOTE, 53, ROUTER, sport, 3000, 0x7777), MTU_PAYLOAD);
    let out = run_all(&f, false, &reply, &[0, 2, 1]);
    assert_same(&reassemble(&out), &udp(REMOTE, 53, INSIDE, 5000, 3000, 0x7777));
}

#[test]
fn a_fragmented_echo_is_translated() {
    let f = Fixture::new(&[rule(1, "dnat -d 10.0.1.1 --to 10.0.2.2")]);
    let frags = fragment(&echo(CLIENT, ROUTER, 0x77, 4000, 0x8888), MTU_PAYLOAD);
    let out = run_all(&f, false, &frags, &[0, 1, 2]);
    assert_same(&reassemble(&out), &echo(CLIENT, BACKEND, 0x77, 4000, 0x8888));
}

#[test]
fn icmp_errors_about_and_in_fragments_are_translated() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 5353 --to 10.0.2.2:53")]);
    let frags = fragment(&udp(CLIENT, 40_000, ROUTER, 5353, 3000, 0x9999), MTU_PAYLOAD);
    run_all(&f, false, &frags, &[0, 1, 2]);

    // The client reports an error about the first fragment of the reply it received (translated at egress): the
    // error embeds that fragment's header (MF set) and 8 bytes of UDP, and goes back to the backend translated.
    let reply_first = &fragment(&udp(BACKEND, 53, CLIENT, 40_000, 3000, 0xaaaa), MTU_PAYLOAD)[0];
    let translated_first = &fragment(&udp(ROUTER, 5353, CLIENT, 40_000, 3000, 0xaaaa), MTU_PAYLOAD)[0];
    let inner_sent = &translated_first[14..14 + 20 + 8];
    let inner_want = &reply_first[14..14 + 20 + 8];
    let err = icmp_error(CLIENT, ROUTER, inner_sent, 0xbbbb);
    let r = f.ingress(&err);
    assert_eq!(r.ret, NEXT);
    assert_same(&r.data, &icmp_error(CLIENT, BACKEND, inner_want, 0xbbbb));

    // An error long enough to be fragmented itself (it embeds 2,000 bytes): both of its fragments are translated.
    let long_sent = &udp(ROUTER, 5353, CLIENT, 40_000, 1972, 0xcccc)[14..];
    let long_want = &udp(BACKEND, 53, CLIENT, 40_000, 1972, 0xcccc)[14..];
    let err = fragment(&icmp_error(CLIENT, ROUTER, long_sent, 0xdddd), MTU_PAYLOAD);
    let out = run_all(&f, false, &err, &[0, 1]);
    assert_same(&reassemble(&out), &icmp_error(CLIENT, BACKEND, long_want, 0xdddd));

    // An error about a later fragment embeds data, not ports: it is not translated.
    let later_sent = &fragment(&udp(ROUTER, 5353, CLIENT, 40_000, 3000, 0xeeee), MTU_PAYLOAD)[1][14..14 + 28];
    let err = icmp_error(CLIENT, ROUTER, later_sent, 0xefef);
    let r = f.ingress(&err);
    assert_eq!((r.ret, &r.data), (NEXT, &err));
}

#[test]
fn a_datagram_is_forgotten_after_the_timeout() {
    let f = Fixture::new(&[rule(1, "dnat -p udp --dport 5353 --to 10.0.2.2:53")]);
    let frags = fragment(&udp(CLIENT, 40_000, ROUTER, 5353, 3000, 0x1357), MTU_PAYLOAD);
    run_all(&f, false, &frags, &[0, 1]);
    // Age the datagram's entry past the timeout (as if its last fragment came seconds later).
    let data = MapData::from_pin(f.kernel().pin_dir().join(names::FRAGS)).expect("frag map pin");
    let mut map: HashMap<MapData, FragKey, FragEntry> = HashMap::try_from(Map::LruHashMap(data)).unwrap();
    let entries: Vec<(FragKey, FragEntry)> = map.iter().filter_map(Result::ok).collect();
    assert_eq!(entries.len(), 1, "one datagram tracked at ingress: {entries:?}");
    for (k, mut e) in entries {
        assert_eq!((k.id, k.proto), (0x1357, 17));
        e.seen_ns = e.seen_ns.saturating_sub(pfwd_common::FRAG_TIMEOUT_NS + 1_000_000_000);
        map.insert(k, e, 0).unwrap();
    }
    assert_eq!(f.ingress(&frags[2]).ret, DROP);
    assert_eq!(f.stat("fragments_unknown_drops"), 1);
}

#[test]
fn redirect_and_snat_translate_fragments_too() {
    // REDIRECT: to the interface's address (lo's 10.0.1.1 in the fixture) and another port.
    let f = Fixture::new(&[rule(1, "redirect -p udp --dport 5353 --to-port 53")]);
    let frags = fragment(&udp(CLIENT, 40_000, BACKEND, 5353, 3000, 0x2468), MTU_PAYLOAD);
    let out = run_all(&f, false, &frags, &[0, 2, 1]);
    assert_same(&reassemble(&out), &udp(CLIENT, 40_000, ROUTER, 53, 3000, 0x2468));
    let reply = fragment(&udp(ROUTER, 53, CLIENT, 40_000, 3000, 0x2469), MTU_PAYLOAD);
    let out = run_all(&f, true, &reply, &[0, 1, 2]);
    assert_same(&reassemble(&out), &udp(BACKEND, 5353, CLIENT, 40_000, 3000, 0x2469));

    // SNAT to a fixed address and port range, and the fragmented reply back.
    let f = Fixture::new(&[rule(1, "snat -o lo -p udp --to 198.51.100.1:20000-20099")]);
    let frags = fragment(&udp(INSIDE, 5000, REMOTE, 53, 3000, 0x1122), MTU_PAYLOAD);
    let out = run_all(&f, true, &frags, &[0, 1, 2]);
    let whole = reassemble(&out);
    let (_, payload) = split(&whole);
    let sport = u16::from_be_bytes([payload[0], payload[1]]);
    assert!((20000..=20099).contains(&sport), "SNAT port {sport}");
    let public = Ipv4Addr::new(198, 51, 100, 1);
    assert_same(&whole, &udp(public, sport, REMOTE, 53, 3000, 0x1122));
    let reply = fragment(&udp(REMOTE, 53, public, sport, 3000, 0x3344), MTU_PAYLOAD);
    let out = run_all(&f, false, &reply, &[0, 2, 1]);
    assert_same(&reassemble(&out), &udp(REMOTE, 53, INSIDE, 5000, 3000, 0x3344));
    assert_eq!(f.stat("fragments_unknown_drops"), 0);
}
