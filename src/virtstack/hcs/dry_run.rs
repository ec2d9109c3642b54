//! The HCS calls a plan would make, without HCS: a [`Recorder`] stands
//! where computecore.dll would, answering as a host that has the observed
//! VMs, and keeps every call that changes a compute system, in order, with
//! its documents. `uvmctl plan --hcs-requests` applies the plan through the
//! real hcs virtstack over it, so what is printed is what that code sends.

use super::api::{ComputeService, HcsError, Verb, hr};
use super::documents::OWNER;
use serde_json::{Value, json};
use std::collections::BTreeMap;
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
