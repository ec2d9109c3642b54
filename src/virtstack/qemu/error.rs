//! What the QEMU virtstack's verbs fail with, and the timeouts and event
//! names they keep to.

use super::launch::LaunchError;
use super::qmp::QmpError;
use super::{guest, ops};
use crate::virtstack::records::RecordError;
use crate::vm::{State, VmError};
use std::time::Duration;

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
pub(super) const EVENTS_BUFFERED: usize = 64;
/// How often an event subscription looks at the VM's vsock backend.
pub(super) const BACKEND_CHECK: Duration = Duration::from_secs(1);
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
