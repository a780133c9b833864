//! `--local` rules: translation of connections made by local processes (the iptables OUTPUT chain), done once per
//! connect (TCP, connected UDP) or per message (unconnected UDP) by cgroup sock_addr hooks, so no packet needs
//! rewriting. `recvmsg4` and `getpeername4` show the application the address it asked for.
//!
//! The hooks are attached to the root cgroup and see every network namespace's sockets: each instance acts only in
//! its own namespace (netns cookie in the config).
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use pfwd_common::{SockKey, SockOrig, Tuple, hook, kind};

use crate::{
    maps::{CONFIG, SOCKETS, count_rule},
    rules,
};

/// Let the operation proceed (sock_addr programs return 1 to allow, 0 to refuse).
const ALLOW: i32 = 1;
const LOOPBACK: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[cgroup_sock_addr(connect4)]
pub fn pfwd_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn pfwd_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn pfwd_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn pfwd_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    ALLOW
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, sendmsg: bool) {
    let Some(cfg) = CONFIG.get(0) else { return };
    let set = cfg.active();
    // SAFETY: helper on a valid context.
    if set.counts.local == 0 || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != cfg.netns_cookie {
        return;
    }
    // SAFETY: the context's bpf_sock_addr is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let t = Tuple {
        // The source of a connect is not chosen yet; a sendmsg may name one.
        saddr: if sendmsg { sa.msg_src_ip4 } else { 0 },
        daddr: sa.user_ip4,
        sport: 0,
        dport: u16::from_be(sa.user_port as u16),
        proto: sa.protocol as u8,
        _pad: 0,
        _pad2: 0,
    };
    let Some((slot, rule)) = rules::find(&t, 0, hook::OUTPUT, &set) else { return };
    let to_addr = if rule.kind == kind::REDIRECT { LOOPBACK } else { rule.to_addr[0] };
    let to_port = if rule.to_port != 0 { rule.to_port } else { t.dport };
    sa.user_ip4 = to_addr;
    sa.user_port = to_port.to_be() as u32;
    // SAFETY: helper on a valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockKey { cookie, addr: to_addr, port: to_port, _pad: 0 };
    let _ = SOCKETS.insert(&key, &SockOrig { addr: t.daddr, port: t.dport, _pad: 0 }, BPF_ANY as u64);
    count_rule(slot, 0, true);
}

#[inline(always)]
fn restore(ctx: &SockAddrContext) {
    // SAFETY: the context's bpf_sock_addr is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper on a valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockKey { cookie, addr: sa.user_ip4, port: u16::from_be(sa.user_port as u16), _pad: 0 };
    // SAFETY: plain read of a map value.
    if let Some(orig) = unsafe { SOCKETS.get(&key) } {
        sa.user_ip4 = orig.addr;
        sa.user_port = orig.port.to_be() as u32;
    }
}
