//! A recorded host: observed state read from a file in the spec shape (what
//! `uvmctl export` writes), with the capabilities of a named virtstack. It lets
//! CI preview a plan against a host it cannot reach. It only observes.

use crate::spec::{PowerState, SpecErrors, load_dir};
use crate::vm::VirtstackKind as Kind;
use crate::vm::{Capabilities, ObservedState, ObservedVm};
use crate::vm::{Observe, State, VmError, VmName};
use async_trait::async_trait;
use std::path::{Path, PathBuf};

/// Why a recording could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordedError {
    /// The file has spec errors (each names the file).
    #[error("{errors}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Its problems.
        errors: SpecErrors,
    },
}

/// Observed state and capabilities read from a file.
#[derive(Debug, Clone)]
pub struct Recorded {
    caps: Capabilities,
    state: ObservedState,
}

impl Recorded {
    /// Reads `path` (a file or directory of VM documents); `virtstack` names
    /// whose capabilities to assume.
    pub fn load(path: &Path, virtstack: Kind) -> Result<Self, RecordedError> {
        let caps = Capabilities::profile(virtstack);
        let loaded = load_dir(path);
        if !loaded.errors.is_empty() {
            return Err(RecordedError::Invalid {
                path: path.to_path_buf(),
                errors: SpecErrors(loaded.errors),
            });
        }
        let mut state = ObservedState::default();
        for (name, vm) in loaded.desired.vms {
            let (vm_state, managed) = match &vm.status {
                Some(s) => (s.state, s.managed),
                None => (
                    match vm.config.power_state {
                        PowerState::Running => State::Running,
                        PowerState::Paused => State::Paused,
                        PowerState::Stopped => State::Terminated,
                        PowerState::Saved => State::Saved,
                    },
                    true,
                ),
            };
            state.vms.insert(
                name,
                ObservedVm {
                    config: std::sync::Arc::unwrap_or_clone(vm.config),
                    state: vm_state,
                    managed,
                    exit_error: None,
                    memory_hotplug: None,
                },
            );
        }
        Ok(Recorded { caps, state })
    }

    /// The capabilities assumed for the recording.
    pub fn caps(&self) -> &Capabilities {
        &self.caps
    }

    /// The recorded state.
    pub fn state(&self) -> &ObservedState {
        &self.state
    }
}

#[async_trait]
impl Observe for Recorded {
    fn name(&self) -> &str {
        &self.caps.virtstack
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn list(&self) -> Result<Vec<VmName>, VmError> {
        // Names come from loaded specs, which were checked the same way.
        Ok(self
            .state
            .vms
            .keys()
            .filter_map(|n| VmName::new(n).ok())
            .collect())
    }

    async fn observe(&self, name: &VmName) -> Result<ObservedVm, VmError> {
        self.state
            .vms
            .get(name.as_str())
            .cloned()
            .ok_or_else(|| VmError::NotFound(name.to_string()))
    }
}
