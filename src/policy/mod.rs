//! Rollout policies: the validated domain types the rest of canaryd works with.
//!
//! `tree.rs` parses YAML into a positioned tree, `raw.rs` is the only file that knows the YAML
//! field names and turns the tree into these types, `validate.rs` checks what the values mean.
//! Both passes collect every problem before reporting, so a user fixes a file in one go.

pub mod raw;
pub mod tree;
pub mod validate;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use validate::{
    MIN_INTERVAL, PolicyError, SecretFileError, declared_name, load_file,
    load_file_with_min_interval, load_file_without_secrets, load_str, name_clash, read_secret_file,
    router_clash,
};

/// A validated rollout policy: one model, one candidate version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Unique name of the rollout, `[a-z0-9-]+`.
    pub name: String,
    /// Value of the `model` label on the model server's series.
    pub model: String,
    /// Version label of the version in production.
    pub stable: String,
    /// Version label of the candidate; a new value starts a new rollout.
    pub canary: String,
    pub strategy: Strategy,
    pub analysis: Analysis,
    pub metrics: Vec<MetricSpec>,
    pub router: RouterConfig,
    pub webhooks: Vec<Webhook>,
    /// A Prometheus for this policy only; the daemon's default otherwise.
    pub prometheus: Option<PrometheusConfig>,
    /// Series and label names of the model-server convention, overridable per policy.
    pub convention: Convention,
}

/// How traffic moves to the canary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StrategyKind {
    /// Step through canary weights (percent of traffic), then promote.
    Canary { steps: Vec<f64> },
    /// Switch all traffic at once, watch the new version for `bake`, switch back on failure.
    BlueGreen {
        #[serde(with = "duration_ms")]
        bake: Duration,
    },
}

/// The `strategy` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    pub kind: StrategyKind,
    /// How often the canary is analysed.
    #[serde(with = "duration_ms")]
    pub interval: Duration,
    /// No step is left sooner than this after it began.
    #[serde(with = "duration_ms")]
    pub min_step_duration: Duration,
    /// Consecutive failed analyses that trigger a rollback.
    pub failure_limit: u32,
    /// A rollout not promoted this long after it started is rolled back.
    #[serde(with = "duration_ms")]
    pub progress_deadline: Duration,
    /// What an analysis without enough data counts as.
    pub on_no_data: OnNoData,
    /// Wait at the last step for an operator's `promote`.
    pub manual_promotion: bool,
    /// Keep judging the new version this long after promotion; zero disables the watch.
    #[serde(with = "duration_ms")]
    pub post_promotion_watch: Duration,
    /// How long the router may fail its calls before the rollout enters `failed`.
    #[serde(with = "duration_ms")]
    pub router_deadline: Duration,
}

impl Strategy {
    /// The canary weights of the steps; blue-green has a single step at 100 %.
    pub fn steps(&self) -> Vec<f64> {
        match &self.kind {
            StrategyKind::Canary { steps } => steps.clone(),
            StrategyKind::BlueGreen { .. } => vec![100.0],
        }
    }

    /// The least time a step lasts: `min_step_duration`, or the bake of blue-green.
    pub fn step_duration(&self) -> Duration {
        match &self.kind {
            StrategyKind::Canary { .. } => self.min_step_duration,
            StrategyKind::BlueGreen { bake } => *bake,
        }
    }

    pub fn is_blue_green(&self) -> bool {
        matches!(self.kind, StrategyKind::BlueGreen { .. })
    }
}

/// What an analysis that lacks data for a metric counts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoData {
    /// Neither pass nor fail: the rollout waits for data.
    Hold,
    /// A failed check, counted towards `failure_limit`.
    Fail,
    /// A passed check for advancing between steps; promotion still needs data (see ARCHITECTURE.md).
    Pass,
}

