//! The gate of a rollout wave: a host of wave k puts a new revision in
//! force only when the fleet's own metrics say that every host of wave
//! k−1 has had it in force, settled and healthy, for the soak time.
//! Prometheus judges (it already scrapes every watcher), each host asks for
//! itself, and no answer, or one that cannot be read, keeps the gate
//! closed: there is no cluster layer to agree with, and nothing to guess.

use super::Revision;
use super::prometheus::PrometheusUrl;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The query a gate asks unless told otherwise (README.md, "Rollouts").
/// `$wave` is the wave before this host's, `$revision` the commit waiting,
/// `$soak` the soak time in seconds. It passes when as many hosts of that
/// wave have had the revision settled and healthy for the soak time as have
/// said they belong to the wave over the last day: a host of it that
/// stopped answering keeps the gate closed.
pub const DEFAULT_GATE_QUERY: &str = r#"count(max_over_time(uvmctl_rollout_wave{wave="$wave"}[1d])) == count(time() - uvmctl_rollout_healthy_since_timestamp_seconds{wave="$wave",revision="$revision"} >= $soak)"#;

/// The longest an answer shown in the status may be.
const MAX_SHOWN: usize = 300;

/// Asks whether a revision may be put in force on this host.
#[async_trait::async_trait]
pub trait Gate: Send + Sync + std::fmt::Debug {
    /// Whether `revision` may go in force now, and what was asked and
    /// answered.
    async fn ask(&self, revision: &Revision) -> GateStatus;

    /// This host's wave, and the wave whose gate it is.
    fn wave(&self) -> (u32, u32);
}

/// The last time the gate was asked, as `source.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GateStatus {
    /// This host's wave.
    pub wave: u32,
    /// The wave whose gate it is (the one before).
    pub waits_on: u32,
    /// The revision asked about.
    pub revision: Revision,
    /// It passed: the revision may go in force.
    pub open: bool,
    /// The query as sent.
    pub query: String,
    /// What it answered (its samples, or why there is no answer).
    pub answer: String,
    /// When it was asked (seconds since the Unix epoch).
    pub checked_at: u64,
}

/// A gate's settings (`watch --wave`, `--prometheus`, `--gate-query`,
/// `--soak`).
#[derive(Debug, Clone)]
pub struct GateOptions {
    /// This host's wave, 2 or more (wave 1 has no gate).
    pub wave: u32,
    /// Where the fleet's Prometheus answers.
    pub prometheus: PrometheusUrl,
    /// The query, with its `$wave`, `$revision` and `$soak`.
    pub query: String,
    /// How long the wave before must have been healthy.
    pub soak: Duration,
    /// The longest a query may take.
    pub timeout: Duration,
}

/// The query for `revision` at wave `waits_on`: its placeholders replaced
/// by values that are digits and hex digits only (nothing to escape).
pub fn render(template: &str, waits_on: u32, revision: &Revision, soak: Duration) -> String {
    template
        .replace("$wave", &waits_on.to_string())
        .replace("$revision", &revision.sha)
        .replace("$soak", &soak_seconds(soak).to_string())
}

/// The soak in whole seconds, rounded up: never shorter than asked.
fn soak_seconds(soak: Duration) -> u64 {
    soak.as_secs() + u64::from(soak.subsec_nanos() > 0)
}

/// Prometheus's answer document (`/api/v1/query`).
#[derive(Deserialize)]
struct Reply {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Vector(Vec<Sample>),
    Scalar((f64, String)),
    // Known only to be refused by name.
    Matrix(#[allow(dead_code)] serde::de::IgnoredAny),
    String(#[allow(dead_code)] serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct Sample {
    value: (f64, String),
}

/// Whether an answer opens the gate, and how to say it. It opens on an
/// HTTP 200 with a successful instant vector or scalar of at least one
/// sample, every one of them a number other than zero; anything else keeps
/// it closed.
pub fn judge(status: u16, body: &[u8]) -> (bool, String) {
    let reply: Reply = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                false,
                shown(&format!("HTTP {status}: not a Prometheus answer ({e})")),
            );
        }
    };
    if reply.status != "success" {
        return (
            false,
            shown(&format!(
                "HTTP {status}: {}: {}",
                reply.error_type.as_deref().unwrap_or("error"),
                reply.error.as_deref().unwrap_or("no reason given")
            )),
        );
    }
    let values: Vec<String> = match reply.data {
        Some(Data::Vector(samples)) => samples.into_iter().map(|s| s.value.1).collect(),
        Some(Data::Scalar((_, v))) => vec![v],
        Some(Data::Matrix(_) | Data::String(_)) | None => {
            return (
                false,
                "not an instant vector or a scalar: the gate's query must give one".into(),
            );
        }
    };
    if values.is_empty() {
        return (
            false,
            "no sample: the query's condition does not hold".into(),
        );
    }
    let open = values
        .iter()
        .all(|v| v.parse::<f64>().is_ok_and(|x| x != 0.0 && !x.is_nan()));
    let mut said = values
        .iter()
        .take(5)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if values.len() > 5 {
        said.push_str(&format!(", ... ({} samples)", values.len()));
    }
    if status != 200 {
        return (false, shown(&format!("HTTP {status}: {said}")));
    }
    (open, shown(&said))
}

