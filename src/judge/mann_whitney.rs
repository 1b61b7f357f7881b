//! The Mann–Whitney judge: Kayenta's fixed-horizon classifier, a peer of the sequential judge.
//!
//! Each analysis compares the per-interval values of both versions (`Sample::series`, or the
//! values remembered from earlier analyses when the shell gives none) with the Wilcoxon
//! rank-sum confidence interval of the location shift at 98 % (normal approximation with
//! continuity and tie corrections, as R's `wilcox.test(conf.int = TRUE)` computes it) and
//! Kayenta's rules: the canary is "high" when the interval lies above 25 % of the
//! Hodges–Lehmann estimate *and* the effect size (ratio of means) exceeds what the policy
//! tolerates. It has no error control under repeated looks; that is what the benchmark shows.

use super::{
    BoundCheck, BoundKind, Evidence, JudgeContext, JudgeMemory, MetricReport, Verdict, samples,
};
use crate::observation::MetricReading;
use crate::policy::{MetricKind, MetricSpec, ToleranceKind};
use statrs::distribution::{ContinuousCDF, Normal};

/// Kayenta's confidence level for the interval of the shift.
pub const CONFIDENCE: f64 = 0.98;
/// Kayenta's tolerance: the interval must clear this fraction of the estimate's magnitude.
pub const TOLERANCE: f64 = 0.25;
/// Per-interval values each version needs before the judge classifies anything.
pub const MIN_POINTS: usize = 8;
/// The most values remembered per version when the shell gives no series.
const HISTORY_LIMIT: usize = 720;

/// A location-shift interval and its Hodges–Lehmann-type estimate, for `x − y`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShiftInterval {
    pub low: f64,
    pub high: f64,
    pub estimate: f64,
}

/// Why no interval could be computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShiftError {
    /// A sample is empty.
    Empty,
    /// Every observation is tied, so the rank statistic has no variance.
    AllTied,
}

/// The standardised rank-sum statistic of `x − mu` against `y`, minus `zq`: R's `wdiff`.
/// Its root in `mu` is the interval end (for `zq` a normal quantile) or the estimate
/// (for `zq = 0` without continuity correction).
pub fn wilcoxon_diff(
    mu: f64,
    zq: f64,
    x: &[f64],
    y: &[f64],
    correct: bool,
) -> Result<f64, ShiftError> {
    let mut xs = x.to_vec();
    let mut ys = y.to_vec();
    xs.sort_by(f64::total_cmp);
    ys.sort_by(f64::total_cmp);
    wdiff_sorted(mu, zq, &xs, &ys, correct)
}

/// [`wilcoxon_diff`] on sorted samples: one merge of the two, O(n) and without allocation,
/// since shifting `x` by `mu` keeps it sorted. Ties are exact float equality, as R's `rank`.
fn wdiff_sorted(
    mu: f64,
    zq: f64,
    xs: &[f64],
    ys: &[f64],
    correct: bool,
) -> Result<f64, ShiftError> {
    if xs.is_empty() || ys.is_empty() {
        return Err(ShiftError::Empty);
    }
    let nx = xs.len() as f64;
    let ny = ys.len() as f64;
    let (mut i, mut j) = (0usize, 0usize);
    let mut pos = 0.0;
    let mut rank_sum_x = 0.0;
    let mut ties = 0.0;
    while i < xs.len() || j < ys.len() {
        let vx = xs.get(i).map(|v| v - mu);
        let vy = ys.get(j).copied();
        let v = match (vx, vy) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => break,
        };
        let mut cx = 0.0;
        while i < xs.len() && xs[i] - mu == v {
            cx += 1.0;
            i += 1;
        }
        let mut cy = 0.0;
        while j < ys.len() && ys[j] == v {
            cy += 1.0;
            j += 1;
        }
        let t = cx + cy;
        // The group takes ranks pos+1 ..= pos+t; each member gets their average.
        rank_sum_x += cx * (pos + (t + 1.0) / 2.0);
        ties += t * t * t - t;
        pos += t;
    }
    let dz = rank_sum_x - nx * (nx + 1.0) / 2.0 - nx * ny / 2.0;
    let n = nx + ny;
    let sigma = ((nx * ny / 12.0) * ((n + 1.0) - ties / (n * (n - 1.0)))).sqrt();
    if sigma.is_nan() || sigma <= 0.0 {
        return Err(ShiftError::AllTied);
    }
    let correction = if correct && dz != 0.0 {
        0.5 * dz.signum()
    } else {
        0.0
    };
    Ok((dz - correction) / sigma - zq)
}

