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

use crate::protocol::convert;
use crate::protocol::vmservice as pb;
use crate::protocol::vmservice_ttrpc::VmClient;
use crate::virtstack::records::{Layout, RecordError, RecordStore};
use crate::vm::config::VmConfig;
use crate::vm::history::History;
use crate::vm::items::ResourceKind;
use crate::vm::{
    Capabilities, Change, Observe, ObservedVm, State, Virtstack, VmError, VmName, VmStats,
};
use async_trait::async_trait;
use protobuf::well_known_types::empty::Empty;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

type Result<T, E = VmError> = std::result::Result<T, E>;

/// The virtstack's name.
pub const REMOTEVM: &str = crate::vm::REMOTE_VM;
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
        let mut child = crate::child::command(&self.program, Vec::new());
        child
            .args(&self.args)
            .arg("--ttrpc")
            .arg(socket)
            .arg("--name")
            .arg(name.as_str())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log);
        // Its own process group: a Ctrl-C meant for uvmctl is not its.
        #[cfg(unix)]
        child.process_group(0);
        let mut child = child
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
    /// The configurations applied to it ([`Virtstack::history`]): kept
    /// here, by the client, as the protocol has no word for them.
    #[serde(default, skip_serializing_if = "History::is_empty")]
    history: History,
}

