//! `pfwd run`: attach in the foreground, stream the kernel's events and the counters, detach on SIGTERM.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use tests::{Lab, Node};

#[test]
fn run_streams_events_and_detaches_on_sigterm() {
    let lab = Lab::new("run").expect("lab");
    let _srv = lab.tcp_echo_server(Node::Server, sa("10.0.2.2:9000"), "server").unwrap();
    let config = std::env::temp_dir().join(format!("pfwd-run-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "[[rule]]\nkind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\ndport = 8080\nto = \"10.0.2.2:9000\"\n",
    )
    .unwrap();
    let mut cmd = lab
        .pfwd(["run", "eth0", "eth1", "--mode", "ebpf", "--interval", "1", "--config", config.to_str().unwrap()])
        .unwrap();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("pfwd run");
    // Make sure the child goes away even if an assertion below fails.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let guard = Detach::new(&lab);

    // Attached within a bounded time, then real traffic.
    let start = Instant::now();
    while status(&lab)["attached"] != true {
        assert!(start.elapsed() < Duration::from_secs(20), "pfwd run did not attach");
        std::thread::sleep(Duration::from_millis(100));
    }
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    std::thread::sleep(Duration::from_millis(1500));

    // SIGTERM: pfwd detaches and restores, then exits successfully.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "pfwd run did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    child.stdout.take().unwrap().read_to_string(&mut log).unwrap();
    let _child = Kill(child);
    assert!(exit.success(), "pfwd run exited with {exit}: {log}");
    assert!(log.contains("new flow 10.0.1.2:"), "no new-flow event from the kernel in:\n{log}");
    assert!(log.contains("-> 10.0.2.2:9000"), "the event should name the translation:\n{log}");
    assert!(log.contains("#1: 1 flows"), "no counter line in:\n{log}");
    assert!(log.contains("detached from eth0, eth1"), "no detach on SIGTERM in:\n{log}");
    assert_eq!(status(&lab)["attached"], false, "still attached after pfwd run exited");
    assert_eq!(router_sysctl(&lab, "net.ipv4.ip_forward"), "0", "ip_forward not restored");
    drop(guard);
    let _ = std::fs::remove_file(&config);
}
