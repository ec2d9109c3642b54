//! The host's file system as uvmctl, running as root, may trust it.
//!
//! Three rules, after sshd's StrictModes and libvirt's descriptor passing:
//!
//! - A directory uvmctl relies on (an allowed root, the state root, the
//!   directory of a socket a VM keeps using) must be one nobody but root (or
//!   the user running uvmctl) can change: it and every directory on the way
//!   to it owned by root or that user and not writable by group or others. A
//!   sticky directory on the way (like `/tmp`) is acceptable, because others
//!   cannot rename or remove what root owns inside it.
//! - A file a VM uses is opened once, by uvmctl, through a resolution that
//!   cannot leave its root (`openat2` with `RESOLVE_BENEATH`, else an
//!   `O_NOFOLLOW` walk), and checked on the open descriptor, which is what
//!   QEMU then gets.
//! - A file uvmctl creates in its state is created with `O_NOFOLLOW` (and
//!   `O_EXCL` for temporary names), with an explicit mode, so a planted link
//!   is an error, never a target.
//!
//! On Windows the same three rules hold, in its terms (`windows.rs`): a
//! trusted directory is owned by Administrators, SYSTEM, TrustedInstaller
//! or uvmctl's own user, and its DACL grants nobody else a right to change
//! it ([`acl`] decides, from the descriptor's owner and entries); a
//! reparse point (symbolic link, junction) on the way is refused; files
//! are opened with `FILE_FLAG_OPEN_REPARSE_POINT` and checked on the
//! handle; a directory uvmctl makes gets a protected DACL of its own.
//!
//! This module names nothing else of the crate: everything above may use it.

#[cfg(unix)]
mod unix;
#[cfg(unix)]
pub use unix::*;
#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub use windows::*;
pub mod acl;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a directory cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// Someone other than root (or uvmctl's own user) could change it.
    #[error(
        "{path}: owned by uid {uid} with mode {mode:04o}: {why}; uvmctl refuses directories others could change (make it root's and not writable by group or others)"
    )]
    Untrusted {
        /// The directory (or link) that fails.
        path: String,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Someone other than an administrator (or uvmctl's own user) could
    /// change it, as its Windows security descriptor says.
    #[error(
        "{path}: owned by {owner}: {why}; uvmctl refuses directories a non-administrator could change (make it owned by Administrators or SYSTEM, granting others at most read and execute)"
    )]
    UntrustedAcl {
        /// The directory (or reparse point) that fails.
        path: String,
        /// Its owner: account name and SID.
        owner: String,
        /// What is wrong with it.
        why: String,
    },
    /// It cannot be looked at.
    #[error("{path}: {reason}")]
    Unreadable {
        /// The path.
        path: String,
        /// The OS error.
        reason: String,
    },
}

/// A temporary name beside `path` no other writer uses: pid and a
/// process-wide counter.
fn temp_name(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Up to `limit` bytes of `file` from byte `from`.
///
/// # Errors
/// The OS error.
pub fn read_file_from(file: &mut File, from: u64, limit: u64) -> io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(from))?;
    let mut out = Vec::new();
    file.take(limit).read_to_end(&mut out)?;
    Ok(out)
}

/// What tells one version of a file from another without reading it: its
/// identity (device and inode; on Windows, volume serial and file index),
/// length, and modification and change times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The device (volume) holding it.
    pub dev: u64,
    /// Its inode (file index).
    pub ino: u64,
    /// Its length.
    pub len: u64,
    /// When its contents changed, in nanoseconds.
    pub mtime_ns: i128,
    /// When it or its metadata changed, in nanoseconds.
    pub ctime_ns: i128,
    /// Whether it is a regular file.
    pub is_file: bool,
}

/// Reads a file uvmctl wrote in its state, without following a link, up to
/// `limit` bytes.
///
/// # Errors
/// The OS error; a link's (`ELOOP` on unix); `InvalidData` past `limit`.
pub fn read_state_file(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = open_read_nofollow(path)?;
    let mut out = Vec::new();
    file.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(out)
}

/// A file uvmctl keeps in its state, opened for reading without following
/// a link: the file, its (device, inode) and its length now.
///
/// # Errors
/// The OS error; a link's; `InvalidInput` for what is not a regular file.
pub fn open_state_file_read(path: &Path) -> io::Result<(File, (u64, u64), u64)> {
    let file = open_read_nofollow(path)?;
    let s = file_stamp(&file)?;
    Ok((file, (s.dev, s.ino), s.len))
}
