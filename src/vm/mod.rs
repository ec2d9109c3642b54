//! The VM abstraction, after hcsshim's `internal/vm` package: what a virtstack
//! is asked to do, in words every layer shares. No I/O lives here.

pub mod caps;
pub mod config;
pub mod health;
pub mod history;
pub mod items;
mod name;
pub mod observed;
mod traits;

pub use caps::{Capabilities, ColdSetting, HostFacts, Refusal, SaveBlocker, Support};
pub use name::{InvalidVmName, MAX_VM_NAME, VmName};
pub use observed::{MemoryHotplug, ObservedState, ObservedVm};

pub use items::Change;
pub use traits::{Observe, Virtstack, VmEvent, VmEvents, VmStats};

use serde::{Deserialize, Serialize};
use std::fmt;

/// The virtstacks uvmctl drives: the one list. Adding a virtstack is its
/// module, a variant here (the compiler then asks for it where the kinds
/// are matched: opening, the capability profile), and the conformance
/// suite passing (docs/virtstack.md).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum VirtstackKind {
    /// A QEMU per VM, over QMP (the default on Linux).
    #[default]
    Qemu,
    /// One vmservice server per VM (hcsshim's RemoteVM protocol).
    RemoteVm,
    /// The simulator: VMs as records only, with qemu's rules.
    Sim,
    /// HCS compute systems through computecore.dll (Windows; elsewhere the
    /// emulator, for tests).
    Hcs,
}

impl VirtstackKind {
    /// What this platform runs VMs with when nobody says: hcs on Windows,
    /// qemu elsewhere.
    pub fn native() -> Self {
        if cfg!(windows) {
            VirtstackKind::Hcs
        } else {
            VirtstackKind::Qemu
        }
    }

    /// Every kind, in the order help lists them.
    pub const ALL: [VirtstackKind; 4] = [
        VirtstackKind::Qemu,
        VirtstackKind::RemoteVm,
        VirtstackKind::Sim,
        VirtstackKind::Hcs,
    ];

    /// Its name on the command line, in config files and in output.
    pub const fn as_str(self) -> &'static str {
        match self {
            VirtstackKind::Qemu => "qemu",
            VirtstackKind::RemoteVm => "remotevm",
            VirtstackKind::Sim => "sim",
            VirtstackKind::Hcs => "hcs",
        }
    }

    /// The names, for help and errors: `qemu, remotevm, sim, hcs`.
    pub fn names() -> String {
        VirtstackKind::ALL.map(VirtstackKind::as_str).join(", ")
    }
}

impl fmt::Display for VirtstackKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no virtstack's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown virtstack {0:?} (known: {names})", names = VirtstackKind::names())]
pub struct UnknownVirtstack(pub String);

impl std::str::FromStr for VirtstackKind {
    type Err = UnknownVirtstack;
    fn from_str(s: &str) -> Result<Self, UnknownVirtstack> {
        VirtstackKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownVirtstack(s.chars().take(64).collect()))
    }
}

/// Name of the HCS virtstack (Windows).
pub const HCS: &str = VirtstackKind::Hcs.as_str();
/// Name of the remote vmservice virtstack.
pub const REMOTE_VM: &str = VirtstackKind::RemoteVm.as_str();
/// Name of the QEMU virtstack.
pub const QEMU: &str = VirtstackKind::Qemu.as_str();

