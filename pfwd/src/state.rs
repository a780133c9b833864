//! The controller's persistent state: the rules with their ids and map slots, the attached interfaces, the sysctls
//! pfwd changed (with their earlier values), and the data path with why it was chosen; kept by [`crate::store`]
//! (the rules one by one, the rest as one [`Meta`]).
//! Every command takes an exclusive lock on the instance while it reads and writes this, so concurrent commands
//! serialize.
//!
//! Crash safety: a change records its intent first. The state is saved with a [`Pending`] marker, the rules,
//! interfaces and tables it is about to apply, and the earlier values of the sysctls it is about to change, before the
//! kernel or iptables is touched (one transaction); the marker is cleared once the change is applied. So the state file is never older
//! than what was applied: a `kill -9` at any point leaves a state that `status` reports as interrupted, `detach`
//! removes completely, and `attach` repairs. The lock is also inherited by the tools pfwd runs (iptables-restore, ...):
//! a tool that outlives a killed pfwd keeps the instance locked until it ends, so the next command never races it.
use std::{
    cell::RefCell,
    collections::HashMap,
    fs::{self, File, OpenOptions},
    ops::{Deref, DerefMut},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
    rc::Rc,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    instance::Instance,
    rules::Rule,
    rules::delta::{ClassKeys, Member},
    store::{Store, Write},
};
use pfwd_common::maps::IndexKey;

/// The data path an instance runs on, chosen at attach (`--mode auto|ebpf|iptables` picks it) and fixed until detach.
/// Serialized as "ebpf" or "iptables", in `state.json` and in `pfwd status --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// TC (tcx) programs with BPF-map connection tracking.
    Ebpf,
    /// iptables NAT rules in pfwd's own chains, with netfilter's conntrack.
    Iptables,
    /// nftables NAT rules in pfwd's own table (`inet pfwd_nat`), with netfilter's conntrack.
    Nft,
}

impl DataPath {
    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Ebpf => "ebpf",
            DataPath::Iptables => "iptables",
            DataPath::Nft => "nft",
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
    /// The XDP fast path on this interface (`attach --xdp`) and the mode it runs in; absent without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp: Option<crate::loader::XdpRun>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredRule {
    #[serde(flatten)]
    pub rule: Rule,
    /// Index in the kernel's rule array (stable for the rule's life, so updates never renumber live rules).
    pub slot: u32,
}

/// Everything about an instance but its rules (stored one by one).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub netns_cookie: u64,
    pub mode: DataPath,
    /// Why this mode was chosen.
    pub mode_reason: String,
    pub interfaces: Vec<AttachedIface>,
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
    /// eBPF mode: what a small change needs to know about all the rules (None: the next change works it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived: Option<Derived>,
}

/// Facts about all the rules that a small change (`pfwd add`, `pfwd del`) needs and the kernel does not hold, kept
/// up to date by every change so that a small one never reads every rule (see [`crate::rules::delta`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Derived {
    /// Every class of the kernel's rule index with its key count.
    pub classes: Vec<ClassKeys>,
    /// Each sysctl the rules want (`sysctl::wanted`), with how many rules want it.
    pub sysctls: Vec<(String, u32)>,
    /// How many rules have several backends (they are capped: `MAX_BACKEND_RULES` Maglev tables).
    #[serde(default)]
    pub backend_rules: u32,
    /// This host's IPv4 addresses when the sysctl counts were made (sorted): whether a DNAT rule needs forwarding
    /// depends on them, so a small change with other addresses now goes the full way.
    #[serde(default)]
    pub locals: Vec<std::net::IpAddr>,
    /// The index keys with rules their kernel entry does not list (behind an unconditional rule of the key): the
    /// key's bytes and its hidden [`Member`]s ([`Member::encode`]). Usually none.
    #[serde(default)]
    pub hidden: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Derived {
    /// The hidden members by key.
    pub fn hidden(&self) -> HashMap<IndexKey, Vec<Member>> {
        self.hidden
            .iter()
            .filter_map(|(k, m)| Some((bytemuck::try_pod_read_unaligned::<IndexKey>(k).ok()?, Member::decode(m))))
            .collect()
    }

    /// Sets the hidden members (keys without any are left out).
    pub fn set_hidden(&mut self, hidden: impl IntoIterator<Item = (IndexKey, Vec<Member>)>) {
        self.hidden = hidden
            .into_iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(k, m)| (bytemuck::bytes_of(&k).to_vec(), Member::encode(&m)))
            .collect();
        // The same state, the same bytes.
        self.hidden.sort_unstable();
    }
}

