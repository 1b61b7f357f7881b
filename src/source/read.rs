//! Turns Prometheus's answers to a metric's queries into one [`Sample`] per version. Pure.
//!
//! The rules that keep "no data" apart from "bad canary":
//! - a version with no series in any answer, or with no events in the window and none since
//!   the rollout began, reads as no data (`Ok(None)`);
//! - events since the rollout began but none in the window give a sample without a value;
//! - ratios are computed here from counts, so a window without events never becomes 0/0;
//! - NaN or an infinity where a count or a latency was expected is an error, never a number.
//!
//! The per-interval series of a range query are extra evidence, not the reading itself: an
//! interval without events, or whose value is NaN or infinite, is left out of the series.

use super::error::SourceError;
use super::prometheus::{Answer, RangeSeries, Series};
use crate::observation::{Bucket, Counts, Sample};
use crate::time::Time;
use std::collections::BTreeMap;
/// One version's reading: a sample, no data (`None`), or why there is no answer.
pub type VersionResult = Result<Option<Sample>, SourceError>;

/// The label names and values needed to pick a version's series out of an answer.
#[derive(Clone, Copy, Debug)]
pub struct Versions<'a> {
    pub label: &'a str,
    pub stable: &'a str,
    pub canary: &'a str,
}

impl<'a> Versions<'a> {
    fn both(&self) -> [&'a str; 2] {
        [self.stable, self.canary]
    }
}

fn series(answer: &Answer) -> &[Series] {
    match answer {
        Answer::Vector(v) => v,
        Answer::Scalar(_) => &[],
    }
}

fn of_version<'s>(
    answer: &'s Answer,
    label: &str,
    version: &str,
) -> impl Iterator<Item = &'s Series> {
    series(answer)
        .iter()
        .filter(move |s| s.labels.get(label).is_some_and(|v| v == version))
}

/// A count read from Prometheus; NaN or infinite counts are errors.
fn count(value: f64, version: &str, query: &str) -> Result<f64, SourceError> {
    if value.is_finite() {
        // `increase()` of a counter is never negative; a tiny negative value is float noise.
        Ok(value.max(0.0))
    } else {
        Err(SourceError::NotANumber {
            version: version.to_owned(),
            value,
            query: query.to_owned(),
        })
    }
}

/// Marked and total events of one version in a split answer; `None` without series. Series
/// that all lack the split's label are a convention that does not fit the model server (it
/// names its outcome otherwise): an error rather than no marked events, which would read as a
/// perfect canary.
fn split_counts(
    answer: &Answer,
    query: &str,
    v: &Versions<'_>,
    version: &str,
    (label, key): (&str, &str),
    marked_value: &str,
) -> Result<Option<(f64, f64)>, SourceError> {
    let (mut found, mut labelled) = (false, false);
    let (mut marked, mut total) = (0.0, 0.0);
    for s in of_version(answer, v.label, version) {
        found = true;
        let n = count(s.value, version, query)?;
        total += n;
        let value = s.labels.get(label);
        labelled |= value.is_some();
        if value.is_some_and(|l| l == marked_value) {
            marked += n;
        }
    }
    if found && !labelled {
        return Err(SourceError::BadQuery {
            query: query.to_owned(),
            message: format!(
                "no series of version {version:?} has the label {label:?}, so its {} cannot be \
                 told from the rest; set the policy's series.{key} to the label the model server \
                 uses",
                if key == "outcome_label" {
                    "errors"
                } else {
                    "correct predictions"
                }
            ),
        });
    }
    // `increase()` extrapolates each series on its own, so a series created later than the
    // others can come out a little larger than their sum; a share stays within [0, 1].
    Ok(found.then_some((marked.min(total), total)))
}

