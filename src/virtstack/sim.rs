//! The simulator virtstack (`--virtstack sim`): VMs that exist only as
//! records. Nothing runs, no host file is opened, no guest boots; it is for
//! trying uvmctl without QEMU, for testing a spec repository in CI, and for
//! fleet tests. Never a substitute for a real-QEMU test.
//!
//! It keeps the contract's rules with the qemu virtstack's capabilities
//! (as on a host that has every device QEMU can use: vsock, VFIO, OVMF):
//! a live change only where the matrix says live and only on a VM that
//! runs, a save refused where qemu refuses one, refusals before anything is
//! made. The rules themselves are the in-memory fake's
//! ([`super::fake::Fake`]): each call loads the VM's record into it, runs
//! there and stores what the VM became. The records live under
//! `<state-dir>/sim/`, one file per VM written atomically, so `plan`,
//! `apply`, `watch` and `status` in different processes agree (one apply or
//! watcher at a time, as the state directory's lock makes it).
//!
//! Health (`spec.health`) follows one documented rule: every probe of a
//! running VM passes (a console probe with the line `uvmctl-sim: ready`),
//! unless its kernel command line (or UEFI arguments) has the word
//! [`UNHEALTHY_WORD`], when every probe fails. A VM that does not run fails
//! every probe.
//!
//! What it does not simulate: events (a watcher sees changes made by other
//! processes at its next resync), guests (a VM is ready as soon as it
//! runs), crashes, and host paths (they are never opened, so a missing
//! image is no error here).

use super::fake::{Fake, FakeVm};
use super::records::{Layout, RecordError, RecordStore};
use crate::vm::config::{Probe, ProbeKind};
use crate::vm::health::{Answer, ProbeCursor};
use crate::vm::history::History;
use crate::vm::{
    Capabilities, Change, HostFacts, Observe, ObservedVm, State, Virtstack, VmError, VmName,
    VmStats, config::VmConfig,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type Result<T, E = VmError> = std::result::Result<T, E>;

/// Name of the simulator virtstack.
pub const SIM: &str = crate::vm::VirtstackKind::Sim.as_str();

/// The kernel command-line word that makes a simulated guest unhealthy.
pub const UNHEALTHY_WORD: &str = "uvmctl.sim.unhealthy";

/// What a probe of a simulated VM answers, by the simulator's health rule.
fn simulated_answer(rec: &SimRecord, probe: &Probe) -> Answer {
    if rec.state != State::Running {
        return Answer::fail(format!("the simulated VM is {}", rec.state));
    }
    let boot = &rec.config.boot;
    let words = boot
        .linux_kernel_direct
        .as_ref()
        .map(|k| k.cmdline.as_str())
        .into_iter()
        .chain(boot.uefi.as_ref().map(|u| u.args.as_str()));
    if words
        .flat_map(str::split_whitespace)
        .any(|w| w == UNHEALTHY_WORD)
    {
        return Answer::fail(format!("simulated: {UNHEALTHY_WORD} on its command line"));
    }
    match probe.kind {
        ProbeKind::Agent => Answer::pass("pong"),
        ProbeKind::Console => Answer::pass("uvmctl-sim: ready"),
        ProbeKind::Exec | ProbeKind::Notify => Answer::pass("simulated"),
    }
}

/// A record is read up to this size (a VM's whole configuration).
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// One simulated VM, as its record holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimRecord {
    /// What the VM is.
    pub config: VmConfig,
    /// Its lifecycle state.
    pub state: State,
    /// When it was last started (seconds since the epoch), while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// The configurations applied to it ([`Virtstack::history`]).
    #[serde(default, skip_serializing_if = "History::is_empty")]
    pub history: History,
}

/// The capabilities of the simulator: the qemu virtstack's, on a host with
/// every device QEMU can use, under the simulator's name.
pub fn capabilities() -> Capabilities {
    let mut caps = Capabilities::qemu(&HostFacts {
        vhost_vsock: true,
        vhost_user_vsock: true,
        vfio: true,
        ovmf: true,
        pin_memory_refused: None,
        isolation: None,
    });
    caps.virtstack = SIM.to_string();
    // Every probe kind answers by the simulator's health rule.
    caps.probe_refused.clear();
    caps
}

