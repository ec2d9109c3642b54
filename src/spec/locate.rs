//! Maps field paths back to line and column in a YAML file.
//!
//! serde_yaml reports positions only for the errors it raises itself. Checks
//! that run after deserializing (duplicate LUNs, bad GUIDs, ...) know a field
//! path, not a position, so this re-reads the file with an event parser that
//! carries marks. It only runs for files that have such errors, which keeps the
//! happy path to a single parse.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// 1-based line and column of every node of every document of a file.
#[derive(Debug, Default)]
pub struct Locations {
    /// Per document: field path → positions of the node, in file order (a
    /// key given twice has two; for mapping values, the key's position,
    /// which is where a reader looks).
    docs: Vec<HashMap<String, Vec<(usize, usize)>>>,
    /// `metadata.name` of every document that has one, as far as the file
    /// reads: the VMs a file that does not load would have defined.
    pub names: Vec<String>,
}

impl Locations {
    /// Indexes `text`. A file that does not parse yields what was read before
    /// the fault; lookups past it fall back to the nearest known ancestor.
    /// (Whether a file is YAML is serde_yaml's to say: the loader reports its
    /// verdict, so the two parsers never need to agree.)
    pub fn index(text: &str) -> Self {
        let mut rx = Receiver::default();
        let mut parser = Parser::new_from_str(text);
        // Pull events one by one: the crate's own `load` recurses per nesting
        // level and overflows the stack on `- - - - …`.
        while let Ok((ev, mark)) = parser.next_token() {
            if ev == Event::StreamEnd {
                break;
            }
            rx.on_event(ev, mark);
        }
        Locations {
            docs: rx.docs,
            names: rx.names,
        }
    }

    /// Position of `path` in document `doc`, or of its nearest ancestor that has one.
    pub fn find(&self, doc: usize, path: &str) -> Option<(usize, usize)> {
        self.find_occurrence(doc, path, false)
    }

    /// Like [`Locations::find`], but the last occurrence (a duplicated key's second).
    pub fn find_last(&self, doc: usize, path: &str) -> Option<(usize, usize)> {
        self.find_occurrence(doc, path, true)
    }

    fn find_occurrence(&self, doc: usize, path: &str, last: bool) -> Option<(usize, usize)> {
        let map = self.docs.get(doc)?;
        let mut p = path;
        loop {
            if let Some(all) = map.get(p) {
                return if last {
                    all.last().copied()
                } else {
                    all.first().copied()
                };
            }
            if p.is_empty() {
                return None;
            }
            p = parent(p);
        }
    }
}

fn parent(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(i) => &path[..i],
        None => "",
    }
}

#[derive(Debug)]
enum Frame {
    /// `key` is set between a key and its value; `positioned` once the
    /// mapping's own path has a position (its first key's).
    Map {
        path: String,
        key: Option<String>,
        positioned: bool,
    },
    Seq {
        path: String,
        index: usize,
    },
}

/// Where a node sits in its parent.
enum Role {
    Root,
    Item,
    Key,
    Value,
}

/// Deepest level indexed; deeper nodes report their ancestor's position, and
/// paths stay short however deep a hostile file nests.
const MAX_DEPTH: usize = 64;

#[derive(Default)]
struct Receiver {
    docs: Vec<HashMap<String, Vec<(usize, usize)>>>,
    stack: Vec<Frame>,
    /// Levels entered beyond `MAX_DEPTH`, not indexed.
    overflow: usize,
    names: Vec<String>,
}

fn pos(mark: Marker) -> (usize, usize) {
    (mark.line(), mark.col() + 1)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Receiver {
    fn record(&mut self, path: String, mark: Marker) {
        if let Some(doc) = self.docs.last_mut() {
            doc.entry(path).or_default().push(pos(mark));
        }
    }

    /// Role and path of the node starting at `mark`; records keys (and, for
    /// a mapping's first key, the mapping) as it goes.
    fn enter(&mut self, scalar: Option<&str>, mark: Marker) -> (Role, String) {
        let mut recorded = Vec::new();
        let out = match self.stack.last_mut() {
            None => (Role::Root, String::new()),
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                (Role::Item, p)
            }
            Some(Frame::Map {
                path,
                key,
                positioned,
            }) => match key.take() {
                Some(k) => (Role::Value, join(path, &k)),
                None => {
                    // A key: where a reader looks for the field, and for its
                    // mapping when it is the first one.
                    let k = scalar.unwrap_or("?").to_string();
                    if !*positioned {
                        *positioned = true;
                        recorded.push(path.clone());
                    }
                    let p = join(path, &k);
                    recorded.push(p.clone());
                    *key = Some(k);
                    (Role::Key, p)
                }
            },
        };
        for p in recorded {
            self.record(p, mark);
        }
        out
    }
}

