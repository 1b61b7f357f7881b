//! `decide(policy, state, input, now) -> Decision`: every rule of a rollout in one place.

use super::state::{Activity, Phase, RolloutState};
use crate::judge::{self, JudgeContext, MetricReport, Verdict};
use crate::observation::{Gate, Input, MetricReading, Observation, OperatorAction, RouterStatus};
use crate::policy::{Method, MetricKind, MetricSpec, OnNoData, Policy};
use crate::time::Time;
use serde::{Deserialize, Serialize};

/// What the rollout does as a result of a decision. The router is told `Decision::weight`
/// after every decision, whatever the action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// A rollout begins at its first step.
    Start,
    /// To the next step's weight.
    Advance,
    /// Stay where it is.
    Hold,
    /// Wait for an operator.
    Wait,
    /// All traffic to the canary.
    Promote,
    /// The router confirmed a promotion or a rollback (after any watch): the rollout is done.
    Settle,
    /// All traffic back to stable.
    Rollback,
    /// The router could not be driven: leave traffic where it was last known to be safe.
    Fail,
    Pause,
    Resume,
    Retry,
    /// An operator action that does not apply in the current phase; nothing changes.
    Reject,
}

impl Action {
    pub const ALL: [Action; 12] = [
        Action::Start,
        Action::Advance,
        Action::Hold,
        Action::Wait,
        Action::Promote,
        Action::Settle,
        Action::Rollback,
        Action::Fail,
        Action::Pause,
        Action::Resume,
        Action::Retry,
        Action::Reject,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Advance => "advance",
            Action::Hold => "hold",
            Action::Wait => "wait",
            Action::Promote => "promote",
            Action::Settle => "settle",
            Action::Rollback => "rollback",
            Action::Fail => "fail",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Retry => "retry",
            Action::Reject => "reject",
        }
    }
}

/// The outcome of one call of [`decide`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub action: Action,
    /// The canary weight (percent) the router must have after this decision.
    pub weight: f64,
    /// The state after the decision.
    pub state: RolloutState,
    /// Per-metric verdicts of this analysis; empty for operator actions and final phases.
    pub reports: Vec<MetricReport>,
    /// One line for people.
    pub reason: String,
    /// For operator actions: who asked and why.
    pub who: Option<String>,
    pub why: Option<String>,
}

/// Decides what a rollout does next. Pure: no I/O, no clock, never fails.
pub fn decide(policy: &Policy, state: &RolloutState, input: &Input, now: Time) -> Decision {
    // A policy whose candidate changed starts over; the old rollout is forgotten here and
    // kept in the decision log.
    let ours = state.matches(policy);
    let state = if ours {
        state.clone()
    } else {
        RolloutState::new(policy)
    };
    match input {
        // The shell reads the router for the state's versions: after a change of candidate,
        // the weight it read is the old canary's.
        Input::Tick(obs) => tick(policy, state, obs, now, ours),
        Input::Operator { action, who, why } => {
            let mut d = operator(policy, state, *action, now);
            d.who = Some(who.clone());
            d.why = Some(why.clone());
            d
        }
        Input::Resumed { router_weight } => resumed(policy, state, *router_weight, now, ours),
    }
}

/// A rollout read back from the store as applied finds the router sending the canary less
/// than its last decision set: an action the store could not record (an abort while etcd was
/// down, taken by the router all the same) or a router reset. Nothing raises the canary's
/// traffic again on its own: a judging rollout pauses at the router's weight, for an operator
/// to resume (back to its step's weight) or abort. Otherwise nothing changes (a hold).
fn resumed(
    policy: &Policy,
    mut state: RolloutState,
    router_weight: f64,
    now: Time,
    ours: bool,
) -> Decision {
    let lower = ours && router_weight + 0.01 < state.weight;
    let judging = matches!(
        state.phase,
        Phase::Progressing | Phase::WaitingPromotion | Phase::Paused
    );
    if !lower || !judging || policy.strategy.is_blue_green() {
        let reason = state.message.clone();
        return decision(Action::Hold, state, Vec::new(), reason);
    }
    let recorded = state.weight;
    if state.phase != Phase::Paused {
        state.paused_from = Some(state.phase);
        state.set_phase(Phase::Paused, now);
    }
    state.set_weight(router_weight, now);
    let reason = format!(
        "the router sends {}% to the canary, where the last recorded decision set {}%: an action \
         the state store could not record (an abort during its outage) or a router reset; \
         paused at {}% rather than raising it again: resume to go on at step {}'s {}%, or abort",
        fmt_pct(router_weight),
        fmt_pct(recorded),
        fmt_pct(router_weight),
        state.step + 1,
        fmt_pct(step_weight(policy, state.step))
    );
    decision(Action::Pause, state, Vec::new(), reason)
}

fn decision(
    action: Action,
    mut state: RolloutState,
    reports: Vec<MetricReport>,
    reason: String,
) -> Decision {
    state.message = reason.clone();
    Decision {
        action,
        weight: state.weight,
        state,
        reports,
        reason,
        who: None,
        why: None,
    }
}

