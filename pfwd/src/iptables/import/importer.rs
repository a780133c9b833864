//! The importer: reads a text line by line (lexer, command parser, spec parser), keeps each nat hook's rules in
//! iptables' order (the running instance's rules first, when importing onto them), applies the script's deletions
//! and flushes in order, skips pfwd's own bookkeeping lines and other tables, and at the end drops duplicates and
//! warns where pfwd's precedence picks another rule than iptables' first match.

use ipnet::Ipv4Net;

use super::command::{Command, Head, NAT_TABLE, check_table, jump_of, parse_head};
use super::lex::{check_dashes, is_counters, is_save_line, logical_lines, split_inline, tokenize, tokenize_restore};
use super::spec::{Jump, Share, build_rules, parse_spec, statistic_share};
use super::{Bad, Import, ImportError, Res, bad};
use crate::iptables::chains::{CHAINS, NAT_HOOKS, NatHook, hook_order};
use crate::rules::{Backend, Rule, Target, precedence_order};

/// Reads `iptables-save` output (with or without `-c` counters; any tables) and/or lines of
/// `[sudo] iptables [-w] -t nat -A|-I PREROUTING|POSTROUTING|OUTPUT ...` commands (`\` continuations, blank lines and
/// `#` comments are fine). nat `PREROUTING` and `PFWD-PREROUTING` rules with `-j DNAT` or `-j REDIRECT`, nat
/// `POSTROUTING` and `PFWD-POSTROUTING` rules with `-j SNAT` or `-j MASQUERADE`, and nat `OUTPUT` and `PFWD-OUTPUT`
/// rules with `-j DNAT` or `-j REDIRECT` (which become `--local` rules) are imported; pfwd's own chain declarations
/// and jumps are skipped; rules of other tables are skipped with a warning; everything else (negation, unsupported
/// matches or targets, `-o`/`-s` in OUTPUT, nat INPUT, and whatever iptables itself would reject) is an error naming
/// the line.
///
/// Rules are returned in iptables' first-match order, PREROUTING rules first, then POSTROUTING ones, then OUTPUT ones
/// (`-I` inserts, pfwd's chains sit where the built-in chain jumps to them). A later exact duplicate of a rule (same
/// match and target) is dropped with a warning: iptables would keep it, but it can never match since the first copy
/// catches every packet it would.
///
/// iptables takes the first matching rule, pfwd the most specific one ([`precedence_order`]). When a rule that
/// iptables checks later would win in pfwd over an earlier one that can match the same packets and does something
/// else, a warning says so.
///
/// The nat deletions (`-D CHAIN N`, `-D CHAIN <rule>`, `-F [CHAIN]`, `-X`) work as on an empty nat table: the same
/// as [`import_onto`] with no existing rules.
pub fn import(text: &str) -> Result<Import, ImportError> {
    import_onto(text, &[])
}

/// [`import`] onto a running instance's rules (`existing`, with their ids): the script's nat deletions and flushes
/// apply, in order, to each hook's rules as iptables users see them, and [`Import::removed`] lists the ids of the
/// existing rules they remove; [`Import::rules`] are the rules to add (added and not deleted again later in the
/// text); [`Import::actions`] says, line by line, what each deletion, flush or no-op line did.
///
/// Each nat hook is one list: `PREROUTING` and pfwd's `PFWD-PREROUTING` (likewise `POSTROUTING`, `OUTPUT`) hold the
/// hook's existing rules first, in [`precedence_order`] (the order of `pfwd export` and of the iptables fallback,
/// each rule's hook being that of [`Rule::is_postrouting`] and [`Rule::local`]), as if they were at the head of the
/// built-in chain; the script's `-A`/`-I` add to it as [`import`] does. Then:
///
/// - `-D CHAIN N` deletes the Nth rule of the list (1-based), counting iptables rules: a `-m multiport` line is one
///   rule however many pfwd rules it became, and each existing pfwd rule is one;
/// - `-D CHAIN <rule>` deletes the first rule with the same match and target ([`Rule::same_match_and_target`]); a
///   `-m multiport` rule also deletes, when no line added it, the existing rules it was imported as (one per port);
/// - `-F CHAIN` empties the list, `-F` all three; `-X [CHAIN]` does nothing (pfwd keeps no user chains).
///
/// A deletion that finds nothing is an error, as in iptables, and fails the whole import.
pub fn import_onto(text: &str, existing: &[Rule]) -> Result<Import, ImportError> {
    let mut importer = Importer::new(existing);
    for (line_no, line) in logical_lines(text) {
        importer.line(line_no, &line).map_err(|b| ImportError {
            line_no,
            line: line.clone(),
            token: b.token,
            message: b.message,
        })?;
    }
    importer.join_ladders().map_err(|(line_no, b)| ImportError {
        line_no,
        line: text.lines().nth(line_no.saturating_sub(1)).unwrap_or_default().to_string(),
        token: b.token,
        message: b.message,
    })?;
    Ok(importer.finish())
}

/// One iptables rule in a chain: a rule of the running instance, the pfwd rules a line became (indices into
/// `Importer::rules`; several for multiport), or the jump into pfwd's chain.
#[derive(Debug)]
enum Entry {
    /// Index into `Importer::existing`.
    Existing(usize),
    Rules {
        ids: Vec<usize>,
        line_no: usize,
    },
    Jump,
    /// A jump into a user-defined chain (`-j DOCKER`): its matches (the line without `-j CHAIN`), expanded at the
    /// end into the chain's rules.
    UserJump {
        chain: String,
        spec: Vec<String>,
        line_no: usize,
    },
}

/// Which of a hook's two chains an entry is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Builtin,
    Pfwd,
}

/// The rules of one hook as iptables holds them: its built-in nat chain (`PREROUTING`, headed by the hook's existing
/// rules) and pfwd's chain (`PFWD-PREROUTING`), each in iptables' order.
#[derive(Debug, Default)]
struct HookChains {
    builtin: Vec<Entry>,
    pfwd: Vec<Entry>,
}

impl HookChains {
    fn side(&self, side: Side) -> &Vec<Entry> {
        match side {
            Side::Builtin => &self.builtin,
            Side::Pfwd => &self.pfwd,
        }
    }

    fn side_mut(&mut self, side: Side) -> &mut Vec<Entry> {
        match side {
            Side::Builtin => &mut self.builtin,
            Side::Pfwd => &mut self.pfwd,
        }
    }

    /// The hook's rules as one list, in iptables' order: the built-in chain, with pfwd's chain where the first jump
    /// to it is (or after everything). Jumps are not listed.
    fn view(&self) -> Vec<(Side, usize)> {
        let rules = |side: Side| {
            let list = self.side(side);
            (0..list.len()).filter(move |&i| !matches!(list[i], Entry::Jump)).map(move |i| (side, i))
        };
        let mut view = Vec::new();
        let mut jumped = false;
        for (i, e) in self.builtin.iter().enumerate() {
            match e {
                Entry::Jump if !jumped => {
                    jumped = true;
                    view.extend(rules(Side::Pfwd));
                }
                Entry::Jump => {}
                _ => view.push((Side::Builtin, i)),
            }
        }
        if !jumped {
            view.extend(rules(Side::Pfwd));
        }
        view
    }

    fn entry(&self, (side, i): (Side, usize)) -> &Entry {
        &self.side(side)[i]
    }

    /// The imported rules of the hook (indices into `Importer::rules`) in iptables' order.
    fn order(&self) -> Vec<usize> {
        self.view()
            .into_iter()
            .flat_map(|at| match self.entry(at) {
                Entry::Rules { ids, .. } => ids.clone(),
                Entry::Existing(_) | Entry::Jump | Entry::UserJump { .. } => Vec::new(),
            })
            .collect()
    }

    /// Takes the entries at `at` out of the chains.
    fn remove(&mut self, mut at: Vec<(Side, usize)>) -> Vec<Entry> {
        // Back to front, so that the indices still to remove stay valid.
        at.sort_unstable_by(|a, b| b.cmp(a));
        let mut removed: Vec<Entry> = at.into_iter().map(|(side, i)| self.side_mut(side).remove(i)).collect();
        removed.reverse();
        removed
    }
}

/// An imported rule and the line it came from.
#[derive(Debug, Clone)]
struct Imported {
    rule: Rule,
    line_no: usize,
    /// A line of a `-m statistic` ladder: the share of the connections reaching it that it takes.
    share: Option<Share>,
}

/// What a nat rule line holds once parsed: the jump into pfwd's chain, a jump into a user-defined chain, or the pfwd
/// rules it becomes.
enum Parsed {
    Jump,
    UserJump(String),
    /// The rules, and the line's `-m statistic` share when it is a line of a ladder.
    Rules(Vec<Rule>, Option<Share>),
}

struct Importer<'a> {
    /// The running instance's rules.
    existing: &'a [Rule],
    /// The `*table` of an `iptables-save` section.
    save_table: Option<String>,
    /// Imported rules in input order.
    rules: Vec<Imported>,
    /// The chains of each hook, indexed by [`NatHook`] (in [`NAT_HOOKS`] order: the order of the result).
    chains: [HookChains; NAT_HOOKS.len()],
    /// User-defined nat chains (declared by `:NAME` or `-N NAME`) and their rules as written (line, spec).
    user_chains: std::collections::BTreeMap<String, Vec<(usize, Vec<String>)>>,
    /// Ids of existing rules deleted or flushed.
    removed: Vec<u32>,
    actions: Vec<String>,
    warnings: Vec<String>,
}

