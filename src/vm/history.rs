//! What a VM was given, change by change: the configurations applied to it,
//! newest last, each with when, which spec and revision it came from, and
//! how its health was judged. A virtstack keeps the history in the VM's own
//! record (so it goes when the VM does); this module is the pure part, the
//! one rule for adding, judging and bounding it, shared by every virtstack.
//!
//! The watcher reverts to the newest configuration judged healthy, so the
//! bound never drops that one: a run of unhealthy changes cannot push it out.

use super::config::VmConfig;
use super::health::Verdict;
use serde::{Deserialize, Serialize};

/// How many applied configurations a VM's record keeps.
pub const MAX_HISTORY: usize = 10;

/// How a configuration's health was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Judgement {
    /// Its spec has no `spec.health`: never judged.
    Unjudged,
    /// Being judged, or the judgement was cut short (a newer change, a
    /// watcher that stopped).
    Pending,
    /// Healthy: every probe passed for its minimum healthy time.
    Healthy,
    /// Unhealthy: a probe failed past its deadline, the guest panicked or
    /// its VM ended.
    Unhealthy,
}

impl Judgement {
    /// Its name as status and `uvmctl history` print it.
    pub fn as_str(self) -> &'static str {
        match self {
            Judgement::Unjudged => "unjudged",
            Judgement::Pending => "pending",
            Judgement::Healthy => "healthy",
            Judgement::Unhealthy => "unhealthy",
        }
    }
}

/// One configuration applied to a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Applied {
    /// When it was applied (seconds since the epoch).
    pub at: u64,
    /// The digest of its spec ([`VmConfig::digest`]).
    pub spec: String,
    /// The source revision it came from, when the specs come from git.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// How its health was judged.
    pub health: Judgement,
    /// The probe that decided an unhealthy verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// What it answered (the guest's words, bounded by the judgement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Applied by a revert, away from the spec of this digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted_from: Option<String>,
    /// The configuration itself: what a revert applies again.
    pub config: VmConfig,
}

impl Applied {
    /// `config`, applied at `at` (from `revision`), its health not judged yet.
    pub fn new(config: VmConfig, at: u64, revision: Option<String>) -> Self {
        let health = if config.health.is_some() {
            Judgement::Pending
        } else {
            Judgement::Unjudged
        };
        Applied {
            at,
            spec: config.digest(),
            revision,
            health,
            probe: None,
            answer: None,
            reverted_from: None,
            config,
        }
    }
}

/// A spec digest as logs and tables show it: enough to tell two apart.
pub fn short_digest(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// A VM's applied configurations, oldest first, at most [`MAX_HISTORY`]
/// (and the newest healthy one, wherever it is).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct History {
    entries: Vec<Applied>,
}

impl History {
    /// The entries, oldest first.
    pub fn entries(&self) -> &[Applied] {
        &self.entries
    }

    /// Whether nothing was applied yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The newest entry.
    pub fn newest(&self) -> Option<&Applied> {
        self.entries.last()
    }

