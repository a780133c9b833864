//! `cargo xtask bench`: pfwd's eBPF and iptables modes against plain routing, in one run, in the client / router /
//! server namespace lab. Variants run interleaved (A B C A B C ...) so drift on the machine hits all of them alike;
//! the report gives medians, min-max and ratios, and writes `target/bench/latest.{md,json}`.

mod engine;
mod net;
mod prog;
pub(crate) mod run;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::step;
use net::{Env, RuleSet, Variant};

/// Sizes of one bench run.
struct Params {
    reps: usize,
    udp_packets: u64,
    udp_flows: u32,
    rules_extra: u32,
    /// Client threads of the connection-rate workload, each one connection at a time: enough to keep both cores
    /// busy. With 4 the lab was mostly waiting (a profile: 36% idle, pfwd's programs 0.5% of the samples), and
    /// rounds of one variant ranged 2x apart; with 32, 6% idle and rounds within about 15%.
    tcp_threads: usize,
    tcp_secs: u64,
    iperf_secs: u32,
    prog_reps: usize,
    prog_repeat: u32,
    prog_singles: usize,
    /// Live-frames runs (of `net::LIVE_BATCH` frames) per sample.
    live_calls: u32,
    /// Rule-set sizes of the rule engine workload, `pfwd add`s per size, and flows of the backend spread.
    engine_sizes: &'static [u32],
    engine_adds: usize,
    lb_flows: usize,
}

const FULL: Params = Params {
    reps: 5,
    udp_packets: 1_000_000,
    udp_flows: 50_000,
    rules_extra: 9_999,
    tcp_threads: 32,
    tcp_secs: 2,
    iperf_secs: 3,
    prog_reps: 3,
    prog_repeat: 1_000_000,
    prog_singles: 20_000,
    live_calls: 4_000,
    engine_sizes: &[10, 10_000, 100_000],
    engine_adds: 5,
    lb_flows: 100_000,
};

/// Smoke test: every workload once, small.
const QUICK: Params = Params {
    reps: 1,
    udp_packets: 100_000,
    udp_flows: 10_000,
    rules_extra: 9_999,
    tcp_threads: 32,
    tcp_secs: 1,
    iperf_secs: 1,
    prog_reps: 1,
    prog_repeat: 100_000,
    prog_singles: 2_000,
    live_calls: 400,
    engine_sizes: &[10, 10_000, 100_000],
    engine_adds: 3,
    lb_flows: 20_000,
};

/// Source ports of the multi-flow workload start here; the one-flow workload uses a port outside that range.
const SPORT_BASE: u16 = 10_000;
const ONE_FLOW_SPORT: u16 = 7_000;

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
}

/// One workload x variant: its samples.
struct Series {
    group: &'static str,
    title: String,
    variant: &'static str,
    unit: &'static str,
    better: Better,
    samples: Vec<f64>,
}

#[derive(Default)]
struct Results {
    series: Vec<Series>,
    /// Peak RSS of pfwd commands, KiB (max over runs).
    rss: BTreeMap<&'static str, u64>,
    notes: Vec<String>,
}

impl Results {
    fn add(
        &mut self,
        group: &'static str,
        title: &str,
        variant: &'static str,
        unit: &'static str,
        better: Better,
        v: f64,
    ) {
        match self.series.iter_mut().find(|s| s.group == group && s.variant == variant) {
            Some(s) => s.samples.push(v),
            None => {
                self.series.push(Series { group, title: title.to_string(), variant, unit, better, samples: vec![v] })
            }
        }
    }

    fn rss(&mut self, what: &'static str, kib: u64) {
        let e = self.rss.entry(what).or_default();
        *e = (*e).max(kib);
    }

    fn median(&self, group: &str, variant: &str) -> Option<f64> {
        self.series.iter().find(|s| s.group == group && s.variant == variant).map(|s| stats(&s.samples).0)
    }
}

/// (median, min, max).
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    (median, s[0], s[n - 1])
}

