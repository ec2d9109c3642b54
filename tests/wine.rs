//! uvmctl.exe, built for x86_64-pc-windows-gnu, driven through Wine on
//! Linux (issue 33): Windows' loader, its `LoadLibraryExW` search rules
//! and the HCS C ABI, against the emulator built as a Windows DLL. Real
//! HCS has not run here; docs/hcs.md says what is verified where.
//!
//! `scripts/test-windows` builds both, prepares a Wine prefix (with the
//! stand-in `bcryptprimitives.dll` from `tests/windows/`) and runs these
//! with `--ignored`; a plain `cargo test` has no uvmctl.exe to drive.
//! It names them in `UVMCTL_WINDOWS_EXE`, `UVMCTL_WINDOWS_EMULATOR`,
//! `UVMCTL_WINE` and `WINEPREFIX`.
#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const HEAD: &str = "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\n";

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{name} is set by scripts/test-windows"))
}

/// The prefix's `C:` drive.
fn drive_c() -> PathBuf {
    env_path("WINEPREFIX").join("drive_c")
}

/// A Linux path as Wine shows it: on `C:` when inside the prefix's drive,
/// else on `Z:`.
fn win(p: &Path) -> String {
    match p.strip_prefix(drive_c()) {
        Ok(rest) => format!("C:\\{}", rest.display()).replace('/', "\\"),
        Err(_) => format!("Z:{}", p.display()).replace('/', "\\"),
    }
}

