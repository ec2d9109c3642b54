//! Saved plans (`plan --out FILE`, `apply FILE`): what was reviewed is what
//! runs, as Terraform's saved plans do.
//!
//! A saved plan records what its plan was computed from (a digest of each
//! VM's desired config and observed state, the virtstack and its
//! capabilities, the options) and a digest of the plan itself. `apply FILE`
//! observes again, plans again from the same spec directory, and goes on
//! only when every digest matches; the plan it then executes is the one it
//! computed, byte-identical to the reviewed one (the planner is pure), so
//! nothing in the file is ever executed or trusted as a host path.
//!
//! The file is versioned JSON (docs/plan-json.md); it is read bounded and
//! strictly (unknown fields refused).

use super::{Plan, PlanOptions};
use crate::spec::DesiredState;
use crate::vm::{Capabilities, ObservedState, ObservedVm};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The saved-plan format this build writes and reads.
pub const SAVED_PLAN_VERSION: u32 = 2;

/// What the file says it is, so a plan JSON or a spec is never taken for one.
const KIND: &str = "uvmctlSavedPlan";

/// A saved plan is read up to this size.
pub const MAX_SAVED_PLAN_BYTES: u64 = 64 << 20;

/// A plan and what it was computed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SavedPlan {
    /// Always `uvmctlSavedPlan`.
    pub kind: String,
    /// [`SAVED_PLAN_VERSION`].
    pub format_version: u32,
    /// The uvmctl that computed it: another one may plan otherwise.
    pub uvmctl_version: String,
    /// The spec directory (or file) it was planned from, absolute.
    pub dir: PathBuf,
    /// `--only`, when given.
    pub only: Vec<String>,
    /// `--prune`.
    pub prune: bool,
    /// `--allow-empty`.
    pub allow_empty: bool,
    /// `--max-prune`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prune: Option<super::prune::PruneLimit>,
    /// The virtstack's name.
    pub virtstack: String,
    /// sha256 of its capabilities.
    pub capabilities: String,
    /// Per VM, of what is planned: sha256 of its desired config and of its
    /// observed state (`None`: no spec, or not on the host).
    pub vms: BTreeMap<String, VmDigests>,
    /// sha256 of the plan (its JSON).
    pub plan: String,
    /// The plan's summary line, for whoever reads the file.
    pub summary: String,
}

/// What one VM's plan was computed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmDigests {
    /// sha256 of the desired config.
    pub desired: Option<String>,
    /// sha256 of the observed state.
    pub observed: Option<String>,
}

/// Why a saved plan cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SavedPlanError {
    /// Not a saved plan of a format this build reads.
    #[error("{}: not a uvmctl saved plan ({reason})", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// It cannot be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Larger than any saved plan.
    #[error("{}: larger than a saved plan can be", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A command-line option given beside it that it carries itself.
    #[error("a saved plan {0}")]
    Conflict(&'static str),
    /// A VM name of its `--only` is not one.
    #[error("{}: a VM name in --only is not valid", path.display())]
    InvalidOnly {
        /// The saved plan.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::vm::InvalidVmName,
    },
}

/// Whether a file starting with `bytes` is meant as a saved plan (a spec
/// file or directory is not): JSON naming the saved plan's kind.
pub fn looks_saved(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().starts_with(b"{")
        && bytes.windows(17).any(|w| w == b"\"uvmctlSavedPlan\"")
}

fn sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest_of(v: &impl Serialize) -> String {
    // Plain data always serializes; an empty digest would only ever differ.
    sha256(&serde_json::to_vec(v).unwrap_or_default())
}

fn observed_digest(vm: &ObservedVm) -> String {
    digest_of(&serde_json::json!({
        "config": vm.config,
        "state": vm.state.as_str(),
        "managed": vm.managed,
        "exitError": vm.exit_error,
        "memoryHotplug": vm.memory_hotplug,
    }))
}

/// Per VM in the plan and among the left-alone notes, the digests of what
/// it was computed from.
fn inputs(
    plan: &Plan,
    desired: &DesiredState,
    observed: &ObservedState,
) -> BTreeMap<String, VmDigests> {
    let names = plan
        .vms
        .iter()
        .map(|v| &v.name)
        .chain(plan.notes.iter().map(|n| &n.vm))
        .chain(desired.vms.keys())
        .chain(observed.vms.keys());
    names
        .map(|name| {
            (
                name.clone(),
                VmDigests {
                    desired: desired.vms.get(name).map(|d| digest_of(&*d.config)),
                    observed: observed.vms.get(name).map(observed_digest),
                },
            )
        })
        .collect()
}

