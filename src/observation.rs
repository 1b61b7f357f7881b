//! What the shell saw when it looked: metric readings per version, the router's real weight,
//! and the promotion gate. The decision core reads nothing else.
//!
//! *No data* (the series is absent or too thin) and *unavailable* (Prometheus could not be
//! asked) are different readings with different consequences; neither is a bad canary.

use crate::time::Time;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Counts of one version since the rollout began (cumulative, `increase()` semantics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Bad events: errors, incorrect predictions, requests slower than the bound.
    pub bad: f64,
    /// All events: requests or scored predictions.
    pub total: f64,
}

impl Counts {
    /// `bad / total`, or `None` without events.
    pub fn rate(&self) -> Option<f64> {
        (self.total > 0.0).then(|| self.bad / self.total)
    }
}

/// One cumulative histogram bucket: events with a value at most `le`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    pub le: f64,
    pub count: f64,
}

/// What one version looked like for one metric.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The metric's value over the analysis window (since the step began): error rate,
    /// latency quantile in seconds, accuracy, or the query's value. `None` when the window
    /// holds no events.
    pub value: Option<f64>,
    /// Events in the analysis window (requests, or scored predictions for accuracy).
    pub window_events: f64,
    /// Counts since the rollout began, for count-based judges. For latency, `bad` counts
    /// requests above the slow-request boundary the source chose (see `slow_le`).
    pub cumulative: Option<Counts>,
    /// The bucket boundary in seconds used to count slow requests, for latency.
    pub slow_le: Option<f64>,
    /// Cumulative latency histogram since the rollout began, for latency.
    pub buckets: Vec<Bucket>,
    /// Raw values per interval (for judges that compare distributions, e.g. Mann–Whitney).
    pub series: Vec<f64>,
}

impl Sample {
    /// Events since the rollout began, when the reading has them: the cumulative counts'
    /// total, or for latency the cumulative histogram's largest bucket.
    pub fn events_since_start(&self) -> Option<f64> {
        self.cumulative.map(|c| c.total).or_else(|| {
            self.buckets
                .iter()
                .map(|b| b.count)
                .filter(|c| c.is_finite())
                .reduce(f64::max)
        })
    }
}

/// One version's reading of one metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Reading {
    Data(Sample),
    /// The series is absent or empty: the version served nothing measurable.
    NoData,
    /// The source could not answer (unreachable, timeout, error): says nothing of the canary.
    Unavailable {
        error: String,
    },
}

impl Reading {
    pub fn sample(&self) -> Option<&Sample> {
        match self {
            Reading::Data(s) => Some(s),
            _ => None,
        }
    }
}

/// Both versions' readings of one metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricReading {
    pub stable: Reading,
    pub canary: Reading,
}

impl MetricReading {
    /// Whether the canary has data but fewer than `min` events in the window: too few to
    /// judge on, where a longer window might hold enough.
    pub fn canary_thin(&self, min: u64) -> bool {
        matches!(&self.canary, Reading::Data(s) if s.window_events < min as f64)
    }

    pub fn unavailable(error: &str) -> Self {
        MetricReading {
            stable: Reading::Unavailable {
                error: error.to_owned(),
            },
            canary: Reading::Unavailable {
                error: error.to_owned(),
            },
        }
    }
}

/// What the router reported when asked for its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum RouterStatus {
    /// The canary's share of traffic in percent, as the router has it now.
    Ok { canary_weight: f64 },
    /// The router has failed every call since `since`.
    Failing {
        since: Time,
        error: String,
        /// The canary weight the router last confirmed (by a successful call) before it
        /// began failing, if the shell knows it: where traffic really is.
        #[serde(default)]
        confirmed: Option<f64>,
    },
}

/// The answer of the `confirm-promotion` webhook, when one is configured and was asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Gate {
    /// No gate configured, or not asked this tick.
    NotAsked,
    Open,
    /// The gate answered, but not 2xx, or did not answer.
    Closed {
        reason: String,
    },
}

/// Everything the shell learnt in one tick.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Per metric name.
    pub metrics: BTreeMap<String, MetricReading>,
    pub router: RouterStatus,
    pub gate: Gate,
}

/// An operator's action, with who asked and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperatorAction {
    Promote,
    Abort,
    Pause,
    Resume,
    Retry,
}

impl OperatorAction {
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorAction::Promote => "promote",
            OperatorAction::Abort => "abort",
            OperatorAction::Pause => "pause",
            OperatorAction::Resume => "resume",
            OperatorAction::Retry => "retry",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "promote" => OperatorAction::Promote,
            "abort" => OperatorAction::Abort,
            "pause" => OperatorAction::Pause,
            "resume" => OperatorAction::Resume,
            "retry" => OperatorAction::Retry,
            _ => return None,
        })
    }
}

/// What `decide` is asked to react to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "kebab-case")]
pub enum Input {
    /// A periodic analysis.
    Tick(Observation),
    /// An operator action; `router` is the router's status when the action arrived.
    Operator {
        action: OperatorAction,
        who: String,
        why: String,
    },
    /// Read back from the store (a restart, a new leadership term) as applied, the rollout
    /// finds the router sending the canary less than that: `router_weight`.
    Resumed { router_weight: f64 },
}

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

impl Window {
    /// A window ending at `at` that reaches `d` back, for one-off reads such as
    /// `canaryd check --live`, where no step or rollout has begun.
    pub fn lookback(at: Time, d: std::time::Duration) -> Window {
        let start = Time(at.0.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
        Window {
            at,
            since: start,
            rollout_started: start,
        }
    }
}
