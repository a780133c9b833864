//! The loader's side of `pfwd_common::kern_ctx`: the tc programs read `skb->ip_summed` from the kernel's
//! `struct sk_buff`, which the kfunc `bpf_cast_to_kern_ctx` (Linux 6.2) hands them. The embedded object carries a
//! placeholder call instead (aya 0.14 cannot emit kfunc calls); this module finds the kfunc and the field in the
//! running kernel's BTF and rewrites every placeholder into the kfunc call, or, where either is missing, into
//! `r0 = 0`, with which the programs use the checksum helpers for every packet, as before.
use std::sync::OnceLock;

use anyhow::{Context, Result, ensure};
use object::{Object, ObjectSection, SectionKind};
use pfwd_common::kern_ctx::{KERN_CTX_CALL, SUMMED_BITS};

use crate::kernel_btf::KernelBtf;

/// What the running kernel offers: the kfunc's BTF id, and the byte and bit of `sk_buff` holding `ip_summed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkbAccess {
    pub kfunc: u32,
    pub summed_byte: u32,
    pub summed_shift: u32,
}

impl SkbAccess {
    /// Read from the running kernel's BTF once per process; None if it lacks the kfunc or the field, or the field
    /// is not a 2-bit field within one byte.
    pub fn running() -> Option<Self> {
        static ACCESS: OnceLock<Option<SkbAccess>> = OnceLock::new();
        *ACCESS.get_or_init(|| match KernelBtf::running() {
            Ok(btf) => Self::from_btf(&btf),
            Err(e) => {
                log::debug!("no kernel BTF for the by-hand checksum path: {e:#}");
                None
            }
        })
    }

    pub fn from_btf(btf: &KernelBtf) -> Option<Self> {
        let kfunc = btf.func_id("bpf_cast_to_kern_ctx")?;
        let f = btf.field("sk_buff", "ip_summed")?;
        (f.bits == SUMMED_BITS && f.offset % 8 + f.bits <= 8).then_some(Self {
            kfunc,
            summed_byte: f.offset / 8,
            summed_shift: f.offset % 8,
        })
    }
}

const BPF_CALL: u8 = 0x85;
const BPF_MOV64_IMM: u8 = 0xb7;
/// `src_reg` of a call to a kernel function (a kfunc), whose `imm` is its BTF id in vmlinux (`off` 0).
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;

/// The instruction bytes of the placeholder: `call KERN_CTX_CALL` (registers 0, offset 0).
fn placeholder() -> [u8; 8] {
    let mut insn = [BPF_CALL, 0, 0, 0, 0, 0, 0, 0];
    insn[4..].copy_from_slice(&KERN_CTX_CALL.to_le_bytes());
    insn
}

/// `object` with every placeholder in its code sections rewritten for `access` (None: into `r0 = 0`); how many
/// there were.
pub fn patch(object: &[u8], access: Option<SkbAccess>) -> Result<(Vec<u8>, usize)> {
    let file = object::File::parse(object).context("parsing the embedded eBPF object")?;
    let replacement = match access {
        Some(a) => {
            let mut insn = [BPF_CALL, BPF_PSEUDO_KFUNC_CALL << 4, 0, 0, 0, 0, 0, 0];
            insn[4..].copy_from_slice(&a.kfunc.to_le_bytes());
            insn
        }
        None => [BPF_MOV64_IMM, 0, 0, 0, 0, 0, 0, 0],
    };
    let mut out = object.to_vec();
    let mut count = 0;
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let Some((start, len)) = section.file_range() else { continue };
        let (start, len) = (start as usize, len as usize);
        ensure!(start + len <= out.len(), "section {:?} runs past the object", section.name());
        for insn in out[start..start + len].chunks_exact_mut(8) {
            if insn == placeholder() {
                insn.copy_from_slice(&replacement);
                count += 1;
            }
        }
    }
    Ok((out, count))
}

