//! Command-line interface: the clap definitions of every command and what each prints (human or `--json`). The
//! rule options of `pfwd add` are in [`add`], `pfwd run`'s foreground loop in [`foreground`], the human status in
//! [`output`].

mod add;
mod foreground;
mod output;

use std::{path::PathBuf, process::ExitCode};

use add::AddCmd;
pub use add::parse_rule;
use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use foreground::run_foreground;
use output::{or, print_status};

use crate::rules::model::Family;
use crate::{
    control::{self, AttachOptions, Mode},
    iptables,
    report::{FlowTuple, Status},
    rules::{self, Rule},
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

Modes: eBPF (tcx programs) by default; where eBPF cannot run, nftables rules in pfwd's own table (constant-time
lookup; IPv4 and IPv6), or iptables rules in pfwd's own chains where nft is not usable (`--mode auto` falls back by
itself and says why). IPv4 and IPv6 run in every mode. `pfwd export` and `pfwd import` convert to and from
iptables, ip6tables and nft syntax.";

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
    /// Make the rules exactly those of a TOML config file, as one change (all or nothing).
    ///
    /// Rules are matched by what they match and do: a rule in both the running set and the file keeps its id, its
    /// counters and its live flows; running rules the file lacks are removed; the file's new rules are added (ids in
    /// the file are not used for matching). With IFACEs, attaches to them first (like `pfwd attach`). --dry-run prints
    /// the difference and changes nothing.
    Apply {
        /// Interfaces to attach to first (when not attached yet, or to add interfaces).
        #[arg(value_name = "IFACE")]
        ifaces: Vec<String>,
        /// The TOML file of rules (the format of `pfwd save` and `attach --config`).
        #[arg(long, value_name = "FILE", required = true)]
        config: Option<PathBuf>,
        /// Print what would be kept, removed and added; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Data path when attaching (see `pfwd attach --help`).
        #[arg(long, value_enum, default_value = "auto")]
        mode: Mode,
    },
    /// Run as a service: attach, apply a config file and keep it applied (file changes, SIGHUP, interfaces).
    ///
    /// Applies FILE at start (like `pfwd apply`), then re-applies it whenever it changes (an editor's save, a
    /// ConfigMap update) or on SIGHUP, logging what changed or why the file was rejected (the running rules then
    /// stay). Follows interfaces over netlink: an attached interface deleted and re-created under the same name is
    /// re-attached, and REDIRECT/MASQUERADE follow address changes. Streams the kernel's flow events to stderr.
    /// With --metrics, serves Prometheus metrics on /metrics and a liveness check on /healthz.
    /// SIGTERM leaves the data path forwarding (restarting the service drops no traffic) unless --detach-on-exit.
    /// Signals readiness to systemd (Type=notify); contrib/systemd/pfwd.service runs it at boot.
    ///
    /// Example: `pfwd serve eth0 eth1 --config /etc/pfwd/rules.toml --metrics 127.0.0.1:9469`
    Serve(crate::serve::ServeArgs),
    /// Print the running rules as a TOML config file that `pfwd apply --config` and `attach --config` accept.
    Save,
    /// Print a shell completion script: `pfwd completions bash > /etc/bash_completion.d/pfwd`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `pfwd manpage > /usr/local/share/man/man8/pfwd.8`.
    Manpage,
    /// Like attach, but stay in the foreground: stream new flows, drops and counters; detach on Ctrl-C/SIGTERM.
    Run(RunArgs),
    /// Add a rule.
    #[command(subcommand)]
    Add(AddCmd),
    /// Delete rules by id (see `pfwd list`): `pfwd del 3 5-9`. All or nothing: an id that does not exist (or a range
    /// with no rule in it) changes nothing. Flows already translated keep going until they end, unless --flows.
    Del {
        /// Rule ids, and ranges LO-HI (which delete the rules that exist in them).
        #[arg(required = true, value_name = "ID|LO-HI", value_parser = parse_id_range)]
        ids: Vec<(u32, u32)>,
        /// Also end the live flows these rules translated (both directions, like `conntrack -D`), so their next
        /// packets meet the rules as they are now.
        #[arg(long)]
        flows: bool,
    },
    /// Remove every rule (or those of one hook) and stay attached, like `iptables -t nat -F`.
    ///
    /// Sysctls that only the removed rules needed are restored. Live flows keep their translation until they end, as
    /// after `iptables -t nat -F`: `pfwd conntrack --flush` ends them.
    Flush {
        /// Only the dnat/redirect rules on arriving packets (iptables PREROUTING).
        #[arg(long, group = "scope")]
        inbound: bool,
        /// Only the snat/masquerade rules (iptables POSTROUTING).
        #[arg(long, group = "scope")]
        outbound: bool,
        /// Only the --local rules (iptables OUTPUT).
        #[arg(long, group = "scope")]
        local: bool,
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
    ///
    /// With --flush, end live translations instead (both directions of each flow, like `conntrack -D`/`-F`): the
    /// next packets of those flows meet the rules as they are now. The filters pick which: by the rule that made
    /// them, and by the flow's original tuple. In eBPF mode an ended TCP connection is cut (a packet in the middle
    /// of a connection never starts a flow); in iptables mode netfilter may pick it up again under the current rules.
    Conntrack {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
        /// End the matching live translations (all of pfwd's, without filters); prints how many.
        #[arg(long)]
        flush: bool,
        /// Only flows translated by this rule (repeatable).
        #[arg(long, value_name = "ID", requires = "flush")]
        rule: Vec<u32>,
        /// Only flows from this source address or CIDR (as the flow's first packet had it).
        #[arg(short = 's', long = "source", value_name = "ADDR[/LEN]", requires = "flush", value_parser = cidr)]
        src: Option<ipnet::IpNet>,
        /// Only flows to this original destination address or CIDR.
        #[arg(short = 'd', long = "destination", value_name = "ADDR[/LEN]", requires = "flush", value_parser = cidr)]
        dst: Option<ipnet::IpNet>,
        /// Only this protocol.
        #[arg(short = 'p', long = "protocol", value_name = "tcp|udp", requires = "flush")]
        proto: Option<rules::Proto>,
        /// Only flows to this original destination port or range.
        #[arg(long, value_name = "PORT[-PORT]", requires = "flush")]
        dport: Option<rules::PortRange>,
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
    /// iptables-restore input for `iptables-restore --noflush` (only pfwd's own chains and hooks): the IPv4 rules
    /// and the rules for both families.
    Iptables,
    /// The same for `ip6tables-restore --noflush`: the IPv6 rules and the rules for both families.
    Ip6tables,
    /// An nftables script in its own table, both families (`table inet pfwd`; `nft -f`).
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
    /// Data path: auto = eBPF, or nft (iptables where nft is not usable) when the kernel has no BTF
    /// (PFWD_BTF_PATH overrides where to look) or eBPF fails to load or attach.
    #[arg(long, value_enum, default_value = "auto")]
    mode: Mode,
    /// Connection-tracking capacity in entries (two per flow); used when the instance is first created.
    #[arg(long, value_name = "ENTRIES", default_value_t = pfwd_common::DEFAULT_CT_ENTRIES)]
    ct_size: u32,
    /// Idle timeout of a conntrack state, in seconds (repeatable; eBPF mode): tcp_syn (10, until the client's ACK
    /// confirms the flow), tcp_established (21600), tcp_close (10), udp (60), other (30, ICMP included). In
    /// iptables mode netfilter's own nf_conntrack_* sysctls apply.
    #[arg(long, value_name = "NAME=SECS", value_parser = control::parse_timeout)]
    ct_timeout: Vec<(String, u32)>,
    /// Forwarded packets of translated flows skip the IP stack's forwarding (FIB lookup, TTL decrement,
    /// bpf_redirect_neigh to the next hop): it saves the stack's work, not pfwd's (see the README's Benchmarks).
    /// They then also skip netfilter (your FORWARD rules, conntrack, tcpdump on the way in sees them, on the way out
    /// may not), which is why it is off by default. eBPF mode only.
    #[arg(long)]
    fast_forward: bool,
    /// XDP fast path on these interfaces (eBPF mode): packets of established flows that this host forwards are
    /// translated, routed and sent to the egress interface in XDP, before the kernel builds an skb; everything else
    /// (new flows, local traffic, ICMP, fragments, IPv6) goes on to the tc programs. Native mode where the driver
    /// has it, generic otherwise (`pfwd status` says which). Like --fast-forward it skips netfilter for those
    /// packets, so it is off by default. Send-to interfaces need XDP too: attach them all with --xdp. With the
    /// default --mode auto, a failure is reported, not answered by falling back to netfilter (which has no XDP).
    #[arg(long)]
    xdp: bool,
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
        xdp: a.xdp,
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
    if !matches!(cli.cmd, Cmd::Run(_) | Cmd::Serve(_)) {
        // `PFWD_LOG=debug pfwd add ...` says how a change was made (`run` and `serve` log on their own terms).
        let env = env_logger::Env::new().filter_or("PFWD_LOG", "warn");
        let _ = env_logger::Builder::from_env(env).format_target(false).try_init();
    }
    match cli.cmd {
        Cmd::Attach(a) => {
            // Read once the instance is known: a new one loads its programs meanwhile.
            print_notes(&control::attach_reading(&a.ifaces, || read_config(&a.config), &attach_opts(&a))?);
        }
        Cmd::Run(r) => run_foreground(r)?,
        Cmd::Serve(s) => crate::serve::run(s)?,
        Cmd::Apply { ifaces, config, dry_run, mode } => apply(&ifaces, &config, dry_run, mode)?,
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "pfwd", &mut std::io::stdout());
        }
        Cmd::Manpage => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?,
        Cmd::Save => {
            let (rules, _) = control::current()?.context(control::NOT_ATTACHED)?;
            print!("{}", rules::to_config(&rules));
        }
        Cmd::Add(add) => {
            let rule = add.into_rule()?;
            let (id, notes) = control::add(rule)?;
            println!("{id}");
            for n in notes {
                eprintln!("pfwd: {n}");
            }
        }
        Cmd::Del { ids, flows } => {
            let ids = control::resolve_ids(&ids)?;
            let (change, ended) = control::del(&ids, flows)?;
            for r in &change.removed {
                println!("deleted rule {}: {r}", r.id);
            }
            if flows {
                println!("{}", flows_ended(ended));
            }
            print_notes(&change.notes);
        }
        Cmd::Flush { inbound, outbound, local } => {
            let scope = match (inbound, outbound, local) {
                (true, _, _) => control::FlushScope::Inbound,
                (_, true, _) => control::FlushScope::Outbound,
                (_, _, true) => control::FlushScope::Local,
                _ => control::FlushScope::All,
            };
            let change = control::flush(scope)?;
            if change.removed.is_empty() {
                println!("no rules to remove");
            }
            for r in &change.removed {
                println!("removed rule {}: {r}", r.id);
            }
            print_notes(&change.notes);
        }
        Cmd::List { json } => {
            let rules = control::list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rules)?);
            } else if rules.is_empty() {
                println!("no rules");
            } else {
                for r in &rules {
                    println!("{:>4}  {}", r.id, r.text);
                }
            }
        }
        Cmd::Status { json } => {
            let s = control::status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else if let Status::Attached(s) = &s {
                print_status(s);
            } else {
                println!("pfwd is not attached in this network namespace");
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
                    ExportFormat::Iptables => iptables::export_iptables(&rules, ifaces, Family::Ipv4),
                    ExportFormat::Ip6tables => iptables::export_iptables(&rules, ifaces, Family::Ipv6),
                    ExportFormat::Nft => iptables::export_nft(&rules, ifaces)?,
                }
            );
        }
        Cmd::Import { file, dry_run } => import(file, dry_run)?,
        Cmd::Conntrack { flush: true, rule, src, dst, proto, dport, json } => {
            let filter = crate::flows::FlowFilter { rules: (!rule.is_empty()).then_some(rule), src, dst, proto, dport };
            let ended = control::conntrack_flush(&filter)?;
            if json {
                println!("{}", serde_json::json!({ "flows_ended": ended }));
            } else {
                println!("{}", flows_ended(ended));
            }
        }
        Cmd::Conntrack { json, .. } => {
            let flows = control::conntrack_list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
            } else if flows.is_empty() {
                println!("no live translations");
            } else {
                // IPv6 with a port as ip6tables writes it: [ADDR]:PORT.
                let end = |a: Option<std::net::IpAddr>, p: Option<u16>| match a {
                    Some(std::net::IpAddr::V6(a)) => format!("[{a}]:{}", or(p, "null")),
                    a => format!("{}:{}", or(a, "?"), or(p, "null")),
                };
                let t = |t: &FlowTuple| format!("{} -> {}", end(t.src, t.sport), end(t.dst, t.dport));
                for f in &flows {
                    println!(
                        "{:<4} {:<4} {:<44} => {:<44} rule {:<5} {:<12} idle {:.0}s",
                        f.proto,
                        f.nat.as_str(),
                        t(&f.original),
                        t(&f.translated),
                        or(f.rule, "null"),
                        f.state.as_deref().unwrap_or("-"),
                        f.idle_s.unwrap_or(0.0)
                    );
                }
            }
        }
    }
    Ok(())
}

