//! End-to-end tests of DNAT rules with several backends (`--to A,B,C`), in both modes with the same assertions:
//! three backends in the server namespace as three addresses; many connections spread over all three; every line of
//! a connection is answered by the one backend it started with; `status` counts each backend's connections exactly;
//! removing a backend from the rule keeps its established connection and sends no new one there.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::*;
use tests::{Lab, Node, TIMEOUT};

const BACKENDS: [&str; 3] = ["10.0.2.2", "10.0.2.3", "10.0.2.4"];
const CONNECTIONS: usize = 45;

/// A TCP server on `addr` answering every line of every connection with `LABEL LINE`, until `stop` (bounded: it
/// polls, and each connection ends with the client or a read timeout).
fn labeled_line_server(lab: &Lab, addr: &str, label: &'static str, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let listener = lab.in_ns(Node::Server, || TcpListener::bind(sa(addr))).unwrap().unwrap();
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    thread::spawn(move || {
                        stream.set_nonblocking(false).unwrap();
                        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
                        let mut writer = stream.try_clone().unwrap();
                        for line in BufReader::new(stream).lines() {
                            let Ok(line) = line else { return };
                            if writer.write_all(format!("{label} {line}\n").as_bytes()).is_err() {
                                return;
                            }
                        }
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    })
}

/// Opens a connection to the router's port 8080 and exchanges three lines; returns the connection and the label of
/// the backend that answered (all three lines by the same one).
#[track_caller]
fn connect(lab: &Lab) -> (TcpStream, String) {
    let conn = lab.in_ns(Node::Client, || TcpStream::connect_timeout(&sa("10.0.1.1:8080"), TIMEOUT)).unwrap().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut label = None;
    for i in 0..3 {
        let back = exchange(&conn, &format!("line{i}")).unwrap_or_else(|e| panic!("line {i}: {e}"));
        let (l, rest) = back.split_once(' ').unwrap_or_else(|| panic!("unlabeled reply {back:?}"));
        assert_eq!(rest, format!("line{i}"));
        match &label {
            None => label = Some(l.to_string()),
            Some(first) => assert_eq!(first, l, "one connection answered by two backends"),
        }
    }
    (conn, label.unwrap())
}

fn spread_and_stay(mode: &str) {
    let lab = lab("lb-spread");
    for a in &BACKENDS[1..] {
        lab.add_addr(Node::Server, "eth0", &format!("{a}/24")).unwrap_or_else(|e| panic!("{e:#}"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = BACKENDS
        .iter()
        .zip(["b2", "b3", "b4"])
        .map(|(a, l)| labeled_line_server(&lab, &format!("{a}:9000"), l, stop.clone()))
        .collect();
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    let id = add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2-10.0.2.4:9000"]);
    let shown = list(&lab);
    assert_eq!(shown[0]["backends"].as_array().map(Vec::len), Some(3), "{shown:#}");

    let mut per_backend: HashMap<String, u64> = HashMap::new();
    for _ in 0..CONNECTIONS {
        let (_conn, label) = connect(&lab);
        *per_backend.entry(label).or_default() += 1;
    }
    // 15 expected each; fewer than 4 of 45 has a probability of about 1e-4 for a fair spread (random in iptables
    // mode, by hash in eBPF mode).
    for l in ["b2", "b3", "b4"] {
        assert!(per_backend.get(l).copied().unwrap_or(0) >= 4, "{per_backend:?}");
    }
    // status counts each backend's connections exactly (eBPF: flows; iptables: the first packet of each).
    let st = status(&lab);
    let rule = rule_of(&st, id);
    let counted = rule["backend_counters"].as_array().unwrap_or_else(|| panic!("{rule:#}"));
    assert_eq!(counted.len(), 3, "{rule:#}");
    for (b, l) in counted.iter().zip(["b2", "b3", "b4"]) {
        let key = if mode == "ebpf" { "flows" } else { "packets" };
        assert_eq!(b[key].as_u64(), Some(per_backend[l]), "{l}: {rule:#}");
    }
    let text = pfwd_ok(&lab, &["status"]);
    assert!(text.contains("backend 10.0.2.3:9000"), "{text}");

    // A connection held open, then its backend removed from the rule (del + add): it goes on with its backend, and
    // no new connection goes there.
    let (held, held_label) = connect(&lab);
    let gone = BACKENDS[["b2", "b3", "b4"].iter().position(|l| *l == held_label).unwrap()];
    let rest: Vec<String> = BACKENDS.iter().filter(|a| **a != gone).map(|a| format!("{a}:9000")).collect();
    del(&lab, id);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", &rest.join(",")]);
    assert_eq!(exchange(&held, "after"), Ok(format!("{held_label} after")), "the held connection moved or broke");
    for _ in 0..15 {
        let (_c, label) = connect(&lab);
        assert_ne!(label, held_label, "a new connection went to the removed backend");
    }
    drop(held);
    guard.detach();
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

/// The cap on rules with several backends counts every rule: after an import of 256 such rules, one more `add` is
/// refused (changing nothing), and once one of them is deleted the same `add` goes in (in eBPF mode both are small
/// changes, which do not look at the other rules: the count is kept with the state).
fn backend_rule_cap(mode: &str) {
    let lab = lab("lb-cap");
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    let mut save = String::from("*nat\n");
    for i in 0..256 {
        let port = 10_000 + i;
        save.push_str(&format!(
            "-A PREROUTING -i eth0 -p tcp --dport {port} -j DNAT --to-destination 10.0.2.2-10.0.2.3:9000\n"
        ));
    }
    save.push_str("COMMIT\n");
    let file = std::env::temp_dir().join(format!("pfwd-e2e-lb-cap-{}-{mode}.txt", std::process::id()));
    std::fs::write(&file, save).unwrap();
    pfwd_ok(&lab, &["import", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(list(&lab).as_array().map(Vec::len), Some(256));
    let one_more = ["add", "dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000,10.0.2.3:9000"];
    pfwd_err(&lab, &one_more, &["more than 256 rules with several backends"]);
    assert_eq!(list(&lab).as_array().map(Vec::len), Some(256), "a refused add changes nothing");
    del(&lab, 1);
    pfwd_ok(&lab, &one_more);
    assert_eq!(list(&lab).as_array().map(Vec::len), Some(256));
    guard.detach();
}

in_both_modes!(spread_and_stay, backend_rule_cap);
