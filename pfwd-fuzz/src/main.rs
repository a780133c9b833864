//! `pfwd-fuzz [--packets N] [--seed S]`: the differential packet fuzzer (needs root). Prints progress, and on a
//! divergence the seed, the rule set (`pfwd add` syntax) and a minimised packet sequence, then exits non-zero.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use pfwd_fuzz::model::Verdict;
use pfwd_fuzz::{Divergence, Fuzzer, Step, generate, hex};

#[derive(Parser)]
#[command(name = "pfwd-fuzz", about = "Differential packet fuzzer: pfwd's tc programs against a reference model")]
struct Args {
    /// Packets (BPF_PROG_TEST_RUN calls) to run.
    #[arg(long, default_value_t = 200_000)]
    packets: u64,
    /// Seed (default: derived from the time; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Report every divergence (minimised) and go on, instead of stopping at the first.
    #[arg(long)]
    keep_going: bool,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("pfwd-fuzz: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<u64> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!("pfwd-fuzz: seed {seed}, {} packets (rerun: --seed {seed})", args.packets);
    let mut fz = Fuzzer::new()?;
    println!(
        "pfwd-fuzz: {}",
        if fz.checks_packet_sum() {
            "every other packet comes CHECKSUM_COMPLETE (the kernel checks the run left skb->csum right), the others \
             CHECKSUM_NONE (L4 checksums updated by hand)"
        } else {
            "this kernel has no BPF_F_TEST_SKB_CHECKSUM_COMPLETE (6.16+): skb->csum goes unchecked"
        }
    );
    let mut rng = generate::Rng::new(seed);
    let (start, mut last) = (Instant::now(), Instant::now());
    let (mut packets, mut episodes, mut divergences) = (0u64, 0u64, 0u64);
    let mut seen_kinds: Vec<String> = Vec::new();
    while packets < args.packets {
        let rules = generate::rules(&mut rng);
        let sends = 50 + rng.below(350) as usize;
        episodes += 1;
        if let Some((steps, d)) = fz.episode(&rules, &mut rng, sends, &mut packets)? {
            divergences += 1;
            let kind = kind(&d.what);
            if !seen_kinds.contains(&kind) {
                seen_kinds.push(kind);
                let (min, d) = fz.minimise(&rules, &steps, d)?;
                report(seed, episodes, &rules, &min, &d);
            }
            if !args.keep_going {
                return Ok(divergences);
            }
        }
        if last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            let secs = start.elapsed().as_secs_f64();
            println!(
                "  {packets} packets, {episodes} rule sets, {:.0} packets/s, {divergences} divergences",
                packets as f64 / secs
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "pfwd-fuzz: seed {seed}: {packets} packets in {episodes} rule sets, {secs:.1} s ({:.0} packets/s), {} refused \
         by the kernel, {divergences} divergences",
        packets as f64 / secs,
        fz.refused
    );
    let (syncs, small) = fz.inst.rule_changes();
    println!("rule changes: {syncs}, {small} of them the small way (only the changed rules compiled)");
    println!("what the model saw (packets per path):");
    for (path, n) in &fz.paths {
        println!("  {n:>10}  {path}");
    }
    println!("fragment cases the generator made:");
    for (what, n) in &fz.generated {
        println!("  {n:>10}  {what}");
    }
    Ok(divergences)
}

/// A divergence's message without its numbers, to report each kind once under --keep-going.
fn kind(what: &str) -> String {
    what.split(':').next().unwrap_or(what).chars().filter(|c| !c.is_ascii_digit()).collect()
}

fn report(seed: u64, episode: u64, rules: &[pfwd::rules::Rule], steps: &[Step], d: &Divergence) {
    println!("\nDIVERGENCE (seed {seed}, rule set #{episode}): {}", d.what);
    println!("rules:");
    for r in rules {
        println!("  pfwd add {r}    # id {}", r.id);
    }
    println!("packets ({} after minimising; frames in hex, Ethernet included):", steps.len());
    for (i, s) in steps.iter().enumerate() {
        if let Some(rules) = &s.rules {
            println!("  {i:3} rules now:");
            for r in rules {
                println!("        pfwd add {r}    # id {}", r.id);
            }
            continue;
        }
        println!("  {i:3} {:7} {}", s.hook.name(), hex(&s.frame));
    }
    if let Some(e) = &d.expected {
        println!("model: {}", e.why);
        match &e.verdict {
            Verdict::Next(b) => println!("  expected NEXT {}", hex(b)),
            Verdict::Drop => println!("  expected DROP"),
        }
    }
    if !d.got.is_empty() {
        println!("  kernel   {} {}", if d.ret == pfwd_fuzz::check::DROP { "DROP" } else { "NEXT" }, hex(&d.got));
    }
}
