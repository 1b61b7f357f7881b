//! The sequential judge: anytime-valid tests on the counters of both versions.
//!
//! Every analysis differences the cumulative counts (errors, slow requests, incorrect
//! predictions, and the totals) against those it saw last, and updates e-processes with the
//! increments. The tests condition on the realised counts, as Lindon & Malek's multinomial
//! tests do: given how many requests each version really served in an increment and how many
//! bad events both had together, the number that fell on the canary is binomial with a
//! success probability fixed by the ratio of the two versions' bad-event rates. Load that
//! changes over time, weights that change between steps and a router that sends a different
//! share than configured all cancel out of that conditional law, so none of them can bias the
//! test.
//!
//! Two families of e-processes run per bound:
//!
//! * **rollback** (`log_e_value`): the null is "the canary is within its tolerance" (rate
//!   ratio `r ≤ r0`); alternatives are a grid of ratios above `r0`. The false-rollback
//!   probability of a canary within tolerance is at most α however often the judge looks.
//!   Each alternative is also run as a *betting* martingale `∏(1 − λ + λ·LR)` with small `λ`,
//!   whose value cannot fall by more than `ln(1 − λ)` per look: a canary that was good for
//!   ten minutes and then degrades is caught in a few looks instead of having to first undo
//!   all the evidence of its good past.
//! * **promotion** (`log_e_value_good`): the null is "the canary is worse by at least twice
//!   the tolerance" (`r ≥ r_bad`). Rejecting it at level β = α makes the canary promotable:
//!   the chance of promoting a canary that bad is at most β.
//!
//! Canaries between the two (worse than tolerated, better than twice that) may go either
//! way: that is the indifference zone of any sequential test (Wald's SPRT has the same).
//!
//! α is `1 − confidence` split evenly across the policy's metrics (Bonferroni), so the whole
//! rollout's false-rollback probability stays at most `1 − confidence`. Within a metric,
//! several bounds and histogram boundaries are combined by averaging their e-processes,
//! which is again an e-process and costs no further split.
//!
//! Bursty (overdispersed) errors break the binomial law: a burst of five errors is one piece
//! of evidence, not five. The judge estimates the dispersion φ from stable's consecutive
//! increments (stable has the most traffic) and divides each log-likelihood ratio by φ, the
//! quasi-likelihood correction.

use super::{
    BoundCheck, BoundKind, Evidence, JudgeContext, JudgeMemory, MetricReport, Verdict, fmt_count,
    samples,
};
use crate::observation::{Bucket, Counts, MetricReading, Sample};
use crate::policy::{MetricKind, MetricSpec, Tolerance, ToleranceKind};
use serde::{Deserialize, Serialize};

/// Ratios of the rollback alternatives to the null boundary `r0`.
const BAD_GRID: [f64; 7] = [1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0];
/// Betting fractions λ of the rollback components and their prior weights. λ = 1 is the plain
/// likelihood-ratio martingale; the smaller ones forget old good news.
const LAMBDAS: [(f64, f64); 3] = [(1.0, 0.6), (0.2, 0.25), (0.04, 0.15)];
/// Ratios of the promotion alternatives to the "bad" boundary `r_bad`.
const GOOD_GRID: [f64; 4] = [0.85, 0.7, 0.5, 0.3];
/// The least distance between the null boundary and the "bad" one, as a ratio, so that
/// a zero tolerance still leaves a decidable question.
const MIN_GAP: f64 = 1.1;
/// Pseudo-increments of φ = 1 the dispersion estimate starts from.
const DISPERSION_PRIOR: f64 = 2.0;
/// A rollback e-value above this fraction of the threshold (in logs) holds the rollout at its
/// step: the canary looks suspicious and should not get more traffic until that resolves.
pub const SUSPICION: f64 = 0.5;
/// Until the dispersion estimate rests on this many increments, one look's log-likelihood
/// ratio is capped at `EARLY_CAP`: before the noise level is known, one burst of errors must
/// not be able to roll a canary back. Capping a likelihood ratio keeps it an e-value.
const EARLY_TERMS: f64 = 12.0;
const EARLY_CAP: f64 = 3.0;
/// Afterwards one look's log-likelihood ratio is capped at this many nats per square root of
/// the effective number of bad events the null expects on the canary in that look (the
/// expected count over φ, at least one). Bursts have a long tail: with geometric burst sizes
/// `E[LR^(1/φ)]` is even infinite for large alternatives, so the dispersion correction alone
/// cannot stop one huge burst on a canary that expected one error from looking like a
/// regression. Steady regressions, whose evidence grows with the expected count, are not
/// slowed.
const CAP_PER_SQRT: f64 = 3.0;
/// Stable histogram events needed before the latency tests are laid out.
const LATENCY_SETUP_EVENTS: f64 = 200.0;
/// Boundaries where stable's share of slower requests exceeds this are not tested: nearly
/// every request is slower than them, so they cannot show a slowdown.
const MAX_EXCEEDANCE: f64 = 0.9;
/// Increments with fewer requests than this are not used to check the realised share.
const SHARE_CHECK_MIN: f64 = 500.0;
/// Stable events without one above a boundary before the boundaries above it count as
/// repeating its evidence: a boundary that 1 % of requests exceed shows none in 2,000 with
/// probability 2·10⁻⁹ (in 200, 13 %).
const EMPTY_TAIL_EVENTS: f64 = 2000.0;
/// A one-sample null rate at or above this cannot be exceeded by enough to show anything.
const MAX_ONE_SAMPLE_NULL: f64 = 0.99;
/// Per-look decay of the recent-rate average of stable's drift estimate (about four looks).
const RECENT_DECAY: f64 = 0.25;
/// Standard deviations of the recent count that do not count as drift.
const DRIFT_NOISE_SD: f64 = 1.5;
/// The most stable's drift may raise the reference after the switch: a burst on stable (an
/// outage of a shared dependency) must not blind the watch to a real regression.
const DRIFT_CAP: f64 = 1.5;
/// Per-look decay of the log of the drift while stable serves: a rise that is not seen again
/// fades (half-life about 35 looks).
const DRIFT_FADE: f64 = 0.02;

/// What the sequential judge remembers about one metric during one rollout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SequentialMemory {
    /// Stable's cumulative counts at the last analysis, for differencing.
    pub last_stable: Option<Counts>,
    /// The canary's cumulative counts at the last analysis.
    pub last_canary: Option<Counts>,
    /// Stable's cumulative histogram at the last analysis (latency).
    #[serde(default)]
    pub last_stable_buckets: Vec<Bucket>,
    /// The canary's cumulative histogram at the last analysis (latency).
    #[serde(default)]
    pub last_canary_buckets: Vec<Bucket>,
    /// Stable's counts summed over the increments used (counter resets excluded).
    pub stable: Counts,
    /// The canary's counts summed over the increments used.
    pub canary: Counts,
    /// Stable's histogram summed over the increments used: events at most `le`.
    #[serde(default)]
    pub stable_hist: Vec<Bucket>,
    /// Stable's total histogram events summed over the increments used.
    #[serde(default)]
    pub stable_hist_total: f64,
    /// The running tests, one per bound and (for latency) histogram boundary.
    #[serde(default)]
    pub tests: Vec<BoundTest>,
    /// Sum of the standardised squared differences of stable's consecutive increments.
    pub dispersion_sum: f64,
    /// Number of terms in `dispersion_sum`.
    pub dispersion_terms: f64,
    /// Stable's previous increment (bad, total), for the dispersion estimate.
    pub previous_stable: Option<Counts>,
    /// Stable's recent counts, decaying by `RECENT_DECAY` per look, for its drift.
    #[serde(default)]
    pub stable_recent: Counts,
    /// The most stable's recent rate was clearly above its rate over the whole rollout, as a
    /// ratio (at least 1; 0 until measured): how far its rate moved with time of day or load.
    #[serde(default)]
    pub stable_drift: f64,
    /// The configured weight at the last analysis, to check the realised share only within a
    /// step (an increment across a weight change mixes two weights).
    pub last_weight: Option<f64>,
    /// The rollback test rejected its null: the verdict stays Fail for this rollout.
    pub rejected: bool,
    /// Analyses that updated the tests.
    pub looks: u64,
}

/// Which comparison a test makes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TestKind {
    /// Canary against stable, with the policy's tolerance (`max_increase`/`max_decrease`).
    Relative,
    /// The canary alone against an absolute bound on its bad-event rate (`max`/`min`).
    Absolute,
}

/// One running test: the log values of its mixture components.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoundTest {
    pub kind: TestKind,
    /// The histogram boundary (seconds) whose exceedances count as bad, for latency.
    pub le: Option<f64>,
    /// Prior weight of this test in the metric's rollback mixture.
    pub weight: f64,
    /// Whether this test's promotion e-process must reject for the metric to be promotable.
    pub for_promotion: bool,
    /// Log values of the rollback components, `LAMBDAS × BAD_GRID`.
    pub bad: Vec<f64>,
    /// Log values of the promotion components, `GOOD_GRID`.
    pub good: Vec<f64>,
    /// For a relative latency bound, log values of a second family of promotion components
    /// (`GOOD_GRID`), on the canary alone: that fewer than 1 − quantile of its requests are
    /// slower than the highest boundary within twice the tolerance of stable's quantile. Where
    /// neither version has requests above that boundary (a fast model, coarse buckets), the
    /// two-sample test has nothing to learn from, and only this one can show the canary good.
    /// A rate with an absolute tolerance (`0.5pp`) has the same family, on the canary's rate
    /// against stable's plus twice the tolerance: rare (or no) bad events leave the two-sample
    /// test as little to learn from. Empty for every other test.
    #[serde(default)]
    pub alone: Vec<f64>,
    /// For a rate with an absolute tolerance, log values of rollback components on the canary
    /// alone (`LAMBDAS × BAD_GRID`), against stable's rate plus the tolerance: where stable has
    /// (nearly) no bad events, the two-sample test expects every bad event on the canary under
    /// its null and learns little from them, so a canary far above the tolerance would
    /// otherwise be caught late. Empty for every other test.
    #[serde(default)]
    pub alone_bad: Vec<f64>,
}

impl BoundTest {
    fn new(kind: TestKind, le: Option<f64>, weight: f64, for_promotion: bool) -> Self {
        BoundTest {
            kind,
            le,
            weight,
            for_promotion,
            bad: vec![0.0; LAMBDAS.len() * BAD_GRID.len()],
            good: vec![0.0; GOOD_GRID.len()],
            alone: Vec::new(),
            alone_bad: Vec::new(),
        }
    }

    /// Log of the rollback mixture's value: the two-sample components, and with a second
    /// family (`alone_bad`) both families at half weight each.
    pub fn log_bad(&self) -> f64 {
        let per_grid = (BAD_GRID.len() as f64).ln();
        let log_w: [f64; LAMBDAS.len()] = std::array::from_fn(|i| LAMBDAS[i].1.ln() - per_grid);
        // Components beyond the grid (a stored memory from another build) are left out.
        let family = |v: &[f64]| {
            log_sum_exp(
                &v.iter()
                    .enumerate()
                    .filter_map(|(k, x)| log_w.get(k / BAD_GRID.len()).map(|w| w + x))
                    .collect::<Vec<_>>(),
            )
        };
        if self.alone_bad.is_empty() {
            return family(&self.bad);
        }
        log_sum_exp(&[family(&self.bad), family(&self.alone_bad)]) - 2f64.ln()
    }

