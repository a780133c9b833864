//! Builds the eBPF programs (`pfwd-ebpf`, for bpfel-unknown-none with the nightly toolchain and bpf-linker) and puts
//! the object in OUT_DIR, where `loader.rs` embeds it: the `pfwd` binary is self-contained. Also embeds the source
//! hash (`PFWD_SOURCE_HASH`, see `build/source_hash.rs`) that `pfwd --version` shows and the test lab checks.
//!
//! The eBPF build is a nested `cargo build` (what aya-build 0.2 runs, with its output captured): quiet when it
//! succeeds, except for compiler warnings in the eBPF code; its whole output when it fails.

#[path = "build/source_hash.rs"]
mod source_hash;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};

/// The nightly toolchain the eBPF crate is built with (`-Z build-std`).
const TOOLCHAIN: &str = "nightly";

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("pfwd is inside the workspace")?;
    // The hash covers every input of the binary, including the eBPF crate and everything it uses: rerunning on
    // each keeps both the embedded hash and the eBPF object current.
    for input in source_hash::INPUTS {
        println!("cargo:rerun-if-changed={}", root.join(input).display());
    }
    let hash = source_hash::source_hash(root).context("hashing pfwd's sources")?;
    println!("cargo:rustc-env=PFWD_SOURCE_HASH={hash}");

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    build_ebpf(root, &out_dir)
}

/// `cargo build --package pfwd-ebpf --release --target bpf{el,eb}-unknown-none` with its own target directory in
/// OUT_DIR (the outer cargo holds the lock on ours), then copies the object to OUT_DIR/pfwd.
fn build_ebpf(root: &Path, out_dir: &Path) -> Result<()> {
    let endian = std::env::var("CARGO_CFG_TARGET_ENDIAN").context("CARGO_CFG_TARGET_ENDIAN not set")?;
    let target = match endian.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported endianness {other}"),
    };
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let arch = if arch.starts_with("riscv64") { "riscv64".to_string() } else { arch };
    let target_dir = out_dir.join("ebpf-target");

    // Through rustup when there is one (as aya-build does), so the nightly toolchain builds it.
    let mut cmd = match which("rustup") {
        Some(rustup) => {
            let mut cmd = Command::new(rustup);
            cmd.args(["run", TOOLCHAIN, "cargo"]);
            cmd
        }
        None => Command::new("cargo"),
    };
    cmd.current_dir(root)
        .args(["build", "--package", "pfwd-ebpf", "--bins", "--release", "--message-format=json-diagnostic-short"])
        .args(["--target", target, "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        // The outer cargo's compiler settings are for the host (and clippy's wrapper must not see BPF code).
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [&format!("--cfg=bpf_target_arch=\"{arch}\""), "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        )
        .stdin(Stdio::null());
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;

    // stdout: one JSON message per line (artifacts and compiler diagnostics); stderr: cargo's progress.
    let mut object = None;
    let mut diagnostics = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match msg["reason"].as_str() {
            Some("compiler-artifact") if msg["target"]["name"] == "pfwd" => {
                object = msg["executable"].as_str().map(PathBuf::from);
            }
            Some("compiler-message") => {
                let level = msg["message"]["level"].as_str().unwrap_or_default().to_string();
                diagnostics.push((level, msg["message"]["rendered"].as_str().unwrap_or_default().to_string()));
            }
            _ => {}
        }
    }
    if !out.status.success() {
        // A failing build script's stderr is shown by cargo.
        for (_, rendered) in &diagnostics {
            eprint!("{rendered}");
        }
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("building the eBPF programs failed ({}): {cmd:?}", out.status);
    }
    // Warnings in the eBPF code stay visible, as the outer cargo's own would be.
    for (level, rendered) in &diagnostics {
        if level == "warning" {
            for line in rendered.trim_end().lines() {
                println!("cargo:warning=eBPF: {line}");
            }
        }
    }
    let object = object.ok_or_else(|| anyhow!("the eBPF build reported no `pfwd` executable"))?;
    let dst = out_dir.join("pfwd");
    std::fs::copy(&object, &dst).with_context(|| format!("copying {} to {}", object.display(), dst.display()))?;
    Ok(())
}

/// First executable file named `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}
