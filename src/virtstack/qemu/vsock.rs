//! VM sockets without the kernel's vhost-vsock: QEMU's `vhost-user-vsock-pci`
//! served by rust-vmm's `vhost-device-vsock`, one backend process per VM
//! (so guests never share a vsock namespace), supervised like QEMU: its own
//! process group, its pid in the launch record, stopped with its VM, and
//! started again (with the device re-plugged) when an add finds it dead.
//!
//! The backend maps the guest's vsock to host unix sockets, as Firecracker's
//! hybrid vsock does:
//! - a guest connecting to the host (CID 2), port P, reaches the unix socket
//!   `<vm>/vsock/vsock.sock_P`, which uvmctl makes a symlink to the spec's
//!   `listenerPath` (so adding or removing a listener touches no device);
//! - a host program reaches a guest listener on port P by connecting to
//!   `<vm>/vsock/vsock.sock` and writing `CONNECT P\n` (answered
//!   `OK <port>\n`).
//!
//! `<vm>/vsock/` is the VM user's (the backend binds its sockets there):
//! the one directory of a VM its own processes write.
//!
//! Every memory of the guest must be shared (`memory-backend-memfd,share=on`)
//! for the backend to map it (the launch's argv asks for it).

use super::qmp::{Qmp, QmpError};
use super::state::StateDir;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The backend's program name (`scripts/setup-host` installs it).
pub use super::caps::BACKEND;
/// The QEMU device id of the vsock device.
pub const DEVICE_ID: &str = "vsock0";
/// The QEMU chardev id of the vhost-user connection.
pub const CHARDEV_ID: &str = "vsock-chr";
/// The first guest CID given out (0–2 are reserved).
pub const FIRST_CID: u32 = 3;
/// How long a backend may take to open its vhost-user socket.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prefix of a listener link: `<uds>_<port>`, as the backend names them.
const LINK_PREFIX: &str = "vsock.sock_";

/// Where the backend is installed, if it is: `PATH`, then `/usr/local/bin`.
pub fn find_backend() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(BACKEND))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The `-chardev` and `-device` values that plug the device at launch.
pub fn launch_args(dir: &StateDir, name: &str) -> [String; 4] {
    [
        "-chardev".into(),
        format!(
            "socket,id={CHARDEV_ID},path={}",
            dir.vsock_backend_socket(name).display()
        ),
        "-device".into(),
        device(),
    ]
}

fn device() -> String {
    json!({"driver": "vhost-user-vsock-pci", "id": DEVICE_ID, "chardev": CHARDEV_ID}).to_string()
}

/// Plugs the device into a running QEMU whose backend listens.
pub async fn plug(q: &Qmp, dir: &StateDir, name: &str) -> Result<(), QmpError> {
    let path = dir.vsock_backend_socket(name);
    q.execute(
        "chardev-add",
        Some(json!({
            "id": CHARDEV_ID,
            "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": path}},
                "server": false,
            }},
        })),
    )
    .await?;
    let device: serde_json::Value = serde_json::from_str(&device()).unwrap_or_default();
    if let Err(e) = q.execute("device_add", Some(device)).await {
        let _ = q
            .execute("chardev-remove", Some(json!({"id": CHARDEV_ID})))
            .await;
        return Err(e);
    }
    Ok(())
}

/// Unplugs the device (the guest lets go of it quickly) and its chardev.
pub async fn unplug(q: &Qmp, timeout: Duration) -> Result<(), super::ops::UnplugError> {
    super::ops::device_del(q, DEVICE_ID, timeout).await?;
    let _ = q
        .execute("chardev-remove", Some(json!({"id": CHARDEV_ID})))
        .await;
    Ok(())
}

/// Starts the backend for VM `name` with guest CID `cid`; returns its pid once
/// its vhost-user socket is there.
pub async fn spawn_backend(
    binary: &Path,
    dir: &StateDir,
    name: &str,
    cid: u32,
    user: Option<&super::user::ServiceUser>,
) -> Result<u32, String> {
    let socket = dir.vsock_backend_socket(name);
    let uds = dir.vsock_socket(name);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&uds);
    let log = crate::hostfs::open_state_file(&dir.vm_dir(name).join("vsock.log"), 0o600, true)
        .map_err(|e| format!("cannot create vsock.log: {e}"))?;
    // A unique group per VM: a backend only ever serves its own VM, and the
    // group keeps it so even if that changed.
    let vm = format!(
        "guest-cid={cid},socket={},uds-path={},groups=uvmctl-{name}",
        socket.display(),
        uds.display()
    );
    let args = ["--vm".to_string(), vm];
    let child = super::process::spawn(super::process::Spawn {
        program: binary,
        args: &args,
        dir: &dir.vsock_dir(name),
        log,
        user,
        memlock: None,
        inherit: Vec::new(),
        env: &[("RUST_LOG", "warn")],
        // It parses guest data and has no sandbox of its own.
        confine: true,
    })
    .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    // Until it listens and its pid is returned, nobody else knows of it: a
    // wait cut short (a client's deadline drops this future) or a failure
    // kills it.
    let mut unready = Unready(Some(child));
    let child = unready.0.as_mut().ok_or("the backend is gone")?;
    let pid = child.id().ok_or("the backend exited at once")?;
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if socket.exists() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{BACKEND} exited ({status}) before it listened"));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{BACKEND} did not listen within {READY_TIMEOUT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Some(mut child) = unready.0.take() else {
        return Err("the backend is gone".into());
    };
    // Reap it when it exits while uvmctl runs.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(pid)
}

