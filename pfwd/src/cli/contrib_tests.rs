//! The files in contrib/ (systemd unit, container recipe, Kubernetes manifests) checked against pfwd itself: their
//! command lines go through the CLI's own parser, their rules through the config parser, and the manifests agree
//! with each other. Nothing here reaches systemd, a container engine or a cluster (see the README for what was not
//! run); `systemd-analyze verify` runs in tests/tests/serve.rs.

use std::collections::HashMap;

use clap::Parser;
use serde::Deserialize;
use serde_yaml::Value;

use super::{Cli, Cmd};
use crate::rules;

const UNIT: &str = include_str!("../../../contrib/systemd/pfwd.service");
const UNIT_ENV: &str = include_str!("../../../contrib/systemd/pfwd.env");
const EXAMPLE_RULES: &str = include_str!("../../../contrib/systemd/rules.toml");
const CONTAINERFILE: &str = include_str!("../../../contrib/container/Containerfile");
const DAEMONSET: &str = include_str!("../../../contrib/k8s/daemonset.yaml");
const CONFIGMAP: &str = include_str!("../../../contrib/k8s/configmap.yaml");

/// Parses `argv` (without the program name) as `pfwd` would; returns the serve arguments.
#[track_caller]
fn serve_args(argv: &[String]) -> crate::serve::ServeArgs {
    let cli = Cli::try_parse_from(std::iter::once("pfwd".to_string()).chain(argv.iter().cloned()))
        .unwrap_or_else(|e| panic!("pfwd rejects {argv:?}:\n{e}"));
    match cli.cmd {
        Cmd::Serve(s) => s,
        _ => panic!("{argv:?} is not `pfwd serve`"),
    }
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text).map(|d| Value::deserialize(d).expect("valid YAML")).collect()
}

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, key| match key.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[key],
    })
}

fn str_of<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path).as_str().unwrap_or_else(|| panic!("{path} is not a string in {v:?}"))
}

fn seq_of<'a>(v: &'a Value, path: &str) -> &'a Vec<Value> {
    get(v, path).as_sequence().unwrap_or_else(|| panic!("{path} is not a list"))
}

/// The unit's capabilities, which the DaemonSet must grant too.
fn unit_capabilities() -> Vec<String> {
    let line = UNIT.lines().find_map(|l| l.strip_prefix("CapabilityBoundingSet=")).expect("a CapabilityBoundingSet");
    line.split_whitespace().map(|c| c.trim_start_matches("CAP_").to_string()).collect()
}

#[test]
fn systemd_unit_command_line_is_accepted() {
    let env: HashMap<&str, &str> = UNIT_ENV
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_once('=').expect("KEY=VALUE"))
        .collect();
    let exec = UNIT.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("an ExecStart");
    // systemd: an unbraced $VAR becomes as many words as its value has.
    let mut argv: Vec<String> = vec![];
    for word in exec.split_whitespace().skip(1) {
        match word.strip_prefix('$') {
            Some(var) => argv.extend(env[var].split_whitespace().map(str::to_string)),
            None => argv.push(word.to_string()),
        }
    }
    let s = serve_args(&argv);
    assert_eq!(s.config, std::path::Path::new("/etc/pfwd/rules.toml"));
    assert_eq!(s.ifaces, ["eth0"]);
    assert_eq!(s.metrics, Some("127.0.0.1:9469".parse().unwrap()));
    assert!(!s.detach_on_exit, "by default a stop must leave the data path forwarding");
    assert!(UNIT.contains("\nType=notify\n") && UNIT.contains("\nRestart=on-failure\n"));
    assert!(!rules::parse_config(EXAMPLE_RULES).unwrap().is_empty(), "the example config has a rule");
    for cap in ["BPF", "NET_ADMIN", "PERFMON"] {
        assert!(unit_capabilities().iter().any(|c| c == cap), "the unit lacks CAP_{cap}");
    }
}