fn flows_ended(n: usize) -> String {
    format!("ended {n} live flow{}", if n == 1 { "" } else { "s" })
}

/// `pfwd apply`: validate the file, attach when asked, then one change to the file's rules.
fn apply(ifaces: &[String], config: &Option<PathBuf>, dry_run: bool, mode: Mode) -> Result<()> {
    // The whole file is checked before anything changes.
    let wanted = read_config(config)?;
    let attached = control::current()?;
    if attached.is_none() && ifaces.is_empty() {
        anyhow::bail!(
            "pfwd is not attached in this network namespace: name the interfaces (`pfwd apply IFACE... --config FILE`) \
             or run `pfwd attach IFACE...` first"
        );
    }
    let show = |plan: &control::ApplyPlan| {
        for r in &plan.keep {
            println!("  keep   {:>4}  {r}", r.id);
        }
        for r in &plan.remove {
            println!("- remove {:>4}  {r}", r.id);
        }
        for r in &plan.add {
            println!("+ add          {r}");
        }
        println!("{} kept, {} removed, {} added", plan.keep.len(), plan.remove.len(), plan.add.len());
    };
    if dry_run {
        let running = attached.map(|(r, _)| r).unwrap_or_default();
        show(&control::plan_apply(&running, &wanted));
        return Ok(());
    }
    if !ifaces.is_empty() {
        let opts = AttachOptions {
            mode,
            ct_entries: pfwd_common::DEFAULT_CT_ENTRIES,
            config: pfwd_common::Config::default(),
            timeouts: vec![],
            fast_forward: false,
            xdp: false,
        };
        print_notes(&control::attach(ifaces, vec![], &opts)?);
    }
    let (plan, change) = control::apply_rules(&wanted)?;
    show(&plan);
    if let Some(change) = change {
        let ids: Vec<String> = change.added.iter().map(u32::to_string).collect();
        if !ids.is_empty() {
            println!("added rule ids: {}", ids.join(", "));
        }
        for n in &change.notes {
            eprintln!("pfwd: {n}");
        }
    }
    Ok(())
}

