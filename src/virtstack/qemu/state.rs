//! What the QEMU virtstack keeps on disk: the state directory (one private
//! directory per VM, its sockets and logs) and each VM's launch record.

use super::images::{HostFile, HostPathError};
use crate::hostfs;
use crate::spec::VmConfig;
use crate::virtstack::records::{Layout, RecordStore};
use crate::vm::Refusal;
use crate::vm::history::History;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// UEFI firmware (Debian package `ovmf`): the code read-only and shared,
/// the variable store template copied for each VM (stated with the
/// capabilities, which read them on every platform).
pub use super::caps::{OVMF_CODE, OVMF_VARS};

/// Hardware acceleration for QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// `auto`: KVM only when `/dev/kvm` opens and the CPU shows `vmx` or `svm`
    /// (a PVM `/dev/kvm` without them hangs stock guests), else TCG.
    pub fn auto() -> Self {
        let kvm_opens = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let cpu_virt = fs::read_to_string("/proc/cpuinfo")
            .map(|s| {
                s.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
            })
            .unwrap_or(false);
        if kvm_opens && cpu_virt {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }
}

/// Default root of per-VM state directories.
pub const DEFAULT_STATE_DIR: &str = "/run/uvmctl";

/// A launch record is read up to this size (a few KiB in practice).
const MAX_RECORD_BYTES: u64 = 4 << 20;

/// The launch record's file name in a VM's directory.
const RECORD_FILE: &str = "launch.json";

/// Why a VM could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A host path or image was refused.
    #[error("{field}")]
    HostPath {
        /// Spec field.
        field: String,
        /// Why.
        #[source]
        source: HostPathError,
    },
    /// The configuration asks for something this virtstack does not build.
    #[error("{0}")]
    Unsupported(String),
    /// The capabilities refuse a cold setting or device of the configuration.
    #[error("{0}")]
    Refused(Refusal),
    /// The state directory is unusable.
    #[error("state directory {path}: {reason}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// File system trouble in the state directory.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The root of all per-VM state directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    pub(super) root: PathBuf,
}

/// Creates `dir` owner-only (mode 0700, whatever the umask), or takes the
/// one there if it is a real directory of root's (never a planted link).
/// With `group` (the VM's own, that its QEMU and backend run with), it is
/// root's, mode 0710: they pass through it to the backend's directory and
/// can neither list it nor open anything else in it (uvmctl makes every
/// socket QEMU serves and hands it the listening descriptor).
fn create_private_dir(dir: &Path, group: Option<u32>) -> Result<(), LaunchError> {
    let mode = if group.is_some() { 0o710 } else { 0o700 };
    create_dir_mode(dir, mode, group)
}

fn create_dir_mode(dir: &Path, mode: u32, group: Option<u32>) -> Result<(), LaunchError> {
    hostfs::private_dir_for(dir, mode, group).map_err(|source| LaunchError::Io {
        what: "cannot use directory",
        path: dir.to_path_buf(),
        source,
    })
}

impl StateDir {
    /// Uses `root`, which is created (0700) only when something is written
    /// there: read-only commands leave the host as it was. Refuses roots
    /// QEMU's key=value options could misread, and an existing root that
    /// someone other than root could change (a squatted `/tmp/x`): see
    /// [`hostfs::check_trusted_dir`].
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, LaunchError> {
        let root: PathBuf = root.into();
        let text = root.to_str().ok_or_else(|| LaunchError::StateDir {
            path: root.clone(),
            reason: "not UTF-8".into(),
        })?;
        if text.contains(',') || text.chars().any(char::is_control) || !root.is_absolute() {
            return Err(LaunchError::StateDir {
                path: root.clone(),
                reason: "must be an absolute path without commas or control characters".into(),
            });
        }
        let dir = StateDir { root };
        if std::fs::symlink_metadata(&dir.root).is_ok() {
            dir.check_trusted()?;
        }
        Ok(dir)
    }

    fn check_trusted(&self) -> Result<(), LaunchError> {
        hostfs::check_trusted_dir(&self.root)
            .map(drop)
            .map_err(|e| LaunchError::StateDir {
                path: self.root.clone(),
                reason: e.to_string(),
            })
    }

