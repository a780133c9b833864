//! End-to-end tests of IPv6 rules, in a dual-stack lab ([`Lab::dual_stack`]: client 2001:db8:1::2, router
//! 2001:db8:1::1 / 2001:db8:2::1, server 2001:db8:2::2, beside the IPv4 addresses of every lab).
//!
//! The seed cases over IPv6: REDIRECT to a local port, DNAT to another host, DNAT + MASQUERADE where the server has
//! no route back, 1:1 NAT (ICMPv6 echo included), `--local` to a moved server, source filters with IPv6 prefixes, a
//! rule without addresses serving both families, packet-too-big through a translated flow, and `auto` falling back
//! to nftables without BTF. They run in every mode: iptables mode through ip6tables, nft mode in its inet table, eBPF
//! mode in its programs and IPv6 socket hooks. One more, eBPF only: forwarded IPv6 packets take one conntrack lookup
//! (the handoff from tc ingress to tc egress).
//!
//! Needs root and a built pfwd: `cargo build -p pfwd && PFWD_BIN=target/debug/pfwd cargo test -p tests --test ipv6`.

#[macro_use]
mod common;

use std::net::Ipv6Addr;

use common::*;
use tests::{Lab, Node, TIMEOUT};

const CLIENT: &str = "2001:db8:1::2";
const ROUTER_IN: &str = "2001:db8:1::1";
const ROUTER_OUT: &str = "2001:db8:2::1";
const SERVER: &str = "2001:db8:2::2";

#[track_caller]
fn dual_lab(name: &str) -> Lab {
    Lab::dual_stack(name).unwrap_or_else(|e| panic!("creating lab {name} (needs root): {e:#}"))
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// A request that must not be answered (no rule sends it anywhere that listens).
#[track_caller]
fn expect_no_tcp(lab: &Lab, to: &str, why: &str) {
    let r = lab.tcp_request(Node::Client, sa(to), "hi", SHORT);
    assert!(r.is_err(), "TCP {to} should not be answered ({why}), got {r:?}");
}

/// A rule without addresses serves both families: one `redirect` sends IPv4 and IPv6 connections to port 80 to
/// the router's own port 3000 on the address they came to; `-4` and `-6` keep a rule to one family.
fn redirect_serves_both_families(mode: &str) {
    let lab = dual_lab("v6-redir");
    let _s6 = server(&lab, Node::Router, &format!("[{ROUTER_IN}]:3000"), "router6");
    let _s4 = server(&lab, Node::Router, "10.0.1.1:3000", "router4");
    let _u6 = udp_server(&lab, Node::Router, &format!("[{ROUTER_IN}]:3000"), "router6");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["redirect", "-p", "tcp", "--dport", "80", "--to-port", "3000"]);
    add(&lab, &["redirect", "-p", "udp", "--dport", "80", "--to-port", "3000"]);
    expect_tcp(&lab, None, &format!("[{ROUTER_IN}]:80"), "router6", 3000, CLIENT);
    expect_udp(&lab, None, &format!("[{ROUTER_IN}]:80"), "router6", 3000, CLIENT);
    expect_tcp(&lab, None, "10.0.1.1:80", "router4", 3000, "10.0.1.2");

    let v4_only = add(&lab, &["redirect", "-4", "-p", "tcp", "--dport", "81", "--to-port", "3000"]);
    let v6_only = add(&lab, &["redirect", "-6", "-p", "tcp", "--dport", "82", "--to-port", "3000"]);
    expect_tcp(&lab, None, "10.0.1.1:81", "router4", 3000, "10.0.1.2");
    expect_no_tcp(&lab, &format!("[{ROUTER_IN}]:81"), "rule -4");
    expect_tcp(&lab, None, &format!("[{ROUTER_IN}]:82"), "router6", 3000, CLIENT);
    expect_no_tcp(&lab, "10.0.1.1:82", "rule -6");
    let rules = list(&lab);
    let family = |id: u32| rules.as_array().unwrap().iter().find(|r| r["id"] == id).unwrap()["family"].clone();
    assert_eq!((family(v4_only), family(v6_only)), ("ipv4".into(), "ipv6".into()), "{rules:#}");
}

