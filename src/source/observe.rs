//! [`PrometheusSource`]: the [`MetricSource`] the daemon runs, and the one-shot check behind
//! `canaryd check --live`.
//!
//! An observation asks Prometheus for every metric of a policy at one evaluation time. It
//! never fails as a whole: each version of each metric reads as data, no data, or unavailable
//! with a message that names the metric. Once Prometheus proves unreachable or times out
//! (after the retries), the remaining metrics of that observation read unavailable
//! with the same error instead of waiting out the timeout again, so one observation costs
//! at most about one query's retry budget when Prometheus is down.
//!
//! A policy judged by Mann–Whitney also gets each version's per-interval series, from one
//! range query per metric sent alongside the instant queries. The series is extra evidence:
//! when its query fails, the reading keeps its instant values with an empty series (the judge
//! then falls back to remembering one value per analysis), and the failure is logged and
//! reported to the observer like any other. Other methods send no range query.

use super::error::SourceError;
use super::prometheus::{Answer, Asked, PrometheusClient, RangeSeries};
use super::query::{self, DEFAULT_MIN_RANGE, Plan, Ranges, SeriesPlan, Steps};
use super::read::{self, VersionResult, Versions};
use super::{MetricSource, Window};
use crate::judge::{fmt_count, fmt_value};
use crate::observation::{MetricReading, Reading};
use crate::policy::{Method, MetricKind, MetricSpec, Policy};
use crate::router::BoxFuture;
use crate::time::Time;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// What one query cost and how it ended, handed to a [`QueryObserver`].
#[derive(Debug)]
pub struct QueryRecord<'a> {
    /// The policy's name (the rollout label of the daemon's metrics).
    pub rollout: &'a str,
    /// The metric of the policy the query belongs to.
    pub metric: &'a str,
    /// Wall time of every attempt and the waits between them.
    pub elapsed: Duration,
    /// HTTP attempts made, retries included.
    pub attempts: u32,
    /// Why the query failed; `error.kind()` is a bounded label. `None` on success.
    pub error: Option<&'a SourceError>,
    /// Whether this was a range query (`/api/v1/query_range`) for a per-interval series,
    /// rather than an instant query.
    pub range: bool,
}

/// Receives a record of every query sent, so the daemon's metrics module can export
/// Prometheus query latency and errors without this module knowing about its registry.
/// Called on the querying task; implementations should only update counters.
pub trait QueryObserver: Send + Sync {
    fn query_done(&self, record: &QueryRecord<'_>);
    /// An answer that came back but cannot be read as the metric (NaN counts, several series
    /// where one number was expected, series without the convention's label): a failed
    /// query as much as one that got no answer, told once per metric and observation.
    fn unreadable(&self, _rollout: &str, _metric: &str, _error: &SourceError) {}
}

/// Reads policies' metrics from Prometheus's HTTP API.
#[derive(Clone)]
pub struct PrometheusSource {
    client: PrometheusClient,
    /// The shortest range any query covers (see [`DEFAULT_MIN_RANGE`]).
    min_range: Duration,
    /// Told about every query, when set.
    observer: Option<Arc<dyn QueryObserver>>,
}

impl fmt::Debug for PrometheusSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrometheusSource")
            .field("client", &self.client)
            .field("min_range", &self.min_range)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

/// One metric's queries and what each version read.
struct Outcome {
    queries: Vec<String>,
    versions: [VersionResult; 2],
    /// The range query's result when the method needs per-interval series: each version's
    /// number of intervals, or why the query failed.
    series: Option<Result<[usize; 2], SourceError>>,
}

impl PrometheusSource {
    pub fn new(client: PrometheusClient) -> Self {
        PrometheusSource {
            client,
            min_range: DEFAULT_MIN_RANGE,
            observer: None,
        }
    }

    /// Sets the shortest query range. It should be at least four scrape intervals of the
    /// Prometheus being asked; tests with a 1 s scrape interval use a few seconds.
    pub fn with_min_range(mut self, min_range: Duration) -> Self {
        self.min_range = min_range;
        self
    }

