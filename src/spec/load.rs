//! Reading a directory of spec files into a [`DesiredState`].
//!
//! Files are read and parsed in parallel; every error of every file is
//! collected. A file with errors makes the VMs it names *unknown* (never
//! absent), and any error at all blocks pruning.

use super::aliases;
use super::error::{SpecError, excerpt_bare, excerpt_escaped, excerpt_unquoted};
use super::locate::Locations;
use super::validate::{Problem, validate_document};
use super::{DesiredState, DesiredVm, Placement};
use crate::vm::config::VmDocument;
use nix::libc;
use rayon::prelude::*;
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
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

/// Lists spec files under `root` (or `root` itself if it is a file), sorted.
/// Hidden directories are skipped and symlinked directories are not followed,
/// so a `.git` or a link loop never gets walked.
///
/// A spec file that is a symlink is followed only to a target inside the
/// (resolved) root: a `*.yaml` link to `/etc/shadow` in a spec directory that
/// came from a pull request is refused by name, never opened. `root` itself
/// may be a symlink: the user named it.
pub(super) fn list_files(root: &Path, errors: &mut Vec<SpecError>) -> Vec<SpecFile> {
    let mut out = Vec::new();
    let resolved = |path: &Path, errors: &mut Vec<SpecError>| match fs::canonicalize(path) {
        Ok(p) => Some(p),
        Err(e) => {
            errors.push(SpecError::whole_file(path, format!("cannot read: {e}")));
            None
        }
    };
    let root_target = match fs::metadata(root) {
        Ok(m) if m.is_file() => {
            return resolved(root, errors)
                .map(|read| SpecFile {
                    name: root.to_path_buf(),
                    read,
                })
                .into_iter()
                .collect();
        }
        Ok(m) if m.is_dir() => match resolved(root, errors) {
            Some(r) => r,
            None => return out,
        },
        Ok(_) => {
            errors.push(SpecError::whole_file(
                root,
                "not a directory or regular file",
            ));
            return out;
        }
        Err(e) => {
            errors.push(SpecError::whole_file(root, format!("cannot read: {e}")));
            return out;
        }
    };
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(SpecError::whole_file(
                    &dir,
                    format!("cannot read directory: {e}"),
                ));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    errors.push(SpecError::whole_file(
                        &dir,
                        format!("cannot read directory: {e}"),
                    ));
                    continue;
                }
            };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_symlink() && is_spec_file_name(&name) => {
                    match fs::canonicalize(&path) {
                        Ok(read) if read.starts_with(&root_target) => {
                            out.push(SpecFile { name: path, read });
                        }
                        Ok(_) => errors.push(SpecError::whole_file(
                            &path,
                            "symlink to a file outside the spec directory; not read",
                        )),
                        Err(e) => errors.push(SpecError::whole_file(
                            &path,
                            format!("symlink that does not resolve ({e}); not read"),
                        )),
                    }
                }
                Ok(_) if is_spec_file_name(&name) => out.push(SpecFile {
                    read: path.clone(),
                    name: path,
                }),
                Ok(_) => {}
                Err(e) => errors.push(SpecError::whole_file(&path, format!("cannot stat: {e}"))),
            }
        }
    }
    // Byte order: as deterministic as component order, and much cheaper.
    out.sort_by(|a, b| a.name.as_os_str().cmp(b.name.as_os_str()));
    out
}

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
    let results: Vec<FileResult> = files.par_iter().map(|f| resolve(load_file(f))).collect();
    merge(
        &results.iter().collect::<Vec<_>>(),
        errors,
        placement.map(|p| (root, p)),
    )
}

/// Loads specs from in-memory files (name, text), as [`load_dir`] does from disk.
pub fn load_texts(files: &[(PathBuf, String)]) -> Loaded {
    let results: Vec<FileResult> = files
        .par_iter()
        .map(|(path, text)| resolve(parse_str(path, text.clone())))
        .collect();
    merge(&results.iter().collect::<Vec<_>>(), Vec::new(), None)
}

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

/// The labels of a document's YAML tree, when they read as labels (none
/// given: empty).
fn tree_labels(tree: &serde_yaml::Value) -> Option<Labels> {
    match tree.get("metadata").and_then(|m| m.get("labels")) {
        None | Some(serde_yaml::Value::Null) => Some(Labels::new()),
        Some(serde_yaml::Value::Mapping(m)) => m
            .iter()
            .map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
            .collect(),
        Some(_) => None,
    }
}

