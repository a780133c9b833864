//! `--fast-forward` (eBPF mode only): forwarded packets of translated flows skip the router's IP stack. The traffic
//! must be the same as without it, the stack's forwarding counter must not see those packets, and what the fast path
//! leaves to the stack (TTL about to expire) must still work.

mod common;

use std::net::UdpSocket;
use std::os::fd::AsRawFd;

use common::*;
use tests::{Lab, Node, TIMEOUT};

/// The router's count of datagrams forwarded by the IP stack (`Ip: ForwDatagrams` in /proc/net/snmp).
fn forwarded_by_stack(lab: &Lab) -> u64 {
    let snmp = sh(lab, Node::Router, "cat /proc/net/snmp");
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().expect("Ip header"), ip.next().expect("Ip values"));
    let at = names.split_whitespace().position(|n| n == "ForwDatagrams").expect("ForwDatagrams");
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

#[test]
fn fast_forward_skips_the_stack_and_keeps_nat_working() {
    let lab = Lab::new("fastpath").expect("lab");
    let _tcp = lab.tcp_echo_server(Node::Server, sa("10.0.2.2:9000"), "server").unwrap();
    let _udp = lab.udp_echo_server(Node::Server, sa("10.0.2.2:9000"), "server").unwrap();
    // Full NAT: the server has no route back to the client.
    sh(&lab, Node::Server, "ip route del default");
    let _guard = attach(&lab, "ebpf", &["eth0", "eth1", "--fast-forward"]);
    assert_eq!(status(&lab)["fast_forward"], true);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    add(&lab, &["masquerade", "-o", "eth1"]);

    let before = forwarded_by_stack(&lab);
    for _ in 0..20 {
        expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.2.1");
        expect_udp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.2.1");
    }
    let by_stack = forwarded_by_stack(&lab) - before;
    let translated: u64 =
        status(&lab)["rules"].as_array().unwrap().iter().map(|r| r["packets"].as_u64().unwrap()).sum();
    // 20 TCP connections (>= 5 packets each way) and 20 UDP exchanges went through; at most the odd packet whose
    // next hop was not resolved yet may take the stack.
    assert!(translated >= 200, "translated only {translated} packets");
    assert!(by_stack <= 4, "{by_stack} packets were forwarded by the stack, not the fast path");

    // A packet whose TTL would expire at the router is left to the stack, which sends the time-exceeded error;
    // pfwd translates it back, so the connected socket hears of it.
    let err = lab
        .in_ns(Node::Client, || -> std::io::Result<std::io::Error> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            let fd = s.as_raw_fd();
            let one: libc::c_int = 1;
            // SAFETY: valid socket and option values of the sizes given.
            unsafe {
                libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, (&one as *const libc::c_int).cast(), 4);
                libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_RECVERR, (&one as *const libc::c_int).cast(), 4);
            }
            s.connect("10.0.1.1:8080")?;
            s.set_read_timeout(Some(TIMEOUT))?;
            s.send(b"ttl")?;
            let mut buf = [0u8; 64];
            Ok(s.recv(&mut buf).expect_err("a reply despite TTL 1"))
        })
        .unwrap()
        .unwrap();
    assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH), "expected the time-exceeded error, got {err}");
}
