//! Why a query to Prometheus gave no usable number, in the few kinds a caller branches on.

use std::time::Duration;

/// A failed query. Messages carry the offending URL or query so an operator can act on them.
///
/// "No series" is not an error: an absent series reads as `Reading::NoData`. Every variant
/// here reads as `Reading::Unavailable`, which says nothing about the canary.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SourceError {
    /// No connection could be made (refused, DNS, TLS handshake, reset).
    #[error("cannot reach prometheus at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// No complete answer within the client's timeout.
    #[error("prometheus at {url} did not answer within {}", humantime::format_duration(*.timeout))]
    Timeout { url: String, timeout: Duration },
    /// An HTTP status that is neither success nor Prometheus's "bad query" answer.
    #[error("prometheus at {url} answered http {status}: {message}")]
    Http {
        url: String,
        status: u16,
        message: String,
    },
    /// Prometheus rejected or could not run the query, or its answer cannot be read as a
    /// metric: the policy (or its convention overrides) is wrong, not the canary.
    #[error("the policy's query is wrong: {message}; query: {query}")]
    BadQuery { query: String, message: String },
    /// Prometheus parsed the query but could not run it (`execution`): the query may be wrong
    /// (many-to-many matching) or too heavy for Prometheus's limits (too many samples, a
    /// range grown over a long rollout).
    #[error(
        "prometheus could not run the query: {message} (a query error, or one too heavy for \
         prometheus's limits); query: {query}"
    )]
    Execution { query: String, message: String },
    /// The answer was not the query API's JSON (a proxy's error page, a wrong URL).
    #[error("prometheus at {url} sent an answer that is not query API JSON: {reason}")]
    BadResponse { url: String, reason: String },
    /// The query produced NaN or an infinity where a number of events was expected.
    #[error(
        "query returned {value} for version {version:?} where a number was expected; query: {query}"
    )]
    NotANumber {
        version: String,
        value: f64,
        query: String,
    },
    /// Prometheus answered, but warned that the answer may lack data: a remote-read endpoint
    /// or a store (Thanos, Mimir) failed. Counts from it could undercount either version.
    #[error("prometheus at {url} answered in part only, so the answer is not used: {warning}")]
    Partial { url: String, warning: String },
    /// The client could not be built (unreadable CA file, bad header value).
    #[error("cannot set up the prometheus client: {0}")]
    Config(String),
}

impl SourceError {
    /// A short, bounded label for metrics and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::Unreachable { .. } => "unreachable",
            SourceError::Timeout { .. } => "timeout",
            SourceError::Http { .. } => "http",
            SourceError::BadQuery { .. } => "bad-query",
            SourceError::Execution { .. } => "execution",
            SourceError::BadResponse { .. } => "bad-response",
            SourceError::NotANumber { .. } => "nan",
            SourceError::Partial { .. } => "partial",
            SourceError::Config(_) => "config",
        }
    }

    /// Whether asking again may help: the server was down, slow or failing, not the query.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Unreachable { .. } | SourceError::Timeout { .. } => true,
            SourceError::Http { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// Whether Prometheus itself could not be asked, so later queries of the same
    /// observation would fail the same way, each after waiting out its retries. A 5xx answer
    /// does not count: it comes back fast, and it can be one expensive query's own failure.
    pub fn is_prometheus_down(&self) -> bool {
        matches!(
            self,
            SourceError::Unreachable { .. } | SourceError::Timeout { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_messages() {
        let cases = [
            (
                SourceError::Timeout {
                    url: "http://p:9090".into(),
                    timeout: Duration::from_millis(1500),
                },
                "timeout",
                "prometheus at http://p:9090 did not answer within 1s 500ms",
            ),
            (
                SourceError::BadQuery {
                    query: "sum(".into(),
                    message: "parse error".into(),
                },
                "bad-query",
                "the policy's query is wrong: parse error; query: sum(",
            ),
            (
                SourceError::NotANumber {
                    version: "v2".into(),
                    value: f64::NAN,
                    query: "q".into(),
                },
                "nan",
                "query returned NaN for version \"v2\" where a number was expected; query: q",
            ),
        ];
        for (e, kind, msg) in cases {
            assert_eq!(e.kind(), kind);
            assert_eq!(e.to_string(), msg);
        }
    }

    #[test]
    fn only_server_side_failures_are_retried() {
        let http = |status| SourceError::Http {
            url: "u".into(),
            status,
            message: String::new(),
        };
        assert!(http(503).is_transient());
        assert!(!http(404).is_transient());
        assert!(
            !SourceError::BadQuery {
                query: String::new(),
                message: String::new()
            }
            .is_transient()
        );
    }
}
