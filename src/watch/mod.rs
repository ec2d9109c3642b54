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

mod events;
pub mod files;
mod health;
mod lock;
pub mod metrics;
pub mod policy;
mod revert;
mod rollout;
#[cfg(windows)]
pub mod service;
pub mod signals;
mod specs;
pub mod status;

pub use crate::reconcile::Outcome;
pub use policy::{Backoff, Trigger};
pub use signals::Signal;

use crate::apply::lock::{LockError, StateLock};
use crate::plan::hold::Limits;
use crate::reconcile::vm::{VmJob, VmReconciled, reconcile_vm};
use crate::spec::{Loaded, Reload, SpecCache};
use crate::vm::health::Verdict;
use crate::vm::history::short_digest as short;
use crate::vm::{Chain, Disruption, Virtstack, VmEvent, VmName};
use events::{EventMsg, Subscription};
use files::{FsChange, SpecWatcher};
use lock::SharedLock;
use policy::{Entry, Finished, Follow, Say};
use specs::{Book, Pruning, Specs};
use status::{HealthStatus, RevertStatus, StatusLog, WatchStatus};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tracing::Instrument;

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
    /// Go back to a VM's last healthy configuration when a change leaves
    /// it unhealthy (`--no-revert`: only report).
    pub revert: bool,
    /// This host's rollout wave (`--wave`): it publishes whether the
    /// revision in force is settled and healthy here, for the next wave.
    pub wave: Option<u32>,
}

