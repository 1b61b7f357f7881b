//! The simulated world of one repetition: two versions serving traffic, the counters and
//! histograms they export, and a Prometheus that scrapes them every 15 s. The controller
//! learns only what it could learn by querying that Prometheus.

use super::scenario::Scenario;
use crate::observation::{Bucket, Counts, MetricReading, Reading, Sample, Window};
use crate::policy::{MetricKind, MetricSpec, Policy};
use rand::rngs::SmallRng;
use statrs::function::erf::erfc;

/// Prometheus's default histogram buckets (seconds); the last is +Inf.
pub const BUCKETS: [f64; 12] = [
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    f64::INFINITY,
];
/// Scrape interval, milliseconds.
pub const SCRAPE_MS: i64 = 15_000;
const STABLE: usize = 0;
const CANARY: usize = 1;

/// What one version has exported so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub requests: f64,
    pub errors: f64,
    /// Requests per histogram bucket (not cumulative).
    pub hist: [f64; 12],
    pub correct: f64,
    pub incorrect: f64,
}

impl Counters {
    fn minus(&self, base: &Counters) -> Counters {
        let mut hist = [0.0; 12];
        for (k, h) in hist.iter_mut().enumerate() {
            *h = self.hist[k] - base.hist[k];
        }
        Counters {
            requests: self.requests - base.requests,
            errors: self.errors - base.errors,
            hist,
            correct: self.correct - base.correct,
            incorrect: self.incorrect - base.incorrect,
        }
    }

    fn hist_total(&self) -> f64 {
        self.hist.iter().sum()
    }

    fn cumulative_buckets(&self) -> Vec<Bucket> {
        let mut acc = 0.0;
        BUCKETS
            .iter()
            .zip(self.hist.iter())
            .map(|(le, c)| {
                acc += c;
                Bucket {
                    le: *le,
                    count: acc,
                }
            })
            .collect()
    }
}

/// A scrape: both versions' counters at a moment.
#[derive(Clone, Copy, Debug)]
struct Snapshot {
    at_ms: i64,
    arms: [Counters; 2],
}

/// Labels on their way: expected labelled predictions not yet scored, per version.
#[derive(Clone, Copy, Debug, Default)]
struct Pending {
    correct: f64,
    incorrect: f64,
}

/// The world of one repetition.
pub struct World<'a> {
    sc: &'a Scenario,
    /// Per-bucket probabilities of a request's latency, per version.
    probs: [[f64; 12]; 2],
    arms: [Counters; 2],
    pending: [Pending; 2],
    snapshots: Vec<Snapshot>,
}

/// P(X ≤ x) for the log-normal latency of a version, with the canary's slow tail.
fn latency_cdf(sc: &Scenario, canary: bool, x: f64) -> f64 {
    let phi = |z: f64| 0.5 * erfc(-z / std::f64::consts::SQRT_2);
    let mu = sc.lat_mu + if canary { sc.lat_shift_c } else { 0.0 };
    let base = |x: f64| {
        if x <= 0.0 {
            0.0
        } else if x.is_infinite() {
            1.0
        } else {
            phi((x.ln() - mu) / sc.lat_sigma)
        }
    };
    if canary && sc.tail_frac_c > 0.0 {
        (1.0 - sc.tail_frac_c) * base(x) + sc.tail_frac_c * base(x - sc.tail_add_s)
    } else {
        base(x)
    }
}

/// The probabilities of the histogram's buckets for one version.
pub fn bucket_probs(sc: &Scenario, canary: bool) -> [f64; 12] {
    let mut out = [0.0; 12];
    let mut prev = 0.0;
    for (k, le) in BUCKETS.iter().enumerate() {
        let c = latency_cdf(sc, canary, *le);
        out[k] = (c - prev).max(0.0);
        prev = c;
    }
    out
}

/// The histogram quantile the way Prometheus's `histogram_quantile` interpolates it.
pub fn histogram_quantile(q: f64, hist: &[f64; 12]) -> Option<f64> {
    let total: f64 = hist.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut acc = 0.0;
    for (k, c) in hist.iter().enumerate() {
        let lower = if k == 0 { 0.0 } else { BUCKETS[k - 1] };
        if acc + c >= rank && *c > 0.0 {
            if BUCKETS[k].is_infinite() {
                return Some(lower);
            }
            return Some(lower + (BUCKETS[k] - lower) * (rank - acc) / c);
        }
        acc += c;
    }
    Some(BUCKETS[10])
}

