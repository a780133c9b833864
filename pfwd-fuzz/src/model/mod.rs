//! The reference model: what pfwd's tc programs must do with a packet, from the README's documented semantics
//! (Design, Connection tracking, Source NAT), with its own packet parser ([`packet`]), its own rule matching
//! ([`rules`]) and its own NAT state machine (here). It never calls pfwd-ebpf or pfwd's packet code.
//!
//! Where the documented behaviour leaves a choice to the kernel (the SNAT/MASQUERADE port, picked at random within the
//! range), the model checks that the kernel's choice is one of the valid ones and then adopts it as its own state.

pub mod packet;
pub mod rules;

use std::collections::HashMap;

use packet::{
    Addr, CsumField, CsumKind, ETH, FIN, Frag, Ip, L4, Parsed, RST, Rewriter, SYN, TCP, Tuple, UDP, be16, be32,
    csum_fields,
};
use rules::{Action, MRule};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }

    fn other(self) -> Hook {
        match self {
            Hook::Ingress => Hook::Egress,
            Hook::Egress => Hook::Ingress,
        }
    }
}

/// The expected outcome of one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Continues (tcx NEXT) as exactly these bytes (checksum fields compared as "exactly as valid as before").
    Next(Vec<u8>),
    Drop,
}

#[derive(Clone, Debug)]
pub struct Expect {
    pub verdict: Verdict,
    /// What the model did, for reports ("dnat new flow", "malformed: ...", ...).
    pub why: String,
    /// Checksum fields of the packet (compared by value modulo one's-complement zero, not byte for byte).
    pub csums: Vec<CsumField>,
    /// Translated by a flow (new or established, or an ICMP error about one), even if no address changed: a first
    /// fragment's later fragments are then counted as translated.
    pub translated: bool,
}

/// What the kernel did with the packet: needed only to adopt its free choices (the SNAT port).
pub struct Observed<'a> {
    pub dropped: bool,
    pub data: &'a [u8],
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// The tuple this direction's packets are rewritten to.
    xlat: Tuple,
    /// The hook this direction is translated on.
    hook: Hook,
    reply: bool,
    flow: u64,
}

#[derive(Clone, Copy, Debug)]
struct Flow {
    orig: Tuple,
    reply_key: Tuple,
    fin_orig: bool,
    fin_reply: bool,
    rst: bool,
    /// The packets this flow translates at ingress go on to another flow's entry at egress (a full NAT): README
    /// "Connection tracking". Set when this flow or that one is created, never later.
    egress_too: bool,
    /// A packet this flow translated at ingress has passed egress, which settled its NAT there: later ones never
    /// open a flow at egress, and without `egress_too` egress leaves them alone.
    settled: bool,
}

impl Flow {
    /// Closed: FIN both ways, or RST. A SYN may then start the tuple over as a new flow.
    fn closed(&self) -> bool {
        self.rst || (self.fin_orig && self.fin_reply)
    }
}

/// A fragmented datagram as its fragments name it (RFC 791: source, destination, protocol, identification), at one
/// hook: a forwarded datagram crosses both, and is seen at the second as the first put it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DatagramKey {
    src: Addr,
    dst: Addr,
    proto: u8,
    id: u16,
    hook: Hook,
}

impl DatagramKey {
    fn of(ip: &Ip, hook: Hook) -> Self {
        DatagramKey { src: ip.src, dst: ip.dst, proto: ip.proto, id: ip.id, hook }
    }
}

/// What a datagram's first fragment got, which its later fragments get too.
#[derive(Clone, Copy, Debug)]
enum Fate {
    /// Came out with these source and destination addresses (its own when it was not translated); `translated`: by
    /// a flow (its later fragments count as translated, even when no address changes).
    Out {
        src: Addr,
        dst: Addr,
        translated: bool,
    },
    Dropped,
}

/// What tc ingress leaves for tc egress about the packet of a family it has just seen (the kernel's handoff slot,
/// one per family): egress uses it only for the packet it describes, and every packet of the family at either hook
/// empties it.
#[derive(Clone, Copy, Debug)]
struct Handoff {
    /// The packet as it left ingress: tuple, IP identification, total length, TCP flags (0 for others).
    tuple: Tuple,
    id: u16,
    len: usize,
    flags: u8,
    kind: Handed,
}

