//! Connection tracking: two LRU-hash entries per flow (original and reply tuple), created by the first packet,
//! refreshed lazily (at most once a second, or when the TCP state changes: no per-packet writes), expired on lookup
//! by idle time. An unconfirmed flow's packet also checks that the flow's other entry is there (one lookup) once its
//! table has taken enough new entries, since the flow last checked, that one of them may have evicted it
//! (`check_due`).
//!
//! Two tables, so that new flows can never push out established ones: a new flow's entries go into the unconfirmed
//! table (`CONNTRACK_NEW`), and move to the confirmed one (`CONNTRACK`) when the flow is confirmed, like netfilter's
//! ASSURED (`ct_state::CONFIRMED`: TCP once a reply was seen and then an ACK from the original side, which a spoofed
//! SYN never sends; other protocols once a reply was seen). A flood of new flows fills and evicts only the unconfirmed
//! table. Every lookup searches the confirmed table first (an established flow costs one lookup), then the other; a
//! move inserts into the confirmed table before it deletes from the other, so a reader always finds the flow. An
//! entry has the `CONFIRMED` bit exactly when it is in the confirmed table.
//!
//! Each family has its own pair of tables (`Family::conntrack`); the code is the same.
//!
//! The entries of a flow find each other through `xlat.reversed()`. An entry is only treated as the peer of another
//! if it points back, so a stale entry left by an earlier flow on the same ports can never change a live one.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_ktime_get_coarse_ns, generated::bpf_jiffies64},
    maps::LruHashMap,
};
use pfwd_common::{
    Config, CtEntryOf, DEFAULT_CT_ENTRIES, FlowTuple, PROTO_TCP, Stat, ct_flag, ct_hook, ct_state, dir,
    unconfirmed_check_inserts, unconfirmed_ct_entries,
};

use crate::{
    family::Family,
    maps::{CONFIG, CT_NEW_INSERTS, count},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const REFRESH_NS: u64 = 1_000_000_000;

/// The programs' clock, in ns: jiffies times the tick length userspace stored (`Config::tick_ns`; the verifier
/// inlines `bpf_jiffies64` into one load), else CLOCK_MONOTONIC_COARSE (a helper call). A tick's precision is
/// plenty for timeouts of seconds.
#[inline(always)]
pub fn now_ns() -> u64 {
    match CONFIG.get(0) {
        Some(c) => clock_ns(c),
        // SAFETY: plain helper call without arguments.
        None => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// [`now_ns`] for a caller that has the configuration at hand already (one map lookup fewer).
#[inline(always)]
pub fn clock_ns(cfg: &Config) -> u64 {
    if cfg.tick_ns != 0 {
        // SAFETY: plain helper call without arguments.
        (unsafe { bpf_jiffies64() }) * cfg.tick_ns as u64
    } else {
        // SAFETY: as above.
        unsafe { bpf_ktime_get_coarse_ns() }
    }
}

/// Inserts into an unconfirmed table after which a flow in it checks its other entry again
/// (`pfwd_common::unconfirmed_check_inserts` of the table's size). The loader sets it for the table it made; the
/// global sits in a frozen read-only map, so this is a constant to the verifier.
#[unsafe(no_mangle)]
static PFWD_CT_NEW_CHECK: u32 = unconfirmed_check_inserts(unconfirmed_ct_entries(DEFAULT_CT_ENTRIES));

#[inline(always)]
fn check_inserts() -> u32 {
    // SAFETY: a plain read of a global; volatile so the compiler does not fold in the default the loader overrides.
    unsafe { core::ptr::read_volatile(&PFWD_CT_NEW_CHECK) }
}

/// Where family `A`'s unconfirmed insert count is (`CT_NEW_INSERTS`).
#[inline(always)]
fn new_inserts<A: Family>() -> Option<*mut u64> {
    CT_NEW_INSERTS.get_ptr_mut(A::CT_NEW_INDEX)
}

/// The insert count at `c`.
#[inline(always)]
fn read_inserts(c: *mut u64) -> u64 {
    // SAFETY: a map value pointer; other CPUs only add to it atomically, and a word load is never torn.
    unsafe { core::ptr::read_volatile(c) }
}

/// Counts `n` inserts into family `A`'s unconfirmed table; returns the count before them (its low 32 bits, as
/// entries record it).
#[inline(always)]
fn note_new_inserts<A: Family>(n: u64) -> u32 {
    let Some(c) = new_inserts::<A>() else { return 0 };
    let before = read_inserts(c) as u32;
    // SAFETY: an atomic add (BPF_ATOMIC | BPF_ADD) to a map value; other CPUs add to it too. Rust has no atomic
    // read-modify-write for this target, so it is spelt out.
    unsafe { core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) c, in(reg) n, options(nostack)) };
    before
}

/// The table an entry lives in.
#[inline(always)]
fn table_of<A: Family>(e: &CtEntryOf<A>) -> &'static LruHashMap<FlowTuple<A>, CtEntryOf<A>> {
    if e.is_confirmed() { A::conntrack() } else { A::conntrack_new() }
}

