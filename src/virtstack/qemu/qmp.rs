//! QMP client: one connection to one QEMU monitor socket, shared by every task
//! that talks to that VM.
//!
//! ```text
//! execute(cmd) ──{"execute":cmd,"id":N}──▶ write half (tokio Mutex) ──▶ QEMU
//!      ▲                                                                │
//!      └──── oneshot, by id ◀── reader task ◀── one JSON object a line ─┘
//!                                   └──▶ broadcast ──▶ subscribe(): events
//! ```
//!
//! Hand-written rather than the `qapi` crate: its generated event decoder has
//! no catch-all, so one event it does not know (QEMU 7.2 sends
//! `MEM_UNPLUG_ERROR`, `RDMA_GID_STATUS_CHANGED`) kills the whole connection.
//! Here replies and events stay raw JSON, callers read the fields they need,
//! and unknown fields and events pass through untouched.
//!
//! # Assumptions
//! - QEMU's default compact output, one JSON object per line: launch without
//!   `-mon …,pretty=on`.
//! - One client per socket: QEMU serves a `-qmp` socket to one client at a
//!   time (a second one blocks at the greeting), so keep one [`Qmp`] per VM
//!   and clone it.

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    Interest,
};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Deadline of [`Qmp::execute`] and [`Qmp::send_fd`]. Commands answer in
/// milliseconds; ten seconds only ever expires on a wedged QEMU.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Events buffered per subscriber. A subscriber that falls further behind
/// loses the oldest ones rather than stalling the reader (and so every reply).
pub const EVENT_CAPACITY: usize = 256;

/// Longest line accepted from QEMU. `query-qmp-schema` is a few hundred KiB on
/// one line; this only stops a runaway peer from eating memory.
const MAX_LINE: usize = 64 << 20;

/// Result of QMP operations.
pub type Result<T, E = QmpError> = std::result::Result<T, E>;

/// Why a QMP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The monitor socket could not be connected to.
    #[error("cannot connect to QMP socket {path} (is qemu running?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What `connect` said.
        #[source]
        source: io::Error,
    },
    /// The peer did not open with a `{"QMP": {...}}` greeting.
    #[error("no usable qmp greeting: {0}")]
    Greeting(String),
    /// No answer before the deadline. The connection stays usable.
    #[error("qmp {command} timed out after {after:?}")]
    Timeout {
        /// The command (or `wait for event`).
        command: String,
        /// The deadline that expired.
        after: Duration,
    },
    /// QEMU answered with an error.
    #[error("qmp {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// The connection is gone (or unusable); every pending and later call
    /// fails with this. Reconnect to go on.
    #[error("qmp connection closed: {0}")]
    Disconnected(String),
    /// Writing to the socket failed.
    #[error("qmp socket i/o failed")]
    Io(#[from] io::Error),
    /// The greeting was not JSON. (Malformed lines after the greeting are
    /// logged and skipped, never returned.)
    #[error("malformed qmp json")]
    Json(#[from] serde_json::Error),
    /// A reply that lacks what the command returns.
    #[error("unexpected qmp reply: {0}")]
    Reply(String),
    /// [`Qmp::send_fd`] on a connection that is not a unix socket.
    #[error("qmp fd passing needs a unix socket connection (made by Qmp::connect)")]
    FdPassingUnsupported,
}

/// An asynchronous QMP event, e.g. `DEVICE_DELETED` or `SHUTDOWN`. Any name is
/// accepted. Events are signals, not truth: confirm with a query.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event name, as QEMU spells it.
    pub name: String,
    /// The event's `data`, or `Null` when it has none (e.g. `STOP`).
    pub data: Value,
    /// QEMU's `timestamp` as (seconds, microseconds), when present and well formed.
    pub timestamp: Option<(i64, i64)>,
}

/// A connected, negotiated QMP client.
///
/// Cheap to clone; clones share the connection, and any number of tasks may
/// call it at once (replies are matched by id). The background reader stops
/// and the socket closes when the last clone is dropped.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<Writer>,
    next_id: AtomicU64,
    version: Option<(u32, u32, u32)>,
    /// Whether the writer is a unix socket, so fd passing can work.
    unix: bool,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The reader owns the read half and the event sender: aborting it
        // closes the socket and tells subscribers the stream has ended.
        self.reader.abort();
    }
}

