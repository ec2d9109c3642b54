//! The console log, bounded: what a guest writes to COM1 goes through a
//! pipe to a small writer process of uvmctl's, as QEMU's output goes to
//! virtlogd under libvirt. QEMU appends to a file it is handed without
//! limit, and a guest flooding its console filled the state directory
//! (memory, under /run) at 720 KiB/s (issue 31). The writer starts a new
//! file at [`ROTATE_AT`] bytes and keeps the one before: a launch keeps at
//! most `console.log.old` and `console.log`, and the launch before it
//! `console.log.1`, so a VM's console takes at most about 3 × [`ROTATE_AT`]
//! (each file may pass it by one read, 16 KiB).
//!
//! The writer is forked from uvmctl (no program to find, nothing to exec),
//! runs only system calls on what it was handed (no allocation, no lock: a
//! fork of a threaded process may run nothing else), leaves uvmctl's
//! session and process group, and ends when QEMU closes its end of the pipe.

use super::state::StateDir;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// The size at which the console log starts a new file.
pub const ROTATE_AT: u64 = 1 << 20;

/// The file the earlier part of this launch's console was moved to.
pub const OLD_SUFFIX: &str = ".old";

/// Starts VM `name`'s console log for a new launch: the last launch's
/// console becomes `console.log.1`, and a writer process takes what comes
/// through a pipe. Returns the pipe's write end, for QEMU.
///
/// # Errors
/// When the directory, the log or the pipe cannot be made, or the writer
/// cannot be started.
pub fn start(dir: &StateDir, name: &str) -> io::Result<OwnedFd> {
    start_at(dir, name, ROTATE_AT)
}

fn start_at(dir: &StateDir, name: &str, rotate_at: u64) -> io::Result<OwnedFd> {
    let log = dir.console_log(name);
    let old = old_log(dir, name);
    let _ = std::fs::rename(&log, dir.previous_console_log(name));
    let _ = std::fs::remove_file(&old);
    let file = crate::hostfs::open_state_log(&log, 0o600)?;
    let vm_dir = std::fs::File::from(nix::fcntl::open(
        &dir.vm_dir(name),
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?);
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let names = Names {
        log: name_of(&log)?,
        old: name_of(&old)?,
        title: title(&dir.vm_dir(name)),
        args: own_args(),
    };
    spawn_writer(
        read.as_raw_fd(),
        vm_dir.as_raw_fd(),
        file.as_raw_fd(),
        &names,
        rotate_at,
    )?;
    // Ours close here: the writer has its copies, QEMU gets `write`.
    Ok(write)
}

/// Where the earlier part of this launch's console is.
pub fn old_log(dir: &StateDir, name: &str) -> std::path::PathBuf {
    let mut p = dir.console_log(name).into_os_string();
    p.push(OLD_SUFFIX);
    p.into()
}

/// The file names the writer renames and opens, in the VM's directory, and
/// what it shows as its command line.
struct Names {
    log: CString,
    old: CString,
    title: Vec<u8>,
    /// Where this process's arguments are (`/proc/self/stat`'s `arg_start`
    /// and `arg_end`): a fork shows its parent's command line, which would
    /// read as a second `uvmctl watch` in `ps`.
    args: Option<(usize, usize)>,
}

/// The writer's command line: what it is, for which VM.
fn title(vm_dir: &std::path::Path) -> Vec<u8> {
    let mut t = b"uvmctl-conlog ".to_vec();
    t.extend_from_slice(vm_dir.as_os_str().as_bytes());
    t
}

/// `arg_start` and `arg_end` of this process (fields 48 and 49 of
/// `/proc/self/stat`, counted after the parenthesised name).
fn own_args() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(45);
    let start = fields.next()?.parse().ok()?;
    let end = fields.next()?.parse().ok()?;
    (end > start).then_some((start, end))
}

fn name_of(path: &std::path::Path) -> io::Result<CString> {
    let file = path
        .file_name()
        .ok_or_else(|| io::Error::other("a log path without a file name"))?;
    CString::new(file.as_bytes()).map_err(io::Error::other)
}

