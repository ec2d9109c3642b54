//! The executor against the in-memory virtstack: order, failure isolation,
//! partial failure, and apply(plan) converging through the real executor.

use super::*;
use crate::plan::tests::{base, desired};
use crate::plan::{PlanOptions, plan};
use crate::reconcile::observe_all;
use crate::spec::{ScsiController, ScsiDisk};
use crate::virtstack::fake::{Fake, FakeVm};
use crate::vm::{Capabilities, HostFacts, Observe, ScsiDiskType};

fn running(config: VmConfig) -> FakeVm {
    FakeVm {
        config,
        state: State::Running,
        managed: true,
    }
}

fn with_disks(name: &str, luns: &[u32]) -> VmConfig {
    let mut c = base(name);
    if !luns.is_empty() {
        c.scsi_controllers = vec![ScsiController {
            id: 0,
            disks: luns
                .iter()
                .map(|lun| ScsiDisk {
                    lun: *lun,
                    path: format!("/d/{name}-{lun}.vhdx").into(),
                    disk_type: ScsiDiskType::Vhdx,
                    read_only: false,
                })
                .collect(),
        }];
    }
    c
}

fn quiet() -> Progress {
    Arc::new(|_: &str, _: &str| {})
}

/// The qemu profile on a host with everything, as the fake's capabilities.
fn qemu_caps() -> Capabilities {
    Capabilities::qemu(&HostFacts {
        vhost_vsock: true,
        vhost_user_vsock: true,
        vfio: true,
        ovmf: true,
        pin_memory_refused: None,
        isolation: None,
    })
}

async fn plan_and_apply(fake: &Fake, d: &DesiredState) -> (Plan, Vec<VmOutcome>) {
    let observed = observe_all(fake).await.expect("list");
    let p = plan(d, &observed, fake.capabilities(), &PlanOptions::default());
    let opts = ApplyOptions {
        allow_recreate: true,
        ..ApplyOptions::default()
    };
    let out = apply(&p, d, Arc::new(fake.clone()), opts, quiet()).await;
    (p, out)
}

/// Issue 30: Ctrl+C during apply ended uvmctl with no word of where each
/// VM was left. An interrupt lets each VM finish the step in flight, stops
/// it there, and its outcome says how far it got.
#[tokio::test]
async fn an_interrupt_stops_each_vm_after_the_step_in_flight() {
    static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
    let fake = Fake::new(qemu_caps());
    let mut have = with_disks("web", &[1, 2]);
    have.processors.count = 1;
    fake.insert("web", running(have));
    let mut want = with_disks("web", &[3]);
    want.processors.count = 2;
    let d = desired(&[("web", want)]);
    let observed = observe_all(&fake).await.expect("list");
    let p = plan(&d, &observed, fake.capabilities(), &PlanOptions::default());
    assert!(p.vms[0].ops.len() > 1, "a plan of several steps");
    let opts = ApplyOptions {
        interrupt: Some(&INTERRUPTED),
        ..ApplyOptions::default()
    };
    let out = apply(&p, &d, Arc::new(fake.clone()), opts, quiet()).await;
    assert_eq!(
        out[0].steps, 1,
        "the step in flight finished, no other began"
    );
    assert!(
        matches!(out[0].result, Err(ApplyError::Interrupted)),
        "{:?}",
        out[0].result
    );
    assert!(
        out[0]
            .result
            .as_ref()
            .is_err_and(|e| e.to_string().contains("`uvmctl plan` shows what is left"))
    );
}

#[tokio::test]
async fn a_vm_runs_its_ops_in_plan_order_removals_updates_additions_then_power() {
    let fake = Fake::new(qemu_caps());
    let mut have = with_disks("web", &[1, 2]);
    have.processors.count = 1;
    fake.insert("web", running(have));
    let mut want = with_disks("web", &[3]);
    want.scsi_controllers[0].id = 1;
    want.processors.count = 2;
    want.power_state = PowerState::Paused;
    let (_, out) = plan_and_apply(&fake, &desired(&[("web", want.clone())])).await;
    assert!(out.iter().all(|o| o.result.is_ok()), "{out:?}");
    let log: Vec<String> = fake
        .log()
        .into_iter()
        .filter(|l| !l.ends_with("observe"))
        .collect();
    assert_eq!(
        log,
        vec![
            // Leaves before their container, in reverse key order.
            "web remove scsiDisk",
            "web remove scsiDisk",
            "web remove scsiController",
            "web update processors",
            "web add scsiController",
            "web add scsiDisk",
            "web pause",
        ]
    );
    let vm = fake.get("web").expect("still there");
    assert_eq!(vm.state, State::Paused);
    assert_eq!(
        crate::plan::flatten(&vm.config),
        crate::plan::flatten(&want)
    );
}

