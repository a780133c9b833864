//! The TOML config syntax: `[[rule]]` tables whose fields mirror the CLI options, read through the same
//! [`RuleDraft`] as the CLI, and written back by [`to_config`].

use super::draft::{FIELDS, Field, Kind, RuleDraft, Syntax};
use super::error::{KINDS, RuleError};
use super::model::{Rule, Target, fmt_addr_port, fmt_backends, fmt_net};

const CONFIG_FIELDS: &[&str] = &[
    "id", "kind", "local", "iface", "oface", "proto", "src", "dst", "dst_type", "dport", "to", "to_port", "to_ports",
    "hairpin", "family",
];

/// Parses a config file of `[[rule]]` tables (fields: `kind`, `iface` (dnat, redirect), `oface` (snat, masquerade),
/// `proto`, `src`, `dst`, `dport` (dnat, redirect), `to` for dnat (`ADDR[:PORT]`) and snat (`ADDR[:LO-HI]`),
/// `to_port` for redirect, `to_ports` for masquerade, `hairpin` (dnat), `family` (`"ipv4"` or `"ipv6"`: a rule
/// without addresses is for both otherwise) and an optional `id`). Every rule is validated; duplicates and
/// repeated ids are rejected. Errors name the 1-based `[[rule]]` position and the field.
pub fn parse_config(text: &str) -> Result<Vec<Rule>, RuleError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| RuleError::Toml(e.to_string()))?;
    let mut rules = Vec::new();
    for (key, value) in &table {
        if key != "rule" {
            return Err(RuleError::Toml(format!("unknown top-level key {key:?}; rules go in [[rule]] tables")));
        }
        let Some(array) = value.as_array() else {
            return Err(RuleError::Toml("`rule` must be an array of tables ([[rule]])".into()));
        };
        for (i, item) in array.iter().enumerate() {
            let index = i + 1;
            let Some(t) = item.as_table() else {
                return Err(RuleError::Toml(format!("[[rule]] #{index} is not a table")));
            };
            rules.push(rule_from_table(t).map_err(|(field, e)| RuleError::Config {
                index,
                field,
                error: Box::new(e),
            })?);
        }
    }
    // Hash maps from key to first position, so a 10,000-rule file is checked in linear time (foldhash: with
    // SipHash these two maps were a sixth of reading such a file).
    let (mut by_key, mut by_id) =
        (crate::fasthash::map_with_capacity(rules.len()), crate::fasthash::map_with_capacity(rules.len()));
    for (i, r) in rules.iter().enumerate() {
        let in_rule = |field, error| RuleError::Config { index: i + 1, field, error: Box::new(error) };
        if let Some(j) = by_key.insert(r.dedup_key(), i) {
            return Err(in_rule(None, RuleError::DuplicateInFile(j + 1)));
        }
        if r.id != 0
            && let Some(j) = by_id.insert(r.id, i)
        {
            return Err(in_rule(Some("id"), RuleError::DuplicateId { id: r.id, index: j + 1 }));
        }
    }
    Ok(rules)
}

