//! Tunnels (layer-3 interfaces: packets start at the IP header). This kernel has no WireGuard or IPIP module, so the
//! tunnel is built from what it has: a tun device `tun0` in the router ("VPS", 10.8.0.1) and one in the server
//! ("home", 10.8.0.2), and a userspace relay carrying each IP packet in a UDP datagram between them over the
//! router-server veth underlay (10.0.2.1 <-> 10.0.2.2): a VPN without the crypto. pfwd sees exactly what it would see
//! on wg0: a device of link type `none` whose packets start at the IP header.
//!
//! Scenarios in both modes, same assertions: the VPS-to-home port forward (`dnat -i eth0 ... --to <home via the
//! tunnel>` + `masquerade -o tun0`), TCP and UDP, answered from the address the client used; a DNAT arriving on the
//! tunnel side (rules on tun0 ingress); an ICMP error coming back through the tunnel; detach restores everything.
//! eBPF only: `--fast-forward` into the tunnel, and the refusal of a link type the programs cannot read.
#[macro_use]
mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use common::*;
use tests::{Lab, Node, TIMEOUT};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETLINK: libc::c_ulong = 0x4004_54cd;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const RELAY_PORT: u16 = 51_820;

/// Opens the tun device `name` (created by `ip tuntap`) in the calling thread's namespace.
fn open_tun(name: &str) -> std::io::Result<File> {
    let file = File::options().read(true).write(true).open("/dev/net/tun")?;
    // SAFETY: zeroed plain-old-data request block.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
    // SAFETY: a valid fd and request block.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// One end of the relay: IP packets read from tun go to the peer in a UDP datagram, and back. Stops when `stop` is
/// set (every wait is bounded by a 50 ms poll).
fn relay(tun: File, sock: UdpSocket, peer: std::net::SocketAddr, stop: Arc<AtomicBool>, carried: Arc<AtomicU64>) {
    let mut tun = tun;
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [
            libc::pollfd { fd: tun.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: a valid array of pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) } <= 0 {
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0
            && let Ok(n) = tun.read(&mut buf)
        {
            let _ = sock.send_to(&buf[..n], peer);
            carried.fetch_add(1, Ordering::Relaxed);
        }
        if fds[1].revents & libc::POLLIN != 0
            && let Ok((n, _)) = sock.recv_from(&mut buf)
        {
            let _ = tun.write(&buf[..n]);
            carried.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The tunnel between router and server; the relay threads stop when it is dropped.
struct Tunnel {
    stop: Arc<AtomicBool>,
    carried: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Tunnel {
    fn new(lab: &Lab) -> Tunnel {
        let stop = Arc::new(AtomicBool::new(false));
        let carried = Arc::new(AtomicU64::new(0));
        let mut threads = vec![];
        for (node, addr, local, peer) in [
            (Node::Router, "10.8.0.1/24", "10.0.2.1", "10.0.2.2"),
            (Node::Server, "10.8.0.2/24", "10.0.2.2", "10.0.2.1"),
        ] {
            sh(
                lab,
                node,
                &format!(
                    "ip tuntap add dev tun0 mode tun && ip addr add {addr} dev tun0 && ip link set tun0 mtu 1420 up"
                ),
            );
            let (tun, sock) = lab
                .in_ns(node, || (open_tun("tun0"), UdpSocket::bind(sa(&format!("{local}:{RELAY_PORT}")))))
                .expect("entering the namespace");
            let (tun, sock) = (tun.expect("opening tun0"), sock.expect("binding the relay socket"));
            let peer = sa(&format!("{peer}:{RELAY_PORT}"));
            let (stop, carried) = (stop.clone(), carried.clone());
            threads.push(std::thread::spawn(move || relay(tun, sock, peer, stop, carried)));
        }
        Tunnel { stop, carried, threads }
    }

    fn carried(&self) -> u64 {
        self.carried.load(Ordering::Relaxed)
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The lab with the tunnel up, checked end to end before pfwd is involved.
fn tunnel_lab(name: &str) -> (Lab, Tunnel) {
    let lab = lab(name);
    let tunnel = Tunnel::new(&lab);
    let probe = udp_server(&lab, Node::Server, "10.8.0.2:9100", "probe");
    // Up to three probes: on a loaded machine the first one through a fresh tun device was once lost (the lab's
    // own check, before pfwd is involved).
    let probe_once = || lab.udp_request(Node::Router, sa("10.8.0.2:9100"), "p", TIMEOUT);
    let (text, src) = probe_once().or_else(|_| probe_once()).or_else(|_| probe_once()).expect("UDP through the tunnel");
    assert!(text.contains("peer 10.8.0.1:"), "the probe must arrive through the tunnel: {text}");
    assert_eq!(src, sa("10.8.0.2:9100"));
    assert!(tunnel.carried() >= 2, "the relay carried the probe");
    drop(probe);
    (lab, tunnel)
}

/// What pfwd may change on the router, to compare before attach and after detach.
fn footprint(lab: &Lab, devs: &[&str]) -> (String, String, String, bool, bool) {
    // A fresh veth reports its carrier asynchronously: wait (bounded) for the lab's links to be up.
    for _ in 0..100 {
        if !sh(lab, Node::Router, "ip -o link show eth0; ip -o link show eth1").contains("NO-CARRIER") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (
        sh(lab, Node::Router, "ip -d link show"),
        format!("{:?}", devs.iter().map(|d| tcx_programs(lab, d)).collect::<Vec<_>>()),
        sh(lab, Node::Router, "sysctl -a 2>/dev/null | grep -E 'forwarding|route_localnet|rp_filter' | sort"),
        pin_dir(lab).exists(),
        state_dir(lab).exists(),
    )
}

/// The VPS case: a client on the Internet side reaches the home server through the tunnel; the home server sees the
/// VPS's tunnel address (MASQUERADE on tun0 takes the address the FIB gives for tun0) and answers through the tunnel.
fn vps_to_home(mode: &str) {
    let (lab, tunnel) = tunnel_lab(&format!("tunvps-{}", &mode[..1]));
    let before = footprint(&lab, &["eth0", "tun0"]);
    let _tcp = server(&lab, Node::Server, "10.8.0.2:9000", "home");
    let _udp = udp_server(&lab, Node::Server, "10.8.0.2:9000", "home");
    let guard = attach(&lab, mode, &["eth0", "tun0"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "25565", "--to", "10.8.0.2:9000"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "25565", "--to", "10.8.0.2:9000"]);
    let masq = add(&lab, &["masquerade", "-o", "tun0"]);
    let carried = tunnel.carried();
    expect_tcp(&lab, None, "10.0.1.1:25565", "home", 9000, "10.8.0.1");
    expect_udp(&lab, None, "10.0.1.1:25565", "home", 9000, "10.8.0.1");
    assert!(tunnel.carried() >= carried + 4, "the requests and replies went through the tunnel");
    let st = status(&lab);
    assert_eq!(rule_of(&st, masq)["flows"], 2, "MASQUERADE counted both flows: {st:#}");
    let types: Vec<(String, String)> = st["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap().into(), i["link_type"].as_str().unwrap_or("?").into()))
        .collect();
    assert_eq!(types, [("eth0".into(), "ether".into()), ("tun0".into(), "none".into())], "status: {st:#}");
    let text = pfwd_ok(&lab, &["status"]);
    assert!(text.contains("tun0 (10.8.0.1, link/none)"), "status text names the link type: {text}");
    if mode == "ebpf" {
        assert_eq!(tcx_programs(&lab, "tun0"), pfwd_tcx());
    }
    guard.detach();
    expect_tcp_fails(&lab, "10.0.1.1:25565");
    assert_eq!(footprint(&lab, &["eth0", "tun0"]), before, "detach restores the router as it was");
}

/// The home-router case: the rules are on the tunnel's ingress. A host on the far end of the tunnel reaches a service
/// on the client's side through the router's tunnel address; replies come back from that address.
fn dnat_arriving_on_the_tunnel(mode: &str) {
    let (lab, _tunnel) = tunnel_lab(&format!("tunin-{}", &mode[..1]));
    let _tcp = server(&lab, Node::Client, "10.0.1.2:9001", "lan");
    let _udp = udp_server(&lab, Node::Client, "10.0.1.2:9001", "lan");
    let guard = attach(&lab, mode, &["tun0"]);
    add(&lab, &["dnat", "-i", "tun0", "-p", "tcp", "--dport", "7000", "--to", "10.0.1.2:9001"]);
    add(&lab, &["dnat", "-i", "tun0", "-p", "udp", "--dport", "7000", "--to", "10.0.1.2:9001"]);
    let reply = lab.tcp_request(Node::Server, sa("10.8.0.1:7000"), "hi", TIMEOUT).expect("TCP over the tunnel");
    let r = tests::Reply::parse(&reply).unwrap_or_else(|| panic!("unparsable reply {reply:?}"));
    assert_eq!((r.label.as_str(), r.port, r.peer.ip()), ("lan", 9001, ip("10.8.0.2")), "{reply}");
    let (reply, src) = lab.udp_request(Node::Server, sa("10.8.0.1:7000"), "hi", TIMEOUT).expect("UDP over the tunnel");
    let r = tests::Reply::parse(&reply).unwrap_or_else(|| panic!("unparsable reply {reply:?}"));
    assert_eq!((r.label.as_str(), r.port, r.peer.ip()), ("lan", 9001, ip("10.8.0.2")), "{reply}");
    assert_eq!(src, sa("10.8.0.1:7000"), "the UDP reply came from the address the request went to");
    guard.detach();
    assert!(lab.udp_request(Node::Server, sa("10.8.0.1:7000"), "x", SHORT).is_err(), "detached: no DNAT");
}

/// A datagram forwarded into the tunnel to a closed port: the home server's port-unreachable error comes back through
/// the tunnel (to the masqueraded address) and reaches the client translated, as an error about its own datagram.
fn icmp_error_through_the_tunnel(mode: &str) {
    let (lab, _tunnel) = tunnel_lab(&format!("tunicmp-{}", &mode[..1]));
    // The home server can only answer through the tunnel: an error about an untranslated datagram (source 10.0.1.2)
    // would find no route back.
    sh(&lab, Node::Server, "ip route del default");
    let guard = attach(&lab, mode, &["eth0", "tun0"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "25566", "--to", "10.8.0.2:9999"]);
    add(&lab, &["masquerade", "-o", "tun0"]);
    let err = lab
        .in_ns(Node::Client, || -> std::io::Result<()> {
            let sock = UdpSocket::bind("10.0.1.2:0")?;
            sock.connect("10.0.1.1:25566")?;
            sock.set_read_timeout(Some(TIMEOUT))?;
            sock.send(b"anyone?")?;
            let mut buf = [0u8; 64];
            sock.recv(&mut buf).map(|_| ())
        })
        .expect("entering the client namespace");
    // A connected UDP socket reports an ICMP port unreachable about its own datagram as ECONNREFUSED.
    assert_eq!(
        err.as_ref().map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the client must get the port-unreachable error about its datagram, got {err:?}"
    );
    guard.detach();
}

in_both_modes!(vps_to_home, dnat_arriving_on_the_tunnel, icmp_error_through_the_tunnel);

/// `--fast-forward` into the tunnel: packets that came in on eth0 are handed to tun0 by the program
/// (bpf_redirect_neigh needs no neighbour on a layer-3 device). Packets coming in on a layer-3 device are left to
/// the stack (nothing to replace by a link-layer header there).
#[test]
fn fast_forward_into_the_tunnel() {
    let (lab, _tunnel) = tunnel_lab("tunff");
    let _tcp = server(&lab, Node::Server, "10.8.0.2:9000", "home");
    let _udp = udp_server(&lab, Node::Server, "10.8.0.2:9000", "home");
    let guard = Detach::new(&lab);
    pfwd_ok(&lab, &["attach", "--mode", "ebpf", "--fast-forward", "eth0", "tun0"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "25565", "--to", "10.8.0.2:9000"]);
    add(&lab, &["dnat", "-i", "eth0", "-p", "udp", "--dport", "25565", "--to", "10.8.0.2:9000"]);
    add(&lab, &["masquerade", "-o", "tun0"]);
    for _ in 0..3 {
        expect_tcp(&lab, None, "10.0.1.1:25565", "home", 9000, "10.8.0.1");
        expect_udp(&lab, None, "10.0.1.1:25565", "home", 9000, "10.8.0.1");
    }
    guard.detach();
}

/// A link type the eBPF programs cannot read is refused, naming the type and what to do, and nothing is attached.
/// (A tun device whose link type is set to ARPHRD_CAN, 280: this kernel has no module for a real one.)
#[test]
fn an_unsupported_link_type_is_refused() {
    let lab = lab("tunbad");
    lab.in_ns(Node::Router, || -> std::io::Result<()> {
        let tun = open_tun("odd0")?;
        for (req, arg) in [(TUNSETLINK, 280), (TUNSETPERSIST, 1)] {
            // SAFETY: a valid fd; these requests take an integer argument.
            if unsafe { libc::ioctl(tun.as_raw_fd(), req, arg as libc::c_ulong) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    })
    .expect("entering the router namespace")
    .expect("creating odd0");
    sh(&lab, Node::Router, "ip link set odd0 up");
    let before = footprint(&lab, &["eth0", "odd0"]);
    let _guard = Detach::new(&lab);
    pfwd_err(&lab, &["attach", "--mode", "ebpf", "odd0"], &["odd0", "link/ARPHRD 280", "--mode iptables"]);
    assert_eq!(tcx_programs(&lab, "odd0"), Default::default(), "nothing attached to odd0");
    assert_eq!(footprint(&lab, &["eth0", "odd0"]), before, "a refused attach changes nothing");
    // With eth0 and odd0 together: eth0 is not left attached either.
    pfwd_err(&lab, &["attach", "--mode", "ebpf", "eth0", "odd0"], &["link/ARPHRD 280"]);
    assert_eq!(tcx_programs(&lab, "eth0"), Default::default(), "nothing attached to eth0");
    assert_eq!(footprint(&lab, &["eth0", "odd0"]), before, "a refused attach changes nothing");
}
