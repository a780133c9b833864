//! What differs between IPv4 and IPv6, behind one trait: the ICMP numbers, the flow and fragment tables, the IP
//! header's rewrite and checksums, the route lookup. The data path (`conntrack`, `dnat`, `snat`, `nat`, `fragment`
//! and the programs' paths) is written once, generic over [`Family`], and compiled once per family; the attached
//! programs run IPv4's and hand IPv6 packets to their IPv6 halves (a tail call).
use core::net::{Ipv4Addr, Ipv6Addr};

use aya_ebpf::{
    bindings::{BPF_FIB_LOOKUP_OUTPUT, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC},
    maps::LruHashMap,
    programs::TcContext,
};
use pfwd_common::{
    Addr, Addr6, Config, CtEntryOf, FlowTuple, FragEntryOf, FragKeyOf, IfaceInfo, PROTO_ICMP, PROTO_ICMPV6, Tuple,
    Tuple6, checksum, config_flag,
};

use aya_log_ebpf::macro_support::{Argument, IpFormatter};

use crate::{
    fib, forward,
    handoff::{HANDOFF4, HANDOFF6, Handoff},
    maps::{CONNTRACK, CONNTRACK_NEW, CONNTRACK6, CONNTRACK6_NEW, CT_SCRATCH4, CT_SCRATCH6, CtScratch, FRAGS, FRAGS6},
    nat,
    parse::{self, Embedded},
};

/// One address family's side of the data path (implemented by `u32` for IPv4 and [`Addr6`] for IPv6).
pub trait Family: Addr {
    /// How the logs show an address of this family (`{:i}`).
    type Shown: IpFormatter + Argument;
    fn shown(a: &Self) -> Self::Shown;

    /// The family's ICMP: its protocol number and echo types.
    const ICMP: u8;
    const ECHO_REQUEST: u8;
    const ECHO_REPLY: u8;
    /// Whether the ICMP checksum covers the pseudo-header (ICMPv6's does, RFC 4443; ICMP's does not).
    const ICMP_PSEUDO: bool;
    /// Whether the IP header has a checksum of its own (IPv4's; IPv6 has none), which balances a change of its
    /// addresses in the packet's sum (skb->csum).
    const HEADER_CHECKSUM: bool;

    /// Whether an ICMP message of type `ty` is an error that embeds the packet it is about.
    fn is_icmp_error(ty: u8) -> bool;

    /// The confirmed and unconfirmed flow tables (`conntrack`).
    fn conntrack() -> &'static LruHashMap<FlowTuple<Self>, CtEntryOf<Self>>;
    fn conntrack_new() -> &'static LruHashMap<FlowTuple<Self>, CtEntryOf<Self>>;
    /// The index of `conntrack_new`'s insert count in `CT_NEW_INSERTS`.
    const CT_NEW_INDEX: u32;

    /// The fragmented datagrams in flight (`fragment`).
    fn frags() -> &'static LruHashMap<FragKeyOf<Self>, FragEntryOf<Self>>;

    /// An address of this family from the rule engine's wide form ([`Addr::wide`]).
    fn from_wide(a: &Addr6) -> Self;

    /// The interface's primary address of this family (REDIRECT's target; unspecified when it has none).
    fn iface_addr(iface: &IfaceInfo) -> Self;

    /// This CPU's working memory for creating a flow ([`CtScratch`]).
    fn ct_scratch() -> Option<&'static mut CtScratch<Self>>;

    /// This CPU's handoff slot from tc ingress to tc egress (`crate::handoff`), of this family.
    fn handoff() -> Option<*mut Handoff<Self>>;

    /// Parses the packet embedded in an ICMP error at `ip_off` into `emb` (`end`: the outer packet's end).
    fn embedded(ctx: &TcContext, ip_off: usize, end: usize, emb: &mut Embedded<Self>) -> Option<()>;

    /// Rewrites the addresses of the IP header at `ip_off` from `from`'s to `to`'s (`addrs`: their
    /// `checksum::addrs_change`, for IPv4's header checksum); returns the header checksum before and after (IPv6 has
    /// none: 0 and 0).
    fn rewrite_ip(
        ctx: &TcContext,
        ip_off: usize,
        from: &FlowTuple<Self>,
        to: &FlowTuple<Self>,
        addrs: u32,
    ) -> Option<(u16, u16)>;

