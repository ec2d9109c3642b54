//! The rollout policy a spec repository keeps beside its specs
//! (`uvmctl-policy.yaml` at its root), reviewed like them: maintenance
//! windows for the changes that disrupt a guest. Loaded with the specs,
//! validated with positioned errors, compiled once; whether a window is open
//! is a pure function of the time passed in ([`Windows::gate`]).
//!
//! A policy that does not load holds every restart and recreate (fail
//! closed): a typo never opens a window.

use super::error::SpecError;
use super::locate::Locations;
use super::placement::Selector;
use chrono::{DateTime, TimeZone, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The policy file's name, at the root of a spec directory.
pub const POLICY_FILE: &str = "uvmctl-policy.yaml";
/// Whether a file at a spec directory's root is (meant as) its policy.
pub fn is_policy_name(name: &str) -> bool {
    name == POLICY_FILE || name == "uvmctl-policy.yml"
}

/// The policy document's kind.
pub const POLICY_KIND: &str = "RolloutPolicy";
/// Most windows in a policy.
pub const MAX_WINDOWS: usize = 64;
/// Longest a window stays open.
pub const MAX_WINDOW_SECONDS: u64 = 7 * 24 * 3600;

/// The policy file: one document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyDocument {
    /// `uvmctl.dev/v1alpha1`.
    pub api_version: String,
    /// `RolloutPolicy`.
    pub kind: String,
    /// What the policy says.
    pub spec: RolloutPolicy,
}

/// When changes that disrupt a guest may be made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutPolicy {
    /// Maintenance windows. A change of a class some window governs (for
    /// its VM) is made only while one of those windows is open.
    #[serde(default)]
    pub windows: Vec<Window>,
}

/// One maintenance window, as Argo CD's sync windows say one: a cron
/// schedule of when it opens, how long it stays open, in which time zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Window {
    /// Its name, unique in the policy (said in holds and metrics).
    pub name: String,
    /// When it opens: cron, 5 fields (minute hour day month weekday), or 6
    /// with seconds first; `@daily`-style nicknames too.
    pub schedule: String,
    /// How long it stays open: `90m`, `2h`, `1h30m`, `45s` (at most 7 days).
    pub duration: String,
    /// The IANA time zone of the schedule (`Europe/Berlin`); default UTC.
    #[serde(default = "utc")]
    pub time_zone: String,
    /// The disruption classes it governs; default restart and recreate.
    /// A class governed brings every more disruptive one with it (`restart`
    /// governs recreates too). A live change goes at any time unless a
    /// window names `live`.
    #[serde(default = "disruptive")]
    pub classes: Vec<WindowClass>,
    /// The VMs it governs, by their labels (kubectl's syntax: `host=web-01`,
    /// `tier!=db`); default every VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

fn utc() -> String {
    "UTC".into()
}

fn disruptive() -> Vec<WindowClass> {
    vec![WindowClass::Restart, WindowClass::Recreate]
}

/// A disruption class a window can govern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WindowClass {
    /// Changes made to the running guest.
    Live,
    /// Changes that restart the guest.
    Restart,
    /// Changes that destroy and rebuild the VM.
    Recreate,
}

impl WindowClass {
    const ALL: [WindowClass; 3] = [
        WindowClass::Live,
        WindowClass::Restart,
        WindowClass::Recreate,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// A window, compiled.
#[derive(Debug, Clone)]
struct Compiled {
    name: String,
    cron: croner::Cron,
    seconds: i64,
    tz: chrono_tz::Tz,
    classes: [bool; 3],
    selector: Selector,
}

/// The policy in force: its windows compiled, or, when the policy file does
/// not load, every disruptive change held.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    windows: Vec<Compiled>,
    /// The policy file has errors: every restart and recreate is held.
    broken: bool,
    /// The text it was compiled from (empty when broken): two loads of the
    /// same file are the same policy.
    text: String,
}

/// What the windows allow one VM now: which classes are closed, and when
/// the first of the windows that govern each opens next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowGate {
    /// Live, restart, recreate: closed now.
    pub closed: [bool; 3],
    /// Per class, when a window that governs it opens next (seconds since
    /// the epoch), while it is closed; `None`: none ever does.
    pub next_open: [Option<i64>; 3],
    /// The policy file does not load.
    pub broken: bool,
}

impl WindowGate {
    /// Whether a change of `class` waits.
    pub fn holds(&self, class: WindowClass) -> bool {
        self.closed[class.index()]
    }