/// How metrics are judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Anytime-valid sequential tests on counts (the default).
    Sequential,
    /// Fixed bounds checked every interval (Flagger / Argo Rollouts).
    Threshold,
    /// Kayenta's fixed-horizon Mann–Whitney judge.
    MannWhitney,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Sequential => "sequential",
            Method::Threshold => "threshold",
            Method::MannWhitney => "mann-whitney",
        }
    }
}

/// The `analysis` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    pub method: Method,
    /// 1 − the largest acceptable false-rollback probability.
    pub confidence: f64,
}

/// What a metric measures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum MetricKind {
    /// Share of requests with `outcome="error"`.
    ErrorRate,
    /// A latency quantile in seconds from the duration histogram.
    Latency { quantile: f64 },
    /// Share of scored predictions that were correct.
    Accuracy,
    /// A raw PromQL template with `{{version}}`, `{{model}}`, `{{window}}`.
    Query { template: String },
}

impl MetricKind {
    /// Whether larger values are worse (error rate, latency) or better (accuracy).
    pub fn unit(&self) -> Unit {
        match self {
            MetricKind::ErrorRate | MetricKind::Accuracy => Unit::Ratio,
            MetricKind::Latency { .. } => Unit::Seconds,
            MetricKind::Query { .. } => Unit::Number,
        }
    }

    /// The builtin's name, or `query`.
    pub fn label(&self) -> &'static str {
        match self {
            MetricKind::ErrorRate => "error_rate",
            MetricKind::Latency { .. } => "latency",
            MetricKind::Accuracy => "accuracy",
            MetricKind::Query { .. } => "query",
        }
    }
}

/// The unit a metric's values are in, which decides what bounds make sense.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unit {
    /// A fraction in [0, 1].
    Ratio,
    Seconds,
    /// A raw query's value: any number.
    Number,
}

/// An absolute bound, with the text the user wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bound {
    pub value: f64,
    pub written: String,
}

/// How far the canary may be from stable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    pub kind: ToleranceKind,
    /// The magnitude: a fraction for `Relative`, an absolute amount otherwise.
    pub amount: f64,
    pub written: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ToleranceKind {
    /// `10%`: stable × (1 ± amount).
    Relative,
    /// `0.5pp`, `20ms` or a bare number: stable ± amount.
    Absolute,
}

impl Tolerance {
    /// The largest canary value allowed for a stable value, for `max_increase`.
    pub fn upper(&self, stable: f64) -> f64 {
        self.upper_by(stable, 1.0)
    }

    /// A stable value raised by `times` the tolerance: the sequential judge's "bad" boundary
    /// is twice it.
    pub fn upper_by(&self, stable: f64, times: f64) -> f64 {
        match self.kind {
            ToleranceKind::Relative => stable * (1.0 + times * self.amount),
            ToleranceKind::Absolute => stable + times * self.amount,
        }
    }

    /// The smallest canary value allowed for a stable value, for `max_decrease`.
    pub fn lower(&self, stable: f64) -> f64 {
        match self.kind {
            ToleranceKind::Relative => stable * (1.0 - self.amount),
            ToleranceKind::Absolute => stable - self.amount,
        }
    }
}

/// The bounds of one metric. At least one is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Bounds {
    pub min: Option<Bound>,
    pub max: Option<Bound>,
    pub max_increase: Option<Tolerance>,
    pub max_decrease: Option<Tolerance>,
}

impl Bounds {
    /// Whether a bound compares with stable.
    pub fn is_relative(&self) -> bool {
        self.max_increase.is_some() || self.max_decrease.is_some()
    }
}

/// One metric of a policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricSpec {
    /// Unique within the policy.
    pub name: String,
    pub kind: MetricKind,
    pub bounds: Bounds,
    /// Events (requests or scored predictions) per version before the metric counts.
    pub min_samples: u64,
    /// A failure of this metric alone rolls back at once.
    pub critical: bool,
}

