//! The "service": compute systems, their lifecycle, and their optional file store.
//!
//! A [`Store`] keeps every compute system's record in memory and, when it has a directory
//! (`UVMCTL_HCS_EMULATOR_DIR` for the process-wide store), one JSON file per system there,
//! written atomically (temp file + rename) and re-read at the start of every call, so several
//! processes see one service. Handle counts are per process (per store instance).
//!
//! Every function returns the outcome HCS would report through the operation: `Ok(document)`
//! or an [`HcsError`]. Moves to Stopped return the SystemExitStatus document so that the caller
//! (the ABI layer) can fire SystemExited events outside every lock.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::hresult::*;
use crate::modify;
use crate::schema;

/// The marker that says a saved-state file was written by this emulator's save.
pub const SAVE_MARKER: &str = "uvmctl-hcs-emulator saved state v1";

/// SchemaReference.md `#State`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
    Stopped,
    SavedAsTemplate,
}

impl State {
    pub fn word(self) -> &'static str {
        match self {
            State::Created => "Created",
            State::Running => "Running",
            State::Paused => "Paused",
            State::Stopped => "Stopped",
            State::SavedAsTemplate => "SavedAsTemplate",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        [
            State::Created,
            State::Running,
            State::Paused,
            State::Stopped,
            State::SavedAsTemplate,
        ]
        .into_iter()
        .find(|s| s.word() == word)
    }
}

/// How a system came to stop (SystemExitStatus, SchemaReference.md `#SystemExitStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub status: i32,
    /// NotificationType: "GracefulExit" | "ForcedExit" | "UnexpectedExit".
    pub exit_type: String,
    /// SystemExitDetail: "Shutdown" | "Terminate" | ...
    pub detail: String,
}

impl Exit {
    fn graceful() -> Self {
        Exit {
            status: S_OK,
            exit_type: "GracefulExit".into(),
            detail: "Shutdown".into(),
        }
    }

    fn forced() -> Self {
        Exit {
            status: S_OK,
            exit_type: "ForcedExit".into(),
            detail: "Terminate".into(),
        }
    }

    /// The SystemExitStatus document.
    pub fn document(&self) -> String {
        json!({
            "Status": self.status,
            "ExitType": self.exit_type,
            "Attribution": [{"SystemExit": {"Detail": self.detail, "Initiator": "Client"}}],
        })
        .to_string()
    }

    fn to_value(&self) -> Value {
        json!({"Status": self.status, "ExitType": self.exit_type, "Detail": self.detail})
    }

    fn from_value(v: &Value) -> Option<Self> {
        Some(Exit {
            status: i32::try_from(v.get("Status")?.as_i64()?).ok()?,
            exit_type: v.get("ExitType")?.as_str()?.to_string(),
            detail: v.get("Detail")?.as_str()?.to_string(),
        })
    }
}

/// One compute system.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub id: String,
    pub document: Value,
    pub owner: String,
    pub runtime_id: String,
    pub state: State,
    /// Times in 100 ns units since the Unix epoch.
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub stopped_at: Option<u64>,
    pub exit: Option<Exit>,
    pub peak_commit_bytes: u64,
    /// The saved document of a system created from a saved state; Start runs from it.
    pub restore_document: Option<Value>,
    /// Host named pipes mapped by modify (the VM schema has no field for them).
    pub mapped_pipes: Vec<String>,
}

impl Record {
    fn to_value(&self) -> Value {
        json!({
            "Id": self.id,
            "Document": self.document,
            "Owner": self.owner,
            "RuntimeId": self.runtime_id,
            "State": self.state.word(),
            "CreatedAt": self.created_at,
            "StartedAt": self.started_at,
            "StoppedAt": self.stopped_at,
            "Exit": self.exit.as_ref().map(Exit::to_value),
            "PeakCommitBytes": self.peak_commit_bytes,
            "RestoreDocument": self.restore_document,
            "MappedPipes": self.mapped_pipes,
        })
    }

