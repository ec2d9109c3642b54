//! The unix rules (see the module above).

use super::{Stamp, TrustError, temp_name};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::Mode;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Whether files owned by `uid` may be trusted: root's, or those of the
/// user running uvmctl (a developer's own scratch directories).
pub fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

fn lstat(path: &Path) -> Result<std::fs::Metadata, TrustError> {
    std::fs::symlink_metadata(path).map_err(|e| TrustError::Unreadable {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn untrusted(path: &Path, meta: &std::fs::Metadata, why: &'static str) -> TrustError {
    TrustError::Untrusted {
        path: path.display().to_string(),
        uid: meta.uid(),
        mode: meta.mode() & 0o7777,
        why,
    }
}

/// Checks a canonical directory and every directory above it. The last
/// one must not be writable by group or others at all; those above may be,
/// when sticky (what is below them is checked to be trusted's own).
fn check_chain(canonical: &Path, last_may_be_sticky: bool) -> Result<(), TrustError> {
    let mut at = PathBuf::new();
    let components: Vec<Component> = canonical.components().collect();
    for (i, c) in components.iter().enumerate() {
        at.push(c);
        let meta = lstat(&at)?;
        let last = i + 1 == components.len();
        if !meta.is_dir() {
            return Err(untrusted(&at, &meta, "not a directory"));
        }
        if !trusted_owner(meta.uid()) {
            return Err(untrusted(&at, &meta, "not owned by root"));
        }
        let writable = meta.mode() & 0o022 != 0;
        let sticky = meta.mode() & 0o1000 != 0;
        if writable && (!sticky || (last && !last_may_be_sticky)) {
            return Err(untrusted(
                &at,
                &meta,
                if sticky {
                    "writable by group or others"
                } else {
                    "writable by group or others, and not sticky"
                },
            ));
        }
    }
    Ok(())
}

/// Checks that nobody but root (or uvmctl's own user) can change what the
/// directory `path` names, now or later: the directory it resolves to and
/// every directory on the way, and every symbolic link on the way as given
/// (each must be trusted's own, in a directory that passes the same rule).
/// Returns the canonical path.
///
/// # Errors
/// The first directory or link that fails, with its owner and mode.
pub fn check_trusted_dir(path: &Path) -> Result<PathBuf, TrustError> {
    let canonical = std::fs::canonicalize(path).map_err(|e| TrustError::Unreadable {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    if canonical != path {
        let mut at = PathBuf::new();
        for c in path.components() {
            at.push(c);
            let meta = lstat(&at)?;
            if meta.file_type().is_symlink() {
                if !trusted_owner(meta.uid()) {
                    return Err(untrusted(&at, &meta, "a symbolic link not owned by root"));
                }
                if let Some(parent) = at.parent() {
                    let parent =
                        std::fs::canonicalize(parent).map_err(|e| TrustError::Unreadable {
                            path: parent.display().to_string(),
                            reason: e.to_string(),
                        })?;
                    check_chain(&parent, true)?;
                }
            }
        }
    }
    check_chain(&canonical, false)?;
    Ok(canonical)
}

/// How a file beneath a root is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
    /// A directory, read only.
    Directory,
}

impl Access {
    fn flags(self) -> OFlag {
        // Non-blocking, so a FIFO planted where a file was expected cannot
        // hang the open; cleared again once the file is known to be one.
        let base = OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
        match self {
            Access::Read => base | OFlag::O_RDONLY,
            Access::ReadWrite => base | OFlag::O_RDWR,
            Access::Directory => base | OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        }
    }
}

/// Opens `rel` beneath the directory `root` with `access`, following no
/// symbolic link and never leaving `root` (`rel` is a canonical path's
/// remainder: links were resolved and checked before; one that appears
/// since is an attack or a race, and refused). `openat2` where the kernel
/// has it, else a component-by-component `O_NOFOLLOW` walk.
///
/// # Errors
/// The OS error; `ELOOP` or `EXDEV` when a link or `..` is in the way.
pub fn open_beneath(root: &Path, rel: &Path, access: Access) -> io::Result<File> {
    let dir: OwnedFd = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let names: Vec<&std::ffi::OsStr> = rel
        .components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(io::Error::from(Errno::EXDEV)),
        })
        .collect::<io::Result<_>>()?;
    let rel_text: PathBuf = if names.is_empty() {
        PathBuf::from(".")
    } else {
        names.iter().collect()
    };
    let how = OpenHow::new().flags(access.flags()).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_MAGICLINKS
            | ResolveFlag::RESOLVE_NO_SYMLINKS,
    );
    let fd = match openat2(dir.as_fd(), rel_text.as_path(), how) {
        Ok(fd) => fd,
        // No openat2 (before Linux 5.6, or filtered by a sandbox).
        Err(Errno::ENOSYS | Errno::EPERM) => walk_nofollow(dir, &names, access)?,
        Err(e) => return Err(e.into()),
    };
    let file = File::from(fd);
    if access != Access::Directory {
        let ty = file.metadata()?.file_type();
        use std::os::unix::fs::FileTypeExt;
        if ty.is_fifo() || ty.is_socket() || ty.is_char_device() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        }
    }
    blocking(&file)?;
    Ok(file)
}