    /// When a change of `class`, closed now, may go.
    pub fn opens(&self, class: WindowClass) -> Option<i64> {
        self.next_open[class.index()]
    }
}

impl Windows {
    /// Whether any window is set (or the policy is broken).
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty() && !self.broken
    }

    /// A policy file that did not load: fail closed.
    pub fn broken() -> Self {
        Windows {
            windows: Vec::new(),
            broken: true,
            text: String::new(),
        }
    }

    /// Whether `other` is the same policy (from the same text).
    pub fn same_as(&self, other: &Windows) -> bool {
        self.broken == other.broken && self.text == other.text
    }

    /// The windows' names, for metrics.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.windows.iter().map(|w| w.name.as_str())
    }

    /// Whether window `name` is open at `now` (seconds since the epoch).
    pub fn is_open(&self, name: &str, now: i64) -> bool {
        self.windows
            .iter()
            .find(|w| w.name == name)
            .is_some_and(|w| opening(w, now).0)
    }

    /// What the windows allow a VM with `labels` at `now` (seconds since
    /// the epoch).
    pub fn gate(&self, labels: &BTreeMap<String, String>, now: i64) -> WindowGate {
        if self.broken {
            return WindowGate {
                closed: [false, true, true],
                next_open: [None; 3],
                broken: true,
            };
        }
        // Each window that governs this VM, judged once.
        let judged: Vec<(&Compiled, bool, Option<i64>)> = self
            .windows
            .iter()
            .filter(|w| w.selector.matches(labels))
            .map(|w| {
                let (open, next) = opening(w, now);
                (w, open, next)
            })
            .collect();
        let mut gate = WindowGate::default();
        for class in WindowClass::ALL {
            let mut any = false;
            let mut open = false;
            let mut next: Option<i64> = None;
            for (_, is_open, next_start) in
                judged.iter().filter(|(w, _, _)| w.classes[class.index()])
            {
                any = true;
                open |= *is_open;
                if let Some(t) = next_start {
                    next = Some(next.map_or(*t, |n| n.min(*t)));
                }
            }
            if any && !open {
                gate.closed[class.index()] = true;
                gate.next_open[class.index()] = next;
            }
        }
        gate
    }
}

/// Whether `w` is open at `now`, and when it next opens after `now`.
fn opening(w: &Compiled, now: i64) -> (bool, Option<i64>) {
    let at = |t: i64| -> Option<DateTime<chrono_tz::Tz>> {
        Utc.timestamp_opt(t, 0)
            .single()
            .map(|d| d.with_timezone(&w.tz))
    };
    // The first opening after `now - duration` (open for [start, start +
    // duration)): at or before `now`, it is still open; after, it is the
    // next one.
    let Some(since) = at(now.saturating_sub(w.seconds).saturating_add(1)) else {
        return (false, None);
    };
    let Ok(start) = w.cron.find_next_occurrence(&since, true) else {
        return (false, None);
    };
    let start = start.timestamp();
    if start <= now {
        let next = at(now)
            .and_then(|n| w.cron.find_next_occurrence(&n, false).ok())
            .map(|d| d.timestamp());
        (true, next)
    } else {
        (false, Some(start))
    }
}

/// How far ahead a schedule must match to be accepted.
const REACH_YEARS: i64 = 8;

/// Whether `cron` matches some time within `years` of a fixed day (no
/// year field: a schedule that matches once then recurs within this span).
fn opens_within_years(cron: &croner::Cron, years: i64) -> bool {
    let Some(from) = Utc.timestamp_opt(1_704_067_200, 0).single() else {
        return false;
    };
    cron.find_next_occurrence(&from, true)
        .is_ok_and(|t| t.timestamp() < from.timestamp() + years * 366 * 86400)
}

/// `90m`, `2h`, `1h30m`, `45s`, `1d` → seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(format!("{s:?}: unknown unit {c:?} (use s, m, h, d)")),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{s:?}: a number must come before {c:?}"))?;
        total = total.saturating_add(n.saturating_mul(unit));
        digits.clear();
        any = true;
    }
    if !digits.is_empty() || !any {
        return Err(format!("{s:?}: give a number and a unit (90m, 2h, 1h30m)"));
    }
    Ok(total)
}