    /// Updates the L4 checksum at `csum_off` for the pseudo-header's address change from `from` to `to`.
    fn l4_csum_addrs(
        ctx: &TcContext,
        csum_off: usize,
        from: &FlowTuple<Self>,
        to: &FlowTuple<Self>,
        mangled0: u64,
    ) -> bool;

    /// `check` updated by hand for an address field going from `old` to `new`.
    fn csum_addr(check: u16, old: &Self, new: &Self) -> u16;

    /// The source address the kernel would choose for `t`'s destination out of `ifindex` (MASQUERADE), if the FIB
    /// gives one there.
    fn route_src(ctx: &TcContext, t: &FlowTuple<Self>, ifindex: u32) -> Option<Self>;

    /// `--fast-forward`: hands a translated packet (tuple `t`) to its next hop; None lets the stack have it.
    fn forward(ctx: &TcContext, t: &FlowTuple<Self>, cfg: &Config) -> Option<i32>;
}

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;

impl Family for u32 {
    type Shown = Ipv4Addr;
    #[inline(always)]
    fn shown(a: &u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(*a))
    }

    const ICMP: u8 = PROTO_ICMP;
    const ECHO_REQUEST: u8 = ICMP_ECHO_REQUEST;
    const ECHO_REPLY: u8 = ICMP_ECHO_REPLY;
    const ICMP_PSEUDO: bool = false;
    const HEADER_CHECKSUM: bool = true;
    const CT_NEW_INDEX: u32 = 0;

    #[inline(always)]
    fn is_icmp_error(ty: u8) -> bool {
        matches!(ty, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB)
    }

    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<Tuple, CtEntryOf<u32>> {
        &CONNTRACK
    }

    #[inline(always)]
    fn conntrack_new() -> &'static LruHashMap<Tuple, CtEntryOf<u32>> {
        &CONNTRACK_NEW
    }

    #[inline(always)]
    fn frags() -> &'static LruHashMap<FragKeyOf<u32>, FragEntryOf<u32>> {
        &FRAGS
    }

    #[inline(always)]
    fn from_wide(a: &Addr6) -> u32 {
        a[0]
    }

    #[inline(always)]
    fn iface_addr(iface: &IfaceInfo) -> u32 {
        iface.addr
    }

    #[inline(always)]
    fn ct_scratch() -> Option<&'static mut CtScratch<u32>> {
        // SAFETY: this CPU's value; the tc programs, the only users, run with bottom halves disabled, so nothing
        // else on this CPU uses it meanwhile.
        CT_SCRATCH4.get_ptr_mut(0).map(|w| unsafe { &mut *w })
    }

    #[inline(always)]
    fn handoff() -> Option<*mut Handoff<u32>> {
        HANDOFF4.get_ptr_mut(0)
    }

    #[inline(always)]
    fn embedded(ctx: &TcContext, ip_off: usize, end: usize, emb: &mut Embedded<u32>) -> Option<()> {
        parse::embedded4(ctx, ip_off, end, emb)
    }

    #[inline(always)]
    fn rewrite_ip(ctx: &TcContext, ip_off: usize, from: &Tuple, to: &Tuple, addrs: u32) -> Option<(u16, u16)> {
        nat::rewrite_ip4(ctx, ip_off, from, to, addrs)
    }

    #[inline(always)]
    fn l4_csum_addrs(ctx: &TcContext, csum_off: usize, from: &Tuple, to: &Tuple, mangled0: u64) -> bool {
        nat::l4_csum_addrs4(ctx, csum_off, from, to, mangled0)
    }

    #[inline(always)]
    fn csum_addr(check: u16, old: &u32, new: &u32) -> u16 {
        checksum::replace_u32(check, u32::from_be(*old), u32::from_be(*new))
    }

    #[inline(always)]
    fn route_src(ctx: &TcContext, t: &Tuple, ifindex: u32) -> Option<u32> {
        let mut block = fib::Block::uninit();
        let p = fib::params(&mut block, t.proto, ifindex, t.daddr);
        let found = fib::lookup(ctx, p, BPF_FIB_LOOKUP_OUTPUT | BPF_FIB_LOOKUP_SKIP_NEIGH | BPF_FIB_LOOKUP_SRC);
        let src = fib::src(p);
        (found && src != 0 && p.ifindex == ifindex).then_some(src)
    }

    #[inline(always)]
    fn forward(ctx: &TcContext, t: &Tuple, cfg: &Config) -> Option<i32> {
        // Tested here, not in the (not inlined) function: without `--fast-forward` a packet pays no call.
        if cfg.flags & config_flag::FAST_FORWARD == 0 {
            return None;
        }
        forward::redirect(ctx, t, cfg)
    }
}

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