/// A backend started and not yet handed to its caller: killed when dropped.
struct Unready(Option<tokio::process::Child>);

impl Drop for Unready {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            // Not reaped yet, so the pid is still this process's; tokio
            // reaps a dropped child in the background.
            let _ = child.start_kill();
        }
    }
}

/// Whether `pid` is this VM's backend (pids get reused), of this layout or
/// the one before (its sockets in the VM's directory itself).
pub fn backend_alive(pid: Option<u32>, dir: &StateDir, name: &str) -> bool {
    backend_of(pid, dir, name).is_some()
}

/// What the backend's threads are doing, for a log line (`pid 42: S
/// ep_poll, S unix_stream_read_generic`): bounded to its first 16 threads.
pub fn backend_state(pid: Option<u32>) -> String {
    let Some(pid) = pid else {
        return "none".into();
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("pid {pid}: gone");
    };
    let threads: Vec<String> = tasks
        .flatten()
        .take(16)
        .map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command's closing parenthesis.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?");
            let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            let wchan: String = wchan
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(48)
                .collect();
            format!("{state} {wchan}").trim().to_string()
        })
        .collect();
    format!("pid {pid}: {}", threads.join(", "))
}

/// Whether `pid` is this VM's backend started before the backend had a
/// directory of its own: it is replaced at the next change to vsock.
pub fn backend_is_legacy(pid: Option<u32>, dir: &StateDir, name: &str) -> bool {
    backend_of(pid, dir, name) == Some(true)
}

/// `Some(legacy)` when `pid` is this VM's backend.
fn backend_of(pid: Option<u32>, dir: &StateDir, name: &str) -> Option<bool> {
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid?)).ok()?;
    let has = |socket: PathBuf| {
        let needle = format!("socket={},", socket.display());
        cmdline
            .split(|b| *b == 0)
            .any(|arg| arg.windows(needle.len()).any(|w| w == needle.as_bytes()))
    };
    if has(dir.vsock_backend_socket(name)) {
        Some(false)
    } else if has(legacy_dir(dir, name).join("vhost-vsock.sock")) {
        Some(true)
    } else {
        None
    }
}

/// Where a backend started before had its sockets and links.
fn legacy_dir(dir: &StateDir, name: &str) -> PathBuf {
    dir.vm_dir(name)
}

