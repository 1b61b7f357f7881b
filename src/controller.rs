//! The shell: one async task per rollout that observes, decides, persists, applies and
//! publishes on the policy's interval, plus a watcher of the policies directory.
//!
//! It holds no business rules: every choice is `rollout::decide`'s. Each tick re-reads the
//! router's real weights and re-applies the desired one when they differ (level-triggered), so
//! a restarted daemon or a router that lost its runtime state converges on the next tick.

use crate::judge::MetricReport;
use crate::metrics::Metrics;
use crate::observation::{Gate, Input, Observation, OperatorAction, RouterStatus};
use crate::policy::{self, Policy, RouterTarget, WebhookEvent};
use crate::rollout::{Action, Decision, Phase, RolloutState, analysis_window, decide};
use crate::router::{Router, RouterError, Target};
use crate::source::MetricSource;
use crate::source::prometheus::error_chain;
use crate::store::{DecisionRecord, Store, StoredRollout};
use crate::time::{Clock, Time};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// How many recent analyses a rollout's view keeps for the API.
const RECENT_ANALYSES: usize = 10;
/// Attempts per router call within one tick; later ticks try again.
const ROUTER_ATTEMPTS: u32 = 3;

/// Builds the router for a policy (injected so tests can use fakes).
pub type RouterFactory = Arc<dyn Fn(&Policy) -> Result<Box<dyn Router>, RouterError> + Send + Sync>;
/// Builds the metric source for a policy (injected so tests can use fakes).
pub type SourceFactory = Arc<dyn Fn(&Policy) -> Arc<dyn MetricSource> + Send + Sync>;

/// What the API shows of one rollout; replaced after every decision.
#[derive(Clone, Debug, Serialize)]
pub struct RolloutView {
    pub name: String,
    /// The policy file the rollout comes from.
    pub file: String,
    pub model: String,
    pub stable: String,
    pub canary: String,
    pub phase: Phase,
    pub weight: f64,
    /// Current step counting from 1; 0 before the rollout starts.
    pub step: usize,
    pub steps: Vec<f64>,
    pub method: String,
    pub strategy: String,
    pub router: String,
    pub state: RolloutState,
    pub last_decision: Option<DecisionSummary>,
    /// Newest first.
    pub recent_analyses: VecDeque<AnalysisView>,
    /// The router's weight as last read, and its error if the last call failed.
    pub router_weight: Option<f64>,
    pub router_error: Option<String>,
    /// Whether the router confirmed the last decision's weight.
    pub applied: bool,
    /// Validation errors of the policy file's latest edit, while the last good version runs;
    /// for a stopped rollout, why it stopped and where traffic was left.
    pub policy_error: Option<String>,
    /// No valid policy file drives the rollout (deleted, renamed, with errors; `Orphaned`),
    /// and the router keeps the split it had; only `abort` acts on it. Shown until a file
    /// gives the rollout again (it then resumes) or another rollout takes its router.
    pub stopped: bool,
    /// The daemon runs with `--dry-run`: it never changes the router and keeps its state in
    /// memory only, so the weights and steps shown are what it would have set.
    pub dry_run: bool,
    /// Why the state store refused the last decision, while it does: nothing new is
    /// recorded, decisions that would send the canary more traffic are not applied, and those
    /// that send it less (a rollback, an abort) are applied anyway.
    pub store_error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecisionSummary {
    pub id: i64,
    pub at: Time,
    pub action: Action,
    pub reason: String,
    pub who: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AnalysisView {
    pub at: Time,
    pub action: Action,
    pub reports: Vec<MetricReport>,
}

/// The views of every rollout, shared with the API.
pub type Views = Arc<RwLock<BTreeMap<String, RolloutView>>>;

/// What the rest of the daemon can ask a rollout task.
pub enum Command {
    Operator {
        action: OperatorAction,
        who: String,
        why: String,
        reply: oneshot::Sender<Result<DecisionRecord, OperateError>>,
        /// Set by whichever comes first: the rollout taking the action, or its caller giving
        /// up waiting for that. An action its caller was told was not taken is never taken.
        taken: Arc<AtomicBool>,
    },
    Policy(Box<Policy>, String),
    PolicyError(String),
    /// No valid policy file drives the rollout any more (or why that is changed): stop
    /// driving it and leave traffic as it is, but keep serving `abort`, so that a rollback
    /// stays reachable.
    Orphan(Orphaned),
    /// A stopped rollout hands its router over to the rollout of this name, whose policy now
    /// names it, and ends: a file router's document then names the new rollout, with the
    /// split as it was, until the new rollout sets its first step.
    HandOver(String),
}

/// Everything rollout tasks share.
#[derive(Clone)]
pub struct Shared {
    pub store: Store,
    pub metrics: Metrics,
    pub clock: Arc<dyn Clock>,
    pub views: Views,
    pub routers: RouterFactory,
    pub sources: SourceFactory,
    pub http: reqwest::Client,
    /// Decide and record, but never touch the router.
    pub dry_run: bool,
    /// The shortest `strategy.interval` a policy may have (`policy::MIN_INTERVAL`, but for
    /// tests).
    pub min_interval: Duration,
}

/// The running rollouts, by name, and how to reach them.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<RwLock<BTreeMap<String, mpsc::Sender<Command>>>>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<mpsc::Sender<Command>> {
        self.inner.read().ok()?.get(name).cloned()
    }
    fn insert(&self, name: String, tx: mpsc::Sender<Command>) {
        if let Ok(mut m) = self.inner.write() {
            m.insert(name, tx);
        }
    }
    fn remove(&self, name: &str) -> Option<mpsc::Sender<Command>> {
        self.inner.write().ok()?.remove(name)
    }
    fn clear(&self) {
        if let Ok(mut m) = self.inner.write() {
            m.clear();
        }
    }
}

/// Sends an operator action to a rollout and waits for its decision.
pub async fn operate(
    registry: &Registry,
    name: &str,
    action: OperatorAction,
    who: String,
    why: String,
) -> Result<DecisionRecord, OperateError> {
    let tx = registry.get(name).ok_or(OperateError::NotFound)?;
    let (reply, mut rx) = oneshot::channel();
    let taken = Arc::new(AtomicBool::new(false));
    // A caller that goes away (a client that disconnects, the API's own timeout) withdraws
    // the action if the rollout has not taken it yet.
    let _withdraw = Withdraw(taken.clone());
    // A full queue is a rollout that has been busy for a while: said at once.
    tx.try_send(Command::Operator {
        action,
        who,
        why,
        reply,
        taken: taken.clone(),
    })
    .map_err(|_| OperateError::Busy)?;
    match tokio::time::timeout(OPERATE_QUEUE_WAIT, &mut rx).await {
        Ok(Ok(res)) => res,
        // The task ended without answering: it stopped before taking the action, or failed
        // while recording it.
        Ok(Err(_)) if taken.swap(true, Ordering::SeqCst) => Err(OperateError::Unconfirmed),
        Ok(Err(_)) => Err(OperateError::Busy),
        // The rollout is still busy with a router call (an analysis waiting on Prometheus
        // gives way at once): the action is withdrawn, so that "not taken" stays true.
        Err(_) if !taken.swap(true, Ordering::SeqCst) => Err(OperateError::Busy),
        // Taken just now: recording it is quick.
        Err(_) => match tokio::time::timeout(OPERATE_RECORD_WAIT, rx).await {
            Ok(Ok(res)) => res,
            _ => Err(OperateError::Unconfirmed),
        },
    }
}

/// A router call that changes traffic, given up when this replica's leadership term ends: by
/// then another replica may lead and set the traffic itself, and a call that arrived after
/// its would undo it (a slow webhook, an nginx reload, HAProxy's commands one by one). A
/// call already received by the router can still land after the term; this bounds how late.
async fn within_term<T>(
    store: &Store,
    call: impl Future<Output = Result<T, RouterError>>,
) -> Result<T, RouterError> {
    within(store.writes_until(), call).await
}

/// `call`, given up at `until` if that comes first.
async fn within<T>(
    until: Option<tokio::time::Instant>,
    call: impl Future<Output = Result<T, RouterError>>,
) -> Result<T, RouterError> {
    let Some(until) = until else {
        return call.await;
    };
    tokio::time::timeout_at(until, call)
        .await
        .unwrap_or_else(|_| {
            Err(RouterError::Unreachable(
                "the call was given up as this replica's leadership term ended; the next leader \
             sets the traffic"
                    .into(),
            ))
        })
}

/// Withdraws an operator action when its caller stops waiting, unless the rollout took it.
struct Withdraw(Arc<AtomicBool>);

impl Drop for Withdraw {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// How long an operator action waits for its rollout to take it (the rollout takes commands
/// between ticks, and while a tick is asking Prometheus), and then for the decision to be
/// recorded. Together below the API's request timeout.
const OPERATE_QUEUE_WAIT: Duration = Duration::from_secs(30);
const OPERATE_RECORD_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum OperateError {
    #[error("no such rollout")]
    NotFound,
    #[error("{0}")]
    Rejected(String),
    /// The rollout did not take the action in time; it never will.
    #[error(
        "the rollout is busy (a router call or a state store write not finished in {}s, or \
         actions queued before this one); nothing was done, try again",
        OPERATE_QUEUE_WAIT.as_secs()
    )]
    Busy,
    /// The rollout took the action but did not say what it decided in time.
    #[error(
        "the rollout took the action but did not confirm it in time; `canaryd status NAME` \
         shows whether it was recorded"
    )]
    Unconfirmed,
    /// The state store could not record the action's decision; `taken` whether the router
    /// took it all the same.
    #[error("{why}")]
    Unrecorded { why: String, taken: bool },
}

/// Decisions kept in memory while the store cannot record them (`Task::unlogged`).
const UNLOGGED_KEPT: usize = 16;

/// How long a scan waits for a stopped rollout to hand its router over before it leaves the
/// new rollout's start to the next scan.
const HAND_OVER_WAIT: Duration = Duration::from_secs(2);

/// Deliveries of one alert webhook event before it is given up.
const WEBHOOK_ATTEMPTS: u32 = 3;

/// One rollout's task.
struct Task {
    shared: Shared,
    policy: Policy,
    file: String,
    router: Result<Box<dyn Router>, RouterError>,
    source: Arc<dyn MetricSource>,
    state: RolloutState,
    applied: bool,
    /// Id of the last recorded decision, to mark it applied.
    last_id: Option<i64>,
    /// What the last commit could not record, if anything: the store's error and whether
    /// the decision was applied all the same.
    unrecorded: Option<Unrecorded>,
    /// Decisions taken while the store could not record them (an abort during an etcd
    /// outage), oldest first: recorded, with their times, before the next decision the store
    /// takes, so that the log keeps who acted and why.
    unlogged: Vec<(Decision, Time)>,
    router_failing_since: Option<Time>,
    /// Whether the last read of the router failed: a write that works then does not make the
    /// router a working one, as canaryd still cannot see where traffic goes.
    router_unreadable: bool,
    view: RolloutView,
    /// Why no policy drives the rollout any more, if none does: only `abort` then acts on it,
    /// with the router the policy last named.
    orphaned: Option<Orphaned>,
    /// Read back from the store, and the router not yet read since: the first read that works
    /// is checked against the stored weight (`Input::Resumed`).
    resumed: bool,
    /// True once the daemon shuts down: the tick under way finishes its router call but
    /// tries no other, so that a replica hands its leadership over without waiting out
    /// retries of a router that hangs.
    stopping: watch::Receiver<bool>,
}

/// A decision the state store could not record: why, for the operator, and whether the router
/// took it all the same.
struct Unrecorded {
    why: String,
    taken: bool,
}

/// Why a rollout's task runs without a policy file to drive it. It only serves `abort`,
/// through the router its policy last named, until a valid file defines the rollout again.
#[derive(Clone, Debug, PartialEq)]
pub enum Orphaned {
    /// Its policy file (this path, as shown) was deleted while the daemon ran.
    Deleted(String),
    /// Its policy file (this path) now gives another rollout's name.
    Renamed { file: String, to: String },
    /// Read from the store when a term began, before the first scan of the policies: a file
    /// that defines it resumes it at once. This was its last file.
    Starting(String),
    /// No policy file defined it when the daemon started; this was its last file.
    Missing(String),
    /// A policy file that gives its name (this path) has errors, or is refused.
    Invalid(String),
    /// The file with errors that gave its name (this path) no longer does.
    Unnamed(String),
}

