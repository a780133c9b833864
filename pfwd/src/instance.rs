//! Where an instance keeps its state: one instance per network namespace.
//!
//! Pins live in `/sys/fs/bpf/pfwd/net-<inode>/` and the controller's state in `/run/pfwd/net-<inode>/`, where
//! `<inode>` identifies the network namespace the command runs in. Inode numbers can be reused after a namespace
//! is destroyed, so the state also records the namespace's cookie (never reused): a mismatch means the directory
//! belongs to a dead namespace and is cleaned up instead of being trusted.
use std::{
    fs,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

pub const BPFFS: &str = "/sys/fs/bpf";
const BPFFS_MAGIC: i64 = 0xcafe4a11;
/// Overrides the state directory root (default `/run/pfwd`).
pub const ENV_RUN_DIR: &str = "PFWD_RUN_DIR";

/// The identity and paths of the instance of the current network namespace.
#[derive(Debug, Clone)]
pub struct Instance {
    pub netns_inode: u64,
    pub netns_cookie: u64,
    /// bpffs directory holding this instance's pinned maps, programs and links.
    pub pin_dir: PathBuf,
    /// Directory holding the state (`state.redb`, [`crate::store`]).
    pub state_dir: PathBuf,
}

impl Instance {
    pub fn current() -> Result<Self> {
        let netns_inode = fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?.ino();
        let netns_cookie = netns_cookie()?;
        let name = format!("net-{netns_inode}");
        let run_root = std::env::var_os(ENV_RUN_DIR).map(PathBuf::from).unwrap_or_else(|| "/run/pfwd".into());
        Ok(Self {
            netns_inode,
            netns_cookie,
            pin_dir: Path::new(BPFFS).join("pfwd").join(&name),
            state_dir: run_root.join(name),
        })
    }

    pub fn store_file(&self) -> PathBuf {
        self.state_dir.join("state.redb")
    }
}

/// SO_NETNS_COOKIE (Linux 5.14+) of a throwaway socket: a 64-bit id of the namespace that is never reused.
fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
        .context("creating a socket to read the network namespace cookie")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for a u64 option.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!("reading SO_NETNS_COOKIE: {} (kernel older than 5.14?)", std::io::Error::last_os_error());
    }
    Ok(cookie)
}

fn is_bpffs(path: &str) -> bool {
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 == BPFFS_MAGIC).unwrap_or(false)
}

/// Makes sure bpffs is mounted at /sys/fs/bpf, mounting it when it is missing.
///
/// Inside `ip netns exec` (which unshares the mount namespace and remounts /sys) a bpffs mounted there would be a
/// private, throwaway one: pins would vanish with the command. That case is refused with the command to use instead.
pub fn ensure_bpffs() -> Result<()> {
    if is_bpffs(BPFFS) {
        return Ok(());
    }
    // `ip netns exec` runs in a private mount namespace. Where /proc/1/ns/mnt is readable that shows directly; where
    // it is not (some sandboxes), a named network namespace without bpffs is taken as the same case.
    let own_mnt = fs::read_link("/proc/self/ns/mnt").ok();
    let init_mnt = fs::read_link("/proc/1/ns/mnt").ok();
    let private_mounts = match (&own_mnt, &init_mnt) {
        (Some(a), Some(b)) => a != b,
        _ => in_named_netns(),
    };
    if private_mounts {
        bail!(
            "bpffs is not mounted at {BPFFS} here. pfwd keeps its state pinned in the system's bpffs, which\n\
             `ip netns exec` hides (it remounts /sys in a private mount namespace): run\n  \
             nsenter --net=/run/netns/NAME pfwd ...\ninstead. Otherwise mount it: mount -t bpf bpf {BPFFS}"
        );
    }
    fs::create_dir_all(BPFFS).ok();
    nix::mount::mount(Some("bpf"), BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .with_context(|| format!("bpffs is not mounted at {BPFFS} and mounting it failed"))?;
    eprintln!("pfwd: mounted bpffs at {BPFFS}");
    Ok(())
}

/// Whether the current network namespace is one of `ip netns`'s named namespaces.
fn in_named_netns() -> bool {
    let Ok(own) = fs::metadata("/proc/self/ns/net") else { return false };
    fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .any(|e| fs::metadata(e.path()).is_ok_and(|m| m.ino() == own.ino() && m.dev() == own.dev()))
        })
        .unwrap_or(false)
}

/// Fails with a clear message unless running as root (BPF, tcx and sysctls all need it).
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("pfwd needs root (CAP_BPF, CAP_NET_ADMIN and write access to /proc/sys): run it with sudo");
    }
    Ok(())
}

/// The root of the cgroup2 hierarchy, where the `--local` socket hooks attach: `/sys/fs/cgroup` on unified systems,
/// `/sys/fs/cgroup/unified` on hybrid ones. None when cgroup2 is not mounted.
pub fn cgroup2_root() -> Option<PathBuf> {
    const CGROUP2_MAGIC: i64 = 0x63677270;
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| nix::sys::statfs::statfs(p).map(|s| s.filesystem_type().0 == CGROUP2_MAGIC).unwrap_or(false))
}
