//! Workload 6: the per-packet cost of pfwd's programs in BPF_PROG_TEST_RUN, against an empty classifier; and the
//! memory of pfwd's maps at default sizes.

use std::ffi::CString;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use etherparse::{PacketBuilder, SlicedPacket};

use super::net::Env;
use super::run::check_interrupted;

/// TCX_NEXT as the test run reports it: pfwd returns it for passed and translated packets alike.
const NEXT: u32 = u32::MAX;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const PORT: u16 = 9000;
/// The IPv6 cases' addresses. Their rules match the destination by /32 prefix (`-d 3fff:1::/32`, one prefix per
/// address), so they have the IPv4 rules' shape (-i, -p, --dport, a /32 destination) and share their class: the rule
/// walk probes one class for either family, as it did before IPv6, and the no-rule and new-flow figures compare
/// across families and with earlier runs. /128 rules would be a class of their own, probed by every IPv4 walk too
/// (measured: about +50 ns on no-rule). Hence the documentation prefix 3fff::/20 (RFC 9637) and its many /32s
/// rather than 2001:db8::/32, a single one.
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x3fff, 1, 0, 0, 0, 0, 0, 2);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x3fff, 1, 0, 0, 0, 0, 0, 1);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x3fff, 2, 0, 0, 0, 0, 0, 2);

pub struct ProgCosts {
    /// (case key, ns per packet) for each repetition.
    pub samples: Vec<(&'static str, f64)>,
    pub notes: Vec<String>,
    /// pfwd's maps at default sizes: (name, type, max entries, bytes).
    pub maps: Vec<(String, String, u64, u64)>,
}

/// The empty program measured the same way as `case` (its floor: the test run's own overhead).
pub fn floor_of(case: &str) -> &'static str {
    if case.starts_with("xdp-") && case.ends_with("-1") {
        "xdp-empty-1"
    } else if case.starts_with("xdp-") {
        "xdp-empty"
    } else if case.ends_with("-1") {
        "empty-1"
    } else {
        "empty"
    }
}

/// The cases in report order, each IPv6 case (key ending in 6, or 6-1) after its IPv4 one.
pub const CASES: &[(&str, &str)] = &[
    ("empty", "empty program (mov r0,-1; exit), repeat R"),
    ("no-rule", "no rule matching, repeat R"),
    ("no-rule6", "IPv6: no rule matching, repeat R"),
    ("established", "established flow (ingress DNAT), repeat R"),
    ("established6", "IPv6: established flow (ingress DNAT), repeat R"),
    ("unconfirmed", "flow in its first round trip (no reply yet: unconfirmed table), repeat R"),
    ("unconfirmed6", "IPv6: flow in its first round trip (unconfirmed table), repeat R"),
    ("reply", "reply (egress un-DNAT), repeat R"),
    ("reply6", "IPv6: reply (egress un-DNAT), repeat R"),
    ("empty-1", "empty program, repeat=1, median of S calls"),
    ("established-1", "established flow, repeat=1, median of S calls"),
    ("established6-1", "IPv6: established flow, repeat=1, median of S calls"),
    ("egress-handed-1", "egress of an established flow's forwarded packet, handed over by ingress, median of S calls"),
    ("egress-lookup-1", "the same packet at egress without the handoff (looked up, as before it), median of S calls"),
    ("egress-handed6-1", "IPv6: egress of an established flow's forwarded packet, handed over, median of S calls"),
    ("egress-lookup6-1", "IPv6: the same packet at egress without the handoff (looked up), median of S calls"),
    ("new-1", "new flow, repeat=1, median of S calls (distinct source ports)"),
    ("new6-1", "IPv6: new flow, repeat=1, median of S calls (distinct source ports)"),
    ("no-rule-1", "no rule matching, repeat=1, median of S calls"),
    ("no-rule6-1", "IPv6: no rule matching, repeat=1, median of S calls"),
    ("xdp-empty-1", "XDP: empty program (r0 = XDP_PASS), repeat=1, median of S calls"),
    ("xdp-established-1", "XDP: established flow, translated, routed and redirected, repeat=1, median of S calls"),
    ("xdp-empty", "XDP: empty program, repeat 200, median of S/20 calls"),
    (
        "xdp-established",
        "XDP: established flow, translated, routed and redirected, repeat 200 (two forwarded mirror flows, TTL 255), \
         median of S/20 calls",
    ),
    (
        "xdp-fib",
        "XDP: the FIB lookup alone (bpf_fib_lookup with the parameters the fast path passes for the mirror flows), \
         repeat 200, median of S/20 calls",
    ),
];

