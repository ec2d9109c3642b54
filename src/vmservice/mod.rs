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

// Served over unix sockets: `uvmctl serve` is unix-only.
#[cfg(unix)]
pub mod listen;
#[cfg(unix)]
pub mod server;

#[cfg(unix)]
pub use server::{ServeError, Serving};

use crate::protocol::convert::{self, RequestError};
use crate::protocol::vmservice as pb;
use crate::protocol::vmservice_ttrpc as svc;
use crate::spec::VmConfig;
use crate::vm::{Change, ErrorKind, State, Virtstack, VmError, VmName};
use async_trait::async_trait;
use protobuf::well_known_types::empty::Empty;
use protobuf::well_known_types::struct_::Value;
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
        let code = match e {
            RequestError::Invalid { .. } => Code::INVALID_ARGUMENT,
            RequestError::Unimplemented { .. } => Code::UNIMPLEMENTED,
            RequestError::NotFound(_) => Code::NOT_FOUND,
            RequestError::Exists(_) => Code::ALREADY_EXISTS,
            RequestError::Precondition(_) => Code::FAILED_PRECONDITION,
        };
        status(code, e)
    }
}

/// The ttrpc code of an error kind: a refusal is never `Internal`.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NOT_FOUND,
        ErrorKind::WrongState | ErrorKind::Refused => Code::FAILED_PRECONDITION,
        ErrorKind::NotSupported => Code::UNIMPLEMENTED,
        ErrorKind::Invalid => Code::INVALID_ARGUMENT,
        ErrorKind::Backend => Code::INTERNAL,
    }
}

/// A virtstack error as a ttrpc status.
fn vm_status(e: &VmError) -> RpcError {
    status(code(e.kind()), crate::vm::Chain(e))
}

