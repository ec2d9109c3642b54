//! `uvmctl watch`: the unattended reconciler's edges. Logging, the spec
//! directory or git source, metrics, signals; the loop and its policy are
//! the library's ([`uvmctl::watch`]).

use super::args::{LogFormat, WatchArgs};
use super::host;
use anyhow::{Context, bail};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;
use uvmctl::source::{GatePolicy, Synced};
use uvmctl::virtstack::HostOptions;
use uvmctl::watch::signals::{self, RefusedLog};

pub async fn run(args: WatchArgs, host: &HostOptions) -> anyhow::Result<u8> {
    // notify's inotify backend says at info level what a swapped revision
    // does to its watches, dozens of lines a swap: its warnings are enough.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,notify=warn"));
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let (writer, ansi) = (
        BoxMakeWriter::new(std::io::stderr),
        std::io::stderr().is_terminal(),
    );
    // A service has no console: its log is a file in the state directory.
    #[cfg(windows)]
    let (writer, ansi) = match &args.service {
        Some(_) => (
            BoxMakeWriter::new(BoundedLog::open(host.state_dir.join("watch.log"))?),
            false,
        ),
        None => (writer, ansi),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match args.log_format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.with_ansi(ansi).init(),
    }
    #[cfg(windows)]
    let as_service = args.service.is_some();
    let ran = watch(args, host).await;
    // A service's error would go to a console it does not have.
    #[cfg(windows)]
    if as_service && let Err(e) = &ran {
        tracing::error!("{e:#}");
    }
    ran
}

/// The watcher, once logging is set up.
async fn watch(args: WatchArgs, host: &HostOptions) -> anyhow::Result<u8> {
    let (vs, state_dir) = host::live(host, false).await?;
    let cache = args.git.cache(host);
    let gated = gate(&args.rollout)?;
    let source = args
        .git
        .source(cache.clone(), args.placement.placement()?)?
        .map(|s| {
            s.with_gate(match &gated {
                Some(g) => GatePolicy::Ask(g.clone()),
                None => GatePolicy::Ungated,
            })
        });
    // Served and heard from the start: a host of a later wave may wait at
    // its gate before anything is in force.
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics-listen {addr}: cannot listen"))?;
            let metrics = uvmctl::watch::metrics::Metrics::new();
            tracing::info!(
                "metrics at http://{}/metrics",
                listener.local_addr().map_or(addr, |a| a)
            );
            tokio::spawn(uvmctl::watch::metrics::serve(listener, metrics.clone()));
            Some(metrics)
        }
        None => None,
    };
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel();
    let fetch_now = source
        .as_ref()
        .map(|_| Arc::new(tokio::sync::Notify::new()));
    #[cfg(windows)]
    let service = match &args.service {
        Some(name) => Some(uvmctl::watch::service::start(
            name,
            sig_tx.clone(),
            fetch_now.clone(),
        )?),
        None => {
            signals::forward_os_signals(sig_tx.clone(), fetch_now.clone())?;
            None
        }
    };
    #[cfg(not(windows))]
    signals::forward_os_signals(sig_tx.clone(), fetch_now.clone())?;
    let mut logs = (RefusedLog::default(), signals::GateLog::default());
    let dir = match (&args.dir, &source) {
        (_, Some(source)) => {
            match source.sync().await {
                Ok(Synced::Waiting { gate, .. }) => logs.1.log(&gate),
                Ok(s) => tracing::info!(
                    url = %source.options().url,
                    "revision in force: {}",
                    s.in_force().map_or("none".into(), ToString::to_string)
                ),
                // What an earlier run put in force stays in force.
                Err(e) if source.spec_dir().exists() => logs.0.log(source, &e),
                // A host of a later wave waits below whatever the reason.
                Err(e) if gated.is_some() => logs.0.log(source, &e),
                Err(e) => bail!("{e}; nothing is in force yet, so there is nothing to watch"),
            }
            if let (Some(wave), Some(fetch_now)) = (args.rollout.wave, &fetch_now)
                && !source.spec_dir().exists()
            {
                let first = signals::FirstRevision {
                    source,
                    every: args.git_interval,
                    wave,
                    state_dir: &state_dir,
                    metrics: metrics.as_ref(),
                };
                if !first.wait(&mut sig_rx, fetch_now, &mut logs).await? {
                    tracing::info!("stopped before anything was in force");
                    return Ok(0);
                }
                tracing::info!(url = %source.options().url, "revision in force: {}",
                    source.status().applied.map_or("none".into(), |r| r.to_string()));
            }
            source.spec_dir()
        }
        (Some(d), None) => {
            // A directory that is not there at the start is a typo far more
            // often than one about to appear (issue 30): said, not watched.
            if std::fs::metadata(d).is_err() {
                bail!(
                    "spec directory {} does not exist (nothing to watch)",
                    d.display()
                );
            }
            std::path::absolute(d).with_context(|| format!("cannot resolve {}", d.display()))?
        }
        (None, None) => bail!("give a spec directory or --git URL"),
    };
    if let (Some(source), Some(fetch_now)) = (source.clone(), &fetch_now) {
        let every = args.git_interval;
        signals::poll_git(source, every, fetch_now.clone(), sig_tx.clone(), logs);
    }
    drop(sig_tx);
    let opts = uvmctl::watch::WatchOptions {
        dir,
        resync: args.resync.max(Duration::from_millis(100)),
        debounce: args.debounce.max(Duration::from_millis(1)),
        max_disruption: args.max_disruption.into(),
        detect_only: args.detect_only,
        prune: args.prune,
        prune_guard: uvmctl::plan::prune::PruneGuard {
            allow_empty: args.allow_empty,
            max_prune: args.max_prune,
        },
        state_dir: Some(state_dir),
        lock_timeout: args.lock_timeout,
        reconcile_deadline: args.reconcile_deadline,
        backoff: uvmctl::watch::Backoff {
            base: args.backoff,
            cap: args.backoff_cap.max(args.backoff),
            ..uvmctl::watch::Backoff::default()
        },
        source: source.map(|_| cache),
        placement: args.placement.placement()?,
        metrics,
        revert: !args.no_revert,
        wave: args.rollout.wave,
    };
    let ran = uvmctl::watch::run(vs, opts, sig_rx, None).await;
    #[cfg(windows)]
    if let Some(service) = service {
        service.stop(u32::from(ran.is_err()));
    }
    ran?;
    Ok(0)
}

