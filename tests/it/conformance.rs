//! The virtstack conformance suite (`uvmctl::conformance`) on real QEMU:
//! the same checks the fake and remotevm pass in the unit tests.

use crate::host::{Host, QEMU_USER};
use std::sync::Arc;
use std::time::Duration;
use uvmctl::spec::{Boot, LinuxKernelDirect, ScsiController, ScsiDisk, VmConfig};
use uvmctl::virtstack::qemu::user::ServiceUser;
use uvmctl::virtstack::qemu::{Accel, AllowedRoots, Qemu, QemuOptions, StateDir};
use uvmctl::vm::ScsiDiskType;

fn raw(host: &Host, name: &str, read_only: bool, lun: u32) -> ScsiDisk {
    ScsiDisk {
        lun,
        path: host.raw_image(name, 8),
        disk_type: ScsiDiskType::PassThrough,
        read_only,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_conforms() {
    let host = Host::new();
    let base = VmConfig {
        boot: Boot {
            linux_kernel_direct: Some(LinuxKernelDirect {
                kernel: host.kernel(),
                initrd: Some(host.guest.join("initrd.img")),
                cmdline: "console=ttyS0 panic=-1 quiet swiotlb=noforce".into(),
            }),
            uefi: None,
        },
        scsi_controllers: vec![ScsiController {
            id: 0,
            disks: vec![raw(&host, "base.img", true, 0)],
        }],
        ..VmConfig::default()
    };
    let user = nix::unistd::geteuid()
        .is_root()
        .then(|| ServiceUser::lookup(QEMU_USER, false).expect("service user"))
        .flatten();
    let state = StateDir::new(host.path("state")).expect("state dir");
    state.ensure_root().expect("state root");
    let qemu = Qemu::new(QemuOptions {
        state_dir: state,
        roots: AllowedRoots::new(&[host.path("img"), host.guest.clone()]),
        accel: Accel::Tcg,
        // The guest may not have booted to ACPI yet: a short graceful stop.
        stop_timeout: Duration::from_secs(3),
        unplug_timeout: Duration::from_secs(20),
        observer: false,
        qemu_user: user,
    });
    let fixture = uvmctl::conformance::Fixture {
        base,
        disks: vec![
            raw(&host, "one.img", false, 1),
            raw(&host, "two.img", false, 2),
        ],
        prefix: "conf".into(),
        event_timeout: Duration::from_secs(20),
        boot_timeout: crate::host::BOOT_TIMEOUT,
    };
    let out = uvmctl::conformance::run(Arc::new(qemu), &fixture).await;
    let failed = uvmctl::conformance::failures(&out);
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
