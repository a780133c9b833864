//! End-to-end tests of the day-to-day commands that remove things: `pfwd flush`, `pfwd del ID...` (ranges, all or
//! nothing, `--flows`), `pfwd conntrack --flush`, and `pfwd import` of scripts that delete and flush
//! (`iptables -t nat -D PREROUTING N`, `-F`). Every scenario runs in both modes with the same assertions.

#[macro_use]
mod common;

use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use common::*;
use serde_json::Value;
use tests::{Node, TIMEOUT};

fn ids(list: &Value) -> Vec<u64> {
    list.as_array().unwrap().iter().map(|r| r["id"].as_u64().unwrap()).collect()
}

/// `pfwd flush` removes the rules and stays attached; traffic is untranslated; the sysctls only those rules needed
/// are restored; new rules work at once. `--inbound` leaves the snat/masquerade rules alone.
fn flush_stays_attached(mode: &str) {
    let lab = lab("fl-flush");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    let before_forward = "0";
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    add(&lab, &["masquerade", "-o", "eth1"]);
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.2.1");

    let out = pfwd_ok(&lab, &["flush", "--inbound"]);
    assert!(out.contains("removed rule 1: dnat -i eth0"), "{out}");
    assert_eq!(ids(&list(&lab)), [2], "--inbound keeps the masquerade rule");
    expect_tcp_fails(&lab, "10.0.1.1:8080");

    let out = pfwd_ok(&lab, &["flush"]);
    assert!(out.contains("removed rule 2: masquerade -o eth1"), "{out}");
    assert_eq!(list(&lab), serde_json::json!([]));
    let st = status(&lab);
    assert_eq!(st["mode"], mode, "still attached after flush: {st}");
    assert_eq!(st["interfaces"].as_array().map(Vec::len), Some(2), "{st}");
    assert_eq!(router_sysctl(&lab, "net.ipv4.ip_forward"), before_forward, "no rule needs forwarding any more");
    assert!(pfwd_ok(&lab, &["flush"]).contains("no rules to remove"));

    // New rules apply at once, with fresh ids.
    let id = add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    assert_eq!(id, 3);
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
}

/// `pfwd del` takes several ids and ranges, all or nothing.
fn bulk_delete(mode: &str) {
    let lab = lab("fl-del");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    for port in ["8080", "8081", "8082", "8083"] {
        add(&lab, &["dnat", "-p", "tcp", "--dport", port, "--to", "10.0.2.2:9000"]);
    }
    let all = list(&lab);
    for (args, needles) in [
        (vec!["del", "1", "99"], vec!["99", "nothing was deleted"]),
        (vec!["del", "2", "7-9"], vec!["7-9"]),
        (vec!["del", "1", "abc"], vec!["abc"]),
        (vec!["del", "3-1"], vec!["3-1"]),
    ] {
        pfwd_err(&lab, &args, &needles);
        assert_eq!(list(&lab), all, "`pfwd {}` failed but changed the rules", args.join(" "));
    }
    let out = pfwd_ok(&lab, &["del", "1", "3-4"]);
    assert!(out.contains("deleted rule 1") && out.contains("deleted rule 3") && out.contains("deleted rule 4"));
    assert_eq!(ids(&list(&lab)), [2]);
    expect_tcp_fails(&lab, "10.0.1.1:8080");
    expect_tcp(&lab, None, "10.0.1.1:8081", "server", 9000, "10.0.1.2");
}

