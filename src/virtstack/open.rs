//! Opening a virtstack by kind: the one place that knows every virtstack
//! uvmctl can drive and how each is set up from the host options. The CLI
//! parses arguments into [`HostOptions`] and calls [`open`].

#[cfg(unix)]
use super::qemu::user::{DEFAULT_QEMU_USER, ServiceUser, UserError};
#[cfg(unix)]
use super::qemu::{
    Accel, AllowedRoots, DEFAULT_ALLOWED_ROOTS, DEFAULT_STATE_DIR, DEFAULT_STOP_TIMEOUT,
    DEFAULT_UNPLUG_TIMEOUT, Qemu, QemuOptions, StateDir,
};
#[cfg(unix)]
use super::remotevm::{ProcessSpawner, RemoteVm};
use crate::vm::{Observe, Virtstack, VmError};
use std::path::PathBuf;
use std::sync::Arc;

/// The virtstacks uvmctl drives (the one list is [`crate::vm::VirtstackKind`]).
pub use crate::vm::VirtstackKind as Kind;

/// Acceleration as asked for (the one shape is the config's).
pub use crate::config::AccelChoice;

/// Where the virtstacks keep their state by default on Windows (uvmctl's
/// own directory under ProgramData, as services keep theirs).
#[cfg(not(unix))]
pub const DEFAULT_STATE_DIR: &str = r"C:\ProgramData\uvmctl\state";

/// Why the qemu virtstack, and remotevm's default server over it, exist only
/// on unix.
#[cfg(not(unix))]
const QEMU_UNIX_ONLY: &str = "it runs QEMU as an unprivileged user over unix sockets and descriptors: Linux only; on Windows use --virtstack hcs (or sim)";

/// Why remotevm is not offered off unix.
#[cfg(not(unix))]
const REMOTEVM_UNIX_ONLY: &str = "its client speaks to vmservice servers over unix sockets; hcsshim's named-pipe transport is not built here (on Windows use --virtstack hcs)";

/// The acceleration `choice` comes to on this host.
#[cfg(unix)]
fn resolve_accel(choice: AccelChoice) -> Accel {
    match choice {
        AccelChoice::Auto => Accel::auto(),
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
    }
}

/// Where the virtstacks keep their VMs and what they may touch.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// The virtstack.
    pub virtstack: Kind,
    /// Root of per-VM state directories.
    pub state_dir: PathBuf,
    /// Roots host paths must lie under; empty: the defaults.
    pub allow_roots: Vec<PathBuf>,
    /// Acceleration for launched VMs.
    pub accel: AccelChoice,
    /// The user QEMU runs as; `None`: `uvmctl-qemu` when running as root.
    pub qemu_user: Option<String>,
    /// remotevm: its records and server sockets [default: STATE_DIR/.remotevm].
    pub remote_dir: Option<PathBuf>,
    /// remotevm: the server program [default: this program's `serve`].
    pub remote_server: Option<PathBuf>,
    /// hcs: the computecore library [default: computecore.dll].
    pub hcs_library: Option<PathBuf>,
    /// hcs: roots paths on the Windows host must lie under; empty: the default.
    pub hcs_allow_roots: Vec<PathBuf>,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            virtstack: Kind::native(),
            state_dir: DEFAULT_STATE_DIR.into(),
            allow_roots: Vec::new(),
            accel: AccelChoice::Auto,
            qemu_user: None,
            remote_dir: None,
            remote_server: None,
            hcs_library: None,
            hcs_allow_roots: Vec::new(),
        }
    }
}

impl From<crate::config::HostDefaults> for HostOptions {
    /// What is set, and the built-in defaults for the rest: the one
    /// conversion of flags, environment and config file (layered with
    /// [`crate::config::HostDefaults::or`]) into the options in force.
    fn from(d: crate::config::HostDefaults) -> Self {
        let builtin = HostOptions::default();
        HostOptions {
            virtstack: d.virtstack.unwrap_or(builtin.virtstack),
            state_dir: d.state_dir.unwrap_or(builtin.state_dir),
            allow_roots: d.allow_roots,
            accel: d.accel.unwrap_or(builtin.accel),
            qemu_user: d.qemu_user,
            remote_dir: d.remote_dir,
            remote_server: d.remote_server,
            hcs_library: d.hcs_library,
            hcs_allow_roots: d.hcs_allow_roots,
        }
    }
}

