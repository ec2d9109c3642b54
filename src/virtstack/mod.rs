//! ② Observed state and capabilities: what a virtstack really has, and what
//! it can do. Virtstack implementations live below this module.

pub mod qemu;
pub mod recorded;

use crate::spec::VmConfig;
use crate::vm::{Disruption, Resource, ResourceOperation, State};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One VM as the virtstack has it.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedVm {
    /// Its configuration, read back from the virtstack (not from a cache).
    /// `config.policy` is the policy of the spec last applied to it.
    pub config: VmConfig,
    /// Lifecycle state.
    pub state: State,
    /// Whether uvmctl created it. VMs it did not create are never touched.
    pub managed: bool,
    /// Why it is down, when it exited without being asked to (hcsshim's
    /// `ExitError`): a crashed VM is rebuilt only where recreate is allowed.
    pub exit_error: Option<String>,
    /// Memory sizes the running VM can take without a restart, when the
    /// virtstack reports them (`None`: unknown, e.g. a recorded host).
    pub memory_hotplug: Option<MemoryHotplug>,
}

/// The memory sizes a running VM can be resized to live: from `min_mb` to
/// `max_mb`, in steps of `block_mb` from `min_mb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct MemoryHotplug {
    /// Smallest size (the memory it booted with), in MiB.
    pub min_mb: u64,
    /// Largest size, in MiB.
    pub max_mb: u64,
    /// Granularity, in MiB (at least 1).
    pub block_mb: u64,
}

impl MemoryHotplug {
    /// A VM whose memory cannot change while it runs.
    pub fn fixed(size_mb: u64) -> Self {
        MemoryHotplug {
            min_mb: size_mb,
            max_mb: size_mb,
            block_mb: 1,
        }
    }

    /// Whether `size_mb` can be reached live.
    pub fn allows(&self, size_mb: u64) -> bool {
        (self.min_mb..=self.max_mb).contains(&size_mb)
            && (size_mb - self.min_mb).is_multiple_of(self.block_mb.max(1))
    }
}

/// Every VM a virtstack has, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObservedState {
    /// VMs by name.
    pub vms: BTreeMap<String, ObservedVm>,
}

/// What a virtstack does for one operation on one resource, on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Support {
    /// The disruption it costs.
    pub disruption: Disruption,
    /// Why, when it is not live.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl Support {
    /// Done on the running VM.
    pub fn live() -> Self {
        Support {
            disruption: Disruption::Live,
            reason: String::new(),
        }
    }
    /// Done by stopping and starting the VM.
    pub fn restart(reason: impl Into<String>) -> Self {
        Support {
            disruption: Disruption::Restart,
            reason: reason.into(),
        }
    }
    /// Done by destroying and rebuilding the VM.
    pub fn recreate(reason: impl Into<String>) -> Self {
        Support {
            disruption: Disruption::Recreate,
            reason: reason.into(),
        }
    }
    /// Not done at all.
    pub fn unsupported(reason: impl Into<String>) -> Self {
        Support {
            disruption: Disruption::Unsupported,
            reason: reason.into(),
        }
    }
}

/// The resource × operation matrix of one virtstack on one host.
///
/// `supported(r, op)` is hcsshim's `Supported`: true exactly when the running
/// VM can do it. The matrix also says what it costs otherwise, which is what
/// the plan shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// Virtstack name.
    pub virtstack: String,
    /// Per resource, per operation.
    pub matrix: BTreeMap<Resource, BTreeMap<ResourceOperation, Support>>,
}

impl Capabilities {
    /// An empty matrix: everything unsupported until set.
    pub fn new(virtstack: impl Into<String>) -> Self {
        Capabilities {
            virtstack: virtstack.into(),
            matrix: BTreeMap::new(),
        }
    }

    /// Sets one cell.
    pub fn set(&mut self, r: Resource, op: ResourceOperation, s: Support) -> &mut Self {
        self.matrix.entry(r).or_default().insert(op, s);
        self
    }

    /// Sets add, remove and update of `r` at once.
    pub fn set_all(
        &mut self,
        r: Resource,
        add: Support,
        remove: Support,
        update: Support,
    ) -> &mut Self {
        self.set(r, ResourceOperation::Add, add);
        self.set(r, ResourceOperation::Remove, remove);
        self.set(r, ResourceOperation::Update, update)
    }

