//! One lock per state directory, so two applies never interleave.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else holds it.
    #[error("state directory {dir} is locked by {holder} (waited {waited:?}; see --lock-timeout)")]
    Held {
        /// The directory.
        dir: PathBuf,
        /// Who holds it, as they wrote it.
        holder: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The lock file could not be opened.
    #[error("cannot open lock file {path}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Held until dropped (the OS releases it if the process dies).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes `<dir>/lock`, waiting up to `timeout` for its holder.
    pub fn acquire(dir: &Path, timeout: Duration, what: &str) -> Result<StateLock, LockError> {
        Self::acquire_named(dir, "lock", timeout, what)
    }

    /// Takes `<dir>/<name>`, waiting up to `timeout` for its holder.
    pub fn acquire_named(
        dir: &Path,
        name: &str,
        timeout: Duration,
        what: &str,
    ) -> Result<StateLock, LockError> {
        let path = dir.join(name);
        // Never through a link (or another name) planted where the lock goes.
        let mut file = crate::hostfs::open_state_file(&path, 0o600, false).map_err(|source| {
            LockError::Io {
                path: path.clone(),
                source,
            }
        })?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    return Err(LockError::Held {
                        dir: dir.to_path_buf(),
                        holder: if holder.is_empty() {
                            "another uvmctl".into()
                        } else {
                            holder.to_string()
                        },
                        waited: start.elapsed(),
                    });
                }
                Err(std::fs::TryLockError::Error(source)) => {
                    return Err(LockError::Io { path, source });
                }
            }
        }
        // Say who we are, for whoever waits next: written over the old
        // text, then cut to length, so a full disk leaves the old holder
        // rather than an empty file (and frees nothing another write takes).
        let holder = format!("pid {} ({what})", std::process::id());
        if write_at_start(&file, holder.as_bytes()).is_ok() {
            let _ = file.set_len(holder.len() as u64);
        }
        Ok(StateLock { _file: file })
    }
}

/// Writes `bytes` at the start of `file`, not moving its cursor.
#[cfg(unix)]
fn write_at_start(file: &File, bytes: &[u8]) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, 0)
}

/// Writes `bytes` at the start of `file` (Windows has no positioned
/// write that keeps the cursor; nothing else writes this handle).
#[cfg(windows)]
fn write_at_start(mut file: &File, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(0))?;
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_then_names_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first =
            StateLock::acquire(dir.path(), Duration::ZERO, "uvmctl apply specs").expect("first");
        let err = StateLock::acquire(dir.path(), Duration::from_millis(200), "uvmctl apply other")
            .expect_err("held");
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "locked by pid {} (uvmctl apply specs)",
                std::process::id()
            )),
            "{text}"
        );
        drop(first);
        assert!(StateLock::acquire(dir.path(), Duration::ZERO, "again").is_ok());
    }
}
