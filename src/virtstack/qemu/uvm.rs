//! The core VM traits ([`UvmBuilder`], [`Uvm`], its managers and
//! [`Virtstack`]) over the QEMU virtstack.
//!
//! A builder collects a cold configuration and writes it as the VM's launch
//! record; a [`QemuVm`] is a handle on one VM of the state directory. Every
//! live change goes through QMP and then into the launch record, so a later
//! start (or restore) launches what the VM really has.

use super::images::{check_scsi_image, check_vpmem_image};
use super::launch::LaunchError;
use super::{Qemu, QemuError, ops};
use crate::spec::{
    Boot, LinuxKernelDirect, Mmio, NetworkAdapter, Policy, PowerState, ScsiDisk, SerialConsole,
    StorageQos, UefiBoot, VmConfig, Vpmem, VpmemDevice,
};
use crate::vm::items::{Item, ItemKey, ResourceKind, ScsiDiskItem, flatten, unflatten};
use crate::vm::{
    BootManager, GuestOs, LinuxConfigManager, MemoryConfig, MemoryManager, NetworkManager, Observe,
    PciManager, Plan9Manager, ProcessorManager, Resource, ResourceOperation, ScsiDiskType,
    ScsiManager, SerialManager, State, StorageQosManager, Uvm, UvmBuilder, VMSocketManager,
    VMSocketType, VPMemImageFormat, Virtstack, VmError, VmName, VmStats, VpmemManager, VsmbManager,
    WindowsConfigManager,
};
use async_trait::async_trait;
use std::path::Path;

type Result<T, E = VmError> = std::result::Result<T, E>;

/// A VM being configured for the QEMU virtstack.
#[derive(Debug)]
pub struct QemuBuilder {
    qemu: Qemu,
    name: VmName,
    config: VmConfig,
}

/// One VM of the QEMU virtstack.
#[derive(Debug, Clone)]
pub struct QemuVm {
    qemu: Qemu,
    name: String,
}

impl QemuVm {
    fn err(&self, what: impl Into<String>) -> VmError {
        QemuError::Unsupported {
            vm: self.name.clone(),
            what: what.into(),
        }
        .into()
    }

    fn not_hot(&self, resource: Resource, operation: ResourceOperation) -> VmError {
        let why = self.qemu.capabilities().support(resource, operation).reason;
        self.err(format!("{operation} {resource} cannot be done live: {why}"))
    }

    /// Records one changed item in the launch record (`None` removes it).
    fn record(&self, kind: ResourceKind, key: ItemKey, item: Option<Item>) -> Result<()> {
        let mut rec = self.qemu.record_now(&self.name)?;
        let mut items = flatten(&rec.config);
        match item {
            Some(i) => items.insert((kind, key), i),
            None => items.remove(&(kind, key)),
        };
        rec.config = unflatten(&items, rec.config.power_state).map_err(|what| QemuError::Os {
            vm: self.name.clone(),
            what,
        })?;
        Ok(self.qemu.update_record(&rec)?)
    }

    fn unplug_err(&self, e: ops::UnplugError) -> VmError {
        QemuError::from_unplug(&self.name, e).into()
    }

    fn qmp_err(&self, source: super::qmp::QmpError) -> VmError {
        QemuError::Qmp {
            vm: self.name.clone(),
            source,
        }
        .into()
    }

    /// `path` opened beneath its allowed root, if it lies under one.
    fn open_host(
        &self,
        path: &Path,
        field: &str,
        access: crate::hostfs::Access,
    ) -> Result<super::images::HostFile> {
        self.qemu
            .options()
            .roots
            .open(path, access)
            .map_err(self.path_err(field.to_string()))
    }

    fn path_err(&self, field: String) -> impl Fn(super::HostPathError) -> VmError + '_ {
        move |source| {
            QemuError::Launch {
                vm: self.name.clone(),
                source: LaunchError::HostPath {
                    field: field.clone(),
                    source,
                },
            }
            .into()
        }
    }
}

