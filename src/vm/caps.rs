//! What a virtstack can do: the `Supported(resource, operation)` matrix with
//! the disruption each cell costs. Pure data; each virtstack builds its own
//! profile beside its code.

use super::config::{ProbeKind, VmConfig};
use super::items::{ItemKey, Items, ResourceKind, flatten};
use super::{Disruption, GuestOs, Resource, ResourceOperation};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

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
    /// Guest operating systems it runs (hcsshim's `CapabilitiesVM` lists them too).
    pub guest_os: BTreeSet<GuestOs>,
    /// Cold settings it cannot build, with why. Absent: it builds them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cold_refused: BTreeMap<ColdSetting, String>,
    /// What keeps it from saving a VM (`powerState: saved`), with why.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub save_refused: BTreeMap<SaveBlocker, String>,
    /// How one VM's processes are kept from another's, on this host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolation: Option<String>,
    /// Health probe kinds (`spec.health`) it does not run, with why.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub probe_refused: BTreeMap<ProbeKind, String>,
}

/// Something in a VM that may keep a virtstack from saving its guest state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SaveBlocker {
    /// SCSI disks in an image format (vhd1, vhdx), not raw.
    ImageDisks,
}

impl SaveBlocker {
    /// Every blocker, in a stable order.
    pub const ALL: [SaveBlocker; 1] = [SaveBlocker::ImageDisks];

    /// What in `cfg` it concerns, as the plan names items (empty: nothing).
    pub fn found_in(self, cfg: &VmConfig) -> Vec<String> {
        match self {
            SaveBlocker::ImageDisks => cfg
                .scsi_controllers
                .iter()
                .flat_map(|c| {
                    c.disks
                        .iter()
                        .filter(|d| d.disk_type != super::ScsiDiskType::PassThrough)
                        .map(move |d| {
                            let format = match d.disk_type {
                                super::ScsiDiskType::Vhd1 => "vhd1",
                                _ => "vhdx",
                            };
                            format!("scsiDisk {}:{} ({format})", c.id, d.lun)
                        })
                })
                .collect(),
        }
    }
}

/// A cold setting (fixed when a VM is built) a virtstack may be unable to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ColdSetting {
    /// `spec.boot.linuxKernelDirect`.
    LinuxKernelDirectBoot,
    /// `spec.boot.uefi`.
    UefiBoot,
    /// More than one `initrd=` in `spec.boot.uefi.args`.
    UefiSeveralInitrds,
    /// `spec.memory.mmio`.
    MmioGaps,
    /// `spec.memory.backing: physical`.
    PhysicalMemory,
}

impl ColdSetting {
    /// Every setting, in a stable order.
    pub const ALL: [ColdSetting; 5] = [
        ColdSetting::LinuxKernelDirectBoot,
        ColdSetting::UefiBoot,
        ColdSetting::UefiSeveralInitrds,
        ColdSetting::MmioGaps,
        ColdSetting::PhysicalMemory,
    ];

    /// The spec field it concerns.
    pub fn field(self) -> &'static str {
        match self {
            ColdSetting::LinuxKernelDirectBoot => "spec.boot.linuxKernelDirect",
            ColdSetting::UefiBoot => "spec.boot.uefi",
            ColdSetting::UefiSeveralInitrds => "spec.boot.uefi.args",
            ColdSetting::MmioGaps => "spec.memory.mmio",
            ColdSetting::PhysicalMemory => "spec.memory.backing",
        }
    }

    /// The item kind a change of it shows as in a plan.
    pub fn kind(self) -> ResourceKind {
        match self {
            ColdSetting::LinuxKernelDirectBoot
            | ColdSetting::UefiBoot
            | ColdSetting::UefiSeveralInitrds => ResourceKind::Boot,
            ColdSetting::MmioGaps => ResourceKind::Mmio,
            ColdSetting::PhysicalMemory => ResourceKind::MemoryConfig,
        }
    }

    /// Whether `cfg` uses it.
    pub fn used_by(self, cfg: &VmConfig) -> bool {
        match self {
            ColdSetting::LinuxKernelDirectBoot => cfg.boot.linux_kernel_direct.is_some(),
            ColdSetting::UefiBoot => cfg.boot.uefi.is_some(),
            ColdSetting::UefiSeveralInitrds => cfg.boot.uefi.as_ref().is_some_and(|u| {
                u.args
                    .split_whitespace()
                    .filter(|t| t.starts_with("initrd="))
                    .count()
                    > 1
            }),
            ColdSetting::MmioGaps => cfg.memory.mmio.is_some(),
            ColdSetting::PhysicalMemory => cfg.memory.backing == super::MemoryBackingType::Physical,
        }
    }
}

