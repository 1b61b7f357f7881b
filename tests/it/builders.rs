//! Small builders for the decision-core tests: a base policy, observations, and `check`, which
//! runs a table of `(time, input, expected)` rows through `decide` one after the other.
#![allow(dead_code)]

use canaryd::observation::{
    Gate, Input, MetricReading, Observation, OperatorAction, Reading, RouterStatus, Sample,
};
use canaryd::policy::{self, Policy, StrategyKind, Webhook, WebhookEvent};
use canaryd::rollout::{Action, Decision, Phase, RolloutState, decide};
use canaryd::time::Time;
use std::collections::BTreeMap;
use std::time::Duration;

/// The start of every test timeline; rows give seconds after it.
pub const T0: i64 = 1_700_000_000_000;

pub fn at(secs: u64) -> Time {
    Time(T0 + secs as i64 * 1000)
}

/// Two steps of one minute, two metrics with absolute and relative bounds.
pub const BASE: &str = r#"
name: demo
stable: v1
canary: v2
strategy:
  steps: [10, 50]
  interval: 30s
  min_step_duration: 1m
  failure_limit: 2
  progress_deadline: 1h
  router_deadline: 5m
analysis: {method: threshold}
metrics:
  - name: errors
    builtin: error_rate
    max: 5%
    max_increase: 2pp
  - name: latency
    builtin: latency
    quantile: 0.99
    max: 500ms
    max_increase: 20%
router:
  file: {path: /tmp/demo.json}
"#;

pub fn load(yaml: &str) -> Policy {
    policy::load_str("test.yaml", yaml).unwrap_or_else(|e| panic!("test policy invalid:\n{e}"))
}

pub fn base() -> Policy {
    load(BASE)
}

pub fn with_limit(mut p: Policy, limit: u32) -> Policy {
    p.strategy.failure_limit = limit;
    p
}

pub fn manual(mut p: Policy) -> Policy {
    p.strategy.manual_promotion = true;
    p
}

pub fn watch(mut p: Policy, d: Duration) -> Policy {
    p.strategy.post_promotion_watch = d;
    p
}

pub fn blue_green(mut p: Policy, bake: Duration) -> Policy {
    p.strategy.kind = StrategyKind::BlueGreen { bake };
    p
}

pub fn gated(mut p: Policy) -> Policy {
    p.webhooks.push(Webhook {
        on: WebhookEvent::ConfirmPromotion,
        url: "http://gate.internal/check".into(),
        timeout: Duration::from_secs(10),
    });
    p
}

/// A reading with plenty of events (well above the builtins' default `min_samples` of 100).
pub fn val(v: f64) -> Reading {
    thin(v, 1000.0)
}

/// A reading with `events` events in the window.
pub fn thin(v: f64, events: f64) -> Reading {
    Reading::Data(Sample {
        value: Some(v),
        window_events: events,
        ..Sample::default()
    })
}

pub fn no_data() -> Reading {
    Reading::NoData
}

pub fn unavailable() -> Reading {
    Reading::Unavailable {
        error: "prometheus: connection refused".into(),
    }
}

/// What the router reports in a tick.
#[derive(Clone, Debug)]
pub enum RouterSays {
    /// The weight of the state before the decision: a router that applied the last decision.
    Echo,
    Weight(f64),
    /// Failing since this many seconds after `T0`.
    FailingSince(u64),
    /// Failing since then, having last confirmed this weight (reads work, applies fail).
    Refusing(u64, f64),
}

/// An observation under construction; the router's answer is resolved against the state.
#[derive(Clone, Debug)]
pub struct Obs {
    pub metrics: BTreeMap<String, MetricReading>,
    pub router: RouterSays,
    pub gate: Gate,
    /// Whether the canary's windows keep growing, as a step's window does while the canary
    /// gets traffic (see `resolve`).
    pub growing: bool,
}

impl Obs {
    /// Every metric of `BASE` healthy on both versions: 1 % errors, 200 ms p99.
    pub fn good() -> Obs {
        Obs {
            metrics: BTreeMap::new(),
            router: RouterSays::Echo,
            gate: Gate::NotAsked,
            growing: true,
        }
        .set("errors", val(0.01), val(0.01))
        .set("latency", val(0.2), val(0.2))
    }

    pub fn set(mut self, metric: &str, stable: Reading, canary: Reading) -> Obs {
        self.metrics
            .insert(metric.into(), MetricReading { stable, canary });
        self
    }

    /// Replaces the canary's reading of one metric.
    pub fn canary(mut self, metric: &str, canary: Reading) -> Obs {
        let stable = self
            .metrics
            .get(metric)
            .map_or(Reading::NoData, |m| m.stable.clone());
        self.metrics
            .insert(metric.into(), MetricReading { stable, canary });
        self
    }

    /// Replaces stable's reading of one metric.
    pub fn stable(mut self, metric: &str, stable: Reading) -> Obs {
        let canary = self
            .metrics
            .get(metric)
            .map_or(Reading::NoData, |m| m.canary.clone());
        self.metrics
            .insert(metric.into(), MetricReading { stable, canary });
        self
    }

    /// Every metric of both versions reads the same.
    pub fn all(mut self, r: Reading) -> Obs {
        for m in self.metrics.values_mut() {
            m.stable = r.clone();
            m.canary = r.clone();
        }
        self
    }

    pub fn router(mut self, w: f64) -> Obs {
        self.router = RouterSays::Weight(w);
        self
    }

