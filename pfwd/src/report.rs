//! What `pfwd status`, `pfwd list` and `pfwd conntrack` report, as typed values: [`control`](crate::control) and
//! [`fallback`](crate::fallback) fill them in, `--json` serializes them and the human output in [`cli`](crate::cli)
//! reads their fields.
//!
//! The JSON is a stable interface (scripts and the end-to-end tests read it by key), so the field names, the nesting
//! and null versus absent are fixed by these types. Fields are declared in alphabetical order because that is the
//! order the output has always had (it used to be built with `serde_json::json!`, whose objects sort their keys);
//! the one exception is a status rule, whose counters follow its fields as a group.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use ipnet::IpNet;
use serde::{Serialize, Serializer};

use crate::{
    rules::{Negated, Rule, Target},
    state::{DataPath, SavedSysctl},
};

/// `pfwd status`: nothing when pfwd is not attached in this namespace, else everything about the instance.
#[derive(Debug, Clone)]
pub enum Status {
    NotAttached,
    Attached(Box<InstanceStatus>),
}

impl Status {
    /// The data path in use, when attached.
    pub fn mode(&self) -> Option<DataPath> {
        match self {
            Status::NotAttached => None,
            Status::Attached(s) => Some(s.mode),
        }
    }
}

/// Both shapes carry `"attached"`; not attached, the object still has empty `interfaces` and `rules`, a null `mode`
/// and a zero conntrack summary, so readers need not test `attached` before reading those.
impl Serialize for Status {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct WithAttached<'a, T> {
            attached: bool,
            #[serde(flatten)]
            rest: &'a T,
        }
        #[derive(Serialize)]
        struct NotAttached {
            conntrack: ZeroConntrack,
            interfaces: [InterfaceStatus; 0],
            mode: Option<DataPath>,
            rules: [RuleStatus; 0],
        }
        #[derive(Serialize)]
        struct ZeroConntrack {
            entries: u64,
            flows: u64,
        }
        match self {
            Status::NotAttached => {
                let rest = NotAttached {
                    conntrack: ZeroConntrack { entries: 0, flows: 0 },
                    interfaces: [],
                    mode: None,
                    rules: [],
                };
                WithAttached { attached: false, rest: &rest }.serialize(s)
            }
            Status::Attached(st) => WithAttached { attached: true, rest: st.as_ref() }.serialize(s),
        }
    }
}

/// `pfwd status` of an attached instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    pub conntrack: ConntrackSummary,
    /// `--fast-forward` is on (eBPF mode only; always false in iptables mode).
    pub fast_forward: bool,
    /// eBPF mode: how the programs update TCP/UDP checksums (null in the netfilter modes).
    pub l4_checksums: Option<L4Checksums>,
    pub interfaces: Vec<InterfaceStatus>,
    pub mode: DataPath,
    /// Why this mode was chosen.
    pub mode_reason: String,
    /// Set when a change was interrupted (killed) before it finished: what was interrupted and what to do. Absent
    /// otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
    pub netns: Netns,
    /// The bpffs directory of the pinned programs and maps; null in iptables mode.
    pub pin_dir: Option<PathBuf>,
    pub rules: Vec<RuleStatus>,
    /// eBPF mode: the shape of the rule index (absent in iptables mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_engine: Option<RuleEngine>,
    /// The kernel programs' global counters by name (empty in iptables mode).
    pub stats: BTreeMap<String, u64>,
    /// The sysctls pfwd changed, with their earlier values.
    pub sysctls: Vec<SavedSysctl>,
}

/// How the eBPF programs update a translated packet's TCP/UDP (and ICMPv6) checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum L4Checksums {
    /// By hand where the skb is CHECKSUM_NONE or UNNECESSARY, with `bpf_l4_csum_replace` otherwise (README, Design).
    ByHandWhereSafe,
    /// `bpf_l4_csum_replace` for every packet: the kernel lacks `bpf_cast_to_kern_ctx` or `sk_buff.ip_summed` in
    /// its BTF; or the instance was attached by a pfwd older than this field (2026-12-04), whose record says
    /// nothing either way (the one released just before it updates by hand already).
    Helper,
}

