//! `pfwd serve`: the long-running agent. It attaches and applies a config file, then keeps the instance as the file
//! says: it re-applies the file when it changes ([`watch`]) or on SIGHUP, follows interfaces that are re-created and
//! addresses that change ([`netlink`], through [`control::follow_interfaces`]), serves `/metrics` and `/healthz`
//! ([`metrics`]) and streams the programs' log events. Every change goes through [`control`], as the commands' do, so
//! the agent and `pfwd` commands run side by side under the same instance lock.
//!
//! On SIGTERM/SIGINT it leaves the data path in place (a restart or an upgrade must not drop traffic; live flows keep
//! going), unless `--detach-on-exit`.

mod metrics;
mod netlink;
mod watch;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    control::{self, AttachOptions, Mode},
    netif,
    rules::{self, Rule},
    state::DataPath,
};

/// `pfwd serve`'s arguments.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Interfaces to attach to. Those missing at start (a PPP or WireGuard link not up yet) are attached when they
    /// appear. Optional when pfwd is already attached here (a restarted agent keeps the instance's interfaces).
    #[arg(value_name = "IFACE")]
    pub ifaces: Vec<String>,
    /// The TOML rules file: applied at start, re-applied when it changes or on SIGHUP (see `pfwd apply`).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics, and /healthz (e.g. 127.0.0.1:9469).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// On SIGTERM/SIGINT, detach (remove programs, rules and sysctl changes). By default the data path stays and
    /// keeps forwarding, so restarting the agent drops no traffic.
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Data path when attaching (see `pfwd attach --help`).
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// Connection-tracking capacity in entries (two per flow); used when the instance is first created.
    #[arg(long, value_name = "ENTRIES", default_value_t = pfwd_common::DEFAULT_CT_ENTRIES)]
    pub ct_size: u32,
}

/// What the agent tells `/metrics` about itself.
#[derive(Default)]
pub(crate) struct Agent {
    pub reloads_applied: AtomicU64,
    pub reloads_rejected: AtomicU64,
    pub interface_events: AtomicU64,
    /// Whether the file as it is now is what runs (false after a rejected file).
    pub config_ok: AtomicBool,
}

/// Why the agent looks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// Something happened in the config file's directory.
    File,
    /// The kernel reported a link or IPv4 address change.
    Links,
}

/// Runs the agent until SIGTERM/SIGINT.
pub fn run(args: ServeArgs) -> Result<()> {
    // netlink-packet-route warns about every attribute newer than itself (e.g. IFLA_INET6_CONF on new kernels): quiet
    // unless RUST_LOG names it.
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .filter_module("netlink_packet_route", log::LevelFilter::Error)
        .filter_module("netlink_packet_utils", log::LevelFilter::Error)
        .parse_env(env_logger::Env::default())
        .format_target(false)
        .init();
    // A file that does not parse stops the agent before it changes anything.
    let text = read(&args.config)?;
    parse(&args.config, &text)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    rt.block_on(serve(args, text))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))
}

fn parse(path: &Path, text: &str) -> Result<Vec<Rule>> {
    rules::parse_config(text).with_context(|| format!("in config {}", path.display()))
}

/// Runs blocking work (the control operations take a file lock and talk to the kernel or iptables) off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("a blocking task of pfwd serve panicked")
}

/// What the reconcile loop remembers between events.
struct Watcher {
    args: Arc<ServeArgs>,
    opts: AttachOptions,
    agent: Arc<Agent>,
    /// The file text last acted on (applied or rejected), so an event that changed nothing does nothing.
    last_text: Option<String>,
    /// Interfaces by name: the primary address last seen, or None while the device is gone.
    seen: HashMap<String, Option<Option<Ipv4Addr>>>,
}

