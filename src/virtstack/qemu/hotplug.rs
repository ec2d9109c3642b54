//! The one change verb over QEMU, as QMP hot-plug.
//!
//! A change loads the VM's launch record once, makes the change through QMP,
//! and stores the record once with the change in it, so a later start (or
//! restore) launches what the VM really has.

use super::error::QemuError;
use super::images::HostPathError;
use super::images::{HostFile, check_scsi_image, check_vpmem_image, scsi_access};
use super::machine::Machine;
use super::ops;
use super::qmp::Qmp;
use super::state::{LaunchError, LaunchRecord};
use crate::hostfs::Access;
use crate::spec::{NetworkAdapter, VmConfig, VmSocket, VpmemDevice};
use crate::vm::items::{Item, ResourceKind, ScsiDiskItem};
use crate::vm::{Change, VMSocketType, VmError};
use std::path::Path;

type Result<T, E = VmError> = std::result::Result<T, E>;

/// One change being made to one running VM.
struct Hotplug<'a> {
    vm: &'a Machine<'a>,
    name: &'a str,
    q: Qmp,
    rec: LaunchRecord,
}

impl Hotplug<'_> {
    fn err(&self, what: impl Into<String>) -> VmError {
        QemuError::Unsupported {
            vm: self.name.to_string(),
            what: what.into(),
        }
        .into()
    }

    fn unplug_err(&self, e: ops::UnplugError) -> VmError {
        QemuError::from_unplug(self.name, e).into()
    }

    fn qmp_err(&self, source: super::qmp::QmpError) -> VmError {
        QemuError::Qmp {
            vm: self.name.to_string(),
            source,
        }
        .into()
    }

    fn path_err(&self, field: String) -> impl Fn(HostPathError) -> VmError + '_ {
        move |source| {
            QemuError::Launch {
                vm: self.name.to_string(),
                source: LaunchError::HostPath {
                    field: field.clone(),
                    source,
                },
            }
            .into()
        }
    }

    /// `path` opened beneath its allowed root, if it lies under one.
    fn open_host(&self, path: &Path, field: &str, access: Access) -> Result<HostFile> {
        self.vm
            .host
            .options()
            .roots
            .open(path, access)
            .map_err(self.path_err(field.to_string()))
    }

    fn timeout(&self) -> std::time::Duration {
        self.vm.host.options().unplug_timeout
    }

    /// Adds `item` through QMP.
    async fn add(&self, item: &Item) -> Result<()> {
        let q = &self.q;
        match item {
            Item::ScsiController(id) => ops::add_scsi_controller(q, *id)
                .await
                .map_err(|e| self.qmp_err(e)),
            Item::ScsiDisk(ScsiDiskItem { controller, disk }) => {
                let field = format!("scsiDisk {controller}:{}", disk.lun);
                let image = self.open_host(&disk.path, &field, scsi_access(disk.read_only))?;
                check_scsi_image(&image, disk.disk_type).map_err(self.path_err(field))?;
                ops::add_scsi_disk(q, *controller, disk, &image)
                    .await
                    .map_err(|e| self.qmp_err(e))
            }
            Item::VpmemDevice(d) => self.add_vpmem(d).await,
            Item::NetworkAdapter(nic) => self.add_nic(nic).await,
            Item::VmSocket(s) => self.listen(s).await,
            Item::Processors(n) => ops::set_cpus(q, *n, self.timeout())
                .await
                .map_err(|e| self.unplug_err(e)),
            Item::Memory(mb) => ops::set_memory(q, *mb, self.timeout())
                .await
                .map_err(|e| self.unplug_err(e)),
            Item::StorageQos(limits) => ops::set_storage_qos(q, limits.as_ref())
                .await
                .map_err(|e| self.qmp_err(e)),
            // The capabilities say why none of these is done live here.
            Item::Plan9Share(_)
            | Item::VsmbShare(_)
            | Item::PciDevice(_)
            | Item::SerialConsole(_)
            | Item::CpuGroup(_)
            | Item::Policy(_)
            | Item::GuestOs(_)
            | Item::Boot(_)
            | Item::MemoryConfig(_)
            | Item::Mmio(_)
            | Item::VpmemController(_)
            | Item::PowerState(_) => {
                Err(self.err(format!("{} has no hot-plug path", item.key().0)))
            }
        }
    }

    /// Removes `item` through QMP.
    async fn remove(&self, item: &Item) -> Result<()> {
        let q = &self.q;
        let t = self.timeout();
        match item {
            Item::ScsiController(id) => ops::remove_scsi_controller(q, *id, t)
                .await
                .map_err(|e| self.unplug_err(e)),
            Item::ScsiDisk(d) => ops::remove_scsi_disk(q, d.controller, d.disk.lun, t)
                .await
                .map_err(|e| self.unplug_err(e)),
            Item::NetworkAdapter(n) => ops::remove_nic(q, &n.nic_id, t)
                .await
                .map_err(|e| self.unplug_err(e)),
            Item::Plan9Share(s) => ops::remove_plan9(q, &s.name, t)
                .await
                .map_err(|e| self.unplug_err(e)),
            Item::VmSocket(s) => {
                let port = vsock_port(self.name, s)?;
                super::vsock::unlink(&self.vm.host.options().state_dir, self.name, port)
                    .map_err(|e| self.err(format!("cannot unlink vsock port {port}: {e}")))
            }
            Item::VpmemDevice(_)
            | Item::VsmbShare(_)
            | Item::PciDevice(_)
            | Item::SerialConsole(_)
            | Item::CpuGroup(_)
            | Item::Processors(_)
            | Item::Memory(_)
            | Item::StorageQos(_)
            | Item::Policy(_)
            | Item::GuestOs(_)
            | Item::Boot(_)
            | Item::MemoryConfig(_)
            | Item::Mmio(_)
            | Item::VpmemController(_)
            | Item::PowerState(_) => {
                Err(self.err(format!("{} has no hot-unplug path", item.key().0)))
            }
        }
    }

    /// Whether QEMU has the device of `item`.
    async fn present(&self, item: &Item) -> Result<bool> {
        if let Item::VmSocket(s) = item {
            let port = vsock_port(self.name, s)?;
            let links = super::vsock::spec_listeners(&self.vm.host.options().state_dir, self.name);
            return Ok(links.contains_key(&port));
        }
        let Some(id) = device_id(item) else {
            return Ok(false);
        };
        ops::device_present(&self.q, &id)
            .await
            .map_err(|e| self.qmp_err(e))
    }

    async fn add_vpmem(&self, device: &VpmemDevice) -> Result<()> {
        let field = format!("vpmemDevice {}", device.id);
        let image = self.open_host(&device.path, &field, scsi_access(device.read_only))?;
        let size =
            check_vpmem_image(&image, device.format).map_err(self.path_err(field.clone()))?;
        // QEMU reopens a memory backend's file itself, as its service user.
        if let Some(user) = self.vm.host.user_of(&self.rec)
            && !image
                .file
                .metadata()
                .is_ok_and(|m| user.may_open(&m, !device.read_only))
        {
            return Err(self.err(format!(
                "{field}: {} is not {} by {}",
                image.path.display(),
                if device.read_only {
                    "readable"
                } else {
                    "readable and writable"
                },
                user.describe()
            )));
        }
        let max = self
            .rec
            .config
            .vpmem
            .as_ref()
            .map_or(0, |v| v.maximum_size_bytes);
        if size > max {
            return Err(VmError::Refused {
                vm: self.name.to_string(),
                reason: format!(
                    "{field}: image maps {size} bytes, over the controller's maximumSizeBytes {max}"
                ),
            });
        }
        ops::add_vpmem(&self.q, device, &image, size)
            .await
            .map_err(|e| self.qmp_err(e))
    }

    async fn add_nic(&self, nic: &NetworkAdapter) -> Result<()> {
        let tap = if super::devices::is_tap(nic) {
            Some(super::tap::open(&nic.endpoint_id).map_err(|e| {
                self.err(format!(
                    "networkAdapter {}: cannot open tap {}: {e}",
                    nic.nic_id, nic.endpoint_id
                ))
            })?)
        } else {
            None
        };
        ops::add_nic(&self.q, nic, tap.as_ref().map(std::os::fd::AsFd::as_fd))
            .await
            .map_err(|e| self.qmp_err(e))
    }

    async fn listen(&self, s: &VmSocket) -> Result<()> {
        let port = vsock_port(self.name, s)?;
        let field = format!("spec.vmSockets[vsock:{port}].listenerPath");
        let target = self
            .vm
            .host
            .options()
            .roots
            .check_socket(&s.listener_path)
            .map_err(self.path_err(field.clone()))?;
        if let Some(user) = self.vm.host.user_of(&self.rec) {
            super::launch::check_listener_access(&user, &target).map_err(|what| {
                self.err(format!(
                    "{field}: {} is not {what} by {}",
                    target.display(),
                    user.describe()
                ))
            })?;
        }
        self.vm.ensure_vsock(&self.q).await?;
        super::vsock::link(&self.vm.host.options().state_dir, self.name, port, &target).map_err(
            |e| {
                self.err(format!(
                    "cannot link vsock port {port} to {}: {e}",
                    target.display()
                ))
            },
        )
    }
}

