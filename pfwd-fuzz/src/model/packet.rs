//! The model's own packet parser and checksum arithmetic: plain Rust over the frame's bytes, written from the RFCs
//! (791, 8200, 793, 768, 792, 1071, 1624), independent of pfwd-ebpf's parser and of pfwd-common's checksum code.

/// Ethernet header length; pfwd handles Ethernet-type interfaces only.
pub const ETH: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// IPv6 header length (RFC 8200); the fuzzer's IPv6 packets have no extension headers.
pub const IPV6_HLEN: usize = 40;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// ICMP (IPv4) or ICMPv6: an echo's identifier stands in for both ports.
pub fn is_icmp(proto: u8) -> bool {
    proto == ICMP || proto == ICMPV6
}

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// ICMP types that carry an embedded datagram and that pfwd translates (README: "port unreachable, fragmentation
/// needed, time exceeded"; parameter problem too).
pub fn is_icmp_error(ty: u8) -> bool {
    matches!(ty, 3 | 11 | 12)
}

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// An address in host order: an IPv4 address as its 32-bit value, an IPv6 address as its 128-bit value. The two
/// never meet: the kernel keeps a table per family, and the fuzzer's IPv6 addresses (2001:db8::/32, fd00::/8) are
/// all above 2^32, so one model table holds both families without a clash.
pub type Addr = u128;

/// A flow's 5-tuple as the model keys it. Addresses in host order. An ICMP echo's identifier stands in for both
/// ports (README: "ICMP echo identifiers are allocated the same way" as ports); other protocols have ports 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    pub fn reversed(&self) -> Tuple {
        Tuple { src: self.dst, dst: self.src, sport: self.dport, dport: self.sport, proto: self.proto }
    }
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} -> {}:{} proto {}", show(self.src), self.sport, show(self.dst), self.dport, self.proto)
    }
}

/// An address as text: IPv4 when it fits in 32 bits (see [`Addr`]), else IPv6.
pub fn show(a: Addr) -> String {
    match u32::try_from(a) {
        Ok(v4) => std::net::Ipv4Addr::from(v4).to_string(),
        Err(_) => format!("[{}]", std::net::Ipv6Addr::from(a)),
    }
}

pub fn be128(b: &[u8], at: usize) -> u128 {
    u128::from_be_bytes(b[at..at + 16].try_into().expect("16 bytes"))
}

/// Where a checksum field is and what it covers, for the comparison "exactly as valid as before".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsumKind {
    Ip,
    Tcp,
    /// UDP: 0 means "no checksum" and must stay 0; a computed 0 is sent as 0xffff.
    Udp,
    Icmp,
}

#[derive(Clone, Copy, Debug)]
pub struct CsumField {
    pub at: usize,
    pub kind: CsumKind,
}

/// The transport part of a parsed datagram: where its ports (or identifier) and checksum are.
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// Echo request (type 8) or reply (type 0).
    Echo {
        id: u16,
        request: bool,
    },
    /// An ICMP error with its embedded datagram (the IP header starts at `inner`).
    IcmpError {
        inner: Inner,
    },
    /// Any other ICMP message (and an error whose embedded datagram is unreadable): a port-less tuple (ports 0),
    /// which cannot open a flow but is translated by address if such a flow exists (an echo with identifier 0).
    IcmpOther,
    /// A protocol without ports (GRE, ...): translated by address only.
    Other,
    /// No transport header: a later fragment (non-zero offset), or a first fragment too short to hold its whole
    /// TCP (20 bytes), UDP (8) or ICMP (8) header. Its datagram is known only by what its first fragment got.
    Fragment,
}

/// The datagram embedded in an ICMP error.
#[derive(Clone, Copy, Debug)]
pub struct Inner {
    /// Offset of the embedded IP header in the frame.
    pub ip: usize,
    pub ihl: usize,
    /// Offset of the embedded transport header.
    pub l4: usize,
    pub tuple: Tuple,
    /// The embedded L4 checksum field when present in full within the outer packet (TCP's is at byte 16, so an
    /// error quoting only the 8 bytes RFC 792 requires has none; UDP's only when non-zero).
    pub l4_csum: Option<CsumField>,
}

/// A parsed IPv4 or IPv6 frame.
#[derive(Clone, Copy, Debug)]
pub struct Ip {
    /// IPv6 (a plain 40-byte header, TCP or UDP after it); else IPv4.
    pub v6: bool,
    /// The IP header's length (40 for IPv6).
    pub ihl: usize,
    /// End of the IP datagram in the frame (14 + total length); bytes after it are Ethernet padding.
    pub end: usize,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    pub l4: L4,
    /// Offset of the transport header.
    pub l4_at: usize,
    /// Where the datagram sits among its fragments.
    pub frag: Frag,
    /// The IP identification (RFC 791: with source, destination and protocol it names a datagram's fragments); 0
    /// for IPv6.
    pub id: u16,
}

