//! Rewriting a packet's addresses and ports to a translated tuple, with checksum fixups.
//!
//! Fields are written directly into the packet and the IPv4 header checksum is updated by hand (RFC 1624, shared
//! with userspace tests in `pfwd-common`). TCP/UDP checksums go through `bpf_l4_csum_replace`, which knows about
//! partial checksums (CHECKSUM_PARTIAL) from local sockets and keeps a UDP checksum of 0 at 0
//! (BPF_F_MARK_MANGLED_0). ICMP checksums cover no pseudo-header and are never partial: updated by hand.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use pfwd_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, Tuple, checksum};

use crate::parse::{Embedded, Packet, ip_off, ptr_at};

/// Offset of the identifier in an ICMP echo header, and of the ICMP checksum.
const ICMP_ID: usize = 4;
const ICMP_CHECK: usize = 2;

/// Rewrites the addresses of the IPv4 header at `ip_off` from `from` to `to`, fixing its checksum. Returns the old
/// and new header checksums (an ICMP error embedding this header must account for both changes), or None if the
/// header is out of bounds.
#[inline(always)]
fn rewrite_ip(ctx: &TcContext, ip_off: usize, from: &Tuple, to: &Tuple) -> Option<(u16, u16)> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ip_off)?;
    // SAFETY: bounds checked by ptr_at; nothing else aliases the packet while we run.
    let ip = unsafe { &mut *ip };
    let old = u16::from_be_bytes(ip.check);
    let mut check = old;
    if from.saddr != to.saddr {
        check = checksum::replace_u32(check, u32::from_be(from.saddr), u32::from_be(to.saddr));
        ip.src_addr = to.saddr.to_ne_bytes();
    }
    if from.daddr != to.daddr {
        check = checksum::replace_u32(check, u32::from_be(from.daddr), u32::from_be(to.daddr));
        ip.dst_addr = to.daddr.to_ne_bytes();
    }
    ip.check = check.to_be_bytes();
    Some((old, check))
}

/// Rewrites the identifier of the ICMP echo header at `off` from `from` to `to` (host order), and the echo's own
/// checksum with it. Returns the old and new checksums (an ICMP error embedding this echo must account for both
/// changes), or None if the header is out of bounds.
#[inline(always)]
fn rewrite_echo_id(ctx: &TcContext, off: usize, from: u16, to: u16) -> Option<(u16, u16)> {
    let hdr = ptr_at::<[u8; 8]>(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { &mut *hdr };
    let old = u16::from_be_bytes([hdr[ICMP_CHECK], hdr[ICMP_CHECK + 1]]);
    let new = checksum::replace_u16(old, from, to);
    hdr[ICMP_CHECK..ICMP_CHECK + 2].copy_from_slice(&new.to_be_bytes());
    hdr[ICMP_ID..ICMP_ID + 2].copy_from_slice(&to.to_be_bytes());
    Some((old, new))
}

/// Rewrites only the IPv4 addresses of the packet from `from` to `to` (a later fragment: no L4 header of its own).
/// Returns false if the header could not be written.
#[inline(always)]
pub fn rewrite_addresses(ctx: &TcContext, from: &Tuple, to: &Tuple) -> bool {
    rewrite_ip(ctx, ip_off(), from, to).is_some()
}

/// Rewrites the packet (whose tuple is `pkt.tuple`) so its tuple becomes `to`. Returns false if the packet could not
/// be written (then it must be dropped: it may be half-rewritten).
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, to: &Tuple) -> bool {
    let from = &pkt.tuple;
    if (from.saddr != to.saddr || from.daddr != to.daddr) && rewrite_ip(ctx, ip_off(), from, to).is_none() {
        return false;
    }
    let ports_changed = from.sport != to.sport || from.dport != to.dport;
    if from.proto == PROTO_ICMP {
        // Echo: the identifier stands in for both ports (sport == dport in echo tuples).
        return !ports_changed || rewrite_echo_id(ctx, pkt.l4_off, from.sport, to.sport).is_some();
    }
    if ports_changed {
        let Some(ports) = ptr_at::<[u8; 4]>(ctx, pkt.l4_off) else { return false };
        let [s0, s1] = to.sport.to_be_bytes();
        let [d0, d1] = to.dport.to_be_bytes();
        // SAFETY: bounds checked by ptr_at.
        unsafe { *ports = [s0, s1, d0, d1] };
    }

    // Helpers below invalidate packet pointers: no direct access after this point.
    let Some(csum_off) = pkt.l4_csum_off() else { return true };
    let mangled0 = if from.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let addr_flags = BPF_F_PSEUDO_HDR as u64 | mangled0 | 4;
    let port_flags = mangled0 | 2;
    (from.saddr == to.saddr || ctx.l4_csum_replace(csum_off, from.saddr as u64, to.saddr as u64, addr_flags).is_ok())
        && (from.daddr == to.daddr
            || ctx.l4_csum_replace(csum_off, from.daddr as u64, to.daddr as u64, addr_flags).is_ok())
        && (from.sport == to.sport
            || ctx.l4_csum_replace(csum_off, from.sport.to_be() as u64, to.sport.to_be() as u64, port_flags).is_ok())
        && (from.dport == to.dport
            || ctx.l4_csum_replace(csum_off, from.dport.to_be() as u64, to.dport.to_be() as u64, port_flags).is_ok())
}

