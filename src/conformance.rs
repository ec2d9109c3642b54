//! The virtstack conformance suite: what the contract's module doc
//! (`vm::Virtstack`) promises, checked on a real virtstack. Every virtstack
//! runs it: the fake and remotevm → `serve` → the fake as unit tests, qemu in
//! `tests/it` against real QEMU.
//!
//! Each check makes its own VMs (named from the fixture's prefix), leaves
//! none behind when it passes, and says what it saw when it fails.

use crate::apply::{ApplyOptions, Progress, apply};
use crate::plan::{PlanOptions, plan};
use crate::reconcile::observe_all;
use crate::spec::{DesiredState, DesiredVm, PowerState, ScsiDisk, VmConfig};
use crate::vm::items::{Item, ScsiDiskItem};
use crate::vm::{Chain, Change, ErrorKind, ResourceOperation, State, Virtstack, VmError, VmName};
use std::sync::Arc;
use std::time::Duration;

/// What the suite needs to know of a virtstack's host.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// A VM that starts on this virtstack, with SCSI controller 0 (holding
    /// a disk: the vmservice protocol has no empty controllers) and no disk
    /// at the LUNs of `disks` (its power state is set by each check).
    pub base: VmConfig,
    /// Two disks (or more) the suite may attach to controller 0.
    pub disks: Vec<ScsiDisk>,
    /// Prefix of the VM names the suite makes.
    pub prefix: String,
    /// How long a change's event may take to arrive.
    pub event_timeout: Duration,
    /// How long a guest may take to boot (a save needs a guest that can
    /// let go of what does not migrate).
    pub boot_timeout: Duration,
}

/// One check's name and outcome.
pub type Outcome = (&'static str, Result<(), String>);

/// Runs every check, one after another (each boots its own VMs).
pub async fn run(vs: Arc<dyn Virtstack>, fx: &Fixture) -> Vec<Outcome> {
    let converged = convergence(&vs, fx).await;
    let vs = vs.as_ref();
    vec![
        ("executor converges", converged),
        ("errors keep their kind", error_kinds(vs, fx).await),
        ("destroy twice", destroy_twice(vs, fx).await),
        ("history kept with the VM", history_kept(vs, fx).await),
        ("stop and start keep disks", stop_start(vs, fx).await),
        ("save and restore", save_restore(vs, fx).await),
        ("a change on a stopped VM", stopped_change(vs, fx).await),
        ("events after a change", events_after_change(vs, fx).await),
        ("wait through a destroy", wait_through_destroy(vs, fx).await),
    ]
}

/// The failures of `outcomes`, one line each; empty when all passed.
pub fn failures(outcomes: &[Outcome]) -> Vec<String> {
    outcomes
        .iter()
        .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name}: {e}")))
        .collect()
}

type Check = Result<(), String>;

fn name(fx: &Fixture, what: &str) -> Result<VmName, String> {
    VmName::new(&format!("{}-{what}", fx.prefix)).map_err(|e| e.to_string())
}

fn disk(fx: &Fixture, i: usize) -> Result<Item, String> {
    let disk = fx
        .disks
        .get(i)
        .cloned()
        .ok_or_else(|| format!("the fixture has no disk {i}"))?;
    Ok(Item::ScsiDisk(ScsiDiskItem {
        controller: 0,
        disk,
    }))
}

fn shown(e: &VmError) -> String {
    format!("{:?}: {}", e.kind(), Chain(e))
}

fn with_disks(fx: &Fixture, n: usize, power: PowerState) -> VmConfig {
    let mut c = fx.base.clone();
    c.power_state = power;
    if let Some(ctl) = c.scsi_controllers.iter_mut().find(|c| c.id == 0) {
        ctl.disks.extend(fx.disks.iter().take(n).cloned());
    }
    c
}

/// A VM made from `config` and brought to run; destroyed again by `gone`.
async fn running(vs: &dyn Virtstack, name: &VmName, config: &VmConfig) -> Check {
    vs.create(name, config)
        .await
        .map_err(|e| format!("create: {}", shown(&e)))?;
    vs.start(name, false)
        .await
        .map_err(|e| format!("start: {}", shown(&e)))
}

