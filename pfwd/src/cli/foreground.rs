//! `pfwd run`: attach in the foreground, stream the programs' log events and the counters, detach on Ctrl-C or
//! SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pfwd_common::config_flag;

use super::output::or;
use super::{RunArgs, attach_opts, read_config};
use crate::{control, loader::Kernel, report::Status, state::DataPath};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// `pfwd run`: attach, stream log events and counters, detach on Ctrl-C or SIGTERM.
pub(super) fn run_foreground(r: RunArgs) -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_target(false).init();
    if let Status::Attached(_) = control::status()? {
        anyhow::bail!("pfwd is already attached in this network namespace (see `pfwd status`); `pfwd detach` first");
    }
    let rules = read_config(&r.attach.config)?;
    // Log events from the first packet on: set with the instance, not after it is attached (a flow that starts in
    // between would go unreported; the ring buffer keeps events until the reader below opens it).
    let mut opts = attach_opts(&r.attach);
    opts.config.flags |= config_flag::LOG_EVENTS | if r.trace { config_flag::LOG_PACKETS } else { 0 };
    for n in control::attach(&r.attach.ifaces, rules, &opts)? {
        log::info!("{n}");
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let result = stream(&r);
    for n in control::detach()? {
        log::info!("{n}");
    }
    result
}

fn stream(r: &RunArgs) -> Result<()> {
    // Kernel log events exist only in eBPF mode; iptables mode streams counters alone.
    let mut logger = if control::status()?.mode() == Some(DataPath::Ebpf) {
        let flags = config_flag::LOG_EVENTS | if r.trace { config_flag::LOG_PACKETS } else { 0 };
        control::set_log_flags(flags)?;
        let inst = crate::instance::Instance::current()?;
        Some(
            aya_log::EbpfLogger::init_from_id(Kernel::new(&inst).ingress_program_id()?)
                .context("opening the programs' log ring buffer")?,
        )
    } else {
        None
    };
    log::info!("streaming events; Ctrl-C detaches and restores everything");
    let interval = Duration::from_secs(r.interval.max(1));
    let mut last = Instant::now();
    while !STOP.load(Ordering::SeqCst) {
        match &mut logger {
            Some(logger) => {
                let fd = std::os::fd::AsRawFd::as_raw_fd(logger);
                let mut fds = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }];
                // SAFETY: one valid pollfd; EINTR (our signal) just ends the wait.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, 500) };
                logger.flush();
            }
            None => std::thread::sleep(Duration::from_millis(500)),
        }
        if last.elapsed() >= interval {
            last = Instant::now();
            let (flows, per_rule) = match control::status()? {
                Status::Attached(s) => (
                    or(s.conntrack.flows(), "null"),
                    s.rules
                        .iter()
                        .map(|r| format!("#{}: {} flows {} pkts", r.rule.id, r.counters.flows, r.counters.packets))
                        .collect(),
                ),
                // Detached under us by another `pfwd detach`.
                Status::NotAttached => ("0".into(), vec![]),
            };
            log::info!("conntrack {flows} flows | {}", per_rule.join(" | "));
        }
    }
    Ok(())
}
