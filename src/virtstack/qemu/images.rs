//! Host paths and images, checked before anything reaches QEMU: inside the
//! allowed roots after resolving symlinks, free of characters QEMU's option
//! syntax could misread, present, and of the format the spec states (we read
//! the header ourselves; QEMU is never asked to guess).
//!
//! A file a VM uses is opened here, beneath its root and following no link
//! (`hostfs::open_beneath`), and checked on that descriptor; QEMU gets the
//! descriptor, never the path, so nothing can be swapped in between.

use crate::hostfs::{self, Access};
use crate::vm::{ScsiDiskType, VPMemImageFormat};
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Roots host paths must lie under when `--allow-root` is not given.
pub const DEFAULT_ALLOWED_ROOTS: &[&str] = &["/var/lib/uvmctl", "/var/cache/uvmctl"];

/// Why a host path or image was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostPathError {
    /// A character QEMU option syntax or our records cannot carry safely.
    #[error("{path}: contains {what}; refused so it can never reach QEMU's option parser")]
    BadCharacter {
        /// The path as given.
        path: String,
        /// What was found.
        what: &'static str,
    },
    /// The path does not exist (or a component is unreadable).
    #[error("{path}: {reason}")]
    Missing {
        /// The path as given.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// The resolved path lies outside every allowed root.
    #[error(
        "{path}: resolves to {resolved}, outside the allowed roots ({roots}); add one with --allow-root"
    )]
    OutsideRoots {
        /// The path as given.
        path: String,
        /// Where it really points.
        resolved: String,
        /// The roots.
        roots: String,
    },
    /// A directory on the way could be changed by someone other than root.
    #[error("{path}: {reason}")]
    Untrusted {
        /// The path as given.
        path: String,
        /// Which directory, its owner and mode.
        reason: String,
    },
    /// Not the kind of file expected.
    #[error("{path}: {reason}")]
    WrongKind {
        /// The path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The image header says another format than the spec.
    #[error("{path}: spec says {expected} but the image is {found}")]
    FormatMismatch {
        /// The path.
        path: String,
        /// The spec's format.
        expected: &'static str,
        /// What the header says.
        found: &'static str,
    },
}

/// A host file opened beneath an allowed root and checked on its
/// descriptor: what QEMU is handed. `path` (resolved) is for messages.
#[derive(Debug, Clone)]
pub struct HostFile {
    /// Where it was found (resolved, inside a root).
    pub path: PathBuf,
    /// The open file.
    pub file: Arc<File>,
}

impl PartialEq for HostFile {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
    }
}

impl Eq for HostFile {}

impl HostFile {
    /// `path` opened as it is, for tests that need a descriptor without the
    /// root rules (`/dev/null` stands in where the path does not exist).
    #[cfg(test)]
    pub(crate) fn for_test(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let file = File::open(&path)
            .or_else(|_| File::open("/dev/null"))
            .expect("open");
        HostFile {
            path,
            file: Arc::new(file),
        }
    }

    /// Whether it is a block device (passthrough of a real disk).
    pub fn is_block_device(&self) -> bool {
        self.file
            .metadata()
            .is_ok_and(|m| m.file_type().is_block_device())
    }
}

/// Canonical roots host paths must lie under, each with whether it may be
/// trusted (`hostfs::check_trusted_dir`): a path under a root others could
/// change is refused, naming that root's offending directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedRoots(Vec<(PathBuf, Result<(), hostfs::TrustError>)>);

impl AllowedRoots {
    /// Roots as given; each is resolved if it exists (a missing root allows
    /// nothing) and checked for who can change it.
    pub fn new<P: AsRef<Path>>(roots: &[P]) -> Self {
        AllowedRoots(
            roots
                .iter()
                .filter_map(|r| std::fs::canonicalize(r.as_ref()).ok())
                .map(|r| {
                    let trust = hostfs::check_trusted_dir(&r).map(drop);
                    (r, trust)
                })
                .collect(),
        )
    }

    /// The roots that may not be trusted, with why (for `status` and docs).
    pub fn untrusted(&self) -> impl Iterator<Item = &hostfs::TrustError> {
        self.0.iter().filter_map(|(_, t)| t.as_ref().err())
    }

    /// The documented default roots.
    pub fn default_roots() -> Self {
        AllowedRoots::new(DEFAULT_ALLOWED_ROOTS)
    }

