//! Judging whether a change left a guest healthy, from its probes' answers
//! (`spec.health`). Pure: the time is passed in, so `apply --wait-healthy`
//! and the watcher share one judgement and tests need no clock.
//!
//! A change is healthy once every probe has passed, with no failure since,
//! for its `minHealthySeconds`; unhealthy when, at or after a probe's
//! `deadlineSeconds` (counted from the change), that probe has not (a probe
//! that had, then failed past its deadline, counts too), or at once when the
//! guest panics or its VM ends on its own. A verdict, once reached, stands.

use super::config::Health;
use serde::Serialize;
use std::time::{Duration, Instant};

/// The longest probe answer kept, in characters: enough to say why, and
/// bounded whatever a guest prints.
pub const MAX_ANSWER_CHARS: usize = 200;

/// How large a console pattern may compile (regex's own size measure): a
/// pattern is matched against every console line a guest writes.
const MAX_PATTERN_PROGRAM_BYTES: usize = 1 << 16;

/// A console probe's pattern, compiled within bounds (a pattern a stranger
/// wrote is matched against everything the guest prints).
///
/// # Errors
/// When it does not compile, or compiles too large.
pub fn console_pattern(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(pattern)
        .size_limit(MAX_PATTERN_PROGRAM_BYTES)
        .dfa_size_limit(MAX_PATTERN_PROGRAM_BYTES)
        .build()
}

/// One answer of a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Whether the probe passed.
    pub passed: bool,
    /// What it said (the agent's error, the line that matched...), bounded.
    pub said: String,
}

impl Answer {
    /// A passing answer.
    pub fn pass(said: impl Into<String>) -> Self {
        Answer::new(true, said)
    }

    /// A failing answer.
    pub fn fail(said: impl Into<String>) -> Self {
        Answer::new(false, said)
    }

    fn new(passed: bool, said: impl Into<String>) -> Self {
        let said: String = said.into();
        let said = match said.char_indices().nth(MAX_ANSWER_CHARS) {
            Some((end, _)) => format!("{}…", &said[..end]),
            None => said,
        };
        Answer { passed, said }
    }
}

/// Where a `console` probe stands in the guest's COM1 log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbeCursor {
    /// The byte of the log it reads from next; `None`: from where the log
    /// ends at the first ask (a live change is judged by what the guest
    /// writes after it). A launch starts at `Some(0)`, this launch's log.
    pub at: Option<u64>,
    /// The log file `at` is in (device, inode): a log rotated since is
    /// read to its end before the new one.
    pub file: Option<(u64, u64)>,
    /// `at` is inside a line written before the change: that line does not
    /// count.
    pub mid_line: bool,
    /// The line that matched. A line, once written, stays written: the
    /// probe passes from then on.
    pub matched: Option<String>,
}

impl ProbeCursor {
    /// Reading this launch's whole log.
    pub fn from_start() -> Self {
        ProbeCursor {
            at: Some(0),
            ..ProbeCursor::default()
        }
    }
}

/// What the judgement says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "health")]
pub enum Verdict {
    /// Not yet decided.
    Pending,
    /// Every probe passed for its minimum healthy time.
    Healthy,
    /// A probe did not pass in time, or the guest panicked.
    Unhealthy {
        /// The probe, as [`crate::vm::config::Probe::label`] names it, or
        /// `panic`.
        probe: String,
        /// Its last answer.
        answer: String,
    },
}

impl Verdict {
    /// Decided either way.
    pub fn is_final(&self) -> bool {
        !matches!(self, Verdict::Pending)
    }
}

/// One probe's answers so far.
#[derive(Debug, Clone)]
struct Track {
    label: String,
    interval: Duration,
    deadline: Duration,
    min_healthy: Duration,
    /// The first pass of the current run of passes.
    passing_since: Option<Instant>,
    /// The last pass of that run.
    last_pass: Option<Instant>,
    last_answer: Option<String>,
    next_ask: Instant,
}

impl Track {
    /// Passed, with no failure since, for its minimum healthy time.
    fn settled(&self) -> bool {
        match (self.passing_since, self.last_pass) {
            (Some(first), Some(last)) => last.duration_since(first) >= self.min_healthy,
            _ => false,
        }
    }
}

/// The judgement of one change.
#[derive(Debug, Clone)]
pub struct Judge {
    since: Instant,
    probes: Vec<Track>,
    verdict: Verdict,
}

impl Judge {
    /// Judging the change made at `since` by `health`'s probes; each is due
    /// at once.
    pub fn new(health: &Health, since: Instant) -> Self {
        let secs = |s: u32| Duration::from_secs(u64::from(s));
        Judge {
            since,
            probes: health
                .probes
                .iter()
                .map(|p| Track {
                    label: p.label(),
                    interval: secs(p.interval_seconds),
                    deadline: secs(p.deadline_seconds),
                    min_healthy: secs(p.min_healthy_seconds),
                    passing_since: None,
                    last_pass: None,
                    last_answer: None,
                    next_ask: since,
                })
                .collect(),
            verdict: Verdict::Pending,
        }
    }