/// DNAT to another host, TCP and UDP; the server sees the client's address; IPv6 forwarding is turned on for the
/// rule and restored at detach; the ip6tables nat table reads as before after detach.
fn dnat_to_another_host(mode: &str) {
    let lab = dual_lab("v6-dnat");
    let _t = server(&lab, Node::Server, &format!("[{SERVER}]:8080"), "server6");
    let _u = udp_server(&lab, Node::Server, &format!("[{SERVER}]:8080"), "server6");
    let before = sh(&lab, Node::Router, "ip6tables-save | grep -v '^#' || true");
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    let to = format!("[{SERVER}]:8080");
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "80", "--to", &to]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "80", "--to", &to]);
    assert_eq!(router_sysctl(&lab, "net.ipv6.conf.all.forwarding"), "1");
    expect_tcp(&lab, None, &format!("[{ROUTER_IN}]:80"), "server6", 8080, CLIENT);
    expect_udp(&lab, None, &format!("[{ROUTER_IN}]:80"), "server6", 8080, CLIENT);
    // Each rule counted its one connection (ip6tables' counters).
    let st = status(&lab);
    assert_eq!((rule_of(&st, 1)["flows"].as_u64(), rule_of(&st, 2)["flows"].as_u64()), (Some(1), Some(1)), "{st:#}");
    // `pfwd conntrack` lists the IPv6 translations (netfilter's, read with `conntrack -f ipv6`), each with its rule.
    let out = pfwd_ok(&lab, &["conntrack", "--json"]);
    let flows: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    let listed = |proto: &str, rule: u32| {
        flows.as_array().unwrap().iter().any(|e| {
            e["proto"] == proto
                && e["rule"] == rule
                && (&e["original"]["src"], &e["original"]["dst"]) == (&CLIENT.into(), &ROUTER_IN.into())
                && (&e["translated"]["dst"], &e["translated"]["dport"]) == (&SERVER.into(), &8080.into())
        })
    };
    assert!(listed("tcp", 1) && listed("udp", 2), "both translations listed with their rules: {flows:#}");
    // And `--flush` with an IPv6 filter ends them.
    let ended = pfwd_ok(&lab, &["conntrack", "--flush", "-s", "2001:db8:1::/64", "--json"]);
    assert_eq!(ended.trim(), r#"{"flows_ended":2}"#);
    assert_eq!(pfwd_ok(&lab, &["conntrack", "--json"]).trim(), "[]");
    guard.detach();
    assert_eq!(router_sysctl(&lab, "net.ipv6.conf.all.forwarding"), "0");
    assert_eq!(
        sh(&lab, Node::Router, "ip6tables-save | grep -v '^#' || true"),
        before,
        "ip6tables must read as before"
    );
}

/// DNAT + MASQUERADE: the server has no IPv6 route back to the client, so only the router's source address gets
/// the replies back.
fn dnat_and_masquerade_without_route_back(mode: &str) {
    let lab = dual_lab("v6-full");
    sh(&lab, Node::Server, "ip -6 route del default");
    let _t = server(&lab, Node::Server, &format!("[{SERVER}]:8080"), "server6");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "80", "--to", &format!("[{SERVER}]:8080")]);
    expect_no_tcp(&lab, &format!("[{ROUTER_IN}]:80"), "no route back before the masquerade");
    add(&lab, &["masquerade", "-o", "eth1", "-6"]);
    expect_tcp(&lab, None, &format!("[{ROUTER_IN}]:80"), "server6", 8080, ROUTER_OUT);
}

