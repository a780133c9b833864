//! The model's own packet parser and checksum arithmetic: plain Rust over the frame's bytes, written from the RFCs
//! (791, 793, 768, 792, 1071, 1624), independent of pfwd-ebpf's parser and of pfwd-common's checksum code.

/// Ethernet header length; pfwd handles Ethernet-type interfaces only.
pub const ETH: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

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

/// A flow's 5-tuple as the model keys it. Addresses in host order. An ICMP echo's identifier stands in for both
/// ports (README: "ICMP echo identifiers are allocated the same way" as ports); other protocols have ports 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: u32,
    pub dst: u32,
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
        let a = |x: u32| std::net::Ipv4Addr::from(x);
        write!(f, "{}:{} -> {}:{} proto {}", a(self.src), self.sport, a(self.dst), self.dport, self.proto)
    }
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

/// A parsed IPv4 frame.
#[derive(Clone, Copy, Debug)]
pub struct Ip {
    pub ihl: usize,
    /// End of the IP datagram in the frame (14 + total length); bytes after it are Ethernet padding.
    pub end: usize,
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    pub l4: L4,
    /// Offset of the transport header.
    pub l4_at: usize,
    /// Where the datagram sits among its fragments.
    pub frag: Frag,
    /// The IP identification (RFC 791: with source, destination and protocol it names a datagram's fragments).
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
    /// Not Ethernet + IPv4 (ARP, IPv6, VLAN, a frame too short for an Ethernet header).
    NotIpv4,
    /// IPv4 with a header or length that does not add up: passed untouched.
    Malformed(&'static str),
    Ipv4(Ip),
}

/// Parses an Ethernet frame the way the documented data path must see it.
pub fn parse(f: &[u8]) -> Parsed {
    if f.len() < ETH || be16(f, 12) != ETHERTYPE_IPV4 {
        return Parsed::NotIpv4;
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
        TCP => {
            if avail < 20 {
                return Parsed::Malformed("truncated TCP header");
            }
            let doff = (f[at + 12] >> 4) as usize * 4;
            if doff < 20 {
                return Parsed::Malformed("TCP data offset below 5");
            }
            L4::Tcp { sport: be16(f, at), dport: be16(f, at + 2), flags: f[at + 13] }
        }
        UDP => {
            if avail < 8 {
                return Parsed::Malformed("truncated UDP header");
            }
            L4::Udp { sport: be16(f, at), dport: be16(f, at + 2) }
        }
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
    Parsed::Ipv4(Ip { ihl, end, proto, src, dst, l4, l4_at: at, frag, id })
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
    let src = be32(f, at + 12);
    let dst = be32(f, at + 16);
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
    let mut v = vec![CsumField { at: ETH + 10, kind: CsumKind::Ip }];
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

    /// Sets the checksum field `field` to `new` and updates the checksums `covering` that field (an embedded
    /// checksum is covered by the outer ICMP checksum).
    pub fn set_csum(&mut self, field: CsumField, new: u16, covering: &[CsumField]) {
        self.set16(field.at, new, covering)
    }
}
