//! The remotevm virtstack: VMs driven through vmservice servers (hcsshim's
//! RemoteVM protocol over ttrpc), one server per VM. As hcsshim does, a
//! server is started per VM with `--ttrpc ADDRESS` and used once its
//! standard output closes (by default this uvmctl's `serve`); a [`Spawner`]
//! says how, so tests can serve in-process.
//!
//! What the protocol cannot say shapes what this virtstack can do:
//! `Supported` comes from the server's `CapabilitiesVM`, and a resource the
//! server does not list (or the protocol has no message for: SCSI
//! controllers on their own, Plan9, serial consoles after creation, storage
//! QoS, saving) counts as unsupported. Stopping has no verb but `TeardownVM`:
//! the configuration is kept in a record beside the server's socket, and a
//! start creates the VM again from it.

use crate::protocol::vmservice as pb;
use crate::protocol::vmservice_ttrpc::VmClient;
use crate::vm::config::{Policy, VmConfig};
use crate::vm::{
    Capabilities, GuestOs, NetworkManager, Observe, ObservedVm, PciManager, Plan9Manager, Resource,
    ResourceOperation, ScsiDiskType, ScsiManager, State, Support, Uvm, UvmBuilder, VMSocketManager,
    VMSocketType, VPMemImageFormat, Virtstack, VmError, VmName, VmStats, VpmemManager, VsmbManager,
};
use async_trait::async_trait;
use protobuf::well_known_types::empty::Empty;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

type Result<T, E = VmError> = std::result::Result<T, E>;

/// The virtstack's name.
pub const REMOTEVM: &str = "remotevm";
/// How long one call may take (a create boots nothing; a start launches QEMU).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// A record is read up to this size (a few KiB in practice).
const MAX_RECORD_BYTES: u64 = 4 << 20;

/// Starts (or finds) the vmservice server of one VM.
#[async_trait]
pub trait Spawner: Send + Sync + std::fmt::Debug {
    /// Makes a server for `name` accept connections on the unix socket
    /// `socket`; returns once it does.
    async fn spawn(&self, name: &VmName, socket: &Path) -> Result<(), String>;
}

/// hcsshim's way: `PROGRAM ARGS... --ttrpc SOCKET --name NAME`, in its own
/// process group, ready when its standard output closes.
#[derive(Debug, Clone)]
pub struct ProcessSpawner {
    /// The server program.
    pub program: PathBuf,
    /// Its arguments before `--ttrpc`.
    pub args: Vec<String>,
}

#[async_trait]
impl Spawner for ProcessSpawner {
    async fn spawn(&self, name: &VmName, socket: &Path) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        // Its own log, never our stderr: a server outlives the uvmctl that
        // started it, and must not hold its caller's pipes open.
        let log = crate::hostfs::open_state_file(&socket.with_extension("log"), 0o600, true)
            .map_err(|e| format!("cannot create the server's log: {e}"))?;
        let mut child = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .arg("--ttrpc")
            .arg(socket)
            .arg("--name")
            .arg(name.as_str())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.program.display()))?;
        let mut out = child.stdout.take().ok_or("no stdout pipe")?;
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            // Bounded: a server has nothing to say on stdout.
            let mut buf = [0u8; 4096];
            loop {
                match out.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) if sink.len() < 1 << 16 => sink.extend_from_slice(&buf[..n]),
                    Ok(_) => {}
                }
            }
        })
        .await;
        if closed.is_err() {
            let _ = child.start_kill();
            return Err("the server did not close its standard output within 30 s".into());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the server exited ({status}) before it served"));
        }
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    }
}

/// What is kept per VM beside its server's socket.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    config: VmConfig,
    /// The server has the VM (CreateVM done, TeardownVM not).
    created: bool,
}

/// The remotevm virtstack.
#[derive(Clone)]
pub struct RemoteVm {
    dir: PathBuf,
    spawner: Arc<dyn Spawner>,
    caps: Capabilities,
    clients: Arc<tokio::sync::Mutex<HashMap<String, VmClient>>>,
    /// Only looks: creates nothing and starts no server (a VM whose server
    /// does not answer cannot be observed).
    observer: bool,
}

impl std::fmt::Debug for RemoteVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteVm")
            .field("dir", &self.dir)
            .field("spawner", &self.spawner)
            .finish_non_exhaustive()
    }
}

fn backend(what: impl Into<String>) -> VmError {
    VmError::Backend(what.into().into())
}

