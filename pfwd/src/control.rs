//! The operations behind the commands. Each one takes the instance lock, validates everything it was given before
//! changing anything, and either completes or leaves the instance as it found it.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, bail};
use pfwd_common::{Config, RuleCounters, dir};
use serde_json::{Value, json};

use crate::{
    instance::{self, Instance},
    loader::Kernel,
    netif,
    rules::{self, Rule, Target},
    state::{AttachedIface, Lock, State, StoredRule},
    sysctl,
};

/// How the data path is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// TC (tcx) programs with BPF-map connection tracking.
    Ebpf,
}

#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub mode: Mode,
    /// Conntrack capacity in entries (two per flow). Only used when the instance is created.
    pub ct_entries: u32,
    pub config: Config,
}

impl Default for AttachOptions {
    fn default() -> Self {
        Self { mode: Mode::Ebpf, ct_entries: pfwd_common::DEFAULT_CT_ENTRIES, config: Config::default() }
    }
}

const NOT_ATTACHED: &str = "pfwd is not attached in this network namespace: run `pfwd attach IFACE...` first";

fn open() -> Result<Lock> {
    instance::require_root()?;
    instance::ensure_bpffs()?;
    Lock::acquire(&Instance::current()?)
}

fn ifindex_lookup(state: &State) -> impl Fn(&str) -> Option<u32> + '_ {
    |name| state.interfaces.iter().find(|i| i.name == name).map(|i| i.ifindex)
}

fn addr_u32(a: Option<Ipv4Addr>) -> u32 {
    a.map_or(0, |a| u32::from_ne_bytes(a.octets()))
}

/// Gives `rule` the next id and a free slot, and appends it.
fn push_rule(state: &mut State, mut rule: Rule) -> Result<u32> {
    let used: std::collections::HashSet<u32> = state.rules.iter().map(|r| r.slot).collect();
    let max = pfwd_common::MAX_RULES;
    let slot = (0..max)
        .map(|i| (state.next_slot + i) % max)
        .find(|s| !used.contains(s))
        .with_context(|| format!("all {max} rule slots are in use"))?;
    state.next_slot = (slot + 1) % max;
    rule.id = state.next_id;
    state.next_id += 1;
    let id = rule.id;
    state.rules.push(StoredRule { rule, slot });
    Ok(id)
}

/// Applies the state's rules and sysctls to the kernel. Returns notes about sysctl changes.
fn apply(kernel: &Kernel, state: &mut State) -> Result<Vec<String>> {
    kernel.sync_rules(&state.rules, &ifindex_lookup(state))?;
    let names: Vec<String> = state.interfaces.iter().map(|i| i.name.clone()).collect();
    let wanted = sysctl::wanted(&state.rules(), &names);
    sysctl::reconcile(&mut state.sysctls, &wanted)
}

