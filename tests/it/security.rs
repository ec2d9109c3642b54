//! A VM reaches only what its spec was allowed to name (docs/security.md):
//! each test plays one attack from issue 19 on real QEMU, with the guest
//! doing its part, and shows it fails.

use crate::host::{Host, assert_ok, has_block, text};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The user nobody: a local user without any right to what root owns.
const NOBODY: u32 = 65534;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `/proc/PID/cmdline` of the VM's QEMU, arguments joined by spaces.
fn qemu_cmdline(h: &Host, vm: &str) -> String {
    let pid = h.pid(vm).expect("qemu pid");
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline"))
        .replace('\0', " ")
}

/// Whether the VM's QEMU has `file` open (as `/proc/PID/fd` names it).
fn qemu_holds(h: &Host, vm: &str, file: &Path) -> bool {
    let pid = h.pid(vm).expect("qemu pid");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|p| p == file)
}

/// One guest for the attacks a running VM meets: an initrd QEMU would
/// split, a writable Plan9 share guest root writes into, a disk swapped
/// while it is hot-added, a console listener a local user would redirect.
#[test]
fn qemu_holds_what_uvmctl_checked_and_guest_root_cannot_plant_setuid_files() {
    let h = Host::new();
    let img = h.path("img");
    // Outside every allowed root: what an attacker wants in the guest.
    let secret = h.path("secret");
    std::fs::write(&secret, vec![0x5a; 4096]).expect("secret");

    // 1. `img/mb/evil /initrd.img`: multiboot cuts -initrd at the space,
    // and `img/mb/evil` leads out of the root.
    let mb = img.join("mb");
    std::fs::create_dir_all(mb.join("evil ")).expect("mkdir");
    std::fs::copy(h.guest.join("initrd.img"), mb.join("evil /initrd.img")).expect("initrd");
    symlink(&secret, mb.join("evil")).expect("symlink");
    let initrd = mb.join("evil /initrd.img");

    // 2. A writable share for guest root to write into.
    let share = img.join("share");
    std::fs::create_dir(&share).expect("share");
    // Writable by QEMU's service user, as an operator gives a share to it.
    crate::host::share_with_qemu(&share, 0o770);
    // 3. A console listener in a directory only root can change.
    let consoles = img.join("consoles");
    std::fs::create_dir(&consoles).expect("consoles");
    chmod(&consoles, 0o755);
    let listener = consoles.join("vm.sock");

    let spec = |extra: &str| {
        h.spec(
            "vm",
            &format!(
                "  plan9Shares:\n    - {{name: s, hostPath: {}}}\n  serialConsoles:\n    - {{port: 1, listenerPath: {}}}\n  scsiControllers:\n    - id: 0\n{extra}",
                share.display(),
                listener.display()
            ),
        )
        .replace(
            &h.guest.join("initrd.img").display().to_string(),
            &format!("'{}'", initrd.display()),
        )
    };
    h.write_spec("vm", &spec(""));
    h.apply();
    // The guest booted from the initrd that was checked: its agent answers.
    let mut agent = h.agent("vm");
    let cmdline = qemu_cmdline(&h, "vm");
    assert!(
        !cmdline.contains(&img.display().to_string()) && !cmdline.contains("evil"),
        "a spec's host path reached QEMU: {cmdline}"
    );
    assert!(
        !qemu_holds(&h, "vm", &secret),
        "QEMU holds the file outside the root"
    );

    // Guest root makes a setuid-root busybox and a device node in the share.
    agent.cmd("mount9p s /mnt/s");
    let out = agent.cmd("privileged /mnt/s");
    assert_eq!(out, vec!["sb 4755"], "the guest sees its own modes");
    for e in std::fs::read_dir(&share).expect("share").flatten() {
        let m = e.metadata().expect("stat");
        assert_eq!(
            m.mode() & 0o7000,
            0,
            "{} is setuid/setgid/sticky on the host: {:o}",
            e.path().display(),
            m.mode()
        );
        assert!(
            m.file_type().is_file(),
            "{} is not a plain file on the host",
            e.path().display()
        );
        assert_eq!(
            m.mode() & 0o077,
            0,
            "{} readable by others",
            e.path().display()
        );
    }
    assert!(share.join("sb").is_file(), "the guest's file is there");

    // A local user cannot put a link to another socket where the console
    // listener goes: its directory is root's alone (and uvmctl refused
    // directories anyone could write, see below).
    let outside_sock = h.path("outside.sock");
    let _outside = std::os::unix::net::UnixListener::bind(&outside_sock).expect("bind");
    let planted = Command::new("ln")
        .args([
            "-s",
            outside_sock.to_str().expect("utf-8"),
            listener.to_str().expect("utf-8"),
        ])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("ln runs");
    assert!(
        !planted.status.success(),
        "nobody planted the listener link"
    );
    assert!(std::fs::symlink_metadata(&listener).is_err());

    // 4. A disk swapped for a link to an outside image while it is hot-added,
    // at every point between the check and QEMU holding it: QEMU holds what
    // was checked, or nothing. The disk is 8 MiB; the outside image 24 MiB.
    let disk = h.raw_image("d.img", 8);
    let real = h.raw_image("d.real", 8);
    let outside = h.path("outside.img");
    std::fs::File::create(&outside)
        .and_then(|f| f.set_len(24 << 20))
        .expect("outside image");
    let evil_link = img.join("d.link");
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, disk, real, outside, evil_link) = (
            stop.clone(),
            disk.clone(),
            real.clone(),
            outside.clone(),
            evil_link.clone(),
        );
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                // The link to the outside image, renamed over the disk...
                let _ = std::fs::remove_file(&evil_link);
                let _ = symlink(&outside, &evil_link);
                let _ = std::fs::rename(&evil_link, &disk);
                // ...and the real image back.
                let _ = std::fs::hard_link(&real, &evil_link);
                let _ = std::fs::rename(&evil_link, &disk);
                swaps += 1;
            }
            swaps
        })
    };
    let with_disk = format!(
        "      disks:\n        - {{lun: 1, path: {}, type: passthrough}}\n",
        disk.display()
    );
    h.write_spec("vm", &spec(&with_disk));
    let mut attempts = 0;
    let mut added = 0;
    while attempts < 20 && added < 3 {
        attempts += 1;
        let out = h.uvmctl(&[
            "apply",
            h.path("specs").to_str().expect("utf-8"),
            "--yes",
            "--color",
            "never",
        ]);
        if !out.status.success() {
            // Refused: the swap was seen (a link on the way, or the wrong file).
            continue;
        }
        added += 1;
        let blocks = agent.wait_for("blocks", "the hot-added disk", |b| {
            b.iter().any(|l| l.starts_with("sd"))
        });
        assert!(
            has_block(&blocks, 8 << 20, 0, 1) && !has_block(&blocks, 24 << 20, 0, 1),
            "the guest got the outside image: {blocks:?}"
        );
        assert!(
            !qemu_holds(&h, "vm", &outside),
            "QEMU holds the outside image"
        );
        // Take it out again for the next round.
        h.write_spec("vm", &spec(""));
        h.apply();
        agent.wait_for("blocks", "the disk gone", |b| {
            !b.iter().any(|l| l.starts_with("sd"))
        });
        h.write_spec("vm", &spec(&with_disk));
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().expect("swapper");
    assert!(swaps > 0, "the swapper ran");
    assert!(
        added > 0,
        "never added in {attempts} attempts while swapping"
    );
}

