//! The operations behind the commands. Each one takes the instance lock, validates everything it was given before
//! changing anything, and either completes or leaves the instance as it found it.
//!
//! Each change records its intent in the state (a [`Pending`] marker, the planned rules and interfaces, the tables it
//! creates, the earlier values of the sysctls it sets) before it touches the kernel or iptables, and clears the marker
//! when done, so a change killed half-way is seen by the next command: `status` reports it, `detach` removes
//! everything, `attach` repairs it (see [`crate::state`]).
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use anyhow::{Context, Result, bail};
use pfwd_common::{Config, dir};

mod small;

use crate::rules::model::Family;
use crate::{
    fallback,
    fasthash::{self, FastMap, FastSet},
    flows::{self, FlowFilter},
    instance::{self, Instance},
    loader::{Kernel, PlannedSync, XdpRun},
    netif, nftables,
    record::Record,
    report::{
        self, ConntrackEntry, ConntrackSummary, EbpfConntrack, FlowTuple, InstanceStatus, InterfaceStatus, Nat,
        NetfilterConntrack, Netns, RuleReport, RuleStatus, Status,
    },
    rules::{self, Rule},
    state::{AttachedIface, DataPath, Derived, Lock, Meta, Pending, SavedSysctl, State, StoredRule},
    store::Write,
    sysctl,
};

/// `--mode`: which data path to use, or `auto` to let pfwd choose one ([`DataPath`]) when the instance is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// eBPF unless the kernel has no BTF or loading/attaching fails; then nftables, or iptables where nft is not
    /// usable (and say why).
    Auto,
    /// TC (tcx) programs with BPF-map connection tracking.
    Ebpf,
    /// iptables NAT rules in pfwd's own chains (the fallback).
    Iptables,
    /// nftables NAT rules in pfwd's own table, looked up in constant time (the fallback `auto` prefers).
    Nft,
}

impl Mode {
    /// The data path this option asks for; None for `auto`.
    pub fn data_path(self) -> Option<DataPath> {
        match self {
            Mode::Auto => None,
            Mode::Ebpf => Some(DataPath::Ebpf),
            Mode::Iptables => Some(DataPath::Iptables),
            Mode::Nft => Some(DataPath::Nft),
        }
    }
}

/// Where `auto` looks for kernel BTF; tests point it elsewhere to simulate a kernel without BTF.
pub const ENV_BTF_PATH: &str = "PFWD_BTF_PATH";
const DEFAULT_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// The data path of an instance, chosen at attach and recorded in the state.
enum Backend {
    Ebpf(Kernel),
    Iptables,
    Nft,
}

impl Backend {
    fn of(state: &Meta, inst: &Instance) -> Self {
        match state.mode {
            DataPath::Iptables => Backend::Iptables,
            DataPath::Nft => Backend::Nft,
            DataPath::Ebpf => Backend::Ebpf(Kernel::new(inst)),
        }
    }

    /// What must be known before anything is changed: that the data path is usable, and (iptables, new instance)
    /// which tables do not exist yet and so are pfwd's to remove on detach.
    fn prepare(&self, fresh: bool, state: &mut State) -> Result<()> {
        if let Backend::Nft = self {
            nftables::available()?;
        }
        if let Backend::Iptables = self {
            fallback::available()?;
            if fresh {
                let existing = fallback::existing_tables()?;
                state.created_tables = fallback::all_tables().into_iter().filter(|t| !existing.contains(t)).collect();
            }
        }
        Ok(())
    }

    /// Creates the data path (pfwd's chains; in eBPF mode a fresh instance's programs and maps are loaded already,
    /// see [`attach_reading`]), attaches the interfaces and applies the rules. `compiled`: the state's rules
    /// compiled, when they were (eBPF mode).
    fn bring_up(
        &self,
        fresh: bool,
        state: &mut State,
        opts: &AttachOptions,
        compiled: Option<rules::Compiled>,
    ) -> Result<Vec<String>> {
        match self {
            Backend::Ebpf(kernel) => {
                if fresh {
                    kernel.write_record(&Record::new(&state.sysctls, &state.created_tables))?;
                    // The --local socket hooks need cgroup2; without it pfwd still works, minus --local rules.
                    if let Some(root) = instance::cgroup2_root() {
                        kernel.attach_cgroup(&root)?;
                        state.cgroup = Some(root.to_string_lossy().into_owned());
                    }
                } else if !opts.timeouts.is_empty() || opts.fast_forward {
                    let mut cfg = kernel.config()?;
                    for (name, secs) in &opts.timeouts {
                        set_timeout(&mut cfg, name, *secs);
                    }
                    if opts.fast_forward {
                        cfg.flags |= pfwd_common::config_flag::FAST_FORWARD;
                    }
                    kernel.set_config(&cfg)?;
                }
                for i in &mut state.interfaces {
                    kernel.attach(&i.name, i.ifindex)?;
                    if i.xdp.is_some() {
                        i.xdp = Some(kernel.attach_xdp(&i.name, i.ifindex)?);
                    }
                }
            }
            Backend::Iptables => {
                if fresh {
                    // Empty chains first, so the hooks never jump to a missing chain; `apply` below fills them
                    // once. An existing instance has its chains (and their counters, which must survive).
                    fallback::sync_rules(&[])?;
                    fallback::write_record(&Record::new(&state.sysctls, &state.created_tables))?;
                }
                for i in &state.interfaces {
                    fallback::attach(&i.name)?;
                }
            }
            // The table, its interface set and its record are all written by the sync of `apply`.
            Backend::Nft => {}
        }
        apply_compiled(self, state, compiled)
    }

    /// Applies a rule change from `previous` (what the data path holds) to `state`: only what changes (the
    /// iptables lines; the kernel's rules and index keys), when `previous` was fully applied (no interrupted
    /// change); else a full sync.
    /// `compiled` is the state's rules compiled ([`compile_state`]); `planned`, its kernel writes
    /// ([`Backend::plan_change`]).
    fn change_rules(
        &self,
        previous: &State,
        state: &State,
        compiled: &rules::Compiled,
        planned: Result<Option<PlannedSync>>,
    ) -> Result<()> {
        match self {
            _ if previous.pending.is_some() => self.sync_rules(state, None).map(|_| ()),
            Backend::Iptables => fallback::change_rules(&previous.rules(), &state.rules()),
            Backend::Nft => {
                let ifaces: Vec<String> = state.interfaces.iter().map(|i| i.name.clone()).collect();
                let rec = Record::new(&state.sysctls, &state.created_tables);
                nftables::change(&previous.rules(), &state.rules(), &ifaces, &rec)
            }
            Backend::Ebpf(kernel) => {
                refresh_addresses(kernel, state)?;
                kernel.sync_planned(planned?, compiled)
            }
        }
    }

    /// The kernel writes of [`Backend::change_rules`] in eBPF mode ([`Kernel::plan_sync`]), planned without writing
    /// anything, so it can run while the store is written. Ok(None) in the other modes and after an interrupted
    /// change (a full sync), and for a change that must go the full way.
    fn plan_change(&self, previous: &State, state: &State, compiled: &rules::Compiled) -> Result<Option<PlannedSync>> {
        match self {
            Backend::Ebpf(kernel) if previous.pending.is_none() => {
                kernel.plan_sync(&previous.rules, &state.rules, compiled, &ifindex_lookup(state))
            }
            _ => Ok(None),
        }
    }

    /// Makes the writes of a planned change that packets do not see yet ([`Kernel::stage`]), so they run while
    /// the store is written; the rest waits for [`Backend::change_rules`].
    fn stage_change(&self, planned: Option<PlannedSync>) -> Result<Option<PlannedSync>> {
        match (self, planned) {
            (Backend::Ebpf(kernel), Some(p)) => kernel.stage(p).map(Some),
            (_, planned) => Ok(planned),
        }
    }

    /// Makes the data path hold exactly the state's rules, whatever it held. Returns them compiled (eBPF).
    /// `compiled`: the state's rules compiled already, if they were.
    fn sync_rules(&self, state: &State, compiled: Option<rules::Compiled>) -> Result<Option<rules::Compiled>> {
        match self {
            Backend::Ebpf(kernel) => {
                refresh_addresses(kernel, state)?;
                let compiled = match compiled {
                    Some(c) => c,
                    None => compile_state(state)?,
                };
                kernel.sync_compiled(None, &state.rules, &compiled, &ifindex_lookup(state))?;
                Ok(Some(compiled))
            }
            Backend::Iptables => fallback::sync_rules(&state.rules()).map(|_| None),
            Backend::Nft => {
                let ifaces: Vec<String> = state.interfaces.iter().map(|i| i.name.clone()).collect();
                let rec = Record::new(&state.sysctls, &state.created_tables);
                nftables::sync(&state.rules(), &ifaces, &rec).map(|_| None)
            }
        }
    }

