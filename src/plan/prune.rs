//! The prune guard: a prune that would remove every VM of this host, or
//! more than `--max-prune`, is refused whole (issue 30: a misspelt `-l`
//! selector pruned a host). Argo CD's `allowEmpty` is the anchor: syncing
//! to nothing is refused unless asked for. `plan`, `apply` and `watch`
//! share this one rule; it is pure, over counts.

use super::{NoteKind, Plan, VmAction};
use serde::{Deserialize, Serialize};

/// How many VMs one prune may remove: a count, or a share of this host's
/// managed VMs (`--max-prune 2`, `--max-prune 25%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PruneLimit {
    /// At most this many VMs.
    Count(u32),
    /// At most this percentage (0–100) of the VMs a prune could remove,
    /// rounded down (25% of 3 VMs allows none).
    Percent(u8),
}

impl std::fmt::Display for PruneLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PruneLimit::Count(n) => write!(f, "{n}"),
            PruneLimit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for PruneLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("{s:?}: give a number of VMs (3) or a percentage of this host's (25%)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= 100 => Ok(PruneLimit::Percent(p)),
                _ => Err(bad()),
            },
            None => s.parse().map(PruneLimit::Count).map_err(|_| bad()),
        }
    }
}

impl PruneLimit {
    /// Whether removing `n` of `host` VMs stays within the limit.
    pub fn allows(self, n: usize, host: usize) -> bool {
        match self {
            PruneLimit::Count(max) => n <= max as usize,
            // n / host <= p / 100, in integers.
            PruneLimit::Percent(p) => n * 100 <= usize::from(p) * host,
        }
    }
}

/// What a prune may do beyond `--prune` itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneGuard {
    /// Remove every VM of this host, if that is what the specs say
    /// (`--allow-empty`).
    pub allow_empty: bool,
    /// The most one prune may remove (`--max-prune`); none: any number
    /// short of every VM.
    pub max_prune: Option<PruneLimit>,
}

/// What the specs selected for this host, for saying why a prune is
/// refused: the selection that chose nothing is the likeliest typo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// VMs the specs place on this host (broken specs included).
    pub here: usize,
    /// VMs whose valid specs place them on other hosts.
    pub elsewhere: usize,
    /// The placement that chose (`selector tier=dns`), if any.
    pub by: Option<String>,
}

/// Why a prune was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneRefusal {
    /// The VMs it would have removed, by name.
    pub removing: Vec<String>,
    /// The VMs of this host a prune could remove.
    pub host_vms: usize,
    /// The limit it broke (none: it would have emptied the host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_prune: Option<String>,
    /// The sentence for people.
    pub message: String,
}

