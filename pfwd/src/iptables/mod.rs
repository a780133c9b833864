//! iptables and nftables interop: export pfwd's rules as `iptables-restore` / `nft -f` input (the iptables fallback
//! data path, inspection, migration away from pfwd) and import what iptables users already have (`iptables-save`
//! dumps and `iptables -t nat -A PREROUTING|POSTROUTING|OUTPUT ...` command lines).
//!
//! Everything here is text in, text out; running the tools is the caller's job. One job per file:
//!
//! - `chains`: pfwd's own chains ([`CHAINS`]), the jumps into them ([`hook_rules`]), and which hook a rule is for;
//! - `restore`: the `iptables-restore` export ([`nat_chain_script`], [`export_iptables`]);
//! - `nft`: the nftables export ([`export_nft`]);
//! - `import/`: the import ([`import()`], [`import_onto`]): lexer, command parser, spec parser and the importer's bookkeeping.

mod chains;
mod import;
mod nft;
mod restore;
#[cfg(test)]
pub(crate) mod tests;

pub use chains::{
    CHAINS, COMMENT_PREFIX, FORWARD_CHAIN, Hook, NAT_HOOKS, NatHook, OUTPUT_CHAIN, POSTROUTING_CHAIN, PREROUTING_CHAIN,
    PfwdChain, hook_order, hook_rules,
};
pub use import::{Import, ImportError, import, import_onto};
pub use nft::{check_nft_names, export_nft, nft_action, nft_comment, nft_dnat, nft_matches};
pub use restore::{export_iptables, nat_chain_script, nat_change_script};
