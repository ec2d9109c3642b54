//! The hcs virtstack (`--virtstack hcs`): utility VMs as HCS compute
//! systems, driven through computecore.dll ([`api`]). What HCS receives is
//! [`documents`]: a create document per VM and a ModifySettingRequest per
//! live change; `plan --hcs-requests` prints the same calls for review
//! ([`dry_run`]).
//!
//! What is observed where (docs/hcs.md): the state, the owner and the
//! statistics come from the compute system's properties; the
//! configuration is uvmctl's record of what it applied (HCS reports no
//! device list), as remotevm does. A VM whose compute system is gone
//! (stopped, or the host restarted) keeps its record and is `terminated`;
//! a start creates its compute system again from the record. A compute
//! system of the VM's name that another owner made is never changed.
//!
//! Host paths are checked lexically against the allowed roots: HCS opens
//! them itself, as its own service, so uvmctl has no descriptor to hand
//! over (docs/hcs.md says what a Windows operator should check).

pub mod api;
pub mod documents;
pub mod dry_run;
pub mod schema;

use crate::virtstack::records::{Layout, RecordError, RecordStore};
use crate::vm::config::{PowerState, VmConfig};
use crate::vm::history::History;
use crate::vm::items::{ChangeError, ResourceKind};
use crate::vm::{
    Capabilities, Change, Observe, ObservedVm, State, Virtstack, VmError, VmName, VmStats,
};
use api::{ComputeService, HcsError, Hresult, Verb, hr};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Result<T, E = VmError> = std::result::Result<T, E>;

/// The library's default name: loaded from the Windows system directory.
pub const DEFAULT_LIBRARY: &str = "computecore.dll";

/// How long one HCS operation may take before uvmctl gives up on it.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a graceful shutdown may take, once HCS took it, before the
/// system is terminated.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Where host paths may lie when no `--hcs-allow-root` is given.
pub const DEFAULT_ALLOWED_ROOTS: &[&str] = &["C:/ProgramData/uvmctl"];

/// A record is read up to this size (a VM's whole configuration).
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// What uvmctl keeps for one VM: what it applied, and where a save went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HcsRecord {
    /// The configuration as applied (HCS reports no device list).
    pub config: VmConfig,
    /// The file a save wrote, while the VM is saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<String>,
    /// The configurations applied to it ([`Virtstack::history`]).
    #[serde(default, skip_serializing_if = "History::is_empty")]
    pub history: History,
}

/// The hcs virtstack over one compute service.
pub struct Hcs {
    service: Arc<dyn ComputeService>,
    caps: Capabilities,
    records: RecordStore<HcsRecord>,
    records_dir: PathBuf,
    roots: Vec<String>,
    busy: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The compute system's id for a VM: its name (the Owner says it is uvmctl's).
pub fn system_id(name: &VmName) -> String {
    name.to_string()
}

/// What a VM's compute system is, as HCS reports it.
enum System {
    /// There is none.
    None,
    /// uvmctl's, in this state (with why it exited, when it did on its own).
    Ours(State, Option<String>),
    /// Another owner's, of the same id: never changed.
    Foreign(String),
}

fn is(e: &HcsError, codes: &[Hresult]) -> bool {
    codes.contains(&e.hresult)
}

/// An HCS failure as the contract's error kinds: a system that is gone is
/// `NotFound`, one in the wrong state `Refused` with HCS's words, a system
/// already stopped `NotRunning`; the rest is the backend's.
fn vm_error(name: &str, e: HcsError) -> VmError {
    match e.hresult {
        hr::HCS_E_SYSTEM_NOT_FOUND => VmError::NotFound(name.to_string()),
        hr::HCS_E_SYSTEM_ALREADY_STOPPED => VmError::NotRunning {
            vm: name.to_string(),
            state: State::Terminated,
        },
        hr::HCS_E_INVALID_STATE | hr::HCS_E_SYSTEM_ALREADY_EXISTS => VmError::Refused {
            vm: name.to_string(),
            reason: e.to_string(),
        },
        hr::HCS_E_ACCESS_DENIED => VmError::backend(format!(
            "{e} (HCS takes administrators and members of Hyper-V Administrators only)"
        )),
        _ => VmError::Backend(Box::new(e)),
    }
}

