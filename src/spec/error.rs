//! Errors in spec files, each naming file, line, column and field.

use serde::Serialize;
use std::fmt;
use std::path::PathBuf;

/// One problem in one spec file: `path:line:col: field.path: message`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecError {
    /// The file, as given on the command line joined with its relative path.
    pub file: PathBuf,
    /// 1-based line, 0 when the problem concerns the whole file.
    pub line: usize,
    /// 1-based column, 0 when the problem concerns the whole file.
    pub column: usize,
    /// Dotted field path from the document root (`spec.scsiControllers[0].id`),
    /// empty for problems with the file itself.
    pub field: String,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
}

impl SpecError {
    /// An error about the file as a whole (size, type, encoding, I/O).
    pub fn whole_file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        SpecError {
            file: file.into(),
            line: 0,
            column: 0,
            field: String::new(),
            message: message.into(),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for SpecError {}

/// Every problem found in one run, sorted by file and position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// Most characters of a spec's content that an error message quotes. A spec
/// directory may come from a pull request, and a symlink may once have
/// pointed anywhere: messages name what they refuse, they never replay it.
pub const EXCERPT_CHARS: usize = 40;

/// `s` as an error message may quote it: in double quotes, escaped as
/// `{:?}` would (`escape_debug`, so no control character reaches a
/// terminal), cut to [`EXCERPT_CHARS`] characters with an ellipsis.
pub(crate) fn excerpt(s: &str) -> String {
    format!("\"{}\"", excerpt_unquoted(s))
}

/// Like [`excerpt`], without the quotes: for input a message already
/// delimits (serde's `` unknown field `…` ``).
pub(crate) fn excerpt_unquoted(s: &str) -> String {
    capped(s, escape_quoted)
}

/// Like [`excerpt`], unquoted, for values already checked to hold no
/// control characters (paths in cross-VM messages): only control characters
/// are escaped, so a Windows path keeps single backslashes.
pub(crate) fn excerpt_bare(s: &str) -> String {
    capped(s, |c, out| {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    })
}

/// `s` already escaped (serde's `{:?}` of a string, without its quotes),
/// cut to [`EXCERPT_CHARS`] characters without splitting an escape.
pub(crate) fn excerpt_escaped(s: &str) -> String {
    let (mut out, mut written) = (String::new(), 0);
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        let mut token = String::from(c);
        if c == '\\' {
            match chars.next() {
                Some('u') => {
                    token.push('u');
                    for d in chars.by_ref() {
                        token.push(d);
                        if d == '}' {
                            break;
                        }
                    }
                }
                Some(d) => token.push(d),
                None => {}
            }
        }
        let n = token.chars().count();
        if written + n > EXCERPT_CHARS {
            out.push('…');
            break;
        }
        out.push_str(&token);
        written += n;
    }
    out
}

/// Escapes one character for a double-quoted excerpt, as `str`'s `Debug` does
/// (which leaves `'` alone).
fn escape_quoted(c: char, out: &mut String) {
    if c == '\'' {
        out.push(c);
    } else {
        out.extend(c.escape_debug());
    }
}

/// Escapes `s` character by character until [`EXCERPT_CHARS`] escaped
/// characters are written; "…" marks a cut.
fn capped(s: &str, escape: impl Fn(char, &mut String)) -> String {
    let (mut out, mut written) = (String::new(), 0);
    let mut one = String::new();
    for c in s.chars() {
        one.clear();
        escape(c, &mut one);
        let n = one.chars().count();
        if written + n > EXCERPT_CHARS {
            out.push('…');
            break;
        }
        out.push_str(&one);
        written += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_path_line_col_field_message() {
        let e = SpecError {
            file: "specs/web.yaml".into(),
            line: 12,
            column: 5,
            field: "spec.scsiControllers[0].disks[1].lun".into(),
            message: "duplicate lun 0 on controller 0".into(),
        };
        assert_eq!(
            e.to_string(),
            "specs/web.yaml:12:5: spec.scsiControllers[0].disks[1].lun: duplicate lun 0 on controller 0"
        );
    }

    #[test]
    fn excerpts_are_escaped_and_cut_with_an_ellipsis() {
        assert_eq!(excerpt("web"), "\"web\"");
        assert_eq!(excerpt("it's"), "\"it's\"");
        assert_eq!(excerpt("a\u{1b}[2Jb\n"), "\"a\\u{1b}[2Jb\\n\"");
        let long = "x".repeat(500);
        assert_eq!(
            excerpt(&long),
            format!("\"{}…\"", "x".repeat(EXCERPT_CHARS))
        );
        assert_eq!(excerpt(&"x".repeat(EXCERPT_CHARS)).len(), EXCERPT_CHARS + 2);
        // An escape is never split: 39 characters, then a 6-character escape.
        let s = format!("{}\u{1b}", "y".repeat(EXCERPT_CHARS - 1));
        assert_eq!(
            excerpt(&s),
            format!("\"{}…\"", "y".repeat(EXCERPT_CHARS - 1))
        );
        assert_eq!(excerpt_bare("C:\\vm\\a.vhdx"), "C:\\vm\\a.vhdx");
        assert_eq!(
            excerpt_escaped(&format!("{}\\u{{1b}}z", "q".repeat(38))),
            format!("{}…", "q".repeat(38))
        );
        assert_eq!(excerpt_escaped("a\\\"b"), "a\\\"b");
    }

    #[test]
    fn whole_file_errors_have_no_position() {
        let e = SpecError::whole_file(
            "specs/big.yaml",
            "file is 2000000 bytes, over the 1048576-byte limit",
        );
        assert_eq!(
            e.to_string(),
            "specs/big.yaml: file is 2000000 bytes, over the 1048576-byte limit"
        );
    }
}
