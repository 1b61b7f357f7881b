//! Properties of `decide` over random policies and random sequences of observations and
//! operator actions: weights stay within the current step, rollback stays reachable, nothing
//! is promoted blind, final phases stay final, and nothing panics.

use crate::builders::{T0, at, base, val};
use canaryd::observation::{
    Gate, Input, MetricReading, Observation, OperatorAction, Reading, RouterStatus, Sample,
};
use canaryd::policy::{OnNoData, Policy, StrategyKind, Webhook, WebhookEvent};
use canaryd::rollout::{Action, Phase, RolloutState, decide};
use canaryd::time::Time;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The knobs of a random policy; everything else is `BASE`'s.
#[derive(Clone, Debug)]
struct Knobs {
    steps: Vec<f64>,
    blue_green: bool,
    step_secs: u64,
    failure_limit: u32,
    deadline_secs: u64,
    on_no_data: OnNoData,
    manual: bool,
    watch_secs: u64,
    router_deadline_secs: u64,
    gate: bool,
    critical: (bool, bool),
    min_samples: u64,
}

fn knobs() -> impl Strategy<Value = Knobs> {
    (
        prop::collection::btree_set(1u32..=100, 1..5),
        any::<bool>(),
        1u64..=5,
        1u32..=4,
        5u64..=120,
        prop_oneof![
            Just(OnNoData::Hold),
            Just(OnNoData::Fail),
            Just(OnNoData::Pass)
        ],
        any::<bool>(),
        prop_oneof![Just(0u64), 60u64..=1200],
        1u64..=10,
        any::<bool>(),
        (any::<bool>(), any::<bool>()),
        prop_oneof![Just(100u64), Just(0u64), 1u64..=1000],
    )
        .prop_map(
            |(steps, blue_green, step, limit, deadline, ond, manual, watch, rd, gate, crit, ms)| {
                Knobs {
                    steps: steps.into_iter().map(f64::from).collect(),
                    blue_green,
                    step_secs: step * 30,
                    failure_limit: limit,
                    deadline_secs: deadline * 60,
                    on_no_data: ond,
                    manual,
                    watch_secs: watch,
                    router_deadline_secs: rd * 60,
                    gate,
                    critical: crit,
                    min_samples: ms,
                }
            },
        )
}

fn policy_of(k: &Knobs) -> Policy {
    let mut p = base();
    let s = &mut p.strategy;
    s.kind = if k.blue_green {
        StrategyKind::BlueGreen {
            bake: Duration::from_secs(k.step_secs),
        }
    } else {
        StrategyKind::Canary {
            steps: k.steps.clone(),
        }
    };
    s.min_step_duration = Duration::from_secs(k.step_secs);
    s.failure_limit = k.failure_limit;
    s.progress_deadline = Duration::from_secs(k.deadline_secs);
    s.on_no_data = k.on_no_data;
    s.manual_promotion = k.manual;
    s.post_promotion_watch = Duration::from_secs(k.watch_secs);
    s.router_deadline = Duration::from_secs(k.router_deadline_secs);
    if k.gate {
        p.webhooks.push(Webhook {
            on: WebhookEvent::ConfirmPromotion,
            url: "http://gate.internal/check".into(),
            timeout: Duration::from_secs(5),
        });
    }
    p.metrics[0].critical = k.critical.0;
    p.metrics[1].critical = k.critical.1;
    for m in &mut p.metrics {
        m.min_samples = k.min_samples;
    }
    p
}

/// What one version's reading of one metric looks like.
#[derive(Clone, Copy, Debug)]
enum R {
    Good,
    Bad,
    NoData,
    /// Good values over ten events: below most `min_samples`.
    Thin,
    Unavailable,
    Nan,
}

fn canary_reading() -> impl Strategy<Value = R> {
    prop_oneof![
        8 => Just(R::Good),
        1 => Just(R::Bad),
        1 => Just(R::NoData),
        1 => Just(R::Thin),
        1 => Just(R::Unavailable),
        1 => Just(R::Nan),
    ]
}

fn stable_reading() -> impl Strategy<Value = R> {
    prop_oneof![
        10 => Just(R::Good),
        1 => Just(R::Bad),
        1 => Just(R::NoData),
        1 => Just(R::Thin),
        1 => Just(R::Unavailable),
    ]
}

