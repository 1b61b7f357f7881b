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