#[derive(Clone, Copy, Debug)]
enum Handed {
    /// A packet of a flow translated at egress, recorded in its flow at ingress: egress applies `xlat`.
    Known { xlat: Tuple },
    /// A packet ingress translated by its flow (ingress key `key`): once the flow is settled, egress does nothing
    /// unless the flow has `egress_too`, and never opens a flow for it; before, it looks the packet up as without
    /// a handoff and settles the flow.
    Translated { key: Tuple, settled: bool, egress_too: bool },
}

impl Handoff {
    fn new(ip: &Ip, tuple: Tuple, kind: Handed) -> Self {
        Handoff { tuple, id: ip.id, len: ip.end - ETH, flags: tcp_flags(ip), kind }
    }

    /// (Only ever asked of a packet of the slot's family.)
    fn describes(&self, ip: &Ip) -> bool {
        ip.frag == Frag::Whole
            && ip.tuple() == Some(self.tuple)
            && ip.id == self.id
            && ip.end - ETH == self.len
            && tcp_flags(ip) == self.flags
    }
}

fn tcp_flags(ip: &Ip) -> u8 {
    match ip.l4 {
        L4::Tcp { flags, .. } => flags,
        _ => 0,
    }
}

/// The model's connection-tracking table and rules.
#[derive(Default)]
pub struct Model {
    rules: Vec<MRule>,
    table: HashMap<Tuple, Entry>,
    flows: HashMap<u64, Flow>,
    next_flow: u64,
    /// The last first fragment of each datagram. The fuzzer keeps every run well inside the kernel's limits (5 s,
    /// 16,384 datagrams) by starting over often (`Model::reset` with `Instance::reset`), so nothing ages or is
    /// evicted here.
    datagrams: HashMap<DatagramKey, Fate>,
    /// The kernel's fragment counters as they must have grown since the last reset.
    pub frag_counters: FragCounters,
    /// The handoff slots: IPv4's, IPv6's.
    handoff: [Option<Handoff>; 2],
}

/// The fragment counters of pfwd's stats (`pfwd status`), by their names there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragCounters {
    /// fragments_translated: later fragments rewritten like their first.
    pub translated: u64,
    /// fragments_unknown_drops: later fragments dropped, their datagram unknown or its first fragment dropped.
    pub unknown_drops: u64,
    /// fragments_passed: later fragments of unknown datagrams passed (no NAT rules).
    pub passed: u64,
}

/// Default SNAT port range (README: "default 1024-65535").
const DEFAULT_PORTS: (u16, u16) = (1024, 65535);
/// The kernel probes this many ports from a random starting point before it gives up.
const PROBES: u32 = 32;

fn pass(f: &[u8], why: impl Into<String>) -> Expect {
    Expect { verdict: Verdict::Next(f.to_vec()), why: why.into(), csums: vec![], translated: false }
}

fn drop(why: impl Into<String>) -> Expect {
    Expect { verdict: Verdict::Drop, why: why.into(), csums: vec![], translated: false }
}

/// A packet that may start a flow: TCP only with a SYN (no ACK, no RST); UDP and other protocols any packet; ICMP
/// an echo request.
fn opens_flow(ip: &Ip) -> bool {
    match ip.l4 {
        L4::Tcp { flags, .. } => flags & SYN != 0 && flags & (packet::ACK | RST) == 0,
        L4::Udp { .. } | L4::Other => true,
        L4::Echo { request, .. } => request,
        L4::IcmpError { .. } | L4::IcmpOther | L4::Fragment => false,
    }
}

impl Model {
    /// Starts over (empty table) with these rules.
    pub fn reset(&mut self, rules: &[pfwd::rules::Rule]) {
        self.rules = rules.iter().map(MRule::from_rule).collect();
        self.table.clear();
        self.flows.clear();
        self.datagrams.clear();
        self.frag_counters = FragCounters::default();
        self.handoff = [None, None];
    }

    /// Changes the rules in the middle of a stream (README: live flows keep their translation; new flows, and closed
    /// ones that start over, meet the new rules).
    pub fn set_rules(&mut self, rules: &[pfwd::rules::Rule]) {
        self.rules = rules.iter().map(MRule::from_rule).collect();
    }

    pub fn live_flows(&self) -> usize {
        self.flows.len()
    }

