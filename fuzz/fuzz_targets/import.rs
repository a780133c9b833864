//! The iptables importer (`pfwd import`): no panic or hang on any text, and whatever it accepts survives the export
//! round trip: `export_iptables` / `nat_chain_script` of the imported rules imports back to the same rules, in
//! pfwd's precedence order per hook, without warnings.
//!
//! A line `%%` splits the input: the rules imported from the part before it (ids 1, 2, ...) become the running
//! instance's rules for `import_onto` of the part after it (deletions by number and by rule, flushes).

#![no_main]

use libfuzzer_sys::{Corpus, fuzz_target};
use pfwd::iptables::{Import, export_iptables, import, import_onto, nat_chain_script};
use pfwd::rules::{Rule, precedence_order};

/// Inputs above this are not looked at (the importer is linear in the text; big inputs only slow the search).
const MAX_LEN: usize = 8192;

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.len() > MAX_LEN {
        return Corpus::Reject;
    }
    // `pfwd import` reads text (a non-UTF-8 file is an error before the importer sees it).
    let Ok(text) = std::str::from_utf8(data) else { return Corpus::Reject };
    match text.split_once("\n%%\n") {
        None => {
            if let Ok(imported) = import(text) {
                check_import(text, &imported, &[]);
                round_trip(text, &imported.rules);
            }
        }
        Some((before, after)) => {
            let existing = match import(before) {
                Ok(i) => with_ids(&i.rules),
                Err(_) => Vec::new(),
            };
            if let Ok(imported) = import_onto(after, &existing) {
                check_import(after, &imported, &existing);
            }
        }
    }
    Corpus::Keep
});

/// What every successful import promises: rules valid, normalized, without ids and without exact duplicates;
/// `removed` sorted, each once, ids of `existing`.
fn check_import(text: &str, imported: &Import, existing: &[Rule]) {
    for r in &imported.rules {
        assert_eq!(r.id, 0, "{text:?}: {r}");
        r.validate().unwrap_or_else(|e| panic!("{text:?}: imported an invalid rule {r}: {e}"));
        let mut n = r.clone();
        n.normalize();
        assert_eq!(&n, r, "{text:?}: not normalized");
    }
    for (i, a) in imported.rules.iter().enumerate() {
        for b in &imported.rules[i + 1..] {
            assert!(!a.same_match_and_target(b), "{text:?}: duplicate {a}");
        }
    }
    assert!(imported.removed.windows(2).all(|w| w[0] < w[1]), "{text:?}: removed {:?}", imported.removed);
    for id in &imported.removed {
        assert!(existing.iter().any(|r| r.id == *id), "{text:?}: removed {id}, not an existing rule");
    }
}

/// Ids 1, 2, ... in list order, as `pfwd add` would give them.
fn with_ids(rules: &[Rule]) -> Vec<Rule> {
    rules.iter().zip(1..).map(|(r, id)| Rule { id, ..r.clone() }).collect()
}

/// The hook a rule is in, in the importer's output order: PREROUTING, POSTROUTING, OUTPUT (`--local`).
fn hook(r: &Rule) -> u8 {
    match (r.is_postrouting(), r.local) {
        (false, false) => 0,
        (true, _) => 1,
        (false, true) => 2,
    }
}

fn round_trip(text: &str, rules: &[Rule]) {
    let rules = with_ids(rules);
    // The order the importer gives an export: hook by hook, each in precedence order.
    let order = precedence_order(&rules);
    let mut want = Vec::new();
    for h in 0..3 {
        want.extend(order.iter().filter(|&&i| hook(&rules[i]) == h).map(|&i| rules[i].clone()));
    }
    let ifaces = ["eth0".to_string(), "wg0".to_string()];
    for export in [export_iptables(&rules, None), export_iptables(&rules, Some(&ifaces)), nat_chain_script(&rules)] {
        let back = import(&export).unwrap_or_else(|e| panic!("input {text:?}\nexport rejected: {e}\n{export}"));
        let got: Vec<Rule> = back.rules.iter().map(|r| Rule { id: 0, ..r.clone() }).collect();
        let want: Vec<Rule> = want.iter().map(|r| Rule { id: 0, ..r.clone() }).collect();
        let show = |rs: &[Rule]| rs.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(show(&got), show(&want), "input {text:?}\nexport:\n{export}");
        assert_eq!(got, want, "input {text:?}\nexport:\n{export}");
        assert!(back.warnings.is_empty(), "input {text:?}\nexport:\n{export}\nwarnings: {:?}", back.warnings);
    }
}
