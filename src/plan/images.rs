//! A writable image belongs to one VM of a host. The spec loader checks
//! this among the specs; here it is checked against the VMs the host
//! already has, running or not, whatever their specs say now (issue 30: a
//! copy of a spec under another name passed `validate` and `plan`, and
//! apply then failed with QEMU's raw `Failed to get "write" lock`). Pure:
//! paths are compared as written (specs hold absolute paths, and an
//! observed VM reports the paths its spec gave).

use super::{Plan, Refused, VmAction};
use crate::spec::DesiredState;
use crate::vm::ObservedState;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// A refusal for each VM of `plan` that would attach an image another VM
/// of the host has, where either side attaches it writable. Only images the
/// VM does not have already count, so a conflict made before this check
/// existed does not stop every later change of the VM.
pub fn held_by_others(
    plan: &Plan,
    desired: &DesiredState,
    observed: &ObservedState,
) -> Vec<Refused> {
    let mut refused = Vec::new();
    // Every image of the host, by path, once: a plan of thousands of VMs
    // looks each image up rather than walking every other VM.
    let held = index(observed.vms.iter().flat_map(|(vm, o)| {
        o.config.images().map(move |i| Holding {
            vm,
            state: o.state.shown(),
            path: i.path,
            read_only: i.read_only,
        })
    }));
    for vm in plan.vms.iter().filter(|v| v.action != VmAction::Destroy) {
        let Some(want) = desired.vms.get(&vm.name) else {
            continue;
        };
        // A recreated VM reopens everything; an updated one only what it adds.
        let has: BTreeSet<&Path> = match (vm.action, observed.vms.get(&vm.name)) {
            (VmAction::Update, Some(o)) => o.config.images().map(|i| i.path).collect(),
            _ => BTreeSet::new(),
        };
        // One refusal per VM: the first image's field, every clash said.
        let pruned = |other: &str| {
            plan.vms
                .iter()
                .any(|p| p.name == other && p.action == VmAction::Destroy)
        };
        let (field, why) = clashes(&vm.name, &want.config, &has, &held, &pruned);
        if let Some(field) = field {
            refused.push(Refused {
                field,
                ..Refused::new(&vm.name, want, &why)
            });
        }
    }
    refused
}

/// An image another VM of the host has.
#[derive(Debug, Clone, Copy)]
pub struct Holding<'a> {
    /// That VM.
    pub vm: &'a str,
    /// Its state, as `status` says it.
    pub state: &'a str,
    /// The image.
    pub path: &'a Path,
    /// Attached read-only.
    pub read_only: bool,
}

/// The holdings of a host by image path.
pub type Index<'a> = HashMap<&'a Path, Vec<Holding<'a>>>;

/// `holdings` by image path.
pub fn index<'a>(holdings: impl Iterator<Item = Holding<'a>>) -> Index<'a> {
    let mut by_path: Index<'a> = HashMap::new();
    for h in holdings {
        by_path.entry(h.path).or_default().push(h);
    }
    by_path
}

/// What `want` (VM `vm`) would attach that other VMs hold (`held`),
/// writable on either side, leaving out what it has already (`has`): the
/// first such image's field and one sentence for all. `pruned` says
/// whether this plan prunes a holder (then the two would race: said so).
pub fn clashes(
    vm: &str,
    want: &crate::spec::VmConfig,
    has: &BTreeSet<&Path>,
    held: &Index<'_>,
    pruned: &dyn Fn(&str) -> bool,
) -> (Option<String>, String) {
    let mut field = None;
    let mut why = Vec::new();
    for image in want.images().filter(|i| !has.contains(i.path)) {
        let holders = held.get(image.path).map(Vec::as_slice).unwrap_or_default();
        for theirs in holders.iter().filter(|h| h.vm != vm) {
            if image.read_only && theirs.read_only {
                continue;
            }
            field.get_or_insert_with(|| image.site.field());
            why.push(format!(
                "{} is attached{} by VM {} ({}) on this host{}",
                image.path.display(),
                if theirs.read_only { "" } else { " writable" },
                theirs.vm,
                theirs.state,
                if pruned(theirs.vm) {
                    ", which this plan prunes: apply the prune first, then this VM"
                } else {
                    ""
                },
            ));
        }
    }
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(
            "{}; an image attached writable can belong to one VM only",
            why.join("; ")
        )
    };
    (field, why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{base, desired, observed as host, qemu};
    use crate::plan::{PlanOptions, plan};
    use crate::spec::{ScsiController, ScsiDisk};
    use crate::vm::ScsiDiskType;
    use crate::vm::State;

    fn with_disk(name: &str, path: &str, read_only: bool) -> crate::spec::VmConfig {
        let mut c = base(name);
        c.scsi_controllers = vec![ScsiController {
            id: 0,
            disks: vec![ScsiDisk {
                lun: 0,
                path: path.into(),
                disk_type: ScsiDiskType::PassThrough,
                read_only,
            }],
        }];
        c
    }

    /// Issue 30: a copy of demo.yaml named copy passed plan and failed at
    /// QEMU's lock.
    #[test]
    fn an_image_another_vm_has_writable_is_refused_naming_both() {
        let disk = "/var/lib/uvmctl/disks/demo.img";
        let o = host(&[("demo", with_disk("demo", disk, false), State::Created)]);
        let d = desired(&[
            ("demo", with_disk("demo", disk, false)),
            ("copy", with_disk("copy", disk, false)),
        ]);
        let p = plan(&d, &o, &qemu(), &PlanOptions::default());
        let refused = held_by_others(&p, &d, &o);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].vm, "copy");
        assert_eq!(
            refused[0].to_string(),
            "t.yaml: spec.scsiControllers[0].disks[0].path: /var/lib/uvmctl/disks/demo.img is attached writable by VM demo (stopped) on this host; an image attached writable can belong to one VM only"
        );
        // Read-only on both sides: shared freely.
        let o = host(&[("demo", with_disk("demo", disk, true), State::Running)]);
        let d = desired(&[("copy", with_disk("copy", disk, true))]);
        let p = plan(&d, &o, &qemu(), &PlanOptions::default());
        assert!(held_by_others(&p, &d, &o).is_empty());
        // Read-only here, writable there: refused too.
        let o = host(&[("demo", with_disk("demo", disk, false), State::Running)]);
        let p = plan(&d, &o, &qemu(), &PlanOptions::default());
        assert_eq!(held_by_others(&p, &d, &o).len(), 1);
    }
}