    /// Marks add and remove of resources that exist once per VM as not applicable.
    fn update_only(&mut self, resources: &[Resource]) {
        for r in resources {
            for op in [ResourceOperation::Add, ResourceOperation::Remove] {
                self.set(
                    *r,
                    op,
                    Support::unsupported(format!(
                        "a VM always has its {r}; it is changed by update"
                    )),
                );
            }
        }
    }

    /// What `op` on `r` costs; a missing cell is unsupported.
    pub fn support(&self, r: Resource, op: ResourceOperation) -> Support {
        self.matrix
            .get(&r)
            .and_then(|m| m.get(&op))
            .cloned()
            .unwrap_or_else(|| {
                Support::unsupported(format!("{} does not offer {r} {op}", self.virtstack))
            })
    }

    /// hcsshim's `Supported`: can the running VM do it?
    pub fn supported(&self, r: Resource, op: ResourceOperation) -> bool {
        self.support(r, op).disruption == Disruption::Live
    }

    /// The QEMU virtstack as uvmctl drives QEMU 7.2 (`docs/capabilities.md`),
    /// on a host with `host`'s devices. It answers for what uvmctl does, not
    /// for what QEMU could do in principle.
    pub fn qemu(host: &HostFacts) -> Self {
        use Resource::*;
        let mut c = Capabilities::new(crate::vm::QEMU);
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
                    qemu::launch::MEMORY_HOTPLUG_FACTOR,
                    qemu::launch::MEMORY_BLOCK_MB
                ),
            },
        );
        c.set(Processor, ResourceOperation::Update, live());
        c.set(StorageQos, ResourceOperation::Update, live());
        let serial = Support::restart("serial consoles are wired at launch");
        c.set_all(Serial, serial.clone(), serial.clone(), serial);
        let vsock = if host.vhost_vsock {
            Support::unsupported("vsock listeners are not built into the qemu virtstack yet")
        } else {
            Support::unsupported("vsock needs /dev/vhost-vsock on this host")
        };
        c.set_all(VmSocket, vsock.clone(), vsock.clone(), vsock);
        let hv = Support::unsupported("HvSocket is a Hyper-V transport; use vsock");
        c.set_all(HvSocket, hv.clone(), hv.clone(), hv);
        c
    }

    /// The HCS virtstack as hcsshim documents it (Windows hosts; not probed).
    pub fn hcs() -> Self {
        use Resource::*;
        let mut c = Capabilities::new(crate::vm::HCS);
        let live = Support::live;
        let cold = |what: &str| {
            Support::recreate(format!(
                "HCS sets {what} only when the compute system is created"
            ))
        };
        c.set_all(
            ScsiController,
            cold("SCSI controllers"),
            cold("SCSI controllers"),
            cold("SCSI controllers"),
        );
        for r in [Scsi, VPMem, Network, Vsmb, Plan9, Pci] {
            c.set_all(
                r,
                live(),
                live(),
                Support::restart(format!("HCS has no in-place {r} update")),
            );
        }
        c.update_only(&[CpuGroup, Memory, Processor, StorageQos]);
        c.set(CpuGroup, ResourceOperation::Update, live());
        c.set(Memory, ResourceOperation::Update, live());
        c.set(
            Processor,
            ResourceOperation::Update,
            cold("the processor count"),
        );
        c.set(StorageQos, ResourceOperation::Update, cold("storage QoS"));
        c.set_all(
            Serial,
            cold("serial consoles"),
            cold("serial consoles"),
            cold("serial consoles"),
        );
        c.set_all(
            HvSocket,
            live(),
            live(),
            Support::restart("HCS has no in-place socket update"),
        );
        let vsock = Support::unsupported("vsock is not a Hyper-V transport; use hvsocket");
        c.set_all(VmSocket, vsock.clone(), vsock.clone(), vsock);
        c
    }

    /// The built-in profile of a virtstack by name, for `plan --observed`.
    pub fn profile(name: &str) -> Option<Self> {
        match name {
            crate::vm::QEMU => Some(Capabilities::qemu(&HostFacts::probe())),
            crate::vm::HCS => Some(Capabilities::hcs()),
            _ => None,
        }
    }
}