#[test]
fn container_command_line_is_accepted() {
    let json_array = |prefix: &str| -> Vec<String> {
        let line = CONTAINERFILE.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("no {prefix}"));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{prefix}{line}: not an exec-form array: {e}"))
    };
    let entry = json_array("ENTRYPOINT ");
    assert_eq!(entry, ["/usr/local/bin/pfwd"]);
    let s = serve_args(&json_array("CMD "));
    assert_eq!(s.config, std::path::Path::new("/etc/pfwd/rules.toml"));
    assert_eq!(s.metrics.map(|m| m.port()), Some(9469));
    assert!(CONTAINERFILE.contains("COPY contrib/systemd/rules.toml /etc/pfwd/rules.toml"));
}

#[test]
fn kubernetes_manifests_parse_and_agree() {
    let docs = yaml_docs(DAEMONSET);
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    assert!(docs.iter().any(|d| d["kind"] == "Namespace" && str_of(d, "metadata.name") == "pfwd"));
    let cm = &yaml_docs(CONFIGMAP)[0];
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(str_of(cm, "metadata.namespace"), str_of(ds, "metadata.namespace"));

    let pod = get(ds, "spec.template.spec");
    assert_eq!(pod["hostNetwork"], true);
    let labels = get(ds, "spec.template.metadata.labels");
    for (k, v) in get(ds, "spec.selector.matchLabels").as_mapping().unwrap() {
        assert_eq!(&labels[k], v, "the selector matches the pod's labels");
    }
    let c = &seq_of(pod, "containers")[0];

    // The command line, with the container's $(VAR)s expanded as the kubelet does, is a valid `pfwd serve`.
    let env: HashMap<&str, &str> = seq_of(c, "env").iter().map(|e| (str_of(e, "name"), str_of(e, "value"))).collect();
    let argv: Vec<String> = seq_of(c, "args")
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            match a.strip_prefix("$(").and_then(|v| v.strip_suffix(')')) {
                Some(var) => env[var].to_string(),
                None => a.to_string(),
            }
        })
        .collect();
    let s = serve_args(&argv);
    let port = s.metrics.expect("--metrics").port();

    // Liveness and scrape annotations point at the metrics port.
    assert_eq!(str_of(c, "livenessProbe.httpGet.path"), "/healthz");
    assert_eq!(get(c, "livenessProbe.httpGet.port").as_u64(), Some(u64::from(port)));
    let ann = get(ds, "spec.template.metadata.annotations");
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"].as_str(), Some(port.to_string().as_str()));
    assert_eq!(ann["prometheus.io/path"], "/metrics");

    // The capabilities the unit has (no privileged container).
    let caps: Vec<&str> = seq_of(c, "securityContext.capabilities.add").iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(caps, unit_capabilities(), "the DaemonSet and the unit grant the same capabilities");
    assert_eq!(get(c, "securityContext.privileged"), &Value::Bool(false));

    // Mounts: bpffs and cgroup2 from the host; the ConfigMap where --config reads.
    let volumes = seq_of(pod, "volumes");
    let volume_of = |mount_path: &str| -> &Value {
        let m = seq_of(c, "volumeMounts")
            .iter()
            .find(|m| str_of(m, "mountPath") == mount_path)
            .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
        volumes.iter().find(|v| v["name"] == m["name"]).unwrap_or_else(|| panic!("no volume {:?}", m["name"]))
    };
    assert_eq!(str_of(volume_of("/sys/fs/bpf"), "hostPath.path"), "/sys/fs/bpf");
    assert_eq!(str_of(volume_of("/sys/fs/cgroup"), "hostPath.path"), "/sys/fs/cgroup");
    let config_dir = s.config.parent().unwrap().to_str().unwrap();
    let file = s.config.file_name().unwrap().to_str().unwrap();
    assert_eq!(str_of(volume_of(config_dir), "configMap.name"), str_of(cm, "metadata.name"));

    // The ConfigMap's file is valid rules.
    let text = cm["data"][file].as_str().unwrap_or_else(|| panic!("the ConfigMap has no {file}"));
    let parsed = rules::parse_config(text).unwrap_or_else(|e| panic!("the ConfigMap's {file} is rejected: {e}"));
    assert!(!parsed.is_empty());
}
