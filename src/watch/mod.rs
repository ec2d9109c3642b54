//! `uvmctl watch`: the unattended reconciler. One level-triggered loop: spec
//! file changes, the virtstack's events and a periodic resync only mark VMs
//! *dirty*; what a VM's reconcile does (observe it, plan it, apply what the
//! ceiling allows) never depends on which trigger fired.
//!
//! # Guarantees
//! - A file that fails to load keeps its VMs at their last good spec; a VM
//!   whose spec disappeared is removed only with `--prune`, only once a later
//!   scan confirms it, never while any file fails, never when no spec at all
//!   is left.
//! - Changes above `--max-disruption`, or a recreate the spec's policy does
//!   not allow, are held: logged and in the status file, never done.
//! - Each VM reconciles in its own task with its own deadline and backoff:
//!   one failing or hung VM delays no other.
//! - Reconciles hold the state directory's lock (the one `apply` takes)
//!   while any runs, and let go of the VMs' control sockets after, so a
//!   manual `apply` waits at most for the reconciles in flight.
//! - Events come from a VM's own event channel; after a reconcile that
//!   changed a VM the subscription is renewed, so the echoes of uvmctl's own
//!   operations never trigger another reconcile.

pub mod files;
pub mod metrics;
pub mod status;

use crate::apply::lock::{LockError, StateLock};
use crate::apply::{self, ApplyOptions, Progress};
use crate::plan::{self, PlanOptions, VmAction};
use crate::reconcile::OBSERVE_DEADLINE;
use crate::spec::{DesiredState, DesiredVm, Loaded, Reload, SpecCache};
use crate::vm::{Chain, Disruption, ErrorKind, ObservedState, Virtstack, VmEvent, VmName};
use files::{FsChange, SpecWatcher};
use status::{VmWatch, WatchStatus};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Backoff after failures: `base`, doubling per failure, at most `cap`. A VM
/// that ran `stable` since its last start counts as healthy again.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay.
    pub base: Duration,
    /// Longest delay.
    pub cap: Duration,
    /// Uptime after which a crash no longer counts toward the streak.
    pub stable: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(300),
            stable: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 = the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.cap)
            .min(self.cap)
    }
}

/// How the watcher runs.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// The spec directory (or one file), absolute.
    pub dir: PathBuf,
    /// Full rescan and re-observation of every VM this often.
    pub resync: Duration,
    /// Quiet time per path before a file change counts.
    pub debounce: Duration,
    /// Changes more disruptive than this are held.
    pub max_disruption: Disruption,
    /// Detect only: every change (drift, spec edits, crashes, prunes) is
    /// observed, planned and reported as held; nothing is executed.
    pub detect_only: bool,
    /// Remove VMs whose spec is gone (with the safeguards above).
    pub prune: bool,
    /// How much one prune may remove (`--allow-empty`, `--max-prune`): the
    /// rule `plan` and `apply` apply too.
    pub prune_guard: crate::plan::prune::PruneGuard,
    /// Where the lock and the status file live; `None`: neither (tests).
    pub state_dir: Option<PathBuf>,
    /// How long a reconcile waits for someone else's lock before it tries
    /// again later.
    pub lock_timeout: Duration,
    /// Longest one VM's reconcile may take.
    pub reconcile_deadline: Duration,
    /// Backoff after failures and crashes.
    pub backoff: Backoff,
    /// Where the watcher's metrics go (`--metrics-listen`), if anywhere.
    pub metrics: Option<Arc<metrics::Metrics>>,
    /// Which of the spec directory's VMs are this host's (all without one).
    pub placement: Option<crate::spec::Placement>,
    /// The git cache the spec directory comes from (`source.json` there
    /// says the revision in force), if it comes from git.
    pub source: Option<PathBuf>,
}

/// Why a reconcile ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The watcher started (adoption).
    Start,
    /// The VM's spec changed, appeared or disappeared.
    Spec,
    /// The virtstack reported something (`exited` when the process ended).
    Event(String),
    /// The periodic resync.
    Resync,
    /// A retry after a failure, a wait or a busy lock.
    Retry,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Start => f.write_str("start"),
            Trigger::Spec => f.write_str("spec"),
            Trigger::Event(e) => write!(f, "event {e}"),
            Trigger::Resync => f.write_str("resync"),
            Trigger::Retry => f.write_str("retry"),
        }
    }
}

/// What one reconcile of one VM came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to do.
    InSync,
    /// These many operations were applied.
    Applied(usize),
    /// The VM was removed (pruned).
    Pruned,
    /// Changes held back, one line each.
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

/// One finished reconcile, as tests and embedders see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The VM.
    pub vm: String,
    /// Why it ran.
    pub trigger: Trigger,
    /// What came of it.
    pub outcome: Outcome,
}

