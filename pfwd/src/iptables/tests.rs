//! Test fixtures shared by the iptables modules' tests (sample rules of every shape, import helpers), and the tests
//! of the whole round trip: export, then import what was exported (a property test over random rule sets, and the real
//! `iptables-restore`, `iptables-save` and `nft` in a scratch network namespace when run as root).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::chains::{CHAINS, NAT_HOOKS, PfwdChain, hook_order, hook_rules};
use super::{Import, ImportError, export_iptables, export_nft, import, nat_chain_script, nat_change_script};
use crate::cli::parse_rule as parse_args;
use crate::rules::model::Family;
use crate::rules::tests::Rng;
use crate::rules::{Backend, Negated, PortRange, Proto, Rule, Target};

pub(crate) fn rule(s: &str) -> Rule {
    parse_args(&s.split_whitespace().collect::<Vec<_>>()).unwrap_or_else(|e| panic!("{s}: {e}"))
}

pub(crate) fn with_id(id: u32, s: &str) -> Rule {
    Rule { id, ..rule(s) }
}

pub(crate) fn ok(text: &str) -> Import {
    import(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

pub(crate) fn err(text: &str) -> ImportError {
    match import(text) {
        Ok(i) => panic!("{text}: accepted as {:?}", i.rules.iter().map(ToString::to_string).collect::<Vec<_>>()),
        Err(e) => e,
    }
}

/// The sample from the module's design: one rule of each shape.
pub(crate) fn sample() -> Vec<Rule> {
    vec![
        with_id(1, "redirect -p tcp --dport 80 --to-port 3000"),
        with_id(2, "dnat -d 203.0.113.10 --to 10.0.2.2"),
        with_id(3, "dnat -p tcp --dport 8000-8099 --to 10.0.2.2"),
        with_id(4, "dnat -i eth0 -p tcp --dport 59999 --to 127.0.0.1:17355"),
        with_id(5, "dnat -p udp -s 192.168.1.0/24 --dport 53 --to 10.0.2.3:5353"),
    ]
}

/// Rules in an export's order: precedence order, PREROUTING ones first, then POSTROUTING, then OUTPUT (the
/// import's order: chain by chain).
fn export_order(rules: &[Rule]) -> Vec<&Rule> {
    NAT_HOOKS.into_iter().flat_map(|h| hook_order(rules, h)).map(|i| &rules[i]).collect()
}

/// `want` in an export's order ([`export_order`]), compared by match, target and family (ids are not imported).
fn assert_same_rules(got: &[Rule], want: &[Rule]) {
    assert_same_ordered(got, export_order(want));
}

fn assert_same_ordered(got: &[Rule], want: Vec<&Rule>) {
    let same = got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| g.same_match_and_target(w));
    let show = |rs: Vec<&Rule>| rs.iter().map(|r| r.to_string()).collect::<Vec<_>>();
    assert!(same, "got {:#?}\nwant {:#?}", show(got.iter().collect()), show(want));
    assert!(got.iter().all(|r| r.id == 0));
}

/// What importing `family`'s export of `rules` gives: the rules that apply to it, those for both families marked
/// as the family's own (the input of one family cannot say they are for both).
pub(crate) fn for_family(rules: &[Rule], family: Family) -> Vec<Rule> {
    let own = |r: &Rule| Rule { family: r.family.or(r.family().is_none().then_some(family)), ..r.clone() };
    rules.iter().filter(|r| r.applies_to(family)).map(own).collect()
}

/// Both families' exports in one text, as `(pfwd export iptables -4; pfwd export iptables -6)` would write them,
/// read back: the IPv4 rules (those for both families among them), then the IPv6-only ones, each in its export's
/// order.
fn both_families_order(rules: &[Rule]) -> Vec<&Rule> {
    // The order within a subset of the rules is the order of the whole set (precedence is a total order).
    let (v4, v6_only): (Vec<&Rule>, Vec<&Rule>) =
        export_order(rules).into_iter().partition(|r| r.applies_to(Family::Ipv4));
    v4.into_iter().chain(v6_only).collect()
}

/// IPv6 rules of each shape, ids after [`local_sample`]'s, and one for both families and one IPv4-only rule
/// without addresses.
pub(crate) fn v6_sample() -> Vec<Rule> {
    vec![
        with_id(21, "dnat -i eth0 -p tcp -d 2001:db8::10 --dport 8080 --to [2001:db8::2]:80"),
        with_id(22, "redirect -6 -p tcp --dport 8081 --to-port 3001"),
        with_id(23, "dnat -p udp ! -s fd00::/8 --dport 53 --to [2001:db8::3]:5353"),
        with_id(24, "dnat -d 2001:db8::/64 --to 2001:db8::4"),
        with_id(25, "dnat -p tcp -d 2001:db8::11 --dport 443 --to [2001:db8::2]:8443,[2001:db8::3]:8443@2"),
        with_id(27, "snat -o eth0 -p tcp -s fd00::/64 --to [2001:db8::1]:20000-20099"),
        with_id(28, "masquerade -6 -o wg0"),
        with_id(29, "dnat --local -p tcp -d 2001:db8::13 --dport 25 --to [::1]:2525"),
        with_id(30, "redirect -6 --local -p udp --dport 53 --to-port 5353"),
        with_id(31, "redirect -p tcp --dport 8082 --to-port 3002"),
        with_id(32, "masquerade -4 -o wg1"),
    ]
}

/// SNAT/MASQUERADE rules of each shape, ids after [`sample`]'s.
pub(crate) fn post_sample() -> Vec<Rule> {
    vec![
        with_id(6, "masquerade -o eth0"),
        with_id(7, "snat -o eth0 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099"),
        with_id(8, "masquerade -o wg0 -p udp --to-ports 1024-1027"),
        with_id(9, "snat -d 198.51.100.0/24 --to 203.0.113.6"),
        with_id(10, "snat -p tcp --to 203.0.113.7:5000"),
    ]
}

pub(crate) fn with_post() -> Vec<Rule> {
    sample().into_iter().chain(post_sample()).collect()
}

/// `--local` rules of each shape, ids after [`post_sample`]'s.
pub(crate) fn local_sample() -> Vec<Rule> {
    vec![
        with_id(11, "dnat --local -p tcp -d 198.51.100.13 --dport 1111 --to 127.0.0.1:80"),
        with_id(12, "redirect --local -p tcp --dport 8080 --to-port 80"),
        with_id(13, "dnat --local -d 198.51.100.0/24 --to 10.0.2.13"),
        with_id(14, "dnat --local -p udp --dport 5000-5009 --to 10.0.2.4"),
        with_id(15, "redirect --local -p udp --to-port 53"),
    ]
}

/// Rules of all three hooks.
pub(crate) fn with_local() -> Vec<Rule> {
    with_post().into_iter().chain(local_sample()).collect()
}

/// A random valid rule, a third of them SNAT/MASQUERADE and a fifth of the others `--local`; half the time from a
/// small value space so rules overlap and collide. `v6`: its addresses are IPv6 ones.
fn random_rule(rng: &mut Rng, v6: bool) -> Rule {
    let small = rng.chance(50);
    let post = rng.chance(33);
    let local = !post && rng.chance(20);
    let proto = [None, Some(Proto::Tcp), Some(Proto::Udp)][rng.below(3) as usize];
    let port = |rng: &mut Rng| if small { 79 + rng.below(4) as u16 } else { (rng.below(65535) + 1) as u16 };
    let net = |rng: &mut Rng| -> IpNet {
        if v6 {
            let len = if small { [0, 32, 64, 128][rng.below(4) as usize] } else { rng.below(129) as u8 };
            let addr = if small {
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, rng.below(3) as u16)
            } else {
                Ipv6Addr::from(u128::from(rng.next()) << 64 | u128::from(rng.next()))
            };
            return Ipv6Net::new(addr, len).unwrap().trunc().into();
        }
        let len = if small { [0, 8, 24, 32][rng.below(4) as usize] } else { rng.below(33) as u8 };
        let addr = if small { Ipv4Addr::new(10, 1, 2, rng.below(3) as u8) } else { Ipv4Addr::from(rng.next() as u32) };
        Ipv4Net::new(addr, len).unwrap().trunc().into()
    };
    // A unicast address that is not loopback (IPv6 DNAT to ::1 is for --local only).
    let unicast = |rng: &mut Rng| -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, rng.below(4) as u16, 0, 0, 0, 0, 1 + rng.below(0xfffe) as u16))
        } else {
            IpAddr::V4(Ipv4Addr::from((rng.below(0xdfff_fffe) + 1) as u32))
        }
    };
    let range = |rng: &mut Rng| {
        let (a, b) = (port(rng), if rng.chance(50) { None } else { Some(port(rng)) });
        let b = b.unwrap_or(a);
        PortRange { lo: a.min(b), hi: a.max(b) }
    };
    let dport = (proto.is_some() && rng.chance(if post { 30 } else { 60 })).then(|| range(rng));
    let iface = rng.chance(40).then(|| ["eth0", "wg0", "veth-a.1", "br_lan"][rng.below(4) as usize].to_string());
    let target = if post {
        let ports = (proto.is_some() && rng.chance(60)).then(|| range(rng));
        if rng.chance(50) { Target::Snat { addr: unicast(rng), ports } } else { Target::Masquerade { ports } }
    } else if proto.is_some() && rng.chance(40) {
        Target::Redirect { port: port(rng) }
    } else {
        let addr = unicast(rng);
        Target::Dnat { addr, port: (proto.is_some() && rng.chance(60)).then(|| port(rng)) }
    };
    let src = rng.chance(50).then(|| net(rng));
    let mut r = Rule {
        id: rng.below(50) as u32 + 1,
        // --local rules have neither -i nor -s.
        iface: iface.clone().filter(|_| !post && !local),
        oface: iface.filter(|_| post),
        proto,
        src: src.filter(|_| !local),
        dst: rng.chance(50).then(|| net(rng)),
        dport,
        local,
        target,
        // iptables lines cannot say --hairpin.
        hairpin: None,
        not: Negated::default(),
        dst_local: false,
        backends: Vec::new(),
        // A rule without addresses: for one family, or (None) for both.
        family: None,
    };
    if r.family().is_none() {
        r.family = [None, Some(Family::Ipv4), Some(Family::Ipv6)][rng.below(3) as usize];
    }
    // iptables' `!` on what the rule has (not on /0, which would match nothing), and `-m addrtype --dst-type
    // LOCAL` (-d local) on some DNAT/REDIRECT rules without -d.
    let some = |n: Option<IpNet>| n.is_some_and(|n| n.prefix_len() > 0);
    r.not.src = some(r.src) && rng.chance(20);
    r.not.dst = some(r.dst) && rng.chance(20);
    r.not.iface = r.hook_iface().is_some() && rng.chance(20);
    r.dst_local = rng.chance(20);
    // Several backends (not with --local): exported as a -m statistic ladder, which the import joins back.
    if let Target::Dnat { addr, port } = r.target
        && !local
        && rng.chance(25)
    {
        let n = 2 + rng.below(3) as u32;
        let backends = (0..n)
            .map(|k| Backend { weight: 1 + rng.below(4) as u32, ..Backend::new(nth_after(addr, k), port) })
            .collect();
        r.set_dnat_backends(backends);
        r.normalize();
    }
    r
}