    /// The expected outcome of `frame` at `hook`, updating the model's state. `seen` is what the kernel did; the
    /// model reads from it only the free choices it allows (and checks them). An `Err` is a divergence found while
    /// checking such a choice.
    pub fn step(&mut self, hook: Hook, frame: &[u8], seen: &Observed) -> Result<Expect, String> {
        // Every IPv4 or IPv6 frame empties its family's handoff slot, at either hook; only egress uses what it held.
        let family = match (frame.len() >= ETH).then(|| be16(frame, 12)) {
            Some(packet::ETHERTYPE_IPV4) => Some(0),
            Some(packet::ETHERTYPE_IPV6) => Some(1),
            _ => None,
        };
        let held = family.and_then(|f| self.handoff[f].take());
        let held = held.filter(|_| hook == Hook::Egress);
        let ip = match packet::parse(frame) {
            Parsed::NotIp => return Ok(pass(frame, "not IP")),
            Parsed::Malformed(why) if be16(frame, 12) == packet::ETHERTYPE_IPV6 => {
                return Ok(pass(frame, format!("IPv6: malformed: {why}")));
            }
            Parsed::Malformed(why) => return Ok(pass(frame, format!("malformed: {why}"))),
            Parsed::Ipv4(ip) => ip,
            Parsed::Ipv6(ip) => {
                // IPv6 (plain header, TCP or UDP): a flow's packet or a new flow, as IPv4 (own table per family in
                // the kernel; one here, the addresses never clash).
                let mut e = self.datagram(hook, frame, &ip, seen, held)?;
                if matches!(&e.verdict, Verdict::Next(b) if b != frame) {
                    e.csums = csum_fields(&ip);
                }
                e.why = format!("IPv6: {}", e.why);
                return Ok(e);
            }
        };
        let csums = csum_fields(&ip);
        let mut e = match ip.l4 {
            L4::Fragment => self.later_fragment(hook, frame, &ip),
            L4::IcmpError { inner } => self.icmp_error(hook, frame, &ip, &inner),
            _ => self.datagram(hook, frame, &ip, seen, held)?,
        };
        if ip.frag == Frag::First {
            // Its later fragments get what it got: its output addresses, or the drop.
            let fate = match &e.verdict {
                Verdict::Next(out) => {
                    let (src, dst) = (be32(out, ETH + 12) as Addr, be32(out, ETH + 16) as Addr);
                    Fate::Out { src, dst, translated: e.translated }
                }
                Verdict::Drop => Fate::Dropped,
            };
            self.datagrams.insert(DatagramKey::of(&ip, hook), fate);
            e.why = format!("first fragment: {}", e.why);
        }
        if matches!(&e.verdict, Verdict::Next(b) if b != frame) {
            e.csums = csums;
        }
        Ok(e)
    }

    /// Any PREROUTING or POSTROUTING rule: then a fragment of an unknown datagram is dropped on an attached interface
    /// (the fuzzer's lo is one) rather than risk passing an address that should have been translated.
    fn has_nat_rules(&self) -> bool {
        self.rules.iter().any(|r| !r.local)
    }

    /// A fragment without a transport header: it gets what its datagram's first fragment got at this hook, at the IP
    /// level only (addresses and the header checksum; the L4 checksum in the first fragment covers the rest).
    fn later_fragment(&mut self, hook: Hook, frame: &[u8], ip: &Ip) -> Expect {
        // (A first fragment without its whole transport header parses as a later one.)
        let what = if be16(frame, ETH + 6) & 0x1fff == 0 { "tiny first fragment" } else { "later fragment" };
        let at = hook.name();
        let known = self.datagrams.get(&DatagramKey::of(ip, hook)).copied();
        let c = &mut self.frag_counters;
        match known {
            Some(Fate::Dropped) => {
                c.unknown_drops += 1;
                drop(format!("{what} at {at}: its first fragment was dropped"))
            }
            Some(Fate::Out { translated: false, .. }) => {
                pass(frame, format!("{what} at {at}: its first fragment passed untranslated"))
            }
            Some(Fate::Out { src, dst, translated: true }) => {
                c.translated += 1;
                let mut out = frame.to_vec();
                let ipc = [CsumField { at: ETH + 10, kind: CsumKind::Ip }];
                let mut w = Rewriter { f: &mut out };
                w.set32(ETH + 12, src as u32, &ipc);
                w.set32(ETH + 16, dst as u32, &ipc);
                let why = format!("{what} at {at}: translated as its first fragment");
                Expect { verdict: Verdict::Next(out), why, csums: vec![], translated: true }
            }
            None if self.has_nat_rules() => {
                self.frag_counters.unknown_drops += 1;
                drop(format!("{what} at {at}: unknown datagram, dropped (NAT rules)"))
            }
            None => {
                self.frag_counters.passed += 1;
                pass(frame, format!("{what} at {at}: unknown datagram, passed (no NAT rules)"))
            }
        }
    }