type FieldError = (Option<&'static str>, RuleError);

/// One `[[rule]]` table as a [`RuleDraft`]: `kind` and `id` are read here, every other key is a [`FIELDS`] entry.
fn rule_from_table(t: &toml::Table) -> Result<Rule, FieldError> {
    if let Some(k) = t.keys().find(|k| !CONFIG_FIELDS.contains(&k.as_str())) {
        let msg = format!("unknown field {k:?}; expected one of {}", CONFIG_FIELDS.join(", "));
        return Err((None, RuleError::Invalid(msg)));
    }
    let kind = match t.get("kind") {
        None => return Err((Some("kind"), RuleError::Invalid(format!("missing; expected {KINDS}")))),
        // Only the lowercase spelling here; iptables' `DNAT` is for the CLI and imports.
        Some(toml::Value::String(k)) if Kind::ALL.iter().any(|x| x.name() == k) => {
            k.parse::<Kind>().map_err(|e| (Some("kind"), e))?
        }
        Some(toml::Value::String(k)) => return Err((Some("kind"), RuleError::BadKind { input: k.clone() })),
        Some(v) => {
            return Err((Some("kind"), RuleError::Invalid(format!("expected a string, got {}", v.type_str()))));
        }
    };
    let mut draft = RuleDraft::new(kind, Syntax::Toml);
    draft.id = match t.get("id") {
        None => None,
        Some(toml::Value::Integer(n)) => {
            Some(u32::try_from(*n).map_err(|_| (Some("id"), RuleError::Invalid(format!("id {n} out of range"))))?)
        }
        Some(v) => {
            return Err((Some("id"), RuleError::Invalid(format!("expected an integer, got {}", v.type_str()))));
        }
    };
    for spec in FIELDS {
        let field = spec.toml;
        let type_error = |want: &str, v: &toml::Value| {
            (Some(field), RuleError::Invalid(format!("expected {want}, got {}", v.type_str())))
        };
        let value = match (t.get(field), spec.field) {
            (None, _) => continue,
            (Some(toml::Value::Boolean(true)), Field::Local) => String::new(),
            (Some(toml::Value::Boolean(false)), Field::Local) => continue,
            (Some(_), Field::Local) => {
                return Err((Some(field), RuleError::Invalid("local must be true or false".into())));
            }
            (Some(toml::Value::String(s)), _) => s.clone(),
            // Several DNAT backends may be a list: `to = ["10.0.2.2:80", "10.0.2.3:80@2"]`.
            (Some(toml::Value::Array(items)), Field::To) => {
                let mut parts = Vec::with_capacity(items.len());
                for v in items {
                    match v {
                        toml::Value::String(s) => parts.push(s.as_str()),
                        v => return Err(type_error("a string or a list of strings", v)),
                    }
                }
                parts.join(",")
            }
            // Ports may be written as integers; they are range-checked by the same parser as strings.
            (Some(toml::Value::Integer(n)), Field::Dport | Field::ToPort | Field::ToPorts) => n.to_string(),
            (Some(v), Field::Dport | Field::ToPort | Field::ToPorts) => {
                return Err(type_error("a number or string", v));
            }
            (Some(v), _) => return Err(type_error("a string", v)),
        };
        draft.set(spec.field, field, &value).map_err(|e| (e.option, e.error))?;
    }
    draft.into_rule().map_err(|e| (e.option, e.error))
}

/// Writes rules in the [`parse_config`] format (ids included when assigned); `parse_config(&to_config(r)) == r`
/// for valid, normalized rules.
pub fn to_config(rules: &[Rule]) -> String {
    // toml's own string formatting does the quoting and escaping.
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut out = String::from("# pfwd rules: each [[rule]] is one rule; fields mirror the CLI flags.\n");
    for r in rules {
        out.push_str("\n[[rule]]\n");
        if r.id != 0 {
            out.push_str(&format!("id = {}\n", r.id));
        }
        out.push_str(&format!("kind = {}\n", q(r.kind_name())));
        if let Some(f) = r.family {
            out.push_str(&format!("family = {}\n", q(f.key())));
        }
        if r.local {
            out.push_str("local = true\n");
        }
        // iptables' negation is a leading `!` in the value.
        let bang = |negated: bool| if negated { "!" } else { "" };
        if let Some(i) = &r.iface {
            out.push_str(&format!("iface = {}\n", q(&format!("{}{i}", bang(r.not.iface)))));
        }
        if let Some(o) = &r.oface {
            out.push_str(&format!("oface = {}\n", q(&format!("{}{o}", bang(r.not.iface)))));
        }
        if let Some(p) = r.proto {
            out.push_str(&format!("proto = {}\n", q(&p.to_string())));
        }
        if let Some(s) = &r.src {
            out.push_str(&format!("src = {}\n", q(&format!("{}{}", bang(r.not.src), fmt_net(s)))));
        }
        if let Some(d) = &r.dst {
            out.push_str(&format!("dst = {}\n", q(&format!("{}{}", bang(r.not.dst), fmt_net(d)))));
        }
        match (r.dst.is_some(), r.dst_local) {
            (true, true) => out.push_str("dst_type = \"local\"\n"),
            (false, true) => out.push_str("dst = \"local\"\n"),
            _ => {}
        }
        match r.dport {
            Some(p) if p.lo == p.hi => out.push_str(&format!("dport = {}\n", p.lo)),
            Some(p) => out.push_str(&format!("dport = {}\n", q(&p.to_string()))),
            None => {}
        }
        match r.target {
            Target::Dnat { .. } if !r.backends.is_empty() => {
                out.push_str(&format!("to = {}\n", q(&fmt_backends(&r.backends))))
            }
            Target::Dnat { addr, port: Some(p) } => {
                out.push_str(&format!("to = {}\n", q(&fmt_addr_port(addr, Some(&p)))))
            }
            Target::Dnat { addr, port: None } => out.push_str(&format!("to = {}\n", q(&addr.to_string()))),
            Target::Redirect { port } => out.push_str(&format!("to_port = {port}\n")),
            Target::Snat { addr, ports: Some(r) } => {
                out.push_str(&format!("to = {}\n", q(&fmt_addr_port(addr, Some(&r)))))
            }
            Target::Snat { addr, ports: None } => out.push_str(&format!("to = {}\n", q(&addr.to_string()))),
            Target::Masquerade { ports: Some(r) } => out.push_str(&format!("to_ports = {}\n", q(&r.to_string()))),
            Target::Masquerade { ports: None } => {}
        }
        if let Some(h) = &r.hairpin {
            out.push_str(&format!("hairpin = {}\n", q(&fmt_net(h))));
        }
    }
    out
}

#[cfg(test)]
mod tests {

    use crate::rules::tests::*;
    use crate::rules::*;

    const SEED_TOML: &str = r#"
# each [[rule]] is one rule; fields mirror the CLI flags
[[rule]]
kind = "redirect"
proto = "tcp"
dport = "59999"
to_port = 80

[[rule]]
kind = "redirect"
proto = "tcp"
dport = 80
to_port = 3000

[[rule]]
kind = "dnat"
iface = "eth0"
proto = "tcp"
dport = 59999
to = "127.0.0.1:17355"

[[rule]]
kind = "dnat"
proto = "tcp"
dport = 2222
to = "192.168.50.7:22"

[[rule]]
kind = "dnat"
proto = "udp"
src = "192.168.1.1"
dport = 53
to = "10.0.0.53"

[[rule]]
kind = "dnat"
proto = "tcp"
src = "192.168.1.0/24"
dport = 443
to = "10.0.0.3:8443"

[[rule]]
kind = "dnat"
proto = "tcp"
dst = "203.0.113.10"
dport = 80
to = "10.0.0.4"

[[rule]]
kind = "dnat"
proto = "tcp"
dst = "203.0.113.0/24"
dport = 80
to = "10.0.0.5"

[[rule]]
kind = "dnat"
dst = "203.0.113.20"
to = "10.0.0.6"

[[rule]]
kind = "dnat"
proto = "tcp"
dport = "8000-8099"
to = "10.0.0.7:9000"

[[rule]]
kind = "dnat"
proto = "udp"
dport = "8000:8099"
to = "10.0.0.7"

[[rule]]
kind = "dnat"
iface = "eth0"
proto = "tcp"
src = "192.168.1.0/24"
dst = "203.0.113.10"
dport = 59999
to = "127.0.0.1:17355"
"#;

    const SEED_CLI: &[&str] = &[
        "redirect -p tcp --dport 59999 --to-port 80",
        "redirect -p tcp --dport 80 --to-port 3000",
        "dnat -i eth0 -p tcp --dport 59999 --to 127.0.0.1:17355",
        "dnat -p tcp --dport 2222 --to 192.168.50.7:22",
        "dnat -p udp -s 192.168.1.1 --dport 53 --to 10.0.0.53",
        "dnat -p tcp -s 192.168.1.0/24 --dport 443 --to 10.0.0.3:8443",
        "dnat -p tcp -d 203.0.113.10 --dport 80 --to 10.0.0.4",
        "dnat -p tcp -d 203.0.113.0/24 --dport 80 --to 10.0.0.5",
        "dnat -d 203.0.113.20 --to 10.0.0.6",
        "dnat -p tcp --dport 8000-8099 --to 10.0.0.7:9000",
        "dnat -p udp --dport 8000-8099 --to 10.0.0.7",
        "dnat -i eth0 -p tcp -s 192.168.1.0/24 -d 203.0.113.10 --dport 59999 --to 127.0.0.1:17355",
    ];

    #[test]
    fn toml_seed_cases() {
        let rules = parse_config(SEED_TOML).unwrap();
        let shown: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(shown, SEED_CLI);
        let from_cli: Vec<Rule> = SEED_CLI.iter().map(|s| ok(s)).collect();
        assert_eq!(rules, from_cli);
        // Spot-check the decoded values, not just their printing.
        assert_eq!(rules[0].target, Target::Redirect { port: 80 });
        assert_eq!(rules[0].dport, Some(PortRange::single(59999)));
        assert_eq!(rules[2].target, Target::Dnat { addr: ip("127.0.0.1"), port: Some(17355) });
        assert_eq!(rules[4].src, Some(net("192.168.1.1/32")));
        assert_eq!(rules[8].proto, None);
        assert_eq!(rules[10].target, Target::Dnat { addr: ip("10.0.0.7"), port: None });
        // And back out.
        assert_eq!(parse_config(&to_config(&rules)).unwrap(), rules);
        assert_eq!(parse_config("").unwrap(), vec![]);
        assert_eq!(parse_config("# nothing yet\n").unwrap(), vec![]);
    }

    #[test]
    fn toml_round_trip_property() {
        let mut rng = Rng(42);
        for _ in 0..50 {
            let mut rules: Vec<Rule> = Vec::new();
            for _ in 0..40 {
                let mut r = random_rule(&mut rng);
                r.id = rules.len() as u32 + if rng.chance(50) { 1 } else { 0 } * 1000;
                if !rules.iter().any(|o| o.same_match_and_target(&r) || (r.id != 0 && o.id == r.id)) {
                    rules.push(r);
                }
            }
            let text = to_config(&rules);
            assert_eq!(parse_config(&text).unwrap_or_else(|e| panic!("{e}\n{text}")), rules);
        }
    }

    #[test]
    fn toml_errors_name_rule_and_field() {
        let one = |body: &str| parse_config(&format!("[[rule]]\nkind = \"dnat\"\nto = \"10.0.0.1\"\n[[rule]]\n{body}"));
        for (body, want) in [
            ("kind = \"dnat\"\nprot = \"tcp\"\nto = \"1.2.3.4\"", "[[rule]] #2: unknown field \"prot\""),
            (
                "kind = \"dnat\"\nproto = \"tcp\"\ndport = 0\nto = \"1.2.3.4\"",
                "[[rule]] #2, field dport: bad port range \"0\"",
            ),
            (
                "kind = \"dnat\"\nproto = \"tcp\"\ndport = 70000\nto = \"1.2.3.4\"",
                "field dport: bad port range \"70000\"",
            ),
            (
                "kind = \"dnat\"\nproto = \"tcp\"\ndport = \"9-1\"\nto = \"1.2.3.4\"",
                "field dport: bad port range \"9-1\"",
            ),
            (
                "kind = \"dnat\"\nproto = \"tcp\"\ndport = 1.5\nto = \"1.2.3.4\"",
                "field dport: expected a number or string, got float",
            ),
            (
                "kind = \"dnat\"\nsrc = \"10.0.0.300/24\"\nto = \"1.2.3.4\"",
                "[[rule]] #2, field src: bad CIDR \"10.0.0.300/24\"",
            ),
            ("kind = \"dnat\"\ndst = 5\nto = \"1.2.3.4\"", "field dst: expected a string, got integer"),
            ("kind = \"dnat\"\niface = \"a/b\"\nto = \"1.2.3.4\"", "field iface: bad interface name \"a/b\""),
            ("kind = \"dnat\"\nproto = \"icmp\"\nto = \"1.2.3.4\"", "field proto: bad protocol \"icmp\""),
            ("proto = \"tcp\"\nto = \"1.2.3.4\"", "[[rule]] #2, field kind: missing"),
            ("kind = \"netmap\"\nto = \"1.2.3.4\"", "field kind: bad rule kind \"netmap\""),
            ("kind = \"dnat\"\nproto = \"tcp\"", "field to: dnat needs to = \"ADDR[:PORT]\""),
            ("kind = \"dnat\"\nto = \"1.2.3.4:80\"", "[[rule]] #2: --to with a port needs -p tcp or -p udp"),
            ("kind = \"dnat\"\nto = \"1.2.3.4\"\nto_port = 80", "field to_port: to_port is for redirect"),
            ("kind = \"redirect\"\nproto = \"tcp\"", "field to_port: redirect needs to_port = PORT"),
            ("kind = \"redirect\"\nproto = \"tcp\"\nto_port = 0", "field to_port: bad port \"0\""),
            ("kind = \"redirect\"\nproto = \"tcp\"\nto = \"1.2.3.4\"", "field to: to is for dnat"),
            ("kind = \"redirect\"\ndport = 80\nto_port = 3000", "[[rule]] #2: --dport needs -p tcp or -p udp"),
            ("kind = \"redirect\"\nto_port = 3000", "[[rule]] #2: redirect needs -p tcp or -p udp"),
            ("kind = \"dnat\"\nto = \"10.0.0.1\"", "[[rule]] #2: duplicate of [[rule]] #1"),
            ("kind = \"dnat\"\nto = \"10.0.0.2\"\nid = -1", "field id: id -1 out of range"),
        ] {
            let e = one(body).unwrap_err().to_string();
            assert!(e.contains(want), "{body:?}: got {e:?}, want {want:?}");
        }
        let e = parse_config(
            "[[rule]]\nid = 5\nkind = \"dnat\"\nto = \"10.0.0.1\"\n[[rule]]\nid = 5\nkind = \"dnat\"\nto = \"10.0.0.2\"\n",
        );
        assert_eq!(e.unwrap_err().to_string(), "[[rule]] #2, field id: id 5 is already used by [[rule]] #1");
        assert!(parse_config("[[rule]\n").unwrap_err().to_string().starts_with("bad TOML"));
        assert!(parse_config("rules = 1\n").unwrap_err().to_string().contains("unknown top-level key \"rules\""));
        assert!(parse_config("rule = 1\n").unwrap_err().to_string().contains("array of tables"));
    }

    const SNAT_TOML: &str = r#"
[[rule]]
kind = "snat"
oface = "eth1"
proto = "tcp"
src = "10.0.2.0/24"
to = "203.0.113.5:20000-20099"

[[rule]]
kind = "snat"
dst = "198.51.100.0/24"
to = "203.0.113.6"

[[rule]]
kind = "masquerade"
oface = "eth1"

[[rule]]
kind = "masquerade"
oface = "eth1"
proto = "udp"
to_ports = "1024-1027"

[[rule]]
kind = "masquerade"
proto = "tcp"
to_ports = 5000
"#;

    #[test]
    fn toml_snat_masquerade() {
        let rules = parse_config(SNAT_TOML).unwrap();
        let shown: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            shown,
            [
                "snat -o eth1 -p tcp -s 10.0.2.0/24 --to 203.0.113.5:20000-20099",
                "snat -d 198.51.100.0/24 --to 203.0.113.6",
                "masquerade -o eth1",
                "masquerade -o eth1 -p udp --to-ports 1024-1027",
                "masquerade -p tcp --to-ports 5000",
            ]
        );
        assert_eq!(rules[4].target, Target::Masquerade { ports: Some(PortRange::single(5000)) });
        let text = to_config(&rules);
        assert!(text.contains("kind = \"snat\"\noface = \"eth1\"\n"), "{text}");
        assert!(text.contains("to = \"203.0.113.5:20000-20099\"\n") && text.contains("to_ports = \"1024-1027\"\n"));
        assert_eq!(parse_config(&text).unwrap(), rules);

        let one = |body: &str| parse_config(&format!("[[rule]]\nkind = \"masquerade\"\n[[rule]]\n{body}"));
        for (body, want) in [
            (
                "kind = \"snat\"\niface = \"eth0\"\nto = \"1.2.3.4\"",
                "[[rule]] #2, field iface: iface does not apply to snat; SNAT happens where packets leave: use oface",
            ),
            (
                "kind = \"dnat\"\noface = \"eth1\"\nto = \"1.2.3.4\"",
                "field oface: oface does not apply to dnat; DNAT happens where packets arrive: use iface",
            ),
            ("kind = \"snat\"\noface = \"a/b\"\nto = \"1.2.3.4\"", "field oface: bad interface name \"a/b\""),
            ("kind = \"snat\"\nproto = \"tcp\"", "field to: snat needs to = \"ADDR[:LO-HI]\""),
            ("kind = \"snat\"\nto = \"1.2.3.4:80-90\"", "[[rule]] #2: --to with a port needs -p tcp or -p udp"),
            ("kind = \"snat\"\nto = \"1.2.3.4\"\nto_ports = \"1-2\"", "field to_ports: to_ports is for masquerade"),
            ("kind = \"masquerade\"\nto = \"1.2.3.4\"", "field to: to is for dnat and snat; masquerade takes to_ports"),
            ("kind = \"masquerade\"\nproto = \"tcp\"\nto_port = 80", "field to_port: to_port is for redirect"),
            ("kind = \"masquerade\"\nto_ports = \"1024-1027\"", "[[rule]] #2: --to-ports needs -p tcp or -p udp"),
            ("kind = \"masquerade\"\nproto = \"tcp\"\nto_ports = \"9-1\"", "field to_ports: bad port range \"9-1\""),
            ("kind = \"dnat\"\nproto = \"tcp\"\nto = \"1.2.3.4\"\nto_ports = 80", "field to_ports: to_ports is for"),
            ("kind = \"masquerade\"", "[[rule]] #2: duplicate of [[rule]] #1"),
        ] {
            let e = one(body).unwrap_err().to_string();
            assert!(e.contains(want), "{body:?}: got {e:?}, want {want:?}");
        }
    }
}
