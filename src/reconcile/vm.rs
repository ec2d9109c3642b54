//! One VM's reconcile, end to end: observe it, plan it, hold what the
//! disruption rule forbids ([`crate::plan::hold`]), check its host paths,
//! apply. The watcher runs this per VM; `plan` and `apply` run the same
//! steps over the whole set ([`super::Planned`]), with the same rule.

use super::OBSERVE_DEADLINE;
use super::history;
use crate::apply::{self, ApplyOptions, Progress};
use crate::plan::hold::{self, Limits};
use crate::plan::{self, PlanOptions, VmAction};
use crate::spec::{DesiredState, DesiredVm, PowerState, VmConfig};
use crate::vm::health::Verdict;
use crate::vm::history::History;
use crate::vm::{Chain, Disruption, ErrorKind, ObservedState, State, Virtstack, VmName};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What one VM's reconcile came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to do.
    InSync,
    /// These many operations were applied.
    Applied(usize),
    /// The VM was removed (pruned).
    Pruned,
    /// Changes held back, one line each; the last says why.
    Held(Vec<String>),
    /// It failed; retried with backoff.
    Failed(String),
    /// It crashed again too soon: relaunched no sooner than the backoff says.
    BackingOff,
    /// Someone else held the state directory's lock; retried shortly.
    Busy,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::InSync => f.write_str("in sync"),
            Outcome::Applied(n) => write!(f, "applied {n} change(s)"),
            Outcome::Pruned => f.write_str("pruned"),
            // The last line says why they are held.
            Outcome::Held(h) => write!(f, "held {} change(s)", h.len().saturating_sub(1)),
            Outcome::Failed(why) => write!(f, "failed: {why}"),
            Outcome::BackingOff => f.write_str("backing off"),
            Outcome::Busy => f.write_str("state directory busy"),
        }
    }
}

/// The images a VM attaches: (path, read-only).
pub type Images = Vec<(PathBuf, bool)>;

/// One VM to reconcile, with what its caller knows of it.
#[derive(Debug, Clone)]
pub struct VmJob {
    /// The VM.
    pub name: VmName,
    /// Its spec (its last good one), if any.
    pub desired: Option<DesiredVm>,
    /// Remove it if it has no spec.
    pub prune: bool,
    /// Spec files that failed to load (they may define it: no prune then).
    pub failed_files: BTreeSet<PathBuf>,
    /// What the run may do.
    pub limits: Limits,
    /// A VM found crashed may be relaunched now (its backoff has run out).
    pub may_relaunch: bool,
    /// The host's other VMs whose images the caller has not seen: looked
    /// at before an image is attached.
    pub unseen: Vec<VmName>,
    /// The source revision its spec comes from, for its history.
    pub revision: Option<String>,
    /// `desired` is a revert to an earlier configuration, away from the
    /// spec of this digest.
    pub reverted_from: Option<String>,
    /// Verdicts of its earlier changes' judgements to write into its
    /// history, by the digest of the spec judged.
    pub verdicts: Vec<(String, Verdict)>,
}

/// What one VM's reconcile found and did.
#[derive(Debug, Clone)]
pub struct VmReconciled {
    /// What came of it.
    pub outcome: Outcome,
    /// The VM had exited on its own, with this error (it was rebuilt, or
    /// waits to be).
    pub crashed: Option<String>,
    /// It was (re)launched.
    pub launched: bool,
    /// The plan's summary line, or `no changes`.
    pub plan: String,
    /// It runs (or is paused) as far as this reconcile knows: its events
    /// are worth following.
    pub live: bool,
    /// Its state as this reconcile left it (`None`: no such VM).
    pub state: Option<State>,
    /// The images it has as this reconcile left it; `None`: not known.
    pub images: Option<Images>,
    /// The images of the other VMs looked at ([`VmJob::unseen`]).
    pub others: Vec<(String, Images)>,
    /// Its history as this reconcile left it; `None`: not read (a VM
    /// without `spec.health` that nothing was applied to), or not there.
    pub history: Option<History>,
    /// Held outside its maintenance window, which opens then (seconds since
    /// the epoch): when to try again.
    pub window_opens: Option<i64>,
}

impl Default for VmReconciled {
    fn default() -> Self {
        VmReconciled {
            outcome: Outcome::InSync,
            crashed: None,
            launched: false,
            plan: "no changes".into(),
            live: false,
            state: None,
            images: None,
            others: Vec::new(),
            history: None,
            window_opens: None,
        }
    }
}

