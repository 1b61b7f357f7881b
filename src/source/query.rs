//! PromQL text for the model-server convention and for raw query templates. Pure: no I/O.
//!
//! Every builtin query asks for both versions at once (`version=~"stable|canary"`, grouped
//! `by (version)`), so stable and canary are read at the same evaluation time from the same
//! data. Only raw templates run once per version, because the template itself selects one.
//!
//! Counters are read with `increase()` over a range that ends at the evaluation time, so a
//! model server that restarts (and resets its counters) mid-rollout does not break the counts.
//!
//! For the Mann–Whitney judge, [`series_plan`] turns the same queries into a range query whose
//! value at each step is the metric over that step alone: the per-interval series.

use super::Window;
use crate::policy::{Convention, MetricKind, MetricSpec, Policy};
use crate::time::Time;
use std::time::Duration;

/// The shortest range a query covers by default.
///
/// `increase()` needs at least two samples in its range and extrapolates from the samples it
/// finds, so a range of one or two scrape intervals gives counts that are noisy or absent.
/// Sixty seconds is four scrapes at Prometheus's common 15 s interval. A window that starts
/// less than this before the evaluation time (a step that just began) is widened to it, so the
/// first analysis of a step also sees the end of the previous step.
pub const DEFAULT_MIN_RANGE: Duration = Duration::from_secs(60);

/// The ranges the queries of one analysis cover, in whole seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ranges {
    /// From the step's start (`Window::since`) to the evaluation time.
    pub window: Duration,
    /// From the rollout's start (`Window::rollout_started`) to the evaluation time, exactly:
    /// never widened, or its counts would include events from before the rollout (a previous
    /// attempt's errors) and, while the widened range slides, stop growing.
    pub cumulative: Duration,
}

impl Ranges {
    /// The ranges of `w`, rounded up to whole seconds: the window at least `min` but never
    /// back before the rollout began (a previous attempt's events are not this one's: a retry
    /// right after a rollback would read the bad canary's last minute), the cumulative range
    /// at least one second (too short for `increase()` to find two samples, so no counts
    /// until a second scrape falls inside it).
    pub fn new(w: &Window, min: Duration) -> Ranges {
        let step = ceil_secs(w.at.since(w.since));
        let cumulative = ceil_secs(w.at.since(w.rollout_started)).max(1);
        let window = step.max(ceil_secs(min).min(cumulative));
        Ranges {
            window: Duration::from_secs(window),
            cumulative: Duration::from_secs(cumulative),
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A range as PromQL writes it: `300s`.
pub fn range(d: Duration) -> String {
    format!("{}s", ceil_secs(d))
}

/// `s` as a double-quoted PromQL string literal.
pub fn string_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    push_escaped(&mut out, s);
    out.push('"');
    out
}

/// Escapes `s` for the inside of a double-quoted PromQL string (Go escape rules).
fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
}

/// `s` with RE2 metacharacters escaped, so that it matches only itself in `=~`.
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The label matchers shared by every builtin query: the model, and both versions.
fn matchers(c: &Convention, model: &str, versions: &[&str]) -> String {
    let mut alternatives: Vec<String> = Vec::new();
    for v in versions {
        let e = regex_escape(v);
        if !alternatives.contains(&e) {
            alternatives.push(e);
        }
    }
    format!(
        "{}={},{}=~{}",
        c.model_label,
        string_literal(model),
        c.version_label,
        string_literal(&alternatives.join("|"))
    )
}

/// The queries of one metric, ready to send.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// A counter split by a label into events of interest and the rest: error rate (split by
    /// outcome) or accuracy (split by correctness). One query for the window, one since the
    /// rollout began.
    Split {
        /// The label the counter is split by.
        label: String,
        /// The label value that marks an event of interest (an error, a correct prediction).
        value: String,
        /// Whether the marked events are the bad ones (errors) or the good ones (correct
        /// predictions). The metric's value is the share of marked events either way.
        marked_is_bad: bool,
        window: String,
        cumulative: String,
    },
    /// The latency quantile, the window's request count and the cumulative histogram.
    Latency {
        /// The quantile asked for, in (0, 1).
        quantile: f64,
        quantile_query: String,
        window_total: String,
        buckets: String,
    },
    /// A raw template, once per version: `(version, query)` for stable, then canary.
    Template { stable: String, canary: String },
}

