//! `pfwd serve`, the agent, in a namespace lab, in both modes with the same assertions: it serves traffic, re-applies
//! a changed file (an editor's rename and an in-place write) within 2 s, rejects a bad file without changing anything,
//! re-applies on SIGHUP, re-attaches a veth deleted and re-created under the same name, follows an address change for
//! REDIRECT, serves /metrics (counters rise with traffic; the text parses as Prometheus text) and /healthz, leaves
//! traffic flowing on SIGTERM, and a restart after a simulated reboot (state, pins, chains and sysctls wiped) restores
//! forwarding from the file. Also: the systemd unit as `cargo xtask install` installs it passes
//! `systemd-analyze verify`.

#[macro_use]
mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tests::{Lab, Node, TIMEOUT};

const METRICS: &str = "127.0.0.1:9469";
/// The file's rules: A forwards 8080 to the server, R redirects 8088 to the router's own port 3000.
const A: &str = "[[rule]]\nkind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\ndport = 8080\nto = \"10.0.2.2:9000\"\n";
const R: &str = "[[rule]]\nkind = \"redirect\"\niface = \"eth0\"\nproto = \"tcp\"\ndport = 8088\nto_port = 3000\n";
/// D forwards 8090 to a server that keeps connections open (for connections that outlive the agent).
const D: &str = "[[rule]]\nkind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\ndport = 8090\nto = \"10.0.2.2:9100\"\n";
const C: &str = "[[rule]]\nkind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\ndport = 8082\nto = \"10.0.2.2:9000\"\n";
/// How long the agent may take to act on a change (the bound).
const PICKUP: Duration = Duration::from_secs(2);

/// A running `pfwd serve`, killed (SIGKILL) when dropped; its log goes to a file.
struct Serve {
    child: Option<Child>,
    log: PathBuf,
}

impl Serve {
    fn start(lab: &Lab, mode: &str, config: &Path, log: PathBuf) -> Serve {
        let cmd = lab.pfwd(serve_args(mode, config)).unwrap();
        Serve::spawn(lab, cmd, log)
    }

    /// Spawns `cmd` (a `pfwd serve`) and waits until it is healthy.
    fn spawn(lab: &Lab, mut cmd: Command, log: PathBuf) -> Serve {
        let file = File::create(&log).unwrap();
        cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file).env("RUST_LOG", "info");
        let serve = Serve { child: Some(cmd.spawn().expect("spawning pfwd serve")), log };
        // Ready when /healthz answers 200 (bounded).
        let start = Instant::now();
        loop {
            if let Some((200, _)) = http_get(lab, "/healthz") {
                return serve;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "pfwd serve did not become healthy:\n{}", serve.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().unwrap().id();
        // SAFETY: signalling our own child (nsenter execs pfwd, so the pid is pfwd's).
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }

    /// SIGTERM, then waits (bounded) for the exit; returns whether it exited successfully.
    fn terminate(&mut self) -> bool {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn serve_args(mode: &str, config: &Path) -> Vec<String> {
    let config = config.to_str().unwrap();
    ["serve", "eth0", "eth1", "--mode", mode, "--config", config, "--metrics", METRICS].map(String::from).to_vec()
}

/// GET `path` from the agent, inside the router namespace: (status, body), or None when nothing answers.
fn http_get(lab: &Lab, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    lab.in_ns(Node::Router, move || -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&METRICS.parse().unwrap(), Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: pfwd\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_string()))
    })
    .ok()
    .flatten()
}

/// /metrics, checked line by line (every line a HELP, TYPE or UNIT comment or a sample, `# EOF` last) and parsed by
/// a Prometheus text parser.
#[track_caller]
fn metrics(lab: &Lab) -> prometheus_parse::Scrape {
    let (code, body) = http_get(lab, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200, "{body}");
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "OpenMetrics text ends with # EOF:\n{body}");
    for l in &lines[..lines.len() - 1] {
        let ok = match prometheus_parse::LineInfo::parse(l) {
            prometheus_parse::LineInfo::Doc { .. } | prometheus_parse::LineInfo::Type { .. } => true,
            prometheus_parse::LineInfo::Sample { value, .. } => value.parse::<f64>().is_ok(),
            _ => l.starts_with("# UNIT "),
        };
        assert!(ok, "not a Prometheus text line: {l:?}\n{body}");
    }
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
}

