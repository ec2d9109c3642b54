//! One atomic per-VM record store, for every virtstack that keeps records
//! (qemu's launch records, remotevm's server records).
//!
//! # Guarantees
//! - A record is read once per version of its file: each load stats the
//!   file and reuses this process's copy while the file is the same one
//!   (device, inode, size, mtime), so another process's write is always
//!   seen and this process's own writes never cost a read.
//! - A store replaces the file atomically (`hostfs::replace_file`: a unique
//!   temporary created `O_EXCL | O_NOFOLLOW`, renamed over it), so a reader
//!   never sees half a record.
//! - A store that fails (a full disk) is kept, and written again before the
//!   record is next loaded: what a VM really became is never forgotten.
//! - Records are read without following links and up to a bound; names that
//!   are not VM names are never listed.

use crate::hostfs;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

/// Where each VM's record lives under the store's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `<root>/<name><suffix>`.
    File {
        /// Ends each record's file name (e.g. `.json`).
        suffix: &'static str,
    },
    /// `<root>/<name>/<file>`: the VM has a directory of its own.
    Dir {
        /// The record's file name in it.
        file: &'static str,
    },
}

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The VM has no record here.
    #[error("vm {0}: no record")]
    NotFound(String),
    /// The file system refused.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The record's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The directory of the records cannot be listed: its VMs cannot be
    /// seen, which is never "no VMs".
    #[error("cannot read the state directory {}{}", dir.display(), unreadable_hint(source))]
    Unlistable {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file is not a record (or a record that cannot be written).
    #[error("corrupt {what} {}: {reason}", path.display())]
    Corrupt {
        /// What the records are (`launch record`).
        what: &'static str,
        /// The record's file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
}

fn unreadable_hint(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::PermissionDenied {
        " (its VMs are root's: run uvmctl as root, or give --state-dir a directory of your own)"
    } else {
        ""
    }
}

/// What tells one version of a record file from another: a write replaces
/// the file (a new inode), and its size and mtime go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileStamp {
    /// The stamp of the regular file at `path`; `None` when there is none.
    pub fn of(path: &Path) -> io::Result<Option<Self>> {
        match crate::hostfs::stamp(path, false) {
            Ok(m) if m.is_file => Ok(Some(FileStamp {
                dev: m.dev,
                ino: m.ino,
                len: m.len,
                mtime_ns: m.mtime_ns,
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

struct Inner<T> {
    /// Each record as this process last read or wrote it, with the stamp
    /// of the file then.
    cached: HashMap<String, (T, FileStamp)>,
    /// Records whose last write failed, by VM.
    unwritten: BTreeMap<String, T>,
}

/// The records of one virtstack's VMs, under one root.
pub struct RecordStore<T> {
    /// What the records are, for errors (`launch record`).
    what: &'static str,
    root: PathBuf,
    layout: Layout,
    max_bytes: u64,
    inner: Arc<Mutex<Inner<T>>>,
    loads: Arc<AtomicU64>,
    stores: Arc<AtomicU64>,
}

impl<T> Clone for RecordStore<T> {
    fn clone(&self) -> Self {
        RecordStore {
            what: self.what,
            root: self.root.clone(),
            layout: self.layout,
            max_bytes: self.max_bytes,
            inner: self.inner.clone(),
            loads: self.loads.clone(),
            stores: self.stores.clone(),
        }
    }
}

impl<T> std::fmt::Debug for RecordStore<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStore")
            .field("root", &self.root)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl<T: Serialize + DeserializeOwned + Clone> RecordStore<T> {
    /// A store of `what` records (named so in errors) under `root`, each
    /// read up to `max_bytes`.
    pub fn new(
        what: &'static str,
        root: impl Into<PathBuf>,
        layout: Layout,
        max_bytes: u64,
    ) -> Self {
        RecordStore {
            what,
            root: root.into(),
            layout,
            max_bytes,
            inner: Arc::new(Mutex::new(Inner {
                cached: HashMap::new(),
                unwritten: BTreeMap::new(),
            })),
            loads: Arc::default(),
            stores: Arc::default(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner<T>> {
        // Poisoned only by a panic elsewhere: the maps themselves are intact.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file of `name`'s record.
    pub fn path(&self, name: &str) -> PathBuf {
        match self.layout {
            Layout::File { suffix } => self.root.join(format!("{name}{suffix}")),
            Layout::Dir { file } => self.root.join(name).join(file),
        }
    }

    /// Names of the VMs that have a record, sorted.
    ///
    /// # Errors
    /// When the root cannot be listed (a missing root is an error too: the
    /// caller knows whether that means "no VMs").
    pub fn names(&self) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let file = e.file_name();
                let file = file.to_str()?;
                let name = match self.layout {
                    Layout::File { suffix } => file.strip_suffix(suffix)?,
                    Layout::Dir { .. } => file,
                };
                crate::vm::VmName::new(name).ok()?;
                let is_record = std::fs::symlink_metadata(self.path(name))
                    .is_ok_and(|m| m.is_file())
                    || self.inner().unwritten.contains_key(name);
                is_record.then(|| name.to_string())
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// The VMs that have a record, sorted; none when the directory was
    /// never made.
    ///
    /// # Errors
    /// [`RecordError::Unlistable`] when it exists but cannot be listed (a
    /// user who may not read root's state): never taken for "no VMs".
    pub fn listed(&self) -> Result<Vec<crate::vm::VmName>, RecordError> {
        match self.names() {
            Ok(names) => Ok(names
                .iter()
                .filter_map(|n| crate::vm::VmName::new(n).ok())
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(RecordError::Unlistable {
                dir: self.root.clone(),
                source,
            }),
        }
    }

    /// Whether `name` has a record (on disk, or waiting to be written).
    pub fn exists(&self, name: &str) -> bool {
        self.inner().unwritten.contains_key(name)
            || FileStamp::of(&self.path(name)).is_ok_and(|s| s.is_some())
    }

    /// The stamp of `name`'s record file now.
    pub fn stamp(&self, name: &str) -> Option<FileStamp> {
        FileStamp::of(&self.path(name)).ok()?
    }

    /// `name`'s record: this process's copy while the file is unchanged,
    /// else read (and kept).
    ///
    /// # Errors
    /// [`RecordError::NotFound`] without one; `Io` or `Corrupt` otherwise.
    pub fn load(&self, name: &str) -> Result<T, RecordError> {
        self.write_unwritten(name)?;
        let path = self.path(name);
        let stamp = FileStamp::of(&path)
            .map_err(|source| RecordError::Io {
                what: "cannot stat",
                path: path.clone(),
                source,
            })?
            .ok_or_else(|| RecordError::NotFound(name.to_string()))?;
        if let Some((rec, at)) = self.inner().cached.get(name)
            && *at == stamp
        {
            return Ok(rec.clone());
        }
        // Stamped before it is read: a file replaced meanwhile is read
        // again next time, never taken for the old one.
        let text = hostfs::read_state_file(&path, self.max_bytes).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                RecordError::NotFound(name.to_string())
            } else {
                RecordError::Io {
                    what: "cannot read",
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let rec: T = serde_json::from_slice(&text).map_err(|e| RecordError::Corrupt {
            what: self.what,
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.loads.fetch_add(1, Relaxed);
        self.inner()
            .cached
            .insert(name.to_string(), (rec.clone(), stamp));
        Ok(rec)
    }

    /// Writes `name`'s record atomically (mode 0600). When that fails the
    /// record is kept and written again before it is next loaded.
    ///
    /// # Errors
    /// What the write met.
    pub fn store(&self, name: &str, rec: &T) -> Result<(), RecordError> {
        let path = self.path(name);
        let written = serde_json::to_vec_pretty(rec)
            .map_err(|e| RecordError::Corrupt {
                what: self.what,
                path: path.clone(),
                reason: e.to_string(),
            })
            .and_then(|text| {
                hostfs::replace_file(&path, &text, 0o600).map_err(|source| RecordError::Io {
                    what: "cannot write",
                    path: path.clone(),
                    source,
                })
            });
        let mut inner = self.inner();
        match written {
            Ok(()) => {
                self.stores.fetch_add(1, Relaxed);
                inner.unwritten.remove(name);
                // Writers of one record are serialized (the state lock
                // across processes, the executor within one), so the file
                // stamped now is the one just written.
                match FileStamp::of(&path) {
                    Ok(Some(stamp)) => {
                        inner.cached.insert(name.to_string(), (rec.clone(), stamp));
                    }
                    _ => {
                        inner.cached.remove(name);
                    }
                }
                Ok(())
            }
            Err(e) => {
                inner.cached.remove(name);
                inner.unwritten.insert(name.to_string(), rec.clone());
                Err(e)
            }
        }
    }

    fn write_unwritten(&self, name: &str) -> Result<(), RecordError> {
        let Some(rec) = self.inner().unwritten.get(name).cloned() else {
            return Ok(());
        };
        self.store(name, &rec)?;
        tracing::info!(vm = name, "record written again");
        Ok(())
    }

    /// Forgets `name` (its VM is going): returns the record whose write
    /// failed, if one is waiting, since that is what the VM is.
    pub fn forget(&self, name: &str) -> Option<T> {
        let mut inner = self.inner();
        inner.cached.remove(name);
        inner.unwritten.remove(name)
    }

    /// Forgets `name` and removes its record file.
    ///
    /// # Errors
    /// When the file exists and cannot be removed.
    pub fn remove(&self, name: &str) -> Result<(), RecordError> {
        self.forget(name);
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RecordError::Io {
                what: "cannot remove",
                path,
                source,
            }),
        }
    }

    /// `(loads, stores)` from and to disk so far, for tests and benchmarks.
    pub fn io(&self) -> (u64, u64) {
        (self.loads.load(Relaxed), self.stores.load(Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
    struct Rec {
        n: u32,
    }

    fn store(layout: Layout) -> (tempfile::TempDir, RecordStore<Rec>) {
        let dir = tempfile::tempdir().unwrap();
        let s = RecordStore::new("record", dir.path(), layout, 4096);
        (dir, s)
    }

    #[test]
    fn a_record_is_read_once_per_version_of_its_file() {
        let (_dir, s) = store(Layout::File { suffix: ".json" });
        s.store("a", &Rec { n: 1 }).unwrap();
        assert_eq!(s.load("a").unwrap(), Rec { n: 1 });
        assert_eq!(s.load("a").unwrap(), Rec { n: 1 });
        assert_eq!(s.io(), (0, 1), "our own write costs no read");
        // Another process replaces it: seen at once.
        let other = RecordStore::<Rec>::new("record", &s.root, s.layout, 4096);
        other.store("a", &Rec { n: 2 }).unwrap();
        assert_eq!(s.load("a").unwrap(), Rec { n: 2 });
        assert_eq!(s.io(), (1, 1));
    }

    #[test]
    fn missing_corrupt_and_oversized_records_are_told_apart() {
        let (dir, s) = store(Layout::Dir { file: "rec.json" });
        assert!(matches!(s.load("a"), Err(RecordError::NotFound(_))));
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/rec.json"), "{").unwrap();
        assert!(matches!(s.load("a"), Err(RecordError::Corrupt { .. })));
        std::fs::write(dir.path().join("a/rec.json"), vec![b' '; 5000]).unwrap();
        assert!(matches!(s.load("a"), Err(RecordError::Io { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn only_vm_names_with_a_regular_record_are_listed() {
        let (dir, s) = store(Layout::File { suffix: ".json" });
        s.store("web", &Rec { n: 1 }).unwrap();
        std::fs::write(dir.path().join("bad name!.json"), "{}").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "").unwrap();
        std::os::unix::fs::symlink(dir.path().join("web.json"), dir.path().join("link.json"))
            .unwrap();
        assert_eq!(s.names().unwrap(), ["web"]);
        s.remove("web").unwrap();
        s.remove("web").unwrap();
        assert!(s.names().unwrap().is_empty());
    }

    #[test]
    fn a_failed_write_is_kept_and_written_before_the_next_read() {
        let (dir, s) = store(Layout::Dir { file: "rec.json" });
        // No VM directory yet: the write fails.
        assert!(s.store("a", &Rec { n: 7 }).is_err());
        assert!(s.exists("a"));
        std::fs::create_dir(dir.path().join("a")).unwrap();
        assert_eq!(s.load("a").unwrap(), Rec { n: 7 });
        assert!(dir.path().join("a/rec.json").is_file());
        assert_eq!(s.forget("a"), None);
    }
}
