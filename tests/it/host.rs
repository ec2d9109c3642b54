//! A scratch host for real-QEMU tests: specs, images, a state directory,
//! the `uvmctl` binary pointed at them, and the test guest's agent.
//! Needs `qemu-system-x86_64` and the test guest (`guest/build.sh`;
//! `scripts/test` installs and builds both).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// How long a guest may take to boot to its agent under TCG on a loaded CI machine.
pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a guest may take to see a hot-plug.
pub(crate) const HOTPLUG_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("UVMCTL_GUEST_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/uvmctl/guest"), PathBuf::from);
    assert!(
        dir.join("initrd.img").is_file(),
        "test guest missing in {}: run guest/build.sh (scripts/test does), or set UVMCTL_GUEST_DIR",
        dir.display()
    );
    assert!(
        Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "qemu-system-x86_64 missing: apt-get install qemu-system-x86 qemu-utils (scripts/test does)"
    );
    dir
}

/// A scratch host: specs, images and a state directory of its own.
pub(crate) struct Host {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) guest: PathBuf,
}

impl Host {
    pub(crate) fn new() -> Self {
        let guest = guest_dir();
        let dir = tempfile::Builder::new()
            .prefix("uvq")
            .tempdir_in("/tmp")
            .expect("tempdir");
        for sub in ["specs", "img", "state"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        Host { dir, guest }
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub(crate) fn kernel(&self) -> PathBuf {
        let vmlinux = self.guest.join("vmlinux");
        if vmlinux.is_file() {
            vmlinux
        } else {
            self.guest.join("vmlinuz")
        }
    }

    /// A VM spec booting the test guest, with `extra` under `spec:`.
    pub(crate) fn spec(&self, name: &str, extra: &str) -> String {
        format!(
            "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: {name}\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: {}\n      initrd: {}\n      cmdline: console=ttyS0 panic=-1 quiet swiotlb=noforce\n  processors:\n    count: 1\n  memory:\n    sizeMB: 256\n{extra}",
            self.kernel().display(),
            self.guest.join("initrd.img").display()
        )
    }

    pub(crate) fn write_spec(&self, name: &str, text: &str) {
        std::fs::write(self.path("specs").join(format!("{name}.yaml")), text).expect("write spec");
    }

    /// A raw image of `mb` MiB.
    pub(crate) fn raw_image(&self, name: &str, mb: u64) -> PathBuf {
        let p = self.path("img").join(name);
        let f = std::fs::File::create(&p).expect("create image");
        f.set_len(mb << 20).expect("size image");
        p
    }

    pub(crate) fn uvmctl(&self, args: &[&str]) -> Output {
        if matches!(
            args.first(),
            Some(&"validate" | &"schema" | &"capabilities")
        ) {
            return Command::new(env!("CARGO_BIN_EXE_uvmctl"))
                .args(args)
                .output()
                .expect("uvmctl runs");
        }
        self.command(args).output().expect("uvmctl runs")
    }

    /// `uvmctl` with this host's options, given before the subcommand (so a
    /// command taking every word after it, as `agent` does, gets none).
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uvmctl"));
        cmd.arg("--state-dir")
            .arg(self.path("state"))
            .arg("--allow-root")
            .arg(self.path("img"))
            .arg("--allow-root")
            .arg(&self.guest)
            .args(["--accel", "tcg"])
            .args(args);
        cmd
    }

    pub(crate) fn apply(&self) -> Output {
        let specs = self.path("specs");
        let out = self.uvmctl(&[
            "apply",
            specs.to_str().expect("utf-8"),
            "--yes",
            "--color",
            "never",
        ]);
        assert_ok(&out);
        out
    }

    pub(crate) fn plan(&self, extra: &[&str]) -> Output {
        let specs = self.path("specs");
        let mut args = vec!["plan", specs.to_str().expect("utf-8"), "--color", "never"];
        args.extend_from_slice(extra);
        self.uvmctl(&args)
    }

    pub(crate) fn agent(&self, vm: &str) -> Agent {
        Agent::connect(&self.path("state").join(vm).join("agent.sock"))
    }

    pub(crate) fn pid(&self, vm: &str) -> Option<i32> {
        self.record_pid(vm, "pid")
    }

    /// A pid the launch record holds: `pid` (QEMU) or `vsockPid` (its backend).
    pub(crate) fn record_pid(&self, vm: &str, key: &str) -> Option<i32> {
        let rec = std::fs::read_to_string(self.path("state").join(vm).join("launch.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&rec).ok()?;
        v[key].as_i64().and_then(|p| i32::try_from(p).ok())
    }

    pub(crate) fn status(&self) -> serde_json::Value {
        let out = self.uvmctl(&["status", "--output", "json"]);
        assert_ok(&out);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
        doc["vms"].clone()
    }

    pub(crate) fn state_of(&self, vm: &str) -> String {
        let s = self.status();
        s.as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == vm))
            .and_then(|r| r["state"].as_str())
            .unwrap_or("absent")
            .to_string()
    }
}

/// The vmservice servers (`uvmctl serve`) running for `h`'s state directory.
pub(crate) fn serve_pids(h: &Host) -> Vec<i32> {
    let state = h.path("state").display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid: i32 = p.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains(" serve ") && cmdline.contains(&state)).then_some(pid)
        })
        .collect()
}

