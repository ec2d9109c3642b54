//! The vmservice protocol's messages as uvmctl's model, and back: the one
//! translation both sides use (the remotevm client going out, `serve`
//! coming in), so a round trip is tested in one place.
//!
//! Requests come from any client: every value is checked by the same
//! validation as a spec file (bounds, names, GUIDs, MACs, absolute paths),
//! unknown enum values and settings this translation has no place for are
//! refused, and nothing is created from a request that fails here.

use crate::protocol::vmservice as pb;
use crate::spec::{
    Boot, LinuxKernelDirect, Memory, Mmio, NetworkAdapter, PciDevice, Processors, ScsiController,
    ScsiDisk, SerialConsole, UefiBoot, VmConfig, VmDocument, VmSocket, Vpmem, VpmemDevice,
};
use crate::vm::items::{Item, ScsiDiskItem};
use crate::vm::{
    Capabilities, Change, GuestOs, MemoryBackingType, ObservedVm, Resource, ResourceOperation,
    ScsiDiskType, Support, VMSocketType, VPMemImageFormat,
};
use pb::capabilities_vmresponse::{Resource as PbResource, SupportedGuestOS, SupportedResource};
use pb::modify_resource_request::Resource as Modify;
use protobuf::EnumOrUnknown;
use std::path::PathBuf;

/// How large each VPMem device may be: the protocol does not say; hcsshim's
/// default (4 GiB).
pub const VPMEM_DEVICE_BYTES: u64 = 4 << 30;

/// Why a request cannot be taken: bad input, or a setting with no meaning here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A value is missing, out of range or malformed.
    #[error("{field}: {message}")]
    Invalid {
        /// Where in the request.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A setting uvmctl has nothing to do with.
    #[error("{field}: {message}")]
    Unimplemented {
        /// Where in the request.
        field: String,
        /// Why.
        message: String,
    },
    /// The item a removal names is not on the VM.
    #[error("{0}")]
    NotFound(String),
    /// The item an add names is on the VM already.
    #[error("{0}")]
    Exists(String),
    /// The VM cannot take it as it is (no free slot, its last processor).
    #[error("{0}")]
    Precondition(String),
}

