//! The real programs, through BPF_PROG_TEST_RUN: a private pfwd instance pinned under `/sys/fs/bpf/pfwd-fuzz-*`,
//! with lo (ifindex 1, 10.0.1.1 and 2001:db8:1::1) as its only interface, as in the packet tests' fixture. Nothing
//! is attached to any interface: test runs only. The pins are removed when the instance is dropped, also on panic.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap, Map, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use pfwd::loader::Kernel;
use pfwd::rules::Rule;
use pfwd::rules::delta::{ClassKeys, Member, class_keys, hidden_members};
use pfwd::state::StoredRule;
use pfwd_common::{Addr6, Config, FragEntry, FragKey, IndexKey, names};

use crate::model::rules::{IFACE, IFACE_ADDR, IFACE_ADDR6};
use crate::model::{FragCounters, Hook};

pub const LO: u32 = 1;
static INSTANCES: AtomicU32 = AtomicU32::new(0);

/// Unloads the programs and removes the pin directory when dropped.
struct Pins(Kernel);

impl Drop for Pins {
    fn drop(&mut self) {
        let dir = self.0.pin_dir().to_path_buf();
        if let Err(e) = self.0.unload() {
            eprintln!("unloading {}: {e:#}", dir.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[derive(Default)]
struct Kept {
    classes: Vec<ClassKeys>,
    hidden: std::collections::HashMap<IndexKey, Vec<Member>>,
}

pub struct Instance {
    ingress: SchedClassifier,
    egress: SchedClassifier,
    /// The fragment table (PFWD_FRAGS), emptied with conntrack on every reset.
    frags: HashMap<MapData, FragKey, FragEntry>,
    /// The rules the kernel holds, and how many rule sets it was given: most changes write only what changes from
    /// the held rules (as `pfwd add`/`del` do), half of them the small way (compiling only the changed rules, as
    /// `pfwd add`/`del` do), every eighth reads the held rules back from the maps (as after an interrupted change).
    held: Vec<StoredRule>,
    syncs: u64,
    /// How many of them went the small way.
    small: u64,
    /// What a small change needs about the held rules (as pfwd keeps it with its state): each class with its key
    /// count, and each key's rules behind its kernel entry.
    kept: Kept,
    pins: Pins,
    /// Whether packets come in skbs marked CHECKSUM_COMPLETE (Linux 6.16+), whose sum the kernel checks after each
    /// run (`pfwd::testrun`): every other packet (see `run`).
    pub complete: bool,
    /// How many packets were run.
    runs: std::cell::Cell<u64>,
}

/// The result of one test run; `data` is the output frame (valid up to `len`).
pub struct Out {
    pub ret: u32,
    pub len: usize,
}

fn lo_index(name: &str) -> Option<u32> {
    (name == IFACE).then_some(LO)
}

/// Slot of a rule in the kernel's rule array (its id plus an offset, so slots and positions differ).
fn slot(id: u32) -> u32 {
    100 + id
}

impl Instance {
    /// Loads a private instance with a conntrack table of `ct_entries` and idle timeouts long enough that nothing
    /// expires during a run (the model has no clock).
    pub fn new(ct_entries: u32) -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("pfwd-fuzz loads eBPF programs and needs root (cargo xtask fuzz runs it through sudo)");
        }
        pfwd::instance::ensure_bpffs().context("bpffs at /sys/fs/bpf")?;
        // The tc ingress program hands what it found about a packet to the egress program through a per-CPU slot
        // (pfwd-ebpf/src/handoff.rs), as forwarding runs both on one CPU; the model predicts that handoff, so the
        // test runs of one send must share a CPU too: this thread stays on the one it runs on.
        let cpu = nix::sched::sched_getcpu().context("sched_getcpu")?;
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).context("CPU set")?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).context("sched_setaffinity")?;
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/sys/fs/bpf/pfwd-fuzz-{}-{n}", std::process::id()));
        let pins = Pins(Kernel::at(dir.clone()));
        let day = 24 * 3600;
        let cfg = Config {
            tcp_syn_timeout: day,
            tcp_established_timeout: day,
            tcp_close_timeout: day,
            udp_timeout: day,
            other_timeout: day,
            ..Config::default()
        };
        pins.0.load(ct_entries, &cfg).context("loading the eBPF programs")?;
        pins.0.set_iface(LO, Some(IFACE_ADDR), Some(IFACE_ADDR6), None).context("registering lo")?;
        // This host's addresses, for `-d local`: lo's (the model's IFACE_ADDR and IFACE_ADDR6).
        pins.0.set_local_addrs(&[IFACE_ADDR.into(), IFACE_ADDR6.into()]).context("setting local addresses")?;
        let ingress = SchedClassifier::from_pin(dir.join("prog_ingress")).context("pinned ingress program")?;
        let egress = SchedClassifier::from_pin(dir.join("prog_egress")).context("pinned egress program")?;
        let frags = MapData::from_pin(dir.join(names::FRAGS)).context("pinned fragment table")?;
        let frags = HashMap::try_from(Map::LruHashMap(frags)).context("fragment table type")?;
        let complete = pfwd::testrun::supported(&ingress);
        Ok(Self {
            ingress,
            egress,
            frags,
            pins,
            held: Vec::new(),
            syncs: 0,
            small: 0,
            kept: Kept::default(),
            complete,
            runs: Default::default(),
        })
    }

