//! Parsing one file's text: the limits checked before the YAML parser
//! reads it (size, nesting, aliases), then each document deserialized and
//! validated, a broken one read again as a plain YAML tree to say all that
//! is wrong with it and which VM it names.

use super::messages::{from_yaml_error, strip_marks, tame};
use super::{FileResult, Labels, MAX_DOCUMENTS_PER_FILE, MAX_SPEC_FILE_BYTES, Pending};
use crate::spec::DesiredVm;
use crate::spec::aliases;
use crate::spec::error::SpecError;
use crate::spec::locate::Locations;
use crate::spec::validate::{Problem, validate_document};
use crate::vm::config::VmDocument;
use serde::Deserialize;
use std::path::Path;

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
    let shape = crate::spec::shape::check(&tree);
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

/// What a YAML text must pass before serde_yaml reads it (nesting, alias
/// expansion): where and why not. The rollout policy file passes it too.
pub(in crate::spec) fn refusal(text: &str) -> Option<(usize, usize, String)> {
    if let Some((line, column)) = too_deep(text, MAX_FLOW_NESTING) {
        return Some((
            line,
            column,
            format!("nesting deeper than {MAX_FLOW_NESTING} levels"),
        ));
    }
    if text.contains('*') {
        return aliases::check(text)
            .err()
            .map(|a| (a.line, a.column, a.message));
    }
    None
}

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
///
/// [`load_dir`]: super::load_dir
/// [`load_texts`]: super::load_texts
pub(super) fn parse_str(path: &Path, mut text: String) -> FileResult {
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
            r.labels.push(doc.metadata.labels.clone());
            r.vms.push(DesiredVm {
                name: doc.metadata.name,
                file: path.to_path_buf(),
                doc: i,
                config: std::sync::Arc::new(doc.spec),
                status: doc.status,
                labels: std::mem::take(&mut doc.metadata.labels),
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