fn invalid(field: &str, message: impl Into<String>) -> RequestError {
    RequestError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

fn unimplemented(field: &str, message: impl Into<String>) -> RequestError {
    RequestError::Unimplemented {
        field: field.into(),
        message: message.into(),
    }
}

/// A known enum value, or the error naming the field.
pub fn known<E: protobuf::Enum>(v: EnumOrUnknown<E>, field: &str) -> Result<E, RequestError> {
    v.enum_value()
        .map_err(|n| invalid(field, format!("unknown enum value {n}")))
}

/// A protocol disk type as a SCSI disk type.
pub fn disk_type(
    t: EnumOrUnknown<pb::DiskType>,
    field: &str,
) -> Result<ScsiDiskType, RequestError> {
    Ok(match known(t, field)? {
        pb::DiskType::SCSI_DISK_TYPE_VHD1 => ScsiDiskType::Vhd1,
        pb::DiskType::SCSI_DISK_TYPE_VHDX => ScsiDiskType::Vhdx,
        pb::DiskType::SCSI_DISK_TYPE_PHYSICAL => ScsiDiskType::PassThrough,
    })
}

/// A protocol disk type as a VPMem image format (VPMem images are VHDs).
pub fn vpmem_format(
    t: EnumOrUnknown<pb::DiskType>,
    field: &str,
) -> Result<VPMemImageFormat, RequestError> {
    Ok(match known(t, field)? {
        pb::DiskType::SCSI_DISK_TYPE_VHD1 => VPMemImageFormat::Vhd1,
        pb::DiskType::SCSI_DISK_TYPE_VHDX => VPMemImageFormat::Vhdx,
        pb::DiskType::SCSI_DISK_TYPE_PHYSICAL => {
            return Err(unimplemented(
                field,
                "a VPMem device is a VHD or VHDX image",
            ));
        }
    })
}

/// A NIC of the protocol: the port id is the endpoint (on qemu: `user` or a
/// tap device name).
pub fn nic(n: &pb::NICConfig) -> NetworkAdapter {
    NetworkAdapter {
        nic_id: n.nic_id.clone(),
        endpoint_id: n.port_id.clone(),
        mac_address: n.mac_address.clone(),
    }
}

/// The VM a `CreateVMRequest` describes, validated as a spec document named
/// `name` would be.
pub fn vm_config(name: &str, req: &pb::CreateVMRequest) -> Result<VmConfig, RequestError> {
    let Some(c) = req.config.as_ref() else {
        return Err(invalid("config", "missing"));
    };
    let boot = match &c.BootConfig {
        Some(pb::vmconfig::BootConfig::DirectBoot(d)) => Boot {
            linux_kernel_direct: Some(LinuxKernelDirect {
                kernel: PathBuf::from(&d.kernel_path),
                initrd: (!d.initrd_path.is_empty()).then(|| PathBuf::from(&d.initrd_path)),
                cmdline: d.kernel_cmdline.clone(),
            }),
            uefi: None,
        },
        Some(pb::vmconfig::BootConfig::Uefi(u)) => Boot {
            uefi: Some(UefiBoot {
                dir: PathBuf::from(&u.firmware_path),
                path: u.device_path.clone(),
                args: u.optional_data.clone(),
            }),
            linux_kernel_direct: None,
        },
        None => return Err(invalid("config.BootConfig", "missing: direct_boot or uefi")),
    };
    let mut cfg = VmConfig {
        boot,
        ..VmConfig::default()
    };
    let Some(m) = c.memory_config.as_ref() else {
        return Err(invalid("config.memory_config", "missing"));
    };
    cfg.memory = Memory {
        size_mb: m.memory_mb,
        backing: if m.allow_overcommit {
            MemoryBackingType::Virtual
        } else {
            MemoryBackingType::Physical
        },
        deferred_commit: m.deferred_commit,
        hot_hint: m.hot_hint,
        cold_hint: m.cold_hint,
        cold_discard_hint: m.cold_discard_hint,
        mmio: (m.low_mmio_gap_in_mb != 0
            || m.high_mmio_base_in_mb != 0
            || m.high_mmio_gap_in_mb != 0)
            .then_some(Mmio {
                low_gap_mb: m.low_mmio_gap_in_mb,
                high_base_mb: m.high_mmio_base_in_mb,
                high_gap_mb: m.high_mmio_gap_in_mb,
            }),
    };
    let Some(p) = c.processor_config.as_ref() else {
        return Err(invalid("config.processor_config", "missing"));
    };
    if p.processor_weight != 0 || p.processor_limit != 0 {
        return Err(unimplemented(
            "config.processor_config",
            "processor weight and limit are not part of uvmctl's model",
        ));
    }
    cfg.processors = Processors {
        count: p.processor_count,
    };
    if let Some(d) = c.devices_config.as_ref() {
        for (i, disk) in d.scsi_disks.iter().enumerate() {
            let field = format!("config.devices_config.scsi_disks[{i}]");
            let item = ScsiDisk {
                lun: disk.lun,
                path: PathBuf::from(&disk.host_path),
                disk_type: disk_type(disk.type_, &format!("{field}.type"))?,
                read_only: disk.read_only,
            };
            match cfg
                .scsi_controllers
                .iter_mut()
                .find(|c| c.id == disk.controller)
            {
                Some(ctl) => ctl.disks.push(item),
                None => cfg.scsi_controllers.push(ScsiController {
                    id: disk.controller,
                    disks: vec![item],
                }),
            }
        }
        if !d.vpmem_disks.is_empty() {
            let mut devices = Vec::new();
            for (i, disk) in d.vpmem_disks.iter().enumerate() {
                let field = format!("config.devices_config.vpmem_disks[{i}]");
                devices.push(VpmemDevice {
                    id: u32::try_from(i).map_err(|_| invalid(&field, "too many"))?,
                    path: PathBuf::from(&disk.host_path),
                    format: vpmem_format(disk.type_, &format!("{field}.type"))?,
                    read_only: disk.read_only,
                });
            }
            cfg.vpmem = Some(Vpmem {
                maximum_devices: u32::try_from(devices.len()).unwrap_or(u32::MAX),
                maximum_size_bytes: VPMEM_DEVICE_BYTES,
                devices,
            });
        }
        cfg.network_adapters = d.nic_config.iter().map(nic).collect();
        cfg.pci_devices = d
            .windows_device
            .iter()
            .map(|w| PciDevice {
                instance_id: w.instance_id.clone(),
                vmbus_guid: None,
            })
            .collect();
    }
    if let Some(s) = c.serial_config.as_ref() {
        cfg.serial_consoles = s
            .ports
            .iter()
            .map(|p| SerialConsole {
                port: p.port,
                listener_path: PathBuf::from(&p.socket_path),
            })
            .collect();
    }
    if c.windows_options
        .as_ref()
        .is_some_and(|w| w.cpu_group_id != 0)
    {
        return Err(unimplemented(
            "config.windows_options.cpu_group_id",
            "CPU groups are named by GUID in uvmctl's model",
        ));
    }
    // Created, not started: ResumeVM starts it.
    cfg.power_state = crate::spec::PowerState::Stopped;
    validated(name, cfg)
}

/// `cfg` checked (and made canonical) by the spec validation.
pub fn validated(name: &str, cfg: VmConfig) -> Result<VmConfig, RequestError> {
    let mut doc = VmDocument {
        api_version: crate::spec::API_VERSION.into(),
        kind: crate::spec::KIND.into(),
        metadata: crate::spec::Metadata {
            name: name.into(),
            labels: Default::default(),
        },
        spec: cfg,
        status: None,
    };
    let problems = crate::spec::validate_document(&mut doc);
    if let Some((field, message)) = problems.into_iter().next() {
        return Err(invalid(&field, message));
    }
    Ok(doc.spec)
}

/// A protocol disk type for a SCSI disk type.
pub fn pb_disk_type(t: ScsiDiskType) -> pb::DiskType {
    match t {
        ScsiDiskType::Vhd1 => pb::DiskType::SCSI_DISK_TYPE_VHD1,
        ScsiDiskType::Vhdx => pb::DiskType::SCSI_DISK_TYPE_VHDX,
        ScsiDiskType::PassThrough => pb::DiskType::SCSI_DISK_TYPE_PHYSICAL,
    }
}

/// A protocol disk type for a VPMem image format.
pub fn pb_pmem_type(f: VPMemImageFormat) -> pb::DiskType {
    match f {
        VPMemImageFormat::Vhd1 => pb::DiskType::SCSI_DISK_TYPE_VHD1,
        VPMemImageFormat::Vhdx => pb::DiskType::SCSI_DISK_TYPE_VHDX,
    }
}

fn pb_scsi(controller: u32, disk: &ScsiDisk) -> pb::SCSIDisk {
    let mut s = pb::SCSIDisk::new();
    s.controller = controller;
    s.lun = disk.lun;
    s.host_path = disk.path.display().to_string();
    s.type_ = pb_disk_type(disk.disk_type).into();
    s.read_only = disk.read_only;
    s
}

fn pb_vpmem(dev: &VpmemDevice) -> pb::VPMEMDisk {
    let mut x = pb::VPMEMDisk::new();
    x.host_path = dev.path.display().to_string();
    x.type_ = pb_pmem_type(dev.format).into();
    x.read_only = dev.read_only;
    x
}

fn pb_nic(n: &NetworkAdapter) -> pb::NICConfig {
    let mut x = pb::NICConfig::new();
    x.nic_id = n.nic_id.clone();
    x.port_id = n.endpoint_id.clone();
    x.mac_address = n.mac_address.clone();
    x
}

fn pb_pci(p: &PciDevice) -> pb::WindowsPCIDevice {
    let mut x = pb::WindowsPCIDevice::new();
    x.instance_id = p.instance_id.clone();
    x
}

/// The protocol's `VMConfig` for a VM configuration (what `CreateVM` takes).
pub fn to_pb(cfg: &VmConfig) -> pb::VMConfig {
    let mut c = pb::VMConfig::new();
    if let Some(k) = &cfg.boot.linux_kernel_direct {
        let mut d = pb::DirectBoot::new();
        d.kernel_path = k.kernel.display().to_string();
        d.initrd_path = k
            .initrd
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        d.kernel_cmdline = k.cmdline.clone();
        c.set_direct_boot(d);
    } else if let Some(u) = &cfg.boot.uefi {
        let mut e = pb::UEFI::new();
        e.firmware_path = u.dir.display().to_string();
        e.device_path = u.path.clone();
        e.optional_data = u.args.clone();
        c.set_uefi(e);
    }
    let mut m = pb::MemoryConfig::new();
    m.memory_mb = cfg.memory.size_mb;
    m.allow_overcommit = cfg.memory.backing == MemoryBackingType::Virtual;
    m.deferred_commit = cfg.memory.deferred_commit;
    m.hot_hint = cfg.memory.hot_hint;
    m.cold_hint = cfg.memory.cold_hint;
    m.cold_discard_hint = cfg.memory.cold_discard_hint;
    if let Some(g) = &cfg.memory.mmio {
        m.low_mmio_gap_in_mb = g.low_gap_mb;
        m.high_mmio_base_in_mb = g.high_base_mb;
        m.high_mmio_gap_in_mb = g.high_gap_mb;
    }
    c.memory_config = Some(m).into();
    let mut p = pb::ProcessorConfig::new();
    p.processor_count = cfg.processors.count;
    c.processor_config = Some(p).into();
    let mut d = pb::DevicesConfig::new();
    for ctl in &cfg.scsi_controllers {
        for disk in &ctl.disks {
            d.scsi_disks.push(pb_scsi(ctl.id, disk));
        }
    }
    if let Some(v) = &cfg.vpmem {
        let mut devices: Vec<&VpmemDevice> = v.devices.iter().collect();
        // The protocol numbers VPMem devices by their place in the list.
        devices.sort_by_key(|d| d.id);
        d.vpmem_disks = devices.into_iter().map(pb_vpmem).collect();
    }
    d.nic_config = cfg.network_adapters.iter().map(pb_nic).collect();
    d.windows_device = cfg.pci_devices.iter().map(pb_pci).collect();
    c.devices_config = Some(d).into();
    if !cfg.serial_consoles.is_empty() {
        let mut s = pb::SerialConfig::new();
        for sc in &cfg.serial_consoles {
            let mut p = pb::serial_config::Config::new();
            p.port = sc.port;
            p.socket_path = sc.listener_path.display().to_string();
            s.ports.push(p);
        }
        c.serial_config = Some(s).into();
    }
    c
}

/// The protocol's resources and uvmctl's.
const RESOURCES: &[(PbResource, Resource)] = &[
    (PbResource::Vpmem, Resource::VPMem),
    (PbResource::Scsi, Resource::Scsi),
    (PbResource::Vpci, Resource::Pci),
    (PbResource::Plan9, Resource::Plan9),
    (PbResource::VMNic, Resource::Network),
    (PbResource::Memory, Resource::Memory),
    (PbResource::Processor, Resource::Processor),
];

/// What `CapabilitiesVM` answers, in the protocol's meaning: Processor Add
/// and Remove are one processor more or less (uvmctl's processor update),
/// Processor Update is weight and limit (not in uvmctl's model), Plan9 has
/// no `ModifyResource` message. Where the answer depends on the VM (memory
/// resizes need hot-pluggable memory), `vm` narrows it.
pub fn capabilities(caps: &Capabilities, vm: Option<&ObservedVm>) -> pb::CapabilitiesVMResponse {
    use ResourceOperation::*;
    let mut out = pb::CapabilitiesVMResponse::new();
    for (p, r) in RESOURCES {
        let mut s = SupportedResource::new();
        s.resource = (*p).into();
        match r {
            Resource::Processor => {
                let resize = caps.supported(*r, Update);
                (s.Add, s.Remove, s.Update) = (resize, resize, false);
            }
            Resource::Memory => {
                // A VM reporting no hot-pluggable range cannot resize live.
                let hot = vm
                    .and_then(|v| v.memory_hotplug)
                    .is_none_or(|h| h.max_mb > h.min_mb);
                (s.Add, s.Remove, s.Update) = (false, false, caps.supported(*r, Update) && hot);
            }
            Resource::Plan9 => (s.Add, s.Remove, s.Update) = (false, false, false),
            // The protocol names no slot: an add takes a free one.
            Resource::VPMem => {
                let free = vm.is_none_or(|v| vpmem_slot(&v.config).is_some());
                s.Add = caps.supported(*r, Add) && free;
                s.Remove = caps.supported(*r, Remove);
                s.Update = caps.supported(*r, Update);
            }
            _ => {
                s.Add = caps.supported(*r, Add);
                s.Remove = caps.supported(*r, Remove);
                s.Update = caps.supported(*r, Update);
            }
        }
        out.supported_resources.push(s);
    }
    for os in &caps.guest_os {
        out.supported_guest_os.push(
            match os {
                GuestOs::Linux => SupportedGuestOS::Linux,
                GuestOs::Windows => SupportedGuestOS::Windows,
            }
            .into(),
        );
    }
    out
}

/// The lowest VPMem slot of `config` no device takes.
fn vpmem_slot(config: &VmConfig) -> Option<u32> {
    let v = config.vpmem.as_ref()?;
    (0..v.maximum_devices).find(|i| !v.devices.iter().any(|d| d.id == *i))
}

/// Why a VM refuses what the virtstack offers in general (its
/// `CapabilitiesVM` answer narrowed it), as the plan would say it.
pub fn narrowed_reason(vm: &ObservedVm, resource: Resource) -> String {
    match (resource, vm.memory_hotplug) {
        (Resource::Memory, Some(h)) if h.max_mb <= h.min_mb => format!(
            "memory is fixed at {} MB while this VM runs (physical backing, allow_overcommit false, has no hot-pluggable memory); a resize needs a restart",
            h.min_mb
        ),
        (Resource::VPMem, _) => "every VPMem slot of this VM is taken".into(),
        _ => format!("this VM cannot change its {resource} live"),
    }
}

/// The capabilities (named `virtstack`) a `CapabilitiesVM` answer
/// describes: the inverse of [`capabilities`], with what the protocol has
/// no message for unsupported.
pub fn capabilities_from(virtstack: &str, resp: &pb::CapabilitiesVMResponse) -> Capabilities {
    use ResourceOperation::*;
    let mut c = Capabilities::new(virtstack);
    let none = || Support::unsupported("the vmservice protocol has no message for it");
    for r in Resource::ALL {
        c.set_all(r, none(), none(), none());
    }
    // VMSocket is a message of its own, which CapabilitiesVM does not list:
    // a server's answer cannot say whether it serves it (uvmctl's own
    // serve is known to: `remotevm::own_server_capabilities`).
    let unsaid = || {
        Support::unsupported(
            "CapabilitiesVM does not say whether this server answers VMSocket; uvmctl does not assume it",
        )
    };
    for r in [Resource::VmSocket, Resource::HvSocket] {
        c.set_all(r, unsaid(), unsaid(), unsaid());
    }
    let support = |yes: bool| {
        if yes {
            Support::live()
        } else {
            Support::unsupported("the vmservice server does not do it on a running VM")
        }
    };
    for s in &resp.supported_resources {
        let Ok(p) = s.resource.enum_value() else {
            continue;
        };
        let Some((_, r)) = RESOURCES.iter().find(|(x, _)| *x == p) else {
            continue;
        };
        match r {
            // Listed, but ModifyResource has no Plan9 message.
            Resource::Plan9 => {}
            Resource::Processor => {
                c.set(*r, Update, support(s.Add && s.Remove));
            }
            Resource::Memory => {
                c.set(*r, Update, support(s.Update));
            }
            _ => {
                c.set(*r, Add, support(s.Add));
                c.set(*r, Remove, support(s.Remove));
                c.set(*r, Update, support(s.Update));
            }
        }
    }
    // Given only at CreateVM: a change is a restart (the VM is created again
    // from its new configuration). An empty controller cannot be given at
    // all: the protocol names controllers only through their disks.
    let cold =
        |what: &str| Support::restart(format!("{what} are given only when the VM is created"));
    c.set_all(
        Resource::ScsiController,
        cold("SCSI controllers (with their disks)"),
        cold("SCSI controllers (with their disks)"),
        Support::unsupported("a controller has no settings"),
    );
    c.set_all(
        Resource::Serial,
        cold("serial consoles"),
        cold("serial consoles"),
        cold("serial consoles"),
    );
    for os in &resp.supported_guest_os {
        match os.enum_value() {
            Ok(SupportedGuestOS::Linux) => {
                c.guest_os.insert(GuestOs::Linux);
            }
            Ok(SupportedGuestOS::Windows) => {
                c.guest_os.insert(GuestOs::Windows);
            }
            Err(_) => {}
        }
    }
    c
}

/// Whether a `CapabilitiesVM` answer offers `operation` on `resource`, in
/// uvmctl's terms (`None`: the protocol does not list it, e.g. vsock).
pub fn offers(
    resp: &pb::CapabilitiesVMResponse,
    resource: Resource,
    operation: ResourceOperation,
) -> Option<bool> {
    let (p, _) = RESOURCES.iter().find(|(_, r)| *r == resource)?;
    let s = resp
        .supported_resources
        .iter()
        .find(|s| s.resource.enum_value().ok() == Some(*p))?;
    Some(match (resource, operation) {
        (Resource::Processor, ResourceOperation::Update) => s.Add && s.Remove,
        (_, ResourceOperation::Add) => s.Add,
        (_, ResourceOperation::Remove) => s.Remove,
        (_, ResourceOperation::Update) => s.Update,
    })
}

/// A change as the protocol carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum Wire {
    /// `ModifyResource`.
    Modify(pb::ModifyResourceRequest),
    /// `VMSocket`.
    Socket(pb::VMSocketRequest),
}

