//! What this process keeps for each VM between calls, one slot per VM: its
//! QMP connection, and what a subscription to its events keeps. The
//! registry (`Qemu`, host.rs) holds the slots; a VM's handle
//! (`Machine`, machine.rs) is the only way to them.

use super::qmp::Qmp;
use crate::virtstack::records::FileStamp;
use crate::vm::ObservedVm;
use std::sync::Mutex;
use std::time::Duration;

/// What this process keeps for one VM between calls.
#[derive(Debug, Default)]
pub struct VmSlot {
    /// Its QMP connection, while its QEMU runs: a `-qmp` socket serves one
    /// client at a time, so a second connect would wait at the greeting.
    pub(super) conn: Mutex<Option<Qmp>>,
    /// What a subscription to its events keeps (a watcher), while one runs.
    pub(super) followed: Mutex<Option<Followed>>,
    /// The listener for its guest's `READY=1` in the launch this process
    /// made (notify.rs), until it is heard.
    pub(super) notify: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for VmSlot {
    fn drop(&mut self) {
        let notify = self.notify.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(task) = notify.take() {
            task.abort();
        }
    }
}

/// A VM whose events this process follows. Made when a subscription
/// starts, dropped with it (or when the VM's QEMU is gone or replaced), so
/// nothing of it outlives what keeps it current.
#[derive(Debug)]
pub(super) struct Followed {
    /// The subscription's number.
    pub(super) number: u64,
    /// The events connection: commands go over it too, so a watcher's
    /// reconcile neither connects nor greets, and the main QMP socket stays
    /// free for another uvmctl between reconciles.
    pub(super) qmp: Qmp,
    /// The last observation, while it stands (see [`Seen`]).
    pub(super) seen: Option<Seen>,
    /// Devices this process is unplugging, marked when: their
    /// `DEVICE_DELETED` is its own change's echo, which the change itself
    /// accounts for in the standing observation.
    pub(super) unplugging: Vec<(String, std::time::Instant)>,
    /// Counts what may have changed the VM (events, dropped observations),
    /// so an observation taken meanwhile is known to be stale.
    pub(super) epoch: u64,
}

/// How long an unplug's mark waits for its echo: a device that was already
/// gone sends none, and a later `DEVICE_DELETED` of the same id is news.
pub(super) const ECHO_WAIT: Duration = Duration::from_secs(5);

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
pub(super) struct Seen {
    pub(super) at: std::time::Instant,
    pub(super) stamp: FileStamp,
    pub(super) vm: ObservedVm,
}

impl Followed {
    /// The VM may be other than last seen: its observation goes.
    pub(super) fn stale(&mut self) {
        self.seen = None;
        self.epoch += 1;
    }
}

impl VmSlot {
    /// Runs `f` on what subscription `number` keeps, if it is still the one
    /// following (a newer subscription's is not this one's).
    pub(super) fn with_followed(&self, number: u64, f: impl FnOnce(&mut Followed)) {
        let mut followed = self.followed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = followed.as_mut().filter(|e| e.number == number) {
            f(entry);
        }
    }

    /// Subscription `number` ended: what it kept goes, unless a newer one
    /// replaced it.
    pub(super) fn unfollow(&self, number: u64) {
        let mut followed = self.followed.lock().unwrap_or_else(|p| p.into_inner());
        if followed.as_ref().is_some_and(|f| f.number == number) {
            *followed = None;
        }
    }
}
