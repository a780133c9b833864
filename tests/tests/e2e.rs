//! End-to-end tests: real pfwd commands in a client / router / server namespace lab (see `tests::lab`), real
//! sockets, and checks of what the kernel and the clients see. Every test builds its own lab, so they run in
//! parallel; every attach is paired with a `Detach` guard that runs `pfwd detach` even when an assertion fails.
//!
//! Each scenario takes the data-path mode (`pfwd attach --mode MODE`) so the same body can run for every mode;
//! the `*_ebpf` wrappers at the bottom run them in eBPF mode. Checks of the eBPF mechanics themselves (tcx links,
//! bpffs pins) only run in that mode.
//!
//! Needs root and a built pfwd: `cargo build -p pfwd && PFWD_BIN=target/debug/pfwd cargo test -p tests --test e2e`.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tests::{Lab, Node, TIMEOUT};

/// The saved-sysctl entry for `key` (e.g. `net/ipv4/ip_forward`) in a `status --json`, if any.
fn saved_sysctl<'a>(status: &'a Value, key: &str) -> Option<&'a Value> {
    status["sysctls"].as_array()?.iter().find(|s| s["key"] == key)
}

/// Everything of a `status --json` that must not change without traffic (drops `stats` and `conntrack`).
fn stable(status: &Value) -> Value {
    let mut v = status.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("stats");
        o.remove("conntrack");
    }
    v
}

// ---------------------------------------------------------------------------------------------------------------
// 1. REDIRECT to a local port.

fn redirect(mode: &str) {
    let lab = lab("e2e-redir");
    let _web = server(&lab, Node::Router, "10.0.1.1:80", "web");
    let _app = server(&lab, Node::Router, "0.0.0.0:3000", "app");
    let _dns = udp_server(&lab, Node::Router, "0.0.0.0:5000", "udp5000");
    // Plain access first: nothing listens on 59999.
    expect_tcp_fails(&lab, "10.0.1.1:59999");

    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["redirect", "-p", "tcp", "--dport", "59999", "--to-port", "80"]);
    add(&lab, &["redirect", "-p", "tcp", "--dport", "80", "--to-port", "3000"]);
    add(&lab, &["redirect", "-p", "udp", "--dport", "5353", "--to-port", "5000"]);

    // 59999 -> 80 reaches the web server (not redirected again to 3000: one translation per flow).
    expect_tcp(&lab, None, "10.0.1.1:59999", "web", 80, "10.0.1.2");
    // 80 -> 3000 reaches the app server.
    expect_tcp(&lab, None, "10.0.1.1:80", "app", 3000, "10.0.1.2");
    // UDP: the reply must come back from 10.0.1.1:5353, the address the client sent to.
    expect_udp(&lab, None, "10.0.1.1:5353", "udp5000", 5000, "10.0.1.2");
    // A port without a rule is untouched.
    expect_tcp(&lab, None, "10.0.1.1:3000", "app", 3000, "10.0.1.2");
    // Redirect is local: no forwarding needed.
    assert_eq!(router_sysctl(&lab, "net.ipv4.ip_forward"), "0", "redirect must not enable ip_forward");

    let st = status(&lab);
    for r in st["rules"].as_array().unwrap() {
        assert!(r["packets"].as_u64().unwrap() > 0, "rule {} saw no packets: {st:#}", r["id"]);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 2. DNAT to a service bound only to 127.0.0.1 (needs route_localnet on the incoming interface).

fn dnat_loopback(mode: &str) {
    let lab = lab("e2e-lo");
    let _svc = server(&lab, Node::Router, "127.0.0.1:17355", "local");
    let localnet = |dev: &str| router_sysctl(&lab, &format!("net.ipv4.conf.{dev}.route_localnet"));
    assert_eq!((localnet("eth0"), localnet("eth1")), ("0".into(), "0".into()), "lab starts with route_localnet=0");
    expect_tcp_fails(&lab, "10.0.1.1:17355");

    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    assert_eq!(localnet("eth0"), "0", "attach without rules must not change route_localnet");
    let id = add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "59999", "--to", "127.0.0.1:17355"]);
    assert_eq!(localnet("eth0"), "1", "route_localnet on eth0 while a rule DNATs eth0 to loopback");
    assert_eq!(localnet("eth1"), "0", "the rule is -i eth0: eth1 must keep route_localnet=0");
    let st = status(&lab);
    let saved = saved_sysctl(&st, "net/ipv4/conf/eth0/route_localnet")
        .unwrap_or_else(|| panic!("status must list route_localnet of eth0: {st:#}"));
    assert_eq!(saved["previous"], "0");
    assert!(!saved["reason"].as_str().unwrap_or("").is_empty(), "no reason given: {saved}");

    expect_tcp(&lab, None, "10.0.1.1:59999", "local", 17355, "10.0.1.2");
    // The service itself stays unreachable on its own port from outside.
    expect_tcp_fails(&lab, "10.0.1.1:17355");

    // Deleting the only rule that needs it restores the sysctl; adding it again sets it again.
    del(&lab, id);
    assert_eq!(localnet("eth0"), "0", "route_localnet restored once no rule needs it");
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "59999", "--to", "127.0.0.1:17355"]);
    assert_eq!(localnet("eth0"), "1");
    expect_tcp(&lab, None, "10.0.1.1:59999", "local", 17355, "10.0.1.2");

    guard.detach();
    assert_eq!((localnet("eth0"), localnet("eth1")), ("0".into(), "0".into()), "route_localnet after detach");
    expect_tcp_fails(&lab, "10.0.1.1:59999");
}

// ---------------------------------------------------------------------------------------------------------------
// 3. DNAT to the server behind the router (needs ip_forward).