async fn serve(args: ServeArgs, text: String) -> Result<()> {
    let args = Arc::new(args);
    let opts = AttachOptions { mode: args.mode, ct_entries: args.ct_size, ..Default::default() };
    let agent = Arc::new(Agent::default());
    let mut w = Watcher { args: args.clone(), opts, agent: agent.clone(), last_text: None, seen: HashMap::new() };

    // Watch before the first apply, so a change made while starting is not missed.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _file_watch = watch::watch(&args.config, tx.clone())?;
    netlink::spawn(tx.clone()).context("subscribing to netlink link and address events")?;

    w = blocking(move || {
        w.start(text)?;
        Ok::<_, anyhow::Error>(w)
    })
    .await?;
    if let Some(addr) = args.metrics {
        metrics::spawn(addr, agent.clone()).await?;
        log::info!("serving http://{addr}/metrics and /healthz");
    }
    let mode = blocking(control::status).await?.mode();
    if mode == Some(DataPath::Ebpf) {
        tokio::spawn(async {
            if let Err(e) = stream_events().await {
                log::warn!("kernel log events are not streamed: {e:#}");
            }
        });
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    log::info!("serving {}; edit the file or send SIGHUP to re-apply it", args.config.display());

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // File events are hints, and one was seen to go missing under load (an in-place write right after a rename):
    // the file's size and modification time are also checked every second, and a change reads it.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stamp = file_stamp(&args.config);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                let now = file_stamp(&args.config);
                if now != stamp {
                    stamp = now;
                    w = blocking(move || { w.reload(false); w }).await;
                }
            }
            _ = hup.recv() => {
                log::info!("SIGHUP: re-applying {}", args.config.display());
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                w = blocking(move || { w.reload(true); w }).await;
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            }
            Some(first) = rx.recv() => {
                // Editors and ConfigMap updates come as bursts of events, a link as several messages: act once.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let (mut file, mut links) = (first == Trigger::File, first == Trigger::Links);
                while let Ok(t) = rx.try_recv() {
                    file |= t == Trigger::File;
                    links |= t == Trigger::Links;
                }
                w = blocking(move || {
                    if links {
                        w.agent.interface_events.fetch_add(1, Ordering::Relaxed);
                        file |= w.follow_links();
                    }
                    if file {
                        w.reload(false);
                    }
                    w
                })
                .await;
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    blocking(move || -> Result<()> {
        if args.detach_on_exit {
            for n in control::detach()? {
                log::info!("{n}");
            }
        } else {
            if mode == Some(DataPath::Ebpf) {
                // Nobody reads the events any more: stop producing them.
                let _ = control::set_log_flags(0);
            }
            log::info!("exiting; the data path stays in place and keeps forwarding (`pfwd detach` removes it)");
        }
        Ok(())
    })
    .await
}

/// The config file's size and modification time (through symlinks, as a ConfigMap mount has them), if readable.
fn file_stamp(path: &Path) -> Option<(u64, std::time::SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

impl Watcher {
    /// Attaches the named interfaces that exist and applies the file.
    fn start(&mut self, text: String) -> Result<()> {
        let attached = control::current()?.map(|(_, i)| i).unwrap_or_default();
        let present: Vec<String> = self.args.ifaces.iter().filter(|i| netif::ifindex(i).is_ok()).cloned().collect();
        let missing: Vec<&String> = self.args.ifaces.iter().filter(|i| !present.contains(i)).collect();
        if attached.is_empty() && present.is_empty() {
            if self.args.ifaces.is_empty() {
                bail!(
                    "pfwd is not attached in this network namespace: name the interfaces (`pfwd serve IFACE... \
                     --config FILE`)"
                );
            }
            bail!("none of the interfaces {} exists", self.args.ifaces.join(", "));
        }
        if !present.is_empty() {
            for n in control::attach(&present, vec![], &self.opts)? {
                log::info!("{n}");
            }
        }
        for m in &missing {
            log::warn!("{m} does not exist yet; it is attached when it appears");
        }
        for i in control::current()?.map(|(_, i)| i).unwrap_or_default() {
            self.seen.insert(i.clone(), Some(netif::primary_ipv4(&i)));
        }
        let wanted = parse(&self.args.config, &text)?;
        self.last_text = Some(text);
        match control::apply_rules(&wanted) {
            Ok((plan, change)) => self.applied(&plan, change),
            // A rule for an interface that is not there yet: applied again when it appears.
            Err(e) if !missing.is_empty() => self.rejected(&e),
            Err(e) => return Err(e.context(format!("applying {}", self.args.config.display()))),
        }
        Ok(())
    }

    fn applied(&self, plan: &control::ApplyPlan, change: Option<control::Change>) {
        self.agent.config_ok.store(true, Ordering::Relaxed);
        self.agent.reloads_applied.fetch_add(1, Ordering::Relaxed);
        let Some(change) = change else {
            log::info!("{}: {} rules, already running; nothing to change", self.args.config.display(), plan.keep.len());
            return;
        };
        for r in &plan.remove {
            log::info!("removed rule {}: {r}", r.id);
        }
        for (id, r) in change.added.iter().zip(&plan.add) {
            log::info!("added rule {id}: {r}");
        }
        for n in &change.notes {
            log::info!("{n}");
        }
        log::info!(
            "applied {}: {} kept, {} removed, {} added",
            self.args.config.display(),
            plan.keep.len(),
            plan.remove.len(),
            plan.add.len()
        );
    }

    fn rejected(&self, e: &anyhow::Error) {
        self.agent.config_ok.store(false, Ordering::Relaxed);
        self.agent.reloads_rejected.fetch_add(1, Ordering::Relaxed);
        log::warn!("rejected {}: {e:#}; the running rules stay as they were", self.args.config.display());
    }

    /// Reads the file and, when it changed (or `force`), applies it.
    fn reload(&mut self, force: bool) {
        let text = match read(&self.args.config) {
            Ok(t) => t,
            // Between an editor's delete and create, or a ConfigMap's swap: the next event brings the file.
            Err(e) if !force => {
                log::debug!("{e:#}");
                return;
            }
            Err(e) => return self.rejected(&e),
        };
        if !force && self.last_text.as_deref() == Some(text.as_str()) {
            return;
        }
        self.last_text = Some(text.clone());
        match parse(&self.args.config, &text).and_then(|wanted| control::apply_rules(&wanted)) {
            Ok((plan, change)) => self.applied(&plan, change),
            Err(e) => self.rejected(&e),
        }
    }

    /// After link or address events: attaches named interfaces that appeared, re-attaches re-created ones, refreshes
    /// addresses. Returns whether the file should be applied again (an interface its rules may name appeared).
    fn follow_links(&mut self) -> bool {
        let mut reapply = false;
        let attached = match control::current() {
            Ok(a) => a.map(|(_, i)| i).unwrap_or_default(),
            Err(e) => {
                log::warn!("reading the instance: {e:#}");
                return false;
            }
        };
        let appeared: Vec<String> =
            self.args.ifaces.iter().filter(|i| !attached.contains(i) && netif::ifindex(i).is_ok()).cloned().collect();
        if !appeared.is_empty() {
            match control::attach(&appeared, vec![], &self.opts) {
                Ok(notes) => {
                    notes.iter().for_each(|n| log::info!("{n}"));
                    reapply = true;
                }
                Err(e) => log::warn!("attaching {}: {e:#}", appeared.join(", ")),
            }
        }
        match control::follow_interfaces() {
            Ok(notes) => {
                reapply |= !notes.is_empty();
                notes.iter().for_each(|n| log::info!("{n}"));
            }
            Err(e) => log::warn!("following interface changes: {e:#}"),
        }
        let names = control::current().ok().flatten().map(|(_, i)| i).unwrap_or_default();
        for name in names {
            let now = netif::ifindex(&name).ok().map(|_| netif::primary_ipv4(&name));
            let before = self.seen.insert(name.clone(), now);
            match (before.flatten(), now) {
                (Some(_), None) => log::warn!("{name} is gone; it is re-attached when it comes back"),
                (Some(old), Some(new)) if old != new => {
                    let show = |a: Option<Ipv4Addr>| a.map_or("none".to_string(), |a| a.to_string());
                    log::info!("{name}: address {} -> {} (REDIRECT and MASQUERADE use it)", show(old), show(new));
                }
                _ => {}
            }
        }
        // Rejected while an interface it names was missing: try the file again.
        reapply && !self.agent.config_ok.load(Ordering::Relaxed)
    }
}

/// Streams the programs' log events (new flows, drops) through `log`, like `pfwd run`.
async fn stream_events() -> Result<()> {
    let logger = blocking(|| -> Result<_> {
        control::set_log_flags(pfwd_common::config_flag::LOG_EVENTS)?;
        let inst = crate::instance::Instance::current()?;
        aya_log::EbpfLogger::init_from_id(crate::loader::Kernel::new(&inst).ingress_program_id()?)
            .context("opening the programs' log ring buffer")
    })
    .await?;
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the same until the logger (moved into the
    // AsyncFd) is dropped.
    let mut fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the log ring buffer: {e}"))?;
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
