//! Changes to the spec directory: notify's OS watcher (inotify here) and a
//! quiet time of our own. Directories are watched, never single files, so a
//! file replaced by a rename is still seen; the parent is watched too, so a
//! spec directory removed and recreated (or a link to it swapped) is
//! followed.
//!
//! Why not `notify-debouncer-full`: its thread woke four times per debounce
//! period for as long as the watcher lived (40 times a second, idle, at the
//! default 100 ms), and added up to a quarter period to every change. The
//! loop only needs the paths that changed, so its rename pairing and file-id
//! cache bought nothing. [`Quiet`] waits for the directory to be quiet, which
//! also keeps a commit's files in one reload: a VM moved from one file to
//! another is never seen in both.

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
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

/// Changes keep coming for at most this many quiet times before what has
/// been seen counts anyway: a file rewritten without pause still reloads.
const LONGEST_WAIT_FACTOR: u32 = 10;

/// More distinct paths than this pending at once are a rescan: it compares
/// stamps, and a checkout of every file costs no more memory than one.
const MOST_PENDING_PATHS: usize = 4096;

/// Changes gathered until the spec directory has been quiet for `debounce`
/// (or [`LONGEST_WAIT_FACTOR`] times that since the first of them). Pure:
/// the time is passed in.
#[derive(Debug)]
struct Quiet {
    debounce: Duration,
    /// First and last change since the last [`Quiet::take`].
    first: Option<Instant>,
    last: Option<Instant>,
    paths: HashSet<PathBuf>,
    rescan: bool,
}

impl Quiet {
    fn new(debounce: Duration) -> Self {
        Quiet {
            debounce,
            first: None,
            last: None,
            paths: HashSet::new(),
            rescan: false,
        }
    }

    fn note(&mut self, change: FsChange, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
        match change {
            FsChange::Rescan => self.rescan = true,
            FsChange::Paths(p) if !self.rescan => self.paths.extend(p),
            FsChange::Paths(_) => {}
        }
        if self.paths.len() > MOST_PENDING_PATHS {
            self.rescan = true;
        }
        if self.rescan {
            self.paths = HashSet::new();
        }
    }

    /// When what is gathered counts; `None`: nothing is.
    fn due(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        Some((last + self.debounce).min(first + self.debounce * LONGEST_WAIT_FACTOR))
    }

    /// What was gathered, now due; the next change starts afresh.
    fn take(&mut self) -> Option<FsChange> {
        self.first = None;
        self.last = None;
        if std::mem::take(&mut self.rescan) {
            Some(FsChange::Rescan)
        } else if self.paths.is_empty() {
            None
        } else {
            Some(FsChange::Paths(std::mem::take(&mut self.paths)))
        }
    }
}

/// Passes the OS watcher's changes on once quiet, on a thread of its own:
/// it wakes only while a change is pending, and to the microsecond (tokio's
/// timer rounds up to the next millisecond). `None` stops it.
fn forward_when_quiet(
    raw: std::sync::mpsc::Receiver<Option<FsChange>>,
    tx: UnboundedSender<FsChange>,
    debounce: Duration,
) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut quiet = Quiet::new(debounce);
    loop {
        let now = Instant::now();
        let got = match quiet.due() {
            Some(at) if at <= now => {
                if let Some(change) = quiet.take()
                    && tx.send(change).is_err()
                {
                    return;
                }
                continue;
            }
            Some(at) => match raw.recv_timeout(at - now) {
                Ok(got) => got,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => None,
            },
            None => raw.recv().ok().flatten(),
        };
        match got {
            Some(change) => quiet.note(change, Instant::now()),
            None => return,
        }
    }
}

/// Follows a spec directory (or one spec file) for as long as it lives.
pub struct SpecWatcher {
    watcher: RecommendedWatcher,
    /// Stops the quiet-time thread.
    stop: std::sync::mpsc::Sender<Option<FsChange>>,
    root: PathBuf,
    /// What is watched recursively: the root, or the parent of a root file.
    target: PathBuf,
    /// The directory watched as `target` (device, inode), to see it replaced.
    watched: Option<(u64, u64)>,
    /// Recursive for a spec directory; not for the parent of a spec file.
    mode: RecursiveMode,
}

impl Drop for SpecWatcher {
    fn drop(&mut self) {
        let _ = self.stop.send(None);
    }
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    crate::hostfs::stamp(path, true)
        .ok()
        .map(|m| (m.dev, m.ino))
}

/// One OS watcher event as the loop sees it: the paths under `root` it
/// names, a rescan, or nothing of ours.
fn relevant(event: notify::Result<notify::Event>, root: &Path) -> Option<FsChange> {
    let event = match event {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "spec directory watcher error; rescanning");
            return Some(FsChange::Rescan);
        }
    };
    // Opening or reading is no change, and a reload opens the root:
    // counted, it would rescan forever.
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return None;
    }
    if event.need_rescan() {
        return Some(FsChange::Rescan);
    }
    let mut paths = HashSet::new();
    for p in event.paths {
        // The root itself changing is a rescan; the parent's other
        // entries are not ours.
        if p == root {
            return Some(FsChange::Rescan);
        }
        if p.starts_with(root) {
            paths.insert(p);
        }
    }
    (!paths.is_empty()).then_some(FsChange::Paths(paths))
}