    fn datagram(
        &mut self,
        hook: Hook,
        frame: &[u8],
        ip: &Ip,
        seen: &Observed,
        held: Option<Handoff>,
    ) -> Result<Expect, String> {
        let t = ip.tuple().expect("a datagram with a tuple");
        // The packet ingress has just described (README "Connection tracking", the handoff).
        let handed = held.filter(|h| h.describes(ip)).map(|h| h.kind);
        if let Some(Handed::Translated { key, settled: false, .. }) = handed {
            // The flow's first packet at egress: as without a handoff, then the flow is settled (unless dropped).
            let e = self.datagram_at(hook, frame, ip, seen, true)?;
            if e.verdict != Verdict::Drop {
                self.settle(&key, &t);
            }
            return Ok(e);
        }
        match handed {
            Some(Handed::Known { xlat }) => {
                return Ok(Expect {
                    verdict: Verdict::Next(rewrite(frame, ip, &xlat)),
                    why: "established flow, translated at egress as ingress handed it over".into(),
                    csums: vec![],
                    translated: true,
                });
            }
            Some(Handed::Translated { egress_too: false, .. }) => {
                return Ok(pass(frame, "translated at ingress by an established flow: nothing to do at egress"));
            }
            _ => {}
        }
        // A settled flow's packet never opens a flow at egress: its NAT was settled by its first packet there.
        self.datagram_at(hook, frame, ip, seen, handed.is_none())
    }

