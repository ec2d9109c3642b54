//! What `plan` and `apply` share: the options they turn into the
//! library's, and how they print spec errors and refusals.

use super::args::{Color, MaxDisruption, PlanCommon};
use std::io::IsTerminal;
use uvmctl::plan::hold::Limits;
use uvmctl::plan::saved::SavedPlan;
use uvmctl::plan::{PlanOptions, render};
use uvmctl::reconcile;
use uvmctl::spec::Loaded;
use uvmctl::vm::{Disruption, Virtstack, VmName};

impl From<MaxDisruption> for Disruption {
    fn from(m: MaxDisruption) -> Self {
        match m {
            MaxDisruption::Live => Disruption::Live,
            MaxDisruption::Restart => Disruption::Restart,
            MaxDisruption::Recreate => Disruption::Recreate,
        }
    }
}

impl Color {
    pub fn style(self) -> render::Style {
        render::Style {
            color: match self {
                Color::Always => true,
                Color::Never => false,
                Color::Auto => {
                    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
                }
            },
        }
    }
}

pub fn print_errors(loaded: &Loaded) {
    for e in &loaded.errors {
        eprintln!("{e}");
    }
    if !loaded.errors_elsewhere.is_empty() {
        eprintln!(
            "{} spec error(s) in files whose VMs are all other hosts': not this host's concern (uvmctl validate lists them)",
            loaded.errors_elsewhere.len()
        );
    }
}

pub fn plan_options(common: &PlanCommon) -> PlanOptions {
    PlanOptions {
        prune: common.prune,
        guard: uvmctl::plan::prune::PruneGuard {
            allow_empty: common.allow_empty,
            max_prune: common.max_prune,
        },
    }
}

pub fn limits(common: &PlanCommon) -> Limits {
    Limits {
        max_disruption: common.max_disruption.map(Disruption::from),
        ..Limits::default()
    }
}

pub fn print_refused(refused: &[uvmctl::plan::Refused]) {
    for r in refused {
        eprintln!("{r}");
    }
}

/// The saved form of `planned`, as computed on `vs` with `opts` and `only`.
pub fn saved_plan(
    dir: &std::path::Path,
    planned: &reconcile::Planned,
    vs: &dyn Virtstack,
    opts: &PlanOptions,
    only: &[VmName],
) -> SavedPlan {
    let only: Vec<String> = only.iter().map(ToString::to_string).collect();
    let (plan, desired, observed) = (&planned.plan, &planned.loaded.desired, &planned.observed);
    SavedPlan::new(dir, plan, desired, observed, vs.capabilities(), opts, &only)
}

/// Now, in seconds since the epoch (the maintenance windows' clock).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
