//! Launching QEMU: a spec's host files resolved and checked, and the
//! command line built from its cold configuration.
//!
//! No shell is involved, and no spec value is spliced into QEMU's
//! comma-separated option syntax: devices, block nodes, netdevs and objects
//! go as JSON (`-device {...}`); the command line is a whole argv element;
//! the few options that only take key=value syntax (`-chardev`, `-fsdev`)
//! name descriptors or paths inside the state directory, which uvmctl
//! controls.
//!
//! No host file of a spec reaches QEMU as a path: uvmctl opens each one
//! beneath its allowed root ([`AllowedRoots::open`]), checks it on the
//! descriptor, and QEMU inherits the descriptor: `/dev/fdset/N` (from
//! `-add-fd`) for disks, `/dev/fd/N` for kernel, initrd, VPMem images and
//! Plan9 share roots. What was checked is what QEMU holds, and a name QEMU
//! would split (multiboot cuts `-initrd` at spaces) never reaches it.

pub use super::devices::ids;
use super::devices::{
    MAX_HOTPLUG_CPUS, MEMORY_BLOCK_MB, disk_fdset_opaque, hotplug_memory_mb, nic_args, pmem_args,
    qos_limits, scsi_disk_args,
};
use super::images::{
    AllowedRoots, HostFile, HostPathError, check_scsi_image, check_vpmem_image, scsi_access,
};
pub use super::state::{
    Accel, LaunchError, LaunchRecord, OVMF_CODE, OVMF_VARS, Placement, SavedGuest, StateDir,
};
use crate::hostfs::Access;
use crate::spec::VmConfig;
use crate::vm::{Capabilities, MemoryBackingType};
use serde_json::json;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// The QEMU binary.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// TCG's translation buffer for a pinned guest, in MiB (it is locked with
/// the rest of QEMU): ample for a utility VM's kernel and userland.
pub const PINNED_TCG_BUFFER_MB: u32 = 128;
/// QEMU's seccomp sandbox, always on.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// Name of the virtio-serial port of the guest agent channel.
pub const AGENT_PORT_NAME: &str = "uvmctl.agent";

/// Host files of a spec, opened beneath their roots and checked, as QEMU
/// will be handed them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Kernel, initrd.
    pub kernel: Option<HostFile>,
    /// Initial ramdisk.
    pub initrd: Option<HostFile>,
    /// SCSI disks by (controller, lun).
    pub disks: std::collections::BTreeMap<(u32, u32), HostFile>,
    /// VPMem images by id, with the mapped size.
    pub pmem: std::collections::BTreeMap<u32, (HostFile, u64)>,
    /// Plan9 share roots by name.
    pub shares: std::collections::BTreeMap<String, HostFile>,
    /// Serial console listeners by port (resolved; the listener may not exist yet).
    pub serials: std::collections::BTreeMap<u32, PathBuf>,
    /// For UEFI boot: the load options the firmware passes to the EFI
    /// application (`kernel`), without the `initrd=` that became `initrd`.
    pub uefi_args: Option<String>,
    /// Guest memory is shared (memfd), so a vhost-user backend can map it:
    /// wherever vsock is available, so a listener can be added live later.
    pub shared_memory: bool,
    /// The vsock device is plugged at launch (not for a restore: the saved
    /// guest had it unplugged, it is plugged after).
    pub vsock_device: bool,
    /// vsock listeners by port (resolved; the listener may not exist yet).
    pub vsock_listeners: std::collections::BTreeMap<u32, PathBuf>,
    /// For UEFI boot: the VM's own variable store, opened read-write.
    pub efi_vars: Option<HostFile>,
    /// Where QEMU appends what the guest writes to its first serial port
    /// (opened write-only at launch, handed over in an fd set).
    pub console_log: Option<HostFile>,
    /// Tap devices by NIC id, opened at launch (never by a pre-flight:
    /// opening one makes the interface).
    pub taps: std::collections::BTreeMap<String, Opened>,
    /// Connections to the serial listeners that accepted one, by port,
    /// made at launch (never by a pre-flight: a listener sees a connect).
    pub serial_conns: std::collections::BTreeMap<u32, Opened>,
}

/// A descriptor uvmctl opened at launch for QEMU to inherit: a tap device,
/// a connection to a serial listener.
#[derive(Debug, Clone)]
pub struct Opened(pub std::sync::Arc<std::os::fd::OwnedFd>);

