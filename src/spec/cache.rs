//! Reloading a spec directory incrementally, for `watch`: a change re-reads
//! only the files it touched, while the checks that span files (duplicate
//! names, MACs, writable images) run again over the whole cached set, so
//! they hold exactly as in a full [`load_dir`](super::load_dir).

use super::load::{FileResult, SpecFile, list_files, load_file, merge, resolve};
use super::{Loaded, Placement};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// Which files a reload reads again. Files new to the listing, gone from it,
/// or whose link now points elsewhere (a `..data` symlink swap) are always
/// handled; the mode says what else.
#[derive(Debug, Clone, Copy)]
pub enum Reload<'a> {
    /// Every file: nothing cached is trusted.
    All,
    /// The files named (as listed, or as their link resolves), as a file
    /// watcher reported them.
    Paths(&'a HashSet<PathBuf>),
    /// Files whose inode, size, mtime or ctime changed: a rescan that needs
    /// no events (lost events, file systems that send none).
    Stamps,
}

use crate::hostfs::Stamp;

fn stamp(path: &Path) -> Option<Stamp> {
    crate::hostfs::stamp(path, true).ok()
}

struct Cached {
    read: PathBuf,
    /// Taken before the read: a write during it shows as a change next time.
    stamp: Option<Stamp>,
    result: FileResult,
}

/// A spec directory's files, parsed, kept between reloads.
pub struct SpecCache {
    root: PathBuf,
    /// By name as listed; keyed by its bytes (hashing a `Path` walks its
    /// components, and this map is probed once per file on every reload).
    files: HashMap<OsString, Cached>,
    last_reads: usize,
    placement: Option<Placement>,
}

