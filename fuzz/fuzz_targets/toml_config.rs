//! The TOML config (`pfwd apply`/`--config` files): no panic or hang on any text, and whatever it accepts is valid
//! and survives `to_config`: `parse_config(to_config(rules)) == rules`.

#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};
use pfwd::rules::{parse_config, to_config};

const MAX_LEN: usize = 8192;

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.len() > MAX_LEN {
        return Corpus::Reject;
    }
    let Ok(text) = std::str::from_utf8(data) else { return Corpus::Reject };
    let Ok(rules) = parse_config(text) else { return Corpus::Keep };
    for r in &rules {
        r.validate().unwrap_or_else(|e| panic!("{text:?}: accepted an invalid rule {r}: {e}"));
    }
    let config = to_config(&rules);
    let back = parse_config(&config).unwrap_or_else(|e| panic!("input {text:?}\nto_config rejected: {e}\n{config}"));
    assert_eq!(back, rules, "input {text:?}\nto_config:\n{config}");
    Corpus::Keep
});