fn rpc(vm: &str, call: &str, e: &ttrpc::Error) -> VmError {
    if let ttrpc::Error::RpcStatus(s) = e
        && s.code() == ttrpc::Code::UNIMPLEMENTED
    {
        return backend(format!(
            "vm {vm}: {call}: not supported by the server: {}",
            s.message
        ));
    }
    backend(format!("vm {vm}: {call}: {e:?}"))
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_duration(CALL_TIMEOUT)
}

/// The capabilities a server's `CapabilitiesVM` answer describes.
pub fn capabilities_from(resp: &pb::CapabilitiesVMResponse) -> Capabilities {
    use pb::capabilities_vmresponse::{Resource as R, SupportedGuestOS};
    let mut c = Capabilities::new(REMOTEVM);
    for r in Resource::ALL {
        c.set_all(
            r,
            Support::unsupported("the vmservice protocol has no message for it"),
            Support::unsupported("the vmservice protocol has no message for it"),
            Support::unsupported("the vmservice protocol has no message for it"),
        );
    }
    let ours = |r: R| match r {
        R::Vpmem => Resource::VPMem,
        R::Scsi => Resource::Scsi,
        R::Vpci => Resource::Pci,
        R::Plan9 => Resource::Plan9,
        R::VMNic => Resource::Network,
        R::Memory => Resource::Memory,
        R::Processor => Resource::Processor,
    };
    for s in &resp.supported_resources {
        let Ok(r) = s.resource.enum_value() else {
            continue;
        };
        let r = ours(r);
        if r == Resource::Plan9 {
            // Listed, but ModifyResource has no Plan9 message.
            continue;
        }
        let support = |yes: bool| {
            if yes {
                Support::live()
            } else {
                Support::unsupported("the vmservice server does not do it on a running VM")
            }
        };
        c.set(r, ResourceOperation::Add, support(s.Add));
        c.set(r, ResourceOperation::Remove, support(s.Remove));
        c.set(r, ResourceOperation::Update, support(s.Update));
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

/// Asks a server started by `spawner` (on a socket in `dir`) for its
/// capabilities, then lets it go.
async fn probe(spawner: &dyn Spawner, dir: &Path) -> Result<Capabilities> {
    let probe = VmName::new("uvmctl-capabilities")?;
    let socket = dir.join(".capabilities.sock");
    let _ = std::fs::remove_file(&socket);
    spawner.spawn(&probe, &socket).await.map_err(backend)?;
    let client = connect(&socket).await?;
    let caps = client
        .capabilities_vm(ctx(), &Empty::new())
        .await
        .map_err(|e| rpc("-", "CapabilitiesVM", &e))?;
    let _ = client.quit(ctx(), &Empty::new()).await;
    let _ = std::fs::remove_file(&socket);
    Ok(capabilities_from(&caps))
}

impl RemoteVm {
    /// The virtstack keeping its records and server sockets in `dir`, its
    /// servers started by `spawner`; asks a server for the capabilities.
    pub async fn new(dir: impl Into<PathBuf>, spawner: Arc<dyn Spawner>) -> Result<Self> {
        Self::with(dir, spawner, None, false).await
    }

    /// As [`RemoteVm::new`], with the servers' capabilities when they are
    /// known without asking one (uvmctl's own `serve` over this host's QEMU),
    /// and as an `observer`, which creates nothing and starts no server
    /// (it asks a server for the capabilities only when they are not given,
    /// on a socket in a private directory of its own, removed after).
    pub async fn with(
        dir: impl Into<PathBuf>,
        spawner: Arc<dyn Spawner>,
        caps: Option<Capabilities>,
        observer: bool,
    ) -> Result<Self> {
        let dir = dir.into();
        if !observer {
            // Owner-only whatever the umask, and only a directory root alone
            // can change: its records say which servers to trust.
            // Its parent is, by default, the QEMU state root, which QEMU's
            // service user must pass through (0711, whatever the umask).
            if let Some(parent) = dir.parent() {
                crate::hostfs::create_dirs(parent, 0o711)
                    .map_err(|e| backend(format!("cannot create {}: {e}", parent.display())))?;
            }
            crate::hostfs::private_dir(&dir, 0o700)
                .map_err(|e| backend(format!("cannot create {}: {e}", dir.display())))?;
        }
        if std::fs::symlink_metadata(&dir).is_ok() {
            crate::hostfs::check_trusted_dir(&dir).map_err(|e| backend(e.to_string()))?;
        }
        let caps = match caps {
            Some(caps) => caps,
            None if observer => {
                let probe_dir = std::env::temp_dir()
                    .join(format!("uvmctl-capabilities-{}", std::process::id()));
                crate::hostfs::private_dir(&probe_dir, 0o700)
                    .map_err(|e| backend(format!("cannot create {}: {e}", probe_dir.display())))?;
                let caps = probe(spawner.as_ref(), &probe_dir).await;
                let _ = std::fs::remove_dir_all(&probe_dir);
                caps?
            }
            None => probe(spawner.as_ref(), &dir).await?,
        };
        Ok(RemoteVm {
            dir,
            spawner,
            caps,
            clients: Arc::default(),
            observer,
        })
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn record(&self, name: &str) -> Result<Record> {
        let path = self.record_path(name);
        let text = crate::hostfs::read_state_file(&path, MAX_RECORD_BYTES)
            .map_err(|_| VmError::NotFound(name.to_string()))?;
        serde_json::from_slice(&text)
            .map_err(|e| backend(format!("vm {name}: corrupt record {}: {e}", path.display())))
    }

    fn store(&self, name: &str, rec: &Record) -> Result<()> {
        let path = self.record_path(name);
        let text = serde_json::to_vec_pretty(rec).map_err(|e| backend(e.to_string()))?;
        crate::hostfs::replace_file(&path, &text, 0o600)
            .map_err(|e| backend(format!("cannot write {}: {e}", path.display())))
    }

    /// The VM's server client, starting the server when none answers.
    async fn client(&self, name: &VmName) -> Result<VmClient> {
        if let Some(c) = self.clients.lock().await.get(name.as_str()) {
            return Ok(c.clone());
        }
        let socket = self.socket(name.as_str());
        let c = match connect(&socket).await {
            Ok(c) => c,
            Err(e) if self.observer => {
                return Err(backend(format!(
                    "vm {name}: its server does not answer ({e}); only a changing command starts one"
                )));
            }
            Err(_) => {
                let _ = std::fs::remove_file(&socket);
                self.spawner.spawn(name, &socket).await.map_err(backend)?;
                connect(&socket).await?
            }
        };
        self.clients
            .lock()
            .await
            .insert(name.to_string(), c.clone());
        Ok(c)
    }

    async fn inspect(&self, name: &VmName, query: &str) -> Result<serde_json::Value> {
        let c = self.client(name).await?;
        let mut req = pb::InspectVMRequest::new();
        req.query = query.into();
        let resp = c
            .inspect_vm(ctx(), &req)
            .await
            .map_err(|e| rpc(name.as_str(), "InspectVM", &e))?;
        Ok(from_value(resp.result.as_ref().unwrap_or_default()))
    }

    /// Creates the VM on its server from its record.
    async fn create_remote(&self, name: &VmName, rec: &mut Record) -> Result<()> {
        let c = self.client(name).await?;
        let mut req = pb::CreateVMRequest::new();
        req.config = Some(to_pb(&rec.config)).into();
        req.log_id = name.to_string();
        c.create_vm(ctx(), &req)
            .await
            .map_err(|e| rpc(name.as_str(), "CreateVM", &e))?;
        rec.created = true;
        self.store(name.as_str(), rec)
    }

    async fn call(&self, name: &VmName, call: &str) -> Result<()> {
        let c = self.client(name).await?;
        let e = Empty::new();
        let r = match call {
            "ResumeVM" => c.resume_vm(ctx(), &e).await,
            "PauseVM" => c.pause_vm(ctx(), &e).await,
            "TeardownVM" => c.teardown_vm(ctx(), &e).await,
            _ => c.quit(ctx(), &e).await,
        };
        r.map(drop).map_err(|e| rpc(name.as_str(), call, &e))
    }
}

async fn connect(socket: &Path) -> Result<VmClient> {
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .map_err(|e| backend(format!("cannot connect to {}: {e:?}", socket.display())))?;
    Ok(VmClient::new(c))
}

/// A protobuf `Value` as JSON.
fn from_value(v: &protobuf::well_known_types::struct_::Value) -> serde_json::Value {
    use protobuf::well_known_types::struct_::value::Kind;
    match &v.kind {
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && *n >= 0.0 && *n < 9.0e15 {
                serde_json::Value::from(*n as u64)
            } else {
                serde_json::Number::from_f64(*n).map_or(serde_json::Value::Null, Into::into)
            }
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(l)) => l.values.iter().map(from_value).collect(),
        Some(Kind::StructValue(s)) => s
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), from_value(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        _ => serde_json::Value::Null,
    }
}

fn disk_type(t: ScsiDiskType) -> pb::DiskType {
    match t {
        ScsiDiskType::Vhd1 => pb::DiskType::SCSI_DISK_TYPE_VHD1,
        ScsiDiskType::Vhdx => pb::DiskType::SCSI_DISK_TYPE_VHDX,
        ScsiDiskType::PassThrough => pb::DiskType::SCSI_DISK_TYPE_PHYSICAL,
    }
}

fn pmem_type(f: VPMemImageFormat) -> pb::DiskType {
    match f {
        VPMemImageFormat::Vhd1 => pb::DiskType::SCSI_DISK_TYPE_VHD1,
        VPMemImageFormat::Vhdx => pb::DiskType::SCSI_DISK_TYPE_VHDX,
    }
}

/// The protocol's `VMConfig` for a VM configuration.
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
    m.allow_overcommit = cfg.memory.backing == crate::vm::MemoryBackingType::Virtual;
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
            let mut s = pb::SCSIDisk::new();
            s.controller = ctl.id;
            s.lun = disk.lun;
            s.host_path = disk.path.display().to_string();
            s.type_ = disk_type(disk.disk_type).into();
            s.read_only = disk.read_only;
            d.scsi_disks.push(s);
        }
    }
    if let Some(v) = &cfg.vpmem {
        for dev in &v.devices {
            let mut x = pb::VPMEMDisk::new();
            x.host_path = dev.path.display().to_string();
            x.type_ = pmem_type(dev.format).into();
            x.read_only = dev.read_only;
            d.vpmem_disks.push(x);
        }
    }
    for n in &cfg.network_adapters {
        let mut x = pb::NICConfig::new();
        x.nic_id = n.nic_id.clone();
        x.port_id = n.endpoint_id.clone();
        x.mac_address = n.mac_address.clone();
        d.nic_config.push(x);
    }
    for p in &cfg.pci_devices {
        let mut x = pb::WindowsPCIDevice::new();
        x.instance_id = p.instance_id.clone();
        d.windows_device.push(x);
    }
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

