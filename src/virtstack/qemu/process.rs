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
    /// No new privileges and [`confinement`]'s seccomp filters (for a
    /// program without a sandbox of its own: the vsock backend; QEMU has
    /// `-sandbox`).
    pub confine: bool,
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
    if s.confine {
        let filters = confinement()?;
        // SAFETY: runs in the child after the identity change (the hooks
        // run in order); prctl and seccomp are system calls on filters
        // compiled before the fork, and nothing is allocated.
        unsafe {
            command.pre_exec(move || {
                for f in filters {
                    // An error without allocating (this is a forked child).
                    seccompiler::apply_filter(f)
                        .map_err(|_| std::io::Error::from_raw_os_error(nix::libc::EPERM))?;
                }
                Ok(())
            });
        }
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

/// The seccomp filters of a confined process, compiled once: QEMU's
/// `-sandbox` (`obsolete`, `elevateprivileges`, `spawn`,
/// `resourcecontrol`) is the model, for a program that has none. Whatever
/// is not listed is allowed; what is listed fails with `EPERM`, except
/// `clone3`, which fails with `ENOSYS` so the C library falls back to
/// `clone`, whose flags a filter can see (threads yes, processes no).
/// `execve` stays allowed: the filter is in force before the program is.
///
/// # Errors
/// When the filters cannot be built (never, for this fixed list).
pub fn confinement() -> std::io::Result<&'static [seccompiler::BpfProgram]> {
    static FILTERS: std::sync::OnceLock<Result<Vec<seccompiler::BpfProgram>, String>> =
        std::sync::OnceLock::new();
    FILTERS
        .get_or_init(|| build_confinement().map_err(|e| e.to_string()))
        .as_deref()
        .map_err(|e| std::io::Error::other(format!("seccomp filter: {e}")))
}

fn build_confinement() -> Result<Vec<seccompiler::BpfProgram>, seccompiler::BackendError> {
    use nix::libc;
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    use std::collections::BTreeMap;
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let denied = [
        // New processes, privileges, other processes' memory.
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_setuid,
        libc::SYS_setgid,
        libc::SYS_setreuid,
        libc::SYS_setregid,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_setgroups,
        libc::SYS_setfsuid,
        libc::SYS_setfsgid,
        libc::SYS_capset,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        // The system's: mounts, namespaces, modules, kexec, BPF, keys.
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_personality,
        // Other ways to reach other processes or the kernel's surface.
        libc::SYS_pidfd_getfd,
        libc::SYS_process_madvise,
        libc::SYS_kcmp,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        // Resource control, as QEMU's sandbox refuses it.
        libc::SYS_sched_setscheduler,
        libc::SYS_sched_setparam,
        libc::SYS_setpriority,
    ];
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        denied.iter().map(|n| (*n, Vec::new())).collect();
    // clone without CLONE_THREAD makes a process; with it, a thread.
    let clone_thread = u64::try_from(libc::CLONE_THREAD).unwrap_or(0);
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(clone_thread),
            0,
        )?])?],
    );
    let eperm = u32::try_from(libc::EPERM).unwrap_or(1);
    let enosys = u32::try_from(libc::ENOSYS).unwrap_or(38);
    let main = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(eperm),
        arch,
    )?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(enosys),
        arch,
    )?;
    Ok(vec![main.try_into()?, clone3.try_into()?])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `program` with `args` confined, as root here; what it wrote to
    /// its standard error.
    async fn confined(program: &str, args: &[&str]) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("log")).expect("log");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = spawn(Spawn {
            program: Path::new(program),
            args: &args,
            dir: dir.path(),
            log,
            user: None,
            memlock: None,
            inherit: Vec::new(),
            env: &[],
            confine: true,
        })
        .expect("spawn");
        child.wait_with_output().await.expect("wait");
        std::fs::read_to_string(dir.path().join("log")).expect("log")
    }

    /// A confined child keeps threads and exec, and is refused a new
    /// process and a change of identity.
    #[tokio::test]
    async fn a_confined_child_cannot_fork_or_change_identity() {
        // Builtins only (no new process), then a subshell, which forks.
        let said = confined(
            "/bin/sh",
            &[
                "-c",
                "while read -r l; do case $l in NoNewPrivs*|Seccomp:*) echo \"$l\" >&2;; esac; done < /proc/self/status; (true; true) && echo forked >&2",
            ],
        )
        .await
        .replace('\t', " ");
        assert!(said.contains("NoNewPrivs: 1"), "{said}");
        assert!(said.contains("Seccomp: 2"), "{said}");
        assert!(
            said.contains("Cannot fork") && !said.contains("\nforked"),
            "{said}"
        );
        // Without the filter, this root child's setuid(0) would do.
        let said = confined(
            "/usr/bin/python3",
            &[
                "-c",
                "import os, sys\ntry:\n    os.setuid(0)\n    sys.stderr.write('setuid-ok')\nexcept OSError as e:\n    sys.stderr.write('setuid-refused %d' % e.errno)",
            ],
        )
        .await;
        assert_eq!(said, format!("setuid-refused {}", nix::libc::EPERM));
    }
}
