//! Types and logic shared by the kernel programs (`pfwd-ebpf`) and the userspace controller (`pfwd`).
//!
//! Everything here is `no_std`. `maps`: the map and program names and the map keys and values, `#[repr(C)]`
//! `bytemuck::Pod` structs that are the byte layout of the BPF maps, so both sides must agree on them exactly
//! (addresses in network byte order, as they sit in the packet; ports in host order), plus the global counters
//! ([`Stat`]) and the conntrack entry's state logic. `lookup`: the tuple space search that picks a new flow's rule.
//! `checksum`: RFC 1071/1624 arithmetic. `kern_ctx`: how the programs read `skb->ip_summed`. `tcx`: the programs' return codes. The `user` feature adds `aya::Pod` impls
//! so userspace can put these types in aya maps.
#![no_std]

pub mod checksum;
pub mod kern_ctx;
pub mod lookup;
pub mod maps;
pub mod tcx;

pub use lookup::{ProbeKey, Walk, find_rule, find_rule_keyed};
pub use maps::*;
