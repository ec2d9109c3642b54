//! Bounds alias expansion before serde_yaml expands anything.
//!
//! serde_yaml copies an anchor's whole content for every alias of it. Its own
//! limit counts alias jumps, not bytes, so one large anchored string aliased
//! a few hundred thousand times in a list the schema accepts
//! (`plan9Shares[].allowedFiles`) fits in 1 MiB and expands to tens of
//! gigabytes. This pass reads the file's events once, sizes every anchor as it
//! would expand (aliases inside it included, so nested "billion laughs"
//! anchors grow as they would), and refuses the file as soon as its aliases
//! would add more than [`ALIAS_EXPANSION_FACTOR`] times the file's own size.

use super::error::excerpt;
use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::Marker;

/// Most that aliases may add to a file, as a multiple of its size in bytes.
/// Real specs alias a few small blocks; 16x leaves room for generated ones
/// and bounds the worst case at 16 MiB of expansion for a 1 MiB file.
pub const ALIAS_EXPANSION_FACTOR: u64 = 16;

/// What aliases may always add, however small the file (64 KiB).
pub const MIN_ALIAS_EXPANSION_BYTES: u64 = 64 << 10;

/// What a node counts on top of its scalar bytes: roughly what one more
/// deserialized value costs, so many aliases of an empty anchor are not free.
const NODE_BYTES: u64 = 8;

/// Why a file is refused, and where (1-based line and column).
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Checks that `text`'s aliases stay within budget, that each names an
/// anchor defined before it in its own document (as libyaml, under serde_yaml,
/// requires), and that none sits inside its own anchor.
///
/// A file this parser cannot read is refused too: the bound cannot be
/// computed past a syntax error, and serde_yaml might read further.
pub fn check(text: &str) -> Result<(), Refusal> {
    let budget = (text.len() as u64)
        .saturating_mul(ALIAS_EXPANSION_FACTOR)
        .max(MIN_ALIAS_EXPANSION_BYTES);
    let mut parser = Parser::new_from_str(text);
    // Expanded size of what this document has read so far: a node's size is
    // the difference across it.
    let mut read: u64 = 0;
    // What aliases have added, in the whole file.
    let mut added: u64 = 0;
    // Expanded size of each anchor of this document, once its node is complete.
    let mut sizes: HashMap<usize, u64> = HashMap::new();
    // Collections being read: their anchor (0 for none) and `read` at their start.
    let mut open: Vec<(usize, u64)> = Vec::new();
    loop {
        let (ev, mark) = parser.next_token().map_err(|e| Refusal {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            message: format!("not valid YAML: {}", e.info()),
        })?;
        match ev {
            Event::StreamEnd => return Ok(()),
            Event::DocumentStart => {
                // Anchors hold within their document (yaml-rust2 keeps them
                // for the whole stream when driven event by event).
                sizes.clear();
                open.clear();
                read = 0;
            }
            Event::Scalar(value, _, anchor, _) => {
                let size = (value.len() as u64).saturating_add(NODE_BYTES);
                read = read.saturating_add(size);
                if anchor > 0 {
                    sizes.insert(anchor, size);
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                open.push((anchor, read));
                read = read.saturating_add(NODE_BYTES);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, start)) = open.pop()
                    && anchor > 0
                {
                    sizes.insert(anchor, read - start);
                }
            }
            Event::Alias(id) => {
                let name = excerpt(alias_name(text, mark));
                let Some(&size) = sizes.get(&id) else {
                    let message = if open.iter().any(|(a, _)| *a == id) {
                        format!("alias inside its own anchor {name} would expand forever; refused")
                    } else {
                        format!(
                            "unknown anchor {name}: an alias must follow its anchor in the same document"
                        )
                    };
                    return Err(refusal(mark, message));
                };
                read = read.saturating_add(size);
                added = added.saturating_add(size);
                if added > budget {
                    let limit = if budget == MIN_ALIAS_EXPANSION_BYTES {
                        format!("{} KiB", MIN_ALIAS_EXPANSION_BYTES >> 10)
                    } else {
                        format!("{ALIAS_EXPANSION_FACTOR}x the file's size")
                    };
                    let message = format!("aliases expand past {limit} (anchor {name}); refused");
                    return Err(refusal(mark, message));
                }
            }
            Event::Nothing | Event::StreamStart | Event::DocumentEnd => {}
        }
    }
}

