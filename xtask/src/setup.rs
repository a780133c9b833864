//! `cargo xtask setup`: idempotent checks that install only what is missing (fast when all is there).

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::step;

const PACKAGES: [&str; 9] =
    ["llvm-22-dev", "iproute2", "iptables", "nftables", "conntrack", "ethtool", "bpftool", "iperf3", "netsniff-ng"];

pub fn setup() -> Result<()> {
    step("setup");
    debian_packages()?;
    nightly()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

fn debian_packages() -> Result<()> {
    // One dpkg-query for all packages; unknown packages only go to stderr, so ignore its exit code.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(PACKAGES)
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query (setup supports Debian/Ubuntu)")?;
    let installed: HashSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(" install ok installed"))
        .map(str::to_string)
        .collect();
    let mut missing = Vec::new();
    for pkg in PACKAGES {
        if installed.contains(pkg) {
            println!("    checking {pkg}... ok");
        } else {
            println!("    checking {pkg}... missing");
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    println!("    apt-get update...");
    sh(Command::new("apt-get").arg("update"))?;
    for pkg in &missing {
        println!("    installing {pkg}...");
    }
    sh(Command::new("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y"]).args(&missing))
}

fn nightly() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("    checking nightly toolchain... ok");
    } else {
        println!("    installing nightly toolchain...");
        sh(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let components =
        output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        println!("    checking nightly rust-src... ok");
    } else {
        println!("    installing nightly rust-src...");
        sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if which("bpf-linker").is_some() {
        println!("    checking bpf-linker... ok");
        return Ok(());
    }
    let cargo_bin = cargo_home().join("bin");
    if !cargo_bin.join("bpf-linker").is_file() {
        println!("    installing bpf-linker (cargo install, takes ~2 minutes)...");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        // Without LLVM_PREFIX its build finds the old llvm-config 14 on PATH and fails to link.
        sh(Command::new(cargo).env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))?;
    } else {
        println!("    checking bpf-linker... ok ({})", cargo_bin.display());
    }
    // aya-build's cargo needs bpf-linker on PATH.
    let mut path = OsString::from(cargo_bin);
    if let Some(old) = std::env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    // SAFETY: setup runs before xtask starts any thread, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("PATH", path) };
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    });
    if mounted {
        println!("    checking bpffs at /sys/fs/bpf... ok");
    } else {
        println!("    mounting bpffs at /sys/fs/bpf...");
        sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// First executable named `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// Runs a command with inherited output; fails on a non-zero exit.
fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails on a non-zero exit.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
