//! The virtstack contract: what every virtstack (qemu, remotevm, hcs, the
//! fake) implements, and the only way the executor, the CLI, `watch` and
//! `serve` reach one.
//!
//! # What a virtstack must do
//! - [`Observe`]: name its VMs and report each from the virtstack itself
//!   (not from a cache of what uvmctl asked for), and state its
//!   [`Capabilities`] once: the planner, the executor and the wire all read
//!   that one truth.
//! - [`Virtstack`]: lifecycle verbs, and one change verb,
//!   [`Virtstack::change`], over the item model ([`Change`]): any device,
//!   resize or record-only setting is one `Add`, `Remove` or `Update` of an
//!   item, with what it replaces.
//!
//! # What it must guarantee
//! - A change is checked against the capabilities and the VM's state before
//!   anything happens; what is refused changes nothing.
//! - A change that succeeded is kept: a later stop and start (or restore)
//!   brings back what the VM has, and `observe` reports it.
//! - Errors keep their kind ([`VmError::kind`]): a VM or item that is not
//!   there is `NotFound`, a VM in the wrong state `WrongState` (with the
//!   state), what the capabilities do not offer `NotSupported`, what this VM
//!   cannot take as configured `Refused` (with the reason the plan gives),
//!   and only the virtstack's own failures `Backend`.
//! - One VM's failure or hang stays that VM's: no call on one VM waits on
//!   another's.
//! - `destroy` of a VM that is gone is `NotFound`, never a success that
//!   hides a typo; everything else a VM owns goes with it.
//!
//! hcsshim's manager vocabulary (`ScsiManager`, `AddSCSIDisk`, ...) maps onto
//! item kinds; `docs/virtstack.md` has the table.

use super::config::{Probe, VmConfig};
use super::health::{Answer, ProbeCursor};
use super::history::History;
use super::{Capabilities, Change, ObservedVm, VmError, VmName};
use async_trait::async_trait;

/// Result of virtstack calls.
pub type Result<T, E = VmError> = std::result::Result<T, E>;

/// Statistics of a running VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStats {
    /// Memory assigned to the guest, in bytes.
    pub assigned_memory_bytes: u64,
    /// Host memory the VM uses, in bytes.
    pub working_set_bytes: u64,
    /// Processor time the guest has used, in nanoseconds.
    pub total_runtime_ns: u64,
    /// Seconds since the VM was last started, where known.
    pub uptime_seconds: Option<u64>,
}

/// What every virtstack answers, mutable or not: the VMs it manages, their
/// state, and what it can do. A recording of a host (`plan --observed`)
/// implements only this.
#[async_trait]
pub trait Observe: Send + Sync {
    /// The virtstack's name (`qemu`, `remotevm`, `hcs`, ...).
    fn name(&self) -> &str;
    /// What the virtstack can do on this host: the matrix and the cold
    /// settings it refuses. The planner and the executor read the same data.
    fn capabilities(&self) -> &Capabilities;
    /// Names of the VMs this virtstack manages for uvmctl.
    async fn list(&self) -> Result<Vec<VmName>>;
    /// Full current state of one VM, read from the virtstack itself.
    ///
    /// # Errors
    /// Fails for this VM alone (hung or closed control channel, corrupt
    /// record, dead process); callers keep going with the others.
    async fn observe(&self, name: &VmName) -> Result<ObservedVm>;
}

/// Something a virtstack saw happen to a VM on its own: a reason to observe
/// it again, never a state by itself (events can be lost or reordered;
/// observation is the truth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The VM reported a change (QEMU: `SHUTDOWN`, `STOP`, `RESUME`,
    /// `DEVICE_DELETED`, ...), by the virtstack's name for it.
    Reported(String),
    /// The VM's control channel closed: its process ended, or the channel
    /// failed. The stream ends after this.
    Gone,
}

/// A VM's events, as [`Virtstack::events`] hands them out.
pub type VmEvents = tokio::sync::mpsc::Receiver<VmEvent>;

