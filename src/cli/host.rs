//! The host a command works on: flags and `UVMCTL_*` variables over the
//! config file over the built-in defaults, converted once into the
//! library's [`HostOptions`]; and what every command opens from them (the
//! virtstack, the spec directory, the state directory's lock).

use super::args::{GitArgs, HostArgs, PlacementArgs};
use anyhow::{Context, bail};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use uvmctl::apply::lock::StateLock;
use uvmctl::config::HostDefaults;
use uvmctl::virtstack::recorded::Recorded;
use uvmctl::virtstack::{self, HostOptions};
use uvmctl::vm::{Observe, Virtstack};

impl HostArgs {
    /// What the flags and variables set, as a layer over the config file's.
    fn layer(self) -> HostDefaults {
        HostDefaults {
            state_dir: self.state_dir,
            allow_roots: self.allow_roots,
            accel: self.accel,
            virtstack: self.virtstack,
            qemu_user: self.qemu_user,
            remote_dir: self.remote_dir,
            remote_server: self.remote_server,
            hcs_library: self.hcs_library,
            hcs_allow_roots: self.hcs_allow_roots,
        }
    }
}

/// The host options in force: `args` over `file` (the config file's
/// defaults) over the built-in defaults.
pub fn options(args: HostArgs, file: HostDefaults) -> HostOptions {
    HostOptions::from(args.layer().or(file))
}

/// The live virtstack `host` names, and the directory its lock (and a
/// watcher's status file) lives in.
pub async fn live(
    host: &HostOptions,
    observer: bool,
) -> anyhow::Result<(Arc<dyn Virtstack>, PathBuf)> {
    let opened = virtstack::open(host, observer).await?;
    Ok((opened.vs, opened.lock_dir))
}

/// The QEMU virtstack, for the commands only it has, as an observer: they
/// never change a VM's state.
#[cfg(unix)]
pub fn qemu(host: &HostOptions, command: &str) -> anyhow::Result<virtstack::qemu::Qemu> {
    if host.virtstack != virtstack::Kind::Qemu {
        bail!(
            "uvmctl {command} reaches a guest of the qemu virtstack only (not {})",
            host.virtstack
        );
    }
    Ok(virtstack::open::qemu(host, true)?)
}

/// What to plan against: a recording, or the live virtstack (looking only).
pub async fn observer(
    observed: Option<&PathBuf>,
    host: &HostOptions,
) -> anyhow::Result<Arc<dyn Observe>> {
    Ok(match observed {
        Some(path) => Arc::new(
            Recorded::load(path, host.virtstack)
                .with_context(|| format!("cannot read observed state from {}", path.display()))?,
        ),
        None => virtstack::open::observer(host).await?,
    })
}

/// Waits for the state directory's lock off the async workers (it polls).
pub async fn lock(root: PathBuf, timeout: Duration, what: String) -> anyhow::Result<StateLock> {
    Ok(tokio::task::spawn_blocking(move || StateLock::acquire(&root, timeout, &what)).await??)
}

impl PlacementArgs {
    pub fn placement(&self) -> anyhow::Result<Option<uvmctl::spec::Placement>> {
        if self.selector.is_none() && self.for_host.is_none() && self.placement_path.is_none() {
            return Ok(None);
        }
        let mut selector = self.selector.clone().unwrap_or_default();
        if let Some(name) = &self.for_host {
            let name = if name.is_empty() {
                host_name().context("cannot read this host's name for --for-host")?
            } else {
                name.clone()
            };
            let one: uvmctl::spec::Selector = format!("{}={name}", uvmctl::spec::HOST_LABEL)
                .parse()
                .context("--for-host")?;
            selector = selector.and(one);
        }
        if let Some(p) = &self.placement_path {
            uvmctl::spec::Placement::check_path(p).map_err(anyhow::Error::msg)?;
        }
        Ok(Some(uvmctl::spec::Placement {
            selector,
            path: self.placement_path.clone(),
        }))
    }
}