/// Error rate or accuracy: the share of marked events in the window, and cumulative counts.
#[allow(clippy::too_many_arguments)]
pub fn split(
    v: &Versions<'_>,
    label: &str,
    marked_value: &str,
    marked_is_bad: bool,
    window: &Answer,
    window_query: &str,
    cumulative: &Answer,
    cumulative_query: &str,
) -> [VersionResult; 2] {
    // The convention's key for the label, to name in an error.
    let key = if marked_is_bad {
        "outcome_label"
    } else {
        "correct_label"
    };
    v.both().map(|version| {
        let w = split_counts(window, window_query, v, version, (label, key), marked_value)?;
        let c = split_counts(
            cumulative,
            cumulative_query,
            v,
            version,
            (label, key),
            marked_value,
        )?;
        let (w_marked, w_total) = w.unwrap_or((0.0, 0.0));
        let c_total = c.map_or(0.0, |(_, t)| t);
        if w_total <= 0.0 && c_total <= 0.0 {
            return Ok(None);
        }
        // Counts since the rollout began, or none yet (its range may still be too short for
        // two scrapes): never the window's, which may reach back before the rollout.
        let cumulative = c.map(|(c_marked, c_total)| Counts {
            bad: if marked_is_bad {
                c_marked
            } else {
                c_total - c_marked
            },
            total: c_total,
        });
        Ok(Some(Sample {
            value: (w_total > 0.0).then(|| w_marked / w_total),
            window_events: w_total,
            cumulative,
            ..Sample::default()
        }))
    })
}

/// A version's cumulative histogram: finite buckets ascending, and the total (`+Inf`) count.
#[derive(Clone, Debug, Default, PartialEq)]
struct Histogram {
    buckets: Vec<Bucket>,
    total: f64,
}

fn histogram(
    answer: &Answer,
    query: &str,
    v: &Versions<'_>,
    version: &str,
) -> Result<Option<Histogram>, SourceError> {
    let mut raw: Vec<(f64, f64)> = Vec::new();
    for s in of_version(answer, v.label, version) {
        // A series without a numeric `le` is not part of a classic histogram; it cannot
        // be placed, so it is left out rather than guessed at.
        let Some(le) = s
            .labels
            .get("le")
            .and_then(|l| super::prometheus::parse_value(l))
        else {
            continue;
        };
        if le.is_nan() {
            continue;
        }
        raw.push((le, count(s.value, version, query)?));
    }
    if raw.is_empty() {
        return Ok(None);
    }
    raw.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Buckets are cumulative, but `increase()` extrapolates each bucket separately, so the
    // counts can dip slightly at a higher boundary; keep them monotone as a histogram must be.
    let mut running: f64 = 0.0;
    let mut buckets = Vec::with_capacity(raw.len());
    for (le, n) in raw {
        running = running.max(n);
        if le.is_finite() {
            buckets.push(Bucket { le, count: running });
        }
    }
    Ok(Some(Histogram {
        buckets,
        total: running,
    }))
}

fn one_value(answer: &Answer, v: &Versions<'_>, version: &str) -> Option<f64> {
    of_version(answer, v.label, version).next().map(|s| s.value)
}

/// The quantile `q` estimated from a cumulative histogram: the smallest boundary whose count
/// reaches `q` of the total. Used only to choose a slow-request boundary when stable has no
/// quantile in the window.
fn bucket_quantile(h: &Histogram, q: f64) -> Option<f64> {
    let rank = q * h.total;
    h.buckets.iter().find(|b| b.count >= rank).map(|b| b.le)
}

/// The boundary above which requests count as slow, shared by both versions so that their
/// counts compare: the smallest boundary at or above the metric's `max` when it has one,
/// else the boundary nearest stable's quantile. Only boundaries both versions export count.
fn slow_boundary(
    hists: &[Option<Histogram>; 2],
    max: Option<f64>,
    stable_quantile: Option<f64>,
    q: f64,
) -> Option<f64> {
    let mut bounds: Option<Vec<f64>> = None;
    for h in hists.iter().flatten() {
        let les: Vec<f64> = h.buckets.iter().map(|b| b.le).collect();
        bounds = Some(match bounds {
            None => les,
            Some(prev) => prev.into_iter().filter(|le| les.contains(le)).collect(),
        });
    }
    let bounds = bounds?;
    if let Some(max) = max {
        // Bounds such as `250ms` are parsed to 0.25 and boundaries from `le="0.25"`; a
        // relative tolerance absorbs a boundary written with a different number of digits.
        return bounds.into_iter().find(|le| *le >= max * (1.0 - 1e-9));
    }
    let reference =
        stable_quantile.or_else(|| hists[0].as_ref().and_then(|h| bucket_quantile(h, q)))?;
    bounds.into_iter().min_by(|a, b| {
        (a - reference)
            .abs()
            .total_cmp(&(b - reference).abs())
            .then(b.total_cmp(a))
    })
}

