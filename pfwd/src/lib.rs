//! pfwd: port forwarding and NAT for Linux in eBPF, driven like `iptables -t nat`.
//!
//! One module per job: [`rules`] (the rule model, syntaxes, precedence, compilation to map data), [`loader`] (the
//! eBPF programs and their maps), [`fallback`] and [`iptables`] (the iptables data path, export and import),
//! [`flows`] (which live translations a `conntrack --flush` or `del --flows` ends, in both modes),
//! [`instance`], [`state`] and [`store`] (where an instance lives, what it remembers and where that is kept),
//! [`sysctl`] and [`netif`] (the system settings and interface facts it depends on), [`control`] (the operations
//! behind each command), [`report`] (what `status`, `list` and `conntrack` report), [`serve`] (the long-running agent: file watch, netlink,
//! metrics) and [`cli`] (argument parsing and output).
pub mod batch;
pub mod cli;
pub mod clock;
pub mod control;
pub mod fallback;
pub mod fasthash;
pub mod flows;
pub mod instance;
pub mod iptables;
pub mod kern_ctx;
pub mod kernel_btf;
pub mod loader;
pub mod netif;
pub mod nftables;
pub mod record;
pub mod report;
pub mod rules;
pub mod serve;
pub mod state;
pub mod store;
pub mod sysctl;
pub mod testrun;
