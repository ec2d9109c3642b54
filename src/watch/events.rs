//! Following a VM's events: one task per VM forwards what its virtstack
//! reports to the loop, tagged with the subscription's number so the echoes
//! of uvmctl's own changes can be told apart and dropped.

use crate::vm::{Chain, Virtstack, VmEvent, VmName};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

/// An event subscription: its generation, and the task forwarding it.
pub(super) struct Subscription {
    pub(super) generation: Arc<std::sync::atomic::AtomicU64>,
    pub(super) task: JoinHandle<()>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) type EventMsg = (String, u64, VmEvent);

/// Forwards a VM's events to the loop, each tagged with the subscription's
/// number as it is when the event comes.
pub(super) async fn follow(
    vs: Arc<dyn Virtstack>,
    name: VmName,
    live: bool,
    generation: Arc<std::sync::atomic::AtomicU64>,
    tx: UnboundedSender<EventMsg>,
) {
    let owner = name.to_string();
    let number = || generation.load(std::sync::atomic::Ordering::Relaxed);
    let mut events = match vs.events(&name).await {
        Ok(Some(rx)) => rx,
        Ok(None) => {
            // Stopped between the reconcile's look and now (a crash right
            // after a launch): said now, not at the next resync. A VM that
            // runs without events (launched by an older uvmctl) is left to
            // the resyncs.
            let stopped = live && vs.observe(&name).await.is_ok_and(|o| !o.state.is_live());
            if stopped {
                let _ = tx.send((owner, number(), VmEvent::Gone));
            }
            return;
        }
        Err(e) => {
            tracing::debug!(vm = %owner, "no event subscription: {}", Chain(&e));
            return;
        }
    };
    while let Some(e) = events.recv().await {
        let gone = e == VmEvent::Gone;
        if tx.send((owner.clone(), number(), e)).is_err() || gone {
            return;
        }
    }
}