impl WatchOptions {
    /// What a reconcile may do: the one disruption rule, with this
    /// watcher's ceiling. A watcher never recreates against a spec's
    /// policy; its `--prune` is its own permission to prune.
    fn limits(&self) -> Limits {
        Limits {
            max_disruption: Some(self.max_disruption),
            allow_recreate: false,
            detect_only: self.detect_only,
            prune_past_ceiling: true,
            window: None,
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
    /// The git source cannot work at all.
    #[error(transparent)]
    Source(crate::source::SourceError),
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

/// What a reconcile task needs.
struct Ctx {
    vs: Arc<dyn Virtstack>,
    lock: Arc<SharedLock>,
    deadline: Duration,
}

/// What a reconcile task sends back.
struct Done {
    vm: String,
    trigger: Trigger,
    /// How long the reconcile took.
    took: Duration,
    /// How many of the entry's verdicts its job carried.
    verdicts_sent: usize,
    /// It applied the VM's revert.
    reverting: bool,
    /// The digest of the configuration it applied, and the health that
    /// judges it (none without `spec.health`).
    judged: Option<(String, crate::vm::config::Health)>,
    reconciled: VmReconciled,
}

/// The loop's clock: tokio's, so tests can pause it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Reconciles one VM under the shared lock, within the deadline, and lets
/// go of its control sockets after. Runs in its own task.
async fn reconcile(ctx: Arc<Ctx>, job: VmJob) -> VmReconciled {
    let vm = job.name.to_string();
    let _share = match ctx.lock.share().await {
        Ok(s) => s,
        Err(e @ LockError::Held { .. }) => {
            tracing::info!(%vm, "{e}; trying again shortly");
            return VmReconciled {
                outcome: Outcome::Busy,
                ..VmReconciled::failed(String::new())
            };
        }
        Err(e) => return VmReconciled::failed(Chain(&e).to_string()),
    };
    let mut done = VmReconciled::default();
    let work = reconcile_vm(&ctx.vs, &job, &mut done);
    if tokio::time::timeout(ctx.deadline, work).await.is_err() {
        // What it found before the deadline stays (its state, its plan).
        done.outcome = Outcome::Failed(format!("no result within {:?}", ctx.deadline));
    }
    ctx.vs.release(&job.name).await;
    done
}

/// Where the loop's tasks send.
struct Senders {
    events: UnboundedSender<EventMsg>,
    done: UnboundedSender<Done>,
    health: UnboundedSender<health::Judged>,
    reports: Option<UnboundedSender<Report>>,
}

/// The loop's state.
struct Watcher {
    opts: WatchOptions,
    ctx: Arc<Ctx>,
    cache: Option<SpecCache>,
    /// What the loads said, and where missing specs stand.
    book: Book,
    /// Every VM the loop knows of: the one per-VM state.
    vms: BTreeMap<String, Entry>,
    /// The VMs followed, with the tasks that follow them.
    subs: BTreeMap<String, Subscription>,
    /// The last subscription's number.
    generation: u64,
    /// The health judgements in flight.
    judging: health::Judging,
    send: Senders,
    /// The first round runs: ready once no entry is part of it.
    starting: bool,
    started: u64,
    status_log: StatusLog,
    /// The source revision in force, as its cache said at the last load.
    revision: Option<String>,
    /// The rollout policy beside the specs, as last loaded.
    policy: Option<Arc<crate::spec::policy::Windows>>,
    /// Since when the revision in force has been settled and healthy.
    soak: rollout::Soak,
    /// This host's part in the rollout, as last written.
    rollout: Option<status::RolloutStatus>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_at(t: Instant, now: Instant) -> u64 {
    unix_now() + t.saturating_duration_since(now).as_secs()
}

impl Watcher {
    /// The VM's entry, shown in the status file from now on.
    fn tracked(&mut self, vm: &str) -> &mut Entry {
        policy::tracked(&mut self.vms, vm)
    }

    /// Starts `vm`'s reconcile in a task of its own, unless it has nothing
    /// to reconcile or attaches an image another VM has.
    fn spawn(&mut self, vm: String, trigger: Trigger, now: Instant) {
        let entry = self.vms.entry(vm.clone()).or_default();
        let prune = entry.prune;
        let desired = self.book.specs.desired.get(&vm).cloned();
        // While a revert stands, its configuration is what is applied (and
        // what the checks below look at).
        let (desired, reverted_from) = self.revert_target(&vm, desired);
        let entry = self.vms.entry(vm.clone()).or_default();
        let name = match VmName::new(&vm) {
            Ok(name) if desired.is_some() || prune => name,
            // No spec (absent, unknown or never had one): only a prune
            // would touch it.
            _ => {
                entry.first_round = false;
                return;
            }
        };
        if let Some(why) = desired
            .as_ref()
            .and_then(|d| Book::image_clash(&self.vms, &vm, d))
        {
            let e = self.tracked(&vm);
            e.first_round = false;
            let line = format!("refused: {why}");
            if e.status.held != [line.clone()] {
                tracing::warn!(vm = %vm, "{line}");
                e.status.held = vec![line];
                self.write_status();
            }
            return;
        }
        // Only a VM that attaches images needs the others' (most need none).
        let attaches = desired
            .as_ref()
            .is_some_and(|d| d.config.images().next().is_some());
        let unseen = if attaches {
            self.vms
                .iter()
                .filter(|(k, e)| **k != vm && e.known && e.images.is_none())
                .filter_map(|(k, _)| VmName::new(k).ok())
                .collect()
        } else {
            Vec::new()
        };
        // The windows as they stand now, for this VM's labels.
        let mut limits = self.opts.limits();
        if let (Some(policy), Some(d)) = (&self.policy, &desired) {
            let unix = i64::try_from(unix_now()).unwrap_or(i64::MAX);
            limits.window = Some(policy.gate(&d.labels, unix));
        }
        let entry = self.vms.entry(vm.clone()).or_default();
        let verdicts = entry.verdicts.clone();
        let verdicts_sent = verdicts.len();
        let reverting = reverted_from.is_some();
        // What a change this job applies is judged by, and under which
        // digest: the job's own configuration, whatever the specs say by
        // the time it ends.
        let judged = desired.as_ref().and_then(|d| {
            d.config
                .health
                .clone()
                .map(|health| (d.config.digest(), health))
        });
        let job = VmJob {
            name,
            desired,
            prune,
            failed_files: self.book.specs.failed_files.clone(),
            limits,
            may_relaunch: entry.may_relaunch(now),
            unseen,
            revision: self.revision.clone(),
            reverted_from,
            verdicts,
        };
        entry.in_flight = true;
        let ctx = Arc::clone(&self.ctx);
        let done_tx = self.send.done.clone();
        let span = tracing::info_span!("reconcile", vm = %vm, trigger = %trigger);
        tokio::spawn(
            async move {
                let started = tokio::time::Instant::now();
                let reconciled = reconcile(ctx, job).await;
                let took = started.elapsed();
                let ms = took.as_millis() as u64;
                let (result, plan) = (&reconciled.outcome, reconciled.plan.as_str());
                match result {
                    Outcome::Failed(_) => tracing::warn!(%result, plan, ms, "reconcile"),
                    _ => tracing::info!(%result, plan, ms, "reconcile"),
                }
                let _ = done_tx.send(Done {
                    vm,
                    trigger,
                    took,
                    verdicts_sent,
                    reverting,
                    judged,
                    reconciled,
                });
            }
            .instrument(span),
        );
    }

    /// Starts every dirty VM that may start now; returns the next time one
    /// waiting for its backoff may.
    fn dispatch(&mut self, now: Instant) -> Option<Instant> {
        let (ready, next) = policy::ready(&self.vms, now);
        for vm in ready {
            if let Some(trigger) = self.vms.get_mut(&vm).and_then(|e| e.take_trigger(now)) {
                self.spawn(vm, trigger, now);
            }
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
        let task = tokio::spawn(events::follow(
            Arc::clone(&self.ctx.vs),
            name,
            live,
            Arc::clone(&generation),
            self.send.events.clone(),
        ));
        self.subs
            .insert(vm.to_string(), Subscription { generation, task });
    }

    /// Takes a finished reconcile in: the policy decides what follows, the
    /// loop does it (subscriptions, logs, status, metrics, reports).
    fn finished(&mut self, done: Done, now: Instant) {
        let Done {
            vm,
            trigger,
            took,
            verdicts_sent,
            reverting,
            judged,
            reconciled: r,
        } = done;
        for (other, images) in &r.others {
            let e = self.vms.entry(other.clone()).or_default();
            e.images.get_or_insert_with(|| images.clone());
        }
        let revision = self.revision.clone();
        if let Some(m) = &self.opts.metrics {
            m.reconciled(&vm, &trigger, &r.outcome, took);
        }
        // A VM changed, relaunched, pruned or failing: a rollout's soak
        // starts again (whatever triggered it).
        if matches!(
            r.outcome,
            Outcome::Applied(_) | Outcome::Pruned | Outcome::Failed(_)
        ) {
            self.soak.disturb();
        }
        let backoff = self.opts.backoff;
        let e = self.tracked(&vm);
        if r.images.is_some() {
            e.images.clone_from(&r.images);
        }
        e.state = r.state;
        if let Some(history) = &r.history {
            // Written: the verdicts the job carried are in it; those that
            // came since are not yet.
            e.verdicts.drain(..verdicts_sent.min(e.verdicts.len()));
            let mut history = history.clone();
            for (spec, verdict) in &e.verdicts {
                history.judged(spec, verdict);
            }
            e.history = Some(history);
        }
        e.status.revision = revision;
        e.status.last_reconcile = Some(unix_now());
        e.status.trigger = Some(trigger.to_string());
        e.status.result = Some(r.outcome.to_string());
        let finished = Finished {
            outcome: &r.outcome,
            crashed: r.crashed.is_some(),
            launched: r.launched,
        };
        let next = e.finished(&finished, now, &backoff);
        e.status.backoff_until = next.backoff_until.map(|t| unix_at(t, now));
        if let Some(opens) = r.window_opens {
            e.wait_for_window(opens, now, unix_now());
        }
        for say in &next.say {
            say_it(&vm, say);
        }
        match next.follow {
            Follow::Forget => {
                self.vms.remove(&vm);
                self.subs.remove(&vm);
                self.judging.stop(&vm);
            }
            Follow::Follow { renew, restart } => {
                e.known = true;
                if restart {
                    // A new process: follow it, not the one that ended.
                    self.subs.remove(&vm);
                }
                self.subscribe(&vm, renew, r.live);
            }
        }
        if reverting {
            self.reverted(&vm, &r.outcome);
        }
        if self.vms.contains_key(&vm) {
            self.judge_after(&vm, &r, judged);
        }
        self.write_status();
        if let Some(reports) = &self.send.reports {
            let _ = reports.send(Report {
                vm,
                trigger,
                outcome: r.outcome,
            });
        }
    }

    /// What `vm`'s reconcile applies: its spec, or while a revert stands,
    /// the configuration it goes back to (with the digest of the spec it
    /// goes away from). A spec changed since the failure ends the revert.
    fn revert_target(
        &mut self,
        vm: &str,
        desired: Option<crate::spec::DesiredVm>,
    ) -> (Option<crate::spec::DesiredVm>, Option<String>) {
        let Some(e) = self.vms.get_mut(vm) else {
            return (desired, None);
        };
        let Some(r) = &e.revert else {
            return (desired, None);
        };
        let spec = desired.as_ref().map(|d| d.config.digest());
        if !revert::stands(r, spec.as_deref()) {
            tracing::info!(%vm, "its spec changed: the revert ends, the spec is followed");
            e.revert = None;
            e.status.revert = None;
            return (desired, None);
        }
        let to = Arc::clone(&r.to);
        let from = r.from.clone();
        let desired = desired.map(|mut d| {
            d.config = to;
            d
        });
        (desired, Some(from))
    }

    /// After a reconcile that applied `vm`'s revert target.
    fn reverted(&mut self, vm: &str, outcome: &Outcome) {
        let metrics = self.opts.metrics.clone();
        let e = self.tracked(vm);
        let Some(r) = e.revert.as_mut() else {
            return;
        };
        let held = match outcome {
            Outcome::Held(lines) => Some(lines.as_slice()),
            _ => None,
        };
        let step = revert::after_reconcile(
            r,
            matches!(outcome, Outcome::Applied(_)),
            *outcome == Outcome::InSync,
            held,
        );
        match step {
            revert::Step::Applied => {
                tracing::warn!(
                    %vm,
                    probe = %r.probe,
                    answer = %r.answer,
                    from = %short(&r.from),
                    to = %short(&r.to_spec),
                    "reverted: its last healthy configuration is applied again; the spec that failed is not, until it changes"
                );
                if let Some(m) = &metrics {
                    m.reverted(vm);
                }
            }
            revert::Step::Held => {
                tracing::warn!(%vm, held = ?held, "revert held: a person applies it or raises --max-disruption; nothing is forced");
            }
            revert::Step::Quiet => {}
        }
        // `since` says when it last changed, not when it was last looked at.
        if step != revert::Step::Quiet
            || e.status.revert.as_ref().map(|s| s.state.as_str()) != Some(r.state.as_str())
        {
            e.status.revert = Some(revert_status(r, unix_now()));
        }
    }

    /// After a reconcile: a change that reached a running guest is judged by
    /// the health of the configuration it applied (`judged`: its digest and
    /// `spec.health`; a revert's is the one it goes back to). A VM without
    /// one has no health to show.
    fn judge_after(
        &mut self,
        vm: &str,
        r: &VmReconciled,
        judged: Option<(String, crate::vm::config::Health)>,
    ) {
        let Some((spec, health)) = judged else {
            self.judging.stop(vm);
            let e = self.tracked(vm);
            e.status.health = None;
            if e.revert.is_none() {
                e.status.revert = None;
            }
            return;
        };
        if matches!(r.outcome, Outcome::Applied(_)) && r.live {
            let vs = Arc::clone(&self.ctx.vs);
            self.judging.start(vs, vm, spec, health, r.launched);
            let e = self.tracked(vm);
            e.status.health = Some(HealthStatus::pending(unix_now()));
            // A note of an earlier change not reverted is stale now.
            if e.revert.is_none() {
                e.status.revert = None;
            }
        }
    }

    /// A verdict of a judgement: said once, kept in the status.
    fn judged(&mut self, judged: health::Judged) {
        if !self.judging.take(&judged) {
            return;
        }
        self.verdict(&judged.vm, &judged.spec, &judged.verdict);
    }

    /// A verdict on the change to the configuration of digest `spec`: kept
    /// in the status, written into the VM's history by a reconcile it
    /// marks, and when unhealthy, a revert if the policy says so.
    fn verdict(&mut self, vm: &str, spec: &str, verdict: &Verdict) {
        let desired = self
            .book
            .specs
            .desired
            .get(vm)
            .map(|d| Arc::clone(&d.config));
        let enabled = self.opts.revert;
        let e = self.tracked(vm);
        let since = e.status.health.as_ref().map_or_else(unix_now, |h| h.since);
        e.status.health = Some(HealthStatus::judged(verdict, since));
        if *verdict != Verdict::Pending {
            e.verdicts.push((spec.to_string(), verdict.clone()));
            if let Some(h) = &mut e.history {
                h.judged(spec, verdict);
            }
            e.mark(Trigger::Health);
        }
        match verdict {
            Verdict::Healthy => {
                tracing::info!(%vm, "healthy");
                if e.revert.is_none() {
                    e.status.revert = None;
                }
            }
            Verdict::Unhealthy { probe, answer } => {
                tracing::warn!(%vm, probe, answer, "unhealthy");
                let decision = revert::on_unhealthy(
                    enabled,
                    spec,
                    desired.as_deref(),
                    e.history.as_ref(),
                    e.revert.as_ref(),
                    probe,
                    answer,
                );
                let now = unix_now();
                match decision {
                    revert::OnUnhealthy::Revert(r) => {
                        tracing::warn!(%vm, to = %short(&r.to_spec), "reverting to its last healthy configuration");
                        e.status.revert = Some(revert_status(&r, now));
                        e.revert = Some(r);
                    }
                    revert::OnUnhealthy::RevertFailed => {
                        if let Some(r) = &mut e.revert {
                            r.state = revert::RevertState::Unhealthy;
                            tracing::warn!(%vm, "the configuration it was reverted to is unhealthy too; left as it is, not reverted again");
                            e.status.revert = Some(revert_status(r, now));
                        }
                    }
                    revert::OnUnhealthy::Stay(why) => {
                        tracing::warn!(%vm, "not reverted: {why}");
                        e.status.revert = Some(RevertStatus {
                            state: "not reverted".into(),
                            from: spec.to_string(),
                            to: None,
                            probe: probe.clone(),
                            answer: answer.clone(),
                            why: vec![why.to_string()],
                            since: now,
                        });
                    }
                }
            }
            Verdict::Pending => {}
        }
        self.write_status();
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
        if !self.vms.entry(vm.clone()).or_default().event(name.clone()) {
            return;
        }
        if event == VmEvent::Gone {
            tracing::warn!(%vm, "its process ended");
        } else {
            tracing::info!(%vm, event = %name, "vm event");
        }
        // A panic or an end while its change is judged is the verdict.
        let ended = match &event {
            VmEvent::Gone => Some(("exit", "its process ended")),
            VmEvent::Reported(e) if e == crate::apply::healthy::GUEST_PANICKED => {
                Some(("panic", "the guest panicked (GUEST_PANICKED)"))
            }
            VmEvent::Reported(_) => None,
        };
        if let Some((probe, answer)) = ended
            && let Some(spec) = self.judging.stop(&vm)
        {
            let verdict = Verdict::Unhealthy {
                probe: probe.into(),
                answer: answer.into(),
            };
            self.verdict(&vm, &spec, &verdict);
        }
    }

    fn status(&self, source: Option<crate::source::SourceStatus>) -> WatchStatus {
        WatchStatus {
            pid: std::process::id(),
            dir: self.opts.dir.clone(),
            started: self.started,
            updated: unix_now(),
            spec_errors: self.book.specs.errors.clone(),
            vms: self
                .vms
                .iter()
                .filter(|(_, e)| e.tracked)
                .map(|(n, e)| (n.clone(), e.status.clone()))
                .collect(),
            source,
            source_cache: self.opts.source.clone(),
            rollout: self.rollout.clone(),
        }
    }

    /// This host's part in the rollout now (with `--wave`).
    fn update_rollout(&mut self, source: Option<&crate::source::SourceStatus>) {
        let Some(wave) = self.opts.wave else {
            return;
        };
        let revision = self.revision.as_deref().map(rollout::sha_of);
        let unsettled = rollout::unsettled(&self.vms, self.book.specs.errors.len());
        let healthy_since = self.soak.update(revision, unsettled.is_none(), unix_now());
        let in_force_since = source
            .filter(|s| s.applied.as_ref().map(|r| r.sha.as_str()) == revision)
            .and_then(|s| s.applied_at);
        self.rollout = Some(status::RolloutStatus {
            wave,
            revision: revision.map(str::to_string),
            in_force_since,
            healthy_since,
            unsettled,
        });
    }

    /// Writes the status file when what it says changed (not for its
    /// `updated` stamp alone), or when the last write failed. A failure is
    /// logged once per distinct error, and once when writing works again.
    fn write_status(&mut self) {
        let Some(dir) = self.opts.state_dir.clone() else {
            return;
        };
        let source = self
            .opts
            .source
            .as_deref()
            .and_then(crate::source::read_status);
        self.update_rollout(source.as_ref());
        let status = self.status(source);
        if let Some(m) = &self.opts.metrics {
            let states = self
                .vms
                .iter()
                .filter(|(_, e)| e.tracked)
                .filter_map(|(n, e)| e.state.map(|s| (n.clone(), s)))
                .collect();
            m.update(&status, &states, unix_now());
        }
        self.status_log.write(&dir, status);
        let tracked = || self.vms.values().filter(|e| e.tracked);
        let held = tracked().filter(|e| !e.status.held.is_empty()).count();
        let failing = tracked().filter(|e| e.failures > 0).count();
        let line = format!(
            "{} VM(s) with specs, {held} held, {failing} failing, {} spec error(s)",
            self.book.specs.desired.len(),
            self.book.specs.errors.len()
        );
        self.status_log.notify(line);
    }

    /// Reloads the specs on the blocking pool.
    async fn reload(&mut self, how: ReloadHow) {
        let Some(mut cache) = self.cache.take() else {
            return;
        };
        // Read before the specs: the source swaps its link before it says
        // so, so the revision named is never newer than the specs loaded.
        let revision = self
            .opts
            .source
            .as_deref()
            .and_then(crate::source::read_status)
            .and_then(|s| s.applied)
            .map(|r| r.to_string());
        // Where the revision in force is now: on Windows a git source names
        // it in a file rather than a link (`source::spec_dir_in`), so a
        // swap is a new root, read whole.
        let mut how = how;
        if let Some(root) = self
            .opts
            .source
            .as_deref()
            .and_then(crate::source::spec_dir_named)
            && root != cache.root()
        {
            cache = SpecCache::placed(root, self.opts.placement.clone());
            how = ReloadHow::All;
        }
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
                    policy: Some(Arc::new(crate::spec::policy::Windows::broken())),
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
        self.revision = revision;
        // A policy that changed may open or close a window for any VM.
        let changed = match (&self.policy, &loaded.policy) {
            (None, None) => false,
            (Some(a), Some(b)) => !a.same_as(b),
            _ => true,
        };
        self.policy.clone_from(&loaded.policy);
        if let Some(m) = &self.opts.metrics {
            m.set_policy(self.policy.clone());
        }
        if changed {
            for e in self.vms.values_mut().filter(|e| e.tracked) {
                e.mark(Trigger::Spec);
            }
        }
        self.book.absorb(&mut self.vms, loaded, now());
        self.write_status();
    }

    /// Reads every spec again, asks the virtstack what it has, and marks
    /// every VM to reconcile. A periodic resync leaves a VM being
    /// reconciled alone (that reconcile observes it anyway); one asked for
    /// (`asked`: SIGHUP) runs again after it, since what changed since that
    /// reconcile observed is what was asked about.
    async fn resync(&mut self, asked: bool) {
        self.reload(ReloadHow::Stamps).await;
        match self.ctx.vs.list().await {
            Ok(names) => {
                let names: BTreeSet<String> = names.iter().map(ToString::to_string).collect();
                for (name, e) in &mut self.vms {
                    e.known = names.contains(name);
                }
                for name in names {
                    self.vms.entry(name).or_default().known = true;
                }
                // What the loop no longer has any reason to remember (and
                // whose images would be stale).
                self.vms
                    .retain(|_, e| e.tracked || e.known || e.in_flight || e.dirty.is_some());
            }
            Err(e) => tracing::warn!("cannot list VMs: {}", Chain(&e)),
        }
        let all: Vec<String> = self
            .book
            .specs
            .desired
            .keys()
            .chain(self.vms.iter().filter(|(_, e)| e.known).map(|(n, _)| n))
            .cloned()
            .collect();
        for vm in all {
            let e = self.vms.entry(vm).or_default();
            if asked || !e.in_flight {
                e.mark(Trigger::Resync);
            }
        }
    }
}

/// A revert as the status file shows it.
fn revert_status(r: &revert::Revert, since: u64) -> RevertStatus {
    RevertStatus {
        state: r.state.as_str().into(),
        from: r.from.clone(),
        to: Some(r.to_spec.clone()),
        probe: r.probe.clone(),
        answer: r.answer.clone(),
        why: match &r.state {
            revert::RevertState::Held(lines) => lines.clone(),
            _ => Vec::new(),
        },
        since,
    }
}

/// Logs what the policy says of a finished reconcile.
fn say_it(vm: &str, say: &Say) {
    match say {
        Say::Relaunched { crashes, next_wait } => {
            tracing::warn!(%vm, crashes, "relaunched after it exited on its own; if it exits again, the next relaunch waits {next_wait:?}");
        }
        Say::Held(lines) => {
            tracing::warn!(%vm, held = ?lines, "changes held; a person applies them (uvmctl apply DIR --only {vm}, with --allow-recreate where the policy forbids a recreate) or raises --max-disruption");
        }
        Say::Retrying { failures, wait } => {
            tracing::warn!(%vm, failures, "retrying in {wait:?}");
        }
    }
}

enum ReloadHow {
    All,
    Stamps,
    Paths(HashSet<PathBuf>),
}

/// What the loop does after a signal.
enum AfterSignal {
    /// Go on.
    Continue,
    /// Stop taking new work; exit once the reconciles in flight end.
    Drain,
    /// Exit now.
    Exit,
}

impl Watcher {
    /// Lists the virtstack's VMs, writes a first status file, loads the
    /// specs and marks every VM for the first round.
    async fn start(
        vs: Arc<dyn Virtstack>,
        opts: WatchOptions,
        send: Senders,
    ) -> Result<Watcher, WatchError> {
        let known = vs.list().await.map_err(WatchError::List)?;
        let vms = known
            .iter()
            .map(|n| {
                let e = Entry {
                    known: true,
                    ..Entry::default()
                };
                (n.to_string(), e)
            })
            .collect();
        let ctx = Arc::new(Ctx {
            vs,
            lock: Arc::new(SharedLock::new(opts.state_dir.clone(), opts.lock_timeout)),
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
            book: Book {
                specs: Specs::default(),
                pruning: Pruning::default(),
                prune: opts.prune,
                debounce: opts.debounce,
                guard: opts.prune_guard,
            },
            vms,
            subs: BTreeMap::new(),
            generation: 0,
            judging: health::Judging::new(send.health.clone()),
            send,
            starting: true,
            started: unix_now(),
            status_log: StatusLog::default(),
            revision: None,
            policy: None,
            soak: rollout::Soak::default(),
            rollout: None,
            opts,
        };
        w.reload(ReloadHow::All).await;
        w.resume_reverts().await;
        let all: Vec<String> = w
            .book
            .specs
            .desired
            .keys()
            .chain(w.vms.iter().filter(|(_, e)| e.known).map(|(n, _)| n))
            .cloned()
            .collect();
        for e in w.vms.values_mut() {
            e.dirty = None;
        }
        for vm in &all {
            let e = w.vms.entry(vm.clone()).or_default();
            e.mark(Trigger::Start);
            e.first_round = true;
        }
        tracing::info!(
            dir = %w.opts.dir.display(),
            vms = w.book.specs.desired.len(),
            managed = known.len(),
            spec_errors = w.book.specs.errors.len(),
            "watching"
        );
        for e in &w.book.specs.errors {
            tracing::warn!("{e}");
        }
        Ok(w)
    }

    /// The reverts a watcher before this one left in force (or due): read
    /// from the histories of the VMs whose spec has `spec.health` (only they
    /// revert), before the first round, so a spec that failed is not applied
    /// again. With `--no-revert`, none is resumed: the spec is followed.
    async fn resume_reverts(&mut self) {
        let judged: Vec<(String, Arc<crate::spec::VmConfig>)> = self
            .book
            .specs
            .desired
            .iter()
            .filter(|(n, d)| d.config.health.is_some() && self.vms.get(*n).is_some_and(|e| e.known))
            .map(|(n, d)| (n.clone(), Arc::clone(&d.config)))
            .collect();
        for (vm, desired) in judged {
            let Ok(name) = VmName::new(&vm) else { continue };
            let Ok(history) = self.ctx.vs.history(&name).await else {
                continue;
            };
            let resumed = revert::resume(&history, &desired);
            let e = self.vms.entry(vm.clone()).or_default();
            e.history = Some(history);
            let Some(r) = resumed else { continue };
            if !self.opts.revert {
                tracing::info!(%vm, "--no-revert: the revert a watcher before left is not kept; the spec is followed");
                continue;
            }
            tracing::info!(%vm, state = r.state.as_str(), "a revert is in force: its spec that failed is not applied again until it changes");
            e.tracked = true;
            e.status.revert = Some(revert_status(&r, unix_now()));
            e.revert = Some(r);
        }
    }

    /// Files changed: whatever else is queued goes into the same reload.
    async fn files_changed(
        &mut self,
        change: FsChange,
        queued: &mut UnboundedReceiver<FsChange>,
        watcher: Option<&mut SpecWatcher>,
    ) {
        let mut rescan = change == FsChange::Rescan;
        let mut paths = match change {
            FsChange::Paths(p) => p,
            FsChange::Rescan => HashSet::new(),
        };
        while let Ok(more) = queued.try_recv() {
            match more {
                FsChange::Paths(p) => paths.extend(p),
                FsChange::Rescan => rescan = true,
            }
        }
        if let Some(sw) = watcher {
            rescan |= sw.rewatch(rescan);
        }
        let how = if rescan {
            ReloadHow::Stamps
        } else {
            ReloadHow::Paths(paths)
        };
        self.reload(how).await;
    }

    /// A signal (`None`: its sender is gone, as good as a second stop).
    async fn signal(
        &mut self,
        got: Option<Signal>,
        draining: bool,
        watcher: Option<&mut SpecWatcher>,
    ) -> AfterSignal {
        match got {
            Some(Signal::Reconcile) => {
                if !draining {
                    tracing::info!("SIGHUP: reconciling every VM now");
                    self.resync(true).await;
                }
                AfterSignal::Continue
            }
            Some(Signal::Rescan) => {
                if let Some(sw) = watcher {
                    sw.rewatch(true);
                }
                self.reload(ReloadHow::Stamps).await;
                AfterSignal::Continue
            }
            Some(Signal::Stop) if !draining => {
                status::sd_notify(status::Notify::Stopping);
                let in_flight = self.vms.values().filter(|e| e.in_flight).count();
                tracing::info!(
                    in_flight,
                    "stopping after the reconciles in flight; VMs keep running"
                );
                AfterSignal::Drain
            }
            _ => {
                tracing::warn!("second signal: exiting now; reconciles in flight are abandoned");
                AfterSignal::Exit
            }
        }
    }
}

/// Takes the watcher's own lock of the state directory: two watchers would
/// undo each other's work.
fn lock_watch(opts: &WatchOptions) -> Result<Option<StateLock>, WatchError> {
    let Some(dir) = &opts.state_dir else {
        return Ok(None);
    };
    let holder = format!("uvmctl watch {}", opts.dir.display());
    StateLock::acquire_named(dir, "watch.lock", Duration::ZERO, &holder)
        .map(Some)
        .map_err(WatchError::AlreadyWatched)
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
    let _watcher_lock = lock_watch(&opts)?;
    let (fs_tx, mut fs_rx) = unbounded_channel();
    let (events, mut events_rx) = unbounded_channel();
    let (done, mut done_rx) = unbounded_channel();
    let (health, mut verdicts) = unbounded_channel();
    let mut spec_watcher = match SpecWatcher::start(&opts.dir, opts.debounce, fs_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %opts.dir.display(), "cannot watch the spec directory ({e}); only --resync will see changes");
            None
        }
    };
    let send = Senders {
        events,
        done,
        health,
        reports,
    };
    let mut w = Watcher::start(vs, opts, send).await?;
    let every = w.opts.resync;
    let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = false;
    loop {
        let next_retry = if draining { None } else { w.dispatch(now()) };
        if w.starting && !w.vms.values().any(|e| e.first_round) {
            w.starting = false;
            tracing::info!("first full reconcile done");
            status::sd_notify(status::Notify::Ready(None));
        }
        if draining && !w.vms.values().any(|e| e.in_flight) {
            break;
        }
        let wake = [next_retry, w.book.pruning.confirm_at]
            .into_iter()
            .flatten()
            .min();
        let sleep = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(change) = fs_rx.recv() => {
                w.files_changed(change, &mut fs_rx, spec_watcher.as_mut()).await;
            }
            Some((vm, generation, event)) = events_rx.recv() => w.event(vm, generation, event),
            Some(done) = done_rx.recv() => w.finished(done, now()),
            Some(judged) = verdicts.recv() => w.judged(judged),
            _ = resync.tick() => {
                if let Some(sw) = &mut spec_watcher {
                    sw.rewatch(false);
                }
                w.resync(false).await;
            }
            () = sleep => {
                if w.book.pruning.confirm_at.is_some_and(|c| c <= now()) {
                    w.book.pruning.confirm_at = None;
                    w.reload(ReloadHow::Stamps).await;
                }
            }
            got = signals.recv() => match w.signal(got, draining, spec_watcher.as_mut()).await {
                AfterSignal::Continue => {}
                AfterSignal::Drain => draining = true,
                AfterSignal::Exit => return Ok(()),
            },
        }
    }
    w.write_status();
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests;
