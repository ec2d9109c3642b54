//! What a virtstack can do: the `Supported(resource, operation)` matrix with
//! the disruption each cell costs. Pure data; each virtstack builds its own
//! profile beside its code.

use super::{Disruption, Resource, ResourceOperation};
use serde::Serialize;
use std::collections::BTreeMap;

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
    pub fn update_only(&mut self, resources: &[Resource]) {
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
