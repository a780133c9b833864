//! The XDP fast path (`pfwd attach --xdp`): packets of established flows that this router forwards are translated,
//! routed (`bpf_fib_lookup`, neighbour included) and sent to their egress interface (`XDP_REDIRECT` through the
//! `XDP_TX` devmap) before the kernel builds an skb for them. Everything else goes on (`XDP_PASS`) to the tc
//! programs, which stay the one place where flows are created and end: packets of no flow or of a closing or expired
//! one, TCP SYN/FIN/RST, ICMP, fragments, IPv4 options (the stack acts on them: record route, source routes it
//! refuses), IPv6, TTL about to expire, local delivery, VLAN tags, broadcast and multicast frames, malformed headers
//! (as tc's parser sees them), whatever the FIB cannot resolve (no route, no neighbour yet, MTU exceeded, forwarding
//! off), and packets leaving through an interface without pfwd's XDP program.
//!
//! A packet gets here what the tc path gives it: the translation at ingress (its flow's entry for that hook), then
//! the one at egress as tc's egress would find it (see below), the same rule and backend counters and the same
//! conntrack refresh. Like `--fast-forward` it skips
//! netfilter (FORWARD rules, the kernel's conntrack, the egress qdisc), which is why it is opt-in.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use pfwd_common::{
    Addr, Config, CtEntry, IfaceMacSlot, PROTO_TCP, PROTO_UDP, Stat, Tuple, checksum, ct_flag, ct_hook, dir, hook,
};

use crate::{
    conntrack, fib,
    maps::{CONNTRACK, CONNTRACK_NEW, IFACE_MACS, IFACES, XDP_TX, count, count_backend, count_rule},
    parse::{
        ETH_P_IP, Packet, TCP_FIN, TCP_RST, TCP_SYN, frag, icmp, load_ports, load_u16, load_u32, store_ports,
        store_u16, store_u32,
    },
    rules,
};

pub const PASS: u32 = xdp_action::XDP_PASS;

const ETH_LEN: usize = EthHdr::LEN;
const IP_MF_OFFSET: u16 = 0x3fff;
/// Offsets in the IPv4 header: TTL (with the protocol after it), header checksum, addresses.
const IP_TTL: usize = 8;
const IP_CHECK: usize = 10;
const IP_SADDR: usize = 12;
const IP_DADDR: usize = 16;
/// Offsets of the checksum in the TCP and UDP headers.
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

/// A pointer to a `T` at `off` in the frame, if the frame holds it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// One translation the tc path would apply to the packet, at one hook: from the entry `entry` of the flow tuple
/// `key` (the packet's tuple as that hook sees it).
struct Step {
    key: Tuple,
    entry: *mut CtEntry,
}

/// The action for the frame in `ctx`: XDP_REDIRECT when the fast path sent it, else XDP_PASS.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    fast_path(ctx).unwrap_or(PASS)
}

/// The live, not closing entry of `t` (confirmed or not: `conntrack::track` below records the packet in either as
/// the tc programs would). Err(true) when `t` has no entry at all; Err(false) when its entry is expired or closing
/// (the tc programs remove it or start a new flow).
#[inline(always)]
fn live(t: &Tuple, now: u64, cfg: &Config) -> Result<*mut CtEntry, bool> {
    let Some(e) = CONNTRACK.get_ptr_mut(t).or_else(|| CONNTRACK_NEW.get_ptr_mut(t)) else { return Err(true) };
    // SAFETY: a map value pointer from a successful lookup.
    let entry = unsafe { &*e };
    if entry.expired(now, cfg) || entry.is_closed() {
        return Err(false);
    }
    Ok(e)
}

