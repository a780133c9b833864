//! Surviving `kill -9` of `pfwd attach --config` (2,000 rules), `pfwd import` (2,000 lines), `pfwd del` /
//! `pfwd flush`, `pfwd add` (onto 2,000 rules), `pfwd apply` (2,000 rules replaced by 2,000 others) and
//! `pfwd detach` at random moments, over bounded iterations, and the state directory deleted while attached. After each kill `pfwd status` must answer, and
//! `pfwd detach` (or a repairing `pfwd attach`, then detach) must leave iptables-save, the pins, the tcx programs on
//! the lab's veths and the sysctls exactly as they were before the first attach. Both modes, same assertions.
//!
//! The delays are drawn from a seed printed at the start (`PFWD_CRASH_SEED=N` replays a run).

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tests::{Lab, Node};

/// Kills per command.
const ITERATIONS: usize = 6;
/// Rules in the config file and in the import script.
const RULES: u16 = 2000;

/// Everything pfwd can leave behind in the router namespace.
#[derive(Debug, PartialEq)]
struct Footprint {
    iptables: String,
    /// ip6tables-save, and nftables' list of tables (nft mode's table, and the tables iptables-nft makes; their
    /// empty built-in chains that iptables-nft adds and iptables-save always shows are not compared).
    ip6tables: String,
    nft: String,
    pins: Vec<String>,
    pin_dir: bool,
    state_dir: bool,
    tcx_eth0: BTreeMap<String, usize>,
    tcx_eth1: BTreeMap<String, usize>,
    sysctls: Vec<(String, String)>,
}

fn footprint(lab: &Lab) -> Footprint {
    let keys = [
        "net.ipv4.ip_forward",
        "net.ipv4.conf.all.route_localnet",
        "net.ipv4.conf.eth0.route_localnet",
        "net.ipv4.conf.eth1.route_localnet",
    ];
    Footprint {
        iptables: sh(lab, Node::Router, "command -v iptables-save >/dev/null && iptables-save | grep -v '^#' || true"),
        ip6tables: sh(
            lab,
            Node::Router,
            "command -v ip6tables-save >/dev/null && ip6tables-save | grep -v '^#' || true",
        ),
        nft: sh(lab, Node::Router, "command -v nft >/dev/null && nft list tables || true"),
        pins: files_in(&pin_dir(lab)),
        pin_dir: pin_dir(lab).exists(),
        state_dir: state_dir(lab).exists(),
        tcx_eth0: tcx_programs(lab, "eth0"),
        tcx_eth1: tcx_programs(lab, "eth1"),
        sysctls: keys.iter().map(|k| (k.to_string(), router_sysctl(lab, k))).collect(),
    }
}

/// xorshift64*: enough randomness for delays, without a dependency.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let seed = std::env::var("PFWD_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        }) | 1;
        eprintln!("crash: PFWD_CRASH_SEED={seed}");
        Rng(seed)
    }

    /// A delay in [0, max).
    fn delay(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        max.mul_f64(r as f64 / (1u64 << 53) as f64)
    }
}

/// Starts `pfwd ARGS`, SIGKILLs it after `delay` unless it ended first. Returns whether it was killed.
fn kill_after(lab: &Lab, args: &[&str], delay: Duration) -> bool {
    let mut cmd = lab.pfwd(args).expect("locating the pfwd binary");
    // nsenter execs pfwd, so the child is pfwd itself.
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawning pfwd");
    let deadline = Instant::now() + delay;
    let killed = loop {
        if child.try_wait().expect("waiting for pfwd").is_some() {
            break false;
        }
        if Instant::now() >= deadline {
            child.kill().expect("kill -9 pfwd");
            break true;
        }
        thread::sleep(Duration::from_millis(1));
    };
    child.wait().expect("reaping pfwd");
    killed
}

/// How long `pfwd ARGS` takes to run to the end (it must succeed).
fn timed(lab: &Lab, args: &[&str]) -> Duration {
    let start = Instant::now();
    pfwd_ok(lab, args);
    start.elapsed()
}

