//! Human output of `pfwd status` (the `--json` form is the [`crate::report`] types serialized).

use crate::{
    loader::XdpRun,
    report::{ConntrackSummary, InstanceStatus, L4Checksums},
};

/// A value that may be unknown, or what stands for it (the human output has always shown an unknown number as
/// `null`, as the JSON does).
pub(super) fn or<T: std::fmt::Display>(v: Option<T>, unknown: &str) -> String {
    v.map_or_else(|| unknown.to_string(), |v| v.to_string())
}

pub(super) fn print_status(s: &InstanceStatus) {
    let ifaces: Vec<String> = s
        .interfaces
        .iter()
        .map(|i| {
            let v6 = i.address6.map(|a| format!("{a}, ")).unwrap_or_default();
            let xdp = match i.xdp {
                Some(XdpRun::Native) => ", XDP native",
                Some(XdpRun::Generic) => ", XDP generic",
                None => "",
            };
            format!("{} ({}, {v6}link/{}{xdp})", i.name, or(i.address, "no IPv4"), or(i.link_type.as_ref(), "gone"))
        })
        .collect();
    println!("mode:       {} ({})", s.mode, s.mode_reason);
    if let Some(what) = &s.interrupted {
        println!("INTERRUPTED: {what}");
    }
    println!("interfaces: {}", ifaces.join(", "));
    if s.fast_forward {
        println!("fast path:  on (forwarded packets of translated flows skip the IP stack and netfilter)");
    }
    match s.l4_checksums {
        Some(L4Checksums::ByHandWhereSafe) => println!(
            "checksums:  TCP/UDP updated by hand where the skb allows (CHECKSUM_NONE/UNNECESSARY), by the kernel's \
             helper otherwise"
        ),
        Some(L4Checksums::Helper) => println!(
            "checksums:  TCP/UDP updated by the kernel's helper for every packet (this kernel's BTF has no \
             bpf_cast_to_kern_ctx or sk_buff.ip_summed; or a pfwd older than this line attached the instance: \
             detach and attach again to be sure)"
        ),
        None => {}
    }
    if s.interfaces.iter().any(|i| i.xdp.is_some()) {
        println!("XDP path:   on (established forwarded IPv4 flows skip the skb, IP stack and netfilter)");
    }
    if s.rules.is_empty() {
        println!("rules:      none (add one with `pfwd add dnat|redirect|snat|masquerade ...`)");
    } else {
        println!("rules:");
        println!("  {:>4}  {:>7}  {:>9}  {:>11}  {:>6}  RULE", "ID", "FLOWS", "PACKETS", "BYTES", "DROPS");
        for r in &s.rules {
            let c = &r.counters;
            println!(
                "  {:>4}  {:>7}  {:>9}  {:>11}  {:>6}  {}",
                r.rule.id, c.flows, c.packets, c.bytes, c.drops, r.rule.text
            );
            for b in &r.backend_counters {
                let to = match b.port {
                    Some(p) => format!("{}:{p}", b.addr),
                    None => b.addr.to_string(),
                };
                let removed = if b.removed { " (removed from the rule; its flows go on)" } else { "" };
                println!(
                    "  {:>4}  {:>7}  {:>9}  {:>11}  {:>6}    backend {to}{removed}",
                    "", b.flows, b.packets, b.bytes, ""
                );
            }
        }
    }
    let ct = &s.conntrack;
    let mem = match ct {
        ConntrackSummary::Ebpf(c) => format!(", BPF maps {:.1} MiB", c.maps_memory_bytes as f64 / 1048576.0),
        ConntrackSummary::Netfilter(_) => String::new(),
    };
    println!(
        "conntrack:  {} live entries ({} flows), capacity {} entries{mem}",
        ct.entries(),
        or(ct.flows(), "null"),
        or(ct.capacity(), "null"),
    );
    if let ConntrackSummary::Ebpf(c) = ct {
        let (a, u) = (&c.confirmed, &c.unconfirmed);
        println!(
            "            confirmed {} flows ({}/{} entries), unconfirmed {} flows ({}/{} entries)",
            a.flows, a.entries, a.capacity, u.flows, u.entries, u.capacity
        );
    }
    if let Some(e) = &s.rule_engine {
        let c = &e.classes;
        println!(
            "rule index: {} keys ({} for IPv4); match shapes (of {} per hook) prerouting {}, postrouting {}, output {}; \
             generation {}",
            e.index_keys, e.index4_keys, e.max_classes, c.prerouting, c.postrouting, c.output, e.generation
        );
    }
    let stats: Vec<String> = s.stats.iter().filter(|(_, v)| **v != 0).map(|(k, v)| format!("{k}={v}")).collect();
    if !stats.is_empty() {
        println!("counters:   {}", stats.join(" "));
    }
    for c in &s.sysctls {
        println!("sysctl:     {} (was {}): {}", c.key.replace('/', "."), c.previous, c.reason);
    }
}
