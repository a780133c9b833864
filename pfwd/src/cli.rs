//! Command-line interface: argument parsing (clap), and human or JSON output of each command.
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;
use pfwd_common::config_flag;
use serde_json::Value;

use crate::{
    control::{self, AttachOptions, Mode},
    iptables,
    loader::Kernel,
    rules::{self, PortRange, Proto, Rule, Target},
};

const ABOUT: &str = "Port forwarding and NAT in eBPF, driven like `iptables -t nat`.";
const LONG_ABOUT: &str = "\
Port forwarding and NAT in eBPF, driven like `iptables -t nat`.

pfwd attaches small TC (tcx) programs to network interfaces. They translate the first packet of each flow by the
best matching rule, remember the translation in a BPF connection-tracking table, and translate the rest of the flow
and its replies. The programs stay attached after pfwd exits; state is pinned per network namespace.

Typical use:
  pfwd attach eth0                                              # load and attach
  pfwd add redirect -p tcp --dport 80 --to-port 3000            # iptables ... -j REDIRECT --to-port 3000
  pfwd add dnat -i eth0 -p tcp --dport 3306 --to 127.0.0.1:3306 # DNAT to a loopback-only service
  pfwd add dnat -p tcp --dport 8000-8099 --to 10.0.2.2          # forward a port range, keeping the port
  pfwd status                                                   # rules with counters, conntrack
  pfwd detach                                                   # remove everything, restore sysctls

When several rules match, the most specific wins: a rule with a (narrower) --dport, then with -p, with -i, the
longer -s prefix, the longer -d prefix, then the older rule. The iptables export uses the same order.

Modes: eBPF (tcx programs) by default; iptables rules in pfwd's own chains where eBPF cannot run (`--mode auto`
falls back by itself and says why). `pfwd export` and `pfwd import` convert to and from iptables syntax.";

