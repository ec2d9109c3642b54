//! Properties over random desired/observed pairs (generators other modules'
//! tests use too): a plan applied to a small in-memory model converges,
//! equal states plan nothing, a VM whose spec failed to load is never
//! touched, and plans are deterministic.

use super::*;
use crate::vm::Resource;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn arb_disk() -> impl Strategy<Value = (u32, bool, u8)> {
    (0u32..3, any::<bool>(), 0u8..3)
}

prop_compose! {
    pub(crate) fn arb_config()(
        kernel in 0u8..2,
        cpus in 1u32..4,
        mem in prop::sample::select(vec![128u64, 256, 512]),
        deferred in any::<bool>(),
        ctrls in prop::collection::btree_map(0u32..3, prop::collection::vec(arb_disk(), 0..3), 0..3),
        nics in prop::collection::btree_map(0u8..4, 0u8..3, 0..3),
        shares in prop::collection::btree_map(0u8..3, any::<bool>(), 0..3),
        vpmem in prop::option::of(prop::collection::btree_map(0u32..3, any::<bool>(), 0..3)),
        serial in prop::collection::btree_set(0u32..2, 0..2),
        qos in prop::option::of(1u64..3),
        vsock in prop::collection::btree_set(1u32..3, 0..2),
        power in prop::sample::select(vec![PowerState::Running, PowerState::Paused, PowerState::Stopped, PowerState::Saved]),
        protected in any::<bool>(),
    ) -> VmConfig {
        let mut c = base("vm");
        if let Some(k) = c.boot.linux_kernel_direct.as_mut() {
            k.cmdline = format!("k{kernel}");
        }
        c.processors.count = cpus;
        c.memory.size_mb = mem;
        c.memory.deferred_commit = deferred;
        c.scsi_controllers = ctrls
            .into_iter()
            .map(|(id, disks)| {
                let disks: BTreeMap<u32, ScsiDisk> = disks
                    .into_iter()
                    .map(|(lun, ro, img)| (lun, ScsiDisk { read_only: ro, ..disk(lun, &format!("/d/{img}")) }))
                    .collect();
                ScsiController { id, disks: disks.into_values().collect() }
            })
            .collect();
        c.network_adapters = nics.into_iter().map(|(id, mac)| nic(id, mac + 16 * id)).collect();
        c.plan9_shares = shares
            .into_iter()
            .map(|(n, ro)| Plan9Share {
                name: format!("s{n}"),
                host_path: format!("/srv/{n}").into(),
                port: DEFAULT_PLAN9_PORT,
                flags: 0,
                allowed_files: vec![],
                read_only: ro,
            })
            .collect();
        c.vpmem = vpmem.map(|devs| Vpmem {
            maximum_devices: 4,
            maximum_size_bytes: 1 << 30,
            devices: devs
                .into_iter()
                .map(|(id, ro)| VpmemDevice { id, path: format!("/p/{id}").into(), format: VPMemImageFormat::Vhdx, read_only: ro })
                .collect(),
        });
        c.serial_consoles = serial
            .into_iter()
            .map(|port| SerialConsole { port, listener_path: format!("/run/s{port}").into() })
            .collect();
        c.storage_qos = qos.map(|q| StorageQos { iops_maximum: Some(q * 100), bandwidth_maximum: None });
        c.vm_sockets = vsock
            .into_iter()
            .map(|port| VmSocket { socket_type: VMSocketType::VSock, service_id: None, port: Some(port), listener_path: format!("/run/v{port}").into() })
            .collect();
        c.power_state = power;
        c.policy.protected = protected;
        c
    }
}

fn arb_support() -> impl Strategy<Value = Support> {
    prop_oneof![
        Just(Support::live()),
        Just(Support::restart("r")),
        Just(Support::recreate("c"))
    ]
}