/// A listener a VM keeps following must live where only root can change
/// it: in a directory anyone can write, a local user could later swap it
/// for a link to any socket of the host. Refused before anything starts.
#[test]
fn listeners_in_directories_others_can_write_are_refused_before_anything_runs() {
    let h = Host::new();
    let public = h.path("img").join("public");
    std::fs::create_dir(&public).expect("mkdir");
    chmod(&public, 0o1777);
    for (field, extra) in [
        (
            "serialConsoles[0].listenerPath",
            format!(
                "  serialConsoles:\n    - {{port: 0, listenerPath: {}}}\n",
                public.join("console.sock").display()
            ),
        ),
        (
            "vmSockets[0].listenerPath",
            format!(
                "  vmSockets:\n    - {{type: vsock, port: 1024, listenerPath: {}}}\n",
                public.join("vsock-1024.sock").display()
            ),
        ),
    ] {
        h.write_spec("vm", &h.spec("vm", &extra));
        let out = h.uvmctl(&["apply", h.path("specs").to_str().expect("utf-8"), "--yes"]);
        let t = text(&out);
        assert!(!out.status.success(), "{t}");
        assert!(t.contains(field), "{t}");
        assert!(
            t.contains(&public.display().to_string()) && t.contains("mode 1777"),
            "names the directory and its mode: {t}"
        );
        assert!(h.pid("vm").is_none(), "nothing launched: {t}");
    }
}