/// `(good, bad)` values of BASE's metrics.
const VALUES: [(&str, f64, f64); 2] = [("errors", 0.01, 0.5), ("latency", 0.2, 2.0)];

fn reading(r: R, metric: usize) -> Reading {
    let (_, good, bad) = VALUES[metric];
    match r {
        R::Good => val(good),
        R::Bad => val(bad),
        R::NoData => Reading::NoData,
        R::Thin => Reading::Data(Sample {
            value: Some(good),
            window_events: 10.0,
            ..Sample::default()
        }),
        R::Unavailable => Reading::Unavailable {
            error: "timeout".into(),
        },
        R::Nan => val(f64::NAN),
    }
}

/// Whether the canary had data a judge could use, by the policy's `min_samples`.
fn has_data(r: R, min_samples: u64) -> bool {
    match r {
        R::Good | R::Bad => true,
        R::Thin => 10 >= min_samples,
        R::NoData | R::Unavailable | R::Nan => false,
    }
}

#[derive(Clone, Debug)]
enum RouterSays {
    Echo,
    Weight(f64),
    /// Failing for this many seconds.
    Failing(u64),
}

#[derive(Clone, Debug)]
enum Ev {
    Tick {
        dt: u64,
        readings: [(R, R); 2],
        router: RouterSays,
        gate: Gate,
    },
    Op {
        dt: u64,
        action: OperatorAction,
    },
    /// Read back from the store, the router found at this weight.
    Resumed {
        dt: u64,
        router_weight: f64,
    },
}

fn event() -> impl Strategy<Value = Ev> {
    let router = prop_oneof![
        12 => Just(RouterSays::Echo),
        1 => prop_oneof![Just(0.0), Just(10.0), Just(50.0), Just(100.0), 0.0..=100.0f64]
            .prop_map(RouterSays::Weight),
        1 => (0u64..=600).prop_map(RouterSays::Failing),
    ];
    let gate = prop_oneof![
        Just(Gate::NotAsked),
        Just(Gate::Open),
        Just(Gate::Closed {
            reason: "503".into()
        }),
    ];
    let action = prop_oneof![
        Just(OperatorAction::Promote),
        Just(OperatorAction::Abort),
        Just(OperatorAction::Pause),
        Just(OperatorAction::Resume),
        Just(OperatorAction::Retry),
    ];
    prop_oneof![
        12 => (
            0u64..=120,
            ((stable_reading(), canary_reading()), (stable_reading(), canary_reading())),
            router,
            gate,
        )
            .prop_map(|(dt, (a, b), router, gate)| Ev::Tick {
                dt,
                readings: [a, b],
                router,
                gate,
            }),
        1 => (0u64..=60, action).prop_map(|(dt, action)| Ev::Op { dt, action }),
        1 => (0u64..=60, prop_oneof![Just(0.0), 0.0..=100.0f64])
            .prop_map(|(dt, router_weight)| Ev::Resumed { dt, router_weight }),
    ]
}

fn observation(
    readings: &[(R, R); 2],
    router: &RouterSays,
    gate: &Gate,
    s: &RolloutState,
    now: Time,
) -> Observation {
    let metrics = readings
        .iter()
        .enumerate()
        .map(|(i, (st, ca))| {
            (
                VALUES[i].0.to_owned(),
                MetricReading {
                    stable: reading(*st, i),
                    canary: reading(*ca, i),
                },
            )
        })
        .collect();
    let router = match router {
        RouterSays::Echo => RouterStatus::Ok {
            canary_weight: s.weight,
        },
        RouterSays::Weight(w) => RouterStatus::Ok { canary_weight: *w },
        RouterSays::Failing(secs) => RouterStatus::Failing {
            since: Time(now.0 - *secs as i64 * 1000),
            error: "down".into(),
            confirmed: None,
        },
    };
    Observation {
        metrics,
        router,
        gate: gate.clone(),
    }
}

/// Every metric bad on the canary (over 1000 events, at least any generated `min_samples`),
/// healthy stable, a router that applied the last decision.
fn all_bad(s: &RolloutState) -> Input {
    Input::Tick(observation(
        &[(R::Good, R::Bad), (R::Good, R::Bad)],
        &RouterSays::Echo,
        &Gate::NotAsked,
        s,
        at(0),
    ))
}

fn operator(action: OperatorAction) -> Input {
    Input::Operator {
        action,
        who: "prop".into(),
        why: "test".into(),
    }
}

