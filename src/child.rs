//! What every process uvmctl starts inherits: standard input, output and
//! error, and the descriptors uvmctl hands it on purpose; nothing else.
//!
//! uvmctl's caller may hold anything open without close-on-exec (a lock
//! taken with `flock`, `9</etc/shadow`), and uvmctl runs as root: QEMU,
//! its vsock backend, git and a vmservice server must inherit none of it
//! (issue 30). As libvirt's command runner does (`virCommandMassClose`),
//! the child marks every other descriptor close-on-exec just before exec,
//! with one `close_range` call per gap where the kernel has it (Linux
//! 5.11), else one `fcntl` per possible descriptor. Marking rather than
//! closing leaves the standard library's own exec-error pipe working.
//!
//! On Windows a child inherits only handles marked inheritable: the
//! standard library makes none so, and uvmctl hands nothing over there
//! ([`Handed`] has no value), so a child gets its standard handles alone,
//! but for what uvmctl's own caller left inheritable (which Windows gives
//! no way to list); the README's Windows section says so.

#[cfg(unix)]
use std::io;
#[cfg(unix)]
use std::os::fd::RawFd;

/// What a child may be handed: a descriptor on unix; nothing on Windows,
/// where uvmctl starts only git and a remotevm server, which need none.
#[cfg(unix)]
pub type Handed = RawFd;
/// What a child may be handed: nothing, on Windows.
#[cfg(not(unix))]
pub type Handed = std::convert::Infallible;

/// A command for `program` whose process inherits `keep` and nothing
/// else (see [`inherit_only`]). Every process uvmctl starts is made here:
/// a test below finds any other `Command::new` in the library.
pub fn command(program: impl AsRef<std::ffi::OsStr>, keep: Vec<Handed>) -> tokio::process::Command {
    tokio::process::Command::from(std_command(program, keep))
}

/// [`command`] for a process driven from a blocking thread.
#[cfg(not(unix))]
pub fn std_command(
    program: impl AsRef<std::ffi::OsStr>,
    keep: Vec<Handed>,
) -> std::process::Command {
    drop(keep);
    std::process::Command::new(program)
}

/// Ends the process `pid` (a child uvmctl started whose handle another
/// thread holds) at once: SIGKILL, or TerminateProcess.
pub fn kill(pid: u32) {
    #[cfg(unix)]
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    #[cfg(windows)]
    {
        use windows_sys::Win32::Foundation::CloseHandle;
        use windows_sys::Win32::System::Threading::{
            OpenProcess, PROCESS_TERMINATE, TerminateProcess,
        };
        // SAFETY: a process handle opened and closed here.
        unsafe {
            let h = OpenProcess(PROCESS_TERMINATE, 0, pid);
            if !h.is_null() {
                TerminateProcess(h, 1);
                CloseHandle(h);
            }
        }
    }
}

/// [`command`] for a process driven from a blocking thread.
#[cfg(unix)]
pub fn std_command(
    program: impl AsRef<std::ffi::OsStr>,
    keep: Vec<Handed>,
) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(program);
    // SAFETY: the hook runs between fork and exec and only makes system
    // calls; it allocates nothing.
    unsafe {
        cmd.pre_exec(inherit_only(keep));
    }
    cmd
}

#[cfg(unix)]
/// The `pre_exec` hook of a child that inherits `keep` (besides 0, 1 and
/// 2) and nothing else; `keep` loses close-on-exec in the child alone.
///
/// Everything it needs is prepared here, before the fork: in the child it
/// only makes system calls (async-signal-safe) and allocates nothing.
pub fn inherit_only(
    mut keep: Vec<RawFd>,
) -> impl FnMut() -> io::Result<()> + Send + Sync + 'static {
    keep.retain(|&fd| fd > 2);
    keep.sort_unstable();
    keep.dedup();
    // The fallback's bound: no descriptor is at or above the soft limit
    // (descriptors opened before it was lowered are the rare exception the
    // kernel path does not have).
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1 << 16, |(soft, _)| soft.min(1 << 20)) as RawFd;
    move || {
        let mut from: RawFd = 3;
        for &fd in &keep {
            cloexec_range(from, fd - 1, limit)?;
            // SAFETY: fcntl on a descriptor number; no memory is touched.
            if unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) } == -1 {
                return Err(io::Error::last_os_error());
            }
            from = fd + 1;
        }
        cloexec_range(from, RawFd::MAX, limit)
    }
}