impl<'a> World<'a> {
    pub fn new(sc: &'a Scenario) -> Self {
        World {
            sc,
            probs: [bucket_probs(sc, false), bucket_probs(sc, true)],
            arms: [Counters::default(); 2],
            pending: [Pending::default(); 2],
            snapshots: vec![Snapshot {
                at_ms: 0,
                arms: [Counters::default(); 2],
            }],
        }
    }

    /// Serves traffic from `from_ms` to `to_ms` with the canary getting `share` of it.
    /// Returns the canary requests served.
    pub fn serve(&mut self, rng: &mut SmallRng, from_ms: i64, to_ms: i64, share: f64) -> f64 {
        let sc = self.sc;
        let dt = (to_ms - from_ms) as f64 / 1000.0;
        if dt <= 0.0 {
            return 0.0;
        }
        let mid_min = (from_ms + to_ms) as f64 / 2.0 / 60_000.0;
        let load = 1.0 + sc.diurnal_amp * (2.0 * std::f64::consts::PI * mid_min / 60.0).sin();
        let per_s = sc.total_rpm / 60.0 * load.max(0.0);
        let coupling = (1.0 + sc.load_err_coupling * (load - 1.0)).max(0.0);
        let mut canary_requests = 0.0;
        for arm in [STABLE, CANARY] {
            let frac = if arm == CANARY { share } else { 1.0 - share };
            let lam = per_s * frac * dt;
            let p = if arm == CANARY {
                sc.p_canary(mid_min)
            } else {
                sc.p_s
            };
            let p = (p * coupling).clamp(0.0, 1.0);
            let errors = super::random::bursty(rng, lam * p, sc.overdispersion);
            let ok = super::random::poisson(rng, lam * (1.0 - p));
            let a = &mut self.arms[arm];
            a.requests += errors + ok;
            a.errors += errors;
            for k in 0..12 {
                a.hist[k] += super::random::poisson(rng, lam * self.probs[arm][k]);
            }
            if arm == CANARY {
                canary_requests = errors + ok;
            }
            if let Some(acc) = sc.accuracy {
                let q = if arm == CANARY { acc.q_c } else { acc.q_s };
                let m_correct = lam * acc.coverage * (1.0 - q);
                let m_incorrect = lam * acc.coverage * q;
                let tau = acc.delay_mean_min * 60.0;
                // Labels of predictions made in this chunk arrive after an exponential delay;
                // the arrivals in any interval form a Poisson count whose mean follows from
                // what is still pending (an exponential kernel needs no more state).
                let (decay, inside) = if tau > 0.0 {
                    let decay = (-dt / tau).exp();
                    (decay, 1.0 - tau / dt * (1.0 - decay))
                } else {
                    (0.0, 1.0)
                };
                let pend = &mut self.pending[arm];
                let mean_c = pend.correct * (1.0 - decay) + m_correct * inside;
                let mean_i = pend.incorrect * (1.0 - decay) + m_incorrect * inside;
                pend.correct = pend.correct * decay + m_correct * (1.0 - inside);
                pend.incorrect = pend.incorrect * decay + m_incorrect * (1.0 - inside);
                let a = &mut self.arms[arm];
                a.correct += super::random::poisson(rng, mean_c);
                a.incorrect += super::random::poisson(rng, mean_i);
            }
        }
        canary_requests
    }

    /// Prometheus scrapes both versions.
    pub fn scrape(&mut self, at_ms: i64) {
        self.snapshots.push(Snapshot {
            at_ms,
            arms: self.arms,
        });
    }

    /// Whether the canary's latency series is absent at the last scrape before `at_ms`.
    fn latency_missing(&self, at_ms: i64) -> bool {
        let scraped = self.last_index(at_ms);
        let t = self.snapshots[scraped].at_ms as f64 / 60_000.0;
        self.sc
            .lat_missing_c
            .is_some_and(|(from, to)| t >= from && t < to)
    }

