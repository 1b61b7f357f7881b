//! The threshold judge: Flagger's and Argo Rollouts' fixed bounds, checked on the values over
//! the analysis window, with canary-vs-stable comparison built in.

use super::{
    BoundCheck, BoundKind, JudgeContext, MetricReport, Unit, Verdict, fmt_count, fmt_value,
};
use crate::observation::{MetricReading, Reading};
use crate::policy::MetricSpec;

/// Where the reference (stable) value for relative bounds comes from.
enum Reference {
    Value(f64),
    NoData,
    Unavailable,
}

pub fn judge(ctx: &JudgeContext, spec: &MetricSpec, reading: &MetricReading) -> MetricReport {
    // In the metric's unit, as its bounds are written (`10.285%` beside `max 2%`).
    let shown = |v: f64| Unit::of(spec).map_or_else(|| fmt_value(v), |u| u.show(v));
    let mut report = MetricReport::blank(ctx, spec, reading);
    let min = spec.min_samples as f64;
    let canary = match &reading.canary {
        Reading::Unavailable { error } => {
            report.verdict = Verdict::Unavailable;
            report.note = format!("canary unavailable: {error}");
            return report;
        }
        Reading::NoData => {
            report.verdict = Verdict::NoData;
            report.note = "no data for the canary".into();
            return report;
        }
        // NaN is what Prometheus returns for 0/0 (a rate over no requests): no data, not a
        // value that breaks every bound.
        Reading::Data(s) => match s.value {
            Some(v) if s.window_events >= min && !v.is_nan() => v,
            _ => {
                report.verdict = Verdict::NoData;
                report.note = format!(
                    "canary has {} events, needs {}",
                    fmt_count(s.window_events),
                    spec.min_samples
                );
                return report;
            }
        },
    };
    let reference = if let Some(b) = ctx.baseline {
        report.stable = Some(b);
        Reference::Value(b)
    } else {
        match &reading.stable {
            Reading::Unavailable { .. } => Reference::Unavailable,
            Reading::NoData => Reference::NoData,
            Reading::Data(s) => match s.value {
                Some(v) if s.window_events >= min && !v.is_nan() => Reference::Value(v),
                _ => Reference::NoData,
            },
        }
    };

    let b = &spec.bounds;
    report.bounds.extend(absolute_checks(b, canary));
    let stable_value = match reference {
        Reference::Value(v) => Some(v),
        _ => None,
    };
    if let Some(t) = &b.max_increase {
        let limit = stable_value.map(|s| t.upper(s));
        report
            .bounds
            .push(check(BoundKind::MaxIncrease, &t.written, limit, canary));
    }
    if let Some(t) = &b.max_decrease {
        let limit = stable_value.map(|s| t.lower(s));
        report
            .bounds
            .push(check(BoundKind::MaxDecrease, &t.written, limit, canary));
    }

    let broken: Vec<String> = report
        .bounds
        .iter()
        .filter(|c| c.ok == Some(false))
        .map(|c| format!("{} {}", c.kind.as_str(), c.written))
        .collect();
    if !broken.is_empty() {
        report.verdict = Verdict::Fail;
        report.note = format!("canary {} breaks {}", shown(canary), broken.join(", "));
    } else if report.bounds.iter().any(|c| c.ok.is_none()) {
        match reference {
            Reference::Unavailable => {
                report.verdict = Verdict::Unavailable;
                report.note = "stable unavailable for the comparison".into();
            }
            _ => {
                report.verdict = Verdict::NoData;
                report.note = "no data for stable to compare with".into();
            }
        }
    } else {
        report.verdict = Verdict::Pass;
        report.promotable = true;
        report.note = format!("canary {} within bounds", shown(canary));
    }
    report
}

/// The canary's value against the absolute bounds (`max`, `min`).
pub(super) fn absolute_checks(b: &crate::policy::Bounds, canary: f64) -> Vec<BoundCheck> {
    let max = b
        .max
        .iter()
        .map(|m| check(BoundKind::Max, &m.written, Some(m.value), canary));
    let min = b
        .min
        .iter()
        .map(|m| check(BoundKind::Min, &m.written, Some(m.value), canary));
    max.chain(min).collect()
}

fn check(kind: BoundKind, written: &str, limit: Option<f64>, canary: f64) -> BoundCheck {
    let ok = limit.map(|l| match kind {
        BoundKind::Max | BoundKind::MaxIncrease => canary <= l,
        BoundKind::Min | BoundKind::MaxDecrease => canary >= l,
    });
    BoundCheck {
        kind,
        written: written.to_owned(),
        limit,
        ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::Sample;
    use crate::policy::Method;

    /// Regression: `increase()` extrapolates, and the reason read "canary has
    /// 29.900000000000002 events, needs 30".
    #[test]
    fn a_fractional_event_count_reads_rounded_in_the_note() {
        let policy = crate::policy::load_str(
            "t.yaml",
            "name: t\nstable: a\ncanary: b\nstrategy: {steps: [5, 50]}\n\
             analysis: {method: threshold}\n\
             metrics:\n  - {name: errors, builtin: error_rate, max: 5%, min_samples: 30}\n\
             router: {file: {path: /tmp/t.json}}\n",
        )
        .expect("valid policy");
        let ctx = JudgeContext {
            method: Method::Threshold,
            confidence: 0.95,
            metric_count: 1,
            baseline: None,
            configured_weight: 5.0,
        };
        let sample = |events: f64| {
            Reading::Data(Sample {
                value: Some(0.01),
                window_events: events,
                ..Sample::default()
            })
        };
        let reading = MetricReading {
            stable: sample(1000.0),
            canary: sample(29.900000000000002),
        };
        let r = judge(&ctx, &policy.metrics[0], &reading);
        assert_eq!(r.verdict, Verdict::NoData);
        assert_eq!(r.note, "canary has 29.9 events, needs 30");
        // UAT: the note read "canary 0.10285 breaks max 5%", a ratio beside a percentage.
        let bad = MetricReading {
            stable: sample(1000.0),
            canary: Reading::Data(Sample {
                value: Some(0.10285),
                window_events: 1000.0,
                ..Sample::default()
            }),
        };
        let r = judge(&ctx, &policy.metrics[0], &bad);
        assert_eq!(r.verdict, Verdict::Fail);
        assert_eq!(r.note, "canary 10.285% breaks max 5%");
        assert_eq!(super::Unit::Seconds.show(0.0973), "97.3ms");
        assert_eq!(super::Unit::Seconds.show(1.25), "1.25s");
    }
}
