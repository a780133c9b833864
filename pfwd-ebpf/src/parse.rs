//! Packet parsing: Ethernet (or nothing, on layer-3 devices), then IPv4 or IPv6 (with a bounded walk over its
//! extension headers), then the TCP/UDP ports or ICMP/ICMPv6 echo identifier, and the packet embedded in an ICMP
//! error, with every bound checked for the verifier. Also bounds-checked packet pointers for the rewriting code.
//!
//! The IP layer is parsed per family ([`parse4`], [`parse6`]); what comes after it once, generic over the family
//! ([`transport`]).
use aya_ebpf::programs::TcContext;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use pfwd_common::{Addr6, FlowTuple, PROTO_TCP, PROTO_UDP, Stat, checksum};

use crate::{family::Family, maps::count};

const ETH_LEN: usize = EthHdr::LEN;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

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

/// ICMP header: type, code, checksum, then identifier/sequence (echo) or unused/MTU (errors). ICMPv6's is the same.
pub const ICMP_HLEN: usize = 8;

/// IPv6 extension headers pfwd walks over (RFC 8200 section 4); any other next header is the upper layer.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers walked before a packet is given up on as malformed (a real chain has at most a hop-by-hop,
/// a destination options, a routing, a fragment and another destination options header).
const MAX_EXT_HEADERS: usize = 6;

/// What kind of ICMP message a packet is (`Packet::icmp`; `ABSENT` for every other protocol). Plain constants,
/// like [`frag`]: a small packet description keeps the programs' stack frames small.
pub mod icmp {
    pub const ABSENT: u8 = 0;
    /// Echo request: may start a flow; its identifier is translated like a port (tuple ports = identifier).
    pub const ECHO_REQUEST: u8 = 1;
    pub const ECHO_REPLY: u8 = 2;
    /// An error about another packet, whose IP header and first 8 L4 bytes it embeds (tuple ports = 0); the
    /// embedded packet is parsed when the error is handled (`Family::embedded`).
    pub const ERROR: u8 = 3;
    /// Other ICMP (ports 0), neighbour discovery and router advertisements among them: never opens a flow.
    pub const OTHER: u8 = 4;
}

/// The packet embedded in an ICMP error: offsets in the outer packet and its tuple as written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Embedded<A> {
    pub ip_off: usize,
    pub l4_off: usize,
    pub tuple: FlowTuple<A>,
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

/// An IPv6 packet and what the programs work out about it, in per-CPU map memory (`maps::work6`): the verifier
/// allows 512 bytes of stack for a whole call chain, and a compiler keeping IPv6's 40-byte tuples on the stack spills
/// each of their fields to a slot of its own. (IPv4 keeps the same on the stack.)
pub struct Work<A> {
    pub pkt: Packet<A>,
    /// What to do with the packet, once worked out.
    pub verdict: Verdict,
    /// The tuple the packet is translated to.
    pub xlat: FlowTuple<A>,
    /// At egress: the packet is the first of its flow's translated packets here, as ingress handed it over
    /// (`crate::handoff`): once the verdict is carried out, the flow is settled (unless the packet is dropped).
    pub settle: bool,
}

/// An ICMP error's working memory: the embedded packet, what it becomes, and the outer addresses written.
pub struct ErrWork<A> {
    pub emb: Embedded<A>,
    pub inner: FlowTuple<A>,
    pub outer: FlowTuple<A>,
}

/// What to do with a packet.
#[derive(Clone, Copy)]
pub enum Verdict {
    /// No flow: the packet may open one.
    Open,
    Pass,
    /// A packet of a flow pfwd translates at the other hook: nothing to do here, but it may be fast-forwarded.
    Known,
    Drop,
    /// Translate to `Work::xlat`.
    Translate {
        slot: u32,
        new_flow: bool,
        /// The flow's `pfwd_common::ct_flag` bits and direction (`pfwd_common::dir`): which backend to count.
        lb: (u8, u8),
    },
}

