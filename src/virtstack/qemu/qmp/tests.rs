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
