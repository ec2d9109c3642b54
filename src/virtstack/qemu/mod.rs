//! The QEMU virtstack: one `qemu-system-x86_64` per VM, driven over QMP.
//!
//! State lives in QEMU itself (read back over QMP on every observe) plus a
//! launch record per VM for what QEMU does not report (cold settings, 9p host
//! paths, NIC endpoints, the configuration for the next start).

mod caps;
pub mod conlog;
pub mod devices;
pub mod guest;
pub mod hotplug;
pub mod images;
pub mod launch;
mod observe;
pub mod ops;
mod process;
pub mod qmp;
pub mod serial;
pub mod state;
pub mod tap;
pub mod user;
pub mod vsock;

pub use images::{AllowedRoots, DEFAULT_ALLOWED_ROOTS, HostPathError};
pub use state::{Accel, DEFAULT_STATE_DIR, LaunchError, LaunchRecord, StateDir};

use crate::spec::VmConfig;
use crate::virtstack::records::{FileStamp, RecordError, RecordStore};
use crate::vm::{Capabilities, HostFacts, ObservedVm};
use crate::vm::{State, VmError, VmName};
use qmp::{Qmp, QmpError};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a QEMU may take to open its QMP socket after launch.
pub const QMP_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a guest may take to power off after the ACPI button.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long saving or restoring a guest's state may take.
pub const SAVE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a guest may take to acknowledge a device unplug (a vCPU under
/// TCG on a busy host has taken over 10 s).
pub const DEFAULT_UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);
/// Events queued for a watcher before QEMU's reader waits on it.
const EVENTS_BUFFERED: usize = 64;
/// How often an event subscription looks at the VM's vsock backend.
const BACKEND_CHECK: Duration = Duration::from_secs(1);
/// The event a subscription reports when the VM's vsock backend died.
pub const VSOCK_BACKEND_EXITED: &str = "VSOCK_BACKEND_EXITED";
/// The QMP events that say a VM may no longer be what was observed; the
/// rest (`VSERPORT_CHANGE`, `NIC_RX_FILTER_CHANGED`, `RTC_CHANGE`, ...) are
/// the guest going about its business.
pub const STATE_EVENTS: &[&str] = &[
    "SHUTDOWN",
    "POWERDOWN",
    "RESET",
    "STOP",
    "RESUME",
    "SUSPEND",
    "WAKEUP",
    "GUEST_PANICKED",
    "DEVICE_DELETED",
];

/// Errors of the QEMU virtstack.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// Launching failed before QEMU ran.
    #[error("vm {vm}")]
    Launch {
        /// VM name.
        vm: String,
        /// Why.
        #[source]
        source: LaunchError,
    },
    /// A QMP command failed.
    #[error("vm {vm}")]
    Qmp {
        /// VM name.
        vm: String,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// QEMU exited when it should not have.
    #[error("vm {vm}: qemu exited unexpectedly{detail}")]
    Exited {
        /// VM name.
        vm: String,
        /// Last stderr lines, if any.
        detail: String,
    },
    /// Its launch record cannot be read or written.
    #[error("vm {vm}")]
    Record {
        /// VM name.
        vm: String,
        /// Why.
        #[source]
        source: RecordError,
    },
    /// No such VM in the state directory.
    #[error("VM {0} not found: no VM of that name is managed in this state directory")]
    NotFound(String),
    /// The guest did not finish an unplug in time; the device stays pending.
    #[error("vm {vm}: guest did not release {device} within {after:?}; the unplug stays pending")]
    UnplugPending {
        /// VM name.
        vm: String,
        /// Device id.
        device: String,
        /// Waited.
        after: Duration,
    },
    /// Saving or restoring the guest state failed.
    #[error("vm {vm}: {what}")]
    Migration {
        /// VM name.
        vm: String,
        /// What failed, and what was kept.
        what: String,
    },
    /// The call needs a running VM.
    #[error("vm {vm}: not running (it is {state})")]
    NotRunning {
        /// VM name.
        vm: String,
        /// The state it is in.
        state: State,
    },
    /// The guest agent did not do what was asked.
    #[error("vm {vm}")]
    Agent {
        /// VM name.
        vm: String,
        /// Why.
        #[source]
        source: guest::AgentError,
    },
    /// This VM cannot take the change as it is configured.
    #[error("vm {vm}: {reason}")]
    Refused {
        /// VM name.
        vm: String,
        /// Why.
        reason: String,
    },
    /// Something this virtstack does not do.
    #[error("vm {vm}: {what}")]
    Unsupported {
        /// VM name.
        vm: String,
        /// What.
        what: String,
    },
    /// OS-level failure (spawn, signal).
    #[error("vm {vm}: {what}")]
    Os {
        /// VM name.
        vm: String,
        /// What failed.
        what: String,
    },
}

impl QemuError {
    /// The error of an unplug (or resize) of `vm` that did not finish.
    pub fn from_unplug(vm: &str, e: ops::UnplugError) -> Self {
        match e {
            ops::UnplugError::Qmp(source) => QemuError::Qmp {
                vm: vm.into(),
                source,
            },
            ops::UnplugError::Refused(reason) => QemuError::Refused {
                vm: vm.into(),
                reason,
            },
            ops::UnplugError::Pending { device, after } => QemuError::UnplugPending {
                vm: vm.into(),
                device,
                after,
            },
        }
    }
}

impl From<QemuError> for VmError {
    fn from(e: QemuError) -> Self {
        match e {
            QemuError::Launch {
                source: LaunchError::Refused(r),
                ..
            } => VmError::Cold(r),
            QemuError::NotFound(vm) => VmError::NotFound(vm),
            QemuError::NotRunning { vm, state } => VmError::NotRunning { vm, state },
            QemuError::Refused { vm, reason } => VmError::Refused { vm, reason },
            e => VmError::Backend(Box::new(e)),
        }
    }
}

/// Settings of the QEMU virtstack.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// Root of per-VM state directories.
    pub state_dir: StateDir,
    /// Roots host paths must lie under.
    pub roots: AllowedRoots,
    /// Acceleration for new launches.
    pub accel: Accel,
    /// Graceful stop timeout.
    pub stop_timeout: Duration,
    /// Unplug acknowledgement timeout.
    pub unplug_timeout: Duration,
    /// Only looks at VMs: talks to their observe QMP socket (where they
    /// have one), so it never waits for an apply holding the main one.
    pub observer: bool,
    /// Who QEMU and the vsock backend run as; `None`: as uvmctl runs (root
    /// only when asked for by name).
    pub qemu_user: Option<user::ServiceUser>,
}

/// The QEMU virtstack on this host.
#[derive(Debug, Clone)]
pub struct Qemu {
    opts: QemuOptions,
    caps: Capabilities,
    /// How a pinned guest's QEMU gets to lock its memory on this host.
    memlock: user::MemLock,
    /// The vsock backend program, where installed.
    vsock_backend: Option<PathBuf>,
    /// One QMP connection per running VM: a `-qmp` socket serves one client
    /// at a time, so a second connect would wait at the greeting.
    conns: std::sync::Arc<tokio::sync::Mutex<std::collections::HashMap<String, Qmp>>>,
    /// Each VM's launch record: loaded once per version of its file,
    /// written once per change (`virtstack::records`).
    records: RecordStore<LaunchRecord>,
    /// What this process keeps for each VM whose events it follows (a
    /// watcher), by VM: one owner for all of it (see [`Followed`]).
    followed: FollowedMap,
    /// Numbers subscriptions, so one ending never drops a newer one's entry.
    subscriptions: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Held while a VM's identity is chosen and recorded.
    identity: std::sync::Arc<std::sync::Mutex<()>>,
}

type FollowedMap = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Followed>>>;

/// A VM whose events this process follows. Made when a subscription
/// starts, dropped with it (or when the VM's QEMU is gone or replaced), so
/// nothing of it outlives what keeps it current.
#[derive(Debug)]
struct Followed {
    /// The subscription's number.
    number: u64,
    /// The events connection: commands go over it too, so a watcher's
    /// reconcile neither connects nor greets, and the main QMP socket stays
    /// free for another uvmctl between reconciles.
    qmp: Qmp,
    /// The last observation, while it stands (see [`Seen`]).
    seen: Option<Seen>,
    /// Devices this process is unplugging, marked when: their
    /// `DEVICE_DELETED` is its own change's echo, which the change itself
    /// accounts for in the standing observation.
    unplugging: Vec<(String, std::time::Instant)>,
    /// Counts what may have changed the VM (events, dropped observations),
    /// so an observation taken meanwhile is known to be stale.
    epoch: u64,
}

