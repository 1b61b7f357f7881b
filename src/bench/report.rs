//! The benchmark's figures per scenario and judge, the oracle bound and the pipeline floor.

use super::run::{Outcome, RepResult, realized_share};
use super::scenario::{Expected, Scenario};
use super::world::{SCRAPE_MS, bucket_probs};
use crate::judge::sequential::{bernoulli_kl, wald_bound};
use crate::policy::{MetricKind, Policy};
use serde::Serialize;
use statrs::distribution::{Beta, ContinuousCDF};

/// The figures of one scenario and judge; the JSON keys are the README's.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub judge: String,
    pub expected: String,
    pub reps: u32,
    pub rollback_rate: f64,
    pub promote_rate: f64,
    pub undecided_rate: f64,
    pub rollback_rate_ci95_high: f64,
    pub canary_requests_to_rollback_mean: Option<f64>,
    pub canary_requests_to_rollback_p95: Option<f64>,
    pub minutes_to_rollback_median: Option<f64>,
    pub minutes_to_promote_median: Option<f64>,
    pub canary_requests_to_promote_mean: Option<f64>,
    pub stale_promotions: u32,
    /// Wald's bound; `None` (null) without a finite, positive divergence to bound by.
    pub oracle_bound: Option<f64>,
    /// The oracle bound when the oracle, too, sees data only once Prometheus has it (missing
    /// series, late labels); not one of the README's figures.
    pub oracle_bound_delayed: Option<f64>,
    pub pipeline_floor: f64,
    /// Oracle bound over mean canary requests to the right decision, not capped: above 1 the
    /// judge served fewer requests than Wald's bound allows a test with its error rates, which
    /// only luck, also rolling back good canaries, or the progress deadline can do.
    pub efficiency: Option<f64>,
    /// (oracle bound + pipeline floor) over mean canary requests to roll back.
    pub efficiency_with_floor: Option<f64>,
    /// (delayed oracle bound + pipeline floor) over mean canary requests to roll back.
    pub efficiency_delayed: Option<f64>,
}

