//! The import's command parser: the table, the command (`-A`, `-I`, `-D`, `-F`, ...) and its chain, position or policy,
//! found anywhere in a line's words as iptables' getopt finds them; everything else is the rule spec, left to `spec`.

use std::borrow::Cow;

use super::lex::{check_dashes, split_inline};
use super::{Res, bad};
use crate::rules::model::Family;

pub(super) const NAT_TABLE: &str = "nat";
pub(super) const TABLES: &[&str] = &["filter", "nat", "mangle", "raw", "security"];

pub(super) fn check_table(tok: &str, table: &str) -> Res<()> {
    if TABLES.contains(&table) {
        Ok(())
    } else {
        Err(bad(tok, format!("unknown table {table:?} (iptables has {})", TABLES.join(", "))))
    }
}

/// What a line does, by its command option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Command {
    Append,
    Insert,
    Policy,
    NewChain,
    Flush,
    DeleteChain,
    Zero,
    /// `-D CHAIN N` or `-D CHAIN <rule>`.
    Delete,
    /// `-R`, `-E`: replace a rule, rename a chain.
    Modify,
    /// `-L`, `-S`, `-C`: read-only.
    Query,
}

fn command_of(name: &str) -> Option<Command> {
    Some(match name {
        "-A" | "--append" => Command::Append,
        "-I" | "--insert" => Command::Insert,
        "-P" | "--policy" => Command::Policy,
        "-N" | "--new-chain" => Command::NewChain,
        "-F" | "--flush" => Command::Flush,
        "-X" | "--delete-chain" => Command::DeleteChain,
        "-Z" | "--zero" => Command::Zero,
        "-D" | "--delete" => Command::Delete,
        "-R" | "--replace" | "-E" | "--rename-chain" => Command::Modify,
        "-L" | "--list" | "-S" | "--list-rules" | "-C" | "--check" => Command::Query,
        _ => return None,
    })
}

/// A line split into its command and the rule spec that follows.
pub(super) struct Head<'a> {
    pub(super) table: &'a str,
    pub(super) command: Command,
    pub(super) command_tok: &'a str,
    pub(super) chain: Option<&'a str>,
    /// `-I CHAIN N`, `-D CHAIN N`: 1-based.
    pub(super) position: Option<usize>,
    pub(super) policy: Option<&'a str>,
    pub(super) spec: Vec<&'a str>,
}

/// Finds the table, the command and its positional arguments anywhere in the line, like iptables' getopt does.
pub(super) fn parse_head<'a>(args: &'a [Cow<'_, str>], default_table: &'a str, family: Family) -> Res<Head<'a>> {
    let mut table = default_table;
    let mut command: Option<(Command, &str)> = None;
    let (mut chain, mut position, mut policy) = (None, None, None);
    let mut spec = Vec::with_capacity(args.len());
    let positional = |j: usize| args.get(j).map(|a| a.as_ref()).filter(|v| !v.starts_with(['-', '!']));
    let mut i = 0;
    while i < args.len() {
        let tok: &str = &args[i];
        check_dashes(tok)?;
        let (name, inline) = split_inline(tok);
        i += 1;
        match name {
            "-t" | "--table" => {
                let value = inline.or_else(|| positional(i)).ok_or_else(|| bad(tok, "needs a table name (-t nat)"))?;
                if inline.is_none() {
                    i += 1;
                }
                check_table(value, value)?;
                table = value;
            }
            // `-w` takes an optional number of seconds.
            "-w" | "--wait" => {
                if inline.is_none() && positional(i).is_some_and(|v| v.parse::<f64>().is_ok()) {
                    i += 1;
                }
            }
            "-W" | "--wait-interval" => {
                if inline.is_none() && positional(i).is_some() {
                    i += 1;
                }
            }
            "-v" | "--verbose" | "-n" | "--numeric" => {}
            // Each tool takes its own family's flag (which changes nothing) and refuses the other's.
            "-4" | "--ipv4" | "-6" | "--ipv6" => {
                let flag = if name.contains('6') { Family::Ipv6 } else { Family::Ipv4 };
                if flag != family {
                    let (tool, other) = match family {
                        Family::Ipv4 => ("iptables", "ip6tables"),
                        Family::Ipv6 => ("ip6tables", "iptables"),
                    };
                    return Err(bad(tok, format!("{tool} refuses {tok}: {flag} rules are {other} commands")));
                }
            }
            _ => match command_of(name) {
                Some(c) => {
                    if let Some((_, prev)) = command {
                        return Err(bad(tok, format!("a second command after {prev}; give one command per line")));
                    }
                    command = Some((c, tok));
                    chain = inline.or_else(|| positional(i));
                    if inline.is_none() && chain.is_some() {
                        i += 1;
                    }
                    if matches!(c, Command::Insert | Command::Delete)
                        && let Some(n) = positional(i).filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
                    {
                        match n.parse::<usize>() {
                            Ok(n) if n > 0 => position = Some(n),
                            _ => return Err(bad(n, "invalid rule number (iptables counts from 1)")),
                        }
                        i += 1;
                    }
                    if c == Command::Policy {
                        policy = positional(i);
                        if policy.is_some() {
                            i += 1;
                        }
                    }
                }
                None => spec.push(tok),
            },
        }
    }
    let Some((command, command_tok)) = command else {
        let tok = args.last().map_or("", |a| a.as_ref());
        return Err(bad(tok, "no command: expected -A CHAIN or -I CHAIN followed by the rule"));
    };
    match command {
        Command::Policy if chain.is_none() || policy.is_none() => {
            return Err(bad(command_tok, "iptables: -P requires a chain and a policy"));
        }
        Command::Append | Command::Insert | Command::Delete if chain.is_none() => {
            return Err(bad(command_tok, format!("{command_tok} needs a chain name (e.g. {command_tok} PREROUTING)")));
        }
        _ => {}
    }
    Ok(Head { table, command, command_tok, chain, position, policy, spec })
}

