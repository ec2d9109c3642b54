//! What the loads of the spec directory say, as the watcher keeps it: the
//! last good spec of each VM (a file that fails keeps its VMs at theirs),
//! the VMs whose spec went missing, and which of them a prune may remove.

use super::policy::{self, Entry, Trigger, tracked};
use crate::plan::prune::PruneGuard;
use crate::reconcile::vm::index_images;
use crate::spec::{DesiredVm, Loaded};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What the specs said at the last load, with last good specs kept for
/// files that fail.
#[derive(Default)]
pub(super) struct Specs {
    /// Last good spec per VM.
    pub(super) desired: BTreeMap<String, DesiredVm>,
    /// Names whose specs fail and that have no last good spec: left alone.
    pub(super) unknown: BTreeSet<String>,
    pub(super) failed_files: BTreeSet<PathBuf>,
    pub(super) errors: Vec<String>,
    /// How many valid specs place their VMs on other hosts.
    pub(super) elsewhere: usize,
    /// The placement that chose this host's VMs, described.
    pub(super) placed_by: Option<String>,
}

/// Where the confirmation of missing specs stands.
#[derive(Default)]
pub(super) struct Pruning {
    /// Loads so far.
    pub(super) scans: u64,
    /// When the next load confirms the specs found missing.
    pub(super) confirm_at: Option<Instant>,
    /// The prune refused last, while it stays refused (said once).
    pub(super) refused: Option<String>,
}

/// What the loads said, and the options that decide what a missing spec
/// leads to.
pub(super) struct Book {
    pub(super) specs: Specs,
    pub(super) pruning: Pruning,
    /// `--prune`.
    pub(super) prune: bool,
    /// Quiet time before a missing spec is looked for again.
    pub(super) debounce: Duration,
    /// How much one prune may remove.
    pub(super) guard: PruneGuard,
}

/// The VMs, by name, as the watcher keeps them.
type Vms = BTreeMap<String, Entry>;

impl Book {
    /// Takes a new load in: last good specs kept for files that fail, VMs
    /// whose spec changed marked dirty, absent VMs tracked for pruning.
    pub(super) fn absorb(&mut self, vms: &mut Vms, loaded: Loaded, now: Instant) {
        self.pruning.scans += 1;
        let Loaded {
            desired, errors, ..
        } = loaded;
        let mut first_error: BTreeMap<PathBuf, String> = BTreeMap::new();
        for e in &errors {
            first_error
                .entry(e.file.clone())
                .or_insert_with(|| e.to_string());
        }
        let mut next = desired.vms;
        let previous = std::mem::take(&mut self.specs.desired);
        for (name, old) in previous.iter() {
            let failing =
                desired.unknown.contains(name) || desired.failed_files.contains(&old.file);
            if failing && !next.contains_key(name) {
                // Its file fails: the VM keeps its last good spec.
                next.insert(name.clone(), old.clone());
            }
        }
        for (name, vm) in &next {
            let error = (desired.unknown.contains(name) || desired.failed_files.contains(&vm.file))
                .then(|| {
                    first_error
                        .get(&vm.file)
                        .cloned()
                        .or_else(|| errors.first().map(ToString::to_string))
                })
                .flatten();
            let e = tracked(vms, name);
            if e.status.spec_error != error {
                match &error {
                    Some(err) => {
                        tracing::warn!(vm = %name, "spec fails to load; keeping its last good spec: {err}")
                    }
                    None if e.status.spec_error.is_some() => {
                        tracing::info!(vm = %name, "spec loads again");
                    }
                    None => {}
                }
                e.status.spec_error = error;
            }
            // Its labels choose its maintenance windows: a relabel counts.
            if previous
                .get(name)
                .is_none_or(|p| p.config != vm.config || p.labels != vm.labels)
            {
                e.spec_changed();
            }
        }
        // A broken spec of another host's keeps a VM of its name here too.
        let unknown: BTreeSet<String> = desired
            .unknown
            .iter()
            .chain(&desired.unknown_elsewhere)
            .filter(|n| !next.contains_key(*n))
            .cloned()
            .collect();
        self.note_missing(vms, previous.keys(), &next, &unknown, now);
        self.specs = Specs {
            desired: next,
            unknown,
            failed_files: desired.failed_files,
            errors: errors.iter().map(ToString::to_string).collect(),
            elsewhere: desired.elsewhere.len(),
            placed_by: desired.placed_by,
        };
        if self.prune {
            self.consider_pruning(vms);
        }
    }

