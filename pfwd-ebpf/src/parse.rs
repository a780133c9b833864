//! Packet parsing: Ethernet + IPv4 + the TCP/UDP ports, with every bound checked for the verifier.
use aya_ebpf::programs::TcContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use pfwd_common::{PROTO_TCP, PROTO_UDP, Tuple, stat};

use crate::maps::count;

pub const ETH_LEN: usize = EthHdr::LEN;
const ETH_P_IP: u16 = 0x0800;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the NAT code needs to know about a packet.
pub struct Packet {
    pub tuple: Tuple,
    /// Offset of the L4 header (after IP options).
    pub l4_off: usize,
    pub tcp_flags: u8,
    /// IP total length (what the rule byte counters count, as iptables does).
    pub ip_len: u32,
}

impl Packet {
    /// Offset of the L4 checksum, for protocols whose checksum covers the pseudo-header.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> Option<usize> {
        match self.tuple.proto {
            PROTO_TCP => Some(self.l4_off + 16),
            PROTO_UDP => Some(self.l4_off + 6),
            _ => None,
        }
    }
}

/// A pointer to a `T` at `off`, if the linear packet data holds it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Makes the first `len` bytes directly accessible (headers of GSO or fragmented skbs may not be linear).
#[inline(always)]
fn ensure_linear(ctx: &TcContext, len: usize) -> bool {
    if ctx.data() + len <= ctx.data_end() {
        return true;
    }
    if (ctx.len() as usize) < len {
        return false;
    }
    ctx.pull_data(len as u32).is_ok() && ctx.data() + len <= ctx.data_end()
}

/// Parses an IPv4 TCP/UDP/other packet. `None` means "not ours, pass untouched" (non-IPv4, fragments, malformed).
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Packet> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return None;
    }
    if !ensure_linear(ctx, ETH_LEN + Ipv4Hdr::LEN) {
        count(stat::MALFORMED);
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || tot_len < ihl || ETH_LEN + tot_len > ctx.len() as usize {
        count(stat::MALFORMED);
        return None;
    }
    let frags = u16::from_be_bytes(ip.frags);
    if frags & (IP_MF | IP_OFFSET) != 0 {
        // Only the first fragment carries the ports; translating some fragments and not others would be wrong.
        count(stat::FRAGMENTS);
        return None;
    }
    let mut tuple = Tuple {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: 0,
        dport: 0,
        proto: ip.proto,
        _pad: [0; 3],
    };
    let l4_off = ETH_LEN + ihl;
    let l4_len = tot_len - ihl;
    let mut tcp_flags = 0;
    match tuple.proto {
        PROTO_TCP | PROTO_UDP => {
            let hdr_len = if tuple.proto == PROTO_TCP { 20 } else { 8 };
            if l4_len < hdr_len || !ensure_linear(ctx, l4_off + hdr_len) {
                count(stat::MALFORMED);
                return None;
            }
            // Re-derive: ensure_linear may have moved the data.
            let ports: *const [u8; 4] = ptr_at(ctx, l4_off)?;
            // SAFETY: bounds checked by ptr_at.
            let ports = unsafe { *ports };
            tuple.sport = u16::from_be_bytes([ports[0], ports[1]]);
            tuple.dport = u16::from_be_bytes([ports[2], ports[3]]);
            if tuple.proto == PROTO_TCP {
                let off_flags: *const [u8; 2] = ptr_at(ctx, l4_off + 12)?;
                // SAFETY: bounds checked by ptr_at.
                let [doff, flags] = unsafe { *off_flags };
                if ((doff >> 4) as usize) < 5 {
                    count(stat::MALFORMED);
                    return None;
                }
                tcp_flags = flags;
            }
        }
        _ => {}
    }
    Some(Packet { tuple, l4_off, tcp_flags, ip_len: tot_len as u32 })
}
