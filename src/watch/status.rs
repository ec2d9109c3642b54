//! The watcher's status file: what it last did to each VM, what it holds
//! back and why, written atomically so `uvmctl status` never reads half.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Name of the status file in the state directory.
pub const STATUS_FILE: &str = "watch-status.json";

/// Largest status file `read` accepts: it lives in a root-owned directory,
/// but a bound costs nothing.
const MAX_STATUS_BYTES: u64 = 16 << 20;

/// The whole status file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchStatus {
    /// The watcher's process id.
    pub pid: u32,
    /// The spec directory it follows.
    pub dir: PathBuf,
    /// When it started (seconds since the Unix epoch).
    pub started: u64,
    /// When this file was written.
    pub updated: u64,
    /// Spec errors of the last load, as `path:line:col: field: message`.
    pub spec_errors: Vec<String>,
    /// Per VM.
    pub vms: BTreeMap<String, VmWatch>,
    /// The git source it follows, as its cache recorded it when this file
    /// was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::source::SourceStatus>,
    /// That cache, where `status` reads the source as it is now (a fetch
    /// alone does not rewrite this file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_cache: Option<PathBuf>,
    /// This host's part in a rollout (`--wave`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// This host's part in a rollout: its wave, and whether the revision in
/// force is settled and healthy here, since when (what the next wave's
/// gate waits on). The gate this host waits on is the source's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The wave.
    pub wave: u32,
    /// The commit whose specs are in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// When it was put in force here (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_force_since: Option<u64>,
    /// Since when it has been settled and healthy here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since: Option<u64>,
    /// What keeps it from being settled and healthy, while something does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsettled: Option<String>,
}

/// What the watcher knows of one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmWatch {
    /// When it was last reconciled (seconds since the Unix epoch).
    pub last_reconcile: Option<u64>,
    /// What triggered that reconcile.
    pub trigger: Option<String>,
    /// Its result: `in sync`, `applied N change(s)`, `held`, `failed: ...`.
    pub result: Option<String>,
    /// Changes held above `--max-disruption` (or needing a recreate the
    /// spec's policy does not allow), one line each; empty when none.
    pub held: Vec<String>,
    /// Consecutive failures (reconcile errors and crashes soon after a start).
    pub failures: u32,
    /// No new attempt before this time (seconds since the Unix epoch).
    pub backoff_until: Option<u64>,
    /// The first error of its spec file, while it fails to load: the VM is
    /// kept at its last good spec meanwhile.
    pub spec_error: Option<String>,
    /// The git revision in force at its last reconcile (`main@sha1:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Its health after its last change, by its `spec.health` (none without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthStatus>,
    /// A change of it judged unhealthy, and whether it was reverted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<RevertStatus>,
}

/// What the watcher did about a change judged unhealthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevertStatus {
    /// `reverting`, `held`, `reverted`, `revert unhealthy`, or `not
    /// reverted`.
    pub state: String,
    /// The digest of the spec judged unhealthy (not applied again until
    /// the spec changes, when reverted).
    pub from: String,
    /// The digest of the configuration gone back to, when reverted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The probe that judged it, and its answer.
    pub probe: String,
    /// What the probe answered (the guest's words, bounded).
    pub answer: String,
    /// Why it was not reverted, or what holds the revert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub why: Vec<String>,
    /// When this was last said (seconds since the Unix epoch).
    pub since: u64,
}

/// A VM's health as the watcher judged its last change (`spec.health`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthStatus {
    /// The verdict.
    pub health: HealthState,
    /// The probe that decided, when unhealthy (`panic`, `exit`, or a
    /// probe as `spec.health` names it: `exec cat /x`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// Its last answer (the guest's words, bounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// When the change judged was made (seconds since the Unix epoch).
    pub since: u64,
}

/// A verdict of `spec.health`, as the status file and the metrics say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Judged now.
    Pending,
    /// Every probe passed for its minimum healthy time.
    Healthy,
    /// A probe did not, or the guest panicked or ended.
    Unhealthy,
}

impl HealthState {
    /// Every state, in a stable order.
    pub const ALL: [HealthState; 3] = [
        HealthState::Pending,
        HealthState::Healthy,
        HealthState::Unhealthy,
    ];

    /// As the status file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Pending => "pending",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        }
    }
}

impl HealthStatus {
    /// Being judged, for the change made at `since`.
    pub fn pending(since: u64) -> Self {
        HealthStatus {
            health: HealthState::Pending,
            probe: None,
            answer: None,
            since,
        }
    }

    /// Judged `verdict`, for the change made at `since`.
    pub fn judged(verdict: &crate::vm::health::Verdict, since: u64) -> Self {
        use crate::vm::health::Verdict;
        match verdict {
            Verdict::Pending => Self::pending(since),
            Verdict::Healthy => HealthStatus {
                health: HealthState::Healthy,
                ..Self::pending(since)
            },
            Verdict::Unhealthy { probe, answer } => HealthStatus {
                health: HealthState::Unhealthy,
                probe: Some(probe.clone()),
                answer: Some(answer.clone()),
                since,
            },
        }
    }
}