/// This host's name (`--for-host` with no value).
fn host_name() -> anyhow::Result<String> {
    #[cfg(unix)]
    return Ok(nix::unistd::gethostname()?.to_string_lossy().into_owned());
    #[cfg(not(unix))]
    std::env::var("COMPUTERNAME").context("COMPUTERNAME is not set")
}

/// A temporary directory, removed when dropped.
pub struct TempCache(pub PathBuf);

impl Drop for TempCache {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A new directory of this process's own under the temporary directory:
/// made, never found (a name planted there, a link among them, is refused
/// by `mkdir` itself rather than followed).
pub fn temp_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for attempt in 0..16u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!("{prefix}-{}-{nanos}-{attempt}", std::process::id()));
        #[cfg(unix)]
        let builder = {
            let mut b = std::fs::DirBuilder::new();
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            b
        };
        #[cfg(not(unix))]
        let builder = std::fs::DirBuilder::new();
        match builder.create(&dir) {
            // Windows: the temporary directory's DACL would pass on to it.
            #[cfg(not(unix))]
            Ok(()) => {
                uvmctl::hostfs::private_dir(&dir, 0o700)
                    .with_context(|| format!("cannot make {} private", dir.display()))?;
                return Ok(dir);
            }
            #[cfg(unix)]
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot make {}", dir.display()));
            }
        }
    }
    bail!("cannot make a temporary directory under {}", base.display())
}

impl GitArgs {
    /// The cache apply and watch share: --git-cache, else STATE_DIR/git.
    pub fn cache(&self, host: &HostOptions) -> PathBuf {
        self.git_cache
            .clone()
            .unwrap_or_else(|| host.state_dir.join("git"))
    }

    pub fn source(
        &self,
        cache: PathBuf,
        placement: Option<uvmctl::spec::Placement>,
    ) -> anyhow::Result<Option<uvmctl::source::GitSource>> {
        let Some(url) = &self.git else {
            return Ok(None);
        };
        Ok(Some(uvmctl::source::GitSource::new(
            uvmctl::source::GitOptions {
                url: url.clone(),
                reference: self.git_ref.clone(),
                path: self.git_path.clone(),
                cache,
                allowed_signers: self.allowed_signers.clone(),
                max_bytes: self.git_max_mb.saturating_mul(1 << 20),
                placement,
                fetch_timeout: self.git_timeout,
            },
        )?))
    }
}

/// The spec directory a command reads: DIR, or the revision of --git put
/// in force (fetched first). For `plan` without --git-cache the cache is
/// temporary, so a plan never changes what a watcher has in force.
pub async fn spec_dir(
    dir: &Option<PathBuf>,
    git: &GitArgs,
    placement: &PlacementArgs,
    host: &HostOptions,
    temporary: bool,
    ignore_gate: bool,
) -> anyhow::Result<(PathBuf, Option<TempCache>, Option<String>)> {
    let (cache, guard) = match (&git.git_cache, temporary) {
        (Some(c), _) => (c.clone(), None),
        (None, true) => {
            let c = temp_dir("uvmctl-git")?;
            (c.clone(), Some(TempCache(c)))
        }
        (None, false) => (git.cache(host), None),
    };
    match (dir, git.source(cache, placement.placement()?)?) {
        (_, Some(source)) => {
            // A cache a watcher of a later wave follows moves past its
            // gate only when asked to.
            let source = source.with_gate(uvmctl::source::GatePolicy::Manual {
                ignore: ignore_gate,
            });
            let synced = source.sync().await?;
            let revision = synced.in_force().map(ToString::to_string);
            eprintln!(
                "specs: {} {}",
                source.options().url,
                revision.as_deref().unwrap_or("none")
            );
            Ok((source.spec_dir(), guard, revision))
        }
        (Some(d), None) => Ok((d.clone(), None, None)),
        (None, None) => bail!("give a spec directory or --git URL"),
    }
}