#[async_trait]
impl Observe for RemoteVm {
    fn name(&self) -> &str {
        REMOTEVM
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn list(&self) -> Result<Vec<VmName>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            // Nothing made here yet: no VMs (a looking command creates none).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.observer => {
                return Ok(Vec::new());
            }
            Err(e) => return Err(backend(format!("cannot list {}: {e}", self.dir.display()))),
        };
        let mut out: Vec<VmName> = entries
            .flatten()
            .filter_map(|e| {
                let f = e.file_name();
                let stem = f.to_str()?.strip_suffix(".json")?.to_string();
                VmName::new(&stem).ok()
            })
            .collect();
        out.sort();
        Ok(out)
    }

    async fn observe(&self, name: &VmName) -> Result<ObservedVm> {
        let rec = self.record(name.as_str())?;
        if !rec.created {
            return Ok(ObservedVm {
                config: rec.config,
                state: State::Created,
                managed: true,
                exit_error: None,
                memory_hotplug: None,
            });
        }
        let state = match self.inspect(name, "state").await?.as_str() {
            Some("running") => State::Running,
            Some("paused") => State::Paused,
            Some("created") => State::Created,
            Some("saved") => State::Saved,
            _ => State::Terminated,
        };
        let mut config: VmConfig = serde_json::from_value(self.inspect(name, "config").await?)
            .map_err(|e| {
                backend(format!(
                    "vm {name}: the server's config does not parse: {e}"
                ))
            })?;
        // What the server cannot know: the spec's power state and policy.
        config.policy = rec.config.policy;
        config.power_state = match state {
            State::Running => crate::vm::config::PowerState::Running,
            State::Paused => crate::vm::config::PowerState::Paused,
            State::Saved => crate::vm::config::PowerState::Saved,
            _ => crate::vm::config::PowerState::Stopped,
        };
        Ok(ObservedVm {
            config,
            state,
            managed: true,
            exit_error: None,
            memory_hotplug: None,
        })
    }
}