impl PartialEq for Opened {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_raw_fd() == other.0.as_raw_fd()
    }
}

impl Eq for Opened {}

/// An EFI path (`\EFI\app.efi` or `EFI/app.efi`) as a path relative to the
/// boot directory.
fn efi_relative(p: &str) -> PathBuf {
    PathBuf::from(p.replace('\\', "/").trim_start_matches('/'))
}

/// Opens `rel` inside `dir` (already resolved): it must stay inside it.
fn inside(
    roots: &AllowedRoots,
    dir: &Path,
    given: &Path,
    rel: &Path,
    field: &str,
) -> Result<HostFile, LaunchError> {
    let p = roots
        .open(&given.join(rel), Access::Read)
        .map_err(hp(field.into()))?;
    if !p.path.starts_with(dir) || !p.file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(LaunchError::HostPath {
            field: field.into(),
            source: HostPathError::WrongKind {
                path: given.join(rel).display().to_string(),
                reason: format!("not a file inside {}", dir.display()),
            },
        });
    }
    Ok(p)
}

fn hp(field: String) -> impl FnOnce(HostPathError) -> LaunchError {
    move |source| LaunchError::HostPath { field, source }
}

/// Checks `cfg` before anything is launched: first what the virtstack's
/// capabilities refuse (the same list the plan marks `[unsupported]`), then
/// every host path against `roots` and the image formats. Errors name the
/// spec field.
pub fn resolve(
    cfg: &VmConfig,
    roots: &AllowedRoots,
    caps: &Capabilities,
) -> Result<Resolved, LaunchError> {
    if let Some(refusal) = caps.refusals(cfg).into_iter().next() {
        return Err(LaunchError::Refused(refusal));
    }
    let mut r = Resolved::default();
    match (&cfg.boot.linux_kernel_direct, &cfg.boot.uefi) {
        (Some(k), _) => {
            r.kernel = Some(
                roots
                    .open(&k.kernel, Access::Read)
                    .map_err(hp("spec.boot.linuxKernelDirect.kernel".into()))?,
            );
            if let Some(i) = &k.initrd {
                r.initrd = Some(
                    roots
                        .open(i, Access::Read)
                        .map_err(hp("spec.boot.linuxKernelDirect.initrd".into()))?,
                );
            }
        }
        (None, Some(u)) => {
            // OVMF loads the EFI application and its initrd through QEMU's
            // fw_cfg (QEMU has no VMBus file system to boot from `dir`) and
            // starts it with `args` as its load options. A Linux EFI stub's
            // `initrd=FILE` names a file in `dir`; the firmware hands it over
            // as the initrd instead.
            let dir = roots
                .check(&u.dir)
                .map_err(hp("spec.boot.uefi.dir".into()))?;
            r.kernel = Some(inside(
                roots,
                &dir,
                &u.dir,
                &efi_relative(&u.path),
                "spec.boot.uefi.path",
            )?);
            let (initrds, rest): (Vec<&str>, Vec<&str>) = u
                .args
                .split_whitespace()
                .partition(|t| t.starts_with("initrd="));
            // Several initrd= are refused by the capabilities above.
            if let Some(one) = initrds.first() {
                let rel = efi_relative(one.trim_start_matches("initrd="));
                r.initrd = Some(inside(roots, &dir, &u.dir, &rel, "spec.boot.uefi.args")?);
            }
            r.uefi_args = Some(rest.join(" "));
        }
        (None, None) => return Err(LaunchError::Unsupported("spec.boot: no boot source".into())),
    }
    for (i, c) in cfg.scsi_controllers.iter().enumerate() {
        for (j, d) in c.disks.iter().enumerate() {
            let field = format!("spec.scsiControllers[{i}].disks[{j}].path");
            let p = roots
                .open(&d.path, scsi_access(d.read_only))
                .map_err(hp(field.clone()))?;
            check_scsi_image(&p, d.disk_type).map_err(hp(field))?;
            r.disks.insert((c.id, d.lun), p);
        }
    }
    if let Some(v) = &cfg.vpmem {
        for (i, d) in v.devices.iter().enumerate() {
            let field = format!("spec.vpmem.devices[{i}].path");
            let p = roots
                .open(&d.path, scsi_access(d.read_only))
                .map_err(hp(field.clone()))?;
            let size = check_vpmem_image(&p, d.format).map_err(hp(field.clone()))?;
            if size > v.maximum_size_bytes {
                return Err(LaunchError::Unsupported(format!(
                    "{field}: image maps {size} bytes, over the controller's maximumSizeBytes {}",
                    v.maximum_size_bytes
                )));
            }
            r.pmem.insert(d.id, (p, size));
        }
    }
    for (i, s) in cfg.plan9_shares.iter().enumerate() {
        let field = format!("spec.plan9Shares[{i}].hostPath");
        let p = roots.check(&s.host_path).map_err(hp(field.clone()))?;
        if !p.is_dir() {
            return Err(LaunchError::HostPath {
                field,
                source: HostPathError::WrongKind {
                    path: p.display().to_string(),
                    reason: "not a directory".into(),
                },
            });
        }
        let p = roots
            .open(&s.host_path, Access::Directory)
            .map_err(hp(field))?;
        r.shares.insert(s.name.clone(), p);
    }
    for (i, c) in cfg.serial_consoles.iter().enumerate() {
        // uvmctl (as root) connects the guest's serial port to this socket,
        // and reconnects for the VM's life (serial.rs): it must be one under
        // an allowed root, in a directory only root can change, never any
        // socket of the host.
        let field = format!("spec.serialConsoles[{i}].listenerPath");
        let p = roots.check_socket(&c.listener_path).map_err(hp(field))?;
        r.serials.insert(c.port, p);
    }
    let vsock = caps.supported(
        crate::vm::Resource::VmSocket,
        crate::vm::ResourceOperation::Add,
    );
    r.shared_memory = vsock;
    r.vsock_device = vsock;
    for (i, v) in cfg.vm_sockets.iter().enumerate() {
        // The backend (as root) connects the guest's connections to this
        // socket: it must be one under an allowed root.
        if let (crate::vm::VMSocketType::VSock, Some(port), true) = (v.socket_type, v.port, vsock) {
            let field = format!("spec.vmSockets[{i}].listenerPath");
            let p = roots.check_socket(&v.listener_path).map_err(hp(field))?;
            r.vsock_listeners.insert(port, p);
        }
    }
    Ok(r)
}