/// A resource a virtstack may be asked about through `Supported(resource, operation)`.
///
/// The first seven mirror hcsshim; `Memory` and `Processor` cover resizing, and
/// the rest are the other things uvmctl manages on a VM, so every change the
/// planner makes has one question to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Resource {
    /// Virtual persistent memory devices.
    #[serde(rename = "vpmem")]
    VPMem,
    /// SCSI disks.
    Scsi,
    /// Network adapters.
    Network,
    /// Virtual SMB shares (Windows hosts).
    Vsmb,
    /// Assigned PCI devices.
    Pci,
    /// Plan9 file shares.
    Plan9,
    /// Windows CPU group membership.
    CpuGroup,
    /// Memory size.
    Memory,
    /// Processor count.
    Processor,
    /// SCSI controllers (uvmctl extension).
    ScsiController,
    /// Serial consoles (uvmctl extension).
    Serial,
    /// Storage QoS limits (uvmctl extension).
    StorageQos,
    /// vsock listeners (uvmctl extension).
    #[serde(rename = "vsock")]
    VmSocket,
    /// HvSocket listeners (uvmctl extension).
    #[serde(rename = "hvsocket")]
    HvSocket,
}

impl Resource {
    /// Every resource, in a stable order.
    pub const ALL: [Resource; 14] = [
        Resource::VPMem,
        Resource::Scsi,
        Resource::Network,
        Resource::Vsmb,
        Resource::Pci,
        Resource::Plan9,
        Resource::CpuGroup,
        Resource::Memory,
        Resource::Processor,
        Resource::ScsiController,
        Resource::Serial,
        Resource::StorageQos,
        Resource::VmSocket,
        Resource::HvSocket,
    ];

    /// The camelCase name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::VPMem => "vpmem",
            Resource::Scsi => "scsi",
            Resource::Network => "network",
            Resource::Vsmb => "vsmb",
            Resource::Pci => "pci",
            Resource::Plan9 => "plan9",
            Resource::CpuGroup => "cpuGroup",
            Resource::Memory => "memory",
            Resource::Processor => "processor",
            Resource::ScsiController => "scsiController",
            Resource::Serial => "serial",
            Resource::StorageQos => "storageQos",
            Resource::VmSocket => "vsock",
            Resource::HvSocket => "hvsocket",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of change asked of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ResourceOperation {
    /// Attach or create.
    Add,
    /// Detach or delete.
    Remove,
    /// Change in place.
    Update,
}

impl ResourceOperation {
    /// Every operation, in a stable order.
    pub const ALL: [ResourceOperation; 3] = [
        ResourceOperation::Add,
        ResourceOperation::Remove,
        ResourceOperation::Update,
    ];

    /// Lowercase name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceOperation::Add => "add",
            ResourceOperation::Remove => "remove",
            ResourceOperation::Update => "update",
        }
    }
}

impl fmt::Display for ResourceOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lifecycle state of a utility VM; the source of truth for what may be done to it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum State {
    /// Being configured; nothing exists in the virtstack yet.
    PreCreated,
    /// Exists with its configuration, not started.
    Created,
    /// Running its guest.
    Running,
    /// Guest halted, devices suspended.
    Paused,
    /// Shut down or exited.
    Terminated,
    /// Its guest state is saved to a file and nothing runs; starting it
    /// restores the guest where it was (a uvmctl extension of hcsshim's states).
    Saved,
}

impl State {
    /// Whether a guest is executing or suspended in memory (devices attached live).
    pub fn is_live(self) -> bool {
        matches!(self, State::Running | State::Paused)
    }

    /// The word `status` shows: the spec's `stopped` for a VM stopped as
    /// asked; `terminated` stays for one that exited on its own.
    pub fn shown(self) -> &'static str {
        match self {
            State::Created => "stopped",
            s => s.as_str(),
        }
    }

    /// Lowercase name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            State::PreCreated => "preCreated",
            State::Created => "created",
            State::Running => "running",
            State::Paused => "paused",
            State::Terminated => "terminated",
            State::Saved => "saved",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Guest operating system of a utility VM.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum GuestOs {
    /// A Linux guest.
    #[default]
    Linux,
    /// A Windows guest.
    Windows,
}

impl GuestOs {
    /// Lowercase name used in specs and output.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestOs::Linux => "linux",
            GuestOs::Windows => "windows",
        }
    }
}