pub fn bench(pfwd: &Path, quick: bool) -> Result<()> {
    run::install_signal_handlers();
    let p = if quick { &QUICK } else { &FULL };
    let started = std::time::Instant::now();
    step(&format!("bench: {} run with {}", if quick { "quick" } else { "full" }, pfwd.display()));
    step("bench: creating the client / router / server lab");
    let env = Env::new(pfwd, p.rules_extra)?;
    let mut r = Results::default();

    udp_many(&env, p, &mut r)?;
    udp_one(&env, p, &mut r)?;
    udp_live(&env, p, &mut r)?;
    tcp_rate(&env, p, &mut r)?;
    tcp_throughput(&env, p, &mut r)?;
    import(&env, p, &mut r)?;
    step(&format!(
        "bench: per-packet cost in BPF_PROG_TEST_RUN (repeat {}, {} interleaved runs)",
        p.prog_repeat, p.prog_reps
    ));
    let costs = prog::measure(&env, p.prog_reps, p.prog_repeat, p.prog_singles)?;
    step(&format!(
        "bench: rule engine at {:?} rules ({} adds each), backends over {} flows",
        p.engine_sizes, p.engine_adds, p.lb_flows
    ));
    let engine = engine::measure(&env, p.engine_sizes, p.engine_adds, p.prog_singles, p.lb_flows)?;
    drop(env);

    let machine = machine();
    let (md, json) = report(p, quick, &machine, &r, &costs, &engine, started.elapsed());
    let dir = crate::root().join("target").join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("latest.md"), &md)?;
    std::fs::write(dir.join("latest.json"), serde_json::to_string_pretty(&json)?)?;
    // Run as root through sudo (`cargo xtask bench` as a user): the report is the user's, like the rest of target/.
    crate::sudo::give_back(&[&dir, &dir.join("latest.md"), &dir.join("latest.json")])?;
    println!("\n{md}");
    step(&format!(
        "bench: wrote {} and latest.json ({:.0} s)",
        dir.join("latest.md").display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Rounds of `compare`: each runs both builds once, in ABBA order.
const COMPARE_ROUNDS: usize = 6;
/// Single runs per case and round in `compare`.
const COMPARE_SINGLES: usize = 2_000;

/// `cargo xtask bench --compare OLD`: the per-packet cost in BPF_PROG_TEST_RUN of this build (`new`) beside the pfwd
/// binary `old`, in alternating rounds within one process, each build in a lab of its own. On a shared VM the host's
/// speed drifts between runs by more than most changes move a case, so two separate bench runs cannot tell them
/// apart; paired rounds let the drift fall on both builds alike. Prints each case's medians, the median of the
/// per-round ratios and the number of rounds the new build was faster; writes target/bench/compare.md.
pub fn compare(new: &Path, old: &Path) -> Result<()> {
    run::install_signal_handlers();
    let started = std::time::Instant::now();
    step(&format!("bench: comparing {} with {} ({COMPARE_ROUNDS} paired rounds)", new.display(), old.display()));
    let p = &FULL;
    let envs = [Env::new(new, p.rules_extra)?, Env::new(old, p.rules_extra)?];
    let mut samples: [BTreeMap<&'static str, Vec<f64>>; 2] = Default::default();
    for round in 0..COMPARE_ROUNDS {
        // ABBA: neither build always runs first.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            println!("    round {}/{COMPARE_ROUNDS}: {}", round + 1, if i == 0 { "this build" } else { "OLD" });
            let costs = prog::measure(&envs[i], 1, p.prog_repeat, COMPARE_SINGLES)?;
            for (k, v) in costs.samples {
                samples[i].entry(k).or_default().push(v);
            }
        }
    }
    drop(envs);
    let mut md = format!(
        "# pfwd bench --compare: per-packet cost, this build ({}) against OLD ({})\n\n{COMPARE_ROUNDS} rounds, each \
         running both builds once (ABBA order), in labs of their own; the cases and their methods are those of \
         latest.md's per-packet section (repeat {}, {COMPARE_SINGLES} single runs). Ratio: the median over the rounds of this \
         build's figure over OLD's in the same round; own cost: the same for each build's figure minus its method's \
         empty program in that round (the floors below should stay near 1.00x: if they do not, the two labs \
         differ by more than pfwd and the own-cost column is the one to read). Took {:.0} s.\n\n| Case | this build \
         (ns, median) | OLD (ns, median) | this / OLD | own cost, this / OLD | rounds faster |\n\
         |---|---:|---:|---:|---:|---:|\n",
        new.display(),
        old.display(),
        p.prog_repeat,
        started.elapsed().as_secs_f64()
    );
    for (key, label) in prog::CASES {
        let (Some(a), Some(b)) = (samples[0].get(key), samples[1].get(key)) else { continue };
        let per_round = |f: &dyn Fn(usize, f64, f64) -> Option<f64>| -> String {
            let r: Vec<f64> = a.iter().zip(b).enumerate().filter_map(|(i, (a, b))| f(i, *a, *b)).collect();
            if r.is_empty() { "-".to_string() } else { format!("{:.2}x", stats(&r).0) }
        };
        let ratio = per_round(&|_, a, b| (b > 0.0).then(|| a / b));
        // Each build's own cost: the case minus its method's empty program in the same round (the floor is the
        // test run's own overhead, which moves with the host, not with pfwd).
        let floor = prog::floor_of(key);
        let own = match (floor, samples[0].get(floor), samples[1].get(floor)) {
            (f, Some(fa), Some(fb)) if f != *key => per_round(&|i, a, b| {
                let (oa, ob) = (a - fa.get(i)?, b - fb.get(i)?);
                (ob > 0.0).then(|| oa / ob)
            }),
            _ => "-".to_string(),
        };
        let faster = a.iter().zip(b).filter(|(a, b)| a < b).count();
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {ratio} | {own} | {faster} of {} |",
            label.replace(" R", &format!(" {}", p.prog_repeat)),
            stats(a).0,
            stats(b).0,
            a.len().min(b.len())
        );
    }
    let dir = crate::root().join("target").join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("compare.md"), &md)?;
    crate::sudo::give_back(&[&dir, &dir.join("compare.md")])?;
    println!("\n{md}");
    step(&format!("bench: wrote {}", dir.join("compare.md").display()));
    Ok(())
}

fn fmt_n(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 && c.is_ascii_digit() {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The UDP workloads' group and title for `v`: IPv6 variants have their own (their frames are 20 B longer).
fn udp_group<'t>(v: Variant, groups: [&'static str; 2], titles: &'t [String; 2]) -> (&'static str, &'t str) {
    let i = usize::from(v.ipv6());
    (groups[i], &titles[i])
}