    fn from_value(v: &Value) -> Option<Self> {
        Some(Record {
            id: v.get("Id")?.as_str()?.to_string(),
            document: v.get("Document")?.clone(),
            owner: v.get("Owner")?.as_str()?.to_string(),
            runtime_id: v.get("RuntimeId")?.as_str()?.to_string(),
            state: State::parse(v.get("State")?.as_str()?)?,
            created_at: v.get("CreatedAt")?.as_u64()?,
            started_at: v.get("StartedAt").and_then(Value::as_u64),
            stopped_at: v.get("StoppedAt").and_then(Value::as_u64),
            exit: v.get("Exit").and_then(Exit::from_value),
            peak_commit_bytes: v
                .get("PeakCommitBytes")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            restore_document: v.get("RestoreDocument").filter(|d| !d.is_null()).cloned(),
            mapped_pipes: v
                .get("MappedPipes")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    fn memory_bytes(&self) -> u64 {
        self.document
            .pointer("/VirtualMachine/ComputeTopology/Memory/SizeInMB")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .saturating_mul(1024 * 1024)
    }

    fn processor_count(&self) -> u64 {
        self.document
            .pointer("/VirtualMachine/ComputeTopology/Processor/Count")
            .and_then(Value::as_u64)
            .unwrap_or(1)
    }

    fn live(&self) -> bool {
        matches!(self.state, State::Running | State::Paused)
    }

    fn stop(&mut self, exit: Exit) -> String {
        self.state = State::Stopped;
        self.stopped_at = Some(now_100ns());
        let doc = exit.document();
        self.exit = Some(exit);
        doc
    }

    /// The basic Properties (SchemaReference.md `#Properties`) of the system.
    fn basic_properties(&self) -> serde_json::Map<String, Value> {
        let mut p = serde_json::Map::new();
        p.insert("Id".into(), json!(self.id));
        p.insert("SystemType".into(), json!("VirtualMachine"));
        p.insert("Owner".into(), json!(self.owner));
        p.insert("RuntimeId".into(), json!(self.runtime_id));
        p.insert("State".into(), json!(self.state.word()));
        p
    }
}

#[derive(Default)]
struct Inner {
    systems: BTreeMap<String, Record>,
    /// Open HCS_SYSTEM handles per system id, in this process.
    handles: HashMap<String, usize>,
}

/// The service's state. See the module documentation.
pub struct Store {
    dir: Option<PathBuf>,
    inner: Mutex<Inner>,
    changed: Condvar,
}

/// What a call that can stop a system returns: its outcome, and the SystemExitStatus document
/// when the system moved to Stopped.
pub type Stopping = HcsResult<Option<String>>;

fn now_100ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos() / 100).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// RFC 3339 UTC ("2024-05-01T12:34:56.1234567Z") for a time in 100 ns units since the epoch.
pub fn format_datetime(t: u64) -> String {
    let secs = t / 10_000_000;
    let frac = t % 10_000_000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{frac:07}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// A fresh RuntimeId: a version-4-shaped GUID from the time, the process id and a counter.
pub fn new_guid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    fn mix(mut z: u64) -> u64 {
        // splitmix64 finaliser
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ n.rotate_left(17);
    let a = mix(seed);
    let b = mix(a ^ n);
    let b = (b & !0xC000_0000_0000_0000) | 0x8000_0000_0000_0000;
    let a = (a & !0xF000) | 0x4000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xFFFF,
        a & 0xFFFF,
        b >> 48,
        b & 0xFFFF_FFFF_FFFF
    )
}

fn io_error(what: &str, e: &std::io::Error) -> HcsError {
    let hr = match e.kind() {
        std::io::ErrorKind::NotFound => E_PATH_NOT_FOUND,
        std::io::ErrorKind::AlreadyExists => E_FILE_EXISTS,
        _ => E_FAIL,
    };
    HcsError::new(hr, format!("{what}: {e}"))
}

fn not_found(id: &str) -> HcsError {
    HcsError::new(
        HCS_E_SYSTEM_NOT_FOUND,
        format!("compute system {id:?} does not exist"),
    )
}

fn invalid_state(id: &str, state: State, call: &str, needs: &str) -> HcsError {
    HcsError::new(
        HCS_E_INVALID_STATE,
        format!(
            "compute system {id:?} is {}; {call} needs it {needs}",
            state.word()
        ),
    )
}

fn parse_json(what: &str, text: &str) -> HcsResult<Value> {
    serde_json::from_str(text)
        .map_err(|e| HcsError::new(HCS_E_INVALID_JSON, format!("{what} is not JSON: {e}")))
}

/// Parses an optional options/query document: absent or empty text is `None`.
fn parse_optional(what: &str, schema_name: &str, text: Option<&str>) -> HcsResult<Option<Value>> {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => {
            let v = parse_json(what, t)?;
            schema::validate(schema_name, &v, "")
                .map_err(|o| HcsError::new(HCS_E_INVALID_JSON, format!("{schema_name}: {o}")))?;
            Ok(Some(v))
        }
    }
}

/// Options documented as "Reserved for future use. Must be NULL." (empty text is let through).
fn reserved_options(call: &str, text: Option<&str>) -> HcsResult<()> {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(()),
        Some(_) => Err(HcsError::new(
            E_INVALIDARG,
            format!("{call}: options are reserved and must be NULL"),
        )),
    }
}

