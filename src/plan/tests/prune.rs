//! Pruning by example: what a VM without a spec becomes, and what no
//! prune ever touches (broken specs, protected VMs, VMs uvmctl did not
//! create, a host the prune would empty).

use super::*;

fn opts(prune: bool) -> PlanOptions {
    PlanOptions {
        prune,
        ..PlanOptions::default()
    }
}

fn host() -> ObservedState {
    observed(&[
        ("keep", base("keep"), State::Running),
        ("old", base("old"), State::Running),
    ])
}

#[test]
fn without_prune_a_vm_without_spec_is_only_noted() {
    let p = plan(
        &desired(&[("keep", base("keep"))]),
        &host(),
        &qemu(),
        &opts(false),
    );
    assert!(!p.has_changes());
    assert_eq!(p.notes[0].kind, NoteKind::NoSpec);
}

#[test]
fn prune_destroys_a_managed_vm_without_spec() {
    let p = plan(
        &desired(&[("keep", base("keep"))]),
        &host(),
        &qemu(),
        &opts(true),
    );
    assert_eq!(p.vms.len(), 1);
    assert_eq!(
        (p.vms[0].name.as_str(), p.vms[0].action),
        ("old", VmAction::Destroy)
    );
    assert_eq!(p.summary().remove, 1);
}

#[test]
fn broken_spec_never_prunes_its_vms_or_any_other() {
    let mut d = desired(&[("keep", base("keep"))]);
    d.unknown.insert("old".into());
    d.failed_files.insert("old.yaml".into());
    let p = plan(&d, &host(), &qemu(), &opts(true));
    assert!(!p.has_changes(), "{p:#?}");
    assert_eq!(p.notes[0].kind, NoteKind::SpecInvalid);

    // A file that failed before any VM name could be read blocks all pruning.
    let mut d = desired(&[("keep", base("keep"))]);
    d.failed_files.insert("garbage.yaml".into());
    let p = plan(&d, &host(), &qemu(), &opts(true));
    assert!(!p.has_changes());
    assert_eq!(p.notes[0].kind, NoteKind::PruneBlocked);
}

/// Issue 30: an empty selection emptied the host; the guard turns the
/// destroys into notes and keeps the refusal in the plan.
#[test]
fn a_prune_that_empties_the_host_is_refused_unless_explicitly_allowed() {
    let mut p = plan(&DesiredState::default(), &host(), &qemu(), &opts(true));
    assert_eq!(p.vms.len(), 2);
    let selection = crate::plan::prune::Selection::default();
    crate::plan::prune::guard(&mut p, 2, &selection, &Default::default());
    assert!(!p.has_changes());
    assert!(p.notes.iter().all(|n| n.kind == NoteKind::PruneBlocked));
    let refused = p.prune_refused.as_ref().expect("refused");
    assert!(
        refused.message.contains("the specs define no VM at all"),
        "{refused}"
    );
    let mut p = plan(&DesiredState::default(), &host(), &qemu(), &opts(true));
    let allow = crate::plan::prune::PruneGuard {
        allow_empty: true,
        max_prune: None,
    };
    crate::plan::prune::guard(&mut p, 2, &selection, &allow);
    assert_eq!(p.vms.len(), 2);
    assert_eq!(p.prune_refused, None);
}

#[test]
fn protected_vms_are_never_pruned() {
    let mut old = base("old");
    old.policy.protected = true;
    let o = observed(&[
        ("keep", base("keep"), State::Running),
        ("old", old, State::Running),
    ]);
    let p = plan(
        &desired(&[("keep", base("keep"))]),
        &o,
        &qemu(),
        &opts(true),
    );
    assert!(!p.has_changes(), "{p:#?}");
    assert_eq!(p.notes[0].kind, NoteKind::Protected);
}

#[test]
fn vms_uvmctl_did_not_create_are_never_touched() {
    let mut o = host();
    for vm in o.vms.values_mut() {
        vm.managed = false;
    }
    let mut want = base("keep");
    want.memory.size_mb = 1024;
    let p = plan(&desired(&[("keep", want)]), &o, &qemu(), &opts(true));
    assert!(!p.has_changes());
    assert_eq!(p.notes.len(), 1);
    assert_eq!(p.notes[0].kind, NoteKind::Unmanaged);
}