    /// A datagram at `hook` as without a handoff; `may_open`: whether it may open a flow.
    fn datagram_at(
        &mut self,
        hook: Hook,
        frame: &[u8],
        ip: &Ip,
        seen: &Observed,
        may_open: bool,
    ) -> Result<Expect, String> {
        let t = ip.tuple().expect("a datagram with a tuple");
        let whole = ip.frag == Frag::Whole;
        if let Some(entry) = self.table.get(&t).copied() {
            if entry.hook != hook {
                let closed = t.proto == TCP && self.flows[&entry.flow].closed();
                if hook == Hook::Ingress && whole && !closed {
                    // Recorded now; egress takes the translation from the handoff.
                    self.track(&entry, ip);
                    self.handoff[ip.v6 as usize] = Some(Handoff::new(ip, t, Handed::Known { xlat: entry.xlat }));
                    return Ok(pass(frame, "a flow's packet on the other hook, handed to egress"));
                }
                return Ok(pass(frame, "a flow's packet on the other hook"));
            }
            let closed = t.proto == TCP && self.flows[&entry.flow].closed();
            let syn = matches!(ip.l4, L4::Tcp { flags, .. } if flags & SYN != 0);
            if closed && entry.reply && syn {
                // A SYN(-ACK) on the reply ports of a closed flow is a new connection that is not ours: the stale
                // flow goes, the packet passes.
                self.remove_flow(entry.flow);
                return Ok(pass(frame, "SYN on the reply tuple of a closed flow"));
            }
            let reopen = closed && !entry.reply && opens_flow(ip);
            if !reopen {
                self.track(&entry, ip);
                if hook == Hook::Ingress && whole {
                    let f = &self.flows[&entry.flow];
                    let kind = Handed::Translated { key: t, settled: f.settled, egress_too: f.egress_too };
                    self.handoff[ip.v6 as usize] = Some(Handoff::new(ip, entry.xlat, kind));
                }
                let dir = if entry.reply { "reply" } else { "original" };
                return Ok(Expect {
                    verdict: Verdict::Next(rewrite(frame, ip, &entry.xlat)),
                    why: format!("established flow, {dir} direction"),
                    csums: vec![],
                    translated: true,
                });
            }
            self.remove_flow(entry.flow);
        }
        if !opens_flow(ip) {
            return Ok(pass(frame, "no flow, and the packet cannot open one"));
        }
        if !may_open {
            return Ok(pass(frame, "an established flow's packet at egress: no new flow there"));
        }
        let Some(rule) = rules::lookup(&self.rules, hook == Hook::Egress, &t, ip.v6).cloned() else {
            return Ok(pass(frame, "no rule matches"));
        };
        if hook == Hook::Egress && self.settled_at_egress(&t) {
            return Ok(pass(frame, "a settled flow's packet: no new flow at egress"));
        }
        let xlat = match rule.action.resolve(ip.v6) {
            Action::Dnat { addr, port, backends } => {
                // An echo's identifier is both its "ports": address-only DNAT keeps it.
                let to = |addr: Addr, port: Option<u16>| {
                    let dport = if t.proto == TCP || t.proto == UDP { port.unwrap_or(t.dport) } else { t.dport };
                    Tuple { dst: addr, dport, ..t }
                };
                if backends.is_empty() {
                    to(addr, port)
                } else if seen.dropped {
                    // The kernel's backend is its hash, unknown here: a drop is right only if some backend's
                    // translation clashes with a live flow (see below).
                    let clash = backends.iter().any(|&(a, p)| self.clashes(&t, &to(a, p)));
                    if !clash {
                        return Err("a new flow of a rule with several backends was dropped without a clash".into());
                    }
                    let why = format!("rule {}: the chosen backend's reply tuple is taken by a live flow", rule.id);
                    return Ok(Expect { verdict: Verdict::Drop, why, csums: vec![], translated: false });
                } else {
                    let (a, p) = self.backend(&t, &backends, seen)?;
                    to(a, p)
                }
            }
            Action::Snat { addr, ports } => match self.snat_port(&t, addr, ports, ip, seen)? {
                Some(p) => {
                    Tuple { src: addr, sport: p, dport: if packet::is_icmp(t.proto) { p } else { t.dport }, ..t }
                }
                None => {
                    return Ok(Expect {
                        verdict: Verdict::Drop,
                        why: "SNAT ports exhausted".into(),
                        csums: vec![],
                        translated: false,
                    });
                }
            },
            Action::Redirect { .. } | Action::Masquerade { .. } => unreachable!("resolved above"),
        };
        let reply_key = xlat.reversed();
        if let Some(other) = self.table.get(&reply_key).copied()
            && other.xlat != t.reversed()
        {
            if !self.closed(other.flow) {
                // Another live flow already has this reply tuple: translating would merge the two. Dropped (the
                // packet tests allow dropping or passing; the kernel drops, counted as a clash).
                let why = format!("rule {}: reply tuple {reply_key} taken by a live flow", rule.id);
                return Ok(Expect { verdict: Verdict::Drop, why, csums: vec![], translated: false });
            }
            // A closed flow's tuple is free again.
            self.remove_flow(other.flow);
        }
        // What the new flow translates at ingress goes on as `to`: another flow's entry at egress there means more to
        // do at egress, for this flow and (if it points back) for that one.
        let to = if hook == Hook::Ingress { xlat } else { t.reversed() };
        let egress_too = self.link_egress(&to);
        let id = self.next_flow;
        self.next_flow += 1;
        let flow =
            Flow { orig: t, reply_key, fin_orig: false, fin_reply: false, rst: false, egress_too, settled: false };
        self.flows.insert(id, flow);
        // In the kernel's order (conntrack::create): the reply entry, then the original one. A flow whose reply tuple
        // is its own original tuple (a self-addressed packet masqueraded to the same address) keeps the original.
        self.table.insert(reply_key, Entry { xlat: t.reversed(), hook: hook.other(), reply: true, flow: id });
        self.table.insert(t, Entry { xlat, hook, reply: false, flow: id });
        if hook == Hook::Ingress && whole {
            let kind = Handed::Translated { key: t, settled: false, egress_too };
            self.handoff[ip.v6 as usize] = Some(Handoff::new(ip, xlat, kind));
        }
        // The opening packet's flags are not state: a SYN+FIN (which opens a flow: SYN without ACK or RST) does not
        // count as the original direction's FIN. (Adopted from the kernel; reported: Linux calls SYN+FIN invalid.)
        Ok(Expect {
            verdict: Verdict::Next(rewrite(frame, ip, &xlat)),
            why: if ip.v6 {
                let l4 = match ip.l4 {
                    L4::Tcp { .. } => "TCP",
                    L4::Udp { .. } => "UDP",
                    _ => "echo",
                };
                format!("new {l4} flow by rule {} ({}) at {}", rule.id, rule.kind(), hook.name())
            } else {
                format!("new flow by rule {} at {}", rule.id, hook.name())
            },
            csums: vec![],
            translated: true,
        })
    }