impl VmReconciled {
    /// A reconcile that failed before it found anything.
    pub fn failed(why: String) -> Self {
        VmReconciled {
            outcome: Outcome::Failed(why),
            ..VmReconciled::default()
        }
    }
}

/// The images `cfg` attaches.
pub fn images_of(cfg: &VmConfig) -> Images {
    cfg.images()
        .map(|i| (i.path.to_path_buf(), i.read_only))
        .collect()
}

/// What VMs hold which images, by path; `state` says how it is known.
pub fn index_images<'a>(
    vms: impl Iterator<Item = (&'a String, &'a Images)>,
    state: &'a str,
) -> plan::images::Index<'a> {
    plan::images::index(vms.flat_map(move |(vm, images)| {
        images
            .iter()
            .map(move |(path, read_only)| plan::images::Holding {
                vm,
                state,
                path,
                read_only: *read_only,
            })
    }))
}

/// The state a VM brought to `power` is in.
fn state_for(power: PowerState) -> State {
    match power {
        PowerState::Running => State::Running,
        PowerState::Paused => State::Paused,
        PowerState::Stopped => State::Created,
        PowerState::Saved => State::Saved,
    }
}

/// Reconciles one VM: observe, plan, hold or apply, writing into `done` as
/// it goes, so a caller whose deadline cuts it short still has what it
/// found (the VM's state, the plan). Then its history: what was applied,
/// the verdicts the job carries, and (for a VM with `spec.health`) the
/// history read back for the caller's revert. The deadline and the state
/// directory's lock are the caller's.
pub async fn reconcile_vm(vs: &Arc<dyn Virtstack>, job: &VmJob, done: &mut VmReconciled) {
    reconcile_steps(vs, job, done).await;
    let applied = matches!(done.outcome, Outcome::Applied(_))
        .then(|| job.desired.as_ref().map(|d| &*d.config))
        .flatten();
    let judged = job
        .desired
        .as_ref()
        .is_some_and(|d| d.config.health.is_some());
    if done.state.is_none() || (applied.is_none() && !judged && job.verdicts.is_empty()) {
        return;
    }
    let note = history::Note {
        applied,
        revision: job.revision.clone(),
        reverted_from: job.reverted_from.clone(),
        verdicts: job.verdicts.clone(),
    };
    done.history = history::write(vs.as_ref(), &job.name, note).await;
}

