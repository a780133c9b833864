//! The fixture shared by the packet test files: a private pfwd instance (programs and maps pinned in a unique
//! directory, lo registered with 10.0.1.1), rules from CLI syntax, and BPF_PROG_TEST_RUN of one packet.
//!
//! In BPF_PROG_TEST_RUN a tc program sees the packet on the loopback device, so every fixture registers interface 1
//! (lo) and rules use `-i lo`/`-o lo` or no interface. Needs root (BPF); each fixture pins into its own directory,
//! so tests run in parallel.
#![allow(dead_code)] // Each test file uses a different part.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use etherparse::{IcmpEchoHeader, Icmpv4Header, Icmpv4Type, IpFragOffset, IpNumber, Ipv4Header, TcpHeader, UdpHeader};
use pfwd::{loader::Kernel, state::StoredRule};
use pfwd_common::{Addr6, Config, CtEntry, CtEntry6, RuleCounters, Tuple, Tuple6};

/// TCX_NEXT as the test run reports it (a u32: the programs return -1 for passed and translated packets alike).
pub const NEXT: u32 = pfwd_common::tcx::NEXT as u32;
/// TCX_DROP as the test run reports it.
pub const DROP: u32 = pfwd_common::tcx::DROP as u32;

pub const LO: u32 = 1;
/// lo's address in the fixture: REDIRECT's and MASQUERADE's address, and the address DNAT clients connect to.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// lo's IPv6 address in the fixture, as [`ROUTER`] is its IPv4 one.
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

static FIXTURES: AtomicU32 = AtomicU32::new(0);

/// Removes the pins when dropped, also when the test panics or loading failed halfway.
pub struct Pins(Kernel);

