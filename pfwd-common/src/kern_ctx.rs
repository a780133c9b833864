//! What the tc programs and the loader agree on to read `skb->ip_summed`, which `struct __sk_buff` does not show:
//! the programs get the kernel's `struct sk_buff` from the kfunc `bpf_cast_to_kern_ctx` (the verifier inlines it
//! into a register move) and read the field at the offset the loader found in the kernel's BTF.
//!
//! aya 0.14 cannot emit a kfunc call, so the programs emit a placeholder: a helper call with the made-up number
//! [`KERN_CTX_CALL`]. The loader rewrites every such instruction into the kfunc call, or, on a kernel without the
//! kfunc or the field, into `r0 = 0`, which the programs take as "unknown" (they then use the checksum helpers, as
//! before).

/// The placeholder helper number (no kernel helper has it: they are numbered from 0 up, a few hundred so far).
pub const KERN_CTX_CALL: i32 = 0x7066_6b63;

/// The programs' globals (`.rodata`, set by the loader) holding the byte of `struct sk_buff` that holds
/// `ip_summed`, and the field's bit position within that byte.
pub const SUMMED_BYTE_GLOBAL: &str = "PFWD_SUMMED_BYTE";
pub const SUMMED_SHIFT_GLOBAL: &str = "PFWD_SUMMED_SHIFT";

/// `ip_summed` values (include/linux/skbuff.h): no checksum work pending, or the NIC verified it. Above these,
/// CHECKSUM_COMPLETE (skb->csum holds the packet's sum, which must follow every change) and CHECKSUM_PARTIAL (the
/// L4 checksum field holds only the pseudo-header's sum, for the NIC or the stack to finish).
pub const CHECKSUM_NONE: u8 = 0;
pub const CHECKSUM_UNNECESSARY: u8 = 1;
/// The field's width in bits.
pub const SUMMED_BITS: u32 = 2;
