//! A small rule change compiled without the rules it does not touch: what the kernel's view becomes for the index
//! keys the changed rules have, from what those keys held before. With it a `pfwd add` or `pfwd del` costs the same
//! with 10 or 100,000 rules installed: nothing here looks at a rule the change does not touch.
//!
//! The inputs are the changed rules compiled alone ([`super::compile::build`]), every member of each touched key
//! before the change ([`Member`]s: the kernel's index lists a key's rules up to its first unconditional one, and
//! the rules after it, hidden, are kept with the state), and each class with how many keys it holds ([`ClassKeys`],
//! kept with the state too). The output is a [`Compiled`] restricted to the touched keys that
//! [`super::plan::plan_change`] turns into the same map writes a full compile would give.
use std::collections::{HashMap, HashSet};

use pfwd_common::maps::{Class, INDEX_ENTRIES, INDEX_SLOTS, IndexKey, MAX_CLASSES, RuleEntry};
use serde::{Deserialize, Serialize};

use super::compile::{CONDITIONAL, Compiled, class_of, class_shaped};
use super::error::RuleError;

/// One rule of an index key, with what the index needs of it: its rank and id (the kernel's order) and its flags
/// (whether it is conditional, [`listed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub rank: u64,
    pub id: u32,
    pub slot: u32,
    pub flags: u8,
}

impl Member {
    /// The member a kernel entry describes.
    pub fn of(slot: u32, e: &RuleEntry) -> Member {
        Member { rank: e.rank, id: e.id, slot, flags: e.flags }
    }

    /// An entry carrying only what the index looks at (rank, id, flags): enough for [`super::plan::plan_change`]
    /// to order and trim the lists of rules the change does not touch.
    fn entry(&self) -> RuleEntry {
        RuleEntry { rank: self.rank, id: self.id, flags: self.flags, ..RuleEntry::default() }
    }

    /// The stored form: rank, id, slot and flags in 17 bytes.
    pub fn encode(members: &[Member]) -> Vec<u8> {
        members
            .iter()
            .flat_map(|m| {
                m.rank.to_le_bytes().into_iter().chain(m.id.to_le_bytes()).chain(m.slot.to_le_bytes()).chain([m.flags])
            })
            .collect()
    }

    /// Reads [`Member::encode`]'s form (a short tail is ignored).
    pub fn decode(bytes: &[u8]) -> Vec<Member> {
        let u32_at = |c: &[u8], i: usize| u32::from_le_bytes(c[i..i + 4].try_into().unwrap_or_default());
        bytes
            .chunks_exact(17)
            .map(|c| Member {
                rank: u64::from_le_bytes(c[..8].try_into().unwrap_or_default()),
                id: u32_at(c, 8),
                slot: u32_at(c, 12),
                flags: c[16],
            })
            .collect()
    }
}

/// A class of the rule index (a match shape of one hook, [`Class`]) with its lowest rank and how many index keys it
/// holds: a class goes when its last key does. After deletions `min_rank` may be below the true lowest rank (the
/// lookup only needs a lower bound: it may look one class further before stopping); every full compile makes it
/// exact again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassKeys {
    pub hook: u8,
    pub flags: u8,
    /// [`pfwd_common::family`] of the class's rules (0: both).
    #[serde(default)]
    pub family: u8,
    pub port_plen: u8,
    pub src_plen: u8,
    pub dst_plen: u8,
    pub min_rank: u64,
    pub keys: u32,
}

/// A class's shape: hook, [`pfwd_common::class_flag`]s, family and prefix lengths (port, source, destination).
type Shape = (u8, u8, u8, u8, u8, u8);

impl ClassKeys {
    fn shape(&self) -> Shape {
        (self.hook, self.flags, self.family, self.port_plen, self.src_plen, self.dst_plen)
    }

    /// The class of `key` with no keys yet.
    fn of(key: &IndexKey) -> ClassKeys {
        let c = class_of(key);
        ClassKeys {
            hook: key.hook,
            flags: c.flags,
            family: c.family,
            port_plen: c.port_plen,
            src_plen: c.src_plen,
            dst_plen: c.dst_plen,
            min_rank: u64::MAX,
            keys: 0,
        }
    }

    /// The kernel's class.
    fn class(&self) -> Class {
        Class {
            min_rank: self.min_rank,
            ..class_shaped(self.flags, self.family, self.port_plen, self.src_plen, self.dst_plen)
        }
    }
}