impl Plan {
    /// Every query, in the order they are listed in reports.
    pub fn queries(&self) -> Vec<&str> {
        match self {
            Plan::Split {
                window, cumulative, ..
            } => vec![window, cumulative],
            Plan::Latency {
                quantile_query,
                window_total,
                buckets,
                ..
            } => vec![quantile_query, window_total, buckets],
            Plan::Template { stable, canary } => vec![stable, canary],
        }
    }
}

/// The queries of `spec` in `policy` over `ranges`.
pub fn plan(policy: &Policy, spec: &MetricSpec, ranges: Ranges) -> Plan {
    let c = &policy.convention;
    let m = matchers(c, &policy.model, &[&policy.stable, &policy.canary]);
    let w = range(ranges.window);
    let cum = range(ranges.cumulative);
    let vl = &c.version_label;
    match &spec.kind {
        MetricKind::ErrorRate | MetricKind::Accuracy => {
            let (series, label, value, marked_is_bad) = if spec.kind == MetricKind::ErrorRate {
                (&c.requests, &c.outcome_label, &c.error_value, true)
            } else {
                (&c.scored, &c.correct_label, &c.correct_value, false)
            };
            let counts =
                |r: &str| format!("sum by ({vl}, {label}) (increase({series}{{{m}}}[{r}]))");
            Plan::Split {
                label: label.clone(),
                value: value.clone(),
                marked_is_bad,
                window: counts(&w),
                cumulative: counts(&cum),
            }
        }
        MetricKind::Latency { quantile } => {
            let d = &c.duration;
            Plan::Latency {
                quantile: *quantile,
                quantile_query: format!(
                    "histogram_quantile({quantile}, sum by ({vl}, le) (increase({d}_bucket{{{m}}}[{w}])))"
                ),
                window_total: format!("sum by ({vl}) (increase({d}_count{{{m}}}[{w}]))"),
                buckets: format!("sum by ({vl}, le) (increase({d}_bucket{{{m}}}[{cum}]))"),
            }
        }
        MetricKind::Query { template } => Plan::Template {
            stable: render_template(template, &policy.model, &policy.stable, ranges.window),
            canary: render_template(template, &policy.model, &policy.canary, ranges.window),
        },
    }
}

/// For an error rate or accuracy: the label that marks events, the value that marks them, and
/// a query for every value that label has on the model's series of both versions now (one
/// series per value). `None` for other metrics.
pub fn marked_values(policy: &Policy, spec: &MetricSpec) -> Option<(String, String, String)> {
    let c = &policy.convention;
    let (series, label, value) = match spec.kind {
        MetricKind::ErrorRate => (&c.requests, &c.outcome_label, &c.error_value),
        MetricKind::Accuracy => (&c.scored, &c.correct_label, &c.correct_value),
        _ => return None,
    };
    let m = matchers(c, &policy.model, &[&policy.stable, &policy.canary]);
    let query = format!("count by ({label}) ({series}{{{m}}})");
    Some((label.clone(), value.clone(), query))
}

/// The most evaluation times Prometheus allows in one range query (per series); it refuses a
/// query that asks for more.
pub const MAX_RANGE_POINTS: i64 = 11_000;

/// The evaluation times of the range query behind a metric's per-interval series: `end`,
/// `end - step`, ... down to `start`. The value at time `t` covers `(t - step, t]`, so the
/// intervals tile the end of the analysis window without overlapping and without reaching
/// before its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Steps {
    pub start: Time,
    pub end: Time,
    /// The interval of each value, in whole seconds.
    pub step: Duration,
}