/// Checks a ComputeSystem configuration as HcsCreateComputeSystem would.
pub fn check_configuration(config: &Value) -> HcsResult<()> {
    let invalid = |m: String| HcsError::new(HCS_E_INVALID_JSON, m);
    schema::validate("ComputeSystem", config, "")
        .map_err(|o| invalid(format!("ComputeSystem: {o}")))?;
    let Some(version) = config.get("SchemaVersion") else {
        return Err(invalid(
            "SchemaVersion: required (Major 2, Minor >= 1)".into(),
        ));
    };
    let major = version.get("Major").and_then(Value::as_u64);
    let minor = version.get("Minor").and_then(Value::as_u64);
    if major != Some(2) || minor.is_none_or(|m| m < 1) {
        return Err(invalid(format!(
            "SchemaVersion: {version} is not a supported schema version (Major 2, Minor >= 1)"
        )));
    }
    if config.get("Container").is_some() || config.get("HostedSystem").is_some() {
        return Err(HcsError::new(
            E_NOTIMPL,
            "ComputeSystem: the emulator only emulates virtual machines (Container and HostedSystem are not emulated)",
        ));
    }
    if config.get("VirtualMachine").is_none() {
        return Err(invalid("VirtualMachine: required".into()));
    }
    if let Some(t) = config
        .pointer("/VirtualMachine/RestoreState/TemplateSystemId")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        return Err(HcsError::new(
            E_NOTIMPL,
            format!(
                "VirtualMachine.RestoreState.TemplateSystemId: cloning from template {t:?} is not emulated"
            ),
        ));
    }
    Ok(())
}

/// Reads a saved-state file written by [`Store::save`]; returns the saved document.
fn read_saved_state(path: &str) -> HcsResult<Value> {
    let where_ = "VirtualMachine.RestoreState.SaveStateFilePath";
    let text = std::fs::read_to_string(path).map_err(|e| {
        let hr = if e.kind() == std::io::ErrorKind::NotFound {
            E_FILE_NOT_FOUND
        } else {
            E_FAIL
        };
        HcsError::new(hr, format!("{where_}: cannot read {path:?}: {e}"))
    })?;
    let saved: Value = serde_json::from_str(&text).map_err(|_| {
        HcsError::new(
            E_INVALID_DATA,
            format!("{where_}: {path:?} is not a saved state written by this emulator"),
        )
    })?;
    if saved.get("Marker").and_then(Value::as_str) != Some(SAVE_MARKER) {
        return Err(HcsError::new(
            E_INVALID_DATA,
            format!("{where_}: {path:?} is not a saved state written by this emulator"),
        ));
    }
    saved
        .get("Document")
        .filter(|d| d.is_object())
        .cloned()
        .ok_or_else(|| {
            HcsError::new(
                E_INVALID_DATA,
                format!("{where_}: {path:?} holds no document"),
            )
        })
}

fn file_name(id: &str) -> String {
    let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.json")
}

impl Store {
    /// A store; with `dir`, records are also kept in that directory (created if missing).
    pub fn new(dir: Option<PathBuf>) -> Self {
        if let Some(d) = &dir {
            let _ = std::fs::create_dir_all(d);
        }
        Store {
            dir,
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
        }
    }