/// A state directory a local user made (in sticky /tmp) is refused, naming
/// it, its owner and mode, before uvmctl writes anything there; so is one
/// below a directory anyone can write.
#[test]
fn a_squatted_state_directory_is_refused_by_name() {
    let h = Host::new();
    h.write_spec("vm", &h.spec("vm", "  powerState: stopped\n"));
    let victim = h.path("victim");
    std::fs::write(&victim, "root's file\n").expect("victim");
    let squat = h.path("squat");
    std::fs::create_dir(&squat).expect("mkdir");
    symlink(&victim, squat.join("lock")).expect("plant lock");
    std::os::unix::fs::lchown(squat.join("lock"), Some(NOBODY), Some(NOBODY)).expect("lchown");
    std::os::unix::fs::chown(&squat, Some(NOBODY), Some(NOBODY)).expect("chown");
    let specs = h.path("specs");
    for args in [
        vec!["apply", specs.to_str().expect("utf-8"), "--yes"],
        vec!["plan", specs.to_str().expect("utf-8")],
        vec!["status"],
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uvmctl"));
        cmd.args(&args)
            .arg("--state-dir")
            .arg(&squat)
            .arg("--allow-root")
            .arg(&h.guest);
        let out = cmd.output().expect("uvmctl runs");
        let t = text(&out);
        assert!(!out.status.success(), "{args:?}: {t}");
        assert!(
            t.contains(&squat.display().to_string()) && t.contains("owned by uid 65534"),
            "{args:?} names the directory and its owner: {t}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "root's file\n"
    );

    // A state directory of root's below a directory anyone may write (not sticky).
    let open = h.path("open");
    std::fs::create_dir_all(open.join("state")).expect("mkdir");
    chmod(&open, 0o777);
    let out = Command::new(env!("CARGO_BIN_EXE_uvmctl"))
        .args(["apply", specs.to_str().expect("utf-8"), "--yes"])
        .arg("--state-dir")
        .arg(open.join("state"))
        .arg("--allow-root")
        .arg(&h.guest)
        .output()
        .expect("uvmctl runs");
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains(&open.display().to_string()) && t.contains("not sticky"),
        "{t}"
    );
}

/// Links planted in a VM's own directory are refused, never followed: the
/// log QEMU's stderr goes to and the launch record.
#[test]
fn links_planted_in_a_vm_directory_are_refused_never_followed() {
    let h = Host::new();
    let victim = h.path("victim");
    std::fs::write(&victim, "root's file\n").expect("victim");
    h.write_spec("vm", &h.spec("vm", "  powerState: stopped\n"));
    h.apply();
    let vm_dir = h.path("state").join("vm");
    // qemu.log → victim: starting the VM must not truncate it.
    symlink(&victim, vm_dir.join("qemu.log")).expect("plant log");
    h.write_spec("vm", &h.spec("vm", "  powerState: running\n"));
    let out = h.uvmctl(&["apply", h.path("specs").to_str().expect("utf-8"), "--yes"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("qemu.log"), "{t}");
    assert!(
        h.pid("vm")
            .is_none_or(|p| std::fs::metadata(format!("/proc/{p}")).is_err())
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "root's file\n"
    );
    // A launch refused before QEMU started leaves nothing running: no vsock
    // backend either.
    let state = h.path("state").display().to_string();
    let running: Vec<String> = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&state))
        .collect();
    assert!(running.is_empty(), "left running: {running:?}");
    std::fs::remove_file(vm_dir.join("qemu.log")).expect("unplant");

    // A hard link to the victim where the log goes: refused too, not emptied.
    std::fs::hard_link(&victim, vm_dir.join("qemu.log")).expect("hard link");
    let out = h.uvmctl(&["apply", h.path("specs").to_str().expect("utf-8"), "--yes"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "root's file\n"
    );
    std::fs::remove_file(vm_dir.join("qemu.log")).expect("unplant");

    // The old fixed temporary name of the record, planted: not followed
    // (temporary files have unique names, created O_EXCL | O_NOFOLLOW).
    symlink(&victim, vm_dir.join("launch.json.tmp")).expect("plant tmp");
    h.write_spec("vm", &h.spec("vm", "  powerState: stopped\n"));
    assert_ok(&h.uvmctl(&["apply", h.path("specs").to_str().expect("utf-8"), "--yes"]));
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "root's file\n"
    );
    // The record itself replaced by a link: never read through.
    std::fs::remove_file(vm_dir.join("launch.json")).expect("rm");
    symlink(&victim, vm_dir.join("launch.json")).expect("plant record");
    let out = h.uvmctl(&["status", "--output", "json"]);
    assert!(!text(&out).contains("root's file"), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "root's file\n"
    );
}

