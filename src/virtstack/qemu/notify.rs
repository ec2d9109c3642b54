//! A guest's `READY=1`, for a `notify` probe of `spec.health`: systemd's
//! `sd_notify` over vsock, as systemd-vmspawn sets it up. uvmctl hands the
//! guest the `vmm.notify_socket` credential as an SMBIOS type 11 string
//! (`io.systemd.credential:vmm.notify_socket=vsock-stream:2:<port>`), so a
//! stock systemd guest needs nothing else; the test guest's init does the
//! same from its own vsock client.
//!
//! The guest's connection to the host's port reaches the vsock backend,
//! which relays it to the unix socket `<vm>/vsock/vsock.sock_<port>`: a
//! link (like a `vmSockets` listener's) to `<vm>/notify.sock`, which the
//! uvmctl process that launched the VM listens on. What it hears is kept
//! in `<vm>/notify.ready` (bounded, control characters dropped), so the
//! probe reads a file, whoever asks; each launch starts without one.
//!
//! Bounds: a connection is read for at most [`READ_DEADLINE`] and
//! [`MAX_MESSAGE_BYTES`]; the listener takes at most [`MAX_CONNECTIONS`],
//! and stops at the first `READY=1`.

use super::state::StateDir;
use crate::vm::config::NOTIFY_VSOCK_PORT;
use std::io;
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The most of one notification read (systemd's are a few lines).
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// How long one connection may take to say what it says.
pub const READ_DEADLINE: Duration = Duration::from_secs(10);
/// Connections taken before the listener gives up on a guest that never
/// says `READY=1`.
pub const MAX_CONNECTIONS: usize = 64;
/// How much of what the guest said is kept.
const MAX_KEPT_BYTES: usize = 512;

/// The `-smbios` value that hands the guest its `vmm.notify_socket`.
pub fn smbios_credential() -> String {
    format!(
        "type=11,value=io.systemd.credential:vmm.notify_socket=vsock-stream:2:{NOTIFY_VSOCK_PORT}"
    )
}

/// The assignments of an `sd_notify` message that uvmctl keeps
/// (`READY`, `STATUS`, `ERRNO`), one per line, without control
/// characters; `None` when it does not say `READY=1`. Only whole lines
/// count, and the last one too once the sender is done (`ended`): a
/// `READY=1` read so far may still become `READY=10`.
pub fn ready_in(message: &[u8], ended: bool) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let whole = if ended {
        &text[..]
    } else {
        text.rfind('\n').map_or("", |end| &text[..end])
    };
    let mut ready = false;
    let mut kept = String::new();
    for line in whole.split('\n') {
        let line = line.trim_end_matches('\r');
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key == "READY" && value == "1" {
            ready = true;
        }
        if matches!(key, "READY" | "STATUS" | "ERRNO") {
            let clean: String = line.chars().filter(|c| !c.is_control()).collect();
            if kept.len() + clean.len() < MAX_KEPT_BYTES {
                if !kept.is_empty() {
                    kept.push(' ');
                }
                kept.push_str(&clean);
            }
        }
    }
    ready.then_some(kept)
}

