//! `cargo xtask setup`: idempotent checks that install only what is missing, and say one short line when nothing is.
//!
//! Debian packages go in with `--no-install-recommends` after a simulation shows what apt would do: the packages it
//! would install are listed first, and if it would remove any package, nothing is installed and the error names
//! them. Toolchains, bpf-linker and cargo-fuzz (only for `cargo xtask fuzz-parsers`) are per user (rustup, cargo
//! install) and install as the invoking user; apt-get and mounting bpffs go through sudo when not root.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{step, sudo};

const PACKAGES: [&str; 9] =
    ["llvm-22-dev", "iproute2", "iptables", "nftables", "conntrack", "ethtool", "bpftool", "iperf3", "netsniff-ng"];

pub fn setup() -> Result<()> {
    // Each check says something only when it acts.
    let acted = [debian_packages()?, toolchains()?, bpf_linker()?, bpffs()?];
    if acted.iter().all(|a| !a) {
        step("setup: all present (Debian packages, toolchains and components, bpf-linker, bpffs)");
    }
    Ok(())
}

/// Installs the missing packages of [`PACKAGES`]; true when it did.
fn debian_packages() -> Result<bool> {
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
    let missing: Vec<&str> = PACKAGES.into_iter().filter(|p| !installed.contains(*p)).collect();
    if missing.is_empty() {
        return Ok(false);
    }
    step(&format!("setup: Debian packages missing: {}", missing.join(" ")));
    println!("    apt-get update");
    sh(sudo::command("apt-get")?.args(["update", "-qq"]))?;
    let plan = AptPlan::simulate(&missing)?;
    if !plan.remove.is_empty() {
        bail!(
            "installing {} would make apt remove {}: nothing installed. Install the missing packages yourself once \
             you have decided about those (apt-get install --no-install-recommends {})",
            missing.join(" "),
            plan.remove.join(" "),
            missing.join(" ")
        );
    }
    let n = plan.install.len();
    println!("    installing {n} package{}: {}", if n == 1 { "" } else { "s" }, plan.install.join(" "));
    // --no-remove: should apt's plan differ from the simulation, it stops rather than remove anything.
    sh(sudo::command("apt-get")?
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends", "--no-remove"])
        .args(&missing))?;
    Ok(true)
}

/// What `apt-get install --no-install-recommends` would do, from its simulation (`-s`, which needs no root).
struct AptPlan {
    /// Packages it would install or upgrade.
    install: Vec<String>,
    /// Packages it would remove (or purge).
    remove: Vec<String>,
}

impl AptPlan {
    fn simulate(packages: &[&str]) -> Result<AptPlan> {
        let out = output(Command::new("apt-get").args(["-s", "install", "--no-install-recommends"]).args(packages))?;
        Ok(AptPlan::parse(&out))
    }

    /// Reads `Inst <pkg> ...`, `Remv <pkg> ...` and `Purg <pkg> ...` lines.
    fn parse(simulation: &str) -> AptPlan {
        let mut plan = AptPlan { install: Vec::new(), remove: Vec::new() };
        for line in simulation.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("Inst"), Some(pkg)) => plan.install.push(pkg.to_string()),
                (Some("Remv" | "Purg"), Some(pkg)) => plan.remove.push(pkg.to_string()),
                _ => {}
            }
        }
        plan
    }
}

/// The nightly toolchain with rust-src (the eBPF build) and clippy (CI lints the eBPF crate for its own target), and
/// clippy on the toolchain that runs us (CI lints the workspace with it); true when it installed something.
fn toolchains() -> Result<bool> {
    let mut acted = false;
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("setup: installing the nightly toolchain (rustup)");
        sh(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
        acted = true;
    }
    // `None`: the toolchain that runs `cargo clippy` in the workspace (as it runs us).
    for (toolchain, components) in [(Some("nightly"), &["rust-src", "clippy"][..]), (None, &["clippy"])] {
        let select: &[&str] = match toolchain {
            Some(t) => &["--toolchain", t],
            None => &[],
        };
        let installed = output(
            Command::new("rustup").args(["component", "list", "--installed"]).args(select).current_dir(crate::root()),
        )?;
        for component in components {
            if !installed.lines().any(|l| l.starts_with(component)) {
                step(&format!(
                    "setup: adding {component} to the {} toolchain (rustup)",
                    toolchain.unwrap_or("current")
                ));
                sh(Command::new("rustup")
                    .args(["component", "add", component])
                    .args(select)
                    .current_dir(crate::root()))?;
                acted = true;
            }
        }
    }
    Ok(acted)
}

/// bpf-linker (built against LLVM 22) on PATH; true when it installed it.
fn bpf_linker() -> Result<bool> {
    if which("bpf-linker").is_some() {
        return Ok(false);
    }
    let cargo_bin = cargo_home().join("bin");
    let acted = !cargo_bin.join("bpf-linker").is_file();
    if acted {
        step("setup: installing bpf-linker (cargo install, takes ~2 minutes)");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        // Without LLVM_PREFIX its build finds the old llvm-config 14 on PATH and fails to link.
        sh(Command::new(cargo).env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))?;
    }
    // The eBPF build (pfwd/build.rs) needs bpf-linker on PATH.
    let mut path = OsString::from(cargo_bin);
    if let Some(old) = std::env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    // SAFETY: setup runs before xtask starts any thread, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("PATH", path) };
    Ok(acted)
}

/// cargo-fuzz (for `cargo xtask fuzz-parsers`, not part of [`setup`]: only fuzzing needs it), installed per user
/// like bpf-linker; true when it installed it. cargo finds it in ~/.cargo/bin even when that is not on PATH.
pub fn cargo_fuzz() -> Result<bool> {
    if which("cargo-fuzz").is_some() || cargo_home().join("bin/cargo-fuzz").is_file() {
        return Ok(false);
    }
    step("setup: installing cargo-fuzz (cargo install, takes ~1 minute)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    sh(Command::new(cargo).args(["install", "cargo-fuzz", "--locked"]))?;
    Ok(true)
}

/// bpffs mounted at /sys/fs/bpf (pfwd pins there); true when it mounted it.
fn bpffs() -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    });
    if mounted {
        return Ok(false);
    }
    step("setup: mounting bpffs at /sys/fs/bpf");
    sh(sudo::command("mount")?.args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    Ok(true)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_apt_simulation() {
        let sim = "NOTE: This is only a simulation!\n\
                   Reading package lists...\n\
                   The following packages will be REMOVED:\n  systemd-timesyncd\n\
                   Remv systemd-timesyncd [252.39-1~deb12u1]\n\
                   Inst ntpsec (1.2.2+dfsg1-1+deb12u1 Debian:12.12/stable [amd64])\n\
                   Inst iperf3 (3.12-1+deb12u2 Debian:12.12/stable [amd64])\n\
                   Conf ntpsec (1.2.2+dfsg1-1+deb12u1 Debian:12.12/stable [amd64])\n";
        let plan = AptPlan::parse(sim);
        assert_eq!(plan.install, ["ntpsec", "iperf3"]);
        assert_eq!(plan.remove, ["systemd-timesyncd"]);
    }
}