    /// Tracks the VMs whose spec is missing from this load (`previous`'s, and
    /// the virtstack's): since which scan, and when a later scan confirms it.
    fn note_missing<'a>(
        &mut self,
        vms: &mut Vms,
        previous: impl Iterator<Item = &'a String>,
        next: &BTreeMap<String, DesiredVm>,
        unknown: &BTreeSet<String>,
        now: Instant,
    ) {
        let known = vms.iter().filter(|(_, e)| e.known).map(|(n, _)| n);
        let missing: Vec<String> = previous
            .cloned()
            .chain(known.cloned())
            .filter(|n| !next.contains_key(n) && !unknown.contains(n))
            .collect();
        for name in missing {
            let e = vms.entry(name.clone()).or_default();
            if e.absent_since.is_some() {
                continue;
            }
            e.absent_since = Some(self.pruning.scans);
            if self.prune {
                let confirm = policy::confirm_at(now, self.debounce);
                let at = self.pruning.confirm_at.map_or(confirm, |c| c.min(confirm));
                self.pruning.confirm_at = Some(at);
            } else {
                tracing::info!(vm = %name, "no spec any more; left as it is (--prune removes such VMs)");
            }
        }
        for (name, e) in vms.iter_mut() {
            if next.contains_key(name) || unknown.contains(name) {
                e.absent_since = None;
            }
            if e.absent_since.is_none() {
                e.prune = false;
            }
        }
    }

    /// Why `want` may not be reconciled now: it would attach an image another
    /// VM of this host has, as that VM's last reconcile found it (the rule
    /// `plan::images` is for plan and apply; a watcher observes one VM at a
    /// time, so it judges from what it saw of the others).
    pub(super) fn image_clash(vms: &Vms, vm: &str, want: &DesiredVm) -> Option<String> {
        // Most VMs of a fleet attach nothing: no walk over the others then.
        want.config.images().next()?;
        let has: BTreeSet<&std::path::Path> = vms
            .get(vm)
            .and_then(|e| e.images.as_ref())
            .into_iter()
            .flatten()
            .map(|(p, _)| p.as_path())
            .collect();
        let holdings = vms
            .iter()
            .filter_map(|(n, e)| e.images.as_ref().map(|i| (n, i)));
        let held = index_images(holdings, "as last reconciled");
        let (field, why) = crate::plan::images::clashes(vm, &want.config, &has, &held, &|_| false);
        field.map(|f| format!("{f}: {why}"))
    }

    /// Marks for removal the VMs a later scan confirmed absent, when nothing
    /// forbids it.
    fn consider_pruning(&mut self, vms: &mut Vms) {
        let candidates = policy::prune_candidates(vms, self.pruning.scans);
        if candidates.is_empty() {
            return;
        }
        if !self.specs.errors.is_empty() {
            tracing::warn!(vms = ?candidates, "not pruning while spec files fail to load");
            return;
        }
        // The rule plan and apply follow: never every VM of this host
        // without --allow-empty, never more than --max-prune at once.
        let removing: Vec<String> = vms
            .iter()
            .filter(|(n, e)| e.known && (e.prune || candidates.contains(n)))
            .map(|(n, _)| n.clone())
            .collect();
        let selection = crate::plan::prune::Selection {
            here: self.specs.desired.len() + self.specs.unknown.len(),
            elsewhere: self.specs.elsewhere,
            by: self.specs.placed_by.clone(),
        };
        let known = vms.values().filter(|e| e.known).count();
        let guard = &self.guard;
        if let Err(refused) = crate::plan::prune::check(&removing, known, &selection, guard) {
            if self.pruning.refused.as_ref() != Some(&refused.message) {
                tracing::warn!(vms = ?candidates, "{refused}");
                self.pruning.refused = Some(refused.message.clone());
            }
            for name in &candidates {
                tracked(vms, name).status.held = vec![
                    "destroy: no spec names it (a prune)".into(),
                    refused.message.clone(),
                ];
            }
            return;
        }
        self.pruning.refused = None;
        for name in candidates {
            if let Some(e) = vms.get_mut(&name)
                && e.known
            {
                e.prune = true;
                e.mark(Trigger::Spec);
            }
        }
    }
}
