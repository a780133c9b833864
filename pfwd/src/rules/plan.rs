//! How a rule change reaches the kernel in one step for packets while writing only what changes: the plan of map
//! writes from the rules the kernel holds to the compiled new ones (pure, so it is tested without a kernel; the
//! loader carries it out).
//!
//! Generations make it atomic (see `pfwd_common::Config::generation`): before the flip, new rules are written
//! invisible to the current generation (`gen_from` = next), deleted ones are marked to disappear with the next
//! (`gen_until` = next), each changed index key lists the union of its old and new rules, and the other class bank
//! gets the new class lists. The flip moves the generation on in one write. Once every program that may have read
//! the old generation has finished, the index keys drop the deleted rules and the deleted slots are cleared. The
//! writes are those of the rules and keys that change, as many with 10 rules installed as with 100,000.
use std::collections::{HashMap, HashSet};

use pfwd_common::maps::{BackendEntry, Class, GEN_FOREVER, INDEX_SLOTS, IndexKey, RuleEntry, rule_flag};

use super::compile::{Compiled, listed};
use super::error::RuleError;
use crate::fasthash::FastSet;

/// What the kernel holds before a change: rule entries by slot (with their generations) and the index. Either
/// compiled from the rules of the last completed change ([`Held::from_compiled`]) or read back from the maps (after
/// an interrupted change, or at attach).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Held {
    pub entries: HashMap<u32, RuleEntry>,
    pub index: HashMap<IndexKey, Vec<u32>>,
    /// The slots whose Maglev table is known to be what `tables` of the compiled rules say (a held table read from
    /// the kernel is not known, so it is written again).
    pub tables: HashMap<u32, Vec<BackendEntry>>,
}

impl Held {
    /// What the kernel holds once `c` has been applied (every rule visible).
    pub fn from_compiled(c: &Compiled) -> Held {
        Held {
            entries: c.entries.iter().copied().collect(),
            index: c.index(),
            tables: c.tables.iter().cloned().collect(),
        }
    }
}

/// The map writes of one change, in the order the loader carries them out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// The generation the flip moves to.
    pub generation: u32,
    /// Before the flip: rule entries to write (new ones invisible until the flip, deleted ones visible until it).
    pub rules: Vec<(u32, RuleEntry)>,
    /// Before the flip: Maglev tables of new rules (slot, table).
    pub tables: Vec<(u32, Vec<BackendEntry>)>,
    /// Before the flip: index keys and the slots they list (old and new rules together), in rank order.
    pub index: Vec<(IndexKey, Vec<u32>)>,
    /// Before the flip, into the other class bank: every hook's classes.
    pub classes: [Vec<Class>; 3],
    /// After the flip and its grace period: index keys with their final slots (empty: remove the key).
    pub index_after: Vec<(IndexKey, Vec<u32>)>,
    /// After the grace period: slots to clear, and whether each had a Maglev table to remove.
    pub cleared: Vec<(u32, bool)>,
    /// Slots whose live entry changes in place (an interface re-created under another index): the one kind of write
    /// that is not atomic for packets (the README says so; the device was gone meanwhile).
    pub rewritten: Vec<u32>,
}

impl Plan {
    /// Whether the change writes nothing at all (same rules).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.tables.is_empty() && self.index.is_empty() && self.index_after.is_empty()
    }
}

/// Two entries that mean the same rule, whatever their generations.
fn same_rule(a: &RuleEntry, b: &RuleEntry) -> bool {
    RuleEntry { gen_from: 0, gen_until: 0, ..*a } == RuleEntry { gen_from: 0, gen_until: 0, ..*b }
}

