//! Per-metric verdicts. A judge looks at one metric's reading for both versions and says
//! pass, fail, hold (wants more data), no data, or unavailable — with the numbers behind it.
//!
//! Judges are pure. Those that accumulate evidence across analyses (the sequential tests) keep
//! it in a [`JudgeMemory`] that lives in the rollout state, so it is persisted with it.

pub mod mann_whitney;
pub mod sequential;
pub mod threshold;

use crate::observation::{MetricReading, Reading, Sample};
use crate::policy::{Method, MetricKind, MetricSpec};
use serde::{Deserialize, Serialize};

/// One metric's verdict in one analysis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Within bounds (or no evidence of harm): the rollout may go on.
    Pass,
    /// Out of bounds (or evidence of harm).
    Fail,
    /// Data is arriving but does not yet suffice to judge; neither pass nor fail.
    Hold,
    /// No data for the canary (or for stable where a comparison needs it).
    NoData,
    /// The source could not be asked; says nothing about the canary.
    Unavailable,
}

impl Verdict {
    pub const ALL: [Verdict; 5] = [
        Verdict::Pass,
        Verdict::Fail,
        Verdict::Hold,
        Verdict::NoData,
        Verdict::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Hold => "hold",
            Verdict::NoData => "no-data",
            Verdict::Unavailable => "unavailable",
        }
    }
}

/// Which bound a check is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoundKind {
    Min,
    Max,
    MaxIncrease,
    MaxDecrease,
}

impl BoundKind {
    pub const ALL: [BoundKind; 4] = [
        BoundKind::Min,
        BoundKind::Max,
        BoundKind::MaxIncrease,
        BoundKind::MaxDecrease,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BoundKind::Min => "min",
            BoundKind::Max => "max",
            BoundKind::MaxIncrease => "max_increase",
            BoundKind::MaxDecrease => "max_decrease",
        }
    }
}

/// One bound of a metric, evaluated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoundCheck {
    pub kind: BoundKind,
    /// The bound as the user wrote it (`1%`, `10%`, `20ms`).
    pub written: String,
    /// The limit on the canary's value this analysis, when it could be computed.
    pub limit: Option<f64>,
    /// Whether the canary is within it; `None` when it could not be checked.
    pub ok: Option<bool>,
}

/// Statistical evidence of a sequential or fixed-horizon judge.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Name of the statistic (`e-value`, `mann-whitney`).
    pub test: String,
    /// Natural log of the e-value against "the canary is within its tolerance".
    pub log_e_value: Option<f64>,
    /// The log e-value at which the test rejects: ln(1/α) for this metric.
    pub log_threshold: Option<f64>,
    /// Natural log of the e-value for "the canary is good", when the judge runs one.
    pub log_e_value_good: Option<f64>,
    /// Point estimate of the canary-vs-stable effect (difference or ratio, per `test`).
    pub estimate: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    /// Whether the router's realised share differs from the configured weight.
    #[serde(default)]
    pub share_mismatch: bool,
}

/// One metric's verdict and everything it was based on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricReport {
    pub metric: String,
    pub method: Method,
    /// Stable's value over the window (or the recorded baseline where stable is gone).
    pub stable: Option<f64>,
    pub canary: Option<f64>,
    pub stable_events: f64,
    pub canary_events: f64,
    pub bounds: Vec<BoundCheck>,
    pub verdict: Verdict,
    /// Whether the evidence suffices to promote (not just to go on).
    pub promotable: bool,
    pub evidence: Option<Evidence>,
    /// One line for people saying why.
    pub note: String,
    /// What the values and limits measure, for showing them (`97.3ms`, `1.2%`); none for a
    /// raw query's values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<Unit>,
    /// The sequential judge compares a rate with a relative tolerance by its bad events, and
    /// there are too few of them (a rare error, say) for even a canary identical to stable to
    /// have been shown within tolerance: at the progress deadline the rollout then waits for an
    /// operator rather than rolling back a canary nothing speaks against.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub thin_evidence: bool,
}

/// What a metric's values measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unit {
    /// Latency, in seconds.
    Seconds,
    /// A share: error rate, accuracy.
    Ratio,
}

impl Unit {
    /// `v` as people read this unit: latency in milliseconds or seconds (`97.3ms`, `1.25s`),
    /// a share in percent (`10.285%`).
    pub fn show(self, v: f64) -> String {
        if !v.is_finite() {
            return v.to_string();
        }
        match self {
            Unit::Seconds if v.abs() < 1.0 => format!("{}ms", fmt_decimals(v * 1000.0, 1)),
            Unit::Seconds => format!("{}s", fmt_decimals(v, 3)),
            Unit::Ratio => format!("{}%", fmt_decimals(v * 100.0, 3)),
        }
    }

    pub fn of(spec: &MetricSpec) -> Option<Unit> {
        match spec.kind {
            MetricKind::Latency { .. } => Some(Unit::Seconds),
            MetricKind::ErrorRate | MetricKind::Accuracy => Some(Unit::Ratio),
            MetricKind::Query { .. } => None,
        }
    }
}

impl MetricReport {
    /// Whether the evidence leans towards harm: a sequential e-value past the fraction of its
    /// threshold at which the judge holds the step (`sequential::SUSPICION`).
    pub fn suspicious(&self) -> bool {
        self.evidence.as_ref().is_some_and(|e| {
            matches!((e.log_e_value, e.log_threshold), (Some(v), Some(t))
                if v >= sequential::SUSPICION * t)
        })
    }