impl SpecCache {
    /// An empty cache of the specs under `root` (a directory or one file).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SpecCache {
            root: root.into(),
            files: HashMap::new(),
            last_reads: 0,
            placement: None,
        }
    }

    /// The same, keeping as desired only the VMs `placement` makes this
    /// host's ([`load_dir_placed`](super::load_dir_placed)).
    pub fn placed(root: impl Into<PathBuf>, placement: Option<Placement>) -> Self {
        SpecCache {
            placement,
            ..SpecCache::new(root)
        }
    }

    /// The directory (or file) it loads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How many files the last reload read.
    pub fn last_reads(&self) -> usize {
        self.last_reads
    }

    /// Lists the directory again, reads what `how` says, and returns the
    /// whole desired state, as [`load_dir`](super::load_dir) would.
    pub fn reload(&mut self, how: Reload<'_>) -> Loaded {
        let mut errors = Vec::new();
        let listed = list_files(&self.root, &mut errors);
        let names: HashSet<&OsStr> = listed.iter().map(|f| f.name.as_os_str()).collect();
        self.files
            .retain(|name, _| names.contains(name.as_os_str()));
        let todo: Vec<&SpecFile> = listed
            .iter()
            .filter(|f| match self.files.get(f.name.as_os_str()) {
                None => true,
                Some(c) if c.read != f.read => true,
                Some(c) => match how {
                    Reload::All => true,
                    Reload::Paths(set) => set.contains(&f.name) || set.contains(&f.read),
                    Reload::Stamps => stamp(&f.read) != c.stamp,
                },
            })
            .collect();
        let fresh: Vec<(OsString, Cached)> = todo
            .par_iter()
            .map(|f| {
                let stamp = stamp(&f.read);
                let result = resolve(load_file(f));
                let read = f.read.clone();
                (
                    f.name.clone().into_os_string(),
                    Cached {
                        read,
                        stamp,
                        result,
                    },
                )
            })
            .collect();
        self.last_reads = fresh.len();
        self.files.extend(fresh);
        let results: Vec<&FileResult> = listed
            .iter()
            .filter_map(|f| self.files.get(f.name.as_os_str()).map(|c| &c.result))
            .collect();
        merge(
            &results,
            errors,
            self.placement.as_ref().map(|p| (self.root.as_path(), p)),
        )
        .with_policy(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::load_dir;
    use std::fs;

    fn spec(name: &str, mac: &str, mb: u64) -> String {
        format!(
            "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: {name}\n\
             spec:\n  boot:\n    linuxKernelDirect:\n      kernel: /k/vmlinuz\n  \
             processors:\n    count: 1\n  memory:\n    sizeMB: {mb}\n  networkAdapters:\n    \
             - nicId: 00000000-0000-0000-0000-000000000001\n      endpointId: user\n      \
             macAddress: \"{mac}\"\n"
        )
    }

    fn paths(p: &[&Path]) -> HashSet<PathBuf> {
        p.iter().map(|p| p.to_path_buf()).collect()
    }

    #[test]
    fn a_change_rereads_only_its_file_and_the_result_equals_a_full_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..5 {
            let mac = format!("02:00:00:00:00:0{i}");
            fs::write(
                dir.path().join(format!("vm{i}.yaml")),
                spec(&format!("vm{i}"), &mac, 256),
            )
            .expect("write");
        }
        let mut cache = SpecCache::new(dir.path());
        let first = cache.reload(Reload::All);
        assert_eq!(cache.last_reads(), 5);
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        assert_eq!(first.desired, load_dir(dir.path()).desired);

        let two = dir.path().join("vm2.yaml");
        fs::write(&two, spec("vm2", "02:00:00:00:00:02", 512)).expect("write");
        let again = cache.reload(Reload::Paths(&paths(&[&two])));
        assert_eq!(cache.last_reads(), 1);
        assert_eq!(again.desired.vms["vm2"].config.memory.size_mb, 512);
        assert_eq!(again.desired, load_dir(dir.path()).desired);

        // Nothing named, nothing changed on disk: nothing read.
        let same = cache.reload(Reload::Stamps);
        assert_eq!(cache.last_reads(), 0);
        assert_eq!(same.desired, again.desired);
    }

    #[test]
    fn cross_file_checks_hold_when_only_one_file_is_reread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yaml");
        fs::write(&a, spec("a", "02:00:00:00:00:0a", 256)).expect("write");
        fs::write(&b, spec("b", "02:00:00:00:00:0b", 256)).expect("write");
        let mut cache = SpecCache::new(dir.path());
        assert!(cache.reload(Reload::All).errors.is_empty());

        // b now takes a's MAC: both become unknown, though only b was read.
        fs::write(&b, spec("b", "02:00:00:00:00:0a", 256)).expect("write");
        let clash = cache.reload(Reload::Paths(&paths(&[&b])));
        assert_eq!(cache.last_reads(), 1);
        assert_eq!(clash.errors.len(), 2, "{:?}", clash.errors);
        assert!(clash.desired.vms.is_empty());
        assert_eq!(clash.errors, load_dir(dir.path()).errors);

        fs::remove_file(&b).expect("remove");
        let fixed = cache.reload(Reload::Paths(&paths(&[&b])));
        assert_eq!(cache.last_reads(), 0, "a removed file is not read");
        assert!(fixed.errors.is_empty());
        assert_eq!(fixed.desired.vms.keys().collect::<Vec<_>>(), ["a"]);
    }

    #[cfg(unix)]
    #[test]
    fn stamps_find_an_edit_no_event_reported_and_a_swapped_link_is_reread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data1 = dir.path().join("..v1");
        let data2 = dir.path().join("..v2");
        fs::create_dir(&data1).expect("mkdir");
        fs::create_dir(&data2).expect("mkdir");
        fs::write(data1.join("vm.yaml"), spec("vm", "02:00:00:00:00:01", 256)).expect("write");
        fs::write(data2.join("vm.yaml"), spec("vm", "02:00:00:00:00:01", 768)).expect("write");
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).expect("link");
        std::os::unix::fs::symlink("..data/vm.yaml", dir.path().join("vm.yaml")).expect("link");
        let mut cache = SpecCache::new(dir.path());
        let first = cache.reload(Reload::All);
        assert_eq!(first.desired.vms["vm"].config.memory.size_mb, 256);

        // Kubernetes' atomic swap: a new `..data` link renamed over the old.
        std::os::unix::fs::symlink("..v2", dir.path().join("..tmp")).expect("link");
        fs::rename(dir.path().join("..tmp"), dir.path().join("..data")).expect("rename");
        let swapped = cache.reload(Reload::Paths(&HashSet::new()));
        assert_eq!(cache.last_reads(), 1);
        assert_eq!(swapped.desired.vms["vm"].config.memory.size_mb, 768);

        // An edit no watcher reported, with a new size: found by its stamp.
        fs::write(data2.join("vm.yaml"), spec("vm", "02:00:00:00:00:01", 1024)).expect("write");
        let edited = cache.reload(Reload::Stamps);
        assert_eq!(cache.last_reads(), 1);
        assert_eq!(edited.desired.vms["vm"].config.memory.size_mb, 1024);
    }
}