/// The confidence interval (two-sided, level `confidence`) and estimate of the shift `x − y`.
pub fn shift_interval(x: &[f64], y: &[f64], confidence: f64) -> Result<ShiftInterval, ShiftError> {
    if x.is_empty() || y.is_empty() {
        return Err(ShiftError::Empty);
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mu_min = min(x) - max(y);
    let mu_max = max(x) - min(y);
    let alpha = 1.0 - confidence;
    let z = upper_quantile(alpha / 2.0);
    let mut xs = x.to_vec();
    let mut ys = y.to_vec();
    xs.sort_by(f64::total_cmp);
    ys.sort_by(f64::total_cmp);
    // The statistic is a non-increasing step function of mu that jumps where mu equals a
    // pairwise difference; bisection finds the jump through zero to far better than R's
    // uniroot tolerance of 1e-4, whatever the data's scale.
    let tol = (mu_max - mu_min).abs() * 1e-12;
    let root = |zq: f64, correct: bool| -> Result<f64, ShiftError> {
        let f = |mu: f64| wdiff_sorted(mu, zq, &xs, &ys, correct);
        if f(mu_min)? <= 0.0 {
            return Ok(mu_min);
        }
        if f(mu_max)? >= 0.0 {
            return Ok(mu_max);
        }
        let (mut lo, mut hi) = (mu_min, mu_max);
        while hi - lo > tol {
            let mid = lo + (hi - lo) / 2.0;
            if mid <= lo || mid >= hi {
                break;
            }
            let v = f(mid)?;
            if v == 0.0 {
                return Ok(mid);
            }
            if v > 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo + (hi - lo) / 2.0)
    };
    let low = root(z, true)?;
    let high = root(-z, true)?;
    let estimate = root(0.0, false)?;
    Ok(ShiftInterval {
        low,
        high,
        estimate,
    })
}

/// The standard normal quantile with upper-tail probability `p`.
pub fn upper_quantile(p: f64) -> f64 {
    match Normal::new(0.0, 1.0) {
        Ok(n) => -n.inverse_cdf(p),
        Err(_) => f64::NAN,
    }
}

/// Judges one metric the way Kayenta would.
pub fn judge(
    ctx: &JudgeContext,
    spec: &MetricSpec,
    reading: &MetricReading,
    memory: &mut JudgeMemory,
) -> MetricReport {
    let mut report = MetricReport::blank(ctx, spec, reading);
    let Some((canary, stable)) = samples(&mut report, reading) else {
        return report;
    };
    let clean = |v: &[f64]| -> Vec<f64> { v.iter().copied().filter(|x| x.is_finite()).collect() };
    // Prefer the shell's per-interval series; otherwise build one from the window values.
    let (xs, ys) = if !canary.series.is_empty() {
        (
            clean(&canary.series),
            stable.map(|s| clean(&s.series)).unwrap_or_default(),
        )
    } else {
        remember(&mut memory.history_canary, canary.value);
        remember(&mut memory.history_stable, stable.and_then(|s| s.value));
        (clean(&memory.history_canary), clean(&memory.history_stable))
    };
    if canary.window_events < spec.min_samples as f64 || xs.len() < MIN_POINTS {
        report.verdict = Verdict::NoData;
        report.note = format!(
            "canary has {} values over {} events, needs {MIN_POINTS} values and {} events",
            xs.len(),
            super::fmt_count(canary.window_events),
            spec.min_samples
        );
        return report;
    }
    // Absolute bounds are checked on the canary's value over the window, as Kayenta's users
    // do with a separate threshold metric.
    let b = &spec.bounds;
    let value = canary.value.unwrap_or(f64::NAN);
    let mut broken = Vec::new();
    if let Some(max) = &b.max {
        let ok = value.is_finite().then_some(value <= max.value);
        report.bounds.push(BoundCheck {
            kind: BoundKind::Max,
            written: max.written.clone(),
            limit: Some(max.value),
            ok,
        });
        if ok == Some(false) {
            broken.push(format!("max {}", max.written));
        }
    }
    if let Some(min) = &b.min {
        let ok = value.is_finite().then_some(value >= min.value);
        report.bounds.push(BoundCheck {
            kind: BoundKind::Min,
            written: min.written.clone(),
            limit: Some(min.value),
            ok,
        });
        if ok == Some(false) {
            broken.push(format!("min {}", min.written));
        }
    }
    if b.is_relative() && ys.len() < MIN_POINTS {
        report.verdict = Verdict::NoData;
        report.note = format!("stable has {} values, needs {MIN_POINTS}", ys.len());
        return report;
    }
    let mut evidence = Evidence {
        test: "mann-whitney".into(),
        ..Evidence::default()
    };
    if b.is_relative() {
        let higher_is_worse = !matches!(spec.kind, MetricKind::Accuracy);
        match classify(&xs, &ys, spec, higher_is_worse) {
            Ok(c) => {
                evidence.estimate = Some(c.interval.estimate);
                evidence.ci_low = Some(c.interval.low);
                evidence.ci_high = Some(c.interval.high);
                if let Some(t) = &b.max_increase {
                    report.bounds.push(BoundCheck {
                        kind: BoundKind::MaxIncrease,
                        written: t.written.clone(),
                        limit: Some(c.limit),
                        ok: Some(!c.worse),
                    });
                }
                if let Some(t) = &b.max_decrease {
                    report.bounds.push(BoundCheck {
                        kind: BoundKind::MaxDecrease,
                        written: t.written.clone(),
                        limit: Some(c.limit),
                        ok: Some(!c.worse),
                    });
                }
                if c.worse {
                    broken.push(format!(
                        "the shift's {:.0}% interval [{:.6}, {:.6}] and effect {:.4} ({})",
                        CONFIDENCE * 100.0,
                        c.interval.low,
                        c.interval.high,
                        c.effect,
                        if higher_is_worse { "high" } else { "low" }
                    ));
                }
            }
            // Identical or all-tied samples: Kayenta passes them.
            Err(ShiftError::AllTied) => {}
            Err(ShiftError::Empty) => {
                report.verdict = Verdict::NoData;
                report.note = "no values to compare".into();
                return report;
            }
        }
    }
    report.evidence = Some(evidence);
    if broken.is_empty() {
        report.verdict = Verdict::Pass;
        report.promotable = true;
        report.note = format!(
            "{} canary values vs {} stable: no significant regression",
            xs.len(),
            ys.len()
        );
    } else {
        report.verdict = Verdict::Fail;
        report.note = format!("canary breaks {}", broken.join(", "));
    }
    report
}

/// Kayenta's classification of the canary values `x` against stable's `y`.
struct Classification {
    interval: ShiftInterval,
    /// Ratio of means (canary / stable), Kayenta's default effect size.
    effect: f64,
    /// The effect size allowed by the policy's tolerance.
    limit: f64,
    worse: bool,
}

fn classify(
    x: &[f64],
    y: &[f64],
    spec: &MetricSpec,
    higher_is_worse: bool,
) -> Result<Classification, ShiftError> {
    if sorted(x) == sorted(y) {
        return Err(ShiftError::AllTied);
    }
    let interval = shift_interval(x, y, CONFIDENCE)?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mx, my) = (mean(x), mean(y));
    let critical = TOLERANCE * interval.estimate.abs();
    let b = &spec.bounds;
    // The policy's tolerance plays Kayenta's allowedIncrease / allowedDecrease; an absolute
    // tolerance is converted to a ratio at stable's mean.
    let ratio_limit = |t: &crate::policy::Tolerance, up: bool| -> f64 {
        match (t.kind, up) {
            (ToleranceKind::Relative, true) => 1.0 + t.amount,
            (ToleranceKind::Relative, false) => 1.0 - t.amount,
            (ToleranceKind::Absolute, true) if my != 0.0 => (my + t.amount) / my,
            (ToleranceKind::Absolute, false) if my != 0.0 => (my - t.amount) / my,
            _ => 1.0,
        }
    };
    let effect = if my != 0.0 {
        mx / my
    } else if mx == 0.0 {
        1.0
    } else {
        f64::INFINITY
    };
    let (worse, limit) = if higher_is_worse {
        let limit = b
            .max_increase
            .as_ref()
            .map_or(1.0, |t| ratio_limit(t, true));
        (interval.low > critical && effect > limit, limit)
    } else {
        let limit = b
            .max_decrease
            .as_ref()
            .map_or(1.0, |t| ratio_limit(t, false));
        (interval.high < -critical && effect < limit, limit)
    };
    Ok(Classification {
        interval,
        effect,
        limit,
        worse,
    })
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

fn remember(history: &mut Vec<f64>, value: Option<f64>) {
    if let Some(v) = value.filter(|v| v.is_finite()) {
        history.push(v);
        if history.len() > HISTORY_LIMIT {
            let excess = history.len() - HISTORY_LIMIT;
            history.drain(..excess);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/kayenta_mannwhitney_vectors.json"
        );
        let text = std::fs::read_to_string(path).expect("the Kayenta vectors are in tests/data");
        serde_json::from_str(&text).expect("the Kayenta vectors are JSON")
    }

    fn array(case: &Value, name: &str) -> Vec<f64> {
        case["arrays"][name]
            .as_array()
            .unwrap_or_else(|| panic!("array {name}"))
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect()
    }

    /// The expected number of an assertion: a literal, or the name of an R value.
    fn expected(case: &Value, field: &str) -> f64 {
        field
            .parse::<f64>()
            .ok()
            .or_else(|| case["r_values"][field].as_f64())
            .unwrap_or_else(|| panic!("expected value {field}"))
    }

    fn close(what: &str, got: f64, want: f64) {
        assert!((got - want).abs() <= 1e-4, "{what}: got {got}, want {want}");
    }

    fn assertions(case: &Value) -> Vec<(f64, String)> {
        case["asserts"]
            .as_array()
            .expect("asserts")
            .iter()
            .map(|a| {
                (
                    expected(case, a[0].as_str().expect("text")),
                    a[1].as_str().expect("text").to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn wilcoxon_diff_matches_kayenta() {
        let v = vectors();
        let case = &v["Wilcoxon Diff Function"];
        let (x, y) = (array(case, "x"), array(case, "y"));
        let a = assertions(case);
        assert_eq!(a.len(), 2);
        close(
            "wdiff(0)",
            wilcoxon_diff(0.0, 0.0, &x, &y, true).unwrap(),
            a[0].0,
        );
        close(
            "wdiff(5)",
            wilcoxon_diff(5.0, 0.0, &x, &y, true).unwrap(),
            a[1].0,
        );
    }

    #[test]
    fn z_quantile_matches_kayenta() {
        let v = vectors();
        let a = assertions(&v["Test zQuant"]);
        // Kayenta's zQuant is the lower 1 % quantile: the end of a two-sided 98 % interval.
        close("zQuant", -upper_quantile((1.0 - CONFIDENCE) / 2.0), a[0].0);
    }

    #[test]
    fn intervals_match_kayenta_and_r() {
        let v = vectors();
        let cases = [
            (
                "Mann-Whitney Confidence Interval & Estimate",
                "experimentData",
                "controlData",
            ),
            (
                "Mann-Whitney Confidence Interval & Estimate: Problem Case",
                "experiment",
                "control",
            ),
            (
                "Mann-Whitney Confidence Interval & Estimate: Tie out with R Version",
                "experiment",
                "control",
            ),
            (
                "Mann-Whitney Confidence Interval & Estimate: Tie out with R Version (Large)",
                "experiment",
                "control",
            ),
        ];
        for (name, xe, yc) in cases {
            let case = &v[name];
            let conf = case["confidenceLevel"].as_f64().expect("confidence");
            let r = shift_interval(&array(case, xe), &array(case, yc), conf).expect("interval");
            for (want, what) in assertions(case) {
                let got = match what.as_str() {
                    "result.confidenceInterval.head" => r.low,
                    "result.confidenceInterval.last" => r.high,
                    "result.estimate" => r.estimate,
                    other => panic!("unknown assertion {other}"),
                };
                close(&format!("{name}: {what}"), got, want);
            }
        }
    }

    #[test]
    fn intermediate_values_match_r() {
        let v = vectors();
        let case = &v["Mann-Whitney Intermediate Values / Variables"];
        let (x, y) = (array(case, "x"), array(case, "y"));
        let conf = case["confidenceLevel"].as_f64().expect("confidence");
        let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (mu_min, mu_max) = (min(&x) - max(&y), max(&x) - min(&y));
        let zl = upper_quantile((1.0 - conf) / 2.0);
        let zu = -zl;
        let r = shift_interval(&x, &y, conf).expect("interval");
        let wd = |mu: f64, zq: f64| wilcoxon_diff(mu, zq, &x, &y, true).unwrap();
        let asserted = assertions(case);
        assert_eq!(asserted.len(), 11);
        for (want, what) in asserted {
            let got = match what.as_str() {
                "muMin" => mu_min,
                "muMax" => mu_max,
                "zqLower" => zl,
                "zqUpper" => zu,
                "fLower1" => wd(mu_min, zl),
                "fUpper1" => wd(mu_max, zl),
                "fLower2" => wd(mu_min, zu),
                "fUpper2" => wd(mu_max, zu),
                "ciLower" => r.low,
                "ciUpper" => r.high,
                "estimate" => r.estimate,
                other => panic!("unknown assertion {other}"),
            };
            close(&what, got, want);
        }
    }

    #[test]
    fn every_vector_case_is_covered() {
        // A new case in the vectors file must get a test here, not be skipped silently.
        let v = vectors();
        assert_eq!(v.as_object().expect("object").len(), 7);
    }

    #[test]
    fn all_tied_samples_have_no_interval() {
        assert_eq!(
            shift_interval(&[1.0, 1.0], &[1.0, 1.0], 0.98),
            Err(ShiftError::AllTied)
        );
        assert_eq!(shift_interval(&[], &[1.0], 0.98), Err(ShiftError::Empty));
    }
}