/// The eBPF rule index (see README, Design: Rule lookup): what a new flow's first packet walks.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RuleEngine {
    /// The rule generation packets are matched in; every rule change moves it on by one.
    pub generation: u32,
    /// Match shapes (classes) of each hook: a new flow's first packet probes each at most once.
    pub classes: HookClasses,
    /// The most classes a hook may have.
    pub max_classes: u32,
    /// Keys in the rule index (a rule has one per prefix block of its port range).
    pub index_keys: u64,
    /// Of those, the keys of IPv4 and both-family rules, which the IPv4 form of the index (what IPv4 packets probe)
    /// holds too.
    pub index4_keys: u64,
}

/// Classes per hook.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HookClasses {
    pub prerouting: u32,
    pub postrouting: u32,
    pub output: u32,
}

/// The network namespace an instance belongs to.
#[derive(Debug, Clone, Serialize)]
pub struct Netns {
    /// SO_NETNS_COOKIE: never reused.
    pub cookie: u64,
    /// The inode of /proc/self/ns/net, which names the pin and state directories.
    pub inode: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct InterfaceStatus {
    /// The primary IPv4 address now (null when it has none).
    pub address: Option<Ipv4Addr>,
    /// The first global IPv6 address now (null when it has none).
    pub address6: Option<std::net::Ipv6Addr>,
    pub ifindex: u32,
    /// The link type as `ip link` names it (`ether`, `loopback`, `none` for tun/WireGuard, `ppp`...; null while the
    /// interface is gone).
    pub link_type: Option<String>,
    pub name: String,
    /// The XDP fast path's mode on this interface (`native`: in the driver; `generic`: the kernel's fallback hook),
    /// as the kernel reports it; null without `--xdp`.
    pub xdp: Option<crate::loader::XdpRun>,
}

/// One rule as `pfwd list --json` shows it: its fields flattened, and its pfwd syntax.
#[derive(Debug, Clone, Serialize)]
pub struct RuleReport {
    pub dport: Option<String>,
    pub dst: Option<IpNet>,
    /// `--hairpin`'s inside network (absent when the rule has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hairpin: Option<IpNet>,
    pub id: u32,
    pub iface: Option<String>,
    /// dnat, redirect, snat or masquerade.
    pub kind: String,
    pub oface: Option<String>,
    pub proto: Option<String>,
    pub src: Option<IpNet>,
    /// The rule in pfwd's syntax (what `pfwd list` prints).
    pub text: String,
    /// Negated matches (`! -s`, `! -d`, `! -i`/`! -o`): `{"src": true, ...}`; absent when none.
    #[serde(skip_serializing_if = "Negated::is_none")]
    pub not: Negated,
    /// `-d local`: true; absent otherwise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dst_local: bool,
    /// DNAT and SNAT: the new address.
    pub to: Option<IpAddr>,
    /// The one family the rule applies to ("ipv4" or "ipv6"), null for both.
    pub family: Option<crate::rules::model::Family>,
    /// DNAT (when it rewrites the port) and REDIRECT: the new destination port.
    pub to_port: Option<u16>,
    /// SNAT and MASQUERADE: the source port range, when given.
    pub to_ports: Option<String>,
    /// DNAT with several backends: every one (`to` and `to_port` are the first's); absent otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<crate::rules::Backend>,
}

impl From<&Rule> for RuleReport {
    fn from(r: &Rule) -> Self {
        let (to, to_port, to_ports) = match r.target {
            Target::Dnat { addr, port } => (Some(addr), port, None),
            Target::Redirect { port } => (None, Some(port), None),
            Target::Snat { addr, ports } => (Some(addr), None, ports.map(|p| p.to_string())),
            Target::Masquerade { ports } => (None, None, ports.map(|p| p.to_string())),
        };
        Self {
            dport: r.dport.map(|p| p.to_string()),
            dst: r.dst,
            hairpin: r.hairpin,
            id: r.id,
            iface: r.iface.clone(),
            kind: r.kind_name().to_string(),
            oface: r.oface.clone(),
            proto: r.proto.map(|p| p.to_string()),
            src: r.src,
            not: r.not,
            dst_local: r.dst_local,
            text: r.to_string(),
            to,
            family: r.family(),
            to_port,
            to_ports,
            backends: r.backends.clone(),
        }
    }
}

/// One rule as `pfwd status` shows it: the rule and its counters, in one flat object.
#[derive(Debug, Clone, Serialize)]
pub struct RuleStatus {
    #[serde(flatten)]
    pub rule: RuleReport,
    #[serde(flatten)]
    pub counters: Counters,
    /// A rule with several backends: each backend's counters (see [`BackendStatus`]); absent otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backend_counters: Vec<BackendStatus>,
}

/// One backend of a rule with several, in `pfwd status`: the rule's backends in its order, then any backend since
/// removed from the rule that still counted packets (its established flows go on until they end).
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    pub addr: IpAddr,
    pub port: Option<u16>,
    /// Not one of the rule's backends any more.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
    pub bytes: u64,
    /// Flows sent to this backend (eBPF mode; in iptables mode connections, as for the rule).
    pub flows: u64,
    /// Packets to and from this backend (iptables mode: first packets of connections).
    pub packets: u64,
}