#[async_trait]
impl Virtstack for RemoteVm {
    fn builder(&self, name: &VmName, _guest_os: GuestOs) -> Result<Box<dyn UvmBuilder>> {
        Err(backend(format!(
            "vm {name}: the remotevm virtstack creates VMs from whole configurations"
        )))
    }

    fn preflight(&self, _name: &VmName, config: &VmConfig) -> Result<()> {
        // Host paths are the server's to check, at CreateVM.
        match self.caps.refusals(config).into_iter().next() {
            Some(r) => Err(VmError::Refused(r)),
            None => Ok(()),
        }
    }

    async fn create(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.preflight(name, config)?;
        if self.record_path(name.as_str()).exists() {
            return Err(backend(format!("vm {name}: exists already")));
        }
        let mut rec = Record {
            config: config.clone(),
            created: false,
        };
        self.store(name.as_str(), &rec)?;
        if let Err(e) = self.create_remote(name, &mut rec).await {
            let _ = std::fs::remove_file(self.record_path(name.as_str()));
            return Err(e);
        }
        Ok(())
    }

    async fn open(&self, name: &VmName) -> Result<Box<dyn Uvm>> {
        self.record(name.as_str())?;
        Ok(Box::new(RemoteUvm {
            vs: self.clone(),
            name: name.clone(),
        }))
    }