fn modify(ty: pb::ModifyType, resource: Modify) -> Wire {
    let mut req = pb::ModifyResourceRequest::new();
    req.type_ = ty.into();
    req.resource = Some(resource);
    Wire::Modify(req)
}

fn wire_type(op: ResourceOperation) -> pb::ModifyType {
    match op {
        ResourceOperation::Add => pb::ModifyType::ADD,
        ResourceOperation::Remove => pb::ModifyType::REMOVE,
        ResourceOperation::Update => pb::ModifyType::UPDATE,
    }
}

fn op_of(ty: EnumOrUnknown<pb::ModifyType>) -> Result<ResourceOperation, RequestError> {
    Ok(match known(ty, "type")? {
        pb::ModifyType::ADD => ResourceOperation::Add,
        pb::ModifyType::REMOVE => ResourceOperation::Remove,
        pb::ModifyType::UPDATE => ResourceOperation::Update,
    })
}

/// The requests that make `change` on a VM that has `have` (the client's
/// side); what the protocol has no message for is `Unimplemented`.
pub fn to_wire(change: &Change, have: &VmConfig) -> Result<Vec<Wire>, RequestError> {
    let op = change.operation();
    let ty = wire_type(op);
    let no_message = || {
        Err(unimplemented(
            &change.label(),
            "the vmservice protocol has no message for it",
        ))
    };
    Ok(match (change, change.item()) {
        (Change::Update { .. }, Item::Processors(n)) => {
            let (step, count) = if *n >= have.processors.count {
                (pb::ModifyType::ADD, n - have.processors.count)
            } else {
                (pb::ModifyType::REMOVE, have.processors.count - n)
            };
            let one = modify(step, Modify::Processor(pb::ModifyProcessorRequest::new()));
            vec![one; count as usize]
        }
        (Change::Update { .. }, Item::Memory(mb)) => {
            let mut m = pb::ModifyMemoryRequest::new();
            m.memory_mb = *mb;
            vec![modify(ty, Modify::Memory(m))]
        }
        (_, Item::ScsiDisk(d)) => {
            vec![modify(ty, Modify::ScsiDisk(pb_scsi(d.controller, &d.disk)))]
        }
        (_, Item::VpmemDevice(d)) => vec![modify(ty, Modify::VpmemDisk(pb_vpmem(d)))],
        (_, Item::NetworkAdapter(n)) => vec![modify(ty, Modify::NicConfig(pb_nic(n)))],
        (_, Item::PciDevice(p)) => vec![modify(ty, Modify::WindowsDevice(pb_pci(p)))],
        (_, Item::VmSocket(s)) if s.socket_type == VMSocketType::VSock => {
            let mut req = pb::VMSocketRequest::new();
            req.type_ = ty.into();
            let mut v = pb::VSockListen::new();
            v.port = s.port.unwrap_or_default();
            if op != ResourceOperation::Remove {
                v.listener_path = s.listener_path.display().to_string();
            }
            req.set_vsock_listen(v);
            vec![Wire::Socket(req)]
        }
        _ => return no_message(),
    })
}