    pub fn with_observer(mut self, observer: Arc<dyn QueryObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn client(&self) -> &PrometheusClient {
        &self.client
    }

    /// The Prometheus `policy` is read from: its own, else the daemon's default.
    pub fn url_for<'a>(&'a self, policy: &'a Policy) -> &'a str {
        policy
            .prometheus
            .as_ref()
            .map_or(self.client.default_url(), |p| p.url.as_str())
    }

    /// Every metric of `policy` over `window`, in the policy's order.
    async fn read_all<'p>(
        &self,
        policy: &'p Policy,
        window: Window,
    ) -> Vec<(&'p MetricSpec, Outcome)> {
        let ranges = Ranges::new(&window, self.min_range);
        // Only the Mann–Whitney judge compares per-interval values; no other method should
        // cost Prometheus a range query.
        let steps = match policy.analysis.method {
            Method::MannWhitney => Steps::new(&window, self.min_range),
            Method::Sequential | Method::Threshold => None,
        };
        let mut down: Option<SourceError> = None;
        // Prometheus answered a probe after a query timed out: later timeouts are slow
        // queries too, and are not probed again.
        let mut up = false;
        let mut out = Vec::with_capacity(policy.metrics.len());
        for spec in &policy.metrics {
            let plan = query::plan(policy, spec, ranges);
            let series_plan = steps.map(|s| (query::series_plan(policy, spec, s.step), s));
            let mut queries: Vec<String> = plan.queries().into_iter().map(str::to_owned).collect();
            if let Some((sp, _)) = &series_plan {
                queries.extend(sp.queries().into_iter().map(str::to_owned));
            }
            let (versions, series) = match &down {
                Some(e) => (
                    [Err(e.clone()), Err(e.clone())],
                    series_plan.as_ref().map(|_| Err(e.clone())),
                ),
                None => {
                    let (mut versions, series) = tokio::join!(
                        self.read_metric(policy, spec, &plan, window.at),
                        self.read_series(policy, spec, series_plan.as_ref()),
                    );
                    let lengths = series.map(|r| {
                        r.map(|series| {
                            let lengths = [series[0].len(), series[1].len()];
                            for (v, s) in versions.iter_mut().zip(series) {
                                if let Ok(Some(sample)) = v {
                                    sample.series = s;
                                }
                            }
                            lengths
                        })
                    });
                    (versions, lengths)
                }
            };
            if down.is_none()
                && let Some(e) = versions
                    .iter()
                    .find_map(|v| v.as_ref().err().filter(|e| e.is_prometheus_down()))
            {
                // A timed-out query may be one heavy query of a Prometheus that is up: the
                // metrics after it are still asked if Prometheus answers a trivial query.
                let timed_out = matches!(e, SourceError::Timeout { .. });
                if !timed_out || !(up || self.client.answers(policy.prometheus.as_ref()).await) {
                    down = Some(e.clone());
                } else {
                    up = true;
                }
            }
            out.push((
                spec,
                Outcome {
                    queries,
                    versions,
                    series,
                },
            ));
        }
        log_failures(policy, &out);
        out
    }

    async fn read_metric(
        &self,
        policy: &Policy,
        spec: &MetricSpec,
        plan: &Plan,
        at: Time,
    ) -> [VersionResult; 2] {
        let v = Versions {
            label: &policy.convention.version_label,
            stable: &policy.stable,
            canary: &policy.canary,
        };
        let both = |e: SourceError| [Err(e.clone()), Err(e)];
        match plan {
            Plan::Split {
                label,
                value,
                marked_is_bad,
                window,
                cumulative,
            } => match tokio::try_join!(
                self.ask(policy, spec, window, at),
                self.ask(policy, spec, cumulative, at)
            ) {
                Ok((w, c)) => self.told_if_unreadable(
                    policy,
                    spec,
                    read::split(&v, label, value, *marked_is_bad, &w, window, &c, cumulative),
                ),
                Err(e) => both(e),
            },
            Plan::Latency {
                quantile,
                quantile_query,
                window_total,
                buckets,
            } => {
                let max = spec.bounds.max.as_ref().map(|b| b.value);
                match tokio::try_join!(
                    self.ask(policy, spec, quantile_query, at),
                    self.ask(policy, spec, window_total, at),
                    self.ask(policy, spec, buckets, at)
                ) {
                    Ok((q, n, b)) => self.told_if_unreadable(
                        policy,
                        spec,
                        read::latency(
                            &v,
                            *quantile,
                            max,
                            &q,
                            quantile_query,
                            &n,
                            window_total,
                            &b,
                            buckets,
                        ),
                    ),
                    Err(e) => both(e),
                }
            }
            Plan::Template { stable, canary } => {
                let (s, c) = tokio::join!(
                    self.ask(policy, spec, stable, at),
                    self.ask(policy, spec, canary, at)
                );
                match (s, c) {
                    (Ok(s), Ok(c)) => self.told_if_unreadable(
                        policy,
                        spec,
                        [
                            read::template(&s, stable, &policy.stable),
                            read::template(&c, canary, &policy.canary),
                        ],
                    ),
                    // A failed query was told already; the other's answer is still read.
                    (s, c) => [
                        s.and_then(|a| read::template(&a, stable, &policy.stable)),
                        c.and_then(|a| read::template(&a, canary, &policy.canary)),
                    ],
                }
            }
        }
    }