/// The simulator over one state directory.
pub struct Sim {
    caps: Capabilities,
    records: RecordStore<SimRecord>,
    /// One call per VM at a time within this process.
    busy: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Sim {
    /// The simulator keeping its records under `state_dir/sim`.
    pub fn new(state_dir: &Path) -> Self {
        let caps = capabilities();
        Sim {
            caps,
            records: RecordStore::new(
                "sim record",
                Self::records_dir(state_dir),
                Layout::File { suffix: ".json" },
                MAX_RECORD_BYTES,
            ),
            busy: Mutex::default(),
        }
    }

    /// Where the records of a state directory are.
    pub fn records_dir(state_dir: &Path) -> PathBuf {
        state_dir.join("sim")
    }

    /// Makes the records directory (apply and watch; observers never do).
    ///
    /// # Errors
    /// When it cannot be made.
    pub fn ensure_dir(state_dir: &Path) -> std::io::Result<()> {
        crate::hostfs::create_dirs(&Self::records_dir(state_dir), 0o700)
    }

    fn lock_of(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut busy = self
            .busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        busy.entry(name.to_string()).or_default().clone()
    }

    fn load(&self, name: &str) -> Result<Option<SimRecord>> {
        match self.records.load(name) {
            Ok(r) => Ok(Some(r)),
            Err(RecordError::NotFound(_)) => Ok(None),
            Err(e) => Err(VmError::Backend(Box::new(e))),
        }
    }

    /// Runs `op` under the rules on the VM as its record has it, then keeps
    /// what the VM became (nothing changes when `op` fails).
    async fn with<T, F, Fut>(&self, name: &VmName, op: F) -> Result<T>
    where
        F: FnOnce(Fake) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let lock = self.lock_of(name);
        let _held = lock.lock().await;
        let before = self.load(name)?;
        // Rules of their own for each call, holding only this VM.
        let rules = Fake::new(self.caps.clone());
        if let Some(rec) = &before {
            rules.insert(
                name,
                FakeVm {
                    config: rec.config.clone(),
                    state: rec.state,
                    managed: true,
                },
            );
        }
        let out = op(rules.clone()).await?;
        match (rules.get(name), before) {
            (None, None) => {}
            (None, Some(_)) => self
                .records
                .remove(name)
                .map_err(|e| VmError::Backend(Box::new(e)))?,
            (Some(vm), before) => {
                let was_live = before.as_ref().is_some_and(|b| b.state.is_live());
                let started_at = match (vm.state.is_live(), was_live) {
                    (true, true) => before.as_ref().and_then(|b| b.started_at),
                    (true, false) => Some(now_unix()),
                    (false, _) => None,
                };
                let rec = SimRecord {
                    config: vm.config,
                    state: vm.state,
                    started_at,
                    history: before
                        .as_ref()
                        .map(|b| b.history.clone())
                        .unwrap_or_default(),
                };
                if before.as_ref() != Some(&rec) {
                    self.records
                        .store(name, &rec)
                        .map_err(|e| VmError::Backend(Box::new(e)))?;
                }
            }
        }
        Ok(out)
    }

