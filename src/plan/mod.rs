//! ③ Diff and ④ the `Supported` gate: desired × observed × capabilities →
//! [`Plan`]. Pure: no I/O, no clock, no randomness, so the same inputs give a
//! byte-identical plan.

mod gate;
pub mod hold;
pub mod images;
pub mod prune;
pub mod render;
pub mod saved;

/// The item model, shared with the data layer.
pub use crate::vm::items;
pub use crate::vm::items::{Item, ItemKey, Items, ResourceKind, describe, flatten, unflatten};
pub use gate::classify;

use crate::spec::{DesiredState, PowerState, VmConfig};
use crate::vm::{Capabilities, MemoryHotplug, ObservedState, ObservedVm, Refusal, Support};
use crate::vm::{Disruption, ResourceOperation, State};
use serde::Serialize;

/// Version of the JSON plan document (`plan --output json`).
pub const PLAN_FORMAT_VERSION: u32 = 1;

/// Choices that change what is planned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Remove managed VMs that have no spec.
    pub prune: bool,
    /// How much a prune may remove ([`prune::guard`], applied over the
    /// whole host by `reconcile::Planned`).
    pub guard: prune::PruneGuard,
}

/// One change to one resource of one VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Op {
    /// Add, remove or update.
    pub operation: ResourceOperation,
    /// What is changed.
    pub resource: ResourceKind,
    /// Which one, by natural key.
    pub key: ItemKey,
    /// How disruptive it is.
    pub disruption: Disruption,
    /// Why it costs what it costs (empty for plain live changes).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The item as observed (absent for add).
    pub before: Option<Item>,
    /// The item as desired (absent for remove).
    pub after: Option<Item>,
}

/// What happens to a VM as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum VmAction {
    /// Built from its spec and brought to its power state.
    Create,
    /// Changed resource by resource.
    Update,
    /// Destroyed and built again from its spec.
    Recreate,
    /// Destroyed (pruned).
    Destroy,
}

/// The plan for one VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmPlan {
    /// VM name.
    pub name: String,
    /// What happens to it.
    pub action: VmAction,
    /// The most disruptive of its operations.
    pub disruption: Disruption,
    /// For `recreate`: whether the spec's policy allows it (else `apply`
    /// needs `--allow-recreate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recreate_allowed: Option<bool>,
    /// Operations in execution order: removals, updates, additions, power.
    pub ops: Vec<Op>,
    /// For `create` and `recreate`: the whole desired configuration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<VmConfig>,
    /// The lifecycle state the plan was computed from (none for a VM to
    /// create): the executor starts from it rather than observing again.
    #[serde(skip)]
    pub observed: Option<State>,
}

/// Why a VM is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum NoteKind {
    /// Its spec failed to load.
    SpecInvalid,
    /// Managed, no spec, and pruning was not asked for.
    NoSpec,
    /// Pruning was asked for but is unsafe now.
    PruneBlocked,
    /// Protected from pruning by its last applied policy.
    Protected,
    /// A VM of that name exists but uvmctl did not create it.
    Unmanaged,
    /// It exists but could not be observed; nothing of it is planned.
    Unknown,
}

/// A VM the plan leaves alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Note {
    /// VM name.
    pub vm: String,
    /// Category.
    pub kind: NoteKind,
    /// Sentence for people.
    pub message: String,
}

/// A VM the plan would build or change that is refused before anything
/// changes (a host path, an image, a cold setting, an image another VM
/// has), with where its spec says so.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Refused {
    /// The VM.
    pub vm: String,
    /// Its spec file.
    pub file: std::path::PathBuf,
    /// Its document in that file.
    #[serde(skip)]
    pub doc: usize,
    /// 1-based line and column of `field` in the file, once looked up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// Column of `field`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// The spec field (`spec.scsiControllers[0].disks[0].path`), when the
    /// refusal names one.
    pub field: String,
    /// Why.
    pub message: String,
}

