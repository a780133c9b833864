//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! The programs fix the IPv4 header checksum, ICMP checksums, the checksums inside ICMP errors, and TCP/UDP
//! checksums where the skb allows (`csum_state` in the eBPF crate; `bpf_l4_csum_replace` otherwise) with these
//! functions. Userspace tests check them against full recomputation (etherparse).
//!
//! A rewrite that changes several fields sums their changes ([`change_u16`], [`change_u32`], [`addrs_change`],
//! [`ports_change`]) and applies the sum once ([`apply`]): one fold instead of one per field, and the sum of the
//! addresses' changes serves the IPv4 header and the L4 checksum alike. The result is the same as field by field:
//! both are the one's-complement value, and neither ever gives 0xffff for a nonzero sum.
use crate::{Addr, FlowTuple};

/// Offset of the checksum in the L4 header of `proto`, for the protocols whose checksum covers the IP
/// pseudo-header (TCP, UDP, and ICMPv6, which unlike ICMP covers it): the checksums an address change affects.
#[inline(always)]
pub const fn l4_csum_offset(proto: u8) -> Option<usize> {
    match proto {
        crate::PROTO_TCP => Some(16),
        crate::PROTO_UDP => Some(6),
        crate::PROTO_ICMPV6 => Some(2),
        _ => None,
    }
}

/// Folds a 32-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// One's-complement sum of `data` read as big-endian 16-bit words (odd trailing byte padded with zero), added to
/// `initial`. Not folded and not complemented.
pub fn sum_bytes(initial: u32, data: &[u8]) -> u32 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// The full Internet checksum of `data` (as stored in a header: complemented, big-endian value).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_bytes(0, data))
}

/// RFC 1624 eqn. 3's `~m + m'` for a 16-bit field going from `old` to `new`: its change to a checksum, unfolded, to
/// be summed with other fields' changes and applied with [`apply`].
#[inline(always)]
pub const fn change_u16(old: u16, new: u16) -> u32 {
    (!old as u32 & 0xffff) + new as u32
}

/// [`change_u16`] for a 32-bit field (an IPv4 address, or a word of an IPv6 one): both of its 16-bit halves.
#[inline(always)]
pub const fn change_u32(old: u32, new: u32) -> u32 {
    (!(old >> 16) & 0xffff) + (!old & 0xffff) + (new >> 16) + (new & 0xffff)
}

/// RFC 1624 eqn. 3: the new checksum `HC' = ~(~HC + sum of (~m + m'))`, for `changes` summed by the `change_*`
/// functions (fewer than 32,768 16-bit fields' worth, so the sum cannot overflow).
#[inline(always)]
pub const fn apply(check: u16, changes: u32) -> u16 {
    !fold((!check as u32) + changes)
}

/// The new checksum after a 16-bit word changes from `old` to `new`. All values are the big-endian numeric values
/// of the fields.
#[inline(always)]
pub const fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    apply(check, change_u16(old, new))
}

/// The new checksum after a 32-bit field (an IPv4 address) changes from `old` to `new` (big-endian numeric values).
///
/// The same call works on the fields as a little-endian machine loads them from the packet (`from_ne_bytes`,
/// checksum included), giving the new checksum in that form: one's-complement sums do not depend on byte order
/// (RFC 1071, section 2(B)), so the kernel programs update a header without swapping bytes. So do the other
/// functions here.
#[inline(always)]
pub const fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    apply(check, change_u32(old, new))
}

/// The change to a checksum over the addresses of `from` (the IPv4 header's, or a TCP/UDP/ICMPv6 pseudo-header's)
/// when they become `to`'s, as the packet holds them (the tuple's addresses are stored so): only the addresses that
/// differ.
#[inline(always)]
pub fn addrs_change<A: Addr>(from: &FlowTuple<A>, to: &FlowTuple<A>) -> u32 {
    let mut sum = 0;
    if from.saddr != to.saddr {
        sum += A::csum_change(&from.saddr, &to.saddr);
    }
    if from.daddr != to.daddr {
        sum += A::csum_change(&from.daddr, &to.daddr);
    }
    sum
}

/// The change to a TCP/UDP checksum when the ports of `from` become `to`'s (the tuple holds them as numbers: the
/// sum is in the packet's byte order, as [`addrs_change`]'s). Without `dport` only the source port counts (an ICMPv6
/// echo's identifier, which the tuple holds in both).
#[inline(always)]
pub fn ports_change<A: Addr>(from: &FlowTuple<A>, to: &FlowTuple<A>, dport: bool) -> u32 {
    let mut sum = 0;
    if from.sport != to.sport {
        sum += change_u16(from.sport.to_be(), to.sport.to_be());
    }
    if dport && from.dport != to.dport {
        sum += change_u16(from.dport.to_be(), to.dport.to_be());
    }
    sum
}

