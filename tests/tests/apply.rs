//! End-to-end tests of `pfwd apply --config FILE` (make the rules exactly the file's, as one change) and `pfwd save`
//! (the running rules as such a file), in both modes with the same assertions.

#[macro_use]
mod common;

use std::net::TcpStream;

use common::*;
use serde_json::Value;
use tests::{Node, TIMEOUT};

fn ids_and_text(list: &Value) -> Vec<(u64, String)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_u64().unwrap(), r["text"].as_str().unwrap_or_default().to_string()))
        .collect()
}

const A: &str = "[[rule]]\nkind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\ndport = 8080\nto = \"10.0.2.2:9100\"\n";
const B: &str = "[[rule]]\nkind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\ndport = 8081\nto = \"10.0.2.2:9000\"\n";
const C: &str = "[[rule]]\nkind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\ndport = 8082\nto = \"10.0.2.2:9000\"\n";

/// apply keeps, removes and adds exactly the difference; a kept rule keeps its id and its live connections; a bad
/// file changes nothing; save reads back as no change; apply with interfaces attaches first.
fn apply_and_save(mode: &str) {
    let lab = lab("ap-apply");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _long = line_echo_server(&lab, Node::Server, "10.0.2.2:9100");
    let dir = std::env::temp_dir().join(format!("pfwd-e2e-apply-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };

    // Not attached and no interfaces: refused, with the way out.
    let first = write("first.toml", &format!("{A}{B}"));
    pfwd_err(&lab, &["apply", "--config", &first], &["not attached", "IFACE"]);
    // With interfaces it attaches first.
    let guard = Detach::new(&lab);
    let out = pfwd_ok(&lab, &["apply", "eth0", "eth1", "--mode", mode, "--config", &first]);
    assert!(out.contains("0 kept, 0 removed, 2 added"), "{out}");
    assert_eq!(status(&lab)["mode"], mode);
    let before = ids_and_text(&list(&lab));
    assert_eq!(before.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1, 2]);

    // A connection through rule 1 that must outlive the apply.
    let conn = lab.in_ns(Node::Client, || TcpStream::connect_timeout(&sa("10.0.1.1:8080"), TIMEOUT)).unwrap().unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
    assert_eq!(exchange(&conn, "one"), Ok("one".into()));
    expect_tcp(&lab, None, "10.0.1.1:8081", "server", 9000, "10.0.1.2");

    let second = write("second.toml", &format!("{C}{A}"));
    let dry = pfwd_ok(&lab, &["apply", "--config", &second, "--dry-run"]);
    assert!(dry.contains("keep") && dry.contains("- remove    2") && dry.contains("+ add"), "{dry}");
    assert!(dry.contains("1 kept, 1 removed, 1 added"), "{dry}");
    assert_eq!(ids_and_text(&list(&lab)), before, "--dry-run changes nothing");

    // A bad file changes nothing, and says where.
    let bad = write("bad.toml", &format!("{A}[[rule]]\nkind = \"dnat\"\nsrc = \"10.0.0.300\"\nto = \"10.0.2.2\"\n"));
    pfwd_err(&lab, &["apply", "--config", &bad], &["[[rule]] #2", "src", "10.0.0.300"]);
    assert_eq!(ids_and_text(&list(&lab)), before);

    let out = pfwd_ok(&lab, &["apply", "--config", &second]);
    assert!(out.contains("1 kept, 1 removed, 1 added") && out.contains("added rule ids: 3"), "{out}");
    let after = ids_and_text(&list(&lab));
    assert_eq!(after.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1, 3], "rule 1 kept its id: {after:?}");
    assert_eq!(exchange(&conn, "two"), Ok("two".into()), "a connection through a kept rule survives apply");
    expect_tcp_fails(&lab, "10.0.1.1:8081");
    expect_tcp(&lab, None, "10.0.1.1:8082", "server", 9000, "10.0.1.2");

    // save writes what apply reads: applying it changes nothing.
    let saved = pfwd_ok(&lab, &["save"]);
    let out = pfwd_ok(&lab, &["apply", "--config", &write("saved.toml", &saved)]);
    assert!(out.contains("2 kept, 0 removed, 0 added"), "{out}\n{saved}");
    assert_eq!(ids_and_text(&list(&lab)), after);
    guard.detach();
    let _ = std::fs::remove_dir_all(&dir);
}

in_both_modes!(apply_and_save);