/// A root or path as compared: `/` for `\`, no trailing separator,
/// ASCII case folded (Windows paths are case-insensitive).
fn fold(p: &str) -> String {
    p.replace('\\', "/")
        .trim_end_matches('/')
        .to_ascii_lowercase()
}

/// Whether a path has a component Windows would read as `.` or `..`
/// (it drops trailing dots and spaces: `.. ` is `..`).
fn has_dot_component(p: &str) -> bool {
    p.replace('\\', "/")
        .split('/')
        .any(|c| !c.is_empty() && c.trim_end_matches(['.', ' ']).is_empty())
}

/// The HCS emulator as this source tree builds it (`cargo build -p
/// uvmctl-hcs-emulator`, which scripts/test runs), for tests and
/// benchmarks: `UVMCTL_HCS_EMULATOR` if set, else the debug or release
/// build under `CARGO_TARGET_DIR` or the tree's `target/`; `None` when
/// none is built.
pub fn built_emulator() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("UVMCTL_HCS_EMULATOR") {
        return Some(p.into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let file = format!(
        "{}uvmctl_hcs_emulator{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    // Built for another target (uvmctl.exe's tests under Wine), it sits
    // under the target's own directory.
    let triple = if cfg!(windows) {
        "x86_64-pc-windows-gnu"
    } else {
        ""
    };
    ["debug", "release"]
        .iter()
        .map(|profile| target.join(triple).join(profile).join(&file))
        .find(|p| p.exists())
}

/// The save file of `name` among the records in `dir`.
fn save_file_in(dir: &Path, name: &VmName) -> String {
    dir.join(format!("{name}.vmrs"))
        .to_string_lossy()
        .into_owned()
}

fn state_of(p: &schema::Properties) -> State {
    match p.state.as_str() {
        "Created" => State::Created,
        "Running" => State::Running,
        "Paused" => State::Paused,
        "SavedAsTemplate" => State::Saved,
        _ => State::Terminated,
    }
}

impl Hcs {
    /// The virtstack keeping its records under `state_dir/hcs`; host paths
    /// must lie under `roots` (empty: [`DEFAULT_ALLOWED_ROOTS`]).
    pub fn new(service: Arc<dyn ComputeService>, state_dir: &Path, roots: &[PathBuf]) -> Self {
        let records_dir = Self::records_dir(state_dir);
        let roots = if roots.is_empty() {
            DEFAULT_ALLOWED_ROOTS.iter().map(|r| fold(r)).collect()
        } else {
            roots.iter().map(|r| fold(&r.to_string_lossy())).collect()
        };
        Hcs {
            service,
            caps: Capabilities::hcs(),
            records: RecordStore::new(
                "hcs record",
                records_dir.clone(),
                Layout::File { suffix: ".json" },
                MAX_RECORD_BYTES,
            ),
            records_dir,
            roots,
            busy: Mutex::default(),
        }
    }

    /// Where the records of a state directory are.
    pub fn records_dir(state_dir: &Path) -> PathBuf {
        state_dir.join("hcs")
    }

    /// Makes the records directory (apply and watch; observers never do).
    ///
    /// # Errors
    /// When it cannot be made.
    pub fn ensure_dir(state_dir: &Path) -> std::io::Result<()> {
        crate::hostfs::create_dirs(&Self::records_dir(state_dir), 0o700)
    }

    /// Takes `rec` as this VM's record (the dry run, seeded with what a
    /// host was observed to have).
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn adopt(&self, name: &VmName, rec: &HcsRecord) -> Result<()> {
        self.store(name, rec)
    }

    /// Where a save of `name` goes, under `state_dir`.
    pub fn save_file(state_dir: &Path, name: &VmName) -> String {
        save_file_in(&Self::records_dir(state_dir), name)
    }

    fn save_path(&self, name: &VmName) -> String {
        save_file_in(&self.records_dir, name)
    }

    fn lock_of(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut busy = self
            .busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        busy.entry(name.to_string()).or_default().clone()
    }

    fn load(&self, name: &VmName) -> Result<HcsRecord> {
        match self.records.load(name) {
            Ok(r) => Ok(r),
            Err(RecordError::NotFound(_)) => Err(VmError::NotFound(name.to_string())),
            Err(e) => Err(VmError::Backend(Box::new(e))),
        }
    }

    fn store(&self, name: &VmName, rec: &HcsRecord) -> Result<()> {
        self.records
            .store(name, rec)
            .map_err(|e| VmError::Backend(Box::new(e)))
    }

    /// Runs one blocking HCS call off the runtime, its failure unmapped.
    async fn raw<T, F>(&self, f: F) -> Result<std::result::Result<T, HcsError>>
    where
        T: Send + 'static,
        F: FnOnce(&dyn ComputeService) -> std::result::Result<T, HcsError> + Send + 'static,
    {
        let service = Arc::clone(&self.service);
        tokio::task::spawn_blocking(move || f(service.as_ref()))
            .await
            .map_err(|e| VmError::backend(format!("an HCS call failed: {e}")))
    }

    /// Runs one blocking HCS call for `name`, its failure in the
    /// contract's kinds.
    async fn call<T, F>(&self, name: &VmName, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn ComputeService, &str) -> std::result::Result<T, HcsError> + Send + 'static,
    {
        let id = system_id(name);
        self.raw(move |s| f(s, &id))
            .await?
            .map_err(|e| vm_error(name, e))
    }

    /// The properties of `name`'s compute system (`None`: there is none).
    async fn properties(
        &self,
        name: &VmName,
        property_types: Vec<String>,
    ) -> Result<Option<schema::Properties>> {
        let id = system_id(name);
        let query = serde_json::to_string(&schema::PropertyQuery { property_types })
            .map_err(|e| VmError::backend(format!("{name}: property query: {e}")))?;
        match self.raw(move |s| s.properties(&id, &query)).await? {
            Ok(doc) => serde_json::from_str(&doc).map(Some).map_err(|e| {
                VmError::backend(format!("{name}: HCS properties are not understood: {e}"))
            }),
            Err(e) if e.hresult == hr::HCS_E_SYSTEM_NOT_FOUND => Ok(None),
            Err(e) => Err(vm_error(name, e)),
        }
    }

    async fn system(&self, name: &VmName) -> Result<System> {
        Ok(match self.properties(name, Vec::new()).await? {
            None => System::None,
            Some(p) if p.owner != documents::OWNER => System::Foreign(p.owner),
            Some(p) => {
                let state = state_of(&p);
                let crashed = (state == State::Terminated
                    && p.exit_type.as_deref() == Some("UnexpectedExit"))
                .then(|| "HCS reports an unexpected exit".to_string());
                System::Ours(state, crashed)
            }
        })
    }

    /// The VM's state: from its compute system, else from its record; a
    /// system another owner made under its name is refused.
    async fn state(&self, name: &VmName, rec: &HcsRecord) -> Result<State> {
        match self.system(name).await? {
            System::Ours(state, _) => Ok(state),
            System::None if rec.saved.is_some() => Ok(State::Saved),
            System::None => Ok(State::Terminated),
            System::Foreign(owner) => Err(VmError::Refused {
                vm: name.to_string(),
                reason: format!(
                    "the compute system {} belongs to {owner:?}, not uvmctl: it is left alone",
                    system_id(name)
                ),
            }),
        }
    }

    /// Terminates the compute system if there is one (it goes with its
    /// last handle, which the call closes).
    async fn terminate(&self, name: &VmName) -> Result<()> {
        self.call(name, |s, id| match s.lifecycle(id, Verb::Terminate, None) {
            Err(e)
                if is(
                    &e,
                    &[hr::HCS_E_SYSTEM_NOT_FOUND, hr::HCS_E_SYSTEM_ALREADY_STOPPED],
                ) =>
            {
                Ok(())
            }
            other => other,
        })
        .await
    }

    async fn create_system(&self, name: &VmName, rec: &HcsRecord) -> Result<()> {
        let doc = documents::create_document(&rec.config, rec.saved.as_deref());
        let text = serde_json::to_string(&doc)
            .map_err(|e| VmError::backend(format!("{name}: create document: {e}")))?;
        self.call(name, move |s, id| s.create(id, &text)).await
    }

    async fn lifecycle(&self, name: &VmName, verb: Verb, options: Option<String>) -> Result<()> {
        self.call(name, move |s, id| s.lifecycle(id, verb, options.as_deref()))
            .await
    }

    /// Pauses a running VM or resumes a paused one; one already there is
    /// left so, one that does not run is refused.
    async fn pause_or_resume(&self, name: &VmName, verb: Verb) -> Result<()> {
        let (from, to) = match verb {
            Verb::Pause => (State::Running, State::Paused),
            _ => (State::Paused, State::Running),
        };
        let lock = self.lock_of(name);
        let _held = lock.lock().await;
        let rec = self.load(name)?;
        match self.state(name, &rec).await? {
            state if state == to => Ok(()),
            state if state == from => self.lifecycle(name, verb, None).await,
            state => Err(VmError::NotRunning {
                vm: name.to_string(),
                state,
            }),
        }
    }

    /// Stores `rec`, then removes the save file it no longer names (in
    /// that order: a record never names a file that is gone).
    fn store_then_forget(
        &self,
        name: &VmName,
        rec: &HcsRecord,
        spent: Option<String>,
    ) -> Result<()> {
        self.store(name, rec)?;
        if let Some(file) = spent {
            let _ = std::fs::remove_file(file);
        }
        Ok(())
    }

    /// Every host path `config` names, with the field it is in.
    fn paths(config: &VmConfig) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut put = |field: String, p: &Path| out.push((field, p.to_string_lossy().into_owned()));
        if let Some(u) = &config.boot.uefi {
            put("boot.uefi.dir".into(), &u.dir);
        }
        if let Some(k) = &config.boot.linux_kernel_direct {
            put("boot.linuxKernelDirect.kernel".into(), &k.kernel);
            if let Some(i) = &k.initrd {
                put("boot.linuxKernelDirect.initrd".into(), i);
            }
        }
        for c in &config.scsi_controllers {
            for d in &c.disks {
                put(format!("scsi {}:{}", c.id, d.lun), &d.path);
            }
        }
        if let Some(v) = &config.vpmem {
            for d in &v.devices {
                put(format!("vpmem device {}", d.id), &d.path);
            }
        }
        for s in &config.plan9_shares {
            put(format!("plan9 share {}", s.name), &s.host_path);
        }
        for s in &config.vsmb_shares {
            put(format!("vsmb share {}", s.name), &s.host_path);
        }
        out
    }

    /// The first host path outside the allowed roots or with a `.`/`..`
    /// component, and the UEFI boot file's path inside its directory.
    fn path_refusal(&self, config: &VmConfig) -> Option<String> {
        if let Some(u) = &config.boot.uefi
            && has_dot_component(&u.path)
        {
            return Some(format!(
                "boot.uefi.path: {} must stay inside boot.uefi.dir",
                u.path
            ));
        }
        // uvmctl's own state (records, the git cache and what it puts in
        // force) is never a guest's, even under an allowed root.
        let state = self
            .records_dir
            .parent()
            .map(|s| fold(&s.to_string_lossy()));
        Self::paths(config).into_iter().find_map(|(field, p)| {
            let f = fold(&p);
            let root = self
                .roots
                .iter()
                .find(|r| f == **r || f.starts_with(&format!("{r}/")));
            let Some(root) = root.filter(|_| !has_dot_component(&p)) else {
                return Some(format!(
                    "{field}: {p} is not under an allowed root ({}); HCS opens it as its own service",
                    self.roots.join(", ")
                ));
            };
            if let Some(state) = &state
                && (f == *state || f.starts_with(&format!("{state}/")) || state.starts_with(&format!("{f}/")))
            {
                return Some(format!(
                    "{field}: {p} is or holds uvmctl's state directory; no guest may reach it"
                ));
            }
            // HCS opens it by name as its own service: nothing on the way
            // down from the root may be others' to change (or a link).
            #[cfg(windows)]
            if let Err(e) = crate::hostfs::check_beneath(Path::new(&p[..root.len()]), Path::new(&p)) {
                return Some(format!("{field}: {e}"));
            }
            #[cfg(not(windows))]
            let _ = root;
            None
        })
    }
}

#[async_trait]
impl Observe for Hcs {
    fn name(&self) -> &str {
        crate::vm::HCS
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn list(&self) -> Result<Vec<VmName>> {
        // Nothing applied here yet is no VMs; unreadable is an error.
        self.records
            .listed()
            .map_err(|e| VmError::Backend(Box::new(e)))
    }

    async fn observe(&self, name: &VmName) -> Result<ObservedVm> {
        let rec = self.load(name)?;
        let (state, managed, exit_error) = match self.system(name).await? {
            System::Ours(state, crashed) => (state, true, crashed),
            System::None if rec.saved.is_some() => (State::Saved, true, None),
            System::None => (State::Terminated, true, None),
            System::Foreign(_) => (State::Terminated, false, None),
        };
        Ok(ObservedVm {
            config: rec.config,
            state,
            managed,
            exit_error,
            memory_hotplug: None,
        })
    }
}

#[async_trait]
impl Virtstack for Hcs {
    fn preflight(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        if let Some(r) = self.caps.refusals(config).into_iter().next() {
            return Err(VmError::Cold(r));
        }
        let why = documents::refusals(config)
            .into_iter()
            .next()
            .or_else(|| self.path_refusal(config));
        match why {
            Some(reason) => Err(VmError::Refused {
                vm: name.to_string(),
                reason,
            }),
            None => Ok(()),
        }
    }

    async fn create(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.preflight(name, config)?;
        let lock = self.lock_of(name);
        let _held = lock.lock().await;
        match self.load(name) {
            Ok(rec) => {
                return Err(VmError::WrongState {
                    vm: name.to_string(),
                    state: self.state(name, &rec).await?,
                    need: "it exists already".into(),
                });
            }
            Err(VmError::NotFound(_)) => {}
            // A record that cannot be read is never written over.
            Err(e) => return Err(e),
        }
        let mut config = config.clone();
        config.power_state = PowerState::Stopped;
        let rec = HcsRecord {
            config,
            saved: None,
            history: History::default(),
        };
        self.create_system(name, &rec).await?;
        if let Err(e) = self.store(name, &rec) {
            // No compute system without its record (nothing would list it).
            let _ = self.terminate(name).await;
            return Err(e);
        }
        Ok(())
    }

    async fn change(&self, name: &VmName, change: &Change) -> Result<()> {
        let lock = self.lock_of(name);
        let _held = lock.lock().await;
        let rec = self.load(name)?;
        if let Some(r) = change.resource() {
            let op = change.operation();
            if !self.caps.supported(r, op) {
                return Err(VmError::not_supported(&self.caps, r, op));
            }
        }
        let applied = change.applied(&rec.config).map_err(|e| match e {
            ChangeError::Absent(item) => VmError::NoSuchItem {
                vm: name.to_string(),
                item,
            },
            e => VmError::Refused {
                vm: name.to_string(),
                reason: e.to_string(),
            },
        })?;
        let request = documents::modify_request(change).map_err(|reason| VmError::Refused {
            vm: name.to_string(),
            reason,
        })?;
        if let Some(request) = request {
            // HCS changes devices of a running VM only.
            let state = self.state(name, &rec).await?;
            if state != State::Running {
                return Err(VmError::NotRunning {
                    vm: name.to_string(),
                    state,
                });
            }
            let text = serde_json::to_string(&request)
                .map_err(|e| VmError::backend(format!("{name}: request: {e}")))?;
            self.call(name, move |s, id| s.modify(id, &text)).await?;
        } else if change.key().0 != ResourceKind::Policy {
            return Err(VmError::Refused {
                vm: name.to_string(),
                reason: format!("{} is not changed on a running VM", change.key().0),
            });
        }
        self.store(
            name,
            &HcsRecord {
                config: applied,
                ..rec
            },
        )
    }

    async fn reconfigure(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.preflight(name, config)?;
        let lock = self.lock_of(name);
        let _held = lock.lock().await;
        let rec = self.load(name)?;
        let state = self.state(name, &rec).await?;
        if state.is_live() {
            return Err(VmError::WrongState {
                vm: name.to_string(),
                state,
                need: "a running VM is not reconfigured; stop it first".into(),
            });
        }
        // A compute system made but not started holds the old document:
        // the next start makes it again from the new record. A saved
        // guest does not fit the new configuration: it is discarded.
        self.terminate(name).await?;
        let mut config = config.clone();
        config.power_state = PowerState::Stopped;
        self.store_then_forget(
            name,
            &HcsRecord {
                config,
                saved: None,
                history: rec.history.clone(),
            },
            rec.saved,
        )
    }

    async fn start(&self, name: &VmName, paused: bool) -> Result<()> {
        let lock = self.lock_of(name);
        let _held = lock.lock().await;
        let mut rec = self.load(name)?;
        let state = self.state(name, &rec).await?;
        if state.is_live() {
            return Err(VmError::WrongState {
                vm: name.to_string(),
                state,
                need: "it runs already".into(),
            });
        }
        if state != State::Created {
            // One that stopped on its own lingers until let go of.
            self.terminate(name).await?;
            self.create_system(name, &rec).await?;
        }
        if let Err(e) = self.lifecycle(name, Verb::Start, None).await {
            // Not left half made: the record is what the next start uses.
            let _ = self.terminate(name).await;
            return Err(e);
        }
        if let Some(file) = rec.saved.take() {
            // Restored: that state is spent.
            self.store_then_forget(name, &rec, Some(file))?;
        }
        if paused {
            self.lifecycle(name, Verb::Pause, None).await?;
        }
        Ok(())
    }

    async fn stop(&self, name: &VmName) -> Result<()> {
        let lock = self.lock_of(name);
        let _held = lock.lock().await;
        let mut rec = self.load(name)?;
        let state = self.state(name, &rec).await?;
        if state == State::Running {
            // Gracefully first; what does not stop in time is terminated.
            let graceful = self
                .call(name, |s, id| {
                    s.lifecycle(id, Verb::ShutDown, None)?;
                    s.wait_exit(id, SHUTDOWN_GRACE)
                })
                .await;
            if !matches!(graceful, Ok(true)) {
                tracing::info!(vm = %name, "no graceful shutdown: terminating");
            }
        }
        self.terminate(name).await?;
        if let Some(file) = rec.saved.take() {
            self.store_then_forget(name, &rec, Some(file))?;
        }
        Ok(())
    }

    async fn pause(&self, name: &VmName) -> Result<()> {
        self.pause_or_resume(name, Verb::Pause).await
    }

    async fn resume(&self, name: &VmName) -> Result<()> {
        self.pause_or_resume(name, Verb::Resume).await
    }

    async fn save(&self, name: &VmName) -> Result<()> {
        let lock = self.lock_of(name);
        let _held = lock.lock().await;
        let mut rec = self.load(name)?;
        if let Some(reason) = self.caps.save_refusal(&rec.config) {
            return Err(VmError::Refused {
                vm: name.to_string(),
                reason: format!("cannot save: {reason}"),
            });
        }
        let state = self.state(name, &rec).await?;
        if !state.is_live() {
            return Err(VmError::NotRunning {
                vm: name.to_string(),
                state,
            });
        }
        // HCS saves a paused system only; what it saved is kept in a file
        // and the system ends (a start restores from the file).
        let paused_here = state == State::Running;
        if paused_here {
            self.lifecycle(name, Verb::Pause, None).await?;
        }
        let path = self.save_path(name);
        let _ = std::fs::remove_file(&path);
        let options = serde_json::to_string(&documents::save_options(&path))
            .map_err(|e| VmError::backend(format!("{name}: save options: {e}")))?;
        if let Err(e) = self.lifecycle(name, Verb::Save, Some(options)).await {
            // A failed save leaves the VM as it was.
            if paused_here {
                let _ = self.lifecycle(name, Verb::Resume, None).await;
            }
            return Err(e);
        }
        rec.saved = Some(path);
        self.store(name, &rec)?;
        self.terminate(name).await
    }

    async fn destroy(&self, name: &VmName) -> Result<()> {
        let lock = self.lock_of(name);
        let _held = lock.lock().await;
        let rec = self.load(name)?;
        // Another owner's system of this name is not this VM's to end.
        if !matches!(self.system(name).await?, System::Foreign(_)) {
            self.terminate(name).await?;
        }
        self.records
            .remove(name)
            .map_err(|e| VmError::Backend(Box::new(e)))?;
        if let Some(file) = &rec.saved {
            let _ = std::fs::remove_file(file);
        }
        Ok(())
    }

    async fn history(&self, name: &VmName) -> Result<History> {
        Ok(self.load(name)?.history)
    }

    async fn keep_history(&self, name: &VmName, history: &History) -> Result<()> {
        let lock = self.lock_of(name);
        let _held = lock.lock().await;
        let mut rec = self.load(name)?;
        rec.history = history.clone();
        self.store(name, &rec)
    }

    async fn guest_ready(&self, name: &VmName) -> Result<bool> {
        // HCS reports no guest signal without a guest agent (GCS): a
        // running system is taken as ready.
        let rec = self.load(name)?;
        Ok(self.state(name, &rec).await? == State::Running)
    }

    async fn stats(&self, name: &VmName) -> Result<VmStats> {
        let rec = self.load(name)?;
        let Some(props) = self.properties(name, vec!["Statistics".into()]).await? else {
            return Ok(VmStats::default());
        };
        if props.owner != documents::OWNER {
            return Ok(VmStats::default());
        }
        let live = state_of(&props).is_live();
        let st = props.statistics.unwrap_or_default();
        Ok(VmStats {
            assigned_memory_bytes: if live {
                rec.config.memory.size_mb << 20
            } else {
                0
            },
            working_set_bytes: st
                .memory
                .map_or(0, |m| m.memory_usage_private_working_set_bytes),
            total_runtime_ns: st
                .processor
                .map_or(0, |p| p.total_runtime_100ns.saturating_mul(100)),
            uptime_seconds: live.then_some(st.uptime_100ns / 10_000_000),
        })
    }

    async fn wait(&self, name: &VmName, timeout: Option<Duration>) -> Result<bool> {
        let rec = self.load(name)?;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            if !self.state(name, &rec).await?.is_live() {
                return Ok(true);
            }
            // In slices, so that a destroy (record and system gone) is seen.
            let slice = deadline.map_or(Duration::from_secs(1), |d| {
                d.saturating_duration_since(tokio::time::Instant::now())
                    .min(Duration::from_secs(1))
            });
            match self.call(name, move |s, id| s.wait_exit(id, slice)).await {
                Ok(true) | Err(VmError::NotFound(_)) => return Ok(true),
                Ok(false) => {}
                Err(e) => return Err(e),
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Ok(false);
            }
        }
    }
}

#[cfg(test)]
mod golden;

#[cfg(test)]
pub(crate) mod tests;