impl BootManager for QemuBuilder {
    fn set_uefi_boot(&mut self, dir: &Path, path: &str, args: &str) -> Result<()> {
        if self.config.boot.linux_kernel_direct.is_some() || self.config.boot.uefi.is_some() {
            return Err(VmError::AlreadySet("boot"));
        }
        self.config.boot.uefi = Some(UefiBoot {
            dir: dir.to_path_buf(),
            path: path.to_string(),
            args: args.to_string(),
        });
        Ok(())
    }

    fn set_linux_kernel_direct_boot(
        &mut self,
        kernel: &Path,
        initrd: &Path,
        cmdline: &str,
    ) -> Result<()> {
        if self.config.boot.linux_kernel_direct.is_some() || self.config.boot.uefi.is_some() {
            return Err(VmError::AlreadySet("boot"));
        }
        self.config.boot.linux_kernel_direct = Some(LinuxKernelDirect {
            kernel: kernel.to_path_buf(),
            initrd: (!initrd.as_os_str().is_empty()).then(|| initrd.to_path_buf()),
            cmdline: cmdline.to_string(),
        });
        Ok(())
    }
}

impl MemoryManager for QemuBuilder {
    fn set_memory_limit(&mut self, memory_mb: u64) -> Result<()> {
        self.config.memory.size_mb = memory_mb;
        Ok(())
    }

    fn set_memory_config(&mut self, config: &MemoryConfig) -> Result<()> {
        let m = &mut self.config.memory;
        m.backing = config.backing_type;
        m.deferred_commit = config.deferred_commit;
        m.hot_hint = config.hot_hint;
        m.cold_hint = config.cold_hint;
        m.cold_discard_hint = config.cold_discard_hint;
        Ok(())
    }

    fn set_mmio_config(
        &mut self,
        low_gap_mb: u64,
        high_base_mb: u64,
        high_gap_mb: u64,
    ) -> Result<()> {
        self.config.memory.mmio = Some(Mmio {
            low_gap_mb,
            high_base_mb,
            high_gap_mb,
        });
        Ok(())
    }
}

impl ProcessorManager for QemuBuilder {
    fn set_processor_count(&mut self, count: u32) -> Result<()> {
        self.config.processors.count = count;
        Ok(())
    }
}

impl SerialManager for QemuBuilder {
    fn set_serial_console(&mut self, port: u32, listener_path: &Path) -> Result<()> {
        self.config.serial_consoles.retain(|s| s.port != port);
        self.config.serial_consoles.push(SerialConsole {
            port,
            listener_path: listener_path.to_path_buf(),
        });
        self.config.serial_consoles.sort_by_key(|s| s.port);
        Ok(())
    }
}

impl StorageQosManager for QemuBuilder {
    fn set_storage_qos(&mut self, iops_maximum: u64, bandwidth_maximum: u64) -> Result<()> {
        self.config.storage_qos = qos(iops_maximum, bandwidth_maximum);
        Ok(())
    }
}

impl LinuxConfigManager for QemuBuilder {}

/// hcsshim's "0 = unlimited" pair as the spec's optional limits.
fn qos(iops_maximum: u64, bandwidth_maximum: u64) -> Option<StorageQos> {
    let q = StorageQos {
        iops_maximum: (iops_maximum > 0).then_some(iops_maximum),
        bandwidth_maximum: (bandwidth_maximum > 0).then_some(bandwidth_maximum),
    };
    (q.iops_maximum.is_some() || q.bandwidth_maximum.is_some()).then_some(q)
}

#[async_trait]
impl UvmBuilder for QemuBuilder {
    fn guest_os(&self) -> GuestOs {
        self.config.guest_os
    }

    fn boot(&mut self) -> &mut dyn BootManager {
        self
    }

    fn memory(&mut self) -> &mut dyn MemoryManager {
        self
    }

    fn processor(&mut self) -> &mut dyn ProcessorManager {
        self
    }

    fn serial(&mut self) -> Option<&mut dyn SerialManager> {
        Some(self)
    }

    fn storage_qos(&mut self) -> Option<&mut dyn StorageQosManager> {
        Some(self)
    }

    fn windows(&mut self) -> Option<&mut dyn WindowsConfigManager> {
        None
    }

    fn linux(&mut self) -> Option<&mut dyn LinuxConfigManager> {
        Some(self)
    }