/// The entry for `tuple` in either table (confirmed first), live or not, and whether it is the confirmed one.
#[inline(always)]
fn find<A: Family>(tuple: &FlowTuple<A>) -> Option<(*mut CtEntryOf<A>, bool)> {
    match A::conntrack().get_ptr_mut(tuple) {
        Some(p) => Some((p, true)),
        None => Some((A::conntrack_new().get_ptr_mut(tuple)?, false)),
    }
}

/// Whether a live flow of another origin than `ours` (the reversed original tuple of the flow being created)
/// owns `reply_key`: a flow translated to that tuple could not be told apart from it (SNAT port allocation).
#[inline(always)]
pub fn taken<A: Family>(reply_key: &FlowTuple<A>, ours: &FlowTuple<A>, now: u64, cfg: &Config) -> bool {
    match find(reply_key) {
        None => false,
        Some((p, _)) => {
            // SAFETY: a map value pointer from a successful lookup.
            let e = unsafe { &*p };
            e.xlat != *ours && !e.expired(now, cfg) && !e.is_closed()
        }
    }
}

/// The other direction's entry of the flow `key` belongs to, if it still points back to `key`, and whether it is in
/// the confirmed table.
#[inline(always)]
fn peer<A: Family>(key: &FlowTuple<A>, e: &CtEntryOf<A>) -> Option<(*mut CtEntryOf<A>, bool)> {
    let (p, confirmed) = find(&e.xlat.reversed())?;
    // SAFETY: map value pointer.
    (unsafe { (*p).xlat.reversed() } == *key).then_some((p, confirmed))
}

/// Removes the flow `key` belongs to: its entry, and the peer entry when that is still the same flow's. Not
/// inlined (as none of the rarely taken paths here are): their stack stays out of every packet's frame.
#[inline(never)]
pub fn remove_flow<A: Family>(key: &FlowTuple<A>, e: &CtEntryOf<A>) {
    match peer(key, e) {
        Some((_, true)) => drop(A::conntrack().remove(&e.xlat.reversed())),
        Some((_, false)) => drop(A::conntrack_new().remove(&e.xlat.reversed())),
        None => {}
    }
    let _ = table_of(e).remove(key);
}

/// The live entry for `tuple`, if any. Expired flows are removed and reported as absent.
#[inline(always)]
pub fn lookup<A: Family>(tuple: &FlowTuple<A>, now: u64, cfg: &Config) -> Option<*mut CtEntryOf<A>> {
    let (e, _) = find(tuple)?;
    // SAFETY: map value pointer; concurrent writers only store whole-field updates of the same flow.
    let entry = unsafe { &*e };
    if entry.expired(now, cfg) {
        remove_flow(tuple, entry);
        count(Stat::ExpiredRemoved);
        return None;
    }
    Some(e)
}

/// Whether this packet confirms its unconfirmed flow, given the flow's state with this packet counted.
#[inline(always)]
fn confirms<A: Family>(pkt: &Packet<A>, reply: bool, state: u8) -> bool {
    if state & ct_state::SEEN_REPLY == 0 {
        return false;
    }
    if pkt.tuple.proto != PROTO_TCP {
        return true;
    }
    // The original side's ACK of the SYN-ACK (or anything later of it), on a flow not reset.
    !reply && state & ct_state::RST == 0 && pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK
}

