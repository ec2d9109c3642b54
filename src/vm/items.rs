//! A VM flattened into keyed items, so diffing two VMs is diffing two sorted
//! maps: lists are matched by natural key, never by position.

use super::config::{
    Boot, Mmio, NetworkAdapter, PciDevice, Plan9Share, Policy, PowerState, ScsiController,
    ScsiDisk, SerialConsole, StorageQos, VmConfig, VmSocket, Vpmem, VpmemDevice, VsmbShare,
    WindowsOptions,
};
use super::{GuestOs, MemoryBackingType, Resource, VMSocketType};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

/// What a planned operation changes. Declaration order is plan order for
/// additions (containers before what they contain); removals run in reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ResourceKind {
    /// `spec.policy`: uvmctl's own record, the VM is not touched.
    Policy,
    /// `spec.guestOS`.
    #[serde(rename = "guestOS")]
    GuestOs,
    /// `spec.boot`.
    Boot,
    /// Memory backing and hints.
    MemoryConfig,
    /// `spec.memory.mmio`.
    Mmio,
    /// VPMem controller limits.
    VpmemController,
    /// A serial console, by port.
    SerialConsole,
    /// Windows CPU group.
    CpuGroup,
    /// Processor count.
    Processors,
    /// Memory size.
    Memory,
    /// Storage QoS limits.
    StorageQos,
    /// A SCSI controller, by id.
    ScsiController,
    /// A SCSI disk, by controller and LUN.
    ScsiDisk,
    /// A VPMem device, by id.
    VpmemDevice,
    /// A NIC, by nic id.
    NetworkAdapter,
    /// A Plan9 share, by name.
    Plan9Share,
    /// A VSMB share, by name.
    VsmbShare,
    /// A PCI device, by instance id.
    PciDevice,
    /// A VM socket listener, by type and address.
    VmSocket,
    /// Power state (always last).
    PowerState,
}

impl ResourceKind {
    /// Name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Policy => "policy",
            ResourceKind::GuestOs => "guestOS",
            ResourceKind::Boot => "boot",
            ResourceKind::MemoryConfig => "memoryConfig",
            ResourceKind::Mmio => "mmio",
            ResourceKind::VpmemController => "vpmemController",
            ResourceKind::SerialConsole => "serialConsole",
            ResourceKind::CpuGroup => "cpuGroup",
            ResourceKind::Processors => "processors",
            ResourceKind::Memory => "memory",
            ResourceKind::StorageQos => "storageQos",
            ResourceKind::ScsiController => "scsiController",
            ResourceKind::ScsiDisk => "scsiDisk",
            ResourceKind::VpmemDevice => "vpmemDevice",
            ResourceKind::NetworkAdapter => "networkAdapter",
            ResourceKind::Plan9Share => "plan9Share",
            ResourceKind::VsmbShare => "vsmbShare",
            ResourceKind::PciDevice => "pciDevice",
            ResourceKind::VmSocket => "vmSocket",
            ResourceKind::PowerState => "powerState",
        }
    }

    /// The resource `Supported(resource, operation)` is asked about for
    /// this kind; `None` for what is not a resource of the running VM
    /// (uvmctl's policy, cold settings, the power state).
    pub fn resource(self, key: &ItemKey) -> Option<Resource> {
        match self {
            ResourceKind::Policy
            | ResourceKind::GuestOs
            | ResourceKind::Boot
            | ResourceKind::MemoryConfig
            | ResourceKind::Mmio
            | ResourceKind::VpmemController
            | ResourceKind::PowerState => None,
            ResourceKind::SerialConsole => Some(Resource::Serial),
            ResourceKind::CpuGroup => Some(Resource::CpuGroup),
            ResourceKind::Processors => Some(Resource::Processor),
            ResourceKind::Memory => Some(Resource::Memory),
            ResourceKind::StorageQos => Some(Resource::StorageQos),
            ResourceKind::ScsiController => Some(Resource::ScsiController),
            ResourceKind::ScsiDisk => Some(Resource::Scsi),
            ResourceKind::VpmemDevice => Some(Resource::VPMem),
            ResourceKind::NetworkAdapter => Some(Resource::Network),
            ResourceKind::Plan9Share => Some(Resource::Plan9),
            ResourceKind::VsmbShare => Some(Resource::Vsmb),
            ResourceKind::PciDevice => Some(Resource::Pci),
            ResourceKind::VmSocket => Some(match key {
                ItemKey::Socket(VMSocketType::HvSocket, _) => Resource::HvSocket,
                _ => Resource::VmSocket,
            }),
        }
    }

    /// Whether the VM has exactly one of these (changed by update only).
    pub fn is_singleton(self) -> bool {
        match self {
            ResourceKind::Policy
            | ResourceKind::GuestOs
            | ResourceKind::Boot
            | ResourceKind::MemoryConfig
            | ResourceKind::Mmio
            | ResourceKind::VpmemController
            | ResourceKind::CpuGroup
            | ResourceKind::Processors
            | ResourceKind::Memory
            | ResourceKind::StorageQos
            | ResourceKind::PowerState => true,
            ResourceKind::SerialConsole
            | ResourceKind::ScsiController
            | ResourceKind::ScsiDisk
            | ResourceKind::VpmemDevice
            | ResourceKind::NetworkAdapter
            | ResourceKind::Plan9Share
            | ResourceKind::VsmbShare
            | ResourceKind::PciDevice
            | ResourceKind::VmSocket => false,
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Natural key of an item within its kind.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ItemKey {
    /// The one item of a singleton kind.
    Unit,
    /// A number: serial port, controller id, VPMem id.
    Num(u32),
    /// SCSI controller and LUN.
    Lun(u32, u32),
    /// A name or id: NIC id, share name, PCI instance id.
    Text(String),
    /// Socket type and address.
    Socket(VMSocketType, String),
}

impl fmt::Display for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ItemKey::Unit => Ok(()),
            ItemKey::Num(n) => write!(f, "{n}"),
            ItemKey::Lun(c, l) => write!(f, "{c}:{l}"),
            ItemKey::Text(s) => f.write_str(s),
            ItemKey::Socket(VMSocketType::HvSocket, a) => write!(f, "hvsocket:{a}"),
            ItemKey::Socket(VMSocketType::VSock, a) => write!(f, "vsock:{a}"),
        }
    }
}

