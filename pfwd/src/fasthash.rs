//! Hash maps and sets for pfwd's own bookkeeping of rules (duplicate keys, slots, index keys): foldhash instead of
//! std's SipHash. SipHash resists collision floods from remote input; these maps hold rules root gave pfwd, and
//! SipHash was about a tenth of an import of 10,000 rules.

/// A [`std::collections::HashMap`] with foldhash (`Default::default()` or [`map_with_capacity`] to make one).
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A [`std::collections::HashSet`] with foldhash.
pub type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// An empty [`FastMap`] with room for `n` entries (no rehashing while it fills).
pub fn map_with_capacity<K, V>(n: usize) -> FastMap<K, V> {
    FastMap::with_capacity_and_hasher(n, Default::default())
}

/// An empty [`FastSet`] with room for `n` items.
pub fn set_with_capacity<T>(n: usize) -> FastSet<T> {
    FastSet::with_capacity_and_hasher(n, Default::default())
}
