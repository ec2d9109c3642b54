//! The watcher's decisions, as pure functions of a VM's entry, what
//! happened and the time: when to retry, when a crashed VM may be
//! relaunched, what to follow, which VMs a prune may remove and when a
//! missing spec counts as confirmed. No I/O, no clock: the loop passes `now`
//! in (kube-runtime's `error_policy` shape), so each rule is tested with
//! plain `Instant`s.

use super::revert::Revert;
use super::status::VmWatch;
use crate::reconcile::vm::{Images, Outcome};
use crate::vm::State;
use crate::vm::health::Verdict;
use crate::vm::history::History;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Backoff after failures: `base`, doubling per failure, at most `cap`. A VM
/// that ran `stable` since its last start counts as healthy again.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay.
    pub base: Duration,
    /// Longest delay.
    pub cap: Duration,
    /// Uptime after which a crash no longer counts toward the streak.
    pub stable: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(300),
            stable: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 = the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.cap)
            .min(self.cap)
    }
}

/// How long a busy state directory is waited for before the next try.
pub const BUSY_RETRY: Duration = Duration::from_secs(1);

/// Why a reconcile ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The watcher started (adoption).
    Start,
    /// The VM's spec changed, appeared or disappeared.
    Spec,
    /// The virtstack reported something (`exited` when the process ended).
    Event(String),
    /// The periodic resync.
    Resync,
    /// A retry after a failure, a wait or a busy lock.
    Retry,
    /// A health verdict: written into its history, and a revert if it
    /// calls for one.
    Health,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Start => f.write_str("start"),
            Trigger::Spec => f.write_str("spec"),
            Trigger::Event(e) => write!(f, "event {e}"),
            Trigger::Resync => f.write_str("resync"),
            Trigger::Retry => f.write_str("retry"),
            Trigger::Health => f.write_str("health"),
        }
    }
}

/// One VM as the watcher keeps it: the only per-VM state of the loop
/// besides its spec and its event subscription.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// What the status file says of it.
    pub status: VmWatch,
    /// Shown in the status file (it had a spec, was held or reconciled).
    pub tracked: bool,
    /// Reconcile failures in a row.
    pub failures: u32,
    /// Crashes in a row, each within `stable` of its launch.
    pub crash_streak: u32,
    /// When it was last launched by the watcher.
    pub last_launch: Option<Instant>,
    /// Not reconciled again before this.
    pub retry_at: Option<Instant>,
    /// A crashed VM is not relaunched before this.
    pub recover_after: Option<Instant>,
    /// An event came while it reconciled.
    pub again: bool,
    /// Its state as the last reconcile left it.
    pub state: Option<State>,
    /// Waiting to be reconciled, and why.
    pub dirty: Option<Trigger>,
    /// A reconcile of it runs.
    pub in_flight: bool,
    /// The virtstack has it.
    pub known: bool,
    /// Its spec is missing since this scan.
    pub absent_since: Option<u64>,
    /// Confirmed absent by a later scan: to be pruned.
    pub prune: bool,
    /// The images it has as its last reconcile left it (`None`: not seen).
    pub images: Option<Images>,
    /// Part of the first round, not reconciled yet (the watcher is ready
    /// when no entry is).
    pub first_round: bool,
    /// Its history as its last reconcile read it, with the verdicts since.
    pub history: Option<History>,
    /// Verdicts not written into its record yet, by the spec judged.
    pub verdicts: Vec<(String, Verdict)>,
    /// Its revert, while one stands.
    pub revert: Option<Revert>,
    /// Held outside its maintenance window: reconciled again at this time
    /// (whatever else marks it meanwhile goes as usual).
    pub window_at: Option<Instant>,
    /// Its spec changed and no reconcile has taken the change in yet (a
    /// rollout's soak waits for it; a resync's reconcile does not).
    pub changing: bool,
}

/// What the loop does with a VM's event subscription after a reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// It was pruned: stop following it and forget it.
    Forget,
    /// Follow it; `renew` drops the echoes of the changes just made;
    /// `restart` follows a new process, not the one that ended.
    Follow {
        /// The reconcile changed the VM.
        renew: bool,
        /// The VM was (re)launched.
        restart: bool,
    },
}

/// What a finished reconcile asks the loop to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Say {
    /// Relaunched after a crash; a next crash waits this long.
    Relaunched {
        /// Crashes in a row.
        crashes: u32,
        /// The delay before the next relaunch.
        next_wait: Duration,
    },
    /// Its changes are newly held (said once while they stay the same).
    Held(Vec<String>),
    /// It failed; retried after this long.
    Retrying {
        /// Failures in a row.
        failures: u32,
        /// The delay.
        wait: Duration,
    },
}