    /// Log of the promotion mixture's value: the two-sample components, and with a second
    /// family (`alone`) both families at half weight each.
    pub fn log_good(&self) -> f64 {
        let w = (1.0 / GOOD_GRID.len() as f64).ln();
        let family = |v: &[f64]| log_sum_exp(&v.iter().map(|g| w + g).collect::<Vec<_>>());
        if self.alone.is_empty() {
            return family(&self.good);
        }
        log_sum_exp(&[family(&self.good), family(&self.alone)]) - 2f64.ln()
    }
}

/// `ln Σ exp(x)`, stable for large and very negative terms.
pub fn log_sum_exp(xs: &[f64]) -> f64 {
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// `ln(1 − λ + λ·e^llr)`: one step of a betting martingale with fraction λ.
pub fn log_bet(lambda: f64, llr: f64) -> f64 {
    if lambda >= 1.0 {
        return llr;
    }
    if llr > 30.0 {
        // e^llr dominates; the correction term is below 1e-13.
        return lambda.ln() + llr + ((1.0 - lambda) / lambda * (-llr).exp()).ln_1p();
    }
    (lambda * llr.exp_m1()).ln_1p()
}

/// One increment of one version: bad events and all events.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Increment {
    pub bad: f64,
    pub total: f64,
}

/// Log-likelihood ratio, conditional on the realised counts, of rate ratio `r1` against `r0`
/// for one increment of both versions: the canary's share of the bad events is binomial with
/// `θ(r) = n_c·r / (n_c·r + n_s)`.
pub fn two_sample_llr(canary: Increment, stable: Increment, r0: f64, r1: f64) -> f64 {
    let (nc, ns) = (canary.total, stable.total);
    if nc <= 0.0 || ns <= 0.0 || canary.bad + stable.bad <= 0.0 {
        return 0.0;
    }
    let theta = |r: f64| nc * r / (nc * r + ns);
    let (t0, t1) = (theta(r0), theta(r1));
    canary.bad * (t1 / t0).ln() + stable.bad * ((1.0 - t1) / (1.0 - t0)).ln()
}

/// Log-likelihood ratio of a Bernoulli rate `p1` against `p0` for `bad` of `total` events.
pub fn one_sample_llr(inc: Increment, p0: f64, p1: f64) -> f64 {
    if inc.total <= 0.0 || !(p0 > 0.0 && p0 < 1.0 && p1 > 0.0 && p1 < 1.0) {
        return 0.0;
    }
    let good = (inc.total - inc.bad).max(0.0);
    inc.bad * (p1 / p0).ln() + good * ((1.0 - p1) / (1.0 - p0)).ln()
}

/// Kullback–Leibler divergence of Bernoulli(a) from Bernoulli(b), in nats.
pub fn bernoulli_kl(a: f64, b: f64) -> f64 {
    let term = |x: f64, y: f64| if x > 0.0 { x * (x / y).ln() } else { 0.0 };
    term(a, b) + term(1.0 - a, 1.0 - b)
}

/// Wald's lower bound on the expected sample size of any test with error rates α and β:
/// `d(1 − β ‖ α) / kl`, where `d` is the Bernoulli divergence.
pub fn wald_bound(alpha: f64, beta: f64, kl: f64) -> f64 {
    bernoulli_kl(1.0 - beta, alpha) / kl
}

/// The null boundary and the "bad" boundary of a relative test on a rate, as ratios of the
/// canary's rate to stable's, given stable's rate `p_s` (for absolute tolerances).
fn rate_ratios(t: &Tolerance, p_s: f64, decrease_is_bad_metric: bool) -> (f64, f64) {
    // For accuracy the "rate" is the share of incorrect predictions; a decrease in accuracy
    // of `a` (absolute) is an increase of the incorrect share by `a`, and a relative decrease
    // of accuracy by `a` is an increase of the incorrect share by `a·(1 − p_s)`.
    let delta = match (t.kind, decrease_is_bad_metric) {
        (ToleranceKind::Relative, false) => return widen(1.0 + t.amount, 1.0 + 2.0 * t.amount),
        (ToleranceKind::Relative, true) => t.amount * (1.0 - p_s),
        (ToleranceKind::Absolute, _) => t.amount,
    };
    let p = p_s.max(1e-9);
    widen((p + delta) / p, (p + 2.0 * delta) / p)
}

fn widen(r0: f64, r_bad: f64) -> (f64, f64) {
    (r0, r_bad.max(r0 * MIN_GAP))
}

/// Stable's survival function `P(X > x)` from its histogram, interpolated log-linearly
/// between boundaries and smoothed so that empty tails do not give zero.
fn survival(hist: &[Bucket], total: f64, x: f64) -> f64 {
    let s = |cum: f64| ((total - cum).max(0.0) + 0.5) / (total + 1.0);
    let finite: Vec<&Bucket> = hist.iter().filter(|b| b.le.is_finite()).collect();
    if x <= 0.0 {
        return 1.0;
    }
    let Some(first) = finite.first() else {
        return 1.0;
    };
    if x <= first.le {
        // Below the first boundary: linear from P(X > 0) = 1.
        return 1.0 + (s(first.count) - 1.0) * x / first.le;
    }
    for w in finite.windows(2) {
        let (a, b) = (w[0], w[1]);
        if x <= b.le {
            let (sa, sb) = (s(a.count).ln(), s(b.count).ln());
            let f = (x.ln() - a.le.ln()) / (b.le.ln() - a.le.ln());
            return (sa + f * (sb - sa)).exp();
        }
    }
    finite.last().map_or(1.0, |b| s(b.count))
}

/// The latency value a tolerance allows for a stable value `x`, or allows twice over.
fn tolerated_latency(t: &Tolerance, x: f64, times: f64) -> f64 {
    match t.kind {
        ToleranceKind::Relative => x / (1.0 + times * t.amount),
        ToleranceKind::Absolute => x - times * t.amount,
    }
}

/// Judges one metric with the sequential tests.
pub fn judge(
    ctx: &JudgeContext,
    spec: &MetricSpec,
    reading: &MetricReading,
    memory: &mut JudgeMemory,
) -> MetricReport {
    if matches!(spec.kind, MetricKind::Query { .. }) {
        // A raw query gives values, not counts: no count-based test applies.
        let mut r = super::threshold::judge(ctx, spec, reading);
        r.method = ctx.method;
        r.note = format!(
            "{} (raw query: judged by its bounds, no sequential test)",
            r.note
        );
        return r;
    }
    let mut report = MetricReport::blank(ctx, spec, reading);
    let Some((canary, stable)) = samples(&mut report, reading) else {
        return report;
    };
    if counts_of(canary).is_none() && canary.buckets.is_empty() {
        report.verdict = Verdict::NoData;
        report.note = "the canary's reading has no counts to test".into();
        return report;
    }
    let alpha = ((1.0 - ctx.confidence) / ctx.metric_count.max(1) as f64).clamp(1e-12, 0.5);
    let threshold = (1.0 / alpha).ln();
    let mem = memory
        .sequential
        .get_or_insert_with(SequentialMemory::default);
    let mismatch = update(mem, ctx, spec, canary, stable);

    let log_bad = log_sum_exp(
        &mem.tests
            .iter()
            .map(|t| t.weight.ln() + t.log_bad())
            .collect::<Vec<_>>(),
    );
    let promotion_tests: Vec<&BoundTest> = mem.tests.iter().filter(|t| t.for_promotion).collect();
    // A rate compared with a relative tolerance learns from bad events only. While neither
    // version has had any, there is nothing to compare: the canary is as good as stable can
    // be shown to be, and its relative test does not stand in the way of promotion. This is
    // a rule, not a test (the promotion guarantee does not cover it): no test could show
    // anything here, and the alternative is a rollback or an operator at every deadline of a
    // service without errors. The post-promotion watch compares the canary with stable's
    // rate from before.
    let rate = matches!(spec.kind, MetricKind::ErrorRate | MetricKind::Accuracy);
    let relative_rate =
        rate && tolerance_of(spec).is_some_and(|t| t.kind == ToleranceKind::Relative);
    let nothing_to_compare = relative_rate && mem.canary.bad <= 0.0 && mem.stable.bad <= 0.0;
    let shown_good = |t: &BoundTest| {
        (nothing_to_compare && t.kind == TestKind::Relative) || t.log_good() >= threshold
    };
    let promotable = !promotion_tests.is_empty() && promotion_tests.iter().all(|t| shown_good(t));
    let log_good = if promotion_tests.is_empty() {
        None
    } else {
        Some(
            promotion_tests
                .iter()
                .map(|t| t.log_good())
                .fold(f64::INFINITY, f64::min),
        )
    };
    let estimate = ratio_estimate(mem);
    let evidence = Evidence {
        test: "e-value".into(),
        log_e_value: mem.tests.is_empty().then_some(0.0).or(Some(log_bad)),
        log_threshold: Some(threshold),
        log_e_value_good: log_good,
        estimate,
        ci_low: None,
        ci_high: None,
        share_mismatch: mismatch,
    };
    let rejected = mem.rejected || (!mem.tests.is_empty() && log_bad >= threshold);
    mem.rejected = rejected;
    report.thin_evidence = relative_rate
        && !nothing_to_compare
        && !promotable
        && identical_evidence(spec, mem).is_some_and(|e| e < threshold);
    report.bounds = bound_checks(spec, stable.and_then(|s| s.value), rejected, promotable);
    report.evidence = Some(evidence);

    let need = spec.min_samples as f64;
    let two_sample = spec.bounds.is_relative();
    report.verdict = if rejected {
        report.note = format!(
            "evidence of harm: log e-value {:.2} reached {:.2} (α = {:.4}){}",
            log_bad,
            threshold,
            alpha,
            ratio_note(estimate)
        );
        Verdict::Fail
    } else if canary.window_events <= 0.0 {
        // The evidence so far still stands (and could still reject), but a step in which the
        // canary served nothing (a router or a scrape outage) says nothing about it.
        report.note = format!(
            "no canary events in this analysis's window (evidence so far: log e-value {:.2} of {:.2})",
            log_bad, threshold
        );
        Verdict::NoData
    } else if mem.canary.total < need || (two_sample && mem.stable.total < need) {
        // Not enough data to let the canary go further: more may still arrive (late labels
        // for accuracy, traffic at a low weight).
        report.note = format!(
            "gathering data: canary {} and stable {} events of {} needed",
            fmt_count(mem.canary.total),
            fmt_count(mem.stable.total),
            spec.min_samples
        );
        Verdict::Hold
    } else if matches!(spec.kind, MetricKind::Accuracy)
        && !promotable
        && log_good.is_none_or(|g| g < SUSPICION * threshold)
    {
        // Labels arrive late: what has arrived says little about predictions made since, so
        // accuracy lets the rollout go on only once the evidence leans clearly towards "within
        // tolerance" (half way to promotable). Holding at a low weight also makes fewer
        // predictions wait for their labels.
        report.note = format!(
            "waiting for labels: accuracy not yet shown within tolerance (log e-value {:.2} of {:.2}){}",
            log_good.unwrap_or(0.0),
            threshold,
            ratio_note(estimate)
        );
        Verdict::Hold
    } else if log_bad >= SUSPICION * threshold {
        report.note = format!(
            "suspicious: log e-value {:.2} of {:.2}; holding the step until it resolves{}",
            log_bad,
            threshold,
            ratio_note(estimate)
        );
        Verdict::Hold
    } else if let Some(beyond) = beyond_absolute_bound(spec, canary.value) {
        // Not proven yet, but the estimate itself breaks a bound the user set on the canary:
        // no more traffic until the test decides either way.
        report.note = format!(
            "{beyond}; holding the step until the test decides (log e-value {:.2} of {:.2})",
            log_bad, threshold
        );
        Verdict::Hold
    } else {
        report.promotable = promotable;
        let standing = if nothing_to_compare {
            format!(
                "no bad events in either version ({} canary, {} stable): nothing to compare, \
                 good enough to promote",
                fmt_count(mem.canary.total),
                fmt_count(mem.stable.total)
            )
        } else if promotable {
            "good enough to promote".to_owned()
        } else if report.thin_evidence {
            format!(
                "not yet proven good, and {} bad events in both versions are too few to show \
                 it at this tolerance",
                fmt_count(mem.canary.bad + mem.stable.bad)
            )
        } else {
            "not yet proven good".to_owned()
        };
        report.note = format!(
            "no evidence of harm (log e-value {:.2} of {:.2}); {standing}{}",
            log_bad,
            threshold,
            ratio_note(estimate)
        );
        Verdict::Pass
    };
    // Thin evidence is about a canary nothing speaks against.
    report.thin_evidence &= matches!(report.verdict, Verdict::Pass | Verdict::Hold);
    report
}