/// The address `k` after `addr` (wrapping), in its family.
fn nth_after(addr: IpAddr, k: u32) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add(k))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(k.into()))),
    }
}

/// A random rule set of both families (a third of the rules IPv6 ones) without duplicates (pfwd refuses those on
/// add). Nor two rules that export the same lines in some family: the same rule with and without -4, -6 or a /0
/// prefix (`-s 0.0.0.0/0` is -4). The import reads one rule back from those (and `-4 X` with `-6 X` as `X`).
pub(crate) fn random_rules(rng: &mut Rng, max: u64) -> Vec<Rule> {
    let exported = |r: &Rule| Rule {
        family: None,
        src: r.src.filter(|n| n.prefix_len() > 0),
        dst: r.dst.filter(|n| n.prefix_len() > 0),
        ..r.clone()
    };
    let mut rules: Vec<Rule> = Vec::new();
    for _ in 0..rng.below(max + 1) {
        let v6 = rng.chance(33);
        let r = random_rule(rng, v6);
        r.validate().unwrap_or_else(|e| panic!("{r}: {e}"));
        if !rules.iter().any(|o| o.same_match_and_target(&r) || exported(o).same_match_and_target(&exported(&r))) {
            rules.push(r);
        }
    }
    rules
}

/// Export, then import what was exported: each family's export gives back the rules that apply to it (those for
/// both marked as the family's), and both exports in one text give back the whole set, a rule for both families
/// (in each export) once.
#[test]
fn export_import_round_trip_property() {
    let mut rng = Rng(0x5eed_1234);
    let ifaces = [vec![], vec!["eth0".to_string()], vec!["eth0".to_string(), "wg0".to_string()]];
    let (mut total, mut local, mut families) = (0, 0, [0; 3]);
    for case in 0..3000 {
        let rules = random_rules(&mut rng, 12);
        total += rules.len();
        local += rules.iter().filter(|r| r.local).count();
        for r in &rules {
            families[r.family().map_or(0, |f| 1 + f as usize)] += 1;
        }
        let hooks = match case % 4 {
            0 => None,
            n => Some(&ifaces[n - 1][..]),
        };
        let v4 = export_iptables(&rules, hooks, Family::Ipv4);
        let v6 = export_iptables(&rules, hooks, Family::Ipv6);
        for (text, want) in [
            (v4.clone(), for_family(&rules, Family::Ipv4)),
            (nat_chain_script(&rules, Family::Ipv4), for_family(&rules, Family::Ipv4)),
            (v6.clone(), for_family(&rules, Family::Ipv6)),
        ] {
            let got = import(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_same_rules(&got.rules, &want);
            // The export is already in pfwd's order, so nothing can be reordered.
            assert!(got.warnings.is_empty(), "{:?}", got.warnings);
        }
        let text = format!("{v4}{v6}");
        let got = import(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_same_ordered(&got.rules, both_families_order(&rules));
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }
    assert!(total > 10_000, "{total}");
    assert!(local > 1_000, "{local}");
    // Rules for both families, IPv4 ones and IPv6 ones.
    assert!(families[0] > 300 && families[1] > 5_000 && families[2] > 3_000, "{families:?}");
}

/// Found by the `import` fuzz target: an interface named `\`, exported unquoted (`-o \ -m comment ...`), was read
/// back as an escaped space. Names with quotes, backslashes or `#` are valid in Linux; the export quotes them
/// (iptables-restore reads the same quoting), and iptables-save lines are read as iptables-restore reads them:
/// outside double quotes a backslash is an ordinary character (iptables-save prints names as they are).
#[test]
fn export_quotes_interface_names_with_syntax_characters() {
    let got = ok("-A POSTROUTING -o \\\\ -j SNAT --to 4.0.1.5");
    assert_eq!(got.rules[0].oface.as_deref(), Some("\\\\"), "iptables-save's -o \\\\ is the name \\\\");
    let more = ok("-A POSTROUTING -o a\\b -j SNAT --to 4.0.1.5\n-A POSTROUTING -o x'y -j SNAT --to 4.0.1.6");
    let names: Vec<_> = more.rules.iter().map(|r| r.oface.as_deref().unwrap()).collect();
    assert_eq!(names, ["a\\b", "x'y"], "iptables-save prints these as they are");
    // A one-backslash name, as a shell command writes it.
    let mut rules = ok("iptables -t nat -A POSTROUTING -o '\\' -j SNAT --to 4.0.1.7").rules;
    assert_eq!(rules[0].oface.as_deref(), Some("\\"));
    rules.extend(got.rules);
    rules.extend(more.rules);
    for (i, name) in ["a\\b", "x'y", "#h", "q\"r", "\"", "-x", "a!"].into_iter().enumerate() {
        rules.push(Rule {
            id: i as u32 + 2,
            iface: Some(name.to_string()),
            ..rule("dnat -p tcp --dport 80 --to 10.0.0.1")
        });
        rules.push(Rule { id: i as u32 + 20, oface: Some(name.to_string()), ..rule("masquerade") });
    }
    let ifaces = vec!["a\\b".to_string(), "#h".to_string()];
    for text in [export_iptables(&rules, Some(&ifaces), Family::Ipv4), nat_chain_script(&rules, Family::Ipv4)] {
        assert!(text.contains("-o \"\\\\\" -m comment"), "{text}");
        let back = import(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_same_rules(&back.rules, &for_family(&rules, Family::Ipv4));
        assert!(back.warnings.is_empty(), "{:?}", back.warnings);
    }
    assert!(
        export_iptables(&rules, Some(&ifaces), Family::Ipv4)
            .contains("-A PREROUTING -i \"a\\\\b\" -j PFWD-PREROUTING\n")
    );
}

// ---- the real tools ----

/// A scratch network namespace, deleted on drop (also when the test panics).
pub(crate) struct Netns(String);

impl Netns {
    /// A scratch namespace for a test with the real tools, or None (the test is skipped, said on stderr) when not
    /// root or namespaces are unavailable.
    pub(crate) fn scratch() -> Option<Netns> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for a scratch network namespace");
            return None;
        }
        let ns = Netns::create();
        if ns.is_none() {
            eprintln!("skipped: cannot create a network namespace");
        }
        ns
    }

    fn create() -> Option<Netns> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("pfwd-ipt-test-{}-{n}", std::process::id());
        let ok = std::process::Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
        ok.then_some(Netns(name))
    }

    /// Runs `argv` inside the namespace; panics with its stderr unless it succeeds.
    pub(crate) fn run(&self, argv: &[&str], stdin: &str) -> String {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.0))
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{argv:?} failed: {}\ninput:\n{stdin}", String::from_utf8_lossy(&out.stderr));
        stdout
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The rules of pfwd's chains, chain by chain (iptables-save prints the tables in its own order).
fn pfwd_lines(save: &str) -> Vec<&str> {
    let in_chain = |c: &PfwdChain| {
        let prefix = format!("-A {} ", c.name);
        save.lines().filter(move |l| l.starts_with(&prefix))
    };
    CHAINS.iter().flat_map(in_chain).collect()
}

