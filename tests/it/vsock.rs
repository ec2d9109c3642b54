//! VM sockets on real QEMU with the user-space backend (`vhost-device-vsock`,
//! installed by `scripts/setup-host`): listeners follow the spec live, bytes
//! go both ways, the host reaches guest listeners, a save and restore and a
//! dead backend are survived, and two VMs cannot reach each other.

use crate::host::{Host, assert_ok, text};
use crate::watch::{is_reconcile, result, trigger};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn listener(path: &Path) -> UnixListener {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).expect("bind the host listener");
    // The vsock backend (QEMU's service user) may connect to it.
    crate::host::share_with_qemu(path, 0o660);
    l
}

/// Answers one connection: reads a line, answers `reply`, returns the line.
fn answer_one(l: UnixListener, reply: &'static str) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (conn, _) = l.accept().expect("the guest connects");
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut r = BufReader::new(conn.try_clone().expect("clone"));
        let mut line = String::new();
        r.read_line(&mut line).expect("a line from the guest");
        let mut w = conn;
        w.write_all(format!("{reply}\n").as_bytes())
            .expect("answer");
        line.trim_end().to_string()
    })
}

/// Connects from the host to a guest port through the VM's vsock socket and
/// exchanges one line.
fn host_to_guest(h: &Host, vm: &str, port: u32, line: &str) -> Result<String, String> {
    let s = UnixStream::connect(h.path(&format!("state/{vm}/vsock/vsock.sock")))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut w = s;
    w.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut ok = String::new();
    r.read_line(&mut ok).map_err(|e| e.to_string())?;
    if !ok.starts_with("OK ") {
        return Err(format!("no OK: {ok:?}"));
    }
    w.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    r.read_line(&mut answer).map_err(|e| e.to_string())?;
    Ok(answer.trim_end().to_string())
}