    /// The last scrape at or before `at_ms` (the first one if none is). Scrapes are in time
    /// order, so this and `first_index_from` are binary searches: a linear scan made every
    /// analysis cost as much as the rollout was old, and long rollouts quadratic.
    fn last_index(&self, at_ms: i64) -> usize {
        self.snapshots
            .partition_point(|s| s.at_ms <= at_ms)
            .saturating_sub(1)
    }

    /// The first scrape at or after `at_ms`, for the start of a window.
    fn first_index_from(&self, at_ms: i64) -> Option<usize> {
        let i = self.snapshots.partition_point(|s| s.at_ms < at_ms);
        (i < self.snapshots.len()).then_some(i)
    }

    /// Both versions' readings of one metric, as the shell would build them from Prometheus.
    /// `w` is the analysis's window (ending now) and counts since its rollout began; `series`
    /// asks for per-scrape values.
    pub fn reading(
        &self,
        spec: &MetricSpec,
        w: &Window,
        slow_le: Option<f64>,
        series: bool,
    ) -> MetricReading {
        let now_ms = w.at.millis();
        let now = self.last_index(now_ms);
        let started = self
            .first_index_from(w.rollout_started.millis())
            .unwrap_or(now);
        let mut out = [Reading::NoData, Reading::NoData];
        for arm in [STABLE, CANARY] {
            let mut cum_base = started.min(now);
            if arm == CANARY && matches!(spec.kind, MetricKind::Latency { .. }) {
                if self.latency_missing(now_ms) {
                    continue;
                }
                // A series that was absent restarts where Prometheus first saw it again; before
                // the gap it was there as usual.
                let scraped_min = self.snapshots[now].at_ms as f64 / 60_000.0;
                let gap = self.sc.lat_missing_c;
                if let Some((_, to)) = gap.filter(|(from, _)| scraped_min >= *from) {
                    let back = (to * 60_000.0) as i64;
                    if back > 0 {
                        match self.first_index_from(back) {
                            Some(i) if i <= now => cum_base = cum_base.max(i),
                            _ => continue,
                        }
                    }
                }
            }
            let win_base = self
                .first_index_from(w.since.millis())
                .unwrap_or(now)
                .clamp(cum_base, now);
            let cur = &self.snapshots[now].arms[arm];
            let cum = cur.minus(&self.snapshots[cum_base].arms[arm]);
            let win = cur.minus(&self.snapshots[win_base].arms[arm]);
            let per_scrape = |f: &dyn Fn(&Counters) -> Option<f64>| -> Vec<f64> {
                if !series {
                    return Vec::new();
                }
                (win_base + 1..=now)
                    .filter_map(|i| {
                        f(&self.snapshots[i].arms[arm].minus(&self.snapshots[i - 1].arms[arm]))
                    })
                    .collect()
            };
            let sample = match &spec.kind {
                MetricKind::ErrorRate => {
                    if cum.requests <= 0.0 {
                        continue;
                    }
                    Sample {
                        value: (win.requests > 0.0).then(|| win.errors / win.requests),
                        window_events: win.requests,
                        cumulative: Some(Counts {
                            bad: cum.errors,
                            total: cum.requests,
                        }),
                        series: per_scrape(&|c| (c.requests > 0.0).then(|| c.errors / c.requests)),
                        ..Sample::default()
                    }
                }
                MetricKind::Latency { quantile } => {
                    let total = cum.hist_total();
                    if total <= 0.0 {
                        continue;
                    }
                    let buckets = cum.cumulative_buckets();
                    let slow = slow_le.map(|le| {
                        let at = buckets
                            .iter()
                            .find(|b| b.le == le)
                            .map_or(total, |b| b.count);
                        total - at
                    });
                    Sample {
                        value: histogram_quantile(*quantile, &win.hist),
                        window_events: win.hist_total(),
                        cumulative: slow.map(|bad| Counts { bad, total }),
                        slow_le,
                        buckets,
                        series: per_scrape(&|c| histogram_quantile(*quantile, &c.hist)),
                    }
                }
                MetricKind::Accuracy => {
                    let scored = cum.correct + cum.incorrect;
                    if scored <= 0.0 {
                        continue;
                    }
                    let w = win.correct + win.incorrect;
                    Sample {
                        value: (w > 0.0).then(|| win.correct / w),
                        window_events: w,
                        cumulative: Some(Counts {
                            bad: cum.incorrect,
                            total: scored,
                        }),
                        series: per_scrape(&|c| {
                            let n = c.correct + c.incorrect;
                            (n > 0.0).then(|| c.correct / n)
                        }),
                        ..Sample::default()
                    }
                }
                MetricKind::Query { .. } => continue,
            };
            out[arm] = Reading::Data(sample);
        }
        let [stable, canary] = out;
        MetricReading { stable, canary }
    }
}