impl Orphaned {
    /// What happened, for people.
    fn what(&self) -> String {
        match self {
            Orphaned::Deleted(f) => format!("policy file {f} deleted"),
            Orphaned::Renamed { file, to } => format!("policy file {file} renamed it to {to}"),
            Orphaned::Starting(f) | Orphaned::Missing(f) => {
                format!("no policy file defines this rollout (its last was {f})")
            }
            Orphaned::Invalid(f) => format!("policy file {f} has errors"),
            Orphaned::Unnamed(f) => {
                format!("policy file {f}, which had errors, no longer gives this rollout's name")
            }
        }
    }

    /// What brings the rollout back.
    fn remedy(&self) -> &'static str {
        match self {
            Orphaned::Invalid(_) => "fix the file",
            Orphaned::Deleted(_)
            | Orphaned::Renamed { .. }
            | Orphaned::Starting(_)
            | Orphaned::Missing(_)
            | Orphaned::Unnamed(_) => "restore the file",
        }
    }

    /// Whether `next` says more than this about why the rollout stands stopped: a file with
    /// errors keeps saying so until that file goes, loads or gives another name, and what the
    /// scan said stays.
    fn replaced_by(&self, next: &Orphaned) -> bool {
        match (self, next) {
            // `confirm_stopped` only settles what the scan left unsaid.
            (_, Orphaned::Missing(_)) => matches!(self, Orphaned::Starting(_)),
            (Orphaned::Invalid(f), Orphaned::Deleted(g) | Orphaned::Unnamed(g)) => f == g,
            (Orphaned::Invalid(_), _) | (_, Orphaned::Unnamed(_)) => false,
            _ => true,
        }
    }
}

/// The step people see: counting from 1, 0 before the start, never past the last step
/// (a promoting rollout's state is one past it).
pub fn shown_step(state: &RolloutState, steps: usize) -> usize {
    if state.phase == Phase::Idle {
        0
    } else {
        (state.step + 1).min(steps)
    }
}

fn strategy_kind(policy: &Policy) -> &'static str {
    if policy.strategy.is_blue_green() {
        "blue-green"
    } else {
        "canary"
    }
}

pub fn view_of(policy: &Policy, file: &str, state: &RolloutState) -> RolloutView {
    RolloutView {
        name: policy.name.clone(),
        file: file.to_owned(),
        model: policy.model.clone(),
        stable: state.stable.clone(),
        canary: state.canary.clone(),
        phase: state.phase,
        weight: state.weight,
        step: shown_step(state, policy.strategy.steps().len()),
        steps: policy.strategy.steps(),
        method: policy.analysis.method.as_str().to_owned(),
        strategy: strategy_kind(policy).to_owned(),
        router: policy.router.kind().to_owned(),
        state: state.clone(),
        last_decision: None,
        recent_analyses: VecDeque::new(),
        router_weight: None,
        router_error: None,
        applied: true,
        policy_error: None,
        stopped: false,
        dry_run: false,
        store_error: None,
    }
}

impl Task {
    fn target(&self) -> Target {
        Target {
            rollout: self.state.name.clone(),
            stable: self.state.stable.clone(),
            canary: self.state.canary.clone(),
            canary_weight: self.state.weight,
        }
    }

    /// Shows the state and the policy as they are now: every field that comes from the policy
    /// follows an edit (the router's kind too, once the rollout has moved to another router).
    fn publish(&mut self) {
        let v = &mut self.view;
        v.file = self.file.clone();
        v.model = self.policy.model.clone();
        v.stable = self.state.stable.clone();
        v.canary = self.state.canary.clone();
        v.phase = self.state.phase;
        v.weight = self.state.weight;
        v.step = shown_step(&self.state, self.policy.strategy.steps().len());
        v.steps = self.policy.strategy.steps();
        v.method = self.policy.analysis.method.as_str().to_owned();
        v.strategy = strategy_kind(&self.policy).to_owned();
        v.router = self.policy.router.kind().to_owned();
        v.state = self.state.clone();
        // The view shows the router's kind; its configuration may hold a webhook's secret.
        v.state.router = None;
        v.applied = self.applied;
        v.dry_run = self.shared.dry_run;
        v.state.policy = None;
        if let Some(orphaned) = &self.orphaned {
            // Where the router was last seen sending traffic, which is where it stays.
            let weight = v.router_weight.unwrap_or(v.weight);
            let remedy = orphaned.remedy();
            let next = match self.state.phase {
                Phase::RollingBack => format!("; {remedy} to resume it"),
                Phase::RolledBack => format!("; {remedy} and `canaryd retry` to run it again"),
                _ => format!("; `canaryd abort` still rolls it back; {remedy} to resume it"),
            };
            v.stopped = true;
            v.policy_error = Some(format!(
                "{}: rollout stopped, traffic left at {}% on the canary{next}",
                orphaned.what(),
                crate::rollout::fmt_pct(weight)
            ));
        }
        if let Ok(mut views) = self.shared.views.write() {
            views.insert(self.policy.name.clone(), v.clone());
        }
    }

    /// Reads the router's weight, tracking since when it has been failing.
    async fn read_router(&mut self, now: Time) -> RouterStatus {
        let target = self.target();
        let result = match &self.router {
            Ok(r) => {
                let started = tokio::time::Instant::now();
                let res = r.read(&target).await;
                self.shared.metrics.router_call(
                    &self.policy.name,
                    r.kind(),
                    "read",
                    started.elapsed().as_secs_f64(),
                    res.as_ref().err().map(RouterError::kind),
                );
                res
            }
            Err(e) => Err(RouterError::Config(e.to_string())),
        };
        self.router_unreadable = result.is_err();
        if self.shared.dry_run {
            // The view shows where the router really sends traffic, and whether it can be
            // read at all (a dry run is how a router's setup is tried out), while the
            // decisions go on as if it had taken every weight they chose.
            (self.view.router_weight, self.view.router_error) = match result {
                Ok(w) => (Some(w), None),
                Err(e) => (None, Some(e.to_string())),
            };
            // A rollout that has not started sees the real split, so that its start says
            // when the router already sent the canary traffic, as a real one would.
            let canary_weight = match self.view.router_weight {
                Some(w) if self.state.phase == Phase::Idle => w,
                _ => self.state.weight,
            };
            return RouterStatus::Ok { canary_weight };
        }
        match result {
            Ok(w) => {
                self.view.router_weight = Some(w);
                // A failed rollout leaves the router alone: a router that reads is simply
                // working again, whatever weight it sends.
                if (w - self.state.weight).abs() < 0.01 || self.state.phase == Phase::Failed {
                    self.router_failing_since = None;
                } else if let Some(since) = self.router_failing_since {
                    // It answers reads but did not take the last weight it was told: as much
                    // a failing router as one that cannot be read, deadline included.
                    let error = format!(
                        "it still sends {}% to the canary; applying {}% failed: {}",
                        crate::rollout::fmt_pct(w),
                        crate::rollout::fmt_pct(self.state.weight),
                        self.view.router_error.as_deref().unwrap_or("unknown error")
                    );
                    return RouterStatus::Failing {
                        since,
                        error,
                        confirmed: Some(w),
                    };
                }
                self.view.router_error = None;
                RouterStatus::Ok { canary_weight: w }
            }
            Err(e) => {
                let since = *self.router_failing_since.get_or_insert(now);
                self.view.router_error = Some(e.to_string());
                tracing::warn!(rollout = %self.policy.name, error = %e, "router read failed");
                RouterStatus::Failing {
                    since,
                    error: e.to_string(),
                    // The last weight a read or an apply confirmed.
                    confirmed: self.view.router_weight,
                }
            }
        }
    }

    /// Renames the router's owner to the rollout `to`, keeping the split it has (the lower of
    /// the rollout's weight and the router's last read one, if an advance was not taken): a
    /// file router answers only the rollout its document names, and the new rollout, which
    /// then sets its own first step, must be able to read it. One attempt, by a leader only.
    async fn hand_over(&mut self, to: &str) {
        let Ok(router) = &self.router else { return };
        if self.shared.dry_run || !self.shared.store.may_write() {
            return;
        }
        let weight = self
            .view
            .router_weight
            .map_or(self.state.weight, |w| w.min(self.state.weight));
        let target = Target {
            rollout: to.to_owned(),
            canary_weight: weight,
            ..self.target()
        };
        match within_term(&self.shared.store, router.apply(&target)).await {
            Ok(()) => {
                tracing::info!(rollout = %self.policy.name, to, weight = target.canary_weight, "router handed over to the rollout whose policy now names it");
            }
            Err(e) => {
                tracing::warn!(rollout = %self.policy.name, to, error = %e, "the router could not be handed over; the new rollout may find it owned by this one (`canaryd abort` on the new rollout takes it over)")
            }
        }
    }

    /// Before a policy edit moves the rollout to another router: a rollout still judging its
    /// canary sends the old router's traffic back to stable, so that traffic no one drives any
    /// more does not stay on an unproven canary. A promotion (the canary now serves all) and a
    /// failed rollout (left to the operator) keep the old router as it is. One attempt.
    async fn release_old_router(&mut self) {
        let judging = matches!(
            self.state.phase,
            Phase::Progressing | Phase::Paused | Phase::WaitingPromotion | Phase::RollingBack
        );
        let Ok(router) = &self.router else { return };
        if !judging || self.shared.dry_run || !self.shared.store.may_write() {
            if self.state.phase != Phase::Idle {
                tracing::warn!(rollout = %self.policy.name, phase = self.state.phase.as_str(), "the policy names another router; the old one is left as it is");
            }
            return;
        }
        let target = Target {
            canary_weight: 0.0,
            ..self.target()
        };
        match within_term(&self.shared.store, router.apply(&target)).await {
            Ok(()) => {
                tracing::info!(rollout = %self.policy.name, "the policy names another router: the old one now sends all traffic to stable")
            }
            Err(e) => {
                tracing::warn!(rollout = %self.policy.name, error = %e, "the policy names another router, and the old one could not be set to send all traffic to stable")
            }
        }
    }

    /// At startup: a rollout whose traffic was last set on another router than the policy's
    /// (the policy was edited while the daemon was down) releases that router as a live edit
    /// would.
    async fn release_router_from_before(&mut self) {
        let Some(old) = self.state.router.clone() else {
            return;
        };
        if self.drives_this_traffic(&old) || !self.state.matches(&self.policy) {
            return;
        }
        tracing::info!(rollout = %self.policy.name, old = old.kind(), new = self.policy.router.kind(), "the policy names another router than the one this rollout's traffic was last set on");
        let mut before = self.policy.clone();
        before.router = old;
        let router = (self.shared.routers)(&before);
        let policy = std::mem::replace(&mut self.policy, before);
        let current = std::mem::replace(&mut self.router, router);
        self.release_old_router().await;
        self.policy = policy;
        self.router = current;
    }

