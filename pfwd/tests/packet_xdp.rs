//! Packet tests of the XDP fast path (`pfwd_xdp`, `attach --xdp`): the real program, loaded and pinned by
//! `Kernel::load`, run with BPF_PROG_TEST_RUN (never with BPF_F_TEST_XDP_LIVE_FRAMES: nothing is sent) on frames
//! that arrive on a router-side veth. Flows are made the way they are in an instance: by the real tc programs on
//! crafted packets (tests/common). Every expected frame is built independently with etherparse (addresses, ports,
//! TTL, MACs and every checksum), never with pfwd's own checksum code.
//!
//! The program's FIB lookup needs a router: each test builds one in a network namespace of its own (`Lab`), created
//! by a thread of the test (`unshare(CLONE_NEWNET)`) that stays in it and makes every call that depends on the
//! namespace: the `ip` commands that set it up, the devmap inserts (the kernel resolves their ifindex in the caller's
//! namespace) and the test runs (whose `ingress_ifindex` names the router's receiving veth there). The namespace and
//! its veths disappear with that thread; no host interface is touched. The tc programs run in the test's own
//! namespace, where a test run sees lo, as in the other packet tests.
//!
//! ```text
//!   client 10.0.1.2 -- [vin 10.0.1.1]  router  [vout 10.0.2.1] -- backends 10.0.2.2, 10.0.2.3
//!                                            |                 -- gateway 10.0.2.254 -> 198.51.100.0/24,
//!                                            |                                          203.0.113.0/24 (mtu lock 576)
//!                                            [vx 10.0.3.1] -- 10.0.3.2 (vx is not in the devmap)
//! ```
//! Needs root (BPF, namespaces); each test has its own pins and namespace, so tests run in parallel.
mod common;

use common::*;
use std::{
    collections::BTreeMap,
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use aya::{
    maps::{Array, DevMapHash, Map, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpNumber, Ipv4Header, NetHeaders, PacketBuilder,
    PacketHeaders, TransportHeader,
};
use pfwd::state::StoredRule;
use pfwd_common::{
    CtEntry, IFACE_MAC_SLOTS, IfaceMacSlot, PROTO_TCP, PROTO_UDP, RuleCounters, Tuple, ct_flag, ct_state, names,
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// The router's address on vout (SNAT's address).
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const BACKEND2: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The next hop to the outside networks.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 254);
/// On vout's subnet, without a neighbour entry.
const UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 77);
/// An outside server, behind the gateway.
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// Behind the gateway on a route with a locked MTU of 576.
const FAR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const FAR_MTU: usize = 576;
/// No route.
const UNROUTED: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 9);
/// Behind vx, which is not in the devmap.
const HIDDEN: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 2);
const CPORT: u16 = 40_000;

const VIN_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
const VOUT_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];
const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 2, 2];
const BACKEND2_MAC: [u8; 6] = [2, 0, 0, 0, 2, 3];
const GATEWAY_MAC: [u8; 6] = [2, 0, 0, 0, 2, 0xfe];
const VX_MAC: [u8; 6] = [2, 0, 0, 0, 3, 1];
const HIDDEN_MAC: [u8; 6] = [2, 0, 0, 0, 3, 2];
/// Another host on vin's link.
const NEIGHBOUR_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0x99];

/// The link-layer addresses a frame from `src` arrives with: from the host (or gateway) it comes from, to the
/// router's interface on that side.
fn arrival_macs(src: Ipv4Addr) -> ([u8; 6], [u8; 6]) {
    match src {
        CLIENT => (CLIENT_MAC, VIN_MAC),
        BACKEND => (BACKEND_MAC, VOUT_MAC),
        BACKEND2 => (BACKEND2_MAC, VOUT_MAC),
        _ => (GATEWAY_MAC, VOUT_MAC),
    }
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

// ---------------------------------------------------------------------------------------------------------------
// The lab: a router in a network namespace of its own
// ---------------------------------------------------------------------------------------------------------------

type Job = Box<dyn FnOnce() + Send>;

/// A network namespace with the router's veths, held by a thread that stays in it and runs the calls that must
/// happen there ([`Lab::run`]). Dropping it ends the thread, which ends the namespace and its veths.
struct Lab {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
    vin: u32,
    vout: u32,
    vx: u32,
}

/// The namespace identity of a `/proc/.../ns/net` file.
fn netns_inode(path: &str) -> u64 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}")).ino()
}

/// The router's configuration, for `ip -batch`.
fn lab_commands() -> String {
    let mut c = vec!["link set lo up".to_string()];
    for (dev, peer, m) in [("vin", "cin", VIN_MAC), ("vout", "sout", VOUT_MAC), ("vx", "xpeer", VX_MAC)] {
        c.push(format!("link add {dev} type veth peer name {peer}"));
        c.push(format!("link set {dev} address {}", mac(m)));
        c.push(format!("link set {dev} up"));
        c.push(format!("link set {peer} up"));
    }
    c.push("addr add 10.0.1.1/24 dev vin".into());
    c.push("addr add 10.0.2.1/24 dev vout".into());
    c.push("addr add 10.0.3.1/24 dev vx".into());
    for (addr, m, dev) in [
        (CLIENT, CLIENT_MAC, "vin"),
        (BACKEND, BACKEND_MAC, "vout"),
        (BACKEND2, BACKEND2_MAC, "vout"),
        (GATEWAY, GATEWAY_MAC, "vout"),
        (HIDDEN, HIDDEN_MAC, "vx"),
    ] {
        c.push(format!("neigh add {addr} lladdr {} dev {dev} nud permanent", mac(m)));
    }
    c.push(format!("route add 198.51.100.0/24 via {GATEWAY} dev vout"));
    c.push(format!("route add 203.0.113.0/24 via {GATEWAY} dev vout mtu lock {FAR_MTU}"));
    c.join("\n") + "\n"
}

/// In the lab thread, after the unshare: configures the router, returns the ifindexes of vin, vout and vx.
fn lab_setup(host_ns: u64) -> Result<(u32, u32, u32), String> {
    if netns_inode("/proc/thread-self/ns/net") == host_ns {
        return Err("still in the test's network namespace after unshare: refusing to configure anything".into());
    }
    let mut ip = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running ip: {e}"))?;
    ip.stdin.take().unwrap().write_all(lab_commands().as_bytes()).map_err(|e| e.to_string())?;
    let status = ip.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("ip -batch failed: {status}"));
    }
    // /proc/sys/net is the caller's namespace's.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| format!("ip_forward: {e}"))?;
    let index = |name: &str| nix::net::if_::if_nametoindex(name).map_err(|e| format!("{name}: {e}"));
    Ok((index("vin")?, index("vout")?, index("vx")?))
}

