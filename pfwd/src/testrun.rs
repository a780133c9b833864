//! BPF_PROG_TEST_RUN of a tc program on an skb marked CHECKSUM_COMPLETE, for the packet tests and the fuzzer.
//!
//! A NIC that checksums what it receives (mlx5 and others) hands the stack `skb->csum`, the sum over the packet: a
//! program that rewrites the packet must keep it right, or the stack's later check fails (a "hw csum failure" and
//! a packet verified again in software, or dropped). aya 0.14's test run has no way to ask for such an skb; Linux
//! 6.16's `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` builds one (skb->csum over the packet) and, after the run, checks that
//! skb->csum still is the sum over the packet the program left: `EBADMSG` when it is not. So every packet run this
//! way also proves the program kept skb->csum right.
use std::os::fd::{AsFd, AsRawFd};

use aya::programs::SchedClassifier;

const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// Linux 6.16+.
const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// The `test` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// The program's return value and the packet it left (written into `out`, truncated to its length).
pub struct Outcome {
    pub retval: u32,
    pub len: usize,
}

/// Runs `prog` once on `pkt` in an skb with CHECKSUM_COMPLETE. `Err(EBADMSG)`: the program left skb->csum wrong.
/// `Err(EINVAL)` also on kernels older than 6.16 (see [`supported`]).
pub fn run_complete(prog: &SchedClassifier, pkt: &[u8], out: &mut [u8]) -> std::io::Result<Outcome> {
    let fd = prog.fd().map_err(std::io::Error::other)?.as_fd().as_raw_fd();
    let mut attr = TestRunAttr {
        prog_fd: fd as u32,
        data_size_in: pkt.len() as u32,
        data_size_out: out.len() as u32,
        data_in: pkt.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        flags: BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
        ..Default::default()
    };
    // SAFETY: a fully initialised `test` member of bpf_attr; its pointers are to live slices of the sizes given.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &mut attr as *mut TestRunAttr, size_of::<TestRunAttr>())
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Outcome { retval: attr.retval, len: attr.data_size_out as usize })
}

/// Whether this kernel builds CHECKSUM_COMPLETE test skbs: `prog` run on a frame no pfwd program looks at (a local
/// experimental ethertype), so that the probe changes no state.
pub fn supported(prog: &SchedClassifier) -> bool {
    let mut frame = [0u8; 60];
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    let mut out = [0u8; 64];
    run_complete(prog, &frame, &mut out).is_ok()
}