/// A pre-flight refusal: unsupported settings are `Unimplemented`, anything
/// else (host paths outside the allowed roots, wrong image formats) is the
/// request's fault.
fn preflight_status(e: &VmError) -> RpcError {
    match e.kind() {
        ErrorKind::NotSupported => vm_status(e),
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
    /// Whether the VM has stopped (or is gone), as its one follower last
    /// saw it: every `WaitVM` waits on this, so a thousand waiters cost
    /// one observation per event, not one each every few milliseconds.
    ended: Arc<tokio::sync::watch::Sender<bool>>,
    /// Counts the VM's runs: an observation made before a start says
    /// nothing of the run that start began.
    runs: Arc<std::sync::atomic::AtomicU64>,
    follower: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
    quit: Arc<tokio::sync::Notify>,
}

impl Drop for VmService {
    fn drop(&mut self) {
        if let Some(f) = self.follower_slot().take() {
            f.abort();
        }
    }
}

/// How often a follower looks again at a VM it has no events of (not
/// running, or its events socket busy).
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// Follows the VM's events for as long as the server runs: after each
/// event, and once a second when there are none to follow, it observes
/// the VM and says whether it ended. What the virtstack does for a
/// followed VM (reconnecting a serial console whose listener came back,
/// `virtstack::qemu::serial`) then happens for a VM served to hcsshim too,
/// with no watcher. (Following holds the VM's events socket, which serves
/// one client: a watcher of the same state directory cannot follow a
/// served VM.)
async fn follow(
    vs: Arc<dyn Virtstack>,
    name: VmName,
    ended: Arc<tokio::sync::watch::Sender<bool>>,
    runs: Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    let publish = async |vs: &Arc<dyn Virtstack>| {
        let run = runs.load(Ordering::SeqCst);
        let now = match vs.observe(&name).await {
            Ok(o) => o.state == State::Terminated,
            Err(VmError::NotFound(_)) => true,
            // Unknown: keep what was said.
            Err(_) => return,
        };
        // Checked under the channel's lock, which a start takes after
        // counting its run: a stale "ended" never lands on a new run.
        ended.send_if_modified(|e| {
            runs.load(Ordering::SeqCst) == run && std::mem::replace(e, now) != now
        });
    };
    loop {
        publish(&vs).await;
        match vs.events(&name).await {
            Ok(Some(mut events)) => {
                while events.recv().await.is_some() {
                    publish(&vs).await;
                }
            }
            _ => tokio::time::sleep(FOLLOW_EVERY).await,
        }
    }
}

impl VmService {
    /// Serves the VM `name` of `vs` (created by `CreateVM`).
    pub fn new(vs: Arc<dyn Virtstack>, name: VmName) -> Self {
        VmService {
            vs,
            name,
            changing: tokio::sync::Mutex::new(()),
            torn_down: tokio::sync::watch::channel(false).0,
            ended: Arc::new(tokio::sync::watch::channel(false).0),
            runs: Arc::default(),
            follower: std::sync::Mutex::new(None),
            quit: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// A new run of the VM began (created, or started again).
    fn new_run(&self) {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.ended.send_replace(false);
    }

    fn follower_slot(&self) -> std::sync::MutexGuard<'_, Option<tokio::task::AbortHandle>> {
        // A poisoned lock only means a panic elsewhere held it.
        self.follower.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the VM's one follower, unless it runs; its handle, to stop it.
    pub fn follow(&self) -> tokio::task::AbortHandle {
        self.follower_slot()
            .get_or_insert_with(|| {
                tokio::spawn(follow(
                    Arc::clone(&self.vs),
                    self.name.clone(),
                    Arc::clone(&self.ended),
                    Arc::clone(&self.runs),
                ))
                .abort_handle()
            })
            .clone()
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

    /// Checks the configuration the VM would have after a change, as the
    /// virtstack's pre-flight does for a new VM: host paths, refusals.
    /// Returns it as the validation made it canonical (MACs, GUIDs).
    fn precheck(&self, cfg: VmConfig) -> RpcResult<VmConfig> {
        let cfg = convert::validated(self.name.as_str(), cfg)?;
        self.vs
            .preflight(&self.name, &cfg)
            .map_err(|e| preflight_status(&e))?;
        Ok(cfg)
    }

    /// Makes the changes a request translates to, each gated as the plan
    /// gates it: what `CapabilitiesVM` says this VM does not do is
    /// `Unimplemented`, and the configuration after it is checked as a new
    /// VM's would be (host paths, values) before the virtstack is asked.
    async fn make(
        &self,
        translate: impl FnOnce(&crate::spec::VmConfig) -> Result<Vec<Change>, RequestError>,
    ) -> RpcResult<()> {
        let seen = self.observed().await?;
        if !seen.state.is_live() {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "VM {} does not run (it is {}); ResumeVM first",
                    self.name, seen.state
                ),
            ));
        }
        let changes = translate(&seen.config)?;
        let wire = convert::capabilities(self.vs.capabilities(), Some(&seen));
        let mut cfg = seen.config.clone();
        for change in &changes {
            self.offered(&wire, &seen, change)?;
            cfg = change
                .applied(&cfg)
                .map_err(|e| status(Code::FAILED_PRECONDITION, e))?;
        }
        // What is added is what the validation made of it.
        let canonical = crate::vm::items::flatten(&self.precheck(cfg)?);
        for change in changes {
            let change = match change {
                Change::Add(item) => {
                    Change::Add(canonical.get(&item.key()).cloned().unwrap_or(item))
                }
                Change::Update { before, after } => Change::Update {
                    before,
                    after: canonical.get(&after.key()).cloned().unwrap_or(after),
                },
                remove @ Change::Remove(_) => remove,
            };
            self.vs
                .change(&self.name, &change)
                .await
                .map_err(|e| vm_status(&e))?;
        }
        Ok(())
    }

    /// Refuses a change the capabilities do not call live
    /// (`Unimplemented`), or this VM's `CapabilitiesVM` answer (`wire`)
    /// does not offer as it is configured (`FailedPrecondition`, with the
    /// reason the plan gives).
    fn offered(
        &self,
        wire: &pb::CapabilitiesVMResponse,
        seen: &crate::vm::ObservedVm,
        change: &Change,
    ) -> RpcResult<()> {
        let caps = self.vs.capabilities();
        let op = change.operation();
        let Some(r) = change.resource() else {
            return Err(status(
                Code::UNIMPLEMENTED,
                format!("{} is not changed on a running VM", change.label()),
            ));
        };
        if !caps.supported(r, op) {
            return Err(status(
                Code::UNIMPLEMENTED,
                format!(
                    "{} is not done live here: {}",
                    change.label(),
                    caps.support(r, op).reason
                ),
            ));
        }
        if convert::offers(wire, r, op) == Some(false) {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("{}: {}", change.label(), convert::narrowed_reason(seen, r)),
            ));
        }
        Ok(())
    }

    async fn modify(&self, req: &pb::ModifyResourceRequest) -> RpcResult<()> {
        self.make(|have| convert::from_modify(req, have)).await
    }

    async fn socket(&self, req: &pb::VMSocketRequest) -> RpcResult<()> {
        self.make(|have| convert::from_socket(req, have).map(|c| vec![c]))
            .await
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

/// The capabilities message of a virtstack for no VM in particular.
pub fn capabilities(caps: &crate::vm::Capabilities) -> pb::CapabilitiesVMResponse {
    convert::capabilities(caps, None)
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
            self.new_run();
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
                    // Running again: a waiter waits for this run to end.
                    self.new_run();
                    Ok(Empty::new())
                }
            }
        })
        .await
    }

    async fn wait_vm(&self, ctx: &TtrpcContext, _: Empty) -> RpcResult<Empty> {
        within(ctx, async {
            self.follow();
            let mut torn = self.torn_down.subscribe();
            let mut ended = self.ended.subscribe();
            loop {
                if *torn.borrow_and_update() || *ended.borrow_and_update() {
                    return Ok(Empty::new());
                }
                tokio::select! {
                    _ = torn.changed() => {}
                    _ = ended.changed() => {}
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
        ctx: &TtrpcContext,
        _: Empty,
    ) -> RpcResult<pb::CapabilitiesVMResponse> {
        within(ctx, async {
            // Per VM where it depends on the VM (its memory backing).
            let seen = match self.exists().await? {
                true => self.vs.observe(&self.name).await.ok(),
                false => None,
            };
            Ok(convert::capabilities(self.vs.capabilities(), seen.as_ref()))
        })
        .await
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
