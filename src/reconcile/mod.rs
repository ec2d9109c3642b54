//! The pipeline every command shares: load → observe → plan → hold →
//! (pre-flight, execute). `plan` and `apply` are [`Planned`] plus their edges
//! (printing, asking, exit codes); `watch` runs [`reconcile_vm`] per VM. Both
//! hold by the one disruption rule, [`crate::plan::hold`].
//!
//! # Guarantees
//! - One VM that cannot be observed (hung or closed control channel, corrupt
//!   record, dead process) becomes *unknown* with its reason; every other VM
//!   is observed, planned and applied. Observation runs concurrently with a
//!   deadline per VM, so a host with a stuck VM answers within one deadline.
//! - Blocking work (reading the spec directory) runs off the async workers.

pub mod history;
pub mod vm;

pub use vm::{Outcome, VmJob, VmReconciled, reconcile_vm};

use crate::apply::{self, ApplyError, ApplyOptions, Progress, VmOutcome};
use crate::plan::hold::{self, Hold, Limits};
use crate::plan::saved::{self, MAX_SAVED_PLAN_BYTES, SavedPlan, SavedPlanError};
use crate::plan::{self, Plan, PlanOptions};
use crate::spec::{self, Loaded};
use crate::vm::health::Verdict;
use crate::vm::{Chain, Disruption, Observe, ObservedState, Virtstack, VmError, VmName};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long observing one VM may take before it counts as unknown. Above the
/// QMP deadline (10 s), so a VM that answers slowly is still seen.
pub const OBSERVE_DEADLINE: Duration = Duration::from_secs(12);

/// Loads a spec directory on the blocking pool (it reads many files).
pub async fn load(dir: PathBuf, placement: Option<spec::Placement>) -> Loaded {
    let shown = dir.clone();
    tokio::task::spawn_blocking(move || spec::load_dir_placed(&dir, placement.as_ref()))
        .await
        .unwrap_or_else(|e| Loaded {
            desired: Default::default(),
            errors_elsewhere: Vec::new(),
            errors: vec![spec::SpecError::whole_file(
                &shown,
                format!("loading failed: {e}"),
            )],
            // Whatever the policy says is unknown: nothing disruptive goes.
            policy: Some(Arc::new(spec::policy::Windows::broken())),
        })
}

/// Observes every VM the virtstack manages, each on its own with
/// [`OBSERVE_DEADLINE`]: a VM that fails is recorded as unknown, with why.
///
/// # Errors
/// Only when the virtstack cannot even list its VMs.
pub async fn observe_all(vs: &dyn Observe) -> Result<ObservedState, VmError> {
    observe_all_within(vs, OBSERVE_DEADLINE).await
}

/// [`observe_all`] with another deadline per VM.
pub async fn observe_all_within(
    vs: &dyn Observe,
    deadline: Duration,
) -> Result<ObservedState, VmError> {
    let names = vs.list().await?;
    let each = names.iter().map(|name| async move {
        let seen = tokio::time::timeout(deadline, vs.observe(name)).await;
        (name, seen)
    });
    let mut out = ObservedState::default();
    for (name, seen) in futures_util::future::join_all(each).await {
        match seen {
            Ok(Ok(vm)) => {
                out.vms.insert(name.to_string(), vm);
            }
            Ok(Err(e)) => {
                out.unknown.insert(name.to_string(), Chain(&e).to_string());
            }
            Err(_) => {
                out.unknown
                    .insert(name.to_string(), format!("no answer within {deadline:?}"));
            }
        }
    }
    Ok(out)
}