impl Serialize for ItemKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Memory settings other than size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryConfigItem {
    /// Backing type.
    pub backing: MemoryBackingType,
    /// Lazy commit.
    pub deferred_commit: bool,
    /// Hot hint.
    pub hot_hint: bool,
    /// Cold hint.
    pub cold_hint: bool,
    /// Cold discard hint.
    pub cold_discard_hint: bool,
}

/// VPMem controller limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VpmemControllerItem {
    /// Device slots.
    pub maximum_devices: u32,
    /// Largest device.
    pub maximum_size_bytes: u64,
}

/// A SCSI disk with its controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScsiDiskItem {
    /// Controller number.
    pub controller: u32,
    /// The disk.
    #[serde(flatten)]
    pub disk: ScsiDisk,
}

/// One item of a VM: the payload an operation adds, removes or changes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Item {
    /// Policy.
    Policy(Policy),
    /// Guest OS.
    GuestOs(GuestOs),
    /// Boot.
    Boot(Boot),
    /// Memory backing and hints.
    MemoryConfig(MemoryConfigItem),
    /// MMIO layout.
    Mmio(Option<Mmio>),
    /// VPMem controller.
    VpmemController(Option<VpmemControllerItem>),
    /// Serial console.
    SerialConsole(SerialConsole),
    /// CPU group.
    CpuGroup(Option<String>),
    /// Processor count.
    Processors(u32),
    /// Memory size in MB.
    Memory(u64),
    /// Storage QoS.
    StorageQos(Option<StorageQos>),
    /// SCSI controller id.
    ScsiController(u32),
    /// SCSI disk.
    ScsiDisk(ScsiDiskItem),
    /// VPMem device.
    VpmemDevice(VpmemDevice),
    /// NIC.
    NetworkAdapter(NetworkAdapter),
    /// Plan9 share.
    Plan9Share(Plan9Share),
    /// VSMB share.
    VsmbShare(VsmbShare),
    /// PCI device.
    PciDevice(PciDevice),
    /// VM socket.
    VmSocket(VmSocket),
    /// Power state (observed or desired), as a word.
    PowerState(&'static str),
}