/// Plans the change from `held` (seen by generation `generation`) to `new`: every rule and key compared. Fails when
/// a key would have to list more than [`INDEX_SLOTS`] old and new rules at once (then apply the deletions first:
/// [`Plan`]s of the rules kept, then of the new ones).
pub fn plan(held: &Held, generation: u32, new: &Compiled) -> Result<Plan, RuleError> {
    let next = generation.wrapping_add(1);
    let mut p = Plan { generation: next, classes: new.classes.clone(), ..Default::default() };
    let live = |slot: u32| held.entries.get(&slot).filter(|e| e.visible(generation));
    let new_tables: HashMap<u32, &Vec<BackendEntry>> = new.tables.iter().map(|(s, t)| (*s, t)).collect();
    for (slot, e) in &new.entries {
        let table = new_tables.get(slot);
        match live(*slot) {
            // A rule a change that did not flip marked to go (`gen_until` = next) is written again to stay.
            Some(old) if same_rule(old, e) && old.gen_until == GEN_FOREVER => {
                if let Some(t) = table.filter(|t| held.tables.get(slot) != Some(**t)) {
                    // The same rule whose table the kernel may not have (read back after an interruption).
                    p.tables.push((*slot, (*t).clone()));
                }
            }
            Some(old) => p.rewrite(*slot, RuleEntry { gen_from: old.gen_from, ..*e }, table.copied()),
            None => p.add(*slot, e, table.copied()),
        }
    }
    for (slot, e) in &held.entries {
        if new.entry(*slot).is_none() {
            p.delete(*slot, e, e.visible(generation));
        }
    }
    let rank = |s: u32| new.entry(s).or_else(|| held.entries.get(&s)).map(|e| (e.rank, e.id));
    let new_index = new.index();
    let keys: HashSet<&IndexKey> = held.index.keys().chain(new_index.keys()).collect();
    let none = Vec::new();
    for key in keys {
        let (old, now) = (held.index.get(key).unwrap_or(&none), new_index.get(key).unwrap_or(&none));
        p.key(*key, old, now, &rank)?;
    }
    p.finish();
    Ok(p)
}

/// Plans a change that the kernel holds all of `new` but the rules in `old_changed` instead of `new_changed`: the
/// rules of the slots that differ, compiled alone. Only those rules and their keys are looked at, so the plan costs
/// the same whatever the number of rules. Fails like [`plan`].
pub fn plan_change(
    new: &Compiled,
    new_changed: &Compiled,
    old_changed: &Compiled,
    generation: u32,
) -> Result<Plan, RuleError> {
    let next = generation.wrapping_add(1);
    let mut p = Plan { generation: next, classes: new.classes.clone(), ..Default::default() };
    let new_tables: HashMap<u32, &Vec<BackendEntry>> = new_changed.tables.iter().map(|(s, t)| (*s, t)).collect();
    for (slot, e) in &new_changed.entries {
        let table = new_tables.get(slot).copied();
        match old_changed.entry(*slot) {
            Some(_) => p.rewrite(*slot, *e, table),
            None => p.add(*slot, e, table),
        }
    }
    for (slot, e) in &old_changed.entries {
        if new_changed.entry(*slot).is_none() {
            p.delete(*slot, e, true);
        }
    }
    // The entry a slot had before the change.
    let old_entry = |s: u32| match old_changed.entry(s) {
        Some(e) => Some(e),
        None if new_changed.entry(s).is_some() => None,
        None => new.entry(s),
    };
    let rank = |s: u32| new.entry(s).or_else(|| old_changed.entry(s)).map(|e| (e.rank, e.id));
    let keys: FastSet<&IndexKey> = new_changed.members.keys().chain(old_changed.members.keys()).collect();
    let none = Vec::new();
    for key in keys {
        let now_members = new.members.get(key).unwrap_or(&none);
        let mut old_members: Vec<u32> = now_members
            .iter()
            .copied()
            .filter(|s| new_changed.entry(*s).is_none())
            .chain(old_changed.members.get(key).into_iter().flatten().copied())
            .collect();
        old_members.sort_unstable_by_key(|s| (old_entry(*s).map_or((u64::MAX, u32::MAX), |e| (e.rank, e.id)), *s));
        let old = listed(&old_members, old_entry).to_vec();
        let now = new.listed(now_members).to_vec();
        p.key(*key, &old, &now, &rank)?;
    }
    p.finish();
    Ok(p)
}

