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
//! - each connection stops being read while [`MAX_CALLS_IN_FLIGHT`] of its
//!   requests are unanswered (ttrpc's frames are counted as they pass: a
//!   request read, a response written), so one client cannot park twelve
//!   thousand `WaitVM` calls;
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

/// The most connections one server serves at once; one past them is
/// closed as soon as it is accepted (hcsshim holds one).
pub const MAX_CONNECTIONS: usize = 64;

/// The connections `listener` accepts, each wrapped so its answers pace it,
/// at most [`MAX_CONNECTIONS`] at once.
fn accepted(
    listener: UnixListener,
) -> impl futures_util::Stream<Item = io::Result<Paced>> + Send + 'static {
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    futures_util::stream::unfold(
        (listener, ACCEPT_BACKOFF, false, live),
        |(listener, mut backoff, mut logged, live)| async move {
            use std::sync::atomic::Ordering;
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        if live.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                            drop(stream);
                            continue;
                        }
                        if logged {
                            tracing::info!("accepting connections again");
                        }
                        let mut paced = Paced::new(stream);
                        paced.counted = Some(Counted::new(&live));
                        return Some((Ok(paced), (listener, ACCEPT_BACKOFF, false, live)));
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

/// The most requests of one connection answered at once; the next is not
/// read until one of them is answered. (hcsshim keeps one `WaitVM` and a
/// few calls in flight.)
pub const MAX_CALLS_IN_FLIGHT: usize = 64;

/// ttrpc's frame header: length (4), stream id (4), type (1), flags (1).
const FRAME_HEADER: usize = 10;
const FRAME_REQUEST: u8 = 1;
const FRAME_RESPONSE: u8 = 2;

/// Where a byte stream of ttrpc frames is: in a header, or in a payload.
#[derive(Debug, Default)]
struct Frames {
    header: [u8; FRAME_HEADER],
    have: usize,
    payload_left: u64,
}

impl Frames {
    /// How many bytes may be read before the next header or payload ends
    /// (so a read never crosses a frame: a request is counted as soon as
    /// its header is in, before any byte after it is).
    fn next_run(&self) -> usize {
        if self.payload_left > 0 {
            usize::try_from(self.payload_left).unwrap_or(usize::MAX)
        } else {
            FRAME_HEADER - self.have
        }
    }

    /// Feeds bytes that passed; the type of each header completed.
    fn feed(&mut self, mut bytes: &[u8], mut on_header: impl FnMut(u8)) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                self.payload_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = bytes.len().min(FRAME_HEADER - self.have);
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FRAME_HEADER {
                self.have = 0;
                let [a, b, c, d, ..] = self.header;
                self.payload_left = u64::from(u32::from_be_bytes([a, b, c, d]));
                on_header(self.header[8]);
            }
        }
    }
}

#[derive(Default)]
struct Pace {
    /// A write is waiting for the client to read.
    write_blocked: bool,
    /// The reader, parked until then (or until a call is answered).
    reader: Option<Waker>,
    /// Requests read and not answered yet.
    in_flight: usize,
    read: Frames,
    written: Frames,
}

/// One of a server's live connections, counted while it exists.
struct Counted(Arc<std::sync::atomic::AtomicUsize>);