/// What the reader task and the callers share.
struct Shared {
    state: Mutex<State>,
    /// Weak, so that the reader task alone keeps the channel open: when it
    /// ends, receivers see `Closed`.
    events: broadcast::WeakSender<QmpEvent>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

enum Reply {
    Return(Value),
    Error { class: String, desc: String },
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding this lock, so a poisoned state is
        // still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a waiter before the request is written, so that even an
    /// instant reply finds it.
    fn register(&self, id: u64) -> Result<oneshot::Receiver<Reply>> {
        let mut state = self.lock();
        if let Some(reason) = &state.closed {
            return Err(QmpError::Disconnected(reason.clone()));
        }
        let (tx, rx) = oneshot::channel();
        state.pending.insert(id, tx);
        Ok(rx)
    }

    fn forget(&self, id: u64) {
        self.lock().pending.remove(&id);
    }

    fn complete(&self, id: u64, reply: Reply) {
        let waiter = self.lock().pending.remove(&id);
        match waiter {
            // A send error only means the caller stopped waiting meanwhile.
            Some(tx) => drop(tx.send(reply)),
            None => tracing::warn!(id, "dropping qmp reply with an unknown id (timed out?)"),
        }
    }

    fn close(&self, reason: String) {
        let mut state = self.lock();
        state.closed = Some(reason);
        // Dropping the senders wakes every waiter; they read the reason.
        state.pending.clear();
    }

    fn disconnected(&self) -> QmpError {
        let reason = self.lock().closed.clone();
        QmpError::Disconnected(reason.unwrap_or_else(|| "the reader stopped".to_owned()))
    }

    fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }
}

/// Removes a pending entry when its call ends in any way (reply, timeout, or
/// the caller's future being dropped), so the map never leaks.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.forget(self.id);
    }
}

enum WriteHalf {
    /// Kept concrete for `sendmsg` with SCM_RIGHTS.
    Unix(OwnedWriteHalf),
    Stream(Box<dyn AsyncWrite + Send + Unpin>),
}

struct Writer {
    half: WriteHalf,
    /// Set while a message is partly written. If it stays set (the caller's
    /// future was dropped mid-write, or the write failed), QEMU holds half a
    /// request and the stream cannot be trusted again.
    torn: bool,
}

