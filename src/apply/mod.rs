//! ⑤ The executor: runs a [`Plan`] against the QEMU virtstack, VM by VM
//! (VMs in parallel, operations within one VM in plan order).
//!
//! # Guarantees
//! - A VM with an operation its virtstack cannot do is not touched at all.
//! - A recreate happens only when `--allow-recreate` or the spec's policy allows it.
//! - A failing VM does not stop the others; each gets its own outcome.
//! - After each hot operation the launch record is updated, so a later
//!   restart launches what the VM really has.
//!
//! # Assumptions
//! - One executor per state directory at a time (the CLI holds a lock).
//!
//! # Caveats
//! - An unplug the guest never acknowledges fails the VM and leaves the
//!   device in place; the next plan shows the removal again.

pub mod lock;

use crate::plan::{Item, ItemKey, Op, Plan, ResourceKind, VmAction, VmPlan, observed_power};
use crate::spec::{DesiredState, PowerState, VmConfig};
use crate::virtstack::qemu::{LaunchRecord, Qemu, QemuError};
use crate::vm::{Disruption, ResourceOperation, State, Uvm};
use std::sync::Arc;

/// Why one VM could not be brought to its spec.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The virtstack failed.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// Some operation cannot be done by this virtstack.
    #[error("not applied: {0}")]
    Unsupported(String),
    /// A recreate is needed but not allowed.
    #[error("must be recreated ({0}), which needs --allow-recreate or spec.policy.allowRecreate")]
    RecreateNotAllowed(String),
    /// The guest did not open its agent port in time (`--wait-ready`).
    #[error("the guest did not open its agent port within {0:?}; it runs on")]
    NotReady(std::time::Duration),
    /// The plan and the VM disagree (changed since planning).
    #[error("{0}")]
    Inconsistent(String),
}

/// Choices for one apply.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// Recreate VMs whose spec policy does not allow it.
    pub allow_recreate: bool,
    /// Wait up to this long for each VM meant to run to open its guest agent
    /// port (a guest without uvmctl's agent never does).
    pub wait_ready: Option<std::time::Duration>,
}

/// A long wait shows as it goes: after 2 s, then every 5 s.
async fn with_ticker<T>(
    progress: &Progress,
    vm: &str,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    let started = std::time::Instant::now();
    tokio::pin!(fut);
    let mut next = std::time::Duration::from_secs(2);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(started + next)) => {
                progress(vm, &format!("still {what} ({}s)", next.as_secs()));
                next += std::time::Duration::from_secs(5);
            }
        }
    }
}

