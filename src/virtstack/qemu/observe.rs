//! Reading a running VM back from QEMU. Device presence, disk files, formats
//! and read-only flags, MACs, vCPU count, memory size and run state come from
//! QMP queries, so changes made behind uvmctl's back show in the next plan.
//! The launch record supplies what QEMU cannot report (cold settings, 9p host
//! paths, NIC endpoints) and the spec's spelling of paths QEMU resolved.

use super::devices::ids;
use super::ops;
use super::qmp::{Qmp, QmpError};
use super::state::LaunchRecord;
use crate::spec::{NetworkAdapter, ScsiController, ScsiDisk, VmConfig};
use crate::vm::{MemoryHotplug, ObservedVm};
use crate::vm::{ScsiDiskType, State};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One block node as QEMU reports it.
struct Node {
    driver: String,
    file: String,
    read_only: bool,
}

async fn block_nodes(q: &Qmp) -> Result<BTreeMap<String, Node>, QmpError> {
    let v = q
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .await?;
    let mut out = BTreeMap::new();
    for n in v.as_array().into_iter().flatten() {
        let (Some(name), Some(driver)) = (
            n.get("node-name").and_then(Value::as_str),
            n.get("drv").and_then(Value::as_str),
        ) else {
            continue;
        };
        out.insert(
            name.to_string(),
            Node {
                driver: driver.to_string(),
                file: n
                    .get("file")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                read_only: n.get("ro").and_then(Value::as_bool).unwrap_or(false),
            },
        );
    }
    Ok(out)
}