/// Stable's bad-event rate in recent counts at its lower and upper confidence bounds (two
/// standard deviations of a count with dispersion `phi`, one pseudo-event above): the
/// reference the canary-alone tests compare with.
fn rate_bounds(s: Increment, phi: f64) -> (f64, f64) {
    const Z: f64 = 2.0;
    let lo = (s.bad - Z * (phi * s.bad).sqrt()).max(0.0) / s.total;
    let hi = (s.bad + 1.0 + Z * (phi * (s.bad + 1.0)).sqrt()) / s.total;
    (lo.min(1.0), hi.min(1.0))
}

/// The tolerance the metric's relative bound gives (`max_decrease` for accuracy).
fn tolerance_of(spec: &MetricSpec) -> Option<&Tolerance> {
    if matches!(spec.kind, MetricKind::Accuracy) {
        spec.bounds.max_decrease.as_ref()
    } else {
        spec.bounds.max_increase.as_ref()
    }
}

/// The log e-value the promotion test of a rate could expect by now for a canary identical to
/// stable, given both versions' totals and bad events so far: each bad event falls on the
/// canary with its share of the requests, and the best alternative of the grid is taken, over
/// the dispersion and less the mixture's cost (the per-look caps are left out, so this errs
/// towards "enough"). `None` before both versions served.
fn identical_evidence(spec: &MetricSpec, mem: &SequentialMemory) -> Option<f64> {
    let (nc, ns) = (mem.canary.total, mem.stable.total);
    let p_s = stable_rate(mem).filter(|_| nc > 0.0)?;
    let t = tolerance_of(spec)?;
    let (_, r_bad) = rate_ratios(t, p_s, matches!(spec.kind, MetricKind::Accuracy));
    // The bad events so far, split as an identical canary's would be: by share of requests.
    let events = mem.canary.bad + mem.stable.bad;
    let share = nc / (nc + ns);
    let canary = Increment {
        bad: events * share,
        total: nc,
    };
    let stable = Increment {
        bad: events * (1.0 - share),
        total: ns,
    };
    let best = GOOD_GRID
        .iter()
        .map(|g| two_sample_llr(canary, stable, r_bad, r_bad * g))
        .fold(f64::NEG_INFINITY, f64::max);
    Some(best / dispersion(mem) - (GOOD_GRID.len() as f64).ln())
}

/// Stable's bad-event rate over everything used so far, smoothed by half an event so that no
/// bad events is not a rate of 0; `None` before stable served.
fn stable_rate(mem: &SequentialMemory) -> Option<f64> {
    (mem.stable.total > 0.0).then(|| (mem.stable.bad + 0.5) / (mem.stable.total + 1.0))
}

fn ratio_note(estimate: Option<f64>) -> String {
    estimate.map_or(String::new(), |e| {
        format!("; canary/stable bad-event ratio {e:.3}")
    })
}

/// The canary's bad-event rate over stable's, over everything used so far.
fn ratio_estimate(mem: &SequentialMemory) -> Option<f64> {
    let c = mem.canary.rate()?;
    let s = mem.stable.rate()?;
    (s > 0.0).then(|| c / s)
}

/// Which absolute bound (`max`, `min`) the canary's value in this analysis is beyond, said
/// for people.
fn beyond_absolute_bound(spec: &MetricSpec, value: Option<f64>) -> Option<String> {
    let v = value.filter(|v| v.is_finite())?;
    super::threshold::absolute_checks(&spec.bounds, v)
        .into_iter()
        .find(|c| c.ok == Some(false))
        .map(|c| {
            let side = if c.kind == BoundKind::Max {
                "above"
            } else {
                "below"
            };
            format!(
                "the canary's value {} is {side} {} {}",
                super::fmt_value(v),
                c.kind.as_str(),
                c.written
            )
        })
}

/// The bounds with the test's verdict on them: broken once the rollback test rejected, kept
/// once the canary is promotable, open until then. A relative bound's limit is stable's
/// current value moved by the tolerance, as the threshold judge would apply it; the test
/// itself works on counts since the rollout began, not on that value.
fn bound_checks(
    spec: &MetricSpec,
    stable_value: Option<f64>,
    rejected: bool,
    promotable: bool,
) -> Vec<BoundCheck> {
    let ok = if rejected {
        Some(false)
    } else if promotable {
        Some(true)
    } else {
        None
    };
    let b = &spec.bounds;
    let mut out = Vec::new();
    if let Some(m) = &b.max {
        out.push(BoundCheck {
            kind: BoundKind::Max,
            written: m.written.clone(),
            limit: Some(m.value),
            ok,
        });
    }
    if let Some(m) = &b.min {
        out.push(BoundCheck {
            kind: BoundKind::Min,
            written: m.written.clone(),
            limit: Some(m.value),
            ok,
        });
    }
    if let Some(t) = &b.max_increase {
        out.push(BoundCheck {
            kind: BoundKind::MaxIncrease,
            written: t.written.clone(),
            limit: stable_value.map(|v| t.upper(v)),
            ok,
        });
    }
    if let Some(t) = &b.max_decrease {
        out.push(BoundCheck {
            kind: BoundKind::MaxDecrease,
            written: t.written.clone(),
            limit: stable_value.map(|v| t.lower(v)),
            ok,
        });
    }
    out
}

/// Cumulative counts with sane values, or `None`.
fn counts_of(s: &Sample) -> Option<Counts> {
    let c = s.cumulative?;
    (c.bad.is_finite() && c.total.is_finite() && c.bad >= 0.0 && c.total >= 0.0).then(|| Counts {
        bad: c.bad.min(c.total),
        total: c.total,
    })
}

/// The increment from `last` to `now`; a decrease means the counter restarted, and that look
/// contributes nothing (counting the new value would double count what came before).
fn difference(last: Option<Counts>, now: Counts) -> Increment {
    match last {
        None => Increment {
            bad: now.bad,
            total: now.total,
        },
        Some(l) if below(Some(l), now) => Increment::default(),
        Some(l) => Increment {
            bad: now.bad - l.bad,
            total: now.total - l.total,
        },
    }
}

/// Whether counts fell below the last ones. Counts since the rollout began come from
/// `increase()`, which extrapolates to the ends of its range and so wobbles by a few events
/// from one look to the next even without traffic. A dip adds nothing and the last counts stay
/// the reference, so that the rebound does not count the same events again (differencing
/// against the dip would read phantom traffic into an outage).
fn below(last: Option<Counts>, now: Counts) -> bool {
    last.is_some_and(|l| now.total < l.total || now.bad < l.bad)
}

/// Finite, sorted, non-decreasing cumulative buckets, or nothing.
fn clean_buckets(b: &[Bucket]) -> Vec<Bucket> {
    let mut v: Vec<Bucket> = b
        .iter()
        .filter(|x| x.le.is_finite() && x.le > 0.0 && x.count.is_finite() && x.count >= 0.0)
        .copied()
        .collect();
    v.sort_by(|a, b| a.le.total_cmp(&b.le));
    v.dedup_by(|a, b| a.le == b.le);
    v
}

/// Total events of a histogram: its +Inf bucket, or failing that its largest count.
fn hist_total(b: &[Bucket]) -> f64 {
    b.iter()
        .filter(|x| x.count.is_finite())
        .map(|x| x.count)
        .fold(0.0, f64::max)
}

fn count_at(b: &[Bucket], le: f64) -> Option<f64> {
    b.iter().find(|x| x.le == le).map(|x| x.count)
}