/// What the NAT code needs to know about a packet.
pub struct Packet<A> {
    pub tuple: FlowTuple<A>,
    /// Offset of the L4 header (after IPv4 options or IPv6 extension headers).
    pub l4_off: usize,
    pub tcp_flags: u8,
    /// The IP packet's length, header included (what the rule byte counters count, as iptables does).
    pub ip_len: u32,
    /// [`icmp`].
    pub icmp: u8,
    /// [`frag`], and the identification that ties a datagram's fragments together (16 bits in IPv4, 32 in IPv6).
    pub frag: u8,
    pub ip_id: u32,
}

impl<A: Family> Packet<A> {
    /// Offset of the L4 checksum, for protocols whose checksum covers the pseudo-header (TCP, UDP, ICMPv6).
    #[inline(always)]
    pub fn l4_csum_off(&self) -> Option<usize> {
        let covered = match self.tuple.proto {
            PROTO_TCP | PROTO_UDP => true,
            p => p == A::ICMP && A::ICMP_PSEUDO,
        };
        if !covered {
            return None;
        }
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
        matches!(self.tuple.proto, PROTO_TCP | PROTO_UDP) || matches!(self.icmp, icmp::ECHO_REQUEST | icmp::ECHO_REPLY)
    }

    /// Whether this packet may start a new translated flow: a TCP SYN (no ACK), an ICMP echo request, any UDP or
    /// other-protocol packet. Mid-stream TCP, echo replies, ICMP errors and other ICMP never do.
    #[inline(always)]
    pub fn can_open(&self) -> bool {
        match self.tuple.proto {
            PROTO_TCP => self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN,
            p if p == A::ICMP => self.icmp == icmp::ECHO_REQUEST,
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

/// The largest packet offset pfwd reads at: past the longest header chain it walks. Checked in [`ptr_at`] so the
/// verifier knows the bound of an offset read back from the per-CPU working memory (`Work`).
const MAX_PKT_OFF: usize = 16_383;

/// A pointer to a `T` at `off`, if the linear packet data holds it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    if off > MAX_PKT_OFF {
        return None;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// How much of a packet [`ensure_linear`] makes linear when it has to pull at all (or the whole packet, when
/// shorter): every header chain pfwd usually parses (Ethernet, IPv4 or IPv6 with options, TCP with options), so
/// that a packet whose headers are not linear pays for one pull, not one per header. A packet socket's transmit
/// ring, for one, leaves all but the link-layer header in page fragments.
const PULL_AHEAD: usize = 128;

/// Makes the first `len` bytes directly accessible (headers of GSO or fragmented skbs may not be linear).
#[inline(always)]
fn ensure_linear(ctx: &TcContext, len: usize) -> bool {
    if ctx.data() + len <= ctx.data_end() {
        return true;
    }
    let total = ctx.len() as usize;
    if total < len {
        return false;
    }
    // Never more than the packet holds: a pull past its end fails.
    let ahead = if len < PULL_AHEAD { total.min(PULL_AHEAD) } else { len };
    (ctx.pull_data(ahead as u32).is_ok() || ctx.pull_data(len as u32).is_ok()) && ctx.data() + len <= ctx.data_end()
}

/// The `N` bytes at `off`, made linear first.
#[inline(always)]
fn read<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u8; N]> {
    if !ensure_linear(ctx, off + N) {
        return None;
    }
    let p: *const [u8; N] = ptr_at(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    Some(unsafe { *p })
}

/// The packet's layer-3 protocol (an ethertype, host order): ETH_P_IP, ETH_P_IPV6 or another.
#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> u16 {
    if ip_off() == 0 {
        // A layer-3 device has no ethertype: the kernel's skb->protocol says what the packet is (the first nibble
        // alone would take e.g. an MPLS label for IPv4).
        // SAFETY: the context's __sk_buff is valid for the program's run.
        return u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    }
    match ptr_at::<EthHdr>(ctx, 0) {
        // SAFETY: bounds checked by ptr_at.
        Some(eth) => u16::from_be(unsafe { (*eth).ether_type }),
        None => 0,
    }
}

/// An IPv6 address's bytes as the maps hold them.
#[inline(always)]
pub fn words(b: &[u8; 16]) -> Addr6 {
    // Four word loads (`load_u32`) where byte by byte took sixteen, with their shifts and spills. `b` is in the
    // packet, bounds-checked with its header.
    let p = b.as_ptr();
    [load_u32(p), load_u32(p.wrapping_add(4)), load_u32(p.wrapping_add(8)), load_u32(p.wrapping_add(12))]
}

// Packet words read and written whole. Rust has no unaligned access that the BPF backend keeps whole:
// `read_unaligned`, `from_ne_bytes` and stores of byte arrays become byte loads and stores with shifts and ORs
// (and spills of each byte), most of the IPv4 parser's and rewriter's instructions (measured). Packet data may be
// accessed unaligned: the verifier allows it where the CPU does (x86 and arm64). Values are in memory order
// (`from_ne_bytes`); the caller bounds-checked every access (the verifier checks it again).

/// The 4 bytes at `p` as one word.
#[inline(always)]
pub fn load_u32(p: *const u8) -> u32 {
    let v: u32;
    // SAFETY: a 4-byte load from bounds-checked packet data.
    unsafe {
        core::arch::asm!("{0} = *(u32 *)({1} + 0)", out(reg) v, in(reg) p, options(readonly, nostack, preserves_flags))
    };
    v
}

/// The 2 bytes at `p` as one half-word.
#[inline(always)]
pub fn load_u16(p: *const u8) -> u16 {
    let v: u16;
    // SAFETY: a 2-byte load from bounds-checked packet data.
    unsafe {
        core::arch::asm!("{0} = *(u16 *)({1} + 0)", out(reg) v, in(reg) p, options(readonly, nostack, preserves_flags))
    };
    v
}

/// Writes `v` to the 4 bytes at `p`.
#[inline(always)]
pub fn store_u32(p: *mut u8, v: u32) {
    // SAFETY: a 4-byte store to bounds-checked, writable packet data.
    unsafe { core::arch::asm!("*(u32 *)({0} + 0) = {1}", in(reg) p, in(reg) v, options(nostack, preserves_flags)) };
}

/// Writes `v` to the 2 bytes at `p`.
#[inline(always)]
pub fn store_u16(p: *mut u8, v: u16) {
    // SAFETY: a 2-byte store to bounds-checked, writable packet data.
    unsafe { core::arch::asm!("*(u16 *)({0} + 0) = {1}", in(reg) p, in(reg) v, options(nostack, preserves_flags)) };
}

/// The source and destination ports (host order) of the TCP or UDP header at `p`, in one load: the source port's
/// bytes are the word's low half (little-endian).
#[inline(always)]
pub fn load_ports(p: *const u8) -> (u16, u16) {
    let w = load_u32(p);
    (u16::from_be(w as u16), u16::from_be((w >> 16) as u16))
}

/// Writes the ports `sport` and `dport` (host order) to the TCP or UDP header at `p`, in one store.
#[inline(always)]
pub fn store_ports(p: *mut u8, sport: u16, dport: u16) {
    store_u32(p, u32::from(sport.to_be()) | u32::from(dport.to_be()) << 16);
}

/// The addresses and protocol of an IPv4 header as a tuple without ports.
#[inline(always)]
fn addresses4(ip: &Ipv4Hdr) -> FlowTuple<u32> {
    FlowTuple::new(load_u32(ip.src_addr.as_ptr()), load_u32(ip.dst_addr.as_ptr()), 0, 0, ip.proto)
}

/// Stores the ports and protocol of `t` again, as the two 4-byte words that map lookups (the kernel's jhash) and
/// tuple copies read them as. The parser writes them field by field (two halves, a byte and its padding), and a
/// 4-byte load of narrower stores still in flight cannot be forwarded from them: it waits for them to reach the
/// cache (measured: about an eighth of an established packet's cost, at the tuple's first copy).
#[inline(always)]
pub fn store_as_words(t: &mut FlowTuple<u32>) {
    const _: () = assert!(cfg!(target_endian = "little") && size_of::<FlowTuple<u32>>() == 16);
    let ports = u32::from(t.sport) | u32::from(t.dport) << 16;
    let proto = u32::from(t.proto);
    let w = (t as *mut FlowTuple<u32>).cast::<u32>();
    // SAFETY: words 2 and 3 of a 16-byte, 4-aligned repr(C) struct: sport and dport, then proto and its zero
    // padding (little-endian). Volatile: the compiler must not merge them back into the narrower stores.
    unsafe {
        core::ptr::write_volatile(w.add(2), ports);
        core::ptr::write_volatile(w.add(3), proto);
    }
}

/// Parses an IPv4 packet (the caller checked the ethertype). `None` means "not ours, pass untouched" (malformed). A
/// later fragment comes back with the addresses and protocol only (ports 0, `frag::LATER`).
#[inline(always)]
pub fn parse4(ctx: &TcContext) -> Option<Packet<u32>> {
    let l2 = ip_off();
    if !ensure_linear(ctx, l2 + Ipv4Hdr::LEN) {
        count(Stat::Malformed);
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, l2)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    // The header's first two words whole (version and length, identification and fragment fields), as the
    // addresses are read: two loads, not six.
    let (w0, w1) = (load_u32(&ip.vihl), load_u32(ip.id.as_ptr()));
    let vihl = w0 as u8;
    let ihl = (vihl & 0x0f) as usize * 4;
    let tot_len = u16::from_be((w0 >> 16) as u16) as usize;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || tot_len < ihl || l2 + tot_len > ctx.len() as usize {
        count(Stat::Malformed);
        return None;
    }
    let frags = u16::from_be((w1 >> 16) as u16);
    let tuple = addresses4(ip);
    // Only the first fragment carries the L4 header.
    let frag = if frags & IP_OFFSET != 0 {
        frag::LATER
    } else if frags & IP_MF != 0 {
        frag::FIRST
    } else {
        frag::WHOLE
    };
    let ip_id = u16::from_be(w1 as u16) as u32;
    let mut pkt =
        Packet { tuple, l4_off: l2 + ihl, tcp_flags: 0, ip_len: tot_len as u32, icmp: icmp::ABSENT, frag, ip_id };
    transport(ctx, &mut pkt, l2 + tot_len)?;
    Some(pkt)
}

/// Where an IPv6 header's extension headers end: the upper-layer protocol, its offset, and the fragment header's
/// facts ([`frag`] position and identification; `WHOLE` without one). `start` is the offset after the IPv6
/// header, `next` its next header; `end` the packet's end. None: malformed (truncated, or too long a chain).
#[inline(always)]
fn walk_ext(ctx: &TcContext, next: u8, start: usize, end: usize) -> Option<(u8, usize, u8, u32)> {
    let (mut next, mut off, mut frag, mut id) = (next, start, frag::WHOLE, 0u32);
    // One pass per extension header, and one more that meets the upper layer.
    for _ in 0..=MAX_EXT_HEADERS {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                if off + 2 > end {
                    return None;
                }
                let [nh, len] = read::<2>(ctx, off)?;
                next = nh;
                off += (len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                if off + 8 > end {
                    return None;
                }
                let h = read::<8>(ctx, off)?;
                next = h[0];
                off += 8;
                let offset_flags = u16::from_be_bytes([h[2], h[3]]);
                id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                // Offset in bits 3-15, "more fragments" in bit 0. An atomic fragment (offset 0, no more) is whole.
                frag = if offset_flags & 0xfff8 != 0 {
                    frag::LATER
                } else if offset_flags & 1 != 0 {
                    frag::FIRST
                } else {
                    frag::WHOLE
                };
                if frag == frag::LATER {
                    // What follows is data, not headers.
                    return Some((next, off, frag, id));
                }
            }
            _ => return (off <= end).then_some((next, off, frag, id)),
        }
    }
    None
}

/// Parses an IPv6 packet (the caller checked the ethertype) into `pkt`, walking its extension headers. `None`
/// means "not ours, pass untouched" (malformed, a truncated or overlong extension header chain). A later fragment
/// comes back with the addresses and protocol only (ports 0, `frag::LATER`).
#[inline(always)]
pub fn parse6(ctx: &TcContext, pkt: &mut Packet<Addr6>) -> Option<()> {
    let l2 = ip_off();
    if !ensure_linear(ctx, l2 + Ipv6Hdr::LEN) {
        count(Stat::Malformed);
        return None;
    }
    let ip: *const Ipv6Hdr = ptr_at(ctx, l2)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let payload = u16::from_be_bytes(ip.payload_len) as usize;
    // A payload length of 0 with data after the header is a jumbogram or a BIG TCP packet: the length is the
    // packet's.
    let tot_len = if payload == 0 { ctx.len() as usize - l2 } else { Ipv6Hdr::LEN + payload };
    if ip.vcf[0] >> 4 != 6 || l2 + tot_len > ctx.len() as usize {
        count(Stat::Malformed);
        return None;
    }
    pkt.tuple = FlowTuple::new(words(&ip.src_addr), words(&ip.dst_addr), 0, 0, ip.next_hdr);
    let end = l2 + tot_len;
    let Some((proto, l4_off, frag, ip_id)) = walk_ext(ctx, pkt.tuple.proto, l2 + Ipv6Hdr::LEN, end) else {
        count(Stat::Malformed);
        return None;
    };
    pkt.tuple.proto = proto;
    pkt.l4_off = l4_off;
    pkt.tcp_flags = 0;
    pkt.ip_len = tot_len as u32;
    pkt.icmp = icmp::ABSENT;
    pkt.frag = frag;
    pkt.ip_id = ip_id;
    transport(ctx, pkt, end)
}

/// Parses what follows the IP layer of `pkt` (its tuple's protocol at `pkt.l4_off`, the packet ending at `end`):
/// the ports and TCP flags, or the ICMP message. A first fragment too short to hold the L4 header (RFC 1858's tiny
/// fragment) becomes a later one: its ports are unknown. None: malformed.
#[inline(always)]
fn transport<A: Family>(ctx: &TcContext, pkt: &mut Packet<A>, end: usize) -> Option<()> {
    let l4_off = pkt.l4_off;
    let l4_len = end.saturating_sub(l4_off);
    let proto = if pkt.frag == frag::LATER { 0 } else { pkt.tuple.proto };
    match proto {
        PROTO_TCP | PROTO_UDP => {
            let hdr_len = if proto == PROTO_TCP { 20 } else { 8 };
            if l4_len < hdr_len && pkt.frag == frag::FIRST {
                pkt.frag = frag::LATER;
                return Some(());
            }
            if l4_len < hdr_len || !ensure_linear(ctx, l4_off + hdr_len) {
                count(Stat::Malformed);
                return None;
            }
            // Re-derive: ensure_linear may have moved the data.
            let ports: *const [u8; 4] = ptr_at(ctx, l4_off)?;
            (pkt.tuple.sport, pkt.tuple.dport) = load_ports(ports.cast());
            if proto == PROTO_TCP {
                let off_flags: *const [u8; 2] = ptr_at(ctx, l4_off + 12)?;
                // SAFETY: bounds checked by ptr_at.
                let [doff, flags] = unsafe { *off_flags };
                if ((doff >> 4) as usize) < 5 {
                    count(Stat::Malformed);
                    return None;
                }
                pkt.tcp_flags = flags;
            }
        }
        p if p == A::ICMP => {
            if l4_len < ICMP_HLEN && pkt.frag == frag::FIRST {
                pkt.frag = frag::LATER;
                return Some(());
            }
            if l4_len < ICMP_HLEN || !ensure_linear(ctx, l4_off + ICMP_HLEN) {
                count(Stat::Malformed);
                return None;
            }
            let hdr: *const [u8; ICMP_HLEN] = ptr_at(ctx, l4_off)?;
            // SAFETY: bounds checked by ptr_at.
            let hdr = unsafe { *hdr };
            pkt.icmp = if hdr[0] == A::ECHO_REQUEST || hdr[0] == A::ECHO_REPLY {
                let id = u16::from_be_bytes([hdr[4], hdr[5]]);
                pkt.tuple.sport = id;
                pkt.tuple.dport = id;
                if hdr[0] == A::ECHO_REQUEST { icmp::ECHO_REQUEST } else { icmp::ECHO_REPLY }
            } else if A::is_icmp_error(hdr[0]) {
                icmp::ERROR
            } else {
                icmp::OTHER
            };
        }
        _ => {}
    }
    Some(())
}

/// The ports (or echo identifier) of the embedded packet's first 8 L4 bytes `l4`, into `tuple`. None: an ICMP
/// message that is not an echo (errors about ICMP errors are never generated, RFC 1122 and 4443).
#[inline(always)]
fn embedded_ports<A: Family>(tuple: &mut FlowTuple<A>, l4: &[u8; 8]) -> Option<()> {
    match tuple.proto {
        PROTO_TCP | PROTO_UDP => {
            tuple.sport = u16::from_be_bytes([l4[0], l4[1]]);
            tuple.dport = u16::from_be_bytes([l4[2], l4[3]]);
        }
        p if p == A::ICMP => {
            if l4[0] != A::ECHO_REQUEST && l4[0] != A::ECHO_REPLY {
                return None;
            }
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            tuple.sport = id;
            tuple.dport = id;
        }
        // Other protocols have no ports.
        _ => {}
    }
    Some(())
}

/// Parses the packet embedded in an ICMP error at `ip_off` into `emb`: an IPv4 header and at least 8 bytes of L4
/// (RFC 792), all before `end` (the outer packet's end).
#[inline(always)]
pub fn embedded4(ctx: &TcContext, ip_off: usize, end: usize, emb: &mut Embedded<u32>) -> Option<()> {
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
    emb.tuple = addresses4(ip);
    if l4_off + 8 > end {
        return None;
    }
    let l4 = read::<8>(ctx, l4_off)?;
    emb.ip_off = ip_off;
    emb.l4_off = l4_off;
    embedded_ports(&mut emb.tuple, &l4)
}

/// Parses the packet embedded in an ICMPv6 error at `ip_off` into `emb`: an IPv6 header, its extension headers,
/// and at least 8 bytes of L4, all before `end` (the outer packet's end).
#[inline(always)]
pub fn embedded6(ctx: &TcContext, ip_off: usize, end: usize, emb: &mut Embedded<Addr6>) -> Option<()> {
    if ip_off + Ipv6Hdr::LEN + 8 > end || !ensure_linear(ctx, ip_off + Ipv6Hdr::LEN) {
        return None;
    }
    let ip: *const Ipv6Hdr = ptr_at(ctx, ip_off)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return None;
    }
    emb.tuple = FlowTuple::new(words(&ip.src_addr), words(&ip.dst_addr), 0, 0, ip.next_hdr);
    let (proto, l4_off, frag, _) = walk_ext(ctx, emb.tuple.proto, ip_off + Ipv6Hdr::LEN, end)?;
    // A later fragment's first 8 bytes are data, not ports.
    if frag == frag::LATER || l4_off + 8 > end {
        return None;
    }
    emb.tuple.proto = proto;
    let l4 = read::<8>(ctx, l4_off)?;
    emb.ip_off = ip_off;
    emb.l4_off = l4_off;
    embedded_ports(&mut emb.tuple, &l4)
}
