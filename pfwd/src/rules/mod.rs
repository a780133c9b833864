//! Forwarding rules, one job per module: [`model`] (what a rule is and its checks), [`error`], [`value`] (value
//! parsers), [`draft`] (the one grammar every syntax goes through), [`toml`] (the config file syntax),
//! [`precedence`] (which rule wins) and [`compile`] (the kernel's map layout).
//!
//! A rule is what a user would write as `iptables -t nat -A PREROUTING ... -j DNAT/REDIRECT` (a PREROUTING rule,
//! matched where packets arrive) or `iptables -t nat -A POSTROUTING ... -j SNAT/MASQUERADE` (a POSTROUTING rule,
//! matched where packets leave), restricted to what the kernel program can match: optional interface (incoming `-i`
//! for PREROUTING, outgoing `-o` for POSTROUTING), protocol (tcp/udp), source and destination prefixes and, for
//! PREROUTING, a destination port range. The CLI (`pfwd add`), the config file ([`parse_config`]) and the iptables
//! import all write a [`RuleDraft`] and turn it into a [`Rule`] with [`RuleDraft::into_rule`], so they agree on
//! validation; the JSON state file (serde) is checked with [`Rule::validate`].
//!
//! # Precedence
//!
//! This is the contract shared by the kernel data path ([`compile`]) and the iptables export ([`precedence_order`]):
//! when several rules match a packet, **the most specific rule wins**. Two rules are compared field by field and the
//! first difference decides:
//!
//! 1. a rule with `--dport` beats one without; between two, the narrower range (fewer ports) wins;
//! 2. a rule with `-p` beats one without;
//! 3. a rule with `-i` (PREROUTING) or `-o` (POSTROUTING) beats one without;
//! 4. the longer source prefix wins (no `-s` counts as `/0`);
//! 5. the longer destination prefix wins (no `-d` counts as `/0`);
//! 6. the older rule (lower id) wins; rules with equal ids (e.g. 0, not yet assigned) keep their list order.
//!
//! The rank of a rule is its position in that order. The kernel picks the matching rule with the lowest rank; the
//! iptables export emits rules in the same order, so iptables' first match is the same rule. PREROUTING and
//! POSTROUTING rules share one order but never compete: each hook only looks at its own rules.
//!
//! Two rules with the same match and the same target are duplicates and are rejected. Two rules with the same match
//! but different targets are allowed: rule 6 above makes the older one win and the newer one is shadowed (never used
//! until the older one is removed), just like appending a second identical match in iptables.

pub mod compile;
pub mod delta;
pub mod draft;
pub mod error;
pub mod maglev;
pub mod model;
pub mod plan;
pub mod precedence;
pub mod toml;
pub mod value;

pub use compile::{Compiled, compile, with_companions};
pub use draft::{DraftError, FIELDS, Field, FieldSpec, Kind, RuleDraft, Syntax};
pub use error::RuleError;
pub use model::{Backend, DedupKey, Negated, PortRange, Proto, Rule, Target, check_duplicate, next_id, remove_by_id};
pub use precedence::{precedence_cmp, precedence_order};
pub use toml::{parse_config, to_config};
pub use value::{parse_cidr, parse_dnat_to, parse_port, parse_snat_to, parse_to, validate_iface};

#[cfg(test)]
pub(crate) mod tests;
