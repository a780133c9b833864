//! Source NAT for new flows leaving through an attached interface: the SNAT or MASQUERADE address (MASQUERADE asks
//! the FIB, `fib`), and the source port (or ICMP echo identifier) allocation. (Destination NAT is `dnat`.)
//!
//! Port allocation follows Cilium's scheme: keep the original port when it is free, else start at a random offset in
//! the range and probe a bounded number of ports. A port is taken when a live flow already owns the *reply* tuple
//! (destination, SNAT address, destination port, port), so one port serves many destinations. Claims are atomic
//! (conntrack::create inserts the reply entry with BPF_NOEXIST), and a full range drops the new flow only.
use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::TcContext};
use pfwd_common::{Config, FlowTuple, IfaceInfo, RuleEntry, Stat, ct_hook, kind};

use crate::{conntrack, family::Family, parse::Packet};

/// Ports probed before a new flow is dropped for lack of a free one.
const PROBES: u32 = 32;
/// The range used when a rule gives none and the original port is taken (the unprivileged ports, as Linux uses).
const DEFAULT_LO: u16 = 1024;
const DEFAULT_HI: u16 = 65535;

/// The address MASQUERADE uses now: the source the kernel would choose for this destination through `ifindex`
/// (bpf_fib_lookup with BPF_FIB_LOOKUP_SRC, Linux 6.8+), so a changed interface address is followed with no daemon;
/// else the interface address pfwd recorded.
#[inline(always)]
fn masquerade_addr<A: Family>(ctx: &TcContext, t: &FlowTuple<A>, ifindex: u32, iface: &IfaceInfo) -> A {
    A::route_src(ctx, t, ifindex).unwrap_or_else(|| A::iface_addr(iface))
}

/// Whether `port` is free for the flow `t` translated to `addr`: no live flow of another origin owns the reply
/// tuple it would have (in either conntrack table).
#[inline(always)]
fn port_free<A: Family>(t: &FlowTuple<A>, addr: A, port: u16, icmp: bool, now: u64, cfg: &Config) -> bool {
    let Some(s) = A::ct_scratch() else { return false };
    s.reply_key = FlowTuple::new(t.daddr, addr, if icmp { port } else { t.dport }, port, t.proto);
    s.ours = t.reversed();
    !conntrack::taken(&s.reply_key, &s.ours, now, cfg)
}

/// Translates the first packet of a flow leaving through `ifindex` by `rule` (SNAT or MASQUERADE): picks the address
/// and a free port into `xlat`, creates the flow. Err: the stat explaining the refusal.
#[inline(always)]
#[allow(clippy::too_many_arguments)] // Inlined into the program: a struct of arguments would only cost stack.
pub fn allocate<A: Family>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    slot: u32,
    rule: &RuleEntry,
    ifindex: u32,
    iface: &IfaceInfo,
    now: u64,
    cfg: &Config,
    xlat: &mut FlowTuple<A>,
) -> Result<(), Stat> {
    let t = &pkt.tuple;
    let addr = if rule.kind == kind::MASQUERADE {
        masquerade_addr(ctx, t, ifindex, iface)
    } else {
        A::from_wide(&rule.to_addr)
    };
    if addr.is_unspecified() {
        return Err(Stat::NoIfaceAddr);
    }
    *xlat = *t;
    xlat.saddr = addr;
    if pkt.has_ports() {
        let icmp = t.proto == A::ICMP;
        let (lo, hi) = if rule.to_port == 0 { (DEFAULT_LO, DEFAULT_HI) } else { (rule.to_port, rule.to_port_hi) };
        let keep =
            (rule.to_port == 0 || (lo <= t.sport && t.sport <= hi)) && port_free(t, addr, t.sport, icmp, now, cfg);
        let mut port = t.sport;
        if !keep {
            let size = (hi - lo) as u32 + 1;
            // SAFETY: helper without arguments.
            let start = unsafe { bpf_get_prandom_u32() } % size;
            let mut found = false;
            for i in 0..PROBES {
                if i >= size {
                    break;
                }
                port = lo + ((start + i) % size) as u16;
                if port_free(t, addr, port, icmp, now, cfg) {
                    found = true;
                    break;
                }
            }
            if !found {
                return Err(Stat::SnatExhausted);
            }
        }
        xlat.sport = port;
        // An ICMP echo identifier is both "ports" of its tuple.
        if icmp {
            xlat.dport = port;
        }
    }
    // A CPU racing for the same port makes this fail with CT_CLASH: the flow's next packet tries again.
    conntrack::create(t, xlat, slot, ct_hook::EGRESS, 0)
}
