//! One VM of the QEMU virtstack, through its handle ([`Machine`]): its launch
//! record (in the one store), its QMP connection and what this process
//! follows of it, one slot per VM, as Kata keeps one `QemuInner` per VM.

use super::error::QemuError;
use super::host::{Qemu, down_state, record_error};
use super::qmp::{self, Qmp};
use super::slot::{ECHO_WAIT, Followed, SEEN_TTL, Seen, VmSlot};
use super::state::LaunchRecord;
use super::{launch, ops, user, vsock};
use crate::spec::VmConfig;
use crate::vm::ObservedVm;
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard};

/// The handle of one VM: every verb on it goes through here.
#[derive(Debug, Clone)]
pub struct Machine<'q> {
    pub(super) host: &'q Qemu,
    pub(super) name: &'q str,
    slot: Arc<VmSlot>,
}

impl Qemu {
    /// The handle of VM `name`: its record, its connection, what this
    /// process follows of it.
    pub fn vm<'q>(&'q self, name: &'q str) -> Machine<'q> {
        Machine {
            host: self,
            name,
            slot: self.slot(name),
        }
    }

    /// The handle of VM `name` if this process keeps anything for it: a
    /// VM never reached (or destroyed since) gets no slot by being asked.
    pub fn vm_if_kept<'q>(&'q self, name: &'q str) -> Option<Machine<'q>> {
        let slot = self.existing_slot(name)?;
        Some(Machine {
            host: self,
            name,
            slot,
        })
    }
}

impl<'q> Machine<'q> {
    /// The VM's name.
    pub fn name(&self) -> &str {
        self.name
    }

    /// Its launch record.
    pub fn record(&self) -> Result<LaunchRecord, QemuError> {
        self.host.record_of(self.name)
    }

    /// What a subscription keeps of it, locked.
    pub(super) fn followed(&self) -> MutexGuard<'_, Option<Followed>> {
        // Poisoned only by a panic elsewhere: the slot itself is intact.
        self.slot.followed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Listens for its guest's `READY=1` with `task` from now on (none:
    /// not at all); the listener of an earlier launch stops.
    pub(super) fn listening_for_ready(&self, task: Option<tokio::task::JoinHandle<()>>) {
        let mut notify = self.slot.notify.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = std::mem::replace(&mut *notify, task) {
            old.abort();
        }
    }

    /// The slot, for a task that outlives this handle (an event subscription).
    pub(super) fn slot(&self) -> Arc<VmSlot> {
        Arc::clone(&self.slot)
    }

    fn conn(&self) -> MutexGuard<'_, Option<Qmp>> {
        self.slot.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `q` as the VM's connection.
    pub(super) fn keep_conn(&self, q: &Qmp) {
        *self.conn() = Some(q.clone());
    }

    /// The QMP connection of the running VM, connecting on first use.
    ///
    /// The slot is locked only to look up and to keep, never while a
    /// greeting is awaited: a hung QEMU delays only callers of its own VM.
    pub(super) async fn qmp(&self) -> Result<Qmp, QemuError> {
        if let Some(q) = self.conn().as_ref() {
            return Ok(q.clone());
        }
        if let Some(f) = self.followed().as_ref() {
            return Ok(f.qmp.clone());
        }
        let dir = &self.host.opts.state_dir;
        let observe = dir.observe_socket(self.name);
        let sock = if self.host.opts.observer && observe.exists() {
            observe
        } else {
            dir.qmp_socket(self.name)
        };
        let q = Qmp::connect(&sock, qmp::DEFAULT_TIMEOUT)
            .await
            .map_err(|source| QemuError::Qmp {
                vm: self.name.into(),
                source,
            })?;
        // Two callers may have connected at once; keep the first.
        Ok(self.conn().get_or_insert(q).clone())
    }

    /// Forgets its QMP connection (its QEMU is gone or being replaced, or
    /// another process is to drive it next). A followed VM's events
    /// connection stays: it is not the socket another process needs.
    pub fn forget(&self) {
        *self.conn() = None;
    }

    /// Forgets every connection of a VM whose QEMU is gone or replaced.
    pub(super) fn forget_all(&self) {
        self.forget();
        *self.followed() = None;
    }
    /// Marks `device` of a followed VM as being unplugged by this process
    /// (see [`Followed::unplugging`]); `false` takes the mark away again.
    pub(crate) fn expect_unplug(&self, device: &str, expect: bool) {
        if let Some(f) = self.followed().as_mut() {
            f.unplugging
                .retain(|(d, at)| d != device && at.elapsed() < ECHO_WAIT);
            if expect {
                f.unplugging
                    .push((device.to_string(), std::time::Instant::now()));
            }
        }
    }