impl Refused {
    /// The refusal of `vm` (its spec `want`) for `why`, whose first part
    /// names the field when it starts with one (`spec.x: ...`), as the
    /// pre-flight's errors do; a leading `vm NAME: ` is dropped (the VM is
    /// this one).
    pub fn new(vm: &str, want: &crate::spec::DesiredVm, why: &str) -> Self {
        let why = why.strip_prefix(&format!("vm {vm}: ")).unwrap_or(why);
        let (field, message) = match why.split_once(": ") {
            Some((f, m))
                if (f.starts_with("spec.") || f.starts_with("metadata."))
                    && !f.contains(char::is_whitespace) =>
            {
                (f.to_string(), m.to_string())
            }
            _ => (String::new(), why.to_string()),
        };
        Refused {
            vm: vm.to_string(),
            file: want.file.clone(),
            doc: want.doc,
            line: None,
            column: None,
            field,
            message,
        }
    }
}

impl std::fmt::Display for Refused {
    /// `file:line:col: field: message`, as spec errors read.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Counts for the summary line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// VMs created plus resources added.
    pub add: usize,
    /// Resources updated (power changes included).
    pub change: usize,
    /// VMs destroyed plus resources removed.
    pub remove: usize,
    /// VMs recreated.
    pub recreate: usize,
    /// The most disruptive operation, if any.
    pub max_disruption: Option<Disruption>,
}

/// Everything `plan` decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// Virtstack planned against.
    pub virtstack: String,
    /// VMs with changes, by name.
    pub vms: Vec<VmPlan>,
    /// VMs left alone, and why.
    pub notes: Vec<Note>,
    /// How many VMs already match their specs.
    pub unchanged: usize,
    /// Why the prune this plan would have made was refused (its VMs are
    /// among the notes): a policy stop for `plan` and `apply`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prune_refused: Option<prune::PruneRefusal>,
}

impl Plan {
    /// Whether anything would change.
    pub fn has_changes(&self) -> bool {
        !self.vms.is_empty()
    }

    /// Counts for the summary line.
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for vm in &self.vms {
            s.max_disruption = s.max_disruption.max(Some(vm.disruption));
            match vm.action {
                VmAction::Create => s.add += 1,
                VmAction::Destroy => s.remove += 1,
                VmAction::Recreate => s.recreate += 1,
                VmAction::Update => {
                    for op in &vm.ops {
                        match op.operation {
                            ResourceOperation::Add => s.add += 1,
                            ResourceOperation::Remove => s.remove += 1,
                            ResourceOperation::Update => s.change += 1,
                        }
                    }
                }
            }
        }
        s
    }
}

/// The power-state word of an observed lifecycle state.
pub fn observed_power(state: State) -> PowerState {
    match state {
        State::Running => PowerState::Running,
        State::Paused => PowerState::Paused,
        State::Saved => PowerState::Saved,
        State::PreCreated | State::Created | State::Terminated => PowerState::Stopped,
    }
}

