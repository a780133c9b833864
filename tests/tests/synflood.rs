//! End to end: a SYN flood against a forwarded port must not cut the connections already established through it.
//! With `--ct-size 1024`, 20 idle TCP connections through a DNAT rule, then 8,192 SYNs from spoofed sources (a
//! documentation range, routed to the client namespace so that the server's SYN-ACKs stay inside the lab) sent from
//! a raw socket in the client namespace: every connection must still exchange data, and a new connection must work
//! after the flood. Both modes, the same assertions; the numbers are printed.
//!
//! In iptables mode `--ct-size` has no effect: netfilter's table is sized by the host-wide `nf_conntrack_max`, which
//! pfwd does not change (and which is not writable from a network namespace other than the host's).

#[macro_use]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tests::{Lab, Node, TIMEOUT};

const CONNECTIONS: usize = 20;
const SYNS: u32 = 8192;
/// Spoofed sources: 198.51.100.0/24 (TEST-NET-2), routed by the router back to the client namespace.
const SPOOFED_NET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 0);
const FRONT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const FRONT_PORT: u16 = 8080;

/// A TCP server that echoes every line on every connection (up to `max` connections, each bounded by timeouts),
/// until the returned flag is set.
fn multi_line_echo(lab: &Lab, addr: &str, max: usize) -> (Arc<AtomicBool>, thread::JoinHandle<()>) {
    let listener = lab.in_ns(Node::Server, || TcpListener::bind(sa(addr))).unwrap().unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut accepted = 0;
        while !flag.load(Ordering::Relaxed) && accepted < max && Instant::now() < deadline {
            let Ok((stream, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(10));
                continue;
            };
            accepted += 1;
            stream.set_nonblocking(false).unwrap();
            // Idle connections stay open through the flood: a long read timeout, and EOF ends the thread.
            stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                for line in BufReader::new(stream).lines().take(1000) {
                    let Ok(line) = line else { return };
                    if writer.write_all(format!("{line}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (stop, handle)
}

/// One line out and back with a read timeout.
fn roundtrip(stream: &TcpStream, line: &str) -> Result<(), String> {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    match exchange(stream, line) {
        Ok(back) if back == line => Ok(()),
        Ok(back) => Err(format!("echoed {back:?} for {line:?}")),
        Err(e) => Err(e),
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 + TCP SYN from `src:sport` to `dst:dport`, every checksum right.
fn syn_packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, seq: u32) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let c = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// Sends `SYNS` SYNs from spoofed sources in the client namespace (raw socket, IP_HDRINCL through IPPROTO_RAW). Returns how many the
/// kernel accepted.
fn flood(lab: &Lab) -> u32 {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = lab
        // IPPROTO_RAW: the caller writes the IP header (IP_HDRINCL implied), so the source can be any address.
        .in_ns(Node::Client, || {
            Socket::new(Domain::IPV4, Type::from(libc::SOCK_RAW), Some(Protocol::from(libc::IPPROTO_RAW)))
        })
        .expect("entering the client namespace")
        .expect("raw IP socket");
    let to = SocketAddrV4::new(FRONT, 0).into();
    let mut sent = 0;
    for i in 0..SYNS {
        let src = Ipv4Addr::from(u32::from(SPOOFED_NET) + 1 + i % 254);
        let sport = 1024 + (i / 254) as u16;
        let pkt = syn_packet(src, sport, FRONT, FRONT_PORT, i.wrapping_mul(2_654_435_761));
        if sock.send_to(&pkt, &to).is_ok() {
            sent += 1;
        }
        // Let the receiving side drain its backlog now and then (veth queues into a per-CPU backlog of 1,000).
        if i % 512 == 511 {
            thread::sleep(Duration::from_millis(2));
        }
    }
    sent
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn syn_flood_keeps_established_connections(mode: &str) {
    let lab = lab("synflood");
    // The spoofed range lives behind the client: the server's SYN-ACKs go there (and are dropped, unowned).
    sh(&lab, Node::Router, "ip route add 198.51.100.0/24 via 10.0.1.2");
    for key in ["all", "default", "eth0", "eth1"] {
        sh(&lab, Node::Router, &format!("sysctl -qw net.ipv4.conf.{key}.rp_filter=0"));
    }
    let (stop, server) = multi_line_echo(&lab, "10.0.2.2:9000", CONNECTIONS + 8);
    let _guard = Detach::new(&lab);
    pfwd_ok(&lab, &["attach", "--mode", mode, "--ct-size", "1024", "eth0", "eth1"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);

    let conns: Vec<TcpStream> = lab
        .in_ns(Node::Client, || {
            (0..CONNECTIONS)
                .map(|_| TcpStream::connect_timeout(&sa("10.0.1.1:8080"), TIMEOUT))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .expect("opening the connections");
    for (i, c) in conns.iter().enumerate() {
        roundtrip(c, &format!("before {i}")).unwrap_or_else(|e| panic!("connection {i} before the flood: {e}"));
    }
    let before = status(&lab);

    let started = Instant::now();
    let sent = flood(&lab);
    let took = started.elapsed();
    // Let the server answer the last SYNs (and the data path handle its SYN-ACKs) before looking.
    thread::sleep(Duration::from_millis(500));
    let after = status(&lab);

    let alive: Vec<Result<(), String>> =
        conns.iter().enumerate().map(|(i, c)| roundtrip(c, &format!("after {i}"))).collect();
    let alive_count = alive.iter().filter(|r| r.is_ok()).count();
    let new_conn = lab
        .in_ns(Node::Client, || TcpStream::connect_timeout(&sa("10.0.1.1:8080"), Duration::from_secs(5)))
        .unwrap()
        .map_err(|e| e.to_string())
        .and_then(|c| roundtrip(&c, "new after the flood"));

    let ct = &after["conntrack"];
    let stats = &after["stats"];
    eprintln!(
        "synflood [{mode}]: {sent} of {SYNS} spoofed SYNs sent in {took:.2?}; connections alive {alive_count} of \
         {CONNECTIONS}; new connection after the flood: {}",
        match &new_conn {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("FAILED ({e})"),
        }
    );
    match mode {
        "ebpf" => eprintln!(
            "synflood [ebpf]: conntrack before: {} entries ({} confirmed); after: confirmed {} flows ({}/{} entries), \
             unconfirmed {} flows ({}/{} entries); new_flows {}, flows_confirmed {}, unconfirmed_entries_restored {}, \
             conntrack_insert_failed {}, conntrack_clash_drops {}",
            n(&before["conntrack"]["entries"]),
            n(&before["conntrack"]["confirmed"]["entries"]),
            n(&ct["confirmed"]["flows"]),
            n(&ct["confirmed"]["entries"]),
            n(&ct["confirmed"]["capacity"]),
            n(&ct["unconfirmed"]["flows"]),
            n(&ct["unconfirmed"]["entries"]),
            n(&ct["unconfirmed"]["capacity"]),
            n(&stats["new_flows"]),
            n(&stats["flows_confirmed"]),
            n(&stats["unconfirmed_entries_restored"]),
            n(&stats["conntrack_insert_failed"]),
            n(&stats["conntrack_clash_drops"]),
        ),
        _ => eprintln!(
            "synflood [iptables]: netfilter conntrack entries in the router namespace before {}, after {}, \
             translated flows {}, capacity (host-wide nf_conntrack_max) {}",
            n(&before["conntrack"]["entries"]),
            n(&ct["entries"]),
            ct["flows"],
            ct["capacity"],
        ),
    }
    stop.store(true, Ordering::Relaxed);

    assert!(sent >= SYNS * 9 / 10, "only {sent} of {SYNS} SYNs could be sent");
    if mode == "ebpf" {
        // The flood really reached the data path and overflowed the unconfirmed table many times over.
        let unconfirmed_capacity = n(&ct["unconfirmed"]["capacity"]);
        assert!(unconfirmed_capacity > 0 && unconfirmed_capacity < 2 * u64::from(SYNS), "{ct:#}");
        assert!(n(&stats["new_flows"]) >= u64::from(sent) * 9 / 10, "the flood did not reach pfwd: {stats:#}");
        assert!(n(&ct["confirmed"]["flows"]) >= CONNECTIONS as u64, "confirmed flows lost: {ct:#}");
    }
    let failed: Vec<String> =
        alive.iter().enumerate().filter_map(|(i, r)| r.as_ref().err().map(|e| format!("{i}: {e}"))).collect();
    assert!(failed.is_empty(), "{} of {CONNECTIONS} connections cut by the flood: {failed:?}", failed.len());
    new_conn.unwrap_or_else(|e| panic!("a new connection after the flood failed: {e}"));
    drop(conns);
    let _ = server.join();
}

in_both_modes!(syn_flood_keeps_established_connections);