    /// A report holding both versions' window values and event counts, verdict `Hold`, for a
    /// judge to complete.
    pub fn blank(ctx: &JudgeContext, spec: &MetricSpec, reading: &MetricReading) -> MetricReport {
        MetricReport {
            metric: spec.name.clone(),
            method: ctx.method,
            stable: reading.stable.sample().and_then(|s| s.value),
            canary: reading.canary.sample().and_then(|s| s.value),
            stable_events: reading.stable.sample().map_or(0.0, |s| s.window_events),
            canary_events: reading.canary.sample().map_or(0.0, |s| s.window_events),
            bounds: Vec::new(),
            verdict: Verdict::Hold,
            promotable: false,
            evidence: None,
            note: String::new(),
            unit: Unit::of(spec),
            thin_evidence: false,
        }
    }
}

/// The canary's sample and stable's (if it has one), or `None` with the report's verdict and
/// note set to why the judge cannot look: a version unavailable, or no data for the canary.
pub fn samples<'a>(
    report: &mut MetricReport,
    reading: &'a MetricReading,
) -> Option<(&'a Sample, Option<&'a Sample>)> {
    let canary = match &reading.canary {
        Reading::Unavailable { error } => {
            report.verdict = Verdict::Unavailable;
            report.note = format!("canary unavailable: {error}");
            return None;
        }
        Reading::NoData => {
            report.verdict = Verdict::NoData;
            report.note = "no data for the canary".into();
            return None;
        }
        Reading::Data(s) => s,
    };
    let stable = match &reading.stable {
        Reading::Unavailable { error } => {
            report.verdict = Verdict::Unavailable;
            report.note = format!("stable unavailable: {error}");
            return None;
        }
        Reading::NoData => None,
        Reading::Data(s) => Some(s),
    };
    Some((canary, stable))
}

/// An event count for people. Counts read through `increase()` are extrapolated, so they are
/// fractional: whole counts (and float noise around them) show without decimals, others with
/// one decimal, rounded down so that a count short of `min_samples` never reads as enough
/// (29.97 shows as 29.9, not 30). From a thousand on, decimals say nothing.
pub fn fmt_count(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    let whole = x.round();
    if (x - whole).abs() <= 1e-9 * whole.abs().max(1.0) {
        return format!("{whole:.0}");
    }
    if x.abs() >= 1000.0 {
        return format!("{:.0}", x.floor());
    }
    // The small nudge keeps 29.9, stored as 29.899999…, from showing as 29.8.
    let tenths = (x * 10.0 + 1e-6).floor() / 10.0;
    trim_zeros(format!("{tenths:.1}"))
}

/// A metric's value for people: at most six decimals, without trailing zeros.
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let shown = trim_zeros(format!("{v:.6}"));
    // A value too small for six decimals would read as 0.
    if shown == "0" || shown == "-0" {
        if v == 0.0 {
            "0".into()
        } else {
            format!("{v:.2e}")
        }
    } else {
        shown
    }
}

/// `x` to at most `decimals` decimals, without trailing zeros (`5`, `2.5`).
pub fn fmt_decimals(x: f64, decimals: usize) -> String {
    trim_zeros(format!("{x:.decimals$}"))
}

fn trim_zeros(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// What a judge may remember between analyses of one metric in one rollout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgeMemory {
    /// Raw per-analysis values seen so far, for distribution judges; bounded in length.
    #[serde(default)]
    pub history_stable: Vec<f64>,
    #[serde(default)]
    pub history_canary: Vec<f64>,
    /// The sequential judge's accumulated evidence and the counts it last saw.
    #[serde(default)]
    pub sequential: Option<sequential::SequentialMemory>,
}

/// What a judge needs besides the reading.
#[derive(Clone, Debug, PartialEq)]
pub struct JudgeContext {
    pub method: Method,
    pub confidence: f64,
    /// Number of metrics in the policy, for splitting the error budget.
    pub metric_count: usize,
    /// Stable's value recorded earlier, used for relative bounds where stable has no traffic
    /// now (blue-green after the switch, the post-promotion watch).
    pub baseline: Option<f64>,
    /// The canary weight configured on the router now, in percent.
    pub configured_weight: f64,
}

/// Judges one metric.
pub fn evaluate(
    ctx: &JudgeContext,
    spec: &MetricSpec,
    reading: &MetricReading,
    memory: &mut JudgeMemory,
) -> MetricReport {
    match ctx.method {
        Method::Threshold => threshold::judge(ctx, spec, reading),
        Method::Sequential => sequential::judge(ctx, spec, reading, memory),
        Method::MannWhitney => mann_whitney::judge(ctx, spec, reading, memory),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_rounded_down_to_a_tenth_and_never_as_enough_when_short() {
        let cases = [
            (29.900000000000002, "29.9"),
            (29.9, "29.9"),
            (29.97, "29.9"),
            (30.000000000000004, "30"),
            (30.0, "30"),
            (0.0, "0"),
            (0.25, "0.2"),
            (100.5, "100.5"),
            (1234.56, "1234"),
            (1e6, "1000000"),
            (f64::NAN, "NaN"),
        ];
        for (x, want) in cases {
            assert_eq!(fmt_count(x), want, "{x}");
        }
    }

    #[test]
    fn values_show_at_most_six_decimals() {
        let cases = [
            (0.1 + 0.2, "0.3"),
            (0.012345678, "0.012346"),
            (250.0, "250"),
            (-1.5, "-1.5"),
            (0.0, "0"),
            (1.234e-9, "1.23e-9"),
        ];
        for (x, want) in cases {
            assert_eq!(fmt_value(x), want, "{x}");
        }
    }
}
