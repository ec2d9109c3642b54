//! `uvmctl serve`: the vmservice ttrpc server (hcsshim's RemoteVM protocol)
//! over any virtstack implementing the core trait. One server serves one VM,
//! as hcsshim expects.
//!
//! # Guarantees
//! - Every request is checked before anything changes: values by the spec
//!   validation, host paths by the virtstack's pre-flight (allowed roots,
//!   image formats), operations by its capabilities. A bad request gets
//!   `InvalidArgument`, an unsupported one `Unimplemented`, one in the wrong
//!   state `FailedPrecondition`, and changes nothing.
//! - A client's deadline is kept: a call past it answers `DeadlineExceeded`
//!   and is abandoned where it waits (what QEMU was already asked, it
//!   finishes; the next observation shows it), and the server stays healthy.
//! - `WaitVM` blocks until the VM stops or is torn down, alongside any other
//!   call on the same connection.

pub mod convert;
pub mod listen;

use crate::protocol::vmservice as pb;
use crate::protocol::vmservice_ttrpc as svc;
use crate::spec::VmConfig;
use crate::vm::{
    GuestOs, Resource, ResourceOperation, State, Uvm, VMSocketType, Virtstack, VmError, VmName,
};
use async_trait::async_trait;
use convert::RequestError;
use pb::capabilities_vmresponse::{Resource as PbResource, SupportedGuestOS, SupportedResource};
use pb::modify_resource_request::Resource as Modify;
use protobuf::well_known_types::empty::Empty;
use protobuf::well_known_types::struct_::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error as RpcError, get_status};

type RpcResult<T> = ttrpc::Result<T>;

fn status(code: Code, message: impl ToString) -> RpcError {
    RpcError::RpcStatus(get_status(code, message))
}

impl From<RequestError> for RpcError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Invalid { .. } => status(Code::INVALID_ARGUMENT, e),
            RequestError::Unimplemented { .. } => status(Code::UNIMPLEMENTED, e),
        }
    }
}

/// A virtstack error as a ttrpc status.
fn vm_status(e: &VmError) -> RpcError {
    let code = match e {
        VmError::NotSupported { .. } | VmError::Refused(_) => Code::UNIMPLEMENTED,
        VmError::NotInCreatedState(_)
        | VmError::NotInPreCreatedState(_)
        | VmError::NotInRunningState(_)
        | VmError::NotInPausedState(_)
        | VmError::AlreadySet(_) => Code::FAILED_PRECONDITION,
        VmError::NotFound(_) => Code::NOT_FOUND,
        VmError::UnknownGuestOs(_) | VmError::Name(_) => Code::INVALID_ARGUMENT,
        VmError::Backend(_) => Code::INTERNAL,
    };
    status(code, crate::vm::Chain(e))
}

/// A pre-flight refusal: unsupported settings are `Unimplemented`, anything
/// else (host paths outside the allowed roots, wrong image formats) is the
/// request's fault.
fn preflight_status(e: &VmError) -> RpcError {
    match e {
        VmError::Refused(_) | VmError::NotSupported { .. } => vm_status(e),
        _ => status(Code::INVALID_ARGUMENT, crate::vm::Chain(e)),
    }
}

/// The queries `InspectVM` answers.
pub const INSPECT_QUERIES: &[&str] = &["state", "config", "stats", "capabilities", "ready"];

/// The vmservice for one VM of a virtstack.
pub struct VmService {
    vs: Arc<dyn Virtstack>,
    name: VmName,
    /// Changes one at a time: two clients never interleave on the VM.
    changing: tokio::sync::Mutex<()>,
    torn_down: tokio::sync::watch::Sender<bool>,
    quit: Arc<tokio::sync::Notify>,
}

impl VmService {
    /// Serves the VM `name` of `vs` (created by `CreateVM`).
    pub fn new(vs: Arc<dyn Virtstack>, name: VmName) -> Self {
        VmService {
            vs,
            name,
            changing: tokio::sync::Mutex::new(()),
            torn_down: tokio::sync::watch::channel(false).0,
            quit: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Notified when a client calls `Quit`.
    pub fn quit_signal(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.quit)
    }

    /// The ttrpc services to register.
    pub fn into_services(self) -> std::collections::HashMap<String, ttrpc::r#async::Service> {
        svc::create_vm(Arc::new(self))
    }