/// Forks the writer (twice: it is nobody's child to reap) and waits for
/// the first child, which exits at once.
fn spawn_writer(
    read: RawFd,
    dir: RawFd,
    log: RawFd,
    names: &Names,
    rotate_at: u64,
) -> io::Result<()> {
    use nix::libc;
    // SAFETY: after fork, the children make only system calls on values
    // prepared here (descriptors, C strings, integers) and end with
    // `_exit`: no allocation, lock or unwinding.
    unsafe {
        let first = libc::fork();
        if first < 0 {
            return Err(io::Error::last_os_error());
        }
        if first == 0 {
            libc::setsid();
            // The raw system call, not the C library's fork (whose atfork
            // handlers may take locks).
            let writer = libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
            if writer == 0 {
                writer_main(read, dir, log, names, rotate_at);
            }
            libc::_exit(0);
        }
        let mut status = 0;
        while libc::waitpid(first, &mut status, 0) < 0 {
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The writer: copies the pipe into the log, starting a new file at
/// `rotate_at` bytes; a write that fails (a full disk) drops those bytes
/// rather than stalling QEMU. Never returns.
///
/// # Safety
/// Only in a child just forked: system calls alone.
unsafe fn writer_main(read: RawFd, dir: RawFd, mut log: RawFd, names: &Names, rotate_at: u64) -> ! {
    use nix::libc;
    // SAFETY: system calls on integers and on buffers of this frame.
    unsafe {
        // Signals as a plain process has them (uvmctl's handlers write to
        // descriptors this process no longer has).
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_NAME, c"uvmctl-conlog".as_ptr(), 0, 0, 0);
        // The arguments' memory is this process's own copy: overwritten,
        // `/proc/PID/cmdline` says what the process is.
        if let Some((start, end)) = names.args {
            let len = end - start;
            let area = start as *mut u8;
            std::ptr::write_bytes(area, 0, len);
            let n = names.title.len().min(len.saturating_sub(1));
            std::ptr::copy_nonoverlapping(names.title.as_ptr(), area, n);
        }
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        close_all_but([read, dir, log]);
        let mut written: u64 = 0;
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = libc::read(read, buf.as_mut_ptr().cast(), buf.len());
            if n == 0 {
                libc::_exit(0);
            }
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                libc::_exit(1);
            }
            let n = n.unsigned_abs();
            let mut at = 0;
            while at < n {
                let w = libc::write(log, buf.as_ptr().add(at).cast(), n - at);
                if w <= 0 {
                    break;
                }
                at += w.unsigned_abs();
            }
            written += n as u64;
            if written >= rotate_at {
                // A new file once the old one is moved aside; where either
                // step fails (no inode left, the directory gone), the file
                // in hand starts over: the bound holds, the old part goes.
                let fresh = if libc::renameat(dir, names.log.as_ptr(), dir, names.old.as_ptr()) == 0
                {
                    libc::openat(
                        dir,
                        names.log.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC
                            | libc::O_APPEND,
                        0o600,
                    )
                } else {
                    -1
                };
                if fresh >= 0 {
                    libc::close(log);
                    log = fresh;
                } else {
                    libc::ftruncate(log, 0);
                    libc::lseek(log, 0, libc::SEEK_SET);
                }
                written = 0;
            }
        }
    }
}

/// Closes every descriptor but `keep`: standard input, output and error
/// are uvmctl's caller's, closed too.
///
/// # Safety
/// Only in a child just forked.
unsafe fn close_all_but(mut keep: [RawFd; 3]) {
    use nix::libc;
    keep.sort_unstable();
    let mut from: libc::c_uint = 0;
    // SAFETY: close_range and close on descriptor numbers.
    unsafe {
        for k in keep {
            let Ok(k) = libc::c_uint::try_from(k) else {
                continue;
            };
            if k > from {
                close_range(from, k - 1);
            }
            from = k + 1;
        }
        close_range(from, libc::c_uint::MAX);
    }
}

/// `close_range`, or one `close` each where the kernel lacks it.
///
/// # Safety
/// Only in a child just forked.
unsafe fn close_range(first: nix::libc::c_uint, last: nix::libc::c_uint) {
    use nix::libc;
    // SAFETY: system calls on descriptor numbers.
    unsafe {
        if libc::syscall(libc::SYS_close_range, first, last, 0) != 0 {
            let end = last.min(65_535);
            let mut fd = first;
            while fd <= end {
                libc::close(fd as libc::c_int);
                fd += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A flood through the pipe leaves the log and its older part each
    /// under the bound, the newest bytes in the log, and the writer gone
    /// once the pipe closes.
    #[test]
    fn a_flood_is_kept_to_two_files_of_the_bound() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::new(tmp.path().join("state")).expect("state");
        dir.create_vm_dir("vm", None).expect("vm dir");
        std::fs::write(dir.console_log("vm"), b"last launch\n").expect("previous");
        let write = start_at(&dir, "vm", 64 << 10).expect("start");
        let mut pipe = std::fs::File::from(write);
        let line = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
        for _ in 0..(1 << 20) / line.len() {
            pipe.write_all(line).expect("write");
        }
        pipe.write_all(b"the end\n").expect("write");
        drop(pipe);
        // The writer ends once it read everything.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let ended = || {
            std::fs::read_to_string(dir.console_log("vm")).is_ok_and(|t| t.ends_with("the end\n"))
        };
        while !ended() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(ended(), "the newest bytes are in console.log");
        let size = |p: std::path::PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
        assert!(size(dir.console_log("vm")) <= 64 << 10);
        assert!(size(old_log(&dir, "vm")) >= 64 << 10 && size(old_log(&dir, "vm")) < 80 << 10);
        assert_eq!(
            std::fs::read(dir.previous_console_log("vm")).expect("kept"),
            b"last launch\n"
        );
    }
}