    fn add_vpmem_controller(
        &mut self,
        maximum_devices: u32,
        maximum_size_bytes: u64,
    ) -> Result<()> {
        if self.config.vpmem.is_some() {
            return Err(VmError::AlreadySet("vpmem controller"));
        }
        self.config.vpmem = Some(Vpmem {
            maximum_devices,
            maximum_size_bytes,
            devices: Vec::new(),
        });
        Ok(())
    }

    async fn create(self: Box<Self>) -> Result<Box<dyn Uvm>> {
        Virtstack::create(&self.qemu, &self.name, &self.config).await?;
        Ok(Box::new(self.qemu.vm(&self.name)?))
    }
}

#[async_trait]
impl Uvm for QemuVm {
    fn id(&self) -> &str {
        &self.name
    }

    async fn state(&self) -> Result<State> {
        Ok(self.qemu.observe(&self.name).await?.state)
    }

    async fn start(&self) -> Result<()> {
        Ok(self.qemu.start(&self.name).await?)
    }

    async fn stop(&self) -> Result<()> {
        Ok(self.qemu.stop(&self.name).await?)
    }

    async fn pause(&self) -> Result<()> {
        Ok(self.qemu.pause(&self.name).await?)
    }

    async fn resume(&self) -> Result<()> {
        Ok(self.qemu.resume(&self.name).await?)
    }

    async fn save(&self) -> Result<()> {
        Ok(self.qemu.save(&self.name).await?)
    }

    async fn wait(&self) -> Result<()> {
        self.qemu.wait(&self.name, None).await?;
        Ok(())
    }

    async fn stats(&self) -> Result<VmStats> {
        Ok(self.qemu.stats(&self.name).await?)
    }

    fn supported(&self, resource: Resource, operation: ResourceOperation) -> bool {
        self.qemu.capabilities().supported(resource, operation)
    }

    fn exit_error(&self) -> Option<String> {
        self.qemu.exit_error(&self.name)
    }

    fn scsi(&self) -> Option<&dyn ScsiManager> {
        Some(self)
    }

    fn vpmem(&self) -> Option<&dyn VpmemManager> {
        Some(self)
    }

    fn network(&self) -> Option<&dyn NetworkManager> {
        Some(self)
    }

    fn plan9(&self) -> Option<&dyn Plan9Manager> {
        Some(self)
    }

    fn vsmb(&self) -> Option<&dyn VsmbManager> {
        None
    }

    fn pci(&self) -> Option<&dyn PciManager> {
        None
    }

    fn vm_socket(&self) -> Option<&dyn VMSocketManager> {
        Some(self)
    }

    async fn set_processor_count(&self, count: u32) -> Result<()> {
        let (q, _) = self.qemu.live(&self.name).await?;
        ops::set_cpus(&q, count, self.qemu.options().unplug_timeout)
            .await
            .map_err(|e| self.unplug_err(e))?;
        self.record(
            ResourceKind::Processors,
            ItemKey::Unit,
            Some(Item::Processors(count)),
        )
    }

    async fn set_memory_size(&self, memory_mb: u64) -> Result<()> {
        let (q, _) = self.qemu.live(&self.name).await?;
        ops::set_memory(&q, memory_mb, self.qemu.options().unplug_timeout)
            .await
            .map_err(|e| self.unplug_err(e))?;
        self.record(
            ResourceKind::Memory,
            ItemKey::Unit,
            Some(Item::Memory(memory_mb)),
        )
    }

    async fn set_storage_qos(&self, iops_maximum: u64, bandwidth_maximum: u64) -> Result<()> {
        let (q, _) = self.qemu.live(&self.name).await?;
        let limits = qos(iops_maximum, bandwidth_maximum);
        ops::set_storage_qos(&q, limits.as_ref())
            .await
            .map_err(|e| self.qmp_err(e))?;
        self.record(
            ResourceKind::StorageQos,
            ItemKey::Unit,
            Some(Item::StorageQos(limits)),
        )
    }
}

#[async_trait]
impl ScsiManager for QemuVm {
    async fn add_scsi_controller(&self, id: u32) -> Result<()> {
        let (q, _) = self.qemu.live(&self.name).await?;
        ops::add_scsi_controller(&q, id)
            .await
            .map_err(|e| self.qmp_err(e))?;
        self.record(
            ResourceKind::ScsiController,
            ItemKey::Num(id),
            Some(Item::ScsiController(id)),
        )
    }

