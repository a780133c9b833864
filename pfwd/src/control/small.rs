//! A small rule change in eBPF mode (`pfwd add`, `pfwd del`, a short import) in time independent of the rules
//! installed: it reads the rules it removes and the duplicate keys of those it adds from the store, what the index
//! keys it touches hold from the kernel, and the rest from [`Derived`]; it compiles only the changed rules
//! ([`rules::delta`]) and writes only them. Anything it cannot do that way (iptables mode, an interrupted change, a
//! `--hairpin` rule, a key that would list too many rules during the change, a change larger than a fraction of
//! the rules) goes the full way, which gives the same result.
use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result, bail};

use super::{
    Backend, Change, NO_CGROUP, apply, apply_wanted_sysctls, finish_change, no_such_rules, record_wanted,
    refresh_addresses, restore_added_sysctls, rule_error,
};
use crate::{
    rules::{self, Rule},
    state::{DataPath, Derived, Lock, Meta, Pending, State, StoredRule},
    store::{Store, Write},
    sysctl,
};

/// Up to this many rules changed, a change always goes this way; beyond, only while it changes at most an eighth of
/// the rules installed (a full compile is then the cheaper way).
const SMALL: usize = 64;

/// Whether a change of `changes` rules may go this way.
pub(super) fn is_small(meta: &Meta, store: &Store, changes: usize) -> Result<bool> {
    if meta.mode != DataPath::Ebpf || meta.pending.is_some() || meta.derived.is_none() {
        return Ok(false);
    }
    Ok(changes <= SMALL || changes as u64 <= store.id_span()?.0 / 8)
}