impl Plan {
    /// A new rule: invisible until the flip.
    fn add(&mut self, slot: u32, e: &RuleEntry, table: Option<&Vec<BackendEntry>>) {
        self.rules.push((slot, RuleEntry { gen_from: self.generation, gen_until: GEN_FOREVER, ..*e }));
        self.tables.extend(table.map(|t| (slot, t.clone())));
    }

    /// A live rule whose entry changes: written in place.
    fn rewrite(&mut self, slot: u32, e: RuleEntry, table: Option<&Vec<BackendEntry>>) {
        self.rules.push((slot, RuleEntry { gen_until: GEN_FOREVER, ..e }));
        self.tables.extend(table.map(|t| (slot, t.clone())));
        self.rewritten.push(slot);
    }

    /// A deleted rule: visible (if it was) until the flip, cleared after it.
    fn delete(&mut self, slot: u32, e: &RuleEntry, visible: bool) {
        if visible {
            self.rules.push((slot, RuleEntry { gen_until: self.generation, ..*e }));
        }
        self.cleared.push((slot, e.flags & rule_flag::BACKENDS != 0));
    }

    /// A key that lists `old` before the change and `now` after it: both until the flip, `now` after.
    fn key(
        &mut self,
        key: IndexKey,
        old: &[u32],
        now: &[u32],
        rank: &dyn Fn(u32) -> Option<(u64, u32)>,
    ) -> Result<(), RuleError> {
        if old == now {
            return Ok(());
        }
        let mut union: Vec<u32> = old.iter().chain(now).copied().collect();
        // A slot the held index lists but whose entry is unknown ranks last; it is invisible anyway. The slot is part
        // of the sort key, so a slot in both lists ends up twice in a row: dedup keeps it once (no set per key).
        union.sort_unstable_by_key(|s| (rank(*s).unwrap_or((u64::MAX, u32::MAX)), *s));
        union.dedup();
        if union.len() > INDEX_SLOTS {
            return Err(RuleError::IndexFull { ids: String::new() });
        }
        if union != old {
            self.index.push((key, union.clone()));
        }
        if union != now {
            self.index_after.push((key, now.to_vec()));
        }
        Ok(())
    }

    /// Sorts everything, so a plan reads the same every time.
    fn finish(&mut self) {
        self.cleared.sort_unstable();
        self.rules.sort_unstable_by_key(|(s, _)| *s);
        self.rewritten.sort_unstable();
        let k =
            |k: &IndexKey| (k.hook, k.ifindex, k.proto, k.dport, k.port_plen, k.saddr, k.daddr, k.src_plen, k.dst_plen);
        self.index.sort_unstable_by_key(|a| k(&a.0));
        self.index_after.sort_unstable_by_key(|a| k(&a.0));
    }
}

#[cfg(test)]
mod tests {
    use pfwd_common::{IndexEntry, PROTO_TCP, Tuple, find_rule, hook};

    use super::*;
    use crate::rules::tests::*;
    use crate::rules::*;

    fn compiled(rules: &[&str]) -> Compiled {
        let rules: Vec<Rule> = rules.iter().enumerate().map(|(i, s)| Rule { id: i as u32 + 1, ..ok(s) }).collect();
        compile(&rules, &ifindex).unwrap()
    }

    /// The kernel's maps as a plan leaves them at each step, to run the kernel's lookup over.
    #[derive(Default, Clone)]
    struct Kernel {
        rules: HashMap<u32, RuleEntry>,
        index: HashMap<IndexKey, IndexEntry>,
        classes: [[Vec<Class>; 3]; 2],
        generation: u32,
    }

    impl Kernel {
        fn write_index(&mut self, writes: &[(IndexKey, Vec<u32>)]) {
            for (k, slots) in writes {
                if slots.is_empty() {
                    self.index.remove(k);
                    continue;
                }
                self.index.insert(*k, IndexEntry::from_slots(slots));
            }
        }

