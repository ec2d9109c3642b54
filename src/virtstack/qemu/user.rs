//! The unprivileged user QEMU and the vsock backend run as.
//!
//! uvmctl runs as root; what it starts for a VM does not. Each QEMU (and its
//! vsock backend) gets the service user's uid, its group and, where KVM is
//! used, the `kvm` group, and nothing else of root's: it reaches the VM's
//! files through the descriptors uvmctl opened for it, its own sockets in
//! the VM's state directory, and only what that user could reach anyway.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The service user `scripts/setup-host` creates.
pub const DEFAULT_QEMU_USER: &str = "uvmctl-qemu";

/// Who QEMU and the vsock backend run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUser {
    /// Its name, for messages.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary group.
    pub gid: u32,
    /// Its supplementary groups while it runs a VM (`kvm`, where KVM is used).
    pub groups: Vec<u32>,
}

/// Why the service user cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// No such user on this host.
    #[error(
        "QEMU's service user {0} does not exist: scripts/setup-host creates it (or name another with --qemu-user; root only when asked for: --qemu-user root)"
    )]
    Missing(String),
    /// Root by another name.
    #[error("--qemu-user {0} is root (uid 0): say --qemu-user root to run QEMU as root")]
    Root(String),
    /// The user database could not be read.
    #[error("cannot look up user {name}: {reason}")]
    Lookup {
        /// The user.
        name: String,
        /// Why.
        reason: String,
    },
}

impl ServiceUser {
    /// Looks `name` up; `kvm` adds the `kvm` group (when the host has one).
    /// `root` means no service user: QEMU runs as uvmctl does.
    ///
    /// # Errors
    /// A missing user, or one whose uid is 0 under another name.
    pub fn lookup(name: &str, kvm: bool) -> Result<Option<ServiceUser>, UserError> {
        if name == "root" {
            return Ok(None);
        }
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| UserError::Lookup {
                name: name.into(),
                reason: e.to_string(),
            })?
            .ok_or_else(|| UserError::Missing(name.into()))?;
        if user.uid.is_root() {
            return Err(UserError::Root(name.into()));
        }
        let mut groups = Vec::new();
        if kvm && let Ok(Some(g)) = nix::unistd::Group::from_name("kvm") {
            groups.push(g.gid.as_raw());
        }
        Ok(Some(ServiceUser {
            name: name.into(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups,
        }))
    }

    /// Makes `cmd` run as this user: groups, then gid, then uid, in the
    /// child before exec. `memlock`: lift the locked-memory limit first
    /// (pinned guest memory), which only root may.
    pub fn apply(&self, cmd: &mut tokio::process::Command, memlock: bool) {
        let (uid, gid) = (self.uid, self.gid);
        let groups: Vec<nix::libc::gid_t> = std::iter::once(gid)
            .chain(self.groups.iter().copied())
            .collect();
        // SAFETY: runs in the child between fork and exec; setrlimit,
        // setgroups, setgid and setuid are async-signal-safe, and the
        // closure allocates nothing (the group list is made before).
        unsafe {
            cmd.pre_exec(move || {
                use nix::libc;
                let fail = || Err(std::io::Error::last_os_error());
                if memlock {
                    let lim = libc::rlimit {
                        rlim_cur: libc::RLIM_INFINITY,
                        rlim_max: libc::RLIM_INFINITY,
                    };
                    if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                        return fail();
                    }
                }
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return fail();
                }
                Ok(())
            });
        }
    }

    /// Whether this user may open `path` for reading (and writing): by the
    /// owner, group and other bits of it, as the kernel decides for a
    /// process of this user (root's override is not this user's).
    pub fn may_open(&self, meta: &std::fs::Metadata, write: bool) -> bool {
        let want = if write { 0o6 } else { 0o4 };
        self.bits(meta) & want == want
    }

    /// Whether this user may list and enter the directory of `meta` (and
    /// make and remove entries there, with `write`).
    pub fn may_use_dir(&self, meta: &std::fs::Metadata, write: bool) -> bool {
        let bits = self.bits(meta);
        let want = if write { 0o7 } else { 0o5 };
        meta.is_dir() && bits & want == want
    }

    fn bits(&self, meta: &std::fs::Metadata) -> u32 {
        let mode = meta.mode();
        (if meta.uid() == self.uid {
            mode >> 6
        } else if meta.gid() == self.gid || self.groups.contains(&meta.gid()) {
            mode >> 3
        } else {
            mode
        }) & 0o7
    }

    /// Whether this user may enter every directory on the way to `path`.
    pub fn may_reach(&self, path: &Path) -> bool {
        path.ancestors()
            .skip(1)
            .all(|dir| std::fs::metadata(dir).is_ok_and(|m| self.bits(&m) & 0o1 != 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn nobody() -> ServiceUser {
        ServiceUser {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            groups: Vec::new(),
        }
    }

    #[test]
    fn access_is_judged_by_the_bits_that_apply_to_the_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").expect("write");
        let u = nobody();
        for (mode, read, write) in [
            (0o600, false, false),
            (0o644, true, false),
            (0o666, true, true),
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let m = std::fs::metadata(&f).expect("stat");
            assert_eq!(
                (u.may_open(&m, false), u.may_open(&m, true)),
                (read, write),
                "{mode:o}"
            );
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        assert!(!u.may_reach(&f));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        assert!(u.may_reach(&f));
    }

    #[test]
    fn root_is_only_ever_asked_for_by_name() {
        assert_eq!(ServiceUser::lookup("root", false).expect("root"), None);
        assert!(matches!(
            ServiceUser::lookup("no-such-user-uvmctl", false),
            Err(UserError::Missing(_))
        ));
    }
}