/// The two-sided 95 % Clopper–Pearson upper bound of a rate of `k` in `n`.
pub fn clopper_pearson_high(k: u32, n: u32) -> f64 {
    if n == 0 || k >= n {
        return 1.0;
    }
    match Beta::new(f64::from(k) + 1.0, f64::from(n - k)) {
        Ok(b) => b.inverse_cdf(0.975),
        Err(_) => 1.0,
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The `q` quantile by the nearest-rank rule.
fn quantile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

/// KL divergence per canary request between the canary's and stable's observable data
/// (`canary_first`: KL(canary ‖ stable), else the reverse), for the metrics the policy has.
pub fn kl_per_request(policy: &Policy, sc: &Scenario, canary_first: bool) -> f64 {
    policy
        .metrics
        .iter()
        .map(|m| metric_kl(&m.kind, sc, canary_first))
        .sum()
}

/// One metric's share of [`kl_per_request`].
fn metric_kl(kind: &MetricKind, sc: &Scenario, canary_first: bool) -> f64 {
    let pair = |a: f64, b: f64| {
        if canary_first {
            bernoulli_kl(a, b)
        } else {
            bernoulli_kl(b, a)
        }
    };
    match kind {
        MetricKind::ErrorRate => {
            let p_c = sc
                .p_c_late
                .filter(|_| sc.onset_min.is_some())
                .unwrap_or(sc.p_c);
            pair(p_c, sc.p_s)
        }
        MetricKind::Latency { .. } => {
            let (c, s) = (bucket_probs(sc, true), bucket_probs(sc, false));
            let (a, b) = if canary_first { (c, s) } else { (s, c) };
            a.iter()
                .zip(b.iter())
                .filter(|(x, _)| **x > 0.0)
                .map(|(x, y)| x * (x / y.max(1e-300)).ln())
                .sum()
        }
        // Without labels nothing is learnt, even where a label would be decisive.
        MetricKind::Accuracy => sc
            .accuracy
            .filter(|acc| acc.coverage > 0.0)
            .map_or(0.0, |acc| acc.coverage * pair(acc.q_c, acc.q_s)),
        MetricKind::Query { .. } => 0.0,
    }
}

/// Wald's bound on canary requests to the right decision, for α = β = 1 − confidence. `None`
/// when the versions do not differ in what the policy measures, and when they differ
/// infinitely (a rate of 0 against one above 0: one bad event decides, so there is no bound
/// in requests to compare with).
pub fn oracle_bound(policy: &Policy, sc: &Scenario) -> Option<f64> {
    let a = 1.0 - policy.analysis.confidence;
    let kl = kl_per_request(policy, sc, sc.expected == Expected::Rollback);
    (kl.is_finite() && kl > 1e-12).then(|| wald_bound(a, a, kl))
}

/// Wald's bound for an oracle that, like any judge, can use data only once Prometheus has it:
/// the canary requests served, at the weight in force when the canary turns bad, until the data
/// that could have been seen carries `d(1 − β ‖ α)` nats. Latency served while the canary's
/// series is missing is never seen (the series restarts from zero), and a prediction counts
/// only once its label has arrived (exponential delay, `coverage` of them at all). Without
/// missing series or labels it equals [`oracle_bound`]. Only for bad canaries.
pub fn delayed_oracle_bound(policy: &Policy, sc: &Scenario) -> Option<f64> {
    if sc.expected != Expected::Rollback {
        return None;
    }
    let a = 1.0 - policy.analysis.confidence;
    let need = bernoulli_kl(1.0 - a, a);
    let rate = canary_rpm_at_onset(policy, sc);
    // Per canary request, by when the data shows: at once, once the latency series is back,
    // once the label has arrived.
    let (mut kl_err, mut kl_lat, mut kl_acc) = (0.0, 0.0, 0.0);
    for m in &policy.metrics {
        let kl = metric_kl(&m.kind, sc, true);
        match m.kind {
            MetricKind::Latency { .. } => kl_lat += kl,
            MetricKind::Accuracy => kl_acc += kl,
            _ => kl_err += kl,
        }
    }
    let kl = kl_err + kl_lat + kl_acc;
    if rate <= 0.0 || !kl.is_finite() || kl <= 1e-12 {
        return None;
    }
    let onset = sc.onset();
    // Minutes of data since the onset that a judge can have seen by minute `t` after it.
    let seen_latency = |t: f64| match sc.lat_missing_c {
        Some((from, to)) => t - ((onset + t).min(to) - onset.max(from)).max(0.0),
        None => t,
    };
    let labelled = |t: f64| match sc.accuracy {
        Some(acc) if acc.delay_mean_min > 0.0 => {
            let d = acc.delay_mean_min;
            t - d * (1.0 - (-t / d).exp())
        }
        _ => t,
    };
    let info = |t: f64| rate * (kl_err * t + kl_lat * seen_latency(t) + kl_acc * labelled(t));
    let mut high = 1.0;
    while info(high) < need {
        high *= 2.0;
        if high > 1e9 {
            return None;
        }
    }
    let mut low = 0.0;
    for _ in 0..100 {
        let mid = 0.5 * (low + high);
        if info(mid) < need {
            low = mid;
        } else {
            high = mid;
        }
    }
    Some(rate * high)
}

/// The canary's requests per minute at the weight the schedule gives when the canary turns bad.
fn canary_rpm_at_onset(policy: &Policy, sc: &Scenario) -> f64 {
    let steps = policy.strategy.steps();
    let step_min = policy.strategy.step_duration().as_secs_f64() / 60.0;
    let idx = if step_min > 0.0 {
        (sc.onset() / step_min).floor() as usize
    } else {
        0
    };
    let weight = steps.get(idx).copied().unwrap_or(100.0);
    sc.total_rpm * realized_share(sc, weight)
}

/// Canary requests served during one scrape interval plus one evaluation interval, at the
/// weight the schedule gives when the canary turns bad (the first step without an onset).
pub fn pipeline_floor(policy: &Policy, sc: &Scenario) -> f64 {
    let rpm = canary_rpm_at_onset(policy, sc);
    let delay_min = (SCRAPE_MS as f64 / 1000.0 + policy.strategy.interval.as_secs_f64()) / 60.0;
    rpm * delay_min
}

/// Summarises the repetitions of one scenario and judge.
pub fn summarise(policy: &Policy, sc: &Scenario, judge: &str, reps: &[RepResult]) -> Summary {
    let n = reps.len() as u32;
    let count = |o: Outcome| reps.iter().filter(|r| r.outcome == o).count() as u32;
    let (rb, pr, un) = (
        count(Outcome::RolledBack),
        count(Outcome::Promoted),
        count(Outcome::Undecided),
    );
    let rate = |k: u32| {
        if n == 0 {
            0.0
        } else {
            f64::from(k) / f64::from(n)
        }
    };
    let pick = |o: Outcome, f: fn(&RepResult) -> f64| -> Vec<f64> {
        reps.iter().filter(|r| r.outcome == o).map(f).collect()
    };
    let rb_req = pick(Outcome::RolledBack, |r| r.canary_requests);
    let rb_min = pick(Outcome::RolledBack, |r| r.minutes);
    let pr_req = pick(Outcome::Promoted, |r| r.canary_requests);
    let pr_min = pick(Outcome::Promoted, |r| r.minutes);
    let oracle = oracle_bound(policy, sc);
    let floor = pipeline_floor(policy, sc);
    let decided_mean = match sc.expected {
        Expected::Rollback => mean(&rb_req),
        Expected::Promote => mean(&pr_req),
    };
    let efficiency = match (oracle, decided_mean) {
        (Some(o), Some(m)) if m > 0.0 => Some(o / m),
        _ => None,
    };
    let with_floor = |bound: Option<f64>| match (sc.expected, bound, mean(&rb_req)) {
        (Expected::Rollback, Some(o), Some(m)) if m > 0.0 => Some((o + floor) / m),
        _ => None,
    };
    let delayed = delayed_oracle_bound(policy, sc);
    Summary {
        scenario: sc.name.clone(),
        judge: judge.to_owned(),
        expected: sc.expected.as_str().to_owned(),
        reps: n,
        rollback_rate: rate(rb),
        promote_rate: rate(pr),
        undecided_rate: rate(un),
        rollback_rate_ci95_high: clopper_pearson_high(rb, n),
        canary_requests_to_rollback_mean: mean(&rb_req),
        canary_requests_to_rollback_p95: quantile(&rb_req, 0.95),
        minutes_to_rollback_median: quantile(&rb_min, 0.5),
        minutes_to_promote_median: quantile(&pr_min, 0.5),
        canary_requests_to_promote_mean: mean(&pr_req),
        stale_promotions: reps.iter().filter(|r| r.stale_promotion).count() as u32,
        oracle_bound: oracle,
        oracle_bound_delayed: delayed,
        pipeline_floor: floor,
        efficiency,
        efficiency_with_floor: with_floor(oracle),
        efficiency_delayed: with_floor(delayed),
    }
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// The human-readable table.
pub fn table(rows: &[Summary]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<28} {:<13} {:<8} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9} {:>7} {:>7} {:>9} {:>5} {:>8} {:>8} {:>8} {:>6}\n",
        "scenario", "judge", "expected", "rollbk", "ci95hi", "promote", "undec", "req_rb", "req_rb95", "min_rb", "min_pr", "req_pr", "stale", "oracle", "delayed", "floor", "eta"
    ));
    for r in rows {
        out.push_str(&format!(
            "{:<28} {:<13} {:<8} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9} {:>7} {:>7} {:>9} {:>5} {:>8} {:>8} {:>8} {:>6}\n",
            r.scenario,
            r.judge,
            r.expected,
            pct(r.rollback_rate),
            pct(r.rollback_rate_ci95_high),
            pct(r.promote_rate),
            pct(r.undecided_rate),
            cell(r.canary_requests_to_rollback_mean, 0),
            cell(r.canary_requests_to_rollback_p95, 0),
            cell(r.minutes_to_rollback_median, 2),
            cell(r.minutes_to_promote_median, 2),
            cell(r.canary_requests_to_promote_mean, 0),
            r.stale_promotions,
            cell(r.oracle_bound, 0),
            cell(r.oracle_bound_delayed, 0),
            format!("{:.0}", r.pipeline_floor),
            cell(r.efficiency, 3),
        ));
    }
    out.push_str(LEGEND);
    out
}