#[inline(always)]
fn fast_path(ctx: &XdpContext) -> Option<u32> {
    let cfg = crate::maps::CONFIG.get(0)?;
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let (dst0, ether_type) = unsafe { ((*eth).dst_addr[0], (*eth).ether_type) };
    // A broadcast or multicast frame (the group bit) is never forwarded by the stack (`ip_forward` wants
    // PACKET_HOST): its fate is the stack's.
    if dst0 & 1 != 0 || u16::from_be(ether_type) != ETH_P_IP {
        return None;
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    let proto = ip.proto;
    // With IP options the stack has work of its own (record route, timestamps, dropping source-routed packets while
    // accept_source_route is off): those packets take the tc path to it.
    if ip.vihl >> 4 != 4
        || ihl != Ipv4Hdr::LEN
        || tot_len < ihl
        || ctx.data() + ETH_LEN + tot_len > ctx.data_end()
        || u16::from_be_bytes(ip.frags) & IP_MF_OFFSET != 0
        || ip.ttl <= 1
        || !(proto == PROTO_TCP || proto == PROTO_UDP)
    {
        return None;
    }
    let l4_off = ETH_LEN + ihl;
    let hdr_len = if proto == PROTO_TCP { 20 } else { 8 };
    if tot_len < ihl + hdr_len {
        return None;
    }
    let l4 = ptr_at::<[u8; 8]>(ctx, l4_off)?;
    let (sport, dport) = load_ports(l4.cast());
    let mut tcp_flags = 0;
    if proto == PROTO_TCP {
        let f = ptr_at::<[u8; 2]>(ctx, l4_off + 12)?;
        // SAFETY: as above.
        let [doff, flags] = unsafe { *f };
        tcp_flags = flags;
        // A data offset below 5 words is malformed: tc's parser passes it untranslated (and counts it), so the
        // fast path must not translate it either. State changes are the tc programs' to record.
        if doff >> 4 < 5 || tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
            return None;
        }
    }
    let t0 = Tuple::new(load_u32(ip.src_addr.as_ptr()), load_u32(ip.dst_addr.as_ptr()), sport, dport, proto);
    let now = conntrack::clock_ns(cfg);
    let e0 = live(&t0, now, cfg).ok()?;
    // SAFETY: a map value pointer from a successful lookup.
    let at_ingress = unsafe { (*e0).hook } == ct_hook::INGRESS;
    // The translation at ingress (none when the flow is translated at egress only), and the tuple routed.
    let (ingress, t1) = if at_ingress {
        // SAFETY: as above.
        (Some(Step { key: t0, entry: e0 }), unsafe { (*e0).xlat.copied() })
    } else {
        (None, t0)
    };
    let in_ifindex = ctx.ingress_ifindex() as u32;
    // Only frames sent to this interface: one for another host (seen in promiscuous mode: tcpdump, a bridge port)
    // is dropped by the stack (PACKET_OTHERHOST), translated or not.
    // SAFETY: bounds checked by ptr_at above; the frame has not moved.
    if !sent_to(in_ifindex, unsafe { &(*eth).dst_addr }) {
        return None;
    }
    let mut block = fib::Block::uninit();
    let p = fib::params(&mut block, proto, in_ifindex, t1.daddr);
    p.sport = t1.sport.to_be();
    p.dport = t1.dport.to_be();
    p.__bindgen_anon_1.tot_len = tot_len as u16;
    p.__bindgen_anon_3.ipv4_src = t1.saddr;
    // Success means a forwarding route within the MTU, forwarding enabled on the way in, and a resolved neighbour.
    if !fib::lookup_xdp(ctx, p, 0) {
        return None;
    }
    let out = p.ifindex;
    // The translation at egress, as tc's egress would find it after the handoff (`crate::handoff`): once the flow is
    // settled there, none unless the flow has more to do at egress (a full NAT), and then the translated tuple's
    // flow, if it still has one. Before (its first packets), the translated tuple's flow, or none when no SNAT rule
    // would open one for it (that is tc's to do); the packet then settles the flow, as tc's egress would.
    let flags = if at_ingress {
        // SAFETY: as above.
        unsafe { (*e0).flags }
    } else {
        0
    };
    let settled = flags & ct_flag::SETTLED != 0;
    let egress = if !at_ingress {
        Some(Step { key: t0, entry: e0 })
    } else if settled && flags & ct_flag::EGRESS_TOO == 0 {
        None
    } else {
        match live(&t1, now, cfg) {
            // SAFETY: as above.
            Ok(e) if unsafe { (*e).hook } == ct_hook::EGRESS => Some(Step { key: t1, entry: e }),
            Ok(_) => None,
            Err(false) => return None,
            // No flow at egress: before the flow is settled a UDP packet may open one there (a TCP packet without
            // SYN does not).
            Err(true) => {
                let set = cfg.active();
                if !settled
                    && proto == PROTO_UDP
                    && set.counts.post != 0
                    && rules::find(&t1, out, hook::POSTROUTING, &set, false).is_some()
                {
                    return None;
                }
                None
            }
        }
    };
    // The redirect's target, chosen now (the kernel acts on it when the program returns XDP_REDIRECT): an egress
    // interface without pfwd's XDP program is not in the devmap, and the frame goes on untouched to the stack. One
    // devmap lookup, where checking first and redirecting at the end took two.
    let redirect = XDP_TX.redirect(out, u64::from(PASS)).ok()?;
    if at_ingress && !settled {
        conntrack::settle(&t0, &t1);
    }
    let t2 = match &egress {
        // SAFETY: as above.
        Some(s) => unsafe { (*s.entry).xlat.copied() },
        None => t1,
    };
    // What the tc programs would record and count, per hook that translates.
    let pkt = Packet {
        tuple: t0,
        l4_off,
        tcp_flags,
        ip_len: tot_len as u32,
        icmp: icmp::ABSENT,
        frag: frag::WHOLE,
        ip_id: 0,
    };
    for (step, to) in [(&ingress, &t1), (&egress, &t2)] {
        if let Some(s) = step {
            account(s, to, &pkt, now);
        }
    }
    rewrite(ctx, l4_off, &t0, &t2, &p.smac, &p.dmac)?;
    count(Stat::XdpForwarded);
    Some(redirect)
}

