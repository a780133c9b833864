//! `cargo xtask`: developer tasks for pfwd (setup, build, test, run, demo, bench).
//!
//! Builds run as the invoking user; only what needs root (apt-get, bpffs, running the tests, the demo, the bench and
//! pfwd itself) goes through sudo (`sudo.rs`), and nothing does when xtask already runs as root (CI).

mod bench;
mod demo;
mod fuzz;
mod fuzz_parsers;
mod install;
mod setup;
mod sudo;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "pfwd developer tasks")]
struct Cli {
    /// Skip the set-up checks: xtask's own re-run as root passes it, the set-up and the build having been done as
    /// the invoking user.
    #[arg(long, global = true, hide = true)]
    no_setup: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check for (and install when missing) packages, toolchains, bpf-linker and bpffs.
    Setup,
    /// Setup, then build pfwd (its build.rs builds the eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Setup, then run every unit, packet and e2e test, then short runs of both fuzzers; with arguments (`cargo xtask
    /// test -- <cargo test args>`) only the cargo tests they select.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build, then run pfwd: `cargo xtask run -- <pfwd args>`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Setup and build, then forward real traffic through pfwd in a namespace lab.
    Demo {
        /// Use this pfwd binary instead of building one (e.g. a release build).
        #[arg(long, value_name = "PATH")]
        pfwd: Option<PathBuf>,
    },
    /// Differential packet fuzzer: random and mutated packets through the real programs, checked against a model.
    Fuzz {
        /// Packets (BPF_PROG_TEST_RUN calls) to run.
        #[arg(long, default_value_t = 200_000)]
        packets: u64,
        /// Seed (default: derived from the time, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Report every kind of divergence and go on instead of stopping at the first.
        #[arg(long)]
        keep_going: bool,
    },
    /// Benchmark pfwd (eBPF and iptables modes) against plain routing in a namespace lab; writes target/bench/.
    Bench {
        /// Short run for smoke tests (under a minute).
        #[arg(long)]
        quick: bool,
        /// Use this pfwd binary instead of building a release one.
        #[arg(long, value_name = "PATH")]
        pfwd: Option<PathBuf>,
        /// Only the per-packet cost (BPF_PROG_TEST_RUN), of this build beside the pfwd binary OLD, in paired
        /// rounds (the host's drift between runs falls on both); writes target/bench/compare.md.
        #[arg(long, value_name = "OLD", conflicts_with = "quick")]
        compare: Option<PathBuf>,
    },
    /// Install pfwd as a service: binary, systemd unit, example config (when absent), completions, man page.
    Install {
        /// Installation prefix: the binary goes to PREFIX/bin, completions and the man page to PREFIX/share.
        #[arg(long, default_value = "/usr/local", value_name = "DIR")]
        prefix: PathBuf,
        /// Stage everything under this directory instead of / (DESTDIR, for packaging).
        #[arg(long, default_value = "/", value_name = "DESTDIR")]
        root: PathBuf,
        /// Install this pfwd binary instead of building a release one.
        #[arg(long, value_name = "PATH")]
        pfwd: Option<PathBuf>,
    },
    /// Coverage-guided fuzzing (cargo-fuzz) of the parsers: iptables import, TOML config, `pfwd add`; as the
    /// invoking user. A failing input lands in fuzz/artifacts/TARGET/.
    FuzzParsers {
        /// How long to fuzz each of the three targets.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if sudo::is_root() && std::env::var_os("SUDO_USER").is_some() && !cli.no_setup {
        println!(
            "note: running as root through sudo, so target/ becomes root's: as your own user, `cargo xtask` uses \
             sudo only for what needs root"
        );
    }
    let setup = || if cli.no_setup { Ok(()) } else { setup::setup() };
    match cli.cmd {
        Cmd::Setup => setup::setup()?,
        Cmd::Build { release } => {
            setup()?;
            build(release)?;
        }
        Cmd::Test { args } => {
            setup()?;
            // The e2e tests run target/debug/pfwd, which `cargo test` alone does not always build.
            build(false)?;
            // A narrowed run (`cargo xtask test -- -p tests ...`) is for one suite; the whole suite ends with short
            // runs of the fuzzers (the long ones: `cargo xtask fuzz --packets 10000000`, `fuzz-parsers --seconds
            // 3600`).
            let whole = args.is_empty();
            test(args)?;
            if whole {
                let code = fuzz::fuzz(FUZZ_PACKETS_IN_TEST, None, false)?;
                if code != ExitCode::SUCCESS {
                    return Ok(code);
                }
                fuzz_parsers::fuzz_parsers(FUZZ_SECONDS_IN_TEST)?;
                step("test: all passed, the short fuzz runs included");
            }
        }
        Cmd::Run { args } => {
            setup()?;
            let bin = build(false)?;
            step(&format!("run: {}{}", if sudo::is_root() { "" } else { "sudo " }, bin.display()));
            let status =
                sudo::command(&bin)?.args(&args).status().with_context(|| format!("running {}", bin.display()))?;
            return Ok(exit_code(status));
        }
        Cmd::Demo { pfwd } => {
            setup()?;
            let bin = match pfwd {
                Some(bin) => std::path::absolute(bin)?,
                None => build(false)?,
            };
            if !sudo::is_root() {
                return rerun_as_root(
                    "the demo runs as root (network namespaces, BPF)",
                    &["demo".into(), "--pfwd".into(), bin.into()],
                );
            }
            demo::demo(&bin)?;
        }
        Cmd::Fuzz { packets, seed, keep_going } => {
            setup()?;
            return fuzz::fuzz(packets, seed, keep_going);
        }
        Cmd::Bench { quick, pfwd, compare } => {
            setup()?;
            let bin = match pfwd {
                Some(bin) => std::path::absolute(bin)?,
                None => build(true)?,
            };
            let old = compare.map(std::path::absolute).transpose()?;
            if let Some(old) = old.as_ref().filter(|o| !o.is_file()) {
                anyhow::bail!("--compare {}: no such pfwd binary", old.display());
            }
            if !sudo::is_root() {
                let mut args: Vec<OsString> = vec!["bench".into(), "--pfwd".into(), bin.into()];
                if quick {
                    args.push("--quick".into());
                }
                if let Some(old) = old {
                    args.push("--compare".into());
                    args.push(old.into());
                }
                return rerun_as_root("the bench runs as root (network namespaces, BPF)", &args);
            }
            match old {
                Some(old) => bench::compare(&bin, &old)?,
                None => bench::bench(&bin, quick)?,
            }
        }
        Cmd::Install { prefix, root, pfwd } => {
            let bin = match pfwd {
                Some(bin) => std::path::absolute(bin)?,
                None => {
                    setup()?;
                    build(true)?
                }
            };
            install::install(&bin, &prefix, &root)?;
        }
        Cmd::FuzzParsers { seconds } => {
            setup()?;
            fuzz_parsers::fuzz_parsers(seconds)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Packets of the differential fuzzer's run in `cargo xtask test` (a new seed each run, printed).
const FUZZ_PACKETS_IN_TEST: u64 = 200_000;
/// Seconds per parser fuzz target in `cargo xtask test`.
const FUZZ_SECONDS_IN_TEST: u64 = 20;

/// Prints a progress line.
pub fn step(msg: &str) {
    println!("==> {msg}");
}

/// `cargo test --no-fail-fast --workspace <args>`, the test binaries running as root. Not root: cargo builds them as
/// the invoking user first, then runs them through sudo (cargo's `runner` setting).
fn test(args: Vec<OsString>) -> Result<()> {
    // --no-fail-fast: one failing test binary should not hide the results of the others.
    let mut test_args: Vec<OsString> = vec!["test".into(), "--no-fail-fast".into()];
    // `--workspace` together with `-p` would test everything anyway: let `-p` narrow it.
    if !args.iter().any(|a| a == "-p" || a == "--package") {
        test_args.push("--workspace".into());
    }
    test_args.extend(args);
    let mut cargo_args: Vec<OsString> = Vec::new();
    if !sudo::is_root() {
        step("test: building the tests (cargo test --no-run)");
        let mut no_run = test_args.clone();
        no_run.insert(1, "--no-run".into());
        cargo(&no_run)?;
        sudo::validate("the test binaries run as root (network namespaces, BPF)")?;
        let runner: Vec<String> = sudo::prefix()?.iter().map(|w| toml_string(&w.to_string_lossy())).collect();
        cargo_args.push("--config".into());
        cargo_args.push(format!("target.{}.runner = [{}]", host_triple()?, runner.join(", ")).into());
    }
    cargo_args.extend(test_args);
    step(&format!(
        "test: unit, packet and e2e tests (cargo test, as root{})",
        if sudo::is_root() { "" } else { " through sudo" }
    ));
    cargo(&cargo_args)?;
    step("test: all passed");
    Ok(())
}

/// Re-runs this xtask command as root through sudo, without the set-up (done) and with the pfwd binary it built.
fn rerun_as_root(why: &str, args: &[OsString]) -> Result<ExitCode> {
    sudo::validate(why)?;
    let exe = std::env::current_exe()?;
    let status = sudo::command(exe)?.arg("--no-setup").args(args).status().context("running sudo")?;
    Ok(exit_code(status))
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8)
}

/// The host's target triple (`rustc -vV`), for cargo's `target.<triple>.runner`.
fn host_triple() -> Result<String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output().context("running rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().find_map(|l| l.strip_prefix("host: ")) {
        Some(host) if out.status.success() => Ok(host.trim().to_string()),
        _ => bail!("rustc -vV did not say the host triple ({})", out.status),
    }
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `cargo build -p pfwd`; returns the path of the pfwd binary.
fn build(release: bool) -> Result<PathBuf> {
    let mut args = vec!["build", "-p", "pfwd"];
    if release {
        args.push("--release");
    }
    step(&format!("cargo {}", args.join(" ")));
    cargo(&args)?;
    Ok(target_dir().join(if release { "release" } else { "debug" }).join("pfwd"))
}

/// Runs cargo (the one that runs us) in the workspace root; fails on a non-zero exit.
fn cargo<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo).args(args).current_dir(root()).status().context("running cargo")?;
    if !status.success() {
        let args: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Workspace root (xtask lives one level below it).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace")
}

/// Cargo's target directory, honouring CARGO_TARGET_DIR.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cmd {
        Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied())).unwrap().cmd
    }

    #[test]
    fn passes_extra_args_through() {
        let Cmd::Test { args } = parse(&["test", "--", "-p", "tests", "--", "--nocapture"]) else {
            panic!("not test");
        };
        assert_eq!(args, ["-p", "tests", "--", "--nocapture"]);
        let Cmd::Run { args } = parse(&["run", "--", "status", "--json"]) else {
            panic!("not run");
        };
        assert_eq!(args, ["status", "--json"]);
        let Cmd::Run { args } = parse(&["run", "list", "--json"]) else {
            panic!("not run");
        };
        assert_eq!(args, ["list", "--json"]);
        assert!(matches!(parse(&["build", "--release"]), Cmd::Build { release: true }));
        assert!(matches!(parse(&["bench", "--quick"]), Cmd::Bench { quick: true, pfwd: None, compare: None }));
    }
}