async fn reconcile_steps(vs: &Arc<dyn Virtstack>, job: &VmJob, done: &mut VmReconciled) {
    let vm = job.name.to_string();
    let mut observed = ObservedState::default();
    // Observed straight away: a VM the virtstack does not have answers
    // NotFound, so no listing of every VM comes first.
    match tokio::time::timeout(OBSERVE_DEADLINE, vs.observe(&job.name)).await {
        Ok(Ok(o)) => {
            done.images = Some(images_of(&o.config));
            done.live = o.state.is_live();
            done.state = Some(o.state);
            done.crashed.clone_from(&o.exit_error);
            observed.vms.insert(vm.clone(), o);
        }
        Ok(Err(e)) if e.kind() == ErrorKind::NotFound => done.images = Some(Vec::new()),
        Ok(Err(e)) => {
            done.outcome = Outcome::Failed(format!("cannot observe: {}", Chain(&e)));
            return;
        }
        Err(_) => {
            done.outcome = Outcome::Failed(format!(
                "cannot observe: no answer within {OBSERVE_DEADLINE:?}"
            ));
            return;
        }
    }
    // Detect-only relaunches nothing, so there is nothing to wait for.
    if done.crashed.is_some()
        && job.desired.is_some()
        && !job.may_relaunch
        && !job.limits.detect_only
    {
        done.outcome = Outcome::BackingOff;
        return;
    }
    let mut desired = DesiredState {
        failed_files: job.failed_files.clone(),
        ..DesiredState::default()
    };
    if let Some(d) = &job.desired {
        desired.vms.insert(vm.clone(), d.clone());
    }
    // How many may be pruned is decided over the whole set by the caller;
    // this set is one VM.
    let opts = PlanOptions {
        prune: job.prune,
        ..PlanOptions::default()
    };
    let the_plan = plan::plan(&desired, &observed, vs.capabilities(), &opts);
    let Some(vm_plan) = the_plan.vms.first() else {
        return;
    };
    done.plan = plan::render::summary_line(&the_plan.summary());
    // A VM that died on its own is down already: bringing it back disrupts
    // no one, so no maintenance window holds it.
    let limits = Limits {
        window: job.limits.window.filter(|_| done.crashed.is_none()),
        ..job.limits
    };
    if let Some(why) = hold::hold(vm_plan, &limits) {
        if let hold::Hold::OutsideWindow { next_open, .. } = why {
            done.window_opens = next_open;
        }
        done.outcome = Outcome::Held(hold::held_lines(vm_plan, why));
        return;
    }
    if let Some(why) = refusal(vs.as_ref(), job, &the_plan, &desired, &observed, done).await {
        done.outcome = Outcome::Failed(format!("refused: {why}"));
        return;
    }
    let vm_name = vm.clone();
    let progress: Progress = Arc::new(move |_vm: &str, msg: &str| {
        tracing::info!(vm = %vm_name, "{msg}");
    });
    let outcomes = apply::apply(
        &the_plan,
        &desired,
        Arc::clone(vs),
        ApplyOptions {
            allow_recreate: job.limits.allow_recreate,
            ..ApplyOptions::default()
        },
        progress,
    )
    .await;
    done.launched = matches!(vm_plan.action, VmAction::Create | VmAction::Recreate)
        || vm_plan
            .ops
            .iter()
            .any(|o| matches!(o.disruption, Disruption::Restart | Disruption::Recreate))
        || done.crashed.is_some();
    done.outcome = match outcomes.iter().find_map(|o| o.result.as_ref().err()) {
        Some(e) => Outcome::Failed(Chain(e).to_string()),
        None if vm_plan.action == VmAction::Destroy => {
            done.state = None;
            Outcome::Pruned
        }
        None => {
            let power = job.desired.as_ref().map(|d| d.config.power_state);
            done.state = power.map(state_for);
            done.live = done.state.is_some_and(State::is_live);
            done.images = Some(
                job.desired
                    .as_ref()
                    .map(|d| images_of(&d.config))
                    .unwrap_or_default(),
            );
            // Counted as the plan's summary counts (a VM created is one
            // addition, not one per item of its spec).
            let s = the_plan.summary();
            Outcome::Applied((s.add + s.change + s.remove + s.recreate).max(1))
        }
    };
}

/// Why the plan may not run on this host: a health probe the virtstack does
/// not run, a host path it refuses, or an image another VM has.
async fn refusal(
    vs: &dyn Virtstack,
    job: &VmJob,
    the_plan: &plan::Plan,
    desired: &DesiredState,
    observed: &ObservedState,
    done: &mut VmReconciled,
) -> Option<String> {
    let vm_plan = the_plan.vms.first()?;
    if let Some(want) = &job.desired
        && let Some((field, why)) = vs.capabilities().probe_refusals(&want.config).first()
    {
        return Some(format!("{field}: {why}"));
    }
    // Every host path is checked before a launch; a live change checks
    // the paths it adds itself (the change verb opens them), so a VM that
    // only changes live is not re-read whole on every edit.
    let launches = matches!(vm_plan.action, VmAction::Create | VmAction::Recreate)
        || vm_plan
            .ops
            .iter()
            .any(|o| o.disruption == Disruption::Restart);
    if launches && let Some(why) = apply::preflight(the_plan, desired, vs).first() {
        return Some(why.to_string());
    }
    // Images the caller could not judge before (VMs it never reconciled):
    // looked at now, once, before one is attached.
    let want = job.desired.as_ref()?;
    if want.config.images().next().is_none() || job.unseen.is_empty() {
        return None;
    }
    for other in &job.unseen {
        if let Ok(Ok(o)) = tokio::time::timeout(OBSERVE_DEADLINE, vs.observe(other)).await {
            done.others.push((other.to_string(), images_of(&o.config)));
        }
    }
    let vm = job.name.as_str();
    let has: BTreeSet<&Path> = observed
        .vms
        .get(vm)
        .map(|o| o.config.images().map(|i| i.path).collect())
        .unwrap_or_default();
    let held = index_images(done.others.iter().map(|(vm, i)| (vm, i)), "on this host");
    let (field, why) = plan::images::clashes(vm, &want.config, &has, &held, &|_| false);
    field.map(|f| format!("{f}: {why}"))
}
