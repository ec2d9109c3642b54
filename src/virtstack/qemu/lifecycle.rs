//! A VM's lifecycle after launch: pause and resume, save to a file, stop
//! (gracefully, then harder), wait for its end, destroy.

use super::error::{QemuError, SAVE_TIMEOUT};
use super::host::now_unix;
use super::machine::Machine;
use super::qmp::Qmp;
use super::state::LaunchRecord;
use super::{devices, launch, ops, vsock};
use std::os::fd::AsFd;
use std::time::Duration;

impl Machine<'_> {
    /// Saves the guest state to the state directory and ends its QEMU
    /// (hcsshim's `Save`); the next start restores it. A save that fails
    /// leaves the VM as it was.
    pub async fn save(&self) -> Result<(), QemuError> {
        let name = self.name;
        let q = self.running_qmp().await?;
        let qerr = |source| QemuError::Qmp {
            vm: name.into(),
            source,
        };
        // A restore relaunches what the record says; a device added behind
        // uvmctl's back would be missing and the saved state would not load.
        let rec = self.record()?;
        let res = launch::resolve(&rec.config, &self.host.opts.roots, &self.host.caps).map_err(
            |source| QemuError::Launch {
                vm: name.into(),
                source,
            },
        )?;
        let (argv, _) = launch::argv(
            name,
            &rec.config,
            &res,
            launch::Controls::UNUSED,
            None,
            &self.host.opts.state_dir,
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
            let unplugged = vsock::unplug(&q, self.host.opts.unplug_timeout).await;
            if !was_running {
                let _ = q.execute("stop", None).await;
            }
            unplugged.map_err(|e| QemuError::from_unplug(name, e))?;
            self.end_backend().await;
        }
        if was_running {
            q.execute("stop", None).await.map_err(qerr)?;
        }
        let memory_hotplug = self.observe().await?.memory_hotplug;
        let result = self.save_to_file(&q).await;
        let placement = match result {
            Ok(p) => p,
            Err(why) => {
                if had_vsock {
                    let _ = self.ensure_vsock(&q).await;
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
        let mut rec = self.record()?;
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
        self.end_backend().await;
        Ok(())
    }

    /// Migrates the paused guest into `saved.state`; returns where its
    /// devices sit. The file is opened here and its fd passed to QEMU: the
    /// sandbox forbids QEMU to spawn (`exec:`) and 7.2 has no `file:` URI.
    async fn save_to_file(&self, q: &Qmp) -> Result<launch::Placement, String> {
        let name = self.name;
        use std::os::unix::fs::OpenOptionsExt;
        let placement = ops::placement(q).await.map_err(|e| e.to_string())?;
        let path = self.host.opts.state_dir.save_path(name);
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
    fn discard_saved(&self) -> Result<(), QemuError> {
        let name = self.name;
        let mut rec = self.record()?;
        if rec.saved.take().is_some() {
            let path = self.host.opts.state_dir.save_path(name);
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
    pub async fn wait(&self, timeout: Option<Duration>) -> Result<bool, QemuError> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut seen = false;
        loop {
            let rec = match self.record() {
                Ok(rec) => rec,
                // Destroyed while waited for: it stopped as asked.
                Err(QemuError::NotFound(_)) if seen => return Ok(true),
                Err(e) => return Err(e),
            };
            seen = true;
            if !self.alive(&rec) {
                self.forget_all();
                return Ok(true);
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Pauses the guest.
    pub async fn pause(&self) -> Result<(), QemuError> {
        let name = self.name;
        let q = self.running_qmp().await?;
        q.execute("stop", None)
            .await
            .map(|_| ())
            .map_err(|source| QemuError::Qmp {
                vm: name.into(),
                source,
            })
    }

    /// Resumes a paused guest.
    pub async fn resume(&self) -> Result<(), QemuError> {
        let name = self.name;
        let q = self.running_qmp().await?;
        ops::cont(&q).await.map_err(|source| QemuError::Qmp {
            vm: name.into(),
            source,
        })
    }

    /// Shuts the VM down: ACPI power button, then `quit`, then signals.
    /// A saved VM's state is discarded.
    pub async fn stop(&self) -> Result<(), QemuError> {
        let stopped = self.stop_qemu().await;
        self.end_backend().await;
        stopped
    }

    async fn stop_qemu(&self) -> Result<(), QemuError> {
        self.discard_saved()?;
        let mut rec = self.record()?;
        rec.stopped_by_uvmctl = true;
        self.store(&rec)?;
        if !self.alive(&rec) {
            return Ok(());
        }
        if let Ok(q) = self.qmp().await {
            let running = ops::status(&q)
                .await
                .map(|s| s == "running")
                .unwrap_or(false);
            if running
                && q.execute("system_powerdown", None).await.is_ok()
                && self.wait_exit(&rec, self.host.opts.stop_timeout).await
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

    pub(super) async fn wait_exit(&self, rec: &LaunchRecord, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if !self.alive(rec) {
                self.forget_all();
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let gone = !self.alive(rec);
        if gone {
            self.forget_all();
        }
        gone
    }

    pub(super) async fn kill(&self, rec: &LaunchRecord) -> Result<(), QemuError> {
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
    pub async fn destroy(&self) -> Result<(), QemuError> {
        let name = self.name;
        // A record that could not be written is what the VM is; it goes
        // with the VM (never written again after it).
        let rec = match self.host.records.forget(name) {
            Some(rec) => rec,
            None => self.record()?,
        };
        if self.alive(&rec) {
            // A VM being destroyed needs no graceful shutdown.
            if let Ok(q) = self.qmp().await {
                let _ = q.execute("quit", None).await;
            }
            if !self.wait_exit(&rec, Duration::from_secs(3)).await {
                self.kill(&rec).await?;
            }
        }
        vsock::stop_backend(rec.vsock_pid, &self.host.opts.state_dir, name).await;
        let dir = self.host.opts.state_dir.vm_dir(name);
        std::fs::remove_dir_all(&dir).map_err(|e| QemuError::Os {
            vm: name.into(),
            what: format!("cannot remove {}: {e}", dir.display()),
        })
    }
}
