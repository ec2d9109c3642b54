//! The QEMU virtstack as a whole: its settings, what it found of this host,
//! and the registry of its VMs, each reached through its own handle
//! (`Qemu::vm`, in machine.rs). What is decided over every VM of the state directory (a
//! free CID, a free identity) is decided here.

use super::error::QemuError;
use super::images::AllowedRoots;
use super::slot::VmSlot;
use super::state::{Accel, LaunchRecord, StateDir};
use super::{launch, user, vsock};
use crate::spec::VmConfig;
use crate::virtstack::records::{RecordError, RecordStore};
use crate::vm::{Capabilities, HostFacts, State};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Settings of the QEMU virtstack.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// Root of per-VM state directories.
    pub state_dir: StateDir,
    /// Roots host paths must lie under.
    pub roots: AllowedRoots,
    /// Acceleration for new launches.
    pub accel: Accel,
    /// Graceful stop timeout.
    pub stop_timeout: Duration,
    /// Unplug acknowledgement timeout.
    pub unplug_timeout: Duration,
    /// Only looks at VMs: talks to their observe QMP socket (where they
    /// have one), so it never waits for an apply holding the main one.
    pub observer: bool,
    /// Who QEMU and the vsock backend run as; `None`: as uvmctl runs (root
    /// only when asked for by name).
    pub qemu_user: Option<user::ServiceUser>,
}

/// The QEMU virtstack on this host: the registry of its VMs.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub(super) opts: QemuOptions,
    pub(super) caps: Capabilities,
    /// How a pinned guest's QEMU gets to lock its memory on this host.
    pub(super) memlock: user::MemLock,
    /// The vsock backend program, where installed.
    pub(super) vsock_backend: Option<PathBuf>,
    /// Each VM's launch record: loaded once per version of its file,
    /// written once per change (`virtstack::records`).
    pub(super) records: RecordStore<LaunchRecord>,
    /// What this process keeps for each VM (its QMP connection, what it
    /// follows of it), one slot per VM: its handle's own state.
    vms: Arc<Mutex<HashMap<String, Arc<VmSlot>>>>,
    /// Numbers subscriptions, so one ending never drops a newer one's entry.
    pub(super) subscriptions: Arc<std::sync::atomic::AtomicU64>,
    /// Held while a VM's identity is chosen and recorded.
    identity: Arc<Mutex<()>>,
}

/// A record that cannot be read or written, as the VM's error.
pub(super) fn record_error(vm: &str, e: RecordError) -> QemuError {
    match e {
        RecordError::NotFound(_) => QemuError::NotFound(vm.to_string()),
        e => QemuError::Record {
            vm: vm.to_string(),
            source: e,
        },
    }
}

/// The state of a VM whose QEMU does not run, from its record: stopped as
/// asked (never started, or stopped since: its last pid stays in the
/// record) is `Created`; exited on its own is `Terminated`.
pub(super) fn down_state(rec: &LaunchRecord) -> State {
    if rec.saved.is_some() {
        State::Saved
    } else if rec.stopped_by_uvmctl {
        State::Created
    } else {
        State::Terminated
    }
}