/// Listens for `name`'s `READY=1` for this launch: forgets what an earlier
/// launch heard, binds `<vm>/notify.sock` (connectable by the VM's backend,
/// which runs in `group`, or as uvmctl's own user without one) and links
/// the guest's port to it. The task ends at the first `READY=1` or after
/// [`MAX_CONNECTIONS`].
///
/// # Errors
/// When the socket or its link cannot be made.
pub fn listen(
    dir: &StateDir,
    name: &str,
    group: Option<u32>,
) -> io::Result<tokio::task::JoinHandle<()>> {
    let ready = dir.notify_ready(name);
    match std::fs::remove_file(&ready) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let socket = dir.notify_socket(name);
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&socket)?;
    // In the VM's directory (root's, 0710 to the VM's group), which no
    // other user can change: the path is this socket.
    if let Some(gid) = group {
        std::os::unix::fs::chown(&socket, None, Some(gid))?;
    }
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    super::vsock::link(dir, name, NOTIFY_VSOCK_PORT, &socket)?;
    let vm = name.to_string();
    Ok(tokio::spawn(async move {
        for _ in 0..MAX_CONNECTIONS {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
            let mut got = 0;
            let mut ended = false;
            let read = async {
                while got < buf.len() {
                    match conn.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => {
                            ended = true;
                            break;
                        }
                        Ok(n) => got += n,
                    }
                    if ready_in(&buf[..got], false).is_some() {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(READ_DEADLINE, read).await;
            if let Some(said) = ready_in(&buf[..got], ended) {
                tracing::info!(%vm, said, "the guest said READY=1");
                if let Err(e) = crate::hostfs::replace_file(&ready, said.as_bytes(), 0o600) {
                    tracing::warn!(%vm, "cannot keep the guest's READY=1: {e}");
                }
                return;
            }
        }
        tracing::warn!(%vm, "{MAX_CONNECTIONS} connections to the notify port without READY=1; no longer listening");
    }))
}

/// What the guest said with its `READY=1` in this launch, if it did.
pub fn heard(path: &Path) -> Option<String> {
    let bytes = crate::hostfs::read_state_file(path, MAX_KEPT_BYTES as u64).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ready_1_counts_and_what_is_kept_is_bounded_and_clean() {
        assert_eq!(ready_in(b"READY=1\n", false), Some("READY=1".into()));
        assert_eq!(
            ready_in(b"STATUS=up\x1b[2J\nREADY=1\nMAINPID=1\n", false),
            Some("STATUS=up[2J READY=1".into())
        );
        assert_eq!(ready_in(b"READY=0\n", false), None);
        assert_eq!(ready_in(b"STATUS=starting\n", false), None);
        assert_eq!(ready_in(b"XREADY=1", true), None);
        // A line not finished yet may still say READY=10.
        assert_eq!(ready_in(b"READY=1", false), None);
        assert_eq!(ready_in(b"READY=1", true), Some("READY=1".into()));
        assert_eq!(ready_in(b"READY=10\n", false), None);
        let long = format!("STATUS={}\nREADY=1\n", "x".repeat(4000));
        assert_eq!(ready_in(long.as_bytes(), false), Some("READY=1".into()));
        assert!(smbios_credential().ends_with(&format!("vsock-stream:2:{NOTIFY_VSOCK_PORT}")));
    }

    /// The listener hears READY=1 over its socket, keeps it for the probe,
    /// and a new launch forgets it.
    #[tokio::test]
    async fn a_ready_over_the_socket_is_kept_until_the_next_launch() {
        use tokio::io::AsyncWriteExt;
        let (_tmp, qemu) = super::super::test_host();
        let dir = &qemu.options().state_dir;
        dir.create_vm_dir("n", None).expect("vm dir");
        dir.create_vsock_dir("n", None).expect("vsock dir");
        let task = listen(dir, "n", None).expect("listens");
        assert_eq!(heard(&dir.notify_ready("n")), None);
        // A connection that says something else is read and dropped.
        let mut c = tokio::net::UnixStream::connect(
            dir.vsock_dir("n")
                .join(format!("vsock.sock_{NOTIFY_VSOCK_PORT}")),
        )
        .await
        .expect("through the link");
        c.write_all(b"STATUS=booting\n").await.expect("write");
        drop(c);
        let mut c = tokio::net::UnixStream::connect(dir.notify_socket("n"))
            .await
            .expect("connect");
        c.write_all(b"STATUS=up\nREADY=1\n").await.expect("write");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends at READY=1")
            .expect("task");
        assert_eq!(
            heard(&dir.notify_ready("n")).as_deref(),
            Some("STATUS=up READY=1")
        );
        let again = listen(dir, "n", None).expect("listens again");
        assert_eq!(heard(&dir.notify_ready("n")), None, "a new launch forgets");
        again.abort();
    }
}