/// The saved plan at `path` (`plan --out`), when the file is one; a spec
/// file or directory is not. Read bounded.
///
/// # Errors
/// When it cannot be read, is larger than any saved plan, or is one that
/// does not parse.
pub fn read_saved_plan(path: &std::path::Path) -> Result<Option<SavedPlan>, SavedPlanError> {
    use std::io::Read;
    if !path.is_file() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SAVED_PLAN_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|source| SavedPlanError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if !saved::looks_saved(&bytes) {
        return Ok(None);
    }
    if bytes.len() as u64 > MAX_SAVED_PLAN_BYTES {
        return Err(SavedPlanError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    SavedPlan::parse(path, &bytes).map(Some)
}

/// Why nothing could be planned.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The virtstack cannot list its VMs.
    #[error(transparent)]
    List(#[from] VmError),
    /// `--only` names a VM that neither the specs nor the host have.
    #[error(transparent)]
    UnknownOnly(#[from] UnknownOnly),
}

/// `--only` names that match no spec and no VM of the host: a typo would
/// otherwise read as "No changes" (issue 30).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--only {}: no spec and no VM of this host has {}{}", names.join(", "), if names.len() == 1 { "that name" } else { "these names" }, suggestion(hints))]
pub struct UnknownOnly {
    /// The names given that match nothing.
    pub names: Vec<String>,
    /// For each, a close name that does exist.
    pub hints: Vec<(String, String)>,
}

fn suggestion(hints: &[(String, String)]) -> String {
    if hints.is_empty() {
        return String::new();
    }
    let each: Vec<String> = hints
        .iter()
        .map(|(given, close)| format!("{close} for {given}"))
        .collect();
    format!(" (did you mean {}?)", each.join(", "))
}

/// Checks that every name of `only` is a spec's (valid, broken or placed
/// elsewhere) or a VM's of the host.
///
/// # Errors
/// [`UnknownOnly`], with the closest existing name for each where one is
/// close (Jaro–Winkler over 0.8, as cargo suggests commands).
pub fn check_only(
    only: &[VmName],
    desired: &spec::DesiredState,
    observed: &ObservedState,
) -> Result<(), UnknownOnly> {
    let known: BTreeSet<&str> = desired
        .vms
        .keys()
        .chain(desired.unknown.iter())
        .chain(desired.elsewhere.iter())
        .chain(observed.vms.keys())
        .chain(observed.unknown.keys())
        .map(String::as_str)
        .collect();
    let names: Vec<String> = only
        .iter()
        .map(VmName::as_str)
        .filter(|n| !known.contains(n))
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let hints = names
        .iter()
        .filter_map(|given| {
            known
                .iter()
                .map(|k| (strsim::jaro_winkler(given, k), *k))
                .filter(|(score, _)| *score > 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, k)| (given.clone(), k.to_string()))
        })
        .collect();
    Err(UnknownOnly { names, hints })
}

/// A plan with what it was computed from: what `plan` shows and `apply`
/// executes.
#[derive(Debug)]
pub struct Planned {
    /// The specs (and their errors).
    pub loaded: Loaded,
    /// What the virtstack had (and the VMs it could not show).
    pub observed: ObservedState,
    /// The plan.
    pub plan: Plan,
    /// VMs that would attach an image another VM of the host has, judged
    /// over the whole host (`--only` narrows `observed`, never this).
    held: Vec<plan::Refused>,
}

impl Planned {
    /// Plans `loaded` against `observed`; with `only`, for those VMs alone
    /// (the others are neither planned nor counted as unobserved). A prune
    /// is judged against the whole host ([`plan::prune::guard`]).
    ///
    /// # Errors
    /// When `only` names a VM neither the specs nor the host have.
    pub fn new(
        mut loaded: Loaded,
        mut observed: ObservedState,
        vs: &dyn Observe,
        opts: &PlanOptions,
        only: &[VmName],
    ) -> Result<Self, UnknownOnly> {
        check_only(only, &loaded.desired, &observed)?;
        // What a prune could remove: managed, observed, not protected.
        let host_vms = observed
            .vms
            .values()
            .filter(|v| v.managed && !v.config.policy.protected)
            .count();
        let selection = plan::prune::Selection {
            here: loaded.desired.vms.len() + loaded.desired.unknown.len(),
            elsewhere: loaded.desired.elsewhere.len(),
            by: loaded.desired.placed_by.clone(),
        };
        // Images are judged against every VM of the host, not only those named.
        let whole_host = (!only.is_empty()).then(|| observed.clone());
        if !only.is_empty() {
            let only: BTreeSet<&str> = only.iter().map(VmName::as_str).collect();
            loaded.desired.vms.retain(|n, _| only.contains(n.as_str()));
            observed.vms.retain(|n, _| only.contains(n.as_str()));
            observed.unknown.retain(|n, _| only.contains(n.as_str()));
        }
        let mut plan = plan::plan(&loaded.desired, &observed, vs.capabilities(), opts);
        plan::prune::guard(&mut plan, host_vms, &selection, &opts.guard);
        let mut held = plan::images::held_by_others(
            &plan,
            &loaded.desired,
            whole_host.as_ref().unwrap_or(&observed),
        );
        // A health probe the virtstack does not run: said for every VM that
        // asks for one, changed or not (its health could never be judged).
        for (name, want) in &loaded.desired.vms {
            if held.iter().any(|r| r.vm == *name) {
                continue;
            }
            let refusals = vs.capabilities().probe_refusals(&want.config);
            if let Some((field, why)) = refusals.first() {
                held.push(plan::Refused::new(name, want, &format!("{field}: {why}")));
            }
        }
        Ok(Planned {
            loaded,
            observed,
            plan,
            held,
        })
    }

    /// The VMs `limits` holds, each with every reason ([`hold::holds`]).
    pub fn held(&self, limits: &Limits) -> Vec<(&str, Vec<Hold>)> {
        self.plan
            .vms
            .iter()
            .map(|v| (v.name.as_str(), hold::holds(v, limits)))
            .filter(|(_, h)| !h.is_empty())
            .collect()
    }

    /// The VMs whose changes the maintenance windows of the policy beside
    /// the specs hold at `now` (seconds since the epoch), with why.
    pub fn outside_windows(&self, now: i64) -> Vec<(&str, Hold)> {
        let Some(policy) = &self.loaded.policy else {
            return Vec::new();
        };
        self.plan
            .vms
            .iter()
            .filter_map(|v| {
                let labels = &self.loaded.desired.vms.get(&v.name)?.labels;
                let limits = Limits {
                    window: Some(policy.gate(labels, now)),
                    ..Limits::default()
                };
                let hold = hold::holds(v, &limits)
                    .into_iter()
                    .find(|h| matches!(h, Hold::OutsideWindow { .. }))?;
                Some((v.name.as_str(), hold))
            })
            .collect()
    }

    /// `(limit, needed)` when a VM needs more than the ceiling of `limits`:
    /// the most any needs.
    pub fn exceeds(&self, limits: &Limits) -> Option<(Disruption, Disruption)> {
        self.held(limits)
            .into_iter()
            .flat_map(|(_, h)| h)
            .filter_map(|h| match h {
                Hold::AboveCeiling { needs, limit } => Some((limit, needs)),
                _ => None,
            })
            .max_by_key(|(_, needs)| *needs)
    }

    /// The VMs the plan recreates that neither their spec's policy
    /// (`policy.allowRecreate`) nor `--allow-recreate` allows: a policy
    /// stop before anything runs, as the executor would refuse each.
    pub fn recreates_refused(&self, limits: &Limits) -> Vec<&str> {
        self.held(limits)
            .into_iter()
            .filter(|(_, h)| h.contains(&Hold::RecreateNotAllowed))
            .map(|(vm, _)| vm)
            .collect()
    }

    /// The VMs that would be refused before anything changed: an image
    /// another VM of the host has (writable on either side), and, on a live
    /// virtstack, what it refuses (host paths, image formats, cold
    /// settings): `(vm, why)`, one per VM.
    ///
    /// Each names its spec field at its line and column (the spec file is
    /// read again, bounded, for the position).
    pub fn refused(&self, vs: Option<&dyn Virtstack>) -> Vec<plan::Refused> {
        let mut refused = self.held.clone();
        if let Some(vs) = vs {
            for r in apply::preflight(&self.plan, &self.loaded.desired, vs) {
                if !refused.iter().any(|x| x.vm == r.vm) {
                    refused.push(r);
                }
            }
        }
        for r in &mut refused {
            if let Some((l, c)) = spec::field_position(&r.file, r.doc, &r.field) {
                (r.line, r.column) = (Some(l), Some(c));
            }
        }
        refused.sort();
        refused
    }

    /// Writes what `outcome` applied into its VM's history, with the
    /// verdict `--wait-healthy` reached.
    async fn record(
        &self,
        vs: &dyn Virtstack,
        outcome: &VmOutcome,
        opts: ApplyOptions,
        revision: Option<String>,
    ) {
        let Some(want) = self.loaded.desired.vms.get(&outcome.name) else {
            return;
        };
        // Applied whole: what failed after the change (its health, the
        // wait) leaves the VM changed.
        let applied = match &outcome.result {
            Ok(()) => true,
            Err(e) => e.after_the_change(),
        };
        if outcome.steps == 0 || !applied {
            return;
        }
        let Ok(name) = VmName::new(&outcome.name) else {
            return;
        };
        let verdict = match &outcome.result {
            _ if want.config.health.is_none() || opts.wait_healthy.is_none() => None,
            Ok(()) => Some(Verdict::Healthy),
            Err(ApplyError::Unhealthy { probe, answer }) => Some(Verdict::Unhealthy {
                probe: probe.clone(),
                answer: answer.clone(),
            }),
            Err(_) => None,
        };
        let note = history::Note {
            applied: Some(&want.config),
            revision,
            verdicts: verdict
                .map(|v| (want.config.digest(), v))
                .into_iter()
                .collect(),
            ..history::Note::default()
        };
        history::write(vs, &name, note).await;
    }

    /// How many VMs could not be observed (and so were not planned).
    pub fn unobserved(&self) -> usize {
        self.observed.unknown.len()
    }

    /// Executes the plan (every VM in parallel, each on its own), and
    /// writes what it applied into each VM's history, with the source
    /// `revision` the specs came from.
    pub async fn apply(
        &self,
        vs: Arc<dyn Virtstack>,
        opts: ApplyOptions,
        revision: Option<String>,
        progress: Progress,
    ) -> Applied {
        let started = Instant::now();
        let outcomes = apply::apply(
            &self.plan,
            &self.loaded.desired,
            Arc::clone(&vs),
            opts,
            progress,
        )
        .await;
        for outcome in &outcomes {
            self.record(vs.as_ref(), outcome, opts, revision.clone())
                .await;
        }
        Applied {
            outcomes,
            elapsed: started.elapsed(),
            unobserved: self.unobserved(),
        }
    }
}

/// How an apply went.
#[derive(Debug)]
pub struct Applied {
    /// Each planned VM's outcome, by name.
    pub outcomes: Vec<VmOutcome>,
    /// How long it took.
    pub elapsed: Duration,
    /// VMs that could not be observed, so were not applied.
    pub unobserved: usize,
}

impl Applied {
    /// The VMs whose apply failed.
    pub fn failed(&self) -> Vec<&str> {
        self.outcomes
            .iter()
            .filter(|o| o.result.is_err())
            .map(|o| o.name.as_str())
            .collect()
    }

    /// Every VM is as its spec says: none failed, none went unobserved.
    pub fn converged(&self) -> bool {
        self.unobserved == 0 && self.outcomes.iter().all(|o| o.result.is_ok())
    }
}

impl std::fmt::Display for Applied {
    /// The summary line, then each failure's reasons. "Changed" counts
    /// every VM a step went through for, a failed one too: what was done
    /// stays done.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let changed = self.outcomes.iter().filter(|o| o.steps > 0).count();
        let failed: Vec<String> = self
            .outcomes
            .iter()
            .filter(|o| o.result.is_err())
            .map(|o| match o.steps {
                0 => o.name.clone(),
                n => format!(
                    "{} (part-way: {n} step{} done)",
                    o.name,
                    if n == 1 { "" } else { "s" }
                ),
            })
            .collect();
        write!(
            f,
            "Apply: {changed} VM(s) changed, {} failed{}{} in {:.1}s",
            failed.len(),
            if failed.is_empty() { "" } else { ": " },
            failed.join(", "),
            self.elapsed.as_secs_f64()
        )?;
        if self.unobserved > 0 {
            write!(
                f,
                "; {} VM(s) could not be observed and were not applied",
                self.unobserved
            )?;
        }
        for o in &self.outcomes {
            if let Err(e) = &o.result {
                write!(f, "\n  {}: {}", o.name, Chain(e))?;
            }
        }
        Ok(())
    }
}

/// Loads, observes and plans: what `plan` shows and `apply` starts from.
pub async fn plan_dir(
    dir: PathBuf,
    placement: Option<spec::Placement>,
    vs: &dyn Observe,
    opts: &PlanOptions,
    only: &[VmName],
) -> Result<Planned, ReconcileError> {
    let loaded = load(dir, placement).await;
    let observed = observe_all(vs).await?;
    Ok(Planned::new(loaded, observed, vs, opts, only)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::ApplyError;

    /// Issue 30: `plan --only dmeo --detailed-exitcode` printed "No changes"
    /// and exited 0.
    #[test]
    fn only_naming_nothing_is_an_error_with_the_close_name() {
        let mut desired = spec::DesiredState::default();
        desired.unknown.insert("broken".into());
        desired.elsewhere.insert("away".into());
        let mut observed = ObservedState::default();
        observed.unknown.insert("demo".into(), "hung".into());
        let name = |n: &str| VmName::new(n).expect("name");
        assert_eq!(
            check_only(
                &[name("demo"), name("broken"), name("away")],
                &desired,
                &observed
            ),
            Ok(())
        );
        let e = check_only(&[name("dmeo"), name("zzz")], &desired, &observed).expect_err("unknown");
        assert_eq!(e.names, ["dmeo", "zzz"]);
        assert_eq!(
            e.to_string(),
            "--only dmeo, zzz: no spec and no VM of this host has these names (did you mean demo for dmeo?)"
        );
    }

    /// Issue 20: a VM that failed part-way is counted among the changed,
    /// and says how far it got (it read `0 VM(s) changed` after a removal).
    #[test]
    fn the_summary_counts_what_really_changed() {
        let outcome = |name: &str, ok: bool, steps: usize| VmOutcome {
            name: name.into(),
            result: if ok {
                Ok(())
            } else {
                Err(ApplyError::Inconsistent("qmp migrate failed".into()))
            },
            steps,
        };
        let applied = Applied {
            outcomes: vec![
                outcome("a", true, 2),
                outcome("b", false, 1),
                outcome("c", false, 0),
            ],
            elapsed: Duration::from_millis(1500),
            unobserved: 1,
        };
        assert_eq!(
            applied.to_string(),
            "Apply: 2 VM(s) changed, 2 failed: b (part-way: 1 step done), c in 1.5s; \
             1 VM(s) could not be observed and were not applied\n  \
             b: qmp migrate failed\n  c: qmp migrate failed"
        );
        assert!(!applied.converged());
    }

    /// Issue 34: a probe kind the virtstack does not run refuses the VM at
    /// plan time, at the probe's field, with the virtstack's reason; one it
    /// runs is no refusal.
    #[test]
    fn a_health_probe_the_virtstack_cannot_run_is_refused_at_plan_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = |name: &str, kind: &str| {
            format!(
                "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: {name}\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: /k/vmlinuz\n  processors:\n    count: 1\n  memory:\n    sizeMB: 64\n  health:\n    probes:\n      - kind: agent\n      - kind: {kind}\n"
            )
        };
        std::fs::write(dir.path().join("a.yaml"), spec("a", "notify")).expect("write");
        std::fs::write(
            dir.path().join("b.yaml"),
            spec("b", "console\n        pattern: x"),
        )
        .expect("write");
        let loaded = spec::load_dir(dir.path());
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let qemu = crate::virtstack::fake::Fake::new(crate::vm::Capabilities::qemu(
            &crate::vm::HostFacts::default(),
        ));
        let planned = Planned::new(
            loaded,
            ObservedState::default(),
            &qemu,
            &PlanOptions::default(),
            &[],
        )
        .expect("planned");
        let refused = planned.refused(None);
        assert_eq!(refused.len(), 1, "{refused:?}");
        let r = &refused[0];
        assert_eq!(
            (r.vm.as_str(), r.field.as_str(), r.line, r.column),
            ("a", "spec.health.probes[1].kind", Some(16), Some(9))
        );
        assert_eq!(
            r.message,
            "notify probes: the guest says READY=1 over vsock, which needs vhost-device-vsock on this host"
        );
        let hcs = crate::virtstack::fake::Fake::new(crate::vm::Capabilities::hcs());
        let loaded = spec::load_dir(dir.path());
        let planned = Planned::new(
            loaded,
            ObservedState::default(),
            &hcs,
            &PlanOptions::default(),
            &[],
        )
        .expect("planned");
        let refused: Vec<String> = planned
            .refused(None)
            .iter()
            .map(|r| format!("{}: {}: {}", r.vm, r.field, r.message))
            .collect();
        assert_eq!(
            refused,
            [
                "a: spec.health.probes[0].kind: agent probes: the hcs virtstack has no way to probe a guest",
                "b: spec.health.probes[0].kind: agent probes: the hcs virtstack has no way to probe a guest",
            ]
        );
    }
}