    /// Whether `to` (a tuple a new flow translates packets to at ingress) is the key of an entry applied at egress;
    /// that entry's flow gets `egress_too` when its ingress entry translates to `to` reversed.
    fn link_egress(&mut self, to: &Tuple) -> bool {
        let Some(p) = self.table.get(to).copied() else { return false };
        if p.hook != Hook::Egress {
            return false;
        }
        if let Some(i) = self.table.get(&p.xlat.reversed()).copied()
            && i.hook == Hook::Ingress
            && i.xlat.reversed() == *to
        {
            for f in [i.flow, p.flow] {
                if let Some(f) = self.flows.get_mut(&f) {
                    f.egress_too = true;
                }
            }
        }
        true
    }

    /// Whether `t` is what a settled flow translates packets to at ingress (then it opens no flow at egress).
    fn settled_at_egress(&self, t: &Tuple) -> bool {
        let Some(p) = self.table.get(&t.reversed()) else { return false };
        if p.hook != Hook::Egress {
            return false;
        }
        self.table.get(&p.xlat.reversed()).is_some_and(|i| {
            i.hook == Hook::Ingress && i.xlat == *t && self.flows.get(&i.flow).is_some_and(|f| f.settled)
        })
    }

    /// Marks the flow whose ingress entry is `key` (translating to `to`) settled at egress.
    fn settle(&mut self, key: &Tuple, to: &Tuple) {
        if let Some(e) = self.table.get(key).copied()
            && e.hook == Hook::Ingress
            && e.xlat == *to
            && let Some(f) = self.flows.get_mut(&e.flow)
        {
            f.settled = true;
        }
    }

    /// TCP state: FIN per direction, RST.
    fn track(&mut self, e: &Entry, ip: &Ip) {
        let L4::Tcp { flags, .. } = ip.l4 else { return };
        let f = self.flows.get_mut(&e.flow).expect("entry's flow");
        if flags & FIN != 0 {
            if e.reply {
                f.fin_reply = true;
            } else {
                f.fin_orig = true;
            }
        }
        if flags & RST != 0 {
            f.rst = true;
        }
    }

    /// A TCP flow reset or finished both ways: its tuples are free for new flows.
    fn closed(&self, id: u64) -> bool {
        self.flows.get(&id).is_some_and(|f| f.orig.proto == TCP && f.closed())
    }

    fn remove_flow(&mut self, id: u64) {
        if let Some(f) = self.flows.remove(&id) {
            for k in [f.orig, f.reply_key] {
                if self.table.get(&k).is_some_and(|e| e.flow == id) {
                    self.table.remove(&k);
                }
            }
        }
    }

    /// The SNAT source port (or echo identifier) of a new flow `t` to `addr`: Ok(None) for a drop (exhausted).
    /// Checks the kernel's choice and adopts it.
    /// Whether translating `t` to `xlat` would give a reply tuple a live other flow already has.
    fn clashes(&self, t: &Tuple, xlat: &Tuple) -> bool {
        self.table.get(&xlat.reversed()).is_some_and(|other| other.xlat != t.reversed() && !self.closed(other.flow))
    }

    /// The backend the kernel chose for a new flow of a rule with several backends: read from what it sent, and
    /// checked to be one of them (which one is the kernel's hash; the model only adopts it).
    fn backend(
        &self,
        t: &Tuple,
        backends: &[(Addr, Option<u16>)],
        seen: &Observed,
    ) -> Result<(Addr, Option<u16>), String> {
        let Some(out) = packet::parse(seen.data).ip() else {
            return Err("the kernel's output is not an IP packet".into());
        };
        let got = out.tuple().ok_or("the kernel's output has no tuple")?;
        let ports = t.proto == TCP || t.proto == UDP;
        backends
            .iter()
            .copied()
            .find(|&(a, p)| a == got.dst && (!ports || p.unwrap_or(t.dport) == got.dport))
            .ok_or_else(|| format!("the kernel chose {:?}, not one of the rule's backends {backends:?}", got))
    }