/// Runs `cmd` under umask 000, as a careless caller would.
fn umask_000(cmd: &mut Command) {
    // SAFETY: umask is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::empty());
            Ok(())
        });
    }
}

/// Whatever umask the caller has, what uvmctl creates is root's alone: the
/// state root, VM directories and the serve socket.
#[test]
fn sockets_and_directories_get_their_modes_whatever_the_umask() {
    let h = Host::new();
    let state = h.path("fresh-state");
    let socket = h.path("serve.sock");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_uvmctl"));
    serve
        .args(["serve", "--listen"])
        .arg(format!("unix:{}", socket.display()))
        .arg("--state-dir")
        .arg(&state)
        .arg("--allow-root")
        .arg(&h.guest)
        .stderr(std::process::Stdio::null());
    umask_000(&mut serve);
    let mut child = serve.spawn().expect("serve starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::symlink_metadata(&socket).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let socket_mode = std::fs::symlink_metadata(&socket).map(|m| m.mode() & 0o777);
    let state_mode = std::fs::metadata(&state).map(|m| m.mode() & 0o7777);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(socket_mode.ok(), Some(0o600), "serve's socket");
    assert_eq!(
        state_mode.ok(),
        Some(0o711),
        "the state root serve made: others pass through, see nothing"
    );

    // apply under umask 000: the VM's directory and record.
    h.write_spec("vm", &h.spec("vm", "  powerState: stopped\n"));
    let mut apply = Command::new(env!("CARGO_BIN_EXE_uvmctl"));
    apply
        .args(["apply", h.path("specs").to_str().expect("utf-8"), "--yes"])
        .arg("--state-dir")
        .arg(&state)
        .arg("--allow-root")
        .arg(&h.guest);
    umask_000(&mut apply);
    assert_ok(&apply.output().expect("apply runs"));
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").mode() & 0o7777;
    assert_eq!(
        mode(&state.join("vm")),
        0o710,
        "root's, passable by the VM's own group"
    );
    assert_eq!(
        mode(&state.join("vm").join("vsock")),
        0o700,
        "the VM user's"
    );
    assert_eq!(mode(&state.join("vm").join("launch.json")), 0o600);
    assert_eq!(mode(&state.join("lock")), 0o600);

    // remotevm: a looking command creates nothing and starts no server;
    // apply makes its directory owner-only.
    let remote_state = h.path("remote-state");
    let with_umask_000 = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uvmctl"));
        cmd.args(args)
            .args(["--virtstack", "remotevm", "--accel", "tcg"])
            .arg("--state-dir")
            .arg(&remote_state)
            .arg("--allow-root")
            .arg(&h.guest);
        umask_000(&mut cmd);
        cmd.output().expect("uvmctl runs")
    };
    for args in [
        vec!["status"],
        vec!["plan", h.path("specs").to_str().expect("utf-8")],
    ] {
        let out = with_umask_000(&args);
        assert_ok(&out);
        assert!(!remote_state.exists(), "{args:?} created the state root");
    }
    let serving = || {
        std::fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
            .any(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                c.contains(" serve ") && c.contains(remote_state.to_str().unwrap_or("-"))
            })
    };
    assert!(!serving(), "a looking command started a server");
    assert_ok(&with_umask_000(&[
        "apply",
        h.path("specs").to_str().expect("utf-8"),
        "--yes",
    ]));
    assert_eq!(mode(&remote_state), 0o711);
    assert_eq!(mode(&remote_state.join(".remotevm")), 0o700);
    // The server apply started goes with the test.
    for p in std::fs::read_dir("/proc").expect("proc").flatten() {
        let c = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let c = String::from_utf8_lossy(&c).replace('\0', " ");
        if c.contains(" serve ") && c.contains(remote_state.to_str().unwrap_or("-")) {
            let _ = Command::new("kill").arg("-9").arg(p.file_name()).status();
        }
    }
}

