//! Network-namespace lab: three namespaces joined by two veth pairs.
//!
//! ```text
//!  client ns              router ns                     server ns
//!  eth0 10.0.1.2/24 <---> eth0 10.0.1.1/24
//!                         eth1 10.0.2.1/24 <----------> eth0 10.0.2.2/24
//! ```
//!
//! [`Lab::dual_stack`] adds IPv6 (documentation prefixes): client 2001:db8:1::2/64, router 2001:db8:1::1/64 and
//! 2001:db8:2::1/64, server 2001:db8:2::2/64. Plain labs have IPv6 off.
//!
//! Safety rules: the lab only creates namespaces (and veths inside them) of its own, never touches the
//! host's interfaces, and removes every namespace it created on drop (also while unwinding from a panic).
//! Every socket operation has a timeout and every loop is bounded.
//!
//! ```no_run
//! use std::time::Duration;
//! use tests::{Lab, Node};
//!
//! let lab = Lab::new("doc")?;
//! let server = lab.tcp_echo_server(Node::Router, "10.0.1.1:80".parse()?, "web")?;
//! let reply = lab.tcp_request(Node::Client, "10.0.1.1:80".parse()?, "hi", Duration::from_secs(2))?;
//! assert!(reply.starts_with("hello from web port 80"));
//! assert_eq!(server.last_peer().unwrap().ip().to_string(), "10.0.1.2");
//! # anyhow::Ok(())
//! ```

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// The hash pfwd's build.rs embeds, computed here from the tree.
#[path = "../../pfwd/build/source_hash.rs"]
mod source_hash;

/// Default timeout for socket operations in tests.
pub const TIMEOUT: Duration = Duration::from_secs(2);

const NETNS_DIR: &str = "/run/netns";
/// Largest request a test server reads; keeps servers bounded whatever a client sends.
const MAX_MSG: usize = 64 * 1024;
/// How often stoppable server loops check their stop flag.
const POLL: Duration = Duration::from_millis(20);

/// Makes namespace names unique between labs of one process (the pid separates processes).
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One of the lab's three namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    Client,
    Router,
    Server,
}

impl Node {
    pub const ALL: [Node; 3] = [Node::Client, Node::Router, Node::Server];

