//! A small client for Prometheus's query API: instant queries (`GET /api/v1/query`) and, for
//! the per-interval series of the Mann–Whitney judge, range queries (`GET /api/v1/query_range`).
//!
//! Every query names its evaluation `time` (or its range's `start`, `end` and `step`)
//! explicitly, so a rollout's stable and canary readings (and a replay of them) refer to the
//! same instant. Connection failures, timeouts and
//! 5xx answers are retried a bounded number of times with exponential backoff; a query that
//! Prometheus rejects is never retried, because asking again gives the same answer.

use super::error::SourceError;
use crate::policy::{PrometheusAuth, PrometheusConfig};
use crate::time::Time;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Answers larger than this are refused, so that a raw query selecting every series of a big
/// Prometheus cannot exhaust the daemon's memory.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// How much of an unexpected answer's body is quoted in an error message.
const QUOTE_BYTES: usize = 300;

/// Credentials sent with every query to the daemon's default Prometheus (a policy's own
/// Prometheus has its own, [`PrometheusAuth`]).
#[derive(Clone, PartialEq)]
pub enum Auth {
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// HTTP basic authentication.
    Basic {
        user: String,
        password: Option<String>,
    },
}

impl Auth {
    fn credentials(&self) -> Credentials<'_> {
        match self {
            Auth::Bearer(token) => Credentials::Bearer(token),
            Auth::Basic { user, password } => Credentials::Basic(user, password.as_deref()),
        }
    }
}

/// The credentials one request carries, borrowed from the daemon's [`Auth`] or a policy's
/// [`PrometheusAuth`].
enum Credentials<'a> {
    Bearer(&'a str),
    Basic(&'a str, Option<&'a str>),
}

impl<'a> From<&'a PrometheusAuth> for Credentials<'a> {
    fn from(a: &'a PrometheusAuth) -> Self {
        match a {
            PrometheusAuth::Bearer { token, .. } => Credentials::Bearer(token.expose()),
            PrometheusAuth::Basic {
                username, password, ..
            } => Credentials::Basic(username, Some(password.expose())),
        }
    }
}

// Credentials never appear in logs or debug output.
impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Auth::Basic { user, .. } => write!(f, "Basic({user}, <redacted>)"),
        }
    }
}

/// How the client talks to Prometheus.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientOptions {
    /// The longest one attempt may take, connection included. Prometheus is also asked to give
    /// up evaluating after this long, so an expensive query does not keep running there.
    pub timeout: Duration,
    /// Further attempts after a connection failure, timeout or 5xx answer.
    pub retries: u32,
    /// The wait before the first retry; it doubles for each further one.
    pub backoff: Duration,
    /// Credentials for the default Prometheus (see [`PrometheusClient::new`]).
    pub auth: Option<Auth>,
    /// A PEM file of extra CA certificates to trust, for a Prometheus behind a private CA.
    pub ca_file: Option<PathBuf>,
}

impl Default for ClientOptions {
    /// At most 3 attempts of 10 s with 0.5 s and 1 s between them: about 32 s in the worst
    /// case. An observation pays that at most once when Prometheus is down (see `observe.rs`),
    /// so an analysis interval of 30 s or more is delayed by about one interval at worst.
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(10),
            retries: 2,
            backoff: Duration::from_millis(500),
            auth: None,
            ca_file: None,
        }
    }
}

/// One series of an instant vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    /// May be NaN or infinite: Prometheus sends what the expression computed.
    pub value: f64,
}

/// What an instant query returned.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Scalar(f64),
    Vector(Vec<Series>),
}

/// One series of a range query's answer (a matrix): its value at each evaluation time.
#[derive(Clone, Debug, PartialEq)]
pub struct RangeSeries {
    pub labels: BTreeMap<String, String>,
    /// Evaluation time and value, in Prometheus's (ascending) order. Values may be NaN or
    /// infinite; a time at which the expression had no value is absent.
    pub points: Vec<(Time, f64)>,
}

/// The outcome of one query with what it cost, for the daemon's own metrics.
#[derive(Debug)]
pub struct Asked<T = Answer> {
    pub result: Result<T, SourceError>,
    /// HTTP attempts made, retries included.
    pub attempts: u32,
    /// Wall time of all attempts and the waits between them.
    pub elapsed: Duration,
}

/// A Prometheus query client; cheap to clone, one per daemon.
#[derive(Clone, Debug)]
pub struct PrometheusClient {
    http: reqwest::Client,
    /// The daemon's default Prometheus, without a trailing slash.
    default_url: String,
    options: ClientOptions,
}