/// Moves the flow of the unconfirmed entry `key` -> `entry` to the confirmed table with `state` (which has
/// `CONFIRMED`): both entries are inserted there, then removed from the unconfirmed table. False (nothing changed)
/// when the confirmed table holds another flow's entry on the reply key or refuses the insert.
#[inline(never)]
fn promote<A: Family>(key: &FlowTuple<A>, entry: &CtEntryOf<A>, state: u8, now: u64) -> bool {
    // The entry and the other key in this CPU's scratch value: off the stack, which the calling chain needs.
    let Some(s) = A::ct_scratch() else { return false };
    s.reply_key = entry.xlat.reversed();
    let peer_key = &s.reply_key;
    // One value: the other direction's entry first (built from this one, as a restore would, so an evicted peer is
    // no obstacle), then this one.
    s.entry = CtEntryOf {
        xlat: key.reversed(),
        dir: if entry.dir == dir::REPLY { dir::ORIGINAL } else { dir::REPLY },
        hook: if entry.hook == ct_hook::INGRESS { ct_hook::EGRESS } else { ct_hook::INGRESS },
        state,
        // The flow's first packet in the confirmed table refreshes it and so checks that both entries made it (the
        // inserts into a full table may evict one of a pair) and restores a missing one.
        flags: entry.flags | ct_flag::UNCHECKED,
        last_seen_ns: now,
        ..*entry
    };
    let v = &mut s.entry;
    if A::conntrack().insert(peer_key, &*v, BPF_NOEXIST as u64).is_err() {
        // Another CPU promoting the same flow is fine; another flow's entry there is not ours to overwrite.
        // SAFETY: a map value pointer from a successful lookup.
        let same_flow = A::conntrack().get_ptr(peer_key).is_some_and(|p| unsafe { (*p).xlat } == v.xlat);
        if !same_flow {
            return false;
        }
    }
    // Referenced before the next insert, so a full table does not evict it for its partner (see create).
    let _ = A::conntrack().get_ptr(peer_key);
    v.xlat = entry.xlat;
    v.dir = entry.dir;
    v.hook = entry.hook;
    if A::conntrack().insert(key, &*v, BPF_ANY as u64).is_err() {
        let _ = A::conntrack().remove(peer_key);
        return false;
    }
    // SAFETY: as above.
    if A::conntrack_new().get_ptr(peer_key).is_some_and(|p| unsafe { (*p).xlat.reversed() } == *key) {
        let _ = A::conntrack_new().remove(peer_key);
    }
    let _ = A::conntrack_new().remove(key);
    true
}

/// Records what this packet tells about the flow's state, confirms the flow (moving it to the confirmed table)
/// when this packet does, and refreshes both entries when needed.
#[inline(always)]
pub fn track<A: Family>(key: &FlowTuple<A>, e: *mut CtEntryOf<A>, pkt: &Packet<A>, now: u64) {
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
    if state & ct_state::CONFIRMED == 0
        && confirms(pkt, reply, state)
        && promote(key, entry, state | ct_state::CONFIRMED, now)
    {
        count(Stat::FlowsConfirmed);
        return;
    }
    if state == entry.state
        && now.saturating_sub(entry.last_seen_ns) < REFRESH_NS
        && entry.flags & ct_flag::UNCHECKED == 0
        // An unconfirmed flow's other entry is checked once its table may have evicted it: that table is the one a
        // flood evicts from, and a flow missing its reply entry must get it back before the reply comes, not a
        // second later.
        && (state & ct_state::CONFIRMED != 0 || !check_due(entry) || unconfirmed_peer_present(key, entry))
    {
        return;
    }
    refresh(key, e, state, now);
}

/// Whether the unconfirmed entry `e` is due to check its other entry: since its flow last found both, the table
/// took `check_inserts()` new entries or more. Fewer cannot have pushed out an entry that was referenced then (see
/// `pfwd_common::unconfirmed_check_inserts`), so until then the check, a cold lookup on every packet of a one-way
/// flow, is skipped. When due, the count it is checked at is recorded (the check follows; if it fails, `refresh`
/// restores the entry).
#[inline(always)]
fn check_due<A: Family>(e: &mut CtEntryOf<A>) -> bool {
    let Some(c) = new_inserts::<A>() else { return true };
    let inserts = read_inserts(c) as u32;
    if inserts.wrapping_sub(e.checked_inserts) < check_inserts() {
        return false;
    }
    e.checked_inserts = inserts;
    true
}

/// Whether the unconfirmed entry `key` -> `e` still has its other entry in the unconfirmed table, pointing back
/// (one lookup; the peer of an unconfirmed entry lives there unless the flow is being confirmed on another CPU,
/// which `refresh` finds). Not inlined: the reversed key stays out of the caller's frame.
#[inline(never)]
fn unconfirmed_peer_present<A: Family>(key: &FlowTuple<A>, e: &CtEntryOf<A>) -> bool {
    // SAFETY: a map value pointer from a successful lookup.
    A::conntrack_new().get_ptr(&e.xlat.reversed()).is_some_and(|p| unsafe { (*p).xlat.reversed() } == *key)
}