/// The weight of step `i`; 100 once past the last step.
fn step_weight(policy: &Policy, i: usize) -> f64 {
    policy.strategy.steps().get(i).copied().unwrap_or(100.0)
}

fn start(policy: &Policy, mut state: RolloutState, now: Time) -> RolloutState {
    state.attempt += 1;
    state.step = 0;
    state.started_at = Some(now);
    state.paused_for = std::time::Duration::ZERO;
    state.restart_step_clock(Some(now));
    state.promoted_at = None;
    state.consecutive_failures = 0;
    state.seen_data.clear();
    state.memory.clear();
    state.paused_from = None;
    state.set_phase(Phase::Progressing, now);
    let first = step_weight(policy, 0);
    state.set_weight(first, now);
    // A weight confirmed in an earlier attempt is no longer a place to leave traffic: if the
    // router fails now, the most the canary may keep is this attempt's first step.
    state.safe_weight = state.safe_weight.min(first);
    state
}

fn rollback(
    mut state: RolloutState,
    reports: Vec<MetricReport>,
    reason: String,
    now: Time,
) -> Decision {
    state.set_phase(Phase::RollingBack, now);
    state.paused_from = None;
    state.set_weight(0.0, now);
    decision(Action::Rollback, state, reports, reason)
}

fn promote(
    mut state: RolloutState,
    policy: &Policy,
    reports: Vec<MetricReport>,
    reason: String,
    now: Time,
) -> Decision {
    state.set_phase(Phase::Promoting, now);
    state.paused_from = None;
    state.step = policy.strategy.steps().len();
    state.promoted_at = Some(now);
    state.consecutive_failures = 0;
    state.set_weight(100.0, now);
    decision(Action::Promote, state, reports, reason)
}

fn router_confirms(obs: &Observation, weight: f64) -> bool {
    matches!(obs.router, RouterStatus::Ok { canary_weight } if (canary_weight - weight).abs() < 0.01)
}

/// Judges every metric of the policy against the observation.
fn analyse(
    policy: &Policy,
    state: &mut RolloutState,
    obs: &Observation,
    now: Time,
) -> Vec<MetricReport> {
    // Stable loses its traffic after a blue-green switch and after a promotion; from then on
    // the relative bounds compare with what stable did before.
    let use_baseline = state.weight >= 100.0;
    let stepping = matches!(
        state.phase,
        Phase::Progressing | Phase::Paused | Phase::WaitingPromotion
    );
    let mut reports = Vec::with_capacity(policy.metrics.len());
    for spec in &policy.metrics {
        let ctx = JudgeContext {
            method: policy.analysis.method,
            confidence: policy.analysis.confidence,
            metric_count: policy.metrics.len(),
            baseline: if use_baseline {
                state.baseline.get(&spec.name).copied()
            } else {
                None
            },
            configured_weight: state.weight,
        };
        let reading = obs.metrics.get(&spec.name).cloned().unwrap_or_else(|| {
            crate::observation::MetricReading::unavailable("metric not queried")
        });
        let memory = state.memory.entry(spec.name.clone()).or_default();
        let mut report = judge::evaluate(&ctx, spec, &reading, memory);
        if stepping {
            check_activity(policy, state, spec, &reading, &mut report, now);
        }
        // Data of this step: for a count of events, one that grew since the step's first
        // analysis. A window that reaches back into the step before (a step shorter than
        // the shortest query range) otherwise holds a canary that died at this step's start.
        let fresh = !stepping
            || matches!(spec.kind, MetricKind::Query { .. })
            || state.step_started_at.is_none()
            || state.activity.get(&spec.name).is_none_or(|a| a.grown);
        if report.canary.is_some() && report.verdict != Verdict::NoData && fresh {
            state.seen_data.insert(spec.name.clone());
        }
        if !use_baseline {
            // Only a value the judge would accept from stable becomes the reference: a
            // handful of requests is no baseline to hold a blue-green switch against.
            let stable = reading.stable.sample().filter(|s| {
                s.window_events >= spec.min_samples as f64 && s.value.is_some_and(f64::is_finite)
            });
            if let Some(v) = stable.and_then(|s| s.value) {
                state.baseline.insert(spec.name.clone(), v);
            }
        }
        reports.push(report);
    }
    state.analyses += 1;
    state.last_analysis_at = Some(now);
    reports
}

/// Whether an analysis saw nothing of the canary: a source that could not be asked, or a
/// metric whose window holds no canary events or stopped growing. Thin data (fewer events than
/// `min_samples`) is data, and its time counts.
fn blind(policy: &Policy, state: &RolloutState, reports: &[MetricReport], now: Time) -> bool {
    reports.iter().any(|r| match r.verdict {
        Verdict::Unavailable => true,
        Verdict::NoData => empty(policy, state, r, now),
        _ => false,
    })
}

/// Whether a no-data report saw nothing of the canary: no events in its window, or none new
/// for [`stall_after`]. Thin data (fewer events than `min_samples`) is not empty.
fn empty(policy: &Policy, state: &RolloutState, r: &MetricReport, now: Time) -> bool {
    r.canary_events <= 0.0
        || state
            .activity
            .get(&r.metric)
            .is_some_and(|a| now.since(a.grew_at) >= stall_after(policy))
}

