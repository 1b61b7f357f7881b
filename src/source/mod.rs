//! Metric sources: ask Prometheus (or a fake, in tests) what both versions did.

use crate::observation::MetricReading;
use crate::policy::Policy;
use crate::router::BoxFuture;
use crate::time::Time;
use std::collections::BTreeMap;

/// The time ranges of one analysis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    /// Evaluation time of the queries.
    pub at: Time,
    /// Start of the analysis window (the current step's start): values and window counts.
    pub since: Time,
    /// Start of the rollout: cumulative counts for count-based judges.
    pub rollout_started: Time,
}

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

/// The source the daemon uses for each policy: its own Prometheus, or `default_url`.
pub fn factory(default_url: String) -> crate::controller::SourceFactory {
    let _ = default_url;
    std::sync::Arc::new(|_policy: &Policy| -> std::sync::Arc<dyn MetricSource> {
        std::sync::Arc::new(Unconfigured)
    })
}

/// Placeholder until the Prometheus client is wired in: every metric reads unavailable, so
/// rollouts hold and never advance.
struct Unconfigured;

impl MetricSource for Unconfigured {
    fn observe<'a>(
        &'a self,
        policy: &'a Policy,
        _window: Window,
    ) -> BoxFuture<'a, BTreeMap<String, MetricReading>> {
        Box::pin(async move {
            policy
                .metrics
                .iter()
                .map(|m| {
                    (
                        m.name.clone(),
                        MetricReading::unavailable("no metric source configured"),
                    )
                })
                .collect()
        })
    }
}