impl BackendStatus {
    /// The per-backend lines of a rule: its `backends` with the counters found for them in `counted` (address,
    /// port, counters; a missing one is zero), then the counted backends that are not in the list any more.
    pub fn merge(backends: &[crate::rules::Backend], counted: &[(IpAddr, Option<u16>, Counters)]) -> Vec<Self> {
        let line = |addr, port, c: Counters, removed| BackendStatus {
            addr,
            port,
            removed,
            bytes: c.bytes,
            flows: c.flows,
            packets: c.packets,
        };
        let sum = |addr, port| {
            counted.iter().filter(|(a, p, _)| *a == addr && *p == port).fold(Counters::default(), |s, (_, _, c)| {
                Counters {
                    bytes: s.bytes + c.bytes,
                    drops: s.drops + c.drops,
                    flows: s.flows + c.flows,
                    packets: s.packets + c.packets,
                }
            })
        };
        let mut out: Vec<Self> = backends.iter().map(|b| line(b.addr, b.port, sum(b.addr, b.port), false)).collect();
        for &(a, p, _) in counted {
            if !out.iter().any(|b| b.addr == a && b.port == p) {
                out.push(line(a, p, sum(a, p), true));
            }
        }
        out
    }
}

/// A rule's counters. In iptables mode netfilter consults NAT rules for the first packet of a connection only, so
/// there packets == flows and drops is 0.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counters {
    /// IP bytes translated (both directions).
    pub bytes: u64,
    /// New flows the rule had to drop.
    pub drops: u64,
    /// Flows the rule created.
    pub flows: u64,
    /// Packets translated (both directions).
    pub packets: u64,
}

impl From<pfwd_common::RuleCounters> for Counters {
    fn from(c: pfwd_common::RuleCounters) -> Self {
        Self { bytes: c.bytes, drops: c.drops, flows: c.flows, packets: c.packets }
    }
}

/// The connection-tracking part of `pfwd status`: pfwd's own table in eBPF mode, netfilter's in iptables mode.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ConntrackSummary {
    Ebpf(EbpfConntrack),
    Netfilter(NetfilterConntrack),
}

impl ConntrackSummary {
    /// Live entries (eBPF: two per flow; netfilter: one per connection).
    pub fn entries(&self) -> u64 {
        match self {
            ConntrackSummary::Ebpf(c) => c.entries,
            ConntrackSummary::Netfilter(c) => c.entries,
        }
    }

    /// Live translated flows (None: unknown, the conntrack tool is missing).
    pub fn flows(&self) -> Option<u64> {
        match self {
            ConntrackSummary::Ebpf(c) => Some(c.flows),
            ConntrackSummary::Netfilter(c) => c.flows,
        }
    }

    /// Capacity in entries (None: unknown).
    pub fn capacity(&self) -> Option<u64> {
        match self {
            ConntrackSummary::Ebpf(c) => Some(c.capacity.into()),
            ConntrackSummary::Netfilter(c) => c.capacity,
        }
    }
}