/// (IPv4 case, its IPv6 counterpart): the report's IPv6 / IPv4 line.
pub const FAMILY_PAIRS: [(&str, &str); 9] = [
    ("no-rule", "no-rule6"),
    ("established", "established6"),
    ("unconfirmed", "unconfirmed6"),
    ("reply", "reply6"),
    ("established-1", "established6-1"),
    ("new-1", "new6-1"),
    ("no-rule-1", "no-rule6-1"),
    ("egress-handed-1", "egress-handed6-1"),
    ("egress-lookup-1", "egress-lookup6-1"),
];

/// Attaches pfwd (eBPF mode, default sizes) to the router namespace's `lo` (test runs see packets on lo) and
/// measures. Two rules per family make the established and reply cases stable under `repeat`: the kernel reruns the
/// program on the packet it rewrote, so flow A (10.0.1.1 -> 10.0.2.2) and flow B (10.0.2.2 -> 10.0.1.1) turn each
/// packet into the other flow's, and every repetition is an established-flow translation with address and checksum
/// rewrite. The IPv6 cases mirror the IPv4 ones (3fff:1::1 -> 3fff:2::2 and back, see CLIENT6) and run interleaved
/// with them.
pub fn measure(env: &Env, reps: usize, repeat: u32, singles: usize) -> Result<ProgCosts> {
    let _setup = LoSetup::attach(env)?;
    let dir = env.pin_dir();
    let ingress = SchedClassifier::from_pin(dir.join("prog_ingress")).context("pinned prog_ingress")?;
    let egress = SchedClassifier::from_pin(dir.join("prog_egress")).context("pinned prog_egress")?;
    let empty = EmptyProg::load()?;
    let maps = map_memory(env, &dir)?;
    let mut notes = vec![];
    for name in ["prog_ingress", "prog_egress"] {
        if let Ok(o) =
            env.lab.sh(tests::Node::Router, &format!("bpftool prog show pinned {}", dir.join(name).display()))
        {
            notes.push(format!("{name}: {}", o.split_whitespace().collect::<Vec<_>>().join(" ")));
        }
    }

    let a = udp(CLIENT, 40_000, ROUTER, PORT);
    let b = udp(CLIENT, 40_000, SERVER, PORT);
    let reply = udp(SERVER, PORT, CLIENT, 40_000);
    let no_rule = udp(CLIENT, 40_000, ROUTER, 9999);
    // Create flows A and B, and check that A is translated.
    let out = run(&ingress, &a, 1)?;
    ensure!(dst_of(&out.1)? == SERVER, "pfwd did not DNAT the test packet (got dst {})", dst_of(&out.1)?);
    run(&ingress, &b, 1)?;
    // A reply confirms each: established flows live in the confirmed table, one lookup away. (Before, the quick
    // run measured them unconfirmed: two lookups.)
    run(&egress, &reply, 1)?;
    run(&egress, &udp(ROUTER, PORT, CLIENT, 40_000), 1)?;
    // Flows C and D (another client port) never see a reply.
    let c = udp(CLIENT, 40_001, ROUTER, PORT);
    run(&ingress, &c, 1)?;
    run(&ingress, &udp(CLIENT, 40_001, SERVER, PORT), 1)?;

    // The same flows over IPv6.
    let a6 = udp6(CLIENT6, 40_000, ROUTER6, PORT);
    let b6 = udp6(CLIENT6, 40_000, SERVER6, PORT);
    let reply6 = udp6(SERVER6, PORT, CLIENT6, 40_000);
    let no_rule6 = udp6(CLIENT6, 40_000, ROUTER6, 9999);
    let out = run(&ingress, &a6, 1)?;
    ensure!(dst6_of(&out.1)? == SERVER6, "pfwd did not DNAT the IPv6 test packet (got dst {})", dst6_of(&out.1)?);
    run(&ingress, &b6, 1)?;
    run(&egress, &reply6, 1)?;
    run(&egress, &udp6(ROUTER6, PORT, CLIENT6, 40_000), 1)?;
    let c6 = udp6(CLIENT6, 40_001, ROUTER6, PORT);
    run(&ingress, &c6, 1)?;
    run(&ingress, &udp6(CLIENT6, 40_001, SERVER6, PORT), 1)?;
    let out = run(&ingress, &no_rule6, 1)?.1;
    ensure!(dst6_of(&out)? == ROUTER6, "the IPv6 no-rule packet was translated");

    let mut samples = vec![];
    // An odd repeat count ends on the translated form: proof that every step translated.
    let odd = repeat | 1;
    for rep in 0..reps {
        check_interrupted()?;
        println!("    test run {}/{reps}: repeat {repeat}, IPv4 and IPv6", rep + 1);
        samples.push(("empty", run(&empty.prog, &a, repeat)?.0));
        samples.push(("no-rule", run(&ingress, &no_rule, repeat)?.0));
        samples.push(("no-rule6", run(&ingress, &no_rule6, repeat)?.0));
        let (ns, data) = run(&ingress, &a, odd)?;
        ensure!(dst_of(&data)? == SERVER, "established repeat did not end translated");
        samples.push(("established", ns));
        let (ns, data) = run(&ingress, &a6, odd)?;
        ensure!(dst6_of(&data)? == SERVER6, "IPv6 established repeat did not end translated");
        samples.push(("established6", ns));
        let (ns, data) = run(&ingress, &c, odd)?;
        ensure!(dst_of(&data)? == SERVER, "unconfirmed repeat did not end translated");
        samples.push(("unconfirmed", ns));
        let (ns, data) = run(&ingress, &c6, odd)?;
        ensure!(dst6_of(&data)? == SERVER6, "IPv6 unconfirmed repeat did not end translated");
        samples.push(("unconfirmed6", ns));
        let (ns, data) = run(&egress, &reply, odd)?;
        ensure!(src_of(&data)? == ROUTER, "reply repeat did not end translated");
        samples.push(("reply", ns));
        let (ns, data) = run(&egress, &reply6, odd)?;
        ensure!(src6_of(&data)? == ROUTER6, "IPv6 reply repeat did not end translated");
        samples.push(("reply6", ns));
    }
    println!("    test run: {singles} single runs per case");
    type Pkt<'p> = &'p dyn Fn(usize) -> Vec<u8>;
    // The median of `singles` calls for each packet maker, call by call in turn (an IPv4 case and its IPv6
    // counterpart alternate).
    let medians = |prog: &SchedClassifier, pkts: &[Pkt]| -> Result<Vec<f64>> {
        let mut v = vec![Vec::with_capacity(singles); pkts.len()];
        for i in 0..singles {
            if i % 1000 == 0 {
                check_interrupted()?;
            }
            for (pkt, v) in pkts.iter().zip(&mut v) {
                v.push(run(prog, &pkt(i), 1)?.0);
            }
        }
        Ok(v.iter_mut().map(|v| median(v)).collect())
    };
    samples.push(("empty-1", medians(&empty.prog, &[&|_| a.clone()])?[0]));
    let established = medians(&ingress, &[&|_| a.clone(), &|_| a6.clone()])?;
    let no_rule_1 = medians(&ingress, &[&|_| no_rule.clone(), &|_| no_rule6.clone()])?;
    // Each call a new source (port, and address past 60,000) so every run creates a flow.
    let new = |i: usize| {
        let src = Ipv4Addr::new(10, 0, 3 + (i / 60_000) as u8, 2);
        udp(src, 1024 + (i % 60_000) as u16, ROUTER, PORT)
    };
    let new6 = |i: usize| {
        let src = Ipv6Addr::new(0x3fff, 3, 0, 0, 0, 0, 0, 2 + (i / 60_000) as u16);
        udp6(src, 1024 + (i % 60_000) as u16, ROUTER6, PORT)
    };
    let new_1 = medians(&ingress, &[&new, &new6])?;
    for (k4, k6, m) in [
        ("established-1", "established6-1", established),
        ("new-1", "new6-1", new_1),
        ("no-rule-1", "no-rule6-1", no_rule_1),
    ] {
        samples.push((k4, m[0]));
        samples.push((k6, m[1]));
    }
    let (longer, longer6) =
        (udp_sized(CLIENT, 40_000, ROUTER, PORT, 64, 19), udp6_sized(CLIENT6, 40_000, ROUTER6, PORT, 19));
    samples.extend(egress_singles(&ingress, &egress, (&a, &longer), singles, ["egress-handed-1", "egress-lookup-1"])?);
    samples.extend(egress_singles(
        &ingress,
        &egress,
        (&a6, &longer6),
        singles,
        ["egress-handed6-1", "egress-lookup6-1"],
    )?);
    samples.extend(xdp_costs(env, &dir, (&ingress, &egress), &a, singles)?);
    Ok(ProgCosts { samples, notes, maps })
}

