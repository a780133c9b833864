//! Connection tracking: two LRU-hash entries per flow (original and reply tuple), created by the first packet,
//! refreshed lazily (at most once a second, or when the TCP state changes), expired on lookup by idle time.
use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use pfwd_common::{Config, CtEntry, PROTO_TCP, Tuple, ct_state, dir};

use crate::{
    maps::CONNTRACK,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: plain helper call without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// A TCP SYN without ACK: the only TCP packet that may start a new translated flow.
#[inline(always)]
pub fn is_tcp_open(pkt: &Packet) -> bool {
    pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
}

#[inline(always)]
pub fn is_closed(e: &CtEntry) -> bool {
    e.state & ct_state::RST != 0
        || e.state & (ct_state::FIN_ORIGINAL | ct_state::FIN_REPLY) == (ct_state::FIN_ORIGINAL | ct_state::FIN_REPLY)
}

/// The live entry for `tuple`, if any. Expired entries are removed (both directions) and reported as absent.
#[inline(always)]
pub fn lookup(tuple: &Tuple, now: u64, cfg: &Config) -> Option<*mut CtEntry> {
    let e = CONNTRACK.get_ptr_mut(tuple)?;
    // SAFETY: map value pointer; concurrent writers only store whole-field updates of the same flow.
    let entry = unsafe { &*e };
    if entry.expired(now, cfg) {
        let peer = entry.xlat.reversed();
        let _ = CONNTRACK.remove(tuple);
        let _ = CONNTRACK.remove(&peer);
        return None;
    }
    Some(e)
}

/// Records what this packet tells about the flow's state and refreshes both entries when needed.
#[inline(always)]
pub fn track(e: *mut CtEntry, pkt: &Packet, now: u64) {
    // SAFETY: see lookup.
    let entry = unsafe { &mut *e };
    let mut state = entry.state;
    let reply = entry.dir == dir::REPLY;
    if reply {
        state |= ct_state::SEEN_REPLY;
    }
    if pkt.tuple.proto == PROTO_TCP {
        if pkt.tcp_flags & TCP_RST != 0 {
            state |= ct_state::RST;
        }
        if pkt.tcp_flags & TCP_FIN != 0 {
            state |= if reply { ct_state::FIN_REPLY } else { ct_state::FIN_ORIGINAL };
        }
    }
    if state == entry.state && now.wrapping_sub(entry.last_seen_ns) < REFRESH_NS {
        return;
    }
    entry.state = state;
    entry.last_seen_ns = now;
    if let Some(p) = CONNTRACK.get_ptr_mut(&entry.xlat.reversed()) {
        // SAFETY: see lookup.
        let peer = unsafe { &mut *p };
        peer.state = state;
        peer.last_seen_ns = now;
    }
}

/// Creates both entries of a new flow: `orig` is translated to `xlat`, and replies (`xlat` reversed) back to `orig`
/// reversed. Returns false if the table refused the insert.
#[inline(always)]
pub fn create(orig: &Tuple, xlat: &Tuple, rule_slot: u32, now: u64) -> bool {
    let forward =
        CtEntry { xlat: *xlat, rule_slot, dir: dir::ORIGINAL, state: 0, _pad: 0, created_ns: now, last_seen_ns: now };
    let backward = CtEntry { xlat: orig.reversed(), dir: dir::REPLY, ..forward };
    CONNTRACK.insert(&xlat.reversed(), &backward, BPF_ANY as u64).is_ok()
        && CONNTRACK.insert(orig, &forward, BPF_ANY as u64).is_ok()
}
