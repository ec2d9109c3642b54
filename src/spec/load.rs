//! Reading a directory of spec files into a [`DesiredState`].
//!
//! Files are read and parsed in parallel; every error of every file is
//! collected. A file with errors makes the VMs it names *unknown* (never
//! absent), and any error at all blocks pruning.

mod files;
mod merge;
mod messages;
mod parse;

pub(super) use files::{list_files, load_file, read_text};
pub(super) use merge::{merge, resolve};

/// The checks every YAML text passes before serde_yaml, and how its errors read.
pub(super) mod yaml {
    pub(in crate::spec) use super::messages::tame;
    pub(in crate::spec) use super::parse::refusal;
}

use super::error::SpecError;
use super::{DesiredState, DesiredVm, Placement};
use parse::parse_str;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Largest spec file read, in bytes.
pub const MAX_SPEC_FILE_BYTES: u64 = 1 << 20;
/// Most documents (VMs) in one file.
pub const MAX_DOCUMENTS_PER_FILE: usize = 1000;

/// What loading a directory produced: the VMs that loaded, and every error.
#[derive(Debug, Default)]
pub struct Loaded {
    /// VMs whose specs are valid, and the names of those whose specs are not.
    pub desired: DesiredState,
    /// Every problem, sorted by file and position (under placement: of the
    /// files that could hold a VM of this host).
    pub errors: Vec<SpecError>,
    /// Under placement, the problems of files whose VMs are all another
    /// host's (by their path or their labels): no concern of this host's.
    pub errors_elsewhere: Vec<SpecError>,
    /// The rollout policy beside the specs (`uvmctl-policy.yaml`), if there
    /// is one; one that does not load holds every disruptive change.
    pub policy: Option<std::sync::Arc<super::policy::Windows>>,
}

impl Loaded {
    /// Reads the rollout policy of `root` into what was loaded, its errors
    /// among the others.
    pub(super) fn with_policy(mut self, root: &Path) -> Self {
        let (policy, errors) = super::policy::load(root);
        self.policy = policy.map(std::sync::Arc::new);
        if !errors.is_empty() {
            self.errors.extend(errors);
            self.errors.sort();
        }
        self
    }
}

/// Whether a directory entry is a spec file: `*.yaml`/`*.yml`, not hidden.
/// Editor leftovers (`x.yaml~`, `.x.yaml.swp`, `.#x.yaml`, vim's `4913`)
/// fail one of the two tests.
pub fn is_spec_file_name(name: &str) -> bool {
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// A spec file to load: the name errors give it, and the path it is read from.
pub(super) struct SpecFile {
    /// As found under the root: what errors name.
    pub(super) name: PathBuf,
    /// What is opened: the resolved target of a symlink, otherwise `name`.
    pub(super) read: PathBuf,
}

/// Up to this many spec files are loaded without the thread pool.
const SEQUENTIAL_FILES: usize = 8;

/// Loads every spec under `root`. Never fails as a whole: problems are in
/// [`Loaded::errors`] and the VMs they concern in `desired.unknown`.
pub fn load_dir(root: &Path) -> Loaded {
    load_dir_placed(root, None)
}

/// Loads every spec under `root`, keeping as desired only the VMs
/// `placement` makes this host's (all without one). Names and MACs must be
/// unique over every spec; a writable image is checked among this host's.
pub fn load_dir_placed(root: &Path, placement: Option<&Placement>) -> Loaded {
    let mut errors = Vec::new();
    let files = list_files(root, &mut errors);
    let load = |f: &SpecFile| resolve(load_file(f));
    // A few files are read on this thread: starting the pool's threads
    // costs more than they save (a one-shot `apply` of one VM, issue 32).
    let results: Vec<FileResult> = if files.len() <= SEQUENTIAL_FILES {
        files.iter().map(load).collect()
    } else {
        files.par_iter().map(load).collect()
    };
    merge(
        &results.iter().collect::<Vec<_>>(),
        errors,
        placement.map(|p| (root, p)),
    )
    .with_policy(root)
}

/// Loads specs from in-memory files (name, text), as [`load_dir`] does from disk.
pub fn load_texts(files: &[(PathBuf, String)]) -> Loaded {
    let results: Vec<FileResult> = files
        .par_iter()
        .map(|(path, text)| resolve(parse_str(path, text.clone())))
        .collect();
    merge(&results.iter().collect::<Vec<_>>(), Vec::new(), None)
}

/// One error before it has a position: `pos` is filled by the loader,
/// from serde_yaml's mark or by re-reading the file.
#[derive(Debug)]
struct Pending {
    doc: usize,
    field: String,
    message: String,
    pos: Option<(usize, usize)>,
    /// Point at the field's last occurrence (a duplicated key).
    last: bool,
}

#[derive(Debug, Default)]
pub(super) struct FileResult {
    path: PathBuf,
    text: String,
    vms: Vec<DesiredVm>,
    /// The labels of each of `vms`, in the same order (for placement).
    labels: Vec<std::collections::BTreeMap<String, String>>,
    /// Names of VMs in this file whose documents have errors.
    unknown: Vec<String>,
    pending: Vec<Pending>,
    /// Errors that concern the whole file; after [`resolve`], all of the
    /// file's own errors, positioned.
    file_errors: Vec<SpecError>,
    /// The labels of each document with errors, where they could be read
    /// (`None`: not): which hosts the broken spec could be placed on.
    broken: Vec<Option<Labels>>,
    /// An error of the file as a whole (not YAML, too large, unreadable):
    /// it could define any VM, placed anywhere its path allows.
    whole: bool,
}

/// A document's `metadata.labels`.
type Labels = std::collections::BTreeMap<String, String>;