/// Forwarded mirror addresses of the repeated XDP case: two hosts beyond eth1 whose DNAT rules send each to the
/// other, so that every repetition translates, routes and redirects the frame again (see `xdp_costs`).
const MIRROR_X: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 10);
const MIRROR_Y: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 11);
const MIRROR_PORT: u16 = 9001;
/// Repetitions per call of the repeated XDP case: each lowers the TTL by one, from 255.
const XDP_REPEAT: u32 = 200;

/// The XDP fast path's cost: a packet of an established flow through `pfwd_xdp` as if received on the router's lo,
/// translated, routed (the FIB and a permanent neighbour beyond eth1) and redirected to eth1, which `attach --xdp`
/// puts in the fast path's devmap; against an XDP program that only returns XDP_PASS. Two ways:
/// - single runs of flow A's packet (its DNAT target, the server, is the route's end);
/// - repeated runs, as the tc cases are measured (warm caches, the syscall's cost spread over the repetitions): the
///   rerun frame is the program's own output, so the case takes two flows that turn each frame into the other's,
///   X -> Y and Y -> X, both beyond eth1, with neighbours whose MAC is the one lo frames are addressed to (all
///   zeros: the fast path forwards only frames sent to the ingress interface), and a TTL of 255 for 200 routings.
///
/// The runs are made from the router namespace, where the FIB lookup looks.
fn xdp_costs(
    env: &Env,
    dir: &Path,
    (ingress, egress): (&SchedClassifier, &SchedClassifier),
    a: &[u8],
    singles: usize,
) -> Result<Vec<(&'static str, f64)>> {
    let _mirror = MirrorSetup::add(env)?;
    // The mirror flows, created by tc ingress and confirmed by a reply each through tc egress.
    run(ingress, &udp(CLIENT, 40_002, MIRROR_X, MIRROR_PORT), 1)?;
    run(ingress, &udp(CLIENT, 40_002, MIRROR_Y, MIRROR_PORT), 1)?;
    run(egress, &udp(MIRROR_Y, MIRROR_PORT, CLIENT, 40_002), 1)?;
    run(egress, &udp(MIRROR_X, MIRROR_PORT, CLIENT, 40_002), 1)?;
    env.pfwd(&["attach", "eth1", "--xdp"])?;
    let xdp =
        Xdp::from_pin(dir.join("prog_xdp"), aya_obj::programs::XdpAttachType::Interface).context("pinned prog_xdp")?;
    let empty = EmptyProg::load_xdp()?;
    // SAFETY: a NUL-terminated name.
    let lo = env.lab.in_ns(tests::Node::Router, || unsafe { libc::if_nametoindex(c"lo".as_ptr()) })?;
    let mut mirror = udp_ttl(CLIENT, 40_002, MIRROR_X, MIRROR_PORT, 255);
    mirror[..6].fill(0);
    // The route the fast path looks up for the mirror frame (once translated: to Y, from the client), as it asks.
    let fib = EmptyProg::load_xdp_fib(&fib_params(lo, (CLIENT, 40_002), (MIRROR_Y, MIRROR_PORT), ip_len(&mirror)))?;
    // A repeated test run of an XDP program that is attached nowhere puts it into the kernel's XDP dispatcher and
    // takes it out again, an RCU grace period each (see udp_live): the empty program and the FIB lookup's are parked
    // on an idle veth pair, as pfwd's is attached to eth1.
    let park = super::XdpParking::new(env)?;
    park.attach(super::XdpParking::DEV, &empty.pin)?;
    park.attach(super::XdpParking::PEER, &fib.pin)?;
    // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    // Addressed to lo's MAC (all zeros), as the fast path forwards only frames sent to the ingress interface.
    let mut frame = a.to_vec();
    frame[..6].fill(0);
    let run_xdp = |prog: &Xdp, data: &[u8], repeat: u32, want: u32| -> Result<(f64, Vec<u8>)> {
        let mut md = [0u8; 24];
        md[4..8].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        md[12..16].copy_from_slice(&lo.to_ne_bytes());
        let mut out = vec![0u8; 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(data),
                data_out: Some(&mut out),
                ctx_in: Some(&md),
                repeat,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN (XDP)")?;
        ensure!(r.return_value == want, "XDP program returned {} (expected {want})", r.return_value);
        out.truncate(r.data_size_out as usize);
        Ok((r.duration.as_nanos() as f64, out))
    };
    env.lab.in_ns(tests::Node::Router, || -> Result<Vec<(&'static str, f64)>> {
        let (_, out) = run_xdp(&xdp, &frame, 1, XDP_REDIRECT)?;
        ensure!(dst_of(&out)? == SERVER, "the XDP fast path did not DNAT the test packet (dst {})", dst_of(&out)?);
        // Proof that every repetition was forwarded: an even count ends on X again, the TTL lowered by each.
        let (_, out) = run_xdp(&xdp, &mirror, XDP_REPEAT, XDP_REDIRECT)?;
        ensure!(
            dst_of(&out)? == MIRROR_X && out[22] == (255 - XDP_REPEAT) as u8,
            "the repeated XDP case was not forwarded each time (dst {}, TTL {})",
            dst_of(&out)?,
            out[22]
        );
        let (mut e, mut z) = (Vec::with_capacity(singles), Vec::with_capacity(singles));
        for i in 0..singles {
            if i % 1000 == 0 {
                check_interrupted()?;
            }
            e.push(run_xdp(&xdp, &frame, 1, XDP_REDIRECT)?.0);
            z.push(run_xdp(&empty.prog, &frame, 1, XDP_PASS)?.0);
        }
        // Fewer calls than single runs: each is 200 packets.
        let (mut er, mut zr) = (Vec::with_capacity(singles / 20), Vec::with_capacity(singles / 20));
        let mut fr = Vec::with_capacity(singles / 20);
        for i in 0..singles / 20 {
            if i % 100 == 0 {
                check_interrupted()?;
            }
            er.push(run_xdp(&xdp, &mirror, XDP_REPEAT, XDP_REDIRECT)?.0);
            zr.push(run_xdp(&empty.prog, &mirror, XDP_REPEAT, XDP_PASS)?.0);
            // XDP_PASS only when every lookup succeeded (see `load_xdp_fib`).
            fr.push(run_xdp(&fib.prog, &mirror, XDP_REPEAT, XDP_PASS)?.0);
        }
        Ok(vec![
            ("xdp-empty-1", median(&mut z)),
            ("xdp-established-1", median(&mut e)),
            ("xdp-empty", median(&mut zr)),
            ("xdp-established", median(&mut er)),
            ("xdp-fib", median(&mut fr)),
        ])
    })?
}

/// The IP total length of the Ethernet frame `frame`.
fn ip_len(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[16], frame[17]])
}