/// How long a step's window may go without a new canary event before the canary counts as
/// having no data: longer than any sensible scrape interval, and than a few analyses.
pub fn stall_after(policy: &Policy) -> std::time::Duration {
    policy
        .strategy
        .interval
        .saturating_mul(3)
        .max(std::time::Duration::from_secs(120))
}

/// An analysis window spans up to a step's worth of time, so it goes on reading as data for
/// that long after the canary's traffic stops (a router or client outage, a quiet night). A
/// built-in metric whose canary events (counted since the rollout began) have not grown for
/// [`stall_after`] has no new data: the judge's pass or hold becomes no-data, which
/// `on_no_data` then governs and which stops the step's clock.
fn check_activity(
    policy: &Policy,
    state: &mut RolloutState,
    spec: &MetricSpec,
    reading: &MetricReading,
    report: &mut MetricReport,
    now: Time,
) {
    // A raw query's value is no count of events; and without a step clock there is no step
    // window to watch.
    if matches!(spec.kind, MetricKind::Query { .. }) || state.step_started_at.is_none() {
        return;
    }
    // Counts since the rollout began grow with every canary event whatever the window does
    // (an analysis window is capped, and slides); a reading without them falls back on the
    // window's.
    let Some(events) = reading
        .canary
        .sample()
        .map(|s| s.events_since_start().unwrap_or(s.window_events))
    else {
        return;
    };
    let activity = state.activity.entry(spec.name.clone()).or_insert(Activity {
        most: events,
        grew_at: now,
        // The metric's first count: any is new.
        grown: events > 0.5,
        step_began: false,
    });
    if std::mem::take(&mut activity.step_began) {
        // The step's first analysis: grown if the count passed the last one of the step
        // before, and the step's own count from here (a window's count may be lower).
        activity.grown = events > activity.most + 0.5;
        activity.most = events;
        activity.grew_at = now;
        return;
    }
    // Half an event: `increase()` extrapolates, so counts are fractional, and with no traffic
    // they only shrink as the window grows.
    if events > activity.most + 0.5 {
        activity.most = events;
        activity.grew_at = now;
        activity.grown = true;
        return;
    }
    let quiet = now.since(activity.grew_at);
    if quiet >= stall_after(policy) && matches!(report.verdict, Verdict::Pass | Verdict::Hold) {
        report.verdict = Verdict::NoData;
        report.promotable = false;
        report.note = format!(
            "no new canary events for {} (the analysis window still holds {} from before); was: {}",
            humantime::format_duration(std::time::Duration::from_secs(quiet.as_secs())),
            crate::judge::fmt_count(report.canary_events),
            report.note
        );
    }
}

/// What the verdicts of one analysis add up to.
enum Outcome {
    /// Roll back now, with the reason.
    Rollback(String),
    /// Hold without counting a failure, with the reason.
    Hold(String),
    /// A failed check that did not reach the limit.
    Failed(String),
    /// Every metric passed (or counts as passed).
    Pass,
}

fn outcome(
    policy: &Policy,
    state: &mut RolloutState,
    reports: &[MetricReport],
    now: Time,
) -> Outcome {
    let names = |pred: &dyn Fn(&MetricReport) -> bool| -> Vec<String> {
        reports
            .iter()
            .filter(|r| pred(r))
            .map(|r| r.metric.clone())
            .collect()
    };
    let critical = names(&|r| {
        r.verdict == Verdict::Fail && policy.metric(&r.metric).is_some_and(|m| m.critical)
    });
    if !critical.is_empty() {
        return Outcome::Rollback(format!("critical metric failed: {}", critical.join(", ")));
    }
    // A sequential judge fails only when its e-value has crossed 1/α: an anytime-valid
    // rejection that stays crossed. Waiting for `failure_limit` repeats of it adds no
    // protection against noise (the test already controls that) and only serves the bad
    // canary for longer, so it is final at once. `failure_limit` governs the other judges,
    // whose checks can flip back and forth on noise.
    let proven = names(&|r| r.verdict == Verdict::Fail && r.method == Method::Sequential);
    if !proven.is_empty() {
        return Outcome::Rollback(format!(
            "sequential test rejected the canary: {}",
            proven.join(", ")
        ));
    }
    let unavailable = names(&|r| r.verdict == Verdict::Unavailable);
    // `on_no_data: fail` counts a metric that saw nothing of the canary, once the attempt has
    // run long enough for data to exist (the first analyses of a rollout find no counts yet,
    // by design): not thin data, which is data, and not the attempt's first moments.
    let settled = state
        .started_at
        .is_none_or(|t| now.since(t) >= stall_after(policy));
    let no_data_fails = |r: &MetricReport| {
        policy.strategy.on_no_data == OnNoData::Fail
            && r.verdict == Verdict::NoData
            && settled
            && empty(policy, state, r, now)
    };
    let failing_no_data = names(&|r| no_data_fails(r));
    let no_data = names(&|r| r.verdict == Verdict::NoData && !no_data_fails(r));
    let failed: Vec<String> = reports
        .iter()
        .filter_map(|r| match r.verdict {
            Verdict::Fail => Some(r.metric.clone()),
            _ if failing_no_data.contains(&r.metric) => {
                Some(format!("{} (no data, on_no_data: fail)", r.metric))
            }
            _ => None,
        })
        .collect();
    if !failed.is_empty() {
        state.consecutive_failures += 1;
        let limit = policy.strategy.failure_limit;
        // The count is of analyses: the metrics named are this analysis's, which may differ
        // from the earlier ones'.
        let what = format!(
            "failed: {}; {} of {} failed analyses in a row",
            failed.join(", "),
            state.consecutive_failures,
            limit
        );
        return if state.consecutive_failures >= limit {
            Outcome::Rollback(what)
        } else {
            Outcome::Failed(what)
        };
    }
    // Checked after the failures: a metric the source cannot answer says nothing about the
    // canary, so it neither counts as a failure nor hides the failure of another metric.
    if !unavailable.is_empty() {
        return Outcome::Hold(format!("metrics unavailable: {}", unavailable.join(", ")));
    }
    if !no_data.is_empty() && policy.strategy.on_no_data != OnNoData::Pass {
        return Outcome::Hold(format!("waiting for data: {}", no_data.join(", ")));
    }
    let holding = names(&|r| r.verdict == Verdict::Hold);
    if !holding.is_empty() {
        return Outcome::Hold(format!("gathering evidence: {}", holding.join(", ")));
    }
    state.consecutive_failures = 0;
    Outcome::Pass
}