#[derive(Parser)]
#[command(
    name = "pfwd",
    // The source hash (pfwd/build.rs) tells which tree a binary was built from; the test lab checks it.
    version = concat!(env!("CARGO_PKG_VERSION"), " (source ", env!("PFWD_SOURCE_HASH"), ")"),
    about = ABOUT,
    long_about = LONG_ABOUT
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load pfwd in this network namespace and attach it to interfaces (keeps working after pfwd exits).
    Attach(AttachArgs),
    /// Like attach, but stay in the foreground: stream new flows, drops and counters; detach on Ctrl-C/SIGTERM.
    Run(RunArgs),
    /// Add a rule.
    #[command(subcommand)]
    Add(AddCmd),
    /// Delete a rule by id (see `pfwd list`). Flows already translated keep going until they end.
    Del {
        /// Rule id.
        id: u32,
    },
    /// List the rules.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show mode, interfaces, rules with counters, conntrack and the sysctls pfwd changed.
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Remove every program, pin and setting pfwd made in this namespace; restore changed sysctls.
    Detach,
    /// List live translations, like `conntrack -L`: original and translated tuples, rule, age, state.
    Conntrack {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Print the rules (of this instance, or of --config) as iptables-restore input or an nftables script.
    Export {
        /// Output format.
        #[arg(value_enum)]
        format: ExportFormat,
        /// Export this TOML file's rules instead of the running instance's.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Read iptables NAT rules (iptables-save output or `iptables -t nat -A ...` lines) and add them.
    ///
    /// All or nothing: one bad line rejects the whole input, naming the line and the token. Rules already present
    /// are skipped. With --dry-run, print the rules in pfwd's syntax and change nothing.
    Import {
        /// File to read; `-` or nothing reads stdin.
        file: Option<PathBuf>,
        /// Only print the converted rules.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// iptables-restore input for `iptables-restore --noflush` (only pfwd's own chains and hooks).
    Iptables,
    /// An nftables script in its own table (`nft -f`).
    Nft,
}

#[derive(Args)]
struct AttachArgs {
    /// Interfaces to attach to (TC ingress and egress).
    #[arg(required = true, value_name = "IFACE")]
    ifaces: Vec<String>,
    /// TOML file of rules to add (see README: [[rule]] tables with kind, iface, proto, src, dst, dport, to, to_port).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data path: auto = eBPF, or iptables when the kernel has no BTF (PFWD_BTF_PATH overrides where to look)
    /// or eBPF fails to load or attach.
    #[arg(long, value_enum, default_value = "auto")]
    mode: Mode,
    /// Connection-tracking capacity in entries (two per flow); used when the instance is first created.
    #[arg(long, value_name = "ENTRIES", default_value_t = pfwd_common::DEFAULT_CT_ENTRIES)]
    ct_size: u32,
    /// Idle timeout of a conntrack state, in seconds (repeatable; eBPF mode): tcp_syn (60), tcp_established
    /// (21600), tcp_close (10), udp (60), other (30, ICMP included). In iptables mode netfilter's own
    /// nf_conntrack_* sysctls apply.
    #[arg(long, value_name = "NAME=SECS", value_parser = control::parse_timeout)]
    ct_timeout: Vec<(String, u32)>,
    /// Forwarded packets of translated flows skip the IP stack (FIB lookup, TTL decrement, bpf_redirect_neigh to
    /// the next hop): routing speed with NAT. They then also skip netfilter (your FORWARD rules, conntrack,
    /// tcpdump on the way in sees them, on the way out may not), which is why it is off by default. eBPF mode only.
    #[arg(long)]
    fast_forward: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    attach: AttachArgs,
    /// Also log every translated packet (verbose; slows the data path).
    #[arg(long)]
    trace: bool,
    /// Seconds between counter lines.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    interval: u64,
}

#[derive(Subcommand)]
enum AddCmd {
    /// Rewrite the destination (iptables -t nat -A PREROUTING ... -j DNAT --to-destination ADDR[:PORT]).
    Dnat {
        #[command(flatten)]
        m: MatchArgs,
        /// New destination: ADDR keeps the port, ADDR:PORT also rewrites it (needs -p).
        #[arg(long, alias = "to-destination", value_name = "ADDR[:PORT]", value_parser = parse_to)]
        to: (Ipv4Addr, Option<u16>),
    },
    /// Send to this machine, on the incoming interface's address (iptables ... -j REDIRECT --to-ports PORT).
    Redirect {
        #[command(flatten)]
        m: MatchArgs,
        /// New destination port.
        #[arg(long, alias = "to-ports", value_name = "PORT", value_parser = rules::parse_port)]
        to_port: u16,
    },
    /// Rewrite the source where packets leave through an attached interface (iptables -t nat -A POSTROUTING ...
    /// -j SNAT --to-source ADDR[:PORTS]).
    ///
    /// Matches packets by the interface they leave through (-o), protocol, source and destination; the first packet
    /// of each flow picks the translation, and replies are translated back automatically. The source port is kept
    /// when free, else a free one is taken from the range (1024-65535 without one).
    Snat {
        #[command(flatten)]
        m: PostMatchArgs,
        /// New source: ADDR, or ADDR:LO-HI to take source ports from that range (ADDR:PORT for one; needs -p).
        #[arg(long, alias = "to-source", value_name = "ADDR[:LO-HI]", value_parser = rules::parse_snat_to)]
        to: (Ipv4Addr, Option<PortRange>),
    },
    /// SNAT to the outgoing interface's current address, for dynamic addresses (iptables ... -j MASQUERADE).
    ///
    /// The address is the interface's primary IPv4 address when the flow starts; replies are translated back
    /// automatically. The source port is kept when free, else a free one is taken from --to-ports (1024-65535
    /// without it).
    Masquerade {
        #[command(flatten)]
        m: PostMatchArgs,
        /// Source ports to use when the original one is taken: LO-HI, or one PORT (needs -p).
        #[arg(long, alias = "to-port", value_name = "LO-HI")]
        to_ports: Option<PortRange>,
    },
}

#[derive(Args)]
struct MatchArgs {
    /// Only packets arriving on this (attached) interface.
    #[arg(short = 'i', long = "in-interface", value_name = "IFACE")]
    iface: Option<String>,
    /// Only this protocol (required with --dport, redirect and --to ADDR:PORT). Omit to match all protocols.
    #[arg(short = 'p', long = "protocol", value_name = "tcp|udp")]
    proto: Option<Proto>,
    /// Only from this source address or CIDR.
    #[arg(short = 's', long = "source", value_name = "CIDR", value_parser = rules::parse_cidr)]
    src: Option<Ipv4Net>,
    /// Only to this destination address or CIDR.
    #[arg(short = 'd', long = "destination", value_name = "ADDR[/LEN]", value_parser = rules::parse_cidr)]
    dst: Option<Ipv4Net>,
    /// Only to this destination port or range (PORT or LO-HI).
    #[arg(long, alias = "destination-port", value_name = "PORT[-PORT]")]
    dport: Option<PortRange>,
    /// Accepted only to be refused with a hint (DNAT happens where packets arrive: -i).
    #[arg(short = 'o', long = "out-interface", value_name = "IFACE", hide = true)]
    oface: Option<String>,
    /// Apply to connections made by local processes (the iptables OUTPUT chain) instead of arriving packets.
    /// eBPF mode translates TCP and UDP at connect/send time with cgroup socket hooks (applications still see the
    /// address they asked for); ICMP and raw sockets are not covered there (use --mode iptables for those).
    /// Not with -i or -s.
    #[arg(long)]
    local: bool,
}

/// The match of snat and masquerade: they apply where packets leave, so the interface is the outgoing one.
#[derive(Args)]
struct PostMatchArgs {
    /// Only packets leaving through this (attached) interface.
    #[arg(short = 'o', long = "out-interface", value_name = "IFACE")]
    oface: Option<String>,
    /// Only this protocol (required with a port range). Omit to match all protocols.
    #[arg(short = 'p', long = "protocol", value_name = "tcp|udp")]
    proto: Option<Proto>,
    /// Only from this source address or CIDR.
    #[arg(short = 's', long = "source", value_name = "CIDR", value_parser = rules::parse_cidr)]
    src: Option<Ipv4Net>,
    /// Only to this destination address or CIDR.
    #[arg(short = 'd', long = "destination", value_name = "ADDR[/LEN]", value_parser = rules::parse_cidr)]
    dst: Option<Ipv4Net>,
    /// Accepted only to be refused with a hint (SNAT happens where packets leave: -o).
    #[arg(short = 'i', long = "in-interface", value_name = "IFACE", hide = true)]
    iface: Option<String>,
    /// Accepted only to be refused with a hint (snat/masquerade match -o, -p, -s, -d).
    #[arg(long, alias = "destination-port", value_name = "PORT[-PORT]", hide = true)]
    dport: Option<PortRange>,
}

fn parse_to(s: &str) -> Result<(Ipv4Addr, Option<u16>), String> {
    rules::parse_to(s).map_err(|e| e.to_string())
}

impl MatchArgs {
    fn into_rule(self, target: Target) -> Rule {
        let mut r = Rule {
            id: 0,
            iface: self.iface,
            oface: self.oface,
            proto: self.proto,
            src: self.src,
            dst: self.dst,
            dport: self.dport,
            local: self.local,
            target,
        };
        r.normalize();
        r
    }
}

impl PostMatchArgs {
    /// The hidden -i/--dport are carried into the rule so validation refuses them with the hint.
    fn into_rule(self, target: Target) -> Rule {
        MatchArgs {
            iface: self.iface,
            proto: self.proto,
            src: self.src,
            dst: self.dst,
            dport: self.dport,
            oface: self.oface,
            local: false,
        }
        .into_rule(target)
    }
}

fn read_config(path: &Option<PathBuf>) -> Result<Vec<Rule>> {
    let Some(path) = path else { return Ok(vec![]) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    rules::parse_config(&text).with_context(|| format!("in config {}", path.display()))
}

fn attach_opts(a: &AttachArgs) -> AttachOptions {
    let mut config = pfwd_common::Config::default();
    for (name, secs) in &a.ct_timeout {
        control::set_timeout(&mut config, name, *secs);
    }
    if a.fast_forward {
        config.flags |= pfwd_common::config_flag::FAST_FORWARD;
    }
    AttachOptions {
        mode: a.mode,
        ct_entries: a.ct_size,
        config,
        timeouts: a.ct_timeout.clone(),
        fast_forward: a.fast_forward,
    }
}

fn print_notes(notes: &[String]) {
    for n in notes {
        println!("{n}");
    }
}

pub fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away (`pfwd status | head`).
    // SAFETY: restoring the default disposition of a signal before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pfwd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Attach(a) => {
            let rules = read_config(&a.config)?;
            print_notes(&control::attach(&a.ifaces, rules, &attach_opts(&a))?);
        }
        Cmd::Run(r) => run_foreground(r)?,
        Cmd::Add(add) => {
            let rule = match add {
                AddCmd::Dnat { m, to: (addr, port) } => m.into_rule(Target::Dnat { addr, port }),
                AddCmd::Redirect { m, to_port } => m.into_rule(Target::Redirect { port: to_port }),
                AddCmd::Snat { m, to: (addr, ports) } => m.into_rule(Target::Snat { addr, ports }),
                AddCmd::Masquerade { m, to_ports } => m.into_rule(Target::Masquerade { ports: to_ports }),
            };
            let (id, notes) = control::add(rule)?;
            println!("{id}");
            for n in notes {
                eprintln!("pfwd: {n}");
            }
        }
        Cmd::Del { id } => {
            let (rule, notes) = control::del(id)?;
            println!("deleted rule {id}: {rule}");
            print_notes(&notes);
        }
        Cmd::List { json } => {
            let rules = control::list()?;
            if json {
                let v: Vec<Value> = rules.iter().map(|r| control::rule_json(r, None)).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if rules.is_empty() {
                println!("no rules");
            } else {
                for r in &rules {
                    println!("{:>4}  {r}", r.id);
                }
            }
        }
        Cmd::Status { json } => {
            let s = control::status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
        }
        Cmd::Detach => print_notes(&control::detach()?),
        Cmd::Export { format, config } => {
            let (rules, ifaces) = match &config {
                // A file's rules have no ids yet: number them in file order, as `attach --config` would.
                Some(_) => (
                    read_config(&config)?
                        .into_iter()
                        .enumerate()
                        .map(|(i, mut r)| {
                            if r.id == 0 {
                                r.id = i as u32 + 1;
                            }
                            r
                        })
                        .collect(),
                    None,
                ),
                None => control::current()?.map(|(r, i)| (r, Some(i))).context(
                    "pfwd is not attached in this network namespace: attach it, or export a file with --config FILE",
                )?,
            };
            let ifaces = ifaces.as_deref();
            print!(
                "{}",
                match format {
                    ExportFormat::Iptables => iptables::export_iptables(&rules, ifaces),
                    ExportFormat::Nft => iptables::export_nft(&rules, ifaces),
                }
            );
        }
        Cmd::Import { file, dry_run } => import(file, dry_run)?,
        Cmd::Conntrack { json } => {
            let flows = control::conntrack_list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
            } else if flows.is_empty() {
                println!("no live translations");
            } else {
                let t = |v: &Value| {
                    format!(
                        "{}:{} -> {}:{}",
                        v["src"].as_str().unwrap_or("?"),
                        v["sport"],
                        v["dst"].as_str().unwrap_or("?"),
                        v["dport"]
                    )
                };
                for f in &flows {
                    println!(
                        "{:<4} {:<4} {:<44} => {:<44} rule {:<5} {:<12} idle {:.0}s",
                        f["proto"].as_str().unwrap_or("?"),
                        f["nat"].as_str().unwrap_or("?"),
                        t(&f["original"]),
                        if f["translated"].is_null() { t(&f["reply"]) } else { t(&f["translated"]) },
                        f["rule"].to_string(),
                        f["state"].as_str().unwrap_or("-"),
                        f["idle_s"].as_f64().unwrap_or(0.0)
                    );
                }
            }
        }
    }
    Ok(())
}

