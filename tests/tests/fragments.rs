//! End-to-end tests of fragmented UDP through pfwd: datagrams larger than the path MTU (1500 on the lab's veths)
//! leave the client's kernel as IPv4 fragments, cross the router through DNAT or MASQUERADE, and the backend's reply,
//! as large, comes back fragmented too. Then fragments built by hand and sent from a raw socket, in orders a kernel
//! would not use. Then datagrams whose headers are not in the skb's linear data (sent from a packet socket's
//! transmit ring). Every scenario runs in both modes with the same assertions, except the one case where the modes
//! differ by design (a fragment arriving before its datagram's first fragment), which the README documents.

#[macro_use]
mod common;

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::*;
use etherparse::{IpFragOffset, IpNumber, Ipv4Header, UdpHeader};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tests::{Lab, Node, TIMEOUT};

/// The sizes the issue asks for: below the MTU, just under it, and 2, 6 and 41 fragments.
const SIZES: [usize; 5] = [100, 1400, 3000, 8000, 60_000];
const BACKEND: &str = "10.0.2.2:9053";

/// A UDP server in the server namespace that sends every datagram back unchanged, to its sender.
struct Mirror {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Mirror {
    fn start(lab: &Lab) -> Mirror {
        let sock = lab
            .in_ns(Node::Server, || UdpSocket::bind(BACKEND))
            .and_then(|r| Ok(r?))
            .unwrap_or_else(|e| panic!("binding {BACKEND}: {e:#}"));
        sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        });
        Mirror { stop, thread: Some(thread) }
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A client socket bound to the client's address (the port the kernel picks).
fn client_socket(lab: &Lab) -> UdpSocket {
    let s = lab
        .in_ns(Node::Client, || UdpSocket::bind("10.0.1.2:0"))
        .and_then(|r| Ok(r?))
        .unwrap_or_else(|e| panic!("client socket: {e:#}"));
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Receives one datagram: its bytes and its source, or None after the timeout.
fn receive(sock: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 65_536];
    sock.recv_from(&mut buf).ok().map(|(n, from)| (buf[..n].to_vec(), from))
}

/// Sends each size to `to` and expects it back intact, from `to` (the address the client used).
fn expect_mirrored(lab: &Lab, to: &str, what: &str) {
    let sock = client_socket(lab);
    for (i, &len) in SIZES.iter().enumerate() {
        let data = pattern(len, i as u8);
        sock.send_to(&data, sa(to)).unwrap_or_else(|e| panic!("{what}: sending {len} bytes: {e}"));
        let (got, from) = receive(&sock).unwrap_or_else(|| panic!("{what}: no reply to a {len}-byte datagram"));
        assert_eq!(from, sa(to), "{what}: the {len}-byte reply came from {from}");
        assert!(got == data, "{what}: the {len}-byte datagram came back changed ({} bytes)", got.len());
    }
}

fn stat(lab: &Lab, name: &str) -> u64 {
    status(lab)["stats"][name].as_u64().unwrap_or(0)
}

/// Datagrams of every size through DNAT, with fragmented replies.
fn dnat_carries_large_datagrams(mode: &str) {
    let lab = lab("frag-dnat");
    let _mirror = Mirror::start(&lab);
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "5353", "--to", BACKEND]);
    expect_mirrored(&lab, "10.0.1.1:5353", "DNAT");
    if mode == "ebpf" {
        assert!(stat(&lab, "fragments_translated") >= 2 * (1 + 5 + 40), "{}", status(&lab)["stats"]);
        assert_eq!(stat(&lab, "fragments_unknown_drops"), 0);
    }
    guard.detach();
}

/// The same through MASQUERADE: the backend sees the router's address and its replies are fragmented.
fn masquerade_carries_large_datagrams(mode: &str) {
    let lab = lab("frag-masq");
    let _mirror = Mirror::start(&lab);
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    add(&lab, &["masquerade", "-o", "eth1"]);
    expect_mirrored(&lab, BACKEND, "MASQUERADE");
    guard.detach();
}