/// Workloads 1 and 5: UDP over many flows, with 1 and with 10,000 rules; also the install times. And the 1-rule
/// figures over IPv6 (plain routing and eBPF mode), interleaved with the others.
fn udp_many(env: &Env, p: &Params, r: &mut Results) -> Result<()> {
    let what = format!("{} flows, {} packets", fmt_n(p.udp_flows.into()), fmt_n(p.udp_packets as f64));
    let titles = [format!("UDP 60 B, {what}"), format!("UDP/IPv6 80 B (same payload), {what}")];
    step(&format!("bench: UDP, {what}, IPv4 and IPv6 (workloads 1 and 5), {} rounds", p.reps));
    let variants = [
        Variant::Plain,
        Variant::PlainTc,
        Variant::Iptables,
        Variant::Ebpf,
        Variant::EbpfFast,
        Variant::EbpfXdp,
        Variant::Nft,
        Variant::Iptables10k,
        Variant::Ebpf10k,
        Variant::Nft10k,
        Variant::Plain6,
        Variant::Ebpf6,
    ];
    for rep in 0..p.reps {
        for v in variants {
            let setup = env.setup(v, RuleSet::Udp)?;
            if let Some(a) = setup.attach.as_ref().filter(|_| !v.ipv6()) {
                let ms = a.wall.as_secs_f64() * 1e3;
                let (group, what, rss) = match v {
                    Variant::Iptables10k => ("install", "10k", "attach --config 10k rules (iptables)"),
                    Variant::Ebpf10k => ("install", "10k", "attach --config 10k rules (eBPF)"),
                    Variant::Nft10k => ("install", "10k", "attach --config 10k rules (nft)"),
                    Variant::Nft => ("attach1", "1", "attach, 1 rule (nft)"),
                    Variant::Ebpf => ("attach1", "1", "attach, 1 rule (eBPF)"),
                    Variant::EbpfFast => ("attach1-ff", "1", "attach, 1 rule (eBPF, --fast-forward)"),
                    Variant::EbpfXdp => ("attach1-xdp", "1", "attach, 1 rule (eBPF, --xdp)"),
                    _ => ("attach1", "1", "attach, 1 rule (iptables)"),
                };
                let key = v.mode().unwrap_or("?");
                let t = if what == "10k" {
                    format!("pfwd attach --config, {} rules (wall)", p.rules_extra + 1)
                } else {
                    "pfwd attach --config, 1 rule (wall)".to_string()
                };
                r.add(group, &t, key, "ms", Better::Lower, ms);
                r.rss(rss, a.maxrss_kib);
            }
            if rep == 0 && v == Variant::Iptables10k {
                let tail = env.lab.sh(tests::Node::Router, "iptables -t nat -S PFWD-PREROUTING | tail -n 2")?;
                let last = tail.lines().last().unwrap_or("").to_string();
                r.notes.push(format!("iptables order check, last rule of PFWD-PREROUTING: `{last}`"));
                if !last.contains(&format!("--dport {}", net::UDP_PORT)) {
                    eprintln!("    warning: the matching rule is not last in PFWD-PREROUTING: {last}");
                }
            }
            if rep == 0 && v == Variant::Ebpf10k {
                let st = env.pfwd(&["status", "--json"])?;
                r.rss("status --json, 10k rules (eBPF)", st.maxrss_kib);
            }
            let (pps, sent, delivered) = env.udp(v.target(), p.udp_flows, p.udp_packets, SPORT_BASE)?;
            drop(setup);
            println!(
                "    [{}/{}] {:<13} {:>10} pps  (delivered {}/{}{})",
                rep + 1,
                p.reps,
                v.key(),
                fmt_n(pps),
                fmt_n(delivered as f64),
                fmt_n(sent as f64),
                if delivered * 10 < sent * 9 { ", LOSSY" } else { "" }
            );
            let (group, title) = udp_group(v, ["udp-many", "udp-many6"], &titles);
            r.add(group, title, v.key(), "pps", Better::Higher, pps);
        }
    }
    Ok(())
}

/// Workload 2: the same with one flow, IPv4 and IPv6.
fn udp_one(env: &Env, p: &Params, r: &mut Results) -> Result<()> {
    let what = format!("1 flow, {} packets", fmt_n(p.udp_packets as f64));
    let titles = [format!("UDP 60 B, {what}"), format!("UDP/IPv6 80 B (same payload), {what}")];
    step(&format!("bench: UDP, {what}, IPv4 and IPv6 (workload 2), {} rounds", p.reps));
    for rep in 0..p.reps {
        for v in [
            Variant::Plain,
            Variant::PlainTc,
            Variant::Iptables,
            Variant::Ebpf,
            Variant::EbpfFast,
            Variant::EbpfXdp,
            Variant::Plain6,
            Variant::Ebpf6,
        ] {
            let setup = env.setup(v, RuleSet::Udp)?;
            let (pps, sent, delivered) = env.udp(v.target(), 1, p.udp_packets, ONE_FLOW_SPORT)?;
            drop(setup);
            println!(
                "    [{}/{}] {:<13} {:>10} pps  (delivered {}/{})",
                rep + 1,
                p.reps,
                v.key(),
                fmt_n(pps),
                fmt_n(delivered as f64),
                fmt_n(sent as f64)
            );
            let (group, title) = udp_group(v, ["udp-one", "udp-one6"], &titles);
            r.add(group, title, v.key(), "pps", Better::Higher, pps);
        }
    }
    Ok(())
}

