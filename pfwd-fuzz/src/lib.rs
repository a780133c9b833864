//! pfwd's differential packet fuzzer: random and mutated packet streams under random rule sets, run through the
//! real tc programs with BPF_PROG_TEST_RUN ([`run`]) and compared ([`check`]) with an independent reference model
//! ([`model`]). [`generate`] makes the rule sets and streams from a seed.

pub mod check;
pub mod generate;
pub mod model;
pub mod run;

use anyhow::Result;
use pfwd::rules::Rule;

use model::{Expect, Hook, Model, Observed};
use run::Instance;

/// One packet through one hook, as sent.
#[derive(Clone, Debug)]
pub struct Step {
    pub hook: Hook,
    pub frame: Vec<u8>,
    /// Instead of a packet, a rule change in the middle of the stream: the new rule set (flows are kept).
    pub rules: Option<Vec<Rule>>,
}

/// Where the kernel and the model disagree.
#[derive(Clone, Debug)]
pub struct Divergence {
    /// Index of the diverging step in the sequence.
    pub at: usize,
    pub what: String,
    pub expected: Option<Expect>,
    pub ret: u32,
    pub got: Vec<u8>,
}

/// The fuzzer's state: the kernel instance, the model and an output buffer.
pub struct Fuzzer {
    pub inst: Instance,
    pub model: Model,
    buf: Vec<u8>,
    /// Test runs the kernel refused (EINVAL for frames it cannot take); not compared.
    pub refused: u64,
    /// How often the model took each path ("new flow by rule", "malformed: ...", ...): the run's coverage.
    pub paths: std::collections::BTreeMap<String, u64>,
    /// How often the generator made each fragment case ("tiny first fragment", ...).
    pub generated: std::collections::BTreeMap<String, u64>,
    counters_at_reset: model::FragCounters,
    episode_rules: Vec<Rule>,
}

impl Fuzzer {
    /// Whether each run also checks skb->csum (see `run::Instance::complete`).
    pub fn checks_packet_sum(&self) -> bool {
        self.inst.complete
    }

    pub fn new() -> Result<Self> {
        Ok(Fuzzer {
            inst: Instance::new(1 << 16)?,
            model: Model::default(),
            buf: vec![0; 4096],
            refused: 0,
            paths: Default::default(),
            generated: Default::default(),
            counters_at_reset: Default::default(),
            episode_rules: Vec::new(),
        })
    }

    /// The rules the episode started with (kept for the first rule change to start from).
    fn model_rules(&self) -> Vec<Rule> {
        self.episode_rules.clone()
    }

    pub fn reset(&mut self, rules: &[Rule]) -> Result<()> {
        self.episode_rules = rules.to_vec();
        self.inst.reset(rules)?;
        self.model.reset(rules);
        self.counters_at_reset = self.inst.frag_counters()?;
        Ok(())
    }

    /// After the steps `0..n` since the last reset: the kernel's fragment counters grew as the model's did, else a
    /// divergence at the last step.
    fn check_counters(&self, n: usize) -> Result<Option<Divergence>> {
        let (now, was, want) = (self.inst.frag_counters()?, self.counters_at_reset, self.model.frag_counters);
        let got = model::FragCounters {
            translated: now.translated - was.translated,
            unknown_drops: now.unknown_drops - was.unknown_drops,
            passed: now.passed - was.passed,
        };
        if got == want || n == 0 {
            return Ok(None);
        }
        let what = format!("fragment counters after the last step: kernel {got:?}, model {want:?}");
        Ok(Some(Divergence { at: n - 1, what, expected: None, ret: check::NEXT, got: vec![] }))
    }

    /// Runs one frame through one hook in the kernel and the model. Ok(Err(d)): a divergence. Ok(Ok(out)): the
    /// output frame (None when dropped or refused).
    /// A rule change, applied to the kernel and the model alike.
    fn change_rules(&mut self, rules: &[Rule]) -> Result<()> {
        self.inst.set_rules(rules)?;
        self.model.set_rules(rules);
        Ok(())
    }

    fn step(&mut self, hook: Hook, frame: &[u8], at: usize) -> Result<Result<Option<Vec<u8>>, Divergence>> {
        let out = match self.inst.run(hook, frame, &mut self.buf) {
            Ok(o) => o,
            // EBADMSG (os error 74): the run of a CHECKSUM_COMPLETE skb ended with skb->csum not the packet's sum.
            Err(e) if e.raw_os_error() == Some(74) => {
                let what = format!("the program left skb->csum wrong for a CHECKSUM_COMPLETE packet ({e})");
                return Ok(Err(Divergence { at, what, expected: None, ret: check::NEXT, got: vec![] }));
            }
            Err(_) => {
                self.refused += 1;
                return Ok(Ok(None));
            }
        };
        let got = &self.buf[..out.len.min(self.buf.len())];
        let seen = Observed { dropped: out.ret == check::DROP, data: got };
        let diverge =
            |what: String, expected: Option<Expect>| Divergence { at, what, expected, ret: out.ret, got: got.to_vec() };
        let expect = match self.model.step(hook, frame, &seen) {
            Ok(e) => e,
            Err(what) => return Ok(Err(diverge(what, None))),
        };
        *self.paths.entry(path(&expect.why)).or_default() += 1;
        if let Err(what) = check::check(frame, &expect, out.ret, got) {
            return Ok(Err(diverge(what, Some(expect))));
        }
        Ok(Ok((out.ret == check::NEXT).then(|| got.to_vec())))
    }