    /// Tells the observer about answers that could not be read (once per metric).
    fn told_if_unreadable(
        &self,
        policy: &Policy,
        spec: &MetricSpec,
        r: [VersionResult; 2],
    ) -> [VersionResult; 2] {
        if let (Some(observer), Some(e)) = (&self.observer, r.iter().find_map(|v| v.as_ref().err()))
        {
            observer.unreadable(&policy.name, &spec.name, e);
        }
        r
    }

    /// Both versions' per-interval series of a metric; `None` without a plan, an error when
    /// its range query failed (already logged and reported to the observer).
    async fn read_series(
        &self,
        policy: &Policy,
        spec: &MetricSpec,
        plan: Option<&(SeriesPlan, Steps)>,
    ) -> Option<Result<[Vec<f64>; 2], SourceError>> {
        let (plan, steps) = plan?;
        let v = Versions {
            label: &policy.convention.version_label,
            stable: &policy.stable,
            canary: &policy.canary,
        };
        Some(match plan {
            SeriesPlan::Split {
                label,
                value,
                query,
            } => self
                .ask_range(policy, spec, query, steps)
                .await
                .map(|answer| read::split_series(&v, label, value, &answer)),
            SeriesPlan::Latency { query } => self
                .ask_range(policy, spec, query, steps)
                .await
                .map(|answer| read::value_series(&v, &answer)),
            SeriesPlan::Template { stable, canary } => {
                let (s, c) = tokio::join!(
                    self.ask_range(policy, spec, stable, steps),
                    self.ask_range(policy, spec, canary, steps)
                );
                s.and_then(|s| c.map(|c| [read::template_series(&s), read::template_series(&c)]))
            }
        })
    }

    /// Sends one query to the policy's Prometheus, and tells the observer and the log.
    async fn ask(
        &self,
        policy: &Policy,
        spec: &MetricSpec,
        promql: &str,
        at: Time,
    ) -> Result<Answer, SourceError> {
        let asked = self
            .client
            .query(policy.prometheus.as_ref(), promql, at)
            .await;
        self.report(policy, spec, promql, &asked, false);
        asked.result
    }

    /// Sends one range query to the policy's Prometheus, and tells the observer and the log.
    async fn ask_range(
        &self,
        policy: &Policy,
        spec: &MetricSpec,
        promql: &str,
        steps: &Steps,
    ) -> Result<Vec<RangeSeries>, SourceError> {
        let asked = self
            .client
            .query_range(
                policy.prometheus.as_ref(),
                promql,
                steps.start,
                steps.end,
                steps.step,
            )
            .await;
        self.report(policy, spec, promql, &asked, true);
        asked.result
    }

    /// Tells the observer and the log how a query went.
    fn report<T>(
        &self,
        policy: &Policy,
        spec: &MetricSpec,
        promql: &str,
        asked: &Asked<T>,
        range: bool,
    ) {
        let error = asked.result.as_ref().err();
        if let Some(observer) = &self.observer {
            observer.query_done(&QueryRecord {
                rollout: &policy.name,
                metric: &spec.name,
                elapsed: asked.elapsed,
                attempts: asked.attempts,
                error,
                range,
            });
        }
        // A failure is logged at `warn` once per observation, for every metric it left
        // without a reading (`log_failures`); this is each query's detail.
        match error {
            Some(e) => tracing::debug!(
                rollout = %policy.name,
                metric = %spec.name,
                kind = e.kind(),
                attempts = asked.attempts,
                error = %e,
                query = promql,
                range,
                "prometheus query failed"
            ),
            None => tracing::debug!(
                rollout = %policy.name,
                metric = %spec.name,
                elapsed_ms = asked.elapsed.as_millis() as u64,
                query = promql,
                range,
                "prometheus query"
            ),
        }
    }

