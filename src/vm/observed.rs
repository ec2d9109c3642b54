//! What a virtstack really has: observed VMs, their state and live ranges.
//! Pure data: the virtstacks fill it, the planner reads it.

use super::State;
use super::config::VmConfig;
use serde::Serialize;
use std::collections::BTreeMap;

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
    /// VMs that exist but could not be observed (hung or closed control
    /// channel, corrupt record, dead process), with why: *unknown*, like a
    /// VM whose spec is broken. Never planned, never pruned.
    pub unknown: BTreeMap<String, String>,
}