/// The restore and save commands of a family's tables.
fn restore_save(family: Family) -> (&'static str, &'static str) {
    match family {
        Family::Ipv4 => ("iptables-restore", "iptables-save"),
        Family::Ipv6 => ("ip6tables-restore", "ip6tables-save"),
    }
}

/// A rule change applied line by line (`nat_change_script`) leaves pfwd's chains exactly as a full rewrite with the new
/// rules would, through the real `iptables-restore` and `iptables-save` (and their ip6tables twins for the IPv6 side
/// of the same rule sets), over random changes (rules kept, dropped and added, several backends included).
#[test]
fn line_by_line_changes_equal_a_rewrite() {
    let Some(ns) = Netns::scratch() else { return };
    let mut rng = Rng(0xc4a9_6e55);
    let mut changed = [0; 2];
    for _ in 0..25 {
        let old = random_rules(&mut rng, 12);
        let mut new: Vec<Rule> = old.iter().filter(|_| rng.chance(70)).cloned().collect();
        for r in random_rules(&mut rng, 4) {
            if !new.iter().any(|o| o.same_match_and_target(&r)) {
                new.push(r);
            }
        }
        for family in [Family::Ipv4, Family::Ipv6] {
            let (restore, save) = restore_save(family);
            ns.run(&[restore, "--noflush"], &nat_chain_script(&old, family));
            if let Some(script) = nat_change_script(&old, &new, family) {
                ns.run(&[restore, "--noflush"], &script);
                changed[family as usize] += 1;
            }
            let saved = ns.run(&[save], "");
            let want = nat_chain_script(&new, family);
            assert_eq!(pfwd_lines(&saved), pfwd_lines(&want), "{family}: old {old:#?}\nnew {new:#?}");
        }
    }
    assert!(changed[0] > 15 && changed[1] > 12, "{changed:?} of 25 changes had lines to apply");
    for family in [Family::Ipv4, Family::Ipv6] {
        let (restore, save) = restore_save(family);
        // Onto empty chains every line lands at the end: appended, not inserted by position.
        let rules = random_rules(&mut rng, 30);
        let script = nat_change_script(&[], &rules, family).expect("lines to add");
        assert!(script.contains("-A PFWD-") && !script.contains("-I "), "{script}");
        // Removing everything flushes the chains instead of deleting line by line, and leaves them empty.
        ns.run(&[restore, "--noflush"], &nat_chain_script(&rules, family));
        let script = nat_change_script(&rules, &[], family).expect("lines to remove");
        assert!(script.contains("-F PFWD-") && !script.contains("-D "), "{script}");
        ns.run(&[restore, "--noflush"], &script);
        assert_eq!(pfwd_lines(&ns.run(&[save], "")), pfwd_lines(&nat_chain_script(&[], family)));
    }
}

