//! The YAML shape of a spec document. The same shape is what `export` writes
//! and what `plan --observed` reads, so one model serves desired and observed.
//!
//! Every struct denies unknown fields: a typo is an error, never a silent
//! default. Optional fields with a default are left out when serialized, so the
//! canonical YAML of a VM is short and diffs well.

use super::{
    GuestOs, MemoryBackingType, ScsiDiskType, VMSocketType, VPMemImageFormat, VsmbOptions, is_false,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `apiVersion` every document carries.
pub const API_VERSION: &str = "uvmctl.dev/v1alpha1";
/// `kind` of a VM document.
pub const KIND: &str = "UtilityVM";

/// String fields take YAML strings only: serde_yaml would otherwise read
/// `name: 123` or `cmdline: true` as the text written, while the JSON Schema
/// (and an editor, and Kubernetes) sees a number or a boolean there.
mod strict {
    use serde::Deserializer;
    use serde::de::{Error, SeqAccess, Visitor};
    use std::fmt;

    struct Str;

    impl<'de> Visitor<'de> for Str {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string (quote a value that reads as a number or a boolean)")
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_string<E: Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
    }

    pub(super) fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_any(Str)
    }

    struct OptStr;

    impl<'de> Visitor<'de> for OptStr {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            Str.expecting(f)
        }
        fn visit_unit<E: Error>(self) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_none<E: Error>(self) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
            string(d).map(Some)
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<Option<String>, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_string<E: Error>(self, v: String) -> Result<Option<String>, E> {
            Ok(Some(v))
        }
    }

    pub(super) fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(OptStr)
    }

    struct List;

    impl<'de> Visitor<'de> for List {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of strings")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(Item(s)) = seq.next_element()? {
                out.push(s);
            }
            Ok(out)
        }
    }

    struct Item(String);

    impl<'de> serde::Deserialize<'de> for Item {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            string(d).map(Item)
        }
    }

    pub(super) fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_seq(List)
    }

    struct Labels;

    impl<'de> Visitor<'de> for Labels {
        type Value = std::collections::BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a mapping of label names to strings")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = std::collections::BTreeMap::new();
            while let Some((k, Item(v))) = map.next_entry::<String, Item>()? {
                out.insert(k, v);
            }
            Ok(out)
        }
    }

    pub(super) fn labels<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<std::collections::BTreeMap<String, String>, D::Error> {
        d.deserialize_map(Labels)
    }
}

/// One YAML document: one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "uvmctl UtilityVM spec")]
pub struct VmDocument {
    /// Must be `uvmctl.dev/v1alpha1`.
    #[serde(deserialize_with = "strict::string")]
    pub api_version: String,
    /// Must be `UtilityVM`.
    #[serde(deserialize_with = "strict::string")]
    pub kind: String,
    /// Identity of the VM.
    pub metadata: Metadata,
    /// What the VM should be.
    pub spec: VmConfig,
    /// Written by `uvmctl export`; ignored when specs are loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VmStatus>,
}

/// Identity of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// VM name: 1–64 characters of `[A-Za-z0-9-]`, not starting with `-`, unique across all specs.
    #[serde(deserialize_with = "strict::string")]
    pub name: String,
    /// Labels (Kubernetes syntax), for placement: `uvmctl watch --selector
    /// host=web-01` (or `--for-host`) manages only the VMs whose labels match.
    #[serde(
        default,
        skip_serializing_if = "std::collections::BTreeMap::is_empty",
        deserialize_with = "strict::labels"
    )]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Observed facts `export` records beside the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmStatus {
    /// Lifecycle state the virtstack reported.
    pub state: super::State,
    /// Whether uvmctl created (and so may change) this VM.
    #[serde(default = "default_true")]
    pub managed: bool,
}

fn default_true() -> bool {
    true
}

/// Desired power state.
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
    JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum PowerState {
    /// Guest running.
    #[default]
    Running,
    /// Guest halted in memory.
    Paused,
    /// VM shut down.
    Stopped,
    /// Guest state saved to a file under the state directory, nothing
    /// running; `running` or `paused` restores it where it was, `stopped`
    /// discards it.
    Saved,
}

impl PowerState {
    /// Lowercase name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Running => "running",
            PowerState::Paused => "paused",
            PowerState::Stopped => "stopped",
            PowerState::Saved => "saved",
        }
    }
}

