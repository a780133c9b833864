//! `/metrics` (Prometheus text, OpenMetrics flavour, by `prometheus-client`) and `/healthz`, served with hyper.
//!
//! Every scrape reads the instance as `pfwd status` does and builds a fresh registry from it, so what Prometheus sees
//! is never older than the scrape and the agent keeps no second copy of any counter.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::net::TcpListener;

use super::Agent;
use crate::{
    control,
    report::{ConntrackSummary, InstanceStatus, Status},
};

/// Binds `addr` (an error now, not later) and serves in the background.
pub(super) async fn spawn(addr: SocketAddr, agent: Arc<Agent>) -> Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the metrics address {addr}"))?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    log::warn!("metrics: accept: {e}");
                    continue;
                }
            };
            let agent = agent.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(req, agent.clone()));
                if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                    log::debug!("metrics: connection: {e}");
                }
            });
        }
    });
    Ok(())
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn handle(req: Request<hyper::body::Incoming>, agent: Arc<Agent>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |code: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(code)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    let status =
        || async { tokio::task::spawn_blocking(control::status).await.map_err(anyhow::Error::from).and_then(|s| s) };
    Ok(match req.uri().path() {
        "/metrics" => match status().await.and_then(|s| render(&s, &agent)) {
            Ok(text) => reply(StatusCode::OK, OPENMETRICS, text),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("reading pfwd: {e:#}\n")),
        },
        // Alive means: the instance exists and can be read (a liveness probe restarts an agent whose instance was
        // detached under it, and the restart attaches again).
        "/healthz" => match status().await {
            Ok(Status::Attached(s)) if s.interrupted.is_none() => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            Ok(Status::Attached(s)) => {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{}\n", s.interrupted.unwrap_or_default()))
            }
            Ok(Status::NotAttached) => {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "pfwd is not attached\n".into())
            }
            Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{e:#}\n")),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics or /healthz\n".into()),
    })
}

type Labels = Vec<(String, String)>;

fn counter_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge(reg: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    reg.register(name, help, g);
}

fn counter(reg: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    reg.register(name, help, c);
}