/// Checks that QEMU, running as `user`, can use what it opens itself: the
/// files it is handed as `/dev/fd/N` (kernel, initrd, VPMem images, Plan9
/// share roots), which it reopens, so their modes count; and the listener
/// sockets it (or the vsock backend) connects to. Disks need nothing: QEMU
/// takes a copy of uvmctl's descriptor.
pub fn check_access(
    cfg: &VmConfig,
    res: &Resolved,
    user: &super::user::ServiceUser,
) -> Result<(), LaunchError> {
    let refuse = |field: String, path: &Path, what: &str| LaunchError::HostPath {
        field,
        source: HostPathError::WrongKind {
            path: path.display().to_string(),
            reason: format!(
                "not {what} by {} (see docs/security.md: QEMU opens it itself, as that user)",
                user.describe()
            ),
        },
    };
    let file_ok =
        |f: &HostFile, write: bool| f.file.metadata().is_ok_and(|m| user.may_open(&m, write));
    for (f, field) in [
        (&res.kernel, "spec.boot kernel"),
        (&res.initrd, "spec.boot initrd"),
    ] {
        if let Some(f) = f
            && !file_ok(f, false)
        {
            return Err(refuse(field.into(), &f.path, "readable"));
        }
    }
    if let Some(v) = &cfg.vpmem {
        for (i, d) in v.devices.iter().enumerate() {
            if let Some((f, _)) = res.pmem.get(&d.id)
                && !file_ok(f, !d.read_only)
            {
                let what = if d.read_only {
                    "readable"
                } else {
                    "readable and writable"
                };
                return Err(refuse(
                    format!("spec.vpmem.devices[{i}].path"),
                    &f.path,
                    what,
                ));
            }
        }
    }
    for (i, s) in cfg.plan9_shares.iter().enumerate() {
        if let Some(f) = res.shares.get(&s.name)
            && !f
                .file
                .metadata()
                .is_ok_and(|m| user.may_use_dir(&m, !s.read_only))
        {
            let what = if s.read_only { "readable" } else { "writable" };
            return Err(refuse(
                format!("spec.plan9Shares[{i}].hostPath"),
                &f.path,
                what,
            ));
        }
    }
    // Serial listeners are connected by uvmctl itself (serial.rs); the vsock
    // backend connects to its listeners by path for each guest connection,
    // so those must be connectable by the service user (docs/security.md).
    let listeners = cfg.vm_sockets.iter().enumerate().filter_map(|(i, v)| {
        v.port
            .and_then(|port| res.vsock_listeners.get(&port))
            .map(|p| (format!("spec.vmSockets[{i}].listenerPath"), p))
    });
    for (field, path) in listeners {
        check_listener_access(user, path).map_err(|what| refuse(field, path, what))?;
    }
    Ok(())
}

