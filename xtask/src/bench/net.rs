//! The lab side of the bench: variants (plain routing, pfwd iptables mode, pfwd eBPF mode) and the traffic
//! workloads (trafgen UDP, TCP connection rate, iperf3).

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Seek, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tests::{Lab, Node};

use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};

use super::prog::EmptyProg;
use super::run::{self, Background, Finished, check_interrupted};

pub const ROUTER_IN: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The dual-stack lab's IPv6 addresses (see tests::Lab::dual_stack).
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const ROUTER6_IN: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const ROUTER6_OUT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
pub const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
pub const UDP_PORT: u16 = 9000;
pub const TCP_RATE_PORT: u16 = 9001;
pub const IPERF_PORT: u16 = 5201;
/// Frames per live-frames run (see `Env::udp_live`), and their source port.
pub const LIVE_BATCH: u32 = 256;
const LIVE_SPORT: u16 = 7_001;
/// Extra client addresses for the connection-rate workload: one address would reuse each 4-tuple within about a
/// second at tens of thousands of connections/s, and a SYN on a tuple whose previous connection is still in
/// TIME_WAIT somewhere on the NAT path costs a 1 s SYN retransmit (seen in both NAT modes); real clients are many.
const RATE_CLIENTS: u8 = 64;
const RATE_CLIENT_BASE: u8 = 100;
/// First port of the extra (non-matching) rules of the rule-scale workload.
const EXTRA_PORT_BASE: u32 = 20_000;
/// pfwd is expected to return quickly; 10,000 rules through iptables-restore take a few seconds at most.
const PFWD_TIMEOUT: Duration = Duration::from_secs(60);

/// One way of getting client traffic to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Router with ip_forward=1, no NAT, no netfilter; the client sends to the server's address.
    Plain,
    /// Plain routing with an empty tcx program (`r0 = TCX_NEXT; exit`) at each hook pfwd's tc path uses (the
    /// router's eth0 and eth1, ingress and egress): what running any two tc programs per forwarded packet costs here.
    PlainTc,
    Iptables,
    Ebpf,
    /// eBPF mode with `--fast-forward`: forwarded packets skip the router's IP stack.
    EbpfFast,
    /// eBPF mode with `--xdp` (native XDP on the router's veths): established flows skip the skb.
    EbpfXdp,
    /// nft mode (pfwd's nftables table).
    Nft,
    /// The mode with 9,999 non-matching rules ahead of the matching one.
    Iptables10k,
    Ebpf10k,
    Nft10k,
    /// Plain routing and eBPF mode over IPv6 (client 2001:db8:1::2, DNAT 2001:db8:1::1 -> 2001:db8:2::2).
    Plain6,
    Ebpf6,
}

impl Variant {
    pub fn key(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::PlainTc => "plain-tc",
            Variant::Iptables => "iptables",
            Variant::Ebpf => "ebpf",
            Variant::EbpfFast => "ebpf-ff",
            Variant::EbpfXdp => "ebpf-xdp",
            Variant::Iptables10k => "iptables-10k",
            Variant::Ebpf10k => "ebpf-10k",
            Variant::Nft => "nft",
            Variant::Nft10k => "nft-10k",
            Variant::Plain6 => "plain6",
            Variant::Ebpf6 => "ebpf6",
        }
    }

    pub fn mode(self) -> Option<&'static str> {
        match self {
            Variant::Plain | Variant::PlainTc | Variant::Plain6 => None,
            Variant::Iptables | Variant::Iptables10k => Some("iptables"),
            Variant::Ebpf | Variant::EbpfFast | Variant::EbpfXdp | Variant::Ebpf10k | Variant::Ebpf6 => Some("ebpf"),
            Variant::Nft | Variant::Nft10k => Some("nft"),
        }
    }

    fn many_rules(self) -> bool {
        matches!(self, Variant::Iptables10k | Variant::Ebpf10k | Variant::Nft10k)
    }

    pub fn ipv6(self) -> bool {
        matches!(self, Variant::Plain6 | Variant::Ebpf6)
    }

    /// Where the client sends: the server itself for plain routing, else the router's DNAT address.
    pub fn target(self) -> IpAddr {
        match self {
            Variant::Plain | Variant::PlainTc => SERVER.into(),
            Variant::Plain6 => SERVER6.into(),
            Variant::Ebpf6 => ROUTER6_IN.into(),
            _ => ROUTER_IN.into(),
        }
    }
}