/// The slow-request boundary the shell derives from a latency metric's bound: the smallest
/// bucket boundary at or above the absolute bound, or above stable's quantile stretched by
/// the tolerance (stable's quantile as known from its history before the rollout).
pub fn slow_boundary(policy: &Policy, spec: &MetricSpec, sc: &Scenario) -> Option<f64> {
    let MetricKind::Latency { quantile } = spec.kind else {
        return None;
    };
    let _ = policy;
    let target = if let Some(max) = &spec.bounds.max {
        max.value
    } else {
        let stable_q = (sc.lat_mu + sc.lat_sigma * normal_quantile(quantile)).exp();
        match &spec.bounds.max_increase {
            Some(t) => t.upper(stable_q),
            None => stable_q,
        }
    };
    BUCKETS
        .iter()
        .copied()
        .find(|le| le.is_finite() && *le >= target)
}

fn normal_quantile(p: f64) -> f64 {
    use statrs::distribution::{ContinuousCDF, Normal};
    Normal::new(0.0, 1.0).map_or(0.0, |n| n.inverse_cdf(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantile_interpolates_within_a_bucket() {
        let mut h = [0.0; 12];
        h[4] = 50.0; // (0.05, 0.1]
        h[5] = 50.0; // (0.1, 0.25]
        let q = histogram_quantile(0.75, &h).expect("data");
        assert!((q - 0.175).abs() < 1e-12);
        assert_eq!(histogram_quantile(0.5, &[0.0; 12]), None);
    }

    #[test]
    fn a_latency_series_is_there_before_its_gap_and_restarts_after_it() {
        use crate::observation::Reading;
        use rand::SeedableRng;
        let sc = super::super::scenario::parse(
            "t",
            r#"{"a": {"expected": "rollback", "lat_missing_c": [5, 10]}}"#,
        )
        .expect("valid")
        .remove(0);
        let policy = crate::policy::load_str("bench.yaml", super::super::DEFAULT_POLICY)
            .expect("valid policy");
        let spec = policy
            .metrics
            .iter()
            .find(|m| matches!(m.kind, MetricKind::Latency { .. }))
            .expect("a latency metric")
            .clone();
        let mut world = World::new(&sc);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for i in 0..48 {
            world.serve(&mut rng, i * SCRAPE_MS, (i + 1) * SCRAPE_MS, 0.05);
            world.scrape((i + 1) * SCRAPE_MS);
        }
        let canary_events = |minute: i64| match world
            .reading(
                &spec,
                &Window::lookback(
                    crate::time::Time(minute * 60_000),
                    std::time::Duration::from_secs(minute as u64 * 60),
                ),
                None,
                false,
            )
            .canary
        {
            Reading::Data(s) => Some(s.window_events),
            _ => None,
        };
        let before = canary_events(4).expect("there before the gap");
        assert!(before > 0.0);
        assert_eq!(canary_events(7), None, "absent during the gap");
        let after = canary_events(12).expect("back after the gap");
        // Counted from where it came back (minute 10): two minutes, not twelve.
        assert!(after < before, "{after} vs {before}");
    }

    #[test]
    fn bucket_probabilities_sum_to_one() {
        let sc = super::super::scenario::parse(
            "t",
            r#"{"a": {"expected": "promote", "tail_frac_c": 0.02}}"#,
        )
        .expect("valid")
        .remove(0);
        for canary in [false, true] {
            let s: f64 = bucket_probs(&sc, canary).iter().sum();
            assert!((s - 1.0).abs() < 1e-12);
        }
        // Median 0.1 s: half the mass is at most 0.1 s.
        let p = bucket_probs(&sc, false);
        let below: f64 = p[..5].iter().sum();
        assert!((below - 0.5).abs() < 1e-9);
    }
}
