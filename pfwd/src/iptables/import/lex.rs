//! The import's lexer: `\`-continued lines joined into logical lines, each split into words like sh would (shell
//! commands) or like iptables-restore does (iptables-save lines), and the lexical checks on a word (`iptables-save -c` counters, dashes pasted from word processors, `--opt=value`).

use std::borrow::Cow;

use super::{Res, bad};

/// Joins `\`-continued lines; each logical line keeps the number of its first physical line.
pub(super) fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        let part = if acc.is_empty() { raw.trim() } else { raw.trim_start() };
        // A comment ends at the newline even when it ends in a backslash, as in sh.
        let continued = part.trim_end().strip_suffix('\\').filter(|_| !(acc.is_empty() && part.starts_with('#')));
        match continued {
            Some(body) => {
                acc.push_str(body.trim_end());
                acc.push(' ');
                pending = Some((start, acc));
            }
            None => {
                acc.push_str(part.trim_end());
                out.push((start, acc));
            }
        }
    }
    if let Some((start, acc)) = pending {
        out.push((start, acc.trim_end().to_string()));
    }
    out
}

/// How a line's words are quoted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quoting {
    /// A shell command: `'...'`, `"..."` with sh's backslash escapes, a backslash outside quotes, `#` comments.
    Shell,
    /// An `iptables-save` line, read as `iptables-restore` reads it: only double quotes quote (a backslash escapes the
    /// next character inside them); outside them a backslash, a `'` and a `#` are ordinary characters. iptables-save
    /// prints interface names as they are, so `-o a\b` and `-o x'y` must come back as `a\b` and `x'y`.
    Restore,
}

/// Splits a line like sh does for the cases that occur in iptables scripts: quotes, backslash escapes, and a `#`
/// comment starting a word.
pub(super) fn tokenize(line: &str) -> Res<Vec<Cow<'_, str>>> {
    split_words(line, Quoting::Shell)
}

/// Splits an `iptables-save` line the way `iptables-restore` does (see [`Quoting::Restore`]).
pub(super) fn tokenize_restore(line: &str) -> Res<Vec<Cow<'_, str>>> {
    split_words(line, Quoting::Restore)
}

/// The words of a line, borrowed from it where nothing was unquoted or unescaped.
fn split_words(line: &str, quoting: Quoting) -> Res<Vec<Cow<'_, str>>> {
    let shell = quoting == Quoting::Shell;
    // Nothing that quotes, escapes or comments (the usual iptables-save line): the words are what is between the
    // whitespace, as the loop below would find them, taken from the line as they are (no copy per word).
    if let Some(words) = plain_words(line) {
        return Ok(words);
    }
    let unterminated = |q: &str| bad(q, "unterminated quote");
    let mut tokens = Vec::new();
    let mut cur = String::new();
    let mut in_token = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_token {
                    tokens.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            '#' if shell && !in_token => break,
            '\'' if shell => {
                in_token = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => cur.push(ch),
                        None => return Err(unterminated("'")),
                    }
                }
            }
            '"' => {
                in_token = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            // sh keeps the backslash before other characters; iptables-restore drops it.
                            Some(ch @ ('"' | '\\' | '$' | '`')) if shell => cur.push(ch),
                            Some(ch) if shell => {
                                cur.push('\\');
                                cur.push(ch);
                            }
                            Some(ch) => cur.push(ch),
                            None => return Err(unterminated("\"")),
                        },
                        Some(ch) => cur.push(ch),
                        None => return Err(unterminated("\"")),
                    }
                }
            }
            '\\' if shell => {
                in_token = true;
                if let Some(ch) = chars.next() {
                    cur.push(ch);
                }
            }
            c => {
                in_token = true;
                cur.push(c);
            }
        }
    }
    if in_token {
        tokens.push(cur);
    }
    Ok(tokens.into_iter().map(Cow::Owned).collect())
}

/// The words of a line with nothing that quotes, escapes or comments (the usual iptables-save line), borrowed
/// from it; None for any other line. One pass over the bytes.
fn plain_words(line: &str) -> Option<Vec<Cow<'_, str>>> {
    let mut words = Vec::with_capacity(24);
    let mut start = None;
    for (i, b) in line.bytes().enumerate() {
        match b {
            // char::is_whitespace on ASCII: space and \t..=\r (split_ascii_whitespace leaves out \x0b).
            b' ' | b'\t'..=b'\r' => {
                if let Some(s) = start.take() {
                    words.push(Cow::Borrowed(&line[s..i]));
                }
            }
            b'"' | b'\'' | b'\\' | b'#' | 0x80.. => return None,
            _ => {
                start.get_or_insert(i);
            }
        }
    }
    if let Some(s) = start {
        words.push(Cow::Borrowed(&line[s..]));
    }
    Some(words)
}