#[cfg(unix)]
/// Marks `first..=last` close-on-exec.
fn cloexec_range(first: RawFd, last: RawFd, limit: RawFd) -> io::Result<()> {
    if first > last {
        return Ok(());
    }
    // SAFETY: a system call on descriptor numbers; no memory is passed.
    let done = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            first as nix::libc::c_uint,
            last as nix::libc::c_uint,
            nix::libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if done == 0 {
        return Ok(());
    }
    // ENOSYS (before 5.9) or EINVAL (no CLOSE_RANGE_CLOEXEC before 5.11).
    cloexec_each(first, last, limit);
    Ok(())
}

#[cfg(unix)]
/// [`cloexec_range`] one descriptor at a time, below `limit`.
fn cloexec_each(first: RawFd, last: RawFd, limit: RawFd) {
    for fd in first..=last.min(limit.saturating_sub(1)) {
        // SAFETY: as above; a descriptor that is not open answers EBADF.
        unsafe {
            let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
            if flags >= 0 && flags & nix::libc::FD_CLOEXEC == 0 {
                nix::libc::fcntl(fd, nix::libc::F_SETFD, flags | nix::libc::FD_CLOEXEC);
            }
        }
    }
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::os::unix::process::CommandExt;

    /// A descriptor without close-on-exec, as a caller's `9<file` is.
    fn inheritable(path: &std::path::Path) -> RawFd {
        let fd = std::fs::File::open(path).expect("open").into_raw_fd();
        // SAFETY: clearing a flag of a descriptor this test owns.
        assert_ne!(unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) }, -1);
        fd
    }

    /// What a child's descriptors point at, from its own /proc/self/fd.
    fn child_sees(cmd: &mut std::process::Command) -> String {
        let out = cmd.args(["-l", "/proc/self/fd"]).output().expect("ls runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn a_child_gets_only_what_it_is_handed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        let meant = dir.path().join("meant");
        std::fs::write(&secret, b"s").expect("write");
        std::fs::write(&meant, b"m").expect("write");
        let leaked = inheritable(&secret);
        let handed = std::fs::File::open(&meant).expect("open");
        let secret = secret.display().to_string();
        let meant = meant.display().to_string();
        // Without the hook, the caller's descriptor reaches the child.
        let plain = child_sees(&mut std::process::Command::new("ls"));
        assert!(plain.contains(&secret), "the test's premise: {plain}");
        assert!(!plain.contains(&meant), "close-on-exec by default: {plain}");
        let mut cmd = std::process::Command::new("ls");
        // SAFETY: the hook only makes system calls.
        unsafe {
            cmd.pre_exec(inherit_only(vec![handed.as_raw_fd()]));
        }
        let seen = child_sees(&mut cmd);
        assert!(!seen.contains(&secret), "{seen}");
        assert!(seen.contains(&meant), "{seen}");
        // SAFETY: closing the descriptor this test made.
        unsafe { nix::libc::close(leaked) };
    }

    /// Every process the library starts goes through [`command`].
    #[test]
    fn no_other_module_makes_a_command() {
        fn walk(dir: &std::path::Path, bad: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).expect("read src").flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, bad);
                } else if p.extension().is_some_and(|x| x == "rs")
                    && !p.ends_with("child.rs")
                    && p.file_name().is_none_or(|n| n != "tests.rs")
                {
                    let text = std::fs::read_to_string(&p).expect("read");
                    // The tests at the bottom may start what they like.
                    let code = text
                        .split("#[cfg(test)]\nmod tests")
                        .next()
                        .unwrap_or_default();
                    if code.contains("Command::new(") {
                        bad.push(p.display().to_string());
                    }
                }
            }
        }
        let mut bad = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut bad,
        );
        assert!(bad.is_empty(), "Command::new outside crate::child: {bad:?}");
    }

    #[test]
    fn the_fallback_marks_the_same_descriptors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").expect("write");
        let fd = inheritable(&f);
        let mut cmd = std::process::Command::new("ls");
        let limit = fd + 10;
        // SAFETY: as in inherit_only, only system calls.
        unsafe {
            cmd.pre_exec(move || {
                // As on a kernel without close_range.
                cloexec_each(3, RawFd::MAX, limit);
                Ok(())
            });
        }
        let seen = child_sees(&mut cmd);
        assert!(!seen.contains(&f.display().to_string()), "{seen}");
        // SAFETY: closing the descriptor this test made.
        unsafe { nix::libc::close(fd) };
    }
}