fn dnat_to_server(mode: &str) {
    let lab = lab("e2e-dnat");
    let _tcp = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _udp = udp_server(&lab, Node::Server, "10.0.2.2:9000", "server");
    assert_eq!(router_sysctl(&lab, "net.ipv4.ip_forward"), "0");
    expect_tcp_fails(&lab, "10.0.1.1:8080");

    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    assert_eq!(router_sysctl(&lab, "net.ipv4.ip_forward"), "0", "attach alone must not enable forwarding");
    let t = add(&lab, &["dnat", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    let u = add(&lab, &["dnat", "-p", "udp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    assert_eq!(router_sysctl(&lab, "net.ipv4.ip_forward"), "1", "ip_forward while a rule forwards to another host");

    // The server sees the real client address (DNAT only, no masquerade).
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    expect_udp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    // Several flows in a row, each with a new source port.
    for _ in 0..5 {
        expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
        expect_udp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    }

    let st = status(&lab);
    let saved = saved_sysctl(&st, "net/ipv4/ip_forward")
        .unwrap_or_else(|| panic!("status --json sysctls must list ip_forward: {st:#}"));
    assert_eq!(saved["previous"], "0", "{saved}");
    assert!(!saved["reason"].as_str().unwrap_or("").trim().is_empty(), "ip_forward listed without a reason: {saved}");
    assert_eq!(rule_of(&st, t)["flows"], 6, "tcp rule flows: {st:#}");
    assert_eq!(rule_of(&st, u)["flows"], 6, "udp rule flows: {st:#}");
    assert_eq!(rule_of(&st, t)["kind"], "dnat");
    assert_eq!(rule_of(&st, t)["to"], "10.0.2.2");
    assert_eq!(rule_of(&st, t)["to_port"], 9000);

    guard.detach();
    assert_eq!(router_sysctl(&lab, "net.ipv4.ip_forward"), "0", "ip_forward restored after detach");
    expect_tcp_fails(&lab, "10.0.1.1:8080");
    assert!(lab.udp_request(Node::Client, sa("10.0.1.1:8080"), "x", SHORT).is_err(), "UDP still forwarded");
}

// ---------------------------------------------------------------------------------------------------------------
// 3b. Packets with partial checksums (CHECKSUM_PARTIAL): the client and the server hand the router packets whose
// L4 checksums their NICs would finish (tx checksumming on at their veths). The router translates them, and its own
// veths (offloads off) finish each checksum in software before the packet leaves, so the receivers (rx checksumming
// off) check it: one the translation got wrong is dropped, and the request fails. The eBPF path updates checksums
// by hand only for other skbs, and leaves these to `bpf_l4_csum_replace`, which knows them.

fn partial_checksums(mode: &str) {
    let lab = lab("e2e-partial");
    for node in [Node::Client, Node::Server] {
        lab.sh(node, "ethtool -K eth0 tx on >/dev/null").unwrap();
    }
    let _tcp = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _udp = udp_server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    // This kernel has what the by-hand path needs; the netfilter modes have no such setting.
    let by_hand = if mode == "ebpf" { serde_json::json!("by-hand-where-safe") } else { Value::Null };
    assert_eq!(status(&lab)["l4_checksums"], by_hand);
    // DNAT: the destination rewritten at ingress, replies restored at egress.
    add(&lab, &["dnat", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    add(&lab, &["dnat", "-p", "udp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    for _ in 0..3 {
        expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
        expect_udp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    }
    // And MASQUERADE: the source rewritten at egress too, replies restored at ingress.
    add(&lab, &["masquerade", "-o", "eth1"]);
    for _ in 0..3 {
        expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.2.1");
        expect_udp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.2.1");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Source-filtered DNAT.

fn source_filter(mode: &str) {
    let lab = lab("e2e-src");
    for a in ["192.168.1.1/24", "192.168.1.77/24", "192.168.2.1/24"] {
        lab.add_addr(Node::Client, "eth0", a).unwrap();
    }
    // The router reaches the extra client networks through the client (the server's replies go via the router).
    lab.add_route(Node::Router, "192.168.1.0/24", "10.0.1.2").unwrap();
    lab.add_route(Node::Router, "192.168.2.0/24", "10.0.1.2").unwrap();
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _local = server(&lab, Node::Router, "0.0.0.0:8080", "router");
    // Without pfwd every source reaches the router's own port 8080.
    for from in ["192.168.1.1", "192.168.2.1", "10.0.1.2"] {
        expect_tcp(&lab, Some(from), "10.0.1.1:8080", "router", 8080, from);
    }

    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    // A single source address.
    let id = add(&lab, &["dnat", "-s", "192.168.1.1", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    assert_eq!(rule_of(&status(&lab), id)["src"], "192.168.1.1/32");
    expect_tcp(&lab, Some("192.168.1.1"), "10.0.1.1:8080", "server", 9000, "192.168.1.1");
    expect_tcp(&lab, Some("192.168.1.77"), "10.0.1.1:8080", "router", 8080, "192.168.1.77");
    expect_tcp(&lab, Some("192.168.2.1"), "10.0.1.1:8080", "router", 8080, "192.168.2.1");
    expect_tcp(&lab, Some("10.0.1.2"), "10.0.1.1:8080", "router", 8080, "10.0.1.2");
    del(&lab, id);

    // A source network.
    let id = add(&lab, &["dnat", "-s", "192.168.1.0/24", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    assert_eq!(rule_of(&status(&lab), id)["src"], "192.168.1.0/24");
    expect_tcp(&lab, Some("192.168.1.1"), "10.0.1.1:8080", "server", 9000, "192.168.1.1");
    expect_tcp(&lab, Some("192.168.1.77"), "10.0.1.1:8080", "server", 9000, "192.168.1.77");
    expect_tcp(&lab, Some("192.168.2.1"), "10.0.1.1:8080", "router", 8080, "192.168.2.1");
    expect_tcp(&lab, Some("10.0.1.2"), "10.0.1.1:8080", "router", 8080, "10.0.1.2");
    // UDP is not matched by a -p tcp rule.
    let _udp = udp_server(&lab, Node::Server, "10.0.2.2:9000", "server");
    assert!(
        lab.udp_request_from(Node::Client, ip("192.168.1.1"), sa("10.0.1.1:8080"), "x", SHORT).is_err(),
        "UDP from 192.168.1.1 to :8080 must not be forwarded by a -p tcp rule"
    );
    let st = status(&lab);
    assert_eq!(rule_of(&st, id)["flows"], 2, "only the two 192.168.1.x connections match: {st:#}");
}

// ---------------------------------------------------------------------------------------------------------------
// 5. Destination filters, and IP-only DNAT (TCP, UDP and ICMP echo).

fn destination_filter(mode: &str) {
    let lab = lab("e2e-dst");
    lab.add_addr(Node::Router, "eth0", "203.0.113.10/32").unwrap(); // the client reaches it by its default route
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _srv_udp = udp_server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _local = server(&lab, Node::Router, "0.0.0.0:8080", "router");
    expect_tcp(&lab, None, "203.0.113.10:8080", "router", 8080, "10.0.1.2");

    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    // -d ADDR
    let id = add(&lab, &["dnat", "-d", "10.0.1.1", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    expect_tcp(&lab, None, "203.0.113.10:8080", "router", 8080, "10.0.1.2");
    del(&lab, id);
    // -d CIDR
    let id = add(&lab, &["dnat", "-d", "203.0.113.0/24", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    expect_tcp(&lab, None, "203.0.113.10:8080", "server", 9000, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:8080", "router", 8080, "10.0.1.2");
    del(&lab, id);

    // IP-only DNAT (no protocol, no port): every protocol to 203.0.113.10 goes to the server, ports kept.
    // The router ignores echo requests itself, so an echo reply can only come from the server.
    sh(&lab, Node::Router, "sysctl -qw net.ipv4.icmp_echo_ignore_all=1");
    let public = Ipv4Addr::new(203, 0, 113, 10);
    assert_eq!(icmp_echo(&lab, Node::Client, public, SHORT), None, "router must not answer pings itself");
    let id = add(&lab, &["dnat", "-d", "203.0.113.10", "--to", "10.0.2.2"]);
    expect_tcp(&lab, None, "203.0.113.10:9000", "server", 9000, "10.0.1.2");
    expect_udp(&lab, None, "203.0.113.10:9000", "server", 9000, "10.0.1.2");
    // Flows count the same in both modes (iptables' NAT rules see only the first packet of each connection).
    let before = rule_of(&status(&lab), id)["flows"].as_u64().unwrap();
    assert_eq!(
        icmp_echo(&lab, Node::Client, public, TIMEOUT),
        Some(public),
        "ICMP echo to 203.0.113.10 must be answered (by the server) from 203.0.113.10"
    );
    let after = rule_of(&status(&lab), id)["flows"].as_u64().unwrap();
    assert_eq!(after, before + 1, "the echo must be counted as one flow of the rule");
    // The rule's destination does not cover the router's other address.
    expect_tcp_fails(&lab, "10.0.1.1:9000");
    expect_tcp(&lab, None, "10.0.1.1:8080", "router", 8080, "10.0.1.2");
}

// ---------------------------------------------------------------------------------------------------------------
// 6. Port ranges, to one port and keeping the port.

fn port_ranges(mode: &str) {
    let lab = lab("e2e-range");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _s8000 = server(&lab, Node::Server, "10.0.2.2:8000", "server");
    let _s8050 = server(&lab, Node::Server, "10.0.2.2:8050", "server");
    let _below = server(&lab, Node::Router, "0.0.0.0:7999", "router");
    let _above = server(&lab, Node::Router, "0.0.0.0:8100", "router");

    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    let id = add(&lab, &["dnat", "-p", "tcp", "--dport", "8000-8099", "--to", "10.0.2.2:9000"]);
    for port in [8000, 8001, 8042, 8098, 8099] {
        expect_tcp(&lab, None, &format!("10.0.1.1:{port}"), "server", 9000, "10.0.1.2");
    }
    expect_tcp(&lab, None, "10.0.1.1:7999", "router", 7999, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:8100", "router", 8100, "10.0.1.2");
    assert_eq!(rule_of(&status(&lab), id)["dport"], "8000-8099");
    del(&lab, id);

    // Keep the port: ADDR without :PORT.
    add(&lab, &["dnat", "-p", "tcp", "--dport", "8000-8099", "--to", "10.0.2.2"]);
    expect_tcp(&lab, None, "10.0.1.1:8000", "server", 8000, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:8050", "server", 8050, "10.0.1.2");
    // Nothing listens on 10.0.2.2:8051: forwarded, hence refused by the server.
    expect_tcp_fails(&lab, "10.0.1.1:8051");
    expect_tcp(&lab, None, "10.0.1.1:8100", "router", 8100, "10.0.1.2");
}

// ---------------------------------------------------------------------------------------------------------------
// 7. Many concurrent connections.

fn many_connections(mode: &str) {
    const THREADS: usize = 20;
    const PER_THREAD: usize = 10;
    const HELD: usize = 20;
    let lab = lab("e2e-many");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    let id = add(&lab, &["dnat", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);

    let started = Instant::now();
    let failures: Vec<String> = thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let lab = &lab;
                s.spawn(move || {
                    let mut errors = vec![];
                    for i in 0..PER_THREAD {
                        let payload = format!("t{t}-c{i}");
                        match lab.tcp_request(Node::Client, sa("10.0.1.1:8080"), &payload, Duration::from_secs(5)) {
                            Ok(text) => match tests::Reply::parse(&text) {
                                Some(r)
                                    if r.label == "server"
                                        && r.port == 9000
                                        && r.payload == payload
                                        && r.peer.ip() == ip("10.0.1.2") => {}
                                _ => errors.push(format!("{payload}: wrong reply {text:?}")),
                            },
                            Err(e) => errors.push(format!("{payload}: {e:#}")),
                        }
                    }
                    errors
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("worker panicked")).collect()
    });
    eprintln!("{} connections in {:?}", THREADS * PER_THREAD, started.elapsed());
    assert!(failures.is_empty(), "{} of {} connections failed: {failures:#?}", failures.len(), THREADS * PER_THREAD);

    // Connections held open while status is read: each is a live conntrack flow.
    let held: Vec<std::net::TcpStream> = lab
        .in_ns(Node::Client, || {
            (0..HELD)
                .map(|_| std::net::TcpStream::connect_timeout(&sa("10.0.1.1:8080"), TIMEOUT))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .expect("opening connections to hold");
    let st = status(&lab);
    drop(held);
    let total = (THREADS * PER_THREAD + HELD) as u64;
    assert_eq!(rule_of(&st, id)["flows"], total, "rule flows after {total} connections: {st:#}");
    let live = st["conntrack"]["flows"].as_u64().unwrap();
    assert!(live >= HELD as u64, "conntrack shows {live} flows with {HELD} connections open: {:#}", st["conntrack"]);
    assert!(st["conntrack"]["entries"].as_u64().unwrap() >= live, "fewer entries than flows: {:#}", st["conntrack"]);
}

// ---------------------------------------------------------------------------------------------------------------
// 8. Detach restores the exact previous state.

/// What pfwd may touch in the router namespace, as text.
#[derive(Debug, PartialEq)]
struct Snapshot {
    sysctls: BTreeMap<String, String>,
    links: String,
    qdiscs: String,
    tcx_eth0: BTreeMap<String, usize>,
    tcx_eth1: BTreeMap<String, usize>,
    pins: Vec<String>,
    pin_dir: bool,
    state_dir: bool,
    iptables: String,
    /// ip6tables-save, and nftables' list of tables (nft mode's table, and the tables iptables-nft makes; their
    /// empty built-in chains that iptables-nft adds and iptables-save always shows are not compared).
    ip6tables: String,
    nft: String,
}

fn snapshot(lab: &Lab) -> Snapshot {
    // A fresh veth reports its carrier asynchronously: wait (bounded) until both links are up, so the link
    // flags compared below do not depend on timing.
    for _ in 0..100 {
        let links = sh(lab, Node::Router, "ip -o link show");
        if !links.contains("NO-CARRIER") && links.lines().filter(|l| l.contains("state UP")).count() == 2 {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let keys = [
        "net.ipv4.ip_forward",
        "net.ipv4.conf.all.route_localnet",
        "net.ipv4.conf.eth0.route_localnet",
        "net.ipv4.conf.eth1.route_localnet",
        "net.ipv4.conf.eth0.forwarding",
        "net.ipv4.conf.eth1.forwarding",
        "net.ipv4.conf.all.rp_filter",
    ];
    Snapshot {
        sysctls: keys.iter().map(|k| (k.to_string(), router_sysctl(lab, k))).collect(),
        links: sh(lab, Node::Router, "ip -d link show"),
        qdiscs: sh(
            lab,
            Node::Router,
            "tc qdisc show; tc filter show dev eth0 ingress; tc filter show dev eth1 ingress",
        ),
        tcx_eth0: tcx_programs(lab, "eth0"),
        tcx_eth1: tcx_programs(lab, "eth1"),
        pins: files_in(&pin_dir(lab)),
        pin_dir: pin_dir(lab).exists(),
        state_dir: state_dir(lab).exists(),
        // The iptables mode's footprint; empty when iptables-save is missing.
        iptables: sh(lab, Node::Router, "command -v iptables-save >/dev/null && iptables-save | grep -v '^#' || true"),
        ip6tables: sh(
            lab,
            Node::Router,
            "command -v ip6tables-save >/dev/null && ip6tables-save | grep -v '^#' || true",
        ),
        nft: sh(lab, Node::Router, "command -v nft >/dev/null && nft list tables || true"),
    }
}

fn detach_restores_state(mode: &str) {
    let lab = lab("e2e-restore");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _svc = server(&lab, Node::Router, "127.0.0.1:17355", "local");
    let before = snapshot(&lab);
    assert!(!before.pin_dir && before.pins.is_empty(), "pins before attach: {before:?}");
    assert!(before.tcx_eth0.is_empty(), "tcx programs before attach: {before:?}");

    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "3306", "--to", "127.0.0.1:17355"]);
    add(&lab, &["redirect", "-p", "udp", "--dport", "5353", "--to-port", "5000"]);
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:3306", "local", 17355, "10.0.1.2");
    let during = snapshot(&lab);
    assert_eq!(during.sysctls["net.ipv4.ip_forward"], "1");
    assert_eq!(during.sysctls["net.ipv4.conf.eth0.route_localnet"], "1");
    if mode == "ebpf" {
        let st = status(&lab);
        assert_eq!(st["pin_dir"].as_str(), Some(pin_dir(&lab).to_str().unwrap()), "status pin_dir");
        assert!(during.pin_dir && !during.pins.is_empty(), "no pins while attached: {during:?}");
        for dev in ["eth0", "eth1"] {
            for dir in ["ingress", "egress"] {
                let pin = format!("link_{dev}_{dir}");
                assert!(during.pins.contains(&pin), "{pin} missing from {:?}", during.pins);
            }
        }
        let want = pfwd_tcx();
        assert_eq!(during.tcx_eth0, want, "tcx programs on eth0 while attached");
        assert_eq!(during.tcx_eth1, want, "tcx programs on eth1 while attached");
    }

    let notes = guard.detach();
    let after = snapshot(&lab);
    assert_eq!(after, before, "detach must restore the state before attach (detach said: {notes})");
    assert!(!Path::new(&pin_dir(&lab)).exists(), "pin dir left behind");
    assert_eq!(status(&lab)["attached"], false);
    assert_eq!(list(&lab), serde_json::json!([]));
    expect_tcp_fails(&lab, "10.0.1.1:8080");
    expect_tcp_fails(&lab, "10.0.1.1:3306");
    // A second detach is harmless.
    pfwd_ok(&lab, &["detach"]);
    assert_eq!(snapshot(&lab), before);
}

fn detach_keeps_preexisting_sysctls(mode: &str) {
    let lab = lab("e2e-keep");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _svc = server(&lab, Node::Router, "127.0.0.1:17355", "local");
    // Set by the administrator before pfwd: pfwd must find them as they are and leave them so.
    sh(&lab, Node::Router, "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.eth0.route_localnet=1");
    let before = snapshot(&lab);

    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    let id = add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "3306", "--to", "127.0.0.1:17355"]);
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:3306", "local", 17355, "10.0.1.2");
    let st = status(&lab);
    assert!(
        saved_sysctl(&st, "net/ipv4/ip_forward").is_none_or(|s| s["previous"] == "1"),
        "ip_forward was already 1: {:#}",
        st["sysctls"]
    );
    del(&lab, id);
    assert_eq!(router_sysctl(&lab, "net.ipv4.ip_forward"), "1", "deleting the rule must not turn off ip_forward");

    guard.detach();
    assert_eq!(router_sysctl(&lab, "net.ipv4.ip_forward"), "1", "ip_forward was 1 before attach");
    assert_eq!(router_sysctl(&lab, "net.ipv4.conf.eth0.route_localnet"), "1", "route_localnet was 1 before attach");
    assert_eq!(snapshot(&lab), before);
}

// ---------------------------------------------------------------------------------------------------------------
// 9. Two instances in two namespaces at once.

fn two_instances(mode: &str) {
    let a = lab("e2e-two-a");
    let b = lab("e2e-two-b");
    let _a_srv = server(&a, Node::Server, "10.0.2.2:9000", "server-a");
    let _a_web = server(&a, Node::Router, "0.0.0.0:80", "web-a");
    let _b_srv = server(&b, Node::Server, "10.0.2.2:9000", "server-b");
    let _b_web = server(&b, Node::Router, "0.0.0.0:80", "web-b");

    let guard_a = attach(&a, mode, &["eth0", "eth1"]);
    let _guard_b = attach(&b, mode, &["eth0", "eth1"]);
    let ra = add(&a, &["dnat", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    let rb1 = add(&b, &["redirect", "-p", "tcp", "--dport", "8080", "--to-port", "80"]);
    let rb2 = add(&b, &["redirect", "-p", "udp", "--dport", "5353", "--to-port", "53"]);
    assert_ne!(
        pin_dir(&a),
        pin_dir(&b),
        "two namespaces must have two pin directories (status: {} / {})",
        status(&a)["pin_dir"],
        status(&b)["pin_dir"]
    );

    // Both at the same time, from two threads.
    thread::scope(|s| {
        let ta = s.spawn(|| {
            for _ in 0..10 {
                expect_tcp(&a, None, "10.0.1.1:8080", "server-a", 9000, "10.0.1.2");
            }
        });
        let tb = s.spawn(|| {
            for _ in 0..10 {
                expect_tcp(&b, None, "10.0.1.1:8080", "web-b", 80, "10.0.1.2");
            }
        });
        ta.join().unwrap();
        tb.join().unwrap();
    });

    let ids = |lab: &Lab| -> Vec<(u64, String)> {
        list(lab)
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["id"].as_u64().unwrap(), r["kind"].as_str().unwrap().to_string()))
            .collect()
    };
    assert_eq!(ids(&a), vec![(u64::from(ra), "dnat".to_string())], "lab A lists only its own rule");
    assert_eq!(
        ids(&b),
        vec![(u64::from(rb1), "redirect".to_string()), (u64::from(rb2), "redirect".to_string())],
        "lab B lists only its own rules"
    );
    assert_eq!(rule_of(&status(&a), ra)["flows"], 10);
    assert_eq!(rule_of(&status(&b), rb1)["flows"], 10);
    assert_eq!(router_sysctl(&a, "net.ipv4.ip_forward"), "1");
    assert_eq!(router_sysctl(&b, "net.ipv4.ip_forward"), "0", "B only redirects: its ip_forward stays 0");

    guard_a.detach();
    assert_eq!(status(&a)["attached"], false);
    assert_eq!(router_sysctl(&a, "net.ipv4.ip_forward"), "0");
    expect_tcp(&a, None, "10.0.1.1:80", "web-a", 80, "10.0.1.2");
    expect_tcp_fails(&a, "10.0.1.1:8080");
    // B is untouched.
    assert_eq!(status(&b)["attached"], true);
    assert_eq!(ids(&b).len(), 2);
    if mode == "ebpf" {
        assert!(pin_dir(&b).exists(), "detaching A removed B's pins");
    }
    for _ in 0..3 {
        expect_tcp(&b, None, "10.0.1.1:8080", "web-b", 80, "10.0.1.2");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 10. CLI errors change nothing.

fn cli_errors(mode: &str) {
    let lab = lab("e2e-cli");
    // Before attach.
    let _guard = Detach::new(&lab);
    pfwd_err(&lab, &["add", "dnat", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"], &["not attached"]);
    pfwd_err(&lab, &["attach", "--mode", mode, "nosuch0"], &["nosuch0"]);
    pfwd_err(&lab, &["attach", "--mode", mode, "eth0", "nosuch0"], &["nosuch0"]);
    pfwd_err(&lab, &["del", "1"], &["not attached"]);
    assert_eq!(status(&lab)["attached"], false, "a failed attach must leave nothing attached");
    assert!(!pin_dir(&lab).exists(), "a failed attach left pins in {}", pin_dir(&lab).display());
    assert!(!state_dir(&lab).exists(), "a failed attach left state in {}", state_dir(&lab).display());
    assert!(tcx_programs(&lab, "eth0").is_empty(), "a failed attach left programs on eth0");
    assert_eq!(router_sysctl(&lab, "net.ipv4.ip_forward"), "0");

    pfwd_ok(&lab, &["attach", "--mode", mode, "eth0"]);
    let id = add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    assert_eq!(id, 1);
    let base = stable(&status(&lab));
    let base_list = list(&lab);
    let base_tcx = (tcx_programs(&lab, "eth0"), tcx_programs(&lab, "eth1"));
    let base_forward = router_sysctl(&lab, "net.ipv4.ip_forward");

    let dnat = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = vec!["add", "dnat"];
        v.extend_from_slice(extra);
        v
    };
    #[rustfmt::skip]
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["attach", "--mode", mode, "nosuch0"], vec!["nosuch0"]),
        (vec!["attach", "--mode", mode, "eth1", "nosuch0"], vec!["nosuch0"]),
        (vec!["attach", "--mode", "bogus", "eth1"], vec!["bogus"]),
        (dnat(&["-s", "10.0.0.0/33", "-p", "tcp", "--dport", "81", "--to", "10.0.2.2"]), vec!["10.0.0.0/33"]),
        (dnat(&["-s", "300.1.1.1", "-p", "tcp", "--dport", "81", "--to", "10.0.2.2"]), vec!["300.1.1.1"]),
        (dnat(&["-d", "10.0.1", "-p", "tcp", "--dport", "81", "--to", "10.0.2.2"]), vec!["10.0.1", "cidr"]),
        (dnat(&["-d", "10.0.0.0/255.0.255.0", "--to", "10.0.2.2"]), vec!["255.0.255.0"]),
        (dnat(&["-p", "tcp", "--dport", "70000", "--to", "10.0.2.2"]), vec!["70000"]),
        (dnat(&["-p", "tcp", "--dport", "0", "--to", "10.0.2.2"]), vec!["port"]),
        (dnat(&["-p", "tcp", "--dport", "9000-8000", "--to", "10.0.2.2"]), vec!["9000-8000"]),
        (dnat(&["-p", "tcp", "--dport", "80-", "--to", "10.0.2.2"]), vec!["80-"]),
        (dnat(&["-p", "tcp", "--dport", "http", "--to", "10.0.2.2"]), vec!["http"]),
        (dnat(&["--dport", "8081", "--to", "10.0.2.2"]), vec!["--dport", "-p"]),
        (dnat(&["--to", "10.0.2.2:9000"]), vec!["-p"]),
        (dnat(&["-p", "icmp", "--to", "10.0.2.2"]), vec!["icmp"]),
        (dnat(&["-p", "tcp", "--dport", "81", "--to", "10.0.2.2:70000"]), vec!["70000"]),
        (dnat(&["-p", "tcp", "--dport", "81", "--to", "10.0.2.2:0"]), vec!["port 0"]),
        (dnat(&["-p", "tcp", "--dport", "81", "--to", "10.0.2.256"]), vec!["10.0.2.256"]),
        (dnat(&["-p", "tcp", "--dport", "81", "--to", "255.255.255.255"]), vec!["255.255.255.255"]),
        (dnat(&["-p", "tcp", "--dport", "81"]), vec!["--to"]),
        (dnat(&["-i", "eth1", "-p", "tcp", "--dport", "81", "--to", "10.0.2.2"]), vec!["eth1", "attach"]),
        (dnat(&["-i", "eth0+", "-p", "tcp", "--dport", "81", "--to", "10.0.2.2"]), vec!["eth0+"]),
        (dnat(&["-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]), vec!["duplicate", "1"]),
        (vec!["add", "redirect", "--dport", "80", "--to-port", "3000"], vec!["-p"]),
        (vec!["add", "redirect", "-p", "tcp", "--dport", "80", "--to-port", "0"], vec!["port 0"]),
        (vec!["add", "redirect", "-p", "tcp", "--dport", "80", "--to-port", "65536"], vec!["65536"]),
        (vec!["add", "netmap", "--to", "10.0.2.0/24"], vec!["netmap"]),
        (vec!["add", "masquerade", "--to-ports", "1024-2047"], vec!["-p"]),
        (vec!["del", "99"], vec!["99"]),
        (vec!["del", "abc"], vec!["abc"]),
    ];
    for (args, needles) in &cases {
        let out = pfwd_err(&lab, args, needles);
        let now = stable(&status(&lab));
        assert_eq!(now, base, "`pfwd {}` failed ({}) but changed the status", args.join(" "), out.stderr.trim());
        assert_eq!(list(&lab), base_list, "`pfwd {}` changed the rule list", args.join(" "));
        assert_eq!(router_sysctl(&lab, "net.ipv4.ip_forward"), base_forward, "`pfwd {}`", args.join(" "));
        assert_eq!(
            (tcx_programs(&lab, "eth0"), tcx_programs(&lab, "eth1")),
            base_tcx,
            "`pfwd {}` changed the attached programs",
            args.join(" ")
        );
    }
    // The next rule still gets the next id: failed adds consume none.
    let next = add(&lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    assert_eq!(next, 2, "failed adds must not consume rule ids");
}

// ---------------------------------------------------------------------------------------------------------------
// 11. `ip netns exec` (which remounts /sys, hiding the bpffs) either works or points to nsenter.

fn ip_netns_exec(mode: &str) {
    let lab = lab("e2e-ipnetns");
    let _guard = attach(&lab, mode, &["eth0"]);
    add(&lab, &["redirect", "-p", "tcp", "--dport", "59999", "--to-port", "80"]);
    let before = stable(&status(&lab));
    let bin = tests::pfwd_bin().unwrap();

    for args in [&["status"][..], &["status", "--json"], &["list"]] {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", lab.ns(Node::Router)]).arg(&bin).args(args);
        let out = run_bounded(cmd, PFWD_TIMEOUT);
        if out.success {
            assert!(
                out.stdout.contains("59999"),
                "`ip netns exec ... pfwd {}` succeeded but does not show the rule: {}",
                args.join(" "),
                out.stdout
            );
        } else {
            assert!(
                out.stderr.contains("nsenter"),
                "`ip netns exec ... pfwd {}` failed without mentioning nsenter: {}",
                args.join(" "),
                out.stderr.trim()
            );
        }
    }
    assert_eq!(stable(&status(&lab)), before, "`ip netns exec ... pfwd status` changed the instance");
}

/// `ip netns exec ... pfwd attach`: either a working instance (visible to, and usable by, pfwd run through
/// nsenter) or a failure that points to nsenter, and nothing attached.
fn ip_netns_exec_attach(mode: &str) {
    let lab = lab("e2e-ipnetns-at");
    let _web = server(&lab, Node::Router, "10.0.1.1:80", "web");
    let _guard = Detach::new(&lab);
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", lab.ns(Node::Router)])
        .arg(tests::pfwd_bin().unwrap())
        .args(["attach", "--mode", mode, "eth0"]);
    let out = run_bounded(cmd, PFWD_TIMEOUT);
    if out.success {
        let st = status(&lab);
        assert_eq!(st["attached"], true, "`ip netns exec ... pfwd attach` succeeded but nsenter sees: {st:#}");
        if mode == "ebpf" {
            assert_eq!(tcx_programs(&lab, "eth0"), pfwd_tcx(), "attach reported success but eth0 has no programs");
        }
        add(&lab, &["redirect", "-p", "tcp", "--dport", "59999", "--to-port", "80"]);
        expect_tcp(&lab, None, "10.0.1.1:59999", "web", 80, "10.0.1.2");
    } else {
        assert!(out.stderr.contains("nsenter"), "failed without mentioning nsenter: {}", out.stderr.trim());
        assert_eq!(status(&lab)["attached"], false, "a refused attach must leave nothing attached");
        assert!(tcx_programs(&lab, "eth0").is_empty(), "a refused attach left programs on eth0");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 12. Attach is idempotent.

fn attach_idempotent(mode: &str) {
    let lab = lab("e2e-idem");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _guard = attach(&lab, mode, &["eth0"]);
    let id = add(&lab, &["dnat", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    let once = (status(&lab), list(&lab), files_in(&pin_dir(&lab)), tcx_programs(&lab, "eth0"));

    pfwd_ok(&lab, &["attach", "--mode", mode, "eth0"]);
    let twice = (status(&lab), list(&lab), files_in(&pin_dir(&lab)), tcx_programs(&lab, "eth0"));
    assert_eq!(stable(&twice.0), stable(&once.0), "attaching eth0 again changed the status");
    assert_eq!(twice.1, once.1, "attaching eth0 again changed the rules");
    assert_eq!(twice.2, once.2, "attaching eth0 again changed the pins");
    assert_eq!(twice.3, once.3, "attaching eth0 again changed the programs on eth0");
    if mode == "ebpf" {
        let want = pfwd_tcx();
        assert_eq!(twice.3, want, "one ingress and one egress program on eth0");
    }
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");

    pfwd_ok(&lab, &["attach", "--mode", mode, "eth0", "eth1"]);
    let st = status(&lab);
    let names: Vec<&str> = st["interfaces"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["eth0", "eth1"], "interfaces after attaching eth0 eth1: {st:#}");
    assert_eq!(list(&lab), once.1, "attaching eth1 changed the rules");
    assert_eq!(tcx_programs(&lab, "eth0"), once.3, "attaching eth0 eth1 changed the programs on eth0");
    if mode == "ebpf" {
        let want = pfwd_tcx();
        assert_eq!(tcx_programs(&lab, "eth1"), want, "one ingress and one egress program on eth1");
        let pins = files_in(&pin_dir(&lab));
        assert_eq!(pins.iter().filter(|p| p.starts_with("link_eth")).count(), 4, "interface link pins: {pins:?}");
        // connect, sendmsg, recvmsg and getpeername, for IPv4 and IPv6.
        assert_eq!(pins.iter().filter(|p| p.starts_with("link_cgroup_")).count(), 8, "socket hook pins: {pins:?}");
    }
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    assert_eq!(rule_of(&status(&lab), id)["flows"], 3);
    // And a third time with both: still nothing new.
    pfwd_ok(&lab, &["attach", "--mode", mode, "eth1", "eth0"]);
    assert_eq!(tcx_programs(&lab, "eth0"), once.3);
    assert_eq!(stable(&status(&lab))["interfaces"], stable(&st)["interfaces"]);
}

fn detach_keeps_user_iptables_rules(mode: &str) {
    let lab = lab("e2e-userrules");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    // Rules pfwd does not own, in the tables it writes to: they must survive attach and detach untouched.
    sh(
        &lab,
        Node::Router,
        "iptables -w -t nat -A PREROUTING -p tcp --dport 2222 -j DNAT --to-destination 10.0.2.2:22 && \
         iptables -w -t nat -A POSTROUTING -o eth9 -j MASQUERADE && \
         iptables -w -A INPUT -p tcp --dport 9999 -j ACCEPT",
    );
    let before = snapshot(&lab);
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    let during = sh(&lab, Node::Router, "iptables-save");
    for user_rule in ["--dport 2222", "-o eth9 -j MASQUERADE", "--dport 9999 -j ACCEPT"] {
        assert!(during.contains(user_rule), "user rule {user_rule:?} missing while attached:\n{during}");
    }
    let notes = guard.detach();
    let after = snapshot(&lab);
    assert_eq!(after.iptables, before.iptables, "iptables-save must read as before attach (detach said: {notes})");
    assert_eq!(after, before);
}

/// Migration: the classic iptables commands imported into a running instance forward the same traffic, bad input
/// changes nothing, and the export reads back to the same rules.
fn import_and_export(mode: &str) {
    let lab = lab("e2e-import");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _web = server(&lab, Node::Router, "10.0.1.1:80", "router-web");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    let dir = std::env::temp_dir().join(format!("pfwd-e2e-import-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let bad = write(
        "bad.sh",
        "iptables -t nat -A PREROUTING -p tcp --dport 59999 -j REDIRECT --to-port 80\n\
         iptables -t nat -A PREROUTING -p tcp \u{2013}dport 8080 -j DNAT --to 10.0.2.2:9000\n",
    );
    let out = pfwd_err(&lab, &["import", &bad], &["line 2", "\u{2013}dport"]);
    assert!(out.stderr.contains("--dport"), "the error should suggest --dport: {}", out.stderr);
    assert_eq!(list(&lab), serde_json::json!([]), "a rejected import must add nothing");

    let good = write(
        "classic.sh",
        "# port forwarding, the iptables way\n\
         sudo iptables -t nat -A PREROUTING -p tcp --dport 59999 -j REDIRECT --to-port 80\n\
         iptables -t nat -A PREROUTING -i eth0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.2.2:9000\n",
    );
    let dry = pfwd_ok(&lab, &["import", "--dry-run", &good]);
    // iptables lines are IPv4 rules: the one without addresses says so.
    assert!(dry.contains("redirect -4 -p tcp --dport 59999 --to-port 80"), "{dry}");
    assert_eq!(list(&lab), serde_json::json!([]), "--dry-run must add nothing");
    pfwd_ok(&lab, &["import", &good]);
    assert_eq!(list(&lab).as_array().unwrap().len(), 2);
    expect_tcp(&lab, None, "10.0.1.1:59999", "router-web", 80, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    // Importing again skips what is already there.
    pfwd_ok(&lab, &["import", &good]);
    assert_eq!(list(&lab).as_array().unwrap().len(), 2);

    let export = pfwd_ok(&lab, &["export", "iptables"]);
    let reimport = pfwd_ok(&lab, &["import", "--dry-run", &write("export.rules", &export)]);
    let mut got: Vec<&str> = reimport.lines().collect();
    let mut want: Vec<&str> = dry.lines().collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "export then import must give back the same rules");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--mode auto` with kernel BTF hidden (PFWD_BTF_PATH pointing nowhere) falls back to nftables (constant-time
/// rule lookup; iptables where nft is not usable), says why, and forwards the same traffic.
#[test]
fn auto_mode_falls_back_to_nft_without_btf() {
    let lab = lab("e2e-auto");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let guard = Detach::new(&lab);
    let mut cmd = lab.pfwd(["attach", "eth0", "eth1"]).expect("pfwd command");
    cmd.env("PFWD_BTF_PATH", "/nonexistent/vmlinux");
    let out = run_bounded(cmd, PFWD_TIMEOUT);
    assert!(out.success, "attach failed: {}", out.stderr);
    assert!(out.stdout.contains("no kernel BTF at /nonexistent/vmlinux"), "attach must say why: {}", out.stdout);
    let st = status(&lab);
    assert_eq!(st["mode"], "nft");
    let reason = st["mode_reason"].as_str().unwrap();
    assert!(reason.contains("no kernel BTF") && reason.contains("using nftables"), "{st}");
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    // A plain port forward is an element of pfwd's IPv4 translation map.
    let table = sh(&lab, Node::Router, "nft list table inet pfwd_nat");
    assert!(table.contains("\"eth0\" . tcp . 8080 counter ") && table.contains(": 10.0.2.2 . 9000"), "{table}");
    drop(guard);
}

/// One grammar: the same rules spelled on the CLI, in a TOML config and as iptables lines give identical
/// `pfwd list --json` (`-p all` included: accepted by all three). iptables lines are IPv4 rules, so the rules without
/// addresses say `-4` / `family = "ipv4"` in the other two.
fn grammar_equivalence(mode: &str) {
    let lab = lab("e2e-gram");
    let dir = std::env::temp_dir().join(format!("pfwd-e2e-grammar-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cli: [&[&str]; 4] = [
        &["dnat", "-i", "eth0", "-p", "tcp", "-s", "10.0.1.0/24", "--dport", "8000-8099", "--to", "10.0.2.2:9000"],
        &["redirect", "-4", "-p", "udp", "--dport", "5353", "--to-port", "5000"],
        &["dnat", "-p", "all", "-d", "10.0.1.1", "--to", "10.0.2.2"],
        &["masquerade", "-o", "eth1", "-4", "-p", "tcp", "--to-ports", "20000-20099"],
    ];
    let toml = "[[rule]]\nkind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\nsrc = \"10.0.1.0/24\"\n\
                dport = \"8000-8099\"\nto = \"10.0.2.2:9000\"\n\
                [[rule]]\nkind = \"redirect\"\nfamily = \"ipv4\"\nproto = \"udp\"\ndport = 5353\nto_port = 5000\n\
                [[rule]]\nkind = \"dnat\"\nproto = \"all\"\ndst = \"10.0.1.1\"\nto = \"10.0.2.2\"\n\
                [[rule]]\nkind = \"masquerade\"\noface = \"eth1\"\nfamily = \"ipv4\"\nproto = \"tcp\"\n\
                to_ports = \"20000-20099\"\n";
    let ipt = "iptables -t nat -A PREROUTING -i eth0 -p tcp -s 10.0.1.0/24 --dport 8000:8099 -j DNAT \
               --to-destination 10.0.2.2:9000\n\
               iptables -t nat -A PREROUTING -p udp -m udp --dport 5353 -j REDIRECT --to-ports 5000\n\
               iptables -t nat -A PREROUTING -p all -d 10.0.1.1 -j DNAT --to-destination 10.0.2.2\n\
               iptables -t nat -A POSTROUTING -o eth1 -p tcp -j MASQUERADE --to-ports 20000-20099\n";
    let toml_file = dir.join("rules.toml");
    let ipt_file = dir.join("rules.sh");
    std::fs::write(&toml_file, toml).unwrap();
    std::fs::write(&ipt_file, ipt).unwrap();

    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    for args in cli {
        add(&lab, args);
    }
    let from_cli = list(&lab);
    guard.detach();
    let guard = Detach::new(&lab);
    pfwd_ok(&lab, &["attach", "eth0", "eth1", "--mode", mode, "--config", toml_file.to_str().unwrap()]);
    let from_toml = list(&lab);
    guard.detach();
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    pfwd_ok(&lab, &["import", ipt_file.to_str().unwrap()]);
    let from_ipt = list(&lab);
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(from_cli.as_array().map(Vec::len), Some(4), "{from_cli}");
    assert_eq!(from_toml, from_cli, "TOML and CLI disagree");
    assert_eq!(from_ipt, from_cli, "iptables import and CLI disagree");
}

/// `--mode auto` on this kernel (BTF present) picks eBPF.
#[test]
fn auto_mode_uses_ebpf_with_btf() {
    let lab = lab("e2e-autoebpf");
    let _guard = attach(&lab, "auto", &["eth0"]);
    let st = status(&lab);
    assert_eq!(st["mode"], "ebpf", "{st}");
    assert!(st["mode_reason"].as_str().unwrap().contains("BTF found"), "{st}");
}

// ---------------------------------------------------------------------------------------------------------------
// Mode wrappers: every scenario runs on the eBPF data path and on the iptables fallback with the same assertions.

in_both_modes!(
    redirect,
    dnat_loopback,
    dnat_to_server,
    partial_checksums,
    source_filter,
    destination_filter,
    port_ranges,
    many_connections,
    detach_restores_state,
    detach_keeps_preexisting_sysctls,
    detach_keeps_user_iptables_rules,
    two_instances,
    cli_errors,
    ip_netns_exec,
    ip_netns_exec_attach,
    attach_idempotent,
    import_and_export,
    grammar_equivalence,
);
