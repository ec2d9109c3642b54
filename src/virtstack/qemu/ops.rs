//! Hot operations on a running QEMU, one QMP conversation each. Removals wait
//! for QEMU's `DEVICE_DELETED` (the guest's acknowledgement) and confirm with
//! a query: events are signals, not truth.

use super::devices::{disk_fdset_opaque, ids, nic_args, pmem_args, scsi_disk_args};
use super::images::HostFile;
use super::qmp::{Qmp, QmpError};
use crate::spec::{NetworkAdapter, ScsiDisk, VpmemDevice};
use futures_util::future::{join, join_all};
use serde_json::{Value, json};
use std::os::fd::AsFd;
use std::time::Duration;

/// Lets a paused or freshly launched guest run.
pub async fn cont(q: &Qmp) -> Result<(), QmpError> {
    q.execute("cont", None).await.map(|_| ())
}

/// QEMU's run state (`running`, `paused`, `prelaunch`, `shutdown`, ...).
pub async fn status(q: &Qmp) -> Result<String, QmpError> {
    let v = q.execute("query-status", None).await?;
    Ok(v.get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string())
}

/// Device ids under `/machine/peripheral`, with their QOM type.
pub async fn peripherals(q: &Qmp) -> Result<Vec<(String, String)>, QmpError> {
    let v = q
        .execute("qom-list", Some(json!({"path": "/machine/peripheral"})))
        .await?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    let name = e.get("name")?.as_str()?;
                    let ty = e.get("type")?.as_str()?;
                    let ty = ty.strip_prefix("child<")?.strip_suffix('>')?;
                    Some((name.to_string(), ty.to_string()))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Unplugs `id` unless it is already gone (removed by hand, or by an
/// earlier apply that failed later on).
async fn unplug_if_present(q: &Qmp, id: &str, timeout: Duration) -> Result<(), UnplugError> {
    if device_present(q, id).await? {
        device_del(q, id, timeout).await?;
    }
    Ok(())
}

/// Whether a device with this id is plugged.
pub async fn device_present(q: &Qmp, id: &str) -> Result<bool, QmpError> {
    Ok(peripherals(q).await?.iter().any(|(name, _)| name == id))
}

/// Why an unplug did not finish.
#[derive(Debug, thiserror::Error)]
pub enum UnplugError {
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The guest has not released the device in time.
    #[error("guest did not release {device} within {after:?}; the unplug stays pending")]
    Pending {
        /// Device id.
        device: String,
        /// Waited.
        after: Duration,
    },
    /// The VM cannot take it as configured (no hot-pluggable memory, a
    /// size out of its range): refused before QEMU was asked.
    #[error("{0}")]
    Refused(String),
}

/// Asks QEMU to unplug `id` and waits for the guest to let go.
pub async fn device_del(q: &Qmp, id: &str, timeout: Duration) -> Result<(), UnplugError> {
    let mut events = q.subscribe();
    q.execute("device_del", Some(json!({"id": id}))).await?;
    let matches = |e: &super::qmp::QmpEvent| {
        e.name == "DEVICE_DELETED" && e.data.get("device").and_then(Value::as_str) == Some(id)
    };
    match q.wait_event(&mut events, timeout, matches).await {
        Ok(_) => {}
        Err(QmpError::Timeout { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    // Confirm: the event may have been missed, or may never come.
    if device_present(q, id).await? {
        return Err(UnplugError::Pending {
            device: id.to_string(),
            after: timeout,
        });
    }
    Ok(())
}

/// Adds a SCSI controller.
pub async fn add_scsi_controller(q: &Qmp, id: u32) -> Result<(), QmpError> {
    q.execute(
        "device_add",
        Some(json!({"driver": "virtio-scsi-pci", "id": ids::scsi_controller(id)})),
    )
    .await
    .map(|_| ())
}

/// The fd sets among `sets` (`query-fdsets`' answer) tagged `opaque`.
fn tagged_sets(sets: &Value, opaque: &str) -> Vec<u64> {
    let tagged = |set: &&Value| {
        set.get("fds").and_then(Value::as_array).is_some_and(|fds| {
            fds.iter()
                .any(|f| f.get("opaque").and_then(Value::as_str) == Some(opaque))
        })
    };
    sets.as_array()
        .into_iter()
        .flatten()
        .filter(tagged)
        .filter_map(|set| set.get("fdset-id").and_then(Value::as_u64))
        .collect()
}

/// Removes QEMU's fd sets tagged `opaque` (best effort: a set whose
/// descriptor a block node still uses is freed when the node closes it).
async fn remove_fdsets(q: &Qmp, opaque: &str) {
    if let Ok(sets) = q.execute("query-fdsets", None).await {
        remove_sets(q, &tagged_sets(&sets, opaque)).await;
    }
}

async fn remove_sets(q: &Qmp, ids: &[u64]) {
    let removals = ids
        .iter()
        .map(|id| q.execute("remove-fd", Some(json!({"fdset-id": id}))));
    join_all(removals).await;
}

/// Attaches a disk: its opened `image` handed over in an fd set of its own
/// (tagged, so the removal finds it), then its file node (opening the set),
/// format node (stated, never probed) and throttle node as one nested
/// `blockdev-add`, with the query of fd sets beside it (QEMU runs one
/// monitor's commands in order), then the device. On failure, the nodes
/// and the fd set created are removed again. What a `device_del` made by
/// hand leaves behind is cleared only when it is there: nodes of the LUN's
/// names (the add then meets them, and is made again once they are gone),
/// and fd sets of its tag (found with the add, removed after it, whether it
/// went through or not: left, one keeps the old image open in QEMU,
/// read-write, however often the LUN is replugged; issue 31).
pub async fn add_scsi_disk(
    q: &Qmp,
    controller: u32,
    disk: &ScsiDisk,
    image: &HostFile,
) -> Result<(), QmpError> {
    let names = ids::scsi_disk_nodes(controller, disk.lun);
    let opaque = disk_fdset_opaque(controller, disk.lun);
    let (set, _) = q.add_fd(&opaque, image.file.as_fd()).await?;
    let (nodes, device) = scsi_disk_args(controller, disk, image, &format!("/dev/fdset/{set}"));
    let nodes = nested(nodes);
    let (mut plugged, sets) = join(
        plug_disk(q, &names, nodes.clone(), device.clone()),
        q.execute("query-fdsets", None),
    )
    .await;
    if matches!(&plugged, Err(e) if is_duplicate_node(e)) {
        // Left by hand; nodes in use refuse deletion, and the add made
        // again then reports the clash.
        delete_nodes(q, &names).await;
        plugged = plug_disk(q, &names, nodes, device).await;
    }
    // Stale sets go whether the add went through or not; on failure the
    // new one goes too.
    let mut drop: Vec<u64> = match &sets {
        Ok(sets) => tagged_sets(sets, &opaque)
            .into_iter()
            .filter(|id| *id != set)
            .collect(),
        Err(_) => Vec::new(),
    };
    if plugged.is_err() {
        drop.push(set);
    }
    remove_sets(q, &drop).await;
    plugged
}

/// A block node of that name exists already.
fn is_duplicate_node(e: &QmpError) -> bool {
    matches!(e, QmpError::Command { desc, .. } if desc.contains("Duplicate nodes"))
}

/// The disk's nodes as one `blockdev-add` (QEMU makes all of them or none),
/// then its device once they are there: a device named after a node left
/// from before must never be plugged onto that one. If the device fails,
/// the nodes go again (deleting the top one frees those it made).
async fn plug_disk(q: &Qmp, names: &[String], nodes: Value, device: Value) -> Result<(), QmpError> {
    q.execute("blockdev-add", Some(nodes)).await?;
    let plugged = q.execute("device_add", Some(device)).await;
    if plugged.is_err() {
        delete_nodes(q, names).await;
    }
    plugged.map(|_| ())
}

/// `nodes` (bottom first, each naming the one below as its `file`) as one
/// nested definition: the top node, holding the rest.
fn nested(nodes: Vec<Value>) -> Value {
    nodes
        .into_iter()
        .reduce(|below, mut node| {
            node["file"] = below;
            node
        })
        .unwrap_or(Value::Null)
}

/// Best-effort deletion of block nodes, top first (sent together: QEMU
/// deletes them in that order).
async fn delete_nodes(q: &Qmp, names: &[String]) {
    let deletions = names
        .iter()
        .map(|node| q.execute("blockdev-del", Some(json!({"node-name": node}))));
    join_all(deletions).await;
}

/// Detaches a disk and deletes its block nodes (top node first).
pub async fn remove_scsi_disk(
    q: &Qmp,
    controller: u32,
    lun: u32,
    timeout: Duration,
) -> Result<(), UnplugError> {
    let id = ids::scsi_disk(controller, lun);
    unplug_if_present(q, &id, timeout).await?;
    for node in ids::scsi_disk_nodes(controller, lun) {
        match q
            .execute("blockdev-del", Some(json!({"node-name": node})))
            .await
        {
            Ok(_) => {}
            // Already gone (removed by hand, or auto-deleted with its device).
            Err(QmpError::Command { ref desc, .. })
                if desc.contains("Failed to find node") || desc.contains("Cannot find") => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The descriptor it was handed, now that no node uses it.
    remove_fdsets(q, &disk_fdset_opaque(controller, lun)).await;
    Ok(())
}

/// Sets the VM's storage QoS on its throttle group (0 lifts a limit).
pub async fn set_storage_qos(
    q: &Qmp,
    qos: Option<&crate::spec::StorageQos>,
) -> Result<(), QmpError> {
    let path = format!("/objects/{}", ids::QOS_GROUP);
    let value = super::devices::qos_limits(qos);
    q.execute(
        "qom-set",
        Some(json!({"path": path, "property": "limits", "value": value})),
    )
    .await
    .map(|_| ())
}

/// Resizes guest memory to `size_mb`: boot memory plus what the virtio-mem
/// device is asked to plug. Waits until the guest has plugged or released
/// it; memory the guest cannot release in time stays plugged, and the
/// resize is reported pending.
pub async fn set_memory(q: &Qmp, size_mb: u64, timeout: Duration) -> Result<(), UnplugError> {
    let refuse = UnplugError::Refused;
    let summary = q.execute("query-memory-size-summary", None).await?;
    let base = summary
        .get("base-memory")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let Some(dev) = hotplug_memory(q).await? else {
        return Err(refuse("this VM has no hot-pluggable memory".into()));
    };
    let field = |k: &str| dev.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (max, block) = (field("max-size"), field("block-size").max(1));
    let wanted = (size_mb << 20)
        .checked_sub(base)
        .filter(|w| *w <= max && *w % block == 0);
    let Some(wanted) = wanted else {
        return Err(refuse(format!(
            "{size_mb} MB is not {} MB of boot memory plus up to {} MB in {} MB blocks",
            base >> 20,
            max >> 20,
            block >> 20
        )));
    };
    q.execute(
        "qom-set",
        Some(json!({"path": super::devices::ids::HOTPLUG_MEM, "property": "requested-size", "value": wanted})),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let size = hotplug_memory(q)
            .await?
            .and_then(|d| d.get("size").and_then(Value::as_u64))
            .unwrap_or(0);
        if size == wanted {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(UnplugError::Pending {
                device: format!(
                    "{} (has {} MB of the {} MB asked)",
                    super::devices::ids::HOTPLUG_MEM,
                    size >> 20,
                    wanted >> 20
                ),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `data` of uvmctl's virtio-mem device in `query-memory-devices`.
pub(super) async fn hotplug_memory(q: &Qmp) -> Result<Option<Value>, QmpError> {
    let devices = q.execute("query-memory-devices", None).await?;
    Ok(devices
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d.get("type").and_then(Value::as_str) == Some("virtio-mem"))
        .filter_map(|d| d.get("data"))
        .find(|d| d.get("id").and_then(Value::as_str) == Some(super::devices::ids::HOTPLUG_MEM))
        .cloned())
}

/// Brings the number of vCPUs to `target`: plugs free slots in order, or
/// unplugs the ones uvmctl plugged, last first. CPU unplug sends no
/// `DEVICE_DELETED`, so removal is confirmed by polling the slots.
pub async fn set_cpus(q: &Qmp, target: u32, timeout: Duration) -> Result<(), UnplugError> {
    let slots = q.execute("query-hotpluggable-cpus", None).await?;
    let mut slots: Vec<&Value> = slots
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let key = |s: &Value| {
        let p = &s["props"];
        let n = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
        (n("socket-id"), n("core-id"), n("thread-id"))
    };
    slots.sort_by_key(|s| key(s));
    let plugged = slots.iter().filter(|s| s.get("qom-path").is_some()).count();
    let target = usize::try_from(target).unwrap_or(usize::MAX);
    if plugged < target {
        for slot in slots
            .iter()
            .filter(|s| s.get("qom-path").is_none())
            .take(target - plugged)
        {
            let (sk, c, t) = key(slot);
            let mut dev = slot["props"].clone();
            dev["driver"] = slot["type"].clone();
            dev["id"] = json!(format!("vcpu-{sk}-{c}-{t}"));
            q.execute("device_add", Some(dev)).await?;
        }
    } else if plugged > target {
        let ours: Vec<String> = slots
            .iter()
            .rev()
            .filter_map(|s| {
                s.get("qom-path")?
                    .as_str()?
                    .strip_prefix("/machine/peripheral/")
                    .map(str::to_string)
            })
            .take(plugged - target)
            .collect();
        if ours.len() < plugged - target {
            return Err(UnplugError::Qmp(QmpError::Command {
                command: "device_del".into(),
                class: "uvmctl".into(),
                desc: "the boot vCPU cannot be unplugged".into(),
            }));
        }
        for id in &ours {
            q.execute("device_del", Some(json!({"id": id}))).await?;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = q.execute("query-cpus-fast", None).await?;
            if now.as_array().map_or(0, Vec::len) <= target {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(UnplugError::Pending {
                    device: ours.join(", "),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Adds a NIC: backend, then device. A tap endpoint is opened by uvmctl (`tap`) and handed over
/// (`getfd`), its backend taking that descriptor.
pub async fn add_nic(
    q: &Qmp,
    n: &NetworkAdapter,
    tap: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(), QmpError> {
    let fdname = format!("tap-{}", ids::netdev(&n.nic_id));
    if let Some(fd) = tap {
        // A name left by an add that failed would refuse the new one.
        let _ = q.execute("closefd", Some(json!({"fdname": fdname}))).await;
        q.send_fd(&fdname, fd).await?;
    }
    let (netdev, device) = nic_args(n, &fdname);
    // A backend left behind by a `device_del` made by hand would clash. This
    // runs only when the NIC device is absent, so no NIC uses that backend.
    let _ = q
        .execute("netdev_del", Some(json!({"id": ids::netdev(&n.nic_id)})))
        .await;
    q.execute("netdev_add", Some(netdev)).await?;
    if let Err(e) = q.execute("device_add", Some(device)).await {
        let _ = q
            .execute("netdev_del", Some(json!({"id": ids::netdev(&n.nic_id)})))
            .await;
        return Err(e);
    }
    Ok(())
}

/// Removes a NIC: device (waiting for the guest), then backend.
pub async fn remove_nic(q: &Qmp, nic_id: &str, timeout: Duration) -> Result<(), UnplugError> {
    let id = ids::nic(nic_id);
    unplug_if_present(q, &id, timeout).await?;
    match q
        .execute("netdev_del", Some(json!({"id": ids::netdev(nic_id)})))
        .await
    {
        Ok(_) => Ok(()),
        Err(QmpError::Command { ref desc, .. }) if desc.contains("not found") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Adds an NVDIMM: the opened `image` is handed over (`add-fd`), the memory
/// backend opens QEMU's copy as `/dev/fd/N`, and the set goes again.
pub async fn add_vpmem(
    q: &Qmp,
    d: &VpmemDevice,
    image: &HostFile,
    size: u64,
) -> Result<(), QmpError> {
    let (set, fd) = q
        .add_fd(&ids::pmem_backend(d.id), image.file.as_fd())
        .await?;
    let (backend, device) = pmem_args(d, &format!("/dev/fd/{fd}"), size);
    let added = q.execute("object-add", Some(backend)).await;
    // The backend holds its own open file now (or failed): the handed-over
    // descriptor is not needed either way.
    let _ = q.execute("remove-fd", Some(json!({"fdset-id": set}))).await;
    added?;
    if let Err(e) = q.execute("device_add", Some(device)).await {
        let _ = q
            .execute("object-del", Some(json!({"id": ids::pmem_backend(d.id)})))
            .await;
        return Err(e);
    }
    Ok(())
}

/// Removes a Plan9 device (its fsdev stays until the next start: QEMU 7.2
/// cannot delete one).
pub async fn remove_plan9(q: &Qmp, name: &str, timeout: Duration) -> Result<(), UnplugError> {
    let id = ids::plan9(name);
    unplug_if_present(q, &id, timeout).await?;
    Ok(())
}

/// Removes a SCSI controller (its disks must be gone).
pub async fn remove_scsi_controller(
    q: &Qmp,
    id: u32,
    timeout: Duration,
) -> Result<(), UnplugError> {
    let dev = ids::scsi_controller(id);
    unplug_if_present(q, &dev, timeout).await?;
    Ok(())
}

/// Where each device sits now, as properties that place it there again on a
/// new launch: `addr` (PCI slot.function) for PCI devices, the memory address
/// for NVDIMMs (`addr`) and virtio-mem (`memaddr`).
pub async fn placement(q: &Qmp) -> Result<super::state::Placement, QmpError> {
    let mut out = super::state::Placement::new();
    let buses = q.execute("query-pci", None).await?;
    // The pc machine has one root bus and uvmctl adds no bridges.
    for dev in buses
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b.get("devices")?.as_array())
        .flatten()
    {
        let (Some(id), Some(slot), Some(func)) = (
            dev.get("qdev_id").and_then(Value::as_str),
            dev.get("slot").and_then(Value::as_u64),
            dev.get("function").and_then(Value::as_u64),
        ) else {
            continue;
        };
        if !id.is_empty() {
            out.entry(id.to_string())
                .or_default()
                .insert("addr".into(), json!(format!("{slot:x}.{func:x}")));
        }
    }
    let mem = q.execute("query-memory-devices", None).await?;
    for d in mem.as_array().into_iter().flatten() {
        let data = d.get("data");
        let id = data.and_then(|d| d.get("id")).and_then(Value::as_str);
        let (prop, addr) = match d.get("type").and_then(Value::as_str) {
            Some("nvdimm" | "dimm") => ("addr", data.and_then(|d| d.get("addr"))),
            Some("virtio-mem") => ("memaddr", data.and_then(|d| d.get("memaddr"))),
            _ => continue,
        };
        if let (Some(id), Some(addr)) = (id, addr.and_then(Value::as_u64)) {
            out.entry(id.to_string())
                .or_default()
                .insert(prop.into(), json!(addr));
        }
    }
    Ok(out)
}

/// How a migration (save or restore) ended, when it failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// QMP failed (QEMU may have exited).
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// QEMU reports the migration failed.
    #[error("{0}")]
    Failed(String),
    /// Still running at the deadline.
    #[error("not finished after {0:?}")]
    Timeout(Duration),
}

/// Saves into (`migrate`) or restores from (`migrate-incoming`) the file
/// behind `fd`, passed to QEMU over the QMP socket, and waits for the end.
pub async fn migrate_fd(
    q: &Qmp,
    command: &str,
    fd: std::os::fd::BorrowedFd<'_>,
    timeout: Duration,
) -> Result<(), MigrationError> {
    let fdname = format!("uvmctl-{command}");
    q.send_fd(&fdname, fd).await?;
    q.execute(command, Some(json!({"uri": format!("fd:{fdname}")})))
        .await?;
    wait_migration(q, timeout).await
}

/// Waits for the migration in progress (outgoing or incoming) to complete.
pub async fn wait_migration(q: &Qmp, timeout: Duration) -> Result<(), MigrationError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let info = q.execute("query-migrate", None).await?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some(status @ ("failed" | "cancelled")) => {
                let why = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or(status);
                return Err(MigrationError::Failed(why.to_string()));
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            return Err(MigrationError::Timeout(timeout));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three nodes of a disk become one definition, top first, each
    /// holding the one below as its `file`, with every name kept.
    #[test]
    fn a_disks_nodes_nest_under_the_top_one() {
        let nodes = vec![
            json!({"driver": "file", "node-name": "f", "filename": "/dev/fdset/3"}),
            json!({"driver": "raw", "node-name": "r", "file": "f"}),
            json!({"driver": "throttle", "node-name": "t", "throttle-group": "qos", "file": "r"}),
        ];
        assert_eq!(
            nested(nodes),
            json!({"driver": "throttle", "node-name": "t", "throttle-group": "qos", "file":
                {"driver": "raw", "node-name": "r", "file":
                    {"driver": "file", "node-name": "f", "filename": "/dev/fdset/3"}}})
        );
    }
}
