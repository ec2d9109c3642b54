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
    /// Per document: field path → position of the node (for mapping values,
    /// of its key, which is where a reader looks).
    docs: Vec<HashMap<String, (usize, usize)>>,
}

impl Locations {
    /// Indexes `text`. A file that does not parse yields what was read before
    /// the fault; lookups past it fall back to the nearest known ancestor.
    pub fn index(text: &str) -> Self {
        let mut rx = Receiver::default();
        let mut parser = Parser::new_from_str(text);
        // A parse error here was already reported by serde_yaml with its own position.
        let _ = parser.load(&mut rx, true);
        Locations { docs: rx.docs }
    }

    /// Position of `path` in document `doc`, or of its nearest ancestor that has one.
    pub fn find(&self, doc: usize, path: &str) -> Option<(usize, usize)> {
        let map = self.docs.get(doc)?;
        let mut p = path;
        loop {
            if let Some(pos) = map.get(p) {
                return Some(*pos);
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
    Map { key: Option<String>, path: String },
    Seq { index: usize, path: String },
}

#[derive(Default)]
struct Receiver {
    docs: Vec<HashMap<String, (usize, usize)>>,
    stack: Vec<Frame>,
}

fn pos(mark: Marker) -> (usize, usize) {
    (mark.line(), mark.col() + 1)
}

impl Receiver {
    /// Path of the node that starts now, recording `mark` for it unless its
    /// key already gave it a position. Returns `None` for a mapping key.
    fn node_path(&mut self, scalar_key: Option<&str>, mark: Marker) -> Option<String> {
        let Some(doc) = self.docs.last_mut() else {
            return None;
        };
        match self.stack.last_mut() {
            None => {
                doc.entry(String::new()).or_insert(pos(mark));
                Some(String::new())
            }
            Some(Frame::Seq { index, path }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                doc.entry(p.clone()).or_insert(pos(mark));
                Some(p)
            }
            Some(Frame::Map { key, path }) => match key.take() {
                None => {
                    // This node is a key: remember it; its value comes next.
                    let k = scalar_key.unwrap_or("?").to_string();
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    doc.entry(p).or_insert(pos(mark));
                    *key = Some(k);
                    None
                }
                Some(k) => {
                    let p = if path.is_empty() { k } else { format!("{path}.{k}") };
                    doc.entry(p.clone()).or_insert(pos(mark));
                    Some(p)
                }
            },
        }
    }
}

impl MarkedEventReceiver for Receiver {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => {
                self.docs.push(HashMap::new());
                self.stack.clear();
            }
            Event::Scalar(value, ..) => {
                self.node_path(Some(&value), mark);
            }
            Event::Alias(_) => {
                self.node_path(None, mark);
            }
            Event::MappingStart(..) => {
                let path = self.node_path(None, mark).unwrap_or_default();
                self.stack.push(Frame::Map { key: None, path });
            }
            Event::SequenceStart(..) => {
                let path = self.node_path(None, mark).unwrap_or_default();
                self.stack.push(Frame::Seq { index: 0, path });
            }
            Event::MappingEnd | Event::SequenceEnd => {
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
        assert_eq!(loc.find(0, "spec.scsiControllers[0].disks[1].lun"), Some((8, 11)));
        assert_eq!(loc.find(0, "spec.scsiControllers[0].disks[1].path"), Some((9, 11)));
    }

    #[test]
    fn counts_documents_and_falls_back_to_ancestors() {
        let loc = Locations::index(TEXT);
        assert_eq!(loc.find(1, "metadata.name"), Some((12, 3)));
        assert_eq!(loc.find(0, "spec.scsiControllers[0].disks[1].type"), Some((8, 9)));
        assert_eq!(loc.find(2, "metadata"), None);
    }
}
