//! `uvmctl watch` against real QEMU and the test guest: edits, checkouts,
//! drift, crashes, broken specs, held changes, manual applies, pruning and
//! restarts, each checked in the watcher's JSON log and, where a device is
//! involved, inside the guest.

use crate::host::{Host, assert_ok, has_block, qmp_by_hand, text};
use serde_json::Value;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the watcher's own steps may take (a reconcile under TCG on a
/// loaded CI machine, a boot excepted).
const STEP: Duration = Duration::from_secs(60);
/// `--debounce` of every watcher here.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// What the issue asks: a change is applied within a second after the debounce.
const PROMPT: Duration = Duration::from_millis(1000);

/// A running `uvmctl watch` with its JSON log in a file.
pub(crate) struct Watcher {
    child: Child,
    log: std::path::PathBuf,
}

impl Host {
    pub(crate) fn watch(&self, log_name: &str, extra: &[&str]) -> Watcher {
        let specs = self.path("specs");
        self.watch_from(log_name, &[specs.to_str().expect("utf-8")], extra)
    }

    /// A watcher of `source`: a spec directory, or `--git URL ...`.
    pub(crate) fn watch_from(&self, log_name: &str, source: &[&str], extra: &[&str]) -> Watcher {
        let log = self.path(log_name);
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uvmctl"));
        cmd.arg("watch")
            .args(source)
            .arg("--state-dir")
            .arg(self.path("state"))
            .arg("--allow-root")
            .arg(self.path("img"))
            .arg("--allow-root")
            .arg(&self.guest)
            .args(["--accel", "tcg", "--log-format", "json", "--resync", "1h"])
            .args(["--debounce", "100ms"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        let w = Watcher {
            child: cmd.spawn().expect("uvmctl watch starts"),
            log,
        };
        w.wait_for("its first full reconcile", STEP * 3, |l| {
            message(l) == "first full reconcile done"
        });
        w
    }
}

pub(crate) fn message(l: &Value) -> &str {
    l["fields"]["message"].as_str().unwrap_or_default()
}

/// The VM a log line is about: its span's, or its own field.
pub(crate) fn vm_of(l: &Value) -> &str {
    l["span"]["vm"]
        .as_str()
        .or_else(|| l["fields"]["vm"].as_str())
        .unwrap_or_default()
}

pub(crate) fn is_reconcile(l: &Value, vm: &str) -> bool {
    message(l) == "reconcile" && vm_of(l) == vm
}

pub(crate) fn result(l: &Value) -> &str {
    l["fields"]["result"].as_str().unwrap_or_default()
}

pub(crate) fn trigger(l: &Value) -> &str {
    l["span"]["trigger"].as_str().unwrap_or_default()
}

impl Watcher {
    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub(crate) fn dump(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a log line after the first `skip` lines matching `pred`.
    pub(crate) fn wait_after(
        &self,
        skip: usize,
        what: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.lines().into_iter().skip(skip).find(|l| pred(l)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no log line for {what} within {within:?}; log:\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn wait_for(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_after(0, what, within, pred)
    }

    /// Waits for web's reconcile after `mark`: the one change of a save at
    /// `saved`, applied within a second after the debounce.
    fn applied_promptly(&self, mark: usize, saved: Instant, what: &str) {
        let l = self.wait_after(mark, what, STEP, |l| is_reconcile(l, "web"));
        let took = saved.elapsed();
        assert_eq!(
            (trigger(&l), result(&l)),
            ("spec", "applied 1 change(s)"),
            "{l}"
        );
        assert!(
            took < DEBOUNCE + PROMPT,
            "{what}: applied {took:?} after the save"
        );
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn mark(&self) -> usize {
        self.lines().len()
    }

    /// SIGTERM, then the exit status.
    pub(crate) fn term(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .is_ok_and(|s| s.success())
        );
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "watcher did not stop; log:\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A read-only Plan9 share `data` (a directory under the allowed root
/// holding `hello.txt`: "hi"), as `spec:` lines: a change that needs a
/// restart on QEMU 7.2.
fn readonly_share(h: &Host) -> String {
    let dir = h.path("img/share");
    std::fs::create_dir_all(&dir).expect("share dir");
    std::fs::write(dir.join("hello.txt"), "hi\n").expect("share file");
    format!(
        "  plan9Shares:\n    - {{name: data, hostPath: {}, readOnly: true}}\n",
        dir.display()
    )
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn disk(lun: u32, img: &std::path::Path) -> String {
    format!(
        "        - {{lun: {lun}, path: {}, type: passthrough}}\n",
        img.display()
    )
}

#[test]
fn watch_applies_saves_restores_drift_holds_what_needs_a_restart_and_adopts_after_a_restart() {
    let h = Host::new();
    let img1 = h.raw_image("one.img", 16);
    let img2 = h.raw_image("two.img", 24);
    let img3 = h.raw_image("three.img", 40);
    let ctl = "  scsiControllers:\n    - id: 0\n";
    let with = |disks: &[String], more: &str| {
        let mut extra = ctl.to_string();
        if !disks.is_empty() {
            extra.push_str("      disks:\n");
            extra.push_str(&disks.concat());
        }
        extra.push_str(more);
        h.spec("web", &extra)
    };
    let spec_path = h.path("specs/web.yaml");
    h.write_spec("web", &with(&[], ""));
    let w = h.watch("watch.log", &[]);
    let mut agent = h.agent("web");
    let pid = h.pid("web").expect("launched");

    // An editor's atomic save (write a temporary file, rename it over).
    let mark = w.mark();
    let tmp = h.path("specs/.web.yaml.swp");
    std::fs::write(&tmp, with(&[disk(1, &img1)], "")).expect("write");
    let saved = Instant::now();
    std::fs::rename(&tmp, &spec_path).expect("rename");
    w.applied_promptly(mark, saved, "the disk added by a rename");
    agent.wait_for("blocks", "the 16 MiB disk at LUN 1", |b| {
        has_block(b, 16 << 20, 0, 1)
    });

    // An in-place save: truncate, then write.
    let mark = w.mark();
    let saved = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&spec_path)
        .expect("open");
    f.write_all(with(&[disk(1, &img1), disk(2, &img2)], "").as_bytes())
        .expect("write");
    drop(f);
    w.applied_promptly(mark, saved, "the disk added in place");
    agent.wait_for("blocks", "the 24 MiB disk at LUN 2", |b| {
        has_block(b, 24 << 20, 0, 2)
    });

    // A disk removed by hand is back at once: QEMU's event, not the resync (1h).
    let mark = w.mark();
    qmp_by_hand(
        &h.path("state/web/qmp.sock"),
        "device_del",
        serde_json::json!({"id": "disk-0-1"}),
        Some("DEVICE_DELETED"),
    );
    let deleted = Instant::now();
    let l = w.wait_after(mark, "the disk put back", STEP, |l| is_reconcile(l, "web"));
    let took = deleted.elapsed();
    assert_eq!(
        (trigger(&l), result(&l)),
        ("event DEVICE_DELETED", "applied 1 change(s)"),
        "{l}"
    );
    assert!(took < PROMPT, "put back {took:?} after DEVICE_DELETED");
    agent.wait_for("blocks", "the disk at LUN 1 back", |b| {
        has_block(b, 16 << 20, 0, 1)
    });

    // Invalid YAML: the VM is left as it is, the log says where.
    let mark = w.mark();
    std::fs::write(&spec_path, format!("{}  memory: [\n", with(&[], ""))).expect("write");
    let l = w.wait_after(mark, "the spec error", STEP, |l| {
        message(l).contains("spec fails to load")
    });
    let shown = format!("{}:", spec_path.display());
    assert!(message(&l).contains(&shown), "names path:line:col: {l}");
    let at = &message(&l)[message(&l).find(&shown).unwrap_or(0) + shown.len()..];
    let pos: Vec<&str> = at.splitn(3, ':').take(2).collect();
    assert!(
        pos.len() == 2 && pos.iter().all(|p| p.parse::<u32>().is_ok()),
        "line and column after the path: {l}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !w.lines().iter().skip(mark).any(|l| is_reconcile(l, "web")),
        "a broken spec reconciles nothing: {}",
        w.dump()
    );
    assert_eq!(h.pid("web"), Some(pid));
    assert!(
        agent.cmd("blocks").iter().any(|b| b.contains(":2")),
        "disks kept"
    );
    let st = h.uvmctl(&["status"]);
    assert!(
        text(&st).contains("spec error (kept at its last good spec)"),
        "{}",
        text(&st)
    );
    // Fixed, with LUN 2 gone: the watcher resumes.
    let mark = w.mark();
    std::fs::write(&spec_path, with(&[disk(1, &img1)], "")).expect("write");
    let l = w.wait_after(mark, "the fixed spec applied", STEP, |l| {
        is_reconcile(l, "web")
    });
    assert_eq!(result(&l), "applied 1 change(s)", "{l}");
    agent.wait_for("blocks", "LUN 2 gone", |b| !has_block(b, 24 << 20, 0, 2));

    // A change that needs a restart is held under the default ceiling...
    let share = readonly_share(&h);
    let mark = w.mark();
    std::fs::write(&spec_path, with(&[disk(1, &img1)], &share)).expect("write");
    let l = w.wait_after(mark, "the held change", STEP, |l| is_reconcile(l, "web"));
    assert_eq!(result(&l), "held 1 change(s)", "{l}");
    let st = h.uvmctl(&["status"]);
    assert!(
        text(&st).contains("held: add plan9Share data: restart"),
        "{}",
        text(&st)
    );
    assert_eq!(h.pid("web"), Some(pid), "nothing done");
    // ...until a person applies that VM, which neither fails nor meets a
    // reconcile half-way.
    let specs = h.path("specs");
    let specs = specs.to_str().expect("utf-8");
    let out = h.uvmctl(&["apply", specs, "--only", "web", "--yes", "--color", "never"]);
    assert_ok(&out);
    assert!(text(&out).contains("+ plan9Share data"), "{}", text(&out));
    let mut agent = h.agent("web");
    assert_eq!(agent.cmd("mount9p data /mnt/data"), Vec::<String>::new());
    assert_eq!(agent.cmd("cat /mnt/data/hello.txt"), ["hi"]);
    let deadline = Instant::now() + STEP;
    while text(&h.uvmctl(&["status"])).contains("held:") {
        assert!(Instant::now() < deadline, "still held: {}", w.dump());
        std::thread::sleep(Duration::from_millis(200));
    }

    // A manual apply racing the watcher for the same change: exactly one of
    // them adds the disk; neither fails.
    let mark = w.mark();
    std::fs::write(&spec_path, with(&[disk(1, &img1), disk(3, &img3)], &share)).expect("write");
    let out = h.uvmctl(&["apply", specs, "--only", "web", "--yes", "--color", "never"]);
    assert_ok(&out);
    let by_apply = text(&out).contains("+ scsiDisk 0:3");
    let l = w.wait_after(
        mark,
        "the watcher's reconcile of the same edit",
        STEP,
        |l| is_reconcile(l, "web"),
    );
    let by_watcher = result(&l) == "applied 1 change(s)";
    assert!(
        by_apply != by_watcher,
        "exactly one adds the disk: apply {by_apply}, watcher {l}\n{}",
        text(&out)
    );
    agent.wait_for("blocks", "the 40 MiB disk at LUN 3", |b| {
        has_block(b, 40 << 20, 0, 3)
    });
    assert!(text(&h.plan(&[])).contains("No changes."));

    // SIGTERM: the watcher exits, the VM runs on, and a new watcher adopts
    // it without an operation.
    let pid = h.pid("web").expect("pid");
    let status = w.term();
    assert!(status.success(), "{status:?}");
    assert!(alive(pid), "the VM outlives its watcher");
    let w = h.watch("watch2.log", &[]);
    let adopted = w
        .lines()
        .into_iter()
        .filter(|l| is_reconcile(l, "web"))
        .map(|l| result(&l).to_string())
        .collect::<Vec<_>>();
    assert_eq!(adopted, ["in sync"], "{}", w.dump());
    assert_eq!(h.pid("web"), Some(pid));
    assert_eq!(agent.cmd("ping"), ["pong"]);
}

fn git(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=uvmctl",
            "-c",
            "user.email=uvmctl@localhost",
        ])
        .args(args)
        .output()
        .expect("git runs");
    assert_ok(&out);
}

#[test]
fn watch_converges_a_git_checkout_with_one_reconcile_per_vm_and_never_prunes_an_empty_directory() {
    let h = Host::new();
    let specs = h.path("specs");
    let vms = ["alpha", "beta", "gamma"];
    git(&specs, &["init", "-q", "-b", "main"]);
    for vm in vms {
        h.write_spec(vm, &h.spec(vm, "  scsiControllers:\n    - id: 0\n"));
    }
    git(&specs, &["add", "."]);
    git(&specs, &["commit", "-q", "-m", "three VMs"]);
    git(&specs, &["checkout", "-q", "-b", "disks"]);
    for (i, vm) in vms.iter().enumerate() {
        let img = h.raw_image(&format!("{vm}.img"), 8 * (i as u64 + 1));
        let extra = format!(
            "  scsiControllers:\n    - id: 0\n      disks:\n{}",
            disk(1, &img)
        );
        h.write_spec(vm, &h.spec(vm, &extra));
    }
    git(&specs, &["commit", "-q", "-am", "a disk each"]);
    git(&specs, &["checkout", "-q", "main"]);

    let w = h.watch("watch.log", &["--prune"]);
    let mut agents: Vec<_> = vms.iter().map(|vm| h.agent(vm)).collect();
    let pids: Vec<i32> = vms.iter().map(|vm| h.pid(vm).expect("pid")).collect();

    let mark = w.mark();
    git(&specs, &["checkout", "-q", "disks"]);
    for vm in vms {
        w.wait_after(mark, &format!("{vm}'s reconcile"), STEP, |l| {
            is_reconcile(l, vm)
        });
    }
    std::thread::sleep(Duration::from_millis(1500));
    let after: Vec<Value> = w.lines().into_iter().skip(mark).collect();
    for vm in vms {
        let runs: Vec<(String, String)> = after
            .iter()
            .filter(|l| is_reconcile(l, vm))
            .map(|l| (trigger(l).to_string(), result(l).to_string()))
            .collect();
        assert_eq!(
            runs,
            [("spec".to_string(), "applied 1 change(s)".to_string())],
            "{vm}: exactly one reconcile\n{}",
            w.dump()
        );
    }
    for (i, a) in agents.iter_mut().enumerate() {
        let size = (8 * (i as u64 + 1)) << 20;
        a.wait_for("blocks", "its disk from the branch", |b| {
            has_block(b, size, 0, 1)
        });
    }

    // Every spec file gone, with --prune: nothing is removed.
    let mark = w.mark();
    for vm in vms {
        std::fs::remove_file(specs.join(format!("{vm}.yaml"))).expect("rm");
    }
    w.wait_after(mark, "the refusal to prune everything", STEP, |l| {
        message(l).contains("refusing to prune: it would remove all 3 VMs of this host")
    });
    std::thread::sleep(Duration::from_secs(2));
    for (vm, pid) in vms.iter().zip(&pids) {
        assert!(alive(*pid), "{vm} still runs");
        assert!(
            !w.lines().iter().skip(mark).any(|l| is_reconcile(l, vm)),
            "{vm} not touched: {}",
            w.dump()
        );
    }
    assert_eq!(h.status().as_array().map(Vec::len), Some(3));
    let status = w.term();
    assert!(status.success(), "{status:?}");
}

#[test]
fn watch_reports_a_killed_qemu_at_once_and_backs_off_a_guest_that_panics_at_every_boot() {
    let h = Host::new();
    let allow = "  policy:\n    allowRecreate: true\n";
    h.write_spec("heal", &h.spec("heal", allow));
    h.write_spec("keep", &h.spec("keep", ""));
    let panics = h
        .spec("panicky", allow)
        .replace("swiotlb=noforce", "swiotlb=noforce uvmctl.panic=1");
    h.write_spec("panicky", &panics);
    let started = Instant::now();
    let w = h.watch(
        "watch.log",
        &["--max-disruption", "recreate", "--backoff", "2s"],
    );
    h.agent("heal");

    // SIGKILL: reported within a second; rebuilt where the spec allows it.
    for vm in ["heal", "keep"] {
        let mark = w.mark();
        let pid = h.pid(vm).expect("pid");
        assert!(
            Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success())
        );
        let killed = Instant::now();
        w.wait_after(mark, &format!("{vm}'s end"), STEP, |l| {
            vm_of(l) == vm && message(l) == "its process ended"
        });
        let took = killed.elapsed();
        assert!(took < PROMPT, "{vm}: reported {took:?} after SIGKILL");
        let l = w.wait_after(mark, &format!("{vm}'s reconcile"), STEP, |l| {
            is_reconcile(l, vm)
        });
        assert_eq!(trigger(&l), "event exited", "{l}");
        if vm == "heal" {
            assert!(result(&l).starts_with("applied"), "{l}");
        } else {
            assert!(result(&l).starts_with("held"), "{l}");
        }
    }
    assert_eq!(h.agent("heal").cmd("ping"), ["pong"], "rebuilt and booted");
    assert_eq!(h.state_of("keep"), "terminated");
    let st = h.uvmctl(&["status"]);
    assert!(text(&st).contains("policy.allowRecreate"), "{}", text(&st));

    // The guest that panics at every boot: relaunched with growing delays
    // (2 s, 4 s, 8 s...), never in a tight loop: at most 6 launches in the
    // first 40 s. At least 3 come, but on a loaded two-core host a boot to
    // its panic can take half a minute, so they are waited for up to 2 min.
    let launched = || -> Vec<Value> {
        w.lines()
            .into_iter()
            .filter(|l| is_reconcile(l, "panicky") && result(l).starts_with("applied"))
            .collect()
    };
    let window = Duration::from_secs(40);
    std::thread::sleep(window.saturating_sub(started.elapsed()));
    let in_window = launched().len();
    assert!(
        in_window <= 6,
        "without backoff there would be 10 or more launches in {window:?}; got {in_window}:\n{}",
        w.dump()
    );
    let deadline = started + Duration::from_secs(120);
    while launched().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    let launches = launched();
    let waits: Vec<String> = w
        .lines()
        .into_iter()
        .filter(|l| vm_of(l) == "panicky" && message(l).contains("the next relaunch waits"))
        .map(|l| {
            message(&l)
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(
        launches.len() >= 3,
        "relaunched after each panic, with backoff: 3 launches within 2 min; got {}:\n{}",
        launches.len(),
        w.dump()
    );
    assert!(
        waits.starts_with(&["2s".to_string(), "4s".to_string()]),
        "{waits:?}"
    );
    let status = h.uvmctl(&["status", "--output", "json"]);
    let doc: Value = serde_json::from_slice(&status.stdout).expect("json");
    let row = doc["vms"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "panicky"))
        .cloned()
        .unwrap_or_default();
    assert!(row["watch"]["failures"].as_u64().unwrap_or(0) >= 2, "{row}");
}

/// Issue 18: a detect-only watcher sees a spec edit and a `device_del` by
/// hand, reports both as held and executes nothing; a plan saved before the
/// `device_del` is refused as stale.
#[test]
fn a_detect_only_watcher_and_a_saved_plan_see_a_device_del_and_change_nothing() {
    let h = Host::new();
    let img0 = h.raw_image("zero.img", 16);
    let img1 = h.raw_image("one.img", 24);
    let disk = |lun: u32, img: &std::path::Path| {
        format!(
            "        - {{lun: {lun}, path: {}, type: passthrough}}\n",
            img.display()
        )
    };
    let with = |disks: &str| {
        h.spec(
            "dw",
            &format!("  scsiControllers:\n    - id: 0\n      disks:\n{disks}"),
        )
    };
    h.write_spec("dw", &with(&disk(0, &img0)));
    assert_ok(&h.apply());
    let mut agent = h.agent("dw");
    agent.wait_for("blocks", "the first disk", |b| has_block(b, 16 << 20, 0, 0));

    // Reviewed: add a second disk.
    h.write_spec(
        "dw",
        &with(&format!("{}{}", disk(0, &img0), disk(1, &img1))),
    );
    let saved = h.path("dw.plan");
    assert_ok(&h.plan(&["--out", saved.to_str().expect("utf-8")]));

    let w = h.watch("watch.log", &["--detect-only"]);
    let l = w.wait_for("the first reconcile", STEP, |l| is_reconcile(l, "dw"));
    assert_eq!(result(&l), "held 1 change(s)", "{l}");

    // A disk removed by hand: seen, held, not put back.
    let mark = w.mark();
    qmp_by_hand(
        &h.path("state/dw/qmp.sock"),
        "device_del",
        serde_json::json!({"id": "disk-0-0"}),
        Some("DEVICE_DELETED"),
    );
    let l = w.wait_after(mark, "the device_del's reconcile", STEP, |l| {
        is_reconcile(l, "dw") && trigger(l).starts_with("event")
    });
    assert_eq!(result(&l), "held 2 change(s)", "{l}");

    // A spec edit: seen, held.
    let mark = w.mark();
    h.write_spec("dw", &with(&disk(0, &img0)));
    let l = w.wait_after(mark, "the edit's reconcile", STEP, |l| {
        is_reconcile(l, "dw") && trigger(l) == "spec"
    });
    assert_eq!(result(&l), "held 1 change(s)", "{l}");
    let st = h.uvmctl(&["status"]);
    assert!(text(&st).contains("detect-only"), "{}", text(&st));
    let blocks = agent.cmd("blocks");
    assert!(
        !has_block(&blocks, 16 << 20, 0, 0) && !has_block(&blocks, 24 << 20, 0, 1),
        "nothing executed: {blocks:?}"
    );
    drop(w);

    // The saved plan predates the device_del (and the edit): refused.
    let out = h.uvmctl(&["apply", saved.to_str().expect("utf-8"), "--yes"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(
        text(&out).contains("dw: the VM changed on the host"),
        "{}",
        text(&out)
    );
    let blocks = agent.cmd("blocks");
    assert!(
        !has_block(&blocks, 24 << 20, 0, 1),
        "nothing applied: {blocks:?}"
    );

    // Planned again on the running VM (through the observing socket) and
    // applied (through the main one): the same observation, so it applies.
    assert_ok(&h.plan(&["--out", saved.to_str().expect("utf-8")]));
    let out = h.uvmctl(&["apply", saved.to_str().expect("utf-8"), "--yes"]);
    assert_ok(&out);
    agent.wait_for("blocks", "the disk put back", |b| {
        has_block(b, 16 << 20, 0, 0)
    });
}

/// Issue 17: a watcher following a git repository on real QEMU: a signed
/// commit hot-adds a disk the guest sees; an unsigned one on top changes
/// nothing.
#[test]
fn a_signed_commit_hot_adds_a_disk_the_guest_sees() {
    let h = Host::new();
    let key = h.path("id");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ops", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen runs");
    assert!(made.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    let signers = h.path("allowed_signers");
    std::fs::write(&signers, format!("ops@example.com {public}")).expect("write");
    let repo = h.path("repo");
    std::fs::create_dir_all(repo.join("vms")).expect("mkdir");
    git(&repo, &["init", "-q", "-b", "main"]);
    let signing = format!("user.signingkey={}", key.display());
    let commit = |message: &str, signed: bool| {
        git(&repo, &["add", "-A"]);
        let mut args = vec![
            "-c",
            "gpg.format=ssh",
            "-c",
            signing.as_str(),
            "commit",
            "-q",
            "-m",
            message,
        ];
        if signed {
            args.push("-S");
        }
        git(&repo, &args);
    };
    let spec = |extra: &str| {
        h.spec(
            "gitvm",
            &format!("  scsiControllers:\n    - id: 0\n{extra}"),
        )
    };
    std::fs::write(repo.join("vms/gitvm.yaml"), spec("")).expect("write");
    commit("a VM", true);
    let url = format!("file://{}", repo.display());
    let signers_arg = signers.to_str().expect("utf-8");
    let w = h.watch_from(
        "watch.log",
        &[
            "--git",
            &url,
            "--git-path",
            "vms",
            "--allowed-signers",
            signers_arg,
        ],
        &[
            "--git-interval",
            "1s",
            "--git-cache",
            h.path("git").to_str().expect("utf-8"),
        ],
    );
    let mut agent = h.agent("gitvm");

    let img = h.raw_image("git-disk.img", 20);
    std::fs::write(
        repo.join("vms/gitvm.yaml"),
        spec(&format!("      disks:\n{}", disk(1, &img))),
    )
    .expect("write");
    commit("a disk", true);
    let mark = w.mark();
    w.wait_after(mark, "the signed revision in force", STEP, |l| {
        message(l).starts_with("revision in force: main@sha1:")
    });
    agent.wait_for("blocks", "the 20 MiB disk at LUN 1", |b| {
        has_block(b, 20 << 20, 0, 1)
    });

    // Unsigned on top: refused, the disk stays.
    std::fs::write(repo.join("vms/gitvm.yaml"), spec("")).expect("write");
    commit("unsigned removal", false);
    let mark = w.mark();
    w.wait_after(mark, "the unsigned revision refused", STEP, |l| {
        message(l).contains("not signed by an allowed signer")
    });
    assert!(
        has_block(&agent.cmd("blocks"), 20 << 20, 0, 1),
        "the disk stays"
    );
    let status = h.uvmctl(&["status"]);
    assert!(
        text(&status).contains("source error (the revision in force stays)"),
        "{}",
        text(&status)
    );
    w.term();
}

/// The watcher's metrics page, as text: its address is in its log.
fn scrape(w: &Watcher) -> String {
    use std::io::Read;
    let line = w.wait_for("the metrics address", STEP, |l| {
        message(l).starts_with("metrics at http://")
    });
    let url = message(&line).trim_start_matches("metrics at http://");
    let (addr, path) = url.split_once('/').expect("host/path");
    let mut s = std::net::TcpStream::connect(addr).expect("metrics answer");
    s.set_read_timeout(Some(STEP)).expect("timeout");
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("ask");
    let mut page = String::new();
    s.read_to_string(&mut page).expect("page");
    page
}

/// What `uvmctl status --output json` says the watcher did to `vm`.
fn watch_of(h: &Host, vm: &str) -> Value {
    h.status()
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == vm))
        .map(|r| r["watch"].clone())
        .unwrap_or_default()
}

/// Issue 34, on the real guest through a watcher: a command-line change
/// that panics the kernel (a recreate here: the boot is cold-only; allowed
/// by the ceiling and the spec's policy) is seen through pvpanic
/// at once and reverted, and the guest answers again on the old command
/// line; a live change that passes its probes is kept; a live disk removal
/// that fails an `exec` probe is reverted (the disk back, seen by the
/// guest). Status, history and metrics say each.
///
/// Every boot has the one disk at LUN 1, so the guest names it `sda` (the
/// agent's words have no `:` for a SCSI address); a disk added live takes
/// the next name, and LUN 1 put back the lowest free one, `sda` again.
#[test]
fn a_watcher_keeps_a_healthy_change_and_reverts_what_breaks_the_guest() {
    let h = Host::new();
    let imgs: Vec<std::path::PathBuf> = (0u32..3)
        .map(|lun| h.raw_image(&format!("rv{lun}.img"), 16 + u64::from(lun)))
        .collect();
    // The service needs the disk at LUN 1; the agent must answer.
    let health = "  health:\n    probes:\n      - kind: agent\n        intervalSeconds: 1\n        minHealthySeconds: 2\n        deadlineSeconds: 240\n      - kind: exec\n        command: [ls, /sys/block/sda]\n        intervalSeconds: 1\n        minHealthySeconds: 2\n        deadlineSeconds: 45\n";
    let with = |luns: &[u32], cmdline_extra: &str| {
        let disks: String = luns.iter().map(|l| disk(*l, &imgs[*l as usize])).collect();
        h.spec(
            "rv",
            &format!("  policy:\n    allowRecreate: true\n  scsiControllers:\n    - id: 0\n      disks:\n{disks}{health}"),
        )
        .replace("swiotlb=noforce", &format!("swiotlb=noforce{cmdline_extra}"))
    };
    h.write_spec("rv", &with(&[1], ""));
    let w = h.watch(
        "watch.log",
        &[
            "--max-disruption",
            "recreate",
            "--backoff",
            "1s",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let healthy_after = |mark: usize, what: &str| {
        w.wait_after(mark, what, STEP * 4, |l| {
            vm_of(l) == "rv" && message(l) == "healthy"
        })
    };
    let reverted_after = |mark: usize, what: &str| {
        w.wait_after(mark, what, STEP * 2, |l| {
            vm_of(l) == "rv" && message(l).starts_with("reverted")
        })
    };
    let unhealthy_after = |mark: usize, what: &str| {
        w.wait_after(mark, what, STEP * 4, |l| {
            vm_of(l) == "rv" && message(l) == "unhealthy"
        })
    };
    healthy_after(0, "the first launch judged healthy");

    // A command line that panics the kernel: a recreate, allowed; the
    // panic is seen at once through pvpanic, and reverted.
    let mark = w.mark();
    h.write_spec("rv", &with(&[1], " uvmctl.panic=1"));
    let panicked = unhealthy_after(mark, "the panic judged");
    assert_eq!(
        panicked["fields"]["probe"].as_str(),
        Some("panic"),
        "{panicked}"
    );
    // Each wait counts from the edit: a step may follow the one before
    // within milliseconds.
    reverted_after(mark, "the revert of the command line");
    healthy_after(mark, "the old command line judged healthy");
    // Without a notify probe, the guest gets no notify credential.
    let none = h.uvmctl(&["agent", "rv", "cat", "/run/uvmctl-notify-socket"]);
    assert!(!none.status.success(), "{}", text(&none));
    let cmdline = h.agent("rv").cmd("cat /proc/cmdline");
    assert!(
        !cmdline.concat().contains("uvmctl.panic"),
        "runs the old command line: {cmdline:?}"
    );
    let st = watch_of(&h, "rv");
    assert_eq!(st["revert"]["state"], "reverted", "{st}");
    assert_eq!(st["revert"]["probe"], "panic", "{st}");
    assert_eq!(st["health"]["health"], "healthy", "{st}");
    let page = scrape(&w);
    assert!(page.contains("uvmctl_reverts_total{vm=\"rv\"} 1"), "{page}");
    assert!(
        page.contains("uvmctl_vm_health{vm=\"rv\",health=\"healthy\"} 1"),
        "{page}"
    );

    // A healthy change is kept: a disk added live, judged, no revert.
    let mark = w.mark();
    h.write_spec("rv", &with(&[1, 2], ""));
    healthy_after(mark, "the disk added judged healthy");
    let blocks = h.agent("rv").cmd("blocks");
    assert!(has_block(&blocks, 18 << 20, 0, 2), "{blocks:?}");
    assert!(
        watch_of(&h, "rv")["revert"].is_null(),
        "{}",
        watch_of(&h, "rv")
    );

    // A live disk removal the service needs: unhealthy at the exec probe's
    // deadline, then reverted: the disk comes back.
    let mark = w.mark();
    let removed = Instant::now();
    h.write_spec("rv", &with(&[2], ""));
    let bad = unhealthy_after(mark, "the removal judged unhealthy");
    assert_eq!(
        bad["fields"]["probe"].as_str(),
        Some("exec ls /sys/block/sda"),
        "{bad}"
    );
    assert!(
        removed.elapsed() >= Duration::from_secs(40),
        "at its deadline"
    );
    let reverted = reverted_after(mark, "the revert of the removal");
    assert_eq!(reverted["fields"]["probe"], bad["fields"]["probe"]);
    healthy_after(mark, "the revert judged healthy");
    let blocks = h.agent("rv").cmd("blocks");
    assert!(
        has_block(&blocks, 17 << 20, 0, 1),
        "the disk is back: {blocks:?}"
    );
    let st = watch_of(&h, "rv");
    assert_eq!(st["revert"]["state"], "reverted", "{st}");
    assert_eq!(st["health"]["health"], "healthy", "{st}");
    assert!(scrape(&w).contains("uvmctl_reverts_total{vm=\"rv\"} 2"));

    // The history: each change, its verdict, and the reverts (the last
    // verdict is written by the reconcile that follows it).
    let want: Vec<(String, bool)> = [
        ("healthy", false),
        ("unhealthy", false),
        ("healthy", true),
        ("healthy", false),
        ("unhealthy", false),
        ("healthy", true),
    ]
    .iter()
    .map(|(h, r)| (h.to_string(), *r))
    .collect();
    let deadline = Instant::now() + STEP;
    let history = loop {
        let out = h.uvmctl(&["history", "rv", "--output", "json"]);
        assert_ok(&out);
        let history: Value = serde_json::from_slice(&out.stdout).expect("json");
        let said: Vec<(String, bool)> = history
            .as_array()
            .expect("list")
            .iter()
            .map(|e| {
                (
                    e["health"].as_str().unwrap_or_default().to_string(),
                    e["revertedFrom"].is_string(),
                )
            })
            .collect();
        if said == want {
            break history;
        }
        assert!(Instant::now() < deadline, "{said:?}: {history}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(history[4]["probe"], "exec ls /sys/block/sda", "{history}");
    let table = text(&h.uvmctl(&["history", "rv"]));
    assert!(table.contains("probe panic: the guest panicked"), "{table}");
    assert!(table.contains("revert of "), "{table}");
    // The spec that failed is not applied again at a resync.
    let mark = w.mark();
    assert!(
        Command::new("kill")
            .args(["-HUP", &w.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    );
    let l = w.wait_after(mark, "the resync", STEP, |l| {
        is_reconcile(l, "rv") && trigger(l) == "resync"
    });
    assert_eq!(result(&l), "in sync", "{l}");
    let status = w.term();
    assert!(status.success(), "{status:?}");
}

/// Issue 35, on the real guest: a restart-class change outside the
/// maintenance window is held, saying when the window opens, while the
/// guest runs on untouched; the watcher applies it once the window opens,
/// and the guest is seen restarted with the change.
#[test]
fn a_restart_outside_its_window_waits_for_it_and_then_restarts_the_guest() {
    use chrono::Timelike;
    let h = Host::new();
    h.write_spec("mw", &h.spec("mw", ""));
    let w = h.watch("watch.log", &["--max-disruption", "restart"]);
    let boot_id = || h.agent("mw").cmd("cat /proc/sys/kernel/random/boot_id");
    let first = boot_id();
    // A window that opens 30 s from now (UTC, to the second), for an hour.
    let opens = chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now())
        + chrono::Duration::seconds(30);
    let opens = opens.with_nanosecond(0).expect("whole second");
    std::fs::write(
        h.path("specs").join("uvmctl-policy.yaml"),
        format!(
            "apiVersion: uvmctl.dev/v1alpha1\nkind: RolloutPolicy\nspec:\n  windows:\n    - name: soon\n      schedule: '{} {} {} * * *'\n      duration: 1h\n",
            opens.second(),
            opens.minute(),
            opens.hour()
        ),
    )
    .expect("policy");
    let share = readonly_share(&h);
    let mark = w.mark();
    h.write_spec("mw", &h.spec("mw", &share));
    let held = w.wait_after(mark, "the change held", STEP, |l| {
        is_reconcile(l, "mw") && result(l).starts_with("held")
    });
    assert!(
        chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now()) < opens,
        "held before the window opened: {held}"
    );
    let when = opens.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let st = text(&h.uvmctl(&["status"]));
    assert!(
        st.contains(&format!(
            "held: needs restart: outside window, next opens at {when}"
        )),
        "{st}"
    );
    let plan = h.uvmctl(&["plan", h.path("specs").to_str().expect("utf-8")]);
    assert!(
        text(&plan).contains(&format!(
            "mw: held: needs restart: outside window, next opens at {when}"
        )),
        "{}",
        text(&plan)
    );
    assert_eq!(boot_id(), first, "the guest runs on untouched");
    assert!(
        chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now()) < opens,
        "still before the window opened: the checks above saw it closed"
    );
    // The watcher's own retry applies it once the window opens.
    let applied = w.wait_after(mark, "the change applied in its window", STEP * 2, |l| {
        is_reconcile(l, "mw") && result(l).starts_with("applied")
    });
    assert_eq!(trigger(&applied), "retry", "{applied}");
    assert!(
        chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now()) >= opens,
        "not before the window opened"
    );
    let mut agent = h.agent("mw");
    let again = agent.cmd("cat /proc/sys/kernel/random/boot_id");
    assert_ne!(again, first, "the guest was restarted");
    assert_eq!(agent.cmd("mount9p data /mnt/data"), Vec::<String>::new());
    assert_eq!(agent.cmd("cat /mnt/data/hello.txt"), ["hi"]);
    drop(agent);
    let status = w.term();
    assert!(status.success(), "{status:?}");
}

/// A guest that panics while its vsock backend does not answer: QEMU stops
/// the device first and waits for the backend with no bound (vhost-user in
/// QEMU 7.2), its main loop blocked, so it never exits. The watcher that
/// follows the VM stops the backend after a grace; QEMU then ends, and the
/// end is reported. (A loaded full-suite run once saw a panicked QEMU hang
/// this way for minutes.)
#[test]
fn a_guest_that_panics_while_its_vsock_backend_hangs_still_ends() {
    use std::io::{BufRead, BufReader};
    let h = Host::new();
    h.write_spec("stuck", &h.spec("stuck", ""));
    let w = h.watch("watch.log", &["--backoff", "10m"]);
    h.agent("stuck");
    let backend = h.record_pid("stuck", "vsockPid").expect("a vsock backend");
    assert!(
        Command::new("kill")
            .args(["-STOP", &backend.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    );
    // The guest's panic, as its kernel would say it (pvpanic's port), by
    // hand: QEMU's main loop blocks on the way, so no reply is waited for.
    let s = std::os::unix::net::UnixStream::connect(h.path("state").join("stuck/qmp.sock"))
        .expect("qmp socket");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut line = String::new();
    r.read_line(&mut line).expect("greeting");
    let mut qmp = s;
    qmp.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .expect("write");
    line.clear();
    r.read_line(&mut line).expect("caps reply");
    qmp.write_all(
        b"{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"o 0x505 1\"}}\n",
    )
    .expect("write");
    let panicked = Instant::now();
    w.wait_for("the panic", STEP, |l| {
        vm_of(l) == "stuck" && l["fields"]["event"] == "GUEST_PANICKED"
    });
    w.wait_for("the backend stopped", STEP, |l| {
        vm_of(l) == "stuck" && message(l).contains("the backend is stopped")
    });
    w.wait_for("its end", STEP, |l| {
        vm_of(l) == "stuck" && message(l) == "its process ended"
    });
    let took = panicked.elapsed();
    assert!(
        took < Duration::from_secs(40),
        "ended {took:?} after the panic"
    );
    drop(qmp);
    // Gone, not left stopped (SIGKILL reaches a stopped process).
    let _ = Command::new("kill")
        .args(["-KILL", &backend.to_string()])
        .stderr(Stdio::null())
        .status();
}