/// The QEMU device of an item, if it is one (what a removal unplugs).
fn device_id(item: &Item) -> Option<String> {
    use super::launch::ids;
    match item {
        Item::ScsiController(id) => Some(ids::scsi_controller(*id)),
        Item::ScsiDisk(d) => Some(ids::scsi_disk(d.controller, d.disk.lun)),
        Item::NetworkAdapter(n) => Some(ids::nic(&n.nic_id)),
        Item::Plan9Share(s) => Some(ids::plan9(&s.name)),
        Item::VpmemDevice(d) => Some(ids::pmem(d.id)),
        _ => None,
    }
}

/// The vsock port of a listener (HvSocket is refused by the capabilities).
fn vsock_port(vm: &str, s: &VmSocket) -> Result<u32> {
    match (s.socket_type, s.port) {
        (VMSocketType::VSock, Some(port)) => Ok(port),
        _ => Err(QemuError::Unsupported {
            vm: vm.to_string(),
            what: format!("{}: not a vsock port", s.address()),
        }
        .into()),
    }
}

impl Machine<'_> {
    /// One change, as [`Virtstack::change`] promises: refused before
    /// anything happens where the capabilities or the VM's state say no.
    pub(super) async fn change(&self, change: &Change) -> Result<()> {
        let name = self.name;
        let op = change.operation();
        let (kind, _) = change.key();
        if kind == ResourceKind::Policy {
            // Only uvmctl's record holds it: no QMP, no running VM needed.
            let mut rec = self.record()?;
            rec.config = recorded(name, change, &rec.config)?;
            return Ok(self.store(&rec)?);
        }
        let resource = change.resource().ok_or_else(|| VmError::Refused {
            vm: name.to_string(),
            reason: format!("{kind} is fixed when the VM is built"),
        })?;
        if !self.host.caps.supported(resource, op) {
            return Err(VmError::not_supported(&self.host.caps, resource, op));
        }
        let (q, rec) = self.live().await?;
        // The record is what was applied, QEMU what the VM has (a device
        // may have been removed by hand): the record takes the change as a
        // set, and only a removal of what neither has is refused.
        let config = recorded(name, change, &rec.config)?;
        let mut plug = Hotplug {
            vm: self,
            name,
            q,
            rec,
        };
        if let Change::Remove(item) = change {
            let known = crate::vm::items::flatten(&plug.rec.config).contains_key(&item.key());
            if !known && !plug.present(item).await? {
                return Err(VmError::NoSuchItem {
                    vm: name.to_string(),
                    item: change.label(),
                });
            }
        }
        match change {
            Change::Add(item) => plug.add(item).await?,
            Change::Remove(item) => {
                // Its DEVICE_DELETED is this change's echo, not news.
                let device = device_id(item);
                if let Some(d) = &device {
                    self.expect_unplug(d, true);
                }
                let removed = plug.remove(item).await;
                if let Some(d) = &device
                    && removed.is_err()
                {
                    self.expect_unplug(d, false);
                }
                removed?
            }
            // A singleton is set to its new value; a device is swapped.
            Change::Update { after, .. } if kind.is_singleton() => plug.add(after).await?,
            Change::Update { before, after } => {
                plug.remove(before).await?;
                plug.add(after).await?
            }
        }
        if kind == ResourceKind::VmSocket {
            // A listener may have (re)started the vsock backend, which
            // records its pid itself: keep that, not the copy read before.
            plug.rec = self.record()?;
        }
        plug.rec.config = config;
        Ok(self.store(&plug.rec)?)
    }
}