    fn snat_port(
        &self,
        t: &Tuple,
        addr: Addr,
        ports: Option<(u16, u16)>,
        ip: &Ip,
        seen: &Observed,
    ) -> Result<Option<u16>, String> {
        if t.proto != TCP && t.proto != UDP && !packet::is_icmp(t.proto) {
            return Ok(Some(0)); // no ports: address only
        }
        let echo = packet::is_icmp(t.proto);
        // Taken: a live flow already uses the reply tuple this port would give.
        let taken = |p: u16| {
            let x = Tuple { src: addr, sport: p, dport: if echo { p } else { t.dport }, ..*t };
            self.table.get(&x.reversed()).is_some_and(|e| e.xlat != t.reversed() && !self.closed(e.flow))
        };
        let (lo, hi) = ports.unwrap_or(DEFAULT_PORTS);
        let orig = t.sport;
        let orig_keepable = (lo..=hi).contains(&orig) && !taken(orig);
        // Without an explicit range, keeping a free port below 1024 is allowed too.
        let orig_ok = orig_keepable || (ports.is_none() && !taken(orig));
        let span = (hi - lo) as u32 + 1;
        // Only worth computing when the kernel dropped (a scan of the range).
        let drop_ok = || {
            !orig_keepable && {
                let taken_in: Vec<u32> = (0..span.min(70_000)).filter(|i| taken(lo + *i as u16)).collect();
                if span <= PROBES {
                    taken_in.len() as u32 == span
                } else {
                    // Some start from which PROBES consecutive ports (wrapping in the range) are all taken.
                    taken_in.len() as u32 >= PROBES
                        && taken_in.iter().any(|&s| (0..PROBES).all(|k| taken(lo + ((s + k) % span) as u16)))
                }
            }
        };
        if seen.dropped {
            return if drop_ok() {
                Ok(None)
            } else {
                Err(format!("SNAT of {t} dropped although a free port was available in {lo}-{hi}"))
            };
        }
        let at = ip.l4_at + if echo { 4 } else { 0 };
        if seen.data.len() < at + 2 {
            return Err("SNAT output too short to read the port".into());
        }
        let p = be16(seen.data, at);
        if orig_keepable && p != orig {
            return Err(format!("SNAT of {t}: the free original port {orig} was not kept (got {p})"));
        }
        if p == orig && orig_ok {
            return Ok(Some(p));
        }
        if !(lo..=hi).contains(&p) {
            return Err(format!("SNAT of {t}: port {p} outside {lo}-{hi}"));
        }
        if taken(p) {
            return Err(format!("SNAT of {t}: port {p} collides with a live flow's reply tuple"));
        }
        Ok(Some(p))
    }

