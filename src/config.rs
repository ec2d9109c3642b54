//! Host defaults from a config file, so `--state-dir`, `--allow-root` and
//! the rest need not be repeated on every command: flags win, then the
//! environment (`UVMCTL_STATE_DIR`, ...), then this file, then the built-in
//! defaults, as kubectl's KUBECONFIG and Terraform's `TF_*` do.
//!
//! The file is the host operator's (`/etc/uvmctl/config.yaml` unless
//! `--config` or `UVMCTL_CONFIG` names another): trusted like the command
//! line, but still bounded, and a bad one is an error naming file, line and
//! field, never ignored.

use serde::Deserialize;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where the host's config file is looked for when none is named.
#[cfg(unix)]
pub const DEFAULT_CONFIG: &str = "/etc/uvmctl/config.yaml";
/// Where the host's config file is looked for when none is named (beside
/// the state directory: `\etc` would be on whatever drive is current, in
/// a root any user may make folders in).
#[cfg(not(unix))]
pub const DEFAULT_CONFIG: &str = r"C:\ProgramData\uvmctl\config.yaml";

/// A config file is read up to this size.
const MAX_CONFIG_BYTES: u64 = 64 << 10;

/// Defaults for the host options of every command; each is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostDefaults {
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--allow-root`, each.
    #[serde(default)]
    pub allow_roots: Vec<PathBuf>,
    /// `--accel`.
    pub accel: Option<AccelChoice>,
    /// `--virtstack`.
    pub virtstack: Option<VirtstackName>,
    /// `--qemu-user`.
    pub qemu_user: Option<String>,
    /// `--remote-dir`.
    pub remote_dir: Option<PathBuf>,
    /// `--remote-server`.
    pub remote_server: Option<PathBuf>,
    /// `--hcs-library`.
    pub hcs_library: Option<PathBuf>,
    /// `--hcs-allow-root`, each.
    #[serde(default)]
    pub hcs_allow_roots: Vec<PathBuf>,
}

impl HostDefaults {
    /// These, each falling back to `lower`'s where not set: flags and the
    /// environment over the config file.
    pub fn or(self, lower: HostDefaults) -> HostDefaults {
        let list = |mine: Vec<PathBuf>, theirs| if mine.is_empty() { theirs } else { mine };
        HostDefaults {
            state_dir: self.state_dir.or(lower.state_dir),
            allow_roots: list(self.allow_roots, lower.allow_roots),
            accel: self.accel.or(lower.accel),
            virtstack: self.virtstack.or(lower.virtstack),
            qemu_user: self.qemu_user.or(lower.qemu_user),
            remote_dir: self.remote_dir.or(lower.remote_dir),
            remote_server: self.remote_server.or(lower.remote_server),
            hcs_library: self.hcs_library.or(lower.hcs_library),
            hcs_allow_roots: list(self.hcs_allow_roots, lower.hcs_allow_roots),
        }
    }
}

/// Acceleration as asked for (`--accel`, `UVMCTL_ACCEL`, `accel:`): the
/// one shape of the choice. A config file's wrong word is named with its
/// line as the file is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM where the CPU really offers it, else TCG.
    #[default]
    Auto,
    /// KVM.
    Kvm,
    /// TCG (software emulation).
    Tcg,
}

impl AccelChoice {
    /// Every choice, as help lists them.
    pub const ALL: [AccelChoice; 3] = [AccelChoice::Auto, AccelChoice::Kvm, AccelChoice::Tcg];

    /// As the command line and the config file spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            AccelChoice::Auto => "auto",
            AccelChoice::Kvm => "kvm",
            AccelChoice::Tcg => "tcg",
        }
    }
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        AccelChoice::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown accel {s:?} (auto, kvm or tcg)"))
    }
}

/// `virtstack:`, one of the virtstacks' names.
pub use crate::vm::VirtstackKind as VirtstackName;

/// Why the config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Someone other than root could have written it (issue 31: a file
    /// in a directory another user can write, its `allowRoots: [/]`, made
    /// `/etc/shadow` a disk).
    #[error("{}: {why}; refused", path.display())]
    Untrusted {
        /// The file.
        path: PathBuf,
        /// Who could write it.
        why: String,
    },
    /// It is larger than a config file can be.
    #[error("{}: larger than {MAX_CONFIG_BYTES} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// It is not a config document (`path:line:col: message`).
    #[error("{}{}: {message}", path.display(), at.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Line and column, where known.
        at: Option<(usize, usize)>,
        /// What is wrong (the field, when one is).
        message: String,
    },
}

/// Reads the config file `named` (an error when it is missing), or the
/// default one (nothing when it is missing).
///
/// # Errors
/// A file that cannot be read or is not a config document.
pub fn load(named: Option<&Path>) -> Result<HostDefaults, ConfigError> {
    let (path, required) = match named {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok(HostDefaults::default());
        }
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    check_trusted(&path, &file)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge { path });
    }
    parse(&path, &text)
}

/// The state directory's rule for the config file: it is root's (or
/// uvmctl's own user's), nobody else may write it, and the directories it
/// is reached through pass [`crate::hostfs::check_trusted_dir`].
fn check_trusted(path: &Path, file: &std::fs::File) -> Result<(), ConfigError> {
    let untrusted = |why: String| ConfigError::Untrusted {
        path: path.to_path_buf(),
        why,
    };
    crate::hostfs::check_trusted_file(file).map_err(untrusted)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    crate::hostfs::check_trusted_dir(parent).map_err(|e| untrusted(e.to_string()))?;
    Ok(())
}

/// Parses a config document (`path` names it in errors).
///
/// # Errors
/// When `text` is not one.
pub fn parse(path: &Path, text: &str) -> Result<HostDefaults, ConfigError> {
    if text.trim().is_empty() {
        return Ok(HostDefaults::default());
    }
    // serde_yaml can panic on hostile input; a config file is the
    // operator's, but a panic still becomes an error naming it.
    let parsed = std::panic::catch_unwind(|| serde_yaml::from_str::<HostDefaults>(text));
    match parsed {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            at: e.location().map(|l| (l.line(), l.column())),
            message: e.to_string(),
        }),
        Err(_) => Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            at: None,
            message: "the YAML parser failed on this file".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 31: a config file another user could have written is refused
    /// with the reason, before a word of it is used.
    #[cfg(unix)]
    #[test]
    fn a_squatted_config_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().expect("tempdir");
        let dir = base.path().join("etc");
        std::fs::create_dir(&dir).expect("mkdir");
        let file = dir.join("config.yaml");
        std::fs::write(&file, "allowRoots: [/]\n").expect("write");
        assert_eq!(load(Some(&file)).expect("root's own").allow_roots.len(), 1);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = load(Some(&file)).expect_err("a directory others can write");
        assert!(matches!(e, ConfigError::Untrusted { .. }), "{e}");
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let e = load(Some(&file)).expect_err("a file others can write");
        assert!(
            e.to_string()
                .contains("writable by group or others (mode 0666)"),
            "{e}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");

        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&file, Some(65534), Some(65534)).expect("chown");
            let e = load(Some(&file)).expect_err("another user's file");
            assert!(
                e.to_string().contains("owned by uid 65534, not by root"),
                "{e}"
            );
        }
    }

    #[test]
    fn every_option_has_a_key_and_a_wrong_key_is_named_with_its_line() {
        let d = parse(
            Path::new("c.yaml"),
            "stateDir: /srv/uvmctl\nallowRoots: [/srv/images, /srv/disks]\naccel: tcg\n\
             virtstack: remotevm\nqemuUser: qemu\nremoteDir: /srv/r\nremoteServer: /usr/bin/s\n",
        )
        .expect("valid");
        assert_eq!(d.state_dir.as_deref(), Some(Path::new("/srv/uvmctl")));
        assert_eq!(d.allow_roots.len(), 2);
        assert_eq!(d.accel, Some(AccelChoice::Tcg));
        assert_eq!(d.virtstack, Some(VirtstackName::RemoteVm));
        // Issue 20: a wrong word is named with its line, as a wrong key is.
        let e = parse(Path::new("c.yaml"), "stateDir: /a\naccel: fast\n").expect_err("bad accel");
        let text = e.to_string();
        assert!(
            text.starts_with("c.yaml:2:8: accel: unknown variant `fast`"),
            "{text}"
        );
        let e = parse(Path::new("c.yaml"), "virtstack: hyperv\n").expect_err("bad virtstack");
        assert!(
            e.to_string()
                .starts_with("c.yaml:1:12: virtstack: unknown variant `hyperv`"),
            "{e}"
        );
        let e =
            parse(Path::new("c.yaml"), "stateDir: /a\nstate_dir: /b\n").expect_err("unknown key");
        let text = e.to_string();
        assert!(text.starts_with("c.yaml:2:"), "{text}");
        assert!(text.contains("state_dir"), "{text}");
        assert_eq!(
            parse(Path::new("c.yaml"), "\n").expect("empty"),
            HostDefaults::default()
        );
    }

    #[test]
    fn only_a_named_file_must_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("none.yaml");
        assert!(matches!(
            load(Some(&missing)),
            Err(ConfigError::Read { .. })
        ));
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; (MAX_CONFIG_BYTES + 1) as usize]).expect("write");
        assert!(matches!(
            load(Some(&big)),
            Err(ConfigError::TooLarge { .. })
        ));
    }
}