/// `pfwd attach`: loads the programs (once per namespace), attaches them to `ifaces`, adds `rules`.
/// Idempotent: attaching an interface twice or adding a rule that already exists changes nothing.
pub fn attach(ifaces: &[String], rules: Vec<Rule>, opts: &AttachOptions) -> Result<Vec<String>> {
    if ifaces.is_empty() {
        bail!("name at least one interface to attach to");
    }
    // Validate before touching anything.
    let mut resolved = vec![];
    for name in ifaces {
        rules::validate_iface(name)?;
        resolved.push((name.clone(), netif::ifindex(name)?));
    }
    let lock = open()?;
    let kernel = Kernel::new(&lock.inst);
    let existing = lock.load()?;
    let fresh = existing.is_none();
    let mut state = match existing {
        Some(s) => s,
        None => {
            // Pins without state: left by a crash or by a dead namespace with the same inode number.
            kernel.unload().context("removing stale pfwd pins")?;
            State::new(lock.inst.netns_cookie, "ebpf", "eBPF selected (--mode ebpf)")
        }
    };
    let mut planned = state.clone();
    for (name, ifindex) in &resolved {
        match planned.interfaces.iter_mut().find(|i| i.name == *name) {
            Some(i) => i.ifindex = *ifindex,
            None => planned.interfaces.push(AttachedIface { name: name.clone(), ifindex: *ifindex }),
        }
    }
    let mut added = vec![];
    for r in rules {
        r.validate()?;
        if planned.rules.iter().any(|s| s.rule.same_match_and_target(&r)) {
            continue;
        }
        added.push(push_rule(&mut planned, r)?);
    }
    // Compile now, so a rule naming an interface that is not attached fails before anything changes.
    rules::compile(&planned.rules(), &ifindex_lookup(&planned))?;

    let result = (|| -> Result<Vec<String>> {
        if fresh {
            kernel.load(opts.ct_entries, &opts.config)?;
        }
        for i in &planned.interfaces {
            kernel.attach(&i.name, i.ifindex, addr_u32(netif::primary_ipv4(&i.name)))?;
        }
        let mut notes: Vec<String> =
            resolved.iter().map(|(name, _)| format!("attached to {name} (tcx ingress + egress)")).collect();
        notes.extend(apply(&kernel, &mut planned)?);
        lock.save(&planned)?;
        for id in &added {
            notes.push(format!("added rule {id}: {}", planned.rules.iter().find(|r| r.rule.id == *id).unwrap().rule));
        }
        Ok(notes)
    })();
    match result {
        Ok(notes) => Ok(notes),
        Err(e) => {
            // Roll back to the previous state: a fresh instance is removed entirely.
            if fresh {
                sysctl::restore_all(&planned.sysctls);
                let _ = kernel.unload();
                let _ = lock.remove();
            } else {
                for i in planned.interfaces.iter().filter(|p| !state.interfaces.contains(p)) {
                    let _ = kernel.detach(&i.name, i.ifindex);
                }
                let _ = apply(&kernel, &mut state).map(|_| lock.save(&state));
            }
            Err(e)
        }
    }
}

