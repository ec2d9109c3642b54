//! What the hcs virtstack sends: the create document for a [`VmConfig`]
//! (as hcsshim's builder made it) and the ModifySettingRequest for each
//! [`Change`] (as hcsshim's device managers sent them). Pure: the golden
//! tests and `plan --hcs-requests` read the same functions the virtstack
//! calls.

use super::schema::*;
use crate::vm::config::{
    Boot, NetworkAdapter as SpecNic, PciDevice, Plan9Share as SpecPlan9, VmConfig, VmSocket,
    VsmbShare,
};
use crate::vm::items::{Item, ScsiDiskItem};
use crate::vm::{Change, GuestOs, MemoryBackingType, ScsiDiskType, VMSocketType, VPMemImageFormat};

/// Who uvmctl's compute systems belong to (`Owner`).
pub const OWNER: &str = "uvmctl";

/// Who may bind and connect hvsocket services: SYSTEM and Administrators,
/// as hcsshim's builder set it.
pub const HV_SOCKET_SDDL: &str = "D:P(A;;FA;;;SY)(A;;FA;;;BA)";

/// The CPU group that is none (a VM leaves its group by joining it).
pub const NULL_CPU_GROUP: &str = "00000000-0000-0000-0000-000000000000";

/// Guest address space for directly mapped VSMB files, as hcsshim's builder.
const VSMB_DIRECT_FILE_MAPPING_MB: u64 = 1024;

/// `Plan9ShareFlags` (hcsshim's `plan9_share_flags.go`; the reference
/// does not list `Flags`).
const PLAN9_READ_ONLY: u32 = 0x1;
const PLAN9_RESTRICT_FILE_ACCESS: u32 = 0x80;