/// Waits for the guest to signal it booted.
async fn booted(vs: &dyn Virtstack, name: &VmName, timeout: Duration) -> Check {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match vs.guest_ready(name).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(format!("guest_ready: {}", shown(&e))),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("the guest did not boot within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn gone(vs: &dyn Virtstack, name: &VmName) -> Check {
    vs.destroy(name)
        .await
        .map_err(|e| format!("destroy: {}", shown(&e)))
}

async fn observed(vs: &dyn Virtstack, name: &VmName) -> Result<crate::vm::ObservedVm, String> {
    vs.observe(name)
        .await
        .map_err(|e| format!("observe: {}", shown(&e)))
}

fn has(config: &VmConfig, item: &Item) -> bool {
    crate::vm::items::flatten(config)
        .get(&item.key())
        .is_some_and(|i| i == item)
}

/// Runs `check` on a fresh VM, and destroys that VM whatever happened.
async fn on_vm<F>(vs: &dyn Virtstack, name: &VmName, check: F) -> Check
where
    F: std::future::Future<Output = Check>,
{
    let result = check.await;
    let cleanup = match vs.destroy(name).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cleanup: {}", shown(&e))),
    };
    result.and(cleanup)
}

/// apply(plan) reaches the spec, and planning again finds nothing: a disk
/// added live, then removed, then the VM stopped.
async fn convergence(shared: &Arc<dyn Virtstack>, fx: &Fixture) -> Check {
    let vs = shared.as_ref();
    let vm = name(fx, "conv")?;
    on_vm(vs, &vm, async {
        for (step, want) in [
            with_disks(fx, 0, PowerState::Running),
            with_disks(fx, 2, PowerState::Running),
            with_disks(fx, 1, PowerState::Running),
            with_disks(fx, 1, PowerState::Stopped),
        ]
        .into_iter()
        .enumerate()
        {
            let mut d = DesiredState::default();
            d.vms.insert(
                vm.to_string(),
                DesiredVm {
                    name: vm.to_string(),
                    file: "conformance.yaml".into(),
                    doc: 0,
                    config: Arc::new(want),
                    status: None,
                    labels: Default::default(),
                },
            );
            let opts = PlanOptions::default();
            let seen = observe_all(vs).await.map_err(|e| shown(&e))?;
            let first = plan(&d, &seen, vs.capabilities(), &opts);
            let run = ApplyOptions {
                allow_recreate: true,
                ..ApplyOptions::default()
            };
            let quiet: Progress = Arc::new(|_: &str, _: &str| {});
            for o in apply(&first, &d, Arc::clone(shared), run, quiet).await {
                o.result
                    .map_err(|e| format!("step {step}: {}: {}", o.name, Chain(&e)))?;
            }
            let seen = observe_all(vs).await.map_err(|e| shown(&e))?;
            let again = plan(&d, &seen, vs.capabilities(), &opts);
            if let Some(left) = again.vms.iter().find(|v| !v.ops.is_empty()) {
                return Err(format!("step {step}: not converged: {:?}", left.ops));
            }
        }
        Ok(())
    })
    .await
}

/// Each failure has its kind: an unknown VM and a missing item are
/// `NotFound`, what the capabilities lack `NotSupported`, a stopped VM
/// `WrongState`.
async fn error_kinds(vs: &dyn Virtstack, fx: &Fixture) -> Check {
    let expect = |what: &str, got: Result<(), VmError>, kind: ErrorKind| match got {
        Ok(()) => Err(format!("{what}: succeeded, expected {kind:?}")),
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => Err(format!("{what}: {}, expected {kind:?}", shown(&e))),
    };
    let nobody = name(fx, "nobody")?;
    let add = Change::Add(disk(fx, 0)?);
    expect(
        "change on an unknown VM",
        vs.change(&nobody, &add).await,
        ErrorKind::NotFound,
    )?;
    expect(
        "destroy of an unknown VM",
        vs.destroy(&nobody).await,
        ErrorKind::NotFound,
    )?;
    expect(
        "observe of an unknown VM",
        vs.observe(&nobody).await.map(drop),
        ErrorKind::NotFound,
    )?;
    let vm = name(fx, "errs")?;
    on_vm(vs, &vm, async {
        running(vs, &vm, &with_disks(fx, 0, PowerState::Running)).await?;
        expect(
            "removal of a disk that is not attached",
            vs.change(&vm, &Change::Remove(disk(fx, 1)?)).await,
            ErrorKind::NotFound,
        )?;
        // The first device kind this virtstack does not offer, if any.
        let refused = unsupported_add(vs.capabilities());
        if let Some(change) = refused {
            expect(
                &format!("{} (capabilities say unsupported)", change.label()),
                vs.change(&vm, &change).await,
                ErrorKind::NotSupported,
            )?;
        }
        let seen = observed(vs, &vm).await?;
        if seen.state != State::Running {
            return Err(format!("refused changes left the VM {}", seen.state));
        }
        vs.stop(&vm)
            .await
            .map_err(|e| format!("stop: {}", shown(&e)))?;
        expect(
            "a disk added to a stopped VM",
            vs.change(&vm, &add).await,
            ErrorKind::WrongState,
        )
    })
    .await
}