/// Plans desired against observed. Pure and deterministic.
///
/// # Guarantees
/// - A VM whose spec failed to load gets no operation at all.
/// - Nothing is pruned unless `opts.prune`, every spec file loaded, and the
///   VM is not protected. How many may go at once is [`prune::guard`]'s
///   decision, over the whole host.
/// - VMs uvmctl did not create are never touched.
/// - Applying the plan to the observed state yields the desired state.
pub fn plan(
    desired: &DesiredState,
    observed: &ObservedState,
    caps: &Capabilities,
    opts: &PlanOptions,
) -> Plan {
    let mut out = Plan {
        virtstack: caps.virtstack.clone(),
        vms: Vec::new(),
        notes: Vec::new(),
        unchanged: 0,
        prune_refused: None,
    };

    for name in &desired.unknown {
        let message = if observed.vms.contains_key(name) {
            "spec failed to load; VM left unchanged"
        } else {
            "spec failed to load; VM not created"
        };
        out.notes.push(Note {
            vm: name.clone(),
            kind: NoteKind::SpecInvalid,
            message: message.into(),
        });
    }

    for name in desired
        .unknown_elsewhere
        .iter()
        .filter(|n| observed.vms.contains_key(*n))
    {
        out.notes.push(Note {
            vm: name.clone(),
            kind: NoteKind::SpecInvalid,
            message: "its spec, placed on another host, failed to load; VM left unchanged".into(),
        });
    }

    for (name, why) in &observed.unknown {
        let message = if desired.vms.contains_key(name) {
            format!("cannot be observed ({why}); its spec is not applied until it can")
        } else {
            format!("cannot be observed ({why}); left alone")
        };
        out.notes.push(Note {
            vm: name.clone(),
            kind: NoteKind::Unknown,
            message,
        });
    }

    for (name, want) in &desired.vms {
        if observed.unknown.contains_key(name) {
            continue;
        }
        match observed.vms.get(name) {
            None => out.vms.push(plan_create(name, &want.config, caps)),
            Some(have) if !have.managed => out.notes.push(Note {
                vm: name.clone(),
                kind: NoteKind::Unmanaged,
                message: "a VM of this name exists but uvmctl did not create it; left untouched"
                    .into(),
            }),
            Some(have) => match plan_vm(name, &want.config, have, caps) {
                Some(p) => out.vms.push(p),
                None => out.unchanged += 1,
            },
        }
    }

    for (name, have) in &observed.vms {
        if !have.managed
            || desired.vms.contains_key(name)
            || desired.unknown.contains(name)
            || desired.unknown_elsewhere.contains(name)
        {
            continue;
        }
        let note = |kind, message: String| Note {
            vm: name.clone(),
            kind,
            message,
        };
        let no_spec = if desired.elsewhere.contains(name) {
            "its spec places it on another host"
        } else {
            "no spec"
        };
        if !opts.prune && !desired.failed_files.is_empty() {
            // --prune would change nothing now: saying so would mislead.
            let n = desired.failed_files.len();
            let files = if n == 1 { "file" } else { "files" };
            out.notes.push(note(
                NoteKind::NoSpec,
                format!("{no_spec} among the specs that loaded; {n} spec {files} failed to load and may define it"),
            ));
        } else if !opts.prune {
            out.notes.push(note(
                NoteKind::NoSpec,
                format!("{no_spec}; not removed (use --prune to remove it)"),
            ));
        } else if !desired.failed_files.is_empty() {
            let n = desired.failed_files.len();
            let files = if n == 1 { "file" } else { "files" };
            out.notes.push(note(
                NoteKind::PruneBlocked,
                format!(
                    "{no_spec}, but not pruned: {n} spec {files} failed to load and may define it"
                ),
            ));
        } else if have.config.policy.protected {
            out.notes.push(note(
                NoteKind::Protected,
                format!("{no_spec}, but protected by its policy; not pruned"),
            ));
        } else {
            out.vms.push(VmPlan {
                name: name.clone(),
                action: VmAction::Destroy,
                disruption: Disruption::Recreate,
                recreate_allowed: None,
                ops: Vec::new(),
                spec: None,
                observed: Some(have.state),
            });
        }
    }

    out.vms.sort_by(|a, b| a.name.cmp(&b.name));
    out.notes.sort();
    out
}

/// Why `want`'s guest cannot be saved, when it is to be and cannot be (the
/// save comes after the plan's other operations, so the spec is what counts).
fn save_refusal(want: &VmConfig, caps: &Capabilities) -> Option<String> {
    (want.power_state == PowerState::Saved)
        .then(|| caps.save_refusal(want))
        .flatten()
}