impl Item {
    /// Whether a singleton holds its default (nothing to show when creating).
    pub fn is_default(&self) -> bool {
        match self {
            Item::Policy(p) => *p == Policy::default(),
            Item::MemoryConfig(m) => {
                m.backing == MemoryBackingType::default()
                    && !(m.deferred_commit || m.hot_hint || m.cold_hint || m.cold_discard_hint)
            }
            Item::Mmio(m) => m.is_none(),
            Item::VpmemController(v) => v.is_none(),
            Item::CpuGroup(g) => g.is_none(),
            Item::StorageQos(q) => q.is_none(),
            Item::GuestOs(_)
            | Item::Boot(_)
            | Item::SerialConsole(_)
            | Item::Processors(_)
            | Item::Memory(_)
            | Item::ScsiController(_)
            | Item::ScsiDisk(_)
            | Item::VpmemDevice(_)
            | Item::NetworkAdapter(_)
            | Item::Plan9Share(_)
            | Item::VsmbShare(_)
            | Item::PciDevice(_)
            | Item::VmSocket(_)
            | Item::PowerState(_) => false,
        }
    }
}

impl Item {
    /// The item's kind and natural key: where [`flatten`] files it.
    pub fn key(&self) -> (ResourceKind, ItemKey) {
        use ResourceKind as K;
        match self {
            Item::Policy(_) => (K::Policy, ItemKey::Unit),
            Item::GuestOs(_) => (K::GuestOs, ItemKey::Unit),
            Item::Boot(_) => (K::Boot, ItemKey::Unit),
            Item::MemoryConfig(_) => (K::MemoryConfig, ItemKey::Unit),
            Item::Mmio(_) => (K::Mmio, ItemKey::Unit),
            Item::VpmemController(_) => (K::VpmemController, ItemKey::Unit),
            Item::SerialConsole(s) => (K::SerialConsole, ItemKey::Num(s.port)),
            Item::CpuGroup(_) => (K::CpuGroup, ItemKey::Unit),
            Item::Processors(_) => (K::Processors, ItemKey::Unit),
            Item::Memory(_) => (K::Memory, ItemKey::Unit),
            Item::StorageQos(_) => (K::StorageQos, ItemKey::Unit),
            Item::ScsiController(id) => (K::ScsiController, ItemKey::Num(*id)),
            Item::ScsiDisk(d) => (K::ScsiDisk, ItemKey::Lun(d.controller, d.disk.lun)),
            Item::VpmemDevice(d) => (K::VpmemDevice, ItemKey::Num(d.id)),
            Item::NetworkAdapter(n) => (K::NetworkAdapter, ItemKey::Text(n.nic_id.clone())),
            Item::Plan9Share(s) => (K::Plan9Share, ItemKey::Text(s.name.clone())),
            Item::VsmbShare(s) => (K::VsmbShare, ItemKey::Text(s.name.clone())),
            Item::PciDevice(d) => (K::PciDevice, ItemKey::Text(d.instance_id.clone())),
            Item::VmSocket(s) => (K::VmSocket, ItemKey::Socket(s.socket_type, s.address())),
            Item::PowerState(_) => (K::PowerState, ItemKey::Unit),
        }
    }
}

/// One change to one item of a VM: the contract's one change verb
/// ([`crate::vm::Virtstack::change`]) takes it. An update carries what it
/// replaces, so a virtstack that can update in place does, and one that
/// cannot swaps the device out and in.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Adds the item.
    Add(Item),
    /// Removes the item.
    Remove(Item),
    /// Replaces `before` with `after` (same kind and key).
    Update {
        /// What the VM has.
        before: Item,
        /// What it gets.
        after: Item,
    },
}

impl Change {
    /// The change an operation with these items describes, if they fit it.
    pub fn new(
        operation: super::ResourceOperation,
        before: Option<Item>,
        after: Option<Item>,
    ) -> Option<Self> {
        use super::ResourceOperation as O;
        match (operation, before, after) {
            (O::Add, _, Some(item)) => Some(Change::Add(item)),
            (O::Remove, Some(item), _) => Some(Change::Remove(item)),
            (O::Update, Some(before), Some(after)) if before.key() == after.key() => {
                Some(Change::Update { before, after })
            }
            _ => None,
        }
    }

    /// Add, Remove or Update.
    pub fn operation(&self) -> super::ResourceOperation {
        match self {
            Change::Add(_) => super::ResourceOperation::Add,
            Change::Remove(_) => super::ResourceOperation::Remove,
            Change::Update { .. } => super::ResourceOperation::Update,
        }
    }