impl Lab {
    fn new() -> Lab {
        let host_ns = netns_inode("/proc/thread-self/ns/net");
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel();
        let thread = thread::spawn(move || {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                let _ = ready_tx.send(Err(format!("unshare(CLONE_NEWNET): {e}")));
                return;
            }
            let setup = lab_setup(host_ns);
            let ok = setup.is_ok();
            let _ = ready_tx.send(setup);
            if ok {
                for job in rx {
                    job();
                }
            }
        });
        let (vin, vout, vx) = match ready.recv() {
            Ok(Ok(ix)) => ix,
            Ok(Err(e)) => panic!("setting up the router namespace: {e}"),
            Err(_) => panic!("the router namespace's thread died during setup"),
        };
        Lab { jobs: Some(jobs), thread: Some(thread), vin, vout, vx }
    }

    /// Runs `f` in the lab's namespace (on its thread); a panic in `f` comes back as this call's.
    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        });
        self.jobs.as_ref().unwrap().send(job).expect("the router namespace's thread is gone");
        match rx.recv().expect("the router namespace's thread is gone") {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Sets a sysctl of the lab's namespace (a path under /proc/sys).
    fn sysctl(&self, path: &'static str, value: &'static str) {
        self.run(move || std::fs::write(path, value).unwrap_or_else(|e| panic!("{path}: {e}")));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The fixture: an instance with its tc programs (tests/common) and the router
// ---------------------------------------------------------------------------------------------------------------

struct Router {
    f: Fixture,
    lab: Lab,
}

impl Router {
    /// An instance with `rules`, attached with `--xdp` to vin and vout as `pfwd attach` records it: both
    /// interfaces registered with their addresses, both in the devmap.
    fn new(rules: &[StoredRule]) -> Router {
        let f = Fixture::new(rules);
        let lab = Lab::new();
        let r = Router { f, lab };
        r.f.kernel().set_iface(r.lab.vin, Some(ROUTER), None, Some(VIN_MAC)).expect("set_iface vin");
        r.f.kernel().set_iface(r.lab.vout, Some(GW), None, Some(VOUT_MAC)).expect("set_iface vout");
        r.devmap(r.lab.vin, true);
        r.devmap(r.lab.vout, true);
        r
    }

    /// Adds `ifindex` to the XDP devmap (as `attach_xdp` does) or removes it: in the lab, where the kernel
    /// resolves the ifindex.
    fn devmap(&self, ifindex: u32, present: bool) {
        let path = self.f.kernel().pin_dir().join(names::XDP_TX);
        self.lab.run(move || {
            let data = MapData::from_pin(&path).expect("pinned devmap");
            let mut tx: DevMapHash<MapData> = Map::from_map_data(data).unwrap().try_into().expect("a devmap hash");
            if present {
                tx.insert(ifindex, ifindex, None, 0).expect("devmap insert");
            } else {
                tx.remove(ifindex).expect("devmap remove");
            }
        })
    }

    /// The XDP program on `frame` arriving on vin.
    fn xdp(&self, frame: &[u8]) -> Run {
        self.xdp_on(frame, self.lab.vin)
    }

    /// The XDP program on `frame` arriving on `ifindex` (a lab interface), by BPF_PROG_TEST_RUN from the lab.
    fn xdp_on(&self, frame: &[u8], ifindex: u32) -> Run {
        let path: PathBuf = self.f.kernel().pin_dir().join("prog_xdp");
        let frame = frame.to_vec();
        self.lab.run(move || {
            let prog = Xdp::from_pin(&path, XdpAttachType::Interface).expect("pinned XDP program");
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
            let md: Vec<u8> = [0, frame.len() as u32, 0, ifindex, 0, 0].iter().flat_map(|w| w.to_ne_bytes()).collect();
            let mut out = vec![0u8; frame.len() + 256];
            // No TestRunAttrs: without BPF_F_TEST_XDP_LIVE_FRAMES the redirect is only a return value.
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(&frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&md),
                    ..Default::default()
                })
                .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN (XDP) of {} bytes {frame:02x?}: {e}", frame.len()));
            out.truncate(r.data_size_out as usize);
            Run { ret: r.return_value, data: out }
        })
    }

    /// The tc ingress program on `pkt`, which must let it continue.
    #[track_caller]
    fn tc_in(&self, pkt: &Pkt) -> Vec<u8> {
        let r = self.f.ingress(&pkt.bytes());
        assert_eq!(r.ret, NEXT, "tc ingress of {pkt:?}");
        r.data
    }

    #[track_caller]
    fn tc_out(&self, pkt: &Pkt) -> Vec<u8> {
        let r = self.f.egress(&pkt.bytes());
        assert_eq!(r.ret, NEXT, "tc egress of {pkt:?}");
        r.data
    }

    /// Changes the rules (as `pfwd add`/`del` do), with interface names of the test namespace (lo) and the lab.
    fn sync(&self, rules: &[StoredRule]) {
        let held = std::mem::replace(&mut *self.f.held.lock().unwrap(), rules.to_vec());
        let (vin, vout, vx) = (self.lab.vin, self.lab.vout, self.lab.vx);
        let index = move |name: &str| match name {
            "lo" => Some(LO),
            "vin" => Some(vin),
            "vout" => Some(vout),
            "vx" => Some(vx),
            _ => None,
        };
        self.f.kernel().sync_rules(Some(&held), rules, &index).expect("sync_rules");
    }

    fn snapshot(&self) -> Snapshot {
        let slots: Vec<u32> = self.f.held.lock().unwrap().iter().map(|r| r.slot).collect();
        let counters = self.f.kernel().rule_counters(&slots).expect("rule_counters");
        let mut backends = Vec::new();
        for &slot in &slots {
            let mut b = self.f.kernel().backend_counters(slot).expect("backend_counters");
            b.sort_by_key(|(a, p, _)| (*a, *p));
            backends.push(b);
        }
        Snapshot {
            stats: self.f.kernel().stats().expect("stats").into_iter().collect(),
            counters: slots.into_iter().zip(counters).collect(),
            backends,
            confirmed: table(&self.f, names::CONNTRACK),
            unconfirmed: table(&self.f, names::CONNTRACK_NEW),
        }
    }
}

/// What the data path records: stats, rule and backend counters, both conntrack tables (entries with their times).
#[derive(Debug, PartialEq)]
struct Snapshot {
    stats: BTreeMap<&'static str, u64>,
    counters: BTreeMap<u32, RuleCounters>,
    backends: Vec<Vec<([u32; 4], u16, RuleCounters)>>,
    confirmed: Vec<(Tuple, CtEntry)>,
    unconfirmed: Vec<(Tuple, CtEntry)>,
}

impl Snapshot {
    /// The stats that changed since `before`, with their increase.
    fn stats_since(&self, before: &Snapshot) -> Vec<(&'static str, u64)> {
        self.stats.iter().filter(|(n, v)| before.stats[*n] != **v).map(|(n, v)| (*n, v - before.stats[n])).collect()
    }

    /// How the counters of `slot` moved since `before`: (packets, bytes, flows, drops).
    fn counted_since(&self, before: &Snapshot, slot: u32) -> (u64, u64, u64, u64) {
        let (a, b) = (self.counters[&slot], before.counters[&slot]);
        (a.packets - b.packets, a.bytes - b.bytes, a.flows - b.flows, a.drops - b.drops)
    }
}

fn ct_map(f: &Fixture, name: &str) -> aya::maps::HashMap<MapData, Tuple, CtEntry> {
    let data = MapData::from_pin(f.kernel().pin_dir().join(name)).expect("pinned conntrack map");
    aya::maps::HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap()
}

/// One conntrack table's entries, sorted by key.
fn table(f: &Fixture, name: &str) -> Vec<(Tuple, CtEntry)> {
    let mut t: Vec<_> = ct_map(f, name).iter().map(|r| r.expect("reading a conntrack entry")).collect();
    t.sort_by_key(|(k, _)| (k.saddr, k.sport, k.daddr, k.dport, k.proto));
    t
}

fn keys(t: &[(Tuple, CtEntry)]) -> Vec<Tuple> {
    t.iter().map(|(k, _)| *k).collect()
}

fn sorted(mut k: Vec<Tuple>) -> Vec<Tuple> {
    k.sort_by_key(|t| (t.saddr, t.sport, t.daddr, t.dport, t.proto));
    k
}

// ---------------------------------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------------------------------

/// An Ethernet + IPv4 frame description; `bytes()` serializes it with every checksum computed by etherparse.
#[derive(Clone, Debug)]
struct Pkt {
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    l4: L4,
    payload: Vec<u8>,
    ttl: u8,
    ident: u16,
    options: Vec<u8>,
    df: bool,
    mf: bool,
    frag_offset: u16,
}

