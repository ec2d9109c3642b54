//! A Prometheus instant query over plain HTTP (`POST /api/v1/query`), the
//! one call a rollout gate makes. Bounded in time and size: the answer
//! comes from another host and decides what this one puts in force.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use std::time::Duration;

/// The most of an answer read (a gate's answer is a few samples).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Where Prometheus answers: `http://HOST[:PORT][/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrometheusUrl {
    /// Host name or address (IPv6 without its brackets).
    host: String,
    port: u16,
    /// A path prefix (Prometheus's `--web.route-prefix`), without a
    /// trailing `/`; empty for none.
    prefix: String,
}

impl std::fmt::Display for PrometheusUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}{}", self.host, self.port, self.prefix)
        } else {
            write!(f, "http://{}:{}{}", self.host, self.port, self.prefix)
        }
    }
}

impl std::str::FromStr for PrometheusUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!(
                "{url:?}: only http:// URLs (a Prometheus on the fleet's own network, or a local proxy in front of one)"
            ));
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{url:?}: a host, with no user or password"));
        }
        if path.contains(['?', '#']) || path.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!("{url:?}: a path prefix only, no query"));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("{url:?}: an IPv6 address in [...]"))?;
                if !after.is_empty() && !after.starts_with(':') {
                    return Err(format!("{url:?}: only a port may follow the address"));
                }
                (host, after.strip_prefix(':'))
            }
            None => match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("{url:?}: the port is not a number"))?,
            None => 80,
        };
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
        {
            return Err(format!("{url:?}: not a host name or address"));
        }
        Ok(PrometheusUrl {
            host: host.to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

/// Why a query got no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Nothing answered at the address, or the exchange broke.
    #[error("Prometheus at {url} unreachable: {why}")]
    Unreachable {
        /// Where.
        url: String,
        /// What failed.
        why: String,
    },
    /// No answer in time.
    #[error("Prometheus at {url} did not answer within {after:?}")]
    Timeout {
        /// Where.
        url: String,
        /// The bound.
        after: Duration,
    },
}

/// What Prometheus answered: the HTTP status and the body (bounded).
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status code.
    pub status: u16,
    /// The body.
    pub body: Bytes,
}

/// Percent-encodes a form value (everything but RFC 3986's unreserved set).
fn form_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl PrometheusUrl {
    /// Asks `query` as an instant query, within `timeout` (connecting
    /// included).
    ///
    /// # Errors
    /// When nothing answers in time; an answer of any status is returned.
    pub async fn query(&self, query: &str, timeout: Duration) -> Result<Answer, QueryError> {
        let url = self.to_string();
        match tokio::time::timeout(timeout, self.exchange(query)).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(why)) => Err(QueryError::Unreachable { url, why }),
            Err(_) => Err(QueryError::Timeout {
                url,
                after: timeout,
            }),
        }
    }

    async fn exchange(&self, query: &str) -> Result<Answer, String> {
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| e.to_string())?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        // The connection is driven beside the request, and ends with it
        // however the request ends (an error, the timeout dropping it).
        let driver = AbortOnDrop(tokio::spawn(conn));
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let request = hyper::Request::post(format!("{}/api/v1/query", self.prefix))
            .header(hyper::header::HOST, authority)
            .header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(hyper::header::USER_AGENT, "uvmctl")
            .body(Full::new(Bytes::from(format!(
                "query={}",
                form_value(query)
            ))))
            .map_err(|e| e.to_string())?;
        let response = send
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        drop(driver);
        Ok(Answer { status, body })
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_plain_http_to_a_host() {
        let u: PrometheusUrl = "http://10.0.0.1:9090".parse().expect("url");
        assert_eq!(u.to_string(), "http://10.0.0.1:9090");
        let u: PrometheusUrl = "http://prom.example/prometheus/".parse().expect("url");
        assert_eq!(u.to_string(), "http://prom.example:80/prometheus");
        let u: PrometheusUrl = "http://[::1]:9090".parse().expect("url");
        assert_eq!(u.to_string(), "http://[::1]:9090");
        for bad in [
            "https://prom:9090",
            "prom:9090",
            "http://",
            "http://user:pw@prom:9090",
            "http://prom:99999",
            "http://prom:9090/x?y=1",
            "http://pr om:9090",
            "http://[::1]junk",
        ] {
            assert!(bad.parse::<PrometheusUrl>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_query_is_encoded_as_a_form_value() {
        assert_eq!(
            form_value(r#"up{job="a b"} >= 1"#),
            "up%7Bjob%3D%22a%20b%22%7D%20%3E%3D%201"
        );
    }

    /// A query to a port nothing listens on is an error, not an answer.
    #[tokio::test]
    async fn nothing_listening_is_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let u: PrometheusUrl = format!("http://127.0.0.1:{port}").parse().expect("url");
        let err = u
            .query("up", Duration::from_secs(5))
            .await
            .expect_err("nothing listens");
        assert!(err.to_string().contains("unreachable"), "{err}");
    }

    /// What is sent, and what comes back, through a one-shot server.
    #[tokio::test]
    async fn an_answer_is_read_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("query=") {
                let n = s.read(&mut buf).await.expect("read");
                assert!(n > 0, "request ended early");
                got.extend_from_slice(&buf[..n]);
            }
            let body = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(reply.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&got).into_owned()
        });
        let u: PrometheusUrl = format!("http://127.0.0.1:{port}/p").parse().expect("url");
        let a = u
            .query("up == 1", Duration::from_secs(5))
            .await
            .expect("answer");
        assert_eq!(a.status, 200);
        assert!(a.body.starts_with(b"{\"status\":\"success\""));
        let request = server.await.expect("server");
        assert!(
            request.starts_with("POST /p/api/v1/query HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.ends_with("query=up%20%3D%3D%201"), "{request}");
    }
}
