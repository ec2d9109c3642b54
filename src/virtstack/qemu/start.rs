//! Launching a VM: its record made, its host files opened and checked, its
//! sockets bound, QEMU spawned as the VM's own user (process.rs), brought
//! up over QMP; a launch cut short ends what it started.

use super::error::{QMP_READY_TIMEOUT, QemuError, SAVE_TIMEOUT};
use super::host::now_unix;
use super::machine::Machine;
use super::qmp::Qmp;
use super::state::LaunchRecord;
use super::{conlog, devices, images, launch, notify, ops, process, serial, tap, vsock};
use crate::spec::VmConfig;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

impl Machine<'_> {
    /// Creates a VM from `cfg`: checks every host path, writes its record,
    /// and (unless its power state is `stopped`) launches it and brings it
    /// to its power state.
    pub async fn create(&self, cfg: &VmConfig) -> Result<(), QemuError> {
        let name = self.name;
        let launch_err = |source| QemuError::Launch {
            vm: name.into(),
            source,
        };
        // Chosen and recorded under one guard: a VM created beside it never
        // takes the same slot.
        let chosen = self.host.identity_guard();
        let identity = self.host.pick_identity(name, None);
        let user = self
            .host
            .opts
            .qemu_user
            .as_ref()
            .map(|u| u.for_vm(identity));
        self.host
            .resolve_as(cfg, user.as_ref())
            .map_err(launch_err)?;
        self.vm_dir_for_qemu(user.as_ref())?;
        let machine_uuid = launch::new_machine_uuid().map_err(|e| QemuError::Os {
            vm: name.into(),
            what: format!("cannot make the VM's UUID: {e}"),
        })?;
        let rec = LaunchRecord {
            version: 1,
            name: name.into(),
            config: cfg.clone(),
            accel: self.host.opts.accel,
            pid: None,
            stopped_by_uvmctl: true,
            started_at: None,
            saved: None,
            shared_memory: false,
            vsock_cid: Some(self.host.free_cid()),
            vsock_pid: None,
            identity,
            machine_uuid: Some(machine_uuid),
            history: Default::default(),
        };
        self.store(&rec)?;
        drop(chosen);
        match cfg.power_state {
            crate::spec::PowerState::Stopped => Ok(()),
            crate::spec::PowerState::Running => self.start().await,
            crate::spec::PowerState::Paused => self.start_paused().await,
            crate::spec::PowerState::Saved => {
                self.start().await?;
                self.save().await
            }
        }
    }

    /// Launches the VM from its record (restoring its saved state, if it has
    /// one) and lets the guest run.
    pub async fn start(&self) -> Result<(), QemuError> {
        self.launch(true).await
    }

    /// Launches the VM from its record (restoring its saved state, if it has
    /// one), leaving the guest paused.
    pub async fn start_paused(&self) -> Result<(), QemuError> {
        self.launch(false).await
    }

    async fn launch(&self, run: bool) -> Result<(), QemuError> {
        let name = self.name;
        let mut rec = self.record()?;
        if self.alive(&rec) {
            if !run {
                return Ok(());
            }
            let q = self.qmp().await?;
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
            let _chosen = self.host.identity_guard();
            let identity = self.host.pick_identity(name, rec.identity);
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
        let user = self.host.user_of(&rec);
        let mut res = self
            .host
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
        let dir = self.vm_dir_for_qemu(user.as_ref())?;
        if rec.config.boot.uefi.is_some() {
            res.efi_vars = Some(
                self.host
                    .opts
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
        let log = conlog::start(&self.host.opts.state_dir, name).map_err(|e| QemuError::Os {
            vm: name.into(),
            what: format!("cannot start the console log: {e}"),
        })?;
        res.console_log = Some(images::HostFile {
            path: self.host.opts.state_dir.console_log(name),
            file: std::sync::Arc::new(std::fs::File::from(log)),
        });
        self.forget_all();
        if res.shared_memory {
            vsock::set_links(&self.host.opts.state_dir, name, &res.vsock_listeners).map_err(
                |e| QemuError::Os {
                    vm: name.into(),
                    what: format!("cannot link the vsock listeners: {e}"),
                },
            )?;
        }
        // The guest's READY=1 is heard from its first moment on.
        let notifies = res.vsock_device && cfg.health.as_ref().is_some_and(|h| h.notifies());
        let listening = if notifies {
            Some(
                notify::listen(
                    &self.host.opts.state_dir,
                    name,
                    user.as_ref().map(|u| u.gid),
                )
                .map_err(|e| QemuError::Os {
                    vm: name.into(),
                    what: format!("cannot listen for the guest's READY=1: {e}"),
                })?,
            )
        } else {
            None
        };
        self.listening_for_ready(listening);
        // Never through a link planted where the log goes (opened before
        // anything is started, so a refusal leaves nothing running).
        let log =
            crate::hostfs::open_state_file(&self.host.opts.state_dir.stderr_log(name), 0o600, true)
                .map_err(|e| QemuError::Os {
                    vm: name.into(),
                    what: format!("cannot create qemu.log: {e}"),
                })?;
        vsock::stop_backend(rec.vsock_pid, &self.host.opts.state_dir, name).await;
        rec.vsock_pid = None;
        let cid = match rec.vsock_cid {
            Some(c) => c,
            None => self.host.free_cid(),
        };
        rec.vsock_cid = Some(cid);
        rec.shared_memory = res.shared_memory;
        // From here until the launch is done, a launch cut short (a
        // client's deadline drops this future at any await) ends what it
        // started, recorded or not.
        let mut unfinished = Unfinished {
            vm: self,
            backend: None,
            started: None,
        };
        if res.vsock_device {
            let pid = self.start_backend(cid, user.as_ref()).await?;
            rec.vsock_pid = Some(pid);
            unfinished.backend = Some(pid);
        }
        // The sockets QEMU serves are made here, root's, and handed over:
        // no VM's user (this one's included) can connect to them by path.
        let console = !cfg.serial_consoles.iter().any(|s| s.port == 0);
        let controls = launch::ControlSockets::bind(&self.host.opts.state_dir, name, console)
            .map_err(|e| QemuError::Os {
                vm: name.into(),
                what: format!("cannot make the VM's control sockets: {e}"),
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
            &self.host.opts.state_dir,
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
            memlock: pinned.then_some(&self.host.memlock),
            inherit: handover.fds.clone(),
            env: &[],
            confine: false,
        });
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                // The backend started for it must not outlive the failure:
                // its pid is in no record yet.
                vsock::stop_backend(rec.vsock_pid, &self.host.opts.state_dir, name).await;
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
            let q = self.wait_ready(exited_rx).await?;
            // The vCPUs beyond the boot one, plugged before the guest runs.
            ops::set_cpus(
                &q,
                rec.config.processors.count,
                self.host.opts.unplug_timeout,
            )
            .await
            .map_err(|e| QemuError::from_unplug(name, e))?;
            if saved.is_some() {
                self.restore(&q).await?;
                if res.shared_memory && self.host.vsock_backend.is_some() {
                    self.ensure_vsock(&q).await?;
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
            if let Ok(mut now) = self.record() {
                now.stopped_by_uvmctl = true;
                let _ = self.store(&now);
            }
            self.forget_all();
            let _ = self.kill(&rec).await;
            self.end_backend().await;
        }
        unfinished.done();
        brought_up
    }

    /// Loads the saved state into a QEMU launched with `-incoming defer`.
    /// On failure QEMU is stopped and the saved state kept.
    async fn restore(&self, q: &Qmp) -> Result<(), QemuError> {
        let name = self.name;
        let path = self.host.opts.state_dir.save_path(name);
        let result = match std::fs::File::open(&path) {
            Ok(file) => ops::migrate_fd(q, "migrate-incoming", file.as_fd(), SAVE_TIMEOUT)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("cannot open {}: {e}", path.display())),
        };
        let mut rec = self.record()?;
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
                let tail = self.last_stderr(3);
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

    /// Polls the QMP socket until QEMU answers, or reports why it died.
    /// `exited` turns true when the child exits (checking /proc would race
    /// with the fork before `exec`, when the child is still uvmctl).
    async fn wait_ready(
        &self,
        exited: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Qmp, QemuError> {
        let name = self.name;
        let deadline = tokio::time::Instant::now() + QMP_READY_TIMEOUT;
        let sock = self.host.opts.state_dir.qmp_socket(name);
        loop {
            if sock.exists()
                && let Ok(q) = Qmp::connect(&sock, Duration::from_secs(2)).await
            {
                self.keep_conn(&q);
                return Ok(q);
            }
            if *exited.borrow() {
                let detail = match self.last_stderr(5) {
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
}

/// What a launch started and has not finished with: dropped before
/// [`Unfinished::done`] (the launch's future dropped at a client's
/// deadline), it kills QEMU and the vsock backend at once and marks the
/// record stopped by uvmctl, so nothing runs that no launch brought up.
struct Unfinished<'a> {
    vm: &'a Machine<'a>,
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
        let dir = &self.vm.host.opts.state_dir;
        if let Some((pid, exited)) = &self.started
            && !*exited.borrow()
            && let Ok(raw) = i32::try_from(*pid)
        {
            let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
        }
        if let Some(pid) = self.backend
            && vsock::backend_alive(Some(pid), dir, self.vm.name)
            && let Ok(raw) = i32::try_from(pid)
        {
            let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
        }
        if let Ok(mut rec) = self.vm.record()
            && self
                .started
                .as_ref()
                .is_some_and(|(pid, _)| rec.pid == Some(*pid))
        {
            rec.stopped_by_uvmctl = true;
            rec.vsock_pid = None;
            let _ = self.vm.store(&rec);
        }
        tracing::info!(
            vm = self.vm.name,
            "launch cut short; what it started was ended"
        );
    }
}