    /// When the change was made.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The probes (by index in `spec.health.probes`) to ask now: none once
    /// decided.
    pub fn due(&self, now: Instant) -> Vec<usize> {
        if self.verdict.is_final() {
            return Vec::new();
        }
        (0..self.probes.len())
            .filter(|i| self.probes[*i].next_ask <= now)
            .collect()
    }

    /// When something is next to be done: a probe to ask or a deadline to
    /// judge; `None` once decided.
    pub fn next_at(&self) -> Option<Instant> {
        if self.verdict.is_final() {
            return None;
        }
        // A probe settled has met its deadline; one not settled has it
        // ahead (past it, the verdict would be final).
        let deadlines = self
            .probes
            .iter()
            .filter(|t| !t.settled())
            .map(|t| self.since + t.deadline);
        self.probes
            .iter()
            .map(|t| t.next_ask)
            .chain(deadlines)
            .min()
    }

    /// Probe `i` answered at `now`; its next ask is one interval later.
    pub fn answer(&mut self, i: usize, answer: Answer, now: Instant) -> &Verdict {
        // A deadline that passed before this answer came decides first: a
        // pass that comes too late does not count.
        if self.judge(now).is_final() {
            return &self.verdict;
        }
        if let Some(t) = self.probes.get_mut(i) {
            if answer.passed {
                t.passing_since.get_or_insert(now);
                t.last_pass = Some(now);
            } else {
                t.passing_since = None;
                t.last_pass = None;
            }
            t.last_answer = Some(answer.said);
            t.next_ask = now + t.interval;
        }
        self.judge(now)
    }

    /// The guest panicked (`what`: how it was seen): unhealthy at once.
    pub fn panicked(&mut self, what: &str) -> &Verdict {
        self.unhealthy_at_once("panic", what)
    }

    /// The VM ended on its own (`why`: its exit error): unhealthy at once.
    pub fn exited(&mut self, why: &str) -> &Verdict {
        self.unhealthy_at_once("exit", why)
    }

    fn unhealthy_at_once(&mut self, probe: &str, what: &str) -> &Verdict {
        if !self.verdict.is_final() {
            self.verdict = Verdict::Unhealthy {
                probe: probe.into(),
                answer: Answer::fail(what).said,
            };
        }
        &self.verdict
    }

    /// The verdict at `now` (a deadline may have passed since the last answer).
    pub fn judge(&mut self, now: Instant) -> &Verdict {
        if self.verdict.is_final() {
            return &self.verdict;
        }
        if !self.probes.is_empty() && self.probes.iter().all(Track::settled) {
            self.verdict = Verdict::Healthy;
        } else if let Some(late) = self
            .probes
            .iter()
            .find(|t| !t.settled() && now >= self.since + t.deadline)
        {
            let waited = late.deadline.as_secs();
            self.verdict = Verdict::Unhealthy {
                probe: late.label.clone(),
                answer: match (&late.last_answer, late.passing_since) {
                    (Some(a), Some(_)) => format!(
                        "passing, but not for its minimum healthy time within {waited} s (last: {a})"
                    ),
                    (Some(a), None) => a.clone(),
                    (None, _) => format!("no answer within {waited} s"),
                },
            };
        }
        &self.verdict
    }

    /// The verdict as last judged.
    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::config::{Probe, ProbeKind};