/// Workload 2b: frames from the kernel's own generator (XDP live frames: BPF_PROG_TEST_RUN with
/// BPF_F_TEST_XDP_LIVE_FRAMES, as xdp-trafficgen uses it) injected at the router's eth0 as if its driver had received
/// them. Plain routing and pfwd's tc path get them from an XDP program that passes them to the stack (XDP_PASS);
/// `--xdp` through pfwd's XDP program, which forwards them itself; and, as the floor of XDP forwarding in this lab,
/// a bare XDP program that redirects them untouched through pfwd's devmap (those frames are addressed to the
/// server's MAC and IP, so the server receives them as it does the others). The same generator and runs for all: what
/// differs is what happens to a frame after the driver.
///
/// A test run of a program that is not attached anywhere adds it to the kernel's XDP dispatcher and removes it
/// again, each an RCU grace period (measured: 24 ms per run); pfwd's program is attached, so the baselines are
/// attached too, in native mode to an idle veth of the router namespace ([`XdpParking`]).
fn udp_live(env: &Env, p: &Params, r: &mut Results) -> Result<()> {
    let frames = u64::from(p.live_calls) * u64::from(net::LIVE_BATCH);
    let title = format!("UDP 60 B, 1 flow, {} XDP live frames at the router's eth0", fmt_n(frames as f64));
    step(&format!("bench: {title} (workload 2b), {} rounds", p.reps));
    // SAFETY: a NUL-terminated name.
    let eth1 = env.lab.in_ns(tests::Node::Router, || unsafe { libc::if_nametoindex(c"eth1".as_ptr()) })?;
    anyhow::ensure!(eth1 != 0, "no eth1 in the router namespace");
    let park = XdpParking::new(env)?;
    let pass = prog::EmptyProg::load_xdp()?;
    park.attach(XdpParking::DEV, &pass.pin)?;
    for rep in 0..p.reps {
        for key in ["plain", "ebpf", "ebpf-xdp", "xdp-redirect"] {
            let v = match key {
                "plain" => Variant::Plain,
                "ebpf" => Variant::Ebpf,
                _ => Variant::EbpfXdp,
            };
            let setup = env.setup(v, RuleSet::Udp)?;
            let dst = if v == Variant::Plain || key == "xdp-redirect" { net::SERVER } else { net::ROUTER_IN };
            let (pps, sent, delivered) = match key {
                "ebpf-xdp" => {
                    let prog = aya::programs::Xdp::from_pin(
                        env.pin_dir().join("prog_xdp"),
                        aya_obj::programs::XdpAttachType::Interface,
                    )
                    .context("pinned prog_xdp")?;
                    env.udp_live(&prog, dst, p.live_calls, false)?
                }
                "xdp-redirect" => {
                    let devmap = aya::maps::MapData::from_pin(env.pin_dir().join("PFWD_XDP_TX"))
                        .context("pinned PFWD_XDP_TX")?;
                    let bare = prog::EmptyProg::load_xdp_redirect(std::os::fd::AsFd::as_fd(devmap.fd()), eth1)?;
                    park.attach(XdpParking::PEER, &bare.pin)?;
                    env.udp_live(&bare.prog, dst, p.live_calls, true)?
                }
                _ => env.udp_live(&pass.prog, dst, p.live_calls, false)?,
            };
            drop(setup);
            println!(
                "    [{}/{}] {:<13} {:>10} pps  (delivered {}/{}{})",
                rep + 1,
                p.reps,
                key,
                fmt_n(pps),
                fmt_n(delivered as f64),
                fmt_n(sent as f64),
                if delivered * 10 < sent * 9 { ", LOSSY" } else { "" }
            );
            r.add("udp-live", &title, key, "pps", Better::Higher, pps);
        }
    }
    Ok(())
}

/// An idle veth pair in the router namespace that XDP programs are attached to (natively, one per end) only so
/// that test runs of them skip the dispatcher update (see [`udp_live`]); removed on drop, with the programs'
/// attachments. No traffic ever crosses it.
pub(crate) struct XdpParking<'e> {
    env: &'e Env,
}

impl<'e> XdpParking<'e> {
    pub(crate) const DEV: &'static str = "xdppark0";
    const PEER: &'static str = "xdppark1";

    pub(crate) fn new(env: &'e Env) -> Result<Self> {
        env.lab.sh(tests::Node::Router, &format!("ip link add {} type veth peer name {}", Self::DEV, Self::PEER))?;
        Ok(XdpParking { env })
    }

    /// Attaches the program pinned at `pin` natively to `dev` (one of the pair), replacing the one there.
    pub(crate) fn attach(&self, dev: &str, pin: &Path) -> Result<()> {
        self.env
            .lab
            .sh(tests::Node::Router, &format!("ip -force link set dev {dev} xdpdrv pinned {}", pin.display()))
            .with_context(|| format!("attaching a baseline XDP program to {dev}"))?;
        Ok(())
    }
}

impl Drop for XdpParking<'_> {
    fn drop(&mut self) {
        let _ = self.env.lab.sh(tests::Node::Router, &format!("ip link del {}", Self::DEV));
    }
}

/// Workload 3: TCP connection rate.
fn tcp_rate(env: &Env, p: &Params, r: &mut Results) -> Result<()> {
    let title = format!("TCP connect + 1 B request + 1 B reply + close, {} threads, {} s", p.tcp_threads, p.tcp_secs);
    step(&format!("bench: {title} (workload 3), {} rounds", p.reps));
    for rep in 0..p.reps {
        for v in [Variant::Plain, Variant::Iptables, Variant::Ebpf, Variant::EbpfFast] {
            let setup = env.setup(v, RuleSet::Tcp)?;
            let cps = env.tcp_rate(v.target(), p.tcp_threads, Duration::from_secs(p.tcp_secs))?;
            drop(setup);
            println!("    [{}/{}] {:<13} {:>10} conn/s", rep + 1, p.reps, v.key(), fmt_n(cps));
            r.add("tcp-cps", &title, v.key(), "conn/s", Better::Higher, cps);
        }
    }
    Ok(())
}