    /// For `check --live`: an error rate or accuracy whose marking value no series has now,
    /// with the values they have. The model server may mark events otherwise (`failure`
    /// instead of `error`): every event would then read as unmarked, a canary without errors.
    /// Only a note, as a server that creates its error series at the first error has none yet.
    async fn marked_value_note(
        &self,
        policy: &Policy,
        spec: &MetricSpec,
        at: Time,
    ) -> Option<String> {
        let (label, value, promql) = query::marked_values(policy, spec)?;
        let Ok(Answer::Vector(series)) = self.ask(policy, spec, &promql, at).await else {
            return None;
        };
        let seen: std::collections::BTreeSet<&str> = series
            .iter()
            .filter_map(|s| s.labels.get(&label).map(String::as_str))
            .collect();
        if series.is_empty() || seen.contains(&value.as_str()) {
            return None;
        }
        let key = if spec.kind == MetricKind::ErrorRate {
            "error_value"
        } else {
            "correct_value"
        };
        let seen = if seen.is_empty() {
            "none".to_owned()
        } else {
            seen.iter()
                .map(|v| format!("{v:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Some(format!(
            "no series has {label}={value:?} now (values: {seen}): if the model server marks \
             them with another value, set the policy's series.{key}; otherwise export the \
             {label}={value:?} series at 0 from startup"
        ))
    }

    /// Runs every query of `policy` once over `window` and reports, per metric and version,
    /// whether it returned data, no data, or an error. For `canaryd check --live`, which
    /// reads the last five minutes ([`Window::lookback`] from now).
    pub async fn check_live(&self, policy: &Policy, window: Window) -> LiveReport {
        let outcomes = self.read_all(policy, window).await;
        let mut metrics: Vec<LiveMetric> = outcomes
            .into_iter()
            .map(|(spec, o)| {
                let [s, c] = o.versions;
                LiveMetric {
                    name: spec.name.clone(),
                    kind: spec.kind.label(),
                    queries: o.queries,
                    series: o.series.map(|r| match r {
                        Ok([stable, canary]) => LiveSeries::Intervals { stable, canary },
                        Err(e) => LiveSeries::Error {
                            kind: e.kind(),
                            message: e.to_string(),
                        },
                    }),
                    versions: vec![
                        LiveVersion::new("stable", &policy.stable, s),
                        LiveVersion::new("canary", &policy.canary, c),
                    ],
                    note: None,
                }
            })
            .collect();
        for (m, spec) in metrics.iter_mut().zip(&policy.metrics) {
            m.note = self.marked_value_note(policy, spec, window.at).await;
        }
        LiveReport {
            policy: policy.name.clone(),
            prometheus: self.url_for(policy).to_owned(),
            at: window.at,
            metrics,
        }
    }
}

/// Logs an observation's failed queries as one line that names every metric they left
/// unavailable, with each distinct error once. Once Prometheus proves down, the metrics after
/// the first fail without being asked, so per-query lines would name only the first. A failed
/// range query leaves the metric's instant reading as it is, and is named as its series.
fn log_failures(policy: &Policy, outcomes: &[(&MetricSpec, Outcome)]) {
    let mut metrics: Vec<String> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for (spec, o) in outcomes {
        let instant: Vec<&SourceError> =
            o.versions.iter().filter_map(|v| v.as_ref().err()).collect();
        let series = match &o.series {
            Some(Err(e)) => Some(e),
            _ => None,
        };
        match (instant.is_empty(), series) {
            (true, None) => continue,
            (true, Some(_)) => metrics.push(format!("{} (per-interval series)", spec.name)),
            (false, _) => metrics.push(spec.name.clone()),
        }
        for e in instant.into_iter().chain(series) {
            let e = format!("{}: {e}", e.kind());
            if !errors.contains(&e) {
                errors.push(e);
            }
        }
    }
    if metrics.is_empty() {
        return;
    }
    tracing::warn!(
        rollout = %policy.name,
        metrics = %metrics.join(", "),
        error = %errors.join("; "),
        "prometheus queries failed for {} of {} metrics",
        metrics.len(),
        outcomes.len()
    );
}

/// How a version's reading appears in the observation: the error names the metric, so a
/// message shown on its own (API, logs, dashboards) still says where to look.
fn reading(metric: &str, r: VersionResult) -> Reading {
    match r {
        Ok(Some(sample)) => Reading::Data(sample),
        Ok(None) => Reading::NoData,
        Err(e) => Reading::Unavailable {
            error: format!("{}: metric {metric}: {e}", e.kind()),
        },
    }
}

impl MetricSource for PrometheusSource {
    fn observe<'a>(
        &'a self,
        policy: &'a Policy,
        window: Window,
    ) -> BoxFuture<'a, BTreeMap<String, MetricReading>> {
        Box::pin(async move {
            self.read_all(policy, window)
                .await
                .into_iter()
                .map(|(spec, o)| {
                    let [s, c] = o.versions;
                    let r = MetricReading {
                        stable: reading(&spec.name, s),
                        canary: reading(&spec.name, c),
                    };
                    (spec.name.clone(), r)
                })
                .collect()
        })
    }
}