impl std::str::FromStr for GuestOs {
    type Err = VmError;
    fn from_str(s: &str) -> Result<Self, VmError> {
        match s {
            "linux" => Ok(GuestOs::Linux),
            "windows" => Ok(GuestOs::Windows),
            other => Err(VmError::UnknownGuestOs(other.to_string())),
        }
    }
}

/// Disk type of a SCSI attachment: a VHD, a VHDX, or a host file/device passed through raw.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
pub enum ScsiDiskType {
    /// VHD (version 1) image.
    #[serde(rename = "vhd1")]
    Vhd1,
    /// VHDX image.
    #[serde(rename = "vhdx")]
    Vhdx,
    /// Raw file or block device, passed through.
    #[serde(rename = "passthrough")]
    PassThrough,
}

/// Image format of a virtual pmem device.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
pub enum VPMemImageFormat {
    /// VHD (version 1) image.
    #[serde(rename = "vhd1")]
    #[default]
    Vhd1,
    /// VHDX image.
    #[serde(rename = "vhdx")]
    Vhdx,
}

/// What backs guest memory on the host.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum MemoryBackingType {
    /// Pageable host virtual memory.
    #[default]
    Virtual,
    /// Pinned host physical memory.
    Physical,
}

/// Memory options beyond size, after hcsshim's `MemoryConfig`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MemoryConfig {
    /// Backing type.
    pub backing_type: MemoryBackingType,
    /// Commit host memory only when the guest touches it.
    pub deferred_commit: bool,
    /// Hint that memory is hot.
    pub hot_hint: bool,
    /// Hint that memory is cold.
    pub cold_hint: bool,
    /// Hint that cold memory may be discarded.
    pub cold_discard_hint: bool,
}

/// Options of a virtual SMB share, after hcsshim's `VSMBOptions`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsmbOptions {
    /// Share is read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// Use the host cache for I/O.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cache_io: bool,
    /// Do not map files directly into guest memory.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_direct_map: bool,
    /// Emulate oplocks.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pseudo_oplocks: bool,
    /// Open files with backup privilege.
    #[serde(default, skip_serializing_if = "is_false")]
    pub take_backup_privilege: bool,
    /// Disable oplocks.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_oplocks: bool,
    /// Emulate directory change notifications.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pseudo_dirnotify: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)]
pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

/// Transport of a VM socket listener.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum VMSocketType {
    /// Hyper-V socket, addressed by a service GUID.
    #[serde(rename = "hvsocket")]
    HvSocket,
    /// virtio vsock, addressed by a port.
    #[serde(rename = "vsock")]
    VSock,
}

/// How disruptive one change is to a running VM, least first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Disruption {
    /// The running VM does it (`Supported` says yes); the guest keeps running.
    Live,
    /// The VM is stopped and started again with the new cold configuration; disks keep their data.
    Restart,
    /// The VM is destroyed and built again from its spec.
    Recreate,
    /// This virtstack cannot do it at all.
    Unsupported,
}

impl Disruption {
    /// Lowercase name used in output and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Disruption::Live => "live",
            Disruption::Restart => "restart",
            Disruption::Recreate => "recreate",
            Disruption::Unsupported => "unsupported",
        }
    }
}

impl fmt::Display for Disruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `e` and every error below it, joined with `: `: for errors shown on one
/// line (progress, status, outcomes). Messages never inline their source,
/// so each cause appears once.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

/// The kind of a [`VmError`], kept end to end: the executor, `serve` (which
/// maps it to a ttrpc code) and the remotevm client (which maps the code
/// back) all read it, never the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The VM, or the item a change names, does not exist.
    NotFound,
    /// The VM is not in a state the call needs (it does not run, or it runs).
    WrongState,
    /// The virtstack cannot do this at all (its capabilities say so).
    NotSupported,
    /// This VM, as it is configured, cannot take this change now; the plan
    /// would call it a restart (the reason says why).
    Refused,
    /// The request itself is malformed (a name, a guest OS).
    Invalid,
    /// The virtstack failed for its own reasons.
    Backend,
}