/// Feeds one analysis' readings into the memory's tests. Returns whether the realised share
/// differs from the configured weight.
fn update(
    mem: &mut SequentialMemory,
    ctx: &JudgeContext,
    spec: &MetricSpec,
    canary: &Sample,
    stable: Option<&Sample>,
) -> bool {
    let latency = matches!(spec.kind, MetricKind::Latency { .. });
    let quantile = match spec.kind {
        MetricKind::Latency { quantile } => quantile,
        _ => 0.5,
    };
    let c_counts = counts_of(canary);
    let s_counts = stable.and_then(counts_of);
    let c_inc = c_counts
        .map(|c| difference(mem.last_canary, c))
        .unwrap_or_default();
    let s_inc = s_counts
        .map(|c| difference(mem.last_stable, c))
        .unwrap_or_default();
    // A look below the last counts adds nothing and leaves them as the reference.
    if let Some(c) = c_counts.filter(|c| !below(mem.last_canary, *c)) {
        mem.last_canary = Some(c);
    }
    if let Some(s) = s_counts.filter(|s| !below(mem.last_stable, *s)) {
        mem.last_stable = Some(s);
    }

    // The realised share, checked only when the weight did not change since the last look.
    let mut mismatch = false;
    let n = c_inc.total + s_inc.total;
    let w = ctx.configured_weight / 100.0;
    if mem.last_weight == Some(ctx.configured_weight) && n >= SHARE_CHECK_MIN && w > 0.0 && w < 1.0
    {
        let real = c_inc.total / n;
        let slack = 0.1 * w + 3.0 * (w * (1.0 - w) / n).sqrt();
        mismatch = (real - w).abs() > slack;
    }
    mem.last_weight = Some(ctx.configured_weight);

    // Dispersion from stable's consecutive increments, before this increment is used, so the
    // estimate applied to it depends only on the past.
    let phi = dispersion(mem);
    let cap = if mem.dispersion_terms < EARLY_TERMS {
        EARLY_CAP
    } else {
        f64::INFINITY
    };
    if s_inc.total > 0.0 {
        if let Some(prev) = mem.previous_stable {
            let k = s_inc.total / prev.total;
            let p = (prev.bad + s_inc.bad) / (prev.total + s_inc.total);
            let var = p * (s_inc.total + k * k * prev.total);
            if var > 0.0 {
                let d = s_inc.bad - prev.bad * k;
                mem.dispersion_sum += d * d / var;
                mem.dispersion_terms += 1.0;
            }
        }
        mem.previous_stable = Some(Counts {
            bad: s_inc.bad,
            total: s_inc.total,
        });
        if !latency {
            // A latency metric's counts are exceedances of the shell's slow boundary, which
            // may move between looks; its jumps are not drift.
            track_drift(mem, s_inc, phi);
        }
    }

    // Latency histograms: increments per boundary.
    let c_b = clean_buckets(&canary.buckets);
    let s_b = stable
        .map(|s| clean_buckets(&s.buckets))
        .unwrap_or_default();
    let c_total_now = hist_total(&canary.buckets);
    let s_total_now = stable.map_or(0.0, |s| hist_total(&s.buckets));
    let hist_inc =
        |now: &[Bucket], now_total: f64, last: &[Bucket]| -> Option<(Vec<Bucket>, f64)> {
            let last_total = hist_total(last);
            if now_total < last_total
                || now
                    .iter()
                    .any(|b| count_at(last, b.le).is_some_and(|l| b.count < l))
            {
                return None;
            }
            let inc: Vec<Bucket> = now
                .iter()
                .map(|b| Bucket {
                    le: b.le,
                    count: b.count - count_at(last, b.le).unwrap_or(0.0),
                })
                .collect();
            Some((inc, now_total - last_total))
        };
    let use_hist = latency && !c_b.is_empty();
    let c_hist = if use_hist {
        hist_inc(&c_b, c_total_now, &mem.last_canary_buckets)
    } else {
        None
    };
    let s_hist = if use_hist && !s_b.is_empty() {
        hist_inc(&s_b, s_total_now, &mem.last_stable_buckets)
    } else {
        None
    };

    // Tests are created at the first look that has what they need: for latency, enough of
    // stable's histogram to see where its requests fall.
    if mem.tests.is_empty()
        && (!use_hist || mem.stable_hist_total >= LATENCY_SETUP_EVENTS || s_b.is_empty())
    {
        mem.tests = create_tests(spec, canary, &c_b, &mem.stable_hist, mem.stable_hist_total);
    }

    // Stable's state before this increment: the tolerances derived from it are predictable.
    let p_s = stable_rate(mem).unwrap_or(f64::NAN);
    let stable_hist = mem.stable_hist.clone();
    let stable_hist_total = mem.stable_hist_total;
    let drift = mem.stable_drift.max(1.0);

    let accuracy = matches!(spec.kind, MetricKind::Accuracy);
    let b = &spec.bounds;
    let tolerance = tolerance_of(spec);
    let abs_bad_rate = match spec.kind {
        MetricKind::Accuracy => b.min.as_ref().map(|m| 1.0 - m.value),
        MetricKind::Latency { .. } => b.max.as_ref().map(|_| 1.0 - quantile),
        _ => b.max.as_ref().map(|m| m.value),
    };

    // Stable's recent counts (about four looks, this one included): the canary-alone tests'
    // concurrent reference.
    let recent = Increment {
        bad: mem.stable_recent.bad,
        total: mem.stable_recent.total,
    };
    let mut used = false;
    for test in &mut mem.tests {
        // The increments this test looks at.
        let (ci, si) = match (test.le, &c_hist) {
            (Some(le), Some((ch, ct))) => {
                let above = |h: &[Bucket], t: f64| count_at(h, le).map(|c| (t - c).max(0.0));
                let c = above(ch, *ct).map(|bad| Increment { bad, total: *ct });
                let s = s_hist
                    .as_ref()
                    .and_then(|(sh, st)| above(sh, *st).map(|bad| Increment { bad, total: *st }));
                match c {
                    Some(c) => (c, s.unwrap_or_default()),
                    None => continue,
                }
            }
            (Some(_), None) if use_hist => continue,
            _ => (c_inc, s_inc),
        };
        if ci.total <= 0.0 {
            continue;
        }
        used = true;
        match test.kind {
            TestKind::Relative => {
                let Some(t) = tolerance else { continue };
                let (r0, r_bad) = match (test.le, latency) {
                    (Some(le), true) if stable_hist_total > 0.0 => {
                        let s_at = survival(&stable_hist, stable_hist_total, le);
                        let r0 = survival(
                            &stable_hist,
                            stable_hist_total,
                            tolerated_latency(t, le, 1.0),
                        ) / s_at;
                        let rb = survival(
                            &stable_hist,
                            stable_hist_total,
                            tolerated_latency(t, le, 2.0),
                        ) / s_at;
                        widen(r0.max(1.0), rb)
                    }
                    // Without stable's histogram yet, the tolerance cannot be mapped onto
                    // this boundary: wait for it.
                    (Some(_), true) => continue,
                    _ if p_s.is_finite() || t.kind == ToleranceKind::Relative && !accuracy => {
                        rate_ratios(t, if p_s.is_finite() { p_s } else { 0.5 }, accuracy)
                    }
                    _ => continue,
                };
                if !test.alone.is_empty()
                    && let Some((ch, ct)) = &c_hist
                    && let Some(q_s) = quantile_of(&stable_hist, stable_hist_total, quantile)
                {
                    // The highest boundary a canary twice the tolerance worse than stable
                    // would exceed more often than 1 − quantile of the time (by stable's
                    // quantile as histogram_quantile interpolates it before this look).
                    let bad_latency = t.upper_by(q_s, 2.0);
                    if let Some(slow) = ch.iter().rev().find(|b| b.le <= bad_latency) {
                        let inc = Increment {
                            bad: (ct - slow.count).max(0.0),
                            total: *ct,
                        };
                        step_alone(test, inc, 1.0 - quantile, phi, cap);
                    }
                }
                if test.le.is_none()
                    && !test.alone.is_empty()
                    && t.kind == ToleranceKind::Absolute
                    && si.total > 0.0
                    && recent.total > 0.0
                {
                    // The canary alone against stable's recent rate plus the tolerance, and
                    // plus twice it: with rare bad events the two-sample test has little to
                    // learn from, and only this can show the canary good, or far beyond the
                    // tolerance soon. Stable's rate over the last few looks, this one included,
                    // is the concurrent control (load or a shared outage moves both), taken at
                    // its upper confidence bound for rollback and its lower one for promotion.
                    // (After the switch the one-sample test below, with stable's drift, takes
                    // over.)
                    let (lo, hi) = rate_bounds(recent, phi);
                    let p_bad = lo + 2.0 * t.amount;
                    if p_bad < MAX_ONE_SAMPLE_NULL {
                        step_alone(test, ci, p_bad, phi, cap);
                    }
                    let p0 = hi + t.amount;
                    if p0 < MAX_ONE_SAMPLE_NULL {
                        let cap = cap.min(CAP_PER_SQRT * (ci.total * p0 / phi).max(1.0).sqrt());
                        step_one_sample_bad(&mut test.alone_bad, ci, p0, phi, cap);
                    }
                }
                if si.total > 0.0 {
                    step_two_sample(test, ci, si, r0, r_bad, phi, cap);
                } else if p_s.is_finite() {
                    // Stable has no traffic (after promotion, blue-green): compare with its
                    // rate from before, raised by as much as stable's own rate was seen to
                    // drift over time. Without a concurrent control, load or time of day that
                    // moves both versions' rates would otherwise read as a regression.
                    let p_ref = raise_odds(
                        match test.le {
                            Some(le) if stable_hist_total > 0.0 => {
                                survival(&stable_hist, stable_hist_total, le)
                            }
                            _ => p_s,
                        },
                        drift,
                    );
                    if p_ref * r0 < MAX_ONE_SAMPLE_NULL {
                        step_one_sample(test, ci, p_ref * r0, p_ref * r_bad, phi, cap);
                    }
                }
            }
            TestKind::Absolute => {
                if let Some(p0) = abs_bad_rate {
                    step_one_sample(test, ci, p0, p0, phi, cap);
                }
            }
        }
    }
    if used {
        mem.looks += 1;
    }
    // Totals of what was used, and stable's histogram.
    mem.canary.bad += c_inc.bad;
    mem.canary.total += c_inc.total;
    mem.stable.bad += s_inc.bad;
    mem.stable.total += s_inc.total;
    if let Some((sh, st)) = &s_hist {
        for b in sh {
            match mem.stable_hist.iter_mut().find(|x| x.le == b.le) {
                Some(x) => x.count += b.count,
                None => mem.stable_hist.push(*b),
            }
        }
        mem.stable_hist.sort_by(|a, b| a.le.total_cmp(&b.le));
        mem.stable_hist_total += st;
    }
    if use_hist {
        if c_hist.is_some() {
            mem.last_canary_buckets = c_b;
        }
        if s_hist.is_some() {
            mem.last_stable_buckets = s_b;
        }
    }
    mismatch
}

/// Updates stable's recent rate and the largest ratio by which it clearly exceeded stable's rate
/// over the whole rollout: the recent count less `DRIFT_NOISE_SD` (dispersion-scaled) standard
/// deviations, so that sampling noise alone hardly counts as drift. The ratio fades by
/// `DRIFT_FADE` per look unless seen again and never exceeds `DRIFT_CAP`.
fn track_drift(mem: &mut SequentialMemory, s_inc: Increment, phi: f64) {
    if mem.stable_drift > 1.0 {
        mem.stable_drift = mem.stable_drift.powf(1.0 - DRIFT_FADE);
    }
    let r = &mut mem.stable_recent;
    r.bad = r.bad * (1.0 - RECENT_DECAY) + s_inc.bad;
    r.total = r.total * (1.0 - RECENT_DECAY) + s_inc.total;
    let (bad, total) = (mem.stable.bad + s_inc.bad, mem.stable.total + s_inc.total);
    if bad <= 0.0 || total <= 0.0 || r.total <= 0.0 {
        return;
    }
    let lower = (r.bad - DRIFT_NOISE_SD * (r.bad * phi).sqrt()).max(0.0) / r.total;
    mem.stable_drift = mem
        .stable_drift
        .max(lower / (bad / total))
        .clamp(1.0, DRIFT_CAP);
}

