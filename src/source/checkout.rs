//! A revision's checkout: listed from its tree (`git ls-tree`), bounded by
//! what it would take on disk, written from the objects alone into a
//! directory of its own and swapped in by a rename, looked over once per
//! process for a power cut's leftovers; and the checkouts the cache keeps,
//! prunes and cleans up.

use super::git::bounded;
use super::{GitSource, Revision, SourceError, io_err};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;

/// The most files (and links, and submodules) one revision's checkout may
/// have: a tree of millions of empty files inflates to no bytes at all.
pub const MAX_CHECKOUT_ENTRIES: usize = 200_000;

impl GitSource {
    /// The revision checked out in a directory of its own; the spec path
    /// inside it, which must be a directory that stays inside it.
    pub(super) async fn checkout(&self, revision: &Revision) -> Result<PathBuf, SourceError> {
        let dir = self.opts.cache.join(format!("rev-{}", revision.sha));
        if !dir.is_dir() {
            // Written under another name and renamed when whole: a
            // checkout cut short (uvmctl killed) is never taken for one,
            // whose missing specs would read as VMs to prune.
            let partial = self
                .opts
                .cache
                .join(format!(".rev-{}.partial", revision.sha));
            let _ = std::fs::remove_dir_all(&partial);
            let listing = self
                .git_bytes(
                    &["ls-tree", "-r", "-l", "-z", "--full-tree"],
                    &[std::ffi::OsStr::new(&revision.sha)],
                    "ls-tree",
                )
                .await?;
            let entries = tree_entries(&listing, revision)?;
            // What the checkout would take on disk, inflated: a pack that
            // passed the bound may still hold a blob that unpacks to
            // gigabytes, or trees that reuse each other into thousands of
            // empty files, each an inode and a block.
            let footprint = Footprint::of(&entries);
            let over = if footprint.bytes > self.opts.max_bytes {
                Some(format!(
                    "{} files and {} directories taking {} bytes on disk, over the bound of {} (--git-max-mb)",
                    footprint.files, footprint.dirs, footprint.bytes, self.opts.max_bytes
                ))
            } else if entries.len() > MAX_CHECKOUT_ENTRIES {
                Some(format!(
                    "{} files, over the bound of {MAX_CHECKOUT_ENTRIES}",
                    entries.len()
                ))
            } else {
                None
            };
            if let Some(what) = over {
                return Err(SourceError::CheckoutTooLarge {
                    revision: revision.clone(),
                    what,
                });
            }
            crate::hostfs::create_dirs(&partial, 0o700)
                .map_err(io_err("cannot make the checkout directory"))?;
            self.write_tree(&partial, entries).await?;
            // Not synced to disk (git does not sync a checkout either, and
            // syncfs would flush every VM's dirty pages on the host's file
            // system): a checkout a power cut cut short is found by
            // `checkout_whole` at the next start, and written again.
            std::fs::rename(&partial, &dir).map_err(io_err("cannot keep the checkout"))?;
        }
        let target = dir.join(&self.opts.path);
        let missing = || SourceError::MissingPath {
            revision: revision.clone(),
            path: self.opts.path.clone(),
        };
        let resolved = std::fs::canonicalize(&target).map_err(|_| missing())?;
        let root = std::fs::canonicalize(&dir).map_err(io_err("cannot resolve the checkout"))?;
        if !resolved.starts_with(&root) || !resolved.is_dir() {
            return Err(missing());
        }
        Ok(target)
    }

    /// Writes `entries` under `root` (new and empty) from the objects
    /// themselves (`git cat-file --batch`): what a file holds comes from
    /// the repository alone. No filter, attribute, hook or configuration of
    /// the host's or the repository's is read, so a `.gitattributes`
    /// naming a filter the host defines (git-lfs's smudge fetches from a
    /// URL the repository chooses) runs nothing (issue 30). On a blocking
    /// thread of its own: thousands of small files are plain system calls,
    /// which the async runtime would only slow down.
    async fn write_tree(&self, root: &Path, entries: Vec<TreeEntry>) -> Result<(), SourceError> {
        let mut cmd = self.std_command(&self.mirror());
        cmd.args(["cat-file", "--batch", "--buffer"])
            .stdin(Stdio::piped())
            // Nothing reads it while the objects stream: never a full pipe.
            .stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(io_err("cannot run git cat-file"))?;
        let pid = child.id();
        let root = root.to_path_buf();
        // Why: blocking pipe reads and thousands of file writes.
        let writing = tokio::task::spawn_blocking(move || {
            let written = write_objects(&mut child, &root, &entries);
            let _ = child.kill();
            let _ = child.wait();
            written
        });
        match tokio::time::timeout(self.opts.fetch_timeout, writing).await {
            Ok(Ok(written)) => written,
            Ok(Err(e)) => Err(SourceError::Io {
                what: "checkout".into(),
                source: io::Error::other(e),
            }),
            Err(_) => {
                // The blocking thread ends once git is gone.
                crate::child::kill(pid);
                Err(SourceError::Timeout {
                    what: "checkout",
                    after: self.opts.fetch_timeout,
                })
            }
        }
    }

