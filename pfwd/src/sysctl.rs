//! The sysctls pfwd needs and their restoration: `route_localnet` on interfaces whose rules DNAT to 127.0.0.0/8
//! (otherwise the stack drops such packets as martians), and `ip_forward` when a rule sends traffic to another host.
//! Earlier values are saved in the state the first time pfwd changes them and restored when no longer needed.
use std::{borrow::Cow, fs, net::IpAddr};

use anyhow::{Context, Result};

use crate::{netif, rules::Rule, rules::Target, rules::model::Family, state::SavedSysctl};

pub fn read(key: &str) -> Result<String> {
    let path = format!("/proc/sys/{key}");
    Ok(fs::read_to_string(&path).with_context(|| format!("reading {path}"))?.trim().to_string())
}

pub fn write(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    fs::write(&path, value).with_context(|| format!("writing {value} to {path}"))
}

/// The sysctls the rules need on the attached interfaces: (key, value, reason).
pub fn wanted<'r>(rules: impl IntoIterator<Item = &'r Rule>, ifaces: &[String]) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = vec![];
    let locals = netif::local_addrs();
    for r in rules {
        // The reason is only written for the first rule that wants a key (with 100,000 rules, formatting one per
        // rule was a visible share of a `pfwd add`).
        rule_wants(r, ifaces, &locals, &mut |key, reason| {
            if !out.iter().any(|(k, ..)| *k == key) {
                out.push((key.into_owned(), "1".into(), reason()));
            }
        });
    }
    out
}

/// Each sysctl the rules need with how many of them need it (kept with the state, so that removing a few rules
/// tells whether the others still need it without looking at them).
pub fn users<'r>(rules: impl IntoIterator<Item = &'r Rule>, ifaces: &[String]) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = vec![];
    let locals = netif::local_addrs();
    // One rule's keys, each once; reused from rule to rule (the usual key is a constant: nothing to allocate).
    let mut keys: Vec<Cow<str>> = vec![];
    for r in rules {
        keys.clear();
        rule_wants(r, ifaces, &locals, &mut |key, _| {
            if !keys.contains(&key) {
                keys.push(key);
            }
        });
        for key in keys.drain(..) {
            match out.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => out.push((key.into_owned(), 1)),
            }
        }
    }
    out
}

/// What [`rule_wants`] calls with each key (borrowed where it is a constant: this runs for every rule, several
/// times per change) and a way to get its reason.
type Want<'w> = dyn FnMut(Cow<'static, str>, &dyn Fn() -> String) + 'w;

/// Calls `want` with each sysctl rule `r` needs (key, and its reason when asked for); `locals` are this host's
/// addresses.
fn rule_wants(r: &Rule, ifaces: &[String], locals: &[IpAddr], want: &mut Want) {
    // --local rules translate sockets of this host: nothing arrives on an interface or is forwarded.
    if r.local {
        return;
    }
    // Each backend of a DNAT rule with several, like a rule of its own (the target is the first backend).
    let backends = match r.target {
        Target::Dnat { .. } => &r.backends[..],
        _ => &[],
    };
    let targets = (backends.is_empty().then_some(r.target).into_iter())
        .chain(backends.iter().map(|b| Target::Dnat { addr: b.addr, port: b.port }));
    // IPv6 forwarding is turned on for IPv6 rules only, not for rules without addresses: on a host that takes its
    // IPv6 address from router advertisements, forwarding=1 stops it accepting them (unless accept_ra=2).
    let forward = if r.family() == Some(Family::Ipv6) { "net/ipv6/conf/all/forwarding" } else { "net/ipv4/ip_forward" };
    for target in targets {
        match target {
            Target::Dnat { addr: IpAddr::V4(addr), .. } if addr.is_loopback() => {
                for i in ifaces.iter().filter(|i| r.iface.as_ref().is_none_or(|ri| (ri == *i) != r.not.iface)) {
                    want(format!("net/ipv4/conf/{i}/route_localnet").into(), &|| {
                        format!("rule {} DNATs to loopback {addr} on {i}", r.id)
                    });
                }
            }
            Target::Dnat { addr, .. } if !locals.contains(&addr) && !addr.is_unspecified() => {
                want(forward.into(), &|| format!("rule {} forwards to another host ({addr})", r.id));
            }
            // Source NAT is what a router does for the hosts behind it: their packets must be forwarded.
            Target::Snat { .. } | Target::Masquerade { .. } => {
                want(forward.into(), &|| format!("rule {} ({}) translates forwarded traffic", r.id, r.kind_name()));
            }
            _ => {}
        }
    }
}

/// Brings the system to `wanted`: sets what is missing (saving the old value) and restores what is no longer
/// wanted. Returns human-readable lines describing each change.
pub fn reconcile(saved: &mut Vec<SavedSysctl>, wanted: &[(String, String, String)]) -> Result<Vec<String>> {
    let mut notes = vec![];
    for (key, value, reason) in wanted {
        let current = read(key)?;
        if let Some(s) = saved.iter_mut().find(|s| s.key == *key) {
            s.reason = reason.clone();
            if current != *value {
                write(key, value)?;
            }
            continue;
        }
        if current != *value {
            write(key, value)?;
            notes.push(format!("set {} = {value} (was {current}): {reason}", key.replace('/', ".")));
            saved.push(SavedSysctl { key: key.clone(), previous: current, reason: reason.clone() });
        }
    }
    let mut keep = vec![];
    for s in saved.drain(..) {
        if wanted.iter().any(|(k, ..)| *k == s.key) {
            keep.push(s);
        } else {
            restore_one(&s, &mut notes);
        }
    }
    *saved = keep;
    Ok(notes)
}

/// Restores every saved sysctl (detach). Failures are reported, not fatal: an interface may be gone.
pub fn restore_all(saved: &[SavedSysctl]) -> Vec<String> {
    let mut notes = vec![];
    // Reverse order, so that a key changed twice ends at its first saved value.
    for s in saved.iter().rev() {
        restore_one(s, &mut notes);
    }
    notes
}

fn restore_one(s: &SavedSysctl, notes: &mut Vec<String>) {
    match write(&s.key, &s.previous) {
        Ok(()) => notes.push(format!("restored {} = {}", s.key.replace('/', "."), s.previous)),
        Err(e) => notes.push(format!("could not restore {}: {e:#}", s.key.replace('/', "."))),
    }
}