    /// Keeps `rec` with the data path (see [`crate::record`]).
    fn write_record(&self, rec: &Record) -> Result<()> {
        match self {
            Backend::Ebpf(kernel) => kernel.write_record(rec),
            Backend::Iptables => fallback::write_record(rec),
            Backend::Nft => nftables::write_record(rec),
        }
    }

    /// Best-effort removal of one interface (rollback).
    fn detach_iface(&self, name: &str, ifindex: u32) {
        match self {
            Backend::Ebpf(kernel) => drop(kernel.detach(name, ifindex)),
            Backend::Iptables => drop(fallback::detach(name)),
            Backend::Nft => drop(nftables::detach(name)),
        }
    }

    /// Best-effort removal of the XDP fast path from one interface (rollback).
    fn detach_xdp(&self, name: &str, ifindex: u32) {
        if let Backend::Ebpf(kernel) = self {
            drop(kernel.detach_xdp(name, ifindex));
        }
    }

    /// Removes everything the data path added.
    fn unload(&self, state: Option<&State>) -> Result<()> {
        match self {
            Backend::Ebpf(kernel) => kernel.unload(),
            Backend::Iptables => fallback::unload(state.map(|s| s.created_tables.as_slice()).unwrap_or_default()),
            Backend::Nft => nftables::unload(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub mode: Mode,
    /// Conntrack capacity in entries (two per flow). Only used when the instance is created.
    pub ct_entries: u32,
    /// The kernel settings of a new instance (timeouts already applied).
    pub config: Config,
    /// Timeouts given on the command line (also applied to an existing instance).
    pub timeouts: Vec<(String, u32)>,
    /// `--fast-forward` (also switched on in an existing instance).
    pub fast_forward: bool,
    /// `--xdp`: the XDP fast path on the interfaces named (eBPF mode).
    pub xdp: bool,
}

impl Default for AttachOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Auto,
            ct_entries: pfwd_common::DEFAULT_CT_ENTRIES,
            config: Config::default(),
            timeouts: vec![],
            fast_forward: false,
            xdp: false,
        }
    }
}

const TIMEOUT_NAMES: [&str; 5] = ["tcp_syn", "tcp_established", "tcp_close", "udp", "other"];

/// Parses `NAME=SECS` for `--ct-timeout`.
pub fn parse_timeout(s: &str) -> Result<(String, u32), String> {
    let (name, secs) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=SECS, e.g. udp=30"))?;
    if !TIMEOUT_NAMES.contains(&name) {
        return Err(format!("unknown timeout {name:?}: one of {}", TIMEOUT_NAMES.join(", ")));
    }
    let secs: u32 = secs.parse().map_err(|_| format!("{s:?}: {secs:?} is not a number of seconds"))?;
    if secs == 0 {
        return Err(format!("{s:?}: a timeout must be at least 1 second"));
    }
    Ok((name.to_string(), secs))
}

/// Sets one named timeout (names checked by `parse_timeout`).
pub fn set_timeout(cfg: &mut Config, name: &str, secs: u32) {
    match name {
        "tcp_syn" => cfg.tcp_syn_timeout = secs,
        "tcp_established" => cfg.tcp_established_timeout = secs,
        "tcp_close" => cfg.tcp_close_timeout = secs,
        "udp" => cfg.udp_timeout = secs,
        _ => cfg.other_timeout = secs,
    }
}

pub const NOT_ATTACHED: &str = "pfwd is not attached in this network namespace: run `pfwd attach IFACE...` first";

fn open() -> Result<Lock> {
    instance::require_root()?;
    instance::ensure_bpffs()?;
    Lock::acquire(&Instance::current()?)
}

fn ifindex_lookup(state: &Meta) -> impl Fn(&str) -> Option<u32> + '_ {
    |name| state.interfaces.iter().find(|i| i.name == name).map(|i| i.ifindex)
}

/// Adds rules to a planned state: ids, free slots (round robin, so a freed slot is not reused at once) and
/// duplicate detection, in constant time per rule (a config file may bring 10,000 rules at once).
struct RuleAdder {
    used_slots: FastSet<u32>,
    keys: FastMap<rules::DedupKey, u32>,
}

impl RuleAdder {
    /// `adding`: how many rules are about to be pushed (room is made for them up front, no rehashing on the way).
    fn new(state: &State, adding: usize) -> Self {
        let n = state.rules.len() + adding;
        let mut used_slots = fasthash::set_with_capacity(n);
        let mut keys = fasthash::map_with_capacity(n);
        for r in &state.rules {
            used_slots.insert(r.slot);
            keys.insert(r.rule.dedup_key(), r.rule.id);
        }
        Self { used_slots, keys }
    }

    /// [`RuleAdder::push_keyed`] unless an existing rule has the same match and target: then `Err((its id, rule))`. The
    /// rule's duplicate key is computed once for both.
    fn push_new(&mut self, state: &mut State, rule: Rule) -> Result<std::result::Result<u32, (u32, Rule)>> {
        let key = rule.dedup_key();
        if let Some(&of) = self.keys.get(&key) {
            return Ok(Err((of, rule)));
        }
        self.push_keyed(state, rule, key).map(Ok)
    }

    /// Gives `rule` (whose duplicate key is `key`) the next id and a free slot, and appends it to `state`.
    fn push_keyed(&mut self, state: &mut State, mut rule: Rule, key: rules::DedupKey) -> Result<u32> {
        let max = pfwd_common::MAX_RULES;
        let slot = (0..max)
            .map(|i| (state.next_slot + i) % max)
            .find(|s| !self.used_slots.contains(s))
            .with_context(|| format!("all {max} rule slots are in use"))?;
        self.used_slots.insert(slot);
        state.next_slot = (slot + 1) % max;
        rule.id = state.next_id;
        state.next_id += 1;
        self.keys.insert(key, rule.id);
        let id = rule.id;
        state.rules.push(StoredRule { rule, slot });
        Ok(id)
    }
}

/// Records in `state` the sysctls its rules are about to change, with their values now, before anything writes them:
/// saved before the write, a previous value cannot be lost by a crash between the write and the save. Returns the
/// notes about the changes (`apply` then finds them recorded and says nothing more).
fn record_sysctls(state: &mut State) -> Result<Vec<String>> {
    let names: Vec<String> = state.interfaces.iter().map(|i| i.name.clone()).collect();
    let wanted = sysctl::wanted(state.rules.iter().map(|r| &r.rule), &names);
    record_wanted(state, &wanted)
}

/// [`record_sysctls`] for the sysctls `wanted`.
fn record_wanted(state: &mut Meta, wanted: &[(String, String, String)]) -> Result<Vec<String>> {
    let mut notes = vec![];
    for (key, value, reason) in wanted {
        if state.sysctls.iter().any(|s| s.key == *key) {
            continue;
        }
        let current = sysctl::read(key)?;
        if current != *value {
            notes.push(format!("set {} = {value} (was {current}): {reason}", key.replace('/', ".")));
            state.sysctls.push(SavedSysctl { key: key.clone(), previous: current, reason: reason.clone() });
        }
    }
    Ok(notes)
}

/// Restores the sysctls recorded in `planned` and not in `previous` (a change that failed and was undone).
fn restore_added_sysctls(planned: &Meta, previous: &Meta) {
    let added: Vec<SavedSysctl> =
        planned.sysctls.iter().filter(|s| !previous.sysctls.iter().any(|p| p.key == s.key)).cloned().collect();
    sysctl::restore_all(&added);
}

/// REDIRECT uses each interface's primary address, `-d local` all of this host's: refreshed whenever rules
/// change.
fn refresh_addresses(kernel: &Kernel, state: &Meta) -> Result<()> {
    for i in &state.interfaces {
        kernel.set_iface(i.ifindex, netif::primary_ipv4(&i.name), netif::primary_ipv6(&i.name), netif::mac(&i.name))?;
    }
    kernel.set_local_addrs(&netif::local_addrs())
}