fn tick(
    policy: &Policy,
    mut state: RolloutState,
    obs: &Observation,
    now: Time,
    read_for_this_canary: bool,
) -> Decision {
    // The weight the router confirmed last is where traffic is known to be safe: read back
    // now, or confirmed by the shell's last successful call before the router began failing.
    let confirmed = match &obs.router {
        RouterStatus::Ok { canary_weight } => Some(*canary_weight),
        RouterStatus::Failing { confirmed, .. } => *confirmed,
    };
    if confirmed.is_some_and(|w| (w - state.weight).abs() < 0.01) {
        state.safe_weight = state.weight;
    }
    // A step's time counts only while the router really sends its weight: a router that did
    // not take it (a failed apply, a router restarted with other weights, a daemon restarted
    // after someone reset them) starts the step's clock again once it does.
    if matches!(
        state.phase,
        Phase::Progressing | Phase::Paused | Phase::WaitingPromotion
    ) {
        // A failing router's last confirmed weight counts too: an apply that failed leaves it
        // at the step before.
        let (seen, read) = match &obs.router {
            RouterStatus::Ok { canary_weight } => (Some(*canary_weight), true),
            RouterStatus::Failing { confirmed, .. } => (*confirmed, false),
        };
        match seen {
            Some(w) if (w - state.weight).abs() >= 0.01 => state.restart_step_clock(None),
            Some(_) if read && state.step_started_at.is_none() => {
                state.restart_step_clock(Some(now));
            }
            _ => {}
        }
    }
    match state.phase {
        Phase::Idle => tick_idle(policy, state, obs, now, read_for_this_canary),
        Phase::Progressing | Phase::Paused | Phase::WaitingPromotion => {
            tick_progressing(policy, state, obs, now)
        }
        Phase::Promoting => tick_promoting(policy, state, obs, now),
        Phase::RollingBack => {
            if router_confirms(obs, 0.0) {
                state.set_phase(Phase::RolledBack, now);
                decision(
                    Action::Settle,
                    state,
                    Vec::new(),
                    "rolled back: all traffic on stable".into(),
                )
            } else {
                let why = match &obs.router {
                    RouterStatus::Failing { error, .. } => {
                        format!("rolling back; router failing: {error}")
                    }
                    RouterStatus::Ok { canary_weight } => {
                        format!(
                            "rolling back; router still sends {}% to the canary",
                            fmt_pct(*canary_weight)
                        )
                    }
                };
                decision(Action::Hold, state, Vec::new(), why)
            }
        }
        Phase::Failed => tick_failed(policy, state, obs, now),
        Phase::Promoted | Phase::RolledBack => {
            let reason = state.message.clone();
            decision(Action::Hold, state, Vec::new(), reason)
        }
    }
}

fn router_failed_too_long(policy: &Policy, obs: &Observation, now: Time) -> Option<String> {
    match &obs.router {
        RouterStatus::Failing { since, error, .. }
            if now.since(*since) >= policy.strategy.router_deadline =>
        {
            Some(format!(
                "router failing for {} (deadline {}): {error}",
                humantime::format_duration(now.since(*since)),
                humantime::format_duration(policy.strategy.router_deadline)
            ))
        }
        _ => None,
    }
}

