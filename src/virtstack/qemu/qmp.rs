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
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::{IoSliceMut, Read, Write};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf as DuplexWriteHalf};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u6"}, "capabilities": ["oob"]}}"#;
    const SECOND: Duration = Duration::from_secs(1);

    /// The QEMU end of a duplex stream, driven line by line by each test.
    struct FakeQemu {
        lines: BufReader<ReadHalf<DuplexStream>>,
        out: DuplexWriteHalf<DuplexStream>,
    }

    impl FakeQemu {
        fn new(stream: DuplexStream) -> Self {
            let (read, out) = tokio::io::split(stream);
            FakeQemu {
                lines: BufReader::new(read),
                out,
            }
        }

        async fn send_raw(&mut self, bytes: &[u8]) {
            self.out.write_all(bytes).await.unwrap();
        }

        /// QEMU ends its lines with CRLF.
        async fn send(&mut self, line: &str) {
            self.send_raw(format!("{line}\r\n").as_bytes()).await;
        }

        async fn recv_or_eof(&mut self) -> Option<Value> {
            let mut line = String::new();
            match self.lines.read_line(&mut line).await.unwrap() {
                0 => None,
                _ => Some(serde_json::from_str(&line).unwrap()),
            }
        }

        async fn recv(&mut self) -> Value {
            self.recv_or_eof()
                .await
                .expect("a request, not end of stream")
        }

        /// Receives a request for `command` and returns its id.
        async fn expect(&mut self, command: &str) -> Value {
            let request = self.recv().await;
            assert_eq!(request["execute"], command, "request {request}");
            request["id"].clone()
        }

        async fn reply(&mut self, id: &Value, value: Value) {
            self.send(&json!({ "return": value, "id": id }).to_string())
                .await;
        }

        async fn event(&mut self, name: &str, data: Value) {
            let event = json!({
                "event": name,
                "data": data,
                "timestamp": { "seconds": 1_764_000_000, "microseconds": 123_456 },
            });
            self.send(&event.to_string()).await;
        }

        async fn negotiate(&mut self) {
            self.send(GREETING).await;
            let id = self.expect("qmp_capabilities").await;
            self.reply(&id, json!({})).await;
        }
    }

    async fn connected() -> (Qmp, FakeQemu) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut qemu = FakeQemu::new(server);
        let (qmp, ()) = tokio::join!(Qmp::handshake(client, 5 * SECOND), qemu.negotiate());
        (qmp.unwrap(), qemu)
    }

    fn pending_calls(qmp: &Qmp) -> usize {
        qmp.inner.shared.lock().pending.len()
    }

    #[tokio::test]
    async fn handshake_reads_the_greeting_and_negotiates_capabilities() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut qemu = FakeQemu::new(server);
        let peer = async {
            qemu.send(GREETING).await;
            let request = qemu.recv().await;
            assert_eq!(request["execute"], "qmp_capabilities");
            assert!(
                request.get("arguments").is_none(),
                "no arguments: {request}"
            );
            assert!(request["id"].is_u64(), "numeric id: {request}");
            qemu.reply(&request["id"], json!({})).await;
        };
        let (qmp, ()) = tokio::join!(Qmp::handshake(client, 5 * SECOND), peer);
        let qmp = qmp.unwrap();
        assert_eq!(qmp.version(), Some((7, 2, 0)));
    }

    #[tokio::test]
    async fn greeting_without_a_version_still_connects() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut qemu = FakeQemu::new(server);
        let peer = async {
            qemu.send(r#"{"QMP": {"capabilities": [], "from-the-future": true}}"#)
                .await;
            let id = qemu.expect("qmp_capabilities").await;
            qemu.reply(&id, json!({})).await;
        };
        let (qmp, ()) = tokio::join!(Qmp::handshake(client, 5 * SECOND), peer);
        assert_eq!(qmp.unwrap().version(), None);
    }

    #[tokio::test]
    async fn a_peer_that_is_not_qmp_is_refused() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut qemu = FakeQemu::new(server);
        let (qmp, ()) = tokio::join!(
            Qmp::handshake(client, 5 * SECOND),
            qemu.send(r#"{"hello": 1}"#)
        );
        assert!(matches!(qmp, Err(QmpError::Greeting(_))), "{qmp:?}");

        let (client, server) = tokio::io::duplex(1 << 16);
        let mut qemu = FakeQemu::new(server);
        let (qmp, ()) = tokio::join!(
            Qmp::handshake(client, 5 * SECOND),
            qemu.send("SSH-2.0-OpenSSH")
        );
        assert!(matches!(qmp, Err(QmpError::Json(_))), "{qmp:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_greeting_times_out_with_a_hint() {
        // As when another client holds the socket: QEMU accepts but stays silent.
        let (client, _server) = tokio::io::duplex(1 << 16);
        let error = Qmp::handshake(client, 3 * SECOND).await.unwrap_err();
        assert!(matches!(error, QmpError::Greeting(_)), "{error:?}");
        assert!(
            error.to_string().contains("one client at a time"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn connect_names_the_socket_when_nothing_listens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let error = Qmp::connect(&path, SECOND).await.unwrap_err();
        assert!(matches!(error, QmpError::Connect { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains("qmp.sock") && message.contains("is qemu running?"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn replies_are_matched_by_id_when_out_of_order() {
        let (qmp, mut qemu) = connected().await;
        // From two tasks, which also proves the futures are Send + 'static.
        let first = tokio::spawn({
            let qmp = qmp.clone();
            async move { qmp.execute("query-status", None).await }
        });
        let second = tokio::spawn({
            let qmp = qmp.clone();
            async move { qmp.execute("query-name", Some(json!({}))).await }
        });
        let a = qemu.recv().await;
        let b = qemu.recv().await;
        assert_ne!(a["id"], b["id"]);
        for request in [&b, &a] {
            qemu.reply(&request["id"], json!({ "echo": request["execute"] }))
                .await;
        }
        assert_eq!(
            first.await.unwrap().unwrap(),
            json!({ "echo": "query-status" })
        );
        assert_eq!(
            second.await.unwrap().unwrap(),
            json!({ "echo": "query-name" })
        );
        assert_eq!(pending_calls(&qmp), 0);
    }

    #[tokio::test]
    async fn unknown_events_interleaved_with_replies_reach_subscribers() {
        let (qmp, mut qemu) = connected().await;
        let mut events = qmp.subscribe();
        let peer = async {
            let id = qemu.expect("query-status").await;
            qemu.event(
                "MEM_UNPLUG_ERROR",
                json!({ "device": "dimm1", "msg": "nope" }),
            )
            .await;
            qemu.event(
                "RDMA_GID_STATUS_CHANGED",
                json!({ "netdev": "rdma0", "gid-status": true }),
            )
            .await;
            qemu.reply(&id, json!({ "status": "running", "running": true }))
                .await;
            qemu.send(r#"{"event": "SOMETHING_FROM_QEMU_11", "data": {"nested": [{"x": null}]}, "timestamp": {"seconds": 1, "microseconds": 2}, "new-field": 3}"#).await;
            qemu.send(r#"{"event": "STOP", "timestamp": {"seconds": "soon"}}"#)
                .await;
        };
        let (status, ()) = tokio::join!(qmp.execute("query-status", None), peer);
        assert_eq!(status.unwrap()["status"], "running");

        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(
                tokio::time::timeout(5 * SECOND, events.recv())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        let names: Vec<&str> = got.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "MEM_UNPLUG_ERROR",
                "RDMA_GID_STATUS_CHANGED",
                "SOMETHING_FROM_QEMU_11",
                "STOP"
            ]
        );
        assert_eq!(got[0].data["device"], "dimm1");
        assert_eq!(got[0].timestamp, Some((1_764_000_000, 123_456)));
        assert_eq!(got[2].data, json!({ "nested": [{ "x": null }] }));
        assert_eq!(got[2].timestamp, Some((1, 2)));
        assert_eq!(got[3].data, Value::Null, "an event without data");
        assert_eq!(
            got[3].timestamp, None,
            "a malformed timestamp is dropped, not fatal"
        );
        // Still usable.
        let peer = async {
            let id = qemu.expect("query-name").await;
            qemu.reply(&id, json!({})).await;
        };
        let (name, ()) = tokio::join!(qmp.execute("query-name", None), peer);
        assert_eq!(name.unwrap(), json!({}));
    }

    #[tokio::test]
    async fn replies_with_unknown_fields_are_accepted() {
        let (qmp, mut qemu) = connected().await;
        let peer = async {
            let id = qemu.expect("query-status").await;
            let reply = json!({
                "return": { "status": "paused", "running": false, "singlestep": false, "field-of-qemu-12": [1, 2] },
                "id": id,
                "extra": { "x": 1 },
            });
            qemu.send(&reply.to_string()).await;
        };
        let (status, ()) = tokio::join!(qmp.execute("query-status", None), peer);
        let status = status.unwrap();
        assert_eq!(status["status"], "paused");
        assert_eq!(status["field-of-qemu-12"], json!([1, 2]));
    }

    #[tokio::test]
    async fn an_error_reply_becomes_a_command_error() {
        let (qmp, mut qemu) = connected().await;
        let peer = async {
            let request = qemu.recv().await;
            assert_eq!(request["arguments"], json!({ "id": "nic9" }));
            let reply = json!({
                "error": { "class": "DeviceNotFound", "desc": "Device 'nic9' not found", "hint": "new" },
                "id": request["id"],
            });
            qemu.send(&reply.to_string()).await;
        };
        let (result, ()) = tokio::join!(
            qmp.execute("device_del", Some(json!({ "id": "nic9" }))),
            peer
        );
        let error = result.unwrap_err();
        match &error {
            QmpError::Command {
                command,
                class,
                desc,
            } => {
                assert_eq!(
                    (command.as_str(), class.as_str()),
                    ("device_del", "DeviceNotFound")
                );
                assert_eq!(desc, "Device 'nic9' not found");
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        assert_eq!(
            error.to_string(),
            "qmp device_del failed: DeviceNotFound: Device 'nic9' not found"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_without_reply_times_out_and_the_next_command_works() {
        let (qmp, mut qemu) = connected().await;
        let (result, late) = tokio::join!(
            qmp.execute_with_timeout("query-migrate", None, 2 * SECOND),
            qemu.expect("query-migrate"),
        );
        match result {
            Err(QmpError::Timeout { command, after }) => {
                assert_eq!((command.as_str(), after), ("query-migrate", 2 * SECOND));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(pending_calls(&qmp), 0, "the timed-out call left no entry");

        let peer = async {
            // The late reply has an id nobody waits for any more: dropped.
            qemu.reply(&late, json!({ "status": "late" })).await;
            let id = qemu.expect("query-status").await;
            qemu.reply(&id, json!({ "status": "running" })).await;
        };
        let (status, ()) = tokio::join!(qmp.execute("query-status", None), peer);
        assert_eq!(status.unwrap(), json!({ "status": "running" }));
    }

    #[tokio::test]
    async fn a_disconnect_fails_pending_and_later_calls() {
        let (qmp, mut qemu) = connected().await;
        let mut events = qmp.subscribe();
        let peer = async move {
            qemu.expect("query-status").await;
            drop(qemu);
        };
        let (result, ()) = tokio::join!(qmp.execute("query-status", None), peer);
        let error = result.unwrap_err();
        assert!(
            matches!(&error, QmpError::Disconnected(why) if why.contains("closed")),
            "{error:?}"
        );

        let later = qmp.execute("query-status", None).await;
        assert!(matches!(later, Err(QmpError::Disconnected(_))), "{later:?}");
        let waited = qmp.wait_event(&mut events, 5 * SECOND, |_| true).await;
        assert!(
            matches!(waited, Err(QmpError::Disconnected(_))),
            "{waited:?}"
        );
        let waited = qmp
            .wait_event(&mut qmp.subscribe(), 5 * SECOND, |_| true)
            .await;
        assert!(
            matches!(waited, Err(QmpError::Disconnected(_))),
            "{waited:?}"
        );
        assert_eq!(pending_calls(&qmp), 0);
    }

    #[tokio::test]
    async fn malformed_lines_are_skipped() {
        let (qmp, mut qemu) = connected().await;
        let peer = async {
            let id = qemu.expect("query-status").await;
            qemu.send(r#"{"return": {"status": "#).await;
            qemu.send("not json at all").await;
            qemu.send("[1, 2, 3]").await;
            qemu.send("").await;
            qemu.send_raw(b"\xff\xfe{\"return\"\n").await;
            qemu.send(r#"{"return": {}}"#).await; // no id
            qemu.send(r#"{"id": 1, "neither": "return nor error"}"#)
                .await;
            qemu.reply(&id, json!({ "status": "running" })).await;
        };
        let (status, ()) = tokio::join!(qmp.execute("query-status", None), peer);
        assert_eq!(status.unwrap()["status"], "running");
    }

    #[tokio::test]
    async fn wait_event_returns_the_first_event_matching_the_predicate() {
        let (qmp, mut qemu) = connected().await;
        // Subscribe before the command whose event we wait for.
        let mut events = qmp.subscribe();
        let peer = async {
            let id = qemu.expect("device_del").await;
            qemu.reply(&id, json!({})).await;
            qemu.event(
                "DEVICE_DELETED",
                json!({ "path": "/machine/peripheral/disk0/virtio-backend" }),
            )
            .await;
            qemu.event(
                "DEVICE_DELETED",
                json!({ "device": "nic1", "path": "/machine/peripheral/nic1" }),
            )
            .await;
            qemu.event(
                "DEVICE_DELETED",
                json!({ "device": "nic0", "path": "/machine/peripheral/nic0" }),
            )
            .await;
        };
        let (deleted, ()) = tokio::join!(
            qmp.execute("device_del", Some(json!({ "id": "nic0" }))),
            peer
        );
        deleted.unwrap();
        let event = qmp
            .wait_event(&mut events, 5 * SECOND, |e| {
                e.name == "DEVICE_DELETED" && e.data["device"] == "nic0"
            })
            .await
            .unwrap();
        assert_eq!(event.data["path"], "/machine/peripheral/nic0");
    }

    #[tokio::test(start_paused = true)]
    async fn wait_event_times_out_when_nothing_matches() {
        let (qmp, mut qemu) = connected().await;
        let mut events = qmp.subscribe();
        qemu.event("RESUME", Value::Null).await;
        let waited = qmp
            .wait_event(&mut events, 3 * SECOND, |e| e.name == "SHUTDOWN")
            .await;
        match waited {
            Err(QmpError::Timeout { after, .. }) => assert_eq!(after, 3 * SECOND),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn dropping_the_last_clone_stops_the_reader_and_closes_the_socket() {
        let (qmp, mut qemu) = connected().await;
        let mut events = qmp.subscribe();
        let clone = qmp.clone();
        drop(qmp);
        let peer = async {
            let id = qemu.expect("query-status").await;
            qemu.reply(&id, json!({})).await;
        };
        let (status, ()) = tokio::join!(clone.execute("query-status", None), peer);
        status.unwrap();
        drop(clone);
        let closed = tokio::time::timeout(5 * SECOND, events.recv())
            .await
            .unwrap();
        assert!(matches!(closed, Err(RecvError::Closed)), "{closed:?}");
        let eof = tokio::time::timeout(5 * SECOND, qemu.recv_or_eof())
            .await
            .unwrap();
        assert_eq!(eof, None);
    }

    #[tokio::test]
    async fn a_thousand_sequential_query_status_round_trips_complete() {
        let (qmp, mut qemu) = connected().await;
        let peer = tokio::spawn(async move {
            let mut served = 0;
            while let Some(request) = qemu.recv_or_eof().await {
                let status = json!({ "status": "running", "singlestep": false, "running": true });
                qemu.reply(&request["id"], status).await;
                served += 1;
            }
            served
        });
        for _ in 0..1000 {
            let status = qmp.execute("query-status", None).await.unwrap();
            assert_eq!(status["running"], true);
        }
        drop(qmp);
        assert_eq!(peer.await.unwrap(), 1000);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_loses_old_events_without_blocking_replies() {
        let (qmp, mut qemu) = connected().await;
        let mut events = qmp.subscribe();
        let peer = async {
            let id = qemu.expect("query-status").await;
            for n in 0..EVENT_CAPACITY + 44 {
                qemu.event(&format!("E{n}"), json!({ "n": n })).await;
            }
            qemu.reply(&id, json!({ "status": "running" })).await;
        };
        let (status, ()) = tokio::join!(qmp.execute("query-status", None), peer);
        assert_eq!(status.unwrap()["status"], "running");
        assert!(matches!(events.recv().await, Err(RecvError::Lagged(44))));
        let last = format!("E{}", EVENT_CAPACITY + 43);
        let event = qmp
            .wait_event(&mut events, 5 * SECOND, |e| e.name == last)
            .await;
        assert_eq!(event.unwrap().data["n"], EVENT_CAPACITY + 43);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_cut_off_mid_write_fails_later_calls_instead_of_garbling_them() {
        // A 16-byte pipe that QEMU stops reading: the write stalls part way.
        let (client, server) = tokio::io::duplex(16);
        let mut qemu = FakeQemu::new(server);
        let (qmp, ()) = tokio::join!(Qmp::handshake(client, 5 * SECOND), qemu.negotiate());
        let qmp = qmp.unwrap();
        let big = json!({ "id": "x".repeat(1000) });
        let result = qmp
            .execute_with_timeout("device_add", Some(big), SECOND)
            .await;
        assert!(
            matches!(result, Err(QmpError::Timeout { .. })),
            "{result:?}"
        );
        let later = qmp.execute("query-status", None).await;
        assert!(
            matches!(&later, Err(QmpError::Disconnected(why)) if why.contains("out of sync")),
            "{later:?}"
        );
    }

    #[tokio::test]
    async fn send_fd_over_a_plain_stream_is_unsupported() {
        let (qmp, _qemu) = connected().await;
        let (mine, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let result = qmp.send_fd("migration", mine.as_fd()).await;
        assert!(
            matches!(result, Err(QmpError::FdPassingUnsupported)),
            "{result:?}"
        );
        assert_eq!(pending_calls(&qmp), 0);
    }

    /// Reads lines from a blocking unix socket with `recvmsg`, collecting any
    /// fds that arrive (a plain `read` would discard them).
    struct FdLines {
        stream: std::os::unix::net::UnixStream,
        buf: Vec<u8>,
        fds: Vec<OwnedFd>,
    }

    impl FdLines {
        /// The next line and the fds received while reading it.
        fn next(&mut self) -> (Value, Vec<OwnedFd>) {
            while !self.buf.contains(&b'\n') {
                let mut bytes = [0u8; 4096];
                let mut iov = [IoSliceMut::new(&mut bytes)];
                let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
                let msg = nix::sys::socket::recvmsg::<()>(
                    self.stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .unwrap();
                assert!(msg.bytes > 0, "the client hung up");
                let n = msg.bytes;
                for cmsg in msg.cmsgs().unwrap() {
                    if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = cmsg {
                        // SAFETY: the kernel just installed these fds in our
                        // table for us, and nothing else owns them.
                        self.fds.extend(
                            fds.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                self.buf.extend_from_slice(&bytes[..n]);
            }
            let end = self.buf.iter().position(|&b| b == b'\n').unwrap();
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            (
                serde_json::from_slice(&line).unwrap(),
                std::mem::take(&mut self.fds),
            )
        }
    }

    #[tokio::test]
    async fn send_fd_passes_the_descriptor_with_getfd_over_the_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();

        // A fake QEMU on a blocking thread: recvmsg is simplest there.
        let qemu = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let stream = stream.into_std().unwrap();
            stream.set_nonblocking(false).unwrap();
            stream.set_read_timeout(Some(10 * SECOND)).unwrap();
            tokio::task::spawn_blocking(move || {
                let mut out = stream.try_clone().unwrap();
                let mut lines = FdLines {
                    stream,
                    buf: Vec::new(),
                    fds: Vec::new(),
                };
                writeln!(out, "{GREETING}").unwrap();
                let (caps, fds) = lines.next();
                assert_eq!(caps["execute"], "qmp_capabilities");
                assert!(fds.is_empty());
                writeln!(out, "{}", json!({ "return": {}, "id": caps["id"] })).unwrap();

                let (getfd, mut fds) = lines.next();
                assert_eq!(fds.len(), 1, "exactly one fd with {getfd}");
                // Prove it is the caller's socket: write through it.
                let mut passed = std::os::unix::net::UnixStream::from(fds.remove(0));
                passed.write_all(b"hello from qemu").unwrap();
                writeln!(out, "{}", json!({ "return": {}, "id": getfd["id"] })).unwrap();
                getfd
            })
            .await
            .unwrap()
        });

        let qmp = Qmp::connect(&path, 5 * SECOND).await.unwrap();
        assert_eq!(qmp.version(), Some((7, 2, 0)));
        let (mut mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        qmp.send_fd("migration", theirs.as_fd()).await.unwrap();
        drop(theirs);

        let getfd = qemu.await.unwrap();
        assert_eq!(getfd["execute"], "getfd");
        assert_eq!(getfd["arguments"], json!({ "fdname": "migration" }));
        assert!(getfd["id"].is_u64());
        mine.set_read_timeout(Some(10 * SECOND)).unwrap();
        let mut received = [0u8; 15];
        mine.read_exact(&mut received).unwrap();
        assert_eq!(&received, b"hello from qemu");
    }
}
