//! Placement: which of a repository's VMs are this host's. A label
//! selector on `metadata.labels` (kubectl's `-l` syntax: `key=value`,
//! `key!=value`, `key`, `!key`, joined by commas, all of which must hold)
//! and a path inside the spec directory, both optional.
//!
//! Fleet-wide rules (unique VM names and MACs) are checked over every spec
//! loaded; rules of one host (a writable image attached by one VM only)
//! over this host's VMs alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The label `--for-host` selects on.
pub const HOST_LABEL: &str = "host";

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

/// A kubectl-style label selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// Why a selector did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "selector {selector:?}: {why} (kubectl's syntax: key=value, key!=value, key, !key, joined by commas)"
)]
pub struct SelectorError {
    selector: String,
    why: String,
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, SelectorError> {
        let fail = |why: String| SelectorError {
            selector: s.chars().take(100).collect(),
            why,
        };
        let mut requirements = Vec::new();
        for part in s.split(',').map(str::trim) {
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::Absent(k.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            let (key, value) = match &req {
                Requirement::Equals(k, v) | Requirement::NotEquals(k, v) => (k, Some(v)),
                Requirement::Exists(k) | Requirement::Absent(k) => (k, None),
            };
            if let Some(why) = label_key_problem(key) {
                return Err(fail(why));
            }
            if let Some(why) = value.and_then(|v| label_value_problem(v)) {
                return Err(fail(why));
            }
            requirements.push(req);
        }
        Ok(Selector { requirements })
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::Equals(k, v) => format!("{k}={v}"),
                Requirement::NotEquals(k, v) => format!("{k}!={v}"),
                Requirement::Exists(k) => k.clone(),
                Requirement::Absent(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Selector {
    /// `host=NAME`: the VMs labelled for host NAME.
    pub fn for_host(name: &str) -> Self {
        Selector {
            requirements: vec![Requirement::Equals(HOST_LABEL.into(), name.into())],
        }
    }

    /// Both selectors' requirements.
    #[must_use]
    pub fn and(mut self, other: Selector) -> Self {
        self.requirements.extend(other.requirements);
        self
    }

    /// Whether `labels` meet every requirement (an empty selector: always).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        })
    }
}

/// Which VMs of a spec directory are this host's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Labels the VM's spec must carry.
    pub selector: Selector,
    /// A directory (relative to the spec directory) the VM's file must be in.
    pub path: Option<PathBuf>,
}

impl std::fmt::Display for Placement {
    /// `selector host=web-01`, `path hosts/web-01`, or both.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let selector = self.selector.to_string();
        let mut parts = Vec::new();
        if !selector.is_empty() {
            parts.push(format!("selector {selector}"));
        }
        if let Some(p) = &self.path {
            parts.push(format!("placement path {}", p.display()));
        }
        f.write_str(&parts.join(", "))
    }
}

impl Placement {
    /// Whether the VM of `file` (as listed under `root`) with `labels` is
    /// this host's.
    pub fn places_here(&self, root: &Path, file: &Path, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
            && self
                .path
                .as_ref()
                .is_none_or(|p| file.starts_with(root.join(p)))
    }

    /// Checks `path`: relative, inside the spec directory.
    ///
    /// # Errors
    /// Says why not.
    pub fn check_path(path: &Path) -> Result<(), String> {
        if path.is_absolute()
            || path.components().any(|c| {
                !matches!(
                    c,
                    std::path::Component::Normal(_) | std::path::Component::CurDir
                )
            })
        {
            return Err(format!(
                "--placement-path {}: a directory inside the spec directory, without '..'",
                path.display()
            ));
        }
        Ok(())
    }
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// A label name or value part: 1–63 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn name_problem(what: &str, s: &str) -> Option<String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter().copied().all(is_name_char)
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    (!ok).then(|| {
        format!(
            "{what} {:?} must be 1–63 characters of [A-Za-z0-9._-], beginning and ending alphanumeric",
            s.chars().take(64).collect::<String>()
        )
    })
}

/// What is wrong with a label key (`[prefix/]name`, prefix a DNS subdomain
/// of at most 253 characters), as Kubernetes checks it.
pub fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Some(format!(
                "label key prefix {:?} must be a DNS subdomain (lowercase, at most 253 characters)",
                p.chars().take(64).collect::<String>()
            ));
        }
    }
    name_problem("label name", name)
}

/// What is wrong with a label value (empty, or as a label name).
pub fn label_value_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        None
    } else {
        name_problem("label value", value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_read_as_kubectl_reads_them() {
        let s: Selector = "host=web-01, tier!=db,gpu,!retired"
            .parse()
            .expect("parses");
        assert!(s.matches(&labels(&[("host", "web-01"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[("host", "web-01")])), "gpu missing");
        assert!(!s.matches(&labels(&[("host", "web-01"), ("gpu", "1"), ("tier", "db")])));
        assert!(!s.matches(&labels(&[
            ("host", "web-01"),
            ("gpu", "1"),
            ("retired", "")
        ])));
        assert_eq!(s.to_string(), "host=web-01,tier!=db,gpu,!retired");
        let s: Selector = "example.com/zone==a".parse().expect("parses");
        assert!(s.matches(&labels(&[("example.com/zone", "a")])));
        assert!(Selector::default().matches(&BTreeMap::new()));
        for bad in [
            "",
            "host=",
            "=x",
            "a b=c",
            "-x=y",
            "Example.com/x=y",
            "x=y z",
        ] {
            let e = bad.parse::<Selector>();
            if bad == "host=" {
                assert!(e.is_ok(), "an empty value is a value");
                continue;
            }
            assert!(e.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn placement_by_path_and_labels() {
        let p = Placement {
            selector: Selector::for_host("a"),
            path: Some("hosts/a".into()),
        };
        let root = Path::new("/r");
        let l = labels(&[("host", "a")]);
        assert!(p.places_here(root, Path::new("/r/hosts/a/web.yaml"), &l));
        assert!(!p.places_here(root, Path::new("/r/hosts/ab/web.yaml"), &l));
        assert!(!p.places_here(
            root,
            Path::new("/r/hosts/a/web.yaml"),
            &labels(&[("host", "b")])
        ));
        assert!(Placement::check_path(Path::new("../x")).is_err());
        assert!(Placement::check_path(Path::new("/x")).is_err());
        assert!(Placement::check_path(Path::new("hosts/a")).is_ok());
    }
}