/// The value of `name` with the given labels (all of them must match).
#[track_caller]
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| {
            let names: Vec<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
            panic!("no sample {name}{labels:?} among {names:?}")
        });
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref v => panic!("{name}: unexpected value {v:?}"),
    }
}

/// The rules running, by (id, text).
fn rules_now(lab: &Lab) -> Vec<(u64, String)> {
    list(lab)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_u64().unwrap(), r["text"].as_str().unwrap().to_string()))
        .collect()
}

/// Waits (bounded by `within`) until `cond` holds; false when it never did.
fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a TCP request to `to` is answered by `label`.
fn answered_by(lab: &Lab, to: &str, label: &str) -> bool {
    lab.tcp_request(Node::Client, sa(to), "hi", SHORT)
        .ok()
        .and_then(|t| tests::Reply::parse(&t))
        .is_some_and(|r| r.label == label)
}

/// Writes `text` the way editors save: a new file renamed over the old one.
fn write_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn serve_scenario(mode: &str) {
    let lab = lab("sv");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _local = server(&lab, Node::Router, "0.0.0.0:3000", "local");
    let _long = line_echo_server(&lab, Node::Server, "10.0.2.2:9100");
    let dir = std::env::temp_dir().join(format!("pfwd-e2e-serve-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("rules.toml");
    std::fs::write(&config, format!("{A}{R}{D}")).unwrap();
    // Declared before the agent, so the agent is killed first and the detach then runs against nothing that moves.
    let _detach = Detach::new(&lab);
    let mut agent = Serve::start(&lab, mode, &config, dir.join("serve.log"));
    let log = |a: &Serve| a.log();

    // Serves traffic: the file's rules, through the data path of the mode asked for.
    assert_eq!(status(&lab)["mode"], mode);
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:8088", "local", 3000, "10.0.1.2");
    let file_rules = rules_now(&lab);
    assert_eq!(file_rules.len(), 3, "{file_rules:?}");

    // /metrics: parses; the mode; counters rise with traffic.
    let m = metrics(&lab);
    assert_eq!(value(&m, "pfwd_mode_info", &[("mode", mode)]), 1.0);
    assert_eq!(value(&m, "pfwd_attached", &[]), 1.0);
    assert_eq!(value(&m, "pfwd_config_ok", &[]), 1.0);
    let flows_a = value(&m, "pfwd_rule_flows_total", &[("rule", "1"), ("kind", "dnat")]);
    let packets_a = value(&m, "pfwd_rule_packets_total", &[("rule", "1")]);
    assert!(flows_a >= 1.0 && packets_a >= 1.0, "rule 1 carried a flow: flows {flows_a}, packets {packets_a}");
    value(&m, "pfwd_conntrack_entries", &[]);
    value(&m, "pfwd_new_flows_total", &[]);
    for _ in 0..3 {
        expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    }
    let m = metrics(&lab);
    assert!(value(&m, "pfwd_rule_flows_total", &[("rule", "1")]) >= flows_a + 3.0, "flows rose by 3");
    assert!(value(&m, "pfwd_rule_packets_total", &[("rule", "1")]) >= packets_a + 3.0, "packets rose");
    if mode == "ebpf" {
        assert!(value(&m, "pfwd_rule_bytes_total", &[("rule", "1")]) > 0.0);
        assert!(value(&m, "pfwd_conntrack_capacity", &[]) > 0.0);
        value(&m, "pfwd_passes_total", &[("reason", "fragments")]);
    }
    if mode == "ebpf" {
        // The kernel's log events are streamed, like `pfwd run`.
        assert!(
            wait_until(PICKUP, || log(&agent).contains("new flow 10.0.1.2:")),
            "no new-flow event from the kernel in:\n{}",
            log(&agent)
        );
    }
    let (code, body) = http_get(&lab, "/healthz").unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    // A changed file, saved by rename (an editor), is applied within 2 s; kept rules keep their ids.
    write_by_rename(&config, &format!("{A}{R}{D}{C}"));
    assert!(wait_until(PICKUP, || rules_now(&lab).len() == 4), "the added rule did not appear:\n{}", log(&agent));
    assert_eq!(rules_now(&lab)[..3], file_rules[..], "kept rules keep their ids");
    expect_tcp(&lab, None, "10.0.1.1:8082", "server", 9000, "10.0.1.2");
    // ... and written in place.
    std::fs::write(&config, format!("{A}{R}{D}")).unwrap();
    assert!(wait_until(PICKUP, || rules_now(&lab) == file_rules), "the rule was not removed:\n{}", log(&agent));
    expect_tcp_fails(&lab, "10.0.1.1:8082");

    // A bad file changes nothing, and says why.
    let rejected = value(&metrics(&lab), "pfwd_config_reloads_rejected_total", &[]);
    write_by_rename(&config, &format!("{A}[[rule]]\nkind = \"dnat\"\nsrc = \"10.0.0.300\"\nto = \"10.0.2.2\"\n"));
    assert!(
        wait_until(PICKUP, || value(&metrics(&lab), "pfwd_config_reloads_rejected_total", &[]) > rejected),
        "the bad file was not rejected:\n{}",
        log(&agent)
    );
    assert_eq!(value(&metrics(&lab), "pfwd_config_ok", &[]), 0.0);
    assert_eq!(rules_now(&lab), file_rules, "a rejected file changes nothing");
    expect_tcp(&lab, None, "10.0.1.1:8088", "local", 3000, "10.0.1.2");
    assert!(log(&agent).contains("10.0.0.300"), "the log says why:\n{}", log(&agent));
    write_by_rename(&config, &format!("{A}{R}{D}"));
    assert!(wait_until(PICKUP, || value(&metrics(&lab), "pfwd_config_ok", &[]) == 1.0), "{}", log(&agent));

    // SIGHUP re-applies the file: a rule added by hand goes away.
    add(&lab, &["dnat", "-i", "eth0", "-p", "tcp", "--dport", "8083", "--to", "10.0.2.2:9000"]);
    assert_eq!(rules_now(&lab).len(), 4);
    agent.signal(libc::SIGHUP);
    assert!(wait_until(PICKUP, || rules_now(&lab) == file_rules), "SIGHUP did not re-apply:\n{}", log(&agent));

    // An attached veth deleted and re-created under the same name is re-attached.
    let ifindex_before = status(&lab)["interfaces"][0]["ifindex"].clone();
    sh(&lab, Node::Router, "ip link del eth0");
    let router = lab.ns(Node::Router).to_string();
    sh(&lab, Node::Client, &format!("ip link add eth0 type veth peer name eth0 netns {router}"));
    sh(
        &lab,
        Node::Client,
        "ip addr add 10.0.1.2/24 dev eth0 && ethtool -K eth0 tx off rx off >/dev/null && ip link set eth0 up",
    );
    sh(
        &lab,
        Node::Router,
        "ip addr add 10.0.1.1/24 dev eth0 && ethtool -K eth0 tx off rx off >/dev/null && ip link set eth0 up",
    );
    sh(&lab, Node::Client, "ip route add default via 10.0.1.1");
    // Within ~2 s of the new device (netfilter's rules match by name and would forward anyway: wait for the agent).
    assert!(
        wait_until(Duration::from_secs(3), || log(&agent).contains("re-attached to eth0")),
        "the re-created eth0 was not re-attached:\n{}",
        log(&agent)
    );
    assert!(
        wait_until(Duration::from_secs(3), || answered_by(&lab, "10.0.1.1:8080", "server")),
        "not forwarding through the re-created eth0:\n{}",
        log(&agent)
    );
    let st = status(&lab);
    let eth0 = st["interfaces"].as_array().unwrap().iter().find(|i| i["name"] == "eth0").unwrap();
    assert_ne!(eth0["ifindex"], ifindex_before, "status shows the new device");
    if mode == "ebpf" {
        assert_eq!(tcx_programs(&lab, "eth0"), pfwd_tcx(), "the programs are on the new eth0");
    }
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:8088", "local", 3000, "10.0.1.2");

    // REDIRECT follows an address change.
    sh(&lab, Node::Router, "ip addr del 10.0.1.1/24 dev eth0 && ip addr add 10.0.1.5/24 dev eth0");
    assert!(
        wait_until(Duration::from_secs(3), || answered_by(&lab, "10.0.1.5:8088", "local")),
        "REDIRECT does not follow the new address:\n{}",
        log(&agent)
    );
    expect_tcp(&lab, None, "10.0.1.5:8088", "local", 3000, "10.0.1.2");
    // (netfilter's REDIRECT needs nothing from pfwd: wait for the agent to have seen the change; the agent may see the
    // deletion and the addition apart, as 10.0.1.1 -> none -> 10.0.1.5.)
    assert!(
        wait_until(PICKUP, || log(&agent).contains("-> 10.0.1.5 (REDIRECT and MASQUERADE use it)")),
        "the agent did not report the address change:\n{}",
        log(&agent)
    );
    sh(&lab, Node::Router, "ip addr del 10.0.1.5/24 dev eth0 && ip addr add 10.0.1.1/24 dev eth0");
    assert!(wait_until(Duration::from_secs(3), || answered_by(&lab, "10.0.1.1:8088", "local")), "{}", log(&agent));

    // SIGTERM: the agent exits, the data path stays and keeps forwarding, a live connection included.
    let conn = lab.in_ns(Node::Client, || TcpStream::connect_timeout(&sa("10.0.1.1:8090"), TIMEOUT)).unwrap().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(exchange(&conn, "before"), Ok("before".into()));
    assert!(agent.terminate(), "pfwd serve did not exit cleanly on SIGTERM:\n{}", log(&agent));
    assert!(log(&agent).contains("the data path stays in place"), "{}", log(&agent));
    assert_eq!(status(&lab)["attached"], true);
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    assert!(http_get(&lab, "/healthz").is_none(), "the agent is gone");
    assert_eq!(exchange(&conn, "between"), Ok("between".into()), "a live connection survives the agent's exit");
    // A restart (an upgrade) takes the running instance over: same rules and ids, the connection goes on.
    let mut agent = Serve::start(&lab, mode, &config, dir.join("serve-restart.log"));
    assert_eq!(rules_now(&lab), file_rules);
    assert_eq!(exchange(&conn, "after"), Ok("after".into()), "a live connection survives a restart");
    assert!(agent.log().contains("already running; nothing to change"), "{}", agent.log());
    assert!(agent.terminate(), "{}", agent.log());
    drop(conn);

    // A simulated reboot: state, pins, iptables chains and sysctls are gone; nothing forwards.
    let wipe = format!(
        "rm -rf {state} && (find {pins} -name 'link_*' -delete; rm -rf {pins}) \
         && for t in nat filter; do iptables -t $t -F && iptables -t $t -X; done \
         && sysctl -qw net.ipv4.ip_forward=0 net.ipv4.conf.eth0.route_localnet=0 net.ipv4.conf.eth1.route_localnet=0",
        state = state_dir(&lab).display(),
        pins = pin_dir(&lab).display()
    );
    sh(&lab, Node::Router, &wipe);
    assert_eq!(status(&lab)["attached"], false);
    assert!(tcx_programs(&lab, "eth0").is_empty(), "the programs left with their pins");
    expect_tcp_fails(&lab, "10.0.1.1:8080");
    // The agent starts again (as systemd would at boot) and forwarding comes back from the file.
    let agent = Serve::start(&lab, mode, &config, dir.join("serve2.log"));
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    expect_tcp(&lab, None, "10.0.1.1:8088", "local", 3000, "10.0.1.2");
    assert_eq!(status(&lab)["mode"], mode);
    assert_eq!(rules_now(&lab), file_rules);
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The agent with only the capabilities the systemd unit grants (its CapabilityBoundingSet, via setpriv), and a
/// config file mounted the way the kubelet mounts a ConfigMap (`rules.toml -> ..data/rules.toml`, `..data ->
/// ..<version>`, updated by swapping the `..data` symlink): it attaches, forwards, and picks up the swap.
fn unit_capabilities_and_configmap_swap(mode: &str) {
    let lab = lab("sv-caps");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let dir = std::env::temp_dir().join(format!("pfwd-e2e-serve-cm-{}-{mode}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("..v1")).unwrap();
    std::fs::write(dir.join("..v1/rules.toml"), A).unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/rules.toml", dir.join("rules.toml")).unwrap();

    let unit = include_str!("../../contrib/systemd/pfwd.service");
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds its capabilities")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let mut args = vec!["--bounding-set".to_string(), format!("-all,{}", caps.join(","))];
    args.push("--".into());
    args.push(tests::pfwd_bin().unwrap().to_string_lossy().into_owned());
    args.extend(serve_args(mode, &dir.join("rules.toml")));
    let _detach = Detach::new(&lab);
    let agent = Serve::spawn(&lab, lab.cmd(Node::Router, "setpriv", &args), dir.join("serve.log"));
    // The agent's effective capabilities are within the unit's set (this machine may lack some of them).
    let cap_bit = |name: &str| match name {
        "+net_admin" => 12,
        "+net_raw" => 13,
        "+ipc_lock" => 14,
        "+sys_admin" => 21,
        "+sys_resource" => 24,
        "+perfmon" => 38,
        "+bpf" => 39,
        other => panic!("the test does not know capability {other}"),
    };
    let allowed: u64 = caps.iter().map(|c| 1u64 << cap_bit(c)).sum();
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.as_ref().unwrap().id())).unwrap();
    let eff = proc_status.lines().find_map(|l| l.strip_prefix("CapEff:")).map(|v| u64::from_str_radix(v.trim(), 16));
    let eff = eff.expect("CapEff").unwrap();
    assert!(eff != 0 && eff & !allowed == 0, "the agent has capabilities {eff:#x} beyond the unit's {allowed:#x}");
    assert_eq!(status(&lab)["mode"], mode);
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");

    // The kubelet's update: a new version directory, a new symlink renamed over ..data.
    std::fs::create_dir_all(dir.join("..v2")).unwrap();
    std::fs::write(dir.join("..v2/rules.toml"), format!("{A}{C}")).unwrap();
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..v1")).unwrap();
    assert!(
        wait_until(PICKUP, || rules_now(&lab).len() == 2),
        "the ConfigMap update was not applied:\n{}",
        agent.log()
    );
    expect_tcp(&lab, None, "10.0.1.1:8082", "server", 9000, "10.0.1.2");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

in_both_modes!(serve_scenario, unit_capabilities_and_configmap_swap);

/// `--detach-on-exit`: SIGTERM removes everything. And the systemd readiness protocol: READY=1 once attached and
/// applied, STOPPING=1 on the way out.
#[test]
fn detach_on_exit_and_sd_notify() {
    let lab = lab("sv-detach");
    let dir = std::env::temp_dir().join(format!("pfwd-e2e-serve-detach-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("rules.toml");
    std::fs::write(&config, A).unwrap();
    // systemd's side of Type=notify: a datagram socket named by NOTIFY_SOCKET.
    let notify = std::os::unix::net::UnixDatagram::bind(dir.join("notify")).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _detach = Detach::new(&lab);
    let mut cmd = lab.pfwd(["serve", "eth0", "--config", config.to_str().unwrap(), "--detach-on-exit"]).unwrap();
    cmd.env("NOTIFY_SOCKET", dir.join("notify")).stdin(Stdio::null());
    let mut agent = Serve {
        child: Some(cmd.stderr(File::create(dir.join("log")).unwrap()).spawn().unwrap()),
        log: dir.join("log"),
    };
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| panic!("no sd_notify message ({e}):\n{}", agent.log()));
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    // Ready means attached with the file's rules.
    assert_eq!(status(&lab)["rules"].as_array().map(Vec::len), Some(1), "{}", agent.log());
    assert!(agent.terminate(), "{}", agent.log());
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "STOPPING=1"));
    assert_eq!(status(&lab)["attached"], false, "--detach-on-exit detached:\n{}", agent.log());
    assert!(files_in(&pin_dir(&lab)).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The unit `cargo xtask install` installs passes `systemd-analyze verify` (with the installed man page found, so its
/// Documentation= is checked too). Warnings fail the test: verify exits 0 on many of them.
#[test]
fn systemd_unit_verifies() {
    let Some(analyze) =
        ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"].into_iter().find(|p| Path::new(p).exists())
    else {
        eprintln!("SKIPPED: systemd-analyze is not installed, so the unit was not verified");
        return;
    };
    let root = std::env::temp_dir().join(format!("pfwd-e2e-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let bin = tests::pfwd_bin().unwrap();
    let out = run_bounded(
        {
            let mut c = Command::new(env!("CARGO"));
            c.args(["run", "-q", "-p", "xtask", "--", "install", "--root"]).arg(&root).arg("--pfwd").arg(&bin);
            c.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap());
            c
        },
        Duration::from_secs(600),
    );
    assert!(out.success, "cargo xtask install failed:\n{}\n{}", out.stdout, out.stderr);
    let unit_path = root.join("etc/systemd/system/pfwd.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/pfwd serve "), "{unit}");
    for f in [
        "usr/local/bin/pfwd",
        "etc/pfwd/rules.toml",
        "etc/pfwd/pfwd.env",
        "usr/local/share/bash-completion/completions/pfwd",
        "usr/local/share/zsh/site-functions/_pfwd",
        "usr/local/share/fish/vendor_completions.d/pfwd.fish",
        "usr/local/share/man/man8/pfwd.8",
    ] {
        let meta = std::fs::metadata(root.join(f)).unwrap_or_else(|e| panic!("{f} not installed: {e}"));
        assert!(meta.len() > 0, "{f} is empty");
    }
    // A second install keeps the user's config.
    std::fs::write(root.join("etc/pfwd/rules.toml"), A).unwrap();
    let again = run_bounded(
        {
            let mut c = Command::new(env!("CARGO"));
            c.args(["run", "-q", "-p", "xtask", "--", "install", "--root"]).arg(&root).arg("--pfwd").arg(&bin);
            c.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap());
            c
        },
        Duration::from_secs(600),
    );
    assert!(again.success && again.stdout.contains("kept"), "{}\n{}", again.stdout, again.stderr);
    assert_eq!(std::fs::read_to_string(root.join("etc/pfwd/rules.toml")).unwrap(), A);

    // verify checks that ExecStart exists: point it at the staged binary (the only change).
    let staged = unit.replace("/usr/local/bin/pfwd", &root.join("usr/local/bin/pfwd").to_string_lossy());
    let check = root.join("pfwd.service");
    std::fs::write(&check, staged).unwrap();
    let out = run_bounded(
        {
            let mut c = Command::new(analyze);
            c.arg("verify").arg(&check).env("MANPATH", root.join("usr/local/share/man"));
            c
        },
        Duration::from_secs(60),
    );
    assert!(
        out.success && out.stderr.trim().is_empty() && out.stdout.trim().is_empty(),
        "systemd-analyze verify (exit {:?}):\n{}\n{}",
        out.code,
        out.stdout,
        out.stderr
    );
    let _ = std::fs::remove_dir_all(&root);
}