impl Pkt {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        let (smac, dmac) = arrival_macs(src);
        Pkt {
            smac,
            dmac,
            src,
            dst,
            l4,
            payload: b"pfwd xdp test payload".to_vec(),
            ttl: 61,
            ident: 0x4d2c,
            options: vec![],
            df: true,
            mf: false,
            frag_offset: 0,
        }
    }

    fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Self {
        let ack = if flags & ACK != 0 { 0x0bad_cafe } else { 0 };
        Pkt::new(src, dst, L4::Tcp { sport, dport, seq: 0x1234_5678, ack, flags })
    }

    fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Pkt::new(src, dst, L4::Udp { sport, dport, csum: true })
    }

    fn echo(src: Ipv4Addr, dst: Ipv4Addr, reply: bool) -> Self {
        Pkt::new(src, dst, L4::Echo { id: 0x77, seq: 3, reply })
    }

    fn set_ports(&mut self, s: u16, d: u16) {
        match &mut self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (*sport, *dport) = (s, d),
            L4::Echo { .. } => panic!("ICMP has no ports"),
        }
    }

    fn ports(&self) -> (u16, u16) {
        match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (sport, dport),
            L4::Echo { id, .. } => (id, id),
        }
    }

    /// The same packet to `dst:dport`.
    fn to(&self, dst: Ipv4Addr, dport: u16) -> Self {
        let mut p = self.clone();
        p.dst = dst;
        p.set_ports(self.ports().0, dport);
        p
    }

    /// An echo to `dst` (address-only DNAT).
    fn to_echo(&self, dst: Ipv4Addr) -> Self {
        let mut p = self.clone();
        p.dst = dst;
        p
    }

    /// The same packet from `src:sport`.
    fn from(&self, src: Ipv4Addr, sport: u16) -> Self {
        let mut p = self.clone();
        p.src = src;
        p.set_ports(sport, self.ports().1);
        p
    }

    /// The same packet forwarded one hop: TTL decremented, sent from `smac` to `dmac`.
    fn hop(&self, smac: [u8; 6], dmac: [u8; 6]) -> Self {
        let mut p = self.clone();
        p.ttl -= 1;
        (p.smac, p.dmac) = (smac, dmac);
        p
    }

    fn flags(mut self, f: u8) -> Self {
        if let L4::Tcp { flags, ack, .. } = &mut self.l4 {
            *flags = f;
            *ack = if f & ACK != 0 { 0x0bad_cafe } else { 0 };
        }
        self
    }

    fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    fn without_udp_checksum(mut self) -> Self {
        if let L4::Udp { csum, .. } = &mut self.l4 {
            *csum = false;
        }
        self
    }

    fn ip4(&self) -> Ip4<'_> {
        let (src, dst, ttl, ident, options) = (self.src, self.dst, self.ttl, self.ident, &self.options[..]);
        Ip4 { src, dst, ttl, ident, df: self.df, mf: self.mf, frag_offset: self.frag_offset, options }
    }

    /// The IP packet (no Ethernet header).
    fn ip_bytes(&self) -> Vec<u8> {
        self.ip4().packet(&self.l4, &self.payload)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Ethernet2Header { source: self.smac, destination: self.dmac, ether_type: EtherType::IPV4 }
            .to_bytes()
            .to_vec();
        out.extend_from_slice(&self.ip_bytes());
        out
    }

    /// Offset of the L4 checksum in the frame.
    fn l4_csum_off(&self) -> usize {
        14 + 20 + self.options.len() + if matches!(self.l4, L4::Tcp { .. }) { 16 } else { 6 }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------------------------

fn describe(frame: &[u8]) -> String {
    match PacketHeaders::from_ethernet_slice(frame) {
        Ok(h) => format!("{:?}\n{:?}\n{:?}\npayload {:02x?}", h.link, h.net, h.transport, h.payload.slice()),
        Err(e) => format!("unparsable ({e}): {frame:02x?}"),
    }
}

/// Recomputes the IP and L4 checksums of `frame` with etherparse and compares them with the packet's.
#[track_caller]
fn assert_checksums_valid(frame: &[u8]) {
    let h = PacketHeaders::from_ethernet_slice(frame).unwrap_or_else(|e| panic!("unparsable output: {e}"));
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else { panic!("no IPv4 header in {}", describe(frame)) };
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 header checksum of {}", describe(frame));
    let payload = h.payload.slice();
    match &h.transport {
        Some(TransportHeader::Tcp(t)) => {
            assert_eq!(t.checksum, t.calc_checksum_ipv4(ip, payload).unwrap(), "TCP checksum of {}", describe(frame))
        }
        // 0 means "no checksum"; etherparse gives a computed 0 as 0xffff, as RFC 768 requires.
        Some(TransportHeader::Udp(u)) if u.checksum != 0 => {
            assert_eq!(u.checksum, u.calc_checksum_ipv4(ip, payload).unwrap(), "UDP checksum of {}", describe(frame))
        }
        Some(TransportHeader::Udp(_)) => {}
        other => panic!("unexpected transport {other:?}"),
    }
}

/// The fast path sent the frame on (XDP_REDIRECT) as exactly `want`: built independently, so this checks every
/// rewritten field (addresses, ports, TTL, MACs), every field that must not change, and both checksums.
#[track_caller]
fn assert_forwarded(r: &Run, want: &Pkt) {
    assert_eq!(r.ret, XDP_REDIRECT, "return value (XDP_REDIRECT); output {}", describe(&r.data));
    assert_checksums_valid(&r.data);
    let want = want.bytes();
    assert!(r.data == want, "wrong frame\n got: {}\nwant: {}", describe(&r.data), describe(&want));
}

/// The fast path passes `frame` (arriving on `ifindex`) untouched and records nothing at all.
#[track_caller]
fn expect_pass_on(x: &Router, frame: &[u8], ifindex: u32, what: &str) {
    let before = x.snapshot();
    let r = x.xdp_on(frame, ifindex);
    assert_eq!(r.ret, XDP_PASS, "{what}: return value (XDP_PASS); output {}", describe(&r.data));
    assert!(r.data == frame, "{what}: frame was modified\n got: {}\nwant: {}", describe(&r.data), describe(frame));
    let after = x.snapshot();
    assert!(
        after == before,
        "{what}: a passed frame changed the data path's state\nbefore {before:#?}\nafter {after:#?}"
    );
}

#[track_caller]
fn expect_pass(x: &Router, frame: &[u8], what: &str) {
    expect_pass_on(x, frame, x.lab.vin, what)
}

/// Sends `pkt` through the fast path (arriving on `ifindex`) and expects `want`, counted once in `xdp_forwarded`
/// (plus `extra_stats`), once (with its IP length) in each rule of `slots` and nowhere else.
#[track_caller]
fn expect_forward_on(
    x: &Router,
    pkt: &Pkt,
    ifindex: u32,
    want: &Pkt,
    slots: &[u32],
    extra_stats: &[(&'static str, u64)],
) -> Snapshot {
    let before = x.snapshot();
    let frame = pkt.bytes();
    assert_forwarded(&x.xdp_on(&frame, ifindex), want);
    let after = x.snapshot();
    let mut stats = vec![("xdp_forwarded", 1)];
    stats.extend_from_slice(extra_stats);
    stats.sort();
    assert_eq!(after.stats_since(&before), stats, "stats moved");
    let len = frame.len() as u64 - 14;
    for &slot in before.counters.keys() {
        let want = if slots.contains(&slot) { (1, len, 0, 0) } else { (0, 0, 0, 0) };
        assert_eq!(after.counted_since(&before, slot), want, "counters of slot {slot}: (packets, bytes, flows, drops)");
    }
    after
}

#[track_caller]
fn expect_forward(x: &Router, pkt: &Pkt, want: &Pkt, slots: &[u32]) -> Snapshot {
    expect_forward_on(x, pkt, x.lab.vin, want, slots, &[])
}

/// The one's-complement sum of `data` (16-bit big-endian words, end-around carry), not complemented.
fn ones_sum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The L4 checksum the IPv4 frame `frame` computes to (pseudo-header included, the field taken as 0), before any
/// "0 is sent as 0xffff" rule: by hand, not with etherparse.
fn computed_l4_checksum(frame: &[u8], csum_off: usize) -> u16 {
    let ip = &frame[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let mut seg = ip[ihl..tot].to_vec();
    let c = csum_off - 14 - ihl;
    seg[c..c + 2].copy_from_slice(&[0, 0]);
    let mut pseudo = ip[12..20].to_vec();
    pseudo.extend_from_slice(&[0, ip[9]]);
    pseudo.extend_from_slice(&((tot - ihl) as u16).to_be_bytes());
    pseudo.extend_from_slice(&seg);
    !ones_sum(&pseudo)
}

/// `pkt` with the first two payload bytes chosen so that the L4 checksum of `of(pkt)` computes to 0.
fn with_zero_checksum(pkt: &Pkt, of: impl Fn(&Pkt) -> Pkt) -> Pkt {
    for w in 0..=u16::MAX {
        let mut p = pkt.clone();
        p.payload[..2].copy_from_slice(&w.to_be_bytes());
        let o = of(&p);
        if computed_l4_checksum(&o.bytes(), o.l4_csum_off()) == 0 {
            return p;
        }
    }
    panic!("no payload word makes the checksum 0");
}

// ---------------------------------------------------------------------------------------------------------------
// Flows made by the tc programs
// ---------------------------------------------------------------------------------------------------------------

const DNAT_TCP: &str = "dnat -p tcp --dport 8080 --to 10.0.2.2:80";
const DNAT_UDP: &str = "dnat -p udp --dport 53 --to 10.0.2.2:5353";

/// The client's packet to the DNAT rule's address and port.
fn to_dnat(flags: u8) -> Pkt {
    Pkt::tcp(CLIENT, CPORT, ROUTER, 8080, flags)
}

/// The backend's packet to the client.
fn from_backend(flags: u8) -> Pkt {
    Pkt::tcp(BACKEND, 80, CLIENT, CPORT, flags)
}

/// SYN and SYN-ACK of the DNAT_TCP flow through the tc programs, leaving it unconfirmed (the client's ACK is due).
fn dnat_syn_and_syn_ack(x: &Router) {
    assert_eq!(x.tc_in(&to_dnat(SYN)), to_dnat(SYN).to(BACKEND, 80).bytes());
    assert_eq!(x.tc_out(&from_backend(SYN | ACK)), from_backend(SYN | ACK).from(ROUTER, 8080).bytes());
}

/// The DNAT_TCP flow's handshake through the tc programs: a confirmed flow.
fn dnat_handshake(x: &Router) {
    dnat_syn_and_syn_ack(x);
    let before = x.snapshot();
    assert_eq!(x.tc_in(&to_dnat(ACK)), to_dnat(ACK).to(BACKEND, 80).bytes());
    let s = x.snapshot();
    let flow =
        sorted(vec![tuple(CLIENT, CPORT, ROUTER, 8080, PROTO_TCP), tuple(BACKEND, 80, CLIENT, CPORT, PROTO_TCP)]);
    assert!(flow.iter().all(|k| keys(&s.confirmed).contains(k)), "the flow is confirmed: {s:#?}");
    assert_eq!(s.stats_since(&before), vec![("flows_confirmed", 1)]);
}

// ---------------------------------------------------------------------------------------------------------------
// 1. DNAT
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn dnat_established_flow_is_translated_routed_and_redirected() {
    let x = Router::new(&[rule(1, DNAT_TCP)]);
    dnat_handshake(&x);
    let data = to_dnat(ACK | PSH).payload(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let after = expect_forward(&x, &data, &data.to(BACKEND, 80).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
    // Still the one confirmed flow, translated as before.
    assert_eq!(
        keys(&after.confirmed),
        sorted(vec![tuple(CLIENT, CPORT, ROUTER, 8080, PROTO_TCP), tuple(BACKEND, 80, CLIENT, CPORT, PROTO_TCP)])
    );
    assert!(after.unconfirmed.is_empty());
    // An empty ACK, and the next packet the same way.
    let ack = to_dnat(ACK).payload(b"");
    expect_forward(&x, &ack, &ack.to(BACKEND, 80).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
    assert_eq!(x.f.stat("xdp_forwarded"), 2);
    assert_eq!(x.f.counters(slot_of(1)).flows, 1);
}

#[test]
fn dnat_reply_is_translated_back_and_sent_to_the_client() {
    let x = Router::new(&[rule(1, DNAT_TCP)]);
    dnat_handshake(&x);
    let resp = from_backend(ACK | PSH).payload(b"HTTP/1.1 200 OK\r\n\r\n");
    let want = resp.from(ROUTER, 8080).hop(VIN_MAC, CLIENT_MAC);
    expect_forward_on(&x, &resp, x.lab.vout, &want, &[slot_of(1)], &[]);
}

#[test]
fn unconfirmed_tcp_flow_is_confirmed_by_the_clients_ack_on_the_fast_path() {
    let x = Router::new(&[rule(1, DNAT_TCP)]);
    dnat_syn_and_syn_ack(&x);
    let before = x.snapshot();
    assert_eq!((before.confirmed.len(), before.unconfirmed.len()), (0, 2));
    // The client's ACK: translated as tc would, and it confirms the flow as tc would (both entries move).
    let ack = to_dnat(ACK).payload(b"");
    let want = ack.to(BACKEND, 80).hop(VOUT_MAC, BACKEND_MAC);
    let after = expect_forward_on(&x, &ack, x.lab.vin, &want, &[slot_of(1)], &[("flows_confirmed", 1)]);
    assert_eq!(keys(&after.confirmed), keys(&before.unconfirmed), "both entries moved to the confirmed table");
    assert!(after.unconfirmed.is_empty());
    assert!(after.confirmed.iter().all(|(_, e)| e.state == ct_state::SEEN_REPLY | ct_state::CONFIRMED));
}

#[test]
fn unconfirmed_udp_flow_takes_the_fast_path_and_its_reply_confirms_it() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let query = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    assert_eq!(x.tc_in(&query), query.to(BACKEND, 5353).bytes());
    let first = x.snapshot();
    assert_eq!((first.confirmed.len(), first.unconfirmed.len()), (0, 2));
    thread::sleep(Duration::from_millis(50));
    // The second query: forwarded, both entries still unconfirmed. Within a second of the last refresh nothing is
    // written to them (as in tc), but for the flow's settling.
    let after = expect_forward(&x, &query, &query.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
    assert_eq!(keys(&after.unconfirmed), keys(&first.unconfirmed));
    assert!(after.confirmed.is_empty());
    for ((k, old), (_, new)) in first.unconfirmed.iter().zip(&after.unconfirmed) {
        // The first query went through tc ingress only: the fast path settles the flow, as tc's egress would have.
        let settled = CtEntry { flags: old.flags | ct_flag::SETTLED, ..*old };
        assert_eq!(*new, settled, "entry {k:?}: only settled, its time not rewritten within the refresh interval");
    }
    // A second later the next query refreshes both entries' time, and only that (and, as the refresh found both
    // entries, the insert count they were checked at).
    thread::sleep(Duration::from_millis(1050));
    let later = expect_forward(&x, &query, &query.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
    for ((k, old), (_, new)) in after.unconfirmed.iter().zip(&later.unconfirmed) {
        assert!(new.last_seen_ns > old.last_seen_ns, "entry {k:?} not refreshed: {old:?} -> {new:?}");
        assert_eq!(new.checked_inserts, 2, "entry {k:?}: checked after the flow's own two inserts");
        let timeless = |e: &CtEntry| CtEntry { last_seen_ns: 0, checked_inserts: 0, ..*e };
        assert_eq!(timeless(new), timeless(old), "only the time moves");
    }
    // The answer, arriving on vout: translated back, to the client; it confirms the flow.
    let answer = Pkt::udp(BACKEND, 5353, CLIENT, 5555);
    let want = answer.from(ROUTER, 53).hop(VIN_MAC, CLIENT_MAC);
    let after = expect_forward_on(&x, &answer, x.lab.vout, &want, &[slot_of(1)], &[("flows_confirmed", 1)]);
    assert_eq!(keys(&after.confirmed), keys(&first.unconfirmed));
    assert!(after.unconfirmed.is_empty());
    // Both ways go on in the confirmed table.
    expect_forward(&x, &query, &query.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
    expect_forward_on(&x, &answer, x.lab.vout, &want, &[slot_of(1)], &[]);
}

#[test]
fn dnat_to_several_backends_counts_the_backend() {
    let x = Router::new(&[rule(1, "dnat -p tcp --dport 8080 --to 10.0.2.2:80,10.0.2.3:80")]);
    let syn = to_dnat(SYN);
    let out = x.tc_in(&syn);
    let backend = Ipv4Addr::from(<[u8; 4]>::try_from(&out[14 + 16..14 + 20]).unwrap());
    let backend_mac = if backend == BACKEND { BACKEND_MAC } else { BACKEND2_MAC };
    assert_eq!(out, syn.to(backend, 80).bytes(), "the SYN goes to one of the backends");
    let syn_ack = Pkt::tcp(backend, 80, CLIENT, CPORT, SYN | ACK);
    assert_eq!(x.tc_out(&syn_ack), syn_ack.from(ROUTER, 8080).bytes());
    let ack = to_dnat(ACK);
    assert_eq!(x.tc_in(&ack), ack.to(backend, 80).bytes());
    let backend_count = |s: &Snapshot| {
        s.backends[0].iter().find(|(a, p, _)| a[0] == ne(backend) && *p == 80).map_or(0, |(_, _, c)| c.packets)
    };
    let before = x.snapshot();
    let data = to_dnat(ACK | PSH);
    let after = expect_forward(&x, &data, &data.to(backend, 80).hop(VOUT_MAC, backend_mac), &[slot_of(1)]);
    assert_eq!(backend_count(&after) - backend_count(&before), 1, "the backend's counter: {:?}", after.backends);
    let reply = Pkt::tcp(backend, 80, CLIENT, CPORT, ACK | PSH);
    let want = reply.from(ROUTER, 8080).hop(VIN_MAC, CLIENT_MAC);
    let after2 = expect_forward_on(&x, &reply, x.lab.vout, &want, &[slot_of(1)], &[]);
    assert_eq!(backend_count(&after2) - backend_count(&after), 1, "replies count to their backend too");
    let total = |s: &Snapshot| s.backends[0].iter().map(|(_, _, c)| c.packets).sum::<u64>();
    assert_eq!(total(&after2) - total(&before), 2, "no other backend counted");
}

// ---------------------------------------------------------------------------------------------------------------
// 2. SNAT, MASQUERADE, full NAT
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn snat_original_and_reply_through_a_gateway() {
    let x = Router::new(&[rule(1, "snat -o lo --to 10.0.2.1")]);
    let syn = Pkt::tcp(CLIENT, CPORT, SERVER, 443, SYN);
    assert_eq!(x.tc_out(&syn), syn.from(GW, CPORT).bytes());
    let syn_ack = Pkt::tcp(SERVER, 443, GW, CPORT, SYN | ACK);
    assert_eq!(x.tc_in(&syn_ack), syn_ack.to(CLIENT, CPORT).bytes());
    let ack = syn.clone().flags(ACK);
    assert_eq!(x.tc_out(&ack), ack.from(GW, CPORT).bytes());
    assert_eq!(x.f.stat("flows_confirmed"), 1);

    // The client's data: its flow is translated at egress; the next hop is the gateway.
    let data = syn.clone().flags(ACK | PSH).payload(b"client hello");
    expect_forward(&x, &data, &data.from(GW, CPORT).hop(VOUT_MAC, GATEWAY_MAC), &[slot_of(1)]);
    // The server's answer, arriving on vout for the SNAT address: back to the client.
    let resp = syn_ack.clone().flags(ACK | PSH).payload(b"server hello");
    let want = resp.to(CLIENT, CPORT).hop(VIN_MAC, CLIENT_MAC);
    expect_forward_on(&x, &resp, x.lab.vout, &want, &[slot_of(1)], &[]);
}

#[test]
fn masquerade_udp_original_and_reply_with_and_without_checksum() {
    let x = Router::new(&[rule(1, "masquerade -o lo -p udp")]);
    for (sport, csum) in [(5353, true), (6000, false)] {
        let q = Pkt::udp(CLIENT, sport, SERVER, 53);
        let q = if csum { q } else { q.without_udp_checksum() };
        // The address MASQUERADE chose (in the test process's namespace, where the tc programs run): from tc's output.
        let out = x.tc_out(&q);
        let addr = Ipv4Addr::from(<[u8; 4]>::try_from(&out[14 + 12..14 + 16]).unwrap());
        let port = u16::from_be_bytes([out[34], out[35]]);
        assert_eq!(out, q.from(addr, port).bytes(), "tc's translation");

        let after = expect_forward(&x, &q, &q.from(addr, port).hop(VOUT_MAC, GATEWAY_MAC), &[slot_of(1)]);
        // This flow's two entries (the first one was confirmed by its answer).
        assert_eq!(after.unconfirmed.len(), 2);
        let a = Pkt::udp(SERVER, 53, addr, port);
        let a = if csum { a } else { a.without_udp_checksum() };
        let want = a.to(CLIENT, sport).hop(VIN_MAC, CLIENT_MAC);
        let r = x.xdp_on(&a.bytes(), x.lab.vout);
        assert_forwarded(&r, &want);
        if !csum {
            assert_eq!(&r.data[40..42], &[0, 0], "a UDP checksum of 0 stays 0");
        }
    }
    assert_eq!(x.f.stat("xdp_forwarded"), 4);
    assert_eq!(x.f.stat("flows_confirmed"), 2);
    let c = x.f.counters(slot_of(1));
    assert_eq!((c.packets, c.flows), (6, 2));
}

#[test]
fn full_nat_applies_dnat_and_snat_in_one_pass() {
    let x = Router::new(&[rule(1, DNAT_TCP), rule(2, "snat -o lo --to 10.0.2.1")]);
    // The handshake through both tc hooks, as the stack would carry it.
    let syn = to_dnat(SYN);
    let r = x.tc_in(&syn);
    assert_eq!(x.f.egress(&r).data, syn.to(BACKEND, 80).from(GW, CPORT).bytes());
    let syn_ack = Pkt::tcp(BACKEND, 80, GW, CPORT, SYN | ACK);
    let r = x.tc_in(&syn_ack);
    assert_eq!(x.f.egress(&r).data, syn_ack.to(CLIENT, CPORT).from(ROUTER, 8080).bytes());
    let ack = to_dnat(ACK);
    let r = x.tc_in(&ack);
    assert_eq!(x.f.egress(&r).data, ack.to(BACKEND, 80).from(GW, CPORT).bytes());
    assert_eq!(x.f.stat("flows_confirmed"), 2);

    let data = to_dnat(ACK | PSH).payload(b"request");
    let want = data.to(BACKEND, 80).from(GW, CPORT).hop(VOUT_MAC, BACKEND_MAC);
    expect_forward(&x, &data, &want, &[slot_of(1), slot_of(2)]);
    let resp = syn_ack.clone().flags(ACK | PSH).payload(b"response");
    let want = resp.to(CLIENT, CPORT).from(ROUTER, 8080).hop(VIN_MAC, CLIENT_MAC);
    expect_forward_on(&x, &resp, x.lab.vout, &want, &[slot_of(1), slot_of(2)], &[]);
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Checksums and header details
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn udp_without_checksum_keeps_it_zero_both_ways() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53).without_udp_checksum();
    x.tc_in(&q);
    let r = x.xdp(&q.bytes());
    assert_forwarded(&r, &q.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC));
    assert_eq!(&r.data[40..42], &[0, 0]);
    let a = Pkt::udp(BACKEND, 5353, CLIENT, 5555).without_udp_checksum();
    let r = x.xdp_on(&a.bytes(), x.lab.vout);
    assert_forwarded(&r, &a.from(ROUTER, 53).hop(VIN_MAC, CLIENT_MAC));
    assert_eq!(&r.data[40..42], &[0, 0]);
}

#[test]
fn udp_checksum_computing_to_zero_is_sent_as_ffff() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    let fwd = |p: &Pkt| p.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC);
    let q0 = with_zero_checksum(&q, fwd);
    let r = x.xdp(&q0.bytes());
    assert_forwarded(&r, &fwd(&q0));
    assert_eq!(&r.data[40..42], &[0xff, 0xff], "a computed 0 is sent as 0xffff");
}

#[test]
fn udp_checksum_sent_as_ffff_is_updated() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    // The client's checksum computed to 0 (sent as 0xffff); the translated one does not.
    let q0 = with_zero_checksum(&q, |p| p.clone());
    assert_eq!(&q0.bytes()[40..42], &[0xff, 0xff]);
    let r = x.xdp(&q0.bytes());
    assert_forwarded(&r, &q0.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC));
}

#[test]
fn tcp_checksum_computing_to_zero_is_sent_as_zero() {
    let x = Router::new(&[rule(1, DNAT_TCP)]);
    dnat_handshake(&x);
    let fwd = |p: &Pkt| p.to(BACKEND, 80).hop(VOUT_MAC, BACKEND_MAC);
    let data = with_zero_checksum(&to_dnat(ACK | PSH), fwd);
    let r = x.xdp(&data.bytes());
    assert_forwarded(&r, &fwd(&data));
    assert_eq!(&r.data[50..52], &[0, 0], "TCP has no 0xffff rule");
}

#[test]
fn ethernet_padding_is_kept() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    // A frame padded to Ethernet's minimum: the padding is not part of the IP packet, and stays.
    let short = q.clone().payload(b"");
    let mut padded = short.bytes();
    padded.resize(60, 0xee);
    let r = x.xdp(&padded);
    assert_eq!(r.ret, XDP_REDIRECT);
    let mut want = short.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC).bytes();
    want.resize(60, 0xee);
    assert!(r.data == want, "got {:02x?}\nwant {want:02x?}", r.data);
    // The rule counts IP lengths (tc's first packet, then this one), never the padding.
    let ip_len = |p: &Pkt| p.ip_bytes().len() as u64;
    assert_eq!(x.f.counters(slot_of(1)).bytes, ip_len(&q) + ip_len(&short));
}

#[test]
fn ttl_two_is_forwarded_ttl_one_and_zero_pass() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    let two = q.clone().ttl(2);
    expect_forward(&x, &two, &two.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
    for ttl in [1, 0] {
        expect_pass(&x, &q.clone().ttl(ttl).bytes(), &format!("TTL {ttl}"));
    }
    // And 255 is decremented like any other.
    let max = q.clone().ttl(255);
    expect_forward(&x, &max, &max.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
}

// ---------------------------------------------------------------------------------------------------------------
// 4. What the fast path leaves to the stack (and the tc programs)
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn packets_of_no_flow_pass() {
    let x = Router::new(&[rule(1, DNAT_UDP), rule(2, DNAT_TCP)]);
    // A packet the DNAT rule would open a flow for: tc's to make.
    expect_pass(&x, &Pkt::udp(CLIENT, 5555, ROUTER, 53).bytes(), "UDP to a DNAT rule, no flow yet");
    expect_pass(&x, &to_dnat(ACK).bytes(), "mid-stream TCP without a flow");
    expect_pass(&x, &Pkt::udp(CLIENT, 5555, SERVER, 53).bytes(), "forwarded UDP nobody translates");
    expect_pass(&x, &Pkt::udp(CLIENT, 5555, BACKEND, 5353).bytes(), "the translated tuple itself is no flow");
    // A flow exists, but not for these.
    x.tc_in(&Pkt::udp(CLIENT, 5555, ROUTER, 53));
    expect_pass(&x, &Pkt::udp(CLIENT, 5556, ROUTER, 53).bytes(), "another source port");
    expect_pass(&x, &Pkt::tcp(CLIENT, 5555, ROUTER, 53, ACK).bytes(), "another protocol");
    assert_eq!(x.f.stat("xdp_forwarded"), 0);
}

#[test]
fn syn_fin_and_rst_of_a_flow_pass() {
    let x = Router::new(&[rule(1, DNAT_TCP)]);
    dnat_handshake(&x);
    for flags in [SYN, SYN | ACK, FIN, FIN | ACK, RST, RST | ACK, SYN | FIN, FIN | PSH | ACK] {
        expect_pass(&x, &to_dnat(flags).bytes(), &format!("client flags {flags:#04x}"));
        expect_pass_on(&x, &from_backend(flags).bytes(), x.lab.vout, &format!("backend flags {flags:#04x}"));
    }
}

#[test]
fn half_closed_flow_takes_the_fast_path_closed_flow_passes() {
    let x = Router::new(&[rule(1, DNAT_TCP)]);
    dnat_handshake(&x);
    // The client closes (tc records the FIN): the backend's data still flows.
    x.tc_in(&to_dnat(FIN | ACK));
    let data = from_backend(ACK | PSH);
    expect_forward_on(&x, &data, x.lab.vout, &data.from(ROUTER, 8080).hop(VIN_MAC, CLIENT_MAC), &[slot_of(1)], &[]);
    // The backend closes too: the client's last ACK is the tc programs'.
    x.tc_out(&from_backend(FIN | ACK));
    expect_pass(&x, &to_dnat(ACK).payload(b"").bytes(), "ACK of a closed flow");
    expect_pass_on(&x, &from_backend(ACK).bytes(), x.lab.vout, "backend ACK of a closed flow");
}

#[test]
fn fragments_pass_dont_fragment_alone_is_forwarded() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    let frag = |df: bool, mf: bool, off: u16| {
        let mut p = q.clone();
        (p.df, p.mf, p.frag_offset) = (df, mf, off);
        p
    };
    expect_pass(&x, &frag(false, true, 0).bytes(), "first fragment (MF, offset 0)");
    expect_pass(&x, &frag(false, true, 185).bytes(), "middle fragment (MF, offset 185)");
    expect_pass(&x, &frag(false, false, 185).bytes(), "last fragment (offset 185)");
    expect_pass(&x, &frag(false, false, 1).bytes(), "offset 1");
    let df = frag(true, false, 0);
    expect_forward(&x, &df, &df.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
    let neither = frag(false, false, 0);
    expect_forward(&x, &neither, &neither.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
}

#[test]
fn icmp_of_a_flow_passes() {
    let x = Router::new(&[rule(1, "dnat -d 10.0.1.1 --to 10.0.2.2")]);
    let echo = Pkt::echo(CLIENT, ROUTER, false);
    assert_eq!(x.tc_in(&echo), echo.to_echo(BACKEND).bytes());
    expect_pass(&x, &echo.bytes(), "echo request of a flow");
    expect_pass_on(&x, &Pkt::echo(BACKEND, CLIENT, true).bytes(), x.lab.vout, "echo reply of a flow");
    // A UDP flow of the same rule takes the fast path; an ICMP error about it does not.
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    expect_forward(&x, &q, &q.to(BACKEND, 53).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
    let inner = q.to(BACKEND, 53).ip_bytes();
    let mut err =
        Ethernet2Header { source: BACKEND_MAC, destination: VOUT_MAC, ether_type: EtherType::IPV4 }.to_bytes().to_vec();
    let unreachable = Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port);
    let icmp = Icmpv4Header::with_checksum(unreachable, &inner[..28]);
    let mut ip = Ipv4Header::new(0, 64, IpNumber::ICMP, BACKEND.octets(), CLIENT.octets()).unwrap();
    ip.set_payload_len(icmp.header_len() + 28).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    ip.write(&mut err).unwrap();
    icmp.write(&mut err).unwrap();
    err.extend_from_slice(&inner[..28]);
    expect_pass_on(&x, &err, x.lab.vout, "ICMP error about a flow");
}

#[test]
fn ipv6_of_a_flow_passes() {
    let backend6: Ipv6Addr = "2001:db8:2::2".parse().unwrap();
    let client6: Ipv6Addr = "2001:db8:1::2".parse().unwrap();
    let x = Router::new(&[rule(1, "dnat -p udp --dport 53 --to [2001:db8:2::2]:5353")]);
    let v6 = |src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16| {
        let (smac, dmac) = if src == client6 { (CLIENT_MAC, VIN_MAC) } else { (BACKEND_MAC, VOUT_MAC) };
        let b = PacketBuilder::ethernet2(smac, dmac).ipv6(src.octets(), dst.octets(), 61).udp(sport, dport);
        let mut out = Vec::new();
        b.write(&mut out, b"v6 query").unwrap();
        out
    };
    let q = v6(client6, 5555, ROUTER6, 53);
    let r = x.f.ingress(&q);
    assert_eq!(r.data, v6(client6, 5555, backend6, 5353), "tc translates it");
    assert_eq!(x.f.conntrack6().len(), 2, "an IPv6 flow");
    expect_pass(&x, &q, "IPv6 packet of a flow");
    expect_pass_on(&x, &v6(backend6, 5353, client6, 5555), x.lab.vout, "IPv6 reply of a flow");
}

#[test]
fn vlan_tagged_frame_of_a_flow_passes() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    for tpid in [0x8100u16, 0x88a8] {
        let plain = q.bytes();
        let mut vlan = plain[..12].to_vec();
        vlan.extend_from_slice(&tpid.to_be_bytes());
        vlan.extend_from_slice(&[0, 5, 8, 0]);
        vlan.extend_from_slice(&plain[14..]);
        expect_pass(&x, &vlan, &format!("tag {tpid:#06x}"));
    }
    // Untagged, the same packet takes the fast path.
    expect_forward(&x, &q, &q.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
}

/// The stack forwards only frames addressed to the router: `ip_forward` drops broadcast and multicast ones
/// (`pkt_type != PACKET_HOST`), so the fast path must leave them to it.
#[test]
fn broadcast_and_multicast_frames_of_a_flow_pass() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    for (dmac, what) in [
        ([0xff; 6], "broadcast"),
        ([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01], "IPv4 multicast MAC"),
        ([0x33, 0x33, 0x00, 0x00, 0x00, 0x01], "IPv6 multicast MAC"),
        ([0x03, 0, 0, 0, 1, 1], "vin's MAC with the group bit"),
    ] {
        let mut frame = q.clone();
        frame.dmac = dmac;
        expect_pass(&x, &frame.bytes(), what);
    }
    expect_forward(&x, &q, &q.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
}

/// A unicast frame for another host on the link (seen in promiscuous mode: tcpdump, a bridge port) is dropped by
/// the stack (`ip_rcv`: PACKET_OTHERHOST) even when tc translated it: the fast path passes it (the ingress
/// interface's MAC is in `IfaceInfo`).
#[test]
fn frame_for_another_hosts_mac_passes() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    let mut other = q.clone();
    other.dmac = NEIGHBOUR_MAC;
    expect_pass(&x, &other.bytes(), "unicast frame to another host");
}

impl Router {
    /// The IFACE_MACS map (the fast path's shortcut to the interfaces' MACs).
    fn mac_slots(&self) -> Array<MapData, u64> {
        let data = MapData::from_pin(self.f.kernel().pin_dir().join(names::IFACE_MACS)).expect("pinned IFACE_MACS");
        Map::from_map_data(data).unwrap().try_into().expect("an array of u64")
    }

    fn mac_slot(&self, ifindex: u32) -> u64 {
        self.mac_slots().get(&IfaceMacSlot::index(ifindex), 0).expect("slot")
    }

    fn set_mac_slot(&self, ifindex: u32, word: u64) {
        self.mac_slots().set(IfaceMacSlot::index(ifindex), word, 0).expect("slot write");
    }
}

/// The ingress interface's MAC comes from its slot in IFACE_MACS when it owns one, and from IFACES otherwise: a
/// slot owned by another interface (of the same index) or a free one changes nothing, in either direction (frames
/// to vin are forwarded, frames to another host pass). And the loader keeps the slots in step with IFACES: it takes
/// a slot whose owner IFACES no longer has, and leaves one whose owner it still has.
#[test]
fn ingress_mac_from_its_slot_or_from_ifaces() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let vin = x.lab.vin;
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    let mut other = q.clone();
    other.dmac = NEIGHBOUR_MAC;
    let want = q.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC);
    // As attach left it: vin owns its slot.
    let own = x.mac_slot(vin);
    assert_eq!(Some(own), IfaceMacSlot::word(vin, VIN_MAC), "vin's slot after set_iface");
    // Another interface of the same index, whose MAC is the one `other` is sent to; then a free slot.
    let stranger = vin + IFACE_MAC_SLOTS;
    for (word, what) in [(IfaceMacSlot::word(stranger, NEIGHBOUR_MAC).unwrap(), "another interface's"), (0, "free")] {
        x.set_mac_slot(vin, word);
        expect_pass(&x, &other.bytes(), &format!("frame to another host, vin's slot {what}"));
        expect_forward(&x, &q, &want, &[slot_of(1)]);
    }
    // A slot of vin's own is what decides: with another MAC in it (never written so by the loader), a frame to that
    // MAC is taken for vin's and one to vin's real MAC is not.
    x.set_mac_slot(vin, IfaceMacSlot::word(vin, NEIGHBOUR_MAC).unwrap());
    expect_pass(&x, &q.bytes(), "frame to vin's MAC, vin's slot holding another");
    expect_forward(&x, &other, &want, &[slot_of(1)]);
    x.set_mac_slot(vin, own);
    expect_pass(&x, &other.bytes(), "frame to another host, vin's own slot");
    // Addresses one bit away from vin's, in the first four bytes and in the last two.
    for (byte, what) in [(1, "second byte"), (3, "fourth byte"), (4, "fifth byte"), (5, "last byte")] {
        let mut near = q.clone();
        near.dmac[byte] ^= 0x10;
        expect_pass(&x, &near.bytes(), &format!("frame to vin's MAC but for its {what}"));
    }
    expect_forward(&x, &q, &want, &[slot_of(1)]);

    // The loader: a slot held by an interface IFACES does not have goes back to vin when vin is registered again...
    x.set_mac_slot(vin, IfaceMacSlot::word(stranger, NEIGHBOUR_MAC).unwrap());
    x.f.kernel().set_iface(vin, Some(ROUTER), None, Some(VIN_MAC)).expect("set_iface vin");
    assert_eq!(x.mac_slot(vin), own, "vin's slot, taken back from an interface IFACES does not have");
    // ... and one held by a registered interface stays its own: the newcomer is found in IFACES.
    x.f.kernel().set_iface(stranger, None, None, Some(NEIGHBOUR_MAC)).expect("set_iface stranger");
    assert_eq!(x.mac_slot(vin), own, "vin's slot after another interface of its index was registered");
    // A new MAC of vin's reaches its slot.
    let new_mac = [0x02, 0, 0, 0, 0x77, 0x77];
    x.f.kernel().set_iface(vin, Some(ROUTER), None, Some(new_mac)).expect("set_iface vin, new MAC");
    assert_eq!(Some(x.mac_slot(vin)), IfaceMacSlot::word(vin, new_mac), "vin's slot after its MAC changed");
    expect_pass(&x, &q.bytes(), "frame to vin's old MAC");

    // Detach frees the slot, and the next interface of its index registered takes it. (Interfaces that exist
    // nowhere: the loader's bookkeeping needs none.)
    let ghost = (1..IFACE_MAC_SLOTS * 2)
        .map(|i| vin + i)
        .find(|g| ![vin, x.lab.vout].map(IfaceMacSlot::index).contains(&IfaceMacSlot::index(*g)))
        .unwrap();
    let (ghost_mac, ghost2_mac) = ([0x02, 0, 0, 0, 0x88, 1], [0x02, 0, 0, 0, 0x88, 2]);
    let ghost2 = ghost + IFACE_MAC_SLOTS;
    x.f.kernel().set_iface(ghost, None, None, Some(ghost_mac)).expect("set_iface ghost");
    assert_eq!(Some(x.mac_slot(ghost)), IfaceMacSlot::word(ghost, ghost_mac), "a free slot taken");
    x.f.kernel().set_iface(ghost2, None, None, Some(ghost2_mac)).expect("set_iface ghost2");
    assert_eq!(Some(x.mac_slot(ghost)), IfaceMacSlot::word(ghost, ghost_mac), "a registered owner's slot kept");
    x.f.kernel().detach("pfwdghost", ghost).expect("detach ghost");
    assert_eq!(x.mac_slot(ghost), 0, "the slot after its owner was detached");
    x.f.kernel().set_iface(ghost2, None, None, Some(ghost2_mac)).expect("set_iface ghost2 again");
    assert_eq!(Some(x.mac_slot(ghost)), IfaceMacSlot::word(ghost2, ghost2_mac), "a freed slot taken by the next");
    // Detaching an interface that does not own its slot leaves the owner's alone.
    x.f.kernel().set_iface(ghost, None, None, Some(ghost_mac)).expect("set_iface ghost again");
    x.f.kernel().detach("pfwdghost", ghost).expect("detach ghost again");
    assert_eq!(Some(x.mac_slot(ghost)), IfaceMacSlot::word(ghost2, ghost2_mac), "the owner's slot after another left");
}