/// A `struct bpf_fib_lookup` (64 bytes) for an IPv4 UDP packet of `ip_len` bytes from `src` to `dst` (address,
/// port) arriving on `ifindex`: the fields pfwd's fast path sets (`pfwd-ebpf/src/xdp.rs`), the rest zero.
fn fib_params(ifindex: u32, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), ip_len: u16) -> [u8; 64] {
    let mut p = [0u8; 64];
    p[0] = libc::AF_INET as u8;
    p[1] = libc::IPPROTO_UDP as u8;
    p[2..4].copy_from_slice(&src.1.to_be_bytes());
    p[4..6].copy_from_slice(&dst.1.to_be_bytes());
    p[6..8].copy_from_slice(&ip_len.to_ne_bytes());
    p[8..12].copy_from_slice(&ifindex.to_ne_bytes());
    p[16..20].copy_from_slice(&src.0.octets());
    p[32..36].copy_from_slice(&dst.0.octets());
    p
}

/// The median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The repeated XDP case's rules (X -> Y and Y -> X, on lo) and permanent neighbours for X and Y on eth1, with the
/// MAC lo frames are addressed to; the neighbours are removed on drop (the rules go with the lo instance).
struct MirrorSetup<'a>(&'a Env);

impl<'a> MirrorSetup<'a> {
    fn add(env: &'a Env) -> Result<Self> {
        let guard = MirrorSetup(env);
        let port = MIRROR_PORT.to_string();
        for (d, to) in [(MIRROR_X, MIRROR_Y), (MIRROR_Y, MIRROR_X)] {
            env.lab.sh(
                tests::Node::Router,
                &format!("ip neigh replace {d} lladdr 00:00:00:00:00:00 dev eth1 nud permanent"),
            )?;
            let (d, to) = (d.to_string(), format!("{to}:{MIRROR_PORT}"));
            env.pfwd(&["add", "dnat", "-i", "lo", "-p", "udp", "-d", &d, "--dport", &port, "--to", &to])?;
        }
        Ok(guard)
    }
}