fn fail(mut state: RolloutState, reason: String, now: Time) -> Decision {
    state.set_phase(Phase::Failed, now);
    state.failure = Some(reason.clone());
    state.paused_from = None;
    let safe = state.safe_weight;
    state.set_weight(safe, now);
    decision(Action::Fail, state, Vec::new(), reason)
}

/// A failed rollout leaves the router alone until an operator acts, but its canary is still
/// judged: one that turns out bad is rolled back, which is always allowed.
fn tick_failed(policy: &Policy, mut state: RolloutState, obs: &Observation, now: Time) -> Decision {
    let reports = analyse(policy, &mut state, obs, now);
    if let Outcome::Rollback(why) = outcome(policy, &mut state, &reports, now) {
        return rollback(state, reports, format!("failed rollout: {why}"), now);
    }
    // Why it failed stays; what the router does now is news (a state from before `failure`
    // existed has the reason as its message).
    let why = state
        .failure
        .get_or_insert_with(|| state.message.clone())
        .clone();
    let router = match &obs.router {
        RouterStatus::Ok { canary_weight } => format!(
            "the router answers again and sends {}% to the canary",
            fmt_pct(*canary_weight)
        ),
        RouterStatus::Failing { error, .. } => format!("the router still fails: {error}"),
    };
    let reason = format!("failed: {why}. Now {router}; an operator must `retry` or `abort`");
    decision(Action::Hold, state, reports, reason)
}

/// `read_for_this_canary`: whether the router's weight in `obs` is this rollout's canary's
/// (not the previous candidate's, read before the change of candidate reached the state).
fn tick_idle(
    policy: &Policy,
    mut state: RolloutState,
    obs: &Observation,
    now: Time,
    read_for_this_canary: bool,
) -> Decision {
    if !policy.has_candidate() {
        return decision(
            Action::Hold,
            state,
            Vec::new(),
            "no candidate: canary equals stable".into(),
        );
    }
    if let RouterStatus::Failing { error, .. } = &obs.router {
        return decision(
            Action::Hold,
            state,
            Vec::new(),
            format!("not started: router failing: {error}"),
        );
    }
    // Record stable's values before any traffic moves: blue-green compares with them. A
    // baseline from an earlier attempt does not count: the pre-check wants one from now.
    if policy.strategy.is_blue_green() {
        state.baseline.clear();
    }
    // Nor does an earlier attempt's evidence: this analysis is of the data as it is now.
    state.memory.clear();
    let reports = analyse(policy, &mut state, obs, now);
    state.analyses = 0;
    state.seen_data.clear();
    state.memory.clear();
    if policy.strategy.is_blue_green() {
        let missing: Vec<&str> = policy
            .metrics
            .iter()
            .filter(|m| m.bounds.is_relative() && !state.baseline.contains_key(&m.name))
            .map(|m| m.name.as_str())
            .collect();
        if !missing.is_empty() && policy.strategy.on_no_data != OnNoData::Pass {
            return decision(
                Action::Hold,
                state,
                reports,
                format!(
                    "pre-check: no stable baseline yet for {}",
                    missing.join(", ")
                ),
            );
        }
        // A retried switch sees the canary's traffic from the attempt before: all traffic
        // never goes to a canary whose recent numbers fail (it waits until they age out of
        // the window, or for an operator's abort). Builtins only: a `query:` metric has a
        // value without any traffic (a rate of 0), which says nothing of the canary.
        let failing: Vec<String> = reports
            .iter()
            .filter(|r| state.attempt > 0 && r.verdict == Verdict::Fail)
            .filter(|r| {
                policy
                    .metric(&r.metric)
                    .is_some_and(|m| !matches!(m.kind, MetricKind::Query { .. }))
            })
            .map(|r| r.metric.clone())
            .collect();
        if !failing.is_empty() {
            let why = format!(
                "pre-check: the canary's recent traffic fails {}; not switching all traffic to it",
                failing.join(", ")
            );
            return decision(Action::Hold, state, reports, why);
        }
    }
    let state = start(policy, state, now);
    let mut reason = format!(
        "rollout of {} started at {}%",
        state.canary,
        fmt_pct(state.weight)
    );
    // Traffic on a canary that has no rollout on record (a state file lost or replaced, a
    // router set by hand): the rollout starts over from its first step, and says so.
    if let RouterStatus::Ok { canary_weight } = obs.router
        && read_for_this_canary
        && canary_weight >= 0.01
        && (canary_weight - state.weight).abs() >= 0.01
    {
        reason.push_str(&format!(
            "; the router sent {}% to the canary before, with no rollout of it on record",
            fmt_pct(canary_weight)
        ));
    }
    decision(Action::Start, state, reports, reason)
}

