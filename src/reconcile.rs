//! The pipeline every command shares: load → observe → plan → (pre-flight,
//! execute). `plan`, `apply` and, later, `watch` are this plus their edges.
//!
//! # Guarantees
//! - One VM that cannot be observed (hung or closed control channel, corrupt
//!   record, dead process) becomes *unknown* with its reason; every other VM
//!   is observed, planned and applied. Observation runs concurrently with a
//!   deadline per VM, so a host with a stuck VM answers within one deadline.
//! - Blocking work (reading the spec directory) runs off the async workers.

use crate::plan::{self, Plan, PlanOptions};
use crate::spec::{self, Loaded};
use crate::vm::{Chain, Observe, ObservedState, VmError};
use std::path::PathBuf;
use std::time::Duration;

/// How long observing one VM may take before it counts as unknown. Above the
/// QMP deadline (10 s), so a VM that answers slowly is still seen.
pub const OBSERVE_DEADLINE: Duration = Duration::from_secs(12);

/// Loads a spec directory on the blocking pool (it reads many files).
pub async fn load(dir: PathBuf) -> Loaded {
    let shown = dir.clone();
    tokio::task::spawn_blocking(move || spec::load_dir(&dir))
        .await
        .unwrap_or_else(|e| Loaded {
            desired: Default::default(),
            errors: vec![spec::SpecError::whole_file(
                &shown,
                format!("loading failed: {e}"),
            )],
        })
}

/// Observes every VM the virtstack manages, each on its own with
/// [`OBSERVE_DEADLINE`]: a VM that fails is recorded as unknown, with why.
///
/// # Errors
/// Only when the virtstack cannot even list its VMs.
pub async fn observe_all(vs: &dyn Observe) -> Result<ObservedState, VmError> {
    observe_all_within(vs, OBSERVE_DEADLINE).await
}

/// [`observe_all`] with another deadline per VM.
pub async fn observe_all_within(
    vs: &dyn Observe,
    deadline: Duration,
) -> Result<ObservedState, VmError> {
    let names = vs.list().await?;
    let each = names.iter().map(|name| async move {
        let seen = tokio::time::timeout(deadline, vs.observe(name)).await;
        (name, seen)
    });
    let mut out = ObservedState::default();
    for (name, seen) in futures_util::future::join_all(each).await {
        match seen {
            Ok(Ok(vm)) => {
                out.vms.insert(name.to_string(), vm);
            }
            Ok(Err(e)) => {
                out.unknown.insert(name.to_string(), Chain(&e).to_string());
            }
            Err(_) => {
                out.unknown
                    .insert(name.to_string(), format!("no answer within {deadline:?}"));
            }
        }
    }
    Ok(out)
}

/// Loads, observes and plans: what `plan` shows and `apply` starts from.
pub async fn plan_dir(
    dir: PathBuf,
    vs: &dyn Observe,
    opts: &PlanOptions,
) -> Result<(Loaded, ObservedState, Plan), VmError> {
    let loaded = load(dir).await;
    let observed = observe_all(vs).await?;
    let the_plan = plan::plan(&loaded.desired, &observed, vs.capabilities(), opts);
    Ok((loaded, observed, the_plan))
}
