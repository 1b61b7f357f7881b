//! The time ranges an analysis reads: the shell queries Prometheus over them, and the
//! benchmark's simulated Prometheus answers over the same ones.

use super::state::{Phase, RolloutState};
use crate::observation::Window;
use crate::policy::Policy;
use crate::time::Time;
use std::time::Duration;

/// The window an analysis at `now` covers:
/// - the current step, or while the step's clock is stopped (a router that did not take the
///   weight) the last minute or interval;
/// - with `capped`, no more than the last `min_step_duration` (a step's worth): a long bake,
///   watch or hold would otherwise average a late regression away (the shell widens it again
///   for a metric with too few events in it);
/// - and never back before the rollout (this attempt) began, whose data a previous attempt's
///   would pollute.
///
/// Counts since the rollout began start at its start; a blue-green rollout's start up to
/// [`BLUE_GREEN_BASELINE`] earlier, so that stable's events from before the switch are in them
/// (after the switch it has none, and its rate from before is what the new version is judged
/// against), but never before the canary's traffic last went to zero.
const BLUE_GREEN_BASELINE: Duration = Duration::from_secs(600);

pub fn analysis_window(state: &RolloutState, policy: &Policy, now: Time, capped: bool) -> Window {
    let minute_or_interval = policy.strategy.interval.max(Duration::from_secs(60));
    let ago = |d: Duration| Time(now.0.saturating_sub(d.as_millis() as i64));
    let recent = ago(minute_or_interval);
    let step_span = policy
        .strategy
        .min_step_duration
        .max(policy.strategy.interval);
    let cap = if capped { ago(step_span) } else { Time(0) };
    // The canary has had no traffic since its weight last went to zero before this attempt
    // (a rollback): anything earlier is an earlier attempt's.
    let quiet_since = |before: Time| {
        state
            .weight_history
            .iter()
            .rev()
            .find(|c| c.at <= before && c.weight <= 0.0)
            .map(|c| c.at)
    };
    let running = state.phase != Phase::Idle;
    let started = state.started_at.filter(|_| running);
    let rollout_started = match started {
        Some(t) if policy.strategy.is_blue_green() => {
            let before = Time(t.0.saturating_sub(BLUE_GREEN_BASELINE.as_millis() as i64));
            quiet_since(t).map_or(before, |q| before.max(q))
        }
        Some(t) => t,
        // Not started (or started over after a retry): the last minute, since the last time
        // the canary's traffic went to zero.
        None => quiet_since(now).map_or(recent, |q| recent.max(q)),
    };
    Window {
        at: now,
        since: state
            .step_started_at
            .filter(|_| running)
            .unwrap_or(recent)
            .max(cap)
            .max(started.unwrap_or(rollout_started)),
        rollout_started,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::WeightChange;

    #[test]
    fn an_analysis_never_looks_back_before_its_rollout_began() {
        let load = |strategy: &str| {
            crate::policy::load_str(
                "p.yaml",
                &format!("name: p\nstable: v1\ncanary: v2\nstrategy: {strategy}\nmetrics: [{{name: e, builtin: error_rate, max: 1%}}]\nrouter: {{file: {{path: /tmp/p.json}}}}\n"),
            )
            .unwrap_or_else(|e| panic!("{e}"))
        };
        let p = load("{steps: [10, 50], interval: 30s, min_step_duration: 5m}");
        let mut s = RolloutState::new(&p);
        let at = |secs: i64| Time(1_000_000_000 + secs * 1000);
        let window = |s: &RolloutState, p: &Policy, now: i64| {
            let w = analysis_window(s, p, at(now), true);
            (w.since, w.rollout_started)
        };
        // Not started: the last minute.
        assert_eq!(window(&s, &p, 100), (at(40), at(40)));
        // A retry 10 s ago whose step clock stopped (the router was found at another split):
        // the last minute would reach into the previous attempt.
        s.phase = Phase::Progressing;
        s.started_at = Some(at(90));
        s.step_started_at = None;
        assert_eq!(window(&s, &p, 100), (at(90), at(90)));
        // Long after the start, the stopped clock reads the last minute.
        assert_eq!(window(&s, &p, 1000), (at(940), at(90)));
        // A running step reads from its start, but no more than a step's worth (5m) back.
        s.step_started_at = Some(at(500));
        assert_eq!(window(&s, &p, 700), (at(500), at(90)));
        assert_eq!(window(&s, &p, 1000), (at(700), at(90)));
        // Uncapped (for a metric too thin in a step's worth), it reaches back to the step's
        // start, and still not before the rollout's.
        assert_eq!(analysis_window(&s, &p, at(1000), false).since, at(500));
        s.step_started_at = Some(at(50));
        assert_eq!(analysis_window(&s, &p, at(1000), false).since, at(90));
        s.step_started_at = Some(at(500));

        // Blue-green: counts start ten minutes before the switch (stable's traffic from
        // before it), but not before the canary's last rollback; a long bake reads its last step's
        // worth (min_step_duration, 1m by default).
        let bg = load("{kind: blue-green, bake: 20m, interval: 30s}");
        let mut s = RolloutState::new(&bg);
        s.phase = Phase::Progressing;
        s.started_at = Some(at(1000));
        s.step_started_at = Some(at(1000));
        assert_eq!(window(&s, &bg, 1030), (at(1000), at(400)));
        assert_eq!(window(&s, &bg, 2000), (at(1940), at(400)));
        s.weight_history = vec![
            WeightChange {
                at: at(900),
                weight: 100.0,
            },
            WeightChange {
                at: at(980),
                weight: 0.0,
            },
            WeightChange {
                at: at(1000),
                weight: 100.0,
            },
        ];
        assert_eq!(window(&s, &bg, 1030), (at(1000), at(980)));
        // Back to idle after that rollback (a blue-green retry): its pre-check reads nothing of
        // the canary's earlier attempt.
        s.phase = Phase::Idle;
        s.weight_history.pop();
        assert_eq!(window(&s, &bg, 1010), (at(980), at(980)));
    }
}