/// A datagram of `len` bytes from `from` to `to`, cut into IP fragments of at most 1,480 payload bytes (with the
/// UDP checksum over the whole datagram, computed by etherparse).
fn fragments(from: SocketAddrV4, to: SocketAddrV4, len: usize, id: u16) -> Vec<Vec<u8>> {
    let data = pattern(len, 7);
    let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, from.ip().octets(), to.ip().octets()).unwrap();
    ip.identification = id;
    ip.set_payload_len(UdpHeader::LEN + len).unwrap();
    let mut udp = UdpHeader::without_ipv4_checksum(from.port(), to.port(), len).unwrap();
    udp.checksum = udp.calc_checksum_ipv4(&ip, &data).unwrap();
    let mut payload = udp.to_bytes().to_vec();
    payload.extend_from_slice(&data);
    payload
        .chunks(1480)
        .enumerate()
        .map(|(i, chunk)| {
            let mut h = ip.clone();
            h.fragment_offset = IpFragOffset::try_new((i * 1480 / 8) as u16).unwrap();
            h.more_fragments = (i + 1) * 1480 < payload.len();
            h.set_payload_len(chunk.len()).unwrap();
            h.header_checksum = h.calc_header_checksum();
            let mut out = vec![];
            h.write_raw(&mut out).unwrap();
            out.extend_from_slice(chunk);
            out
        })
        .collect()
}

/// Sends `frags` in `order` from a raw socket in the client namespace.
fn send_raw(lab: &Lab, to: SocketAddrV4, frags: &[Vec<u8>], order: &[usize]) {
    let raw = lab
        .in_ns(Node::Client, || {
            Socket::new(Domain::IPV4, Type::from(libc::SOCK_RAW), Some(Protocol::from(libc::IPPROTO_RAW)))
        })
        .and_then(|r| Ok(r?))
        .unwrap_or_else(|e| panic!("raw socket: {e:#}"));
    for &i in order {
        raw.send_to(&frags[i], &SockAddr::from(to)).unwrap_or_else(|e| panic!("sending fragment {i}: {e}"));
    }
}

/// The DNAT rule the raw-socket tests send through, and a client socket to receive the replies on: (socket, its
/// address, the router's forwarded address).
fn raw_dnat_setup(lab: &Lab) -> (UdpSocket, SocketAddrV4, SocketAddrV4) {
    add(lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "5353", "--to", BACKEND]);
    let sock = client_socket(lab);
    let SocketAddr::V4(from) = sock.local_addr().unwrap() else { unreachable!("an IPv4 socket") };
    (sock, from, "10.0.1.1:5353".parse().unwrap())
}

/// Fragments sent by hand through DNAT: in order, then the first followed by the rest backwards, then duplicated.
/// The backend must get each datagram whole (its kernel checks the UDP checksum over the reassembled datagram).
fn out_of_order_fragments_after_the_first(mode: &str) {
    let lab = lab("frag-order");
    let _mirror = Mirror::start(&lab);
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    let (sock, from, to) = raw_dnat_setup(&lab);
    for (n, order) in [vec![0, 1, 2, 3], vec![0, 3, 2, 1], vec![0, 2, 2, 1, 3, 0]].into_iter().enumerate() {
        let frags = fragments(from, to, 5000, 0x4100 + n as u16);
        send_raw(&lab, to, &frags, &order);
        let (got, src) = receive(&sock).unwrap_or_else(|| panic!("fragments in order {order:?}: no reply"));
        assert_eq!(src, SocketAddr::V4(to), "order {order:?}: reply source");
        assert!(got == pattern(5000, 7), "order {order:?}: the datagram came back changed");
    }
    guard.detach();
}

