use super::Placement;
use super::*;
use crate::spec::*;
use crate::virtstack::qemu::devices::place_devices;
use crate::vm::{Chain, HostFacts, ScsiDiskType};
use serde_json::Value;

const TEST_UUID: &str = "0e7a5a4c-6f0b-4d8e-9a1d-2b3c4d5e6f70";

/// Control socket descriptors as a launch would hand them over.
const TEST_FDS: Controls = Controls {
    qmp: 40,
    observe: 41,
    events: 42,
    agent: 43,
    console: 44,
};

/// This host's capabilities (firmware), without vsock: argv tests must
/// not depend on whether the vsock backend is installed.
fn caps() -> Capabilities {
    Capabilities::qemu(&HostFacts {
        vhost_user_vsock: false,
        // Pinned memory is judged on its own (user::MemLock).
        pin_memory_refused: None,
        isolation: None,
        ..HostFacts::probe(&crate::virtstack::qemu::user::MemLock::Inherent)
    })
}

fn cfg() -> VmConfig {
    VmConfig {
        boot: Boot {
            linux_kernel_direct: Some(LinuxKernelDirect {
                kernel: "/k/vmlinuz".into(),
                initrd: None,
                cmdline: "console=ttyS0,115200 panic=-1 -device evil".into(),
            }),
            uefi: None,
        },
        processors: Processors { count: 2 },
        memory: Memory {
            size_mb: 256,
            ..Memory::default()
        },
        scsi_controllers: vec![ScsiController {
            id: 0,
            disks: vec![ScsiDisk {
                lun: 3,
                path: "/d/a.vhdx".into(),
                disk_type: ScsiDiskType::Vhdx,
                read_only: true,
            }],
        }],
        network_adapters: vec![NetworkAdapter {
            nic_id: "6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01".into(),
            endpoint_id: "user".into(),
            mac_address: "52-54-00-12-34-56".into(),
        }],
        serial_consoles: vec![SerialConsole {
            port: 1,
            listener_path: "/run/l,x.sock".into(),
        }],
        ..VmConfig::default()
    }
}

fn built() -> (Vec<String>, Handover) {
    let dir = StateDir {
        root: "/run/uvmctl-test".into(),
    };
    let mut res = Resolved {
        kernel: Some(HostFile::for_test("/k/vmlinuz")),
        ..Resolved::default()
    };
    res.disks
        .insert((0, 3), HostFile::for_test("/d/we,ird.vhdx"));
    argv(
        "web",
        &cfg(),
        &res,
        TEST_FDS,
        Some(TEST_UUID),
        &dir,
        Accel::Tcg,
    )
}

fn after<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
    argv.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

#[test]
fn sandbox_paused_start_and_private_qmp_socket() {
    let (a, _) = built();
    assert_eq!(after(&a, "-sandbox"), vec![SANDBOX]);
    assert!(a.iter().any(|x| x == "-S"));
    // QMP on the listening sockets uvmctl made and hands over: no path
    // of them is on QEMU's command line.
    let chardevs = after(&a, "-chardev");
    for (id, fd) in [("qmp", 40), ("qmp-observe", 41), ("qmp-events", 42)] {
        assert!(
            chardevs.contains(&format!("socket,id={id},fd={fd},server=on,wait=off").as_str()),
            "{chardevs:?}"
        );
        assert!(after(&a, "-mon").contains(&format!("chardev={id},mode=control").as_str()));
    }
    assert!(chardevs.contains(&"socket,id=agent,fd=43,server=on,wait=off"));
    assert!(
        !a.iter().any(|x| x.contains(".sock,") || x == "-qmp"),
        "{a:?}"
    );
    assert_eq!(after(&a, "-uuid"), vec![TEST_UUID]);
    let made = new_machine_uuid().expect("uuid");
    assert_eq!((made.len(), &made[14..15]), (36, "4"), "{made}");
    assert_ne!(made, new_machine_uuid().expect("uuid"));
    assert_eq!(after(&a, "-machine"), vec!["pc,accel=tcg"]);
    assert_eq!(after(&a, "-smp"), vec!["1,maxcpus=8"]);
    assert_eq!(after(&a, "-m"), vec!["256M,maxmem=1024M"]);
}