/// The most weight the canary may have in `s`: its step's weight, 100 past the last step.
fn step_cap(p: &Policy, s: &RolloutState) -> f64 {
    p.strategy.steps().get(s.step).copied().unwrap_or(100.0)
}

/// Checks the weight invariants of one state.
fn check_weight(p: &Policy, s: &RolloutState, what: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        (0.0..=100.0).contains(&s.weight),
        "{what}: weight {} out of range",
        s.weight
    );
    prop_assert!(
        s.weight <= step_cap(p, s),
        "{what}: weight {} above step {}'s {} in {:?}",
        s.weight,
        s.step,
        step_cap(p, s),
        s.phase
    );
    match s.phase {
        Phase::RollingBack | Phase::RolledBack | Phase::Idle => {
            prop_assert_eq!(s.weight, 0.0, "{}: {:?} with canary traffic", what, s.phase)
        }
        Phase::Promoting | Phase::Promoted => {
            prop_assert_eq!(s.weight, 100.0, "{}: {:?} below 100", what, s.phase)
        }
        _ => {}
    }
    Ok(())
}

/// From every non-final phase some input leads to rolling-back or rolled-back: an abort
/// always, and, wherever the canary is being judged, failing analyses too.
fn check_rollback_reachable(p: &Policy, s: &RolloutState, now: Time) -> Result<(), TestCaseError> {
    if s.phase.is_final() || s.phase == Phase::RollingBack {
        return Ok(());
    }
    let d = decide(p, s, &operator(OperatorAction::Abort), now);
    prop_assert!(
        matches!(d.state.phase, Phase::RollingBack | Phase::RolledBack),
        "abort from {:?} gave {:?}: {}",
        s.phase,
        d.state.phase,
        d.reason
    );
    let judged = match s.phase {
        Phase::Progressing | Phase::Paused | Phase::WaitingPromotion => true,
        Phase::Promoting => s
            .promoted_at
            .is_some_and(|t| now.since(t) < p.strategy.post_promotion_watch),
        _ => false,
    };
    if judged {
        let mut st = s.clone();
        for _ in 0..p.strategy.failure_limit {
            st = decide(p, &st, &all_bad(&st), now).state;
            if st.phase != s.phase {
                break;
            }
        }
        prop_assert_eq!(
            st.phase,
            Phase::RollingBack,
            "{} failing analyses from {:?} did not roll back",
            p.strategy.failure_limit,
            s.phase
        );
    }
    Ok(())
}