    /// Short lowercase name, also the suffix of the namespace name.
    pub fn label(self) -> &'static str {
        match self {
            Node::Client => "client",
            Node::Router => "router",
            Node::Server => "server",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Static part of the topology: (node, device, address).
const ADDRS: [(Node, &str, &str); 4] = [
    (Node::Client, "eth0", "10.0.1.2/24"),
    (Node::Router, "eth0", "10.0.1.1/24"),
    (Node::Router, "eth1", "10.0.2.1/24"),
    (Node::Server, "eth0", "10.0.2.2/24"),
];

/// The IPv6 addresses of a [`Lab::dual_stack`] lab.
const ADDRS6: [(Node, &str, &str); 4] = [
    (Node::Client, "eth0", "2001:db8:1::2/64"),
    (Node::Router, "eth0", "2001:db8:1::1/64"),
    (Node::Router, "eth1", "2001:db8:2::1/64"),
    (Node::Server, "eth0", "2001:db8:2::2/64"),
];

/// A client / router / server lab; dropping it deletes its namespaces (and with them the veths).
pub struct Lab {
    names: [String; 3],
    created: [bool; 3],
}

impl Lab {
    /// Creates the three namespaces `{prefix}-{pid}-{n}-{client,router,server}` and wires them up.
    /// The router keeps `net.ipv4.ip_forward = 0`: enabling it is pfwd's job.
    pub fn new(prefix: &str) -> Result<Lab> {
        Lab::build(prefix, false)
    }

    /// A lab with IPv6 too (see the module docs). DAD, router advertisements and solicitations are off, so the
    /// addresses work at once and no stray ICMPv6 crosses the router; the router keeps IPv6 forwarding off (pfwd's
    /// job, as for IPv4).
    pub fn dual_stack(prefix: &str) -> Result<Lab> {
        Lab::build(prefix, true)
    }

    fn build(prefix: &str, ipv6: bool) -> Result<Lab> {
        ensure_root()?;
        ensure!(
            !prefix.is_empty()
                && prefix.len() <= 32
                && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "lab prefix {prefix:?} must be 1-32 characters of [A-Za-z0-9_-]"
        );
        remove_stale(prefix);

        let id = format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let mut lab = Lab { names: Node::ALL.map(|n| format!("{id}-{}", n.label())), created: [false; 3] };
        // From here on, an early return drops `lab`, which deletes whatever was created.
        for node in Node::ALL {
            run(Command::new("ip").args(["netns", "add", lab.ns(node)]))?;
            lab.created[node.index()] = true;
            // IPv6 off (or quiet) before the veths exist, so they never start DAD or send router solicitations.
            let v6 = if ipv6 {
                "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 \
                 net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0 \
                 net.ipv6.conf.default.router_solicitations=0 net.ipv6.conf.all.forwarding=0"
            } else {
                "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"
            };
            lab.sh(node, &format!("{v6} && ip link set lo up"))?;
        }
        lab.sh(Node::Router, "sysctl -qw net.ipv4.ip_forward=0")?;

        // Created from inside our namespaces, so no device ever appears in the host namespace and the
        // short names (eth0/eth1) cannot clash with the host's.
        let (router, server) = (lab.ns(Node::Router), lab.ns(Node::Server));
        lab.sh(Node::Client, &format!("ip link add eth0 type veth peer name eth0 netns {router}"))?;
        lab.sh(Node::Router, &format!("ip link add eth1 type veth peer name eth0 netns {server}"))?;

        for (node, dev, addr) in ADDRS {
            // Offloads off: with them on, veth passes locally built packets with partial checksums
            // unchecked, which would hide NAT checksum bugs.
            lab.sh(
                node,
                &format!(
                    "ip addr add {addr} dev {dev} && ethtool -K {dev} tx off rx off >/dev/null \
                     && ip link set {dev} up"
                ),
            )?;
        }
        lab.sh(Node::Client, "ip route add default via 10.0.1.1")?;
        lab.sh(Node::Server, "ip route add default via 10.0.2.1")?;
        if ipv6 {
            for (node, dev, addr) in ADDRS6 {
                lab.sh(node, &format!("ip -6 addr add {addr} dev {dev} nodad"))?;
            }
            lab.sh(Node::Client, "ip -6 route add default via 2001:db8:1::1")?;
            lab.sh(Node::Server, "ip -6 route add default via 2001:db8:2::1")?;
        }
        Ok(lab)
    }

    /// Network namespace name (as in `ip netns list`).
    pub fn ns(&self, node: Node) -> &str {
        &self.names[node.index()]
    }

    /// `/run/netns/NAME`, for `nsenter --net=` or `setns`.
    pub fn ns_path(&self, node: Node) -> PathBuf {
        Path::new(NETNS_DIR).join(self.ns(node))
    }

    /// A command that runs `program args` in the node's network namespace via
    /// `nsenter --net=...` (not `ip netns exec`, which remounts /sys and hides /sys/fs/bpf).
    pub fn cmd<I, S>(&self, node: Node, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut net = std::ffi::OsString::from("--net=");
        net.push(self.ns_path(node));
        let mut cmd = Command::new("nsenter");
        cmd.arg(net).arg("--").arg(program).args(args);
        cmd
    }

    /// Runs `sh -c script` in the node's namespace; returns stdout, or an error carrying stderr.
    pub fn sh(&self, node: Node, script: &str) -> Result<String> {
        run(&mut self.cmd(node, "sh", ["-c", script])).with_context(|| format!("in {}: {script}", self.ns(node)))
    }

    /// A command that runs the pfwd binary (see [`pfwd_bin`]) in the router namespace.
    pub fn pfwd<I, S>(&self, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Ok(self.cmd(Node::Router, pfwd_bin()?, args))
    }

    /// Adds an address, e.g. `lab.add_addr(Node::Client, "eth0", "192.168.1.1/24")`.
    pub fn add_addr(&self, node: Node, dev: &str, cidr: &str) -> Result<()> {
        self.ip(node, &["addr", "add", cidr, "dev", dev])
    }

    /// Adds a route, e.g. `lab.add_route(Node::Router, "192.168.1.0/24", "10.0.1.2")` so the router
    /// can answer a client that uses an extra source address.
    pub fn add_route(&self, node: Node, dest: &str, via: &str) -> Result<()> {
        self.ip(node, &["route", "add", dest, "via", via])
    }

    /// Reads a sysctl in the node's namespace, e.g. `lab.sysctl(Node::Router, "net.ipv4.ip_forward")`.
    pub fn sysctl(&self, node: Node, key: &str) -> Result<String> {
        let out = run(&mut self.cmd(node, "sysctl", ["-n", key]))
            .with_context(|| format!("in {}: sysctl -n {key}", self.ns(node)))?;
        Ok(out.trim().to_string())
    }

    fn ip(&self, node: Node, args: &[&str]) -> Result<()> {
        run(&mut self.cmd(node, "ip", args)).with_context(|| format!("in {}: ip {}", self.ns(node), args.join(" ")))?;
        Ok(())
    }

    /// Runs `f` on a fresh thread that has joined the node's network namespace and waits for it.
    /// Sockets created inside stay in that namespace for their whole life, wherever they are used later.
    /// A panic in `f` is propagated to the caller.
    pub fn in_ns<T, F>(&self, node: Node, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let ns = self.open_ns(node)?;
        let name = self.ns(node);
        thread::scope(|s| {
            let handle = s.spawn(move || {
                setns_net(&ns)?;
                anyhow::Ok(f())
            });
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                .with_context(|| format!("entering network namespace {name}"))
        })
    }

    /// Like [`Lab::in_ns`] but does not wait: returns once the thread is inside the namespace.
    pub fn spawn_in_ns<T, F>(&self, node: Node, f: F) -> Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let ns = self.open_ns(node)?;
        let (tx, rx) = mpsc::sync_channel(1);
        let handle = thread::Builder::new().name(format!("lab-{}", node.label())).spawn(move || {
            if let Err(e) = setns_net(&ns) {
                let _ = tx.send(Err(e));
                // Quiet exit (no panic hook): the error has been reported through the channel.
                std::panic::resume_unwind(Box::new("setns failed"));
            }
            let _ = tx.send(Ok(()));
            f()
        })?;
        rx.recv()
            .map_err(|_| anyhow!("namespace thread exited early"))?
            .with_context(|| format!("entering network namespace {}", self.ns(node)))?;
        Ok(handle)
    }

    fn open_ns(&self, node: Node) -> Result<File> {
        let path = self.ns_path(node);
        File::open(&path).with_context(|| format!("opening {}", path.display()))
    }

    /// TCP server in `node` on `addr`: answers each connection with
    /// `hello from {label} port {local port}, peer {peer}: {request}` (see [`Reply`]).
    /// It reads the request up to a newline, EOF or [`TIMEOUT`]. Stops when the handle is dropped.
    pub fn tcp_echo_server(&self, node: Node, addr: SocketAddr, label: &str) -> Result<ServerHandle> {
        check_label(label)?;
        let listener = self
            .in_ns(node, || TcpListener::bind(addr))?
            .with_context(|| format!("binding TCP {addr} in {}", self.ns(node)))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let (stop, peers) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (label, stop2, peers2) = (label.to_string(), stop.clone(), peers.clone());
        // The listener already lives in the namespace, so a plain thread can serve it.
        let thread = thread::spawn(move || {
            let mut workers: Vec<JoinHandle<()>> = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        lock(&peers2).push(peer);
                        let label = label.clone();
                        workers.push(thread::spawn(move || {
                            if let Err(e) = serve_tcp(stream, peer, &label, local.port()) {
                                eprintln!("lab: tcp server {label}: {peer}: {e:#}");
                            }
                        }));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
                    Err(e) => {
                        eprintln!("lab: tcp server {label}: accept: {e}");
                        thread::sleep(POLL);
                    }
                }
                workers.retain(|w| !w.is_finished());
            }
            // Each worker is bounded by its socket timeouts.
            for w in workers {
                let _ = w.join();
            }
        });
        Ok(ServerHandle { addr: local, stop, peers, thread: Some(thread) })
    }

    /// UDP server in `node` on `addr`: answers each datagram from the bound socket with the same
    /// reply format as [`Lab::tcp_echo_server`]. Stops when the handle is dropped.
    pub fn udp_echo_server(&self, node: Node, addr: SocketAddr, label: &str) -> Result<ServerHandle> {
        check_label(label)?;
        let sock = self
            .in_ns(node, || UdpSocket::bind(addr))?
            .with_context(|| format!("binding UDP {addr} in {}", self.ns(node)))?;
        sock.set_read_timeout(Some(POLL))?;
        sock.set_write_timeout(Some(TIMEOUT))?;
        let local = sock.local_addr()?;
        let (stop, peers) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (label, stop2, peers2) = (label.to_string(), stop.clone(), peers.clone());
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; MAX_MSG];
            while !stop2.load(Ordering::Relaxed) {
                match sock.recv_from(&mut buf) {
                    Ok((n, peer)) => {
                        lock(&peers2).push(peer);
                        let request = String::from_utf8_lossy(&buf[..n]);
                        let reply = Reply::format(&label, local.port(), peer, request.trim_end());
                        if let Err(e) = sock.send_to(reply.as_bytes(), peer) {
                            eprintln!("lab: udp server {label}: reply to {peer}: {e}");
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => {
                        eprintln!("lab: udp server {label}: recv: {e}");
                        thread::sleep(POLL);
                    }
                }
            }
        });
        Ok(ServerHandle { addr: local, stop, peers, thread: Some(thread) })
    }

    /// Connects from `node` to `to`, sends `payload`, half-closes and returns the whole reply.
    pub fn tcp_request(&self, node: Node, to: SocketAddr, payload: &str, timeout: Duration) -> Result<String> {
        self.tcp_req(node, None, to, payload, timeout)
    }

    /// [`Lab::tcp_request`] with the client socket bound to source address `from` (any port).
    pub fn tcp_request_from(
        &self,
        node: Node,
        from: IpAddr,
        to: SocketAddr,
        payload: &str,
        timeout: Duration,
    ) -> Result<String> {
        self.tcp_req(node, Some(from), to, payload, timeout)
    }

    fn tcp_req(
        &self,
        node: Node,
        from: Option<IpAddr>,
        to: SocketAddr,
        payload: &str,
        timeout: Duration,
    ) -> Result<String> {
        use socket2::{Domain, Protocol, Socket, Type};
        let sock = self.in_ns(node, || Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP)))??;
        if let Some(ip) = from {
            sock.bind(&SocketAddr::new(ip, 0).into()).with_context(|| format!("binding TCP client to {ip}"))?;
        }
        sock.connect_timeout(&to.into(), timeout).with_context(|| format!("TCP connect {} -> {to}", node.label()))?;
        let mut stream: TcpStream = sock.into();
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(payload.as_bytes())?;
        stream.shutdown(Shutdown::Write)?;
        let reply = read_bounded(&mut stream, Instant::now() + timeout, false)
            .with_context(|| format!("TCP reply {to} -> {}", node.label()))?;
        Ok(reply)
    }

    /// Sends one datagram from `node` to `to` and returns the reply and the address it came from
    /// (an unconnected socket, so a reply from a wrong, un-NATed source is seen rather than dropped).
    pub fn udp_request(
        &self,
        node: Node,
        to: SocketAddr,
        payload: &str,
        timeout: Duration,
    ) -> Result<(String, SocketAddr)> {
        self.udp_req(node, None, to, payload, timeout)
    }

    /// [`Lab::udp_request`] with the client socket bound to source address `from` (any port).
    pub fn udp_request_from(
        &self,
        node: Node,
        from: IpAddr,
        to: SocketAddr,
        payload: &str,
        timeout: Duration,
    ) -> Result<(String, SocketAddr)> {
        self.udp_req(node, Some(from), to, payload, timeout)
    }

    fn udp_req(
        &self,
        node: Node,
        from: Option<IpAddr>,
        to: SocketAddr,
        payload: &str,
        timeout: Duration,
    ) -> Result<(String, SocketAddr)> {
        // The unspecified address of the destination's family.
        let any = if to.is_ipv6() { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
        let bind = SocketAddr::new(from.unwrap_or(any), 0);
        let sock =
            self.in_ns(node, || UdpSocket::bind(bind))?.with_context(|| format!("binding UDP client to {bind}"))?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        sock.send_to(payload.as_bytes(), to).with_context(|| format!("UDP send {} -> {to}", node.label()))?;
        let mut buf = vec![0u8; MAX_MSG];
        let (n, src) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("UDP {} -> {to}: no reply within {timeout:?}", node.label())
            }
            Err(e) => return Err(e).context(format!("UDP reply {to} -> {}", node.label())),
        };
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), src))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (name, created) in self.names.iter().zip(self.created) {
            if created {
                delete_ns(name);
            }
        }
    }
}

