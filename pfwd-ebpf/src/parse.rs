//! Packet parsing: Ethernet (or nothing, on layer-3 devices) + IPv4 + the TCP/UDP ports or ICMP echo identifier, and
//! the packet embedded in an ICMP error, with every bound checked for the verifier. Also bounds-checked packet pointers
//! for the rewriting code.
use aya_ebpf::programs::TcContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use pfwd_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, Stat, Tuple, checksum};

use crate::maps::count;

const ETH_LEN: usize = EthHdr::LEN;
const ETH_P_IP: u16 = 0x0800;

/// Where the IP header starts in the packet data: 14 (after the Ethernet header) in the programs attached to
/// Ethernet-type devices, 0 in those attached to layer-3 devices (tun, WireGuard, PPP: packets start at the IP
/// header). The loader loads the programs once per value (`EbpfLoader::override_global`); the global sits in a
/// frozen read-only map, so the verifier knows its value and sees constant packet offsets, as with a literal.
#[unsafe(no_mangle)]
static PFWD_L2_LEN: u32 = ETH_LEN as u32;

/// The offset of the IP header (see [`PFWD_L2_LEN`]).
#[inline(always)]
pub fn ip_off() -> usize {
    // SAFETY: a plain read of a global; volatile so the compiler does not fold in the default the loader overrides.
    unsafe { core::ptr::read_volatile(&PFWD_L2_LEN) as usize }
}
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;
/// ICMP header: type, code, checksum, then identifier/sequence (echo) or unused/MTU (errors).
pub const ICMP_HLEN: usize = 8;

/// What kind of ICMP message a packet is (`Absent` for every other protocol).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Icmp {
    Absent,
    /// Echo request: may start a flow; its identifier is translated like a port (tuple ports = identifier).
    EchoRequest,
    EchoReply,
    /// An error about another packet, whose IP header and first 8 L4 bytes it embeds (tuple ports = 0).
    Error(Embedded),
    /// Other ICMP (ports 0): only IP-level translation.
    Other,
}

/// The packet embedded in an ICMP error: offsets in the outer packet and its tuple as written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Embedded {
    pub ip_off: usize,
    pub l4_off: usize,
    pub tuple: Tuple,
}

/// Where a packet sits in a fragmented datagram (`Packet::frag`). Plain constants rather than an enum with the IP
/// id inside: the BPF verifier rejects the copies of partly undefined enum values that LLVM makes.
pub mod frag {
    /// Not a fragment.
    pub const WHOLE: u8 = 0;
    /// The first fragment (offset 0, more to come) with the L4 header: translated as the datagram's flow says, and
    /// remembered (`fragment`) for the later fragments with the same IP id.
    pub const FIRST: u8 = 1;
    /// A later fragment (or a first one too short to hold the ports): no L4 header of its own, so only its addresses
    /// are translated, as its first fragment's were.
    pub const LATER: u8 = 2;
}

/// What the NAT code needs to know about a packet.
pub struct Packet {
    pub tuple: Tuple,
    /// Offset of the L4 header (after IP options).
    pub l4_off: usize,
    pub tcp_flags: u8,
    /// IP total length (what the rule byte counters count, as iptables does).
    pub ip_len: u32,
    pub icmp: Icmp,
    /// [`frag`], and the IP identification that ties a datagram's fragments together.
    pub frag: u8,
    pub ip_id: u16,
}

impl Packet {
    /// Offset of the L4 checksum, for protocols whose checksum covers the pseudo-header (TCP, UDP).
    #[inline(always)]
    pub fn l4_csum_off(&self) -> Option<usize> {
        checksum::l4_csum_offset(self.tuple.proto).map(|o| self.l4_off + o)
    }

    /// Whether the tuple's ports are real port numbers (TCP, UDP), not an ICMP echo identifier or nothing.
    #[inline(always)]
    pub fn has_port_numbers(&self) -> bool {
        matches!(self.tuple.proto, PROTO_TCP | PROTO_UDP)
    }

    /// Whether the tuple has ports (TCP, UDP) or an identifier standing in for them (ICMP echo).
    #[inline(always)]
    pub fn has_ports(&self) -> bool {
        matches!(self.tuple.proto, PROTO_TCP | PROTO_UDP) || matches!(self.icmp, Icmp::EchoRequest | Icmp::EchoReply)
    }

    /// Whether this packet may start a new translated flow: a TCP SYN (no ACK), an ICMP echo request, any UDP or
    /// other-protocol packet. Mid-stream TCP, echo replies and ICMP errors never do.
    #[inline(always)]
    pub fn can_open(&self) -> bool {
        match self.tuple.proto {
            PROTO_TCP => self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN,
            PROTO_ICMP => self.icmp == Icmp::EchoRequest,
            _ => true,
        }
    }
}

/// The interface the packet is on (incoming at ingress, outgoing at egress).
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context's __sk_buff is valid for the program's run.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// A pointer to a `T` at `off`, if the linear packet data holds it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
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

/// The addresses and protocol of an IPv4 header as a tuple without ports.
#[inline(always)]
fn addresses(ip: &Ipv4Hdr) -> Tuple {
    Tuple {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: 0,
        dport: 0,
        proto: ip.proto,
        _pad: 0,
        _pad2: 0,
    }
}