impl std::fmt::Display for PruneRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The first names of `names`, for a message (a fleet host may have
/// hundreds).
fn some_names(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// Checks a prune of `removing` on a host with `host_vms` VMs a prune
/// could remove (managed, observed, not protected).
///
/// # Errors
/// Without `allow_empty`: when it would remove every one of them, or the
/// specs select no VM at all for this host. With `max_prune`: when it
/// would remove more.
pub fn check(
    removing: &[String],
    host_vms: usize,
    selection: &Selection,
    guard: &PruneGuard,
) -> Result<(), PruneRefusal> {
    let n = removing.len();
    if n == 0 {
        return Ok(());
    }
    let names = some_names(removing);
    // A selection of nothing is the typo itself, whatever else the host has
    // (protected VMs, VMs that cannot be observed: neither is ever pruned).
    if (n >= host_vms || selection.here == 0) && !guard.allow_empty {
        let vms = if n == 1 { "VM" } else { "VMs" };
        let why = if selection.here == 0 {
            let by = selection
                .by
                .as_deref()
                .map_or_else(String::new, |b| format!(" ({b})"));
            if selection.elsewhere == 0 {
                format!("the specs define no VM at all{by}")
            } else {
                format!(
                    "the specs select none of their {} VM(s) for this host{by}",
                    selection.elsewhere
                )
            }
        } else {
            format!("the specs select {} VM(s) for it", selection.here)
        };
        return Err(PruneRefusal {
            removing: removing.to_vec(),
            host_vms,
            max_prune: None,
            message: if n >= host_vms {
                format!(
                    "refusing to prune: it would remove all {n} {vms} of this host ({names}), and {why}; \
                     check the selector or host name, or give --allow-empty if emptying this host is meant"
                )
            } else {
                format!(
                    "refusing to prune: it would remove {n} {vms} of this host ({names}), and {why}; \
                     check the selector or host name, or give --allow-empty if that is meant"
                )
            },
        });
    }
    if let Some(limit) = guard.max_prune
        && !limit.allows(n, host_vms)
    {
        return Err(PruneRefusal {
            removing: removing.to_vec(),
            host_vms,
            max_prune: Some(limit.to_string()),
            message: format!(
                "refusing to prune: it would remove {n} of this host's {host_vms} VMs ({names}), \
                 more than --max-prune {limit}; give a larger --max-prune if that is meant"
            ),
        });
    }
    Ok(())
}

/// Applies [`check`] to `plan`: when the prune it holds is refused, every
/// destroy becomes a note saying why and the refusal is kept in the plan,
/// so nothing of it runs and `plan`/`apply` stop with a policy exit.
pub fn guard(plan: &mut Plan, host_vms: usize, selection: &Selection, guard: &PruneGuard) {
    let removing: Vec<String> = plan
        .vms
        .iter()
        .filter(|v| v.action == VmAction::Destroy)
        .map(|v| v.name.clone())
        .collect();
    let Err(refusal) = check(&removing, host_vms, selection, guard) else {
        return;
    };
    plan.vms.retain(|v| v.action != VmAction::Destroy);
    let short = match &refusal.max_prune {
        None if selection.here == 0 => {
            "no spec, but not pruned: the specs select no VM for this host".to_string()
        }
        None => "no spec, but not pruned: that would remove every VM this host has".to_string(),
        Some(limit) => format!("no spec, but not pruned: the prune exceeds --max-prune {limit}"),
    };
    for name in &removing {
        plan.notes.push(super::Note {
            vm: name.clone(),
            kind: NoteKind::PruneBlocked,
            message: short.clone(),
        });
    }
    plan.notes.sort();
    plan.prune_refused = Some(refusal);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn limits_read_as_counts_or_percentages() {
        assert_eq!("3".parse(), Ok(PruneLimit::Count(3)));
        assert_eq!("25%".parse(), Ok(PruneLimit::Percent(25)));
        for bad in ["", "-1", "101%", "x%", "1.5"] {
            assert!(bad.parse::<PruneLimit>().is_err(), "{bad}");
        }
        assert!(PruneLimit::Percent(50).allows(2, 4));
        assert!(!PruneLimit::Percent(50).allows(3, 4));
        assert!(PruneLimit::Count(2).allows(2, 10));
        assert!(!PruneLimit::Count(2).allows(3, 10));
    }

    /// Issue 30: `-l tier=dsn` selected nothing and pruned all 3 VMs.
    #[test]
    fn a_selection_of_nothing_never_empties_the_host() {
        let sel = Selection {
            here: 0,
            elsewhere: 3,
            by: Some("selector tier=dsn".into()),
        };
        let e =
            check(&names(&["a", "b", "c"]), 3, &sel, &PruneGuard::default()).expect_err("refused");
        assert!(
            e.message.contains("all 3 VMs of this host (a, b, c)"),
            "{e}"
        );
        assert!(
            e.message
                .contains("select none of their 3 VM(s) for this host (selector tier=dsn)"),
            "{e}"
        );
        assert!(e.message.contains("--allow-empty"), "{e}");
        let allowed = PruneGuard {
            allow_empty: true,
            ..PruneGuard::default()
        };
        assert_eq!(check(&names(&["a", "b", "c"]), 3, &sel, &allowed), Ok(()));
        // Fewer than all, but still a selection of nothing: refused too
        // (a protected or unobservable VM kept the count above).
        let e = check(&names(&["a"]), 3, &sel, &PruneGuard::default()).expect_err("refused");
        assert!(e.message.contains("remove 1 VM of this host (a)"), "{e}");
        // Fewer than all, of a selection of something: a plain prune.
        let some = Selection {
            here: 2,
            ..sel.clone()
        };
        assert_eq!(
            check(&names(&["a"]), 3, &some, &PruneGuard::default()),
            Ok(())
        );
        assert_eq!(check(&[], 0, &sel, &PruneGuard::default()), Ok(()));
    }

    #[test]
    fn more_than_the_bound_is_refused() {
        let guard = PruneGuard {
            allow_empty: false,
            max_prune: Some(PruneLimit::Percent(25)),
        };
        let sel = Selection {
            here: 6,
            ..Selection::default()
        };
        let e = check(&names(&["a", "b", "c"]), 10, &sel, &guard).expect_err("30% > 25%");
        assert_eq!(e.max_prune.as_deref(), Some("25%"));
        assert!(e.message.contains("3 of this host's 10 VMs"), "{e}");
        assert_eq!(check(&names(&["a", "b"]), 10, &sel, &guard), Ok(()));
        let many: Vec<String> = (0..20).map(|i| format!("vm{i}")).collect();
        let e = check(&many, 40, &sel, &guard).expect_err("half");
        assert!(e.message.contains("and 12 more"), "{e}");
    }
}
