//! From per-file results to one desired state: each file's errors given
//! positions in its text, then the results joined with the checks that
//! span files (names, MACs, writable images) and, under placement, each
//! error and VM sorted to this host or another's.

use super::{FileResult, Loaded, Pending};
use crate::spec::error::{SpecError, excerpt_bare};
use crate::spec::locate::Locations;
use crate::spec::{DesiredState, Placement};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// `pos` (1-based line and column) moved inside `text`: libyaml puts an
/// error at the end of a file that lacks its last newline one line past
/// it, and a position must always point at the file as the user sees it
/// (found by fuzzing: the one-byte file `[` was reported at 2:1).
fn within(text: &str, (line, column): (usize, usize)) -> (usize, usize) {
    let lines: Vec<&str> = text.split('\n').collect();
    let width = |n: usize| {
        lines
            .get(n - 1)
            .map_or(0, |l| l.trim_end_matches('\r').chars().count())
    };
    if line > lines.len() {
        // Past the end: the end of the last line.
        return (lines.len(), width(lines.len()) + 1);
    }
    let line = line.max(1);
    (line, column.clamp(1, width(line) + 1))
}

/// Where one VM's spec and a field of it live, for cross-VM errors. The
/// field path is only spelled out when there is an error to report.
#[derive(Clone)]
struct Site<'a> {
    vm: &'a str,
    file: usize,
    doc: usize,
    field: Field,
}

#[derive(Clone, Copy)]
enum Field {
    Name,
    Mac(usize),
    Image(crate::vm::config::ImageSite),
}

impl Site<'_> {
    /// A cross-VM error at this site: (file index, pending error).
    fn error(&self, message: String) -> (usize, Pending) {
        let pending = Pending {
            doc: self.doc,
            field: self.field.path(),
            message,
            pos: None,
            last: false,
        };
        (self.file, pending)
    }
}

impl Field {
    fn path(self) -> String {
        match self {
            Field::Name => "metadata.name".into(),
            Field::Mac(i) => format!("spec.networkAdapters[{i}].macAddress"),
            Field::Image(site) => site.field(),
        }
    }
}

/// Resolves a file's own errors to positions once, while its text is at hand,
/// so merging (done again on every change under `watch`) never re-reads it.
pub(in crate::spec) fn resolve(mut r: FileResult) -> FileResult {
    let mut errors = std::mem::take(&mut r.file_errors);
    if !r.pending.is_empty() {
        errors.extend(positioned(&r.path, &r.text, std::mem::take(&mut r.pending)));
    }
    r.file_errors = errors;
    r
}

/// `pending` as errors with positions in `text`, indexing it only when an
/// error has no position of its own.
fn positioned(path: &Path, text: &str, pending: Vec<Pending>) -> Vec<SpecError> {
    let needs_index = pending.iter().any(|p| p.pos.is_none());
    let locations = if needs_index {
        Locations::index(text)
    } else {
        Locations::default()
    };
    pending
        .into_iter()
        .map(|p| {
            let found = if p.last {
                locations.find_last(p.doc, &p.field)
            } else {
                locations.find(p.doc, &p.field)
            };
            let (line, column) = within(text, p.pos.or(found).unwrap_or((1, 1)));
            SpecError {
                file: path.to_path_buf(),
                line,
                column,
                field: p.field,
                message: p.message,
            }
        })
        .collect()
}

