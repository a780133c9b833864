//! pfwd's kernel programs: TC (tcx) ingress and egress classifiers doing DNAT/REDIRECT (ingress, before routing) and
//! SNAT/MASQUERADE (egress, after routing) with connection tracking.
//!
//! The first packet of a new flow picks a rule (`rules`, the walk shared with userspace in `pfwd_common::lookup`)
//! and creates both conntrack entries (`dnat`, `snat`, `conntrack`); later packets only look up and rewrite (`nat`);
//! replies are translated back at the opposite hook; ICMP errors about translated flows are translated in their outer
//! and embedded headers; `--fast-forward` hands forwarded packets to their next hop (`forward`, `fib`). Everything
//! else passes untouched (TCX_NEXT, so other programs still run). `sockaddr` holds the cgroup socket hooks of
//! `--local` rules.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Map keys go to the helpers by reference on purpose: aya-ebpf's `impl Borrow<K>` would accept them by value, which
// copies each key onto the 512-byte BPF stack (measured: the ingress program then no longer verifies).
#![allow(clippy::needless_borrows_for_generic_args)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod dnat;
#[cfg(target_arch = "bpf")]
mod fib;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod fragment;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod rules;
#[cfg(target_arch = "bpf")]
mod snat;
#[cfg(target_arch = "bpf")]
mod sockaddr;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::tcx_action_base::{TCX_DROP, TCX_NEXT, TCX_PASS, TCX_REDIRECT},
        macros::classifier,
        programs::TcContext,
    };
    use aya_log_ebpf::{info, warn};
    use core::net::Ipv4Addr;
    use pfwd_common::{
        Config, PROTO_TCP, Stat, Tuple, config_flag, ct_flag, ct_hook, dir, frag_action, hook, rule_flag, tcx,
    };

    use crate::{
        conntrack, dnat, forward, fragment,
        maps::{CONFIG, IFACES, count, count_backend, count_rule, count_rule_drop},
        nat,
        parse::{self, Embedded, Icmp, Packet, TCP_SYN, frag},
        rules, snat,
    };

    /// Let the next program on the hook (or the stack) have the packet.
    const NEXT: i32 = TCX_NEXT;
    const DROP: i32 = TCX_DROP;

    // Userspace (the packet tests) reads the return codes from pfwd_common::tcx: they must be the kernel's.
    const _: () = assert!(
        tcx::NEXT == TCX_NEXT && tcx::PASS == TCX_PASS && tcx::DROP == TCX_DROP && tcx::REDIRECT == TCX_REDIRECT
    );

    #[inline(always)]
    fn ip(a: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(a))
    }

    #[inline(always)]
    fn logging(cfg: &Config) -> bool {
        cfg.flags & config_flag::LOG_EVENTS != 0
    }

    /// What to do with a packet. Each program has a single place that rewrites, so the verifier sees the rewrite
    /// code once per program.
    enum Verdict {
        Pass,
        /// A packet of a flow pfwd translates at the other hook: nothing to do here, but it may be fast-forwarded.
        Known,
        Drop,
        Translate {
            xlat: Tuple,
            slot: u32,
            new_flow: bool,
            /// The flow's [`pfwd_common::ct_flag`] bits and direction ([`dir`]): which backend to count, if any.
            lb: (u8, u8),
        },
    }

    /// Ingress: original direction of DNAT/REDIRECT flows (and their first packet), replies of SNAT flows.
    #[classifier]
    pub fn pfwd_ingress(ctx: TcContext) -> i32 {
        run(&ctx, ct_hook::INGRESS)
    }

    /// Egress: replies of DNAT/REDIRECT flows, original direction of SNAT flows (and their first packet).
    #[classifier]
    pub fn pfwd_egress(ctx: TcContext) -> i32 {
        run(&ctx, ct_hook::EGRESS)
    }

    #[inline(always)]
    fn run(ctx: &TcContext, at: u8) -> i32 {
        let Some(cfg) = CONFIG.get(0) else { return NEXT };
        let Some(pkt) = parse::parse(ctx) else { return NEXT };
        if pkt.frag == frag::LATER {
            return fragment::later(ctx, &pkt, at);
        }
        if let Icmp::Error(emb) = pkt.icmp {
            return icmp_error(ctx, &pkt, &emb, at, cfg);
        }
        match verdict(ctx, &pkt, at, cfg) {
            Verdict::Pass => {
                fragment::note_first(&pkt, at, frag_action::PASS, &pkt.tuple, 0);
                NEXT
            }
            Verdict::Known => {
                fragment::note_first(&pkt, at, frag_action::PASS, &pkt.tuple, 0);
                if at == ct_hook::INGRESS { forward::redirect(ctx, &pkt.tuple, cfg).unwrap_or(NEXT) } else { NEXT }
            }
            Verdict::Drop => {
                fragment::note_first(&pkt, at, frag_action::DROP, &pkt.tuple, 0);
                DROP
            }
            Verdict::Translate { xlat, slot, new_flow, lb } => {
                fragment::note_first(&pkt, at, frag_action::XLATE, &xlat, slot);
                if new_flow && logging(cfg) {
                    let t = &pkt.tuple;
                    info!(
                        ctx,
                        "new flow {:i}:{} -> {:i}:{} proto {} => {:i}:{} -> {:i}:{}",
                        ip(t.saddr),
                        t.sport,
                        ip(t.daddr),
                        t.dport,
                        t.proto,
                        ip(xlat.saddr),
                        xlat.sport,
                        ip(xlat.daddr),
                        xlat.dport
                    );
                }
                let ret = apply(ctx, &pkt, &xlat, slot, new_flow, cfg);
                if ret == NEXT && lb.0 & ct_flag::BACKENDS != 0 {
                    // The backend: where the original direction goes, where replies come from.
                    let (addr, port) = if lb.1 == dir::ORIGINAL {
                        (xlat.daddr, xlat.dport)
                    } else {
                        (pkt.tuple.saddr, pkt.tuple.sport)
                    };
                    count_backend(slot, addr, port, pkt.ip_len, new_flow);
                }
                if ret == NEXT && at == ct_hook::INGRESS {
                    return forward::redirect(ctx, &xlat, cfg).unwrap_or(NEXT);
                }
                ret
            }
        }
    }

    #[inline(always)]
    fn verdict(ctx: &TcContext, pkt: &Packet, at: u8, cfg: &Config) -> Verdict {
        let now = conntrack::now_ns();
        if let Some(e) = conntrack::lookup(&pkt.tuple, now, cfg) {
            // SAFETY: map value pointer from lookup.
            let entry = unsafe { &*e };
            if entry.hook != at {
                // A known flow, translated at the other hook.
                return Verdict::Known;
            }
            let closed = pkt.tuple.proto == PROTO_TCP && entry.is_closed();
            if closed && entry.dir == dir::REPLY && pkt.tcp_flags & TCP_SYN != 0 {
                // A SYN(-ACK) on the ports of a closed translated flow belongs to a new connection that is not ours.
                conntrack::remove_flow(&pkt.tuple, entry);
                count(Stat::StaleRemoved);
                return Verdict::Pass;
            }
            if !(closed && entry.dir == dir::ORIGINAL && pkt.can_open()) {
                let (xlat, slot, lb) = (entry.xlat, entry.rule_slot, (entry.flags, entry.dir));
                conntrack::track(&pkt.tuple, e, pkt, now);
                return Verdict::Translate { xlat, slot, new_flow: false, lb };
            }
            // A new connection reusing the ports of a closed one starts over with the current rules.
            conntrack::remove_flow(&pkt.tuple, entry);
        }
        let set = cfg.active();
        let (hook, classes) = if at == ct_hook::INGRESS {
            (hook::PREROUTING, set.counts.pre)
        } else {
            (hook::POSTROUTING, set.counts.post)
        };
        if classes == 0 || !pkt.can_open() {
            return Verdict::Pass;
        }
        let ifindex = parse::ifindex(ctx);
        // Only interfaces pfwd is attached to (and knows the address of).
        // SAFETY: plain read of a map value, which stays valid for the program's run.
        let Some(iface) = (unsafe { IFACES.get(&ifindex) }) else { return Verdict::Pass };
        let Some((slot, rule)) = rules::find(&pkt.tuple, ifindex, hook, &set) else { return Verdict::Pass };
        let created = if at == ct_hook::INGRESS {
            dnat::create(pkt, slot, rule, iface, now, cfg)
        } else {
            snat::allocate(ctx, pkt, slot, rule, ifindex, iface, now, cfg)
        };
        match created {
            Ok(xlat) => {
                count(Stat::NewFlows);
                let lb = if at == ct_hook::INGRESS && rule.flags & rule_flag::BACKENDS != 0 {
                    (ct_flag::BACKENDS, dir::ORIGINAL)
                } else {
                    (0, dir::ORIGINAL)
                };
                Verdict::Translate { xlat, slot, new_flow: true, lb }
            }
            Err(reason) => {
                count(reason);
                if reason == Stat::CtInsertFailed {
                    // The table refused the entry: the flow passes untranslated rather than being cut.
                    return Verdict::Pass;
                }
                count_rule_drop(slot);
                if logging(cfg) {
                    warn!(ctx, "drop: new flow refused by rule {} (reason: stat {})", rule.id, reason.index());
                }
                Verdict::Drop
            }
        }
    }

    /// An ICMP error about a flow translated at this hook: translate the embedded packet back to what its sender
    /// sent, and the outer header with it. The flow is found by the embedded packet's reply tuple.
    #[inline(always)]
    fn icmp_error(ctx: &TcContext, pkt: &Packet, emb: &Embedded, at: u8, cfg: &Config) -> i32 {
        let now = conntrack::now_ns();
        let key = emb.tuple.reversed();
        let entry = match conntrack::lookup(&key, now, cfg) {
            // SAFETY: map value pointer from lookup.
            Some(e) if unsafe { (*e).hook } == at => unsafe { &*e },
            _ => {
                fragment::note_first(pkt, at, frag_action::PASS, &pkt.tuple, 0);
                return NEXT;
            }
        };
        let new_inner = entry.xlat.reversed();
        let slot = entry.rule_slot;
        let Some(outer) = nat::rewrite_icmp_error(ctx, pkt, emb, &new_inner) else {
            count(Stat::Malformed);
            fragment::note_first(pkt, at, frag_action::DROP, &pkt.tuple, 0);
            return DROP;
        };
        // An error long enough to be fragmented itself: its later fragments get the outer addresses.
        fragment::note_first(pkt, at, frag_action::XLATE, &outer, slot);
        count(Stat::IcmpErrorsXlated);
        count_rule(slot, pkt.ip_len, false);
        NEXT
    }

    #[inline(always)]
    fn apply(ctx: &TcContext, pkt: &Packet, xlat: &Tuple, slot: u32, new_flow: bool, cfg: &Config) -> i32 {
        if !nat::rewrite(ctx, pkt, xlat) {
            // Possibly half-written: never let a wrongly rewritten packet out.
            count(Stat::Malformed);
            return DROP;
        }
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
