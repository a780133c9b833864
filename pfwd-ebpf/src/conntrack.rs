//! Connection tracking: two LRU-hash entries per flow (original and reply tuple), created by the first packet,
//! refreshed lazily (at most once a second, or when the TCP state changes), expired on lookup by idle time.
//!
//! The entries of a flow find each other through `xlat.reversed()`. An entry is only treated as the peer of another
//! if it points back, so a stale entry left by an earlier flow on the same ports can never change a live one.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
};
use pfwd_common::{Config, CtEntry, PROTO_TCP, Stat, Tuple, ct_hook, ct_state, dir};

use crate::{
    maps::{CONNTRACK, count},
    parse::{Packet, TCP_FIN, TCP_RST},
};

const REFRESH_NS: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC_COARSE: a tick's precision is plenty for timeouts of seconds, and much cheaper per packet.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: plain helper call without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
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
        count(Stat::ExpiredRemoved);
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
    } else {
        // The LRU evicted the other direction of this live flow (a full table): put it back, unless another flow
        // took that tuple meanwhile.
        let other = CtEntry {
            xlat: key.reversed(),
            dir: if reply { dir::ORIGINAL } else { dir::REPLY },
            hook: if entry.hook == ct_hook::INGRESS { ct_hook::EGRESS } else { ct_hook::INGRESS },
            ..*entry
        };
        let _ = CONNTRACK.insert(&entry.xlat.reversed(), &other, BPF_NOEXIST as u64);
    }
}

/// Creates both entries of a new flow: `orig` (applied at `hook`) is translated to `xlat`, and replies (`xlat`
/// reversed, applied at the other hook) back to `orig` reversed. Fails with `CtInsertFailed` when the table refuses
/// the insert, or with `CtClash` when a live flow already owns the reply tuple: two flows translated to the same
/// tuple could not tell their replies apart (SNAT port allocation then tries another port).
#[inline(always)]
pub fn create(orig: &Tuple, xlat: &Tuple, rule_slot: u32, now: u64, cfg: &Config, hook: u8) -> Result<(), Stat> {
    let reply_key = xlat.reversed();
    let ours = orig.reversed();
    if let Some(p) = CONNTRACK.get_ptr_mut(&reply_key) {
        // SAFETY: map value pointer.
        let other = unsafe { &*p };
        if other.xlat != ours {
            if !other.expired(now, cfg) && !other.is_closed() {
                return Err(Stat::CtClash);
            }
            remove_flow(&reply_key, other);
        }
    }
    // One entry value on the stack, filled for the reply direction first, then reused for the original one.
    let mut entry = CtEntry {
        xlat: ours,
        rule_slot,
        dir: dir::REPLY,
        state: 0,
        hook: if hook == ct_hook::INGRESS { ct_hook::EGRESS } else { ct_hook::INGRESS },
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
    };
    // NOEXIST claims the reply tuple atomically against another CPU allocating the same one; losing that race to
    // the same flow (its other packet) is fine, losing it to a different flow is a clash.
    if CONNTRACK.insert(&reply_key, &entry, BPF_NOEXIST as u64).is_err() {
        // SAFETY: a map value pointer from a successful lookup; the entry is read once.
        let same_flow = CONNTRACK.get_ptr_mut(&reply_key).is_some_and(|p| unsafe { (*p).xlat } == ours);
        if !same_flow {
            return Err(Stat::CtClash);
        }
        let _ = CONNTRACK.insert(&reply_key, &entry, BPF_ANY as u64);
    }
    // In a full LRU table a fresh entry that was never looked up is the first candidate for eviction, and the next
    // insert could push it out: look it up (which marks it referenced) before inserting its partner, and make sure
    // both are there at the end. A flow with only one of its entries would send replies out untranslated.
    let _ = CONNTRACK.get_ptr(&reply_key);
    entry.xlat = *xlat;
    entry.dir = dir::ORIGINAL;
    entry.hook = hook;
    if CONNTRACK.insert(orig, &entry, BPF_ANY as u64).is_err() || CONNTRACK.get_ptr(&reply_key).is_none() {
        let _ = CONNTRACK.remove(orig);
        let _ = CONNTRACK.remove(&reply_key);
        return Err(Stat::CtInsertFailed);
    }
    Ok(())
}
