//! The XDP fast path (`pfwd attach --xdp`) on veth in native mode: the same traffic must give the same results as
//! the tc path. Every scenario runs its body twice, each time in a fresh lab: attached with `--mode ebpf`, then with
//! `--mode ebpf --xdp`; what the clients and servers saw (who answered, the peer address and port the server saw,
//! where UDP replies came from, the echoed bytes), the rules' flow counters, the exact packet and byte counters of
//! rules that only see UDP (request/response traffic, so deterministic), the bytes of TCP rules (within a few percent:
//! ACK counts vary with timing) and the data path's stats must be equal. The `--xdp` run must show `"xdp": "native"`
//! on both interfaces, and most forwarded packets must have taken the XDP path (`stats.xdp_forwarded` against the
//! router stack's `ForwDatagrams`): the traffic is bulk TCP and long UDP exchanges on one socket, so most packets
//! are mid-flow. After `pfwd detach` no XDP program is left on the router's interfaces.
//!
//! Client sockets are bound to fixed ports, so both runs make the very same flows (the same source ports kept by
//! MASQUERADE, the same backend picked by Maglev). Native XDP redirects into a veth need the peer ready to receive
//! them (NAPI): GRO is switched on in the client and server namespaces, for both runs alike. Checksum offloads stay
//! off (the lab's default), so a wrong checksum written by the XDP path would lose the packet.
//!
//! Scenarios: DNAT; full NAT (DNAT + MASQUERADE, no route back); SNAT and MASQUERADE alone; 1:1 NAT both ways;
//! several backends; hairpin NAT (in and out of one interface); and, in the middle of flows the XDP path carries,
//! a TTL-1 datagram (time exceeded), rule and flow changes (a masquerade added, `conntrack --flush`, a rule
//! deleted), IPv4 options (which the stack acts on: the XDP path, and `--fast-forward` too, leave them to it) and a
//! datagram over the next link's MTU (fragmentation needed with DF, fragmented by the router without). The client
//! and server must count no IP header or TCP/UDP checksum errors in either run.
//!
//! Refusals: `--xdp` with the iptables data path (new or existing instance), `--xdp` on a layer-3 (tun) device, and
//! the latter in auto mode too (no netfilter fallback without the fast path) fail, naming the problem, and change
//! nothing.
//!
//! Needs root and a built pfwd: `cargo build --release -p pfwd && PFWD_BIN=$PWD/target/release/pfwd cargo test
//! --release -p tests --test xdp`.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use serde_json::Value;
use tests::{Lab, Node, Reply, TIMEOUT};

/// Bytes each bulk TCP request carries (the test server echoes them back; it reads at most 64 KiB).
const BULK: usize = 48 * 1024;
/// Datagrams exchanged on each UDP socket.
const EXCHANGES: usize = 40;

// ---------------------------------------------------------------------------------------------------------------
// Traffic: every helper returns a one-line summary of what the client saw, for comparing the two runs.

/// A payload of `len` printable bytes without a newline.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// One TCP connection from `node`, bound to `from` (a fixed port), to `to`: sends [`BULK`] bytes, half-closes, reads
/// the whole reply. Asserts the server echoed every byte; returns who answered and which peer it saw.
#[track_caller]
fn tcp_bulk(lab: &Lab, node: Node, from: &str, to: &str) -> String {
    use socket2::{Domain, Protocol, Socket, Type};
    let (from, to) = (sa(from), sa(to));
    let payload = pattern(BULK);
    let sock = lab
        .in_ns(node, || Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)))
        .expect("entering the namespace")
        .expect("TCP socket");
    let run = || -> std::io::Result<Vec<u8>> {
        sock.set_reuse_address(true)?;
        sock.bind(&from.into())?;
        sock.connect_timeout(&to.into(), TIMEOUT)?;
        let mut stream: TcpStream = sock.into();
        stream.set_write_timeout(Some(TIMEOUT))?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.write_all(&payload)?;
        stream.shutdown(Shutdown::Write)?;
        let mut reply = Vec::new();
        // Bounded: at most 128 KiB, each read at most TIMEOUT.
        stream.take(128 * 1024).read_to_end(&mut reply)?;
        Ok(reply)
    };
    let reply = run().unwrap_or_else(|e| panic!("TCP {from} -> {to}: {e}"));
    let text = String::from_utf8_lossy(&reply);
    let r =
        Reply::parse(&text).unwrap_or_else(|| panic!("TCP {from} -> {to}: unparsable reply ({} bytes)", reply.len()));
    assert!(
        r.payload.as_bytes() == payload.as_slice(),
        "TCP {from} -> {to}: the server echoed {} bytes, not the {BULK} sent (or not the same ones)",
        r.payload.len()
    );
    format!("tcp {from} -> {to}: {} port {} saw peer {}, echoed {BULK} bytes", r.label, r.port, r.peer)
}

/// [`EXCHANGES`] datagrams from one socket in `node` bound to `from`, each answered: every reply must carry its own
/// request, come from `to` exactly, and name the same server and peer. Returns that.
#[track_caller]
fn udp_series(lab: &Lab, node: Node, from: &str, to: &str) -> String {
    let (from, to) = (sa(from), sa(to));
    let sock = lab
        .in_ns(node, || UdpSocket::bind(from))
        .expect("entering the namespace")
        .unwrap_or_else(|e| panic!("binding UDP {from}: {e}"));
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(TIMEOUT)).unwrap();
    let mut seen: Option<(String, u16, SocketAddr, SocketAddr)> = None;
    let mut buf = [0u8; 2048];
    for i in 0..EXCHANGES {
        let msg = format!("u{i}");
        sock.send_to(msg.as_bytes(), to).unwrap_or_else(|e| panic!("UDP {from} -> {to} #{i}: {e}"));
        let (n, src) = sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("UDP {from} -> {to} #{i}: no reply: {e}"));
        let text = String::from_utf8_lossy(&buf[..n]);
        let r = Reply::parse(&text).unwrap_or_else(|| panic!("UDP {from} -> {to} #{i}: unparsable reply {text:?}"));
        assert_eq!(r.payload, msg, "UDP {from} -> {to} #{i}: the reply is not to this datagram");
        let now = (r.label, r.port, r.peer, src);
        match &seen {
            None => seen = Some(now),
            Some(first) => assert_eq!(first, &now, "UDP {from} -> {to} #{i}: answered differently mid-flow"),
        }
    }
    let (label, port, peer, src) = seen.expect("at least one exchange");
    format!("udp {from} -> {to} x{EXCHANGES}: {label} port {port} saw peer {peer}, replies from {src}")
}