/// pfwd's BPF conntrack: a table of confirmed flows and one of unconfirmed flows (see README, Connection tracking).
#[derive(Debug, Clone, Serialize)]
pub struct EbpfConntrack {
    /// Entries the confirmed table holds at most (two per flow): `--ct-size`.
    pub capacity: u32,
    /// Live (not expired) entries, both directions, of both tables.
    pub entries: u64,
    /// Live flows (original-direction entries) of both tables.
    pub flows: u64,
    /// Flows that saw a reply (TCP: and then the client's ACK): a flood of new flows never evicts them.
    pub confirmed: CtTable,
    /// Flows not yet confirmed (TCP: SYN sent, or SYN-ACK seen and no ACK yet); the ones a flood evicts.
    pub unconfirmed: CtTable,
    /// Kernel memory of all of pfwd's maps.
    pub maps_memory_bytes: u64,
    /// Kernel memory of the two conntrack maps (None when the kernel does not say).
    pub memory_bytes: Option<u64>,
    pub timeouts_s: Timeouts,
}

/// One of the eBPF conntrack's two tables.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CtTable {
    /// Entries the table holds at most (two per flow).
    pub capacity: u32,
    /// Live (not expired) entries.
    pub entries: u64,
    /// Live flows.
    pub flows: u64,
}

/// The idle timeouts of the eBPF conntrack, in seconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timeouts {
    pub other: u32,
    pub tcp_close: u32,
    pub tcp_established: u32,
    pub tcp_syn: u32,
    pub udp: u32,
}

impl From<&pfwd_common::Config> for Timeouts {
    fn from(c: &pfwd_common::Config) -> Self {
        Self {
            other: c.other_timeout,
            tcp_close: c.tcp_close_timeout,
            tcp_established: c.tcp_established_timeout,
            tcp_syn: c.tcp_syn_timeout,
            udp: c.udp_timeout,
        }
    }
}

/// netfilter's conntrack (iptables mode).
#[derive(Debug, Clone, Serialize)]
pub struct NetfilterConntrack {
    /// nf_conntrack_max (None when unreadable).
    pub capacity: Option<u64>,
    /// Every connection netfilter tracks in this namespace.
    pub entries: u64,
    /// The DNATed ones (None when the conntrack tool is missing).
    pub flows: Option<u64>,
    pub note: &'static str,
}

impl NetfilterConntrack {
    pub const NOTE: &str =
        "netfilter conntrack: entries counts every connection in this namespace, flows the DNATed ones";
}

/// One live translation, as `pfwd conntrack` lists it (like `conntrack -L`), in either mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConntrackEntry {
    /// Seconds since the flow started (eBPF mode only: absent in iptables mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_s: Option<f64>,
    /// Seconds until the entry expires unless more packets come (None: unknown).
    pub expires_in_s: Option<f64>,
    /// Seconds since the last packet (eBPF mode only: absent in iptables mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_s: Option<f64>,
    pub nat: Nat,
    /// The flow as its first packet arrived.
    pub original: FlowTuple,
    /// tcp, udp, icmp (or the protocol number).
    pub proto: String,
    /// The reply tuple expected back.
    pub reply: FlowTuple,
    /// The rule that made the translation (None when it has been deleted; in iptables mode the rule whose match and
    /// target explain it, the destination rule first when a connection was translated both ways).
    pub rule: Option<u32>,
    /// The connection state (e.g. ESTABLISHED, UNREPLIED); None when netfilter shows none.
    pub state: Option<String>,
    /// What the original packets are translated to.
    pub translated: FlowTuple,
}

/// Which addresses a translation rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Nat {
    #[serde(rename = "dnat")]
    Dnat,
    #[serde(rename = "snat")]
    Snat,
    /// Both (netfilter only: a DNAT and a MASQUERADE on one connection).
    #[serde(rename = "dnat+snat")]
    DnatSnat,
}

impl Nat {
    pub fn as_str(self) -> &'static str {
        match self {
            Nat::Dnat => "dnat",
            Nat::Snat => "snat",
            Nat::DnatSnat => "dnat+snat",
        }
    }
}

/// Addresses and ports of one direction of a flow; an ICMP echo's identifier stands in for both ports. Fields are
/// None only where netfilter's listing lacks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FlowTuple {
    pub dport: Option<u16>,
    pub dst: Option<IpAddr>,
    pub sport: Option<u16>,
    pub src: Option<IpAddr>,
}

impl<A: crate::loader::CtFamily> From<&pfwd_common::FlowTuple<A>> for FlowTuple {
    fn from(t: &pfwd_common::FlowTuple<A>) -> Self {
        Self { dport: Some(t.dport), dst: Some(t.daddr.ip()), sport: Some(t.sport), src: Some(t.saddr.ip()) }
    }
}