/// After a kill: `status` answers truthfully (an unfinished change is reported as interrupted, never as a normal
/// instance with fewer rules), then `detach` leaves everything as `before`.
#[track_caller]
fn check_and_detach(lab: &Lab, before: &Footprint, what: &str) {
    let st = status(lab);
    if st["attached"] == true {
        assert!(st["mode"].is_string(), "{what}: {st}");
        if let Some(i) = st.get("interrupted") {
            assert!(i.as_str().is_some_and(|s| s.contains("interrupted")), "{what}: {st}");
        }
    }
    let notes = pfwd_ok(lab, &["detach"]);
    let after = footprint(lab);
    assert_eq!(&after, before, "{what}: detach must leave the router as before attach (detach said: {notes})");
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn kill9_leaves_nothing(mode: &str) {
    let lab = lab("crash");
    let _srv = server(&lab, Node::Server, "10.0.2.2:9000", "server");
    let _guard = Detach::new(&lab);
    let before = footprint(&lab);
    let mut rng = Rng::seeded();
    let dir: PathBuf = std::env::temp_dir().join(format!("pfwd-e2e-crash-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // 2,000 rules that need both sysctls pfwd sets: forwarding to another host, and route_localnet for a DNAT to
    // loopback.
    let mut toml = String::from(
        "[[rule]]\nkind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\ndport = 3306\nto = \"127.0.0.1:17355\"\n\
         [[rule]]\nkind = \"masquerade\"\noface = \"eth1\"\n",
    );
    for port in 10000..10000 + RULES - 2 {
        toml.push_str(&format!(
            "[[rule]]\nkind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\ndport = {port}\nto = \"10.0.2.2:9000\"\n"
        ));
    }
    let config = write(&dir, "rules.toml", &toml);
    // The file `apply` switches to: the same two special rules, 1,998 others on other ports.
    let config2 = write(&dir, "rules2.toml", &toml.replace("dport = 1", "dport = 3"));
    let script: String = (20000..20000 + RULES)
        .map(|p| {
            format!("iptables -t nat -A PREROUTING -i eth0 -p tcp --dport {p} -j DNAT --to-destination 10.0.2.2:9000\n")
        })
        .collect();
    let script = write(&dir, "import.sh", &script);
    let attach_config = ["attach", "--mode", mode, "eth0", "eth1", "--config", config.as_str()];
    let attach_plain = ["attach", "--mode", mode, "eth0", "eth1"];

    // How long each command takes when left alone: the kills land anywhere in that span (and a little past it).
    let t_attach = timed(&lab, &attach_config);
    let t_flush = timed(&lab, &["flush"]);
    let t_import = timed(&lab, &["import", &script]);
    let t_del = timed(&lab, &["del", "1-100000"]);
    pfwd_ok(&lab, &["apply", "--config", &config]);
    let add_one = ["add", "dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"];
    let t_add = timed(&lab, &add_one);
    let t_apply = timed(&lab, &["apply", "--config", &config2]);
    let t_detach = timed(&lab, &["detach"]);
    assert_eq!(footprint(&lab), before, "an uninterrupted attach/import/del/detach must leave nothing");
    eprintln!(
        "crash [{mode}]: attach {t_attach:?}, import {t_import:?}, del {t_del:?}, flush {t_flush:?}, add {t_add:?}, \
         apply {t_apply:?}, detach {t_detach:?}"
    );
    let span = |t: Duration| t.mul_f64(1.2) + Duration::from_millis(20);

    let mut killed = 0;
    for i in 0..ITERATIONS {
        let d = rng.delay(span(t_attach));
        killed += usize::from(kill_after(&lab, &attach_config, d));
        if i % 2 == 1 {
            // A new attach repairs what the killed one left; it must end in a normal instance.
            pfwd_ok(&lab, &attach_config);
            let st = status(&lab);
            assert!(st.get("interrupted").is_none(), "attach after a kill at {d:?} must repair: {st}");
            assert_eq!(st["rules"].as_array().map(Vec::len), Some(usize::from(RULES)), "after a kill at {d:?}");
        }
        check_and_detach(&lab, &before, &format!("attach --config killed at {d:?}"));
    }
    for i in 0..ITERATIONS {
        pfwd_ok(&lab, &attach_plain);
        let d = rng.delay(span(t_import));
        killed += usize::from(kill_after(&lab, &["import", &script], d));
        if i % 2 == 1 {
            // The next change completes the interrupted one.
            pfwd_ok(&lab, &["add", "dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
            let st = status(&lab);
            assert!(st.get("interrupted").is_none(), "a change after a kill at {d:?} must complete it: {st}");
            expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
        }
        check_and_detach(&lab, &before, &format!("import killed at {d:?}"));
    }
    for i in 0..ITERATIONS {
        pfwd_ok(&lab, &attach_config);
        let (args, t) = if i % 2 == 0 { (vec!["flush"], t_flush) } else { (vec!["del", "1-100000"], t_del) };
        let d = rng.delay(span(t));
        killed += usize::from(kill_after(&lab, &args, d));
        check_and_detach(&lab, &before, &format!("{} killed at {d:?}", args.join(" ")));
    }
    for i in 0..ITERATIONS {
        pfwd_ok(&lab, &attach_config);
        let d = rng.delay(span(t_add));
        killed += usize::from(kill_after(&lab, &add_one, d));
        if i % 2 == 1 {
            // The next change completes an interrupted add; the rule is there once or not at all.
            pfwd_ok(&lab, &["del", "1"]);
            let st = status(&lab);
            assert!(
                st.get("interrupted").is_none(),
                "a change after a kill at {d:?} must complete it: {}",
                st["interrupted"]
            );
            let n = st["rules"].as_array().map_or(0, Vec::len);
            assert!(n == usize::from(RULES) - 1 || n == usize::from(RULES), "add killed at {d:?}: {n} rules");
        }
        check_and_detach(&lab, &before, &format!("add killed at {d:?}"));
    }
    for i in 0..ITERATIONS {
        pfwd_ok(&lab, &attach_config);
        let d = rng.delay(span(t_apply));
        killed += usize::from(kill_after(&lab, &["apply", "--config", &config2], d));
        if i % 2 == 1 {
            // Applying again makes the rules exactly the file's.
            pfwd_ok(&lab, &["apply", "--config", &config2]);
            let st = status(&lab);
            assert!(
                st.get("interrupted").is_none(),
                "apply after a kill at {d:?} must complete it: {}",
                st["interrupted"]
            );
            let rules = st["rules"].as_array().cloned().unwrap_or_default();
            assert_eq!(rules.len(), usize::from(RULES), "apply killed at {d:?}");
            assert!(rules.iter().all(|r| r["dport"].as_str().is_none_or(|p| !p.starts_with('1'))));
        }
        check_and_detach(&lab, &before, &format!("apply killed at {d:?}"));
    }
    for _ in 0..ITERATIONS {
        pfwd_ok(&lab, &attach_config);
        let d = rng.delay(span(t_detach));
        killed += usize::from(kill_after(&lab, &["detach"], d));
        // A killed detach is finished by the next one.
        check_and_detach(&lab, &before, &format!("detach killed at {d:?}"));
    }
    eprintln!("crash [{mode}]: {killed} of {} commands were killed before they ended", 6 * ITERATIONS);

    // The state directory lost (deleted by hand, or by a cleanup of /run) while attached, with sysctls changed and
    // (iptables, in a fresh namespace) tables created: detach still leaves everything as before, from the record
    // kept with the data path. Also when the state is lost in the middle of a killed change.
    for killed_first in [false, true] {
        pfwd_ok(&lab, &attach_config);
        if killed_first {
            kill_after(&lab, &["apply", "--config", &config2], rng.delay(span(t_apply)));
        }
        std::fs::remove_dir_all(state_dir(&lab)).expect("removing the state directory");
        check_and_detach(&lab, &before, &format!("state directory removed (after a kill: {killed_first})"));
    }

    // Afterwards pfwd works as ever.
    pfwd_ok(&lab, &attach_plain);
    pfwd_ok(&lab, &["add", "dnat", "-i", "eth0", "-p", "tcp", "--dport", "8080", "--to", "10.0.2.2:9000"]);
    expect_tcp(&lab, None, "10.0.1.1:8080", "server", 9000, "10.0.1.2");
    assert_eq!(status(&lab)["mode"], mode);
    check_and_detach(&lab, &before, "the final attach");
    let _ = std::fs::remove_dir_all(&dir);
}

in_both_modes!(kill9_leaves_nothing);