/// Reads `<root>/uvmctl-policy.yaml`, if there is one: `None` without one;
/// the policy compiled, or [`Windows::broken`] with its errors.
pub fn load(root: &Path) -> (Option<Windows>, Vec<SpecError>) {
    // The other spelling is not read as a VM, and not silently ignored:
    // a policy that is not in force must never look as if it were.
    let misnamed = root.join("uvmctl-policy.yml");
    if root.is_dir() && std::fs::symlink_metadata(&misnamed).is_ok() {
        return (
            Some(Windows::broken()),
            vec![SpecError::whole_file(
                &misnamed,
                format!("the rollout policy is read from {POLICY_FILE}; rename it"),
            )],
        );
    }
    let path = root.join(POLICY_FILE);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (None, Vec::new()),
        // A directory root only: a single spec file has no policy beside it.
        _ if !root.is_dir() => return (None, Vec::new()),
        _ => {}
    }
    match super::load::read_text(&path) {
        Ok(text) => match parse(&path, &text) {
            Ok(w) => (Some(w), Vec::new()),
            Err(errors) => (Some(Windows::broken()), errors),
        },
        Err(msg) => (
            Some(Windows::broken()),
            vec![SpecError::whole_file(&path, msg)],
        ),
    }
}

/// Parses and compiles a policy file's text; every problem, positioned.
pub fn parse(path: &Path, text: &str) -> Result<Windows, Vec<SpecError>> {
    let fail = |line: usize, column: usize, message: String| {
        vec![SpecError {
            file: path.to_path_buf(),
            line,
            column,
            field: String::new(),
            message,
        }]
    };
    // The spec files' bounds hold here too: a stranger's policy file never
    // makes serde_yaml nest or expand without end.
    if let Some((line, column, why)) = super::load::yaml::refusal(text) {
        return Err(fail(line, column, why));
    }
    let doc: PolicyDocument = match serde_yaml::from_str(text) {
        Ok(d) => d,
        Err(e) => {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            let mut message = e.to_string();
            if let Some(i) = message.rfind(" at line ") {
                message.truncate(i);
            }
            return Err(fail(line, column, super::load::yaml::tame(&message)));
        }
    };
    let locations = Locations::index(text);
    let mut errors = Vec::new();
    let mut err = |field: String, message: String| {
        let (line, column) = locations.find(0, &field).unwrap_or((0, 0));
        errors.push(SpecError {
            file: path.to_path_buf(),
            line,
            column,
            field,
            message,
        });
    };
    if doc.api_version != crate::spec::API_VERSION {
        err(
            "apiVersion".into(),
            format!("must be {}", crate::spec::API_VERSION),
        );
    }
    if doc.kind != POLICY_KIND {
        err("kind".into(), format!("must be {POLICY_KIND}"));
    }
    if doc.spec.windows.len() > MAX_WINDOWS {
        err(
            "spec.windows".into(),
            format!("{} windows; at most {MAX_WINDOWS}", doc.spec.windows.len()),
        );
    }
    let parser = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build();
    let mut windows = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, w) in doc.spec.windows.iter().enumerate().take(MAX_WINDOWS) {
        let at = |f: &str| format!("spec.windows[{i}].{f}");
        let name_ok = !w.name.is_empty()
            && w.name.len() <= 63
            && w.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            err(
                at("name"),
                "letters, digits, '-' and '_', 1 to 63 of them".into(),
            );
        } else if !names.insert(w.name.clone()) {
            err(at("name"), format!("{:?} is given twice", w.name));
        }
        let cron = match parser.parse(&w.schedule) {
            // One that never matches (February 31st) would make every
            // later search walk to croner's end of time: refused here, once.
            Ok(c) if !opens_within_years(&c, REACH_YEARS) => {
                err(
                    at("schedule"),
                    format!("never opens (no time within {REACH_YEARS} years matches it)"),
                );
                None
            }
            Ok(c) => Some(c),
            Err(e) => {
                err(at("schedule"), format!("not a cron schedule: {e}"));
                None
            }
        };
        let seconds = match parse_duration(&w.duration) {
            Ok(0) => {
                err(at("duration"), "a window must stay open a while".into());
                None
            }
            Ok(s) if s > MAX_WINDOW_SECONDS => {
                err(at("duration"), "at most 7 days".into());
                None
            }
            Ok(s) => Some(s),
            Err(e) => {
                err(at("duration"), e);
                None
            }
        };
        let tz = match w.time_zone.parse::<chrono_tz::Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                err(
                    at("timeZone"),
                    format!(
                        "{} is not an IANA time zone (Europe/Berlin, UTC)",
                        super::error::excerpt(&w.time_zone)
                    ),
                );
                None
            }
        };
        if w.classes.is_empty() {
            err(at("classes"), "name at least one class".into());
        }
        let selector = match w.selector.as_deref().map(str::parse::<Selector>) {
            None => Some(Selector::default()),
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                err(at("selector"), e.to_string());
                None
            }
        };
        if let (Some(cron), Some(seconds), Some(tz), Some(selector)) = (cron, seconds, tz, selector)
        {
            // A class governed brings every more disruptive one.
            let least = w.classes.iter().map(|c| c.index()).min().unwrap_or(0);
            let mut classes = [false; 3];
            for governed in classes.iter_mut().skip(least) {
                *governed = true;
            }
            windows.push(Compiled {
                name: w.name.clone(),
                cron,
                seconds: i64::try_from(seconds).unwrap_or(i64::MAX),
                tz,
                classes,
                selector,
            });
        }
    }
    if errors.is_empty() {
        Ok(Windows {
            windows,
            broken: false,
            text: text.to_string(),
        })
    } else {
        Err(errors)
    }
}

