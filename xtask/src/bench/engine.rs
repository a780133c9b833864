//! Workload 7: the rule engine at scale (eBPF mode). For 10, 10,000 and 100,000 rules: the install time, the cost
//! of a new flow's first packet (its rule lookup and flow creation, in BPF_PROG_TEST_RUN) and the wall time of one
//! `pfwd add` and `pfwd del`. And the spread of many flows over 3 backends, and how many move when a 4th is added.
//!
//! The rule sets are built so that size alone changes: every rule shares the destination port of the matching one
//! (`-i lo -p udp --dport 9000`, each with its own `-s` /32 address), so they all rank ahead of it, and 8 of them
//! are full-range rules (`--dport 1-65535`, TCP and UDP), which used to take one map entry per port.

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use aya::programs::SchedClassifier;
use serde_json::{Value, json};

use super::net::Env;
use super::prog::{dst_of, run, udp};
use super::run::check_interrupted;

const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const PORT: u16 = 9000;
/// The port of the rule with several backends.
const LB_PORT: u16 = 9001;

/// One rule-set size's figures.
pub struct Scale {
    pub rules: u32,
    /// `pfwd attach lo --config` with the rules (wall).
    pub install_ms: f64,
    /// Median of single test runs, each a new flow matched by the last rule in precedence order.
    pub new_flow_ns: f64,
    /// Medians of `pfwd add` / `pfwd del` of one rule (wall).
    pub add_ms: f64,
    pub del_ms: f64,
}

/// Backends: how many flows each got of `flows`, and how many changed backend when a 4th was added.
pub struct Spread {
    pub flows: usize,
    pub per_backend: Vec<(Ipv4Addr, usize)>,
    pub moved: usize,
    pub moved_to_new: usize,
}

pub struct EngineResults {
    pub scales: Vec<Scale>,
    pub spread: Spread,
}

/// The `attach --config` file with `n` rules (see the module docs), the matching one last in precedence.
fn config(n: u32) -> String {
    let mut s = String::with_capacity(n as usize * 120);
    let mut rule = |id: u32, body: &str| {
        let _ = write!(s, "[[rule]]\nid = {id}\nkind = \"dnat\"\niface = \"lo\"\n{body}\n");
    };
    let to = format!("to = \"{SERVER}:{PORT}\"\n");
    let full = 8.min(n.saturating_sub(1));
    for i in 0..full {
        let proto = if i % 2 == 0 { "tcp" } else { "udp" };
        rule(i + 1, &format!("proto = \"{proto}\"\nsrc = \"203.0.113.{i}\"\ndport = \"1-65535\"\n{to}"));
    }
    for i in full..n - 1 {
        // 10.128.0.0/9: never the bench's sources.
        let a = Ipv4Addr::from(0x0a80_0000 + i);
        rule(i + 1, &format!("proto = \"udp\"\nsrc = \"{a}\"\ndport = {PORT}\n{to}"));
    }
    rule(n, &format!("proto = \"udp\"\ndst = \"{ROUTER}\"\ndport = {PORT}\n{to}"));
    s
}

