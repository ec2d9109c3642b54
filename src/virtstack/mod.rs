//! ② Observed state and capabilities: what a virtstack really has, and what
//! it can do. Virtstack implementations live below this module.

pub mod fake;
pub mod hcs;
pub mod open;
pub mod qemu;
pub mod recorded;
pub mod records;
pub mod remotevm;
pub mod sim;

pub use crate::vm::caps::{Capabilities, HostFacts, Support};
pub use crate::vm::observed::{MemoryHotplug, ObservedState, ObservedVm};
pub use open::{AccelChoice, HostOptions, Kind, OpenError, Opened, open};

impl Capabilities {
    /// The built-in profile of a virtstack, for `plan --observed` and
    /// `uvmctl capabilities`. remotevm's is what uvmctl's own `serve` over
    /// this host's QEMU offers, as the protocol can carry it.
    pub fn profile(kind: Kind) -> Self {
        // As QEMU runs by default: as the service user when uvmctl is root.
        #[cfg(unix)]
        let here = || {
            let root = nix::unistd::geteuid().is_root();
            let memlock = qemu::user::MemLock::probe(root);
            let mut facts = HostFacts::probe(&memlock);
            facts.isolation = root
                .then(|| qemu::user::ServiceUser::lookup(qemu::user::DEFAULT_QEMU_USER, false))
                .and_then(|u| u.ok().flatten())
                .map(|u| u.isolation());
            Capabilities::qemu(&facts)
        };
        // No QEMU here: its profile as on a host with none of its devices.
        #[cfg(not(unix))]
        let here = || Capabilities::qemu(&HostFacts::default());
        // Every kind, matched exhaustively: a new one must say its profile.
        match kind {
            Kind::Qemu => here(),
            Kind::RemoteVm => remotevm::own_server_capabilities(&here()),
            Kind::Hcs => Capabilities::hcs(),
            Kind::Sim => sim::capabilities(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one list of virtstacks and their profiles agree: each kind has
    /// a profile under its own name, and no other name has one.
    #[test]
    fn every_virtstack_of_the_list_has_its_profile() {
        for kind in Kind::ALL {
            let caps = Capabilities::profile(kind);
            assert_eq!(caps.virtstack, kind.as_str());
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
            // The config file's spelling is the command line's.
            assert_eq!(
                serde_json::to_value(kind).expect("json"),
                serde_json::json!(kind.as_str())
            );
        }
        assert_eq!(
            "vmware".parse::<Kind>().expect_err("unknown").to_string(),
            "unknown virtstack \"vmware\" (known: qemu, remotevm, sim, hcs)"
        );
    }
    use crate::vm::{Disruption, Resource, ResourceOperation};
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
                .contains("vhost-device-vsock")
        );
        let kernel_only = Capabilities::qemu(&HostFacts {
            vhost_vsock: true,
            vhost_user_vsock: false,
            vfio: true,
            ovmf: true,
            pin_memory_refused: None,
            isolation: None,
        });
        assert!(!kernel_only.supported(VmSocket, Add));
        assert!(
            kernel_only
                .support(VmSocket, Add)
                .reason
                .contains("kernel's vhost-vsock is not used")
        );
        assert!(!kernel_only.supported(Pci, Add));
        let with = Capabilities::qemu(&HostFacts {
            vhost_user_vsock: true,
            ..HostFacts::default()
        });
        for op in [Add, Remove, Update] {
            assert_eq!(with.support(VmSocket, op).disruption, Disruption::Live);
        }
        assert!(!with.supported(HvSocket, Add));
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
