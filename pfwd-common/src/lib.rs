//! Types and logic shared by the kernel programs (`pfwd-ebpf`) and the userspace controller (`pfwd`).
//!
//! Everything here is `no_std` and `#[repr(C)]`: these structs are the byte layout of the BPF maps, so both sides must
//! agree on them exactly. Addresses are stored in network byte order (as they sit in the packet), ports in host order.
//! The `user` feature adds `aya::Pod` impls so userspace can put these types in aya maps.
#![no_std]

pub mod checksum;
pub mod maps;

pub use maps::*;
