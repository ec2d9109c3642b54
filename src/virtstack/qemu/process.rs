//! The one place the QEMU virtstack starts processes (QEMU, the vsock
//! backend): no shell, arguments as whole argv elements, stdin and stdout
//! closed, stderr to the VM's own log, its own process group (a Ctrl+C
//! meant for uvmctl must not reach the VMs), the service user's identity,
//! and exactly the descriptors it is handed.

use super::user::{MemLock, ServiceUser};
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
    /// How it gets to lock its memory, when it pins guest memory.
    pub memlock: Option<&'a MemLock>,
    /// Descriptors it inherits besides stdin, stdout and stderr: nothing
    /// else, not even what uvmctl's own caller left open.
    pub inherit: Vec<RawFd>,
    /// Environment variables to set.
    pub env: &'a [(&'a str, &'a str)],
}

/// Starts `s`; it outlives uvmctl (not killed on drop).
pub fn spawn(s: Spawn<'_>) -> std::io::Result<tokio::process::Child> {
    let mut command = crate::child::command(s.program, s.inherit);
    let ipc_lock = match s.memlock {
        None | Some(MemLock::Inherent) => false,
        Some(MemLock::Ambient) => true,
        Some(MemLock::SoftLimit) => {
            // SAFETY: the hook makes two system calls on a local struct.
            unsafe {
                command.pre_exec(super::user::raise_soft_memlock());
            }
            false
        }
        Some(MemLock::Refused(why)) => return Err(std::io::Error::other(why.clone())),
    };
    if let Some(user) = s.user {
        user.apply(&mut command, ipc_lock);
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