    /// Replaces the rules and empties the conntrack and fragment tables: a fresh start for the next rule set.
    ///
    /// The fragment table forgets a datagram after 5 s (FRAG_TIMEOUT_NS) or when 16,384 newer ones push it out; the
    /// model has neither clock nor LRU. Emptying it here keeps every run far inside both limits: a run between resets
    /// (an episode of fewer than 400 sends through at most two hooks each, or a replay of one) makes fewer than 800
    /// test runs in some milliseconds, and each test run remembers at most one datagram.
    pub fn reset(&mut self, rules: &[Rule]) -> Result<()> {
        self.set_rules(rules)?;
        let k = &self.pins.0;
        let keys: Vec<_> = k.conntrack::<u32>()?.into_iter().map(|(t, _)| t).collect();
        k.conntrack_delete(&keys)?;
        let keys6: Vec<_> = k.conntrack::<Addr6>()?.into_iter().map(|(t, _)| t).collect();
        k.conntrack_delete(&keys6)?;
        if !k.conntrack::<u32>()?.is_empty() || !k.conntrack::<Addr6>()?.is_empty() {
            bail!("conntrack tables not empty after clearing");
        }
        let keys: Vec<FragKey> = self.frags.keys().collect::<Result<_, _>>().context("listing PFWD_FRAGS")?;
        for key in &keys {
            self.frags.remove(key).context("emptying PFWD_FRAGS")?;
        }
        if self.frags.keys().next().is_some() {
            bail!("fragment table not empty after clearing");
        }
        Ok(())
    }

    /// Replaces the rules and keeps every flow: a rule change in the middle of a stream.
    pub fn set_rules(&mut self, rules: &[Rule]) -> Result<()> {
        let stored: Vec<StoredRule> = rules.iter().map(|r| StoredRule { rule: r.clone(), slot: slot(r.id) }).collect();
        self.syncs += 1;
        let held = std::mem::replace(&mut self.held, stored);
        if self.syncs % 2 == 1 && self.small_change(&held)? {
            return Ok(());
        }
        let previous = (!self.syncs.is_multiple_of(8)).then_some(&held[..]);
        self.pins.0.sync_rules(previous, &self.held, &lo_index).context("sync_rules")?;
        let compiled = pfwd::loader::compile_stored(&self.held, &lo_index)?;
        self.kept = Kept { classes: class_keys(&compiled), hidden: hidden_members(&compiled).into_iter().collect() };
        Ok(())
    }

    /// Changes the kernel's rules from `held` to `self.held` the small way, when it can (false: it wrote nothing).
    fn small_change(&mut self, held: &[StoredRule]) -> Result<bool> {
        let removed: Vec<StoredRule> = held.iter().filter(|r| !self.held.contains(r)).cloned().collect();
        let added: Vec<StoredRule> = self.held.iter().filter(|r| !held.contains(r)).cloned().collect();
        let k = &self.pins.0;
        let reader = k.index_reader()?;
        let kept = &self.kept;
        let Some(small) = k.plan_small(&reader, &removed, &added, &kept.classes, &kept.hidden, &lo_index)? else {
            return Ok(false);
        };
        self.kept.classes = small.classes.clone();
        for (key, members) in &small.hidden {
            if members.is_empty() {
                self.kept.hidden.remove(key);
            } else {
                self.kept.hidden.insert(*key, members.clone());
            }
        }
        k.apply_small(small).context("a small change")?;
        self.small += 1;
        Ok(true)
    }

    /// How many rule changes the kernel was given, and how many of them went the small way.
    pub fn rule_changes(&self) -> (u64, u64) {
        (self.syncs, self.small)
    }

    /// The kernel's fragment counters (they are never reset: compare differences).
    pub fn frag_counters(&self) -> Result<FragCounters> {
        let stats = self.pins.0.stats().context("reading PFWD_STATS")?;
        let get = |name: &str| stats.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).context(name.to_string());
        Ok(FragCounters {
            translated: get("fragments_translated")?,
            unknown_drops: get("fragments_unknown_drops")?,
            passed: get("fragments_passed")?,
        })
    }

    /// Runs `frame` through the program of `hook`; the output frame goes to `out` (at least 2048 bytes). With
    /// CHECKSUM_COMPLETE skbs, `EBADMSG` says the program left skb->csum wrong.
    pub fn run(&self, hook: Hook, frame: &[u8], out: &mut [u8]) -> std::io::Result<Out> {
        let prog = match hook {
            Hook::Ingress => &self.ingress,
            Hook::Egress => &self.egress,
        };
        // Packets alternate between CHECKSUM_COMPLETE skbs (L4 checksums through the helper) and CHECKSUM_NONE ones
        // (updated by hand: `pfwd-ebpf/src/csum_state.rs`), so both ways meet every kind of packet.
        let n = self.runs.get();
        self.runs.set(n + 1);
        if self.complete && n.is_multiple_of(2) {
            let r = pfwd::testrun::run_complete(prog, frame, out)?;
            return Ok(Out { ret: r.retval, len: r.len });
        }
        let r = prog
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(out), ..Default::default() })
            .map_err(std::io::Error::other)?;
        Ok(Out { ret: r.return_value, len: r.data_size_out as usize })
    }
}
