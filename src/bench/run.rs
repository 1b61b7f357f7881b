//! One repetition of one scenario with one judge: the real `decide` in virtual time.

use super::scenario::Scenario;
use super::world::{SCRAPE_MS, World, slow_boundary};
use crate::observation::{Gate, Input, Observation, Reading, RouterStatus, Window};
use crate::policy::{Method, MetricKind, Policy};
use crate::rollout::{Action, Phase, RolloutState, analysis_window, decide};
use crate::time::Time;
use rand::Rng;
use std::collections::BTreeMap;

/// How a repetition ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Promoted,
    RolledBack,
    /// Neither before the horizon (the progress deadline and the watch, plus slack).
    Undecided,
}

/// What one repetition measured.
#[derive(Clone, Copy, Debug)]
pub struct RepResult {
    pub outcome: Outcome,
    /// Minutes from the onset (or the start) to the decisive promote or rollback action.
    pub minutes: f64,
    /// Canary requests served from the onset (or the start) to that action.
    pub canary_requests: f64,
    /// A promotion was decided while a metric had no data for the canary.
    pub stale_promotion: bool,
}

/// The policy a scenario runs with: the judge's method; metrics the scenario cannot feed
/// (accuracy without labels) left out, as a user would for a model without them; promotion
/// without an operator or a gate, which the benchmark cannot simulate.
pub fn policy_for(base: &Policy, sc: &Scenario, method: Method) -> Policy {
    let mut p = base.clone();
    p.analysis.method = method;
    p.metrics
        .retain(|m| !matches!(m.kind, MetricKind::Accuracy) || sc.accuracy.is_some());
    p.strategy.manual_promotion = false;
    p.webhooks.clear();
    p
}

/// The canary's real share of traffic for a configured weight (percent).
pub fn realized_share(sc: &Scenario, weight: f64) -> f64 {
    let w = (weight / 100.0).clamp(0.0, 1.0);
    if w >= 1.0 {
        return 1.0;
    }
    match sc.realized_share {
        Some(r) if sc.share > 0.0 => (w * r / sc.share).clamp(0.0, 1.0),
        _ => w,
    }
}

/// Runs one repetition.
pub fn run_rep(policy: &Policy, sc: &Scenario, rng: &mut rand::rngs::SmallRng) -> RepResult {
    let mut world = World::new(sc);
    let interval_ms = i64::try_from(policy.strategy.interval.as_millis())
        .unwrap_or(i64::MAX)
        .max(1000);
    let horizon_ms = i64::try_from(
        (policy.strategy.progress_deadline + policy.strategy.post_promotion_watch).as_millis(),
    )
    .unwrap_or(i64::MAX / 2)
    .saturating_add(10 * 60_000);
    let onset_ms = (sc.onset() * 60_000.0) as i64;
    let series = policy.analysis.method == Method::MannWhitney;
    let slow: BTreeMap<String, Option<f64>> = policy
        .metrics
        .iter()
        .map(|m| (m.name.clone(), slow_boundary(policy, m, sc)))
        .collect();
    // The evaluation clock is not aligned with the scrapes: a random phase per repetition.
    let mut next_eval: i64 = (rng.random::<f64>() * SCRAPE_MS as f64) as i64;
    let mut next_scrape = SCRAPE_MS;
    let mut now: i64 = 0;
    let mut state = RolloutState::new(policy);
    let mut served = 0.0;
    let mut promoted: Option<(f64, f64)> = None;
    let mut stale_any = false;
    let result = |outcome, at_ms: i64, served: f64, stale| RepResult {
        outcome,
        minutes: (at_ms - onset_ms).max(0) as f64 / 60_000.0,
        canary_requests: served,
        stale_promotion: stale,
    };
    loop {
        let next = next_eval.min(next_scrape);
        let share = realized_share(sc, state.weight);
        let got = world.serve(rng, now, next, share);
        if next > onset_ms {
            // Requests of a chunk that straddles the onset count for the part after it.
            let frac = if now >= onset_ms {
                1.0
            } else {
                (next - onset_ms) as f64 / (next - now) as f64
            };
            served += got * frac;
        }
        now = next;
        if now == next_scrape {
            world.scrape(now);
            next_scrape += SCRAPE_MS;
        }
        if now == next_eval {
            next_eval += interval_ms;
            // The daemon's windows (`analysis_window`), as its queries stretch them
            // (`Ranges`): never shorter than the shortest range (`DEFAULT_MIN_RANGE`) unless
            // the rollout began less than that ago, so a step's first looks see the last minute
            // rather than nothing.
            let shortest = crate::source::DEFAULT_MIN_RANGE.as_millis() as i64;
            let window = |capped| {
                let w = analysis_window(&state, policy, Time(now), capped);
                let since = w.since.millis().min(now - shortest);
                Window {
                    since: Time(since.max(w.rollout_started.millis())),
                    ..w
                }
            };
            let (step, whole_step) = (window(true), window(false));
            let metrics = policy
                .metrics
                .iter()
                .map(|m| {
                    let le = slow.get(&m.name).copied().flatten();
                    let mut r = world.reading(m, &step, le, series);
                    // A metric with too few canary events in a step's worth reads the whole
                    // step, as the daemon widens it.
                    if whole_step.since < step.since && r.canary_thin(m.min_samples) {
                        r = world.reading(m, &whole_step, le, series);
                    }
                    (m.name.clone(), r)
                })
                .collect();
            let obs = Observation {
                metrics,
                router: RouterStatus::Ok {
                    canary_weight: state.weight,
                },
                gate: Gate::Open,
            };
            let input = Input::Tick(obs);
            let d = decide(policy, &state, &input, Time(now));
            if d.action == Action::Promote {
                // A promotion while any metric has no data for the canary is unsafe whatever
                // happens after it.
                let Input::Tick(obs) = &input else {
                    unreachable!("built as a tick above")
                };
                let stale = obs.metrics.values().any(|r| canary_missing(&r.canary));
                stale_any |= stale;
                promoted = Some(((now - onset_ms).max(0) as f64 / 60_000.0, served));
            }
            state = d.state;
            match state.phase {
                Phase::Promoted => {
                    let (min, req) = promoted.unwrap_or((0.0, served));
                    let mut r = result(Outcome::Promoted, now, req, stale_any);
                    r.minutes = min;
                    return r;
                }
                Phase::RollingBack | Phase::RolledBack => {
                    return result(Outcome::RolledBack, now, served, stale_any);
                }
                Phase::Failed => return result(Outcome::Undecided, now, served, stale_any),
                _ => {}
            }
        }
        if now >= horizon_ms {
            return result(Outcome::Undecided, now, served, stale_any);
        }
    }
}

/// Whether a reading has no data for the canary.
pub fn canary_missing(r: &Reading) -> bool {
    !matches!(r, Reading::Data(_))
}