/// Whether `user` can connect to the listener at `path` (resolved): reach
/// its directory and, once it exists, write the socket.
pub fn check_listener_access(
    user: &super::user::ServiceUser,
    path: &Path,
) -> Result<(), &'static str> {
    if !user.may_reach(path) {
        return Err("reachable (a directory on the way is closed to it)");
    }
    match fs::metadata(path) {
        Ok(m) if !user.may_open(&m, true) => {
            Err("allowed to connect to (the socket is not writable)")
        }
        _ => Ok(()),
    }
}

/// What a launch hands QEMU besides its arguments.
#[derive(Debug, Default)]
pub struct Handover {
    /// Descriptors QEMU inherits (uvmctl's own numbers, which the argument
    /// vector names): the files of [`Resolved`].
    pub fds: Vec<RawFd>,
}

/// The listening sockets QEMU serves, made by uvmctl (root's, mode 0600,
/// in a directory QEMU's user cannot list) and handed over as descriptors:
/// no path of them is connectable by any VM's user, QEMU's own included.
#[derive(Debug)]
pub struct ControlSockets {
    qmp: std::os::unix::net::UnixListener,
    observe: std::os::unix::net::UnixListener,
    events: std::os::unix::net::UnixListener,
    agent: std::os::unix::net::UnixListener,
    console: Option<std::os::unix::net::UnixListener>,
}

/// The descriptor numbers of [`ControlSockets`], as the argument vector
/// names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Controls {
    /// The QMP socket of the uvmctl that changes the VM.
    pub qmp: RawFd,
    /// The QMP socket of the commands that only look.
    pub observe: RawFd,
    /// The QMP socket a watcher follows events on.
    pub events: RawFd,
    /// The guest agent's channel.
    pub agent: RawFd,
    /// COM1's console, unless a listener of the spec's takes the port (-1).
    pub console: RawFd,
}

impl Controls {
    /// For an argument vector that is only read (its device ids), never
    /// run: no descriptor is real.
    pub const UNUSED: Controls = Controls {
        qmp: -1,
        observe: -1,
        events: -1,
        agent: -1,
        console: -1,
    };
}

impl ControlSockets {
    /// Binds the VM's control sockets afresh (a socket left by a QEMU that
    /// died is replaced); `console`: COM1 is uvmctl's console (no listener
    /// of the spec's takes it).
    ///
    /// # Errors
    /// When one cannot be bound.
    pub fn bind(dir: &StateDir, name: &str, console: bool) -> io::Result<Self> {
        let listen = |path: PathBuf| {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let listener = std::os::unix::net::UnixListener::bind(&path)?;
            // Root's alone whatever the umask: connecting needs write.
            fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            Ok(listener)
        };
        Ok(ControlSockets {
            qmp: listen(dir.qmp_socket(name))?,
            observe: listen(dir.observe_socket(name))?,
            events: listen(dir.events_socket(name))?,
            agent: listen(dir.agent_socket(name))?,
            console: if console {
                Some(listen(dir.console_socket(name))?)
            } else {
                let _ = fs::remove_file(dir.console_socket(name));
                None
            },
        })
    }

    /// Their descriptor numbers.
    pub fn fds(&self) -> Controls {
        Controls {
            qmp: self.qmp.as_raw_fd(),
            observe: self.observe.as_raw_fd(),
            events: self.events.as_raw_fd(),
            agent: self.agent.as_raw_fd(),
            console: self.console.as_ref().map_or(-1, AsRawFd::as_raw_fd),
        }
    }
}

/// A new random SMBIOS UUID (RFC 9562 version 4) for a VM.
///
/// # Errors
/// When the system's random source cannot be read.
pub fn new_machine_uuid() -> io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// The fd set of the console log: far above those of the UEFI variables
/// and the disks, which count up from 0, and those QEMU picks for hot adds.
pub const CONSOLE_LOG_FDSET: u32 = 1000;