/// Two endpoints sharing 15 characters would share one tap: the kernel
/// cuts names at 15 bytes, so a 16-byte endpoint is refused by name.
#[test]
fn a_sixteen_byte_endpoint_is_refused() {
    let h = Host::new();
    let nic = |endpoint: &str| {
        format!(
            "  networkAdapters:\n    - {{nicId: 6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01, endpointId: {endpoint}, macAddress: 52-54-00-12-34-56}}\n"
        )
    };
    h.write_spec("vm", &h.spec("vm", &nic("tap-0123456789ab")));
    let out = h.uvmctl(&["validate", h.path("specs").to_str().expect("utf-8")]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("networkAdapters[0].endpointId") && t.contains("1–15"),
        "{t}"
    );
    h.write_spec("vm", &h.spec("vm", &nic("tap-0123456789a")));
    assert_ok(&h.uvmctl(&["validate", h.path("specs").to_str().expect("utf-8")]));
}

/// A ttrpc request frame for `vmservice.VM/CapabilitiesVM` on `stream`.
fn capabilities_frame(stream: u32) -> Vec<u8> {
    let field = |tag: u8, bytes: &[u8]| {
        let mut f = vec![tag, u8::try_from(bytes.len()).expect("short")];
        f.extend_from_slice(bytes);
        f
    };
    let mut request = field(0x0a, b"vmservice.VM");
    request.extend(field(0x12, b"CapabilitiesVM"));
    request.extend(field(0x1a, b""));
    let mut frame = u32::try_from(request.len())
        .expect("short")
        .to_be_bytes()
        .to_vec();
    frame.extend(stream.to_be_bytes());
    frame.extend([1, 0]); // a request, no flags
    frame.extend(request);
    frame
}