    /// The item the VM has after the change (the removed one for a removal).
    pub fn item(&self) -> &Item {
        match self {
            Change::Add(i) | Change::Remove(i) => i,
            Change::Update { after, .. } => after,
        }
    }

    /// The changed item's kind and key.
    pub fn key(&self) -> (ResourceKind, ItemKey) {
        self.item().key()
    }

    /// The resource `Supported` is asked about, if the item is one.
    pub fn resource(&self) -> Option<Resource> {
        let (kind, key) = self.key();
        kind.resource(&key)
    }

    /// How the plan and errors name it: `add scsiDisk 0:1`.
    pub fn label(&self) -> String {
        let (kind, key) = self.key();
        match key {
            ItemKey::Unit => format!("{} {kind}", self.operation()),
            key => format!("{} {kind} {key}", self.operation()),
        }
    }

    /// `items` with the change made: an add of what is there, or a removal
    /// or update of what is not, is refused (the caller is out of step).
    pub fn apply_to(&self, items: &mut Items) -> Result<(), ChangeError> {
        let key = self.key();
        let present = items.contains_key(&key);
        match self {
            Change::Add(item) if !present => {
                items.insert(key, item.clone());
            }
            Change::Remove(_) if present => {
                items.remove(&key);
            }
            Change::Update { after, .. } if present => {
                items.insert(key, after.clone());
            }
            Change::Add(_) => return Err(ChangeError::Present(self.label())),
            Change::Remove(_) | Change::Update { .. } => {
                return Err(ChangeError::Absent(self.label()));
            }
        }
        Ok(())
    }

    /// `config` with the change made whatever it held before (an add
    /// overwrites, a removal of what is not there is none): for a record
    /// of what was applied, which the VM itself may have drifted from.
    pub fn recorded(&self, config: &VmConfig) -> Result<VmConfig, ChangeError> {
        let mut items = flatten(config);
        let key = self.key();
        match self {
            Change::Add(item) | Change::Update { after: item, .. } => {
                items.insert(key, item.clone());
            }
            Change::Remove(_) => {
                items.remove(&key);
            }
        }
        unflatten(&items, config.power_state).map_err(ChangeError::Inconsistent)
    }

    /// `config` with the change made (its power state kept).
    pub fn applied(&self, config: &VmConfig) -> Result<VmConfig, ChangeError> {
        let mut items = flatten(config);
        self.apply_to(&mut items)?;
        unflatten(&items, config.power_state).map_err(ChangeError::Inconsistent)
    }
}

/// Why a [`Change`] does not fit a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// An add of what is there.
    #[error("{0}: it is there already")]
    Present(String),
    /// A removal or update of what is not there.
    #[error("{0}: it is not there")]
    Absent(String),
    /// The result does not hold together (a disk without its controller).
    #[error("{0}")]
    Inconsistent(String),
}

/// Items of a VM by (kind, key); iteration order is plan order.
pub type Items = BTreeMap<(ResourceKind, ItemKey), Item>;