impl Steps {
    /// The steps over `w`'s analysis window (`since` to `at`): intervals of half `min_range`
    /// rounded up to whole seconds, widened when the window would need more than
    /// [`MAX_RANGE_POINTS`]. `None` when not even one interval fits in the window.
    ///
    /// `min_range` is the shortest range of the instant queries, four scrape intervals (see
    /// [`DEFAULT_MIN_RANGE`]); half of it is two, the shortest range in which `increase()`
    /// still finds the two samples it needs. The interval is kept that short because the
    /// Mann–Whitney judge wants many values per step (the benchmark gives it one per scrape),
    /// and the values it reads (shares of events, quantiles) do not depend on how far
    /// `increase()` extrapolates, which scales every series of an interval alike.
    pub fn new(w: &Window, min_range: Duration) -> Option<Steps> {
        let span_ms = w.at.0.checked_sub(w.since.0)?;
        let min_s = i64::try_from(ceil_secs(min_range / 2))
            .unwrap_or(i64::MAX)
            .max(1);
        // The smallest whole number of seconds that keeps the count of intervals in bounds.
        let widest_s = (span_ms / 1000 + MAX_RANGE_POINTS - 1) / MAX_RANGE_POINTS;
        let step_s = min_s.max(widest_s);
        let n = span_ms / step_s.saturating_mul(1000);
        if n < 1 {
            return None;
        }
        let step = Duration::from_secs(u64::try_from(step_s).ok()?);
        Some(Steps {
            start: Time(w.at.0 - (n - 1) * step_s * 1000),
            end: w.at,
            step,
        })
    }

    /// How many values each series of the answer holds at most.
    pub fn points(&self) -> i64 {
        (self.end.0 - self.start.0) / (i64::try_from(self.step.as_secs()).unwrap_or(1) * 1000) + 1
    }
}

/// The range query whose value at each step is one version's metric over that step alone.
#[derive(Clone, Debug, PartialEq)]
pub enum SeriesPlan {
    /// Counts split by a label per step; each step's value is the share of marked events, as
    /// [`Plan::Split`]'s window value is.
    Split {
        label: String,
        value: String,
        query: String,
    },
    /// The latency quantile per step; NaN at a step without requests.
    Latency { query: String },
    /// A raw template per version with `{{window}}` set to one step: stable, then canary.
    Template { stable: String, canary: String },
}

impl SeriesPlan {
    /// Every query, in the order they are listed in reports.
    pub fn queries(&self) -> Vec<&str> {
        match self {
            SeriesPlan::Split { query, .. } | SeriesPlan::Latency { query } => vec![query],
            SeriesPlan::Template { stable, canary } => vec![stable, canary],
        }
    }
}

/// The per-interval series of `spec` with intervals of `step`: the window queries of [`plan`]
/// with the window set to one step, so that both read the metric alike.
pub fn series_plan(policy: &Policy, spec: &MetricSpec, step: Duration) -> SeriesPlan {
    let one_step = Ranges {
        window: step,
        cumulative: step,
    };
    match plan(policy, spec, one_step) {
        Plan::Split {
            label,
            value,
            window,
            ..
        } => SeriesPlan::Split {
            label,
            value,
            query: window,
        },
        Plan::Latency { quantile_query, .. } => SeriesPlan::Latency {
            query: quantile_query,
        },
        Plan::Template { stable, canary } => SeriesPlan::Template { stable, canary },
    }
}

