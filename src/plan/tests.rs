//! Planner tests: rules by example, golden renderings, and properties over
//! random desired/observed pairs applied to a small in-memory model.

use super::*;
use crate::spec::*;
use crate::vm::HostFacts;
use crate::vm::{GuestOs, MemoryBackingType, ScsiDiskType, VMSocketType, VPMemImageFormat};
use std::path::PathBuf;

pub(crate) fn base(name: &str) -> VmConfig {
    VmConfig {
        boot: Boot {
            linux_kernel_direct: Some(LinuxKernelDirect {
                kernel: PathBuf::from(format!("/k/{name}/vmlinuz")),
                initrd: None,
                cmdline: String::new(),
            }),
            uefi: None,
        },
        processors: Processors { count: 1 },
        memory: Memory {
            size_mb: 256,
            ..Memory::default()
        },
        ..VmConfig::default()
    }
}

fn disk(lun: u32, path: &str) -> ScsiDisk {
    ScsiDisk {
        lun,
        path: PathBuf::from(path),
        disk_type: ScsiDiskType::Vhdx,
        read_only: false,
    }
}

fn nic(n: u8, mac_last: u8) -> NetworkAdapter {
    NetworkAdapter {
        nic_id: format!("00000000-0000-0000-0000-0000000000{n:02x}"),
        endpoint_id: "user".into(),
        mac_address: format!("52-54-00-00-00-{mac_last:02X}"),
    }
}

pub(crate) fn desired(vms: &[(&str, VmConfig)]) -> DesiredState {
    let mut d = DesiredState::default();
    for (name, config) in vms {
        d.vms.insert(
            name.to_string(),
            DesiredVm {
                name: name.to_string(),
                file: PathBuf::from("t.yaml"),
                doc: 0,
                config: config.clone().into(),
                status: None,
                labels: Default::default(),
            },
        );
    }
    d
}

pub(crate) fn observed(vms: &[(&str, VmConfig, State)]) -> ObservedState {
    let mut o = ObservedState::default();
    for (name, config, state) in vms {
        o.vms.insert(
            name.to_string(),
            ObservedVm {
                config: config.clone(),
                state: *state,
                managed: true,
                exit_error: None,
                memory_hotplug: None,
            },
        );
    }
    o
}

pub(crate) fn qemu() -> Capabilities {
    Capabilities::qemu(&HostFacts::default())
}

fn run(d: &DesiredState, o: &ObservedState) -> Plan {
    plan(d, o, &qemu(), &PlanOptions::default())
}

