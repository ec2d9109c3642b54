//! ④ The `Supported` gate: what one operation on one kind of item costs.
//!
//! An exhaustive match with no `_` arm, so a new [`ResourceKind`] cannot
//! compile without a decision (Firecracker's `handle_preboot_request` habit).

use crate::vm::items::{ItemKey, ResourceKind};
use crate::vm::{Capabilities, Support};
use crate::vm::{Resource, ResourceOperation, VMSocketType};

/// The disruption class and reason of `op` on the item `kind`/`key`, as `caps` answer it.
pub fn classify(
    kind: ResourceKind,
    key: &ItemKey,
    op: ResourceOperation,
    caps: &Capabilities,
) -> Support {
    use ResourceKind as K;
    match kind {
        K::Policy => Support::live(),
        K::GuestOs | K::Boot | K::MemoryConfig | K::Mmio | K::VpmemController => {
            Support::recreate(format!("{kind} is cold-only: fixed when the VM is built"))
        }
        // A power change is what the spec asks for, not a side effect of another change.
        K::PowerState => Support::live(),
        // Singletons only ever change.
        K::CpuGroup => caps.support(Resource::CpuGroup, ResourceOperation::Update),
        K::Processors => caps.support(Resource::Processor, ResourceOperation::Update),
        K::Memory => caps.support(Resource::Memory, ResourceOperation::Update),
        K::StorageQos => caps.support(Resource::StorageQos, ResourceOperation::Update),
        K::SerialConsole => caps.support(Resource::Serial, op),
        K::ScsiController => caps.support(Resource::ScsiController, op),
        K::ScsiDisk => caps.support(Resource::Scsi, op),
        K::VpmemDevice => caps.support(Resource::VPMem, op),
        K::NetworkAdapter => caps.support(Resource::Network, op),
        K::Plan9Share => caps.support(Resource::Plan9, op),
        K::VsmbShare => caps.support(Resource::Vsmb, op),
        K::PciDevice => caps.support(Resource::Pci, op),
        K::VmSocket => match key {
            ItemKey::Socket(VMSocketType::HvSocket, _) => caps.support(Resource::HvSocket, op),
            _ => caps.support(Resource::VmSocket, op),
        },
    }
}