/// Packets with IP options go to the tc path and the stack, which acts on some of them when it forwards: a source
/// route (dropped: `accept_source_route` is 0 by default), record route (the router's address written in), router
/// alert (handed to a listener). NOPs and an end of options alone pass too: the fast path takes only 20-byte headers.
#[test]
fn packets_with_options_the_stack_acts_on_pass() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    let b = BACKEND.octets();
    for (options, what) in [
        (vec![1, 1, 1, 1, 1, 1, 1, 0], "NOPs and an end of options"),
        (vec![131, 7, 4, b[0], b[1], b[2], b[3], 0], "loose source route"),
        (vec![137, 7, 4, b[0], b[1], b[2], b[3], 0], "strict source route"),
        (vec![7, 7, 4, 0, 0, 0, 0, 0], "record route"),
        (vec![148, 4, 0, 0], "router alert"),
    ] {
        let mut p = q.clone();
        p.options = options;
        expect_pass(&x, &p.bytes(), what);
    }
}

fn set_tot_len(frame: &mut [u8], len: u16) {
    frame[16..18].copy_from_slice(&len.to_be_bytes());
    fix_ip_checksum(frame);
}

fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = !ones_sum(&frame[14..14 + ihl.clamp(20, frame.len() - 14)]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn truncated_and_malformed_headers_pass() {
    let x = Router::new(&[rule(1, DNAT_UDP), rule(2, DNAT_TCP)]);
    let udp = Pkt::udp(CLIENT, 5555, ROUTER, 53).payload(b"");
    x.tc_in(&udp);
    dnat_handshake(&x);
    let tcp = to_dnat(ACK).payload(b"");
    // Both take the fast path as they are.
    expect_forward(&x, &udp, &udp.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
    expect_forward(&x, &tcp, &tcp.to(BACKEND, 80).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(2)]);
    let (u, t) = (udp.bytes(), tcp.bytes());
    let variant = |base: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = base.to_vec();
        f(&mut v);
        v
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // (BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, as no driver hands them to XDP.)
        ("Ethernet header only", t[..14].to_vec()),
        ("IPv4 header cut at 19 bytes", t[..14 + 19].to_vec()),
        ("TCP header cut (tot_len still says 40)", t[..14 + 20 + 19].to_vec()),
        ("UDP header cut (tot_len still says 28)", u[..14 + 20 + 7].to_vec()),
        (
            "tot_len 39: a 19-byte TCP header",
            variant(&t, &|v| {
                set_tot_len(v, 39);
                v.truncate(14 + 39)
            }),
        ),
        (
            "tot_len 27: a 7-byte UDP header",
            variant(&u, &|v| {
                set_tot_len(v, 27);
                v.truncate(14 + 27)
            }),
        ),
        ("tot_len beyond the frame", variant(&t, &|v| set_tot_len(v, 60))),
        ("tot_len below the IHL", variant(&t, &|v| set_tot_len(v, 16))),
        (
            "IHL 4",
            variant(&t, &|v| {
                v[14] = 0x44;
                fix_ip_checksum(v)
            }),
        ),
        ("IHL 0", variant(&t, &|v| v[14] = 0x40)),
        ("IP version 6 in an IPv4 ethertype", variant(&t, &|v| v[14] = 0x65)),
        // IHL 6 takes the ports for an option word, leaving 16 bytes for TCP.
        (
            "IHL 6 with a 16-byte TCP header",
            variant(&t, &|v| {
                v[14] = 0x46;
                fix_ip_checksum(v)
            }),
        ),
    ];
    for (name, frame) in &cases {
        expect_pass(&x, frame, name);
    }
}