    /// An ICMP error about a translated flow: the flow whose reverse tuple the embedded datagram has, on the hook that
    /// translates that direction. The outer address the flow's translation changes and the embedded datagram are
    /// rewritten; nothing else.
    fn icmp_error(&self, hook: Hook, frame: &[u8], ip: &Ip, inner: &packet::Inner) -> Expect {
        let key = inner.tuple.reversed();
        let Some(e) = self.table.get(&key) else {
            return pass(frame, "ICMP error about no known flow");
        };
        if e.hook != hook {
            return pass(frame, "ICMP error about a flow, on the other hook");
        }
        let x = e.xlat;
        let mut out = frame.to_vec();
        let mut w = Rewriter { f: &mut out };
        let inner_ip = CsumField { at: inner.ip + 10, kind: CsumKind::Ip };
        let l4c: Vec<CsumField> = inner.l4_csum.into_iter().collect();
        let pseudo: Vec<CsumField> =
            std::iter::once(inner_ip).chain(l4c.iter().copied().filter(|c| c.kind != CsumKind::Icmp)).collect();
        // The embedded datagram becomes the reverse of the translated tuple.
        let new = x.reversed();
        w.set32(inner.ip + 12, new.src as u32, &pseudo);
        w.set32(inner.ip + 16, new.dst as u32, &pseudo);
        if inner.tuple.proto == TCP || inner.tuple.proto == UDP {
            w.set16(inner.l4, new.sport, &l4c);
            w.set16(inner.l4 + 2, new.dport, &l4c);
        } else if inner.tuple.proto == packet::ICMP {
            w.set16(inner.l4 + 4, new.sport, &l4c);
        }
        // The outer ICMP checksum covers the whole message: update it for every word that changed.
        let icmp_at = ip.l4_at;
        let mut c = be16(&out, icmp_at + 2);
        let mut i = icmp_at;
        while i + 1 < ip.end {
            let (o, n) = (be16(frame, i), be16(&out, i));
            if o != n && i != icmp_at + 2 {
                c = packet::csum_update16(c, o, n);
            }
            i += 2;
        }
        if i < ip.end && frame[i] != out[i] {
            // A last odd byte is summed as the high byte of a zero-padded word.
            c = packet::csum_update16(c, (frame[i] as u16) << 8, (out[i] as u16) << 8);
        }
        out[icmp_at + 2..icmp_at + 4].copy_from_slice(&c.to_be_bytes());
        let mut w = Rewriter { f: &mut out };
        let outer_ip = [CsumField { at: ETH + 10, kind: CsumKind::Ip }];
        // The outer addresses that are the flow's (a router on the path keeps its own source).
        if ip.src == key.src {
            w.set32(ETH + 12, x.src as u32, &outer_ip);
        }
        if ip.dst == key.dst {
            w.set32(ETH + 16, x.dst as u32, &outer_ip);
        }
        let why = "ICMP error about a translated flow".into();
        Expect { verdict: Verdict::Next(out), why, csums: vec![], translated: true }
    }
}

/// `frame` (a TCP/UDP/echo/other datagram) rewritten to the tuple `x`, every checksum updated incrementally.
fn rewrite(frame: &[u8], ip: &Ip, x: &Tuple) -> Vec<u8> {
    let mut out = frame.to_vec();
    let w = &mut Rewriter { f: &mut out };
    let at = ip.l4_at;
    if ip.v6 {
        // IPv6: no header checksum; the TCP, UDP and ICMPv6 checksums cover the addresses through the
        // pseudo-header (RFC 8200 8.1, RFC 4443 2.3). (The model's IPv6 packets are TCP, UDP or echo only.)
        let l4c = match ip.l4 {
            L4::Tcp { .. } => vec![CsumField { at: at + 16, kind: CsumKind::Tcp }],
            L4::Udp { .. } => vec![CsumField { at: at + 6, kind: CsumKind::Udp }],
            L4::Echo { .. } => vec![CsumField { at: at + 2, kind: CsumKind::Icmp }],
            _ => vec![],
        };
        w.set128(ETH + 8, x.src, &l4c);
        w.set128(ETH + 24, x.dst, &l4c);
        if let L4::Echo { .. } = ip.l4 {
            w.set16(at + 4, x.sport, &l4c);
        } else {
            w.set16(at, x.sport, &l4c);
            w.set16(at + 2, x.dport, &l4c);
        }
        return out;
    }
    let ipc = CsumField { at: ETH + 10, kind: CsumKind::Ip };
    match ip.l4 {
        L4::Tcp { .. } | L4::Udp { .. } => {
            let l4c = match ip.l4 {
                L4::Tcp { .. } => CsumField { at: at + 16, kind: CsumKind::Tcp },
                _ => CsumField { at: at + 6, kind: CsumKind::Udp },
            };
            w.set32(ETH + 12, x.src as u32, &[ipc, l4c]);
            w.set32(ETH + 16, x.dst as u32, &[ipc, l4c]);
            w.set16(at, x.sport, &[l4c]);
            w.set16(at + 2, x.dport, &[l4c]);
        }
        L4::Echo { .. } => {
            w.set32(ETH + 12, x.src as u32, &[ipc]);
            w.set32(ETH + 16, x.dst as u32, &[ipc]);
            w.set16(at + 4, x.sport, &[CsumField { at: at + 2, kind: CsumKind::Icmp }]);
        }
        _ => {
            w.set32(ETH + 12, x.src as u32, &[ipc]);
            w.set32(ETH + 16, x.dst as u32, &[ipc]);
        }
    }
    out
}

#[cfg(test)]
mod tests;
