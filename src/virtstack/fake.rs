//! An in-memory virtstack with scripted failures and hangs: what the
//! executor, `status` and the reconcile loop are tested against without
//! QEMU. It keeps the same rules a real one does: live changes only where
//! its capabilities say live, only on a running or paused VM, refusals
//! before anything is created.

use crate::vm::config::Probe;
use crate::vm::health::{Answer, ProbeCursor};
use crate::vm::history::History;
use crate::vm::items::{ChangeError, Item, ResourceKind};
use crate::vm::{
    Capabilities, Change, MemoryBackingType, MemoryHotplug, Observe, ObservedVm, ResourceOperation,
    State, Virtstack, VmError, VmEvent, VmName, VmStats,
    config::{PowerState, VmConfig},
};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

type Result<T, E = VmError> = std::result::Result<T, E>;

/// Something true or not of a VM's configuration.
type ConfigTest = fn(&VmConfig) -> bool;

/// One VM the fake holds.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeVm {
    /// Its configuration as built and changed.
    pub config: VmConfig,
    /// Lifecycle state.
    pub state: State,
    /// Whether uvmctl created it.
    pub managed: bool,
}

#[derive(Debug, Default)]
struct Inner {
    vms: BTreeMap<String, FakeVm>,
    /// `(vm, verb)` that fail; verbs are the trait methods' names, and
    /// `"add scsiDisk"`-style for live changes.
    fail: BTreeSet<(String, String)>,
    /// `(vm, verb)` that never return.
    hang: BTreeSet<(String, String)>,
    /// Verbs that answer success on every VM and do nothing: a planted
    /// fault, to show the conformance suite catches a virtstack that lies.
    lie: BTreeSet<String>,
    /// Every call that changed something, in order: `vm verb`.
    log: Vec<String>,
    /// When each call began, failed and hung ones too: what a retry
    /// schedule is measured by, free of when its report was read.
    started: BTreeMap<(String, String), Vec<Instant>>,
    /// Event subscribers per VM.
    subscribers: BTreeMap<String, Vec<tokio::sync::mpsc::Sender<VmEvent>>>,
    /// Why a VM that died on its own died.
    crashed: BTreeMap<String, String>,
    /// VMs that die (with why) when their events are next asked for: a
    /// crash between a look at the VM and a subscription to it.
    crash_at_subscribe: BTreeMap<String, String>,
    /// What probes of a VM answer while it runs (by default they pass).
    probe_answers: BTreeMap<String, Answer>,
    /// What probes of a VM answer while its configuration is so.
    probe_answers_when: BTreeMap<String, (ConfigTest, Answer)>,
    /// Each VM's history, as a record would keep it.
    histories: BTreeMap<String, History>,
}

/// The in-memory virtstack. Clones share one state.
#[derive(Debug, Clone)]
pub struct Fake {
    caps: Capabilities,
    inner: Arc<Mutex<Inner>>,
}