/// Workload 4: TCP throughput with iperf3, one and four streams.
fn tcp_throughput(env: &Env, p: &Params, r: &mut Results) -> Result<()> {
    step(&format!(
        "bench: TCP throughput, iperf3 -t {} with -P 1 and -P 4 (workload 4), {} rounds",
        p.iperf_secs, p.reps
    ));
    for rep in 0..p.reps {
        for v in [Variant::Plain, Variant::Iptables, Variant::Ebpf, Variant::EbpfFast] {
            let setup = env.setup(v, RuleSet::Tcp)?;
            let one = env.iperf(v.target(), 1, p.iperf_secs)?;
            let four = env.iperf(v.target(), 4, p.iperf_secs)?;
            drop(setup);
            println!(
                "    [{}/{}] {:<13} {:>6.2} Gbit/s (1 stream) {:>6.2} Gbit/s (4 streams)",
                rep + 1,
                p.reps,
                v.key(),
                one,
                four
            );
            let t1 = format!("TCP throughput, 1 stream (iperf3 -t {})", p.iperf_secs);
            let t4 = format!("TCP throughput, 4 streams (iperf3 -t {} -P 4)", p.iperf_secs);
            r.add("tcp-1", &t1, v.key(), "Gbit/s", Better::Higher, one);
            r.add("tcp-4", &t4, v.key(), "Gbit/s", Better::Higher, four);
        }
    }
    Ok(())
}

/// Workload 5, install time the other way: `pfwd import` of the 9,999 extra rules onto an attached instance.
fn import(env: &Env, p: &Params, r: &mut Results) -> Result<()> {
    let title = format!("pfwd import of {} rules onto a 1-rule instance (wall)", p.rules_extra);
    step(&format!("bench: {title}, {} rounds", p.reps));
    let file = env.tmp.join("import.rules");
    let file = file.to_str().context("temp path is not UTF-8")?;
    for rep in 0..p.reps {
        for v in [Variant::Iptables, Variant::Ebpf, Variant::Nft] {
            let _setup = env.setup(v, RuleSet::Udp)?;
            // One `pfwd add` onto the 1-rule instance, then onto the 10,000 rules, then with one full-range rule
            // among them: what a rule change costs as the rule set grows (issue 14: it should not).
            fn add(port: &str) -> [&str; 10] {
                ["add", "dnat", "-i", "eth0", "-p", "tcp", "--dport", port, "--to", "10.0.2.2:9000"]
            }
            let small = env.pfwd(&add("7"))?.wall.as_secs_f64() * 1e3;
            let out = env.pfwd(&["import", file])?;
            let ms = out.wall.as_secs_f64() * 1e3;
            let big = env.pfwd(&add("8"))?.wall.as_secs_f64() * 1e3;
            env.pfwd(&["add", "dnat", "-i", "eth1", "-p", "udp", "--dport", "1-65535", "--to", "10.0.2.3"])?;
            let full = env.pfwd(&add("9"))?.wall.as_secs_f64() * 1e3;
            println!(
                "    [{}/{}] {:<13} {:>8.1} ms (add: {small:.1} ms onto 2 rules, {big:.1} ms onto {}, {full:.1} ms with a \
                 full-range rule)",
                rep + 1,
                p.reps,
                v.key(),
                ms,
                p.rules_extra + 2
            );
            r.add("import", &title, v.key(), "ms", Better::Lower, ms);
            r.add("add-small", "pfwd add of one rule onto 2 rules (wall)", v.key(), "ms", Better::Lower, small);
            let t = format!("pfwd add of one rule onto {} rules (wall)", p.rules_extra + 2);
            r.add("add-big", &t, v.key(), "ms", Better::Lower, big);
            let t =
                format!("pfwd add of one rule onto {} rules, one of them --dport 1-65535 (wall)", p.rules_extra + 4);
            r.add("add-full-range", &t, v.key(), "ms", Better::Lower, full);
            r.rss(
                match v {
                    Variant::Ebpf => "import 9,999 rules (eBPF)",
                    Variant::Nft => "import 9,999 rules (nft)",
                    _ => "import 9,999 rules (iptables)",
                },
                out.maxrss_kib,
            );
        }
    }
    Ok(())
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let date = std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output().ok();
    let date = date.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    json!({ "cpu": cpu, "cpus": cpus, "kernel": kernel, "date": date })
}

/// A target line: (what, measured text, met, shortfall text).
struct Target {
    what: String,
    measured: String,
    verdict: String,
}

/// `t` with the control beside its figure: plain routing with empty tc programs at pfwd's hooks, against plain
/// routing (`Variant::PlainTc`), the most any tc-hook design can reach in this lab.
fn with_tc_floor(mut t: Target, floor: Option<f64>) -> Target {
    if let Some(f) = floor {
        t.measured = format!("{} (empty tc programs at the same hooks: {f:.2}x)", t.measured);
    }
    t
}

/// `value` must be >= `min` (ratios).
fn at_least(what: &str, value: Option<f64>, min: f64) -> Target {
    match value {
        None => Target { what: what.into(), measured: "n/a".into(), verdict: "not measured".into() },
        Some(v) => Target {
            what: what.into(),
            measured: format!("{v:.2}x"),
            verdict: if v >= min {
                "met".into()
            } else {
                format!("MISSED by {:.2}x ({:.0}% short)", min - v, (min - v) / min * 100.0)
            },
        },
    }
}