/// How QEMU names an inherited descriptor where it opens a file itself.
fn fd_path(f: &HostFile) -> String {
    format!("/dev/fd/{}", f.file.as_raw_fd())
}

/// The `qemu-system-x86_64` argument vector for `cfg`, started paused (`-S`)
/// so uvmctl decides when the guest runs, and what it must be handed.
pub fn argv(
    name: &str,
    cfg: &VmConfig,
    res: &Resolved,
    controls: Controls,
    uuid: Option<&str>,
    dir: &StateDir,
    accel: Accel,
) -> (Vec<String>, Handover) {
    let mut a: Vec<String> = Vec::new();
    let mut fds: Vec<RawFd> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));

    let nvdimm = cfg.vpmem.is_some();
    let uefi = res.uefi_args.is_some();
    let pinned = cfg.memory.backing == MemoryBackingType::Physical;
    // A pinned guest's QEMU locks all of itself, TCG's translation buffer
    // too (1 GiB by default: 1.6 GB locked for a 256 MB guest, and seconds
    // of page faults at launch): under TCG it gets a buffer of its own size.
    let small_tcg = pinned && accel == Accel::Tcg;
    let machine = format!(
        "pc{}{}{}{}",
        if small_tcg {
            String::new()
        } else {
            format!(",accel={}", accel.as_str())
        },
        if nvdimm { ",nvdimm=on" } else { "" },
        if res.shared_memory {
            format!(",memory-backend={}", ids::RAM)
        } else {
            String::new()
        },
        if uefi {
            ",pflash0=fw-code,pflash1=fw-vars"
        } else {
            ""
        }
    );
    // One boot vCPU; the others are hot-plugged before the guest starts, so
    // every vCPU but the first can be unplugged again. Memory above the boot
    // size comes from a virtio-mem device, resized live; NVDIMMs (VPMem)
    // need slots and address space of their own.
    push(&["-name", &format!("guest={name},debug-threads=on")]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-S"]);
    push(&["-machine", &machine, "-cpu", "max"]);
    if small_tcg {
        push(&["-accel", &format!("tcg,tb-size={PINNED_TCG_BUFFER_MB}")]);
    }
    let maxcpus = cfg.processors.count.max(MAX_HOTPLUG_CPUS);
    push(&["-smp", &format!("1,maxcpus={maxcpus}")]);
    let hotmem = hotplug_memory_mb(cfg);
    let pmem_mb = cfg.vpmem.as_ref().map_or(0, |v| {
        u64::from(v.maximum_devices) * v.maximum_size_bytes.div_ceil(1 << 20)
    });
    let maxmem = cfg.memory.size_mb + pmem_mb + hotmem.unwrap_or(0);
    let mut m = format!("{}M", cfg.memory.size_mb);
    if let Some(v) = &cfg.vpmem {
        m.push_str(&format!(",slots={}", v.maximum_devices));
    }
    if maxmem > cfg.memory.size_mb {
        m.push_str(&format!(",maxmem={maxmem}M"));
    }
    push(&["-m", &m]);
    if res.shared_memory {
        // Shared, so a vhost-user backend (vsock) can map guest memory.
        let ram = json!({"qom-type": "memory-backend-memfd", "id": ids::RAM, "size": cfg.memory.size_mb << 20, "share": true});
        push(&["-object", &ram.to_string()]);
    }
    if pinned {
        // Pinned memory: lock guest RAM so the host never pages it out.
        push(&["-overcommit", "mem-lock=on"]);
    }
    push(&["-sandbox", SANDBOX]);
    if let Some(uuid) = uuid {
        push(&["-uuid", uuid]);
    }
    if res.vsock_device && cfg.health.as_ref().is_some_and(|h| h.notifies()) {
        // systemd's vmm.notify_socket, as systemd-vmspawn hands it over.
        push(&["-smbios", &super::notify::smbios_credential()]);
    }
    // QMP on sockets uvmctl made: QEMU serves the listening descriptors.
    for (id, fd) in [
        ("qmp", controls.qmp),
        ("qmp-observe", controls.observe),
        ("qmp-events", controls.events),
    ] {
        fds.push(fd);
        push(&[
            "-chardev",
            &format!("socket,id={id},fd={fd},server=on,wait=off"),
            "-mon",
            &format!("chardev={id},mode=control"),
        ]);
    }
    // A guest that panics exits instead of hanging; uvmctl reports the exit.
    push(&[
        "-device",
        r#"{"driver":"pvpanic","id":"pvpanic"}"#,
        "-action",
        "panic=exit-failure",
    ]);

    // Fd set ids given at launch: 0 for the UEFI variables, then the disks.
    let mut fdset = 0;
    if let (Some(args), Some(kernel)) = (&res.uefi_args, &res.kernel) {
        // The firmware code is the system's (root's, world-readable); the
        // variable store is the VM's, handed over as a descriptor.
        let vars = match &res.efi_vars {
            Some(f) => {
                fds.push(f.file.as_raw_fd());
                push(&[
                    "-add-fd",
                    &format!("fd={},set={fdset},opaque=fw-vars", f.file.as_raw_fd()),
                ]);
                format!("/dev/fdset/{fdset}")
            }
            None => dir.efi_vars(name).display().to_string(),
        };
        for node in [
            json!({"driver": "file", "filename": OVMF_CODE, "node-name": "fw-code-file", "read-only": true}),
            json!({"driver": "raw", "file": "fw-code-file", "node-name": "fw-code", "read-only": true}),
            json!({"driver": "file", "filename": vars, "node-name": "fw-vars-file"}),
            json!({"driver": "raw", "file": "fw-vars-file", "node-name": "fw-vars"}),
        ] {
            push(&["-blockdev", &node.to_string()]);
        }
        push(&["-kernel", &fd_path(kernel)]);
        fds.push(kernel.file.as_raw_fd());
        if let Some(initrd) = &res.initrd {
            push(&["-initrd", &fd_path(initrd)]);
            fds.push(initrd.file.as_raw_fd());
        }
        if !args.is_empty() {
            push(&["-append", args]);
        }
    }
    if let (Some(k), Some(kernel)) = (&cfg.boot.linux_kernel_direct, &res.kernel) {
        push(&["-kernel", &fd_path(kernel)]);
        fds.push(kernel.file.as_raw_fd());
        if let Some(initrd) = &res.initrd {
            push(&["-initrd", &fd_path(initrd)]);
            fds.push(initrd.file.as_raw_fd());
        }
        if !k.cmdline.is_empty() {
            push(&["-append", &k.cmdline]);
        }
    }

    // Serial consoles: COM1..COM4 in port order, `null` for gaps. A spec's
    // listener is connected by uvmctl and handed over (`fd=`); one that
    // was not there yet is a `null` backend until it is (serial.rs).
    // COM1 is always there: without a listener of the spec's it is
    // uvmctl's console (a socket `uvmctl console` connects to), and what
    // the guest writes to it is appended to the console log either way.
    let log = res.console_log.as_ref().map(|f| {
        fds.push(f.file.as_raw_fd());
        push(&[
            "-add-fd",
            &format!(
                "fd={},set={CONSOLE_LOG_FDSET},opaque=console-log",
                f.file.as_raw_fd()
            ),
        ]);
        format!(",logfile=/dev/fdset/{CONSOLE_LOG_FDSET},logappend=on")
    });
    let last = cfg
        .serial_consoles
        .iter()
        .map(|s| s.port)
        .max()
        .unwrap_or(0);
    for port in 0..=last {
        let log = if port == 0 { log.as_deref() } else { None };
        match cfg.serial_consoles.iter().find(|s| s.port == port) {
            Some(_) => {
                let id = super::serial::chardev_id(port);
                let backend = match res.serial_conns.get(&port) {
                    Some(conn) => {
                        fds.push(conn.0.as_raw_fd());
                        format!("socket,id={id},fd={}", conn.0.as_raw_fd())
                    }
                    None => format!("null,id={id}"),
                };
                push(&["-chardev", &format!("{backend}{}", log.unwrap_or_default())]);
                push(&["-serial", &format!("chardev:{id}")]);
            }
            None if port == 0 => {
                fds.push(controls.console);
                push(&[
                    "-chardev",
                    &format!(
                        "socket,id=serial0,fd={},server=on,wait=off{}",
                        controls.console,
                        log.unwrap_or_default()
                    ),
                ]);
                push(&["-serial", "chardev:serial0"]);
            }
            None => push(&["-serial", "null"]),
        }
    }

    // The guest agent channel (virtio-serial), always present.
    fds.push(controls.agent);
    push(&[
        "-chardev",
        &format!("socket,id=agent,fd={},server=on,wait=off", controls.agent),
    ]);
    push(&["-device", r#"{"driver":"virtio-serial-pci","id":"vser0"}"#]);
    push(&["-device", &json!({"driver": "virtserialport", "id": "agent0", "bus": "vser0.0", "chardev": "agent", "name": AGENT_PORT_NAME}).to_string()]);

    // Storage QoS: one throttle group for all disks, always present so a
    // limit can be set or lifted on the running VM.
    let qos = json!({"qom-type": "throttle-group", "id": ids::QOS_GROUP, "limits": qos_limits(cfg.storage_qos.as_ref())});
    push(&["-object", &qos.to_string()]);
    for c in &cfg.scsi_controllers {
        push(&[
            "-device",
            &json!({"driver": "virtio-scsi-pci", "id": ids::scsi_controller(c.id)}).to_string(),
        ]);
        for d in &c.disks {
            if let Some(p) = res.disks.get(&(c.id, d.lun)) {
                // Each disk's descriptor in an fd set of its own, tagged so a
                // removal finds it; the block node opens the set.
                fdset += 1;
                let fd = p.file.as_raw_fd();
                fds.push(fd);
                push(&[
                    "-add-fd",
                    &format!(
                        "fd={fd},set={fdset},opaque={}",
                        disk_fdset_opaque(c.id, d.lun)
                    ),
                ]);
                let (nodes, device) = scsi_disk_args(c.id, d, p, &format!("/dev/fdset/{fdset}"));
                for node in nodes {
                    push(&["-blockdev", &node.to_string()]);
                }
                push(&["-device", &device.to_string()]);
            }
        }
    }
    // Before the NVDIMMs, so its region starts where device memory does
    // (aligned) whatever NVDIMMs are added later. Starts empty.
    if let Some(room) = hotmem {
        let backend = if res.shared_memory {
            json!({"qom-type": "memory-backend-memfd", "id": ids::HOTPLUG_MEM_BACKEND, "size": room << 20, "share": true})
        } else {
            json!({"qom-type": "memory-backend-ram", "id": ids::HOTPLUG_MEM_BACKEND, "size": room << 20})
        };
        let device = json!({"driver": "virtio-mem-pci", "id": ids::HOTPLUG_MEM, "memdev": ids::HOTPLUG_MEM_BACKEND, "block-size": MEMORY_BLOCK_MB << 20, "requested-size": 0});
        push(&[
            "-object",
            &backend.to_string(),
            "-device",
            &device.to_string(),
        ]);
    }
    if let Some(v) = &cfg.vpmem {
        for d in &v.devices {
            if let Some((p, size)) = res.pmem.get(&d.id) {
                fds.push(p.file.as_raw_fd());
                let (backend, device) = pmem_args(d, &fd_path(p), *size);
                push(&[
                    "-object",
                    &backend.to_string(),
                    "-device",
                    &device.to_string(),
                ]);
            }
        }
    }
    for n in &cfg.network_adapters {
        let tap_fd = res.taps.get(&n.nic_id).map(|t| {
            fds.push(t.0.as_raw_fd());
            t.0.as_raw_fd().to_string()
        });
        let (netdev, device) = nic_args(n, tap_fd.as_deref().unwrap_or_default());
        push(&[
            "-netdev",
            &netdev.to_string(),
            "-device",
            &device.to_string(),
        ]);
    }
    for s in &cfg.plan9_shares {
        if let Some(p) = res.shares.get(&s.name) {
            // QEMU opens the share root once, through the descriptor, and
            // everything below it relative to that (never following a
            // link). A writable share maps the guest's owners and modes
            // into extended attributes: files the guest makes are QEMU's
            // with mode 0600 on the host, so guest root can never leave a
            // setuid, setgid or device file there.
            fds.push(p.file.as_raw_fd());
            let (model, ro) = if s.read_only {
                ("none", ",readonly=on")
            } else {
                ("mapped-xattr", "")
            };
            push(&[
                "-fsdev",
                &format!(
                    "local,id={},path={},security_model={model}{ro}",
                    ids::fsdev(&s.name),
                    fd_path(p)
                ),
            ]);
            push(&["-device", &json!({"driver": "virtio-9p-pci", "id": ids::plan9(&s.name), "fsdev": ids::fsdev(&s.name), "mount_tag": s.name}).to_string()]);
        }
    }
    if res.vsock_device {
        a.extend(super::vsock::launch_args(dir, name));
    }
    (a, Handover { fds })
}

#[cfg(test)]
mod tests;
