//! Test support for pfwd: a network-namespace lab (client / router / server on veth pairs) used by the
//! end-to-end tests, `cargo xtask demo` and the bench.

pub mod lab;

pub use lab::{Lab, Node, Reply, ServerHandle, TIMEOUT, pfwd_bin};