impl MarkedEventReceiver for Receiver {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => {
                self.docs.push(HashMap::new());
                self.stack.clear();
                self.overflow = 0;
            }
            Event::MappingStart(..) | Event::SequenceStart(..)
                if self.overflow > 0 || self.stack.len() >= MAX_DEPTH =>
            {
                self.overflow += 1;
            }
            Event::MappingEnd | Event::SequenceEnd if self.overflow > 0 => {
                self.overflow -= 1;
            }
            Event::Scalar(..) | Event::Alias(_) if self.overflow > 0 => {}
            Event::Scalar(value, ..) => match self.enter(Some(&value), mark) {
                (Role::Root | Role::Item, p) => self.record(p, mark),
                (Role::Value, p) if p == "metadata.name" => self.names.push(value),
                (Role::Value | Role::Key, _) => {}
            },
            Event::Alias(_) => {
                if let (Role::Root | Role::Item, p) = self.enter(None, mark) {
                    self.record(p, mark);
                }
            }
            Event::MappingStart(..) => {
                // The parser marks a block mapping at its first `:`; its first
                // key's position stands for it instead (see `enter`).
                let (role, path) = self.enter(None, mark);
                let positioned = matches!(role, Role::Value | Role::Key);
                self.stack.push(Frame::Map {
                    path,
                    key: None,
                    positioned,
                });
            }
            Event::SequenceStart(..) => {
                let (role, path) = self.enter(None, mark);
                if matches!(role, Role::Root | Role::Item) {
                    self.record(path.clone(), mark);
                }
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd => {
                if let Some(Frame::Map {
                    path,
                    positioned: false,
                    ..
                }) = self.stack.pop()
                {
                    self.record(path, mark);
                }
            }
            Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
apiVersion: v1
spec:
  scsiControllers:
    - id: 0
      disks:
        - lun: 0
          path: /a
        - lun: 0
          path: /b
---
metadata:
  name: second
";

    #[test]
    fn finds_keys_and_sequence_items_with_one_based_positions() {
        let loc = Locations::index(TEXT);
        assert_eq!(loc.find(0, "apiVersion"), Some((1, 1)));
        assert_eq!(loc.find(0, "spec.scsiControllers"), Some((3, 3)));
        assert_eq!(loc.find(0, "spec.scsiControllers[0]"), Some((4, 7)));
        assert_eq!(
            loc.find(0, "spec.scsiControllers[0].disks[1].lun"),
            Some((8, 11))
        );
        assert_eq!(
            loc.find(0, "spec.scsiControllers[0].disks[1].path"),
            Some((9, 11))
        );
    }

    #[test]
    fn a_key_given_twice_has_both_positions() {
        let loc = Locations::index("a: 1\nb: 2\na: 3\n");
        assert_eq!(loc.find(0, "a"), Some((1, 1)));
        assert_eq!(loc.find_last(0, "a"), Some((3, 1)));
    }

    #[test]
    fn collects_vm_names_up_to_a_syntax_error() {
        let loc = Locations::index(&format!(
            "{TEXT}---\nmetadata: {{name: third}}\n---\nmetadata:\n  name: [\n"
        ));
        assert_eq!(loc.names, vec!["second", "third"]);
    }

    #[test]
    fn keeps_what_it_read_before_a_syntax_error() {
        let loc = Locations::index("a: 1\nb: [1, 2\n");
        assert_eq!(loc.find(0, "a"), Some((1, 1)));
        assert_eq!(loc.find(0, "b"), Some((2, 1)));
    }

    #[test]
    fn counts_documents_and_falls_back_to_ancestors() {
        let loc = Locations::index(TEXT);
        assert_eq!(loc.find(1, "metadata.name"), Some((12, 3)));
        assert_eq!(
            loc.find(0, "spec.scsiControllers[0].disks[1].type"),
            Some((8, 11))
        );
        assert_eq!(loc.find(2, "metadata"), None);
    }
}
