//! The handoff from tc ingress to tc egress: one conntrack lookup per forwarded packet, not two.
//!
//! A forwarded packet crosses the ingress program of one interface and then the egress program of another, on the
//! same CPU and in one go: tcx egress runs in `dev_queue_xmit`, before any qdisc, straight from the forwarding path
//! of the packet ingress has just seen. So ingress leaves what it found about the packet in a per-CPU slot, and
//! egress takes it instead of looking the packet up again:
//! - a packet of a flow translated at egress (SNAT's original direction, DNAT's replies): ingress looked it up and
//!   recorded it already (`conntrack::track`), and leaves the translation itself ([`KNOWN`]);
//! - a packet ingress translated ([`TRANSLATED`]): once its flow is settled at egress (`ct_flag::SETTLED`, by the
//!   first of its packets there), egress has nothing to do unless the flow says it has (`ct_flag::EGRESS_TOO`, a
//!   full NAT), and even then it does not open a flow for it: a connection's NAT is settled by its first packet, as
//!   in netfilter. Until then egress looks the packet up, may open a flow for it, and settles the flow.
//!
//! A slot is only ever a hint. Egress uses it only for the very packet ingress described (same tuple, IP
//! identification, length and TCP flags; whole datagrams only), and every packet of its family at either hook
//! empties it, so a packet that waited (for its neighbour to resolve, say) while others went through finds the slot
//! taken by another packet and is simply looked up, as before. Each family has a slot of its own.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use pfwd_common::{Addr6, FlowTuple, ct_flag};

use crate::{
    family::Family,
    parse::{Packet, frag},
};

/// [`Handoff::kind`]: nothing to take.
pub const NONE: u8 = 0;
/// The packet's flow is translated at egress: apply [`Handoff::xlat`] (what ingress found, recorded already).
pub const KNOWN: u8 = 1;
/// Ingress translated the packet: egress looks it up only when the flow is not settled yet or has more to do at
/// egress ([`Handoff::settled`], [`Handoff::egress_too`]).
pub const TRANSLATED: u8 = 2;

/// What ingress found about the packet it last saw on this CPU.
#[repr(C)]
pub struct Handoff<A> {
    /// The packet as egress will see it.
    pub tuple: FlowTuple<A>,
    pub ip_id: u32,
    pub ip_len: u32,
    pub tcp_flags: u8,
    pub kind: u8,
    /// TRANSLATED: the flow has `ct_flag::EGRESS_TOO`, `ct_flag::SETTLED`.
    pub egress_too: bool,
    pub settled: bool,
    /// KNOWN: the flow's entry's flags and direction (for the backend counters).
    pub lb_flags: u8,
    pub lb_dir: u8,
    /// KNOWN: the rule slot the packet is counted on.
    pub rule_slot: u32,
    /// KNOWN: what egress rewrites the packet to. TRANSLATED, of a flow not settled yet: the packet's tuple at
    /// ingress, its flow's key there (to settle the flow); left as it was otherwise.
    pub other: FlowTuple<A>,
}

/// The IPv4 slot (`Family::handoff`).
#[map]
pub static HANDOFF4: PerCpuArray<Handoff<u32>> = PerCpuArray::with_max_entries(1, 0);

/// The IPv6 slot: a map value, as all of IPv6's working memory (`parse::Work`), never the stack.
#[map]
pub static HANDOFF6: PerCpuArray<Handoff<Addr6>> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's slot, emptied; and what it held (its kind: the rest stays readable through the pointer).
#[inline(always)]
pub fn take<A: Family>() -> Option<(*mut Handoff<A>, u8)> {
    let h = A::handoff()?;
    // SAFETY: this CPU's value; the tc programs run with bottom halves disabled, so nothing else on this CPU uses it
    // meanwhile.
    let kind = unsafe { core::mem::replace(&mut (*h).kind, NONE) };
    Some((h, kind))
}

/// Whether the slot `h` describes `pkt`.
#[inline(always)]
pub fn describes<A: Family>(h: *const Handoff<A>, pkt: &Packet<A>) -> bool {
    // SAFETY: see `take`.
    let h = unsafe { &*h };
    pkt.frag == frag::WHOLE
        && h.tuple == pkt.tuple
        && h.ip_id == pkt.ip_id
        && h.ip_len == pkt.ip_len
        && h.tcp_flags == pkt.tcp_flags
}

/// This CPU's slot when ingress may hand `pkt` over: a whole datagram of a family with a handoff.
#[inline(always)]
fn slot_for<A: Family>(pkt: &Packet<A>, out: &FlowTuple<A>, kind: u8) -> Option<&'static mut Handoff<A>> {
    if pkt.frag != frag::WHOLE {
        return None;
    }
    // SAFETY: see `take`.
    let h = unsafe { &mut *A::handoff()? };
    h.tuple = out.copied();
    h.ip_id = pkt.ip_id;
    h.ip_len = pkt.ip_len;
    h.tcp_flags = pkt.tcp_flags;
    h.kind = kind;
    Some(h)
}

/// Ingress: `pkt` belongs to a flow translated at egress, to `xlat` (recorded in the flow already).
#[inline(always)]
pub fn known<A: Family>(pkt: &Packet<A>, xlat: &FlowTuple<A>, rule_slot: u32, lb: (u8, u8)) {
    if let Some(h) = slot_for(pkt, &pkt.tuple, KNOWN) {
        h.other = xlat.copied();
        h.rule_slot = rule_slot;
        (h.lb_flags, h.lb_dir) = lb;
    }
}

/// Ingress: `pkt` was translated to `xlat` by its flow (whose `ct_flag` bits are `flags`; 0 for a new flow).
#[inline(always)]
pub fn translated<A: Family>(pkt: &Packet<A>, xlat: &FlowTuple<A>, flags: u8) {
    if let Some(h) = slot_for(pkt, xlat, TRANSLATED) {
        h.settled = flags & ct_flag::SETTLED != 0;
        h.egress_too = flags & ct_flag::EGRESS_TOO != 0;
        if !h.settled {
            // Only a flow not settled yet needs its key at ingress (egress settles it).
            h.other = pkt.tuple.copied();
        }
    }
}