    /// Creates the root (0711: others may pass through to the VM
    /// directories shared with QEMU's service user, and see nothing; its
    /// parents as root's 0755) if it is missing, and checks nobody but root
    /// can change it.
    pub fn ensure_root(&self) -> Result<(), LaunchError> {
        if std::fs::symlink_metadata(&self.root).is_err() {
            if let Some(parent) = self.root.parent() {
                hostfs::create_dirs(parent, 0o755).map_err(|source| LaunchError::Io {
                    what: "cannot create",
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            create_dir_mode(&self.root, 0o711, None)?;
        }
        self.check_trusted()
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<vm>/`.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Creates `<root>/<vm>/` with mode 0700, or 0710 passable by `group`
    /// (the VM's own, its QEMU's); or makes the one there so.
    pub fn create_vm_dir(&self, name: &str, group: Option<u32>) -> Result<PathBuf, LaunchError> {
        let dir = self.vm_dir(name);
        // QEMU binds its sockets here; sun_path holds 107 bytes and a NUL.
        let longest = [
            self.qmp_socket(name),
            self.observe_socket(name),
            self.events_socket(name),
            self.agent_socket(name),
            self.vsock_backend_socket(name),
            // The backend binds `<uds>_<port>` names for the host side.
            self.vsock_socket(name)
                .with_file_name("vsock.sock_4294967295"),
        ]
        .into_iter()
        .max_by_key(|p| p.as_os_str().len())
        .unwrap_or_default();
        if longest.as_os_str().len() > crate::spec::MAX_UNIX_SOCKET_PATH {
            return Err(LaunchError::StateDir {
                path: dir,
                reason: format!(
                    "{} would exceed {} bytes; use a shorter --state-dir",
                    longest.display(),
                    crate::spec::MAX_UNIX_SOCKET_PATH
                ),
            });
        }
        self.ensure_root()?;
        create_private_dir(&dir, group)?;
        Ok(dir)
    }

    /// The QMP socket of a VM, for the uvmctl that changes it.
    pub fn qmp_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("qmp.sock")
    }

    /// A second QMP socket, for commands that only look (`plan`, `status`,
    /// `export`): a QMP socket serves one client at a time, so they would
    /// otherwise wait for an apply holding the first.
    pub fn observe_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("qmp-observe.sock")
    }

    /// A third QMP socket, held by `uvmctl watch` for the VM's events: a
    /// watcher holding either of the others would lock out `apply` or `plan`.
    pub fn events_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("qmp-events.sock")
    }

    /// The one directory of a VM its own processes write: the vsock
    /// backend binds its sockets there (it takes paths, not descriptors).
    /// Owned by the VM's user, mode 0700, so no other VM's can enter it.
    pub fn vsock_dir(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("vsock")
    }

    /// Makes [`StateDir::vsock_dir`] the VM user's `owner` (uid, gid), mode
    /// 0700, or uvmctl's own without one. A link planted there is refused.
    pub fn create_vsock_dir(
        &self,
        name: &str,
        owner: Option<(u32, u32)>,
    ) -> Result<PathBuf, LaunchError> {
        let dir = self.vsock_dir(name);
        let io = |source| LaunchError::Io {
            what: "cannot use directory",
            path: dir.clone(),
            source,
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        let opened = std::fs::File::from(
            nix::fcntl::open(
                &dir,
                nix::fcntl::OFlag::O_RDONLY
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_NOFOLLOW
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| io(e.into()))?,
        );
        // Without a VM user it stays uvmctl's own (root's, or a developer's
        // running uvmctl unprivileged).
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&opened, Some(uid), Some(gid)).map_err(io)?;
        }
        opened
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io)?;
        Ok(dir)
    }

    /// The vhost-user socket the VM's vsock backend listens on for QEMU.
    pub fn vsock_backend_socket(&self, name: &str) -> PathBuf {
        self.vsock_dir(name).join("vhost-vsock.sock")
    }

    /// The host side of the VM's vsock: connect and write `CONNECT <port>`
    /// to reach a guest listener; `<this>_<port>` receives the guest's
    /// connections to that port.
    pub fn vsock_socket(&self, name: &str) -> PathBuf {
        self.vsock_dir(name).join("vsock.sock")
    }

    /// Where the uvmctl that launched a VM hears its guest's `READY=1`
    /// (linked from the guest's notify port in the vsock directory).
    pub fn notify_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("notify.sock")
    }

    /// What the guest said with its `READY=1` in this launch.
    pub fn notify_ready(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("notify.ready")
    }

    /// The guest agent channel of a VM.
    pub fn agent_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("agent.sock")
    }

    /// The guest's first serial port (COM1, `ttyS0`), for `uvmctl console`,
    /// unless the spec relays that port to a listener of its own.
    pub fn console_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("console.sock")
    }

    /// What the guest wrote to its first serial port since it was launched.
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("console.log")
    }

    /// The same for the launch before (kept once, as `console.log.1`).
    pub fn previous_console_log(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("console.log.1")
    }

    /// Where QEMU's stderr goes.
    pub fn stderr_log(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("qemu.log")
    }

    /// The launch record.
    pub fn record_path(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(RECORD_FILE)
    }

    /// The VM's own UEFI variable store (its NVRAM), kept across restarts.
    pub fn efi_vars(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("efivars.fd")
    }

    /// Gives the VM its UEFI variable store from the OVMF template, once,
    /// and opens it (read-write, never through a link) for QEMU.
    pub fn prepare_efi_vars(&self, name: &str) -> Result<HostFile, LaunchError> {
        let path = self.efi_vars(name);
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            self.make_efi_vars(&path)?;
        }
        let file =
            hostfs::open_state_file(&path, 0o600, false).map_err(|source| LaunchError::Io {
                what: "cannot open",
                path: path.clone(),
                source,
            })?;
        Ok(HostFile {
            path,
            file: std::sync::Arc::new(file),
        })
    }

    fn make_efi_vars(&self, path: &Path) -> Result<(), LaunchError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = path.to_path_buf();
        let io = |what| {
            let path = path.clone();
            move |source| LaunchError::Io { what, path, source }
        };
        let template = fs::read(OVMF_VARS).map_err(|source| LaunchError::Io {
            what: "cannot read",
            path: OVMF_VARS.into(),
            source,
        })?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .map_err(io("cannot create"))?;
        io::Write::write_all(&mut f, &template).map_err(io("cannot write"))
    }

    /// Where `save` writes a VM's state.
    pub fn save_path(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("saved.state")
    }

    /// The launch records of this state directory: one per VM uvmctl
    /// created, in the VM's own directory.
    pub fn records(&self) -> RecordStore<LaunchRecord> {
        RecordStore::new(
            "launch record",
            &self.root,
            Layout::Dir { file: RECORD_FILE },
            MAX_RECORD_BYTES,
        )
    }
}

/// What uvmctl launched (or will launch) for a VM; kept in its state directory.
///
/// QEMU reports most of a VM's state itself; the record keeps what it does
/// not (9p host paths, NIC endpoints, cold settings) and the configuration to
/// launch at the next start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LaunchRecord {
    /// Format version of this file.
    pub version: u32,
    /// VM name.
    pub name: String,
    /// The configuration in force (the spec as last applied).
    pub config: VmConfig,
    /// Acceleration used.
    pub accel: Accel,
    /// QEMU's pid while it runs.
    pub pid: Option<u32>,
    /// Set when uvmctl stopped the VM on purpose, so an exit is not an error.
    pub stopped_by_uvmctl: bool,
    /// Unix time of the last launch.
    pub started_at: Option<u64>,
    /// Set while the guest state is saved (nothing runs): the next start
    /// restores it instead of booting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<SavedGuest>,
    /// Guest memory is shared (memfd), as a vhost-user device needs: set at
    /// launch, so a restore uses the layout the guest was saved with.
    #[serde(default)]
    pub shared_memory: bool,
    /// The guest's vsock CID (unique in the state directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_cid: Option<u32>,
    /// The vsock backend's pid while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_pid: Option<u32>,
    /// The VM's slot in the service user's id range: its QEMU and backend
    /// run as that uid and gid (`user::ServiceUser::for_vm`). Kept across
    /// launches; `None` on a host without a range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<u32>,
    /// The VM's SMBIOS UUID (`-uuid`), random, made with the VM: stable
    /// for the guest, and how uvmctl knows a pid is still this VM's QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_uuid: Option<String>,
    /// The configurations applied to it ([`crate::vm::Virtstack::history`]).
    #[serde(default, skip_serializing_if = "History::is_empty")]
    pub history: History,
}

/// Properties that place devices (PCI slot, memory address), by device id.
pub type Placement = std::collections::BTreeMap<String, serde_json::Map<String, Value>>;

/// A guest saved to [`StateDir::save_path`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedGuest {
    /// Unix time of the save.
    pub saved_at: u64,
    /// Properties that placed each device where the saved guest had it (PCI
    /// slot, memory address), by device id. Hot-plugged devices take the
    /// first free slot, which a cold launch would not reproduce, and the
    /// saved state only loads into the same layout.
    pub placement: Placement,
    /// The memory sizes the restored VM can take live.
    pub memory_hotplug: Option<crate::vm::MemoryHotplug>,
    /// Whether the saved guest's memory was shared (its RAM block layout).
    #[serde(default)]
    pub shared_memory: bool,
}