impl SavedPlan {
    /// The saved form of `plan`, computed from `desired` and `observed`
    /// with `caps`, `opts` and `only`, from the specs in `dir`.
    pub fn new(
        dir: &Path,
        plan: &Plan,
        desired: &DesiredState,
        observed: &ObservedState,
        caps: &Capabilities,
        opts: &PlanOptions,
        only: &[String],
    ) -> Self {
        SavedPlan {
            kind: KIND.into(),
            format_version: SAVED_PLAN_VERSION,
            uvmctl_version: env!("CARGO_PKG_VERSION").into(),
            dir: dir.to_path_buf(),
            only: only.to_vec(),
            prune: opts.prune,
            allow_empty: opts.guard.allow_empty,
            max_prune: opts.guard.max_prune,
            virtstack: plan.virtstack.clone(),
            capabilities: digest_of(caps),
            vms: inputs(plan, desired, observed),
            plan: digest_of(plan),
            summary: super::render::summary_line(&plan.summary()),
        }
    }

    /// Parses a saved plan (`path` names it in errors).
    ///
    /// # Errors
    /// When `bytes` is not a saved plan this build reads.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, SavedPlanError> {
        let invalid = |reason: String| SavedPlanError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let saved: SavedPlan = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if saved.kind != KIND {
            return Err(invalid(format!("kind {:?}", saved.kind)));
        }
        if saved.format_version != SAVED_PLAN_VERSION {
            return Err(invalid(format!(
                "format version {}, this uvmctl reads {SAVED_PLAN_VERSION}",
                saved.format_version
            )));
        }
        Ok(saved)
    }

    /// What it was computed with replaces what a command line would give:
    /// `opts` and `only` given beside it are refused, as is a placement
    /// (a saved plan is made without one); else they become its own.
    ///
    /// # Errors
    /// [`SavedPlanError::Conflict`] for an option given beside it, and
    /// [`SavedPlanError::InvalidOnly`] for a VM name of its `only` that is
    /// not one (`file`: where the plan was read from).
    pub fn adopt(
        &self,
        file: &Path,
        opts: &mut PlanOptions,
        only: &mut Vec<crate::vm::VmName>,
        placed: bool,
    ) -> Result<(), SavedPlanError> {
        let given = opts.prune
            || opts.guard.allow_empty
            || opts.guard.max_prune.is_some()
            || !only.is_empty();
        if given {
            return Err(SavedPlanError::Conflict(
                "carries its own --only and --prune; give neither with it",
            ));
        }
        if placed {
            return Err(SavedPlanError::Conflict(
                "is made without placement; give no --selector, --for-host or --placement-path with it",
            ));
        }
        *opts = self.options();
        *only = self
            .only
            .iter()
            .map(|n| crate::vm::VmName::new(n))
            .collect::<Result<_, _>>()
            .map_err(|source| SavedPlanError::InvalidOnly {
                path: file.to_path_buf(),
                source,
            })?;
        Ok(())
    }

    /// The plan options it was computed with.
    pub fn options(&self) -> PlanOptions {
        PlanOptions {
            prune: self.prune,
            guard: super::prune::PruneGuard {
                allow_empty: self.allow_empty,
                max_prune: self.max_prune,
            },
        }
    }

    /// What differs between this saved plan and `now` (the same computation
    /// done again): one line per difference, naming the VM where it is one
    /// VM's. Empty: `now` is exactly the plan that was saved.
    pub fn stale(&self, now: &SavedPlan) -> Vec<String> {
        let mut out = Vec::new();
        if self.uvmctl_version != now.uvmctl_version {
            out.push(format!(
                "planned by uvmctl {}, applied by {}",
                self.uvmctl_version, now.uvmctl_version
            ));
        }
        if self.virtstack != now.virtstack {
            out.push(format!(
                "planned for virtstack {}, applying on {}",
                self.virtstack, now.virtstack
            ));
        } else if self.capabilities != now.capabilities {
            out.push(format!(
                "the {} virtstack's capabilities changed",
                self.virtstack
            ));
        }
        let names: std::collections::BTreeSet<&String> =
            self.vms.keys().chain(now.vms.keys()).collect();
        for name in names {
            let (was, is) = (self.vms.get(name), now.vms.get(name));
            let desired = |d: Option<&VmDigests>| d.and_then(|d| d.desired.clone());
            let observed = |d: Option<&VmDigests>| d.and_then(|d| d.observed.clone());
            if desired(was) != desired(is) {
                out.push(format!("{name}: its spec changed"));
            }
            if observed(was) != observed(is) {
                out.push(format!("{name}: the VM changed on the host"));
            }
        }
        if out.is_empty() && self.plan != now.plan {
            out.push("the plan computed now differs from the saved one".into());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{base, desired};
    use crate::vm::{HostFacts, State};

    fn observed(vms: &[(&str, crate::spec::VmConfig)]) -> ObservedState {
        let mut o = ObservedState::default();
        for (name, config) in vms {
            o.vms.insert(
                name.to_string(),
                ObservedVm {
                    config: config.clone(),
                    state: State::Running,
                    managed: true,
                    exit_error: None,
                    memory_hotplug: None,
                },
            );
        }
        o
    }

    fn saved(d: &DesiredState, o: &ObservedState) -> SavedPlan {
        let caps = Capabilities::qemu(&HostFacts::default());
        let opts = PlanOptions::default();
        let p = crate::plan::plan(d, o, &caps, &opts);
        SavedPlan::new(Path::new("/specs"), &p, d, o, &caps, &opts, &[])
    }

    #[test]
    fn the_same_inputs_give_the_same_saved_plan_and_a_change_names_its_vm() {
        let mut big = base("web");
        big.memory.size_mb = 512;
        let d = desired(&[("web", big.clone()), ("db", base("db"))]);
        let o = observed(&[("web", base("web")), ("db", base("db"))]);
        let s = saved(&d, &o);
        assert!(s.stale(&saved(&d, &o)).is_empty());

        let text = serde_json::to_vec(&s).expect("json");
        let back = SavedPlan::parse(Path::new("p.json"), &text).expect("parses");
        assert_eq!(back, s);

        let mut drifted = base("db");
        drifted.processors.count = 2;
        let o2 = observed(&[("web", base("web")), ("db", drifted)]);
        assert_eq!(s.stale(&saved(&d, &o2)), ["db: the VM changed on the host"]);
        big.memory.size_mb = 1024;
        let d2 = desired(&[("web", big), ("db", base("db"))]);
        assert_eq!(s.stale(&saved(&d2, &o)), ["web: its spec changed"]);
    }

    #[test]
    fn another_virtstack_other_capabilities_or_another_uvmctl_each_say_so() {
        let d = desired(&[("web", base("web"))]);
        let o = observed(&[("web", base("web"))]);
        let s = saved(&d, &o);
        let opts = PlanOptions::default();
        let caps = Capabilities::qemu(&HostFacts {
            vhost_user_vsock: true,
            ..HostFacts::default()
        });
        let p = crate::plan::plan(&d, &o, &caps, &opts);
        let other_caps = SavedPlan::new(Path::new("/specs"), &p, &d, &o, &caps, &opts, &[]);
        assert_eq!(
            s.stale(&other_caps),
            ["the qemu virtstack's capabilities changed"]
        );
        let hcs = Capabilities::hcs();
        let p = crate::plan::plan(&d, &o, &hcs, &opts);
        let other_stack = SavedPlan::new(Path::new("/specs"), &p, &d, &o, &hcs, &opts, &[]);
        assert!(
            s.stale(&other_stack)
                .contains(&"planned for virtstack qemu, applying on hcs".to_string()),
            "{:?}",
            s.stale(&other_stack)
        );
        let mut newer = saved(&d, &o);
        newer.uvmctl_version = "9.9.9".into();
        assert_eq!(
            s.stale(&newer),
            [format!(
                "planned by uvmctl {}, applied by 9.9.9",
                env!("CARGO_PKG_VERSION")
            )]
        );
    }

    #[test]
    fn only_saved_plans_of_this_format_are_read() {
        let p = Path::new("p.json");
        assert!(SavedPlan::parse(p, b"{}").is_err());
        assert!(SavedPlan::parse(p, b"{\"formatVersion\": 1, \"vms\": []}").is_err());
        let d = desired(&[("web", base("web"))]);
        let mut s = saved(&d, &ObservedState::default());
        s.format_version = 99;
        let text = serde_json::to_vec(&s).expect("json");
        let err = SavedPlan::parse(p, &text).expect_err("newer format");
        assert!(err.to_string().contains("format version 99"), "{err}");
        let mut v: serde_json::Value =
            serde_json::to_value(saved(&d, &ObservedState::default())).expect("json");
        v["extra"] = serde_json::json!(1);
        assert!(SavedPlan::parse(p, v.to_string().as_bytes()).is_err());
    }
}
