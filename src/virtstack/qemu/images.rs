//! Host paths and images, checked before anything reaches QEMU: inside the
//! allowed roots after resolving symlinks, free of characters QEMU's option
//! syntax could misread, present, and of the format the spec states (we read
//! the header ourselves; QEMU is never asked to guess).

use crate::vm::{ScsiDiskType, VPMemImageFormat};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

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

/// Canonical roots host paths must lie under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedRoots(Vec<PathBuf>);

impl AllowedRoots {
    /// Roots as given; each is resolved if it exists (a missing root allows nothing).
    pub fn new<P: AsRef<Path>>(roots: &[P]) -> Self {
        AllowedRoots(
            roots
                .iter()
                .filter_map(|r| std::fs::canonicalize(r.as_ref()).ok())
                .collect(),
        )
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
            .map(|p| p.display().to_string())
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
        if !self.0.iter().any(|root| resolved.starts_with(root)) {
            return Err(HostPathError::OutsideRoots {
                path: shown,
                resolved: resolved.display().to_string(),
                roots: self.describe(),
            });
        }
        Ok(resolved)
    }
}

impl AllowedRoots {
    /// A unix socket QEMU will connect to, which may not exist yet: when it
    /// exists it is resolved like any path; otherwise its directory is, and
    /// the socket's own name is checked. Either way it must lie under a root.
    pub fn check_socket(&self, path: &Path) -> Result<PathBuf, HostPathError> {
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

/// Reads the signatures that matter from a regular file.
pub fn detect(path: &Path) -> std::io::Result<Detected> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut head = [0u8; 8];
    let n = f.read(&mut head)?;
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
        f.seek(SeekFrom::Start(len - 512))?;
        f.read_exact(&mut foot)?;
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

/// Whether a resolved path is a block device (passthrough of a real disk).
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// Checks a SCSI disk: a regular file whose header matches `t`, or, for
/// passthrough, a raw file or a block device.
pub fn check_scsi_image(path: &Path, t: ScsiDiskType) -> Result<(), HostPathError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| HostPathError::Missing {
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
    let found = detect(path).map_err(|e| HostPathError::Missing {
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

/// Checks a VPMem image. QEMU maps the file into guest memory as an NVDIMM,
/// which works for a fixed VHD (raw data, then a 512-byte footer) but not for
/// a VHDX, whose data is scattered across its blocks.
pub fn check_vpmem_image(path: &Path, format: VPMemImageFormat) -> Result<u64, HostPathError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| HostPathError::Missing {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(HostPathError::WrongKind {
            path: shown,
            reason: "not a regular file".into(),
        });
    }
    let found = detect(path).map_err(|e| HostPathError::Missing {
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

        assert_eq!(check_scsi_image(&vhd, ScsiDiskType::Vhd1), Ok(()));
        assert_eq!(check_scsi_image(&vhdx, ScsiDiskType::Vhdx), Ok(()));
        assert_eq!(check_scsi_image(&raw, ScsiDiskType::PassThrough), Ok(()));
        assert_eq!(
            check_scsi_image(&raw, ScsiDiskType::Vhdx).map_err(|e| e.to_string()),
            Err(format!(
                "{}: spec says vhdx but the image is raw",
                raw.display()
            ))
        );
        assert!(matches!(
            check_scsi_image(&vhdx, ScsiDiskType::PassThrough),
            Err(HostPathError::FormatMismatch { .. })
        ));
        assert!(matches!(
            check_scsi_image(&vhd, ScsiDiskType::Vhdx),
            Err(HostPathError::FormatMismatch { .. })
        ));
        assert!(matches!(
            check_scsi_image(dir.path(), ScsiDiskType::Vhdx),
            Err(HostPathError::WrongKind { .. })
        ));
    }

    #[test]
    fn vpmem_maps_a_vhd_without_its_footer_in_whole_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vhd = dir.path().join("p.vhd");
        write_vhd(&vhd, 3 * 4096 + 100);
        assert_eq!(
            check_vpmem_image(&vhd, VPMemImageFormat::Vhd1),
            Ok(3 * 4096)
        );
        assert!(check_vpmem_image(&vhd, VPMemImageFormat::Vhdx).is_err());
    }
}