    async fn reconfigure(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        let mut rec = self.record(name.as_str())?;
        if rec.created {
            let state = self.observe(name).await?.state;
            if state.is_live() {
                return Err(backend(format!("vm {name}: reconfigured while it runs")));
            }
            // A created-but-stopped VM on the server takes its new
            // configuration by being created again at the next start.
            self.call(name, "TeardownVM").await?;
            rec.created = false;
        }
        rec.config = config.clone();
        self.store(name.as_str(), &rec)
    }

    async fn set_policy(&self, name: &VmName, policy: &Policy) -> Result<()> {
        let mut rec = self.record(name.as_str())?;
        rec.config.policy = *policy;
        self.store(name.as_str(), &rec)
    }

    async fn start(&self, name: &VmName, paused: bool) -> Result<()> {
        let mut rec = self.record(name.as_str())?;
        if !rec.created {
            self.create_remote(name, &mut rec).await?;
        }
        self.call(name, "ResumeVM").await?;
        if paused {
            self.call(name, "PauseVM").await?;
        }
        Ok(())
    }

    async fn stop(&self, name: &VmName) -> Result<()> {
        let mut rec = self.record(name.as_str())?;
        if rec.created {
            self.call(name, "TeardownVM").await?;
            rec.created = false;
            self.store(name.as_str(), &rec)?;
        }
        Ok(())
    }

    async fn pause(&self, name: &VmName) -> Result<()> {
        self.call(name, "PauseVM").await
    }

    async fn resume(&self, name: &VmName) -> Result<()> {
        self.call(name, "ResumeVM").await
    }

    async fn save(&self, _name: &VmName) -> Result<()> {
        Err(VmError::NotSupported {
            resource: Resource::Memory,
            operation: ResourceOperation::Update,
        })
    }

    async fn destroy(&self, name: &VmName) -> Result<()> {
        let rec = self.record(name.as_str())?;
        if rec.created {
            self.call(name, "TeardownVM").await?;
        }
        let _ = self.call(name, "Quit").await;
        self.clients.lock().await.remove(name.as_str());
        let _ = std::fs::remove_file(self.socket(name.as_str()));
        std::fs::remove_file(self.record_path(name.as_str()))
            .map_err(|e| backend(format!("vm {name}: cannot remove its record: {e}")))
    }

    async fn guest_ready(&self, name: &VmName) -> Result<bool> {
        Ok(self
            .inspect(name, "ready")
            .await?
            .as_bool()
            .unwrap_or(false))
    }

    async fn stats(&self, name: &VmName) -> Result<VmStats> {
        let c = self.client(name).await?;
        let p = c
            .properties_vm(ctx(), &pb::PropertiesVMRequest::new())
            .await
            .map_err(|e| rpc(name.as_str(), "PropertiesVM", &e))?;
        Ok(VmStats {
            assigned_memory_bytes: p.memory_stats.assigned_memory,
            working_set_bytes: p.memory_stats.working_set_bytes,
            total_runtime_ns: p.processor_stats.total_runtime_ns,
            uptime_seconds: None,
        })
    }

    async fn wait(&self, name: &VmName, timeout: Option<Duration>) -> Result<bool> {
        let c = self.client(name).await?;
        let cx = ttrpc::context::with_duration(timeout.unwrap_or(Duration::ZERO));
        match c.wait_vm(cx, &Empty::new()).await {
            Ok(_) => Ok(true),
            Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::DEADLINE_EXCEEDED => {
                Ok(false)
            }
            Err(ttrpc::Error::Others(m)) if m.contains("deadline") => Ok(false),
            Err(e) => Err(rpc(name.as_str(), "WaitVM", &e)),
        }
    }

    async fn exit_error(&self, _name: &VmName) -> Option<String> {
        None
    }

    async fn release(&self, name: &VmName) {
        self.clients.lock().await.remove(name.as_str());
    }
}

/// A VM of the remotevm virtstack, for live changes.
#[derive(Debug)]
struct RemoteUvm {
    vs: RemoteVm,
    name: VmName,
}

impl RemoteUvm {
    async fn modify(
        &self,
        ty: pb::ModifyType,
        set: impl FnOnce(&mut pb::ModifyResourceRequest),
    ) -> Result<()> {
        let mut req = pb::ModifyResourceRequest::new();
        req.type_ = ty.into();
        set(&mut req);
        let c = self.vs.client(&self.name).await?;
        c.modify_resource(ctx(), &req)
            .await
            .map(drop)
            .map_err(|e| rpc(self.name.as_str(), "ModifyResource", &e))
    }