/// Errors a virtstack reports. Each says what and where, and has a
/// [`VmError::kind`] that survives the wire.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The virtstack cannot do this (its capabilities say why).
    #[error("{operation} {resource} is not supported: {reason}")]
    NotSupported {
        /// The resource asked about.
        resource: Resource,
        /// The operation asked for.
        operation: ResourceOperation,
        /// Why, as the capabilities say it.
        reason: String,
    },
    /// The guest OS string is not one we know.
    #[error("unknown guest operating system {0:?} (expected linux or windows)")]
    UnknownGuestOs(String),
    /// The VM is not known to this virtstack.
    #[error("VM {0} not found: no VM of that name is managed in this state directory")]
    NotFound(String),
    /// The item a change removes or updates is not on the VM.
    #[error("VM {vm}: no {item}")]
    NoSuchItem {
        /// VM name.
        vm: String,
        /// The item, as the plan names it.
        item: String,
    },
    /// The call needs a running (or paused) VM.
    #[error("VM {vm} does not run (it is {state})")]
    NotRunning {
        /// VM name.
        vm: String,
        /// The state it is in.
        state: State,
    },
    /// The call needs a VM in another state than the one it is in.
    #[error("VM {vm} is {state}: {need}")]
    WrongState {
        /// VM name.
        vm: String,
        /// The state it is in.
        state: State,
        /// What the call needs.
        need: String,
    },
    /// A cold setting the virtstack refuses, found before anything changed.
    #[error("{0}")]
    Cold(Refusal),
    /// This VM cannot take the change as it is configured (the plan calls
    /// it a restart, for this reason).
    #[error("VM {vm}: {reason}")]
    Refused {
        /// VM name.
        vm: String,
        /// Why, as the plan would say it.
        reason: String,
    },
    /// The VM could not be named.
    #[error(transparent)]
    Name(#[from] InvalidVmName),
    /// The virtstack failed for its own reasons (its error says what and where).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

impl VmError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            VmError::NotFound(_) | VmError::NoSuchItem { .. } => ErrorKind::NotFound,
            VmError::NotRunning { .. } | VmError::WrongState { .. } => ErrorKind::WrongState,
            VmError::NotSupported { .. } | VmError::Cold(_) => ErrorKind::NotSupported,
            VmError::Refused { .. } => ErrorKind::Refused,
            VmError::UnknownGuestOs(_) | VmError::Name(_) => ErrorKind::Invalid,
            VmError::Backend(_) => ErrorKind::Backend,
        }
    }

    /// `resource`/`operation` is not supported, for the reason `caps` give.
    pub fn not_supported(
        caps: &Capabilities,
        resource: Resource,
        operation: ResourceOperation,
    ) -> Self {
        VmError::NotSupported {
            resource,
            operation,
            reason: caps.support(resource, operation).reason,
        }
    }

    /// A failure of the virtstack's own, said in words.
    pub fn backend(what: impl Into<String>) -> Self {
        VmError::Backend(what.into().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_os_parses_known_names_and_refuses_others() {
        assert_eq!("linux".parse::<GuestOs>().ok(), Some(GuestOs::Linux));
        assert_eq!("windows".parse::<GuestOs>().ok(), Some(GuestOs::Windows));
        let err = "plan9os".parse::<GuestOs>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("unknown guest operating system \"plan9os\" (expected linux or windows)")
        );
    }

    #[test]
    fn resources_serialize_under_the_names_output_uses() {
        for r in Resource::ALL {
            assert_eq!(
                serde_json::to_value(r).ok(),
                Some(serde_json::Value::String(r.as_str().into()))
            );
        }
    }

    #[test]
    fn only_running_and_paused_are_live() {
        let live: Vec<State> = [
            State::PreCreated,
            State::Created,
            State::Running,
            State::Paused,
            State::Terminated,
        ]
        .into_iter()
        .filter(|s| s.is_live())
        .collect();
        assert_eq!(live, vec![State::Running, State::Paused]);
    }
}