/// `p` with its odds multiplied by `factor`: raised like a rate for small `p`, never reaching 1.
fn raise_odds(p: f64, factor: f64) -> f64 {
    if factor <= 1.0 || !(0.0..1.0).contains(&p) {
        return p;
    }
    let odds = p / (1.0 - p) * factor;
    odds / (1.0 + odds)
}

/// The dispersion φ ≥ 1 to divide log-likelihood ratios by.
fn dispersion(mem: &SequentialMemory) -> f64 {
    let est = (mem.dispersion_sum + DISPERSION_PRIOR) / (mem.dispersion_terms + DISPERSION_PRIOR);
    est.max(1.0)
}

/// The tests a metric needs.
fn create_tests(
    spec: &MetricSpec,
    canary: &Sample,
    c_b: &[Bucket],
    stable_hist: &[Bucket],
    stable_total: f64,
) -> Vec<BoundTest> {
    let b = &spec.bounds;
    let accuracy = matches!(spec.kind, MetricKind::Accuracy);
    let relative = if accuracy {
        b.max_decrease.is_some()
    } else {
        b.max_increase.is_some()
    };
    let absolute = if accuracy {
        b.min.is_some()
    } else {
        b.max.is_some()
    };
    let mut tests = Vec::new();
    let n_kinds = usize::from(relative) + usize::from(absolute);
    let share = 1.0 / n_kinds.max(1) as f64;
    let latency = matches!(spec.kind, MetricKind::Latency { .. });
    if latency && !c_b.is_empty() {
        let slow = canary.slow_le;
        let quantile = match spec.kind {
            MetricKind::Latency { quantile } => quantile,
            _ => 0.99,
        };
        if relative {
            // Every boundary where stable's requests are not nearly all slower gets a test,
            // with equal weight: a median shift shows at the middle ones, a tail regression at
            // the high ones (the shell's slow boundary among them).
            let les = tested_boundaries(c_b, slow, stable_hist, stable_total);
            let w = 1.0 / les.len().max(1) as f64;
            for le in &les {
                tests.push(BoundTest::new(
                    TestKind::Relative,
                    Some(*le),
                    w * share,
                    false,
                ));
            }
            // Promotion needs evidence at one boundary: the one whose stable exceedance is
            // nearest (in ratio) to the policy's 1 − quantile, where the policy's quantile
            // lives and where events are frequent enough to give evidence soon.
            let target = 1.0 - quantile;
            let best = tests
                .iter()
                .enumerate()
                .filter_map(|(i, t)| {
                    t.le.map(|le| {
                        (
                            i,
                            (survival(stable_hist, stable_total, le).ln() - target.ln()).abs(),
                        )
                    })
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(i, _)| i);
            if let Some(t) = best.and_then(|i| tests.get_mut(i)) {
                t.for_promotion = true;
                t.alone = vec![0.0; GOOD_GRID.len()];
            }
        }
        if absolute {
            let max = b.max.as_ref().map_or(f64::INFINITY, |m| m.value);
            let le = slow
                .filter(|s| *s >= max)
                .or_else(|| c_b.iter().map(|x| x.le).find(|le| *le >= max));
            if let Some(le) = le {
                tests.push(BoundTest::new(TestKind::Absolute, Some(le), share, true));
            }
        }
    } else {
        if relative {
            let mut test = BoundTest::new(TestKind::Relative, None, share, true);
            let errors = matches!(spec.kind, MetricKind::ErrorRate);
            if errors && tolerance_of(spec).is_some_and(|t| t.kind == ToleranceKind::Absolute) {
                // An absolute tolerance (`0.5pp`) puts the null and "bad" rates at levels the
                // canary alone can be shown above or below, whatever stable's bad events.
                // Errors only: accuracy's labels arrive late and few per look, too few for a
                // concurrent reference from stable's increment (in the benchmark these families
                // slowed both its bad and its good accuracy scenarios), and a model without
                // wrong predictions waits for an operator at the deadline, as late labels do.
                test.alone = vec![0.0; GOOD_GRID.len()];
                test.alone_bad = vec![0.0; LAMBDAS.len() * BAD_GRID.len()];
            }
            tests.push(test);
        }
        if absolute {
            tests.push(BoundTest::new(TestKind::Absolute, None, share, true));
        }
    }
    tests
}

/// The histogram boundaries a relative latency test watches: every boundary where stable's
/// requests are not nearly all slower, up to and including the first that none of stable's
/// requests exceeded. Above that one, stable's exceedance is as unknown (zero) as there, and
/// every canary request slower than a higher boundary is also slower than that one, so a
/// higher boundary could only repeat its evidence while diluting the mixture's weight. Only a
/// tail that `EMPTY_TAIL_EVENTS` of stable's requests left empty counts as empty. The shell's
/// slow boundary is always kept.
fn tested_boundaries(
    c_b: &[Bucket],
    slow: Option<f64>,
    stable_hist: &[Bucket],
    stable_total: f64,
) -> Vec<f64> {
    let known = stable_total > 0.0;
    let mut les = Vec::new();
    let mut past_empty_tail = false;
    for le in c_b.iter().map(|x| x.le).filter(|le| le.is_finite()) {
        let keep = Some(le) == slow
            || !known
            || (!past_empty_tail && survival(stable_hist, stable_total, le) <= MAX_EXCEEDANCE);
        if keep {
            les.push(le);
        }
        if stable_total >= EMPTY_TAIL_EVENTS
            && count_at(stable_hist, le).is_some_and(|c| c >= stable_total)
        {
            past_empty_tail = true;
        }
    }
    les
}

fn step_two_sample(
    test: &mut BoundTest,
    c: Increment,
    s: Increment,
    r0: f64,
    r_bad: f64,
    phi: f64,
    cap: f64,
) {
    if c.bad + s.bad <= 0.0 || c.total <= 0.0 || s.total <= 0.0 {
        // No bad events: the conditional likelihood ratio is 1 for every component.
        return;
    }
    let expected = (c.bad + s.bad) * c.total * r0 / (c.total * r0 + s.total);
    let cap = cap.min(CAP_PER_SQRT * (expected / phi).max(1.0).sqrt());
    for (gi, g) in BAD_GRID.iter().enumerate() {
        let llr = (two_sample_llr(c, s, r0, r0 * g) / phi).min(cap);
        for (li, (lambda, _)) in LAMBDAS.iter().enumerate() {
            test.bad[li * BAD_GRID.len() + gi] += log_bet(*lambda, llr);
        }
    }
    for (gi, g) in GOOD_GRID.iter().enumerate() {
        test.good[gi] += (two_sample_llr(c, s, r_bad, r_bad * g) / phi).min(cap);
    }
}

/// One look of the `alone` promotion family: the canary's share of requests above a boundary
/// against the null `p_bad` (its quantile at or beyond that boundary).
fn step_alone(test: &mut BoundTest, c: Increment, p_bad: f64, phi: f64, cap: f64) {
    let cap = cap.min(CAP_PER_SQRT * (c.total * p_bad / phi).max(1.0).sqrt());
    for (gi, g) in GOOD_GRID.iter().enumerate() {
        if let Some(v) = test.alone.get_mut(gi) {
            *v += (one_sample_llr(c, p_bad, p_bad * g) / phi).min(cap);
        }
    }
}

/// Stable's `q`-quantile from its cumulative histogram, interpolated linearly within the
/// bucket as Prometheus' `histogram_quantile` does; `None` when it lies beyond the highest
/// finite boundary or the histogram is empty.
fn quantile_of(hist: &[Bucket], total: f64, q: f64) -> Option<f64> {
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for b in hist.iter().filter(|b| b.le.is_finite()) {
        if b.count >= rank {
            let within = b.count - below;
            let f = if within > 0.0 {
                (rank - below) / within
            } else {
                1.0
            };
            return Some(lo + (b.le - lo) * f);
        }
        (lo, below) = (b.le, b.count);
    }
    None
}

fn step_one_sample(test: &mut BoundTest, c: Increment, p0: f64, p_bad: f64, phi: f64, cap: f64) {
    let cap = cap.min(CAP_PER_SQRT * (c.total * p0 / phi).max(1.0).sqrt());
    step_one_sample_bad(&mut test.bad, c, p0, phi, cap);
    for (gi, g) in GOOD_GRID.iter().enumerate() {
        let pb = p_bad.min(1.0 - 1e-9);
        test.good[gi] += (one_sample_llr(c, pb, pb * g) / phi).min(cap);
    }
}

/// One look of rollback components (`LAMBDAS × BAD_GRID`) of a one-sample test of the canary's
/// rate against the null `p0`, one look's log-likelihood ratio capped at `cap`.
fn step_one_sample_bad(bad: &mut [f64], c: Increment, p0: f64, phi: f64, cap: f64) {
    for (gi, g) in BAD_GRID.iter().enumerate() {
        let p1 = (p0 * g).min(1.0 - 1e-9);
        let llr = if p1 > p0 {
            (one_sample_llr(c, p0, p1) / phi).min(cap)
        } else {
            0.0
        };
        for (li, (lambda, _)) in LAMBDAS.iter().enumerate() {
            if let Some(v) = bad.get_mut(li * BAD_GRID.len() + gi) {
                *v += log_bet(*lambda, llr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::{MetricReading, Reading};
    use crate::policy::Method;

    const ONE_METRIC: &str = "name: t\nstable: a\ncanary: b\nstrategy: {steps: [5, 50]}\n\
        analysis: {confidence: 0.7}\n\
        metrics:\n  - {name: errors, builtin: error_rate, max_increase: 15%}\n\
        router: {file: {path: /tmp/t.json}}\n";

    fn spec() -> MetricSpec {
        let policy = crate::policy::load_str("t.yaml", ONE_METRIC).expect("valid policy");
        policy.metrics[0].clone()
    }

    fn ctx(confidence: f64) -> JudgeContext {
        JudgeContext {
            method: Method::Sequential,
            confidence,
            metric_count: 1,
            baseline: None,
            configured_weight: 5.0,
        }
    }

    fn reading(stable: Counts, canary: Counts) -> MetricReading {
        let sample = |c: Counts| {
            Reading::Data(Sample {
                value: c.rate(),
                window_events: c.total,
                cumulative: Some(c),
                ..Sample::default()
            })
        };
        MetricReading {
            stable: sample(stable),
            canary: sample(canary),
        }
    }

    /// A canary whose value breaks an absolute bound is held even before the test rejects it.
    #[test]
    fn a_value_beyond_an_absolute_bound_holds_before_the_test_decides() {
        let policy = crate::policy::load_str(
            "t.yaml",
            &ONE_METRIC.replace("max_increase: 15%}", "max: 5%, min_samples: 10}"),
        )
        .expect("valid policy");
        let spec = &policy.metrics[0];
        let stable = Counts {
            bad: 5.0,
            total: 1_000.0,
        };
        let mut memory = JudgeMemory::default();
        let within = Counts {
            bad: 1.0,
            total: 40.0,
        };
        let r = judge(&ctx(0.95), spec, &reading(stable, within), &mut memory);
        assert_eq!(r.verdict, Verdict::Pass, "{}", r.note);
        let mut memory = JudgeMemory::default();
        let above = Counts {
            bad: 5.0,
            total: 40.0,
        };
        let r = judge(&ctx(0.95), spec, &reading(stable, above), &mut memory);
        assert_eq!(r.verdict, Verdict::Hold, "{}", r.note);
        assert!(r.note.contains("above max 5%"), "{}", r.note);
    }

    /// A look whose window holds no canary events is no data, whatever the evidence so far;
    /// evidence of harm still fails it.
    #[test]
    fn a_window_without_canary_events_is_no_data_but_a_rejection_stands() {
        let quiet = |r: MetricReading| MetricReading {
            canary: match r.canary {
                Reading::Data(s) => Reading::Data(Sample {
                    window_events: 0.0,
                    value: None,
                    ..s
                }),
                other => other,
            },
            ..r
        };
        let (stable, canary) = (
            Counts {
                bad: 100.0,
                total: 10_000.0,
            },
            Counts {
                bad: 10.0,
                total: 1_000.0,
            },
        );
        let mut memory = JudgeMemory::default();
        let r = judge(&ctx(0.95), &spec(), &reading(stable, canary), &mut memory);
        assert_eq!(r.verdict, Verdict::Pass, "{}", r.note);
        let r = judge(
            &ctx(0.95),
            &spec(),
            &quiet(reading(stable, canary)),
            &mut memory,
        );
        assert_eq!(r.verdict, Verdict::NoData, "{}", r.note);
        assert!(r.note.contains("no canary events"), "{}", r.note);
        // A canary with ten times stable's error rate is rejected; a quiet look after that
        // still fails.
        let mut memory = JudgeMemory::default();
        let mut bad = Counts::default();
        let mut look = |k: f64, memory: &mut JudgeMemory| {
            let stable = Counts {
                bad: 100.0 * k,
                total: 10_000.0 * k,
            };
            bad = Counts {
                bad: 100.0 * k,
                total: 1_000.0 * k,
            };
            (
                judge(&ctx(0.95), &spec(), &reading(stable, bad), memory),
                stable,
            )
        };
        let (mut r, mut stable) = look(1.0, &mut memory);
        for k in 2..=5 {
            (r, stable) = look(f64::from(k), &mut memory);
        }
        assert_eq!(r.verdict, Verdict::Fail, "{}", r.note);
        let r = judge(
            &ctx(0.95),
            &spec(),
            &quiet(reading(stable, bad)),
            &mut memory,
        );
        assert_eq!(r.verdict, Verdict::Fail, "{}", r.note);
    }

    #[test]
    fn first_look_e_value_is_the_mixture_of_known_likelihood_ratios() {
        let (nc, ns, ec, es) = (100.0, 1000.0, 2.0, 20.0);
        let mut memory = JudgeMemory::default();
        let r = judge(
            &ctx(0.95),
            &spec(),
            &reading(Counts { bad: es, total: ns }, Counts { bad: ec, total: nc }),
            &mut memory,
        );
        // By hand: θ(r) = nc·r / (nc·r + ns), r0 = 1.15, alternatives r0·g; each λ-component
        // is 1 − λ + λ·LR; the mixture weighs λ by (0.6, 0.25, 0.15) and g uniformly.
        let theta = |r: f64| nc * r / (nc * r + ns);
        let t0 = theta(1.15);
        let mut e = 0.0;
        for (lambda, w) in [(1.0, 0.6), (0.2, 0.25), (0.04, 0.15)] {
            for g in [1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0] {
                let t1 = theta(1.15 * g);
                let lr = (t1 / t0).powf(ec) * ((1.0 - t1) / (1.0 - t0)).powf(es);
                assert!(lr.ln() < EARLY_CAP, "the example must not reach the cap");
                e += w / 7.0 * (1.0 - lambda + lambda * lr);
            }
        }
        let ev = r.evidence.expect("evidence");
        assert!(
            (ev.log_e_value.expect("log e") - e.ln()).abs() < 1e-9,
            "{:?} vs {}",
            ev.log_e_value,
            e.ln()
        );
        assert!((ev.log_threshold.expect("threshold") - 20f64.ln()).abs() < 1e-12);
    }

    /// Regression: counts from `increase()` are fractional, and 99.7 of 100 needed events
    /// read as "canary 100 … of 100 needed".
    #[test]
    fn a_fractional_count_short_of_min_samples_never_reads_as_enough() {
        let mut memory = JudgeMemory::default();
        let r = judge(
            &ctx(0.95),
            &spec(),
            &reading(
                Counts {
                    bad: 10.0,
                    total: 1000.0,
                },
                Counts {
                    bad: 1.0,
                    total: 99.7,
                },
            ),
            &mut memory,
        );
        assert_eq!(r.verdict, Verdict::Hold, "{}", r.note);
        assert!(
            r.note
                .starts_with("gathering data: canary 99.7 and stable 1000 events of 100 needed"),
            "{}",
            r.note
        );
    }

    /// Simulates looks at a canary whose error rate is `ratio` × stable's and returns how
    /// many of `streams` rollouts the judge failed within `looks` looks.
    fn failures(confidence: f64, ratio: f64, streams: u32, looks: u32, seed: u64) -> u32 {
        use crate::bench::random::{generator, poisson};
        let spec = spec();
        let ctx = ctx(confidence);
        let mut failed = 0;
        for stream in 0..streams {
            let mut rng = generator(seed, 0, stream);
            let mut memory = JudgeMemory::default();
            let (mut s, mut c) = (Counts::default(), Counts::default());
            for _ in 0..looks {
                // 15 s of 20,000 requests a minute with 5 % to the canary, 1 % errors.
                let (ns, nc) = (poisson(&mut rng, 4750.0), poisson(&mut rng, 250.0));
                s.total += ns;
                c.total += nc;
                s.bad += poisson(&mut rng, ns * 0.01);
                c.bad += poisson(&mut rng, nc * 0.01 * ratio);
                let r = judge(&ctx, &spec, &reading(s, c), &mut memory);
                if r.verdict == Verdict::Fail {
                    failed += 1;
                    break;
                }
            }
        }
        failed
    }

    #[test]
    fn false_rollbacks_stay_below_alpha_at_the_tolerance_boundary() {
        // The least favourable good canary sits exactly at the tolerance (1.15 × stable).
        // With α = 0.3 and 400 rollouts of 30 minutes each, a judge that broke its bound
        // would fail far more than 120; an anytime-valid one stays well below.
        let failed = failures(0.7, 1.15, 400, 120, 11);
        assert!(failed <= 120, "{failed} of 400 rollouts failed at α = 0.3");
        let failed = failures(0.95, 1.15, 400, 120, 13);
        assert!(failed <= 20, "{failed} of 400 rollouts failed at α = 0.05");
        // The same check must be able to fail: a canary 1.3 × stable is beyond tolerance and
        // is failed in most rollouts.
        assert!(failures(0.7, 1.3, 100, 120, 14) > 30);
    }

    #[test]
    fn a_router_sending_another_share_is_flagged_and_does_not_bias_the_test() {
        // Configured 5 %, realised 2 %, canary as good as stable: mismatch shown, no failure.
        let spec = spec();
        let ctx = ctx(0.95);
        let mut memory = JudgeMemory::default();
        let mut flagged = false;
        for look in 1..=40 {
            let n = f64::from(look);
            let s = Counts {
                bad: 98.0 * n,
                total: 9800.0 * n,
            };
            let c = Counts {
                bad: 2.0 * n,
                total: 200.0 * n,
            };
            let r = judge(&ctx, &spec, &reading(s, c), &mut memory);
            assert_ne!(r.verdict, Verdict::Fail);
            flagged |= r.evidence.is_some_and(|e| e.share_mismatch);
        }
        assert!(flagged);
    }

    #[test]
    fn a_clear_regression_is_caught() {
        let failed = failures(0.95, 3.0, 20, 120, 12);
        assert_eq!(failed, 20);
    }

    #[test]
    fn wald_bounds_match_the_readme() {
        let d = bernoulli_kl(0.95, 0.05);
        assert!((d - 2.650).abs() < 5e-4, "d(0.95||0.05) = {d}");
        let n = |p1: f64| wald_bound(0.05, 0.05, bernoulli_kl(p1, 0.01)).round();
        assert_eq!(n(0.015), 2421.0);
        assert_eq!(n(0.02), 677.0);
        assert_eq!(n(0.05), 64.0);
    }

    #[test]
    fn conditional_llr_is_the_binomial_ratio() {
        // Equal traffic, ratio 2 against 1: θ = 2/3 against 1/2.
        let c = Increment {
            bad: 3.0,
            total: 100.0,
        };
        let s = Increment {
            bad: 1.0,
            total: 100.0,
        };
        let want = 3.0 * ((2.0 / 3.0) / 0.5f64).ln() + 1.0 * ((1.0 / 3.0) / 0.5f64).ln();
        assert!((two_sample_llr(c, s, 1.0, 2.0) - want).abs() < 1e-12);
        // Only the ratio of traffic matters, not its level.
        let c10 = Increment {
            bad: 3.0,
            total: 1000.0,
        };
        let s10 = Increment {
            bad: 1.0,
            total: 1000.0,
        };
        assert!((two_sample_llr(c10, s10, 1.0, 2.0) - want).abs() < 1e-12);
    }

    #[test]
    fn conditional_llr_is_a_martingale_under_the_null() {
        // E[LR] = 1 under θ0 exactly: Σ_k P(k) · LR(k) over the binomial law of k of E events.
        let (nc, ns, e): (f64, f64, u32) = (50.0, 950.0, 12);
        let (r0, r1): (f64, f64) = (1.2, 3.0);
        let t0 = nc * r0 / (nc * r0 + ns);
        let mut total = 0.0;
        for k in 0..=e {
            let kf = f64::from(k);
            let ln_choose = statrs::function::factorial::ln_binomial(u64::from(e), u64::from(k));
            let p = (ln_choose + kf * t0.ln() + (f64::from(e) - kf) * (1.0 - t0).ln()).exp();
            let lr = two_sample_llr(
                Increment { bad: kf, total: nc },
                Increment {
                    bad: f64::from(e) - kf,
                    total: ns,
                },
                r0,
                r1,
            )
            .exp();
            total += p * lr;
        }
        assert!((total - 1.0).abs() < 1e-9, "E[LR] = {total}");
    }

    #[test]
    fn betting_step_is_bounded_below_and_exact() {
        assert!((log_bet(1.0, -50.0) + 50.0).abs() < 1e-12);
        assert!((log_bet(0.2, -1e6) - 0.8f64.ln()).abs() < 1e-12);
        let want = (0.8 + 0.2 * 2f64.exp()).ln();
        assert!((log_bet(0.2, 2.0) - want).abs() < 1e-12);
        let big = log_bet(0.04, 100.0);
        assert!((big - (0.04f64.ln() + 100.0)).abs() < 1e-9);
    }

    #[test]
    fn log_sum_exp_handles_extremes() {
        assert!((log_sum_exp(&[0.0, 0.0]) - 2f64.ln()).abs() < 1e-12);
        assert!((log_sum_exp(&[1000.0, 0.0]) - 1000.0).abs() < 1e-12);
        assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
    }

    /// Runs 40 looks with both versions at stable's rate `rate(look)`, then 30 with all traffic
    /// on the canary at rate `after_rate`, and returns whether the canary failed after the
    /// switch, and stable's measured drift.
    fn watch(rate: impl Fn(u32) -> f64, after_rate: f64) -> (bool, f64) {
        let spec = spec();
        let ctx = ctx(0.95);
        let mut memory = JudgeMemory::default();
        let (mut s, mut c) = (Counts::default(), Counts::default());
        for look in 0..40 {
            let p = rate(look);
            s.total += 10_000.0;
            s.bad += 10_000.0 * p;
            c.total += 500.0;
            c.bad += 500.0 * p;
            let r = judge(&ctx, &spec, &reading(s, c), &mut memory);
            assert_ne!(r.verdict, Verdict::Fail, "no regression before the switch");
        }
        let mut failed = false;
        for _ in 0..30 {
            c.total += 10_000.0;
            c.bad += 10_000.0 * after_rate;
            failed |= judge(&ctx, &spec, &reading(s, c), &mut memory).verdict == Verdict::Fail;
        }
        let drift = memory.sequential.map_or(0.0, |m| m.stable_drift);
        (failed, drift)
    }

    #[test]
    fn after_the_switch_the_reference_allows_for_stables_own_drift() {
        // Both versions' error rate doubles with load, from 1 % to 2 %, before the switch; the
        // canary then stays at 2 %, which stable itself reached, a third above stable's rate
        // over the whole rollout (1.5 %). Not a regression.
        let ramp = |look: u32| 0.01 + 0.01 * f64::from(look) / 39.0;
        let (failed, drift) = watch(ramp, 0.02);
        assert!(
            !failed,
            "load-driven drift read as a regression (drift {drift})"
        );
        assert!(drift > 1.15, "a doubling is measured as drift: {drift}");
        // Well beyond where stable went: still caught.
        assert!(
            watch(ramp, 0.02 * 1.6).0,
            "a real regression after the switch"
        );
        // A steady stable gives no drift to hide behind: 1.33 times its rate is a regression.
        let (failed, drift) = watch(|_| 0.015, 0.02);
        assert!(
            failed,
            "a third more errors at the switch is a regression (drift {drift})"
        );
        assert!(drift < 1.02, "steady counts show no drift: {drift}");
        // One look of a burst on stable (a shared dependency's outage) raises the reference by
        // at most the cap, and fades: a canary at six times stable's rate is still caught.
        let burst = |look: u32| if look == 20 { 0.3 } else { 0.01 };
        let (failed, drift) = watch(burst, 0.06);
        assert!(drift <= DRIFT_CAP, "{drift}");
        assert!(
            failed,
            "a burst on stable must not blind the watch (drift {drift})"
        );
        // Raised on the odds scale, a reference never reaches 1.
        assert!((raise_odds(0.01, 1.5) - 0.015 / 1.005).abs() < 1e-4);
        assert!(raise_odds(0.9, 1.5) < 1.0);
        assert_eq!(raise_odds(0.5, 1.0), 0.5);
    }

    /// `increase()` over a range that grows with each look wobbles without traffic: the dip
    /// and the rebound add nothing, and real new events after it still count once.
    #[test]
    fn wobbling_counts_without_traffic_add_no_phantom_events() {
        let mut memory = JudgeMemory::default();
        let stable = |total: f64| Counts {
            bad: total / 100.0,
            total,
        };
        let canary = |total: f64| Counts { bad: 2.0, total };
        for (s, c) in [
            (10_000.0, 170.0),
            (9_950.0, 168.0),
            (10_000.0, 173.9),
            (9_940.0, 167.8),
            (10_000.0, 173.9),
        ] {
            judge(
                &ctx(0.95),
                &spec(),
                &reading(stable(s), canary(c)),
                &mut memory,
            );
        }
        let seen = |m: &JudgeMemory| {
            m.sequential
                .as_ref()
                .map(|q| (q.canary.total, q.stable.total))
        };
        assert_eq!(seen(&memory), Some((173.9, 10_000.0)));
        judge(
            &ctx(0.95),
            &spec(),
            &reading(stable(10_500.0), canary(200.0)),
            &mut memory,
        );
        assert_eq!(seen(&memory), Some((200.0, 10_500.0)));
    }

    #[test]
    fn counter_decrease_is_a_reset_that_adds_nothing() {
        let last = Some(Counts {
            bad: 10.0,
            total: 1000.0,
        });
        let inc = difference(
            last,
            Counts {
                bad: 1.0,
                total: 50.0,
            },
        );
        assert_eq!(inc, Increment::default());
        let inc = difference(
            last,
            Counts {
                bad: 12.0,
                total: 1100.0,
            },
        );
        assert_eq!(
            inc,
            Increment {
                bad: 2.0,
                total: 100.0
            }
        );
    }

    #[test]
    fn survival_interpolates_between_boundaries() {
        let hist = vec![
            Bucket {
                le: 0.1,
                count: 500.0,
            },
            Bucket {
                le: 0.25,
                count: 966.0,
            },
            Bucket {
                le: f64::INFINITY,
                count: 1000.0,
            },
        ];
        let s01 = survival(&hist, 1000.0, 0.1);
        assert!((s01 - 500.5 / 1001.0).abs() < 1e-12);
        let mid = survival(&hist, 1000.0, 0.2);
        assert!(mid < s01 && mid > survival(&hist, 1000.0, 0.25));
        assert_eq!(survival(&hist, 1000.0, 0.0), 1.0);
    }

    #[test]
    fn boundaries_above_stables_empty_tail_are_not_tested() {
        let b = |le: f64, count: f64| Bucket { le, count };
        // Stable: 1% of requests at most 0.01 s, 95% at most 0.05 s, 30 above 0.5 s, none
        // above 1 s.
        let stable = vec![
            b(0.01, 100.0),
            b(0.05, 9500.0),
            b(0.5, 9970.0),
            b(1.0, 10000.0),
            b(2.5, 10000.0),
            b(5.0, 10000.0),
        ];
        let canary: Vec<Bucket> = stable.iter().map(|x| b(x.le, 0.0)).collect();
        // 0.01 is exceeded by 99% of stable's requests: no slowdown can show there. 1.0 is the
        // first boundary stable never exceeded; 2.5 and 5 would only repeat its evidence.
        assert_eq!(
            tested_boundaries(&canary, None, &stable, 10000.0),
            vec![0.05, 0.5, 1.0]
        );
        // The shell's slow boundary stays, wherever it is.
        assert_eq!(
            tested_boundaries(&canary, Some(5.0), &stable, 10000.0),
            vec![0.05, 0.5, 1.0, 5.0]
        );
        // Without stable's histogram nothing is known, so every boundary is tested.
        assert_eq!(tested_boundaries(&canary, None, &[], 0.0).len(), 6);
        // Nor is an empty tail among a few hundred of stable's requests taken as empty.
        let few: Vec<Bucket> = stable.iter().map(|x| b(x.le, x.count / 40.0)).collect();
        assert_eq!(tested_boundaries(&canary, None, &few, 250.0).len(), 5);
    }

    /// Regression (acceptance test): a model whose requests all finish within one bucket
    /// boundary (here 0.1 s) gives the two-sample test nothing to learn from at the boundary
    /// nearest its p99, since neither version ever exceeds it. An identical canary then could
    /// never be shown good and ran into the progress deadline. The canary alone, with none of
    /// thousands of requests above 0.1 s, shows its p99 below twice the tolerance.
    #[test]
    fn a_fast_identical_canary_with_no_slow_requests_becomes_promotable() {
        let policy = crate::policy::load_str(
            "t.yaml",
            "name: t\nstable: a\ncanary: b\nstrategy: {steps: [5, 50]}\n\
             metrics:\n  - {name: p99, builtin: latency, quantile: 0.99, max_increase: 20%}\n\
             router: {file: {path: /tmp/t.json}}\n",
        )
        .expect("valid policy");
        let spec = policy.metrics[0].clone();
        let les = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, f64::INFINITY];
        // 70 % of requests at most 0.05 s, all at most 0.1 s.
        let sample = |n: f64| {
            let buckets: Vec<Bucket> = les
                .iter()
                .map(|&le| Bucket {
                    le,
                    count: if le >= 0.1 {
                        n
                    } else if le >= 0.05 {
                        0.7 * n
                    } else {
                        0.0
                    },
                })
                .collect();
            Reading::Data(Sample {
                value: Some(0.0985),
                window_events: n,
                cumulative: Some(Counts { bad: 0.0, total: n }),
                buckets,
                ..Sample::default()
            })
        };
        let mut memory = JudgeMemory::default();
        let mut promotable_at = None;
        for look in 1..=200 {
            let r = MetricReading {
                stable: sample(450.0 * look as f64),
                canary: sample(50.0 * look as f64),
            };
            let report = judge(&ctx(0.95), &spec, &r, &mut memory);
            assert_ne!(
                report.verdict,
                Verdict::Fail,
                "look {look}: {}",
                report.note
            );
            if report.promotable {
                promotable_at = Some(look);
                break;
            }
        }
        // About 820 canary requests without a slow one are needed (ln 20 + ln 4 + ln 2 nats at
        // ln(0.997 / 0.99) each); the two-sample test alone never gets there.
        let look = promotable_at.expect("promotable within 200 looks (10,000 canary requests)");
        assert!((14..=40).contains(&look), "promotable at look {look}");
    }

    /// How many of 400 canaries whose bad-event rate is exactly the `alone` family's null `p`
    /// (`per_look` events a look, at most 300 looks) that family promotes at level 5 %.
    fn alone_promotions_at_the_null(le: Option<f64>, p: f64, per_look: usize, seed: u64) -> u32 {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut promoted = 0;
        for _ in 0..400 {
            let mut t = BoundTest::new(TestKind::Relative, le, 1.0, true);
            t.alone = vec![0.0; GOOD_GRID.len()];
            for _ in 0..300 {
                let bad = (0..per_look).filter(|_| rng.random::<f64>() < p).count() as f64;
                let total = per_look as f64;
                step_alone(&mut t, Increment { bad, total }, p, 1.0, 3.0);
                // The two-sample family stays at its start (no bad events of stable's).
                if t.log_good() >= (20f64).ln() {
                    promoted += 1;
                    break;
                }
            }
        }
        promoted
    }

    /// The `alone` family is an e-process under its null: a canary whose p99 lies exactly at
    /// the boundary (1 % of its requests slower) is promoted at most at the level, however
    /// often it is looked at: 20 of 400, with room for sampling noise.
    #[test]
    fn the_canary_alone_test_does_not_promote_a_slower_canary() {
        let promoted = alone_promotions_at_the_null(Some(0.1), 0.01, 50, 11);
        assert!(promoted <= 30, "{promoted} of 400 promoted");
    }

    /// Runs `looks` analyses of one error-rate metric (`tolerance` as written) in which both
    /// versions serve `per_look` requests (stable nine times the canary's) with the given bad
    /// events each, and returns the last report.
    fn run_rate(tolerance: &str, looks: u32, stable_bad: f64, canary_bad: f64) -> MetricReport {
        let policy = crate::policy::load_str(
            "t.yaml",
            &ONE_METRIC.replace("max_increase: 15%", &format!("max_increase: {tolerance}")),
        )
        .expect("valid policy");
        let spec = &policy.metrics[0];
        let mut memory = JudgeMemory::default();
        let mut last = None;
        for look in 1..=looks {
            let n = f64::from(look);
            let r = reading(
                Counts {
                    bad: stable_bad * n,
                    total: 900.0 * n,
                },
                Counts {
                    bad: canary_bad * n,
                    total: 100.0 * n,
                },
            );
            let report = judge(&ctx(0.95), spec, &r, &mut memory);
            assert_ne!(
                report.verdict,
                Verdict::Fail,
                "look {look}: {}",
                report.note
            );
            last = Some(report);
        }
        last.expect("at least one look")
    }

    /// Regression (bench acceptance test): with no errors in either version, a relative
    /// tolerance had nothing to compare, the canary could never be shown good, and the
    /// rollout was rolled back at its progress deadline: every healthy canary of a service
    /// without errors. It is promotable once both versions served their `min_samples`.
    #[test]
    fn a_relative_tolerance_with_no_bad_events_in_either_version_is_promotable() {
        let r = run_rate("15%", 2, 0.0, 0.0);
        assert_eq!(r.verdict, Verdict::Pass, "{}", r.note);
        assert!(r.promotable, "{}", r.note);
        assert!(!r.thin_evidence);
        assert!(
            r.note.contains("no bad events in either version"),
            "{}",
            r.note
        );
        // One error on the canary: there is something to compare again, and far too little.
        let policy = crate::policy::load_str("t.yaml", ONE_METRIC).expect("valid policy");
        let mut memory = JudgeMemory::default();
        let zero = Counts {
            bad: 0.0,
            total: 1800.0,
        };
        let one = Counts {
            bad: 1.0,
            total: 200.0,
        };
        let r = judge(
            &ctx(0.95),
            &policy.metrics[0],
            &reading(zero, one),
            &mut memory,
        );
        assert!(!r.promotable, "{}", r.note);
        assert!(r.thin_evidence, "{}", r.note);
    }

    /// Regression (bench acceptance test): an absolute tolerance (`0.5pp`) could not show a
    /// canary good while bad events were rare or absent, for the same reason. The canary alone,
    /// against stable's rate plus twice the tolerance, can.
    #[test]
    fn an_absolute_tolerance_shows_a_canary_without_errors_good() {
        let r = run_rate("0.5pp", 30, 0.0, 0.0);
        assert!(r.promotable, "{}", r.note);
        // 3,000 canary requests without an error: ln 20 + ln 4 + ln 2 nats at about 0.01 each.
        let early = run_rate("0.5pp", 5, 0.0, 0.0);
        assert!(!early.promotable, "{}", early.note);
    }

    /// The error rate with a tolerance in percentage points, 10 events needed.
    fn pp_errors() -> MetricSpec {
        let text = ONE_METRIC.replace(
            "max_increase: 15%}",
            "max_increase: 0.5pp, min_samples: 10}",
        );
        let policy = crate::policy::load_str("t.yaml", &text).expect("valid policy");
        policy.metrics[0].clone()
    }

    /// Regression (UAT): with a tolerance in percentage points and no errors on stable, the
    /// two-sample test expects every error on the canary under its null and learned little
    /// from them: a canary at 5 % against a 0.5pp tolerance passed its first step and went up
    /// to the next one. The canary alone, against stable's rate plus the tolerance, catches it
    /// within a few looks of 100 requests.
    #[test]
    fn an_absolute_tolerance_catches_a_canary_far_beyond_it_when_stable_has_no_errors() {
        let spec = pp_errors();
        let mut memory = JudgeMemory::default();
        let mut failed_at = None;
        for look in 1..=20u32 {
            let n = f64::from(look);
            // As much traffic on each version (a router that does not split by weight).
            let r = reading(
                Counts {
                    bad: 0.0,
                    total: 100.0 * n,
                },
                Counts {
                    bad: 5.0 * n,
                    total: 100.0 * n,
                },
            );
            if judge(&ctx(0.95), &spec, &r, &mut memory).verdict == Verdict::Fail {
                failed_at = Some(look);
                break;
            }
        }
        let look = failed_at.expect("rolled back within 20 looks");
        assert!(look <= 4, "failed at look {look}");
    }

    /// Review: the canary-alone families first compared the canary with stable's rate over
    /// the whole rollout, with no concurrent control: an outage of a shared dependency that
    /// put both versions at 5 % errors rolled back an identical canary in a look or two. They
    /// now compare with stable's rate over its last few looks, this one included.
    #[test]
    fn a_shared_outage_does_not_roll_back_an_identical_canary_under_a_pp_tolerance() {
        let spec = pp_errors();
        let mut memory = JudgeMemory::default();
        let (mut stable, mut canary) = (Counts::default(), Counts::default());
        for look in 1..=40u32 {
            // An hour at 1 %, then both versions at 5 % for ten looks.
            let p = if look > 30 { 0.05 } else { 0.01 };
            stable.bad += 1000.0 * p;
            stable.total += 1000.0;
            canary.bad += 500.0 * p;
            canary.total += 500.0;
            let r = judge(&ctx(0.95), &spec, &reading(stable, canary), &mut memory);
            assert_ne!(r.verdict, Verdict::Fail, "look {look}: {}", r.note);
        }
    }

    /// The rate's `alone` family is an e-process under its null: a canary whose error rate is
    /// stable's plus twice the tolerance is promoted at most at the level.
    #[test]
    fn the_canary_alone_rate_test_does_not_promote_a_canary_twice_the_tolerance_worse() {
        // Stable at 0.1 %, tolerance 0.5pp: the null "bad" rate is 1.1 %.
        let promoted = alone_promotions_at_the_null(None, 0.011, 100, 5);
        assert!(promoted <= 30, "{promoted} of 400 promoted");
    }

    /// The rate's `alone_bad` family is an e-process under its null: a canary whose error rate
    /// is exactly stable's plus the tolerance is rolled back at most at the level (5 %: 20 of
    /// 400, with room for sampling noise), however often it is looked at.
    #[test]
    fn the_canary_alone_rollback_test_holds_its_level_at_the_tolerance() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
        let p0 = 0.006;
        let mut rejected = 0;
        for _ in 0..400 {
            let mut t = BoundTest::new(TestKind::Relative, None, 1.0, true);
            t.alone_bad = vec![0.0; LAMBDAS.len() * BAD_GRID.len()];
            for _ in 0..300 {
                let bad = (0..100).filter(|_| rng.random::<f64>() < p0).count() as f64;
                let c = Increment { bad, total: 100.0 };
                step_one_sample_bad(&mut t.alone_bad, c, p0, 1.0, 3.0);
                if t.log_bad() >= (20f64).ln() {
                    rejected += 1;
                    break;
                }
            }
        }
        assert!(rejected <= 30, "{rejected} of 400 rolled back");
    }

    /// Thin evidence is about too few bad events, not about a canary in the indifference
    /// zone: with thousands of errors the deadline's rollback stands.
    #[test]
    fn thin_evidence_means_too_few_bad_events_to_show_an_identical_canary_good() {
        // 1 error per 100,000 requests: 10 looks hold 0.09 stable and 0.01 canary errors each.
        let rare = run_rate("15%", 10, 0.009, 0.001);
        assert!(rare.thin_evidence, "{}", rare.note);
        assert!(rare.note.contains("too few to show it"), "{}", rare.note);
        // 1 % errors and the canary 20 % worse (between the tolerance and twice it), 2,000
        // errors in all.
        let plenty = run_rate("15%", 200, 9.0, 1.2);
        assert!(!plenty.thin_evidence, "{}", plenty.note);
        assert!(!plenty.promotable, "{}", plenty.note);
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_prometheus() {
        let b = |le: f64, count: f64| Bucket { le, count };
        let h = [b(0.05, 70.0), b(0.1, 100.0), b(f64::INFINITY, 100.0)];
        // Rank 99 of 100 lies 29/30 of the way through (0.05, 0.1].
        let q = quantile_of(&h, 100.0, 0.99).expect("within the histogram");
        assert!((q - (0.05 + 0.05 * 29.0 / 30.0)).abs() < 1e-12, "{q}");
        // Beyond the highest finite boundary: unknown.
        let h = [b(0.05, 70.0), b(0.1, 90.0), b(f64::INFINITY, 100.0)];
        assert_eq!(quantile_of(&h, 100.0, 0.99), None);
        assert_eq!(quantile_of(&[], 0.0, 0.99), None);
    }

    /// Review: the default judge reported no limit for a relative bound, so neither the API
    /// nor `canaryd_analysis_bound` showed what "15 % above stable" meant this analysis.
    #[test]
    fn a_relative_bound_reports_stables_value_moved_by_the_tolerance() {
        let mut memory = JudgeMemory::default();
        let r = reading(
            Counts {
                bad: 20.0,
                total: 1000.0,
            },
            Counts {
                bad: 1.0,
                total: 100.0,
            },
        );
        let report = judge(&ctx(0.95), &spec(), &r, &mut memory);
        let bound = report
            .bounds
            .iter()
            .find(|b| b.kind == BoundKind::MaxIncrease)
            .expect("the max_increase bound");
        let limit = bound.limit.expect("a limit from stable's value");
        assert!((limit - 0.02 * 1.15).abs() < 1e-12, "{limit}");
        assert_eq!(bound.written, "15%");
    }

    #[test]
    fn rate_ratios_follow_the_tolerance() {
        let rel = Tolerance {
            kind: ToleranceKind::Relative,
            amount: 0.2,
            written: "20%".into(),
        };
        assert_eq!(rate_ratios(&rel, 0.01, false), (1.2, 1.4));
        let pp = Tolerance {
            kind: ToleranceKind::Absolute,
            amount: 0.005,
            written: "0.5pp".into(),
        };
        let (r0, rb) = rate_ratios(&pp, 0.01, false);
        assert!((r0 - 1.5).abs() < 1e-12 && (rb - 2.0).abs() < 1e-12);
        // Accuracy: a 1pp decrease from 92 % is 8 % → 9 % incorrect.
        let acc = Tolerance {
            kind: ToleranceKind::Absolute,
            amount: 0.01,
            written: "1pp".into(),
        };
        let (r0, _) = rate_ratios(&acc, 0.08, true);
        assert!((r0 - 0.09 / 0.08).abs() < 1e-12);
        let zero = Tolerance {
            kind: ToleranceKind::Relative,
            amount: 0.0,
            written: "0%".into(),
        };
        assert_eq!(rate_ratios(&zero, 0.01, false), (1.0, MIN_GAP));
    }
}