/// A finished reconcile, as the policy needs it.
#[derive(Debug, Clone)]
pub struct Finished<'a> {
    /// What came of it.
    pub outcome: &'a Outcome,
    /// The VM had exited on its own.
    pub crashed: bool,
    /// It was (re)launched.
    pub launched: bool,
}

/// The loop's next steps for a VM after a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Next {
    /// Its subscription.
    pub follow: Follow,
    /// What to log.
    pub say: Vec<Say>,
    /// Until when it backs off, if it does: a retry it waits for, or a
    /// crashed VM's relaunch.
    pub backoff_until: Option<Instant>,
}

impl Entry {
    /// Marks it to reconcile: a retry is superseded by anything that says
    /// why, and any other reason stays the one shown.
    pub fn mark(&mut self, trigger: Trigger) {
        if matches!(self.dirty, None | Some(Trigger::Retry)) {
            self.dirty = Some(trigger);
        }
    }

    /// Held outside its maintenance window, which opens at `opens`
    /// (seconds since the epoch): tried again then, by the clock of `now`
    /// (`unix_now`: the same moment, in whole seconds since the epoch, so
    /// the retry is never before the opening).
    pub fn wait_for_window(&mut self, opens: i64, now: Instant, unix_now: u64) {
        let wait = u64::try_from(opens).unwrap_or(0).saturating_sub(unix_now);
        self.window_at = Some(now + Duration::from_secs(wait));
    }

    /// Takes why it is to be reconciled now: what marked it, or its window
    /// opening (due at `now`).
    pub fn take_trigger(&mut self, now: Instant) -> Option<Trigger> {
        let window = self.window_at.is_some_and(|t| t <= now);
        let trigger = self.dirty.take().or(window.then_some(Trigger::Retry));
        if trigger.is_some() {
            // Whatever runs now judges the window again.
            self.window_at = None;
        }
        trigger
    }

    /// Its spec changed: a new spec deserves a prompt try, whatever failed
    /// before.
    pub fn spec_changed(&mut self) {
        self.failures = 0;
        self.crash_streak = 0;
        self.retry_at = None;
        self.recover_after = None;
        self.status.held.clear();
        self.changing = true;
        self.mark(Trigger::Spec);
    }

    /// An event of the virtstack: reconciled again, after the reconcile in
    /// flight if there is one. `false`: it came during one (and is only
    /// noted).
    pub fn event(&mut self, name: String) -> bool {
        if self.in_flight {
            self.again = true;
            return false;
        }
        self.mark(Trigger::Event(name));
        true
    }

    /// A crashed VM may be relaunched now: it has not crashed soon after a
    /// launch lately, or its backoff, which runs from when the crash was
    /// seen, has run out.
    pub fn may_relaunch(&self, now: Instant) -> bool {
        match (self.crash_streak, self.recover_after) {
            (0, _) => true,
            (_, Some(at)) => now >= at,
            (_, None) => false,
        }
    }

    /// Takes a finished reconcile in: counts failures and crashes, sets
    /// when it is tried again, and says what to follow and to log.
    pub fn finished(&mut self, done: &Finished<'_>, now: Instant, backoff: &Backoff) -> Next {
        self.in_flight = false;
        self.first_round = false;
        // Taken in, or held or failing (which say so themselves); a busy
        // lock or a backoff took nothing in.
        if !matches!(done.outcome, Outcome::Busy | Outcome::BackingOff) {
            self.changing = false;
        }
        let again = std::mem::take(&mut self.again);
        let mut say = Vec::new();
        if done.crashed && done.launched {
            say.push(self.relaunched(now, backoff));
        }
        if done.launched {
            self.last_launch = Some(now);
        }
        say.extend(self.outcome(done.outcome, now, backoff));
        // A reconcile that changed the VM renews its subscription: what was
        // already forwarded was that change's echo.
        let renew = matches!(
            done.outcome,
            Outcome::Applied(_) | Outcome::Pruned | Outcome::Failed(_)
        );
        let retry = matches!(
            done.outcome,
            Outcome::Failed(_) | Outcome::BackingOff | Outcome::Busy
        );
        self.status.failures = self.failures + self.crash_streak;
        if retry {
            self.mark(Trigger::Retry);
        } else if again && !renew {
            // Something happened while it reconciled, and that reconcile
            // changed nothing: it was not our echo.
            self.mark(Trigger::Event("during reconcile".into()));
        }
        let follow = if *done.outcome == Outcome::Pruned {
            Follow::Forget
        } else {
            Follow::Follow {
                renew,
                restart: done.launched,
            }
        };
        let backoff_until = self
            .retry_at
            .filter(|_| retry)
            .or(self.recover_after.filter(|r| *r > now));
        Next {
            follow,
            say,
            backoff_until,
        }
    }