/// Why a virtstack could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// QEMU's service user is missing or unusable.
    #[cfg(unix)]
    #[error(transparent)]
    User(#[from] UserError),
    /// The state directory is unusable.
    #[cfg(unix)]
    #[error(transparent)]
    StateDir(#[from] super::qemu::launch::LaunchError),
    /// The virtstack does not exist on this platform.
    #[error("virtstack {virtstack} is not available here: {why}")]
    Unsupported {
        /// Which.
        virtstack: &'static str,
        /// Why.
        why: &'static str,
    },
    /// The simulator's records directory cannot be made.
    #[error("cannot make the simulator's records directory {}: {source}", path.display())]
    SimDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HCS library cannot be used.
    #[error(transparent)]
    HcsLibrary(#[from] super::hcs::api::LoadError),
    /// The hcs virtstack's records directory cannot be made.
    #[error("cannot make the hcs records directory {}: {source}", path.display())]
    HcsDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An allowed root others could change (on Windows, where HCS opens
    /// what is under it as its own service).
    #[error("allowed root {}: {why}", path.display())]
    UntrustedRoot {
        /// The root as given.
        path: PathBuf,
        /// What is wrong with it (said in the message, so not a source).
        why: crate::hostfs::TrustError,
    },
    /// The virtstack refused to start.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// This program's path (for remotevm's default server).
    #[error("cannot find this program to serve remotevm: {0}")]
    Program(std::io::Error),
}

/// An opened virtstack and the directory its lock (and a watcher's status
/// file) lives in.
pub struct Opened {
    /// The virtstack.
    pub vs: Arc<dyn Virtstack>,
    /// Where its lock and status live.
    pub lock_dir: PathBuf,
}

/// The QEMU virtstack these options describe; an `observer` only looks
/// (its own QMP socket, nothing created on the host).
#[cfg(unix)]
pub fn qemu(host: &HostOptions, observer: bool) -> Result<Qemu, OpenError> {
    let roots = if host.allow_roots.is_empty() {
        AllowedRoots::new(DEFAULT_ALLOWED_ROOTS)
    } else {
        AllowedRoots::new(&host.allow_roots)
    };
    let accel = resolve_accel(host.accel);
    let name = match &host.qemu_user {
        Some(name) => Some(name.as_str()),
        None if nix::unistd::geteuid().is_root() => Some(DEFAULT_QEMU_USER),
        None => None,
    };
    let qemu_user = match name.map(|n| ServiceUser::lookup(n, accel == Accel::Kvm)) {
        Some(Ok(user)) => user,
        // An observer starts nothing: without the user it still looks
        // (plan's pre-flight then cannot judge what that user may use).
        Some(Err(_)) if observer => None,
        Some(Err(e)) => return Err(e.into()),
        None => None,
    };
    Ok(Qemu::new(QemuOptions {
        state_dir: StateDir::new(&host.state_dir)?,
        roots,
        qemu_user,
        accel,
        stop_timeout: DEFAULT_STOP_TIMEOUT,
        unplug_timeout: DEFAULT_UNPLUG_TIMEOUT,
        observer,
    }))
}

/// The arguments that make this program's `serve` drive QEMU with the same
/// host options (remotevm's default server).
#[cfg(unix)]
fn serve_args(host: &HostOptions) -> Vec<String> {
    let mut args = vec!["serve".to_string(), "--state-dir".into()];
    args.push(host.state_dir.display().to_string());
    for r in &host.allow_roots {
        args.push("--allow-root".into());
        args.push(r.display().to_string());
    }
    if let Some(user) = &host.qemu_user {
        args.push("--qemu-user".into());
        args.push(user.clone());
    }
    args.push("--accel".into());
    args.push(host.accel.as_str().into());
    args
}

/// The allowed roots of the hcs virtstack these options give.
#[cfg(windows)]
fn hcs_roots(host: &HostOptions) -> Vec<PathBuf> {
    if host.hcs_allow_roots.is_empty() {
        super::hcs::DEFAULT_ALLOWED_ROOTS
            .iter()
            .map(PathBuf::from)
            .collect()
    } else {
        host.hcs_allow_roots.clone()
    }
}

/// Opens the virtstack the options name on this host; an `observer` only
/// looks.
pub async fn open(host: &HostOptions, observer: bool) -> Result<Opened, OpenError> {
    match host.virtstack {
        #[cfg(not(unix))]
        Kind::Qemu => Err(OpenError::Unsupported {
            virtstack: "qemu",
            why: QEMU_UNIX_ONLY,
        }),
        #[cfg(unix)]
        Kind::Qemu => {
            let qemu = qemu(host, observer)?;
            if !observer {
                qemu.options().state_dir.ensure_root()?;
            }
            let lock_dir = qemu.options().state_dir.root().to_path_buf();
            Ok(Opened {
                vs: Arc::new(qemu),
                lock_dir,
            })
        }
        Kind::Sim => {
            if !observer {
                super::sim::Sim::ensure_dir(&host.state_dir).map_err(|source| {
                    OpenError::SimDir {
                        path: super::sim::Sim::records_dir(&host.state_dir),
                        source,
                    }
                })?;
            }
            Ok(Opened {
                vs: Arc::new(super::sim::Sim::new(&host.state_dir)),
                lock_dir: host.state_dir.clone(),
            })
        }
        Kind::Hcs => {
            use super::hcs::{DEFAULT_LIBRARY, DEFAULT_OPERATION_TIMEOUT, Hcs};
            let library = host
                .hcs_library
                .clone()
                .unwrap_or_else(|| DEFAULT_LIBRARY.into());
            let service = super::hcs::api::Computecore::load(&library, DEFAULT_OPERATION_TIMEOUT)?;
            if !observer {
                Hcs::ensure_dir(&host.state_dir).map_err(|source| OpenError::HcsDir {
                    path: Hcs::records_dir(&host.state_dir),
                    source,
                })?;
                // HCS opens what a spec names under these as its own
                // service: on Windows nobody else may change them.
                #[cfg(windows)]
                for root in hcs_roots(host) {
                    crate::hostfs::check_trusted_dir(&root)
                        .map_err(|why| OpenError::UntrustedRoot { path: root, why })?;
                }
            }
            Ok(Opened {
                vs: Arc::new(Hcs::new(
                    Arc::new(service),
                    &host.state_dir,
                    &host.hcs_allow_roots,
                )),
                lock_dir: host.state_dir.clone(),
            })
        }
        #[cfg(not(unix))]
        Kind::RemoteVm => Err(OpenError::Unsupported {
            virtstack: "remotevm",
            why: REMOTEVM_UNIX_ONLY,
        }),
        #[cfg(unix)]
        Kind::RemoteVm => {
            let dir = host
                .remote_dir
                .clone()
                .unwrap_or_else(|| host.state_dir.join(".remotevm"));
            // uvmctl's own serve answers with this host's QEMU capabilities,
            // as they cross the wire: known without starting one.
            let (spawner, caps) = match &host.remote_server {
                Some(program) => (
                    ProcessSpawner {
                        program: program.clone(),
                        args: Vec::new(),
                    },
                    None,
                ),
                #[cfg(unix)]
                None => (
                    ProcessSpawner {
                        program: std::env::current_exe().map_err(OpenError::Program)?,
                        args: serve_args(host),
                    },
                    Some(super::remotevm::own_server_capabilities(
                        qemu(host, true)?.capabilities(),
                    )),
                ),
            };
            let vs = RemoteVm::with(&dir, Arc::new(spawner), caps, observer).await?;
            // The lock (and a watcher's status) lives beside the records,
            // never among them: nothing but VM records is in that directory.
            let lock_dir = dir.parent().map_or_else(|| dir.clone(), PathBuf::from);
            Ok(Opened {
                vs: Arc::new(vs),
                lock_dir,
            })
        }
    }
}

/// An observer: the virtstack the options name, looking only.
pub async fn observer(host: &HostOptions) -> Result<Arc<dyn Observe>, OpenError> {
    let vs: Arc<dyn Observe> = open(host, true).await?.vs;
    Ok(vs)
}
