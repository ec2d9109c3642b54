//! HCS schema 2.x documents, for the subset uvmctl sends: names exactly as
//! in Microsoft's schema reference (`virtualization/api/hcs/Reference/
//! SchemaReference.md`), each type under the heading it is written from.
//! Absent optional fields are left out, as HCS reads a missing field as its
//! default. The emulator (`hcs-emulator/`) checks these documents against
//! its own statement of the schema, not against these types.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `Version`: the schema version a document is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Version {
    /// 2.
    pub major: u32,
    /// 1 (2 where a field of 2.2 is used).
    pub minor: u32,
}

/// `ComputeSystem`: the create document.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ComputeSystem {
    /// Who made it (uvmctl's systems are found by it).
    pub owner: String,
    /// Schema version.
    pub schema_version: Version,
    /// Whether closing the last handle terminates the system.
    pub should_terminate_on_last_handle_closed: bool,
    /// The VM.
    pub virtual_machine: VirtualMachine,
}

/// `VirtualMachine`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VirtualMachine {
    /// A guest reset stops the system instead of rebooting it.
    pub stop_on_reset: bool,
    /// Firmware and boot.
    pub chipset: Chipset,
    /// Memory and processors.
    pub compute_topology: ComputeTopology,
    /// Devices.
    pub devices: Devices,
    /// I/O limits of the VM's storage.
    #[serde(rename = "StorageQoS", skip_serializing_if = "Option::is_none")]
    pub storage_qos: Option<StorageQoS>,
    /// The saved state to restore instead of booting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_state: Option<RestoreState>,
}

/// `Chipset`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Chipset {
    /// UEFI firmware.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uefi: Option<Uefi>,
    /// A kernel booted directly (schema 2.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linux_kernel_direct: Option<LinuxKernelDirect>,
}

/// `Uefi`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Uefi {
    /// What it boots.
    pub boot_this: UefiBootEntry,
}

/// `UefiBootEntry`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct UefiBootEntry {
    /// `VmbFs`: a file of a host directory shared over VMBus.
    pub device_type: String,
    /// The file, relative to `VmbFsRootPath`.
    pub device_path: String,
    /// The host directory.
    pub vmb_fs_root_path: String,
    /// Arguments to the boot program.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub optional_data: String,
}

/// `LinuxKernelDirect`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct LinuxKernelDirect {
    /// The kernel.
    pub kernel_file_path: String,
    /// The initial ramdisk.
    #[serde(rename = "InitRdPath", skip_serializing_if = "Option::is_none")]
    pub init_rd_path: Option<String>,
    /// The kernel's command line.
    #[serde(rename = "KernelCmdLine", skip_serializing_if = "String::is_empty")]
    pub kernel_cmd_line: String,
}

/// `Topology` (the type of `VirtualMachine.ComputeTopology`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ComputeTopology {
    /// Memory.
    pub memory: VirtualMachineMemory,
    /// Processors.
    pub processor: VirtualMachineProcessor,
}

/// `VirtualMachine_Memory`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VirtualMachineMemory {
    /// Size.
    #[serde(rename = "SizeInMB")]
    pub size_in_mb: u64,
    /// Backed by host virtual memory (may be paged), not pinned.
    pub allow_overcommit: bool,
    /// Commit host memory as the guest touches it.
    #[serde(skip_serializing_if = "is_false")]
    pub enable_deferred_commit: bool,
    /// Hot hint.
    #[serde(skip_serializing_if = "is_false")]
    pub enable_hot_hint: bool,
    /// Cold hint.
    #[serde(skip_serializing_if = "is_false")]
    pub enable_cold_hint: bool,
    /// Cold discard hint.
    #[serde(skip_serializing_if = "is_false")]
    pub enable_cold_discard_hint: bool,
    /// MMIO gap below 4 GiB.
    #[serde(rename = "LowMmioGapInMB", skip_serializing_if = "Option::is_none")]
    pub low_mmio_gap_in_mb: Option<u64>,
    /// Where the MMIO gap above 4 GiB starts.
    #[serde(rename = "HighMmioBaseInMB", skip_serializing_if = "Option::is_none")]
    pub high_mmio_base_in_mb: Option<u64>,
    /// That gap's size.
    #[serde(rename = "HighMmioGapInMB", skip_serializing_if = "Option::is_none")]
    pub high_mmio_gap_in_mb: Option<u64>,
}