#[tokio::test]
async fn one_failing_vm_leaves_the_others_applied_and_says_why() {
    let fake = Fake::new(qemu_caps());
    for name in ["a", "b", "c"] {
        fake.insert(name, running(with_disks(name, &[])));
    }
    fake.fail("b", "add scsiController");
    let d = desired(&[
        ("a", with_disks("a", &[0])),
        ("b", with_disks("b", &[0])),
        ("c", with_disks("c", &[0])),
    ]);
    let (_, out) = plan_and_apply(&fake, &d).await;
    let failed: Vec<&str> = out
        .iter()
        .filter(|o| o.result.is_err())
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(failed, vec!["b"]);
    let why = out
        .iter()
        .find_map(|o| o.result.as_ref().err())
        .map(|e| Chain(e).to_string())
        .unwrap_or_default();
    assert!(why.contains("scripted"), "{why}");
    for name in ["a", "c"] {
        let vm = fake.get(name).expect("there");
        assert_eq!(vm.config.scsi_controllers.len(), 1, "{name} applied");
    }
    assert!(
        fake.get("b")
            .expect("there")
            .config
            .scsi_controllers
            .is_empty()
    );
}

#[tokio::test]
async fn a_hung_vm_never_delays_the_others() {
    let fake = Fake::new(qemu_caps());
    for name in ["stuck", "well"] {
        fake.insert(name, running(with_disks(name, &[])));
    }
    fake.hang("stuck", "add scsiController");
    let d = desired(&[
        ("stuck", with_disks("stuck", &[0])),
        ("well", with_disks("well", &[0])),
    ]);
    let observed = observe_all(&fake).await.expect("list");
    let p = plan(&d, &observed, fake.capabilities(), &PlanOptions::default());
    let run = apply(
        &p,
        &d,
        Arc::new(fake.clone()),
        ApplyOptions::default(),
        quiet(),
    );
    // The executor as a whole waits for every VM; the healthy one is done
    // long before: nothing it does waits on the stuck one.
    let waited = tokio::time::timeout(std::time::Duration::from_millis(300), run).await;
    assert!(waited.is_err(), "the stuck VM never returns");
    let well = fake.get("well").expect("there");
    assert_eq!(well.config.scsi_controllers.len(), 1);
    assert_eq!(well.config.scsi_controllers[0].disks.len(), 1);
}

#[tokio::test]
async fn a_vm_that_cannot_be_observed_is_unknown_and_the_others_are_planned() {
    let fake = Fake::new(qemu_caps());
    for name in ["stuck", "broken", "well"] {
        fake.insert(name, running(with_disks(name, &[])));
    }
    fake.hang("stuck", "observe");
    fake.fail("broken", "observe");
    let d = desired(&[
        ("stuck", with_disks("stuck", &[0])),
        ("broken", with_disks("broken", &[0])),
        ("well", with_disks("well", &[0])),
    ]);
    let observed =
        crate::reconcile::observe_all_within(&fake, std::time::Duration::from_millis(100))
            .await
            .expect("list");
    assert_eq!(
        observed.unknown.keys().collect::<Vec<_>>(),
        vec!["broken", "stuck"]
    );
    assert!(observed.unknown["stuck"].contains("no answer within"));
    assert!(observed.unknown["broken"].contains("scripted"));
    let p = plan(
        &d,
        &observed,
        fake.capabilities(),
        &PlanOptions {
            prune: true,
            ..PlanOptions::default()
        },
    );
    let planned: Vec<&str> = p.vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        planned,
        vec!["well"],
        "unknown VMs are neither changed nor recreated"
    );
    let unknown: Vec<&str> = p
        .notes
        .iter()
        .filter(|n| n.kind == crate::plan::NoteKind::Unknown)
        .map(|n| n.vm.as_str())
        .collect();
    assert_eq!(unknown, vec!["broken", "stuck"]);
}

#[tokio::test]
async fn a_partial_failure_leaves_a_true_state_and_the_next_plan_finishes_it() {
    let fake = Fake::new(qemu_caps());
    fake.insert("web", running(with_disks("web", &[])));
    // The controller goes in, its first disk fails: the second never starts.
    fake.fail("web", "add scsiDisk");
    let want = with_disks("web", &[0, 1]);
    let d = desired(&[("web", want.clone())]);
    let (_, out) = plan_and_apply(&fake, &d).await;
    assert!(out[0].result.is_err());
    assert_eq!(out[0].steps, 1, "the controller went in");
    let vm = fake.get("web").expect("there");
    assert_eq!(vm.config.scsi_controllers.len(), 1);
    assert!(vm.config.scsi_controllers[0].disks.is_empty());

    // What is left is exactly what the next plan does.
    let fake_ok = Fake::new(qemu_caps());
    fake_ok.insert("web", vm);
    let (again, out) = plan_and_apply(&fake_ok, &d).await;
    let ops: Vec<String> = again.vms[0]
        .ops
        .iter()
        .map(|o| format!("{} {} {}", o.operation, o.resource, o.key))
        .collect();
    assert_eq!(ops, vec!["add scsiDisk 0:0", "add scsiDisk 0:1"]);
    assert!(out[0].result.is_ok());
    let (last, _) = plan_and_apply(&fake_ok, &d).await;
    assert!(!last.has_changes());
}