fn import(file: Option<PathBuf>, dry_run: bool) -> Result<()> {
    let text = match file.as_deref() {
        None => std::io::read_to_string(std::io::stdin()).context("reading stdin")?,
        Some(p) if p.as_os_str() == "-" => std::io::read_to_string(std::io::stdin()).context("reading stdin")?,
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
    };
    let imported = iptables::import(&text)?;
    for w in &imported.warnings {
        eprintln!("pfwd: warning: {w}");
    }
    if dry_run {
        for r in &imported.rules {
            println!("pfwd add {r}");
        }
        return Ok(());
    }
    let (ids, notes) = control::add_many(imported.rules, true)?;
    for n in notes {
        eprintln!("pfwd: {n}");
    }
    // Ids are consecutive: name the range, not ten thousand numbers.
    match (ids.first(), ids.last()) {
        (Some(a), Some(b)) if a == b => println!("imported 1 rule: id {a}"),
        (Some(a), Some(b)) => println!("imported {} rules: ids {a}-{b}", ids.len()),
        _ => println!("imported 0 rules (all were already there)"),
    }
    Ok(())
}

fn print_status(s: &Value) {
    if s["attached"] != true {
        println!("pfwd is not attached in this network namespace");
        return;
    }
    let ifaces: Vec<String> = s["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| format!("{} ({})", i["name"].as_str().unwrap_or("?"), i["address"].as_str().unwrap_or("no IPv4")))
        .collect();
    println!("mode:       {} ({})", s["mode"].as_str().unwrap_or("?"), s["mode_reason"].as_str().unwrap_or(""));
    println!("interfaces: {}", ifaces.join(", "));
    if s["fast_forward"] == true {
        println!("fast path:  on (forwarded packets of translated flows skip the IP stack and netfilter)");
    }
    let rules = s["rules"].as_array().cloned().unwrap_or_default();
    if rules.is_empty() {
        println!("rules:      none (add one with `pfwd add dnat|redirect|snat|masquerade ...`)");
    } else {
        println!("rules:");
        println!("  {:>4}  {:>7}  {:>9}  {:>11}  {:>6}  RULE", "ID", "FLOWS", "PACKETS", "BYTES", "DROPS");
        for r in &rules {
            // serde_json's Display ignores width: format the numbers as strings.
            let n = |k: &str| r[k].to_string();
            println!(
                "  {:>4}  {:>7}  {:>9}  {:>11}  {:>6}  {}",
                n("id"),
                n("flows"),
                n("packets"),
                n("bytes"),
                n("drops"),
                r["text"].as_str().unwrap_or("")
            );
        }
    }
    let ct = &s["conntrack"];
    let mem = ct["maps_memory_bytes"].as_u64().map(|b| format!(", BPF maps {:.1} MiB", b as f64 / 1048576.0));
    println!(
        "conntrack:  {} live entries ({} flows), capacity {} entries{}",
        ct["entries"],
        ct["flows"],
        ct["capacity"],
        mem.unwrap_or_default()
    );
    let stats: Vec<String> = s["stats"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.as_u64() != Some(0))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !stats.is_empty() {
        println!("counters:   {}", stats.join(" "));
    }
    for c in s["sysctls"].as_array().into_iter().flatten() {
        println!(
            "sysctl:     {} (was {}): {}",
            c["key"].as_str().unwrap_or("").replace('/', "."),
            c["previous"].as_str().unwrap_or(""),
            c["reason"].as_str().unwrap_or("")
        );
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// `pfwd run`: attach, stream log events and counters, detach on Ctrl-C or SIGTERM.
fn run_foreground(r: RunArgs) -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_target(false).init();
    if control::status()?["attached"] == true {
        anyhow::bail!("pfwd is already attached in this network namespace (see `pfwd status`); `pfwd detach` first");
    }
    let rules = read_config(&r.attach.config)?;
    for n in control::attach(&r.attach.ifaces, rules, &attach_opts(&r.attach))? {
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
    let mut logger = if control::status()?["mode"] == "ebpf" {
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
            let s = control::status()?;
            let per_rule: Vec<String> = s["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| format!("#{}: {} flows {} pkts", x["id"], x["flows"], x["packets"]))
                .collect();
            log::info!("conntrack {} flows | {}", s["conntrack"]["flows"], per_rule.join(" | "));
        }
    }
    Ok(())
}
