//! The watcher's Prometheus metrics (`uvmctl watch --metrics-listen ADDR`),
//! through the `prometheus-client` crate, served as OpenMetrics text at
//! `/metrics` by hyper.
//!
//! Labels stay bounded: a VM's name, a state, a trigger or a result word, a
//! source revision; never a file path or an error text.

use super::policy::Trigger;
use super::status::{HealthState, WatchStatus};
use crate::reconcile::Outcome;
use crate::vm::State;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

type Labels = Vec<(&'static str, String)>;

fn duration_histogram() -> Histogram {
    // 5 ms to about 80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Every family the watcher reports.
pub struct Metrics {
    registry: Registry,
    reconcile_duration: Family<Labels, Histogram, fn() -> Histogram>,
    reconciles: Family<Labels, Counter>,
    drift_corrected: Family<Labels, Counter>,
    reverts: Family<Labels, Counter>,
    window_open: Family<Labels, Gauge>,
    /// The rollout policy in force, whose windows are judged at each scrape.
    policy: std::sync::Mutex<Option<Arc<crate::spec::policy::Windows>>>,
    /// The windows with a series now.
    windows_shown: std::sync::Mutex<Vec<String>>,
    vms: Family<Labels, Gauge>,
    held: Family<Labels, Gauge>,
    health: Family<Labels, Gauge>,
    in_backoff: Gauge,
    spec_files_failing: Gauge,
    revision: Family<Labels, Gauge>,
    last_fetch: Gauge,
    refused_unverified: Counter,
    refused_seen: AtomicU64,
    refused: Family<Labels, Counter>,
    /// What `refused` has counted of each kind so far.
    refused_counted: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// The VMs the per-VM counters have series for.
    known: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The revision series shown now.
    revisions: std::sync::Mutex<Vec<Labels>>,
    /// The git cache whose `source.json` the source families read.
    source_cache: std::sync::Mutex<Option<std::path::PathBuf>>,
    rollout_wave: Family<Labels, Gauge>,
    rollout_in_force: Family<Labels, Gauge>,
    rollout_healthy_since: Family<Labels, Gauge>,
    rollout_gate_open: Family<Labels, Gauge>,
    /// The rollout series shown now.
    rollout_shown: std::sync::Mutex<RolloutShown>,
}

/// The rollout series shown now, by family.
#[derive(Default)]
struct RolloutShown {
    wave: Vec<Labels>,
    in_force: Vec<Labels>,
    healthy_since: Vec<Labels>,
    gate_open: Vec<Labels>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn trigger_word(t: &Trigger) -> &'static str {
    match t {
        Trigger::Start => "start",
        Trigger::Spec => "spec",
        Trigger::Event(_) => "event",
        Trigger::Resync => "resync",
        Trigger::Retry => "retry",
        Trigger::Health => "health",
    }
}

fn result_word(o: &Outcome) -> &'static str {
    match o {
        Outcome::InSync => "in_sync",
        Outcome::Applied(_) => "applied",
        Outcome::Pruned => "pruned",
        Outcome::Held(_) => "held",
        Outcome::Failed(_) => "failed",
        Outcome::BackingOff => "backoff",
        Outcome::Busy => "busy",
    }
}

impl Metrics {
    /// The families, registered under `uvmctl_`.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("uvmctl");
        let reconcile_duration =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        registry.register(
            "reconcile_duration_seconds",
            "How long one VM's reconcile took, by trigger and result",
            reconcile_duration.clone(),
        );
        let reconciles = Family::<Labels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles of one VM, by trigger (start, spec, event, resync, retry) and result",
            reconciles.clone(),
        );
        let drift_corrected = Family::<Labels, Counter>::default();
        registry.register(
            "drift_corrected",
            "Reconciles after a VM event or a resync that changed the VM (drift put back), per VM",
            drift_corrected.clone(),
        );
        let reverts = Family::<Labels, Counter>::default();
        registry.register(
            "reverts",
            "Changes undone because they left the VM unhealthy (its last healthy configuration applied again), per VM",
            reverts.clone(),
        );
        let window_open = Family::<Labels, Gauge>::default();
        registry.register(
            "window_open",
            "Each maintenance window of uvmctl-policy.yaml: 1 while it is open",
            window_open.clone(),
        );
        let vms = Family::<Labels, Gauge>::default();
        registry.register("vms", "VMs by state, as last observed", vms.clone());
        let held = Family::<Labels, Gauge>::default();
        registry.register(
            "held_changes",
            "Changes held back (above --max-disruption, or a recreate the policy forbids), per VM",
            held.clone(),
        );
        let health = Family::<Labels, Gauge>::default();
        registry.register(
            "vm_health",
            "Health of each VM's last change by its spec.health (pending, healthy, unhealthy): 1 for the one it is",
            health.clone(),
        );
        let in_backoff = Gauge::default();
        registry.register(
            "vms_in_backoff",
            "VMs waiting out a backoff after failures",
            in_backoff.clone(),
        );
        let spec_files_failing = Gauge::default();
        registry.register(
            "spec_files_failing",
            "Spec files that do not load (their VMs keep their last good spec)",
            spec_files_failing.clone(),
        );
        let revision = Family::<Labels, Gauge>::default();
        registry.register(
            "source_revision",
            "The git revision in force (kind=applied) and the one last fetched (kind=fetched): 1",
            revision.clone(),
        );
        let last_fetch = Gauge::default();
        registry.register(
            "source_last_fetch_timestamp_seconds",
            "When a fetch of the git source last succeeded (Unix time)",
            last_fetch.clone(),
        );
        let refused_unverified = Counter::default();
        registry.register(
            "source_unverified_revisions",
            "Revisions refused for want of a signature by an allowed signer",
            refused_unverified.clone(),
        );
        let refused = Family::<Labels, Counter>::default();
        registry.register(
            "source_refused_revisions",
            "Revisions not put in force, by kind (spec-errors, unverified, rewritten, missing-path, too-large); each counted once",
            refused.clone(),
        );
        let rollout_wave = Family::<Labels, Gauge>::default();
        registry.register(
            "rollout_wave",
            "This host's rollout wave (watch --wave): 1",
            rollout_wave.clone(),
        );
        let rollout_in_force = Family::<Labels, Gauge>::default();
        registry.register(
            "rollout_in_force_timestamp_seconds",
            "When the revision in force was put in force on this host (Unix time), by wave and revision",
            rollout_in_force.clone(),
        );
        let rollout_healthy_since = Family::<Labels, Gauge>::default();
        registry.register(
            "rollout_healthy_since_timestamp_seconds",
            "Since when the revision in force has been settled and healthy on this host (Unix time); no series while it is not",
            rollout_healthy_since.clone(),
        );
        let rollout_gate_open = Family::<Labels, Gauge>::default();
        registry.register(
            "rollout_gate_open",
            "Whether the last answer of this host's wave gate let the revision fetched go in force (1) or not (0), by wave and the wave it waits on",
            rollout_gate_open.clone(),
        );
        Arc::new(Metrics {
            rollout_wave,
            rollout_in_force,
            rollout_healthy_since,
            rollout_gate_open,
            rollout_shown: std::sync::Mutex::default(),
            registry,
            refused,
            refused_counted: std::sync::Mutex::default(),
            reconcile_duration,
            reconciles,
            drift_corrected,
            reverts,
            window_open,
            policy: std::sync::Mutex::default(),
            windows_shown: std::sync::Mutex::default(),
            vms,
            held,
            health,
            in_backoff,
            spec_files_failing,
            revision,
            last_fetch,
            refused_unverified,
            refused_seen: AtomicU64::new(0),
            known: std::sync::Mutex::default(),
            source_cache: std::sync::Mutex::default(),
            revisions: std::sync::Mutex::default(),
        })
    }

    /// `vm`'s health series: 1 for its state, 0 for the others; none for a
    /// VM without `spec.health` (or gone).
    fn health_of(&self, vm: &str, state: Option<HealthState>) {
        for s in HealthState::ALL {
            let labels: Labels = vec![("vm", vm.to_string()), ("health", s.as_str().into())];
            match state {
                Some(now) => {
                    self.health.get_or_create(&labels).set(i64::from(now == s));
                }
                None => {
                    self.health.remove(&labels);
                }
            }
        }
    }

    /// One VM's reconcile ended.
    pub fn reconciled(&self, vm: &str, trigger: &Trigger, outcome: &Outcome, took: Duration) {
        let labels: Labels = vec![
            ("trigger", trigger_word(trigger).into()),
            ("result", result_word(outcome).into()),
        ];
        self.reconcile_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.reconciles.get_or_create(&labels).inc();
        // Put back after a VM event or a resync: nothing in the specs asked.
        if matches!(outcome, Outcome::Applied(_))
            && matches!(trigger, Trigger::Event(_) | Trigger::Resync)
        {
            self.drift_corrected
                .get_or_create(&vec![("vm", vm.to_string())])
                .inc();
        }
    }

    /// The rollout policy now in force (its windows are judged at scrape).
    pub fn set_policy(&self, policy: Option<Arc<crate::spec::policy::Windows>>) {
        *self
            .policy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = policy;
    }

    /// Each window's series, open or not at `now`; none for windows gone.
    fn set_windows(&self, now: i64) {
        let policy = self
            .policy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let names: Vec<String> = policy
            .as_ref()
            .map(|p| p.names().map(str::to_string).collect())
            .unwrap_or_default();
        let mut shown = self
            .windows_shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for gone in shown.iter().filter(|n| !names.contains(n)) {
            self.window_open.remove(&vec![("window", gone.clone())]);
        }
        for name in &names {
            let open = policy.as_ref().is_some_and(|p| p.is_open(name, now));
            self.window_open
                .get_or_create(&vec![("window", name.clone())])
                .set(i64::from(open));
        }
        *shown = names;
    }

    /// `vm`'s change was reverted.
    pub fn reverted(&self, vm: &str) {
        self.reverts
            .get_or_create(&vec![("vm", vm.to_string())])
            .inc();
    }

    /// The gauges, from what the watcher would write to its status file
    /// and the VMs' last observed states.
    ///
    /// Series are set in place, never cleared first: a scrape meanwhile
    /// would see a family without them.
    pub fn update(&self, status: &WatchStatus, states: &BTreeMap<String, State>, now: u64) {
        for state in [
            State::Created,
            State::Running,
            State::Paused,
            State::Terminated,
            State::Saved,
        ] {
            let n = states.values().filter(|s| **s == state).count();
            self.vms
                .get_or_create(&vec![("state", state.as_str().to_string())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        // A series per VM the watcher tracks, from 0; none for VMs gone.
        {
            let mut known = self
                .known
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for gone in known.iter().filter(|v| !status.vms.contains_key(*v)) {
                self.drift_corrected.remove(&vec![("vm", gone.clone())]);
                self.reverts.remove(&vec![("vm", gone.clone())]);
                self.held.remove(&vec![("vm", gone.clone())]);
                self.health_of(gone, None);
            }
            known.clear();
            for vm in status.vms.keys() {
                let _ = self
                    .drift_corrected
                    .get_or_create(&vec![("vm", vm.clone())]);
                let _ = self.reverts.get_or_create(&vec![("vm", vm.clone())]);
                known.insert(vm.clone());
            }
        }
        for (vm, w) in &status.vms {
            self.health_of(vm, w.health.as_ref().map(|h| h.health));
            // The last line of a hold says why; the others are the changes.
            let n = w.held.len().saturating_sub(1);
            self.held
                .get_or_create(&vec![("vm", vm.clone())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let backing_off = status
            .vms
            .values()
            .filter(|w| w.backoff_until.is_some_and(|u| u > now))
            .count();
        self.in_backoff
            .set(i64::try_from(backing_off).unwrap_or(i64::MAX));
        let failing: std::collections::BTreeSet<&str> = status
            .spec_errors
            .iter()
            .map(|e| e.split(':').next().unwrap_or_default())
            .collect();
        self.spec_files_failing
            .set(i64::try_from(failing.len()).unwrap_or(i64::MAX));
        if let Some(cache) = &status.source_cache {
            *self
                .source_cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cache.clone());
        }
        self.set_rollout(status.rollout.as_ref());
        match self.source_now() {
            Some(src) => self.set_source(&src),
            None => {
                if let Some(src) = &status.source {
                    self.set_source(src);
                }
            }
        }
    }

    /// Sets `family` to exactly `now` (labels and values), removing the
    /// series `shown` had that `now` has not.
    fn set_exactly(
        family: &Family<Labels, Gauge>,
        shown: &mut Vec<Labels>,
        now: Vec<(Labels, i64)>,
    ) {
        for old in shown.iter().filter(|l| !now.iter().any(|(n, _)| n == *l)) {
            family.remove(old);
        }
        for (labels, v) in &now {
            family.get_or_create(labels).set(*v);
        }
        *shown = now.into_iter().map(|(l, _)| l).collect();
    }

    /// This host's part in the rollout: its wave, when the revision in
    /// force went in force, and since when it is settled and healthy.
    fn set_rollout(&self, rollout: Option<&super::status::RolloutStatus>) {
        let secs = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
        let mut shown = self
            .rollout_shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut wave, mut in_force, mut healthy) = (Vec::new(), Vec::new(), Vec::new());
        if let Some(r) = rollout {
            let w = r.wave.to_string();
            wave.push((vec![("wave", w.clone())], 1));
            if let Some(rev) = &r.revision {
                let labels: Labels = vec![("wave", w.clone()), ("revision", rev.clone())];
                if let Some(t) = r.in_force_since {
                    in_force.push((labels.clone(), secs(t)));
                }
                if let Some(t) = r.healthy_since {
                    healthy.push((labels, secs(t)));
                }
            }
        }
        Self::set_exactly(&self.rollout_wave, &mut shown.wave, wave);
        Self::set_exactly(&self.rollout_in_force, &mut shown.in_force, in_force);
        Self::set_exactly(
            &self.rollout_healthy_since,
            &mut shown.healthy_since,
            healthy,
        );
    }

    /// The source as its cache says now: a fetch alone wakes no reconcile.
    fn source_now(&self) -> Option<crate::source::SourceStatus> {
        let cache = self
            .source_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        crate::source::read_status(&cache)
    }

    fn set_source(&self, src: &crate::source::SourceStatus) {
        let now: Vec<Labels> = [("applied", &src.applied), ("fetched", &src.fetched)]
            .into_iter()
            .filter_map(|(kind, r)| {
                Some(vec![
                    ("kind", kind.into()),
                    ("revision", r.as_ref()?.to_string()),
                ])
            })
            .collect();
        {
            let mut shown = self
                .revisions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for old in shown.iter().filter(|l| !now.contains(l)) {
                self.revision.remove(old);
            }
            for labels in &now {
                self.revision.get_or_create(labels).set(1);
            }
            *shown = now;
        }
        if let Some(t) = src.last_fetch {
            self.last_fetch.set(i64::try_from(t).unwrap_or(i64::MAX));
        }
        {
            let gate = src.gate.as_ref().map(|g| {
                let labels: Labels = vec![
                    ("wave", g.wave.to_string()),
                    ("waits_on", g.waits_on.to_string()),
                ];
                (labels, i64::from(g.open))
            });
            let mut shown = self
                .rollout_shown
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Self::set_exactly(
                &self.rollout_gate_open,
                &mut shown.gate_open,
                gate.into_iter().collect(),
            );
        }
        let seen = self
            .refused_seen
            .swap(src.refused_unverified, Ordering::Relaxed);
        if src.refused_unverified > seen {
            self.refused_unverified
                .inc_by(src.refused_unverified - seen);
        }
        let mut counted = self
            .refused_counted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (kind, n) in &src.refused {
            let before = counted.insert(kind.clone(), *n).unwrap_or(0);
            if *n > before {
                self.refused
                    .get_or_create(&vec![("kind", kind.clone())])
                    .inc_by(n - before);
            }
        }
    }

    /// The OpenMetrics text of every family.
    pub fn encode(&self) -> String {
        if let Some(src) = self.source_now() {
            self.set_source(&src);
        }
        self.set_windows(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The most `/metrics` connections served at once: a scraper needs one,
/// and a client holding a thousand idle ones must not take the watcher's
/// descriptors (issue 31).
pub const MAX_METRICS_CONNECTIONS: usize = 32;
/// How long a client may take to send its request's headers.
pub const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may last in all.
pub const METRICS_CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves `/metrics` on `listener` until the task is dropped. At most
/// [`MAX_METRICS_CONNECTIONS`] at once; one past them is closed as soon as
/// it is accepted (so the kernel's queue never holds a scrape behind idle
/// ones). One request per connection, its headers within
/// [`METRICS_HEADER_TIMEOUT`].
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors and the like: try again shortly.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let response = if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(metrics.encode())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(
                                    b"only /metrics is served here\n",
                                )))
                        };
                        response.map_err(std::io::Error::other)
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(16 << 10)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(METRICS_CONNECTION_TIMEOUT, conn).await;
            drop(slot);
        });
    }
}