/// The JSON Schema of the policy file (`uvmctl schema --policy`).
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(PolicyDocument)).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(windows: &str) -> String {
        format!(
            "apiVersion: uvmctl.dev/v1alpha1\nkind: RolloutPolicy\nspec:\n  windows:\n{windows}"
        )
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// 2026-12-07T00:00:00Z, a Monday.
    const MONDAY: i64 = 1_796_601_600;

    #[test]
    fn a_nightly_window_in_its_time_zone_opens_and_closes() {
        // 02:00 Berlin (UTC+1 in December) for 2 h: 01:00 to 03:00 UTC.
        let w = parse(
            Path::new("p.yaml"),
            &policy("    - name: nightly\n      schedule: '0 2 * * *'\n      duration: 2h\n      timeZone: Europe/Berlin\n"),
        )
        .expect("valid");
        let any = labels(&[]);
        let at = |h: i64, m: i64| MONDAY + h * 3600 + m * 60;
        let before = w.gate(&any, at(0, 30));
        assert!(!before.holds(WindowClass::Live), "live goes at any time");
        assert!(before.holds(WindowClass::Restart) && before.holds(WindowClass::Recreate));
        assert_eq!(before.opens(WindowClass::Restart), Some(at(1, 0)));
        let inside = w.gate(&any, at(2, 59));
        assert_eq!(inside.closed, [false, false, false]);
        let after = w.gate(&any, at(3, 0));
        assert!(after.holds(WindowClass::Restart));
        assert_eq!(
            after.opens(WindowClass::Recreate),
            Some(at(25, 0)),
            "tomorrow's"
        );
        assert!(w.is_open("nightly", at(1, 0)) && !w.is_open("nightly", at(0, 59)));
    }

    #[test]
    fn a_window_governs_only_its_classes_and_the_vms_its_selector_picks() {
        let w = parse(
            Path::new("p.yaml"),
            &policy("    - name: web\n      schedule: '*/10 * * * * *'\n      duration: 5s\n      classes: [recreate]\n      selector: host=web-01\n    - name: live\n      schedule: '0 * * * * *'\n      duration: 5s\n      classes: [live]\n      selector: host=web-01\n"),
        )
        .expect("valid");
        let web = labels(&[("host", "web-01")]);
        // Governing live governs every class; the recreate window opens
        // every 10 s, the live one at each full minute.
        let closed = w.gate(&web, MONDAY + 7);
        assert_eq!(closed.closed, [true, true, true]);
        assert_eq!(closed.opens(WindowClass::Recreate), Some(MONDAY + 10));
        assert_eq!(closed.opens(WindowClass::Restart), Some(MONDAY + 60));
        assert_eq!(w.gate(&web, MONDAY + 12).closed, [true, true, false]);
        assert_eq!(w.gate(&web, MONDAY + 62).closed, [false; 3]);
        assert_eq!(
            w.gate(&labels(&[("host", "db-01")]), MONDAY + 7).closed,
            [false; 3]
        );
        // Restart alone governs recreates too.
        let restart = parse(
            Path::new("p.yaml"),
            &policy("    - name: r\n      schedule: '0 1 * * *'\n      duration: 1h\n      classes: [restart]\n"),
        )
        .expect("valid");
        assert_eq!(restart.gate(&web, MONDAY).closed, [false, true, true]);
    }

    #[test]
    fn two_windows_for_one_class_either_opens_it() {
        let w = parse(
            Path::new("p.yaml"),
            &policy("    - name: a\n      schedule: '0 1 * * *'\n      duration: 1h\n    - name: b\n      schedule: '0 5 * * *'\n      duration: 1h\n"),
        )
        .expect("valid");
        let any = labels(&[]);
        assert_eq!(w.gate(&any, MONDAY + 5 * 3600 + 10).closed, [false; 3]);
        assert_eq!(
            w.gate(&any, MONDAY + 3 * 3600).opens(WindowClass::Restart),
            Some(MONDAY + 5 * 3600)
        );
    }

    #[test]
    fn every_problem_names_its_field_and_line_and_a_broken_policy_holds_everything_disruptive() {
        let text = policy(
            "    - name: bad name\n      schedule: '61 * * * *'\n      duration: 2x\n      timeZone: Mars/Olympus\n      selector: '=x'\n    - name: ok\n      schedule: '@daily'\n      duration: 0s\n      classes: []\n",
        );
        let errors = parse(Path::new("p.yaml"), &text).expect_err("invalid");
        let fields: Vec<(&str, usize)> =
            errors.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(
            fields,
            [
                ("spec.windows[0].name", 5),
                ("spec.windows[0].schedule", 6),
                ("spec.windows[0].duration", 7),
                ("spec.windows[0].timeZone", 8),
                ("spec.windows[0].selector", 9),
                ("spec.windows[1].duration", 12),
                ("spec.windows[1].classes", 13),
            ],
            "{errors:?}"
        );
        let never = parse(
            Path::new("p.yaml"),
            &policy("    - name: feb\n      schedule: '0 0 31 2 *'\n      duration: 1h\n"),
        )
        .expect_err("never opens");
        assert!(never[0].message.starts_with("never opens"), "{never:?}");
        let year = parse(
            Path::new("p.yaml"),
            &policy("    - name: y\n      schedule: '0 0 0 1 1 * 2030'\n      duration: 1h\n"),
        );
        assert!(year.is_err(), "no year field");
        let unknown = parse(
            Path::new("p.yaml"),
            &policy("    - name: a\n      schedul: x\n"),
        )
        .expect_err("unknown field");
        assert_eq!(unknown[0].line, 6, "{unknown:?}");
        let gate = Windows::broken().gate(&labels(&[]), MONDAY);
        assert_eq!(gate.closed, [false, true, true]);
        assert!(gate.broken && gate.opens(WindowClass::Restart).is_none());
    }

    /// Across daylight saving time: a window in the hour a spring-forward
    /// skips still opens that day (at the end of the gap), and one in the
    /// hour a fall-back repeats opens once, at its first occurrence.
    #[test]
    fn a_window_keeps_its_day_across_daylight_saving_time() {
        let w = parse(
            Path::new("p.yaml"),
            &policy("    - name: n\n      schedule: '30 2 * * *'\n      duration: 1h\n      timeZone: Europe/Berlin\n"),
        )
        .expect("valid");
        let any = labels(&[]);
        // 2027-03-28: 02:00 CET becomes 03:00 CEST, i.e. 01:00 UTC.
        let spring = 1_806_192_000; // 2027-03-28T00:00:00Z
        let gate = w.gate(&any, spring);
        assert_eq!(gate.opens(WindowClass::Restart), Some(spring + 3600));
        assert_eq!(w.gate(&any, spring + 3600 + 60).closed, [false; 3]);
        // 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens at
        // 00:30 UTC and again at 01:30 UTC.
        let autumn = 1_792_886_400; // 2026-10-25T00:00:00Z
        assert_eq!(
            w.gate(&any, autumn).opens(WindowClass::Restart),
            Some(autumn + 1800)
        );
        let after = w.gate(&any, autumn + 1800 + 3600);
        assert!(after.holds(WindowClass::Restart), "open once, an hour");
        assert!(
            after
                .opens(WindowClass::Restart)
                .is_some_and(|t| t > autumn + 86400),
            "next on the following day: {after:?}"
        );
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("45s"), Ok(45));
        assert_eq!(parse_duration("1d"), Ok(86400));
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn a_directory_without_a_policy_has_none_and_one_that_fails_is_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(dir.path()).0.is_none());
        std::fs::write(dir.path().join(POLICY_FILE), "kind: [").expect("write");
        let (w, errors) = load(dir.path());
        assert!(w.is_some_and(|w| w.gate(&BTreeMap::new(), 0).broken));
        assert_eq!(errors.len(), 1);
    }
}