/// A counter of `node`'s /proc/net/snmp, e.g. `("Ip", "ForwDatagrams")`.
fn snmp(lab: &Lab, node: Node, group: &str, name: &str) -> u64 {
    let text = sh(lab, node, "cat /proc/net/snmp");
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next().expect("snmp header"), lines.next().expect("snmp values"));
    let at = names.split_whitespace().position(|n| n == name).unwrap_or_else(|| panic!("no {group} {name} in snmp"));
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// The IP stack's count of datagrams the router forwarded; the XDP path's packets skip it.
fn forwarded_by_stack(lab: &Lab) -> u64 {
    snmp(lab, Node::Router, "Ip", "ForwDatagrams")
}

/// Packets the client and server dropped for a bad IP header or a bad TCP/UDP checksum (the lab has checksum
/// offloads off, so they check every packet, XDP-forwarded ones too).
fn receive_errors(lab: &Lab) -> Vec<String> {
    let mut out = vec![];
    for node in [Node::Client, Node::Server] {
        for (group, name) in [("Ip", "InHdrErrors"), ("Tcp", "InCsumErrors"), ("Udp", "InCsumErrors")] {
            let n = snmp(lab, node, group, name);
            if n != 0 {
                out.push(format!("{} {group} {name} {n}", node.label()));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------------
// The two runs and their comparison.

/// What one run of a scenario showed.
#[derive(Debug)]
struct Outcome {
    /// The scenario's own lines (replies as the clients saw them), then the counters that must match exactly.
    exact: Vec<String>,
    /// Bytes counted by each rule that sees TCP (ACK counts vary a little from run to run).
    tcp_bytes: Vec<(String, u64)>,
    /// Packets the XDP path forwarded, and packets the router's stack forwarded, during the scenario.
    xdp_forwarded: u64,
    by_stack: u64,
    /// Packets tc egress handled from tc ingress's handoff (`stats.egress_handoffs`), during the scenario.
    handoffs: u64,
}

fn u64_of(v: &Value, what: &str) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{what} missing or not a number: {v}"))
}

/// `stats.xdp_forwarded` of a status.
fn xdp_forwarded(st: &Value) -> u64 {
    u64_of(&st["stats"]["xdp_forwarded"], "stats.xdp_forwarded")
}

/// The interfaces' `xdp` fields of a status, by name.
fn xdp_modes(st: &Value) -> Vec<(String, Value)> {
    st["interfaces"]
        .as_array()
        .unwrap_or_else(|| panic!("no interfaces in status: {st:#}"))
        .iter()
        .map(|i| (i["name"].as_str().unwrap_or("?").to_string(), i["xdp"].clone()))
        .collect()
}

/// Whether `ip -d link show DEV` in the router shows an XDP program.
fn has_xdp(lab: &Lab, dev: &str) -> bool {
    sh(lab, Node::Router, &format!("ip -d link show {dev}")).contains("prog/xdp")
}

/// The data path a run is attached with.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    /// `--mode ebpf`: the tc programs and the IP stack.
    Tc,
    /// `--mode ebpf --xdp`.
    Xdp,
    /// `--mode ebpf --fast-forward` (for the cases the XDP path showed `--fast-forward` shares).
    FastForward,
}

/// Runs `scenario` in a fresh lab attached on `path`; checks the XDP attachment (native on both links with --xdp,
/// none otherwise, none after detach) and returns what was seen.
fn run(prefix: &str, path: Path, scenario: fn(&Lab) -> Vec<String>) -> Outcome {
    let xdp = path == Path::Xdp;
    let lab = lab(&format!(
        "{prefix}-{}",
        match path {
            Path::Tc => "t",
            Path::Xdp => "x",
            Path::FastForward => "f",
        }
    ));
    // NAPI on the receiving ends of the router's veths, so native XDP redirects into them are delivered.
    for node in [Node::Client, Node::Server] {
        sh(&lab, node, "ethtool -K eth0 gro on >/dev/null");
    }
    let mut args = vec!["attach", "--mode", "ebpf", "eth0", "eth1"];
    match path {
        Path::Tc => {}
        Path::Xdp => args.push("--xdp"),
        Path::FastForward => args.push("--fast-forward"),
    }
    let guard = Detach::new(&lab);
    pfwd_ok(&lab, &args);
    let st = status(&lab);
    let want = if xdp { Value::from("native") } else { Value::Null };
    assert_eq!(
        xdp_modes(&st),
        [("eth0".to_string(), want.clone()), ("eth1".to_string(), want)],
        "status after `pfwd {}`: {st:#}",
        args.join(" ")
    );
    for dev in ["eth0", "eth1"] {
        assert_eq!(has_xdp(&lab, dev), xdp, "XDP program on the router's {dev} (ip -d link show)");
    }
    let (xdp0, stack0) = (xdp_forwarded(&st), forwarded_by_stack(&lab));
    let hand0 = u64_of(&st["stats"]["egress_handoffs"], "stats.egress_handoffs");

    let mut exact = scenario(&lab);

    let by_stack = forwarded_by_stack(&lab) - stack0;
    let errors = receive_errors(&lab);
    assert!(errors.is_empty(), "{prefix} (xdp: {xdp}): packets dropped on receipt: {errors:?}");
    let st = status(&lab);
    let xdp_fwd = xdp_forwarded(&st) - xdp0;
    let handoffs = u64_of(&st["stats"]["egress_handoffs"], "stats.egress_handoffs") - hand0;
    let mut tcp_bytes = vec![];
    for r in st["rules"].as_array().unwrap_or_else(|| panic!("no rules in status: {st:#}")) {
        let text = r["text"].as_str().unwrap_or("?").to_string();
        exact.push(format!("rule {text}: {} flows", u64_of(&r["flows"], "flows")));
        // Only UDP (one packet per datagram, each answered) is deterministic to the packet.
        if r["proto"] == "udp" {
            exact.push(format!("rule {text}: {} packets, {} bytes", r["packets"], r["bytes"]));
            if let Some(bc) = r.get("backend_counters") {
                exact.push(format!("rule {text}: backends {bc}"));
            }
        } else {
            tcp_bytes.push((text.clone(), u64_of(&r["bytes"], "bytes")));
            if let Some(bcs) = r["backend_counters"].as_array() {
                let flows: Vec<String> =
                    bcs.iter().map(|b| format!("{}:{} {}", b["addr"], b["port"], b["flows"])).collect();
                exact.push(format!("rule {text}: backend flows {flows:?}"));
            }
        }
    }
    // Every other stat (new flows, confirmations, drops, ICMP errors translated) is the same on both paths: not the
    // packets the XDP path took, nor those tc egress handled from tc ingress's handoff (the XDP path's packets
    // never meet tc).
    let mut stats = st["stats"].clone();
    let counters = stats.as_object_mut().unwrap_or_else(|| panic!("no stats in status: {st:#}"));
    counters.remove("xdp_forwarded");
    counters.remove("egress_handoffs");
    exact.push(format!("stats {stats}"));

    guard.detach();
    for dev in ["eth0", "eth1"] {
        assert!(!has_xdp(&lab, dev), "XDP program left on the router's {dev} after detach");
    }
    Outcome { exact, tcp_bytes, xdp_forwarded: xdp_fwd, by_stack, handoffs }
}

/// Runs `scenario` on the tc path, then on the XDP path, and compares. `min_xdp` is the least number of packets the
/// XDP path must have forwarded itself.
fn compare(prefix: &str, scenario: fn(&Lab) -> Vec<String>, min_xdp: u64) {
    let tc = run(prefix, Path::Tc, scenario);
    let xdp = run(prefix, Path::Xdp, scenario);
    eprintln!(
        "{prefix}: tc path: {} forwarded by the stack, TCP rule bytes {:?}; xdp path: {} by XDP, {} by the stack, \
         TCP rule bytes {:?}",
        tc.by_stack,
        tc.tcp_bytes.iter().map(|(_, b)| b).collect::<Vec<_>>(),
        xdp.xdp_forwarded,
        xdp.by_stack,
        xdp.tcp_bytes.iter().map(|(_, b)| b).collect::<Vec<_>>()
    );
    assert_eq!(tc.xdp_forwarded, 0, "{prefix}: without --xdp nothing takes the XDP path");
    assert_eq!(xdp.exact, tc.exact, "{prefix}: the XDP path (left) differs from the tc path (right)");
    assert_eq!(
        xdp.tcp_bytes.iter().map(|(t, _)| t).collect::<Vec<_>>(),
        tc.tcp_bytes.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );
    for ((text, x), (_, t)) in xdp.tcp_bytes.iter().zip(&tc.tcp_bytes) {
        let (x, t) = (*x as f64, *t as f64);
        assert!((x - t).abs() <= 0.05 * t, "{prefix}: rule {text} counted {x} bytes on the XDP path, {t} on tc");
    }
    assert!(
        xdp.xdp_forwarded >= min_xdp,
        "{prefix}: only {} packets took the XDP path (want >= {min_xdp}; {} went through the stack)",
        xdp.xdp_forwarded,
        xdp.by_stack
    );
    // The same traffic: what the stack forwarded alone without --xdp, XDP forwards nearly all of with it (only
    // packets that make or end flows, and the first ones before the next hop is known, are left to the stack).
    assert!(
        xdp.xdp_forwarded * 100 >= 85 * tc.by_stack && xdp.by_stack * 10 <= tc.by_stack,
        "{prefix}: with --xdp {} packets took XDP and {} the stack; without, the stack forwarded {}",
        xdp.xdp_forwarded,
        xdp.by_stack,
        tc.by_stack
    );
}

// ---------------------------------------------------------------------------------------------------------------
// 1. DNAT, TCP and UDP, to the server, which routes back through the router.

#[test]
fn tc_path_takes_one_conntrack_lookup_per_forwarded_packet() {
    // Real forwarding on the tc path: tc egress handles nearly every forwarded DNAT packet from what tc ingress
    // handed it (the handoff), without a lookup of its own. Not each flow's first packet, which egress looks up.
    let tc = run("xdp-hand", Path::Tc, dnat_body);
    eprintln!("tc path: {} packets forwarded by the stack, {} handed from ingress to egress", tc.by_stack, tc.handoffs);
    assert!(
        tc.handoffs * 100 >= 90 * tc.by_stack && tc.handoffs <= tc.by_stack,
        "{} of {} forwarded packets handed from tc ingress to tc egress",
        tc.handoffs,
        tc.by_stack
    );
}

fn dnat_body(lab: &Lab) -> Vec<String> {
    dnat_traffic(lab, false)
}

/// TCP and UDP DNAT 10.0.1.1:8080 -> 10.0.2.2:9000, and the clients' traffic through it; `full_nat` adds MASQUERADE out
/// of eth1 and takes the server's route back away.
fn dnat_traffic(lab: &Lab, full_nat: bool) -> Vec<String> {
    if full_nat {
        sh(lab, Node::Server, "ip route del default");
    }
    let _tcp = server(lab, Node::Server, "10.0.2.2:9000", "server");
    let _udp = udp_server(lab, Node::Server, "10.0.2.2:9000", "server");
    add(lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    add(lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    if full_nat {
        add(lab, &["masquerade", "-o", "eth1"]);
    }
    let mut out = vec![];
    for i in 0..3 {
        out.push(tcp_bulk(lab, Node::Client, &format!("10.0.1.2:{}", 41000 + i), "10.0.1.1:8080"));
        out.push(udp_series(lab, Node::Client, &format!("10.0.1.2:{}", 42000 + i), "10.0.1.1:8080"));
    }
    out
}

#[test]
fn dnat() {
    compare("xdp-dnat", dnat_body, 300);
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Full NAT: DNAT plus MASQUERADE out of eth1; the server has no route back to the client.

fn full_nat_body(lab: &Lab) -> Vec<String> {
    dnat_traffic(lab, true)
}

#[test]
fn full_nat() {
    compare("xdp-fullnat", full_nat_body, 300);
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Source NAT only: the client reaches the server's own address; SNAT (UDP, to a port range) and MASQUERADE
// (TCP) out of eth1 make the server, which has no route back, see the router.

fn snat_body(lab: &Lab) -> Vec<String> {
    sh(lab, Node::Server, "ip route del default");
    let _tcp = server(lab, Node::Server, "10.0.2.2:9000", "server");
    let _udp = udp_server(lab, Node::Server, "10.0.2.2:9000", "server");
    add(lab, &["masquerade", "-o", "eth1", "-p", "tcp"]);
    add(lab, &["snat", "-o", "eth1", "-p", "udp", "-s", "10.0.1.0/24", "--to", "10.0.2.1:30000-30099"]);
    let mut out = vec![];
    for i in 0..3 {
        out.push(tcp_bulk(lab, Node::Client, &format!("10.0.1.2:{}", 41000 + i), "10.0.2.2:9000"));
        // Outside the SNAT range: the source port is translated (to a port of the range chosen at random, so the
        // summary keeps only the address).
        out.push(udp_series(lab, Node::Client, &format!("10.0.1.2:{}", 42000 + i), "10.0.2.2:9000"));
    }
    out.into_iter().map(|l| forget_snat_port(&l)).collect()
}

/// `... saw peer 10.0.2.1:3xxxx, ...` -> `... saw peer 10.0.2.1:30000-30099, ...` for a port of the SNAT range (the
/// port is picked at random, so it differs between runs; it must be in the range).
fn forget_snat_port(line: &str) -> String {
    let Some((head, rest)) = line.split_once("saw peer 10.0.2.1:") else { return line.to_string() };
    let (port, tail) = rest.split_once(',').unwrap_or((rest, ""));
    if !line.starts_with("udp") {
        return line.to_string();
    }
    let p: u16 = port.parse().unwrap_or_else(|_| panic!("bad port in {line:?}"));
    assert!((30000..=30099).contains(&p), "SNAT port {p} outside 30000-30099: {line}");
    format!("{head}saw peer 10.0.2.1:30000-30099,{tail}")
}

#[test]
fn snat_and_masquerade() {
    compare("xdp-snat", snat_body, 300);
}

// ---------------------------------------------------------------------------------------------------------------
// 4. 1:1 NAT: two public addresses, each both ways to one private address of the server.

const PAIRS: [(&str, &str); 2] = [("203.0.113.11", "10.0.2.2"), ("203.0.113.12", "10.0.2.3")];

fn one_to_one_body(lab: &Lab) -> Vec<String> {
    lab.add_addr(Node::Server, "eth0", "10.0.2.3/24").unwrap_or_else(|e| panic!("{e:#}"));
    let mut servers = vec![];
    for (_, private) in PAIRS {
        let label = format!("priv-{private}");
        servers.push(server(lab, Node::Server, &format!("{private}:9000"), &label));
        servers.push(udp_server(lab, Node::Server, &format!("{private}:9000"), &label));
    }
    // A server on the client, for connections the private hosts open.
    servers.push(server(lab, Node::Client, "10.0.1.2:7000", "client"));
    servers.push(udp_server(lab, Node::Client, "10.0.1.2:7000", "client"));
    for (public, private) in PAIRS {
        add(lab, &["dnat", "-i", "eth0", "-d", public, "--to", private]);
        add(lab, &["snat", "-o", "eth0", "-s", private, "--to", public]);
    }
    let mut out = vec![];
    for (i, (public, private)) in PAIRS.into_iter().enumerate() {
        // In: the private host sees the real client.
        out.push(tcp_bulk(lab, Node::Client, &format!("10.0.1.2:{}", 41000 + i), &format!("{public}:9000")));
        out.push(udp_series(lab, Node::Client, &format!("10.0.1.2:{}", 42000 + i), &format!("{public}:9000")));
        // Out: the client sees the public address.
        out.push(tcp_bulk(lab, Node::Server, &format!("{private}:{}", 43000 + i), "10.0.1.2:7000"));
        out.push(udp_series(lab, Node::Server, &format!("{private}:{}", 44000 + i), "10.0.1.2:7000"));
    }
    out
}

#[test]
fn one_to_one_nat() {
    compare("xdp-1to1", one_to_one_body, 400);
}

// ---------------------------------------------------------------------------------------------------------------
// 5. Several backends behind one rule (Maglev: the fixed client ports pick the same backends in both runs).

const BACKENDS: [&str; 3] = ["10.0.2.2", "10.0.2.3", "10.0.2.4"];

fn backends_body(lab: &Lab) -> Vec<String> {
    let mut servers = vec![];
    for (i, b) in BACKENDS.iter().enumerate() {
        if i > 0 {
            lab.add_addr(Node::Server, "eth0", &format!("{b}/24")).unwrap_or_else(|e| panic!("{e:#}"));
        }
        servers.push(server(lab, Node::Server, &format!("{b}:9000"), &format!("b{i}")));
        servers.push(udp_server(lab, Node::Server, &format!("{b}:9000"), &format!("b{i}")));
    }
    let to = BACKENDS.map(|b| format!("{b}:9000")).join(",");
    add(lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", &to]);
    add(lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "8080", "--to", &to]);
    let mut out = vec![];
    for i in 0..6 {
        out.push(tcp_bulk(lab, Node::Client, &format!("10.0.1.2:{}", 41000 + i), "10.0.1.1:8080"));
        out.push(udp_series(lab, Node::Client, &format!("10.0.1.2:{}", 42000 + i), "10.0.1.1:8080"));
    }
    let used: std::collections::BTreeSet<&str> =
        out.iter().filter_map(|l| l.split_once(": ").map(|(_, r)| r.split(' ').next().unwrap_or(""))).collect();
    assert!(used.len() >= 2, "12 flows all went to one backend ({used:?}): the test shows nothing about balancing");
    out
}

#[test]
fn several_backends() {
    compare("xdp-lb", backends_body, 600);
}

// ---------------------------------------------------------------------------------------------------------------
// 6. A packet whose TTL would expire at the router, in the middle of a flow the XDP path forwards: it goes to the
// stack, which sends the time-exceeded error, translated back to the client's socket; the flow goes on after. Every
// datagram before and after is decremented exactly once on the way (the server and the client see TTL 63).

/// Sets an IPv4 socket option of type int.
fn set_int_opt(sock: &UdpSocket, opt: libc::c_int, value: libc::c_int) {
    // SAFETY: a valid socket fd and an int option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            opt,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt({opt}): {}", std::io::Error::last_os_error());
}

/// One datagram as [`recv_meta`] reads it.
struct Received {
    text: String,
    src: SocketAddr,
    /// The TTL it arrived with (IP_RECVTTL).
    ttl: u8,
    /// Its IP options as they arrived (IP_RECVOPTS; empty without).
    options: Vec<u8>,
}

/// Receives one datagram on `sock` (which has IP_RECVTTL on, and IP_RECVOPTS for the options). Waits at most the
/// socket's read timeout; a queued error (IP_RECVERR) is returned as the error.
fn recv_meta(sock: &UdpSocket) -> std::io::Result<Received> {
    let mut buf = [0u8; 2048];
    // u64s: aligned for cmsghdr.
    let mut control = [0u64; 32];
    // SAFETY: plain-old-data structures, valid when zeroed.
    let (mut from, mut msg): (libc::sockaddr_in, libc::msghdr) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: msg points at live buffers of the sizes it states.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (mut ttl, mut options) = (None, vec![]);
    // SAFETY: walking the control messages recvmsg filled in, with the libc macros made for it; each one's data is
    // within the control buffer.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_TTL {
                ttl = Some(std::ptr::read_unaligned(data.cast::<libc::c_int>()) as u8);
            }
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_RECVOPTS {
                let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                options = std::slice::from_raw_parts(data, len).to_vec();
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let src =
        SocketAddr::from((std::net::Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr)), u16::from_be(from.sin_port)));
    let ttl = ttl.ok_or_else(|| std::io::Error::other("no IP_TTL control message"))?;
    Ok(Received { text: String::from_utf8_lossy(&buf[..n as usize]).into_owned(), src, ttl, options })
}

/// A UDP server in the server namespace on `addr` answering each datagram with `ttl T peer P: PAYLOAD` (the TTL it
/// arrived with), `ttl T options [..] peer P: PAYLOAD` when it carried IP options; stops when `stop` is set (it
/// polls every 50 ms).
fn ttl_server(lab: &Lab, addr: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let addr = sa(addr);
    let sock = lab
        .in_ns(Node::Server, || UdpSocket::bind(addr))
        .expect("entering the server namespace")
        .unwrap_or_else(|e| panic!("binding UDP {addr}: {e}"));
    set_int_opt(&sock, libc::IP_RECVTTL, 1);
    set_int_opt(&sock, libc::IP_RECVOPTS, 1);
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(r) = recv_meta(&sock) {
                let opts = if r.options.is_empty() { String::new() } else { format!(" options {:?}", r.options) };
                let _ = sock.send_to(format!("ttl {}{opts} peer {}: {}", r.ttl, r.src, r.text).as_bytes(), r.src);
            }
        }
    })
}

/// Stops a server thread when dropped (also while unwinding).
struct StopOnDrop(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

fn ttl_body(lab: &Lab) -> Vec<String> {
    sh(lab, Node::Server, "ip route del default");
    let stop = Arc::new(AtomicBool::new(false));
    let _server = StopOnDrop(stop.clone(), Some(ttl_server(lab, "10.0.2.2:9000", stop)));
    add(lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    add(lab, &["masquerade", "-o", "eth1", "-p", "udp"]);
    let sock = lab
        .in_ns(Node::Client, || UdpSocket::bind("10.0.1.2:42000"))
        .expect("entering the client namespace")
        .expect("binding the client socket");
    sock.connect("10.0.1.1:8080").unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    set_int_opt(&sock, libc::IP_RECVERR, 1);
    set_int_opt(&sock, libc::IP_RECVTTL, 1);
    set_int_opt(&sock, libc::IP_TTL, 64);
    let exchange = |msg: &str| -> std::io::Result<String> {
        sock.send(msg.as_bytes())?;
        let r = recv_meta(&sock)?;
        Ok(format!("{} (reply from {}, ttl {})", r.text, r.src, r.ttl))
    };
    let mut out = vec![];
    for i in 0..EXCHANGES {
        let got = exchange(&format!("before{i}")).unwrap_or_else(|e| panic!("exchange {i} before TTL 1: {e}"));
        assert_eq!(got, format!("ttl 63 peer 10.0.2.1:42000: before{i} (reply from 10.0.1.1:8080, ttl 63)"));
        out.push(got);
    }
    set_int_opt(&sock, libc::IP_TTL, 1);
    let err = exchange("ttl").expect_err("a reply despite TTL 1");
    assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH), "expected the time-exceeded error, got {err}");
    out.push(format!("TTL 1: {err}"));
    set_int_opt(&sock, libc::IP_TTL, 64);
    for i in 0..EXCHANGES {
        let got = exchange(&format!("after{i}")).unwrap_or_else(|e| panic!("exchange {i} after TTL 1: {e}"));
        assert_eq!(got, format!("ttl 63 peer 10.0.2.1:42000: after{i} (reply from 10.0.1.1:8080, ttl 63)"));
        out.push(got);
    }
    out
}

#[test]
fn ttl_expiring_mid_flow_gets_time_exceeded() {
    compare("xdp-ttl", ttl_body, 150);
}

// ---------------------------------------------------------------------------------------------------------------
// 7. Changes in the middle of flows the XDP path forwards: a MASQUERADE rule added (neither the UDP flow nor the TCP
// connection, whose NAT their first packets settled, picks it up mid-way: both go on as they were), `pfwd conntrack
// --flush` (the UDP flow starts again, now with the MASQUERADE; the TCP connection reaches the router itself, which
// resets it), and the rule deleted (the new flow keeps its translation).

fn udp_lines(sock: &UdpSocket, tag: &str, out: &mut Vec<String>) {
    let mut buf = [0u8; 2048];
    let mut seen = None;
    for i in 0..EXCHANGES / 2 {
        let msg = format!("{tag}{i}");
        sock.send_to(msg.as_bytes(), sa("10.0.1.1:8080")).unwrap_or_else(|e| panic!("UDP {msg}: {e}"));
        let (n, src) = sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("UDP {msg}: no reply: {e}"));
        let r = Reply::parse(&String::from_utf8_lossy(&buf[..n])).unwrap_or_else(|| panic!("UDP {msg}: bad reply"));
        assert_eq!(r.payload, msg);
        let now = format!("udp {tag}: {} port {} saw peer {}, reply from {src}", r.label, r.port, r.peer);
        match &seen {
            None => seen = Some(now),
            Some(first) => assert_eq!(first, &now, "UDP {msg}: answered differently mid-flow"),
        }
    }
    out.extend(seen);
}