fn plan_create(name: &str, want: &VmConfig, caps: &Capabilities) -> VmPlan {
    // Everything is cold configuration of a VM being built: only what the
    // virtstack cannot do at all stands out.
    let items = flatten(want);
    let mut ops: Vec<Op> = items
        .iter()
        .filter(|(_, item)| !item.is_default())
        .map(|((kind, key), item)| {
            let (kind, key, item) = (*kind, key.clone(), item.clone());
            let s = classify(kind, &key, ResourceOperation::Add, caps);
            let s = if s.disruption == Disruption::Unsupported {
                s
            } else {
                Support::live()
            };
            Op {
                operation: ResourceOperation::Add,
                resource: kind,
                key,
                disruption: s.disruption,
                reason: s.reason,
                before: None,
                after: Some(item),
            }
        })
        .collect();
    refuse(&mut ops, caps.refusals_in(want, &items), true, &items);
    let refused = save_refusal(want, caps);
    ops.push(Op {
        operation: ResourceOperation::Add,
        resource: ResourceKind::PowerState,
        key: ItemKey::Unit,
        disruption: if refused.is_some() {
            Disruption::Unsupported
        } else {
            Disruption::Live
        },
        reason: refused.unwrap_or_default(),
        before: None,
        after: Some(Item::PowerState(want.power_state.as_str())),
    });
    VmPlan {
        name: name.to_string(),
        action: VmAction::Create,
        disruption: ops
            .iter()
            .map(|o| o.disruption)
            .max()
            .unwrap_or(Disruption::Live),
        recreate_allowed: None,
        ops,
        spec: Some(want.clone()),
        observed: None,
    }
}

/// Marks what the virtstack cannot build `[unsupported]`, with its reason.
/// `rebuilt`: the VM is launched from its whole spec (create, restart,
/// recreate), so every refusal stands, even of an item that did not change.
fn refuse(ops: &mut Vec<Op>, refusals: Vec<Refusal>, rebuilt: bool, desired: &Items) {
    for r in refusals {
        let mut hit = false;
        for op in ops
            .iter_mut()
            .filter(|o| o.resource == r.kind && o.key == r.key && o.after.is_some())
        {
            op.disruption = Disruption::Unsupported;
            op.reason = r.reason.clone();
            hit = true;
        }
        if !hit && rebuilt {
            // Unchanged, but built again: shown as it stands.
            let item = desired.get(&(r.kind, r.key.clone())).cloned();
            ops.push(Op {
                operation: ResourceOperation::Update,
                resource: r.kind,
                key: r.key,
                disruption: Disruption::Unsupported,
                reason: r.reason,
                before: item.clone(),
                after: item,
            });
        }
    }
}

/// A live memory resize is live only within what the running VM can take
/// (virtio-mem cannot go below the boot memory nor above its region).
fn memory_resize(size_mb: u64, range: MemoryHotplug, s: Support) -> Support {
    if s.disruption != Disruption::Live || range.allows(size_mb) {
        return s;
    }
    let reason = if range.min_mb == range.max_mb {
        "this VM's memory cannot be resized while it runs; applied by a restart".to_string()
    } else if size_mb < range.min_mb || size_mb > range.max_mb {
        format!(
            "{size_mb} MB is outside the {}–{} MB this VM can be resized to while it runs; applied by a restart",
            range.min_mb, range.max_mb
        )
    } else {
        format!(
            "{size_mb} MB is not {} MB plus whole {} MB blocks; applied by a restart",
            range.min_mb, range.block_mb
        )
    };
    Support {
        disruption: Disruption::Restart,
        reason,
    }
}

