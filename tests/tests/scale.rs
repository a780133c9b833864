//! End-to-end test of the rule engine at a scale the former one refused, in both modes with the same assertions:
//! 10,000 rules sharing one destination port (each with its own source), "every port but 22" as two ranges, and six
//! more full-range rules (the old engine took one map entry per port: the fifth full range did not fit); then one
//! rule added and deleted on top, which must win and then give way; then two rules with the same match (the newer one
//! hidden behind the older), deleted one at a time: each deletion must hand the port to the next rule. In eBPF mode
//! these are small changes, which look only at the keys they touch: the index and the match shapes must come back to
//! what the attach made.

#[macro_use]
mod common;

use std::fmt::Write as _;

use common::*;
use tests::Node;

/// Rules that share the port with the client's rule, each for its own source (none of them the client).
const SAME_PORT_RULES: u32 = 10_000;

/// The config: the same-port rules first (they rank ahead of the client's port rule: a /32 source is more specific
/// than none), the ranges, the client's port rule last.
fn config() -> String {
    let mut s = String::new();
    let mut id = 0;
    let mut rule = |body: &str| {
        id += 1;
        let _ = write!(s, "[[rule]]\nid = {id}\nkind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\n{body}\n");
    };
    for i in 0..SAME_PORT_RULES {
        let src = std::net::Ipv4Addr::from(0x0a80_0000 + i);
        rule(&format!("src = \"{src}\"\ndport = 8080\nto = \"10.0.2.2:9009\"\n"));
    }
    // Every port but 22, for the client.
    rule("src = \"10.0.1.2\"\ndport = \"1-21\"\nto = \"10.0.2.2:9000\"\n");
    rule("src = \"10.0.1.2\"\ndport = \"23-65535\"\nto = \"10.0.2.2:9000\"\n");
    // Six more full ranges, for other sources.
    for i in 0..6 {
        rule(&format!("src = \"203.0.113.{i}\"\ndport = \"1-65535\"\nto = \"10.0.2.2:9009\"\n"));
    }
    rule("dst = \"10.0.1.1\"\ndport = 8080\nto = \"10.0.2.2:9002\"\n");
    s
}

fn many_rules_with_ranges(mode: &str) {
    let lab = lab("scale");
    let _range = server(&lab, Node::Server, "10.0.2.2:9000", "range");
    let _port = server(&lab, Node::Server, "10.0.2.2:9002", "port");
    let _added = server(&lab, Node::Server, "10.0.2.2:9003", "added");
    let file = std::env::temp_dir().join(format!("pfwd-e2e-scale-{}-{mode}.toml", std::process::id()));
    std::fs::write(&file, config()).unwrap();
    let guard = Detach::new(&lab);
    pfwd_ok(&lab, &["attach", "--mode", mode, "eth0", "eth1", "--config", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    let rules = list(&lab);
    assert_eq!(rules.as_array().map(Vec::len), Some(SAME_PORT_RULES as usize + 9));
    if mode == "ebpf" {
        // One index key per same-port rule, per prefix block of the ranges (6 + 13 for every port but 22, 16 for
        // each full range) and one for the client's port rule; one match shape per port prefix length with a /32
        // source (1 to 16), and the port rule's.
        let st: serde_json::Value = serde_json::from_str(&pfwd_ok(&lab, &["status", "--json"])).unwrap();
        let engine = &st["rule_engine"];
        assert_eq!(engine["index_keys"], SAME_PORT_RULES + 6 + 13 + 6 * 16 + 1, "{engine:#}");
        // Every rule is IPv4: the IPv4 form of the index holds every key too.
        assert_eq!(engine["index4_keys"], engine["index_keys"], "{engine:#}");
        assert_eq!(engine["classes"]["prerouting"], 17, "{engine:#}");
        assert_eq!(engine["classes"]["postrouting"], 0, "{engine:#}");
    }

    // The client's port rule, behind the 10,000 rules of the same port.
    expect_tcp(&lab, None, "10.0.1.1:8080", "port", 9002, "10.0.1.2");
    // The ranges: any port but 22.
    expect_tcp(&lab, None, "10.0.1.1:21", "range", 9000, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:5000", "range", 9000, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:65535", "range", 9000, "10.0.1.2");
    expect_tcp_fails(&lab, "10.0.1.1:22");

    // One rule on top: a single port beats the range, and once deleted the range takes over again.
    let id = pfwd_ok(&lab, &["add", "dnat", "-i", "eth0", "-p", "tcp", "--dport", "5000", "--to", "10.0.2.2:9003"]);
    expect_tcp(&lab, None, "10.0.1.1:5000", "added", 9003, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:5001", "range", 9000, "10.0.1.2");
    pfwd_ok(&lab, &["del", id.trim()]);
    expect_tcp(&lab, None, "10.0.1.1:5000", "range", 9000, "10.0.1.2");

    // The same match twice: the older rule wins, the newer one waits behind it (the kernel's entry of the key does
    // not list it) and takes over when the older one goes.
    let engine_before = engine(&lab, mode);
    let add_first = ["add", "dnat", "-i", "eth0", "-p", "tcp", "--dport", "5000", "--to", "10.0.2.2:9003"];
    let mut cmd = lab.pfwd(add_first).unwrap();
    cmd.env("PFWD_LOG", "debug");
    let out = run_bounded(cmd, PFWD_TIMEOUT);
    assert!(out.success, "{out:?}");
    let way = if mode == "ebpf" { "small change: 0 rules removed, 1 added" } else { "full change" };
    assert!(out.stderr.contains(way), "{mode}: the add must be a {way}: {}", out.stderr);
    let first = out.stdout;
    let second = pfwd_ok(&lab, &["add", "dnat", "-i", "eth0", "-p", "tcp", "--dport", "5000", "--to", "10.0.2.2:9002"]);
    expect_tcp(&lab, None, "10.0.1.1:5000", "added", 9003, "10.0.1.2");
    if let Some(e) = engine(&lab, mode) {
        // Their one key, and their match shape (no source, a single port) is new.
        let before = engine_before.as_ref().unwrap();
        assert_eq!(e["index_keys"], before["index_keys"].as_u64().unwrap() + 1, "{e:#}");
        assert_eq!(e["index4_keys"], e["index_keys"], "the small add writes the IPv4 index too: {e:#}");
        assert_eq!(e["classes"]["prerouting"], 18, "{e:#}");
    }
    pfwd_ok(&lab, &["del", first.trim()]);
    expect_tcp(&lab, None, "10.0.1.1:5000", "port", 9002, "10.0.1.2");
    pfwd_ok(&lab, &["del", second.trim()]);
    expect_tcp(&lab, None, "10.0.1.1:5000", "range", 9000, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:8080", "port", 9002, "10.0.1.2");
    let after = engine(&lab, mode);
    assert_eq!(
        after.as_ref().map(|e| (&e["index_keys"], &e["index4_keys"], &e["classes"])),
        engine_before.as_ref().map(|e| (&e["index_keys"], &e["index4_keys"], &e["classes"])),
        "the index and the shapes after the deletions"
    );
    guard.detach();
}

/// `status --json`'s rule engine (eBPF mode).
fn engine(lab: &tests::Lab, mode: &str) -> Option<serde_json::Value> {
    (mode == "ebpf").then(|| {
        let st: serde_json::Value = serde_json::from_str(&pfwd_ok(lab, &["status", "--json"])).unwrap();
        st["rule_engine"].clone()
    })
}

in_both_modes!(many_rules_with_ranges);
