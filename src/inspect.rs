//! What `status` and `export` show, read through the virtstack trait only.

use crate::plan::{flatten, observed_power};
use crate::spec::{API_VERSION, KIND, Metadata, VmDocument, VmStatus};
use crate::vm::history::{History, short_digest as short};
use crate::vm::{Virtstack, VmError, VmName};
use crate::watch::status::{VmWatch, WatchStatus};

/// One VM as `uvmctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusRow {
    /// VM name.
    pub name: String,
    /// Lifecycle state, or `unknown` when it could not be observed.
    pub state: String,
    /// Seconds since it was started (running or paused VMs).
    pub uptime_seconds: Option<u64>,
    /// Memory, in MB.
    pub memory_mb: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Devices (everything but the singletons).
    pub devices: usize,
    /// vCPU time used since launch (running VMs only).
    pub cpu_time_ms: Option<u64>,
    /// Host memory in use (running VMs only).
    pub rss_mb: Option<u64>,
    /// Why it exited, or why it cannot be observed.
    pub last_error: Option<String>,
    /// What `uvmctl watch` last did to it, when a watcher writes status here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch: Option<VmWatch>,
}

/// Version of the `status --output json` document.
pub const STATUS_FORMAT_VERSION: u32 = 1;

/// `uvmctl status --output json` (docs/plan-json.md, "status"): every VM,
/// what a watcher of this state directory says, and the git source it
/// follows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusDoc {
    /// [`STATUS_FORMAT_VERSION`].
    pub format_version: u32,
    /// One row a VM.
    pub vms: Vec<StatusRow>,
    /// The watcher, when one wrote its status here.
    pub watch: Option<WatchSummary>,
    /// The git source that watcher follows: the revision in force, the one
    /// fetched last, the last error (spec errors, an unverified commit, a
    /// force-push, the size bound...).
    pub source: Option<crate::source::SourceStatus>,
}

/// The watcher's own part of [`StatusDoc`] (per VM it is in the rows).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchSummary {
    /// Its process id.
    pub pid: u32,
    /// Whether it still runs (else this is what it last wrote).
    pub running: bool,
    /// The spec directory it follows.
    pub dir: std::path::PathBuf,
    /// When it started and last wrote (seconds since the Unix epoch).
    pub started: u64,
    /// When it last wrote its status.
    pub updated: u64,
    /// Spec errors of its last load.
    pub spec_errors: Vec<String>,
    /// Its host's part in a rollout (`watch --wave`): the wave, the revision
    /// in force, since when it is settled and healthy, or what keeps it
    /// from being so. The gate it waits on is the source's (`source.gate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::watch::status::RolloutStatus>,
}

impl StatusDoc {
    /// The document of `rows` and what a watcher wrote (and whether it runs).
    pub fn new(rows: Vec<StatusRow>, watch: Option<(&WatchStatus, bool)>) -> Self {
        StatusDoc {
            format_version: STATUS_FORMAT_VERSION,
            vms: rows,
            watch: watch.map(|(w, running)| WatchSummary {
                pid: w.pid,
                running,
                dir: w.dir.clone(),
                started: w.started,
                updated: w.updated,
                spec_errors: w.spec_errors.clone(),
                rollout: w.rollout.clone(),
            }),
            source: watch.and_then(|(w, _)| source_now(w)),
        }
    }
}

/// The source as its cache says now, else as the watcher last wrote it (a
/// fetch alone does not rewrite the watcher's file).
fn source_now(status: &WatchStatus) -> Option<crate::source::SourceStatus> {
    status
        .source_cache
        .as_deref()
        .and_then(crate::source::read_status)
        .or_else(|| status.source.clone())
}