/// An instance's state: its [`Meta`] and every rule. Reads of the meta go through (`state.interfaces`, ...).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    #[serde(flatten)]
    pub meta: Meta,
    pub rules: Vec<StoredRule>,
}

impl Deref for State {
    type Target = Meta;
    fn deref(&self) -> &Meta {
        &self.meta
    }
}

impl DerefMut for State {
    fn deref_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
}

impl State {
    pub fn new(cookie: u64, mode: DataPath, reason: &str) -> Self {
        Self {
            meta: Meta {
                netns_cookie: cookie,
                mode,
                mode_reason: reason.into(),
                interfaces: vec![],
                next_id: 1,
                next_slot: 0,
                sysctls: vec![],
                created_tables: vec![],
                cgroup: None,
                pending: None,
                derived: None,
            },
            rules: vec![],
        }
    }

    pub fn rules(&self) -> Vec<Rule> {
        self.rules.iter().map(|r| r.rule.clone()).collect()
    }
}

/// An exclusive lock on the instance's state directory, held for the duration of one command, and the instance's
/// [`Store`] (opened once, under the lock: redb allows one process at a time).
pub struct Lock {
    // Declared first, so it is closed before the lock is released.
    store: RefCell<Option<Rc<Store>>>,
    _file: File,
    pub inst: Instance,
}

/// A namespace without an instance leaves no lock file behind. It is removed while still held, at the end of the
/// command: a waiter that then gets it sees it gone and takes a new one ([`Lock::acquire`]).
impl Drop for Lock {
    fn drop(&mut self) {
        if !self.inst.state_dir.exists()
            && let Ok(path) = Self::path(&self.inst)
        {
            let _ = fs::remove_file(path);
        }
    }
}