    /// Tells the router the current target, retrying with backoff within this tick.
    async fn apply(&mut self, now: Time) -> bool {
        if self.shared.dry_run {
            return true;
        }
        let target = self.target();
        let Ok(router) = &self.router else {
            self.router_failing_since.get_or_insert(now);
            return false;
        };
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=ROUTER_ATTEMPTS {
            if attempt > 1 && *self.stopping.borrow() {
                tracing::warn!(rollout = %self.policy.name, "shutting down: the router is not tried again");
                break;
            }
            if !self.shared.store.may_write() {
                // A replica whose leadership term may have ended leaves traffic to the next
                // leader: checked before every attempt, as retries take time.
                tracing::warn!(rollout = %self.policy.name, "not leading: the router is left alone");
                return false;
            }
            let started = tokio::time::Instant::now();
            let res = within_term(&self.shared.store, router.apply(&target)).await;
            self.shared.metrics.router_call(
                &self.policy.name,
                router.kind(),
                "apply",
                started.elapsed().as_secs_f64(),
                res.as_ref().err().map(RouterError::kind),
            );
            match res {
                Ok(()) => {
                    self.view.router_weight = Some(target.canary_weight);
                    if !self.router_unreadable {
                        self.router_failing_since = None;
                        self.view.router_error = None;
                    }
                    return true;
                }
                Err(e) => {
                    tracing::warn!(rollout = %self.policy.name, attempt, error = %e, weight = target.canary_weight, "router apply failed");
                    self.view.router_error = Some(e.to_string());
                    if attempt < ROUTER_ATTEMPTS {
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        }
        self.router_failing_since.get_or_insert(now);
        false
    }

    async fn observe(&self, now: Time, router: RouterStatus) -> Observation {
        let mut metrics = BTreeMap::new();
        // A state for another candidate is about to be replaced by a fresh rollout.
        let fresh;
        let state = if self.state.matches(&self.policy) {
            &self.state
        } else {
            fresh = RolloutState::new(&self.policy);
            &fresh
        };
        if state.wants_analysis(&self.policy) {
            let window = analysis_window(state, &self.policy, now, true);
            // The source reports each query's latency and errors to the metrics itself.
            metrics = self.source.observe(&self.policy, window).await;
            // A step's worth with too few canary events to judge (low traffic) reaches back to
            // the step's start: a long step holds more, and a rollout must not hold forever
            // for a count no capped window can reach.
            let whole_step = analysis_window(state, &self.policy, now, false);
            if whole_step.since < window.since {
                let thin: Vec<_> = self
                    .policy
                    .metrics
                    .iter()
                    .filter(|m| {
                        metrics
                            .get(&m.name)
                            .is_some_and(|r| r.canary_thin(m.min_samples))
                    })
                    .cloned()
                    .collect();
                if !thin.is_empty() {
                    let mut sub = self.policy.clone();
                    sub.metrics = thin;
                    metrics.extend(self.source.observe(&sub, whole_step).await);
                }
            }
        }
        // The gate is asked only when its answer decides: when everything else would
        // promote. A slow gate then never delays an analysis that rolls back or holds, and
        // is not asked for a promotion that is not yet possible.
        let would_promote = || {
            let trial = Observation {
                metrics: metrics.clone(),
                router: router.clone(),
                gate: Gate::Open,
            };
            decide(&self.policy, state, &Input::Tick(trial), now).action == Action::Promote
        };
        let gate = if state.wants_gate(&self.policy) && would_promote() {
            self.ask_gate().await
        } else {
            Gate::NotAsked
        };
        Observation {
            metrics,
            router,
            gate,
        }
    }

    /// Asks every `confirm-promotion` webhook in turn; the gate is open only when all of them
    /// answer 2xx, and the first that does not closes it.
    async fn ask_gate(&self) -> Gate {
        let mut asked = false;
        for hook in self
            .policy
            .webhooks
            .iter()
            .filter(|w| w.on == WebhookEvent::ConfirmPromotion)
        {
            asked = true;
            if let closed @ Gate::Closed { .. } = self.ask_one_gate(hook).await {
                return closed;
            }
        }
        if asked { Gate::Open } else { Gate::NotAsked }
    }

    async fn ask_one_gate(&self, hook: &policy::Webhook) -> Gate {
        let body = self.event_body("confirm-promotion", "asking to promote");
        let res = self
            .shared
            .http
            .post(&hook.url)
            .timeout(hook.timeout)
            .json(&body)
            .send()
            .await;
        // The reason is recorded and shown everywhere: the gate's URL can hold secrets in its
        // path or query, so only its origin is named, and reqwest's error without the URL.
        let gate = policy::url_origin(&hook.url);
        match res {
            Ok(r) if r.status().is_success() => Gate::Open,
            Ok(r) => Gate::Closed {
                reason: format!("the webhook at {gate} answered {}", r.status()),
            },
            Err(e) => Gate::Closed {
                reason: format!(
                    "the webhook at {gate} did not answer: {}",
                    error_chain(&e.without_url())
                ),
            },
        }
    }

    fn event_body(&self, event: &str, reason: &str) -> serde_json::Value {
        serde_json::json!({
            "event": event,
            "rollout": self.state.name,
            "model": self.policy.model,
            "stable": self.state.stable,
            "canary": self.state.canary,
            "phase": self.state.phase,
            "weight": self.state.weight,
            "step": shown_step(&self.state, self.policy.strategy.steps().len()),
            "reason": reason,
            // Whether the router has taken `weight` (false while it is failing: a `promote`
            // event then announces a decision traffic does not follow yet).
            "applied": self.applied,
            "router_error": self.view.router_error,
        })
    }

    /// Calls the policy's webhooks for a decision's event, without waiting for them.
    fn notify(&self, d: &Decision) {
        let event = match d.action {
            Action::Start | Action::Retry => WebhookEvent::Rollout,
            Action::Advance => WebhookEvent::Advance,
            Action::Promote => WebhookEvent::Promote,
            Action::Rollback => WebhookEvent::Rollback,
            Action::Fail => WebhookEvent::Failed,
            _ => return,
        };
        for hook in self.policy.webhooks.iter().filter(|w| w.on == event) {
            let name = WebhookEvent::ALL
                .iter()
                .find(|(_, e)| *e == event)
                .map_or("event", |(n, _)| n);
            let body = self.event_body(name, &d.reason);
            let req = self
                .shared
                .http
                .post(&hook.url)
                .timeout(hook.timeout)
                .json(&body);
            // Only the origin is logged: the URL can hold secrets in its path or query.
            let webhook = policy::url_origin(&hook.url);
            let rollout = self.policy.name.clone();
            tokio::spawn(async move {
                // A receiver that is briefly down or overloaded (no answer, 5xx, 429) gets the
                // event again, after 1 s and 4 s; any other answer is final.
                let mut delay = Duration::from_secs(1);
                for attempt in 1..=WEBHOOK_ATTEMPTS {
                    let Some(r) = req.try_clone() else { return };
                    let retry = match r.send().await {
                        Ok(r) if r.status().is_success() => return,
                        Ok(r) => {
                            let status = r.status();
                            let retry = status.is_server_error()
                                || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                            tracing::warn!(%rollout, event = %name, %webhook, %status, attempt, "webhook refused the event");
                            retry
                        }
                        Err(e) => {
                            tracing::warn!(%rollout, event = %name, %webhook, error = %error_chain(&e.without_url()), attempt, "webhook failed");
                            true
                        }
                    };
                    if !retry || attempt == WEBHOOK_ATTEMPTS {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
            });
        }
    }

    /// Persists a decision, then applies it, then publishes it.
    async fn commit(
        &mut self,
        mut d: Decision,
        now: Time,
        router_weight: Option<f64>,
    ) -> Option<DecisionRecord> {
        let prev = self.state.clone();
        if self.state.phase != Phase::Idle || d.state.phase != Phase::Idle {
            d.state.router = Some(self.policy.router.clone());
            d.state.policy = Some(Box::new(self.policy.clone()));
            d.state.file = Some(self.file.clone());
        }
        // Final phases tick forever without news; only changes and analyses are logged.
        // After a decision the store refused, the next one is recorded whatever it is, so
        // that the stored state catches up with the one in memory.
        let worth_logging = d.action != Action::Hold
            || !d.reports.is_empty()
            || d.state.phase != prev.phase
            || d.who.is_some()
            || self.view.store_error.is_some();
        let mut record = None;
        self.unrecorded = None;
        if worth_logging {
            let store = self.shared.store.clone();
            let dd = d.clone();
            let unlogged = std::mem::take(&mut self.unlogged);
            let recorded = tokio::task::spawn_blocking(move || {
                let mut left = unlogged.into_iter();
                while let Some((old, at)) = left.next() {
                    if let Err(e) = store.record(&old, at) {
                        return (Err(e), std::iter::once((old, at)).chain(left).collect());
                    }
                }
                (store.record(&dd, now), Vec::new())
            })
            .await;
            let recorded = match recorded {
                Ok((res, unlogged)) => {
                    self.unlogged = unlogged;
                    Ok(res)
                }
                Err(e) => Err(e),
            };
            match recorded {
                Ok(Ok(id)) => {
                    self.last_id = Some(id);
                    self.view.store_error = None;
                    record = Some(DecisionRecord::of(id, &d, now));
                }
                Ok(Err(crate::store::StoreError::NotLeader(why))) => {
                    // Fencing at work: this replica's term is over; the next leader decides.
                    tracing::warn!(rollout = %self.policy.name, why, "not leading any more: decision dropped");
                    self.unlogged.clear();
                    return None;
                }
                Ok(Err(e)) => {
                    self.shared.metrics.store_error(&self.policy.name);
                    self.view.store_error = Some(e.to_string());
                    // Without a durable record, a decision that sends the canary more traffic
                    // must not reach the router. One that sends it less (a rollback, an abort)
                    // goes ahead: rollback stays reachable even on a broken disk. It lives in
                    // memory only, so a restart before the store works again resumes from the
                    // last recorded decision.
                    // A new candidate's traffic is all new: its first step is compared with
                    // none, not with the weight the last candidate ended at (a promoted one's
                    // 100 %).
                    let same_versions =
                        prev.canary == d.state.canary && prev.stable == d.state.stable;
                    let before = if same_versions { prev.weight } else { 0.0 };
                    if d.weight > before || d.state.phase == Phase::Promoting {
                        tracing::error!(rollout = %self.policy.name, error = %e, "cannot record the decision; not applying it");
                        self.unrecorded = Some(Unrecorded {
                            why: format!(
                                "the state store could not record the decision, so nothing was changed: {e}"
                            ),
                            taken: false,
                        });
                        self.publish();
                        return None;
                    }
                    tracing::error!(rollout = %self.policy.name, error = %e, action = d.action.as_str(), weight = d.weight, "cannot record the decision; applying it all the same, as it sends the canary no more traffic");
                    // Kept for the log: actions and operators' decisions, not the holds in
                    // between, and no more than a screenful.
                    if d.action != Action::Hold || d.who.is_some() {
                        if self.unlogged.len() >= UNLOGGED_KEPT {
                            self.unlogged.remove(0);
                        }
                        self.unlogged.push((d.clone(), now));
                    }
                    self.unrecorded = Some(Unrecorded {
                        why: format!(
                            "the state store could not record the decision ({e}); it was taken all the same, as it sends the canary no more traffic, and is recorded once the store answers. A restart, or another replica taking over, before then resumes from the last recorded decision (pausing where the router sends the canary less than that): check `canaryd status`"
                        ),
                        taken: true,
                    });
                }
                Err(e) => {
                    tracing::error!(rollout = %self.policy.name, error = %e, "store task failed");
                    return None;
                }
            }
            self.view.last_decision = Some(DecisionSummary {
                id: self.last_id.unwrap_or_default(),
                at: now,
                action: d.action,
                reason: d.reason.clone(),
                who: d.who.clone(),
            });
            if !d.reports.is_empty() {
                self.view.recent_analyses.push_front(AnalysisView {
                    at: now,
                    action: d.action,
                    reports: d.reports.clone(),
                });
                self.view.recent_analyses.truncate(RECENT_ANALYSES);
            }
        }
        self.state = d.state.clone();
        self.shared
            .metrics
            .decision(&d, shown_step(&d.state, self.policy.strategy.steps().len()));
        // Every decision that moves traffic or changes the phase, a hold included (edited steps
        // bring the weight down with a hold).
        if d.action != Action::Hold || d.weight != prev.weight || d.state.phase != prev.phase {
            tracing::info!(rollout = %self.policy.name, action = d.action.as_str(), phase = d.state.phase.as_str(), weight = d.weight, reason = %d.reason, who = d.who.as_deref(), "decision");
        }
        // Idle rollouts own no traffic yet, and a failed one leaves the router to the operator
        // after its one attempt to keep the safe weight; everything else converges on the
        // desired weight.
        let needs_apply = match self.state.phase {
            Phase::Idle => false,
            Phase::Failed => d.action == Action::Fail,
            _ => router_weight.is_none_or(|w| {
                (w - d.weight).abs() >= 0.01 || d.weight != prev.weight || !self.applied
            }),
        };
        if needs_apply {
            if let Some(w) = router_weight
                && (w - d.weight).abs() >= 0.01
                && d.weight == prev.weight
                && self.applied
            {
                // Someone or something (a router restart) changed the split behind our back.
                tracing::warn!(rollout = %self.policy.name, router_weight = w, weight = d.weight, "the router sends another split than the rollout's; applying the rollout's again");
            }
            if d.weight != prev.weight || d.state.phase != prev.phase {
                // Shown at once, as not yet applied: a router that takes its time (retries of
                // a hung reload) must not leave the API showing the phase from before.
                self.applied = false;
                self.publish();
            }
            self.applied = self.apply(now).await;
            if !self.applied
                && let Some(unrecorded) = self.unrecorded.as_mut()
            {
                // Neither recorded nor applied: saying "applied" would send the operator away
                // from a canary that still has its traffic. The decision lives in this task
                // only, which goes on telling the router.
                let next = match &self.view.router_error {
                    Some(e) if self.shared.store.may_write() => format!(
                        "({e}): this replica keeps trying the router, but if it restarts or another replica takes over first, the action is lost"
                    ),
                    _ => "(this replica cannot confirm that it still leads, so it leaves the router alone): the action is lost, and the next leader decides".to_owned(),
                };
                unrecorded.why = format!(
                    "the state store could not record the decision, and the router has not taken it yet {next}; check `canaryd status` and repeat it once the store answers"
                );
                unrecorded.taken = false;
            }
        } else if self.state.phase == Phase::Failed {
            self.applied = router_weight.is_some_and(|w| (w - d.weight).abs() < 0.01);
        } else if self.state.phase != Phase::Idle {
            self.applied = true;
        }
        // After the router call, so that the event can say whether the router took the weight.
        if d.action != Action::Hold {
            self.notify(&d);
        }
        if self.applied && self.unrecorded.is_none() {
            if let Some(id) = self.last_id {
                let store = self.shared.store.clone();
                let name = self.policy.name.clone();
                // A lost mark is harmless: the state reads as unapplied and the next tick
                // re-applies the same weight. It is still worth knowing about.
                match tokio::task::spawn_blocking(move || store.mark_applied(&name, id)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(rollout = %self.policy.name, error = %e, "cannot mark the decision applied")
                    }
                    Err(e) => {
                        tracing::warn!(rollout = %self.policy.name, error = %e, "store task failed")
                    }
                }
            }
            if let Some(r) = record.as_mut() {
                r.applied = true;
            }
        }
        self.publish();
        record
    }

    /// One analysis and its decision. A command that arrives while Prometheus (or a gate) is
    /// being asked interrupts the tick, which has changed nothing yet, and is returned to be
    /// handled at once: an operator's abort never waits behind a slow or hung Prometheus.
    async fn tick(&mut self, commands: &mut mpsc::Receiver<Command>) -> Tick {
        let now = self.shared.clock.now();
        let router = self.read_router(now).await;
        let router_weight = match router {
            RouterStatus::Ok { canary_weight } => Some(canary_weight),
            RouterStatus::Failing { .. } => None,
        };
        if let Some(w) = router_weight
            && self.paused_on_resume(w, now).await
        {
            return Tick::Done(Vec::new());
        }
        // Commands that change nothing the analysis depends on wait for it, so that no
        // stream of them (a script retrying, a file touched over and over) starves it.
        let mut later = Vec::new();
        let obs = {
            let observing = self.observe(now, router);
            tokio::pin!(observing);
            loop {
                tokio::select! {
                    obs = &mut observing => break obs,
                    cmd = commands.recv() => match cmd.map(|c| self.triage(c)) {
                        Some(Triage::Answered) => {}
                        Some(Triage::Later(c)) => later.push(c),
                        Some(Triage::Cut(c)) => return Tick::Interrupted(Some(c), later),
                        None => return Tick::Interrupted(None, later),
                    },
                }
            }
        };
        let d = decide(&self.policy, &self.state, &Input::Tick(obs), now);
        self.commit(d, now, router_weight).await;
        Tick::Done(later)
    }

    /// Whether `router` moves the traffic this rollout's policy's router moves, for its
    /// versions (`RouterConfig::drives_same_traffic`).
    fn drives_this_traffic(&self, router: &policy::RouterConfig) -> bool {
        let versions = [self.policy.stable.as_str(), self.policy.canary.as_str()];
        router.drives_same_traffic(&self.policy.router, versions)
    }

    /// At the first router read that works after the task started from a stored, applied
    /// state: a router that sends the canary less (`router_weight`) is not raised again on
    /// its own (an abort the store could not record may be why), and the core pauses the
    /// rollout there. Only on the router the stored weight was set on: a policy moved to
    /// another router while the daemon was down finds that one at its own weight. Whether it
    /// paused.
    async fn paused_on_resume(&mut self, router_weight: f64, now: Time) -> bool {
        if !std::mem::take(&mut self.resumed) {
            return false;
        }
        let same_router = self
            .state
            .router
            .as_ref()
            .is_none_or(|r| self.drives_this_traffic(r));
        if !self.applied || !same_router || !self.state.matches(&self.policy) {
            return false;
        }
        let input = Input::Resumed { router_weight };
        let d = decide(&self.policy, &self.state, &input, now);
        if d.action != Action::Pause {
            return false;
        }
        tracing::warn!(rollout = %self.policy.name, router_weight, weight = self.state.weight, "the router sends the canary less than the last recorded decision set; paused rather than raising it again");
        self.commit(d, now, Some(router_weight)).await;
        true
    }

    /// What a command that arrives during an analysis does to it. It is cut short by a
    /// command that changes something: an operator action that applies, a policy other than
    /// the one being analysed, a hand-over, the rollout's stop. An action that does not apply
    /// is answered at once, and the rest wait for the analysis, so that no stream of them (a
    /// script retrying, a file touched over and over) starves it.
    fn triage(&self, cmd: Command) -> Triage {
        let cut = match &cmd {
            Command::Operator { taken, .. } if taken.load(Ordering::SeqCst) => false,
            Command::Operator {
                action, who, why, ..
            } => {
                let Some(reason) = self.refusal(*action, who, why, self.shared.clock.now()) else {
                    return Triage::Cut(cmd);
                };
                self.refused(*action, who, &reason);
                if let Command::Operator { reply, taken, .. } = cmd
                    && !taken.swap(true, Ordering::SeqCst)
                {
                    let _ = reply.send(Err(OperateError::Rejected(reason)));
                }
                return Triage::Answered;
            }
            Command::Policy(p, file) => **p != self.policy || *file != self.file,
            Command::HandOver(_) => true,
            Command::Orphan(_) => self.orphaned.is_none(),
            Command::PolicyError(_) => false,
        };
        if cut {
            Triage::Cut(cmd)
        } else {
            Triage::Later(cmd)
        }
    }

    async fn operator(
        &mut self,
        action: OperatorAction,
        who: String,
        why: String,
    ) -> Result<DecisionRecord, OperateError> {
        if let Some(reason) = self.stopped_refusal(action) {
            self.refused(action, &who, &reason);
            return Err(OperateError::Rejected(reason));
        }
        let now = self.shared.clock.now();
        let input = Input::Operator { action, who, why };
        let d = decide(&self.policy, &self.state, &input, now);
        if d.action == Action::Reject {
            self.refused(action, d.who.as_deref().unwrap_or_default(), &d.reason);
            return Err(OperateError::Rejected(d.reason));
        }
        let rec = self.commit(d, now, None).await;
        match (rec, self.unrecorded.take()) {
            (_, Some(Unrecorded { why, taken })) => Err(OperateError::Unrecorded { why, taken }),
            (Some(rec), None) => Ok(rec),
            // A replica whose term ended, or a store task that failed: see the log.
            (None, None) => Err(OperateError::Unrecorded {
                why: "the decision could not be recorded, and nothing was changed; see the daemon's log".into(),
                taken: false,
            }),
        }
    }

    /// Why an operator action does not apply now, if it does not: a stopped rollout takes
    /// only `abort`, and `decide` rejects what its phase does not take. Changes nothing.
    fn refusal(&self, action: OperatorAction, who: &str, why: &str, now: Time) -> Option<String> {
        if let Some(reason) = self.stopped_refusal(action) {
            return Some(reason);
        }
        let input = Input::Operator {
            action,
            who: who.to_owned(),
            why: why.to_owned(),
        };
        let d = decide(&self.policy, &self.state, &input, now);
        (d.action == Action::Reject).then_some(d.reason)
    }

    /// Why a stopped rollout refuses an action: it takes only `abort`.
    fn stopped_refusal(&self, action: OperatorAction) -> Option<String> {
        let orphaned = self
            .orphaned
            .as_ref()
            .filter(|_| action != OperatorAction::Abort)?;
        Some(format!(
            "{}: the rollout is stopped and only abort acts on it; {} to resume it",
            orphaned.what(),
            orphaned.remedy()
        ))
    }

    /// A refused action changes nothing and is recorded nowhere: the operator gets the reason
    /// in the answer, and the decision log keeps the rollout's own history rather than a flood
    /// of refusals. The metric counts it, as a number cannot crowd anything out.
    fn refused(&self, action: OperatorAction, who: &str, reason: &str) {
        tracing::info!(rollout = %self.policy.name, who, action = action.as_str(), reason, "operator action refused");
        self.shared.metrics.refused(&self.policy.name);
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        if self.orphaned.is_some() {
            // A rollout started stopped shows where its router sends traffic, not only what
            // the store says it was told.
            let now = self.shared.clock.now();
            self.read_router(now).await;
        }
        // One brought up from the store shows once the scan has said whether a file runs it:
        // most do, and a moment as "stopped" at every restart would only mislead.
        if !matches!(self.orphaned, Some(Orphaned::Starting(_))) {
            self.publish();
        }
        self.release_router_from_before().await;
        loop {
            // A stopped rollout (its file deleted) is left alone, except to finish a rollback
            // an operator asked for: the router must take it, and the phase settle.
            if self.orphaned.is_none() || self.state.phase == Phase::RollingBack {
                let (cut, later) = match self.tick(&mut commands).await {
                    Tick::Done(later) => (None, later),
                    Tick::Interrupted(cmd, later) => (Some(cmd), later),
                };
                // In the order they came: those that waited for the analysis, then the one
                // that cut it short, after which the analysis runs again at once.
                let mut again = cut.is_some();
                for cmd in later.into_iter().map(Some).chain(cut) {
                    match self.handle(cmd).await {
                        Flow::End => return,
                        Flow::TickNow => again = true,
                        Flow::Wait => {}
                    }
                }
                if again {
                    continue;
                }
            }
            let sleep = tokio::time::sleep(self.policy.strategy.interval);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = shutdown.changed() => return,
                    cmd = commands.recv() => match self.handle(cmd).await {
                        Flow::End => return,
                        Flow::TickNow => break,
                        Flow::Wait => {}
                    },
                }
            }
        }
    }

    /// What a command does to the task; `None` is the scan gone.
    async fn handle(&mut self, cmd: Option<Command>) -> Flow {
        match cmd {
            None => Flow::End,
            Some(Command::HandOver(to)) => {
                self.hand_over(&to).await;
                Flow::End
            }
            Some(Command::Operator {
                action,
                who,
                why,
                reply,
                taken,
            }) => {
                if taken.swap(true, Ordering::SeqCst) {
                    tracing::warn!(rollout = %self.policy.name, who = %who, action = action.as_str(), "operator action withdrawn: its caller stopped waiting while the rollout was busy; nothing was done");
                    return Flow::Wait;
                }
                let res = self.operator(action, who, why).await;
                let moving = res.is_ok()
                    && matches!(self.state.phase, Phase::RollingBack | Phase::Promoting);
                let _ = reply.send(res);
                // Tick now when the router has a weight to take: once it confirms the weight
                // the rollout settles, so a `retry` need not wait a whole interval.
                if moving { Flow::TickNow } else { Flow::Wait }
            }
            Some(Command::Policy(p, file)) => {
                let changed = *p != self.policy || file != self.file || self.orphaned.is_some();
                if p.router != self.policy.router {
                    if !self.drives_this_traffic(&p.router) {
                        self.release_old_router().await;
                        // Another router: how the old one failed, and what it sent, say
                        // nothing of it.
                        self.router_failing_since = None;
                        self.router_unreadable = false;
                        self.view.router_error = None;
                        self.view.router_weight = None;
                    }
                    self.router = (self.shared.routers)(&p);
                }
                if p.prometheus != self.policy.prometheus {
                    self.source = (self.shared.sources)(&p);
                }
                if let Some(was) = self.orphaned.take() {
                    // What a stopped task read of its router is no failure of the rollout's:
                    // its deadline starts when it runs again.
                    self.router_failing_since = None;
                    self.view.router_error = None;
                    let s = &self.state;
                    if matches!(was, Orphaned::Starting(_)) {
                        let step = shown_step(s, p.strategy.steps().len());
                        tracing::info!(rollout = %p.name, file = %file, phase = s.phase.as_str(), step, weight = s.weight, applied = self.applied, "resuming rollout from the store");
                    } else {
                        tracing::info!(rollout = %p.name, file = %file, phase = s.phase.as_str(), "policy file back; the rollout runs again");
                    }
                    self.view.stopped = false;
                } else {
                    tracing::info!(rollout = %p.name, file = %file, "policy updated");
                }
                self.policy = *p;
                self.file = file;
                self.view.policy_error = None;
                self.shared.metrics.policy_invalid(&self.policy.name, false);
                self.publish();
                // A file read again unchanged (touched, or fixed back to what runs) needs no
                // analysis before the interval's.
                if changed { Flow::TickNow } else { Flow::Wait }
            }
            Some(Command::PolicyError(e)) => {
                self.view.policy_error = Some(e);
                self.shared.metrics.policy_invalid(&self.policy.name, true);
                self.publish();
                Flow::Wait
            }
            Some(Command::Orphan(why)) => {
                // Its phase, weight and step series stay, like its view: the router may still
                // split traffic for it. A stopped rollout whose file has errors becomes
                // deleted only when that file goes.
                if self.orphaned.as_ref().is_some_and(|o| !o.replaced_by(&why)) {
                    return Flow::Wait;
                }
                let invalid = matches!(why, Orphaned::Invalid(_));
                self.orphaned = Some(why);
                self.shared
                    .metrics
                    .policy_invalid(&self.policy.name, invalid);
                self.publish();
                Flow::Wait
            }
        }
    }
}

/// How a tick ended, with the commands that came meanwhile and waited for it.
enum Tick {
    Done(Vec<Command>),
    /// Cut short by this command (`None`: the scan is gone) before anything changed.
    Interrupted(Option<Command>, Vec<Command>),
}

/// What a command that arrives during an analysis does to it (`Task::triage`).
enum Triage {
    /// An operator action that does not apply, refused at once.
    Answered,
    /// Handled once the analysis is done.
    Later(Command),
    /// Handled now; the analysis runs again after it.
    Cut(Command),
}

/// What a task does after a command.
enum Flow {
    /// Waits for the rest of its interval.
    Wait,
    /// Analyses again now.
    TickNow,
    /// Ends.
    End,
}

/// A rollout task as the scan knows it.
struct Started {
    /// Told when the scan stops the task, whose view then goes once it has ended; taken when
    /// it is.
    stopped: Option<oneshot::Sender<()>>,
    /// Closed once the task has ended and settled its view.
    done: oneshot::Receiver<()>,
}

/// The rollout tasks `run` started.
#[derive(Default)]
struct Tasks {
    set: tokio::task::JoinSet<()>,
    /// By rollout name, until the task has ended. A task told to stop finishes its tick first
    /// (it may still record, publish and call the router), so another task of that name starts
    /// only once it has ended: two tasks never drive one rollout, and a stopped task never
    /// publishes over its successor's view.
    started: BTreeMap<String, Started>,
    /// Rollouts whose policy file was deleted, with the router target they last had: their
    /// tasks stay to serve `abort` until a file defines them again (they resume) or another
    /// rollout takes their router (they end).
    orphans: BTreeMap<String, Option<RouterTarget>>,
}

impl Tasks {
    /// Whether a task of this rollout is still running or finishing its tick.
    fn busy(&mut self, name: &str) -> bool {
        let running = self
            .started
            .get_mut(name)
            .is_some_and(|t| matches!(t.done.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        if !running {
            self.started.remove(name);
            self.orphans.remove(name);
        }
        running
    }

    /// Forgets the tasks that have ended.
    fn reap(&mut self) {
        while self.set.try_join_next().is_some() {}
        self.started
            .retain(|_, t| matches!(t.done.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        let started = &self.started;
        self.orphans.retain(|name, _| started.contains_key(name));
    }

    /// Whether the rollout's task has ended, waiting at most `limit` for it.
    async fn ended_within(&mut self, name: &str, limit: Duration) -> bool {
        if let Some(t) = self.started.get_mut(name) {
            let _ = tokio::time::timeout(limit, &mut t.done).await;
        }
        !self.busy(name)
    }

    /// Ends a stopped rollout's task after it has handed its router over to rollout `to`; its
    /// view goes once it has ended. Says whether the task was still reachable.
    async fn hand_over(&mut self, registry: &Registry, name: &str, to: String) -> bool {
        if let Some(tell) = self.started.get_mut(name).and_then(|t| t.stopped.take()) {
            let _ = tell.send(());
        }
        match registry.remove(name) {
            Some(tx) => tx.send(Command::HandOver(to)).await.is_ok(),
            None => false,
        }
    }

    /// Leaves a rollout whose policy file was deleted to serve aborts only.
    async fn orphan(
        &mut self,
        registry: &Registry,
        name: &str,
        why: Orphaned,
        router: Option<RouterTarget>,
    ) {
        if let Some(tx) = registry.get(name)
            && tx.send(Command::Orphan(why)).await.is_ok()
        {
            self.orphans.insert(name.to_owned(), router);
        }
    }

    /// What a file whose latest version is refused or has errors keeps holding (see `scan`):
    /// the rollout it ran and its router, unless that rollout is stopped and the file no
    /// longer gives its name.
    fn held(
        &self,
        previous: Option<String>,
        router: Option<RouterTarget>,
        declared: Option<&str>,
    ) -> (Option<String>, Option<RouterTarget>) {
        match previous {
            Some(n) if self.orphans.contains_key(&n) && declared != Some(n.as_str()) => {
                (None, None)
            }
            previous => (previous, router),
        }
    }

    /// A stopped rollout (if `name` is one) that a policy file with errors, `file`, names:
    /// it says so, and that fixing the file resumes it.
    async fn mark_invalid(&mut self, registry: &Registry, name: &str, file: &str) {
        if let Some(router) = self.orphans.get(name).cloned() {
            let why = Orphaned::Invalid(file.to_owned());
            self.orphan(registry, name, why, router).await;
        }
    }

    /// A stopped rollout (if `name` is one) that the policy file with errors `file` no longer
    /// names.
    async fn unmark_invalid(&mut self, registry: &Registry, name: &str, file: &str) {
        if let Some(router) = self.orphans.get(name).cloned() {
            let why = Orphaned::Unnamed(file.to_owned());
            self.orphan(registry, name, why, router).await;
        }
    }

    /// A rollout, other than `name`, whose policy file was deleted and whose router target
    /// `target` is.
    fn orphan_on(&self, name: &str, target: &Option<RouterTarget>) -> Option<String> {
        target.as_ref()?;
        self.orphans
            .iter()
            .find(|(n, t)| n.as_str() != name && *t == target)
            .map(|(n, _)| n.clone())
    }
}

/// Records that a stopped rollout no longer owns the router its policy last named (another
/// rollout took it, or the rollout was renamed): a restarted daemon neither starts the
/// rollout stopped on that router nor releases the router to stable, and a policy that
/// brings the rollout back with another router resumes it there. A `hold` whose state has no
/// router, policy or file; left unapplied, so that a returning policy sets its weight again.
/// Nothing for a rollout that never drove a router, in a dry run, or off the leader.
async fn forget(shared: &Shared, state: &RolloutState, reason: String) {
    if state.router.is_none() || shared.dry_run || !shared.store.may_write() {
        return;
    }
    let mut state = state.clone();
    state.router = None;
    state.policy = None;
    state.file = None;
    state.message = format!("stopped: {reason}");
    let name = state.name.clone();
    let d = Decision {
        action: Action::Hold,
        weight: state.weight,
        reports: Vec::new(),
        reason,
        who: None,
        why: None,
        state,
    };
    let store = shared.store.clone();
    let now = shared.clock.now();
    match tokio::task::spawn_blocking(move || store.record(&d, now)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(rollout = %name, error = %e, "cannot record that the rollout no longer owns its router; a restarted daemon may show it stopped on that router")
        }
        Err(e) => tracing::warn!(rollout = %name, error = %e, "store task failed"),
    }
}

/// `forget` for a stopped rollout that handed its router over to rollout `to`, now that `to`
/// runs; not if a policy runs the rollout again meanwhile.
async fn forget_stored(shared: &Shared, registry: &Registry, name: &str, to: &str) {
    if registry.get(name).is_some() {
        return;
    }
    let store = shared.store.clone();
    let key = name.to_owned();
    match tokio::task::spawn_blocking(move || store.load(&key)).await {
        Ok(Ok(Some(stored))) => {
            let why = format!("its router was handed over to rollout {to}, whose policy names it");
            forget(shared, &stored.state, why).await;
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            tracing::warn!(rollout = %name, error = %e, "cannot read the state of the rollout that handed its router over")
        }
        Err(e) => tracing::warn!(rollout = %name, error = %e, "store task failed"),
    }
}

/// What is left of a rollout the scan stopped, once its task has ended (the task published
/// its last view before it saw the stop, so this comes after it): no policy defines it any
/// more, or another drives its router, and its view and series go.
fn settle(shared: &Shared, name: &str) {
    shared.metrics.forget(name);
    if let Ok(mut views) = shared.views.write() {
        views.remove(name);
    }
}

/// How a rollout task starts.
enum Start {
    /// From a policy file, with the rollout's stored state if it has one.
    File,
    /// Stopped, from the state `revive_stopped` read, for this reason.
    Stopped(Box<StoredRollout>, Orphaned),
}

/// Starts a rollout task for a valid policy; or says why it cannot, to be retried at the next
/// scan (the store may be unreachable for a moment, etcd in particular).
async fn spawn_rollout(
    shared: &Shared,
    registry: &Registry,
    policy: Policy,
    file: String,
    start: Start,
    shutdown: watch::Receiver<bool>,
    tasks: &mut Tasks,
) -> Result<(), String> {
    let (orphaned, read) = match start {
        Start::File => (None, None),
        Start::Stopped(stored, why) => (Some(why), Some(*stored)),
    };
    let store = shared.store.clone();
    let name = policy.name.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let state = match read {
            Some(stored) => Some(stored),
            None => store.load(&name)?,
        };
        // The newest decision, so the API shows it before the task decides anything (after a
        // restart, or on the replica that took over).
        let last = store.decisions(&name, 1, None)?.into_iter().next();
        Ok::<_, crate::store::StoreError>((state, last))
    })
    .await;
    // Starting over could move traffic the old state had settled; refuse instead.
    let (stored, last) = match stored {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            return Err(format!(
                "rollout {} not started: its stored state cannot be read ({e}); retried at the next scan",
                policy.name
            ));
        }
        Err(e) => return Err(format!("rollout {} not started: {e}", policy.name)),
    };
    let resumed = stored.is_some();
    let (state, applied) = match stored {
        Some(s) => {
            if orphaned.is_none() {
                let step = shown_step(&s.state, policy.strategy.steps().len());
                tracing::info!(rollout = %policy.name, phase = s.state.phase.as_str(), step, weight = s.state.weight, applied = s.applied, "resuming rollout from the store");
            }
            (s.state, s.applied)
        }
        None => (RolloutState::new(&policy), true),
    };
    let router = (shared.routers)(&policy);
    let router_kind = router.as_ref().map_or(policy.router.kind(), |r| r.kind());
    shared.metrics.init_rollout(&policy.name, router_kind);
    let step = shown_step(&state, policy.strategy.steps().len());
    shared.metrics.position(&state, state.weight, step);
    let mut view = view_of(&policy, &file, &state);
    view.last_decision = last.and_then(|d| {
        Some(DecisionSummary {
            id: d.id,
            at: d.at,
            action: *Action::ALL.iter().find(|a| a.as_str() == d.action)?,
            reason: d.reason,
            who: d.who,
        })
    });
    let task = Task {
        router,
        source: (shared.sources)(&policy),
        shared: shared.clone(),
        file,
        state,
        applied,
        last_id: None,
        unrecorded: None,
        unlogged: Vec::new(),
        router_failing_since: None,
        router_unreadable: false,
        view,
        policy,
        orphaned,
        resumed,
        stopping: shutdown.clone(),
    };
    let name = task.policy.name.clone();
    let (tx, rx) = mpsc::channel(16);
    let (stopped_tx, mut stopped_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    registry.insert(name.clone(), tx);
    let shared = shared.clone();
    let ended = name.clone();
    tasks.set.spawn(async move {
        task.run(rx, shutdown).await;
        // Stopped by the scan, rather than by the shutdown (which clears every view).
        if stopped_rx.try_recv().is_ok() {
            settle(&shared, &ended);
        }
        drop(done_tx);
    });
    tasks.started.insert(
        name,
        Started {
            stopped: Some(stopped_tx),
            done: done_rx,
        },
    );
    Ok(())
}

/// What the watcher knows of one policy file.
struct Known {
    /// The file's stamp at the last load; none for an entry the scan made up (a file waiting
    /// for a hand-over, a renamed file, a rollout's own file at startup), which is read again
    /// at the next scan whatever its stamp.
    stamp: Option<Stamp>,
    /// The files the last valid version read besides the policy file (its credentials), as
    /// they were then: a rotated secret reloads the policy.
    secrets: Vec<(PathBuf, Stamp)>,
    /// The error of the last load, if it failed. A failed load is retried at every scan (a
    /// credentials file it names may appear), but reported again only when the error changes.
    error: Option<String>,
    /// The rollout the file's last valid version runs, if one runs.
    name: Option<String>,
    /// What that version's router changes (none for a webhook router): no other policy may
    /// route it while this one runs.
    router: Option<RouterTarget>,
    /// The rollout this file's policy will run once the stopped rollout of a deleted policy
    /// has handed `router` over to it; no other policy may claim that router meanwhile.
    claiming: Option<String>,
    /// The stopped rollout handing the router over to this file's policy: once that policy
    /// runs, the stopped rollout's record forgets the router (`forget_stored`).
    handed_by: Option<String>,
}

/// A file's modification time and size, or `None`s for a file that cannot be read.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: Option<u64>,
}

impl Stamp {
    fn of(path: &Path) -> Stamp {
        let meta = std::fs::metadata(path).ok();
        Stamp {
            modified: meta.as_ref().and_then(|m| m.modified().ok()),
            len: meta.as_ref().map(std::fs::Metadata::len),
        }
    }
}

impl Known {
    /// Whether the policy file and the files it read are as they were at the last load.
    fn unchanged(&self, stamp: Stamp) -> bool {
        self.stamp == Some(stamp) && self.secrets.iter().all(|(p, s)| Stamp::of(p) == *s)
    }

    /// An entry that holds a rollout's name, a router, or a router claimed for a rollout,
    /// until the scan reads the file again.
    fn placeholder(
        name: Option<String>,
        router: Option<RouterTarget>,
        claiming: Option<String>,
        handed_by: Option<String>,
    ) -> Known {
        Known {
            stamp: None,
            secrets: Vec::new(),
            error: None,
            name,
            router,
            claiming,
            handed_by,
        }
    }
}

/// Policy files in a directory, sorted.
pub fn policy_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    out.sort();
    out
}

/// A policy file that runs no rollout, or whose latest version is refused while the last
/// good one runs, and why.
#[derive(Clone, Debug, Serialize)]
pub struct InvalidPolicy {
    /// The rollout name the file gives, when it can be read: `canaryd status NAME` then points
    /// to this error.
    pub name: Option<String>,
    pub error: String,
}

/// Policy files with errors, by file, for the API.
pub type PolicyErrors = Arc<RwLock<BTreeMap<String, InvalidPolicy>>>;

/// Runs the daemon's rollouts until `shutdown` turns true: loads the policies directory,
/// starts one task per valid policy, and polls the directory for edits every `poll`.
pub async fn run(
    shared: Shared,
    registry: Registry,
    policy_errors: PolicyErrors,
    dir: PathBuf,
    poll: Duration,
    ready: Arc<std::sync::atomic::AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = Tasks::default();
    let mut known: BTreeMap<PathBuf, Known> = BTreeMap::new();
    let mut revival = Revival::default();
    loop {
        if !revival.done() {
            revive_stopped(
                &shared,
                &registry,
                &known,
                &shutdown,
                &mut tasks,
                &mut revival,
            )
            .await;
            hold_own_files(&revival, &tasks, &dir, &mut known);
        }
        let starting = revival.started.iter().map(|(n, _)| n.clone()).collect();
        let own = revival
            .started
            .iter()
            .map(|(_, f)| PathBuf::from(f))
            .collect();
        let order = Order {
            own: &own,
            first: &starting,
        };
        scan(
            &shared,
            &registry,
            &policy_errors,
            &dir,
            &mut known,
            &shutdown,
            &mut tasks,
            order,
        )
        .await;
        confirm_stopped(&registry, &known, &mut tasks, &mut revival).await;
        ready.store(true, Ordering::SeqCst);
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.changed() => break,
        }
        // Reap tasks that ended, on their own or stopped.
        tasks.reap();
    }
    // Tasks see the same shutdown signal and finish their current tick.
    while tasks.set.join_next().await.is_some() {}
    // Nothing runs any more: a replica that stops leading shows no rollouts it no longer
    // drives, and the next term starts from what is stored.
    registry.clear();
    if let Ok(mut v) = shared.views.write() {
        for name in v.keys() {
            shared.metrics.forget(name);
        }
        v.clear();
    }
    if let Ok(mut e) = policy_errors.write() {
        e.clear();
    }
    shared.metrics.invalid_policy_files(0);
    ready.store(false, Ordering::SeqCst);
}