/// 1:1 NAT: a public address per private host, both ways, and ICMPv6 echo to the public address answered by the
/// private host (the router answers no echo itself).
fn one_to_one_nat(mode: &str) {
    let lab = dual_lab("v6-1to1");
    sh(&lab, Node::Server, "ip -6 addr add 2001:db8:2::3/64 dev eth0 nodad");
    let pairs = [("2001:db8:ff::11", "2001:db8:2::2"), ("2001:db8:ff::12", "2001:db8:2::3")];
    let mut servers = vec![];
    for (_, private) in pairs {
        servers.push(server(&lab, Node::Server, &format!("[{private}]:9000"), &format!("priv-{private}")));
    }
    let _client_srv = server(&lab, Node::Client, &format!("[{CLIENT}]:7000"), "client");
    sh(&lab, Node::Router, "sysctl -qw net.ipv6.icmp.echo_ignore_all=1");
    let public = v6(pairs[1].0);
    assert_eq!(icmp6_echo(&lab, Node::Client, public, SHORT), None, "nobody answers {public} before the rules");

    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    for (public, private) in pairs {
        add(&lab, &["dnat", "-i", "eth0", "-d", public, "--to", private]);
        add(&lab, &["snat", "-o", "eth0", "-s", private, "--to", public]);
    }
    for (public, private) in pairs {
        expect_tcp(&lab, None, &format!("[{public}]:9000"), &format!("priv-{private}"), 9000, CLIENT);
        let r = lab
            .tcp_request_from(Node::Server, ip(private), sa(&format!("[{CLIENT}]:7000")), "hi", TIMEOUT)
            .unwrap_or_else(|e| panic!("TCP {private} -> client: {e:#}"));
        let r = tests::Reply::parse(&r).expect("a reply");
        assert_eq!(r.peer.ip(), ip(public), "the client must see {private} as {public}");
    }
    assert_eq!(icmp6_echo(&lab, Node::Client, public, TIMEOUT), Some(public), "ICMPv6 echo to {public}");
}

/// `--local`: connections the router itself makes to an address the server left are sent to its new address (TCP,
/// and UDP whose replies come back from the address the client sent to), the application seeing the address it
/// asked for (getpeername); REDIRECT `--local` to a port on ::1; and a dual-stack socket's IPv4 connection (to an
/// IPv4-mapped address) follows the IPv4 rules, as iptables' OUTPUT chain sees an IPv4 packet.
fn local_to_moved_server(mode: &str) {
    let lab = dual_lab("v6-local");
    let _t = server(&lab, Node::Server, &format!("[{SERVER}]:8080"), "server6");
    let _u = udp_server(&lab, Node::Server, &format!("[{SERVER}]:8080"), "server6");
    let _t4 = server(&lab, Node::Server, "10.0.2.2:8080", "server4");
    let _lo = server(&lab, Node::Router, "[::1]:3000", "router-lo6");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    let old = "[2001:db8:2::99]:80";
    assert!(lab.tcp_request(Node::Router, sa(old), "hi", SHORT).is_err(), "nobody is at {old} before the rule");
    let to = format!("[{SERVER}]:8080");
    add(&lab, &["dnat", "--local", "-p", "tcp", "-d", "2001:db8:2::99", "--dport", "80", "--to", &to]);
    add(&lab, &["dnat", "--local", "-p", "udp", "-d", "2001:db8:2::99", "--dport", "80", "--to", &to]);
    let (r, peer) = tcp_with_peer(&lab, Node::Router, old);
    assert_eq!((r.label.as_str(), r.port), ("server6", 8080), "{old} must reach the moved server");
    assert_eq!(peer, sa(old), "getpeername shows the address the application connected to");
    let (text, from) = lab.udp_request(Node::Router, sa(old), "u", TIMEOUT).expect("UDP through --local");
    assert_eq!(tests::Reply::parse(&text).expect("reply").label, "server6");
    assert_eq!(from, sa(old), "the UDP reply must come from the address the client sent to");

    add(&lab, &["redirect", "--local", "-6", "-p", "tcp", "--dport", "1112", "--to-port", "3000"]);
    let (r, peer) = tcp_with_peer(&lab, Node::Router, &format!("[{ROUTER_OUT}]:1112"));
    assert_eq!((r.label.as_str(), r.port), ("router-lo6", 3000), "REDIRECT --local goes to ::1");
    assert_eq!(peer, sa(&format!("[{ROUTER_OUT}]:1112")));

    sh(&lab, Node::Router, "ip route add 198.51.100.0/24 via 10.0.2.2");
    add(&lab, &["dnat", "--local", "-p", "tcp", "-d", "198.51.100.13", "--to", "10.0.2.2:8080"]);
    let mapped = "[::ffff:198.51.100.13]:9000";
    let (r, peer) = tcp_with_peer(&lab, Node::Router, mapped);
    assert_eq!((r.label.as_str(), r.port), ("server4", 8080), "{mapped} follows the IPv4 rule");
    assert_eq!(peer, sa(mapped));
}