#[test]
fn efi_paths_are_relative_to_the_boot_directory() {
    assert_eq!(
        efi_relative("\\EFI\\BOOT\\BOOTX64.EFI"),
        Path::new("EFI/BOOT/BOOTX64.EFI")
    );
    assert_eq!(efi_relative("/vmlinuz"), Path::new("vmlinuz"));
    assert_eq!(efi_relative("vmlinuz"), Path::new("vmlinuz"));
}

#[test]
fn uefi_boot_passes_the_app_its_args_and_its_initrd_through_the_firmware() {
    let root = tempfile::Builder::new()
        .prefix("uve")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let boot = root.path().join("boot");
    std::fs::create_dir(&boot).expect("mkdir");
    std::fs::write(boot.join("vmlinuz"), b"MZ").expect("app");
    std::fs::write(boot.join("initrd.img"), b"ramdisk").expect("initrd");
    std::fs::write(root.path().join("outside"), b"x").expect("outside");
    let roots = AllowedRoots::new(&[root.path()]);
    let mut c = cfg();
    c.scsi_controllers.clear();
    c.serial_consoles.clear();
    c.boot = Boot {
        linux_kernel_direct: None,
        uefi: Some(UefiBoot {
            dir: boot.clone(),
            path: "\\vmlinuz".into(),
            args: "initrd=\\initrd.img console=ttyS0 quiet".into(),
        }),
    };
    let firmware = Path::new(OVMF_CODE).is_file() && Path::new(OVMF_VARS).is_file();
    let res = resolve(&c, &roots, &caps());
    if !firmware {
        let err = Chain(&res.expect_err("no firmware, no UEFI boot")).to_string();
        assert!(err.contains("Debian package ovmf"), "{err}");
        return;
    }
    let res = res.expect("resolves");
    let dir = StateDir {
        root: "/run/uvmctl-test".into(),
    };
    let (a, _) = argv("efi", &c, &res, TEST_FDS, Some(TEST_UUID), &dir, Accel::Tcg);
    assert_eq!(
        after(&a, "-machine"),
        vec!["pc,accel=tcg,pflash0=fw-code,pflash1=fw-vars"]
    );
    // The app and its initrd, opened where the spec says, are handed
    // over as descriptors.
    let real = |p: &Path| std::fs::canonicalize(p).expect("canonical");
    let (kernel, initrd) = (
        res.kernel.as_ref().expect("app"),
        res.initrd.as_ref().expect("initrd"),
    );
    assert_eq!(kernel.path, real(&boot.join("vmlinuz")));
    assert_eq!(initrd.path, real(&boot.join("initrd.img")));
    assert_eq!(after(&a, "-kernel"), vec![fd_path(kernel)]);
    assert_eq!(after(&a, "-initrd"), vec![fd_path(initrd)]);
    assert_eq!(after(&a, "-append"), vec!["console=ttyS0 quiet"]);
    assert!(
        after(&a, "-blockdev")
            .iter()
            .any(|b| b.contains("/run/uvmctl-test/efi/efivars.fd")),
        "its own variable store"
    );

    // Files outside `dir` are refused, even under an allowed root.
    let mut esc = c.clone();
    if let Some(u) = esc.boot.uefi.as_mut() {
        u.args = "initrd=../outside".into();
    }
    let err = Chain(&resolve(&esc, &roots, &caps()).expect_err("escape")).to_string();
    assert!(
        err.contains("spec.boot.uefi.args") && err.contains("inside"),
        "{err}"
    );
}

#[test]
fn placement_pins_devices_by_id_and_leaves_the_rest_alone() {
    let (mut a, _) = built();
    let before = a.clone();
    let mut placement = Placement::new();
    let mut props = serde_json::Map::new();
    props.insert("addr".into(), json!("5.0"));
    placement.insert(ids::scsi_controller(0), props);
    place_devices(&mut a, &placement);
    let scsi: Value = after(&a, "-device")
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|d| d["id"] == ids::scsi_controller(0))
        .expect("controller");
    assert_eq!(scsi["addr"], "5.0");
    assert_eq!(scsi["driver"], "virtio-scsi-pci");
    let changed = a.iter().zip(&before).filter(|(x, y)| x != y).count();
    assert_eq!(changed, 1, "only the placed device changes");
}