impl SpecWatcher {
    /// Starts watching `root` (absolute), sending changes to `tx` once the
    /// directory has been quiet for `debounce`.
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
        let (raw_tx, raw_rx) = std::sync::mpsc::channel();
        let stop = raw_tx.clone();
        let seen_root = root.to_path_buf();
        let handler = move |event: notify::Result<notify::Event>| {
            if let Some(change) = relevant(event, &seen_root) {
                let _ = raw_tx.send(Some(change));
            }
        };
        let mut watcher = RecommendedWatcher::new(handler, notify::Config::default())?;
        if let Some(p) = parent.as_ref().filter(|p| p.is_dir() && **p != target) {
            watcher.watch(p, RecursiveMode::NonRecursive)?;
        }
        std::thread::Builder::new()
            .name("spec-quiet".into())
            .spawn(move || forward_when_quiet(raw_rx, tx, debounce))?;
        let mut w = SpecWatcher {
            watcher,
            stop,
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
            let _ = self.watcher.unwatch(&self.target);
        }
        match self.watcher.watch(&self.target, self.mode) {
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

    fn paths(names: &[&str]) -> FsChange {
        FsChange::Paths(names.iter().map(PathBuf::from).collect())
    }

    const D: Duration = Duration::from_millis(10);

    #[test]
    fn changes_count_once_the_directory_is_quiet() {
        let t0 = Instant::now();
        let mut q = Quiet::new(D);
        assert_eq!(q.due(), None, "nothing pending, nothing to wait for");
        q.note(paths(&["/s/a.yaml"]), t0);
        assert_eq!(q.due(), Some(t0 + D));
        // Another file 4 ms later (a checkout): both wait for the last.
        q.note(paths(&["/s/b.yaml"]), t0 + Duration::from_millis(4));
        assert_eq!(q.due(), Some(t0 + Duration::from_millis(14)));
        assert_eq!(q.take(), Some(paths(&["/s/a.yaml", "/s/b.yaml"])));
        assert_eq!(q.due(), None, "taken: quiet again");
        assert_eq!(q.take(), None);
    }

    #[test]
    fn a_file_rewritten_without_pause_still_counts_after_the_longest_wait() {
        let t0 = Instant::now();
        let mut q = Quiet::new(D);
        for ms in 0..50 {
            q.note(paths(&["/s/a.yaml"]), t0 + Duration::from_millis(ms * 3));
        }
        assert_eq!(q.due(), Some(t0 + D * LONGEST_WAIT_FACTOR));
    }

    #[test]
    fn a_rescan_takes_in_the_paths_and_too_many_paths_are_a_rescan() {
        let t0 = Instant::now();
        let mut q = Quiet::new(D);
        q.note(paths(&["/s/a.yaml"]), t0);
        q.note(FsChange::Rescan, t0);
        q.note(paths(&["/s/b.yaml"]), t0);
        assert_eq!(q.take(), Some(FsChange::Rescan));
        assert_eq!(q.take(), None, "the rescan is said once");

        let many: HashSet<PathBuf> = (0..=MOST_PENDING_PATHS)
            .map(|i| PathBuf::from(format!("/s/{i}.yaml")))
            .collect();
        q.note(FsChange::Paths(many), t0);
        assert!(q.paths.is_empty(), "the paths are dropped, not kept");
        assert_eq!(q.take(), Some(FsChange::Rescan));
    }

    #[test]
    fn only_changes_under_the_root_are_ours() {
        let root = Path::new("/s");
        let event = |kind, p: &[&str]| {
            let mut e = notify::Event::new(kind);
            for p in p {
                e = e.add_path(PathBuf::from(p));
            }
            Ok(e)
        };
        let modify = notify::EventKind::Modify(notify::event::ModifyKind::Any);
        let read = notify::EventKind::Access(notify::event::AccessKind::Any);
        assert_eq!(relevant(event(read, &["/s/a.yaml"]), root), None);
        assert_eq!(relevant(event(modify, &["/other.yaml"]), root), None);
        assert_eq!(
            relevant(event(modify, &["/s/a.yaml", "/t/b.yaml"]), root),
            Some(paths(&["/s/a.yaml"]))
        );
        assert_eq!(
            relevant(event(modify, &["/s"]), root),
            Some(FsChange::Rescan)
        );
        let lost =
            notify::Event::new(notify::EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(relevant(Ok(lost), root), Some(FsChange::Rescan));
        assert_eq!(
            relevant(Err(notify::Error::generic("queue")), root),
            Some(FsChange::Rescan)
        );
    }

    /// Both changes go together, not before the directory was quiet, and
    /// the thread ends when told.
    #[tokio::test]
    async fn the_forwarder_sends_what_it_gathered_once_quiet() {
        let (raw_tx, raw_rx) = std::sync::mpsc::channel();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let thread = std::thread::spawn(move || forward_when_quiet(raw_rx, tx, D));
        let t0 = std::time::Instant::now();
        raw_tx.send(Some(paths(&["/s/a.yaml"]))).expect("send");
        std::thread::sleep(Duration::from_millis(6));
        raw_tx.send(Some(paths(&["/s/b.yaml"]))).expect("send");
        let got = next(&mut rx).await;
        assert!(
            t0.elapsed() >= Duration::from_millis(16),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(got, paths(&["/s/a.yaml", "/s/b.yaml"]));
        raw_tx.send(None).expect("send");
        thread.join().expect("ends when told");
        assert!(
            rx.recv().await.is_none(),
            "nothing more, and its sender gone"
        );
    }

    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<FsChange>) -> FsChange {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a change within 10 s")
            .expect("watcher alive")
    }

    /// Drains changes until one names `path` (or asks for a rescan).
    #[cfg(unix)]
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

    // On Windows a watched directory stays "delete pending" while the
    // watcher's handle is open, so it cannot be made again under that name.
    #[cfg(unix)]
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