/// The watcher's log as a service: appended to a file in the state
/// directory, which is renamed to `.1` (replacing the one before) once it
/// passes [`BoundedLog::LIMIT`], so the two never take more than twice it.
#[cfg(windows)]
#[derive(Clone)]
struct BoundedLog(Arc<std::sync::Mutex<(std::path::PathBuf, std::fs::File, u64)>>);

#[cfg(windows)]
impl BoundedLog {
    const LIMIT: u64 = 16 << 20;

    fn open(path: std::path::PathBuf) -> anyhow::Result<Self> {
        uvmctl::hostfs::create_dirs(path.parent().unwrap_or(&path), 0o700)
            .with_context(|| format!("cannot make the directory of {}", path.display()))?;
        let file = uvmctl::hostfs::open_state_log(&path, 0o600)
            .with_context(|| format!("cannot open the log {}", path.display()))?;
        let len = file.metadata().map_or(0, |m| m.len());
        Ok(BoundedLog(Arc::new(std::sync::Mutex::new((
            path, file, len,
        )))))
    }
}

#[cfg(windows)]
impl std::io::Write for BoundedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (path, file, len) = &mut *guard;
        if *len >= Self::LIMIT {
            if std::fs::rename(&*path, path.with_extension("log.1")).is_ok() {
                *file = uvmctl::hostfs::open_state_log(path, 0o600)?;
            } else {
                // Still bounded when the older file cannot be replaced.
                file.set_len(0)?;
            }
            *len = 0;
        }
        let n = file.write(buf)?;
        *len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).1.flush()
    }
}

#[cfg(windows)]
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BoundedLog {
    type Writer = BoundedLog;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The gate of this host's wave, for a wave after the first.
fn gate(args: &super::args::RolloutArgs) -> anyhow::Result<Option<Arc<dyn uvmctl::source::Gate>>> {
    use uvmctl::source::gate::{DEFAULT_GATE_QUERY, GateOptions, PrometheusGate};
    let Some(wave) = args.wave.filter(|w| *w > 1) else {
        return Ok(None);
    };
    let Some(prometheus) = args.prometheus.clone() else {
        bail!("--wave {wave}: its gate asks the fleet's Prometheus; give --prometheus URL");
    };
    Ok(Some(Arc::new(PrometheusGate::new(GateOptions {
        wave,
        prometheus,
        query: args
            .gate_query
            .clone()
            .unwrap_or_else(|| DEFAULT_GATE_QUERY.to_string()),
        soak: args.soak,
        timeout: args.gate_timeout.max(Duration::from_millis(100)),
    }))))
}