    async fn remove_scsi_controller(&self, id: u32) -> Result<()> {
        let (q, _) = self.qemu.live(&self.name).await?;
        ops::remove_scsi_controller(&q, id, self.qemu.options().unplug_timeout)
            .await
            .map_err(|e| self.unplug_err(e))?;
        self.record(ResourceKind::ScsiController, ItemKey::Num(id), None)
    }

    async fn add_scsi_disk(
        &self,
        controller: u32,
        lun: u32,
        path: &Path,
        typ: ScsiDiskType,
        read_only: bool,
    ) -> Result<()> {
        let (q, _) = self.qemu.live(&self.name).await?;
        let field = format!("scsiDisk {controller}:{lun}");
        let image = self.open_host(path, &field, super::images::scsi_access(read_only))?;
        check_scsi_image(&image, typ).map_err(self.path_err(field))?;
        let disk = ScsiDisk {
            lun,
            path: path.to_path_buf(),
            disk_type: typ,
            read_only,
        };
        ops::add_scsi_disk(&q, controller, &disk, &image)
            .await
            .map_err(|e| self.qmp_err(e))?;
        self.record(
            ResourceKind::ScsiDisk,
            ItemKey::Lun(controller, lun),
            Some(Item::ScsiDisk(ScsiDiskItem { controller, disk })),
        )
    }

    async fn remove_scsi_disk(&self, controller: u32, lun: u32, _path: &Path) -> Result<()> {
        let (q, _) = self.qemu.live(&self.name).await?;
        ops::remove_scsi_disk(&q, controller, lun, self.qemu.options().unplug_timeout)
            .await
            .map_err(|e| self.unplug_err(e))?;
        self.record(ResourceKind::ScsiDisk, ItemKey::Lun(controller, lun), None)
    }
}

#[async_trait]
impl VpmemManager for QemuVm {
    async fn add_vpmem_device(
        &self,
        id: u32,
        path: &Path,
        read_only: bool,
        format: VPMemImageFormat,
    ) -> Result<()> {
        let (q, rec) = self.qemu.live(&self.name).await?;
        let field = format!("vpmemDevice {id}");
        let image = self.open_host(path, &field, super::images::scsi_access(read_only))?;
        let size = check_vpmem_image(&image, format).map_err(self.path_err(field.clone()))?;
        // QEMU reopens a memory backend's file itself, as its service user.
        if let Some(user) = &self.qemu.options().qemu_user
            && !image
                .file
                .metadata()
                .is_ok_and(|m| user.may_open(&m, !read_only))
        {
            return Err(self.err(format!(
                "{field}: {} is not {} by QEMU's service user {}",
                image.path.display(),
                if read_only {
                    "readable"
                } else {
                    "readable and writable"
                },
                user.name
            )));
        }
        let max = rec
            .config
            .vpmem
            .as_ref()
            .map_or(0, |v| v.maximum_size_bytes);
        if size > max {
            return Err(self.err(format!(
                "{field}: image maps {size} bytes, over the controller's maximumSizeBytes {max}"
            )));
        }
        let device = VpmemDevice {
            id,
            path: path.to_path_buf(),
            format,
            read_only,
        };
        ops::add_vpmem(&q, &device, &image, size)
            .await
            .map_err(|e| self.qmp_err(e))?;
        self.record(
            ResourceKind::VpmemDevice,
            ItemKey::Num(id),
            Some(Item::VpmemDevice(device)),
        )
    }

    async fn remove_vpmem_device(&self, _id: u32, _path: &Path) -> Result<()> {
        Err(self.not_hot(Resource::VPMem, ResourceOperation::Remove))
    }
}