/// The metrics text for one reading of the instance.
pub(crate) fn render(status: &Status, agent: &Agent) -> Result<String> {
    let mut reg = Registry::with_prefix("pfwd");
    gauge(
        &mut reg,
        "attached",
        "1 when pfwd is attached in this network namespace",
        i64::from(status.mode().is_some()),
    );
    counter(
        &mut reg,
        "config_reloads_applied",
        "Config file readings applied (nothing to change included)",
        agent.reloads_applied.load(Ordering::Relaxed),
    );
    counter(
        &mut reg,
        "config_reloads_rejected",
        "Config file readings rejected (the running rules stayed)",
        agent.reloads_rejected.load(Ordering::Relaxed),
    );
    gauge(
        &mut reg,
        "config_ok",
        "1 when the config file as it is now is what runs, 0 after it was rejected",
        i64::from(agent.config_ok.load(Ordering::Relaxed)),
    );
    counter(
        &mut reg,
        "interface_events",
        "Bursts of netlink link/address notifications handled",
        agent.interface_events.load(Ordering::Relaxed),
    );
    if let Status::Attached(s) = status {
        instance(&mut reg, s);
    }
    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

fn instance(reg: &mut Registry, s: &InstanceStatus) {
    reg.register("mode", "The data path in use", Info::new(vec![("mode".to_string(), s.mode.as_str().to_string())]));
    let ifaces = Family::<Labels, Gauge>::default();
    reg.register("interface_attached", "Interfaces pfwd is attached to (1 when the device exists)", ifaces.clone());
    for i in &s.interfaces {
        ifaces
            .get_or_create(&vec![("iface".into(), i.name.clone())])
            .set(i64::from(crate::netif::ifindex(&i.name).is_ok()));
    }
    let packets = counter_family(reg, "rule_packets", "Packets translated by the rule (both directions)");
    let bytes = counter_family(reg, "rule_bytes", "IP bytes translated by the rule (both directions)");
    let flows = counter_family(reg, "rule_flows", "Flows the rule created");
    let drops = counter_family(reg, "rule_drops", "New flows the rule had to drop");
    // Rules with several backends: each backend's share (a removed one while its flows last).
    let backend_packets = counter_family(reg, "backend_packets", "Packets to and from one backend of a rule");
    let backend_bytes = counter_family(reg, "backend_bytes", "IP bytes to and from one backend of a rule");
    let backend_flows = counter_family(reg, "backend_flows", "Flows sent to one backend of a rule");
    for r in &s.rules {
        let labels = vec![("rule".to_string(), r.rule.id.to_string()), ("kind".into(), r.rule.kind.clone())];
        packets.get_or_create(&labels).inc_by(r.counters.packets);
        bytes.get_or_create(&labels).inc_by(r.counters.bytes);
        flows.get_or_create(&labels).inc_by(r.counters.flows);
        drops.get_or_create(&labels).inc_by(r.counters.drops);
        for b in &r.backend_counters {
            let backend = match b.port {
                Some(p) => format!("{}:{p}", b.addr),
                None => b.addr.to_string(),
            };
            let labels = vec![
                ("rule".to_string(), r.rule.id.to_string()),
                ("backend".into(), backend),
                ("removed".into(), b.removed.to_string()),
            ];
            backend_packets.get_or_create(&labels).inc_by(b.packets);
            backend_bytes.get_or_create(&labels).inc_by(b.bytes);
            backend_flows.get_or_create(&labels).inc_by(b.flows);
        }
    }
    gauge(reg, "rules", "Rules in force", s.rules.len() as i64);
    let ct = &s.conntrack;
    gauge(
        reg,
        "conntrack_entries",
        "Live conntrack entries (eBPF: two per flow; iptables: netfilter's, one per connection)",
        ct.entries() as i64,
    );
    if let Some(f) = ct.flows() {
        gauge(reg, "conntrack_flows", "Live translated flows", f as i64);
    }
    if let Some(cap) = ct.capacity() {
        gauge(reg, "conntrack_capacity", "Conntrack capacity in entries", cap as i64);
        let pressure = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        pressure.set(if cap == 0 { 0.0 } else { ct.entries() as f64 / cap as f64 });
        reg.register("conntrack_pressure", "Conntrack entries / capacity (0-1)", pressure);
    }
    if let ConntrackSummary::Ebpf(e) = ct {
        gauge(reg, "maps_memory_bytes", "Kernel memory of pfwd's BPF maps", e.maps_memory_bytes as i64);
    }
    if let Some(e) = &s.rule_engine {
        gauge(reg, "rule_index_keys", "Keys in the eBPF rule index", e.index_keys as i64);
        let classes = Family::<Labels, Gauge>::default();
        reg.register("rule_classes", "Match shapes a new flow's first packet probes, by hook", classes.clone());
        for (hook, n) in
            [("prerouting", e.classes.prerouting), ("postrouting", e.classes.postrouting), ("output", e.classes.output)]
        {
            classes.get_or_create(&vec![("hook".into(), hook.to_string())]).set(i64::from(n));
        }
        gauge(reg, "rule_classes_max", "The most match shapes a hook may have", i64::from(e.max_classes));
    }
    // The data path's own counters (eBPF mode), by name, and the drops and passes among them by reason.
    let events = counter_family(reg, "datapath_events", "The eBPF data path's global counters, by event");
    let drop_reasons = counter_family(reg, "drops", "Packets the eBPF data path dropped, by reason");
    let pass_reasons = counter_family(reg, "passes", "Packets the eBPF data path passed untranslated, by reason");
    let mut new_flows = None;
    for (name, value) in &s.stats {
        events.get_or_create(&vec![("event".into(), name.clone())]).inc_by(*value);
        if let Some(reason) = name.strip_suffix("_drops") {
            drop_reasons.get_or_create(&vec![("reason".into(), reason.to_string())]).inc_by(*value);
        } else if let Some(reason) = name.strip_suffix("_passed") {
            pass_reasons.get_or_create(&vec![("reason".into(), reason.to_string())]).inc_by(*value);
        } else if name == "new_flows" {
            new_flows = Some(*value);
        }
    }
    // iptables mode: netfilter consults NAT rules once per connection, so the rules' flows are the new flows.
    let new_flows = new_flows.unwrap_or_else(|| s.rules.iter().map(|r| r.counters.flows).sum());
    counter(reg, "new_flows", "Flows translated since the instance was created", new_flows);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule with several backends: one series per backend (a removed one marked), in valid text.
    #[test]
    fn backends_have_their_own_series() {
        use crate::report::{
            BackendStatus, Counters, InstanceStatus, NetfilterConntrack, Netns, RuleReport, RuleStatus,
        };
        use crate::state::DataPath;
        let rule = crate::cli::parse_rule(&["dnat", "-p", "tcp", "--to", "10.0.2.2:80,10.0.2.3:80"]).unwrap();
        let c = |flows: u64| Counters { bytes: 100 * flows, drops: 0, flows, packets: 2 * flows };
        let b = |addr: &str, removed: bool, flows: u64| {
            let c = c(flows);
            BackendStatus {
                addr: addr.parse().unwrap(),
                port: Some(80),
                removed,
                bytes: c.bytes,
                flows: c.flows,
                packets: c.packets,
            }
        };
        let status = Status::Attached(Box::new(InstanceStatus {
            conntrack: ConntrackSummary::Netfilter(NetfilterConntrack {
                capacity: Some(1000),
                entries: 3,
                flows: Some(3),
                note: "",
            }),
            fast_forward: false,
            l4_checksums: None,
            interfaces: vec![],
            mode: DataPath::Iptables,
            mode_reason: "test".into(),
            interrupted: None,
            netns: Netns { cookie: 1, inode: 2 },
            pin_dir: None,
            rule_engine: None,
            rules: vec![RuleStatus {
                rule: RuleReport::from(&crate::rules::Rule { id: 7, ..rule }),
                counters: c(3),
                backend_counters: vec![b("10.0.2.2", false, 2), b("10.0.2.3", false, 0), b("10.0.2.9", true, 1)],
            }],
            stats: Default::default(),
            sysctls: vec![],
        }));
        let text = render(&status, &Agent::default()).unwrap();
        for line in [
            "pfwd_backend_flows_total{rule=\"7\",backend=\"10.0.2.2:80\",removed=\"false\"} 2",
            "pfwd_backend_flows_total{rule=\"7\",backend=\"10.0.2.3:80\",removed=\"false\"} 0",
            "pfwd_backend_flows_total{rule=\"7\",backend=\"10.0.2.9:80\",removed=\"true\"} 1",
            "pfwd_backend_packets_total{rule=\"7\",backend=\"10.0.2.2:80\",removed=\"false\"} 4",
            "pfwd_backend_bytes_total{rule=\"7\",backend=\"10.0.2.9:80\",removed=\"true\"} 100",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn not_attached_renders_valid_text() {
        let text = render(&Status::NotAttached, &Agent::default()).unwrap();
        assert!(text.contains("# TYPE pfwd_attached gauge\npfwd_attached 0\n"), "{text}");
        assert!(text.contains("pfwd_config_reloads_rejected_total 0\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
