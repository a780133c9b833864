//! Helpers for the end-to-end tests: running pfwd in a lab's router namespace with a deadline, reading
//! `status --json`, a guard that always runs `pfwd detach`, client requests that assert who answered, and an
//! ICMP echo (raw socket, so the tests do not depend on `ping` being installed).
//!
//! Every helper panics with a descriptive message on failure: they are meant to be called from `#[test]`s.
#![allow(dead_code)] // Not every test binary uses every helper.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{Lab, Node, Reply, ServerHandle, TIMEOUT};

/// pfwd commands return quickly; a hang fails the test instead of hanging it.
pub const PFWD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request that must *not* be forwarded is given before it counts as not answered.
pub const SHORT: Duration = Duration::from_millis(500);

/// Runs each scenario `fn name(mode: &str)` as three tests, `ebpf::name`, `iptables::name` and `nft::name`: the same
/// assertions on every data path prove the fallbacks equivalent. (The name is older than the nft mode.)
#[allow(unused_macros)] // fastpath.rs is eBPF-only.
macro_rules! in_both_modes {
    ($($scenario:ident),* $(,)?) => {
        mod ebpf {
            $(#[test] fn $scenario() { super::$scenario("ebpf") })*
        }
        mod iptables {
            $(#[test] fn $scenario() { super::$scenario("iptables") })*
        }
        mod nft {
            $(#[test] fn $scenario() { super::$scenario("nft") })*
        }
    };
}

/// Runs each scenario `fn name(mode: &str)` in the netfilter modes only, as `iptables::name` and `nft::name` (for what
/// eBPF mode does not do yet; the test file says why).
#[allow(unused_macros)]
macro_rules! in_netfilter_modes {
    ($($scenario:ident),* $(,)?) => {
        mod iptables {
            $(#[test] fn $scenario() { super::$scenario("iptables") })*
        }
        mod nft {
            $(#[test] fn $scenario() { super::$scenario("nft") })*
        }
    };
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("bad socket address literal {s:?}: {e}"))
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address literal {s:?}: {e}"))
}

/// A fresh lab (client / router / server namespaces); panics with context (it needs root).
#[track_caller]
pub fn lab(name: &str) -> Lab {
    Lab::new(name).unwrap_or_else(|e| panic!("creating lab {name} (needs root): {e:#}"))
}

/// A TCP echo server (see [`Lab::tcp_echo_server`]); panics with context.
#[track_caller]
pub fn server(lab: &Lab, node: Node, addr: &str, label: &str) -> ServerHandle {
    lab.tcp_echo_server(node, sa(addr), label).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A UDP echo server (see [`Lab::udp_echo_server`]); panics with context.
#[track_caller]
pub fn udp_server(lab: &Lab, node: Node, addr: &str, label: &str) -> ServerHandle {
    lab.udp_echo_server(node, sa(addr), label).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Output of one finished command.
#[derive(Debug)]
pub struct Out {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub shown: String,
}

/// Runs a command with a deadline (killed and reported as a failure past it).
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Out {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {shown}: {e}"));
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for {shown}: {e}"),
        }
    };
    let (stdout, mut stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    if status.is_none() {
        stderr.push_str(&format!("\n[test harness: killed after {timeout:?}]"));
    }
    Out { success: status.is_some_and(|s| s.success()), code: status.and_then(|s| s.code()), stdout, stderr, shown }
}

/// Runs `pfwd ARGS` in the lab's router namespace.
pub fn pfwd(lab: &Lab, args: &[&str]) -> Out {
    run_bounded(lab.pfwd(args).expect("locating the pfwd binary (set PFWD_BIN)"), PFWD_TIMEOUT)
}

/// Runs `pfwd ARGS`, which must succeed; returns its stdout.
#[track_caller]
pub fn pfwd_ok(lab: &Lab, args: &[&str]) -> String {
    let out = pfwd(lab, args);
    assert!(
        out.success,
        "`pfwd {}` failed (exit {:?}):\nstderr: {}\nstdout: {}",
        args.join(" "),
        out.code,
        out.stderr.trim(),
        out.stdout.trim()
    );
    out.stdout
}

/// Runs `pfwd ARGS`, which must fail with every one of `needles` in its stderr (case-insensitive).
#[track_caller]
pub fn pfwd_err(lab: &Lab, args: &[&str], needles: &[&str]) -> Out {
    let out = pfwd(lab, args);
    assert!(
        !out.success && out.code.is_some(),
        "`pfwd {}` should have exited non-zero (exit {:?}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.code,
        out.stdout.trim(),
        out.stderr.trim()
    );
    let lower = out.stderr.to_lowercase();
    for n in needles {
        assert!(
            lower.contains(&n.to_lowercase()),
            "`pfwd {}`: stderr should mention {n:?}, got: {}",
            args.join(" "),
            out.stderr.trim()
        );
    }
    out
}

/// `pfwd add ...`: returns the new rule's id (printed on stdout).
#[track_caller]
pub fn add(lab: &Lab, args: &[&str]) -> u32 {
    let mut full = vec!["add"];
    full.extend_from_slice(args);
    let out = pfwd_ok(lab, &full);
    out.trim().parse().unwrap_or_else(|e| panic!("`pfwd {}` printed {out:?}, not a rule id: {e}", full.join(" ")))
}

/// `pfwd del ID`.
#[track_caller]
pub fn del(lab: &Lab, id: u32) {
    pfwd_ok(lab, &["del", &id.to_string()]);
}

/// `pfwd status --json`.
#[track_caller]
pub fn status(lab: &Lab) -> Value {
    let out = pfwd_ok(lab, &["status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
}

/// `pfwd list --json`.
#[track_caller]
pub fn list(lab: &Lab) -> Value {
    let out = pfwd_ok(lab, &["list", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("list --json is not JSON ({e}): {out}"))
}

/// The rule with `id` in a `status --json`.
#[track_caller]
pub fn rule_of(status: &Value, id: u32) -> &Value {
    status["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["id"] == id))
        .unwrap_or_else(|| panic!("rule {id} missing from status: {status:#}"))
}

/// Runs `pfwd detach` when dropped (also while unwinding from a failed assertion), so no test leaves
/// programs or changed sysctls behind. Declare it after the [`Lab`] so it is dropped first.
pub struct Detach<'a> {
    lab: &'a Lab,
    armed: bool,
}

impl<'a> Detach<'a> {
    pub fn new(lab: &'a Lab) -> Self {
        Detach { lab, armed: true }
    }

    /// Detaches now; the detach must succeed. Returns its stdout (the notes).
    #[track_caller]
    pub fn detach(mut self) -> String {
        self.armed = false;
        pfwd_ok(self.lab, &["detach"])
    }
}

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match self.lab.pfwd(["detach"]) {
            Ok(cmd) => {
                let out = run_bounded(cmd, PFWD_TIMEOUT);
                if !out.success {
                    eprintln!("e2e: cleanup `pfwd detach` failed: {}", out.stderr.trim());
                }
            }
            Err(e) => eprintln!("e2e: cleanup `pfwd detach`: {e:#}"),
        }
    }
}

/// Arms a [`Detach`] guard, then runs `pfwd attach --mode MODE IFACES...`, which must succeed.
#[track_caller]
pub fn attach<'a>(lab: &'a Lab, mode: &str, ifaces: &[&str]) -> Detach<'a> {
    let guard = Detach::new(lab);
    let mut args = vec!["attach", "--mode", mode];
    args.extend_from_slice(ifaces);
    pfwd_ok(lab, &args);
    guard
}

/// A router sysctl, e.g. `net.ipv4.ip_forward`.
#[track_caller]
pub fn router_sysctl(lab: &Lab, key: &str) -> String {
    lab.sysctl(Node::Router, key).unwrap_or_else(|e| panic!("{e:#}"))
}

#[track_caller]
pub fn sh(lab: &Lab, node: Node, script: &str) -> String {
    lab.sh(node, script).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The inode of the router's network namespace (pfwd names its directories `net-<inode>`).
pub fn router_netns_inode(lab: &Lab) -> u64 {
    std::fs::metadata(lab.ns_path(Node::Router)).expect("stat of the router netns").ino()
}

/// `/sys/fs/bpf/pfwd/net-<inode>`: where pfwd pins the router's instance.
pub fn pin_dir(lab: &Lab) -> PathBuf {
    Path::new("/sys/fs/bpf/pfwd").join(format!("net-{}", router_netns_inode(lab)))
}

/// `/run/pfwd/net-<inode>`: the router instance's state directory.
pub fn state_dir(lab: &Lab) -> PathBuf {
    Path::new("/run/pfwd").join(format!("net-{}", router_netns_inode(lab)))
}

/// Sorted names of the files in `dir` (empty when it does not exist).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// The tcx programs attached to `dev` in the router namespace, as `"ingress:NAME"` / `"egress:NAME"` -> count.
/// Asked from the kernel (BPF_PROG_QUERY on the device, from inside the namespace), not from pfwd's pins; names
/// come from `bpftool prog show` (the installed bpftool may be too old to list tcx links per device).
pub fn tcx_programs(lab: &Lab, dev: &str) -> BTreeMap<String, usize> {
    let dev_owned = dev.to_string();
    let ids = lab
        .in_ns(Node::Router, move || -> Result<Vec<(&'static str, u32)>, String> {
            let ifindex = nix_ifindex(&dev_owned)?;
            let mut out = vec![];
            for (dir, attach_type) in [("ingress", BPF_TCX_INGRESS), ("egress", BPF_TCX_EGRESS)] {
                out.extend(prog_query(ifindex, attach_type)?.into_iter().map(|id| (dir, id)));
            }
            Ok(out)
        })
        .expect("entering the router namespace")
        .unwrap_or_else(|e| panic!("querying tcx programs on {dev}: {e}"));
    let mut out = BTreeMap::new();
    if ids.is_empty() {
        return out;
    }
    let progs: Value = serde_json::from_str(&sh(lab, Node::Router, "bpftool -j prog show")).unwrap();
    for (dir, id) in ids {
        let name = progs
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .and_then(|p| p["name"].as_str())
            .unwrap_or("?")
            .to_string();
        *out.entry(format!("{dir}:{name}")).or_default() += 1;
    }
    out
}

/// What [`tcx_programs`] returns for a device pfwd is attached to in eBPF mode.
pub fn pfwd_tcx() -> BTreeMap<String, usize> {
    [("egress:pfwd_egress".to_string(), 1), ("ingress:pfwd_ingress".to_string(), 1)].into()
}

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

fn nix_ifindex(dev: &str) -> Result<u32, String> {
    let c = std::ffi::CString::new(dev).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(format!("no device {dev}")),
        i => Ok(i),
    }
}

/// BPF_PROG_QUERY for `attach_type` on `ifindex` (of the calling thread's namespace): the attached program ids.
fn prog_query(ifindex: u32, attach_type: u32) -> Result<Vec<u32>, String> {
    // union bpf_attr, query part: target_ifindex, attach_type, query_flags, attach_flags, prog_ids (u64),
    // prog_cnt, pad, prog_attach_flags, link_ids, link_attach_flags (u64s), revision (u64).
    #[repr(C)]
    #[derive(Default)]
    struct Query {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let mut ids = [0u32; 64];
    let mut q = Query {
        target_ifindex: ifindex,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: the attr struct and the id buffer outlive the call; the kernel writes at most prog_cnt ids.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &mut q as *mut Query, size_of::<Query>() as u32) };
    if rc != 0 {
        return Err(format!("BPF_PROG_QUERY: {}", std::io::Error::last_os_error()));
    }
    Ok(ids[..(q.prog_cnt as usize).min(ids.len())].to_vec())
}

/// Sends `payload` over TCP from the client (optionally from source address `from`) to `to` and returns the
/// parsed reply. Panics with context when there is no (parsable) reply.
#[track_caller]
pub fn tcp(lab: &Lab, from: Option<&str>, to: &str) -> Reply {
    let to = sa(to);
    let res = match from {
        Some(f) => lab.tcp_request_from(Node::Client, ip(f), to, "hi", TIMEOUT),
        None => lab.tcp_request(Node::Client, to, "hi", TIMEOUT),
    };
    let text = res.unwrap_or_else(|e| panic!("TCP {} -> {to}: {e:#}", from.unwrap_or("client")));
    Reply::parse(&text).unwrap_or_else(|| panic!("TCP {to}: unparsable reply {text:?}"))
}

/// Sends one UDP datagram from the client to `to`; returns the parsed reply and where it came from.
#[track_caller]
pub fn udp(lab: &Lab, from: Option<&str>, to: &str) -> (Reply, SocketAddr) {
    let to = sa(to);
    let res = match from {
        Some(f) => lab.udp_request_from(Node::Client, ip(f), to, "hi", TIMEOUT),
        None => lab.udp_request(Node::Client, to, "hi", TIMEOUT),
    };
    let (text, src) = res.unwrap_or_else(|e| panic!("UDP {} -> {to}: {e:#}", from.unwrap_or("client")));
    (Reply::parse(&text).unwrap_or_else(|| panic!("UDP {to}: unparsable reply {text:?}")), src)
}

/// Asserts a TCP request to `to` is answered by the server `label` on `port`, which saw the client as `peer_ip`.
#[track_caller]
pub fn expect_tcp(lab: &Lab, from: Option<&str>, to: &str, label: &str, port: u16, peer_ip: &str) {
    let r = tcp(lab, from, to);
    assert_eq!(
        (r.label.as_str(), r.port, r.peer.ip()),
        (label, port, ip(peer_ip)),
        "TCP {} -> {to}: answered by {}:{} which saw peer {} (expected {label}:{port} seeing {peer_ip})",
        from.unwrap_or("10.0.1.2"),
        r.label,
        r.port,
        r.peer
    );
}

/// Asserts a UDP request to `to` is answered by `label` on `port` (seeing `peer_ip`), and that the reply came
/// back from exactly the address the client sent to.
#[track_caller]
pub fn expect_udp(lab: &Lab, from: Option<&str>, to: &str, label: &str, port: u16, peer_ip: &str) {
    let (r, src) = udp(lab, from, to);
    assert_eq!(
        (r.label.as_str(), r.port, r.peer.ip()),
        (label, port, ip(peer_ip)),
        "UDP {} -> {to}: answered by {}:{} which saw peer {}",
        from.unwrap_or("10.0.1.2"),
        r.label,
        r.port,
        r.peer
    );
    assert_eq!(src, sa(to), "UDP -> {to}: the reply came from {src}, not from the address the client sent to");
}

/// Asserts a TCP request to `to` gets no reply (refused or timed out).
#[track_caller]
pub fn expect_tcp_fails(lab: &Lab, to: &str) {
    if let Ok(reply) = lab.tcp_request(Node::Client, sa(to), "hi", SHORT) {
        panic!("TCP -> {to} should not have been answered, got {reply:?}");
    }
}

/// Sends one ICMP echo request from `node` to `to` (raw socket) and returns the source of the matching echo
/// reply, or None when none arrives within `timeout`.
pub fn icmp_echo(lab: &Lab, node: Node, to: Ipv4Addr, timeout: Duration) -> Option<Ipv4Addr> {
    use socket2::{Domain, Protocol, Socket, Type};
    static SEQ: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    let sock = lab
        .in_ns(node, || Socket::new(Domain::IPV4, Type::from(libc::SOCK_RAW), Some(Protocol::ICMPV4)))
        .expect("entering the namespace")
        .expect("raw ICMP socket");
    // A new identifier per echo, as separate ping runs have: netfilter would otherwise keep treating them as one
    // flow, tracked (untranslated) since before a rule existed.
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let id =
        ((std::process::id() as u16) ^ 0x5a5a).wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut pkt = vec![8u8, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(b"pfwd-e2e-echo");
    let csum = inet_checksum(&pkt);
    pkt[2..4].copy_from_slice(&csum.to_be_bytes());
    sock.send_to(&pkt, &SocketAddrV4::new(to, 0).into()).expect("sending ICMP echo");
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    // Bounded: each read waits at most until the deadline, and unrelated ICMP is rare in the lab.
    for _ in 0..1000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).unwrap();
        let n = match (&sock).read(&mut buf) {
            Ok(n) => n,
            Err(_) => return None,
        };
        // Raw IPv4 sockets deliver the IP header too.
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if n < ihl + 8 {
            continue;
        }
        let icmp = &buf[ihl..n];
        if icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() && icmp[6..8] == seq.to_be_bytes() {
            return Some(Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]));
        }
    }
    None
}

/// [`icmp_echo`] over IPv6: an ICMPv6 echo request from `node` to `to`; the source of the matching reply, if one
/// comes within `timeout`. (A raw ICMPv6 socket: the kernel fills in the checksum, which covers the pseudo-header,
/// and delivers the ICMPv6 message without the IPv6 header, so the reply's source is the socket's peer address.)
pub fn icmp6_echo(lab: &Lab, node: Node, to: std::net::Ipv6Addr, timeout: Duration) -> Option<std::net::Ipv6Addr> {
    use socket2::{Domain, Protocol, Socket, Type};
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let sock = lab
        .in_ns(node, || Socket::new(Domain::IPV6, Type::from(libc::SOCK_RAW), Some(Protocol::ICMPV6)))
        .expect("entering the namespace")
        .expect("raw ICMPv6 socket");
    let id =
        ((std::process::id() as u16) ^ 0x6b6b).wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    // Echo request (128), code 0, checksum 0 (the kernel's), identifier, sequence 1.
    let mut pkt = vec![128u8, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&1u16.to_be_bytes());
    pkt.extend_from_slice(b"pfwd-e2e-echo6");
    sock.send_to(&pkt, &std::net::SocketAddrV6::new(to, 0, 0, 0).into()).expect("sending ICMPv6 echo");
    let deadline = Instant::now() + timeout;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    // Bounded: each read waits at most until the deadline; other ICMPv6 (neighbour discovery) is skipped.
    for _ in 0..1000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).unwrap();
        let Ok((n, from)) = sock.recv_from(&mut buf) else { return None };
        // SAFETY: recv_from initialised the first n bytes.
        let msg: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
        if n >= 8 && msg[0] == 129 && msg[4..6] == id.to_be_bytes() {
            return from.as_socket_ipv6().map(|a| *a.ip());
        }
    }
    None
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// How long [`line_echo_server`] waits for the next line before it gives up on the connection.
const LONG_IDLE: Duration = Duration::from_secs(30);