/// Whether `dst` is the link-layer address of the interface `ifindex`: from its slot in `IFACE_MACS` when it owns
/// one, else from `IFACES` (a hash lookup). None of either: not an interface of pfwd's.
#[inline(always)]
fn sent_to(ifindex: u32, dst: &[u8; 6]) -> bool {
    if let Some(tag) = IfaceMacSlot::tag(ifindex)
        && let Some(&word) = IFACE_MACS.get(IfaceMacSlot::index(ifindex))
        && IfaceMacSlot::owned(word, tag)
    {
        let dst = dst.as_ptr();
        return word == tag | IfaceMacSlot::mac_bits_of(load_u32(dst), load_u16(dst.wrapping_add(4)));
    }
    // SAFETY: plain read of a map value, which stays valid for the program's run.
    unsafe { IFACES.get(&ifindex) }.is_some_and(|i| i.mac == *dst)
}

/// Records the packet in the flow of `s` as the tc program of its hook would (refresh, counters); `to` is what the
/// packet becomes at that hook.
#[inline(always)]
fn account(s: &Step, to: &Tuple, pkt: &Packet<u32>, now: u64) {
    // SAFETY: a map value pointer from a successful lookup.
    let (slot, flags, d) = unsafe { ((*s.entry).rule_slot, (*s.entry).flags, (*s.entry).dir) };
    conntrack::track(&s.key, s.entry, pkt, now);
    count_rule(slot, pkt.ip_len, false);
    if flags & ct_flag::BACKENDS != 0 {
        // The backend: where the original direction goes, where replies come from.
        let (addr, port) = if d == dir::ORIGINAL { (to.daddr, to.dport) } else { (s.key.saddr, s.key.sport) };
        count_backend(slot, &addr.wide(), port, pkt.ip_len, false);
    }
}

/// Rewrites the frame from `from` to `to` (addresses, ports, both checksums), decrements the TTL, and gives it the
/// next hop's link-layer addresses. Fields are read and written as whole words, and checksums updated on them as
/// loaded, without byte swaps (see `checksum::replace_u32`), each in one step for all its fields' changes.
#[inline(always)]
fn rewrite(ctx: &XdpContext, l4_off: usize, from: &Tuple, to: &Tuple, smac: &[u8; 6], dmac: &[u8; 6]) -> Option<()> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)?.cast::<u8>();
    // TTL and protocol share one 16-bit word of the header checksum: the TTL is its first byte, the low half.
    let ttl_proto = load_u16(ip.wrapping_add(IP_TTL));
    // Only what changes, as the tc path does; the addresses' change serves both checksums.
    let addrs = checksum::addrs_change(from, to);
    let check =
        checksum::apply(load_u16(ip.wrapping_add(IP_CHECK)), checksum::change_u16(ttl_proto, ttl_proto - 1) + addrs);
    store_u16(ip.wrapping_add(IP_TTL), ttl_proto - 1);
    store_u32(ip.wrapping_add(IP_SADDR), to.saddr);
    store_u32(ip.wrapping_add(IP_DADDR), to.daddr);
    store_u16(ip.wrapping_add(IP_CHECK), check);
    let tcp = from.proto == PROTO_TCP;
    let c = ptr_at::<[u8; 2]>(ctx, l4_off + if tcp { TCP_CHECK } else { UDP_CHECK })?.cast::<u8>();
    let mut l4 = load_u16(c);
    // A UDP checksum of 0 means none, and stays so. (0 and 0xffff read the same in either byte order.)
    if tcp || l4 != 0 {
        l4 = checksum::apply(l4, addrs + checksum::ports_change(from, to, true));
        if !tcp && l4 == 0 {
            l4 = 0xffff;
        }
        store_u16(c, l4);
    }
    let ports = ptr_at::<[u8; 4]>(ctx, l4_off)?;
    store_ports(ports.cast(), to.sport, to.dport);
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { &mut *eth };
    eth.dst_addr = *dmac;
    eth.src_addr = *smac;
    Some(())
}