/// Phases in which a rollout may have traffic on its canary and is not done.
fn under_way(phase: Phase) -> bool {
    !matches!(phase, Phase::Idle | Phase::Promoted | Phase::RolledBack)
}

/// The last time a stored rollout did anything: of two on one router, the later one owns it.
fn last_active(state: &RolloutState) -> Option<Time> {
    [
        state.last_analysis_at,
        state.phase_since,
        state.started_at,
        state.weight_history.last().map(|w| w.at),
    ]
    .into_iter()
    .flatten()
    .max()
}

/// The stored rollouts a leadership term brings up stopped (see `revive_stopped`).
#[derive(Default)]
struct Revival {
    /// Whether the store's rollouts were listed.
    listed: bool,
    /// Why they could not be listed the last time (said once, not at every scan).
    list_error: Option<String>,
    /// Rollouts whose state could not be read yet, each with its last error (said once).
    pending: BTreeMap<String, Option<String>>,
    /// Brought up stopped before a scan, with their last policy file: the scan resumes those
    /// a file defines, and `confirm_stopped` says what is left.
    started: Vec<(String, String)>,
}

impl Revival {
    fn done(&self) -> bool {
        self.listed && self.pending.is_empty()
    }
}

/// Before the first scan of a leadership term (and before later ones, for states that could
/// not be read yet): every stored rollout under way (not idle, promoted or rolled back) with
/// the router and policy it last had starts stopped (`Orphaned::Starting`) from that policy,
/// serving only `abort`. The scan then treats it as it treats a rollout whose file was
/// deleted while the daemon ran: a file that gives its name resumes it, a file with errors
/// that gives its name says so, and another policy that takes its router takes it over
/// (`Command::HandOver`), so that a rollback stays reachable across restarts whatever
/// happened to the files meanwhile. Of two stored rollouts on one router the one that acted
/// last owns it; the other, and one whose router a running policy has, forget the router.
async fn revive_stopped(
    shared: &Shared,
    registry: &Registry,
    known: &BTreeMap<PathBuf, Known>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Tasks,
    revival: &mut Revival,
) {
    if !revival.listed {
        let store = shared.store.clone();
        let listed = match tokio::task::spawn_blocking(move || store.names()).await {
            Ok(names) => names.map_err(|e| e.to_string()),
            Err(e) => Err(format!("store task failed: {e}")),
        };
        match listed {
            Ok(names) => {
                revival.pending = names.into_iter().map(|n| (n, None)).collect();
                revival.listed = true;
                if revival.list_error.take().is_some() {
                    tracing::info!("the stored rollouts are listed again");
                }
            }
            Err(e) => {
                if revival.list_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "cannot list the stored rollouts; retried at every scan (said again only if the error changes)");
                    revival.list_error = Some(e);
                }
                return;
            }
        }
    }
    let mut found = Vec::new();
    let pending = std::mem::take(&mut revival.pending);
    // What was said of each, so that a failure is logged once.
    let said: BTreeMap<String, String> = pending
        .iter()
        .filter_map(|(n, e)| Some((n.clone(), e.clone()?)))
        .collect();
    for name in pending.into_keys() {
        if registry.get(&name).is_some() || tasks.busy(&name) {
            continue;
        }
        let store = shared.store.clone();
        let key = name.clone();
        let error = match tokio::task::spawn_blocking(move || store.load(&key)).await {
            Ok(Ok(stored)) => {
                found.extend(stored);
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("store task failed: {e}"),
        };
        if said.get(&name) != Some(&error) {
            tracing::warn!(rollout = %name, error = %error, "cannot read a stored rollout's state to see whether it is under way; retried at the next scan");
        }
        revival.pending.insert(name, Some(error));
    }
    let mut stopped: Vec<(Box<Policy>, StoredRollout)> = Vec::new();
    for stored in found {
        let state = &stored.state;
        // Without a router it never drove one, or gave it up.
        if !under_way(state.phase) || state.router.is_none() {
            continue;
        }
        match state.policy.clone().filter(|p| p.name == state.name) {
            Some(policy) => stopped.push((policy, stored)),
            None => {
                tracing::warn!(rollout = %state.name, phase = state.phase.as_str(), weight = state.weight, "a stored rollout is under way, but its state holds no policy this canaryd can read (an older version stored it): it runs again only when a policy file defines it")
            }
        }
    }
    stopped.sort_by_key(|(_, stored)| std::cmp::Reverse(last_active(&stored.state)));
    for (policy, stored) in stopped {
        let state = &stored.state;
        let target = policy.router.target();
        let running = target.as_ref().and_then(|t| {
            known
                .values()
                .find(|k| k.router.as_ref() == Some(t))
                .and_then(|k| k.claiming.clone().or_else(|| k.name.clone()))
                .filter(|owner| *owner != state.name)
        });
        if let Some(owner) = running.or_else(|| tasks.orphan_on(&state.name, &target)) {
            let why = format!("its router is rollout {owner}'s now");
            tracing::info!(rollout = %state.name, owner = %owner, "a stored rollout under way has no policy file, and its router is another rollout's now; it gives the router up");
            forget(shared, state, why).await;
            continue;
        }
        let name = state.name.clone();
        let last = state.file.clone().unwrap_or_else(|| "unknown".to_owned());
        let start = Start::Stopped(Box::new(stored), Orphaned::Starting(last.clone()));
        match spawn_rollout(
            shared,
            registry,
            *policy,
            last.clone(),
            start,
            shutdown.clone(),
            tasks,
        )
        .await
        {
            Ok(()) => {
                tasks.orphans.insert(name.clone(), target);
                revival.started.push((name, last));
            }
            Err(msg) => {
                if said.get(&name) != Some(&msg) {
                    tracing::warn!(rollout = %name, "{msg}");
                }
                revival.pending.insert(name, Some(msg));
            }
        }
    }
}