/// A TCP server that echoes every line on a connection until the client closes (bounded by timeouts), for
/// connections that outlive rule changes.
pub fn line_echo_server(lab: &Lab, node: Node, addr: &str) -> thread::JoinHandle<()> {
    let listener = lab.in_ns(node, || TcpListener::bind(sa(addr))).unwrap().unwrap();
    thread::spawn(move || {
        // One connection is all these tests make.
        let Ok((stream, _)) = listener.accept() else { return };
        // Idle for as long as a test may take between two lines (an agent restart on a loaded machine takes
        // seconds): this server must not be the one that ends the connection. Still bounded.
        stream.set_read_timeout(Some(LONG_IDLE)).unwrap();
        let mut writer = stream.try_clone().unwrap();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if writer.write_all(format!("{line}\n").as_bytes()).is_err() {
                return;
            }
        }
    })
}

/// One line out and back on a live connection; Err when the connection is cut (reset, closed or silent).
pub fn exchange(stream: &TcpStream, line: &str) -> Result<String, String> {
    let mut w = stream;
    w.write_all(format!("{line}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut back = String::new();
    match BufReader::new(stream).read_line(&mut back) {
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok(back.trim_end().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Connects from `node` to `to`, sends a request, and returns the reply and the peer address the socket reports
/// (getpeername): with a --local rule it must be the address the application asked for.
pub fn tcp_with_peer(lab: &Lab, node: Node, to: &str) -> (Reply, SocketAddr) {
    let to = sa(to);
    lab.in_ns(node, move || -> std::io::Result<(String, SocketAddr)> {
        let mut s = TcpStream::connect_timeout(&to, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let peer = s.peer_addr()?;
        s.write_all(b"local")?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok((out, peer))
    })
    .expect("entering the namespace")
    .map(|(text, peer)| (Reply::parse(&text).unwrap_or_else(|| panic!("unexpected reply {text:?}")), peer))
    .unwrap_or_else(|e| panic!("TCP to {to} from {node:?} failed: {e}"))
}
