//! Destination NAT for new flows arriving on an attached interface: the DNAT target or, for REDIRECT, the incoming
//! interface's address, and the target port. (Source NAT, with its port allocation, is `snat`.)
use pfwd_common::{Config, IfaceInfo, RuleEntry, Stat, Tuple, ct_hook, kind};

use crate::{conntrack, parse::Packet};

/// Translates the first packet of a flow arriving on the interface `iface` by `rule` (DNAT or REDIRECT) and creates
/// the flow. Returns the translated tuple, or the stat explaining the refusal.
#[inline(always)]
pub fn create(
    pkt: &Packet,
    slot: u32,
    rule: &RuleEntry,
    iface: &IfaceInfo,
    now: u64,
    cfg: &Config,
) -> Result<Tuple, Stat> {
    let to_addr = if rule.kind == kind::REDIRECT { iface.addr } else { rule.to_addr };
    if to_addr == 0 {
        // REDIRECT on an interface without an address: iptables drops these too.
        return Err(Stat::NoIfaceAddr);
    }
    let mut xlat = pkt.tuple;
    xlat.daddr = to_addr;
    // ICMP echo identifiers are not ports: DNAT keeps them.
    if rule.to_port != 0 && pkt.has_port_numbers() {
        xlat.dport = rule.to_port;
    }
    conntrack::create(&pkt.tuple, &xlat, slot, now, cfg, ct_hook::INGRESS).map(|_| xlat)
}