    /// Drops the observation of `name` (a lifecycle verb changed the VM).
    pub(crate) fn unsee(&self) {
        if let Some(f) = self.followed().as_mut() {
            f.stale();
        }
    }

    /// The standing observation of a followed VM, if it still stands.
    pub(super) fn still_seen(&self) -> Option<ObservedVm> {
        let stamp = self.host.records.stamp(self.name)?;
        let followed = self.followed();
        let s = followed.as_ref()?.seen.as_ref()?;
        (s.stamp == stamp && s.at.elapsed() < SEEN_TTL).then(|| s.vm.clone())
    }

    /// Keeps `vm` as the standing observation of a followed VM.
    pub(super) fn keep_seen(&self, vm: &ObservedVm) {
        let Some(stamp) = self.host.records.stamp(self.name) else {
            return;
        };
        if let Some(f) = self.followed().as_mut() {
            f.seen = Some(Seen {
                at: std::time::Instant::now(),
                stamp,
                vm: vm.clone(),
            });
        }
    }

    /// After a change made through this process: the standing observation
    /// with the change in it (dropped when it does not fit).
    pub(crate) fn seen_changed(&self, change: &crate::vm::Change) {
        let Some(mut vm) = self
            .followed()
            .as_ref()
            .and_then(|f| f.seen.as_ref())
            .map(|s| s.vm.clone())
        else {
            return;
        };
        match change.applied(&vm.config) {
            Ok(config) => {
                vm.config = config;
                self.keep_seen(&vm);
            }
            Err(_) => self.unsee(),
        }
    }

    /// Starts this VM's vsock backend, as `user`; its pid.
    pub(super) async fn start_backend(
        &self,
        cid: u32,
        user: Option<&user::ServiceUser>,
    ) -> Result<u32, QemuError> {
        let name = self.name;
        let Some(binary) = &self.host.vsock_backend else {
            return Err(QemuError::Unsupported {
                vm: name.into(),
                what: format!("vsock needs {}", vsock::BACKEND),
            });
        };
        vsock::spawn_backend(binary, &self.host.opts.state_dir, name, cid, user)
            .await
            .map_err(|what| QemuError::Os {
                vm: name.into(),
                what,
            })
    }

    /// Stops the VM's vsock backend, if it runs, and forgets its pid.
    pub(super) async fn end_backend(&self) {
        let name = self.name;
        let Ok(mut rec) = self.record() else {
            return;
        };
        if rec.vsock_pid.is_some() {
            vsock::stop_backend(rec.vsock_pid, &self.host.opts.state_dir, name).await;
            rec.vsock_pid = None;
            let _ = self.store(&rec);
        }
    }

    /// Makes sure a running VM's vsock works: its backend alive and its
    /// device plugged; a dead backend is started again and the device
    /// re-plugged (a vhost-user chardev cannot reconnect).
    pub async fn ensure_vsock(&self, q: &Qmp) -> Result<(), QemuError> {
        let name = self.name;
        let mut rec = self.record()?;
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
        let alive = vsock::backend_alive(rec.vsock_pid, &self.host.opts.state_dir, name);
        // A backend an earlier uvmctl started follows links where this one
        // no longer makes them: replaced (once) by one that does.
        let legacy = vsock::backend_is_legacy(rec.vsock_pid, &self.host.opts.state_dir, name);
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
            vsock::unplug(q, self.host.opts.unplug_timeout)
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
        vsock::stop_backend(rec.vsock_pid, &self.host.opts.state_dir, name).await;
        let cid = match rec.vsock_cid {
            Some(c) => c,
            None => self.host.free_cid(),
        };
        let user = self.host.user_of(&rec);
        self.host
            .opts
            .state_dir
            .create_vsock_dir(name, user.as_ref().map(|u| (u.uid, u.gid)))
            .map_err(|source| QemuError::Launch {
                vm: name.into(),
                source,
            })?;
        let pid = self.start_backend(cid, user.as_ref()).await?;
        rec.vsock_cid = Some(cid);
        rec.vsock_pid = Some(pid);
        self.store(&rec)?;
        vsock::plug(q, &self.host.opts.state_dir, name)
            .await
            .map_err(qerr)
    }

