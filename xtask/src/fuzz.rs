//! `cargo xtask fuzz [--packets N] [--seed S]`: the differential packet fuzzer (pfwd-fuzz). Builds it in release as
//! the invoking user and runs it as root (BPF_PROG_TEST_RUN on a private pfwd instance); the seed defaults to one
//! derived from the time and is printed, so a failing run can be repeated.

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::{cargo, exit_code, step, sudo, target_dir};

pub fn fuzz(packets: u64, seed: Option<u64>, keep_going: bool) -> Result<ExitCode> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    step("cargo build --release -p pfwd-fuzz");
    cargo(&["build", "--release", "-p", "pfwd-fuzz"])?;
    let bin = target_dir().join("release").join("pfwd-fuzz");
    sudo::validate("the fuzzer loads eBPF programs (BPF_PROG_TEST_RUN)")?;
    step(&format!(
        "fuzz: {packets} packets, seed {seed} (repeat with: cargo xtask fuzz --packets {packets} --seed {seed})"
    ));
    let mut cmd = sudo::command(&bin)?;
    cmd.args(["--packets", &packets.to_string(), "--seed", &seed.to_string()]);
    if keep_going {
        cmd.arg("--keep-going");
    }
    let status = cmd.status().with_context(|| format!("running {}", bin.display()))?;
    Ok(exit_code(status))
}
