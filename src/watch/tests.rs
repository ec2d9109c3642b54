//! The loop against the in-memory virtstack, with real spec files and a
//! real file watcher: triggers, held changes, last good specs, pruning,
//! backoff, isolation and shutdown.

use super::*;
use crate::virtstack::fake::Fake;
use crate::vm::{Capabilities, HostFacts, State};
use std::path::Path;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

fn caps() -> Capabilities {
    Capabilities::qemu(&HostFacts {
        vhost_vsock: true,
        vhost_user_vsock: true,
        vfio: true,
        ovmf: true,
        pin_memory_refused: None,
        isolation: None,
    })
}

/// A spec with SCSI disks at `luns` and `extra` lines under `spec:`.
fn spec(name: &str, luns: &[u32], extra: &str) -> String {
    let mut s = format!(
        "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: {name}\nspec:\n  \
         boot:\n    linuxKernelDirect:\n      kernel: /k/vmlinuz\n  processors:\n    count: 1\n  \
         memory:\n    sizeMB: 256\n  scsiControllers:\n    - id: 0\n"
    );
    if !luns.is_empty() {
        s.push_str("      disks:\n");
        for lun in luns {
            s.push_str(&format!(
                "        - {{lun: {lun}, path: /d/{name}-{lun}.img, type: passthrough}}\n"
            ));
        }
    }
    s.push_str(extra);
    s
}

/// Saves like an editor: a temporary file renamed over the spec.
fn save(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.yaml.tmp"));
    std::fs::write(&tmp, text).expect("write");
    // On Windows (Wine) a rename over a file the watcher is reading can be
    // refused for that moment.
    for attempt in 0.. {
        match std::fs::rename(&tmp, dir.join(format!("{name}.yaml"))) {
            Err(e)
                if cfg!(windows)
                    && attempt < 20
                    && e.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            done => return done.expect("rename"),
        }
    }
}

/// Saves and tells the watcher at once (as the git task does), so a test on
/// paused time does not wait for the file watcher's thread, which the
/// paused clock does not wait for.
fn save_now(w: &Running, name: &str, text: &str) {
    save(w.specs.path(), name, text);
    w.signals.send(Signal::Rescan).expect("watcher running");
}

struct Running {
    fake: Fake,
    specs: tempfile::TempDir,
    state: tempfile::TempDir,
    reports: UnboundedReceiver<Report>,
    /// Reports read while looking for another VM's.
    aside: Vec<Report>,
    signals: UnboundedSender<Signal>,
    task: JoinHandle<Result<(), WatchError>>,
}

fn options(specs: &Path, state: &Path) -> WatchOptions {
    WatchOptions {
        dir: specs.to_path_buf(),
        resync: Duration::from_secs(3600),
        debounce: Duration::from_millis(20),
        max_disruption: Disruption::Live,
        detect_only: false,
        prune: false,
        prune_guard: crate::plan::prune::PruneGuard::default(),
        state_dir: Some(state.to_path_buf()),
        lock_timeout: Duration::from_secs(5),
        reconcile_deadline: Duration::from_secs(5),
        backoff: Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            stable: Duration::from_secs(60),
        },
        source: None,
        placement: None,
        metrics: None,
        revert: true,
        wave: None,
    }
}

/// Starts a watcher over `files` (name → text), with `tune` applied to its options.
fn start(fake: &Fake, files: &[(&str, String)], tune: impl FnOnce(&mut WatchOptions)) -> Running {
    let specs = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        std::fs::write(specs.path().join(format!("{name}.yaml")), text).expect("write");
    }
    let mut opts = options(specs.path(), state.path());
    tune(&mut opts);
    let (report_tx, reports) = unbounded_channel();
    let (signals, signal_rx) = unbounded_channel();
    let vs: Arc<dyn Virtstack> = Arc::new(fake.clone());
    let task = tokio::spawn(run(vs, opts, signal_rx, Some(report_tx)));
    Running {
        fake: fake.clone(),
        specs,
        state,
        reports,
        aside: Vec::new(),
        signals,
        task,
    }
}

impl Running {
    /// The next report about `vm`, skipping others (collected into `others`).
    async fn next_for(&mut self, vm: &str) -> Report {
        if let Some(i) = self.aside.iter().position(|r| r.vm == vm) {
            return self.aside.remove(i);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let r = tokio::time::timeout_at(deadline, self.reports.recv())
                .await
                .unwrap_or_else(|_| panic!("no report for {vm} within {WAIT:?}"))
                .expect("watcher running");
            // A verdict's reconcile that only wrote it into the history.
            if r.trigger == Trigger::Health && r.outcome == Outcome::InSync {
                continue;
            }
            if r.vm == vm {
                return r;
            }
            self.aside.push(r);
        }
    }

