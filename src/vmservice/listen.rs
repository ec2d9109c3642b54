//! The socket `uvmctl serve` listens on, as ttrpc gets it.
//!
//! ttrpc answers every request it reads in a task of its own, and a task
//! whose answer the client never reads waits forever, holding it: a client
//! that sends without reading grows the server without bound. And its
//! accept loop retries at once when accept fails, so at the descriptor
//! limit it spins. Both are fixed here, below ttrpc:
//!
//! - each connection stops being read while an answer to it cannot be
//!   written (the client's socket buffer is full); it is read again once
//!   that write goes through, so at most one socket buffer of answers
//!   waits per client;
//! - accept failures for lack of descriptors or memory back off (10 ms,
//!   doubling to 1 s) instead of spinning, and are logged once per run of
//!   failures.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};

/// The first pause after accept fails for lack of resources.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause.
const ACCEPT_BACKOFF_CAP: Duration = Duration::from_secs(1);

/// Binds `path` (mode 0600: whoever connects drives the VM as root) and
/// returns the listener ttrpc serves.
///
/// # Errors
/// When the socket cannot be bound or its mode set.
pub fn bind(path: &Path) -> io::Result<ttrpc::r#async::transport::Listener> {
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(ttrpc::r#async::transport::Listener::new(accepted(listener)))
}

/// Whether an accept error means "no resources now" (try again later).
fn exhausted(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// The connections `listener` accepts, each wrapped so its answers pace it.
fn accepted(
    listener: UnixListener,
) -> impl futures_util::Stream<Item = io::Result<Paced>> + Send + 'static {
    futures_util::stream::unfold(
        (listener, ACCEPT_BACKOFF, false),
        |(listener, mut backoff, mut logged)| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        if logged {
                            tracing::info!("accepting connections again");
                        }
                        return Some((Ok(Paced::new(stream)), (listener, ACCEPT_BACKOFF, false)));
                    }
                    Err(e) if exhausted(&e) => {
                        if !logged {
                            tracing::warn!("cannot accept a connection ({e}); backing off");
                            logged = true;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_CAP);
                    }
                    // A connection that went away before it was accepted.
                    Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
                }
            }
        },
    )
}

#[derive(Default)]
struct Pace {
    /// A write is waiting for the client to read.
    write_blocked: bool,
    /// The reader, parked until then.
    reader: Option<Waker>,
}

/// A connection that is not read while an answer to it cannot be written.
pub struct Paced<S = UnixStream> {
    inner: S,
    pace: Arc<Mutex<Pace>>,
}

impl<S> Paced<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Paced {
            inner,
            pace: Arc::default(),
        }
    }

    fn pace(&self) -> std::sync::MutexGuard<'_, Pace> {
        // A poisoned lock only means a panic elsewhere held it: the flags
        // are still meaningful.
        self.pace.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wrote(&self, blocked: bool) {
        let mut pace = self.pace();
        pace.write_blocked = blocked;
        if !blocked && let Some(w) = pace.reader.take() {
            w.wake();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Paced<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let mut pace = this.pace();
            if pace.write_blocked {
                pace.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Paced<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let got = Pin::new(&mut this.inner).poll_write(cx, buf);
        // An error or a close also unblocks the reader, which then sees it.
        this.wrote(got.is_pending());
        got
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let got = Pin::new(&mut this.inner).poll_flush(cx);
        this.wrote(got.is_pending());
        got
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let got = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.wrote(false);
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_connection_is_not_read_while_its_answers_cannot_be_written() {
        // `server` is what ttrpc holds; the client reads nothing at first.
        let (server, mut client) = tokio::io::duplex(64);
        let mut server = Paced::new(server);
        client.write_all(b"request").await.expect("request");
        let mut buf = [0u8; 7];
        server
            .read_exact(&mut buf)
            .await
            .expect("read while answers flow");
        // Answers fill the client's buffer: the write waits...
        let filled = tokio::time::timeout(Duration::from_millis(100), async {
            server.write_all(&[b'a'; 128]).await
        })
        .await;
        assert!(
            filled.is_err(),
            "the client reads nothing: the answer cannot all go"
        );
        // ...and while it does, the next request is not read.
        client.write_all(b"more").await.expect("client writes");
        let mut one = [0u8; 4];
        assert!(
            tokio::time::timeout(Duration::from_millis(100), server.read_exact(&mut one))
                .await
                .is_err(),
            "not read while an answer waits"
        );
        // The client drains its answers: once a write goes through, the
        // server reads again.
        let mut drained = vec![0u8; 64];
        client.read_exact(&mut drained).await.expect("drain");
        server.write_all(b"b").await.expect("write goes through");
        tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut one))
            .await
            .expect("read again")
            .expect("read");
        assert_eq!(&one, b"more");
    }

    #[test]
    fn only_a_lack_of_resources_backs_off() {
        use nix::errno::Errno;
        for e in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM] {
            assert!(exhausted(&io::Error::from(e)), "{e}");
        }
        assert!(!exhausted(&io::Error::from(Errno::ECONNABORTED)));
    }
}
