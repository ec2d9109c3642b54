//! The unprivileged users QEMU and the vsock backend run as.
//!
//! uvmctl runs as root; what it starts for a VM does not. Each VM's QEMU
//! (and its vsock backend) gets a uid and gid of its own, from the service
//! user's subordinate id range (`/etc/subuid`, `/etc/subgid`:
//! `scripts/setup-host` and the package give `uvmctl-qemu` 65,536 of each),
//! as Firecracker's jailer gives each microVM its own uid. Its supplementary
//! groups are the service user's group (what an operator shares with QEMU:
//! Plan9 shares, vsock listeners, kernels) and, where KVM is used, `kvm`.
//! So one compromised QEMU can open no other VM's files or sockets. A host
//! whose service user has no such range runs every QEMU as the service user
//! itself, and says so (`uvmctl capabilities`).

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
    /// The ids each VM gets one of, when the host gave the user a range.
    pub range: Option<IdRange>,
    /// For one VM's identity ([`ServiceUser::for_vm`]): its slot in the range.
    pub slot: Option<u32>,
}

/// A subordinate uid and gid range of the service user: VM slot `n` runs
/// as `uid + n`, `gid + n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// The first uid.
    pub uid: u32,
    /// The first gid.
    pub gid: u32,
    /// How many of each (the smaller of the two ranges).
    pub count: u32,
}

/// The lowest first id of a range uvmctl takes (`SUB_UID_MIN`'s default).
pub const MIN_SUBID: u32 = 100_000;

/// The most ids of a range uvmctl uses (one per VM of a host).
pub const MAX_IDS: u32 = 65_536;

/// The subordinate-id file's range for `name` (or its uid, written as a
/// number): the first `owner:start:count` line, if any.
pub fn parse_subids(text: &str, name: &str, id: u32) -> Option<(u32, u32)> {
    text.lines().find_map(|line| {
        let mut f = line.trim().split(':');
        let (owner, start, count) = (f.next()?, f.next()?, f.next()?);
        if owner != name && owner.parse::<u32>().ok() != Some(id) {
            return None;
        }
        let (start, count) = (start.parse::<u32>().ok()?, count.parse::<u32>().ok()?);
        // Never root's, the system's or users' own ids: subordinate ids
        // start at 100000 (login.defs' SUB_UID_MIN).
        (start >= MIN_SUBID && count > 0 && start.checked_add(count).is_some())
            .then_some((start, count))
    })
}

impl IdRange {
    /// The range `/etc/subuid` and `/etc/subgid` give the user, if both do.
    pub fn lookup(name: &str, uid: u32, gid: u32) -> Option<IdRange> {
        let read = |p: &str| crate::hostfs::read_state_file(Path::new(p), 1 << 20).ok();
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        let (u0, uc) = parse_subids(&text(read("/etc/subuid")?), name, uid)?;
        let (g0, gc) = parse_subids(&text(read("/etc/subgid")?), name, gid)?;
        Some(IdRange {
            uid: u0,
            gid: g0,
            count: uc.min(gc).min(MAX_IDS),
        })
    }