/// A virtstack that can do everything, each cell at a random cost.
fn arb_caps() -> impl Strategy<Value = Capabilities> {
    prop::collection::vec(arb_support(), Resource::ALL.len() * 3).prop_map(|cells| {
        let mut c = Capabilities::new("model");
        c.guest_os.insert(GuestOs::Linux);
        let mut it = cells.into_iter();
        for r in Resource::ALL {
            for op in ResourceOperation::ALL {
                c.set(r, op, it.next().unwrap_or_else(Support::live));
            }
        }
        c
    })
}

fn arb_state() -> impl Strategy<Value = State> {
    prop::sample::select(vec![
        State::Created,
        State::Running,
        State::Paused,
        State::Terminated,
    ])
}

prop_compose! {
    pub(crate) fn arb_world()(
        want in prop::collection::btree_map(0u8..5, arb_config(), 0..4),
        have in prop::collection::btree_map(0u8..5, (arb_config(), arb_state(), prop::bool::weighted(0.85)), 0..4),
        unknown in prop::collection::btree_set(0u8..6, 0..2),
        prune in any::<bool>(),
        caps in arb_caps(),
    ) -> (DesiredState, ObservedState, Capabilities, PlanOptions) {
        let mut d = DesiredState::default();
        for (i, c) in want {
            let name = format!("vm{i}");
            if unknown.contains(&i) {
                continue;
            }
            d.vms.insert(name.clone(), DesiredVm { name, file: "t.yaml".into(), doc: 0, config: c.into(), status: None, labels: Default::default() });
        }
        for i in &unknown {
            d.unknown.insert(format!("vm{i}"));
            d.failed_files.insert("broken.yaml".into());
        }
        let mut o = ObservedState::default();
        for (i, (c, state, managed)) in have {
            o.vms.insert(format!("vm{i}"), ObservedVm { config: c, state, managed, exit_error: None, memory_hotplug: None });
        }
        (d, o, caps, PlanOptions { prune, ..PlanOptions::default() })
    }
}

fn state_for(p: PowerState) -> State {
    match p {
        PowerState::Running => State::Running,
        PowerState::Paused => State::Paused,
        PowerState::Stopped => State::Terminated,
        PowerState::Saved => State::Saved,
    }
}

