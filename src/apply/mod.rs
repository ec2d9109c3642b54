//! ⑤ The executor: runs a [`Plan`] against any [`Virtstack`], VM by VM
//! (VMs in parallel, operations within one VM in plan order).
//!
//! # Guarantees
//! - A VM with an operation its virtstack cannot do is not touched at all.
//! - A recreate happens only when `--allow-recreate` or the spec's policy allows it.
//! - A failing or hanging VM does not stop the others; each gets its own outcome.
//! - Every live change is one [`Virtstack::change`], which the virtstack
//!   keeps at once, so a later restart launches what the VM really has.
//!
//! # Assumptions
//! - One executor per state directory at a time (the CLI holds a lock).
//!
//! # Caveats
//! - An unplug the guest never acknowledges fails the VM and leaves the
//!   device in place; the next plan shows the removal again.

pub mod healthy;
pub mod lock;

use crate::plan::hold::{self, Hold, Limits};
use crate::plan::{Op, Plan, ResourceKind, VmAction, VmPlan, observed_power};
use crate::spec::{DesiredState, PowerState, VmConfig};
use crate::vm::{Chain, Change, Disruption, State, Virtstack, VmError, VmName};
use std::sync::Arc;

/// Why one VM could not be brought to its spec.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The virtstack failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Some operation cannot be done by this virtstack.
    #[error("not applied: {0}")]
    Unsupported(String),
    /// A recreate is needed but not allowed.
    #[error("must be recreated ({0}), which needs --allow-recreate or spec.policy.allowRecreate")]
    RecreateNotAllowed(String),
    /// The guest did not open its agent port in time (`--wait-healthy`
    /// without `spec.health`).
    #[error("the guest did not open its agent port within {0:?}; it runs on")]
    NotReady(std::time::Duration),
    /// A probe of `spec.health` judged the change unhealthy (the answer is
    /// the guest's text, shown escaped).
    #[error("unhealthy: probe {probe}: {}; it runs on", crate::escape::escaped(.answer))]
    Unhealthy {
        /// The probe, as the spec's labels name it (`panic` for a panic).
        probe: String,
        /// Its last answer.
        answer: String,
    },
    /// No verdict of `spec.health` within `--wait-healthy`'s time.
    #[error("not yet judged healthy within {0:?} (--wait-healthy); it runs on")]
    HealthPending(std::time::Duration),
    /// The plan and the VM disagree (changed since planning).
    #[error("{0}")]
    Inconsistent(String),
    /// Stopped between two steps when asked to (Ctrl+C).
    #[error("interrupted: stopped after the step in flight; `uvmctl plan` shows what is left")]
    Interrupted,
}
impl ApplyError {
    /// The change itself went through; what failed came after it (the
    /// guest's health, the wait for it).
    pub fn after_the_change(&self) -> bool {
        matches!(
            self,
            ApplyError::NotReady(_) | ApplyError::Unhealthy { .. } | ApplyError::HealthPending(_)
        )
    }
}

/// Choices for one apply.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// Recreate VMs whose spec policy does not allow it.
    pub allow_recreate: bool,
    /// Wait up to this long for each VM meant to run to be judged healthy
    /// by its `spec.health`, or without one to open its guest agent port
    /// (a guest without uvmctl's agent never does).
    pub wait_healthy: Option<std::time::Duration>,
    /// Once set, every VM stops after the step in flight (Ctrl+C): a step
    /// is never cut in half.
    pub interrupt: Option<&'static std::sync::atomic::AtomicBool>,
}

/// A long wait shows as it goes: after 2 s, then every 5 s.
async fn with_ticker<T>(
    progress: &Progress,
    vm: &str,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    let started = std::time::Instant::now();
    tokio::pin!(fut);
    let mut next = std::time::Duration::from_secs(2);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(started + next)) => {
                progress(vm, &format!("still {what} ({}s)", next.as_secs()));
                next += std::time::Duration::from_secs(5);
            }
        }
    }
}