impl Counted {
    fn new(live: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Counted(Arc::clone(live))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A connection that is not read while an answer to it cannot be written.
pub struct Paced<S = UnixStream> {
    inner: S,
    pace: Arc<Mutex<Pace>>,
    counted: Option<Counted>,
}

impl<S> Paced<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Paced {
            inner,
            pace: Arc::default(),
            counted: None,
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
        let run = {
            let mut pace = this.pace();
            // At the bound, the next frame waits; the rest of the current
            // one (its payload) is still read, or its call would never run.
            let at_frame_start = pace.read.have == 0 && pace.read.payload_left == 0;
            if pace.write_blocked || (at_frame_start && pace.in_flight >= MAX_CALLS_IN_FLIGHT) {
                pace.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            pace.read.next_run()
        };
        let (got, n) = {
            let mut part = ReadBuf::new(buf.initialize_unfilled_to(run.min(buf.remaining())));
            let got = Pin::new(&mut this.inner).poll_read(cx, &mut part);
            let mut pace = this.pace();
            let Pace {
                read, in_flight, ..
            } = &mut *pace;
            read.feed(part.filled(), |kind| {
                if kind == FRAME_REQUEST {
                    *in_flight += 1;
                }
            });
            (got, part.filled().len())
        };
        buf.advance(n);
        got
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
        if let Poll::Ready(Ok(n)) = got {
            let mut pace = this.pace();
            let Pace {
                written, in_flight, ..
            } = &mut *pace;
            written.feed(&buf[..n], |kind| {
                if kind == FRAME_RESPONSE {
                    *in_flight = in_flight.saturating_sub(1);
                }
            });
        }
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

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&u32::try_from(payload.len()).expect("short").to_be_bytes());
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(&[kind, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// Issue 31: one connection parked 12,000 `WaitVM` calls. Requests
    /// past the bound are not read until one is answered.
    #[tokio::test]
    async fn a_connection_is_not_read_past_its_calls_in_flight() {
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut server = Paced::new(server);
        let many: Vec<u8> = (0..100u32)
            .flat_map(|i| frame(FRAME_REQUEST, 2 * i + 1, b"wait"))
            .collect();
        client.write_all(&many).await.expect("requests");
        let one = 14;
        let mut got = vec![0u8; one * MAX_CALLS_IN_FLIGHT];
        server
            .read_exact(&mut got)
            .await
            .expect("the bound's worth");
        let mut next = vec![0u8; one];
        assert!(
            tokio::time::timeout(Duration::from_millis(100), server.read_exact(&mut next))
                .await
                .is_err(),
            "the request past the bound is not read"
        );
        // One answer, written in two pieces: one more request is read.
        let answer = frame(FRAME_RESPONSE, 1, b"done");
        server.write_all(&answer[..7]).await.expect("answer");
        server.write_all(&answer[7..]).await.expect("answer");
        tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut next))
            .await
            .expect("read again")
            .expect("read");
        assert_eq!(next, frame(FRAME_REQUEST, 2 * 64 + 1, b"wait"));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), server.read_exact(&mut next))
                .await
                .is_err(),
            "at the bound again"
        );
    }

    #[test]
    fn frames_are_followed_across_any_cut() {
        let stream = [
            frame(FRAME_REQUEST, 1, b"abc"),
            frame(3, 1, &[0u8; 300]),
            frame(FRAME_REQUEST, 3, b""),
        ]
        .concat();
        for cut in 1..stream.len() {
            let mut f = Frames::default();
            let mut kinds = Vec::new();
            for piece in stream.chunks(cut) {
                f.feed(piece, |k| kinds.push(k));
            }
            assert_eq!(kinds, [FRAME_REQUEST, 3, FRAME_REQUEST], "cut {cut}");
        }
    }

    /// Issue 31: a server serves a bounded number of connections; one past
    /// them is closed at once, and a slot that frees is taken again.
    #[tokio::test]
    async fn connections_past_the_bound_are_closed_at_once() {
        use futures_util::StreamExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let mut conns = Box::pin(accepted(UnixListener::bind(&path).expect("bind")));
        let mut held = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            clients.push(UnixStream::connect(&path).await.expect("connect"));
            held.push(conns.next().await.expect("one").expect("accepted"));
        }
        let mut extra = UnixStream::connect(&path)
            .await
            .expect("the kernel accepts");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), conns.next())
                .await
                .is_err(),
            "not handed to the server"
        );
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("closed at once")
            .expect("read");
        assert_eq!(n, 0, "closed");
        drop(held.pop());
        clients.push(UnixStream::connect(&path).await.expect("connect"));
        tokio::time::timeout(Duration::from_secs(5), conns.next())
            .await
            .expect("a freed slot is taken")
            .expect("one")
            .expect("accepted");
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
