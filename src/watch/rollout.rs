//! This host's part in a rollout (`watch --wave`): whether the revision in
//! force is settled and healthy here, and since when. Prometheus reads it
//! from the metrics, and the hosts of the next wave wait on it (the gate
//! itself is the git source's, `source::gate`). Pure: time is passed in.

use super::policy::Entry;
use super::status::HealthState;
use std::collections::BTreeMap;

/// Why the revision in force is not settled and healthy on this host yet:
/// a VM whose spec changed and was not taken in yet (or not reconciled
/// since the watcher started), held, failing or crashing, reverted, to be
/// pruned, judged or unhealthy, or a spec that fails to load. `None` once
/// nothing is left. A periodic resync or an event alone unsettles nothing:
/// what its reconcile changes restarts the soak ([`Soak::disturb`]).
pub(super) fn unsettled(vms: &BTreeMap<String, Entry>, spec_errors: usize) -> Option<String> {
    let mut first = None;
    let mut count = 0usize;
    for (vm, e) in vms {
        let why = if e.changing || e.first_round {
            "reconciling"
        } else if !e.status.held.is_empty() {
            "held"
        } else if e.failures > 0 || e.crash_streak > 0 {
            "failing"
        } else if e.prune {
            "to be pruned"
        } else if e.revert.is_some() {
            "reverted"
        } else if e.status.spec_error.is_some() {
            "its spec fails to load"
        } else {
            match e.status.health.as_ref().map(|h| h.health) {
                Some(HealthState::Pending) => "health pending",
                Some(HealthState::Unhealthy) => "unhealthy",
                Some(HealthState::Healthy) | None => continue,
            }
        };
        count += 1;
        first.get_or_insert_with(|| format!("{vm} {why}"));
    }
    match (first, spec_errors) {
        (Some(first), _) => Some(format!("{count} VM(s) not settled; first: {first}")),
        (None, 0) => None,
        (None, n) => Some(format!("{n} spec error(s)")),
    }
}

/// Since when the revision in force has been settled and healthy here.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Soak {
    revision: Option<String>,
    healthy_since: Option<u64>,
}

impl Soak {
    /// Takes in the revision in force and whether it is settled now (at
    /// `now`, Unix seconds); since when it has been, if it is. A new
    /// revision, or any moment unsettled, starts the soak again.
    pub(super) fn update(
        &mut self,
        revision: Option<&str>,
        settled: bool,
        now: u64,
    ) -> Option<u64> {
        if self.revision.as_deref() != revision {
            self.revision = revision.map(str::to_string);
            self.healthy_since = None;
        }
        if !settled || self.revision.is_none() {
            self.healthy_since = None;
        } else if self.healthy_since.is_none() {
            self.healthy_since = Some(now);
        }
        self.healthy_since
    }

    /// Something was done to a VM (a change applied, a relaunch, a prune,
    /// a failure): the soak starts again at the next settled moment.
    pub(super) fn disturb(&mut self) {
        self.healthy_since = None;
    }
}

/// The commit of a revision as the source shows it (`main@sha1:<sha>`).
pub(super) fn sha_of(revision: &str) -> &str {
    revision
        .rsplit_once("@sha1:")
        .map_or(revision, |(_, sha)| sha)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::policy::Trigger;
    use crate::watch::status::HealthStatus;

    fn entry(f: impl FnOnce(&mut Entry)) -> Entry {
        let mut e = Entry {
            tracked: true,
            ..Entry::default()
        };
        f(&mut e);
        e
    }

    #[test]
    fn a_host_is_settled_when_no_vm_is_reconciling_held_failing_or_unhealthy() {
        let mut vms = BTreeMap::new();
        vms.insert("a".to_string(), entry(|_| {}));
        vms.insert(
            "b".to_string(),
            entry(|e| {
                e.status.health = Some(HealthStatus::judged(
                    &crate::vm::health::Verdict::Healthy,
                    1,
                ))
            }),
        );
        assert_eq!(unsettled(&vms, 0), None);
        assert_eq!(unsettled(&vms, 2).as_deref(), Some("2 spec error(s)"));
        type Set = Box<dyn Fn(&mut Entry)>;
        let cases: Vec<(&str, Set)> = vec![
            ("reconciling", Box::new(|e: &mut Entry| e.spec_changed())),
            (
                "reconciling",
                Box::new(|e: &mut Entry| e.first_round = true),
            ),
            ("failing", Box::new(|e: &mut Entry| e.crash_streak = 1)),
            ("to be pruned", Box::new(|e: &mut Entry| e.prune = true)),
            (
                "reverted",
                Box::new(|e: &mut Entry| {
                    e.dirty = Some(Trigger::Resync);
                    e.in_flight = true;
                    e.status.revert = None;
                    e.revert = Some(crate::watch::revert::Revert {
                        from: "failed".into(),
                        to: std::sync::Arc::new(crate::plan::tests::base("b")),
                        to_spec: "healthy".into(),
                        probe: "agent".into(),
                        answer: "no".into(),
                        state: crate::watch::revert::RevertState::Reverted,
                    });
                }),
            ),
            (
                "held",
                Box::new(|e: &mut Entry| e.status.held = vec!["x".into(), "why".into()]),
            ),
            ("failing", Box::new(|e: &mut Entry| e.failures = 1)),
            (
                "health pending",
                Box::new(|e: &mut Entry| e.status.health = Some(HealthStatus::pending(1))),
            ),
            (
                "unhealthy",
                Box::new(|e: &mut Entry| {
                    e.status.health = Some(HealthStatus::judged(
                        &crate::vm::health::Verdict::Unhealthy {
                            probe: "agent".into(),
                            answer: "no".into(),
                        },
                        1,
                    ));
                }),
            ),
            (
                "its spec fails to load",
                Box::new(|e: &mut Entry| e.status.spec_error = Some("x".into())),
            ),
        ];
        for (why, set) in cases {
            let mut vms = vms.clone();
            set(vms.get_mut("b").expect("b"));
            assert_eq!(
                unsettled(&vms, 0),
                Some(format!("1 VM(s) not settled; first: b {why}"))
            );
        }
    }

    #[test]
    fn the_soak_starts_again_with_a_new_revision_or_any_unsettled_moment() {
        let mut s = Soak::default();
        assert_eq!(s.update(None, true, 10), None, "nothing in force");
        assert_eq!(s.update(Some("r1"), false, 11), None);
        assert_eq!(s.update(Some("r1"), true, 12), Some(12));
        assert_eq!(s.update(Some("r1"), true, 20), Some(12), "still since 12");
        assert_eq!(s.update(Some("r1"), false, 21), None, "a flap");
        assert_eq!(s.update(Some("r1"), true, 22), Some(22));
        assert_eq!(s.update(Some("r2"), true, 30), Some(30), "a new revision");
        s.disturb();
        assert_eq!(s.update(Some("r2"), true, 31), Some(31), "a change made");
    }

    #[test]
    fn a_revision_shows_its_commit() {
        assert_eq!(sha_of("main@sha1:abc"), "abc");
        assert_eq!(sha_of("abc"), "abc");
    }
}