/// A device add the capabilities call unsupported, for the error check.
fn unsupported_add(caps: &crate::vm::Capabilities) -> Option<Change> {
    let candidates = [
        Item::VsmbShare(crate::spec::VsmbShare {
            name: "conformance".into(),
            host_path: "/nonexistent".into(),
            allowed_files: vec![],
            options: crate::vm::VsmbOptions::default(),
        }),
        Item::PciDevice(crate::spec::PciDevice {
            instance_id: "PCI\\VEN_0000&DEV_0000\\0".into(),
            vmbus_guid: None,
        }),
    ];
    candidates.into_iter().find_map(|item| {
        let (kind, key) = item.key();
        let r = kind.resource(&key)?;
        (caps.support(r, ResourceOperation::Add).disruption == crate::vm::Disruption::Unsupported)
            .then_some(Change::Add(item))
    })
}

/// Destroying twice: the second is `NotFound`, and the VM is not listed.
async fn destroy_twice(vs: &dyn Virtstack, fx: &Fixture) -> Check {
    let vm = name(fx, "twice")?;
    vs.create(&vm, &with_disks(fx, 1, PowerState::Stopped))
        .await
        .map_err(|e| format!("create: {}", shown(&e)))?;
    gone(vs, &vm).await?;
    match vs.destroy(&vm).await {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(format!("second destroy: {}", shown(&e))),
        Ok(()) => return Err("second destroy succeeded".into()),
    }
    let listed = vs.list().await.map_err(|e| shown(&e))?;
    if listed.contains(&vm) {
        return Err("still listed after destroy".into());
    }
    Ok(())
}

/// A VM's history is kept in its record: read back as written, through a
/// reconfigure, and gone with the VM (a VM made again under the same name
/// starts without one).
async fn history_kept(vs: &dyn Virtstack, fx: &Fixture) -> Check {
    use crate::vm::health::Verdict;
    use crate::vm::history::{Applied, History};
    let vm = name(fx, "history")?;
    let config = with_disks(fx, 0, PowerState::Stopped);
    let fresh = |h: Result<History, VmError>, when: &str| match h {
        Ok(h) if h.is_empty() => Ok(()),
        Ok(h) => Err(format!(
            "{when}: a history of {} entries",
            h.entries().len()
        )),
        Err(e) => Err(format!("{when}: history: {}", shown(&e))),
    };
    vs.create(&vm, &config)
        .await
        .map_err(|e| format!("create: {}", shown(&e)))?;
    let mut h = History::default();
    h.applied(Applied::new(config.clone(), 1, Some("main@sha1:0".into())));
    h.judged(&config.digest(), &Verdict::Healthy);
    let kept = async {
        fresh(vs.history(&vm).await, "a new VM")?;
        vs.keep_history(&vm, &h)
            .await
            .map_err(|e| format!("keep_history: {}", shown(&e)))?;
        let back = vs.history(&vm).await.map_err(|e| shown(&e))?;
        if back != h {
            return Err(format!("read back {back:?}, kept {h:?}"));
        }
        vs.reconfigure(&vm, &with_disks(fx, 1, PowerState::Stopped))
            .await
            .map_err(|e| format!("reconfigure: {}", shown(&e)))?;
        let back = vs.history(&vm).await.map_err(|e| shown(&e))?;
        if back != h {
            return Err(format!("after a reconfigure: {back:?}"));
        }
        Ok(())
    };
    let kept = on_vm(vs, &vm, kept).await;
    kept?;
    match vs.history(&vm).await {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        other => return Err(format!("history of a destroyed VM: {other:?}")),
    }
    on_vm(vs, &vm, async {
        vs.create(&vm, &config)
            .await
            .map_err(|e| format!("create again: {}", shown(&e)))?;
        fresh(vs.history(&vm).await, "a VM made again")
    })
    .await
}