impl Drop for MirrorSetup<'_> {
    fn drop(&mut self) {
        for a in [MIRROR_X, MIRROR_Y] {
            let _ = self.0.lab.sh(tests::Node::Router, &format!("ip neigh del {a} dev eth1"));
        }
    }
}

/// What the handoff saves tc egress: flow A's packet `a` through ingress, then its output through egress with the
/// handoff ingress just left (egress has nothing to do for a settled DNAT flow); and, after the same history, looked
/// up as every forwarded packet was before the handoff: `other`, a packet of the same flow one byte longer, through
/// ingress (the slot then describes it, not `a`'s output), then `a`'s output through egress. Both egress runs follow
/// an ingress run of the flow, so neither finds the egress program's code warmer than the other. The thread stays on
/// one CPU meanwhile, as forwarding does (the slot is per CPU).
fn egress_singles(
    ingress: &SchedClassifier,
    egress: &SchedClassifier,
    (a, other): (&[u8], &[u8]),
    singles: usize,
    [handed_key, lookup_key]: [&'static str; 2],
) -> Result<Vec<(&'static str, f64)>> {
    // SAFETY: plain syscalls on this thread's affinity mask, restored below.
    let saved = unsafe {
        let mut saved: libc::cpu_set_t = std::mem::zeroed();
        ensure!(libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut saved) == 0, "sched_getaffinity");
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(libc::sched_getcpu() as usize, &mut one);
        ensure!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &one) == 0, "sched_setaffinity");
        saved
    };
    let measured = (|| -> Result<(f64, f64)> {
        let (mut handed, mut lookup) = (Vec::with_capacity(singles), Vec::with_capacity(singles));
        for i in 0..singles {
            if i % 1000 == 0 {
                check_interrupted()?;
            }
            let (_, fwd) = run(ingress, a, 1)?;
            handed.push(run(egress, &fwd, 1)?.0);
            run(ingress, other, 1)?;
            lookup.push(run(egress, &fwd, 1)?.0);
        }
        Ok((median(&mut handed), median(&mut lookup)))
    })();
    // SAFETY: as above.
    unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &saved) };
    let (handed, lookup) = measured?;
    Ok(vec![(handed_key, handed), (lookup_key, lookup)])
}