/// After a scan: the rollouts `revive_stopped` brought up that no file resumed stay stopped,
/// and say so (unless a file with errors that gives their name said more).
async fn confirm_stopped(
    registry: &Registry,
    known: &BTreeMap<PathBuf, Known>,
    tasks: &mut Tasks,
    revival: &mut Revival,
) {
    let mut waiting = Vec::new();
    for (name, last) in std::mem::take(&mut revival.started) {
        let Some(router) = tasks.orphans.get(&name).cloned() else {
            continue;
        };
        if registry.get(&name).is_none() {
            continue;
        }
        if known
            .values()
            .any(|k| k.claiming.as_deref() == Some(name.as_str()))
        {
            // A file runs it once the router it now names has been handed over to it.
            waiting.push((name, last));
            continue;
        }
        tracing::warn!(rollout = %name, last_file = %last, "a rollout under way has no valid policy file: stopped, traffic left as it is; `canaryd abort` still rolls it back");
        // Its last file runs another rollout now: renamed while the daemon was down.
        let why = match known.get(Path::new(&last)).and_then(|k| k.name.clone()) {
            Some(to) if to != name => Orphaned::Renamed { file: last, to },
            _ => Orphaned::Missing(last),
        };
        tasks.orphan(registry, &name, why, router).await;
    }
    revival.started = waiting;
}

