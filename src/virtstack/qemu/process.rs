//! The one place the QEMU virtstack starts processes (QEMU, the vsock
//! backend): no shell, arguments as whole argv elements, stdin and stdout
//! closed, stderr to the VM's own log, its own process group (a Ctrl+C
//! meant for uvmctl must not reach the VMs), the service user's identity,
//! and exactly the descriptors it is handed.

use super::user::ServiceUser;
use std::os::fd::RawFd;
use std::path::Path;

/// A process to start.
pub struct Spawn<'a> {
    /// The program.
    pub program: &'a Path,
    /// Its arguments.
    pub args: &'a [String],
    /// Its working directory (the VM's directory).
    pub dir: &'a Path,
    /// Where its standard error goes.
    pub log: std::fs::File,
    /// Who it runs as (`None`: as uvmctl).
    pub user: Option<&'a ServiceUser>,
    /// Lift the locked-memory limit first (pinned guest memory).
    pub memlock: bool,
    /// Descriptors it inherits (everything else uvmctl opens is
    /// close-on-exec).
    pub inherit: Vec<RawFd>,
    /// Environment variables to set.
    pub env: &'a [(&'a str, &'a str)],
}

/// Starts `s`; it outlives uvmctl (not killed on drop).
pub fn spawn(s: Spawn<'_>) -> std::io::Result<tokio::process::Child> {
    let mut command = tokio::process::Command::new(s.program);
    let inherit = s.inherit;
    if !inherit.is_empty() {
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls fcntl, which is async-signal-safe; it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                // Cleared in the child alone: the parent's copies stay
                // close-on-exec.
                for &fd in &inherit {
                    if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    if let Some(user) = s.user {
        user.apply(&mut command, s.memlock);
    }
    command
        .args(s.args)
        .current_dir(s.dir)
        .envs(s.env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(s.log)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
}