/// What `canaryd check --live` found for one policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LiveReport {
    pub policy: String,
    /// The Prometheus that was asked.
    pub prometheus: String,
    /// The evaluation time of every query.
    pub at: Time,
    pub metrics: Vec<LiveMetric>,
}

/// [`LiveMetric::kind`] of a raw `query:` metric.
const QUERY_KIND: &str = "query";

/// One metric's result in a [`LiveReport`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LiveMetric {
    pub name: String,
    /// `error_rate`, `latency`, `accuracy` or `query`.
    pub kind: &'static str,
    /// The PromQL sent, so a user can paste it into Prometheus's UI.
    pub queries: Vec<String>,
    /// Stable, then canary.
    pub versions: Vec<LiveVersion>,
    /// The per-interval series' range query, for methods that need one (Mann–Whitney);
    /// absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub series: Option<LiveSeries>,
    /// Something the user should look at although every query worked: an error rate whose
    /// series have no `outcome="error"`, say (errors marked otherwise read as none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// How the range query for a metric's per-interval series went in a [`LiveReport`].
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum LiveSeries {
    /// Intervals with a value, per version.
    Intervals { stable: usize, canary: usize },
    Error {
        /// [`SourceError::kind`].
        kind: &'static str,
        message: String,
    },
}

/// One version's result in a [`LiveReport`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LiveVersion {
    /// `stable` or `canary`.
    pub role: &'static str,
    /// The version label value.
    pub version: String,
    pub outcome: LiveOutcome,
}

impl LiveVersion {
    fn new(role: &'static str, version: &str, r: VersionResult) -> Self {
        let outcome = match r {
            Ok(Some(s)) => LiveOutcome::Data {
                value: s.value,
                window_events: s.window_events,
            },
            Ok(None) => LiveOutcome::NoData,
            Err(e) => LiveOutcome::Error {
                kind: e.kind(),
                message: e.to_string(),
            },
        };
        LiveVersion {
            role,
            version: version.to_owned(),
            outcome,
        }
    }
}

/// Whether a query returned data, no data, or an error.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum LiveOutcome {
    Data {
        /// `None` when the window held no events (but the rollout's range did).
        value: Option<f64>,
        window_events: f64,
    },
    NoData,
    Error {
        /// [`SourceError::kind`].
        kind: &'static str,
        message: String,
    },
}

impl LiveReport {
    /// Whether any query failed. No data is not a failure: a canary that takes no traffic
    /// yet has none.
    pub fn has_errors(&self) -> bool {
        self.metrics
            .iter()
            .flat_map(|m| &m.versions)
            .any(|v| matches!(v.outcome, LiveOutcome::Error { .. }))
            || self
                .metrics
                .iter()
                .any(|m| matches!(m.series, Some(LiveSeries::Error { .. })))
    }
}

