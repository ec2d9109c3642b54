//! The traits a virtstack implements, after hcsshim's `UVMBuilder`, `UVM` and
//! its managers.
//!
//! Go discovers optional managers by type assertion; here a builder or a UVM
//! hands them out through `Option`-returning accessors, so a virtstack that
//! lacks one says so in the type system and callers need no downcasts. Cold
//! configuration (the builder's managers) is synchronous and takes `&mut self`;
//! work on a live VM is async and takes `&self`, since a running VM is shared
//! between the executor, `watch` and event handlers.

use super::config::{Policy, VmConfig};
use super::{Capabilities, ObservedVm, VmName};
use super::{
    GuestOs, MemoryConfig, Resource, ResourceOperation, ScsiDiskType, State, VMSocketType,
    VPMemImageFormat, VmError, VsmbOptions,
};
use async_trait::async_trait;
use std::path::Path;

/// Result of virtstack calls.
pub type Result<T, E = VmError> = std::result::Result<T, E>;

/// Boot configuration of a VM being built.
pub trait BootManager {
    /// Boots from UEFI firmware: boot files in `dir`, EFI application at `path`, optional `args`.
    fn set_uefi_boot(&mut self, dir: &Path, path: &str, args: &str) -> Result<()>;
    /// Boots a Linux kernel directly.
    fn set_linux_kernel_direct_boot(
        &mut self,
        kernel: &Path,
        initrd: &Path,
        cmdline: &str,
    ) -> Result<()>;
}

/// Memory configuration of a VM being built.
pub trait MemoryManager {
    /// Memory assigned to the VM, in MB.
    fn set_memory_limit(&mut self, memory_mb: u64) -> Result<()>;
    /// Backing type and hints.
    fn set_memory_config(&mut self, config: &MemoryConfig) -> Result<()>;
    /// Memory-mapped I/O gaps.
    fn set_mmio_config(
        &mut self,
        low_gap_mb: u64,
        high_base_mb: u64,
        high_gap_mb: u64,
    ) -> Result<()>;
}

/// Processor configuration of a VM being built.
pub trait ProcessorManager {
    /// Number of virtual processors.
    fn set_processor_count(&mut self, count: u32) -> Result<()>;
}

/// Serial consoles of a VM being built.
pub trait SerialManager {
    /// Relays serial port `port` to the listener at `listener_path`.
    fn set_serial_console(&mut self, port: u32, listener_path: &Path) -> Result<()>;
}

/// Storage limits of a VM being built.
pub trait StorageQosManager {
    /// Caps I/O operations per second and bytes per second (0 = unlimited).
    fn set_storage_qos(&mut self, iops_maximum: u64, bandwidth_maximum: u64) -> Result<()>;
}

/// Windows-host options of a VM being built.
pub trait WindowsConfigManager {
    /// Places the VM in a CPU group.
    fn set_cpu_group(&mut self, id: &str) -> Result<()>;
}

/// Linux-host options of a VM being built (none yet, as in hcsshim).
pub trait LinuxConfigManager {}

/// SCSI controllers and disks.
#[async_trait]
pub trait ScsiManager: Send + Sync {
    /// Adds a SCSI controller.
    async fn add_scsi_controller(&self, id: u32) -> Result<()>;
    /// Removes a SCSI controller (its disks must be gone first).
    async fn remove_scsi_controller(&self, id: u32) -> Result<()>;
    /// Attaches a disk at `controller`/`lun`.
    async fn add_scsi_disk(
        &self,
        controller: u32,
        lun: u32,
        path: &Path,
        typ: ScsiDiskType,
        read_only: bool,
    ) -> Result<()>;
    /// Detaches the disk at `controller`/`lun`.
    async fn remove_scsi_disk(&self, controller: u32, lun: u32, path: &Path) -> Result<()>;
}

/// Virtual persistent memory devices.
#[async_trait]
pub trait VpmemManager: Send + Sync {
    /// Adds a device in slot `id`.
    async fn add_vpmem_device(
        &self,
        id: u32,
        path: &Path,
        read_only: bool,
        format: VPMemImageFormat,
    ) -> Result<()>;
    /// Removes the device in slot `id`.
    async fn remove_vpmem_device(&self, id: u32, path: &Path) -> Result<()>;
}

