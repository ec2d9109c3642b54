//! What reaches the watcher from outside its spec directory and its VMs:
//! the process's signals, and the git source's new revisions. Each becomes a
//! [`Signal`] on one channel, so the loop has one place to hear them.

use crate::source::{GitSource, SourceError, Synced};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;

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

/// Turns the process's signals into [`Signal`]s: SIGTERM and SIGINT stop
/// (a second one exits at once); SIGHUP (a terminal gone, `systemctl
/// reload`) reconciles now, or with a git source asks `fetch_first` to
/// fetch before (`flux reconcile`); the git task then asks for the reconcile.
///
/// # Errors
/// When a signal handler cannot be installed.
#[cfg(unix)]
pub fn forward_os_signals(
    tx: UnboundedSender<Signal>,
    fetch_first: Option<Arc<Notify>>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let got = tokio::select! {
                _ = term.recv() => Signal::Stop,
                _ = int.recv() => Signal::Stop,
                _ = hup.recv() => match &fetch_first {
                    Some(fetch) => {
                        fetch.notify_one();
                        continue;
                    }
                    None => Signal::Reconcile,
                },
            };
            if tx.send(got).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Where there are no unix signals (Windows): Ctrl-C and Ctrl-Break stop, a
/// second one exits at once; a fetch and reconcile now is `fetch_first`'s
/// to be asked some other way.
///
/// # Errors
/// When a console handler cannot be installed.
#[cfg(not(unix))]
pub fn forward_os_signals(
    tx: UnboundedSender<Signal>,
    fetch_first: Option<Arc<Notify>>,
) -> std::io::Result<()> {
    use tokio::signal::windows::{ctrl_break, ctrl_c};
    let mut c = ctrl_c()?;
    let mut b = ctrl_break()?;
    let _ = fetch_first;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = c.recv() => {}
                _ = b.recv() => {}
            }
            if tx.send(Signal::Stop).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Polls `source` every `interval` (at least a second), and at once when
/// `fetch_now` is notified. A new revision put in force is a
/// [`Signal::Rescan`] (read now, not at the file watcher's or the resync's
/// leisure); a fetch someone asked for ends with [`Signal::Reconcile`].
/// Ends when the watcher is gone.
pub fn poll_git(
    source: GitSource,
    interval: Duration,
    fetch_now: Arc<Notify>,
    tx: UnboundedSender<Signal>,
    (mut refused, mut waits): (RefusedLog, GateLog),
) {
    let interval = interval.max(Duration::from_secs(1));
    tokio::spawn(async move {
        loop {
            let asked = tokio::select! {
                () = tokio::time::sleep(interval) => false,
                () = fetch_now.notified() => true,
            };
            match source.sync().await {
                Ok(Synced::Applied(r)) => {
                    match waits.passed(&r) {
                        Some(answer) => {
                            tracing::info!(url = %source.options().url, gate = %answer, "revision in force: {r} (its wave's gate passed)")
                        }
                        None => {
                            tracing::info!(url = %source.options().url, "revision in force: {r}")
                        }
                    }
                    refused = RefusedLog::default();
                    let _ = tx.send(Signal::Rescan);
                }
                Ok(Synced::Unchanged(_)) => {}
                Ok(Synced::Waiting { gate, .. }) => waits.log(&gate),
                Err(e) => refused.log(&source, &e),
            }
            if asked && tx.send(Signal::Reconcile).is_err() {
                return;
            }
        }
    });
}

/// Says once that a revision waits at its wave's gate, and again when the
/// gate's answer changes (not at every interval).
#[derive(Debug, Default)]
pub struct GateLog {
    last: Option<crate::source::GateStatus>,
}

impl GateLog {
    /// Logs what the gate said of a revision that waits.
    pub fn log(&mut self, gate: &crate::source::GateStatus) {
        let same = self
            .last
            .as_ref()
            .is_some_and(|l| l.revision == gate.revision && l.answer == gate.answer);
        if same {
            tracing::debug!(revision = %gate.revision, answer = %gate.answer, "still waiting for the gate");
        } else {
            tracing::info!(
                revision = %gate.revision,
                waits_on = gate.waits_on,
                answer = %gate.answer,
                "waiting for the gate of wave {} before putting the revision in force",
                gate.waits_on
            );
        }
        self.last = Some(gate.clone());
    }

    /// A revision went in force: what its gate answered last, if it waited.
    pub fn passed(&mut self, r: &crate::source::Revision) -> Option<String> {
        let last = self.last.take()?;
        (last.revision == *r).then_some(last.answer)
    }
}

/// Says a refused revision once: the same head refused for the same reason
/// at every interval is logged at debug level after the first time (status
/// and the metrics keep saying it).
#[derive(Debug, Default)]
pub struct RefusedLog {
    last: Option<String>,
}

impl RefusedLog {
    /// Logs `e`, a revision of `source` not put in force, and the revision
    /// that stays.
    pub fn log(&mut self, source: &GitSource, e: &SourceError) {
        let said = e.to_string();
        if self.last.as_ref() == Some(&said) {
            tracing::debug!(kind = e.kind(), "{said} (again)");
            return;
        }
        let in_force = source.status().applied.map(|r| r.to_string());
        tracing::warn!(
            kind = e.kind(),
            "{e}; the revision in force stays: {}",
            in_force.as_deref().unwrap_or("none")
        );
        self.last = Some(said);
    }
}

/// Where a host of a later wave with nothing in force yet waits.
pub struct FirstRevision<'a> {
    /// The source, with its gate.
    pub source: &'a GitSource,
    /// How often it is asked again (`--git-interval`).
    pub every: Duration,
    /// This host's wave.
    pub wave: u32,
    /// The state directory: its status file says why nothing runs yet.
    pub state_dir: &'a std::path::Path,
    /// The watcher's metrics, if served.
    pub metrics: Option<&'a Arc<super::metrics::Metrics>>,
}

