//! The source hash of the `pfwd` binary: one hash over every file the binary is built from ([`INPUTS`]).
//!
//! `pfwd/build.rs` embeds it (`pfwd --version` shows it) and prints a `rerun-if-changed` for each input, so the
//! embedded hash is always the tree's; the test lab computes it from the tree and refuses a binary built from other
//! sources. Both include this file with `#[path]`; it needs nothing beyond `std`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The inputs of the `pfwd` binary, relative to the workspace root: files, or directories taken whole (hidden files
/// such as editor swap files excepted).
pub const INPUTS: [&str; 10] = [
    "Cargo.toml",
    "Cargo.lock",
    "pfwd/Cargo.toml",
    "pfwd/build.rs",
    "pfwd/build",
    "pfwd/src",
    "pfwd-common/Cargo.toml",
    "pfwd-common/src",
    "pfwd-ebpf/Cargo.toml",
    "pfwd-ebpf/src",
];

/// The hash of [`INPUTS`] under the workspace root `root`, as 16 hex digits: 64-bit FNV-1a over each file's path
/// (relative, in sorted order), length and contents. Stable across toolchains and machines.
pub fn source_hash(root: &Path) -> io::Result<String> {
    let mut files = Vec::new();
    for input in INPUTS {
        collect(root, Path::new(input), &mut files)?;
    }
    files.sort();
    let mut hash = Fnv::new();
    for rel in &files {
        let bytes = fs::read(root.join(rel)).map_err(|e| annotate(e, &root.join(rel)))?;
        hash.write(rel.to_string_lossy().as_bytes());
        hash.write(&[0]);
        hash.write(&(bytes.len() as u64).to_le_bytes());
        hash.write(&bytes);
    }
    Ok(format!("{:016x}", hash.0))
}

/// Adds `rel` (a file) or every file under it (a directory) to `files`.
fn collect(root: &Path, rel: &Path, files: &mut Vec<PathBuf>) -> io::Result<()> {
    let path = root.join(rel);
    let meta = fs::metadata(&path).map_err(|e| annotate(e, &path))?;
    if !meta.is_dir() {
        files.push(rel.to_path_buf());
        return Ok(());
    }
    for entry in fs::read_dir(&path).map_err(|e| annotate(e, &path))? {
        let name = entry?.file_name();
        if !name.to_string_lossy().starts_with('.') {
            collect(root, &rel.join(name), files)?;
        }
    }
    Ok(())
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// 64-bit FNV-1a.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
