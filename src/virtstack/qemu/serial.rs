//! Serial console listeners, connected by uvmctl and handed to QEMU.
//!
//! QEMU runs as the service user, and a listener's owner (hcsshim's client,
//! an operator's relay) need not know that user exists: a socket root made
//! with the default umask (`srwxr-xr-x`) is closed to it (issue 30). So, as
//! for every other host file, uvmctl connects itself (as root, to a listener
//! under an allowed root, in a directory only root can change) and hands QEMU
//! the connected socket: `-chardev socket,fd=N` at launch, `getfd` and
//! `chardev-change` later. A listener not there at launch leaves the port on
//! a `null` backend until it is.
//!
//! QEMU cannot reconnect a socket it was handed, so whoever follows the VM
//! (a watcher's event subscription, `serve`) reconnects a port whose
//! listener went away, once the listener is back: [`reconnect`], once a
//! second. Without a follower a port stays disconnected until the next
//! launch.

use super::qmp::{Qmp, QmpError};
use serde_json::{Value, json};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

/// The chardev id of serial port `port` (COM1 is 0).
pub fn chardev_id(port: u32) -> String {
    format!("serial{port}")
}

/// Connects to the listener at `path` (resolved and checked by the
/// caller), never waiting: a listener whose backlog is full is "not there
/// now", like one that is not listening at all.
///
/// # Errors
/// When nothing accepts at `path` now.
pub fn connect(path: &Path) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    // QEMU sets the modes it wants; a blocking socket is the usual start.
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
    let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
    flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(fd)
}

/// The backend a port's chardev gets over QMP for the connected socket QEMU
/// holds under `fdname`; `log`: COM1's console log (an fd set path).
fn socket_backend(fdname: &str, log: Option<&str>) -> Value {
    let mut data = json!({
        "addr": {"type": "fd", "data": {"str": fdname}},
        "server": false,
    });
    if let Some(log) = log {
        data["logfile"] = json!(log);
        data["logappend"] = json!(true);
    }
    json!({"type": "socket", "data": data})
}

/// Whether QEMU's `query-chardev` filename says the port has no listener:
/// the peer went away (`disconnected:…`) or it never had one (`null`).
fn unconnected(filename: &str) -> bool {
    filename.starts_with("disconnected") || filename == "null"
}

/// For each `(port, listener)` whose chardev has no listener now, connects
/// to the listener (`resolve` checks its path again) and gives QEMU the
/// socket; COM1 keeps writing to its console log (`log`). Returns the ports
/// reconnected.
///
/// # Errors
/// When QMP fails; a listener still not there is no error.
pub async fn reconnect(
    q: &Qmp,
    listeners: &[(u32, std::path::PathBuf)],
    log: Option<&str>,
    resolve: &(dyn Fn(&Path) -> Option<std::path::PathBuf> + Send + Sync),
) -> Result<Vec<u32>, QmpError> {
    if listeners.is_empty() {
        return Ok(Vec::new());
    }
    let chardevs = q.execute("query-chardev", None).await?;
    let filename = |id: &str| {
        chardevs
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["label"] == id)
            .and_then(|c| c["filename"].as_str().map(str::to_string))
    };
    let mut done = Vec::new();
    for (port, listener) in listeners {
        let id = chardev_id(*port);
        if !filename(&id).is_some_and(|f| unconnected(&f)) {
            continue;
        }
        let Some(path) = resolve(listener) else {
            continue;
        };
        let Ok(conn) = connect(&path) else {
            continue;
        };
        let fdname = format!("{id}-listener");
        q.send_fd(&fdname, conn.as_fd()).await?;
        let backend = socket_backend(&fdname, if *port == 0 { log } else { None });
        if let Err(e) = q
            .execute(
                "chardev-change",
                Some(json!({"id": id, "backend": backend})),
            )
            .await
        {
            let _ = q.execute("closefd", Some(json!({"fdname": fdname}))).await;
            return Err(e);
        }
        done.push(*port);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_without_its_listener_is_told_from_qemus_filename() {
        assert!(unconnected("disconnected:fd:4"));
        assert!(unconnected("null"));
        assert!(!unconnected("unix:"));
        assert!(!unconnected("unix:/run/uvmctl/web/console.sock,server=on"));
    }

    #[test]
    fn com1_keeps_its_log_across_a_reconnect() {
        let b = socket_backend("serial0-listener", Some("/dev/fdset/1000"));
        assert_eq!(b["data"]["addr"]["data"]["str"], "serial0-listener");
        assert_eq!(b["data"]["server"], false);
        assert_eq!(b["data"]["logfile"], "/dev/fdset/1000");
        assert_eq!(b["data"]["logappend"], true);
        let b = socket_backend("serial1-listener", None);
        assert!(b["data"].get("logfile").is_none());
    }

    #[test]
    fn a_listener_that_is_not_there_is_not_waited_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.sock");
        assert!(connect(&path).is_err());
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let fd = connect(&path).expect("connects");
        let (peer, _) = l.accept().expect("accepted");
        drop(peer);
        drop(fd);
    }
}
