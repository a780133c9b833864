//! What a tcx program returns (`enum tcx_action_base` of the kernel's UAPI), as a number userspace can compare with
//! what BPF_PROG_TEST_RUN reports. The kernel programs return aya-ebpf's generated constants (`TCX_NEXT`, ...), and
//! `pfwd-ebpf` checks at compile time that these equal them.

/// Let the next program on the hook (or the stack) have the packet. pfwd returns it for passed and translated
/// packets alike, so other programs attached after it still run.
pub const NEXT: i32 = -1;
/// Accept the packet, skipping the programs after this one (pfwd never returns it).
pub const PASS: i32 = 0;
/// Drop the packet.
pub const DROP: i32 = 2;
/// The packet was redirected (`bpf_redirect_neigh`, the `--fast-forward` path).
pub const REDIRECT: i32 = 7;