    /// Who it will run as at its next launch.
    pub fn vm_user(&self) -> Option<user::ServiceUser> {
        self.host.next_user(self.name)
    }

    /// Makes the VM's directory (root's, passable by the VM's own group)
    /// and the backend's directory in it (the VM user's), and checks that
    /// user can reach the latter: a state root it cannot pass through
    /// (0700) would leave the backend unable to make its sockets.
    pub(super) fn vm_dir_for_qemu(
        &self,
        user: Option<&user::ServiceUser>,
    ) -> Result<PathBuf, QemuError> {
        let name = self.name;
        let launch_err = |source| QemuError::Launch {
            vm: name.into(),
            source,
        };
        let dir = self
            .host
            .opts
            .state_dir
            .create_vm_dir(name, user.map(|u| u.gid))
            .map_err(launch_err)?;
        let vsock = self
            .host
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
                    path: self.host.opts.state_dir.root().to_path_buf(),
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
    pub(super) fn store(&self, rec: &LaunchRecord) -> Result<(), QemuError> {
        self.host
            .records
            .store(&rec.name, rec)
            .map_err(|e| record_error(&rec.name, e))
    }

    /// Whether the QEMU of `rec` is running: its pid is alive and is really
    /// the QEMU serving this VM's QMP socket (pids get reused).
    pub(super) fn alive(&self, rec: &LaunchRecord) -> bool {
        let sock = self.host.opts.state_dir.qmp_socket(&rec.name);
        qemu_alive(rec.pid, rec.machine_uuid.as_deref(), &sock)
    }

    /// Last lines QEMU wrote to stderr.
    pub(super) fn last_stderr(&self, lines: usize) -> String {
        let name = self.name;
        let text =
            std::fs::read_to_string(self.host.opts.state_dir.stderr_log(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Why the VM's QEMU exited, when it exited without uvmctl stopping it
    /// (hcsshim's `ExitError`).
    pub fn exit_error(&self) -> Option<String> {
        let rec = self.record().ok()?;
        if rec.pid.is_none() || rec.stopped_by_uvmctl || self.alive(&rec) {
            return None;
        }
        let tail = self.last_stderr(5);
        Some(if tail.is_empty() {
            "qemu exited unexpectedly".into()
        } else {
            format!("qemu exited unexpectedly: {tail}")
        })
    }

    /// Its record, when its QEMU runs; else why not.
    pub(super) fn running_record(&self) -> Result<LaunchRecord, QemuError> {
        let rec = self.record()?;
        if !self.alive(&rec) {
            return Err(QemuError::NotRunning {
                vm: self.name.into(),
                state: down_state(&rec),
            });
        }
        Ok(rec)
    }

    pub(super) async fn running_qmp(&self) -> Result<Qmp, QemuError> {
        self.running_record()?;
        self.qmp().await
    }

    /// Replaces the configuration the VM starts with next (for a stopped VM,
    /// every change is this).
    pub fn set_config(&self, cfg: &VmConfig) -> Result<(), QemuError> {
        let mut rec = self.record()?;
        rec.config = cfg.clone();
        self.store(&rec)
    }

    /// A connected QMP client for hot operations on a running VM, with the record.
    pub async fn live(&self) -> Result<(Qmp, LaunchRecord), QemuError> {
        let rec = self.running_record()?;
        Ok((self.qmp().await?, rec))
    }

    /// Stores a record after hot operations changed the VM.
    pub fn update_record(&self, rec: &LaunchRecord) -> Result<(), QemuError> {
        self.store(rec)
    }
}

/// Whether `pid` is alive and is really the QEMU of the VM with SMBIOS
/// UUID `uuid` (pids get reused); a QEMU launched before UUIDs were kept
/// is known by its QMP socket's path, `qmp_socket`.
pub(super) fn qemu_alive(pid: Option<u32>, uuid: Option<&str>, qmp_socket: &Path) -> bool {
    let Some(pid) = pid else {
        return false;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let legacy = format!("unix:{},", qmp_socket.display());
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    uuid.is_some_and(|uuid| {
        args.windows(2)
            .any(|w| w[0] == b"-uuid" && w[1] == uuid.as_bytes())
    }) || args.iter().any(|a| a.starts_with(legacy.as_bytes()))
}
