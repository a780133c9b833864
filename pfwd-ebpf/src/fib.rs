//! FIB lookups (`bpf_fib_lookup`): the parameter block of either family and the call, shared by `--fast-forward`
//! (`forward`: the next hop of a forwarded IPv4 packet), the XDP fast path (`xdp`: next hop and neighbour) and
//! MASQUERADE (`snat`: the source address the kernel would choose).
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::{TcContext, XdpContext},
};
use core::{ffi::c_void, mem::MaybeUninit};

use pfwd_common::Addr6;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The storage of a parameter block, on the caller's stack; [`params`] and [`params6`] fill it in place.
pub type Block = MaybeUninit<bpf_fib_lookup>;

/// Zeroes `block` and sets what every lookup of `family` takes: protocol `proto`, interface `ifindex` (the incoming
/// one, or the outgoing one with BPF_FIB_LOOKUP_OUTPUT).
///
/// Zeroed word by word with volatile stores, in place: `mem::zeroed` became a call of the byte-at-a-time `memset`
/// subprogram (52 iterations, a third of the XDP fast path's own samples in a profile), and volatile stores are not
/// merged back into one. In place, because a block returned by value is copied (64 bytes more of a stack the IPv6
/// programs have no room for).
#[inline(always)]
fn zeroed(block: &mut Block, family: u8, proto: u8, ifindex: u32) -> &mut bpf_fib_lookup {
    const WORDS: usize = size_of::<bpf_fib_lookup>() / 4;
    const _: () = assert!(size_of::<bpf_fib_lookup>().is_multiple_of(4) && align_of::<bpf_fib_lookup>() >= 4);
    let words = block.as_mut_ptr().cast::<u32>();
    for i in 0..WORDS {
        // SAFETY: within the block, 4-byte aligned (asserted above).
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte was written; all-zero is a valid parameter block (plain data).
    let p = unsafe { block.assume_init_mut() };
    p.family = family;
    p.l4_protocol = proto;
    p.ifindex = ifindex;
    p
}

/// The parameter block, in `block`, for the route of an IPv4 packet of protocol `proto` to `daddr` (network order),
/// on `ifindex`. Callers add what else the lookup should consider.
#[inline(always)]
pub fn params(block: &mut Block, proto: u8, ifindex: u32, daddr: u32) -> &mut bpf_fib_lookup {
    let p = zeroed(block, AF_INET, proto, ifindex);
    p.__bindgen_anon_4.ipv4_dst = daddr;
    p
}

/// The parameter block, in `block`, for the route of an IPv6 packet of protocol `proto` to `daddr`, on `ifindex`.
#[inline(always)]
pub fn params6<'b>(block: &'b mut Block, proto: u8, ifindex: u32, daddr: &Addr6) -> &'b mut bpf_fib_lookup {
    let p = zeroed(block, AF_INET6, proto, ifindex);
    p.__bindgen_anon_4.ipv6_dst = *daddr;
    p
}

/// Runs the lookup with `flags` (BPF_FIB_LOOKUP_*); the helper writes its results into `p`. True when it found a
/// route (BPF_FIB_LKUP_RET_SUCCESS).
#[inline(always)]
pub fn lookup(ctx: &TcContext, p: &mut bpf_fib_lookup, flags: u32) -> bool {
    lookup_in(ctx.skb.skb as *mut c_void, p, flags)
}

/// [`lookup`] from the XDP program.
#[inline(always)]
pub fn lookup_xdp(ctx: &XdpContext, p: &mut bpf_fib_lookup, flags: u32) -> bool {
    lookup_in(ctx.ctx as *mut c_void, p, flags)
}

/// [`lookup`] with the program's raw context (an `__sk_buff` or an `xdp_md`).
#[inline(always)]
fn lookup_in(ctx: *mut c_void, p: &mut bpf_fib_lookup, flags: u32) -> bool {
    // SAFETY: the program's valid context and a parameter block of the size passed.
    let rc = unsafe { fib_lookup(ctx, p, size_of::<bpf_fib_lookup>() as i32, flags) };
    rc == BPF_FIB_LKUP_RET_SUCCESS as i64
}

/// The source address a successful IPv4 lookup with BPF_FIB_LOOKUP_SRC chose (network order).
#[inline(always)]
pub fn src(p: &bpf_fib_lookup) -> u32 {
    // SAFETY: union of the IPv4 and IPv6 source; the IPv4 member is plain data.
    unsafe { p.__bindgen_anon_3.ipv4_src }
}

/// The source address a successful IPv6 lookup with BPF_FIB_LOOKUP_SRC chose.
#[inline(always)]
pub fn src6(p: &bpf_fib_lookup) -> Addr6 {
    // SAFETY: as above, the IPv6 member.
    unsafe { p.__bindgen_anon_3.ipv6_src }
}