/// Which rules a run attaches with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RuleSet {
    Udp,
    Tcp,
}

/// The lab, the pfwd binary and everything a run needs; removes pfwd's pins and the namespaces on drop.
pub struct Env {
    pub lab: Lab,
    pub pfwd: PathBuf,
    pub tmp: PathBuf,
    router_mac: String,
    /// The server's eth0 MAC: the live frames a bare XDP redirect sends on are addressed to it.
    server_mac: String,
    /// /proc/net/dev of the server namespace (opened there, so reads from any thread show that namespace).
    server_dev: File,
    /// /proc/net/tcp of the server namespace.
    server_tcp: File,
    _udp_sink: UdpSocket,
    _udp_sink6: UdpSocket,
    _tcp_server: TcpServer,
    pub rules_extra: u32,
    router_ns_inode: u64,
}

impl Env {
    pub fn new(pfwd: &Path, rules_extra: u32) -> Result<Env> {
        let tmp = std::env::temp_dir().join(format!("pfwd-bench-{}", std::process::id()));
        fs::create_dir_all(&tmp)?;
        // Dual-stack for the IPv6 rows; IPv4 runs as in an IPv4-only lab (no IPv6 traffic crosses it meanwhile).
        let lab = Lab::dual_stack("pfwd-bench")?;
        let router_ns_inode = fs::metadata(lab.ns_path(Node::Router))?.ino();
        // Permanent neighbours: no ARP resolution (and its queue drops) inside any measured window.
        // (`ip`, not /sys: nsenter keeps the host's /sys, which shows the host's devices.)
        let mac = |node, dev: &str| parse_mac(&lab.sh(node, &format!("ip -o link show {dev}"))?);
        let (client, router0, router1, server) = (
            mac(Node::Client, "eth0")?,
            mac(Node::Router, "eth0")?,
            mac(Node::Router, "eth1")?,
            mac(Node::Server, "eth0")?,
        );
        lab.sh(Node::Client, &format!("ip neigh replace 10.0.1.1 lladdr {router0} dev eth0 nud permanent"))?;
        lab.sh(Node::Router, &format!("ip neigh replace 10.0.1.2 lladdr {client} dev eth0 nud permanent"))?;
        lab.sh(Node::Router, &format!("ip neigh replace 10.0.2.2 lladdr {server} dev eth1 nud permanent"))?;
        lab.sh(Node::Server, &format!("ip neigh replace 10.0.2.1 lladdr {router1} dev eth0 nud permanent"))?;
        for (node, addr, mac, dev) in [
            (Node::Client, ROUTER6_IN, &router0, "eth0"),
            (Node::Router, CLIENT6, &client, "eth0"),
            (Node::Router, SERVER6, &server, "eth1"),
            (Node::Server, ROUTER6_OUT, &router1, "eth0"),
        ] {
            lab.sh(node, &format!("ip -6 neigh replace {addr} lladdr {mac} dev {dev} nud permanent"))?;
        }
        // IPv6 forwarding on for the whole run (plain6 and ebpf6 route IPv6; IPv4 does not look at it): switching it
        // makes the router join or leave the all-routers groups, and the MLD reports it sends for that (two, the
        // second a few hundred ms later) reach the server's eth0, where rx_packets would count them inside a measured
        // window. Switched here, they are long past when the IPv6 runs come; pfwd finds it on and leaves it.
        lab.sh(Node::Router, "sysctl -qw net.ipv6.conf.all.forwarding=1")?;
        for i in 0..RATE_CLIENTS {
            let a = Ipv4Addr::new(10, 0, 1, RATE_CLIENT_BASE + i);
            lab.sh(Node::Client, &format!("ip addr add {a}/32 dev eth0"))?;
            lab.sh(Node::Router, &format!("ip neigh replace {a} lladdr {client} dev eth0 nud permanent"))?;
        }
        // The connection-rate client opens tens of thousands of connections: reuse TIME_WAIT ports.
        lab.sh(
            Node::Client,
            "sysctl -qw net.ipv4.tcp_tw_reuse=1 && sysctl -qw net.ipv4.ip_local_port_range='1024 65000'",
        )?;
        let server_dev = lab.in_ns(Node::Server, || File::open("/proc/thread-self/net/dev"))??;
        let server_tcp = lab.in_ns(Node::Server, || File::open("/proc/thread-self/net/tcp"))??;
        // A bound socket nobody reads: datagrams end in its full queue instead of ICMP port unreachable.
        let udp_sink = lab.in_ns(Node::Server, || UdpSocket::bind(SocketAddrV4::new(SERVER, UDP_PORT)))??;
        let udp_sink6 = lab.in_ns(Node::Server, || UdpSocket::bind(SocketAddrV6::new(SERVER6, UDP_PORT, 0, 0)))??;
        let tcp_server = TcpServer::start(&lab, SocketAddrV4::new(SERVER, TCP_RATE_PORT))?;
        let env = Env {
            lab,
            pfwd: pfwd.to_path_buf(),
            tmp,
            router_mac: router0,
            server_mac: server.clone(),
            server_dev,
            server_tcp,
            _udp_sink: udp_sink,
            _udp_sink6: udp_sink6,
            _tcp_server: tcp_server,
            rules_extra,
            router_ns_inode,
        };
        env.write_configs()?;
        Ok(env)
    }

