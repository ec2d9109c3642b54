//! The watcher's revert policy, as pure functions: when a change left a VM
//! unhealthy, whether it goes back to the VM's last healthy configuration,
//! what each reconcile then applies, and where the revert stands after it.
//! No I/O, no clock: the loop passes in what it knows (the VM's history,
//! the spec's digest), so every rule is tested on plain data.
//!
//! The rules:
//! - Only a VM with `spec.health` and a configuration judged healthy before
//!   (other than the one that failed) is reverted; any other follows its
//!   spec as if there were no revert.
//! - The revert is one more change: it obeys the disruption ceiling and
//!   the holds; a revert they forbid is held and reported, never forced.
//! - The configuration that failed is not applied again until the spec
//!   changes; a spec changed at any point ends the revert, and the new
//!   spec is followed.
//! - A revert that is itself unhealthy is reported, and not reverted again.

use crate::spec::VmConfig;
use crate::vm::history::{History, Judgement};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Where a revert stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RevertState {
    /// Decided; its reconcile has not applied it yet (or failed, and is
    /// retried with the backoff).
    Reverting,
    /// The ceiling or a hold forbids it: reported, retried at each
    /// reconcile, never forced. The lines say what is held and why.
    Held(Vec<String>),
    /// Applied: the VM runs its last healthy configuration again.
    Reverted,
    /// Applied, and judged unhealthy itself: left as it is and reported.
    Unhealthy,
}

impl RevertState {
    /// As status and the log say it.
    pub fn as_str(&self) -> &'static str {
        match self {
            RevertState::Reverting => "reverting",
            RevertState::Held(_) => "held",
            RevertState::Reverted => "reverted",
            RevertState::Unhealthy => "revert unhealthy",
        }
    }
}

/// A VM's revert: away from the spec that failed, to its last healthy
/// configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Revert {
    /// The digest of the spec that was judged unhealthy: not applied
    /// again while the spec says it.
    pub from: String,
    /// What it goes back to.
    pub to: Arc<VmConfig>,
    /// Its digest.
    pub to_spec: String,
    /// The probe that judged the change unhealthy.
    pub probe: String,
    /// What it answered.
    pub answer: String,
    /// Where it stands.
    pub state: RevertState,
}

/// What an unhealthy verdict comes to.
#[derive(Debug, Clone, PartialEq)]
pub enum OnUnhealthy {
    /// Go back to the last healthy configuration.
    Revert(Revert),
    /// The revert itself was judged unhealthy: it stays, and says so.
    RevertFailed,
    /// Reported only, for this reason.
    Stay(&'static str),
}

/// What a verdict of `Unhealthy` (by `probe`, answering `answer`) on the
/// change to the configuration of digest `judged` comes to, for a VM whose
/// spec now is `desired` (`None`: no spec), whose history is `history`,
/// with `revert` in force (or none), when reverting is `enabled`.
///
/// The configuration gone back to takes the current spec's `policy`: what
/// uvmctl may do to the VM is the spec's word now, not what it was then.
pub fn on_unhealthy(
    enabled: bool,
    judged: &str,
    desired: Option<&VmConfig>,
    history: Option<&History>,
    revert: Option<&Revert>,
    probe: &str,
    answer: &str,
) -> OnUnhealthy {
    if let Some(r) = revert
        && r.to_spec == judged
    {
        return OnUnhealthy::RevertFailed;
    }
    let Some(desired) = desired.filter(|d| d.health.is_some()) else {
        return OnUnhealthy::Stay("its spec no longer has spec.health");
    };
    if desired.digest() != judged {
        return OnUnhealthy::Stay("its spec changed since; the new one is applied instead");
    }
    if !enabled {
        return OnUnhealthy::Stay("--no-revert: reported only");
    }
    let Some(good) = history.and_then(History::last_healthy) else {
        return OnUnhealthy::Stay("no configuration of it was judged healthy before");
    };
    if good.spec == judged {
        return OnUnhealthy::Stay("its last healthy configuration is this one");
    }
    let mut to = good.config.clone();
    to.policy = desired.policy;
    OnUnhealthy::Revert(Revert {
        from: judged.to_string(),
        to_spec: to.digest(),
        to: Arc::new(to),
        probe: probe.to_string(),
        answer: answer.to_string(),
        state: RevertState::Reverting,
    })
}

/// Whether `revert` still stands for a VM whose spec has digest `desired`:
/// a spec changed since the failure ends it (the new spec is followed).
pub fn stands(revert: &Revert, desired: Option<&str>) -> bool {
    desired == Some(revert.from.as_str())
}

/// What a reconcile that applied the revert target came to, for the loop
/// to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Applied now (counted once, logged once).
    Applied,
    /// Held (logged when the lines change).
    Held,
    /// Nothing new to say.
    Quiet,
}