fn text(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The create document of `config`; `restore` names the file a save wrote,
/// to bring the guest back instead of booting it.
pub fn create_document(config: &VmConfig, restore: Option<&str>) -> ComputeSystem {
    let vm = VirtualMachine {
        stop_on_reset: true,
        chipset: chipset(&config.boot),
        compute_topology: ComputeTopology {
            memory: VirtualMachineMemory {
                size_in_mb: config.memory.size_mb,
                allow_overcommit: config.memory.backing == MemoryBackingType::Virtual,
                enable_deferred_commit: config.memory.deferred_commit,
                enable_hot_hint: config.memory.hot_hint,
                enable_cold_hint: config.memory.cold_hint,
                enable_cold_discard_hint: config.memory.cold_discard_hint,
                low_mmio_gap_in_mb: config.memory.mmio.map(|m| m.low_gap_mb),
                high_mmio_base_in_mb: config.memory.mmio.map(|m| m.high_base_mb),
                high_mmio_gap_in_mb: config.memory.mmio.map(|m| m.high_gap_mb),
            },
            processor: VirtualMachineProcessor {
                count: config.processors.count,
                cpu_group: config
                    .windows
                    .as_ref()
                    .and_then(|w| w.cpu_group.clone())
                    .map(|id| CpuGroup { id }),
            },
        },
        devices: devices(config),
        storage_qos: config.storage_qos.map(|q| StorageQoS {
            iops_maximum: q.iops_maximum,
            bandwidth_maximum: q.bandwidth_maximum,
        }),
        restore_state: restore.map(|path| RestoreState {
            save_state_file_path: path.to_string(),
        }),
    };
    let mut doc = ComputeSystem {
        owner: OWNER.to_string(),
        schema_version: Version { major: 2, minor: 1 },
        // Not hcsshim's `true`: hcsshim's shim held the handle for the VM's
        // life, but uvmctl's commands exit and the VM must outlive them;
        // `destroy` terminates it.
        should_terminate_on_last_handle_closed: false,
        virtual_machine: vm,
    };
    doc.schema_version.minor = required_minor(&doc);
    doc
}

/// The lowest schema 2.x minor version with every field the document uses
/// (SchemaReference.md gives the version each was added in): an older host
/// refuses the document as a whole instead of ignoring a field.
fn required_minor(doc: &ComputeSystem) -> u32 {
    let vm = &doc.virtual_machine;
    let mut minor = 1;
    let mut need = |v: u32, used: bool| {
        if used {
            minor = minor.max(v);
        }
    };
    let mem = &vm.compute_topology.memory;
    need(2, vm.chipset.linux_kernel_direct.is_some());
    need(2, mem.enable_cold_discard_hint);
    need(
        2,
        vm.devices
            .plan9
            .as_ref()
            .is_some_and(|p| p.shares.iter().any(|s| !s.allowed_files.is_empty())),
    );
    need(3, mem.low_mmio_gap_in_mb.is_some());
    need(3, !vm.devices.virtual_pci.is_empty());
    need(5, vm.compute_topology.processor.cpu_group.is_some());
    minor
}

fn chipset(boot: &Boot) -> Chipset {
    Chipset {
        uefi: boot.uefi.as_ref().map(|u| Uefi {
            boot_this: UefiBootEntry {
                device_type: "VmbFs".into(),
                device_path: u.path.clone(),
                vmb_fs_root_path: text(&u.dir),
                optional_data: u.args.clone(),
            },
        }),
        linux_kernel_direct: boot
            .linux_kernel_direct
            .as_ref()
            .map(|k| LinuxKernelDirect {
                kernel_file_path: text(&k.kernel),
                init_rd_path: k.initrd.as_deref().map(text),
                kernel_cmd_line: k.cmdline.clone(),
            }),
    }
}

fn devices(c: &VmConfig) -> Devices {
    let mut d = Devices {
        com_ports: c
            .serial_consoles
            .iter()
            .map(|s| {
                (
                    s.port.to_string(),
                    ComPort {
                        named_pipe: text(&s.listener_path),
                    },
                )
            })
            .collect(),
        scsi: c
            .scsi_controllers
            .iter()
            .map(|ctl| {
                let attachments = ctl
                    .disks
                    .iter()
                    .map(|disk| {
                        (
                            disk.lun.to_string(),
                            attachment(&ScsiDiskItem {
                                controller: ctl.id,
                                disk: disk.clone(),
                            }),
                        )
                    })
                    .collect();
                (ctl.id.to_string(), Scsi { attachments })
            })
            .collect(),
        virtual_pmem: c.vpmem.as_ref().map(|v| VirtualPMemController {
            devices: v
                .devices
                .iter()
                .map(|dev| (dev.id.to_string(), pmem_device(dev)))
                .collect(),
            maximum_count: v.maximum_devices,
            maximum_size_bytes: v.maximum_size_bytes,
        }),
        network_adapters: c
            .network_adapters
            .iter()
            .map(|n| (n.nic_id.clone(), nic(n)))
            .collect(),
        virtual_pci: c
            .pci_devices
            .iter()
            .map(|p| (pci_key(p), pci_device(p)))
            .collect(),
        hv_socket: Some(HvSocket2 {
            hv_socket_config: HvSocketSystemConfig {
                default_bind_security_descriptor: HV_SOCKET_SDDL.into(),
                service_table: c
                    .vm_sockets
                    .iter()
                    .filter(|s| s.socket_type == VMSocketType::HvSocket)
                    .filter_map(|s| Some((s.service_id.clone()?, hv_service())))
                    .collect(),
            },
        }),
        ..Devices::default()
    };
    // hcsshim's builder: Plan9 for a Linux guest, VSMB for Windows; each
    // present even when empty, so that shares can be added live.
    match c.guest_os {
        GuestOs::Linux => {
            d.plan9 = Some(Plan9 {
                shares: c.plan9_shares.iter().map(plan9_share).collect(),
            });
        }
        GuestOs::Windows => {
            d.virtual_smb = Some(VirtualSmb {
                shares: c.vsmb_shares.iter().map(vsmb_share).collect(),
                direct_file_mapping_in_mb: VSMB_DIRECT_FILE_MAPPING_MB,
            });
        }
    }
    d
}

fn attachment(item: &ScsiDiskItem) -> Attachment {
    Attachment {
        attachment_type: match item.disk.disk_type {
            ScsiDiskType::Vhd1 | ScsiDiskType::Vhdx => "VirtualDisk",
            ScsiDiskType::PassThrough => "PassThru",
        }
        .into(),
        path: text(&item.disk.path),
        read_only: item.disk.read_only,
    }
}

fn pmem_device(dev: &crate::vm::config::VpmemDevice) -> VirtualPMemDevice {
    VirtualPMemDevice {
        host_path: text(&dev.path),
        read_only: dev.read_only,
        image_format: match dev.format {
            VPMemImageFormat::Vhd1 => "Vhd1",
            VPMemImageFormat::Vhdx => "Vhdx",
        }
        .into(),
    }
}

fn nic(n: &SpecNic) -> NetworkAdapter {
    NetworkAdapter {
        endpoint_id: n.endpoint_id.clone(),
        mac_address: n.mac_address.clone(),
    }
}

fn plan9_share(s: &SpecPlan9) -> Plan9Share {
    let mut flags = s.flags;
    if s.read_only {
        flags |= PLAN9_READ_ONLY;
    }
    if !s.allowed_files.is_empty() {
        flags |= PLAN9_RESTRICT_FILE_ACCESS;
    }
    Plan9Share {
        name: s.name.clone(),
        access_name: s.name.clone(),
        path: Some(text(&s.host_path)),
        port: s.port,
        flags,
        allowed_files: s.allowed_files.clone(),
    }
}

fn vsmb_share(s: &VsmbShare) -> VirtualSmbShare {
    let o = &s.options;
    VirtualSmbShare {
        name: s.name.clone(),
        path: Some(text(&s.host_path)),
        allowed_files: s.allowed_files.clone(),
        options: Some(VirtualSmbShareOptions {
            read_only: o.read_only,
            cache_io: o.cache_io,
            no_oplocks: o.no_oplocks,
            take_backup_privilege: o.take_backup_privilege,
            no_directmap: o.no_direct_map,
            restrict_file_access: !s.allowed_files.is_empty(),
            pseudo_oplocks: o.pseudo_oplocks,
            pseudo_dirnotify: o.pseudo_dirnotify,
        }),
    }
}

/// The VMBus channel a PCI device is assigned on: the spec's, or one made
/// from its instance path (the same path always gets the same channel).
pub fn pci_key(p: &PciDevice) -> String {
    if let Some(guid) = &p.vmbus_guid {
        return guid.to_ascii_lowercase();
    }
    use sha2::Digest;
    let h = sha2::Sha256::digest(p.instance_id.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    // A name-based GUID (RFC 9562 layout: version 8, variant 10).
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x: Vec<String> = b.iter().map(|v| format!("{v:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        x[0..4].concat(),
        x[4..6].concat(),
        x[6..8].concat(),
        x[8..10].concat(),
        x[10..16].concat()
    )
}

fn pci_device(p: &PciDevice) -> VirtualPciDevice {
    VirtualPciDevice {
        functions: vec![VirtualPciFunction {
            device_instance_path: p.instance_id.clone(),
        }],
    }
}

fn hv_service() -> HvSocketServiceConfig {
    HvSocketServiceConfig {
        bind_security_descriptor: HV_SOCKET_SDDL.into(),
        connect_security_descriptor: HV_SOCKET_SDDL.into(),
        allow_wildcard_binds: true,
    }
}

fn hv_service_id(s: &VmSocket) -> Result<&str, String> {
    match (s.socket_type, &s.service_id) {
        (VMSocketType::HvSocket, Some(id)) => Ok(id),
        _ => Err("HCS has Hyper-V sockets only, named by a service GUID".into()),
    }
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    // Our own schema types: plain structs of strings, numbers and maps.
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn request(
    path: String,
    request_type: Option<RequestType>,
    settings: Option<serde_json::Value>,
) -> ModifySettingRequest {
    ModifySettingRequest {
        resource_path: path,
        request_type,
        settings,
    }
}

/// The ModifySettingRequest that makes `change` live; `Ok(None)` for a
/// change only uvmctl's record holds (the spec policy). An `Err` says why
/// HCS has no such request: the capabilities call those changes a restart
/// or a recreate, so the plan never sends them here.
pub fn modify_request(change: &Change) -> Result<Option<ModifySettingRequest>, String> {
    use RequestType::{Add, Remove, Update};
    let (add, item) = match change {
        Change::Add(i) => (true, i),
        Change::Remove(i) => (false, i),
        Change::Update { before, after } => {
            return match (before, after) {
                // A value path takes no RequestType: hcsshim's UpdateMemory
                // and SetCPUGroup send none (the reference lists these
                // paths as "No Limit").
                (Item::Memory(_), Item::Memory(mb)) => Ok(Some(request(
                    "VirtualMachine/ComputeTopology/Memory/SizeInMB".into(),
                    None,
                    Some(serde_json::json!(mb)),
                ))),
                (Item::CpuGroup(_), Item::CpuGroup(group)) => Ok(Some(request(
                    "VirtualMachine/ComputeTopology/Processor/CpuGroup".into(),
                    None,
                    Some(json(&CpuGroup {
                        id: group.clone().unwrap_or_else(|| NULL_CPU_GROUP.into()),
                    })),
                ))),
                (Item::Policy(_), Item::Policy(_)) => Ok(None),
                (before, _) => Err(format!(
                    "HCS has no in-place update of {}",
                    before.key().0.as_str()
                )),
            };
        }
    };
    let op = if add { Add } else { Remove };
    Ok(Some(match item {
        Item::ScsiDisk(d) => request(
            format!(
                "VirtualMachine/Devices/Scsi/{}/Attachments/{}",
                d.controller, d.disk.lun
            ),
            Some(op),
            add.then(|| json(&attachment(d))),
        ),
        Item::VpmemDevice(dev) => request(
            format!("VirtualMachine/Devices/VirtualPMem/Devices/{}", dev.id),
            Some(op),
            add.then(|| json(&pmem_device(dev))),
        ),
        // As hcsshim: the adapter is named in a removal too.
        Item::NetworkAdapter(n) => request(
            format!("VirtualMachine/Devices/NetworkAdapters/{}", n.nic_id),
            Some(op),
            Some(json(&nic(n))),
        ),
        Item::Plan9Share(s) => {
            let mut share = plan9_share(s);
            if !add {
                // A removal names the share: Name, AccessName and Port.
                share.path = None;
                share.flags = 0;
                share.allowed_files.clear();
            }
            request(
                "VirtualMachine/Devices/Plan9/Shares".into(),
                Some(op),
                Some(json(&share)),
            )
        }
        Item::VsmbShare(s) => {
            let share = if add {
                vsmb_share(s)
            } else {
                VirtualSmbShare {
                    name: s.name.clone(),
                    path: None,
                    allowed_files: Vec::new(),
                    options: None,
                }
            };
            request(
                "VirtualMachine/Devices/VirtualSmb/Shares".into(),
                Some(op),
                Some(json(&share)),
            )
        }
        Item::PciDevice(p) => request(
            format!("VirtualMachine/Devices/VirtualPci/{}", pci_key(p)),
            Some(op),
            add.then(|| json(&pci_device(p))),
        ),
        // hcsshim adds a service with Update (the table's entry is made
        // or replaced) and takes it out with Remove.
        Item::VmSocket(s) => request(
            format!(
                "VirtualMachine/Devices/HvSocket/HvSocketConfig/ServiceTable/{}",
                hv_service_id(s)?
            ),
            Some(if add { Update } else { Remove }),
            add.then(|| json(&hv_service())),
        ),
        Item::Policy(_) => return Ok(None),
        other => {
            return Err(format!(
                "HCS sets {} only when the compute system is created",
                other.key().0.as_str()
            ));
        }
    }))
}

/// `SaveOptions` for a save to `path`.
pub fn save_options(path: &str) -> SaveOptions {
    SaveOptions {
        save_type: "ToFile".into(),
        save_state_file_path: path.to_string(),
    }
}

/// What HCS refuses in `config` that the capability matrix does not say:
/// values out of HCS's types or formats (an endpoint that is not a GUID, a
/// COM port above 1). Pure; the pre-flight reports them.
pub fn refusals(config: &VmConfig) -> Vec<String> {
    let mut out = Vec::new();
    for n in &config.network_adapters {
        if crate::spec::parse_guid(&n.endpoint_id).is_none() {
            out.push(format!(
                "network adapter {}: endpointId {:?} is not a GUID (HCS names an HNS endpoint by its GUID)",
                n.nic_id, n.endpoint_id
            ));
        }
    }
    for s in &config.serial_consoles {
        if s.port > 1 {
            out.push(format!(
                "serial console {}: HCS has COM ports 0 and 1 only",
                s.port
            ));
        }
    }
    for s in &config.vm_sockets {
        if let Err(why) = hv_service_id(s) {
            out.push(format!("VM socket {}: {why}", s.address()));
        }
    }
    out
}