/// The state's rules compiled for the kernel, in their slots (which also checks them: interfaces attached, caps).
/// In eBPF mode the kernel holds the rules of both families; in iptables and nft modes IPv6 rules go to netfilter
/// only, and are checked here for their interface alone.
fn compile_state(state: &State) -> Result<rules::Compiled, rules::RuleError> {
    let lookup = ifindex_lookup(state);
    if state.mode == DataPath::Nft {
        let ifaces: Vec<String> = state.interfaces.iter().map(|i| i.name.clone()).collect();
        crate::iptables::check_nft_names(&state.rules(), &ifaces)?;
    }
    let v6_only = |r: &&StoredRule| r.rule.family() == Some(Family::Ipv6);
    if state.mode != DataPath::Ebpf && state.rules.iter().any(|r| v6_only(&r)) {
        for r in state.rules.iter().filter(v6_only) {
            if state.mode == DataPath::Iptables && !fallback::ipv6_usable() {
                return Err(rules::RuleError::InRule { id: r.rule.id, error: Box::new(rules::RuleError::NoIpv6Here) });
            }
            if let Some(name) = r.rule.hook_iface().filter(|_| !r.rule.not.iface)
                && lookup(name).is_none()
            {
                let option = if r.rule.is_postrouting() { "-o" } else { "-i" };
                return Err(rules::RuleError::IfaceNotAttached { id: r.rule.id, iface: name.to_string(), option });
            }
        }
        let v4: Vec<StoredRule> = state.rules.iter().filter(|r| !v6_only(r)).cloned().collect();
        return crate::loader::compile_stored(&v4, &lookup);
    }
    crate::loader::compile_stored(&state.rules, &lookup)
}

/// Removes the instance: marks the state as being removed (so a detach killed half-way is seen as such), removes
/// the data path, restores the recorded sysctls, then removes the state. Returns the notes about sysctls.
fn remove_instance(lock: &Lock, state: &mut State) -> Result<Vec<String>> {
    if state.pending != Some(Pending::Remove) {
        state.pending = Some(Pending::Remove);
        lock.save_meta(state)?;
    }
    Backend::of(state, &lock.inst).unload(Some(state))?;
    let notes = sysctl::restore_all(&state.sysctls);
    lock.remove_state()?;
    Ok(notes)
}

/// Applies the state's rules and sysctls to the data path. Returns notes about sysctl changes.
fn apply(backend: &Backend, state: &mut State) -> Result<Vec<String>> {
    apply_compiled(backend, state, None)
}

/// [`apply`], the state's rules compiled already when `compiled` is given.
fn apply_compiled(backend: &Backend, state: &mut State, compiled: Option<rules::Compiled>) -> Result<Vec<String>> {
    let compiled = backend.sync_rules(state, compiled)?;
    apply_sysctls(backend, state, compiled.as_ref())
}

/// [`apply`] for a rule change from `previous`, the state the data path holds (see [`Backend::change_rules`]), with
/// what its sysctls and [`Derived`] are ([`derive`], worked out while the store was written).
fn apply_change(
    backend: &Backend,
    previous: &State,
    state: &mut State,
    (compiled, derivation): (&rules::Compiled, Derivation),
    planned: Result<Option<PlannedSync>>,
) -> Result<Vec<String>> {
    backend.change_rules(previous, state, compiled, planned)?;
    apply_derivation(backend, state, derivation)
}

/// The sysctls the state's rules need, and the record kept with the data path; in eBPF mode also what a small change
/// needs to know about all the rules ([`Derived`], from `compiled`, the rules as the kernel now holds them). Returns
/// notes about the changes.
fn apply_sysctls(backend: &Backend, state: &mut State, compiled: Option<&rules::Compiled>) -> Result<Vec<String>> {
    let derivation = derive(backend, state, compiled);
    apply_derivation(backend, state, derivation)
}

/// What [`apply_sysctls`] works out from the rules before it changes anything.
struct Derivation {
    wanted: Vec<(String, String, String)>,
    derived: Option<Derived>,
}

/// The sysctls `state`'s rules want and, in eBPF mode, its [`Derived`] (reads only: it can run beside other work).
fn derive(backend: &Backend, state: &State, compiled: Option<&rules::Compiled>) -> Derivation {
    let names: Vec<String> = state.interfaces.iter().map(|i| i.name.clone()).collect();
    let wanted = sysctl::wanted(state.rules.iter().map(|r| &r.rule), &names);
    let derived = match (backend, compiled) {
        (Backend::Ebpf(_), Some(c)) => {
            let mut d = Derived {
                classes: rules::delta::class_keys(c),
                sysctls: sysctl::users(state.rules.iter().map(|r| &r.rule), &names),
                backend_rules: c.tables.len() as u32,
                locals: sorted_local_addrs(),
                hidden: vec![],
            };
            d.set_hidden(rules::delta::hidden_members(c));
            Some(d)
        }
        _ => None,
    };
    Derivation { wanted, derived }
}

/// Brings the sysctls to what `derivation` wants and keeps its [`Derived`] in the state.
fn apply_derivation(backend: &Backend, state: &mut State, derivation: Derivation) -> Result<Vec<String>> {
    let notes = apply_wanted_sysctls(backend, state, &derivation.wanted)?;
    state.meta.derived = derivation.derived;
    Ok(notes)
}

/// Brings the sysctls to `wanted` ([`sysctl::reconcile`]), keeping the record with the data path ahead of every
/// write. Returns notes about the changes.
fn apply_wanted_sysctls(
    backend: &Backend,
    state: &mut Meta,
    wanted: &[(String, String, String)],
) -> Result<Vec<String>> {
    // The record kept with the data path must name every sysctl before it is written: the ones already saved and
    // those about to be, with their values now.
    let mut planned = state.sysctls.clone();
    for (key, value, reason) in wanted {
        if !planned.iter().any(|s| s.key == *key) {
            let current = sysctl::read(key)?;
            if current != *value {
                planned.push(SavedSysctl { key: key.clone(), previous: current, reason: reason.clone() });
            }
        }
    }
    if planned.len() != state.sysctls.len() {
        backend.write_record(&Record::new(&planned, &state.created_tables))?;
    }
    let before = state.sysctls.len();
    let notes = sysctl::reconcile(&mut state.sysctls, wanted)?;
    if state.sysctls.len() != planned.len() || state.sysctls.len() != before {
        backend.write_record(&Record::new(&state.sysctls, &state.created_tables))?;
    }
    Ok(notes)
}

/// This host's IPv4 addresses, sorted (what the sysctls eBPF mode's rules want were counted at: its rules are IPv4
/// ones, and IPv6 addresses come and go, temporary and link-local ones, without changing them).
fn sorted_local_addrs() -> Vec<IpAddr> {
    let mut a: Vec<IpAddr> = netif::local_ipv4_addrs().into_iter().map(IpAddr::from).collect();
    a.sort_unstable();
    a
}

/// This host's IPv4 addresses, network order (the `-d local` set).
/// The data path a new instance starts on, and why.
fn choose_mode(requested: Mode) -> (DataPath, String) {
    match requested {
        Mode::Ebpf => (DataPath::Ebpf, "eBPF (--mode ebpf)".into()),
        Mode::Iptables => (DataPath::Iptables, "iptables (--mode iptables)".into()),
        Mode::Nft => (DataPath::Nft, "nftables (--mode nft)".into()),
        Mode::Auto => {
            let btf = std::env::var(ENV_BTF_PATH).unwrap_or_else(|_| DEFAULT_BTF_PATH.into());
            if std::path::Path::new(&btf).exists() {
                (DataPath::Ebpf, format!("auto: kernel BTF found at {btf}"))
            } else {
                let (path, why) = netfilter_fallback();
                (path, format!("auto: no kernel BTF at {btf}, so the eBPF data path is not used; {why}"))
            }
        }
    }
}

/// The netfilter data path `auto` falls back to, and why: nftables (constant-time rule lookup) when `nft` works
/// here, else iptables.
fn netfilter_fallback() -> (DataPath, String) {
    match nftables::available() {
        Ok(()) => (DataPath::Nft, "using nftables".into()),
        Err(e) => (DataPath::Iptables, format!("using iptables (nft is not usable: {e:#})")),
    }
}

/// `pfwd attach`: creates the instance (once per namespace), attaches `ifaces`, adds `rules`.
/// Idempotent: attaching an interface twice or adding a rule that already exists changes nothing.
pub fn attach(ifaces: &[String], rules: Vec<Rule>, opts: &AttachOptions) -> Result<Vec<String>> {
    attach_reading(ifaces, move || Ok(rules), opts)
}

