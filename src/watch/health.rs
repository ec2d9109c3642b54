//! The health judgements a watcher has in flight, at most one per VM. Each
//! runs the judgement `apply --wait-healthy` runs ([`judge_change`]) in a
//! task of its own and sends its verdict with its number: the verdict of a
//! judgement a newer change replaced is told apart and dropped.
//!
//! The watcher follows the VM's events itself, so a judgement here does not
//! subscribe to them: a panic or an end it sees stops the judgement and is
//! the verdict ([`Judging::stop`]).

use crate::apply::healthy::judge_change;
use crate::vm::config::Health;
use crate::vm::health::Verdict;
use crate::vm::{Virtstack, VmName};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

/// A verdict, as a judgement task sends it.
#[derive(Debug)]
pub struct Judged {
    /// The VM judged.
    pub vm: String,
    /// Which of its judgements.
    pub number: u64,
    /// The digest of the configuration judged.
    pub spec: String,
    /// What it found.
    pub verdict: Verdict,
}

/// The judgements in flight.
#[derive(Debug)]
pub struct Judging {
    /// Per VM: the judgement's number, the digest of what it judges, its task.
    tasks: BTreeMap<String, (u64, String, JoinHandle<()>)>,
    last: u64,
    tx: UnboundedSender<Judged>,
}

impl Judging {
    /// None in flight; verdicts go to `tx`.
    pub fn new(tx: UnboundedSender<Judged>) -> Self {
        Judging {
            tasks: BTreeMap::new(),
            last: 0,
            tx,
        }
    }

    /// Judges the change just made to `vm`, to the configuration of digest
    /// `spec` (replacing a judgement of an earlier one). `launched`: the
    /// change started the guest.
    pub fn start(
        &mut self,
        vs: Arc<dyn Virtstack>,
        vm: &str,
        spec: String,
        health: Health,
        launched: bool,
    ) {
        self.stop(vm);
        let Ok(name) = VmName::new(vm) else { return };
        self.last += 1;
        let number = self.last;
        let tx = self.tx.clone();
        let vm_owned = vm.to_string();
        let judged_spec = spec.clone();
        let task = tokio::spawn(async move {
            let verdict = judge_change(
                vs.as_ref(),
                &name,
                &health,
                launched,
                false,
                &mut |_, _, _| {},
            )
            .await;
            let _ = tx.send(Judged {
                vm: vm_owned,
                number,
                spec: judged_spec,
                verdict,
            });
        });
        self.tasks.insert(vm.to_string(), (number, spec, task));
    }

    /// Stops `vm`'s judgement; the digest of what it judged, when one was
    /// in flight.
    pub fn stop(&mut self, vm: &str) -> Option<String> {
        let (_, spec, task) = self.tasks.remove(vm)?;
        task.abort();
        Some(spec)
    }

    /// Whether `judged` is the verdict of `vm`'s judgement in flight (which
    /// then ends); a replaced one's is not.
    pub fn take(&mut self, judged: &Judged) -> bool {
        if self
            .tasks
            .get(&judged.vm)
            .is_some_and(|(n, _, _)| *n == judged.number)
        {
            self.tasks.remove(&judged.vm);
            return true;
        }
        false
    }
}
