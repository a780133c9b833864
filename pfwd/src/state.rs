//! The controller's persistent state (`state.json`): the rules with their ids and map slots, the attached
//! interfaces, the sysctls pfwd changed (with their earlier values), and the data path with why it was chosen.
//! Every command takes an exclusive lock on the instance while it reads and writes this, so concurrent commands
//! serialize.
//!
//! Crash safety: a change records its intent first. The state is saved with a [`Pending`] marker, the rules,
//! interfaces and tables it is about to apply, and the earlier values of the sysctls it is about to change, before the
//! kernel or iptables is touched; the marker is cleared once the change is applied. So the state file is never older
//! than what was applied: a `kill -9` at any point leaves a state that `status` reports as interrupted, `detach`
//! removes completely, and `attach` repairs. The lock is also inherited by the tools pfwd runs (iptables-restore, ...):
//! a tool that outlives a killed pfwd keeps the instance locked until it ends, so the next command never races it.
use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::fd::AsRawFd,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{instance::Instance, rules::Rule};

/// The data path an instance runs on, chosen at attach (`--mode auto|ebpf|iptables` picks it) and fixed until detach.
/// Serialized as "ebpf" or "iptables", in `state.json` and in `pfwd status --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// TC (tcx) programs with BPF-map connection tracking.
    Ebpf,
    /// iptables NAT rules in pfwd's own chains, with netfilter's conntrack.
    Iptables,
}

impl DataPath {
    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Ebpf => "ebpf",
            DataPath::Iptables => "iptables",
        }
    }
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change that was started and not finished (the command was killed, or the machine stopped). The state around it
/// describes what the change was applying, which is at least everything it may have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pending {
    /// An `attach` that created the instance: programs, pins, chains and hooks may exist in part.
    Create,
    /// A change to an existing instance (`attach` to it, `add`, `del`, `flush`, `import`, `apply`): the rules may be
    /// the old ones, the new ones, or (eBPF) a mix.
    Change,
    /// A `detach`: the instance may be partly removed.
    Remove,
}

impl Pending {
    /// What `status` says about an instance left with this marker.
    pub fn describe(self) -> &'static str {
        match self {
            Pending::Create => {
                "an attach was interrupted before it finished: the instance may be partly set up (the rules shown \
                 are what it was applying); `pfwd attach` repairs it, `pfwd detach` removes it"
            }
            Pending::Change => {
                "a rule change was interrupted before it finished: the data path may hold the rules before or after \
                 it (the rules shown are what it was applying); the next change or `pfwd attach` applies them again"
            }
            Pending::Remove => {
                "a detach was interrupted before it finished: the instance may be partly removed; run `pfwd detach` \
                 again"
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SavedSysctl {
    /// Path under /proc/sys, e.g. `net/ipv4/conf/eth0/route_localnet`.
    pub key: String,
    /// Value before pfwd changed it.
    pub previous: String,
    /// Why pfwd changed it (shown by `status`).
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttachedIface {
    pub name: String,
    pub ifindex: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredRule {
    #[serde(flatten)]
    pub rule: Rule,
    /// Index in the kernel's rule array (stable for the rule's life, so updates never renumber live rules).
    pub slot: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub netns_cookie: u64,
    pub mode: DataPath,
    /// Why this mode was chosen.
    pub mode_reason: String,
    pub interfaces: Vec<AttachedIface>,
    pub rules: Vec<StoredRule>,
    pub next_id: u32,
    /// Next slot to try when allocating (round robin, so a freed slot is not reused at once).
    pub next_slot: u32,
    pub sysctls: Vec<SavedSysctl>,
    /// iptables mode: tables that did not exist before attach (removed again on detach).
    #[serde(default)]
    pub created_tables: Vec<String>,
    /// eBPF mode: the cgroup2 directory the `--local` socket hooks are attached to (None: no cgroup2 found).
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Set while a change is being applied (saved before acting, cleared after); see the module documentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
}

impl State {
    pub fn new(cookie: u64, mode: DataPath, reason: &str) -> Self {
        Self {
            netns_cookie: cookie,
            mode,
            mode_reason: reason.into(),
            interfaces: vec![],
            rules: vec![],
            next_id: 1,
            next_slot: 0,
            sysctls: vec![],
            created_tables: vec![],
            cgroup: None,
            pending: None,
        }
    }

    pub fn rules(&self) -> Vec<Rule> {
        self.rules.iter().map(|r| r.rule.clone()).collect()
    }
}

/// An exclusive lock on the instance's state directory, held for the duration of one command.
pub struct Lock {
    _file: File,
    pub inst: Instance,
}

impl Lock {
    pub fn acquire(inst: &Instance) -> Result<Self> {
        // One lock file for all namespaces, never removed (removing a lock file races with its waiters); the
        // state directory itself only exists while an instance does.
        let root = inst.state_dir.parent().context("state directory has no parent")?;
        fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let path = root.join(".lock");
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        // SAFETY: valid fd; flock blocks until the other command finishes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("locking pfwd state");
        }
        // The tools pfwd runs inherit the lock (a flock belongs to the open file, shared by every process that has
        // it): when pfwd is killed while iptables-restore still applies its rules, the next command waits for
        // iptables-restore to end instead of reading iptables half-way through.
        // SAFETY: valid fd; clearing FD_CLOEXEC only makes it survive exec.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sharing the pfwd state lock with child processes");
        }
        Ok(Self { _file: file, inst: inst.clone() })
    }

    /// The current state, or None when no instance is attached in this namespace. State left by a dead namespace
    /// that had the same inode number (cookie mismatch) reads as None; the caller cleans its pins.
    pub fn load(&self) -> Result<Option<State>> {
        let path = self.inst.state_file();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let state: State = serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
        Ok((state.netns_cookie == self.inst.netns_cookie).then_some(state))
    }

    pub fn save(&self, state: &State) -> Result<()> {
        fs::create_dir_all(&self.inst.state_dir)
            .with_context(|| format!("creating {}", self.inst.state_dir.display()))?;
        let path = self.inst.state_file();
        let tmp = path.with_extension("json.tmp");
        let mut f = File::create(&tmp)?;
        // Compact: the file is rewritten on every change, and with 100,000 rules pretty-printing doubles it.
        f.write_all(&serde_json::to_vec(state)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `state.json` and `status --json` spell the mode as they always have.
    #[test]
    fn data_path_serializes_as_before() {
        for (m, text) in [(DataPath::Ebpf, "\"ebpf\""), (DataPath::Iptables, "\"iptables\"")] {
            assert_eq!(serde_json::to_string(&m).unwrap(), text);
            assert_eq!(serde_json::from_str::<DataPath>(text).unwrap(), m);
            assert_eq!(format!("\"{m}\""), text);
        }
        assert!(serde_json::from_str::<DataPath>("\"auto\"").is_err());
    }

    /// A state file written before the pending marker existed reads as not pending; a finished change writes no
    /// marker, so older pfwd versions read the new files too.
    #[test]
    fn pending_marker_is_optional() {
        let mut st = State::new(7, DataPath::Iptables, "test");
        let text = serde_json::to_string(&st).unwrap();
        assert!(!text.contains("pending"), "{text}");
        assert_eq!(serde_json::from_str::<State>(&text).unwrap().pending, None);
        st.pending = Some(Pending::Create);
        let text = serde_json::to_string(&st).unwrap();
        assert!(text.contains("\"pending\":\"create\""), "{text}");
        assert_eq!(serde_json::from_str::<State>(&text).unwrap().pending, Some(Pending::Create));
    }
}