impl Drop for Host {
    fn drop(&mut self) {
        // Never leave a vmservice server behind (remotevm starts them in
        // process groups of their own).
        for pid in serve_pids(self) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        // Never leave a QEMU (or a vsock backend) behind, whatever the test did.
        if let Ok(entries) = std::fs::read_dir(self.path("state")) {
            for e in entries.flatten() {
                let Some(name) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                for pid in ["pid", "vsockPid"]
                    .iter()
                    .filter_map(|k| self.record_pid(&name, k))
                {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if String::from_utf8_lossy(&cmdline)
                        .contains(self.path("state").to_str().unwrap_or("-"))
                    {
                        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                    }
                }
            }
        }
    }
}

pub(crate) fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The guest agent on its virtio-serial port (see guest/README.md).
pub(crate) struct Agent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Agent {
    pub(crate) fn connect(sock: &Path) -> Self {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Ok(s) = UnixStream::connect(sock) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut a = Agent {
                    reader: BufReader::new(s.try_clone().expect("clone")),
                    writer: s,
                };
                // The guest may still be booting: ping until it answers.
                while Instant::now() < deadline {
                    if a.try_cmd("ping").is_some_and(|l| l == ["pong"]) {
                        // Pings sent while the guest booted are answered now: drop those answers.
                        let _ = a.writer.set_read_timeout(Some(Duration::from_millis(700)));
                        let mut stale = String::new();
                        while a.reader.read_line(&mut stale).is_ok_and(|n| n > 0) {
                            stale.clear();
                        }
                        let _ = a.writer.set_read_timeout(Some(Duration::from_secs(40)));
                        return a;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "guest agent at {} did not answer within {BOOT_TIMEOUT:?}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(crate) fn try_cmd(&mut self, c: &str) -> Option<Vec<String>> {
        self.writer.write_all(format!("{c}\n").as_bytes()).ok()?;
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            if self.reader.read_line(&mut l).ok()? == 0 {
                return None;
            }
            let l = l.trim_end_matches('\n');
            if l == "OK" {
                return Some(lines);
            }
            if l.starts_with("ERR") {
                return Some(vec![l.to_string()]);
            }
            lines.push(l.strip_prefix('.').unwrap_or(l).to_string());
        }
    }

    pub(crate) fn cmd(&mut self, c: &str) -> Vec<String> {
        self.try_cmd(c)
            .unwrap_or_else(|| panic!("agent did not answer {c:?}"))
    }

    /// Polls `c` until `pred` holds on its answer.
    pub(crate) fn wait_for(
        &mut self,
        c: &str,
        what: &str,
        pred: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + HOTPLUG_TIMEOUT;
        loop {
            let out = self.cmd(c);
            if pred(&out) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "guest never showed {what}; last `{c}`: {out:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The words of field `name` (`Uid:`, `Groups:`, `Seccomp:`...) in
/// `/proc/PID/status`; empty when the process or the field is gone.
pub(crate) fn proc_status(pid: i32, name: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// A raw QMP exchange, as an operator would do by hand.
pub(crate) fn qmp_by_hand(
    sock: &Path,
    command: &str,
    arguments: serde_json::Value,
    wait_event: Option<&str>,
) {
    let s = UnixStream::connect(sock).expect("qmp socket");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).expect("greeting");
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .expect("write");
    line.clear();
    r.read_line(&mut line).expect("caps reply");
    let msg = serde_json::json!({"execute": command, "arguments": arguments});
    w.write_all(format!("{msg}\n").as_bytes()).expect("write");
    let mut got_reply = false;
    let mut got_event = wait_event.is_none();
    while !(got_reply && got_event) {
        line.clear();
        r.read_line(&mut line).expect("qmp line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        if v.get("return").is_some() {
            got_reply = true;
        }
        assert!(v.get("error").is_none(), "{command} failed: {line}");
        if wait_event.is_some_and(|e| v["event"] == e) {
            got_event = true;
        }
    }
    let mut rest = Vec::new();
    let _ = w.shutdown(std::net::Shutdown::Both);
    let _ = r.read_to_end(&mut rest);
}

pub(crate) fn has_block(blocks: &[String], size: u64, ro: u8, lun: u32) -> bool {
    blocks.iter().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 5
            && f[1] == size.to_string()
            && f[2] == ro.to_string()
            && f[4].ends_with(&format!(":{lun}"))
    })
}

/// The service user QEMU runs as (scripts/setup-host makes it).
pub(crate) const QEMU_USER: &str = "uvmctl-qemu";

/// The service user's (uid, gid).
pub(crate) fn qemu_user() -> (u32, u32) {
    let u = nix::unistd::User::from_name(QEMU_USER)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("{QEMU_USER} missing: run scripts/setup-host"));
    (u.uid.as_raw(), u.gid.as_raw())
}

/// Gives `path` to the service user's group with `mode`, as an operator
/// does for a listener QEMU connects to (0660) or a share it writes (0770).
pub(crate) fn share_with_qemu(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, None, Some(qemu_user().1)).expect("chgrp");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// What a caller may leave open when it runs uvmctl (issue 30): a file only
/// root may read as descriptor 9 and a `flock`ed lock file as descriptor
/// 10, both without close-on-exec, as `uvmctl apply … 9</etc/shadow` and
/// `flock -o`-less wrappers leave them.
pub(crate) struct CallerFiles {
    pub(crate) secret: PathBuf,
    pub(crate) lock: PathBuf,
    held: Option<std::fs::File>,
}

impl CallerFiles {
    pub(crate) fn new(h: &Host) -> Self {
        use std::os::unix::fs::OpenOptionsExt;
        let secret = h.path("caller-secret");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&secret)
            .expect("secret");
        f.write_all(b"root's secret\n").expect("write");
        let lock = h.path("caller.lock");
        let held = std::fs::File::create(&lock).expect("lock file");
        // Locked on this open file description: it stays locked while any
        // process holds a descriptor of it.
        // SAFETY: flock on a descriptor this struct owns.
        let locked = unsafe {
            nix::libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&held),
                nix::libc::LOCK_EX | nix::libc::LOCK_NB,
            )
        };
        assert_eq!(locked, 0, "flock");
        CallerFiles {
            secret,
            lock,
            held: Some(held),
        }
    }

    /// `cmd` started with the secret as descriptor 9 and the held lock as 10.
    pub(crate) fn run(&self, mut cmd: Command) -> Output {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let secret = std::fs::File::open(&self.secret).expect("open secret");
        let (s, l) = (
            secret.as_raw_fd(),
            self.held.as_ref().expect("held").as_raw_fd(),
        );
        // SAFETY: dup2 only, between fork and exec; dup2 leaves the new
        // descriptors without close-on-exec, as a shell's redirection does.
        unsafe {
            cmd.pre_exec(move || {
                if nix::libc::dup2(s, 9) == -1 || nix::libc::dup2(l, 10) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.output().expect("uvmctl runs")
    }

    /// Lets go of the test's own copy of the lock: from then on only a
    /// process that inherited it still holds it.
    pub(crate) fn release(&mut self) {
        self.held = None;
    }

    /// Whether the lock can be taken now (no process holds it any more).
    pub(crate) fn lock_is_free(&self) -> bool {
        let f = std::fs::File::open(&self.lock).expect("open lock");
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
    }

    /// Panics when process `pid` holds any descriptor of the caller's.
    pub(crate) fn assert_not_held_by(&self, what: &str, pid: i32) {
        let fds = descriptors_of(pid);
        assert!(!fds.is_empty(), "{what} ({pid}) has descriptors to look at");
        for (fd, target) in &fds {
            assert!(
                *target != self.secret && *target != self.lock,
                "{what} ({pid}) holds the caller's {} as fd {fd}: {fds:?}",
                target.display()
            );
        }
    }
}

/// `(fd, what it points at)` of every descriptor of process `pid`.
pub(crate) fn descriptors_of(pid: i32) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), target))
        })
        .collect();
    out.sort();
    out
}