/// Everything a VM is. Lists are keyed by their natural key, never by position.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmConfig {
    /// Guest operating system (default `linux`).
    #[serde(default, rename = "guestOS")]
    pub guest_os: GuestOs,
    /// Desired power state (default `running`).
    #[serde(default)]
    pub power_state: PowerState,
    /// What uvmctl may do to this VM.
    #[serde(default, skip_serializing_if = "Policy::is_default")]
    pub policy: Policy,
    /// How the VM boots.
    pub boot: Boot,
    /// Virtual processors.
    pub processors: Processors,
    /// Guest memory.
    pub memory: Memory,
    /// Serial consoles relayed to unix listeners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serial_consoles: Vec<SerialConsole>,
    /// Storage I/O limits for the VM's disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_qos: Option<StorageQos>,
    /// SCSI controllers with their disks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scsi_controllers: Vec<ScsiController>,
    /// Virtual persistent memory: the controller and its devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpmem: Option<Vpmem>,
    /// Network adapters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_adapters: Vec<NetworkAdapter>,
    /// Plan9 file shares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan9_shares: Vec<Plan9Share>,
    /// Virtual SMB shares (Windows hosts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vsmb_shares: Vec<VsmbShare>,
    /// Assigned PCI devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pci_devices: Vec<PciDevice>,
    /// Hypervisor socket listeners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vm_sockets: Vec<VmSocket>,
    /// Options only a Windows host has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<WindowsOptions>,
    /// How uvmctl tells that a change left the guest healthy. Not part of
    /// the VM: changing it changes nothing in the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

/// `spec.health`: probes judged after every change that reaches the guest.
/// The change is healthy once every probe has passed, without a failure,
/// for its `minHealthySeconds`; unhealthy when one has not by its
/// `deadlineSeconds` or fails after it, and at once when the guest panics
/// or its VM ends on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Health {
    /// At least one.
    pub probes: Vec<Probe>,
}

/// One health probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    /// What is asked of the guest.
    pub kind: ProbeKind,
    /// `exec` only: the agent command and its arguments; it passes when
    /// the agent answers OK.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "strict::list"
    )]
    pub command: Vec<String>,
    /// `console` only: a regular expression; it passes once a line the
    /// guest wrote to COM1 since the change matches.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::option"
    )]
    pub pattern: Option<String>,
    /// Seconds between two asks (default 2).
    #[serde(default = "Probe::default_interval")]
    pub interval_seconds: u32,
    /// Seconds from the change by which it must have passed for
    /// `minHealthySeconds` (default 120).
    #[serde(default = "Probe::default_deadline")]
    pub deadline_seconds: u32,
    /// Seconds it must keep passing (default 10).
    #[serde(default = "Probe::default_min_healthy")]
    pub min_healthy_seconds: u32,
}

impl Probe {
    fn default_interval() -> u32 {
        2
    }
    fn default_deadline() -> u32 {
        120
    }
    fn default_min_healthy() -> u32 {
        10
    }

    /// A probe of `kind` with the default times.
    pub fn of(kind: ProbeKind) -> Self {
        Probe {
            kind,
            command: Vec::new(),
            pattern: None,
            interval_seconds: Self::default_interval(),
            deadline_seconds: Self::default_deadline(),
            min_healthy_seconds: Self::default_min_healthy(),
        }
    }

    /// How it is named in plans, logs and status: `agent`, `exec cat /x`,
    /// `console /login:/`.
    pub fn label(&self) -> String {
        match self.kind {
            ProbeKind::Exec => format!("exec {}", self.command.join(" ")),
            ProbeKind::Console => format!("console /{}/", self.pattern.as_deref().unwrap_or("")),
            k => k.as_str().to_string(),
        }
    }
}

/// The kinds of health probe.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ProbeKind {
    /// The guest sends `READY=1` (sd_notify) over vsock.
    Notify,
    /// The guest agent answers.
    Agent,
    /// An agent command answers OK.
    Exec,
    /// A line on COM1 matches `pattern`.
    Console,
}

/// The vsock port of the host (CID 2) a guest sends `READY=1` to for a
/// `notify` probe: what uvmctl hands it as systemd's `vmm.notify_socket`
/// credential (`vsock-stream:2:<port>`). Reserved: a VM with a notify
/// probe has no `vmSockets` listener of its own on it.
pub const NOTIFY_VSOCK_PORT: u32 = 8_203_112;