/// A virtstack that can create and change VMs: all the executor, `status`,
/// `export`, `wait`, `serve` and the pre-flight use. VMs are named by
/// [`VmName`], so nothing unchecked reaches a path.
#[async_trait]
pub trait Virtstack: Observe {
    /// Checks a whole configuration before anything changes: the cold
    /// settings [`Capabilities::refusals`] names, then every host path
    /// (allowed roots, image formats). Reads the host, changes nothing.
    fn preflight(&self, name: &VmName, config: &VmConfig) -> Result<()>;
    /// Creates a VM from a whole configuration, left `Created` (not started).
    async fn create(&self, name: &VmName, config: &VmConfig) -> Result<()>;
    /// Makes one change to a VM: a device added, removed or swapped live, a
    /// resize, or a setting only uvmctl's record holds (the spec policy),
    /// which needs no running VM. Kept at once, so a later start launches
    /// what the VM really has.
    ///
    /// # Errors
    /// `NotSupported` where the capabilities do not call the change live,
    /// `NotRunning` for a device change on a VM that does not run,
    /// `NoSuchItem` for a removal or update of what is not there, `Refused`
    /// where this VM cannot take it as configured.
    async fn change(&self, name: &VmName, change: &Change) -> Result<()>;
    /// Replaces the configuration a VM that does not run starts with next.
    async fn reconfigure(&self, name: &VmName, config: &VmConfig) -> Result<()>;
    /// Starts a VM that does not run (restoring a saved guest), running or paused.
    async fn start(&self, name: &VmName, paused: bool) -> Result<()>;
    /// Shuts a VM down (gracefully, then forced); a saved guest is discarded.
    async fn stop(&self, name: &VmName) -> Result<()>;
    /// Halts the guest.
    async fn pause(&self, name: &VmName) -> Result<()>;
    /// Continues a paused guest.
    async fn resume(&self, name: &VmName) -> Result<()>;
    /// Saves the guest's state so a later start restores it; nothing runs after.
    async fn save(&self, name: &VmName) -> Result<()>;
    /// Stops (if needed) and deletes a VM and all it owns.
    async fn destroy(&self, name: &VmName) -> Result<()>;
    /// Whether the guest has signalled it booted (uvmctl's agent port).
    async fn guest_ready(&self, name: &VmName) -> Result<bool>;
    /// Statistics of a running VM.
    async fn stats(&self, name: &VmName) -> Result<VmStats>;
    /// Waits until the VM stops, up to `timeout`; `false` when it still runs
    /// then. Why it stopped, `observe` says (`exit_error`); a VM destroyed
    /// meanwhile has stopped as asked.
    async fn wait(&self, name: &VmName, timeout: Option<std::time::Duration>) -> Result<bool>;
    /// The VM's events from now on, until its process ends (the last is
    /// then [`VmEvent::Gone`]); dropping the receiver unsubscribes. `None`
    /// when there is no event source for it (a virtstack without events,
    /// a VM that does not run): watchers then rely on periodic resync.
    async fn events(&self, name: &VmName) -> Result<Option<VmEvents>> {
        let _ = name;
        Ok(None)
    }
    /// Asks the guest one probe of its `spec.health`; a probe that does not
    /// pass is an [`Answer`], not an error. A `console` probe reads only what
    /// the guest wrote to COM1 past `cursor`, and moves it on.
    ///
    /// # Errors
    /// `Refused` for a kind the capabilities do not run (their reason);
    /// errors of the VM itself (unknown, no record).
    async fn probe(
        &self,
        name: &VmName,
        probe: &Probe,
        cursor: &mut ProbeCursor,
    ) -> Result<Answer> {
        let _ = cursor;
        Err(VmError::Refused {
            vm: name.to_string(),
            reason: self
                .capabilities()
                .probe_refused
                .get(&probe.kind)
                .cloned()
                .unwrap_or_else(|| format!("{} probes are not run here", probe.kind.as_str())),
        })
    }
    /// The configurations applied to the VM, as its record keeps them
    /// (empty for a VM none was recorded for yet).
    ///
    /// # Errors
    /// `NotFound` for a VM it does not have; a record it cannot read.
    async fn history(&self, name: &VmName) -> Result<History>;
    /// Replaces the history the VM's record keeps (the caller adds to what
    /// [`Virtstack::history`] gave; one VM's history has one writer at a
    /// time, its reconcile).
    async fn keep_history(&self, name: &VmName, history: &History) -> Result<()>;
    /// Lets go of what is held open for a VM between operations (QEMU's
    /// control socket serves one client at a time), so another uvmctl
    /// process can drive it; reconnects on next use.
    async fn release(&self, name: &VmName) {
        let _ = name;
    }
}
