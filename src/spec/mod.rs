//! ① Spec files → desired state: the YAML model, loading a directory,
//! validation with positioned errors, and the JSON Schema.

mod aliases;
mod cache;
mod error;
mod load;
mod locate;
mod placement;
pub mod policy;
mod schema;
mod shape;
mod validate;

/// The YAML shape of a spec document, shared with the data layer.
pub use crate::vm::config as model;
pub use crate::vm::config::*;
pub use aliases::{ALIAS_EXPANSION_FACTOR, MIN_ALIAS_EXPANSION_BYTES};
pub use cache::{Reload, SpecCache};
pub use error::{EXCERPT_CHARS, SpecError, SpecErrors};
pub use load::{
    Loaded, MAX_DOCUMENTS_PER_FILE, MAX_SPEC_FILE_BYTES, is_spec_file_name, load_dir,
    load_dir_placed, load_texts,
};
pub use placement::{HOST_LABEL, Placement, Selector, SelectorError};
pub use schema::json_schema;
pub use validate::{
    MAX_MEMORY_MB, MAX_PROCESSORS, MAX_SCSI_CONTROLLER, MAX_SCSI_LUN, MAX_SERIAL_PORT,
    MAX_UNIX_SOCKET_PATH, MAX_VPMEM_DEVICES, MAX_VPMEM_SIZE_BYTES, parse_guid, parse_mac,
    validate_document,
};

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// A VM whose spec loaded and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredVm {
    /// The VM's name (`metadata.name`).
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// Index of its document in that file.
    pub doc: usize,
    /// What it should be; values canonical, lists in file order. Shared:
    /// a watcher's reload clones the whole set on every change.
    pub config: std::sync::Arc<VmConfig>,
    /// What `export` recorded beside it (only read by `plan --observed`).
    pub status: Option<VmStatus>,
    /// Its `metadata.labels` (placement, and which maintenance windows
    /// govern it).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Everything the specs say, and what they could not say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredState {
    /// Valid VMs by name.
    pub vms: BTreeMap<String, DesiredVm>,
    /// Names of VMs whose specs failed to load: never planned, never pruned.
    pub unknown: BTreeSet<String>,
    /// Names of VMs whose (valid) specs place them on another host: not
    /// planned here; one this host has is a prune candidate.
    pub elsewhere: BTreeSet<String>,
    /// Names of VMs whose broken specs are all another host's (by path or
    /// labels): a VM of that name this host has is left alone, never
    /// pruned; their errors do not stop this host.
    pub unknown_elsewhere: BTreeSet<String>,
    /// Files that had any error. While this is not empty nothing is pruned,
    /// since a file that did not parse may have named any VM.
    pub failed_files: BTreeSet<PathBuf>,
    /// The placement that chose this host's VMs (`selector host=web-01`),
    /// when one did: named when a prune it would cause is refused.
    pub placed_by: Option<String>,
}

/// 1-based line and column of `field` (or its nearest ancestor) in
/// document `doc` of the spec file `file`, read again (bounded) for it: for
/// errors found after loading, such as apply's pre-flight.
pub fn field_position(file: &std::path::Path, doc: usize, field: &str) -> Option<(usize, usize)> {
    use std::io::Read;
    if field.is_empty() {
        return None;
    }
    let mut text = String::new();
    std::fs::File::open(file)
        .ok()?
        .take(MAX_SPEC_FILE_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    locate::Locations::index(text.trim_start_matches('\u{feff}')).find(doc, field)
}

#[cfg(test)]
mod tests;