impl Writer {
    async fn send(&mut self, message: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<()> {
        if self.torn {
            return Err(QmpError::Disconnected(
                "an earlier request was cut off mid-write, so the stream is out of sync".to_owned(),
            ));
        }
        let mut written = 0;
        if let Some(fd) = fd {
            let WriteHalf::Unix(half) = &self.half else {
                return Err(QmpError::FdPassingUnsupported);
            };
            written = send_with_fd(half.as_ref(), message, fd).await?;
        }
        while written < message.len() {
            let out: &mut (dyn AsyncWrite + Send + Unpin) = match &mut self.half {
                WriteHalf::Unix(half) => half,
                WriteHalf::Stream(stream) => stream,
            };
            self.torn = written > 0;
            let n = out.write(&message[written..]).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            written += n;
        }
        match &mut self.half {
            WriteHalf::Unix(half) => half.flush().await?,
            WriteHalf::Stream(stream) => stream.flush().await?,
        }
        self.torn = false;
        Ok(())
    }
}

/// Sends the start of `message` with `fd` attached as SCM_RIGHTS and returns
/// how many bytes went out (at least one, carrying the fd).
async fn send_with_fd(
    stream: &UnixStream,
    message: &[u8],
    fd: BorrowedFd<'_>,
) -> io::Result<usize> {
    let fds = [fd.as_raw_fd()];
    loop {
        stream.writable().await?;
        // try_io clears tokio's readiness on WouldBlock, so the next
        // writable() really waits.
        let sent = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(message)];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            // MSG_NOSIGNAL: a closed peer is an error here, not a SIGPIPE.
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => return Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

impl Qmp {
    /// Connects to QEMU's `-qmp unix:PATH` socket, reads the greeting and
    /// negotiates capabilities, all within `timeout`.
    ///
    /// # Errors
    /// [`QmpError::Connect`] when nothing listens; [`QmpError::Greeting`] when
    /// no greeting comes (often another client holds the socket).
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = match tokio::time::timeout_at(deadline, UnixStream::connect(path)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(QmpError::Connect {
                    path: path.to_owned(),
                    source,
                });
            }
            Err(_) => {
                return Err(QmpError::Connect {
                    path: path.to_owned(),
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection within {timeout:?}"),
                    ),
                });
            }
        };
        let (read, write) = stream.into_split();
        Self::start(read, WriteHalf::Unix(write), deadline, timeout).await
    }

    /// Like [`Qmp::connect`], over an already open stream of any kind (tests
    /// use `tokio::io::duplex`). Such a client cannot pass fds.
    ///
    /// # Errors
    /// As [`Qmp::connect`], less the connect step.
    pub async fn handshake<S>(stream: S, timeout: Duration) -> Result<Qmp>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let deadline = Instant::now() + timeout;
        Self::start(read, WriteHalf::Stream(Box::new(write)), deadline, timeout).await
    }

    async fn start<R>(read: R, half: WriteHalf, deadline: Instant, timeout: Duration) -> Result<Qmp>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        let mut reader = BufReader::new(read);
        let greeting = match tokio::time::timeout_at(deadline, read_greeting(&mut reader)).await {
            Ok(greeting) => greeting?,
            Err(_) => {
                return Err(QmpError::Greeting(format!(
                    "none within {timeout:?} (a -qmp socket serves one client at a time: is another one connected?)"
                )));
            }
        };
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            events: events.downgrade(),
        });
        let unix = matches!(half, WriteHalf::Unix(_));
        let reader = tokio::spawn(read_loop(reader, Arc::clone(&shared), events));
        let qmp = Qmp {
            inner: Arc::new(Inner {
                shared,
                writer: tokio::sync::Mutex::new(Writer { half, torn: false }),
                next_id: AtomicU64::new(1),
                version: qemu_version(&greeting),
                unix,
                reader,
            }),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match qmp.call("qmp_capabilities", None, None, left).await {
            Ok(_) => Ok(qmp),
            // Report the caller's whole deadline, not what was left of it.
            Err(QmpError::Timeout { command, .. }) => Err(QmpError::Timeout {
                command,
                after: timeout,
            }),
            Err(e) => Err(e),
        }
    }

    /// QEMU's version from the greeting, as (major, minor, micro).
    pub fn version(&self) -> Option<(u32, u32, u32)> {
        self.inner.version
    }

    /// Runs `command` with [`DEFAULT_TIMEOUT`] and returns its `return` value.
    ///
    /// # Errors
    /// [`QmpError::Command`] when QEMU refuses, [`QmpError::Timeout`],
    /// [`QmpError::Disconnected`], [`QmpError::Io`].
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_with_timeout(command, arguments, DEFAULT_TIMEOUT)
            .await
    }

    /// Runs `command`, waiting at most `timeout` (for the write and the reply
    /// together). On timeout the connection stays usable; a late reply is
    /// logged and dropped.
    ///
    /// # Errors
    /// As [`Qmp::execute`].
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.call(command, arguments, None, timeout).await
    }

    /// Hands `fd` to QEMU under `fdname` (the `getfd` command, the fd riding
    /// along as SCM_RIGHTS), e.g. for `migrate` to `fd:NAME`, which works
    /// under `-sandbox spawn=deny` where `exec:` kills QEMU. Waits
    /// [`DEFAULT_TIMEOUT`]. The caller may close its `fd` once this returns:
    /// QEMU holds its own copy until it uses it or gets `closefd`.
    ///
    /// # Errors
    /// [`QmpError::FdPassingUnsupported`] unless made by [`Qmp::connect`];
    /// otherwise as [`Qmp::execute`]. After a timeout QEMU may still hold the
    /// fd: send `closefd` before reusing the name.
    pub async fn send_fd(&self, fdname: &str, fd: BorrowedFd<'_>) -> Result<()> {
        if !self.inner.unix {
            return Err(QmpError::FdPassingUnsupported);
        }
        let arguments = serde_json::json!({ "fdname": fdname });
        self.call("getfd", Some(arguments), Some(fd), DEFAULT_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Puts `fd` into a new fd set of QEMU's (`add-fd`, the fd riding along
    /// as SCM_RIGHTS), tagged `opaque`, and returns (fd set id, QEMU's own
    /// number for the fd): block nodes open it as `/dev/fdset/ID`, memory
    /// backends as `/dev/fd/FD`. Waits [`DEFAULT_TIMEOUT`].
    ///
    /// # Errors
    /// As [`Qmp::send_fd`]; a reply without both numbers is
    /// [`QmpError::Reply`].
    pub async fn add_fd(&self, opaque: &str, fd: BorrowedFd<'_>) -> Result<(u64, u64)> {
        if !self.inner.unix {
            return Err(QmpError::FdPassingUnsupported);
        }
        let arguments = serde_json::json!({ "opaque": opaque });
        let ret = self
            .call("add-fd", Some(arguments), Some(fd), DEFAULT_TIMEOUT)
            .await?;
        match (
            ret.get("fdset-id").and_then(Value::as_u64),
            ret.get("fd").and_then(Value::as_u64),
        ) {
            (Some(set), Some(fd)) => Ok((set, fd)),
            _ => Err(QmpError::Reply(
                "add-fd answered without fdset-id and fd".to_string(),
            )),
        }
    }

    /// A new receiver of every event from now on. Subscribe *before* issuing
    /// the command that triggers the event you want, or it may come and go
    /// before you listen. After a disconnect the receiver reports `Closed`.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        match self.inner.shared.events.upgrade() {
            Some(events) => events.subscribe(),
            // The reader has ended: a receiver whose sender is already gone.
            None => broadcast::channel(1).1,
        }
    }

    /// Waits up to `timeout` for the next event on `rx` (from
    /// [`Qmp::subscribe`], taken *before* the triggering command) for which
    /// `pred` holds; other events are skipped.
    ///
    /// # Caveats
    /// A receiver that lags loses old events (logged), possibly the one
    /// awaited: after a timeout, confirm the state with a query.
    ///
    /// # Errors
    /// [`QmpError::Timeout`] (command `wait for event`) or
    /// [`QmpError::Disconnected`].
    pub async fn wait_event(
        &self,
        rx: &mut broadcast::Receiver<QmpEvent>,
        timeout: Duration,
        pred: impl Fn(&QmpEvent) -> bool,
    ) -> Result<QmpEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(event)) if pred(&event) => return Ok(event),
                Ok(Ok(_)) => {}
                Ok(Err(RecvError::Lagged(lost))) => {
                    tracing::warn!(lost, "qmp event subscriber fell behind and lost events");
                }
                Ok(Err(RecvError::Closed)) => return Err(self.inner.shared.disconnected()),
                Err(_) => {
                    return Err(QmpError::Timeout {
                        command: "wait for event".to_owned(),
                        after: timeout,
                    });
                }
            }
        }
    }

    async fn call(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = Map::new();
        request.insert("execute".to_owned(), Value::from(command));
        if let Some(arguments) = arguments {
            request.insert("arguments".to_owned(), arguments);
        }
        request.insert("id".to_owned(), Value::from(id));
        let mut line = serde_json::to_vec(&request)?;
        line.push(b'\n');

        let shared = &*self.inner.shared;
        let reply = shared.register(id)?;
        let _pending = PendingGuard { shared, id };
        let exchange = async {
            // The lock is held for the write only, not while awaiting the reply.
            let written = self.inner.writer.lock().await.send(&line, fd).await;
            match written {
                // A write that fails because QEMU went away is a disconnect.
                Err(QmpError::Io(_)) if shared.is_closed() => return Err(shared.disconnected()),
                other => other?,
            }
            reply.await.map_err(|_| shared.disconnected())
        };
        tracing::trace!(command, id, "qmp request");
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(Reply::Return(value))) => Ok(value),
            Ok(Ok(Reply::Error { class, desc })) => Err(QmpError::Command {
                command: command.to_owned(),
                class,
                desc,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
                after: timeout,
            }),
        }
    }
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.inner.version)
            .field("closed", &self.inner.shared.lock().closed)
            .finish_non_exhaustive()
    }
}