/// The routing backend, configuration only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RouterConfig {
    Haproxy {
        /// A unix socket path, or `tcp://host:port` / `host:port` for a TCP runtime API.
        socket: String,
        backend: String,
        /// Version label to HAProxy server name.
        servers: BTreeMap<String, String>,
    },
    Nginx {
        weights_file: PathBuf,
        /// Command and arguments run after the file is written; must exit 0.
        reload: Vec<String>,
        /// Upstream block name written to the file.
        upstream: String,
        /// Version label to `host:port` of that version's servers.
        servers: BTreeMap<String, String>,
    },
    Webhook {
        url: String,
        #[serde(with = "duration_ms")]
        timeout: Duration,
    },
    File {
        path: PathBuf,
    },
}

impl RouterConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            RouterConfig::Haproxy { .. } => "haproxy",
            RouterConfig::Nginx { .. } => "nginx",
            RouterConfig::Webhook { .. } => "webhook",
            RouterConfig::File { .. } => "file",
        }
    }

    /// Whether `other` moves the same traffic as this router for a rollout between the
    /// `versions` (stable and canary): the same kind and target (for HAProxy also the same
    /// servers for those two versions), or the same webhook URL. An edit between two such
    /// routers (an nginx reload command, a webhook timeout, a HAProxy server for a third
    /// version) is not a move to another router, so the rollout's traffic is not sent to
    /// stable on the way.
    pub fn drives_same_traffic(&self, other: &RouterConfig, versions: [&str; 2]) -> bool {
        match (self, other) {
            (RouterConfig::Webhook { url: a, .. }, RouterConfig::Webhook { url: b, .. }) => a == b,
            (
                RouterConfig::Haproxy { servers: a, .. },
                RouterConfig::Haproxy { servers: b, .. },
            ) => versions.iter().all(|v| a.get(*v) == b.get(*v)) && self.target() == other.target(),
            // The same kind too: an nginx weights file turned file-router document would
            // leave nginx with a file it cannot read, so that is a move.
            _ => {
                self.kind() == other.kind()
                    && self.target().is_some()
                    && self.target() == other.target()
            }
        }
    }

    /// The traffic this router changes, for refusing a second policy on it; `None` for a
    /// webhook router, whose payload names the rollout, so one service can split many.
    pub fn target(&self) -> Option<RouterTarget> {
        match self {
            RouterConfig::Haproxy {
                socket, backend, ..
            } => Some(RouterTarget::HaproxyBackend {
                address: haproxy_address(socket),
                backend: backend.clone(),
            }),
            RouterConfig::Nginx { weights_file, .. } => {
                Some(RouterTarget::File(resolved_file(weights_file)))
            }
            RouterConfig::File { path } => Some(RouterTarget::File(resolved_file(path))),
            RouterConfig::Webhook { .. } => None,
        }
    }
}

/// What a router changes. Two rollouts on one target would each set their own weights on it at
/// every interval, undoing the other's, so the daemon runs one rollout per target.
///
/// Targets are compared as the routers reach them: paths resolved (relative to the working
/// directory, `.`, `..` and symbolic links seen through as far as they exist; for a file the
/// routers replace whole, only its directory's), `tcp://` and
/// `unix://` prefixes dropped, IP addresses in one spelling and `localhost` as 127.0.0.1. Other
/// host names are compared as written (in lower case): no DNS lookup decides a router's
/// identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouterTarget {
    /// One backend of one HAProxy, known by its runtime API's address.
    HaproxyBackend { address: String, backend: String },
    /// A file canaryd writes whole: an nginx router's weights file or a file router's file.
    File(PathBuf),
}

impl std::fmt::Display for RouterTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouterTarget::HaproxyBackend { address, backend } => {
                write!(f, "backend {backend:?} of the HAProxy at {address}")
            }
            RouterTarget::File(path) => write!(f, "the weights file {}", path.display()),
        }
    }
}