impl FirstRevision<'_> {
    /// Waits until a revision is in force (`Ok(true)`), or a stop signal
    /// comes first (`Ok(false)`), asking the source each `every` (at once
    /// on SIGHUP). Meanwhile the status file, the metrics and systemd say
    /// why nothing runs, under the watcher's own lock. A fetch that fails
    /// meanwhile is logged and tried again: the gate is the reason to wait.
    ///
    /// # Errors
    /// Another watcher holds the state directory, or the source cannot work
    /// at all (its options, an untrusted cache): waiting would not help.
    pub async fn wait(
        &self,
        signals: &mut tokio::sync::mpsc::UnboundedReceiver<Signal>,
        fetch_now: &Notify,
        logs: &mut (RefusedLog, GateLog),
    ) -> Result<bool, super::WatchError> {
        let holder = format!("uvmctl watch --git {}", self.source.options().url);
        let _lock = crate::apply::lock::StateLock::acquire_named(
            self.state_dir,
            "watch.lock",
            Duration::ZERO,
            &holder,
        )
        .map_err(super::WatchError::AlreadyWatched)?;
        let started = super::unix_now();
        loop {
            if self.source.spec_dir().exists() {
                return Ok(true);
            }
            // A stop is heard during a fetch too (one may take minutes).
            let synced = tokio::select! {
                s = self.source.sync() => s,
                got = signals.recv() => {
                    if matches!(got, None | Some(Signal::Stop)) {
                        return Ok(false);
                    }
                    continue;
                }
            };
            let why = match synced {
                Ok(Synced::Waiting { gate, .. }) => {
                    logs.1.log(&gate);
                    format!(
                        "nothing in force yet: {} waits for the gate of wave {}: {}",
                        gate.revision, gate.waits_on, gate.answer
                    )
                }
                Ok(_) => return Ok(true),
                Err(e @ (SourceError::Options(_) | SourceError::UntrustedCache(_))) => {
                    return Err(super::WatchError::Source(e));
                }
                Err(e) => {
                    logs.0.log(self.source, &e);
                    format!("nothing in force yet: {e}")
                }
            };
            // What the status file and `uvmctl status` show: the
            // repository's file names are its own to choose.
            let why = crate::escape::escaped(&why);
            self.say(&why, started);
            tokio::select! {
                () = tokio::time::sleep(self.every.max(Duration::from_secs(1))) => {}
                () = fetch_now.notified() => {}
                got = signals.recv() => {
                    if matches!(got, None | Some(Signal::Stop)) {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// The status file, the metrics and systemd say `why`.
    fn say(&self, why: &str, started: u64) {
        let status = super::status::WatchStatus {
            pid: std::process::id(),
            dir: self.source.spec_dir(),
            started,
            updated: super::unix_now(),
            source: Some(self.source.status()),
            source_cache: Some(self.source.options().cache.clone()),
            rollout: Some(super::status::RolloutStatus {
                wave: self.wave,
                unsettled: Some(why.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        };
        if let Err(e) = super::status::write(self.state_dir, &status) {
            tracing::warn!(dir = %self.state_dir.display(), "cannot write the status file: {e}");
        }
        if let Some(m) = self.metrics {
            m.update(
                &status,
                &std::collections::BTreeMap::new(),
                super::unix_now(),
            );
        }
        // Up, as far as systemd is concerned: waiting is this service's work.
        super::status::sd_notify(super::status::Notify::Ready(Some(why)));
    }
}
