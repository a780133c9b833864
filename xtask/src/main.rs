//! `cargo xtask`: developer tasks for pfwd (setup, build, test, run, demo, bench).

mod bench;
mod demo;
mod setup;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "pfwd developer tasks")]
struct Cli {
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
    /// Setup, then run every unit, packet and e2e test: `cargo xtask test -- <cargo test args>`.
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
    /// Benchmark pfwd (eBPF and iptables modes) against plain routing in a namespace lab; writes target/bench/.
    Bench {
        /// Short run for smoke tests (under a minute).
        #[arg(long)]
        quick: bool,
        /// Use this pfwd binary instead of building a release one.
        #[arg(long, value_name = "PATH")]
        pfwd: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    if let Some(code) = reexec_as_root()? {
        return Ok(code);
    }
    match cmd {
        Cmd::Setup => setup::setup()?,
        Cmd::Build { release } => {
            setup::setup()?;
            build(release)?;
        }
        Cmd::Test { args } => {
            setup::setup()?;
            // The e2e tests run target/debug/pfwd, which `cargo test` alone does not always build.
            build(false)?;
            // --no-fail-fast: one failing test binary should not hide the results of the others.
            let mut cargo_args: Vec<OsString> = vec!["test".into(), "--no-fail-fast".into()];
            // `--workspace` together with `-p` would test everything anyway: let `-p` narrow it.
            if !args.iter().any(|a| a == "-p" || a == "--package") {
                cargo_args.push("--workspace".into());
            }
            cargo_args.extend(args);
            step("test: unit, packet and e2e tests (cargo test --workspace)");
            cargo(&cargo_args)?;
            step("test: all passed");
        }
        Cmd::Run { args } => {
            setup::setup()?;
            let bin = build(false)?;
            step(&format!("run: {}", bin.display()));
            let status =
                Command::new(&bin).args(&args).status().with_context(|| format!("running {}", bin.display()))?;
            return Ok(ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8));
        }
        Cmd::Demo { pfwd } => {
            setup::setup()?;
            let bin = match pfwd {
                Some(bin) => std::path::absolute(bin)?,
                None => build(false)?,
            };
            demo::demo(&bin)?;
        }
        Cmd::Bench { quick, pfwd } => {
            setup::setup()?;
            let bin = match pfwd {
                Some(bin) => std::path::absolute(bin)?,
                None => build(true)?,
            };
            bench::bench(&bin, quick)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a progress line.
pub fn step(msg: &str) {
    println!("==> {msg}");
}

/// Everything here needs root (apt, BPF, namespaces): re-run the same command through sudo when
/// not root. Returns the child's exit code when it re-executed.
fn reexec_as_root() -> Result<Option<ExitCode>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(None);
    }
    let Some(sudo) = setup::which("sudo") else {
        bail!("root is needed (apt, BPF, network namespaces) and sudo is not installed: run as root");
    };
    let exe = std::env::current_exe()?;
    let mut path = OsString::from("PATH=");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    step("not root: re-running through sudo");
    let status = Command::new(sudo)
        .args(["-E".into(), "env".into(), path, exe.into_os_string()])
        .args(std::env::args_os().skip(1))
        .status()
        .context("running sudo")?;
    Ok(Some(ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8)))
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
        assert!(matches!(parse(&["bench", "--quick"]), Cmd::Bench { quick: true, pfwd: None }));
    }
}