/// A running test server; stops (and joins its thread) on drop.
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The bound address (with the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every peer address the server has seen, oldest first (TCP: per connection; UDP: per datagram).
    pub fn peers(&self) -> Vec<SocketAddr> {
        lock(&self.peers).clone()
    }

    /// The most recent peer address seen.
    pub fn last_peer(&self) -> Option<SocketAddr> {
        lock(&self.peers).last().copied()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A parsed test-server reply: `hello from {label} port {port}, peer {peer}: {payload}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub label: String,
    /// The server's local port (after any DNAT/redirect).
    pub port: u16,
    /// The client address as the server saw it.
    pub peer: SocketAddr,
    pub payload: String,
}

impl Reply {
    pub fn format(label: &str, port: u16, peer: SocketAddr, payload: &str) -> String {
        format!("hello from {label} port {port}, peer {peer}: {payload}")
    }

    pub fn parse(reply: &str) -> Option<Reply> {
        let rest = reply.strip_prefix("hello from ")?;
        let (label, rest) = rest.split_once(" port ")?;
        let (port, rest) = rest.split_once(", peer ")?;
        let (peer, payload) = rest.split_once(": ")?;
        Some(Reply {
            label: label.to_string(),
            port: port.parse().ok()?,
            peer: peer.parse().ok()?,
            payload: payload.to_string(),
        })
    }
}

/// Path of the pfwd binary: `$PFWD_BIN`, else `pfwd` next to the running executable (test binaries
/// live in `target/<profile>/deps/`, xtask in `target/<profile>/`). Build it with `cargo build -p pfwd`.
///
/// The binary must be built from this source tree: its source hash (`pfwd --version`, see
/// `pfwd/build/source_hash.rs`) must equal the tree's, else this fails rather than test stale code. Checked once per
/// process.
pub fn pfwd_bin() -> Result<PathBuf> {
    static CHECKED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CHECKED.get_or_init(|| find_pfwd_bin().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
}

fn find_pfwd_bin() -> Result<PathBuf> {
    let bin = match std::env::var_os("PFWD_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe()?;
            let mut dir = exe.parent().context("executable has no parent directory")?;
            if dir.ends_with("deps") {
                dir = dir.parent().context("deps has no parent directory")?;
            }
            dir.join("pfwd")
        }
    };
    let rebuild = "build it from this tree with `cargo build -p pfwd` (`cargo xtask test` does)";
    ensure!(bin.exists(), "{} not found: {rebuild}", bin.display());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("tests is inside the workspace")?;
    let tree = source_hash::source_hash(root).context("hashing pfwd's sources")?;
    let out = Command::new(&bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let version = String::from_utf8_lossy(&out.stdout);
    let built = version.split_once("(source ").and_then(|(_, rest)| rest.split_once(')')).map(|(hash, _)| hash);
    ensure!(
        built == Some(tree.as_str()),
        "{} is stale: built from sources {}, the tree's are {tree}: {rebuild}",
        bin.display(),
        built.unwrap_or("(unknown)"),
    );
    Ok(bin)
}

fn ensure_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the namespace lab needs root (network namespaces, veth, BPF): run the tests as root, \
             e.g. `cargo xtask test`"
        );
    }
    Ok(())
}

fn setns_net(ns: &File) -> Result<()> {
    // SAFETY: a valid open fd of a netns file; CLONE_NEWNET only changes the calling thread's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

/// Runs a command to completion; stdout on success, an error with stderr otherwise.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn delete_ns(name: &str) {
    match Command::new("ip").args(["netns", "del", name]).stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!("lab: ip netns del {name} failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => eprintln!("lab: ip netns del {name}: {e}"),
    }
}

/// Deletes namespaces left by labs of dead processes (killed before Drop could run). Only names in
/// the exact lab format `{prefix}-{pid}-{n}-{node}` whose pid no longer exists are touched.
fn remove_stale(prefix: &str) {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    let lead = format!("{prefix}-");
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&lead) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let [pid, n, node] = parts[..] else {
            continue;
        };
        let ours =
            pid.parse::<u32>().is_ok() && n.parse::<u32>().is_ok() && Node::ALL.iter().any(|x| x.label() == node);
        if ours && !Path::new("/proc").join(pid).exists() {
            delete_ns(&name);
        }
    }
}

fn check_label(label: &str) -> Result<()> {
    ensure!(
        !label.is_empty() && !label.contains(char::is_whitespace),
        "server label {label:?} must be non-empty without spaces (replies are parsed by Reply::parse)"
    );
    Ok(())
}

fn serve_tcp(mut stream: TcpStream, peer: SocketAddr, label: &str, port: u16) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let request = read_bounded(&mut stream, Instant::now() + TIMEOUT, true)?;
    let reply = Reply::format(label, port, peer, request.trim_end());
    stream.write_all(reply.as_bytes())?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// Reads until EOF (or a newline when `line`), at most [`MAX_MSG`] bytes, failing at `deadline`
/// unless some data has arrived (a server answers what it got; a client needs the full reply).
fn read_bounded(stream: &mut TcpStream, deadline: Instant, line: bool) -> Result<String> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    while data.len() < MAX_MSG {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            if line && !data.is_empty() {
                break;
            }
            bail!("timed out after {} bytes", data.len());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                data.extend_from_slice(&buf[..n]);
                if line && buf[..n].contains(&b'\n') {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if line && !data.is_empty() {
                    break;
                }
                bail!("timed out after {} bytes", data.len());
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(String::from_utf8_lossy(&data).into_owned())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking server thread must not hide the peers it recorded.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn reply_round_trip() {
        let text = Reply::format("web", 80, sa("10.0.1.2:4000"), "hi: there");
        let r = Reply::parse(&text).unwrap();
        assert_eq!((r.label.as_str(), r.port), ("web", 80));
        assert_eq!(r.peer, sa("10.0.1.2:4000"));
        assert_eq!(r.payload, "hi: there");
        assert!(Reply::parse("nonsense").is_none());
    }

    /// Needs root (CI runs as root): fails loudly otherwise instead of silently passing.
    #[test]
    fn lab_links_work_and_cleanup_removes_namespaces() {
        let lab = Lab::new("labtest").expect("creating the lab (needs root)");
        let names: Vec<String> = Node::ALL.iter().map(|&n| lab.ns(n).to_string()).collect();
        for n in &names {
            assert!(Path::new(NETNS_DIR).join(n).exists(), "{n} missing");
        }
        // A second lab in the same process gets distinct names.
        let other = Lab::new("labtest").unwrap();
        assert_ne!(other.ns(Node::Router), lab.ns(Node::Router));
        drop(other);

        assert_eq!(lab.sysctl(Node::Router, "net.ipv4.ip_forward").unwrap(), "0");
        let offloads = lab.sh(Node::Router, "ethtool -k eth1").unwrap();
        assert!(offloads.contains("rx-checksumming: off"), "{offloads}");
        assert!(offloads.contains("tx-checksumming: off"), "{offloads}");

        // client -> router over the first link.
        let web = lab.tcp_echo_server(Node::Router, sa("10.0.1.1:80"), "web").unwrap();
        let reply = lab.tcp_request(Node::Client, sa("10.0.1.1:80"), "ping", TIMEOUT).unwrap();
        let r = Reply::parse(&reply).unwrap();
        assert_eq!((r.label.as_str(), r.port, r.payload.as_str()), ("web", 80, "ping"));
        assert_eq!(r.peer.ip().to_string(), "10.0.1.2");
        assert_eq!(web.last_peer(), Some(r.peer));

        // router -> server over the second link, TCP and UDP.
        let tcp = lab.tcp_echo_server(Node::Server, sa("10.0.2.2:9000"), "srv").unwrap();
        let udp = lab.udp_echo_server(Node::Server, sa("10.0.2.2:9000"), "srv").unwrap();
        let reply = lab.tcp_request(Node::Router, sa("10.0.2.2:9000"), "t", TIMEOUT).unwrap();
        assert!(reply.starts_with("hello from srv port 9000, peer 10.0.2.1:"), "{reply}");
        assert_eq!(tcp.peers().len(), 1);
        let (reply, src) = lab.udp_request(Node::Router, sa("10.0.2.2:9000"), "u", TIMEOUT).unwrap();
        assert_eq!(src, sa("10.0.2.2:9000"));
        assert_eq!(Reply::parse(&reply).unwrap().peer.ip().to_string(), "10.0.2.1");
        assert_eq!(udp.peers().len(), 1);

        // No forwarding without pfwd: the client cannot reach the server.
        let short = Duration::from_millis(300);
        assert!(lab.tcp_request(Node::Client, sa("10.0.2.2:9000"), "x", short).is_err());
        assert!(lab.udp_request(Node::Client, sa("10.0.2.2:9000"), "x", short).is_err());

        // Extra client address + return route: the server sees the chosen source.
        lab.add_addr(Node::Client, "eth0", "192.168.1.1/24").unwrap();
        lab.add_route(Node::Router, "192.168.1.0/24", "10.0.1.2").unwrap();
        let from: IpAddr = "192.168.1.1".parse().unwrap();
        let reply = lab.tcp_request_from(Node::Client, from, sa("10.0.1.1:80"), "src", TIMEOUT).unwrap();
        assert_eq!(Reply::parse(&reply).unwrap().peer.ip(), from);
        let (_, src) =
            lab.udp_request_from(Node::Router, "10.0.2.1".parse().unwrap(), sa("10.0.2.2:9000"), "x", TIMEOUT).unwrap();
        assert_eq!(src, sa("10.0.2.2:9000"));

        // in_ns really runs inside the namespace (the thread's netns inode is the lab's).
        use std::os::unix::fs::MetadataExt;
        let want = fs::metadata(lab.ns_path(Node::Server)).unwrap().ino();
        let got =
            lab.in_ns(Node::Server, || fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino())).unwrap().unwrap();
        assert_eq!(got, want);
        let links = lab.sh(Node::Router, "ip -o link show | cut -d: -f2").unwrap();
        let mut links: Vec<&str> = links.split_whitespace().map(|l| l.split('@').next().unwrap()).collect();
        links.sort();
        assert_eq!(links, ["eth0", "eth1", "lo"]);

        drop((web, tcp, udp));
        drop(lab);
        for n in &names {
            assert!(!Path::new(NETNS_DIR).join(n).exists(), "{n} left behind");
        }
    }
}