/// A `pfwd del` argument: `ID` or `LO-HI`.
fn parse_id_range(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("bad rule id {s:?}: expected a number (see `pfwd list`) or a range such as 5-9");
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let num = |t: &str| t.parse::<u32>().ok().filter(|_| t.bytes().all(|b| b.is_ascii_digit()));
    match (num(lo), num(hi)) {
        (Some(lo), Some(hi)) if lo <= hi => Ok((lo, hi)),
        _ => Err(bad()),
    }
}

fn cidr(s: &str) -> Result<ipnet::IpNet, String> {
    rules::parse_cidr(s).map_err(|e| e.to_string())
}

fn import(file: Option<PathBuf>, dry_run: bool) -> Result<()> {
    let text = match file.as_deref() {
        None => std::io::read_to_string(std::io::stdin()).context("reading stdin")?,
        Some(p) if p.as_os_str() == "-" => std::io::read_to_string(std::io::stdin()).context("reading stdin")?,
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
    };
    // `-D CHAIN N` and `-F` act on the running instance's rules, as iptables shows them (a dry run without an
    // instance imports onto nothing).
    let existing = match control::current() {
        Ok(Some((rules, _))) => rules,
        Ok(None) if dry_run => vec![],
        Ok(None) => anyhow::bail!(control::NOT_ATTACHED),
        Err(e) if dry_run => {
            eprintln!("pfwd: note: importing onto no rules ({e:#})");
            vec![]
        }
        Err(e) => return Err(e),
    };
    let imported = iptables::import_onto(&text, &existing)?;
    for w in &imported.warnings {
        eprintln!("pfwd: warning: {w}");
    }
    for a in &imported.actions {
        println!("{a}");
    }
    if dry_run {
        for id in &imported.removed {
            println!("pfwd del {id}");
        }
        for r in &imported.rules {
            println!("pfwd add {r}");
        }
        return Ok(());
    }
    let change = control::change_rules(&imported.removed, imported.rules, true)?;
    for n in &change.notes {
        eprintln!("pfwd: {n}");
    }
    if !change.removed.is_empty() {
        let ids: Vec<String> = change.removed.iter().map(|r| r.id.to_string()).collect();
        println!("deleted {} rule{}: ids {}", ids.len(), if ids.len() == 1 { "" } else { "s" }, ids.join(", "));
    }
    // Ids are consecutive: name the range, not ten thousand numbers.
    let ids = &change.added;
    match (ids.first(), ids.last()) {
        (Some(a), Some(b)) if a == b => println!("imported 1 rule: id {a}"),
        (Some(a), Some(b)) => println!("imported {} rules: ids {a}-{b}", ids.len()),
        _ if change.removed.is_empty() => println!("imported 0 rules (all were already there)"),
        _ => println!("imported 0 rules"),
    }
    Ok(())
}

#[cfg(test)]
mod contrib_tests;

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completions_and_man_page_cover_every_command() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "pfwd", &mut out);
            let text = String::from_utf8(out).unwrap();
            for cmd in ["attach", "add", "flush", "conntrack", "apply", "save", "import"] {
                assert!(text.contains(cmd), "{shell:?} completion lacks {cmd}");
            }
        }
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command()).render(&mut man).unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(man.starts_with(".ie") || man.contains(".TH"), "{man}");
        assert!(man.contains("iptables"), "the man page carries the long description");
    }
}
