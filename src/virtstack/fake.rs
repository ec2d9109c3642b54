//! An in-memory virtstack with scripted failures and hangs: what the
//! executor, `status` and the reconcile loop are tested against without
//! QEMU. It keeps the same rules a real one does: live changes only where
//! its capabilities say live, only on a running or paused VM, refusals
//! before anything is created.

use crate::vm::items::{Item, ItemKey, ResourceKind, ScsiDiskItem, flatten, unflatten};
use crate::vm::{
    Capabilities, NetworkManager, Observe, ObservedVm, PciManager, Plan9Manager, Resource,
    ResourceOperation, ScsiDiskType, ScsiManager, State, Uvm, UvmBuilder, VMSocketManager,
    VMSocketType, VPMemImageFormat, Virtstack, VmError, VmEvent, VmName, VmStats, VpmemManager,
    VsmbManager, VsmbOptions,
    config::{
        NetworkAdapter, PciDevice, Plan9Share, Policy, PowerState, ScsiDisk, VmConfig, VmSocket,
        VpmemDevice, VsmbShare,
    },
};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

type Result<T, E = VmError> = std::result::Result<T, E>;

/// One VM the fake holds.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeVm {
    /// Its configuration as built and changed.
    pub config: VmConfig,
    /// Lifecycle state.
    pub state: State,
    /// Whether uvmctl created it.
    pub managed: bool,
}

#[derive(Debug, Default)]
struct Inner {
    vms: BTreeMap<String, FakeVm>,
    /// `(vm, verb)` that fail; verbs are the trait methods' names, and
    /// `"add scsiDisk"`-style for live changes.
    fail: BTreeSet<(String, String)>,
    /// `(vm, verb)` that never return.
    hang: BTreeSet<(String, String)>,
    /// Every call that changed something, in order: `vm verb`.
    log: Vec<String>,
    /// Event subscribers per VM.
    subscribers: BTreeMap<String, Vec<tokio::sync::mpsc::Sender<VmEvent>>>,
    /// Why a VM that died on its own died.
    crashed: BTreeMap<String, String>,
}

/// The in-memory virtstack. Clones share one state.
#[derive(Debug, Clone)]
pub struct Fake {
    caps: Capabilities,
    inner: Arc<Mutex<Inner>>,
}