/// Removes the rules with ids `remove` and adds `add` (see [`super::change_rules`]). Ok(None): this change must go
/// the full way (nothing was changed).
pub(super) fn change(
    lock: &Lock,
    meta: &Meta,
    store: &Store,
    remove: &[u32],
    add: &[Rule],
    skip_duplicates: bool,
) -> Result<Option<Change>> {
    let Backend::Ebpf(kernel) = Backend::of(meta, &lock.inst) else { return Ok(None) };
    let Some(derived) = meta.derived.clone() else { return Ok(None) };
    if super::sorted_local_addrs() != derived.locals {
        // Which DNAT rules need forwarding depends on the host's addresses: count again, the full way.
        return Ok(None);
    }
    let mut removed: Vec<StoredRule> = Vec::with_capacity(remove.len());
    let mut missing = vec![];
    for id in remove {
        match store.rule(*id)? {
            Some(r) => removed.push(r),
            None => missing.push(id.to_string()),
        }
    }
    if !missing.is_empty() {
        return Err(no_such_rules(&missing, store, "changed"));
    }
    let removed_ids: HashSet<u32> = removed.iter().map(|r| r.rule.id).collect();
    // A slot freed by this change is not given to a new rule (its counters are reset once the change is done).
    let mut taken: HashSet<u32> = removed.iter().map(|r| r.slot).collect();
    let reader = kernel.index_reader()?;
    let mut planned = meta.clone();
    let mut notes = vec![];
    let mut keys: HashMap<rules::DedupKey, u32> = HashMap::new();
    let mut added: Vec<StoredRule> = Vec::with_capacity(add.len());
    for rule in add {
        let key = rule.dedup_key();
        let of = match keys.get(&key) {
            Some(id) => Some(*id),
            None => store.duplicate_of(rule)?.filter(|id| !removed_ids.contains(id)),
        };
        if let Some(of) = of {
            let e = rules::RuleError::Duplicate { of };
            if skip_duplicates {
                notes.push(format!("skipped `{rule}`: {e}"));
                continue;
            }
            return Err(e.into());
        }
        let max = pfwd_common::MAX_RULES;
        let slot =
            reader.free_slot(planned.next_slot, &taken)?.with_context(|| format!("all {max} rule slots are in use"))?;
        taken.insert(slot);
        planned.next_slot = (slot + 1) % max;
        let rule = Rule { id: planned.next_id, ..rule.clone() };
        planned.next_id += 1;
        keys.insert(key, rule.id);
        added.push(StoredRule { rule, slot });
    }
    if meta.cgroup.is_none() && added.iter().any(|r| r.rule.local) {
        bail!(NO_CGROUP);
    }
    // The cap on rules with several backends counts every rule, not only the changed ones.
    let with_backends = |rules: &[StoredRule]| rules.iter().filter(|r| !r.rule.backends.is_empty()).count() as u32;
    let backend_rules = (derived.backend_rules + with_backends(&added)).saturating_sub(with_backends(&removed));
    if backend_rules > pfwd_common::maps::MAX_BACKEND_RULES {
        return Err(rules::RuleError::TooManyBackendRules.into());
    }
    let hidden = derived.hidden();
    let small = kernel
        .plan_small(&reader, &removed, &added, &derived.classes, &hidden, &super::ifindex_lookup(meta))
        .map_err(|e| match e.downcast::<rules::RuleError>() {
        Ok(e) => rule_error(e, meta),
        Err(e) => e,
    })?;
    let Some(small) = small else { return Ok(None) };
    log::debug!(
        "small change: {} rules removed, {} added; {} index keys touched, {} map writes",
        removed.len(),
        added.len(),
        small.keys,
        small.plan.rules.len() + small.plan.index.len() + small.plan.index_after.len()
    );

    // The sysctls: how many rules want each, and what they all want now.
    let names: Vec<String> = planned.interfaces.iter().map(|i| i.name.clone()).collect();
    let mut users: HashMap<String, u32> = derived.sysctls.iter().cloned().collect();
    for (key, n) in sysctl::users(added.iter().map(|r| &r.rule), &names) {
        *users.entry(key).or_default() += n;
    }
    for (key, n) in sysctl::users(removed.iter().map(|r| &r.rule), &names) {
        let count = users.entry(key).or_default();
        *count = count.saturating_sub(n);
    }
    let fresh = sysctl::wanted(added.iter().map(|r| &r.rule), &names);
    let mut wanted: Vec<(String, String, String)> = users
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(key, _)| {
            // The reason recorded when pfwd set it, else the first new rule's.
            let reason = planned
                .sysctls
                .iter()
                .find(|s| s.key == *key)
                .map(|s| s.reason.clone())
                .or_else(|| fresh.iter().find(|(k, ..)| k == key).map(|(.., r)| r.clone()))
                .unwrap_or_else(|| "needed by the rules".into());
            (key.clone(), "1".to_string(), reason)
        })
        .collect();
    wanted.sort();
    let mut hidden = hidden;
    hidden.extend(small.hidden.iter().cloned());
    let mut next = Derived {
        classes: small.classes.clone(),
        sysctls: users.into_iter().filter(|(_, n)| *n > 0).collect(),
        backend_rules,
        locals: derived.locals.clone(),
        hidden: vec![],
    };
    next.sysctls.sort();
    next.set_hidden(hidden);

    // Intent first (see crate::state), then the kernel.
    planned.pending = Some(Pending::Change);
    notes.extend(record_wanted(&mut planned, &wanted)?);
    planned.derived = Some(next);
    lock.save_change(&planned, &Write { removed: &removed, added: &added, replace: false })?;
    let backend = Backend::Ebpf(kernel);
    let applied = (|| {
        let Backend::Ebpf(kernel) = &backend else { unreachable!() };
        refresh_addresses(kernel, &planned)?;
        kernel.apply_small(small)?;
        apply_wanted_sysctls(&backend, &mut planned, &wanted)
    })();
    match applied {
        Ok(more) => notes.extend(more),
        Err(e) => {
            // Back to the rules before, the full way, as far as it goes (the pending marker stays until it is done;
            // the error reported is the change's).
            restore_added_sysctls(&planned, meta);
            let mut state = State { meta: meta.clone(), rules: vec![] };
            state.pending = Some(Pending::Change);
            let undone = lock.save_change(&state, &Write { removed: &added, added: &removed, replace: false });
            if let (Ok(()), Ok(rules)) = (undone, store.rules()) {
                state.rules = rules;
                state.pending = None;
                let _ = apply(&backend, &mut state).map(|_| lock.save_meta(&state));
            }
            return Err(e);
        }
    }
    finish_change(lock, &backend, &mut planned, &removed)?;
    let ids = added.iter().map(|r| r.rule.id).collect();
    // The order asked for.
    let order: HashMap<u32, usize> = remove.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    removed.sort_by_key(|r| order[&r.rule.id]);
    let rules = removed.iter().map(|r| r.rule.clone()).collect();
    Ok(Some(Change { removed: rules, added: ids, notes, before: State { meta: meta.clone(), rules: removed } }))
}