    /// The slot a VM named `vm` gets: a hash of its name, so a VM created
    /// again under the same name is the same user (the files it wrote to a
    /// share stay its own), moved on past slots in `taken`.
    pub fn slot_for(&self, vm: &str, taken: &std::collections::BTreeSet<u32>) -> Option<u32> {
        // FNV-1a: stable across releases, unlike std's hasher.
        let hash = vm.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let count = u64::from(self.count);
        let first = hash % count;
        (0..count)
            .map(|i| u32::try_from((first + i) % count).unwrap_or(0))
            .find(|s| !taken.contains(s))
    }
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
        let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
        Ok(Some(ServiceUser {
            name: name.into(),
            uid,
            gid,
            groups,
            range: IdRange::lookup(name, uid, gid),
            slot: None,
        }))
    }

    /// Who VM slot `slot` runs as: its own uid and gid from the range, with
    /// the service user's group (and `kvm`) as supplementary groups. Without
    /// a range (or a slot), the service user itself.
    pub fn for_vm(&self, slot: Option<u32>) -> ServiceUser {
        match (self.range, slot) {
            (Some(r), Some(n)) if n < r.count => ServiceUser {
                name: self.name.clone(),
                uid: r.uid + n,
                gid: r.gid + n,
                groups: std::iter::once(self.gid)
                    .chain(self.groups.iter().copied())
                    .collect(),
                range: None,
                slot: Some(n),
            },
            _ => self.clone(),
        }
    }

    /// Who this is, in a message: the service user, or one VM's user.
    pub fn describe(&self) -> String {
        match self.slot {
            Some(_) => format!(
                "this VM's QEMU user (uid {}, with group {})",
                self.uid, self.name
            ),
            None => format!("QEMU's service user {}", self.name),
        }
    }

    /// What `uvmctl capabilities` says of how VMs are kept apart.
    pub fn isolation(&self) -> String {
        match self.range {
            Some(r) => format!(
                "each VM's QEMU and vsock backend run as a uid and gid of their own ({}–{} and {}–{}, {}'s subordinate ids), with group {} for what is shared with QEMU",
                r.uid,
                r.uid + (r.count - 1),
                r.gid,
                r.gid + (r.count - 1),
                self.name,
                self.name
            ),
            None => format!(
                "every VM's QEMU runs as {}: the user has no subordinate id range (/etc/subuid, /etc/subgid; scripts/setup-host adds one), so a compromised QEMU could reach another VM's QEMU (through /proc, and the files it holds) and its vsock backend's sockets; not its QMP, agent or console sockets or its disks, which are root's",
                self.name
            ),
        }
    }

    /// Makes `cmd` run as this user: groups, then gid, then uid, in the
    /// child before exec. `ipc_lock`: keep `CAP_IPC_LOCK` across the change
    /// and hand it to QEMU as an ambient capability (pinned guest memory,
    /// [`MemLock::Ambient`]); no other capability survives.
    pub fn apply(&self, cmd: &mut tokio::process::Command, ipc_lock: bool) {
        let (uid, gid) = (self.uid, self.gid);
        let groups: Vec<nix::libc::gid_t> = std::iter::once(gid)
            .chain(self.groups.iter().copied())
            .collect();
        // SAFETY: runs in the child between fork and exec; prctl, setgroups,
        // setgid, setuid, capget and capset are system calls, and the
        // closure allocates nothing (the group list is made before).
        unsafe {
            cmd.pre_exec(move || {
                use nix::libc;
                let fail = || Err(std::io::Error::last_os_error());
                // Permitted capabilities survive the uid change only so.
                if ipc_lock && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
                    return fail();
                }
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return fail();
                }
                if ipc_lock {
                    ambient_ipc_lock_only()?;
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

/// `CAP_IPC_LOCK`'s number.
const CAP_IPC_LOCK: u32 = 14;
/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// In a child about to exec: keeps `CAP_IPC_LOCK` alone, permitted,
/// inheritable and ambient, so the program it runs has it (and nothing
/// else of uvmctl's). Only system calls; allocates nothing.
///
/// # Errors
/// When the kernel refuses (uvmctl lacks the capability itself).
fn ambient_ipc_lock_only() -> std::io::Result<()> {
    use nix::libc;
    let bit = 1u32 << CAP_IPC_LOCK;
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: bit,
            permitted: bit,
            inheritable: bit,
        },
        CapData::default(),
    ];
    // SAFETY: capset reads one header and two data words of the sizes the
    // kernel expects for version 3; prctl takes plain integers.
    unsafe {
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0
            || libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE,
                libc::c_ulong::from(CAP_IPC_LOCK),
                0,
                0,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// How QEMU gets to lock a pinned guest's memory (`-overcommit
/// mem-lock=on` locks the whole process with `mlockall`), decided once per
/// host. Raising a hard limit needs `CAP_SYS_RESOURCE`, which containers
/// and trimmed units lack (issue 30), so uvmctl never does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemLock {
    /// QEMU has `CAP_IPC_LOCK` anyway (it runs as root, or uvmctl's ambient
    /// set carries it): nothing to do.
    Inherent,
    /// QEMU, started as the service user, gets `CAP_IPC_LOCK` alone as an
    /// ambient capability: uvmctl has it in its permitted set.
    Ambient,
    /// The soft `RLIMIT_MEMLOCK` is raised to the hard one, which is
    /// unlimited: no privilege is needed.
    SoftLimit,
    /// This host cannot pin guest memory for QEMU: why.
    Refused(String),
}

/// A capability set of this process from /proc/self/status (`CapPrm`...).
fn own_capabilities(which: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(which)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

impl MemLock {
    /// Looks at this process's capabilities and limits; `switch_user`:
    /// QEMU runs as a service user, not as uvmctl.
    pub fn probe(switch_user: bool) -> MemLock {
        let has = |set: &str| own_capabilities(set) & (1 << CAP_IPC_LOCK) != 0;
        let root = nix::unistd::geteuid().is_root();
        let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK)
            .map(|(_, hard)| hard)
            .ok();
        Self::decide(
            switch_user,
            root,
            has("CapPrm"),
            has("CapBnd"),
            has("CapAmb"),
            hard,
        )
    }

    /// [`MemLock::probe`]'s rule over what it read (`hard`: the hard
    /// `RLIMIT_MEMLOCK` in bytes, `None` when unreadable).
    pub fn decide(
        switch_user: bool,
        root: bool,
        permitted: bool,
        bounding: bool,
        ambient: bool,
        hard: Option<u64>,
    ) -> MemLock {
        if switch_user {
            if permitted {
                return MemLock::Ambient;
            }
        } else if (root && bounding) || ambient {
            return MemLock::Inherent;
        }
        match hard {
            Some(nix::libc::RLIM_INFINITY) => MemLock::SoftLimit,
            hard => MemLock::Refused(format!(
                "this host cannot pin guest memory for QEMU: uvmctl lacks CAP_IPC_LOCK to hand it, \
                 and the locked-memory limit (RLIMIT_MEMLOCK) is {}, while QEMU locks its whole \
                 process; give uvmctl CAP_IPC_LOCK (systemd: AmbientCapabilities=CAP_IPC_LOCK) or \
                 an unlimited hard limit (LimitMEMLOCK=infinity), or use memory.backing: virtual",
                hard.map_or_else(|| "unknown".to_string(), |b| format!("{} KiB", b / 1024))
            )),
        }
    }

    /// Why pinned memory is refused here, if it is.
    pub fn refusal(&self) -> Option<&str> {
        match self {
            MemLock::Refused(why) => Some(why),
            _ => None,
        }
    }
}

/// The `pre_exec` hook raising the soft `RLIMIT_MEMLOCK` to the hard limit
/// ([`MemLock::SoftLimit`]).
pub fn raise_soft_memlock() -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    || {
        use nix::libc;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit on a struct of this frame.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
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
            range: None,
            slot: None,
        }
    }

    #[test]
    fn the_range_is_the_users_by_name_or_uid_and_never_the_systems() {
        let text = "alice:100000:65536\n999:1048576:65536\nroot:0:65536\nbob:1000:65536\n";
        assert_eq!(parse_subids(text, "alice", 1000), Some((100_000, 65_536)));
        assert_eq!(
            parse_subids(text, "uvmctl-qemu", 999),
            Some((1_048_576, 65_536))
        );
        assert_eq!(parse_subids(text, "root", 0), None, "never from uid 0");
        assert_eq!(
            parse_subids(text, "bob", 1001),
            None,
            "never over users' own ids"
        );
        assert_eq!(parse_subids("x:abc:1\n", "x", 5), None);
        assert_eq!(parse_subids("x:4294967295:2\n", "x", 5), None, "overflow");
    }

    /// Issue 31: each VM its own uid and gid, with the service user's group
    /// as a supplementary one; the slot follows the name, so a VM made again
    /// under its name is the same user.
    #[test]
    fn each_vm_gets_an_identity_of_its_own_from_the_range() {
        let mut svc = nobody();
        svc.groups = vec![106];
        assert_eq!(svc.for_vm(Some(3)), svc, "no range: the service user");
        svc.range = Some(IdRange {
            uid: 1_048_576,
            gid: 2_097_152,
            count: 65_536,
        });
        let r = svc.range.expect("range");
        let none = std::collections::BTreeSet::new();
        let web = r.slot_for("web", &none).expect("slot");
        assert_eq!(r.slot_for("web", &none), Some(web), "stable");
        let db = r.slot_for("db", &none).expect("slot");
        assert_ne!(web, db);
        let taken: std::collections::BTreeSet<u32> = [web].into();
        let moved = r.slot_for("web", &taken).expect("slot");
        assert_eq!(moved, (web + 1) % 65_536, "past a slot another VM holds");
        let vm = svc.for_vm(Some(web));
        assert_eq!((vm.uid, vm.gid), (1_048_576 + web, 2_097_152 + web));
        assert_eq!(vm.groups, vec![65534, 106], "the service group, then kvm");
        assert!(
            vm.describe().contains(&format!("uid {}", vm.uid)),
            "{}",
            vm.describe()
        );
        assert_eq!(svc.for_vm(Some(70_000)), svc, "outside the range");
        let full: std::collections::BTreeSet<u32> = (0..4).collect();
        let tiny = IdRange { count: 4, ..r };
        assert_eq!(tiny.slot_for("web", &full), None, "a full range");
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

    /// Issue 30: a host without CAP_SYS_RESOURCE still pins memory through
    /// CAP_IPC_LOCK or an unlimited hard limit, and says why when it cannot.
    #[test]
    fn pinned_memory_takes_what_needs_no_hard_limit_raised() {
        let inf = Some(nix::libc::RLIM_INFINITY);
        let small = Some(8 << 20);
        assert_eq!(
            MemLock::decide(true, true, true, true, false, small),
            MemLock::Ambient
        );
        assert_eq!(
            MemLock::decide(false, true, true, true, false, small),
            MemLock::Inherent
        );
        assert_eq!(
            MemLock::decide(false, false, false, false, true, small),
            MemLock::Inherent
        );
        assert_eq!(
            MemLock::decide(true, true, false, false, false, inf),
            MemLock::SoftLimit
        );
        let refused = MemLock::decide(true, true, false, false, false, small);
        let why = refused.refusal().expect("refused");
        assert!(
            why.contains("8192 KiB") && why.contains("CAP_IPC_LOCK"),
            "{why}"
        );
    }

    /// The ambient hand-over, tried for real where this process may (root
    /// with CAP_IPC_LOCK): the child, as nobody, has CAP_IPC_LOCK and no
    /// other capability.
    #[tokio::test]
    async fn the_service_user_gets_ipc_lock_alone() {
        if MemLock::probe(true) != MemLock::Ambient {
            // Not root here; the rule itself is tested above.
            return;
        }
        let mut cmd = crate::child::command("grep", Vec::new());
        cmd.args(["^Cap", "/proc/self/status"]);
        nobody().apply(&mut cmd, true);
        let out = cmd.output().await.expect("grep runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let set = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        assert_eq!(set("CapEff:"), "0000000000004000", "{text}");
        assert_eq!(set("CapPrm:"), "0000000000004000", "{text}");
        assert_eq!(set("CapAmb:"), "0000000000004000", "{text}");
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