/// [`attach`], the rules read by `read_rules` once the instance is known: a fresh eBPF instance loads its programs
/// meanwhile (the kernel verifies them, about half a second; reading a config of 10,000 rules takes a sixth of
/// that). When anything fails before the programs are used, their pins are removed again: nothing is left.
pub fn attach_reading(
    ifaces: &[String],
    read_rules: impl FnOnce() -> Result<Vec<Rule>>,
    opts: &AttachOptions,
) -> Result<Vec<String>> {
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
    let mut repair_notes = vec![];
    let existing = match lock.load()? {
        // An attach that was creating the instance, or a detach, was killed: remove what is left, then start afresh.
        Some(mut s) if matches!(s.pending, Some(Pending::Create | Pending::Remove)) => {
            let what = if s.pending == Some(Pending::Create) { "attach" } else { "detach" };
            repair_notes.push(format!("an interrupted {what} had left a partial instance; removed it"));
            repair_notes.extend(remove_instance(&lock, &mut s)?);
            None
        }
        Some(s) => {
            if s.pending.is_some() {
                repair_notes.push("an interrupted change had been left half-applied; applied it again".into());
            }
            Some(s)
        }
        None => None,
    };
    let fresh = existing.is_none();
    let state = match existing {
        Some(s) => {
            if let Some(wanted) = opts.mode.data_path()
                && wanted != s.mode
            {
                bail!("pfwd is already attached here in {} mode; `pfwd detach` first to change the mode", s.mode);
            }
            s
        }
        None => {
            // Pins without state: left by a crash or by a dead namespace with the same inode number.
            Kernel::new(&lock.inst).unload().context("removing stale pfwd pins")?;
            let (mode, reason) = choose_mode(opts.mode);
            State::new(lock.inst.netns_cookie, mode, &reason)
        }
    };
    let kernel = Kernel::new(&lock.inst);
    let load = fresh && state.mode == DataPath::Ebpf;
    let result = std::thread::scope(|s| {
        let loading = load.then(|| {
            let (kernel, cfg) = (&kernel, Config { netns_cookie: state.netns_cookie, ..opts.config });
            s.spawn(move || kernel.load(opts.ct_entries, &cfg))
        });
        attach_rules(&lock, fresh, &state, &resolved, read_rules, opts, loading, repair_notes)
    });
    if result.is_err() && load {
        // Pins of programs loaded and never used (a rule failed its checks, say).
        let _ = kernel.unload();
    }
    result
}

/// The rest of [`attach_reading`], once the instance's state is known: reads the rules, checks them, brings the
/// data path up. `loading`: a fresh instance's programs being loaded.
#[allow(clippy::too_many_arguments)]
fn attach_rules(
    lock: &Lock,
    fresh: bool,
    state: &State,
    resolved: &[(String, u32)],
    read_rules: impl FnOnce() -> Result<Vec<Rule>>,
    opts: &AttachOptions,
    loading: Option<std::thread::ScopedJoinHandle<'_, Result<()>>>,
    repair_notes: Vec<String>,
) -> Result<Vec<String>> {
    let mut planned = state.clone();
    if opts.xdp && planned.mode != DataPath::Ebpf {
        bail!("--xdp needs eBPF mode (this instance runs in {} mode)", planned.mode);
    }
    // The mode is known once attached; until then any value marks the wish.
    let xdp = opts.xdp.then_some(XdpRun::Native);
    for (name, ifindex) in resolved {
        match planned.interfaces.iter_mut().find(|i| i.name == *name) {
            Some(i) => {
                i.ifindex = *ifindex;
                i.xdp = i.xdp.or(xdp);
            }
            None => planned.interfaces.push(AttachedIface { name: name.clone(), ifindex: *ifindex, xdp }),
        }
    }
    let rules = read_rules()?;
    let mut added = vec![];
    let mut adder = RuleAdder::new(&planned, rules.len());
    for r in rules {
        r.validate()?;
        if let Ok(id) = adder.push_new(&mut planned, r)? {
            added.push(id);
        }
    }
    // Compile now, so a rule naming an interface that is not attached fails before anything changes (and once: the
    // eBPF data path takes these).
    let compiled = compile_state(&planned)?;

    let mut result = bring_up_or_roll_back(lock, fresh, state, &mut planned, opts, Some(compiled), loading);
    // With --xdp the error is the answer: netfilter has no XDP fast path (as when auto picks netfilter for lack of
    // BTF, above), and a refusal of --xdp itself (a layer-3 interface, another XDP program) must be seen, not
    // replaced by a data path without it.
    if let Err(e) = &result
        && fresh
        && opts.mode == Mode::Auto
        && planned.mode == DataPath::Ebpf
        && !opts.xdp
    {
        // auto: eBPF could not be loaded or attached here; fall back to netfilter and say why.
        let (path, why) = netfilter_fallback();
        planned.mode = path;
        planned.mode_reason = format!("auto: eBPF failed ({e:#}); {why}");
        result = bring_up_or_roll_back(lock, fresh, state, &mut planned, opts, None, None);
    }
    let mut notes = result?;
    notes.splice(0..0, repair_notes);
    let what = match planned.mode {
        DataPath::Ebpf => "tcx ingress + egress",
        DataPath::Iptables => "iptables PFWD-* chains",
        DataPath::Nft => "nftables table inet pfwd_nat",
    };
    for (name, _) in resolved.iter().rev() {
        notes.insert(0, format!("attached to {name} ({what})"));
    }
    if fresh {
        notes.insert(0, format!("mode {}: {}", planned.mode, planned.mode_reason));
    }
    // New rules are the last ones of the list; name them unless there are very many.
    let new_rules = &planned.rules[planned.rules.len() - added.len()..];
    if new_rules.len() <= 20 {
        notes.extend(new_rules.iter().map(|r| format!("added rule {}: {}", r.rule.id, r.rule)));
    } else {
        notes.push(format!("added {} rules (ids {}-{})", new_rules.len(), added[0], added[added.len() - 1]));
    }
    Ok(notes)
}

/// Brings `planned` up and saves it; on failure restores `previous` (a fresh instance is removed entirely).
/// `compiled`: `planned`'s rules compiled, if they were; `loading`: a fresh eBPF instance's programs being loaded.
fn bring_up_or_roll_back(
    lock: &Lock,
    fresh: bool,
    previous: &State,
    planned: &mut State,
    opts: &AttachOptions,
    compiled: Option<rules::Compiled>,
    loading: Option<std::thread::ScopedJoinHandle<'_, Result<()>>>,
) -> Result<Vec<String>> {
    let backend = Backend::of(planned, &lock.inst);
    // Intent first: what is about to be created and changed is saved before anything is.
    let run = |planned: &mut State| -> Result<Vec<String>> {
        planned.pending = Some(if fresh { Pending::Create } else { Pending::Change });
        backend.prepare(fresh, planned)?;
        let mut notes = record_sysctls(planned)?;
        // A fresh eBPF instance's programs have been loading meanwhile ([`attach_reading`]): loading only creates
        // the instance's own pins, which an attach that finds them without state removes (and a failure here
        // removes them below).
        let saved = lock.save(planned);
        if let Some(loading) = loading {
            loading.join().unwrap_or_else(|e| std::panic::resume_unwind(e))?;
        }
        saved?;
        notes.extend(backend.bring_up(fresh, planned, opts, compiled)?);
        planned.pending = None;
        // The rules were saved with the intent.
        lock.save_meta(planned)?;
        Ok(notes)
    };
    let result = run(planned);
    if result.is_err() {
        if fresh {
            sysctl::restore_all(&planned.sysctls);
            planned.sysctls.clear();
            let _ = backend.unload(Some(planned));
            let _ = lock.remove_state();
        } else {
            restore_added_sysctls(planned, previous);
            planned.sysctls.retain(|s| previous.sysctls.iter().any(|p| p.key == s.key));
            let mut previous = previous.clone();
            for i in &planned.interfaces {
                match previous.interfaces.iter().find(|p| p.name == i.name) {
                    None => backend.detach_iface(&i.name, i.ifindex),
                    // Attached before, without the XDP fast path this attach was adding.
                    Some(p) if p.xdp.is_none() && i.xdp.is_some() => backend.detach_xdp(&i.name, i.ifindex),
                    Some(_) => {}
                }
            }
            let _ = apply(&backend, &mut previous).map(|_| lock.save(&previous));
        }
    }
    result
}

/// `pfwd add`: adds one rule; returns its id and notes.
pub fn add(rule: Rule) -> Result<(u32, Vec<String>)> {
    let (ids, notes) = add_many(vec![rule], false)?;
    Ok((ids[0], notes))
}

/// Adds `rules` all or nothing. With `skip_duplicates` (import), rules that already exist are skipped;
/// otherwise a duplicate is an error. Returns the new ids and notes.
pub fn add_many(rules: Vec<Rule>, skip_duplicates: bool) -> Result<(Vec<u32>, Vec<String>)> {
    let change = change_rules(&[], rules, skip_duplicates)?;
    Ok((change.added, change.notes))
}

