//! Destination NAT for new flows arriving on an attached interface: the DNAT target or, for REDIRECT, the incoming
//! interface's address, and the target port. A rule with several backends picks one by its Maglev table (the entry at
//! the hash of the flow's tuple); the flow's conntrack entries then keep every later packet and reply on it. (Source
//! NAT, with its port allocation, is `snat`.)
use pfwd_common::{
    BackendKey, Config, IfaceInfo, MAGLEV_SIZE, RuleEntry, Stat, Tuple, ct_flag, ct_hook, flow_hash, kind, rule_flag,
};

use crate::{conntrack, maps::BACKENDS, parse::Packet};

/// Translates the first packet of a flow arriving on the interface `iface` by `rule` (DNAT or REDIRECT, in `slot`)
/// and creates the flow. Returns the translated tuple, or the stat explaining the refusal.
#[inline(always)]
pub fn create(
    pkt: &Packet,
    slot: u32,
    rule: &RuleEntry,
    iface: &IfaceInfo,
    now: u64,
    cfg: &Config,
) -> Result<Tuple, Stat> {
    let (mut to_addr, mut to_port, mut flags) = (rule.to_addr, rule.to_port, 0);
    if rule.kind == kind::REDIRECT {
        to_addr = iface.addr;
    } else if rule.flags & rule_flag::BACKENDS != 0 {
        let picked = pick(slot, flow_hash(&pkt.tuple) % MAGLEV_SIZE);
        (to_addr, to_port, flags) = ((picked >> 16) as u32, picked as u16, ct_flag::BACKENDS);
    }
    if to_addr == 0 {
        // REDIRECT on an interface without an address: iptables drops these too. (A missing table entry, which
        // userspace never leaves, drops the same way rather than translating to nowhere.)
        return Err(Stat::NoIfaceAddr);
    }
    let mut xlat = pkt.tuple;
    xlat.daddr = to_addr;
    // ICMP echo identifiers are not ports: DNAT keeps them.
    if to_port != 0 && pkt.has_port_numbers() {
        xlat.dport = to_port;
    }
    conntrack::create(&pkt.tuple, &xlat, slot, now, cfg, (ct_hook::INGRESS, flags)).map(|_| xlat)
}

/// The backend at `index` of the Maglev table of the rule in slot `rule`: its address
/// (network order) in bits 16-47 and its port in bits 0-15; 0 when the entry is missing. Not inlined: its key stays
/// off the callers' stack frame.
#[inline(never)]
fn pick(rule: u32, index: u32) -> u64 {
    let key = BackendKey { rule, index };
    // SAFETY: plain read of a map value, which stays valid for the program's run.
    match unsafe { BACKENDS.get(&key) } {
        Some(b) => ((b.addr as u64) << 16) | b.port as u64,
        None => 0,
    }
}