/// RFC 791's fragment fields, as the data path sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frag {
    /// Neither MF nor an offset: a whole datagram.
    Whole,
    /// Offset 0 with MF set, and the whole transport header in it: handled like a whole datagram of its flow.
    First,
    /// A non-zero offset, or a first fragment without its whole transport header ([`L4::Fragment`]).
    Later,
}

impl Frag {
    pub fn name(self) -> &'static str {
        match self {
            Frag::Whole => "whole datagram",
            Frag::First => "first fragment",
            Frag::Later => "later fragment",
        }
    }
}

impl Ip {
    /// The flow tuple of a TCP/UDP/echo/other datagram (None for ICMP errors and other ICMP).
    pub fn tuple(&self) -> Option<Tuple> {
        let (sport, dport) = match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
            L4::Echo { id, .. } => (id, id),
            L4::Other | L4::IcmpOther => (0, 0),
            L4::IcmpError { .. } | L4::Fragment => return None,
        };
        Some(Tuple { src: self.src, dst: self.dst, sport, dport, proto: self.proto })
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Parsed {
    /// Not Ethernet + IPv4 or IPv6 (ARP, VLAN, a frame too short for an Ethernet header).
    NotIp,
    /// IPv4 or IPv6 with a header or length that does not add up: passed untouched.
    Malformed(&'static str),
    Ipv4(Ip),
    Ipv6(Ip),
}

impl Parsed {
    /// The datagram of either family.
    pub fn ip(self) -> Option<Ip> {
        match self {
            Parsed::Ipv4(ip) | Parsed::Ipv6(ip) => Some(ip),
            Parsed::NotIp | Parsed::Malformed(_) => None,
        }
    }
}

/// Parses an Ethernet frame the way the documented data path must see it.
pub fn parse(f: &[u8]) -> Parsed {
    if f.len() >= ETH && be16(f, 12) == ETHERTYPE_IPV6 {
        return parse6(f);
    }
    if f.len() < ETH || be16(f, 12) != ETHERTYPE_IPV4 {
        return Parsed::NotIp;
    }
    if f.len() < ETH + 20 {
        return Parsed::Malformed("shorter than an IPv4 header");
    }
    let vihl = f[ETH];
    if vihl >> 4 != 4 {
        return Parsed::Malformed("IP version not 4");
    }
    let ihl = (vihl & 0x0f) as usize * 4;
    if ihl < 20 {
        return Parsed::Malformed("IHL below 5");
    }
    let tot = be16(f, ETH + 2) as usize;
    if tot < ihl {
        return Parsed::Malformed("total length below the header length");
    }
    if ETH + tot > f.len() {
        return Parsed::Malformed("total length beyond the frame");
    }
    let end = ETH + tot;
    let flags = be16(f, ETH + 6);
    let (mf, offset) = (flags & 0x2000 != 0, flags & 0x1fff);
    let mut frag = match (mf, offset) {
        (_, 1..) => Frag::Later,
        (true, 0) => Frag::First,
        (false, 0) => Frag::Whole,
    };
    let id = be16(f, ETH + 4);
    let proto = f[ETH + 9];
    let src = be32(f, ETH + 12);
    let dst = be32(f, ETH + 16);
    let at = ETH + ihl;
    let avail = end - at;
    // A first fragment too short for its transport header is no better than a later one (RFC 1858's tiny fragment):
    // its ports are unknown. (A whole datagram that short is malformed, below.)
    let header = match proto {
        TCP => 20,
        UDP | ICMP => 8,
        _ => 0,
    };
    if frag == Frag::First && avail < header {
        frag = Frag::Later;
    }
    let l4 = match proto {
        _ if frag == Frag::Later => L4::Fragment,
        TCP | UDP => match ports(f, proto, at, avail) {
            Ok(l4) => l4,
            Err(why) => return Parsed::Malformed(why),
        },
        ICMP => {
            if avail < 8 {
                return Parsed::Malformed("truncated ICMP header");
            }
            match f[at] {
                0 | 8 => L4::Echo { id: be16(f, at + 4), request: f[at] == 8 },
                // An error whose embedded datagram cannot be read is plain ICMP.
                ty if is_icmp_error(ty) => {
                    parse_inner(f, at + 8, end).map_or(L4::IcmpOther, |inner| L4::IcmpError { inner })
                }
                _ => L4::IcmpOther,
            }
        }
        _ => L4::Other,
    };
    let (src, dst) = (src as Addr, dst as Addr);
    Parsed::Ipv4(Ip { v6: false, ihl, end, proto, src, dst, l4, l4_at: at, frag, id })
}

/// The TCP or UDP header at `at` with `avail` bytes of the datagram from there (RFC 793, 768).
fn ports(f: &[u8], proto: u8, at: usize, avail: usize) -> Result<L4, &'static str> {
    if proto == TCP {
        if avail < 20 {
            return Err("truncated TCP header");
        }
        let doff = (f[at + 12] >> 4) as usize * 4;
        if doff < 20 {
            return Err("TCP data offset below 5");
        }
        return Ok(L4::Tcp { sport: be16(f, at), dport: be16(f, at + 2), flags: f[at + 13] });
    }
    if avail < 8 {
        return Err("truncated UDP header");
    }
    Ok(L4::Udp { sport: be16(f, at), dport: be16(f, at + 2) })
}

/// An IPv6 frame (RFC 8200): the fixed header, then TCP, UDP or an ICMPv6 echo (RFC 4443). The fuzzer sends IPv6
/// packets without extension headers, fragments or other ICMPv6 (the model does not predict those), and mutates them only in ways that keep them
/// so (see `generate::mutate6`); anything else here is a frame the model cannot predict, and says so.
fn parse6(f: &[u8]) -> Parsed {
    if f.len() < ETH + IPV6_HLEN {
        return Parsed::Malformed("shorter than an IPv6 header");
    }
    if f[ETH] >> 4 != 6 {
        return Parsed::Malformed("IP version not 6");
    }
    // A payload length of 0 would be a jumbogram's (RFC 2675): the fuzzer makes none.
    let payload = be16(f, ETH + 4) as usize;
    if ETH + IPV6_HLEN + payload > f.len() {
        return Parsed::Malformed("IPv6 payload length beyond the frame");
    }
    let end = ETH + IPV6_HLEN + payload;
    let proto = f[ETH + 6];
    let at = ETH + IPV6_HLEN;
    let l4 = match proto {
        TCP | UDP => match ports(f, proto, at, payload) {
            Ok(l4) => l4,
            Err(why) => return Parsed::Malformed(why),
        },
        ICMPV6 => {
            if payload < 8 {
                return Parsed::Malformed("truncated ICMPv6 header");
            }
            match f[at] {
                128 | 129 => L4::Echo { id: be16(f, at + 4), request: f[at] == 128 },
                _ => return Parsed::Malformed("ICMPv6 other than echo: not modelled"),
            }
        }
        _ => return Parsed::Malformed("IPv6 next header other than TCP, UDP or ICMPv6: not modelled"),
    };
    let (src, dst) = (be128(f, ETH + 8), be128(f, ETH + 24));
    Parsed::Ipv6(Ip { v6: true, ihl: IPV6_HLEN, end, proto, src, dst, l4, l4_at: at, frag: Frag::Whole, id: 0 })
}

/// The embedded datagram of an ICMP error at `at`, within the outer datagram ending at `end`: an IPv4 header
/// (with its options) and the first 8 bytes of its transport header, as RFC 792 requires.
fn parse_inner(f: &[u8], at: usize, end: usize) -> Option<Inner> {
    if at + 20 > end || f[at] >> 4 != 4 {
        return None;
    }
    let ihl = (f[at] & 0x0f) as usize * 4;
    if ihl < 20 {
        return None;
    }
    // A later fragment's first bytes are data, not a transport header: such an error is plain ICMP. (Routers do not
    // report errors about later fragments, RFC 1812 4.3.2.7; one that claims to is not translated as an error.)
    if be16(f, at + 6) & 0x1fff != 0 {
        return None;
    }
    let l4 = at + ihl;
    let proto = f[at + 9];
    let src = be32(f, at + 12) as Addr;
    let dst = be32(f, at + 16) as Addr;
    let need = |n: usize| l4 + n <= end;
    // RFC 792: the embedded IP header and at least 8 bytes of its payload, whatever the protocol.
    if !need(8) {
        return None;
    }
    let (sport, dport, l4_csum) = match proto {
        TCP | UDP => {
            let csum = if proto == TCP {
                need(18).then_some(CsumField { at: l4 + 16, kind: CsumKind::Tcp })
            } else {
                Some(CsumField { at: l4 + 6, kind: CsumKind::Udp })
            };
            (be16(f, l4), be16(f, l4 + 2), csum)
        }
        ICMP => {
            // Errors about ICMP errors are never sent (RFC 1122): only an echo is a known embedded ICMP.
            if !matches!(f[l4], 0 | 8) {
                return None;
            }
            let id = be16(f, l4 + 4);
            (id, id, Some(CsumField { at: l4 + 2, kind: CsumKind::Icmp }))
        }
        _ => (0, 0, None),
    };
    Some(Inner { ip: at, ihl, l4, tuple: Tuple { src, dst, sport, dport, proto }, l4_csum })
}

/// The checksum fields of a parsed frame (outer IP, transport; for an ICMP error also the embedded ones).
pub fn csum_fields(ip: &Ip) -> Vec<CsumField> {
    // IPv6 has no header checksum (RFC 8200); its addresses are in the TCP/UDP pseudo-header.
    let mut v = if ip.v6 { vec![] } else { vec![CsumField { at: ETH + 10, kind: CsumKind::Ip }] };
    let at = ip.l4_at;
    match ip.l4 {
        L4::Tcp { .. } => v.push(CsumField { at: at + 16, kind: CsumKind::Tcp }),
        L4::Udp { .. } => v.push(CsumField { at: at + 6, kind: CsumKind::Udp }),
        L4::Echo { .. } | L4::IcmpOther => v.push(CsumField { at: at + 2, kind: CsumKind::Icmp }),
        L4::IcmpError { inner } => {
            v.push(CsumField { at: at + 2, kind: CsumKind::Icmp });
            v.push(CsumField { at: inner.ip + 10, kind: CsumKind::Ip });
            v.extend(inner.l4_csum);
        }
        L4::Other | L4::Fragment => {}
    }
    v
}

// -----------------------------------------------------------------------------------------------------------------
// One's-complement arithmetic (RFC 1071) and incremental update (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
// -----------------------------------------------------------------------------------------------------------------

fn add1c(a: u16, b: u16) -> u16 {
    let s = a as u32 + b as u32;
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The checksum `hc` after one 16-bit word it covers changed from `old` to `new`.
pub fn csum_update16(hc: u16, old: u16, new: u16) -> u16 {
    !add1c(add1c(!hc, !old), new)
}

pub fn csum_update32(hc: u16, old: u32, new: u32) -> u16 {
    let hc = csum_update16(hc, (old >> 16) as u16, (new >> 16) as u16);
    csum_update16(hc, old as u16, new as u16)
}

/// The folded one's-complement sum of `data` as big-endian 16-bit words (an odd last byte padded with 0).
pub fn ones_sum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [b] = chunks.remainder() {
        s += (*b as u32) << 8;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Two checksum values that mean the same in one's-complement arithmetic (0x0000 and 0xffff are both zero).
pub fn csum_equivalent(a: u16, b: u16) -> bool {
    a == b || (a == 0 || a == 0xffff) && (b == 0 || b == 0xffff)
}

// -----------------------------------------------------------------------------------------------------------------
// Rewriting a frame: set a field, and update every checksum that covers it.
// -----------------------------------------------------------------------------------------------------------------

/// An expected output under construction: the input frame, edited field by field.
pub struct Rewriter<'a> {
    pub f: &'a mut [u8],
}

impl Rewriter<'_> {
    fn csum_at(&mut self, field: CsumField, old: u32, new: u32, wide: bool) {
        let c = be16(self.f, field.at);
        if field.kind == CsumKind::Udp && c == 0 {
            return; // no checksum: stays 0
        }
        let mut n = if wide { csum_update32(c, old, new) } else { csum_update16(c, old as u16, new as u16) };
        if field.kind == CsumKind::Udp && n == 0 {
            n = 0xffff;
        }
        self.f[field.at..field.at + 2].copy_from_slice(&n.to_be_bytes());
    }

    /// Sets the 16-bit word at `at` and updates the checksums `covering` it.
    pub fn set16(&mut self, at: usize, new: u16, covering: &[CsumField]) {
        let old = be16(self.f, at);
        if old == new {
            return;
        }
        self.f[at..at + 2].copy_from_slice(&new.to_be_bytes());
        for c in covering {
            self.csum_at(*c, old as u32, new as u32, false);
        }
    }

    pub fn set32(&mut self, at: usize, new: u32, covering: &[CsumField]) {
        let old = be32(self.f, at);
        if old == new {
            return;
        }
        self.f[at..at + 4].copy_from_slice(&new.to_be_bytes());
        for c in covering {
            self.csum_at(*c, old, new, true);
        }
    }

    /// Sets the 128-bit IPv6 address at `at`, word by word (RFC 1624 per 16-bit word).
    pub fn set128(&mut self, at: usize, new: u128, covering: &[CsumField]) {
        for (i, w) in new.to_be_bytes().chunks_exact(2).enumerate() {
            self.set16(at + 2 * i, u16::from_be_bytes([w[0], w[1]]), covering);
        }
    }

    /// Sets the checksum field `field` to `new` and updates the checksums `covering` that field (an embedded
    /// checksum is covered by the outer ICMP checksum).
    pub fn set_csum(&mut self, field: CsumField, new: u16, covering: &[CsumField]) {
        self.set16(field.at, new, covering)
    }
}