/// A disk added live survives a stop and the next start.
async fn stop_start(vs: &dyn Virtstack, fx: &Fixture) -> Check {
    let vm = name(fx, "restart")?;
    on_vm(vs, &vm, async {
        running(vs, &vm, &with_disks(fx, 0, PowerState::Running)).await?;
        let added = disk(fx, 0)?;
        vs.change(&vm, &Change::Add(added.clone()))
            .await
            .map_err(|e| format!("add: {}", shown(&e)))?;
        vs.stop(&vm)
            .await
            .map_err(|e| format!("stop: {}", shown(&e)))?;
        let seen = observed(vs, &vm).await?;
        if seen.state.is_live() || !has(&seen.config, &added) {
            return Err(format!(
                "after stop: {} with disks {:?}",
                seen.state, seen.config.scsi_controllers
            ));
        }
        vs.start(&vm, false)
            .await
            .map_err(|e| format!("start: {}", shown(&e)))?;
        let seen = observed(vs, &vm).await?;
        if seen.state != State::Running || !has(&seen.config, &added) {
            return Err(format!(
                "after start: {} with disks {:?}",
                seen.state, seen.config.scsi_controllers
            ));
        }
        Ok(())
    })
    .await
}

/// A save keeps the guest and its disks for the next start; a virtstack
/// that cannot save says so with a refusal and leaves the VM running.
async fn save_restore(vs: &dyn Virtstack, fx: &Fixture) -> Check {
    let vm = name(fx, "save")?;
    on_vm(vs, &vm, async {
        let want = with_disks(fx, 1, PowerState::Running);
        running(vs, &vm, &want).await?;
        booted(vs, &vm, fx.boot_timeout).await?;
        let kept = disk(fx, 0)?;
        match vs.save(&vm).await {
            Ok(()) => {
                let seen = observed(vs, &vm).await?;
                if seen.state != State::Saved || !has(&seen.config, &kept) {
                    return Err(format!("after save: {}", seen.state));
                }
                vs.start(&vm, false)
                    .await
                    .map_err(|e| format!("restore: {}", shown(&e)))?;
                let seen = observed(vs, &vm).await?;
                if seen.state != State::Running || !has(&seen.config, &kept) {
                    return Err(format!("after restore: {}", seen.state));
                }
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::Refused | ErrorKind::NotSupported) => {
                let seen = observed(vs, &vm).await?;
                if seen.state != State::Running {
                    return Err(format!("a refused save left the VM {}", seen.state));
                }
                Ok(())
            }
            Err(e) => Err(format!("save: {}", shown(&e))),
        }
    })
    .await
}

/// A device change on a stopped VM is refused and changes nothing; a
/// record-only change (the spec policy) is taken.
async fn stopped_change(vs: &dyn Virtstack, fx: &Fixture) -> Check {
    let vm = name(fx, "stopped")?;
    on_vm(vs, &vm, async {
        let want = with_disks(fx, 0, PowerState::Stopped);
        vs.create(&vm, &want)
            .await
            .map_err(|e| format!("create: {}", shown(&e)))?;
        let before = observed(vs, &vm).await?.config;
        match vs.change(&vm, &Change::Add(disk(fx, 0)?)).await {
            Err(e) if e.kind() == ErrorKind::WrongState => {}
            Err(e) => return Err(format!("add on a stopped VM: {}", shown(&e))),
            Ok(()) => return Err("a disk was added to a VM that does not run".into()),
        }
        let after = observed(vs, &vm).await?.config;
        if after.scsi_controllers != before.scsi_controllers {
            return Err("a refused change changed the VM".into());
        }
        let mut policy = before.policy;
        policy.protected = !policy.protected;
        let change = Change::Update {
            before: Item::Policy(before.policy),
            after: Item::Policy(policy),
        };
        vs.change(&vm, &change)
            .await
            .map_err(|e| format!("policy on a stopped VM: {}", shown(&e)))?;
        if observed(vs, &vm).await?.config.policy != policy {
            return Err("the policy change is not observed".into());
        }
        Ok(())
    })
    .await
}