/// (ns per run, output packet).
pub(super) fn run(prog: &SchedClassifier, pkt: &[u8], repeat: u32) -> Result<(f64, Vec<u8>)> {
    let mut out = vec![0u8; 256];
    let r = prog
        .test_run(TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), repeat, ..Default::default() })
        .context("BPF_PROG_TEST_RUN")?;
    ensure!(r.return_value == NEXT, "program returned {} (expected TCX_NEXT)", r.return_value);
    out.truncate(r.data_size_out as usize);
    Ok((r.duration.as_nanos() as f64, out))
}

pub(super) fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    udp_ttl(src, sport, dst, dport, 64)
}

fn udp_ttl(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, ttl: u8) -> Vec<u8> {
    udp_sized(src, sport, dst, dport, ttl, 18)
}

/// A UDP datagram with `payload` bytes.
fn udp_sized(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, ttl: u8, payload: usize) -> Vec<u8> {
    let mut v = vec![];
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), ttl)
        .udp(sport, dport)
        .write(&mut v, &vec![0x41; payload])
        .expect("writing to a Vec");
    v
}

fn udp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    udp6_sized(src, sport, dst, dport, 18)
}

fn udp6_sized(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: usize) -> Vec<u8> {
    let mut v = vec![];
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut v, &vec![0x41; payload])
        .expect("writing to a Vec");
    v
}

fn ips(pkt: &[u8]) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let p = SlicedPacket::from_ethernet(pkt).context("parsing the output packet")?;
    match p.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => Ok((ip.header().source_addr(), ip.header().destination_addr())),
        _ => bail!("output is not IPv4"),
    }
}

pub(super) fn dst_of(pkt: &[u8]) -> Result<Ipv4Addr> {
    Ok(ips(pkt)?.1)
}

fn src_of(pkt: &[u8]) -> Result<Ipv4Addr> {
    Ok(ips(pkt)?.0)
}

