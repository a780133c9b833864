//! The eBPF side of an instance: loading the embedded programs, pinning them with their maps, attaching them to
//! interfaces with tcx links (pinned, so they keep working after pfwd exits), filling the maps from the rules and
//! reading counters and conntrack back.
//!
//! Pin layout under the instance's pin directory: one file per map (by map name, `pfwd_common::names`, and
//! `AYA_LOGS`, the log events' ring buffer), one per program (`prog_ingress`, `prog_egress`, `prog_ingress_l3`,
//! `prog_egress_l3` once a layer-3 interface is attached, and `prog_<hook>` for the socket hooks of `--local` rules:
//! connect4, sendmsg4, recvmsg4, getpeername4), `link_<iface>_<ingress|egress>` per attached interface and
//! `link_cgroup_<hook>` per attached socket hook.
//!
//! The tc programs exist in two builds of one object, loaded separately and sharing every map: for Ethernet-type
//! interfaces (the IP header at offset 14) and for layer-3 ones (tun, WireGuard, PPP: offset 0). The offset is a
//! load-time constant (`PFWD_L2_LEN`), so the Ethernet path pays nothing for the other; the layer-3 build is loaded
//! when the first layer-3 interface is attached. Map and program names come from `pfwd_common::names`; a test
//! checks that the embedded object has every one of them.
use std::{
    collections::HashSet,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow};
use aya::{
    EbpfLoader,
    maps::{Array, DevMapHash, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, ProgramArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, Program, SchedClassifier, TcAttachType, Xdp, XdpMode,
        cgroup_sock_addr::CgroupSockAddrAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
    util::nr_cpus,
};
use pfwd_common::{
    Addr, Addr6, BackendCounterKey, BackendEntry, BackendKey, CLASS_BANKS, Class, ClassCounts, Config, CtEntryOf,
    FlowTuple, INDEX_SLOTS, IfaceInfo, IfaceMacSlot, IndexEntry, IndexKey, IndexKey4, RecordText, RuleCounters,
    RuleEntry, Stat, class_index, config_flag, family,
    kern_ctx::{SUMMED_BYTE_GLOBAL, SUMMED_SHIFT_GLOBAL},
    names,
};

use crate::{
    batch::Batch,
    clock::monotonic_ns,
    fasthash::{FastMap, FastSet},
    instance::Instance,
    kern_ctx,
    netif::{self, Framing},
    record::Record,
    rules,
    state::StoredRule,
};

/// The compiled eBPF object, embedded so the binary is self-contained; loaded as `kern_ctx::object` patches it for
/// the running kernel.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pfwd"));

/// The tcx programs: (program, attach type, pin suffix).
const PROGRAMS: [(&str, TcAttachType, &str); 2] =
    [(names::PROG_INGRESS, TcAttachType::Ingress, "ingress"), (names::PROG_EGRESS, TcAttachType::Egress, "egress")];

/// The XDP program's pin.
const XDP_PIN: &str = "prog_xdp";

/// How the XDP fast path runs on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpRun {
    /// In the driver, before the kernel builds an skb (the fast one).
    Native,
    /// In the kernel's generic hook, after the skb exists: for drivers without XDP support; faster than the tc
    /// path only by what it skips.
    Generic,
}

/// The global holding the IP header's offset in the tc programs (`pfwd-ebpf/src/parse.rs`).
const L2_LEN_GLOBAL: &str = "PFWD_L2_LEN";
/// The programs' load-time constant of how many inserts into an unconfirmed-flow table pass before a flow there
/// checks its other entry again (`pfwd_common::unconfirmed_check_inserts` of that table's size).
const CT_NEW_CHECK_GLOBAL: &str = "PFWD_CT_NEW_CHECK";
/// aya-log's ring buffer, pinned so both builds of the tc programs log into the one the log reader follows.
const LOG_MAP: &str = "AYA_LOGS";

/// The cgroup socket hooks of `--local` rules: (program, hook, pin suffix).
const SOCK_PROGRAMS: [(&str, CgroupSockAddrAttachType, &str); 8] = [
    (names::PROG_CONNECT4, CgroupSockAddrAttachType::Connect4, "connect4"),
    (names::PROG_SENDMSG4, CgroupSockAddrAttachType::UDPSendMsg4, "sendmsg4"),
    (names::PROG_RECVMSG4, CgroupSockAddrAttachType::UDPRecvMsg4, "recvmsg4"),
    (names::PROG_GETPEERNAME4, CgroupSockAddrAttachType::GetPeerName4, "getpeername4"),
    (names::PROG_CONNECT6, CgroupSockAddrAttachType::Connect6, "connect6"),
    (names::PROG_SENDMSG6, CgroupSockAddrAttachType::UDPSendMsg6, "sendmsg6"),
    (names::PROG_RECVMSG6, CgroupSockAddrAttachType::UDPRecvMsg6, "recvmsg6"),
    (names::PROG_GETPEERNAME6, CgroupSockAddrAttachType::GetPeerName6, "getpeername6"),
];

/// The tc programs: the attached ones and those they tail-call.
fn tc_programs() -> impl Iterator<Item = &'static str> {
    PROGRAMS.into_iter().map(|(name, _, _)| name).chain(names::TAIL_PROGRAMS.map(|(name, _)| name))
}

/// Loads the programs `wanted` of `ebpf` (built for `framing`) into the kernel, several at once: the verifier's
/// work is most of the time an instance takes to create, and the kernel verifies programs in parallel (one thread
/// per CPU takes the next program from the list, in its order).
fn load_programs(ebpf: &mut aya::Ebpf, wanted: &[&str], framing: Framing) -> Result<()> {
    let mut queue: Vec<(&str, &mut Program)> = ebpf.programs_mut().filter(|(name, _)| wanted.contains(name)).collect();
    if let Some(missing) = wanted.iter().find(|w| !queue.iter().any(|(name, _)| name == *w)) {
        return Err(anyhow!("program {missing} missing from the object"));
    }
    queue.sort_by_key(|(name, _)| wanted.iter().position(|w| w == name));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(queue.len());
    let queue = std::sync::Mutex::new(queue.into_iter());
    let build = match framing {
        Framing::Ethernet => "",
        Framing::Layer3 => ", layer-3 build",
    };
    let load = || -> Result<()> {
        loop {
            let Some((name, prog)) = queue.lock().unwrap_or_else(|e| e.into_inner()).next() else { return Ok(()) };
            let loaded = match prog {
                Program::SchedClassifier(p) => p.load(),
                Program::Xdp(p) => p.load(),
                Program::CgroupSockAddr(p) => p.load(),
                _ => return Err(anyhow!("program {name}: a program type pfwd does not load")),
            };
            loaded.with_context(|| format!("loading the {name} program (verifier{build})"))?;
        }
    };
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads).map(|_| s.spawn(load)).collect();
        // The scope joins every worker; the first error is reported.
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or_else(|_| Err(anyhow!("a program loader thread panicked"))))
    })
}

/// An address family of the flow tables, on the userspace side: `u32` (IPv4) and [`Addr6`] (IPv6).
pub trait CtFamily: Addr + aya::Pod {
    /// The family's confirmed and unconfirmed flow tables.
    const TABLES: [&'static str; 2];
    /// The address as the standard type.
    fn ip(&self) -> IpAddr;
    /// An address of this family as the maps hold it (an address of the other family gives the unspecified one).
    fn of_ip(a: IpAddr) -> Self;
}

impl CtFamily for u32 {
    const TABLES: [&'static str; 2] = [names::CONNTRACK, names::CONNTRACK_NEW];
    fn ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(u32::from_be(*self)))
    }
    fn of_ip(a: IpAddr) -> u32 {
        match a {
            IpAddr::V4(a) => u32::from_ne_bytes(a.octets()),
            IpAddr::V6(_) => 0,
        }
    }
}

