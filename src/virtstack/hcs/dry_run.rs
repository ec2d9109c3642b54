//! The HCS calls a plan would make, without HCS: a [`Recorder`] stands
//! where computecore.dll would, answering as a host that has the observed
//! VMs, and keeps every call that changes a compute system, in order, with
//! its documents. `uvmctl plan --hcs-requests` applies the plan through the
//! real hcs virtstack over it, so what is printed is what that code sends.

use super::api::{ComputeService, HcsError, Verb, hr};
use super::documents::OWNER;
use super::{Hcs, HcsRecord, system_id};
use crate::virtstack::ObservedState;
use crate::vm::{State, VmError, VmName};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// A stand-in compute service that records what it is asked.
#[derive(Default)]
pub struct Recorder {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Compute systems by id, with their HCS state.
    systems: BTreeMap<String, &'static str>,
    calls: Vec<Value>,
}

fn parsed(doc: &str) -> Value {
    serde_json::from_str(doc).unwrap_or_else(|_| Value::String(doc.to_string()))
}

fn failure(call: &'static str, id: &str, hresult: i32) -> HcsError {
    HcsError {
        call,
        id: id.to_string(),
        hresult,
        message: None,
    }
}

impl Recorder {
    /// A host with no compute system.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Gives the host a compute system in `state` (`Created`, `Running`,
    /// `Paused`), as observed.
    pub fn seed(&self, id: &str, state: &'static str) {
        self.lock().systems.insert(id.to_string(), state);
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<Value> {
        self.lock().calls.clone()
    }
}

/// Why a dry run could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DryRunError {
    /// Its records directory cannot be made.
    #[error("cannot make the dry run's records in {}", path.display())]
    Records {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An observed VM cannot be recorded.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// The hcs virtstack over a new [`Recorder`] that answers as a host with
/// the `observed` VMs: what `plan --hcs-requests` applies a plan through.
/// Its records go to `records` (a scratch directory of the caller's); a
/// saved VM is restored from where the host of `state_dir` keeps it.
///
/// # Errors
/// When the records cannot be written.
pub fn seeded(
    observed: &ObservedState,
    records: &Path,
    state_dir: &Path,
    allow_roots: &[PathBuf],
) -> Result<(Hcs, Arc<Recorder>), DryRunError> {
    let recorder = Arc::new(Recorder::default());
    let hcs = Hcs::new(recorder.clone(), records, allow_roots);
    Hcs::ensure_dir(records).map_err(|source| DryRunError::Records {
        path: records.to_path_buf(),
        source,
    })?;
    for (name, vm) in &observed.vms {
        let Ok(name) = VmName::new(name) else {
            continue;
        };
        let state = match vm.state {
            State::Created => Some("Created"),
            State::Running => Some("Running"),
            State::Paused => Some("Paused"),
            _ => None,
        };
        if let Some(state) = state {
            recorder.seed(&system_id(&name), state);
        }
        let saved = (vm.state == State::Saved).then(|| Hcs::save_file(state_dir, &name));
        let rec = HcsRecord {
            config: vm.config.clone(),
            saved,
            history: Default::default(),
        };
        hcs.adopt(&name, &rec)?;
    }
    Ok((hcs, recorder))
}

/// The calls `recorder` kept, each VM's in its own order (VMs are applied
/// side by side, so their calls interleave).
pub fn calls_by_vm(recorder: &Recorder) -> Vec<Value> {
    let mut calls = recorder.calls();
    calls.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    calls
}

impl ComputeService for Recorder {
    fn create(&self, id: &str, document: &str) -> Result<(), HcsError> {
        let mut inner = self.lock();
        if inner.systems.contains_key(id) {
            return Err(failure(
                "HcsCreateComputeSystem",
                id,
                hr::HCS_E_SYSTEM_ALREADY_EXISTS,
            ));
        }
        inner.systems.insert(id.to_string(), "Created");
        inner.calls.push(json!({
            "call": "HcsCreateComputeSystem",
            "id": id,
            "configuration": parsed(document),
        }));
        Ok(())
    }

    fn lifecycle(&self, id: &str, verb: Verb, options: Option<&str>) -> Result<(), HcsError> {
        let mut inner = self.lock();
        let Some(state) = inner.systems.get(id).copied() else {
            return Err(failure(verb.call(), id, hr::HCS_E_SYSTEM_NOT_FOUND));
        };
        let next = match (verb, state) {
            (Verb::Start, "Created") | (Verb::Resume, "Paused") => "Running",
            (Verb::Pause, "Running") => "Paused",
            (Verb::Save, "Paused") => "Paused",
            (Verb::ShutDown, "Running") => "Stopped",
            (Verb::Terminate, "Stopped") => {
                // Gone with the caller's handle, as on HCS.
                inner.systems.remove(id);
                return Err(failure(verb.call(), id, hr::HCS_E_SYSTEM_ALREADY_STOPPED));
            }
            (Verb::Terminate, _) => "Stopped",
            _ => return Err(failure(verb.call(), id, hr::HCS_E_INVALID_STATE)),
        };
        if verb == Verb::Terminate {
            inner.systems.remove(id);
        } else {
            inner.systems.insert(id.to_string(), next);
        }
        let mut call = json!({ "call": verb.call(), "id": id });
        if let Some(o) = options {
            call["options"] = parsed(o);
        }
        inner.calls.push(call);
        Ok(())
    }

    fn modify(&self, id: &str, request: &str) -> Result<(), HcsError> {
        let mut inner = self.lock();
        if !inner.systems.contains_key(id) {
            return Err(failure(
                "HcsModifyComputeSystem",
                id,
                hr::HCS_E_SYSTEM_NOT_FOUND,
            ));
        }
        inner.calls.push(json!({
            "call": "HcsModifyComputeSystem",
            "id": id,
            "configuration": parsed(request),
        }));
        Ok(())
    }

    fn properties(&self, id: &str, _query: &str) -> Result<String, HcsError> {
        let inner = self.lock();
        let state = inner.systems.get(id).ok_or_else(|| {
            failure(
                "HcsGetComputeSystemProperties",
                id,
                hr::HCS_E_SYSTEM_NOT_FOUND,
            )
        })?;
        Ok(
            json!({ "Id": id, "Owner": OWNER, "State": state, "SystemType": "VirtualMachine" })
                .to_string(),
        )
    }

    fn wait_exit(&self, id: &str, _timeout: Duration) -> Result<bool, HcsError> {
        Ok(self.lock().systems.get(id).is_none_or(|s| *s == "Stopped"))
    }
}