/// A VM with an event source reports a device removal; one without says
/// so (`None`), and watchers resync on a timer.
async fn events_after_change(vs: &dyn Virtstack, fx: &Fixture) -> Check {
    let vm = name(fx, "events")?;
    on_vm(vs, &vm, async {
        running(vs, &vm, &with_disks(fx, 1, PowerState::Running)).await?;
        let Some(mut events) = vs.events(&vm).await.map_err(|e| shown(&e))? else {
            return Ok(());
        };
        vs.change(&vm, &Change::Remove(disk(fx, 0)?))
            .await
            .map_err(|e| format!("remove: {}", shown(&e)))?;
        match tokio::time::timeout(fx.event_timeout, events.recv()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("the event stream ended".into()),
            Err(_) => Err(format!("no event within {:?}", fx.event_timeout)),
        }
    })
    .await
}

/// `wait` on a running VM returns "stopped" when the VM is destroyed
/// meanwhile (a stop that was asked for), not an error.
async fn wait_through_destroy(vs: &dyn Virtstack, fx: &Fixture) -> Check {
    let vm = name(fx, "wait")?;
    on_vm(vs, &vm, async {
        running(vs, &vm, &with_disks(fx, 0, PowerState::Running)).await?;
        match vs.wait(&vm, Some(Duration::from_millis(50))).await {
            Ok(false) => {}
            other => {
                return Err(format!(
                    "wait on a running VM: {other:?}, expected still running"
                ));
            }
        }
        let waited = vs.wait(&vm, Some(fx.boot_timeout.max(Duration::from_secs(30))));
        let destroy = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            vs.destroy(&vm).await
        };
        let (waited, destroyed) = tokio::join!(waited, destroy);
        destroyed.map_err(|e| format!("destroy: {}", shown(&e)))?;
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => Err("wait still saw it running after the destroy".into()),
            Err(e) => Err(format!("wait through a destroy: {}", shown(&e))),
        }
    })
    .await
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spec::ScsiController;
    use crate::virtstack::fake::Fake;
    use crate::vm::{Capabilities, HostFacts, ScsiDiskType};

    /// A fixture for virtstacks that open no host file (the fake, and
    /// remotevm over it).
    pub(crate) fn fixture(prefix: &str) -> Fixture {
        let mut base = crate::plan::tests::base("vm");
        // A controller is named with a disk (the vmservice protocol has no
        // empty controllers).
        base.scsi_controllers = vec![ScsiController {
            id: 0,
            disks: vec![ScsiDisk {
                lun: 0,
                path: "/d/0.img".into(),
                disk_type: ScsiDiskType::PassThrough,
                read_only: true,
            }],
        }];
        base.serial_consoles.clear();
        base.storage_qos = None;
        let disks = (1..=2)
            .map(|lun| ScsiDisk {
                lun,
                path: format!("/d/{lun}.img").into(),
                disk_type: ScsiDiskType::PassThrough,
                read_only: false,
            })
            .collect();
        Fixture {
            base,
            disks,
            prefix: prefix.into(),
            event_timeout: Duration::from_secs(2),
            boot_timeout: Duration::from_secs(2),
        }
    }

    pub(crate) fn caps() -> Capabilities {
        Capabilities::qemu(&HostFacts {
            vhost_user_vsock: true,
            ..HostFacts::default()
        })
    }

    #[tokio::test]
    async fn the_fake_conforms() {
        let fake = Fake::new(caps());
        let out = run(Arc::new(fake.clone()), &fixture("c")).await;
        assert_eq!(out.len(), 9);
        let failed = failures(&out);
        assert!(failed.is_empty(), "{}", failed.join("\n"));
        assert!(fake.get("c-conv").is_none(), "the suite leaves no VM");
    }

    /// The suite can fail: a virtstack that answers a removal with success
    /// and keeps the disk is caught (by convergence and by the event check).
    #[tokio::test]
    async fn a_virtstack_whose_removal_lies_fails_the_suite() {
        let fake = Fake::new(caps());
        fake.lie("remove scsiDisk");
        let out = run(Arc::new(fake), &fixture("c")).await;
        let failed = failures(&out);
        assert!(
            failed.iter().any(|f| f.starts_with("executor converges")),
            "{failed:?}"
        );
        assert!(
            failed
                .iter()
                .any(|f| f.starts_with("events after a change")),
            "{failed:?}"
        );
    }
}