/// After an edit of the policy's steps: a rollout past the new last step goes back to it, and
/// one whose weight is above its step's new weight comes down to it (never up: more traffic
/// waits for the next advance). Says what changed, if anything.
fn fit_to_steps(policy: &Policy, state: &mut RolloutState, now: Time) -> Option<String> {
    let steps = policy.strategy.steps();
    if policy.strategy.is_blue_green() || steps.is_empty() {
        return None;
    }
    let last = steps.len() - 1;
    let step = state.step.min(last);
    let weight = state.weight.min(steps[step]);
    if step == state.step && weight == state.weight {
        return None;
    }
    let why = format!(
        "the policy's steps changed: now step {} of {} at {}% (was {}%)",
        step + 1,
        steps.len(),
        fmt_pct(weight),
        fmt_pct(state.weight)
    );
    state.step = step;
    if weight != state.weight {
        state.set_weight(weight, now);
        state.restart_step_clock(Some(now));
    }
    Some(why)
}

/// Whether a report is an accuracy metric short of labels: no data yet, too few, or not yet
/// proven within tolerance, and not leaning towards harm.
fn lacks_labels(policy: &Policy, r: &MetricReport) -> bool {
    policy
        .metric(&r.metric)
        .is_some_and(|m| matches!(m.kind, MetricKind::Accuracy))
        && matches!(r.verdict, Verdict::Pass | Verdict::Hold | Verdict::NoData)
        && !r.suspicious()
}

/// The accuracy metrics that alone keep the rollout from going on, for want of labels. `None`
/// when any metric fails or leans towards harm, or another metric holds.
fn waiting_only_for_labels(policy: &Policy, reports: &[MetricReport]) -> Option<Vec<String>> {
    let mut late = Vec::new();
    for r in reports.iter().filter(|r| r.verdict != Verdict::Pass) {
        if !lacks_labels(policy, r) {
            return None;
        }
        late.push(r.metric.clone());
    }
    (!late.is_empty()).then_some(late)
}

/// At the progress deadline: the metrics that alone keep the canary from promotion for want
/// of evidence that may never come in time, as (accuracy metrics waiting for labels, metrics
/// whose bad events are too rare to compare, `MetricReport::thin_evidence`). `None` when any
/// metric fails, leans towards harm, or is not proven good for another reason.
fn waiting_only_for_evidence(
    policy: &Policy,
    reports: &[MetricReport],
) -> Option<(Vec<String>, Vec<String>)> {
    let (mut labels, mut thin) = (Vec::new(), Vec::new());
    for r in reports
        .iter()
        .filter(|r| !(r.verdict == Verdict::Pass && r.promotable))
    {
        if lacks_labels(policy, r) {
            labels.push(r.metric.clone());
        } else if r.thin_evidence && r.verdict == Verdict::Pass && !r.suspicious() {
            thin.push(r.metric.clone());
        } else {
            return None;
        }
    }
    (!labels.is_empty() || !thin.is_empty()).then_some((labels, thin))
}