/// `VirtualMachine_Processor`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VirtualMachineProcessor {
    /// Virtual processors.
    pub count: u32,
    /// The CPU group it runs in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_group: Option<CpuGroup>,
}

/// `CpuGroup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CpuGroup {
    /// The group's GUID (all zeros: none).
    pub id: String,
}

/// `Devices`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Devices {
    /// Serial ports by number.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub com_ports: BTreeMap<String, ComPort>,
    /// SCSI controllers by number.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub scsi: BTreeMap<String, Scsi>,
    /// The VPMem controller.
    #[serde(rename = "VirtualPMem", skip_serializing_if = "Option::is_none")]
    pub virtual_pmem: Option<VirtualPMemController>,
    /// NICs by id.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub network_adapters: BTreeMap<String, NetworkAdapter>,
    /// Plan9 shares (Linux guests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan9: Option<Plan9>,
    /// VSMB shares (Windows guests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_smb: Option<VirtualSmb>,
    /// Assigned PCI devices by VMBus channel GUID.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub virtual_pci: BTreeMap<String, VirtualPciDevice>,
    /// Hyper-V sockets.
    #[serde(rename = "HvSocket", skip_serializing_if = "Option::is_none")]
    pub hv_socket: Option<HvSocket2>,
}

/// `ComPort`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ComPort {
    /// The host named pipe the port is relayed to.
    pub named_pipe: String,
}

/// `Scsi`: one controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Scsi {
    /// Disks by LUN.
    pub attachments: BTreeMap<String, Attachment>,
}

/// `Attachment`: a SCSI disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Attachment {
    /// `VirtualDisk` or `PassThru`.
    #[serde(rename = "Type")]
    pub attachment_type: String,
    /// The image or physical disk.
    pub path: String,
    /// Read-only.
    #[serde(skip_serializing_if = "is_false")]
    pub read_only: bool,
}

/// `VirtualPMemController`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VirtualPMemController {
    /// Devices by id.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, VirtualPMemDevice>,
    /// Device slots.
    pub maximum_count: u32,
    /// Largest device.
    pub maximum_size_bytes: u64,
}

/// `VirtualPMemDevice`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VirtualPMemDevice {
    /// The image.
    pub host_path: String,
    /// Read-only.
    #[serde(skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// `Vhd1` or `Vhdx`.
    pub image_format: String,
}

/// `NetworkAdapter`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkAdapter {
    /// The HNS endpoint.
    pub endpoint_id: String,
    /// MAC address.
    pub mac_address: String,
}

/// `Plan9`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Plan9 {
    /// Shares.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<Plan9Share>,
}

/// `Plan9Share`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Plan9Share {
    /// Share name.
    pub name: String,
    /// The name the guest mounts.
    pub access_name: String,
    /// Host directory (absent in a removal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// VSock port the share is served on.
    pub port: u32,
    /// `Plan9ShareFlags` bits (ReadOnly = 1, RestrictFileAccess = 0x80).
    #[serde(skip_serializing_if = "is_zero")]
    pub flags: u32,
    /// Only these files, with RestrictFileAccess.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_files: Vec<String>,
}

/// `VirtualSmb`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VirtualSmb {
    /// Shares.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<VirtualSmbShare>,
    /// Guest address space for directly mapped files.
    #[serde(rename = "DirectFileMappingInMB")]
    pub direct_file_mapping_in_mb: u64,
}

/// `VirtualSmbShare`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VirtualSmbShare {
    /// Share name.
    pub name: String,
    /// Host directory (absent in a removal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Only these files (with RestrictFileAccess).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_files: Vec<String>,
    /// Options (absent in a removal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<VirtualSmbShareOptions>,
}

