//! pfwd's kernel programs: TC (tcx) ingress and egress classifiers doing DNAT/REDIRECT with connection tracking.
//!
//! Ingress: a packet of a known flow (original direction) gets its destination rewritten; the first packet of a new
//! flow picks a rule, and both conntrack entries are created. Egress: replies get their source restored.
//! Everything else passes untouched (TCX_NEXT, so other programs on the hook still run).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod rules;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{macros::classifier, programs::TcContext};
    use aya_log_ebpf::{info, warn};
    use core::net::Ipv4Addr;
    use pfwd_common::{Config, PROTO_TCP, Tuple, config_flag, dir, kind, stat};

    use crate::{
        conntrack,
        maps::{CONFIG, IFACES, count, count_rule},
        nat,
        parse::{self, Packet, TCP_SYN},
        rules,
    };

    /// Let the next program on the hook (or the stack) have the packet.
    const NEXT: i32 = -1;
    const DROP: i32 = 2;

    #[inline(always)]
    fn ip(a: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(a))
    }

    #[inline(always)]
    fn ifindex(ctx: &TcContext) -> u32 {
        // SAFETY: the context's __sk_buff is valid for the program's run.
        unsafe { (*ctx.skb.skb).ifindex }
    }

    #[classifier]
    pub fn pfwd_ingress(ctx: TcContext) -> i32 {
        let Some(cfg) = CONFIG.get(0) else { return NEXT };
        let Some(pkt) = parse::parse(&ctx) else { return NEXT };
        let now = conntrack::now_ns();
        if let Some(e) = conntrack::lookup(&pkt.tuple, now, cfg) {
            // SAFETY: map value pointer from lookup.
            let entry = unsafe { &*e };
            if entry.dir == dir::REPLY {
                // Replies are restored where they leave (egress); restoring here could give them a local source
                // address, which the stack drops as martian.
                return NEXT;
            }
            if conntrack::is_tcp_open(&pkt) && conntrack::is_closed(entry) {
                // A new connection reusing the ports of a closed one starts over with the current rules.
                conntrack::remove_flow(&pkt.tuple, entry);
            } else {
                let (xlat, slot) = (entry.xlat, entry.rule_slot);
                conntrack::track(&pkt.tuple, e, &pkt, now);
                return apply(&ctx, &pkt, &xlat, slot, false, cfg);
            }
        }
        new_flow(&ctx, &pkt, now, cfg)
    }

    #[classifier]
    pub fn pfwd_egress(ctx: TcContext) -> i32 {
        let Some(cfg) = CONFIG.get(0) else { return NEXT };
        let Some(pkt) = parse::parse(&ctx) else { return NEXT };
        let now = conntrack::now_ns();
        let Some(e) = conntrack::lookup(&pkt.tuple, now, cfg) else { return NEXT };
        // SAFETY: map value pointer from lookup.
        let entry = unsafe { &*e };
        if entry.dir != dir::REPLY {
            return NEXT;
        }
        if pkt.tcp_flags & TCP_SYN != 0 && conntrack::is_closed(entry) {
            // A SYN-ACK on the ports of a closed translated flow answers a new connection that is not ours.
            conntrack::remove_flow(&pkt.tuple, entry);
            count(stat::STALE_REMOVED);
            return NEXT;
        }
        let (xlat, slot) = (entry.xlat, entry.rule_slot);
        conntrack::track(&pkt.tuple, e, &pkt, now);
        apply(&ctx, &pkt, &xlat, slot, false, cfg)
    }

    #[inline(always)]
    fn new_flow(ctx: &TcContext, pkt: &Packet, now: u64, cfg: &Config) -> i32 {
        if pkt.tuple.proto == PROTO_TCP && !conntrack::is_tcp_open(pkt) {
            // Mid-stream TCP without a flow: not ours to translate.
            return NEXT;
        }
        let ifindex = ifindex(ctx);
        let Some(iface) = (unsafe { IFACES.get(&ifindex) }) else { return NEXT };
        let Some((slot, rule)) = rules::find(&pkt.tuple, ifindex, cfg) else { return NEXT };
        let to_addr = if rule.kind == kind::REDIRECT { iface.addr } else { rule.to_addr };
        if to_addr == 0 {
            count(stat::NO_IFACE_ADDR);
            if cfg.flags & config_flag::LOG_EVENTS != 0 {
                warn!(ctx, "drop: REDIRECT (rule {}) on interface {} without an IPv4 address", rule.id, ifindex);
            }
            return DROP;
        }
        let mut xlat = pkt.tuple;
        xlat.daddr = to_addr;
        if rule.to_port != 0 && pkt.l4_csum_off().is_some() {
            xlat.dport = rule.to_port;
        }
        if let Err(reason) = conntrack::create(&pkt.tuple, &xlat, slot, now, cfg) {
            count(reason);
            if reason == stat::CT_CLASH {
                if cfg.flags & config_flag::LOG_EVENTS != 0 {
                    warn!(ctx, "drop: another live flow already translates to {:i}:{}", ip(xlat.daddr), xlat.dport);
                }
                return DROP;
            }
            return NEXT;
        }
        count(stat::NEW_FLOWS);
        if cfg.flags & config_flag::LOG_EVENTS != 0 {
            let t = &pkt.tuple;
            info!(
                ctx,
                "new flow proto {} {:i}:{} -> {:i}:{} => {:i}:{} (rule {})",
                t.proto,
                ip(t.saddr),
                t.sport,
                ip(t.daddr),
                t.dport,
                ip(xlat.daddr),
                xlat.dport,
                rule.id
            );
        }
        apply(ctx, pkt, &xlat, slot, true, cfg)
    }

    #[inline(always)]
    fn apply(ctx: &TcContext, pkt: &Packet, xlat: &Tuple, slot: u32, new_flow: bool, cfg: &Config) -> i32 {
        if !nat::rewrite(ctx, pkt, xlat) {
            // Possibly half-written: never let a wrongly rewritten packet out.
            count(stat::MALFORMED);
            return DROP;
        }
        count(stat::XLATED);
        count_rule(slot, pkt.ip_len, new_flow);
        if cfg.flags & config_flag::LOG_PACKETS != 0 {
            info!(
                ctx,
                "xlat {:i}:{} -> {:i}:{} as {:i}:{} -> {:i}:{}",
                ip(pkt.tuple.saddr),
                pkt.tuple.sport,
                ip(pkt.tuple.daddr),
                pkt.tuple.dport,
                ip(xlat.saddr),
                xlat.sport,
                ip(xlat.daddr),
                xlat.dport
            );
        }
        NEXT
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    panic!("pfwd-ebpf is built for the bpfel-unknown-none target by pfwd's build script");
}