/// `vsock-send` from the guest, retried while the guest has not yet bound
/// a freshly plugged vsock device ("No such device").
fn send_when_plugged(agent: &mut crate::host::Agent, cmd: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + crate::host::HOTPLUG_TIMEOUT;
    loop {
        let out = agent.cmd(cmd);
        let unbound = out.len() == 1 && out[0].contains("No such device");
        if !unbound || std::time::Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn backend_pid(h: &Host, vm: &str) -> Option<i32> {
    h.record_pid(vm, "vsockPid")
}

fn sockets(listeners: &[(u32, &Path)]) -> String {
    let mut s = String::from("  vmSockets:\n");
    for (port, path) in listeners {
        s.push_str(&format!(
            "    - {{type: vsock, port: {port}, listenerPath: {}}}\n",
            path.display()
        ));
    }
    s
}

#[test]
fn vsock_listeners_follow_the_spec_live_both_ways_through_save_restore_and_a_dead_backend() {
    let h = Host::new();
    let caps = h.uvmctl(&["capabilities"]);
    assert!(
        text(&caps).contains("| vsock | live: through vhost-device-vsock"),
        "the backend is installed (scripts/setup-host): {}",
        text(&caps)
    );
    h.write_spec("vs", &h.spec("vs", ""));
    h.write_spec("other", &h.spec("other", ""));
    // Issue 30: what the caller left open (a root-only file, a flock)
    // reaches neither QEMU nor the vsock backend, for the VM's whole life.
    let mut caller = crate::host::CallerFiles::new(&h);
    let specs = h.path("specs");
    let out = caller.run(h.command(&["apply", specs.to_str().expect("utf-8"), "--yes"]));
    assert_ok(&out);
    for vm in ["vs", "other"] {
        let qemu = h.pid(vm).expect("qemu pid");
        caller.assert_not_held_by(&format!("{vm}'s QEMU"), qemu);
        let backend = backend_pid(&h, vm).expect("backend pid");
        caller.assert_not_held_by(&format!("{vm}'s vsock backend"), backend);
        // Issue 31: the backend, which parses guest data, runs as QEMU
        // does: no new privileges, a seccomp filter.
        let field = |name: &str| crate::host::proc_status(backend, name);
        assert_eq!(field("NoNewPrivs:"), ["1"], "{vm}'s backend");
        assert_eq!(field("Seccomp:"), ["2"], "{vm}'s backend");
    }
    caller.release();
    assert!(caller.lock_is_free(), "no VM holds the caller's lock");
    // Issue 30, on real QEMU: a selector that selects nothing prunes nothing.
    let pids = [h.pid("vs"), h.pid("other")];
    let out = h.uvmctl(&[
        "apply",
        specs.to_str().expect("utf-8"),
        "-l",
        "tier=nope",
        "--prune",
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("refusing to prune: it would remove all 2 VMs of this host"),
        "{}",
        text(&out)
    );
    assert_eq!([h.pid("vs"), h.pid("other")], pids, "both QEMUs run on");
    assert_eq!(h.state_of("vs"), "running");
    let mut agent = h.agent("vs");
    let mut other = h.agent("other");

    // A listener added to the running VM's spec: live, and the guest's
    // connection to that port reaches it, bytes both ways.
    let sock = h.path("img/l5000.sock");
    h.write_spec("vs", &h.spec("vs", &sockets(&[(5000, &sock)])));
    let out = h.apply();
    assert!(
        text(&out).contains("+ vmSocket vsock:5000") && text(&out).contains("[live]"),
        "{}",
        text(&out)
    );
    let got = answer_one(listener(&sock), "hello-guest");
    assert_eq!(agent.cmd("vsock-send 2 5000 hello-host"), ["hello-guest"]);
    assert_eq!(got.join().expect("listener thread"), "hello-host");

    // The host reaches a guest listener through the VM's vsock socket.
    assert_eq!(agent.cmd("vsock-echo 6000"), Vec::<String>::new());
    assert_eq!(
        host_to_guest(&h, "vs", 6000, "ping").as_deref(),
        Ok("echo: ping")
    );

    // The other VM cannot reach vs's listener (its own backend, its own CID):
    // vs is CID 3, other CID 4.
    let refused = other.cmd("vsock-send 3 6000 sneaky");
    assert!(
        refused.len() == 1 && refused[0].starts_with("ERR"),
        "{refused:?}"
    );
    // ...while other's own host listener works.
    let other_sock = h.path("img/other.sock");
    h.write_spec("other", &h.spec("other", &sockets(&[(5000, &other_sock)])));
    h.apply();
    let got = answer_one(listener(&other_sock), "for-other");
    assert_eq!(other.cmd("vsock-send 2 5000 from-other"), ["for-other"]);
    assert_eq!(got.join().expect("listener thread"), "from-other");

    // A listener path outside the allowed roots is refused before anything
    // changes.
    let outside = h.path("outside.sock");
    h.write_spec(
        "vs",
        &h.spec("vs", &sockets(&[(5000, &sock), (5001, &outside)])),
    );
    let specs = h.path("specs");
    let specs = specs.to_str().expect("utf-8");
    let out = h.uvmctl(&["apply", specs, "--yes", "--color", "never"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("spec.vmSockets[1].listenerPath"),
        "{}",
        text(&out)
    );
    assert!(
        !h.path("state/vs/vsock/vsock.sock_5001").exists(),
        "nothing linked"
    );

    // The backend killed: the next apply starts it again and re-plugs the
    // device; vsock works again.
    h.write_spec("vs", &h.spec("vs", &sockets(&[(5000, &sock)])));
    let pid = backend_pid(&h, "vs").expect("backend pid");
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    );
    std::thread::sleep(Duration::from_millis(300));
    let out = h.plan(&["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("+ vmSocket vsock:5000"),
        "{}",
        text(&out)
    );
    h.apply();
    assert_ne!(backend_pid(&h, "vs"), Some(pid), "a new backend");
    let got = answer_one(listener(&sock), "after-kill");
    assert_eq!(
        send_when_plugged(&mut agent, "vsock-send 2 5000 again"),
        ["after-kill"]
    );
    assert_eq!(got.join().expect("listener thread"), "again");

    // Saved and restored: vsock works again, both ways.
    h.write_spec(
        "vs",
        &h.spec(
            "vs",
            &format!("{}  powerState: saved\n", sockets(&[(5000, &sock)])),
        ),
    );
    h.apply();
    assert_eq!(h.state_of("vs"), "saved");
    assert_eq!(backend_pid(&h, "vs"), None, "no backend while saved");
    h.write_spec("vs", &h.spec("vs", &sockets(&[(5000, &sock)])));
    h.apply();
    let got = answer_one(listener(&sock), "restored");
    let mut agent = h.agent("vs");
    assert_eq!(
        send_when_plugged(&mut agent, "vsock-send 2 5000 back"),
        ["restored"]
    );
    assert_eq!(got.join().expect("listener thread"), "back");
    assert_eq!(agent.cmd("vsock-echo 6001"), Vec::<String>::new());
    assert_eq!(
        host_to_guest(&h, "vs", 6001, "pong").as_deref(),
        Ok("echo: pong")
    );
    assert!(text(&h.plan(&[])).contains("No changes."));

    // Removed from the spec: the guest's next connect to that port fails.
    h.write_spec("vs", &h.spec("vs", ""));
    let out = h.apply();
    assert!(
        text(&out).contains("- vmSocket vsock:5000"),
        "{}",
        text(&out)
    );
    let _keep = listener(&sock);
    let refused = agent.cmd("vsock-send 2 5000 nobody");
    assert!(
        refused.len() == 1 && refused[0].starts_with("ERR"),
        "{refused:?}"
    );
    assert_ok(&h.uvmctl(&["destroy", "vs"]));
    assert!(
        backend_pid(&h, "other").is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()),
        "the other VM's backend runs on"
    );

    // Under `uvmctl watch`, a backend that dies is an event: vsock is back
    // at once, not at the next resync (an hour here).
    std::fs::remove_file(h.path("specs/vs.yaml")).expect("rm");
    let w = h.watch("watch.log", &[]);
    let pid = backend_pid(&h, "other").expect("backend pid");
    let mark = w.mark();
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    );
    let l = w.wait_after(
        mark,
        "the backend re-plugged",
        Duration::from_secs(60),
        |l| is_reconcile(l, "other"),
    );
    assert_eq!(
        (trigger(&l), result(&l)),
        ("event VSOCK_BACKEND_EXITED", "applied 1 change(s)"),
        "{l}\n{}",
        w.dump()
    );
    let got = answer_one(listener(&other_sock), "watched");
    assert_eq!(
        send_when_plugged(&mut other, "vsock-send 2 5000 w"),
        ["watched"]
    );
    assert_eq!(got.join().expect("listener thread"), "w");
    assert!(w.term().success());
}