async fn qom_string(q: &Qmp, path: &str, property: &str) -> Result<Option<String>, QmpError> {
    match q
        .execute("qom-get", Some(json!({"path": path, "property": property})))
        .await
    {
        Ok(v) => Ok(v.as_str().map(str::to_string)),
        Err(QmpError::Command { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The spec's spelling of `resolved` if the record's path still resolves to
/// it (so a symlinked spec path is no change), else what QEMU has.
fn spec_path(recorded: Option<&Path>, resolved: &str) -> PathBuf {
    match recorded {
        Some(p) if std::fs::canonicalize(p).ok().as_deref() == Some(Path::new(resolved)) => {
            p.to_path_buf()
        }
        _ => PathBuf::from(resolved),
    }
}

/// The files QEMU holds in its fd sets, by set id: what `/proc/PID/fd`
/// says each set's descriptor is. A block node opened from an fd set names
/// only `/dev/fdset/N`; this is what file that really is, whatever was
/// renamed since, and whatever other set has the same tag. Empty where
/// QEMU's descriptors cannot be read.
async fn held_files(q: &Qmp, pid: Option<u32>) -> Result<BTreeMap<u64, String>, QmpError> {
    let Some(pid) = pid else {
        return Ok(BTreeMap::new());
    };
    let sets = q.execute("query-fdsets", None).await?;
    let mut out = BTreeMap::new();
    for set in sets.as_array().into_iter().flatten() {
        let Some(id) = set.get("fdset-id").and_then(Value::as_u64) else {
            continue;
        };
        for fd in set
            .get("fds")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(n) = fd.get("fd").and_then(Value::as_u64) else {
                continue;
            };
            if let Ok(target) = std::fs::read_link(format!("/proc/{pid}/fd/{n}"))
                && let Some(text) = target.to_str()
            {
                out.insert(id, text.to_string());
            }
        }
    }
    Ok(out)
}

/// The fd set a block node's file names (`/dev/fdset/N`).
fn fdset_of(file: &str) -> Option<u64> {
    file.strip_prefix("/dev/fdset/")?.parse().ok()
}

/// Like [`spec_path`] for a socket that may not exist yet: the spec's path
/// when it resolves (as the allowed-roots check did) to `target`.
fn socket_spec_path(recorded: Option<&Path>, target: &Path) -> PathBuf {
    let resolves_there = |p: &Path| {
        std::fs::canonicalize(p).ok().as_deref() == Some(target)
            || p.parent()
                .and_then(|d| std::fs::canonicalize(d).ok())
                .zip(p.file_name())
                .is_some_and(|(d, f)| d.join(f) == target)
    };
    match recorded {
        Some(p) if resolves_there(p) => p.to_path_buf(),
        _ => target.to_path_buf(),
    }
}

/// The VM as QEMU has it now. `vsock`: the VM's vsock listener links (port →
/// target) while its backend runs, `None` when it does not.
pub async fn observe(
    q: &Qmp,
    rec: &LaunchRecord,
    vsock: Option<BTreeMap<u32, PathBuf>>,
) -> Result<ObservedVm, QmpError> {
    // Independent reads, in flight together on the one connection: QEMU
    // answers them in order, so observing costs about one round trip
    // instead of one per query (each is slow while TCG keeps QEMU busy).
    let limits_path = format!("/objects/{}", ids::QOS_GROUP);
    let (status, devices, nodes, cpus, mem, hot, limits, held) = tokio::join!(
        ops::status(q),
        ops::peripherals(q),
        block_nodes(q),
        q.execute("query-cpus-fast", None),
        q.execute("query-memory-size-summary", None),
        ops::hotplug_memory(q),
        q.execute(
            "qom-get",
            Some(json!({"path": limits_path, "property": "limits"})),
        ),
        held_files(q, rec.pid),
    );
    let (status, devices, nodes, cpus, mem) = (status?, devices?, nodes?, cpus?, mem?);
    let state = match status.as_str() {
        "running" => State::Running,
        "shutdown" | "guest-panicked" | "internal-error" => State::Terminated,
        // paused, prelaunch (never started), suspended, debug, inmigrate...: halted in memory.
        _ => State::Paused,
    };
    let cold = &rec.config;

    // Everything QEMU cannot change at runtime comes from the record.
    let mut cfg = VmConfig {
        guest_os: cold.guest_os,
        power_state: cold.power_state,
        policy: cold.policy,
        boot: cold.boot.clone(),
        processors: cold.processors,
        memory: cold.memory,
        serial_consoles: cold.serial_consoles.clone(),
        storage_qos: None,
        vpmem: cold.vpmem.clone().map(|mut v| {
            v.devices
                .retain(|d| devices.iter().any(|(id, _)| *id == ids::pmem(d.id)));
            v
        }),
        windows: cold.windows.clone(),
        ..VmConfig::default()
    };

    // vCPUs and memory, as the guest has them now.
    if let Some(n) = cpus
        .as_array()
        .map(Vec::len)
        .and_then(|n| u32::try_from(n).ok())
    {
        cfg.processors.count = n;
    }
    // Boot memory plus what the virtio-mem device has plugged now (NVDIMMs
    // count as plugged memory in QEMU's summary, so it is not used).
    let base_mb = mem.get("base-memory").and_then(Value::as_u64).unwrap_or(0) >> 20;
    let mut memory_hotplug = Some(MemoryHotplug::fixed(cold.memory.size_mb));
    if base_mb > 0 {
        let hot = hot?;
        let field = |k: &str| hot.as_ref().and_then(|d| d.get(k)?.as_u64()).unwrap_or(0) >> 20;
        cfg.memory.size_mb = base_mb + field("size");
        memory_hotplug = Some(match hot {
            Some(_) => MemoryHotplug {
                min_mb: base_mb,
                max_mb: base_mb + field("max-size"),
                block_mb: field("block-size").max(1),
            },
            None => MemoryHotplug::fixed(base_mb),
        });
    }

    // Storage QoS, as the throttle group has it.
    if let Ok(l) = limits {
        let get = |k: &str| l.get(k).and_then(Value::as_u64).filter(|v| *v > 0);
        let (iops, bps) = (get("iops-total"), get("bps-total"));
        if iops.is_some() || bps.is_some() {
            cfg.storage_qos = Some(crate::spec::StorageQos {
                iops_maximum: iops,
                bandwidth_maximum: bps,
            });
        }
    }

    // SCSI controllers and disks, keyed by the ids uvmctl gives them.
    let recorded_disks: BTreeMap<(u32, u32), &ScsiDisk> = cold
        .scsi_controllers
        .iter()
        .flat_map(|c| c.disks.iter().map(move |d| ((c.id, d.lun), d)))
        .collect();
    // What QEMU holds matters only where a disk was handed over by descriptor.
    let held = if nodes.values().any(|n| n.file.starts_with("/dev/fdset/")) {
        held?
    } else {
        BTreeMap::new()
    };
    let mut controllers: BTreeMap<u32, ScsiController> = BTreeMap::new();
    for (id, ty) in &devices {
        if ty == "virtio-scsi-pci"
            && let Some(n) = id.strip_prefix("scsi").and_then(|n| n.parse::<u32>().ok())
        {
            controllers.insert(
                n,
                ScsiController {
                    id: n,
                    disks: Vec::new(),
                },
            );
        }
    }
    for (id, ty) in &devices {
        if ty != "scsi-hd" && ty != "scsi-block" {
            continue;
        }
        let Some((c, l)) = id.strip_prefix("disk-").and_then(|r| r.split_once('-')) else {
            continue;
        };
        let (Ok(c), Ok(l)) = (c.parse::<u32>(), l.parse::<u32>()) else {
            continue;
        };
        let (Some(fmt), Some(file)) = (
            nodes.get(&ids::scsi_disk_format(c, l)),
            nodes.get(&ids::scsi_disk_file(c, l)),
        ) else {
            continue;
        };
        let disk_type = match fmt.driver.as_str() {
            "vpc" => ScsiDiskType::Vhd1,
            "vhdx" => ScsiDiskType::Vhdx,
            _ => ScsiDiskType::PassThrough,
        };
        let recorded = recorded_disks.get(&(c, l)).map(|d| d.path.as_path());
        let path = if file.file.starts_with("/dev/fdset/") {
            // Handed over by descriptor: the file QEMU really holds, else
            // (its descriptors unreadable) what was recorded.
            match fdset_of(&file.file).and_then(|set| held.get(&set)) {
                Some(real) => spec_path(recorded, real),
                None => recorded.map_or_else(|| PathBuf::from(&file.file), Path::to_path_buf),
            }
        } else {
            spec_path(recorded, &file.file)
        };
        let disk = ScsiDisk {
            lun: l,
            path,
            disk_type,
            read_only: fmt.read_only,
        };
        controllers
            .entry(c)
            .or_insert(ScsiController {
                id: c,
                disks: Vec::new(),
            })
            .disks
            .push(disk);
    }
    cfg.scsi_controllers = controllers.into_values().collect();

    // NICs: MAC from QEMU (asked for all at once), endpoint from the record.
    let nics: Vec<(&str, String)> = devices
        .iter()
        .filter(|(_, ty)| ty == "virtio-net-pci")
        .filter_map(|(id, _)| {
            Some((
                id.strip_prefix("nic-")?,
                format!("/machine/peripheral/{id}"),
            ))
        })
        .collect();
    let macs =
        futures_util::future::join_all(nics.iter().map(|(_, path)| qom_string(q, path, "mac")))
            .await;
    for ((nic_id, _), mac) in nics.iter().zip(macs) {
        let nic_id = *nic_id;
        let mac = mac?.unwrap_or_default();
        let endpoint = cold
            .network_adapters
            .iter()
            .find(|n| n.nic_id == nic_id)
            .map_or_else(|| "unknown".to_string(), |n| n.endpoint_id.clone());
        cfg.network_adapters.push(NetworkAdapter {
            nic_id: nic_id.to_string(),
            endpoint_id: endpoint,
            mac_address: mac.replace(':', "-").to_ascii_uppercase(),
        });
    }

    // Plan9 shares: present devices, details from the record (QMP does not
    // expose an fsdev's host path).
    cfg.plan9_shares = cold
        .plan9_shares
        .iter()
        .filter(|s| devices.iter().any(|(id, _)| *id == ids::plan9(&s.name)))
        .cloned()
        .collect();

    // vsock listeners: the links the backend follows, while backend and
    // device are there; the spec's spelling where it still resolves there.
    let plugged = devices.iter().any(|(id, _)| id == super::vsock::DEVICE_ID);
    for (port, target) in vsock.filter(|_| plugged).into_iter().flatten() {
        let recorded = cold
            .vm_sockets
            .iter()
            .find(|v| v.socket_type == crate::vm::VMSocketType::VSock && v.port == Some(port))
            .map(|v| v.listener_path.as_path());
        cfg.vm_sockets.push(crate::spec::VmSocket {
            socket_type: crate::vm::VMSocketType::VSock,
            service_id: None,
            port: Some(port),
            listener_path: socket_spec_path(recorded, &target),
        });
    }

    Ok(ObservedVm {
        config: cfg,
        state,
        managed: true,
        exit_error: None,
        memory_hotplug,
    })
}