/// Source filters with IPv6 prefixes, plain and negated.
fn source_filters(mode: &str) {
    let lab = dual_lab("v6-src");
    let _t = server(&lab, Node::Server, &format!("[{SERVER}]:8080"), "server6");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    let to = format!("[{SERVER}]:8080");
    add(&lab, &["dnat", "-p", "tcp", "-s", "2001:db8:1::/64", "--dport", "80", "--to", &to]);
    add(&lab, &["dnat", "-p", "tcp", "!", "-s", CLIENT, "--dport", "81", "--to", &to]);
    add(&lab, &["dnat", "-p", "tcp", "-s", "2001:db8:7::/48", "--dport", "82", "--to", &to]);
    expect_tcp(&lab, None, &format!("[{ROUTER_IN}]:80"), "server6", 8080, CLIENT);
    expect_no_tcp(&lab, &format!("[{ROUTER_IN}]:81"), "! -s the client");
    expect_no_tcp(&lab, &format!("[{ROUTER_IN}]:82"), "-s another network");
}

/// Packet too big: the router's link to the server has the minimum IPv6 MTU; a large datagram of a translated
/// flow makes the router send packet-too-big, which must reach the client translated (its embedded packet addressed
/// to what the client sent to), so the client learns the path MTU toward the address it uses.
fn packet_too_big_reaches_the_client(mode: &str) {
    let lab = dual_lab("v6-pmtu");
    let _u = udp_server(&lab, Node::Server, &format!("[{SERVER}]:8080"), "server6");
    sh(&lab, Node::Router, "ip link set eth1 mtu 1280");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "80", "--to", &format!("[{SERVER}]:8080")]);
    expect_udp(&lab, None, &format!("[{ROUTER_IN}]:80"), "server6", 8080, CLIENT);
    let route = |lab: &Lab| sh(lab, Node::Client, &format!("ip -6 route get {ROUTER_IN}"));
    assert!(!route(&lab).contains("mtu 1280"), "no path MTU learnt yet: {}", route(&lab));
    let big = "x".repeat(1400);
    // Bounded: a few tries, in case the first datagram meets neighbour discovery on the router's far side.
    for _ in 0..3 {
        let _ = lab.udp_request(Node::Client, sa(&format!("[{ROUTER_IN}]:80")), &big, SHORT);
        if route(&lab).contains("mtu 1280") {
            break;
        }
    }
    assert!(
        route(&lab).contains("mtu 1280"),
        "packet-too-big must reach the client about {ROUTER_IN} (the address it sent to): {}",
        route(&lab)
    );
}

in_both_modes!(
    redirect_serves_both_families,
    dnat_to_another_host,
    dnat_and_masquerade_without_route_back,
    one_to_one_nat,
    local_to_moved_server,
    source_filters,
    packet_too_big_reaches_the_client,
);