pub fn measure(env: &Env, sizes: &[u32], adds: usize, singles: usize, lb_flows: usize) -> Result<EngineResults> {
    let mut scales = vec![];
    for &n in sizes {
        check_interrupted()?;
        let path = env.tmp.join(format!("engine-{n}.toml"));
        fs::write(&path, config(n))?;
        let path = path.to_str().context("temp path is not UTF-8")?;
        let attach = env.pfwd(&["attach", "lo", "--mode", "ebpf", "--config", path])?;
        let _guard = Detach(env);
        let ingress = SchedClassifier::from_pin(env.pin_dir().join("prog_ingress")).context("pinned prog_ingress")?;
        // Each run a new source, so each creates a flow (and the rule lookup runs).
        let mut ns = Vec::with_capacity(singles);
        for i in 0..singles {
            if i % 1000 == 0 {
                check_interrupted()?;
            }
            let src = Ipv4Addr::new(10, 0, 4 + (i / 60_000) as u8, 2);
            let (t, out) = run(&ingress, &udp(src, 1024 + (i % 60_000) as u16, ROUTER, PORT), 1)?;
            ensure!(dst_of(&out)? == SERVER, "{n} rules: the new flow was not translated by the matching rule");
            ns.push(t);
        }
        let (mut add, mut del) = (vec![], vec![]);
        for i in 0..adds {
            let port = (7000 + i).to_string();
            let out = env.pfwd(&["add", "dnat", "-i", "lo", "-p", "tcp", "--dport", &port, "--to", "10.0.2.2"])?;
            add.push(out.wall.as_secs_f64() * 1e3);
            let id = out.stdout.trim().to_string();
            del.push(env.pfwd(&["del", &id])?.wall.as_secs_f64() * 1e3);
        }
        let scale = Scale {
            rules: n,
            install_ms: attach.wall.as_secs_f64() * 1e3,
            new_flow_ns: median(&mut ns),
            add_ms: median(&mut add),
            del_ms: median(&mut del),
        };
        println!(
            "    {:>7} rules: attach {:>8.1} ms, new flow {:>6.0} ns, add {:>6.1} ms, del {:>6.1} ms",
            n, scale.install_ms, scale.new_flow_ns, scale.add_ms, scale.del_ms
        );
        scales.push(scale);
    }
    let spread = spread(env, lb_flows)?;
    Ok(EngineResults { scales, spread })
}

/// Sends `flows` new flows to a rule with 3 backends, then (conntrack flushed) the same flows to the same rule with
/// a 4th backend, and compares where each went.
fn spread(env: &Env, flows: usize) -> Result<Spread> {
    let backends: Vec<Ipv4Addr> = (2..=5).map(|i| Ipv4Addr::new(10, 0, 2, i)).collect();
    let to = |n: usize| backends[..n].iter().map(|a| format!("{a}:{PORT}")).collect::<Vec<_>>().join(",");
    let lb = LB_PORT.to_string();
    let add = |n: usize| -> Result<String> {
        let out =
            env.pfwd(&["add", "dnat", "-i", "lo", "-p", "udp", "-d", "10.0.1.1", "--dport", &lb, "--to", &to(n)])?;
        Ok(out.stdout.trim().to_string())
    };
    env.pfwd(&["attach", "lo", "--mode", "ebpf"])?;
    let _guard = Detach(env);
    let ingress = SchedClassifier::from_pin(env.pin_dir().join("prog_ingress")).context("pinned prog_ingress")?;
    let pass = |what: &str| -> Result<Vec<Ipv4Addr>> {
        println!("    backends: {flows} new flows to {what}");
        (0..flows)
            .map(|i| {
                if i % 1000 == 0 {
                    check_interrupted()?;
                }
                let src = Ipv4Addr::from(0x0a40_0000 + (i / 50_000) as u32);
                dst_of(&run(&ingress, &udp(src, 1024 + (i % 50_000) as u16, ROUTER, LB_PORT), 1)?.1)
            })
            .collect()
    };
    let id = add(3)?;
    let first = pass("3 backends")?;
    env.pfwd(&["del", &id])?;
    env.pfwd(&["conntrack", "--flush"])?;
    add(4)?;
    let second = pass("4 backends")?;
    let per_backend = backends[..3].iter().map(|b| (*b, first.iter().filter(|a| *a == b).count())).collect();
    let moved = first.iter().zip(&second).filter(|(a, b)| a != b).count();
    let moved_to_new = first.iter().zip(&second).filter(|(a, b)| a != b && **b == backends[3]).count();
    Ok(Spread { flows, per_backend, moved, moved_to_new })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// Detaches pfwd from the router namespace on drop.
struct Detach<'a>(&'a Env);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.pfwd(&["detach"]) {
            eprintln!("    warning: pfwd detach: {e:#}");
        }
    }
}

