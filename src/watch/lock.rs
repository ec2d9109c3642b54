//! The state directory's lock as the watcher holds it: taken when the
//! first reconcile starts, shared by every reconcile in flight, let go when
//! the last ends, so a manual `apply` waits at most for those.

use crate::apply::lock::{LockError, StateLock};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The state directory's lock, held while any reconcile runs.
pub(super) struct SharedLock {
    dir: Option<PathBuf>,
    timeout: Duration,
    /// Serializes taking the file lock.
    taking: tokio::sync::Mutex<()>,
    held: Mutex<(usize, Option<StateLock>)>,
}

/// One reconcile's share of the lock; the last one out releases it.
pub(super) struct LockShare(Arc<SharedLock>);

impl Drop for LockShare {
    fn drop(&mut self) {
        let mut held = self.0.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.0 = held.0.saturating_sub(1);
        if held.0 == 0 {
            held.1 = None;
        }
    }
}

impl SharedLock {
    pub(super) async fn share(self: &Arc<Self>) -> Result<LockShare, LockError> {
        let _taking = self.taking.lock().await;
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            if held.0 > 0 || self.dir.is_none() {
                held.0 += 1;
                return Ok(LockShare(Arc::clone(self)));
            }
        }
        let dir = self.dir.clone().unwrap_or_default();
        let timeout = self.timeout;
        let lock =
            tokio::task::spawn_blocking(move || StateLock::acquire(&dir, timeout, "uvmctl watch"))
                .await
                .map_err(|e| LockError::Io {
                    path: PathBuf::from("lock"),
                    source: std::io::Error::other(e.to_string()),
                })??;
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.0 += 1;
        held.1 = Some(lock);
        Ok(LockShare(Arc::clone(self)))
    }

    /// A lock in `dir` (none without one: tests), waited for up to `timeout`.
    pub(super) fn new(dir: Option<PathBuf>, timeout: Duration) -> Self {
        SharedLock {
            dir,
            timeout,
            taking: tokio::sync::Mutex::new(()),
            held: Mutex::new((0, None)),
        }
    }
}
