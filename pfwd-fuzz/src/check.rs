//! Compares what the kernel did with what the model expects: the verdict, every byte of the output (checksum fields
//! by value modulo one's-complement zero, so "exactly as valid as before"), and, independently, with etherparse:
//! every checksum that was valid in the input is valid in the output and every invalid one stays invalid.

use etherparse::{Icmpv4Header, Icmpv6Header, NetHeaders, PacketHeaders, TransportHeader};

use crate::model::packet::{CsumKind, be16, csum_equivalent};
use crate::model::{Expect, Verdict};

/// tcx return codes as BPF_PROG_TEST_RUN reports them.
pub const NEXT: u32 = pfwd_common::tcx::NEXT as u32;
pub const DROP: u32 = pfwd_common::tcx::DROP as u32;

/// `Err` describes the divergence.
pub fn check(input: &[u8], want: &Expect, ret: u32, got: &[u8]) -> Result<(), String> {
    let expected = match (&want.verdict, ret) {
        (Verdict::Drop, DROP) => return Ok(()),
        (Verdict::Next(bytes), NEXT) => bytes,
        (Verdict::Drop, r) => return Err(format!("verdict: expected DROP, kernel returned {}", ret_name(r))),
        (Verdict::Next(_), r) => return Err(format!("verdict: expected NEXT, kernel returned {}", ret_name(r))),
    };
    if got.len() != expected.len() {
        return Err(format!("output length {} != expected {}", got.len(), expected.len()));
    }
    let csum_at = |i: usize| want.csums.iter().find(|c| c.at == i || c.at + 1 == i);
    for i in 0..got.len() {
        if got[i] == expected[i] {
            continue;
        }
        match csum_at(i) {
            None => return Err(format!("byte {i}: got {:#04x}, expected {:#04x}", got[i], expected[i])),
            Some(c) => {
                let (g, e) = (be16(got, c.at), be16(expected, c.at));
                let ok = match c.kind {
                    CsumKind::Udp if e == 0 || g == 0 => e == g,
                    _ => csum_equivalent(g, e),
                };
                if !ok {
                    return Err(format!("{:?} checksum at byte {}: got {g:#06x}, expected {e:#06x}", c.kind, c.at));
                }
            }
        }
    }
    if expected.as_slice() != input {
        same_validity(input, got)?;
    }
    Ok(())
}

fn ret_name(r: u32) -> String {
    match r {
        NEXT => "NEXT".into(),
        DROP => "DROP".into(),
        r => format!("{}", r as i32),
    }
}

/// Validity of the IPv4 header checksum and of the L4 checksum as etherparse computes them (None: not parsable or
/// not checkable, e.g. UDP without checksum or a truncated datagram). IPv6 has no header checksum (always valid
/// here); its TCP, UDP and ICMPv6 checksums cover the IPv6 pseudo-header.
pub fn validity(frame: &[u8]) -> Option<(bool, Option<bool>)> {
    let h = PacketHeaders::from_ethernet_slice(frame).ok()?;
    if let Some(NetHeaders::Ipv6(ip, _)) = &h.net {
        let payload = h.payload.slice();
        let l4 = match &h.transport {
            Some(TransportHeader::Tcp(t)) => t.calc_checksum_ipv6(ip, payload).ok().map(|c| c == t.checksum),
            Some(TransportHeader::Udp(u)) if u.checksum != 0 => {
                u.calc_checksum_ipv6(ip, payload).ok().map(|c| c == u.checksum)
            }
            Some(TransportHeader::Icmpv6(i)) => {
                let want = Icmpv6Header::with_checksum(i.icmp_type, ip.source, ip.destination, payload);
                want.ok().map(|w| w.checksum == i.checksum)
            }
            _ => None,
        };
        return Some((true, l4));
    }
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else { return None };
    let ip_ok = ip.header_checksum == ip.calc_header_checksum();
    let payload = h.payload.slice();
    let l4 = match &h.transport {
        Some(TransportHeader::Tcp(t)) => t.calc_checksum_ipv4(ip, payload).ok().map(|c| c == t.checksum),
        Some(TransportHeader::Udp(u)) if u.checksum != 0 => {
            u.calc_checksum_ipv4(ip, payload).ok().map(|c| c == u.checksum)
        }
        Some(TransportHeader::Icmpv4(i)) => {
            Some(Icmpv4Header::with_checksum(i.icmp_type.clone(), payload).checksum == i.checksum)
        }
        _ => None,
    };
    Some((ip_ok, l4))
}

/// etherparse's view: every checksum exactly as valid after the translation as before it.
fn same_validity(input: &[u8], got: &[u8]) -> Result<(), String> {
    let (Some((ip_in, l4_in)), Some((ip_out, l4_out))) = (validity(input), validity(got)) else {
        return Ok(());
    };
    if ip_in != ip_out {
        return Err(format!("etherparse: IPv4 header checksum valid before: {ip_in}, after: {ip_out}"));
    }
    if let (Some(a), Some(b)) = (l4_in, l4_out)
        && a != b
    {
        return Err(format!("etherparse: L4 checksum valid before: {a}, after: {b}"));
    }
    Ok(())
}