/// The count of a histogram at boundary `le`.
fn count_at(h: &Histogram, le: f64) -> Option<f64> {
    h.buckets.iter().find(|b| b.le == le).map(|b| b.count)
}

/// Latency: the quantile over the window, the window's requests, and the cumulative histogram
/// with the requests slower than the chosen boundary.
#[allow(clippy::too_many_arguments)]
pub fn latency(
    v: &Versions<'_>,
    q: f64,
    max: Option<f64>,
    quantile: &Answer,
    quantile_query: &str,
    window_total: &Answer,
    window_total_query: &str,
    buckets: &Answer,
    buckets_query: &str,
) -> [VersionResult; 2] {
    let hists = v
        .both()
        .map(|version| histogram(buckets, buckets_query, v, version));
    let values = v.both().map(
        |version| -> Result<(Option<f64>, Option<f64>), SourceError> {
            let total = one_value(window_total, v, version)
                .map(|n| count(n, version, window_total_query))
                .transpose()?;
            let value = match (total, one_value(quantile, v, version)) {
                (Some(n), Some(x)) if n > 0.0 => {
                    if x.is_finite() {
                        Some(x)
                    } else {
                        return Err(SourceError::NotANumber {
                            version: version.to_owned(),
                            value: x,
                            query: quantile_query.to_owned(),
                        });
                    }
                }
                // Without requests in the window the quantile is NaN (0/0); that is no value.
                _ => None,
            };
            Ok((total, value))
        },
    );
    let stable_quantile = values[0].as_ref().ok().and_then(|(_, x)| *x);
    let ok_hists: [Option<Histogram>; 2] = [
        hists[0].as_ref().ok().cloned().flatten(),
        hists[1].as_ref().ok().cloned().flatten(),
    ];
    let slow_le = slow_boundary(&ok_hists, max, stable_quantile, q);
    let mut out = [Ok(None), Ok(None)];
    for (i, (hist, value)) in hists.into_iter().zip(values).enumerate() {
        out[i] = (|| {
            let hist = hist?;
            let (total, value) = value?;
            let w_total = total.unwrap_or(0.0);
            let c_total = hist.as_ref().map_or(0.0, |h| h.total);
            if w_total <= 0.0 && c_total <= 0.0 {
                return Ok(None);
            }
            let cumulative = match (&hist, slow_le) {
                (Some(h), Some(le)) => count_at(h, le).map(|fast| Counts {
                    bad: (h.total - fast).max(0.0),
                    total: h.total,
                }),
                _ => None,
            };
            Ok(Some(Sample {
                value,
                window_events: w_total,
                cumulative,
                slow_le: cumulative.and(slow_le),
                buckets: hist.map(|h| h.buckets).unwrap_or_default(),
                ..Sample::default()
            }))
        })();
    }
    out
}

/// A raw query's answer for one version: one number, or no data.
///
/// NaN is what PromQL gives for 0/0, a ratio over a window without events, so it reads as no
/// data; an infinity (x/0 with x > 0) is an error.
pub fn template(answer: &Answer, query: &str, version: &str) -> VersionResult {
    let value = match answer {
        Answer::Scalar(x) => *x,
        Answer::Vector(s) if s.is_empty() => return Ok(None),
        Answer::Vector(s) if s.len() == 1 => s[0].value,
        Answer::Vector(s) => {
            return Err(SourceError::BadQuery {
                query: query.to_owned(),
                message: format!(
                    "it returned {} series for version {version:?}, expected one number \
                     (aggregate it, for example with sum())",
                    s.len()
                ),
            });
        }
    };
    if value.is_nan() {
        return Ok(None);
    }
    if !value.is_finite() {
        return Err(SourceError::NotANumber {
            version: version.to_owned(),
            value,
            query: query.to_owned(),
        });
    }
    Ok(Some(Sample {
        value: Some(value),
        window_events: 1.0,
        ..Sample::default()
    }))
}

/// The series of `answer` whose version label is `version`.
fn range_of_version<'s>(
    answer: &'s [RangeSeries],
    label: &str,
    version: &str,
) -> impl Iterator<Item = &'s RangeSeries> {
    answer
        .iter()
        .filter(move |s| s.labels.get(label).is_some_and(|v| v == version))
}