/// Stores `state` and the time in both entries of the flow `key` -> `e`, restoring the other entry if the LRU
/// evicted it.
#[inline(never)]
fn refresh<A: Family>(key: &FlowTuple<A>, e: *mut CtEntryOf<A>, state: u8, now: u64) {
    // SAFETY: see lookup.
    let entry = unsafe { &mut *e };
    let reply = entry.dir == dir::REPLY;
    entry.state = state;
    entry.last_seen_ns = now;
    entry.flags &= !ct_flag::UNCHECKED;
    let inserts = new_inserts::<A>().map_or(0, read_inserts) as u32;
    entry.checked_inserts = inserts;
    if let Some((p, _)) = peer(key, entry) {
        // SAFETY: see lookup.
        let peer = unsafe { &mut *p };
        peer.state = state;
        peer.last_seen_ns = now;
        peer.flags &= !ct_flag::UNCHECKED;
        peer.checked_inserts = inserts;
    } else {
        // The LRU evicted the other direction of this live flow (a full table): put it back, unless another flow
        // took that tuple meanwhile.
        let other = CtEntryOf {
            xlat: key.reversed(),
            dir: if reply { dir::ORIGINAL } else { dir::REPLY },
            hook: if entry.hook == ct_hook::INGRESS { ct_hook::EGRESS } else { ct_hook::INGRESS },
            ..*entry
        };
        let restored = table_of(entry).insert(&entry.xlat.reversed(), &other, BPF_NOEXIST as u64).is_ok();
        if restored && !entry.is_confirmed() {
            note_new_inserts::<A>(1);
            count(Stat::UnconfirmedRestored);
        }
    }
}

/// Creates both entries of a new flow, in the unconfirmed table: `orig` (applied at `hook`) is translated to `xlat`,
/// and replies (`xlat` reversed, applied at the other hook) back to `orig` reversed. Fails with `CtInsertFailed`
/// when the table refuses the insert, or with `CtClash` when a live flow (in either table) already owns the reply
/// tuple: two flows translated to the same tuple could not tell their replies apart (SNAT port allocation then tries
/// another port). `flags`: the entries' [`pfwd_common::ct_flag`] bits. Not inlined: its entry and keys stay out
/// of the caller's frame.
#[inline(never)]
pub fn create<A: Family>(
    orig: &FlowTuple<A>,
    xlat: &FlowTuple<A>,
    rule_slot: u32,
    hook: u8,
    flags: u8,
) -> Result<(), Stat> {
    let (Some(cfg), Some(s)) = (CONFIG.get(0), A::ct_scratch()) else { return Err(Stat::CtInsertFailed) };
    let now = clock_ns(cfg);
    s.reply_key = xlat.reversed();
    s.ours = orig.reversed();
    let reply_key = &s.reply_key;
    if let Some((p, _)) = find(reply_key) {
        // SAFETY: map value pointer.
        let other = unsafe { &*p };
        if other.xlat != s.ours {
            if !other.expired(now, cfg) && !other.is_closed() {
                return Err(Stat::CtClash);
            }
            remove_flow(reply_key, other);
        }
    }
    // What the new flow translates at ingress goes on as `to`: if egress translates that tuple (another flow's),
    // those packets have more to do there (`EGRESS_TOO`).
    let to = if hook == ct_hook::INGRESS { xlat } else { &s.ours };
    let flags = if egress_too(to) { flags | ct_flag::EGRESS_TOO } else { flags };
    // One entry value, filled for the reply direction first, then reused for the original one.
    s.entry = CtEntryOf {
        xlat: s.ours,
        rule_slot,
        dir: dir::REPLY,
        state: 0,
        hook: if hook == ct_hook::INGRESS { ct_hook::EGRESS } else { ct_hook::INGRESS },
        flags,
        created_s: (now / 1_000_000_000) as u32,
        last_seen_ns: now,
        // Both entries are referenced below: the flow's first check is due after `check_inserts()` more.
        checked_inserts: note_new_inserts::<A>(2),
    };
    // NOEXIST claims the reply tuple atomically against another CPU allocating the same one; losing that race to
    // the same flow (its other packet) is fine, losing it to a different flow is a clash.
    if A::conntrack_new().insert(reply_key, &s.entry, BPF_NOEXIST as u64).is_err() {
        // SAFETY: a map value pointer from a successful lookup; the entry is read once.
        let same_flow = A::conntrack_new().get_ptr_mut(reply_key).is_some_and(|p| unsafe { (*p).xlat } == s.ours);
        if !same_flow {
            return Err(Stat::CtClash);
        }
        let _ = A::conntrack_new().insert(reply_key, &s.entry, BPF_ANY as u64);
    }
    // In a full LRU table a fresh entry that was never looked up is the first candidate for eviction, and the next
    // insert could push it out: look it up (which marks it referenced) before inserting its partner, and make sure
    // both are there at the end. A flow with only one of its entries would send replies out untranslated.
    let _ = A::conntrack_new().get_ptr(reply_key);
    s.entry.xlat = *xlat;
    s.entry.dir = dir::ORIGINAL;
    s.entry.hook = hook;
    if A::conntrack_new().insert(orig, &s.entry, BPF_ANY as u64).is_err()
        || A::conntrack_new().get_ptr(reply_key).is_none()
    {
        let _ = A::conntrack_new().remove(orig);
        let _ = A::conntrack_new().remove(reply_key);
        return Err(Stat::CtInsertFailed);
    }
    Ok(())
}

