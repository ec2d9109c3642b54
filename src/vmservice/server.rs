//! A running `uvmctl serve`: one VM's vmservice on a unix socket, from bind
//! to shutdown. The binary adds only its edges (signals, hcsshim's closed
//! standard output).

use super::VmService;
use crate::vm::{Virtstack, VmName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something that is not a socket is in the way.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// The socket could not be made.
    #[error("cannot listen on {}: {source}", path.display())]
    Listen {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// ttrpc would not start.
    #[error("cannot start the ttrpc server: {0}")]
    Start(String),
}

/// The server of one VM, listening.
pub struct Serving {
    server: ttrpc::r#async::Server,
    path: PathBuf,
    quit: Arc<tokio::sync::Notify>,
    follower: tokio::task::AbortHandle,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl Serving {
    /// Serves the VM `name` of `vs` on the unix socket `path` (mode 0600),
    /// each connection paced by its answers and accept backing off at the
    /// descriptor limit (`vmservice::listen`). A socket left by a server
    /// that died is replaced; anything else at `path` is not.
    ///
    /// # Errors
    /// When `path` cannot be listened on, or ttrpc does not start.
    pub async fn start(
        vs: Arc<dyn Virtstack>,
        name: VmName,
        path: &Path,
    ) -> Result<Self, ServeError> {
        let listen = |source| ServeError::Listen {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(ServeError::NotASocket(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(listen)?;
        }
        let service = VmService::new(vs, name);
        let quit = service.quit_signal();
        let follower = service.follow();
        let listener = super::listen::bind(path).map_err(listen)?;
        let mut server = ttrpc::r#async::Server::new()
            .add_listener(listener)
            .register_service(service.into_services());
        server
            .start()
            .await
            .map_err(|e| ServeError::Start(e.to_string()))?;
        Ok(Serving {
            server,
            path: path.to_path_buf(),
            quit,
            follower,
        })
    }

    /// Returns when a client called `Quit`.
    pub async fn quit_asked(&self) {
        self.quit.notified().await;
    }

    /// Stops serving and removes the socket.
    pub async fn shutdown(mut self) {
        let _ = self.server.shutdown().await;
        let _ = std::fs::remove_file(&self.path);
    }
}