    /// Keeps the record's configuration what the server has, for the next
    /// create (after a stop).
    async fn remember(&self) -> Result<()> {
        let mut rec = self.vs.record(self.name.as_str())?;
        let seen = self.vs.observe(&self.name).await?;
        let (policy, power) = (rec.config.policy, rec.config.power_state);
        rec.config = seen.config;
        rec.config.policy = policy;
        rec.config.power_state = power;
        self.vs.store(self.name.as_str(), &rec)
    }
}

#[async_trait]
impl Uvm for RemoteUvm {
    fn id(&self) -> &str {
        self.name.as_str()
    }
    async fn state(&self) -> Result<State> {
        Ok(self.vs.observe(&self.name).await?.state)
    }
    async fn start(&self) -> Result<()> {
        self.vs.start(&self.name, false).await
    }
    async fn stop(&self) -> Result<()> {
        self.vs.stop(&self.name).await
    }
    async fn pause(&self) -> Result<()> {
        self.vs.pause(&self.name).await
    }
    async fn resume(&self) -> Result<()> {
        self.vs.resume(&self.name).await
    }
    async fn save(&self) -> Result<()> {
        self.vs.save(&self.name).await
    }
    async fn wait(&self) -> Result<()> {
        self.vs.wait(&self.name, None).await.map(drop)
    }
    async fn stats(&self) -> Result<VmStats> {
        self.vs.stats(&self.name).await
    }
    fn supported(&self, resource: Resource, operation: ResourceOperation) -> bool {
        self.vs.caps.supported(resource, operation)
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
        None
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
        let have = self.vs.observe(&self.name).await?.config.processors.count;
        let (ty, n) = if count > have {
            (pb::ModifyType::ADD, count - have)
        } else {
            (pb::ModifyType::REMOVE, have - count)
        };
        for _ in 0..n {
            self.modify(ty, |r| r.set_processor(pb::ModifyProcessorRequest::new()))
                .await?;
        }
        self.remember().await
    }
    async fn set_memory_size(&self, memory_mb: u64) -> Result<()> {
        self.modify(pb::ModifyType::UPDATE, |r| {
            let mut m = pb::ModifyMemoryRequest::new();
            m.memory_mb = memory_mb;
            r.set_memory(m);
        })
        .await?;
        self.remember().await
    }
    async fn set_storage_qos(&self, _iops: u64, _bandwidth: u64) -> Result<()> {
        Err(VmError::NotSupported {
            resource: Resource::StorageQos,
            operation: ResourceOperation::Update,
        })
    }
}

#[async_trait]
impl ScsiManager for RemoteUvm {
    async fn add_scsi_controller(&self, _id: u32) -> Result<()> {
        Err(VmError::NotSupported {
            resource: Resource::ScsiController,
            operation: ResourceOperation::Add,
        })
    }
    async fn remove_scsi_controller(&self, _id: u32) -> Result<()> {
        Err(VmError::NotSupported {
            resource: Resource::ScsiController,
            operation: ResourceOperation::Remove,
        })
    }
    async fn add_scsi_disk(
        &self,
        controller: u32,
        lun: u32,
        path: &Path,
        typ: ScsiDiskType,
        read_only: bool,
    ) -> Result<()> {
        self.modify(pb::ModifyType::ADD, |r| {
            let mut d = pb::SCSIDisk::new();
            d.controller = controller;
            d.lun = lun;
            d.host_path = path.display().to_string();
            d.type_ = disk_type(typ).into();
            d.read_only = read_only;
            r.set_scsi_disk(d);
        })
        .await?;
        self.remember().await
    }
    async fn remove_scsi_disk(&self, controller: u32, lun: u32, path: &Path) -> Result<()> {
        self.modify(pb::ModifyType::REMOVE, |r| {
            let mut d = pb::SCSIDisk::new();
            d.controller = controller;
            d.lun = lun;
            d.host_path = path.display().to_string();
            r.set_scsi_disk(d);
        })
        .await?;
        self.remember().await
    }
}