/// Every VM of the virtstack, one row each; a VM that cannot be observed is
/// a row with state `unknown` and the reason, never a failure of the whole.
///
/// # Errors
/// Only when the virtstack cannot list its VMs.
pub async fn status(vs: &dyn Virtstack) -> Result<Vec<StatusRow>, VmError> {
    let observed = crate::reconcile::observe_all(vs).await?;
    let mut rows = Vec::new();
    for (name, why) in &observed.unknown {
        rows.push(StatusRow {
            name: name.clone(),
            state: "unknown".into(),
            uptime_seconds: None,
            memory_mb: 0,
            vcpus: 0,
            devices: 0,
            cpu_time_ms: None,
            rss_mb: None,
            last_error: Some(why.clone()),
            watch: None,
        });
    }
    for (name, vm) in observed.vms {
        let vm_name = VmName::new(&name)?;
        let stats = if vm.state.is_live() {
            tokio::time::timeout(crate::reconcile::OBSERVE_DEADLINE, vs.stats(&vm_name))
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        rows.push(StatusRow {
            state: vm.state.shown().into(),
            uptime_seconds: stats.and_then(|s| s.uptime_seconds),
            memory_mb: vm.config.memory.size_mb,
            vcpus: vm.config.processors.count,
            devices: flatten(&vm.config)
                .keys()
                .filter(|(k, _)| !k.is_singleton())
                .count(),
            cpu_time_ms: stats.map(|s| s.total_runtime_ns / 1_000_000),
            rss_mb: stats.map(|s| s.working_set_bytes >> 20),
            last_error: vm.exit_error,
            watch: None,
            name,
        });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

/// The rows as `uvmctl status` prints them: a header, then one line a VM.
pub fn status_table(rows: &[StatusRow]) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "{:<24} {:<11} {:>8} {:>8} {:>5} {:>7} {:>9} {:>7}  LAST ERROR\n",
        "NAME", "STATE", "UPTIME", "MEMORY", "VCPUS", "DEVICES", "CPU TIME", "RSS"
    );
    for r in rows {
        let up = r.uptime_seconds.map_or("-".into(), |s| format!("{s}s"));
        let cpu = r
            .cpu_time_ms
            .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        let rss = r.rss_mb.map_or("-".into(), |mb| format!("{mb}MB"));
        let _ = writeln!(
            out,
            "{:<24} {:<11} {:>8} {:>6}MB {:>5} {:>7} {:>9} {:>7}  {}",
            r.name,
            r.state,
            up,
            r.memory_mb,
            r.vcpus,
            r.devices,
            cpu,
            rss,
            r.last_error.as_deref().unwrap_or("-")
        );
    }
    out
}

/// Adds what the watcher says to each VM's row. While it runs, a VM it
/// has a spec for and the host lacks (being created, or failing to be) is a
/// row of its own, `absent`; a watcher that stopped says nothing about VMs
/// that are gone (its status section still lists what it last wrote).
pub fn add_watch(rows: &mut Vec<StatusRow>, status: &WatchStatus, running: bool) {
    for (name, w) in &status.vms {
        match rows.iter_mut().find(|r| &r.name == name) {
            Some(r) => r.watch = Some(w.clone()),
            None if !running => {}
            None => rows.push(StatusRow {
                name: name.clone(),
                state: "absent".into(),
                uptime_seconds: None,
                memory_mb: 0,
                vcpus: 0,
                devices: 0,
                cpu_time_ms: None,
                rss_mb: None,
                last_error: None,
                watch: Some(w.clone()),
            }),
        }
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
}

/// A commit, shortened as git shows it.
fn short_sha(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// The watcher's part of `uvmctl status`: who watches, and per VM the last
/// reconcile, held changes, backoff and spec errors. A watcher that stopped
/// says nothing of VMs the host no longer has (`present`).
pub fn watch_section(
    status: &WatchStatus,
    running: bool,
    now: u64,
    present: &dyn Fn(&str) -> bool,
) -> String {
    use std::fmt::Write;
    let ago = |t: u64| format!("{}s ago", now.saturating_sub(t));
    let mut out = format!(
        "\nwatch: pid {} {}, following {}, updated {}\n",
        status.pid,
        match (
            running,
            status.vms.is_empty() && status.spec_errors.is_empty()
        ) {
            (true, _) => "running",
            (false, true) => "not running",
            (false, false) => "not running (what it last reported below)",
        },
        status.dir.display(),
        ago(status.updated)
    );
    if let Some(src) = source_now(status).as_ref() {
        let _ = write!(
            out,
            "  source: {} {} (path {}): ",
            src.url,
            src.reference,
            src.path.display()
        );
        match &src.applied {
            Some(r) => {
                let _ = write!(out, "in force {r}");
            }
            None => out.push_str("nothing in force yet"),
        }
        if let Some(t) = src.last_fetch {
            let _ = write!(out, ", last fetch {}", ago(t));
        }
        if src.fetched.is_some() && src.fetched != src.applied {
            let fetched = src
                .fetched
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            let _ = write!(out, ", fetched {fetched} (not in force)");
        }
        out.push('\n');
        if let Some(e) = &src.last_error {
            let _ = writeln!(out, "    source error (the revision in force stays): {e}");
        }
        if let Some(g) = &src.gate {
            let in_force = src.applied.as_ref() == Some(&g.revision);
            let _ = writeln!(
                out,
                "    gate of wave {}: {} {} (asked {}): {}",
                g.waits_on,
                match (g.open, in_force) {
                    (false, false) => "closed, waiting to put in force",
                    (true, false) => "passed, not in force yet:",
                    (true, true) => "passed for",
                    (false, true) => "closed for (put in force by hand, --ignore-gate)",
                },
                g.revision,
                ago(g.checked_at),
                g.answer
            );
        }
    }
    if let Some(r) = &status.rollout {
        let _ = write!(out, "  rollout: wave {}", r.wave);
        if let Some(rev) = &r.revision {
            let _ = write!(out, ", {} in force", short_sha(rev));
            if let Some(t) = r.in_force_since {
                let _ = write!(out, " since {}", ago(t));
            }
        }
        match (&r.unsettled, r.healthy_since) {
            (Some(why), _) => {
                let _ = write!(out, ", not settled: {why}");
            }
            (None, Some(t)) if running => {
                let _ = write!(out, ", settled and healthy for {}s", now.saturating_sub(t));
            }
            (None, Some(t)) => {
                let _ = write!(
                    out,
                    ", settled and healthy from {} until its watcher stopped",
                    ago(t)
                );
            }
            (None, None) => {}
        }
        out.push('\n');
    }
    for (name, w) in status
        .vms
        .iter()
        .filter(|(name, _)| running || present(name))
    {
        let _ = write!(
            out,
            "  {name}: {}",
            w.result.as_deref().unwrap_or("not reconciled yet")
        );
        if let (Some(t), Some(trigger)) = (w.last_reconcile, &w.trigger) {
            let _ = write!(out, " ({trigger}, {})", ago(t));
        }
        if let Some(r) = &w.revision {
            let _ = write!(out, " at {r}");
        }
        if w.failures > 0 {
            let _ = write!(out, "; {} failure(s) in a row", w.failures);
        }
        if let Some(until) = w.backoff_until.filter(|u| *u > now) {
            let _ = write!(out, "; next try in {}s", until - now);
        }
        out.push('\n');
        for h in &w.held {
            let _ = writeln!(out, "    held: {h}");
        }
        if let Some(e) = &w.spec_error {
            let _ = writeln!(out, "    spec error (kept at its last good spec): {e}");
        }
        if let Some(h) = &w.health {
            let _ = write!(
                out,
                "    health: {} (its change of {})",
                h.health.as_str(),
                ago(h.since)
            );
            if let (Some(probe), Some(answer)) = (&h.probe, &h.answer) {
                // The answer is the guest's words.
                let _ = write!(out, ": probe {probe}: {}", crate::escape::escaped(answer));
            }
            out.push('\n');
        }
        if let Some(r) = &w.revert {
            let _ = write!(
                out,
                "    revert: {} ({}): spec {} judged unhealthy by probe {}: {}",
                r.state,
                ago(r.since),
                short(&r.from),
                r.probe,
                crate::escape::escaped(&r.answer)
            );
            if let Some(to) = &r.to {
                let _ = write!(out, "; back to {}", short(to));
            }
            for why in &r.why {
                let _ = write!(out, "; {why}");
            }
            out.push('\n');
        }
    }
    for e in &status.spec_errors {
        let _ = writeln!(out, "  spec error: {e}");
    }
    out
}

/// `uvmctl history NAME`: the configurations applied to a VM, oldest first,
/// numbered, with when (seconds ago at `now`), the spec's digest, the
/// source revision, the health verdict and what decided it.
pub fn history_table(history: &History, now: u64) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "{:<3} {:<12} {:<12} {:<24} {:<10} NOTE\n",
        "#", "APPLIED", "SPEC", "REVISION", "HEALTH"
    );
    for (i, e) in history.entries().iter().enumerate() {
        let mut note = String::new();
        if let Some(from) = &e.reverted_from {
            let _ = write!(note, "revert of {}", short(from));
        }
        if let (Some(probe), Some(answer)) = (&e.probe, &e.answer) {
            if !note.is_empty() {
                note.push_str("; ");
            }
            // The answer is the guest's words.
            let _ = write!(note, "probe {probe}: {}", crate::escape::escaped(answer));
        }
        let row = format!(
            "{:<3} {:<12} {:<12} {:<24} {:<10} {note}",
            i + 1,
            format!("{}s ago", now.saturating_sub(e.at)),
            short(&e.spec),
            e.revision.as_deref().unwrap_or("-"),
            e.health.as_str(),
        );
        let _ = writeln!(out, "{}", row.trim_end());
    }
    if history.is_empty() {
        out.push_str("(nothing applied through uvmctl yet)\n");
    }
    out
}

/// Why `export` could not write a VM.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The virtstack failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Serializing failed.
    #[error("cannot write YAML")]
    Yaml(#[from] serde_yaml::Error),
}

/// The observed state of `only` (or every VM) as spec documents, with their
/// status: what `plan --observed` reads and adoption starts from.
///
/// # Errors
/// A VM asked for by name that cannot be observed; with no name, VMs that
/// cannot be observed are left out and listed in the second value.
pub async fn export(
    vs: &dyn Virtstack,
    only: Option<&VmName>,
) -> Result<(String, Vec<(String, String)>), ExportError> {
    let mut skipped = Vec::new();
    let vms = match only {
        Some(name) => vec![(name.to_string(), vs.observe(name).await?)],
        None => {
            let observed = crate::reconcile::observe_all(vs).await?;
            skipped.extend(observed.unknown);
            observed.vms.into_iter().collect()
        }
    };
    let mut out = String::new();
    for (i, (name, vm)) in vms.into_iter().enumerate() {
        let mut config = vm.config;
        config.power_state = observed_power(vm.state);
        config.canonicalize();
        let doc = VmDocument {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: Metadata {
                name,
                labels: Default::default(),
            },
            spec: config,
            status: Some(VmStatus {
                state: vm.state,
                managed: vm.managed,
            }),
        };
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml::to_string(&doc)?);
    }
    Ok((out, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::status::VmWatch;

    /// Issue 20: a stopped watcher left `absent` rows for VMs destroyed since,
    /// and promised "last words below" with nothing below.
    #[test]
    fn a_stopped_watcher_adds_no_absent_rows_and_promises_only_what_follows() {
        let mut status = WatchStatus {
            pid: 7,
            ..WatchStatus::default()
        };
        let text = watch_section(&status, false, 0, &|_| true);
        assert!(text.contains("pid 7 not running,"), "{text}");
        assert!(!text.contains("below"), "{text}");
        status.vms.insert("gone".into(), VmWatch::default());
        let text = watch_section(&status, false, 0, &|_| true);
        assert!(text.contains("below") && text.contains("gone"), "{text}");
        // Issue 30: held changes of a VM destroyed since are not shown.
        status.vms.insert(
            "destroyed".into(),
            VmWatch {
                held: vec!["memory 256 → 512".into()],
                ..VmWatch::default()
            },
        );
        let text = watch_section(&status, false, 0, &|vm| vm != "destroyed");
        assert!(
            !text.contains("destroyed") && !text.contains("held"),
            "{text}"
        );
        let text = watch_section(&status, true, 0, &|vm| vm != "destroyed");
        assert!(
            text.contains("destroyed"),
            "a running watcher says it all: {text}"
        );

        let mut rows = Vec::new();
        add_watch(&mut rows, &status, false);
        assert!(rows.is_empty());
        add_watch(&mut rows, &status, true);
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.state == "absent"));
    }

    /// Issue 34: a VM's health after its last change, with the probe and
    /// its answer (the guest's words, escaped) when unhealthy.
    #[test]
    fn the_watch_section_says_each_vms_health() {
        use crate::watch::status::{HealthState, HealthStatus};
        let mut status = WatchStatus::default();
        status.vms.insert(
            "web".into(),
            VmWatch {
                health: Some(HealthStatus {
                    health: HealthState::Unhealthy,
                    probe: Some("exec cat /x".into()),
                    answer: Some("no\u{1b}]0;pwned".into()),
                    since: 90,
                }),
                ..VmWatch::default()
            },
        );
        status.vms.insert(
            "db".into(),
            VmWatch {
                health: Some(HealthStatus::pending(95)),
                ..VmWatch::default()
            },
        );
        let text = watch_section(&status, true, 100, &|_| true);
        assert!(
            text.contains(
                "    health: unhealthy (its change of 10s ago): probe exec cat /x: no\\e]0;pwned\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("    health: pending (its change of 5s ago)\n"),
            "{text}"
        );
    }

    /// Issue 34: a revert, held with why, and the history table, the
    /// guest's words escaped in both.
    #[test]
    fn the_watch_section_says_each_revert_and_the_history_each_change() {
        use crate::vm::health::Verdict;
        use crate::vm::history::Applied;
        use crate::watch::status::RevertStatus;
        let mut status = WatchStatus::default();
        status.vms.insert(
            "web".into(),
            VmWatch {
                revert: Some(RevertStatus {
                    state: "held".into(),
                    from: "a".repeat(64),
                    to: Some("b".repeat(64)),
                    probe: "panic".into(),
                    answer: "oops\u{7}".into(),
                    why: vec!["needs a restart, above --max-disruption live".into()],
                    since: 40,
                }),
                ..VmWatch::default()
            },
        );
        let text = watch_section(&status, true, 100, &|_| true);
        assert!(
            text.contains(&format!(
                "    revert: held (60s ago): spec {} judged unhealthy by probe panic: oops\\x07; back to {}; needs a restart, above --max-disruption live\n",
                "a".repeat(12),
                "b".repeat(12)
            )),
            "{text}"
        );

        let mut config = crate::spec::VmConfig {
            health: Some(crate::vm::config::Health {
                probes: vec![crate::vm::config::Probe::of(
                    crate::vm::config::ProbeKind::Agent,
                )],
            }),
            ..crate::spec::VmConfig::default()
        };
        let mut h = History::default();
        h.applied(Applied::new(config.clone(), 10, Some("main@sha1:1".into())));
        h.judged(&config.digest(), &Verdict::Healthy);
        let good = config.digest();
        config.processors.count = 2;
        h.applied(Applied::new(config.clone(), 50, None));
        h.judged(
            &config.digest(),
            &Verdict::Unhealthy {
                probe: "exec ls /x".into(),
                answer: "gone\u{1b}[2J".into(),
            },
        );
        let table = history_table(&h, 100);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[1].starts_with("1   90s ago"), "{table}");
        assert!(
            lines[1].contains(&good[..12]) && lines[1].contains("main@sha1:1"),
            "{table}"
        );
        assert!(lines[1].contains("healthy"), "{table}");
        assert!(
            lines[2].ends_with("unhealthy  probe exec ls /x: gone\\e[2J"),
            "{table}"
        );
        assert!(history_table(&History::default(), 0).contains("nothing applied"));
    }
}