impl CtFamily for Addr6 {
    const TABLES: [&'static str; 2] = [names::CONNTRACK6, names::CONNTRACK6_NEW];
    fn ip(&self) -> IpAddr {
        let mut b = [0u8; 16];
        for (i, w) in self.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(b))
    }
    fn of_ip(a: IpAddr) -> Addr6 {
        match a {
            IpAddr::V6(_) => rules::compile::wide(a),
            IpAddr::V4(_) => [0; 4],
        }
    }
}

/// Handle on the pinned state of one instance.
pub struct Kernel {
    dir: PathBuf,
}

/// The writes of a rule change, planned before it is written ([`Kernel::plan_sync`]).
pub struct PlannedSync {
    plan: rules::plan::Plan,
    /// Its writes before the flip are made ([`Kernel::stage`]).
    staged: bool,
}

impl PlannedSync {
    /// Whether its writes before the flip are in the kernel already (an abandoned change must take them out).
    pub fn is_staged(&self) -> bool {
        self.staged
    }
}

impl Kernel {
    pub fn new(inst: &Instance) -> Self {
        Self::at(inst.pin_dir.clone())
    }

    /// A handle on pins in `dir` (tests use a private directory).
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn is_loaded(&self) -> bool {
        self.dir.join("prog_ingress").exists()
    }