/// The fast path translates what tc would translate, and nothing else: a TCP header with a data offset below 5
/// words is malformed to tc's parser, which leaves it untranslated (counted in `malformed_passed`).
#[test]
fn tcp_with_a_data_offset_below_five_passes_as_tc_leaves_it_untranslated() {
    let x = Router::new(&[rule(1, DNAT_TCP)]);
    dnat_handshake(&x);
    for doff in [0u8, 4] {
        let mut frame = to_dnat(ACK).payload(b"").bytes();
        frame[14 + 20 + 12] = doff << 4;
        let malformed = x.f.stat("malformed_passed");
        let r = x.f.ingress(&frame);
        assert_eq!(
            (r.ret, &r.data, x.f.stat("malformed_passed")),
            (NEXT, &frame, malformed + 1),
            "tc with doff {doff}"
        );
        expect_pass(&x, &frame, &format!("TCP data offset {doff}"));
    }
}

#[test]
fn fib_failures_pass() {
    let x = Router::new(&[
        rule(1, "dnat -p udp --dport 1001 --to 10.9.9.9"),
        rule(2, "dnat -p udp --dport 1002 --to 10.0.2.77"),
        rule(3, "dnat -p udp --dport 1003 --to 203.0.113.9"),
        rule(4, "redirect -i lo -p udp --dport 1004 --to-port 3000"),
    ]);
    let q = |dport: u16| Pkt::udp(CLIENT, 5555, ROUTER, dport);
    for (dport, to, what) in [
        (1001, UNROUTED, "no route"),
        (1002, UNRESOLVED, "no neighbour entry"),
        (1004, ROUTER, "a local destination (REDIRECT to the router's address)"),
    ] {
        assert_eq!(x.tc_in(&q(dport)), q(dport).to(to, if dport == 1004 { 3000 } else { dport }).bytes());
        expect_pass(&x, &q(dport).bytes(), what);
    }
    // A route with a locked MTU of 576: a packet of 576 bytes fits, one of 577 does not.
    let sized = |len: usize| q(1003).payload(&vec![0x5a; len - 28]);
    x.tc_in(&sized(100));
    expect_forward(&x, &sized(FAR_MTU), &sized(FAR_MTU).to(FAR, 1003).hop(VOUT_MAC, GATEWAY_MAC), &[slot_of(3)]);
    expect_pass(&x, &sized(FAR_MTU + 1).bytes(), "larger than the route's MTU");
}