/// What the table's columns mean, printed under it.
const LEGEND: &str = "
rollbk / promote / undec: share of repetitions rolled back / promoted / undecided at the end
ci95hi: Clopper-Pearson 95 % upper bound of the rollback share
req_rb, req_rb95: canary requests served before the rollback (mean, 95th percentile)
min_rb, min_pr: median minutes to the rollback / promotion decision
req_pr: mean canary requests to promotion; stale: promotions while a metric had no canary data
oracle: Wald's bound on requests for the right decision (alpha = beta = 1 - confidence)
delayed: the same for an oracle that also waits for missing series and late labels
floor: canary requests per scrape and analysis interval; eta: oracle / requests (not capped:
  above 1, fewer requests than Wald's bound: luck, good canaries rolled back too, or the deadline)
oracle, delayed, eta: - where the versions do not differ in what the policy measures, or differ
  infinitely (a rate of 0 against one above 0)
";

/// The goals of the benchmark for one judge, checked on its rows.
/// The repetitions the issue's goals are stated for; with fewer, a false-rollback rate within
/// its budget whose interval is still too wide to show it is not a failure.
pub const GOAL_REPS: u32 = 1000;

/// The goals for `judge`: pass (`Some(true)`), fail (`Some(false)`), or, with fewer than
/// `GOAL_REPS` repetitions, too few to tell (`None`).
pub fn goals(rows: &[Summary], judge: &str, baseline: Option<&str>) -> Vec<(String, Option<bool>)> {
    let mine: Vec<&Summary> = rows.iter().filter(|r| r.judge == judge).collect();
    let mut out = Vec::new();
    for r in &mine {
        if r.expected == "promote" {
            out.push((
                format!(
                    "{}: false rollbacks {} (CI95 high {}) <= 5% / 6.5%",
                    r.scenario,
                    pct(r.rollback_rate),
                    pct(r.rollback_rate_ci95_high)
                ),
                match (r.rollback_rate <= 0.05, r.rollback_rate_ci95_high <= 0.065) {
                    (true, true) => Some(true),
                    (true, false) if r.reps < GOAL_REPS => None,
                    _ => Some(false),
                },
            ));
        } else {
            out.push((
                format!("{}: misses {} <= 5%", r.scenario, pct(r.promote_rate)),
                Some(r.promote_rate <= 0.05),
            ));
        }
    }
    let stale: u32 = mine.iter().map(|r| r.stale_promotions).sum();
    out.push((format!("stale promotions {stale} == 0"), Some(stale == 0)));
    // Not capped: (oracle + floor) / mean requests as the issue defines it. Scenarios without
    // an oracle bound (no finite, positive divergence) are left out; one with a bound whose bad
    // canary was never rolled back has no figure and fails the goal.
    let effs: Vec<f64> = mine
        .iter()
        .filter_map(|r| r.efficiency_with_floor)
        .collect();
    let bad = mine.iter().filter(|r| r.expected == "rollback").count();
    let bounded = mine
        .iter()
        .filter(|r| r.expected == "rollback" && r.oracle_bound.is_some())
        .count();
    if !effs.is_empty() {
        let g = (effs.iter().map(|e| e.ln()).sum::<f64>() / effs.len() as f64).exp();
        let left_out = match bad - bounded {
            0 => String::new(),
            n => format!(" ({n} without a finite oracle bound left out)"),
        };
        out.push((
            format!(
                "geometric mean of (oracle + floor) / requests over {} of {bad} rollback scenarios{left_out}: {g:.3} >= 0.5",
                effs.len()
            ),
            Some(g >= 0.5 && effs.len() == bounded),
        ));
    }
    if let Some(base) = baseline {
        for r in mine.iter().filter(|r| r.expected == "rollback") {
            let other = rows
                .iter()
                .find(|o| o.judge == base && o.scenario == r.scenario);
            let ok = match (other, r.canary_requests_to_rollback_mean) {
                (Some(o), Some(m)) => {
                    o.promote_rate > 0.05
                        || o.canary_requests_to_rollback_mean
                            .is_none_or(|b| m <= b / 3.0)
                }
                (None, _) => continue,
                (Some(_), None) => false,
            };
            let shown = other.and_then(|o| o.canary_requests_to_rollback_mean);
            out.push((
                format!(
                    "{}: requests {} <= 1/3 of {base}'s {} (or {base} misses)",
                    r.scenario,
                    cell(r.canary_requests_to_rollback_mean, 0),
                    cell(shown, 0)
                ),
                Some(ok),
            ));
        }
    }
    out
}

/// Figures for one judge that are not goals: the efficiency against the delayed oracle, which
/// also charges the oracle for data no judge can see yet.
pub fn notes(rows: &[Summary], judge: &str) -> Vec<String> {
    let effs: Vec<f64> = rows
        .iter()
        .filter(|r| r.judge == judge)
        .filter_map(|r| r.efficiency_delayed)
        .collect();
    if effs.is_empty() {
        return Vec::new();
    }
    let g = (effs.iter().map(|e| e.ln()).sum::<f64>() / effs.len() as f64).exp();
    vec![format!(
        "geometric mean of (delayed oracle + floor) / requests over {} rollback scenarios: {g:.3} \
         (the oracle too waits for missing series and late labels; not the README's figure)",
        effs.len()
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clopper_pearson_known_values() {
        // 50 of 1000: the exact upper bound is 0.06539.
        assert!((clopper_pearson_high(50, 1000) - 0.06539).abs() < 5e-5);
        assert!((clopper_pearson_high(0, 1000) - 0.003682).abs() < 5e-6);
        assert_eq!(clopper_pearson_high(3, 3), 1.0);
    }

    fn bench_policy(sc: &Scenario) -> Policy {
        let base = crate::policy::load_str("bench.yaml", super::super::DEFAULT_POLICY)
            .expect("the built-in policy is valid");
        super::super::run::policy_for(&base, sc, crate::policy::Method::Sequential)
    }

    fn scenario(fields: &str) -> Scenario {
        let text = format!(r#"{{"s": {{"expected": "rollback", {fields}}}}}"#);
        let mut v = super::super::scenario::parse("t.json", &text).expect("valid scenario");
        v.remove(0)
    }

    #[test]
    fn without_delays_the_delayed_oracle_is_walds_bound() {
        let sc = scenario(r#""p_s": 0.01, "p_c": 0.02"#);
        let p = bench_policy(&sc);
        let (plain, delayed) = (oracle_bound(&p, &sc), delayed_oracle_bound(&p, &sc));
        let (plain, delayed) = (plain.expect("bad canary"), delayed.expect("bad canary"));
        assert!(
            (plain - delayed).abs() < 1e-6 * plain,
            "{plain} vs {delayed}"
        );
        // 677 requests for 1 % against 2 %, as the README says.
        assert!((plain - 677.0).abs() < 1.0, "{plain}");
    }

    #[test]
    fn a_missing_series_costs_the_oracle_its_blind_minutes() {
        let sc = scenario(r#""lat_shift_c": 0.22314355131420976, "lat_missing_c": [0, 10]"#);
        let p = bench_policy(&sc);
        let plain = oracle_bound(&p, &sc).expect("bad canary");
        let delayed = delayed_oracle_bound(&p, &sc).expect("bad canary");
        // The first step is 1 % of 20,000 requests a minute: ten blind minutes are 2,000
        // requests, after which the oracle needs what it needs without delay.
        assert!(
            (delayed - (2000.0 + plain)).abs() < 1e-6 * delayed,
            "{delayed}"
        );
    }

    #[test]
    fn late_labels_cost_the_oracle_the_wait_for_them() {
        let sc = scenario(
            r#""accuracy": {"coverage": 0.5, "delay_mean_min": 20, "q_s": 0.08, "q_c": 0.12}"#,
        );
        let p = bench_policy(&sc);
        let plain = oracle_bound(&p, &sc).expect("bad canary");
        let delayed = delayed_oracle_bound(&p, &sc).expect("bad canary");
        // At 200 canary requests a minute, labels for `plain` requests' worth of predictions
        // have arrived by minute t when t − 20·(1 − e^(−t/20)) = plain / 200.
        let t = delayed / 200.0;
        let arrived = t - 20.0 * (1.0 - (-t / 20.0_f64).exp());
        assert!(
            (arrived * 200.0 - plain).abs() < 1e-6 * plain,
            "{t} {arrived}"
        );
        assert!(delayed > 4.0 * plain, "{delayed} vs {plain}");
        // A good canary has no rollback to bound.
        let mut good = scenario(r#""p_c": 0.01"#);
        good.expected = Expected::Promote;
        assert_eq!(delayed_oracle_bound(&bench_policy(&good), &good), None);
    }

    fn reps(outcome: Outcome, requests: &[f64]) -> Vec<RepResult> {
        requests
            .iter()
            .map(|&r| RepResult {
                outcome,
                minutes: 1.0,
                canary_requests: r,
                stale_promotion: false,
            })
            .collect()
    }

    #[test]
    fn eta_is_not_capped_at_one() {
        // A judge that rolls back after ~1 request (by luck, or at the deadline) beats Wald's
        // bound of 677 requests; eta says so rather than "perfect".
        let sc = scenario(r#""p_s": 0.01, "p_c": 0.02"#);
        let p = bench_policy(&sc);
        let s = summarise(
            &p,
            &sc,
            "sequential",
            &reps(Outcome::RolledBack, &[1.0, 3.0]),
        );
        let eta = s.efficiency.expect("a bound and a mean");
        let oracle = s.oracle_bound.expect("a bound");
        assert!((eta - oracle / 2.0).abs() < 1e-9, "{eta} vs {oracle}");
        assert!(eta > 300.0, "{eta}");
        assert!(table(&[s]).contains("above 1, fewer requests than Wald's bound"));
    }

    #[test]
    fn an_infinite_divergence_has_no_oracle_bound() {
        // Stable never fails: the first canary error decides, and Wald's bound is 0 / ∞.
        let sc = scenario(r#""p_s": 0.0, "p_c": 0.05"#);
        let p = bench_policy(&sc);
        assert!(kl_per_request(&p, &sc, true).is_infinite());
        assert_eq!(oracle_bound(&p, &sc), None);
        assert_eq!(delayed_oracle_bound(&p, &sc), None);
        let s = summarise(&p, &sc, "sequential", &reps(Outcome::RolledBack, &[40.0]));
        assert_eq!((s.efficiency, s.efficiency_with_floor), (None, None));
        let json = serde_json::to_value(&s).expect("serialisable");
        assert!(
            json["oracle_bound"].is_null() && json["efficiency"].is_null(),
            "{json}"
        );
        let line = table(&[s]).lines().nth(1).unwrap_or_default().to_owned();
        assert!(line.trim_end().ends_with('-'), "eta is shown as -: {line}");
        // The same for accuracy that stable never gets wrong.
        let sc = scenario(
            r#""accuracy": {"coverage": 0.5, "delay_mean_min": 0, "q_s": 0.0, "q_c": 0.1}"#,
        );
        assert_eq!(oracle_bound(&bench_policy(&sc), &sc), None);
        // Without labels nothing is learnt, and 0 × ∞ is no NaN.
        let sc = scenario(
            r#""p_c": 0.02, "accuracy": {"coverage": 0, "delay_mean_min": 0, "q_s": 0.0, "q_c": 0.1}"#,
        );
        let p = bench_policy(&sc);
        let (kl, err_only) = (kl_per_request(&p, &sc, true), bernoulli_kl(0.02, 0.01));
        assert!((kl - err_only).abs() < 1e-12, "{kl}");
        assert!(oracle_bound(&p, &sc).is_some());
    }

    #[test]
    fn the_efficiency_goal_leaves_out_scenarios_without_a_finite_bound() {
        let finite = scenario(r#""p_s": 0.01, "p_c": 0.05"#);
        let infinite = {
            let mut s = scenario(r#""p_s": 0.0, "p_c": 0.05"#);
            s.name = "t".into();
            s
        };
        let rows: Vec<Summary> = [&finite, &infinite]
            .iter()
            .map(|sc| {
                summarise(
                    &bench_policy(sc),
                    sc,
                    "sequential",
                    &reps(Outcome::RolledBack, &[10.0]),
                )
            })
            .collect();
        let goals = goals(&rows, "sequential", None);
        let (line, ok) = goals
            .iter()
            .find(|(what, _)| what.starts_with("geometric mean"))
            .expect("an efficiency goal");
        assert!(
            line.contains(
                "over 1 of 2 rollback scenarios (1 without a finite oracle bound left out)"
            ),
            "{line}"
        );
        // (64 + floor) / 10 requests: well above 0.5, and the left-out one does not fail it.
        assert_eq!(*ok, Some(true), "{line}");
        // A bad canary with a bound that is never rolled back still fails it.
        let mut never = finite.clone();
        never.name = "never_rolled_back".into();
        let missed = summarise(
            &bench_policy(&never),
            &never,
            "sequential",
            &reps(Outcome::Promoted, &[10.0]),
        );
        assert_eq!(goals_of(&[rows[0].clone(), missed]), Some(false));
    }

    fn goals_of(rows: &[Summary]) -> Option<bool> {
        goals(rows, "sequential", None)
            .into_iter()
            .find(|(what, _)| what.starts_with("geometric mean"))
            .and_then(|(_, ok)| ok)
    }

    #[test]
    fn nearest_rank_quantile() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.95), Some(95.0));
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
