//! `cargo xtask fuzz-parsers [--seconds N]`: coverage-guided fuzzing (cargo-fuzz, libFuzzer) of pfwd's parsers, the
//! targets in `fuzz/` (see fuzz/README.md): the iptables importer, the TOML config and the `pfwd add` grammar, each
//! for N seconds, one after the other, as the invoking user.
//!
//! Each target starts from its committed seeds (`fuzz/corpus/TARGET/seed-*`) plus whatever earlier runs found there,
//! with its dictionary (`fuzz/dict/`). libFuzzer's output goes to `fuzz/target/logs/TARGET.log`; a summary line
//! (executions, coverage) is printed per target. A failing input (panic, broken round trip, hang) stops the run: its
//! file in `fuzz/artifacts/TARGET/`, the log's tail and the command that reproduces it are printed.
//!
//! Built without a sanitizer (`-s none`): the parsers are safe Rust, where AddressSanitizer finds nothing and halves
//! the speed; debug assertions and overflow checks stay on (cargo-fuzz's default).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{root, setup, step};

/// Each target with its dictionary (`fuzz/dict/NAME.dict`) and its largest input (libFuzzer's `-max_len`; the
/// targets also ignore larger ones, so a corpus from elsewhere cannot slow them down).
pub const TARGETS: [Target; 3] = [
    Target { name: "import", dict: "iptables", max_len: 4096 },
    Target { name: "toml_config", dict: "toml", max_len: 4096 },
    Target { name: "cli_rule", dict: "cli", max_len: 1024 },
];

/// An input that takes longer than this is reported as a hang (libFuzzer's `-timeout`).
const TIMEOUT_SECONDS: u64 = 10;

pub struct Target {
    pub name: &'static str,
    pub dict: &'static str,
    pub max_len: usize,
}

pub fn fuzz_parsers(seconds_per_target: u64) -> Result<()> {
    setup::cargo_fuzz()?;
    let logs = root().join("fuzz/target/logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    step("fuzz-parsers: building the fuzz targets (cargo +nightly fuzz build -s none)");
    let status = cargo_fuzz().args(["build", "-s", "none"]).status().context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    for t in &TARGETS {
        step(&format!("fuzz-parsers: {} for {seconds_per_target} s", t.name));
        let log_path = logs.join(format!("{}.log", t.name));
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let status = cargo_fuzz()
            .args(["run", "-s", "none", t.name, "--"])
            .args(libfuzzer_args(t, seconds_per_target))
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("running cargo fuzz run")?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if !status.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            for line in tail.into_iter().rev() {
                eprintln!("    {line}");
            }
            let artifact = artifact(&text);
            bail!(
                "fuzz target {} failed ({status}); libFuzzer's output: {}{}",
                t.name,
                log_path.display(),
                match artifact {
                    Some(a) => format!(
                        "\nthe input: {a}\nreproduce: cargo +nightly fuzz run -s none {} {a}\nminimise: cargo +nightly \
                         fuzz tmin -s none {} {a}",
                        t.name, t.name
                    ),
                    None => String::new(),
                }
            );
        }
        println!("    {}", Summary::parse(&text).describe(t.name));
    }
    step("fuzz-parsers: no failures");
    Ok(())
}

/// `rustup run nightly cargo fuzz` in the workspace root (cargo-fuzz needs nightly; it finds `fuzz/` there).
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"]).current_dir(root()).stdin(Stdio::null());
    // Compiler settings of the cargo that runs xtask are not for this nightly build.
    for var in ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        cmd.env_remove(var);
    }
    cmd
}

fn libfuzzer_args(t: &Target, seconds: u64) -> Vec<String> {
    let dict: PathBuf = Path::new("fuzz/dict").join(format!("{}.dict", t.dict));
    vec![
        format!("-max_total_time={seconds}"),
        format!("-timeout={TIMEOUT_SECONDS}"),
        format!("-max_len={}", t.max_len),
        format!("-dict={}", dict.display()),
        "-print_final_stats=1".into(),
    ]
}