#[tokio::test]
async fn an_unsupported_op_leaves_the_vm_untouched() {
    let fake = Fake::new(qemu_caps());
    fake.insert("web", running(with_disks("web", &[])));
    let mut want = with_disks("web", &[0]);
    want.memory.mmio = Some(crate::spec::Mmio {
        low_gap_mb: 256,
        high_base_mb: 65536,
        high_gap_mb: 1024,
    });
    let (p, out) = plan_and_apply(&fake, &desired(&[("web", want)])).await;
    assert_eq!(p.vms[0].disruption, Disruption::Unsupported);
    let err = out[0].result.as_ref().expect_err("refused");
    assert!(err.to_string().contains("MMIO"), "{err}");
    assert!(
        fake.log().iter().all(|l| l.ends_with("observe")),
        "{:?}",
        fake.log()
    );
}

#[tokio::test]
async fn preflight_names_each_refused_vm_with_its_file() {
    let fake = Fake::new(qemu_caps());
    let mut win = base("win");
    win.guest_os = crate::vm::GuestOs::Windows;
    let d = desired(&[("win", win), ("ok", base("ok"))]);
    let p = plan(
        &d,
        &Default::default(),
        fake.capabilities(),
        &PlanOptions::default(),
    );
    let refused = preflight(&p, &d, &fake);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].vm, "win");
    assert_eq!(refused[0].field, "spec.guestOS");
    assert!(
        refused[0]
            .to_string()
            .starts_with("t.yaml: spec.guestOS: the qemu virtstack runs linux guests"),
        "{}",
        refused[0]
    );
}

mod properties {
    use super::*;
    use crate::plan::tests::properties::arb_world;
    use proptest::prelude::*;