/// The target (`-j X`) of a rule spec, found without parsing the rest.
pub(super) fn jump_of<'a>(spec: &[&'a str]) -> Option<&'a str> {
    spec.iter().enumerate().find_map(|(i, t)| match split_inline(t) {
        ("-j" | "--jump", Some(v)) => Some(v),
        ("-j" | "--jump", None) => spec.get(i + 1).copied(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use crate::iptables::tests::{ok, rule};

    #[test]
    fn import_classic_commands() {
        for (line, want) in [
            (
                "iptables -t nat -A PREROUTING -p tcp --dport 59999 -j REDIRECT --to-port 80",
                "redirect -4 -p tcp --dport 59999 --to-port 80",
            ),
            (
                "sudo iptables -t nat -A PREROUTING -i eth0 -p tcp --dport 59999 -j DNAT --to 127.0.0.1:17355",
                "dnat -i eth0 -p tcp --dport 59999 --to 127.0.0.1:17355",
            ),
            (
                "iptables -t nat -I PREROUTING -p tcp -d 198.51.100.7 --dport 80 -j DNAT --to-destination 10.0.2.2:8080",
                "dnat -p tcp -d 198.51.100.7 --dport 80 --to 10.0.2.2:8080",
            ),
            (
                "iptables -t nat -A PREROUTING -s 192.168.1.0/24 -p udp -m udp --dport 8000:8099 -j DNAT --to-destination 10.0.2.2",
                "dnat -p udp -s 192.168.1.0/24 --dport 8000-8099 --to 10.0.2.2",
            ),
            (
                "iptables -t nat -A PREROUTING -d 203.0.113.10 -j DNAT --to 10.0.2.2",
                "dnat -d 203.0.113.10 --to 10.0.2.2",
            ),
            // Path, -w, -t after the command, --opt=value.
            (
                "/usr/sbin/iptables -w -A PREROUTING -t nat -p tcp --dport=80 -j REDIRECT --to-ports=3000",
                "redirect -4 -p tcp --dport 80 --to-port 3000",
            ),
            (
                "sudo -E iptables-nft --wait 5 --table nat --append PREROUTING --in-interface wg0 --protocol TCP \
                 --source 192.168.1.5/24 --destination-port 22 --jump DNAT --to-destination 10.0.2.2:22",
                "dnat -i wg0 -p tcp -s 192.168.1.0/24 --dport 22 --to 10.0.2.2:22",
            ),
            // Quoted comment, -p all, a netmask, a /0 that means "anything".
            (
                "iptables -t nat -A PREROUTING -p tcp --dport 80 -m comment --comment \"web 'front' #1\" -j REDIRECT --to-ports 3000",
                "redirect -4 -p tcp --dport 80 --to-port 3000",
            ),
            (
                "iptables -t nat -A PREROUTING -p all -s 0.0.0.0/0 -d 10.0.0.1/255.255.255.0 -j DNAT --to 10.0.2.2",
                "dnat -d 10.0.0.0/24 --to 10.0.2.2",
            ),
            // A bare iptables-save line: nat is assumed.
            (
                "-A PREROUTING -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 3000",
                "redirect -4 -p tcp --dport 80 --to-port 3000",
            ),
            (
                "iptables -t nat -A PREROUTING -p tcp --dport 80 -j DNAT --to 10.0.2.2:8080   # trailing comment",
                "dnat -p tcp --dport 80 --to 10.0.2.2:8080",
            ),
        ] {
            let got = ok(line);
            assert_eq!(got.rules, vec![rule(want)], "{line}");
            assert!(got.warnings.is_empty(), "{line}: {:?}", got.warnings);
        }
    }
}