/// Flattens a VM configuration. Power state is left out: it is planned from
/// the observed lifecycle state, not compared as configuration.
pub fn flatten(c: &VmConfig) -> Items {
    use ResourceKind as K;
    let mut m = Items::new();
    let mut put = |k: K, key: ItemKey, item: Item| {
        m.insert((k, key), item);
    };
    put(K::Policy, ItemKey::Unit, Item::Policy(c.policy));
    put(K::GuestOs, ItemKey::Unit, Item::GuestOs(c.guest_os));
    put(K::Boot, ItemKey::Unit, Item::Boot(c.boot.clone()));
    put(
        K::MemoryConfig,
        ItemKey::Unit,
        Item::MemoryConfig(MemoryConfigItem {
            backing: c.memory.backing,
            deferred_commit: c.memory.deferred_commit,
            hot_hint: c.memory.hot_hint,
            cold_hint: c.memory.cold_hint,
            cold_discard_hint: c.memory.cold_discard_hint,
        }),
    );
    put(K::Mmio, ItemKey::Unit, Item::Mmio(c.memory.mmio));
    put(
        K::VpmemController,
        ItemKey::Unit,
        Item::VpmemController(c.vpmem.as_ref().map(|v| VpmemControllerItem {
            maximum_devices: v.maximum_devices,
            maximum_size_bytes: v.maximum_size_bytes,
        })),
    );
    for s in &c.serial_consoles {
        put(
            K::SerialConsole,
            ItemKey::Num(s.port),
            Item::SerialConsole(s.clone()),
        );
    }
    put(
        K::CpuGroup,
        ItemKey::Unit,
        Item::CpuGroup(c.windows.as_ref().and_then(|w| w.cpu_group.clone())),
    );
    put(
        K::Processors,
        ItemKey::Unit,
        Item::Processors(c.processors.count),
    );
    put(K::Memory, ItemKey::Unit, Item::Memory(c.memory.size_mb));
    put(
        K::StorageQos,
        ItemKey::Unit,
        Item::StorageQos(c.storage_qos),
    );
    for ctrl in &c.scsi_controllers {
        put(
            K::ScsiController,
            ItemKey::Num(ctrl.id),
            Item::ScsiController(ctrl.id),
        );
        for d in &ctrl.disks {
            put(
                K::ScsiDisk,
                ItemKey::Lun(ctrl.id, d.lun),
                Item::ScsiDisk(ScsiDiskItem {
                    controller: ctrl.id,
                    disk: d.clone(),
                }),
            );
        }
    }
    if let Some(v) = &c.vpmem {
        for d in &v.devices {
            put(
                K::VpmemDevice,
                ItemKey::Num(d.id),
                Item::VpmemDevice(d.clone()),
            );
        }
    }
    for n in &c.network_adapters {
        put(
            K::NetworkAdapter,
            ItemKey::Text(n.nic_id.clone()),
            Item::NetworkAdapter(n.clone()),
        );
    }
    for s in &c.plan9_shares {
        put(
            K::Plan9Share,
            ItemKey::Text(s.name.clone()),
            Item::Plan9Share(s.clone()),
        );
    }
    for s in &c.vsmb_shares {
        put(
            K::VsmbShare,
            ItemKey::Text(s.name.clone()),
            Item::VsmbShare(s.clone()),
        );
    }
    for d in &c.pci_devices {
        put(
            K::PciDevice,
            ItemKey::Text(d.instance_id.clone()),
            Item::PciDevice(d.clone()),
        );
    }
    for s in &c.vm_sockets {
        put(
            K::VmSocket,
            ItemKey::Socket(s.socket_type, s.address()),
            Item::VmSocket(s.clone()),
        );
    }
    m
}

/// Rebuilds a configuration from items: the inverse of [`flatten`]. Fails
/// when an item's container is missing (a disk without its controller).
pub fn unflatten(items: &Items, power: PowerState) -> Result<VmConfig, String> {
    let mut c = VmConfig {
        power_state: power,
        ..VmConfig::default()
    };
    let mut vpmem: Option<Vpmem> = None;
    let mut vpmem_devices = Vec::new();
    for item in items.values() {
        match item {
            Item::Policy(p) => c.policy = *p,
            Item::GuestOs(g) => c.guest_os = *g,
            Item::Boot(b) => c.boot = b.clone(),
            Item::MemoryConfig(m) => {
                c.memory.backing = m.backing;
                c.memory.deferred_commit = m.deferred_commit;
                c.memory.hot_hint = m.hot_hint;
                c.memory.cold_hint = m.cold_hint;
                c.memory.cold_discard_hint = m.cold_discard_hint;
            }
            Item::Mmio(m) => c.memory.mmio = *m,
            Item::VpmemController(v) => {
                vpmem = v.map(|v| Vpmem {
                    maximum_devices: v.maximum_devices,
                    maximum_size_bytes: v.maximum_size_bytes,
                    devices: vec![],
                })
            }
            Item::SerialConsole(s) => c.serial_consoles.push(s.clone()),
            Item::CpuGroup(g) => {
                c.windows = g.clone().map(|g| WindowsOptions { cpu_group: Some(g) })
            }
            Item::Processors(n) => c.processors.count = *n,
            Item::Memory(m) => c.memory.size_mb = *m,
            Item::StorageQos(q) => c.storage_qos = *q,
            Item::ScsiController(id) => c.scsi_controllers.push(ScsiController {
                id: *id,
                disks: vec![],
            }),
            Item::ScsiDisk(d) => {
                if let Some(ctrl) = c.scsi_controllers.iter_mut().find(|x| x.id == d.controller) {
                    ctrl.disks.push(d.disk.clone());
                } else {
                    return Err(format!(
                        "disk {}:{} without its controller",
                        d.controller, d.disk.lun
                    ));
                }
            }
            Item::VpmemDevice(d) => vpmem_devices.push(d.clone()),
            Item::NetworkAdapter(n) => c.network_adapters.push(n.clone()),
            Item::Plan9Share(s) => c.plan9_shares.push(s.clone()),
            Item::VsmbShare(s) => c.vsmb_shares.push(s.clone()),
            Item::PciDevice(d) => c.pci_devices.push(d.clone()),
            Item::VmSocket(s) => c.vm_sockets.push(s.clone()),
            Item::PowerState(_) => {}
        }
    }
    match vpmem.as_mut() {
        Some(v) => v.devices = vpmem_devices,
        None if !vpmem_devices.is_empty() => {
            return Err("vpmem devices without a controller".into());
        }
        None => {}
    }
    c.vpmem = vpmem;
    Ok(c)
}

