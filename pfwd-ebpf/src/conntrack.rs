//! Connection tracking: two LRU-hash entries per flow (original and reply tuple), created by the first packet,
//! refreshed lazily (at most once a second, or when the TCP state changes), expired on lookup by idle time.
//!
//! The entries of a flow find each other through `xlat.reversed()`. An entry is only treated as the peer of another
//! if it points back, so a stale entry left by an earlier flow on the same ports can never change a live one.
use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use pfwd_common::{Config, CtEntry, PROTO_TCP, Tuple, ct_state, dir, stat};

use crate::{
    maps::{CONNTRACK, count},
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
    pkt.tuple.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
}

#[inline(always)]
pub fn is_closed(e: &CtEntry) -> bool {
    e.state & ct_state::RST != 0
        || e.state & (ct_state::FIN_ORIGINAL | ct_state::FIN_REPLY) == (ct_state::FIN_ORIGINAL | ct_state::FIN_REPLY)
}

/// The other direction's entry of the flow `key` belongs to, if it still points back to `key`.
#[inline(always)]
fn peer(key: &Tuple, e: &CtEntry) -> Option<*mut CtEntry> {
    let p = CONNTRACK.get_ptr_mut(&e.xlat.reversed())?;
    // SAFETY: map value pointer.
    (unsafe { (*p).xlat.reversed() } == *key).then_some(p)
}

/// Removes the flow `key` belongs to: its entry, and the peer entry when that is still the same flow's.
#[inline(always)]
pub fn remove_flow(key: &Tuple, e: &CtEntry) {
    if peer(key, e).is_some() {
        let _ = CONNTRACK.remove(&e.xlat.reversed());
    }
    let _ = CONNTRACK.remove(key);
}

/// The live entry for `tuple`, if any. Expired flows are removed and reported as absent.
#[inline(always)]
pub fn lookup(tuple: &Tuple, now: u64, cfg: &Config) -> Option<*mut CtEntry> {
    let e = CONNTRACK.get_ptr_mut(tuple)?;
    // SAFETY: map value pointer; concurrent writers only store whole-field updates of the same flow.
    let entry = unsafe { &*e };
    if entry.expired(now, cfg) {
        remove_flow(tuple, entry);
        count(stat::EXPIRED_REMOVED);
        return None;
    }
    Some(e)
}

/// Records what this packet tells about the flow's state and refreshes both entries when needed.
#[inline(always)]
pub fn track(key: &Tuple, e: *mut CtEntry, pkt: &Packet, now: u64) {
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
    if let Some(p) = peer(key, entry) {
        // SAFETY: see lookup.
        let peer = unsafe { &mut *p };
        peer.state = state;
        peer.last_seen_ns = now;
    }
}

/// Creates both entries of a new flow: `orig` is translated to `xlat`, and replies (`xlat` reversed) back to `orig`
/// reversed. Fails (with the stat to count) when the table refuses the insert, or when a live flow already owns the
/// reply tuple: two flows translated to the same tuple could not tell their replies apart.
#[inline(always)]
pub fn create(orig: &Tuple, xlat: &Tuple, rule_slot: u32, now: u64, cfg: &Config) -> Result<(), u32> {
    let reply_key = xlat.reversed();
    if let Some(p) = CONNTRACK.get_ptr_mut(&reply_key) {
        // SAFETY: map value pointer.
        let other = unsafe { &*p };
        if other.xlat != orig.reversed() {
            if !other.expired(now, cfg) && !is_closed(other) {
                return Err(stat::CT_CLASH);
            }
            remove_flow(&reply_key, other);
        }
    }
    let forward =
        CtEntry { xlat: *xlat, rule_slot, dir: dir::ORIGINAL, state: 0, _pad: 0, created_ns: now, last_seen_ns: now };
    let backward = CtEntry { xlat: orig.reversed(), dir: dir::REPLY, ..forward };
    if CONNTRACK.insert(&reply_key, &backward, BPF_ANY as u64).is_ok()
        && CONNTRACK.insert(orig, &forward, BPF_ANY as u64).is_ok()
    {
        Ok(())
    } else {
        Err(stat::CT_INSERT_FAILED)
    }
}