enum Line {
    Complete,
    TooLong,
    Eof,
}

/// Reads one line into `buf` (cleared first). A line over [`MAX_LINE`] is
/// consumed up to its newline and reported as `TooLong`.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.clear();
    let n = (&mut *reader)
        .take(MAX_LINE as u64)
        .read_until(b'\n', buf)
        .await?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.len() < MAX_LINE || buf.ends_with(b"\n") {
        return Ok(Line::Complete);
    }
    buf.clear();
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(Line::TooLong);
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => {
                reader.consume(end + 1);
                return Ok(Line::TooLong);
            }
            None => {
                let len = chunk.len();
                reader.consume(len);
            }
        }
    }
}

async fn read_greeting<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Value> {
    let mut line = Vec::new();
    loop {
        match read_line(reader, &mut line).await? {
            Line::Complete => {}
            Line::TooLong => {
                return Err(QmpError::Greeting(format!(
                    "first line over {MAX_LINE} bytes"
                )));
            }
            Line::Eof => return Err(QmpError::Greeting("the socket closed before it".to_owned())),
        }
        if line.trim_ascii().is_empty() {
            continue;
        }
        let mut message: Value = serde_json::from_slice(&line)?;
        return match message.get_mut("QMP").map(Value::take) {
            Some(greeting @ Value::Object(_)) => Ok(greeting),
            _ => Err(QmpError::Greeting(format!(
                "expected {{\"QMP\": {{…}}}}, got {}",
                snippet(&line)
            ))),
        };
    }
}

