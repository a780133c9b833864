//! Rewriting a packet's addresses and ports to a translated tuple, with checksum fixups, for either family.
//!
//! Fields are written directly into the packet. The IPv4 header checksum is updated by hand (RFC 1624, shared with
//! userspace tests in `pfwd-common`); IPv6 has none. TCP/UDP (and ICMPv6, whose checksum covers the pseudo-header
//! too) checksums are updated by hand too when the skb is CHECKSUM_NONE or UNNECESSARY (`csum_state`), and otherwise
//! go through `bpf_l4_csum_replace`, which knows about partial checksums (CHECKSUM_PARTIAL, from local sockets and
//! GRO) and the packet's sum (CHECKSUM_COMPLETE). Neither ever leaves a UDP checksum of 0 (IPv4's "none" stays 0,
//! and a result of 0 is written 0xffff, which IPv6 requires). IPv4 ICMP checksums cover no pseudo-header and are
//! never partial: updated by hand, as are the checksums inside ICMP errors.
//!
//! A packet from a NIC that sums what it receives (CHECKSUM_COMPLETE) carries that sum in skb->csum, which must
//! follow every byte changed. The helpers keep it for the checksums they update; a checksum updated by hand balances
//! its own changes. What neither covers is kept by `packet_sum_follows`: a UDP datagram without a checksum (which
//! stays 0) and IPv6 addresses where no checksum changes with them (a later fragment).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_csum_diff, bpf_csum_update},
    programs::TcContext,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};
use pfwd_common::{Addr6, FlowTuple, PROTO_TCP, PROTO_UDP, Tuple, Tuple6, checksum};

use crate::{
    csum_state,
    family::Family,
    parse::{Embedded, Packet, ip_off, load_u16, ptr_at, store_ports, store_u16, store_u32},
};

/// Offsets of the checksum and the addresses in an IPv4 header.
const IP4_CHECK: usize = 10;
const IP4_SADDR: usize = 12;
const IP4_DADDR: usize = 16;

/// Offset of the identifier in an ICMP echo header, and of the ICMP checksum.
const ICMP_ID: usize = 4;
const ICMP_CHECK: usize = 2;

/// Rewrites the addresses of the IPv4 header at `ip_off` from `from` to `to`, fixing its checksum with `addrs`
/// (their `checksum::addrs_change`). Returns the old and new header checksums (an ICMP error embedding this header
/// must account for both changes), or None if the header is out of bounds.
#[inline(always)]
pub fn rewrite_ip4(ctx: &TcContext, ip_off: usize, from: &Tuple, to: &Tuple, addrs: u32) -> Option<(u16, u16)> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ip_off)?.cast::<u8>();
    // The checksum and addresses as the packet holds them, updated without byte swaps (see
    // `checksum::replace_u32`), each read and written as one word.
    let old = load_u16(ip.wrapping_add(IP4_CHECK));
    let check = checksum::apply(old, addrs);
    if from.saddr != to.saddr {
        store_u32(ip.wrapping_add(IP4_SADDR), to.saddr);
    }
    if from.daddr != to.daddr {
        store_u32(ip.wrapping_add(IP4_DADDR), to.daddr);
    }
    store_u16(ip.wrapping_add(IP4_CHECK), check);
    Some((u16::from_be(old), u16::from_be(check)))
}

/// Writes the IPv6 address `a` to the packet at `p` (bounds-checked by the caller), a word at a time.
#[inline(always)]
fn store_addr6(p: *mut u8, a: &Addr6) {
    for (i, w) in a.iter().enumerate() {
        store_u32(p.wrapping_add(4 * i), *w);
    }
}

/// Rewrites the addresses of the IPv6 header at `ip_off` from `from` to `to` (it has no checksum of its own: the
/// returned old and new checksums are 0). None if the header is out of bounds.
#[inline(always)]
pub fn rewrite_ip6(ctx: &TcContext, ip_off: usize, from: &Tuple6, to: &Tuple6, _addrs: u32) -> Option<(u16, u16)> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, ip_off)?;
    // SAFETY: bounds checked by ptr_at; nothing else aliases the packet while we run.
    let ip = unsafe { &mut *ip };
    if from.saddr != to.saddr {
        store_addr6(ip.src_addr.as_mut_ptr(), &to.saddr);
    }
    if from.daddr != to.daddr {
        store_addr6(ip.dst_addr.as_mut_ptr(), &to.daddr);
    }
    Some((0, 0))
}