/// The remotevm virtstack.
#[derive(Clone)]
pub struct RemoteVm {
    dir: PathBuf,
    /// Each VM's record (`virtstack::records`): its configuration and
    /// whether its server has it.
    records: RecordStore<Record>,
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

/// A failed call as the contract's error: the server's status code says
/// the kind (`serve` maps kinds to codes; this maps them back).
fn rpc(vm: &str, call: &str, e: &ttrpc::Error) -> VmError {
    rpc_for(vm, call, e, None)
}

/// As [`rpc`], for a change of `resource`/`operation`.
fn rpc_for(vm: &str, call: &str, e: &ttrpc::Error, change: Option<&Change>) -> VmError {
    use ttrpc::Code;
    let ttrpc::Error::RpcStatus(s) = e else {
        return backend(format!("vm {vm}: {call}: {e:?}"));
    };
    let message = format!("{call}: {}", s.message);
    match (
        s.code(),
        change.and_then(|c| Some((c.resource()?, c.operation()))),
    ) {
        (Code::NOT_FOUND, _) => VmError::NoSuchItem {
            vm: vm.to_string(),
            item: message,
        },
        (Code::FAILED_PRECONDITION, _) => VmError::Refused {
            vm: vm.to_string(),
            reason: message,
        },
        (Code::UNIMPLEMENTED, Some((resource, operation))) => VmError::NotSupported {
            resource,
            operation,
            reason: message,
        },
        (Code::UNIMPLEMENTED, None) => backend(format!(
            "vm {vm}: {call}: not supported by the server: {}",
            s.message
        )),
        _ => backend(format!("vm {vm}: {message} ({:?})", s.code())),
    }
}

/// The lifecycle calls without arguments.
#[derive(Debug, Clone, Copy)]
enum Call {
    Resume,
    Pause,
    Teardown,
    Quit,
}

/// The record's `config` with `change` made.
fn recorded(vm: &VmName, change: &Change, config: &VmConfig) -> Result<VmConfig> {
    change
        .recorded(config)
        .map_err(|e| backend(format!("vm {vm}: {e}")))
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_duration(CALL_TIMEOUT)
}

/// The capabilities a server's `CapabilitiesVM` answer describes.
pub fn capabilities_from(resp: &pb::CapabilitiesVMResponse) -> Capabilities {
    convert::capabilities_from(REMOTEVM, resp)
}

/// What uvmctl's own `serve` over a QEMU virtstack with `qemu` offers a
/// client: its `CapabilitiesVM` answer, plus vsock listeners through
/// `VMSocket` wherever that QEMU has vsock (the answer cannot say so).
pub fn own_server_capabilities(qemu: &Capabilities) -> Capabilities {
    use crate::vm::{Resource, ResourceOperation};
    let mut c = capabilities_from(&crate::protocol::convert::capabilities(qemu, None));
    for (r, op) in [Resource::VmSocket, Resource::HvSocket]
        .into_iter()
        .flat_map(|r| ResourceOperation::ALL.map(|op| (r, op)))
    {
        let mut s = qemu.support(r, op).clone();
        if s.disruption != crate::vm::Disruption::Unsupported {
            s.reason = "through VMSocket (uvmctl's own serve, on a host with vsock)".into();
        }
        c.set(r, op, s);
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
            records: RecordStore::new(
                "record",
                &dir,
                Layout::File { suffix: ".json" },
                MAX_RECORD_BYTES,
            ),
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

    fn record(&self, name: &str) -> Result<Record> {
        self.records.load(name).map_err(|e| match e {
            RecordError::NotFound(_) => VmError::NotFound(name.to_string()),
            e => backend(format!("vm {name}: {e}")),
        })
    }

    fn store(&self, name: &str, rec: &Record) -> Result<()> {
        self.records
            .store(name, rec)
            .map_err(|e| backend(format!("vm {name}: {e}")))
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

    /// The server's VM's state (`InspectVM state`).
    async fn state(&self, name: &VmName) -> Result<State> {
        Ok(match self.inspect(name, "state").await?.as_str() {
            Some("running") => State::Running,
            Some("paused") => State::Paused,
            Some("created") => State::Created,
            Some("saved") => State::Saved,
            _ => State::Terminated,
        })
    }

    async fn call(&self, name: &VmName, call: Call) -> Result<()> {
        let c = self.client(name).await?;
        let e = Empty::new();
        let (r, what) = match call {
            Call::Resume => (c.resume_vm(ctx(), &e).await, "ResumeVM"),
            Call::Pause => (c.pause_vm(ctx(), &e).await, "PauseVM"),
            Call::Teardown => (c.teardown_vm(ctx(), &e).await, "TeardownVM"),
            Call::Quit => (c.quit(ctx(), &e).await, "Quit"),
        };
        r.map(drop).map_err(|e| rpc(name.as_str(), what, &e))
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

/// The protocol's `VMConfig` for a VM configuration.
pub fn to_pb(cfg: &VmConfig) -> pb::VMConfig {
    convert::to_pb(cfg)
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
        let names = match self.records.names() {
            Ok(names) => names,
            // Nothing made here yet: no VMs (a looking command creates none).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.observer => {
                return Ok(Vec::new());
            }
            Err(e) => return Err(backend(format!("cannot list {}: {e}", self.dir.display()))),
        };
        Ok(names.iter().filter_map(|n| VmName::new(n).ok()).collect())
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
        let state = self.state(name).await?;
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
    fn preflight(&self, _name: &VmName, config: &VmConfig) -> Result<()> {
        // Host paths are the server's to check, at CreateVM.
        match self.caps.refusals(config).into_iter().next() {
            Some(r) => Err(VmError::Cold(r)),
            None => Ok(()),
        }
    }

    async fn create(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.preflight(name, config)?;
        if self.records.exists(name.as_str()) {
            return Err(VmError::WrongState {
                vm: name.to_string(),
                state: State::Created,
                need: "it exists already".into(),
            });
        }
        let mut rec = Record {
            config: config.clone(),
            created: false,
            history: History::default(),
        };
        self.store(name.as_str(), &rec)?;
        if let Err(e) = self.create_remote(name, &mut rec).await {
            let _ = self.records.remove(name.as_str());
            return Err(e);
        }
        Ok(())
    }

    async fn change(&self, name: &VmName, change: &Change) -> Result<()> {
        let mut rec = self.record(name.as_str())?;
        if change.key().0 == ResourceKind::Policy {
            // Only the record holds it: the server never sees a policy.
            rec.config = recorded(name, change, &rec.config)?;
            return self.store(name.as_str(), &rec);
        }
        let op = change.operation();
        let resource = match change.resource() {
            Some(r) if self.caps.supported(r, op) => r,
            Some(r) => return Err(VmError::not_supported(&self.caps, r, op)),
            None => {
                return Err(VmError::Refused {
                    vm: name.to_string(),
                    reason: format!("{} is fixed when the VM is created", change.key().0),
                });
            }
        };
        // Asked first, so a VM that does not run is refused with its
        // state, as every virtstack refuses it.
        let state = match rec.created {
            true => self.state(name).await?,
            false => State::Created,
        };
        if !state.is_live() {
            return Err(VmError::NotRunning {
                vm: name.to_string(),
                state,
            });
        }
        // The server judges what its VM has; the record only follows.
        let config = recorded(name, change, &rec.config)?;
        let requests =
            convert::to_wire(change, &rec.config).map_err(|e| VmError::NotSupported {
                resource,
                operation: op,
                reason: e.to_string(),
            })?;
        let c = self.client(name).await?;
        for req in requests {
            match req {
                convert::Wire::Modify(m) => c
                    .modify_resource(ctx(), &m)
                    .await
                    .map(drop)
                    .map_err(|e| rpc_for(name.as_str(), "ModifyResource", &e, Some(change)))?,
                convert::Wire::Socket(v) => c
                    .vm_socket(ctx(), &v)
                    .await
                    .map(drop)
                    .map_err(|e| rpc_for(name.as_str(), "VMSocket", &e, Some(change)))?,
            }
        }
        // The record keeps what the server now has, for the next create
        // (after a stop): the change, as both sides computed it.
        rec.config = config;
        self.store(name.as_str(), &rec)
    }

    async fn reconfigure(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        let mut rec = self.record(name.as_str())?;
        if rec.created {
            let state = self.observe(name).await?.state;
            if state.is_live() {
                return Err(VmError::WrongState {
                    vm: name.to_string(),
                    state,
                    need: "a running VM is not reconfigured; stop it first".into(),
                });
            }
            // A created-but-stopped VM on the server takes its new
            // configuration by being created again at the next start.
            self.call(name, Call::Teardown).await?;
            rec.created = false;
        }
        rec.config = config.clone();
        self.store(name.as_str(), &rec)
    }

    async fn start(&self, name: &VmName, paused: bool) -> Result<()> {
        let mut rec = self.record(name.as_str())?;
        if !rec.created {
            self.create_remote(name, &mut rec).await?;
        }
        self.call(name, Call::Resume).await?;
        if paused {
            self.call(name, Call::Pause).await?;
        }
        Ok(())
    }

    async fn stop(&self, name: &VmName) -> Result<()> {
        let mut rec = self.record(name.as_str())?;
        if rec.created {
            self.call(name, Call::Teardown).await?;
            rec.created = false;
            self.store(name.as_str(), &rec)?;
        }
        Ok(())
    }

    async fn pause(&self, name: &VmName) -> Result<()> {
        self.call(name, Call::Pause).await
    }

    async fn resume(&self, name: &VmName) -> Result<()> {
        self.call(name, Call::Resume).await
    }

    async fn save(&self, name: &VmName) -> Result<()> {
        Err(VmError::Refused {
            vm: name.to_string(),
            reason: "the vmservice protocol has no verb to save a VM".into(),
        })
    }

    async fn destroy(&self, name: &VmName) -> Result<()> {
        let rec = self.record(name.as_str())?;
        if rec.created {
            self.call(name, Call::Teardown).await?;
        }
        let _ = self.call(name, Call::Quit).await;
        self.clients.lock().await.remove(name.as_str());
        let _ = std::fs::remove_file(self.socket(name.as_str()));
        self.records
            .remove(name.as_str())
            .map_err(|e| backend(format!("vm {name}: {e}")))
    }

    async fn history(&self, name: &VmName) -> Result<History> {
        Ok(self.record(name.as_str())?.history)
    }

    async fn keep_history(&self, name: &VmName, history: &History) -> Result<()> {
        let mut rec = self.record(name.as_str())?;
        rec.history = history.clone();
        self.store(name.as_str(), &rec)
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
        // The protocol has no uptime; uvmctl's own serve tells it through
        // InspectVM("stats"). Another server may not: then it is unknown.
        let uptime_seconds = self
            .inspect(name, "stats")
            .await
            .ok()
            .and_then(|v| v.get("uptimeSeconds").and_then(serde_json::Value::as_u64));
        Ok(VmStats {
            assigned_memory_bytes: p.memory_stats.assigned_memory,
            working_set_bytes: p.memory_stats.working_set_bytes,
            total_runtime_ns: p.processor_stats.total_runtime_ns,
            uptime_seconds,
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

    async fn release(&self, name: &VmName) {
        self.clients.lock().await.remove(name.as_str());
    }
}

#[cfg(test)]
// Its fake servers listen on unix sockets.
#[cfg(unix)]
mod tests {
    use super::*;
    use crate::apply::{ApplyOptions, apply};
    use crate::plan::{PlanOptions, plan};
    use crate::reconcile::observe_all;
    use crate::spec::{DesiredState, DesiredVm, NetworkAdapter, ScsiController, ScsiDisk};
    use crate::virtstack::fake::Fake;
    use crate::vm::HostFacts;
    use crate::vm::items::{Item, ScsiDiskItem};
    use crate::vm::{GuestOs, Resource, ResourceOperation, ScsiDiskType};
    use proptest::prelude::*;

    /// Serves each VM in-process over one fake virtstack, as `serve` would.
    struct InProcess {
        fake: Fake,
        servers: std::sync::Mutex<Vec<crate::vmservice::Serving>>,
    }

    impl std::fmt::Debug for InProcess {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("InProcess")
        }
    }

    #[async_trait]
    impl Spawner for InProcess {
        async fn spawn(&self, name: &VmName, socket: &Path) -> Result<(), String> {
            let server =
                crate::vmservice::Serving::start(Arc::new(self.fake.clone()), name.clone(), socket)
                    .await
                    .map_err(|e| e.to_string())?;
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remotevm_over_serve_over_the_fake_conforms() {
        let (_dir, vs, fake) = remote().await;
        let fx = crate::conformance::tests::fixture("r");
        let out = crate::conformance::run(Arc::new(vs), &fx).await;
        let failed = crate::conformance::failures(&out);
        assert!(failed.is_empty(), "{}", failed.join("\n"));
        assert!(fake.get("r-conv").is_none(), "the suite leaves no VM");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_are_loaded_once_per_handle_and_stored_once_per_change() {
        let (dir, vs, _fake) = remote().await;
        let name = VmName::new("io").unwrap();
        vs.create(&name, &spec(1, 256, &[], 0, 0)).await.unwrap();
        vs.start(&name, false).await.unwrap();
        vs.observe(&name).await.unwrap();
        let (loads, stores) = vs.records.io();
        assert_eq!(loads, 0, "this process's own writes cost no read");
        let disk = Item::ScsiDisk(ScsiDiskItem {
            controller: 0,
            disk: ScsiDisk {
                lun: 3,
                path: "/d/3.img".into(),
                disk_type: ScsiDiskType::PassThrough,
                read_only: false,
            },
        });
        vs.change(&name, &Change::Add(disk)).await.unwrap();
        vs.observe(&name).await.unwrap();
        assert_eq!(
            vs.records.io(),
            (0, stores + 1),
            "a change: no read, one write"
        );
        // Another process: one read, then its own copy.
        let other = RemoteVm::with(
            dir.path().join("remote"),
            vs.spawner.clone(),
            Some(fake_caps()),
            true,
        )
        .await
        .unwrap();
        other.observe(&name).await.unwrap();
        other.observe(&name).await.unwrap();
        assert_eq!(other.records.io(), (1, 0));
        // Issue 20: remotevm's status showed uptime `-`.
        assert_eq!(vs.stats(&name).await.unwrap().uptime_seconds, Some(42));
        vs.destroy(&name).await.unwrap();
        assert!(matches!(
            other.observe(&name).await,
            Err(VmError::NotFound(_))
        ));
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
                        status: None, labels: Default::default(),
                    });
                    let opts = PlanOptions::default();
                    let observed = observe_all(vs.as_ref()).await.expect("list");
                    let first = plan(&d, &observed, vs.capabilities(), &opts);
                    let run = ApplyOptions { allow_recreate: true, ..ApplyOptions::default() };
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