#[test]
fn forwarding_disabled_on_the_incoming_interface_passes() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    x.lab.sysctl("/proc/sys/net/ipv4/conf/vin/forwarding", "0");
    expect_pass(&x, &q.bytes(), "forwarding off on vin");
    x.lab.sysctl("/proc/sys/net/ipv4/conf/vin/forwarding", "1");
    expect_forward(&x, &q, &q.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
}

#[test]
fn egress_interface_not_in_the_devmap_passes() {
    let x = Router::new(&[rule(1, "dnat -p udp --dport 53 --to 10.0.3.2"), rule(2, DNAT_TCP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    expect_pass(&x, &q.bytes(), "egress vx has no pfwd XDP");
    x.devmap(x.lab.vx, true);
    expect_forward(&x, &q, &q.to(HIDDEN, 53).hop(VX_MAC, HIDDEN_MAC), &[slot_of(1)]);
    // Taking vout out of the devmap (detach --xdp) stops the fast path towards it.
    dnat_handshake(&x);
    let data = to_dnat(ACK | PSH);
    expect_forward(&x, &data, &data.to(BACKEND, 80).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(2)]);
    x.devmap(x.lab.vout, false);
    expect_pass(&x, &data.bytes(), "vout removed from the devmap");
    // The way back does not need vout in the devmap: vin is.
    let resp = from_backend(ACK | PSH);
    let want = resp.from(ROUTER, 8080).hop(VIN_MAC, CLIENT_MAC);
    expect_forward_on(&x, &resp, x.lab.vout, &want, &[slot_of(2)], &[]);
}

#[test]
fn snat_rule_added_mid_flow_leaves_a_settled_udp_flow_alone() {
    // A flow's NAT at egress is settled by its first packet there, as in netfilter: SNAT rules added later do not
    // apply to it, on the fast path and in tc (the handoff) alike.
    let dnat = rule(1, DNAT_UDP);
    let x = Router::new(std::slice::from_ref(&dnat));
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    let r = x.tc_in(&q);
    assert_eq!(x.f.egress(&r).data, q.to(BACKEND, 5353).bytes());
    let plain = q.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC);
    expect_forward(&x, &q, &plain, &[slot_of(1)]);
    for other in [
        "masquerade -o lo -p udp",
        "masquerade -p tcp",
        "masquerade -p udp -d 10.0.3.0/24",
        "masquerade -o vin",
        "masquerade -p udp",
        "masquerade -o vout -p udp",
        "snat -o vout --to 10.0.2.1",
        "masquerade -d 10.0.2.0/24",
    ] {
        x.sync(&[dnat.clone(), rule(2, other)]);
        expect_forward(&x, &q, &plain, &[slot_of(1)]);
        let r = x.tc_in(&q);
        assert_eq!(x.f.egress(&r).data, q.to(BACKEND, 5353).bytes(), "tc, with {other}");
    }
    assert_eq!(x.f.stat("new_flows"), 1);
}

#[test]
fn unsettled_udp_flow_passes_while_a_snat_rule_would_open_one() {
    // A DNAT flow whose first packet went through tc ingress but never reached egress (dropped on the way): the
    // next packet is the one that settles the flow at egress, where a matching SNAT rule opens a flow for it. The
    // fast path cannot open flows: it leaves that packet to tc.
    let dnat = rule(1, DNAT_UDP);
    let x = Router::new(&[dnat.clone(), rule(2, "masquerade -p udp")]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    expect_pass(&x, &q.bytes(), "unsettled flow with a matching SNAT rule");
    // tc: ingress translates it (the DNAT flow), egress opens the SNAT flow (in the test run it leaves on lo: the
    // rule without interface matches there too) and settles the flow.
    let r = x.tc_in(&q);
    let r = x.f.egress(&r);
    assert_eq!(r.ret, NEXT);
    let addr = Ipv4Addr::from(<[u8; 4]>::try_from(&r.data[14 + 12..14 + 16]).unwrap());
    let port = u16::from_be_bytes([r.data[34], r.data[35]]);
    assert_eq!(r.data, q.to(BACKEND, 5353).from(addr, port).bytes());
    // Now both translations in one pass, both rules counted.
    let full = q.to(BACKEND, 5353).from(addr, port).hop(VOUT_MAC, BACKEND_MAC);
    expect_forward(&x, &q, &full, &[slot_of(1), slot_of(2)]);
    // Without a matching rule the fast path settles such a flow itself, as tc's egress would.
    let other = Pkt::udp(CLIENT, 5556, ROUTER, 53);
    x.sync(&[dnat.clone(), rule(2, "masquerade -p tcp")]);
    x.tc_in(&other);
    let plain = other.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC);
    expect_forward(&x, &other, &plain, &[slot_of(1)]);
    x.sync(&[dnat, rule(2, "masquerade -p udp")]);
    expect_forward(&x, &other, &plain, &[slot_of(1)]);
}

#[test]
fn tcp_without_an_egress_flow_is_forwarded_whatever_the_snat_rules() {
    // Mid-stream TCP never opens a flow at egress: the SNAT rule does not matter.
    let x = Router::new(&[rule(1, DNAT_TCP)]);
    dnat_handshake(&x);
    x.sync(&[rule(1, DNAT_TCP), rule(2, "masquerade -o vout")]);
    let data = to_dnat(ACK | PSH);
    expect_forward(&x, &data, &data.to(BACKEND, 80).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
}

#[test]
fn expired_flow_passes_and_is_left_to_tc() {
    let x = Router::new(&[rule(1, DNAT_UDP)]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    x.tc_in(&q);
    let a = Pkt::udp(BACKEND, 5353, CLIENT, 5555);
    expect_forward_on(
        &x,
        &a,
        x.lab.vout,
        &a.from(ROUTER, 53).hop(VIN_MAC, CLIENT_MAC),
        &[slot_of(1)],
        &[("flows_confirmed", 1)],
    );
    x.f.timeouts(|c| c.udp_timeout = 1);
    thread::sleep(Duration::from_millis(1500));
    expect_pass(&x, &q.bytes(), "query of an expired flow");
    expect_pass_on(&x, &a.bytes(), x.lab.vout, "answer of an expired flow");
    // tc ends it and starts over: a new flow, unconfirmed, which the fast path takes again.
    x.tc_in(&q);
    assert_eq!(x.f.stat("expired_flows_removed"), 1);
    expect_forward(&x, &q, &q.to(BACKEND, 5353).hop(VOUT_MAC, BACKEND_MAC), &[slot_of(1)]);
}

#[test]
fn expired_or_closed_egress_flow_passes() {
    // Full NAT with UDP: the SNAT flow of the translated tuple is the egress half.
    let x = Router::new(&[rule(1, DNAT_UDP), rule(2, "snat -o lo --to 10.0.2.1")]);
    let q = Pkt::udp(CLIENT, 5555, ROUTER, 53);
    let r = x.tc_in(&q);
    assert_eq!(x.f.egress(&r).data, q.to(BACKEND, 5353).from(GW, 5555).bytes());
    let full = q.to(BACKEND, 5353).from(GW, 5555).hop(VOUT_MAC, BACKEND_MAC);
    expect_forward(&x, &q, &full, &[slot_of(1), slot_of(2)]);
    // The SNAT flow's original entry (key: the DNAT-translated tuple) goes stale, the DNAT flow stays live.
    let key = tuple(CLIENT, 5555, BACKEND, 5353, PROTO_UDP);
    let mut map = ct_map(&x.f, names::CONNTRACK_NEW);
    let live = map.get(&key, 0).expect("the SNAT flow's entry");
    map.insert(key, CtEntry { last_seen_ns: 0, ..live }, 0).unwrap();
    expect_pass(&x, &q.bytes(), "egress flow expired");
    map.insert(key, live, 0).unwrap();
    expect_forward(&x, &q, &full, &[slot_of(1), slot_of(2)]);
}

#[test]
fn closed_egress_flow_passes() {
    // Full NAT with TCP, both flows confirmed; then the SNAT flow alone is marked reset (as if its entry had seen
    // an RST the DNAT flow's did not).
    let x = Router::new(&[rule(1, DNAT_TCP), rule(2, "snat -o lo --to 10.0.2.1")]);
    for pkt in [to_dnat(SYN), Pkt::tcp(BACKEND, 80, GW, CPORT, SYN | ACK), to_dnat(ACK)] {
        let r = x.tc_in(&pkt);
        assert_eq!(x.f.egress(&r).ret, NEXT);
    }
    assert_eq!(x.f.stat("flows_confirmed"), 2);
    let data = to_dnat(ACK | PSH);
    let full = data.to(BACKEND, 80).from(GW, CPORT).hop(VOUT_MAC, BACKEND_MAC);
    expect_forward(&x, &data, &full, &[slot_of(1), slot_of(2)]);
    let key = tuple(CLIENT, CPORT, BACKEND, 80, PROTO_TCP);
    let mut map = ct_map(&x.f, names::CONNTRACK);
    let live = map.get(&key, 0).expect("the SNAT flow's entry");
    map.insert(key, CtEntry { state: live.state | ct_state::RST, ..live }, 0).unwrap();
    expect_pass(&x, &data.bytes(), "egress flow reset");
    map.insert(key, CtEntry { state: live.state | ct_state::FIN_ORIGINAL | ct_state::FIN_REPLY, ..live }, 0).unwrap();
    expect_pass(&x, &data.bytes(), "egress flow closed by both FINs");
    map.insert(key, live, 0).unwrap();
    expect_forward(&x, &data, &full, &[slot_of(1), slot_of(2)]);
}
