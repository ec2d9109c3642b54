//! The QEMU devices uvmctl makes, as JSON: their ids, and the device,
//! block-node, netdev and object arguments both the command line and
//! hot-plug use, so a device added live is the device a launch makes.

use super::images::{HostFile, scsi_format_driver};
use super::state::Placement;
use crate::spec::VmConfig;
use crate::vm::MemoryBackingType;
use serde_json::{Value, json};

/// vCPUs can be hot-added up to this many (or the spec's count, if higher).
pub const MAX_HOTPLUG_CPUS: u32 = 8;

/// How far memory grows live, and in what blocks (stated with the
/// capabilities, which say them on every platform).
pub use super::caps::{MEMORY_BLOCK_MB, MEMORY_HOTPLUG_FACTOR};

/// The ids of the `-device` arguments of `argv`.
pub fn device_ids(argv: &[String]) -> std::collections::BTreeSet<String> {
    argv.windows(2)
        .filter(|w| w[0] == "-device")
        .filter_map(|w| serde_json::from_str::<Value>(&w[1]).ok())
        .filter_map(|d| d.get("id").and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// Adds `placement` properties to the `-device` arguments of `argv` whose id
/// has one.
pub fn place_devices(argv: &mut [String], placement: &Placement) {
    let mut after_device = false;
    for arg in argv.iter_mut() {
        if std::mem::replace(&mut after_device, arg == "-device")
            && let Ok(Value::Object(mut dev)) = serde_json::from_str::<Value>(arg)
            && let Some(props) = dev
                .get("id")
                .and_then(Value::as_str)
                .and_then(|id| placement.get(id))
        {
            for (k, v) in props {
                dev.insert(k.clone(), v.clone());
            }
            *arg = Value::Object(dev).to_string();
        }
    }
}

/// Device and node ids: stable names QEMU reports back, so observe can map
/// what it finds to spec keys.
pub mod ids {
    /// SCSI controller.
    pub fn scsi_controller(id: u32) -> String {
        format!("scsi{id}")
    }
    /// SCSI disk device; also its top (throttle) node.
    pub fn scsi_disk(controller: u32, lun: u32) -> String {
        format!("disk-{controller}-{lun}")
    }
    /// SCSI disk format node (under the throttle node).
    pub fn scsi_disk_format(controller: u32, lun: u32) -> String {
        format!("disk-{controller}-{lun}-fmt")
    }
    /// SCSI disk protocol (file) node.
    pub fn scsi_disk_file(controller: u32, lun: u32) -> String {
        format!("disk-{controller}-{lun}-file")
    }
    /// A disk's block nodes, top first (the order to delete them in).
    pub fn scsi_disk_nodes(controller: u32, lun: u32) -> [String; 3] {
        [
            scsi_disk(controller, lun),
            scsi_disk_format(controller, lun),
            scsi_disk_file(controller, lun),
        ]
    }
    /// The VM's throttle group: storage QoS shared by all its disks.
    pub const QOS_GROUP: &str = "qos";
    /// NIC device.
    pub fn nic(nic_id: &str) -> String {
        format!("nic-{nic_id}")
    }
    /// NIC backend.
    pub fn netdev(nic_id: &str) -> String {
        format!("net-{nic_id}")
    }
    /// Plan9 device.
    pub fn plan9(name: &str) -> String {
        format!("p9-{name}")
    }
    /// Plan9 fsdev.
    pub fn fsdev(name: &str) -> String {
        format!("fs-{name}")
    }
    /// NVDIMM device.
    pub fn pmem(id: u32) -> String {
        format!("pmem-{id}")
    }
    /// NVDIMM memory backend.
    pub fn pmem_backend(id: u32) -> String {
        format!("pmem-{id}-mem")
    }
    /// The virtio-mem device holding memory added on top of boot memory.
    pub const HOTPLUG_MEM: &str = "hotmem";
    /// Its memory backend.
    pub const HOTPLUG_MEM_BACKEND: &str = "hotmem-ram";
    /// The guest's boot memory, when shared.
    pub const RAM: &str = "ram";
}

/// MiB of hot-pluggable memory (the virtio-mem region) for a VM booting with
/// `boot_mb`: up to [`MEMORY_HOTPLUG_FACTOR`] times that, in whole blocks.
/// None when the memory cannot be resized live: pinned memory
/// (`-overcommit mem-lock`) is incompatible with virtio-mem.
pub fn hotplug_memory_mb(cfg: &VmConfig) -> Option<u64> {
    if cfg.memory.backing == MemoryBackingType::Physical {
        return None;
    }
    let room = cfg.memory.size_mb * (MEMORY_HOTPLUG_FACTOR - 1);
    let room = room - room % MEMORY_BLOCK_MB;
    (room > 0).then_some(room)
}

/// JSON arguments to create one SCSI disk: three block nodes and a device.
/// `filename` is the fd set QEMU holds the opened `image` in
/// (`/dev/fdset/N`).
pub fn scsi_disk_args(
    controller: u32,
    disk: &crate::spec::ScsiDisk,
    image: &HostFile,
    filename: &str,
) -> (Vec<Value>, Value) {
    let protocol =
        if disk.disk_type == crate::vm::ScsiDiskType::PassThrough && image.is_block_device() {
            "host_device"
        } else {
            "file"
        };
    let [top, format, file] = ids::scsi_disk_nodes(controller, disk.lun);
    // Bottom up: file, format (stated, never probed), then the throttle
    // filter that puts the disk under the VM's storage QoS.
    let nodes = vec![
        json!({"driver": protocol, "node-name": file, "filename": filename, "read-only": disk.read_only}),
        json!({"driver": scsi_format_driver(disk.disk_type), "node-name": format, "file": file, "read-only": disk.read_only}),
        json!({"driver": "throttle", "node-name": top, "throttle-group": ids::QOS_GROUP, "file": format, "read-only": disk.read_only}),
    ];
    let device = json!({
        "driver": "scsi-hd",
        "id": top,
        "bus": format!("{}.0", ids::scsi_controller(controller)),
        "scsi-id": 0,
        "lun": disk.lun,
        "drive": top,
    });
    (nodes, device)
}

/// QEMU throttle limits for a storage QoS (0 = unlimited).
pub fn qos_limits(q: Option<&crate::spec::StorageQos>) -> Value {
    json!({
        "iops-total": q.and_then(|q| q.iops_maximum).unwrap_or(0),
        "bps-total": q.and_then(|q| q.bandwidth_maximum).unwrap_or(0),
    })
}

/// Whether a NIC's endpoint is a tap device (else QEMU's user networking).
pub fn is_tap(n: &crate::spec::NetworkAdapter) -> bool {
    n.endpoint_id != "user"
}

/// JSON arguments to create one NIC: backend and device. A tap's backend
/// takes the descriptor uvmctl opened (`tap_fd`: its number at launch, its
/// `getfd` name on a running VM); QEMU never opens the tap itself.
pub fn nic_args(n: &crate::spec::NetworkAdapter, tap_fd: &str) -> (Value, Value) {
    let netdev = if is_tap(n) {
        json!({"type": "tap", "id": ids::netdev(&n.nic_id), "fd": tap_fd, "vhost": false})
    } else {
        json!({"type": "user", "id": ids::netdev(&n.nic_id)})
    };
    let device = json!({
        "driver": "virtio-net-pci",
        "id": ids::nic(&n.nic_id),
        "netdev": ids::netdev(&n.nic_id),
        "mac": n.mac_address.replace('-', ":").to_ascii_lowercase(),
    });
    (netdev, device)
}

/// JSON arguments to create one NVDIMM: memory backend and device.
/// `mem_path` names the descriptor QEMU holds the opened image as
/// (`/dev/fd/N`: memory backends do not take fd sets).
pub fn pmem_args(d: &crate::spec::VpmemDevice, mem_path: &str, size: u64) -> (Value, Value) {
    let backend = json!({
        "qom-type": "memory-backend-file",
        "id": ids::pmem_backend(d.id),
        "mem-path": mem_path,
        "size": size,
        "share": !d.read_only,
        "readonly": d.read_only,
    });
    let device =
        // A read-only backend needs an unarmed NVDIMM (the guest may not write it).
        json!({"driver": "nvdimm", "id": ids::pmem(d.id), "memdev": ids::pmem_backend(d.id), "unarmed": d.read_only});
    (backend, device)
}

/// The fd set opaque tag of a SCSI disk's file node, so a removal can find
/// the set again.
pub fn disk_fdset_opaque(controller: u32, lun: u32) -> String {
    ids::scsi_disk_file(controller, lun)
}