/// One-line description of an item for plan text.
pub fn describe(item: &Item) -> String {
    fn flag(on: bool, name: &str) -> String {
        if on {
            format!(", {name}")
        } else {
            String::new()
        }
    }
    match item {
        Item::Policy(p) => format!(
            "allowRecreate={}, protected={}",
            p.allow_recreate, p.protected
        ),
        Item::GuestOs(g) => format!("{g:?}").to_lowercase(),
        Item::Boot(b) => match (&b.uefi, &b.linux_kernel_direct) {
            (Some(u), _) => format!("uefi {}/{}", u.dir.display(), u.path),
            (None, Some(k)) => format!("kernel {}", k.kernel.display()),
            (None, None) => "none".into(),
        },
        Item::MemoryConfig(m) => format!(
            "backing {:?}{}{}{}{}",
            m.backing,
            flag(m.deferred_commit, "deferredCommit"),
            flag(m.hot_hint, "hotHint"),
            flag(m.cold_hint, "coldHint"),
            flag(m.cold_discard_hint, "coldDiscardHint")
        )
        .to_lowercase(),
        Item::Mmio(None) => "default".into(),
        Item::Mmio(Some(m)) => format!(
            "lowGap {} MB, highBase {} MB, highGap {} MB",
            m.low_gap_mb, m.high_base_mb, m.high_gap_mb
        ),
        Item::VpmemController(None) => "none".into(),
        Item::VpmemController(Some(v)) => format!(
            "{} devices, max {} bytes",
            v.maximum_devices, v.maximum_size_bytes
        ),
        Item::SerialConsole(s) => format!("→ {}", s.listener_path.display()),
        Item::CpuGroup(g) => g.clone().unwrap_or_else(|| "none".into()),
        Item::Processors(n) => format!("{n}"),
        Item::Memory(mb) => format!("{mb} MB"),
        Item::StorageQos(None) => "unlimited".into(),
        Item::StorageQos(Some(q)) => {
            let iops = q.iops_maximum.map_or("unlimited".into(), |v| v.to_string());
            let bw = q
                .bandwidth_maximum
                .map_or("unlimited".into(), |v| v.to_string());
            format!("iops {iops}, bandwidth {bw} B/s")
        }
        Item::ScsiController(_) => "virtio-scsi".into(),
        Item::ScsiDisk(d) => format!(
            "{} ({}{})",
            d.disk.path.display(),
            serde_plain(&d.disk.disk_type),
            flag(d.disk.read_only, "read-only")
        ),
        Item::VpmemDevice(d) => format!(
            "{} ({}{})",
            d.path.display(),
            serde_plain(&d.format),
            flag(d.read_only, "read-only")
        ),
        Item::NetworkAdapter(n) => format!("mac {}, endpoint {}", n.mac_address, n.endpoint_id),
        Item::Plan9Share(s) => format!(
            "{}{}",
            s.host_path.display(),
            flag(s.read_only, "read-only")
        ),
        Item::VsmbShare(s) => format!(
            "{}{}",
            s.host_path.display(),
            flag(s.options.read_only, "read-only")
        ),
        Item::PciDevice(d) => d
            .vmbus_guid
            .clone()
            .map_or_else(|| "assigned".into(), |g| format!("vmbus {g}")),
        Item::VmSocket(s) => format!("→ {}", s.listener_path.display()),
        Item::PowerState(s) => (*s).to_string(),
    }
}

/// A unit enum variant's serde name (`vhdx`, `vhd1`...).
fn serde_plain<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}
