//! The state of one rollout: serialisable, persisted by the store after every decision.

use crate::judge::JudgeMemory;
use crate::policy::{Policy, WebhookEvent};
use crate::time::Time;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Where a rollout is. Final phases stay final until a new canary or `retry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// No rollout running: no candidate, or not started yet.
    Idle,
    /// Stepping through weights, analysing every interval.
    Progressing,
    /// An operator paused it: analyses go on and can still roll back, nothing advances.
    Paused,
    /// At the last step, waiting for an operator's `promote`.
    WaitingPromotion,
    /// All traffic to the canary; confirming with the router and watching it if configured.
    Promoting,
    /// Done: the canary is the new stable.
    Promoted,
    /// All traffic back to stable; waiting for the router to confirm.
    RollingBack,
    /// Done: the canary was rejected.
    RolledBack,
    /// The router could not be driven before its deadline; traffic left where it was last
    /// known to be safe. An operator must act (`abort` or `retry`).
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Idle,
        Phase::Progressing,
        Phase::Paused,
        Phase::WaitingPromotion,
        Phase::Promoting,
        Phase::Promoted,
        Phase::RollingBack,
        Phase::RolledBack,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::WaitingPromotion => "waiting-promotion",
            Phase::Promoting => "promoting",
            Phase::Promoted => "promoted",
            Phase::RollingBack => "rolling-back",
            Phase::RolledBack => "rolled-back",
            Phase::Failed => "failed",
        }
    }

    /// Phases that stay until a new canary or an operator's `retry`.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Promoted | Phase::RolledBack | Phase::Failed)
    }

    /// Phases in which the canary is analysed.
    pub fn analyses(self) -> bool {
        matches!(
            self,
            Phase::Idle
                | Phase::Progressing
                | Phase::Paused
                | Phase::WaitingPromotion
                | Phase::Promoting
                | Phase::Failed
        )
    }
}

/// How one metric's canary events grew within the current step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// The most canary events counted since the rollout began (in the analysis window, for a
    /// reading without such counts).
    pub most: f64,
    /// When `most` last grew.
    pub grew_at: Time,
    /// Whether the count grew in this step: the canary served events in it, rather than a
    /// window that reaches back into the step before.
    #[serde(default)]
    pub grown: bool,
    /// Set when a step starts: `most` is the last count of the step before, and the step's
    /// first analysis takes its own count from there.
    #[serde(default)]
    pub step_began: bool,
}

/// A change of the desired canary weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightChange {
    pub at: Time,
    pub weight: f64,
}

/// The most weight changes kept in the state; older ones stay in the decision log.
const WEIGHT_HISTORY_LIMIT: usize = 64;

/// Everything the decision core remembers about one rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    /// The policy's name.
    pub name: String,
    /// Stable and canary versions this rollout was started for.
    pub stable: String,
    pub canary: String,
    pub phase: Phase,
    /// The phase to return to on `resume`.
    pub paused_from: Option<Phase>,
    /// Index of the current step; the number of steps once promoting.
    pub step: usize,
    /// The canary weight (percent) the router must have.
    pub weight: f64,
    /// The last weight the router confirmed; where traffic is left if the router fails.
    pub safe_weight: f64,
    /// Attempts of this canary (1 on the first start, +1 per `retry`).
    pub attempt: u32,
    pub started_at: Option<Time>,
    pub step_started_at: Option<Time>,
    /// Time since `step_started_at` that does not count towards the step: analyses that had
    /// no canary data or could not ask the source (see `decide`'s blind holds).
    #[serde(default, with = "crate::policy::duration_ms")]
    pub step_blind: Duration,
    /// Time this attempt spent paused by an operator: it does not count towards the
    /// progress deadline (a pause is an operator's "wait", which the deadline must not undo).
    #[serde(default, with = "crate::policy::duration_ms")]
    pub paused_for: Duration,
    /// When the canary was last analysed.
    #[serde(default)]
    pub last_analysis_at: Option<Time>,
    /// Per metric, how many canary events were counted at most and when that last grew:
    /// counts that stop growing mean the canary stopped getting traffic.
    #[serde(default)]
    pub activity: BTreeMap<String, Activity>,
    pub promoted_at: Option<Time>,
    /// When the phase last changed.
    pub phase_since: Option<Time>,
    /// Consecutive failed analyses; reset by a passing one.
    pub consecutive_failures: u32,
    /// Metrics that have had data for the canary since the current step began.
    pub seen_data: BTreeSet<String>,
    /// Stable's last values per metric, recorded while stable still had traffic; the
    /// reference for blue-green and the post-promotion watch.
    pub baseline: BTreeMap<String, f64>,
    /// Judges' memory per metric.
    pub memory: BTreeMap<String, JudgeMemory>,
    /// Recent weight changes, oldest first.
    pub weight_history: Vec<WeightChange>,
    /// Analyses run in this rollout.
    pub analyses: u64,
    /// Why the rollout is where it is, for people.
    pub message: String,
    /// While `failed`: why it failed (the message then also says what the router does now).
    #[serde(default)]
    pub failure: Option<String>,
    /// The router this rollout's traffic was last set on, recorded by the shell: a daemon
    /// restarted with another router in the policy sends the old one's traffic to stable, as
    /// a live edit does. Not for people: it may hold a webhook's secret.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub router: Option<crate::policy::RouterConfig>,
    /// The policy that last drove this rollout, and the file it came from, recorded by the
    /// shell with `router`: a daemon restarted without a valid file for the rollout still
    /// serves `abort` through that router. Not for people: it may hold webhooks' URLs, whose
    /// query strings can carry secrets (a policy's Prometheus credentials are never
    /// serialised).
    /// Read leniently, like `router`: a record another version of canaryd wrote in another
    /// shape reads as none, rather than making the whole state unreadable.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub policy: Option<Box<Policy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// A value the shell records for itself, or none when it does not read as one: the rest of
/// the state stays readable whatever shape another version of canaryd gave it.
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(value.and_then(|v| serde_json::from_value(v).ok()))
}

impl RolloutState {
    /// A rollout that has not started, for a policy.
    pub fn new(policy: &Policy) -> Self {
        let message = if policy.has_candidate() {
            "not started"
        } else {
            "no candidate: canary equals stable"
        };
        RolloutState::unstarted(&policy.name, &policy.stable, &policy.canary, message)
    }

    fn unstarted(name: &str, stable: &str, canary: &str, message: &str) -> Self {
        RolloutState {
            name: name.to_owned(),
            stable: stable.to_owned(),
            canary: canary.to_owned(),
            phase: Phase::Idle,
            paused_from: None,
            step: 0,
            weight: 0.0,
            safe_weight: 0.0,
            attempt: 0,
            started_at: None,
            step_started_at: None,
            step_blind: Duration::ZERO,
            paused_for: Duration::ZERO,
            last_analysis_at: None,
            activity: BTreeMap::new(),
            promoted_at: None,
            phase_since: None,
            consecutive_failures: 0,
            seen_data: BTreeSet::new(),
            baseline: BTreeMap::new(),
            memory: BTreeMap::new(),
            weight_history: Vec::new(),
            analyses: 0,
            message: message.to_owned(),
            failure: None,
            router: None,
            policy: None,
            file: None,
        }
    }

    /// Whether this state belongs to the policy's current candidate.
    pub fn matches(&self, policy: &Policy) -> bool {
        self.canary == policy.canary && self.stable == policy.stable && self.name == policy.name
    }

    /// Whether the shell should ask the `confirm-promotion` gate before the next tick.
    pub fn wants_gate(&self, policy: &Policy) -> bool {
        let steps = policy.strategy.steps().len();
        policy
            .webhooks
            .iter()
            .any(|w| w.on == WebhookEvent::ConfirmPromotion)
            && self.phase == Phase::Progressing
            && self.step + 1 >= steps
            && !policy.strategy.manual_promotion
    }

    /// Whether the shell should query the metrics for the next tick.
    pub fn wants_analysis(&self, policy: &Policy) -> bool {
        self.phase.analyses()
            && (self.phase != Phase::Idle || policy.has_candidate())
            && self.matches(policy)
    }

    /// How long this attempt has been under way towards its progress deadline: since it
    /// started, less the time it spent paused.
    pub(crate) fn progress_time(&self, now: Time) -> Option<Duration> {
        Some(now.since(self.started_at?).saturating_sub(self.paused_for))
    }

    pub(crate) fn set_phase(&mut self, phase: Phase, now: Time) {
        if self.phase != phase {
            self.phase = phase;
            self.phase_since = Some(now);
        }
        if phase != Phase::Failed {
            self.failure = None;
        }
    }

    /// Starts the step's clock at `at`, or stops it (`None`) until the router confirms the
    /// step's weight; either way nothing measured so far counts for the step any more.
    pub(crate) fn restart_step_clock(&mut self, at: Option<Time>) {
        self.step_started_at = at;
        self.step_blind = Duration::ZERO;
        // The canary's counts so far are where this step's own start from: a count must
        // grow past them to be this step's data, and the stall clock starts again.
        for a in self.activity.values_mut() {
            a.grown = false;
            a.step_began = true;
            if let Some(t) = at {
                a.grew_at = t;
            }
        }
    }

    /// How long the current step has counted at `now`: its time less its blind time.
    pub fn time_in_step(&self, now: Time) -> Option<Duration> {
        self.step_started_at
            .map(|t| now.since(t).saturating_sub(self.step_blind))
    }

    pub(crate) fn set_weight(&mut self, weight: f64, now: Time) {
        if self.weight != weight {
            self.weight = weight;
            self.weight_history.push(WeightChange { at: now, weight });
            if self.weight_history.len() > WEIGHT_HISTORY_LIMIT {
                let excess = self.weight_history.len() - WEIGHT_HISTORY_LIMIT;
                self.weight_history.drain(..excess);
            }
        }
    }
}

/// A rollout of `name` (v1 to v2) in `phase` at `step` and `weight`, for tests.
#[cfg(test)]
pub(crate) fn sample(name: &str, phase: Phase, step: usize, weight: f64) -> RolloutState {
    RolloutState {
        phase,
        step,
        weight,
        attempt: 1,
        started_at: Some(Time(1)),
        step_started_at: Some(Time(1)),
        ..RolloutState::unstarted(name, "v1", "v2", &format!("at {weight}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the shell records for itself never makes a stored state unreadable: a policy or
    /// router in a shape this version does not know reads as none.
    #[test]
    fn a_recorded_policy_or_router_of_another_shape_reads_as_none() {
        let blank = || sample("demo", Phase::Progressing, 0, 10.0);
        let mut state = serde_json::to_value(RolloutState {
            router: Some(crate::policy::RouterConfig::File {
                path: "/tmp/w.json".into(),
            }),
            ..blank()
        })
        .unwrap_or_default();
        let back: RolloutState = serde_json::from_value(state.clone()).unwrap_or_else(|_| blank());
        assert!(back.router.is_some(), "{state}");
        state["router"] = serde_json::json!({"kind": "envoy", "cluster": "m"});
        state["policy"] = serde_json::json!({"name": "demo", "strategy": 3});
        let back: RolloutState = serde_json::from_value(state).unwrap_or_else(|e| {
            panic!("the state must stay readable: {e}");
        });
        assert_eq!((back.router, back.policy), (None, None));
        assert_eq!(back.name, "demo");
    }
}