fn tick_progressing(
    policy: &Policy,
    mut state: RolloutState,
    obs: &Observation,
    now: Time,
) -> Decision {
    let last_look = state.last_analysis_at;
    let reports = analyse(policy, &mut state, obs, now);
    // A rollback goes before a router failure: `failed` keeps the last confirmed weight as
    // the target, which must never be the choice for a canary that is known to be bad or out
    // of time. Rolling back keeps 0 as the target until the router takes it.
    if state.phase == Phase::Progressing
        && state
            .progress_time(now)
            .is_some_and(|t| t > policy.strategy.progress_deadline)
    {
        let deadline = humantime::format_duration(policy.strategy.progress_deadline);
        // Labels that did not arrive in time are not evidence against the canary: a person
        // who knows why they are late decides, instead of a rollback nobody asked for.
        // Nor are bad events too rare to compare (a relative tolerance on a rare error).
        if let Some((late, thin)) = waiting_only_for_evidence(policy, &reports) {
            state.set_phase(Phase::WaitingPromotion, now);
            let mut lacking = Vec::new();
            if !late.is_empty() {
                lacking.push(format!("the labels for {}", late.join(", ")));
            }
            if !thin.is_empty() {
                lacking.push(format!("enough bad events in {}", thin.join(", ")));
            }
            let why = format!(
                "progress deadline {deadline} passed before {} showed the canary within \
                 tolerance; no metric shows harm: waiting for an operator to promote or abort",
                lacking.join(" and ")
            );
            return decision(Action::Wait, state, reports, why);
        }
        let why = format!("progress deadline {deadline} passed without promotion");
        return rollback(state, reports, why, now);
    }
    let not_passed = match outcome(policy, &mut state, &reports, now) {
        Outcome::Rollback(why) => return rollback(state, reports, why, now),
        Outcome::Hold(why) => {
            // Time in which the canary served nothing measurable, or could not be looked at,
            // does not count towards the step: a canary whose traffic stopped mid-step is not
            // moved on as soon as it comes back.
            if blind(policy, &state, &reports, now)
                && let Some(started) = state.step_started_at
            {
                let from = last_look.unwrap_or(started).max(started);
                state.step_blind += now.since(from);
            }
            Some(why)
        }
        Outcome::Failed(why) => Some(why),
        Outcome::Pass => None,
    };
    if let Some(why) = fit_to_steps(policy, &mut state, now) {
        return decision(Action::Hold, state, reports, why);
    }
    if let Some(why) = router_failed_too_long(policy, obs, now) {
        return fail(state, why, now);
    }
    if let Some(why) = not_passed {
        if state.phase == Phase::WaitingPromotion {
            let why = format!("waiting for an operator to promote; {why}");
            return decision(Action::Wait, state, reports, why);
        }
        let why = match (
            waiting_only_for_labels(policy, &reports),
            state.progress_time(now),
        ) {
            (Some(_), Some(spent)) if state.phase == Phase::Progressing => {
                let end = policy.strategy.progress_deadline;
                let left = end.saturating_sub(spent);
                format!(
                    "{why}; labels can arrive until the progress deadline in {}",
                    humantime::format_duration(whole_secs_up(left))
                )
            }
            _ => why,
        };
        return decision(Action::Hold, state, reports, why);
    }
    if let RouterStatus::Failing { error, .. } = &obs.router {
        return decision(
            Action::Hold,
            state,
            reports,
            format!("router failing: {error}"),
        );
    }
    match state.phase {
        Phase::Paused => {
            // Why it was paused (by an operator, or found lower at a resume) stays shown.
            let why = if state.message.is_empty() {
                "paused by an operator".to_owned()
            } else {
                state.message.clone()
            };
            return decision(Action::Hold, state, reports, why);
        }
        Phase::WaitingPromotion => {
            return decision(
                Action::Wait,
                state,
                reports,
                "waiting for an operator to promote".into(),
            );
        }
        _ => {}
    }
    if !router_confirms(obs, state.weight) {
        let reason = format!("waiting for the router to apply {}%", fmt_pct(state.weight));
        return decision(Action::Hold, state, reports, reason);
    }
    let in_step = state.time_in_step(now).unwrap_or_default();
    let step_duration = policy.strategy.step_duration();
    if in_step < step_duration {
        let left = whole_secs_up(step_duration - in_step);
        let blind = if state.step_blind.is_zero() {
            String::new()
        } else {
            format!(
                " ({} without data not counted)",
                humantime::format_duration(whole_secs_up(state.step_blind))
            )
        };
        let reason = format!(
            "step {} at {}%: {} left{blind}",
            state.step + 1,
            fmt_pct(state.weight),
            humantime::format_duration(left)
        );
        return decision(Action::Hold, state, reports, reason);
    }
    let steps = policy.strategy.steps();
    if state.step + 1 < steps.len() {
        state.step += 1;
        state.restart_step_clock(Some(now));
        state.seen_data.clear();
        let w = step_weight(policy, state.step);
        state.set_weight(w, now);
        let reason = format!("advanced to step {} at {}%", state.step + 1, fmt_pct(w));
        return decision(Action::Advance, state, reports, reason);
    }
    // The last step is done: promotion needs data for every metric in this step and enough
    // evidence from every judge.
    let blind: Vec<&str> = policy
        .metrics
        .iter()
        .filter(|m| !state.seen_data.contains(&m.name))
        .map(|m| m.name.as_str())
        .collect();
    if !blind.is_empty() {
        let reason = format!(
            "not promoting without canary data from this step for {}",
            blind.join(", ")
        );
        return decision(Action::Hold, state, reports, reason);
    }
    let unproven: Vec<&str> = reports
        .iter()
        .filter(|r| !r.promotable)
        .map(|r| r.metric.as_str())
        .collect();
    if !unproven.is_empty() {
        let reason = format!("not enough evidence to promote: {}", unproven.join(", "));
        return decision(Action::Hold, state, reports, reason);
    }
    if policy.strategy.manual_promotion {
        state.set_phase(Phase::WaitingPromotion, now);
        return decision(
            Action::Wait,
            state,
            reports,
            "last step passed; waiting for an operator to promote".into(),
        );
    }
    let gated = policy
        .webhooks
        .iter()
        .any(|w| w.on == crate::policy::WebhookEvent::ConfirmPromotion);
    if gated {
        match &obs.gate {
            Gate::Open => {}
            Gate::NotAsked => {
                return decision(
                    Action::Hold,
                    state,
                    reports,
                    "asking the confirm-promotion gate".into(),
                );
            }
            Gate::Closed { reason } => {
                return decision(
                    Action::Hold,
                    state,
                    reports,
                    format!("promotion gate closed: {reason}"),
                );
            }
        }
    }
    let reason = if gated {
        "every step passed and the confirm-promotion gate is open: promoting"
    } else {
        "every step passed: promoting"
    };
    promote(state, policy, reports, reason.into(), now)
}