/// Something in a VM's configuration a virtstack cannot build: the plan
/// shows it as `[unsupported]` and nothing is applied to that VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    /// The item it concerns, as the plan names it.
    pub kind: ResourceKind,
    /// Which one.
    pub key: ItemKey,
    /// Spec field.
    pub field: String,
    /// Why.
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl Capabilities {
    /// An empty matrix: everything unsupported until set, and no health
    /// probe run until a virtstack says it runs one.
    pub fn new(virtstack: impl Into<String>) -> Self {
        let virtstack = virtstack.into();
        let no_probe = format!("the {virtstack} virtstack has no way to probe a guest");
        Capabilities {
            matrix: BTreeMap::new(),
            guest_os: BTreeSet::new(),
            cold_refused: BTreeMap::new(),
            save_refused: BTreeMap::new(),
            isolation: None,
            probe_refused: ProbeKind::ALL
                .iter()
                .map(|k| (*k, no_probe.clone()))
                .collect(),
            virtstack,
        }
    }

    /// The probes of `cfg`'s `spec.health` this virtstack does not run:
    /// (field, why), for the plan to refuse the VM with.
    pub fn probe_refusals(&self, cfg: &VmConfig) -> Vec<(String, String)> {
        let Some(health) = &cfg.health else {
            return Vec::new();
        };
        health
            .probes
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let why = self.probe_refused.get(&p.kind)?;
                Some((
                    format!("spec.health.probes[{i}].kind"),
                    format!("{} probes: {why}", p.kind.as_str()),
                ))
            })
            .collect()
    }

    /// Why this virtstack cannot save `cfg`'s guest, if it cannot (what in
    /// the spec keeps it, and the virtstack's reason).
    pub fn save_refusal(&self, cfg: &VmConfig) -> Option<String> {
        let why: Vec<String> = SaveBlocker::ALL
            .iter()
            .filter_map(|b| {
                let reason = self.save_refused.get(b)?;
                let found = b.found_in(cfg);
                (!found.is_empty()).then(|| format!("{}: {reason}", found.join(", ")))
            })
            .collect();
        (!why.is_empty()).then(|| why.join("; "))
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

    /// Everything in `cfg` this virtstack cannot build at all: a guest OS it
    /// does not run, a refused cold setting, or a device whose addition (a
    /// setting's update) is unsupported. Pure; the planner marks these
    /// `[unsupported]` and a virtstack's pre-flight refuses the same list,
    /// so a plan never promises what apply refuses.
    pub fn refusals(&self, cfg: &VmConfig) -> Vec<Refusal> {
        self.refusals_in(cfg, &flatten(cfg))
    }

    /// [`Capabilities::refusals`] with `cfg` already flattened into `items`
    /// (the planner has them at hand).
    pub fn refusals_in(&self, cfg: &VmConfig, items: &Items) -> Vec<Refusal> {
        let mut out = Vec::new();
        if !self.guest_os.contains(&cfg.guest_os) {
            let runs: Vec<&str> = self.guest_os.iter().map(|g| g.as_str()).collect();
            out.push(Refusal {
                kind: ResourceKind::GuestOs,
                key: ItemKey::Unit,
                field: "spec.guestOS".into(),
                reason: format!(
                    "the {} virtstack runs {} guests, not {}",
                    self.virtstack,
                    if runs.is_empty() {
                        "no".to_string()
                    } else {
                        runs.join(" and ")
                    },
                    cfg.guest_os.as_str()
                ),
            });
        }
        for setting in ColdSetting::ALL {
            if let Some(why) = self.cold_refused.get(&setting)
                && setting.used_by(cfg)
            {
                out.push(Refusal {
                    kind: setting.kind(),
                    key: ItemKey::Unit,
                    field: setting.field().into(),
                    reason: why.clone(),
                });
            }
        }
        for ((kind, key), item) in items {
            let (kind, key) = (*kind, key.clone());
            let Some(resource) = kind.resource(&key) else {
                continue;
            };
            if item.is_default() {
                continue;
            }
            // A VM is built with its singletons; they can only be updated.
            let op = if kind.is_singleton() {
                ResourceOperation::Update
            } else {
                ResourceOperation::Add
            };
            let s = self.support(resource, op);
            if s.disruption == Disruption::Unsupported {
                out.push(Refusal {
                    field: format!("{kind} {key}").trim_end().to_string(),
                    kind,
                    key,
                    reason: s.reason,
                });
            }
        }
        out
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
        c.guest_os.extend([GuestOs::Linux, GuestOs::Windows]);
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
        let runs: Vec<&str> = self.guest_os.iter().map(|g| g.as_str()).collect();
        out += &format!("\nGuest operating systems: {}.\n", runs.join(", "));
        if let Some(isolation) = &self.isolation {
            out += &format!("\nIsolation: {isolation}.\n");
        }
        if !self.cold_refused.is_empty() {
            out += "\nCold settings it does not build:\n\n";
            for (setting, why) in &self.cold_refused {
                out += &format!("- `{}`: {why}\n", setting.field());
            }
        }
        if !self.probe_refused.is_empty() {
            out += "\nHealth probes it does not run:\n\n";
            for (kind, why) in &self.probe_refused {
                out += &format!("- `{}`: {why}\n", kind.as_str());
            }
        }
        out
    }
}

/// Host devices (and privileges) that decide what QEMU can offer here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/vhost-vsock` exists.
    pub vhost_vsock: bool,
    /// The user-space vsock backend (`vhost-device-vsock`) is installed.
    pub vhost_user_vsock: bool,
    /// `/dev/vfio/vfio` exists.
    pub vfio: bool,
    /// The OVMF UEFI firmware is installed.
    pub ovmf: bool,
    /// Why QEMU cannot pin guest memory here (`memory.backing: physical`),
    /// if it cannot.
    pub pin_memory_refused: Option<String>,
    /// Who each VM's QEMU runs as, as `uvmctl capabilities` says it.
    pub isolation: Option<String>,
}