fn ips6(pkt: &[u8]) -> Result<(Ipv6Addr, Ipv6Addr)> {
    let p = SlicedPacket::from_ethernet(pkt).context("parsing the output packet")?;
    match p.net {
        Some(etherparse::NetSlice::Ipv6(ip)) => Ok((ip.header().source_addr(), ip.header().destination_addr())),
        _ => bail!("output is not IPv6"),
    }
}

fn dst6_of(pkt: &[u8]) -> Result<Ipv6Addr> {
    Ok(ips6(pkt)?.1)
}

fn src6_of(pkt: &[u8]) -> Result<Ipv6Addr> {
    Ok(ips6(pkt)?.0)
}

/// pfwd attached (eBPF, default sizes) to the router namespace's lo with the test rules (two per family); detached
/// on drop.
struct LoSetup<'a>(&'a Env);

impl<'a> LoSetup<'a> {
    fn attach(env: &'a Env) -> Result<Self> {
        env.pfwd(&["attach", "lo", "--mode", "ebpf"])?;
        let guard = LoSetup(env);
        let (r, s) = (ROUTER.to_string(), SERVER.to_string());
        let (to_s, to_r) = (format!("{s}:{PORT}"), format!("{r}:{PORT}"));
        let port = PORT.to_string();
        // The /32 each IPv6 address is matched by (see CLIENT6).
        let net = |a: Ipv6Addr| format!("{}/32", Ipv6Addr::from(u128::from(a) & !(u128::MAX >> 32)));
        let (r6, s6) = (net(ROUTER6), net(SERVER6));
        let (to_s6, to_r6) = (format!("[{SERVER6}]:{PORT}"), format!("[{ROUTER6}]:{PORT}"));
        for (d, to) in [(&r, &to_s), (&s, &to_r), (&r6, &to_s6), (&s6, &to_r6)] {
            env.pfwd(&["add", "dnat", "-i", "lo", "-p", "udp", "-d", d, "--dport", &port, "--to", to])?;
        }
        Ok(guard)
    }
}

impl Drop for LoSetup<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.pfwd(&["detach"]) {
            eprintln!("    warning: pfwd detach: {e:#}");
        }
    }
}

/// A two-instruction program (`r0 = R; exit`): a classifier returning TCX_NEXT like pfwd's pass path, or an XDP
/// program returning XDP_PASS. Pinned so aya can run it like pfwd's programs; the pin is removed on drop.
pub(super) struct EmptyProg<P> {
    pub(super) prog: P,
    pub(super) pin: PathBuf,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const EXIT: u64 = 0x95;
const BPF_FUNC_REDIRECT_MAP: u64 = 51;
const BPF_FUNC_FIB_LOOKUP: u64 = 69;

/// `mov64 rD, imm` (opcode 0xb7; the destination register in the low nibble of the second byte).
const fn mov_imm(dst: u64, imm: u32) -> u64 {
    0xb7 | (dst << 8) | ((imm as u64) << 32)
}

impl EmptyProg<SchedClassifier> {
    pub(super) fn load() -> Result<Self> {
        // mov64 r0, -1 (opcode 0xb7, imm -1); exit (0x95).
        Self::load_raw(BPF_PROG_TYPE_SCHED_CLS, &[0xffff_ffff_0000_00b7, EXIT], |pin| SchedClassifier::from_pin(pin))
    }
}

impl EmptyProg<Xdp> {
    pub(super) fn load_xdp() -> Result<Self> {
        // mov64 r0, XDP_PASS; exit.
        Self::load_xdp_insns(&[mov_imm(0, XDP_PASS), EXIT])
    }

    /// An XDP program that sends every frame as it is to `ifindex` through the devmap `devmap` (which must hold
    /// it; `bpf_redirect_map`, as pfwd's program does): XDP forwarding without NAT, routing or MAC rewrite, the
    /// floor under any XDP forwarder in this lab.
    pub(super) fn load_xdp_redirect(devmap: std::os::fd::BorrowedFd<'_>, ifindex: u32) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let fd = devmap.as_raw_fd() as u32;
        // r1 = map (ld_imm64, src BPF_PSEUDO_MAP_FD: two slots); r2 = ifindex; r3 = 0; call bpf_redirect_map; exit.
        let ld_map = 0x18 | (1 << 8) | (1 << 12) | (u64::from(fd) << 32);
        let call = 0x85 | (BPF_FUNC_REDIRECT_MAP << 32);
        Self::load_xdp_insns(&[ld_map, 0, mov_imm(2, ifindex), mov_imm(3, 0), call, EXIT])
    }