impl Health {
    /// Whether a probe waits for the guest's `READY=1`.
    pub fn notifies(&self) -> bool {
        self.probes.iter().any(|p| p.kind == ProbeKind::Notify)
    }
}

impl ProbeKind {
    /// Every kind, in a stable order.
    pub const ALL: [ProbeKind; 4] = [
        ProbeKind::Notify,
        ProbeKind::Agent,
        ProbeKind::Exec,
        ProbeKind::Console,
    ];

    /// As written in a spec.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Notify => "notify",
            ProbeKind::Agent => "agent",
            ProbeKind::Exec => "exec",
            ProbeKind::Console => "console",
        }
    }
}

/// Per-VM policy: not part of the VM, but of what uvmctl may do to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// `apply` may destroy and rebuild this VM to apply cold-only changes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_recreate: bool,
    /// `apply --prune` never removes this VM, even when its spec is gone
    /// (the last applied spec's policy, as the virtstack recorded it).
    #[serde(default, skip_serializing_if = "is_false")]
    pub protected: bool,
}

impl Policy {
    fn is_default(&self) -> bool {
        *self == Policy::default()
    }
}

/// Boot source: exactly one of `uefi` or `linuxKernelDirect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Boot {
    /// UEFI firmware boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uefi: Option<UefiBoot>,
    /// Direct Linux kernel boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux_kernel_direct: Option<LinuxKernelDirect>,
}

/// UEFI boot, after hcsshim's `SetUEFIBoot(dir, path, args)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UefiBoot {
    /// Absolute path of the directory holding the boot files.
    pub dir: PathBuf,
    /// Path of the EFI application inside `dir`.
    #[serde(deserialize_with = "strict::string")]
    pub path: String,
    /// Optional data passed to the EFI application (for Linux: its command line).
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "strict::string"
    )]
    pub args: String,
}

/// Direct kernel boot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LinuxKernelDirect {
    /// Absolute path of the kernel image.
    pub kernel: PathBuf,
    /// Absolute path of the initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "strict::string"
    )]
    pub cmdline: String,
}

/// Processor settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Processors {
    /// Number of virtual processors (1–255).
    pub count: u32,
}

impl Default for Processors {
    fn default() -> Self {
        Processors { count: 1 }
    }
}

/// Memory settings, after hcsshim's `SetMemoryLimit`, `MemoryConfig` and `SetMMIOConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Memory {
    /// Memory size in MB (1–1048576).
    #[serde(rename = "sizeMB")]
    pub size_mb: u64,
    /// What backs guest memory (default `virtual`).
    #[serde(default)]
    pub backing: MemoryBackingType,
    /// Commit host memory lazily.
    #[serde(default, skip_serializing_if = "is_false")]
    pub deferred_commit: bool,
    /// Hot memory hint.
    #[serde(default, skip_serializing_if = "is_false")]
    pub hot_hint: bool,
    /// Cold memory hint.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cold_hint: bool,
    /// Cold memory may be discarded.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cold_discard_hint: bool,
    /// Memory-mapped I/O layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmio: Option<Mmio>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            size_mb: 512,
            backing: MemoryBackingType::Virtual,
            deferred_commit: false,
            hot_hint: false,
            cold_hint: false,
            cold_discard_hint: false,
            mmio: None,
        }
    }
}

/// MMIO gaps, in MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mmio {
    /// Size of the MMIO gap below 4 GiB (0–3072).
    #[serde(rename = "lowGapMB")]
    pub low_gap_mb: u64,
    /// Start of the high MMIO region (at least 4096, at most 2^30).
    #[serde(rename = "highBaseMB")]
    pub high_base_mb: u64,
    /// Size of the high MMIO region (at most 2^30).
    #[serde(rename = "highGapMB")]
    pub high_gap_mb: u64,
}

/// A serial console relayed to a unix socket listener.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SerialConsole {
    /// Serial port number (0–3: COM1–COM4 / ttyS0–ttyS3).
    pub port: u32,
    /// Absolute path of the unix socket the console is relayed to.
    pub listener_path: PathBuf,
}

/// Storage I/O limits. Leave a field out for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageQos {
    /// Maximum I/O operations per second (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_maximum: Option<u64>,
    /// Maximum bytes per second (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_maximum: Option<u64>,
}

/// A SCSI controller with its disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScsiController {
    /// Controller number (0–3).
    pub id: u32,
    /// Disks on this controller, keyed by LUN.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<ScsiDisk>,
}