pub(super) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Qemu {
    /// The virtstack with `opts`, its capabilities probed from this host.
    pub fn new(opts: QemuOptions) -> Self {
        let memlock = user::MemLock::probe(opts.qemu_user.is_some());
        let mut facts = HostFacts::probe(&memlock);
        facts.isolation = Some(match &opts.qemu_user {
            Some(u) => u.isolation(),
            None => {
                "QEMU runs as root (--qemu-user root): nothing keeps one VM's QEMU from another's"
                    .into()
            }
        });
        Qemu {
            memlock,
            caps: Capabilities::qemu(&facts),
            vsock_backend: vsock::find_backend().filter(|_| facts.vhost_user_vsock),
            records: opts.state_dir.records(),
            opts,
            vms: Default::default(),
            subscriptions: Default::default(),
            identity: Default::default(),
        }
    }

    /// How often launch records were read from and written to disk.
    pub fn record_io(&self) -> (u64, u64) {
        self.records.io()
    }

    /// The smallest guest CID no VM of the state directory has: a guest's
    /// CID is its own, so two guests never mistake each other.
    pub(super) fn free_cid(&self) -> u32 {
        let taken: std::collections::BTreeSet<u32> = self
            .list()
            .iter()
            .filter_map(|n| self.record_of(n).ok()?.vsock_cid)
            .collect();
        (vsock::FIRST_CID..)
            .find(|c| !taken.contains(c))
            .unwrap_or(vsock::FIRST_CID)
    }

    /// Its settings.
    pub fn options(&self) -> &QemuOptions {
        &self.opts
    }

    /// Names of VMs uvmctl created in this state directory.
    pub fn list(&self) -> Vec<String> {
        // A state directory not made yet has no VMs.
        self.records.names().unwrap_or_default()
    }

    /// Every host file of `cfg` opened and checked (`launch::resolve`), and
    /// usable by the user VM `name`'s QEMU runs as (`launch::check_access`).
    pub fn resolve(
        &self,
        name: &str,
        cfg: &VmConfig,
    ) -> Result<launch::Resolved, launch::LaunchError> {
        self.resolve_as(cfg, self.next_user(name).as_ref())
    }

    /// Who VM `name` will run as at its next launch, whether it has a
    /// record yet or not (for the checks of what it may open).
    pub(super) fn next_user(&self, name: &str) -> Option<user::ServiceUser> {
        let user = self.opts.qemu_user.as_ref()?;
        let current = self.record_of(name).ok().and_then(|r| r.identity);
        Some(user.for_vm(self.pick_identity(name, current)))
    }

    pub(super) fn resolve_as(
        &self,
        cfg: &VmConfig,
        user: Option<&user::ServiceUser>,
    ) -> Result<launch::Resolved, launch::LaunchError> {
        let res = launch::resolve(cfg, &self.opts.roots, &self.caps)?;
        if let Some(user) = user {
            launch::check_access(cfg, &res, user)?;
        }
        Ok(res)
    }

    /// Who the VM of `rec` runs as (`None`: as uvmctl): its own uid and gid
    /// from the service user's range, or the service user itself (a host
    /// without a range, or a VM launched before identities were given,
    /// until its next launch).
    pub fn user_of(&self, rec: &LaunchRecord) -> Option<user::ServiceUser> {
        Some(self.opts.qemu_user.as_ref()?.for_vm(rec.identity))
    }

    /// One choice of identities at a time in this process: two VMs
    /// launched side by side never take the same free slot.
    pub(super) fn identity_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.identity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// VM `name`'s identity: `current` while no other VM of the state
    /// directory holds it, else the slot of its directory's path (so its
    /// name and state root) in the service user's range, past those other
    /// VMs hold. `None` without a range.
    pub(super) fn pick_identity(&self, name: &str, current: Option<u32>) -> Option<u32> {
        let range = self.opts.qemu_user.as_ref()?.range?;
        let taken: std::collections::BTreeSet<u32> = self
            .list()
            .iter()
            .filter(|n| n.as_str() != name)
            .filter_map(|n| self.record_of(n).ok()?.identity)
            .collect();
        match current {
            Some(slot) if slot < range.count && !taken.contains(&slot) => Some(slot),
            _ => range.slot_for(
                &self.opts.state_dir.vm_dir(name).display().to_string(),
                &taken,
            ),
        }
    }

    /// VM `name`'s slot, made on first use.
    pub(super) fn slot(&self, name: &str) -> Arc<VmSlot> {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(vms.entry(name.to_string()).or_default())
    }

    /// VM `name`'s slot, if it has one.
    pub(super) fn existing_slot(&self, name: &str) -> Option<Arc<VmSlot>> {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms.get(name).map(Arc::clone)
    }

    /// Forgets VM `name`'s slot (it is destroyed).
    pub(super) fn drop_slot(&self, name: &str) {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms.remove(name);
    }

    /// The launch record of VM `name`.
    pub(super) fn record_of(&self, name: &str) -> Result<LaunchRecord, QemuError> {
        self.records.load(name).map_err(|e| record_error(name, e))
    }

    /// The launch record of a VM as it is on disk now.
    pub fn record_now(&self, name: &str) -> Result<LaunchRecord, QemuError> {
        self.record_of(name)
    }
}

impl HostFacts {
    /// Looks at this host's device nodes, firmware and what uvmctl may
    /// hand QEMU (`memlock`: how pinned memory would be locked).
    pub fn probe(memlock: &super::user::MemLock) -> Self {
        HostFacts {
            vhost_vsock: std::path::Path::new("/dev/vhost-vsock").exists(),
            vhost_user_vsock: super::vsock::find_backend().is_some(),
            vfio: std::path::Path::new("/dev/vfio/vfio").exists(),
            ovmf: std::path::Path::new(super::caps::OVMF_CODE).is_file()
                && std::path::Path::new(super::caps::OVMF_VARS).is_file(),
            pin_memory_refused: memlock.refusal().map(str::to_string),
            isolation: None,
        }
    }
}
