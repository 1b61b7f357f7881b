//! Metric sources: ask Prometheus (or a fake, in tests) what both versions did.
//!
//! `query.rs` writes the PromQL, `prometheus.rs` sends it and parses the answer, `read.rs`
//! turns answers into samples, and `observe.rs` ties them into [`PrometheusSource`].

pub mod error;
pub mod observe;
pub mod prometheus;
pub mod query;
pub mod read;

pub use error::SourceError;
pub use observe::{
    LiveMetric, LiveOutcome, LiveReport, LiveSeries, LiveVersion, PrometheusSource, QueryObserver,
    QueryRecord,
};
pub use prometheus::{Auth, ClientOptions, PrometheusClient};
pub use query::DEFAULT_MIN_RANGE;

pub use crate::observation::Window;

use crate::observation::MetricReading;
use crate::policy::Policy;
use crate::router::BoxFuture;
use std::collections::BTreeMap;

/// Where readings come from.
pub trait MetricSource: Send + Sync {
    /// One reading per metric of the policy. Never fails as a whole: a metric whose query
    /// failed reads as `Unavailable` (or `NoData` when the series is absent).
    fn observe<'a>(
        &'a self,
        policy: &'a Policy,
        window: Window,
    ) -> BoxFuture<'a, BTreeMap<String, MetricReading>>;
}

/// The source the daemon uses for every policy: one Prometheus client (a policy's own
/// `prometheus.url` is honoured per query), reporting each query to `observer`.
pub fn factory(
    default_url: &str,
    options: ClientOptions,
    min_range: std::time::Duration,
    observer: Option<std::sync::Arc<dyn QueryObserver>>,
) -> Result<crate::controller::SourceFactory, SourceError> {
    let mut source = PrometheusSource::new(PrometheusClient::new(default_url, options)?)
        .with_min_range(min_range);
    if let Some(o) = observer {
        source = source.with_observer(o);
    }
    let source: std::sync::Arc<dyn MetricSource> = std::sync::Arc::new(source);
    Ok(std::sync::Arc::new(move |_policy: &Policy| source.clone()))
}