/// The name of an IP protocol number, as conntrack shows it.
pub fn proto_name(p: u8) -> String {
    match p {
        pfwd_common::PROTO_TCP => "tcp".into(),
        pfwd_common::PROTO_UDP => "udp".into(),
        pfwd_common::PROTO_ICMP => "icmp".into(),
        pfwd_common::PROTO_ICMPV6 => "icmpv6".into(),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One rule from a config file's `[[rule]]` table (TOML: the front end least likely to change under this test).
    fn rule(fields: &str) -> Rule {
        crate::rules::parse_config(&format!("[[rule]]\nid = 7\n{fields}")).unwrap().remove(0)
    }

    /// A rule with several backends: `list --json` lists them, `status --json` counts each, and a backend removed
    /// from the rule that still has flows is shown as removed.
    #[test]
    fn backends_in_json() {
        let r = rule("kind = \"dnat\"\nproto = \"tcp\"\ndport = 80\nto = \"10.0.2.2:8080,10.0.2.3:8080@2\"");
        let c = |flows| Counters { bytes: 100 * flows, drops: 0, flows, packets: 2 * flows };
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let counted = [
            (ip("10.0.2.3").into(), Some(8080), c(5)),
            (ip("10.0.2.9").into(), Some(8080), c(1)),
            (ip("10.0.2.3").into(), Some(8080), c(1)),
        ];
        let v = serde_json::to_value(RuleStatus {
            rule: RuleReport::from(&r),
            counters: c(7),
            backend_counters: BackendStatus::merge(&r.backends, &counted),
        })
        .unwrap();
        assert_eq!(
            v["backends"],
            serde_json::json!([{"addr": "10.0.2.2", "port": 8080}, {"addr": "10.0.2.3", "port": 8080, "weight": 2}])
        );
        assert_eq!(
            v["backend_counters"],
            serde_json::json!([
                {"addr": "10.0.2.2", "port": 8080, "bytes": 0, "flows": 0, "packets": 0},
                {"addr": "10.0.2.3", "port": 8080, "bytes": 600, "flows": 6, "packets": 12},
                {"addr": "10.0.2.9", "port": 8080, "removed": true, "bytes": 100, "flows": 1, "packets": 2},
            ])
        );
        // One backend: neither field.
        let one = serde_json::to_value(RuleReport::from(&rule("kind = \"dnat\"\nto = \"10.0.2.2\""))).unwrap();
        assert!(one.get("backends").is_none());
    }

    /// The exact text `--json` printed when it was built with `json!`, key order included.
    #[test]
    fn rule_json_is_unchanged() {
        let r = rule(
            "kind = \"dnat\"\niface = \"eth0\"\nproto = \"tcp\"\nsrc = \"10.9.0.0/24\"\ndport = \"80-90\"\n\
             to = \"10.9.0.1:8080\"",
        );
        assert_eq!(
            serde_json::to_string(&RuleReport::from(&r)).unwrap(),
            r#"{"dport":"80-90","dst":null,"id":7,"iface":"eth0","kind":"dnat","oface":null,"proto":"tcp","#.to_owned()
                + r#""src":"10.9.0.0/24","text":"dnat -i eth0 -p tcp -s 10.9.0.0/24 --dport 80-90 --to "#
                + r#"10.9.0.1:8080","to":"10.9.0.1","family":"ipv4","to_port":8080,"to_ports":null}"#
        );
        // The family: the addresses', a rule's -4/-6, or null for a rule that applies to both.
        let family = |fields: &str| serde_json::to_value(RuleReport::from(&rule(fields))).unwrap()["family"].clone();
        assert_eq!(family("kind = \"masquerade\"\noface = \"eth1\""), serde_json::Value::Null);
        assert_eq!(family("kind = \"masquerade\"\noface = \"eth1\"\nfamily = \"ipv6\""), "ipv6");
        assert_eq!(family("kind = \"masquerade\"\nfamily = \"ipv4\""), "ipv4");
        let r = rule("kind = \"dnat\"\nproto = \"tcp\"\ndst = \"2001:db8::/32\"\nto = \"[2001:db8::2]:8080\"");
        let v = serde_json::to_value(RuleReport::from(&r)).unwrap();
        assert_eq!(
            (&v["family"], &v["dst"], &v["to"], &v["to_port"], &v["text"]),
            (
                &"ipv6".into(),
                &"2001:db8::/32".into(),
                &"2001:db8::2".into(),
                &8080.into(),
                &"dnat -p tcp -d 2001:db8::/32 --to [2001:db8::2]:8080".into()
            )
        );
        let r = rule(
            "kind = \"masquerade\"\noface = \"eth1\"\nproto = \"udp\"\ndst = \"10.8.0.0/16\"\n\
             to_ports = \"2000-3000\"",
        );
        let v = serde_json::to_value(RuleStatus {
            rule: RuleReport::from(&r),
            counters: Counters { bytes: 1, drops: 2, flows: 3, packets: 4 },
            backend_counters: Vec::new(),
        })
        .unwrap();
        assert_eq!(v["kind"], "masquerade");
        assert_eq!(v["to_ports"], "2000-3000");
        assert_eq!(v["dst"], "10.8.0.0/16");
        assert!(v["to"].is_null() && v["to_port"].is_null());
        assert!(v.get("hairpin").is_none(), "only rules with --hairpin have the key");
        assert_eq!(
            (&v["bytes"], &v["drops"], &v["flows"], &v["packets"]),
            (&1.into(), &2.into(), &3.into(), &4.into())
        );
        let r = rule("kind = \"dnat\"\ndst = \"203.0.113.1\"\nto = \"10.0.2.2\"\nhairpin = \"10.0.2.0/24\"");
        let v = serde_json::to_value(RuleReport::from(&r)).unwrap();
        assert_eq!(v["hairpin"], "10.0.2.0/24");
    }

    #[test]
    fn not_attached_status_is_unchanged() {
        assert_eq!(
            serde_json::to_string(&Status::NotAttached).unwrap(),
            r#"{"attached":false,"conntrack":{"entries":0,"flows":0},"interfaces":[],"mode":null,"rules":[]}"#
        );
    }

    #[test]
    fn conntrack_entry_json_is_unchanged() {
        let t = FlowTuple {
            dport: Some(80),
            dst: Some("10.0.0.1".parse().unwrap()),
            sport: Some(4000),
            src: Some("10.0.0.2".parse().unwrap()),
        };
        let mut e = ConntrackEntry {
            age_s: Some(1.5),
            expires_in_s: Some(8.5),
            idle_s: Some(0.25),
            nat: Nat::Dnat,
            original: t,
            proto: "tcp".into(),
            reply: t,
            rule: Some(2),
            state: Some("ESTABLISHED".into()),
            translated: t,
        };
        let tj = r#"{"dport":80,"dst":"10.0.0.1","sport":4000,"src":"10.0.0.2"}"#;
        let want = [
            r#"{"age_s":1.5,"expires_in_s":8.5,"idle_s":0.25,"nat":"dnat","original":"#,
            tj,
            r#","proto":"tcp","reply":"#,
            tj,
            r#","rule":2,"state":"ESTABLISHED","translated":"#,
            tj,
            "}",
        ]
        .concat();
        assert_eq!(serde_json::to_string(&e).unwrap(), want);
        // netfilter's listing: no ages, no rule, maybe no state.
        (e.age_s, e.idle_s, e.rule, e.state, e.nat) = (None, None, None, None, Nat::DnatSnat);
        let v = serde_json::to_value(&e).unwrap();
        assert!(v.get("age_s").is_none() && v.get("idle_s").is_none());
        assert!(v["rule"].is_null() && v["state"].is_null());
        assert_eq!(v["nat"], "dnat+snat");
    }

    #[test]
    fn ebpf_tuple_converts_from_network_order() {
        let t = pfwd_common::Tuple {
            saddr: u32::from_ne_bytes([10, 0, 0, 2]),
            daddr: u32::from_ne_bytes([10, 0, 0, 1]),
            sport: 4000,
            dport: 80,
            proto: pfwd_common::PROTO_TCP,
            _pad: 0,
            _pad2: 0,
        };
        let f = FlowTuple::from(&t);
        assert_eq!(f.src, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(f.dst, Some("10.0.0.1".parse().unwrap()));
        assert_eq!((f.sport, f.dport), (Some(4000), Some(80)));
    }
}
