//! `--local` rules: translation of connections made by local processes (the iptables OUTPUT chain), done once per
//! connect (TCP, connected UDP) or per message (unconnected UDP) by cgroup sock_addr hooks, so no packet needs
//! rewriting. `recvmsg4` and `getpeername4` show the application the address it asked for. The `*6` hooks do the
//! same for IPv6 sockets; an IPv6 socket connecting to an IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack
//! socket) makes an IPv4 connection, so the IPv4 rules apply to it, as they would in iptables' OUTPUT chain.
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
use pfwd_common::{Addr6, SockKey, SockKey6, SockOrig, SockOrig6, Tuple, Tuple6, hook, kind};

use crate::{
    maps::{CONFIG, SOCKETS, SOCKETS6, count_rule},
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

#[cgroup_sock_addr(connect6)]
pub fn pfwd_connect6(ctx: SockAddrContext) -> i32 {
    translate6(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn pfwd_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate6(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn pfwd_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn pfwd_getpeername6(ctx: SockAddrContext) -> i32 {
    restore6(&ctx);
    ALLOW
}

/// Whether `--local` rules apply to this operation: the instance has some, and the socket is in its namespace.
#[inline(always)]
fn in_scope(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = CONFIG.get(0) else { return false };
    // SAFETY: helper on a valid context.
    cfg.active().counts.local != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.netns_cookie
}

/// ::1, as the maps hold it.
const LOOPBACK6: Addr6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// The third word of an IPv4-mapped IPv6 address (::ffff:0:0/96).
const MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Reads the IPv6 address at `p` (a `bpf_sock_addr` field) a 32-bit word at a time, as the kernel requires.
#[inline(always)]
fn read6(p: *const u32) -> Addr6 {
    // SAFETY: `p` points at one of the context's four-word address fields.
    unsafe { [p.read_volatile(), p.add(1).read_volatile(), p.add(2).read_volatile(), p.add(3).read_volatile()] }
}

/// Writes `a` into the IPv6 address at `p` a 32-bit word at a time.
#[inline(always)]
fn write6(p: *mut u32, a: &Addr6) {
    for (i, w) in a.iter().enumerate() {
        // SAFETY: as in read6.
        unsafe { p.add(i).write_volatile(*w) };
    }
}

#[inline(always)]
fn translate6(ctx: &SockAddrContext, sendmsg: bool) {
    if !in_scope(ctx) {
        return;
    }
    let Some(cfg) = CONFIG.get(0) else { return };
    let set = cfg.active();
    // SAFETY: the context's bpf_sock_addr is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let daddr = read6(sa.user_ip6.as_ptr());
    let saddr = if sendmsg { read6(sa.msg_src_ip6.as_ptr()) } else { [0; 4] };
    let dport = u16::from_be(sa.user_port as u16);
    let proto = sa.protocol as u8;
    let (slot, rule, mapped) = if daddr[0] | daddr[1] == 0 && daddr[2] == MAPPED {
        // A dual-stack socket's IPv4 connection: the IPv4 rules.
        let src = if saddr[0] | saddr[1] == 0 && saddr[2] == MAPPED { saddr[3] } else { 0 };
        let t = Tuple::new(src, daddr[3], 0, dport, proto);
        let Some((slot, rule)) = rules::find(&t, 0, hook::OUTPUT, &set, true) else { return };
        (slot, rule, true)
    } else {
        let t = Tuple6::new(saddr, daddr, 0, dport, proto);
        let Some((slot, rule)) = rules::find(&t, 0, hook::OUTPUT, &set, true) else { return };
        (slot, rule, false)
    };
    let to_addr = match (rule.kind == kind::REDIRECT, mapped) {
        (true, false) => LOOPBACK6,
        (true, true) => [0, 0, MAPPED, LOOPBACK],
        (false, false) => rule.to_addr,
        (false, true) => [0, 0, MAPPED, rule.to_addr[0]],
    };
    let to_port = if rule.to_port != 0 { rule.to_port } else { dport };
    write6(sa.user_ip6.as_mut_ptr(), &to_addr);
    sa.user_port = to_port.to_be() as u32;
    // SAFETY: helper on a valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockKey6 { cookie, addr: to_addr, port: to_port, _pad: 0, _pad2: 0 };
    let _ = SOCKETS6.insert(&key, &SockOrig6 { addr: daddr, port: dport, _pad: 0 }, BPF_ANY as u64);
    count_rule(slot, 0, true);
}

#[inline(always)]
fn restore6(ctx: &SockAddrContext) {
    // SAFETY: the context's bpf_sock_addr is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper on a valid context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let addr = read6(sa.user_ip6.as_ptr());
    let key = SockKey6 { cookie, addr, port: u16::from_be(sa.user_port as u16), _pad: 0, _pad2: 0 };
    // SAFETY: plain read of a map value.
    if let Some(orig) = unsafe { SOCKETS6.get(&key) } {
        write6(sa.user_ip6.as_mut_ptr(), &orig.addr);
        sa.user_port = orig.port.to_be() as u32;
    }
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, sendmsg: bool) {
    if !in_scope(ctx) {
        return;
    }
    let Some(cfg) = CONFIG.get(0) else { return };
    let set = cfg.active();
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
    let Some((slot, rule)) = rules::find(&t, 0, hook::OUTPUT, &set, true) else { return };
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
