//! End-to-end tests of `--local` rules (the iptables OUTPUT chain): connections made by processes of the router
//! itself are translated, in both modes. In eBPF mode that is done by cgroup socket hooks at connect/send time,
//! which see every namespace's sockets: the tests also check that other namespaces are left alone.
//!
//! Run as root; every test builds its own lab and detaches pfwd through a guard, also on failure.

#[macro_use]
mod common;

use common::*;
use std::net::SocketAddr;
use tests::{Lab, Node, Reply, TIMEOUT};

/// The router's own processes reach the "old" address 198.51.100.13 through a route (as a real moved server would
/// be routable); without a rule nothing answers there.
fn route_old_address(lab: &Lab) {
    sh(lab, Node::Router, "ip route add 198.51.100.0/24 via 10.0.2.2");
}

/// A local client reaching port 1111 gets the local port-80 server (`-A OUTPUT -p tcp --dport 1111 -j DNAT
/// --to-destination 127.0.0.1:80`), and REDIRECT --local does the same for another port.
fn local_port_to_loopback(mode: &str) {
    let lab = lab("loc-port");
    let _web = lab.tcp_echo_server(Node::Router, sa("127.0.0.1:80"), "router-web").unwrap();
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["dnat", "--local", "-p", "tcp", "--dport", "1111", "--to", "127.0.0.1:80"]);
    add(&lab, &["redirect", "--local", "-p", "tcp", "--dport", "1112", "--to-port", "80"]);
    for to in ["10.0.1.1:1111", "127.0.0.1:1111", "10.0.2.1:1112"] {
        let (reply, peer) = tcp_with_peer(&lab, Node::Router, to);
        assert_eq!((reply.label.as_str(), reply.port), ("router-web", 80), "via {to}");
        assert_eq!(peer, sa(to), "the application must see the address it connected to");
    }
    // Not an arriving-packet rule: the client host's connection to port 1111 is not translated.
    expect_tcp_fails(&lab, "10.0.1.1:1111");
    let rules = status(&lab)["rules"].clone();
    assert!(rules[0]["flows"].as_u64().unwrap() >= 2, "the --local rule counts its connections: {rules:#}");
}

/// A server moved to a new address (`-A OUTPUT -d 211.45.70.13 -j DNAT --to 192.168.255.151`, here
/// 198.51.100.13 -> 10.0.2.2): local TCP and UDP reach the new host, and UDP replies appear to come from the old
/// address the client sent to.
fn local_moved_server(mode: &str) {
    let lab = lab("loc-moved");
    let _tcp = lab.tcp_echo_server(Node::Server, sa("10.0.2.2:9000"), "server").unwrap();
    let _udp = lab.udp_echo_server(Node::Server, sa("10.0.2.2:9000"), "server").unwrap();
    route_old_address(&lab);
    assert!(lab.tcp_request(Node::Router, sa("198.51.100.13:9000"), "x", SHORT).is_err(), "nothing at the old address");
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["dnat", "--local", "-d", "198.51.100.13", "--to", "10.0.2.2"]);

    let (reply, peer) = tcp_with_peer(&lab, Node::Router, "198.51.100.13:9000");
    assert_eq!((reply.label.as_str(), reply.port), ("server", 9000));
    assert_eq!(peer, sa("198.51.100.13:9000"), "getpeername shows the old address");
    let (text, from) =
        lab.udp_request(Node::Router, sa("198.51.100.13:9000"), "u", TIMEOUT).expect("UDP through --local");
    assert_eq!(Reply::parse(&text).expect("reply").label, "server");
    assert_eq!(from, sa("198.51.100.13:9000"), "the UDP reply must come from the address the client sent to");

    // Another namespace (the client host) is not affected: it has no such rule.
    sh(&lab, Node::Client, "ip route add 198.51.100.0/24 via 10.0.1.1");
    assert!(
        lab.tcp_request(Node::Client, sa("198.51.100.13:9000"), "x", SHORT).is_err(),
        "client namespace translated"
    );

    guard.detach();
    assert!(lab.tcp_request(Node::Router, sa("198.51.100.13:9000"), "x", SHORT).is_err(), "detach must restore");
}