impl Family for Addr6 {
    type Shown = Ipv6Addr;
    #[inline(always)]
    fn shown(a: &Addr6) -> Ipv6Addr {
        let mut b = [0u8; 16];
        for (i, w) in a.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Ipv6Addr::from(b)
    }

    const ICMP: u8 = PROTO_ICMPV6;
    const ECHO_REQUEST: u8 = ICMPV6_ECHO_REQUEST;
    const ECHO_REPLY: u8 = ICMPV6_ECHO_REPLY;
    const ICMP_PSEUDO: bool = true;
    const HEADER_CHECKSUM: bool = false;
    const CT_NEW_INDEX: u32 = 1;

    /// Neighbour discovery and router advertisements (133-137) are neither errors nor echoes: they pass untouched.
    #[inline(always)]
    fn is_icmp_error(ty: u8) -> bool {
        matches!(ty, ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED | ICMPV6_PARAMPROB)
    }

    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<Tuple6, CtEntryOf<Addr6>> {
        &CONNTRACK6
    }

    #[inline(always)]
    fn conntrack_new() -> &'static LruHashMap<Tuple6, CtEntryOf<Addr6>> {
        &CONNTRACK6_NEW
    }

    #[inline(always)]
    fn frags() -> &'static LruHashMap<FragKeyOf<Addr6>, FragEntryOf<Addr6>> {
        &FRAGS6
    }

    #[inline(always)]
    fn from_wide(a: &Addr6) -> Addr6 {
        *a
    }

    #[inline(always)]
    fn iface_addr(iface: &IfaceInfo) -> Addr6 {
        iface.addr6
    }

    #[inline(always)]
    fn ct_scratch() -> Option<&'static mut CtScratch<Addr6>> {
        // SAFETY: as above.
        CT_SCRATCH6.get_ptr_mut(0).map(|w| unsafe { &mut *w })
    }

    #[inline(always)]
    fn handoff() -> Option<*mut Handoff<Addr6>> {
        HANDOFF6.get_ptr_mut(0)
    }

    #[inline(always)]
    fn embedded(ctx: &TcContext, ip_off: usize, end: usize, emb: &mut Embedded<Addr6>) -> Option<()> {
        parse::embedded6(ctx, ip_off, end, emb)
    }

    #[inline(always)]
    fn rewrite_ip(ctx: &TcContext, ip_off: usize, from: &Tuple6, to: &Tuple6, addrs: u32) -> Option<(u16, u16)> {
        nat::rewrite_ip6(ctx, ip_off, from, to, addrs)
    }

    #[inline(always)]
    fn l4_csum_addrs(ctx: &TcContext, csum_off: usize, from: &Tuple6, to: &Tuple6, mangled0: u64) -> bool {
        nat::l4_csum_addrs6(ctx, csum_off, from, to, mangled0)
    }

    #[inline(always)]
    fn csum_addr(check: u16, old: &Addr6, new: &Addr6) -> u16 {
        let mut c = check;
        for i in 0..4 {
            c = checksum::replace_u32(c, u32::from_be(old[i]), u32::from_be(new[i]));
        }
        c
    }

    #[inline(always)]
    fn route_src(ctx: &TcContext, t: &Tuple6, ifindex: u32) -> Option<Addr6> {
        let mut block = fib::Block::uninit();
        let p = fib::params6(&mut block, t.proto, ifindex, &t.daddr);
        let found = fib::lookup(ctx, p, BPF_FIB_LOOKUP_OUTPUT | BPF_FIB_LOOKUP_SKIP_NEIGH | BPF_FIB_LOOKUP_SRC);
        let src = fib::src6(p);
        (found && !src.is_unspecified() && p.ifindex == ifindex).then_some(src)
    }

    /// IPv6 packets are left to the stack's forwarding (`--fast-forward` is IPv4's).
    #[inline(always)]
    fn forward(_ctx: &TcContext, _t: &Tuple6, _cfg: &Config) -> Option<i32> {
        None
    }
}
