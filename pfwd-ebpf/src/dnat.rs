//! Destination NAT for new flows arriving on an attached interface: the DNAT target or, for REDIRECT, the incoming
//! interface's address, and the target port. A rule with several backends picks one by its Maglev table (the entry at
//! the hash of the flow's tuple); the flow's conntrack entries then keep every later packet and reply on it. (Source
//! NAT, with its port allocation, is `snat`.)
use pfwd_common::{
    Addr6, BackendKey, FlowTuple, IfaceInfo, MAGLEV_SIZE, RuleEntry, Stat, ct_flag, ct_hook, flow_hash, kind, rule_flag,
};

use crate::{conntrack, family::Family, maps::BACKENDS, parse::Packet};

/// Translates the first packet of a flow arriving on the interface `iface` by `rule` (DNAT or REDIRECT, in `slot`)
/// into `xlat` and creates the flow. Err: the stat explaining the refusal.
#[inline(always)]
pub fn create<A: Family>(
    pkt: &Packet<A>,
    slot: u32,
    rule: &RuleEntry,
    iface: &IfaceInfo,
    xlat: &mut FlowTuple<A>,
) -> Result<(), Stat> {
    let (mut to_addr, mut to_port, mut flags) = (A::from_wide(&rule.to_addr), rule.to_port, 0);
    if rule.kind == kind::REDIRECT {
        to_addr = A::iface_addr(iface);
    } else if rule.flags & rule_flag::BACKENDS != 0 {
        let mut picked = [0u32; 4];
        to_port = pick(slot, flow_hash(&pkt.tuple) % MAGLEV_SIZE, &mut picked);
        (to_addr, flags) = (A::from_wide(&picked), ct_flag::BACKENDS);
    }
    if to_addr.is_unspecified() {
        // REDIRECT on an interface without an address: iptables drops these too. (A missing table entry, which
        // userspace never leaves, drops the same way rather than translating to nowhere.)
        return Err(Stat::NoIfaceAddr);
    }
    *xlat = pkt.tuple;
    xlat.daddr = to_addr;
    // ICMP echo identifiers are not ports: DNAT keeps them.
    if to_port != 0 && pkt.has_port_numbers() {
        xlat.dport = to_port;
    }
    conntrack::create(&pkt.tuple, xlat, slot, ct_hook::INGRESS, flags)
}

/// The backend at `index` of the Maglev table of the rule in slot `rule`: its address (wide form) into `addr` and
/// its port returned; both 0 when the entry is missing. Not inlined: its key stays off the callers' stack frame.
#[inline(never)]
fn pick(rule: u32, index: u32, addr: &mut Addr6) -> u16 {
    let key = BackendKey { rule, index };
    // SAFETY: plain read of a map value, which stays valid for the program's run.
    match unsafe { BACKENDS.get(&key) } {
        Some(b) => {
            *addr = b.addr;
            b.port
        }
        None => 0,
    }
}