/// `op resource key [class]` per operation of one VM, for compact assertions.
fn ops_of(p: &Plan, vm: &str) -> Vec<String> {
    p.vms
        .iter()
        .find(|v| v.name == vm)
        .map(|v| {
            v.ops
                .iter()
                .map(|o| {
                    format!(
                        "{} {} {} [{}]",
                        o.operation, o.resource, o.key, o.disruption
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn equal_states_plan_nothing() {
    let mut c = base("web");
    c.scsi_controllers = vec![ScsiController {
        id: 0,
        disks: vec![disk(0, "/d/a")],
    }];
    let p = run(
        &desired(&[("web", c.clone())]),
        &observed(&[("web", c, State::Running)]),
    );
    assert!(!p.has_changes());
    assert_eq!(p.unchanged, 1);
    assert_eq!(
        render::text(&p, &render::Style::default()),
        "No changes. 1 VM matches its spec.\n"
    );
}

#[test]
fn reordering_a_list_is_no_change() {
    let mut a = base("web");
    a.network_adapters = vec![nic(1, 1), nic(2, 2)];
    a.scsi_controllers = vec![
        ScsiController {
            id: 0,
            disks: vec![disk(0, "/d/a"), disk(1, "/d/b")],
        },
        ScsiController {
            id: 1,
            disks: vec![],
        },
    ];
    let mut b = a.clone();
    b.network_adapters.reverse();
    b.scsi_controllers.reverse();
    b.scsi_controllers[1].disks.reverse();
    let p = run(
        &desired(&[("web", a)]),
        &observed(&[("web", b, State::Running)]),
    );
    assert!(!p.has_changes(), "{p:#?}");
}

#[test]
fn disks_go_before_their_controller_and_come_after_it() {
    let mut with = base("web");
    with.scsi_controllers = vec![ScsiController {
        id: 1,
        disks: vec![disk(0, "/d/a"), disk(5, "/d/b")],
    }];
    let without = base("web");

    let p = run(
        &desired(&[("web", without.clone())]),
        &observed(&[("web", with.clone(), State::Running)]),
    );
    assert_eq!(
        ops_of(&p, "web"),
        vec![
            "remove scsiDisk 1:5 [live]",
            "remove scsiDisk 1:0 [live]",
            "remove scsiController 1 [live]"
        ]
    );

    let p = run(
        &desired(&[("web", with)]),
        &observed(&[("web", without, State::Running)]),
    );
    assert_eq!(
        ops_of(&p, "web"),
        vec![
            "add scsiController 1 [live]",
            "add scsiDisk 1:0 [live]",
            "add scsiDisk 1:5 [live]"
        ]
    );
}

#[test]
fn order_is_removals_then_updates_then_additions_then_power() {
    let mut have = base("web");
    have.network_adapters = vec![nic(1, 1)];
    let mut want = base("web");
    want.memory.size_mb = 512;
    want.scsi_controllers = vec![ScsiController {
        id: 0,
        disks: vec![],
    }];
    want.power_state = PowerState::Paused;
    let p = run(
        &desired(&[("web", want)]),
        &observed(&[("web", have, State::Running)]),
    );
    assert_eq!(
        ops_of(&p, "web"),
        vec![
            "remove networkAdapter 00000000-0000-0000-0000-000000000001 [live]",
            "update memory  [live]",
            "add scsiController 0 [live]",
            "update powerState  [live]",
        ]
    );
}

#[test]
fn a_changed_nic_is_removed_and_added_when_that_is_less_disruptive_than_update() {
    let mut have = base("web");
    have.network_adapters = vec![nic(1, 1)];
    let mut want = base("web");
    want.network_adapters = vec![nic(1, 9)];
    let p = run(
        &desired(&[("web", want.clone())]),
        &observed(&[("web", have.clone(), State::Running)]),
    );
    // QEMU cannot change a NIC in place (restart), but can hot-remove and hot-add it.
    assert_eq!(
        ops_of(&p, "web"),
        vec![
            "remove networkAdapter 00000000-0000-0000-0000-000000000001 [live]",
            "add networkAdapter 00000000-0000-0000-0000-000000000001 [live]",
        ]
    );
    // With an in-place update that is live, one update op is planned instead.
    let mut caps = qemu();
    caps.set(
        crate::vm::Resource::Network,
        ResourceOperation::Update,
        Support::live(),
    );
    let p = plan(
        &desired(&[("web", want)]),
        &observed(&[("web", have, State::Running)]),
        &caps,
        &PlanOptions::default(),
    );
    assert_eq!(
        ops_of(&p, "web"),
        vec!["update networkAdapter 00000000-0000-0000-0000-000000000001 [live]"]
    );
}

#[test]
fn cold_only_settings_plan_a_recreate_that_says_whether_policy_allows_it() {
    let have = base("web");
    let mut want = base("web");
    if let Some(k) = want.boot.linux_kernel_direct.as_mut() {
        k.cmdline = "quiet".into();
    }
    want.memory.backing = MemoryBackingType::Physical;
    let p = run(
        &desired(&[("web", want.clone())]),
        &observed(&[("web", have.clone(), State::Running)]),
    );
    let vm = &p.vms[0];
    assert_eq!(vm.action, VmAction::Recreate);
    assert_eq!(vm.recreate_allowed, Some(false));
    assert_eq!(
        ops_of(&p, "web"),
        vec!["update boot  [recreate]", "update memoryConfig  [recreate]"]
    );
    assert_eq!(p.summary().recreate, 1);

    want.policy.allow_recreate = true;
    let p = run(
        &desired(&[("web", want)]),
        &observed(&[("web", have, State::Running)]),
    );
    assert_eq!(p.vms[0].recreate_allowed, Some(true));
}

#[test]
fn vpmem_removal_on_qemu_is_a_restart_not_a_live_change() {
    let mut have = base("web");
    have.vpmem = Some(Vpmem {
        maximum_devices: 2,
        maximum_size_bytes: 1 << 30,
        devices: vec![VpmemDevice {
            id: 0,
            path: "/d/p.vhd".into(),
            format: VPMemImageFormat::Vhd1,
            read_only: true,
        }],
    });
    let mut want = have.clone();
    if let Some(v) = want.vpmem.as_mut() {
        v.devices.clear();
    }
    let p = run(
        &desired(&[("web", want)]),
        &observed(&[("web", have, State::Running)]),
    );
    assert_eq!(ops_of(&p, "web"), vec!["remove vpmemDevice 0 [restart]"]);
    assert_eq!(p.vms[0].ops[0].reason, "QEMU 7.2 cannot unplug an NVDIMM");
    assert_eq!(p.summary().max_disruption, Some(Disruption::Restart));
}

#[test]
fn a_restart_change_on_a_stopped_vm_is_live() {
    let have = base("web");
    let mut want = base("web");
    want.power_state = PowerState::Stopped;
    want.plan9_shares = vec![Plan9Share {
        name: "src".into(),
        host_path: "/srv/src".into(),
        port: DEFAULT_PLAN9_PORT,
        flags: 0,
        allowed_files: vec![],
        read_only: true,
    }];
    let p = run(
        &desired(&[("web", want.clone())]),
        &observed(&[("web", have.clone(), State::Running)]),
    );
    assert_eq!(
        ops_of(&p, "web"),
        vec!["add plan9Share src [restart]", "update powerState  [live]"]
    );
    let p = run(
        &desired(&[("web", want)]),
        &observed(&[("web", have, State::Terminated)]),
    );
    assert_eq!(ops_of(&p, "web"), vec!["add plan9Share src [live]"]);
    assert_eq!(
        p.vms[0].ops[0].reason,
        "the VM is stopped; takes effect when it starts"
    );
}

#[test]
fn what_the_virtstack_cannot_do_is_unsupported_with_its_reason() {
    let have = base("web");
    let mut want = base("web");
    want.vsmb_shares = vec![VsmbShare {
        name: "l".into(),
        host_path: "/srv/l".into(),
        allowed_files: vec![],
        options: Default::default(),
    }];
    let p = run(
        &desired(&[("web", want.clone())]),
        &observed(&[("web", have, State::Running)]),
    );
    assert_eq!(ops_of(&p, "web"), vec!["add vsmbShare l [unsupported]"]);
    assert_eq!(
        p.vms[0].ops[0].reason,
        "SMB shares are a Windows (HCS) feature"
    );
    let p = run(&desired(&[("new", want)]), &ObservedState::default());
    assert_eq!(p.vms[0].action, VmAction::Create);
    assert_eq!(p.vms[0].disruption, Disruption::Unsupported);
}

#[test]
fn a_saved_vm_takes_live_changes_since_it_is_restored_first() {
    let mut want = base("web");
    want.power_state = PowerState::Saved;
    want.network_adapters = vec![nic(1, 1)];
    want.memory.size_mb = 1024;
    let p = run(
        &desired(&[("web", want)]),
        &observed(&[("web", base("web"), State::Saved)]),
    );
    assert_eq!(
        ops_of(&p, "web"),
        vec![
            "update memory  [live]",
            "add networkAdapter 00000000-0000-0000-0000-000000000001 [live]"
        ]
    );
    // A cold change on a saved VM discards the saved guest: a restart.
    let mut want = base("web");
    want.power_state = PowerState::Saved;
    want.serial_consoles = vec![SerialConsole {
        port: 0,
        listener_path: "/run/l.sock".into(),
    }];
    let p = run(
        &desired(&[("web", want)]),
        &observed(&[("web", base("web"), State::Saved)]),
    );
    assert_eq!(p.vms[0].disruption, Disruption::Restart);
}

#[test]
fn power_state_follows_the_spec() {
    let cases = [
        (State::Running, PowerState::Paused, Some("running → paused")),
        (State::Paused, PowerState::Running, Some("paused → running")),
        (
            State::Terminated,
            PowerState::Running,
            Some("stopped → running"),
        ),
        (State::Created, PowerState::Paused, Some("stopped → paused")),
        (State::Paused, PowerState::Stopped, Some("paused → stopped")),
        (State::Running, PowerState::Running, None),
        (State::Terminated, PowerState::Stopped, None),
        (State::Running, PowerState::Saved, Some("running → saved")),
        (State::Saved, PowerState::Running, Some("saved → running")),
        (State::Saved, PowerState::Stopped, Some("saved → stopped")),
        (State::Saved, PowerState::Saved, None),
    ];
    for (state, power, expect) in cases {
        let mut want = base("web");
        want.power_state = power;
        let p = run(
            &desired(&[("web", want)]),
            &observed(&[("web", base("web"), state)]),
        );
        let got = p
            .vms
            .first()
            .and_then(|v| v.ops.last())
            .map(|o| match (&o.before, &o.after) {
                (Some(b), Some(a)) => format!("{} → {}", describe(b), describe(a)),
                _ => String::new(),
            });
        assert_eq!(got.as_deref(), expect, "{state:?} → {power:?}");
    }
}

#[test]
fn memory_resizes_live_only_within_what_the_running_vm_can_take() {
    let grow = |size_mb: u64, hot: Option<MemoryHotplug>, state: State| {
        let mut o = observed(&[("web", base("web"), state)]);
        if let Some(vm) = o.vms.get_mut("web") {
            vm.memory_hotplug = hot;
        }
        let mut want = base("web");
        want.memory.size_mb = size_mb;
        if state == State::Paused {
            want.power_state = PowerState::Paused;
        }
        let p = run(&desired(&[("web", want)]), &o);
        let op = &p.vms[0].ops[0];
        (op.disruption, op.reason.clone())
    };
    let range = Some(MemoryHotplug {
        min_mb: 256,
        max_mb: 1024,
        block_mb: 2,
    });
    assert_eq!(grow(512, range, State::Running).0, Disruption::Live);
    assert_eq!(grow(1024, range, State::Paused).0, Disruption::Live);
    let (d, why) = grow(2048, range, State::Running);
    assert_eq!(d, Disruption::Restart);
    assert!(why.contains("outside the 256–1024 MB"), "{why}");
    let (d, why) = grow(128, range, State::Running);
    assert_eq!(d, Disruption::Restart, "{why}");
    let (d, why) = grow(511, range, State::Running);
    assert_eq!(d, Disruption::Restart);
    assert!(why.contains("whole 2 MB blocks"), "{why}");
    let (d, why) = grow(512, Some(MemoryHotplug::fixed(256)), State::Running);
    assert_eq!(d, Disruption::Restart);
    assert!(why.contains("cannot be resized while it runs"), "{why}");
    // Unknown range (a recorded host): the virtstack's answer stands.
    assert_eq!(grow(4096, None, State::Running).0, Disruption::Live);
    // A stopped VM takes any size at its next start.
    let (d, _) = {
        let mut o = observed(&[("web", base("web"), State::Created)]);
        if let Some(vm) = o.vms.get_mut("web") {
            vm.memory_hotplug = Some(MemoryHotplug::fixed(256));
        }
        let mut want = base("web");
        want.memory.size_mb = 4096;
        want.power_state = PowerState::Stopped;
        let p = run(&desired(&[("web", want)]), &o);
        (p.vms[0].ops[0].disruption, ())
    };
    assert_eq!(d, Disruption::Live);
}

#[test]
fn a_vm_that_died_on_its_own_is_rebuilt_only_where_allowed() {
    let mut o = observed(&[("web", base("web"), State::Terminated)]);
    if let Some(vm) = o.vms.get_mut("web") {
        vm.exit_error = Some("qemu exited unexpectedly: killed by SIGKILL".into());
    }
    let p = run(&desired(&[("web", base("web"))]), &o);
    assert_eq!(p.vms[0].action, VmAction::Recreate);
    assert_eq!(p.vms[0].recreate_allowed, Some(false));
    assert_eq!(ops_of(&p, "web"), vec!["update powerState  [recreate]"]);
    assert!(
        p.vms[0].ops[0]
            .reason
            .starts_with("qemu exited unexpectedly")
    );

    // Desired stopped: nothing to rebuild.
    let mut stopped = base("web");
    stopped.power_state = PowerState::Stopped;
    assert!(!run(&desired(&[("web", stopped)]), &o).has_changes());
}

mod prune;

mod golden {
    use super::*;

    /// The repository's example specs against its recorded host, as a user sees them.
    fn example() -> (Plan, Loaded, ObservedState) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let loaded = load_dir(&root.join("specs"));
        let host = load_dir(&root.join("examples/recorded-host"));
        let mut o = ObservedState::default();
        for (name, vm) in host.desired.vms {
            let status = vm.status.unwrap_or(VmStatus {
                state: State::Running,
                managed: true,
            });
            o.vms.insert(
                name,
                ObservedVm {
                    config: (*vm.config).clone(),
                    state: status.state,
                    managed: status.managed,
                    exit_error: None,
                    memory_hotplug: None,
                },
            );
        }
        let p = plan(
            &loaded.desired,
            &o,
            &qemu(),
            &PlanOptions {
                prune: true,
                ..PlanOptions::default()
            },
        );
        (p, loaded, o)
    }

    fn strip_root(s: &str) -> String {
        s.replace(env!("CARGO_MANIFEST_DIR"), "<repo>")
    }

    #[test]
    fn text_rendering() {
        let (p, _, _) = example();
        insta::assert_snapshot!(
            "example_plan_text",
            render::text(&p, &render::Style::default())
        );
    }

    #[test]
    fn json_rendering() {
        let (p, loaded, _) = example();
        insta::assert_snapshot!(
            "example_plan_json",
            strip_root(&render::json(&p, &loaded.errors, &[]))
        );
    }

    #[test]
    fn unified_diff_of_canonical_yaml() {
        let (p, loaded, o) = example();
        insta::assert_snapshot!(
            "example_plan_diff",
            render::diff(&p, &loaded.desired, &o, &render::Style::default())
        );
    }

    #[test]
    fn colors_only_when_asked() {
        let (p, _, _) = example();
        assert!(!render::text(&p, &render::Style { color: false }).contains('\x1b'));
        assert!(render::text(&p, &render::Style { color: true }).contains("\x1b[32m+\x1b[0m"));
    }
}

pub(crate) mod properties;

/// Issue 20: a save the disks cannot do is refused at plan time, with the
/// reason, not discovered by `migrate` at apply time.
#[test]
fn a_save_qemu_cannot_do_with_image_disks_is_unsupported_with_why() {
    let mut have = base("web");
    have.scsi_controllers = vec![ScsiController {
        id: 0,
        disks: vec![disk(1, "/d/a.vhdx")],
    }];
    let mut want = have.clone();
    want.power_state = PowerState::Saved;
    let o = observed(&[("web", have.clone(), State::Running)]);
    let p = run(&desired(&[("web", want.clone())]), &o);
    assert_eq!(ops_of(&p, "web"), ["update powerState  [unsupported]"]);
    let reason = &p.vms[0].ops[0].reason;
    assert!(
        reason.contains("scsiDisk 0:1 (vhdx)") && reason.contains("raw"),
        "{reason}"
    );
    // Created saved: the same.
    let p = run(
        &desired(&[("web", want.clone())]),
        &ObservedState::default(),
    );
    assert!(
        p.vms[0]
            .ops
            .iter()
            .any(|o| o.resource == ResourceKind::PowerState
                && o.disruption == Disruption::Unsupported),
        "{:?}",
        p.vms[0].ops
    );
    // Raw disks save; so does a VM whose plan removes its image disk first.
    let mut raw = want.clone();
    raw.scsi_controllers[0].disks[0].disk_type = ScsiDiskType::PassThrough;
    let p = run(&desired(&[("web", raw)]), &o);
    assert_eq!(p.vms[0].disruption, Disruption::Live, "{:?}", p.vms[0].ops);
    let mut without = want;
    without.scsi_controllers[0].disks.clear();
    let p = run(&desired(&[("web", without)]), &o);
    assert_eq!(p.vms[0].disruption, Disruption::Live, "{:?}", p.vms[0].ops);
}

/// Issue 20: a boot change was printed as two raw JSON blobs.
#[test]
fn a_boot_change_names_the_fields_that_changed() {
    let have = base("web");
    let mut want = have.clone();
    if let Some(k) = want.boot.linux_kernel_direct.as_mut() {
        k.cmdline = "console=ttyS0 quiet".into();
    }
    let o = observed(&[("web", have, State::Running)]);
    let text = crate::plan::render::text(
        &run(&desired(&[("web", want)]), &o),
        &crate::plan::render::Style::default(),
    );
    let line = text
        .lines()
        .find(|l| l.contains("~ boot:"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("boot: linuxKernelDirect.cmdline: ")
            && line.contains("→ console=ttyS0 quiet"),
        "{line}"
    );
    assert!(!line.contains('{'), "{line}");
}