impl Lock {
    pub fn acquire(inst: &Instance) -> Result<Self> {
        // One lock file per namespace, beside (not in) its state directory, which only exists while an instance
        // does: commands in different namespaces never wait for each other (a test suite runs dozens at once).
        let path = Self::path(inst)?;
        let root = path.parent().context("state directory has no parent")?;
        fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        loop {
            let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
            // SAFETY: valid fd; flock blocks until the other command finishes.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(std::io::Error::last_os_error()).context("locking pfwd state");
            }
            // The holder before us may have removed the file (its instance went away, [`Lock::remove_state`]): a
            // lock on a removed file locks nothing another command would see. Take the one at the path now.
            let held = file.metadata()?.ino();
            if fs::metadata(&path).ok().map(|m| m.ino()) != Some(held) {
                continue;
            }
            // The tools pfwd runs inherit the lock (a flock belongs to the open file, shared by every process that
            // has it): when pfwd is killed while iptables-restore still applies its rules, the next command waits
            // for iptables-restore to end instead of reading iptables half-way through.
            // SAFETY: valid fd; clearing FD_CLOEXEC only makes it survive exec.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("sharing the pfwd state lock with child processes");
            }
            return Ok(Self { store: RefCell::new(None), _file: file, inst: inst.clone() });
        }
    }

    /// `/run/pfwd/net-<inode>.lock` for the state directory `/run/pfwd/net-<inode>`.
    fn path(inst: &Instance) -> Result<PathBuf> {
        let name = inst.state_dir.file_name().context("state directory has no name")?;
        Ok(inst.state_dir.with_file_name(format!("{}.lock", name.to_string_lossy())))
    }

    /// The instance's store, or None when there is none (no instance attached). A `state.json` left by an older
    /// pfwd is moved into a new store first.
    fn existing_store(&self) -> Result<Option<Rc<Store>>> {
        if let Some(s) = &*self.store.borrow() {
            return Ok(Some(s.clone()));
        }
        let path = self.inst.store_file();
        if path.exists() {
            return Ok(Some(self.store_or_create()?));
        }
        let legacy = self.inst.state_dir.join("state.json");
        let text = match fs::read_to_string(&legacy) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", legacy.display())),
        };
        let state: State = serde_json::from_str(&text).with_context(|| format!("{} is corrupt", legacy.display()))?;
        // Built aside and renamed into place once committed: a store only ever exists whole, and until then the old
        // file is the state.
        let aside = path.with_extension("redb.new");
        let _ = fs::remove_file(&aside);
        Store::open(&aside)?.write(&state.meta, &Write { added: &state.rules, replace: true, ..Default::default() })?;
        fs::rename(&aside, &path).with_context(|| format!("moving {} into place", aside.display()))?;
        fs::remove_file(&legacy).with_context(|| format!("removing {}", legacy.display()))?;
        Ok(Some(self.store_or_create()?))
    }

    fn store_or_create(&self) -> Result<Rc<Store>> {
        if let Some(s) = &*self.store.borrow() {
            return Ok(s.clone());
        }
        fs::create_dir_all(&self.inst.state_dir)
            .with_context(|| format!("creating {}", self.inst.state_dir.display()))?;
        let store = Rc::new(Store::open(&self.inst.store_file())?);
        *self.store.borrow_mut() = Some(store.clone());
        Ok(store)
    }

    /// Removes the instance's state directory (the store with it; a later save starts a new one).
    pub fn remove_state(&self) -> Result<()> {
        self.store.borrow_mut().take();
        fs::remove_dir_all(&self.inst.state_dir).with_context(|| format!("removing {}", self.inst.state_dir.display()))
    }

    /// The meta of the instance attached in this namespace, with its store, or None when there is none. A state
    /// left by a dead namespace that had the same inode number (cookie mismatch) reads as None; the caller cleans
    /// its pins.
    pub fn load_meta(&self) -> Result<Option<(Meta, Rc<Store>)>> {
        let Some(store) = self.existing_store()? else { return Ok(None) };
        Ok(store.meta()?.filter(|m| m.netns_cookie == self.inst.netns_cookie).map(|m| (m, store)))
    }

    /// The whole state (every rule), or None as [`Lock::load_meta`].
    pub fn load(&self) -> Result<Option<State>> {
        let Some((meta, store)) = self.load_meta()? else { return Ok(None) };
        Ok(Some(State { meta, rules: store.rules()? }))
    }

    /// Saves `state` whole, replacing whatever was stored (attach; repairs).
    pub fn save(&self, state: &State) -> Result<()> {
        let w = Write { added: &state.rules, replace: true, ..Default::default() };
        self.store_or_create()?.write(&state.meta, &w)
    }

    /// Saves the meta only (the rules stay as stored).
    pub fn save_meta(&self, meta: &Meta) -> Result<()> {
        self.store_or_create()?.write(meta, &Write::default())
    }

    /// Saves `meta` and a change of rules in one transaction.
    pub fn save_change(&self, meta: &Meta, w: &Write) -> Result<()> {
        self.store_or_create()?.write(meta, w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary instance directory (removed on drop).
    struct TempInstance(Instance);

    impl TempInstance {
        fn new(name: &str) -> TempInstance {
            let root = std::env::temp_dir().join(format!("pfwd-state-test-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            TempInstance(Instance {
                netns_inode: 1,
                netns_cookie: 7,
                pin_dir: root.join("pins"),
                state_dir: root.join("net-1"),
            })
        }
    }

    impl Drop for TempInstance {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(self.0.state_dir.parent().unwrap());
        }
    }

    fn two_rules() -> Vec<StoredRule> {
        let rule = |id, s: &str| StoredRule { rule: Rule { id, ..crate::rules::tests::ok(s) }, slot: id + 10 };
        vec![rule(1, "dnat -p tcp --dport 80 --to 10.0.0.2"), rule(2, "masquerade -o eth0")]
    }

    /// A `state.json` left by an older pfwd is moved into the store whole, and is gone afterwards; a leftover of a
    /// move that was interrupted before its rename is ignored.
    #[test]
    fn a_legacy_state_file_moves_into_the_store() {
        let t = TempInstance::new("legacy");
        let mut st = State::new(7, DataPath::Ebpf, "test");
        st.rules = two_rules();
        st.next_id = 3;
        fs::create_dir_all(&t.0.state_dir).unwrap();
        fs::write(t.0.state_dir.join("state.json"), serde_json::to_vec(&st).unwrap()).unwrap();
        fs::write(t.0.state_dir.join("state.redb.new"), b"half a database").unwrap();
        {
            let lock = Lock::acquire(&t.0).unwrap();
            assert_eq!(lock.load().unwrap(), Some(st.clone()));
        }
        assert!(!t.0.state_dir.join("state.json").exists());
        assert!(!t.0.state_dir.join("state.redb.new").exists());
        let lock = Lock::acquire(&t.0).unwrap();
        assert_eq!(lock.load().unwrap(), Some(st));
    }

    /// A change writes what it changes: rules removed and added by id, the meta; a rule is found by id, by id range
    /// and as a duplicate (by match and target, whatever its comment or id); `replace` starts over.
    #[test]
    fn the_store_keeps_rules_by_id_and_finds_duplicates() {
        let t = TempInstance::new("store");
        let lock = Lock::acquire(&t.0).unwrap();
        assert_eq!(lock.load().unwrap(), None, "nothing attached yet");
        let mut st = State::new(7, DataPath::Ebpf, "test");
        st.rules = two_rules();
        lock.save(&st).unwrap();
        let (_, store) = lock.load_meta().unwrap().unwrap();
        let masq = Rule { id: 99, ..crate::rules::tests::ok("masquerade -o eth0") };
        assert_eq!(store.duplicate_of(&masq).unwrap(), Some(2));
        let other = crate::rules::tests::ok("masquerade -o eth1");
        assert_eq!(store.duplicate_of(&other).unwrap(), None);
        let added = StoredRule { rule: Rule { id: 3, ..other.clone() }, slot: 13 };
        let w = Write { removed: &st.rules[..1], added: std::slice::from_ref(&added), replace: false };
        lock.save_change(&st.meta, &w).unwrap();
        assert_eq!(store.rule(1).unwrap(), None);
        assert_eq!(store.rule(3).unwrap(), Some(added.clone()));
        assert_eq!(store.ids_in(0, 100).unwrap(), [2, 3]);
        assert_eq!(store.ids_in(3, 2).unwrap(), Vec::<u32>::new());
        assert_eq!(store.id_span().unwrap(), (2, Some((2, 3))));
        assert_eq!(store.duplicate_of(&other).unwrap(), Some(3));
        let dnat = crate::rules::tests::ok("dnat -p tcp --dport 80 --to 10.0.0.2");
        assert_eq!(store.duplicate_of(&dnat).unwrap(), None, "removed with its rule");
        lock.save(&State::new(7, DataPath::Ebpf, "test")).unwrap();
        assert_eq!(store.id_span().unwrap(), (0, None));
        assert_eq!(store.duplicate_of(&other).unwrap(), None);
        drop((store, lock));
        // Another namespace that reused the inode number (another cookie) sees no instance.
        let reused = Instance { netns_cookie: 8, ..t.0.clone() };
        assert_eq!(Lock::acquire(&reused).unwrap().load().unwrap(), None);
    }

    /// Namespaces lock apart; a lock file removed by its holder (no instance left) is not trusted by the command
    /// that waited on it: that one takes a new file, which the next command waits on.
    #[test]
    fn each_namespace_has_its_own_lock_and_a_removed_one_is_replaced() {
        let t = TempInstance::new("lock");
        let other = Instance { netns_inode: 2, state_dir: t.0.state_dir.with_file_name("net-2"), ..t.0.clone() };
        let first = Lock::acquire(&t.0).unwrap();
        // Would wait forever if both namespaces shared one lock.
        let _other = Lock::acquire(&other).unwrap();
        let path = Lock::path(&t.0).unwrap();
        assert!(path.exists());
        // A command that takes the lock, says so, and holds it until told to let go.
        let command = |inst: Instance| {
            let (got, got_rx) = std::sync::mpsc::channel();
            let (release, release_rx) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                let lock = Lock::acquire(&inst).unwrap();
                got.send(()).unwrap();
                let _ = release_rx.recv();
                drop(lock);
            });
            (got_rx, release, thread)
        };
        let waits = |got: &std::sync::mpsc::Receiver<()>| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            got.try_recv().is_err()
        };
        let (second_got, second_release, second) = command(t.0.clone());
        assert!(waits(&second_got), "the second command waits for the first");
        // No instance here: dropping the lock removes its file.
        drop(first);
        second_got.recv_timeout(std::time::Duration::from_secs(5)).expect("the second command got the lock");
        assert!(path.exists(), "the second command locks a new file at the path");
        let (third_got, third_release, third) = command(t.0.clone());
        assert!(waits(&third_got), "the third command waits for the second");
        // An instance keeps its lock file.
        fs::create_dir_all(&t.0.state_dir).unwrap();
        second_release.send(()).unwrap();
        third_got.recv_timeout(std::time::Duration::from_secs(5)).expect("the third command got the lock");
        third_release.send(()).unwrap();
        second.join().unwrap();
        third.join().unwrap();
        assert!(path.exists());
    }

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