fn qemu_version(greeting: &Value) -> Option<(u32, u32, u32)> {
    let qemu = greeting.get("version")?.get("qemu")?;
    let part = |key: &str| u32::try_from(qemu.get(key)?.as_u64()?).ok();
    Some((part("major")?, part("minor")?, part("micro")?))
}

/// Reads until the stream ends, routing replies to their callers and events
/// to subscribers. Nothing QEMU sends is fatal but the end of the stream.
async fn read_loop<R: AsyncBufRead + Unpin>(
    mut reader: R,
    shared: Arc<Shared>,
    events: broadcast::Sender<QmpEvent>,
) {
    let mut line = Vec::new();
    let reason = loop {
        match read_line(&mut reader, &mut line).await {
            Ok(Line::Complete) => dispatch(&shared, &events, &line),
            Ok(Line::TooLong) => tracing::warn!(max = MAX_LINE, "skipping over-long qmp line"),
            Ok(Line::Eof) => break "qemu closed the socket".to_owned(),
            Err(e) => break format!("read failed: {e}"),
        }
    };
    tracing::debug!(%reason, "qmp reader finished");
    shared.close(reason);
    // `events` drops here: subscribers get what was sent, then `Closed`.
}

fn dispatch(shared: &Shared, events: &broadcast::Sender<QmpEvent>, line: &[u8]) {
    if line.trim_ascii().is_empty() {
        return;
    }
    let mut message = match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(message)) => message,
        Ok(_) => {
            tracing::warn!(line = %snippet(line), "skipping qmp line that is not a json object");
            return;
        }
        Err(error) => {
            tracing::warn!(%error, line = %snippet(line), "skipping malformed qmp line");
            return;
        }
    };
    if let Some(Value::String(name)) = message.remove("event") {
        let event = QmpEvent {
            name,
            data: message.remove("data").unwrap_or(Value::Null),
            timestamp: message.get("timestamp").and_then(timestamp),
        };
        tracing::debug!(event = %event.name, "qmp event");
        // Err only means nobody subscribes right now.
        let _ = events.send(event);
        return;
    }
    let reply = if let Some(value) = message.remove("return") {
        Reply::Return(value)
    } else if let Some(error) = message.remove("error") {
        let field = |key: &str| {
            error
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        Reply::Error {
            class: field("class"),
            desc: field("desc"),
        }
    } else {
        tracing::warn!(line = %snippet(line), "ignoring unrecognised qmp message");
        return;
    };
    match message.get("id").and_then(Value::as_u64) {
        Some(id) => shared.complete(id, reply),
        // QEMU answers a request it could not parse without an id.
        None => tracing::warn!(line = %snippet(line), "dropping qmp reply without our id"),
    }
}

fn timestamp(value: &Value) -> Option<(i64, i64)> {
    Some((
        value.get("seconds")?.as_i64()?,
        value.get("microseconds")?.as_i64()?,
    ))
}

/// The start of a line, for logs.
fn snippet(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .trim_end()
        .chars()
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests;