#[test]
fn memory_above_the_boot_size_is_a_virtio_mem_region_starting_empty() {
    let (a, _) = built();
    let objects = after(&a, "-object");
    let backend: Value = objects
        .iter()
        .filter_map(|o| serde_json::from_str::<Value>(o).ok())
        .find(|o| o["id"] == ids::HOTPLUG_MEM_BACKEND)
        .expect("virtio-mem backend");
    assert_eq!(backend["size"], json!(768u64 << 20));
    let device: Value = after(&a, "-device")
        .iter()
        .filter_map(|o| serde_json::from_str::<Value>(o).ok())
        .find(|o| o["driver"] == "virtio-mem-pci")
        .expect("virtio-mem device");
    assert_eq!(device["requested-size"], json!(0));
    assert_eq!(device["memdev"], ids::HOTPLUG_MEM_BACKEND);

    // Pinned memory cannot be virtio-mem: no region, memory fixed.
    let mut pinned = cfg();
    pinned.memory.backing = MemoryBackingType::Physical;
    assert_eq!(hotplug_memory_mb(&pinned), None);
    let dir = StateDir {
        root: "/run/uvmctl-test".into(),
    };
    let pinned_argv = |accel| {
        let res = Resolved::default();
        argv("web", &pinned, &res, TEST_FDS, Some(TEST_UUID), &dir, accel).0
    };
    let a = pinned_argv(Accel::Tcg);
    assert_eq!(after(&a, "-m"), vec!["256M"]);
    assert!(!a.iter().any(|x| x.contains("virtio-mem")));
    // Its QEMU locks all of itself: under TCG its translation buffer is
    // small (QEMU's default locked 1.6 GB for this 256 MB guest); KVM has none.
    assert_eq!(after(&a, "-machine"), vec!["pc"]);
    assert_eq!(after(&a, "-accel"), vec!["tcg,tb-size=128"]);
    let kvm = pinned_argv(Accel::Kvm);
    assert_eq!(after(&kvm, "-machine"), vec!["pc,accel=kvm"]);
    assert!(after(&kvm, "-accel").is_empty());

    // An odd size keeps the region in whole 2 MiB blocks.
    let mut odd = cfg();
    odd.memory.size_mb = 255;
    assert_eq!(hotplug_memory_mb(&odd), Some(764));
}

#[test]
fn spec_values_travel_as_whole_argv_elements_or_json_never_spliced() {
    let (a, handover) = built();
    // The command line is one element: its commas cannot start new options.
    assert_eq!(
        after(&a, "-append"),
        vec!["console=ttyS0,115200 panic=-1 -device evil"]
    );
    // No host path reaches QEMU: the disk is the descriptor uvmctl
    // opened, in an fd set the block node opens; the kernel likewise.
    assert!(
        !a.iter()
            .any(|x| x.contains("we,ird") || x.contains("vmlinuz")),
        "{a:?}"
    );
    let blockdevs = after(&a, "-blockdev");
    let file: Value = serde_json::from_str(blockdevs[0]).expect("json");
    assert_eq!(file["filename"], "/dev/fdset/1");
    assert_eq!(file["read-only"], true);
    let files: Vec<RawFd> = handover
        .fds
        .iter()
        .copied()
        .filter(|fd| ![40, 41, 42, 43, 44].contains(fd))
        .collect();
    let [kernel_fd, disk_fd] = files[..] else {
        panic!("two files handed over: {:?}", handover.fds);
    };
    assert_eq!(after(&a, "-kernel"), vec![format!("/dev/fd/{kernel_fd}")]);
    assert_eq!(
        after(&a, "-add-fd"),
        vec![format!(
            "fd={disk_fd},set=1,opaque={}",
            ids::scsi_disk_file(0, 3)
        )]
    );
    let format: Value = serde_json::from_str(blockdevs[1]).expect("json");
    assert_eq!(format["driver"], "vhdx", "format stated, never probed");
    let top: Value = serde_json::from_str(blockdevs[2]).expect("json");
    assert_eq!(
        (top["driver"].as_str(), top["throttle-group"].as_str()),
        (Some("throttle"), Some("qos"))
    );
    // A serial listener not connected at launch is a null backend until
    // it accepts (serial.rs); no path of it reaches QEMU.
    assert!(
        after(&a, "-chardev").contains(&"null,id=serial1"),
        "{:?}",
        after(&a, "-chardev")
    );
    // COM1 without a listener of the spec's is uvmctl's console.
    assert_eq!(
        after(&a, "-serial"),
        vec!["chardev:serial0", "chardev:serial1"]
    );
    for chardev in after(&a, "-chardev") {
        assert!(!chardev.contains("l,x"), "{chardev}");
    }
}