fn tcp_lines(conn: &TcpStream, tag: &str, out: &mut Vec<String>) {
    let mut result = Ok(0);
    for i in 0..EXCHANGES / 2 {
        // Lines of 1 KB: the XDP path carries them and their ACKs.
        let line = format!("{tag}{i}-{}", String::from_utf8(pattern(1000)).unwrap());
        match exchange(conn, &line) {
            Ok(back) if back == line => result = Ok(i + 1),
            Ok(back) => panic!("TCP {tag}{i}: echoed {} bytes, not the line", back.len()),
            Err(e) => {
                result = Err(format!("cut at line {i}: {e}"));
                break;
            }
        }
    }
    out.push(format!("tcp {tag}: {result:?}"));
}

fn changes_body(lab: &Lab) -> Vec<String> {
    let _udp = udp_server(lab, Node::Server, "10.0.2.2:9000", "server");
    let _tcp = line_echo_server(lab, Node::Server, "10.0.2.2:9001");
    add(lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9001"]);
    add(lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    let udp = lab.in_ns(Node::Client, || UdpSocket::bind("10.0.1.2:42000")).unwrap().expect("binding UDP");
    udp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let tcp = lab
        .in_ns(Node::Client, || -> std::io::Result<TcpStream> {
            use socket2::{Domain, Protocol, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            s.bind(&sa("10.0.1.2:41000").into())?;
            s.connect_timeout(&sa("10.0.1.1:8080").into(), TIMEOUT)?;
            Ok(s.into())
        })
        .unwrap()
        .expect("TCP connection");
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(TIMEOUT)).unwrap();
    let mut out = vec![];
    udp_lines(&udp, "dnat-only", &mut out);
    tcp_lines(&tcp, "dnat-only", &mut out);
    let masq = add(lab, &["masquerade", "-o", "eth1"]);
    udp_lines(&udp, "masquerade-added", &mut out);
    tcp_lines(&tcp, "masquerade-added", &mut out);
    pfwd_ok(lab, &["conntrack", "--flush"]);
    udp_lines(&udp, "flushed", &mut out);
    tcp_lines(&tcp, "flushed", &mut out);
    del(lab, masq);
    udp_lines(&udp, "masquerade-deleted", &mut out);
    out
}

#[test]
fn rules_and_flows_changed_mid_flow() {
    compare("xdp-change", changes_body, 100);
}

// ---------------------------------------------------------------------------------------------------------------
// 8. Hairpin NAT: a host on the inside (10.0.2.3, in the server namespace) reaches the backend (10.0.2.2) through
// the router's public address; packets come in and go out on eth1 (the XDP path redirects them to the interface
// they arrived on).

fn hairpin_body(lab: &Lab) -> Vec<String> {
    lab.add_addr(Node::Server, "eth0", "10.0.2.3/24").unwrap_or_else(|e| panic!("{e:#}"));
    // The backend takes packets from 10.0.2.3 as from another host (see hairpin.rs).
    sh(
        lab,
        Node::Server,
        "sysctl -qw net.ipv4.conf.all.accept_local=1 net.ipv4.conf.eth0.accept_local=1 \
         net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0",
    );
    let _tcp = server(lab, Node::Server, "10.0.2.2:9000", "server");
    let _udp = udp_server(lab, Node::Server, "10.0.2.2:9000", "server");
    for proto in ["tcp", "udp"] {
        add(
            lab,
            &[
                "dnat",
                "-p",
                proto,
                "-d",
                "10.0.1.1",
                "--dport",
                "8080",
                "--to",
                "10.0.2.2:9000",
                "--hairpin",
                "10.0.2.0/24",
            ],
        );
    }
    let mut out = vec![];
    for i in 0..2 {
        out.push(tcp_bulk(lab, Node::Server, &format!("10.0.2.3:{}", 41000 + i), "10.0.1.1:8080"));
        out.push(udp_series(lab, Node::Server, &format!("10.0.2.3:{}", 42000 + i), "10.0.1.1:8080"));
        // And from outside, the same rule without the masquerade.
        out.push(tcp_bulk(lab, Node::Client, &format!("10.0.1.2:{}", 43000 + i), "10.0.1.1:8080"));
        out.push(udp_series(lab, Node::Client, &format!("10.0.1.2:{}", 44000 + i), "10.0.1.1:8080"));
    }
    out
}

#[test]
fn hairpin() {
    compare("xdp-hairpin", hairpin_body, 400);
}

// ---------------------------------------------------------------------------------------------------------------
// 9. IPv4 options in the middle of a flow the XDP path forwards. The router's stack acts on them: it writes its
// address into a record-route option, and drops a source-routed datagram (accept_source_route is off on the router;
// the server accepts them, so a datagram that gets through is answered). Datagrams with options must get the same.

/// Sends one UDP datagram of the flow 10.0.1.2:42000 -> 10.0.1.1:8080 from the client, with the IPv4 `options`
/// (a multiple of 4 bytes), built by hand on a raw socket (the kernel fills in the IP checksum; UDP checksum none).
fn send_with_options(lab: &Lab, options: &[u8], payload: &[u8]) {
    use socket2::{Domain, Protocol, Socket, Type};
    assert_eq!(options.len() % 4, 0, "IPv4 options pad to 4 bytes");
    let raw = lab
        .in_ns(Node::Client, || {
            Socket::new(Domain::IPV4, Type::from(libc::SOCK_RAW), Some(Protocol::from(libc::IPPROTO_RAW)))
        })
        .expect("entering the client namespace")
        .expect("raw socket");
    let ihl = (20 + options.len()) / 4;
    let total = (20 + options.len() + 8 + payload.len()) as u16;
    let mut pkt = vec![0x40 | ihl as u8, 0];
    pkt.extend_from_slice(&total.to_be_bytes());
    // Identification, no fragment flags, TTL 64, UDP, checksum (the kernel's), 10.0.1.2 -> 10.0.1.1.
    pkt.extend_from_slice(&[0x12, 0x34, 0, 0, 64, 17, 0, 0, 10, 0, 1, 2, 10, 0, 1, 1]);
    pkt.extend_from_slice(options);
    pkt.extend_from_slice(&42000u16.to_be_bytes());
    pkt.extend_from_slice(&8080u16.to_be_bytes());
    pkt.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    pkt.extend_from_slice(&[0, 0]);
    pkt.extend_from_slice(payload);
    raw.send_to(&pkt, &sa("10.0.1.1:0").into()).expect("sending the raw datagram");
}

fn ip_options_body(lab: &Lab) -> Vec<String> {
    sh(
        lab,
        Node::Server,
        "sysctl -qw net.ipv4.conf.all.accept_source_route=1 net.ipv4.conf.eth0.accept_source_route=1",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let _server = StopOnDrop(stop.clone(), Some(ttl_server(lab, "10.0.2.2:9000", stop)));
    add(lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    let sock = lab
        .in_ns(Node::Client, || UdpSocket::bind("10.0.1.2:42000"))
        .expect("entering the client namespace")
        .expect("binding the client socket");
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 2048];
    let mut reply = |what: &str| -> String {
        match sock.recv_from(&mut buf) {
            Ok((n, src)) => format!("{what}: {} (from {src})", String::from_utf8_lossy(&buf[..n])),
            Err(e) => format!("{what}: no reply ({})", e.kind()),
        }
    };
    let mut out = vec![];
    for i in 0..EXCHANGES / 2 {
        sock.send_to(format!("plain{i}").as_bytes(), sa("10.0.1.1:8080")).unwrap();
        out.push(reply("plain"));
    }
    // Record route with one empty slot (type 7, length 7, pointer 4), then end of options.
    send_with_options(lab, &[7, 7, 4, 0, 0, 0, 0, 0], b"record-route");
    out.push(reply("record route"));
    // Loose source route with no address left (type 131, length 3, pointer 4), then end of options.
    send_with_options(lab, &[131, 3, 4, 0], b"source-route");
    out.push(reply("loose source route"));
    for i in 0..EXCHANGES / 2 {
        sock.send_to(format!("plain{i}").as_bytes(), sa("10.0.1.1:8080")).unwrap();
        out.push(reply("plain"));
    }
    out
}

#[test]
fn ip_options_mid_flow() {
    compare("xdp-ipopt", ip_options_body, 70);
}

/// `--fast-forward` had the same blind spot (its redirect happens before the stack looks at the options).
#[test]
fn ip_options_mid_flow_fast_forward() {
    let tc = run("ff-ipopt", Path::Tc, ip_options_body);
    let ff = run("ff-ipopt", Path::FastForward, ip_options_body);
    assert_eq!(ff.exact, tc.exact, "--fast-forward (left) differs from the tc path without it (right)");
    // The fast path took the plain datagrams (the stack forwarded only the odd first one).
    assert!(ff.by_stack * 10 <= tc.by_stack, "--fast-forward: the stack forwarded {} of {}", ff.by_stack, tc.by_stack);
}

// ---------------------------------------------------------------------------------------------------------------
// 10. A datagram over the next link's MTU in the middle of a flow the XDP path forwards: with DF, the stack's
// "fragmentation needed" error comes back translated; without DF the router fragments it, and the server's large
// reply comes back in fragments. Both go through the tc path; the small datagrams around them through XDP.

fn mtu_body(lab: &Lab) -> Vec<String> {
    sh(lab, Node::Router, "ip link set eth1 mtu 1400");
    sh(lab, Node::Server, "ip link set eth0 mtu 1400");
    let _udp = udp_server(lab, Node::Server, "10.0.2.2:9000", "server");
    add(lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    let sock = lab
        .in_ns(Node::Client, || UdpSocket::bind("10.0.1.2:42000"))
        .expect("entering the client namespace")
        .expect("binding the client socket");
    sock.connect("10.0.1.1:8080").unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    set_int_opt(&sock, libc::IP_RECVERR, 1);
    let mut buf = vec![0u8; 4096];
    let mut exchange = |msg: &str| -> String {
        let res = sock.send(msg.as_bytes()).and_then(|_| sock.recv(&mut buf));
        match res {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                let r = Reply::parse(&text).unwrap_or_else(|| panic!("unparsable reply {text:?}"));
                assert_eq!(r.payload, msg, "a reply to another datagram");
                format!("{} bytes sent: {} port {} saw peer {}", msg.len(), r.label, r.port, r.peer)
            }
            Err(e) => format!("{} bytes sent: {e}", msg.len()),
        }
    };
    let big = String::from_utf8(pattern(1450)).unwrap();
    let mut out = vec![];
    for i in 0..EXCHANGES / 2 {
        out.push(exchange(&format!("small{i}")));
    }
    set_int_opt(&sock, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO);
    let err = exchange(&big);
    assert!(err.ends_with("(os error 90)"), "expected EMSGSIZE from the fragmentation-needed error, got {err}");
    out.push(err);
    set_int_opt(&sock, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT);
    let fragmented = exchange(&big);
    assert!(fragmented.contains("saw peer 10.0.1.2:42000"), "the datagram fragmented by the router: {fragmented}");
    out.push(fragmented);
    for i in 0..EXCHANGES / 2 {
        out.push(exchange(&format!("small{i}")));
    }
    out
}

#[test]
fn mtu_exceeded_mid_flow() {
    compare("xdp-mtu", mtu_body, 70);
}

// ---------------------------------------------------------------------------------------------------------------
// Refusals.

/// What an attach may change on the router, to compare before and after a refused one.
fn footprint(lab: &Lab) -> Vec<String> {
    // A fresh veth reports its carrier asynchronously: wait (bounded) for the lab's links to be up.
    for _ in 0..100 {
        if !sh(lab, Node::Router, "ip -o link show eth0; ip -o link show eth1").contains("NO-CARRIER") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    vec![
        sh(lab, Node::Router, "ip -d link show"),
        format!("{:?} {:?}", tcx_programs(lab, "eth0"), tcx_programs(lab, "eth1")),
        sh(lab, Node::Router, "sysctl -a 2>/dev/null | grep -E 'forwarding|route_localnet' | sort"),
        sh(lab, Node::Router, "iptables-save 2>/dev/null | grep -v '^#' || true"),
        sh(lab, Node::Router, "nft list ruleset 2>/dev/null || true"),
        format!("pins {}, state {}", pin_dir(lab).exists(), state_dir(lab).exists()),
    ]
}

/// `--xdp` is eBPF's: refused with the iptables data path, for a new instance and for an existing one, naming
/// `--xdp`, and nothing changes.
#[test]
fn xdp_refused_with_iptables() {
    let lab = lab("xdp-ipt");
    let before = footprint(&lab);
    let guard = Detach::new(&lab);
    pfwd_err(&lab, &["attach", "--mode", "iptables", "--xdp", "eth0", "eth1"], &["--xdp"]);
    assert_eq!(footprint(&lab), before, "a refused attach changes nothing");

    pfwd_ok(&lab, &["attach", "--mode", "iptables", "eth0", "eth1"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    let (before, st) = (footprint(&lab), status(&lab));
    pfwd_err(&lab, &["attach", "--xdp", "eth0", "eth1"], &["--xdp", "iptables"]);
    assert_eq!(footprint(&lab), before, "a refused attach changes nothing");
    assert_eq!(status(&lab)["interfaces"], st["interfaces"]);
    guard.detach();
}

/// `--xdp` on a layer-3 device (tun: packets start at the IP header, as on WireGuard) is refused naming it, and
/// nothing is left attached, not even to the Ethernet interface named with it.
#[test]
fn xdp_refused_on_a_layer3_interface() {
    let lab = lab("xdp-l3");
    sh(
        &lab,
        Node::Router,
        "ip tuntap add dev tun0 mode tun && ip addr add 10.8.0.1/24 dev tun0 && ip link set tun0 up",
    );
    let before = footprint(&lab);
    let _guard = Detach::new(&lab);
    pfwd_err(&lab, &["attach", "--mode", "ebpf", "--xdp", "tun0"], &["--xdp", "tun0"]);
    assert_eq!(footprint(&lab), before, "a refused attach changes nothing");
    pfwd_err(&lab, &["attach", "--mode", "ebpf", "--xdp", "eth0", "tun0"], &["--xdp", "tun0"]);
    assert_eq!(footprint(&lab), before, "a refused attach changes nothing");
    assert!(!has_xdp(&lab, "eth0"), "no XDP program left on eth0");
}

/// In auto mode (no `--mode`), a refused `--xdp` is reported as such: not answered by falling back to a netfilter
/// data path, which has no XDP fast path, and succeeding without it.
#[test]
fn xdp_refusal_is_not_a_netfilter_fallback_in_auto_mode() {
    let lab = lab("xdp-auto");
    sh(
        &lab,
        Node::Router,
        "ip tuntap add dev tun0 mode tun && ip addr add 10.8.0.1/24 dev tun0 && ip link set tun0 up",
    );
    let before = footprint(&lab);
    let _guard = Detach::new(&lab);
    pfwd_err(&lab, &["attach", "--xdp", "eth0", "tun0"], &["--xdp", "tun0"]);
    assert_eq!(footprint(&lab), before, "a refused attach changes nothing");
}