    /// Loads the programs and creates (pins) the maps, with `ct_entries` slots for confirmed flows and
    /// `unconfirmed_ct_entries(ct_entries)` for unconfirmed ones.
    pub fn load(&self, ct_entries: u32, cfg: &Config) -> Result<()> {
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let (object, skb) = kern_ctx::object(OBJECT)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&self.dir)
            .map_pin_path(LOG_MAP, self.dir.join(LOG_MAP))
            .map_max_entries(names::CONNTRACK, ct_entries)
            .map_max_entries(names::CONNTRACK_NEW, pfwd_common::unconfirmed_ct_entries(ct_entries))
            .map_max_entries(names::CONNTRACK6, ct_entries)
            .map_max_entries(names::CONNTRACK6_NEW, pfwd_common::unconfirmed_ct_entries(ct_entries))
            .override_global(L2_LEN_GLOBAL, &(Framing::Ethernet.l2_len()), true)
            .override_global(
                CT_NEW_CHECK_GLOBAL,
                &pfwd_common::unconfirmed_check_inserts(pfwd_common::unconfirmed_ct_entries(ct_entries)),
                true,
            )
            .override_global(SUMMED_BYTE_GLOBAL, &skb.map_or(0, |a| a.summed_byte), true)
            .override_global(SUMMED_SHIFT_GLOBAL, &skb.map_or(0, |a| a.summed_shift), true)
            .load(object)
            .context("loading the eBPF object (maps)")?;
        let others = [names::PROG_XDP].into_iter().chain(SOCK_PROGRAMS.map(|(name, _, _)| name));
        load_programs(&mut ebpf, &tc_programs().chain(others).collect::<Vec<_>>(), Framing::Ethernet)?;
        self.pin_tc(&mut ebpf, Framing::Ethernet)?;
        let prog: &mut Xdp = ebpf
            .program_mut(names::PROG_XDP)
            .ok_or_else(|| anyhow!("program {} missing from the object", names::PROG_XDP))?
            .try_into()?;
        prog.pin(self.dir.join(XDP_PIN)).with_context(|| format!("pinning {}", names::PROG_XDP))?;
        for (name, _, hook) in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr =
                ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?.try_into()?;
            prog.pin(self.dir.join(format!("prog_{hook}"))).with_context(|| format!("pinning {name}"))?;
        }
        // The programs' clock: jiffies times the tick (see `Config::tick_ns`); and whether they got `ip_summed`.
        let by_hand = if skb.is_some() { config_flag::L4_CSUM_BY_HAND } else { 0 };
        self.set_config(&Config { tick_ns: crate::clock::tick_ns(), flags: cfg.flags | by_hand, ..*cfg })?;
        Ok(())
    }

    /// Pins the tc programs of `ebpf` (loaded by `load_programs`), built for `framing`: the programs they tail-call
    /// go into their program array (pinned, `prog_tail[_l3]`: a program array loses its entries when no file refers
    /// to it any more), then the attached programs are pinned.
    fn pin_tc(&self, ebpf: &mut aya::Ebpf, framing: Framing) -> Result<()> {
        let array_pin = self.prog_pin("tail", framing);
        // A half-finished earlier load: pin again.
        let _ = fs::remove_file(&array_pin);
        let mut tail = vec![];
        for (name, slot) in names::TAIL_PROGRAMS {
            let prog: &mut SchedClassifier =
                ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?.try_into()?;
            tail.push((slot, name, prog.fd()?.try_clone()?));
        }
        {
            let map =
                ebpf.map_mut(names::TAIL).ok_or_else(|| anyhow!("map {} missing from the object", names::TAIL))?;
            let mut array: ProgramArray<&mut MapData> = map.try_into()?;
            for (slot, name, fd) in &tail {
                array.set(*slot, fd, 0).with_context(|| format!("filling {} with {name}", names::TAIL))?;
            }
        }
        // Map::pin by reference: a typed map's pin consumes it, closing the fd the programs below refer to.
        let map = ebpf.map(names::TAIL).ok_or_else(|| anyhow!("map {} missing from the object", names::TAIL))?;
        map.pin(&array_pin).with_context(|| format!("pinning {}", array_pin.display()))?;
        for (name, _, dir) in PROGRAMS {
            let prog: &mut SchedClassifier =
                ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?.try_into()?;
            prog.pin(self.prog_pin(dir, framing)).with_context(|| format!("pinning {name}"))?;
        }
        Ok(())
    }

    fn prog_pin(&self, dir: &str, framing: Framing) -> PathBuf {
        match framing {
            Framing::Ethernet => self.dir.join(format!("prog_{dir}")),
            Framing::Layer3 => self.dir.join(format!("prog_{dir}_l3")),
        }
    }

    /// Loads the layer-3 build of the tc programs (once per instance), sharing the instance's pinned maps. `attach`
    /// does this when it first meets a layer-3 interface.
    pub fn ensure_layer3(&self) -> Result<()> {
        if PROGRAMS.iter().all(|(_, _, dir)| self.prog_pin(dir, Framing::Layer3).exists()) {
            return Ok(());
        }
        self.check_layout()?;
        // The pinned tables' size, which may not be the default.
        let (_, unconfirmed) = self.conntrack_capacity()?;
        let (object, skb) = kern_ctx::object(OBJECT)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&self.dir)
            .map_pin_path(LOG_MAP, self.dir.join(LOG_MAP))
            .override_global(L2_LEN_GLOBAL, &(Framing::Layer3.l2_len()), true)
            .override_global(CT_NEW_CHECK_GLOBAL, &pfwd_common::unconfirmed_check_inserts(unconfirmed), true)
            .override_global(SUMMED_BYTE_GLOBAL, &skb.map_or(0, |a| a.summed_byte), true)
            .override_global(SUMMED_SHIFT_GLOBAL, &skb.map_or(0, |a| a.summed_shift), true)
            .load(object)
            .context("loading the eBPF object for layer-3 interfaces")?;
        for (_, _, dir) in PROGRAMS {
            // A half-finished earlier load: pin again.
            let _ = fs::remove_file(self.prog_pin(dir, Framing::Layer3));
        }
        load_programs(&mut ebpf, &tc_programs().collect::<Vec<_>>(), Framing::Layer3)?;
        self.pin_tc(&mut ebpf, Framing::Layer3)
    }

    /// Attaches the socket hooks of `--local` rules to the cgroup2 directory `cgroup` (the root: every process).
    /// They act only in this instance's namespace (netns cookie in the config). Idempotent.
    pub fn attach_cgroup(&self, cgroup: &Path) -> Result<()> {
        let dir = fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for (_, attach_type, hook) in SOCK_PROGRAMS {
            let pin = self.dir.join(format!("link_cgroup_{hook}"));
            if pin.exists() {
                continue;
            }
            let mut prog = CgroupSockAddr::from_pin(self.dir.join(format!("prog_{hook}")), attach_type)
                .with_context(|| format!("opening pinned {hook} program"))?;
            let id = prog
                // Link-based cgroup attachments always coexist with others; the kernel wants no flags with them.
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching the {hook} socket hook to {}", cgroup.display()))?;
            let link: FdLink = prog.take_link(id)?.try_into().map_err(|e| anyhow!("cgroup link: {e:?}"))?;
            link.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
        }
        Ok(())
    }

    fn link_pin(&self, iface: &str, dir: &str) -> PathBuf {
        self.dir.join(format!("link_{iface}_{dir}"))
    }

    /// Attaches both programs to `iface`, in the build for its link type (idempotent: an existing link for the same
    /// interface is kept). A link type the programs cannot read is refused before anything changes.
    pub fn attach(&self, iface: &str, ifindex: u32) -> Result<()> {
        let link = netif::link_type(iface)?;
        let framing = link.framing().map_err(|e| anyhow!("cannot attach to {iface}: {e}"))?;
        if framing == Framing::Layer3 {
            self.ensure_layer3()?;
        }
        self.set_iface(ifindex, netif::primary_ipv4(iface), netif::primary_ipv6(iface), netif::mac(iface))?;
        for (_, attach_type, dir) in PROGRAMS {
            let pin = self.link_pin(iface, dir);
            if pin.exists() {
                continue;
            }
            let mut prog = SchedClassifier::from_pin(self.prog_pin(dir, framing))
                .with_context(|| format!("opening pinned {dir} program"))?;
            let id = prog
                .attach_with_options(iface, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .with_context(|| format!("attaching tcx {dir} on {iface}"))?;
            let link: FdLink = prog.take_link(id)?.try_into().map_err(|e| anyhow!("tcx link: {e:?}"))?;
            link.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
        }
        Ok(())
    }

    /// Attaches the XDP fast path to `iface` (an Ethernet-type interface the tc programs are attached to), in the
    /// driver's native mode where it has one, else in generic mode, and lets the fast path send to it. Idempotent.
    /// Returns the mode it runs in.
    pub fn attach_xdp(&self, iface: &str, ifindex: u32) -> Result<XdpRun> {
        let framing = netif::link_type(iface)?.framing().map_err(|e| anyhow!("cannot attach to {iface}: {e}"))?;
        if framing != Framing::Ethernet {
            return Err(anyhow!(
                "--xdp: {iface} is a layer-3 interface (no Ethernet header): the XDP fast path forwards between \
                 Ethernet-type interfaces; attach {iface} without --xdp"
            ));
        }
        let pin = self.link_pin(iface, "xdp");
        let run = if let Some(run) = netif::xdp_attached(iface)? {
            if !pin.exists() {
                return Err(anyhow!(
                    "--xdp: {iface} already has an XDP program that is not pfwd's; pfwd will not replace it"
                ));
            }
            run
        } else {
            let _ = fs::remove_file(&pin);
            let mut prog = Xdp::from_pin(self.dir.join(XDP_PIN), aya_obj::programs::XdpAttachType::Interface)
                .context("opening the pinned XDP program")?;
            let (id, run) = match prog.attach_to_if_index(ifindex, XdpMode::Driver) {
                Ok(id) => (id, XdpRun::Native),
                Err(native) => {
                    let id = prog
                        .attach_to_if_index(ifindex, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP on {iface} (native mode failed too: {native})"))?;
                    (id, XdpRun::Generic)
                }
            };
            let link: FdLink = prog.take_link(id)?.try_into().map_err(|e| anyhow!("xdp link: {e:?}"))?;
            link.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
            run
        };
        let mut tx: DevMapHash<MapData> = self.map(names::XDP_TX)?;
        tx.insert(ifindex, ifindex, None, 0).with_context(|| format!("adding {iface} to {}", names::XDP_TX))?;
        Ok(run)
    }

    /// Removes the XDP fast path from `iface`: the fast path stops sending to it, then its link goes.
    pub fn detach_xdp(&self, iface: &str, ifindex: u32) -> Result<()> {
        if let Ok(mut tx) = self.map::<DevMapHash<MapData>>(names::XDP_TX) {
            let _ = tx.remove(ifindex);
        }
        self.remove_link(iface, "xdp")
    }

    /// Removes the link pinned for `iface` at `dir`, if any.
    fn remove_link(&self, iface: &str, dir: &str) -> Result<()> {
        let pin = self.link_pin(iface, dir);
        if pin.exists() {
            // Unpinning drops the last reference to the link, which detaches it.
            match PinnedLink::from_pin(&pin) {
                Ok(l) => drop(l.unpin()),
                Err(_) => fs::remove_file(&pin)?,
            }
        }
        Ok(())
    }

    /// Removes the links of `iface` (which detaches the programs from it) and forgets it.
    pub fn detach(&self, iface: &str, ifindex: u32) -> Result<()> {
        self.detach_xdp(iface, ifindex)?;
        for (_, _, dir) in PROGRAMS {
            self.remove_link(iface, dir)?;
        }
        let mut ifaces: HashMap<MapData, u32, IfaceInfo> = self.map(names::IFACES)?;
        let _ = ifaces.remove(&ifindex);
        self.set_mac_slot(&ifaces, ifindex, None)
    }

    /// Removes every pin of the instance (links first, so programs detach), then the directory.
    pub fn unload(&self) -> Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = fs::read_dir(&self.dir)?.filter_map(|e| Some(e.ok()?.path())).collect();
        let is_link = |p: &PathBuf| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link_"));
        entries.sort_by_key(|p| !is_link(p));
        for p in entries {
            // A link is released through its own fd: closing it detaches the program before this returns. Merely
            // removing the pin leaves the release to a kernel work queue, so the program could still be attached
            // for a moment after `pfwd detach` said it was gone.
            if is_link(&p)
                && let Ok(l) = PinnedLink::from_pin(&p)
            {
                drop(l.unpin());
                continue;
            }
            fs::remove_file(&p).with_context(|| format!("removing pin {}", p.display()))?;
        }
        fs::remove_dir(&self.dir).with_context(|| format!("removing {}", self.dir.display()))?;
        // Leave no empty /sys/fs/bpf/pfwd behind.
        if let Some(parent) = self.dir.parent() {
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }

    fn map<T: TryFrom<Map>>(&self, name: &str) -> Result<T>
    where
        T::Error: std::error::Error + Send + Sync + 'static,
    {
        let path = self.dir.join(name);
        let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
        let map = Map::from_map_data(data)?;
        T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
    }

    pub fn config(&self) -> Result<Config> {
        let cfg: Array<MapData, Config> = self.map(names::CONFIG)?;
        Ok(cfg.get(&0, 0)?)
    }

    pub fn set_config(&self, cfg: &Config) -> Result<()> {
        let mut map: Array<MapData, Config> = self.map(names::CONFIG)?;
        map.set(0, cfg, 0)?;
        Ok(())
    }

    /// Makes the `-d local` address sets exactly `addrs` (either family). An instance created by an older pfwd has
    /// no such maps: then there is nothing to update (it has no `-d local` rules either).
    pub fn set_local_addrs(&self, addrs: &[IpAddr]) -> Result<()> {
        let v4: Vec<u32> = addrs.iter().filter(|a| a.is_ipv4()).map(|a| CtFamily::of_ip(*a)).collect();
        let v6: Vec<Addr6> = addrs.iter().filter(|a| a.is_ipv6()).map(|a| CtFamily::of_ip(*a)).collect();
        self.set_addr_set(names::LOCAL_ADDRS, &v4)?;
        self.set_addr_set(names::LOCAL_ADDRS6, &v6)
    }

    fn set_addr_set<A: CtFamily>(&self, name: &str, addrs: &[A]) -> Result<()> {
        let Ok(mut map) = self.map::<HashMap<MapData, A, u8>>(name) else { return Ok(()) };
        let old: HashSet<A> = map.keys().filter_map(Result::ok).collect();
        for a in addrs.iter().filter(|a| !old.contains(a)) {
            map.insert(a, 1, 0)?;
        }
        for a in old.iter().filter(|a| !addrs.contains(a)) {
            let _ = map.remove(a);
        }
        Ok(())
    }

    /// Registers an attached interface with its primary addresses (REDIRECT's targets; None: it has none).
    pub fn set_iface(
        &self,
        ifindex: u32,
        addr: Option<Ipv4Addr>,
        addr6: Option<Ipv6Addr>,
        mac: Option<[u8; 6]>,
    ) -> Result<()> {
        let mut ifaces: HashMap<MapData, u32, IfaceInfo> = self.map(names::IFACES)?;
        let addr = addr.map_or(0, |a| CtFamily::of_ip(a.into()));
        let addr6 = addr6.map_or([0; 4], |a| CtFamily::of_ip(a.into()));
        let info = IfaceInfo { addr, flags: 0, addr6, mac: mac.unwrap_or_default(), _pad: [0; 2] };
        // A new MAC empties the interface's slot first: at no moment, nor after an interrupted change, does the slot
        // say the old MAC while PFWD_IFACES says the new (an empty slot sends the fast path to PFWD_IFACES).
        if self.mac_slot(ifindex).is_some_and(|w| IfaceMacSlot::word(ifindex, info.mac) != Some(w)) {
            self.set_mac_slot(&ifaces, ifindex, None)?;
        }
        ifaces.insert(ifindex, info, 0)?;
        self.set_mac_slot(&ifaces, ifindex, Some(info.mac))
    }

    /// The word of `ifindex`'s slot in `IFACE_MACS` when the interface owns it.
    fn mac_slot(&self, ifindex: u32) -> Option<u64> {
        let slots = self.map::<Array<MapData, u64>>(names::IFACE_MACS).ok()?;
        let index = IfaceMacSlot::index(ifindex);
        let word = slots.get(&index, 0).ok()?;
        (IfaceMacSlot::owner(word, index) == Some(ifindex)).then_some(word)
    }

    /// Keeps `ifindex`'s slot in the XDP fast path's shortcut (`IfaceMacSlot`) in step with `IFACES` (`ifaces`):
    /// `Some(mac)` after its entry there was written, None after it was removed. The slot is taken when free, ours,
    /// or held by an interface `IFACES` no longer has; otherwise the fast path looks this interface up in `IFACES`.
    /// An instance attached by an older pfwd has no such map, and its programs do not read one.
    fn set_mac_slot(
        &self,
        ifaces: &HashMap<MapData, u32, IfaceInfo>,
        ifindex: u32,
        mac: Option<[u8; 6]>,
    ) -> Result<()> {
        let Ok(mut slots) = self.map::<Array<MapData, u64>>(names::IFACE_MACS) else { return Ok(()) };
        let index = IfaceMacSlot::index(ifindex);
        let held = slots.get(&index, 0)?;
        let owner = IfaceMacSlot::owner(held, index);
        let word = match mac {
            Some(mac) => {
                let free = owner.is_none_or(|o| o == ifindex || ifaces.get(&o, 0).is_err());
                match IfaceMacSlot::word(ifindex, mac) {
                    Some(word) if free => word,
                    _ => return Ok(()),
                }
            }
            None if owner == Some(ifindex) => 0,
            None => return Ok(()),
        };
        slots.set(index, word, 0)?;
        Ok(())
    }

    /// Makes the kernel's rules match `rules`, in one step for packets (see [`rules::plan`]): only the rules and
    /// index keys that change are written, then the generation moves on in one write, so a packet is matched
    /// against the old rule set or the new one, never a mix. `previous` is what the kernel holds when the last
    /// change completed; without it (at attach, after an interrupted change) the held rules are read back from the
    /// maps. Each rule keeps its slot, so a flow's slot means the same rule before and after.
    pub fn sync_rules(
        &self,
        previous: Option<&[StoredRule]>,
        rules: &[StoredRule],
        ifindex: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<()> {
        let new = compile_stored(rules, ifindex)?;
        self.sync_compiled(previous, rules, &new, ifindex)
    }

    /// [`Kernel::sync_rules`] with `rules` already compiled ([`compile_stored`]) into `new`.
    pub fn sync_compiled(
        &self,
        previous: Option<&[StoredRule]>,
        rules: &[StoredRule],
        new: &rules::Compiled,
        ifindex: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<()> {
        let planned = match previous {
            Some(previous) => self.plan_sync(previous, rules, new, ifindex)?,
            None => None,
        };
        self.sync_planned(planned, new)
    }

    /// The first half of [`Kernel::sync_compiled`] from `previous`: plans the writes of only the slots that differ.
    /// It reads the kernel and writes nothing, so it can run while the store is written (a change of 10,000 rules
    /// plans for about as long as the store takes). None: the change must go the full way (see
    /// [`Kernel::sync_planned`]).
    pub fn plan_sync(
        &self,
        previous: &[StoredRule],
        rules: &[StoredRule],
        new: &rules::Compiled,
        ifindex: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Option<PlannedSync>> {
        self.check_layout()?;
        let cfg = self.config()?;
        if cfg.flags & config_flag::STAGED != 0 {
            // A change was killed after writing ahead of its state: the kernel is not `previous`.
            return Ok(None);
        }
        let generation = cfg.generation;
        let companions = rules::compile::companions(rules.iter().map(|r| &r.rule));
        let pairs = stored_pairs(rules, &companions);
        let old_companions = rules::compile::companions(previous.iter().map(|r| &r.rule));
        let old_pairs = stored_pairs(previous, &old_companions);
        let (old_changed, new_changed) = changed_rules(&old_pairs, &pairs);
        let Ok(old_changed) = rules::compile::build(&old_changed, ifindex) else { return Ok(None) };
        // The new rules are compiled already: keep the changed ones (an import of 10,000 rules compiled them twice).
        let changed: FastSet<u32> = new_changed.iter().map(|(slot, _)| *slot).collect();
        // Every rule new (an import onto none): all of them, without a copy.
        let new_changed = if new.entries.iter().all(|(slot, _)| changed.contains(slot)) {
            std::borrow::Cow::Borrowed(new)
        } else {
            std::borrow::Cow::Owned(new.restricted(|slot, _| changed.contains(&slot)))
        };
        Ok(rules::plan::plan_change(new, &new_changed, &old_changed, generation)
            .ok()
            .map(|plan| PlannedSync { plan, staged: false }))
    }

    /// Makes the writes of `planned` that packets do not see before its flip (new rules, the keys listing old and
    /// new, the unused class bank), so that they run while the store is written; the flip waits for
    /// [`Kernel::sync_planned`], once the store is. The config is marked [`config_flag::STAGED`] first: a pfwd
    /// killed before the flip leaves the mark, and the next change reads the rules back from the maps. A plan that
    /// rewrites a live rule in place is left whole for later (packets would see that write at once).
    pub fn stage(&self, planned: PlannedSync) -> Result<PlannedSync> {
        let mut cfg = self.config()?;
        let plan = &planned.plan;
        if planned.staged
            || plan.is_empty()
            || !plan.rewritten.is_empty()
            || plan.generation != cfg.generation.wrapping_add(1)
        {
            return Ok(planned);
        }
        cfg.flags |= config_flag::STAGED;
        self.set_config(&cfg)?;
        self.write_before_flip(plan, cfg.flipped_ns)?;
        Ok(PlannedSync { staged: true, ..planned })
    }

    /// The second half of [`Kernel::sync_compiled`]: writes `planned` (only its flip and what follows, if it was
    /// staged) when the kernel is still where it was planned from; else (no plan, or the generation moved) reads
    /// back what the kernel holds and writes the difference.
    pub fn sync_planned(&self, planned: Option<PlannedSync>, new: &rules::Compiled) -> Result<()> {
        self.check_layout()?;
        let mut cfg = self.config()?;
        if let Some(p) = planned.filter(|p| p.plan.generation == cfg.generation.wrapping_add(1)) {
            return if p.staged { self.flip(&p.plan, &mut cfg) } else { self.apply_plan(&p.plan, &mut cfg) };
        }
        let held = self.read_held()?;
        let plan = match rules::plan::plan(&held, cfg.generation, new) {
            Ok(p) => p,
            Err(rules::RuleError::IndexFull { .. }) => {
                // Too many rules would share a key while the old and new ones are both listed: delete first
                // (the rules kept, alone), then add.
                let generation = cfg.generation;
                let kept = new.restricted(|slot, e| {
                    held.entries.get(&slot).is_some_and(|h| h.visible(generation) && (h.rank, h.id) == (e.rank, e.id))
                });
                let first = rules::plan::plan(&held, cfg.generation, &kept)?;
                self.apply_plan(&first, &mut cfg)?;
                rules::plan::plan(&rules::plan::Held::from_compiled(&kept), cfg.generation, new)?
            }
            Err(e) => return Err(e.into()),
        };
        self.apply_plan(&plan, &mut cfg)
    }

    /// How many keys the rule index holds, and of them those its IPv4 form holds (the keys of IPv4 and
    /// both-family rules). The first counts the wide index's keys but an IPv4 rule's, which only the IPv4 form
    /// holds (see [`write_index`]).
    pub fn index_keys(&self) -> Result<(u64, u64)> {
        let map: HashMap<MapData, IndexKey, IndexEntry> = self.map(names::INDEX)?;
        let map4: HashMap<MapData, IndexKey4, IndexEntry> = self.map(names::INDEX4)?;
        let wide = map.keys().filter_map(Result::ok).filter(IndexKey::in_wide_index).count() as u64;
        let (mut v4, mut all4) = (0, 0);
        for k in map4.keys().filter_map(Result::ok) {
            all4 += 1;
            v4 += u64::from(!k.widen().in_wide_index());
        }
        Ok((wide + v4, all4))
    }

    /// The rule index and rules array, opened once for the lookups of a small change ([`IndexReader`]).
    pub fn index_reader(&self) -> Result<IndexReader> {
        self.check_layout()?;
        Ok(IndexReader {
            index: self.map(names::INDEX)?,
            index4: self.map(names::INDEX4)?,
            rules: self.map(names::RULES)?,
            rules_batch: Batch::open(&self.dir.join(names::RULES))?,
        })
    }

    /// Plans the change from the kernel's rules to the same without `removed` and with `added` (slots and ids
    /// given) looking only at the index keys they touch ([`rules::delta`]). `classes` and `hidden` are what is kept
    /// about the other rules ([`rules::delta::ClassKeys`], and each key's rules behind its kernel entry). Ok(None):
    /// this change must go the full way (a key would list too many rules during it, a `--hairpin` rule, whose
    /// companion other rules may share, or the [`config_flag::STAGED`] mark of a killed change). Nothing is written.
    pub fn plan_small(
        &self,
        reader: &IndexReader,
        removed: &[StoredRule],
        added: &[StoredRule],
        classes: &[rules::delta::ClassKeys],
        hidden: &std::collections::HashMap<IndexKey, Vec<rules::delta::Member>>,
        ifindex: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Option<SmallPlan>> {
        if removed.iter().chain(added).any(|r| r.rule.hairpin.is_some()) {
            return Ok(None);
        }
        if self.config()?.flags & config_flag::STAGED != 0 {
            // A change was killed after writing ahead of its state: the full way reads the kernel back.
            return Ok(None);
        }
        let new_changed = compile_stored(added, ifindex)?;
        let old_changed = compile_stored(removed, ifindex)?;
        // What each touched key holds now: the rules the kernel lists, then the hidden ones.
        let mut before: std::collections::HashMap<IndexKey, Vec<rules::delta::Member>> = Default::default();
        for key in old_changed.members.keys().chain(new_changed.members.keys()) {
            if before.contains_key(key) {
                continue;
            }
            let mut members: Vec<rules::delta::Member> =
                reader.listed(key)?.iter().map(|(s, e)| rules::delta::Member::of(*s, e)).collect();
            members.extend(hidden.get(key).into_iter().flatten());
            before.insert(*key, members);
        }
        let d = match rules::delta::delta(&old_changed, &new_changed, &before, classes) {
            Ok(d) => d,
            Err(rules::RuleError::IndexFull { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let cfg = self.config()?;
        let plan = match rules::plan::plan_change(&d.compiled, &new_changed, &old_changed, cfg.generation) {
            Ok(p) => p,
            Err(rules::RuleError::IndexFull { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(SmallPlan { plan, cfg, classes: d.classes, hidden: d.hidden, keys: before.len() }))
    }

    /// Carries out a change planned by [`Kernel::plan_small`] (nothing may have changed the maps since).
    pub fn apply_small(&self, small: SmallPlan) -> Result<()> {
        let SmallPlan { plan, mut cfg, .. } = small;
        self.apply_plan(&plan, &mut cfg)
    }

    /// What the kernel holds, read back from the maps: every slot the index lists, with its entry. An IPv4 rule's
    /// keys come from the IPv4 index, the others from the wide one (see [`write_index`]).
    fn read_held(&self) -> Result<rules::plan::Held> {
        let index_map: HashMap<MapData, IndexKey, IndexEntry> = self.map(names::INDEX)?;
        let index4_map: HashMap<MapData, IndexKey4, IndexEntry> = self.map(names::INDEX4)?;
        let rule_map: Array<MapData, RuleEntry> = self.map(names::RULES)?;
        let mut held = rules::plan::Held::default();
        // An instance attached by an older pfwd also has IPv4 rules' keys in the wide index: the programs never
        // probe those, and they are left out.
        let wide = index_map.iter().filter(|item| item.as_ref().is_ok_and(|(k, _)| k.in_wide_index()));
        let narrow = index4_map
            .iter()
            .map(|item| item.map(|(k, e)| (k.widen(), e)))
            .filter(|item| item.as_ref().is_ok_and(|(k, _)| !k.in_wide_index()));
        for item in wide.chain(narrow) {
            let (k, e) = item?;
            let slots = e.slots[..(e.len as usize).min(INDEX_SLOTS)].to_vec();
            for s in &slots {
                if !held.entries.contains_key(s) {
                    held.entries.insert(*s, rule_map.get(s, 0)?);
                }
            }
            held.index.insert(k, slots);
        }
        Ok(held)
    }

    /// Carries out `plan` (see [`rules::plan`]) and moves `cfg` to its generation.
    fn apply_plan(&self, plan: &rules::plan::Plan, cfg: &mut Config) -> Result<()> {
        if plan.is_empty() && plan.cleared.is_empty() {
            if cfg.flags & config_flag::STAGED != 0 {
                // Read back after an abandoned change that left nothing to undo: only the mark goes.
                cfg.flags &= !config_flag::STAGED;
                self.set_config(cfg)?;
            }
            return Ok(());
        }
        self.write_before_flip(plan, cfg.flipped_ns)?;
        self.flip(plan, cfg)
    }

    /// The writes of `plan` before its flip, which packets do not see yet: new rules (invisible to the current
    /// generation), deleted ones marked to go with the next, the index keys listing old and new rules, and the
    /// class bank that is not in use. `flipped_ns`: when the current generation began.
    fn write_before_flip(&self, plan: &rules::plan::Plan, flipped_ns: u64) -> Result<()> {
        // The class bank about to be written was the active one until the last flip.
        wait_for_readers(flipped_ns);
        let batch = |name: &str| Batch::open(&self.dir.join(name));
        batch(names::RULES)?.update(&plan.rules)?;
        if !plan.tables.is_empty() {
            self.backend_tables()?;
            let entries: Vec<(BackendKey, BackendEntry)> = plan
                .tables
                .iter()
                .flat_map(|(slot, table)| {
                    table.iter().enumerate().map(|(index, e)| (BackendKey { rule: *slot, index: index as u32 }, *e))
                })
                .collect();
            batch(names::BACKENDS)?.update(&entries)?;
        }
        write_index(&self.index_maps()?, &plan.index)?;
        let bank = plan.generation & (CLASS_BANKS - 1);
        let classes: Vec<(u32, Class)> = plan
            .classes
            .iter()
            .enumerate()
            .flat_map(|(h, classes)| {
                classes.iter().enumerate().map(move |(i, c)| (class_index(bank, h as u8, i as u32), *c))
            })
            .collect();
        batch(names::CLASSES)?.update(&classes)
    }

    fn index_maps(&self) -> Result<(Batch, Batch)> {
        Ok((Batch::open(&self.dir.join(names::INDEX))?, Batch::open(&self.dir.join(names::INDEX4))?))
    }

    /// The flip of `plan`, once its writes before it are made: moves `cfg` to the plan's generation (clearing the
    /// [`config_flag::STAGED`] mark), then drops the deleted rules once no program can still be using them.
    fn flip(&self, plan: &rules::plan::Plan, cfg: &mut Config) -> Result<()> {
        // This bank's counts and the generation in one write; the active bank's counts stay as they are, so a
        // program that read the old generation still pairs it with the old classes.
        let bank = plan.generation & (CLASS_BANKS - 1);
        let [pre, post, local] = plan.classes.each_ref().map(|c| c.len() as u32);
        cfg.classes[bank as usize] = ClassCounts { pre, post, local };
        cfg.generation = plan.generation;
        cfg.flipped_ns = monotonic_ns();
        cfg.flags &= !config_flag::STAGED;
        self.set_config(cfg)?;
        if plan.index_after.is_empty() && plan.cleared.is_empty() {
            return Ok(());
        }
        // Programs that read the old generation may still list the deleted rules: wait them out, then drop them.
        wait_for_readers(cfg.flipped_ns);
        write_index(&self.index_maps()?, &plan.index_after)?;
        let cleared: Vec<(u32, RuleEntry)> = plan.cleared.iter().map(|(s, _)| (*s, RuleEntry::default())).collect();
        Batch::open(&self.dir.join(names::RULES))?.update(&cleared)?;
        let tables: Vec<BackendKey> = plan
            .cleared
            .iter()
            .filter(|(_, table)| *table)
            .flat_map(|(slot, _)| (0..pfwd_common::MAGLEV_SIZE).map(|index| BackendKey { rule: *slot, index }))
            .collect();
        if !tables.is_empty() {
            Batch::open(&self.dir.join(names::BACKENDS))?.delete(&tables)?;
        }
        Ok(())
    }

    /// The Maglev tables' map. An instance created by an older pfwd has none.
    fn backend_tables(&self) -> Result<HashMap<MapData, BackendKey, BackendEntry>> {
        self.map(names::BACKENDS).map_err(|_| {
            anyhow!(
                "this instance was attached by an older pfwd, without rules with several backends; run `pfwd detach` \
                 and attach again to use them"
            )
        })
    }

    /// Clears the counters of freed slots so their next rules start from zero (their per-backend ones too), opening
    /// the maps once: a bulk delete frees thousands.
    pub fn reset_counters(&self, slots: &[u32]) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let mut map: PerCpuArray<MapData, RuleCounters> = self.map(names::RULE_COUNTERS)?;
        let cpus = nr_cpus().map_err(|(_, e)| e)?;
        for &slot in slots {
            map.set(slot, PerCpuValues::try_from(vec![RuleCounters::default(); cpus])?, 0)?;
        }
        if let Ok(mut per_backend) =
            self.map::<PerCpuHashMap<MapData, BackendCounterKey, RuleCounters>>(names::BACKEND_COUNTERS)
        {
            let slots: HashSet<u32> = slots.iter().copied().collect();
            let keys: Vec<BackendCounterKey> =
                per_backend.keys().filter_map(Result::ok).filter(|k| slots.contains(&k.slot)).collect();
            for k in &keys {
                let _ = per_backend.remove(k);
            }
        }
        Ok(())
    }

    /// The per-backend counters of the rule in `slot`, summed over CPUs: `(backend address (network order), port,
    /// counters)` for every backend that has had a packet, including backends since removed from the rule whose flows
    /// went on. Empty for an instance without the map.
    pub fn backend_counters(&self, slot: u32) -> Result<Vec<(Addr6, u16, RuleCounters)>> {
        let Ok(map) = self.map::<PerCpuHashMap<MapData, BackendCounterKey, RuleCounters>>(names::BACKEND_COUNTERS)
        else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in map.iter() {
            let (k, per_cpu) = item?;
            if k.slot != slot {
                continue;
            }
            let sum = per_cpu.iter().fold(RuleCounters::default(), |a, c| RuleCounters {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
                flows: a.flows + c.flows,
                drops: a.drops + c.drops,
            });
            out.push((k.addr, k.port, sum));
        }
        Ok(out)
    }

    /// Counters of each of `slots`, summed over CPUs (the map is opened once: `status` asks for every rule's, and
    /// opening it per rule took a second at 100,000 rules).
    pub fn rule_counters(&self, slots: &[u32]) -> Result<Vec<RuleCounters>> {
        let map: PerCpuArray<MapData, RuleCounters> = self.map(names::RULE_COUNTERS)?;
        slots
            .iter()
            .map(|slot| {
                Ok(map.get(slot, 0)?.iter().fold(RuleCounters::default(), |a, c| RuleCounters {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                    flows: a.flows + c.flows,
                    drops: a.drops + c.drops,
                }))
            })
            .collect()
    }

    /// Global counters by name, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>> {
        let map: PerCpuArray<MapData, u64> = self.map(names::STATS)?;
        Stat::ALL.iter().map(|s| Ok((s.name(), map.get(&s.index(), 0)?.iter().sum()))).collect()
    }

    /// Every conntrack entry (both directions), of both tables: confirmed flows first, then unconfirmed ones
    /// (`CtEntry::is_confirmed` tells them apart). A key in both (a flow caught while it moves) is listed once, as
    /// the data path sees it: from the confirmed table.
    /// Of one family's tables (`A`: `u32` for IPv4, [`Addr6`] for IPv6). An instance attached by an older pfwd has
    /// no IPv6 tables: none listed.
    pub fn conntrack<A: CtFamily>(&self) -> Result<Vec<(FlowTuple<A>, CtEntryOf<A>)>>
    where
        FlowTuple<A>: aya::Pod,
        CtEntryOf<A>: aya::Pod,
    {
        let [c, u] = A::TABLES;
        let (Ok(confirmed), Ok(unconfirmed)) = (
            self.map::<HashMap<MapData, FlowTuple<A>, CtEntryOf<A>>>(c),
            self.map::<HashMap<MapData, FlowTuple<A>, CtEntryOf<A>>>(u),
        ) else {
            anyhow::ensure!(A::FAMILY == family::V6, "the conntrack tables are missing");
            return Ok(vec![]);
        };
        let mut out: Vec<(FlowTuple<A>, CtEntryOf<A>)> = confirmed.iter().filter_map(Result::ok).collect();
        let seen: HashSet<FlowTuple<A>> = out.iter().map(|(k, _)| *k).collect();
        out.extend(unconfirmed.iter().filter_map(Result::ok).filter(|(k, _)| !seen.contains(k)));
        Ok(out)
    }

    /// Removes conntrack entries of one family from both its tables; returns how many keys were there (an entry may
    /// have expired and gone meanwhile).
    pub fn conntrack_delete<A: CtFamily>(&self, keys: &[FlowTuple<A>]) -> Result<usize>
    where
        FlowTuple<A>: aya::Pod,
        CtEntryOf<A>: aya::Pod,
    {
        if keys.is_empty() {
            return Ok(0);
        }
        let [c, u] = A::TABLES;
        let mut confirmed: HashMap<MapData, FlowTuple<A>, CtEntryOf<A>> = self.map(c)?;
        let mut unconfirmed: HashMap<MapData, FlowTuple<A>, CtEntryOf<A>> = self.map(u)?;
        // Confirmed first: the data path moves flows the other way, so a flow moving meanwhile is caught in one.
        let mut remove = |k: &FlowTuple<A>| {
            let c = confirmed.remove(k).is_ok();
            let u = unconfirmed.remove(k).is_ok();
            c || u
        };
        Ok(keys.iter().filter(|k| remove(k)).count())
    }

    /// Writes the record ([`crate::record`]) into the pinned `PFWD_RECORD` map.
    pub fn write_record(&self, rec: &Record) -> Result<()> {
        let json = serde_json::to_vec(rec)?;
        let mut value = RecordText { len: json.len() as u32, _pad: 0, text: [0; 4096] };
        anyhow::ensure!(json.len() <= value.text.len(), "the detach record is too large ({} bytes)", json.len());
        value.text[..json.len()].copy_from_slice(&json);
        let mut map: Array<MapData, RecordText> = self.map(names::RECORD)?;
        map.set(0, value, 0)?;
        Ok(())
    }

    /// The record in the pinned `PFWD_RECORD` map, if the instance has one (and it was ever written).
    pub fn read_record(&self) -> Option<Record> {
        let map: Array<MapData, RecordText> = self.map(names::RECORD).ok()?;
        let v = map.get(&0, 0).ok()?;
        let text = v.text.get(..v.len as usize)?;
        serde_json::from_slice(text).ok()
    }

    /// Conntrack capacity (entries; two per flow): of the confirmed table and of the unconfirmed one.
    pub fn conntrack_capacity(&self) -> Result<(u32, u32)> {
        let capacity =
            |name: &str| -> Result<u32> { Ok(MapData::from_pin(self.dir.join(name))?.info()?.max_entries()) };
        Ok((capacity(names::CONNTRACK)?, capacity(names::CONNTRACK_NEW)?))
    }

    /// Kernel memory of each pinned map (the `memlock` the kernel accounts for it), by name.
    pub fn map_memory(&self) -> Result<Vec<(String, u64)>> {
        use std::os::fd::{AsFd, AsRawFd};
        let mut out = vec![];
        for name in names::MAPS {
            // An instance attached by an older pfwd may lack the newer maps.
            let Ok(data) = MapData::from_pin(self.dir.join(name)) else { continue };
            let fdinfo = fs::read_to_string(format!("/proc/self/fdinfo/{}", data.fd().as_fd().as_raw_fd()))?;
            let bytes = fdinfo
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            out.push((name.to_string(), bytes));
        }
        Ok(out)
    }

    /// Program id of the pinned ingress program (for reading its log events).
    pub fn ingress_program_id(&self) -> Result<u32> {
        let prog = SchedClassifier::from_pin(self.dir.join("prog_ingress"))?;
        Ok(prog.info()?.id())
    }

    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// Checks that the pinned maps have the layout this pfwd's programs use (key and value sizes, and sizes other
    /// than the conntrack tables', which `--ct-size` sets): an instance attached by an older pfwd may not, and
    /// writing into its maps would fail with a bare "invalid argument" or, worse, mean something else.
    pub fn check_layout(&self) -> Result<()> {
        let obj = object::File::parse(OBJECT).context("parsing the embedded eBPF object")?;
        for name in names::MAPS {
            let Some(want) = legacy_map_def(&obj, name) else { continue };
            let path = self.dir.join(name);
            let Ok(data) = MapData::from_pin(&path) else {
                if [names::INDEX4, names::XDP_TX].contains(&name) && self.dir.join(names::INDEX).exists() {
                    // An instance from before the IPv4 index (its programs probe the wide index only) or before XDP.
                    return Err(anyhow!(
                        "this instance was attached by an older pfwd (it has no map {name}); \
                         run `pfwd detach` and attach again to use this version"
                    ));
                }
                continue;
            };
            let have = data.info()?;
            let sized =
                ![names::CONNTRACK, names::CONNTRACK_NEW, names::CONNTRACK6, names::CONNTRACK6_NEW].contains(&name);
            if have.key_size() != want.key_size
                || have.value_size() != want.value_size
                || (sized && have.max_entries() != want.max_entries)
            {
                return Err(anyhow!(
                    "this instance was attached by an older pfwd (its map {name} has another layout); \
                     run `pfwd detach` and attach again to use this version"
                ));
            }
        }
        Ok(())
    }
}

/// The sizes of a map as the embedded object defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapDef {
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

/// The definition of map `name` in the embedded object: the `bpf_map_def` (type, key size, value size, max entries,
/// ...: native-endian u32s, as aya-obj reads them) at its symbol in the `maps` section, where aya-ebpf's `#[map]`
/// puts it. None for a name the object does not have there. Read directly rather than through
/// `aya_obj::Object::parse`, which also parses every program's relocations and line info: three quarters of the
/// time of a small command such as `pfwd add` (a test checks both agree for every map).
fn legacy_map_def(obj: &object::File, name: &str) -> Option<MapDef> {
    use object::{Object, ObjectSection, ObjectSymbol};
    let sym = obj.symbol_by_name(name)?;
    let section = obj.section_by_index(sym.section_index()?).ok()?;
    if section.name().ok()? != "maps" {
        return None;
    }
    let start = usize::try_from(sym.address()).ok()?;
    let def = section.data().ok()?.get(start..start.checked_add(16)?)?;
    let word = |i: usize| u32::from_ne_bytes([def[i], def[i + 1], def[i + 2], def[i + 3]]);
    Some(MapDef { key_size: word(4), value_size: word(8), max_entries: word(12) })
}

/// A change planned the small way ([`Kernel::plan_small`]).
pub struct SmallPlan {
    pub plan: rules::plan::Plan,
    /// The configuration it was planned at (its generation).
    cfg: Config,
    /// Every class with its key count after the change.
    pub classes: Vec<rules::delta::ClassKeys>,
    /// The touched keys whose hidden rules change, with their new ones (empty: none left).
    pub hidden: Vec<(IndexKey, Vec<rules::delta::Member>)>,
    /// How many index keys it touched.
    pub keys: usize,
}

/// Lookups of one index key's rules and of rule slots, for a change that looks only at what it touches.
pub struct IndexReader {
    index: HashMap<MapData, IndexKey, IndexEntry>,
    index4: HashMap<MapData, IndexKey4, IndexEntry>,
    rules: Array<MapData, RuleEntry>,
    rules_batch: Batch,
}

impl IndexReader {
    /// The rules the kernel's entry of `key` lists, with their entries (none when the key is absent).
    pub fn listed(&self, key: &IndexKey) -> Result<Vec<(u32, RuleEntry)>> {
        // An IPv4 rule's key is only in the IPv4 index (see [`write_index`]).
        let found = match key.narrow().filter(|_| !key.in_wide_index()) {
            Some(k4) => self.index4.get(&k4, 0),
            None => self.index.get(key, 0),
        };
        let entry = match found {
            Ok(e) => e,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(vec![]),
            Err(e) => return Err(e.into()),
        };
        entry.slots[..(entry.len as usize).min(INDEX_SLOTS)].iter().map(|s| Ok((*s, self.rules.get(s, 0)?))).collect()
    }

    /// The first slot from `from` on (round robin below `MAX_RULES`) that holds no rule (a cleared entry: ids start
    /// at 1) and is not `taken`. The rules array is read in batches: with 100,000 rules a dense stretch of slots is
    /// a few syscalls, not one per slot.
    pub fn free_slot(&self, from: u32, taken: &HashSet<u32>) -> Result<Option<u32>> {
        // Small reads first (the slot after the last one given out is usually free), larger ones through a dense
        // stretch.
        let mut chunk: u32 = 64;
        let max = pfwd_common::MAX_RULES;
        let mut start = from % max;
        let mut seen = 0;
        while seen < max {
            let count = chunk.min(max - start);
            chunk = (chunk * 2).min(4096);
            let entries: Vec<(u32, RuleEntry)> = self.rules_batch.read_array(start, count)?;
            if let Some((slot, _)) = entries.iter().find(|(s, e)| e.id == 0 && !taken.contains(s)) {
                return Ok(Some(*slot));
            }
            seen += count;
            start = (start + count) % max;
        }
        Ok(None)
    }
}

/// The rules of `rules` compiled for the kernel in their slots, with the rules their `--hairpin` adds.
pub fn compile_stored(
    rules: &[StoredRule],
    ifindex: &dyn Fn(&str) -> Option<u32>,
) -> Result<rules::Compiled, rules::RuleError> {
    if rules.len() > pfwd_common::MAX_RULES as usize {
        return Err(rules::RuleError::TooManyRules(rules.len()));
    }
    let companions = rules::compile::companions(rules.iter().map(|r| &r.rule));
    rules::compile::build(&stored_pairs(rules, &companions), ifindex)
}

/// Every rule the kernel runs for `rules` (with their `companions`, [`rules::compile::companions`]) in its slot.
fn stored_pairs<'r>(rules: &'r [StoredRule], companions: &'r [(usize, rules::Rule)]) -> Vec<(u32, &'r rules::Rule)> {
    let owned = companions.iter().map(|(owner, c)| (pfwd_common::COMPANION_SLOTS + rules[*owner].slot, c));
    rules.iter().map(|r| (r.slot, &r.rule)).chain(owned).collect()
}

/// The rules of the slots that differ between `old` and `new`: (the old ones, the new ones).
type Pairs<'r> = Vec<(u32, &'r rules::Rule)>;
fn changed_rules<'r>(old: &[(u32, &'r rules::Rule)], new: &[(u32, &'r rules::Rule)]) -> (Pairs<'r>, Pairs<'r>) {
    let old_by: FastMap<u32, &rules::Rule> = old.iter().copied().collect();
    let new_by: FastMap<u32, &rules::Rule> = new.iter().copied().collect();
    let differs = |s: &u32, r: &&rules::Rule, other: &FastMap<u32, &rules::Rule>| other.get(s).is_none_or(|o| o != r);
    (
        old.iter().filter(|(s, r)| differs(s, r, &new_by)).copied().collect(),
        new.iter().filter(|(s, r)| differs(s, r, &old_by)).copied().collect(),
    )
}

/// Writes index keys with their slots; a key with none is removed. `(index, index4)`: the wide index (the keys of
/// IPv6 and both-family rules), which the programs probe for IPv6 packets, and its IPv4 form (the keys of IPv4 and
/// both-family rules, `IndexKey::narrow`), which they probe for IPv4 packets.
fn write_index((index, index4): &(Batch, Batch), writes: &[(IndexKey, Vec<u32>)]) -> Result<()> {
    let (gone, kept): (Vec<_>, Vec<_>) = writes.iter().partition(|(_, slots)| slots.is_empty());
    let entries: Vec<(IndexKey, IndexEntry)> =
        kept.iter().map(|(k, slots)| (*k, IndexEntry::from_slots(slots))).collect();
    let entries4: Vec<(IndexKey4, IndexEntry)> = entries.iter().filter_map(|(k, e)| Some((k.narrow()?, *e))).collect();
    let gone: Vec<IndexKey> = gone.iter().map(|(k, _)| *k).collect();
    let gone4: Vec<IndexKey4> = gone.iter().filter_map(IndexKey::narrow).collect();
    // An IPv4 rule's keys go to the IPv4 index only: IPv6 packets, which probe the wide one, never meet them, and
    // 10,000 such keys cost the kernel about 10 ms per index.
    index.update(&entries.iter().filter(|(k, _)| k.in_wide_index()).copied().collect::<Vec<_>>())?;
    index4.update(&entries4)?;
    index.delete(&gone.iter().filter(|k| k.in_wide_index()).copied().collect::<Vec<_>>())?;
    index4.delete(&gone4)
}

/// Readers of the generation that was left at `flipped_ns` that may still be running are waited for. tc programs
/// run to completion in microseconds (their instruction count is bounded), so after `QUIET_NS` none is left; a
/// change sooner than that (back-to-back changes) waits for an RCU grace period: the kernel runs the programs inside
/// RCU read-side sections, and `membarrier(MEMBARRIER_CMD_GLOBAL)` returns after one (`synchronize_rcu`, ~10 ms here).
/// Where membarrier is unavailable, sleeping out the quiet time does the same.
fn wait_for_readers(flipped_ns: u64) {
    const QUIET_NS: u64 = 50_000_000;
    if monotonic_ns().saturating_sub(flipped_ns) >= QUIET_NS {
        return;
    }
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers; a failure is handled below.
    let ret =
        unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0 as libc::c_long, 0 as libc::c_long) };
    if ret != 0 {
        std::thread::sleep(std::time::Duration::from_nanos(QUIET_NS));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names the loader asks the object for (needs no root: this only parses the embedded ELF).
    #[test]
    fn embedded_object_has_every_map_and_program_the_loader_uses() {
        let obj = aya_obj::Object::parse(OBJECT).expect("parsing the embedded eBPF object");
        for name in names::MAPS {
            assert!(obj.maps.contains_key(name), "map {name} missing; the object has {:?}", obj.maps.keys());
        }
        let programs = PROGRAMS
            .iter()
            .map(|p| p.0)
            .chain(SOCK_PROGRAMS.iter().map(|p| p.0))
            .chain(names::TAIL_PROGRAMS.map(|p| p.0))
            .chain([names::PROG_XDP]);
        for name in programs {
            assert!(
                obj.programs.contains_key(name),
                "program {name} missing; the object has {:?}",
                obj.programs.keys()
            );
        }
        assert_eq!(
            obj.programs.len(),
            PROGRAMS.len() + SOCK_PROGRAMS.len() + names::TAIL_PROGRAMS.len() + 1,
            "a program the loader never loads"
        );
        assert!(obj.maps.contains_key(names::TAIL), "map {} missing", names::TAIL);
        assert_eq!(obj.maps.keys().filter(|m| m.starts_with("PFWD_")).count(), names::MAPS.len());
    }

    /// check_layout's direct read of the map definitions gives what aya-obj's full parse does, for every map.
    #[test]
    fn map_definitions_read_directly_match_aya_obj() {
        let full = aya_obj::Object::parse(OBJECT).expect("parsing the embedded eBPF object");
        let obj = object::File::parse(OBJECT).expect("parsing the embedded eBPF object");
        for name in names::MAPS {
            let want = &full.maps[name];
            let got = legacy_map_def(&obj, name).unwrap_or_else(|| panic!("map {name} not found in the maps section"));
            let want =
                MapDef { key_size: want.key_size(), value_size: want.value_size(), max_entries: want.max_entries() };
            assert_eq!(got, want, "map {name}");
        }
    }
}