    /// Every report that arrives within `d`.
    async fn quiet_for(&mut self, d: Duration) -> Vec<Report> {
        let mut got = std::mem::take(&mut self.aside);
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, self.reports.recv()).await {
            got.push(r);
        }
        got
    }

    fn changes(&self) -> Vec<String> {
        self.fake
            .log()
            .into_iter()
            .filter(|l| !l.ends_with(" observe"))
            .collect()
    }

    fn status(&self) -> WatchStatus {
        status::read(self.state.path()).expect("status file").0
    }

    async fn stop(self) {
        let _ = self.signals.send(Signal::Stop);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("stops")
            .expect("joins")
            .expect("runs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_are_created_then_a_saved_edit_reconciles_only_its_vm_once() {
    let fake = Fake::new(caps());
    let mut w = start(
        &fake,
        &[("a", spec("a", &[], "")), ("b", spec("b", &[], ""))],
        |_| {},
    );
    for vm in ["a", "b"] {
        let r = w.next_for(vm).await;
        assert_eq!(r.trigger, Trigger::Start);
        assert!(matches!(r.outcome, Outcome::Applied(_)), "{r:?}");
        assert_eq!(fake.get(vm).expect("created").state, State::Running);
    }
    save(w.specs.path(), "a", &spec("a", &[1], ""));
    let r = w.next_for("a").await;
    assert_eq!((r.trigger, r.outcome), (Trigger::Spec, Outcome::Applied(1)));
    assert!(w.changes().contains(&"a add scsiDisk".to_string()));
    let more = w.quiet_for(Duration::from_millis(500)).await;
    assert!(
        more.is_empty(),
        "one reconcile per change, none for b: {more:?}"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_watcher_adopts_running_vms_without_an_operation() {
    let fake = Fake::new(caps());
    let w = start(&fake, &[("a", spec("a", &[1], ""))], |_| {});
    let mut w = w;
    w.next_for("a").await;
    let before = w.changes();
    let specs = w.specs;
    w.signals.send(Signal::Stop).expect("signal");
    tokio::time::timeout(WAIT, w.task)
        .await
        .expect("stops")
        .expect("joins")
        .expect("runs");

    let (report_tx, mut reports) = unbounded_channel();
    let (_signals, signal_rx) = unbounded_channel();
    let opts = options(specs.path(), w.state.path());
    let vs: Arc<dyn Virtstack> = Arc::new(fake.clone());
    let task = tokio::spawn(run(vs, opts, signal_rx, Some(report_tx)));
    let r = tokio::time::timeout(WAIT, reports.recv())
        .await
        .expect("report")
        .expect("open");
    assert_eq!((r.trigger, r.outcome), (Trigger::Start, Outcome::InSync));
    let after: Vec<String> = fake
        .log()
        .into_iter()
        .filter(|l| !l.ends_with(" observe"))
        .collect();
    assert_eq!(after, before, "adoption changes nothing");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_spec_keeps_its_vm_at_the_last_good_one_and_fixing_it_resumes() {
    let fake = Fake::new(caps());
    let mut w = start(
        &fake,
        &[("a", spec("a", &[], "")), ("b", spec("b", &[], ""))],
        |o| {
            o.prune = true;
        },
    );
    w.next_for("a").await;
    w.next_for("b").await;
    save(
        w.specs.path(),
        "a",
        "apiVersion: uvmctl.dev/v1alpha1\nkind: [\n",
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = w.status();
    let err = s.vms["a"].spec_error.clone().expect("spec error recorded");
    assert!(err.contains("a.yaml:3:1: not valid YAML"), "{err}");
    assert_eq!(s.spec_errors.len(), 1, "{s:?}");
    // A resync meanwhile: a is reconciled against its last good spec.
    fake.insert("a", {
        let mut vm = fake.get("a").expect("a");
        vm.state = State::Paused;
        vm
    });
    w.fake.emit("a", VmEvent::Reported("STOP".into()));
    let r = w.next_for("a").await;
    assert_eq!(r.outcome, Outcome::Applied(1), "{r:?}");
    assert_eq!(fake.get("a").expect("kept").state, State::Running);

    save(w.specs.path(), "a", &spec("a", &[2], ""));
    let r = w.next_for("a").await;
    assert_eq!((r.trigger, r.outcome), (Trigger::Spec, Outcome::Applied(1)));
    assert!(w.status().vms["a"].spec_error.is_none());
    assert!(!w.changes().iter().any(|l| l.contains("destroy")));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_waits_for_a_second_scan_and_never_empties_the_host() {
    let fake = Fake::new(caps());
    let mut w = start(
        &fake,
        &[
            ("a", spec("a", &[], "")),
            ("b", spec("b", &[], "")),
            ("c", spec("c", &[], "")),
        ],
        |o| o.prune = true,
    );
    for vm in ["a", "b", "c"] {
        w.next_for(vm).await;
    }
    std::fs::remove_file(w.specs.path().join("b.yaml")).expect("rm");
    let r = w.next_for("b").await;
    assert_eq!(r.outcome, Outcome::Pruned);
    assert!(fake.get("b").is_none());

    // Every spec gone: nothing is removed, however long we wait.
    for vm in ["a", "c"] {
        std::fs::remove_file(w.specs.path().join(format!("{vm}.yaml"))).expect("rm");
    }
    let more = w.quiet_for(Duration::from_millis(2500)).await;
    assert!(more.is_empty(), "{more:?}");
    assert!(fake.get("a").is_some() && fake.get("c").is_some());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_prune_a_vm_whose_spec_is_gone_is_left_alone() {
    let fake = Fake::new(caps());
    let mut w = start(
        &fake,
        &[("a", spec("a", &[], "")), ("b", spec("b", &[], ""))],
        |_| {},
    );
    w.next_for("a").await;
    w.next_for("b").await;
    std::fs::remove_file(w.specs.path().join("b.yaml")).expect("rm");
    let more = w.quiet_for(Duration::from_millis(1500)).await;
    assert!(more.is_empty(), "{more:?}");
    assert!(fake.get("b").is_some());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_above_the_ceiling_is_held_and_shown() {
    let fake = Fake::new(caps());
    let mut w = start(&fake, &[("a", spec("a", &[], ""))], |_| {});
    w.next_for("a").await;
    let before = w.changes();
    let share = "  plan9Shares:\n    - {name: s, hostPath: /srv/s}\n";
    save(w.specs.path(), "a", &spec("a", &[], share));
    let r = w.next_for("a").await;
    let Outcome::Held(lines) = &r.outcome else {
        panic!("{r:?}")
    };
    assert!(
        lines
            .iter()
            .any(|l| l.contains("plan9Share") && l.contains("restart")),
        "{lines:?}"
    );
    assert_eq!(w.changes(), before, "nothing done");
    assert_eq!(w.status().vms["a"].held, *lines);
    w.stop().await;
}

/// On paused time: the delays are the policy's exactly, whatever the
/// machine's load.
#[tokio::test(start_paused = true)]
async fn a_failing_vm_backs_off_and_never_delays_the_others() {
    let fake = Fake::new(caps());
    let mut w = start(
        &fake,
        &[("a", spec("a", &[], "")), ("b", spec("b", &[], ""))],
        |_| {},
    );
    w.next_for("a").await;
    w.next_for("b").await;
    fake.fail("a", "add scsiDisk");
    fake.hang("b", "remove scsiDisk");
    save_now(&w, "a", &spec("a", &[1], ""));
    for _ in 0..4 {
        let r = w.next_for("a").await;
        assert!(matches!(r.outcome, Outcome::Failed(_)), "{r:?}");
    }
    let at = fake.started("a", "add scsiDisk");
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps[..3],
        [100, 200, 400].map(Duration::from_millis),
        "doubling from 100 ms: {at:?}"
    );
    assert!(w.status().vms["a"].failures >= 4);

    // b hangs in an operation: c, new, is created meanwhile.
    save_now(&w, "b", &spec("b", &[1], ""));
    save_now(&w, "b", &spec("b", &[], ""));
    save_now(&w, "c", &spec("c", &[], ""));
    let r = w.next_for("c").await;
    assert!(matches!(r.outcome, Outcome::Applied(_)), "{r:?}");
    // a's error fixed: a new spec retries at once.
    save_now(&w, "a", &spec("a", &[], ""));
    loop {
        // A retry already under way may report first.
        let r = w.next_for("a").await;
        if r.trigger == Trigger::Spec {
            assert_eq!(r.outcome, Outcome::InSync);
            break;
        }
    }
    w.task.abort();
}

/// On paused time: each relaunch comes exactly when the policy says.
#[tokio::test(start_paused = true)]
async fn a_vm_that_keeps_crashing_is_relaunched_with_growing_delays() {
    let fake = Fake::new(caps());
    let policy = "  policy: {allowRecreate: true}\n";
    let mut w = start(&fake, &[("a", spec("a", &[], policy))], |o| {
        o.max_disruption = Disruption::Recreate;
    });
    w.next_for("a").await;
    let mut relaunched = Vec::new();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let crashed = tokio::time::Instant::now();
        fake.crash("a", "guest panicked");
        loop {
            let r = w.next_for("a").await;
            if matches!(r.outcome, Outcome::Applied(_)) {
                break;
            }
            assert!(matches!(r.outcome, Outcome::BackingOff), "{r:?}");
        }
        relaunched.push(crashed.elapsed());
        assert_eq!(fake.get("a").expect("a").state, State::Running);
    }
    // Immediately, then 100, 200, 400 ms: never a tight loop.
    assert_eq!(
        relaunched,
        [0, 100, 200, 400].map(Duration::from_millis),
        "{relaunched:?}"
    );
    assert!(w.status().vms["a"].failures >= 3);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_vm_whose_policy_forbids_recreating_is_held() {
    let fake = Fake::new(caps());
    let mut w = start(&fake, &[("a", spec("a", &[], ""))], |o| {
        o.max_disruption = Disruption::Recreate;
    });
    w.next_for("a").await;
    fake.crash("a", "killed");
    let r = w.next_for("a").await;
    assert_eq!(r.trigger, Trigger::Event("exited".into()));
    let Outcome::Held(lines) = r.outcome else {
        panic!("{r:?}")
    };
    assert!(lines.iter().any(|l| l.contains("policy")), "{lines:?}");
    assert_eq!(fake.get("a").expect("a").state, State::Terminated);
    w.stop().await;
}

/// A VM that dies between the reconcile's look and the subscription to its
/// events is seen at once, not at the next resync (an hour away here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_subscription_is_still_seen() {
    let fake = Fake::new(caps());
    fake.crash_at_subscribe("a", "killed");
    let mut w = start(&fake, &[("a", spec("a", &[], ""))], |o| {
        o.resync = Duration::from_secs(3600);
        o.backoff.base = Duration::from_millis(10);
    });
    let first = w.next_for("a").await;
    assert!(matches!(first.outcome, Outcome::Applied(_)), "{first:?}");
    let r = tokio::time::timeout(Duration::from_secs(20), w.next_for("a"))
        .await
        .expect("seen before any resync");
    assert_eq!(r.trigger, Trigger::Event("exited".into()), "{r:?}");
    w.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_first_signal_waits_for_the_reconcile_in_flight_the_second_exits_at_once() {
    let fake = Fake::new(caps());
    let mut w = start(&fake, &[("a", spec("a", &[], ""))], |o| {
        o.reconcile_deadline = Duration::from_secs(3600);
    });
    w.next_for("a").await;
    fake.hang("a", "add scsiDisk");
    save_now(&w, "a", &spec("a", &[1], ""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.started("a", "add scsiDisk").len(), 1, "in flight");
    w.signals.send(Signal::Stop).expect("signal");
    // An hour on the paused clock: the reconcile in flight is waited for.
    tokio::time::sleep(Duration::from_secs(3500)).await;
    assert!(!w.task.is_finished(), "waits for the reconcile in flight");
    w.signals.send(Signal::Stop).expect("signal");
    tokio::time::timeout(Duration::from_secs(2), w.task)
        .await
        .expect("exits at once")
        .expect("joins")
        .expect("runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_watcher_on_the_same_state_directory_is_refused() {
    let fake = Fake::new(caps());
    let mut w = start(&fake, &[("a", spec("a", &[], ""))], |_| {});
    w.next_for("a").await;
    let (_s, signals) = unbounded_channel();
    let opts = options(w.specs.path(), w.state.path());
    let vs: Arc<dyn Virtstack> = Arc::new(fake.clone());
    let second = run(vs, opts, signals, None).await;
    let err = second.expect_err("refused");
    assert!(matches!(err, WatchError::AlreadyWatched(_)), "{err}");
    assert!(
        Chain(&err).to_string().contains("locked by pid"),
        "names the first: {}",
        Chain(&err)
    );
    w.stop().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_style_data_link_swap_reconciles_the_vms_it_changes() {
    let fake = Fake::new(caps());
    let specs = tempfile::tempdir().expect("tempdir");
    let v1 = specs.path().join("..2026_11_29_v1");
    std::fs::create_dir(&v1).expect("mkdir");
    std::fs::write(v1.join("a.yaml"), spec("a", &[], "")).expect("write");
    std::fs::write(v1.join("b.yaml"), spec("b", &[], "")).expect("write");
    std::os::unix::fs::symlink("..2026_11_29_v1", specs.path().join("..data")).expect("link");
    for vm in ["a", "b"] {
        std::os::unix::fs::symlink(
            format!("..data/{vm}.yaml"),
            specs.path().join(format!("{vm}.yaml")),
        )
        .expect("link");
    }
    let mut w = start(&fake, &[], |o| o.dir = specs.path().to_path_buf());
    w.next_for("a").await;
    w.next_for("b").await;
    // The kubelet's update: a new directory, a new link renamed over `..data`.
    let v2 = specs.path().join("..2026_11_29_v2");
    std::fs::create_dir(&v2).expect("mkdir");
    std::fs::write(v2.join("a.yaml"), spec("a", &[1], "")).expect("write");
    std::fs::write(v2.join("b.yaml"), spec("b", &[], "")).expect("write");
    std::os::unix::fs::symlink("..2026_11_29_v2", specs.path().join("..data_tmp")).expect("link");
    std::fs::rename(specs.path().join("..data_tmp"), specs.path().join("..data")).expect("swap");
    std::fs::remove_dir_all(&v1).expect("old data gone");
    let r = w.next_for("a").await;
    assert_eq!((r.trigger, r.outcome), (Trigger::Spec, Outcome::Applied(1)));
    let more = w.quiet_for(Duration::from_millis(500)).await;
    assert!(more.is_empty(), "b did not change: {more:?}");
    w.stop().await;
}

/// Issue 20: a one-change plan held read `held 2 change(s)` (the reason
/// line was counted).
#[test]
fn a_held_plan_counts_its_changes_not_its_reason() {
    let held = Outcome::Held(vec![
        "add plan9Share src: restart (...)".into(),
        "needs restart, above --max-disruption live".into(),
    ]);
    assert_eq!(held.to_string(), "held 1 change(s)");
}

/// Issue 18: a detect-only watcher reports drift, spec changes and prunes
/// as held, and executes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detect_only_watch_reports_everything_and_changes_nothing() {
    let fake = Fake::new(caps());
    fake.insert(
        "a",
        crate::virtstack::fake::FakeVm {
            config: crate::plan::tests::base("a"),
            state: State::Running,
            managed: true,
        },
    );
    fake.insert(
        "gone",
        crate::virtstack::fake::FakeVm {
            config: crate::plan::tests::base("gone"),
            state: State::Running,
            managed: true,
        },
    );
    let mut w = start(
        &fake,
        &[("a", spec("a", &[1], "")), ("new", spec("new", &[], ""))],
        |o| {
            o.detect_only = true;
            o.prune = true;
        },
    );
    for vm in ["a", "new"] {
        let r = w.next_for(vm).await;
        let Outcome::Held(lines) = &r.outcome else {
            panic!("{r:?}")
        };
        assert!(
            lines.last().is_some_and(|l| l.starts_with("detect-only")),
            "{lines:?}"
        );
    }
    // The prune is confirmed by a second scan, then held like the rest.
    let r = w.next_for("gone").await;
    let r = if matches!(r.outcome, Outcome::InSync) {
        w.next_for("gone").await
    } else {
        r
    };
    let Outcome::Held(lines) = &r.outcome else {
        panic!("{r:?}")
    };
    assert!(lines.iter().any(|l| l.contains("prune")), "{lines:?}");
    assert!(fake.get("new").is_none(), "nothing created");
    assert!(fake.get("gone").is_some(), "nothing pruned");
    assert!(
        fake.get("a")
            .is_some_and(|v| v.config.scsi_controllers.is_empty()),
        "nothing changed"
    );
    assert!(!w.status().vms["a"].held.is_empty());
    w.stop().await;
}

/// Issue 30: a writable image another VM of this host has is refused by the
/// watcher too, before anything is made: here the other VM has no spec in
/// this directory, so the watcher never reconciled it and looks at it then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_refuses_an_image_another_vm_of_the_host_has() {
    let fake = Fake::new(caps());
    let demo = crate::spec::load_texts(&[("demo.yaml".into(), spec("demo", &[1], ""))]);
    let config = (*demo.desired.vms["demo"].config).clone();
    fake.insert(
        "demo",
        crate::virtstack::fake::FakeVm {
            config,
            state: State::Running,
            managed: true,
        },
    );
    let copy = spec("copy", &[1], "").replace("/d/copy-1.img", "/d/demo-1.img");
    let mut w = start(&fake, &[("copy", copy)], |_| {});
    let r = w.next_for("copy").await;
    let Outcome::Failed(why) = &r.outcome else {
        panic!("{r:?}")
    };
    assert!(
        why.contains(
            "spec.scsiControllers[0].disks[0].path: /d/demo-1.img is attached writable by VM demo"
        ),
        "{why}"
    );
    assert!(fake.get("copy").is_none(), "nothing made");
    w.stop().await;
}

/// Issue 34: every change a watcher applies to a running VM with
/// `spec.health` is judged: a guest whose probes pass is healthy, one whose
/// probe keeps failing is unhealthy at its deadline, the probe and its
/// answer in the status file and the metrics; a VM without `spec.health`
/// shows no health. A later change is judged anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_judges_each_change_by_its_health_probes() {
    use crate::vm::health::Answer;
    use status::HealthState;
    let fake = Fake::new(caps());
    fake.answer_probes("bad", Answer::fail("cat: can't open '/ok'"));
    let health = "  health:\n    probes:\n      - kind: exec\n        command: [cat, /ok]\n        intervalSeconds: 1\n        minHealthySeconds: 0\n        deadlineSeconds: 2\n";
    let metrics = metrics::Metrics::new();
    let seen = Arc::clone(&metrics);
    let mut w = start(
        &fake,
        &[
            ("good", spec("good", &[], health)),
            ("bad", spec("bad", &[], health)),
            ("plain", spec("plain", &[], "")),
        ],
        |o| o.metrics = Some(seen),
    );
    for vm in ["good", "bad", "plain"] {
        assert!(matches!(w.next_for(vm).await.outcome, Outcome::Applied(_)));
    }
    let judged = |w: &Running, vm: &str, want: HealthState| {
        let st = w.status();
        st.vms
            .get(vm)
            .and_then(|v| v.health.clone())
            .filter(|h| h.health == want)
    };
    let until = |w: &Running, vm: &str, want: HealthState| {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(h) = judged(w, vm, want) {
                return h;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{vm} not {want:?} within {WAIT:?}: {:?}",
                w.status().vms.get(vm)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(until(&w, "good", HealthState::Healthy).probe, None);
    let bad = until(&w, "bad", HealthState::Unhealthy);
    assert_eq!(
        (bad.probe.as_deref(), bad.answer.as_deref()),
        (Some("exec cat /ok"), Some("cat: can't open '/ok'"))
    );
    assert_eq!(w.status().vms["plain"].health, None);
    let text = metrics.encode();
    for line in [
        "uvmctl_vm_health{vm=\"good\",health=\"healthy\"} 1",
        "uvmctl_vm_health{vm=\"bad\",health=\"unhealthy\"} 1",
        "uvmctl_vm_health{vm=\"bad\",health=\"healthy\"} 0",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    assert!(!text.contains("vm=\"plain\",health"), "{text}");

    // A live change: judged anew, from pending.
    fake.answer_probes("good", Answer::fail("gone"));
    save(w.specs.path(), "good", &spec("good", &[1], health));
    assert_eq!(w.next_for("good").await.outcome, Outcome::Applied(1));
    let good = until(&w, "good", HealthState::Unhealthy);
    assert_eq!(good.answer.as_deref(), Some("gone"));
    w.stop().await;
}

/// Waits until `vm`'s status says `ok` of it.
fn status_until(w: &Running, vm: &str, what: &str, ok: impl Fn(&status::VmWatch) -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if w.status().vms.get(vm).is_some_and(&ok) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{vm}: not {what} within {WAIT:?}: {:?}",
            w.status().vms.get(vm)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lacks_lun_1(c: &crate::spec::VmConfig) -> bool {
    !c.scsi_controllers
        .iter()
        .any(|s| s.disks.iter().any(|d| d.lun == 1))
}

fn has_pmem(c: &crate::spec::VmConfig) -> bool {
    c.vpmem.as_ref().is_some_and(|v| !v.devices.is_empty())
}

const QUICK_HEALTH: &str = "  health:\n    probes:\n      - kind: exec\n        command: [cat, /data/ok]\n        intervalSeconds: 1\n        minHealthySeconds: 0\n        deadlineSeconds: 2\n";

/// Issue 34: a live change that breaks the guest (its data disk removed) is
/// judged unhealthy and reverted: the disk is put back, once, counted; the
/// spec that failed is not applied again at a resync; the history says
/// each step; a new spec ends the revert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_judged_unhealthy_is_reverted_until_the_spec_changes() {
    use crate::vm::health::Answer;
    use crate::vm::history::Judgement;
    use status::HealthState;
    let fake = Fake::new(caps());
    fake.answer_probes_when(
        "svc",
        lacks_lun_1,
        Answer::fail("cat: can't open '/data/ok'"),
    );
    let metrics = metrics::Metrics::new();
    let seen = Arc::clone(&metrics);
    let mut w = start(&fake, &[("svc", spec("svc", &[0, 1], QUICK_HEALTH))], |o| {
        o.metrics = Some(seen);
    });
    assert!(matches!(
        w.next_for("svc").await.outcome,
        Outcome::Applied(_)
    ));
    status_until(&w, "svc", "healthy", |v| {
        v.health
            .as_ref()
            .is_some_and(|h| h.health == HealthState::Healthy)
    });

    save(w.specs.path(), "svc", &spec("svc", &[0], QUICK_HEALTH));
    assert_eq!(w.next_for("svc").await.outcome, Outcome::Applied(1));
    // Judged unhealthy at its deadline, then reverted by the next reconcile
    // (the verdict's, or an event's that came first): the disk is back.
    let back = loop {
        let r = w.next_for("svc").await;
        if r.outcome != Outcome::InSync {
            break r;
        }
    };
    assert_eq!(back.outcome, Outcome::Applied(1));
    assert!(!lacks_lun_1(&fake.get("svc").expect("svc").config));
    status_until(&w, "svc", "reverted and healthy", |v| {
        v.revert.as_ref().is_some_and(|r| r.state == "reverted")
            && v.health
                .as_ref()
                .is_some_and(|h| h.health == HealthState::Healthy)
    });
    let r = w.status().vms["svc"].revert.clone().expect("revert");
    assert_eq!(
        (r.probe.as_str(), r.answer.as_str()),
        ("exec cat /data/ok", "cat: can't open '/data/ok'")
    );
    let text = metrics.encode();
    assert!(
        text.contains("uvmctl_reverts_total{vm=\"svc\"} 1"),
        "{text}"
    );

    // A resync does not apply the spec that failed again.
    w.signals.send(Signal::Reconcile).expect("running");
    let again = loop {
        let r = w.next_for("svc").await;
        if r.trigger == Trigger::Resync {
            break r;
        }
    };
    assert_eq!(again.outcome, Outcome::InSync);
    assert!(!lacks_lun_1(&fake.get("svc").expect("svc").config));

    // Its history: healthy, unhealthy (with why), and the revert, healthy.
    let name = VmName::new("svc").expect("name");
    let history = fake.history(&name).await.expect("history");
    let said: Vec<(Judgement, bool)> = history
        .entries()
        .iter()
        .map(|e| (e.health, e.reverted_from.is_some()))
        .collect();
    assert_eq!(
        said,
        [
            (Judgement::Healthy, false),
            (Judgement::Unhealthy, false),
            (Judgement::Healthy, true)
        ]
    );
    assert_eq!(
        history.entries()[1].probe.as_deref(),
        Some("exec cat /data/ok")
    );
    assert_eq!(history.entries()[2].config, history.entries()[0].config);

    // A new spec ends the revert and is followed.
    save(
        w.specs.path(),
        "svc",
        &spec("svc", &[0, 1, 2], QUICK_HEALTH),
    );
    let next = loop {
        let r = w.next_for("svc").await;
        if r.outcome != Outcome::InSync {
            break r;
        }
    };
    assert_eq!(next.outcome, Outcome::Applied(1));
    assert_eq!(w.status().vms["svc"].revert, None);
    assert_eq!(
        metrics
            .encode()
            .matches("uvmctl_reverts_total{vm=\"svc\"} 1")
            .count(),
        1
    );
    w.stop().await;
}

/// Issue 34: a revert the ceiling forbids (a pmem device added live; its
/// removal needs a restart, above `live`) is held and reported, and
/// nothing is forced. `--no-revert` only reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_the_ceiling_forbids_is_held_and_reported() {
    use crate::vm::health::Answer;
    let pmem = |devices: &str| {
        format!(
            "  vpmem:\n    maximumDevices: 2\n    maximumSizeBytes: 1073741824\n{devices}{QUICK_HEALTH}"
        )
    };
    let with_device = pmem("    devices:\n      - {id: 0, path: /d/p.vhd}\n");
    for revert in [true, false] {
        let fake = Fake::new(caps());
        fake.answer_probes_when("pm", has_pmem, Answer::fail("ENOSPC"));
        let mut w = start(&fake, &[("pm", spec("pm", &[], &pmem("")))], |o| {
            o.revert = revert;
        });
        assert!(matches!(
            w.next_for("pm").await.outcome,
            Outcome::Applied(_)
        ));
        status_until(&w, "pm", "healthy", |v| {
            v.health
                .as_ref()
                .is_some_and(|h| h.health == status::HealthState::Healthy)
        });
        save(w.specs.path(), "pm", &spec("pm", &[], &with_device));
        assert_eq!(w.next_for("pm").await.outcome, Outcome::Applied(1));
        if revert {
            let held = loop {
                let r = w.next_for("pm").await;
                if r.outcome != Outcome::InSync {
                    break r;
                }
            };
            assert!(matches!(held.outcome, Outcome::Held(_)), "{held:?}");
            status_until(&w, "pm", "revert held", |v| {
                v.revert.as_ref().is_some_and(|r| r.state == "held")
            });
            let r = w.status().vms["pm"].revert.clone().expect("revert");
            assert!(
                r.why.iter().any(|l| l.contains("max-disruption")),
                "says why: {r:?}"
            );
            assert!(!w.status().vms["pm"].held.is_empty());
        } else {
            status_until(&w, "pm", "reported, not reverted", |v| {
                v.revert
                    .as_ref()
                    .is_some_and(|r| r.state == "not reverted" && r.why[0].contains("--no-revert"))
            });
            let name = VmName::new("pm").expect("name");
            let deadline = std::time::Instant::now() + WAIT;
            while fake
                .history(&name)
                .await
                .expect("history")
                .newest()
                .map(|e| e.health)
                != Some(crate::vm::history::Judgement::Unhealthy)
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the verdict is written"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // A resync tries again, and is held again (or, not reverting,
        // finds the VM as its spec says).
        w.signals.send(Signal::Reconcile).expect("running");
        let again = loop {
            let r = w.next_for("pm").await;
            if r.trigger == Trigger::Resync {
                break r;
            }
        };
        if revert {
            assert!(matches!(again.outcome, Outcome::Held(_)), "{again:?}");
        } else {
            assert_eq!(again.outcome, Outcome::InSync);
        }
        // Nothing forced: the device stays, the VM was never stopped.
        assert!(has_pmem(&fake.get("pm").expect("pm").config));
        assert!(
            !fake.log().iter().any(|l| l.starts_with("pm stop")),
            "{:?}",
            fake.log()
        );
        w.stop().await;
    }
}

/// Issue 35: outside its maintenance window, a restart-class change is held
/// with when the window opens, and applied once it opens, unattended; a
/// live change goes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_waits_for_its_window_and_a_live_change_does_not() {
    use chrono::Timelike;
    let fake = Fake::new(caps());
    let metrics = metrics::Metrics::new();
    let seen = Arc::clone(&metrics);
    let mut w = start(&fake, &[("mw", spec("mw", &[], ""))], |o| {
        o.max_disruption = Disruption::Restart;
        o.metrics = Some(seen);
    });
    assert!(matches!(
        w.next_for("mw").await.outcome,
        Outcome::Applied(_)
    ));
    // A window that opens 6 s from now (UTC, to the second), for an hour.
    let opens = chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now())
        + chrono::Duration::seconds(6);
    let policy = format!(
        "apiVersion: uvmctl.dev/v1alpha1\nkind: RolloutPolicy\nspec:\n  windows:\n    - name: soon\n      schedule: '{} {} {} * * *'\n      duration: 1h\n",
        opens.second(),
        opens.minute(),
        opens.hour()
    );
    std::fs::write(
        w.specs.path().join(crate::spec::policy::POLICY_FILE),
        policy,
    )
    .expect("policy");
    // A live change goes at once, window or not.
    save(w.specs.path(), "mw", &spec("mw", &[1], ""));
    let live = loop {
        let r = w.next_for("mw").await;
        if r.outcome != Outcome::InSync {
            break r;
        }
    };
    assert_eq!(live.outcome, Outcome::Applied(1));
    // A share needs a restart: held, saying when the window opens.
    let share = "  plan9Shares:\n    - {name: data, hostPath: /srv/data}\n";
    save(w.specs.path(), "mw", &spec("mw", &[1], share));
    let held = loop {
        let r = w.next_for("mw").await;
        if r.outcome != Outcome::InSync {
            break r;
        }
    };
    let Outcome::Held(lines) = &held.outcome else {
        panic!("held: {held:?}");
    };
    let at = opens.with_nanosecond(0).expect("second");
    let when = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert!(
        lines
            .last()
            .is_some_and(|l| l.ends_with(&format!("outside window, next opens at {when}"))),
        "{lines:?}"
    );
    assert!(fake.get("mw").expect("mw").config.plan9_shares.is_empty());
    let page = metrics.encode();
    assert!(
        page.contains("uvmctl_window_open{window=\"soon\"} 0"),
        "{page}"
    );
    assert!(page.contains("uvmctl_held_changes{vm=\"mw\"} 1"), "{page}");
    // Applied when it opens, by the watcher's own retry.
    let applied = loop {
        let r = w.next_for("mw").await;
        if r.outcome != Outcome::InSync && !matches!(r.outcome, Outcome::Held(_)) {
            break r;
        }
    };
    assert!(
        chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now()) >= at,
        "not before the window opened"
    );
    assert!(
        matches!(applied.outcome, Outcome::Applied(_)),
        "{applied:?}"
    );
    assert_eq!(applied.trigger, Trigger::Retry);
    assert_eq!(fake.get("mw").expect("mw").config.plan9_shares.len(), 1);
    assert!(w.status().vms["mw"].held.is_empty());
    let page = metrics.encode();
    assert!(
        page.contains("uvmctl_window_open{window=\"soon\"} 1"),
        "{page}"
    );
    w.stop().await;
}

/// Issue 35: a host of a wave says, in its status and metrics, since when
/// the revision in force is settled and healthy; a held change takes that
/// away until it is resolved, and the gate's last answer is shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_of_a_wave_says_since_when_its_revision_is_settled_and_healthy() {
    let fake = Fake::new(caps());
    let cache = tempfile::tempdir().expect("tempdir");
    let sha = "a".repeat(40);
    let revision = crate::source::Revision {
        reference: "main".into(),
        sha: sha.clone(),
    };
    let source = crate::source::SourceStatus {
        url: "file:///r".into(),
        reference: "main".into(),
        path: ".".into(),
        applied: Some(revision.clone()),
        applied_at: Some(100),
        gate: Some(crate::source::GateStatus {
            wave: 2,
            waits_on: 1,
            revision: crate::source::Revision {
                reference: "main".into(),
                sha: "b".repeat(40),
            },
            open: false,
            query: "q".into(),
            answer: "no sample".into(),
            checked_at: 1,
        }),
        ..Default::default()
    };
    std::fs::write(
        cache.path().join("source.json"),
        serde_json::to_vec(&source).expect("json"),
    )
    .expect("source.json");
    let metrics = metrics::Metrics::new();
    let mut w = start(&fake, &[("a", spec("a", &[], ""))], |o| {
        o.wave = Some(2);
        o.source = Some(cache.path().to_path_buf());
        o.metrics = Some(metrics.clone());
    });
    w.next_for("a").await;
    let healthy =
        format!(r#"uvmctl_rollout_healthy_since_timestamp_seconds{{wave="2",revision="{sha}"}}"#);
    let r = w.status().rollout.expect("a wave's status");
    assert_eq!((r.wave, r.revision.as_deref()), (2, Some(sha.as_str())));
    assert_eq!(r.in_force_since, Some(100));
    assert!(r.healthy_since.is_some() && r.unsettled.is_none(), "{r:?}");
    let text = metrics.encode();
    assert!(text.contains(&healthy), "{text}");
    assert!(
        text.contains(r#"uvmctl_rollout_wave{wave="2"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            r#"uvmctl_rollout_in_force_timestamp_seconds{{wave="2",revision="{sha}"}} 100"#
        )),
        "{text}"
    );
    assert!(
        text.contains(r#"uvmctl_rollout_gate_open{wave="2",waits_on="1"} 0"#),
        "{text}"
    );

    // A held change: not settled, and the series goes.
    let share = "  plan9Shares:\n    - {name: s, hostPath: /srv/s}\n";
    save(w.specs.path(), "a", &spec("a", &[], share));
    assert!(matches!(w.next_for("a").await.outcome, Outcome::Held(_)));
    let r = w.status().rollout.expect("a wave's status");
    assert_eq!(r.healthy_since, None);
    assert_eq!(
        r.unsettled.as_deref(),
        Some("1 VM(s) not settled; first: a held")
    );
    assert!(!metrics.encode().contains(&healthy));

    // Back as it was: settled again, from now.
    save(w.specs.path(), "a", &spec("a", &[], ""));
    assert_eq!(w.next_for("a").await.outcome, Outcome::InSync);
    let r = w.status().rollout.expect("a wave's status");
    assert!(r.healthy_since.is_some() && r.unsettled.is_none(), "{r:?}");
    assert!(metrics.encode().contains(&healthy));
    w.stop().await;
}

/// Issue 35: a periodic resync (here far shorter than any soak) reconciles
/// every VM again without restarting the soak; a change it makes does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_that_changes_nothing_keeps_the_soak_going() {
    let fake = Fake::new(caps());
    let cache = tempfile::tempdir().expect("tempdir");
    let source = crate::source::SourceStatus {
        applied: Some(crate::source::Revision {
            reference: "main".into(),
            sha: "c".repeat(40),
        }),
        ..Default::default()
    };
    std::fs::write(
        cache.path().join("source.json"),
        serde_json::to_vec(&source).expect("json"),
    )
    .expect("source.json");
    let files: Vec<(&str, String)> = ["a", "b", "c"]
        .into_iter()
        .map(|n| (n, spec(n, &[], "")))
        .collect();
    let mut w = start(&fake, &files, |o| {
        o.wave = Some(1);
        o.source = Some(cache.path().to_path_buf());
        o.resync = Duration::from_millis(300);
    });
    for vm in ["a", "b", "c"] {
        w.next_for(vm).await;
    }
    let state = w.state.path().to_path_buf();
    let since = move || {
        status::read(&state)
            .and_then(|(s, _)| s.rollout)
            .and_then(|r| r.healthy_since)
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while since().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = since();
    // Several resyncs, across a whole second or two.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let resyncs = w
        .quiet_for(Duration::from_millis(1))
        .await
        .into_iter()
        .filter(|r| r.trigger == Trigger::Resync)
        .count();
    assert!(resyncs >= 6, "resyncs ran: {resyncs}");
    assert_eq!(since(), first, "the soak goes on");

    // Drift a resync corrects is a change: the soak starts again.
    let mut b = fake.get("b").expect("b");
    b.config.memory.size_mb = 512;
    fake.insert("b", b);
    let deadline = tokio::time::Instant::now() + WAIT;
    while since() == first {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the soak started again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(since() > first || since().is_none());
    w.stop().await;
}