    /// Random worlds, where some specs are their VM as observed with one
    /// setting changed (a power state, a vCPU count, a disk less): random
    /// specs alone almost always need a restart, which would leave the
    /// live paths untried.
    fn arb_near_world() -> impl Strategy<
        Value = (
            DesiredState,
            crate::vm::ObservedState,
            Capabilities,
            PlanOptions,
        ),
    > {
        (
            arb_world(),
            prop::collection::vec((any::<bool>(), 0u8..4, 0u8..4), 5),
        )
            .prop_map(|((mut d, o, caps, opts), tweaks)| {
                for ((name, want), (copy, what, power)) in d.vms.iter_mut().zip(tweaks) {
                    let Some(have) = o.vms.get(name) else {
                        continue;
                    };
                    if !copy {
                        continue;
                    }
                    let mut c = have.config.clone();
                    match what {
                        0 => c.processors.count = c.processors.count % 3 + 1,
                        1 => {
                            c.scsi_controllers.pop();
                        }
                        2 => c.policy.protected = !c.policy.protected,
                        _ => {}
                    }
                    c.power_state = [
                        PowerState::Running,
                        PowerState::Paused,
                        PowerState::Stopped,
                        PowerState::Saved,
                    ][usize::from(power)];
                    want.config = c.into();
                }
                (d, o, caps, opts)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// apply(plan) through the real executor against the fake, then
        /// plan again: nothing left to do.
        #[test]
        fn the_executor_converges_on_the_fake_virtstack((d, o, caps, opts) in arb_near_world()) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime");
            let fake = Fake::new(caps);
            for (name, vm) in &o.vms {
                fake.insert(name, FakeVm { config: vm.config.clone(), state: vm.state, managed: vm.managed });
            }
            let (first, outcomes, again) = rt.block_on(async {
                let observed = observe_all(&fake).await.expect("list");
                let first = plan(&d, &observed, fake.capabilities(), &opts);
                let run = ApplyOptions { allow_recreate: true, ..ApplyOptions::default() };
                let outcomes = apply(&first, &d, Arc::new(fake.clone()), run, quiet()).await;
                let observed = observe_all(&fake).await.expect("list");
                (first, outcomes, plan(&d, &observed, fake.capabilities(), &opts))
            });
            for o in &outcomes {
                prop_assert!(o.result.is_ok(), "{}: {:?}\nplan: {:#?}", o.name, o.result, first.vms);
            }
            prop_assert!(!again.has_changes(), "second plan not empty: {:#?}\nfirst: {:#?}", again.vms, first.vms);
        }
    }
}

#[tokio::test]
async fn a_paused_vm_meant_to_run_resumes_before_its_devices_change() {
    // A paused guest cannot acknowledge an unplug, so it runs first.
    let fake = Fake::new(qemu_caps());
    let mut have = with_disks("web", &[1, 2]);
    have.power_state = PowerState::Paused;
    fake.insert(
        "web",
        FakeVm {
            config: have,
            state: State::Paused,
            managed: true,
        },
    );
    let want = with_disks("web", &[1]);
    let (_, out) = plan_and_apply(&fake, &desired(&[("web", want)])).await;
    assert!(out.iter().all(|o| o.result.is_ok()), "{out:?}");
    let log: Vec<String> = fake
        .log()
        .into_iter()
        .filter(|l| !l.ends_with("observe"))
        .collect();
    assert_eq!(log, ["web resume", "web remove scsiDisk"]);
    assert_eq!(fake.get("web").expect("web").state, State::Running);
}

/// Issue 20: a refused recreate read `boot boot is cold-only`.
#[tokio::test]
async fn a_refused_recreate_names_each_reason_once() {
    let fake = Fake::new(qemu_caps());
    fake.insert("web", running(with_disks("web", &[])));
    let mut want = with_disks("web", &[]);
    if let Some(k) = want.boot.linux_kernel_direct.as_mut() {
        k.kernel = "/k/other/vmlinuz".into();
    }
    let d = desired(&[("web", want)]);
    let observed = observe_all(&fake).await.expect("list");
    let p = plan(&d, &observed, fake.capabilities(), &PlanOptions::default());
    let out = apply(
        &p,
        &d,
        Arc::new(fake.clone()),
        ApplyOptions::default(),
        quiet(),
    )
    .await;
    let err = out[0].result.as_ref().expect_err("not allowed").to_string();
    assert!(err.contains("(boot is cold-only"), "{err}");
    assert!(!err.contains("boot boot"), "{err}");
}

/// Issue 34: `--wait-healthy` judges by `spec.health` (on paused time, with
/// the simulator's health rule): a guest whose probe passes for its minimum
/// time is healthy; one whose probe keeps failing is unhealthy at its
/// deadline, the probe and its answer named.
#[tokio::test(start_paused = true)]
async fn wait_healthy_judges_by_the_probes_and_names_the_one_that_failed() {
    use crate::virtstack::sim::{Sim, UNHEALTHY_WORD};
    use crate::vm::config::{Health, Probe, ProbeKind};
    let dir = tempfile::tempdir().expect("tempdir");
    Sim::ensure_dir(dir.path()).expect("records dir");
    let sim = Arc::new(Sim::new(dir.path()));
    let with_health = |name: &str, cmdline: &str| {
        let mut c = base(name);
        if let Some(k) = c.boot.linux_kernel_direct.as_mut() {
            k.cmdline = cmdline.into();
        }
        c.health = Some(Health {
            probes: vec![Probe {
                interval_seconds: 1,
                min_healthy_seconds: 3,
                deadline_seconds: 10,
                ..Probe::of(ProbeKind::Agent)
            }],
        });
        c
    };
    let d = desired(&[
        ("good", with_health("good", "console=ttyS0")),
        (
            "bad",
            with_health("bad", &format!("console=ttyS0 {UNHEALTHY_WORD}")),
        ),
    ]);
    let observed = observe_all(sim.as_ref()).await.expect("list");
    let p = plan(&d, &observed, sim.capabilities(), &PlanOptions::default());
    let said: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&said);
    let progress: Progress = Arc::new(move |vm: &str, msg: &str| {
        log.lock().expect("log").push(format!("{vm}: {msg}"));
    });
    let started = tokio::time::Instant::now();
    let opts = ApplyOptions {
        wait_healthy: Some(std::time::Duration::from_secs(60)),
        ..ApplyOptions::default()
    };
    let out = apply(&p, &d, sim, opts, progress).await;
    let result = |name: &str| {
        out.iter()
            .find(|o| o.name == name)
            .map(|o| o.result.as_ref().map_err(ToString::to_string).cloned())
    };
    assert_eq!(result("good"), Some(Ok(())));
    assert_eq!(
        result("bad"),
        Some(Err(
            "unhealthy: probe agent: simulated: uvmctl.sim.unhealthy on its command line; it runs on"
                .to_string()
        ))
    );
    // The bad one is judged at its 10 s deadline, not before.
    assert_eq!(started.elapsed().as_secs(), 10);
    let said = said.lock().expect("log");
    assert!(
        said.contains(&"good: probe agent passes: pong".to_string()),
        "{said:?}"
    );
    assert!(
        said.contains(&"good: healthy after 3.0s".to_string()),
        "{said:?}"
    );
}
