//! The controller's persistent state (`state.json`): the rules with their ids and map slots, the attached
//! interfaces, the sysctls pfwd changed (with their earlier values), and the data path with why it was chosen.
//! Every command takes an exclusive lock on the instance while it reads and writes this, so concurrent commands
//! serialize.
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
        f.write_all(serde_json::to_string_pretty(state)?.as_bytes())?;
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
}