    /// The newest configuration judged healthy: what a revert goes back to.
    pub fn last_healthy(&self) -> Option<&Applied> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.health == Judgement::Healthy)
    }

    /// Adds what was just applied, dropping the oldest past the bound (but
    /// never the newest healthy entry). An earlier entry of the same spec
    /// whose judgement was still pending is cut short: it was replaced.
    pub fn applied(&mut self, entry: Applied) {
        if let Some(last) = self.entries.last_mut()
            && last.health == Judgement::Pending
            && last.spec == entry.spec
            && last.reverted_from == entry.reverted_from
        {
            // The same change applied again before it was judged (a
            // relaunch, a retry): one entry, its time the latest.
            *last = entry;
            return;
        }
        self.entries.push(entry);
        while self.entries.len() > MAX_HISTORY {
            let keep = self
                .entries
                .iter()
                .rposition(|e| e.health == Judgement::Healthy);
            // The oldest entry that is not the one to keep.
            let drop = if keep == Some(0) { 1 } else { 0 };
            self.entries.remove(drop);
        }
    }

    /// Writes `verdict` into the newest entry of `spec` still pending;
    /// whether there was one. A pending verdict changes nothing.
    pub fn judged(&mut self, spec: &str, verdict: &Verdict) -> bool {
        let Some(entry) = self
            .entries
            .iter_mut()
            .rev()
            .find(|e| e.spec == spec && e.health == Judgement::Pending)
        else {
            return false;
        };
        match verdict {
            Verdict::Pending => return false,
            Verdict::Healthy => entry.health = Judgement::Healthy,
            Verdict::Unhealthy { probe, answer } => {
                entry.health = Judgement::Unhealthy;
                entry.probe = Some(probe.clone());
                entry.answer = Some(answer.clone());
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::config::{Health, Probe, ProbeKind};

    /// A configuration told apart by its processor count.
    fn config(count: u32, health: bool) -> VmConfig {
        let mut c = VmConfig::default();
        c.processors.count = count;
        if health {
            c.health = Some(Health {
                probes: vec![Probe::of(ProbeKind::Agent)],
            });
        }
        c
    }

    fn unhealthy() -> Verdict {
        Verdict::Unhealthy {
            probe: "agent".into(),
            answer: "no answer".into(),
        }
    }

    #[test]
    fn a_spec_without_health_is_never_judged() {
        let mut h = History::default();
        h.applied(Applied::new(config(1, false), 1, None));
        assert_eq!(h.newest().map(|e| e.health), Some(Judgement::Unjudged));
        let spec = h.entries()[0].spec.clone();
        assert!(!h.judged(&spec, &Verdict::Healthy));
        assert!(h.last_healthy().is_none());
    }

    #[test]
    fn a_verdict_lands_on_the_entry_of_its_spec() {
        let mut h = History::default();
        h.applied(Applied::new(config(1, true), 1, Some("r1".into())));
        let a = h.entries()[0].spec.clone();
        assert!(h.judged(&a, &Verdict::Healthy));
        h.applied(Applied::new(config(2, true), 2, Some("r2".into())));
        let b = h.entries()[1].spec.clone();
        assert_ne!(a, b, "a different spec has a different digest");
        assert!(!h.judged(&b, &Verdict::Pending), "pending changes nothing");
        assert!(h.judged(&b, &unhealthy()));
        let newest = h.newest().expect("two entries");
        assert_eq!(newest.health, Judgement::Unhealthy);
        assert_eq!(newest.answer.as_deref(), Some("no answer"));
        assert_eq!(h.last_healthy().map(|e| e.spec.as_str()), Some(a.as_str()));
        assert!(!h.judged(&b, &Verdict::Healthy), "a verdict stands");
    }

    #[test]
    fn the_same_change_applied_again_before_its_verdict_is_one_entry() {
        let mut h = History::default();
        h.applied(Applied::new(config(1, true), 1, None));
        h.applied(Applied::new(config(1, true), 5, None));
        assert_eq!(h.entries().len(), 1);
        assert_eq!(h.entries()[0].at, 5);
        let spec = h.entries()[0].spec.clone();
        h.judged(&spec, &Verdict::Healthy);
        h.applied(Applied::new(config(1, true), 9, None));
        assert_eq!(h.entries().len(), 2, "a judged entry is kept");
    }

    #[test]
    fn the_bound_keeps_the_newest_healthy_entry() {
        let mut h = History::default();
        h.applied(Applied::new(config(1, true), 0, None));
        let good = h.entries()[0].spec.clone();
        h.judged(&good, &Verdict::Healthy);
        for i in 1..=(MAX_HISTORY as u64 * 2) {
            h.applied(Applied::new(config(i as u32 + 1, true), i, None));
            let spec = h.newest().expect("entry").spec.clone();
            h.judged(&spec, &unhealthy());
        }
        assert_eq!(h.entries().len(), MAX_HISTORY);
        assert_eq!(h.entries()[0].spec, good, "still there to revert to");
        assert_eq!(h.newest().map(|e| e.at), Some(MAX_HISTORY as u64 * 2));
        assert_eq!(h.entries()[1].at, MAX_HISTORY as u64 + 2);
    }

    #[test]
    fn history_round_trips_as_a_json_list() {
        let mut h = History::default();
        h.applied(Applied::new(config(1, true), 1, Some("abc".into())));
        let json = serde_json::to_value(&h).expect("json");
        assert!(json.is_array(), "{json}");
        assert_eq!(json[0]["health"], "pending");
        assert_eq!(json[0]["revision"], "abc");
        let back: History = serde_json::from_value(json).expect("back");
        assert_eq!(back, h);
    }
}