pub(super) fn load_file(file: &SpecFile) -> FileResult {
    let path = file.name.as_path();
    let fail = |msg: String| FileResult {
        path: path.to_path_buf(),
        file_errors: vec![SpecError::whole_file(path, msg)],
        whole: true,
        ..FileResult::default()
    };
    // Read only regular files: a FIFO or a device would block or stream
    // forever. `read` holds no symlink (list_files resolved it), so a link
    // put in its place since is refused (O_NOFOLLOW), as is anything swapped
    // in that is not a regular file (checked again on the open file).
    let meta = match fs::symlink_metadata(&file.read) {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot stat: {e}")),
    };
    if !meta.is_file() {
        return fail("not a regular file".to_string());
    }
    if meta.len() > MAX_SPEC_FILE_BYTES {
        return fail(format!(
            "file is {} bytes, over the {MAX_SPEC_FILE_BYTES}-byte limit",
            meta.len()
        ));
    }
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&file.read);
    let f = match opened {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot read: {e}")),
    };
    match f.metadata() {
        Ok(m) if m.is_file() => {}
        Ok(_) => return fail("not a regular file".to_string()),
        Err(e) => return fail(format!("cannot stat: {e}")),
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow between stat and read: never read past the limit.
    if let Err(e) = f.take(MAX_SPEC_FILE_BYTES + 1).read_to_end(&mut bytes) {
        return fail(format!("cannot read: {e}"));
    }
    if bytes.len() as u64 > MAX_SPEC_FILE_BYTES {
        return fail(format!("file is over the {MAX_SPEC_FILE_BYTES}-byte limit"));
    }
    match String::from_utf8(bytes) {
        Ok(text) => parse_str(path, text),
        Err(e) => fail(format!(
            "not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )),
    }
}

/// Broken documents read again as plain YAML trees, by a second pass over
/// the file that only moves forward: however many documents are broken, the
/// file is read at most once more. (Reading each from the start made a file
/// of many broken documents quadratic.)
struct Broken<'a> {
    docs: serde_yaml::Deserializer<'a>,
    /// Index of the document `docs` yields next.
    next: usize,
}

impl<'a> Broken<'a> {
    fn new(text: &'a str) -> Self {
        Broken {
            docs: serde_yaml::Deserializer::from_str(text),
            next: 0,
        }
    }

    /// Document `doc` as a YAML tree, if it reads as one; `None` for a
    /// document before the last one asked for.
    fn tree(&mut self, doc: usize) -> Option<serde_yaml::Value> {
        let de = self.docs.nth(doc.checked_sub(self.next)?)?;
        self.next = doc + 1;
        // As in parse_str: serde_yaml's panic is the file's error, no more.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serde_yaml::Value::deserialize(de).ok()
        }))
        .ok()
        .flatten()
    }
}

