//! The disruption rule, coded once: which planned changes of a VM a run may
//! make. `plan` reports it, `apply` stops on it before anything changes, the
//! executor checks it again per VM, and `watch` holds what it forbids.

use super::{Op, VmAction, VmPlan};
use crate::spec::policy::{WindowClass, WindowGate};
use crate::vm::Disruption;

/// What a run may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Changes more disruptive than this are held (`--max-disruption`);
    /// `None`: no ceiling.
    pub max_disruption: Option<Disruption>,
    /// Recreate whatever the spec's policy says (`--allow-recreate`).
    pub allow_recreate: bool,
    /// Report only: nothing is executed (`watch --detect-only`).
    pub detect_only: bool,
    /// A prune is allowed by `--prune` itself, whatever the ceiling (a
    /// watcher's, whose ceiling is for changes); else a destroy counts as
    /// the recreate it is (`plan` and `apply --max-disruption`).
    pub prune_past_ceiling: bool,
    /// What the maintenance windows allow this VM now (`None`: no policy,
    /// or `--ignore-windows`).
    pub window: Option<WindowGate>,
}

/// Why a VM's planned changes are not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The run only reports.
    DetectOnly,
    /// It must be recreated, and neither its spec's policy
    /// (`policy.allowRecreate`) nor `--allow-recreate` allows it.
    RecreateNotAllowed,
    /// It needs more than the ceiling allows.
    AboveCeiling {
        /// What the VM's plan needs.
        needs: Disruption,
        /// The ceiling.
        limit: Disruption,
    },
    /// Its changes are of a class no maintenance window governing it has
    /// open now.
    OutsideWindow {
        /// What the VM's plan needs.
        needs: Disruption,
        /// When one opens next (seconds since the epoch); `None`: never.
        next_open: Option<i64>,
        /// The policy file does not load: every disruptive change waits.
        broken: bool,
    },
}

/// A time as holds say it: RFC 3339, UTC.
pub fn utc(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0).map_or_else(
        || t.to_string(),
        |d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hold::DetectOnly => {
                f.write_str("detect-only: reported, not executed (watch --detect-only)")
            }
            Hold::RecreateNotAllowed => f.write_str(
                "needs a recreate, which its spec's policy does not allow (policy.allowRecreate)",
            ),
            Hold::AboveCeiling { needs, limit } => {
                write!(f, "needs {needs}, above --max-disruption {limit}")
            }
            Hold::OutsideWindow { broken: true, .. } => write!(
                f,
                "{} does not load: restarts and recreates wait until it does",
                crate::spec::policy::POLICY_FILE
            ),
            Hold::OutsideWindow {
                needs,
                next_open: Some(t),
                ..
            } => write!(
                f,
                "needs {needs}: outside window, next opens at {}",
                utc(*t)
            ),
            Hold::OutsideWindow { needs, .. } => {
                write!(
                    f,
                    "needs {needs}: outside window, and none governing it opens again"
                )
            }
        }
    }
}

/// Every reason `vm`'s plan may not be carried out under `limits`, most
/// telling first (an empty list: it may).
pub fn holds(vm: &VmPlan, limits: &Limits) -> Vec<Hold> {
    let mut out = Vec::new();
    if limits.detect_only {
        out.push(Hold::DetectOnly);
    }
    if vm.action == VmAction::Destroy && limits.prune_past_ceiling {
        return out;
    }
    if vm.action == VmAction::Recreate
        && !(limits.allow_recreate || vm.recreate_allowed == Some(true))
    {
        out.push(Hold::RecreateNotAllowed);
    }
    if let Some(limit) = limits.max_disruption
        && vm.disruption > limit
    {
        out.push(Hold::AboveCeiling {
            needs: vm.disruption,
            limit,
        });
    }
    // A VM's changes go together: any of them whose class is closed holds
    // them all (the most disruptive such says when). A prune is
    // `--prune`'s to allow.
    let changes = !vm.ops.is_empty() || vm.action != VmAction::Update;
    if let Some(gate) = limits.window
        && vm.action != VmAction::Destroy
        && changes
        && let Some((needs, class)) = vm
            .ops
            .iter()
            .map(|o| o.disruption)
            .chain([vm.disruption])
            .filter_map(|d| window_class(d).map(|c| (d, c)))
            .filter(|(_, c)| gate.holds(*c))
            .max_by_key(|(d, _)| *d)
    {
        out.push(Hold::OutsideWindow {
            needs,
            next_open: gate.opens(class),
            broken: gate.broken,
        });
    }
    out
}

/// The window class of a disruption (none for what cannot be done).
fn window_class(d: Disruption) -> Option<WindowClass> {
    match d {
        Disruption::Live => Some(WindowClass::Live),
        Disruption::Restart => Some(WindowClass::Restart),
        Disruption::Recreate => Some(WindowClass::Recreate),
        Disruption::Unsupported => None,
    }
}

/// The first of [`holds`]: what a watcher says of a VM it holds.
pub fn hold(vm: &VmPlan, limits: &Limits) -> Option<Hold> {
    holds(vm, limits).into_iter().next()
}

/// A held VM's lines for the status file and the log: each operation, then
/// why (the last line).
pub fn held_lines(vm: &VmPlan, why: Hold) -> Vec<String> {
    let mut lines: Vec<String> = vm.ops.iter().map(op_line).collect();
    if vm.action == VmAction::Destroy {
        lines.push("destroy: no spec names it (a prune)".into());
    }
    lines.push(why.to_string());
    lines
}

