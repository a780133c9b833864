//! IPv4 and IPv6 fragments (IPv6's fragment header carries the same facts: offset, more-fragments, a 32-bit
//! identification). Only a datagram's first fragment carries the ports, so the first fragment is translated like any
//! packet of its flow and what it got (rewritten to which addresses, passed, or dropped) is remembered by the
//! datagram's identity (source, destination, protocol, IP id) and the hook. Later fragments, in any order after the
//! first, get the same at the IP level: their addresses and header checksum (the L4 checksum, in the first fragment,
//! already covers the whole datagram).
//!
//! A later fragment whose datagram is unknown (it arrived before its first fragment, or the first was too short to
//! hold the ports, lost, or forgotten) cannot be translated. On an attached interface of an instance with NAT rules it
//! is dropped: passed untranslated it could leak an untranslated address, and it could never be reassembled with the
//! translated rest. Elsewhere it passes, as any traffic pfwd does not translate.
//!
//! The work is done in functions that are not inlined and take only a few scalars: a BPF-to-BPF call keeps this
//! code's stack out of the programs' own frame, which is near the verifier's 512-byte limit.
use aya_ebpf::programs::TcContext;
use pfwd_common::{FRAG_TIMEOUT_NS, FlowTuple, FragEntryOf, FragKeyOf, Stat, frag_action, tcx};

use crate::{
    conntrack,
    family::Family,
    maps::{CONFIG, IFACES, count, count_rule_bytes},
    nat,
    parse::{self, Packet, frag, ip_off},
};

/// The key of `pkt`'s datagram at hook `at`.
#[inline(always)]
pub fn key<A: Family>(pkt: &Packet<A>, at: u8) -> FragKeyOf<A> {
    let t = &pkt.tuple;
    FragKeyOf { saddr: t.saddr, daddr: t.daddr, id: pkt.ip_id, proto: t.proto, hook: at, _pad: 0 }
}

/// If `pkt` is a first fragment, remembers what it got at hook `at`: `action`, and for `XLATE` the addresses of `to`
/// and the rule slot that counts the datagram.
#[inline(always)]
pub fn note_first<A: Family>(pkt: &Packet<A>, at: u8, action: u32, to: &FlowTuple<A>, rule_slot: u32) {
    if pkt.frag == frag::FIRST {
        remember(pkt, at, action, to, rule_slot);
    }
}

#[inline(never)]
fn remember<A: Family>(pkt: &Packet<A>, at: u8, action: u32, to: &FlowTuple<A>, rule_slot: u32) {
    let entry = FragEntryOf { saddr: to.saddr, daddr: to.daddr, rule_slot, action, seen_ns: conntrack::now_ns() };
    // A full table forgets its oldest datagram; its later fragments are then dropped as unknown.
    let _ = A::frags().insert(&key(pkt, at), &entry, 0);
}

/// The verdict for the later fragment `pkt` at hook `at`: a tcx return code.
#[inline(never)]
pub fn later<A: Family>(ctx: &TcContext, pkt: &Packet<A>, at: u8) -> i32 {
    // The datagram was counted as one packet by its first fragment; a later one adds its payload.
    let payload = pkt.ip_len - (pkt.l4_off - ip_off()) as u32;
    let k = &key(pkt, at);
    // SAFETY: plain read of a map value, which stays valid for the program's run.
    let known = unsafe { A::frags().get(k) }.copied();
    match known {
        Some(e) if conntrack::now_ns().saturating_sub(e.seen_ns) <= FRAG_TIMEOUT_NS => match e.action {
            frag_action::XLATE => {
                let from = FlowTuple { saddr: k.saddr, daddr: k.daddr, ..FlowTuple::default() };
                let to = FlowTuple { saddr: e.saddr, daddr: e.daddr, ..FlowTuple::default() };
                if !nat::rewrite_addresses(ctx, &from, &to) {
                    count(Stat::Malformed);
                    return tcx::DROP;
                }
                count(Stat::FragmentsXlated);
                count_rule_bytes(e.rule_slot, payload);
                tcx::NEXT
            }
            frag_action::DROP => {
                count(Stat::FragmentsDropped);
                tcx::DROP
            }
            _ => tcx::NEXT,
        },
        _ => {
            let has_rules = CONFIG.get(0).is_some_and(|c| {
                let m = c.active().counts;
                m.pre | m.post != 0
            });
            let ifindex = parse::ifindex(ctx);
            // SAFETY: as above.
            if has_rules && unsafe { IFACES.get(&ifindex) }.is_some() {
                count(Stat::FragmentsDropped);
                tcx::DROP
            } else {
                count(Stat::Fragments);
                tcx::NEXT
            }
        }
    }
}