impl<'a> Importer<'a> {
    fn new(existing: &'a [Rule]) -> Self {
        let mut chains: [HookChains; NAT_HOOKS.len()] = Default::default();
        for hook in NAT_HOOKS {
            chains[hook as usize].builtin = hook_order(existing, hook).into_iter().map(Entry::Existing).collect();
        }
        Importer {
            existing,
            save_table: None,
            rules: Vec::new(),
            chains,
            user_chains: Default::default(),
            removed: Vec::new(),
            actions: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn line(&mut self, line_no: usize, line: &str) -> Res<()> {
        let tokens = if is_save_line(line) { tokenize_restore(line)? } else { tokenize(line)? };
        let mut toks: &[String] = &tokens;
        if toks.first().is_some_and(|t| is_counters(t)) {
            toks = &toks[1..];
        }
        let Some(first) = toks.first() else { return Ok(()) };
        if let Some(table) = first.strip_prefix('*') {
            check_table(first, table)?;
            self.save_table = Some(table.to_string());
            return Ok(());
        }
        // Chain declarations: bookkeeping, whatever the table; a nat user chain is remembered for its jumps.
        if let Some(decl) = first.strip_prefix(':') {
            if self.save_table.as_deref() == Some(NAT_TABLE) && is_user_chain_name(decl) {
                self.user_chains.entry(decl.to_string()).or_default();
            }
            return Ok(());
        }
        if first == "COMMIT" {
            self.save_table = None;
            return Ok(());
        }
        let save_table = self.save_table.clone();
        let (default_table, args) = if first.starts_with(['-', '!']) || check_dashes(first).is_err() {
            // A rule line without a `*table` header is most likely a nat rule pasted from iptables-save.
            (save_table.as_deref().unwrap_or(NAT_TABLE), toks)
        } else {
            let mut rest = toks;
            if rest.first().is_some_and(|t| t == "sudo") {
                rest = &rest[1..];
                while rest.first().is_some_and(|t| t.starts_with('-')) {
                    rest = &rest[1..];
                }
            }
            let Some(program) = rest.first() else { return Err(bad(first, "expected an iptables command")) };
            match program.rsplit('/').next().unwrap_or(program) {
                "iptables" | "iptables-nft" | "iptables-legacy" => {}
                p if p.starts_with("ip6tables") => {
                    return Err(bad(program, "IPv6 rules are not supported; pfwd forwards IPv4"));
                }
                _ => return Err(bad(program, "not an iptables command or an iptables-save line")),
            }
            // iptables' default table.
            ("filter", &rest[1..])
        };
        let head = parse_head(args, default_table)?;
        if head.table == NAT_TABLE { self.nat_line(line_no, head) } else { self.other_table(line_no, line, head) }
    }

    fn nat_line(&mut self, line_no: usize, head: Head) -> Res<()> {
        let tok = head.command_tok;
        match head.command {
            Command::Append | Command::Insert => {}
            Command::Policy => {
                return match head.policy {
                    Some("ACCEPT") => Ok(()),
                    Some(p @ "DROP") => Err(bad(p, "a DROP policy in the nat table is not supported")),
                    Some(p) => Err(bad(p, "iptables: bad policy name (ACCEPT or DROP)")),
                    None => Err(bad(tok, "iptables: -P requires a chain and a policy")),
                };
            }
            Command::NewChain => {
                if let Some(c) = head.chain.filter(|c| is_user_chain_name(c)) {
                    self.user_chains.entry(c.to_string()).or_default();
                }
                return Ok(());
            }
            Command::Zero => return Ok(()),
            Command::Delete if head.chain.is_some_and(|c| self.user_chains.contains_key(c)) => {
                return Err(bad(head.command_tok, "deleting from a user-defined chain is not supported"));
            }
            Command::Delete => return self.delete(line_no, &head),
            Command::Flush if head.chain.is_some_and(|c| self.user_chains.contains_key(c)) => {
                let c = head.chain.unwrap_or_default();
                let n = self.user_chains.get_mut(c).map(|r| std::mem::take(r).len()).unwrap_or(0);
                self.actions.push(format!("line {line_no}: {}: removes {n} rules of {c}", label(&head)));
                return Ok(());
            }
            Command::Flush => return self.flush(line_no, &head),
            Command::DeleteChain => {
                if let Some(c) = head.chain {
                    self.user_chains.remove(c);
                }
                let what = label(&head);
                self.actions.push(format!("line {line_no}: {what}: nothing to do (pfwd keeps no user chains)"));
                return Ok(());
            }
            Command::Modify => {
                return Err(bad(
                    tok,
                    "changes existing rules in place; pfwd imports rule additions (-A, -I) and deletions (-D, -F) only",
                ));
            }
            Command::Query => return Err(bad(tok, "does not add a rule (give pfwd iptables-save -t nat output)")),
        }
        let chain = head.chain.unwrap_or_default();
        if let Some(rules) = self.user_chains.get_mut(chain) {
            // Kept as written; expanded where hook chains jump here (see `expand_user_jumps`).
            let spec: Vec<String> = head.spec.iter().map(|t| t.to_string()).collect();
            let at = match head.position {
                Some(n) if n > rules.len() + 1 => {
                    return Err(bad(&n.to_string(), "iptables: Index of insertion too big."));
                }
                Some(n) => n - 1,
                None if head.command == Command::Insert => 0,
                None => rules.len(),
            };
            rules.insert(at, (line_no, spec));
            return Ok(());
        }
        let user_jump = jump_of(&head.spec).filter(|j| self.user_chains.contains_key(*j));
        let (hook, parsed) = match user_jump {
            Some(target) => (hook_of(chain)?, Parsed::UserJump(target.to_string())),
            None => parse_rule(&head, chain)?,
        };
        let entry = match parsed {
            Parsed::Jump => Entry::Jump,
            Parsed::UserJump(target) => Entry::UserJump { chain: target, spec: without_jump(&head.spec), line_no },
            Parsed::Rules(rules, share) => {
                let mut ids = Vec::new();
                for rule in rules {
                    self.rules.push(Imported { rule, line_no, share });
                    ids.push(self.rules.len() - 1);
                }
                Entry::Rules { ids, line_no }
            }
        };
        let chains = &mut self.chains[hook as usize];
        let list = if chain == hook.pfwd_chain() { &mut chains.pfwd } else { &mut chains.builtin };
        let at = match head.position {
            Some(n) if n > list.len() + 1 => {
                return Err(bad(&n.to_string(), "iptables: Index of insertion too big."));
            }
            Some(n) => n - 1,
            None if head.command == Command::Insert => 0,
            None => list.len(),
        };
        list.insert(at, entry);
        Ok(())
    }

    /// `-D CHAIN N` and `-D CHAIN <rule>`, on the hook's rules as one list.
    fn delete(&mut self, line_no: usize, head: &Head) -> Res<()> {
        let tok = head.command_tok;
        let chain = head.chain.unwrap_or_default();
        let what = label(head);
        let (hook, at) = match head.position {
            Some(n) => {
                if let Some(extra) = head.spec.first() {
                    return Err(bad(extra, format!("{what} deletes by number: give either the number or the rule")));
                }
                let hook = hook_of(chain)?;
                let view = self.chains[hook as usize].view();
                let Some(&at) = view.get(n - 1) else {
                    let has = match view.len() {
                        0 => "no rules".to_string(),
                        1 => "1 rule".to_string(),
                        k => format!("{k} rules"),
                    };
                    return Err(bad(
                        &n.to_string(),
                        format!("iptables: Index of deletion too big. ({chain} has {has} at this line)"),
                    ));
                };
                (hook, vec![at])
            }
            None => {
                if head.spec.is_empty() {
                    return Err(bad(tok, format!("{what} needs a rule number or a rule (e.g. {what} 1)")));
                }
                let (hook, parsed) = parse_rule(head, chain)?;
                let Parsed::Rules(rules, _) = parsed else {
                    self.actions.push(format!(
                        "line {line_no}: {what} -j {}: nothing to do (pfwd manages the jump into its chain)",
                        hook.pfwd_chain()
                    ));
                    return Ok(());
                };
                let at = self
                    .find(hook, &rules)
                    .ok_or_else(|| bad(tok, "iptables: Bad rule (does a matching rule exist in that chain?)"))?;
                (hook, at)
            }
        };
        let removed = self.chains[hook as usize].remove(at);
        let shown: Vec<String> = removed.iter().map(|e| self.describe(e)).collect();
        self.forget(&removed);
        let what = if head.position.is_some() { what } else { format!("{what} <rule>") };
        self.actions.push(format!("line {line_no}: {what}: deletes {}", shown.join(", ")));
        Ok(())
    }

    /// The entries `-D CHAIN <rule>` deletes: the first rule of the hook's list with the same match and target (all
    /// of them for a `-m multiport` line); failing that, for a multiport rule, the existing rules it was imported as.
    fn find(&self, hook: NatHook, rules: &[Rule]) -> Option<Vec<(Side, usize)>> {
        let chains = &self.chains[hook as usize];
        let view = chains.view();
        let same = |at: &(Side, usize)| {
            let got: Vec<&Rule> = match chains.entry(*at) {
                Entry::Existing(i) => vec![&self.existing[*i]],
                Entry::Rules { ids, .. } => ids.iter().map(|&i| &self.rules[i].rule).collect(),
                Entry::Jump | Entry::UserJump { .. } => Vec::new(),
            };
            got.len() == rules.len() && got.iter().zip(rules).all(|(a, b)| a.same_match_and_target(b))
        };
        if let Some(&at) = view.iter().find(|at| same(at)) {
            return Some(vec![at]);
        }
        if rules.len() < 2 {
            return None;
        }
        let mut found: Vec<(Side, usize)> = Vec::new();
        for (k, r) in rules.iter().enumerate() {
            // `--dports 53,53`: the port's rule is already taken.
            if rules[..k].iter().any(|o| o.same_match_and_target(r)) {
                continue;
            }
            let at = view.iter().find(
                |&&at| matches!(chains.entry(at), Entry::Existing(i) if self.existing[*i].same_match_and_target(r)),
            )?;
            found.push(*at);
        }
        Some(found)
    }

    /// `-F [CHAIN]`: empties the hook's rules, or every hook's.
    fn flush(&mut self, line_no: usize, head: &Head) -> Res<()> {
        let what = label(head);
        let hooks: Vec<NatHook> = match head.chain {
            None => NAT_HOOKS.to_vec(),
            Some(chain) => match hook_of(chain) {
                Ok(hook) => vec![hook],
                Err(_) if NAT_HOOKS.iter().any(|h| chain.eq_ignore_ascii_case(h.builtin())) => {
                    return Err(unsupported_chain(chain));
                }
                Err(_) => {
                    self.actions
                        .push(format!("line {line_no}: {what}: nothing to do (pfwd keeps no rules in {chain})"));
                    return Ok(());
                }
            },
        };
        let mut removed = Vec::new();
        for hook in hooks {
            let chains = &mut self.chains[hook as usize];
            removed.extend(std::mem::take(&mut chains.builtin));
            removed.extend(std::mem::take(&mut chains.pfwd));
        }
        self.forget(&removed);
        let mut ids: Vec<u32> = Vec::new();
        let mut lines: Vec<usize> = Vec::new();
        for e in &removed {
            match e {
                Entry::Existing(i) => ids.push(self.existing[*i].id),
                Entry::Rules { line_no, .. } | Entry::UserJump { line_no, .. } => lines.push(*line_no),
                Entry::Jump => {}
            }
        }
        ids.sort_unstable();
        lines.sort_unstable();
        let parts: Vec<String> =
            [counted("rule", "rules", &ids), counted("the rule of line", "the rules of lines", &lines)]
                .into_iter()
                .flatten()
                .collect();
        let did =
            if parts.is_empty() { "nothing to remove".to_string() } else { format!("removes {}", parts.join(" and ")) };
        self.actions.push(format!("line {line_no}: {what}: {did}"));
        Ok(())
    }

    /// Notes the existing rules among `removed` as removed.
    fn forget(&mut self, removed: &[Entry]) {
        for e in removed {
            if let Entry::Existing(i) = e {
                self.removed.push(self.existing[*i].id);
            }
        }
    }

    /// An entry for the actions: `rule 7 (dnat ...)`, `the rule of line 3 (dnat ...; dnat ...)`.
    fn describe(&self, e: &Entry) -> String {
        match e {
            Entry::Existing(i) => format!("rule {} ({})", self.existing[*i].id, self.existing[*i]),
            Entry::Rules { ids, line_no } => {
                let rules: Vec<String> = ids.iter().map(|&i| self.rules[i].rule.to_string()).collect();
                format!("the rule of line {line_no} ({})", rules.join("; "))
            }
            Entry::Jump => "the jump into pfwd's chain".to_string(),
            Entry::UserJump { chain, line_no, .. } => format!("the jump of line {line_no} into {chain}"),
        }
    }

    /// Lines outside the nat table: pfwd's own jumps and chains are skipped, NAT targets are an error (iptables
    /// rejects them there), anything else is skipped with a warning.
    fn other_table(&mut self, line_no: usize, line: &str, head: Head) -> Res<()> {
        let jump = jump_of(&head.spec);
        let pfwd_chain = |c: &str| CHAINS.iter().any(|p| p.name == c);
        if head.chain.is_some_and(pfwd_chain) || jump.is_some_and(pfwd_chain) {
            return Ok(());
        }
        match head.command {
            Command::NewChain | Command::Flush | Command::DeleteChain | Command::Zero => return Ok(()),
            Command::Policy if head.policy == Some("ACCEPT") => return Ok(()),
            Command::Query => {
                return Err(bad(head.command_tok, "does not add a rule (give pfwd iptables-save -t nat output)"));
            }
            _ => {}
        }
        if let Some(j) = jump.filter(|j| Jump::from_name(j).is_some()) {
            return Err(bad(j, format!("{j} is only valid in the nat table: add -t nat")));
        }
        if head.table == "filter"
            && let Some(c @ ("PREROUTING" | "POSTROUTING")) = head.chain
        {
            return Err(bad(c, format!("the filter table has no {c} chain: add -t nat")));
        }
        self.warnings.push(format!(
            "line {line_no}: not imported ({} table; pfwd converts nat PREROUTING and OUTPUT DNAT/REDIRECT and \
             POSTROUTING SNAT/MASQUERADE rules): {line}",
            head.table
        ));
        Ok(())
    }

    /// Replaces each jump into a user-defined chain (Docker's `-A PREROUTING -m addrtype --dst-type LOCAL -j
    /// DOCKER`) by the chain's rules as the hook sees them: the jump's matches plus each rule's own, in the chain's
    /// order. A `RETURN` with one `-i`/`-o`/`-s`/`-d` match (Docker's `-A DOCKER -i docker0 -j RETURN`) excludes
    /// what it matches from the rules after it. What cannot be converted this way is skipped with a warning naming
    /// both lines, so the rest of such a ruleset (Docker's, typically) still comes through.
    fn expand_user_jumps(&mut self) {
        for hook in NAT_HOOKS {
            for side in [Side::Builtin, Side::Pfwd] {
                let n = self.chains[hook as usize].side(side).len();
                for i in 0..n {
                    let Entry::UserJump { chain, spec, line_no } = &self.chains[hook as usize].side(side)[i] else {
                        continue;
                    };
                    let (chain, spec, line_no) = (chain.clone(), spec.clone(), *line_no);
                    let ids = self.expand(hook, &chain, &spec, line_no);
                    self.chains[hook as usize].side_mut(side)[i] = Entry::Rules { ids, line_no };
                }
            }
        }
    }

    /// The rules of `chain` reached from the jump of line `jump_line` in `hook` (with the jump's matches `spec`):
    /// their indices in `self.rules`.
    fn expand(&mut self, hook: NatHook, chain: &str, jump_spec: &[String], jump_line: usize) -> Vec<usize> {
        let rules = self.user_chains.get(chain).cloned().unwrap_or_default();
        // Conditions earlier RETURNs took out of the chain: (option, value, negated).
        let mut returned: Vec<(&'static str, String, bool)> = Vec::new();
        let mut ids = Vec::new();
        'rules: for (line_no, spec) in rules {
            let toks: Vec<&str> = spec.iter().map(String::as_str).collect();
            let at = format!("line {line_no} (chain {chain}, jumped to from line {jump_line})");
            if jump_of(&toks) == Some("RETURN") {
                match single_condition(&toks) {
                    Some(c) => returned.push(c),
                    None => {
                        self.warnings.push(format!(
                            "{at}: a RETURN with other than one -i, -o, -s or -d match is not converted; the rules of \
                             {chain} after it were not imported"
                        ));
                        break;
                    }
                }
                continue;
            }
            let mut combined: Vec<String> = jump_spec.to_vec();
            for (opt, value, negated) in &returned {
                match option_of(&toks, opt) {
                    // Not constrained by the rule: it applies to what the RETURN let through.
                    None => {
                        if !negated {
                            combined.push("!".into());
                        }
                        combined.extend([opt.to_string(), value.clone()]);
                    }
                    // Already excluded, or implied by a different positive interface/address.
                    Some((v, n)) if v == *value && n != *negated => {}
                    Some((v, false)) if v != *value && !negated && matches!(*opt, "-i" | "-o") => {}
                    Some((v, n)) if v == *value && n == *negated => {
                        self.actions.push(format!("{at}: never reached (an earlier RETURN takes its packets)"));
                        continue 'rules;
                    }
                    Some(_) => {
                        self.warnings.push(format!(
                            "{at}: not converted: its {opt} cannot be combined with the RETURN before it"
                        ));
                        continue 'rules;
                    }
                }
            }
            // For connections of this host (OUTPUT) there is no incoming interface: `! -i X` always holds, `-i X`
            // never does.
            let mut own: Vec<String> = Vec::new();
            let mut k = 0;
            while k < toks.len() {
                let negated = toks[k] == "!";
                let opt_at = if negated { k + 1 } else { k };
                let is_in = matches!(toks.get(opt_at).map(|t| split_inline(t).0), Some("-i" | "--in-interface"));
                if hook == NatHook::Output && is_in {
                    if !negated {
                        self.actions.push(format!("{at}: never matches local connections (they have no -i)"));
                        continue 'rules;
                    }
                    let inline = split_inline(toks[opt_at]).1.is_some();
                    k = opt_at + if inline { 1 } else { 2 };
                    continue;
                }
                own.push(toks[k].to_string());
                k += 1;
            }
            combined.extend(own);
            let combined_toks: Vec<&str> = combined.iter().map(String::as_str).collect();
            match rules_of(hook, &combined_toks, "-A").and_then(|r| Ok((r, statistic_share(&combined_toks)?))) {
                Ok((rules, share)) => {
                    for rule in rules {
                        self.rules.push(Imported { rule, line_no, share });
                        ids.push(self.rules.len() - 1);
                    }
                }
                Err(b) => self.warnings.push(format!("{at}: not converted: {:?}: {}", b.token, b.message)),
            }
        }
        ids
    }

    /// Joins each `-m statistic` ladder (consecutive DNAT lines of one chain with the same match, each taking a
    /// share of what reaches it, the last line without `-m statistic` taking the rest) into one rule with several
    /// backends, weighted by their shares: what `pfwd export` writes for such a rule, and how iptables users spread
    /// connections by hand. User chains are expanded first, so ladders in them join too. A `-m statistic` line that is
    /// not part of such a ladder is an error (importing it as a plain DNAT would send every connection there).
    fn join_ladders(&mut self) -> Result<(), (usize, Bad)> {
        self.expand_user_jumps();
        for hook in NAT_HOOKS {
            for side in [Side::Builtin, Side::Pfwd] {
                let mut i = 0;
                while i < self.chains[hook as usize].side(side).len() {
                    let list = self.chains[hook as usize].side(side);
                    let single = |e: &Entry| match e {
                        Entry::Rules { ids, .. } if ids.len() == 1 => Some(ids[0]),
                        _ => None,
                    };
                    let Some(first) = single(&list[i]).filter(|&id| self.rules[id].share.is_some()) else {
                        i += 1;
                        continue;
                    };
                    // The ladder: lines with a share and the first one's match, up to one without a share.
                    let mut members = vec![first];
                    let mut end = None;
                    for (j, e) in list.iter().enumerate().skip(i + 1) {
                        let Some(id) =
                            single(e).filter(|&id| same_match(&self.rules[id].rule, &self.rules[first].rule))
                        else {
                            break;
                        };
                        members.push(id);
                        if self.rules[id].share.is_none() {
                            end = Some(j);
                            break;
                        }
                    }
                    let at = self.rules[first].line_no;
                    let Some(end) = end else {
                        return Err((
                            at,
                            bad(
                                "statistic",
                                "a -m statistic line must start a ladder: DNAT lines with the same match, \
                                 the last one without -m statistic (taking the rest)",
                            ),
                        ));
                    };
                    let shares: Vec<f64> =
                        members.iter().map(|&id| self.rules[id].share.map_or(1.0, |s| s.0)).collect();
                    let weights = ladder_weights(&shares).ok_or_else(|| {
                        (at, bad("statistic", "the ladder's shares are not whole weights (up to 1000 in all)"))
                    })?;
                    let mut backends = Vec::new();
                    for (&id, w) in members.iter().zip(weights) {
                        let Target::Dnat { addr, port } = self.rules[id].rule.target else {
                            return Err((self.rules[id].line_no, bad("statistic", "a ladder of -j DNAT lines only")));
                        };
                        backends.extend(
                            self.rules[id]
                                .rule
                                .dnat_backends()
                                .into_iter()
                                .map(|b| Backend { weight: b.weight * w, ..Backend::new(addr, port) }),
                        );
                    }
                    let mut rule = self.rules[first].rule.clone();
                    rule.set_dnat_backends(backends);
                    rule.validate().map_err(|e| (at, bad("statistic", e.to_string())))?;
                    self.rules.push(Imported { rule, line_no: at, share: None });
                    let joined = Entry::Rules { ids: vec![self.rules.len() - 1], line_no: at };
                    self.chains[hook as usize].side_mut(side).splice(i..=end, [joined]);
                    i += 1;
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Import {
        let order: Vec<usize> = self.chains.iter().flat_map(HookChains::order).collect();

        let mut kept: Vec<&Imported> = Vec::new();
        // First line of each match and target (a hash of `dedup_key`, not a pairwise comparison: an import of
        // 10,000 lines spent most of its time comparing pairs).
        let mut first_line: std::collections::HashMap<crate::rules::DedupKey, usize> = Default::default();
        for i in order {
            let Imported { rule, line_no, .. } = &self.rules[i];
            match first_line.entry(rule.dedup_key()) {
                std::collections::hash_map::Entry::Occupied(first) => self.warnings.push(format!(
                    "line {line_no}: duplicate of line {} (\"{rule}\"); dropped, it could never match",
                    first.get()
                )),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(*line_no);
                    kept.push(&self.rules[i]);
                }
            }
        }

        let rules: Vec<Rule> = kept.iter().map(|k| k.rule.clone()).collect();
        let mut rank = vec![0; rules.len()];
        for (pos, i) in precedence_order(&rules).into_iter().enumerate() {
            rank[i] = pos;
        }
        // Only a rule that some earlier rule outranks in list order can be shadowed differently: skip the others
        // without looking at pairs (in the usual import, list order is precedence order and there are none).
        let mut worst_before = 0;
        for later in 0..rules.len() {
            let inverted = later > 0 && worst_before > rank[later];
            worst_before = worst_before.max(rank[later]);
            if !inverted {
                continue;
            }
            for earlier in 0..later {
                let (a, b) = (&rules[earlier], &rules[later]);
                if rank[later] < rank[earlier] && a.target != b.target && may_overlap(a, b) {
                    let (la, lb) = (kept[earlier].line_no, kept[later].line_no);
                    self.warnings.push(format!(
                        "line {lb} (\"{b}\") overlaps line {la} (\"{a}\"): iptables uses line {la} for packets both \
                         match, pfwd the more specific line {lb}"
                    ));
                }
            }
        }
        self.removed.sort_unstable();
        self.removed.dedup();
        Import { rules, warnings: self.warnings, removed: self.removed, actions: self.actions }
    }
}

/// A nat chain other than the hooks' built-in chains and pfwd's.
fn unsupported_chain(chain: &str) -> Bad {
    match chain {
        "INPUT" => bad(
            chain,
            format!(
                "valid iptables, but pfwd does not support nat {chain} rules yet (only PREROUTING, POSTROUTING and \
                 OUTPUT)"
            ),
        ),
        c if NAT_HOOKS.iter().any(|h| c.eq_ignore_ascii_case(h.builtin())) => {
            bad(c, format!("chain names are case-sensitive: {}", c.to_ascii_uppercase()))
        }
        c => bad(
            c,
            format!(
                "rules in chain {c} are not supported; pfwd imports nat PREROUTING, POSTROUTING and OUTPUT rules (put \
                 them there)"
            ),
        ),
    }
}

/// `rule 7`, `rules 1, 2, 5`; `None` for no items.
fn counted<T: ToString>(one: &str, many: &str, items: &[T]) -> Option<String> {
    let list = || items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    match items {
        [] => None,
        [_] => Some(format!("{one} {}", list())),
        _ => Some(format!("{many} {}", list())),
    }
}

/// The command as the actions show it: `-D PREROUTING 2`, `-F`, `--flush POSTROUTING`.
fn label(head: &Head) -> String {
    let mut s = split_inline(head.command_tok).0.to_string();
    for part in [head.chain.map(str::to_string), head.position.map(|n| n.to_string())].into_iter().flatten() {
        s.push(' ');
        s.push_str(&part);
    }
    s
}

/// The hook of a nat chain: its built-in chain or pfwd's.
fn hook_of(chain: &str) -> Res<NatHook> {
    NAT_HOOKS
        .into_iter()
        .find(|h| chain == h.builtin() || chain == h.pfwd_chain())
        .ok_or_else(|| unsupported_chain(chain))
}

/// The rule of an `-A`, `-I` or `-D CHAIN <rule>` line in nat `chain`, with iptables' checks: its hook, and the pfwd
/// rules it becomes (or the jump into pfwd's chain).
fn parse_rule(head: &Head, chain: &str) -> Res<(NatHook, Parsed)> {
    // NETMAP first: the message should name what the user wrote, not the chain it lives in.
    if let Some(j @ "NETMAP") = jump_of(&head.spec) {
        return Err(bad(
            j,
            format!("valid iptables, but pfwd does not support {j} yet (only DNAT, REDIRECT, SNAT and MASQUERADE)"),
        ));
    }
    let hook = hook_of(chain)?;
    if let Some(j) = jump_of(&head.spec)
        && j == hook.pfwd_chain()
        && chain == hook.builtin()
    {
        return Ok((hook, Parsed::Jump));
    }
    Ok((hook, Parsed::Rules(rules_of(hook, &head.spec, head.command_tok)?, statistic_share(&head.spec)?)))
}

/// Whether two rules match the same packets (their targets may differ): lines of one ladder.
fn same_match(a: &Rule, b: &Rule) -> bool {
    let b_with_a_target = Rule { target: a.target, backends: a.backends.clone(), ..b.clone() };
    a.same_match_and_target(&b_with_a_target)
}

/// Whole weights (adding up to at most 1000) in the proportions of a ladder whose lines take `shares` of what reaches
/// them (the last 1.0): the smallest total for which every backend's part is within 0.05 of a whole number.
fn ladder_weights(shares: &[f64]) -> Option<Vec<u32>> {
    let mut left = 1.0;
    let parts: Vec<f64> = shares
        .iter()
        .map(|s| {
            let part = left * s;
            left -= part;
            part
        })
        .collect();
    (parts.len() as u32..=1000).find_map(|total| {
        let w: Vec<u32> = parts.iter().map(|p| (p * f64::from(total)).round() as u32).collect();
        let fits = w.iter().zip(&parts).all(|(&w, p)| w >= 1 && (f64::from(w) - p * f64::from(total)).abs() < 0.05);
        (fits && w.iter().sum::<u32>() == total).then_some(w)
    })
}

/// The pfwd rules of a nat rule's spec in `hook`, with iptables' checks.
fn rules_of(hook: NatHook, toks: &[&str], command_tok: &str) -> Res<Vec<Rule>> {
    let spec = parse_spec(toks)?;
    // iptables' own checks: the incoming interface is unknown after routing and for local connections, the
    // outgoing one before routing.
    match (hook, spec.iface, spec.oface) {
        (NatHook::Postrouting, Some(i), _) => return Err(bad(i.name, "iptables: Can't use -i with POSTROUTING")),
        (NatHook::Output, Some(i), _) => return Err(bad(i.name, "iptables: Can't use -i with OUTPUT")),
        (NatHook::Prerouting, _, Some(o)) => return Err(bad(o.name, "iptables: Can't use -o with PREROUTING")),
        _ => {}
    }
    build_rules(&spec, command_tok, hook)
}

/// A name a user-defined nat chain may have: not a hook's built-in chain (in any case), nor pfwd's, nor INPUT.
fn is_user_chain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.eq_ignore_ascii_case("INPUT")
        && !NAT_HOOKS.iter().any(|h| name.eq_ignore_ascii_case(h.builtin()) || name == h.pfwd_chain())
        && !CHAINS.iter().any(|c| c.name == name)
}

/// A rule's spec without its `-j CHAIN` (the matches of a jump).
fn without_jump(spec: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < spec.len() {
        match split_inline(spec[i]) {
            ("-j" | "--jump", Some(_)) => i += 1,
            ("-j" | "--jump", None) => i += 2,
            _ => {
                out.push(spec[i].to_string());
                i += 1;
            }
        }
    }
    out
}

/// The canonical short form of an interface or address option.
fn short_option(name: &str) -> Option<&'static str> {
    match name {
        "-i" | "--in-interface" => Some("-i"),
        "-o" | "--out-interface" => Some("-o"),
        "-s" | "--source" | "--src" => Some("-s"),
        "-d" | "--destination" | "--dst" => Some("-d"),
        _ => None,
    }
}

/// The one `[!] -i|-o|-s|-d VALUE` match of a RETURN rule (besides `-j RETURN`): (option, value, negated).
fn single_condition(spec: &[&str]) -> Option<(&'static str, String, bool)> {
    let matches = without_jump(spec);
    let m: Vec<&str> = matches.iter().map(String::as_str).collect();
    let (negated, rest) = match m.as_slice() {
        ["!", rest @ ..] => (true, rest),
        rest => (false, rest),
    };
    match rest {
        [opt, value] => Some((short_option(opt)?, value.to_string(), negated)),
        [opt] => {
            let (name, value) = split_inline(opt);
            Some((short_option(name)?, value?.to_string(), negated))
        }
        _ => None,
    }
}

/// The rule's own use of `opt` (a short option from [`short_option`]): its value and whether it is negated.
fn option_of(spec: &[&str], opt: &str) -> Option<(String, bool)> {
    spec.iter().enumerate().find_map(|(i, t)| {
        let (name, inline) = split_inline(t);
        if short_option(name) != Some(opt) {
            return None;
        }
        let value = inline.or_else(|| spec.get(i + 1).copied())?;
        Some((value.to_string(), i > 0 && spec[i - 1] == "!"))
    })
}

/// Whether some packet could match both rules; conservative (may say yes when no packet does, never the reverse).
fn may_overlap(a: &Rule, b: &Rule) -> bool {
    fn either_or_equal<T: PartialEq>(x: &Option<T>, y: &Option<T>) -> bool {
        x.is_none() || y.is_none() || x == y
    }
    let nets = |x: Option<Ipv4Net>, y: Option<Ipv4Net>| match (x, y) {
        (Some(x), Some(y)) => x.contains(&y.network()) || y.contains(&x.network()),
        _ => true,
    };
    let ports = match (a.dport, b.dport) {
        (Some(x), Some(y)) => x.lo <= y.hi && y.lo <= x.hi,
        _ => true,
    };
    // Rules of different hooks (PREROUTING, POSTROUTING, OUTPUT) never see the same lookup.
    NatHook::of(a) == NatHook::of(b)
        && either_or_equal(&a.iface, &b.iface)
        && either_or_equal(&a.oface, &b.oface)
        && either_or_equal(&a.proto, &b.proto)
        && ports
        && nets(a.src, b.src)
        && nets(a.dst, b.dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::tests::{err, ok, rule};

    #[test]
    fn import_snat_masquerade() {
        for (line, want) in [
            ("iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE", "masquerade -o eth0"),
            (
                "iptables -t nat -A POSTROUTING -s 10.0.2.0/24 -o eth1 -p tcp -j SNAT --to-source 203.0.113.5:20000-20099",
                "snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099",
            ),
            (
                "iptables -t nat -A POSTROUTING -d 198.51.100.0/24 -j SNAT --to 203.0.113.6",
                "snat -d 198.51.100.0/24 --to 203.0.113.6",
            ),
            (
                "sudo iptables -w -t nat -I POSTROUTING --out-interface wg0 --protocol udp --jump MASQUERADE --to-ports 1024-1027",
                "masquerade -o wg0 -p udp --to-ports 1024-1027",
            ),
            ("-A POSTROUTING -p tcp -m tcp -j MASQUERADE --to-ports 5000", "masquerade -p tcp --to-ports 5000"),
            (
                "iptables -t nat -A POSTROUTING -p tcp -j SNAT --to-source=203.0.113.7:5000",
                "snat -p tcp --to 203.0.113.7:5000",
            ),
        ] {
            let got = ok(line);
            assert_eq!(got.rules, vec![rule(want)], "{line}");
            assert!(got.warnings.is_empty(), "{line}: {:?}", got.warnings);
        }

        // An iptables-save dump: PREROUTING rules come first, each hook in its own first-match order with pfwd's
        // chain where the jump is; the hooks never warn about each other.
        let dump = "\
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:PFWD-PREROUTING - [0:0]
:PFWD-POSTROUTING - [0:0]
[1:60] -A POSTROUTING -s 10.9.0.0/16 -o eth0 -j MASQUERADE
-A POSTROUTING -o eth0 -j PFWD-POSTROUTING
-A POSTROUTING -j MASQUERADE
-A PREROUTING -i eth0 -j PFWD-PREROUTING
-A PFWD-POSTROUTING -s 10.9.2.0/24 -o eth0 -p tcp -m comment --comment \"pfwd:7\" -j SNAT --to-source 203.0.113.5:20000-20099
-A PFWD-PREROUTING -p tcp -m tcp --dport 80 -m comment --comment \"pfwd:1\" -j REDIRECT --to-ports 3000
COMMIT
";
        let got = ok(dump);
        let want = [
            "redirect -p tcp --dport 80 --to-port 3000",
            "masquerade -o eth0 -s 10.9.0.0/16",
            "snat -o eth0 -p tcp -s 10.9.2.0/24 --to 203.0.113.5:20000-20099",
            "masquerade",
        ];
        assert_eq!(got.rules, want.map(rule));
        // pfwd ranks -p above -s: the SNAT rule wins over the earlier MASQUERADE where both match.
        assert_eq!(got.warnings.len(), 1, "{:#?}", got.warnings);
        assert!(got.warnings[0].starts_with("line 10 (\"snat -o eth0 -p tcp"), "{}", got.warnings[0]);
        assert!(got.warnings[0].contains("overlaps line 6 (\"masquerade -o eth0 -s 10.9.0.0/16\")"));
        // Already in pfwd's order: nothing to say, whatever the other hook holds.
        let got = ok("iptables -t nat -A POSTROUTING -o eth0 -p tcp -j MASQUERADE\n\
                      iptables -t nat -A POSTROUTING -j MASQUERADE\n\
                      iptables -t nat -A PREROUTING -j DNAT --to 10.0.0.1\n");
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
        assert_eq!(got.rules.len(), 3);
        assert!(!got.rules[0].is_postrouting() && got.rules[1].is_postrouting());
    }

    #[test]
    fn import_local_rules() {
        for (line, want) in [
            // The classic forms: connections this host makes to a port or an address go elsewhere.
            (
                "iptables -t nat -A OUTPUT -p tcp --dport 1111 -j DNAT --to-destination 127.0.0.1:80",
                "dnat --local -p tcp --dport 1111 --to 127.0.0.1:80",
            ),
            (
                "iptables -t nat -A OUTPUT -d 211.45.70.13 -j DNAT --to 192.168.255.151",
                "dnat --local -d 211.45.70.13 --to 192.168.255.151",
            ),
            (
                "sudo iptables -t nat -I OUTPUT -p tcp -d 127.0.0.1 --dport 80 -j REDIRECT --to-ports 8080",
                "redirect --local -p tcp -d 127.0.0.1 --dport 80 --to-port 8080",
            ),
            (
                "iptables -t nat -A OUTPUT -p udp -m multiport --dports 53 -j DNAT --to-destination 10.0.2.3:5353",
                "dnat --local -p udp --dport 53 --to 10.0.2.3:5353",
            ),
            (
                "-A OUTPUT -d 198.51.100.13/32 -p tcp -m tcp --dport 1111 -j DNAT --to-destination 127.0.0.1:80",
                "dnat --local -p tcp -d 198.51.100.13 --dport 1111 --to 127.0.0.1:80",
            ),
            (
                "-A PFWD-OUTPUT -p udp -m comment --comment \"pfwd:15\" -j REDIRECT --to-ports 53",
                "redirect --local -p udp --to-port 53",
            ),
        ] {
            let got = ok(line);
            assert_eq!(got.rules, vec![rule(want)], "{line}");
            assert!(got.rules[0].local, "{line}");
            assert!(got.warnings.is_empty(), "{line}: {:?}", got.warnings);
        }

        // A dump: PREROUTING, then POSTROUTING, then OUTPUT rules, each hook in its own first-match order with
        // pfwd's chain where the jump is; overlap warnings only within one hook.
        let dump = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:PFWD-OUTPUT - [0:0]
-A OUTPUT -d 10.9.0.0/16 -j DNAT --to-destination 10.0.2.9
-A OUTPUT -j PFWD-OUTPUT
-A OUTPUT -d 192.0.2.0/24 -p tcp -m tcp --dport 22 -j DNAT --to-destination 10.0.2.8
-A PREROUTING -j DNAT --to-destination 10.0.2.1
-A POSTROUTING -j MASQUERADE
-A PFWD-OUTPUT -d 10.9.1.0/24 -p tcp -m tcp --dport 80 -m comment --comment \"pfwd:11\" -j REDIRECT --to-ports 8080
COMMIT
";
        let got = ok(dump);
        let want = [
            "dnat --to 10.0.2.1",
            "masquerade",
            "dnat --local -d 10.9.0.0/16 --to 10.0.2.9",
            "redirect --local -p tcp -d 10.9.1.0/24 --dport 80 --to-port 8080",
            "dnat --local -p tcp -d 192.0.2.0/24 --dport 22 --to 10.0.2.8",
        ];
        assert_eq!(got.rules, want.map(rule));
        // The port rule is more specific than the OUTPUT rule before it that covers its addresses; the PREROUTING
        // catch-all, which every OUTPUT rule would beat in one hook, is not mentioned.
        assert_eq!(
            got.warnings,
            ["line 11 (\"redirect --local -p tcp -d 10.9.1.0/24 --dport 80 --to-port 8080\") overlaps line 6 (\"dnat \
                 --local -d 10.9.0.0/16 --to 10.0.2.9\"): iptables uses line 6 for packets both match, pfwd the more \
                 specific line 11"]
        );
        // -I and positions work in OUTPUT like elsewhere; PREROUTING and OUTPUT rules with the same match are not
        // duplicates.
        let got = ok("iptables -t nat -A OUTPUT -p tcp --dport 1 -j REDIRECT --to-ports 1\n\
                      iptables -t nat -I OUTPUT -p tcp --dport 2 -j REDIRECT --to-ports 2\n\
                      iptables -t nat -I OUTPUT 2 -p tcp --dport 3 -j REDIRECT --to-ports 3\n\
                      iptables -t nat -A PREROUTING -p tcp --dport 1 -j REDIRECT --to-ports 1\n\
                      iptables -t nat -A OUTPUT -p tcp --dport 1 -j REDIRECT --to-ports 1\n");
        let ports: Vec<(bool, u16)> = got.rules.iter().map(|r| (r.local, r.dport.unwrap().lo)).collect();
        assert_eq!(ports, [(false, 1), (true, 2), (true, 3), (true, 1)]);
        assert_eq!(got.warnings.len(), 1, "{:?}", got.warnings);
        assert!(got.warnings[0].starts_with("line 5: duplicate of line 1 (\"redirect --local -p tcp --dport 1"));
    }

    #[test]
    fn import_iptables_save_dump() {
        let dump = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Nov 26 11:30:45 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [12:720]
:OUTPUT ACCEPT [0:0]
:PFWD-FORWARD - [0:0]
[120:7200] -A FORWARD -i eth0 -j PFWD-FORWARD
[4:240] -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
[0:0] -A PFWD-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
# Completed on Thu Nov 26 11:30:45 2026
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Nov 26 11:30:45 2026
*nat
:PREROUTING ACCEPT [5:300]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:PFWD-PREROUTING - [0:0]
[3:180] -A PREROUTING -s 10.0.0.0/8 -d 1.2.3.4/32 -i eth0 -p tcp -m tcp --dport 80 -m comment --comment hi -j DNAT --to-destination 1.2.3.5:80
[5:300] -A PREROUTING -i eth0 -j PFWD-PREROUTING
[0:0] -A PREROUTING -p udp -m udp --dport 53 -j REDIRECT --to-ports 5353
[2:120] -A PFWD-PREROUTING -i eth0 -p tcp -m tcp --dport 59999 -m comment --comment \"pfwd:1\" -j DNAT --to-destination 127.0.0.1:17355
[0:0] -A PFWD-PREROUTING -p tcp -m tcp --dport 8000:8099 -m comment --comment \"pfwd:3\" -j DNAT --to-destination 10.0.2.2
[0:0] -A PFWD-PREROUTING -d 203.0.113.10/32 -m comment --comment \"pfwd:2\" -j DNAT --to-destination 10.0.2.2
COMMIT
# Completed on Thu Nov 26 11:30:45 2026
";
        let got = ok(dump);
        // PREROUTING order, with pfwd's chain where PREROUTING jumps to it.
        let want = [
            "dnat -i eth0 -p tcp -s 10.0.0.0/8 -d 1.2.3.4 --dport 80 --to 1.2.3.5:80",
            "dnat -i eth0 -p tcp --dport 59999 --to 127.0.0.1:17355",
            "dnat -p tcp --dport 8000-8099 --to 10.0.2.2",
            "dnat -d 203.0.113.10 --to 10.0.2.2",
            "redirect -p udp --dport 53 --to-port 5353",
        ];
        assert_eq!(got.rules, want.map(rule));
        // The udp rule is more specific than the catch-all before it and overlaps it: pfwd changes who wins.
        assert_eq!(got.warnings.len(), 2, "{:#?}", got.warnings);
        assert!(got.warnings[0].starts_with("line 8: not imported (filter table;"), "{}", got.warnings[0]);
        assert!(got.warnings[0].ends_with("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"));
        assert_eq!(
            got.warnings[1],
            "line 21 (\"redirect -p udp --dport 53 --to-port 5353\") overlaps line 24 (\"dnat -d 203.0.113.10 --to \
             10.0.2.2\"): iptables uses line 24 for packets both match, pfwd the more specific line 21"
        );
    }

    /// `iptables-save -t nat` of a Docker host running one container published with `-p 8080:80` (Docker 24-27,
    /// iptables-nft), verbatim apart from the counters.
    const DOCKER_NAT: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Tue Dec  1 10:00:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
COMMIT
# Completed on Tue Dec  1 10:00:00 2026
";

    #[test]
    fn docker_published_port_imports() {
        let i = ok(DOCKER_NAT);
        let texts: Vec<String> = i.rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            [
                // PREROUTING through DOCKER: the jump's match, then the rule's (its ! -i docker0 is the RETURN's).
                "dnat ! -i docker0 -p tcp -d local --dport 8080 --to 172.17.0.2:80",
                "masquerade ! -o docker0 -s 172.17.0.0/16",
                // The container reaching itself through its published port.
                "masquerade -p tcp -s 172.17.0.2 -d 172.17.0.2 --dport 80",
                // OUTPUT through DOCKER: local connections (no incoming interface, so ! -i docker0 always holds).
                "dnat --local -p tcp ! -d 127.0.0.0/8 --dst-type local --dport 8080 --to 172.17.0.2:80",
            ]
        );
        assert!(i.warnings.is_empty(), "{:?}", i.warnings);
    }

    #[test]
    fn statistic_ladders_become_one_rule_with_backends() {
        // By hand, random: a third, then half of the rest, then the rest: equal weights.
        let i = ok(
            "-A PREROUTING -p tcp --dport 80 -m statistic --mode random --probability 0.33333 -j DNAT --to-destination 10.0.2.2:8080\n\
                    -A PREROUTING -p tcp --dport 80 -m statistic --mode random --probability 0.5 -j DNAT --to-destination 10.0.2.3:8080\n\
                    -A PREROUTING -p tcp --dport 80 -j DNAT --to-destination 10.0.2.4:8080\n",
        );
        assert_eq!(
            i.rules.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["dnat -p tcp --dport 80 --to 10.0.2.2:8080,10.0.2.3:8080,10.0.2.4:8080"]
        );
        // nth: every 3rd, then every 2nd of the rest; and unequal shares become weights.
        let i = ok("-A PREROUTING -m statistic --mode nth --every 3 --packet 0 -j DNAT --to-destination 10.0.2.2\n\
                    -A PREROUTING -m statistic --mode nth --every 2 --packet 0 -j DNAT --to-destination 10.0.2.3\n\
                    -A PREROUTING -j DNAT --to-destination 10.0.2.4\n\
                    -A PREROUTING -p udp -m statistic --mode random --probability 0.75 -j DNAT --to-destination 10.0.3.2\n\
                    -A PREROUTING -p udp -j DNAT --to-destination 10.0.3.3\n");
        let texts: Vec<String> = i.rules.iter().map(ToString::to_string).collect();
        assert!(texts.contains(&"dnat --to 10.0.2.2,10.0.2.3,10.0.2.4".to_string()), "{texts:?}");
        assert!(texts.contains(&"dnat -p udp --to 10.0.3.2@3,10.0.3.3".to_string()), "{texts:?}");
        // A statistic line that does not start a ladder is refused: imported alone it would take every connection.
        for (text, line) in [
            ("-A PREROUTING -m statistic --mode random --probability 0.5 -j DNAT --to-destination 10.0.2.2\n", 1),
            (
                "-A PREROUTING -m statistic --mode random --probability 0.5 -j DNAT --to-destination 10.0.2.2\n\
                 -A PREROUTING -p tcp -j DNAT --to-destination 10.0.2.3\n",
                1,
            ),
        ] {
            let e = err(text);
            assert_eq!(e.line_no, line, "{e}");
            assert!(e.message.contains("must start a ladder"), "{e}");
        }
        let e = err("-A PREROUTING -p tcp -m statistic --mode random --probability 0.5 -j REDIRECT --to-ports 80\n");
        assert!(e.message.contains("-j DNAT"), "{e}");
    }

    #[test]
    fn user_chains_name_what_they_cannot_convert() {
        let text = "*nat\n:WEB - [0:0]\n-A PREROUTING -p tcp -j WEB\n-A WEB -s 10.0.0.0/8 -p udp -j RETURN\n\
                    -A WEB --dport 80 -j DNAT --to 10.0.2.2\nCOMMIT\n";
        let i = ok(text);
        assert!(i.rules.is_empty(), "{:?}", i.rules);
        assert!(
            i.warnings.iter().any(|w| w.contains("line 4 (chain WEB, jumped to from line 3)") && w.contains("RETURN")),
            "{:?}",
            i.warnings
        );
        // A positive -i in a chain reached from OUTPUT never matches; a rule the RETURN takes is never reached.
        let text = "*nat\n:L - [0:0]\n-A OUTPUT -j L\n-A L -i eth0 -p tcp --dport 1 -j REDIRECT --to-ports 2\n\
                    -A L -p tcp --dport 3 -j REDIRECT --to-ports 4\nCOMMIT\n";
        let i = ok(text);
        assert_eq!(
            i.rules.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["redirect --local -p tcp --dport 3 --to-port 4"]
        );
        assert!(i.actions.iter().any(|a| a.contains("line 4") && a.contains("never matches")), "{:?}", i.actions);
    }

    #[test]
    fn import_orders_like_iptables() {
        let got = ok("iptables -t nat -A PREROUTING -p tcp --dport 1 -j REDIRECT --to-ports 1\n\
                      iptables -t nat -A PREROUTING -p tcp --dport 2 -j REDIRECT --to-ports 2\n\
                      iptables -t nat -I PREROUTING -p tcp --dport 3 -j REDIRECT --to-ports 3\n\
                      iptables -t nat -I PREROUTING 3 -p tcp --dport 4 -j REDIRECT --to-ports 4\n\
                      iptables -t nat -I PREROUTING 5 -p tcp --dport 5 -j REDIRECT --to-ports 5\n");
        let ports: Vec<u16> = got.rules.iter().map(|r| r.dport.unwrap().lo).collect();
        assert_eq!(ports, [3, 1, 4, 2, 5]);
        // No jump into PFWD-PREROUTING: its rules come after PREROUTING's.
        let got = ok("*nat\n-A PFWD-PREROUTING -p tcp --dport 1 -j REDIRECT --to-ports 1\n\
                      -A PREROUTING -p tcp --dport 2 -j REDIRECT --to-ports 2\nCOMMIT\n");
        let ports: Vec<u16> = got.rules.iter().map(|r| r.dport.unwrap().lo).collect();
        assert_eq!(ports, [2, 1]);
    }

    #[test]
    fn duplicates_and_precedence_warnings() {
        let got = ok("iptables -t nat -A PREROUTING -p tcp -j DNAT --to 10.0.0.1\n\
                      iptables -t nat -A PREROUTING -p tcp --dport 80 -j DNAT --to 10.0.0.2\n\
                      iptables -t nat -A PREROUTING -p udp --dport 53 -j DNAT --to 10.0.0.3\n\
                      iptables -t nat -A PREROUTING -p tcp --dport 80 -j DNAT --to 10.0.0.2\n\
                      iptables -t nat -A PREROUTING -p tcp --dport 443 -j DNAT --to 10.0.0.1\n\
                      iptables -t nat -A PREROUTING -s 10.9.0.0/16 -p tcp --dport 80 -j DNAT --to 10.0.0.9\n");
        assert_eq!(got.rules.len(), 5);
        assert_eq!(
            got.warnings,
            [
                "line 4: duplicate of line 2 (\"dnat -p tcp --dport 80 --to 10.0.0.2\"); dropped, it could never match",
                "line 2 (\"dnat -p tcp --dport 80 --to 10.0.0.2\") overlaps line 1 (\"dnat -p tcp --to 10.0.0.1\"): \
                 iptables uses line 1 for packets both match, pfwd the more specific line 2",
                "line 6 (\"dnat -p tcp -s 10.9.0.0/16 --dport 80 --to 10.0.0.9\") overlaps line 1 (\"dnat -p tcp --to \
                 10.0.0.1\"): iptables uses line 1 for packets both match, pfwd the more specific line 6",
                "line 6 (\"dnat -p tcp -s 10.9.0.0/16 --dport 80 --to 10.0.0.9\") overlaps line 2 (\"dnat -p tcp \
                 --dport 80 --to 10.0.0.2\"): iptables uses line 2 for packets both match, pfwd the more specific line 6",
            ]
        );
        // Most specific first already: nothing to say.
        let got = ok("iptables -t nat -A PREROUTING -p tcp --dport 80 -j DNAT --to 10.0.0.2\n\
                      iptables -t nat -A PREROUTING -p tcp -j DNAT --to 10.0.0.1\n\
                      iptables -t nat -A PREROUTING -i eth1 -j DNAT --to 10.0.0.3\n\
                      iptables -t nat -A PREROUTING -d 10.1.0.0/16 -j DNAT --to 10.0.0.4\n\
                      iptables -t nat -A PREROUTING -d 10.2.0.0/16 -j DNAT --to 10.0.0.5\n");
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
    }

    #[test]
    fn bookkeeping_is_skipped() {
        let got = ok("iptables -t nat -N PFWD-PREROUTING\n\
                      iptables -t nat -A PREROUTING -i eth0 -j PFWD-PREROUTING\n\
                      iptables -N PFWD-FORWARD\n\
                      iptables -A FORWARD -o eth0 -j PFWD-FORWARD\n\
                      iptables -A PFWD-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
                      iptables -t nat -P PREROUTING ACCEPT\n\
                      iptables -P INPUT ACCEPT\n\
                      iptables -t nat -Z\n");
        assert_eq!(got, Import::default());
        let got = ok("iptables -P FORWARD DROP\niptables -A INPUT -p tcp --dport 22 -j ACCEPT\n");
        assert_eq!(got.warnings.len(), 2);
        assert!(got.warnings[1].starts_with("line 2: not imported (filter table;"), "{:?}", got.warnings);
    }

    #[test]
    fn import_line_rejections() {
        for (line, token, message) in [
            ("iptables -t nat -P PREROUTING", "-P", "iptables: -P requires a chain and a policy"),
            ("iptables -P FORWARD", "-P", "-P requires a chain and a policy"),
            ("iptables -t nat -P PREROUTING DROP", "DROP", "not supported"),
            (
                "iptables -t nat -A OUTPUT -o eth0 -p tcp --dport 80 -j DNAT --to 10.0.2.2:8080",
                "-o",
                "valid iptables, but pfwd does not support -o in OUTPUT",
            ),
            (
                "iptables -t nat -A POSTROUTING -o eth0 -j NETMAP --to 10.9.0.0/16",
                "NETMAP",
                "valid iptables, but pfwd does not support NETMAP yet",
            ),
            ("iptables -t nat -A INPUT -d 10.0.2.2 -j ACCEPT", "INPUT", "nat INPUT rules yet"),
            ("iptables -t nat -A INPUT -j SNAT --to 1.2.3.4", "INPUT", "nat INPUT rules yet"),
            ("iptables -t nat -A prerouting -p tcp -j DNAT --to 10.0.2.2", "prerouting", "case-sensitive"),
            ("iptables -t nat -A DOCKER -p tcp -j DNAT --to 10.0.2.2", "DOCKER", "rules in chain DOCKER"),
            (
                "iptables -A PREROUTING -p tcp --dport 80 -j REDIRECT --to-port 3000",
                "REDIRECT",
                "only valid in the nat table: add -t nat",
            ),
            (
                "iptables -A PREROUTING -p tcp --dport 80 -j ACCEPT",
                "PREROUTING",
                "the filter table has no PREROUTING chain",
            ),
            ("iptables -t nat", "nat", "no command"),
            ("iptables -t nat -A", "-A", "-A needs a chain name"),
            ("iptables -t nat -A PREROUTING -I PREROUTING", "-I", "a second command"),
            ("iptables -t nat -I PREROUTING 0 -p tcp -j DNAT --to 10.0.2.2", "0", "invalid rule number"),
            ("iptables -t nat -I PREROUTING 2 -p tcp -j DNAT --to 10.0.2.2", "2", "Index of insertion too big"),
            ("iptables -t nat -R PREROUTING 1 -p tcp -j DNAT --to 10.0.2.2", "-R", "changes existing rules"),
            ("iptables -t nat -E PFWD-PREROUTING OLD", "-E", "changes existing rules"),
            ("iptables -t nat -D", "-D", "-D needs a chain name"),
            ("iptables -t nat -D PREROUTING", "-D", "-D PREROUTING needs a rule number or a rule"),
            ("iptables -t nat -D PREROUTING 0", "0", "invalid rule number"),
            ("iptables -t nat -D PREROUTING 1 -p tcp", "-p", "give either the number or the rule"),
            ("iptables -t nat -D PREROUTING 1", "1", "iptables: Index of deletion too big. (PREROUTING has no rules"),
            ("iptables -t nat -D INPUT 1", "INPUT", "nat INPUT rules yet"),
            ("iptables -t nat -D PREROUTING -p tcp -j DNAT --to 10.0.2.2", "-D", "iptables: Bad rule (does a matching"),
            ("iptables -t nat -D PREROUTING -p tcp -j ACCEPT", "ACCEPT", "exceptions"),
            ("iptables -t nat -F prerouting", "prerouting", "case-sensitive"),
            ("iptables -t nat -L -n", "-L", "does not add a rule"),
            ("iptables -t nta -A PREROUTING", "nta", "unknown table"),
            ("iptables -t nat -A PREROUTING -6 -p tcp -j DNAT --to 10.0.2.2", "-6", "IPv6"),
            ("ip6tables -t nat -A PREROUTING -p tcp -j DNAT --to 10.0.2.2", "ip6tables", "IPv6"),
            ("sysctl -w net.ipv4.ip_forward=1", "sysctl", "not an iptables command"),
            ("sudo", "sudo", "expected an iptables command"),
            ("iptables -t nat -A PREROUTING -m comment --comment \"oops", "\"", "unterminated quote"),
            ("*natt", "*natt", "unknown table"),
        ] {
            let e = err(&format!("\n{line}\n"));
            assert_eq!((e.line_no, e.token.as_str()), (2, token), "{line}: {e}");
            assert!(e.message.contains(message), "{line}: {e}");
        }
    }

    // ---- deletions and flushes (`import_onto`) ----

    use crate::iptables::tests::{sample, with_id, with_local};

    fn onto(text: &str, existing: &[Rule]) -> Import {
        import_onto(text, existing).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn onto_err(text: &str, existing: &[Rule]) -> ImportError {
        match import_onto(text, existing) {
            Ok(i) => panic!("{text}: accepted: {:?}", i.actions),
            Err(e) => e,
        }
    }

    const P: &str = "iptables -t nat -A PREROUTING";

    #[test]
    fn seed_flush_loop_as_a_script() {
        // The seed's loop deletes PREROUTING's rules by number, last first.
        let text = format!(
            "{P} -p tcp --dport 80 -j DNAT --to-destination 10.0.2.2\n\
             {P} -p tcp --dport 443 -j DNAT --to-destination 10.0.2.3\n\
             {P} -p udp --dport 53 -j REDIRECT --to-ports 5353\n\
             iptables -t nat -D PREROUTING 3\n\
             iptables -t nat -D PREROUTING 2\n\
             iptables -t nat -D PREROUTING 1\n"
        );
        let got = onto(&text, &[]);
        assert_eq!(got, Import { actions: got.actions.clone(), ..Import::default() });
        assert_eq!(
            got.actions,
            [
                "line 4: -D PREROUTING 3: deletes the rule of line 3 (redirect -p udp --dport 53 --to-port 5353)",
                "line 5: -D PREROUTING 2: deletes the rule of line 2 (dnat -p tcp --dport 443 --to 10.0.2.3)",
                "line 6: -D PREROUTING 1: deletes the rule of line 1 (dnat -p tcp --dport 80 --to 10.0.2.2)",
            ]
        );
        // The same through `import`, and one delete too many is iptables' error.
        assert_eq!(ok(&text), got);
        let e = err(&format!("{text}iptables -t nat -D PREROUTING 1\n"));
        assert_eq!((e.line_no, e.token.as_str()), (7, "1"));
        assert_eq!(e.message, "iptables: Index of deletion too big. (PREROUTING has no rules at this line)");
    }

    #[test]
    fn seed_flush_loop_onto_existing_rules() {
        // PREROUTING lists sample()'s rules in precedence order: 4, 5, 1, 3, 2.
        let existing = with_local();
        let got = onto("iptables -t nat -D PREROUTING 2\n", &existing);
        assert_eq!(got.removed, [5]);
        assert_eq!(
            got.actions,
            ["line 1: -D PREROUTING 2: deletes rule 5 (dnat -p udp -s 192.168.1.0/24 --dport 53 --to 10.0.2.3:5353)"]
        );
        assert!(got.rules.is_empty() && got.warnings.is_empty());
        // The whole loop removes exactly the PREROUTING rules, never another hook's.
        let lp = (1..=5).rev().map(|n| format!("iptables -t nat -D PREROUTING {n}\n")).collect::<String>();
        let got = onto(&lp, &existing);
        assert_eq!(got.removed, [1, 2, 3, 4, 5]);
        assert_eq!(got.actions.len(), 5);
        assert!(got.actions[0].starts_with("line 1: -D PREROUTING 5: deletes rule 2 (dnat -d 203.0.113.10"));
        assert!(got.actions[4].starts_with("line 5: -D PREROUTING 1: deletes rule 4 (dnat -i eth0"));
        // One more than there are.
        let e = onto_err(&format!("{lp}iptables -t nat -D PREROUTING 1\n"), &existing);
        assert_eq!((e.line_no, e.token.as_str()), (6, "1"));
        assert!(e.message.starts_with("iptables: Index of deletion too big."), "{e}");
        let e = onto_err("iptables -t nat -D PREROUTING 6\n", &existing);
        assert_eq!(e.message, "iptables: Index of deletion too big. (PREROUTING has 5 rules at this line)");
        // pfwd's chain is the same list; the script's rules come after the existing ones.
        let got = onto(
            &format!("{P} -p tcp --dport 1 -j REDIRECT --to-ports 2\n-D PFWD-PREROUTING 6\n-D PFWD-PREROUTING 5\n"),
            &existing,
        );
        assert_eq!(got.removed, [2]);
        assert_eq!(
            got.actions[0],
            "line 2: -D PFWD-PREROUTING 6: deletes the rule of line 1 (redirect -p tcp --dport 1 --to-port 2)"
        );
        assert!(got.rules.is_empty());
        // -I's position counts the existing rules too, as -D's does: 4, the new rule, 5, 1, 3, 2.
        let text = "iptables -t nat -I PREROUTING 2 -p tcp --dport 1 -j REDIRECT --to-ports 2\n\
                    iptables -t nat -D PREROUTING 1\n\
                    iptables -t nat -D PREROUTING 2\n";
        let got = onto(text, &existing);
        assert_eq!(got.removed, [4, 5]);
        assert_eq!(got.rules, [rule("redirect -p tcp --dport 1 --to-port 2")]);
        let e = onto_err("iptables -t nat -I PREROUTING 7 -p tcp -j DNAT --to 10.0.2.2\n", &existing);
        assert_eq!(e.token, "7");
        assert_eq!(onto("iptables -t nat -I PREROUTING 6 -p tcp -j DNAT --to 10.0.2.2\n", &existing).rules.len(), 1);
    }

    #[test]
    fn delete_multiport_by_index() {
        let existing = [with_id(7, "dnat -p tcp --dport 22 --to 10.0.2.9")];
        let text = format!(
            "{P} -p tcp -m multiport --dports 80,443 -j DNAT --to 10.0.2.2\n\
             {P} -p udp --dport 53 -j REDIRECT --to-ports 5353\n\
             {P} -p tcp --dport 8080 -j REDIRECT --to-ports 80\n\
             iptables -t nat -D PREROUTING 2\n\
             iptables -t nat -D PREROUTING 3\n"
        );
        let got = onto(&text, &existing);
        // Rule 7, the multiport line (one iptables rule), the udp one, the 8080 one: 2 is the multiport line, then 3
        // is the 8080 one.
        assert_eq!(got.rules, [rule("redirect -p udp --dport 53 --to-port 5353")]);
        assert!(got.removed.is_empty());
        assert_eq!(
            got.actions,
            [
                "line 4: -D PREROUTING 2: deletes the rule of line 1 (dnat -p tcp --dport 80 --to 10.0.2.2; dnat -p tcp \
                 --dport 443 --to 10.0.2.2)",
                "line 5: -D PREROUTING 3: deletes the rule of line 3 (redirect -p tcp --dport 8080 --to-port 80)",
            ]
        );
    }

    #[test]
    fn delete_by_rule_spec() {
        let existing = [
            with_id(7, "dnat -p tcp --dport 80 --to 10.0.2.2"),
            with_id(8, "dnat -p tcp --dport 443 --to 10.0.2.2"),
            with_id(9, "dnat -p tcp --dport 22 --to 10.0.2.9"),
            with_id(10, "masquerade -o eth0"),
        ];
        // An existing rule, in the iptables spelling (or pfwd's chain); a script's rule; the first of two copies.
        let text = "iptables -t nat -D PREROUTING -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.2.2\n\
                    iptables -t nat --delete POSTROUTING -o eth0 -j MASQUERADE\n\
                    iptables -t nat -A PREROUTING -p udp --dport 53 -j DNAT --to 10.0.2.3\n\
                    iptables -t nat -A PREROUTING -p udp --dport 54 -j DNAT --to 10.0.2.3\n\
                    iptables -t nat -A PREROUTING -p udp --dport 53 -j DNAT --to 10.0.2.3\n\
                    iptables -t nat -D PFWD-PREROUTING -p udp --dport 53 -j DNAT --to 10.0.2.3\n";
        let got = onto(text, &existing);
        assert_eq!(got.removed, [7, 10]);
        assert_eq!(
            got.actions,
            [
                "line 1: -D PREROUTING <rule>: deletes rule 7 (dnat -p tcp --dport 80 --to 10.0.2.2)",
                "line 2: --delete POSTROUTING <rule>: deletes rule 10 (masquerade -o eth0)",
                "line 6: -D PFWD-PREROUTING <rule>: deletes the rule of line 3 (dnat -p udp --dport 53 --to 10.0.2.3)",
            ]
        );
        // The copy on line 5 remains, and is no duplicate any more.
        assert_eq!(
            got.rules,
            ["dnat -p udp --dport 54 --to 10.0.2.3", "dnat -p udp --dport 53 --to 10.0.2.3"].map(rule)
        );
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
        // A multiport line deletes the rule it added, or the existing rules it was imported as.
        let multi = "-p tcp -m multiport --dports 80,443 -j DNAT --to 10.0.2.2";
        let got = onto(&format!("{P} {multi}\niptables -t nat -D PREROUTING {multi}\n"), &existing);
        assert!(got.removed.is_empty() && got.rules.is_empty());
        let got = onto(&format!("iptables -t nat -D PREROUTING {multi}\n"), &existing);
        assert_eq!(got.removed, [7, 8]);
        assert_eq!(
            got.actions,
            [
                "line 1: -D PREROUTING <rule>: deletes rule 7 (dnat -p tcp --dport 80 --to 10.0.2.2), rule 8 (dnat -p tcp \
              --dport 443 --to 10.0.2.2)"
            ]
        );
        // No such rule: the same target elsewhere, another target, another hook, or already deleted.
        for (text, line_no) in [
            ("iptables -t nat -D PREROUTING -p tcp --dport 81 -j DNAT --to 10.0.2.2\n", 1),
            ("iptables -t nat -D PREROUTING -p tcp --dport 80 -j DNAT --to 10.0.2.3\n", 1),
            ("iptables -t nat -D OUTPUT -p tcp --dport 80 -j DNAT --to 10.0.2.2\n", 1),
            ("iptables -t nat -D PREROUTING -p tcp -m multiport --dports 80,444 -j DNAT --to 10.0.2.2\n", 1),
            (
                "iptables -t nat -D PREROUTING -p tcp --dport 80 -j DNAT --to 10.0.2.2\n\
                 iptables -t nat -D PREROUTING -p tcp --dport 80 -j DNAT --to 10.0.2.2\n",
                2,
            ),
        ] {
            let e = onto_err(text, &existing);
            assert_eq!((e.line_no, e.token.as_str()), (line_no, "-D"), "{text}");
            assert_eq!(e.message, "iptables: Bad rule (does a matching rule exist in that chain?)");
        }
        // pfwd's own jump: nothing to do.
        let got = onto("iptables -t nat -D PREROUTING -i eth0 -j PFWD-PREROUTING\n", &existing);
        assert_eq!(
            got.actions,
            ["line 1: -D PREROUTING -j PFWD-PREROUTING: nothing to do (pfwd manages the jump into its chain)"]
        );
    }

    #[test]
    fn flush() {
        let existing = with_local();
        // Without a chain: every hook, the script's rules read so far included; later lines add again.
        let text = format!(
            "{P} -p tcp --dport 1 -j REDIRECT --to-ports 2\n\
             iptables -t nat -A POSTROUTING -o wg1 -j MASQUERADE\n\
             iptables -t nat -F\n\
             {P} -p tcp --dport 3 -j REDIRECT --to-ports 4\n"
        );
        let got = onto(&text, &existing);
        assert_eq!(got.removed, (1..=15).collect::<Vec<u32>>());
        assert_eq!(
            got.actions,
            ["line 3: -F: removes rules 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 and the rules of lines 1, 2"]
        );
        assert_eq!(got.rules, [rule("redirect -p tcp --dport 3 --to-port 4")]);
        // One chain: that hook only (pfwd's chain is the same list).
        let got = onto(
            &format!(
                "{P} -p tcp --dport 1 -j REDIRECT --to-ports 2\niptables -t nat --flush POSTROUTING\n-F PFWD-OUTPUT\n"
            ),
            &existing,
        );
        assert_eq!(got.removed, [6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(
            got.actions,
            [
                "line 2: --flush POSTROUTING: removes rules 6, 7, 8, 9, 10",
                "line 3: -F PFWD-OUTPUT: removes rules 11, 12, 13, 14, 15"
            ]
        );
        assert_eq!(got.rules, [rule("redirect -p tcp --dport 1 --to-port 2")]);
        let got = onto("iptables -t nat -F PREROUTING\n", &sample());
        assert_eq!(
            (got.removed, got.actions),
            (vec![1, 2, 3, 4, 5], vec!["line 1: -F PREROUTING: removes rules 1, 2, 3, 4, 5".to_string()])
        );
        // Nothing there; a chain pfwd keeps nothing in; a flushed script rule.
        let got = onto(
            &format!(
                "iptables -t nat -F\niptables -t nat -F INPUT\n{P} -p tcp --dport 1 -j REDIRECT --to-ports 2\n-F PREROUTING\n"
            ),
            &[],
        );
        assert_eq!(
            got.actions,
            [
                "line 1: -F: nothing to remove",
                "line 2: -F INPUT: nothing to do (pfwd keeps no rules in INPUT)",
                "line 4: -F PREROUTING: removes the rule of line 3",
            ]
        );
        assert!(got.rules.is_empty() && got.removed.is_empty());
        // Other tables: skipped as before.
        let got = onto("iptables -F\niptables -t filter -F FORWARD\niptables -t mangle -X\n", &existing);
        assert_eq!(got, Import::default());
        let got = onto("iptables -D FORWARD 1\n", &existing);
        assert!(got.removed.is_empty() && got.actions.is_empty());
        assert!(got.warnings[0].starts_with("line 1: not imported (filter table;"), "{:?}", got.warnings);
    }

    #[test]
    fn delete_chain_is_a_note() {
        let text = format!(
            "{P} -p tcp --dport 1 -j REDIRECT --to-ports 2\niptables -t nat -X\n--delete-chain PFWD-PREROUTING\n"
        );
        let got = onto(&text, &sample());
        assert_eq!(
            got.actions,
            [
                "line 2: -X: nothing to do (pfwd keeps no user chains)",
                "line 3: --delete-chain PFWD-PREROUTING: nothing to do (pfwd keeps no user chains)",
            ]
        );
        assert_eq!(got.rules.len(), 1);
        assert!(got.removed.is_empty());
    }

    #[test]
    fn deletions_in_a_dump_and_what_remains() {
        // pfwd's chain sits where PREROUTING jumps to it, for -D N as for the order.
        let dump = "*nat\n\
                    -A PREROUTING -p tcp --dport 1 -j REDIRECT --to-ports 1\n\
                    -A PREROUTING -j PFWD-PREROUTING\n\
                    -A PREROUTING -p tcp --dport 2 -j REDIRECT --to-ports 2\n\
                    -A PFWD-PREROUTING -p tcp --dport 3 -j REDIRECT --to-ports 3\n\
                    -D PREROUTING 2\n\
                    COMMIT\n";
        let got = ok(dump);
        let ports: Vec<u16> = got.rules.iter().map(|r| r.dport.unwrap().lo).collect();
        assert_eq!(ports, [1, 2]);
        // Duplicates and precedence warnings only about what remains.
        let got = ok(&format!(
            "{P} -p tcp -j DNAT --to 10.0.0.1\n\
             {P} -p tcp --dport 80 -j DNAT --to 10.0.0.2\n\
             {P} -p tcp --dport 80 -j DNAT --to 10.0.0.2\n\
             iptables -t nat -D PREROUTING 1\n\
             iptables -t nat -D PREROUTING 1\n"
        ));
        assert_eq!(got.rules, [rule("dnat -p tcp --dport 80 --to 10.0.0.2")]);
        assert!(got.warnings.is_empty(), "{:?}", got.warnings);
        // All or nothing: a bad line after deletions fails the import.
        let e =
            onto_err("iptables -t nat -F\niptables -t nat -A PREROUTING -p icmp -j DNAT --to 10.0.0.1\n", &sample());
        assert_eq!((e.line_no, e.token.as_str()), (2, "icmp"));
    }
}