/// Bounded, one line, no control characters: what another host said is
/// shown, never trusted to be tidy.
fn shown(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_SHOWN)
        .collect();
    if s.chars().count() > MAX_SHOWN {
        out.push('…');
    }
    out
}

/// The gate as a Prometheus query.
#[derive(Debug, Clone)]
pub struct PrometheusGate {
    opts: GateOptions,
}

impl PrometheusGate {
    /// A gate for wave `opts.wave`.
    pub fn new(opts: GateOptions) -> Self {
        PrometheusGate { opts }
    }
}

#[async_trait::async_trait]
impl Gate for PrometheusGate {
    fn wave(&self) -> (u32, u32) {
        (self.opts.wave, self.opts.wave.saturating_sub(1))
    }

    async fn ask(&self, revision: &Revision) -> GateStatus {
        let o = &self.opts;
        let waits_on = o.wave.saturating_sub(1);
        let query = render(&o.query, waits_on, revision, o.soak);
        let (open, answer) = match o.prometheus.query(&query, o.timeout).await {
            Ok(a) => judge(a.status, &a.body),
            Err(e) => (false, shown(&e.to_string())),
        };
        GateStatus {
            wave: o.wave,
            waits_on,
            revision: revision.clone(),
            open,
            query,
            answer,
            checked_at: super::now_unix(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev() -> Revision {
        Revision {
            reference: "main".into(),
            sha: "a".repeat(40),
        }
    }

    #[test]
    fn the_default_query_names_the_wave_before_the_revision_and_the_soak() {
        let q = render(DEFAULT_GATE_QUERY, 2, &rev(), Duration::from_secs(300));
        assert!(q.contains(r#"uvmctl_rollout_wave{wave="2"}"#), "{q}");
        assert!(
            q.contains(&format!(r#"revision="{}""#, "a".repeat(40))),
            "{q}"
        );
        assert!(q.ends_with(">= 300)"), "{q}");
        assert!(!q.contains('$'), "{q}");
        let q = render("$soak", 1, &rev(), Duration::from_millis(1500));
        assert_eq!(q, "2", "rounded up");
        assert_eq!(render("$soak", 1, &rev(), Duration::ZERO), "0");
    }

    #[test]
    fn only_samples_all_non_zero_open_the_gate() {
        let vector = |values: &str| {
            format!(
                r#"{{"status":"success","data":{{"resultType":"vector","result":[{values}]}}}}"#
            )
        };
        let sample = |v: &str| format!(r#"{{"metric":{{}},"value":[1700000000.5,"{v}"]}}"#);
        let open = judge(200, vector(&sample("3")).as_bytes());
        assert_eq!(open, (true, "3".to_string()));
        let (shut, said) = judge(200, vector("").as_bytes());
        assert!(!shut);
        assert!(said.starts_with("no sample"), "{said}");
        let two = format!("{},{}", sample("1"), sample("0"));
        assert!(!judge(200, vector(&two).as_bytes()).0, "one zero closes it");
        assert!(!judge(200, vector(&sample("NaN")).as_bytes()).0);
        let (shut, said) = judge(503, vector(&sample("1")).as_bytes());
        assert!(!shut, "only a 200 opens it");
        assert_eq!(said, "HTTP 503: 1");
        assert!(
            judge(
                200,
                br#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"1"]}}"#
            )
            .0
        );
        let (shut, said) = judge(
            400,
            br#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#,
        );
        assert!(!shut);
        assert_eq!(said, "HTTP 400: bad_data: parse error at char 3");
        let (shut, said) = judge(502, b"<html>\n\x1b[31mbad gateway</html>");
        assert!(!shut);
        assert!(
            said.starts_with("HTTP 502: not a Prometheus answer"),
            "{said}"
        );
        assert!(!said.contains(['\n', '\x1b']), "{said}");
        assert!(
            !judge(
                200,
                br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#
            )
            .0
        );
    }

    /// Prometheus unreachable: closed, and the status says why.
    #[tokio::test]
    async fn an_unreachable_prometheus_keeps_the_gate_closed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let gate = PrometheusGate::new(GateOptions {
            wave: 3,
            prometheus: format!("http://127.0.0.1:{port}").parse().expect("url"),
            query: DEFAULT_GATE_QUERY.into(),
            soak: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
        });
        let s = gate.ask(&rev()).await;
        assert!(!s.open);
        assert_eq!((s.wave, s.waits_on), (3, 2));
        assert!(s.answer.contains("unreachable"), "{}", s.answer);
        assert!(s.query.contains(r#"wave="2""#));
    }
}