#[async_trait]
impl NetworkManager for QemuVm {
    async fn add_nic(&self, nic_id: &str, endpoint_id: &str, mac: &str) -> Result<()> {
        let (q, _) = self.qemu.live(&self.name).await?;
        let nic = NetworkAdapter {
            nic_id: nic_id.to_string(),
            endpoint_id: endpoint_id.to_string(),
            mac_address: mac.to_string(),
        };
        let tap = if super::launch::is_tap(&nic) {
            Some(super::tap::open(endpoint_id).map_err(|e| {
                self.err(format!(
                    "networkAdapter {nic_id}: cannot open tap {endpoint_id}: {e}"
                ))
            })?)
        } else {
            None
        };
        ops::add_nic(&q, &nic, tap.as_ref().map(std::os::fd::AsFd::as_fd))
            .await
            .map_err(|e| self.qmp_err(e))?;
        self.record(
            ResourceKind::NetworkAdapter,
            ItemKey::Text(nic_id.to_string()),
            Some(Item::NetworkAdapter(nic)),
        )
    }

    async fn remove_nic(&self, nic_id: &str, _endpoint_id: &str, _mac: &str) -> Result<()> {
        let (q, _) = self.qemu.live(&self.name).await?;
        ops::remove_nic(&q, nic_id, self.qemu.options().unplug_timeout)
            .await
            .map_err(|e| self.unplug_err(e))?;
        self.record(
            ResourceKind::NetworkAdapter,
            ItemKey::Text(nic_id.to_string()),
            None,
        )
    }
}

#[async_trait]
impl Plan9Manager for QemuVm {
    async fn add_plan9(
        &self,
        _path: &Path,
        _name: &str,
        _port: u32,
        _flags: u32,
        _allowed: &[String],
        _read_only: bool,
    ) -> Result<()> {
        Err(self.not_hot(Resource::Plan9, ResourceOperation::Add))
    }

    async fn remove_plan9(&self, name: &str, _port: u32) -> Result<()> {
        let (q, _) = self.qemu.live(&self.name).await?;
        ops::remove_plan9(&q, name, self.qemu.options().unplug_timeout)
            .await
            .map_err(|e| self.unplug_err(e))?;
        self.record(
            ResourceKind::Plan9Share,
            ItemKey::Text(name.to_string()),
            None,
        )
    }
}

#[async_trait]
impl VMSocketManager for QemuVm {
    async fn vm_socket_listen(
        &self,
        socket_type: VMSocketType,
        conn_id: &str,
        listener_path: &Path,
    ) -> Result<()> {
        let resource = match socket_type {
            VMSocketType::VSock => Resource::VmSocket,
            VMSocketType::HvSocket => Resource::HvSocket,
        };
        if socket_type != VMSocketType::VSock
            || !self
                .qemu
                .capabilities()
                .supported(resource, ResourceOperation::Add)
        {
            return Err(self.not_hot(resource, ResourceOperation::Add));
        }
        let port = self.vsock_port(conn_id)?;
        let field = format!("spec.vmSockets[vsock:{port}].listenerPath");
        let target = self
            .qemu
            .options()
            .roots
            .check_socket(listener_path)
            .map_err(self.path_err(field.clone()))?;
        if let Some(user) = &self.qemu.options().qemu_user {
            super::launch::check_listener_access(user, &target).map_err(|what| {
                self.err(format!(
                    "{field}: {} is not {what} by QEMU's service user {}",
                    target.display(),
                    user.name
                ))
            })?;
        }
        let (q, _) = self.qemu.live(&self.name).await?;
        self.qemu.ensure_vsock(&q, &self.name).await?;
        super::vsock::link(&self.qemu.options().state_dir, &self.name, port, &target).map_err(
            |e| {
                self.err(format!(
                    "cannot link vsock port {port} to {}: {e}",
                    target.display()
                ))
            },
        )?;
        let item = crate::spec::VmSocket {
            socket_type,
            service_id: None,
            port: Some(port),
            listener_path: listener_path.to_path_buf(),
        };
        self.record(
            ResourceKind::VmSocket,
            ItemKey::Socket(socket_type, port.to_string()),
            Some(Item::VmSocket(item)),
        )
    }

    async fn vm_socket_close(&self, socket_type: VMSocketType, conn_id: &str) -> Result<()> {
        if socket_type != VMSocketType::VSock {
            return Err(self.not_hot(Resource::HvSocket, ResourceOperation::Remove));
        }
        let port = self.vsock_port(conn_id)?;
        super::vsock::unlink(&self.qemu.options().state_dir, &self.name, port)
            .map_err(|e| self.err(format!("cannot unlink vsock port {port}: {e}")))?;
        self.record(
            ResourceKind::VmSocket,
            ItemKey::Socket(socket_type, port.to_string()),
            None,
        )
    }
}

