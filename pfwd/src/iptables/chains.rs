//! pfwd's own chains and the jumps into them; which netfilter hook, and so which chain, each rule belongs to.
//!
//! pfwd keeps its rules in chains of its own ([`CHAINS`]) that built-in chains jump to ([`hook_rules`]), so applying
//! or removing them never touches anyone else's rules. Each exported rule is tagged with [`COMMENT_PREFIX`] and its id.

use crate::rules::{Rule, precedence_order};

/// pfwd's nat chain for DNAT/REDIRECT, jumped to from `PREROUTING`.
pub const PREROUTING_CHAIN: &str = "PFWD-PREROUTING";
/// pfwd's nat chain for SNAT/MASQUERADE, jumped to from `POSTROUTING`.
pub const POSTROUTING_CHAIN: &str = "PFWD-POSTROUTING";
/// pfwd's nat chain for `--local` DNAT/REDIRECT (connections made by local processes), jumped to from `OUTPUT`.
pub const OUTPUT_CHAIN: &str = "PFWD-OUTPUT";
/// pfwd's filter chain, jumped to from `FORWARD`.
pub const FORWARD_CHAIN: &str = "PFWD-FORWARD";
/// Comment prefix tagging each exported rule with its id: `pfwd:7`.
pub const COMMENT_PREFIX: &str = "pfwd:";
/// Comment suffix of the masquerade a `--hairpin` rule adds: `pfwd:7-hairpin` (not an id, so its counters are not
/// taken for the rule's).
pub const HAIRPIN_SUFFIX: &str = "-hairpin";

/// One of pfwd's own chains and the built-in chain that jumps to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfwdChain {
    pub table: &'static str,
    pub name: &'static str,
    pub builtin: &'static str,
    /// Interface options of the jump when pfwd is restricted to some interfaces: one jump per interface and option.
    /// Empty: the chain is not tied to an interface, and one jump without options serves every interface.
    pub iface_options: &'static [&'static str],
}

/// pfwd's chains in script order. A new chain is one entry here plus its body in `restore::chain_specs`; the
/// scripts, hooks and the importer's bookkeeping check pick it up.
pub const CHAINS: &[PfwdChain] = &[
    PfwdChain { table: "nat", name: PREROUTING_CHAIN, builtin: "PREROUTING", iface_options: &["-i"] },
    // iptables refuses -i in POSTROUTING: SNAT is tied to the interface packets leave through.
    PfwdChain { table: "nat", name: POSTROUTING_CHAIN, builtin: "POSTROUTING", iface_options: &["-o"] },
    // Local connections do not arrive on an interface, and iptables refuses -i in OUTPUT: one jump for all.
    PfwdChain { table: "nat", name: OUTPUT_CHAIN, builtin: "OUTPUT", iface_options: &[] },
    PfwdChain { table: "filter", name: FORWARD_CHAIN, builtin: "FORWARD", iface_options: &["-i", "-o"] },
];

/// A jump from a built-in chain into one of pfwd's chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub table: &'static str,
    /// The built-in chain holding the jump.
    pub chain: &'static str,
    /// Rule spec after the chain name, e.g. `-i eth0 -j PFWD-PREROUTING`.
    pub args: Vec<String>,
}

impl Hook {
    /// Arguments for `iptables` (program name not included): `-t TABLE -A CHAIN ARGS...`.
    pub fn append_args(&self) -> Vec<String> {
        self.argv("-A")
    }

    /// `-t TABLE -C CHAIN ARGS...`: exit status 0 when the jump exists.
    pub fn check_args(&self) -> Vec<String> {
        self.argv("-C")
    }

    /// `-t TABLE -D CHAIN ARGS...`.
    pub fn delete_args(&self) -> Vec<String> {
        self.argv("-D")
    }

    /// Whether the jump carries no `-i`/`-o` (nat `OUTPUT`, or every jump of `hook_rules(None)`): it is shared by
    /// all attached interfaces, so detaching one interface must leave it in place.
    pub fn is_shared(&self) -> bool {
        !self.args.iter().any(|a| a == "-i" || a == "-o")
    }

    /// The jump as an `iptables-restore` line inside `*TABLE`.
    pub fn restore_line(&self) -> String {
        let args: Vec<String> = self.args.iter().map(|a| super::restore::restore_word(a)).collect();
        format!("-A {} {}", self.chain, args.join(" "))
    }

    fn argv(&self, command: &str) -> Vec<String> {
        let mut argv = vec!["-t".to_string(), self.table.to_string(), command.to_string(), self.chain.to_string()];
        argv.extend(self.args.iter().cloned());
        argv
    }
}

/// The jumps into pfwd's chains: without `-i`/`-o` when `ifaces` is `None`, else one per interface and option
/// (nat `PREROUTING -i IF` and `POSTROUTING -o IF`; filter `FORWARD -i IF` and `-o IF`) plus the one jump of a chain
/// without interface options (nat `OUTPUT -j PFWD-OUTPUT`), whatever the list holds. An empty list means no jumps at
/// all.
pub fn hook_rules(ifaces: Option<&[String]>) -> Vec<Hook> {
    let mut hooks = Vec::new();
    for c in CHAINS {
        let hook = |mut args: Vec<String>| {
            args.extend(["-j".to_string(), c.name.to_string()]);
            Hook { table: c.table, chain: c.builtin, args }
        };
        match ifaces {
            None => hooks.push(hook(Vec::new())),
            Some(list) if c.iface_options.is_empty() => {
                if !list.is_empty() {
                    hooks.push(hook(Vec::new()));
                }
            }
            Some(list) => {
                for iface in list {
                    for opt in c.iface_options {
                        hooks.push(hook(vec![opt.to_string(), iface.clone()]));
                    }
                }
            }
        }
    }
    hooks
}