/// UDP over IPv4: a transmitted checksum of 0 means "no checksum"; a computed 0 is sent as 0xffff (RFC 768).
/// Applies to a checksum that was updated incrementally: keep 0 when it was 0, and never produce 0 otherwise.
#[inline(always)]
pub const fn udp_replace_u32(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace_u32(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// As [`udp_replace_u32`] for a 16-bit field (a port).
#[inline(always)]
pub const fn udp_replace_u16(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace_u16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use etherparse::{Ipv4Header, PacketBuilder};
    use std::vec::Vec;

    /// Tiny deterministic PRNG so the property tests need no extra crate and are reproducible.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn ipv4_header(rng: &mut XorShift) -> Ipv4Header {
        let mut h = Ipv4Header::new(
            (rng.next() % 1400) as u16,
            (rng.next() % 255 + 1) as u8,
            etherparse::IpNumber::TCP,
            (rng.next() as u32).to_be_bytes(),
            (rng.next() as u32).to_be_bytes(),
        )
        .unwrap();
        h.identification = rng.next() as u16;
        h.header_checksum = h.calc_header_checksum();
        h
    }

    #[test]
    fn full_checksum_matches_etherparse() {
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        for _ in 0..2000 {
            let h = ipv4_header(&mut rng);
            let mut bytes = h.to_bytes().to_vec();
            bytes[10] = 0;
            bytes[11] = 0;
            assert_eq!(checksum(&bytes), h.calc_header_checksum());
        }
    }

    #[test]
    fn incremental_address_update_equals_recomputation() {
        let mut rng = XorShift(42);
        for _ in 0..20_000 {
            let mut h = ipv4_header(&mut rng);
            let old = u32::from_be_bytes(h.destination);
            // Include the edge values that break naive implementations (0, all ones, equal halves).
            let new = match rng.next() % 4 {
                0 => 0,
                1 => u32::MAX,
                2 => old,
                _ => rng.next() as u32,
            };
            let updated = replace_u32(h.header_checksum, old, new);
            h.destination = new.to_be_bytes();
            assert_eq!(updated, h.calc_header_checksum(), "old {old:#x} new {new:#x}");
        }
    }

    #[test]
    fn address_update_on_fields_as_loaded_equals_recomputation() {
        // As the kernel programs use it: header checksum and addresses read as native words, no byte swaps.
        let mut rng = XorShift(4242);
        for _ in 0..20_000 {
            let mut h = ipv4_header(&mut rng);
            let raw_check = u16::from_ne_bytes(h.header_checksum.to_be_bytes());
            let (old_src, old_dst) = (u32::from_ne_bytes(h.source), u32::from_ne_bytes(h.destination));
            let (new_src, new_dst) = match rng.next() % 4 {
                0 => (0, u32::MAX),
                1 => (old_src, rng.next() as u32),
                _ => (rng.next() as u32, rng.next() as u32),
            };
            let c = replace_u32(replace_u32(raw_check, old_src, new_src), old_dst, new_dst);
            h.source = new_src.to_ne_bytes();
            h.destination = new_dst.to_ne_bytes();
            assert_eq!(c.to_ne_bytes(), h.calc_header_checksum().to_be_bytes(), "src {new_src:#x} dst {new_dst:#x}");
        }
    }

    #[test]
    fn incremental_port_update_equals_recomputation_for_tcp_and_udp() {
        let mut rng = XorShift(7);
        for i in 0..5_000 {
            let src = (rng.next() as u32).to_be_bytes();
            let dst = (rng.next() as u32).to_be_bytes();
            let (sport, dport, new_port) = (rng.next() as u16, rng.next() as u16, rng.next() as u16);
            let new_dst = (rng.next() as u32).to_be_bytes();
            let payload: Vec<u8> = (0..(i % 37)).map(|_| rng.next() as u8).collect();
            let build = |d: [u8; 4], dp: u16, udp: bool| {
                let b = PacketBuilder::ipv4(src, d, 64);
                let mut out = Vec::new();
                if udp {
                    b.udp(sport, dp).write(&mut out, &payload).unwrap();
                } else {
                    b.tcp(sport, dp, 1, 1000).write(&mut out, &payload).unwrap();
                }
                out
            };
            for udp in [false, true] {
                let before = build(dst, dport, udp);
                let after = build(new_dst, new_port, udp);
                let proto = if udp { crate::PROTO_UDP } else { crate::PROTO_TCP };
                let off = 20 + l4_csum_offset(proto).unwrap();
                let check = u16::from_be_bytes([before[off], before[off + 1]]);
                let expect = u16::from_be_bytes([after[off], after[off + 1]]);
                let (a, b) = (u32::from_be_bytes(dst), u32::from_be_bytes(new_dst));
                let got = if udp {
                    udp_replace_u16(udp_replace_u32(check, a, b), dport, new_port)
                } else {
                    replace_u16(replace_u32(check, a, b), dport, new_port)
                };
                // 0x0000 and 0xffff are the same one's-complement value; TCP may legitimately produce either.
                if udp {
                    assert_eq!(got, expect);
                } else {
                    assert!(got == expect || (got ^ expect) == 0xffff && (got == 0 || expect == 0));
                }
            }
        }
    }

    #[test]
    fn summed_changes_equal_field_by_field_updates() {
        // One fold over all the changes gives exactly what one fold per field gives, edge values included.
        let mut rng = XorShift(99);
        let edge = |r: u64, v: u64| match r % 5 {
            0 => 0,
            1 => u64::MAX,
            _ => v,
        };
        for _ in 0..200_000 {
            let check = edge(rng.next(), rng.next()) as u16;
            let (a, b) = (edge(rng.next(), rng.next()) as u32, edge(rng.next(), rng.next()) as u32);
            let (c, d) = (edge(rng.next(), rng.next()) as u32, edge(rng.next(), rng.next()) as u32);
            let (p, q) = (edge(rng.next(), rng.next()) as u16, edge(rng.next(), rng.next()) as u16);
            let one_by_one = replace_u16(replace_u32(replace_u32(check, a, b), c, d), p, q);
            let summed = apply(check, change_u32(a, b) + change_u32(c, d) + change_u16(p, q));
            assert_eq!(summed, one_by_one, "check {check:#x} {a:#x}->{b:#x} {c:#x}->{d:#x} {p:#x}->{q:#x}");
        }
    }

    #[test]
    fn tuple_changes_on_fields_as_loaded_equal_recomputation() {
        // As the kernel programs use them: addresses as loaded, ports as numbers, checksums as loaded.
        let mut rng = XorShift(0xc0ffee);
        for i in 0..5_000 {
            let (src, dst) = ((rng.next() as u32).to_be_bytes(), (rng.next() as u32).to_be_bytes());
            let (sport, dport) = (rng.next() as u16, rng.next() as u16);
            let new_src = if i % 3 == 0 { src } else { (rng.next() as u32).to_be_bytes() };
            let new_dst = if i % 3 == 1 { dst } else { (rng.next() as u32).to_be_bytes() };
            let (new_sport, new_dport) = (if i % 2 == 0 { sport } else { rng.next() as u16 }, rng.next() as u16);
            let payload: Vec<u8> = (0..(i % 41)).map(|_| rng.next() as u8).collect();
            let build = |s: [u8; 4], d: [u8; 4], sp: u16, dp: u16| {
                let mut out = Vec::new();
                PacketBuilder::ipv4(s, d, 64).tcp(sp, dp, 1, 1000).write(&mut out, &payload).unwrap();
                out
            };
            let (before, after) = (build(src, dst, sport, dport), build(new_src, new_dst, new_sport, new_dport));
            let tuple = |s: [u8; 4], d: [u8; 4], sp, dp| {
                FlowTuple::new(u32::from_ne_bytes(s), u32::from_ne_bytes(d), sp, dp, crate::PROTO_TCP)
            };
            let (from, to) = (tuple(src, dst, sport, dport), tuple(new_src, new_dst, new_sport, new_dport));
            let addrs = addrs_change(&from, &to);
            let loaded = |p: &[u8], off: usize| u16::from_ne_bytes([p[off], p[off + 1]]);
            assert_eq!(apply(loaded(&before, 10), addrs), loaded(&after, 10), "IPv4 header, case {i}");
            let (got, expect) =
                (apply(loaded(&before, 36), addrs + ports_change(&from, &to, true)), loaded(&after, 36));
            // 0x0000 and 0xffff are the same one's-complement value (see the port test above).
            assert!(got == expect || (got ^ expect) == 0xffff && (got == 0 || expect == 0), "TCP, case {i}");
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_replace_u32(0, 0x0a000001, 0x7f000001), 0);
        assert_eq!(udp_replace_u16(0, 80, 3000), 0);
    }
}