fn op_line(op: &Op) -> String {
    let key = op.key.to_string();
    let mut line = format!("{} {}", op.operation, op.resource);
    if !key.is_empty() {
        line.push_str(&format!(" {key}"));
    }
    line.push_str(&format!(": {}", op.disruption));
    if !op.reason.is_empty() {
        line.push_str(&format!(" ({})", op.reason));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(action: VmAction, disruption: Disruption, recreate_allowed: Option<bool>) -> VmPlan {
        VmPlan {
            name: "a".into(),
            action,
            disruption,
            recreate_allowed,
            ops: Vec::new(),
            spec: None,
            observed: None,
        }
    }

    const LIVE: Limits = Limits {
        max_disruption: Some(Disruption::Live),
        allow_recreate: false,
        detect_only: false,
        prune_past_ceiling: false,
        window: None,
    };

    #[test]
    fn a_change_within_the_ceiling_goes_one_above_it_is_held() {
        let restart = vm(VmAction::Update, Disruption::Restart, None);
        assert_eq!(
            holds(&restart, &LIVE),
            [Hold::AboveCeiling {
                needs: Disruption::Restart,
                limit: Disruption::Live
            }]
        );
        let limits = Limits {
            max_disruption: Some(Disruption::Restart),
            ..LIVE
        };
        assert!(holds(&restart, &limits).is_empty());
        assert!(holds(&restart, &Limits::default()).is_empty());
    }

    #[test]
    fn a_recreate_needs_the_policy_or_the_flag() {
        let open = Limits::default();
        let refused = vm(VmAction::Recreate, Disruption::Recreate, Some(false));
        assert_eq!(holds(&refused, &open), [Hold::RecreateNotAllowed]);
        let flag = Limits {
            allow_recreate: true,
            ..open
        };
        assert!(holds(&refused, &flag).is_empty());
        let allowed = vm(VmAction::Recreate, Disruption::Recreate, Some(true));
        assert!(holds(&allowed, &open).is_empty());
        // Both reasons, the policy's first: it names what to change.
        assert_eq!(
            hold(&refused, &LIVE),
            Some(Hold::RecreateNotAllowed),
            "{:?}",
            holds(&refused, &LIVE)
        );
        assert_eq!(holds(&refused, &LIVE).len(), 2);
    }

    #[test]
    fn a_prune_counts_as_a_recreate_unless_prune_alone_allows_it() {
        let destroy = vm(VmAction::Destroy, Disruption::Recreate, None);
        assert_eq!(
            holds(&destroy, &LIVE),
            [Hold::AboveCeiling {
                needs: Disruption::Recreate,
                limit: Disruption::Live
            }]
        );
        let watcher = Limits {
            prune_past_ceiling: true,
            ..LIVE
        };
        assert!(holds(&destroy, &watcher).is_empty());
    }

    /// Issue 35: a closed window holds the classes it governs, says when
    /// it opens, and leaves what has nothing to do or is a prune alone.
    #[test]
    fn a_closed_window_holds_its_classes_and_says_when_it_opens() {
        let mut restart = vm(VmAction::Update, Disruption::Restart, None);
        restart.ops.push(Op {
            resource: crate::plan::ResourceKind::Plan9Share,
            operation: crate::vm::ResourceOperation::Add,
            key: crate::plan::ItemKey::Unit,
            disruption: Disruption::Restart,
            reason: String::new(),
            before: None,
            after: None,
        });
        let closed = Limits {
            window: Some(WindowGate {
                closed: [false, true, true],
                next_open: [None, Some(1_796_610_600), Some(1_796_610_600)],
                broken: false,
            }),
            ..Limits::default()
        };
        let held = hold(&restart, &closed).expect("held");
        assert_eq!(
            held.to_string(),
            "needs restart: outside window, next opens at 2026-12-07T02:30:00Z"
        );
        // Live goes; a VM with nothing to do or only a prune is not held.
        let mut live = restart.clone();
        live.disruption = Disruption::Live;
        live.ops[0].disruption = Disruption::Live;
        assert!(holds(&live, &closed).is_empty());
        // A restart among a VM's changes holds its live ones too.
        let mut both = live.clone();
        both.ops.push(restart.ops[0].clone());
        assert_eq!(
            hold(&both, &closed).map(|h| h.to_string()),
            Some("needs restart: outside window, next opens at 2026-12-07T02:30:00Z".into())
        );
        assert!(holds(&vm(VmAction::Update, Disruption::Restart, None), &closed).is_empty());
        assert!(holds(&vm(VmAction::Destroy, Disruption::Recreate, None), &closed).is_empty());
        let broken = Limits {
            window: Some(WindowGate {
                closed: [false, true, true],
                next_open: [None; 3],
                broken: true,
            }),
            ..Limits::default()
        };
        assert_eq!(
            hold(&restart, &broken).expect("held").to_string(),
            "uvmctl-policy.yaml does not load: restarts and recreates wait until it does"
        );
    }

    #[test]
    fn detect_only_holds_everything() {
        let destroy = vm(VmAction::Destroy, Disruption::Recreate, None);
        let detect = Limits {
            detect_only: true,
            ..Limits::default()
        };
        assert_eq!(hold(&destroy, &detect), Some(Hold::DetectOnly));
        let lines = held_lines(&destroy, Hold::DetectOnly);
        assert_eq!(
            lines,
            [
                "destroy: no spec names it (a prune)",
                "detect-only: reported, not executed (watch --detect-only)"
            ]
        );
        let live = vm(VmAction::Update, Disruption::Live, None);
        assert_eq!(hold(&live, &detect), Some(Hold::DetectOnly));
    }
}