/// Issue 20: `uvmctl console` and `logs`. COM1 is a socket of the VM's
/// state directory unless the spec relays it, and what the guest writes
/// there goes to the console log, handed over as a descriptor.
#[test]
fn com1_is_the_console_and_its_output_is_logged() {
    let dir = StateDir {
        root: "/run/uvmctl-test".into(),
    };
    let mut res = Resolved {
        kernel: Some(HostFile::for_test("/k/vmlinuz")),
        console_log: Some(HostFile::for_test("/run/uvmctl-test/web/console.log")),
        ..Resolved::default()
    };
    let mut c = cfg();
    c.serial_consoles.clear();
    let (a, handover) = argv("web", &c, &res, TEST_FDS, Some(TEST_UUID), &dir, Accel::Tcg);
    let log_fd = res.console_log.as_ref().map(|f| f.file.as_raw_fd());
    assert!(handover.fds.contains(&log_fd.unwrap_or(-1)));
    assert!(
        after(&a, "-add-fd").contains(
            &format!(
                "fd={},set={CONSOLE_LOG_FDSET},opaque=console-log",
                log_fd.unwrap_or(-1)
            )
            .as_str()
        )
    );
    assert_eq!(after(&a, "-serial"), vec!["chardev:serial0"]);
    assert!(after(&a, "-chardev").contains(
        &format!(
            "socket,id=serial0,fd=44,server=on,wait=off,logfile=/dev/fdset/{CONSOLE_LOG_FDSET},logappend=on"
        )
        .as_str()
    ));
    // A spec's own COM1 listener gets the log too, and no console socket.
    c.serial_consoles = vec![SerialConsole {
        port: 0,
        listener_path: "/run/l.sock".into(),
    }];
    res.serials.insert(0, "/run/l.sock".into());
    // Connected by uvmctl (issue 30: QEMU's user may not connect to a
    // listener root made): the socket is handed over by number.
    let (ours, _theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
    let conn = Opened(std::sync::Arc::new(std::os::fd::OwnedFd::from(ours)));
    let conn_fd = conn.0.as_raw_fd();
    res.serial_conns.insert(0, conn);
    let (a, handover) = argv("web", &c, &res, TEST_FDS, Some(TEST_UUID), &dir, Accel::Tcg);
    let chardevs = after(&a, "-chardev");
    assert!(
        chardevs.iter().all(|c| !c.contains("console.sock")),
        "{chardevs:?}"
    );
    assert!(
        chardevs.contains(
            &format!(
                "socket,id=serial0,fd={conn_fd},logfile=/dev/fdset/{CONSOLE_LOG_FDSET},logappend=on"
            )
            .as_str()
        )
    );
    assert!(handover.fds.contains(&conn_fd));
}

#[test]
fn devices_carry_the_ids_observe_maps_back() {
    let (a, _) = built();
    let devices: Vec<Value> = after(&a, "-device")
        .iter()
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let ids: Vec<&str> = devices.iter().filter_map(|d| d["id"].as_str()).collect();
    assert!(ids.contains(&"scsi0"));
    assert!(ids.contains(&"disk-0-3"));
    assert!(ids.contains(&"nic-6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01"));
    let nic = devices
        .iter()
        .find(|d| d["driver"] == "virtio-net-pci")
        .expect("nic");
    assert_eq!(nic["mac"], "52:54:00:12:34:56");
    let disk = devices
        .iter()
        .find(|d| d["driver"] == "scsi-hd")
        .expect("disk");
    assert_eq!(
        (disk["bus"].as_str(), disk["lun"].as_u64()),
        (Some("scsi0.0"), Some(3))
    );
}

#[test]
fn settings_qemu_cannot_honour_are_refused_not_dropped() {
    let roots = AllowedRoots::new(&["/"]);
    let mut c = cfg();
    c.scsi_controllers.clear();
    c.boot.linux_kernel_direct = Some(LinuxKernelDirect {
        kernel: "/proc/version".into(),
        initrd: None,
        cmdline: String::new(),
    });
    c.memory.mmio = Some(Mmio {
        low_gap_mb: 256,
        high_base_mb: 65536,
        high_gap_mb: 1024,
    });
    c.serial_consoles.clear();
    let err = resolve(&c, &roots, &caps()).expect_err("mmio refused");
    assert!(err.to_string().starts_with("spec.memory.mmio:"), "{err}");
    c.memory.mmio = None;
    assert!(resolve(&c, &roots, &caps()).is_ok());
}

#[test]
fn a_serial_listener_outside_the_allowed_roots_is_refused() {
    // Issue 7: QEMU, as root, would connect the guest's serial port to
    // any unix socket of the host (a container runtime's API, say).
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::write(root.path().join("vmlinuz"), b"k").expect("kernel");
    let roots = AllowedRoots::new(&[root.path()]);
    let mut c = cfg();
    c.scsi_controllers.clear();
    c.network_adapters.clear();
    c.boot.linux_kernel_direct = Some(LinuxKernelDirect {
        kernel: root.path().join("vmlinuz"),
        initrd: None,
        cmdline: String::new(),
    });
    let outside = tempfile::tempdir().expect("tempdir");
    let api = outside.path().join("api.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&api).expect("bind");
    for path in [
        api.clone(),
        // A link inside the roots to the socket outside is followed, then refused.
        {
            let link = root.path().join("console.sock");
            std::os::unix::fs::symlink(&api, &link).expect("symlink");
            link
        },
        // A listener that does not exist yet, in a directory outside.
        outside.path().join("later.sock"),
        root.path().join("../escape.sock"),
    ] {
        c.serial_consoles[0].listener_path = path.clone();
        let err = resolve(&c, &roots, &caps()).expect_err("outside the roots");
        let text = Chain(&err).to_string();
        assert!(
            text.starts_with("spec.serialConsoles[0].listenerPath")
                && text.contains("outside the allowed roots"),
            "{}: {text}",
            path.display()
        );
    }
    // Under a root it is accepted before it exists (QEMU reconnects),
    // and QEMU is pointed at the resolved path.
    c.serial_consoles[0].listener_path = root.path().join("web.sock");
    let res = resolve(&c, &roots, &caps()).expect("inside the roots");
    let want = std::fs::canonicalize(root.path())
        .expect("canonical")
        .join("web.sock");
    assert_eq!(res.serials.get(&1), Some(&want));
}

#[test]
fn with_vsock_every_memory_is_shared_and_listeners_are_checked_like_consoles() {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::write(root.path().join("vmlinuz"), b"k").expect("kernel");
    let roots = AllowedRoots::new(&[root.path()]);
    let vsock = Capabilities::qemu(&HostFacts {
        vhost_user_vsock: true,
        ..HostFacts::default()
    });
    let mut c = cfg();
    c.scsi_controllers.clear();
    c.network_adapters.clear();
    c.serial_consoles.clear();
    c.boot.linux_kernel_direct = Some(LinuxKernelDirect {
        kernel: root.path().join("vmlinuz"),
        initrd: None,
        cmdline: String::new(),
    });
    let outside = tempfile::tempdir().expect("tempdir");
    c.vm_sockets = vec![VmSocket {
        socket_type: crate::vm::VMSocketType::VSock,
        service_id: None,
        port: Some(5000),
        listener_path: outside.path().join("agent.sock"),
    }];
    let err = resolve(&c, &roots, &vsock).expect_err("outside the roots");
    let text = Chain(&err).to_string();
    assert!(
        text.starts_with("spec.vmSockets[0].listenerPath")
            && text.contains("outside the allowed roots"),
        "{text}"
    );
    c.vm_sockets[0].listener_path = root.path().join("agent.sock");
    let res = resolve(&c, &roots, &vsock).expect("inside the roots");
    let want = std::fs::canonicalize(root.path())
        .expect("canonical")
        .join("agent.sock");
    assert_eq!(res.vsock_listeners.get(&5000), Some(&want));
    assert!(res.shared_memory && res.vsock_device);

    let dir = StateDir {
        root: "/run/uvmctl-test".into(),
    };
    let (a, _) = argv("web", &c, &res, TEST_FDS, Some(TEST_UUID), &dir, Accel::Tcg);
    assert_eq!(
        after(&a, "-machine"),
        vec!["pc,accel=tcg,memory-backend=ram"]
    );
    let objects: Vec<serde_json::Value> = after(&a, "-object")
        .iter()
        .filter_map(|o| serde_json::from_str(o).ok())
        .collect();
    let memories: Vec<&serde_json::Value> = objects
        .iter()
        .filter(|o| {
            o["qom-type"]
                .as_str()
                .is_some_and(|t| t.starts_with("memory-backend"))
        })
        .collect();
    assert_eq!(
        memories.len(),
        2,
        "boot RAM and the virtio-mem region: {memories:?}"
    );
    for m in memories {
        assert_eq!(m["qom-type"], "memory-backend-memfd");
        assert_eq!(m["share"], true);
    }
    assert_eq!(
        after(&a, "-chardev")
            .into_iter()
            .filter(|c| c.contains("vhost-vsock.sock"))
            .collect::<Vec<_>>(),
        vec!["socket,id=vsock-chr,path=/run/uvmctl-test/web/vsock/vhost-vsock.sock"]
    );

    // Without the backend a vsock listener is refused, and a VM without
    // one gets private memory and no device.
    let err = resolve(&c, &roots, &caps()).expect_err("no backend");
    assert!(
        Chain(&err)
            .to_string()
            .contains("vsock needs vhost-device-vsock")
    );
    c.vm_sockets.clear();
    let res = resolve(&c, &roots, &caps()).expect("resolves");
    assert!(!res.shared_memory && res.vsock_listeners.is_empty());
    let (a, _) = argv("web", &c, &res, TEST_FDS, Some(TEST_UUID), &dir, Accel::Tcg);
    assert!(
        !a.iter()
            .any(|x| x.contains("memfd") || x.contains("vhost-user"))
    );
}

#[test]
fn storage_qos_is_one_throttle_group_over_every_disk() {
    let dir = StateDir {
        root: "/run/uvmctl-test".into(),
    };
    let mut c = cfg();
    c.storage_qos = Some(StorageQos {
        iops_maximum: Some(200),
        bandwidth_maximum: None,
    });
    let (a, _) = argv(
        "web",
        &c,
        &Resolved::default(),
        TEST_FDS,
        Some(TEST_UUID),
        &dir,
        Accel::Tcg,
    );
    let objects: Vec<Value> = after(&a, "-object")
        .iter()
        .filter_map(|o| serde_json::from_str(o).ok())
        .collect();
    let group = objects
        .iter()
        .find(|o| o["qom-type"] == "throttle-group")
        .expect("throttle group");
    assert_eq!(group["limits"], json!({"iops-total": 200, "bps-total": 0}));
}

#[test]
fn a_vm_whose_sockets_would_not_fit_sun_path_is_refused() {
    let root = tempfile::Builder::new()
        .prefix(&"r".repeat(40))
        .tempdir_in("/tmp")
        .expect("tempdir");
    let dir = StateDir::new(root.path()).expect("state dir");
    let err = dir
        .create_vm_dir(&"v".repeat(64), None)
        .expect_err("too long");
    assert!(
        err.to_string().contains("use a shorter --state-dir"),
        "{err}"
    );
    assert!(dir.create_vm_dir("web", None).is_ok());
}

#[test]
fn state_dir_refuses_roots_qemu_could_misread() {
    assert!(StateDir::new("relative/dir").is_err());
    assert!(StateDir::new("/tmp/a,b").is_err());
    assert!(StateDir::new("/tmp/a\nb").is_err());
}

/// Issue 7: the plan promised what apply refused (`memory.mmio` planned
/// live, `guestOS: windows` planned live). For generated specs, the plan
/// against the qemu profile and qemu's own pre-flight agree: a VM whose
/// plan has no `[unsupported]` op is never refused by the pre-flight for
/// what it asks (only, later, for host paths), and one whose plan has
/// such an op is refused.
mod plan_and_preflight_agree {
    use super::*;
    use crate::plan::tests::properties::arb_config;
    use crate::plan::{PlanOptions, plan};
    use crate::vm::{Disruption, GuestOs, ObservedState, ObservedVm, State};
    use proptest::prelude::*;

    prop_compose! {
        fn arb_spec()(
            c in arb_config(),
            windows in prop::bool::weighted(0.2),
            mmio in prop::bool::weighted(0.2),
            uefi in prop::option::weighted(0.3, 1usize..3),
            physical in prop::bool::weighted(0.2),
            vsmb in prop::bool::weighted(0.1),
            pci in prop::bool::weighted(0.1),
            cpu_group in prop::bool::weighted(0.1),
            hvsocket in prop::bool::weighted(0.1),
        ) -> VmConfig {
            let mut c = c;
            if windows {
                c.guest_os = GuestOs::Windows;
            }
            if mmio {
                c.memory.mmio = Some(Mmio { low_gap_mb: 256, high_base_mb: 65536, high_gap_mb: 1024 });
            }
            if let Some(initrds) = uefi {
                let args: Vec<String> = (0..initrds).map(|i| format!("initrd=i{i}.img")).collect();
                c.boot = Boot {
                    linux_kernel_direct: None,
                    uefi: Some(UefiBoot { dir: "/b".into(), path: "\\app.efi".into(), args: args.join(" ") }),
                };
            }
            if physical {
                c.memory.backing = MemoryBackingType::Physical;
            }
            if vsmb {
                c.vsmb_shares.push(VsmbShare { name: "s".into(), host_path: "/s".into(), allowed_files: vec![], options: Default::default() });
            }
            if pci {
                c.pci_devices.push(PciDevice { instance_id: "0000:01:00.0".into(), vmbus_guid: None });
            }
            if cpu_group {
                c.windows = Some(WindowsOptions { cpu_group: Some("3f2504e0-4f89-11d3-9a0c-0305e82c3301".into()) });
            }
            if hvsocket {
                c.vm_sockets.push(VmSocket { socket_type: crate::vm::VMSocketType::HvSocket, service_id: Some("3f2504e0-4f89-11d3-9a0c-0305e82c3302".into()), port: None, listener_path: "/h".into() });
            }
            c
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn whatever_the_qemu_plan_calls_doable_the_qemu_preflight_accepts(
            want in arb_spec(),
            running in any::<bool>(),
            facts in (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        ) {
            let caps = Capabilities::qemu(&HostFacts { vhost_vsock: facts.0, vfio: facts.1, ovmf: facts.2, vhost_user_vsock: facts.3, pin_memory_refused: None, isolation: None });
            let mut observed = ObservedState::default();
            if running {
                observed.vms.insert("vm".into(), ObservedVm {
                    config: crate::plan::tests::base("vm"),
                    state: State::Running,
                    managed: true,
                    exit_error: None,
                    memory_hotplug: None,
                });
            }
            let mut desired = crate::spec::DesiredState::default();
            desired.vms.insert("vm".into(), crate::spec::DesiredVm { name: "vm".into(), file: "t.yaml".into(), doc: 0, config: want.clone().into(), status: None, labels: Default::default() });
            let p = plan(&desired, &observed, &caps, &PlanOptions::default());
            // What cannot be built; a save the disks cannot do is the
            // power op's, and building the VM is fine.
            let unsupported = p.vms.iter().flat_map(|v| &v.ops).any(|o| o.disruption == Disruption::Unsupported && o.resource != crate::vm::items::ResourceKind::PowerState);
            // No root exists: every host path fails, after the capability check.
            let roots = AllowedRoots::new::<&str>(&[]);
            match resolve(&want, &roots, &caps) {
                Err(LaunchError::Refused(r)) => prop_assert!(unsupported, "pre-flight refused {r} but the plan is {:#?}", p.vms),
                Err(LaunchError::Unsupported(why)) => prop_assert!(false, "a refusal outside the capabilities: {why}"),
                _ => prop_assert!(!unsupported, "planned unsupported, but the pre-flight accepts: {:#?}", p.vms),
            }
        }
    }
}