/// `--mode auto` without kernel BTF falls back to nftables, where IPv6 rules work.
#[test]
fn auto_mode_without_btf_takes_ipv6_rules() {
    let lab = dual_lab("v6-auto");
    let _t = server(&lab, Node::Server, &format!("[{SERVER}]:8080"), "server6");
    let guard = Detach::new(&lab);
    let mut cmd = lab.pfwd(["attach", "eth0", "eth1"]).expect("pfwd command");
    cmd.env("PFWD_BTF_PATH", "/nonexistent/vmlinux");
    let out = run_bounded(cmd, PFWD_TIMEOUT);
    assert!(out.success, "attach failed: {}", out.stderr);
    assert_eq!(status(&lab)["mode"], "nft");
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "80", "--to", &format!("[{SERVER}]:8080")]);
    expect_tcp(&lab, None, &format!("[{ROUTER_IN}]:80"), "server6", 8080, CLIENT);
    drop(guard);
}

/// A counter of a node's IPv6 stack (`/proc/net/snmp6`: one "name value" per line).
fn snmp6(lab: &Lab, node: Node, name: &str) -> u64 {
    let text = sh(lab, node, "cat /proc/net/snmp6");
    let value = text.lines().find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
        [n, v] if n == name => v.parse().ok(),
        _ => None,
    });
    value.unwrap_or_else(|| panic!("no {name} in /proc/net/snmp6 of the {}", node.label()))
}

/// eBPF mode: a forwarded IPv6 packet takes one conntrack lookup, as an IPv4 one does. tc egress handles nearly
/// every forwarded packet of a UDP DNAT flow from what tc ingress handed it (README, Connection tracking: the
/// handoff); not the flow's first packet, which egress looks up and settles.
#[test]
fn ebpf_forwarded_ipv6_packets_are_handed_from_ingress_to_egress() {
    const EXCHANGES: usize = 40;
    let lab = dual_lab("v6-hand");
    let _u = udp_server(&lab, Node::Server, &format!("[{SERVER}]:8080"), "server6");
    let _guard = attach(&lab, "ebpf", &["eth0", "eth1"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "80", "--to", &format!("[{SERVER}]:8080")]);
    let handoffs = |lab: &Lab| status(lab)["stats"]["egress_handoffs"].as_u64().expect("stats.egress_handoffs");
    let (fwd0, hand0) = (snmp6(&lab, Node::Router, "Ip6OutForwDatagrams"), handoffs(&lab));

    let to: std::net::SocketAddr = format!("[{ROUTER_IN}]:80").parse().unwrap();
    let sock = lab
        .in_ns(Node::Client, || std::net::UdpSocket::bind(format!("[{CLIENT}]:0")))
        .expect("entering the namespace")
        .expect("binding a UDP socket");
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..EXCHANGES {
        let msg = format!("u{i}");
        sock.send_to(msg.as_bytes(), to).unwrap_or_else(|e| panic!("UDP #{i}: {e}"));
        let (n, src) = sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("UDP #{i}: no reply: {e}"));
        let r = tests::Reply::parse(&String::from_utf8_lossy(&buf[..n])).expect("a parsable reply");
        assert_eq!((r.label.as_str(), r.payload.as_str(), src), ("server6", msg.as_str(), to), "UDP #{i}");
    }

    let forwarded = snmp6(&lab, Node::Router, "Ip6OutForwDatagrams") - fwd0;
    let handed = handoffs(&lab) - hand0;
    eprintln!("{forwarded} IPv6 packets forwarded, {handed} handed from tc ingress to tc egress");
    assert!(forwarded >= 2 * EXCHANGES as u64, "{forwarded} packets forwarded for {EXCHANGES} exchanges");
    assert!(handed * 100 >= 90 * forwarded && handed < forwarded, "{handed} of {forwarded} handed over");
    for node in [Node::Client, Node::Server] {
        assert_eq!(snmp6(&lab, node, "Udp6InCsumErrors"), 0, "{}: UDP checksum errors", node.label());
    }
}