/// Each class of a full compile with the number of keys it holds (exact `min_rank`s).
pub fn class_keys(c: &Compiled) -> Vec<ClassKeys> {
    let mut out: HashMap<Shape, ClassKeys> = HashMap::new();
    for key in c.members.iter().filter(|(_, m)| !m.is_empty()).map(|(k, _)| k) {
        let ck = ClassKeys::of(key);
        out.entry(ck.shape()).or_insert(ck).keys += 1;
    }
    for (hook, classes) in c.classes.iter().enumerate() {
        for class in classes {
            let shape = (hook as u8, class.flags, class.family, class.port_plen, class.src_plen, class.dst_plen);
            if let Some(ck) = out.get_mut(&shape) {
                ck.min_rank = class.min_rank;
            }
        }
    }
    let mut out: Vec<ClassKeys> = out.into_values().collect();
    out.sort_by_key(|c| (c.shape(), c.min_rank));
    out
}

/// Every key's hidden members in a full compile: the rules after the ones its kernel entry lists.
pub fn hidden_members(c: &Compiled) -> Vec<(IndexKey, Vec<Member>)> {
    c.members
        .iter()
        .filter_map(|(key, slots)| {
            let shown = c.listed(slots).len();
            let hidden: Vec<Member> =
                slots[shown..].iter().filter_map(|s| c.entry(*s).map(|e| Member::of(*s, e))).collect();
            (!hidden.is_empty()).then_some((*key, hidden))
        })
        .collect()
}

/// What a small change makes of the touched keys (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// The new rules of the touched keys (members in rank order, entries of every member) and every hook's classes:
    /// the `new` that [`super::plan::plan_change`] needs.
    pub compiled: Compiled,
    /// Touched keys whose hidden members change, with their new ones (empty: none left).
    pub hidden: Vec<(IndexKey, Vec<Member>)>,
    /// Every class with its key count after the change.
    pub classes: Vec<ClassKeys>,
}

/// The change from `old_changed` (the rules removed, compiled alone) to `new_changed` (the rules added), given each
/// touched key's members before it (`before`, rank order; a key missing there had none) and the classes.
pub fn delta(
    old_changed: &Compiled,
    new_changed: &Compiled,
    before: &HashMap<IndexKey, Vec<Member>>,
    classes: &[ClassKeys],
) -> Result<Delta, RuleError> {
    let removed: HashSet<u32> = old_changed.entries.iter().map(|(s, _)| *s).collect();
    let touched: HashSet<&IndexKey> = old_changed.members.keys().chain(new_changed.members.keys()).collect();
    let mut counts: HashMap<Shape, ClassKeys> = classes.iter().map(|c| (c.shape(), *c)).collect();
    let mut d = Delta::default();
    let c = &mut d.compiled;
    let none = Vec::new();
    for key in touched {
        let had = before.get(key).unwrap_or(&none);
        let mut now: Vec<Member> = had.iter().filter(|m| !removed.contains(&m.slot)).copied().collect();
        let added: Vec<Member> = new_changed
            .members
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|s| new_changed.entry(*s).map(|e| Member::of(*s, e)))
            .collect();
        now.extend(&added);
        now.sort_by_key(|m| (m.rank, m.id, m.slot));
        let class = counts.entry(ClassKeys::of(key).shape()).or_insert_with(|| ClassKeys::of(key));
        match (had.is_empty(), now.is_empty()) {
            (true, false) => class.keys += 1,
            (false, true) => class.keys = class.keys.saturating_sub(1),
            _ => {}
        }
        if let Some(lowest) = added.iter().map(|m| m.rank).min() {
            class.min_rank = class.min_rank.min(lowest);
        }
        let entry_of = |m: &Member| new_changed.entry(m.slot).copied().unwrap_or_else(|| m.entry());
        for m in &now {
            if !c.positions.contains_key(&m.slot) {
                c.positions.insert(m.slot, c.entries.len());
                c.entries.push((m.slot, entry_of(m)));
            }
        }
        let shown = shown(&now);
        if shown > INDEX_SLOTS {
            let ids: Vec<String> = now[..shown].iter().map(|m| m.id.to_string()).collect();
            return Err(RuleError::IndexFull { ids: ids.join(", ") });
        }
        if had[self::shown(had)..] != now[shown..] {
            d.hidden.push((*key, now[shown..].to_vec()));
        }
        c.members.insert(*key, now.iter().map(|m| m.slot).collect());
    }
    let mut kept: Vec<ClassKeys> = counts.into_values().filter(|c| c.keys > 0).collect();
    // Every key belongs to one class: the counts add up to the index's size.
    let keys: usize = kept.iter().map(|c| c.keys as usize).sum();
    if keys > INDEX_ENTRIES as usize {
        return Err(RuleError::TooManyIndexKeys { count: keys });
    }
    kept.sort_by_key(|c| (c.min_rank, c.flags, c.family, c.port_plen, c.src_plen, c.dst_plen));
    for (hook, classes) in d.compiled.classes.iter_mut().enumerate() {
        *classes = kept.iter().filter(|c| c.hook as usize == hook).map(ClassKeys::class).collect();
        if classes.len() > MAX_CLASSES as usize {
            return Err(RuleError::TooManyClasses { count: classes.len() });
        }
    }
    kept.sort_by_key(|c| (c.shape(), c.min_rank));
    d.classes = kept;
    Ok(d)
}