    /// pfwd's pin directory for the router namespace (see pfwd's instance.rs).
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/pfwd/net-{}", self.router_ns_inode))
    }

    fn config(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    fn write_configs(&self) -> Result<()> {
        let rule = |id: u32, proto: &str, dport: u32, to: &str| {
            format!(
                "[[rule]]\nid = {id}\nkind = \"dnat\"\niface = \"eth0\"\nproto = \"{proto}\"\ndport = {dport}\nto = \"{to}\"\n\n"
            )
        };
        let udp_to = format!("{SERVER}:{UDP_PORT}");
        fs::write(self.config("udp-1.toml"), rule(1, "udp", UDP_PORT.into(), &udp_to))?;
        fs::write(self.config("udp6-1.toml"), rule(1, "udp", UDP_PORT.into(), &format!("[{SERVER6}]:{UDP_PORT}")))?;
        // Same specificity as the matching rule, lower ids: pfwd's iptables export puts them first, so every new
        // flow walks all of them in iptables mode before it matches.
        let mut many = String::new();
        let mut import = String::from("*nat\n");
        for i in 0..self.rules_extra {
            many.push_str(&rule(i + 1, "udp", EXTRA_PORT_BASE + i, &udp_to));
            import.push_str(&format!(
                "-A PREROUTING -i eth0 -p udp -m udp --dport {} -j DNAT --to-destination {udp_to}\n",
                EXTRA_PORT_BASE + i
            ));
        }
        import.push_str("COMMIT\n");
        many.push_str(&rule(self.rules_extra + 1, "udp", UDP_PORT.into(), &udp_to));
        fs::write(self.config("udp-many.toml"), many)?;
        fs::write(self.config("import.rules"), import)?;
        let tcp = rule(1, "tcp", TCP_RATE_PORT.into(), &format!("{SERVER}:{TCP_RATE_PORT}"))
            + &rule(2, "tcp", IPERF_PORT.into(), &format!("{SERVER}:{IPERF_PORT}"));
        fs::write(self.config("tcp.toml"), tcp)?;
        Ok(())
    }

    /// Runs pfwd in the router namespace with a deadline; returns timing and peak RSS too.
    pub fn pfwd(&self, args: &[&str]) -> Result<Finished> {
        check_interrupted()?;
        run::run(self.lab.cmd(Node::Router, &self.pfwd, args), PFWD_TIMEOUT, false)
    }

    /// Sets up `variant` with `rules`; the returned guard tears it down. `Setup::attach` is the attach's timing.
    pub fn setup(&self, variant: Variant, rules: RuleSet) -> Result<Setup<'_>> {
        check_interrupted()?;
        // Guard first, so a half-done attach is undone too.
        let mut guard = Setup { env: self, variant, attach: None, empty_tc: None };
        match variant.mode() {
            None => {
                // (IPv6 forwarding is on for the whole run: see Env::new.)
                if !variant.ipv6() {
                    self.lab.sh(Node::Router, "sysctl -qw net.ipv4.ip_forward=1")?;
                }
                if variant == Variant::PlainTc {
                    guard.empty_tc = Some(self.attach_empty_tc()?);
                }
                self.warn_if_netfilter();
            }
            Some(mode) => {
                let cfg = match (rules, variant.many_rules()) {
                    (RuleSet::Tcp, _) => "tcp.toml",
                    (RuleSet::Udp, _) if variant.ipv6() => "udp6-1.toml",
                    (RuleSet::Udp, false) => "udp-1.toml",
                    (RuleSet::Udp, true) => "udp-many.toml",
                };
                let cfg = self.config(cfg);
                let cfg = cfg.to_str().context("temp path is not UTF-8")?;
                let mut args = vec!["attach", "eth0", "eth1", "--mode", mode, "--config", cfg];
                if variant == Variant::EbpfFast {
                    args.push("--fast-forward");
                }
                if variant == Variant::EbpfXdp {
                    // Native XDP redirects into a veth only if its peer has NAPI: GRO on (or an XDP program). The
                    // server's side gets it for this variant only (the guard turns it off again).
                    self.lab.sh(Node::Server, "ethtool -K eth0 gro on >/dev/null")?;
                    args.push("--xdp");
                }
                guard.attach = Some(self.pfwd(&args)?);
                if mode == "ebpf" {
                    self.warn_if_netfilter();
                }
            }
        }
        Ok(guard)
    }

    /// An empty classifier attached (tcx) to the router's eth0 and eth1, ingress and egress, as pfwd attaches its
    /// programs; detached when it is dropped (its links belong to it).
    fn attach_empty_tc(&self) -> Result<EmptyProg<SchedClassifier>> {
        let mut empty = EmptyProg::load()?;
        self.lab.in_ns(Node::Router, || -> Result<()> {
            for dev in ["eth0", "eth1"] {
                for at in [TcAttachType::Ingress, TcAttachType::Egress] {
                    let opts = TcAttachOptions::TcxOrder(LinkOrder::default());
                    empty.prog.attach_with_options(dev, at, opts).with_context(|| format!("tcx {at:?} on {dev}"))?;
                }
            }
            Ok(())
        })??;
        Ok(empty)
    }

    /// Plain routing and eBPF mode must not pay for netfilter left over from an iptables-mode run.
    fn warn_if_netfilter(&self) {
        if let Ok(t) = self.lab.sh(Node::Router, "nft list tables 2>/dev/null")
            && !t.trim().is_empty()
        {
            eprintln!("    warning: nftables tables left in the router namespace: {}", t.trim().replace('\n', ", "));
        }
    }

    fn rx_packets(&self) -> Result<u64> {
        read_dev_rx(&self.server_dev, "eth0")
    }

    /// trafgen from the client: `packets` small UDP packets over `flows` source ports to `dst:9000` (IPv4 or IPv6,
    /// from the client's address of that family). Returns the packets delivered to the server's interface per second
    /// of the delivery window, and (sent, delivered).
    pub fn udp(&self, dst: IpAddr, flows: u32, packets: u64, sport_base: u16) -> Result<(f64, u64, u64)> {
        ensure!(flows >= 1 && u32::from(sport_base) + flows <= 65_536, "bad flow count {flows}");
        let sport = if flows == 1 {
            sport_base.to_string()
        } else {
            format!("dinc({sport_base}, {})", u32::from(sport_base) + flows - 1)
        };
        // 60-byte frames (the minimum without FCS), 80 bytes over IPv6 (same payload); trafgen recomputes the UDP
        // checksum for each source port.
        let ip = match dst {
            IpAddr::V4(dst) => format!("ipv4(sa=10.0.1.2, da={dst}, ttl=64)"),
            IpAddr::V6(dst) => format!("ipv6(sa={CLIENT6}, da={dst}, hl=64)"),
        };
        let conf = format!("{{ eth(da={}), {ip}, udp(sp={sport}, dp={UDP_PORT}), fill(0x41, 18) }}\n", self.router_mac);
        let path = self.tmp.join(format!("udp-{dst}-{flows}.cfg"));
        fs::write(&path, conf)?;
        let before = self.rx_packets()?;
        let count = packets.to_string();
        let path = path.to_str().context("temp path is not UTF-8")?.to_string();
        // One sender process: on veth the whole path (router, server) runs in softirq on the sending CPU.
        // -Q: never touch IRQ affinities.
        let args = ["--dev", "eth0", "--conf", &path, "-n", &count, "--cpus", "1", "-C", "-Q"];
        let mut sender = Background::spawn(self.lab.cmd(Node::Client, "trafgen", args), "trafgen")?;
        let start = Instant::now();
        // Bounded, but long enough for iptables mode with 10,000 rules, whose every new flow walks them all (50,000
        // new flows took over 250 s on a slow host).
        let deadline = start + Duration::from_secs(120 + packets / 2_000);
        let (mut last, mut first_at, mut last_change) = (before, None, start);
        let mut exited_at = None;
        // Poll the server's counter: the window runs from its first to its last increment.
        loop {
            thread::sleep(Duration::from_millis(1));
            let now = Instant::now();
            let rx = self.rx_packets()?;
            if rx != last {
                first_at.get_or_insert(now);
                last = rx;
                last_change = now;
            }
            if exited_at.is_none() && sender.try_wait()? {
                exited_at = Some(now);
            }
            if let Some(t) = exited_at
                && now - t.max(last_change) > Duration::from_millis(100)
            {
                break;
            }
            if now > deadline {
                bail!("trafgen run exceeded {:?}", deadline - start);
            }
            if check_interrupted().is_err() {
                bail!("interrupted");
            }
        }
        let out = sender.finish(Duration::from_secs(5))?;
        let sent = out
            .lines()
            .find(|l| l.contains("packets outgoing"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(packets);
        let delivered = last - before;
        let Some(first) = first_at else { bail!("no packet reached the server (sent {sent})") };
        let window = (last_change - first).as_secs_f64().max(1e-3);
        Ok((delivered as f64 / window, sent, delivered))
    }

    /// The kernel's own traffic generator (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES, as xdp-trafficgen
    /// uses it): `calls` runs of [`LIVE_BATCH`] frames each, 60-byte UDP from the client to `dst:9000`, injected at
    /// the router's eth0 as if its driver had received them, through the XDP program `prog` (which passes them to
    /// the stack, or forwards them itself). The frames are addressed to the router's eth0 MAC, or with `to_server`
    /// to the server's (for a program that sends them on untouched). Returns frames per second over the calls, and
    /// (frames, delivered).
    ///
    /// One batch per run: the generator's frames come from a page pool made per run, and a page the run gets back
    /// (a frame delivered and freed) keeps what the program or the stack wrote into it; a NAT rewrite of it is no
    /// longer the frame sent (measured: after two batches of one long run, nearly every frame was stale).
    pub fn udp_live(
        &self,
        prog: &aya::programs::Xdp,
        dst: Ipv4Addr,
        calls: u32,
        to_server: bool,
    ) -> Result<(f64, u64, u64)> {
        use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};
        let mut frame = vec![];
        let mac = if to_server { &self.server_mac } else { &self.router_mac };
        let mac: Vec<u8> = mac.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>()?;
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], mac.try_into().map_err(|_| anyhow::anyhow!("MAC"))?)
            .ipv4([10, 0, 1, 2], dst.octets(), 64)
            .udp(LIVE_SPORT, UDP_PORT)
            .write(&mut frame, &[0x41; 18])?;
        // (In the namespace: `sh` runs under nsenter, whose /sys is still the host's.)
        // SAFETY: a NUL-terminated name.
        let ifindex = self.lab.in_ns(Node::Router, || unsafe { libc::if_nametoindex(c"eth0".as_ptr()) })?;
        ensure!(ifindex != 0, "no eth0 in the router namespace");
        // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut md = [0u8; 24];
        md[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let run = |repeat: u32| {
            prog.test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&md),
                repeat,
                attrs: TestRunAttrs::new().xdp_live_frames(LIVE_BATCH),
                ..Default::default()
            })
            .map(|_| ())
            .context("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES")
        };
        // The first frame makes the flow (through the tc programs), as a first packet does.
        self.lab.in_ns(Node::Router, || run(1))??;
        thread::sleep(Duration::from_millis(50));
        let before = self.rx_packets()?;
        let elapsed = self.lab.in_ns(Node::Router, || -> Result<Duration> {
            let start = Instant::now();
            for i in 0..calls {
                if i % 100 == 0 {
                    check_interrupted()?;
                }
                run(LIVE_BATCH)?;
            }
            Ok(start.elapsed())
        })??;
        // Delivery to the server is asynchronous (its veth's NAPI): wait until the counter settles.
        let (mut last, mut settled) = (self.rx_packets()?, Instant::now());
        while settled.elapsed() < Duration::from_millis(100) {
            thread::sleep(Duration::from_millis(5));
            let rx = self.rx_packets()?;
            if rx != last {
                (last, settled) = (rx, Instant::now());
            }
        }
        let frames = u64::from(calls) * u64::from(LIVE_BATCH);
        Ok((frames as f64 / elapsed.as_secs_f64(), frames, last - before))
    }

    /// TCP connect / 1-byte request / 1-byte reply / close from `threads` client threads for `dur`.
    pub fn tcp_rate(&self, dst: IpAddr, threads: usize, dur: Duration) -> Result<f64> {
        ensure!(dst.is_ipv4(), "the connection-rate workload is IPv4 only");
        let to = SocketAddr::new(dst, TCP_RATE_PORT);
        let start = Instant::now();
        let deadline = start + dur;
        let mut handles: Vec<JoinHandle<(u64, u64, Option<String>)>> = vec![];
        for t in 0..threads {
            handles.push(self.lab.spawn_in_ns(Node::Client, move || {
                let (mut ok, mut errors, mut last_err) = (0u64, 0u64, None);
                let mut n = t;
                // Bounded by time, by count and by errors.
                while Instant::now() < deadline && ok < 10_000_000 && errors < 100 {
                    n = n.wrapping_add(threads);
                    let from = Ipv4Addr::new(10, 0, 1, RATE_CLIENT_BASE + (n % usize::from(RATE_CLIENTS)) as u8);
                    match one_request(from, to) {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            errors += 1;
                            last_err = Some(format!("{e:#}"));
                        }
                    }
                }
                (ok, errors, last_err)
            })?);
        }
        let (mut ok, mut errors, mut last_err) = (0, 0, None);
        for h in handles {
            let (o, e, l) = h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))?;
            ok += o;
            errors += e;
            last_err = last_err.or(l);
        }
        let elapsed = start.elapsed().as_secs_f64();
        if errors > 0 {
            eprintln!("    note: {errors} failed connections ({})", last_err.unwrap_or_default());
        }
        ensure!(ok > 0, "no TCP connection to {to} succeeded");
        Ok(ok as f64 / elapsed)
    }

    /// iperf3 from client to server (through `dst`), `streams` parallel streams; Gbit/s received.
    pub fn iperf(&self, dst: IpAddr, streams: u32, secs: u32) -> Result<f64> {
        ensure!(dst.is_ipv4(), "the iperf3 workload is IPv4 only");
        let port = IPERF_PORT.to_string();
        let server = Background::spawn(
            self.lab.cmd(Node::Server, "iperf3", ["-s", "-1", "-B", &SERVER.to_string(), "-p", &port]),
            "iperf3 -s",
        )?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.listening(IPERF_PORT)? {
            ensure!(Instant::now() < deadline, "iperf3 server did not start listening");
            thread::sleep(Duration::from_millis(10));
        }
        let (t, p) = (secs.to_string(), streams.to_string());
        let args = ["-c", &dst.to_string(), "-p", &port, "-t", &t, "-P", &p, "-J", "--connect-timeout", "2000"];
        let out =
            run::run(self.lab.cmd(Node::Client, "iperf3", args), Duration::from_secs(u64::from(secs) + 20), true)?;
        drop(server.finish(Duration::from_secs(5)));
        let json: serde_json::Value =
            serde_json::from_str(&out.stdout).with_context(|| format!("iperf3 -J output: {}", out.stderr.trim()))?;
        if let Some(e) = json.get("error") {
            bail!("iperf3: {e}");
        }
        let bps =
            json["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 JSON without sum_received")?;
        Ok(bps / 1e9)
    }

    fn listening(&self, port: u16) -> Result<bool> {
        let text = read_fresh(&self.server_tcp)?;
        let want = format!(":{port:04X} ");
        // st 0A = LISTEN.
        Ok(text.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && format!("{} ", f[1]).ends_with(&want) && f[3] == "0A"
        }))
    }
}