/// Writes `status` to `<dir>/watch-status.json` atomically (a temporary
/// file renamed over it).
///
/// # Errors
/// When the file cannot be written.
pub fn write(dir: &Path, status: &WatchStatus) -> std::io::Result<()> {
    let path = dir.join(STATUS_FILE);
    let mut text = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    text.push(b'\n');
    // O_EXCL | O_NOFOLLOW under a unique name; removed again on failure.
    crate::hostfs::replace_file(&path, &text, 0o644)
}

/// Reads the status file of `dir`, if there is one and it parses; also
/// whether the watcher that wrote it still runs.
pub fn read(dir: &Path) -> Option<(WatchStatus, bool)> {
    let text = crate::hostfs::read_state_file(&dir.join(STATUS_FILE), MAX_STATUS_BYTES).ok()?;
    let status: WatchStatus = serde_json::from_slice(&text).ok()?;
    let running = watcher_runs(status.pid);
    Some((status, running))
}

/// Whether `pid` is a running `uvmctl watch` (pids get reused).
fn watcher_runs(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let mut args = c.split(|b| *b == 0);
        args.next().is_some() && args.any(|a| a == b"watch")
    })
}

/// What the status file and systemd were last told.
#[derive(Default)]
pub(super) struct StatusLog {
    /// The status last written, while the file holds it.
    written: Option<WatchStatus>,
    /// The error of the last failed write, until one succeeds.
    error: Option<String>,
    /// The last STATUS= line sent to systemd.
    notified: Option<String>,
}

impl StatusLog {
    /// Writes `status` into `dir` unless the file already says it.
    pub(super) fn write(&mut self, dir: &std::path::Path, status: WatchStatus) {
        let unchanged = self.written.as_ref().is_some_and(|w| {
            WatchStatus {
                updated: status.updated,
                ..w.clone()
            } == status
        });
        if unchanged {
            return;
        }
        match write(dir, &status) {
            Ok(()) => {
                if self.error.take().is_some() {
                    tracing::info!(dir = %dir.display(), "the status file is written again");
                }
                self.written = Some(status);
            }
            Err(e) => {
                let text = e.to_string();
                if self.error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(dir = %dir.display(), "cannot write the status file: {text} (said once; retried at every change)");
                }
                self.error = Some(text);
                self.written = None;
            }
        }
    }

    /// Tells systemd `line` when it changed, not at every write.
    pub(super) fn notify(&mut self, line: String) {
        if self.notified.as_deref() != Some(line.as_str()) {
            sd_notify(Notify::Status(&line));
            self.notified = Some(line);
        }
    }
}

/// `text` as one bounded line with its control characters escaped: a
/// newline in a STATUS would start another notify assignment (`MAINPID=`),
/// and a file name in an error is a repository's to choose.
#[cfg_attr(not(unix), allow(dead_code))]
pub(super) fn one_line(text: &str) -> String {
    crate::escape::escaped(text)
        .replace(['\n', '\t'], " ")
        .chars()
        .take(300)
        .collect()
}

/// What the watcher tells its service manager.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(unix), allow(dead_code))]
pub(super) enum Notify<'a> {
    /// Up (with what it is doing, if anything).
    Ready(Option<&'a str>),
    /// What it is doing now.
    Status(&'a str),
    /// Stopping.
    Stopping,
}

/// Tells systemd `state` (without NOTIFY_SOCKET, not under systemd, this
/// does nothing; nor elsewhere than on unix).
pub(super) fn sd_notify(state: Notify<'_>) {
    #[cfg(unix)]
    {
        use sd_notify::NotifyState;
        let _ = match state {
            Notify::Ready(None) => sd_notify::notify(&[NotifyState::Ready]),
            Notify::Ready(Some(why)) => {
                let why = one_line(why);
                sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&why)])
            }
            Notify::Status(line) => sd_notify::notify(&[NotifyState::Status(&one_line(line))]),
            Notify::Stopping => sd_notify::notify(&[NotifyState::Stopping]),
        };
    }
    #[cfg(not(unix))]
    let _ = state;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_status_reads_back_and_names_a_dead_watcher_as_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = WatchStatus {
            pid: u32::MAX,
            dir: "/specs".into(),
            ..WatchStatus::default()
        };
        s.vms.insert(
            "web".into(),
            VmWatch {
                held: vec!["memory 256 → 512 (restart)".into()],
                failures: 2,
                ..VmWatch::default()
            },
        );
        write(dir.path(), &s).expect("write");
        let (back, running) = read(dir.path()).expect("read");
        assert_eq!(back, s);
        assert!(!running, "no such process");
        assert!(read(&dir.path().join("nowhere")).is_none());
    }
}