/// Per-interval shares of marked events for both versions (stable, then canary) from a range
/// query of split counts ([`super::query::SeriesPlan::Split`]): at each step, marked events
/// over all events, as [`split`] computes the window's value. A step without events, or with
/// a count that is NaN or infinite, gives no value.
pub fn split_series(
    v: &Versions<'_>,
    label: &str,
    marked_value: &str,
    answer: &[RangeSeries],
) -> [Vec<f64>; 2] {
    v.both().map(|version| {
        // Per step: marked and total events, or `None` once a count there is not a number.
        let mut steps: BTreeMap<Time, Option<(f64, f64)>> = BTreeMap::new();
        for s in range_of_version(answer, v.label, version) {
            let marked = s.labels.get(label).is_some_and(|l| l == marked_value);
            for &(t, n) in &s.points {
                let step = steps.entry(t).or_insert(Some((0.0, 0.0)));
                match step {
                    Some((m, total)) if n.is_finite() => {
                        let n = n.max(0.0);
                        *total += n;
                        if marked {
                            *m += n;
                        }
                    }
                    _ => *step = None,
                }
            }
        }
        steps
            .into_values()
            .flatten()
            .filter(|(_, total)| *total > 0.0)
            .map(|(marked, total)| marked.min(total) / total)
            .collect()
    })
}

/// Per-interval values for both versions (stable, then canary) from a range query with one
/// series per version, such as the latency quantile ([`super::query::SeriesPlan::Latency`]),
/// whose value is NaN at a step without requests. Only finite values are kept.
pub fn value_series(v: &Versions<'_>, answer: &[RangeSeries]) -> [Vec<f64>; 2] {
    v.both().map(|version| {
        let mut steps: BTreeMap<Time, f64> = BTreeMap::new();
        for s in range_of_version(answer, v.label, version) {
            for &(t, x) in &s.points {
                // Two series for one version cannot be told apart; the first one wins.
                steps.entry(t).or_insert(x);
            }
        }
        steps.into_values().filter(|x| x.is_finite()).collect()
    })
}