/// Whether a line is in `iptables-save` / `iptables-restore` form (`*table`, `:CHAIN`, `COMMIT`, `-A ...`, with or
/// without `[packets:bytes]`) rather than a shell command; decided on its first words, before splitting it.
pub(super) fn is_save_line(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let first = match words.next() {
        Some(w) if is_counters(w) => words.next(),
        w => w,
    };
    first.is_some_and(|w| w.starts_with(['*', ':', '-']) || w == "COMMIT")
}

/// `[packets:bytes]`, the prefix `iptables-save -c` puts on rules.
pub(super) fn is_counters(tok: &str) -> bool {
    tok.strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.split_once(':'))
        .is_some_and(|(p, b)| !p.is_empty() && !b.is_empty() && p.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit()))
}

/// Dashes that word processors and web pages substitute for `-`/`--`.
const FAKE_DASHES: &[(char, &str)] =
    &[('–', "an en dash"), ('—', "an em dash"), ('−', "a minus sign"), ('‐', "a Unicode hyphen")];

/// Rejects `–dport` and friends with the spelling that works.
pub(super) fn check_dashes(tok: &str) -> Res<()> {
    // The fake dashes are all outside ASCII.
    if tok.is_ascii() {
        return Ok(());
    }
    let is_dash = |c: char| c == '-' || FAKE_DASHES.iter().any(|(d, _)| *d == c);
    let lead: String = tok.chars().take_while(|&c| is_dash(c)).collect();
    let Some(&(dash, name)) = lead.chars().find_map(|c| FAKE_DASHES.iter().find(|(d, _)| *d == c)) else {
        return Ok(());
    };
    let rest = &tok[lead.len()..];
    let fix = if rest.chars().count() == 1 { format!("-{rest}") } else { format!("--{rest}") };
    Err(bad(tok, format!("{name} ({dash}) is not an option prefix; use {fix}")))
}
/// `--opt=value` → (`--opt`, `value`); short options never take `=`.
pub(super) fn split_inline(tok: &str) -> (&str, Option<&str>) {
    // Most words are no long option: no search for '=' (this runs several times for every word).
    if !tok.starts_with("--") {
        return (tok, None);
    }
    match tok.split_once('=') {
        Some((name, value)) if name.starts_with("--") => (name, Some(value)),
        _ => (tok, None),
    }
}

#[cfg(test)]
mod tests {
    use crate::iptables::tests::{err, ok, rule};

    #[test]
    fn import_script_with_continuations_and_comments() {
        let text = "#!/bin/sh\n\
                    # forward the web server\n\
                    \n\
                    iptables -t nat -F\n\
                    iptables -t nat -A PREROUTING -i eth0 \\\n\
                    \x20   -p tcp --dport 443 \\\n\
                    \x20   -j DNAT --to-destination 10.0.2.2\n\
                    iptables -t nat -A PREROUTING -p udp --dport 53 -j REDIRECT --to-ports 5353\r\n";
        let got = ok(text);
        let want = [
            rule("dnat -i eth0 -p tcp --dport 443 --to 10.0.2.2"),
            rule("redirect -4 -p udp --dport 53 --to-port 5353"),
        ];
        assert_eq!(got.rules, want);
        // An error in a continued line names its first line and shows it joined.
        let e = err(
            "\niptables -t nat -A PREROUTING \\\n  -p tcp --dport 443 \\\n  -j DNAT --to-destination 10.0.2.2:99999\n",
        );
        assert_eq!((e.line_no, e.token.as_str()), (2, "10.0.2.2:99999"));
        assert_eq!(e.line, "iptables -t nat -A PREROUTING -p tcp --dport 443 -j DNAT --to-destination 10.0.2.2:99999");
    }

    #[test]
    fn error_display() {
        let e = err("# port 80\n\niptables -t nat -A PREROUTING -p tcp –dport 80 -j REDIRECT --to-port 3000\n");
        assert_eq!(
            e.to_string(),
            "line 3: iptables -t nat -A PREROUTING -p tcp –dport 80 -j REDIRECT --to-port 3000: \"–dport\": an en dash \
             (–) is not an option prefix; use --dport"
        );
    }
}