        /// Carries out `p`, calling `check` before the flip, after it, and after the cleanup.
        fn apply(&mut self, p: &Plan, check: &mut dyn FnMut(&Kernel, &str)) {
            self.rules.extend(p.rules.iter().copied());
            self.write_index(&p.index);
            self.classes[(p.generation & 1) as usize] = p.classes.clone();
            check(self, "before the flip");
            self.generation = p.generation;
            check(self, "after the flip");
            self.write_index(&p.index_after);
            for (s, _) in &p.cleared {
                self.rules.remove(s);
            }
            check(self, "after the cleanup");
        }

        fn find(&self, t: &Tuple, ifindex: u32, at: u8) -> Option<u32> {
            let classes = &self.classes[(self.generation & 1) as usize][at as usize];
            find_rule(
                t,
                ifindex,
                (at, self.generation),
                classes,
                |k| self.index.get(k),
                |s| self.rules.get(&s),
                |_| false,
            )
            .map(|(s, _)| s)
        }
    }

    fn tcp(dport: u16, saddr: [u8; 4]) -> Tuple {
        Tuple {
            saddr: u32::from_ne_bytes(saddr),
            daddr: u32::from_ne_bytes([203, 0, 113, 1]),
            sport: 40000,
            dport,
            proto: PROTO_TCP,
            _pad: 0,
            _pad2: 0,
        }
    }

    /// Rule ids matched by a few packets (slot = position, id = position + 1).
    fn answers(k: &Kernel) -> Vec<Option<u32>> {
        let packets =
            [tcp(22, [10, 0, 0, 1]), tcp(80, [10, 0, 0, 1]), tcp(80, [172, 16, 0, 1]), tcp(8080, [192, 168, 0, 1])];
        packets.iter().map(|t| k.find(t, 2, hook::PREROUTING).map(|s| s + 1)).collect()
    }

    #[test]
    fn a_change_is_atomic_and_writes_only_what_changes() {
        let before = ["dnat -p tcp --dport 1-21 --to 10.1.0.1", "dnat -p tcp --dport 23-65535 --to 10.1.0.2"];
        let old = compiled(&before);
        let mut k = Kernel::default();
        k.apply(&plan(&Held::default(), 0, &old).unwrap(), &mut |_, _| {});
        assert_eq!(answers(&k), [None, Some(2), Some(2), Some(2)]);
        assert_eq!(k.index.len(), 6 + 13, "prefix blocks of 1-21 and 23-65535");

        // Add a more specific rule: only its own key, its entry and no class change but its own.
        let mut after = before.to_vec();
        after.push("dnat -p tcp -s 10.0.0.0/8 --dport 80 --to 10.1.0.3");
        let new = compiled(&after);
        let p = plan(&Held::from_compiled(&old), k.generation, &new).unwrap();
        assert_eq!(p.rules.iter().map(|(s, e)| (*s, e.gen_from)).collect::<Vec<_>>(), [(2, 2)]);
        assert_eq!(p.index.len(), 1);
        assert!(p.index_after.is_empty() && p.cleared.is_empty() && p.rewritten.is_empty());
        let old_answers = answers(&k);
        let new_answers = vec![None, Some(3), Some(2), Some(2)];
        k.apply(&p, &mut |k, step| {
            let want = if step == "before the flip" { &old_answers } else { &new_answers };
            assert_eq!(&answers(k), want, "{step}");
        });

        // Delete the two ranges: before the flip the old set, after it only rule 3, and then the keys are gone.
        let only = compiled(&after).restricted(|s, _| s == 2);
        let p = plan(&Held::from_compiled(&new), k.generation, &only).unwrap();
        assert_eq!(p.rules.iter().map(|(s, e)| (*s, e.gen_until)).collect::<Vec<_>>(), [(0, 3), (1, 3)]);
        assert!(p.index.is_empty(), "the keys already list the deleted rules");
        assert_eq!(p.index_after.len(), 19);
        assert_eq!(p.cleared, [(0, false), (1, false)]);
        let old_answers = answers(&k);
        k.apply(&p, &mut |k, step| {
            let want = if step == "before the flip" { old_answers.clone() } else { vec![None, Some(3), None, None] };
            assert_eq!(answers(k), want, "{step}");
        });
        assert_eq!(k.index.len(), 1);
        assert_eq!(k.rules.len(), 1);

        // The same rules again: nothing to write.
        assert!(plan(&Held::from_compiled(&only), k.generation, &only).unwrap().is_empty());
    }