/// `pfwd add`: adds one rule; returns its id and notes.
pub fn add(rule: Rule) -> Result<(u32, Vec<String>)> {
    rule.validate()?;
    let lock = open()?;
    let mut state = lock.load()?.context(NOT_ATTACHED)?;
    rules::check_duplicate(&state.rules(), &rule)?;
    let mut planned = state.clone();
    let id = push_rule(&mut planned, rule)?;
    rules::compile(&planned.rules(), &ifindex_lookup(&planned)).map_err(|e| match e {
        rules::RuleError::IfaceNotAttached { iface, .. } => anyhow::anyhow!(
            "-i {iface}: pfwd is not attached to {iface} (attached: {}); run `pfwd attach {iface}` first",
            state.interfaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
        e => e.into(),
    })?;
    let kernel = Kernel::new(&lock.inst);
    let slot = planned.rules.last().unwrap().slot;
    kernel.reset_counters(slot)?;
    match apply(&kernel, &mut planned) {
        Ok(notes) => {
            lock.save(&planned)?;
            Ok((id, notes))
        }
        Err(e) => {
            let _ = apply(&kernel, &mut state);
            Err(e)
        }
    }
}

/// `pfwd del`: removes a rule. Flows it already translated keep their translation until they end, as with
/// iptables, whose NAT decisions live in conntrack.
pub fn del(id: u32) -> Result<(Rule, Vec<String>)> {
    let lock = open()?;
    let mut state = lock.load()?.context(NOT_ATTACHED)?;
    let Some(pos) = state.rules.iter().position(|r| r.rule.id == id) else {
        let ids: Vec<String> = state.rules.iter().map(|r| r.rule.id.to_string()).collect();
        bail!(
            "no rule with id {id} (rule ids: {}; see `pfwd list`)",
            if ids.is_empty() { "none".into() } else { ids.join(", ") }
        );
    };
    let removed = state.rules.remove(pos);
    let kernel = Kernel::new(&lock.inst);
    let notes = apply(&kernel, &mut state)?;
    lock.save(&state)?;
    Ok((removed.rule, notes))
}

/// `pfwd detach`: removes every program, pin and setting of the instance and restores the sysctls.
pub fn detach() -> Result<Vec<String>> {
    let lock = open()?;
    let kernel = Kernel::new(&lock.inst);
    let state = lock.load()?;
    if state.is_none() && !kernel.pin_dir().exists() {
        let _ = lock.remove();
        return Ok(vec!["pfwd is not attached in this network namespace; nothing to do".into()]);
    }
    kernel.unload()?;
    let mut notes = vec![];
    if let Some(state) = &state {
        notes.push(format!(
            "detached from {}",
            state.interfaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
        ));
        notes.extend(sysctl::restore_all(&state.sysctls));
    }
    lock.remove()?;
    Ok(notes)
}

/// Sets or clears `Config::flags` bits (log events for `pfwd run`).
pub fn set_flags(flags: u32) -> Result<()> {
    let lock = open()?;
    let kernel = Kernel::new(&lock.inst);
    lock.load()?.context(NOT_ATTACHED)?;
    let mut cfg = kernel.config()?;
    cfg.flags = flags;
    kernel.set_config(&cfg)
}

/// The current rules, or an empty list when not attached.
pub fn list() -> Result<Vec<Rule>> {
    let lock = open()?;
    Ok(lock.load()?.map(|s| s.rules()).unwrap_or_default())
}

/// One rule as JSON: its fields flattened, its pfwd syntax and, when given, its counters.
pub fn rule_json(r: &Rule, counters: Option<&RuleCounters>) -> Value {
    let (to, to_port) = match r.target {
        Target::Dnat { addr, port } => (Some(addr.to_string()), port),
        Target::Redirect { port } => (None, Some(port)),
    };
    let mut v = json!({
        "id": r.id,
        "kind": r.kind_name(),
        "iface": r.iface,
        "proto": r.proto.map(|p| p.to_string()),
        "src": r.src.map(|n| n.to_string()),
        "dst": r.dst.map(|n| n.to_string()),
        "dport": r.dport.map(|p| p.to_string()),
        "to": to,
        "to_port": to_port,
        "text": r.to_string(),
    });
    if let Some(c) = counters {
        v["packets"] = c.packets.into();
        v["bytes"] = c.bytes.into();
        v["flows"] = c.flows.into();
    }
    v
}

/// Everything `pfwd status` shows, as one JSON object (the human output is rendered from it).
pub fn status() -> Result<Value> {
    let lock = open()?;
    let Some(state) = lock.load()? else {
        return Ok(json!({
            "attached": false, "mode": null, "interfaces": [], "rules": [],
            "conntrack": { "entries": 0, "flows": 0 },
        }));
    };
    let kernel = Kernel::new(&lock.inst);
    let cfg = kernel.config()?;
    let rules: Vec<Value> = state
        .rules
        .iter()
        .map(|s| Ok(rule_json(&s.rule, Some(&kernel.rule_counters(s.slot)?))))
        .collect::<Result<_>>()?;
    let now = monotonic_ns();
    let ct = kernel.conntrack()?;
    let live: Vec<_> = ct.iter().filter(|(_, e)| !e.expired(now, &cfg)).collect();
    let flows = live.iter().filter(|(_, e)| e.dir == dir::ORIGINAL).count();
    let capacity = kernel.conntrack_capacity()?;
    let stats: serde_json::Map<String, Value> =
        kernel.stats()?.into_iter().map(|(k, v)| (k.to_string(), v.into())).collect();
    Ok(json!({
        "attached": true,
        "mode": state.mode,
        "mode_reason": state.mode_reason,
        "netns": { "inode": lock.inst.netns_inode, "cookie": state.netns_cookie },
        "pin_dir": lock.inst.pin_dir,
        "interfaces": state.interfaces.iter().map(|i| json!({
            "name": i.name, "ifindex": i.ifindex,
            "address": netif::primary_ipv4(&i.name).map(|a| a.to_string()),
        })).collect::<Vec<_>>(),
        "rules": rules,
        "conntrack": {
            "entries": live.len(),
            "flows": flows,
            "capacity": capacity,
            "timeouts_s": {
                "tcp_syn": cfg.tcp_syn_timeout, "tcp_established": cfg.tcp_established_timeout,
                "tcp_close": cfg.tcp_close_timeout, "udp": cfg.udp_timeout, "other": cfg.other_timeout,
            },
        },
        "stats": stats,
        "sysctls": state.sysctls,
    }))
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, for conntrack ages.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32).as_nanos() as u64
}