/// An HAProxy runtime API address in one spelling: `tcp://host:port` for TCP (an IP address
/// as `IpAddr` writes it, `localhost` as 127.0.0.1, other host names in lower case), the
/// resolved path for a unix socket; read as `router::haproxy::Endpoint::parse` reads it.
fn haproxy_address(socket: &str) -> String {
    let tcp = |hostport: &str| format!("tcp://{}", host_port(hostport));
    if let Some(rest) = socket.strip_prefix("tcp://") {
        return tcp(rest);
    }
    if let Some(rest) = socket.strip_prefix("unix://") {
        return resolved(Path::new(rest)).display().to_string();
    }
    let has_port = socket.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok()
    });
    if !socket.starts_with('/') && !socket.starts_with('.') && has_port {
        tcp(socket)
    } else {
        resolved(Path::new(socket)).display().to_string()
    }
}

/// `host:port` in one spelling. No name is looked up (that would make a router's identity
/// depend on DNS at the moment of a scan), except `localhost`, which is the loopback address.
fn host_port(hostport: &str) -> String {
    let Some((host, port)) = hostport.rsplit_once(':') else {
        return hostport.to_ascii_lowercase();
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let host = match bare.parse::<std::net::IpAddr>() {
        // An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is that IPv4 address.
        Ok(ip) => ip.to_canonical().to_string(),
        Err(_) if bare.eq_ignore_ascii_case("localhost") => "127.0.0.1".to_owned(),
        Err(_) => bare.to_ascii_lowercase(),
    };
    let port = port
        .parse::<u16>()
        .map_or_else(|_| port.to_owned(), |p| p.to_string());
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A file the routers write whole (a temporary file renamed over it): its directory resolved,
/// its name as written, since the rename replaces a symbolic link there instead of writing
/// through it.
fn resolved_file(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            resolved(dir).join(name)
        }
        _ => resolved(path),
    }
}

/// The file a path names, as the routers open it: relative to the working directory, with
/// `.` and `..` and symbolic links resolved as far as the path exists (a weights file often
/// does not exist yet, its directory does).
fn resolved(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_or_else(|_| path.to_path_buf(), |d| d.join(path))
    };
    // The longest part that exists is resolved by the filesystem; the rest lexically.
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            return rest.iter().rev().fold(real, |mut p: PathBuf, c| {
                match c {
                    std::path::Component::ParentDir => {
                        p.pop();
                    }
                    std::path::Component::CurDir => {}
                    c => p.push(c),
                }
                p
            });
        }
        let (Some(parent), Some(last)) = (existing.parent(), existing.components().next_back())
        else {
            return lexical(&absolute);
        };
        rest.push(last);
        existing = parent;
    }
}

/// A path without its `.` components and with `..` taken back lexically.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir if out.file_name().is_some() => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// When a webhook is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WebhookEvent {
    /// A gate before promotion: 2xx means go; anything else, or no answer, holds.
    ConfirmPromotion,
    Rollout,
    Advance,
    Promote,
    Rollback,
    Failed,
}

impl WebhookEvent {
    pub const ALL: [(&'static str, WebhookEvent); 6] = [
        ("confirm-promotion", WebhookEvent::ConfirmPromotion),
        ("rollout", WebhookEvent::Rollout),
        ("advance", WebhookEvent::Advance),
        ("promote", WebhookEvent::Promote),
        ("rollback", WebhookEvent::Rollback),
        ("failed", WebhookEvent::Failed),
    ];
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    pub on: WebhookEvent,
    pub url: String,
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
}

/// A policy's own Prometheus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrometheusConfig {
    pub url: String,
    /// Credentials sent to `url` only, read from their files when the policy was loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<PrometheusAuth>,
}

/// How a policy authenticates to its own Prometheus. The secrets are read from files when the
/// policy is loaded; only the files' paths are ever shown or serialised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PrometheusAuth {
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// Where the token was read from, resolved against the policy file's directory.
        token_file: PathBuf,
        #[serde(skip)]
        token: Secret,
    },
    /// HTTP basic authentication.
    Basic {
        username: String,
        /// Where the password was read from, resolved against the policy file's directory.
        password_file: PathBuf,
        #[serde(skip)]
        password: Secret,
    },
}

