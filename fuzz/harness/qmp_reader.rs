//! The QMP client's handshake and reader against a scripted QEMU over an
//! in-memory stream, under paused (virtual) time.
//!
//! The input is what "QEMU" says, line by line, sent as is (the greeting,
//! events, garbage), except for three directives:
//! - `@R` answers the oldest command not yet answered with `{"return": …}`;
//! - `@E` answers it with `{"error": …}`;
//! - `@C` closes the connection.
//!
//! Lines that carry an `"id"` are dropped: only directives answer, so the
//! harness knows every reply that was sent.
//!
//! Properties: a reply that was sent reaches its caller, unchanged; a call
//! with no reply ends at its deadline, never later; events arrive as sent,
//! in order; nothing panics.

use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;
use uvmctl::virtstack::qemu::qmp::{Qmp, QmpError};

/// Deadline of each call; time is virtual, so it costs nothing to wait.
const DEADLINE: Duration = Duration::from_secs(5);

/// What the scripted QEMU answered, by request id.
#[derive(Debug, Clone, PartialEq)]
enum Sent {
    Return(Value),
    Error(String, String),
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
}

fn is_event(line: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(m)) => match m.get("event") {
            Some(Value::String(name)) => Some(name.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn carries_id(line: &[u8]) -> bool {
    matches!(serde_json::from_slice::<Value>(line), Ok(Value::Object(m)) if m.contains_key("id"))
}

/// Plays the script; records every reply it sent, by id, and every event.
async fn qemu(
    script: Vec<Vec<u8>>,
    stream: tokio::io::DuplexStream,
    replies: Arc<Mutex<Vec<(u64, Sent)>>>,
    events: Arc<Mutex<Vec<String>>>,
) {
    let (read, mut write) = tokio::io::split(stream);
    let mut requests = BufReader::new(read);
    let mut pending: VecDeque<u64> = VecDeque::new();
    let mut n = 0u64;
    for line in script {
        match line.as_slice() {
            b"@R" | b"@E" => {
                if pending.is_empty() {
                    let mut request = String::new();
                    match requests.read_line(&mut request).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let id = serde_json::from_str::<Value>(&request)
                        .ok()
                        .and_then(|r| r.get("id").and_then(Value::as_u64));
                    match id {
                        Some(id) => pending.push_back(id),
                        None => panic!("the client sent a request without an id: {request}"),
                    }
                }
                let Some(id) = pending.pop_front() else {
                    continue;
                };
                n += 1;
                let sent = if line == b"@R" {
                    Sent::Return(json!({"n": n}))
                } else {
                    Sent::Error("GenericError".into(), format!("refused {n}"))
                };
                let text = match &sent {
                    Sent::Return(v) => json!({"return": v, "id": id}),
                    Sent::Error(class, desc) => {
                        json!({"error": {"class": class, "desc": desc}, "id": id})
                    }
                };
                if write
                    .write_all(format!("{text}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                replies.lock().expect("lock").push((id, sent));
            }
            b"@C" => return,
            other => {
                if carries_id(other) {
                    continue;
                }
                if let Some(name) = is_event(other) {
                    events.lock().expect("lock").push(name);
                }
                let mut out = other.to_vec();
                out.push(b'\n');
                if write.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    }
    // The script is over: QEMU stays connected and silent.
    std::future::pending::<()>().await;
}

async fn run(script: Vec<Vec<u8>>) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let replies = Arc::new(Mutex::new(Vec::new()));
    let events = Arc::new(Mutex::new(Vec::new()));
    let answers = script.iter().filter(|l| *l == b"@R" || *l == b"@E").count();
    let peer = tokio::spawn(qemu(script, server, replies.clone(), events.clone()));

    let started = Instant::now();
    let outer = DEADLINE + Duration::from_secs(1);
    let shaken = tokio::time::timeout(outer, Qmp::handshake(client, DEADLINE))
        .await
        .expect("the handshake blocked past its deadline");
    assert!(
        started.elapsed() <= DEADLINE,
        "handshake took {:?}",
        started.elapsed()
    );
    let qmp = match shaken {
        Ok(q) => q,
        Err(_) => {
            peer.abort();
            return;
        }
    };
    let mut heard = qmp.subscribe();
    // As many calls as there are answers: when the handshake took one of
    // them, the last call has none and must end at its deadline.
    for i in 0..answers {
        let started = Instant::now();
        let out = tokio::time::timeout(
            outer,
            qmp.execute_with_timeout(&format!("c{i}"), None, DEADLINE),
        )
        .await
        .expect("a call blocked past its deadline");
        assert!(
            started.elapsed() <= DEADLINE,
            "a call took {:?}",
            started.elapsed()
        );
        // Ids count from 1, and the handshake's qmp_capabilities took 1.
        let id = u64::try_from(i).unwrap_or(u64::MAX) + 2;
        let sent: Option<Sent> = replies
            .lock()
            .expect("lock")
            .iter()
            .find(|(to, _)| *to == id)
            .map(|(_, s)| s.clone());
        match (out, sent) {
            (Ok(value), Some(Sent::Return(v))) => {
                assert_eq!(value, v, "call {i} got another reply")
            }
            (Err(QmpError::Command { class, desc, .. }), Some(Sent::Error(c, d))) => {
                assert_eq!((class, desc), (c, d), "call {i} got another error")
            }
            (Err(QmpError::Timeout { .. } | QmpError::Disconnected(_) | QmpError::Io(_)), None) => {
            }
            (out, sent) => panic!("call {i} (id {id}) ended with {out:?}, QEMU sent {sent:?}"),
        }
    }
    // Every reply that was sent was taken by its call.
    peer.abort();
    // Events arrive as sent, in order (the subscriber joined after the
    // handshake, so it may have missed the first ones).
    let mut got = Vec::new();
    while let Ok(e) = heard.try_recv() {
        got.push(e.name);
    }
    let all = events.lock().expect("lock").clone();
    let mut sent = all.iter();
    assert!(
        got.iter().all(|g| sent.any(|s| s == g)),
        "events {got:?} are not, in order, among those sent {all:?}"
    );
}

/// Checks the properties on one input; panics when one does not hold.
pub fn check(data: &[u8]) {
    let script: Vec<Vec<u8>> = data
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
        .collect();
    RUNTIME.with(|rt| rt.block_on(run(script)));
}
