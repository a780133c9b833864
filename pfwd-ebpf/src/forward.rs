//! `--fast-forward`: packets of pfwd's flows that the router forwards skip the IP stack. After translation, a FIB
//! lookup finds the next hop; the program decrements the TTL itself and hands the packet to the egress interface with
//! `bpf_redirect_neigh` (which resolves the neighbour). The egress programs still run there (SNAT of a full NAT).
//! This skips netfilter (FORWARD rules, conntrack) for these packets, which is why it is opt-in.
use aya_ebpf::{bindings::BPF_FIB_LOOKUP_SKIP_NEIGH, helpers::bpf_redirect_neigh, programs::TcContext};
use network_types::ip::Ipv4Hdr;
use pfwd_common::{Config, Tuple, checksum, config_flag};

/// `skb->pkt_type` of a frame sent to this host's link-layer address.
const PACKET_HOST: u32 = 0;

use crate::{
    fib,
    parse::{ifindex, ip_off, ptr_at},
};

/// Redirects the packet (whose tuple is now `t`) to its next hop if it is forwarded; None lets the stack have it
/// (local delivery, TTL about to expire, IP options, MTU exceeded, no route, forwarding disabled, fast path off).
#[inline(never)]
pub fn redirect(ctx: &TcContext, t: &Tuple, cfg: &Config) -> Option<i32> {
    // bpf_redirect_neigh needs the link-layer header of an Ethernet-type device to replace; a packet that came in on
    // a layer-3 device (tun, WireGuard, PPP) has none, and the kernel would drop it: the stack forwards those.
    if cfg.flags & config_flag::FAST_FORWARD == 0 || ip_off() == 0 {
        return None;
    }
    // Only packets sent to this host's link-layer address: the stack forwards no broadcast, multicast or
    // other-host frame (seen in promiscuous mode), translated or not.
    // SAFETY: the context's __sk_buff is valid for the program's run.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return None;
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, ip_off())?;
    // SAFETY: bounds checked by ptr_at.
    let (vihl, ttl, proto, tot_len) =
        unsafe { ((*ip).vihl, (*ip).ttl, (*ip).proto, u16::from_be_bytes((*ip).tot_len)) };
    if ttl <= 1 {
        // The stack sends the time-exceeded error.
        return None;
    }
    if vihl & 0x0f != 5 {
        // IP options: the stack acts on them (record route, timestamps, dropping source-routed packets while
        // accept_source_route is off).
        return None;
    }
    let mut block = fib::Block::uninit();
    let p = fib::params(&mut block, t.proto, ifindex(ctx), t.daddr);
    p.sport = t.sport.to_be();
    p.dport = t.dport.to_be();
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_3.ipv4_src = t.saddr;
    // Success means a forwarding route within the MTU, with forwarding enabled on the way in.
    if !fib::lookup(ctx, p, BPF_FIB_LOOKUP_SKIP_NEIGH) {
        return None;
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, ip_off())?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    // TTL and protocol share one 16-bit word of the header checksum.
    let old = u16::from_be_bytes([ttl, proto]);
    let new = u16::from_be_bytes([ttl - 1, proto]);
    ip.ttl = ttl - 1;
    ip.check = checksum::replace_u16(u16::from_be_bytes(ip.check), old, new).to_be_bytes();
    // SAFETY: plain helper call; NULL params make the kernel resolve the neighbour of the route's next hop.
    Some(unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}