/// The embedded object, patched for the running kernel (once per process), and what it was patched for.
pub fn object(embedded: &'static [u8]) -> Result<(&'static [u8], Option<SkbAccess>)> {
    static PATCHED: OnceLock<(Vec<u64>, usize, Option<SkbAccess>)> = OnceLock::new();
    if let Some((words, len, access)) = PATCHED.get() {
        return Ok((&bytemuck::cast_slice(words)[..*len], *access));
    }
    let access = SkbAccess::running();
    let (bytes, count) = patch(embedded, access)?;
    ensure!(count > 0, "the embedded eBPF object has no kfunc placeholder (KERN_CTX_CALL): a stale build?");
    // Stored as words: object parsers (aya's) want the ELF 8-byte aligned, as `include_bytes_aligned!` keeps it.
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
    let (words, len, access) = PATCHED.get_or_init(|| (words, bytes.len(), access));
    Ok((&bytemuck::cast_slice(words)[..*len], *access))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::OBJECT;

    #[test]
    fn every_placeholder_is_rewritten_and_nothing_else() {
        let access = SkbAccess { kfunc: 0x1234, summed_byte: 130, summed_shift: 5 };
        for a in [Some(access), None] {
            let (patched, count) = patch(OBJECT, a).unwrap();
            assert!(count > 0, "the programs call the placeholder");
            assert_eq!(patched.len(), OBJECT.len());
            let changed: Vec<usize> = (0..OBJECT.len()).filter(|&i| patched[i] != OBJECT[i]).collect();
            // Only the placeholders' register byte and immediate (or opcode and immediate) changed.
            assert!(changed.len() <= count * 5, "{} bytes changed for {count} placeholders", changed.len());
            let (again, none_left) = patch(&patched, a).unwrap();
            assert_eq!((again, none_left), (patched, 0), "no placeholder is left");
        }
    }

    /// The object as a kernel without the kfunc gets it (`r0 = 0` for every placeholder) still verifies: then every
    /// L4 checksum goes through the helper.
    #[test]
    fn the_programs_load_without_the_kfunc_too() {
        use aya::programs::SchedClassifier;
        use pfwd_common::names;
        assert!(nix::unistd::geteuid().is_root(), "this test loads eBPF programs: run it as root (CI does)");
        crate::instance::ensure_bpffs().expect("bpffs at /sys/fs/bpf");
        // The object's maps are pinned by name: into a directory of this test's own, removed however it ends.
        struct PinDir(std::path::PathBuf);
        impl Drop for PinDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let pins = PinDir(format!("/sys/fs/bpf/pfwd-test-kern-ctx-{}", std::process::id()).into());
        std::fs::create_dir_all(&pins.0).unwrap();
        let (bytes, _) = patch(OBJECT, None).unwrap();
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&pins.0)
            .map_max_entries(names::CONNTRACK, 1024)
            .map_max_entries(names::CONNTRACK_NEW, 1024)
            .map_max_entries(names::CONNTRACK6, 1024)
            .map_max_entries(names::CONNTRACK6_NEW, 1024)
            .load(&bytemuck::cast_slice(&words)[..bytes.len()])
            .expect("the patched object's maps");
        let tc = [names::PROG_INGRESS, names::PROG_EGRESS].into_iter().chain(names::TAIL_PROGRAMS.map(|(n, _)| n));
        for name in tc {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            prog.load().unwrap_or_else(|e| panic!("{name} without the kfunc: {e:?}"));
        }
    }

    #[test]
    fn the_running_kernel_offers_the_kfunc_and_the_field() {
        // This machine's kernel (6.18, with BTF) has both; the programs then read ip_summed.
        let a = SkbAccess::running().expect("bpf_cast_to_kern_ctx and sk_buff.ip_summed in the kernel's BTF");
        assert!(a.summed_shift + SUMMED_BITS <= 8);
        let (obj, used) = object(OBJECT).unwrap();
        assert_eq!(used, Some(a));
        assert_eq!(obj.as_ptr() as usize % 8, 0);
        assert_eq!(obj.len(), OBJECT.len());
    }
}
