//! pfwd's kernel programs: TC (tcx) ingress and egress classifiers doing DNAT/REDIRECT (ingress, before routing) and
//! SNAT/MASQUERADE (egress, after routing) with connection tracking.
//!
//! Both programs read IPv4 and IPv6; each family's path is the same code (`family`), compiled once per family. The
//! attached programs run the IPv4 path and tail-call their IPv6 halves (`pfwd_ingress6`, `pfwd_egress6`) and IPv4
//! ICMP error handlers (`pfwd_ingress_icmp4`, `pfwd_egress_icmp4`), each with a stack of its own.
//!
//! The first packet of a new flow picks a rule (`rules`, the walk shared with userspace in `pfwd_common::lookup`)
//! and creates both conntrack entries (`dnat`, `snat`, `conntrack`); later packets only look up and rewrite (`nat`);
//! replies are translated back at the opposite hook; ICMP errors about translated flows are translated in their outer
//! and embedded headers; `--fast-forward` hands forwarded packets to their next hop (`forward`, `fib`). Everything
//! else passes untouched (TCX_NEXT, so other programs still run). `sockaddr` holds the cgroup socket hooks of
//! `--local` rules; `xdp` the XDP fast path of `--xdp`, which forwards established flows' packets before the kernel
//! builds an skb for them.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Inline assembly (`parse::load_u32`): one 4-byte load where the backend would assemble a word from bytes.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
// Map keys go to the helpers by reference on purpose: aya-ebpf's `impl Borrow<K>` would accept them by value, which
// copies each key onto the 512-byte BPF stack (measured: the ingress program then no longer verifies).
#![allow(clippy::needless_borrows_for_generic_args)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod csum_state;
#[cfg(target_arch = "bpf")]
mod dnat;
#[cfg(target_arch = "bpf")]
mod family;
#[cfg(target_arch = "bpf")]
mod fib;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod fragment;
#[cfg(target_arch = "bpf")]
mod handoff;
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
mod xdp;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::tcx_action_base::{TCX_DROP, TCX_NEXT, TCX_PASS, TCX_REDIRECT},
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use aya_log_ebpf::{info, warn};
    use pfwd_common::{
        Addr6, Config, FlowTuple, PROTO_TCP, Stat, config_flag, ct_flag, ct_hook, dir, frag_action, hook, rule_flag,
        tcx,
    };

    use crate::{
        conntrack, dnat,
        family::Family,
        fragment, handoff,
        maps::{
            CONFIG, IFACES, TAIL, count, count_backend, count_rule, count_rule_drop, err_work4, err_work6, tail, work6,
        },
        nat,
        parse::{self, ETH_P_IP, ETH_P_IPV6, ErrWork, ICMP_HLEN, Packet, TCP_SYN, Verdict, frag, icmp, ip_off},
        rules, snat,
    };

    /// The XDP fast path (`pfwd attach --xdp`): established forwarded flows skip the skb (`crate::xdp`).
    #[xdp]
    pub fn pfwd_xdp(ctx: XdpContext) -> u32 {
        crate::xdp::run(&ctx)
    }

    /// Let the next program on the hook (or the stack) have the packet.
    const NEXT: i32 = TCX_NEXT;
    const DROP: i32 = TCX_DROP;

    // Userspace (the packet tests) reads the return codes from pfwd_common::tcx: they must be the kernel's.
    const _: () = assert!(
        tcx::NEXT == TCX_NEXT && tcx::PASS == TCX_PASS && tcx::DROP == TCX_DROP && tcx::REDIRECT == TCX_REDIRECT
    );

    #[inline(always)]
    fn logging(cfg: &Config) -> bool {
        cfg.flags & config_flag::LOG_EVENTS != 0
    }

    /// Ingress: original direction of DNAT/REDIRECT flows (and their first packet), replies of SNAT flows.
    #[classifier]
    pub fn pfwd_ingress(ctx: TcContext) -> i32 {
        dispatch(&ctx, ct_hook::INGRESS)
    }

    /// Egress: replies of DNAT/REDIRECT flows, original direction of SNAT flows (and their first packet).
    #[classifier]
    pub fn pfwd_egress(ctx: TcContext) -> i32 {
        dispatch(&ctx, ct_hook::EGRESS)
    }

    /// The IPv6 half of `pfwd_ingress`, which tail-calls it for IPv6 packets (`TAIL`); never attached itself.
    #[classifier]
    pub fn pfwd_ingress6(ctx: TcContext) -> i32 {
        path6(&ctx, ct_hook::INGRESS)
    }

    /// The IPv6 half of `pfwd_egress`.
    #[classifier]
    pub fn pfwd_egress6(ctx: TcContext) -> i32 {
        path6(&ctx, ct_hook::EGRESS)
    }

    /// IPv4 ICMP errors at ingress, tail-called by `pfwd_ingress` (as the IPv6 half is): with a stack of its own.
    #[classifier]
    pub fn pfwd_ingress_icmp4(ctx: TcContext) -> i32 {
        icmp_error4(&ctx, ct_hook::INGRESS)
    }

    /// IPv4 ICMP errors at egress.
    #[classifier]
    pub fn pfwd_egress_icmp4(ctx: TcContext) -> i32 {
        icmp_error4(&ctx, ct_hook::EGRESS)
    }

    /// The path of a packet: it is parsed and its flow found (`verdict`), a packet that may open a flow gets one
    /// (`new_flow`), then the verdict is carried out (`finish`, the rewrite).
    ///
    /// IPv4 does it all here, in the attached program, with the packet on the stack, as pfwd did before IPv6 (its
    /// ICMP errors in a function beside it): IPv4 pays for IPv6 only the ethertype test. An IPv6 packet is handed to
    /// the program's IPv6 half by a tail call (`TAIL`), which starts afresh with a stack of its own: IPv6's
    /// 40-byte tuples do not fit beside IPv4's frame in the verifier's 512 bytes.
    #[inline(always)]
    fn dispatch(ctx: &TcContext, at: u8) -> i32 {
        match parse::ethertype(ctx) {
            ETH_P_IP => match run4(ctx, at) {
                ICMP_ERROR => {
                    tail_call(ctx, if at == ct_hook::INGRESS { tail::INGRESS_ICMP4 } else { tail::EGRESS_ICMP4 })
                }
                r => r,
            },
            ETH_P_IPV6 => tail_call(ctx, if at == ct_hook::INGRESS { tail::INGRESS6 } else { tail::EGRESS6 }),
            _ => NEXT,
        }
    }

    /// IPv6: its working memory ([`Work`]) is a per-CPU map value, and `run6`, `open6` and `finish6` are separate
    /// functions (BPF-to-BPF calls) that do not call each other, so each call chain stays within the verifier's
    /// 512 bytes of stack (the compiler spills each field of each copy of a 40-byte tuple to a slot of its own).
    #[inline(always)]
    fn path6(ctx: &TcContext, at: u8) -> i32 {
        let mut r = run6(ctx, at);
        if r == OPEN {
            r = open6(ctx, at);
        }
        if r == FINISH { finish6(ctx, at) } else { r }
    }

    /// Answers of the functions the programs call that are not a verdict yet: hand the packet to `open6`,
    /// `finish6`, or the IPv4 ICMP error program.
    const OPEN: i32 = -1000;
    const FINISH: i32 = -1001;
    const ICMP_ERROR: i32 = -1002;

    #[inline(always)]
    fn run4(ctx: &TcContext, at: u8) -> i32 {
        let Some(cfg) = CONFIG.get(0) else { return NEXT };
        // Every IPv4 packet empties this CPU's handoff slot, at either hook; egress may use what it held.
        let Some((h, held)) = handoff::take::<u32>() else { return NEXT };
        let Some(mut pkt) = parse::parse4(ctx) else { return NEXT };
        parse::store_as_words(&mut pkt.tuple);
        if pkt.frag == frag::LATER {
            return fragment::later(ctx, &pkt, at);
        }
        if pkt.icmp == icmp::ERROR {
            return ICMP_ERROR;
        }
        let mut xlat = pkt.tuple;
        // At egress, the packet ingress has just described (`handoff`), if it is this one.
        let handed = at == ct_hook::EGRESS && held != handoff::NONE && handoff::describes(h, &pkt);
        // SAFETY: this CPU's slot (see `handoff::take`).
        let hd = unsafe { &*h };
        // A packet ingress translated, of a flow settled at egress: it opens no flow here.
        let settled = handed && held == handoff::TRANSLATED && hd.settled;
        let mut v = if !handed {
            verdict(&pkt, &mut xlat, at, cfg)
        } else if held == handoff::KNOWN {
            // Its flow's translation here, as ingress found it (and recorded the packet in the flow).
            count(Stat::EgressHandoffs);
            xlat = hd.other.copied();
            Verdict::Translate { slot: hd.rule_slot, new_flow: false, lb: (hd.lb_flags, hd.lb_dir) }
        } else if settled && !hd.egress_too {
            // Nothing to do here: no lookup.
            count(Stat::EgressHandoffs);
            return NEXT;
        } else {
            // A full NAT's second flow, or the flow's first packet at egress: looked up as without a handoff.
            verdict(&pkt, &mut xlat, at, cfg)
        };
        if matches!(v, Verdict::Open) && !settled {
            v = new_flow(ctx, &pkt, &mut xlat, at, cfg);
        }
        if handed && held == handoff::TRANSLATED && !hd.settled && !matches!(v, Verdict::Drop) {
            // The flow's first packet through egress settles its NAT here (unless dropped, as netfilter forgets a
            // connection whose first packet it drops).
            conntrack::settle(&hd.other, &pkt.tuple);
        }
        finish(ctx, at, cfg, (&pkt, &xlat), v)
    }

    /// Hands the packet to the program in slot `index` of [`TAIL`], which starts afresh with a stack of its own;
    /// returns only when the slot is empty (a loader that did not fill it): then the packet passes untouched.
    #[inline(always)]
    fn tail_call(ctx: &TcContext, index: u32) -> i32 {
        // SAFETY: a tail call into one of this object's programs.
        unsafe { TAIL.tail_call(ctx, index) };
        NEXT
    }

    /// An IPv4 ICMP error (its program, tail-called: the IPv4 path's frame and an error's would not fit the
    /// verifier's 512 bytes together), parsing the packet again.
    #[inline(always)]
    fn icmp_error4(ctx: &TcContext, at: u8) -> i32 {
        let (Some(cfg), Some(e)) = (CONFIG.get(0), err_work4()) else { return NEXT };
        let Some(pkt) = parse::parse4(ctx) else { return NEXT };
        icmp_error(ctx, &pkt, e, at, cfg)
    }

    /// `run4` for IPv6, up to the verdict; the handoff works the same, through IPv6's own slot.
    #[inline(never)]
    fn run6(ctx: &TcContext, at: u8) -> i32 {
        let (Some(cfg), Some(w)) = (CONFIG.get(0), work6()) else { return NEXT };
        // Every IPv6 packet empties this CPU's IPv6 handoff slot, at either hook.
        let Some((h, held)) = handoff::take::<Addr6>() else { return NEXT };
        if parse::parse6(ctx, &mut w.pkt).is_none() {
            return NEXT;
        }
        if w.pkt.frag == frag::LATER {
            return fragment::later(ctx, &w.pkt, at);
        }
        if w.pkt.icmp == icmp::ERROR {
            return match err_work6() {
                Some(e) => icmp_error(ctx, &w.pkt, e, at, cfg),
                None => NEXT,
            };
        }
        let handed = at == ct_hook::EGRESS && held != handoff::NONE && handoff::describes(h, &w.pkt);
        // SAFETY: this CPU's slot (see `handoff::take`).
        let hd = unsafe { &*h };
        let settled = handed && held == handoff::TRANSLATED && hd.settled;
        w.settle = handed && held == handoff::TRANSLATED && !hd.settled;
        if !handed {
            w.verdict = verdict(&w.pkt, &mut w.xlat, at, cfg);
        } else if held == handoff::KNOWN {
            count(Stat::EgressHandoffs);
            w.xlat = hd.other.copied();
            w.verdict = Verdict::Translate { slot: hd.rule_slot, new_flow: false, lb: (hd.lb_flags, hd.lb_dir) };
            return FINISH;
        } else if settled && !hd.egress_too {
            count(Stat::EgressHandoffs);
            return NEXT;
        } else {
            w.verdict = verdict(&w.pkt, &mut w.xlat, at, cfg);
        }
        // A settled flow's packet opens no flow here: `Open` then passes it.
        if matches!(w.verdict, Verdict::Open) && !settled { OPEN } else { FINISH }
    }

    #[inline(never)]
    fn open6(ctx: &TcContext, at: u8) -> i32 {
        let (Some(cfg), Some(w)) = (CONFIG.get(0), work6()) else { return NEXT };
        w.verdict = new_flow(ctx, &w.pkt, &mut w.xlat, at, cfg);
        FINISH
    }

    #[inline(never)]
    fn finish6(ctx: &TcContext, at: u8) -> i32 {
        let (Some(cfg), Some(w)) = (CONFIG.get(0), work6()) else { return NEXT };
        if w.settle && !matches!(w.verdict, Verdict::Drop) {
            // As in `run4`: the flow's first packet through egress settles it. The slot still holds the flow's key
            // at ingress: only its kind was cleared, and nothing else ran on this CPU since.
            if let Some(h) = handoff::HANDOFF6.get_ptr(0) {
                // SAFETY: this CPU's slot (see `handoff::take`).
                conntrack::settle(unsafe { &(*h).other }, &w.pkt.tuple);
            }
        }
        finish(ctx, at, cfg, (&w.pkt, &w.xlat), w.verdict)
    }

    /// Carries out the verdict `v` on the packet `pkt` (translated to `xlat` when it says so).
    #[inline(always)]
    fn finish<A: Family>(
        ctx: &TcContext,
        at: u8,
        cfg: &Config,
        (pkt, xlat): (&Packet<A>, &FlowTuple<A>),
        v: Verdict,
    ) -> i32 {
        match v {
            Verdict::Open | Verdict::Pass => {
                fragment::note_first(pkt, at, frag_action::PASS, &pkt.tuple, 0);
                NEXT
            }
            Verdict::Known => {
                fragment::note_first(pkt, at, frag_action::PASS, &pkt.tuple, 0);
                if at == ct_hook::INGRESS { A::forward(ctx, &pkt.tuple, cfg).unwrap_or(NEXT) } else { NEXT }
            }
            Verdict::Drop => {
                fragment::note_first(pkt, at, frag_action::DROP, &pkt.tuple, 0);
                DROP
            }
            Verdict::Translate { slot, new_flow, lb } => {
                fragment::note_first(pkt, at, frag_action::XLATE, xlat, slot);
                if new_flow && logging(cfg) {
                    let t = &pkt.tuple;
                    info!(
                        ctx,
                        "new flow {:i}:{} -> {:i}:{} proto {} => {:i}:{} -> {:i}:{}",
                        A::shown(&t.saddr),
                        t.sport,
                        A::shown(&t.daddr),
                        t.dport,
                        t.proto,
                        A::shown(&xlat.saddr),
                        xlat.sport,
                        A::shown(&xlat.daddr),
                        xlat.dport
                    );
                }
                let ret = apply(ctx, pkt, xlat, slot, new_flow, cfg);
                if ret == NEXT && lb.0 & ct_flag::BACKENDS != 0 {
                    // The backend: where the original direction goes, where replies come from.
                    let (addr, port) = if lb.1 == dir::ORIGINAL {
                        (&xlat.daddr, xlat.dport)
                    } else {
                        (&pkt.tuple.saddr, pkt.tuple.sport)
                    };
                    count_backend(slot, &addr.wide(), port, pkt.ip_len, new_flow);
                }
                if ret == NEXT && at == ct_hook::INGRESS {
                    return A::forward(ctx, xlat, cfg).unwrap_or(NEXT);
                }
                ret
            }
        }
    }

    #[inline(always)]
    /// The verdict for `pkt` from its flow (its translation into `xlat`), or `Open` when it has none and may open
    /// one.
    fn verdict<A: Family>(pkt: &Packet<A>, xlat: &mut FlowTuple<A>, at: u8, cfg: &Config) -> Verdict {
        let now = conntrack::clock_ns(cfg);
        if let Some(e) = conntrack::lookup(&pkt.tuple, now, cfg) {
            // SAFETY: map value pointer from lookup.
            let entry = unsafe { &*e };
            if entry.hook != at {
                // A known flow, translated at the other hook. Forwarded, it meets egress next: ingress records the
                // packet in its flow now and hands egress the translation (unless the flow is closed: egress then
                // decides whether the packet starts over).
                if at == ct_hook::INGRESS
                    && pkt.frag == frag::WHOLE
                    && A::handoff().is_some()
                    && !(pkt.tuple.proto == PROTO_TCP && entry.is_closed())
                {
                    let (slot, lb) = (entry.rule_slot, (entry.flags, entry.dir));
                    handoff::known(pkt, &entry.xlat, slot, lb);
                    conntrack::track(&pkt.tuple, e, pkt, now);
                }
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
                // Copied before `track`, which may move the entry to the other table; field by field: a whole-struct
                // copy between two references compiles to a call of the memmove subprogram (measured: 10-12% of
                // an established packet's cost).
                *xlat = entry.xlat.copied();
                let (slot, lb) = (entry.rule_slot, (entry.flags, entry.dir));
                if at == ct_hook::INGRESS {
                    handoff::translated(pkt, xlat, entry.flags);
                }
                conntrack::track(&pkt.tuple, e, pkt, now);
                return Verdict::Translate { slot, new_flow: false, lb };
            }
            // A new connection reusing the ports of a closed one starts over with the current rules.
            conntrack::remove_flow(&pkt.tuple, entry);
        }
        let set = cfg.active();
        let classes = if at == ct_hook::INGRESS { set.counts.pre } else { set.counts.post };
        if classes == 0 || !pkt.can_open() {
            return Verdict::Pass;
        }
        Verdict::Open
    }

    /// The first packet of a flow: finds its rule and creates the flow into `xlat` (Translate), or finds no rule
    /// or cannot track the flow (Pass: it passes untranslated), or the rule refuses it (Drop).
    #[inline(always)]
    fn new_flow<A: Family>(ctx: &TcContext, pkt: &Packet<A>, xlat: &mut FlowTuple<A>, at: u8, cfg: &Config) -> Verdict {
        let now = conntrack::clock_ns(cfg);
        let set = cfg.active();
        let hook = if at == ct_hook::INGRESS { hook::PREROUTING } else { hook::POSTROUTING };
        let ifindex = parse::ifindex(ctx);
        // Only interfaces pfwd is attached to (and knows the address of).
        // SAFETY: plain read of a map value, which stays valid for the program's run.
        let Some(iface) = (unsafe { IFACES.get(&ifindex) }) else { return Verdict::Pass };
        let Some((slot, rule)) = rules::find(&pkt.tuple, ifindex, hook, &set, false) else { return Verdict::Pass };
        if at == ct_hook::EGRESS && conntrack::settled_at_egress(&pkt.tuple) {
            // A packet of a flow whose NAT here was settled by an earlier one (the rule came later).
            return Verdict::Pass;
        }
        let created = if at == ct_hook::INGRESS {
            dnat::create(pkt, slot, rule, iface, xlat)
        } else {
            snat::allocate(ctx, pkt, slot, rule, ifindex, iface, now, cfg, xlat)
        };
        match created {
            Ok(()) => {
                count(Stat::NewFlows);
                if at == ct_hook::INGRESS {
                    // Not settled: its first packet at egress is looked up there, and settles it.
                    handoff::translated(pkt, xlat, 0);
                }
                let lb = if at == ct_hook::INGRESS && rule.flags & rule_flag::BACKENDS != 0 {
                    (ct_flag::BACKENDS, dir::ORIGINAL)
                } else {
                    (0, dir::ORIGINAL)
                };
                Verdict::Translate { slot, new_flow: true, lb }
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
    /// sent, and the outer header with it. The flow is found by the embedded packet's reply tuple. An error whose
    /// embedded packet cannot be read passes untranslated.
    #[inline(always)]
    fn icmp_error<A: Family>(ctx: &TcContext, pkt: &Packet<A>, e: &mut ErrWork<A>, at: u8, cfg: &Config) -> i32 {
        if A::embedded(ctx, pkt.l4_off + ICMP_HLEN, ip_off() + pkt.ip_len as usize, &mut e.emb).is_none() {
            fragment::note_first(pkt, at, frag_action::PASS, &pkt.tuple, 0);
            return NEXT;
        }
        let now = conntrack::clock_ns(cfg);
        // The embedded packet's reply tuple, in `outer` until the outer addresses are worked out.
        e.outer = e.emb.tuple.reversed();
        let entry = match conntrack::lookup(&e.outer, now, cfg) {
            // SAFETY: map value pointer from lookup.
            Some(e) if unsafe { (*e).hook } == at => unsafe { &*e },
            _ => {
                fragment::note_first(pkt, at, frag_action::PASS, &pkt.tuple, 0);
                return NEXT;
            }
        };
        e.inner = entry.xlat.reversed();
        let slot = entry.rule_slot;
        if nat::rewrite_icmp_error(ctx, pkt, &e.emb, &e.inner, &mut e.outer).is_none() {
            count(Stat::Malformed);
            fragment::note_first(pkt, at, frag_action::DROP, &pkt.tuple, 0);
            return DROP;
        }
        // An error long enough to be fragmented itself: its later fragments get the outer addresses.
        fragment::note_first(pkt, at, frag_action::XLATE, &e.outer, slot);
        count(Stat::IcmpErrorsXlated);
        count_rule(slot, pkt.ip_len, false);
        NEXT
    }

    #[inline(always)]
    fn apply<A: Family>(
        ctx: &TcContext,
        pkt: &Packet<A>,
        xlat: &FlowTuple<A>,
        slot: u32,
        new_flow: bool,
        cfg: &Config,
    ) -> i32 {
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
                A::shown(&pkt.tuple.saddr),
                pkt.tuple.sport,
                A::shown(&pkt.tuple.daddr),
                pkt.tuple.dport,
                A::shown(&xlat.saddr),
                xlat.sport,
                A::shown(&xlat.daddr),
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