impl QemuVm {
    /// A vsock port as the executor names it.
    fn vsock_port(&self, conn_id: &str) -> Result<u32> {
        conn_id
            .parse::<u32>()
            .map_err(|_| self.err(format!("{conn_id:?} is not a vsock port")))
    }
}

#[async_trait]
impl Virtstack for Qemu {
    fn builder(&self, name: &VmName, guest_os: GuestOs) -> Result<Box<dyn UvmBuilder>> {
        if !self.capabilities().guest_os.contains(&guest_os) {
            return Err(QemuError::Unsupported {
                vm: name.to_string(),
                what: "the qemu virtstack runs Linux guests".into(),
            }
            .into());
        }
        Ok(Box::new(QemuBuilder {
            qemu: self.clone(),
            name: name.clone(),
            config: VmConfig {
                guest_os,
                boot: Boot::default(),
                ..VmConfig::default()
            },
        }))
    }

    fn preflight(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.resolve(config).map(drop).map_err(|source| {
            QemuError::Launch {
                vm: name.to_string(),
                source,
            }
            .into()
        })
    }

    async fn create(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        let mut config = config.clone();
        config.power_state = PowerState::Stopped;
        Ok(Qemu::create(self, name, &config).await?)
    }

    async fn open(&self, name: &VmName) -> Result<Box<dyn Uvm>> {
        Ok(Box::new(self.vm(name)?))
    }

    async fn reconfigure(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        Ok(self.set_config(name, config)?)
    }

    async fn set_policy(&self, name: &VmName, policy: &Policy) -> Result<()> {
        let mut rec = self.record_now(name)?;
        rec.config.policy = *policy;
        Ok(self.update_record(&rec)?)
    }

    async fn start(&self, name: &VmName, paused: bool) -> Result<()> {
        if paused {
            Ok(self.start_paused(name).await?)
        } else {
            Ok(Qemu::start(self, name).await?)
        }
    }

    async fn stop(&self, name: &VmName) -> Result<()> {
        Ok(Qemu::stop(self, name).await?)
    }

    async fn pause(&self, name: &VmName) -> Result<()> {
        Ok(Qemu::pause(self, name).await?)
    }

    async fn resume(&self, name: &VmName) -> Result<()> {
        Ok(Qemu::resume(self, name).await?)
    }

    async fn save(&self, name: &VmName) -> Result<()> {
        Ok(Qemu::save(self, name).await?)
    }

    async fn destroy(&self, name: &VmName) -> Result<()> {
        Ok(Qemu::destroy(self, name).await?)
    }

    async fn guest_ready(&self, name: &VmName) -> Result<bool> {
        Ok(Qemu::guest_ready(self, name).await?)
    }

    async fn stats(&self, name: &VmName) -> Result<VmStats> {
        Ok(Qemu::stats(self, name).await?)
    }

    async fn wait(&self, name: &VmName, timeout: Option<std::time::Duration>) -> Result<bool> {
        Ok(Qemu::wait(self, name, timeout).await?)
    }

    async fn exit_error(&self, name: &VmName) -> Option<String> {
        Qemu::exit_error(self, name)
    }

    async fn events(&self, name: &VmName) -> Result<Option<crate::vm::VmEvents>> {
        Ok(Qemu::events(self, name).await?)
    }

    async fn release(&self, name: &VmName) {
        self.forget(name).await;
    }
}