/// Waits for the guest of a VM meant to run to open its agent port.
async fn wait_ready(
    q: &Qemu,
    name: &str,
    timeout: std::time::Duration,
    progress: &Progress,
) -> Result<(), ApplyError> {
    let started = std::time::Instant::now();
    let poll = async {
        loop {
            if q.guest_ready(name).await? {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(ApplyError::NotReady(timeout));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    with_ticker(progress, name, "waiting for the guest to boot", poll).await?;
    progress(
        name,
        &format!("guest ready after {:.1}s", started.elapsed().as_secs_f64()),
    );
    Ok(())
}

/// Reports progress: `(vm, message)`.
pub type Progress = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// What happened to one VM.
#[derive(Debug)]
pub struct VmOutcome {
    /// VM name.
    pub name: String,
    /// Success, or why not.
    pub result: Result<(), ApplyError>,
}

/// Applies every VM plan, in parallel.
pub async fn apply(
    plan: &Plan,
    desired: &DesiredState,
    qemu: &Qemu,
    opts: ApplyOptions,
    progress: Progress,
) -> Vec<VmOutcome> {
    let mut set = tokio::task::JoinSet::new();
    for vm in &plan.vms {
        let vm = vm.clone();
        let want = desired.vms.get(&vm.name).map(|d| d.config.clone());
        let qemu = qemu.clone();
        let progress = progress.clone();
        set.spawn(async move {
            let result = apply_vm(&qemu, &vm, want.as_ref(), opts, &progress).await;
            match &result {
                Ok(()) => progress(&vm.name, "done"),
                Err(e) => progress(&vm.name, &format!("failed: {e}")),
            }
            VmOutcome {
                name: vm.name,
                result,
            }
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(o) => out.push(o),
            Err(e) => out.push(VmOutcome {
                name: "?".into(),
                result: Err(ApplyError::Inconsistent(format!(
                    "executor task failed: {e}"
                ))),
            }),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

async fn apply_vm(
    q: &Qemu,
    vm: &VmPlan,
    want: Option<&VmConfig>,
    opts: ApplyOptions,
    progress: &Progress,
) -> Result<(), ApplyError> {
    let unsupported: Vec<String> = vm
        .ops
        .iter()
        .filter(|o| o.disruption == Disruption::Unsupported)
        .map(|o| format!("{} {} {}: {}", o.operation, o.resource, o.key, o.reason))
        .collect();
    if !unsupported.is_empty() {
        return Err(ApplyError::Unsupported(unsupported.join("; ")));
    }
    let name = vm.name.as_str();
    let spec = || want.ok_or_else(|| ApplyError::Inconsistent(format!("no spec for {name}")));
    match vm.action {
        VmAction::Create => {
            progress(name, "creating and launching");
            with_ticker(progress, name, "launching", q.create(name, spec()?)).await?;
        }
        VmAction::Destroy => {
            progress(name, "destroying");
            q.destroy(name).await?;
        }
        VmAction::Recreate => {
            let reasons: Vec<String> = vm
                .ops
                .iter()
                .filter(|o| o.disruption == Disruption::Recreate)
                .map(|o| format!("{} {}", o.resource, o.reason))
                .collect();
            if !(opts.allow_recreate || vm.recreate_allowed == Some(true)) {
                return Err(ApplyError::RecreateNotAllowed(reasons.join("; ")));
            }
            progress(name, "recreating");
            if q.list().iter().any(|n| n == name) {
                q.destroy(name).await?;
            }
            with_ticker(progress, name, "launching", q.create(name, spec()?)).await?;
        }
        VmAction::Update => update(q, vm, spec()?, progress).await?,
    }
    if let (Some(timeout), Some(PowerState::Running)) =
        (opts.wait_ready, want.map(|w| w.power_state))
    {
        wait_ready(q, name, timeout, progress).await?;
    }
    Ok(())
}

async fn update(
    q: &Qemu,
    vm: &VmPlan,
    want: &VmConfig,
    progress: &Progress,
) -> Result<(), ApplyError> {
    let name = vm.name.as_str();
    let now = q.observe(name).await?;
    let mut state = now.state;
    let (changes, power): (Vec<&Op>, Vec<&Op>) = vm
        .ops
        .iter()
        .partition(|o| o.resource != ResourceKind::PowerState);
    let restart = changes.iter().any(|o| o.disruption == Disruption::Restart);

    if state == State::Saved && !changes.is_empty() && !restart {
        // The guest comes back as it was saved; the changes are then live ones.
        progress(name, "restoring the saved guest to apply changes");
        with_ticker(progress, name, "restoring", q.start_paused(name)).await?;
        state = State::Paused;
    }
    if !state.is_live() && state != State::Saved {
        // Nothing runs: the new configuration takes effect when it starts.
        q.set_config(name, want)?;
    } else if restart {
        progress(name, "restarting to apply cold changes");
        with_ticker(progress, name, "stopping", q.stop(name)).await?;
        q.set_config(name, want)?;
        return bring_to(q, name, PowerState::Stopped, want.power_state, progress).await;
    } else if !changes.is_empty() {
        // Each live change goes through the core VM traits, which record
        // it at once: a failure later leaves a true record.
        let uvm = q.vm(name)?;
        for op in changes {
            let what = format!("{} {} {}", op.operation, op.resource, op.key);
            progress(name, &what);
            with_ticker(progress, name, &what, hot(q, &uvm, op)).await?;
        }
    }
    if power.is_empty() && state == now.state {
        return Ok(());
    }
    bring_to(q, name, observed_power(state), want.power_state, progress).await
}

/// Moves a VM from one power state to another.
async fn bring_to(
    q: &Qemu,
    name: &str,
    from: PowerState,
    to: PowerState,
    progress: &Progress,
) -> Result<(), ApplyError> {
    use PowerState::*;
    match (from, to) {
        (a, b) if a == b => {}
        (Running, Paused) => q.pause(name).await?,
        (Paused, Running) => q.resume(name).await?,
        (Stopped, Running) => {
            progress(name, "starting");
            with_ticker(progress, name, "starting", q.start(name)).await?;
        }
        (Saved, Running) => {
            progress(name, "restoring the saved guest");
            with_ticker(progress, name, "restoring", q.start(name)).await?;
        }
        (Stopped, Paused) => {
            progress(name, "starting paused");
            q.start_paused(name).await?;
        }
        (Saved, Paused) => {
            progress(name, "restoring the saved guest, paused");
            q.start_paused(name).await?;
        }
        (Saved, Stopped) => {
            progress(name, "discarding the saved guest state");
            q.stop(name).await?;
        }
        (Running | Paused, Stopped) => {
            progress(name, "stopping (ACPI power button, then forced)");
            with_ticker(progress, name, "stopping", q.stop(name)).await?;
        }
        (Running | Paused, Saved) => {
            progress(name, "saving the guest state");
            with_ticker(progress, name, "saving", q.save(name)).await?;
        }
        (Stopped, Saved) => {
            progress(name, "starting, then saving the guest state");
            q.start(name).await?;
            q.save(name).await?;
        }
        (Running | Paused | Stopped | Saved, _) => {}
    }
    let mut rec =
        LaunchRecord::load(&q.options().state_dir, name).map_err(|source| QemuError::Launch {
            vm: name.into(),
            source,
        })?;
    rec.config.power_state = to;
    q.update_record(&rec)?;
    Ok(())
}

/// One live operation, through the VM's managers.
async fn hot(q: &Qemu, vm: &dyn Uvm, op: &Op) -> Result<(), ApplyError> {
    use ResourceKind as K;
    use ResourceOperation as O;
    let none = |what: &str| ApplyError::Unsupported(format!("{} has no {what} manager", vm.id()));
    match (op.resource, op.operation, &op.key, &op.after) {
        (K::Policy, _, _, Some(Item::Policy(policy))) => {
            // Not a device: only what the next plan reads back (prune protection).
            let mut rec = q.record_now(vm.id())?;
            rec.config.policy = *policy;
            q.update_record(&rec)?;
        }
        (K::Processors, O::Update, _, Some(Item::Processors(n))) => {
            vm.set_processor_count(*n).await?
        }
        (K::Memory, O::Update, _, Some(Item::Memory(mb))) => vm.set_memory_size(*mb).await?,
        (K::StorageQos, O::Update, _, Some(Item::StorageQos(qos))) => {
            let limit = |v: Option<u64>| v.unwrap_or(0);
            let (iops, bw) = qos.as_ref().map_or((0, 0), |q| {
                (limit(q.iops_maximum), limit(q.bandwidth_maximum))
            });
            vm.set_storage_qos(iops, bw).await?
        }
        (K::ScsiController, O::Add, ItemKey::Num(id), _) => {
            vm.scsi()
                .ok_or_else(|| none("SCSI"))?
                .add_scsi_controller(*id)
                .await?
        }
        (K::ScsiController, O::Remove, ItemKey::Num(id), _) => {
            vm.scsi()
                .ok_or_else(|| none("SCSI"))?
                .remove_scsi_controller(*id)
                .await?
        }
        (K::ScsiDisk, O::Add, _, Some(Item::ScsiDisk(d))) => {
            vm.scsi()
                .ok_or_else(|| none("SCSI"))?
                .add_scsi_disk(
                    d.controller,
                    d.disk.lun,
                    &d.disk.path,
                    d.disk.disk_type,
                    d.disk.read_only,
                )
                .await?
        }
        (K::ScsiDisk, O::Remove, ItemKey::Lun(c, l), before) => {
            let path = match before {
                Some(Item::ScsiDisk(d)) => d.disk.path.clone(),
                _ => Default::default(),
            };
            vm.scsi()
                .ok_or_else(|| none("SCSI"))?
                .remove_scsi_disk(*c, *l, &path)
                .await?
        }
        (K::NetworkAdapter, O::Add, _, Some(Item::NetworkAdapter(n))) => {
            vm.network()
                .ok_or_else(|| none("network"))?
                .add_nic(&n.nic_id, &n.endpoint_id, &n.mac_address)
                .await?
        }
        (K::NetworkAdapter, O::Remove, ItemKey::Text(id), _) => {
            let (endpoint, mac) = match &op.before {
                Some(Item::NetworkAdapter(n)) => (n.endpoint_id.as_str(), n.mac_address.as_str()),
                _ => ("", ""),
            };
            vm.network()
                .ok_or_else(|| none("network"))?
                .remove_nic(id, endpoint, mac)
                .await?
        }
        (K::VpmemDevice, O::Add, _, Some(Item::VpmemDevice(d))) => {
            vm.vpmem()
                .ok_or_else(|| none("VPMem"))?
                .add_vpmem_device(d.id, &d.path, d.read_only, d.format)
                .await?
        }
        (K::Plan9Share, O::Remove, ItemKey::Text(share), before) => {
            let port = match before {
                Some(Item::Plan9Share(s)) => s.port,
                _ => crate::spec::DEFAULT_PLAN9_PORT,
            };
            vm.plan9()
                .ok_or_else(|| none("Plan9"))?
                .remove_plan9(share, port)
                .await?
        }
        (kind, operation, key, _) => {
            return Err(ApplyError::Inconsistent(format!(
                "no live path for {operation} {kind} {key} on qemu"
            )));
        }
    }
    Ok(())
}