/// Network adapters.
#[async_trait]
pub trait NetworkManager: Send + Sync {
    /// Adds a NIC (`nic_id` is a GUID) attached to `endpoint_id` with `mac`.
    async fn add_nic(&self, nic_id: &str, endpoint_id: &str, mac: &str) -> Result<()>;
    /// Removes a NIC.
    async fn remove_nic(&self, nic_id: &str, endpoint_id: &str, mac: &str) -> Result<()>;
}

/// Plan9 shares.
#[async_trait]
pub trait Plan9Manager: Send + Sync {
    /// Shares `path` as `name`; hcsshim passes read-only as a flag bit, the
    /// spec has a field of its own.
    #[allow(clippy::too_many_arguments)]
    async fn add_plan9(
        &self,
        path: &Path,
        name: &str,
        port: u32,
        flags: u32,
        allowed: &[String],
        read_only: bool,
    ) -> Result<()>;
    /// Removes the share `name`.
    async fn remove_plan9(&self, name: &str, port: u32) -> Result<()>;
}

/// Virtual SMB shares.
#[async_trait]
pub trait VsmbManager: Send + Sync {
    /// Shares `host_path` as `name`.
    async fn add_vsmb(
        &self,
        host_path: &Path,
        name: &str,
        allowed_files: &[String],
        options: &VsmbOptions,
    ) -> Result<()>;
    /// Removes the share `name`.
    async fn remove_vsmb(&self, name: &str) -> Result<()>;
}

/// Assigned PCI devices.
#[async_trait]
pub trait PciManager: Send + Sync {
    /// Assigns the host device `instance_id`.
    async fn add_device(&self, instance_id: &str, vmbus_guid: &str) -> Result<()>;
    /// Unassigns the host device `instance_id`.
    async fn remove_device(&self, instance_id: &str, vmbus_guid: &str) -> Result<()>;
}

/// Hypervisor sockets (HvSocket, vsock).
#[async_trait]
pub trait VMSocketManager: Send + Sync {
    /// Relays guest connections on `conn_id` (a GUID for HvSocket, a port for
    /// vsock) to a unix listener at `listener_path`.
    async fn vm_socket_listen(
        &self,
        socket_type: VMSocketType,
        conn_id: &str,
        listener_path: &Path,
    ) -> Result<()>;
    /// Stops relaying `conn_id`.
    async fn vm_socket_close(&self, socket_type: VMSocketType, conn_id: &str) -> Result<()>;
}

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

/// A VM being configured before it exists (hcsshim's `UVMBuilder`).
#[async_trait]
pub trait UvmBuilder: Send {
    /// Guest OS this builder targets.
    fn guest_os(&self) -> GuestOs;
    /// Boot configuration.
    fn boot(&mut self) -> &mut dyn BootManager;
    /// Memory configuration.
    fn memory(&mut self) -> &mut dyn MemoryManager;
    /// Processor configuration.
    fn processor(&mut self) -> &mut dyn ProcessorManager;
    /// Serial consoles, if the virtstack relays them.
    fn serial(&mut self) -> Option<&mut dyn SerialManager>;
    /// Storage QoS, if supported.
    fn storage_qos(&mut self) -> Option<&mut dyn StorageQosManager>;
    /// Windows-host options, on Windows hosts.
    fn windows(&mut self) -> Option<&mut dyn WindowsConfigManager>;
    /// Linux-host options, on Linux hosts.
    fn linux(&mut self) -> Option<&mut dyn LinuxConfigManager>;
    /// Sets the VPMem controller: how many devices and how large each may be.
    fn add_vpmem_controller(&mut self, maximum_devices: u32, maximum_size_bytes: u64)
    -> Result<()>;
    /// Creates the VM from its cold configuration; it is left in `Created` state.
    async fn create(self: Box<Self>) -> Result<Box<dyn Uvm>>;
}