    async fn exists(&self) -> RpcResult<bool> {
        Ok(self
            .vs
            .list()
            .await
            .map_err(|e| vm_status(&e))?
            .contains(&self.name))
    }

    /// The VM as the virtstack has it now, or `FailedPrecondition` before
    /// `CreateVM`.
    async fn observed(&self) -> RpcResult<crate::vm::ObservedVm> {
        if !self.exists().await? {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("no VM {}: CreateVM first", self.name),
            ));
        }
        self.vs.observe(&self.name).await.map_err(|e| vm_status(&e))
    }

    async fn state(&self) -> RpcResult<State> {
        Ok(self.observed().await?.state)
    }

    async fn uvm(&self) -> RpcResult<Box<dyn Uvm>> {
        self.vs.open(&self.name).await.map_err(|e| vm_status(&e))
    }

    /// Refuses an operation the capabilities do not call live.
    fn live(&self, r: Resource, op: ResourceOperation) -> RpcResult<()> {
        let s = self.vs.capabilities().support(r, op);
        if self.vs.capabilities().supported(r, op) {
            Ok(())
        } else {
            Err(status(
                Code::UNIMPLEMENTED,
                format!("{op} {r} is not done live here: {}", s.reason),
            ))
        }
    }

    /// Checks the configuration the VM would have after a change, as the
    /// virtstack's pre-flight does for a new VM: host paths, refusals.
    fn precheck(&self, cfg: VmConfig) -> RpcResult<()> {
        let cfg = convert::validated(self.name.as_str(), cfg)?;
        self.vs
            .preflight(&self.name, &cfg)
            .map_err(|e| preflight_status(&e))
    }

    async fn modify(&self, req: &pb::ModifyResourceRequest) -> RpcResult<()> {
        let ty = convert::known(req.type_, "type")?;
        let op = match ty {
            pb::ModifyType::ADD => ResourceOperation::Add,
            pb::ModifyType::REMOVE => ResourceOperation::Remove,
            pb::ModifyType::UPDATE => ResourceOperation::Update,
        };
        let Some(resource) = &req.resource else {
            return Err(status(Code::INVALID_ARGUMENT, "resource: missing"));
        };
        let seen = self.observed().await?;
        let (mut cfg, state) = (seen.config, seen.state);
        if !state.is_live() {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("VM {} does not run ({state}); ResumeVM first", self.name),
            ));
        }
        let vm = self.uvm().await?;
        let err = |e: VmError| vm_status(&e);
        match resource {
            Modify::ScsiDisk(d) => {
                self.live(Resource::Scsi, op)?;
                let typ = convert::disk_type(d.type_, "scsi_disk.type")?;
                let scsi = vm
                    .scsi()
                    .ok_or_else(|| status(Code::UNIMPLEMENTED, "no SCSI"))?;
                let present = cfg
                    .scsi_controllers
                    .iter()
                    .find(|c| c.id == d.controller)
                    .is_some_and(|c| c.disks.iter().any(|x| x.lun == d.lun));
                match op {
                    ResourceOperation::Add => {
                        if present {
                            return Err(status(
                                Code::ALREADY_EXISTS,
                                format!("SCSI {}:{} is attached", d.controller, d.lun),
                            ));
                        }
                        let disk = crate::spec::ScsiDisk {
                            lun: d.lun,
                            path: d.host_path.clone().into(),
                            disk_type: typ,
                            read_only: d.read_only,
                        };
                        let has_controller =
                            cfg.scsi_controllers.iter().any(|c| c.id == d.controller);
                        match cfg
                            .scsi_controllers
                            .iter_mut()
                            .find(|c| c.id == d.controller)
                        {
                            Some(c) => c.disks.push(disk),
                            None => cfg.scsi_controllers.push(crate::spec::ScsiController {
                                id: d.controller,
                                disks: vec![disk],
                            }),
                        }
                        self.precheck(cfg)?;
                        if !has_controller {
                            scsi.add_scsi_controller(d.controller).await.map_err(err)?;
                        }
                        scsi.add_scsi_disk(
                            d.controller,
                            d.lun,
                            Path::new(&d.host_path),
                            typ,
                            d.read_only,
                        )
                        .await
                        .map_err(err)
                    }
                    ResourceOperation::Remove => {
                        if !present {
                            return Err(status(
                                Code::NOT_FOUND,
                                format!("no SCSI disk at {}:{}", d.controller, d.lun),
                            ));
                        }
                        scsi.remove_scsi_disk(d.controller, d.lun, Path::new(&d.host_path))
                            .await
                            .map_err(err)
                    }
                    ResourceOperation::Update => Err(status(
                        Code::UNIMPLEMENTED,
                        "a SCSI disk is not updated in place",
                    )),
                }
            }
            Modify::VpmemDisk(d) => {
                self.live(Resource::VPMem, op)?;
                let format = convert::vpmem_format(d.type_, "vpmem_disk.type")?;
                let pmem = vm
                    .vpmem()
                    .ok_or_else(|| status(Code::UNIMPLEMENTED, "no VPMem"))?;
                let v = cfg.vpmem.clone().unwrap_or(crate::spec::Vpmem {
                    maximum_devices: 0,
                    maximum_size_bytes: convert::VPMEM_DEVICE_BYTES,
                    devices: Vec::new(),
                });
                match op {
                    ResourceOperation::Add => {
                        let id = (0..v.maximum_devices)
                            .find(|i| !v.devices.iter().any(|x| x.id == *i))
                            .ok_or_else(|| {
                                status(Code::RESOURCE_EXHAUSTED, "every VPMem slot is taken")
                            })?;
                        let mut with = v.clone();
                        with.devices.push(crate::spec::VpmemDevice {
                            id,
                            path: d.host_path.clone().into(),
                            format,
                            read_only: d.read_only,
                        });
                        cfg.vpmem = Some(with);
                        self.precheck(cfg)?;
                        pmem.add_vpmem_device(id, Path::new(&d.host_path), d.read_only, format)
                            .await
                            .map_err(err)
                    }
                    ResourceOperation::Remove => {
                        let dev = v
                            .devices
                            .iter()
                            .find(|x| x.path == Path::new(&d.host_path))
                            .ok_or_else(|| {
                                status(
                                    Code::NOT_FOUND,
                                    format!("no VPMem device for {}", d.host_path),
                                )
                            })?;
                        pmem.remove_vpmem_device(dev.id, &dev.path)
                            .await
                            .map_err(err)
                    }
                    ResourceOperation::Update => Err(status(
                        Code::UNIMPLEMENTED,
                        "a VPMem device is not updated in place",
                    )),
                }
            }
            Modify::NicConfig(n) => {
                self.live(Resource::Network, op)?;
                let nic = convert::nic(n);
                let net = vm
                    .network()
                    .ok_or_else(|| status(Code::UNIMPLEMENTED, "no network"))?;
                let present = cfg
                    .network_adapters
                    .iter()
                    .any(|x| x.nic_id.eq_ignore_ascii_case(&nic.nic_id));
                match op {
                    ResourceOperation::Add => {
                        if present {
                            return Err(status(
                                Code::ALREADY_EXISTS,
                                format!("NIC {} exists", nic.nic_id),
                            ));
                        }
                        cfg.network_adapters.push(nic);
                        let checked = convert::validated(self.name.as_str(), cfg)?;
                        let added = checked
                            .network_adapters
                            .last()
                            .cloned()
                            .ok_or_else(|| status(Code::INTERNAL, "NIC lost in validation"))?;
                        self.vs
                            .preflight(&self.name, &checked)
                            .map_err(|e| preflight_status(&e))?;
                        net.add_nic(&added.nic_id, &added.endpoint_id, &added.mac_address)
                            .await
                            .map_err(err)
                    }
                    ResourceOperation::Remove => {
                        let have = cfg
                            .network_adapters
                            .iter()
                            .find(|x| x.nic_id.eq_ignore_ascii_case(&nic.nic_id))
                            .ok_or_else(|| {
                                status(Code::NOT_FOUND, format!("no NIC {}", nic.nic_id))
                            })?;
                        net.remove_nic(&have.nic_id, &have.endpoint_id, &have.mac_address)
                            .await
                            .map_err(err)
                    }
                    ResourceOperation::Update => {
                        Err(status(Code::UNIMPLEMENTED, "a NIC is not updated in place"))
                    }
                }
            }
            Modify::Memory(m) => {
                if op != ResourceOperation::Update {
                    return Err(status(Code::INVALID_ARGUMENT, "memory is only updated"));
                }
                self.live(Resource::Memory, op)?;
                cfg.memory.size_mb = m.memory_mb;
                convert::validated(self.name.as_str(), cfg)?;
                vm.set_memory_size(m.memory_mb).await.map_err(err)
            }
            Modify::Processor(_) => {
                self.live(Resource::Processor, ResourceOperation::Update)?;
                let count = match op {
                    ResourceOperation::Add => cfg.processors.count.saturating_add(1),
                    ResourceOperation::Remove if cfg.processors.count > 1 => {
                        cfg.processors.count - 1
                    }
                    ResourceOperation::Remove => {
                        return Err(status(
                            Code::FAILED_PRECONDITION,
                            "the last processor stays",
                        ));
                    }
                    ResourceOperation::Update => {
                        return Err(status(
                            Code::INVALID_ARGUMENT,
                            "processors are added or removed one at a time",
                        ));
                    }
                };
                cfg.processors.count = count;
                convert::validated(self.name.as_str(), cfg)?;
                vm.set_processor_count(count).await.map_err(err)
            }
            Modify::ProcessorConfig(_) => Err(status(
                Code::UNIMPLEMENTED,
                "processor weight and limit are not part of uvmctl's model",
            )),
            Modify::WindowsDevice(w) => {
                self.live(Resource::Pci, op)?;
                let pci = vm
                    .pci()
                    .ok_or_else(|| status(Code::UNIMPLEMENTED, "no PCI"))?;
                match op {
                    ResourceOperation::Add => pci.add_device(&w.instance_id, "").await.map_err(err),
                    ResourceOperation::Remove => {
                        pci.remove_device(&w.instance_id, "").await.map_err(err)
                    }
                    ResourceOperation::Update => {
                        Err(status(Code::UNIMPLEMENTED, "a PCI device is not updated"))
                    }
                }
            }
        }
    }

    async fn socket(&self, req: &pb::VMSocketRequest) -> RpcResult<()> {
        let ty = convert::known(req.type_, "type")?;
        let (port, listener) = match &req.Config {
            Some(pb::vmsocket_request::Config::VsockListen(v)) => (v.port, v.listener_path.clone()),
            Some(pb::vmsocket_request::Config::HvsocketList(_)) => {
                return Err(status(
                    Code::UNIMPLEMENTED,
                    "HvSocket is a Hyper-V transport; use vsock",
                ));
            }
            None => return Err(status(Code::INVALID_ARGUMENT, "Config: missing")),
        };
        let op = match ty {
            pb::ModifyType::ADD => ResourceOperation::Add,
            pb::ModifyType::REMOVE => ResourceOperation::Remove,
            pb::ModifyType::UPDATE => ResourceOperation::Update,
        };
        self.live(Resource::VmSocket, op)?;
        let mut cfg = self.observed().await?.config;
        let vm = self.uvm().await?;
        let sockets = vm
            .vm_socket()
            .ok_or_else(|| status(Code::UNIMPLEMENTED, "no VM sockets"))?;
        let conn_id = port.to_string();
        match op {
            ResourceOperation::Remove => sockets
                .vm_socket_close(VMSocketType::VSock, &conn_id)
                .await
                .map_err(|e| vm_status(&e)),
            ResourceOperation::Add | ResourceOperation::Update => {
                cfg.vm_sockets.retain(|s| s.port != Some(port));
                cfg.vm_sockets.push(crate::spec::VmSocket {
                    socket_type: VMSocketType::VSock,
                    service_id: None,
                    port: Some(port),
                    listener_path: listener.clone().into(),
                });
                self.precheck(cfg)?;
                sockets
                    .vm_socket_listen(VMSocketType::VSock, &conn_id, Path::new(&listener))
                    .await
                    .map_err(|e| vm_status(&e))
            }
        }
    }

    async fn inspect(&self, query: &str) -> RpcResult<Value> {
        let json = match query {
            "state" => serde_json::Value::String(self.state().await?.to_string()),
            "config" => serde_json::to_value(self.observed().await?.config)
                .map_err(|e| status(Code::INTERNAL, e))?,
            "stats" => {
                serde_json::to_value(self.vs.stats(&self.name).await.map_err(|e| vm_status(&e))?)
                    .map_err(|e| status(Code::INTERNAL, e))?
            }
            "ready" => serde_json::Value::Bool(
                self.state().await? == State::Running
                    && self
                        .vs
                        .guest_ready(&self.name)
                        .await
                        .map_err(|e| vm_status(&e))?,
            ),
            "capabilities" => serde_json::to_value(self.vs.capabilities())
                .map_err(|e| status(Code::INTERNAL, e))?,
            other => {
                // Any client's bytes: quoted short, never whole.
                let shown: String = other.chars().take(crate::spec::EXCERPT_CHARS).collect();
                return Err(status(
                    Code::INVALID_ARGUMENT,
                    format!("query {shown:?}: one of {}", INSPECT_QUERIES.join(", ")),
                ));
            }
        };
        Ok(to_value(json))
    }
}

