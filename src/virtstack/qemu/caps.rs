//! What the qemu virtstack can do on this host, as data the planner and the
//! executor both read.

use crate::vm::config::ProbeKind;
use crate::vm::{
    Capabilities, ColdSetting, Disruption, GuestOs, HostFacts, Resource, ResourceOperation,
    SaveBlocker, Support,
};

impl Capabilities {
    /// The QEMU virtstack as uvmctl drives QEMU 7.2 (`docs/capabilities.md`),
    /// on a host with `host`'s devices. It answers for what uvmctl does, not
    /// for what QEMU could do in principle.
    pub fn qemu(host: &HostFacts) -> Self {
        use Resource::*;
        let mut c = Capabilities::new(crate::vm::QEMU);
        // The agent's channel and the console log are part of every VM; a
        // guest's READY=1 comes over vsock, which needs its backend.
        for kind in [ProbeKind::Agent, ProbeKind::Exec, ProbeKind::Console] {
            c.probe_refused.remove(&kind);
        }
        if host.vhost_user_vsock {
            c.probe_refused.remove(&ProbeKind::Notify);
        } else {
            c.probe_refused.insert(
                ProbeKind::Notify,
                format!(
                    "the guest says READY=1 over vsock, which needs {} on this host",
                    BACKEND
                ),
            );
        }
        let live = Support::live;
        let no_update =
            |what: &str| Support::restart(format!("{what} is re-created at the next start"));
        c.set_all(
            ScsiController,
            live(),
            live(),
            Support::unsupported("a controller has no settings to update"),
        );
        c.set_all(Scsi, live(), live(), no_update("a disk"));
        c.set_all(
            VPMem,
            live(),
            Support::restart("QEMU 7.2 cannot unplug an NVDIMM"),
            Support::restart("QEMU 7.2 cannot unplug an NVDIMM"),
        );
        c.set_all(Network, live(), live(), no_update("a NIC"));
        c.set_all(
            Plan9,
            Support::restart("QEMU 7.2 has no fsdev_add: a 9p export exists only from launch"),
            live(),
            no_update("a 9p export"),
        );
        let windows_only =
            |what: &str| Support::unsupported(format!("{what} are a Windows (HCS) feature"));
        c.set_all(
            Vsmb,
            windows_only("SMB shares"),
            windows_only("SMB shares"),
            windows_only("SMB shares"),
        );
        c.set_all(
            CpuGroup,
            windows_only("CPU groups"),
            windows_only("CPU groups"),
            windows_only("CPU groups"),
        );
        let pci = if host.vfio {
            Support::unsupported(
                "PCI passthrough (vfio-pci) is not built into the qemu virtstack yet",
            )
        } else {
            Support::unsupported("PCI passthrough needs VFIO (/dev/vfio) on this host")
        };
        c.set_all(Pci, pci.clone(), pci.clone(), pci);
        c.update_only(&[Memory, Processor, StorageQos]);
        c.set(
            Memory,
            ResourceOperation::Update,
            Support {
                disruption: Disruption::Live,
                reason: format!(
                    "virtio-mem: from the boot size to {}x it, in {} MB steps (else a restart)",
                    MEMORY_HOTPLUG_FACTOR, MEMORY_BLOCK_MB
                ),
            },
        );
        c.set(Processor, ResourceOperation::Update, live());
        c.set(StorageQos, ResourceOperation::Update, live());
        let serial = Support::restart("serial consoles are wired at launch");
        c.set_all(Serial, serial.clone(), serial.clone(), serial);
        let vsock = if host.vhost_user_vsock {
            Support {
                disruption: Disruption::Live,
                reason: format!(
                    "through {} (user space, one backend per VM; no kernel module)",
                    BACKEND
                ),
            }
        } else if host.vhost_vsock {
            Support::unsupported(format!(
                "the kernel's vhost-vsock is not used by the qemu virtstack; install {} (scripts/setup-host does)",
                BACKEND
            ))
        } else {
            Support::unsupported(format!(
                "vsock needs {} (scripts/setup-host installs it)",
                BACKEND
            ))
        };
        c.set_all(VmSocket, vsock.clone(), vsock.clone(), vsock);
        let hv = Support::unsupported("HvSocket is a Hyper-V transport; use vsock");
        c.set_all(HvSocket, hv.clone(), hv.clone(), hv);
        c.guest_os.insert(GuestOs::Linux);
        // QEMU's pc machine has related knobs (max-ram-below-4g,
        // pci-hole64-size) but not HCS's three numbers; refuse rather than
        // launch something else than the spec says.
        c.cold_refused.insert(
            ColdSetting::MmioGaps,
            "MMIO gaps have no equivalent in the qemu virtstack yet".into(),
        );
        c.cold_refused.insert(
            ColdSetting::UefiSeveralInitrds,
            "the qemu virtstack passes one initrd= file to the firmware".into(),
        );
        // QEMU's vpc and vhdx drivers block migration, which a save is.
        c.save_refused.insert(
            SaveBlocker::ImageDisks,
            "QEMU saves a guest only with raw disks (its vhd1 and vhdx drivers cannot migrate)"
                .into(),
        );
        c.isolation.clone_from(&host.isolation);
        if let Some(why) = &host.pin_memory_refused {
            c.cold_refused
                .insert(ColdSetting::PhysicalMemory, why.clone());
        }
        if !host.ovmf {
            c.cold_refused.insert(
                ColdSetting::UefiBoot,
                format!("UEFI boot needs the OVMF firmware ({OVMF_CODE}, {OVMF_VARS}; Debian package ovmf)"),
            );
        }
        c
    }
}

/// Memory can grow live to this many times the size the VM booted with.
pub const MEMORY_HOTPLUG_FACTOR: u64 = 4;
/// virtio-mem plugs and unplugs memory in blocks of this many MiB.
pub const MEMORY_BLOCK_MB: u64 = 2;
/// UEFI firmware code (Debian package `ovmf`), read-only and shared.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// UEFI variable store template; each VM gets its own copy.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The vsock backend's program name (`scripts/setup-host` installs it).
pub const BACKEND: &str = "vhost-device-vsock";