/// A SCSI disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScsiDisk {
    /// Logical unit number (0–63).
    pub lun: u32,
    /// Absolute host path of the image or device.
    pub path: PathBuf,
    /// `vhd1`, `vhdx` or `passthrough` (raw file or block device). Always stated, never probed.
    #[serde(rename = "type")]
    pub disk_type: ScsiDiskType,
    /// Attach read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

/// The VPMem controller and its devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Vpmem {
    /// How many devices the guest sees (1–128).
    pub maximum_devices: u32,
    /// Largest device, in bytes (a multiple of 4096, at least 4096).
    pub maximum_size_bytes: u64,
    /// Devices, keyed by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<VpmemDevice>,
}

/// A virtual pmem device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VpmemDevice {
    /// Slot, below the controller's `maximumDevices`.
    pub id: u32,
    /// Absolute host path of the image.
    pub path: PathBuf,
    /// `vhd1` or `vhdx` (default `vhd1`).
    #[serde(default)]
    pub format: VPMemImageFormat,
    /// Map read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

/// A network adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkAdapter {
    /// Adapter id, a GUID.
    #[serde(deserialize_with = "strict::string")]
    pub nic_id: String,
    /// Host endpoint: an HCN endpoint GUID, a tap device name, or `user` for user-mode networking.
    #[serde(deserialize_with = "strict::string")]
    pub endpoint_id: String,
    /// MAC address, `00-15-5D-01-02-03` or `00:15:5d:01:02:03` (unicast).
    #[serde(deserialize_with = "strict::string")]
    pub mac_address: String,
}

/// A Plan9 share.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Plan9Share {
    /// Share name (mount tag), 1–31 characters of `[A-Za-z0-9._-]`.
    #[serde(deserialize_with = "strict::string")]
    pub name: String,
    /// Absolute host path shared.
    pub host_path: PathBuf,
    /// Transport port (default 564).
    #[serde(default = "default_plan9_port")]
    pub port: u32,
    /// Share flags, as hcsshim passes them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub flags: u32,
    /// Restrict the share to these file names inside `hostPath`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "strict::list"
    )]
    pub allowed_files: Vec<String>,
    /// Share read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

/// The default Plan9 port, as in hcsshim.
pub const DEFAULT_PLAN9_PORT: u32 = 564;

fn default_plan9_port() -> u32 {
    DEFAULT_PLAN9_PORT
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// A virtual SMB share.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsmbShare {
    /// Share name, 1–64 characters of `[A-Za-z0-9._-]`.
    #[serde(deserialize_with = "strict::string")]
    pub name: String,
    /// Absolute host path shared.
    pub host_path: PathBuf,
    /// Restrict the share to these file names inside `hostPath`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "strict::list"
    )]
    pub allowed_files: Vec<String>,
    /// Share options.
    #[serde(default, skip_serializing_if = "is_default_vsmb")]
    pub options: VsmbOptions,
}

fn is_default_vsmb(o: &VsmbOptions) -> bool {
    *o == VsmbOptions::default()
}

/// An assigned PCI device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PciDevice {
    /// Host device instance id (Windows instance path or Linux `0000:01:00.0`).
    #[serde(deserialize_with = "strict::string")]
    pub instance_id: String,
    /// VMBus channel GUID (Windows hosts).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::option"
    )]
    pub vmbus_guid: Option<String>,
}

/// A hypervisor socket listener.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmSocket {
    /// `hvsocket` (needs `serviceId`) or `vsock` (needs `port`).
    #[serde(rename = "type")]
    pub socket_type: VMSocketType,
    /// HvSocket service id, a GUID.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::option"
    )]
    pub service_id: Option<String>,
    /// vsock port (1–4294967294).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Absolute path of the unix socket guest connections are relayed to.
    pub listener_path: PathBuf,
}

impl VmSocket {
    /// The address part of the natural key: the service id or the port.
    pub fn address(&self) -> String {
        match (self.socket_type, &self.service_id, self.port) {
            (VMSocketType::HvSocket, Some(id), _) => id.clone(),
            (VMSocketType::VSock, _, Some(port)) => port.to_string(),
            (_, Some(id), _) => id.clone(),
            (_, None, Some(port)) => port.to_string(),
            (_, None, None) => String::new(),
        }
    }
}