/// The changes a `ModifyResource` request makes on a VM that has `have`
/// (the server's side): a disk on a controller the VM lacks brings the
/// controller; a VPMem device takes the lowest free slot.
pub fn from_modify(
    req: &pb::ModifyResourceRequest,
    have: &VmConfig,
) -> Result<Vec<Change>, RequestError> {
    let op = op_of(req.type_)?;
    let Some(resource) = &req.resource else {
        return Err(invalid("resource", "missing"));
    };
    let in_place = |what: &str| {
        Err(unimplemented(
            "type",
            format!("{what} is not updated in place"),
        ))
    };
    match resource {
        Modify::ScsiDisk(d) => {
            let disk = ScsiDisk {
                lun: d.lun,
                path: PathBuf::from(&d.host_path),
                disk_type: disk_type(d.type_, "scsi_disk.type")?,
                read_only: d.read_only,
            };
            let controller = have.scsi_controllers.iter().find(|c| c.id == d.controller);
            let present = controller.and_then(|c| c.disks.iter().find(|x| x.lun == d.lun));
            match (op, present) {
                (ResourceOperation::Add, Some(_)) => Err(RequestError::Exists(format!(
                    "SCSI {}:{} is attached",
                    d.controller, d.lun
                ))),
                (ResourceOperation::Add, None) => {
                    let mut out = Vec::new();
                    if controller.is_none() {
                        out.push(Change::Add(Item::ScsiController(d.controller)));
                    }
                    out.push(Change::Add(Item::ScsiDisk(ScsiDiskItem {
                        controller: d.controller,
                        disk,
                    })));
                    Ok(out)
                }
                (ResourceOperation::Remove, Some(x)) => {
                    Ok(vec![Change::Remove(Item::ScsiDisk(ScsiDiskItem {
                        controller: d.controller,
                        disk: x.clone(),
                    }))])
                }
                (ResourceOperation::Remove, None) => Err(RequestError::NotFound(format!(
                    "no SCSI disk at {}:{}",
                    d.controller, d.lun
                ))),
                (ResourceOperation::Update, _) => in_place("a SCSI disk"),
            }
        }
        Modify::VpmemDisk(d) => {
            let format = vpmem_format(d.type_, "vpmem_disk.type")?;
            let v = have.vpmem.as_ref();
            let devices = v.map(|v| v.devices.as_slice()).unwrap_or_default();
            match op {
                ResourceOperation::Add => {
                    let slots = v.map_or(0, |v| v.maximum_devices);
                    let id = (0..slots)
                        .find(|i| !devices.iter().any(|x| x.id == *i))
                        .ok_or_else(|| {
                            RequestError::Precondition("every VPMem slot is taken".into())
                        })?;
                    Ok(vec![Change::Add(Item::VpmemDevice(VpmemDevice {
                        id,
                        path: PathBuf::from(&d.host_path),
                        format,
                        read_only: d.read_only,
                    }))])
                }
                ResourceOperation::Remove => devices
                    .iter()
                    .find(|x| x.path == std::path::Path::new(&d.host_path))
                    .map(|x| vec![Change::Remove(Item::VpmemDevice(x.clone()))])
                    .ok_or_else(|| {
                        RequestError::NotFound(format!("no VPMem device for {}", d.host_path))
                    }),
                ResourceOperation::Update => in_place("a VPMem device"),
            }
        }
        Modify::NicConfig(n) => {
            let nic = nic(n);
            let present = have
                .network_adapters
                .iter()
                .find(|x| x.nic_id.eq_ignore_ascii_case(&nic.nic_id));
            match (op, present) {
                (ResourceOperation::Add, Some(_)) => {
                    Err(RequestError::Exists(format!("NIC {} exists", nic.nic_id)))
                }
                (ResourceOperation::Add, None) => Ok(vec![Change::Add(Item::NetworkAdapter(nic))]),
                (ResourceOperation::Remove, Some(x)) => {
                    Ok(vec![Change::Remove(Item::NetworkAdapter(x.clone()))])
                }
                (ResourceOperation::Remove, None) => {
                    Err(RequestError::NotFound(format!("no NIC {}", nic.nic_id)))
                }
                (ResourceOperation::Update, _) => in_place("a NIC"),
            }
        }
        Modify::Memory(m) => {
            if op != ResourceOperation::Update {
                return Err(invalid("type", "memory is only updated"));
            }
            Ok(vec![Change::Update {
                before: Item::Memory(have.memory.size_mb),
                after: Item::Memory(m.memory_mb),
            }])
        }
        Modify::Processor(_) => {
            let n = have.processors.count;
            let to = match op {
                ResourceOperation::Add => n.saturating_add(1),
                ResourceOperation::Remove if n > 1 => n - 1,
                ResourceOperation::Remove => {
                    return Err(RequestError::Precondition(
                        "the last processor stays".into(),
                    ));
                }
                ResourceOperation::Update => {
                    return Err(invalid(
                        "type",
                        "processors are added or removed one at a time (processor_config is their weight and limit)",
                    ));
                }
            };
            Ok(vec![Change::Update {
                before: Item::Processors(n),
                after: Item::Processors(to),
            }])
        }
        Modify::ProcessorConfig(_) => Err(unimplemented(
            "processor_config",
            "processor weight and limit are not part of uvmctl's model",
        )),
        Modify::WindowsDevice(w) => {
            let present = have
                .pci_devices
                .iter()
                .find(|p| p.instance_id.eq_ignore_ascii_case(&w.instance_id));
            match (op, present) {
                (ResourceOperation::Add, Some(_)) => Err(RequestError::Exists(format!(
                    "PCI device {} is assigned",
                    w.instance_id
                ))),
                (ResourceOperation::Add, None) => {
                    Ok(vec![Change::Add(Item::PciDevice(PciDevice {
                        instance_id: w.instance_id.clone(),
                        vmbus_guid: None,
                    }))])
                }
                (ResourceOperation::Remove, Some(p)) => {
                    Ok(vec![Change::Remove(Item::PciDevice(p.clone()))])
                }
                (ResourceOperation::Remove, None) => Err(RequestError::NotFound(format!(
                    "no PCI device {}",
                    w.instance_id
                ))),
                (ResourceOperation::Update, _) => in_place("a PCI device"),
            }
        }
    }
}

