//! Packet tests of DNAT rules with several backends (`--to A,B,C`): real packets through the loaded programs with
//! BPF_PROG_TEST_RUN. A new flow's backend is the one userspace's Maglev table names at the flow's hash (checked flow
//! by flow), flows spread over every backend, a flow's later packets and replies stay with its backend, and changing
//! the rule (a backend removed) keeps established flows where they are. Needs root (BPF).
mod common;

use std::collections::HashMap;
use std::net::Ipv4Addr;

use common::*;
use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use pfwd::rules::{Backend, maglev};
use pfwd_common::{MAGLEV_SIZE, PROTO_TCP, flow_hash};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 7);
const B: [Ipv4Addr; 3] = [Ipv4Addr::new(10, 0, 2, 2), Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(10, 0, 2, 4)];
const THREE: &str = "dnat -i lo -p tcp --dport 80 --to 10.0.2.2:8080,10.0.2.3:8080,10.0.2.4:8080";
const FLOWS: u16 = 300;

/// An Ethernet + IPv4 + TCP packet with valid checksums (etherparse computes them).
fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 29_200);
    let b = if syn { b.syn() } else { b.ack(1) };
    let payload = b"lb";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    out
}

/// Source and destination of a packet the program let through, after checking its checksums.
#[track_caller]
fn addrs(r: &Run) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    assert_eq!(r.ret, NEXT, "translated packets continue");
    let h = PacketHeaders::from_ethernet_slice(&r.data).expect("parsable output");
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else { panic!("no IPv4 header") };
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    let Some(TransportHeader::Tcp(t)) = &h.transport else { panic!("no TCP header") };
    assert_eq!(t.checksum, t.calc_checksum_ipv4(ip, h.payload.slice()).unwrap(), "TCP checksum");
    ((ip.source.into(), t.source_port), (ip.destination.into(), t.destination_port))
}

/// The backend userspace's table names for the flow from CLIENT:sport to the router's port 80.
fn predicted(backends: &[Backend], sport: u16) -> Ipv4Addr {
    let t = maglev::table(backends);
    let h = flow_hash(&tuple(CLIENT, sport, ROUTER, 80, PROTO_TCP));
    match backends[t[(h % MAGLEV_SIZE) as usize] as usize].addr {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(a) => panic!("an IPv6 backend {a} in an IPv4 test"),
    }
}

fn backends_of(args: &str) -> Vec<Backend> {
    rule(1, args).rule.backends
}

/// New flows: where each client port went.
fn open_flows(f: &Fixture, ports: impl Iterator<Item = u16>) -> HashMap<u16, Ipv4Addr> {
    ports
        .map(|sport| {
            let (_, (to, port)) = addrs(&f.ingress(&tcp(CLIENT, sport, ROUTER, 80, true)));
            assert_eq!(port, 8080);
            (sport, to)
        })
        .collect()
}

#[test]
fn flows_spread_over_every_backend_as_the_table_says() {
    let f = Fixture::new(&[rule(1, THREE)]);
    let backends = backends_of(THREE);
    let chosen = open_flows(&f, 40_000..40_000 + FLOWS);
    let mut per_backend: HashMap<Ipv4Addr, u32> = HashMap::new();
    for (&sport, &to) in &chosen {
        assert_eq!(to, predicted(&backends, sport), "flow from port {sport}: the kernel and the table disagree");
        *per_backend.entry(to).or_default() += 1;
    }
    // 100 expected each; a binomial(300, 1/3) is below 70 with probability ~1e-4 (and the assignment is fixed: the
    // hash is deterministic, so this cannot flake).
    for b in B {
        assert!(per_backend.get(&b).copied().unwrap_or(0) >= 70, "{per_backend:?}");
    }
    // Counters: the rule's, and each backend's (flows, and one packet per flow so far).
    assert_eq!(f.counters(slot_of(1)).flows, u64::from(FLOWS));
    let by_backend = f.kernel().backend_counters(slot_of(1)).unwrap();
    assert_eq!(by_backend.len(), 3, "{by_backend:?}");
    for (addr, port, c) in by_backend {
        let addr = Ipv4Addr::from(u32::from_be(addr[0]));
        assert_eq!(port, 8080);
        assert_eq!((c.flows, c.packets), (u64::from(per_backend[&addr]), u64::from(per_backend[&addr])), "{addr}");
    }
}

#[test]
fn a_flow_and_its_replies_stay_with_its_backend() {
    let f = Fixture::new(&[rule(1, THREE)]);
    let chosen = open_flows(&f, 41_000..41_030);
    for (&sport, &to) in &chosen {
        for _ in 0..3 {
            let (_, dst) = addrs(&f.ingress(&tcp(CLIENT, sport, ROUTER, 80, false)));
            assert_eq!(dst, (to, 8080), "a later packet of the flow from port {sport}");
        }
        // The backend's reply goes back as the router's address and port.
        let (src, dst) = addrs(&f.egress(&tcp(to, 8080, CLIENT, sport, false)));
        assert_eq!((src, dst), ((ROUTER, 80), (CLIENT, sport)));
    }
    // Each backend counted its flows' packets: the SYN, three more and the reply.
    let total: u64 = f.kernel().backend_counters(slot_of(1)).unwrap().iter().map(|(_, _, c)| c.packets).sum();
    assert_eq!(total, 30 * 5);
}

#[test]
fn removing_a_backend_keeps_its_established_flows_and_moves_only_new_ones() {
    let f = Fixture::new(&[rule(1, THREE)]);
    let before = open_flows(&f, 42_000..42_000 + FLOWS);
    let two = "dnat -i lo -p tcp --dport 80 --to 10.0.2.2:8080,10.0.2.3:8080";
    f.sync(&[rule(1, two)]);
    // Established flows stay, those of the removed backend too.
    for (&sport, &to) in &before {
        let (_, dst) = addrs(&f.ingress(&tcp(CLIENT, sport, ROUTER, 80, false)));
        assert_eq!(dst, (to, 8080), "established flow from port {sport} after the change");
        let (src, _) = addrs(&f.egress(&tcp(to, 8080, CLIENT, sport, false)));
        assert_eq!(src, (ROUTER, 80));
    }
    // New flows go to the two remaining backends, as the new table says: those of the kept backends mostly where
    // the old table sent them.
    let backends = backends_of(two);
    let after = open_flows(&f, 43_000..43_000 + FLOWS);
    for (&sport, &to) in &after {
        assert_ne!(to, B[2]);
        assert_eq!(to, predicted(&backends, sport));
    }
    let three = backends_of(THREE);
    let kept_moved = (43_000..43_000 + FLOWS)
        .filter(|&p| predicted(&three, p) != B[2] && predicted(&three, p) != predicted(&backends, p))
        .count();
    assert!(kept_moved <= usize::from(FLOWS) / 20, "{kept_moved} flows of kept backends would move");
    // The removed backend's counters stay until its flows end (it still had packets after the change).
    let removed = f.kernel().backend_counters(slot_of(1)).unwrap();
    assert!(removed.iter().any(|(a, _, c)| a[0] == ne(B[2]) && c.flows > 0), "{removed:?}");
    // A rule with one backend again (the same slot, rewritten): plain DNAT; its left-over table is not consulted.
    f.sync(&[rule(1, "dnat -i lo -p tcp --dport 80 --to 10.0.2.9:8080")]);
    let (_, dst) = addrs(&f.ingress(&tcp(CLIENT, 44_000, ROUTER, 80, true)));
    assert_eq!(dst, (Ipv4Addr::new(10, 0, 2, 9), 8080));
}
