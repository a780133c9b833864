//! Rewriting a packet's addresses and ports to a translated tuple, with checksum fixups.
//!
//! Fields are written directly into the packet and the IPv4 header checksum is updated by hand (RFC 1624, shared
//! with userspace tests in `pfwd-common`). The L4 checksum goes through `bpf_l4_csum_replace`, which knows about
//! partial checksums (CHECKSUM_PARTIAL) from local sockets and keeps a UDP checksum of 0 at 0 (BPF_F_MARK_MANGLED_0).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use pfwd_common::{PROTO_UDP, Tuple, checksum};

use crate::parse::{ETH_LEN, Packet, ptr_at};

/// Rewrites the packet (whose tuple is `pkt.tuple`) so its tuple becomes `to`. Returns false if the packet could not
/// be written (then it must be dropped: it may be half-rewritten).
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, to: &Tuple) -> bool {
    let from = &pkt.tuple;
    let addr_changed = from.saddr != to.saddr || from.daddr != to.daddr;
    let ports_changed = from.sport != to.sport || from.dport != to.dport;

    if addr_changed {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else { return false };
        // SAFETY: bounds checked by ptr_at; nothing else aliases the packet while we run.
        let ip = unsafe { &mut *ip };
        let mut check = u16::from_be_bytes(ip.check);
        if from.saddr != to.saddr {
            check = checksum::replace_u32(check, u32::from_be(from.saddr), u32::from_be(to.saddr));
            ip.src_addr = to.saddr.to_ne_bytes();
        }
        if from.daddr != to.daddr {
            check = checksum::replace_u32(check, u32::from_be(from.daddr), u32::from_be(to.daddr));
            ip.dst_addr = to.daddr.to_ne_bytes();
        }
        ip.check = check.to_be_bytes();
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
    let ok = (from.saddr == to.saddr
        || ctx.l4_csum_replace(csum_off, from.saddr as u64, to.saddr as u64, addr_flags).is_ok())
        && (from.daddr == to.daddr
            || ctx.l4_csum_replace(csum_off, from.daddr as u64, to.daddr as u64, addr_flags).is_ok())
        && (from.sport == to.sport
            || ctx.l4_csum_replace(csum_off, from.sport.to_be() as u64, to.sport.to_be() as u64, port_flags).is_ok())
        && (from.dport == to.dport
            || ctx.l4_csum_replace(csum_off, from.dport.to_be() as u64, to.dport.to_be() as u64, port_flags).is_ok());
    ok
}