/// Accumulates 16-bit and 32-bit field changes into an ICMP checksum.
struct IcmpCheck(u16);

impl IcmpCheck {
    #[inline(always)]
    fn u16(&mut self, old: u16, new: u16) {
        self.0 = checksum::replace_u16(self.0, old, new);
    }
    #[inline(always)]
    fn addr(&mut self, old: u32, new: u32) {
        self.0 = checksum::replace_u32(self.0, u32::from_be(old), u32::from_be(new));
    }
}

/// Translates an ICMP error about a translated flow: the embedded packet (as the translated side sent it) becomes
/// `new_inner`, its IP checksum and (where present) its L4 checksum follow, the outer addresses that named the
/// embedded packet's endpoints follow them, and the outer IP and ICMP checksums account for everything.
/// Returns the outer addresses written (as a tuple), or None if the packet could not be written.
#[inline(always)]
pub fn rewrite_icmp_error(ctx: &TcContext, pkt: &Packet, emb: &Embedded, new_inner: &Tuple) -> Option<Tuple> {
    let inner = &emb.tuple;
    let check = ptr_at::<[u8; 2]>(ctx, pkt.l4_off + ICMP_CHECK)?;
    // SAFETY: bounds checked by ptr_at.
    let mut icmp = IcmpCheck(u16::from_be_bytes(unsafe { *check }));

    // Embedded IP header: addresses and its checksum are all inside the ICMP payload.
    let (old_check, new_check) = rewrite_ip(ctx, emb.ip_off, inner, new_inner)?;
    icmp.addr(inner.saddr, new_inner.saddr);
    icmp.addr(inner.daddr, new_inner.daddr);
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
                    let mut new = checksum::replace_u32(old, u32::from_be(inner.saddr), u32::from_be(new_inner.saddr));
                    new = checksum::replace_u32(new, u32::from_be(inner.daddr), u32::from_be(new_inner.daddr));
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
        PROTO_ICMP => {
            // The embedded echo: its identifier, and its own checksum with it (as Linux's icmp_manip_pkt does).
            let (old, new) = rewrite_echo_id(ctx, emb.l4_off, inner.sport, new_inner.sport)?;
            icmp.u16(old, new);
            icmp.u16(inner.sport, new_inner.sport);
        }
        _ => {}
    }

    // Outer header: the error's endpoints that were the embedded packet's endpoints follow the translation (a router
    // on the path keeps its own source address).
    let mut outer = pkt.tuple;
    if outer.daddr == inner.saddr {
        outer.daddr = new_inner.saddr;
    }
    if outer.saddr == inner.daddr {
        outer.saddr = new_inner.daddr;
    }
    rewrite_ip(ctx, ip_off(), &pkt.tuple, &outer)?;
    let check = ptr_at::<[u8; 2]>(ctx, pkt.l4_off + ICMP_CHECK)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe { *check = icmp.0.to_be_bytes() };
    Some(outer)
}