    fn describe(&self) -> String {
        if self.0.is_empty() {
            return "none exist".into();
        }
        self.0
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Resolves `path` (symlinks, `..`) and checks it lies under a root.
    /// Returns the resolved path, which is what QEMU is given.
    pub fn check(&self, path: &Path) -> Result<PathBuf, HostPathError> {
        let shown = path.display().to_string();
        // QMP is JSON: a path must be text to reach QEMU unchanged.
        let text = path.to_str().ok_or(HostPathError::BadCharacter {
            path: shown.clone(),
            what: "bytes that are not UTF-8",
        })?;
        check_characters(text)?;
        let resolved = std::fs::canonicalize(path).map_err(|e| HostPathError::Missing {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let resolved_text = resolved.to_str().ok_or(HostPathError::BadCharacter {
            path: shown.clone(),
            what: "bytes that are not UTF-8",
        })?;
        check_characters(resolved_text)?;
        self.root_of(&resolved, &shown)?;
        Ok(resolved)
    }

    /// The trusted root `resolved` lies under.
    fn root_of(&self, resolved: &Path, shown: &str) -> Result<&Path, HostPathError> {
        let Some((root, trust)) = self.0.iter().find(|(root, _)| resolved.starts_with(root)) else {
            return Err(HostPathError::OutsideRoots {
                path: shown.to_string(),
                resolved: resolved.display().to_string(),
                roots: self.describe(),
            });
        };
        match trust {
            Ok(()) => Ok(root),
            Err(e) => Err(HostPathError::Untrusted {
                path: shown.to_string(),
                reason: format!("allowed root {}: {e}", root.display()),
            }),
        }
    }

    /// Resolves and checks `path` like [`AllowedRoots::check`], then opens
    /// it beneath its root following no link: what was checked is what is
    /// open, whatever is renamed or linked there afterwards.
    pub fn open(&self, path: &Path, access: Access) -> Result<HostFile, HostPathError> {
        let shown = path.display().to_string();
        let resolved = self.check(path)?;
        let root = self.root_of(&resolved, &shown)?;
        let rel = resolved.strip_prefix(root).unwrap_or(Path::new(""));
        let file = hostfs::open_beneath(root, rel, access).map_err(|e| {
            use nix::errno::Errno;
            let reason = match e.raw_os_error().map(Errno::from_raw) {
                Some(Errno::ELOOP) => {
                    "changed while being opened (a symbolic link appeared on the way); refused"
                        .to_string()
                }
                Some(Errno::EXDEV) => {
                    "changed while being opened (it left its allowed root); refused".to_string()
                }
                _ => e.to_string(),
            };
            HostPathError::Missing {
                path: shown.clone(),
                reason,
            }
        })?;
        Ok(HostFile {
            path: resolved,
            file: Arc::new(file),
        })
    }
}

impl AllowedRoots {
    /// A unix socket QEMU will connect to, which may not exist yet: when it
    /// exists it is resolved like any path; otherwise its directory is, and
    /// the socket's own name is checked. Either way it must lie under a root.
    ///
    /// QEMU (or the vsock backend) keeps following that path for the VM's
    /// whole life, so the directory it lies in, and every one on the way,
    /// must be one only root can change (`hostfs::check_trusted_dir`):
    /// nobody else can then put a link to another socket there later.
    pub fn check_socket(&self, path: &Path) -> Result<PathBuf, HostPathError> {
        let resolved = self.socket_path(path)?;
        if let Some(dir) = resolved.parent() {
            hostfs::check_trusted_dir(dir).map_err(|e| HostPathError::Untrusted {
                path: path.display().to_string(),
                reason: format!(
                    "a listener is followed for the VM's whole life, so its directory must be root's alone: {e}"
                ),
            })?;
        }
        Ok(resolved)
    }

    fn socket_path(&self, path: &Path) -> Result<PathBuf, HostPathError> {
        if std::fs::symlink_metadata(path).is_ok() {
            return self.check(path);
        }
        let shown = path.display().to_string();
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(HostPathError::WrongKind {
                path: shown,
                reason: "not a socket path".into(),
            });
        };
        let name = name.to_str().ok_or(HostPathError::BadCharacter {
            path: shown.clone(),
            what: "bytes that are not UTF-8",
        })?;
        check_characters(name)?;
        if name == ".." || name == "." {
            return Err(HostPathError::WrongKind {
                path: shown,
                reason: "not a socket path".into(),
            });
        }
        Ok(self.check(dir)?.join(name))
    }
}

/// Refuses `,` (QEMU's option separator) and control characters. Values go
/// to QEMU as JSON, but a path that needs escaping anywhere is refused
/// outright rather than trusted to every layer's quoting.
fn check_characters(path: &str) -> Result<(), HostPathError> {
    let what = if path.contains(',') {
        "a comma"
    } else if path.contains('\n') || path.contains('\r') {
        "a newline"
    } else if path.chars().any(char::is_control) {
        "a control character"
    } else {
        return Ok(());
    };
    Err(HostPathError::BadCharacter {
        path: path.to_string(),
        what,
    })
}

/// What a header says a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// VHD footer (`conectix`).
    Vhd,
    /// VHDX signature (`vhdxfile`).
    Vhdx,
    /// qcow2 magic.
    Qcow2,
    /// No known signature.
    Raw,
}

impl Detected {
    fn name(self) -> &'static str {
        match self {
            Detected::Vhd => "vhd1 (VHD)",
            Detected::Vhdx => "vhdx",
            Detected::Qcow2 => "qcow2",
            Detected::Raw => "raw",
        }
    }
}