    fn existing(&self, name: &VmName) -> Result<SimRecord> {
        self.load(name)?
            .ok_or_else(|| VmError::NotFound(name.to_string()))
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[async_trait]
impl Observe for Sim {
    fn name(&self) -> &str {
        SIM
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn list(&self) -> Result<Vec<VmName>> {
        self.records
            .listed()
            .map_err(|e| crate::vm::VmError::Backend(Box::new(e)))
    }

    async fn observe(&self, name: &VmName) -> Result<ObservedVm> {
        self.with(name, |rules| async move { rules.observe(name).await })
            .await
    }
}

#[async_trait]
impl Virtstack for Sim {
    fn preflight(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        Fake::new(self.caps.clone()).preflight(name, config)
    }

    async fn create(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.with(
            name,
            |rules| async move { rules.create(name, config).await },
        )
        .await
    }

    async fn change(&self, name: &VmName, change: &Change) -> Result<()> {
        self.with(
            name,
            |rules| async move { rules.change(name, change).await },
        )
        .await
    }

    async fn reconfigure(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.with(name, |rules| async move {
            rules.reconfigure(name, config).await
        })
        .await
    }

    async fn start(&self, name: &VmName, paused: bool) -> Result<()> {
        self.with(name, |rules| async move { rules.start(name, paused).await })
            .await
    }

    async fn stop(&self, name: &VmName) -> Result<()> {
        self.with(name, |rules| async move {
            rules.stop(name).await?;
            // Stopped as asked, as qemu reports it: made, not running.
            if let Some(mut vm) = rules.get(name) {
                vm.state = State::Created;
                rules.insert(name, vm);
            }
            Ok(())
        })
        .await
    }

    async fn pause(&self, name: &VmName) -> Result<()> {
        self.with(name, |rules| async move { rules.pause(name).await })
            .await
    }

    async fn resume(&self, name: &VmName) -> Result<()> {
        self.with(name, |rules| async move { rules.resume(name).await })
            .await
    }

    async fn save(&self, name: &VmName) -> Result<()> {
        let rec = self.existing(name)?;
        if let Some(reason) = self.caps.save_refusal(&rec.config) {
            return Err(VmError::Refused {
                vm: name.to_string(),
                reason: format!("cannot save: {reason}"),
            });
        }
        self.with(name, |rules| async move { rules.save(name).await })
            .await
    }

    async fn destroy(&self, name: &VmName) -> Result<()> {
        self.with(name, |rules| async move { rules.destroy(name).await })
            .await
    }

    async fn guest_ready(&self, name: &VmName) -> Result<bool> {
        Ok(self.existing(name)?.state == State::Running)
    }

    async fn probe(
        &self,
        name: &VmName,
        probe: &Probe,
        _cursor: &mut ProbeCursor,
    ) -> Result<Answer> {
        Ok(simulated_answer(&self.existing(name)?, probe))
    }

    async fn history(&self, name: &VmName) -> Result<History> {
        Ok(self.existing(name)?.history)
    }

    async fn keep_history(&self, name: &VmName, history: &History) -> Result<()> {
        let lock = self.lock_of(name);
        let _held = lock.lock().await;
        let mut rec = self.existing(name)?;
        rec.history = history.clone();
        self.records
            .store(name, &rec)
            .map_err(|e| VmError::Backend(Box::new(e)))
    }

    async fn stats(&self, name: &VmName) -> Result<VmStats> {
        let rec = self.existing(name)?;
        Ok(VmStats {
            assigned_memory_bytes: if rec.state.is_live() {
                rec.config.memory.size_mb << 20
            } else {
                0
            },
            uptime_seconds: rec
                .started_at
                .filter(|_| rec.state.is_live())
                .map(|t| now_unix().saturating_sub(t)),
            ..VmStats::default()
        })
    }

    async fn wait(&self, name: &VmName, timeout: Option<Duration>) -> Result<bool> {
        self.existing(name)?;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            // Another process may stop or destroy it: its record says.
            match self.load(name)? {
                None => return Ok(true),
                Some(rec) if !rec.state.is_live() => return Ok(true),
                Some(_) => {}
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{failures, run, tests::fixture};
    use crate::spec::{ScsiController, ScsiDisk};
    use crate::vm::ScsiDiskType;

    #[tokio::test]
    async fn the_simulator_conforms() {
        let dir = tempfile::tempdir().expect("tempdir");
        Sim::ensure_dir(dir.path()).expect("records dir");
        let out = run(Arc::new(Sim::new(dir.path())), &fixture("s")).await;
        assert_eq!(out.len(), 9);
        let failed = failures(&out);
        assert!(failed.is_empty(), "{}", failed.join("\n"));
        assert!(
            Sim::new(dir.path()).list().await.expect("list").is_empty(),
            "the suite leaves no VM"
        );
    }

    /// The documented health rule: a running guest passes every probe, one
    /// with the word on its command line fails them, a stopped one too.
    #[tokio::test]
    async fn simulated_health_follows_its_rule() {
        let dir = tempfile::tempdir().expect("tempdir");
        Sim::ensure_dir(dir.path()).expect("records dir");
        let sim = Sim::new(dir.path());
        let probe = Probe::of(ProbeKind::Agent);
        let ask = |vm: VmName| {
            let sim = &sim;
            let probe = &probe;
            async move {
                sim.probe(&vm, probe, &mut ProbeCursor::default())
                    .await
                    .expect("probe")
            }
        };
        let (good, bad) = (
            VmName::new("good").expect("name"),
            VmName::new("bad").expect("name"),
        );
        let mut cfg = crate::plan::tests::base("good");
        sim.create(&good, &cfg).await.expect("create");
        assert!(!ask(good.clone()).await.passed, "made, not running");
        sim.start(&good, false).await.expect("start");
        assert_eq!(ask(good.clone()).await, Answer::pass("pong"));
        if let Some(k) = cfg.boot.linux_kernel_direct.as_mut() {
            k.cmdline = format!("console=ttyS0 {UNHEALTHY_WORD}");
        }
        sim.create(&bad, &cfg).await.expect("create");
        sim.start(&bad, false).await.expect("start");
        assert_eq!(
            ask(bad).await,
            Answer::fail("simulated: uvmctl.sim.unhealthy on its command line")
        );
    }

    /// Two processes' simulators over one state directory see one host.
    #[tokio::test]
    async fn simulators_over_one_state_directory_agree() {
        let dir = tempfile::tempdir().expect("tempdir");
        Sim::ensure_dir(dir.path()).expect("records dir");
        let (a, b) = (Sim::new(dir.path()), Sim::new(dir.path()));
        let vm = VmName::new("web").expect("name");
        let cfg = crate::plan::tests::base("web");
        a.create(&vm, &cfg).await.expect("create");
        a.start(&vm, false).await.expect("start");
        assert_eq!(b.observe(&vm).await.expect("observe").state, State::Running);
        assert!(b.stats(&vm).await.expect("stats").uptime_seconds.is_some());
        b.pause(&vm).await.expect("pause");
        assert_eq!(a.observe(&vm).await.expect("observe").state, State::Paused);
        // A stop asked for reads as qemu's does: made, not running.
        a.stop(&vm).await.expect("stop");
        assert_eq!(b.observe(&vm).await.expect("observe").state, State::Created);
        assert!(b.wait(&vm, Some(Duration::ZERO)).await.expect("wait"));
        b.destroy(&vm).await.expect("destroy");
        assert!(a.list().await.expect("list").is_empty());
        assert!(matches!(a.destroy(&vm).await, Err(VmError::NotFound(_))));
    }

    /// qemu's rules: a live change it would refuse is refused, and a save
    /// of image disks too, with nothing changed.
    #[tokio::test]
    async fn what_qemu_refuses_the_simulator_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        Sim::ensure_dir(dir.path()).expect("records dir");
        let sim = Sim::new(dir.path());
        let vm = VmName::new("db").expect("name");
        let mut cfg = crate::plan::tests::base("db");
        cfg.scsi_controllers = vec![ScsiController {
            id: 0,
            disks: vec![ScsiDisk {
                lun: 0,
                path: "/d/db.vhdx".into(),
                disk_type: ScsiDiskType::Vhdx,
                read_only: false,
            }],
        }];
        sim.create(&vm, &cfg).await.expect("create");
        sim.start(&vm, false).await.expect("start");
        let e = sim.save(&vm).await.expect_err("vhdx cannot be saved");
        assert!(
            e.to_string().contains("vhdx") || e.to_string().contains("raw"),
            "{e}"
        );
        assert_eq!(
            sim.observe(&vm).await.expect("observe").state,
            State::Running
        );
        let share = crate::vm::items::Item::Plan9Share(crate::spec::Plan9Share {
            name: "out".into(),
            host_path: "/srv/out".into(),
            port: 564,
            flags: 0,
            allowed_files: Vec::new(),
            read_only: false,
        });
        let e = sim
            .change(&vm, &Change::Add(share))
            .await
            .expect_err("qemu adds no 9p share live");
        assert_eq!(e.kind(), crate::vm::ErrorKind::NotSupported, "{e}");
        assert_eq!(sim.capabilities().virtstack, SIM);
    }
}