impl Fake {
    /// An empty host with `caps`.
    pub fn new(caps: Capabilities) -> Self {
        Fake {
            caps,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding it leaves consistent data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts a VM on the host as if it had been there.
    pub fn insert(&self, name: &str, vm: FakeVm) {
        self.lock().vms.insert(name.to_string(), vm);
    }

    /// The VM as the fake holds it.
    pub fn get(&self, name: &str) -> Option<FakeVm> {
        self.lock().vms.get(name).cloned()
    }

    /// Makes `verb` on `vm` fail from now on.
    pub fn fail(&self, vm: &str, verb: &str) {
        self.lock().fail.insert((vm.to_string(), verb.to_string()));
    }

    /// Makes `verb` on `vm` never return from now on.
    pub fn hang(&self, vm: &str, verb: &str) {
        self.lock().hang.insert((vm.to_string(), verb.to_string()));
    }

    /// Sends `event` to whoever watches `vm`'s events.
    pub fn emit(&self, vm: &str, event: VmEvent) {
        let subscribers = self.lock().subscribers.get(vm).cloned().unwrap_or_default();
        for tx in subscribers {
            let _ = tx.try_send(event.clone());
        }
    }

    /// The VM dies on its own (`why`): terminated, with an exit error, and
    /// its watchers get [`VmEvent::Gone`].
    pub fn crash(&self, vm: &str, why: &str) {
        let subscribers = {
            let mut inner = self.lock();
            if let Some(v) = inner.vms.get_mut(vm) {
                v.state = State::Terminated;
            }
            inner.crashed.insert(vm.to_string(), why.to_string());
            inner.subscribers.remove(vm).unwrap_or_default()
        };
        for tx in subscribers {
            let _ = tx.try_send(VmEvent::Gone);
        }
    }

    /// What was changed, in order (`vm verb`).
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// Fails or hangs as scripted; otherwise logs the call.
    async fn call(&self, vm: &str, verb: &str) -> Result<()> {
        let key = (vm.to_string(), verb.to_string());
        let (fail, hang) = {
            let inner = self.lock();
            (inner.fail.contains(&key), inner.hang.contains(&key))
        };
        if hang {
            std::future::pending::<()>().await;
        }
        if fail {
            return Err(backend(format!("{vm}: {verb} failed (scripted)")));
        }
        self.lock().log.push(format!("{vm} {verb}"));
        Ok(())
    }

    /// Changes one VM under the lock.
    fn with_vm<T>(&self, name: &str, f: impl FnOnce(&mut FakeVm) -> Result<T>) -> Result<T> {
        let mut inner = self.lock();
        let vm = inner
            .vms
            .get_mut(name)
            .ok_or_else(|| VmError::NotFound(name.to_string()))?;
        f(vm)
    }

    /// A live change of one item: the capabilities must call it live and
    /// the VM must run.
    async fn live(
        &self,
        name: &str,
        resource: Resource,
        op: ResourceOperation,
        kind: ResourceKind,
        key: ItemKey,
        item: Option<Item>,
    ) -> Result<()> {
        self.call(name, &format!("{op} {kind}")).await?;
        if !self.caps.supported(resource, op) {
            return Err(VmError::NotSupported {
                resource,
                operation: op,
            });
        }
        self.with_vm(name, |vm| {
            if !vm.state.is_live() {
                return Err(VmError::NotInRunningState(name.to_string()));
            }
            let mut items = flatten(&vm.config);
            let had = match item {
                Some(i) => items.insert((kind, key.clone()), i).is_some(),
                None => items.remove(&(kind, key.clone())).is_some(),
            };
            // An add of what is there, or a removal of what is not, is the
            // executor out of step with the VM.
            let expected = matches!(op, ResourceOperation::Remove | ResourceOperation::Update);
            if had != expected {
                return Err(backend(format!(
                    "{name}: {op} {kind} {key}: not as planned"
                )));
            }
            vm.config = unflatten(&items, vm.config.power_state).map_err(backend)?;
            Ok(())
        })
    }
}

fn backend(what: String) -> VmError {
    VmError::Backend(what.into())
}

#[async_trait]
impl Observe for Fake {
    fn name(&self) -> &str {
        "fake"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn list(&self) -> Result<Vec<VmName>> {
        Ok(self
            .lock()
            .vms
            .keys()
            .filter_map(|n| VmName::new(n).ok())
            .collect())
    }

    async fn observe(&self, name: &VmName) -> Result<ObservedVm> {
        self.call(name, "observe").await?;
        let vm = self
            .get(name)
            .ok_or_else(|| VmError::NotFound(name.to_string()))?;
        Ok(ObservedVm {
            config: vm.config,
            state: vm.state,
            managed: vm.managed,
            exit_error: self.lock().crashed.get(name.as_str()).cloned(),
            memory_hotplug: None,
        })
    }
}

#[async_trait]
impl Virtstack for Fake {
    fn builder(&self, name: &VmName, _guest_os: crate::vm::GuestOs) -> Result<Box<dyn UvmBuilder>> {
        Err(backend(format!(
            "{name}: the fake virtstack builds VMs from whole configurations only"
        )))
    }

    fn preflight(&self, _name: &VmName, config: &VmConfig) -> Result<()> {
        match self.caps.refusals(config).into_iter().next() {
            Some(r) => Err(VmError::Refused(r)),
            None => Ok(()),
        }
    }

    async fn create(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.preflight(name, config)?;
        self.call(name, "create").await?;
        let mut inner = self.lock();
        if inner.vms.contains_key(name.as_str()) {
            return Err(backend(format!("{name}: exists already")));
        }
        let mut config = config.clone();
        config.power_state = PowerState::Stopped;
        inner.vms.insert(
            name.to_string(),
            FakeVm {
                config,
                state: State::Created,
                managed: true,
            },
        );
        Ok(())
    }

    async fn open(&self, name: &VmName) -> Result<Box<dyn Uvm>> {
        self.get(name)
            .ok_or_else(|| VmError::NotFound(name.to_string()))?;
        Ok(Box::new(FakeUvm {
            fake: self.clone(),
            name: name.to_string(),
        }))
    }

    async fn reconfigure(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.preflight(name, config)?;
        self.call(name, "reconfigure").await?;
        self.with_vm(name, |vm| {
            if vm.state.is_live() {
                return Err(backend(format!("{name}: reconfigured while it runs")));
            }
            vm.config = config.clone();
            Ok(())
        })
    }

    async fn set_policy(&self, name: &VmName, policy: &Policy) -> Result<()> {
        self.call(name, "set_policy").await?;
        self.with_vm(name, |vm| {
            vm.config.policy = *policy;
            Ok(())
        })
    }

    async fn start(&self, name: &VmName, paused: bool) -> Result<()> {
        self.call(name, "start").await?;
        self.lock().crashed.remove(name.as_str());
        let caps = self.caps.clone();
        self.with_vm(name, |vm| {
            if vm.state.is_live() {
                return Err(VmError::NotInCreatedState(name.to_string()));
            }
            if let Some(r) = caps.refusals(&vm.config).into_iter().next() {
                return Err(VmError::Refused(r));
            }
            vm.state = if paused {
                State::Paused
            } else {
                State::Running
            };
            Ok(())
        })
    }

    async fn stop(&self, name: &VmName) -> Result<()> {
        self.call(name, "stop").await?;
        self.with_vm(name, |vm| {
            vm.state = State::Terminated;
            Ok(())
        })
    }

    async fn pause(&self, name: &VmName) -> Result<()> {
        self.call(name, "pause").await?;
        self.with_vm(name, |vm| match vm.state {
            State::Running | State::Paused => {
                vm.state = State::Paused;
                Ok(())
            }
            _ => Err(VmError::NotInRunningState(name.to_string())),
        })
    }

    async fn resume(&self, name: &VmName) -> Result<()> {
        self.call(name, "resume").await?;
        self.with_vm(name, |vm| match vm.state {
            State::Running | State::Paused => {
                vm.state = State::Running;
                Ok(())
            }
            _ => Err(VmError::NotInPausedState(name.to_string())),
        })
    }

    async fn save(&self, name: &VmName) -> Result<()> {
        self.call(name, "save").await?;
        self.with_vm(name, |vm| {
            if !vm.state.is_live() {
                return Err(VmError::NotInRunningState(name.to_string()));
            }
            vm.state = State::Saved;
            Ok(())
        })
    }

    async fn destroy(&self, name: &VmName) -> Result<()> {
        self.call(name, "destroy").await?;
        self.lock().crashed.remove(name.as_str());
        self.lock()
            .vms
            .remove(name.as_str())
            .map(drop)
            .ok_or_else(|| VmError::NotFound(name.to_string()))
    }

    async fn guest_ready(&self, name: &VmName) -> Result<bool> {
        Ok(self.get(name).is_some_and(|vm| vm.state == State::Running))
    }

    async fn stats(&self, name: &VmName) -> Result<VmStats> {
        let vm = self
            .get(name)
            .ok_or_else(|| VmError::NotFound(name.to_string()))?;
        Ok(VmStats {
            assigned_memory_bytes: vm.config.memory.size_mb << 20,
            ..VmStats::default()
        })
    }

    async fn wait(&self, name: &VmName, _timeout: Option<std::time::Duration>) -> Result<bool> {
        Ok(self.get(name).is_none_or(|vm| !vm.state.is_live()))
    }

    async fn exit_error(&self, name: &VmName) -> Option<String> {
        self.lock().crashed.get(name.as_str()).cloned()
    }

    async fn events(&self, name: &VmName) -> Result<Option<crate::vm::VmEvents>> {
        let mut inner = self.lock();
        if !inner
            .vms
            .get(name.as_str())
            .is_some_and(|v| v.state.is_live())
        {
            return Ok(None);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        inner
            .subscribers
            .entry(name.to_string())
            .or_default()
            .push(tx);
        Ok(Some(rx))
    }
}

/// A VM of the fake, for live changes.
#[derive(Debug, Clone)]
struct FakeUvm {
    fake: Fake,
    name: String,
}

#[async_trait]
impl Uvm for FakeUvm {
    fn id(&self) -> &str {
        &self.name
    }

    async fn state(&self) -> Result<State> {
        self.fake
            .get(&self.name)
            .map(|vm| vm.state)
            .ok_or_else(|| VmError::NotFound(self.name.clone()))
    }

    async fn start(&self) -> Result<()> {
        Virtstack::start(&self.fake, &VmName::new(&self.name)?, false).await
    }

    async fn stop(&self) -> Result<()> {
        Virtstack::stop(&self.fake, &VmName::new(&self.name)?).await
    }

    async fn pause(&self) -> Result<()> {
        Virtstack::pause(&self.fake, &VmName::new(&self.name)?).await
    }

    async fn resume(&self) -> Result<()> {
        Virtstack::resume(&self.fake, &VmName::new(&self.name)?).await
    }

    async fn save(&self) -> Result<()> {
        Virtstack::save(&self.fake, &VmName::new(&self.name)?).await
    }

    async fn wait(&self) -> Result<()> {
        Virtstack::wait(&self.fake, &VmName::new(&self.name)?, None)
            .await
            .map(drop)
    }

    async fn stats(&self) -> Result<VmStats> {
        Virtstack::stats(&self.fake, &VmName::new(&self.name)?).await
    }

    fn supported(&self, resource: Resource, operation: ResourceOperation) -> bool {
        self.fake.caps.supported(resource, operation)
    }

    fn exit_error(&self) -> Option<String> {
        None
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
        Some(self)
    }

    fn pci(&self) -> Option<&dyn PciManager> {
        Some(self)
    }

    fn vm_socket(&self) -> Option<&dyn VMSocketManager> {
        Some(self)
    }

    async fn set_processor_count(&self, count: u32) -> Result<()> {
        let (r, op) = (Resource::Processor, ResourceOperation::Update);
        let item = Some(Item::Processors(count));
        self.fake
            .live(
                &self.name,
                r,
                op,
                ResourceKind::Processors,
                ItemKey::Unit,
                item,
            )
            .await
    }

    async fn set_memory_size(&self, memory_mb: u64) -> Result<()> {
        let (r, op) = (Resource::Memory, ResourceOperation::Update);
        let item = Some(Item::Memory(memory_mb));
        self.fake
            .live(&self.name, r, op, ResourceKind::Memory, ItemKey::Unit, item)
            .await
    }

    async fn set_storage_qos(&self, iops_maximum: u64, bandwidth_maximum: u64) -> Result<()> {
        let qos = crate::vm::config::StorageQos {
            iops_maximum: (iops_maximum > 0).then_some(iops_maximum),
            bandwidth_maximum: (bandwidth_maximum > 0).then_some(bandwidth_maximum),
        };
        let qos = (qos.iops_maximum.is_some() || qos.bandwidth_maximum.is_some()).then_some(qos);
        let (r, op) = (Resource::StorageQos, ResourceOperation::Update);
        self.fake
            .live(
                &self.name,
                r,
                op,
                ResourceKind::StorageQos,
                ItemKey::Unit,
                Some(Item::StorageQos(qos)),
            )
            .await
    }
}

impl FakeUvm {
    async fn add(&self, r: Resource, kind: ResourceKind, key: ItemKey, item: Item) -> Result<()> {
        self.fake
            .live(&self.name, r, ResourceOperation::Add, kind, key, Some(item))
            .await
    }

    async fn remove(&self, r: Resource, kind: ResourceKind, key: ItemKey) -> Result<()> {
        self.fake
            .live(&self.name, r, ResourceOperation::Remove, kind, key, None)
            .await
    }
}

#[async_trait]
impl ScsiManager for FakeUvm {
    async fn add_scsi_controller(&self, id: u32) -> Result<()> {
        let (k, key) = (ResourceKind::ScsiController, ItemKey::Num(id));
        self.add(Resource::ScsiController, k, key, Item::ScsiController(id))
            .await
    }

    async fn remove_scsi_controller(&self, id: u32) -> Result<()> {
        let (k, key) = (ResourceKind::ScsiController, ItemKey::Num(id));
        self.remove(Resource::ScsiController, k, key).await
    }

    async fn add_scsi_disk(
        &self,
        controller: u32,
        lun: u32,
        path: &Path,
        typ: ScsiDiskType,
        read_only: bool,
    ) -> Result<()> {
        let disk = ScsiDisk {
            lun,
            path: path.to_path_buf(),
            disk_type: typ,
            read_only,
        };
        let item = Item::ScsiDisk(ScsiDiskItem { controller, disk });
        let (k, key) = (ResourceKind::ScsiDisk, ItemKey::Lun(controller, lun));
        self.add(Resource::Scsi, k, key, item).await
    }

    async fn remove_scsi_disk(&self, controller: u32, lun: u32, _path: &Path) -> Result<()> {
        let (k, key) = (ResourceKind::ScsiDisk, ItemKey::Lun(controller, lun));
        self.remove(Resource::Scsi, k, key).await
    }
}

#[async_trait]
impl VpmemManager for FakeUvm {
    async fn add_vpmem_device(
        &self,
        id: u32,
        path: &Path,
        read_only: bool,
        format: VPMemImageFormat,
    ) -> Result<()> {
        let item = Item::VpmemDevice(VpmemDevice {
            id,
            path: path.to_path_buf(),
            format,
            read_only,
        });
        let (k, key) = (ResourceKind::VpmemDevice, ItemKey::Num(id));
        self.add(Resource::VPMem, k, key, item).await
    }

    async fn remove_vpmem_device(&self, id: u32, _path: &Path) -> Result<()> {
        let (k, key) = (ResourceKind::VpmemDevice, ItemKey::Num(id));
        self.remove(Resource::VPMem, k, key).await
    }
}

#[async_trait]
impl NetworkManager for FakeUvm {
    async fn add_nic(&self, nic_id: &str, endpoint_id: &str, mac: &str) -> Result<()> {
        let item = Item::NetworkAdapter(NetworkAdapter {
            nic_id: nic_id.to_string(),
            endpoint_id: endpoint_id.to_string(),
            mac_address: mac.to_string(),
        });
        let (k, key) = (ResourceKind::NetworkAdapter, ItemKey::Text(nic_id.into()));
        self.add(Resource::Network, k, key, item).await
    }

    async fn remove_nic(&self, nic_id: &str, _endpoint_id: &str, _mac: &str) -> Result<()> {
        let (k, key) = (ResourceKind::NetworkAdapter, ItemKey::Text(nic_id.into()));
        self.remove(Resource::Network, k, key).await
    }
}

#[async_trait]
impl Plan9Manager for FakeUvm {
    async fn add_plan9(
        &self,
        path: &Path,
        name: &str,
        port: u32,
        flags: u32,
        allowed: &[String],
        read_only: bool,
    ) -> Result<()> {
        let item = Item::Plan9Share(Plan9Share {
            name: name.to_string(),
            host_path: path.to_path_buf(),
            port,
            flags,
            allowed_files: allowed.to_vec(),
            read_only,
        });
        let (k, key) = (ResourceKind::Plan9Share, ItemKey::Text(name.into()));
        self.add(Resource::Plan9, k, key, item).await
    }

    async fn remove_plan9(&self, name: &str, _port: u32) -> Result<()> {
        let (k, key) = (ResourceKind::Plan9Share, ItemKey::Text(name.into()));
        self.remove(Resource::Plan9, k, key).await
    }
}

#[async_trait]
impl VsmbManager for FakeUvm {
    async fn add_vsmb(
        &self,
        host_path: &Path,
        name: &str,
        allowed_files: &[String],
        options: &VsmbOptions,
    ) -> Result<()> {
        let item = Item::VsmbShare(VsmbShare {
            name: name.to_string(),
            host_path: host_path.to_path_buf(),
            allowed_files: allowed_files.to_vec(),
            options: *options,
        });
        let (k, key) = (ResourceKind::VsmbShare, ItemKey::Text(name.into()));
        self.add(Resource::Vsmb, k, key, item).await
    }

    async fn remove_vsmb(&self, name: &str) -> Result<()> {
        let (k, key) = (ResourceKind::VsmbShare, ItemKey::Text(name.into()));
        self.remove(Resource::Vsmb, k, key).await
    }
}

#[async_trait]
impl PciManager for FakeUvm {
    async fn add_device(&self, instance_id: &str, vmbus_guid: &str) -> Result<()> {
        let item = Item::PciDevice(PciDevice {
            instance_id: instance_id.to_string(),
            vmbus_guid: (!vmbus_guid.is_empty()).then(|| vmbus_guid.to_string()),
        });
        let (k, key) = (ResourceKind::PciDevice, ItemKey::Text(instance_id.into()));
        self.add(Resource::Pci, k, key, item).await
    }

    async fn remove_device(&self, instance_id: &str, _vmbus_guid: &str) -> Result<()> {
        let (k, key) = (ResourceKind::PciDevice, ItemKey::Text(instance_id.into()));
        self.remove(Resource::Pci, k, key).await
    }
}

#[async_trait]
impl VMSocketManager for FakeUvm {
    async fn vm_socket_listen(
        &self,
        socket_type: VMSocketType,
        conn_id: &str,
        listener_path: &Path,
    ) -> Result<()> {
        let (service_id, port) = match socket_type {
            VMSocketType::HvSocket => (Some(conn_id.to_string()), None),
            VMSocketType::VSock => (
                None,
                Some(conn_id.parse::<u32>().map_err(|e| backend(e.to_string()))?),
            ),
        };
        let item = Item::VmSocket(VmSocket {
            socket_type,
            service_id,
            port,
            listener_path: listener_path.to_path_buf(),
        });
        let key = ItemKey::Socket(socket_type, conn_id.to_string());
        self.add(
            socket_resource(socket_type),
            ResourceKind::VmSocket,
            key,
            item,
        )
        .await
    }

    async fn vm_socket_close(&self, socket_type: VMSocketType, conn_id: &str) -> Result<()> {
        let key = ItemKey::Socket(socket_type, conn_id.to_string());
        self.remove(socket_resource(socket_type), ResourceKind::VmSocket, key)
            .await
    }
}

fn socket_resource(t: VMSocketType) -> Resource {
    match t {
        VMSocketType::HvSocket => Resource::HvSocket,
        VMSocketType::VSock => Resource::VmSocket,
    }
}
