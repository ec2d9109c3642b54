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
pub mod conlog;
pub mod devices;
mod error;
mod follow;
pub mod guest;
mod host;
pub mod hotplug;
pub mod images;
pub mod launch;
mod lifecycle;
mod machine;
mod notify;
mod observe;
pub mod ops;
mod process;
pub mod qmp;
mod reach;
pub mod serial;
mod slot;
mod start;
pub mod state;
pub mod tap;
pub mod user;
pub mod vsock;

pub use error::{
    DEFAULT_STOP_TIMEOUT, DEFAULT_UNPLUG_TIMEOUT, QMP_READY_TIMEOUT, QemuError, SAVE_TIMEOUT,
    STATE_EVENTS, VSOCK_BACKEND_EXITED,
};
pub use host::{Qemu, QemuOptions};
pub use images::{AllowedRoots, DEFAULT_ALLOWED_ROOTS, HostPathError};
pub use machine::Machine;
pub use slot::SEEN_TTL;
pub use state::{Accel, DEFAULT_STATE_DIR, LaunchError, LaunchRecord, StateDir};

use crate::spec::{PowerState, VmConfig};
use crate::vm::config::Probe;
use crate::vm::health::{Answer, ProbeCursor};
use crate::vm::history::History;
use crate::vm::{Capabilities, Change, Observe, ObservedVm, Virtstack, VmError, VmName, VmStats};
use async_trait::async_trait;

type Result<T, E = VmError> = std::result::Result<T, E>;

#[async_trait]
impl Observe for Qemu {
    fn name(&self) -> &str {
        crate::vm::QEMU
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn list(&self) -> Result<Vec<VmName>, VmError> {
        // Reading a directory is quick, but a state dir on a stalled mount is not.
        let records = self.records.clone();
        tokio::task::spawn_blocking(move || records.listed())
            .await
            .map_err(|e| VmError::Backend(Box::new(e)))?
            .map_err(|e| VmError::Backend(Box::new(e)))
    }

    async fn observe(&self, name: &VmName) -> Result<ObservedVm, VmError> {
        Ok(self.vm(name).observe().await?)
    }
}

/// Runs a lifecycle verb with no standing observation of the VM before
/// or after it (the VM is not what was last seen).
async fn lifecycle<T>(
    vm: &Machine<'_>,
    verb: impl std::future::Future<Output = std::result::Result<T, QemuError>>,
) -> Result<T, VmError> {
    vm.unsee();
    let done = verb.await;
    vm.unsee();
    Ok(done?)
}

#[async_trait]
impl Virtstack for Qemu {
    fn preflight(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        self.resolve(name, config).map(drop).map_err(|source| {
            QemuError::Launch {
                vm: name.to_string(),
                source,
            }
            .into()
        })
    }

    async fn create(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        let mut config = config.clone();
        config.power_state = PowerState::Stopped;
        Ok(self.vm(name).create(&config).await?)
    }

    async fn change(&self, name: &VmName, change: &Change) -> Result<()> {
        let vm = self.vm(name);
        match vm.change(change).await {
            Ok(()) => {
                vm.seen_changed(change);
                Ok(())
            }
            Err(e) => {
                // Whatever part of it happened, the next plan observes.
                vm.unsee();
                Err(e)
            }
        }
    }

    async fn reconfigure(&self, name: &VmName, config: &VmConfig) -> Result<()> {
        let vm = self.vm(name);
        lifecycle(&vm, async { vm.set_config(config) }).await
    }

    async fn start(&self, name: &VmName, paused: bool) -> Result<()> {
        let vm = self.vm(name);
        lifecycle(&vm, async {
            if paused {
                vm.start_paused().await
            } else {
                vm.start().await
            }
        })
        .await
    }

    async fn stop(&self, name: &VmName) -> Result<()> {
        let vm = self.vm(name);
        lifecycle(&vm, vm.stop()).await
    }

    async fn pause(&self, name: &VmName) -> Result<()> {
        let vm = self.vm(name);
        lifecycle(&vm, vm.pause()).await
    }

    async fn resume(&self, name: &VmName) -> Result<()> {
        let vm = self.vm(name);
        lifecycle(&vm, vm.resume()).await
    }

    async fn save(&self, name: &VmName) -> Result<()> {
        let vm = self.vm(name);
        lifecycle(&vm, vm.save()).await
    }

    async fn destroy(&self, name: &VmName) -> Result<()> {
        let vm = self.vm(name);
        let done = lifecycle(&vm, vm.destroy()).await;
        if done.is_ok() {
            // Nothing of it is left to keep (a failed destroy keeps what
            // follows the VM, which may still run).
            self.drop_slot(name);
        }
        done
    }

    async fn guest_ready(&self, name: &VmName) -> Result<bool> {
        Ok(self.vm(name).guest_ready().await?)
    }

    async fn stats(&self, name: &VmName) -> Result<VmStats> {
        Ok(self.vm(name).stats().await?)
    }

    async fn probe(
        &self,
        name: &VmName,
        probe: &Probe,
        cursor: &mut ProbeCursor,
    ) -> Result<Answer> {
        Ok(self.vm(name).probe(probe, cursor).await?)
    }

    async fn history(&self, name: &VmName) -> Result<History> {
        Ok(self.vm(name).record()?.history)
    }

    async fn keep_history(&self, name: &VmName, history: &History) -> Result<()> {
        let vm = self.vm(name);
        let mut rec = vm.record()?;
        rec.history = history.clone();
        Ok(vm.update_record(&rec)?)
    }

    async fn wait(&self, name: &VmName, timeout: Option<std::time::Duration>) -> Result<bool> {
        Ok(self.vm(name).wait(timeout).await?)
    }

    async fn events(&self, name: &VmName) -> Result<Option<crate::vm::VmEvents>> {
        Ok(self.vm(name).events().await?)
    }

    async fn release(&self, name: &VmName) {
        if let Some(vm) = self.vm_if_kept(name) {
            vm.forget();
        }
    }
}

/// A qemu virtstack over a state directory of its own, for the modules'
/// tests: no QEMU runs; `vmlinux` is a file in the directory (kept short,
/// under /tmp, for socket paths).
#[cfg(test)]
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

#[cfg(test)]
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
#[cfg(test)]
mod layering {
    /// Bottom to top: what each may name is what comes before it.
    const ORDER: &[&str] = &[
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
        "caps",
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