/// The path libFuzzer wrote the failing input to (`... Test unit written to PATH`).
fn artifact(log: &str) -> Option<&str> {
    log.lines().rev().find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
}

/// What a run did, from libFuzzer's last status line (`#N DONE cov: C ft: F corp: U/S ...`) and final stats.
#[derive(Debug, Default, PartialEq, Eq)]
struct Summary {
    executions: Option<u64>,
    per_second: Option<u64>,
    seconds: Option<u64>,
    coverage: Option<u64>,
    features: Option<u64>,
    corpus: Option<String>,
}

impl Summary {
    fn parse(log: &str) -> Summary {
        let mut s = Summary::default();
        let stat = |name: &str| {
            log.lines().find_map(|l| l.strip_prefix(&format!("stat::{name}:")).and_then(|v| v.trim().parse().ok()))
        };
        s.executions = stat("number_of_executed_units");
        s.per_second = stat("average_exec_per_sec");
        // "Done N runs in S second(s)".
        s.seconds = log.lines().find_map(|l| {
            let rest = l.strip_prefix("Done ")?;
            let (_, secs) = rest.split_once(" runs in ")?;
            secs.split_whitespace().next()?.parse().ok()
        });
        if let Some(done) = log.lines().rev().find(|l| l.split_whitespace().nth(1) == Some("DONE")) {
            let words: Vec<&str> = done.split_whitespace().collect();
            let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
            s.coverage = after("cov:").and_then(|v| v.parse().ok());
            s.features = after("ft:").and_then(|v| v.parse().ok());
            s.corpus = after("corp:").map(str::to_string);
        }
        s
    }

    fn describe(&self, target: &str) -> String {
        let n = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        format!(
            "{target}: {} executions in {} s ({}/s), coverage {} edges, {} features, corpus {} (inputs/bytes)",
            n(self.executions),
            n(self.seconds),
            n(self.per_second),
            n(self.coverage),
            n(self.features),
            self.corpus.as_deref().unwrap_or("?"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "INFO: Seed: 1234\n\
        #156\tINITED cov: 1839 ft: 4684 corp: 124/12881b exec/s: 0 rss: 47Mb\n\
        #989516\tDONE   cov: 2546 ft: 8505 corp: 1392/292Kb lim: 1711 exec/s: 47119 rss: 47Mb\n\
        Done 989516 runs in 21 second(s)\n\
        stat::number_of_executed_units: 989516\n\
        stat::average_exec_per_sec:     47119\n\
        stat::new_units_added:          1789\n";

    #[test]
    fn reads_libfuzzer_summary() {
        let s = Summary::parse(LOG);
        assert_eq!(
            s,
            Summary {
                executions: Some(989516),
                per_second: Some(47119),
                seconds: Some(21),
                coverage: Some(2546),
                features: Some(8505),
                corpus: Some("1392/292Kb".into()),
            }
        );
        assert_eq!(
            s.describe("import"),
            "import: 989516 executions in 21 s (47119/s), coverage 2546 edges, 8505 features, corpus 1392/292Kb \
             (inputs/bytes)"
        );
        assert!(Summary::parse("").describe("x").starts_with("x: ? executions"));
    }

    #[test]
    fn finds_the_failing_input() {
        let log = "==1== ERROR: libFuzzer: deadly signal\n\
            artifact_prefix='/w/fuzz/artifacts/cli_rule/'; Test unit written to /w/fuzz/artifacts/cli_rule/crash-7e\n\
            Base64: c25hdAo=\n";
        assert_eq!(artifact(log), Some("/w/fuzz/artifacts/cli_rule/crash-7e"));
        assert_eq!(artifact(LOG), None);
    }

    #[test]
    fn every_target_has_its_files() {
        for t in &TARGETS {
            assert!(root().join(format!("fuzz/fuzz_targets/{}.rs", t.name)).is_file(), "{}", t.name);
            assert!(root().join(format!("fuzz/dict/{}.dict", t.dict)).is_file(), "{}", t.dict);
            let seeds = std::fs::read_dir(root().join("fuzz/corpus").join(t.name)).unwrap();
            assert!(seeds.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().starts_with("seed-")));
        }
    }
}
