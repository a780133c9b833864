//! End-to-end tests of negated matches (`! -s`, `! -d`, `! -i`, `! -o`) and `-d local`, in both modes with the same
//! assertions: Docker's two classic rules (masquerade what leaves by any interface but one; DNAT what arrives for any
//! of this host's addresses), and the import of those rules as iptables writes them.

#[macro_use]
mod common;

use common::*;
use tests::{Lab, Node};

/// A second client address, for "everyone but this network" rules.
const OTHER_CLIENT: &str = "10.0.1.3";

fn lab_with_two_clients(name: &str) -> Lab {
    let lab = lab(name);
    lab.add_addr(Node::Client, "eth0", &format!("{OTHER_CLIENT}/24")).unwrap_or_else(|e| panic!("{e:#}"));
    lab
}

/// `dnat -d local ! -i eth1` + `masquerade ! -o eth0 -s 10.0.1.0/24`: the client reaches the server through the
/// router's address (local), and the server sees the router (masqueraded: the packet leaves by eth1, not eth0).
fn docker_style_rules(mode: &str) {
    let lab = lab_with_two_clients("neg-docker");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _srv2 = server(&lab, Node::Server, "10.0.2.2:8081", "direct");
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["dnat", "!", "-i", "eth1", "-p", "tcp", "-d", "local", "--dport", "8081", "--to", "10.0.2.2:9000"]);
    add(&lab, &["masquerade", "-s", "10.0.1.0/24", "!", "-o", "eth0"]);
    // To a local address of the router: translated, and masqueraded on the way out of eth1.
    expect_tcp(&lab, None, "10.0.1.1:8081", "server", 9000, "10.0.2.1");
    expect_tcp(&lab, None, "10.0.2.1:8081", "server", 9000, "10.0.2.1");
    // Through the router to a non-local address on the same port: not translated (the server's own 8081 answers),
    // still masqueraded.
    expect_tcp(&lab, None, "10.0.2.2:8081", "direct", 8081, "10.0.2.1");
    let text = pfwd_ok(&lab, &["list"]);
    assert!(text.contains("dnat ! -i eth1 -p tcp -d local --dport 8081"), "{text}");
    assert!(text.contains("masquerade ! -o eth0 -s 10.0.1.0/24"), "{text}");
    guard.detach();
}

/// `! -s`: every client but one network; `! -d`: every destination but one address.
fn negated_source_and_destination(mode: &str) {
    let lab = lab_with_two_clients("neg-src");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["dnat", "-p", "tcp", "!", "-s", "10.0.1.2", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    add(&lab, &["dnat", "-p", "tcp", "!", "-d", "10.0.1.1", "--dport", "8082", "--to", "10.0.2.2:9000"]);
    expect_tcp(&lab, Some(OTHER_CLIENT), "10.0.1.1:8080", "server", 9000, OTHER_CLIENT);
    expect_tcp_fails(&lab, "10.0.1.1:8080");
    // ! -d 10.0.1.1: the router's other address is translated, 10.0.1.1 is not.
    expect_tcp(&lab, None, "10.0.2.1:8082", "server", 9000, "10.0.1.2");
    expect_tcp_fails(&lab, "10.0.1.1:8082");
    guard.detach();
}

/// The same rules, written as iptables writes them, through `pfwd import`; `list` shows them back.
fn import_docker_rules(mode: &str) {
    let lab = lab_with_two_clients("neg-import");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    import_text(
        &lab,
        "*nat\n\
         -A POSTROUTING -s 10.0.1.0/24 ! -o eth0 -j MASQUERADE\n\
         -A PREROUTING ! -i eth1 -p tcp -m tcp --dport 8081 -m addrtype --dst-type LOCAL -j DNAT --to-destination 10.0.2.2:9000\n\
         COMMIT\n",
    );
    expect_tcp(&lab, None, "10.0.1.1:8081", "server", 9000, "10.0.2.1");
    let rules = list(&lab);
    assert_eq!(rules.as_array().map(Vec::len), Some(2), "{rules:#}");
    assert!(rules.as_array().unwrap().iter().any(|r| r["dst_local"] == true && r["not"]["iface"] == true), "{rules:#}");
    guard.detach();
}

/// Docker's own `iptables-save -t nat` for a container published with `-p 8080:80`, with the lab's addresses (the
/// container is the server 10.0.2.2:9000, docker0 is eth1), imported as is: its user chain DOCKER, the RETURN, the
/// addrtype matches. Arriving connections and the router's own (OUTPUT) reach the container.
fn import_docker_save(mode: &str) {
    let lab = lab("neg-dockersave");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    let out = import_text(
        &lab,
        "*nat\n\
         :PREROUTING ACCEPT [0:0]\n\
         :INPUT ACCEPT [0:0]\n\
         :OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n\
         :DOCKER - [0:0]\n\
         -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n\
         -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER\n\
         -A POSTROUTING -s 10.0.2.0/24 ! -o eth1 -j MASQUERADE\n\
         -A POSTROUTING -s 10.0.2.2/32 -d 10.0.2.2/32 -p tcp -m tcp --dport 9000 -j MASQUERADE\n\
         -A DOCKER -i eth1 -j RETURN\n\
         -A DOCKER ! -i eth1 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.2.2:9000\n\
         COMMIT\n",
    );
    assert_eq!(list(&lab).as_array().map(Vec::len), Some(4), "{out}\n{:#}", list(&lab));
    // From outside, to the router's address: the container, seeing the client.
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    // From the router itself (OUTPUT, a --local rule): the container too.
    let reply = lab.tcp_request(Node::Router, sa("10.0.1.1:8080"), "x", tests::TIMEOUT).expect("local connection");
    assert!(reply.starts_with("hello from server port 9000"), "{reply}");
    guard.detach();
}

/// `pfwd import` of `text` (written to a scratch file, removed afterwards); its output.
fn import_text(lab: &Lab, text: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = std::env::temp_dir().join(format!("pfwd-e2e-neg-{}-{n}.rules", std::process::id()));
    std::fs::write(&file, text).unwrap();
    let out = pfwd_ok(lab, &["import", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    out
}

in_both_modes!(docker_style_rules, negated_source_and_destination, import_docker_rules, import_docker_save);