/// The in-memory model: what a virtstack would have after executing `p`.
fn apply(p: &Plan, o: &ObservedState) -> ObservedState {
    let mut out = o.clone();
    for vm in &p.vms {
        match vm.action {
            VmAction::Destroy => {
                out.vms.remove(&vm.name);
            }
            VmAction::Create | VmAction::Recreate => {
                let spec = vm.spec.clone().expect("create and recreate carry the spec");
                let state = state_for(spec.power_state);
                out.vms.insert(
                    vm.name.clone(),
                    ObservedVm {
                        config: spec,
                        state,
                        managed: true,
                        exit_error: None,
                        memory_hotplug: None,
                    },
                );
            }
            VmAction::Update => {
                let have = out.vms.get_mut(&vm.name).expect("update of an observed VM");
                let mut items = flatten(&have.config);
                for op in &vm.ops {
                    if op.resource == ResourceKind::PowerState {
                        let word = match &op.after {
                            Some(Item::PowerState(w)) => *w,
                            other => panic!("power op without a state: {other:?}"),
                        };
                        have.state = match word {
                            "running" => State::Running,
                            "paused" => State::Paused,
                            "saved" => State::Saved,
                            _ => State::Terminated,
                        };
                        continue;
                    }
                    let key = (op.resource, op.key.clone());
                    match op.operation {
                        ResourceOperation::Remove => {
                            assert!(
                                items.remove(&key).is_some(),
                                "removed {key:?}, which is not there"
                            );
                        }
                        ResourceOperation::Add => {
                            let after = op.after.clone().expect("add carries the item");
                            assert!(
                                items.insert(key.clone(), after).is_none(),
                                "added {key:?}, which is there"
                            );
                        }
                        ResourceOperation::Update => {
                            let after = op.after.clone().expect("update carries the item");
                            assert!(
                                items.insert(key.clone(), after).is_some(),
                                "updated {key:?}, which is not there"
                            );
                        }
                    }
                }
                have.config = unflatten(&items, have.config.power_state).expect("consistent items");
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn applying_the_plan_converges((d, o, caps, opts) in arb_world()) {
        let p = plan(&d, &o, &caps, &opts);
        let after = apply(&p, &o);
        for (name, want) in &d.vms {
            let have = &after.vms[name];
            if !have.managed {
                continue;
            }
            prop_assert_eq!(flatten(&have.config), flatten(&want.config), "{}", name);
            prop_assert_eq!(observed_power(have.state), want.config.power_state);
        }
        let again = plan(&d, &after, &caps, &opts);
        prop_assert!(!again.has_changes(), "second plan not empty: {:#?}", again.vms);
    }

    #[test]
    fn plan_of_equal_states_is_empty((d, _o, caps, opts) in arb_world()) {
        let o = ObservedState {
            vms: d.vms.iter().map(|(n, v)| {
                (n.clone(), ObservedVm { config: (*v.config).clone(), state: state_for(v.config.power_state), managed: true, exit_error: None, memory_hotplug: None })
            }).collect(),
            unknown: Default::default(),
        };
        let p = plan(&d, &o, &caps, &opts);
        prop_assert!(!p.has_changes());
    }

    #[test]
    fn no_plan_touches_a_vm_whose_spec_failed_to_load((d, o, caps, opts) in arb_world()) {
        let p = plan(&d, &o, &caps, &PlanOptions { prune: true, ..opts });
        for vm in &p.vms {
            prop_assert!(!d.unknown.contains(&vm.name), "{} planned despite a broken spec", vm.name);
            if !d.failed_files.is_empty() {
                prop_assert!(vm.action != VmAction::Destroy, "pruned {} while a spec file is broken", vm.name);
            }
        }
    }

    #[test]
    fn plans_are_deterministic_and_ignore_list_order((d, o, caps, opts) in arb_world()) {
        let a = render::json(&plan(&d, &o, &caps, &opts), &[], &[]);
        let b = render::json(&plan(&d, &o, &caps, &opts), &[], &[]);
        prop_assert_eq!(&a, &b);
        let mut shuffled = d.clone();
        for vm in shuffled.vms.values_mut() {
            let c = std::sync::Arc::make_mut(&mut vm.config);
            c.scsi_controllers.reverse();
            for ctrl in &mut c.scsi_controllers {
                ctrl.disks.reverse();
            }
            c.network_adapters.reverse();
            c.plan9_shares.reverse();
            c.serial_consoles.reverse();
            c.vm_sockets.reverse();
        }
        let p = plan(&shuffled, &o, &caps, &opts);
        let mut canon = p.clone();
        for vm in canon.vms.iter_mut() {
            if let Some(spec) = vm.spec.as_mut() {
                spec.canonicalize();
            }
        }
        let mut reference = plan(&d, &o, &caps, &opts);
        for vm in reference.vms.iter_mut() {
            if let Some(spec) = vm.spec.as_mut() {
                spec.canonicalize();
            }
        }
        prop_assert_eq!(render::json(&canon, &[], &[]), render::json(&reference, &[], &[]));
    }
}

#[test]
fn the_model_checks_its_own_bookkeeping() {
    // Guards against a model that accepts anything: removing what is not
    // there must be caught.
    let o = observed(&[("web", base("web"), State::Running)]);
    let bogus = Plan {
        prune_refused: None,
        virtstack: "model".into(),
        vms: vec![VmPlan {
            name: "web".into(),
            action: VmAction::Update,
            disruption: Disruption::Live,
            recreate_allowed: None,
            observed: None,
            ops: vec![Op {
                operation: ResourceOperation::Remove,
                resource: ResourceKind::ScsiDisk,
                key: ItemKey::Lun(0, 0),
                disruption: Disruption::Live,
                reason: String::new(),
                before: None,
                after: None,
            }],
            spec: None,
        }],
        notes: vec![],
        unchanged: 0,
    };
    let caught = std::panic::catch_unwind(|| apply(&bogus, &o));
    assert!(caught.is_err());
    let _ = GuestOs::Linux;
}