    fn probe(kind: ProbeKind, interval: u32, min_healthy: u32, deadline: u32) -> Probe {
        Probe {
            command: if kind == ProbeKind::Exec {
                vec!["cat".into(), "/x".into()]
            } else {
                Vec::new()
            },
            interval_seconds: interval,
            min_healthy_seconds: min_healthy,
            deadline_seconds: deadline,
            ..Probe::of(kind)
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn healthy_once_every_probe_passed_for_its_minimum_time() {
        let t0 = Instant::now();
        let health = Health {
            probes: vec![
                probe(ProbeKind::Agent, 2, 4, 60),
                probe(ProbeKind::Exec, 1, 0, 60),
            ],
        };
        let mut j = Judge::new(&health, t0);
        assert_eq!(j.due(t0), [0, 1], "every probe is due at once");
        assert_eq!(j.answer(1, Answer::pass(""), t0), &Verdict::Pending);
        assert_eq!(j.answer(0, Answer::pass("pong"), t0), &Verdict::Pending);
        assert_eq!(j.due(t0 + s(1)), [1], "each at its own interval");
        assert_eq!(j.next_at(), Some(t0 + s(1)));
        assert_eq!(
            j.answer(0, Answer::pass("pong"), t0 + s(2)),
            &Verdict::Pending
        );
        assert_eq!(
            j.answer(0, Answer::pass("pong"), t0 + s(4)),
            &Verdict::Healthy
        );
        assert!(j.due(t0 + s(10)).is_empty(), "decided: nothing more to ask");
        assert_eq!(j.next_at(), None);
        assert_eq!(
            j.answer(0, Answer::fail("gone"), t0 + s(6)),
            &Verdict::Healthy,
            "a verdict stands"
        );
    }

    #[test]
    fn a_flapping_probe_starts_its_minimum_healthy_time_again() {
        let t0 = Instant::now();
        let health = Health {
            probes: vec![probe(ProbeKind::Agent, 1, 3, 8)],
        };
        let mut j = Judge::new(&health, t0);
        j.answer(0, Answer::pass("pong"), t0);
        j.answer(0, Answer::pass("pong"), t0 + s(2));
        j.answer(0, Answer::fail("hung up"), t0 + s(3));
        // Passing again from 4 s: 3 s more is 7 s, within the 8 s deadline.
        j.answer(0, Answer::pass("pong"), t0 + s(4));
        assert_eq!(
            j.answer(0, Answer::pass("pong"), t0 + s(6)),
            &Verdict::Pending
        );
        assert_eq!(
            j.answer(0, Answer::pass("pong"), t0 + s(7)),
            &Verdict::Healthy
        );

        // The same with the failure one second later misses the deadline.
        let mut j = Judge::new(&health, t0);
        j.answer(0, Answer::pass("pong"), t0 + s(4));
        j.answer(0, Answer::fail("hung up"), t0 + s(5));
        j.answer(0, Answer::pass("pong"), t0 + s(6));
        assert_eq!(
            j.judge(t0 + s(8)),
            &Verdict::Unhealthy {
                probe: "agent".into(),
                answer: "passing, but not for its minimum healthy time within 8 s (last: pong)"
                    .into()
            }
        );
    }

    #[test]
    fn a_probe_that_never_passes_is_unhealthy_at_its_deadline_with_its_last_answer() {
        let t0 = Instant::now();
        let health = Health {
            probes: vec![
                probe(ProbeKind::Agent, 1, 0, 30),
                probe(ProbeKind::Exec, 1, 0, 5),
            ],
        };
        let mut j = Judge::new(&health, t0);
        j.answer(1, Answer::fail("cat: can't open '/x'"), t0 + s(1));
        assert_eq!(j.judge(t0 + s(4)), &Verdict::Pending);
        assert_eq!(j.next_at(), Some(t0), "the agent was never asked");
        assert_eq!(
            j.judge(t0 + s(5)),
            &Verdict::Unhealthy {
                probe: "exec cat /x".into(),
                answer: "cat: can't open '/x'".into()
            }
        );
        let mut silent = Judge::new(&health, t0);
        assert_eq!(
            silent.judge(t0 + s(30)),
            &Verdict::Unhealthy {
                probe: "agent".into(),
                answer: "no answer within 30 s".into()
            },
            "the first probe in spec order past its deadline is named"
        );
    }

    /// A probe settled early no longer sets the next wake-up with its past
    /// deadline (the waiting loop would spin), and a pass that comes after
    /// a deadline does not count.
    #[test]
    fn settled_probes_leave_no_deadline_behind_and_late_passes_do_not_count() {
        let t0 = Instant::now();
        let health = Health {
            probes: vec![
                probe(ProbeKind::Agent, 1, 0, 5),
                probe(ProbeKind::Exec, 10, 0, 60),
            ],
        };
        let mut j = Judge::new(&health, t0);
        j.answer(0, Answer::pass("pong"), t0);
        j.answer(1, Answer::fail("not yet"), t0);
        let at = t0 + s(8);
        j.answer(0, Answer::pass("pong"), at);
        assert_eq!(j.judge(at), &Verdict::Pending);
        assert!(
            j.next_at().is_some_and(|n| n > at),
            "{:?} is not after {at:?}",
            j.next_at()
        );
        let mut late = Judge::new(&health, t0);
        assert_eq!(
            late.answer(0, Answer::pass("pong"), t0 + s(5)),
            &Verdict::Unhealthy {
                probe: "agent".into(),
                answer: "no answer within 5 s".into()
            }
        );
    }

    #[test]
    fn a_guest_panic_is_unhealthy_at_once_and_answers_are_bounded() {
        let t0 = Instant::now();
        let health = Health {
            probes: vec![probe(ProbeKind::Agent, 1, 0, 30)],
        };
        let mut j = Judge::new(&health, t0);
        assert_eq!(
            j.panicked("GUEST_PANICKED"),
            &Verdict::Unhealthy {
                probe: "panic".into(),
                answer: "GUEST_PANICKED".into()
            }
        );
        assert_eq!(
            j.answer(0, Answer::pass("pong"), t0),
            &Verdict::Unhealthy {
                probe: "panic".into(),
                answer: "GUEST_PANICKED".into()
            }
        );
        let mut ended = Judge::new(&health, t0);
        assert_eq!(
            ended.exited("qemu exited unexpectedly"),
            &Verdict::Unhealthy {
                probe: "exit".into(),
                answer: "qemu exited unexpectedly".into()
            }
        );
        let long = Answer::fail("é".repeat(MAX_ANSWER_CHARS + 50));
        assert_eq!(long.said.chars().count(), MAX_ANSWER_CHARS + 1);
        assert!(long.said.ends_with('…'));
    }
}