/// What a rule change did.
pub struct Change {
    /// The rules removed, in the order asked for.
    pub removed: Vec<Rule>,
    /// Ids of the rules added.
    pub added: Vec<u32>,
    /// Sysctl changes, skipped duplicates.
    pub notes: Vec<String>,
    /// The state before the change (to find the flows of removed rules).
    before: State,
}

/// Removes the rules with ids `remove` and adds `add`, all or nothing: every id must exist, every new rule must be
/// valid and fit, else nothing changes. The one way rules change (add, del, flush, import).
pub fn change_rules(remove: &[u32], add: Vec<Rule>, skip_duplicates: bool) -> Result<Change> {
    for r in &add {
        r.validate()?;
    }
    // Each id once, in the order first asked for.
    let mut once = FastSet::default();
    let remove: &[u32] = &remove.iter().copied().filter(|id| once.insert(*id)).collect::<Vec<u32>>();
    let lock = open()?;
    let (meta, store) = lock.load_meta()?.context(NOT_ATTACHED)?;
    if let Some(p @ (Pending::Create | Pending::Remove)) = meta.pending {
        bail!("{}; nothing was changed", p.describe());
    }
    if small::is_small(&meta, &store, remove.len() + add.len())?
        && let Some(change) = small::change(&lock, &meta, &store, remove, &add, skip_duplicates)?
    {
        return Ok(change);
    }
    let mut state = State { meta, rules: store.rules()? };
    log::debug!("full change: {} rules removed, {} added, of {} rules", remove.len(), add.len(), state.rules.len());
    // Sets, not scans: `flush` removes every rule, and 100,000 of them made pairwise scans quadratic.
    let present: FastSet<u32> = state.rules.iter().map(|r| r.rule.id).collect();
    let missing: Vec<String> = remove.iter().filter(|id| !present.contains(id)).map(u32::to_string).collect();
    if !missing.is_empty() {
        return Err(no_such_rules(&missing, &store, "changed"));
    }
    let mut planned = state.clone();
    // Built from the state before the change, so no new rule takes a slot freed by this change (its counters are
    // reset below).
    let mut adder = RuleAdder::new(&planned, add.len());
    // The rules removed, in the order asked for.
    let asked: FastMap<u32, usize> = remove.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut removed: Vec<(usize, StoredRule)> = Vec::new();
    planned.rules.retain(|r| match asked.get(&r.rule.id) {
        Some(&i) => {
            removed.push((i, r.clone()));
            false
        }
        None => true,
    });
    removed.sort_unstable_by_key(|(i, _)| *i);
    let removed: Vec<StoredRule> = removed.into_iter().map(|(_, r)| r).collect();
    for r in &removed {
        adder.keys.remove(&r.rule.dedup_key());
    }
    let mut added = vec![];
    let mut notes = vec![];
    let kept = planned.rules.len();
    if state.pending == Some(Pending::Change) {
        // The interrupted change's rules are the state's: applying this change applies them too.
        notes.push("an interrupted change had been left half-applied; applied it again".into());
    }
    planned.rules.reserve(add.len());
    added.reserve(add.len());
    for rule in add {
        match adder.push_new(&mut planned, rule)? {
            Ok(id) => added.push(id),
            Err((of, rule)) => {
                let e = rules::RuleError::Duplicate { of };
                if skip_duplicates {
                    notes.push(format!("skipped `{rule}`: {e}"));
                    continue;
                }
                return Err(e.into());
            }
        }
    }
    let compiled = compile_state(&planned).map_err(|e| rule_error(e, &state))?;
    if state.mode == DataPath::Ebpf && state.cgroup.is_none() && planned.rules.iter().any(|r| r.rule.local) {
        bail!(NO_CGROUP);
    }
    let backend = Backend::of(&state, &lock.inst);
    // Intent first: the rules about to be applied and the earlier values of the sysctls about to change are saved
    // before anything is touched.
    planned.pending = Some(Pending::Change);
    notes.extend(record_sysctls(&mut planned)?);
    let write = Write { removed: &removed, added: &planned.rules[kept..], replace: false };
    // While the store is written, the kernel's writes are planned and those packets cannot see yet are made
    // (`Kernel::stage`); what packets see (the flip) comes once the store is written.
    // The sysctls and what is derived from the rules are worked out there too.
    let (saved, (kernel_plan, derivation)) = std::thread::scope(|s| {
        let planning = s.spawn(|| {
            let staged = backend.plan_change(&state, &planned, &compiled).and_then(|p| backend.stage_change(p));
            (staged, derive(&backend, &planned, Some(&compiled)))
        });
        let saved = lock.save_change(&planned.meta, &write);
        (saved, planning.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    });
    if let Err(e) = saved {
        // Written ahead, or failed on the way (maybe while writing): the kernel goes back to the state's rules. If
        // that fails too, the kernel keeps its mark and the next change reads the rules back.
        let written = match &kernel_plan {
            Ok(planned) => planned.as_ref().is_some_and(PlannedSync::is_staged),
            Err(_) => true,
        };
        if written {
            let _ = backend.sync_rules(&state, None);
        }
        return Err(e);
    }
    match apply_change(&backend, &state, &mut planned, (&compiled, derivation), kernel_plan) {
        Ok(more) => notes.extend(more),
        Err(e) => {
            restore_added_sysctls(&planned, &state);
            let _ = apply(&backend, &mut state).map(|_| lock.save(&state));
            return Err(e);
        }
    }
    finish_change(&lock, &backend, &mut planned, &removed)?;
    Ok(Change { removed: removed.into_iter().map(|r| r.rule).collect(), added, notes, before: state })
}

/// The end of a change that was applied: the freed slots' counters are cleared, so a later rule given such a slot
/// starts from zero (flows a deleted rule translated keep going until they end or are flushed, and may add a little
/// to them meanwhile); then the pending marker goes.
fn finish_change(lock: &Lock, backend: &Backend, planned: &mut Meta, removed: &[StoredRule]) -> Result<()> {
    if let Backend::Ebpf(kernel) = backend {
        kernel.reset_counters(&removed.iter().map(|r| r.slot).collect::<Vec<u32>>())?;
    }
    planned.pending = None;
    lock.save_meta(planned)
}

/// A rule that names an interface pfwd is not attached to says which ones it is attached to.
fn rule_error(e: rules::RuleError, state: &Meta) -> anyhow::Error {
    match e {
        rules::RuleError::IfaceNotAttached { iface, option, .. } => anyhow::anyhow!(
            "{option} {iface}: pfwd is not attached to {iface} (attached: {}); run `pfwd attach {iface}` first",
            state.interfaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
        e => e.into(),
    }
}

/// `status` after a change killed between writing ahead of its state and its flip.
const ABANDONED_CHANGE: &str = "a rule change was interrupted before its rules were saved: packets see the rules \
                                shown, and the maps also hold the unused writes it made ahead (the rule engine's \
                                key counts include them); the next change, `pfwd attach` or `pfwd detach` removes \
                                them";

const NO_CGROUP: &str = "--local rules need the cgroup socket hooks, and no cgroup2 is mounted (looked at \
                         /sys/fs/cgroup and /sys/fs/cgroup/unified): mount cgroup2, or use pfwd in --mode iptables";

/// What `pfwd apply` changes: rules are matched by what they match and do (ids in the file are ignored), so a rule in
/// both keeps its id, its counters and its live flows.
#[derive(Debug, Default)]
pub struct ApplyPlan {
    /// Running rules the file has too (with their running ids).
    pub keep: Vec<Rule>,
    /// Running rules the file does not have.
    pub remove: Vec<Rule>,
    /// Rules of the file that are not running (ids to be assigned).
    pub add: Vec<Rule>,
}

/// The difference between `running` and `wanted` (see [`ApplyPlan`]).
pub fn plan_apply(running: &[Rule], wanted: &[Rule]) -> ApplyPlan {
    let wanted_keys: HashSet<rules::DedupKey> = wanted.iter().map(Rule::dedup_key).collect();
    let running_keys: HashSet<rules::DedupKey> = running.iter().map(Rule::dedup_key).collect();
    let (keep, remove) = running.iter().cloned().partition(|r| wanted_keys.contains(&r.dedup_key()));
    let add =
        wanted.iter().filter(|r| !running_keys.contains(&r.dedup_key())).map(|r| Rule { id: 0, ..r.clone() }).collect();
    ApplyPlan { keep, remove, add }
}

/// `pfwd apply`: makes the running rules exactly `wanted`, as one change (all or nothing). Returns the plan and the
/// change (None when there was nothing to do).
pub fn apply_rules(wanted: &[Rule]) -> Result<(ApplyPlan, Option<Change>)> {
    let state = open()?.load()?.context(NOT_ATTACHED)?;
    let plan = plan_apply(&state.rules(), wanted);
    // An interrupted change (a killed apply) recorded its rules as the state's: even when they already are the
    // file's, the data path may hold only part of them, so apply them again.
    if plan.remove.is_empty() && plan.add.is_empty() && state.pending != Some(Pending::Change) {
        return Ok((plan, None));
    }
    let remove: Vec<u32> = plan.remove.iter().map(|r| r.id).collect();
    let change = change_rules(&remove, plan.add.clone(), false)?;
    Ok((plan, Some(change)))
}

/// `pfwd serve`, after the kernel reported an interface or address change: re-attaches every attached interface that
/// was deleted and re-created under the same name (a new ifindex: the old tcx links died with the old device), and
/// refreshes the addresses REDIRECT and MASQUERADE use, and the per-interface sysctls (a new device starts with
/// defaults). Interfaces that are gone stay recorded and are re-attached when they come back. Returns notes about
/// what changed (empty when nothing did).
pub fn follow_interfaces() -> Result<Vec<String>> {
    let lock = open()?;
    let Some(mut state) = lock.load()? else { return Ok(vec![]) };
    if state.pending.is_some() {
        bail!(
            "{}; not following interface changes until it is repaired (run `pfwd attach`)",
            state.pending.map_or("", |p| p.describe())
        );
    }
    let backend = Backend::of(&state, &lock.inst);
    let mut notes = vec![];
    let mut moved = vec![];
    for i in &mut state.interfaces {
        match netif::ifindex(&i.name) {
            Ok(now) if now != i.ifindex => {
                moved.push((i.name.clone(), i.ifindex, now));
                i.ifindex = now;
            }
            _ => {}
        }
    }
    if !moved.is_empty() {
        // Intent first, as every change: a serve killed half-way leaves a state `attach` can repair.
        state.pending = Some(Pending::Change);
        lock.save_meta(&state)?;
        for (name, old, now) in &moved {
            match &backend {
                Backend::Ebpf(kernel) => {
                    // The old links (pinned by name) point at a device that no longer exists: drop them first.
                    kernel.detach(name, *old)?;
                    kernel.attach(name, *now)?;
                }
                Backend::Iptables => fallback::attach(name)?,
                // The interface set holds names, which a re-created device keeps.
                Backend::Nft => {}
            }
            notes.push(format!("re-attached to {name} (it was re-created: ifindex {old} -> {now})"));
        }
    }
    let present: Vec<&AttachedIface> = state.interfaces.iter().filter(|i| netif::ifindex(&i.name).is_ok()).collect();
    // REDIRECT and MASQUERADE read each interface's primary address from the IFACES map, `-d local` the host's
    // addresses from LOCAL_ADDRS (netfilter finds them by itself in iptables mode).
    if let Backend::Ebpf(kernel) = &backend {
        for i in &present {
            kernel.set_iface(
                i.ifindex,
                netif::primary_ipv4(&i.name),
                netif::primary_ipv6(&i.name),
                netif::mac(&i.name),
            )?;
        }
        kernel.set_local_addrs(&netif::local_addrs())?;
    }
    if !moved.is_empty() {
        // Rules naming a moved interface carry its ifindex; a re-created device starts with default sysctls (which
        // cannot be read or written while another attached interface is gone: then only the rules are synced).
        if present.len() == state.interfaces.len() {
            notes.extend(apply(&backend, &mut state)?);
        } else {
            backend.sync_rules(&state, None)?;
            // The sysctls were not reconciled: the next change works out what it needs.
            state.meta.derived = None;
        }
        state.pending = None;
        lock.save_meta(&state)?;
    }
    Ok(notes)
}

/// The rules and interfaces of the running instance (for export), or None when not attached.
pub fn current() -> Result<Option<(Vec<Rule>, Vec<String>)>> {
    let lock = open()?;
    Ok(lock.load()?.map(|s| (s.rules(), s.interfaces.iter().map(|i| i.name.clone()).collect())))
}

/// The error for ids (or ranges) that name no rule: it says which ids there are (all of them when there are few)
/// and that nothing was `done`.
fn no_such_rules(missing: &[String], store: &crate::store::Store, done: &str) -> anyhow::Error {
    let have = match store.id_span() {
        Ok((0, _)) => "none".to_string(),
        Ok((n, Some((lo, hi)))) if n > 20 => format!("{n} rules from {lo} to {hi}"),
        _ => store
            .ids_in(0, u32::MAX)
            .map_or_else(|_| "unknown".into(), |ids| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")),
    };
    anyhow::anyhow!("no rule with id {} (rule ids: {have}; see `pfwd list`); nothing was {done}", missing.join(", "))
}

/// The rule ids `pfwd del` names: each single id must exist; a range stands for the rules that exist in it and must
/// hold at least one. Errors name every id or range that names nothing.
pub fn resolve_ids(selection: &[(u32, u32)]) -> Result<Vec<u32>> {
    let lock = open()?;
    let (_, store) = lock.load_meta()?.context(NOT_ATTACHED)?;
    let mut ids = Vec::new();
    let mut missing = Vec::new();
    for &(lo, hi) in selection {
        let found = store.ids_in(lo, hi)?;
        match (found.is_empty(), lo == hi) {
            (true, true) => missing.push(lo.to_string()),
            (true, false) => missing.push(format!("{lo}-{hi}")),
            (false, _) => ids.extend(found),
        }
    }
    if !missing.is_empty() {
        return Err(no_such_rules(&missing, &store, "deleted"));
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// `pfwd del ID...`: removes rules, all or nothing. Flows they already translated keep their translation until they
/// end, as with iptables, whose NAT decisions live in conntrack, unless `end_flows` (`--flows`) ends them too.
/// Returns the change and how many live flows were ended.
pub fn del(ids: &[u32], end_flows: bool) -> Result<(Change, usize)> {
    let change = change_rules(ids, vec![], false)?;
    let flows = if end_flows {
        let filter = FlowFilter { rules: Some(ids.to_vec()), ..Default::default() };
        end_flows_of(&change.before, &filter)?
    } else {
        0
    };
    Ok((change, flows))
}

/// Which rules `pfwd flush` removes: where they act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushScope {
    All,
    /// dnat/redirect on arriving packets (PREROUTING).
    Inbound,
    /// snat/masquerade (POSTROUTING).
    Outbound,
    /// `--local` dnat/redirect (OUTPUT).
    Local,
}

impl FlushScope {
    pub fn covers(self, r: &Rule) -> bool {
        match self {
            FlushScope::All => true,
            FlushScope::Inbound => !r.is_postrouting() && !r.local,
            FlushScope::Outbound => r.is_postrouting(),
            FlushScope::Local => r.local,
        }
    }
}

/// `pfwd flush`: removes every rule (or those of one hook) and stays attached; sysctls only the removed rules needed
/// are restored. Like `iptables -t nat -F`, live flows keep their translation (`pfwd conntrack --flush` ends them).
pub fn flush(scope: FlushScope) -> Result<Change> {
    let ids: Vec<u32> = {
        let lock = open()?;
        let state = lock.load()?.context(NOT_ATTACHED)?;
        state.rules.iter().filter(|r| scope.covers(&r.rule)).map(|r| r.rule.id).collect()
    };
    change_rules(&ids, vec![], false)
}

/// `pfwd conntrack --flush`: ends the live translations the filter picks (both directions of each flow); their next
/// packets are handled by the rules as they are now. Returns how many flows were ended.
pub fn conntrack_flush(filter: &FlowFilter) -> Result<usize> {
    let lock = open()?;
    let state = lock.load()?.context(NOT_ATTACHED)?;
    if let Some(ids) = &filter.rules {
        let present: HashSet<u32> = state.rules.iter().map(|r| r.rule.id).collect();
        let missing: Vec<String> = ids.iter().filter(|id| !present.contains(id)).map(u32::to_string).collect();
        if !missing.is_empty() {
            bail!("no rule with id {} (see `pfwd list`)", missing.join(", "));
        }
    }
    drop(lock);
    end_flows_of(&state, filter)
}

/// Each rule's id by its slot (a flow names its rule by slot; one lookup per flow, not a scan of the rules).
fn rule_ids_by_slot(state: &State) -> HashMap<u32, u32> {
    state.rules.iter().map(|r| (r.slot, r.rule.id)).collect()
}

/// Ends the flows `filter` picks; `state` names the rules (as they were when the flows were made).
fn end_flows_of(state: &State, filter: &FlowFilter) -> Result<usize> {
    let lock = open()?;
    match Backend::of(state, &lock.inst) {
        Backend::Ebpf(kernel) => {
            let cfg = kernel.config()?;
            let now = crate::clock::now_ns(&cfg);
            let ids = rule_ids_by_slot(state);
            let rule_id = |slot| ids.get(&pfwd_common::owner_slot(slot)).copied();
            let (keys, flows) =
                flows::ebpf_select(&kernel.conntrack::<u32>()?, rule_id, |e| !e.expired(now, &cfg), filter);
            kernel.conntrack_delete(&keys)?;
            let (keys6, flows6) = flows::ebpf_select(
                &kernel.conntrack::<pfwd_common::Addr6>()?,
                rule_id,
                |e| !e.expired(now, &cfg),
                filter,
            );
            kernel.conntrack_delete(&keys6)?;
            Ok(flows + flows6)
        }
        Backend::Iptables | Backend::Nft => {
            let chosen = flows::iptables_select(fallback::conntrack_list(), &state.rules(), filter);
            fallback::conntrack_delete(&chosen)
        }
    }
}

/// `pfwd detach`: removes every program, pin, chain and setting of the instance and restores the sysctls.
pub fn detach() -> Result<Vec<String>> {
    let lock = open()?;
    let Some(mut state) = lock.load()? else {
        return detach_without_state(&lock);
    };
    let mut notes = vec![format!(
        "detached from {} ({} mode)",
        state.interfaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", "),
        state.mode
    )];
    if let Some(p) = state.pending {
        let what = match p {
            Pending::Create => "an interrupted attach",
            Pending::Change => "an interrupted rule change",
            Pending::Remove => "an interrupted detach",
        };
        notes.push(format!("(finishing after {what})"));
    }
    notes.extend(remove_instance(&lock, &mut state)?);
    Ok(notes)
}

/// `pfwd detach` with no state for this namespace: removes whatever pfwd may have left without recording it (pins
/// of this namespace, pfwd's PFWD-* chains and the jumps into them). Sysctls are restored only from a record, and
/// there is none: they are left as they are, and the notes say so.
fn detach_without_state(lock: &Lock) -> Result<Vec<String>> {
    let kernel = Kernel::new(&lock.inst);
    let mut notes = vec![];
    // What the data path's record says must be undone besides removing it (read before it goes with the data path).
    let mut record: Option<Record> = None;
    if kernel.pin_dir().exists() {
        record = kernel.read_record();
        kernel.unload()?;
        notes.push("removed pfwd's pins (no state file: found in bpffs)".to_string());
    }
    if fallback::leftovers() {
        let rec = fallback::read_record();
        fallback::unload(rec.as_ref().map(|r| r.created_tables.as_slice()).unwrap_or_default())?;
        notes.push(
            "removed pfwd's PFWD-* iptables chains and the jumps into them (no state file: found in iptables)".into(),
        );
        record = record.or(rec);
    }
    if nftables::leftovers() {
        let rec = nftables::read_record();
        nftables::unload()?;
        notes
            .push(format!("removed pfwd's nftables table inet {} (no state file: found in nftables)", nftables::TABLE));
        record = record.or(rec);
    }
    let _ = lock.remove_state();
    if notes.is_empty() {
        return Ok(vec!["pfwd is not attached in this network namespace; nothing to do".into()]);
    }
    match record {
        Some(rec) => notes.extend(sysctl::restore_all(&rec.saved_sysctls())),
        None => notes.push(
            "no state and no record were found, so the earlier values of any sysctls pfwd changed \
             (net.ipv4.ip_forward, route_localnet) are unknown: they were left as they are"
                .into(),
        ),
    }
    Ok(notes)
}

/// Sets the logging bits of `Config::flags` (for `pfwd run`), keeping the others.
pub fn set_log_flags(flags: u32) -> Result<()> {
    use pfwd_common::config_flag::{LOG_EVENTS, LOG_PACKETS};
    let lock = open()?;
    let kernel = Kernel::new(&lock.inst);
    lock.load()?.context(NOT_ATTACHED)?;
    let mut cfg = kernel.config()?;
    cfg.flags = (cfg.flags & !(LOG_EVENTS | LOG_PACKETS)) | (flags & (LOG_EVENTS | LOG_PACKETS));
    kernel.set_config(&cfg)
}

/// `pfwd list`: the current rules, or an empty list when not attached.
pub fn list() -> Result<Vec<RuleReport>> {
    let lock = open()?;
    Ok(lock.load()?.map(|s| s.rules.iter().map(|r| RuleReport::from(&r.rule)).collect()).unwrap_or_default())
}

/// `pfwd status`: mode, interfaces, rules with counters, conntrack, global counters and the sysctls pfwd changed.
pub fn status() -> Result<Status> {
    let lock = open()?;
    let Some(state) = lock.load()? else {
        return Ok(Status::NotAttached);
    };
    let rule_status = |s: &StoredRule, counters: report::Counters| RuleStatus {
        rule: RuleReport::from(&s.rule),
        counters,
        backend_counters: Vec::new(),
    };
    let read = || -> Result<_> {
        let backend = Backend::of(&state, &lock.inst);
        Ok(match &backend {
            Backend::Ebpf(kernel) => {
                let cfg = kernel.config()?;
                let counters = kernel.rule_counters(&state.rules.iter().map(|s| s.slot).collect::<Vec<u32>>())?;
                let rules = state
                    .rules
                    .iter()
                    .zip(counters)
                    .map(|(s, c)| {
                        let mut st = rule_status(s, c.into());
                        if !s.rule.backends.is_empty() {
                            // Keyed by the translated destination: with backends that keep the original port, by
                            // each port the flows came to (summed by the merge).
                            let keep_port = s.rule.backends[0].port.is_none();
                            let counted: Vec<_> = kernel
                                .backend_counters(s.slot)?
                                .into_iter()
                                .map(|(a, p, c)| {
                                    let addr = if s.rule.family() == Some(Family::Ipv6) {
                                        crate::loader::CtFamily::ip(&a)
                                    } else {
                                        crate::loader::CtFamily::ip(&a[0])
                                    };
                                    (addr, (!keep_port).then_some(p), c.into())
                                })
                                .collect();
                            st.backend_counters = report::BackendStatus::merge(&s.rule.backends, &counted);
                        }
                        Ok(st)
                    })
                    .collect::<Result<_>>()?;
                let now = crate::clock::now_ns(&cfg);
                // Both families' tables (each family has tables of the same size): (confirmed, direction).
                let (ct4, ct6) = (kernel.conntrack::<u32>()?, kernel.conntrack::<pfwd_common::Addr6>()?);
                let live: Vec<(bool, u8)> = (ct4.iter().map(|(_, e)| (e.expired(now, &cfg), e.is_confirmed(), e.dir)))
                    .chain(ct6.iter().map(|(_, e)| (e.expired(now, &cfg), e.is_confirmed(), e.dir)))
                    .filter(|(expired, _, _)| !expired)
                    .map(|(_, confirmed, dir)| (confirmed, dir))
                    .collect();
                let (confirmed_capacity, unconfirmed_capacity) = kernel.conntrack_capacity()?;
                let table = |confirmed: bool, capacity: u32| {
                    let entries = live.iter().filter(|(c, _)| *c == confirmed);
                    report::CtTable {
                        capacity,
                        entries: entries.clone().count() as u64,
                        flows: entries.filter(|(_, d)| *d == dir::ORIGINAL).count() as u64,
                    }
                };
                let (confirmed, unconfirmed) = (table(true, confirmed_capacity), table(false, unconfirmed_capacity));
                let memory = kernel.map_memory()?;
                use pfwd_common::names::{CONNTRACK, CONNTRACK_NEW, CONNTRACK6, CONNTRACK6_NEW};
                let ct_maps = [CONNTRACK, CONNTRACK_NEW, CONNTRACK6, CONNTRACK6_NEW];
                let ct_memory: Vec<u64> =
                    memory.iter().filter(|(n, _)| ct_maps.contains(&n.as_str())).map(|(_, b)| *b).collect();
                let conntrack = ConntrackSummary::Ebpf(EbpfConntrack {
                    capacity: confirmed_capacity,
                    entries: confirmed.entries + unconfirmed.entries,
                    flows: confirmed.flows + unconfirmed.flows,
                    confirmed,
                    unconfirmed,
                    maps_memory_bytes: memory.iter().map(|(_, b)| *b).sum(),
                    memory_bytes: (ct_memory.len() >= 2).then(|| ct_memory.iter().sum()),
                    timeouts_s: (&cfg).into(),
                });
                let stats = kernel.stats()?.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                let set = cfg.active();
                // An instance attached by an older pfwd has no index to show.
                let engine = kernel.index_keys().ok().map(|(index_keys, index4_keys)| report::RuleEngine {
                    generation: set.generation,
                    classes: report::HookClasses {
                        prerouting: set.counts.pre,
                        postrouting: set.counts.post,
                        output: set.counts.local,
                    },
                    max_classes: pfwd_common::MAX_CLASSES,
                    index_keys,
                    index4_keys,
                });
                let l4 = if cfg.flags & pfwd_common::config_flag::L4_CSUM_BY_HAND != 0 {
                    report::L4Checksums::ByHandWhereSafe
                } else {
                    report::L4Checksums::Helper
                };
                (rules, conntrack, stats, (cfg.flags & pfwd_common::config_flag::FAST_FORWARD != 0, Some(l4)), engine)
            }
            Backend::Iptables | Backend::Nft => {
                let (counters, per_backend) = match backend {
                    Backend::Nft => (nftables::counters()?, nftables::backend_counters(&state.rules())?),
                    _ => (fallback::counters()?, fallback::backend_counters()?),
                };
                let counters: HashMap<u32, pfwd_common::RuleCounters> = counters.into_iter().collect();
                let rules = state
                    .rules
                    .iter()
                    .map(|s| {
                        let c = counters.get(&s.rule.id).copied().unwrap_or_default();
                        let mut st = rule_status(s, c.into());
                        if !s.rule.backends.is_empty() {
                            let counted: Vec<_> = per_backend
                                .iter()
                                .filter(|(id, ..)| *id == s.rule.id)
                                .map(|&(_, a, p, c)| (a, p, c.into()))
                                .collect();
                            st.backend_counters = report::BackendStatus::merge(&s.rule.backends, &counted);
                        }
                        st
                    })
                    .collect();
                let conntrack = ConntrackSummary::Netfilter(NetfilterConntrack {
                    capacity: std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok()),
                    entries: fallback::conntrack_count(),
                    flows: fallback::dnat_flows(),
                    note: NetfilterConntrack::NOTE,
                });
                (rules, conntrack, Default::default(), (false, None), None)
            }
        })
    };
    let (rules, conntrack, stats, (fast_forward, l4_checksums), rule_engine) = match (read(), state.pending) {
        (Ok(r), _) => r,
        // An interrupted change may have left no data path to read (e.g. no pins yet): show the state, no counters.
        (Err(_), Some(_)) => {
            let rules = state.rules.iter().map(|s| rule_status(s, Default::default())).collect();
            let conntrack = match state.mode {
                DataPath::Ebpf => ConntrackSummary::Ebpf(EbpfConntrack {
                    capacity: 0,
                    entries: 0,
                    flows: 0,
                    confirmed: Default::default(),
                    unconfirmed: Default::default(),
                    maps_memory_bytes: 0,
                    memory_bytes: None,
                    timeouts_s: (&Config::default()).into(),
                }),
                DataPath::Iptables | DataPath::Nft => ConntrackSummary::Netfilter(NetfilterConntrack {
                    capacity: None,
                    entries: fallback::conntrack_count(),
                    flows: None,
                    note: NetfilterConntrack::NOTE,
                }),
            };
            (rules, conntrack, Default::default(), (false, None), None)
        }
        (Err(e), None) => return Err(e),
    };
    // A change killed after writing ahead of its state left the kernel's mark (see `Kernel::stage`).
    let abandoned = || match Backend::of(&state, &lock.inst) {
        Backend::Ebpf(kernel) => kernel.config().is_ok_and(|c| c.flags & pfwd_common::config_flag::STAGED != 0),
        _ => false,
    };
    Ok(Status::Attached(Box::new(InstanceStatus {
        interrupted: state
            .pending
            .map(|p| p.describe().to_string())
            .or_else(|| abandoned().then(|| ABANDONED_CHANGE.to_string())),
        conntrack,
        fast_forward,
        l4_checksums,
        interfaces: state
            .interfaces
            .iter()
            .map(|i| InterfaceStatus {
                address: netif::primary_ipv4(&i.name),
                address6: netif::primary_ipv6(&i.name),
                ifindex: i.ifindex,
                link_type: netif::link_type(&i.name).ok().map(|t| t.name()),
                name: i.name.clone(),
                // What the kernel says now, where pfwd put the fast path.
                xdp: i.xdp.and_then(|_| netif::xdp_attached(&i.name).ok().flatten()),
            })
            .collect(),
        mode: state.mode,
        mode_reason: state.meta.mode_reason,
        netns: Netns { cookie: state.meta.netns_cookie, inode: lock.inst.netns_inode },
        pin_dir: (state.meta.mode == DataPath::Ebpf).then(|| lock.inst.pin_dir.clone()),
        rules,
        rule_engine,
        stats,
        sysctls: state.meta.sysctls,
    })))
}

/// eBPF mode: the live flows of one family's conntrack `entries`, as `pfwd conntrack` lists them, onto `out`. `ids`:
/// each slot's rule id.
fn ebpf_flows<A: crate::loader::CtFamily>(
    entries: &[(pfwd_common::FlowTuple<A>, pfwd_common::CtEntryOf<A>)],
    ids: &HashMap<u32, u32>,
    (now, cfg): (u64, &Config),
    out: &mut Vec<ConntrackEntry>,
) {
    for (key, e) in entries {
        if e.dir != dir::ORIGINAL || e.expired(now, cfg) {
            continue;
        }
        let rule = ids.get(&pfwd_common::owner_slot(e.rule_slot)).copied();
        let nat = if e.hook == pfwd_common::ct_hook::INGRESS { Nat::Dnat } else { Nat::Snat };
        let st = if e.xlat.proto == pfwd_common::PROTO_TCP {
            tcp_state_name(e)
        } else if e.state & pfwd_common::ct_state::SEEN_REPLY != 0 {
            "REPLIED"
        } else {
            "UNREPLIED"
        };
        let secs = |ns: u64| ns as f64 / 1e9;
        out.push(ConntrackEntry {
            age_s: Some(secs(now.saturating_sub(u64::from(e.created_s) * 1_000_000_000))),
            expires_in_s: Some(secs((e.last_seen_ns + e.timeout_ns(cfg)).saturating_sub(now))),
            idle_s: Some(secs(now.saturating_sub(e.last_seen_ns))),
            nat,
            original: FlowTuple::from(key),
            proto: report::proto_name(e.xlat.proto),
            reply: FlowTuple::from(&e.xlat.reversed()),
            rule,
            state: Some(st.to_string()),
            translated: FlowTuple::from(&e.xlat),
        });
    }
}

fn tcp_state_name<A: pfwd_common::Addr>(e: &pfwd_common::CtEntryOf<A>) -> &'static str {
    use pfwd_common::ct_state::*;
    if e.state & RST != 0 {
        "CLOSE (reset)"
    } else if e.is_closed() {
        "CLOSE"
    } else if e.state & (FIN_ORIGINAL | FIN_REPLY) != 0 {
        "FIN_WAIT"
    } else if e.is_confirmed() {
        "ESTABLISHED"
    } else if e.state & SEEN_REPLY != 0 {
        // The SYN-ACK was seen, not yet the client's ACK (netfilter's name for it).
        "SYN_RECV"
    } else {
        "SYN_SENT"
    }
}

/// `pfwd conntrack`: the live translations, like `conntrack -L`: per flow, the original tuple as it arrived, the
/// tuple it was translated to, the reply tuple expected back, the rule, age, idle time and state.
pub fn conntrack_list() -> Result<Vec<ConntrackEntry>> {
    let lock = open()?;
    let state = lock.load()?.context(NOT_ATTACHED)?;
    match Backend::of(&state, &lock.inst) {
        Backend::Ebpf(kernel) => {
            let cfg = kernel.config()?;
            let now = crate::clock::now_ns(&cfg);
            let mut out = vec![];
            let ids = rule_ids_by_slot(&state);
            ebpf_flows(&kernel.conntrack::<u32>()?, &ids, (now, &cfg), &mut out);
            ebpf_flows(&kernel.conntrack::<pfwd_common::Addr6>()?, &ids, (now, &cfg), &mut out);
            Ok(out)
        }
        // netfilter does not record the rule: name the pfwd rule that explains each translation (see flows::rule_of).
        Backend::Iptables | Backend::Nft => {
            let rules = state.rules();
            Ok(fallback::conntrack_list()
                .into_iter()
                .map(|mut e| {
                    e.rule = flows::rule_of(&e, &rules).first().copied();
                    e
                })
                .collect())
        }
    }
}
