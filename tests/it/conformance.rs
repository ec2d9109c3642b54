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

fn base(host: &Host) -> VmConfig {
    VmConfig {
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
            disks: vec![raw(host, "base.img", true, 0)],
        }],
        ..VmConfig::default()
    }
}

/// The QEMU virtstack on `host`, as the CLI opens it.
fn qemu(host: &Host) -> Qemu {
    let user = nix::unistd::geteuid()
        .is_root()
        .then(|| ServiceUser::lookup(QEMU_USER, false).expect("service user"))
        .flatten();
    let state = StateDir::new(host.path("state")).expect("state dir");
    state.ensure_root().expect("state root");
    Qemu::new(QemuOptions {
        state_dir: state,
        roots: AllowedRoots::new(&[host.path("img"), host.guest.clone()]),
        accel: Accel::Tcg,
        // The guest may not have booted to ACPI yet: a short graceful stop.
        stop_timeout: Duration::from_secs(3),
        unplug_timeout: Duration::from_secs(20),
        observer: false,
        qemu_user: user,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_conforms() {
    let host = Host::new();
    let base = base(&host);
    let qemu = qemu(&host);
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

/// A VM's launch record is read once when a process first uses the VM,
/// and written once per change: a disk add, a second one, a removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reads_the_launch_record_once_and_writes_it_once() {
    use uvmctl::vm::items::{Item, ScsiDiskItem};
    use uvmctl::vm::{Change, Observe, Virtstack, VmName};
    let host = Host::new();
    let name = VmName::new("io").expect("name");
    let setup = qemu(&host);
    Virtstack::create(&setup, &name, &base(&host))
        .await
        .expect("create");
    Virtstack::start(&setup, &name, false).await.expect("start");
    // As a new `uvmctl apply` would: a fresh virtstack, nothing cached
    // (the first lets go of the QMP socket, as every command does).
    Virtstack::release(&setup, &name).await;
    let qemu = qemu(&host);
    Observe::observe(&qemu, &name).await.expect("observe");
    assert_eq!(qemu.record_io(), (1, 0), "observe reads the record once");
    let disk = |lun, file| {
        Item::ScsiDisk(ScsiDiskItem {
            controller: 0,
            disk: raw(&host, file, false, lun),
        })
    };
    qemu.change(&name, &Change::Add(disk(1, "a.img")))
        .await
        .expect("add");
    assert_eq!(qemu.record_io(), (1, 1), "a disk add: no read, one write");
    qemu.change(&name, &Change::Add(disk(2, "b.img")))
        .await
        .expect("add");
    qemu.change(&name, &Change::Remove(disk(1, "a.img")))
        .await
        .expect("remove");
    assert_eq!(qemu.record_io(), (1, 3), "each further change: one write");
    // Another process's write is seen: read again, once.
    Virtstack::release(&qemu, &name).await;
    Virtstack::change(&setup, &name, &Change::Remove(disk(2, "b.img")))
        .await
        .expect("remove elsewhere");
    Virtstack::release(&setup, &name).await;
    let seen = Observe::observe(&qemu, &name).await.expect("observe");
    assert_eq!(
        qemu.record_io(),
        (2, 3),
        "a record replaced elsewhere is read again"
    );
    assert!(
        seen.config.scsi_controllers[0]
            .disks
            .iter()
            .all(|d| d.lun == 0)
    );
    // A save reads nothing more either (the guest must have booted: the
    // vsock device goes before migration, and the guest lets go of it).
    let deadline = std::time::Instant::now() + crate::host::BOOT_TIMEOUT;
    while !Virtstack::guest_ready(&qemu, &name).await.expect("ready") {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not boot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (loads, stores) = qemu.record_io();
    Virtstack::save(&qemu, &name).await.expect("save");
    let (after_loads, after_stores) = qemu.record_io();
    eprintln!(
        "record io: save read {} time(s), wrote {} time(s)",
        after_loads - loads,
        after_stores - stores
    );
    assert_eq!(after_loads, loads, "a save reads no record");
    Virtstack::release(&qemu, &name).await;
    Virtstack::destroy(&setup, &name).await.expect("destroy");
}