/// Fills a raw query's `{{version}}`, `{{model}}` and `{{window}}` (spaces inside the braces
/// allowed). Templates put versions and models inside string literals, so those are escaped
/// as string contents; unknown variables are left as written (validation rejects them).
pub fn render_template(template: &str, model: &str, version: &str, window: Duration) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        match after[..end].trim() {
            "version" => push_escaped(&mut out, version),
            "model" => push_escaped(&mut out, model),
            "window" => out.push_str(&range(window)),
            _ => out.push_str(&rest[start..start + 2 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Bounds, MetricSpec};
    use crate::time::Time;

    fn policy(stable: &str, canary: &str) -> Policy {
        let yaml = "name: fraud\nstable: v1\ncanary: v2\n\
                    strategy: {steps: [10, 50], interval: 30s}\n\
                    metrics:\n  - {name: e, builtin: error_rate, max: 1%}\n\
                    router: {file: {path: /tmp/fraud.json}}\n";
        let mut p = crate::policy::load_str("t.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
        // Set after validation, which rejects a canary equal to stable.
        p.stable = stable.into();
        p.canary = canary.into();
        p
    }

    fn spec(kind: MetricKind) -> MetricSpec {
        MetricSpec {
            name: "m".into(),
            kind,
            bounds: Bounds::default(),
            min_samples: 0,
            critical: false,
        }
    }

    const R: Ranges = Ranges {
        window: Duration::from_secs(300),
        cumulative: Duration::from_secs(3600),
    };

    #[test]
    fn ranges_round_up_and_clamp() {
        let at = Time(1_000_000);
        let w = |since: i64, started: i64| Window {
            at,
            since: Time(since),
            rollout_started: Time(started),
        };
        let min = Duration::from_secs(60);
        let cases = [
            // (since, rollout_started) -> (window s, cumulative s)
            (w(1_000_000 - 300_000, 1_000_000 - 3_600_000), (300, 3600)),
            (w(1_000_000 - 299_001, 1_000_000 - 3_600_500), (300, 3601)),
            // A step that just began reads the last minute, but never from before the
            // rollout began: a rollout five seconds old has five seconds of data.
            (w(1_000_000 - 5_000, 1_000_000 - 5_000), (5, 5)),
            (w(1_000_000 - 5_000, 1_000_000 - 45_000), (45, 45)),
            (w(1_000_000 - 5_000, 1_000_000 - 600_000), (60, 600)),
            // Times after the evaluation time are treated as "just now".
            (w(2_000_000, 2_000_000), (1, 1)),
        ];
        for (window, (ws, cs)) in cases {
            let r = Ranges::new(&window, min);
            assert_eq!(
                (r.window.as_secs(), r.cumulative.as_secs()),
                (ws, cs),
                "{window:?}"
            );
        }
    }

    #[test]
    fn builtin_queries_golden() {
        let p = policy("v1", "v2");
        let cases = [
            (
                MetricKind::ErrorRate,
                vec![
                    r#"sum by (version, outcome) (increase(model_requests_total{model="fraud",version=~"v1|v2"}[300s]))"#,
                    r#"sum by (version, outcome) (increase(model_requests_total{model="fraud",version=~"v1|v2"}[3600s]))"#,
                ],
            ),
            (
                MetricKind::Accuracy,
                vec![
                    r#"sum by (version, correct) (increase(model_predictions_scored_total{model="fraud",version=~"v1|v2"}[300s]))"#,
                    r#"sum by (version, correct) (increase(model_predictions_scored_total{model="fraud",version=~"v1|v2"}[3600s]))"#,
                ],
            ),
            (
                MetricKind::Latency { quantile: 0.99 },
                vec![
                    r#"histogram_quantile(0.99, sum by (version, le) (increase(model_request_duration_seconds_bucket{model="fraud",version=~"v1|v2"}[300s])))"#,
                    r#"sum by (version) (increase(model_request_duration_seconds_count{model="fraud",version=~"v1|v2"}[300s]))"#,
                    r#"sum by (version, le) (increase(model_request_duration_seconds_bucket{model="fraud",version=~"v1|v2"}[3600s]))"#,
                ],
            ),
            (
                MetricKind::Query {
                    template:
                        r#"sum(rate(x{model="{{model}}", version="{{ version }}"}[{{window}}]))"#
                            .into(),
                },
                vec![
                    r#"sum(rate(x{model="fraud", version="v1"}[300s]))"#,
                    r#"sum(rate(x{model="fraud", version="v2"}[300s]))"#,
                ],
            ),
        ];
        for (kind, want) in cases {
            let plan = plan(&p, &spec(kind.clone()), R);
            let got: Vec<&str> = plan.queries();
            assert_eq!(got, want, "{kind:?}");
        }
    }

    #[test]
    fn series_queries_golden() {
        let p = policy("v1", "v2");
        let step = Duration::from_secs(60);
        let cases = [
            (
                MetricKind::ErrorRate,
                vec![
                    r#"sum by (version, outcome) (increase(model_requests_total{model="fraud",version=~"v1|v2"}[60s]))"#,
                ],
            ),
            (
                MetricKind::Accuracy,
                vec![
                    r#"sum by (version, correct) (increase(model_predictions_scored_total{model="fraud",version=~"v1|v2"}[60s]))"#,
                ],
            ),
            (
                MetricKind::Latency { quantile: 0.99 },
                vec![
                    r#"histogram_quantile(0.99, sum by (version, le) (increase(model_request_duration_seconds_bucket{model="fraud",version=~"v1|v2"}[60s])))"#,
                ],
            ),
            (
                MetricKind::Query {
                    template: r#"sum(rate(x{version="{{version}}"}[{{window}}]))"#.into(),
                },
                vec![
                    r#"sum(rate(x{version="v1"}[60s]))"#,
                    r#"sum(rate(x{version="v2"}[60s]))"#,
                ],
            ),
        ];
        for (kind, want) in cases {
            let plan = series_plan(&p, &spec(kind.clone()), step);
            assert_eq!(plan.queries(), want, "{kind:?}");
        }
        match series_plan(&p, &spec(MetricKind::Accuracy), step) {
            SeriesPlan::Split { label, value, .. } => {
                assert_eq!((label.as_str(), value.as_str()), ("correct", "true"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn series_steps_tile_the_window_and_respect_the_point_limit() {
        let at = Time(10_000_000);
        let w = |secs: i64| Window {
            at,
            since: Time(at.0 - secs),
            rollout_started: Time(0),
        };
        let min = Duration::from_secs(60);
        // (window ms, shortest range) -> (start, step s, points)
        let cases = [
            // Five whole minutes: ten thirty-second intervals ending at `at`.
            (w(300_000), min, Some((at.0 - 270_000, 30, 10))),
            // A partial interval at the window's start is left out.
            (w(315_500), min, Some((at.0 - 270_000, 30, 10))),
            (w(30_000), min, Some((at.0, 30, 1))),
            // Shorter than one interval, empty or reversed: no series.
            (w(29_999), min, None),
            (w(0), min, None),
            (w(-5_000), min, None),
            // Half a range that is not an even number of seconds is rounded up, to at least one.
            (
                w(12_000),
                Duration::from_secs(3),
                Some((at.0 - 10_000, 2, 6)),
            ),
            (
                w(10_000),
                Duration::from_millis(200),
                Some((at.0 - 9_000, 1, 10)),
            ),
        ];
        for (window, min, want) in cases {
            let got = Steps::new(&window, min).map(|s| {
                assert_eq!(s.end, at);
                (s.start.0, s.step.as_secs(), s.points())
            });
            assert_eq!(got, want, "{window:?} {min:?}");
        }
        // Thirty days of one-second intervals would be 2.6 million points: the step widens
        // to the smallest whole second that stays within Prometheus's limit.
        let month = 30 * 86_400_000;
        let s = Steps::new(&w(month), Duration::from_secs(2)).expect("steps");
        assert_eq!(s.step, Duration::from_secs(236));
        assert!(s.points() <= MAX_RANGE_POINTS, "{s:?}");
        assert!(month / 235_000 > MAX_RANGE_POINTS);
        assert!(s.start.0 > at.0 - month, "{s:?}");
    }

    #[test]
    fn split_metrics_know_their_label() {
        let p = policy("v1", "v2");
        match plan(&p, &spec(MetricKind::ErrorRate), R) {
            Plan::Split {
                label,
                value,
                marked_is_bad,
                ..
            } => assert_eq!(
                (label.as_str(), value.as_str(), marked_is_bad),
                ("outcome", "error", true)
            ),
            other => panic!("{other:?}"),
        }
        match plan(&p, &spec(MetricKind::Accuracy), R) {
            Plan::Split {
                label,
                value,
                marked_is_bad,
                ..
            } => assert_eq!(
                (label.as_str(), value.as_str(), marked_is_bad),
                ("correct", "true", false)
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn versions_are_regex_and_string_escaped() {
        // A dot must not match any character, and the regex's backslash must survive the
        // PromQL string literal (Go rejects `"\."`).
        let p = policy("1.0", "1.0+rc(2)");
        let q = plan(&p, &spec(MetricKind::ErrorRate), R);
        let text = q.queries()[0].to_owned();
        assert!(
            text.contains(r#"version=~"1\\.0|1\\.0\\+rc\\(2\\)""#),
            "{text}"
        );
        assert_eq!(string_literal(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(string_literal("a\nb"), r#""a\nb""#);
        assert_eq!(regex_escape("a.b|c"), r"a\.b\|c");
    }

    #[test]
    fn equal_versions_are_listed_once() {
        let p = policy("v1", "v1");
        let q = plan(&p, &spec(MetricKind::ErrorRate), R);
        assert!(q.queries()[0].contains(r#"version=~"v1"}"#), "{:?}", q);
    }

    #[test]
    fn convention_overrides_change_names_and_labels() {
        let mut p = policy("v1", "v2");
        p.convention = Convention {
            requests: "reqs".into(),
            duration: "lat_seconds".into(),
            scored: "graded_total".into(),
            model_label: "app".into(),
            version_label: "rev".into(),
            outcome_label: "status".into(),
            error_value: "fail".into(),
            correct_label: "ok".into(),
            correct_value: "yes".into(),
        };
        let all = |kind| {
            plan(&p, &spec(kind), R)
                .queries()
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            all(MetricKind::ErrorRate)[0],
            r#"sum by (rev, status) (increase(reqs{app="fraud",rev=~"v1|v2"}[300s]))"#
        );
        assert_eq!(
            all(MetricKind::Accuracy)[1],
            r#"sum by (rev, ok) (increase(graded_total{app="fraud",rev=~"v1|v2"}[3600s]))"#
        );
        assert_eq!(
            all(MetricKind::Latency { quantile: 0.5 }),
            vec![
                r#"histogram_quantile(0.5, sum by (rev, le) (increase(lat_seconds_bucket{app="fraud",rev=~"v1|v2"}[300s])))"#,
                r#"sum by (rev) (increase(lat_seconds_count{app="fraud",rev=~"v1|v2"}[300s]))"#,
                r#"sum by (rev, le) (increase(lat_seconds_bucket{app="fraud",rev=~"v1|v2"}[3600s]))"#,
            ]
        );
        match plan(&p, &spec(MetricKind::Accuracy), R) {
            Plan::Split { label, value, .. } => {
                assert_eq!((label.as_str(), value.as_str()), ("ok", "yes"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn templates_escape_values_and_keep_unknown_text() {
        let w = Duration::from_secs(90);
        let cases = [
            (r#"x{v="{{version}}"}"#, r#"x{v="a\"b"}"#),
            ("{{window}}{{ window }}", "90s90s"),
            ("{{model}}", "m\\\\1"),
            ("{{other}} {{version", "{{other}} {{version"),
            ("no variables", "no variables"),
        ];
        for (t, want) in cases {
            assert_eq!(render_template(t, r"m\1", r#"a"b"#, w), want, "{t}");
        }
    }
}