#[async_trait]
impl VpmemManager for RemoteUvm {
    async fn add_vpmem_device(
        &self,
        _id: u32,
        path: &Path,
        read_only: bool,
        format: VPMemImageFormat,
    ) -> Result<()> {
        self.modify(pb::ModifyType::ADD, |r| {
            let mut d = pb::VPMEMDisk::new();
            d.host_path = path.display().to_string();
            d.type_ = pmem_type(format).into();
            d.read_only = read_only;
            r.set_vpmem_disk(d);
        })
        .await?;
        self.remember().await
    }
    async fn remove_vpmem_device(&self, _id: u32, path: &Path) -> Result<()> {
        self.modify(pb::ModifyType::REMOVE, |r| {
            let mut d = pb::VPMEMDisk::new();
            d.host_path = path.display().to_string();
            r.set_vpmem_disk(d);
        })
        .await?;
        self.remember().await
    }
}

impl RemoteUvm {
    /// Adds or removes a NIC.
    async fn nic(
        &self,
        ty: pb::ModifyType,
        nic_id: &str,
        endpoint_id: &str,
        mac: &str,
    ) -> Result<()> {
        self.modify(ty, |r| {
            let mut n = pb::NICConfig::new();
            n.nic_id = nic_id.into();
            n.port_id = endpoint_id.into();
            n.mac_address = mac.into();
            r.set_nic_config(n);
        })
        .await?;
        self.remember().await
    }

    /// Adds (with its listener) or removes a vsock listener.
    async fn vsock(
        &self,
        ty: pb::ModifyType,
        socket_type: VMSocketType,
        conn_id: &str,
        listener_path: Option<&Path>,
    ) -> Result<()> {
        if socket_type != VMSocketType::VSock {
            return Err(VmError::NotSupported {
                resource: Resource::HvSocket,
                operation: if listener_path.is_some() {
                    ResourceOperation::Add
                } else {
                    ResourceOperation::Remove
                },
            });
        }
        let port = conn_id
            .parse::<u32>()
            .map_err(|_| backend(format!("{conn_id:?} is not a vsock port")))?;
        let mut req = pb::VMSocketRequest::new();
        req.type_ = ty.into();
        let mut v = pb::VSockListen::new();
        v.port = port;
        v.listener_path = listener_path
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        req.set_vsock_listen(v);
        let c = self.vs.client(&self.name).await?;
        c.vm_socket(ctx(), &req)
            .await
            .map_err(|e| rpc(self.name.as_str(), "VMSocket", &e))?;
        self.remember().await
    }
}

#[async_trait]
impl NetworkManager for RemoteUvm {
    async fn add_nic(&self, nic_id: &str, endpoint_id: &str, mac: &str) -> Result<()> {
        self.nic(pb::ModifyType::ADD, nic_id, endpoint_id, mac)
            .await
    }
    async fn remove_nic(&self, nic_id: &str, endpoint_id: &str, mac: &str) -> Result<()> {
        self.nic(pb::ModifyType::REMOVE, nic_id, endpoint_id, mac)
            .await
    }
}

#[async_trait]
impl VMSocketManager for RemoteUvm {
    async fn vm_socket_listen(
        &self,
        socket_type: VMSocketType,
        conn_id: &str,
        listener_path: &Path,
    ) -> Result<()> {
        self.vsock(
            pb::ModifyType::ADD,
            socket_type,
            conn_id,
            Some(listener_path),
        )
        .await
    }
    async fn vm_socket_close(&self, socket_type: VMSocketType, conn_id: &str) -> Result<()> {
        self.vsock(pb::ModifyType::REMOVE, socket_type, conn_id, None)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{ApplyOptions, apply};
    use crate::plan::{PlanOptions, plan};
    use crate::reconcile::observe_all;
    use crate::spec::{DesiredState, DesiredVm, NetworkAdapter, ScsiController, ScsiDisk};
    use crate::virtstack::fake::Fake;
    use crate::vm::HostFacts;
    use proptest::prelude::*;

    /// Serves each VM in-process over one fake virtstack, as `serve` would.
    struct InProcess {
        fake: Fake,
        servers: std::sync::Mutex<Vec<ttrpc::r#async::Server>>,
    }

    impl std::fmt::Debug for InProcess {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("InProcess")
        }
    }

    #[async_trait]
    impl Spawner for InProcess {
        async fn spawn(&self, name: &VmName, socket: &Path) -> Result<(), String> {
            let service =
                crate::vmservice::VmService::new(Arc::new(self.fake.clone()), name.clone());
            let mut server = ttrpc::r#async::Server::new()
                .bind(&format!("unix://{}", socket.display()))
                .map_err(|e| format!("{e:?}"))?
                .register_service(service.into_services());
            server.start().await.map_err(|e| format!("{e:?}"))?;
            self.servers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(server);
            Ok(())
        }
    }

    fn fake_caps() -> Capabilities {
        Capabilities::qemu(&HostFacts {
            vhost_user_vsock: true,
            ..HostFacts::default()
        })
    }