/// The first fragment sent last. iptables reassembles before NAT and delivers; pfwd's eBPF path cannot translate a
/// fragment before it has seen the first one, drops it (counted) and the datagram is lost, as the README says.
fn first_fragment_last(mode: &str) {
    let lab = lab("frag-last");
    let _mirror = Mirror::start(&lab);
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    let (sock, from, to) = raw_dnat_setup(&lab);
    send_raw(&lab, to, &fragments(from, to, 3000, 0x4200), &[2, 1, 0]);
    let reply = receive(&sock);
    if mode == "ebpf" {
        assert!(reply.is_none(), "eBPF mode cannot translate fragments seen before their first one");
        assert_eq!(stat(&lab, "fragments_unknown_drops"), 2, "{}", status(&lab)["stats"]);
    } else {
        let (got, _) = reply.expect("iptables reassembles before NAT: the datagram arrives");
        assert!(got == pattern(3000, 7));
    }
    // Either way, the next datagram, in order, goes through.
    send_raw(&lab, to, &fragments(from, to, 3000, 0x4201), &[0, 1, 2]);
    assert!(receive(&sock).is_some_and(|(got, _)| got == pattern(3000, 7)), "an in-order datagram after that");
    guard.detach();
}

/// Datagrams whose headers are not in the skb's linear data: trafgen sends from a packet socket's transmit ring,
/// whose skbs keep all but the Ethernet header in page fragments (pfwd's programs must pull the headers in before
/// they can read or rewrite them). Each must be translated as a UDP socket's datagram is, and its reply translated
/// back. Without the pull, or with one that leaves the headers short, none of them reaches the backend.
fn headers_in_page_fragments(mode: &str) {
    const COUNT: usize = 16;
    const TEXT: &str = "pfwd: headers in page fragments";
    let lab = lab("frag-paged");
    let _mirror = Mirror::start(&lab);
    let guard = attach(&lab, mode, &["eth0", "eth1"]);
    let (sock, from, to) = raw_dnat_setup(&lab);
    // `ip`, not /sys: nsenter enters the namespace without remounting /sys, which shows the host's interfaces.
    let link = sh(&lab, Node::Router, "ip -br link show dev eth0");
    let mac = link.split_whitespace().nth(2).unwrap_or_else(|| panic!("no MAC in {link:?}")).to_string();
    // trafgen fills in the IPv4 length and checksum and the UDP length and checksum.
    let conf = format!(
        "{{ eth(da={mac}), ipv4(sa={}, da={}, ttl=64), udp(sp={}, dp={}), \"{TEXT}\" }}\n",
        from.ip(),
        to.ip(),
        from.port(),
        to.port()
    );
    let path = std::env::temp_dir().join(format!("pfwd-test-paged-{mode}-{}.cfg", std::process::id()));
    std::fs::write(&path, conf).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    let n = COUNT.to_string();
    let args = ["--dev", "eth0", "--conf", path.to_str().unwrap(), "-n", &n, "--cpus", "1", "-C", "-Q"];
    let sent = run_bounded(lab.cmd(Node::Client, "trafgen", args), Duration::from_secs(30));
    let _ = std::fs::remove_file(&path);
    assert!(sent.success, "{}: {}\n{}", sent.shown, sent.stdout, sent.stderr);
    for i in 0..COUNT {
        let (got, src) = receive(&sock).unwrap_or_else(|| {
            panic!("reply {} of {COUNT} did not come back (trafgen: {}{})", i + 1, sent.stdout, sent.stderr)
        });
        assert_eq!(src, SocketAddr::V4(to), "reply {}: source", i + 1);
        assert_eq!(got, TEXT.as_bytes(), "reply {}: the datagram came back changed", i + 1);
    }
    guard.detach();
}

in_both_modes!(
    dnat_carries_large_datagrams,
    masquerade_carries_large_datagrams,
    out_of_order_fragments_after_the_first,
    first_fragment_last,
    headers_in_page_fragments
);
