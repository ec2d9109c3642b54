//! The QEMU virtstack: one `qemu-system-x86_64` per VM, driven over QMP.
//!
//! State lives in QEMU itself (read back over QMP on every observe) plus a
//! launch record per VM for what QEMU does not report (cold settings, 9p host
//! paths, NIC endpoints, the configuration for the next start).
//!
//! [`Qemu`] is the registry of the state directory's VMs; each VM is reached
//! through its handle, [`Machine`] (`Qemu::vm`), which owns what this process
//! keeps for it. This file only puts the virtstack contract on top.

mod caps;
#[cfg(unix)]
pub mod conlog;
#[cfg(unix)]
mod contract;
#[cfg(unix)]
pub mod devices;
#[cfg(unix)]
mod error;
#[cfg(unix)]
mod follow;
#[cfg(unix)]
pub mod guest;
#[cfg(unix)]
mod host;
#[cfg(unix)]
pub mod hotplug;
#[cfg(unix)]
pub mod images;
#[cfg(unix)]
pub mod launch;
#[cfg(unix)]
mod lifecycle;
#[cfg(unix)]
mod machine;
#[cfg(unix)]
mod notify;
#[cfg(unix)]
mod observe;
#[cfg(unix)]
pub mod ops;
#[cfg(unix)]
mod process;
#[cfg(unix)]
pub mod qmp;
#[cfg(unix)]
mod reach;
#[cfg(unix)]
pub mod serial;
#[cfg(unix)]
mod slot;
#[cfg(unix)]
mod start;
#[cfg(unix)]
pub mod state;
#[cfg(unix)]
pub mod tap;
#[cfg(unix)]
pub mod user;
#[cfg(unix)]
pub mod vsock;

#[cfg(unix)]
pub use error::{
    DEFAULT_STOP_TIMEOUT, DEFAULT_UNPLUG_TIMEOUT, QMP_READY_TIMEOUT, QemuError, SAVE_TIMEOUT,
    STATE_EVENTS, VSOCK_BACKEND_EXITED,
};
#[cfg(unix)]
pub use host::{Qemu, QemuOptions};
#[cfg(unix)]
pub use images::{AllowedRoots, DEFAULT_ALLOWED_ROOTS, HostPathError};
#[cfg(unix)]
pub use machine::Machine;
#[cfg(unix)]
pub use slot::SEEN_TTL;
#[cfg(unix)]
pub use state::{Accel, DEFAULT_STATE_DIR, LaunchError, LaunchRecord, StateDir};

/// A qemu virtstack over a state directory of its own, for the modules'
/// tests: no QEMU runs; `vmlinux` is a file in the directory (kept short,
/// under /tmp, for socket paths).
#[cfg(all(test, unix))]
pub(super) fn test_host() -> (tempfile::TempDir, Qemu) {
    let dir = tempfile::Builder::new()
        .prefix("uvb")
        .tempdir_in("/tmp")
        .expect("tempdir");
    std::fs::write(dir.path().join("vmlinux"), b"kernel").expect("kernel");
    let qemu = Qemu::new(QemuOptions {
        qemu_user: None,
        state_dir: StateDir::new(dir.path().join("state")).expect("state dir"),
        roots: AllowedRoots::new(&[dir.path()]),
        accel: Accel::Tcg,
        stop_timeout: std::time::Duration::from_secs(1),
        unplug_timeout: std::time::Duration::from_secs(1),
        observer: false,
    });
    (dir, qemu)
}

#[cfg(all(test, unix))]
mod tests {
    use super::host::down_state;
    use super::*;
    use crate::spec::VmConfig;
    use crate::vm::State;

    /// Issue 20: a VM stopped by its spec showed as `terminated`, the word
    /// for one that exited on its own.
    #[test]
    fn a_vm_stopped_as_asked_is_created_and_one_that_died_terminated() {
        let mut rec = LaunchRecord {
            version: 1,
            name: "vm".into(),
            config: VmConfig::default(),
            accel: Accel::Tcg,
            pid: Some(4242),
            stopped_by_uvmctl: true,
            started_at: Some(1),
            saved: None,
            shared_memory: false,
            vsock_cid: None,
            vsock_pid: None,
            identity: None,
            machine_uuid: None,
            history: Default::default(),
        };
        assert_eq!(down_state(&rec), State::Created);
        rec.stopped_by_uvmctl = false;
        assert_eq!(down_state(&rec), State::Terminated);
        rec.pid = None;
        rec.stopped_by_uvmctl = true;
        assert_eq!(down_state(&rec), State::Created);
    }
}

/// The QEMU virtstack's modules depend only downward, as the lib's layering
/// test checks the crate's: each names only the modules before it, and none
/// names an item of this file (which sits on top of them all).
#[cfg(all(test, unix))]
mod layering {
    /// Bottom to top: what each may name is what comes before it.
    const ORDER: &[&str] = &[
        "caps",
        "images",
        "qmp",
        "serial",
        "tap",
        "user",
        "state",
        "conlog",
        "guest",
        "devices",
        "process",
        "ops",
        "vsock",
        "notify",
        "launch",
        "observe",
        "error",
        "slot",
        "host",
        "machine",
        "follow",
        "start",
        "lifecycle",
        "reach",
        "hotplug",
        "contract",
    ];

    /// What the non-test code of `text` names through `super::`: sibling
    /// modules, or (any other name) an item of mod.rs.
    fn named(text: &str) -> std::collections::BTreeSet<String> {
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut out = std::collections::BTreeSet::new();
        for (i, _) in code.match_indices("super::") {
            let rest = &code[i + "super::".len()..];
            if let Some(list) = rest.strip_prefix('{') {
                let list = &list[..list.find('}').unwrap_or(list.len())];
                for part in list.split(',') {
                    let head = part.trim().split("::").next().unwrap_or_default();
                    out.insert(head.trim().to_string());
                }
            } else {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                out.insert(rest[..end].to_string());
            }
        }
        out.retain(|n| !n.is_empty() && n != "self");
        out
    }

    #[test]
    fn qemu_modules_depend_only_downward_and_never_on_mod_rs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/virtstack/qemu");
        let mut bad = Vec::new();
        for (i, module) in ORDER.iter().enumerate() {
            let path = dir.join(format!("{module}.rs"));
            let text = std::fs::read_to_string(&path).expect("module source");
            for n in named(&text) {
                if !ORDER[..i].contains(&n.as_str()) {
                    let what = if ORDER.contains(&n.as_str()) {
                        ""
                    } else {
                        " (of mod.rs)"
                    };
                    bad.push(format!("{module} names {n}{what}"));
                }
            }
        }
        // A directory (`qmp/`) holds the submodules of the module of its name.
        let unlisted: Vec<String> = std::fs::read_dir(&dir)
            .expect("qemu dir")
            .flatten()
            .filter_map(|e| Some(e.path().file_stem()?.to_string_lossy().into_owned()))
            .filter(|m| m != "mod" && !ORDER.contains(&m.as_str()))
            .collect();
        assert!(
            unlisted.is_empty(),
            "every module is in ORDER: {unlisted:?}"
        );
        assert!(bad.is_empty(), "upward dependencies:\n{}", bad.join("\n"));
    }

    #[test]
    fn a_name_of_mod_rs_counts_as_upward() {
        let named = named("use super::{Qemu, ops::x};\nuse super::qmp::Qmp;");
        assert!(named.contains("Qemu") && named.contains("ops") && named.contains("qmp"));
    }
}