impl EngineResults {
    /// The report's section and its JSON.
    pub fn report(&self, md: &mut String) -> Value {
        let _ = writeln!(
            md,
            "\n## Rule engine at scale (eBPF)\n\nEvery rule shares the matching rule's destination port (each with \
             its own -s), 8 of them --dport 1-65535; the matching rule is last in precedence. New flow: median of \
             single BPF_PROG_TEST_RUN calls, each a new flow. add / del: one `pfwd add` / `pfwd del` (wall, median).\n"
        );
        let _ = writeln!(md, "| Rules | attach --config | new flow | add | del |");
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|");
        for s in &self.scales {
            let _ = writeln!(
                md,
                "| {} | {:.0} ms | {:.0} ns | {:.1} ms | {:.1} ms |",
                s.rules, s.install_ms, s.new_flow_ns, s.add_ms, s.del_ms
            );
        }
        let sp = &self.spread;
        let even = sp.flows as f64 / sp.per_backend.len() as f64;
        let shares: Vec<String> = sp
            .per_backend
            .iter()
            .map(|(a, n)| format!("{a}: {n} ({:+.2}% of even)", (*n as f64 / even - 1.0) * 100.0))
            .collect();
        let _ = writeln!(
            md,
            "\nBackends: {} new flows over 3 backends: {}. With a 4th added: {} flows ({:.2}%) moved, {} of them to \
             the new backend.\n",
            sp.flows,
            shares.join(", "),
            sp.moved,
            sp.moved as f64 * 100.0 / sp.flows as f64,
            sp.moved_to_new
        );
        json!({
            "scales": self.scales.iter().map(|s| json!({
                "rules": s.rules, "install_ms": s.install_ms, "new_flow_ns": s.new_flow_ns,
                "add_ms": s.add_ms, "del_ms": s.del_ms,
            })).collect::<Vec<_>>(),
            "spread": {
                "flows": sp.flows,
                "per_backend": sp.per_backend.iter().map(|(a, n)| json!({"backend": a.to_string(), "flows": n})).collect::<Vec<_>>(),
                "moved": sp.moved, "moved_to_new": sp.moved_to_new,
            },
        })
    }

    /// The targets: (what, measured, met).
    pub fn targets(&self) -> Vec<(String, String, bool)> {
        let mut t = vec![];
        if let (Some(small), Some(big)) = (self.scales.first(), self.scales.last()) {
            let r = big.new_flow_ns / small.new_flow_ns;
            t.push((
                format!("new flow with {} rules <= 1.5x with {}", big.rules, small.rules),
                format!("{:.0} ns vs {:.0} ns ({r:.2}x)", big.new_flow_ns, small.new_flow_ns),
                r <= 1.5,
            ));
            let r = big.add_ms / small.add_ms;
            t.push((
                format!("pfwd add with {} rules <= 2x with {}", big.rules, small.rules),
                format!("{:.1} ms vs {:.1} ms ({r:.2}x)", big.add_ms, small.add_ms),
                r <= 2.0,
            ));
        }
        let sp = &self.spread;
        let even = sp.flows as f64 / sp.per_backend.len() as f64;
        let worst = sp.per_backend.iter().map(|(_, n)| (*n as f64 / even - 1.0).abs()).fold(0.0, f64::max) * 100.0;
        t.push((
            format!("{} flows over 3 backends within 5% of even", sp.flows),
            format!("worst backend {worst:.2}% off"),
            worst <= 5.0,
        ));
        let moved = sp.moved as f64 * 100.0 / sp.flows as f64;
        t.push((
            "a 4th backend moves 25% +- 2 points of the flows".into(),
            format!("{moved:.2}%"),
            (moved - 25.0).abs() <= 2.0,
        ));
        t
    }
}