/// Every error of document `doc`, which serde refused with `e`: its whole
/// shape (`shape`), then the per-field rules over what of it is sound; the
/// VM it names, if it names one.
fn document_errors(
    doc: usize,
    e: &serde_yaml::Error,
    tree: Option<serde_yaml::Value>,
) -> (Vec<Pending>, Option<String>, Option<Labels>) {
    let Some(tree) = tree else {
        return (vec![from_yaml_error(doc, e)], None, None);
    };
    let labels = tree_labels(&tree);
    let name = tree
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(serde_yaml::Value::as_str)
        .map(str::to_string);
    let shape = super::shape::check(&tree);
    if shape.problems.is_empty() {
        // Nothing the schema states: serde's own word (a duplicate key...).
        return (vec![from_yaml_error(doc, e)], name, labels);
    }
    let pending = |(field, message): Problem| Pending {
        doc,
        field,
        message,
        pos: None,
        last: false,
    };
    // The fault serde stopped at keeps serde's position, which is the
    // value's own (the walk names fields, which find their keys).
    let serde = from_yaml_error(doc, e);
    let last = |field: &str| {
        field
            .rsplit(['.', '['])
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let mut matched = false;
    let mut out: Vec<Pending> = shape
        .problems
        .into_iter()
        .map(|(field, message)| {
            let same = field == serde.field
                || (field.starts_with(&serde.field)
                    && serde.message.contains(&format!("`{}`", last(&field))));
            matched |= same;
            Pending {
                pos: if same { serde.pos } else { None },
                ..pending((field, message))
            }
        })
        .collect();
    // A fault the schema does not state (a MAC serde parses, say) is still
    // said, in serde's words.
    if !matched {
        out.push(serde);
    }
    if let Ok(mut rest) = serde_yaml::from_value::<VmDocument>(shape.repaired) {
        let under = |field: &str| {
            shape.touched.iter().any(|t| {
                field == t
                    || field
                        .strip_prefix(t.as_str())
                        .is_some_and(|r| r.starts_with(['.', '[']))
            })
        };
        out.extend(
            validate_document(&mut rest)
                .into_iter()
                .filter(|(field, _)| !under(field))
                .map(pending),
        );
    }
    (out, name, labels)
}

/// Deepest flow nesting (`[`, `{`) accepted. Real specs nest a few levels;
/// the YAML parser slows down badly on thousands.
pub const MAX_FLOW_NESTING: usize = 64;

/// Position of the first flow bracket nested deeper than `limit`, skipping
/// quoted scalars and comments. Block nesting needs indentation, which the
/// file size limit already bounds.
fn too_deep(text: &str, limit: usize) -> Option<(usize, usize)> {
    // Fast path: too few nesting characters to nest that deep at all.
    let openers = text
        .bytes()
        .filter(|b| matches!(b, b'[' | b'{' | b'-' | b'?'))
        .count();
    if openers <= limit {
        return None;
    }
    let (mut depth, mut line, mut col) = (0usize, 1usize, 0usize);
    let (mut quote, mut comment, mut prev) = (None::<char>, false, '\n');
    // Compact block nesting (`- - - x`, `? ? x`) on one line nests without brackets.
    let (mut line_start, mut compact) = (true, 0usize);
    for c in text.chars() {
        col += 1;
        if c == '\n' {
            (line, col, comment, line_start, compact) = (line + 1, 0, false, true, 0);
            prev = c;
            continue;
        }
        if line_start && quote.is_none() {
            match c {
                ' ' | '\t' => {}
                '-' | '?' => {
                    compact += 1;
                    if compact > limit {
                        return Some((line, col));
                    }
                }
                _ => line_start = false,
            }
        }
        if comment {
        } else if let Some(q) = quote {
            if c == q {
                quote = None;
            }
        } else {
            match c {
                '#' if prev.is_whitespace() => comment = true,
                '\'' | '"' => quote = Some(c),
                '[' | '{' => {
                    depth += 1;
                    if depth > limit {
                        return Some((line, col));
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        prev = c;
    }
    None
}

/// The UTF-8 byte order mark some Windows editors write.
const BOM: char = '\u{feff}';

/// Parses and validates one file's text. [`load_dir`] and [`load_texts`]
/// both come through here, so a fuzzer on `load_texts` covers every check
/// but the reading itself.
fn parse_str(path: &Path, mut text: String) -> FileResult {
    let mut r = FileResult {
        path: path.to_path_buf(),
        ..FileResult::default()
    };
    if text.len() as u64 > MAX_SPEC_FILE_BYTES {
        r.whole = true;
        r.file_errors.push(SpecError::whole_file(
            path,
            format!(
                "file is {} bytes, over the {MAX_SPEC_FILE_BYTES}-byte limit",
                text.len()
            ),
        ));
        return r;
    }
    // libyaml and yaml-rust2 disagree on a byte order mark, and it is no
    // content: drop it. Columns on line 1 then count from the first character
    // an editor shows, as on every other line.
    if text.starts_with(BOM) {
        text.drain(..BOM.len_utf8());
    }
    // Refused before serde_yaml reads it: where, why, and whether yaml-rust2
    // may read it for the VM names (not when nested too deep for it).
    let refused = if let Some(pos) = too_deep(&text, MAX_FLOW_NESTING) {
        let message = format!("nesting deeper than {MAX_FLOW_NESTING} levels");
        Some((pos, message, false))
    } else if text.contains('*') {
        // Every alias starts with `*`, and nearly no spec has one: this
        // memchr keeps the extra pass over the events off the happy path.
        aliases::check(&text)
            .err()
            .map(|a| ((a.line, a.column), a.message, true))
    } else {
        None
    };
    if let Some((pos, message, nameable)) = refused {
        r.whole = true;
        if nameable {
            // Names without deserializing, so without expanding any alias.
            r.unknown.extend(Locations::index(&text).names);
        }
        r.pending.push(Pending {
            doc: 0,
            field: String::new(),
            message,
            pos: Some(pos),
            last: false,
        });
        r.text = text;
        return r;
    }
    let mut broken = None;
    // A document's error, held until the next document shows whether it was
    // the document's own or the whole file's.
    let mut held: Option<(usize, serde_yaml::Error)> = None;
    let too_many = |r: &mut FileResult| {
        r.whole = true;
        SpecError::whole_file(
            path,
            format!("more than {MAX_DOCUMENTS_PER_FILE} documents in one file"),
        )
    };
    for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        // serde_yaml (deprecated upstream) panics on some inputs that libyaml
        // and yaml-rust2 read differently, such as `[&a:*b]` (found by
        // fuzzing). A spec file may come from anyone: its parser failing is
        // that file's error, never the end of the whole load.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Option::<VmDocument>::deserialize(de)
        }));
        let Ok(result) = parsed else {
            parser_failed(&mut r, i, &text);
            held = None;
            break;
        };
        if let Some((j, e)) = held.take() {
            // libyaml stops for good at a syntax error, and serde_yaml then
            // hands that same error to every later document, forever. Given
            // again verbatim, it is the file's: it ends the file, once.
            if matches!(&result, Err(again) if same_error(again, &e)) {
                stream_error(&mut r, j, &e, &text);
                break;
            }
            if j >= MAX_DOCUMENTS_PER_FILE {
                let e = too_many(&mut r);
                r.file_errors.push(e);
                break;
            }
            let broken = broken.get_or_insert_with(|| Broken::new(&text));
            let (errors, name, labels) = document_errors(j, &e, broken.tree(j));
            r.pending.extend(errors);
            r.unknown.extend(name);
            r.broken.push(labels);
        }
        let mut doc = match result {
            // Past the cap, an error is held too: a syntax error in the last
            // document may only surface in the next, and is then the file's.
            Ok(_) if i >= MAX_DOCUMENTS_PER_FILE => {
                let e = too_many(&mut r);
                r.file_errors.push(e);
                break;
            }
            Ok(Some(doc)) => doc,
            // An empty document (a stray `---`, a file of comments) is no VM.
            Ok(None) => continue,
            // After an unknown anchor serde_yaml resumes mid-document, and
            // reading on panics (a mapping's end where a document should
            // start). The alias check refuses these first; this stays for
            // any the two parsers see differently.
            Err(e) if e.to_string().starts_with("unknown anchor") => {
                stream_error(&mut r, i, &e, &text);
                break;
            }
            Err(e) => {
                held = Some((i, e));
                continue;
            }
        };
        let problems: Vec<Problem> = validate_document(&mut doc);
        if problems.is_empty() {
            r.labels.push(std::mem::take(&mut doc.metadata.labels));
            r.vms.push(DesiredVm {
                name: doc.metadata.name,
                file: path.to_path_buf(),
                doc: i,
                config: std::sync::Arc::new(doc.spec),
                status: doc.status,
            });
        } else {
            r.unknown.push(doc.metadata.name);
            r.broken
                .push(Some(std::mem::take(&mut doc.metadata.labels)));
            r.pending
                .extend(problems.into_iter().map(|(field, message)| Pending {
                    doc: i,
                    field,
                    message,
                    pos: None,
                    last: false,
                }));
        }
    }
    if let Some((j, e)) = held {
        if j >= MAX_DOCUMENTS_PER_FILE {
            let e = too_many(&mut r);
            r.file_errors.push(e);
        } else {
            let broken = broken.get_or_insert_with(|| Broken::new(&text));
            let (errors, name, labels) = document_errors(j, &e, broken.tree(j));
            r.pending.extend(errors);
            r.unknown.extend(name);
            r.broken.push(labels);
        }
    }
    // The second reader borrows the text (and serde_yaml's parser has a Drop).
    drop(broken);
    r.text = text;
    r
}

/// The same error, at the same place.
fn same_error(a: &serde_yaml::Error, b: &serde_yaml::Error) -> bool {
    let at = |e: &serde_yaml::Error| e.location().map(|l| (l.index(), l.line(), l.column()));
    at(a) == at(b) && a.to_string() == b.to_string()
}

/// Records `e`, found in document `doc`, as the file's only error: the file
/// is not YAML past it. Every VM the file names is unknown.
fn stream_error(r: &mut FileResult, doc: usize, e: &serde_yaml::Error, text: &str) {
    r.whole = true;
    r.pending.clear();
    r.pending.push(Pending {
        doc,
        field: String::new(),
        message: format!("not valid YAML: {}", tame(&strip_marks(&e.to_string()))),
        pos: e.location().map(|l| (l.line(), l.column())),
        last: false,
    });
    r.unknown.extend(r.vms.drain(..).map(|v| v.name));
    // serde_yaml cannot name the VM of a document cut short; yaml-rust2
    // reads up to the fault, and past it where it disagrees: one more pass,
    // once per broken file.
    r.unknown.extend(Locations::index(text).names);
}

/// The YAML parser failed on document `doc` (it panicked): the file is
/// refused as a whole, at the start of that document, and every VM it names
/// is unknown.
fn parser_failed(r: &mut FileResult, doc: usize, text: &str) {
    r.whole = true;
    r.pending.clear();
    r.pending.push(Pending {
        doc,
        field: String::new(),
        message: "not valid YAML: the YAML parser failed on this document; refused".into(),
        pos: None,
        last: false,
    });
    r.unknown.extend(r.vms.drain(..).map(|v| v.name));
    r.unknown.extend(Locations::index(text).names);
}

/// `msg` without libyaml's ` at line L column C` and ` at position N`: the
/// error carries its position apart.
fn strip_marks(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(" at ") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 4..];
        let digits = |s: &str| s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let skip = if let Some(t) = tail.strip_prefix("line ") {
            let n = digits(t);
            t[n..]
                .strip_prefix(" column ")
                .filter(|c| n > 0 && digits(c) > 0)
                .map(|c| msg.len() - c.len() + digits(c))
        } else if let Some(t) = tail.strip_prefix("position ") {
            Some(msg.len() - t.len() + digits(t)).filter(|_| digits(t) > 0)
        } else {
            None
        };
        match skip {
            Some(end) => rest = &msg[end..],
            None => {
                out.push_str(" at ");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `parent.name` when `msg` is `<prefix>name` followed by a backquote.
fn child_field(msg: &str, prefix: &str, parent: &str) -> Option<String> {
    let name = msg.strip_prefix(prefix)?.strip_suffix('`')?;
    Some(if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    })
}

/// Splits serde_yaml's `path: message at line L column C` into its parts.
fn from_yaml_error(doc: usize, e: &serde_yaml::Error) -> Pending {
    let mut msg = e.to_string();
    if let Some(i) = msg.rfind(" at line ")
        && msg[i + 9..].split(" column ").count() == 2
    {
        msg.truncate(i);
    }
    let mut field = String::new();
    if let Some((head, tail)) = msg.split_once(": ") {
        let is_path = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '[' | ']' | '_'));
        if is_path {
            field = head.to_string();
            msg = tail.to_string();
        }
    }
    msg = tame(&msg);
    // serde names the field in the message and its parent as the path:
    // "spec: missing field `boot`" reads better as "spec.boot: missing field".
    if let Some(f) = child_field(&msg, "missing field `", &field) {
        field = f;
        msg = "required field is missing".to_string();
    }
    // A duplicated key: point at its second copy, not at the parent mapping.
    if let Some(f) = child_field(&msg, "duplicate field `", &field) {
        field = f;
        let message = "duplicate key: each key may appear once".to_string();
        return Pending {
            doc,
            field,
            message,
            pos: None,
            last: true,
        };
    }
    let pos = e.location().map(|l| (l.line(), l.column()));
    Pending {
        doc,
        field,
        message: msg,
        pos,
        last: false,
    }
}

