//! A VM's name, checked once: every virtstack joins it to paths and sockets,
//! so a name from a spec, a state directory or the command line must never
//! carry a `/`, a `..` or anything else a path could misread.

use std::fmt;

/// Longest VM name, in bytes.
pub const MAX_VM_NAME: usize = 64;

/// A valid VM name: 1–64 characters of `[A-Za-z0-9-]`, not starting with `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmName(String);

/// Why a string is not a VM name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid VM name {shown}: a name is 1–{MAX_VM_NAME} characters of [A-Za-z0-9-], not starting with '-'"
)]
pub struct InvalidVmName {
    /// The refused name, escaped and cut short.
    pub shown: String,
}

impl VmName {
    /// Checks `name`.
    pub fn new(name: &str) -> Result<Self, InvalidVmName> {
        let ok = !name.is_empty()
            && name.len() <= MAX_VM_NAME
            && !name.starts_with('-')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if ok {
            Ok(VmName(name.to_string()))
        } else {
            Err(InvalidVmName {
                shown: excerpt(name, 40),
            })
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// At most `max` characters of `s`, escaped and quoted, with `…` when cut:
/// what an invalid-name error shows of the name it refuses. (File content is
/// quoted by the spec loader's own excerpts.)
fn excerpt(s: &str, max: usize) -> String {
    let cut: String = s.chars().take(max).collect();
    let more = if cut.len() < s.len() { "…" } else { "" };
    format!("\"{}\"{more}", cut.escape_debug())
}

impl std::str::FromStr for VmName {
    type Err = InvalidVmName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VmName::new(s)
    }
}

impl AsRef<str> for VmName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for VmName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_a_path_could_misread_are_refused() {
        for bad in [
            "",
            "..",
            "a/b",
            "../etc",
            "-rf",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(VmName::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "web-1", "A9", &"x".repeat(64)] {
            assert_eq!(
                VmName::new(good).map(|n| n.to_string()).ok(),
                Some(good.to_string())
            );
        }
    }

    #[test]
    fn a_refused_name_is_shown_escaped_and_short() {
        let err = VmName::new(&format!("../{}\n", "y".repeat(100))).expect_err("refused");
        assert!(err.shown.len() < 60 && err.shown.contains("..") && !err.shown.contains('\n'));
    }
}