/// A utility VM with a lifecycle (hcsshim's `UVM`).
#[async_trait]
pub trait Uvm: Send + Sync {
    /// The VM's name.
    fn id(&self) -> &str;
    /// Current lifecycle state.
    async fn state(&self) -> Result<State>;
    /// Powers on the VM and boots the guest.
    async fn start(&self) -> Result<()>;
    /// Shuts the VM down; it ends `Terminated`.
    async fn stop(&self) -> Result<()>;
    /// Halts the guest and suspends devices.
    async fn pause(&self) -> Result<()>;
    /// Continues a paused VM.
    async fn resume(&self) -> Result<()>;
    /// Snapshots a paused VM so it can be restored later.
    async fn save(&self) -> Result<()>;
    /// Waits for the VM to shut down or terminate.
    async fn wait(&self) -> Result<()>;
    /// Memory and processor statistics.
    async fn stats(&self) -> Result<VmStats>;
    /// Whether the running VM can do `operation` on `resource`.
    fn supported(&self, resource: Resource, operation: ResourceOperation) -> bool;
    /// Why the VM exited, if it exited unexpectedly.
    fn exit_error(&self) -> Option<String>;
    /// SCSI manager, if supported.
    fn scsi(&self) -> Option<&dyn ScsiManager>;
    /// VPMem manager, if supported.
    fn vpmem(&self) -> Option<&dyn VpmemManager>;
    /// Network manager, if supported.
    fn network(&self) -> Option<&dyn NetworkManager>;
    /// Plan9 manager, if supported.
    fn plan9(&self) -> Option<&dyn Plan9Manager>;
    /// VSMB manager, if supported.
    fn vsmb(&self) -> Option<&dyn VsmbManager>;
    /// PCI manager, if supported.
    fn pci(&self) -> Option<&dyn PciManager>;
    /// VM socket manager, if supported.
    fn vm_socket(&self) -> Option<&dyn VMSocketManager>;
    /// Resizes processors on the live VM.
    async fn set_processor_count(&self, count: u32) -> Result<()>;
    /// Resizes memory on the live VM.
    async fn set_memory_size(&self, memory_mb: u64) -> Result<()>;
    /// Changes storage limits on the live VM.
    async fn set_storage_qos(&self, iops_maximum: u64, bandwidth_maximum: u64) -> Result<()>;
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
/// `export`, `wait` and the pre-flight use. VMs are named by [`VmName`], so
/// nothing unchecked reaches a path.
///
/// Live device changes go through [`Uvm`] and its managers ([`Virtstack::open`]);
/// lifecycle and cold configuration through the methods here.
#[async_trait]
pub trait Virtstack: Observe {
    /// A builder for a new VM named `name`.
    fn builder(&self, name: &VmName, guest_os: GuestOs) -> Result<Box<dyn UvmBuilder>>;
    /// Checks a whole configuration before anything changes: the cold
    /// settings [`Capabilities::refusals`] names, then every host path
    /// (allowed roots, image formats). Reads the host, changes nothing.
    fn preflight(&self, name: &VmName, config: &VmConfig) -> Result<()>;
    /// Creates a VM from a whole configuration, left `Created` (not started).
    async fn create(&self, name: &VmName, config: &VmConfig) -> Result<()>;
    /// Opens an existing VM for live changes.
    async fn open(&self, name: &VmName) -> Result<Box<dyn Uvm>>;
    /// Replaces the configuration a VM that does not run starts with next.
    async fn reconfigure(&self, name: &VmName, config: &VmConfig) -> Result<()>;
    /// Records the spec policy the VM was last applied with (read back by
    /// `observe`: prune protection); the VM itself is not touched.
    async fn set_policy(&self, name: &VmName, policy: &Policy) -> Result<()>;
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
    /// Waits until the VM stops, up to `timeout`; `false` when it still runs then.
    async fn wait(&self, name: &VmName, timeout: Option<std::time::Duration>) -> Result<bool>;
    /// Why the VM exited, when it exited without being asked to.
    async fn exit_error(&self, name: &VmName) -> Option<String>;
    /// The VM's events from now on, until its process ends (the last is
    /// then [`VmEvent::Gone`]); dropping the receiver unsubscribes. `None`
    /// when there is no event source for it (a virtstack without events,
    /// a VM that does not run): watchers then rely on periodic resync.
    async fn events(&self, name: &VmName) -> Result<Option<VmEvents>> {
        let _ = name;
        Ok(None)
    }
    /// Lets go of what is held open for a VM between operations (QEMU's
    /// control socket serves one client at a time), so another uvmctl
    /// process can drive it; reconnects on next use.
    async fn release(&self, name: &VmName) {
        let _ = name;
    }
}