/// The record's `config` with `change` made.
fn recorded(vm: &str, change: &Change, config: &VmConfig) -> Result<VmConfig> {
    change.recorded(config).map_err(|e| {
        QemuError::Os {
            vm: vm.to_string(),
            what: e.to_string(),
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Boot, LinuxKernelDirect};
    use crate::virtstack::qemu::Qemu;
    use crate::vm::ErrorKind;
    use crate::vm::{Virtstack, VmName};

    fn vm_name(n: &str) -> VmName {
        VmName::new(n).expect("valid name")
    }

    fn host() -> (tempfile::TempDir, Qemu) {
        crate::virtstack::qemu::test_host()
    }

    fn config(kernel: &Path) -> VmConfig {
        VmConfig {
            boot: Boot {
                linux_kernel_direct: Some(LinuxKernelDirect {
                    kernel: kernel.to_path_buf(),
                    initrd: None,
                    cmdline: "console=ttyS0".into(),
                }),
                uefi: None,
            },
            ..VmConfig::default()
        }
    }

    #[tokio::test]
    async fn a_created_vm_takes_record_changes_and_refuses_live_ones_with_their_kind() {
        let (dir, qemu) = host();
        let name = vm_name("built");
        let cfg = config(&dir.path().join("vmlinux"));
        Virtstack::create(&qemu, &name, &cfg).await.expect("create");
        let rec = qemu.record_now(&name).expect("record");
        assert_eq!(rec.pid, None, "created, not launched");

        // The policy is uvmctl's record only: changed on a stopped VM.
        let before = Item::Policy(cfg.policy);
        let mut policy = cfg.policy;
        policy.protected = true;
        let after = Item::Policy(policy);
        qemu.change(&name, &Change::Update { before, after })
            .await
            .expect("policy");
        assert!(
            qemu.record_now(&name)
                .expect("record")
                .config
                .policy
                .protected
        );

        // A device change needs a running VM, and says which state it is in.
        let nic = Item::NetworkAdapter(NetworkAdapter {
            nic_id: "n".into(),
            endpoint_id: "user".into(),
            mac_address: "52-54-00-00-00-01".into(),
        });
        let err = qemu
            .change(&name, &Change::Add(nic.clone()))
            .await
            .expect_err("not running");
        assert_eq!(err.kind(), ErrorKind::WrongState, "{err}");
        // What the capabilities do not offer is NotSupported, before anything.
        let share = Item::Plan9Share(crate::spec::Plan9Share {
            name: "s".into(),
            host_path: dir.path().to_path_buf(),
            port: 564,
            flags: 0,
            allowed_files: vec![],
            read_only: true,
        });
        let err = qemu
            .change(&name, &Change::Add(share))
            .await
            .expect_err("no fsdev_add");
        assert_eq!(err.kind(), ErrorKind::NotSupported, "{err}");

        Virtstack::destroy(&qemu, &name).await.expect("destroy");
        let err = Virtstack::destroy(&qemu, &name).await.expect_err("gone");
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        let err = qemu
            .change(&name, &Change::Add(nic))
            .await
            .expect_err("gone");
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    }

    #[tokio::test]
    async fn bad_host_paths_are_refused_before_anything_exists() {
        let (_dir, qemu) = host();
        let cfg = config(Path::new("/etc/passwd"));
        let err = Virtstack::create(&qemu, &vm_name("outside"), &cfg)
            .await
            .expect_err("a kernel outside the allowed roots");
        let text = crate::vm::Chain(&err).to_string();
        assert!(text.contains("kernel"), "{text}");
        assert!(qemu.list().is_empty(), "nothing was created");
    }
}