/// `uvmctl serve --listen unix:SOCKET` with `limit` descriptors at most.
fn serve(h: &Host, socket: &Path, nofile: Option<u64>) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uvmctl"));
    cmd.args(["serve", "--listen"])
        .arg(format!("unix:{}", socket.display()))
        .arg("--state-dir")
        .arg(h.path("state"))
        .arg("--allow-root")
        .arg(&h.guest)
        .stderr(std::process::Stdio::null());
    if let Some(n) = nofile {
        // SAFETY: setrlimit is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let lim = nix::libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &lim) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let child = cmd.spawn().expect("serve starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "serve never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// Sends one CapabilitiesVM request on a new connection and reads the
/// answer's header.
fn answers(socket: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut header = [0u8; 10];
    s.write_all(&capabilities_frame(1)).is_ok() && s.read_exact(&mut header).is_ok()
}

/// CPU seconds `pid` has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// A client that sends requests and never reads the answers is stopped
/// being read, instead of the server holding every answer: what it can
/// push is bounded by the sockets' buffers. Other clients are still served.
#[test]
fn serve_stops_reading_a_client_that_never_reads_its_answers() {
    use std::io::Write;
    let h = Host::new();
    let socket = h.path("serve.sock");
    let mut child = serve(&h, &socket, None);
    let mut flood = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    flood.set_nonblocking(true).expect("nonblocking");
    // Until the server has read nothing for 2 s, or 32 MiB went in.
    const CAP: usize = 32 << 20;
    let (mut sent, mut stream, mut pending) = (0usize, 1u32, capabilities_frame(1));
    let mut stuck_since = None;
    while sent < CAP {
        match flood.write(&pending) {
            Ok(n) => {
                sent += n;
                stuck_since = None;
                pending.drain(..n);
                if pending.is_empty() {
                    stream += 2;
                    pending = capabilities_frame(stream);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *stuck_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(2) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("the server dropped the connection: {e}"),
        }
    }
    assert!(
        sent < CAP,
        "the server kept reading a client that reads nothing ({sent} bytes, {} requests)",
        stream / 2
    );
    assert!(answers(&socket), "another client is still served");
    let _ = child.kill();
    let _ = child.wait();
}

/// At its descriptor limit the server backs off instead of spinning on
/// accept, and accepts again once descriptors are free.
#[test]
fn serve_backs_off_at_its_descriptor_limit() {
    let h = Host::new();
    let socket = h.path("serve.sock");
    let mut child = serve(&h, &socket, Some(64));
    let mut held = Vec::new();
    for _ in 0..120 {
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    // Let it reach the limit, then measure what it burns there.
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_seconds(child.id());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_seconds(child.id()) - before;
    assert!(
        used < 0.5,
        "serve used {used:.2} s of CPU in 3 s at its descriptor limit ({} connections held)",
        held.len()
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !answers(&socket) {
        assert!(Instant::now() < deadline, "serve never accepted again");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A small tmpfs mounted over a directory for one test; on drop, the QEMUs
/// whose state is in it are stopped and it is unmounted.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0711"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("mount runs");
        assert!(ok.success(), "mount a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let dir = self.0.display().to_string();
        for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&dir) {
                let _ = Command::new("kill").arg("-9").arg(p.file_name()).status();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Temporary files left in `dir` and the VM directories below it.
fn temporaries(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for d in std::iter::once(dir.to_path_buf()).chain(
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir()),
    ) {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".tmp") || n.ends_with(".part") {
                found.push(e.path().display().to_string());
            }
        }
    }
    found
}

/// With the state directory's disk full, a disk the watcher hot-adds is in
/// QEMU while its launch record cannot say so: the record is written again
/// as soon as there is room, before the VM is reconciled again (here at a
/// SIGHUP, which reconciles at once and never stops the watcher). No
/// temporary file stays behind, and the failing status file is not
/// complained about at every turn.
#[test]
fn a_full_state_disk_loses_no_change_and_sighup_reconciles_at_once() {
    use crate::watch::{is_reconcile, message, result};
    let h = Host::new();
    let _tmpfs = Tmpfs::mount(&h.path("state"), "4m");
    let base = "  scsiControllers:\n    - id: 0\n";
    h.write_spec("vm", &h.spec("vm", base));
    let w = h.watch("watch.log", &["--backoff", "1s", "--backoff-cap", "2s"]);
    let mut agent = h.agent("vm");
    let img = h.raw_image("late-disk.img", 8);

    // Fill the state disk.
    let filler = h.path("state").join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        while f.write_all(&[0u8; 65536]).is_ok() {}
    }
    let mark = w.mark();
    h.write_spec(
        "vm",
        &h.spec(
            "vm",
            &format!(
                "{base}      disks:\n        - {{lun: 1, path: {}, type: passthrough}}\n",
                img.display()
            ),
        ),
    );
    let l = w.wait_after(
        mark,
        "the reconcile of the edit",
        Duration::from_secs(60),
        |l| is_reconcile(l, "vm"),
    );
    assert!(
        result(&l).starts_with("failed"),
        "the record write failed: {l}"
    );
    agent.wait_for("blocks", "the disk QEMU was given", |b| {
        has_block(b, 8 << 20, 0, 1)
    });
    let record = || std::fs::read_to_string(h.path("state/vm/launch.json")).expect("record");
    assert!(
        !record().contains("late-disk.img"),
        "the record could not be written: {}",
        record()
    );
    assert_eq!(temporaries(&h.path("state")), Vec::<String>::new());

    // Room again; SIGHUP: the record is written before the VM is reconciled.
    std::fs::remove_file(&filler).expect("rm filler");
    let mark = w.mark();
    let pid = w.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill")
            .success()
    );
    w.wait_after(mark, "SIGHUP's reconcile", Duration::from_secs(60), |l| {
        message(l) == "SIGHUP: reconciling every VM now"
    });
    let l = w.wait_after(
        mark,
        "the reconcile after SIGHUP",
        Duration::from_secs(60),
        |l| is_reconcile(l, "vm"),
    );
    assert_eq!(result(&l), "in sync", "{l}");
    assert!(
        record().contains("late-disk.img"),
        "the record says what QEMU has"
    );
    assert_eq!(temporaries(&h.path("state")), Vec::<String>::new());
    let complaints = w
        .dump()
        .lines()
        .filter(|l| l.contains("cannot write the status file"))
        .count();
    assert!(
        complaints <= 2,
        "{complaints} status complaints:\n{}",
        w.dump()
    );
    assert!(w.term().success());
}

/// QEMU, as its service user, can neither open `/dev/net/tun` nor make an
/// interface: uvmctl opens the tap and hands it over, at launch and live.
#[test]
fn tap_endpoints_are_opened_by_uvmctl_and_handed_to_qemu() {
    let h = Host::new();
    let tap = |i: u32| format!("uvt{}{i}", std::process::id() % 100_000);
    let nic = |i: u32| {
        format!(
            "    - {{nicId: 6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c0{i}, endpointId: {}, macAddress: 52-54-00-12-34-5{i}}}\n",
            tap(i)
        )
    };
    h.write_spec(
        "vm",
        &h.spec("vm", &format!("  networkAdapters:\n{}", nic(1))),
    );
    h.apply();
    let mut agent = h.agent("vm");
    agent.wait_for("links", "the NIC on the tap made at launch", |l| {
        l.iter().any(|x| x.contains("52:54:00:12:34:51"))
    });
    h.write_spec(
        "vm",
        &h.spec("vm", &format!("  networkAdapters:\n{}{}", nic(1), nic(2))),
    );
    let out = h.apply();
    assert!(text(&out).contains("+ networkAdapter"), "{}", text(&out));
    agent.wait_for("links", "the NIC on the tap added live", |l| {
        l.iter().any(|x| x.contains("52:54:00:12:34:52"))
    });
    // Both interfaces exist on the host, held by QEMU alone.
    for i in [1, 2] {
        assert!(
            Path::new(&format!("/sys/class/net/{}", tap(i))).exists(),
            "tap {} missing",
            tap(i)
        );
    }
    assert!(
        !qemu_cmdline(&h, "vm").contains(&tap(1)),
        "QEMU was given no tap name"
    );
    assert!(text(&h.apply()).contains("No changes."));
}

/// What QEMU's service user could not use is refused by plan, as by apply,
/// naming the field: a writable share it may not write.
#[test]
fn plan_refuses_what_qemus_service_user_cannot_use() {
    let h = Host::new();
    let share = h.path("img").join("roots-only");
    std::fs::create_dir(&share).expect("mkdir");
    chmod(&share, 0o755);
    h.write_spec(
        "vm",
        &h.spec(
            "vm",
            &format!(
                "  plan9Shares:\n    - {{name: s, hostPath: {}}}\n",
                share.display()
            ),
        ),
    );
    let specs = h.path("specs");
    let specs = specs.to_str().expect("utf-8");
    for args in [vec!["plan", specs], vec!["apply", specs, "--yes"]] {
        let out = h.uvmctl(&args);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {t}");
        assert!(
            t.contains("spec.plan9Shares[0].hostPath") && t.contains("uvmctl-qemu"),
            "{args:?}: {t}"
        );
    }
    assert!(h.pid("vm").is_none(), "nothing launched");
    // Given to its group, it is fine.
    crate::host::share_with_qemu(&share, 0o770);
    assert_ok(&h.plan(&[]));
}

/// Issue 31: one VM's QEMU reaches its own VM only. A process with the
/// identity of VM `a`'s QEMU (its uid, gid and groups, read from /proc),
/// standing in for a compromised QEMU, can connect to none of VM `b`'s
/// sockets (QMP, its observe and events sockets, agent, console), open
/// neither `b`'s disk nor the descriptors `b`'s QEMU holds, and cannot
/// enter `b`'s backend directory. (It used to copy `b`'s 0600 disk out
/// through `b`'s QMP socket, and swap `b`'s agent socket for its own.)
#[test]
fn one_vms_qemu_reaches_no_other_vm() {
    let h = Host::new();
    let disk = h.raw_image("b-disk.img", 8);
    chmod(&disk, 0o600);
    h.write_spec("iso-a", &h.spec("iso-a", "  powerState: paused\n"));
    h.write_spec(
        "iso-b",
        &h.spec(
            "iso-b",
            &format!(
                "  powerState: paused\n  scsiControllers:\n    - id: 0\n      disks:\n        - {{lun: 0, path: {}, type: passthrough}}\n",
                disk.display()
            ),
        ),
    );
    assert_ok(&h.apply());
    let (a, b) = (h.pid("iso-a").expect("a"), h.pid("iso-b").expect("b"));
    let ids = |pid: i32| -> (String, String, Vec<String>) {
        let field = |name: &str| crate::host::proc_status(pid, name);
        (
            field("Uid:")[0].clone(),
            field("Gid:")[0].clone(),
            field("Groups:"),
        )
    };
    let (a_uid, a_gid, a_groups) = ids(a);
    let (b_uid, b_gid, _) = ids(b);
    assert_ne!(a_uid, "0");
    let ranged = std::fs::read_to_string("/etc/subuid")
        .is_ok_and(|t| t.lines().any(|l| l.starts_with("uvmctl-qemu:")));
    if ranged {
        assert_ne!(
            (&a_uid, &a_gid),
            (&b_uid, &b_gid),
            "each VM a user of its own"
        );
        let backend = h.record_pid("iso-a", "vsockPid").expect("a's backend");
        assert_eq!(ids(backend).0, a_uid, "the backend runs as its VM's QEMU");
    }
    let b_fd = std::fs::read_dir(format!("/proc/{b}/fd"))
        .expect("b's fds")
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == disk))
        .map(|e| e.path())
        .expect("b's QEMU holds its disk");
    let state = h.path("state");
    let mut targets: Vec<(String, String)> = [
        "qmp.sock",
        "qmp-observe.sock",
        "qmp-events.sock",
        "agent.sock",
        "console.sock",
    ]
    .iter()
    .flat_map(|s| {
        [
            (
                "connect".to_string(),
                state.join("iso-b").join(s).display().to_string(),
            ),
            (
                "connect".to_string(),
                state.join("iso-a").join(s).display().to_string(),
            ),
        ]
    })
    .collect();
    targets.push(("open".into(), disk.display().to_string()));
    targets.push(("open".into(), b_fd.display().to_string()));
    targets.push((
        "list".into(),
        state.join("iso-b/vsock").display().to_string(),
    ));
    targets.push(("list".into(), state.join("iso-b").display().to_string()));
    let script = r#"
import json, os, socket, sys
out = []
for kind, path in json.loads(sys.argv[1]):
    try:
        if kind == "connect":
            s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(path); s.close()
        elif kind == "open":
            os.close(os.open(path, os.O_RDONLY))
        else:
            os.listdir(path)
        out.append([kind, path, "reached"])
    except OSError as e:
        out.append([kind, path, e.strerror])
print(json.dumps(out))
"#;
    let out = Command::new("setpriv")
        .arg(format!("--reuid={a_uid}"))
        .arg(format!("--regid={a_gid}"))
        .arg(format!("--groups={}", a_groups.join(",")))
        // The system's python, which any user may run.
        .args(["--inh-caps=-all", "--", "/usr/bin/python3", "-c", script])
        .arg(serde_json::to_string(&targets).expect("json"))
        .output()
        .expect("setpriv runs");
    assert!(out.status.success(), "{}", text(&out));
    let results: Vec<(String, String, String)> =
        serde_json::from_slice(&out.stdout).expect("the probe's answer");
    let reached: Vec<_> = results.iter().filter(|r| r.2 == "reached").collect();
    assert!(reached.is_empty(), "a's QEMU user reached: {reached:?}");
    assert_eq!(results.len(), targets.len());
    assert_ok(&h.uvmctl(&["destroy", "iso-a"]));
    assert_ok(&h.uvmctl(&["destroy", "iso-b"]));
}