    /// Relaunched after a crash: a crash soon after the last launch counts
    /// toward the streak, and the next relaunch waits longer.
    fn relaunched(&mut self, now: Instant, backoff: &Backoff) -> Say {
        let stable = self
            .last_launch
            .is_some_and(|l| now.saturating_duration_since(l) >= backoff.stable);
        if stable {
            self.crash_streak = 0;
        }
        self.crash_streak += 1;
        self.recover_after = None;
        Say::Relaunched {
            crashes: self.crash_streak,
            next_wait: backoff.delay(self.crash_streak),
        }
    }

    /// What a reconcile's outcome does to its failures and its next try.
    fn outcome(&mut self, outcome: &Outcome, now: Instant, backoff: &Backoff) -> Option<Say> {
        match outcome {
            Outcome::InSync | Outcome::Applied(_) | Outcome::Pruned => {
                self.failures = 0;
                self.retry_at = None;
                self.status.held.clear();
                None
            }
            Outcome::Held(lines) => {
                self.failures = 0;
                self.retry_at = None;
                if self.status.held == *lines {
                    return None;
                }
                self.status.held.clone_from(lines);
                Some(Say::Held(lines.clone()))
            }
            Outcome::Failed(_) => {
                self.failures += 1;
                let wait = backoff.delay(self.failures);
                self.retry_at = Some(now + wait);
                Some(Say::Retrying {
                    failures: self.failures,
                    wait,
                })
            }
            Outcome::BackingOff => {
                // The backoff runs from when the crash is seen.
                let at = *self
                    .recover_after
                    .get_or_insert(now + backoff.delay(self.crash_streak));
                self.retry_at = Some(at);
                None
            }
            Outcome::Busy => {
                self.retry_at = Some(now + BUSY_RETRY);
                None
            }
        }
    }
}

/// VM `vm`'s entry, shown in the status file from now on.
pub fn tracked<'a>(vms: &'a mut BTreeMap<String, Entry>, vm: &str) -> &'a mut Entry {
    let e = vms.entry(vm.to_string()).or_default();
    e.tracked = true;
    e
}

/// The dirty VMs that may start now, and when the next one waiting for its
/// backoff may.
pub fn ready(entries: &BTreeMap<String, Entry>, now: Instant) -> (Vec<String>, Option<Instant>) {
    let mut next: Option<Instant> = None;
    let mut soonest = |at: Instant| next = Some(next.map_or(at, |n: Instant| n.min(at)));
    let mut go = Vec::new();
    for (vm, e) in entries {
        if e.in_flight {
            continue;
        }
        if e.dirty.is_none() {
            // Only its window opening is due, if that.
            match e.window_at {
                Some(at) if at <= now => go.push(vm.clone()),
                Some(at) => soonest(at),
                None => {}
            }
            continue;
        }
        match e.retry_at {
            Some(at) if at > now => soonest(at),
            _ => go.push(vm.clone()),
        }
    }
    (go, next)
}

/// When a spec found missing now counts as confirmed missing: after a
/// quiet spell (a rename in progress, a checkout being swapped), by a later
/// scan. At least a second, at least the debounce.
pub fn confirm_at(now: Instant, debounce: Duration) -> Instant {
    now + debounce.max(Duration::from_secs(1))
}

