//! Root only where it is needed. Cargo (builds, `rustup`, `cargo install`) runs as the invoking user, so `target/` and
//! `~/.cargo` stay theirs; apt-get, mounting bpffs and running the tests, the demo, the bench and `xtask run` go
//! through sudo. When xtask already runs as root (CI), nothing goes through sudo.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::setup::which;

/// Directories root's tools live in, which a user's PATH often lacks.
const SBIN: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The words that run a program as root: none when we are root, else `sudo -E env PATH=<ours plus the sbin
/// directories>` (sudo would replace PATH with its secure_path, which lacks ~/.cargo/bin).
pub fn prefix() -> Result<Vec<OsString>> {
    if is_root() {
        return Ok(Vec::new());
    }
    let Some(sudo) = which("sudo") else {
        bail!("this step needs root (apt-get, bpffs, network namespaces, BPF) and sudo is not installed: run as root");
    };
    let mut dirs: Vec<_> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    for dir in SBIN {
        if !dirs.iter().any(|d| d == Path::new(dir)) {
            dirs.push(dir.into());
        }
    }
    let mut path = OsString::from("PATH=");
    path.push(std::env::join_paths(dirs).context("joining PATH")?);
    Ok(vec![sudo.into_os_string(), "-E".into(), "env".into(), path])
}

/// A command that runs `program` as root (see [`prefix`]); the caller's environment is kept.
pub fn command(program: impl AsRef<OsStr>) -> Result<Command> {
    let mut words = prefix()?;
    words.push(program.as_ref().to_os_string());
    let mut cmd = Command::new(&words[0]);
    cmd.args(&words[1..]);
    Ok(cmd)
}

/// When not root, asks sudo for its password now (if it wants one), after saying why, rather than in the middle of a
/// later step's output.
pub fn validate(why: &str) -> Result<()> {
    if is_root() {
        return Ok(());
    }
    crate::step(&format!("sudo: {why}"));
    let sudo = prefix()?.swap_remove(0);
    let status = Command::new(sudo).arg("-v").status().context("running sudo -v")?;
    if !status.success() {
        bail!("sudo -v failed ({status}): {why}");
    }
    Ok(())
}

/// Gives files that xtask, run as root through sudo, wrote back to the user who ran sudo (so a later build or clean as
/// that user can replace them). Does nothing when not under sudo.
pub fn give_back(paths: &[&Path]) -> Result<()> {
    let id = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<u32>().ok());
    let (Some(uid), Some(gid)) = (id("SUDO_UID"), id("SUDO_GID")) else {
        return Ok(());
    };
    if !is_root() {
        return Ok(());
    }
    for path in paths {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("giving {} back to uid {uid}", path.display()))?;
    }
    Ok(())
}