/// JSON as a protobuf `Value`.
fn to_value(v: serde_json::Value) -> Value {
    let mut out = Value::new();
    match v {
        serde_json::Value::Null => out.set_null_value(Default::default()),
        serde_json::Value::Bool(b) => out.set_bool_value(b),
        serde_json::Value::Number(n) => out.set_number_value(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => out.set_string_value(s),
        serde_json::Value::Array(a) => {
            let mut list = protobuf::well_known_types::struct_::ListValue::new();
            list.values = a.into_iter().map(to_value).collect();
            out.set_list_value(list);
        }
        serde_json::Value::Object(o) => {
            let mut s = protobuf::well_known_types::struct_::Struct::new();
            s.fields = o.into_iter().map(|(k, v)| (k, to_value(v))).collect();
            out.set_struct_value(s);
        }
    }
    out
}

/// Runs `call` within the client's deadline, if it set one.
async fn within<T>(
    ctx: &TtrpcContext,
    call: impl std::future::Future<Output = RpcResult<T>>,
) -> RpcResult<T> {
    let Ok(nanos) = u64::try_from(ctx.timeout_nano) else {
        return call.await;
    };
    if nanos == 0 {
        return call.await;
    }
    match tokio::time::timeout(Duration::from_nanos(nanos), call).await {
        Ok(r) => r,
        Err(_) => Err(status(
            Code::DEADLINE_EXCEEDED,
            format!(
                "no result within the client's deadline ({:?})",
                Duration::from_nanos(nanos)
            ),
        )),
    }
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

/// The capabilities message of a virtstack: what its `Supported` says, per
/// resource the protocol names, and its guest OSes.
pub fn capabilities(caps: &crate::vm::Capabilities) -> pb::CapabilitiesVMResponse {
    let mut out = pb::CapabilitiesVMResponse::new();
    for (p, r) in RESOURCES {
        let mut s = SupportedResource::new();
        s.resource = (*p).into();
        s.Add = caps.supported(*r, ResourceOperation::Add);
        s.Remove = caps.supported(*r, ResourceOperation::Remove);
        s.Update = caps.supported(*r, ResourceOperation::Update);
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

#[async_trait]
impl svc::Vm for VmService {
    async fn create_vm(&self, ctx: &TtrpcContext, req: pb::CreateVMRequest) -> RpcResult<Empty> {
        within(ctx, async {
            let _one = self.changing.lock().await;
            let cfg = convert::vm_config(self.name.as_str(), &req)?;
            if self.exists().await? {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("VM {} exists already", self.name),
                ));
            }
            self.vs
                .preflight(&self.name, &cfg)
                .map_err(|e| preflight_status(&e))?;
            self.vs
                .create(&self.name, &cfg)
                .await
                .map_err(|e| vm_status(&e))?;
            self.torn_down.send_replace(false);
            Ok(Empty::new())
        })
        .await
    }

    async fn teardown_vm(&self, ctx: &TtrpcContext, _: Empty) -> RpcResult<Empty> {
        within(ctx, async {
            let _one = self.changing.lock().await;
            if self.exists().await? {
                self.vs
                    .destroy(&self.name)
                    .await
                    .map_err(|e| vm_status(&e))?;
            }
            self.torn_down.send_replace(true);
            Ok(Empty::new())
        })
        .await
    }

    async fn pause_vm(&self, ctx: &TtrpcContext, _: Empty) -> RpcResult<Empty> {
        within(ctx, async {
            let _one = self.changing.lock().await;
            match self.state().await? {
                State::Paused => Ok(Empty::new()),
                State::Running => {
                    self.vs.pause(&self.name).await.map_err(|e| vm_status(&e))?;
                    Ok(Empty::new())
                }
                s => Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("VM {} is {s}, not running", self.name),
                )),
            }
        })
        .await
    }

    async fn resume_vm(&self, ctx: &TtrpcContext, _: Empty) -> RpcResult<Empty> {
        within(ctx, async {
            let _one = self.changing.lock().await;
            match self.state().await? {
                State::Running => Ok(Empty::new()),
                State::Paused => {
                    self.vs
                        .resume(&self.name)
                        .await
                        .map_err(|e| vm_status(&e))?;
                    Ok(Empty::new())
                }
                _ => {
                    self.vs
                        .start(&self.name, false)
                        .await
                        .map_err(|e| vm_status(&e))?;
                    Ok(Empty::new())
                }
            }
        })
        .await
    }

    async fn wait_vm(&self, ctx: &TtrpcContext, _: Empty) -> RpcResult<Empty> {
        within(ctx, async {
            let mut torn = self.torn_down.subscribe();
            loop {
                if *torn.borrow_and_update() || !self.exists().await? {
                    return Ok(Empty::new());
                }
                let state = self.vs.observe(&self.name).await.map(|o| o.state);
                if matches!(state, Ok(State::Terminated)) {
                    return Ok(Empty::new());
                }
                tokio::select! {
                    _ = torn.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        })
        .await
    }

    async fn inspect_vm(
        &self,
        ctx: &TtrpcContext,
        req: pb::InspectVMRequest,
    ) -> RpcResult<pb::InspectVMResponse> {
        within(ctx, async {
            let mut out = pb::InspectVMResponse::new();
            out.result = Some(self.inspect(&req.query).await?).into();
            Ok(out)
        })
        .await
    }

    async fn capabilities_vm(
        &self,
        _ctx: &TtrpcContext,
        _: Empty,
    ) -> RpcResult<pb::CapabilitiesVMResponse> {
        Ok(capabilities(self.vs.capabilities()))
    }

    async fn properties_vm(
        &self,
        ctx: &TtrpcContext,
        req: pb::PropertiesVMRequest,
    ) -> RpcResult<pb::PropertiesVMResponse> {
        within(ctx, async {
            use pb::properties_vmrequest::PropertiesType;
            let mut kinds = Vec::new();
            for t in &req.types {
                kinds.push(convert::known(*t, "types")?);
            }
            self.state().await?;
            let stats = self.vs.stats(&self.name).await.map_err(|e| vm_status(&e))?;
            let mut out = pb::PropertiesVMResponse::new();
            if kinds.is_empty() || kinds.contains(&PropertiesType::Memory) {
                let mut m = pb::MemoryStats::new();
                m.working_set_bytes = stats.working_set_bytes;
                m.assigned_memory = stats.assigned_memory_bytes;
                out.memory_stats = Some(m).into();
            }
            if kinds.is_empty() || kinds.contains(&PropertiesType::Processor) {
                let mut p = pb::ProcessorStats::new();
                p.total_runtime_ns = stats.total_runtime_ns;
                out.processor_stats = Some(p).into();
            }
            Ok(out)
        })
        .await
    }

    async fn modify_resource(
        &self,
        ctx: &TtrpcContext,
        req: pb::ModifyResourceRequest,
    ) -> RpcResult<Empty> {
        within(ctx, async {
            let _one = self.changing.lock().await;
            self.modify(&req).await.map(|()| Empty::new())
        })
        .await
    }

    async fn vm_socket(&self, ctx: &TtrpcContext, req: pb::VMSocketRequest) -> RpcResult<Empty> {
        within(ctx, async {
            let _one = self.changing.lock().await;
            self.socket(&req).await.map(|()| Empty::new())
        })
        .await
    }

    async fn quit(&self, _ctx: &TtrpcContext, _: Empty) -> RpcResult<Empty> {
        self.quit.notify_one();
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests;