/// The VMs a later scan than the one that first missed their spec still
/// misses, not yet marked to prune: candidates for pruning.
pub fn prune_candidates(entries: &BTreeMap<String, Entry>, scans: u64) -> Vec<String> {
    entries
        .iter()
        .filter(|(_, e)| e.absent_since.is_some_and(|s| s < scans) && !e.prune)
        .map(|(vm, _)| vm.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 35: a VM held outside its window is tried again when the
    /// window opens, not before (the whole seconds of `unix_now` are never
    /// ahead of the clock), and at once when it opened meanwhile.
    #[test]
    fn a_vm_held_outside_its_window_is_tried_again_when_it_opens() {
        let now = Instant::now();
        let mut e = Entry::default();
        e.wait_for_window(1_000_030, now, 1_000_000);
        assert_eq!(e.window_at, Some(now + Duration::from_secs(30)));
        let one = |e: &Entry| std::iter::once(("a".to_string(), e.clone())).collect();
        let (go, next) = ready(&one(&e), now + Duration::from_secs(29));
        assert!(go.is_empty());
        assert_eq!(next, Some(now + Duration::from_secs(30)));
        let (go, _) = ready(&one(&e), now + Duration::from_secs(30));
        assert_eq!(go, ["a"]);
        // Anything else that marks it meanwhile (a crash, a resync, a new
        // policy) goes at once, and the window is judged again then.
        e.mark(Trigger::Event("exited".into()));
        let (go, _) = ready(&one(&e), now + Duration::from_secs(1));
        assert_eq!(go, ["a"]);
        assert_eq!(
            e.take_trigger(now + Duration::from_secs(1)),
            Some(Trigger::Event("exited".into()))
        );
        assert_eq!(e.window_at, None);
        let mut late = Entry::default();
        late.wait_for_window(1_000_000, now, 1_000_005);
        assert_eq!(late.take_trigger(now), Some(Trigger::Retry));
    }

    const BACKOFF: Backoff = Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(2),
        stable: Duration::from_secs(60),
    };

    fn finish(
        e: &mut Entry,
        outcome: &Outcome,
        crashed: bool,
        launched: bool,
        now: Instant,
    ) -> Next {
        e.in_flight = true;
        e.dirty = None;
        e.finished(
            &Finished {
                outcome,
                crashed,
                launched,
            },
            now,
            &BACKOFF,
        )
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = Backoff {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(60),
            stable: Duration::from_secs(300),
        };
        assert_eq!(b.delay(1), Duration::from_secs(2));
        assert_eq!(b.delay(2), Duration::from_secs(4));
        assert_eq!(b.delay(5), Duration::from_secs(32));
        assert_eq!(b.delay(6), Duration::from_secs(60));
        assert_eq!(b.delay(40), Duration::from_secs(60));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn failures_retry_after_a_doubling_delay_and_success_clears_them() {
        let t0 = Instant::now();
        let mut e = Entry::default();
        let failed = Outcome::Failed("boom".into());
        let mut waits = Vec::new();
        for i in 0..4 {
            let now = t0 + Duration::from_secs(i);
            let next = finish(&mut e, &failed, false, false, now);
            assert_eq!(e.dirty, Some(Trigger::Retry));
            waits.push(e.retry_at.expect("retry set") - now);
            assert!(matches!(next.say[..], [Say::Retrying { .. }]), "{next:?}");
            // Not ready before its time, ready at it.
            let entries = BTreeMap::from([("a".to_string(), e.clone())]);
            assert_eq!(ready(&entries, now).0, Vec::<String>::new());
            assert_eq!(ready(&entries, now).1, e.retry_at);
            assert_eq!(ready(&entries, e.retry_at.expect("set")).0, ["a"]);
        }
        assert_eq!(
            waits,
            [100, 200, 400, 800].map(Duration::from_millis),
            "doubling from the base"
        );
        assert_eq!(e.status.failures, 4);
        let next = finish(&mut e, &Outcome::Applied(1), false, false, t0);
        assert_eq!((e.failures, e.retry_at, e.dirty.clone()), (0, None, None));
        assert_eq!(
            next.follow,
            Follow::Follow {
                renew: true,
                restart: false
            }
        );
    }

    #[test]
    fn a_vm_crashing_soon_after_each_launch_waits_longer_each_time() {
        let t0 = Instant::now();
        let mut e = Entry::default();
        assert!(e.may_relaunch(t0), "the first crash relaunches at once");
        // Relaunched at once after the first crash.
        let next = finish(&mut e, &Outcome::Applied(1), true, true, t0);
        assert_eq!(
            next.say,
            [Say::Relaunched {
                crashes: 1,
                next_wait: Duration::from_millis(100)
            }]
        );
        // Crashes again 1 s later: waits 100 ms from when that is seen.
        let seen = t0 + Duration::from_secs(1);
        assert!(!e.may_relaunch(seen), "its backoff has not started");
        finish(&mut e, &Outcome::BackingOff, true, false, seen);
        assert_eq!(e.recover_after, Some(seen + Duration::from_millis(100)));
        assert_eq!(e.dirty, Some(Trigger::Retry));
        assert!(!e.may_relaunch(seen + Duration::from_millis(99)));
        assert!(e.may_relaunch(seen + Duration::from_millis(100)));
        // A second look while it waits keeps the same deadline.
        finish(
            &mut e,
            &Outcome::BackingOff,
            true,
            false,
            seen + Duration::from_millis(50),
        );
        assert_eq!(e.recover_after, Some(seen + Duration::from_millis(100)));
        let relaunched = seen + Duration::from_millis(100);
        let next = finish(&mut e, &Outcome::Applied(1), true, true, relaunched);
        assert_eq!(
            next.say,
            [Say::Relaunched {
                crashes: 2,
                next_wait: Duration::from_millis(200)
            }]
        );
        assert_eq!(
            next.follow,
            Follow::Follow {
                renew: true,
                restart: true
            }
        );
        // A crash after a stable run starts the streak again.
        let later = relaunched + BACKOFF.stable;
        let next = finish(&mut e, &Outcome::Applied(1), true, true, later);
        assert_eq!(
            next.say,
            [Say::Relaunched {
                crashes: 1,
                next_wait: Duration::from_millis(100)
            }]
        );
    }

    #[test]
    fn held_changes_are_said_once_and_do_not_retry() {
        let now = Instant::now();
        let mut e = Entry::default();
        let held = Outcome::Held(vec!["add scsiDisk 0:1: restart".into(), "why".into()]);
        let next = finish(&mut e, &held, false, false, now);
        assert!(
            matches!(&next.say[..], [Say::Held(l)] if l.len() == 2),
            "{next:?}"
        );
        assert_eq!(e.dirty, None, "a hold waits for a new spec or event");
        let next = finish(&mut e, &held, false, false, now);
        assert!(next.say.is_empty(), "said once: {next:?}");
        e.spec_changed();
        assert!(e.status.held.is_empty());
        assert_eq!(e.dirty, Some(Trigger::Spec));
    }

    #[test]
    fn a_retry_is_superseded_by_a_reason_and_events_in_flight_come_back_after() {
        let now = Instant::now();
        let mut e = Entry::default();
        e.mark(Trigger::Retry);
        e.mark(Trigger::Resync);
        assert_eq!(e.dirty, Some(Trigger::Resync));
        e.mark(Trigger::Spec);
        assert_eq!(e.dirty, Some(Trigger::Resync), "the first reason stays");
        e.dirty = None;
        e.in_flight = true;
        assert!(!e.event("exited".into()));
        // The reconcile changed nothing: the event was not its echo.
        finish(&mut e, &Outcome::InSync, false, false, now);
        assert_eq!(e.dirty, Some(Trigger::Event("during reconcile".into())));
        // One that changed the VM renews the subscription instead.
        e.dirty = None;
        e.in_flight = true;
        e.event("x".into());
        let next = finish(&mut e, &Outcome::Applied(2), false, false, now);
        assert_eq!(e.dirty, None);
        assert_eq!(
            next.follow,
            Follow::Follow {
                renew: true,
                restart: false
            }
        );
        let next = finish(&mut e, &Outcome::Pruned, false, false, now);
        assert_eq!(next.follow, Follow::Forget);
    }

    #[test]
    fn a_busy_state_directory_is_tried_again_shortly() {
        let now = Instant::now();
        let mut e = Entry::default();
        finish(&mut e, &Outcome::Busy, false, false, now);
        assert_eq!(e.retry_at, Some(now + BUSY_RETRY));
        assert_eq!(e.failures, 0, "busy is not a failure");
        let next = finish(&mut e, &Outcome::Busy, false, false, now);
        assert_eq!(next.backoff_until, Some(now + BUSY_RETRY));
    }

    #[test]
    fn a_missing_spec_is_a_prune_candidate_only_after_a_later_scan() {
        let mut entries = BTreeMap::new();
        entries.insert(
            "gone".to_string(),
            Entry {
                absent_since: Some(3),
                known: true,
                ..Entry::default()
            },
        );
        entries.insert("kept".to_string(), Entry::default());
        assert!(
            prune_candidates(&entries, 3).is_empty(),
            "the scan that missed it"
        );
        assert_eq!(prune_candidates(&entries, 4), ["gone"]);
        entries.get_mut("gone").expect("entry").prune = true;
        assert!(prune_candidates(&entries, 5).is_empty(), "already marked");
        let now = Instant::now();
        assert_eq!(
            confirm_at(now, Duration::from_millis(10)),
            now + Duration::from_secs(1)
        );
        assert_eq!(
            confirm_at(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }
}