/// Moves `revert` on after a reconcile of its target: `applied` when it
/// changed the VM, `in_sync` when the VM already had it, `held` with the
/// lines of what was held.
pub fn after_reconcile(
    revert: &mut Revert,
    applied: bool,
    in_sync: bool,
    held: Option<&[String]>,
) -> Step {
    match (&revert.state, applied, in_sync, held) {
        (RevertState::Reverting | RevertState::Held(_), true, _, _) => {
            revert.state = RevertState::Reverted;
            Step::Applied
        }
        (RevertState::Reverting | RevertState::Held(_), _, true, _) => {
            revert.state = RevertState::Reverted;
            Step::Quiet
        }
        (RevertState::Held(was), _, _, Some(lines)) if was.as_slice() == lines => Step::Quiet,
        (RevertState::Reverting | RevertState::Held(_), _, _, Some(lines)) => {
            revert.state = RevertState::Held(lines.to_vec());
            Step::Held
        }
        _ => Step::Quiet,
    }
}

/// The revert a watcher that starts finds in force for a VM whose spec is
/// `desired`, from its history: a revert applied away from that very spec
/// (its newest entry), or one that was due and not applied yet (its newest
/// entry is that spec, judged unhealthy) when the watcher before stopped.
/// The spec that failed is then not applied again.
pub fn resume(history: &History, desired: &VmConfig) -> Option<Revert> {
    let newest = history.newest()?;
    let spec = desired.digest();
    if newest.spec == spec && newest.health == Judgement::Unhealthy {
        let (probe, answer) = (
            newest.probe.as_deref().unwrap_or_default(),
            newest.answer.as_deref().unwrap_or_default(),
        );
        return match on_unhealthy(
            true,
            &spec,
            Some(desired),
            Some(history),
            None,
            probe,
            answer,
        ) {
            OnUnhealthy::Revert(r) => Some(r),
            _ => None,
        };
    }
    let from = newest.reverted_from.as_deref()?;
    if from != spec {
        return None;
    }
    let failed = history
        .entries()
        .iter()
        .rev()
        .find(|e| e.spec == from && e.health == Judgement::Unhealthy);
    Some(Revert {
        from: from.to_string(),
        to: Arc::new(newest.config.clone()),
        to_spec: newest.spec.clone(),
        probe: failed.and_then(|e| e.probe.clone()).unwrap_or_default(),
        answer: failed.and_then(|e| e.answer.clone()).unwrap_or_default(),
        state: match newest.health {
            Judgement::Unhealthy => RevertState::Unhealthy,
            _ => RevertState::Reverted,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::config::{Health, Probe, ProbeKind};
    use crate::vm::health::{Answer, Judge, Verdict};
    use crate::vm::history::Applied;
    use std::time::{Duration, Instant};

    /// A configuration with `spec.health`, told apart by its processor count.
    fn config(count: u32) -> VmConfig {
        let mut c = VmConfig::default();
        c.processors.count = count;
        c.health = Some(Health {
            probes: vec![Probe {
                interval_seconds: 1,
                deadline_seconds: 10,
                min_healthy_seconds: 5,
                ..Probe::of(ProbeKind::Agent)
            }],
        });
        c
    }

    fn applied(history: &mut History, c: &VmConfig, verdict: Option<Verdict>) -> String {
        history.applied(Applied::new(c.clone(), 0, None));
        let spec = c.digest();
        if let Some(v) = verdict {
            history.judged(&spec, &v);
        }
        spec
    }

    fn bad() -> Verdict {
        Verdict::Unhealthy {
            probe: "agent".into(),
            answer: "no answer".into(),
        }
    }

    fn decide(h: &History, judged: &str, desired: &VmConfig, r: Option<&Revert>) -> OnUnhealthy {
        on_unhealthy(
            true,
            judged,
            Some(desired),
            Some(h),
            r,
            "agent",
            "no answer",
        )
    }

    #[test]
    fn no_healthy_history_means_no_revert() {
        let mut h = History::default();
        let first = applied(&mut h, &config(1), Some(bad()));
        assert_eq!(
            decide(&h, &first, &config(1), None),
            OnUnhealthy::Stay("no configuration of it was judged healthy before")
        );
        // Nor does a VM whose spec is gone, or has no spec.health now.
        assert!(matches!(
            on_unhealthy(true, &first, None, Some(&h), None, "agent", "x"),
            OnUnhealthy::Stay(_)
        ));
        let without = VmConfig {
            health: None,
            ..config(1)
        };
        assert_eq!(
            decide(&h, &first, &without, None),
            OnUnhealthy::Stay("its spec no longer has spec.health")
        );
        // A healthy configuration that later failed is not "reverted" to itself.
        let mut h = History::default();
        let same = applied(&mut h, &config(1), Some(Verdict::Healthy));
        applied(&mut h, &config(1), Some(bad()));
        assert_eq!(
            decide(&h, &same, &config(1), None),
            OnUnhealthy::Stay("its last healthy configuration is this one")
        );
    }

    #[test]
    fn a_change_that_stays_unhealthy_goes_back_to_the_last_healthy_one_once() {
        let mut h = History::default();
        let good = applied(&mut h, &config(1), Some(Verdict::Healthy));
        let failed = applied(&mut h, &config(2), Some(bad()));
        let OnUnhealthy::Revert(mut r) = decide(&h, &failed, &config(2), None) else {
            panic!("reverts");
        };
        assert_eq!(
            (r.from.as_str(), r.to_spec.as_str()),
            (failed.as_str(), good.as_str())
        );
        assert_eq!(*r.to, config(1));
        assert_eq!(r.state, RevertState::Reverting);
        // The failed spec is not applied again while the spec says it.
        assert!(stands(&r, Some(&failed)));
        // Held by the ceiling: reported once per distinct reason, never forced.
        let lines = vec!["restart processors".to_string(), "above live".to_string()];
        assert_eq!(
            after_reconcile(&mut r, false, false, Some(&lines)),
            Step::Held
        );
        assert_eq!(
            after_reconcile(&mut r, false, false, Some(&lines)),
            Step::Quiet
        );
        assert_eq!(r.state, RevertState::Held(lines));
        // Once allowed it is applied, and said once.
        assert_eq!(after_reconcile(&mut r, true, false, None), Step::Applied);
        assert_eq!(r.state, RevertState::Reverted);
        assert_eq!(after_reconcile(&mut r, false, true, None), Step::Quiet);
        // The revert itself unhealthy: reported, not reverted again.
        assert_eq!(
            decide(&h, &r.to_spec.clone(), &config(2), Some(&r)),
            OnUnhealthy::RevertFailed
        );
        // Switched off, it only reports.
        assert_eq!(
            on_unhealthy(
                false,
                &failed,
                Some(&config(2)),
                Some(&h),
                None,
                "agent",
                "x"
            ),
            OnUnhealthy::Stay("--no-revert: reported only")
        );
    }

    #[test]
    fn a_revert_takes_the_current_specs_policy() {
        // Healthy while the spec allowed recreating; the spec that failed
        // took that away: the revert does not bring it back.
        let mut h = History::default();
        let mut then = config(1);
        then.policy.allow_recreate = true;
        applied(&mut h, &then, Some(Verdict::Healthy));
        let now = config(2);
        let failed = applied(&mut h, &now, Some(bad()));
        let OnUnhealthy::Revert(r) = decide(&h, &failed, &now, None) else {
            panic!("reverts");
        };
        assert!(!r.to.policy.allow_recreate);
        assert_eq!(r.to.processors.count, 1);
        assert_eq!(r.to_spec, r.to.digest(), "judged under what is applied");
    }

    #[test]
    fn a_probe_that_flaps_within_the_minimum_healthy_time_never_counts_as_healthy() {
        // The first change's probe passes, fails, passes... never for 5 s
        // in a row: its verdict is never healthy, and past the deadline it
        // is unhealthy, so there is nothing to revert to.
        let c = config(1);
        let health = c.health.clone().expect("health");
        let t0 = Instant::now();
        let mut judge = Judge::new(&health, t0);
        let mut verdict = Verdict::Pending;
        for s in 0..12u64 {
            let at = t0 + Duration::from_secs(s);
            let answer = if s % 3 == 2 {
                Answer::fail("timeout")
            } else {
                Answer::pass("pong")
            };
            judge.answer(0, answer, at);
            verdict = judge.judge(at).clone();
            assert_ne!(verdict, Verdict::Healthy, "at {s}s");
        }
        assert!(matches!(verdict, Verdict::Unhealthy { .. }), "{verdict:?}");
        let mut h = History::default();
        let first = applied(&mut h, &c, Some(verdict));
        assert!(h.last_healthy().is_none());
        assert!(matches!(decide(&h, &first, &c, None), OnUnhealthy::Stay(_)));
    }

    #[test]
    fn a_spec_edited_during_a_revert_ends_it() {
        let mut h = History::default();
        applied(&mut h, &config(1), Some(Verdict::Healthy));
        let failed = applied(&mut h, &config(2), Some(bad()));
        let OnUnhealthy::Revert(r) = decide(&h, &failed, &config(2), None) else {
            panic!("reverts");
        };
        let fixed = config(3);
        assert!(
            !stands(&r, Some(&fixed.digest())),
            "the new spec is followed"
        );
        assert!(!stands(&r, None), "a spec gone ends it too");
        // A verdict on the failed spec arriving after the edit changes nothing.
        assert_eq!(
            decide(&h, &failed, &fixed, None),
            OnUnhealthy::Stay("its spec changed since; the new one is applied instead")
        );
    }

    #[test]
    fn a_watcher_that_starts_again_keeps_a_revert_its_history_shows() {
        let mut h = History::default();
        let good = applied(&mut h, &config(1), Some(Verdict::Healthy));
        let failed = applied(&mut h, &config(2), Some(bad()));
        // Due, not applied yet when the watcher before stopped: due again.
        let due = resume(&h, &config(2)).expect("due");
        assert_eq!(
            (due.to_spec.as_str(), &due.state),
            (good.as_str(), &RevertState::Reverting)
        );
        // Applied.
        let mut back = Applied::new(config(1), 0, None);
        back.reverted_from = Some(failed.clone());
        h.applied(back);
        let r = resume(&h, &config(2)).expect("still in force");
        assert_eq!(r.to_spec, good);
        assert_eq!(r.state, RevertState::Reverted);
        assert_eq!(
            (r.probe.as_str(), r.answer.as_str()),
            ("agent", "no answer")
        );
        assert!(resume(&h, &config(3)).is_none(), "the spec moved on");
    }
}
