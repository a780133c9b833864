//! End-to-end tests of hairpin NAT (NAT loopback): a host on the inside network connects to the router's public
//! address and forwarded port, and must reach the backend and get its replies from the address it used.
//!
//! The lab's server side plays the inside network: the backend is 10.0.2.2, and the inside host is a second address
//! of the server namespace, 10.0.2.3, whose connections to the router's "public" address 10.0.1.1 go through the
//! router (default route). `accept_local` lets the backend take a packet from 10.0.2.3 as it would from another
//! host; without the masquerade it then answers 10.0.2.3 directly from 10.0.2.2, not from 10.0.1.1:8080, and the
//! connection fails as it does on a real LAN. Every scenario runs in both modes with the same assertions.

#[macro_use]
mod common;

use std::net::SocketAddr;

use common::*;
use tests::{Lab, Node, Reply, TIMEOUT};

const INSIDE_HOST: &str = "10.0.2.3";
const PUBLIC: &str = "10.0.1.1:8080";

/// A lab whose server namespace also holds the inside host 10.0.2.3 (see the module docs).
fn hairpin_lab(name: &str) -> Lab {
    let lab = lab(name);
    lab.add_addr(Node::Server, "eth0", &format!("{INSIDE_HOST}/24")).unwrap_or_else(|e| panic!("{e:#}"));
    sh(
        &lab,
        Node::Server,
        "sysctl -qw net.ipv4.conf.all.accept_local=1 net.ipv4.conf.eth0.accept_local=1 \
         net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0",
    );
    lab
}

/// TCP from the inside host to `to`: the reply, or the error.
fn inside_tcp(lab: &Lab, to: &str) -> Result<Reply, String> {
    let text =
        lab.tcp_request_from(Node::Server, ip(INSIDE_HOST), sa(to), "hi", TIMEOUT).map_err(|e| format!("{e:#}"))?;
    Reply::parse(&text).ok_or_else(|| format!("unparsable reply {text:?}"))
}

/// UDP from the inside host to `to` (unconnected socket): the reply and where it came from, or the error.
fn inside_udp(lab: &Lab, to: &str) -> Result<(Reply, SocketAddr), String> {
    let (text, src) =
        lab.udp_request_from(Node::Server, ip(INSIDE_HOST), sa(to), "hi", TIMEOUT).map_err(|e| format!("{e:#}"))?;
    Ok((Reply::parse(&text).ok_or_else(|| format!("unparsable reply {text:?}"))?, src))
}

/// The inside host reaches the backend through the public address; the backend sees the router's inside address.
fn expect_hairpin(lab: &Lab) {
    let r = inside_tcp(lab, PUBLIC).unwrap_or_else(|e| panic!("hairpin TCP {INSIDE_HOST} -> {PUBLIC}: {e}"));
    assert_eq!((r.label.as_str(), r.port, r.peer.ip()), ("server", 9000, ip("10.0.2.1")), "hairpin TCP: {r:?}");
    let (r, src) = inside_udp(lab, PUBLIC).unwrap_or_else(|e| panic!("hairpin UDP {INSIDE_HOST} -> {PUBLIC}: {e}"));
    assert_eq!((r.label.as_str(), r.port, r.peer.ip()), ("udp-server", 9000, ip("10.0.2.1")), "hairpin UDP: {r:?}");
    assert_eq!(src, sa(PUBLIC), "hairpin UDP: the reply came from {src}, not from the address the host used");
}

/// Without hairpin NAT: the TCP connection fails, and the UDP reply (if any) does not come from the public address.
fn expect_no_hairpin(lab: &Lab) {
    if let Ok(r) = inside_tcp(lab, PUBLIC) {
        panic!("TCP {INSIDE_HOST} -> {PUBLIC} should fail without hairpin NAT, got {r:?}");
    }
    if let Ok((r, src)) = inside_udp(lab, PUBLIC) {
        assert_ne!(src, sa(PUBLIC), "UDP {INSIDE_HOST} -> {PUBLIC} answered from the public address: {r:?}");
    }
}