/// Joins per-file results into one desired state, adding the checks that
/// span files (names, MACs, writable images). Reads nothing from disk: it
/// runs again over cached results on every change a watcher sees.
pub(in crate::spec) fn merge(
    results: &[&FileResult],
    mut errors: Vec<SpecError>,
    placement: Option<(&Path, &Placement)>,
) -> Loaded {
    let mut desired = DesiredState::default();
    let here = |r: &FileResult, i: usize| {
        placement.is_none_or(|(root, p)| {
            let none = std::collections::BTreeMap::new();
            p.places_here(root, &r.path, r.labels.get(i).unwrap_or(&none))
        })
    };

    // Cross-VM checks, in file order so messages are deterministic.
    let mut cross: Vec<(usize, Pending)> = Vec::new();
    let mut unknown: BTreeSet<String> = BTreeSet::new();
    // Hash maps: these are only probed for clashes, and the errors they yield
    // are sorted at the end, so their order never shows.
    let mut by_name: HashMap<&str, Vec<Site>> = HashMap::new();
    let mut by_mac: HashMap<&str, Vec<Site>> = HashMap::new();
    let mut by_disk: HashMap<&std::ffi::OsStr, Vec<(Site, bool)>> = HashMap::new();
    for (fi, r) in results.iter().enumerate() {
        for (vi, vm) in r.vms.iter().enumerate() {
            let is_here = here(r, vi);
            let site = |field: Field| Site {
                vm: &vm.name,
                file: fi,
                doc: vm.doc,
                field,
            };
            by_name.entry(&vm.name).or_default().push(site(Field::Name));
            for (i, n) in vm.config.network_adapters.iter().enumerate() {
                by_mac
                    .entry(&n.mac_address)
                    .or_default()
                    .push(site(Field::Mac(i)));
            }
            // A host's own images: another host's VM may use the same path.
            if !is_here {
                continue;
            }
            for image in vm.config.images() {
                by_disk
                    .entry(image.path.as_os_str())
                    .or_default()
                    .push((site(Field::Image(image.site)), image.read_only));
            }
        }
        unknown.extend(r.unknown.iter().cloned());
    }
    let where_is = |s: &Site| results[s.file].path.display().to_string();
    for (name, sites) in &by_name {
        // A name whose other spec is broken still clashes: plan neither.
        if sites.len() > 1 || unknown.contains(*name) {
            for s in sites {
                let others: Vec<String> = sites
                    .iter()
                    .filter(|o| o.file != s.file || o.doc != s.doc)
                    .map(&where_is)
                    .collect();
                let msg = if others.is_empty() {
                    format!("VM {name:?} is also defined in a spec that failed to load")
                } else {
                    format!("VM {name:?} is also defined in {}", others.join(", "))
                };
                cross.push(s.error(msg));
            }
        }
    }
    for (mac, sites) in &by_mac {
        let vms: BTreeSet<&str> = sites.iter().map(|s| s.vm).collect();
        if vms.len() > 1 {
            for s in sites {
                let others: Vec<&str> = vms.iter().copied().filter(|v| *v != s.vm).collect();
                let msg = format!("MAC {mac} is also used by VM {}", others.join(", "));
                cross.push(s.error(msg));
            }
        }
    }
    for (path, sites) in &by_disk {
        let vms: BTreeSet<&str> = sites.iter().map(|(s, _)| s.vm).collect();
        if vms.len() > 1 && sites.iter().any(|(_, ro)| !ro) {
            for (s, _) in sites {
                let others: Vec<&str> = vms.iter().copied().filter(|v| *v != s.vm).collect();
                let msg = format!(
                    "{} is also attached by VM {}; an image attached writable can belong to one VM only",
                    excerpt_bare(&Path::new(path).display().to_string()),
                    others.join(", ")
                );
                cross.push(s.error(msg));
            }
        }
    }
    let mut bad_vms: BTreeSet<String> = BTreeSet::new();
    // Files with a cross-VM error at a VM of this host's.
    let mut cross_here: std::collections::HashSet<usize> = std::collections::HashSet::new();
    for (fi, p) in &cross {
        let r = &results[*fi];
        if let Some((vi, vm)) = r.vms.iter().enumerate().find(|(_, v)| v.doc == p.doc) {
            bad_vms.insert(vm.name.clone());
            if here(r, vi) {
                cross_here.insert(*fi);
            }
        }
    }
    // Under placement, a file's errors are this host's only when the file
    // could hold one of its VMs: its path is in the placement path and,
    // where the broken documents' labels could be read, they match (issue
    // 30: one broken spec made every host refuse a revision). A file that
    // is not YAML at all could be anyone's its path allows.
    let relevant = |fi: usize, r: &FileResult| {
        let Some((root, p)) = placement else {
            return true;
        };
        if let Some(path) = &p.path
            && !r.path.starts_with(root.join(path))
        {
            return false;
        }
        r.whole
            || cross_here.contains(&fi)
            || r.broken
                .iter()
                .any(|l| l.as_ref().is_none_or(|l| p.selector.matches(l)))
    };
    let mut cross_by_file: HashMap<usize, Vec<Pending>> = HashMap::new();
    for (fi, p) in cross {
        cross_by_file.entry(fi).or_default().push(p);
    }
    unknown.extend(bad_vms.iter().cloned());

    let mut loaded_vms = Vec::new();
    let mut errors_elsewhere = Vec::new();
    let mut unknown_here = BTreeSet::new();
    let mut unknown_elsewhere = BTreeSet::new();
    for (fi, r) in results.iter().enumerate() {
        let cross_errors = cross_by_file
            .remove(&fi)
            .map(|pending| positioned(&r.path, &r.text, pending))
            .unwrap_or_default();
        if !r.file_errors.is_empty() || !cross_errors.is_empty() {
            let names = r.unknown.iter().chain(
                r.vms
                    .iter()
                    .map(|v| &v.name)
                    .filter(|n| bad_vms.contains(*n)),
            );
            let file_errors = r.file_errors.iter().cloned().chain(cross_errors);
            if relevant(fi, r) {
                errors.extend(file_errors);
                unknown_here.extend(names.cloned());
            } else {
                errors_elsewhere.extend(file_errors);
                unknown_elsewhere.extend(names.cloned());
            }
        }
        for (vi, vm) in r.vms.iter().enumerate() {
            if unknown.contains(&vm.name) {
                continue;
            }
            if here(r, vi) {
                loaded_vms.push(vm.clone());
            } else {
                desired.elsewhere.insert(vm.name.clone());
            }
        }
    }
    // Built in one go from a list: much cheaper than 10,000 single inserts.
    desired.vms = loaded_vms
        .into_iter()
        .map(|vm| (vm.name.clone(), vm))
        .collect();
    for e in &errors {
        desired.failed_files.insert(e.file.clone());
    }
    // A broken spec of another host's: its VM is left alone here if this
    // host has it (never pruned), and not this host's to mention otherwise.
    unknown_elsewhere.retain(|n| !unknown_here.contains(n));
    desired.unknown = unknown_here;
    desired.unknown_elsewhere = unknown_elsewhere;
    desired.placed_by = placement.map(|(_, p)| p.to_string());
    errors.sort();
    errors.dedup();
    errors_elsewhere.sort();
    errors_elsewhere.dedup();
    Loaded {
        desired,
        errors,
        errors_elsewhere,
        policy: None,
    }
}