impl Fake {
    /// An empty host with `caps`.
    pub fn new(caps: Capabilities) -> Self {
        Fake {
            caps,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding it leaves consistent data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts a VM on the host as if it had been there.
    pub fn insert(&self, name: &str, vm: FakeVm) {
        self.lock().vms.insert(name.to_string(), vm);
    }

    /// The VM as the fake holds it.
    pub fn get(&self, name: &str) -> Option<FakeVm> {
        self.lock().vms.get(name).cloned()
    }

    /// Makes every probe of `vm` answer `answer` while it runs.
    pub fn answer_probes(&self, vm: &str, answer: Answer) {
        self.lock().probe_answers.insert(vm.to_string(), answer);
    }

    /// Makes every probe of `vm` answer `answer` while `when` holds of its
    /// configuration (and pass otherwise): a change that breaks its guest,
    /// which a revert mends.
    pub fn answer_probes_when(&self, vm: &str, when: ConfigTest, answer: Answer) {
        self.lock()
            .probe_answers_when
            .insert(vm.to_string(), (when, answer));
    }

    /// Makes `verb` on `vm` fail from now on.
    pub fn fail(&self, vm: &str, verb: &str) {
        self.lock().fail.insert((vm.to_string(), verb.to_string()));
    }

    /// Makes `verb` on `vm` never return from now on.
    pub fn hang(&self, vm: &str, verb: &str) {
        self.lock().hang.insert((vm.to_string(), verb.to_string()));
    }

    /// Makes `verb` succeed on every VM without doing anything (a planted
    /// fault for the conformance suite's own test).
    pub fn lie(&self, verb: &str) {
        self.lock().lie.insert(verb.to_string());
    }

    /// Sends `event` to whoever watches `vm`'s events.
    pub fn emit(&self, vm: &str, event: VmEvent) {
        let subscribers = self.lock().subscribers.get(vm).cloned().unwrap_or_default();
        for tx in subscribers {
            let _ = tx.try_send(event.clone());
        }
    }

    /// The VM dies on its own (`why`): terminated, with an exit error, and
    /// its watchers get [`VmEvent::Gone`].
    pub fn crash(&self, vm: &str, why: &str) {
        let subscribers = {
            let mut inner = self.lock();
            if let Some(v) = inner.vms.get_mut(vm) {
                v.state = State::Terminated;
            }
            inner.crashed.insert(vm.to_string(), why.to_string());
            inner.subscribers.remove(vm).unwrap_or_default()
        };
        for tx in subscribers {
            let _ = tx.try_send(VmEvent::Gone);
        }
    }

    /// The VM dies (`why`) just before its events are next subscribed to.
    pub fn crash_at_subscribe(&self, vm: &str, why: &str) {
        self.lock()
            .crash_at_subscribe
            .insert(vm.to_string(), why.to_string());
    }

    /// What was changed, in order (`vm verb`).
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// When each `verb` on `vm` began, in order.
    pub fn started(&self, vm: &str, verb: &str) -> Vec<Instant> {
        let key = (vm.to_string(), verb.to_string());
        self.lock().started.get(&key).cloned().unwrap_or_default()
    }

    /// Fails or hangs as scripted; otherwise logs the call.
    async fn call(&self, vm: &str, verb: &str) -> Result<()> {
        let key = (vm.to_string(), verb.to_string());
        let (fail, hang) = {
            let mut inner = self.lock();
            let scripted = (inner.fail.contains(&key), inner.hang.contains(&key));
            // tokio's clock, which a test may pause.
            inner
                .started
                .entry(key)
                .or_default()
                .push(tokio::time::Instant::now().into_std());
            scripted
        };
        if hang {
            std::future::pending::<()>().await;
        }
        if fail {
            return Err(backend(format!("{vm}: {verb} failed (scripted)")));
        }
        self.lock().log.push(format!("{vm} {verb}"));
        Ok(())
    }

    /// Changes one VM under the lock.
    fn with_vm<T>(&self, name: &str, f: impl FnOnce(&mut FakeVm) -> Result<T>) -> Result<T> {
        let mut inner = self.lock();
        let vm = inner
            .vms
            .get_mut(name)
            .ok_or_else(|| VmError::NotFound(name.to_string()))?;
        f(vm)
    }

    /// One change: a record-only item (the policy) any time; anything
    /// else only where the capabilities call it live, and on a VM that runs.
    fn change_now(&self, name: &str, change: &Change) -> Result<()> {
        let resource = change.resource();
        let op = change.operation();
        if let Some(r) = resource
            && !self.caps.supported(r, op)
        {
            return Err(VmError::not_supported(&self.caps, r, op));
        }
        let record_only = change.key().0 == ResourceKind::Policy;
        if let Change::Update {
            after: Item::Memory(mb),
            ..
        } = change
            && let Some(hot) = self.get(name).and_then(|vm| memory_hotplug(&vm))
            && !hot.allows(*mb)
        {
            return Err(VmError::Refused {
                vm: name.to_string(),
                reason: format!(
                    "{mb} MB is out of the live range {}..={} MB (physical backing pins memory)",
                    hot.min_mb, hot.max_mb
                ),
            });
        }
        if resource.is_none() && !record_only {
            return Err(VmError::Refused {
                vm: name.to_string(),
                reason: format!("{} is not changed on a running VM", change.key().0),
            });
        }
        self.with_vm(name, |vm| {
            if !record_only && !vm.state.is_live() {
                return Err(VmError::NotRunning {
                    vm: name.to_string(),
                    state: vm.state,
                });
            }
            vm.config = change.applied(&vm.config).map_err(|e| match e {
                ChangeError::Absent(item) => VmError::NoSuchItem {
                    vm: name.to_string(),
                    item,
                },
                e => backend(format!("{name}: {e}")),
            })?;
            Ok(())
        })
    }
}

/// What a running fake VM can be resized to: any size with virtual
/// backing, none but its own with physical (pinned) backing, as on QEMU.
fn memory_hotplug(vm: &FakeVm) -> Option<MemoryHotplug> {
    if !vm.state.is_live() {
        return None;
    }
    Some(match vm.config.memory.backing {
        MemoryBackingType::Physical => MemoryHotplug::fixed(vm.config.memory.size_mb),
        MemoryBackingType::Virtual => MemoryHotplug {
            min_mb: 1,
            max_mb: u64::MAX >> 20,
            block_mb: 1,
        },
    })
}

fn backend(what: String) -> VmError {
    VmError::Backend(what.into())
}

#[async_trait]
impl Observe for Fake {
    fn name(&self) -> &str {
        "fake"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn list(&self) -> Result<Vec<VmName>> {
        Ok(self
            .lock()
            .vms
            .keys()
            .filter_map(|n| VmName::new(n).ok())
            .collect())
    }

    async fn observe(&self, name: &VmName) -> Result<ObservedVm> {
        self.call(name, "observe").await?;
        let vm = self
            .get(name)
            .ok_or_else(|| VmError::NotFound(name.to_string()))?;
        let memory_hotplug = memory_hotplug(&vm);
        Ok(ObservedVm {
            config: vm.config,
            state: vm.state,
            managed: vm.managed,
            exit_error: self.lock().crashed.get(name.as_str()).cloned(),
            memory_hotplug,
        })
    }
}

#[async_trait]
impl Virtstack for Fake {
    fn preflight(&self, _name: &VmName, config: &VmConfig) -> Result<()> {
        match self.caps.refusals(config).into_iter().next() {
            Some(r) => Err(VmError::Cold(r)),
            None => Ok(()),
        }
    }

    async fn create(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.preflight(name, config)?;
        self.call(name, "create").await?;
        let mut inner = self.lock();
        if let Some(vm) = inner.vms.get(name.as_str()) {
            return Err(VmError::WrongState {
                vm: name.to_string(),
                state: vm.state,
                need: "it exists already".into(),
            });
        }
        let mut config = config.clone();
        config.power_state = PowerState::Stopped;
        inner.vms.insert(
            name.to_string(),
            FakeVm {
                config,
                state: State::Created,
                managed: true,
            },
        );
        Ok(())
    }

    async fn change(&self, name: &VmName, change: &Change) -> Result<()> {
        // Scripted as `add scsiDisk`: the verb and the item kind.
        let (kind, _) = change.key();
        let verb = format!("{} {kind}", change.operation());
        self.call(name, &verb).await?;
        if self.lock().lie.contains(&verb) {
            return Ok(());
        }
        self.change_now(name, change)?;
        // As QEMU reports a device it let go of (`DEVICE_DELETED`).
        if change.operation() != ResourceOperation::Add && change.resource().is_some() {
            self.emit(
                name,
                VmEvent::Reported(format!("{} {kind}", change.operation())),
            );
        }
        Ok(())
    }

    async fn reconfigure(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.preflight(name, config)?;
        self.call(name, "reconfigure").await?;
        self.with_vm(name, |vm| {
            if vm.state.is_live() {
                return Err(VmError::WrongState {
                    vm: name.to_string(),
                    state: vm.state,
                    need: "a running VM is not reconfigured; stop it first".into(),
                });
            }
            vm.config = config.clone();
            Ok(())
        })
    }

    async fn start(&self, name: &VmName, paused: bool) -> Result<()> {
        self.call(name, "start").await?;
        self.lock().crashed.remove(name.as_str());
        let caps = self.caps.clone();
        self.with_vm(name, |vm| {
            if vm.state.is_live() {
                return Err(VmError::WrongState {
                    vm: name.to_string(),
                    state: vm.state,
                    need: "it runs already".into(),
                });
            }
            if let Some(r) = caps.refusals(&vm.config).into_iter().next() {
                return Err(VmError::Cold(r));
            }
            vm.state = if paused {
                State::Paused
            } else {
                State::Running
            };
            Ok(())
        })
    }

    async fn stop(&self, name: &VmName) -> Result<()> {
        self.call(name, "stop").await?;
        self.with_vm(name, |vm| {
            vm.state = State::Terminated;
            Ok(())
        })
    }

    async fn pause(&self, name: &VmName) -> Result<()> {
        self.call(name, "pause").await?;
        self.with_vm(name, |vm| match vm.state {
            State::Running | State::Paused => {
                vm.state = State::Paused;
                Ok(())
            }
            state => Err(VmError::NotRunning {
                vm: name.to_string(),
                state,
            }),
        })
    }

    async fn resume(&self, name: &VmName) -> Result<()> {
        self.call(name, "resume").await?;
        self.with_vm(name, |vm| match vm.state {
            State::Running | State::Paused => {
                vm.state = State::Running;
                Ok(())
            }
            state => Err(VmError::NotRunning {
                vm: name.to_string(),
                state,
            }),
        })
    }

    async fn save(&self, name: &VmName) -> Result<()> {
        self.call(name, "save").await?;
        self.with_vm(name, |vm| {
            if !vm.state.is_live() {
                return Err(VmError::NotRunning {
                    vm: name.to_string(),
                    state: vm.state,
                });
            }
            vm.state = State::Saved;
            Ok(())
        })
    }

    async fn destroy(&self, name: &VmName) -> Result<()> {
        self.call(name, "destroy").await?;
        self.lock().crashed.remove(name.as_str());
        self.lock().histories.remove(name.as_str());
        self.lock()
            .vms
            .remove(name.as_str())
            .map(drop)
            .ok_or_else(|| VmError::NotFound(name.to_string()))
    }

    async fn guest_ready(&self, name: &VmName) -> Result<bool> {
        Ok(self.get(name).is_some_and(|vm| vm.state == State::Running))
    }

    async fn history(&self, name: &VmName) -> Result<History> {
        let inner = self.lock();
        if !inner.vms.contains_key(name.as_str()) {
            return Err(VmError::NotFound(name.to_string()));
        }
        Ok(inner
            .histories
            .get(name.as_str())
            .cloned()
            .unwrap_or_default())
    }

    async fn keep_history(&self, name: &VmName, history: &History) -> Result<()> {
        let mut inner = self.lock();
        if !inner.vms.contains_key(name.as_str()) {
            return Err(VmError::NotFound(name.to_string()));
        }
        inner.histories.insert(name.to_string(), history.clone());
        Ok(())
    }

    async fn probe(&self, name: &VmName, _: &Probe, _: &mut ProbeCursor) -> Result<Answer> {
        let inner = self.lock();
        let vm = inner
            .vms
            .get(name.as_str())
            .ok_or_else(|| VmError::NotFound(name.to_string()))?;
        if vm.state != State::Running {
            return Ok(Answer::fail(format!("the fake VM is {}", vm.state)));
        }
        if let Some((when, answer)) = inner.probe_answers_when.get(name.as_str()) {
            return Ok(if when(&vm.config) {
                answer.clone()
            } else {
                Answer::pass("fake")
            });
        }
        Ok(inner
            .probe_answers
            .get(name.as_str())
            .cloned()
            .unwrap_or_else(|| Answer::pass("fake")))
    }

    async fn stats(&self, name: &VmName) -> Result<VmStats> {
        let vm = self
            .get(name)
            .ok_or_else(|| VmError::NotFound(name.to_string()))?;
        Ok(VmStats {
            assigned_memory_bytes: vm.config.memory.size_mb << 20,
            // A fake VM has run for a fixed while once live.
            uptime_seconds: vm.state.is_live().then_some(42),
            ..VmStats::default()
        })
    }

    async fn wait(&self, name: &VmName, timeout: Option<std::time::Duration>) -> Result<bool> {
        if self.get(name).is_none() {
            return Err(VmError::NotFound(name.to_string()));
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            // Destroyed while waited for counts as stopped, as asked.
            if self.get(name).is_none_or(|vm| !vm.state.is_live()) {
                return Ok(true);
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Ok(false);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    async fn events(&self, name: &VmName) -> Result<Option<crate::vm::VmEvents>> {
        let mut inner = self.lock();
        if let Some(why) = inner.crash_at_subscribe.remove(name.as_str()) {
            if let Some(v) = inner.vms.get_mut(name.as_str()) {
                v.state = State::Terminated;
            }
            inner.crashed.insert(name.to_string(), why);
        }
        if !inner
            .vms
            .get(name.as_str())
            .is_some_and(|v| v.state.is_live())
        {
            return Ok(None);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        inner
            .subscribers
            .entry(name.to_string())
            .or_default()
            .push(tx);
        Ok(Some(rx))
    }
}
