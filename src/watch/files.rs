//! Changes to the spec directory, from the notify project's own debouncer
//! (`notify-debouncer-full`): it pairs renames, debounces per path and keeps
//! a file-id cache, which is what editors' atomic saves, `git checkout` and
//! swap files need. Directories are watched, never single files, so a file
//! replaced by a rename is still seen; the parent is watched too, so a spec
//! directory removed and recreated (or a link to it swapped) is followed.

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// What changed under the spec directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsChange {
    /// These paths (files or directories) changed.
    Paths(HashSet<PathBuf>),
    /// Events were lost (queue overflow, watcher error) or the directory
    /// itself was replaced: compare everything.
    Rescan,
}

/// Follows a spec directory (or one spec file) for as long as it lives.
pub struct SpecWatcher {
    debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    root: PathBuf,
    /// What is watched recursively: the root, or the parent of a root file.
    target: PathBuf,
    /// The directory watched as `target` (device, inode), to see it replaced.
    watched: Option<(u64, u64)>,
    /// Recursive for a spec directory; not for the parent of a spec file.
    mode: RecursiveMode,
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl SpecWatcher {
    /// Starts watching `root` (absolute), sending debounced changes to `tx`.
    ///
    /// # Errors
    /// When the OS watcher cannot be set up (inotify limits, no parent).
    pub fn start(
        root: &Path,
        debounce: Duration,
        tx: UnboundedSender<FsChange>,
    ) -> notify::Result<SpecWatcher> {
        let is_file = std::fs::metadata(root).is_ok_and(|m| m.is_file());
        let parent = root.parent().map(Path::to_path_buf);
        let target = if is_file {
            parent.clone().unwrap_or_else(|| root.to_path_buf())
        } else {
            root.to_path_buf()
        };
        let seen_root = root.to_path_buf();
        let handler = move |result: DebounceEventResult| {
            let change = match result {
                Ok(events) => {
                    let mut paths = HashSet::new();
                    let mut rescan = false;
                    for e in events {
                        // Opening or reading is no change, and a reload
                        // opens the root: counted, it would rescan forever.
                        if matches!(e.kind, notify::EventKind::Access(_)) {
                            continue;
                        }
                        rescan |= e.need_rescan();
                        for p in &e.paths {
                            // The parent's other entries are not ours; the
                            // root itself changing is a rescan.
                            if p == &seen_root || !p.starts_with(&seen_root) {
                                rescan |= p == &seen_root;
                                continue;
                            }
                            paths.insert(p.clone());
                        }
                    }
                    if rescan {
                        FsChange::Rescan
                    } else if paths.is_empty() {
                        return;
                    } else {
                        FsChange::Paths(paths)
                    }
                }
                Err(errors) => {
                    for e in errors {
                        tracing::warn!(error = %e, "spec directory watcher error; rescanning");
                    }
                    FsChange::Rescan
                }
            };
            let _ = tx.send(change);
        };
        let mut debouncer = new_debouncer(debounce, None, handler)?;
        if let Some(p) = parent.as_ref().filter(|p| p.is_dir() && **p != target) {
            debouncer.watch(p, RecursiveMode::NonRecursive)?;
        }
        let mut w = SpecWatcher {
            debouncer,
            root: root.to_path_buf(),
            target,
            watched: None,
            mode: if is_file {
                RecursiveMode::NonRecursive
            } else {
                RecursiveMode::Recursive
            },
        };
        w.rewatch(false);
        Ok(w)
    }

    /// Watches the directory again if it was replaced since (removed and
    /// recreated, or a link to it swapped); true when it did. `force` when
    /// its events said so: a recreated directory may get the old inode.
    pub fn rewatch(&mut self, force: bool) -> bool {
        let now = identity(&self.target);
        if now.is_none() || (now == self.watched && !force) {
            return false;
        }
        if self.watched.is_some() {
            let _ = self.debouncer.unwatch(&self.target);
        }
        match self.debouncer.watch(&self.target, self.mode) {
            Ok(()) => {
                tracing::debug!(dir = %self.target.display(), "watching spec directory");
                self.watched = now;
                true
            }
            Err(e) => {
                tracing::warn!(dir = %self.root.display(), error = %e, "cannot watch the spec directory; relying on resync");
                self.watched = None;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::unbounded_channel;

    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<FsChange>) -> FsChange {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a change within 10 s")
            .expect("watcher alive")
    }

    /// Drains changes until one names `path` (or asks for a rescan).
    async fn sees(rx: &mut tokio::sync::mpsc::UnboundedReceiver<FsChange>, path: &Path) {
        loop {
            match next(rx).await {
                FsChange::Rescan => return,
                FsChange::Paths(p) if p.contains(path) => return,
                FsChange::Paths(_) => {}
            }
        }
    }

    /// A reload opens the directory and its files: that is no change. It
    /// was counted as one, so an idle watcher reloaded about 8 times a
    /// second (6 % of a core with 100 specs, debug build).
    #[tokio::test]
    async fn reading_the_specs_is_no_change() {
        let top = tempfile::tempdir().expect("tempdir");
        let root = top.path().join("specs");
        std::fs::create_dir(&root).expect("mkdir");
        let a = root.join("a.yaml");
        std::fs::write(&a, "x").expect("write");
        let (tx, mut rx) = unbounded_channel();
        let _w = SpecWatcher::start(&root, Duration::from_millis(20), tx).expect("watch");
        tokio::time::sleep(Duration::from_millis(100)).await;
        while rx.try_recv().is_ok() {}
        for _ in 0..3 {
            let _ = std::fs::read_dir(&root).expect("list").count();
            let _ = std::fs::read(&a).expect("read");
            let _ = crate::spec::load_dir(&root);
        }
        let got = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        assert!(got.is_err(), "reading was taken for a change: {got:?}");
    }

    #[tokio::test]
    async fn a_spec_directory_removed_and_recreated_is_followed_again() {
        let top = tempfile::tempdir().expect("tempdir");
        let root = top.path().join("specs");
        std::fs::create_dir(&root).expect("mkdir");
        let (tx, mut rx) = unbounded_channel();
        let mut w = SpecWatcher::start(&root, Duration::from_millis(20), tx).expect("watch");
        let a = root.join("a.yaml");
        std::fs::write(&a, "x").expect("write");
        sees(&mut rx, &a).await;

        std::fs::remove_dir_all(&root).expect("rm");
        std::fs::create_dir(&root).expect("mkdir");
        // The loop asks for a rescan when the root itself changes, and
        // re-watches then.
        loop {
            if next(&mut rx).await == FsChange::Rescan {
                break;
            }
        }
        assert!(w.rewatch(true), "a new directory is watched anew");
        let b = root.join("b.yaml");
        std::fs::write(&b, "y").expect("write");
        sees(&mut rx, &b).await;
        assert!(!w.rewatch(false), "nothing new to watch");
    }

    #[tokio::test]
    async fn a_watched_single_file_replaced_by_rename_is_seen() {
        let top = tempfile::tempdir().expect("tempdir");
        let file = top.path().join("vm.yaml");
        std::fs::write(&file, "x").expect("write");
        let (tx, mut rx) = unbounded_channel();
        let _w = SpecWatcher::start(&file, Duration::from_millis(20), tx).expect("watch");
        let tmp = top.path().join(".vm.yaml.tmp");
        std::fs::write(&tmp, "y").expect("write");
        std::fs::rename(&tmp, &file).expect("rename");
        // The root is the file itself: its change is a rescan of it.
        assert_eq!(next(&mut rx).await, FsChange::Rescan);
    }
}