impl Qemu {
    /// A handle on one VM of the state directory, for the core VM traits.
    pub fn vm(&self, name: &VmName) -> Result<QemuVm, QemuError> {
        self.record_now(name)?;
        Ok(QemuVm {
            qemu: self.clone(),
            name: name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtstack::qemu::{Accel, AllowedRoots, QemuOptions, StateDir};
    use std::time::Duration;

    fn vm_name(n: &str) -> VmName {
        VmName::new(n).expect("valid name")
    }

    fn host() -> (tempfile::TempDir, Qemu) {
        let dir = tempfile::Builder::new()
            .prefix("uvb")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::fs::write(dir.path().join("vmlinux"), b"kernel").expect("kernel");
        let qemu = Qemu::new(QemuOptions {
            qemu_user: None,
            state_dir: StateDir::new(dir.path().join("state")).expect("state dir"),
            roots: AllowedRoots::new(&[dir.path()]),
            accel: Accel::Tcg,
            stop_timeout: Duration::from_secs(1),
            unplug_timeout: Duration::from_secs(1),
            observer: false,
        });
        (dir, qemu)
    }

    #[tokio::test]
    async fn a_built_vm_is_created_with_its_cold_configuration_and_not_started() {
        let (dir, qemu) = host();
        let mut b = Virtstack::builder(&qemu, &vm_name("built"), GuestOs::Linux).expect("builder");
        let kernel = dir.path().join("vmlinux");
        b.boot()
            .set_linux_kernel_direct_boot(&kernel, Path::new(""), "console=ttyS0")
            .expect("boot");
        assert!(matches!(
            b.boot().set_uefi_boot(dir.path(), "BOOTX64.EFI", ""),
            Err(VmError::AlreadySet("boot"))
        ));
        b.memory().set_memory_limit(384).expect("memory");
        b.processor().set_processor_count(2).expect("cpus");
        b.storage_qos()
            .expect("qos manager")
            .set_storage_qos(500, 0)
            .expect("qos");
        b.add_vpmem_controller(2, 1 << 24).expect("vpmem");
        assert!(b.windows().is_none(), "no Windows options on qemu");
        let vm = b.create().await.expect("create");
        assert_eq!(vm.id(), "built");
        assert_eq!(vm.state().await.expect("state"), State::Created);
        assert!(vm.supported(Resource::Scsi, ResourceOperation::Add));
        assert!(!vm.supported(Resource::VPMem, ResourceOperation::Remove));
        assert!(vm.vsmb().is_none() && vm.pci().is_none());

        let rec = qemu.record_now(&vm_name("built")).expect("record");
        assert_eq!(rec.config.memory.size_mb, 384);
        assert_eq!(rec.config.processors.count, 2);
        assert_eq!(
            rec.config.storage_qos,
            Some(StorageQos {
                iops_maximum: Some(500),
                bandwidth_maximum: None
            })
        );
        assert_eq!(rec.pid, None, "created, not launched");
        let boot = rec.config.boot.linux_kernel_direct.expect("direct boot");
        assert_eq!(
            (boot.initrd, boot.cmdline.as_str()),
            (None, "console=ttyS0")
        );

        // Opening finds it again; a VM that is not there is an error.
        let opened = qemu.open(&vm_name("built")).await.expect("open");
        assert_eq!(opened.state().await.expect("state"), State::Created);
        assert!(qemu.open(&vm_name("nope")).await.is_err());
        // Live changes need a running VM, and say so.
        let err = opened
            .network()
            .expect("network manager")
            .add_nic("n", "user", "52-54-00-00-00-01")
            .await
            .expect_err("not running");
        let text = crate::vm::Chain(&err).to_string();
        assert!(text.contains("not running"), "{text}");
        Virtstack::destroy(&qemu, &vm_name("built"))
            .await
            .expect("destroy");
        assert!(qemu.open(&vm_name("built")).await.is_err());
    }

    #[tokio::test]
    async fn windows_guests_and_bad_host_paths_are_refused_before_anything_exists() {
        let (dir, qemu) = host();
        assert!(Virtstack::builder(&qemu, &vm_name("w"), GuestOs::Windows).is_err());
        let mut b =
            Virtstack::builder(&qemu, &vm_name("outside"), GuestOs::Linux).expect("builder");
        b.boot()
            .set_linux_kernel_direct_boot(Path::new("/etc/passwd"), Path::new(""), "")
            .expect("boot");
        let err = match b.create().await {
            Ok(_) => panic!("a kernel outside the allowed roots was accepted"),
            Err(e) => e,
        };
        let text = crate::vm::Chain(&err).to_string();
        assert!(text.contains("kernel"), "{text}");
        assert!(qemu.list().is_empty(), "nothing was created");
        drop(dir);
    }
}