fn walk_nofollow(
    mut dir: OwnedFd,
    names: &[&std::ffi::OsStr],
    access: Access,
) -> io::Result<OwnedFd> {
    let Some((last, parents)) = names.split_last() else {
        return Ok(openat(dir.as_fd(), ".", access.flags(), Mode::empty())?);
    };
    for name in parents {
        dir = openat(
            dir.as_fd(),
            *name,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
    }
    Ok(openat(
        dir.as_fd(),
        *last,
        access.flags() | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )?)
}

/// Creates the directory `path` (not its parents) with exactly `mode`,
/// whatever the umask, or takes the one there: it must be a real directory
/// (not a link), owned by root or uvmctl's own user; its mode is then set to
/// `mode`.
///
/// # Errors
/// The OS error, or `PermissionDenied` naming the owner when it is not ours.
pub fn private_dir(path: &Path, mode: u32) -> io::Result<()> {
    private_dir_for(path, mode, None)
}

/// As [`private_dir`], its group set to `group` when given (a directory
/// root owns and an unprivileged service shares, e.g. mode 1770).
///
/// # Errors
/// As [`private_dir`].
pub fn private_dir_for(path: &Path, mode: u32, group: Option<u32>) -> io::Result<()> {
    match nix::unistd::mkdir(path, Mode::from_bits_truncate(mode)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let dir = File::from(nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?);
    let meta = dir.metadata()?;
    if !trusted_owner(meta.uid()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "owned by uid {} (mode {:04o}), not by root",
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    if let Some(gid) = group
        && meta.gid() != gid
    {
        std::os::unix::fs::fchown(&dir, None, Some(gid))?;
    }
    if meta.mode() & 0o7777 != mode || group.is_some() {
        dir.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Creates `path` and whatever directories above it are missing, each with
/// exactly `mode` (whatever the umask); existing ones are left as they are.
///
/// # Errors
/// The OS error of the first directory that could not be made.
pub fn create_dirs(path: &Path, mode: u32) -> io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        create_dirs(parent, mode)?;
    }
    private_dir(path, mode)
}

/// Opens (creating it with `mode` if missing) a file uvmctl owns in its
/// state, without following a link and truncated only once it is known to
/// be a regular file of ours with no other name (a planted hard link to a
/// file elsewhere is refused, never emptied).
///
/// # Errors
/// The OS error; `ELOOP` for a link; `PermissionDenied` for a file that is
/// not ours alone.
pub fn open_state_file(path: &Path, mode: u32, truncate: bool) -> io::Result<File> {
    let file = open_ours(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode),
        path,
    )?;
    if truncate {
        file.set_len(0)?;
    }
    Ok(file)
}

/// Opens a log uvmctl keeps in its state for appending only, as
/// [`open_state_file`] checks it: write-only, so QEMU can take it from an
/// fd set for a `logfile=`.
///
/// # Errors
/// As [`open_state_file`].
pub fn open_state_log(path: &Path, mode: u32) -> io::Result<File> {
    open_ours(
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(mode),
        path,
    )
}

/// Opens a file uvmctl keeps in its state for reading, as
/// [`open_state_file`] checks it.
///
/// # Errors
/// As [`open_state_file`].
pub fn open_state_reader(path: &Path) -> io::Result<File> {
    open_ours(std::fs::OpenOptions::new().read(true), path)
}

fn open_ours(opts: &mut std::fs::OpenOptions, path: &Path) -> io::Result<File> {
    let file = opts
        .custom_flags(libc_flags(OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK))
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 || !trusted_owner(meta.uid()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a regular file of uvmctl's alone (another name, owner or kind); refused",
        ));
    }
    blocking(&file)?;
    Ok(file)
}