/// After a rule change, live flows keep their old translation until `pfwd conntrack --flush` ends them: then UDP's
/// next datagram meets the new rule, and a long-lived TCP connection through the old rule is cut (eBPF: a packet in
/// the middle of a connection never starts a flow, it reaches the router, which resets it; iptables: netfilter
/// picks the connection up again under the new rule, whose server knows nothing of it and resets it).
fn conntrack_flush_applies_new_rules(mode: &str) {
    let lab = lab("fl-ct");
    let _a = udp_server(&lab, Node::Server, "10.0.2.2:9000", "udp-a");
    let _b = udp_server(&lab, Node::Server, "10.0.2.2:9001", "udp-b");
    let _tcp_a = line_echo_server(&lab, Node::Server, "10.0.2.2:9100");
    let _tcp_b = server(&lab, Node::Server, "10.0.2.2:9101", "tcp-b");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    let udp_rule = add(&lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8081", "--to", "10.0.2.2:9100"]);

    // One UDP socket and one TCP connection that live across the rule changes.
    let sock = lab.in_ns(Node::Client, || UdpSocket::bind("10.0.1.2:0")).unwrap().unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.connect(sa("10.0.1.1:8080")).unwrap();
    let ask = |sock: &UdpSocket| -> String {
        sock.send(b"hi").unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("UDP reply: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(ask(&sock).contains("udp-a"));
    let conn = lab.in_ns(Node::Client, || TcpStream::connect_timeout(&sa("10.0.1.1:8081"), TIMEOUT)).unwrap().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(exchange(&conn, "one"), Ok("one".into()));

    // More specific rules (with -s) now send this client elsewhere, but live flows keep their translation.
    add(&lab, &["dnat", "-i", "eth0", "-p", "udp", "-s", "10.0.1.2", "--dport", "8080", "--to", "10.0.2.2:9001"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "-s", "10.0.1.2", "--dport", "8081", "--to", "10.0.2.2:9101"]);
    assert!(ask(&sock).contains("udp-a"), "a live UDP flow keeps its translation until flushed");
    assert_eq!(exchange(&conn, "two"), Ok("two".into()), "a live TCP connection keeps its translation");

    // Bad input changes nothing.
    pfwd_err(&lab, &["conntrack", "--flush", "--rule", "99"], &["99"]);
    pfwd_err(&lab, &["conntrack", "--rule", "1"], &["--flush"]);
    assert!(ask(&sock).contains("udp-a"));

    // A filter that matches neither flow ends nothing.
    let out = pfwd_ok(&lab, &["conntrack", "--flush", "-p", "udp", "--dport", "9999"]);
    assert!(out.contains("ended 0 live flows"), "{out}");
    assert!(ask(&sock).contains("udp-a"));

    let out = pfwd_ok(&lab, &["conntrack", "--flush", "--rule", &udp_rule.to_string()]);
    assert!(out.contains("ended 1 live flow"), "{out}");
    assert!(ask(&sock).contains("udp-b"), "after the flush the next datagram meets the new rule");

    let out = pfwd_ok(&lab, &["conntrack", "--flush", "-p", "tcp", "--dport", "8081", "-s", "10.0.1.0/24"]);
    assert!(out.contains("ended 1 live flow"), "{out}");
    assert!(exchange(&conn, "three").is_err(), "the flushed TCP connection must be cut");
    expect_tcp(&lab, None, "10.0.1.1:8081", "tcp-b", 9101, "10.0.1.2");

    // `del --flows` removes a rule and ends its flows in one step.
    let sock2 = lab.in_ns(Node::Client, || UdpSocket::bind("10.0.1.2:0")).unwrap().unwrap();
    sock2.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock2.connect(sa("10.0.1.1:8080")).unwrap();
    assert!(ask(&sock2).contains("udp-b"));
    // Rule 3 now carries two flows: the first socket's (since its flush) and this one's.
    let out = pfwd_ok(&lab, &["del", "--flows", "3"]);
    assert!(out.contains("deleted rule 3") && out.contains("ended 2 live flows"), "{out}");
    assert!(ask(&sock2).contains("udp-a"), "with rule 3 gone the next datagram meets rule {udp_rule}");
    assert!(ask(&sock).contains("udp-a"));
}

/// The seed's flush loop (`iptables -t nat -D PREROUTING N`, N counting down) fed to `pfwd import` removes exactly
/// the rules it names; `-F POSTROUTING` in a script flushes only that hook.
fn import_runs_delete_scripts(mode: &str) {
    let lab = lab("fl-imp");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _guard = attach(&lab, mode, &["eth0", "eth1"]);
    let dir = std::env::temp_dir().join(format!("pfwd-e2e-flush-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let setup = write(
        "setup.sh",
        "iptables -t nat -A PREROUTING -p tcp --dport 8080 -j DNAT --to-destination 10.0.2.2:9000\n\
         iptables -t nat -A PREROUTING -p tcp --dport 8081 -j DNAT --to-destination 10.0.2.2:9000\n\
         iptables -t nat -A PREROUTING -p tcp --dport 8082 -j DNAT --to-destination 10.0.2.2:9000\n\
         iptables -t nat -A POSTROUTING -o eth1 -j MASQUERADE\n",
    );
    pfwd_ok(&lab, &["import", &setup]);
    assert_eq!(ids(&list(&lab)), [1, 2, 3, 4]);
    expect_tcp(&lab, None, "10.0.1.1:8081", "server", 9000, "10.0.2.1");

    // One line of the loop: the second PREROUTING rule, and nothing else.
    let one = write("one.sh", "iptables -t nat -D PREROUTING 2\n");
    let dry = pfwd_ok(&lab, &["import", "--dry-run", &one]);
    assert!(dry.contains("deletes rule 2") && dry.contains("pfwd del 2"), "{dry}");
    assert_eq!(ids(&list(&lab)), [1, 2, 3, 4], "--dry-run changes nothing");
    let out = pfwd_ok(&lab, &["import", &one]);
    assert!(out.contains("deleted 1 rule: ids 2"), "{out}");
    assert_eq!(ids(&list(&lab)), [1, 3, 4]);
    expect_tcp_fails(&lab, "10.0.1.1:8081");
    expect_tcp(&lab, None, "10.0.1.1:8082", "server", 9000, "10.0.2.1");

    // A bad index fails the whole script and changes nothing.
    let bad = write("bad.sh", "iptables -t nat -D PREROUTING 2\niptables -t nat -D PREROUTING 5\n");
    pfwd_err(&lab, &["import", &bad], &["line 2", "Index of deletion too big"]);
    assert_eq!(ids(&list(&lab)), [1, 3, 4]);

    // The whole loop, as the seed's `for i in $(... | tac); do iptables -t nat -D PREROUTING $i; done` runs it.
    let lines: String = (1..=2).rev().map(|i| format!("iptables -t nat -D PREROUTING {i}\n")).collect();
    let out = pfwd_ok(&lab, &["import", &write("loop.sh", &lines)]);
    assert!(out.contains("deleted 2 rules: ids 1, 3"), "{out}");
    assert_eq!(ids(&list(&lab)), [4], "the loop removes exactly the PREROUTING rules");
    expect_tcp_fails(&lab, "10.0.1.1:8080");

    pfwd_ok(&lab, &["import", &write("flush.sh", "iptables -t nat -F POSTROUTING\niptables -t nat -X\n")]);
    assert_eq!(list(&lab), serde_json::json!([]));
    let _ = std::fs::remove_dir_all(&dir);
}

in_both_modes!(flush_stays_attached, bulk_delete, conntrack_flush_applies_new_rules, import_runs_delete_scripts);
