//! The vmservice protocol's messages as uvmctl's model, and back. Requests
//! come from any client: every value is checked by the same validation as a
//! spec file (bounds, names, GUIDs, MACs, absolute paths), unknown enum
//! values and settings this translation has no place for are refused, and
//! nothing is created from a request that fails here.

use crate::protocol::vmservice as pb;
use crate::spec::{
    Boot, LinuxKernelDirect, Memory, Mmio, NetworkAdapter, PciDevice, Processors, ScsiController,
    ScsiDisk, SerialConsole, UefiBoot, VmConfig, VmDocument, Vpmem, VpmemDevice,
};
use crate::vm::{MemoryBackingType, ScsiDiskType, VPMemImageFormat};
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
        metadata: crate::spec::Metadata { name: name.into() },
        spec: cfg,
        status: None,
    };
    let problems = crate::spec::validate_document(&mut doc);
    if let Some((field, message)) = problems.into_iter().next() {
        return Err(invalid(&field, message));
    }
    Ok(doc.spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::CreateVMRequest {
        let mut boot = pb::DirectBoot::new();
        boot.kernel_path = "/var/cache/uvmctl/guest/vmlinux".into();
        boot.initrd_path = "/var/cache/uvmctl/guest/initrd.img".into();
        boot.kernel_cmdline = "console=ttyS0".into();
        let mut mem = pb::MemoryConfig::new();
        mem.memory_mb = 256;
        mem.allow_overcommit = true;
        let mut cpu = pb::ProcessorConfig::new();
        cpu.processor_count = 2;
        let mut disk = pb::SCSIDisk::new();
        disk.controller = 0;
        disk.lun = 1;
        disk.host_path = "/var/lib/uvmctl/d.img".into();
        disk.type_ = pb::DiskType::SCSI_DISK_TYPE_PHYSICAL.into();
        let mut nic = pb::NICConfig::new();
        nic.nic_id = "6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01".into();
        nic.port_id = "user".into();
        nic.mac_address = "52-54-00-12-34-56".into();
        let mut devices = pb::DevicesConfig::new();
        devices.scsi_disks.push(disk);
        devices.nic_config.push(nic);
        let mut c = pb::VMConfig::new();
        c.set_direct_boot(boot);
        c.memory_config = Some(mem).into();
        c.processor_config = Some(cpu).into();
        c.devices_config = Some(devices).into();
        let mut r = pb::CreateVMRequest::new();
        r.config = Some(c).into();
        r
    }

    #[test]
    fn a_full_request_becomes_the_spec_model() {
        let cfg = vm_config("vm", &request()).expect("valid");
        assert_eq!(cfg.memory.size_mb, 256);
        assert_eq!(cfg.processors.count, 2);
        assert_eq!(cfg.scsi_controllers[0].disks[0].lun, 1);
        assert_eq!(cfg.network_adapters[0].endpoint_id, "user");
        assert_eq!(cfg.power_state, crate::spec::PowerState::Stopped);
    }

    fn edited(f: impl FnOnce(&mut pb::VMConfig)) -> pb::CreateVMRequest {
        let mut r = request();
        if let Some(c) = r.config.as_mut() {
            f(c);
        }
        r
    }

    #[test]
    fn bad_requests_name_the_field_and_say_why() {
        let r = edited(|c| c.memory_config.clear());
        assert_eq!(
            vm_config("vm", &r),
            Err(invalid("config.memory_config", "missing"))
        );
        let r = edited(|c| {
            if let Some(m) = c.memory_config.as_mut() {
                m.memory_mb = u64::MAX;
            }
        });
        let err = vm_config("vm", &r).expect_err("absurd memory");
        assert!(
            matches!(err, RequestError::Invalid { ref field, .. } if field == "spec.memory.sizeMB"),
            "{err}"
        );
        let r = edited(|c| {
            if let Some(d) = c.devices_config.as_mut() {
                d.scsi_disks[0].type_ = EnumOrUnknown::from_i32(7);
            }
        });
        assert_eq!(
            vm_config("vm", &r),
            Err(invalid(
                "config.devices_config.scsi_disks[0].type",
                "unknown enum value 7"
            ))
        );
        let r = edited(|c| c.BootConfig = None);
        assert!(matches!(
            vm_config("vm", &r),
            Err(RequestError::Invalid { .. })
        ));
        let r = edited(|c| {
            if let Some(d) = c.devices_config.as_mut() {
                d.scsi_disks[0].host_path = "relative.img".into();
            }
        });
        assert!(matches!(
            vm_config("vm", &r),
            Err(RequestError::Invalid { .. })
        ));
        let r = edited(|c| {
            if let Some(p) = c.processor_config.as_mut() {
                p.processor_weight = 5;
            }
        });
        assert!(matches!(
            vm_config("vm", &r),
            Err(RequestError::Unimplemented { .. })
        ));
    }
}