fn tick_promoting(
    policy: &Policy,
    mut state: RolloutState,
    obs: &Observation,
    now: Time,
) -> Decision {
    let watch = policy.strategy.post_promotion_watch;
    let promoted_at = state.promoted_at.unwrap_or(now);
    let watching = now.since(promoted_at) < watch;
    let mut reports = Vec::new();
    // What the watch has seen short of a rollback (a failed analysis, a metric without data),
    // for the reason: "watching" alone would hide the first of `failure_limit` failures.
    let mut concern = None;
    // Only within the watch: once it is over the promotion stands, whatever comes after.
    if watching {
        reports = analyse(policy, &mut state, obs, now);
        match outcome(policy, &mut state, &reports, now) {
            Outcome::Rollback(why) => {
                return rollback(state, reports, format!("post-promotion watch: {why}"), now);
            }
            Outcome::Failed(why) | Outcome::Hold(why) => concern = Some(why),
            Outcome::Pass => {}
        }
    }
    if !router_confirms(obs, 100.0) {
        if let Some(why) = router_failed_too_long(policy, obs, now) {
            return fail(state, why, now);
        }
        return decision(
            Action::Hold,
            state,
            reports,
            "waiting for the router to send all traffic to the canary".into(),
        );
    }
    if watching {
        let left = watch - now.since(promoted_at);
        let reason = format!(
            "promoted; watching for {} more{}",
            humantime::format_duration(std::time::Duration::from_secs(left.as_secs())),
            concern.map(|c| format!(": {c}")).unwrap_or_default()
        );
        return decision(Action::Hold, state, reports, reason);
    }
    state.set_phase(Phase::Promoted, now);
    let reason = format!("promoted: {} serves all traffic", state.canary);
    decision(Action::Settle, state, reports, reason)
}

fn reject(state: RolloutState, action: OperatorAction) -> Decision {
    let reason = format!(
        "cannot {} a rollout that is {}",
        action.as_str(),
        state.phase.as_str()
    );
    let mut d = decision(Action::Reject, state.clone(), Vec::new(), reason);
    // A refused action leaves the rollout's own explanation untouched.
    d.state.message = state.message;
    d
}

fn operator(
    policy: &Policy,
    mut state: RolloutState,
    action: OperatorAction,
    now: Time,
) -> Decision {
    use Phase::*;
    match (action, state.phase) {
        (OperatorAction::Promote, Progressing | Paused | WaitingPromotion) => promote(
            state,
            policy,
            Vec::new(),
            "promoted by an operator".into(),
            now,
        ),
        (OperatorAction::Abort, Idle) if policy.has_candidate() => {
            state.set_phase(RolledBack, now);
            state.set_weight(0.0, now);
            decision(
                Action::Rollback,
                state,
                Vec::new(),
                "aborted by an operator before it started".into(),
            )
        }
        // Rollback stays reachable from every state (DESIGN.md): an operator may still send
        // traffic back to stable after a promotion, the one way out of `promoted`.
        (
            OperatorAction::Abort,
            Progressing | Paused | WaitingPromotion | Promoting | Promoted | Failed,
        ) => rollback(state, Vec::new(), "aborted by an operator".into(), now),
        (OperatorAction::Pause, Progressing | WaitingPromotion) => {
            state.paused_from = Some(state.phase);
            state.set_phase(Paused, now);
            decision(
                Action::Pause,
                state,
                Vec::new(),
                "paused by an operator".into(),
            )
        }
        (OperatorAction::Resume, Paused) => {
            let back = state.paused_from.take().unwrap_or(Progressing);
            if let Some(since) = state.phase_since {
                state.paused_for += now.since(since);
            }
            state.set_phase(back, now);
            // Paused below its step's weight (found so at a resume from the store): back to
            // the step's weight, whose time starts again.
            let step = step_weight(policy, state.step);
            let mut reason = "resumed by an operator".to_owned();
            if !policy.strategy.is_blue_green() && state.weight + 0.01 < step {
                state.set_weight(step, now);
                state.restart_step_clock(Some(now));
                reason.push_str(&format!(" at step {}'s {}%", state.step + 1, fmt_pct(step)));
            }
            decision(Action::Resume, state, Vec::new(), reason)
        }
        (OperatorAction::Retry, RolledBack | Failed)
            if policy.has_candidate() && policy.strategy.is_blue_green() && state.weight == 0.0 =>
        {
            // A blue-green switch needs its pre-checks again (a router that answers, a stable
            // baseline): the next tick starts it from `idle`, which owns no traffic.
            state.set_phase(Idle, now);
            state.paused_from = None;
            decision(
                Action::Retry,
                state,
                Vec::new(),
                "retried by an operator: switching again once the pre-checks pass".into(),
            )
        }
        (OperatorAction::Retry, RolledBack | Failed) if policy.has_candidate() => {
            let state = start(policy, state, now);
            let reason = format!(
                "retried by an operator: attempt {} at {}%",
                state.attempt,
                fmt_pct(state.weight)
            );
            decision(Action::Retry, state, Vec::new(), reason)
        }
        _ => reject(state, action),
    }
}

/// Whole seconds, rounded up: "0s left" would read as done.
fn whole_secs_up(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// A weight for people: whole numbers as they are, others to at most two decimals (a router
/// may read back 33.333333333333336).
pub fn fmt_pct(w: f64) -> String {
    let s = format!("{w:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn weights_read_as_people_write_them() {
        for (w, want) in [
            (10.0, "10"),
            (0.0, "0"),
            (2.5, "2.5"),
            (33.333333333333336, "33.33"),
            (99.999, "100"),
        ] {
            assert_eq!(super::fmt_pct(w), want);
        }
    }
}