/// Before the first scan after `revive_stopped`: the file each rollout it brought up last ran
/// from, if that file still gives the rollout's name, holds the rollout's name and router as
/// if it ran it, as it did before the restart. Another file that gives that name, or names
/// that router, is then refused as it was before (rather than win by coming first in the
/// directory), and the file itself, read again at the scan, resumes the rollout, or renames
/// it, or keeps it stopped with its errors.
fn hold_own_files(
    revival: &Revival,
    tasks: &Tasks,
    dir: &Path,
    known: &mut BTreeMap<PathBuf, Known>,
) {
    let files = policy_files(dir);
    for (name, last) in &revival.started {
        let path = PathBuf::from(last);
        if known.contains_key(&path)
            || !files.contains(&path)
            || policy::declared_name(&path).as_deref() != Some(name.as_str())
        {
            continue;
        }
        let router = tasks.orphans.get(name).cloned().flatten();
        known.insert(
            path,
            Known::placeholder(Some(name.clone()), router, None, None),
        );
    }
}

/// Why the daemon refuses a valid policy from `path`: another running policy has its rollout
/// name or its router target. `previous` is the rollout the file itself runs.
fn clash(
    registry: &Registry,
    known: &BTreeMap<PathBuf, Known>,
    orphans: &BTreeMap<String, Option<RouterTarget>>,
    path: &Path,
    policy: &Policy,
    previous: Option<&str>,
) -> Option<policy::PolicyError> {
    let others = || known.iter().filter(|(k, _)| k.as_path() != path);
    // A rollout whose file was deleted is this file's to resume; not one whose own file is
    // still there (see `hold_own_files`).
    let held = || others().any(|(_, v)| v.name.as_deref() == Some(policy.name.as_str()));
    if registry.get(&policy.name).is_some()
        && previous != Some(policy.name.as_str())
        && (!orphans.contains_key(&policy.name) || held())
    {
        let other = others()
            .find(|(_, v)| v.name.as_deref() == Some(policy.name.as_str()))
            .map_or_else(
                || "another policy file".to_owned(),
                |(k, _)| k.display().to_string(),
            );
        return Some(policy::name_clash(path, &policy.name, &other));
    }
    let target = policy.router.target()?;
    let (other_file, other) = others().find(|(_, v)| v.router.as_ref() == Some(&target))?;
    let other_name = other.claiming.as_deref().or(other.name.as_deref())?;
    Some(policy::router_clash(
        path,
        &target,
        other_name,
        &other_file.display().to_string(),
    ))
}

