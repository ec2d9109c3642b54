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