    async fn remote() -> (tempfile::TempDir, RemoteVm, Fake) {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Fake::new(fake_caps());
        let spawner = Arc::new(InProcess {
            fake: fake.clone(),
            servers: Default::default(),
        });
        let vs = RemoteVm::new(dir.path().join("remote"), spawner)
            .await
            .expect("capabilities");
        (dir, vs, fake)
    }

    #[tokio::test]
    async fn capabilities_are_the_servers_and_what_the_protocol_lacks_is_unsupported() {
        let (_dir, vs, _fake) = remote().await;
        let c = vs.capabilities();
        let served = fake_caps();
        for r in [
            Resource::Scsi,
            Resource::VPMem,
            Resource::Network,
            Resource::Memory,
            Resource::Processor,
        ] {
            for op in ResourceOperation::ALL {
                assert_eq!(c.supported(r, op), served.supported(r, op), "{r} {op}");
            }
        }
        for r in [
            Resource::Plan9,
            Resource::StorageQos,
            Resource::ScsiController,
            Resource::Serial,
        ] {
            assert!(!c.supported(r, ResourceOperation::Add), "{r}");
        }
        assert!(c.guest_os.contains(&GuestOs::Linux));
    }

    fn spec(cpus: u32, mem: u64, luns: &[u32], nics: u8, power: u8) -> VmConfig {
        let mut c = crate::plan::tests::base("vm");
        c.processors.count = cpus;
        c.memory.size_mb = mem;
        c.scsi_controllers = vec![ScsiController {
            id: 0,
            disks: luns
                .iter()
                .map(|l| ScsiDisk {
                    lun: *l,
                    path: format!("/d/{l}.img").into(),
                    disk_type: ScsiDiskType::PassThrough,
                    read_only: false,
                })
                .collect(),
        }];
        c.network_adapters = (0..nics)
            .map(|i| NetworkAdapter {
                nic_id: format!("6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c0{i}"),
                endpoint_id: "user".into(),
                mac_address: format!("52-54-00-12-34-5{i}"),
            })
            .collect();
        c.power_state = [
            crate::spec::PowerState::Running,
            crate::spec::PowerState::Paused,
            crate::spec::PowerState::Stopped,
        ][usize::from(power % 3)];
        c.storage_qos = None;
        c.serial_consoles.clear();
        c
    }

    fn arb_spec() -> impl Strategy<Value = VmConfig> {
        (
            1u32..4,
            prop::sample::select(vec![256u64, 512]),
            prop::collection::btree_set(0u32..4, 1..4),
            0u8..3,
            0u8..3,
        )
            .prop_map(|(cpus, mem, luns, nics, power)| {
                spec(
                    cpus,
                    mem,
                    &luns.into_iter().collect::<Vec<_>>(),
                    nics,
                    power,
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

        /// The executor's convergence through remotevm → vmservice → the
        /// fake: every spec of a sequence is reached, and planning again
        /// finds nothing, so no mapping of the protocol loses anything.
        #[test]
        fn the_executor_converges_through_remotevm_and_serve(specs in prop::collection::vec(arb_spec(), 1..4)) {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let failures = rt.block_on(async {
                let (_dir, vs, _fake) = remote().await;
                let vs: Arc<dyn Virtstack> = Arc::new(vs);
                let mut failures = Vec::new();
                for want in &specs {
                    let mut d = DesiredState::default();
                    d.vms.insert("vm".into(), DesiredVm {
                        name: "vm".into(),
                        file: "vm.yaml".into(),
                        doc: 0,
                        config: want.clone().into(),
                        status: None,
                    });
                    let opts = PlanOptions::default();
                    let observed = observe_all(vs.as_ref()).await.expect("list");
                    let first = plan(&d, &observed, vs.capabilities(), &opts);
                    let run = ApplyOptions { allow_recreate: true, wait_ready: None };
                    let progress: crate::apply::Progress = Arc::new(|_: &str, _: &str| {});
                    for o in apply(&first, &d, Arc::clone(&vs), run, progress).await {
                        if let Err(e) = o.result {
                            failures.push(format!("{}: {}\nplan: {:#?}", o.name, crate::vm::Chain(&e), first.vms));
                        }
                    }
                    let observed = observe_all(vs.as_ref()).await.expect("list");
                    let again = plan(&d, &observed, vs.capabilities(), &opts);
                    if again.has_changes() {
                        failures.push(format!("not converged: {:#?}\nfirst: {:#?}", again.vms, first.vms));
                    }
                }
                failures
            });
            prop_assert!(failures.is_empty(), "{}", failures.join("\n"));
        }
    }
}