/// Opens the regular file `path` for reading without following a link
/// (nor hanging on a FIFO planted in its place).
///
/// # Errors
/// The OS error; `ELOOP` for a link; `InvalidInput` for what is not a
/// regular file.
pub fn open_read_nofollow(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags(
            OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
        ))
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    blocking(&file)?;
    Ok(file)
}

/// Whether `file` (a config file) may be trusted: root's (or uvmctl's own
/// user's), and not writable by group or others.
///
/// # Errors
/// What is wrong with it.
pub fn check_trusted_file(file: &File) -> Result<(), String> {
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !trusted_owner(meta.uid()) {
        return Err(format!("owned by uid {}, not by root", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "writable by group or others (mode {:04o})",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The [`Stamp`] of what `path` names (its link's target when `follow`).
///
/// # Errors
/// The OS error.
pub fn stamp(path: &Path, follow: bool) -> io::Result<Stamp> {
    let m = if follow {
        std::fs::metadata(path)?
    } else {
        std::fs::symlink_metadata(path)?
    };
    Ok(stamp_of(&m))
}

/// The [`Stamp`] of an open file.
///
/// # Errors
/// The OS error.
pub fn file_stamp(file: &File) -> io::Result<Stamp> {
    Ok(stamp_of(&file.metadata()?))
}

fn stamp_of(m: &std::fs::Metadata) -> Stamp {
    Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        is_file: m.is_file(),
    }
}

/// Clears `O_NONBLOCK` (set only so the open could not hang on a FIFO) once
/// the file is known to be what was expected.
fn blocking(file: &File) -> io::Result<()> {
    let flags = nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

fn libc_flags(f: OFlag) -> i32 {
    f.bits()
}

/// Replaces `path` with `bytes` atomically: a new temporary file (`O_EXCL`,
/// `O_NOFOLLOW`, `mode`) renamed over it. A failed write removes the
/// temporary file again, so a full disk leaves nothing behind.
///
/// # Errors
/// The OS error of the step that failed.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_name(path);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc_flags(OFlag::O_NOFOLLOW))
            .open(&tmp)?;
        if f.metadata()?.permissions().mode() & 0o7777 != mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.write_all(bytes)?;
        f.flush()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Sets the process umask so that whatever uvmctl (or a QEMU it starts)
/// creates without an explicit mode is its owner's alone.
pub fn private_umask() {
    nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
}

/// The soft descriptor limit uvmctl raises itself to (when the hard limit
/// allows): a watcher of many VMs holds sockets, logs and listeners, and
/// 1,024 (the usual default) was exhausted by one metrics client in the
/// second red-team round.
pub const WANTED_NOFILE: u64 = 65_536;

/// Raises the soft `RLIMIT_NOFILE` towards [`WANTED_NOFILE`], within the
/// hard limit (which needs no privilege). Returns the soft limit in force.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let wanted = WANTED_NOFILE.min(hard);
    if soft < wanted && setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).is_ok() {
        return wanted;
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostfs::read_state_file;
    use std::os::unix::fs::symlink;

    fn root_only() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_private_tree_is_trusted_and_a_writable_one_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = dir.path().join("ok");
        std::fs::create_dir(&ok).expect("mkdir");
        std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(check_trusted_dir(&ok).is_ok());
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = check_trusted_dir(&open).expect_err("world-writable");
        let text = err.to_string();
        assert!(text.contains(&open.display().to_string()), "{text}");
        assert!(text.contains("mode 0777"), "{text}");
        // Below a world-writable, non-sticky directory, nothing is trusted.
        let below = open.join("below");
        std::fs::create_dir(&below).expect("mkdir");
        let err = check_trusted_dir(&below).expect_err("parent writable");
        assert!(err.to_string().contains("not sticky"), "{err}");
        // A sticky one on the way is fine, but not as the directory itself.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        assert!(check_trusted_dir(&below).is_ok());
        assert!(check_trusted_dir(&open).is_err());
    }

    #[test]
    fn a_directory_owned_by_another_user_is_refused_with_its_owner() {
        if !root_only() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).expect("mkdir");
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
        let err = check_trusted_dir(&theirs).expect_err("not root's");
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        // A link of theirs on the way is refused too, even to a good place.
        let good = dir.path().join("good");
        std::fs::create_dir(&good).expect("mkdir");
        let link = dir.path().join("link");
        symlink(&good, &link).expect("symlink");
        assert!(check_trusted_dir(&link).is_ok());
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &link,
            Some(nix::unistd::Uid::from_raw(65534)),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .expect("lchown");
        let err = check_trusted_dir(&link).expect_err("their link");
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }

    #[test]
    fn open_beneath_follows_no_link_and_never_leaves_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("sub/f"), b"inside").expect("write");
        std::fs::write(dir.path().join("outside"), b"outside").expect("write");
        symlink(dir.path().join("outside"), root.join("sub/link")).expect("symlink");
        symlink(dir.path(), root.join("up")).expect("symlink");
        let f = open_beneath(&root, Path::new("sub/f"), Access::Read).expect("inside");
        assert_eq!(std::io::read_to_string(f).expect("read"), "inside");
        for rel in ["sub/link", "up/outside", "../outside", "sub/../../outside"] {
            assert!(
                open_beneath(&root, Path::new(rel), Access::Read).is_err(),
                "{rel} opened"
            );
        }
        // The walk used where openat2 is missing refuses the same.
        let walked = |rel: &str| {
            let fd = nix::fcntl::open(
                &root,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .expect("root");
            let names: Vec<&std::ffi::OsStr> = Path::new(rel)
                .iter()
                .collect::<Vec<_>>()
                .into_iter()
                .collect();
            walk_nofollow(fd, &names, Access::Read)
        };
        assert!(walked("sub/f").is_ok());
        assert!(walked("sub/link").is_err());
        assert!(walked("up/outside").is_err());
        // A FIFO does not hang the open, and is refused.
        nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o600)).expect("mkfifo");
        assert!(open_beneath(&root, Path::new("fifo"), Access::Read).is_err());
        assert!(open_beneath(&root, Path::new(""), Access::Directory).is_ok());
    }

    #[test]
    fn state_files_refuse_planted_links_and_leave_no_temporary_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep me").expect("write");
        let planted = dir.path().join("qemu.log");
        symlink(&victim, &planted).expect("symlink");
        assert!(open_state_file(&planted, 0o600, true).is_err());
        let hard = dir.path().join("hard.log");
        std::fs::hard_link(&victim, &hard).expect("link");
        assert!(open_state_file(&hard, 0o600, true).is_err());
        assert_eq!(std::fs::read(&victim).expect("read"), b"keep me");
        // A link where the record goes is replaced, not written through.
        let record = dir.path().join("launch.json");
        symlink(&victim, &record).expect("symlink");
        replace_file(&record, b"{}", 0o600).expect("replace");
        assert_eq!(std::fs::read(&victim).expect("read"), b"keep me");
        assert!(
            !std::fs::symlink_metadata(&record)
                .expect("stat")
                .is_symlink()
        );
        assert!(read_state_file(&planted, 100).is_err());
        // A write that fails leaves no temporary file.
        let gone = dir.path().join("missing-dir").join("x");
        assert!(replace_file(&gone, b"x", 0o600).is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn private_dirs_get_their_mode_whatever_the_umask() {
        let dir = tempfile::tempdir().expect("tempdir");
        let made = dir.path().join("made");
        private_dir(&made, 0o700).expect("private dir");
        assert_eq!(
            std::fs::metadata(&made).expect("stat").mode() & 0o7777,
            0o700
        );
        // One that exists with a looser mode (as a umask of 000 makes it) is tightened.
        std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        private_dir(&made, 0o700).expect("private dir");
        assert_eq!(
            std::fs::metadata(&made).expect("stat").mode() & 0o7777,
            0o700
        );
        let link = dir.path().join("link");
        symlink(&made, &link).expect("symlink");
        assert!(private_dir(&link, 0o700).is_err(), "a link is not taken");
    }
}