#[test]
fn real_tools_accept_the_exports() {
    let Some(ns) = Netns::scratch() else { return };
    let ifaces = vec!["eth0".to_string(), "wg0".to_string()];
    let rules = with_local();
    let export = export_iptables(&rules, Some(&ifaces), Family::Ipv4);
    ns.run(&["iptables-restore", "--noflush", "--test"], &export);
    ns.run(&["iptables-restore", "--noflush"], &export);
    let save = ns.run(&["iptables-save"], "");
    let back = import(&save).unwrap_or_else(|e| panic!("{e}\n{save}"));
    assert_same_rules(&back.rules, &for_family(&rules, Family::Ipv4));
    assert!(back.warnings.is_empty(), "{:?}", back.warnings);
    // Our lines are exactly what iptables-save prints back (canonical form, comment placement).
    assert_eq!(pfwd_lines(&save), pfwd_lines(&export), "{save}");
    for hook in hook_rules(Some(&ifaces)) {
        let argv = hook.check_args();
        let argv: Vec<&str> = std::iter::once("iptables").chain(argv.iter().map(String::as_str)).collect();
        ns.run(&argv, "");
    }
    assert_eq!(save.matches("-A OUTPUT -j PFWD-OUTPUT\n").count(), 1, "{save}");
    assert_eq!(pfwd_lines(&save).iter().filter(|l| l.starts_with("-A PFWD-OUTPUT ")).count(), local_sample().len());
    // The classic OUTPUT commands, applied by iptables itself, read back as --local rules.
    for (argv, want) in [
        (
            "-t nat -A OUTPUT -p tcp --dport 1111 -j DNAT --to-destination 127.0.0.1:80",
            "dnat --local -p tcp --dport 1111 --to 127.0.0.1:80",
        ),
        (
            "-t nat -A OUTPUT -d 211.45.70.13 -j DNAT --to 192.168.255.151",
            "dnat --local -d 211.45.70.13 --to 192.168.255.151",
        ),
    ] {
        let argv: Vec<&str> = std::iter::once("iptables").chain(argv.split(' ')).collect();
        ns.run(&argv, "");
        let save = ns.run(&["iptables-save", "-t", "nat"], "");
        let back = import(&save).unwrap_or_else(|e| panic!("{e}\n{save}"));
        assert!(back.rules.iter().any(|r| r.same_match_and_target(&rule(want))), "{want}: {save}");
        let mut del = argv.clone();
        del[3] = "-D";
        ns.run(&del, "");
    }

    // The IPv6 export through ip6tables: accepted, printed back line for line by ip6tables-save (whose dump the
    // import reads as IPv6), jumps included.
    let v6_rules: Vec<Rule> = with_local().into_iter().chain(v6_sample()).collect();
    let export = export_iptables(&v6_rules, Some(&ifaces), Family::Ipv6);
    assert!(export.starts_with("# pfwd rules for ip6tables (15 rules"), "{export}");
    ns.run(&["ip6tables-restore", "--noflush", "--test"], &export);
    ns.run(&["ip6tables-restore", "--noflush"], &export);
    let save = ns.run(&["ip6tables-save"], "");
    assert!(save.starts_with("# Generated by ip6tables-save"), "{save}");
    assert_eq!(pfwd_lines(&save), pfwd_lines(&export), "{save}");
    let back = import(&save).unwrap_or_else(|e| panic!("{e}\n{save}"));
    assert_same_rules(&back.rules, &for_family(&v6_rules, Family::Ipv6));
    assert!(back.warnings.is_empty(), "{:?}", back.warnings);
    for hook in hook_rules(Some(&ifaces)) {
        let argv = hook.check_args();
        let argv: Vec<&str> = std::iter::once("ip6tables").chain(argv.iter().map(String::as_str)).collect();
        ns.run(&argv, "");
    }
    // Both dumps in one file, as `(iptables-save; ip6tables-save) > FILE` writes them: the whole rule set, a rule
    // for both families (in each dump) once.
    ns.run(&["iptables-restore", "--noflush"], &nat_chain_script(&v6_rules, Family::Ipv4));
    let both = format!("{}{save}", ns.run(&["iptables-save"], ""));
    let back = import(&both).unwrap_or_else(|e| panic!("{e}\n{both}"));
    assert_same_ordered(&back.rules, both_families_order(&v6_rules));
    // The classic ip6tables commands.
    let argv = "-t nat -A PREROUTING -p tcp --dport 80 -j DNAT --to-destination [2001:db8::2]:8080";
    let argv: Vec<&str> = std::iter::once("ip6tables").chain(argv.split(' ')).collect();
    ns.run(&argv, "");
    let save = ns.run(&["ip6tables-save", "-t", "nat"], "");
    let back = import(&save).unwrap_or_else(|e| panic!("{e}\n{save}"));
    let want = rule("dnat -p tcp --dport 80 --to [2001:db8::2]:8080");
    assert!(back.rules.iter().any(|r| r.same_match_and_target(&want)), "{save}");
    let mut del = argv.clone();
    del[3] = "-D";
    ns.run(&del, "");

    // Re-applying the chain script replaces pfwd's rules and leaves the jumps alone; random sets (of both
    // families) check the canonical form over many shapes.
    let mut rng = Rng(42);
    for _ in 0..25 {
        let rules = random_rules(&mut rng, 10);
        for family in [Family::Ipv4, Family::Ipv6] {
            let (restore, save) = restore_save(family);
            let script = nat_chain_script(&rules, family);
            ns.run(&[restore, "--noflush"], &script);
            let saved = ns.run(&[save], "");
            assert_eq!(pfwd_lines(&saved), pfwd_lines(&script), "{saved}");
            assert_same_rules(&import(&saved).unwrap().rules, &for_family(&rules, family));
            assert_eq!(saved.matches("-A PREROUTING -i eth0 -j PFWD-PREROUTING\n").count(), 1, "{saved}");
        }

        let nft = export_nft(&rules, if rules.len().is_multiple_of(2) { None } else { Some(&ifaces) }).unwrap();
        ns.run(&["nft", "-c", "-f", "-"], &nft);
    }

    // Several backends: iptables-save prints the statistic ladder back as written, nft takes the numgen map.
    let lb = vec![
        with_id(20, "dnat -i eth0 -p tcp --dport 80 --to 10.0.2.2:8080,10.0.2.3:8080@2,10.0.2.4:8080"),
        with_id(21, "dnat -d 203.0.113.9 --to 10.0.2.2-10.0.2.5"),
        with_id(22, "dnat -i eth0 -p tcp --dport 80 --to [2001:db8::2]:8080,[2001:db8::3]:8080@2"),
        with_id(23, "dnat -d 2001:db8::9 --to 2001:db8::2-2001:db8::5"),
    ];
    for (family, lines) in [(Family::Ipv4, 7), (Family::Ipv6, 6)] {
        let (restore, save) = restore_save(family);
        let script = nat_chain_script(&lb, family);
        ns.run(&[restore, "--noflush"], &script);
        let saved = ns.run(&[save], "");
        assert_eq!(pfwd_lines(&saved), pfwd_lines(&script), "{saved}");
        assert_eq!(pfwd_lines(&saved).iter().filter(|l| l.contains("-j DNAT")).count(), lines, "{saved}");
        assert_same_rules(&import(&saved).unwrap().rules, &for_family(&lb, family));
    }
    ns.run(&["nft", "-c", "-f", "-"], &export_nft(&lb, Some(&ifaces)).unwrap());
    // --hairpin: the DNAT and its masquerade, in each family.
    let hairpin = vec![
        with_id(24, "dnat -p tcp -d 203.0.113.12 --dport 80 --to 10.0.2.2 --hairpin 10.0.2.0/24"),
        with_id(25, "dnat -p tcp -d 2001:db8::12 --dport 80 --to 2001:db8::2 --hairpin 2001:db8:2::/64"),
    ];
    for family in [Family::Ipv4, Family::Ipv6] {
        let (restore, save) = restore_save(family);
        let script = nat_chain_script(&hairpin, family);
        ns.run(&[restore, "--noflush"], &script);
        let saved = ns.run(&[save], "");
        assert_eq!(pfwd_lines(&saved), pfwd_lines(&script), "{saved}");
        assert_eq!(saved.matches("-hairpin\" -j MASQUERADE").count(), 1, "{saved}");
    }
    ns.run(&["nft", "-c", "-f", "-"], &export_nft(&hairpin, Some(&ifaces)).unwrap());

    // nft: check, then apply twice (the second run replaces the first); one inet table for both families.
    let nft = export_nft(&v6_rules, Some(&ifaces)).unwrap();
    ns.run(&["nft", "-c", "-f", "-"], &nft);
    ns.run(&["nft", "-f", "-"], &nft);
    ns.run(&["nft", "-f", "-"], &nft);
    let listed = ns.run(&["nft", "list", "table", "inet", "pfwd"], "");
    assert_eq!(listed.matches("comment \"pfwd:").count(), v6_rules.len(), "{listed}");
    assert!(listed.contains("type nat hook postrouting priority srcnat; policy accept;"), "{listed}");
    assert!(listed.contains("type nat hook output priority -100; policy accept;"), "{listed}");
    assert!(listed.contains("tcp dport 8080 redirect to :80 comment \"pfwd:12\""), "{listed}");
    assert!(listed.contains("meta nfproto ipv6 tcp dport 8081 redirect to :3001 comment \"pfwd:22\""), "{listed}");
    assert!(listed.contains("dnat ip6 to [2001:db8::2]:80 comment \"pfwd:21\""), "{listed}");
    // Two "policy accept" and "accept comment" per NAT chain (prerouting, postrouting, output), and the forward
    // chain's policy.
    assert_eq!(export_nft(&[], Some(&[])).unwrap().matches("accept").count(), 7);
    ns.run(&["nft", "-c", "-f", "-"], &export_nft(&[], Some(&[])).unwrap());
}
