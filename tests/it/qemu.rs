//! Real QEMU, real guest: `uvmctl apply` changes VMs and the guest's own agent
//! says what it sees. Needs `qemu-system-x86_64` and the test guest
//! (`guest/build.sh`; `scripts/test` installs and builds both).

use crate::host::{Agent, BOOT_TIMEOUT, Host, assert_ok, has_block, qmp_by_hand, text};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn disks_and_nics_follow_the_spec_from_inside_the_guest() {
    let h = Host::new();
    let ro_img = h.raw_image("ro.img", 64);
    let nic = "  networkAdapters:\n    - {nicId: 6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01, endpointId: user, macAddress: 52-54-00-12-34-56}\n";
    let base = "  scsiControllers:\n    - id: 0\n";
    h.write_spec("web", &h.spec("web", base));
    h.apply();
    let mut agent = h.agent("web");
    assert!(
        !agent.cmd("blocks").iter().any(|l| l.starts_with("sd")),
        "no disk yet"
    );

    // Add a read-only 64 MiB disk and a NIC: the guest sees both.
    let disk = format!(
        "      disks:\n        - {{lun: 1, path: {}, type: passthrough, readOnly: true}}\n",
        ro_img.display()
    );
    h.write_spec("web", &h.spec("web", &format!("{base}{disk}{nic}")));
    let out = h.apply();
    assert!(text(&out).contains("+ scsiDisk 0:1"), "{}", text(&out));
    agent.wait_for("blocks", "the 64 MiB read-only disk at LUN 1", |b| {
        has_block(b, 64 << 20, 1, 1)
    });
    agent.wait_for("links", "MAC 52:54:00:12:34:56", |l| {
        l.iter().any(|x| x.contains("52:54:00:12:34:56"))
    });

    // Applying again changes nothing.
    let out = h.apply();
    assert!(
        text(&out).contains("No changes. 1 VM matches its spec."),
        "{}",
        text(&out)
    );
    // While another client holds the VM's main QMP socket (as a long apply
    // does), status still reads the VM through its observe socket.
    let held = UnixStream::connect(h.path("state").join("web").join("qmp.sock"))
        .expect("hold the main QMP socket");
    let row = &h.status()[0];
    assert_eq!(row["state"], "running", "{row}");
    assert!(row["lastError"].is_null(), "{row}");
    drop(held);

    // Storage QoS is changed live, and read back from QEMU's throttle group.
    let qos = "  storageQos: {iopsMaximum: 200, bandwidthMaximum: 4194304}\n";
    h.write_spec("web", &h.spec("web", &format!("{base}{disk}{nic}{qos}")));
    let out = h.apply();
    assert!(
        text(&out).contains("~ storageQos: unlimited → iops 200, bandwidth 4194304 B/s [live]"),
        "{}",
        text(&out)
    );
    let out = h.uvmctl(&["export", "web"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("iopsMaximum: 200"),
        "{}",
        text(&out)
    );
    assert!(text(&h.apply()).contains("No changes."));
    h.write_spec("web", &h.spec("web", &format!("{base}{disk}{nic}")));
    assert!(text(&h.apply()).contains("~ storageQos"));

    // A disk removed by hand over QMP is noticed by plan and restored by apply.
    qmp_by_hand(
        &h.path("state/web/qmp.sock"),
        "device_del",
        serde_json::json!({"id": "disk-0-1"}),
        Some("DEVICE_DELETED"),
    );
    agent.wait_for("blocks", "the disk gone after device_del", |b| {
        !has_block(b, 64 << 20, 1, 1)
    });
    let out = h.plan(&["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("+ scsiDisk 0:1"), "{}", text(&out));
    h.apply();
    agent.wait_for("blocks", "the disk restored", |b| {
        has_block(b, 64 << 20, 1, 1)
    });

    // Issue 31: a LUN unplugged by hand and given another image holds only
    // the new image (the old fd set used to stay, the old image open
    // read-write while plan said "No changes"), and 20 such cycles leave
    // QEMU with as many descriptors as one.
    let other_img = h.raw_image("other.img", 64);
    let pid = h.pid("web").expect("qemu pid");
    let held = |img: &Path| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("QEMU's descriptors")
            .filter_map(Result::ok)
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == img))
            .count()
    };
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .count()
    };
    // A watcher follows the VM's events all the while: with a monitor
    // connected, QEMU frees no fd set by itself.
    let events = UnixStream::connect(h.path("state/web/qmp-events.sock")).expect("events socket");
    {
        use std::io::{BufRead, Write};
        let mut r = std::io::BufReader::new(events.try_clone().expect("clone"));
        let mut line = String::new();
        r.read_line(&mut line).expect("greeting");
        (&events)
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .expect("capabilities");
        line.clear();
        r.read_line(&mut line).expect("capabilities answered");
    }
    let mut after_first = None;
    for cycle in 0..20 {
        let (now, before) = if cycle % 2 == 0 {
            (&other_img, &ro_img)
        } else {
            (&ro_img, &other_img)
        };
        qmp_by_hand(
            &h.path("state/web/qmp.sock"),
            "device_del",
            serde_json::json!({"id": "disk-0-1"}),
            Some("DEVICE_DELETED"),
        );
        let disk = format!(
            "      disks:\n        - {{lun: 1, path: {}, type: passthrough, readOnly: true}}\n",
            now.display()
        );
        h.write_spec("web", &h.spec("web", &format!("{base}{disk}{nic}")));
        assert_ok(&h.apply());
        assert_eq!(
            held(before),
            0,
            "cycle {cycle}: the old image is still open"
        );
        assert!(held(now) > 0, "cycle {cycle}: the new image is not open");
        after_first.get_or_insert_with(fds);
    }
    // A leaked fd set is one descriptor a cycle (20 here); QEMU may still
    // be closing the last apply's QMP connection, so a moment is allowed.
    let first = after_first.expect("cycles ran");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fds() > first + 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        fds() <= first + 1,
        "{} descriptors after 20 cycles, {first} after the first",
        fds()
    );
    let out = h.plan(&["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    drop(events);
    h.write_spec("web", &h.spec("web", &format!("{base}{disk}{nic}")));
    assert_ok(&h.apply());
    agent.wait_for("blocks", "the first image back", |b| {
        has_block(b, 64 << 20, 1, 1)
    });

    // Removing both from the spec removes them from the guest.
    h.write_spec("web", &h.spec("web", base));
    let out = h.apply();
    assert!(
        text(&out).contains("- scsiDisk 0:1") && text(&out).contains("- networkAdapter"),
        "{}",
        text(&out)
    );
    agent.wait_for("blocks", "the disk gone", |b| {
        !b.iter().any(|l| l.starts_with("sd"))
    });
    agent.wait_for("links", "the NIC gone", |l| {
        !l.iter().any(|x| x.contains("52:54:00:12:34:56"))
    });
    assert!(text(&h.apply()).contains("No changes."));
}

/// Issue 34: a guest that panics is unhealthy at once, through pvpanic and
/// QEMU's GUEST_PANICKED, not at its probe's deadline.
#[test]
fn wait_healthy_sees_a_guest_panic_at_once() {
    let h = Host::new();
    let health = "  health:\n    probes:\n      - kind: agent\n        deadlineSeconds: 600\n";
    let spec = h
        .spec("boom", health)
        .replace("swiotlb=noforce", "swiotlb=noforce uvmctl.panic=1");
    h.write_spec("boom", &spec);
    let specs = h.path("specs");
    let out = h.uvmctl(&[
        "apply",
        specs.to_str().expect("utf-8"),
        "--yes",
        "--wait-healthy",
        "300",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("unhealthy: probe panic: the guest panicked (GUEST_PANICKED)"),
        "{}",
        text(&out)
    );
}

#[test]
fn power_state_follows_the_spec() {
    let h = Host::new();
    // Issue 34: --wait-healthy returns once the probes of spec.health pass
    // on the real guest (its agent, an agent command, its console, its
    // READY=1 over vsock), with progress while it boots.
    let healthy = "  health:\n    probes:\n      - kind: agent\n        intervalSeconds: 1\n        minHealthySeconds: 2\n      - kind: exec\n        command: [cat, /proc/cmdline]\n        intervalSeconds: 1\n        minHealthySeconds: 0\n      - kind: console\n        pattern: 'init starting'\n        minHealthySeconds: 0\n      - kind: notify\n        intervalSeconds: 1\n        minHealthySeconds: 0\n";
    h.write_spec("pwr", &h.spec("pwr", healthy));
    let specs = h.path("specs");
    let specs = specs.to_str().expect("utf-8");
    let out = h.uvmctl(&["apply", specs, "--yes", "--wait-healthy", "180"]);
    assert_ok(&out);
    for said in [
        "still waiting for the guest to be healthy (2s)",
        "probe agent passes: pong",
        "probe exec cat /proc/cmdline passes: console=ttyS0 panic=-1 quiet swiotlb=noforce",
        "probe console /init starting/ passes: uvmctl-guest: init starting",
        "probe notify passes: READY=1",
        "healthy after",
    ] {
        assert!(text(&out).contains(said), "{said:?} in:\n{}", text(&out));
    }
    // uvmctl's own notify link is not a vmSocket of the spec: no drift.
    let plan = h.uvmctl(&["plan", specs, "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
    // The notify probe's credential, as the guest read it from its SMBIOS
    // type 11 strings (guest/init), and the READY=1 it sent over vsock.
    assert_eq!(
        h.agent("pwr").cmd("cat /run/uvmctl-notify-socket"),
        [format!(
            "vsock-stream:2:{}",
            uvmctl::vm::config::NOTIFY_VSOCK_PORT
        )]
    );
    h.agent("pwr");
    assert_eq!(h.state_of("pwr"), "running");
    let row = &h.status()[0];
    assert!(
        row["cpuTimeMs"].as_u64().is_some_and(|ms| ms > 0),
        "a booted guest used CPU: {row}"
    );
    assert!(row["rssMb"].as_u64().is_some_and(|mb| mb > 0), "{row}");

    h.write_spec("pwr", &h.spec("pwr", "  powerState: paused\n"));
    h.apply();
    assert_eq!(h.state_of("pwr"), "paused");

    h.write_spec("pwr", &h.spec("pwr", "  powerState: running\n"));
    h.apply();
    assert_eq!(h.state_of("pwr"), "running");
    assert_eq!(
        h.agent("pwr").cmd("ping"),
        ["pong"],
        "the guest runs on after resume"
    );

    h.write_spec("pwr", &h.spec("pwr", "  powerState: stopped\n"));
    let out = h.apply();
    assert!(
        text(&out).contains("powerState: running → stopped"),
        "{}",
        text(&out)
    );
    // Issue 20: it read `terminated`, the word for a VM that died.
    assert_eq!(h.state_of("pwr"), "stopped");
    assert!(
        h.status()[0]["lastError"].is_null(),
        "a stop asked for is no error"
    );

    h.write_spec("pwr", &h.spec("pwr", "  powerState: running\n"));
    h.apply();
    assert_eq!(h.state_of("pwr"), "running");
    assert_eq!(h.agent("pwr").cmd("ping"), ["pong"]);
    assert!(text(&h.apply()).contains("No changes."));

    // vCPUs are hot-plugged and unplugged; the guest sees them come and go.
    let running = h.spec("pwr", "  powerState: running\n");
    // A live change after which a probe keeps failing: apply says it is
    // unhealthy, naming the probe, and exits non-zero; the change is made.
    let failing = "  health:\n    probes:\n      - kind: exec\n        command: [cat, /nonexistent]\n        intervalSeconds: 1\n        minHealthySeconds: 0\n        deadlineSeconds: 3\n";
    h.write_spec(
        "pwr",
        &format!("{}{failing}", running.replace("count: 1", "count: 3")),
    );
    let out = h.uvmctl(&["apply", specs, "--yes", "--wait-healthy", "60"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("~ processors: 1 → 3 [live]")
            && text(&out).contains("unhealthy: probe exec cat /nonexistent: "),
        "{}",
        text(&out)
    );
    h.write_spec("pwr", &running.replace("count: 1", "count: 3"));
    assert!(
        text(&h.apply()).contains("No changes."),
        "health is no change"
    );
    let mut agent = h.agent("pwr");
    agent.wait_for("cpus", "3 online vCPUs", |c| c == ["3"]);
    h.write_spec("pwr", &running);
    let out = h.apply();
    assert!(
        text(&out).contains("~ processors: 3 → 1 [live]"),
        "{}",
        text(&out)
    );
    agent.wait_for("cpus", "1 online vCPU", |c| c == ["1"]);
    assert!(text(&h.apply()).contains("No changes."));

    // Memory grows and shrinks live (virtio-mem) within 1–4x the boot size;
    // the guest's MemTotal follows.
    let mem_kb = |agent: &mut Agent| -> u64 {
        agent.cmd("mem")[0]
            .trim()
            .parse()
            .expect("mem_kb is a number")
    };
    let boot_kb = mem_kb(&mut agent);
    h.write_spec("pwr", &running.replace("sizeMB: 256", "sizeMB: 512"));
    let out = h.apply();
    assert!(
        text(&out).contains("~ memory: 256 MB → 512 MB [live]"),
        "{}",
        text(&out)
    );
    let grown = agent.wait_for("mem", "256 MB more memory", |m| {
        m.first()
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .is_some_and(|kb| kb >= boot_kb + 250_000)
    });
    assert_eq!(grown.len(), 1);
    assert!(text(&h.apply()).contains("No changes."));
    h.write_spec("pwr", &running);
    let out = h.apply();
    assert!(
        text(&out).contains("~ memory: 512 MB → 256 MB [live]"),
        "{}",
        text(&out)
    );
    agent.wait_for("mem", "the memory given back", |m| {
        m.first()
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .is_some_and(|kb| kb <= boot_kb + 10_000)
    });
    // Beyond 4x the boot size, or below it, the resize needs a restart.
    h.write_spec("pwr", &running.replace("sizeMB: 256", "sizeMB: 2048"));
    let out = h.plan(&[]);
    assert!(
        text(&out).contains("~ memory: 256 MB → 2048 MB [restart]")
            && text(&out).contains("outside the 256–1024 MB"),
        "{}",
        text(&out)
    );
    h.write_spec("pwr", &running);

    // export writes what QEMU has as a spec; planning against it changes nothing.
    let out = h.uvmctl(&["export"]);
    assert_ok(&out);
    let exported = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        exported.contains("name: pwr") && exported.contains("state: running"),
        "{exported}"
    );
    std::fs::write(h.path("exported.yaml"), &exported).expect("write export");
    let exported_path = h.path("exported.yaml");
    let out = h.plan(&[
        "--observed",
        exported_path.to_str().expect("utf-8"),
        "--detailed-exitcode",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn plan9_shares_mount_and_vpmem_shows_as_pmem_whose_removal_needs_a_restart() {
    let h = Host::new();
    let share = h.path("img/share");
    std::fs::create_dir_all(&share).expect("mkdir share");
    std::fs::write(share.join("hello.txt"), "hello from the host\n").expect("write");
    // A fixed VHD: 16 MiB of data, then the 512-byte footer.
    let pmem = h.path("img/pmem.vhd");
    let mut bytes = vec![0u8; (16 << 20) + 512];
    bytes[16 << 20..(16 << 20) + 8].copy_from_slice(b"conectix");
    std::fs::write(&pmem, bytes).expect("write vhd");
    let extra = format!(
        "  plan9Shares:\n    - {{name: data, hostPath: {}, readOnly: true}}\n  vpmem:\n    maximumDevices: 2\n    maximumSizeBytes: 33554432\n    devices:\n      - {{id: 0, path: {}, format: vhd1, readOnly: true}}\n",
        share.display(),
        pmem.display()
    );
    h.write_spec("files", &h.spec("files", &extra));
    h.apply();
    let mut agent = h.agent("files");
    assert_eq!(agent.cmd("mount9p data /mnt/data"), Vec::<String>::new());
    assert_eq!(agent.cmd("ls /mnt/data"), ["hello.txt"]);
    assert_eq!(
        agent.cmd("cat /mnt/data/hello.txt"),
        ["hello from the host"]
    );
    agent.wait_for("blocks", "pmem0 of 16 MiB", |b| {
        b.iter()
            .any(|l| l.starts_with(&format!("pmem0 {} ", 16 << 20)))
    });
    // QEMU refuses to save a guest with a mounted 9p share: the save fails
    // with QEMU's reason and the guest runs on.
    h.write_spec(
        "files",
        &h.spec("files", &format!("{extra}  powerState: saved\n")),
    );
    let specs = h.path("specs");
    let out = h.uvmctl(&["apply", specs.to_str().expect("utf-8"), "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("saving the guest failed, it runs on as before")
            && text(&out).contains("mounted"),
        "{}",
        text(&out)
    );
    assert_eq!(h.state_of("files"), "running");
    assert_eq!(agent.cmd("ls /mnt/data"), ["hello.txt"]);
    h.write_spec("files", &h.spec("files", &extra));
    assert_eq!(agent.cmd("umount /mnt/data"), Vec::<String>::new());

    // Removing the VPMem device plans as a restart, not a live change.
    let without = extra.replace(
        &format!(
            "    devices:\n      - {{id: 0, path: {}, format: vhd1, readOnly: true}}\n",
            pmem.display()
        ),
        "",
    );
    h.write_spec("files", &h.spec("files", &without));
    let out = h.plan(&["--output", "json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let op = &doc["vms"][0]["ops"][0];
    assert_eq!(
        (op["operation"].as_str(), op["resource"].as_str()),
        (Some("remove"), Some("vpmemDevice"))
    );
    assert_eq!(op["disruption"], "restart", "{op}");
    let out = h.plan(&["--max-disruption", "live"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    // Applying it restarts the VM, and the device is gone.
    h.apply();
    let mut agent = h.agent("files");
    assert!(!agent.cmd("blocks").iter().any(|l| l.starts_with("pmem")));
    assert!(text(&h.apply()).contains("No changes."));
}

#[test]
fn a_saved_vm_is_restored_where_it_was_with_its_hot_plugged_devices() {
    let h = Host::new();
    let img = h.raw_image("cold.img", 8);
    let nic1 = "    - {nicId: 6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01, endpointId: user, macAddress: 52-54-00-12-34-01}\n";
    let nic2 = "    - {nicId: 6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c02, endpointId: user, macAddress: 52-54-00-12-34-02}\n";
    let disk = format!(
        "  scsiControllers:\n    - id: 0\n      disks:\n        - {{lun: 0, path: {}, type: passthrough}}\n",
        img.display()
    );
    h.write_spec(
        "sv",
        &h.spec("sv", &format!("{disk}  networkAdapters:\n{nic1}")),
    );
    h.apply();
    let mut agent = h.agent("sv");
    let boot_id = agent.cmd("cat /proc/sys/kernel/random/boot_id");

    // Hot changes that leave a layout a cold launch would not reproduce:
    // the controller's PCI slot is freed, then taken by a new NIC.
    // Hot-added vCPUs and memory, too.
    let boot_kb: u64 = agent.cmd("mem")[0].trim().parse().expect("mem_kb");
    let hot = h
        .spec("sv", &format!("  networkAdapters:\n{nic1}{nic2}"))
        .replace("count: 1", "count: 2")
        .replace("sizeMB: 256", "sizeMB: 384");
    h.write_spec("sv", &hot);
    h.apply();
    agent.wait_for("links", "the second NIC", |l| {
        l.iter().any(|x| x.contains("52:54:00:12:34:02"))
    });
    agent.wait_for("cpus", "2 vCPUs", |c| c == ["2"]);

    // A device added by hand would be missing at restore: no save then.
    let qmp_sock = h.path("state").join("sv").join("qmp.sock");
    qmp_by_hand(
        &qmp_sock,
        "device_add",
        serde_json::json!({"driver": "virtio-rng-pci", "id": "byhand"}),
        None,
    );
    h.write_spec("sv", &format!("{hot}  powerState: saved\n"));
    let specs = h.path("specs");
    let out = h.uvmctl(&["apply", specs.to_str().expect("utf-8"), "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("not saved: byhand added outside uvmctl"),
        "{}",
        text(&out)
    );
    assert_eq!(h.state_of("sv"), "running");
    qmp_by_hand(
        &qmp_sock,
        "device_del",
        serde_json::json!({"id": "byhand"}),
        Some("DEVICE_DELETED"),
    );

    let out = h.apply();
    assert!(
        text(&out).contains("powerState: running → saved"),
        "{}",
        text(&out)
    );
    assert_eq!(h.state_of("sv"), "saved");
    assert!(
        h.pid("sv")
            .is_none_or(|p| std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.is_empty())
                || !Path::new(&format!("/proc/{p}")).exists()),
        "nothing runs while saved (an exited QEMU may linger as a zombie)"
    );
    let saved = h.path("state").join("sv").join("saved.state");
    assert!(saved.is_file(), "the state is under the state dir");
    assert!(text(&h.apply()).contains("No changes."));

    h.write_spec("sv", &hot);
    let out = h.apply();
    assert!(
        text(&out).contains("powerState: saved → running"),
        "{}",
        text(&out)
    );
    assert_eq!(h.state_of("sv"), "running");
    let mut agent = h.agent("sv");
    assert_eq!(
        agent.cmd("cat /proc/sys/kernel/random/boot_id"),
        boot_id,
        "the same boot goes on: restored, not rebooted"
    );
    let links = agent.cmd("links");
    assert!(
        ["52:54:00:12:34:01", "52:54:00:12:34:02"]
            .iter()
            .all(|mac| links.iter().any(|l| l.contains(mac))),
        "{links:?}"
    );
    assert_eq!(agent.cmd("cpus"), ["2"], "the hot-added vCPU is back");
    let mem_kb: u64 = agent.cmd("mem")[0].trim().parse().expect("mem_kb");
    assert!(
        mem_kb >= boot_kb + 120_000,
        "the hot-added memory is back: {mem_kb} kB vs {boot_kb} kB at boot"
    );
    assert!(!saved.exists(), "a restored state is removed");
    assert!(text(&h.apply()).contains("No changes."));

    // Saved, then stopped: the saved state is discarded and the next start boots.
    h.write_spec("sv", &format!("{hot}  powerState: saved\n"));
    h.apply();
    h.write_spec("sv", &format!("{hot}  powerState: stopped\n"));
    h.apply();
    assert!(!saved.exists(), "stopped discards the saved state");
    h.write_spec("sv", &hot);
    h.apply();
    assert_ne!(
        h.agent("sv").cmd("cat /proc/sys/kernel/random/boot_id"),
        boot_id,
        "a fresh boot"
    );
}

#[test]
fn uefi_boot_starts_the_efi_application_with_its_args_under_ovmf() {
    let h = Host::new();
    // The Debian kernel is an EFI application (EFI stub); hcsshim-style
    // backslash paths, and the stub's initrd= naming a file in `dir`.
    let spec = format!(
        "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: efi\nspec:\n  boot:\n    uefi:\n      dir: {}\n      path: \\vmlinuz\n      args: initrd=\\initrd.img console=ttyS0 panic=-1 quiet swiotlb=noforce\n  processors:\n    count: 1\n  memory:\n    sizeMB: 256\n",
        h.guest.display()
    );
    h.write_spec("efi", &spec);
    h.apply();
    let mut agent = h.agent("efi");
    let efi = agent.cmd("ls /sys/firmware/efi");
    assert!(
        efi.iter().any(|e| e == "runtime"),
        "the guest runs on UEFI firmware: {efi:?}"
    );
    let vars = h.path("state").join("efi").join("efivars.fd");
    let mode = std::fs::metadata(&vars)
        .expect("own variable store")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    assert!(text(&h.apply()).contains("No changes."));

    // An EFI path that leaves `dir` is refused before anything runs.
    h.write_spec(
        "esc",
        &spec
            .replace("name: efi", "name: esc")
            .replace("\\vmlinuz", "../../../etc/passwd"),
    );
    let specs = h.path("specs");
    let out = h.uvmctl(&["apply", specs.to_str().expect("utf-8"), "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("spec.boot.uefi.path"), "{}", text(&out));
    assert_eq!(h.state_of("esc"), "absent");
}

#[test]
fn a_killed_qemu_is_reported_and_recreated_only_when_allowed() {
    let h = Host::new();
    // The serial console is relayed to a listener the test holds.
    let console = h.path("img/console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&console).expect("bind console");
    // QEMU (its service user) may connect to it.
    crate::host::share_with_qemu(&console, 0o660);
    let serial = format!(
        "  serialConsoles:\n    - {{port: 0, listenerPath: {}}}\n",
        console.display()
    );
    h.write_spec("crash", &h.spec("crash", &serial));
    h.apply();
    let (mut conn, _) = listener
        .accept()
        .expect("qemu connects to the console listener");
    conn.set_read_timeout(Some(BOOT_TIMEOUT)).expect("timeout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("uvmctl-guest") {
        let n = conn.read(&mut buf).expect("console output");
        assert!(
            n > 0,
            "console closed before the guest spoke: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    h.agent("crash");
    let out = h.uvmctl(&["wait", "crash", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(2), "still running: {}", text(&out));
    let pid = h.pid("crash").expect("pid");
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    );
    // `wait` returns once QEMU is gone and says it died on its own.
    let out = h.uvmctl(&["wait", "crash", "--timeout", "10"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("exited unexpectedly"), "{}", text(&out));

    let status = h.status();
    assert_eq!(status[0]["state"], "terminated");
    assert!(
        status[0]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("exited unexpectedly")),
        "{status}"
    );

    let out = h.plan(&[]);
    assert!(text(&out).contains("must be recreated"), "{}", text(&out));
    // Not allowed by the spec: a policy stop before anything runs.
    let specs = h.path("specs");
    let out = h.uvmctl(&["apply", specs.to_str().expect("utf-8"), "--yes"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains(
            "crash must be recreated, which its spec's policy.allowRecreate does not allow"
        ),
        "{}",
        text(&out)
    );
    assert_eq!(h.state_of("crash"), "terminated");

    // Allowed by the spec: recreated and booted.
    h.write_spec(
        "crash",
        &h.spec("crash", "  policy:\n    allowRecreate: true\n"),
    );
    h.apply();
    assert_eq!(h.state_of("crash"), "running");
    assert_eq!(h.agent("crash").cmd("ping"), ["pong"]);
    assert!(h.status()[0]["lastError"].is_null());
}

#[test]
fn bad_input_never_reaches_qemu() {
    let h = Host::new();
    let img = h.raw_image("ok.img", 8);
    let comma = h.path("img/a,b.img");
    std::fs::write(&comma, b"").expect("write");
    let secret = h.path("secret.img");
    std::fs::write(&secret, vec![0u8; 4096]).expect("write");
    std::os::unix::fs::symlink(&secret, h.path("img/link.img")).expect("symlink");
    let cases = [
        (
            comma.display().to_string(),
            "passthrough",
            "contains a comma",
        ),
        (
            h.path("img/missing.vhdx").display().to_string(),
            "vhdx",
            "No such file",
        ),
        (
            img.display().to_string(),
            "vhdx",
            "spec says vhdx but the image is raw",
        ),
        (
            format!("{}/../secret.img", h.path("img").display()),
            "passthrough",
            "outside the allowed roots",
        ),
        (
            h.path("img/link.img").display().to_string(),
            "passthrough",
            "outside the allowed roots",
        ),
    ];
    for (path, ty, expect) in cases {
        let disk = format!(
            "  scsiControllers:\n    - id: 0\n      disks:\n        - {{lun: 0, path: '{path}', type: {ty}}}\n"
        );
        h.write_spec("bad", &h.spec("bad", &disk));
        let specs = h.path("specs");
        let out = h.uvmctl(&["apply", specs.to_str().expect("utf-8"), "--yes"]);
        assert_eq!(out.status.code(), Some(1), "{path}: {}", text(&out));
        assert!(
            text(&out).contains(expect),
            "{path}: expected {expect:?} in\n{}",
            text(&out)
        );
        assert!(text(&out).contains("nothing was applied"), "{}", text(&out));
        assert!(
            !h.path("state/bad").exists(),
            "{path}: a refused VM leaves no state"
        );
    }
    // A newline in a path is refused when the spec loads.
    let disk = "  scsiControllers:\n    - id: 0\n      disks:\n        - {lun: 0, path: \"/tmp/a\\nb.img\", type: passthrough}\n";
    h.write_spec("bad", &h.spec("bad", disk));
    let specs = h.path("specs");
    let out = h.uvmctl(&["apply", specs.to_str().expect("utf-8"), "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("control character"), "{}", text(&out));
}

#[test]
fn qemu_runs_sandboxed_with_a_private_qmp_socket() {
    use std::os::unix::fs::PermissionsExt;
    let h = Host::new();
    h.write_spec("sbx", &h.spec("sbx", "  powerState: paused\n"));
    h.apply();
    let pid = h.pid("sbx").expect("pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let sandbox = args
        .windows(2)
        .find(|w| w[0] == "-sandbox")
        .map(|w| w[1].clone());
    assert_eq!(
        sandbox.as_deref(),
        Some("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
    );
    // QEMU runs as the VM's own user: a uid and gid of its own from the
    // service user's range (the service user itself on a host without
    // one), the service user's group as its one supplementary group (KVM
    // is not used here), no capabilities.
    use std::os::unix::fs::MetadataExt;
    let (svc_uid, svc_gid) = crate::host::qemu_user();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| crate::host::proc_status(pid, name);
    let uid: u32 = field("Uid:")[0].parse().expect("uid");
    let gid: u32 = field("Gid:")[0].parse().expect("gid");
    assert_eq!(field("Uid:"), vec![uid.to_string(); 4], "{status}");
    assert_eq!(field("Gid:"), vec![gid.to_string(); 4], "{status}");
    let ranged = std::fs::read_to_string("/etc/subuid")
        .is_ok_and(|t| t.lines().any(|l| l.starts_with("uvmctl-qemu:")));
    if ranged {
        assert!(uid >= 1 << 20 && uid != svc_uid, "{status}");
        let mut groups = field("Groups:");
        groups.sort();
        let mut want = vec![gid.to_string(), svc_gid.to_string()];
        want.sort();
        assert_eq!(groups, want, "{status}");
    } else {
        assert_eq!((uid, gid), (svc_uid, svc_gid), "{status}");
    }
    assert_eq!(field("CapEff:"), vec!["0000000000000000"], "{status}");
    // Its directory is root's, passable by its group alone; its sockets
    // are root's (uvmctl made them and handed QEMU the descriptors); the
    // backend's directory is the VM user's.
    let dir = std::fs::metadata(h.path("state/sbx")).expect("vm dir");
    assert_eq!(
        (dir.uid(), dir.gid(), dir.permissions().mode() & 0o7777),
        (0, gid, 0o710)
    );
    for sock in [
        "qmp.sock",
        "qmp-observe.sock",
        "qmp-events.sock",
        "agent.sock",
        "console.sock",
    ] {
        let m = std::fs::metadata(h.path("state/sbx").join(sock)).expect("socket");
        assert_eq!(
            (m.uid(), m.permissions().mode() & 0o077),
            (0, 0),
            "{sock}: root's alone"
        );
    }
    let vsock = std::fs::metadata(h.path("state/sbx/vsock")).expect("vsock dir");
    assert_eq!(
        (
            vsock.uid(),
            vsock.gid(),
            vsock.permissions().mode() & 0o7777
        ),
        (uid, gid, 0o700)
    );
    let record = std::fs::metadata(h.path("state/sbx/launch.json")).expect("record");
    assert_eq!(
        (record.uid(), record.permissions().mode() & 0o777),
        (0, 0o600)
    );
    // Its vsock backend too, where there is one.
    if let Some(backend) = h.record_pid("sbx", "vsockPid") {
        let status =
            std::fs::read_to_string(format!("/proc/{backend}/status")).expect("backend status");
        assert!(
            status.lines().any(|l| l.split_whitespace().eq([
                "Uid:".to_string(),
                uid.to_string(),
                uid.to_string(),
                uid.to_string(),
                uid.to_string()
            ])),
            "{status}"
        );
    }
    assert_eq!(h.state_of("sbx"), "paused");
}

/// Issue 7: one VM whose QEMU hangs (SIGSTOP: its QMP never greets) or
/// whose launch record is garbage is *unknown*, with why; the other VM's
/// spec edit is still planned and applied, within one QMP deadline.
#[test]
fn one_stuck_or_corrupt_vm_never_stops_the_others() {
    let h = Host::new();
    // Paused guests: QMP answers as usual and no CPU goes to booting them.
    let paused = "  powerState: paused\n";
    h.write_spec("stuck", &h.spec("stuck", paused));
    h.write_spec("well", &h.spec("well", paused));
    h.apply();
    let stuck = h.pid("stuck").expect("pid");
    let disk = h.raw_image("well.img", 4);
    let with_disk = format!(
        "{paused}  scsiControllers:\n    - id: 0\n      disks:\n        - {{lun: 0, path: {}, type: passthrough}}\n",
        disk.display()
    );
    h.write_spec("well", &h.spec("well", &with_disk));

    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &stuck.to_string()])
                .status()
                .is_ok_and(|s| s.success())
        );
    };
    signal("-STOP");
    // Well under two QMP deadlines (10 s each): VMs are observed side by side.
    let within = Duration::from_secs(16);

    let started = Instant::now();
    let out = h.plan(&[]);
    let took = started.elapsed();
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("vm stuck: cannot be observed (") && shown.contains("greeting"),
        "{shown}"
    );
    assert!(shown.contains("+ scsiDisk 0:0"), "{shown}");
    assert!(took < within, "plan took {took:?}");
    eprintln!("plan with one VM stopped by SIGSTOP: {took:?}");

    let specs = h.path("specs");
    let started = Instant::now();
    let out = h.uvmctl(&["apply", specs.to_str().expect("utf-8"), "--yes"]);
    let took = started.elapsed();
    let shown = text(&out);
    // Exit 1: a VM was left alone; the healthy one is done all the same.
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(shown.contains("1 VM(s) changed, 0 failed"), "{shown}");
    assert!(took < within, "apply took {took:?}");
    eprintln!("apply with one VM stopped by SIGSTOP: {took:?}");
    signal("-CONT");
    let out = h.plan(&["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // A launch record truncated to garbage: the same, and no wait at all.
    let record = h.path("state/stuck/launch.json");
    let good = std::fs::read(&record).expect("record");
    std::fs::write(&record, &good[..good.len() / 3]).expect("truncate");
    // (A paused guest cannot acknowledge a PCI unplug: the edit adds a disk.)
    let second = h.raw_image("well2.img", 4);
    let two_disks = format!(
        "{with_disk}        - {{lun: 1, path: {}, type: passthrough}}\n",
        second.display()
    );
    h.write_spec("well", &h.spec("well", &two_disks));
    let started = Instant::now();
    let out = h.uvmctl(&["apply", specs.to_str().expect("utf-8"), "--yes"]);
    let took = started.elapsed();
    let status = h.status();
    // Put the record back at once, so the host's cleanup finds the QEMU
    // whatever the assertions say.
    std::fs::write(&record, &good).expect("restore");
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("vm stuck: cannot be observed (") && shown.contains("corrupt launch record"),
        "{shown}"
    );
    assert!(shown.contains("+ scsiDisk 0:1"), "{shown}");
    assert!(shown.contains("1 VM(s) changed, 0 failed"), "{shown}");
    assert!(took < within, "apply took {took:?}");
    let row = |vm: &str| {
        status
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == vm))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(row("stuck")["state"], "unknown", "{status}");
    assert_eq!(row("well")["state"], "paused", "{status}");
    assert_eq!(
        row("well")["devices"],
        3,
        "a controller and two disks: {status}"
    );
    // Put the record back so the host's cleanup finds the QEMU.
    std::fs::write(&record, &good).expect("restore");
}

/// Issue 7: QEMU runs as root and would connect the guest's serial port to
/// any unix socket the spec names (a container runtime's API, say).
#[test]
fn a_serial_listener_outside_the_allowed_roots_never_reaches_qemu() {
    let h = Host::new();
    let api = h.path("api.sock");
    let _service = std::os::unix::net::UnixListener::bind(&api).expect("bind");
    let serial = format!(
        "  serialConsoles:\n    - {{port: 0, listenerPath: {}}}\n",
        api.display()
    );
    h.write_spec("nosy", &h.spec("nosy", &serial));
    let specs = h.path("specs");
    let out = h.uvmctl(&["apply", specs.to_str().expect("utf-8"), "--yes"]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("spec.serialConsoles[0].listenerPath")
            && shown.contains("outside the allowed roots"),
        "{shown}"
    );
    assert!(shown.contains("nothing was applied"), "{shown}");
    assert!(!h.path("state/nosy").exists(), "nothing created");
}

/// Issue 18: a saved plan applies exactly what was reviewed; a spec or a VM
/// that changed since makes it stale (exit 5), and nothing is applied.
/// (Stopped VMs: the plan and its checks are the point, not a boot.)
#[test]
fn a_saved_plan_applies_unchanged_and_a_stale_one_is_refused() {
    let h = Host::new();
    let stopped = |mem: u32| {
        h.spec("sp", "  powerState: stopped\n")
            .replace("sizeMB: 256", &format!("sizeMB: {mem}"))
    };
    let specs = h.path("specs");
    let specs = specs.to_str().expect("utf-8");
    let saved = |n: u32| h.path(&format!("plan{n}.json"));
    let plan_out = |n: u32| {
        let p = saved(n);
        let out = h.plan(&["--out", p.to_str().expect("utf-8")]);
        assert_ok(&out);
        p
    };
    let apply_saved =
        |p: &std::path::Path| h.uvmctl(&["apply", p.to_str().expect("utf-8"), "--yes"]);
    let memory = || h.status()[0]["memoryMb"].as_u64();

    h.write_spec("sp", &stopped(256));
    let p1 = plan_out(1);
    assert_ok(&apply_saved(&p1));
    assert_eq!(h.state_of("sp"), "stopped");
    assert_eq!(memory(), Some(256));

    // The spec changes after the review: refused, naming the VM.
    h.write_spec("sp", &stopped(512));
    let p2 = plan_out(2);
    h.write_spec("sp", &stopped(384));
    let out = apply_saved(&p2);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(
        text(&out).contains("sp: its spec changed"),
        "{}",
        text(&out)
    );
    assert_eq!(memory(), Some(256), "nothing applied");

    // The VM changes on the host after the review: refused too.
    h.write_spec("sp", &stopped(512));
    let p3 = plan_out(3);
    let other = h.path("other-specs");
    std::fs::create_dir_all(&other).expect("mkdir");
    std::fs::write(other.join("sp.yaml"), stopped(320)).expect("write");
    assert_ok(&h.uvmctl(&["apply", other.to_str().expect("utf-8"), "--yes"]));
    let out = apply_saved(&p3);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(
        text(&out).contains("sp: the VM changed on the host"),
        "{}",
        text(&out)
    );
    assert_eq!(memory(), Some(320));

    // Reviewed again: applied, exactly.
    let p4 = plan_out(4);
    // A tampered copy pointing at specs that name a host file outside the
    // allowed roots is refused before anything runs (its digests no longer
    // match; were they forged, the pre-flight would refuse the path).
    let evil = h.path("evil-specs");
    std::fs::create_dir_all(&evil).expect("mkdir");
    std::fs::write(
        evil.join("sp.yaml"),
        stopped(512).replace(
            "  powerState: stopped\n",
            "  powerState: stopped\n  scsiControllers:\n    - id: 0\n      disks:\n        - {lun: 0, path: /etc/shadow, type: passthrough}\n",
        ),
    )
    .expect("write");
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p4).expect("read plan")).expect("json");
    doc["dir"] = serde_json::json!(evil);
    let tampered = h.path("tampered.json");
    std::fs::write(&tampered, doc.to_string()).expect("write");
    let out = apply_saved(&tampered);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(
        text(&out).contains("sp: its spec changed"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("/etc/shadow:"), "{}", text(&out));
    assert_eq!(memory(), Some(320), "nothing applied");
    // One naming a directory whose files are no specs: stale, and nothing
    // of those files is echoed.
    let secret = h.path("secret");
    std::fs::create_dir_all(&secret).expect("mkdir");
    std::fs::write(secret.join("keys.yaml"), "api_key: [hunter2-secret\n").expect("write");
    doc["dir"] = serde_json::json!(secret);
    std::fs::write(&tampered, doc.to_string()).expect("write");
    let out = apply_saved(&tampered);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(!text(&out).contains("hunter2"), "{}", text(&out));
    let out = apply_saved(&p4);
    assert_ok(&out);
    assert!(
        text(&out).contains("memory: 320 MB → 512 MB"),
        "{}",
        text(&out)
    );
    assert_eq!(memory(), Some(512));
    // A saved plan carries its own options.
    let out = h.uvmctl(&["apply", p4.to_str().expect("utf-8"), "--yes", "--prune"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let _ = specs;
}

/// Issue 20: `uvmctl console`, `logs` and `agent` against the real guest: a
/// command typed at the console is answered by the guest's shell, a boot
/// line and that answer are in `logs`, `--follow` sees new lines and ends
/// when the VM is destroyed, and the agent's commands run.
#[test]
fn console_logs_and_agent_reach_the_real_guest() {
    use std::io::{BufRead, Write};
    use std::process::Stdio;
    let h = Host::new();
    let spec = h
        .spec("con", "")
        .replace("swiotlb=noforce", "swiotlb=noforce uvmctl.shell=1");
    h.write_spec("con", &spec);
    let specs = h.path("specs");
    let out = h.uvmctl(&[
        "apply",
        specs.to_str().expect("utf-8"),
        "--yes",
        "--wait-ready",
        "120",
    ]);
    assert_ok(&out);

    let logs = h.uvmctl(&["logs", "con"]);
    assert_ok(&logs);
    let logged = text(&logs);
    assert!(logged.contains("/console.log <=="), "{logged}");
    assert!(
        logged.contains("uvmctl-guest: init starting"),
        "a boot line: {logged}"
    );

    // Typed at the console (a pipe: it ends once the guest goes quiet).
    let console = |line: &str| {
        let mut child = h
            .command(&["console", "con"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("uvmctl console runs");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(line.as_bytes()).expect("type");
        drop(stdin);
        child.wait_with_output().expect("console ends")
    };
    let out = console("echo typed-$((6*7))\n");
    assert_ok(&out);
    // The shell's answer, not the echo of what was typed.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("typed-42"),
        "{}",
        text(&out)
    );
    assert!(text(&h.uvmctl(&["logs", "con"])).contains("typed-42"));

    // One client at a time: QEMU would hold a second one unanswered.
    let held = UnixStream::connect(h.path("state/con/console.sock")).expect("connect");
    std::thread::sleep(Duration::from_millis(300));
    let out = console("echo never\n");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("in use by another client"),
        "{}",
        text(&out)
    );
    drop(held);

    // The agent, with the words after the VM's name as its command.
    let out = h.uvmctl(&["agent", "con", "cat", "/proc/cmdline"]);
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("uvmctl.shell=1"),
        "{}",
        text(&out)
    );
    let out = h.uvmctl(&["agent", "con", "ls", "/no-such-dir"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("guest agent: "), "{}", text(&out));

    // Issue 31: what the guest prints reaches the operator's terminal with
    // its control characters shown, not obeyed (a retitle, a clear screen);
    // --raw gives the bytes.
    assert_ok(&console(
        "printf 'esc-\\033]0;owned\\007-\\033[2J-end\\n' | tee /tmp/esc\n",
    ));
    let logged = h.uvmctl(&["logs", "con"]);
    assert_ok(&logged);
    assert!(
        String::from_utf8_lossy(&logged.stdout).contains("esc-\\e]0;owned\\x07-\\e[2J-end"),
        "{}",
        text(&logged)
    );
    assert!(!logged.stdout.contains(&0x1b), "no raw escape printed");
    let raw = h.uvmctl(&["logs", "con", "--raw"]);
    assert!(
        String::from_utf8_lossy(&raw.stdout).contains("esc-\x1b]0;owned\x07-\x1b[2J-end"),
        "{}",
        text(&raw)
    );
    let out = h.uvmctl(&["agent", "con", "cat", "/tmp/esc"]);
    assert_ok(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "esc-\\e]0;owned\\x07-\\e[2J-end"
    );
    let out = h.uvmctl(&["agent", "--raw", "con", "cat", "/tmp/esc"]);
    assert!(out.stdout.contains(&0x1b), "{}", text(&out));

    // Issue 31: a guest flooding its console fills neither the state
    // directory nor memory: the log starts a new file at 1 MiB and keeps
    // one before it (3 MiB written here).
    assert_ok(&console(
        "(yes flood-0123456789abcdef0123456789abcdef | head -c 3145728; echo flood-done) > /dev/ttyS0 &\n",
    ));
    let log = h.path("state/con/console.log");
    let old = h.path("state/con/console.log.old");
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = || std::fs::read(&log).is_ok_and(|b| b.windows(10).any(|w| w == b"flood-done"));
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(done(), "the flood reached the log");
    let bound = 1 << 20;
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    assert!(
        size(&log) <= bound + (16 << 10),
        "console.log: {} bytes",
        size(&log)
    );
    assert!(
        size(&old) >= bound && size(&old) <= bound + (16 << 10),
        "console.log.old: {} bytes",
        size(&old)
    );
    let shown = h.uvmctl(&["logs", "con"]);
    assert!(
        text(&shown).contains("console.log.old <==") && text(&shown).contains("flood-done"),
        "logs shows both parts"
    );

    // --follow prints what comes, and ends when the VM is gone.
    let mut follow = h
        .command(&["logs", "con", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("uvmctl logs --follow runs");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    assert_ok(&console("echo followed-$((2+3))\n"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = false;
    while !seen && Instant::now() < deadline {
        seen = rx
            .recv_timeout(Duration::from_millis(200))
            .is_ok_and(|l| l.contains("followed-5"));
    }
    assert!(seen, "logs --follow printed the console's new line");
    assert_ok(&h.uvmctl(&["destroy", "con"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while follow.try_wait().expect("try_wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let ended = follow.try_wait().expect("try_wait");
    let _ = follow.kill();
    assert!(
        ended.is_some_and(|s| s.success()),
        "logs --follow ends with the VM: {ended:?}"
    );
}