/// Reports progress: `(vm, message)`.
pub type Progress = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// What happened to one VM.
#[derive(Debug)]
pub struct VmOutcome {
    /// VM name.
    pub name: String,
    /// Success, or why not.
    pub result: Result<(), ApplyError>,
    /// How many steps changed the VM (a failed apply may have made some).
    pub steps: usize,
}

/// Counts the steps of one VM's apply that went through.
#[derive(Debug)]
struct Steps(
    std::sync::atomic::AtomicUsize,
    Option<&'static std::sync::atomic::AtomicBool>,
);

impl Steps {
    /// `r`, counted when it went through; once an interrupt was asked for,
    /// the end of this VM's apply (the step is done, no next one starts).
    fn did<T, E: Into<ApplyError>>(&self, r: Result<T, E>) -> Result<T, ApplyError> {
        let done = r.map_err(Into::into)?;
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self
            .1
            .is_some_and(|i| i.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(ApplyError::Interrupted);
        }
        Ok(done)
    }

    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Applies every VM plan, in parallel.
///
/// # Errors
/// None as a whole: each VM's outcome says how it went.
pub async fn apply(
    plan: &Plan,
    desired: &DesiredState,
    vs: Arc<dyn Virtstack>,
    opts: ApplyOptions,
    progress: Progress,
) -> Vec<VmOutcome> {
    let mut set = tokio::task::JoinSet::new();
    for vm in &plan.vms {
        let vm = vm.clone();
        let want = desired.vms.get(&vm.name).map(|d| d.config.clone());
        let vs = vs.clone();
        let progress = progress.clone();
        set.spawn(async move {
            let steps = Steps(Default::default(), opts.interrupt);
            let result = apply_vm(vs.as_ref(), &vm, want.as_deref(), opts, &progress, &steps).await;
            match &result {
                Ok(()) => progress(&vm.name, "done"),
                Err(e) => progress(&vm.name, &format!("failed: {}", Chain(e))),
            }
            VmOutcome {
                name: vm.name,
                result,
                steps: steps.count(),
            }
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(o) => out.push(o),
            Err(e) => out.push(VmOutcome {
                name: "?".into(),
                steps: 0,
                result: Err(ApplyError::Inconsistent(format!(
                    "executor task failed: {e}"
                ))),
            }),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Every host path and cold setting of every VM the plan builds or changes,
/// checked before anything changes: one refusal for each VM refused.
pub fn preflight(
    plan: &Plan,
    desired: &DesiredState,
    vs: &dyn Virtstack,
) -> Vec<crate::plan::Refused> {
    let mut refused = Vec::new();
    for vm in &plan.vms {
        let Some(want) = desired.vms.get(&vm.name) else {
            continue;
        };
        let checked = VmName::new(&vm.name)
            .map_err(VmError::from)
            .and_then(|name| vs.preflight(&name, &want.config));
        if let Err(e) = checked {
            refused.push(crate::plan::Refused::new(
                &vm.name,
                want,
                &Chain(&e).to_string(),
            ));
        }
    }
    refused
}

async fn apply_vm(
    vs: &dyn Virtstack,
    vm: &VmPlan,
    want: Option<&VmConfig>,
    opts: ApplyOptions,
    progress: &Progress,
    steps: &Steps,
) -> Result<(), ApplyError> {
    let unsupported: Vec<String> = vm
        .ops
        .iter()
        .filter(|o| o.disruption == Disruption::Unsupported)
        .map(|o| format!("{} {} {}: {}", o.operation, o.resource, o.key, o.reason))
        .collect();
    if !unsupported.is_empty() {
        return Err(ApplyError::Unsupported(unsupported.join("; ")));
    }
    let name = VmName::new(&vm.name).map_err(VmError::from)?;
    let label = vm.name.as_str();
    let spec = || want.ok_or_else(|| ApplyError::Inconsistent(format!("no spec for {label}")));
    match vm.action {
        VmAction::Create => {
            progress(label, "creating and launching");
            build(vs, &name, spec()?, progress, steps).await?;
        }
        VmAction::Destroy => {
            progress(label, "destroying");
            steps.did(vs.destroy(&name).await)?;
        }
        VmAction::Recreate => {
            let reasons: Vec<String> = vm
                .ops
                .iter()
                .filter(|o| o.disruption == Disruption::Recreate)
                // A reason names its resource already ("boot is cold-only: ...").
                .map(|o| {
                    if o.reason.is_empty() {
                        o.resource.to_string()
                    } else {
                        o.reason.clone()
                    }
                })
                .collect();
            let limits = Limits {
                allow_recreate: opts.allow_recreate,
                ..Limits::default()
            };
            if hold::holds(vm, &limits).contains(&Hold::RecreateNotAllowed) {
                return Err(ApplyError::RecreateNotAllowed(reasons.join("; ")));
            }
            progress(label, "recreating");
            let want = spec()?;
            // The same VM to its users: its history outlives its record.
            let mut history = None;
            if vs.list().await?.contains(&name) {
                history = vs.history(&name).await.ok();
                steps.did(with_ticker(progress, label, "destroying", vs.destroy(&name)).await)?;
            }
            let built = build(vs, &name, want, progress, steps).await;
            // Kept whenever the VM exists again, even if its start failed.
            if let Some(h) = history.filter(|h| !h.is_empty())
                && vs.list().await.is_ok_and(|l| l.contains(&name))
                && let Err(e) = vs.keep_history(&name, &h).await
            {
                progress(label, &format!("its history was lost: {}", Chain(&e)));
            }
            built?;
        }
        VmAction::Update => update(vs, &name, vm, spec()?, progress, steps).await?,
    }
    if let (Some(timeout), Some(want)) = (opts.wait_healthy, want)
        && want.power_state == PowerState::Running
    {
        // Started by this apply (built, restarted, or started from stopped
        // or saved): judged from its launch.
        let launched = matches!(vm.action, VmAction::Create | VmAction::Recreate)
            || vm.ops.iter().any(|o| o.disruption == Disruption::Restart)
            || vm.observed.is_some_and(|s| !s.is_live());
        healthy::wait_healthy(vs, &name, want, launched, timeout, progress).await?;
    }
    Ok(())
}

/// Creates the VM from its spec and brings it to the spec's power state.
async fn build(
    vs: &dyn Virtstack,
    name: &VmName,
    want: &VmConfig,
    progress: &Progress,
    steps: &Steps,
) -> Result<(), ApplyError> {
    steps.did(vs.create(name, want).await)?;
    bring_to(
        vs,
        name,
        PowerState::Stopped,
        want.power_state,
        progress,
        steps,
    )
    .await
}

async fn update(
    vs: &dyn Virtstack,
    name: &VmName,
    vm: &VmPlan,
    want: &VmConfig,
    progress: &Progress,
    steps: &Steps,
) -> Result<(), ApplyError> {
    let label = name.as_str();
    // The plan's own observation, made just before: not repeated. What
    // could have changed since is the VM's state, and every verb checks
    // that itself (a VM that stopped meanwhile fails with its state, it is
    // never changed blindly).
    let observed = match vm.observed {
        Some(state) => state,
        None => vs.observe(name).await?.state,
    };
    let mut state = observed;
    let (changes, power): (Vec<&Op>, Vec<&Op>) = vm
        .ops
        .iter()
        .partition(|o| o.resource != ResourceKind::PowerState);
    let restart = changes.iter().any(|o| o.disruption == Disruption::Restart);

    if state == State::Saved && !changes.is_empty() && !restart {
        // The guest comes back as it was saved; the changes are then live ones.
        progress(label, "restoring the saved guest to apply changes");
        steps.did(with_ticker(progress, label, "restoring", vs.start(name, true)).await)?;
        state = State::Paused;
    }
    if state == State::Paused
        && want.power_state == PowerState::Running
        && !changes.is_empty()
        && !restart
    {
        // A paused guest cannot acknowledge an unplug: it runs first.
        progress(label, "resuming before the changes");
        steps.did(vs.resume(name).await)?;
        state = State::Running;
    }
    if !state.is_live() && state != State::Saved {
        // Nothing runs: the new configuration takes effect when it starts.
        steps.did(vs.reconfigure(name, want).await)?;
    } else if restart {
        progress(label, "restarting to apply cold changes");
        steps.did(with_ticker(progress, label, "stopping", vs.stop(name)).await)?;
        steps.did(vs.reconfigure(name, want).await)?;
        return bring_to(
            vs,
            name,
            PowerState::Stopped,
            want.power_state,
            progress,
            steps,
        )
        .await;
    } else if !changes.is_empty() {
        for op in changes {
            let what = format!("{} {} {}", op.operation, op.resource, op.key);
            progress(label, &what);
            steps.did(with_ticker(progress, label, &what, live(vs, name, op)).await)?;
        }
    }
    if power.is_empty() && state == observed {
        return Ok(());
    }
    bring_to(
        vs,
        name,
        observed_power(state),
        want.power_state,
        progress,
        steps,
    )
    .await
}

/// Moves a VM from one power state to another.
async fn bring_to(
    vs: &dyn Virtstack,
    name: &VmName,
    from: PowerState,
    to: PowerState,
    progress: &Progress,
    steps: &Steps,
) -> Result<(), ApplyError> {
    use PowerState::*;
    let label = name.as_str();
    match (from, to) {
        (Running, Running) | (Paused, Paused) | (Stopped, Stopped) | (Saved, Saved) => {}
        (Running, Paused) => steps.did(vs.pause(name).await)?,
        (Paused, Running) => steps.did(vs.resume(name).await)?,
        (Stopped, Running) => {
            progress(label, "starting");
            steps.did(with_ticker(progress, label, "starting", vs.start(name, false)).await)?;
        }
        (Saved, Running) => {
            progress(label, "restoring the saved guest");
            steps.did(with_ticker(progress, label, "restoring", vs.start(name, false)).await)?;
        }
        (Stopped, Paused) => {
            progress(label, "starting paused");
            steps.did(with_ticker(progress, label, "starting", vs.start(name, true)).await)?;
        }
        (Saved, Paused) => {
            progress(label, "restoring the saved guest, paused");
            steps.did(with_ticker(progress, label, "restoring", vs.start(name, true)).await)?;
        }
        (Saved, Stopped) => {
            progress(label, "discarding the saved guest state");
            steps.did(vs.stop(name).await)?;
        }
        (Running | Paused, Stopped) => {
            progress(label, "stopping (ACPI power button, then forced)");
            steps.did(with_ticker(progress, label, "stopping", vs.stop(name)).await)?;
        }
        (Running | Paused, Saved) => {
            progress(label, "saving the guest state");
            steps.did(with_ticker(progress, label, "saving", vs.save(name)).await)?;
        }
        (Stopped, Saved) => {
            progress(label, "starting, then saving the guest state");
            steps.did(with_ticker(progress, label, "starting", vs.start(name, false)).await)?;
            steps.did(with_ticker(progress, label, "saving", vs.save(name)).await)?;
        }
    }
    Ok(())
}

/// One live change: the plan's operation, handed to the virtstack's one
/// change verb.
async fn live(vs: &dyn Virtstack, name: &VmName, op: &Op) -> Result<(), ApplyError> {
    let change =
        Change::new(op.operation, op.before.clone(), op.after.clone()).ok_or_else(|| {
            ApplyError::Inconsistent(format!(
                "{} {} {} carries no item",
                op.operation, op.resource, op.key
            ))
        })?;
    Ok(vs.change(name, &change).await?)
}

#[cfg(test)]
mod tests;