fn run(k: &Knobs, events: &[Ev]) -> Result<(), TestCaseError> {
    let p = policy_of(k);
    let mut s = RolloutState::new(&p);
    let mut now = T0;
    // Metrics whose canary had usable data since the current step began, kept independently
    // of the state's own bookkeeping.
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for (i, ev) in events.iter().enumerate() {
        let (dt, input, data_now) = match ev {
            Ev::Tick {
                dt,
                readings,
                router,
                gate,
            } => {
                let t = Time(now + *dt as i64 * 1000);
                let data: BTreeSet<&str> = readings
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, c))| has_data(*c, k.min_samples))
                    .map(|(m, _)| VALUES[m].0)
                    .collect();
                (
                    *dt,
                    Input::Tick(observation(readings, router, gate, &s, t)),
                    data,
                )
            }
            Ev::Op { dt, action } => (*dt, operator(*action), BTreeSet::new()),
            Ev::Resumed { dt, router_weight } => (
                *dt,
                Input::Resumed {
                    router_weight: *router_weight,
                },
                BTreeSet::new(),
            ),
        };
        now += dt as i64 * 1000;
        let t = Time(now);
        let d = decide(&p, &s, &input, t);
        let what = format!("event {i} {ev:?} from {:?}: {}", s.phase, d.reason);
        prop_assert_eq!(d.weight, d.state.weight, "{}", what);
        check_weight(&p, &d.state, &what)?;
        // A rollout read back from the store never raises its traffic on what it finds.
        if let Input::Resumed { router_weight } = input {
            prop_assert!(d.weight <= s.weight, "{}", what);
            if router_weight + 0.01 >= s.weight {
                prop_assert_eq!(&d.state.phase, &s.phase, "{}", what);
                prop_assert_eq!(d.weight, s.weight, "{}", what);
            }
        }

        // Never promoted blind: every metric had data in the step that is being left.
        if matches!(input, Input::Tick(_)) && d.action == Action::Promote {
            for m in VALUES.iter().map(|v| v.0) {
                prop_assert!(
                    seen.contains(m) || data_now.contains(m),
                    "{what}: promoted without data for {m} since the step began"
                );
            }
        }

        // Final phases stay final: ticks change nothing, except that a failed rollout whose
        // canary is judged bad is rolled back; of the operator's actions only retry and abort
        // (the documented way back to stable from `promoted` and `failed`) apply.
        if s.phase.is_final() {
            match &input {
                Input::Tick(_) if s.phase == Phase::Failed && d.action == Action::Rollback => {
                    prop_assert_eq!(d.state.phase, Phase::RollingBack, "{}", what);
                    prop_assert_eq!(d.weight, 0.0, "{}", what);
                }
                Input::Tick(_) => {
                    prop_assert_eq!(d.state.phase, s.phase, "{}", what);
                    prop_assert_eq!(d.weight, s.weight, "{}", what);
                }
                Input::Resumed { .. } => {
                    prop_assert_eq!(d.state.phase, s.phase, "{}", what);
                    prop_assert_eq!(d.weight, s.weight, "{}", what);
                }
                Input::Operator { action, .. } => {
                    let allowed = matches!(
                        (action, s.phase),
                        (OperatorAction::Retry, Phase::RolledBack | Phase::Failed)
                            | (OperatorAction::Abort, Phase::Promoted | Phase::Failed)
                    );
                    if !allowed {
                        prop_assert_eq!(d.action, Action::Reject, "{}", what);
                        prop_assert_eq!(&d.state, &s, "{}", what);
                    }
                }
            }
        }

        let step_of = |s: &RolloutState| (s.attempt, s.step, s.step_started_at);
        if step_of(&d.state) != step_of(&s) {
            seen.clear();
        } else {
            seen.extend(data_now);
        }
        s = d.state;
        check_rollback_reachable(&p, &s, t)?;

        // A new candidate always starts a fresh rollout, whatever this one's phase.
        let mut next = p.clone();
        next.canary = "v9".into();
        let fresh = decide(&next, &s, &all_bad(&RolloutState::new(&next)), t);
        prop_assert_eq!(fresh.state.canary.as_str(), "v9");
        prop_assert_eq!(fresh.state.attempt, 1);
        prop_assert_eq!(fresh.action, Action::Start);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn rollout_invariants_hold_for_random_policies_and_inputs(
        k in knobs(),
        events in prop::collection::vec(event(), 1..80),
    ) {
        run(&k, &events)?;
    }

    /// `decide` is total: any state at all (a corrupted or hand-edited store, a policy edited
    /// under a running rollout) gives a decision, never a panic, and weights stay in range.
    #[test]
    fn decide_never_panics_on_arbitrary_states(
        k in knobs(),
        phase in prop::sample::select(Phase::ALL.to_vec()),
        step in 0usize..10,
        weight in prop_oneof![0.0..=100.0f64, Just(f64::NAN), Just(-1.0), Just(1e300)],
        times in prop::collection::vec(prop::option::of(-1_000_000i64..1_000_000_000), 4),
        failures in 0u32..10,
        ev in event(),
    ) {
        let p = policy_of(&k);
        let mut s = RolloutState::new(&p);
        s.phase = phase;
        s.step = step;
        s.weight = weight;
        s.safe_weight = weight;
        s.started_at = times[0].map(|t| Time(T0 + t));
        s.step_started_at = times[1].map(|t| Time(T0 + t));
        s.promoted_at = times[2].map(|t| Time(T0 + t));
        s.phase_since = times[3].map(|t| Time(T0 + t));
        s.consecutive_failures = failures;
        s.baseline = BTreeMap::from([("latency".to_owned(), 0.2)]);
        let input = match &ev {
            Ev::Tick { readings, router, gate, .. } => {
                Input::Tick(observation(readings, router, gate, &s, at(600)))
            }
            Ev::Op { action, .. } => operator(*action),
            Ev::Resumed { router_weight, .. } => Input::Resumed { router_weight: *router_weight },
        };
        let d = decide(&p, &s, &input, at(600));
        prop_assert_eq!(d.weight.to_bits(), d.state.weight.to_bits());
    }
}