/// The netfilter hook a rule is matched at. The discriminants follow [`NAT_HOOKS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatHook {
    /// DNAT/REDIRECT of arriving packets.
    Prerouting = 0,
    /// SNAT/MASQUERADE of leaving packets.
    Postrouting = 1,
    /// `--local` DNAT/REDIRECT of connections made by local processes.
    Output = 2,
}

/// In the import's order (and the order of the nat chains in the scripts).
pub const NAT_HOOKS: [NatHook; 3] = [NatHook::Prerouting, NatHook::Postrouting, NatHook::Output];

impl NatHook {
    /// The hook's built-in nat chain.
    pub(super) fn builtin(self) -> &'static str {
        match self {
            NatHook::Prerouting => "PREROUTING",
            NatHook::Postrouting => "POSTROUTING",
            NatHook::Output => "OUTPUT",
        }
    }

    /// pfwd's chain for the hook, which [`NatHook::builtin`] jumps to.
    pub(super) fn pfwd_chain(self) -> &'static str {
        match self {
            NatHook::Prerouting => PREROUTING_CHAIN,
            NatHook::Postrouting => POSTROUTING_CHAIN,
            NatHook::Output => OUTPUT_CHAIN,
        }
    }

    /// The hook whose rules live in pfwd's chain `name`; `None` for the filter chain.
    pub(super) fn of_pfwd_chain(name: &str) -> Option<NatHook> {
        NAT_HOOKS.into_iter().find(|h| h.pfwd_chain() == name)
    }

    /// The hook of a pfwd rule.
    pub(super) fn of(r: &Rule) -> NatHook {
        if r.is_postrouting() {
            NatHook::Postrouting
        } else if r.local {
            NatHook::Output
        } else {
            NatHook::Prerouting
        }
    }
}

/// Indices of the rules of one hook, most specific first: the order of the hook's chain.
pub fn hook_order(rules: &[Rule], hook: NatHook) -> Vec<usize> {
    precedence_order(rules).into_iter().filter(|&i| NatHook::of(&rules[i]) == hook).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let all = hook_rules(None);
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].append_args(), s(&["-t", "nat", "-A", "PREROUTING", "-j", "PFWD-PREROUTING"]));
        assert_eq!(all[1].append_args(), s(&["-t", "nat", "-A", "POSTROUTING", "-j", "PFWD-POSTROUTING"]));
        assert_eq!(all[2].append_args(), s(&["-t", "nat", "-A", "OUTPUT", "-j", "PFWD-OUTPUT"]));
        assert_eq!(all[3].check_args(), s(&["-t", "filter", "-C", "FORWARD", "-j", "PFWD-FORWARD"]));
        assert!(all.iter().all(Hook::is_shared));
        let ifaces = s(&["eth0", "wg0"]);
        let some = hook_rules(Some(&ifaces));
        let lines: Vec<String> = some.iter().map(|h| format!("{} {}", h.table, h.restore_line())).collect();
        assert_eq!(
            lines,
            [
                "nat -A PREROUTING -i eth0 -j PFWD-PREROUTING",
                "nat -A PREROUTING -i wg0 -j PFWD-PREROUTING",
                "nat -A POSTROUTING -o eth0 -j PFWD-POSTROUTING",
                "nat -A POSTROUTING -o wg0 -j PFWD-POSTROUTING",
                "nat -A OUTPUT -j PFWD-OUTPUT",
                "filter -A FORWARD -i eth0 -j PFWD-FORWARD",
                "filter -A FORWARD -o eth0 -j PFWD-FORWARD",
                "filter -A FORWARD -i wg0 -j PFWD-FORWARD",
                "filter -A FORWARD -o wg0 -j PFWD-FORWARD",
            ]
        );
        assert_eq!(some[6].delete_args(), s(&["-t", "filter", "-D", "FORWARD", "-o", "eth0", "-j", "PFWD-FORWARD"]));
        assert_eq!(
            some[2].delete_args(),
            s(&["-t", "nat", "-D", "POSTROUTING", "-o", "eth0", "-j", "PFWD-POSTROUTING"])
        );
        assert!(hook_rules(Some(&[])).is_empty());
        // The OUTPUT jump is one for any non-empty list, and the only jump shared by the interfaces.
        for n in 1..=3 {
            let list: Vec<String> = (0..n).map(|i| format!("eth{i}")).collect();
            let hooks = hook_rules(Some(&list));
            let output: Vec<&Hook> = hooks.iter().filter(|h| h.chain == "OUTPUT").collect();
            assert_eq!(output.len(), 1, "{hooks:?}");
            assert_eq!(output[0].delete_args(), s(&["-t", "nat", "-D", "OUTPUT", "-j", "PFWD-OUTPUT"]));
            assert_eq!(hooks.iter().filter(|h| h.is_shared()).collect::<Vec<_>>(), output);
            assert_eq!(hooks.len(), 1 + 4 * n);
        }
    }
}