/// Rewrites the ICMP echo header at `off`, of a packet whose tuple goes from `from` to `to`, by hand: its
/// identifier, and its own checksum with it (and, for ICMPv6, with the pseudo-header's addresses). Returns the old
/// and new checksums (an ICMP error embedding this echo must account for both changes), or None if the header is
/// out of bounds.
#[inline(always)]
fn rewrite_echo<A: Family>(ctx: &TcContext, off: usize, from: &FlowTuple<A>, to: &FlowTuple<A>) -> Option<(u16, u16)> {
    let hdr = ptr_at::<[u8; 8]>(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { &mut *hdr };
    let old = u16::from_be_bytes([hdr[ICMP_CHECK], hdr[ICMP_CHECK + 1]]);
    let mut new = checksum::replace_u16(old, from.sport, to.sport);
    if A::ICMP_PSEUDO {
        new = A::csum_addr(new, &from.saddr, &to.saddr);
        new = A::csum_addr(new, &from.daddr, &to.daddr);
    }
    hdr[ICMP_CHECK..ICMP_CHECK + 2].copy_from_slice(&new.to_be_bytes());
    hdr[ICMP_ID..ICMP_ID + 2].copy_from_slice(&to.sport.to_be_bytes());
    Some((old, new))
}

/// Rewrites only the addresses of the packet from `from` to `to` (a later fragment: no L4 header of its own).
/// Returns false if the header could not be written.
#[inline(always)]
pub fn rewrite_addresses<A: Family>(ctx: &TcContext, from: &FlowTuple<A>, to: &FlowTuple<A>) -> bool {
    A::rewrite_ip(ctx, ip_off(), from, to, checksum::addrs_change(from, to)).is_some()
        && (A::HEADER_CHECKSUM || packet_sum_follows(ctx, from, to, false))
}

/// Keeps skb->csum (CHECKSUM_COMPLETE: the sum over the packet, from a NIC that sums what it receives) right where
/// nothing else does: the L4 checksum left as it is (a UDP datagram without one, a later fragment), IPv6 addresses
/// (no header checksum balances them) and, with `ports`, the ports changed. Nothing to do for other skbs: the
/// helper refuses them, harmlessly. False only if the difference could not be computed.
#[inline(never)]
fn packet_sum_follows<A: Family>(ctx: &TcContext, from: &FlowTuple<A>, to: &FlowTuple<A>, ports: bool) -> bool {
    if A::HEADER_CHECKSUM && !ports {
        // Only IPv4 addresses changed: their header checksum balanced them.
        return true;
    }
    let mut diff: i64 = 0;
    if ports {
        // The ports as the packet holds them (network order), both in one word.
        let (old, new) = ([from.sport.to_be(), from.dport.to_be()], [to.sport.to_be(), to.dport.to_be()]);
        // SAFETY: two 4-byte arrays on our stack.
        diff = unsafe { bpf_csum_diff(old.as_ptr() as *mut u32, 4, new.as_ptr() as *mut u32, 4, 0) };
    }
    if !A::HEADER_CHECKSUM && diff >= 0 {
        // Both addresses: adjacent in the tuple (#[repr(C)]).
        let size = 2 * size_of::<A>() as u32;
        let (old, new) = (&from.saddr as *const A as *mut u32, &to.saddr as *const A as *mut u32);
        // SAFETY: both pointers are to `size` bytes of the tuples, saddr then daddr.
        diff = unsafe { bpf_csum_diff(old, size, new, size, diff as u32) };
    }
    if diff < 0 {
        return false;
    }
    // SAFETY: the program's own skb.
    unsafe { bpf_csum_update(ctx.skb.skb, diff as u32) };
    true
}

/// Rewrites the packet (whose tuple is `pkt.tuple`) so its tuple becomes `to`. Returns false if the packet could not
/// be written (then it must be dropped: it may be half-rewritten).
#[inline(always)]
pub fn rewrite<A: Family>(ctx: &TcContext, pkt: &Packet<A>, to: &FlowTuple<A>) -> bool {
    let from = &pkt.tuple;
    let addrs_changed = from.saddr != to.saddr || from.daddr != to.daddr;
    // The addresses' change to a checksum, summed once for the IPv4 header and the L4 checksum.
    let addrs = checksum::addrs_change(from, to);
    if addrs_changed && A::rewrite_ip(ctx, ip_off(), from, to, addrs).is_none() {
        return false;
    }
    let ports_changed = from.sport != to.sport || from.dport != to.dport;
    let echo = from.proto == A::ICMP;
    if echo && !A::ICMP_PSEUDO {
        // IPv4 echo: the identifier stands in for both ports (sport == dport in echo tuples).
        return !ports_changed || rewrite_echo(ctx, pkt.l4_off, from, to).is_some();
    }
    if ports_changed {
        if echo {
            // ICMPv6 echo: the identifier, checksummed below like a port.
            let Some(id) = ptr_at::<[u8; 2]>(ctx, pkt.l4_off + ICMP_ID) else { return false };
            // SAFETY: bounds checked by ptr_at.
            unsafe { *id = to.sport.to_be_bytes() };
        } else {
            let Some(ports) = ptr_at::<[u8; 4]>(ctx, pkt.l4_off) else { return false };
            store_ports(ports.cast(), to.sport, to.dport);
        }
    }

    let Some(csum_off) = pkt.l4_csum_off() else { return true };
    if from.proto == PROTO_UDP {
        let Some(c) = ptr_at::<[u8; 2]>(ctx, csum_off) else { return false };
        // SAFETY: bounds checked by ptr_at.
        if unsafe { *c } == [0, 0] {
            // No checksum, and none is made up: the helpers below would leave the packet, and skb->csum with it.
            return packet_sum_follows(ctx, from, to, ports_changed);
        }
    }
    if csum_state::by_hand(ctx) {
        return l4_csum_by_hand(ctx, csum_off, addrs + checksum::ports_change(from, to, !echo), from.proto);
    }
    // Helpers below invalidate packet pointers: no direct access after this point.
    let mangled0 = if from.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let port_flags = mangled0 | 2;
    (!addrs_changed || A::l4_csum_addrs(ctx, csum_off, from, to, mangled0))
        && (from.sport == to.sport
            || ctx.l4_csum_replace(csum_off, from.sport.to_be() as u64, to.sport.to_be() as u64, port_flags).is_ok())
        && (echo
            || from.dport == to.dport
            || ctx.l4_csum_replace(csum_off, from.dport.to_be() as u64, to.dport.to_be() as u64, port_flags).is_ok())
}

/// The L4 checksum at `csum_off` updated by hand for the `change` (summed by `checksum::addrs_change` and
/// `ports_change`: for an echo only the identifier): what `bpf_l4_csum_replace` does to a CHECKSUM_NONE or
/// UNNECESSARY skb, in one step. A UDP checksum is never 0 here (see `rewrite`); a result of 0 is written 0xffff
/// (BPF_F_MARK_MANGLED_0's rule, which IPv6 requires). The checksum is read and written as the packet holds it, as
/// the change is summed (see `checksum::replace_u32`); 0 and 0xffff read the same in either byte order.
#[inline(always)]
fn l4_csum_by_hand(ctx: &TcContext, csum_off: usize, change: u32, proto: u8) -> bool {
    let Some(c) = ptr_at::<[u8; 2]>(ctx, csum_off) else { return false };
    let c = c.cast::<u8>();
    let mut check = checksum::apply(load_u16(c), change);
    if check == 0 && proto == PROTO_UDP {
        check = 0xffff;
    }
    store_u16(c, check);
    true
}

/// The pseudo-header part of an L4 checksum update for IPv4 address changes (`bpf_l4_csum_replace`, one call per
/// changed address). `mangled0`: BPF_F_MARK_MANGLED_0 for UDP.
#[inline(always)]
pub fn l4_csum_addrs4(ctx: &TcContext, csum_off: usize, from: &Tuple, to: &Tuple, mangled0: u64) -> bool {
    let flags = BPF_F_PSEUDO_HDR as u64 | mangled0 | 4;
    (from.saddr == to.saddr || ctx.l4_csum_replace(csum_off, from.saddr as u64, to.saddr as u64, flags).is_ok())
        && (from.daddr == to.daddr || ctx.l4_csum_replace(csum_off, from.daddr as u64, to.daddr as u64, flags).is_ok())
}

/// `BPF_F_IPV6` (Linux 6.16): an IPv6 pseudo-header update, whose addresses are in the packet, leaves a
/// CHECKSUM_COMPLETE skb's sum alone. Older kernels refuse the flag; the update is then retried without it.
const BPF_F_IPV6: u64 = 1 << 7;

/// The pseudo-header part of an L4 checksum update for IPv6 address changes: the difference over both addresses
/// (adjacent in the tuple: one `bpf_csum_diff`), applied by `bpf_l4_csum_replace`.
#[inline(always)]
pub fn l4_csum_addrs6(ctx: &TcContext, csum_off: usize, from: &Tuple6, to: &Tuple6, mangled0: u64) -> bool {
    // SAFETY: both pointers are to 32 bytes of the tuples on our stack (saddr and daddr, adjacent in #[repr(C)]).
    let diff = unsafe { bpf_csum_diff(from.saddr.as_ptr() as *mut u32, 32, to.saddr.as_ptr() as *mut u32, 32, 0) };
    if diff < 0 {
        return false;
    }
    // Size 0: `to` is a checksum difference.
    let flags = BPF_F_PSEUDO_HDR as u64 | mangled0;
    ctx.l4_csum_replace(csum_off, 0, diff as u64, flags | BPF_F_IPV6).is_ok()
        || ctx.l4_csum_replace(csum_off, 0, diff as u64, flags).is_ok()
}

/// Accumulates 16-bit and 32-bit field changes into an ICMP checksum.
struct IcmpCheck(u16);

impl IcmpCheck {
    #[inline(always)]
    fn u16(&mut self, old: u16, new: u16) {
        self.0 = checksum::replace_u16(self.0, old, new);
    }
    #[inline(always)]
    fn addr<A: Family>(&mut self, old: &A, new: &A) {
        self.0 = A::csum_addr(self.0, old, new);
    }
}

/// Translates an ICMP error about a translated flow: the embedded packet (as the translated side sent it) becomes
/// `new_inner`, its IP checksum and (where present) its L4 checksum follow, the outer addresses that named the
/// embedded packet's endpoints follow them, and the outer IP and ICMP checksums account for everything (ICMPv6's
/// covers the outer pseudo-header too).
/// Writes the outer addresses written (as a tuple) into `outer`; None if the packet could not be written.
#[inline(always)]
pub fn rewrite_icmp_error<A: Family>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    emb: &Embedded<A>,
    new_inner: &FlowTuple<A>,
    outer: &mut FlowTuple<A>,
) -> Option<()> {
    let inner = &emb.tuple;
    let check = ptr_at::<[u8; 2]>(ctx, pkt.l4_off + ICMP_CHECK)?;
    // SAFETY: bounds checked by ptr_at.
    let mut icmp = IcmpCheck(u16::from_be_bytes(unsafe { *check }));

    // Embedded IP header: addresses and its checksum (IPv4) are all inside the ICMP payload.
    let (old_check, new_check) =
        A::rewrite_ip(ctx, emb.ip_off, inner, new_inner, checksum::addrs_change(inner, new_inner))?;
    icmp.addr(&inner.saddr, &new_inner.saddr);
    icmp.addr(&inner.daddr, &new_inner.daddr);
    icmp.u16(old_check, new_check);

    // Embedded L4: ports (or echo identifier), and the UDP/TCP checksum when the error carries it.
    let end = ip_off() + pkt.ip_len as usize;
    match inner.proto {
        PROTO_TCP | PROTO_UDP => {
            if let Some(csum_at) = checksum::l4_csum_offset(inner.proto)
                && emb.l4_off + csum_at + 2 <= end
            {
                let c = ptr_at::<[u8; 2]>(ctx, emb.l4_off + csum_at)?;
                // SAFETY: bounds checked by ptr_at.
                let c = unsafe { &mut *c };
                let old = u16::from_be_bytes(*c);
                // A UDP checksum of 0 means "none" and stays 0.
                if !(inner.proto == PROTO_UDP && old == 0) {
                    let mut new = A::csum_addr(old, &inner.saddr, &new_inner.saddr);
                    new = A::csum_addr(new, &inner.daddr, &new_inner.daddr);
                    new = checksum::replace_u16(new, inner.sport, new_inner.sport);
                    new = checksum::replace_u16(new, inner.dport, new_inner.dport);
                    if inner.proto == PROTO_UDP && new == 0 {
                        new = 0xffff;
                    }
                    *c = new.to_be_bytes();
                    icmp.u16(old, new);
                }
            }
            let ports = ptr_at::<[u8; 4]>(ctx, emb.l4_off)?;
            let [s0, s1] = new_inner.sport.to_be_bytes();
            let [d0, d1] = new_inner.dport.to_be_bytes();
            // SAFETY: bounds checked by ptr_at.
            unsafe { *ports = [s0, s1, d0, d1] };
            icmp.u16(inner.sport, new_inner.sport);
            icmp.u16(inner.dport, new_inner.dport);
        }
        p if p == A::ICMP => {
            // The embedded echo: its identifier, and its own checksum with it (as Linux's icmp_manip_pkt does).
            let (old, new) = rewrite_echo(ctx, emb.l4_off, inner, new_inner)?;
            icmp.u16(old, new);
            icmp.u16(inner.sport, new_inner.sport);
        }
        _ => {}
    }

    // Outer header: the error's endpoints that were the embedded packet's endpoints follow the translation (a router
    // on the path keeps its own source address).
    *outer = pkt.tuple;
    if outer.daddr == inner.saddr {
        outer.daddr = new_inner.saddr;
    }
    if outer.saddr == inner.daddr {
        outer.saddr = new_inner.daddr;
    }
    A::rewrite_ip(ctx, ip_off(), &pkt.tuple, outer, checksum::addrs_change(&pkt.tuple, outer))?;
    if A::ICMP_PSEUDO {
        icmp.addr(&pkt.tuple.saddr, &outer.saddr);
        icmp.addr(&pkt.tuple.daddr, &outer.daddr);
    }
    let check = ptr_at::<[u8; 2]>(ctx, pkt.l4_off + ICMP_CHECK)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *check = icmp.0.to_be_bytes() };
    Some(())
}