    pub fn failing(mut self, since: u64) -> Obs {
        self.router = RouterSays::FailingSince(since);
        self
    }

    pub fn refusing(mut self, since: u64, confirmed: f64) -> Obs {
        self.router = RouterSays::Refusing(since, confirmed);
        self
    }

    pub fn gate(mut self, g: Gate) -> Obs {
        self.gate = g;
        self
    }

    /// The canary gets no traffic: its windows keep the counts they were given, whenever
    /// they are read.
    pub fn stalled(mut self) -> Obs {
        self.growing = false;
        self
    }

    /// The observation at `now`. A growing canary window gains a fiftieth of an event per
    /// second since `T0` on top of its count, as a step's window keeps gaining events while
    /// the canary serves: too few to change any verdict, enough to show traffic.
    pub fn resolve(&self, state: &RolloutState, now: Time) -> Observation {
        let mut metrics = self.metrics.clone();
        if self.growing {
            let gained = now.since(Time(T0)).as_secs_f64() / 50.0;
            for m in metrics.values_mut() {
                if let Reading::Data(s) = &mut m.canary {
                    s.window_events += gained;
                }
            }
        }
        Observation {
            metrics,
            router: match self.router {
                RouterSays::Echo => RouterStatus::Ok {
                    canary_weight: state.weight,
                },
                RouterSays::Weight(w) => RouterStatus::Ok { canary_weight: w },
                RouterSays::FailingSince(s) => RouterStatus::Failing {
                    since: at(s),
                    error: "connection refused".into(),
                    confirmed: None,
                },
                RouterSays::Refusing(s, w) => RouterStatus::Failing {
                    since: at(s),
                    error: "the router refused the change".into(),
                    confirmed: Some(w),
                },
            },
            gate: self.gate.clone(),
        }
    }
}

pub fn good() -> Obs {
    Obs::good()
}

/// The canary's error rate at 10 %: above `max: 5%` and stable + 2pp.
pub fn bad() -> Obs {
    Obs::good().canary("errors", val(0.10))
}

pub fn closed() -> Gate {
    Gate::Closed {
        reason: "gate answered 503".into(),
    }
}

/// One input of a table row.
#[derive(Clone, Debug)]
pub enum Do {
    Tick(Obs),
    Op(OperatorAction),
}

pub fn tick(o: Obs) -> Do {
    Do::Tick(o)
}

pub fn op(a: OperatorAction) -> Do {
    Do::Op(a)
}

/// What a row expects of the decision.
#[derive(Clone, Debug)]
pub struct Expect {
    pub action: Action,
    pub phase: Phase,
    pub weight: f64,
    pub failures: Option<u32>,
    pub reason: Option<&'static str>,
}

pub fn expect(action: Action, phase: Phase, weight: f64) -> Expect {
    Expect {
        action,
        phase,
        weight,
        failures: None,
        reason: None,
    }
}

impl Expect {
    /// Also expects this many consecutive failures after the decision.
    pub fn failures(mut self, n: u32) -> Expect {
        self.failures = Some(n);
        self
    }

    /// Also expects the reason to contain this text.
    pub fn reason(mut self, text: &'static str) -> Expect {
        self.reason = Some(text);
        self
    }
}

/// One row: at `secs` after `T0`, feed `input`, expect `expect`.
pub type Row = (u64, Do, Expect);

/// Turns a row's input into `decide`'s input for the current state.
pub fn input(d: &Do, state: &RolloutState, now: Time) -> Input {
    match d {
        Do::Tick(o) => Input::Tick(o.resolve(state, now)),
        Do::Op(a) => Input::Operator {
            action: *a,
            who: "tester".into(),
            why: "table".into(),
        },
    }
}

/// Feeds rows without expectations; returns the state after the last.
pub fn drive(policy: &Policy, state: RolloutState, rows: &[(u64, Do)]) -> RolloutState {
    rows.iter().fold(state, |s, (t, d)| {
        decide(policy, &s, &input(d, &s, at(*t)), at(*t)).state
    })
}

/// Runs the rows in order through `decide`, each from the state the previous one left, and
/// checks every expectation. Returns the last decision for further checks.
pub fn check(case: &str, policy: &Policy, state: RolloutState, rows: &[Row]) -> Decision {
    let mut state = state;
    let mut last = None;
    for (i, (t, d, e)) in rows.iter().enumerate() {
        let dec = decide(policy, &state, &input(d, &state, at(*t)), at(*t));
        let got = (dec.action, dec.state.phase, dec.weight);
        let want = (e.action, e.phase, e.weight);
        assert_eq!(
            got, want,
            "{case}: row {i} (t={t}s, {d:?}): got {got:?}, want {want:?}; reason: {}",
            dec.reason
        );
        assert_eq!(
            dec.weight, dec.state.weight,
            "{case}: row {i}: decision weight differs from the state's"
        );
        if let Some(n) = e.failures {
            assert_eq!(
                dec.state.consecutive_failures, n,
                "{case}: row {i} (t={t}s): consecutive failures; reason: {}",
                dec.reason
            );
        }
        if let Some(text) = e.reason {
            assert!(
                dec.reason.contains(text),
                "{case}: row {i} (t={t}s): reason {:?} lacks {text:?}",
                dec.reason
            );
        }
        state = dec.state.clone();
        last = Some(dec);
    }
    last.unwrap_or_else(|| panic!("{case}: no rows"))
}