/// Windows-host options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WindowsOptions {
    /// CPU group id, a GUID.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::option"
    )]
    pub cpu_group: Option<String>,
}

/// Where a spec names an image its VM attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSite {
    /// `scsiControllers[i].disks[j]`.
    ScsiDisk(usize, usize),
    /// `vpmem.devices[i]`.
    VpmemDevice(usize),
}

impl ImageSite {
    /// The spec field of its path.
    pub fn field(self) -> String {
        match self {
            ImageSite::ScsiDisk(i, j) => format!("spec.scsiControllers[{i}].disks[{j}].path"),
            ImageSite::VpmemDevice(i) => format!("spec.vpmem.devices[{i}].path"),
        }
    }
}

/// An image a VM attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachedImage<'a> {
    /// Where its spec names it.
    pub site: ImageSite,
    /// The host file.
    pub path: &'a std::path::Path,
    /// Attached read-only.
    pub read_only: bool,
}

impl VmConfig {
    /// sha256 of the configuration as uvmctl reads it (values canonical),
    /// in hex: two specs that say the same have the same digest, whatever
    /// their layout, comments or the other VMs of their file.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        // Plain data with string keys always serializes; were it ever not
        // to, every such configuration would share the digest of nothing.
        let json = serde_json::to_vec(self).unwrap_or_default();
        Sha256::digest(&json)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Every image the VM attaches (SCSI disks, then VPMem devices), in
    /// spec order: what "a writable image belongs to one VM" is about.
    pub fn images(&self) -> impl Iterator<Item = AttachedImage<'_>> {
        let scsi = self.scsi_controllers.iter().enumerate().flat_map(|(i, c)| {
            c.disks.iter().enumerate().map(move |(j, d)| AttachedImage {
                site: ImageSite::ScsiDisk(i, j),
                path: &d.path,
                read_only: d.read_only,
            })
        });
        let vpmem = self.vpmem.iter().flat_map(|v| {
            v.devices.iter().enumerate().map(|(i, d)| AttachedImage {
                site: ImageSite::VpmemDevice(i),
                path: &d.path,
                read_only: d.read_only,
            })
        });
        scsi.chain(vpmem)
    }

    /// Equal in everything but the desired power state (lists compared in
    /// order, so a reordered list counts as different here).
    pub fn same_except_power(&self, other: &VmConfig) -> bool {
        // Destructured so that a new field cannot be forgotten here.
        let VmConfig {
            guest_os,
            power_state: _,
            policy,
            boot,
            processors,
            memory,
            serial_consoles,
            storage_qos,
            scsi_controllers,
            vpmem,
            network_adapters,
            plan9_shares,
            vsmb_shares,
            pci_devices,
            vm_sockets,
            windows,
            // uvmctl's, not the VM's: no change of it is planned.
            health: _,
        } = self;
        *guest_os == other.guest_os
            && *policy == other.policy
            && *boot == other.boot
            && *processors == other.processors
            && *memory == other.memory
            && *serial_consoles == other.serial_consoles
            && *storage_qos == other.storage_qos
            && *scsi_controllers == other.scsi_controllers
            && *vpmem == other.vpmem
            && *network_adapters == other.network_adapters
            && *plan9_shares == other.plan9_shares
            && *vsmb_shares == other.vsmb_shares
            && *pci_devices == other.pci_devices
            && *vm_sockets == other.vm_sockets
            && *windows == other.windows
    }

    /// Sorts every keyed list by its natural key, so two equal VMs serialize
    /// to the same YAML whatever order their specs listed things in.
    pub fn canonicalize(&mut self) {
        self.serial_consoles.sort_by_key(|s| s.port);
        self.scsi_controllers.sort_by_key(|c| c.id);
        for c in &mut self.scsi_controllers {
            c.disks.sort_by_key(|d| d.lun);
        }
        if let Some(v) = &mut self.vpmem {
            v.devices.sort_by_key(|d| d.id);
        }
        self.network_adapters
            .sort_by(|a, b| a.nic_id.cmp(&b.nic_id));
        self.plan9_shares.sort_by(|a, b| a.name.cmp(&b.name));
        self.vsmb_shares.sort_by(|a, b| a.name.cmp(&b.name));
        self.pci_devices
            .sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        self.vm_sockets
            .sort_by_key(|s| (s.socket_type, s.address()));
        if self.windows.as_ref().is_some_and(|w| w.cpu_group.is_none()) {
            self.windows = None;
        }
    }
}