/// The change a `VMSocket` request makes on a VM that has `have`.
pub fn from_socket(req: &pb::VMSocketRequest, have: &VmConfig) -> Result<Change, RequestError> {
    let op = op_of(req.type_)?;
    let v = match &req.Config {
        Some(pb::vmsocket_request::Config::VsockListen(v)) => v,
        Some(pb::vmsocket_request::Config::HvsocketList(_)) => {
            return Err(unimplemented(
                "hvsocket_list",
                "HvSocket is a Hyper-V transport; use vsock",
            ));
        }
        None => return Err(invalid("Config", "missing")),
    };
    let present = have
        .vm_sockets
        .iter()
        .find(|s| s.socket_type == VMSocketType::VSock && s.port == Some(v.port));
    let wanted = Item::VmSocket(VmSocket {
        socket_type: VMSocketType::VSock,
        service_id: None,
        port: Some(v.port),
        listener_path: PathBuf::from(&v.listener_path),
    });
    match (op, present) {
        (ResourceOperation::Remove, Some(s)) => Ok(Change::Remove(Item::VmSocket(s.clone()))),
        (ResourceOperation::Remove, None) => Err(RequestError::NotFound(format!(
            "no vsock listener on port {}",
            v.port
        ))),
        (_, Some(s)) => Ok(Change::Update {
            before: Item::VmSocket(s.clone()),
            after: wanted,
        }),
        (_, None) => Ok(Change::Add(wanted)),
    }
}

#[cfg(test)]
mod tests;