/// Clients outside still reach the backend, which sees their own address (the hairpin masquerade is not theirs).
fn expect_outside(lab: &Lab) {
    expect_tcp(lab, None, PUBLIC, "server", 9000, "10.0.1.2");
    expect_udp(lab, None, PUBLIC, "udp-server", 9000, "10.0.1.2");
}

/// Today's recipe: a DNAT to the public address that is not tied to the outside interface (so it also applies to
/// connections arriving from the inside), and a hand-written masquerade of the inside network's connections to the
/// backend, so the backend answers through the router.
fn two_rule_recipe(mode: &str) {
    let lab = hairpin_lab("hp-recipe");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _udp = udp_server(&lab, Node::Server, "10.0.2.2:9000", "udp-server");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["dnat", "-p", "tcp", "-d", "10.0.1.1", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    add(&lab, &["dnat", "-p", "udp", "-d", "10.0.1.1", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    expect_outside(&lab);
    expect_no_hairpin(&lab);

    let id = add(&lab, &["masquerade", "-o", "eth1", "-s", "10.0.2.0/24", "-d", "10.0.2.2"]);
    expect_hairpin(&lab);
    expect_outside(&lab);

    del(&lab, id);
    // New flows only: the hairpinned ones above are tracked with their masquerade.
    pfwd_ok(&lab, &["conntrack", "--flush"]);
    expect_no_hairpin(&lab);
}

/// The same in one step: `--hairpin 10.0.2.0/24` on the DNAT rules adds the masquerade (shown by the export, tagged
/// with the rule's id), and deleting the rule removes it.
fn hairpin_option(mode: &str) {
    let lab = hairpin_lab("hp-option");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _udp = udp_server(&lab, Node::Server, "10.0.2.2:9000", "udp-server");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    let hairpin = |proto| {
        ["dnat", "-p", proto, "-d", "10.0.1.1", "--dport", "8080", "--to", "10.0.2.2:9000", "--hairpin", "10.0.2.0/24"]
    };
    let with_iface = [&["add", "dnat", "-i", "eth0"][..], &hairpin("tcp")[1..]].concat();
    pfwd_err(&lab, &with_iface, &["--hairpin does not go with -i"]);
    let tcp_id = add(&lab, &hairpin("tcp"));
    let udp_id = add(&lab, &hairpin("udp"));
    expect_outside(&lab);
    expect_hairpin(&lab);

    // The hairpinned flows (both translations in eBPF mode, one entry translated both ways in iptables mode) are
    // the rules' own.
    let out = pfwd_ok(&lab, &["conntrack", "--json"]);
    let flows: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let inside: Vec<&serde_json::Value> =
        flows.as_array().unwrap().iter().filter(|f| f["original"]["src"] == INSIDE_HOST).collect();
    assert!(!inside.is_empty(), "no flow from {INSIDE_HOST}: {flows:#}");
    for f in inside {
        assert!(f["rule"] == tcp_id || f["rule"] == udp_id, "a hairpinned flow without its rule: {f:#}");
    }

    let listed = list(&lab);
    assert_eq!(listed[0]["hairpin"], "10.0.2.0/24", "{listed}");
    let export = pfwd_ok(&lab, &["export", "iptables"]);
    let companion = format!(
        "-A PFWD-POSTROUTING -s 10.0.2.0/24 -d 10.0.2.2/32 -p tcp -m comment --comment \"pfwd:{tcp_id}-hairpin\" -j MASQUERADE"
    );
    assert!(export.lines().any(|l| l == companion), "no {companion:?} in:\n{export}");

    let out = pfwd_ok(&lab, &["del", "--flows", &tcp_id.to_string()]);
    assert!(out.contains(&format!("deleted rule {tcp_id}")), "{out}");
    if let Ok(r) = inside_tcp(&lab, PUBLIC) {
        panic!("TCP {INSIDE_HOST} -> {PUBLIC} answered after its rule was deleted: {r:?}");
    }
    let (r, src) = inside_udp(&lab, PUBLIC).unwrap_or_else(|e| panic!("hairpin UDP after deleting the TCP rule: {e}"));
    assert_eq!((r.peer.ip(), src), (ip("10.0.2.1"), sa(PUBLIC)), "the UDP rule keeps its hairpin: {r:?}");
}

in_both_modes!(two_rule_recipe, hairpin_option);