/// Text that must never be shown: `Debug` prints `<redacted>`, there is no `Display`, and
/// the fields that hold one are left out when a policy is serialised (a deserialised policy
/// therefore has an empty secret).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: String) -> Secret {
        Secret(text)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Series and label names of the model-server convention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Convention {
    pub requests: String,
    pub duration: String,
    pub scored: String,
    pub model_label: String,
    pub version_label: String,
    pub outcome_label: String,
    pub error_value: String,
    pub correct_label: String,
    pub correct_value: String,
}

impl Default for Convention {
    fn default() -> Self {
        Convention {
            requests: "model_requests_total".into(),
            duration: "model_request_duration_seconds".into(),
            scored: "model_predictions_scored_total".into(),
            model_label: "model".into(),
            version_label: "version".into(),
            outcome_label: "outcome".into(),
            error_value: "error".into(),
            correct_label: "correct".into(),
            correct_value: "true".into(),
        }
    }
}

impl Policy {
    /// Whether the policy describes a rollout to run (a candidate that differs from stable).
    pub fn has_candidate(&self) -> bool {
        self.canary != self.stable
    }

    pub fn metric(&self, name: &str) -> Option<&MetricSpec> {
        self.metrics.iter().find(|m| m.name == name)
    }

    /// Files besides the policy file that the policy was read from (its credentials): a
    /// change to one of them changes the policy.
    pub fn secret_files(&self) -> Vec<&std::path::Path> {
        match self.prometheus.as_ref().and_then(|p| p.auth.as_ref()) {
            Some(PrometheusAuth::Bearer { token_file, .. }) => vec![token_file.as_path()],
            Some(PrometheusAuth::Basic { password_file, .. }) => vec![password_file.as_path()],
            None => Vec::new(),
        }
    }
}

/// A policy file's path shown in messages: relative paths as given.
pub fn display_path(p: &Path) -> String {
    p.display().to_string()
}

/// A webhook's URL as logs, decisions, the API and messages show it: its origin (scheme, host
/// and port as written), nothing else. Services hand out URLs with secrets in them (a Slack
/// hook's path, a `?token=`), so the path, query and fragment are never shown, nor a user or
/// password. Any text is accepted, so that a malformed URL can be named too.
pub fn url_origin(url: &str) -> String {
    let (scheme, authority) = url_parts(url);
    // The user and password end at the authority's last '@'.
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match scheme {
        Some(s) => format!("{s}://{host}"),
        None => host.to_owned(),
    }
}

/// Whether a URL carries a user name or password (`http://user:password@host/`).
pub fn url_has_credentials(url: &str) -> bool {
    url_parts(url).1.contains('@')
}

/// A URL's scheme, if it has one, and its authority (`user:password@host:port`).
fn url_parts(url: &str) -> (Option<&str>, &str) {
    let (scheme, rest) = match url.split_once("://") {
        // A "://" inside the path or query does not end a scheme.
        Some((s, rest))
            if s.starts_with(|c: char| c.is_ascii_alphabetic())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            (Some(s), rest)
        }
        _ => (None, url),
    };
    // For http(s), the authority ends at the path, query or fragment, and a backslash is a
    // slash there (WHATWG), as reqwest reads it.
    let authority = rest.split(['/', '\\', '?', '#']).next().unwrap_or(rest);
    (scheme, authority)
}

