//! `cargo xtask demo`: pfwd forwarding real TCP/UDP traffic in a client / router / server lab.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use tests::lab::Reply;
use tests::{Lab, Node, TIMEOUT};

use crate::step;

/// pfwd is expected to return quickly; a hang must not hang the demo.
const PFWD_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
enum Proto {
    Tcp,
    Udp,
}

/// One client request and what must answer it.
struct Case {
    proto: Proto,
    to: &'static str,
    expect_label: &'static str,
    expect_port: u16,
    what: &'static str,
}

const CASES: [Case; 5] = [
    Case { proto: Proto::Tcp, to: "10.0.1.1:59999", expect_label: "router-web", expect_port: 80, what: "redirect" },
    Case {
        proto: Proto::Tcp,
        to: "10.0.1.1:3306",
        expect_label: "router-mysql",
        expect_port: 17355,
        what: "dnat to loopback",
    },
    Case { proto: Proto::Tcp, to: "10.0.1.1:8080", expect_label: "server", expect_port: 9000, what: "dnat to server" },
    Case { proto: Proto::Udp, to: "10.0.1.1:8080", expect_label: "server", expect_port: 9000, what: "dnat to server" },
    Case {
        proto: Proto::Tcp,
        to: "[2001:db8:1::1]:8080",
        expect_label: "server6",
        expect_port: 9000,
        what: "dnat, IPv6",
    },
];

pub fn demo(pfwd: &Path) -> Result<()> {
    step("demo: creating the client / router / server lab (IPv4 and IPv6)");
    let lab = Lab::dual_stack("pfwd-demo")?;
    let sa = |s: &str| s.parse::<SocketAddr>().expect("valid literal address");
    let _web = lab.tcp_echo_server(Node::Router, sa("10.0.1.1:80"), "router-web")?;
    let _mysql = lab.tcp_echo_server(Node::Router, sa("127.0.0.1:17355"), "router-mysql")?;
    let _tcp = lab.tcp_echo_server(Node::Server, sa("10.0.2.2:9000"), "server")?;
    let _udp = lab.udp_echo_server(Node::Server, sa("10.0.2.2:9000"), "server")?;
    let _tcp6 = lab.tcp_echo_server(Node::Server, sa("[2001:db8:2::2]:9000"), "server6")?;
    println!(
        "    router: web 10.0.1.1:80, \"mysql\" 127.0.0.1:17355; server: tcp+udp 10.0.2.2:9000, tcp [2001:db8:2::2]:9000"
    );

    let run = |args: &[&str]| -> Result<String> {
        println!("    $ pfwd {}", args.join(" "));
        run_bounded(lab.cmd(Node::Router, pfwd, args), PFWD_TIMEOUT)
    };

    step("demo: pfwd attach + rules (in the router namespace)");
    run(&["attach", "eth0", "eth1"])?;
    // Detach whatever happens next; the lab's drop then removes the namespaces.
    let result = (|| -> Result<usize> {
        run(&["add", "redirect", "-p", "tcp", "--dport", "59999", "--to-port", "80"])?;
        run(&["add", "dnat", "-i", "eth0", "-p", "tcp", "--dport", "3306", "--to", "127.0.0.1:17355"])?;
        run(&["add", "dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"])?;
        run(&["add", "dnat", "-i", "eth0", "-p", "udp", "--dport", "8080", "--to", "10.0.2.2:9000"])?;
        run(&["add", "dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "[2001:db8:2::2]:9000"])?;

        step("demo: requests from the client (10.0.1.2, 2001:db8:1::2)");
        println!(
            "    {:<5} {:<22} {:<18} {:<20} {:<22} result",
            "proto", "sent to", "rule", "answered by", "backend saw"
        );
        let ok = CASES.iter().filter(|c| request(&lab, c)).count();

        step("demo: pfwd status");
        print_indented(&run(&["status"])?);
        step("demo: pfwd conntrack (live translations)");
        print_indented(&run(&["conntrack"])?);
        step("demo: pfwd list");
        print_indented(&run(&["list"])?);
        Ok(ok)
    })();
    step("demo: pfwd detach");
    let detached = run(&["detach"]);
    step("demo: removing the lab");
    drop(lab);

    let ok = result?;
    detached?;
    let total = CASES.len();
    if ok != total {
        bail!("demo FAILED: {ok}/{total} requests forwarded by pfwd");
    }
    println!("demo OK: {ok}/{total} requests forwarded by pfwd");
    Ok(())
}

/// Sends one request from the client, prints a table row, returns whether it was forwarded right.
fn request(lab: &Lab, case: &Case) -> bool {
    let to: SocketAddr = case.to.parse().expect("valid literal address");
    let (proto, reply) = match case.proto {
        Proto::Tcp => ("tcp", lab.tcp_request(Node::Client, to, "hi", TIMEOUT).map(|r| (r, to))),
        Proto::Udp => ("udp", lab.udp_request(Node::Client, to, "hi", TIMEOUT)),
    };
    let row = |answered: &str, saw: &str, result: &str| {
        println!("    {proto:<5} {:<22} {:<18} {answered:<20} {saw:<22} {result}", case.to, case.what);
    };
    let (text, src) = match reply {
        Ok(r) => r,
        Err(e) => {
            row("-", "-", &format!("FAIL: {:#}", e));
            return false;
        }
    };
    let Some(reply) = Reply::parse(&text) else {
        row("?", "?", &format!("FAIL: unexpected reply {text:?}"));
        return false;
    };
    let answered = format!("{}:{}", reply.label, reply.port);
    let saw = reply.peer.to_string();
    if reply.label != case.expect_label || reply.port != case.expect_port {
        let want = format!("{}:{}", case.expect_label, case.expect_port);
        row(&answered, &saw, &format!("FAIL: expected {want}"));
        false
    } else if src != to {
        // The reply must come back translated, from the address the client talked to.
        row(&answered, &saw, &format!("FAIL: reply from {src}"));
        false
    } else {
        row(&answered, &saw, "ok");
        true
    }
}

/// Runs a command with a deadline; stdout on success, an error with stderr otherwise.
fn run_bounded(cmd: Command, timeout: Duration) -> Result<String> {
    crate::bench::run::run(cmd, timeout, false).map(|f| f.stdout)
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("      {line}");
    }
}
