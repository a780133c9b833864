//! Whether a packet's L4 checksum may be updated by hand, without `bpf_l4_csum_replace` (a helper call, and the
//! largest single cost of an established flow's packet after the flow lookup): only when the skb is
//! CHECKSUM_NONE or CHECKSUM_UNNECESSARY. A CHECKSUM_PARTIAL skb (built by a local socket with offloads, or merged
//! by GRO) holds only the pseudo-header's sum in the field, updated the other way round, and a CHECKSUM_COMPLETE one
//! carries the packet's sum in skb->csum, which must follow: both keep going through the helpers, which know them.
//!
//! `ip_summed` is read from the kernel's `struct sk_buff` (see `pfwd_common::kern_ctx`).
use aya_ebpf::programs::TcContext;
use pfwd_common::kern_ctx::{CHECKSUM_UNNECESSARY, KERN_CTX_CALL, SUMMED_BITS};

/// The byte of `struct sk_buff` holding `ip_summed`, and the field's lowest bit in it: set by the loader from the
/// kernel's BTF. Globals in a frozen read-only map: constants to the verifier, so the load below has a fixed offset
/// it can check against the struct.
#[unsafe(no_mangle)]
static PFWD_SUMMED_BYTE: u32 = 0;
#[unsafe(no_mangle)]
static PFWD_SUMMED_SHIFT: u32 = 0;

/// Whether the packet's L4 checksum may be updated by hand (see the module's comment).
#[inline(always)]
pub fn by_hand(ctx: &TcContext) -> bool {
    let skb: *const u8;
    // SAFETY: the placeholder the loader turns into `r0 = bpf_cast_to_kern_ctx(r1)` (the program's own context, a
    // move once inlined) or into `r0 = 0`; either way it clobbers at most what a call does.
    unsafe {
        core::arch::asm!(
            "call {call}",
            call = const KERN_CTX_CALL,
            inlateout("r1") ctx.skb.skb => _,
            lateout("r0") skb,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(nostack, readonly),
        )
    };
    if skb.is_null() {
        return false;
    }
    // SAFETY: plain reads of globals; volatile so the compiler does not fold in the defaults the loader overrides.
    let (byte, shift) =
        unsafe { (core::ptr::read_volatile(&PFWD_SUMMED_BYTE), core::ptr::read_volatile(&PFWD_SUMMED_SHIFT)) };
    // SAFETY: a byte of the kernel's sk_buff for this packet, inside the struct (the loader took it from BTF, and the
    // verifier checks it against the struct too).
    let b = unsafe { core::ptr::read_volatile(skb.wrapping_add(byte as usize)) };
    (b >> shift) & ((1 << SUMMED_BITS) - 1) <= CHECKSUM_UNNECESSARY
}