/// Most characters of a parser message of no shape [`tame`] knows.
const MAX_MESSAGE_CHARS: usize = 160;

/// serde's messages quote the input they refuse in full (`` unknown field
/// `…` ``, `invalid type: string "…"`), and the field may hold anything: cut
/// each quote to an escaped excerpt. Any other message is escaped and cut as
/// a whole, in case it quotes input too.
fn tame(msg: &str) -> String {
    // The quote ends at the last separator: what follows is the schema's,
    // and the input may hold a separator too.
    let quoted = |open: &str, closes: &[&str]| {
        let rest = msg.strip_prefix(open)?;
        let end = closes.iter().filter_map(|c| rest.rfind(c)).max()?;
        Some((open.len(), open.len() + end))
    };
    let raw = ["`, expected ", "`, there are no "];
    for open in [
        "unknown field `",
        "unknown variant `",
        "invalid type: character `",
        "invalid value: character `",
    ] {
        if let Some((a, b)) = quoted(open, &raw) {
            return format!("{}{}{}", &msg[..a], excerpt_unquoted(&msg[a..b]), &msg[b..]);
        }
    }
    // serde quotes strings with `{:?}`: already escaped.
    for open in ["invalid type: string \"", "invalid value: string \""] {
        if let Some((a, b)) = quoted(open, &["\", expected "]) {
            return format!("{}{}{}", &msg[..a], excerpt_escaped(&msg[a..b]), &msg[b..]);
        }
    }
    let mut out = String::new();
    for (n, c) in msg.chars().enumerate() {
        if n == MAX_MESSAGE_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
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
pub(super) fn resolve(mut r: FileResult) -> FileResult {
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
pub(super) fn merge(
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
    }
}