    /// Whether the checkout of `revision` (in force) has every file of the
    /// revision at its size: looked at once per process, the first time it
    /// is found in force. A checkout that is not whole is removed, so the
    /// sync writes it again and puts it back in force.
    pub(super) async fn checkout_whole(&self, revision: &Revision) -> bool {
        use std::sync::atomic::Ordering;
        if self.checked.load(Ordering::Relaxed) {
            return true;
        }
        let dir = self.opts.cache.join(format!("rev-{}", revision.sha));
        let listing = self
            .git_bytes(
                &["ls-tree", "-r", "-l", "-z", "--full-tree"],
                &[std::ffi::OsStr::new(&revision.sha)],
                "ls-tree",
            )
            .await;
        let whole = match listing.ok().and_then(|l| tree_entries(&l, revision).ok()) {
            Some(entries) => entries.iter().all(|e| {
                let Ok(m) = std::fs::symlink_metadata(dir.join(&e.path)) else {
                    return false;
                };
                if !e.is_blob() {
                    return m.is_dir();
                }
                if e.mode == 0o120000 {
                    link_whole(&m, e.size)
                } else {
                    m.is_file() && m.len() == e.size
                }
            }),
            // Cannot tell (git failed): keep what is in force.
            None => true,
        };
        if whole {
            self.checked.store(true, Ordering::Relaxed);
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
        whole
    }

    /// Points the spec directory at `target` with one rename (see
    /// [`super::spec_dir_in`]): of a new link over `specs` on unix, of a
    /// new `specs.ref` over the old on Windows.
    pub(super) fn swap(&self, target: &Path) -> Result<(), SourceError> {
        let relative = target
            .strip_prefix(&self.opts.cache)
            .map_or_else(|_| target.to_path_buf(), Path::to_path_buf);
        #[cfg(unix)]
        {
            let temp = self
                .opts
                .cache
                .join(format!(".specs.{}", std::process::id()));
            let _ = std::fs::remove_file(&temp);
            std::os::unix::fs::symlink(&relative, &temp)
                .map_err(io_err("cannot link the revision"))?;
            std::fs::rename(&temp, self.opts.cache.join("specs"))
                .map_err(io_err("cannot swap the spec directory"))
        }
        #[cfg(not(unix))]
        {
            let text = relative
                .to_str()
                .ok_or_else(|| SourceError::Io {
                    what: "cannot name the revision".into(),
                    source: io::Error::other("not UTF-8"),
                })?
                .to_string();
            crate::hostfs::replace_file(
                &self.opts.cache.join(super::SPEC_REF),
                text.as_bytes(),
                0o600,
            )
            .map_err(io_err("cannot swap the spec directory"))
        }
    }

    /// Keeps the checkout in force and the one in force before it (a
    /// reader may still be in it); removes the rest, refused revisions'
    /// checkouts among them. Removing the one in force before would pull a
    /// watched directory from under a watcher that has not yet seen the
    /// swap (issue 30: after a refused revision, the newest other checkout
    /// was the refused one, and the fix waited for the resync).
    pub(super) fn prune_checkouts(&self, keep: &Revision, previous: Option<&Revision>) {
        let Ok(entries) = std::fs::read_dir(&self.opts.cache) else {
            return;
        };
        let kept: Vec<String> = std::iter::once(keep)
            .chain(previous)
            .map(|r| format!("rev-{}", r.sha))
            .collect();
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("rev-") && !kept.iter().any(|k| *k == name) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Removes what a sync cut short (uvmctl killed, a power cut) left in
    /// the cache: a partial checkout, a link not yet swapped in, and the
    /// worktree records of uvmctl versions that checked out with `git
    /// worktree` (a killed one stayed locked: issue 30). Runs under the
    /// cache's lock, so no sync in progress owns any of it.
    pub(super) fn clean_leftovers(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.opts.cache) {
            for e in entries.filter_map(Result::ok) {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(".rev-") && name.ends_with(".partial") {
                    let _ = std::fs::remove_dir_all(e.path());
                } else if name.starts_with(".specs.") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(self.mirror().join("worktrees"));
    }
}

/// What a checkout takes on disk: each file, link and directory counts at
/// least one block of [`BLOCK`] bytes, so a bound in bytes bounds inodes
/// too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footprint {
    files: usize,
    dirs: usize,
    bytes: u64,
}

/// The block a file system gives the smallest file or directory.
const BLOCK: u64 = 4096;

impl Footprint {
    fn of(entries: &[TreeEntry]) -> Self {
        let mut dirs = std::collections::HashSet::new();
        let mut bytes = 0u64;
        for e in entries {
            bytes = bytes.saturating_add(e.size.div_ceil(BLOCK).max(1).saturating_mul(BLOCK));
            let mut at = e.path.parent();
            while let Some(dir) = at.filter(|d| !d.as_os_str().is_empty()) {
                if !dirs.insert(dir) {
                    break;
                }
                at = dir.parent();
            }
        }
        let dirs_n = dirs.len();
        Footprint {
            files: entries.len(),
            dirs: dirs_n,
            bytes: bytes.saturating_add(BLOCK.saturating_mul(dirs_n as u64)),
        }
    }
}

/// One file of a revision, as `git ls-tree -r -l -z` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TreeEntry {
    /// `100644`, `100755`, `120000` (a link) or `160000` (a submodule).
    mode: u32,
    /// The object's id.
    object: String,
    /// Its size (0 for a submodule).
    pub(super) size: u64,
    /// Its path in the revision: relative, no `.`, `..` or empty part.
    pub(super) path: PathBuf,
}

impl TreeEntry {
    fn is_blob(&self) -> bool {
        self.mode != 0o160000
    }
}

/// Parses `git ls-tree -r -l -z` output, refusing what could not be a
/// checkout's own path.
pub(super) fn tree_entries(
    listing: &[u8],
    revision: &Revision,
) -> Result<Vec<TreeEntry>, SourceError> {
    let bad = |why: &str| SourceError::Git {
        what: "ls-tree",
        stderr: format!("{revision}: {why}"),
    };
    let mut out = Vec::new();
    for record in listing.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let tab = record
            .iter()
            .position(|b| *b == b'\t')
            .ok_or_else(|| bad("an entry without a path"))?;
        let (meta, path) = (&record[..tab], &record[tab + 1..]);
        let meta = String::from_utf8_lossy(meta);
        let mut parts = meta.split_whitespace();
        let (Some(mode), Some(kind), Some(object), Some(size)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("an entry git did not describe whole"));
        };
        let mode = u32::from_str_radix(mode, 8).map_err(|_| bad("an entry of no mode"))?;
        let size = match (kind, mode) {
            // Regular files (old gits wrote 100664 too) and links.
            ("blob", m) if m & 0o170000 == 0o100000 || m == 0o120000 => {
                size.parse().map_err(|_| bad("a file of no size"))?
            }
            ("commit", 0o160000) => 0,
            _ => {
                return Err(bad(
                    "an entry that is neither a file, a link nor a submodule",
                ));
            }
        };
        if !object.bytes().all(|b| b.is_ascii_hexdigit()) || object.len() < 40 {
            return Err(bad("an entry of no object id"));
        }
        let Some(path) = git_path(path) else {
            return Err(bad("a path this host cannot write as it is"));
        };
        let plain = path
            .components()
            .all(|c| matches!(c, Component::Normal(n) if !n.is_empty()));
        if !plain || path.as_os_str().is_empty() {
            return Err(bad("a path that would leave the checkout"));
        }
        out.push(TreeEntry {
            mode,
            object: object.to_string(),
            size,
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Streams every blob of `entries` out of `child` (`git cat-file --batch`)
/// into files under `root`; a submodule is an empty directory, as git
/// leaves it.
fn write_objects(
    child: &mut std::process::Child,
    root: &Path,
    entries: &[TreeEntry],
) -> Result<(), SourceError> {
    use std::io::{BufRead, Read, Write};
    let io = |what: &str| {
        let what = what.to_string();
        move |source| SourceError::Io { what, source }
    };
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| io("git cat-file")(io::Error::other("no stdin pipe")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io("git cat-file")(io::Error::other("no stdout pipe")))?;
    // Asked for all at once, from a thread of its own, while read as they
    // come: git's output pipe never waits on a reader still writing.
    let request: Vec<u8> = entries
        .iter()
        .filter(|e| e.is_blob())
        .flat_map(|e| format!("{}\n", e.object).into_bytes())
        .collect();
    let asking = std::thread::spawn(move || {
        let _ = stdin.write_all(&request);
    });
    let mut out = std::io::BufReader::with_capacity(1 << 16, stdout);
    let mut made: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let mut header = Vec::new();
    let mut body = Vec::new();
    let result = entries.iter().try_for_each(|e| {
        let target = root.join(&e.path);
        make_parents(root, &target, &mut made)?;
        if !e.is_blob() {
            std::fs::create_dir(&target).map_err(io("cannot write the checkout"))?;
            made.insert(target);
            return Ok(());
        }
        header.clear();
        out.read_until(b'\n', &mut header)
            .map_err(io("git cat-file"))?;
        let expected = format!("{} blob {}\n", e.object, e.size);
        if header != expected.as_bytes() {
            return Err(SourceError::Git {
                what: "cat-file",
                stderr: bounded(&String::from_utf8_lossy(&header)),
            });
        }
        body.clear();
        (&mut out)
            .take(e.size)
            .read_to_end(&mut body)
            .map_err(io("git cat-file"))?;
        let mut newline = [0u8; 1];
        out.read_exact(&mut newline).map_err(io("git cat-file"))?;
        if body.len() as u64 != e.size {
            return Err(SourceError::Git {
                what: "cat-file",
                stderr: "an object ended short".into(),
            });
        }
        write_entry(&target, e.mode, &body)
    });
    // The asking thread ends when git reads all or goes away.
    drop(out);
    let _ = child.kill();
    let _ = asking.join();
    result
}

/// Makes the directories between `root` and `target`, each new: one that
/// is already there and not made here (a link a crafted tree put first) is
/// refused, never followed.
fn make_parents(
    root: &Path,
    target: &Path,
    made: &mut std::collections::HashSet<PathBuf>,
) -> Result<(), SourceError> {
    let Some(parent) = target.parent() else {
        return Ok(());
    };
    if parent == root || made.contains(parent) {
        return Ok(());
    }
    make_parents(root, parent, made)?;
    std::fs::create_dir(parent).map_err(io_err(format!(
        "cannot write the checkout ({})",
        parent.display()
    )))?;
    made.insert(parent.to_path_buf());
    Ok(())
}

/// A path of git's, as this host writes it: any bytes on unix; on
/// Windows UTF-8 with no `\` (another separator there) or `:` (a stream
/// name), or it is refused.
#[cfg(unix)]
fn git_path(bytes: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
}

/// See the unix one: and no name Windows reads as something else (a
/// device, `CON`, `aux.yaml`; a trailing dot or space, which it drops; a
/// wildcard or a control character), as Git for Windows' `core.protectNTFS`
/// refuses them.
#[cfg(not(unix))]
fn git_path(bytes: &[u8]) -> Option<PathBuf> {
    let text = std::str::from_utf8(bytes).ok()?;
    // Empty parts fold away, as on unix.
    text.split('/')
        .filter(|n| !n.is_empty())
        .all(windows_name_ok)
        .then(|| PathBuf::from(text))
}

/// Whether Windows writes a file of this name as named.
#[cfg_attr(unix, allow(dead_code))]
pub(super) fn windows_name_ok(name: &str) -> bool {
    const DEVICES: &[&str] = &["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"];
    let stem = name
        .split('.')
        .next()
        .unwrap_or_default()
        .trim_end_matches(' ');
    let upper = stem.to_ascii_uppercase();
    let numbered = upper
        .strip_prefix("COM")
        .or_else(|| upper.strip_prefix("LPT"));
    let device = DEVICES.contains(&upper.as_str())
        || numbered.is_some_and(|n| {
            n.chars().count() == 1 && n.chars().all(|c| c.is_ascii_digit() || "¹²³".contains(c))
        });
    !name.is_empty()
        && !device
        && !name.ends_with(['.', ' '])
        && !name.contains(['\\', ':', '<', '>', '"', '|', '?', '*'])
        && !name.chars().any(|c| c < ' ')
}

/// Whether a link of the revision is whole in its checkout: a link on
/// unix; on Windows, where making one takes a privilege, a file holding
/// the link's text, as git writes it with `core.symlinks=false`.
fn link_whole(m: &std::fs::Metadata, size: u64) -> bool {
    if cfg!(unix) {
        m.file_type().is_symlink()
    } else {
        m.is_file() && m.len() == size
    }
}

/// Writes one file or link of a checkout; never follows or replaces
/// anything already there.
fn write_entry(target: &Path, mode: u32, body: &[u8]) -> Result<(), SourceError> {
    use std::io::Write;
    let what = || format!("cannot write the checkout ({})", target.display());
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        if mode == 0o120000 {
            return std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(body), target)
                .map_err(io_err(what()));
        }
        opts.mode(if mode & 0o111 != 0 { 0o755 } else { 0o644 })
            .custom_flags(nix::libc::O_NOFOLLOW);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(target).map_err(io_err(what()))?;
    f.write_all(body).map_err(io_err(what()))
}