/// A directory for one test on the prefix's `C:` drive, whose every
/// directory from `C:\` down is root's and not writable by others
/// (wherever the checkout is: under `/tmp`, sticky and world-writable on
/// `Z:`, Windows' rules would refuse everything).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let base = drive_c().join("uvmctl-tests");
        let dir = base.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("specs")).expect("mkdir specs");
        std::fs::create_dir_all(dir.join("k")).expect("mkdir k");
        std::fs::create_dir_all(dir.join("service")).expect("mkdir service");
        for d in [&drive_c(), &base, &dir, &dir.join("k")] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        Scratch(dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    fn write_spec(&self, name: &str, memory_mb: u32, disks: &[&str]) {
        let k = win(&self.path("k")).replace('\\', "/");
        let disks: String = disks
            .iter()
            .enumerate()
            .map(|(lun, d)| {
                format!("        - lun: {lun}\n          path: {k}/{d}\n          type: vhdx\n")
            })
            .collect();
        let text = format!(
            "{HEAD}metadata:\n  name: {name}\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: {k}/vmlinuz\n  processors:\n    count: 1\n  memory:\n    sizeMB: {memory_mb}\n  scsiControllers:\n    - id: 0\n      disks:\n{disks}"
        );
        std::fs::write(self.path(&format!("specs/{name}.yaml")), text).expect("write spec");
    }

    /// uvmctl.exe with `args`, run from `cwd` (the scratch directory by
    /// default), the emulator's service state in `service/`.
    fn run_in(&self, exe: &Path, cwd: &Path, args: &[&str]) -> Output {
        Command::new(env_path("UVMCTL_WINE"))
            .arg(exe)
            .args(args)
            .current_dir(cwd)
            .env("WINEDEBUG", "-all")
            .env("UVMCTL_HCS_EMULATOR_DIR", win(&self.path("service")))
            .output()
            .expect("wine runs")
    }

    fn uvmctl(&self, args: &[&str]) -> Output {
        self.run_in(&env_path("UVMCTL_WINDOWS_EXE"), &self.0, args)
    }

    /// uvmctl.exe on the hcs virtstack through the emulator, named by path.
    fn hcs(&self, args: &[&str]) -> Output {
        let library = win(&env_path("UVMCTL_WINDOWS_EMULATOR"));
        let root = win(&self.path("k"));
        let state = win(&self.path("state"));
        let mut all = vec![
            "--virtstack",
            "hcs",
            "--hcs-library",
            &library,
            "--hcs-allow-root",
            &root,
            "--state-dir",
            &state,
        ];
        all.extend_from_slice(args);
        self.uvmctl(&all)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

/// The hcs CLI flow the Linux test runs, through uvmctl.exe: validate,
/// apply, status, wait, a live change and the requests its plan sends,
/// export, destroy; and one clear error without the library.
#[test]
#[ignore = "needs uvmctl.exe and Wine: scripts/test-windows runs it"]
fn the_hcs_flow_runs_through_windows_loader_against_the_emulator() {
    let t = Scratch::new("flow");
    t.write_spec("web", 64, &["boot.vhdx"]);
    assert_exit(&t.uvmctl(&["validate", "specs"]), 0);
    let out = t.hcs(&["apply", "specs", "--yes"]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("on virtstack hcs"),
        "{}",
        stdout(&out)
    );
    let vms = json(&t.hcs(&["status", "--output", "json"]))["vms"].clone();
    assert_eq!(vms[0]["name"], "web");
    assert_eq!(vms[0]["state"], "running");
    assert_exit(&t.hcs(&["plan", "specs", "--detailed-exitcode"]), 0);
    // Still running when the wait gives up (HcsWaitForComputeSystemExit).
    assert_exit(&t.hcs(&["wait", "web", "--timeout", "200ms"]), 2);

    // A disk and memory added live: the plan's requests, then the change.
    t.write_spec("web", 128, &["boot.vhdx", "data.vhdx"]);
    let calls = json(&t.hcs(&["plan", "specs", "--hcs-requests"]));
    let calls = calls.as_array().expect("a list");
    let paths: Vec<&str> = calls
        .iter()
        .map(|c| {
            c["configuration"]["ResourcePath"]
                .as_str()
                .unwrap_or_default()
        })
        .collect();
    assert!(
        paths.contains(&"VirtualMachine/Devices/Scsi/0/Attachments/1"),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"VirtualMachine/ComputeTopology/Memory/SizeInMB"),
        "{paths:?}"
    );
    assert!(calls.iter().all(|c| c["call"] == "HcsModifyComputeSystem"));
    assert_exit(&t.hcs(&["apply", "specs", "--yes"]), 0);
    assert_exit(&t.hcs(&["plan", "specs", "--detailed-exitcode"]), 0);
    let vms = json(&t.hcs(&["status", "--output", "json"]))["vms"].clone();
    assert_eq!(vms[0]["memoryMb"], 128);
    assert!(stdout(&t.hcs(&["export", "web"])).contains("data.vhdx"));
    // The emulator (the "service") holds the disk too.
    let held: String = std::fs::read_dir(t.path("service"))
        .expect("service state")
        .filter_map(Result::ok)
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(held.contains("data.vhdx"), "{held}");

    assert_exit(&t.hcs(&["destroy", "web"]), 0);
    assert_eq!(stdout(&t.hcs(&["status"])).lines().count(), 1, "no VMs");
    assert_exit(&t.hcs(&["destroy", "web"]), 1);

    // Without the library: one clear error, nothing made.
    let state = win(&t.path("state"));
    let out = t.uvmctl(&[
        "--virtstack",
        "hcs",
        "--hcs-library",
        r"Z:\nonexistent\computecore.dll",
        "--state-dir",
        &state,
        "apply",
        "specs",
        "--yes",
    ]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(r"cannot load the HCS library Z:\nonexistent\computecore.dll"),
        "{}",
        stderr(&out)
    );
    // What is unix's says so.
    let out = t.uvmctl(&["--virtstack", "qemu", "status"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("virtstack qemu is not available here"),
        "{}",
        stderr(&out)
    );
}

/// An allowed root others may change is refused before anything is made,
/// naming the directory, its owner and what is wrong. Wine shows a unix
/// directory's mode as its DACL: 0777 is `Everyone` with modify rights
/// (a DACL granting `Users` the same is refused in the unit tests, on a
/// descriptor built from SDDL, as Wine keeps no DACL a test sets).
#[test]
#[ignore = "needs uvmctl.exe and Wine: scripts/test-windows runs it"]
fn an_allowed_root_others_may_change_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let t = Scratch::new("root");
    t.write_spec("web", 64, &["boot.vhdx"]);
    std::fs::set_permissions(t.path("k"), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = t.hcs(&["apply", "specs", "--yes"]);
    assert_exit(&out, 1);
    let text = stderr(&out);
    let root = win(&t.path("k"));
    assert!(
        text.contains(&format!("allowed root {root}: {root}: owned by ")),
        "{text}"
    );
    assert!(
        text.contains("Everyone (S-1-1-0) may delete, rename or re-permit what is in it"),
        "{text}"
    );
    assert!(text.contains("non-administrator"), "{text}");
    assert!(
        !t.path("service").read_dir().expect("ls").any(|_| true),
        "nothing made"
    );
    std::fs::set_permissions(t.path("k"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_exit(&t.hcs(&["apply", "specs", "--yes"]), 0);
    assert_exit(&t.hcs(&["destroy", "web"]), 0);

    // Below the root too: HCS opens what a spec names by name, so a
    // directory on the way that others may change is refused by plan and
    // apply alike, naming it; nothing is made.
    let sub = t.path("k/sub");
    std::fs::create_dir(&sub).expect("mkdir sub");
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    t.write_spec("web", 64, &["sub/boot.vhdx"]);
    for args in [&["plan", "specs"][..], &["apply", "specs", "--yes"]] {
        let out = t.hcs(args);
        assert_exit(&out, 1);
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            text.contains(&format!("{}: owned by ", win(&sub))),
            "{text}"
        );
        assert!(text.contains("Everyone (S-1-1-0) may"), "{text}");
    }
    assert!(
        !t.path("service").read_dir().expect("ls").any(|_| true),
        "nothing made"
    );
}

/// uvmctl's own state is never a guest's, even under an allowed root.
#[test]
#[ignore = "needs uvmctl.exe and Wine: scripts/test-windows runs it"]
fn a_path_into_uvmctls_state_is_refused_even_under_an_allowed_root() {
    let t = Scratch::new("state");
    let state = win(&t.path("state"));
    std::fs::write(
        t.path("specs/web.yaml"),
        format!(
            "{HEAD}metadata:\n  name: web\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: {k}/vmlinuz\n  processors:\n    count: 1\n  memory:\n    sizeMB: 64\n  scsiControllers:\n    - id: 0\n      disks:\n        - lun: 0\n          path: {s}/hcs/web.vhdx\n          type: vhdx\n",
            k = win(&t.path("k")).replace('\\', "/"),
            s = state.replace('\\', "/"),
        ),
    )
    .expect("write spec");
    let library = win(&env_path("UVMCTL_WINDOWS_EMULATOR"));
    let whole = win(&t.0);
    let out = t.uvmctl(&[
        "--virtstack",
        "hcs",
        "--hcs-library",
        &library,
        "--hcs-allow-root",
        &whole,
        "--state-dir",
        &state,
        "apply",
        "specs",
        "--yes",
    ]);
    assert_exit(&out, 1);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("is or holds uvmctl's state directory"),
        "{text}"
    );
}

/// The default `computecore.dll` is looked up in the system directory
/// only: one planted beside the program or in the working directory is
/// never loaded (it would run as the administrator uvmctl runs as); the
/// same library in system32 is.
#[test]
#[ignore = "needs uvmctl.exe and Wine: scripts/test-windows runs it"]
fn a_computecore_dll_planted_beside_the_program_or_in_the_working_directory_is_not_loaded() {
    let t = Scratch::new("planted");
    let emulator = env_path("UVMCTL_WINDOWS_EMULATOR");
    // The program in a directory of its own, a computecore.dll beside it
    // and another in the directory it runs in.
    let bin = t.path("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    let exe = bin.join("uvmctl.exe");
    std::fs::copy(env_path("UVMCTL_WINDOWS_EXE"), &exe).expect("copy exe");
    std::fs::copy(&emulator, bin.join("computecore.dll")).expect("plant beside");
    std::fs::copy(&emulator, t.path("computecore.dll")).expect("plant in cwd");
    let state = win(&t.path("state"));
    let status = ["--virtstack", "hcs", "--state-dir", &state, "status"];
    let out = t.run_in(&exe, &t.0, &status);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("cannot load the HCS library computecore.dll"),
        "{}",
        stderr(&out)
    );
    // The premise: the planted file is a library the program would load,
    // by the same bare name, from the system directory.
    let system32 = env_path("WINEPREFIX").join("drive_c/windows/system32/computecore.dll");
    std::fs::copy(&emulator, &system32).expect("install in system32");
    let out = t.run_in(&exe, &t.0, &status);
    let _ = std::fs::remove_file(&system32);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("No VMs"), "{}", stdout(&out));
}

/// `sc.exe` of the test's Wine prefix.
fn sc(args: &[&str]) -> Output {
    Command::new(env_path("UVMCTL_WINE"))
        .arg("sc")
        .args(args)
        .env("WINEDEBUG", "-all")
        .output()
        .expect("wine sc runs")
}

/// Waits (bounded) until `sc query NAME` says `state`.
fn wait_for_state(name: &str, state: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = stdout(&sc(&["query", name]));
        if text.contains(state) || std::time::Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `watch --service NAME` under Wine's service control manager: started
/// by it, running (logging to STATE_DIR\watch.log, as a service has no
/// console), and stopped cleanly by it. (Wine's sc.exe has no `control`,
/// so paramchange is tested on the handler alone, in the unit tests.)
#[test]
#[ignore = "needs uvmctl.exe and Wine: scripts/test-windows runs it"]
fn watch_runs_as_a_service_and_stops_when_the_manager_says() {
    let t = Scratch::new("service");
    std::fs::write(
        t.path("specs/a.yaml"),
        format!("{HEAD}metadata:\n  name: a\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: /k/vmlinuz\n  processors:\n    count: 1\n  memory:\n    sizeMB: 64\n"),
    )
    .expect("write spec");
    // Wine ends its services with its last other process: the server is
    // kept up a minute past it (scripts/test-windows ends it).
    let server = env_path("UVMCTL_WINE").with_file_name("wineserver");
    let _ = Command::new(&server).arg("-p60").status();
    let name = format!("uvmctl-test-{}", std::process::id());
    let state = win(&t.path("state"));
    let bin_path = format!(
        "{} --virtstack sim --state-dir {state} watch {} --resync 1s --service {name}",
        win(&env_path("UVMCTL_WINDOWS_EXE")),
        win(&t.path("specs")),
    );
    assert_exit(&sc(&["create", &name, "binpath=", &bin_path]), 0);
    let started = sc(&["start", &name]);
    let running = wait_for_state(&name, "RUNNING");
    let sim = ["--virtstack", "sim", "--state-dir", &state];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let vms = loop {
        let status = t.uvmctl(&[&sim[..], &["status", "--output", "json"]].concat());
        let vms = serde_json::from_str::<serde_json::Value>(&stdout(&status))
            .map(|v| v["vms"].clone())
            .unwrap_or_default();
        if vms[0]["state"] == "running" || std::time::Instant::now() > deadline {
            break vms;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let stop = sc(&["stop", &name]);
    let stopped = wait_for_state(&name, "STOPPED");
    let _ = sc(&["delete", &name]);
    assert!(
        running.contains("RUNNING"),
        "{}\n{running}",
        stdout(&started)
    );
    assert_eq!(vms[0]["name"], "a", "{vms}");
    assert_eq!(vms[0]["state"], "running", "{vms}");
    assert!(stopped.contains("STOPPED"), "{}\n{stopped}", stdout(&stop));
    assert!(stopped.contains("WIN32_EXIT_CODE    : 0"), "{stopped}");
    let log = std::fs::read_to_string(t.path("state/watch.log")).expect("the service's log");
    assert!(log.contains("first full reconcile done"), "{log}");
    assert!(log.contains("INFO uvmctl::watch: stopped"), "{log}");
}