/// In which order a scan reads the policy files.
#[derive(Clone, Copy)]
struct Order<'a> {
    /// These files first: the files rollouts brought up from the store last ran from.
    own: &'a std::collections::BTreeSet<PathBuf>,
    /// Then files that give one of these rollout names (those rollouts, which their files
    /// resume before another file could take their router over); then the rest, each group
    /// by path.
    first: &'a std::collections::BTreeSet<String>,
}

#[allow(clippy::too_many_arguments)]
async fn scan(
    shared: &Shared,
    registry: &Registry,
    policy_errors: &PolicyErrors,
    dir: &Path,
    known: &mut BTreeMap<PathBuf, Known>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Tasks,
    order: Order<'_>,
) {
    let mut files = policy_files(dir);
    if !order.first.is_empty() {
        // A stable sort keeps each group by path.
        files.sort_by_cached_key(|f| {
            if order.own.contains(f) {
                0
            } else if policy::declared_name(f).is_some_and(|n| order.first.contains(&n)) {
                1
            } else {
                2
            }
        });
    }
    // Deleted files stop their rollouts without touching traffic.
    let gone: Vec<PathBuf> = known
        .keys()
        .filter(|k| !files.contains(k))
        .cloned()
        .collect();
    for path in gone {
        let file = path.display().to_string();
        let ran = match known.remove(&path) {
            Some(Known {
                name: Some(name),
                router,
                ..
            }) => {
                tracing::info!(rollout = %name, file = %file, "policy file deleted; rollout stopped, traffic left as it is; abort still rolls it back");
                let why = Orphaned::Deleted(file.clone());
                tasks.orphan(registry, &name, why, router).await;
                // A file with errors that gives its name says so now (its error, unchanged,
                // is not read again).
                let errors = policy_errors.read().map(|e| e.clone()).unwrap_or_default();
                for (other, invalid) in errors {
                    if other != file && invalid.name.as_deref() == Some(name.as_str()) {
                        tasks.mark_invalid(registry, &name, &other).await;
                    }
                }
                Some(name)
            }
            _ => None,
        };
        let invalid = policy_errors.write().ok().and_then(|mut e| e.remove(&file));
        // The file with errors of a stopped rollout (see `Orphaned::Invalid`).
        if let Some(name) = invalid
            .and_then(|i| i.name)
            .filter(|n| Some(n) != ran.as_ref())
            && let Some(router) = tasks.orphans.get(&name).cloned()
        {
            let why = Orphaned::Unnamed(file);
            tasks.orphan(registry, &name, why, router).await;
        }
    }
    for path in files {
        let stamp = Stamp::of(&path);
        let last = known.get(&path);
        if last.is_some_and(|k| k.error.is_none() && k.unchanged(stamp)) {
            continue;
        }
        let file = path.display().to_string();
        let previous = last.and_then(|k| k.name.clone());
        let previous_router = last.and_then(|k| k.router.clone());
        // What the file keeps holding while its latest version is refused or has errors: the
        // rollout it runs, and its router; for a stopped rollout (see `hold_own_files`) only
        // while the file still gives its name, since nothing runs from it.
        let last_error = last.and_then(|k| k.error.clone());
        // Stamps of the credentials files taken before they are read, so that a rotation
        // during the read shows as a change at the next scan.
        let before: Vec<(PathBuf, Stamp)> = last.map_or_else(Vec::new, |k| {
            k.secrets
                .iter()
                .map(|(p, _)| (p.clone(), Stamp::of(p)))
                .collect()
        });
        let loaded = policy::load_file_with_min_interval(&path, shared.min_interval);
        // A stopped rollout whose name this file gave while it had errors: no longer, if the
        // file now gives another name (or none).
        let invalid_before = policy_errors
            .read()
            .ok()
            .and_then(|e| e.get(&file).and_then(|i| i.name.clone()));
        let declared = match &loaded {
            Ok(p) => Some(p.name.clone()),
            Err(_) => policy::declared_name(&path),
        };
        if let Some(old) = &invalid_before
            && declared.as_ref() != Some(old)
        {
            tasks.unmark_invalid(registry, old, &file).await;
        }
        let secrets: Vec<(PathBuf, Stamp)> = loaded.as_ref().map_or_else(
            |_| Vec::new(),
            |p| {
                p.secret_files()
                    .into_iter()
                    .map(|f| {
                        let stamp = before
                            .iter()
                            .find(|(b, _)| b.as_path() == f)
                            .map_or_else(|| Stamp::of(f), |(_, s)| *s);
                        (f.to_path_buf(), stamp)
                    })
                    .collect()
            },
        );
        let mut handed_by = last.and_then(|k| k.handed_by.clone());
        let mut error = loaded.as_ref().err().map(ToString::to_string);
        if error.is_some() && error == last_error && declared == invalid_before {
            // Still failing the same way: nothing new to report.
            continue;
        }
        if let Ok(p) = &loaded
            && let Some(orphan) = tasks.orphan_on(&p.name, &p.router.target())
            && p.has_candidate()
            && clash(
                registry,
                known,
                &tasks.orphans,
                &path,
                p,
                previous.as_deref(),
            )
            .is_none()
        {
            // The router a deleted policy's rollout last drove is this policy's now, and this
            // policy will run: that rollout hands it over, with the split it had, and ends
            // (nothing could act on it without fighting this one), and this one takes it once
            // it has. A policy that would be refused, or would never start a rollout, leaves
            // the stopped rollout (and its abort) alone.
            if tasks.hand_over(registry, &orphan, p.name.clone()).await {
                tracing::info!(rollout = %orphan, by = %p.name, by_file = %file, "the router of a stopped rollout is taken by another policy; rollout ended");
            }
            // A hand-over is one router call: waited for a moment, so that the new rollout
            // starts in this scan rather than the next.
            if !tasks.ended_within(&orphan, HAND_OVER_WAIT).await {
                // Still handing over: the file is loaded again at the next scan, keeps the
                // rollout it runs, and holds the router meanwhile, so that no other file
                // claims it.
                let waiting = Known::placeholder(
                    previous.clone(),
                    p.router.target(),
                    Some(p.name.clone()),
                    Some(orphan),
                );
                known.insert(path, waiting);
                continue;
            }
            handed_by = Some(orphan);
        }
        let (name, router) = match loaded {
            Ok(p) => match clash(
                registry,
                known,
                &tasks.orphans,
                &path,
                &p,
                previous.as_deref(),
            ) {
                Some(refused) => {
                    // Like an invalid edit: the file's last good version (if any) keeps
                    // running. Retried at every scan (the other policy may go away), reported
                    // once.
                    let msg = refused.to_string();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        tracing::error!("{msg}");
                        if let Some(tx) = previous.as_ref().and_then(|n| registry.get(n)) {
                            let _ = tx.send(Command::PolicyError(msg.clone())).await;
                        }
                    }
                    if let Ok(mut e) = policy_errors.write() {
                        let invalid = InvalidPolicy {
                            name: Some(p.name.clone()),
                            error: msg.clone(),
                        };
                        e.insert(file.clone(), invalid);
                    }
                    // A file refused because another holds the name cannot resume that
                    // rollout: its note does not point here.
                    let name_held = known
                        .iter()
                        .any(|(k, v)| *k != path && v.name.as_deref() == Some(p.name.as_str()));
                    if !name_held {
                        tasks.mark_invalid(registry, &p.name, &file).await;
                    }
                    error = Some(msg);
                    tasks.held(previous, previous_router, declared.as_deref())
                }
                None => {
                    if let Ok(mut e) = policy_errors.write() {
                        e.remove(&file);
                    }
                    if let Some(old) = previous.as_ref().filter(|o| **o != p.name) {
                        // A renamed rollout is a different rollout: no policy defines the old
                        // one any more.
                        // It stops as if its file were deleted, and the file is read again at
                        // the next scan as a new one: a policy on its router takes it over.
                        tracing::info!(rollout = %old, file = %file, renamed = %p.name, "policy renamed; rollout stopped, traffic left as it is; abort still rolls it back");
                        let why = Orphaned::Renamed {
                            file: file.clone(),
                            to: p.name.clone(),
                        };
                        tasks
                            .orphan(registry, old, why, previous_router.clone())
                            .await;
                        // The file keeps the router meanwhile: a policy refused for it must
                        // not take it in between.
                        let claiming = Some(p.name.clone());
                        let renamed = Known::placeholder(None, previous_router, claiming, None);
                        known.insert(path, renamed);
                        continue;
                    }
                    let name = p.name.clone();
                    let target = p.router.target();
                    match registry.get(&name) {
                        Some(tx) => {
                            // An orphan (its file deleted) resumes with this file.
                            tasks.orphans.remove(&name);
                            let _ = tx.send(Command::Policy(Box::new(p), file.clone())).await;
                            if let Some(from) = handed_by.take() {
                                forget_stored(shared, registry, &from, &name).await;
                            }
                            (Some(name), target)
                        }
                        None if tasks.busy(&name) => {
                            // A stopped task of this name is finishing its tick: start at a
                            // later scan, once it has ended, as if the file were new.
                            tracing::debug!(rollout = %name, file = %file, "waiting for the rollout's stopped task to end");
                            known.remove(&path);
                            continue;
                        }
                        None => {
                            tracing::info!(rollout = %name, file = %file, "policy loaded");
                            let started = spawn_rollout(
                                shared,
                                registry,
                                p,
                                file.clone(),
                                Start::File,
                                shutdown.clone(),
                                tasks,
                            )
                            .await;
                            match started {
                                Ok(()) => {
                                    if let Some(from) = handed_by.take() {
                                        forget_stored(shared, registry, &from, &name).await;
                                    }
                                    (Some(name), target)
                                }
                                Err(msg) => {
                                    // Retried at every scan, said once.
                                    if last_error.as_deref() != Some(msg.as_str()) {
                                        tracing::error!(rollout = %name, "{msg}");
                                    }
                                    if let Ok(mut e) = policy_errors.write() {
                                        let invalid = InvalidPolicy {
                                            name: Some(name),
                                            error: msg.clone(),
                                        };
                                        e.insert(file.clone(), invalid);
                                    }
                                    error = Some(msg);
                                    (None, None)
                                }
                            }
                        }
                    }
                }
            },
            Err(e) => {
                let msg = e.to_string();
                let runs = previous
                    .as_ref()
                    .is_some_and(|n| !tasks.orphans.contains_key(n));
                let outcome = if runs {
                    "the last good version keeps running"
                } else {
                    "not started"
                };
                // One log line per problem: log shippers read lines.
                for problem in msg.lines() {
                    tracing::error!(file = %file, "invalid policy, {outcome}: {problem}");
                }
                if let Some(tx) = previous.as_ref().and_then(|n| registry.get(n)) {
                    let _ = tx.send(Command::PolicyError(msg.clone())).await;
                }
                if let Some(name) = &declared {
                    tasks.mark_invalid(registry, name, &file).await;
                }
                if let Ok(mut errs) = policy_errors.write() {
                    let invalid = InvalidPolicy {
                        name: declared.clone(),
                        error: msg,
                    };
                    errs.insert(file.clone(), invalid);
                }
                tasks.held(previous, previous_router, declared.as_deref())
            }
        };
        known.insert(
            path,
            Known {
                stamp: Some(stamp),
                secrets,
                error,
                name,
                router,
                claiming: None,
                handed_by,
            },
        );
    }
    if let Ok(e) = policy_errors.read() {
        shared.metrics.invalid_policy_files(e.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry with one rollout, `r`, whose commands the test receives itself.
    fn registry() -> (Registry, mpsc::Receiver<Command>) {
        let registry = Registry::default();
        let (tx, rx) = mpsc::channel(4);
        registry.insert("r".into(), tx);
        (registry, rx)
    }

    fn abort(registry: &Registry) -> impl Future<Output = Result<DecisionRecord, OperateError>> {
        operate(
            registry,
            "r",
            OperatorAction::Abort,
            "op".into(),
            "test".into(),
        )
    }

    /// The rollout finds the queued action withdrawn: it would not take it.
    async fn assert_withdrawn(rx: &mut mpsc::Receiver<Command>) {
        let Some(Command::Operator { taken, .. }) = rx.recv().await else {
            panic!("no command queued");
        };
        assert!(
            taken.swap(true, Ordering::SeqCst),
            "the rollout would take it"
        );
    }

    /// A rollout busy for longer than an operator waits never takes the action afterwards:
    /// the operator was told nothing was done.
    #[tokio::test(start_paused = true)]
    async fn an_action_its_caller_gave_up_on_is_never_taken() {
        let (registry, mut rx) = registry();
        let res = abort(&registry).await;
        assert!(matches!(res, Err(OperateError::Busy)), "{res:?}");
        assert_withdrawn(&mut rx).await;
    }

    struct NoSource;

    impl MetricSource for NoSource {
        fn observe<'a>(
            &'a self,
            _: &'a Policy,
            _: crate::source::Window,
        ) -> crate::router::BoxFuture<'a, BTreeMap<String, crate::observation::MetricReading>>
        {
            Box::pin(async { BTreeMap::new() })
        }
    }

    const TRIAGED: &str = "name: t\nstable: a\ncanary: b\nstrategy: {steps: [5, 50]}\n\
        metrics:\n  - {name: q, query: 'sum(up{version=\"{{version}}\"})', max: 1}\n\
        router: {file: {path: /tmp/t.json}}\n";

    /// A rollout task at its start, with a store in `dir`, no router and no metrics.
    fn idle_task(dir: &Path) -> Task {
        let policy = policy::load_str("t.yaml", TRIAGED).unwrap_or_else(|e| panic!("{e}"));
        let no_router = || Err(RouterError::Config("none".into()));
        let shared = Shared {
            store: Store::open(&dir.join("s.db")).expect("a store"),
            metrics: Metrics::new(prometheus::Registry::new()).expect("metrics"),
            clock: Arc::new(crate::time::SystemClock),
            views: Views::default(),
            routers: Arc::new(move |_| no_router()),
            sources: Arc::new(|_| Arc::new(NoSource)),
            http: reqwest::Client::new(),
            dry_run: false,
            min_interval: policy::MIN_INTERVAL,
        };
        let state = RolloutState::new(&policy);
        Task {
            view: view_of(&policy, "t.yaml", &state),
            router: no_router(),
            source: Arc::new(NoSource),
            shared,
            file: "t.yaml".into(),
            state,
            applied: true,
            last_id: None,
            unrecorded: None,
            unlogged: Vec::new(),
            router_failing_since: None,
            router_unreadable: false,
            policy,
            orphaned: None,
            resumed: false,
            stopping: watch::channel(false).1,
        }
    }

    fn operator(
        action: OperatorAction,
        taken: bool,
    ) -> (
        Command,
        oneshot::Receiver<Result<DecisionRecord, OperateError>>,
    ) {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Operator {
            action,
            who: "op".into(),
            why: "test".into(),
            reply,
            taken: Arc::new(AtomicBool::new(taken)),
        };
        (cmd, rx)
    }

    fn triaged(task: &Task, cmd: Command) -> &'static str {
        match task.triage(cmd) {
            Triage::Answered => "answered",
            Triage::Later(_) => "later",
            Triage::Cut(_) => "cut",
        }
    }

    /// Only what changes something cuts an analysis short; what does not waits for it, so
    /// that a stream of such commands (a file touched over and over, a script retrying an
    /// action) cannot keep an analysis from ever finishing; a refused action is answered at
    /// once.
    #[tokio::test]
    async fn an_analysis_is_cut_short_only_by_what_changes_something() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut task = idle_task(dir.path());
        let same = Box::new(task.policy.clone());
        assert_eq!(
            triaged(&task, Command::Policy(same.clone(), "t.yaml".into())),
            "later"
        );
        assert_eq!(triaged(&task, Command::PolicyError("bad".into())), "later");
        let mut edited = same.clone();
        edited.strategy.interval *= 2;
        assert_eq!(
            triaged(&task, Command::Policy(edited, "t.yaml".into())),
            "cut"
        );
        assert_eq!(
            triaged(&task, Command::Policy(same, "u.yaml".into())),
            "cut"
        );
        assert_eq!(triaged(&task, Command::HandOver("u".into())), "cut");
        let deleted = || Orphaned::Deleted("t.yaml".into());
        assert_eq!(triaged(&task, Command::Orphan(deleted())), "cut");

        // An action its caller gave up on is never taken, so it changes nothing now.
        let (gone, _) = operator(OperatorAction::Abort, true);
        assert_eq!(triaged(&task, gone), "later");
        let (abort, _) = operator(OperatorAction::Abort, false);
        assert_eq!(triaged(&task, abort), "cut");
        // Nothing is paused: refused, and told so without waiting.
        let (resume, mut answer) = operator(OperatorAction::Resume, false);
        assert_eq!(triaged(&task, resume), "answered");
        let answer = answer.try_recv().expect("answered at once");
        assert!(
            matches!(answer, Err(OperateError::Rejected(_))),
            "{answer:?}"
        );

        // A stopped rollout: stopping it again changes nothing, and only abort acts on it.
        task.orphaned = Some(deleted());
        assert_eq!(triaged(&task, Command::Orphan(deleted())), "later");
        let (pause, _) = operator(OperatorAction::Pause, false);
        assert_eq!(triaged(&task, pause), "answered");
        let (abort, _) = operator(OperatorAction::Abort, false);
        assert_eq!(triaged(&task, abort), "cut");
    }

    /// Review: a router call still running when the leadership term ended could land after
    /// the next leader had set the traffic. It is given up when the term ends.
    #[tokio::test(start_paused = true)]
    async fn a_router_call_is_given_up_when_the_term_ends() {
        let until = tokio::time::Instant::now() + Duration::from_secs(8);
        let hung = std::future::pending::<Result<(), RouterError>>();
        let res = within(Some(until), hung).await;
        assert!(
            matches!(&res, Err(RouterError::Unreachable(m)) if m.contains("leadership term ended")),
            "{res:?}"
        );
        assert_eq!(tokio::time::Instant::now(), until);
        let quick = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(())
        };
        assert!(
            within(
                Some(tokio::time::Instant::now() + Duration::from_secs(8)),
                quick
            )
            .await
            .is_ok()
        );
        // Without terms (one daemon), a call runs as long as the router's own timeout.
        let slow = async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        };
        assert!(within(None, slow).await.is_ok());
    }

    /// A rollout whose queue is full has been busy for a while: an action is answered busy
    /// at once, without waiting for a place, and is never queued.
    #[tokio::test(start_paused = true)]
    async fn a_full_queue_answers_busy_at_once() {
        let registry = Registry::default();
        let (tx, mut rx) = mpsc::channel(1);
        registry.insert("r".into(), tx.clone());
        tx.try_send(Command::PolicyError("queued before".into()))
            .expect("a place in the queue");
        let started = tokio::time::Instant::now();
        let res = abort(&registry).await;
        assert!(matches!(res, Err(OperateError::Busy)), "{res:?}");
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "answered without waiting"
        );
        assert!(matches!(rx.try_recv(), Ok(Command::PolicyError(_))));
        assert!(rx.try_recv().is_err(), "the action was not queued");
    }

    /// A caller that goes away before its wait runs out (a client that disconnects, the
    /// API's own timeout) withdraws its action as well.
    #[tokio::test(start_paused = true)]
    async fn an_action_whose_caller_went_away_is_never_taken() {
        let (registry, mut rx) = registry();
        let gone = tokio::time::timeout(Duration::from_secs(1), abort(&registry)).await;
        assert!(gone.is_err(), "the caller gave up first");
        assert_withdrawn(&mut rx).await;
    }

    /// An action the rollout took just as its caller's wait ran out is waited for, not
    /// reported as not taken.
    #[tokio::test(start_paused = true)]
    async fn an_action_taken_at_the_last_moment_is_answered() {
        let (registry, mut rx) = registry();
        let task = tokio::spawn(async move {
            let Some(Command::Operator { taken, reply, .. }) = rx.recv().await else {
                panic!("no command queued");
            };
            tokio::time::sleep(OPERATE_QUEUE_WAIT - Duration::from_millis(1)).await;
            assert!(!taken.swap(true, Ordering::SeqCst), "withdrawn too early");
            tokio::time::sleep(Duration::from_secs(5)).await;
            let _ = reply.send(Err(OperateError::Rejected("decided".into())));
        });
        let res = abort(&registry).await;
        assert!(
            matches!(&res, Err(OperateError::Rejected(r)) if r == "decided"),
            "{res:?}"
        );
        task.await.unwrap();
    }
}