/// Two instances in two namespaces with different --local targets for the same destination: each namespace's
/// processes get their own instance's translation (the socket hooks are shared by every namespace).
fn local_two_instances(mode: &str) {
    let (a, b) = (lab("loc-a"), lab("loc-b"));
    let _wa = a.tcp_echo_server(Node::Router, sa("127.0.0.1:80"), "a-web").unwrap();
    let _wb = b.tcp_echo_server(Node::Router, sa("127.0.0.1:81"), "b-web").unwrap();
    let _ga = attach(&a, mode, &["eth0"]);
    let gb = attach(&b, mode, &["eth0"]);
    add(&a, &["dnat", "--local", "-p", "tcp", "--dport", "1111", "--to", "127.0.0.1:80"]);
    add(&b, &["dnat", "--local", "-p", "tcp", "--dport", "1111", "--to", "127.0.0.1:81"]);
    assert_eq!(tcp_with_peer(&a, Node::Router, "10.0.1.1:1111").0.label, "a-web");
    assert_eq!(tcp_with_peer(&b, Node::Router, "10.0.1.1:1111").0.label, "b-web");
    gb.detach();
    assert_eq!(tcp_with_peer(&a, Node::Router, "10.0.1.1:1111").0.label, "a-web", "detaching B must not affect A");
    expect_local_fails(&b, "10.0.1.1:1111");
}

fn expect_local_fails(lab: &Lab, to: &str) {
    assert!(lab.tcp_request(Node::Router, sa(to), "x", SHORT).is_err(), "{to} still translated");
}

/// --local refuses what it cannot honour, naming it, and changes nothing.
fn local_errors(mode: &str) {
    let lab = lab("loc-err");
    let _guard = attach(&lab, mode, &["eth0"]);
    pfwd_err(&lab, &["add", "dnat", "--local", "-i", "eth0", "--to", "10.0.2.2"], &["-i", "--local"]);
    pfwd_err(&lab, &["add", "dnat", "--local", "-s", "10.0.1.0/24", "--to", "10.0.2.2"], &["-s", "--local"]);
    pfwd_err(&lab, &["add", "masquerade", "--local"], &["--local"]);
    assert_eq!(list(&lab), serde_json::json!([]));
}

/// A connected UDP socket of a `--local` rule when the rule is deleted. Both modes: the socket keeps reaching the
/// rule's target (eBPF: connect() was translated, the socket is connected to the target; iptables: netfilter's
/// conntrack entry keeps translating the flow), replies keep showing the address the application connected to, and a
/// new socket reaches the original address. In eBPF mode not even `pfwd conntrack --flush` changes that: the socket
/// stays connected to the target until the application reconnects (README, "Locally generated traffic"). (In
/// iptables mode the flow ends when netfilter's entry expires or is deleted with `conntrack -D`; pfwd's flush only
/// picks entries that a current rule explains.)
fn local_connected_udp_after_rule_deletion(mode: &str) {
    use std::net::UdpSocket;
    let lab = lab("loc-udp");
    let _new = lab.udp_echo_server(Node::Server, sa("10.0.2.2:9000"), "new").unwrap();
    lab.add_addr(Node::Server, "eth0", "198.51.100.13/32").unwrap_or_else(|e| panic!("{e:#}"));
    let _old = lab.udp_echo_server(Node::Server, sa("198.51.100.13:9000"), "old").unwrap();
    route_old_address(&lab);
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    let id = add(&lab, &["dnat", "--local", "-d", "198.51.100.13", "--to", "10.0.2.2"]);
    let connected = || {
        lab.in_ns(Node::Router, || -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect("198.51.100.13:9000")?;
            s.set_read_timeout(Some(TIMEOUT))?;
            Ok(s)
        })
        .unwrap()
        .expect("connected UDP socket")
    };
    // Who answers a datagram on `s`, and from where the socket says the reply came.
    let ask = |s: &UdpSocket, what: &str| -> (String, SocketAddr) {
        s.send(what.as_bytes()).expect("send");
        let mut buf = [0u8; 512];
        let (n, from) = s.recv_from(&mut buf).unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        (Reply::parse(&text).unwrap_or_else(|| panic!("{what}: {text:?}")).label, from)
    };
    let old_addr = sa("198.51.100.13:9000");
    let s = connected();
    assert_eq!(ask(&s, "before"), ("new".to_string(), old_addr));
    del(&lab, id);
    assert_eq!(ask(&s, "after delete"), ("new".to_string(), old_addr), "the live socket keeps its translation");
    assert_eq!(ask(&connected(), "new socket"), ("old".to_string(), old_addr), "a new socket is not translated");
    if mode == "ebpf" {
        pfwd_ok(&lab, &["conntrack", "--flush"]);
        assert_eq!(ask(&s, "after conntrack --flush"), ("new".to_string(), old_addr));
    }
}

in_both_modes!(
    local_port_to_loopback,
    local_moved_server,
    local_two_instances,
    local_errors,
    local_connected_udp_after_rule_deletion
);