/// Undoes a variant's setup on drop: pfwd detach (+ conntrack flush) or ip_forward back to 0 (IPv4 plain routing).
pub struct Setup<'a> {
    env: &'a Env,
    variant: Variant,
    pub attach: Option<Finished>,
    /// `Variant::PlainTc`'s empty program, attached while this lives.
    empty_tc: Option<EmptyProg<SchedClassifier>>,
}

impl Drop for Setup<'_> {
    fn drop(&mut self) {
        let lab = &self.env.lab;
        match self.variant.mode() {
            None => {
                if !self.variant.ipv6() {
                    let _ = lab.sh(Node::Router, "sysctl -qw net.ipv4.ip_forward=0");
                }
            }
            Some(_) => {
                if let Err(e) = run::run(lab.cmd(Node::Router, &self.env.pfwd, ["detach"]), PFWD_TIMEOUT, false) {
                    eprintln!("    warning: pfwd detach: {e:#}");
                }
                if self.variant == Variant::EbpfXdp {
                    let _ = lab.sh(Node::Server, "ethtool -K eth0 gro off >/dev/null");
                }
                // netfilter keeps conntrack entries (with their NAT) after the rules are gone; the next run must
                // start from an empty table.
                let _ = lab.sh(Node::Router, "conntrack -F >/dev/null 2>&1; true");
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Last resort: pins survive the namespace, so remove any left by a failed detach.
        let dir = self.pin_dir();
        if dir.exists() {
            eprintln!("    cleanup: removing leftover pins in {}", dir.display());
            if let Ok(entries) = fs::read_dir(&dir) {
                let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
                // Links first, so programs detach before their pins go.
                paths.sort_by_key(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link_")));
                for p in paths {
                    let _ = fs::remove_file(p);
                }
            }
            let _ = fs::remove_dir(&dir);
            // As `pfwd detach` does: no empty /sys/fs/bpf/pfwd left behind (fails, harmlessly, if it is not empty).
            if let Some(parent) = dir.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
        let _ = fs::remove_dir_all(PathBuf::from(format!("/run/pfwd/net-{}", self.router_ns_inode)));
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

fn one_request(from: Ipv4Addr, to: SocketAddr) -> Result<()> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let one: libc::c_int = 1;
    // IP_BIND_ADDRESS_NO_PORT: pick the port at connect, per 4-tuple, not per address at bind.
    // SAFETY: valid fd and int option.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(from, 0)).into())?;
    sock.connect_timeout(&to.into(), Duration::from_secs(1))?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    s.set_nodelay(true)?;
    s.write_all(b"q")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

/// 1-byte request / 1-byte reply server on two threads; stops when dropped.
struct TcpServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TcpServer {
    fn start(lab: &Lab, addr: SocketAddrV4) -> Result<Self> {
        use socket2::{Domain, Socket, Type};
        let listener: TcpListener = lab.in_ns(Node::Server, || -> Result<TcpListener> {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::V4(addr).into())?;
            // A deep backlog: SYNs dropped on a full queue would cost a 1 s retransmit each.
            s.listen(4096)?;
            Ok(s.into())
        })??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = vec![];
        for _ in 0..2 {
            let (l, stop) = (listener.try_clone()?, stop.clone());
            threads.push(thread::spawn(move || serve(l, &stop)));
        }
        Ok(Self { stop, threads })
    }
}

fn serve(l: TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        // SAFETY: one valid pollfd; 20 ms bounds how long a stop request waits.
        if unsafe { libc::poll(fds.as_mut_ptr(), 1, 20) } <= 0 {
            continue;
        }
        match l.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(&b);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn read_fresh(f: &File) -> Result<String> {
    let mut f = f;
    f.rewind()?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    Ok(s)
}

fn read_dev_rx(f: &File, dev: &str) -> Result<u64> {
    let text = read_fresh(f)?;
    let line = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{dev}:")))
        .with_context(|| format!("{dev} missing from /proc/net/dev"))?;
    // Fields after "dev:": rx bytes, rx packets, ...
    line.split_whitespace().nth(1).context("short /proc/net/dev line")?.parse().context("rx packets")
}

fn parse_mac(ip_link: &str) -> Result<String> {
    let mut words = ip_link.split_whitespace();
    while let Some(w) = words.next() {
        if w == "link/ether" {
            return words.next().map(str::to_string).context("no MAC after link/ether");
        }
    }
    bail!("no MAC in {ip_link:?}")
}
