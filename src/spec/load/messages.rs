//! serde_yaml's errors in the loader's words: the field path split from
//! the message, the position marks dropped (an error carries its position
//! apart), and any input a message quotes cut to an escaped excerpt.

use super::Pending;
use crate::spec::error::{excerpt_escaped, excerpt_unquoted};

/// `msg` without libyaml's ` at line L column C` and ` at position N`: the
/// error carries its position apart.
pub(super) fn strip_marks(msg: &str) -> String {
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
pub(super) fn from_yaml_error(doc: usize, e: &serde_yaml::Error) -> Pending {
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
pub(in crate::spec) fn tame(msg: &str) -> String {
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