impl Capabilities {
    /// The matrix as a Markdown table: one row per resource, one column per
    /// operation, each cell `class` or `class: reason`.
    pub fn markdown_table(&self) -> String {
        let mut out = String::from("| resource | add | remove | update |\n|---|---|---|---|\n");
        for r in Resource::ALL {
            let cell = |op| {
                let s = self.support(r, op);
                if s.reason.is_empty() {
                    s.disruption.to_string()
                } else {
                    format!("{}: {}", s.disruption, s.reason)
                }
            };
            out += &format!(
                "| {r} | {} | {} | {} |\n",
                cell(ResourceOperation::Add),
                cell(ResourceOperation::Remove),
                cell(ResourceOperation::Update)
            );
        }
        out
    }
}

/// Host devices that decide what QEMU can offer here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/vhost-vsock` exists.
    pub vhost_vsock: bool,
    /// `/dev/vfio/vfio` exists.
    pub vfio: bool,
}

impl HostFacts {
    /// Looks at this host's device nodes.
    pub fn probe() -> Self {
        HostFacts {
            vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
            vfio: Path::new("/dev/vfio/vfio").exists(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Resource::*;
    use ResourceOperation::*;

    #[test]
    fn qemu_profile_says_what_qemu_72_facts_say() {
        let c = Capabilities::qemu(&HostFacts::default());
        assert!(c.supported(Scsi, Add) && c.supported(Scsi, Remove));
        assert!(c.supported(VPMem, Add));
        assert_eq!(c.support(VPMem, Remove).disruption, Disruption::Restart);
        assert_eq!(c.support(Plan9, Add).disruption, Disruption::Restart);
        assert!(c.supported(Plan9, Remove));
        assert_eq!(c.support(Vsmb, Add).disruption, Disruption::Unsupported);
        assert_eq!(c.support(VmSocket, Add).disruption, Disruption::Unsupported);
        assert_eq!(c.support(Pci, Add).disruption, Disruption::Unsupported);
    }

    #[test]
    fn qemu_profile_names_the_host_device_a_feature_lacks() {
        let without = Capabilities::qemu(&HostFacts::default());
        assert!(
            without
                .support(VmSocket, Add)
                .reason
                .contains("/dev/vhost-vsock")
        );
        let with = Capabilities::qemu(&HostFacts {
            vhost_vsock: true,
            vfio: true,
        });
        assert!(with.support(VmSocket, Add).reason.contains("not built"));
        assert!(!with.supported(Pci, Add));
    }

    /// `docs/capabilities.md` holds each profile's table between
    /// `<!-- table:NAME -->` and `<!-- end -->`; `UVMCTL_UPDATE_DOCS=1`
    /// rewrites them from the code.
    #[test]
    fn docs_capabilities_md_shows_the_profiles_as_the_code_has_them() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/capabilities.md");
        let mut doc = std::fs::read_to_string(path).expect("docs/capabilities.md exists");
        let mut stale = Vec::new();
        for caps in [
            Capabilities::qemu(&HostFacts::default()),
            Capabilities::hcs(),
        ] {
            let open = format!("<!-- table:{} -->\n", caps.virtstack);
            let start = doc
                .find(&open)
                .map(|i| i + open.len())
                .expect("table marker");
            let end = start + doc[start..].find("<!-- end -->").expect("end marker");
            let table = caps.markdown_table();
            if doc[start..end] != table {
                stale.push(caps.virtstack.clone());
                doc.replace_range(start..end, &table);
            }
        }
        if std::env::var_os("UVMCTL_UPDATE_DOCS").is_some() {
            std::fs::write(path, &doc).expect("write docs/capabilities.md");
        } else {
            assert!(
                stale.is_empty(),
                "docs/capabilities.md is stale for {stale:?}; run UVMCTL_UPDATE_DOCS=1 cargo test"
            );
        }
    }

    #[test]
    fn a_missing_cell_is_unsupported_and_says_so() {
        let c = Capabilities::new("empty");
        let s = c.support(Memory, Update);
        assert_eq!(s.disruption, Disruption::Unsupported);
        assert_eq!(s.reason, "empty does not offer memory update");
    }
}