/// Whether `to`, a tuple a new flow translates packets to at ingress, is the key of an entry egress translates: then
/// the new flow's packets translated to `to` have more to do at egress (`ct_flag::EGRESS_TOO`). If that entry's
/// flow translates packets to `to` reversed at ingress (its other entry points back), that flow gets the flag too:
/// those packets now meet the new flow's entry at egress. The two halves of a full NAT find each other this way
/// whichever is created first. Only at flow creation: established packets read the flag, never this.
#[inline(never)]
fn egress_too<A: Family>(to: &FlowTuple<A>) -> bool {
    let Some((p, _)) = find(to) else { return false };
    // SAFETY: a map value pointer from a successful lookup.
    let pe = unsafe { &mut *p };
    if pe.hook != ct_hook::EGRESS {
        return false;
    }
    if let Some((i, _)) = find(&pe.xlat.reversed()) {
        // SAFETY: as above.
        let ie = unsafe { &mut *i };
        if ie.hook == ct_hook::INGRESS && ie.xlat.reversed() == *to {
            ie.flags |= ct_flag::EGRESS_TOO;
            pe.flags |= ct_flag::EGRESS_TOO;
        }
    }
    true
}

/// Marks the flow whose ingress entry is `key` (translating packets to `to`) settled at egress
/// (`ct_flag::SETTLED`), in both its entries: a packet it translated has passed egress. Once per flow.
#[inline(never)]
pub fn settle<A: Family>(key: &FlowTuple<A>, to: &FlowTuple<A>) {
    let Some((i, _)) = find(key) else { return };
    // SAFETY: a map value pointer from a successful lookup.
    let ie = unsafe { &mut *i };
    if ie.hook != ct_hook::INGRESS || ie.xlat != *to {
        return;
    }
    ie.flags |= ct_flag::SETTLED;
    if let Some((p, _)) = peer(key, ie) {
        // SAFETY: as above.
        unsafe { (*p).flags |= ct_flag::SETTLED };
    }
}

/// Whether `t`, a packet that is about to open a flow at egress, is what a settled flow translates packets to at
/// ingress (`ct_flag::SETTLED`): that flow's NAT at egress was settled by an earlier packet, and this one opens no
/// flow there. The handoff tells egress as much for the packets it describes; this catches the others (a packet that
/// waited between the hooks). Only on the way to a new flow: after a rule matched.
#[inline(never)]
pub fn settled_at_egress<A: Family>(t: &FlowTuple<A>) -> bool {
    let Some((p, _)) = find(&t.reversed()) else { return false };
    // SAFETY: a map value pointer from a successful lookup.
    let pe = unsafe { &*p };
    if pe.hook != ct_hook::EGRESS {
        return false;
    }
    let Some((i, _)) = find(&pe.xlat.reversed()) else { return false };
    // SAFETY: as above.
    let ie = unsafe { &*i };
    ie.hook == ct_hook::INGRESS && ie.xlat == *t && ie.flags & ct_flag::SETTLED != 0
}