impl Drop for Pins {
    fn drop(&mut self) {
        let dir = self.0.pin_dir().to_path_buf();
        if let Err(e) = self.0.unload() {
            eprintln!("unloading {}: {e:#}", dir.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// One private pfwd instance: programs and maps pinned in a unique directory, lo registered, `rules` loaded.
pub struct Fixture {
    pub ingress: SchedClassifier,
    pub egress: SchedClassifier,
    pub pins: Pins,
    /// The rules the kernel holds (what the next `sync` changes from, as `pfwd` does).
    pub held: std::sync::Mutex<Vec<StoredRule>>,
    /// Whether its programs take Ethernet frames: then packets may come CHECKSUM_COMPLETE ([`run`]). The test run
    /// sums the packet from behind an Ethernet header, so a layer-3 build's packet (IP from byte 0) cannot be checked
    /// so.
    pub l2: bool,
    /// How many packets it ran: they alternate between CHECKSUM_COMPLETE skbs (the first, third, ...), whose L4
    /// checksums the programs update through `bpf_l4_csum_replace`, and CHECKSUM_NONE ones, which they update by
    /// hand (`pfwd-ebpf/src/csum_state.rs`), so each test with more than one packet covers both ways.
    runs: AtomicU32,
}

pub fn lo_index(name: &str) -> Option<u32> {
    (name == "lo").then_some(LO)
}

/// Map values hold addresses in network order: the bytes as they sit in the packet.
pub fn ne(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

impl Fixture {
    pub fn new(rules: &[StoredRule]) -> Self {
        Self::with_conntrack(rules, 4096)
    }

    /// A fixture whose conntrack table holds only `entries` (two per flow), to test eviction.
    pub fn with_conntrack(rules: &[StoredRule], entries: u32) -> Self {
        if !nix::unistd::geteuid().is_root() {
            panic!("the packet tests load eBPF programs and need root: run them with sudo (CI runs them as root)");
        }
        pfwd::instance::ensure_bpffs().expect("bpffs at /sys/fs/bpf");
        let n = FIXTURES.fetch_add(1, Ordering::Relaxed);
        pin_thread(n);
        let dir = PathBuf::from(format!("/sys/fs/bpf/pfwd-test-{}-{n}", std::process::id()));
        let pins = Pins(Kernel::at(dir.clone()));
        pins.0.load(entries, &Config::default()).expect("loading the eBPF programs");
        pins.0.set_iface(LO, Some(ROUTER), Some(ROUTER6), None).expect("set_iface");
        // This host's addresses, for `-d local`: lo's.
        pins.0.set_local_addrs(&[ROUTER.into(), ROUTER6.into()]).expect("set_local_addrs");
        pins.0.sync_rules(None, rules, &lo_index).expect("sync_rules");
        let ingress = SchedClassifier::from_pin(dir.join("prog_ingress")).expect("pinned ingress program");
        let egress = SchedClassifier::from_pin(dir.join("prog_egress")).expect("pinned egress program");
        Self { ingress, egress, pins, held: std::sync::Mutex::new(rules.to_vec()), l2: true, runs: Default::default() }
    }

    /// A fixture running the build of the tc programs for layer-3 interfaces (tun, WireGuard, PPP: packets start at
    /// the IP header), sharing the maps as in an instance.
    pub fn layer3(rules: &[StoredRule]) -> Self {
        let mut f = Self::new(rules);
        let dir = f.kernel().pin_dir().to_path_buf();
        f.kernel().ensure_layer3().expect("loading the layer-3 build");
        f.ingress = SchedClassifier::from_pin(dir.join("prog_ingress_l3")).expect("pinned layer-3 ingress program");
        f.egress = SchedClassifier::from_pin(dir.join("prog_egress_l3")).expect("pinned layer-3 egress program");
        f.l2 = false;
        f
    }

    pub fn kernel(&self) -> &Kernel {
        &self.pins.0
    }

    /// Changes the kernel's rules to `rules`, writing only what changes (as `pfwd add`/`del` do).
    pub fn sync(&self, rules: &[StoredRule]) {
        let held = std::mem::replace(&mut *self.held.lock().unwrap(), rules.to_vec());
        self.kernel().sync_rules(Some(&held), rules, &lo_index).expect("sync_rules");
    }

    pub fn ingress(&self, pkt: &[u8]) -> Run {
        run_as(&self.ingress, pkt, self.complete_next())
    }

    pub fn egress(&self, pkt: &[u8]) -> Run {
        run_as(&self.egress, pkt, self.complete_next())
    }

    /// Whether the next packet comes CHECKSUM_COMPLETE (see [`Fixture::runs`]).
    fn complete_next(&self) -> bool {
        self.l2 && self.runs.fetch_add(1, Ordering::Relaxed).is_multiple_of(2)
    }

    pub fn stat(&self, name: &str) -> u64 {
        let stats = self.kernel().stats().expect("stats");
        stats.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no stat {name}: {stats:?}")).1
    }

    pub fn conntrack(&self) -> Vec<(Tuple, CtEntry)> {
        self.kernel().conntrack().expect("conntrack")
    }

    /// The IPv6 flow table's entries (both directions, both tables), as [`Fixture::conntrack`] is IPv4's.
    pub fn conntrack6(&self) -> Vec<(Tuple6, CtEntry6)> {
        self.kernel().conntrack::<Addr6>().expect("conntrack6")
    }

    /// Changes the idle timeouts (keeping the rest of the config: the generation, the class counts, the tick).
    pub fn timeouts(&self, set: impl FnOnce(&mut Config)) {
        let mut cfg = self.kernel().config().expect("config");
        set(&mut cfg);
        self.kernel().set_config(&cfg).expect("set_config");
    }

    pub fn counters(&self, slot: u32) -> RuleCounters {
        self.kernel().rule_counters(&[slot]).expect("rule_counters")[0]
    }
}

/// Keeps the calling thread (a test's) on one CPU, the `n`th allowed one (round robin, so parallel tests spread).
/// The tc ingress program hands what it found about a packet to the egress program through a per-CPU slot
/// (`pfwd-ebpf/src/handoff.rs`); forwarding runs both on one CPU, and a test that runs ingress and then egress must
/// too, or egress would (correctly, but not as the test means) look the packet up again.
pub fn pin_thread(n: u32) {
    use nix::{sched, unistd::Pid};
    let allowed = sched::sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
    let cpus: Vec<usize> = (0..sched::CpuSet::count()).filter(|&c| allowed.is_set(c).unwrap_or(false)).collect();
    let mut set = sched::CpuSet::new();
    set.set(cpus[n as usize % cpus.len()]).expect("CPU set");
    sched::sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// A rule from CLI syntax, with its id; the slot is deliberately not its list position, so the test also covers
/// sync_rules' position-to-slot mapping.
pub fn rule(id: u32, args: &str) -> StoredRule {
    let argv: Vec<&str> = args.split_whitespace().collect();
    let mut rule = pfwd::cli::parse_rule(&argv).unwrap_or_else(|e| panic!("{args}: {e}"));
    rule.id = id;
    StoredRule { rule, slot: slot_of(id) }
}

pub fn slot_of(id: u32) -> u32 {
    100 + id
}

pub struct Run {
    pub ret: u32,
    pub data: Vec<u8>,
}

/// Runs `prog` once on the Ethernet frame `pkt`. Where the kernel can (Linux 6.16+), the packet comes in an skb
/// marked CHECKSUM_COMPLETE, as from a NIC that sums what it receives, and the run fails unless the program kept
/// skb->csum right (`pfwd::testrun`): every packet test checks that too.
pub fn run(prog: &SchedClassifier, pkt: &[u8]) -> Run {
    run_as(prog, pkt, true)
}

/// [`run`]; `complete`: whether the packet may come CHECKSUM_COMPLETE (see [`Fixture::l2`]).
pub fn run_as(prog: &SchedClassifier, pkt: &[u8], complete: bool) -> Run {
    let mut out = vec![0u8; 2048];
    static COMPLETE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let checked = *COMPLETE.get_or_init(|| {
        let ok = pfwd::testrun::supported(prog);
        if !ok {
            eprintln!("this kernel has no BPF_F_TEST_SKB_CHECKSUM_COMPLETE (6.16+): skb->csum goes unchecked");
        }
        ok
    });
    if complete && checked {
        let r = pfwd::testrun::run_complete(prog, pkt, &mut out).unwrap_or_else(|e| {
            let why = if e.raw_os_error() == Some(libc::EBADMSG) { " (the program left skb->csum wrong)" } else { "" };
            panic!("BPF_PROG_TEST_RUN (CHECKSUM_COMPLETE) of {} bytes {pkt:02x?}: {e}{why}", pkt.len())
        });
        out.truncate(r.len);
        return Run { ret: r.retval, data: out };
    }
    let r = prog
        .test_run(TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), ..Default::default() })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {} bytes {pkt:02x?}: {e}", pkt.len()));
    out.truncate(r.data_size_out as usize);
    Run { ret: r.return_value, data: out }
}

pub fn tuple(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> Tuple {
    Tuple { saddr: ne(src), daddr: ne(dst), sport, dport, proto, _pad: 0, _pad2: 0 }
}

/// An IPv6 address as the maps hold it: four words, each the packet's 4 bytes (network order).
pub fn ne6(a: Ipv6Addr) -> Addr6 {
    let o = a.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

pub fn tuple6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, proto: u8) -> Tuple6 {
    Tuple6 { saddr: ne6(src), daddr: ne6(dst), sport, dport, proto, _pad: 0, _pad2: 0 }
}

/// The transport part of an IPv4 test packet (the packet test files' `Pkt`s).
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
    },
    /// `csum: false` sends the checksum as 0 ("no checksum").
    Udp {
        sport: u16,
        dport: u16,
        csum: bool,
    },
    Echo {
        id: u16,
        seq: u16,
        reply: bool,
    },
}

/// The IPv4 header fields a test packet sets; [`Ip4::packet`] serializes it with a transport header and payload.
pub struct Ip4<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub ident: u16,
    pub df: bool,
    pub mf: bool,
    pub frag_offset: u16,
    pub options: &'a [u8],
}

impl Ip4<'_> {
    /// The header of a packet of `proto` whose payload (transport header included) is `len` bytes, its checksum
    /// computed by etherparse.
    pub fn header(&self, proto: IpNumber, len: usize) -> Ipv4Header {
        let mut ip = Ipv4Header::new(0, self.ttl, proto, self.src.octets(), self.dst.octets()).unwrap();
        ip.identification = self.ident;
        ip.dont_fragment = self.df;
        ip.more_fragments = self.mf;
        ip.fragment_offset = IpFragOffset::try_new(self.frag_offset).unwrap();
        ip.options = self.options.try_into().expect("IPv4 options: a multiple of 4, at most 40 bytes");
        ip.set_payload_len(len).unwrap();
        ip.header_checksum = ip.calc_header_checksum();
        ip
    }

    /// The IP packet (no Ethernet header): this header, `l4` and `payload`, every checksum computed by etherparse.
    pub fn packet(&self, l4: &L4, payload: &[u8]) -> Vec<u8> {
        let (proto, hdr_len) = match l4 {
            L4::Tcp { .. } => (IpNumber::TCP, TcpHeader::MIN_LEN),
            L4::Udp { .. } => (IpNumber::UDP, UdpHeader::LEN),
            L4::Echo { .. } => (IpNumber::ICMP, 8),
        };
        let ip = self.header(proto, hdr_len + payload.len());
        let l4: Vec<u8> = match *l4 {
            L4::Tcp { sport, dport, seq, ack, flags } => {
                let mut t = TcpHeader::new(sport, dport, seq, 29_200);
                t.acknowledgment_number = ack;
                t.fin = flags & FIN != 0;
                t.syn = flags & SYN != 0;
                t.rst = flags & RST != 0;
                t.psh = flags & PSH != 0;
                t.ack = flags & ACK != 0;
                t.checksum = t.calc_checksum_ipv4(&ip, payload).unwrap();
                t.to_bytes().to_vec()
            }
            L4::Udp { sport, dport, csum } => {
                let mut u = UdpHeader::without_ipv4_checksum(sport, dport, payload.len()).unwrap();
                if csum {
                    // A computed 0 comes back as 0xffff (RFC 768).
                    u.checksum = u.calc_checksum_ipv4(&ip, payload).unwrap();
                }
                u.to_bytes().to_vec()
            }
            L4::Echo { id, seq, reply } => {
                let echo = IcmpEchoHeader { id, seq };
                let ty = if reply { Icmpv4Type::EchoReply(echo) } else { Icmpv4Type::EchoRequest(echo) };
                Icmpv4Header::with_checksum(ty, payload).to_bytes().to_vec()
            }
        };
        let mut out = Vec::new();
        ip.write_raw(&mut out).unwrap();
        out.extend_from_slice(&l4);
        out.extend_from_slice(payload);
        out
    }
}
