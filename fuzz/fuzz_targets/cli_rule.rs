//! The `pfwd add` grammar (clap, then the rule grammar): no panic or hang on any arguments, and an accepted rule is
//! valid and its `Display` (pfwd add syntax) parses back to the same rule.
//!
//! The input is the argument list after `pfwd add`, one argument per line (so arguments may hold spaces).

#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};
use pfwd::cli::parse_rule;

const MAX_LEN: usize = 1024;

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.len() > MAX_LEN {
        return Corpus::Reject;
    }
    let Ok(text) = std::str::from_utf8(data) else { return Corpus::Reject };
    let args: Vec<&str> = text.strip_suffix('\n').unwrap_or(text).split('\n').collect();
    let Ok(rule) = parse_rule(&args) else { return Corpus::Keep };
    rule.validate().unwrap_or_else(|e| panic!("{args:?}: accepted an invalid rule {rule}: {e}"));
    let shown = rule.to_string();
    let again: Vec<&str> = shown.split_whitespace().collect();
    let back = parse_rule(&again).unwrap_or_else(|e| panic!("{args:?} gave {shown:?}, which is rejected: {e}"));
    assert_eq!(back, rule, "{args:?} gave {shown:?}");
    Corpus::Keep
});
