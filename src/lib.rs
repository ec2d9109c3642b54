//! uvmctl: a declarative manager for lightweight utility VMs.
//!
//! ```text
//! spec files ──spec::load_dir──▶ DesiredState ──┐
//!                                               ├─▶ plan::plan ──▶ Plan (ordered Ops,
//! Virtstack ──reconcile::observe_all─▶ ObservedState ┘   each classed by the Supported
//!   (per VM: observed or unknown)                       gate and the refusals)
//!                                                        │
//!                     apply::preflight, apply::apply ◀───┤──▶ plan::render (text, JSON, --diff)
//!                                 │
//!                     Virtstack trait (qemu, fake, ...) ──▶ the VMs
//! ```
//!
//! Layers depend only downward: `hostfs` (how host files are trusted,
//! opened and created; names nothing else), `child` (what a started
//! process inherits) and `vm` (the vocabulary, `VmConfig`, observed
//! state, capabilities, the item model and the traits; no I/O) ← `spec` and
//! `plan` (pure) ← `virtstack` (implementations) and `apply` (the executor,
//! which knows virtstacks only through the trait) ← `reconcile` and
//! `inspect` ← the CLI. The planner is pure: the same inputs give a
//! byte-identical plan.

#![warn(missing_docs)]

pub mod escape;
pub mod hostfs;

pub mod child;

pub mod config;

pub mod vm;

pub mod protocol;

pub mod spec;

pub mod source;

pub mod plan;

pub mod virtstack;

pub mod apply;

pub mod reconcile;

pub mod watch;

pub mod vmservice;

pub mod inspect;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

/// The layering the module docs promise, checked on the source: each
/// module's non-test code names only the modules below it.
#[cfg(test)]
mod layering {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// Module → the crate modules its code may name (itself included).
    const ALLOWED: &[(&str, &[&str])] = &[
        ("escape", &["escape"]),
        ("hostfs", &["hostfs"]),
        ("child", &["child"]),
        ("config", &["hostfs", "vm", "config"]),
        ("vm", &["vm"]),
        ("spec", &["hostfs", "vm", "spec"]),
        ("source", &["hostfs", "child", "vm", "spec", "source"]),
        ("protocol", &["vm", "spec", "protocol"]),
        ("plan", &["vm", "spec", "plan"]),
        (
            "virtstack",
            &[
                "escape",
                "hostfs",
                "child",
                "config",
                "vm",
                "spec",
                "protocol",
                "virtstack",
            ],
        ),
        (
            "apply",
            &["escape", "hostfs", "vm", "spec", "plan", "apply"],
        ),
        ("reconcile", &["vm", "spec", "plan", "apply", "reconcile"]),
        (
            "watch",
            &[
                "escape",
                "hostfs",
                "vm",
                "spec",
                "plan",
                "apply",
                "reconcile",
                "source",
                "watch",
            ],
        ),
        ("vmservice", &["vm", "spec", "protocol", "vmservice"]),
        (
            "conformance",
            &["vm", "spec", "plan", "apply", "reconcile", "conformance"],
        ),
        (
            "inspect",
            &[
                "escape",
                "vm",
                "spec",
                "source",
                "plan",
                "reconcile",
                "watch",
                "inspect",
            ],
        ),
    ];

    fn sources(path: &Path, out: &mut Vec<std::path::PathBuf>) {
        if path.is_dir() {
            for e in std::fs::read_dir(path).expect("read src").flatten() {
                sources(&e.path(), out);
            }
        } else if path.is_file()
            && path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(path.to_path_buf());
        }
    }

    #[test]
    fn modules_depend_only_downward() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut bad = Vec::new();
        for (module, allowed) in ALLOWED {
            let mut files = Vec::new();
            let dir = src.join(module);
            sources(&dir, &mut files);
            sources(&src.join(format!("{module}.rs")), &mut files);
            assert!(!files.is_empty(), "no sources for {module}");
            for file in files {
                let text = std::fs::read_to_string(&file).expect("read source");
                // Test code may use anything (fakes, generators).
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                let named: BTreeSet<&str> = code
                    .match_indices("crate::")
                    .filter_map(|(i, m)| {
                        let rest = &code[i + m.len()..];
                        let end = rest
                            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                            .unwrap_or(rest.len());
                        Some(&rest[..end]).filter(|n| !n.is_empty())
                    })
                    .collect();
                for n in named {
                    if !allowed.contains(&n) {
                        bad.push(format!("{} names crate::{n}", file.display()));
                    }
                }
            }
        }
        assert!(bad.is_empty(), "upward dependencies:\n{}", bad.join("\n"));
    }
}