    #[test]
    fn held_state_read_back_after_an_interruption() {
        let old = compiled(&["dnat -p tcp --dport 80 --to 10.1.0.1", "dnat -p tcp --dport 81 --to 10.1.0.2"]);
        let new = compiled(&["dnat -p tcp --dport 80 --to 10.1.0.1", "dnat -p tcp --dport 82 --to 10.1.0.3"]);
        // A change to `new` was interrupted before its flip: slot 1 was written (invisible to generation 4) and
        // the key of port 82 lists it.
        let mut held = Held::from_compiled(&old);
        held.entries.insert(1, RuleEntry { gen_from: 5, ..new.entries[1].1 });
        let k82 = *new.members.keys().find(|k| k.dport == 82).unwrap();
        held.index.insert(k82, vec![1]);
        // Slot 1 now holds an invisible rule: the plan writes it as new and the key of port 81 is dropped.
        let p = plan(&held, 4, &new).unwrap();
        assert_eq!(p.rules.iter().map(|(s, e)| (*s, e.gen_from, e.id)).collect::<Vec<_>>(), [(1, 5, 2)]);
        assert!(p.rewritten.is_empty());
        let k81 = *old.members.keys().find(|k| k.dport == 81).unwrap();
        assert_eq!(p.index_after, [(k81, vec![])]);
        assert!(p.index.iter().all(|(k, _)| *k != k82), "already lists slot 1");
    }

    /// A change that deleted a rule was made up to its flip, then abandoned (its state was never saved): going
    /// back to the rules before it keeps that rule past the next flip.
    #[test]
    fn a_rule_marked_to_go_by_an_abandoned_change_stays() {
        let old = compiled(&["dnat -p tcp --dport 80 --to 10.1.0.1", "dnat -p tcp --dport 81 --to 10.1.0.2"]);
        let mut k = Kernel::default();
        k.apply(&plan(&Held::default(), 0, &old).unwrap(), &mut |_, _| {});
        let port81 = || k.find(&tcp(81, [10, 0, 0, 1]), 2, hook::PREROUTING);
        assert_eq!(port81(), Some(1));
        // The abandoned change deleted slot 1: visible to this generation, gone from the next.
        let marked = RuleEntry { gen_until: k.generation + 1, ..k.rules[&1] };
        let mut held = Held::from_compiled(&old);
        held.entries.insert(1, marked);
        k.rules.insert(1, marked);
        let p = plan(&held, k.generation, &old).unwrap();
        assert_eq!(p.rules, [(1, RuleEntry { gen_until: GEN_FOREVER, ..marked })]);
        assert!(p.cleared.is_empty());
        k.apply(&p, &mut |k, step| {
            assert_eq!(k.find(&tcp(81, [10, 0, 0, 1]), 2, hook::PREROUTING), Some(1), "{step}");
        });
    }

    #[test]
    fn a_live_rule_that_changes_is_rewritten_in_place() {
        let old = compiled(&["masquerade -o eth0"]);
        let moved = compile(&[Rule { id: 1, ..ok("masquerade -o eth0") }], &|_| Some(9)).unwrap();
        let p = plan(&Held::from_compiled(&old), 1, &moved).unwrap();
        assert_eq!(p.rewritten, [0]);
        assert_eq!(p.rules[0].1.ifindex, 9);
        assert_eq!(p.index.len() + p.index_after.len(), 2, "the old key gives way to the new one");
    }
}