/// How long an unplug's mark waits for its echo: a device that was already
/// gone sends none, and a later `DEVICE_DELETED` of the same id is news.
const ECHO_WAIT: Duration = Duration::from_secs(5);

/// How long an observation of a followed VM stands in for a new one. QEMU
/// reports what the guest or another client changes as an event (which
/// drops the observation at once), and another uvmctl's changes replace the
/// launch record (likewise); what neither shows (a device added by hand
/// over QMP) is seen within this long.
pub const SEEN_TTL: Duration = Duration::from_secs(2);

/// An observation of a VM whose events this process follows: valid while
/// no event came, the launch record is the same file, and it is younger
/// than [`SEEN_TTL`]; changes made through this process keep it current.
#[derive(Debug, Clone)]
struct Seen {
    at: std::time::Instant,
    stamp: FileStamp,
    vm: ObservedVm,
}

impl Followed {
    /// The VM may be other than last seen: its observation goes.
    fn stale(&mut self) {
        self.seen = None;
        self.epoch += 1;
    }
}

/// Runs `f` on the entry of `vm`'s subscription `number`, if it is still
/// the one followed (a newer subscription's entry is not this one's).
fn with_followed(followed: &FollowedMap, vm: &str, number: u64, f: impl FnOnce(&mut Followed)) {
    let mut all = followed.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(entry) = all.get_mut(vm).filter(|e| e.number == number) {
        f(entry);
    }
}

/// Drops a subscription's entry among the followed VMs when it ends.
struct Unhold {
    followed: FollowedMap,
    vm: String,
    number: u64,
}

impl Drop for Unhold {
    fn drop(&mut self) {
        let mut followed = self.followed.lock().unwrap_or_else(|p| p.into_inner());
        if followed
            .get(&self.vm)
            .is_some_and(|f| f.number == self.number)
        {
            followed.remove(&self.vm);
        }
    }
}

/// A record that cannot be read or written, as the VM's error.
fn record_error(vm: &str, e: RecordError) -> QemuError {
    match e {
        RecordError::NotFound(_) => QemuError::NotFound(vm.to_string()),
        e => QemuError::Record {
            vm: vm.to_string(),
            source: e,
        },
    }
}