/// Parses an IPv4 TCP/UDP/other packet. `None` means "not ours, pass untouched" (non-IPv4, malformed). A later
/// fragment comes back with the addresses and protocol only (ports 0, `frag::LATER`).
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Packet> {
    let l2 = ip_off();
    if l2 == 0 {
        // A layer-3 device has no ethertype: the kernel's skb->protocol says what the packet is (the first nibble
        // alone would take e.g. an MPLS label for IPv4).
        // SAFETY: the context's __sk_buff is valid for the program's run.
        if unsafe { (*ctx.skb.skb).protocol } != u32::from(ETH_P_IP.to_be()) {
            return None;
        }
    } else {
        let eth: *const EthHdr = ptr_at(ctx, 0)?;
        // SAFETY: bounds checked by ptr_at.
        if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
            return None;
        }
    }
    if !ensure_linear(ctx, l2 + Ipv4Hdr::LEN) {
        count(Stat::Malformed);
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, l2)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || tot_len < ihl || l2 + tot_len > ctx.len() as usize {
        count(Stat::Malformed);
        return None;
    }
    let frags = u16::from_be_bytes(ip.frags);
    let mut tuple = addresses(ip);
    let l4_off = l2 + ihl;
    let l4_len = tot_len - ihl;
    // Only the first fragment carries the L4 header. A first fragment without the whole of it (RFC 1858's tiny
    // fragment) is treated as a later one: its ports are unknown. (One construction of the Packet at the end: the
    // verifier rejects the copies of partly undefined values that several would produce.)
    let mut frag = if frags & IP_OFFSET != 0 {
        frag::LATER
    } else if frags & IP_MF != 0 {
        frag::FIRST
    } else {
        frag::WHOLE
    };
    let mut tcp_flags = 0;
    let mut icmp = Icmp::Absent;
    let l4_proto = if frag == frag::LATER { 0 } else { tuple.proto };
    match l4_proto {
        PROTO_TCP | PROTO_UDP => {
            let hdr_len = if tuple.proto == PROTO_TCP { 20 } else { 8 };
            if l4_len < hdr_len && frag == frag::FIRST {
                frag = frag::LATER;
            } else {
                if l4_len < hdr_len || !ensure_linear(ctx, l4_off + hdr_len) {
                    count(Stat::Malformed);
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
                        count(Stat::Malformed);
                        return None;
                    }
                    tcp_flags = flags;
                }
            }
        }
        PROTO_ICMP => {
            if l4_len < ICMP_HLEN && frag == frag::FIRST {
                frag = frag::LATER;
            } else {
                if l4_len < ICMP_HLEN || !ensure_linear(ctx, l4_off + ICMP_HLEN) {
                    count(Stat::Malformed);
                    return None;
                }
                let hdr: *const [u8; ICMP_HLEN] = ptr_at(ctx, l4_off)?;
                // SAFETY: bounds checked by ptr_at.
                let hdr = unsafe { *hdr };
                icmp = match hdr[0] {
                    ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY => {
                        let id = u16::from_be_bytes([hdr[4], hdr[5]]);
                        tuple.sport = id;
                        tuple.dport = id;
                        if hdr[0] == ICMP_ECHO_REQUEST { Icmp::EchoRequest } else { Icmp::EchoReply }
                    }
                    ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB => {
                        // An error whose embedded packet cannot be read is passed as plain ICMP, untranslated.
                        embedded(ctx, l4_off + ICMP_HLEN, l2 + tot_len).map_or(Icmp::Other, Icmp::Error)
                    }
                    _ => Icmp::Other,
                };
            }
        }
        _ => {}
    }
    // Read after the L4 header (not kept across ensure_linear's helper call, which would cost stack).
    let ip: *const Ipv4Hdr = ptr_at(ctx, ip_off())?;
    // SAFETY: bounds checked by ptr_at.
    let ip_id = u16::from_be_bytes(unsafe { (*ip).id });
    Some(Packet { tuple, l4_off, tcp_flags, ip_len: tot_len as u32, icmp, frag, ip_id })
}

/// Parses the packet embedded in an ICMP error at `ip_off`: an IPv4 header and at least 8 bytes of L4 (RFC 792),
/// all before `end` (the outer packet's end).
#[inline(always)]
fn embedded(ctx: &TcContext, ip_off: usize, end: usize) -> Option<Embedded> {
    if ip_off + Ipv4Hdr::LEN + 8 > end || !ensure_linear(ctx, ip_off + Ipv4Hdr::LEN) {
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ip_off)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    // A later fragment's first 8 bytes are data, not ports (and routers never report errors about them, RFC 1812).
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || u16::from_be_bytes(ip.frags) & IP_OFFSET != 0 {
        return None;
    }
    let l4_off = ip_off + ihl;
    let mut tuple = addresses(ip);
    if l4_off + 8 > end || !ensure_linear(ctx, l4_off + 8) {
        return None;
    }
    let l4: *const [u8; 8] = ptr_at(ctx, l4_off)?;
    // SAFETY: bounds checked by ptr_at.
    let l4 = unsafe { *l4 };
    match tuple.proto {
        PROTO_TCP | PROTO_UDP => {
            tuple.sport = u16::from_be_bytes([l4[0], l4[1]]);
            tuple.dport = u16::from_be_bytes([l4[2], l4[3]]);
        }
        PROTO_ICMP if l4[0] == ICMP_ECHO_REQUEST || l4[0] == ICMP_ECHO_REPLY => {
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            tuple.sport = id;
            tuple.dport = id;
        }
        // Errors about ICMP errors are never generated (RFC 1122); other protocols have no ports.
        PROTO_ICMP => return None,
        _ => {}
    }
    Some(Embedded { ip_off, l4_off, tuple })
}