/// Why the watcher could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The virtstack could not list its VMs at startup.
    #[error("cannot list the virtstack's VMs")]
    List(#[source] crate::vm::VmError),
    /// Another watcher follows this state directory.
    #[error("another uvmctl watch runs on this state directory")]
    AlreadyWatched(#[source] LockError),
    /// The status file could not be written.
    #[error("cannot write the status file in {dir}")]
    Status {
        /// The state directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The state directory's lock, held while any reconcile runs.
struct SharedLock {
    dir: Option<PathBuf>,
    timeout: Duration,
    /// Serializes taking the file lock.
    taking: tokio::sync::Mutex<()>,
    held: Mutex<(usize, Option<StateLock>)>,
}

/// One reconcile's share of the lock; the last one out releases it.
struct LockShare(Arc<SharedLock>);

impl Drop for LockShare {
    fn drop(&mut self) {
        let mut held = self.0.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.0 = held.0.saturating_sub(1);
        if held.0 == 0 {
            held.1 = None;
        }
    }
}

impl SharedLock {
    async fn share(self: &Arc<Self>) -> Result<LockShare, LockError> {
        let _taking = self.taking.lock().await;
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            if held.0 > 0 || self.dir.is_none() {
                held.0 += 1;
                return Ok(LockShare(Arc::clone(self)));
            }
        }
        let dir = self.dir.clone().unwrap_or_default();
        let timeout = self.timeout;
        let lock =
            tokio::task::spawn_blocking(move || StateLock::acquire(&dir, timeout, "uvmctl watch"))
                .await
                .map_err(|e| LockError::Io {
                    path: PathBuf::from("lock"),
                    source: std::io::Error::other(e.to_string()),
                })??;
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.0 += 1;
        held.1 = Some(lock);
        Ok(LockShare(Arc::clone(self)))
    }
}

/// What a reconcile task needs.
struct Ctx {
    vs: Arc<dyn Virtstack>,
    lock: Arc<SharedLock>,
    max_disruption: Disruption,
    detect_only: bool,
    deadline: Duration,
}

/// What a reconcile task is given about its VM.
struct Job {
    name: VmName,
    trigger: Trigger,
    desired: Option<DesiredVm>,
    prune: bool,
    failed_files: BTreeSet<PathBuf>,
    /// When a VM found crashed may be relaunched.
    recovery: Recovery,
    /// The host's other VMs whose images the watcher has not seen (no spec
    /// here, so never reconciled): looked at before an image is attached.
    unseen: Vec<VmName>,
}

/// When a VM found crashed may be relaunched.
#[derive(Debug, Clone, Copy)]
enum Recovery {
    /// Now: it has not crashed soon after a launch lately.
    Now,
    /// Not before this.
    At(Instant),
    /// Not yet: its backoff starts when the crash is seen.
    Wait,
}

/// What a reconcile task sends back.
struct Done {
    vm: String,
    trigger: Trigger,
    outcome: Outcome,
    /// The VM had exited on its own (it was rebuilt, or is waiting to be).
    crashed: Option<String>,
    /// It was (re)launched by this reconcile.
    launched: bool,
    /// The plan's summary line, or `no changes`.
    plan: String,
    /// The VM runs (or is paused) as far as this reconcile knows: its
    /// events are then worth following.
    live: bool,
    /// Its state as this reconcile left it, as far as it knows (`None`:
    /// the virtstack has no such VM).
    state: Option<crate::vm::State>,
    /// How long the reconcile took.
    took: Duration,
    /// The images (path, read-only) the VM has as this reconcile left it;
    /// `None`: not known.
    images: Option<Vec<(PathBuf, bool)>>,
    /// The images of other VMs this reconcile looked at (`Job::unseen`).
    others: Vec<(String, Vec<(PathBuf, bool)>)>,
}

/// What VMs hold which images (as the watcher keeps them), by path;
/// `state` says how it is known.
fn index_images<'a>(
    vms: impl Iterator<Item = (&'a String, &'a Vec<(PathBuf, bool)>)>,
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

/// The images `cfg` attaches, as the watcher keeps them.
fn images_of(cfg: &crate::spec::VmConfig) -> Vec<(PathBuf, bool)> {
    cfg.images()
        .map(|i| (i.path.to_path_buf(), i.read_only))
        .collect()
}

fn held_line(op: &plan::Op) -> String {
    let key = op.key.to_string();
    let mut line = format!("{} {}", op.operation, op.resource);
    if !key.is_empty() {
        line.push_str(&format!(" {key}"));
    }
    line.push_str(&format!(": {}", op.disruption));
    if !op.reason.is_empty() {
        line.push_str(&format!(" ({})", op.reason));
    }
    line
}

/// Reconciles one VM: observe, plan, hold or apply. Runs in its own task.
async fn reconcile(ctx: Arc<Ctx>, job: Job) -> Done {
    let vm = job.name.to_string();
    let mut done = Done {
        vm: vm.clone(),
        trigger: job.trigger.clone(),
        outcome: Outcome::InSync,
        crashed: None,
        launched: false,
        plan: "no changes".into(),
        live: false,
        state: None,
        took: Duration::ZERO,
        images: None,
        others: Vec::new(),
    };
    let started = Instant::now();
    let _share = match ctx.lock.share().await {
        Ok(s) => s,
        Err(e @ LockError::Held { .. }) => {
            tracing::info!(%vm, "{e}; trying again shortly");
            done.outcome = Outcome::Busy;
            return done;
        }
        Err(e) => {
            done.outcome = Outcome::Failed(Chain(&e).to_string());
            return done;
        }
    };
    let work = reconcile_locked(&ctx, &job, &mut done);
    if tokio::time::timeout(ctx.deadline, work).await.is_err() {
        done.outcome = Outcome::Failed(format!("no result within {:?}", ctx.deadline));
    }
    ctx.vs.release(&job.name).await;
    done.took = started.elapsed();
    done
}

async fn reconcile_locked(ctx: &Ctx, job: &Job, done: &mut Done) {
    let vs = &ctx.vs;
    let mut observed = ObservedState::default();
    // Observed straight away: a VM the virtstack does not have answers
    // NotFound, so no listing of every VM comes first.
    match tokio::time::timeout(OBSERVE_DEADLINE, vs.observe(&job.name)).await {
        Ok(Ok(o)) => {
            done.images = Some(images_of(&o.config));
            observed.vms.insert(done.vm.clone(), o);
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
    done.live = observed
        .vms
        .get(&done.vm)
        .is_some_and(|o| o.state.is_live());
    done.state = observed.vms.get(&done.vm).map(|o| o.state);
    let crashed = observed
        .vms
        .get(&done.vm)
        .and_then(|o| o.exit_error.clone());
    done.crashed.clone_from(&crashed);
    let wait = match job.recovery {
        Recovery::Now => false,
        Recovery::At(t) => Instant::now() < t,
        Recovery::Wait => true,
    };
    // Detect-only relaunches nothing, so there is nothing to wait for.
    if crashed.is_some() && job.desired.is_some() && wait && !ctx.detect_only {
        done.outcome = Outcome::BackingOff;
        return;
    }
    let mut desired = DesiredState {
        failed_files: job.failed_files.clone(),
        ..DesiredState::default()
    };
    if let Some(d) = &job.desired {
        desired.vms.insert(done.vm.clone(), d.clone());
    }
    // How many may be pruned is decided over the whole set
    // (`consider_pruning`); this set is one VM.
    let opts = PlanOptions {
        prune: job.prune,
        ..PlanOptions::default()
    };
    let the_plan = plan::plan(&desired, &observed, vs.capabilities(), &opts);
    let Some(vm_plan) = the_plan.vms.first() else {
        return;
    };
    done.plan = crate::plan::render::summary_line(&the_plan.summary());
    let policy_refuses = vm_plan.recreate_allowed == Some(false);
    // A prune is allowed by --prune itself; the ceiling is for changes.
    let held = if ctx.detect_only {
        Some("detect-only: reported, not executed (watch --detect-only)".to_string())
    } else if vm_plan.action == VmAction::Destroy {
        None
    } else if policy_refuses {
        Some(
            "needs a recreate, which its spec's policy does not allow (policy.allowRecreate)"
                .into(),
        )
    } else if vm_plan.disruption > ctx.max_disruption {
        Some(format!(
            "needs {}, above --max-disruption {}",
            vm_plan.disruption, ctx.max_disruption
        ))
    } else {
        None
    };
    if let Some(why) = held {
        let mut lines: Vec<String> = vm_plan.ops.iter().map(held_line).collect();
        if vm_plan.action == VmAction::Destroy {
            lines.push("destroy: no spec names it (a prune)".into());
        }
        lines.push(why);
        done.outcome = Outcome::Held(lines);
        return;
    }
    // Every host path is checked before a launch; a live change checks
    // the paths it adds itself (the change verb opens them), so a VM that
    // only changes live is not re-read whole on every edit.
    let launches = matches!(vm_plan.action, VmAction::Create | VmAction::Recreate)
        || vm_plan
            .ops
            .iter()
            .any(|o| o.disruption == Disruption::Restart);
    let refused = if launches {
        apply::preflight(&the_plan, &desired, vs.as_ref())
    } else {
        Vec::new()
    };
    if let Some(why) = refused.first() {
        done.outcome = Outcome::Failed(format!("refused: {why}"));
        return;
    }
    // Images the watcher could not judge before (VMs it never reconciled):
    // looked at now, once, before one is attached.
    if let Some(want) = &job.desired
        && want.config.images().next().is_some()
        && !job.unseen.is_empty()
    {
        for other in &job.unseen {
            if let Ok(Ok(o)) = tokio::time::timeout(OBSERVE_DEADLINE, vs.observe(other)).await {
                done.others.push((other.to_string(), images_of(&o.config)));
            }
        }
        let has: BTreeSet<&std::path::Path> = observed
            .vms
            .get(&done.vm)
            .map(|o| o.config.images().map(|i| i.path).collect())
            .unwrap_or_default();
        let held = index_images(done.others.iter().map(|(vm, i)| (vm, i)), "on this host");
        let (field, why) = plan::images::clashes(&done.vm, &want.config, &has, &held, &|_| false);
        if let Some(field) = field {
            done.outcome = Outcome::Failed(format!("refused: {field}: {why}"));
            return;
        }
    }
    let vm_name = done.vm.clone();
    let progress: Progress = Arc::new(move |_vm: &str, msg: &str| {
        tracing::info!(vm = %vm_name, "{msg}");
    });
    let outcomes = apply::apply(
        &the_plan,
        &desired,
        Arc::clone(vs),
        ApplyOptions {
            allow_recreate: false,
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
        || crashed.is_some();
    done.outcome = match outcomes.iter().find_map(|o| o.result.as_ref().err()) {
        Some(e) => Outcome::Failed(Chain(e).to_string()),
        None if vm_plan.action == VmAction::Destroy => {
            done.state = None;
            Outcome::Pruned
        }
        None => {
            done.state = job.desired.as_ref().map(|d| match d.config.power_state {
                crate::spec::PowerState::Running => crate::vm::State::Running,
                crate::spec::PowerState::Paused => crate::vm::State::Paused,
                crate::spec::PowerState::Stopped => crate::vm::State::Created,
                crate::spec::PowerState::Saved => crate::vm::State::Saved,
            });
            done.live = job.desired.as_ref().is_some_and(|d| {
                matches!(
                    d.config.power_state,
                    crate::spec::PowerState::Running | crate::spec::PowerState::Paused
                )
            });
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

/// A VM as the loop tracks it.
#[derive(Default)]
struct Tracked {
    status: VmWatch,
    /// Reconcile failures in a row.
    failures: u32,
    /// Crashes in a row, each within `stable` of its launch.
    crash_streak: u32,
    last_launch: Option<Instant>,
    /// Not retried before this.
    retry_at: Option<Instant>,
    /// A crashed VM is not relaunched before this.
    recover_after: Option<Instant>,
    /// An event came while it reconciled.
    again: bool,
    /// Its state as the last reconcile left it.
    state: Option<crate::vm::State>,
}

/// An event subscription: its generation, and the task forwarding it.
struct Subscription {
    generation: Arc<std::sync::atomic::AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type EventMsg = (String, u64, VmEvent);

/// The loop's state.
struct Watcher {
    opts: WatchOptions,
    ctx: Arc<Ctx>,
    cache: Option<SpecCache>,
    /// Last good spec per VM.
    desired: BTreeMap<String, DesiredVm>,
    /// Names whose specs fail and that have no last good spec: left alone.
    unknown: BTreeSet<String>,
    failed_files: BTreeSet<PathBuf>,
    spec_errors: Vec<String>,
    /// How many valid specs place their VMs on other hosts.
    elsewhere: usize,
    /// The placement that chose this host's VMs, described.
    placed_by: Option<String>,
    /// The prune refused last, while it stays refused (said once).
    prune_refused: Option<String>,
    /// The images each VM has as its last reconcile left it: a VM to be
    /// given one another VM has (writable on either side) is refused
    /// before it is reconciled, as plan and apply refuse it.
    holdings: BTreeMap<String, Vec<(PathBuf, bool)>>,
    /// VMs the virtstack has.
    known: BTreeSet<String>,
    /// VMs without a spec, by the scan that first missed them.
    absent: BTreeMap<String, u64>,
    /// VMs confirmed absent by a later scan, to prune.
    prune: BTreeSet<String>,
    scans: u64,
    confirm_at: Option<Instant>,
    vms: BTreeMap<String, Tracked>,
    dirty: BTreeMap<String, Trigger>,
    in_flight: BTreeSet<String>,
    subs: BTreeMap<String, Subscription>,
    generation: u64,
    events_tx: UnboundedSender<EventMsg>,
    done_tx: UnboundedSender<Done>,
    reports: Option<UnboundedSender<Report>>,
    /// VMs of the first round not yet reconciled; ready when empty.
    first_round: Option<BTreeSet<String>>,
    started: u64,
    status_log: StatusLog,
}

/// What the status file and systemd were last told.
#[derive(Default)]
struct StatusLog {
    /// The status last written, while the file holds it.
    written: Option<WatchStatus>,
    /// The error of the last failed write, until one succeeds.
    error: Option<String>,
    /// The last STATUS= line sent to systemd.
    notified: Option<String>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_at(t: Instant) -> u64 {
    unix_now() + t.saturating_duration_since(Instant::now()).as_secs()
}

fn sd_notify(state: &[sd_notify::NotifyState<'_>]) {
    // Without NOTIFY_SOCKET (not under systemd) this does nothing.
    let _ = sd_notify::notify(state);
}

impl Watcher {
    fn tracked(&mut self, vm: &str) -> &mut Tracked {
        self.vms.entry(vm.to_string()).or_default()
    }

    fn mark(&mut self, vm: &str, trigger: Trigger) {
        match self.dirty.get(vm) {
            // A retry is superseded by anything that says why.
            None | Some(Trigger::Retry) => {
                self.dirty.insert(vm.to_string(), trigger);
            }
            Some(_) => {}
        }
    }

    /// Takes a new load in: last good specs kept for files that fail, VMs
    /// whose spec changed marked dirty, absent VMs tracked for pruning.
    fn absorb(&mut self, loaded: Loaded) {
        self.scans += 1;
        let Loaded {
            desired, errors, ..
        } = loaded;
        let mut first_error: BTreeMap<PathBuf, String> = BTreeMap::new();
        for e in &errors {
            first_error
                .entry(e.file.clone())
                .or_insert_with(|| e.to_string());
        }
        let mut next = desired.vms;
        let previous = std::mem::take(&mut self.desired);
        for (name, old) in previous.iter() {
            if next.contains_key(name) {
                continue;
            }
            let failing =
                desired.unknown.contains(name) || desired.failed_files.contains(&old.file);
            if failing {
                // Its file fails: the VM keeps its last good spec.
                next.insert(name.clone(), old.clone());
            }
        }
        for (name, vm) in &next {
            let error = if desired.unknown.contains(name) || desired.failed_files.contains(&vm.file)
            {
                first_error
                    .get(&vm.file)
                    .cloned()
                    .or_else(|| errors.first().map(ToString::to_string))
            } else {
                None
            };
            let t = self.tracked(name);
            if t.status.spec_error != error {
                match &error {
                    Some(e) => {
                        tracing::warn!(vm = %name, "spec fails to load; keeping its last good spec: {e}")
                    }
                    None if t.status.spec_error.is_some() => {
                        tracing::info!(vm = %name, "spec loads again");
                    }
                    None => {}
                }
                t.status.spec_error = error;
            }
            let changed = previous.get(name).is_none_or(|p| p.config != vm.config);
            if changed {
                // A new spec deserves a prompt try, whatever failed before.
                t.failures = 0;
                t.crash_streak = 0;
                t.retry_at = None;
                t.recover_after = None;
                t.status.held.clear();
                self.mark(name, Trigger::Spec);
            }
        }
        // A broken spec of another host's keeps a VM of its name here too.
        self.unknown = desired
            .unknown
            .iter()
            .chain(&desired.unknown_elsewhere)
            .filter(|n| !next.contains_key(*n))
            .cloned()
            .collect();
        for name in previous.keys().chain(self.known.iter()) {
            if next.contains_key(name) || self.unknown.contains(name) {
                continue;
            }
            if !self.absent.contains_key(name) {
                self.absent.insert(name.clone(), self.scans);
                if self.opts.prune {
                    let confirm = Instant::now() + self.opts.debounce.max(Duration::from_secs(1));
                    self.confirm_at = Some(self.confirm_at.map_or(confirm, |c| c.min(confirm)));
                } else {
                    tracing::info!(vm = %name, "no spec any more; left as it is (--prune removes such VMs)");
                }
            }
        }
        self.absent
            .retain(|name, _| !next.contains_key(name) && !self.unknown.contains(name));
        self.prune.retain(|name| self.absent.contains_key(name));
        self.desired = next;
        self.failed_files = desired.failed_files;
        self.elsewhere = desired.elsewhere.len();
        self.placed_by = desired.placed_by;
        self.spec_errors = errors.iter().map(ToString::to_string).collect();
        if self.opts.prune {
            self.consider_pruning();
        }
    }

    /// Why `want` may not be reconciled now: it would attach an image another
    /// VM of this host has, as that VM's last reconcile found it (the rule
    /// `plan::images` is for plan and apply; a watcher observes one VM at a
    /// time, so it judges from what it saw of the others).
    fn image_clash(&self, vm: &str, want: &DesiredVm) -> Option<String> {
        // Most VMs of a fleet attach nothing: no walk over the others then.
        want.config.images().next()?;
        let has: BTreeSet<&std::path::Path> = self
            .holdings
            .get(vm)
            .into_iter()
            .flatten()
            .map(|(p, _)| p.as_path())
            .collect();
        let held = index_images(self.holdings.iter(), "as last reconciled");
        let (field, why) = plan::images::clashes(vm, &want.config, &has, &held, &|_| false);
        field.map(|f| format!("{f}: {why}"))
    }

    /// Marks for removal the VMs a later scan confirmed absent, when nothing
    /// forbids it.
    fn consider_pruning(&mut self) {
        let candidates: Vec<String> = self
            .absent
            .iter()
            .filter(|(name, seen)| **seen < self.scans && !self.prune.contains(*name))
            .map(|(name, _)| name.clone())
            .collect();
        if candidates.is_empty() {
            return;
        }
        if !self.spec_errors.is_empty() {
            tracing::warn!(vms = ?candidates, "not pruning while spec files fail to load");
            return;
        }
        // The rule plan and apply follow: never every VM of this host
        // without --allow-empty, never more than --max-prune at once.
        let removing: Vec<String> = candidates
            .iter()
            .chain(self.prune.iter())
            .filter(|n| self.known.contains(*n))
            .cloned()
            .collect();
        let selection = crate::plan::prune::Selection {
            here: self.desired.len() + self.unknown.len(),
            elsewhere: self.elsewhere,
            by: self.placed_by.clone(),
        };
        if let Err(refused) = crate::plan::prune::check(
            &removing,
            self.known.len(),
            &selection,
            &self.opts.prune_guard,
        ) {
            if self.prune_refused.as_ref() != Some(&refused.message) {
                tracing::warn!(vms = ?candidates, "{refused}");
                self.prune_refused = Some(refused.message.clone());
            }
            for name in &candidates {
                self.tracked(name).status.held = vec![
                    "destroy: no spec names it (a prune)".into(),
                    refused.message.clone(),
                ];
            }
            return;
        }
        self.prune_refused = None;
        for name in candidates {
            if self.known.contains(&name) {
                self.prune.insert(name.clone());
                self.mark(&name, Trigger::Spec);
            }
        }
    }

    fn spawn(&mut self, vm: String, trigger: Trigger) {
        let Ok(name) = VmName::new(&vm) else {
            return;
        };
        let prune = self.prune.contains(&vm);
        let desired = self.desired.get(&vm).cloned();
        if desired.is_none() && !prune {
            // No spec (absent, unknown or never had one): only a prune
            // would touch it.
            if let Some(first) = &mut self.first_round {
                first.remove(&vm);
            }
            return;
        }
        if let Some(why) = desired.as_ref().and_then(|d| self.image_clash(&vm, d)) {
            let t = self.tracked(&vm);
            let line = format!("refused: {why}");
            if t.status.held != [line.clone()] {
                tracing::warn!(vm = %vm, "{line}");
                t.status.held = vec![line];
                self.write_status();
            }
            if let Some(first) = &mut self.first_round {
                first.remove(&vm);
            }
            return;
        }
        let t = self.tracked(&vm);
        let recovery = match (t.crash_streak, t.recover_after) {
            (0, _) => Recovery::Now,
            (_, Some(at)) => Recovery::At(at),
            (_, None) => Recovery::Wait,
        };
        // Only a VM that attaches images needs the others' (most need none).
        let attaches = desired
            .as_ref()
            .is_some_and(|d| d.config.images().next().is_some());
        let unseen = if attaches {
            self.known
                .iter()
                .filter(|k| **k != vm && !self.holdings.contains_key(*k))
                .filter_map(|k| VmName::new(k).ok())
                .collect()
        } else {
            Vec::new()
        };
        let job = Job {
            unseen,
            name,
            trigger: trigger.clone(),
            desired,
            prune,
            failed_files: self.failed_files.clone(),
            recovery,
        };
        self.in_flight.insert(vm.clone());
        let ctx = Arc::clone(&self.ctx);
        let done_tx = self.done_tx.clone();
        let span = tracing::info_span!("reconcile", vm = %vm, trigger = %trigger);
        tokio::spawn(
            async move {
                let started = Instant::now();
                let done = reconcile(ctx, job).await;
                let ms = started.elapsed().as_millis() as u64;
                let plan = done.plan.as_str();
                match &done.outcome {
                    Outcome::Failed(_) => {
                        tracing::warn!(result = %done.outcome, plan, ms, "reconcile");
                    }
                    _ => tracing::info!(result = %done.outcome, plan, ms, "reconcile"),
                }
                let _ = done_tx.send(done);
            }
            .instrument(span),
        );
    }

    /// Starts every dirty VM that may start now; returns the next time one
    /// waiting for its backoff may.
    fn dispatch(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let ready: Vec<(String, Trigger)> = self
            .dirty
            .iter()
            .filter(|(vm, _)| !self.in_flight.contains(*vm))
            .filter(|(vm, _)| {
                let at = self.vms.get(*vm).and_then(|t| t.retry_at);
                match at {
                    Some(at) if at > now => {
                        next = Some(next.map_or(at, |n| n.min(at)));
                        false
                    }
                    _ => true,
                }
            })
            .map(|(vm, t)| (vm.clone(), t.clone()))
            .collect();
        for (vm, trigger) in ready {
            self.dirty.remove(&vm);
            self.spawn(vm, trigger);
        }
        next
    }

    /// Follows the VM's events in a task of its own (connecting may wait
    /// on the VM; the loop never does). `renew` replaces a live subscription:
    /// the old one saw the echoes of uvmctl's own operations. `live`: the
    /// reconcile left it running, so a VM with no events to follow by the
    /// time the task asks may have stopped in between, and is looked at.
    fn subscribe(&mut self, vm: &str, renew: bool, live: bool) {
        if let Some(s) = self.subs.get(vm)
            && !s.task.is_finished()
        {
            if renew {
                // Events already forwarded carry the old number and are
                // dropped (they were uvmctl's own operations' echoes); the
                // connection stays, and with it what the virtstack keeps
                // for a followed VM.
                self.generation += 1;
                s.generation
                    .store(self.generation, std::sync::atomic::Ordering::Relaxed);
            }
            return;
        }
        self.subs.remove(vm);
        let Ok(name) = VmName::new(vm) else { return };
        self.generation += 1;
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(self.generation));
        let tagged = Arc::clone(&generation);
        let tx = self.events_tx.clone();
        let vs = Arc::clone(&self.ctx.vs);
        let owner = vm.to_string();
        let task = tokio::spawn(async move {
            let mut events = match vs.events(&name).await {
                Ok(Some(rx)) => rx,
                Ok(None) => {
                    // Stopped between the reconcile's look and now (a crash
                    // right after a launch): said now, not at the next
                    // resync. A VM that runs without events (launched by an
                    // older uvmctl) is left to the resyncs.
                    let stopped = live && vs.observe(&name).await.is_ok_and(|o| !o.state.is_live());
                    if stopped {
                        let number = tagged.load(std::sync::atomic::Ordering::Relaxed);
                        let _ = tx.send((owner, number, VmEvent::Gone));
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(vm = %owner, "no event subscription: {}", Chain(&e));
                    return;
                }
            };
            while let Some(e) = events.recv().await {
                let gone = e == VmEvent::Gone;
                let number = tagged.load(std::sync::atomic::Ordering::Relaxed);
                if tx.send((owner.clone(), number, e)).is_err() || gone {
                    return;
                }
            }
        });
        self.subs
            .insert(vm.to_string(), Subscription { generation, task });
    }

    fn finished(&mut self, done: Done) {
        self.in_flight.remove(&done.vm);
        if let Some(images) = &done.images {
            self.holdings.insert(done.vm.clone(), images.clone());
        }
        for (other, images) in &done.others {
            self.holdings
                .entry(other.clone())
                .or_insert_with(|| images.clone());
        }
        let live = done.live;
        let now = Instant::now();
        let backoff = self.opts.backoff;
        let vm = done.vm.clone();
        let revision = self
            .opts
            .source
            .as_deref()
            .and_then(crate::source::read_status)
            .and_then(|s| s.applied)
            .map(|r| r.to_string());
        if let Some(m) = &self.opts.metrics {
            m.reconciled(&vm, &done.trigger, &done.outcome, done.took);
        }
        let t = self.tracked(&vm);
        t.state = done.state;
        t.status.revision = revision;
        t.status.last_reconcile = Some(unix_now());
        t.status.trigger = Some(done.trigger.to_string());
        t.status.result = Some(done.outcome.to_string());
        let again = std::mem::take(&mut t.again);
        if done.crashed.is_some() && done.launched {
            // Relaunched after a crash: a crash soon after the last launch
            // counts toward the streak, and the next relaunch waits longer.
            if t.last_launch.is_some_and(|l| now - l >= backoff.stable) {
                t.crash_streak = 0;
            }
            t.crash_streak += 1;
            t.recover_after = None;
            let wait = backoff.delay(t.crash_streak);
            tracing::warn!(%vm, crashes = t.crash_streak, "relaunched after it exited on its own; if it exits again, the next relaunch waits {wait:?}");
        }
        if done.launched {
            t.last_launch = Some(now);
        }
        let mut renew = false;
        match &done.outcome {
            Outcome::InSync | Outcome::Applied(_) | Outcome::Pruned => {
                t.failures = 0;
                t.retry_at = None;
                t.status.held.clear();
                renew = !matches!(done.outcome, Outcome::InSync);
            }
            Outcome::Held(lines) => {
                t.failures = 0;
                t.retry_at = None;
                if t.status.held != *lines {
                    tracing::warn!(%vm, held = ?lines, "changes held; a person applies them (uvmctl apply DIR --only {vm}, with --allow-recreate where the policy forbids a recreate) or raises --max-disruption");
                    t.status.held.clone_from(lines);
                }
            }
            Outcome::Failed(_) => {
                t.failures += 1;
                let wait = backoff.delay(t.failures);
                t.retry_at = Some(now + wait);
                tracing::warn!(%vm, failures = t.failures, "retrying in {wait:?}");
                renew = true;
            }
            Outcome::BackingOff => {
                // The backoff runs from when the crash is seen.
                let at = *t
                    .recover_after
                    .get_or_insert(now + backoff.delay(t.crash_streak));
                t.retry_at = Some(at);
            }
            Outcome::Busy => {
                t.retry_at = Some(now + Duration::from_secs(1));
            }
        }
        let retry = matches!(
            done.outcome,
            Outcome::Failed(_) | Outcome::BackingOff | Outcome::Busy
        );
        t.status.failures = t.failures + t.crash_streak;
        t.status.backoff_until = t
            .retry_at
            .filter(|_| retry)
            .or(t.recover_after.filter(|r| *r > now))
            .map(unix_at);
        if retry {
            self.mark(&vm, Trigger::Retry);
        } else if again && !renew {
            // Something happened while it reconciled, and that reconcile
            // changed nothing: it was not our echo.
            self.mark(&vm, Trigger::Event("during reconcile".into()));
        }
        match done.outcome {
            Outcome::Pruned => {
                self.known.remove(&vm);
                self.absent.remove(&vm);
                self.prune.remove(&vm);
                self.vms.remove(&vm);
                self.subs.remove(&vm);
            }
            _ => {
                self.known.insert(vm.clone());
                if done.launched {
                    // A new process: follow it, not the one that ended.
                    self.subs.remove(&vm);
                }
                self.subscribe(&vm, renew, live);
            }
        }
        if let Some(first) = &mut self.first_round {
            first.remove(&vm);
        }
        self.write_status();
        if let Some(r) = &self.reports {
            let _ = r.send(Report {
                vm,
                trigger: done.trigger,
                outcome: done.outcome,
            });
        }
    }

    fn event(&mut self, vm: String, generation: u64, event: VmEvent) {
        if self
            .subs
            .get(&vm)
            .is_none_or(|s| s.generation.load(std::sync::atomic::Ordering::Relaxed) != generation)
        {
            return;
        }
        let name = match &event {
            VmEvent::Gone => {
                self.subs.remove(&vm);
                "exited".to_string()
            }
            VmEvent::Reported(e) => e.clone(),
        };
        if self.in_flight.contains(&vm) {
            self.tracked(&vm).again = true;
            return;
        }
        if event == VmEvent::Gone {
            tracing::warn!(%vm, "its process ended");
        } else {
            tracing::info!(%vm, event = %name, "vm event");
        }
        self.mark(&vm, Trigger::Event(name));
    }

    fn status(&self) -> WatchStatus {
        WatchStatus {
            pid: std::process::id(),
            dir: self.opts.dir.clone(),
            started: self.started,
            updated: unix_now(),
            spec_errors: self.spec_errors.clone(),
            vms: self
                .vms
                .iter()
                .map(|(n, t)| (n.clone(), t.status.clone()))
                .collect(),
            source: self
                .opts
                .source
                .as_deref()
                .and_then(crate::source::read_status),
            source_cache: self.opts.source.clone(),
        }
    }

    /// Writes the status file when what it says changed (not for its
    /// `updated` stamp alone), or when the last write failed. A failure is
    /// logged once per distinct error, and once when writing works again.
    fn write_status(&mut self) {
        let Some(dir) = self.opts.state_dir.clone() else {
            return;
        };
        let status = self.status();
        if let Some(m) = &self.opts.metrics {
            let states = self
                .vms
                .iter()
                .filter_map(|(n, t)| t.state.map(|s| (n.clone(), s)))
                .collect();
            m.update(&status, &states, unix_now());
        }
        let unchanged = self.status_log.written.as_ref().is_some_and(|w| {
            WatchStatus {
                updated: status.updated,
                ..w.clone()
            } == status
        });
        if !unchanged {
            match status::write(&dir, &status) {
                Ok(()) => {
                    if self.status_log.error.take().is_some() {
                        tracing::info!(dir = %dir.display(), "the status file is written again");
                    }
                    self.status_log.written = Some(status);
                }
                Err(e) => {
                    let text = e.to_string();
                    if self.status_log.error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(dir = %dir.display(), "cannot write the status file: {text} (said once; retried at every change)");
                    }
                    self.status_log.error = Some(text);
                    self.status_log.written = None;
                }
            }
        }
        let held = self
            .vms
            .values()
            .filter(|t| !t.status.held.is_empty())
            .count();
        let failing = self.vms.values().filter(|t| t.failures > 0).count();
        let line = format!(
            "{} VM(s) with specs, {held} held, {failing} failing, {} spec error(s)",
            self.desired.len(),
            self.spec_errors.len()
        );
        // systemd is told when the line changes, not at every write.
        if self.status_log.notified.as_deref() != Some(line.as_str()) {
            sd_notify(&[sd_notify::NotifyState::Status(&line)]);
            self.status_log.notified = Some(line);
        }
    }

    /// Reloads the specs on the blocking pool.
    async fn reload(&mut self, how: ReloadHow) {
        let Some(mut cache) = self.cache.take() else {
            return;
        };
        let started = Instant::now();
        let (cache, loaded) = tokio::task::spawn_blocking(move || {
            let loaded = match &how {
                ReloadHow::All => cache.reload(Reload::All),
                ReloadHow::Stamps => cache.reload(Reload::Stamps),
                ReloadHow::Paths(p) => cache.reload(Reload::Paths(p)),
            };
            (cache, loaded)
        })
        .await
        .unwrap_or_else(|e| {
            // Loading panicked: keep every last good spec (an error blocks pruning).
            let shown = self.opts.dir.clone();
            let err = crate::spec::SpecError::whole_file(&shown, format!("loading failed: {e}"));
            (
                SpecCache::placed(shown, self.opts.placement.clone()),
                Loaded {
                    errors: vec![err],
                    ..Loaded::default()
                },
            )
        });
        tracing::debug!(
            files_read = cache.last_reads(),
            vms = loaded.desired.vms.len(),
            errors = loaded.errors.len(),
            ms = started.elapsed().as_millis() as u64,
            "specs reloaded"
        );
        self.cache = Some(cache);
        self.absorb(loaded);
        self.write_status();
    }

    async fn resync(&mut self) {
        self.reload(ReloadHow::Stamps).await;
        match self.ctx.vs.list().await {
            Ok(names) => {
                self.known = names.iter().map(ToString::to_string).collect();
            }
            Err(e) => tracing::warn!("cannot list VMs: {}", Chain(&e)),
        }
        let all: Vec<String> = self
            .desired
            .keys()
            .chain(self.known.iter())
            .cloned()
            .collect();
        for vm in all {
            if !self.in_flight.contains(&vm) {
                self.mark(&vm, Trigger::Resync);
            }
        }
    }
}

/// What a signal to the watcher asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM, SIGINT: finish what is in flight and exit (a second one:
    /// exit now).
    Stop,
    /// SIGHUP: reconcile everything now (specs read again, every VM
    /// observed), as a resync does.
    Reconcile,
    /// The spec directory was replaced whole (a git source put a new
    /// revision in force): read it again now, without waiting for the file
    /// watcher, whose directory may have gone with the old revision.
    Rescan,
}

enum ReloadHow {
    All,
    Stamps,
    Paths(HashSet<PathBuf>),
}

/// Runs the watcher until `signals` yields [`Signal::Stop`] twice, or once
/// and the reconciles in flight have finished; [`Signal::Reconcile`] is a
/// resync at once. `reports`, if given, receives every
/// finished reconcile.
///
/// # Errors
/// Only when it cannot start (the virtstack cannot list its VMs).
pub async fn run(
    vs: Arc<dyn Virtstack>,
    opts: WatchOptions,
    mut signals: UnboundedReceiver<Signal>,
    reports: Option<UnboundedSender<Report>>,
) -> Result<(), WatchError> {
    // One watcher per state directory: two would undo each other's work.
    let _watcher_lock = match &opts.state_dir {
        Some(dir) => Some(
            StateLock::acquire_named(
                dir,
                "watch.lock",
                Duration::ZERO,
                &format!("uvmctl watch {}", opts.dir.display()),
            )
            .map_err(WatchError::AlreadyWatched)?,
        ),
        None => None,
    };
    let (fs_tx, mut fs_rx) = unbounded_channel();
    let (events_tx, mut events_rx) = unbounded_channel();
    let (done_tx, mut done_rx) = unbounded_channel();
    let mut spec_watcher = match SpecWatcher::start(&opts.dir, opts.debounce, fs_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %opts.dir.display(), "cannot watch the spec directory ({e}); only --resync will see changes");
            None
        }
    };
    let known: BTreeSet<String> = vs
        .list()
        .await
        .map_err(WatchError::List)?
        .iter()
        .map(ToString::to_string)
        .collect();
    let ctx = Arc::new(Ctx {
        vs,
        lock: Arc::new(SharedLock {
            dir: opts.state_dir.clone(),
            timeout: opts.lock_timeout,
            taking: tokio::sync::Mutex::new(()),
            held: Mutex::new((0, None)),
        }),
        max_disruption: opts.max_disruption,
        detect_only: opts.detect_only,
        deadline: opts.reconcile_deadline,
    });
    if let Some(dir) = &opts.state_dir {
        status::write(dir, &WatchStatus::default()).map_err(|source| WatchError::Status {
            dir: dir.clone(),
            source,
        })?;
    }
    let mut w = Watcher {
        cache: Some(SpecCache::placed(opts.dir.clone(), opts.placement.clone())),
        ctx,
        desired: BTreeMap::new(),
        unknown: BTreeSet::new(),
        failed_files: BTreeSet::new(),
        spec_errors: Vec::new(),
        elsewhere: 0,
        placed_by: None,
        prune_refused: None,
        holdings: BTreeMap::new(),
        known,
        absent: BTreeMap::new(),
        prune: BTreeSet::new(),
        scans: 0,
        confirm_at: None,
        vms: BTreeMap::new(),
        dirty: BTreeMap::new(),
        in_flight: BTreeSet::new(),
        subs: BTreeMap::new(),
        generation: 0,
        events_tx,
        done_tx,
        reports,
        first_round: None,
        started: unix_now(),
        status_log: StatusLog::default(),
        opts,
    };
    w.reload(ReloadHow::All).await;
    let all: Vec<String> = w.desired.keys().chain(w.known.iter()).cloned().collect();
    w.dirty.clear();
    for vm in &all {
        w.mark(vm, Trigger::Start);
    }
    tracing::info!(
        dir = %w.opts.dir.display(),
        vms = w.desired.len(),
        managed = w.known.len(),
        spec_errors = w.spec_errors.len(),
        "watching"
    );
    for e in &w.spec_errors {
        tracing::warn!("{e}");
    }
    let mut resync =
        tokio::time::interval_at(tokio::time::Instant::now() + w.opts.resync, w.opts.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = false;
    w.first_round = Some(w.dirty.keys().cloned().collect());
    loop {
        let next_retry = if draining { None } else { w.dispatch() };
        if w.first_round.as_ref().is_some_and(BTreeSet::is_empty) {
            w.first_round = None;
            tracing::info!("first full reconcile done");
            sd_notify(&[sd_notify::NotifyState::Ready]);
        }
        if draining && w.in_flight.is_empty() {
            break;
        }
        let wake = [next_retry, w.confirm_at].into_iter().flatten().min();
        let sleep = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(change) = fs_rx.recv() => {
                let mut rescan = change == FsChange::Rescan;
                let mut paths = match change {
                    FsChange::Paths(p) => p,
                    FsChange::Rescan => HashSet::new(),
                };
                // Whatever else is queued goes into the same reload.
                while let Ok(more) = fs_rx.try_recv() {
                    match more {
                        FsChange::Paths(p) => paths.extend(p),
                        FsChange::Rescan => rescan = true,
                    }
                }
                if let Some(sw) = &mut spec_watcher {
                    rescan |= sw.rewatch(rescan);
                }
                w.reload(if rescan { ReloadHow::Stamps } else { ReloadHow::Paths(paths) }).await;
            }
            Some((vm, generation, event)) = events_rx.recv() => w.event(vm, generation, event),
            Some(done) = done_rx.recv() => w.finished(done),
            _ = resync.tick() => {
                if let Some(sw) = &mut spec_watcher {
                    sw.rewatch(false);
                }
                w.resync().await;
            }
            () = sleep => {
                if w.confirm_at.is_some_and(|c| c <= Instant::now()) {
                    w.confirm_at = None;
                    w.reload(ReloadHow::Stamps).await;
                }
            }
            got = signals.recv() => {
                if got == Some(Signal::Reconcile) {
                    if !draining {
                        tracing::info!("SIGHUP: reconciling every VM now");
                        w.resync().await;
                    }
                    continue;
                }
                if got == Some(Signal::Rescan) {
                    if let Some(sw) = &mut spec_watcher {
                        sw.rewatch(true);
                    }
                    w.reload(ReloadHow::Stamps).await;
                    continue;
                }
                if draining || got.is_none() {
                    tracing::warn!("second signal: exiting now; reconciles in flight are abandoned");
                    return Ok(());
                }
                draining = true;
                sd_notify(&[sd_notify::NotifyState::Stopping]);
                tracing::info!(in_flight = w.in_flight.len(), "stopping after the reconciles in flight; VMs keep running");
            }
        }
    }
    w.write_status();
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests;