fn report(
    p: &Params,
    quick: bool,
    machine: &Value,
    r: &Results,
    costs: &prog::ProgCosts,
    engine: &engine::EngineResults,
    took: Duration,
) -> (String, Value) {
    let mut md = String::new();
    let _ =
        writeln!(md, "# pfwd bench ({})\n", if quick { "quick: smoke-test sizes, not for comparison" } else { "full" });
    let _ = writeln!(
        md,
        "Machine: {} ({} CPUs), kernel {}, {}. Took {:.0} s.\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["date"].as_str().unwrap_or(""),
        took.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "Lab: client 10.0.1.2 <- veth -> router <- veth -> server, offloads off, permanent neighbours. Variants run \
         interleaved, {} round(s), each run on a fresh setup (attach ... detach, conntrack flushed). plain = router \
         with ip_forward=1, no NAT, no netfilter, client sends to 10.0.2.2; plain-tc = the same with an empty tcx \
         program (TCX_NEXT) at eth0 and eth1, ingress and egress, where pfwd attaches its own; iptables / ebpf = \
         `pfwd attach eth0 eth1 --mode iptables|ebpf` with DNAT 10.0.1.1 -> 10.0.2.2. UDP: trafgen (1 process) in the client, packets counted \
         at the server's eth0 (rx_packets) over the delivery window; a bound, unread UDP socket absorbs them. -10k = \
         9,999 non-matching `-i eth0 -p udp --dport 20000+i` rules ahead of the matching one (iptables order: \
         matching rule last). plain6 / ebpf6: the same over IPv6 in the dual-stack lab (client 2001:db8:1::2; plain6 \
         sends to 2001:db8:2::2, ebpf6 to 2001:db8:1::1 with DNAT to [2001:db8:2::2]:9000), \
         80 B frames (the same 18 B UDP payload), IPv6 forwarding on in the router for the whole run; their x plain is \
         against plain6.\n",
        p.reps
    );
    let _ = writeln!(md, "| Workload | Variant | Median | Min - max | x iptables | x plain | Runs |");
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|");
    let mut series_json = vec![];
    // Workloads in order, variants in run order within each.
    const ORDER: [&str; 10] =
        ["udp-many", "udp-many6", "udp-one", "udp-one6", "tcp-cps", "tcp-1", "tcp-4", "attach1", "install", "import"];
    let mut ordered: Vec<&Series> = r.series.iter().collect();
    ordered.sort_by_key(|s| ORDER.iter().position(|g| *g == s.group).unwrap_or(ORDER.len()));
    for s in ordered {
        let (med, min, max) = stats(&s.samples);
        let ipt_key = if s.variant.ends_with("-10k") { "iptables-10k" } else { "iptables" };
        let vs_ipt = r.median(s.group, ipt_key).filter(|&b| b > 0.0).map(|b| med / b);
        let plain_key = if s.variant.ends_with('6') { "plain6" } else { "plain" };
        let vs_plain = r.median(s.group, plain_key).filter(|&b| b > 0.0).map(|b| med / b);
        let ratio = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}x"));
        let num = |x: f64| if s.unit == "Gbit/s" || s.unit == "ms" { format!("{x:.2}") } else { fmt_n(x) };
        let better = if s.better == Better::Lower { " (lower is better)" } else { "" };
        let _ = writeln!(
            md,
            "| {}{} | {} | {} {} | {} - {} | {} | {} | {} |",
            s.title,
            better,
            s.variant,
            num(med),
            s.unit,
            num(min),
            num(max),
            ratio(vs_ipt),
            ratio(vs_plain),
            s.samples.len()
        );
        series_json.push(json!({
            "group": s.group, "workload": s.title, "variant": s.variant, "unit": s.unit,
            "higher_is_better": s.better == Better::Higher, "samples": s.samples,
            "median": med, "min": min, "max": max, "ratio_to_iptables": vs_ipt, "ratio_to_plain": vs_plain,
        }));
    }

    // The UDP workloads over IPv6 against IPv4.
    let mut udp6_json = serde_json::Map::new();
    let mut shown = vec![];
    for (g4, g6, what) in [("udp-many", "udp-many6", "many flows"), ("udp-one", "udp-one6", "1 flow")] {
        let ratio = |a: &str, b: &str| Some(r.median(g6, a)? / r.median(g4, b).filter(|&v| v > 0.0)?);
        let (ebpf, plain) = (ratio("ebpf6", "ebpf"), ratio("plain6", "plain"));
        if let Some(e) = ebpf {
            let p = plain.map_or(String::new(), |p| format!(" (plain6 / plain {p:.2}x)"));
            shown.push(format!("{what}: ebpf6 / ebpf {e:.2}x{p}"));
        }
        udp6_json.insert(g4.into(), json!({"ebpf6_over_ebpf": ebpf, "plain6_over_plain": plain}));
    }
    if !shown.is_empty() {
        let _ = writeln!(md, "\nUDP over IPv6 against IPv4 (pps medians): {}.", shown.join("; "));
    }

    // Workload 6.
    let mut by_case: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (k, v) in &costs.samples {
        by_case.entry(k).or_default().push(*v);
    }
    let med = |k: &str| by_case.get(k).map(|v| stats(v).0);
    let _ = writeln!(
        md,
        "\n## Per-packet cost in BPF_PROG_TEST_RUN (R = {}, S = {})\n\nRepeat R: the kernel reruns the program on \
         the packet it rewrote, so two mirror rules (10.0.1.1:9000 -> 10.0.2.2:9000 and back) make each repetition an \
         established-flow DNAT (reply: un-DNAT) of the other flow; an odd R is checked to end translated. Established \
         flows have seen a reply (confirmed); the first-round-trip pair has not. A new flow \
         cannot repeat (the second run is established), so it is the median of S single runs (repeat=1), each from a \
         new source port; compare it with the empty program measured the same way (that floor includes the test-run \
         timer overhead). IPv6 rows (6): the same cases over IPv6, interleaved with the IPv4 ones, with the mirror \
         rules 3fff:1::/32 -> [3fff:2::2]:9000 and 3fff:2::/32 -> [3fff:1::1]:9000 (/32 destinations: the IPv4 rules' \
         class, so either family's rule walk probes one class, as before IPv6).\n",
        p.prog_repeat, p.prog_singles
    );
    let _ = writeln!(md, "| Case | ns/packet (median) | Min - max | x empty (same method) |");
    let _ = writeln!(md, "|---|---:|---:|---:|");
    let mut prog_json = vec![];
    for (key, label) in prog::CASES {
        let Some(v) = by_case.get(key) else { continue };
        let (m, lo, hi) = stats(v);
        let floor = med(prog::floor_of(key));
        let x = floor.filter(|&f| f > 0.0).map_or("-".into(), |f| format!("{:.2}x", m / f));
        let _ = writeln!(
            md,
            "| {} | {m:.1} | {lo:.1} - {hi:.1} | {x} |",
            label.replace(" R", &format!(" {}", p.prog_repeat))
        );
        prog_json.push(json!({"case": key, "label": label, "samples": v, "median_ns": m}));
    }
    // IPv6 against IPv4, case by case (same method, same run).
    let family_ratio = |k4: &str, k6: &str| Some(med(k6)? / med(k4).filter(|&v| v > 0.0)?);
    let mut v6_json = serde_json::Map::new();
    let mut shown = vec![];
    for (k4, k6) in prog::FAMILY_PAIRS {
        if let Some(x) = family_ratio(k4, k6) {
            shown.push(format!("{k4} {x:.2}x"));
            v6_json.insert(k4.into(), json!(x));
        }
    }
    if !shown.is_empty() {
        let _ = writeln!(md, "\nIPv6 / IPv4 (each IPv6 case's median over its IPv4 one's): {}.", shown.join(", "));
    }
    for n in &costs.notes {
        let _ = writeln!(md, "\n`{n}`");
    }

    let engine_json = engine.report(&mut md);

    // Memory.
    let _ = writeln!(md, "\n## Memory\n\n| What | Size |\n|---|---:|");
    let total: u64 = costs.maps.iter().map(|m| m.3).sum();
    for (name, ty, entries, bytes) in &costs.maps {
        let _ = writeln!(
            md,
            "| map {name} ({ty}, {} entries) | {:.1} MiB |",
            fmt_n(*entries as f64),
            *bytes as f64 / 1048576.0
        );
    }
    let _ = writeln!(
        md,
        "| **all maps, default sizes (bpftool bytes_memlock)** | **{:.1} MiB** |",
        total as f64 / 1048576.0
    );
    for (what, kib) in &r.rss {
        let _ = writeln!(md, "| peak RSS: pfwd {what} | {:.1} MiB |", *kib as f64 / 1024.0);
    }

    // Targets.
    let ratio = |g: &str, a: &str, b: &str| Some(r.median(g, a)? / r.median(g, b)?);
    let mut targets = vec![
        with_tc_floor(
            at_least("UDP many flows: eBPF >= 0.9x plain routing", ratio("udp-many", "ebpf", "plain"), 0.9),
            ratio("udp-many", "plain-tc", "plain"),
        ),
        at_least(
            "UDP many flows: eBPF well ahead of iptables (read as >= 1.2x)",
            ratio("udp-many", "ebpf", "iptables"),
            1.2,
        ),
        at_least(
            "UDP many flows: eBPF --fast-forward >= 0.9x plain routing",
            ratio("udp-many", "ebpf-ff", "plain"),
            0.9,
        ),
        at_least("10k rules: eBPF >= 0.9x its own 1-rule figure", ratio("udp-many", "ebpf-10k", "ebpf"), 0.9),
        at_least("10k rules: eBPF >= 5x iptables mode (10k rules)", ratio("udp-many", "ebpf-10k", "iptables-10k"), 5.0),
        // Issue 13: a fallback whose cost does not grow with the rules (iptables' own figure is in the table).
        at_least("10k rules: nft >= 0.5x its own 1-rule figure", ratio("udp-many", "nft-10k", "nft"), 0.5),
        // Issue 13's forwarding targets, where they differ from the ones above.
        at_least("UDP many flows: eBPF >= 1.25x iptables (issue 13)", ratio("udp-many", "ebpf", "iptables"), 1.25),
        with_tc_floor(
            at_least("UDP one flow: eBPF >= 0.95x plain routing (issue 13)", ratio("udp-one", "ebpf", "plain"), 0.95),
            ratio("udp-one", "plain-tc", "plain"),
        ),
        at_least(
            "UDP many flows: eBPF --fast-forward >= 1.0x plain routing (issue 13)",
            ratio("udp-many", "ebpf-ff", "plain"),
            1.0,
        ),
        at_least(
            "UDP many flows: eBPF --xdp >= 1.0x plain routing (issue 13)",
            ratio("udp-many", "ebpf-xdp", "plain"),
            1.0,
        ),
        at_least("UDP one flow: eBPF --xdp >= 1.0x plain routing", ratio("udp-one", "ebpf-xdp", "plain"), 1.0),
        at_least(
            "XDP live frames: eBPF --xdp >= 1.0x plain routing (issue 13: frames as a driver hands them over)",
            ratio("udp-live", "ebpf-xdp", "plain"),
            1.0,
        ),
    ];
    // Issue 13's install targets: 10,000 rules in < 100 ms (eBPF) and < 1 s (iptables), attach and import alike.
    for (mode, label, limit) in [("ebpf", "eBPF", 100.0), ("iptables", "iptables", 1000.0), ("nft", "nft", 1000.0)] {
        let under = |what: String, ms: Option<f64>, whole: Option<f64>| match ms {
            Some(ms) => Target {
                what,
                measured: match whole {
                    Some(f) => format!("{ms:.0} ms (whole attach {f:.0} ms)"),
                    None => format!("{ms:.0} ms"),
                },
                verdict: if ms < limit { "met".into() } else { format!("MISSED by {:.0} ms", ms - limit) },
            },
            None => Target { what, measured: "n/a".into(), verdict: "not measured".into() },
        };
        let (full, one) = (r.median("install", mode), r.median("attach1", mode));
        targets.push(under(
            format!("10k rules installed in < {limit:.0} ms, {label} mode (attach --config 10k minus attach 1 rule)"),
            full.zip(one).map(|(f, o)| f - o),
            full,
        ));
        targets.push(under(
            format!("10k rules imported in < {limit:.0} ms, {label} mode (pfwd import of 9,999 rules)"),
            r.median("import", mode),
            None,
        ));
    }
    // Beside each: plain routing's own ratio, the ceiling of any NAT in this lab (the sockets' work is most of a
    // connection's cost here).
    let ceiling = ratio("tcp-cps", "plain", "iptables");
    for (what, variant) in [
        ("TCP connection rate: eBPF >= 1.3x iptables", "ebpf"),
        ("TCP connection rate: eBPF --fast-forward >= 1.3x iptables", "ebpf-ff"),
    ] {
        let mut t = at_least(what, ratio("tcp-cps", variant, "iptables"), 1.3);
        if let Some(c) = ceiling {
            t.measured = format!("{} (plain routing: {c:.2}x)", t.measured);
        }
        targets.push(t);
    }
    targets.push(at_least(
        "TCP throughput, 1 stream: eBPF no worse than iptables (>= 0.97x, run-to-run noise)",
        ratio("tcp-1", "ebpf", "iptables"),
        0.97,
    ));
    targets.push(at_least(
        "TCP throughput, 4 streams: eBPF no worse than iptables (>= 0.97x, run-to-run noise)",
        ratio("tcp-4", "ebpf", "iptables"),
        0.97,
    ));
    let est = med("established").zip(med("empty")).map(|(e, z)| e / z);
    targets.push(match est {
        Some(x) => Target {
            what: format!("established flow <= 3x the empty program (repeat {})", p.prog_repeat),
            measured: format!(
                "{x:.2}x ({:.1} vs {:.1} ns)",
                med("established").unwrap_or(0.0),
                med("empty").unwrap_or(0.0)
            ),
            verdict: if x <= 3.0 { "met".into() } else { format!("MISSED by {:.2}x", x - 3.0) },
        },
        None => Target {
            what: "established flow <= 3x empty".into(),
            measured: "n/a".into(),
            verdict: "not measured".into(),
        },
    });
    // Issue 13: the XDP established path's own cost, the empty XDP program's taken off (the test run's own
    // overhead), measured as the tc cases are: repeated runs (warm, the syscall spread over them). The single runs'
    // figure, which carries a cold call each time, is shown beside it.
    // Beside it, what the FIB lookup alone costs, measured the same way: the part of the path that is the kernel's.
    let single = med("xdp-established-1").zip(med("xdp-empty-1")).map(|(e, z)| e - z);
    let fib = med("xdp-fib").zip(med("xdp-empty")).map(|(f, z)| f - z);
    targets.push(match med("xdp-established").zip(med("xdp-empty")) {
        Some((e, z)) => Target {
            what: "XDP established path <= 25 ns (issue 13; repeat 200, minus the empty XDP program's)".into(),
            measured: format!(
                "{:.1} ns ({e:.1} - {z:.1}; single runs: {}; the FIB lookup alone, measured the same way: {})",
                e - z,
                single.map_or("n/a".into(), |s| format!("{s:.1} ns")),
                fib.map_or("n/a".into(), |f| format!("{f:.1} ns"))
            ),
            verdict: if e - z <= 25.0 { "met".into() } else { format!("MISSED by {:.1} ns", e - z - 25.0) },
        },
        None => Target {
            what: "XDP established path <= 25 ns (issue 13)".into(),
            measured: "n/a".into(),
            verdict: "not measured".into(),
        },
    });
    // The IPv6 issue: IPv4's per-packet cost grows by at most 10%. That compares with a pre-IPv6 build, which this
    // run cannot measure: the figures are here for that comparison.
    let v4 = ["no-rule", "established", "reply"].map(|k| med(k).map_or("n/a".into(), |v| format!("{k} {v:.1} ns")));
    targets.push(Target {
        what: "IPv4 does not pay for IPv6: no-rule, established, reply <= 1.1x a pre-IPv6 build's".into(),
        measured: v4.join(", "),
        verdict: "compare with a pre-IPv6 run (not measurable in one run)".into(),
    });
    for (what, measured, met) in engine.targets() {
        let verdict = if met { "met".into() } else { "MISSED".into() };
        targets.push(Target { what, measured, verdict });
    }
    let _ = writeln!(md, "\n## Targets\n\n| Target | Measured | Result |\n|---|---|---|");
    for t in &targets {
        let _ = writeln!(md, "| {} | {} | {} |", t.what, t.measured, t.verdict);
    }
    if !r.notes.is_empty() {
        let _ = writeln!(md);
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
    }

    let json = json!({
        "quick": quick,
        "machine": machine,
        "params": {
            "reps": p.reps, "udp_packets": p.udp_packets, "udp_flows": p.udp_flows, "rules": p.rules_extra + 1,
            "tcp_threads": p.tcp_threads, "tcp_secs": p.tcp_secs, "iperf_secs": p.iperf_secs,
            "prog_repeat": p.prog_repeat, "prog_singles": p.prog_singles,
        },
        "series": series_json,
        "prog_test_run": prog_json,
        "ipv6_over_ipv4": {"prog_test_run": v6_json, "udp": udp6_json},
        "rule_engine": engine_json,
        "maps": costs.maps.iter().map(|(n, t, e, b)| json!({"name": n, "type": t, "max_entries": e, "bytes": b})).collect::<Vec<_>>(),
        "maps_total_bytes": total,
        "peak_rss_kib": r.rss,
        "targets": targets.iter().map(|t| json!({"target": t.what, "measured": t.measured, "result": t.verdict})).collect::<Vec<_>>(),
        "notes": r.notes,
        "seconds": took.as_secs_f64(),
    });
    (md, json)
}
