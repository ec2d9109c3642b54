//! Following a VM's events: one subscription per VM over its events
//! socket, forwarding what says it changed, looking after its vsock backend
//! and serial listeners, and keeping a standing observation current.

use super::error::{BACKEND_CHECK, EVENTS_BUFFERED, QemuError, STATE_EVENTS, VSOCK_BACKEND_EXITED};
use super::machine::Machine;
use super::qmp::{self, Qmp};
use super::slot::{ECHO_WAIT, Followed, Seen, VmSlot};
use super::{launch, serial, vsock};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long QEMU may take to end after the guest panicked or shut down
/// before its vsock backend is stopped: QEMU stops the device first, and
/// waits for the backend's answer with no bound (QEMU 7.2, vhost-user).
const ENDING_GRACE: Duration = Duration::from_secs(10);
/// How long it may take after that before it is killed.
const ENDING_KILL: Duration = Duration::from_secs(5);

/// The watch on a QEMU that should be ending.
struct Ending {
    /// What said it ends.
    event: String,
    /// When the next step is due.
    at: tokio::time::Instant,
    /// Its backend was stopped already.
    backend_stopped: bool,
}

/// Drops a subscription's entry when it ends.
struct Unhold {
    slot: Arc<VmSlot>,
    number: u64,
}

impl Drop for Unhold {
    fn drop(&mut self) {
        self.slot.unfollow(self.number);
    }
}

impl Machine<'_> {
    /// The VM's QMP events from now on, over its events socket (never the
    /// sockets `apply` and `plan` use). `None` when the VM does not run or
    /// was launched before it had one.
    pub async fn events(&self) -> Result<Option<crate::vm::VmEvents>, QemuError> {
        let name = self.name;
        let rec = self.record()?;
        let sock = self.host.opts.state_dir.events_socket(name);
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
            .filter(|_| vsock::backend_alive(rec.vsock_pid, &self.host.opts.state_dir, name));
        let dir = self.host.opts.state_dir.clone();
        let vm = name.to_string();
        let (qemu_pid, uuid) = (rec.pid, rec.machine_uuid.clone());
        let qmp_socket = self.host.opts.state_dir.qmp_socket(name);
        let mut ending: Option<Ending> = None;
        // Serial listeners QEMU cannot reconnect to itself: looked at once
        // a second too, and connected again when back (serial.rs).
        let mut serials: Vec<(u32, PathBuf)> = rec
            .config
            .serial_consoles
            .iter()
            .map(|c| (c.port, c.listener_path.clone()))
            .collect();
        let roots = self.host.opts.roots.clone();
        let resolve = move |p: &Path| roots.check_socket(p).ok();
        let console_log = format!("/dev/fdset/{}", launch::CONSOLE_LOG_FDSET);
        let serial_qmp = q.clone();
        let number = self
            .host
            .subscriptions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A newer subscription replaces an older one's entry whole.
        *self.followed() = Some(Followed {
            number,
            qmp: q.clone(),
            seen: None,
            unplugging: Vec::new(),
            epoch: 0,
        });
        let slot = self.slot();
        tokio::spawn(async move {
            // Owns the connection: it closes when QEMU ends or the
            // receiver is dropped, and commands stop using it then.
            let _conn = q;
            let _unhold = Unhold {
                slot: std::sync::Arc::clone(&slot),
                number,
            };
            let mut tick = tokio::time::interval(BACKEND_CHECK);
            loop {
                let due = ending.as_ref().map(|e| e.at);
                let got = tokio::select! {
                    got = rx.recv() => got,
                    () = async { tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await }, if due.is_some() => {
                        let Some(e) = ending.as_mut() else { continue };
                        if !super::machine::qemu_alive(qemu_pid, uuid.as_deref(), &qmp_socket) {
                            ending = None;
                            continue;
                        }
                        if e.backend_stopped {
                            tracing::warn!(vm = %vm, event = %e.event, "QEMU has not ended {:?} after its vsock backend was stopped; killed", ENDING_GRACE + ENDING_KILL);
                            if let Some(pid) = qemu_pid.and_then(|p| i32::try_from(p).ok()) {
                                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                            }
                            ending = None;
                        } else {
                            tracing::warn!(vm = %vm, event = %e.event, backend = %vsock::backend_state(backend), "QEMU has not ended {ENDING_GRACE:?} after the guest did: it waits for its vsock backend, which does not answer; the backend is stopped");
                            vsock::stop_backend(backend, &dir, &vm).await;
                            // Stopped on purpose: not a backend that died.
                            backend = None;
                            e.backend_stopped = true;
                            e.at = tokio::time::Instant::now() + ENDING_KILL;
                        }
                        continue;
                    }
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
                        slot.with_followed(number, Followed::stale);
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
                slot.with_followed(number, |f| {
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
                        // QEMU exits after these (-action panic=exit-failure,
                        // shutdown=poweroff), unless a vsock backend it
                        // waits for does not answer: watched until it has.
                        if matches!(e.name.as_str(), "GUEST_PANICKED" | "SHUTDOWN")
                            && ending.is_none()
                            && backend.is_some()
                        {
                            ending = Some(Ending {
                                event: e.name.clone(),
                                at: tokio::time::Instant::now() + ENDING_GRACE,
                                backend_stopped: false,
                            });
                        }
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
        self.seed_seen(number).await;
        Ok(Some(out))
    }

    /// Observes a VM just followed and keeps that as its standing
    /// observation, so a watcher's first edit costs only its QMP round trips.
    /// Taken after the subscription started, so no event is missed from it;
    /// kept only when nothing changed the VM while it was taken (no event,
    /// no dropped observation, the launch record the same file), since
    /// this runs beside the watcher's reconciles, not between them.
    pub(super) async fn seed_seen(&self, number: u64) {
        let epoch = |m: &Self| {
            m.followed()
                .as_ref()
                .filter(|f| f.number == number && f.seen.is_none())
                .map(|f| f.epoch)
        };
        let (Some(before), Some(stamp)) = (epoch(self), self.host.records.stamp(self.name)) else {
            return;
        };
        let Ok(vm) = self.observe_now().await else {
            return;
        };
        // A record written after this check has another stamp, which
        // `still_seen` compares: only events need checking under the lock.
        if !vm.state.is_live() || self.host.records.stamp(self.name) != Some(stamp) {
            return;
        }
        if let Some(f) = self.followed().as_mut()
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
}