impl PrometheusClient {
    /// A client whose default Prometheus is `default_url`.
    ///
    /// Credentials in `options.auth` go only to the default Prometheus's origin (scheme, host
    /// and port): a policy that names another Prometheus must not receive the daemon's token.
    pub fn new(default_url: &str, options: ClientOptions) -> Result<Self, SourceError> {
        let mut builder = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout)
            .user_agent(crate::USER_AGENT);
        if let Some(path) = &options.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                SourceError::Config(format!("cannot read ca file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                SourceError::Config(format!(
                    "ca file {} holds no PEM certificates: {e}",
                    path.display()
                ))
            })?;
            if certs.is_empty() {
                return Err(SourceError::Config(format!(
                    "ca file {} holds no PEM certificates",
                    path.display()
                )));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| SourceError::Config(error_chain(&e)))?;
        Ok(PrometheusClient {
            http,
            default_url: trim_url(default_url),
            options,
        })
    }

    /// The daemon's default Prometheus.
    pub fn default_url(&self) -> &str {
        &self.default_url
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Whether the Prometheus a policy reads (`own`, or the default) answers a trivial query
    /// within [`PROBE_TIMEOUT`], once: tells one slow query from a Prometheus that is down or
    /// hung, after which every other query would wait out its timeout too.
    pub async fn answers(&self, own: Option<&PrometheusConfig>) -> bool {
        let base = own.map_or_else(|| self.default_url.clone(), |p| trim_url(&p.url));
        let credentials = self.credentials(&base, own.and_then(|p| p.auth.as_ref()));
        let mut req = self
            .http
            .get(format!("{base}/api/v1/query"))
            .query(&[("query", "vector(1)")])
            .timeout(PROBE_TIMEOUT.min(self.options.timeout));
        req = match credentials {
            Some(Credentials::Bearer(token)) => req.bearer_auth(token),
            Some(Credentials::Basic(user, password)) => req.basic_auth(user, password.as_ref()),
            None => req,
        };
        matches!(req.send().await, Ok(r) if r.status().is_success())
    }

    /// Evaluates `promql` at `at` on a policy's own Prometheus, with its credentials, or on
    /// the default one when `None`; retries transient failures.
    pub async fn query(&self, own: Option<&PrometheusConfig>, promql: &str, at: Time) -> Asked {
        let time = seconds(at);
        let params = [("query", promql), ("time", time.as_str())];
        self.send(own, "query", &params, |url, status, body| {
            parse_answer(url, status, body, promql)
        })
        .await
    }

    /// Evaluates `promql` at `start`, `start + step`, ... up to `end` on a policy's own
    /// Prometheus or the default one, as [`query`](Self::query) does. Prometheus refuses
    /// more than 11,000 evaluation times per query; the caller chooses a step that respects it.
    pub async fn query_range(
        &self,
        own: Option<&PrometheusConfig>,
        promql: &str,
        start: Time,
        end: Time,
        step: Duration,
    ) -> Asked<Vec<RangeSeries>> {
        let (start, end) = (seconds(start), seconds(end));
        let step = format!("{:.3}", step.as_secs_f64());
        let params = [
            ("query", promql),
            ("start", start.as_str()),
            ("end", end.as_str()),
            ("step", step.as_str()),
        ];
        self.send(own, "query_range", &params, |url, status, body| {
            parse_matrix(url, status, body, promql)
        })
        .await
    }

    /// Sends `params` to `/api/v1/{endpoint}` and reads the answer with `parse`, retrying
    /// transient failures (of the transport, or a 5xx answer) with exponential backoff.
    async fn send<T>(
        &self,
        own: Option<&PrometheusConfig>,
        endpoint: &str,
        params: &[(&str, &str)],
        parse: impl Fn(&str, u16, &[u8]) -> Result<T, SourceError>,
    ) -> Asked<T> {
        let base = own.map_or_else(|| self.default_url.clone(), |p| trim_url(&p.url));
        let credentials = self.credentials(&base, own.and_then(|p| p.auth.as_ref()));
        let started = tokio::time::Instant::now();
        let mut attempts = 0;
        let mut wait = self.options.backoff;
        let result = loop {
            attempts += 1;
            let result = self
                .attempt(&base, endpoint, params, credentials.as_ref())
                .await
                .and_then(|(status, body)| parse(&base, status, &body));
            match result {
                Err(e) if e.is_transient() && attempts <= self.options.retries => {
                    tracing::debug!(url = %base, error = %e, attempts, "retrying prometheus query");
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                }
                other => break other,
            }
        };
        Asked {
            result,
            attempts,
            elapsed: started.elapsed(),
        }
    }

    /// What a request to `base` carries: a policy's own credentials (`own`, which belong to
    /// `base`), else the daemon's when `base` is the default Prometheus's origin, else none.
    /// Reqwest drops the header if Prometheus redirects to another origin.
    fn credentials<'a>(
        &'a self,
        base: &str,
        own: Option<&'a PrometheusAuth>,
    ) -> Option<Credentials<'a>> {
        match own {
            Some(a) => Some(a.into()),
            None => self
                .options
                .auth
                .as_ref()
                .filter(|_| same_origin(base, &self.default_url))
                .map(Auth::credentials),
        }
    }

    /// One HTTP request: the answer's status and body (at most [`MAX_ANSWER_BYTES`]).
    async fn attempt(
        &self,
        base: &str,
        endpoint: &str,
        params: &[(&str, &str)],
        credentials: Option<&Credentials<'_>>,
    ) -> Result<(u16, Vec<u8>), SourceError> {
        let url = format!("{base}/api/v1/{endpoint}");
        let timeout = format!("{}ms", self.options.timeout.as_millis().max(1));
        let mut req = self
            .http
            .get(&url)
            .query(params)
            .query(&[("timeout", &timeout)]);
        req = match credentials {
            Some(Credentials::Bearer(token)) => req.bearer_auth(token),
            Some(Credentials::Basic(user, password)) => req.basic_auth(user, password.as_ref()),
            None => req,
        };
        let transport = |e: reqwest::Error| self.transport_error(base, e);
        let mut resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(SourceError::BadResponse {
                    url: base.to_owned(),
                    reason: format!("answer larger than {MAX_ANSWER_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body))
    }

    fn transport_error(&self, base: &str, e: reqwest::Error) -> SourceError {
        if e.is_timeout() {
            SourceError::Timeout {
                url: base.to_owned(),
                timeout: self.options.timeout,
            }
        } else {
            // The URL is already in the message, and its query string is long.
            SourceError::Unreachable {
                url: base.to_owned(),
                reason: error_chain(&e.without_url()),
            }
        }
    }
}

/// A time as the query API takes it: Unix seconds with milliseconds.
fn seconds(t: Time) -> String {
    format!("{:.3}", t.as_secs_f64())
}

/// `url` without trailing slashes, so paths can be appended.
fn trim_url(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

/// Whether two URLs share scheme, host and port (the part before the path).
fn same_origin(a: &str, b: &str) -> bool {
    fn origin(u: &str) -> &str {
        let after_scheme = u.find("://").map_or(0, |i| i + 3);
        let end = u[after_scheme..]
            .find('/')
            .map_or(u.len(), |i| after_scheme + i);
        &u[..end]
    }
    origin(a).eq_ignore_ascii_case(origin(b))
}

/// An error and its causes on one line: reqwest's top-level message alone ("error sending
/// request") hides the useful part ("connection refused"). Also used for etcd's client.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

/// The query API's JSON envelope.
#[derive(Deserialize)]
struct Envelope {
    status: String,
    data: Option<Data>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
    #[serde(default)]
    warnings: Vec<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct RawSeries {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

#[derive(Deserialize)]
struct RawRangeSeries {
    metric: BTreeMap<String, String>,
    /// Absent when the series holds only native-histogram samples, which are not read.
    #[serde(default)]
    values: Vec<(f64, String)>,
}

/// Reads an answer of the instant-query API, given its HTTP status and body.
///
/// Prometheus answers 400 (`bad_data`) for a query it cannot parse, which means the policy is
/// wrong, and 422 (`execution`) for one it cannot run, which may also be a limit the query
/// outgrew; both are reported with Prometheus's own message and the query.
pub fn parse_answer(
    url: &str,
    status: u16,
    body: &[u8],
    query: &str,
) -> Result<Answer, SourceError> {
    let data = parse_envelope(url, status, body, query)?;
    let bad = |reason: String| SourceError::BadResponse {
        url: url.to_owned(),
        reason,
    };
    match data.result_type.as_str() {
        "vector" => {
            let raw: Vec<RawSeries> = serde_json::from_value(data.result)
                .map_err(|e| bad(format!("vector result: {e}")))?;
            let mut out = Vec::with_capacity(raw.len());
            for s in raw {
                let value = parse_value(&s.value.1)
                    .ok_or_else(|| bad(format!("sample value {:?}", s.value.1)))?;
                out.push(Series {
                    labels: s.metric,
                    value,
                });
            }
            Ok(Answer::Vector(out))
        }
        "scalar" => {
            let (_, v): (f64, String) = serde_json::from_value(data.result)
                .map_err(|e| bad(format!("scalar result: {e}")))?;
            let value = parse_value(&v).ok_or_else(|| bad(format!("scalar value {v:?}")))?;
            Ok(Answer::Scalar(value))
        }
        other => Err(SourceError::BadQuery {
            query: query.to_owned(),
            message: format!(
                "it returns a {other}, expected an instant vector or a scalar{}",
                if other == "matrix" {
                    " (wrap a range selector in a function such as increase() or rate())"
                } else {
                    ""
                }
            ),
        }),
    }
}

/// Reads an answer of the range-query API (a matrix), given its HTTP status and body.
/// Failures are classified as [`parse_answer`] does.
pub fn parse_matrix(
    url: &str,
    status: u16,
    body: &[u8],
    query: &str,
) -> Result<Vec<RangeSeries>, SourceError> {
    let data = parse_envelope(url, status, body, query)?;
    let bad = |reason: String| SourceError::BadResponse {
        url: url.to_owned(),
        reason,
    };
    if data.result_type != "matrix" {
        return Err(bad(format!(
            "a range query answered with a {}, expected a matrix",
            data.result_type
        )));
    }
    let raw: Vec<RawRangeSeries> =
        serde_json::from_value(data.result).map_err(|e| bad(format!("matrix result: {e}")))?;
    let mut out = Vec::with_capacity(raw.len());
    for s in raw {
        let mut points = Vec::with_capacity(s.values.len());
        for (t, v) in s.values {
            let value = parse_value(&v).ok_or_else(|| bad(format!("sample value {v:?}")))?;
            if !t.is_finite() {
                return Err(bad(format!("sample time {t}")));
            }
            // Evaluation times are whole milliseconds; rounding undoes the float's noise.
            points.push((Time((t * 1000.0).round() as i64), value));
        }
        out.push(RangeSeries {
            labels: s.metric,
            points,
        });
    }
    Ok(out)
}

/// The `data` of a successful answer, or why there is none.
fn parse_envelope(url: &str, status: u16, body: &[u8], query: &str) -> Result<Data, SourceError> {
    let envelope = serde_json::from_slice::<Envelope>(body);
    if !(200..300).contains(&status) {
        return Err(match envelope {
            Ok(Envelope {
                error_type: Some(t),
                error: Some(message),
                ..
            }) if status == 422 && t == "execution" => SourceError::Execution {
                query: query.to_owned(),
                message,
            },
            Ok(Envelope {
                error_type: Some(t),
                error: Some(message),
                ..
            }) if status == 400 || status == 422 => SourceError::BadQuery {
                query: query.to_owned(),
                message: format!("prometheus says {t}: {message}"),
            },
            Ok(Envelope {
                error_type: Some(t),
                error: Some(message),
                ..
            }) => SourceError::Http {
                url: url.to_owned(),
                status,
                message: format!("{t}: {message}"),
            },
            _ => SourceError::Http {
                url: url.to_owned(),
                status,
                message: quote(body),
            },
        });
    }
    let bad = |reason: String| SourceError::BadResponse {
        url: url.to_owned(),
        reason,
    };
    let envelope = envelope.map_err(|e| bad(format!("{e}, in {}", quote(body))))?;
    if envelope.status != "success" {
        return Err(bad(format!(
            "status {:?} with http 2xx: {}",
            envelope.status,
            envelope.error.unwrap_or_default()
        )));
    }
    for w in &envelope.warnings {
        // PromQL's own notes on the query ("PromQL warning: ...", "PromQL info: ...": a
        // metric that may not be a counter, say) leave the answer whole. Any other warning
        // is a data source that failed (remote read, a store behind Thanos or Mimir): the
        // answer may lack series or samples of either version, so it is not read as data.
        if w.starts_with("PromQL ") {
            tracing::debug!(url, query, warning = %w, "prometheus warned about a query");
        } else {
            return Err(SourceError::Partial {
                url: url.to_owned(),
                warning: w.clone(),
            });
        }
    }
    envelope
        .data
        .ok_or_else(|| bad("a successful answer without data".into()))
}

/// A sample value as Prometheus writes it: decimal text, `NaN`, `+Inf` or `-Inf`.
pub fn parse_value(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse::<f64>().ok(),
    }
}

/// How long [`PrometheusClient::answers`] waits for a trivial query.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The start of a body, for an error message.
fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(QUOTE_BYTES)]);
    let text = text.trim();
    if text.is_empty() {
        "an empty body".into()
    } else if body.len() > QUOTE_BYTES {
        format!("{text:?}...")
    } else {
        format!("{text:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://prom:9090";

    fn parse(status: u16, body: &str) -> Result<Answer, SourceError> {
        parse_answer(URL, status, body.as_bytes(), "q")
    }

    fn series(labels: &[(&str, &str)], value: f64) -> Series {
        Series {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    #[test]
    fn vectors_and_scalars() {
        let v = parse(
            200,
            r#"{"status":"success","data":{"resultType":"vector","result":[
                {"metric":{"version":"v1"},"value":[1700000000.5,"0.25"]},
                {"metric":{"version":"v2"},"value":[1700000000.5,"+Inf"]}]}}"#,
        );
        assert_eq!(
            v,
            Ok(Answer::Vector(vec![
                series(&[("version", "v1")], 0.25),
                series(&[("version", "v2")], f64::INFINITY)
            ]))
        );
        let s = parse(
            200,
            r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"3"]}}"#,
        );
        assert_eq!(s, Ok(Answer::Scalar(3.0)));
        let empty = parse(
            200,
            r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
        );
        assert_eq!(empty, Ok(Answer::Vector(vec![])));
        let noted = parse(
            200,
            r#"{"status":"success","warnings":["PromQL info: metric might not be a counter, name does not end in _total/_sum/_count/_bucket: \"x\""],"data":{"resultType":"vector","result":[]}}"#,
        );
        assert_eq!(noted, Ok(Answer::Vector(vec![])));
        // Regression (review): a remote-read failure's answer lacks data, and was read whole.
        let partial = parse(
            200,
            r#"{"status":"success","warnings":["remote_read: context deadline exceeded"],"data":{"resultType":"vector","result":[]}}"#,
        );
        match partial {
            Err(e) => {
                assert_eq!(e.kind(), "partial");
                assert!(
                    e.to_string()
                        .contains("remote_read: context deadline exceeded"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nan_stays_nan() {
        let v = parse(
            200,
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}}"#,
        );
        match v {
            Ok(Answer::Vector(s)) => assert!(s[0].value.is_nan()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failures_are_classified() {
        let kind = |status, body: &str| parse(status, body).map_err(|e| (e.kind(), e.to_string()));
        let cases: &[(u16, &str, &str, &str)] = &[
            (
                400,
                r#"{"status":"error","errorType":"bad_data","error":"1:5: parse error: unclosed left parenthesis"}"#,
                "bad-query",
                "the policy's query is wrong: prometheus says bad_data: 1:5: parse error: unclosed left parenthesis; query: q",
            ),
            (
                422,
                r#"{"status":"error","errorType":"execution","error":"query processing would load too many samples into memory in query execution"}"#,
                "execution",
                "prometheus could not run the query: query processing would load too many samples into memory in query execution (a query error, or one too heavy",
            ),
            (
                503,
                r#"{"status":"error","errorType":"unavailable","error":"tsdb not ready"}"#,
                "http",
                "prometheus at http://prom:9090 answered http 503: unavailable: tsdb not ready",
            ),
            (
                502,
                "<html>bad gateway</html>",
                "http",
                "answered http 502: \"<html>bad gateway</html>\"",
            ),
            (404, "", "http", "answered http 404: an empty body"),
            (
                200,
                "<html>login</html>",
                "bad-response",
                "not query API JSON",
            ),
            (
                200,
                r#"{"status":"success"}"#,
                "bad-response",
                "without data",
            ),
            (
                200,
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"x"]}]}}"#,
                "bad-response",
                "sample value \"x\"",
            ),
            (
                200,
                r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
                "bad-query",
                "it returns a matrix, expected an instant vector or a scalar (wrap a range selector",
            ),
            (
                200,
                r#"{"status":"success","data":{"resultType":"string","result":[1,"a"]}}"#,
                "bad-query",
                "it returns a string",
            ),
        ];
        for (status, body, want_kind, want_msg) in cases {
            match kind(*status, body) {
                Err((k, msg)) => {
                    assert_eq!(k, *want_kind, "{body}");
                    assert!(msg.contains(want_msg), "{msg:?} lacks {want_msg:?}");
                }
                Ok(a) => panic!("{body} parsed as {a:?}"),
            }
        }
    }

    #[test]
    fn matrices_with_nan_values() {
        let m = parse_matrix(
            URL,
            200,
            br#"{"status":"success","data":{"resultType":"matrix","result":[
                {"metric":{"version":"v1"},"values":[[1700000000,"0.5"],[1700000060.001,"NaN"]]},
                {"metric":{"version":"v2"},"values":[[1700000000,"+Inf"]]},
                {"metric":{"version":"v3"},"histograms":[[1700000000,{"count":"1"}]]}]}}"#,
            "q",
        );
        let m = match m {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].labels, series(&[("version", "v1")], 0.0).labels);
        assert_eq!(m[0].points[0], (Time(1_700_000_000_000), 0.5));
        assert_eq!(m[0].points[1].0, Time(1_700_000_060_001));
        assert!(m[0].points[1].1.is_nan());
        assert_eq!(m[1].points, vec![(Time(1_700_000_000_000), f64::INFINITY)]);
        // Native-histogram samples are not read; the series is there without values.
        assert!(m[2].points.is_empty());
        let empty = parse_matrix(
            URL,
            200,
            br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
            "q",
        );
        assert_eq!(empty, Ok(vec![]));
    }

    #[test]
    fn malformed_matrices_are_errors() {
        let cases: &[(u16, &str, &str, &str)] = &[
            (
                200,
                r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"x"]]}]}}"#,
                "bad-response",
                "sample value \"x\"",
            ),
            (
                200,
                r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[["a","1"]]}]}}"#,
                "bad-response",
                "matrix result",
            ),
            (
                200,
                r#"{"status":"success","data":{"resultType":"matrix","result":{"no":"list"}}}"#,
                "bad-response",
                "matrix result",
            ),
            (
                200,
                r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
                "bad-response",
                "answered with a vector, expected a matrix",
            ),
            (
                200,
                "<html>login</html>",
                "bad-response",
                "not query API JSON",
            ),
            (
                400,
                r#"{"status":"error","errorType":"bad_data","error":"exceeded maximum resolution of 11,000 points per timeseries"}"#,
                "bad-query",
                "11,000 points",
            ),
            (
                503,
                r#"{"status":"error","errorType":"unavailable","error":"tsdb not ready"}"#,
                "http",
                "answered http 503",
            ),
        ];
        for (status, body, want_kind, want_msg) in cases {
            match parse_matrix(URL, *status, body.as_bytes(), "q") {
                Err(e) => {
                    assert_eq!(e.kind(), *want_kind, "{body}");
                    let msg = e.to_string();
                    assert!(msg.contains(want_msg), "{msg:?} lacks {want_msg:?}");
                }
                Ok(m) => panic!("{body} parsed as {m:?}"),
            }
        }
    }

    #[test]
    fn values_in_prometheus_text() {
        assert_eq!(parse_value("1e-3"), Some(0.001));
        assert_eq!(parse_value("-Inf"), Some(f64::NEG_INFINITY));
        assert!(parse_value("NaN").is_some_and(f64::is_nan));
        assert_eq!(parse_value("fast"), None);
    }

    #[test]
    fn origins() {
        assert!(same_origin("http://p:9090", "http://p:9090/"));
        assert!(same_origin("https://P:9090/prom", "https://p:9090"));
        assert!(!same_origin("http://p:9091", "http://p:9090"));
        assert!(!same_origin("http://other", "http://p"));
    }

    #[test]
    fn credentials_are_not_printed() {
        let a = Auth::Basic {
            user: "u".into(),
            password: Some("secret".into()),
        };
        assert!(!format!("{a:?}").contains("secret"));
        assert!(!format!("{:?}", Auth::Bearer("tok".into())).contains("tok"));
    }

    #[test]
    fn unreadable_ca_file_is_a_config_error() {
        let dir = std::env::temp_dir().join("canaryd-no-such-dir");
        let options = ClientOptions {
            ca_file: Some(dir.join("ca.pem")),
            ..ClientOptions::default()
        };
        match PrometheusClient::new(URL, options) {
            Err(e) => {
                assert_eq!(e.kind(), "config");
                assert!(e.to_string().contains("ca.pem"), "{e}");
            }
            Ok(_) => panic!("a missing CA file was accepted"),
        }
    }
}