/// Ends the backend of a VM, if it runs.
pub async fn stop_backend(pid: Option<u32>, dir: &StateDir, name: &str) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Some(raw) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        if !backend_alive(pid, dir, name) {
            return;
        }
        let _ = kill(Pid::from_raw(raw), sig);
        for _ in 0..40 {
            if !backend_alive(pid, dir, name) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// The listeners of a VM: port → where its link points (in the backend's
/// directory, or where a backend started before followed them).
pub fn listeners(dir: &StateDir, name: &str) -> BTreeMap<u32, PathBuf> {
    let mut out = links_in(&legacy_dir(dir, name));
    out.extend(links_in(&dir.vsock_dir(name)));
    out
}

/// The listeners a spec asked for: [`listeners`] without uvmctl's own
/// link to the socket where it hears the guest's `READY=1` (notify.rs).
pub fn spec_listeners(dir: &StateDir, name: &str) -> BTreeMap<u32, PathBuf> {
    let mut out = listeners(dir, name);
    let notify = crate::vm::config::NOTIFY_VSOCK_PORT;
    if out.get(&notify) == Some(&dir.notify_socket(name)) {
        out.remove(&notify);
    }
    out
}

fn links_in(at: &Path) -> BTreeMap<u32, PathBuf> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(at) else {
        return out;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(port) = file
            .to_str()
            .and_then(|f| f.strip_prefix(LINK_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(e.path()) {
            out.insert(port, target);
        }
    }
    out
}

fn link_path(dir: &StateDir, name: &str, port: u32) -> PathBuf {
    dir.vsock_dir(name).join(format!("{LINK_PREFIX}{port}"))
}

/// Relays the guest's connections to `port` to the unix socket `target`.
pub fn link(dir: &StateDir, name: &str, port: u32, target: &Path) -> std::io::Result<()> {
    let link = link_path(dir, name, port);
    let tmp = dir
        .vsock_dir(name)
        .join(format!(".{LINK_PREFIX}{port}.new"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    // Renamed over: a listener's target changes without a moment without one.
    std::fs::rename(&tmp, &link)
}

/// Stops relaying `port`: the guest's next connect to it is refused.
pub fn unlink(dir: &StateDir, name: &str, port: u32) -> std::io::Result<()> {
    let legacy = legacy_dir(dir, name).join(format!("{LINK_PREFIX}{port}"));
    for link in [link_path(dir, name, port), legacy] {
        match std::fs::remove_file(link) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Makes the VM's links exactly `want` (port → resolved listener).
pub fn set_links(dir: &StateDir, name: &str, want: &BTreeMap<u32, PathBuf>) -> std::io::Result<()> {
    for port in listeners(dir, name).keys() {
        if !want.contains_key(port) {
            unlink(dir, name, *port)?;
        }
    }
    for (port, target) in want {
        link(dir, name, *port, target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend an earlier uvmctl started (its sockets in the VM's own
    /// directory) is still known as the VM's, and known as one to replace;
    /// its links still read back.
    #[test]
    fn a_backend_of_the_layout_before_is_known_and_replaced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::new(tmp.path()).expect("state dir");
        std::fs::create_dir_all(dir.vsock_dir("vm")).expect("vm dir");
        let run = |socket: PathBuf| {
            let child = std::process::Command::new("/bin/sh")
                .args(["-c", "sleep 5", "--vm"])
                .arg(format!(
                    "guest-cid=3,socket={},uds-path=x",
                    socket.display()
                ))
                .spawn()
                .expect("a stand-in backend");
            // Until it has exec'd, /proc shows this test's command line.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !std::fs::read(format!("/proc/{}/cmdline", child.id()))
                .is_ok_and(|c| c.windows(4).any(|w| w == b"--vm"))
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            child
        };
        let mut old = run(dir.vm_dir("vm").join("vhost-vsock.sock"));
        let mut new = run(dir.vsock_backend_socket("vm"));
        let (o, n) = (Some(old.id()), Some(new.id()));
        assert!(backend_alive(o, &dir, "vm") && backend_is_legacy(o, &dir, "vm"));
        assert!(backend_alive(n, &dir, "vm") && !backend_is_legacy(n, &dir, "vm"));
        assert!(!backend_alive(o, &dir, "other"));
        let _ = (old.kill(), new.kill(), old.wait(), new.wait());
        std::os::unix::fs::symlink("/srv/l.sock", dir.vm_dir("vm").join("vsock.sock_7"))
            .expect("a link of before");
        assert_eq!(
            listeners(&dir, "vm").get(&7).map(PathBuf::as_path),
            Some(Path::new("/srv/l.sock"))
        );
        unlink(&dir, "vm", 7).expect("unlink");
        assert!(listeners(&dir, "vm").is_empty());
    }

    #[test]
    fn links_follow_the_wanted_listeners_and_read_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::new(tmp.path()).expect("state dir");
        std::fs::create_dir_all(dir.vsock_dir("vm")).expect("vm dir");
        let mut want = BTreeMap::new();
        want.insert(5000, PathBuf::from("/var/lib/uvmctl/a.sock"));
        want.insert(5001, PathBuf::from("/var/lib/uvmctl/b.sock"));
        set_links(&dir, "vm", &want).expect("links");
        assert_eq!(listeners(&dir, "vm"), want);
        want.remove(&5000);
        want.insert(5001, PathBuf::from("/var/lib/uvmctl/c.sock"));
        set_links(&dir, "vm", &want).expect("links");
        assert_eq!(listeners(&dir, "vm"), want);
        unlink(&dir, "vm", 5001).expect("unlink");
        unlink(&dir, "vm", 5001).expect("again: nothing to do");
        assert!(listeners(&dir, "vm").is_empty());
    }

    #[test]
    fn the_launch_arguments_name_the_vms_own_backend_socket() {
        let dir = StateDir::new("/run/uvmctl-test").expect("state dir");
        let a = launch_args(&dir, "web");
        assert_eq!(a[0], "-chardev");
        assert_eq!(
            a[1],
            "socket,id=vsock-chr,path=/run/uvmctl-test/web/vsock/vhost-vsock.sock"
        );
        let device: serde_json::Value = serde_json::from_str(&a[3]).expect("json");
        assert_eq!(device["driver"], "vhost-user-vsock-pci");
        assert_eq!(device["chardev"], CHARDEV_ID);
    }
}
