//! `apply --wait-healthy`: once a VM's changes are made, wait until its
//! guest is judged healthy by its `spec.health` probes (without them: until
//! its agent port opens), showing progress. The judgement is the pure one
//! of [`crate::vm::health`]; this only asks the probes when they are due.

use super::{ApplyError, Progress, with_ticker};
use crate::escape::escaped;
use crate::vm::config::{Health, Probe, VmConfig};
use crate::vm::health::{Answer, Judge, ProbeCursor, Verdict};
use crate::vm::{Chain, Virtstack, VmEvent, VmName};
use std::time::{Duration, Instant};

/// The QMP event (and the name other virtstacks report it by) of a guest
/// that panicked.
pub const GUEST_PANICKED: &str = "GUEST_PANICKED";

/// Waits for `name` to be judged healthy, at most `timeout`. `launched`: the
/// change started the guest (a console probe then reads this launch's whole
/// console; after a live change, only what comes after it).
pub(super) async fn wait_healthy(
    vs: &dyn Virtstack,
    name: &VmName,
    want: &VmConfig,
    launched: bool,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), ApplyError> {
    let Some(health) = &want.health else {
        return wait_ready(vs, name, timeout, progress).await;
    };
    let judging = judge(vs, name, health, launched, timeout, progress);
    with_ticker(
        progress,
        name,
        "waiting for the guest to be healthy",
        judging,
    )
    .await
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

async fn judge(
    vs: &dyn Virtstack,
    name: &VmName,
    health: &Health,
    launched: bool,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), ApplyError> {
    let started = now();
    // What each probe last said, shown when it changes.
    let mut shown: Vec<Option<bool>> = vec![None; health.probes.len()];
    let mut said = |i: usize, probe: &Probe, answer: &Answer| {
        if shown[i] != Some(answer.passed) {
            shown[i] = Some(answer.passed);
            let how = if answer.passed { "passes" } else { "fails" };
            progress(
                name,
                &format!("probe {} {how}: {}", probe.label(), escaped(&answer.said)),
            );
        }
    };
    let judging = judge_change(vs, name, health, launched, true, &mut said);
    match tokio::time::timeout(timeout, judging).await {
        Err(_) => Err(ApplyError::HealthPending(timeout)),
        Ok(Verdict::Unhealthy { probe, answer }) => Err(ApplyError::Unhealthy { probe, answer }),
        Ok(_) => {
            let secs = now().duration_since(started).as_secs_f64();
            progress(name, &format!("healthy after {secs:.1}s"));
            Ok(())
        }
    }
}

/// Judges the change just made to `name` by `health`'s probes, asking each
/// as it falls due, until the verdict (bounded by the probes' deadlines).
/// `said` hears every answer (the probe's index, the probe, the answer).
/// `launched`: the change started the guest (a console probe then reads
/// this launch's whole console; after a live change, only what follows).
/// `follow`: subscribe to the VM's events to see a panic at once (a caller
/// that follows them itself, as a watcher does, says no).
pub async fn judge_change(
    vs: &dyn Virtstack,
    name: &VmName,
    health: &Health,
    launched: bool,
    follow: bool,
    said: &mut (dyn FnMut(usize, &Probe, &Answer) + Send),
) -> Verdict {
    let mut judge = Judge::new(health, now());
    let first = if launched {
        ProbeCursor::from_start()
    } else {
        ProbeCursor::default()
    };
    let mut cursors = vec![first; health.probes.len()];
    // A panic is seen at once through the VM's events, where it has them.
    let mut events = if follow {
        vs.events(name).await.ok().flatten()
    } else {
        None
    };
    // Ended before it could be followed (a panic at boot).
    if follow
        && let Ok(vm) = vs.observe(name).await
        && let Some(why) = vm.exit_error
    {
        judge.exited(&why);
    }
    loop {
        let mut failed = false;
        for i in judge.due(now()) {
            let (probe, cursor) = (&health.probes[i], &mut cursors[i]);
            let answer = match vs.probe(name, probe, cursor).await {
                Ok(answer) => answer,
                // The VM itself is gone or refuses: no probe can pass.
                Err(e) => Answer::fail(Chain(&e).to_string()),
            };
            said(i, probe, &answer);
            failed |= !answer.passed;
            judge.answer(i, answer, now());
        }
        // Without events, a failing probe is the sign to look for an end.
        if failed
            && follow
            && events.is_none()
            && let Ok(vm) = vs.observe(name).await
            && let Some(why) = vm.exit_error
        {
            judge.exited(&why);
        }
        let verdict = judge.judge(now()).clone();
        if verdict.is_final() {
            return verdict;
        }
        let Some(next) = judge.next_at() else {
            return verdict;
        };
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(next));
        match &mut events {
            Some(rx) => tokio::select! {
                () = sleep => {}
                got = rx.recv() => match got {
                    Some(VmEvent::Reported(e)) if e == GUEST_PANICKED => {
                        judge.panicked("the guest panicked (GUEST_PANICKED)");
                    }
                    // Its process ended: on its own, that is unhealthy.
                    None | Some(VmEvent::Gone) => {
                        events = None;
                        if let Ok(vm) = vs.observe(name).await
                            && let Some(why) = vm.exit_error
                        {
                            judge.exited(&why);
                        }
                    }
                    Some(VmEvent::Reported(_)) => {}
                },
            },
            None => sleep.await,
        }
    }
}

/// Waits for the guest of a VM meant to run to open its agent port.
async fn wait_ready(
    vs: &dyn Virtstack,
    name: &VmName,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), ApplyError> {
    let started = Instant::now();
    let poll = async {
        loop {
            if vs.guest_ready(name).await? {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(ApplyError::NotReady(timeout));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    with_ticker(progress, name, "waiting for the guest to boot", poll).await?;
    progress(
        name,
        &format!("guest ready after {:.1}s", started.elapsed().as_secs_f64()),
    );
    Ok(())
}
