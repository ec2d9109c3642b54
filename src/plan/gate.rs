//! ④ The `Supported` gate: what one operation on one kind of item costs.
//!
//! An exhaustive match with no `_` arm, so a new [`ResourceKind`] cannot
//! compile without a decision (Firecracker's `handle_preboot_request` habit).

use crate::vm::items::{ItemKey, ResourceKind};
use crate::vm::{Capabilities, Support};
use crate::vm::{Disruption, ResourceOperation};

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
        K::Processors | K::Memory | K::StorageQos => {
            ask(caps, kind, key, ResourceOperation::Update)
        }
        // The VM interface (hcsshim's too) sets these only on a VM being
        // built: whatever the virtstack could do, uvmctl restarts for them.
        K::CpuGroup => at_launch(ask(caps, kind, key, ResourceOperation::Update), kind),
        K::SerialConsole => at_launch(ask(caps, kind, key, op), kind),
        K::ScsiController
        | K::ScsiDisk
        | K::VpmemDevice
        | K::NetworkAdapter
        | K::Plan9Share
        | K::VsmbShare
        | K::PciDevice
        // One change verb takes an update with what it replaces: the
        // virtstack's own Update cell says what it costs there.
        | K::VmSocket => ask(caps, kind, key, op),
    }
}

/// What has no live verb in the VM interface is at best a restart.
fn at_launch(s: Support, kind: ResourceKind) -> Support {
    if s.disruption == Disruption::Live {
        Support::restart(format!("{kind} is set when the VM is launched"))
    } else {
        s
    }
}

/// `Supported(resource, op)` for an item kind that is a resource.
fn ask(caps: &Capabilities, kind: ResourceKind, key: &ItemKey, op: ResourceOperation) -> Support {
    match kind.resource(key) {
        Some(r) => caps.support(r, op),
        None => Support::unsupported(format!("{kind} is not a resource of a running VM")),
    }
}