/// Plans one VM that exists on both sides; `None` when it already matches.
fn plan_vm(name: &str, want: &VmConfig, have: &ObservedVm, caps: &Capabilities) -> Option<VmPlan> {
    // Most VMs match their spec list for list: skip flattening them.
    if want.power_state == observed_power(have.state) && want.same_except_power(&have.config) {
        return None;
    }
    let desired = flatten(want);
    let observed = flatten(&have.config);
    // A saved VM is restored as it was before its changes are made.
    let live_vm = have.state.is_live() || have.state == State::Saved;
    let gate = |(kind, key): &(ResourceKind, ItemKey), op: ResourceOperation| -> Support {
        let s = classify(*kind, key, op, caps);
        if !live_vm && s.disruption == Disruption::Restart {
            // Nothing runs, so a change that needs a restart just waits for the next start.
            return Support {
                disruption: Disruption::Live,
                reason: "the VM is stopped; takes effect when it starts".into(),
            };
        }
        s
    };
    let op = |operation,
              (kind, key): &(ResourceKind, ItemKey),
              before: Option<&Item>,
              after: Option<&Item>,
              s: Support| Op {
        operation,
        resource: *kind,
        key: key.clone(),
        disruption: s.disruption,
        reason: s.reason,
        before: before.cloned(),
        after: after.cloned(),
    };

    let (mut removes, mut updates, mut adds) = (Vec::new(), Vec::new(), Vec::new());
    for (k, o) in &observed {
        match desired.get(k) {
            None => removes.push(op(
                ResourceOperation::Remove,
                k,
                Some(o),
                None,
                gate(k, ResourceOperation::Remove),
            )),
            Some(d) if d == o => {}
            Some(d) if k.0.is_singleton() => {
                let mut s = gate(k, ResourceOperation::Update);
                if let (Item::Memory(size), Some(range), true) = (d, have.memory_hotplug, live_vm) {
                    s = memory_resize(*size, range, s);
                }
                updates.push(op(ResourceOperation::Update, k, Some(o), Some(d), s));
            }
            Some(d) => {
                // Update in place unless removing and re-adding is less disruptive.
                let upd = gate(k, ResourceOperation::Update);
                let rm = gate(k, ResourceOperation::Remove);
                let add = gate(k, ResourceOperation::Add);
                if upd.disruption <= rm.disruption.max(add.disruption) {
                    updates.push(op(ResourceOperation::Update, k, Some(o), Some(d), upd));
                } else {
                    removes.push(op(ResourceOperation::Remove, k, Some(o), None, rm));
                    adds.push(op(ResourceOperation::Add, k, None, Some(d), add));
                }
            }
        }
    }
    for (k, d) in &desired {
        if !observed.contains_key(k) {
            adds.push(op(
                ResourceOperation::Add,
                k,
                None,
                Some(d),
                gate(k, ResourceOperation::Add),
            ));
        }
    }
    // Leaves before containers when removing; the maps iterate containers first.
    removes.reverse();
    adds.sort_by(|a, b| (a.resource, &a.key).cmp(&(b.resource, &b.key)));

    let have_power = observed_power(have.state);
    let mut ops: Vec<Op> = removes.into_iter().chain(updates).chain(adds).collect();
    if !ops.is_empty() {
        // A restart or recreate launches the whole spec again.
        let rebuilt = ops
            .iter()
            .any(|o| matches!(o.disruption, Disruption::Restart | Disruption::Recreate));
        refuse(
            &mut ops,
            caps.refusals_in(want, &desired),
            rebuilt,
            &desired,
        );
    }
    if let (Some(err), true) = (&have.exit_error, want.power_state != PowerState::Stopped) {
        // A VM that died on its own is rebuilt, not just started: whatever
        // killed it may have left it inconsistent.
        ops.push(Op {
            operation: ResourceOperation::Update,
            resource: ResourceKind::PowerState,
            key: ItemKey::Unit,
            disruption: Disruption::Recreate,
            reason: format!("{err}; it is rebuilt from its spec"),
            before: Some(Item::PowerState(have_power.as_str())),
            after: Some(Item::PowerState(want.power_state.as_str())),
        });
    } else if have_power != want.power_state {
        let refused = save_refusal(want, caps);
        ops.push(Op {
            operation: ResourceOperation::Update,
            resource: ResourceKind::PowerState,
            key: ItemKey::Unit,
            disruption: if refused.is_some() {
                Disruption::Unsupported
            } else {
                Disruption::Live
            },
            reason: refused.unwrap_or_default(),
            before: Some(Item::PowerState(have_power.as_str())),
            after: Some(Item::PowerState(want.power_state.as_str())),
        });
    }
    if ops.is_empty() {
        return None;
    }
    let disruption = ops
        .iter()
        .map(|o| o.disruption)
        .max()
        .unwrap_or(Disruption::Live);
    let recreate = ops.iter().any(|o| o.disruption == Disruption::Recreate);
    Some(VmPlan {
        name: name.to_string(),
        action: if recreate {
            VmAction::Recreate
        } else {
            VmAction::Update
        },
        disruption,
        recreate_allowed: recreate.then_some(want.policy.allow_recreate),
        ops,
        spec: recreate.then(|| want.clone()),
        observed: Some(have.state),
    })
}

#[cfg(test)]
pub(crate) mod tests;