/// The report as `canaryd check --live` prints it.
impl fmt::Display for LiveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: asked {} at {}",
            self.policy,
            self.prometheus,
            self.at.to_rfc3339()
        )?;
        for m in &self.metrics {
            writeln!(f, "  {} ({})", m.name, m.kind)?;
            for v in &m.versions {
                write!(f, "    {} {}: ", v.role, v.version)?;
                match &v.outcome {
                    // A raw query reads a value, not events: its count is a placeholder.
                    LiveOutcome::Data { value: Some(x), .. } if m.kind == QUERY_KIND => {
                        writeln!(f, "data: {}", fmt_value(*x))?
                    }
                    LiveOutcome::Data {
                        value: Some(x),
                        window_events,
                    } => writeln!(
                        f,
                        "data: {} over {} events",
                        fmt_value(*x),
                        fmt_count(*window_events)
                    )?,
                    LiveOutcome::Data { value: None, .. } => {
                        writeln!(f, "data, but no events in the window (only earlier)")?
                    }
                    LiveOutcome::NoData => writeln!(f, "no data")?,
                    LiveOutcome::Error { kind, message } => {
                        writeln!(f, "error ({kind}): {message}")?
                    }
                }
            }
            if let Some(note) = &m.note {
                writeln!(f, "    note: {note}")?;
            }
            match &m.series {
                None => {}
                Some(LiveSeries::Intervals { stable, canary }) => writeln!(
                    f,
                    "    per-interval series (range query): stable {stable}, canary {canary} intervals"
                )?,
                Some(LiveSeries::Error { kind, message }) => writeln!(
                    f,
                    "    per-interval series (range query): error ({kind}): {message}"
                )?,
            }
        }
        // Every query worked, yet stable, which serves now, has no data anywhere: the policy
        // most likely names what Prometheus does not have.
        let stable_silent = self.metrics.iter().all(|m| {
            m.versions
                .iter()
                .filter(|v| v.role == "stable")
                .all(|v| matches!(v.outcome, LiveOutcome::NoData))
        });
        if !self.metrics.is_empty() && stable_silent {
            writeln!(
                f,
                "  note: no metric has data for stable either: check the policy's model, stable \
                 and canary versions and series names against what Prometheus has"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(value: f64, window_events: f64) -> LiveOutcome {
        LiveOutcome::Data {
            value: Some(value),
            window_events,
        }
    }

    fn metric(
        name: &str,
        kind: &'static str,
        stable: LiveOutcome,
        canary: LiveOutcome,
    ) -> LiveMetric {
        LiveMetric {
            name: name.into(),
            kind,
            queries: Vec::new(),
            versions: vec![
                LiveVersion {
                    role: "stable",
                    version: "v1".into(),
                    outcome: stable,
                },
                LiveVersion {
                    role: "canary",
                    version: "v2".into(),
                    outcome: canary,
                },
            ],
            series: None,
            note: None,
        }
    }

    fn report(metrics: Vec<LiveMetric>) -> LiveReport {
        LiveReport {
            policy: "p".into(),
            prometheus: "http://127.0.0.1:9090".into(),
            at: Time(0),
            metrics,
        }
    }

    #[test]
    fn the_raw_query_kind_is_the_policys_label() {
        let policy = crate::policy::load_str(
            "t.yaml",
            "name: t\nstable: a\ncanary: b\nstrategy: {steps: [5, 50]}\n\
             metrics:\n  - {name: q, query: 'sum(up{version=\"{{version}}\"})', max: 1}\n\
             router: {file: {path: /tmp/t.json}}\n",
        )
        .expect("valid policy");
        assert_eq!(policy.metrics[0].kind.label(), QUERY_KIND);
    }

    /// Regression: a raw query printed "data: 30 over 1 events", though it has no events.
    #[test]
    fn check_live_shows_a_raw_querys_value_alone_and_counts_rounded() {
        let report = report(vec![
            metric(
                "conversion",
                QUERY_KIND,
                data(30.0, 1.0),
                data(0.1 + 0.2, 1.0),
            ),
            metric(
                "errors",
                "error_rate",
                data(0.01, 1234.5),
                data(0.02, 29.900000000000002),
            ),
        ]);
        let text = report.to_string();
        for want in [
            "    stable v1: data: 30\n",
            "    canary v2: data: 0.3\n",
            "    stable v1: data: 0.01 over 1234 events\n",
            "    canary v2: data: 0.02 over 29.9 events\n",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        assert!(!text.contains("note:"), "{text}");
    }

    /// UAT: a policy whose model was misspelt passed `check --live` with "no data" for every
    /// metric and version, and nothing more.
    #[test]
    fn check_live_notes_a_stable_without_data_anywhere() {
        let report = report(vec![
            metric(
                "errors",
                "error_rate",
                LiveOutcome::NoData,
                LiveOutcome::NoData,
            ),
            metric("p99", "latency", LiveOutcome::NoData, LiveOutcome::NoData),
        ]);
        let text = report.to_string();
        assert!(
            text.contains("note: no metric has data for stable either: check the policy's model"),
            "{text}"
        );
    }
}