fn refusal(mark: Marker, message: String) -> Refusal {
    Refusal {
        line: mark.line(),
        column: mark.col() + 1,
        message,
    }
}

/// The name of the alias at `mark` (1-based line, 0-based column in
/// characters), read back from the text: events carry anchor ids only.
fn alias_name(text: &str, mark: Marker) -> &str {
    let Some(line) = text.split('\n').nth(mark.line().saturating_sub(1)) else {
        return "";
    };
    let start = line
        .char_indices()
        .nth(mark.col())
        .map_or(line.len(), |(i, _)| i);
    let Some(rest) = line[start..].strip_prefix('*') else {
        return "";
    };
    let end = rest
        .find(|c: char| c.is_whitespace() || matches!(c, ',' | '[' | ']' | '{' | '}'))
        .unwrap_or(rest.len());
    &rest[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> String {
        match check(text) {
            Ok(()) => String::new(),
            Err(r) => format!("{}:{}: {}", r.line, r.column, r.message),
        }
    }

    #[test]
    fn small_aliases_pass() {
        assert_eq!(check("a: &x [1, 2]\nb: *x\nc: *x\n"), Ok(()));
        assert_eq!(check("a: &x 1\n---\nb: &x 2\nc: *x\n"), Ok(()));
    }

    #[test]
    fn a_large_anchor_aliased_often_is_refused_at_the_alias_that_crosses_the_budget() {
        // A small file: the 64 KiB floor applies. 1 KiB anchored, plus a
        // node, is 1032 bytes per alias: the 64th alias crosses 64 KiB.
        let text = format!("l: [&big {}{}]\n", "x".repeat(1 << 10), ", *big".repeat(70));
        let first = text.find("*big").unwrap_or(0);
        let column = first + 63 * ", *big".len() + 1;
        assert_eq!(
            refused(&text),
            format!("1:{column}: aliases expand past 64 KiB (anchor \"big\"); refused")
        );
    }

    #[test]
    fn nested_anchors_count_as_they_would_expand() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            text += &format!("a{i}: &a{i} [{}]\n", [prev.as_str(); 9].join(", "));
        }
        // a0 is 89 bytes expanded, a1 809, a2 7289: the eighth *a2 on line 4
        // takes the total past 64 KiB, long before anything is copied.
        let r = refused(&text);
        assert!(r.starts_with("4:"), "{r}");
        assert!(r.ends_with("(anchor \"a2\"); refused"), "{r}");
    }

    #[test]
    fn the_budget_grows_with_the_file() {
        // 8 KiB anchored, aliased 20 times: 160 KiB, past 16x this 8 KiB
        // file, but within 16x the same file padded to 12 KiB.
        let body = format!("l: [&a {}{}]\n", "y".repeat(8 << 10), ", *a".repeat(20));
        assert!(
            refused(&body).contains("aliases expand past 16x the file's size (anchor \"a\")"),
            "{}",
            refused(&body)
        );
        let padded = format!("{body}# {}\n", "p".repeat(4 << 10));
        assert_eq!(refused(&padded), "");
    }

    #[test]
    fn aliases_to_other_documents_or_to_nothing_are_refused() {
        assert_eq!(
            refused("a: &x 1\n---\nb: *x\n"),
            "3:4: unknown anchor \"x\": an alias must follow its anchor in the same document"
        );
        // yaml-rust2 itself refuses a name never defined.
        assert!(refused("b: *nope\n").contains("unknown anchor"));
    }

    #[test]
    fn an_alias_inside_its_own_anchor_is_refused() {
        assert_eq!(
            refused("a: &r [1, *r]\n"),
            "1:11: alias inside its own anchor \"r\" would expand forever; refused"
        );
    }

    #[test]
    fn a_syntax_error_stops_the_check() {
        assert!(refused("a: [x, '*'\n").starts_with("2:1: not valid YAML"));
    }
}