    /// A generated episode: `sends` frames of a fresh stream under `rules`. Returns the steps run and the first
    /// divergence, if any; `packets` counts test runs.
    pub fn episode(
        &mut self,
        rules: &[Rule],
        rng: &mut generate::Rng,
        sends: usize,
        packets: &mut u64,
    ) -> Result<Option<(Vec<Step>, Divergence)>> {
        self.reset(rules)?;
        let mut stream = generate::Stream::new();
        let mut steps: Vec<Step> = Vec::with_capacity(sends * 2);
        let r = self.sends(&mut stream, rng, sends, packets, &mut steps);
        for (what, n) in std::mem::take(&mut stream.made) {
            *self.generated.entry(what).or_default() += n;
        }
        Ok(r?.map(|d| (steps, d)))
    }

    /// The sends of an episode, each through its hooks; the first divergence, if any.
    fn sends(
        &mut self,
        stream: &mut generate::Stream,
        rng: &mut generate::Rng,
        sends: usize,
        packets: &mut u64,
        steps: &mut Vec<Step>,
    ) -> Result<Option<Divergence>> {
        let mut rules: Option<Vec<Rule>> = None;
        for _ in 0..sends {
            // Now and then (one send in 200: each change costs a rule-bank switch) the rules change under live flows.
            if rng.below(200) == 0 {
                let new = generate::changed_rules(rng, rules.as_deref().unwrap_or(&self.model_rules()));
                self.change_rules(&new)?;
                *self.generated.entry("rule change in the middle of a stream".into()).or_default() += 1;
                steps.push(Step { hook: Hook::Ingress, frame: vec![], rules: Some(new.clone()) });
                rules = Some(new);
            }
            let s = stream.next(rng);
            let mut frame = Some(s.frame.clone());
            for &hook in s.hooks {
                let Some(f) = frame.take() else { break };
                let at = steps.len();
                *packets += 1;
                let r = self.step(hook, &f, at)?;
                steps.push(Step { hook, frame: f, rules: None });
                match r {
                    Ok(out) => frame = out,
                    Err(d) => return Ok(Some(d)),
                }
            }
            stream.observed(&s, frame.as_deref());
        }
        self.check_counters(steps.len())
    }

    /// Replays concrete steps from a fresh start; the first divergence, if any.
    pub fn replay(&mut self, rules: &[Rule], steps: &[Step]) -> Result<Option<Divergence>> {
        self.reset(rules)?;
        for (i, s) in steps.iter().enumerate() {
            if let Some(r) = &s.rules {
                self.change_rules(r)?;
                continue;
            }
            if let Err(d) = self.step(s.hook, &s.frame, i)? {
                return Ok(Some(d));
            }
        }
        self.check_counters(steps.len())
    }

    /// Drops steps (halves, then smaller chunks, then single steps) while the sequence still diverges at its last
    /// step. Returns the minimised steps and their divergence.
    pub fn minimise(&mut self, rules: &[Rule], steps: &[Step], d: Divergence) -> Result<(Vec<Step>, Divergence)> {
        let mut cur: Vec<Step> = steps[..=d.at].to_vec();
        let mut best = d;
        let mut chunk = cur.len().div_ceil(2);
        loop {
            let mut i = 0;
            while i < cur.len().saturating_sub(1) {
                // The diverging (last) step stays.
                let end = (i + chunk).min(cur.len() - 1);
                let cand: Vec<Step> = cur[..i].iter().chain(&cur[end..]).cloned().collect();
                match self.replay(rules, &cand)? {
                    Some(d) => {
                        cur = cand[..=d.at].to_vec();
                        best = d;
                    }
                    None => i += chunk,
                }
            }
            if chunk == 1 {
                break;
            }
            chunk = chunk.div_ceil(2);
        }
        Ok((cur, best))
    }
}

/// The model's path for the coverage summary: its `why` without numbers (rule ids, ports, IPv4 addresses' digits)
/// and without IPv6 addresses (in brackets), but with the family's name ("IPv6: ...", "ICMPv6").
fn path(why: &str) -> String {
    let (mut out, mut bracket) = (String::new(), false);
    for (i, part) in why.split("v6").enumerate() {
        if i > 0 {
            out += "v6";
        }
        for c in part.chars() {
            match c {
                '[' => bracket = true,
                ']' => bracket = false,
                _ if bracket || c.is_ascii_digit() => continue,
                _ => {}
            }
            out.push(c);
        }
    }
    out
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn coverage_paths_drop_numbers_and_ipv6_addresses() {
        assert_eq!(
            super::path("IPv6: new flow by rule 12 (dnat) at ingress"),
            "IPv6: new flow by rule  (dnat) at ingress"
        );
        assert_eq!(
            super::path("IPv6: rule 3: reply tuple [2001:db8::1]:80 -> [fd00::2]:5 proto 6 taken"),
            "IPv6: rule : reply tuple []: -> []: proto  taken"
        );
        assert_eq!(super::path("malformed: IHL below 5"), "malformed: IHL below ");
        assert_eq!(super::path("IPv6: malformed: truncated ICMPv6 header"), "IPv6: malformed: truncated ICMPv6 header");
    }
}