/// Reads the signatures that matter from an open regular file (at fixed
/// offsets: the file position, which QEMU may share, is left alone).
pub fn detect(f: &File) -> std::io::Result<Detected> {
    let len = f.metadata()?.len();
    let mut head = [0u8; 8];
    let n = f.read_at(&mut head, 0)?;
    let head = &head[..n];
    if head.starts_with(b"vhdxfile") {
        return Ok(Detected::Vhdx);
    }
    if head.starts_with(b"QFI\xfb") {
        return Ok(Detected::Qcow2);
    }
    if head.starts_with(b"conectix") {
        return Ok(Detected::Vhd);
    }
    if len >= 512 {
        let mut foot = [0u8; 8];
        f.read_exact_at(&mut foot, len - 512)?;
        if &foot == b"conectix" {
            return Ok(Detected::Vhd);
        }
    }
    Ok(Detected::Raw)
}

/// QEMU block driver for a SCSI disk type; never probed.
pub fn scsi_format_driver(t: ScsiDiskType) -> &'static str {
    match t {
        ScsiDiskType::Vhd1 => "vpc",
        ScsiDiskType::Vhdx => "vhdx",
        ScsiDiskType::PassThrough => "raw",
    }
}

/// The access a SCSI disk is opened with.
pub fn scsi_access(read_only: bool) -> Access {
    if read_only {
        Access::Read
    } else {
        Access::ReadWrite
    }
}