/// Durations stored as milliseconds in JSON (state, API).
pub mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_shown_by_its_origin_only() {
        let cases = [
            (
                "http://alice:s3cr3t@127.0.0.1:22080/gate?token=tok123",
                "http://127.0.0.1:22080",
            ),
            (
                "https://hooks.slack.com/services/T0/B0/XXXX",
                "https://hooks.slack.com",
            ),
            ("https://h.internal?token=t#frag", "https://h.internal"),
            ("http://h.internal\\@evil/x", "http://h.internal"),
            ("http://[::1]:8080/x", "http://[::1]:8080"),
            ("http://a@b@h:1/", "http://h:1"),
            // Malformed: no scheme, or a "://" only in the query.
            ("router.internal/weights", "router.internal"),
            ("h.internal/x?next=http://y", "h.internal"),
            ("http://", "http://"),
            ("", ""),
        ];
        for (url, origin) in cases {
            assert_eq!(url_origin(url), origin, "{url}");
        }
    }

    #[test]
    fn router_targets_are_compared_as_the_routers_read_them() {
        use crate::router::haproxy::Endpoint;
        let sockets = [
            "127.0.0.1:9999",
            "tcp://127.0.0.1:9999",
            "127.0.0.1:9998",
            "lb.internal:9999",
            "/run/haproxy.sock",
            "unix:///run/haproxy.sock",
            "/run/./haproxy.sock",
            "/run/other.sock",
            "./x:1",
            "unix://x:1",
            "x:1",
            "haproxy.sock",
            "./haproxy.sock",
        ];
        // The same address exactly when the router would reach the same endpoint (unix paths
        // without their `.` components).
        let endpoint = |s: &str| match Endpoint::parse(s) {
            Ok(Endpoint::Unix(p)) => format!("unix {}", resolved(Path::new(&p)).display()),
            Ok(Endpoint::Tcp(a)) => format!("tcp {}", host_port(&a)),
            Err(e) => panic!("{s}: {e}"),
        };
        for a in sockets {
            for b in sockets {
                assert_eq!(
                    haproxy_address(a) == haproxy_address(b),
                    endpoint(a) == endpoint(b),
                    "{a} and {b}"
                );
            }
        }
        let file = |p: &str| RouterConfig::File { path: p.into() };
        let nginx = |p: &str| RouterConfig::Nginx {
            weights_file: p.into(),
            reload: vec!["true".into()],
            upstream: "u".into(),
            servers: BTreeMap::new(),
        };
        assert_eq!(file("w/a.json").target(), file("./w/./a.json").target());
        assert_eq!(
            nginx("/etc/nginx/w.conf").target(),
            file("/etc/nginx/w.conf").target()
        );
        assert_ne!(file("w/a.json").target(), file("w/b.json").target());
        let webhook = RouterConfig::Webhook {
            url: "https://r.internal/split".into(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(webhook.target(), None);
    }

    /// UAT: two policies on one weights file or one HAProxy, written two ways, both ran and
    /// undid each other's split at every interval.
    #[test]
    fn one_target_written_two_ways_is_one_target() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        std::os::unix::fs::symlink(&real, dir.path().join("link")).expect("symlink");
        let cwd = std::env::current_dir().expect("cwd");
        let file = |p: PathBuf| RouterConfig::File { path: p }.target();
        let same = [
            (real.join("w.json"), dir.path().join("link/w.json")),
            (real.join("w.json"), real.join("sub/../w.json")),
            (real.join("w.json"), real.join("./w.json")),
            (PathBuf::from("w.json"), PathBuf::from("./w.json")),
            (cwd.join("w.json"), PathBuf::from("w.json")),
            (cwd.join("a/b/w.json"), PathBuf::from("./a/x/../b/w.json")),
        ];
        for (a, b) in same {
            assert_eq!(file(a.clone()), file(b.clone()), "{a:?} {b:?}");
        }
        assert_ne!(file(real.join("w.json")), file(real.join("v.json")));
        // A link at the file itself is replaced by the first write (a rename over it), so it
        // is a file of its own.
        std::os::unix::fs::symlink(real.join("w.json"), real.join("l.json")).expect("symlink");
        assert_ne!(file(real.join("w.json")), file(real.join("l.json")));
        let haproxy = |socket: &str| {
            RouterConfig::Haproxy {
                socket: socket.into(),
                backend: "m".into(),
                servers: BTreeMap::new(),
            }
            .target()
        };
        for (a, b) in [
            ("localhost:9999", "127.0.0.1:9999"),
            ("tcp://LB.internal:9999", "lb.internal:9999"),
            ("[::1]:9999", "tcp://[0:0::1]:9999"),
            ("127.0.0.1:09999", "127.0.0.1:9999"),
            ("[::ffff:127.0.0.1]:9999", "localhost:9999"),
        ] {
            assert_eq!(haproxy(a), haproxy(b), "{a} {b}");
        }
        assert_ne!(haproxy("127.0.0.1:9999"), haproxy("127.0.0.2:9999"));
        assert_ne!(haproxy("lb-a.internal:9999"), haproxy("lb-b.internal:9999"));
    }

    #[test]
    fn an_edit_of_a_routers_settings_keeps_its_traffic() {
        let nginx = |file: &str, reload: &str| RouterConfig::Nginx {
            weights_file: file.into(),
            reload: vec![reload.into()],
            upstream: "u".into(),
            servers: BTreeMap::from([("v1".into(), "127.0.0.1:1".into())]),
        };
        let haproxy = |backend: &str, canary: &str| RouterConfig::Haproxy {
            socket: "127.0.0.1:9999".into(),
            backend: backend.into(),
            servers: BTreeMap::from([("v1".into(), "a".into()), ("v2".into(), canary.into())]),
        };
        // A third version's server added to the backend's map.
        let mut with_v3 = haproxy("b", "b");
        if let RouterConfig::Haproxy { servers, .. } = &mut with_v3 {
            servers.insert("v3".into(), "c".into());
        }
        let webhook = |url: &str, ms: u64| RouterConfig::Webhook {
            url: url.into(),
            timeout: Duration::from_millis(ms),
        };
        let file = |p: &str| RouterConfig::File { path: p.into() };
        const VERSIONS: [&str; 2] = ["v1", "v2"];
        let same = [
            (
                nginx("/w.conf", "true"),
                nginx("/./w.conf", "nginx -s reload"),
            ),
            (haproxy("m", "b"), haproxy("m", "b")),
            (haproxy("b", "b"), with_v3),
            (
                webhook("http://r/split", 1),
                webhook("http://r/split", 5000),
            ),
            (file("w.json"), file("./w.json")),
        ];
        let moved = [
            (nginx("/w.conf", "true"), nginx("/v.conf", "true")),
            // Another server for the canary in the same backend: the old one must go to 0.
            (haproxy("m", "b"), haproxy("m", "c")),
            (haproxy("m", "b"), haproxy("n", "b")),
            (webhook("http://r/split", 1), webhook("http://r/other", 1)),
            (file("w.json"), webhook("http://r/split", 1)),
            (nginx("/w.conf", "true"), file("/w.conf")),
        ];
        for (a, b) in same {
            assert!(
                a.drives_same_traffic(&b, VERSIONS) && b.drives_same_traffic(&a, VERSIONS),
                "{a:?} {b:?}"
            );
        }
        for (a, b) in moved {
            assert!(
                !a.drives_same_traffic(&b, VERSIONS) && !b.drives_same_traffic(&a, VERSIONS),
                "{a:?} {b:?}"
            );
        }
    }

    #[test]
    fn credentials_are_found_in_the_authority_only() {
        for url in [
            "http://alice:s3cr3t@h/",
            "https://alice@h",
            "http://:pw@h:1?x",
        ] {
            assert!(url_has_credentials(url), "{url}");
        }
        for url in [
            "https://chat.internal/hooks/@team?token=x",
            "http://h/?to=a@b",
            "http://h#@x",
            "http://h\\@x",
        ] {
            assert!(!url_has_credentials(url), "{url}");
        }
    }
}