/// The state of a VM whose QEMU does not run, from its record: stopped as
/// asked (never started, or stopped since: its last pid stays in the
/// record) is `Created`; exited on its own is `Terminated`.
fn down_state(rec: &LaunchRecord) -> State {
    if rec.saved.is_some() {
        State::Saved
    } else if rec.stopped_by_uvmctl {
        State::Created
    } else {
        State::Terminated
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Qemu {
    /// The virtstack with `opts`, its capabilities probed from this host.
    pub fn new(opts: QemuOptions) -> Self {
        let memlock = user::MemLock::probe(opts.qemu_user.is_some());
        let mut facts = HostFacts::probe(&memlock);
        facts.isolation = Some(match &opts.qemu_user {
            Some(u) => u.isolation(),
            None => {
                "QEMU runs as root (--qemu-user root): nothing keeps one VM's QEMU from another's"
                    .into()
            }
        });
        Qemu {
            memlock,
            caps: Capabilities::qemu(&facts),
            vsock_backend: vsock::find_backend().filter(|_| facts.vhost_user_vsock),
            records: opts.state_dir.records(),
            opts,
            conns: Default::default(),
            followed: Default::default(),
            subscriptions: Default::default(),
            identity: Default::default(),
        }
    }

    fn followed(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Followed>> {
        // Poisoned only by a panic elsewhere: the map itself is intact.
        self.followed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `device` of a followed VM as being unplugged by this process
    /// (see [`Followed::unplugging`]); `false` takes the mark away again.
    pub(crate) fn expect_unplug(&self, name: &str, device: &str, expect: bool) {
        if let Some(f) = self.followed().get_mut(name) {
            f.unplugging
                .retain(|(d, at)| d != device && at.elapsed() < ECHO_WAIT);
            if expect {
                f.unplugging
                    .push((device.to_string(), std::time::Instant::now()));
            }
        }
    }

    /// Drops the observation of `name` (a lifecycle verb changed the VM).
    pub(crate) fn unsee(&self, name: &str) {
        if let Some(f) = self.followed().get_mut(name) {
            f.stale();
        }
    }

    /// The standing observation of a followed VM, if it still stands.
    fn still_seen(&self, name: &str) -> Option<ObservedVm> {
        let stamp = self.records.stamp(name)?;
        let followed = self.followed();
        let s = followed.get(name)?.seen.as_ref()?;
        (s.stamp == stamp && s.at.elapsed() < SEEN_TTL).then(|| s.vm.clone())
    }

    /// Keeps `vm` as the standing observation of a followed VM.
    fn keep_seen(&self, name: &str, vm: &ObservedVm) {
        let Some(stamp) = self.records.stamp(name) else {
            return;
        };
        if let Some(f) = self.followed().get_mut(name) {
            f.seen = Some(Seen {
                at: std::time::Instant::now(),
                stamp,
                vm: vm.clone(),
            });
        }
    }

    /// After a change made through this process: the standing observation
    /// with the change in it (dropped when it does not fit).
    pub(crate) fn seen_changed(&self, name: &str, change: &crate::vm::Change) {
        let Some(mut vm) = self
            .followed()
            .get(name)
            .and_then(|f| f.seen.as_ref())
            .map(|s| s.vm.clone())
        else {
            return;
        };
        match change.applied(&vm.config) {
            Ok(config) => {
                vm.config = config;
                self.keep_seen(name, &vm);
            }
            Err(_) => self.unsee(name),
        }
    }

    /// How often launch records were read from and written to disk.
    pub fn record_io(&self) -> (u64, u64) {
        self.records.io()
    }

    /// The smallest guest CID no VM of the state directory has: a guest's
    /// CID is its own, so two guests never mistake each other.
    fn free_cid(&self) -> u32 {
        let taken: std::collections::BTreeSet<u32> = self
            .list()
            .iter()
            .filter_map(|n| self.record(n).ok()?.vsock_cid)
            .collect();
        (vsock::FIRST_CID..)
            .find(|c| !taken.contains(c))
            .unwrap_or(vsock::FIRST_CID)
    }

    /// Starts this VM's vsock backend, as `user`; its pid.
    async fn start_backend(
        &self,
        name: &str,
        cid: u32,
        user: Option<&user::ServiceUser>,
    ) -> Result<u32, QemuError> {
        let Some(binary) = &self.vsock_backend else {
            return Err(QemuError::Unsupported {
                vm: name.into(),
                what: format!("vsock needs {}", vsock::BACKEND),
            });
        };
        vsock::spawn_backend(binary, &self.opts.state_dir, name, cid, user)
            .await
            .map_err(|what| QemuError::Os {
                vm: name.into(),
                what,
            })
    }

    /// Stops the VM's vsock backend, if it runs, and forgets its pid.
    async fn end_backend(&self, name: &str) {
        let Ok(mut rec) = self.record(name) else {
            return;
        };
        if rec.vsock_pid.is_some() {
            vsock::stop_backend(rec.vsock_pid, &self.opts.state_dir, name).await;
            rec.vsock_pid = None;
            let _ = self.store(&rec);
        }
    }

    /// Makes sure a running VM's vsock works: its backend alive and its
    /// device plugged; a dead backend is started again and the device
    /// re-plugged (a vhost-user chardev cannot reconnect).
    pub async fn ensure_vsock(&self, q: &Qmp, name: &str) -> Result<(), QemuError> {
        let mut rec = self.record(name)?;
        let qerr = |source| QemuError::Qmp {
            vm: name.into(),
            source,
        };
        if !rec.shared_memory {
            return Err(QemuError::Unsupported {
                vm: name.into(),
                what: "vsock: this VM was launched without shared memory; it takes vsock from its next start".into(),
            });
        }
        let plugged = ops::device_present(q, vsock::DEVICE_ID)
            .await
            .map_err(qerr)?;
        let alive = vsock::backend_alive(rec.vsock_pid, &self.opts.state_dir, name);
        // A backend an earlier uvmctl started follows links where this one
        // no longer makes them: replaced (once) by one that does.
        let legacy = vsock::backend_is_legacy(rec.vsock_pid, &self.opts.state_dir, name);
        if plugged && alive && !legacy {
            return Ok(());
        }
        tracing::info!(
            vm = name,
            plugged,
            backend_alive = alive,
            "(re)plugging vsock"
        );
        if plugged {
            vsock::unplug(q, self.opts.unplug_timeout)
                .await
                .map_err(|e| QemuError::from_unplug(name, e))?;
        } else {
            // A chardev left from a failed plug would clash.
            let _ = q
                .execute(
                    "chardev-remove",
                    Some(serde_json::json!({"id": vsock::CHARDEV_ID})),
                )
                .await;
        }
        vsock::stop_backend(rec.vsock_pid, &self.opts.state_dir, name).await;
        let cid = match rec.vsock_cid {
            Some(c) => c,
            None => self.free_cid(),
        };
        let user = self.user_of(&rec);
        self.opts
            .state_dir
            .create_vsock_dir(name, user.as_ref().map(|u| (u.uid, u.gid)))
            .map_err(|source| QemuError::Launch {
                vm: name.into(),
                source,
            })?;
        let pid = self.start_backend(name, cid, user.as_ref()).await?;
        rec.vsock_cid = Some(cid);
        rec.vsock_pid = Some(pid);
        self.store(&rec)?;
        vsock::plug(q, &self.opts.state_dir, name)
            .await
            .map_err(qerr)
    }

    /// Its settings.
    pub fn options(&self) -> &QemuOptions {
        &self.opts
    }

    /// Names of VMs uvmctl created in this state directory.
    pub fn list(&self) -> Vec<String> {
        // A state directory not made yet has no VMs.
        self.records.names().unwrap_or_default()
    }

    fn record(&self, name: &str) -> Result<LaunchRecord, QemuError> {
        self.records.load(name).map_err(|e| record_error(name, e))
    }

    /// The launch record of a VM as it is on disk now.
    pub fn record_now(&self, name: &str) -> Result<LaunchRecord, QemuError> {
        self.record(name)
    }

    /// Every host file of `cfg` opened and checked (`launch::resolve`), and
    /// usable by the user VM `name`'s QEMU runs as (`launch::check_access`).
    pub fn resolve(
        &self,
        name: &str,
        cfg: &VmConfig,
    ) -> Result<launch::Resolved, launch::LaunchError> {
        self.resolve_as(cfg, self.vm_user(name).as_ref())
    }

    fn resolve_as(
        &self,
        cfg: &VmConfig,
        user: Option<&user::ServiceUser>,
    ) -> Result<launch::Resolved, launch::LaunchError> {
        let res = launch::resolve(cfg, &self.opts.roots, &self.caps)?;
        if let Some(user) = user {
            launch::check_access(cfg, &res, user)?;
        }
        Ok(res)
    }

    /// Who the VM of `rec` runs as (`None`: as uvmctl): its own uid and gid
    /// from the service user's range, or the service user itself (a host
    /// without a range, or a VM launched before identities were given,
    /// until its next launch).
    pub fn user_of(&self, rec: &LaunchRecord) -> Option<user::ServiceUser> {
        Some(self.opts.qemu_user.as_ref()?.for_vm(rec.identity))
    }

    /// Who VM `name` will run as at its next launch, whether it has a
    /// record yet or not (for the checks of what it may open).
    pub fn vm_user(&self, name: &str) -> Option<user::ServiceUser> {
        let user = self.opts.qemu_user.as_ref()?;
        let current = self.record(name).ok().and_then(|r| r.identity);
        Some(user.for_vm(self.pick_identity(name, current)))
    }

    /// One choice of identities at a time in this process: two VMs
    /// launched side by side never take the same free slot.
    fn identity_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.identity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// VM `name`'s identity: `current` while no other VM of the state
    /// directory holds it, else the slot of its directory's path (so its
    /// name and state root) in the service user's range, past those other
    /// VMs hold. `None` without a range.
    fn pick_identity(&self, name: &str, current: Option<u32>) -> Option<u32> {
        let range = self.opts.qemu_user.as_ref()?.range?;
        let taken: std::collections::BTreeSet<u32> = self
            .list()
            .iter()
            .filter(|n| n.as_str() != name)
            .filter_map(|n| self.record(n).ok()?.identity)
            .collect();
        match current {
            Some(slot) if slot < range.count && !taken.contains(&slot) => Some(slot),
            _ => range.slot_for(
                &self.opts.state_dir.vm_dir(name).display().to_string(),
                &taken,
            ),
        }
    }

    /// Makes the VM's directory (root's, passable by the VM's own group)
    /// and the backend's directory in it (the VM user's), and checks that
    /// user can reach the latter: a state root it cannot pass through
    /// (0700) would leave the backend unable to make its sockets.
    fn vm_dir_for_qemu(
        &self,
        name: &str,
        user: Option<&user::ServiceUser>,
    ) -> Result<PathBuf, QemuError> {
        let launch_err = |source| QemuError::Launch {
            vm: name.into(),
            source,
        };
        let dir = self
            .opts
            .state_dir
            .create_vm_dir(name, user.map(|u| u.gid))
            .map_err(launch_err)?;
        let vsock = self
            .opts
            .state_dir
            .create_vsock_dir(name, user.map(|u| (u.uid, u.gid)))
            .map_err(launch_err)?;
        if let Some(user) = user
            && !user.may_reach(&vsock.join("vhost-vsock.sock"))
        {
            return Err(QemuError::Launch {
                vm: name.into(),
                source: launch::LaunchError::StateDir {
                    path: self.opts.state_dir.root().to_path_buf(),
                    reason: format!(
                        "{} cannot pass through it to {}: give it mode 0711",
                        user.describe(),
                        dir.display(),
                    ),
                },
            });
        }
        Ok(dir)
    }

    /// Writes `rec` (see `virtstack::records`: a failed write is kept and
    /// written again before the record is next read).
    fn store(&self, rec: &LaunchRecord) -> Result<(), QemuError> {
        self.records
            .store(&rec.name, rec)
            .map_err(|e| record_error(&rec.name, e))
    }

    /// Whether the QEMU of `rec` is running: its pid is alive and is really
    /// the QEMU serving this VM's QMP socket (pids get reused).
    fn alive(&self, rec: &LaunchRecord) -> bool {
        let Some(pid) = rec.pid else {
            return false;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        // The VM's own SMBIOS UUID (in its record); a QEMU launched before
        // named its QMP socket's path instead.
        let sock = self.opts.state_dir.qmp_socket(&rec.name);
        let legacy = format!("unix:{},", sock.display());
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        rec.machine_uuid.as_ref().is_some_and(|uuid| {
            args.windows(2)
                .any(|w| w[0] == b"-uuid" && w[1] == uuid.as_bytes())
        }) || args.iter().any(|a| a.starts_with(legacy.as_bytes()))
    }

    /// The QMP connection of a running VM, connecting on first use.
    ///
    /// The map is locked only to look up and to insert, never while a
    /// greeting is awaited: a hung QEMU delays its own VM, not the others.
    async fn qmp(&self, name: &str) -> Result<Qmp, QemuError> {
        if let Some(q) = self.conns.lock().await.get(name) {
            return Ok(q.clone());
        }
        if let Some(f) = self.followed().get(name) {
            return Ok(f.qmp.clone());
        }
        let observe = self.opts.state_dir.observe_socket(name);
        let sock = if self.opts.observer && observe.exists() {
            observe
        } else {
            self.opts.state_dir.qmp_socket(name)
        };
        let q = Qmp::connect(&sock, qmp::DEFAULT_TIMEOUT)
            .await
            .map_err(|source| QemuError::Qmp {
                vm: name.into(),
                source,
            })?;
        // Two callers may have connected at once; keep the first.
        Ok(self
            .conns
            .lock()
            .await
            .entry(name.to_string())
            .or_insert(q)
            .clone())
    }

    /// The VM's QMP events from now on, over its events socket (never the
    /// sockets `apply` and `plan` use). `None` when the VM does not run or
    /// was launched before it had one.
    pub async fn events(&self, name: &str) -> Result<Option<crate::vm::VmEvents>, QemuError> {
        let rec = self.record(name)?;
        let sock = self.opts.state_dir.events_socket(name);
        if !self.alive(&rec) || !sock.exists() {
            return Ok(None);
        }
        let q = Qmp::connect(&sock, qmp::DEFAULT_TIMEOUT)
            .await
            .map_err(|source| QemuError::Qmp {
                vm: name.into(),
                source,
            })?;
        let mut rx = q.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(EVENTS_BUFFERED);
        // The vsock backend reports nothing when it dies: looked at once a
        // second, so a watcher re-plugs it at once rather than at a resync.
        let mut backend = rec
            .vsock_pid
            .filter(|_| vsock::backend_alive(rec.vsock_pid, &self.opts.state_dir, name));
        let dir = self.opts.state_dir.clone();
        let vm = name.to_string();
        // Serial listeners QEMU cannot reconnect to itself: looked at once
        // a second too, and connected again when back (serial.rs).
        let mut serials: Vec<(u32, PathBuf)> = rec
            .config
            .serial_consoles
            .iter()
            .map(|c| (c.port, c.listener_path.clone()))
            .collect();
        let roots = self.opts.roots.clone();
        let resolve = move |p: &Path| roots.check_socket(p).ok();
        let console_log = format!("/dev/fdset/{}", launch::CONSOLE_LOG_FDSET);
        let serial_qmp = q.clone();
        let number = self
            .subscriptions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A newer subscription replaces an older one's entry whole.
        self.followed().insert(
            vm.clone(),
            Followed {
                number,
                qmp: q.clone(),
                seen: None,
                unplugging: Vec::new(),
                epoch: 0,
            },
        );
        let followed = std::sync::Arc::clone(&self.followed);
        tokio::spawn(async move {
            // Owns the connection: it closes when QEMU ends or the
            // receiver is dropped, and commands stop using it then.
            let _conn = q;
            let _unhold = Unhold {
                followed: std::sync::Arc::clone(&followed),
                vm: vm.clone(),
                number,
            };
            let mut tick = tokio::time::interval(BACKEND_CHECK);
            loop {
                let got = tokio::select! {
                    got = rx.recv() => got,
                    // Nobody listens any more: let the socket go now, not
                    // at the next event (it serves one client at a time).
                    () = tx.closed() => return,
                    _ = tick.tick(), if backend.is_some() || !serials.is_empty() => {
                        match serial::reconnect(&serial_qmp, &serials, Some(&console_log), &resolve).await {
                            Ok(ports) => {
                                for port in ports {
                                    tracing::info!(vm = %vm, "serial port {port}: connected to its listener");
                                }
                            }
                            // Not again and again: each try hands the
                            // listener a connection that is then dropped.
                            Err(e) => {
                                tracing::warn!(vm = %vm, "serial consoles: {}; not reconnected again until the VM is followed anew", crate::vm::Chain(&e));
                                serials.clear();
                            }
                        }
                        if backend.is_none() || vsock::backend_alive(backend, &dir, &vm) {
                            continue;
                        }
                        backend = None;
                        // The VM is not as last seen: its listeners are gone.
                        with_followed(&followed, &vm, number, Followed::stale);
                        let _ = tx
                            .send(crate::vm::VmEvent::Reported(VSOCK_BACKEND_EXITED.into()))
                            .await;
                        continue;
                    }
                };
                // Whatever QEMU reports, the VM may be other than last
                // seen, but for the echo of an unplug this process makes.
                let deleted = got
                    .as_ref()
                    .ok()
                    .filter(|e| e.name == "DEVICE_DELETED")
                    .and_then(|e| e.data.get("device"))
                    .and_then(serde_json::Value::as_str);
                with_followed(&followed, &vm, number, |f| {
                    f.unplugging.retain(|(_, at)| at.elapsed() < ECHO_WAIT);
                    let before = f.unplugging.len();
                    if let Some(d) = deleted {
                        f.unplugging.retain(|(x, _)| x != d);
                    }
                    if f.unplugging.len() == before {
                        f.stale();
                    }
                });
                let event = match got {
                    Ok(e) if STATE_EVENTS.contains(&e.name.as_str()) => {
                        crate::vm::VmEvent::Reported(e.name)
                    }
                    Ok(_) => continue,
                    // Lost some: say so, the watcher re-observes anyway.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        crate::vm::VmEvent::Reported("events lost".into())
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        let _ = tx.send(crate::vm::VmEvent::Gone).await;
                        return;
                    }
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        self.seed_seen(name, number).await;
        Ok(Some(out))
    }

    /// Observes a VM just followed and keeps that as its standing
    /// observation, so a watcher's first edit costs only its QMP round trips.
    /// Taken after the subscription started, so no event is missed from it;
    /// kept only when nothing changed the VM while it was taken (no event,
    /// no dropped observation, the launch record the same file), since
    /// this runs beside the watcher's reconciles, not between them.
    async fn seed_seen(&self, name: &str, number: u64) {
        let epoch = |q: &Self| {
            q.followed()
                .get(name)
                .filter(|f| f.number == number && f.seen.is_none())
                .map(|f| f.epoch)
        };
        let (Some(before), Some(stamp)) = (epoch(self), self.records.stamp(name)) else {
            return;
        };
        let Ok(vm) = self.observe_now(name).await else {
            return;
        };
        // A record written after this check has another stamp, which
        // `still_seen` compares: only events need checking under the lock.
        if !vm.state.is_live() || self.records.stamp(name) != Some(stamp) {
            return;
        }
        if let Some(f) = self.followed().get_mut(name)
            && f.number == number
            && f.seen.is_none()
            && f.epoch == before
        {
            f.seen = Some(Seen {
                at: std::time::Instant::now(),
                stamp,
                vm,
            });
        }
    }

    /// Forgets a VM's QMP connection (its QEMU is gone or being replaced,
    /// or another process is to drive it next). A followed VM's events
    /// connection stays: it is not the socket another process needs.
    pub async fn forget(&self, name: &str) {
        self.conns.lock().await.remove(name);
    }

    /// Forgets every connection of a VM whose QEMU is gone or replaced.
    async fn forget_all(&self, name: &str) {
        self.forget(name).await;
        self.followed().remove(name);
    }

    /// Last lines QEMU wrote to stderr.
    fn last_stderr(&self, name: &str, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.opts.state_dir.stderr_log(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Why the VM's QEMU exited, when it exited without uvmctl stopping it
    /// (hcsshim's `ExitError`).
    pub fn exit_error(&self, name: &str) -> Option<String> {
        let rec = self.record(name).ok()?;
        if rec.pid.is_none() || rec.stopped_by_uvmctl || self.alive(&rec) {
            return None;
        }
        let tail = self.last_stderr(name, 5);
        Some(if tail.is_empty() {
            "qemu exited unexpectedly".into()
        } else {
            format!("qemu exited unexpectedly: {tail}")
        })
    }

    /// Creates a VM from `cfg`: checks every host path, writes its record,
    /// and (unless its power state is `stopped`) launches it and brings it
    /// to its power state.
    pub async fn create(&self, name: &str, cfg: &VmConfig) -> Result<(), QemuError> {
        let launch_err = |source| QemuError::Launch {
            vm: name.into(),
            source,
        };
        // Chosen and recorded under one guard: a VM created beside it never
        // takes the same slot.
        let chosen = self.identity_guard();
        let identity = self.pick_identity(name, None);
        let user = self.opts.qemu_user.as_ref().map(|u| u.for_vm(identity));
        self.resolve_as(cfg, user.as_ref()).map_err(launch_err)?;
        self.vm_dir_for_qemu(name, user.as_ref())?;
        let machine_uuid = launch::new_machine_uuid().map_err(|e| QemuError::Os {
            vm: name.into(),
            what: format!("cannot make the VM's UUID: {e}"),
        })?;
        let rec = LaunchRecord {
            version: 1,
            name: name.into(),
            config: cfg.clone(),
            accel: self.opts.accel,
            pid: None,
            stopped_by_uvmctl: true,
            started_at: None,
            saved: None,
            shared_memory: false,
            vsock_cid: Some(self.free_cid()),
            vsock_pid: None,
            identity,
            machine_uuid: Some(machine_uuid),
        };
        self.store(&rec)?;
        drop(chosen);
        match cfg.power_state {
            crate::spec::PowerState::Stopped => Ok(()),
            crate::spec::PowerState::Running => self.start(name).await,
            crate::spec::PowerState::Paused => self.start_paused(name).await,
            crate::spec::PowerState::Saved => {
                self.start(name).await?;
                self.save(name).await
            }
        }
    }

    /// Launches the VM from its record (restoring its saved state, if it has
    /// one) and lets the guest run.
    pub async fn start(&self, name: &str) -> Result<(), QemuError> {
        self.launch(name, true).await
    }

    /// Launches the VM from its record (restoring its saved state, if it has
    /// one), leaving the guest paused.
    pub async fn start_paused(&self, name: &str) -> Result<(), QemuError> {
        self.launch(name, false).await
    }

    async fn launch(&self, name: &str, run: bool) -> Result<(), QemuError> {
        let mut rec = self.record(name)?;
        if self.alive(&rec) {
            if !run {
                return Ok(());
            }
            let q = self.qmp(name).await?;
            return ops::cont(&q).await.map_err(|source| QemuError::Qmp {
                vm: name.into(),
                source,
            });
        }
        let launch_err = |source| QemuError::Launch {
            vm: name.into(),
            source,
        };
        // A VM made before identities (or its UUID) were given gets its own
        // now; one whose slot another VM took meanwhile gets another.
        {
            let _chosen = self.identity_guard();
            let identity = self.pick_identity(name, rec.identity);
            if identity != rec.identity || rec.machine_uuid.is_none() {
                rec.identity = identity;
                if rec.machine_uuid.is_none() {
                    rec.machine_uuid =
                        Some(launch::new_machine_uuid().map_err(|e| QemuError::Os {
                            vm: name.into(),
                            what: format!("cannot make the VM's UUID: {e}"),
                        })?);
                }
                self.store(&rec)?;
            }
        }
        let user = self.user_of(&rec);
        let mut res = self
            .resolve_as(&rec.config, user.as_ref())
            .map_err(launch_err)?;
        let saved = rec.saved.clone();
        if let Some(s) = &saved {
            // The saved state loads only into the memory layout it had, and
            // without the vsock device (unplugged before the save).
            res.shared_memory = s.shared_memory;
            res.vsock_device = false;
        }
        let mut cfg = rec.config.clone();
        if let Some(hot) = saved.as_ref().and_then(|s| s.memory_hotplug) {
            // The saved guest booted with this much; what it plugged since
            // comes back with its state.
            cfg.memory.size_mb = hot.min_mb;
        }
        // Shared with the service user as it is now (a VM made before, or
        // by a QEMU that ran as root, gets the mode it needs).
        let dir = self.vm_dir_for_qemu(name, user.as_ref())?;
        if rec.config.boot.uefi.is_some() {
            res.efi_vars = Some(
                self.opts
                    .state_dir
                    .prepare_efi_vars(name)
                    .map_err(launch_err)?,
            );
        }
        // Tap devices are opened here, by root, and handed over.
        for n in cfg.network_adapters.iter().filter(|n| devices::is_tap(n)) {
            let tap = tap::open(&n.endpoint_id).map_err(|e| QemuError::Os {
                vm: name.into(),
                what: format!(
                    "networkAdapter {}: cannot open tap {}: {e}",
                    n.nic_id, n.endpoint_id
                ),
            })?;
            res.taps
                .insert(n.nic_id.clone(), launch::Opened(std::sync::Arc::new(tap)));
        }
        // What the guest said during the launch before stays readable once
        // (`uvmctl logs --previous`).
        // QEMU writes the console into a pipe; a writer of uvmctl's keeps
        // the log to its bound (conlog.rs).
        let log = conlog::start(&self.opts.state_dir, name).map_err(|e| QemuError::Os {
            vm: name.into(),
            what: format!("cannot start the console log: {e}"),
        })?;
        res.console_log = Some(images::HostFile {
            path: self.opts.state_dir.console_log(name),
            file: std::sync::Arc::new(std::fs::File::from(log)),
        });
        self.forget_all(name).await;
        if res.shared_memory {
            vsock::set_links(&self.opts.state_dir, name, &res.vsock_listeners).map_err(|e| {
                QemuError::Os {
                    vm: name.into(),
                    what: format!("cannot link the vsock listeners: {e}"),
                }
            })?;
        }
        // Never through a link planted where the log goes (opened before
        // anything is started, so a refusal leaves nothing running).
        let log =
            crate::hostfs::open_state_file(&self.opts.state_dir.stderr_log(name), 0o600, true)
                .map_err(|e| QemuError::Os {
                    vm: name.into(),
                    what: format!("cannot create qemu.log: {e}"),
                })?;
        vsock::stop_backend(rec.vsock_pid, &self.opts.state_dir, name).await;
        rec.vsock_pid = None;
        let cid = match rec.vsock_cid {
            Some(c) => c,
            None => self.free_cid(),
        };
        rec.vsock_cid = Some(cid);
        rec.shared_memory = res.shared_memory;
        // From here until the launch is done, a launch cut short (a
        // client's deadline drops this future at any await) ends what it
        // started, recorded or not.
        let mut unfinished = Unfinished {
            qemu: self,
            name,
            backend: None,
            started: None,
        };
        if res.vsock_device {
            let pid = self.start_backend(name, cid, user.as_ref()).await?;
            rec.vsock_pid = Some(pid);
            unfinished.backend = Some(pid);
        }
        // The sockets QEMU serves are made here, root's, and handed over:
        // no VM's user (this one's included) can connect to them by path.
        let console = !cfg.serial_consoles.iter().any(|s| s.port == 0);
        let controls =
            launch::ControlSockets::bind(&self.opts.state_dir, name, console).map_err(|e| {
                QemuError::Os {
                    vm: name.into(),
                    what: format!("cannot make the VM's control sockets: {e}"),
                }
            })?;
        // Serial listeners are connected here, by root, last before QEMU
        // starts (a listener that accepts once must not get a connection a
        // failed launch drops), and handed over; one
        // not listening yet is connected once it is, by whoever follows the
        // VM (serial.rs).
        for (port, path) in &res.serials {
            match serial::connect(path) {
                Ok(conn) => {
                    res.serial_conns
                        .insert(*port, launch::Opened(std::sync::Arc::new(conn)));
                }
                Err(e) => tracing::info!(
                    vm = name,
                    "serial port {port}: {} does not accept now ({e}); connected once it does",
                    path.display()
                ),
            }
        }
        let (mut argv, handover) = launch::argv(
            name,
            &cfg,
            &res,
            controls.fds(),
            rec.machine_uuid.as_deref(),
            &self.opts.state_dir,
            rec.accel,
        );
        if let Some(s) = &saved {
            // The saved state loads only into the same device layout.
            devices::place_devices(&mut argv, &s.placement);
            argv.extend(["-incoming".to_string(), "defer".to_string()]);
        }
        // Pinned memory: QEMU locks all of itself, which needs CAP_IPC_LOCK
        // or a limit as large (user::MemLock); the capabilities refused a
        // host that has neither before anything started.
        let pinned = cfg.memory.backing == crate::vm::MemoryBackingType::Physical;
        let child = process::spawn(process::Spawn {
            program: Path::new(launch::QEMU_BINARY),
            args: &argv,
            dir: &dir,
            log,
            user: user.as_ref(),
            memlock: pinned.then_some(&self.memlock),
            inherit: handover.fds.clone(),
            env: &[],
            confine: false,
        });
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                // The backend started for it must not outlive the failure:
                // its pid is in no record yet.
                vsock::stop_backend(rec.vsock_pid, &self.opts.state_dir, name).await;
                return Err(QemuError::Os {
                    vm: name.into(),
                    what: format!("cannot start {}: {e}", launch::QEMU_BINARY),
                });
            }
        };
        let pid = child.id();
        // Reap it when it exits while uvmctl still runs; after that the
        // launch record and qemu.log tell what happened.
        let (exited_tx, exited_rx) = tokio::sync::watch::channel(false);
        unfinished.started = pid.map(|p| (p, exited_rx.clone()));
        tokio::spawn(async move {
            let mut child = child;
            let _ = child.wait().await;
            let _ = exited_tx.send(true);
        });
        rec.pid = pid;
        rec.stopped_by_uvmctl = false;
        rec.started_at = Some(now_unix());
        let brought_up = async {
            self.store(&rec)?;
            let q = self.wait_ready(name, exited_rx).await?;
            // The vCPUs beyond the boot one, plugged before the guest runs.
            ops::set_cpus(&q, rec.config.processors.count, self.opts.unplug_timeout)
                .await
                .map_err(|e| QemuError::from_unplug(name, e))?;
            if saved.is_some() {
                self.restore(&q, name).await?;
                if res.shared_memory && self.vsock_backend.is_some() {
                    self.ensure_vsock(&q, name).await?;
                }
            }
            if run {
                ops::cont(&q).await.map_err(|source| QemuError::Qmp {
                    vm: name.into(),
                    source,
                })?;
            }
            Ok(())
        }
        .await;
        if brought_up.is_err() {
            // A QEMU that never became what was asked must not linger:
            // nothing would own it. Recorded as stopped by uvmctl, so the
            // failure is this launch's, not a crash of the VM (the record
            // is read again: a restore may have changed it meanwhile).
            if let Ok(mut now) = self.record(name) {
                now.stopped_by_uvmctl = true;
                let _ = self.store(&now);
            }
            self.forget_all(name).await;
            let _ = self.kill(&rec).await;
            self.end_backend(name).await;
        }
        unfinished.done();
        brought_up
    }

    /// Loads the saved state into a QEMU launched with `-incoming defer`.
    /// On failure QEMU is stopped and the saved state kept.
    async fn restore(&self, q: &Qmp, name: &str) -> Result<(), QemuError> {
        let path = self.opts.state_dir.save_path(name);
        let result = match std::fs::File::open(&path) {
            Ok(file) => ops::migrate_fd(q, "migrate-incoming", file.as_fd(), SAVE_TIMEOUT)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("cannot open {}: {e}", path.display())),
        };
        let mut rec = self.record(name)?;
        match result {
            Ok(()) => {
                rec.saved = None;
                self.store(&rec)?;
                let _ = std::fs::remove_file(&path);
                Ok(())
            }
            Err(why) => {
                rec.stopped_by_uvmctl = true;
                self.store(&rec)?;
                let _ = q.execute("quit", None).await;
                if !self.wait_exit(&rec, Duration::from_secs(3)).await {
                    self.kill(&rec).await?;
                }
                let tail = self.last_stderr(name, 3);
                Err(QemuError::Migration {
                    vm: name.into(),
                    what: format!(
                        "restoring the saved guest failed: {why}{}{tail}; the saved state stays in {} (powerState: stopped discards it)",
                        if tail.is_empty() { "" } else { ": " },
                        path.display()
                    ),
                })
            }
        }
    }

    /// Saves the guest state to the state directory and ends its QEMU
    /// (hcsshim's `Save`); the next start restores it. A save that fails
    /// leaves the VM as it was.
    pub async fn save(&self, name: &str) -> Result<(), QemuError> {
        let q = self.running_qmp(name).await?;
        let qerr = |source| QemuError::Qmp {
            vm: name.into(),
            source,
        };
        // A restore relaunches what the record says; a device added behind
        // uvmctl's back would be missing and the saved state would not load.
        let rec = self.record(name)?;
        let res = launch::resolve(&rec.config, &self.opts.roots, &self.caps).map_err(|source| {
            QemuError::Launch {
                vm: name.into(),
                source,
            }
        })?;
        let (argv, _) = launch::argv(
            name,
            &rec.config,
            &res,
            launch::Controls::UNUSED,
            None,
            &self.opts.state_dir,
            rec.accel,
        );
        let known = devices::device_ids(&argv);
        let foreign: Vec<String> = ops::peripherals(&q)
            .await
            .map_err(qerr)?
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| !known.contains(id) && !id.starts_with("vcpu-"))
            .collect();
        if !foreign.is_empty() {
            return Err(QemuError::Migration {
                vm: name.into(),
                what: format!(
                    "not saved: {} added outside uvmctl, would be missing at restore; remove {} (device_del) first",
                    foreign.join(", "),
                    if foreign.len() == 1 { "it" } else { "them" }
                ),
            });
        }
        let was_running = ops::status(&q).await.map_err(qerr)? == "running";
        // A vhost-user vsock device blocks migration: out for the save,
        // back in (with a new backend) at restore or if the save fails. The
        // guest must run to let go of it: a paused one runs for that moment.
        let had_vsock = ops::device_present(&q, vsock::DEVICE_ID)
            .await
            .map_err(qerr)?;
        if had_vsock {
            if !was_running {
                ops::cont(&q).await.map_err(qerr)?;
            }
            let unplugged = vsock::unplug(&q, self.opts.unplug_timeout).await;
            if !was_running {
                let _ = q.execute("stop", None).await;
            }
            unplugged.map_err(|e| QemuError::from_unplug(name, e))?;
            self.end_backend(name).await;
        }
        if was_running {
            q.execute("stop", None).await.map_err(qerr)?;
        }
        let memory_hotplug = self.observe(name).await?.memory_hotplug;
        let result = self.save_to_file(&q, name).await;
        let placement = match result {
            Ok(p) => p,
            Err(why) => {
                if had_vsock {
                    let _ = self.ensure_vsock(&q, name).await;
                }
                if was_running {
                    let _ = ops::cont(&q).await;
                }
                return Err(QemuError::Migration {
                    vm: name.into(),
                    what: format!("saving the guest failed, it runs on as before: {why}"),
                });
            }
        };
        let mut rec = self.record(name)?;
        rec.saved = Some(launch::SavedGuest {
            saved_at: now_unix(),
            placement,
            memory_hotplug,
            shared_memory: rec.shared_memory,
        });
        rec.stopped_by_uvmctl = true;
        self.store(&rec)?;
        let _ = q.execute("quit", None).await;
        if !self.wait_exit(&rec, Duration::from_secs(5)).await {
            self.kill(&rec).await?;
        }
        self.end_backend(name).await;
        Ok(())
    }

    /// Migrates the paused guest into `saved.state`; returns where its
    /// devices sit. The file is opened here and its fd passed to QEMU: the
    /// sandbox forbids QEMU to spawn (`exec:`) and 7.2 has no `file:` URI.
    async fn save_to_file(&self, q: &Qmp, name: &str) -> Result<launch::Placement, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let placement = ops::placement(q).await.map_err(|e| e.to_string())?;
        let path = self.opts.state_dir.save_path(name);
        let part = path.with_extension("state.part");
        // The default bandwidth cap (32 MiB/s) is for live migration over a network.
        q.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({"max-bandwidth": 64u64 << 30})),
        )
        .await
        .map_err(|e| e.to_string())?;
        // A new file, never one (or a link) found there.
        let _ = std::fs::remove_file(&part);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&part)
            .map_err(|e| format!("cannot create {}: {e}", part.display()))?;
        let migrated = async {
            ops::migrate_fd(q, "migrate", file.as_fd(), SAVE_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            // Syncing hundreds of MB blocks; keep it off the async workers.
            let (part, path) = (part.clone(), path.clone());
            tokio::task::spawn_blocking(move || {
                file.sync_all()?;
                std::fs::rename(&part, &path)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
        }
        .await;
        if migrated.is_err() {
            let _ = std::fs::remove_file(&part);
        }
        migrated.map(|()| placement)
    }

    /// Discards a saved guest state: the VM is then simply stopped.
    fn discard_saved(&self, name: &str) -> Result<(), QemuError> {
        let mut rec = self.record(name)?;
        if rec.saved.take().is_some() {
            let path = self.opts.state_dir.save_path(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(QemuError::Os {
                        vm: name.into(),
                        what: format!("cannot remove {}: {e}", path.display()),
                    });
                }
            }
            self.store(&rec)?;
        }
        Ok(())
    }

    /// Waits until the VM's QEMU has exited (hcsshim's `Wait`), up to
    /// `timeout` if given; `Ok(false)` when it still runs at the deadline.
    pub async fn wait(&self, name: &str, timeout: Option<Duration>) -> Result<bool, QemuError> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut seen = false;
        loop {
            let rec = match self.record(name) {
                Ok(rec) => rec,
                // Destroyed while waited for: it stopped as asked.
                Err(QemuError::NotFound(_)) if seen => return Ok(true),
                Err(e) => return Err(e),
            };
            seen = true;
            if !self.alive(&rec) {
                self.forget_all(name).await;
                return Ok(true);
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls the QMP socket until QEMU answers, or reports why it died.
    /// `exited` turns true when the child exits (checking /proc would race
    /// with the fork before `exec`, when the child is still uvmctl).
    async fn wait_ready(
        &self,
        name: &str,
        exited: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Qmp, QemuError> {
        let deadline = tokio::time::Instant::now() + QMP_READY_TIMEOUT;
        let sock = self.opts.state_dir.qmp_socket(name);
        loop {
            if sock.exists()
                && let Ok(q) = Qmp::connect(&sock, Duration::from_secs(2)).await
            {
                self.conns.lock().await.insert(name.to_string(), q.clone());
                return Ok(q);
            }
            if *exited.borrow() {
                let detail = match self.last_stderr(name, 5) {
                    t if t.is_empty() => String::new(),
                    t => format!(": {t}"),
                };
                return Err(QemuError::Exited {
                    vm: name.into(),
                    detail,
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(QemuError::Os {
                    vm: name.into(),
                    what: format!("QMP socket not ready after {QMP_READY_TIMEOUT:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pauses the guest.
    pub async fn pause(&self, name: &str) -> Result<(), QemuError> {
        let q = self.running_qmp(name).await?;
        q.execute("stop", None)
            .await
            .map(|_| ())
            .map_err(|source| QemuError::Qmp {
                vm: name.into(),
                source,
            })
    }

    /// Resumes a paused guest.
    pub async fn resume(&self, name: &str) -> Result<(), QemuError> {
        let q = self.running_qmp(name).await?;
        ops::cont(&q).await.map_err(|source| QemuError::Qmp {
            vm: name.into(),
            source,
        })
    }

    async fn running_qmp(&self, name: &str) -> Result<Qmp, QemuError> {
        let rec = self.record(name)?;
        if !self.alive(&rec) {
            return Err(QemuError::NotRunning {
                vm: name.into(),
                state: down_state(&rec),
            });
        }
        self.qmp(name).await
    }

    /// Shuts the VM down: ACPI power button, then `quit`, then signals.
    /// A saved VM's state is discarded.
    pub async fn stop(&self, name: &str) -> Result<(), QemuError> {
        let stopped = self.stop_qemu(name).await;
        self.end_backend(name).await;
        stopped
    }

    async fn stop_qemu(&self, name: &str) -> Result<(), QemuError> {
        self.discard_saved(name)?;
        let mut rec = self.record(name)?;
        rec.stopped_by_uvmctl = true;
        self.store(&rec)?;
        if !self.alive(&rec) {
            return Ok(());
        }
        if let Ok(q) = self.qmp(name).await {
            let running = ops::status(&q)
                .await
                .map(|s| s == "running")
                .unwrap_or(false);
            if running
                && q.execute("system_powerdown", None).await.is_ok()
                && self.wait_exit(&rec, self.opts.stop_timeout).await
            {
                return Ok(());
            }
            let _ = q.execute("quit", None).await;
            if self.wait_exit(&rec, Duration::from_secs(3)).await {
                return Ok(());
            }
        }
        self.kill(&rec).await
    }

    async fn wait_exit(&self, rec: &LaunchRecord, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if !self.alive(rec) {
                self.forget_all(&rec.name).await;
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let gone = !self.alive(rec);
        if gone {
            self.forget_all(&rec.name).await;
        }
        gone
    }

    async fn kill(&self, rec: &LaunchRecord) -> Result<(), QemuError> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let Some(pid) = rec.pid.and_then(|p| i32::try_from(p).ok()) else {
            return Ok(());
        };
        for (sig, wait) in [
            (Signal::SIGTERM, Duration::from_secs(3)),
            (Signal::SIGKILL, Duration::from_secs(3)),
        ] {
            if !self.alive(rec) {
                return Ok(());
            }
            let _ = kill(Pid::from_raw(pid), sig);
            if self.wait_exit(rec, wait).await {
                return Ok(());
            }
        }
        Err(QemuError::Os {
            vm: rec.name.clone(),
            what: format!("qemu (pid {pid}) survived SIGKILL"),
        })
    }

    /// Stops a VM and deletes everything uvmctl keeps for it.
    pub async fn destroy(&self, name: &str) -> Result<(), QemuError> {
        // A record that could not be written is what the VM is; it goes
        // with the VM (never written again after it).
        let rec = match self.records.forget(name) {
            Some(rec) => rec,
            None => self.record(name)?,
        };
        if self.alive(&rec) {
            // A VM being destroyed needs no graceful shutdown.
            if let Ok(q) = self.qmp(name).await {
                let _ = q.execute("quit", None).await;
            }
            if !self.wait_exit(&rec, Duration::from_secs(3)).await {
                self.kill(&rec).await?;
            }
        }
        vsock::stop_backend(rec.vsock_pid, &self.opts.state_dir, name).await;
        let dir = self.opts.state_dir.vm_dir(name);
        std::fs::remove_dir_all(&dir).map_err(|e| QemuError::Os {
            vm: name.into(),
            what: format!("cannot remove {}: {e}", dir.display()),
        })
    }

    /// Replaces the configuration the VM starts with next (for a stopped VM,
    /// every change is this).
    pub fn set_config(&self, name: &str, cfg: &VmConfig) -> Result<(), QemuError> {
        let mut rec = self.record(name)?;
        rec.config = cfg.clone();
        self.store(&rec)
    }

    /// The full current state of one VM, read from QEMU itself.
    pub async fn observe(&self, name: &str) -> Result<ObservedVm, QemuError> {
        if let Some(vm) = self.still_seen(name) {
            return Ok(vm);
        }
        let vm = self.observe_now(name).await?;
        if vm.state.is_live() {
            self.keep_seen(name, &vm);
        }
        Ok(vm)
    }

    /// The VM as QEMU has it this moment (no standing observation).
    async fn observe_now(&self, name: &str) -> Result<ObservedVm, QemuError> {
        let rec = self.record(name)?;
        if !self.alive(&rec) {
            self.forget_all(name).await;
            let state = down_state(&rec);
            let memory_hotplug = rec.saved.as_ref().and_then(|s| s.memory_hotplug);
            let exit_error = self.exit_error(name);
            return Ok(ObservedVm {
                config: rec.config,
                state,
                managed: true,
                exit_error,
                memory_hotplug,
            });
        }
        let q = self.qmp(name).await?;
        // Listeners relay only while the backend runs; a dead one shows as
        // none, so the next apply puts them (and the backend) back.
        let vsock = (rec.shared_memory
            && vsock::backend_alive(rec.vsock_pid, &self.opts.state_dir, name))
        .then(|| vsock::listeners(&self.opts.state_dir, name));
        observe::observe(&q, &rec, vsock)
            .await
            .map_err(|source| QemuError::Qmp {
                vm: name.into(),
                source,
            })
    }

    /// Memory and processor statistics of a running VM (hcsshim's `Stats`):
    /// guest RAM from QEMU, host RSS of its process, and the CPU time of its
    /// vCPU threads from `/proc/<pid>/task/<tid>/schedstat`.
    pub async fn stats(&self, name: &str) -> Result<crate::vm::VmStats, QemuError> {
        let rec = self.record(name)?;
        if !self.alive(&rec) {
            return Err(QemuError::NotRunning {
                vm: name.into(),
                state: down_state(&rec),
            });
        }
        let q = self.qmp(name).await?;
        let qerr = |source| QemuError::Qmp {
            vm: name.into(),
            source,
        };
        let mem = q
            .execute("query-memory-size-summary", None)
            .await
            .map_err(qerr)?;
        let field = |v: &serde_json::Value, k: &str| {
            v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0)
        };
        let cpus = q.execute("query-cpus-fast", None).await.map_err(qerr)?;
        let pid = rec.pid.unwrap_or(0);
        let total_runtime_ns = cpus
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("thread-id").and_then(serde_json::Value::as_u64))
            .filter_map(|tid| {
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()
            })
            .filter_map(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum();
        let rss_kb = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        Ok(crate::vm::VmStats {
            assigned_memory_bytes: field(&mem, "base-memory") + field(&mem, "plugged-memory"),
            working_set_bytes: rss_kb * 1024,
            total_runtime_ns,
            uptime_seconds: rec.started_at.map(|t| now_unix().saturating_sub(t)),
        })
    }

    /// A connected QMP client for hot operations on a running VM, with the record.
    pub async fn live(&self, name: &str) -> Result<(Qmp, LaunchRecord), QemuError> {
        let rec = self.record(name)?;
        if !self.alive(&rec) {
            return Err(QemuError::NotRunning {
                vm: name.into(),
                state: down_state(&rec),
            });
        }
        Ok((self.qmp(name).await?, rec))
    }

    /// Stores a record after hot operations changed the VM.
    pub fn update_record(&self, rec: &LaunchRecord) -> Result<(), QemuError> {
        self.store(rec)
    }

    /// Whether the guest has opened its agent port (`uvmctl.agent`): the
    /// sign a guest with uvmctl's agent has booted. QEMU reports the guest's
    /// side of a virtio-serial port as the chardev's `frontend-open`.
    pub async fn guest_ready(&self, name: &str) -> Result<bool, QemuError> {
        let agent = self.chardev(name, "agent").await?;
        Ok(
            agent.and_then(|c| c.get("frontend-open").and_then(serde_json::Value::as_bool))
                == Some(true),
        )
    }

    /// What `query-chardev` says of the running VM's chardev `label`.
    async fn chardev(
        &self,
        name: &str,
        label: &str,
    ) -> Result<Option<serde_json::Value>, QemuError> {
        let q = self.running_qmp(name).await?;
        let chardevs = q
            .execute("query-chardev", None)
            .await
            .map_err(|source| QemuError::Qmp {
                vm: name.into(),
                source,
            })?;
        Ok(chardevs
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c.get("label").and_then(serde_json::Value::as_str) == Some(label))
            .cloned())
    }

    /// Where the guest agent channel of a VM listens.
    pub fn agent_socket(&self, name: &str) -> PathBuf {
        self.opts.state_dir.agent_socket(name)
    }

    /// A connection to the running VM's first serial port, for `uvmctl
    /// console`: refused when the spec relays that port to a listener of its
    /// own, or another client holds it (QEMU would accept a second one and
    /// never serve it).
    pub async fn console(&self, name: &str) -> Result<tokio::net::UnixStream, QemuError> {
        let rec = self.record(name)?;
        if let Some(s) = rec.config.serial_consoles.iter().find(|s| s.port == 0) {
            return Err(QemuError::Refused {
                vm: name.into(),
                reason: format!(
                    "its COM1 is relayed to {} (spec.serialConsoles); the console is there",
                    s.listener_path.display()
                ),
            });
        }
        let serial0 = self.chardev(name, "serial0").await?;
        let console = serial0
            .as_ref()
            .and_then(|c| c.get("filename").and_then(serde_json::Value::as_str))
            .unwrap_or_default();
        let socket = self.opts.state_dir.console_socket(name);
        if !console.contains(&socket.display().to_string()) {
            return Err(QemuError::Refused {
                vm: name.into(),
                reason: "it was launched without a console socket (by an older uvmctl); \
                         restart it to get one"
                    .into(),
            });
        }
        if !console.starts_with("disconnected:") {
            return Err(QemuError::Refused {
                vm: name.into(),
                reason: "its console is in use by another client".into(),
            });
        }
        tokio::net::UnixStream::connect(&socket)
            .await
            .map_err(|e| QemuError::Os {
                vm: name.into(),
                what: format!("cannot connect to its console: {e}"),
            })
    }

    /// The logs `uvmctl logs` prints for a VM uvmctl manages here.
    pub fn logs(&self, name: &str, previous: bool) -> Result<Vec<guest::Log>, QemuError> {
        self.record(name)?;
        Ok(guest::logs(&self.opts.state_dir, name, previous))
    }

    /// Runs one command of the test guest's agent (guest/README.md) on the
    /// running VM; its data lines.
    pub async fn agent(
        &self,
        name: &str,
        words: &[String],
        timeout: Duration,
    ) -> Result<Vec<String>, QemuError> {
        let rec = self.record(name)?;
        if !self.alive(&rec) {
            return Err(QemuError::NotRunning {
                vm: name.into(),
                state: down_state(&rec),
            });
        }
        guest::agent_command(&self.opts.state_dir.agent_socket(name), words, timeout)
            .await
            .map_err(|source| QemuError::Agent {
                vm: name.into(),
                source,
            })
    }
}

#[async_trait::async_trait]
impl crate::vm::Observe for Qemu {
    fn name(&self) -> &str {
        crate::vm::QEMU
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn list(&self) -> Result<Vec<VmName>, VmError> {
        // Reading a directory is quick, but a state dir on a stalled mount is not.
        let records = self.records.clone();
        tokio::task::spawn_blocking(move || records.listed())
            .await
            .map_err(|e| VmError::Backend(Box::new(e)))?
            .map_err(|e| VmError::Backend(Box::new(e)))
    }

    async fn observe(&self, name: &VmName) -> Result<ObservedVm, VmError> {
        Ok(Qemu::observe(self, name).await?)
    }
}

/// The QEMU virtstack's modules depend only downward, as the lib's
/// layering test checks the crate's: each names only the modules before it.
/// What a launch started and has not finished with: dropped before
/// [`Unfinished::done`] (the launch's future dropped at a client's
/// deadline), it kills QEMU and the vsock backend at once and marks the
/// record stopped by uvmctl, so nothing runs that no launch brought up.
struct Unfinished<'a> {
    qemu: &'a Qemu,
    name: &'a str,
    backend: Option<u32>,
    /// QEMU's pid, and whether its reaper saw it exit (then the pid may be
    /// another process's).
    started: Option<(u32, tokio::sync::watch::Receiver<bool>)>,
}

impl Unfinished<'_> {
    /// The launch ended and cleaned up after itself.
    fn done(mut self) {
        self.backend = None;
        self.started = None;
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if self.backend.is_none() && self.started.is_none() {
            return;
        }
        let dir = &self.qemu.opts.state_dir;
        if let Some((pid, exited)) = &self.started
            && !*exited.borrow()
            && let Ok(raw) = i32::try_from(*pid)
        {
            let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
        }
        if let Some(pid) = self.backend
            && vsock::backend_alive(Some(pid), dir, self.name)
            && let Ok(raw) = i32::try_from(pid)
        {
            let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
        }
        if let Ok(mut rec) = self.qemu.record(self.name)
            && self
                .started
                .as_ref()
                .is_some_and(|(pid, _)| rec.pid == Some(*pid))
        {
            rec.stopped_by_uvmctl = true;
            rec.vsock_pid = None;
            let _ = self.qemu.store(&rec);
        }
        tracing::info!(
            vm = self.name,
            "launch cut short; what it started was ended"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20: a VM stopped by its spec showed as `terminated`, the word
    /// for one that exited on its own.
    #[test]
    fn a_vm_stopped_as_asked_is_created_and_one_that_died_terminated() {
        let mut rec = LaunchRecord {
            version: 1,
            name: "vm".into(),
            config: VmConfig::default(),
            accel: Accel::Tcg,
            pid: Some(4242),
            stopped_by_uvmctl: true,
            started_at: Some(1),
            saved: None,
            shared_memory: false,
            vsock_cid: None,
            vsock_pid: None,
            identity: None,
            machine_uuid: None,
        };
        assert_eq!(down_state(&rec), State::Created);
        rec.stopped_by_uvmctl = false;
        assert_eq!(down_state(&rec), State::Terminated);
        rec.pid = None;
        rec.stopped_by_uvmctl = true;
        assert_eq!(down_state(&rec), State::Created);
    }
}

#[cfg(test)]
mod layering {
    /// Bottom to top: what each may name is what comes before it.
    const ORDER: &[&str] = &[
        "images", "qmp", "serial", "tap", "user", "state", "conlog", "guest", "devices", "process",
        "ops", "vsock", "launch", "caps", "observe", "hotplug",
    ];

    /// Sibling modules the non-test code of `text` names.
    fn named(text: &str) -> std::collections::BTreeSet<String> {
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut out = std::collections::BTreeSet::new();
        for (i, _) in code.match_indices("super::") {
            let rest = &code[i + "super::".len()..];
            if let Some(list) = rest.strip_prefix('{') {
                let list = &list[..list.find('}').unwrap_or(list.len())];
                for part in list.split(',') {
                    let head = part.trim().split("::").next().unwrap_or_default();
                    out.insert(head.trim().to_string());
                }
            } else {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                out.insert(rest[..end].to_string());
            }
        }
        out.retain(|n| ORDER.contains(&n.as_str()));
        out
    }

    #[test]
    fn qemu_modules_depend_only_downward() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/virtstack/qemu");
        let mut bad = Vec::new();
        for (i, module) in ORDER.iter().enumerate() {
            let path = dir.join(format!("{module}.rs"));
            let text = std::fs::read_to_string(&path).expect("module source");
            for n in named(&text) {
                if !ORDER[..i].contains(&n.as_str()) {
                    bad.push(format!("{module} names {n}"));
                }
            }
        }
        let files = std::fs::read_dir(&dir).expect("qemu dir").count();
        assert_eq!(
            files,
            ORDER.len() + 1,
            "every module (and mod.rs) is in ORDER"
        );
        assert!(bad.is_empty(), "upward dependencies:\n{}", bad.join("\n"));
    }
}