/// `VirtualSmbShareOptions`: the options a spec can set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VirtualSmbShareOptions {
    /// Read-only.
    #[serde(skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// Use the host cache.
    #[serde(skip_serializing_if = "is_false")]
    pub cache_io: bool,
    /// Disable oplocks.
    #[serde(skip_serializing_if = "is_false")]
    pub no_oplocks: bool,
    /// Open with backup privilege.
    #[serde(skip_serializing_if = "is_false")]
    pub take_backup_privilege: bool,
    /// Do not map files into guest memory.
    #[serde(skip_serializing_if = "is_false")]
    pub no_directmap: bool,
    /// Only the allowed files.
    #[serde(skip_serializing_if = "is_false")]
    pub restrict_file_access: bool,
    /// Emulated oplocks.
    #[serde(skip_serializing_if = "is_false")]
    pub pseudo_oplocks: bool,
    /// Emulated directory notifications.
    #[serde(skip_serializing_if = "is_false")]
    pub pseudo_dirnotify: bool,
}

/// `VirtualPciDevice`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VirtualPciDevice {
    /// Its functions.
    pub functions: Vec<VirtualPciFunction>,
}

/// `VirtualPciFunction`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VirtualPciFunction {
    /// The host device's instance path.
    pub device_instance_path: String,
}

/// `VirtualMachine_HvSocket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct HvSocket2 {
    /// The system's socket configuration.
    #[serde(rename = "HvSocketConfig")]
    pub hv_socket_config: HvSocketSystemConfig,
}

/// `HvSocketSystemConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct HvSocketSystemConfig {
    /// Who may bind a service not in the table (SDDL).
    pub default_bind_security_descriptor: String,
    /// Services by GUID.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub service_table: BTreeMap<String, HvSocketServiceConfig>,
}

/// `HvSocketServiceConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct HvSocketServiceConfig {
    /// Who may bind it on the host (SDDL).
    pub bind_security_descriptor: String,
    /// Who may connect to it (SDDL).
    pub connect_security_descriptor: String,
    /// Whether a wildcard bind in the guest reaches it.
    pub allow_wildcard_binds: bool,
}

/// `StorageQoS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct StorageQoS {
    /// I/O operations per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iops_maximum: Option<u64>,
    /// Bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_maximum: Option<u64>,
}

/// `RestoreState`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RestoreState {
    /// The file a save wrote.
    pub save_state_file_path: String,
}

/// `SaveOptions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SaveOptions {
    /// `ToFile`.
    pub save_type: String,
    /// Where.
    pub save_state_file_path: String,
}

/// `ModifySettingRequest`: one live change.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ModifySettingRequest {
    /// What is changed.
    pub resource_path: String,
    /// `Add`, `Remove` or `Update`; absent for a value set in place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_type: Option<RequestType>,
    /// The new value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settings: Option<serde_json::Value>,
}

/// `ModifyRequestType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RequestType {
    /// A device or entry added.
    Add,
    /// Removed.
    Remove,
    /// Replaced.
    Update,
}

/// `System_PropertyQuery`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PropertyQuery {
    /// What to report besides the basics.
    pub property_types: Vec<String>,
}

/// `Properties` of a compute system, as far as uvmctl reads them (HCS
/// reports more; what is unknown here is ignored).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Properties {
    /// The id it was created with.
    pub id: String,
    /// Who made it.
    pub owner: String,
    /// `Created`, `Running`, `Paused`, `Stopped`, `SavedAsTemplate`.
    pub state: String,
    /// The VM's id (hvsocket addresses use it).
    pub runtime_id: String,
    /// How it exited, once stopped (`GracefulExit`, `ForcedExit`,
    /// `UnexpectedExit`, ...).
    pub exit_type: Option<String>,
    /// Statistics, when asked for.
    pub statistics: Option<Statistics>,
}

/// `Statistics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Statistics {
    /// Time since the start, in 100 ns units.
    #[serde(rename = "Uptime100ns")]
    pub uptime_100ns: u64,
    /// Processor time.
    pub processor: Option<ProcessorStats>,
    /// Memory.
    pub memory: Option<MemoryStats>,
}

/// `ProcessorStats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ProcessorStats {
    /// Total processor time, in 100 ns units.
    #[serde(rename = "TotalRuntime100ns")]
    pub total_runtime_100ns: u64,
}

/// `MemoryStats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MemoryStats {
    /// Committed memory.
    pub memory_usage_commit_bytes: u64,
    /// Private working set.
    pub memory_usage_private_working_set_bytes: u64,
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_false(b: &bool) -> bool {
    !*b
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(v: &u32) -> bool {
    *v == 0
}