    /// The process-wide store's configuration: `UVMCTL_HCS_EMULATOR_DIR`, when set and not
    /// empty.
    pub fn from_env() -> Self {
        Store::new(
            std::env::var_os("UVMCTL_HCS_EMULATOR_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from),
        )
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads one record from the directory (no-op without a directory).
    fn sync(&self, inner: &mut Inner, id: &str) {
        let Some(dir) = &self.dir else { return };
        match std::fs::read_to_string(dir.join(file_name(id))) {
            Ok(text) => match serde_json::from_str::<Value>(&text)
                .ok()
                .as_ref()
                .and_then(Record::from_value)
            {
                Some(r) => {
                    inner.systems.insert(id.to_string(), r);
                }
                None => {
                    inner.systems.remove(id);
                }
            },
            Err(_) => {
                inner.systems.remove(id);
            }
        }
    }

    /// Re-reads every record from the directory.
    fn sync_all(&self, inner: &mut Inner) {
        let Some(dir) = &self.dir else { return };
        let mut systems = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') || !name.ends_with(".json") {
                    continue;
                }
                if let Some(r) = std::fs::read_to_string(e.path())
                    .ok()
                    .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                    .as_ref()
                    .and_then(Record::from_value)
                {
                    systems.insert(r.id.clone(), r);
                }
            }
        }
        inner.systems = systems;
    }

    fn persist(&self, record: &Record) -> HcsResult<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        static TMP: AtomicU64 = AtomicU64::new(0);
        let name = file_name(&record.id);
        let tmp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let text = record.to_value().to_string();
        {
            use std::io::Write;
            // Made new (a name planted there is never written through),
            // readable by its owner only.
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts
                .open(&tmp)
                .map_err(|e| io_error("writing the record", &e))?;
            f.write_all(text.as_bytes())
                .map_err(|e| io_error("writing the record", &e))?;
        }
        // On Windows a rename over a record another process is reading is
        // refused for that moment: tried again, briefly, as uvmctl does.
        let mut wait = std::time::Duration::from_millis(5);
        loop {
            match std::fs::rename(&tmp, dir.join(&name)) {
                Err(e)
                    if cfg!(windows)
                        && e.kind() == std::io::ErrorKind::PermissionDenied
                        && wait.as_millis() < 500 =>
                {
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                done => {
                    return done.map_err(|e| {
                        let _ = std::fs::remove_file(&tmp);
                        io_error("writing the record", &e)
                    });
                }
            }
        }
    }

    fn unpersist(&self, id: &str) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_file(dir.join(file_name(id)));
        }
    }

    /// Runs `f` on the (freshly re-read) record `id`, persists it if `f` succeeded, and wakes
    /// exit waiters.
    fn with_record<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Record) -> HcsResult<T>,
    ) -> HcsResult<T> {
        let mut inner = self.lock();
        self.sync(&mut inner, id);
        let record = inner.systems.get_mut(id).ok_or_else(|| not_found(id))?;
        let mut copy = record.clone();
        let out = f(&mut copy)?;
        if copy != *record {
            self.persist(&copy)?;
            *record = copy;
            self.changed.notify_all();
        }
        Ok(out)
    }

    /// HcsCreateComputeSystem. On success the caller holds one handle to the new system.
    pub fn create(&self, id: &str, configuration: &str) -> HcsResult<()> {
        let config = parse_json("configuration", configuration)?;
        let mut inner = self.lock();
        self.sync(&mut inner, id);
        if inner.systems.contains_key(id) {
            return Err(HcsError::new(
                HCS_E_SYSTEM_ALREADY_EXISTS,
                format!("a compute system with id {id:?} already exists"),
            ));
        }
        check_configuration(&config)?;
        let restore_document = match config
            .pointer("/VirtualMachine/RestoreState/SaveStateFilePath")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
        {
            Some(path) => Some(read_saved_state(path)?),
            None => None,
        };
        let record = Record {
            id: id.to_string(),
            owner: config
                .get("Owner")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            document: config,
            runtime_id: new_guid(),
            state: State::Created,
            created_at: now_100ns(),
            started_at: None,
            stopped_at: None,
            exit: None,
            peak_commit_bytes: 0,
            restore_document,
            mapped_pipes: Vec::new(),
        };
        self.persist(&record)?;
        inner.systems.insert(id.to_string(), record);
        *inner.handles.entry(id.to_string()).or_insert(0) += 1;
        self.changed.notify_all();
        Ok(())
    }

    /// HcsOpenComputeSystem: takes one more handle on `id`.
    pub fn open(&self, id: &str) -> HcsResult<()> {
        let mut inner = self.lock();
        self.sync(&mut inner, id);
        if !inner.systems.contains_key(id) {
            return Err(not_found(id));
        }
        *inner.handles.entry(id.to_string()).or_insert(0) += 1;
        Ok(())
    }

    /// HcsCloseComputeSystem: drops one handle. When it was the last one in this process, a
    /// stopped system is removed, and a system with ShouldTerminateOnLastHandleClosed is
    /// terminated (its SystemExitStatus document is returned) and removed.
    pub fn close(&self, id: &str) -> Option<String> {
        let mut inner = self.lock();
        let left = match inner.handles.get_mut(id) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left > 0 {
            return None;
        }
        inner.handles.remove(id);
        self.sync(&mut inner, id);
        let record = inner.systems.get_mut(id)?;
        let mut exited = None;
        if record.state != State::Stopped {
            let terminate = record
                .document
                .get("ShouldTerminateOnLastHandleClosed")
                .and_then(Value::as_bool)
                == Some(true);
            if !terminate {
                return None;
            }
            exited = Some(record.stop(Exit::forced()));
        }
        inner.systems.remove(id);
        self.unpersist(id);
        self.changed.notify_all();
        exited
    }

    /// The number of handles this process holds on `id`.
    pub fn handle_count(&self, id: &str) -> usize {
        self.lock().handles.get(id).copied().unwrap_or(0)
    }

    /// A copy of the record (re-read from the directory).
    pub fn record(&self, id: &str) -> Option<Record> {
        let mut inner = self.lock();
        self.sync(&mut inner, id);
        inner.systems.get(id).cloned()
    }

    /// HcsStartComputeSystem: Created → Running. A system created from a saved state runs its
    /// saved hardware (ComputeTopology and Devices of the saved document).
    pub fn start(&self, id: &str, options: Option<&str>) -> HcsResult<()> {
        reserved_options("HcsStartComputeSystem", options)?;
        self.with_record(id, |r| {
            if r.state != State::Created {
                return Err(invalid_state(id, r.state, "Start", "Created"));
            }
            if let Some(saved) = r.restore_document.take() {
                for key in ["ComputeTopology", "Devices"] {
                    if let (Some(v), Some(vm)) = (
                        saved.pointer(&format!("/VirtualMachine/{key}")),
                        r.document
                            .get_mut("VirtualMachine")
                            .and_then(Value::as_object_mut),
                    ) {
                        vm.insert(key.to_string(), v.clone());
                    }
                }
            }
            r.state = State::Running;
            r.started_at = Some(now_100ns());
            r.peak_commit_bytes = r.peak_commit_bytes.max(r.memory_bytes());
            Ok(())
        })
    }

    /// HcsShutDownComputeSystem: Running → Stopped (GracefulExit). Options: ShutdownOptions.
    pub fn shutdown(&self, id: &str, options: Option<&str>) -> Stopping {
        parse_optional("options", "ShutdownOptions", options)?;
        self.with_record(id, |r| match r.state {
            State::Running => Ok(Some(r.stop(Exit::graceful()))),
            State::Stopped => Err(HcsError::new(
                HCS_E_SYSTEM_ALREADY_STOPPED,
                format!("compute system {id:?} is already stopped"),
            )),
            s => Err(invalid_state(id, s, "ShutDown", "Running")),
        })
    }

    /// HcsTerminateComputeSystem: any state but Stopped → Stopped (ForcedExit).
    pub fn terminate(&self, id: &str, options: Option<&str>) -> Stopping {
        reserved_options("HcsTerminateComputeSystem", options)?;
        self.with_record(id, |r| match r.state {
            State::Stopped => Err(HcsError::new(
                HCS_E_SYSTEM_ALREADY_STOPPED,
                format!("compute system {id:?} is already stopped"),
            )),
            _ => Ok(Some(r.stop(Exit::forced()))),
        })
    }

    /// HcsPauseComputeSystem: Running → Paused. Options: PauseOptions.
    pub fn pause(&self, id: &str, options: Option<&str>) -> HcsResult<()> {
        parse_optional("options", "PauseOptions", options)?;
        self.with_record(id, |r| match r.state {
            State::Running => {
                r.state = State::Paused;
                Ok(())
            }
            s => Err(invalid_state(id, s, "Pause", "Running")),
        })
    }

    /// HcsResumeComputeSystem: Paused → Running.
    pub fn resume(&self, id: &str, options: Option<&str>) -> HcsResult<()> {
        reserved_options("HcsResumeComputeSystem", options)?;
        self.with_record(id, |r| match r.state {
            State::Paused => {
                r.state = State::Running;
                Ok(())
            }
            s => Err(invalid_state(id, s, "Resume", "Paused")),
        })
    }

    /// HcsSaveComputeSystem: the system must be Paused. Options: SaveOptions; SaveType defaults
    /// to ToFile, the file to SaveStateFilePath or else VirtualMachine.GuestState's
    /// RuntimeStateFilePath. The file is created new (mode 0600) and holds [`SAVE_MARKER`] and
    /// the document. ToFile leaves the system Paused; AsTemplate moves it to SavedAsTemplate.
    pub fn save(&self, id: &str, options: Option<&str>) -> HcsResult<()> {
        let options = parse_optional("options", "SaveOptions", options)?.unwrap_or(json!({}));
        let as_template = options.get("SaveType").and_then(Value::as_str) == Some("AsTemplate");
        let explicit = options
            .get("SaveStateFilePath")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        self.with_record(id, |r| {
            if r.state != State::Paused {
                return Err(HcsError::new(
                    HCS_E_INVALID_STATE,
                    format!(
                        "compute system {id:?} is {}; it can be saved only when Paused",
                        r.state.word()
                    ),
                ));
            }
            let path = explicit
                .clone()
                .or_else(|| {
                    r.document
                        .pointer("/VirtualMachine/GuestState/RuntimeStateFilePath")
                        .and_then(Value::as_str)
                        .filter(|p| !p.is_empty())
                        .map(str::to_string)
                })
                .ok_or_else(|| {
                    HcsError::new(
                        E_INVALIDARG,
                        "SaveOptions.SaveStateFilePath: no file to save to (nor VirtualMachine.GuestState.RuntimeStateFilePath)",
                    )
                })?;
            write_saved_state(&path, r)?;
            if as_template {
                r.state = State::SavedAsTemplate;
            }
            Ok(())
        })
    }

    /// HcsModifyComputeSystem: the system must be Running.
    pub fn modify(&self, id: &str, configuration: &str) -> HcsResult<()> {
        self.with_record(id, |r| {
            if r.state != State::Running {
                return Err(invalid_state(id, r.state, "Modify", "Running"));
            }
            let request = parse_json("configuration", configuration)?;
            modify::apply(&mut r.document, &mut r.mapped_pipes, &request)?;
            r.peak_commit_bytes = r.peak_commit_bytes.max(r.memory_bytes());
            Ok(())
        })
    }

    /// HcsGetComputeSystemProperties. Query: System_PropertyQuery.
    pub fn properties(&self, id: &str, query: Option<&str>) -> HcsResult<String> {
        let query = parse_optional("propertyQuery", "System_PropertyQuery", query)?;
        if query.as_ref().and_then(|q| q.get("Queries")).is_some() {
            return Err(HcsError::new(
                E_NOTIMPL,
                "System_PropertyQuery.Queries: not emulated (use PropertyTypes)",
            ));
        }
        let types: Vec<String> = query
            .as_ref()
            .and_then(|q| q.get("PropertyTypes"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let record = self.record(id).ok_or_else(|| not_found(id))?;
        let now = now_100ns();
        let mut p = record.basic_properties();
        p.insert("Stopped".into(), json!(record.state == State::Stopped));
        if let Some(exit) = &record.exit {
            p.insert("ExitType".into(), json!(exit.exit_type));
        }
        let commit = if record.live() {
            record.memory_bytes()
        } else {
            0
        };
        for t in &types {
            match t.as_str() {
                "Statistics" => {
                    let start = record.started_at.unwrap_or(record.created_at);
                    let end = record.stopped_at.unwrap_or(now);
                    let uptime = if record.started_at.is_some() {
                        end.saturating_sub(start)
                    } else {
                        0
                    };
                    // A guest that keeps a tenth of its processors busy, 70 % in user mode.
                    let total = uptime.saturating_mul(record.processor_count()) / 10;
                    let user = total / 10 * 7;
                    p.insert(
                        "Statistics".into(),
                        json!({
                            "Timestamp": format_datetime(now),
                            "ContainerStartTime": format_datetime(start),
                            "Uptime100ns": uptime,
                            "Processor": {
                                "TotalRuntime100ns": total,
                                "RuntimeUser100ns": user,
                                "RuntimeKernel100ns": total - user,
                            },
                            "Memory": {
                                "MemoryUsageCommitBytes": commit,
                                "MemoryUsageCommitPeakBytes": record.peak_commit_bytes.max(commit),
                                "MemoryUsagePrivateWorkingSetBytes": commit,
                            },
                        }),
                    );
                }
                "Memory" => {
                    p.insert(
                        "Memory".into(),
                        json!({
                            "VirtualNodeCount": 1,
                            "VirtualMachineMemory": {
                                "AssignedMemory": commit,
                                "ReservedMemory": 0,
                                "AvailableMemory": 0,
                                "AvailableMemoryBuffer": 0,
                                "SlpActive": false,
                                "BalancingEnabled": false,
                                "DmOperationInProgress": false,
                            },
                        }),
                    );
                }
                "ProcessList" => {
                    p.insert("ProcessList".into(), json!([]));
                }
                "TerminateOnLastHandleClosed" => {
                    let v = record
                        .document
                        .get("ShouldTerminateOnLastHandleClosed")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    p.insert("TerminateOnLastHandleClosed".into(), json!(v));
                }
                "SharedMemoryRegion" => {
                    p.insert("SharedMemoryRegionInfo".into(), json!([]));
                }
                "GuestConnection" => {
                    p.insert(
                        "GuestConnectionInfo".into(),
                        json!({"SupportedSchemaVersions": [{"Major": 2, "Minor": 1}], "ProtocolVersion": 4}),
                    );
                }
                // Unreachable: the query was validated against System_PropertyType.
                other => {
                    return Err(HcsError::new(
                        HCS_E_INVALID_JSON,
                        format!("PropertyTypes: {other:?} is not a System_PropertyType"),
                    ));
                }
            }
        }
        Ok(Value::Object(p).to_string())
    }

    /// HcsEnumerateComputeSystems. Query: SystemQuery (Ids, Names, Types, Owners; each given
    /// list must contain the system's value). Names match the id (the emulator's systems have
    /// no other name).
    pub fn enumerate(&self, query: Option<&str>) -> HcsResult<String> {
        let query = parse_optional("query", "SystemQuery", query)?;
        let list = |field: &str| -> Option<Vec<String>> {
            query
                .as_ref()
                .and_then(|q| q.get(field))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
        };
        let (ids, names, types, owners) =
            (list("Ids"), list("Names"), list("Types"), list("Owners"));
        let keep =
            |l: &Option<Vec<String>>, v: &str| l.as_ref().is_none_or(|l| l.iter().any(|x| x == v));
        let mut inner = self.lock();
        self.sync_all(&mut inner);
        let out: Vec<Value> = inner
            .systems
            .values()
            .filter(|r| {
                keep(&ids, &r.id)
                    && keep(&names, &r.id)
                    && keep(&types, "VirtualMachine")
                    && keep(&owners, &r.owner)
            })
            .map(|r| Value::Object(r.basic_properties()))
            .collect();
        Ok(Value::Array(out).to_string())
    }

    /// HcsWaitForComputeSystemExit: the SystemExitStatus document once `id` is Stopped, or
    /// HCS_E_OPERATION_TIMEOUT. `timeout` None waits forever. No lock is held between checks
    /// (the condition variable releases it); with a directory the record is re-read every
    /// 50 ms so that another process's change is seen. A system that vanished while waited on
    /// (another process removed it) has exited: `ExitType` "Unknown".
    pub fn wait_exit(&self, id: &str, timeout: Option<Duration>) -> HcsResult<String> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut inner = self.lock();
        let mut seen = false;
        loop {
            self.sync(&mut inner, id);
            match inner.systems.get(id) {
                Some(r) if r.state == State::Stopped => {
                    return Ok(r.exit.clone().unwrap_or_else(Exit::forced).document());
                }
                Some(_) => seen = true,
                None if seen => {
                    return Ok(json!({"Status": S_OK, "ExitType": "Unknown"}).to_string());
                }
                None => return Err(not_found(id)),
            }
            let mut wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(HcsError::new(
                            HCS_E_OPERATION_TIMEOUT,
                            format!("compute system {id:?} did not exit in time"),
                        ));
                    }
                    d - now
                }
                None => Duration::from_secs(3600),
            };
            if self.dir.is_some() {
                wait = wait.min(Duration::from_millis(50));
            }
            inner = self
                .changed
                .wait_timeout(inner, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

fn write_saved_state(path: &str, record: &Record) -> HcsResult<()> {
    let body = json!({
        "Marker": SAVE_MARKER,
        "Id": record.id,
        "SavedAt": format_datetime(now_100ns()),
        "Document": record.document,
    })
    .to_string();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let where_ = format!("SaveOptions.SaveStateFilePath {path:?}");
    let mut f = opts.open(path).map_err(|e| io_error(&where_, &e))?;
    f.write_all(body.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| io_error(&where_, &e))
}