    /// An XDP program that only looks up the route of `params` (a `struct bpf_fib_lookup`, copied onto its stack
    /// on every run as pfwd's program fills its own) with `bpf_fib_lookup`, flags 0 as pfwd's fast path calls it,
    /// and returns XDP_PASS when the lookup succeeded (XDP_ABORTED otherwise): the floor the FIB puts under the
    /// fast path.
    pub(super) fn load_xdp_fib(params: &[u8; 64]) -> Result<Self> {
        // *(u32 *)(r10 + off) = imm (BPF_ST | BPF_MEM | BPF_W).
        let st_w = |off: i16, imm: u32| 0x62 | (10 << 8) | (u64::from(off as u16) << 16) | (u64::from(imm) << 32);
        let mut insns: Vec<u64> = params
            .chunks_exact(4)
            .enumerate()
            .map(|(i, w)| st_w(-64 + 4 * i as i16, u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
            .collect();
        insns.extend([
            0xbf | (2 << 8) | (10 << 12),                       // r2 = r10 (r1 is still the context)
            0x07 | (2 << 8) | (u64::from(-64i32 as u32) << 32), // r2 += -64
            mov_imm(3, 64),
            mov_imm(4, 0),
            0x85 | (BPF_FUNC_FIB_LOOKUP << 32),
            0x15 | (2 << 16), // if r0 == 0 goto +2
            mov_imm(0, 0),    // XDP_ABORTED
            EXIT,
            mov_imm(0, XDP_PASS),
            EXIT,
        ]);
        Self::load_xdp_insns(&insns)
    }

    fn load_xdp_insns(insns: &[u64]) -> Result<Self> {
        Self::load_raw(BPF_PROG_TYPE_XDP, insns, |pin| Xdp::from_pin(pin, aya_obj::programs::XdpAttachType::Interface))
    }
}

impl<P> EmptyProg<P> {
    fn load_raw(
        prog_type: u32,
        insns: &[u64],
        open: impl FnOnce(&Path) -> Result<P, aya::programs::ProgramError>,
    ) -> Result<Self> {
        let license = c"GPL";
        let mut attr = ProgLoadAttr {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..Default::default()
        };
        attr.prog_name[..10].copy_from_slice(b"pfwd_empty");
        // SAFETY: attr is a valid, fully initialized prefix of bpf_attr; the kernel reads `size` bytes.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &attr as *const _, size_of::<ProgLoadAttr>()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("BPF_PROG_LOAD of the empty classifier");
        }
        // SAFETY: a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // One pin per program loaded by this process (the loads of one run can be alive together).
        static LOADED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LOADED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pin = PathBuf::from(format!("/sys/fs/bpf/pfwd-bench-prog{n}-{}", std::process::id()));
        let path = CString::new(pin.to_str().context("pin path")?)?;
        let attr = ObjPinAttr {
            pathname: path.as_ptr() as u64,
            bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
            ..Default::default()
        };
        // SAFETY: valid attr prefix for BPF_OBJ_PIN.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &attr as *const _, size_of::<ObjPinAttr>()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("pinning the empty classifier");
        }
        match open(&pin) {
            Ok(prog) => Ok(Self { prog, pin }),
            Err(e) => {
                let _ = std::fs::remove_file(&pin);
                Err(e).context("opening the pinned empty classifier")
            }
        }
    }
}

impl<P> Drop for EmptyProg<P> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pin);
    }
}

/// (map name, type, max entries, bytes) of every map pinned in `dir`, via bpftool.
pub fn map_memory(env: &Env, dir: &Path) -> Result<Vec<(String, String, u64, u64)>> {
    let mut maps = vec![];
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.starts_with("prog_") || name.starts_with("link_") {
            continue;
        }
        let out =
            env.lab.sh(tests::Node::Router, &format!("bpftool -j map show pinned {}", dir.join(&name).display()))?;
        let v: serde_json::Value = serde_json::from_str(&out).context("bpftool JSON")?;
        maps.push((
            name,
            v["type"].as_str().unwrap_or("?").to_string(),
            v["max_entries"].as_u64().unwrap_or(0),
            v["bytes_memlock"].as_u64().unwrap_or(0),
        ));
    }
    maps.sort();
    Ok(maps)
}