/// How many of a key's members (rank order) its kernel entry lists: up to the first unconditional one, as
/// [`super::compile::listed`].
fn shown(members: &[Member]) -> usize {
    members.iter().position(|m| m.flags & CONDITIONAL == 0).map_or(members.len(), |first| first + 1)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::rules::compile::build;
    use crate::rules::plan::{Held, plan_change};
    use crate::rules::tests::{Rng, ifindex, net, ok};
    use crate::rules::*;

    /// A rule from small pools, so that rules often share keys, shadow each other and carry negations.
    fn pooled(rng: &mut Rng, id: u32) -> Rule {
        let post = rng.chance(25);
        let mut r = if post { ok("masquerade") } else { ok("dnat --to 10.9.0.1") };
        r.id = id;
        r.proto = rng.pick(&[None, Some(Proto::Tcp), Some(Proto::Udp)]);
        if r.proto.is_some() && !post && rng.chance(70) {
            r.dport =
                Some(rng.pick(&[PortRange::single(80), PortRange { lo: 1, hi: 1000 }, PortRange { lo: 80, hi: 90 }]));
        }
        let iface = rng.pick(&[None, Some("eth0"), Some("eth1")]).map(String::from);
        if post {
            r.oface = iface;
        } else {
            r.iface = iface;
        }
        r.src = rng.pick(&[None, Some(net("10.0.0.0/8")), Some(net("10.1.0.0/16"))]);
        r.not.src = r.src.is_some() && rng.chance(20);
        r.not.iface = r.hook_iface().is_some() && rng.chance(20);
        r.dst_local = !post && rng.chance(10);
        if !post {
            r.target = Target::Dnat { addr: crate::rules::tests::ip(rng.pick(&["10.9.0.1", "10.9.0.2"])), port: None };
        }
        r
    }

    fn compile_all(rules: &BTreeMap<u32, Rule>) -> Compiled {
        let pairs: Vec<(u32, &Rule)> = rules.iter().map(|(s, r)| (*s, r)).collect();
        build(&pairs, &ifindex).unwrap()
    }

    /// A long run of small changes, each compiled with only the rules it touches and applied to a model of the
    /// kernel's index: after each, the index, the hidden members and the classes are those of a full compile (the
    /// classes' lowest ranks may stay below the true ones after deletions, never above).
    #[test]
    fn small_changes_match_a_full_compile() {
        let mut rng = Rng(0x5eed_1e55);
        let mut rules: BTreeMap<u32, Rule> = BTreeMap::new(); // by slot
        let (mut next_id, mut next_slot) = (1u32, 0u32);
        let full = compile_all(&rules);
        let mut held = Held::from_compiled(&full);
        let mut hidden: HashMap<IndexKey, Vec<Member>> = HashMap::new();
        let mut classes = class_keys(&full);
        let mut shadowed_seen = 0;
        for step in 0..400 {
            let removed: Vec<u32> = rules.keys().copied().filter(|_| rng.chance(8)).take(3).collect();
            let mut added: Vec<(u32, Rule)> = vec![];
            for _ in 0..rng.below(4) {
                let r = pooled(&mut rng, next_id);
                let dup = rules.values().chain(added.iter().map(|(_, r)| r)).any(|o| o.dedup_key() == r.dedup_key());
                if !dup {
                    added.push((next_slot, r));
                    next_id += 1;
                    next_slot += 1;
                }
            }
            let old_pairs: Vec<(u32, &Rule)> = removed.iter().map(|s| (*s, &rules[s])).collect();
            let new_pairs: Vec<(u32, &Rule)> = added.iter().map(|(s, r)| (*s, r)).collect();
            let (old_changed, new_changed) =
                (build(&old_pairs, &ifindex).unwrap(), build(&new_pairs, &ifindex).unwrap());
            let before: HashMap<IndexKey, Vec<Member>> = old_changed
                .members
                .keys()
                .chain(new_changed.members.keys())
                .map(|k| {
                    let shown = held.index.get(k).into_iter().flatten().map(|s| Member::of(*s, &held.entries[s]));
                    (*k, shown.chain(hidden.get(k).into_iter().flatten().copied()).collect())
                })
                .collect();
            let d = delta(&old_changed, &new_changed, &before, &classes).unwrap();
            let p = plan_change(&d.compiled, &new_changed, &old_changed, step).unwrap();
            // Carry the plan out on the model.
            for (s, e) in &p.rules {
                held.entries.insert(*s, *e);
            }
            for (k, slots) in p.index.iter().chain(&p.index_after) {
                if slots.is_empty() {
                    held.index.remove(k);
                } else {
                    held.index.insert(*k, slots.clone());
                }
            }
            for (s, _) in &p.cleared {
                held.entries.remove(s);
            }
            for (k, h) in d.hidden {
                if h.is_empty() {
                    hidden.remove(&k);
                } else {
                    hidden.insert(k, h);
                }
            }
            classes = d.classes;
            for s in &removed {
                rules.remove(s);
            }
            rules.extend(added);

            let full = compile_all(&rules);
            assert_eq!(held.index, full.index(), "step {step}: index");
            let full_hidden: HashMap<IndexKey, Vec<Member>> = hidden_members(&full).into_iter().collect();
            assert_eq!(hidden, full_hidden, "step {step}: hidden members");
            shadowed_seen += hidden.len();
            let exact = class_keys(&full);
            let shape = |c: &ClassKeys| (c.hook, c.flags, c.port_plen, c.src_plen, c.dst_plen, c.keys);
            assert_eq!(classes.iter().map(shape).collect::<Vec<_>>(), exact.iter().map(shape).collect::<Vec<_>>());
            for (c, e) in classes.iter().zip(&exact) {
                assert!(c.min_rank <= e.min_rank, "step {step}: a class's lowest rank above the true one");
            }
            for (h, list) in p.classes.iter().enumerate() {
                let mut got: Vec<(u8, u8, u8, u8)> =
                    list.iter().map(|c| (c.flags, c.port_plen, c.src_plen, c.dst_plen)).collect();
                let mut want: Vec<(u8, u8, u8, u8)> =
                    full.classes[h].iter().map(|c| (c.flags, c.port_plen, c.src_plen, c.dst_plen)).collect();
                got.sort_unstable();
                want.sort_unstable();
                assert_eq!(got, want, "step {step}: classes of hook {h}");
            }
        }
        assert!(rules.len() > 10, "the run ends with rules installed ({})", rules.len());
        assert!(shadowed_seen > 0, "the run never hid a rule behind another");
    }

    /// The index's size is the sum of the classes' key counts: a small change that would pass the kernel's limit
    /// is refused like a full compile is.
    #[test]
    fn a_small_change_counts_every_key_of_the_index() {
        let r = Rule { id: 1, ..ok("dnat -i eth0 -p tcp --dport 80 --to 10.9.0.1") };
        let new_changed = build(&[(0, &r)], &ifindex).unwrap();
        let key = *new_changed.members.keys().next().unwrap();
        let full = ClassKeys { keys: INDEX_ENTRIES, ..ClassKeys::of(&key) };
        let err = delta(&Compiled::default(), &new_changed, &HashMap::new(), &[full]).unwrap_err();
        assert!(matches!(err, RuleError::TooManyIndexKeys { count } if count == 1_048_577), "{err}");
        let room = ClassKeys { keys: INDEX_ENTRIES - 1, ..full };
        assert!(delta(&Compiled::default(), &new_changed, &HashMap::new(), &[room]).is_ok());
    }

    #[test]
    fn members_round_trip_through_their_stored_form() {
        let m = [
            Member { rank: u64::MAX - 3, id: 9, slot: 7, flags: 5 },
            Member { rank: 1 << 40, id: u32::MAX, slot: 131_071, flags: 0 },
        ];
        assert_eq!(Member::decode(&Member::encode(&m)), m);
        assert_eq!(Member::encode(&m).len(), 34);
    }
}