/// Per-interval values of a raw template for one version: its only series' finite values.
/// An answer with several series is as ambiguous as [`template`] says, so it gives none.
pub fn template_series(answer: &[RangeSeries]) -> Vec<f64> {
    match answer {
        [one] => one
            .points
            .iter()
            .map(|(_, x)| *x)
            .filter(|x| x.is_finite())
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const V: Versions<'static> = Versions {
        label: "version",
        stable: "v1",
        canary: "v2",
    };

    fn row(pairs: &[(&str, &str)], value: f64) -> Series {
        Series {
            labels: labels(pairs),
            value,
        }
    }

    fn sample(r: &VersionResult) -> &Sample {
        match r {
            Ok(Some(s)) => s,
            other => panic!("expected a sample, got {other:?}"),
        }
    }

    fn outcome(version: &str, outcome: &str, n: f64) -> Series {
        row(&[("version", version), ("outcome", outcome)], n)
    }

    #[test]
    fn error_rate_from_split_counts() {
        let window = Answer::Vector(vec![
            outcome("v1", "success", 990.0),
            outcome("v1", "error", 10.0),
            outcome("v2", "success", 0.0),
            outcome("v2", "error", 0.0),
        ]);
        let cumulative = Answer::Vector(vec![
            outcome("v1", "success", 1980.0),
            outcome("v1", "error", 20.0),
            outcome("v2", "success", 95.0),
            outcome("v2", "error", 5.0),
            outcome("v2", "timeout", 10.0),
        ]);
        let [stable, canary] = split(&V, "outcome", "error", true, &window, "w", &cumulative, "c");
        let s = sample(&stable);
        assert_eq!(s.value, Some(0.01));
        assert_eq!(s.window_events, 1000.0);
        assert_eq!(
            s.cumulative,
            Some(Counts {
                bad: 20.0,
                total: 2000.0
            })
        );
        // No requests in the window, but some since the rollout began: a sample without value.
        let c = sample(&canary);
        assert_eq!(c.value, None);
        assert_eq!(c.window_events, 0.0);
        assert_eq!(
            c.cumulative,
            Some(Counts {
                bad: 5.0,
                total: 110.0
            })
        );
    }

    /// Early in a rollout the cumulative range is too short for counts while the (widened)
    /// window has some: the window's value is kept, but its counts, which may reach back
    /// before the rollout, never stand in for the cumulative ones.
    #[test]
    fn a_window_never_stands_in_for_counts_since_the_rollout_began() {
        let window = Answer::Vector(vec![
            outcome("v1", "success", 990.0),
            outcome("v1", "error", 10.0),
            outcome("v2", "success", 90.0),
            outcome("v2", "error", 10.0),
        ]);
        let cumulative = Answer::Vector(vec![]);
        for s in split(&V, "outcome", "error", true, &window, "w", &cumulative, "c") {
            let s = sample(&s);
            assert!(s.value.is_some_and(|v| v > 0.0), "{s:?}");
            assert_eq!(s.cumulative, None, "{s:?}");
        }
    }

    #[test]
    fn accuracy_counts_the_unmarked_as_bad() {
        let l1: &[(&str, &str)] = &[("version", "v1"), ("correct", "true")];
        let l2: &[(&str, &str)] = &[("version", "v1"), ("correct", "false")];
        let a = Answer::Vector(vec![row(l1, 90.0), row(l2, 10.0)]);
        let [stable, canary] = split(&V, "correct", "true", false, &a, "w", &a, "c");
        let s = sample(&stable);
        assert_eq!(s.value, Some(0.9));
        assert_eq!(
            s.cumulative,
            Some(Counts {
                bad: 10.0,
                total: 100.0
            })
        );
        assert_eq!(canary, Ok(None));
    }

    #[test]
    fn absent_or_silent_versions_have_no_data() {
        let zero = Answer::Vector(vec![
            outcome("v1", "success", 0.0),
            outcome("v1", "error", 0.0),
        ]);
        let none = Answer::Vector(vec![]);
        for (w, c) in [(&zero, &zero), (&none, &none), (&zero, &none)] {
            let [stable, canary] = split(&V, "outcome", "error", true, w, "w", c, "c");
            assert_eq!(stable, Ok(None));
            assert_eq!(canary, Ok(None));
        }
    }

    /// Regression (review): a model server that names its outcome label otherwise (`status`)
    /// gave series without `outcome`, which read as no errors at all: a perfect canary.
    #[test]
    fn series_without_the_split_label_are_an_error_not_a_perfect_canary() {
        let unlabelled =
            |version: &str, n: f64| row(&[("version", version), ("status", "error")], n);
        let w = Answer::Vector(vec![unlabelled("v1", 100.0), unlabelled("v2", 50.0)]);
        for r in split(&V, "outcome", "error", true, &w, "w", &w, "c") {
            let e = r.expect_err("the label is missing");
            assert!(
                e.to_string().contains("has the label \"outcome\"")
                    && e.to_string().contains("series.outcome_label"),
                "{e}"
            );
        }
        let [stable, _] = split(&V, "correct", "true", false, &w, "w", &w, "c");
        let e = stable.expect_err("the label is missing");
        assert!(e.to_string().contains("series.correct_label"), "{e}");
    }

    #[test]
    fn nan_counts_are_errors() {
        let w = Answer::Vector(vec![
            outcome("v1", "error", f64::NAN),
            outcome("v2", "error", 1.0),
        ]);
        let [stable, canary] = split(&V, "outcome", "error", true, &w, "w", &w, "c");
        match stable {
            Err(e) => assert_eq!(e.kind(), "nan"),
            other => panic!("{other:?}"),
        }
        assert_eq!(sample(&canary).value, Some(1.0));
    }

    #[test]
    fn extrapolated_marked_counts_never_exceed_total() {
        let w = Answer::Vector(vec![outcome("v1", "error", 10.2)]);
        let c = Answer::Vector(vec![
            outcome("v1", "error", 10.2),
            outcome("v1", "success", 0.0),
        ]);
        let [stable, _] = split(&V, "outcome", "error", true, &w, "w", &c, "c");
        assert_eq!(sample(&stable).value, Some(1.0));
    }

    fn buckets(version: &str, rows: &[(&str, f64)]) -> Vec<Series> {
        rows.iter()
            .map(|(le, n)| row(&[("version", version), ("le", le)], *n))
            .collect()
    }

    fn by_version(rows: &[(&str, f64)]) -> Answer {
        Answer::Vector(
            rows.iter()
                .map(|(v, n)| row(&[("version", v)], *n))
                .collect(),
        )
    }

    fn hist_answer() -> Answer {
        let mut rows = buckets(
            "v1",
            &[
                ("0.1", 80.0),
                ("0.25", 95.0),
                ("0.5", 99.0),
                ("+Inf", 100.0),
            ],
        );
        // The canary's +Inf bucket dips below 0.5 after extrapolation; it must be made monotone.
        rows.extend(buckets(
            "v2",
            &[("0.5", 48.0), ("0.1", 20.0), ("0.25", 40.0), ("+Inf", 47.5)],
        ));
        Answer::Vector(rows)
    }

    #[test]
    fn latency_with_a_max_bound_counts_requests_above_it() {
        let q = by_version(&[("v1", 0.2), ("v2", 0.4)]);
        let n = by_version(&[("v1", 10.0), ("v2", 5.0)]);
        let [stable, canary] = latency(&V, 0.99, Some(0.2), &q, "q", &n, "n", &hist_answer(), "b");
        let s = sample(&stable);
        assert_eq!(s.value, Some(0.2));
        assert_eq!(s.window_events, 10.0);
        assert_eq!(s.slow_le, Some(0.25));
        assert_eq!(
            s.cumulative,
            Some(Counts {
                bad: 5.0,
                total: 100.0
            })
        );
        assert_eq!(
            s.buckets.len(),
            3,
            "only finite boundaries: {:?}",
            s.buckets
        );
        let c = sample(&canary);
        assert_eq!(c.slow_le, Some(0.25));
        assert_eq!(
            c.cumulative,
            Some(Counts {
                bad: 8.0,
                total: 48.0
            })
        );
        assert_eq!(
            c.buckets,
            vec![
                Bucket {
                    le: 0.1,
                    count: 20.0
                },
                Bucket {
                    le: 0.25,
                    count: 40.0
                },
                Bucket {
                    le: 0.5,
                    count: 48.0
                }
            ]
        );
    }

    #[test]
    fn slow_boundary_choices() {
        let q = by_version(&[("v1", 0.3), ("v2", 0.4)]);
        let n = by_version(&[("v1", 10.0), ("v2", 5.0)]);
        let h = hist_answer();
        let slow = |max, q: &Answer| {
            let [s, _] = latency(&V, 0.99, max, q, "q", &n, "n", &h, "b");
            sample(&s).slow_le
        };
        // Exactly on a boundary, between boundaries, above every finite boundary.
        assert_eq!(slow(Some(0.25), &q), Some(0.25));
        assert_eq!(slow(Some(0.26), &q), Some(0.5));
        assert_eq!(slow(Some(2.0), &q), None);
        // No max: the boundary nearest stable's window quantile (0.3 is nearest 0.25).
        assert_eq!(slow(None, &q), Some(0.25));
        // No max and no stable quantile in the window: stable's cumulative p99 (0.5).
        let no_stable = by_version(&[("v2", 0.4)]);
        assert_eq!(slow(None, &no_stable), Some(0.5));
    }

    #[test]
    fn latency_nan_quantile_without_requests_is_no_value() {
        let q = by_version(&[("v1", f64::NAN), ("v2", 0.1)]);
        let n = by_version(&[("v1", 0.0), ("v2", 5.0)]);
        let [stable, canary] = latency(&V, 0.5, None, &q, "q", &n, "n", &hist_answer(), "b");
        assert_eq!(sample(&stable).value, None);
        assert_eq!(sample(&canary).value, Some(0.1));
        // With requests in the window, a NaN quantile is an error, not a number.
        let n = by_version(&[("v1", 3.0), ("v2", 5.0)]);
        let [stable, _] = latency(&V, 0.5, None, &q, "q", &n, "n", &hist_answer(), "b");
        match stable {
            Err(e) => assert_eq!(e.kind(), "nan"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn latency_absent_version_has_no_data() {
        let q = by_version(&[("v1", 0.2)]);
        let n = by_version(&[("v1", 10.0)]);
        let h = Answer::Vector(buckets("v1", &[("0.1", 1.0), ("+Inf", 10.0)]));
        let [stable, canary] = latency(&V, 0.5, Some(0.1), &q, "q", &n, "n", &h, "b");
        assert_eq!(
            sample(&stable).cumulative,
            Some(Counts {
                bad: 9.0,
                total: 10.0
            })
        );
        assert_eq!(canary, Ok(None));
    }

    #[test]
    fn template_answers() {
        let one = |x| {
            Answer::Vector(vec![Series {
                labels: labels(&[]),
                value: x,
            }])
        };
        assert_eq!(sample(&template(&one(0.5), "q", "v1")).value, Some(0.5));
        assert_eq!(
            sample(&template(&Answer::Scalar(2.0), "q", "v1")).window_events,
            1.0
        );
        assert_eq!(template(&Answer::Vector(vec![]), "q", "v1"), Ok(None));
        assert_eq!(template(&one(f64::NAN), "q", "v1"), Ok(None));
        assert_eq!(template(&Answer::Scalar(f64::NAN), "q", "v1"), Ok(None));
        match template(&one(f64::INFINITY), "q", "v1") {
            Err(e) => assert_eq!(e.kind(), "nan"),
            other => panic!("{other:?}"),
        }
        let two = Answer::Vector(vec![
            Series {
                labels: labels(&[("a", "1")]),
                value: 1.0,
            },
            Series {
                labels: labels(&[("a", "2")]),
                value: 2.0,
            },
        ]);
        match template(&two, "q", "v1") {
            Err(e) => {
                assert_eq!(e.kind(), "bad-query");
                assert!(e.to_string().contains("2 series for version \"v1\""), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    fn range_row(pairs: &[(&str, &str)], points: &[(i64, f64)]) -> RangeSeries {
        RangeSeries {
            labels: labels(pairs),
            points: points.iter().map(|(t, x)| (Time(*t), *x)).collect(),
        }
    }

    #[test]
    fn split_series_per_step_shares() {
        let e = |v: &str, o: &str, points: &[(i64, f64)]| {
            range_row(&[("version", v), ("outcome", o)], points)
        };
        let answer = vec![
            e(
                "v1",
                "success",
                &[(1000, 90.0), (2000, 0.0), (3000, 99.0), (4000, 9.0)],
            ),
            // The error series of stable appears only at the third step.
            e("v1", "error", &[(3000, 1.0), (4000, 1.0)]),
            e(
                "v2",
                "success",
                &[(1000, 8.0), (2000, 6.0), (3000, f64::NAN)],
            ),
            e("v2", "error", &[(1000, 2.0), (2000, 4.0), (3000, 5.0)]),
            // Other versions and series without the version label are ignored.
            e("v3", "error", &[(1000, 50.0)]),
            range_row(&[("outcome", "error")], &[(1000, 50.0)]),
        ];
        let [stable, canary] = split_series(&V, "outcome", "error", &answer);
        // The step without requests gives no value; 0 errors is a value.
        assert_eq!(stable, vec![0.0, 0.01, 0.1]);
        // A NaN count at a step drops that step only.
        assert_eq!(canary, vec![0.2, 0.4]);
        // Accuracy is the share of correct predictions, as the window value is.
        let c =
            |v: &str, ok: &str, n: f64| range_row(&[("version", v), ("correct", ok)], &[(1000, n)]);
        let answer = vec![c("v1", "true", 9.0), c("v1", "false", 1.0)];
        assert_eq!(
            split_series(&V, "correct", "true", &answer),
            [vec![0.9], vec![]]
        );
    }

    #[test]
    fn value_series_keeps_finite_values_in_time_order() {
        let answer = vec![
            range_row(
                &[("version", "v2")],
                &[
                    (3000, 0.3),
                    (1000, 0.1),
                    (2000, f64::NAN),
                    (4000, f64::INFINITY),
                ],
            ),
            range_row(&[("version", "v1")], &[(1000, 0.05)]),
        ];
        assert_eq!(value_series(&V, &answer), [vec![0.05], vec![0.1, 0.3]]);
        assert_eq!(value_series(&V, &[]), [Vec::<f64>::new(), Vec::new()]);
    }

    #[test]
    fn template_series_needs_one_series() {
        let one = range_row(&[], &[(1000, 0.5), (2000, f64::NAN), (3000, 0.25)]);
        assert_eq!(template_series(std::slice::from_ref(&one)), vec![0.5, 0.25]);
        assert!(template_series(&[]).is_empty());
        assert!(template_series(&[one.clone(), one]).is_empty());
    }
}