/// Checks an opened SCSI disk: a regular file whose header matches `t`,
/// or, for passthrough, a raw file or a block device.
pub fn check_scsi_image(image: &HostFile, t: ScsiDiskType) -> Result<(), HostPathError> {
    let shown = image.path.display().to_string();
    let meta = image.file.metadata().map_err(|e| HostPathError::Missing {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    if t == ScsiDiskType::PassThrough && meta.file_type().is_block_device() {
        return Ok(());
    }
    if !meta.is_file() {
        let reason = if t == ScsiDiskType::PassThrough {
            "not a regular file or block device"
        } else {
            "not a regular file"
        };
        return Err(HostPathError::WrongKind {
            path: shown,
            reason: reason.into(),
        });
    }
    let found = detect(&image.file).map_err(|e| HostPathError::Missing {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let (ok, expected) = match t {
        ScsiDiskType::Vhd1 => (found == Detected::Vhd, "vhd1"),
        ScsiDiskType::Vhdx => (found == Detected::Vhdx, "vhdx"),
        ScsiDiskType::PassThrough => (found == Detected::Raw, "passthrough (raw)"),
    };
    if ok {
        Ok(())
    } else {
        Err(HostPathError::FormatMismatch {
            path: shown,
            expected,
            found: found.name(),
        })
    }
}

/// Checks an opened VPMem image. QEMU maps the file into guest memory as an
/// NVDIMM, which works for a fixed VHD (raw data, then a 512-byte footer)
/// but not for a VHDX, whose data is scattered across its blocks.
pub fn check_vpmem_image(image: &HostFile, format: VPMemImageFormat) -> Result<u64, HostPathError> {
    let shown = image.path.display().to_string();
    let meta = image.file.metadata().map_err(|e| HostPathError::Missing {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(HostPathError::WrongKind {
            path: shown,
            reason: "not a regular file".into(),
        });
    }
    let found = detect(&image.file).map_err(|e| HostPathError::Missing {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    match (format, found) {
        (VPMemImageFormat::Vhd1, Detected::Vhd) => {
            // The guest sees the data before the footer, in whole pages.
            let data = meta.len().saturating_sub(512) / 4096 * 4096;
            if data == 0 {
                return Err(HostPathError::WrongKind {
                    path: shown,
                    reason: "image holds less than one 4 KiB page".into(),
                });
            }
            Ok(data)
        }
        (VPMemImageFormat::Vhd1, other) => Err(HostPathError::FormatMismatch {
            path: shown,
            expected: "vhd1",
            found: other.name(),
        }),
        (VPMemImageFormat::Vhdx, _) => Err(HostPathError::WrongKind {
            path: shown,
            reason: "a VHDX cannot be mapped as persistent memory by QEMU; use a fixed vhd1".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A fixed VHD: data then a 512-byte footer starting with `conectix`.
    pub(crate) fn write_vhd(path: &Path, data_len: usize) {
        let mut bytes = vec![0u8; data_len + 512];
        bytes[data_len..data_len + 8].copy_from_slice(b"conectix");
        fs::write(path, bytes).expect("write vhd");
    }

    #[test]
    fn paths_with_commas_or_newlines_never_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let roots = AllowedRoots::new(&[dir.path()]);
        for name in ["a,b.img", "a\nb.img"] {
            let p = dir.path().join(name);
            fs::write(&p, b"x").expect("write");
            let err = roots.check(&p).expect_err("refused");
            assert!(matches!(err, HostPathError::BadCharacter { .. }), "{err}");
        }
    }

    #[test]
    fn symlinks_and_dotdot_are_resolved_before_the_root_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = dir.path().join("vm");
        fs::create_dir(&vm).expect("mkdir");
        let outside = dir.path().join("secret");
        fs::write(&outside, b"x").expect("write");
        let roots = AllowedRoots::new(&[&vm]);
        let err = roots
            .check(&vm.join("../secret"))
            .expect_err("dotdot escapes");
        assert!(matches!(err, HostPathError::OutsideRoots { .. }), "{err}");
        std::os::unix::fs::symlink(&outside, vm.join("link.img")).expect("symlink");
        let err = roots
            .check(&vm.join("link.img"))
            .expect_err("symlink escapes");
        assert!(
            err.to_string().contains("outside the allowed roots"),
            "{err}"
        );
        fs::write(vm.join("ok.img"), b"x").expect("write");
        assert!(roots.check(&vm.join("ok.img")).is_ok());
    }

    #[test]
    fn a_missing_disk_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let roots = AllowedRoots::new(&[dir.path()]);
        let err = roots
            .check(&dir.path().join("nope.vhdx"))
            .expect_err("missing");
        assert!(matches!(err, HostPathError::Missing { .. }));
    }

    #[test]
    fn formats_are_read_from_headers_and_must_match_the_spec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vhd = dir.path().join("a.vhd");
        write_vhd(&vhd, 8192);
        let vhdx = dir.path().join("a.vhdx");
        let mut b = b"vhdxfile".to_vec();
        b.resize(4096, 0);
        fs::write(&vhdx, b).expect("write");
        let raw = dir.path().join("a.img");
        fs::write(&raw, vec![0u8; 4096]).expect("write");

        assert_eq!(
            check_scsi_image(&HostFile::for_test(&vhd), ScsiDiskType::Vhd1),
            Ok(())
        );
        assert_eq!(
            check_scsi_image(&HostFile::for_test(&vhdx), ScsiDiskType::Vhdx),
            Ok(())
        );
        assert_eq!(
            check_scsi_image(&HostFile::for_test(&raw), ScsiDiskType::PassThrough),
            Ok(())
        );
        assert_eq!(
            check_scsi_image(&HostFile::for_test(&raw), ScsiDiskType::Vhdx)
                .map_err(|e| e.to_string()),
            Err(format!(
                "{}: spec says vhdx but the image is raw",
                raw.display()
            ))
        );
        assert!(matches!(
            check_scsi_image(&HostFile::for_test(&vhdx), ScsiDiskType::PassThrough),
            Err(HostPathError::FormatMismatch { .. })
        ));
        assert!(matches!(
            check_scsi_image(&HostFile::for_test(&vhd), ScsiDiskType::Vhdx),
            Err(HostPathError::FormatMismatch { .. })
        ));
        assert!(matches!(
            check_scsi_image(&HostFile::for_test(dir.path()), ScsiDiskType::Vhdx),
            Err(HostPathError::WrongKind { .. })
        ));
    }

    #[test]
    fn vpmem_maps_a_vhd_without_its_footer_in_whole_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vhd = dir.path().join("p.vhd");
        write_vhd(&vhd, 3 * 4096 + 100);
        assert_eq!(
            check_vpmem_image(&HostFile::for_test(&vhd), VPMemImageFormat::Vhd1),
            Ok(3 * 4096)
        );
        assert!(check_vpmem_image(&HostFile::for_test(&vhd), VPMemImageFormat::Vhdx).is_err());
    }
}
