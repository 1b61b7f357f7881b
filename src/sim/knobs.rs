//! The simulator's knobs and the one text syntax for them, shared by the command-line flags,
//! the `--schedule` entries and `PUT /admin/config`, so that a value written one way is
//! accepted everywhere.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A knob value or schedule that could not be understood; the message names the input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// The longest latency the simulator will ever draw. A large `latency_sigma` makes the
/// log-normal's far tail astronomically long; a model server would have timed out long before.
pub const MAX_LATENCY: Duration = Duration::from_secs(60);

/// What a simulated model version does to each request.
#[derive(Clone, Debug, PartialEq)]
pub struct Knobs {
    /// Probability in [0, 1] that a prediction fails with HTTP 500.
    pub error_rate: f64,
    /// Median of the log-normal service time.
    pub latency: Duration,
    /// Standard deviation of the logarithm of the service time; 0 makes every request take
    /// exactly `latency` (plus the tail).
    pub latency_sigma: f64,
    /// Share in [0, 1] of requests that take `tail_extra` on top of their drawn latency.
    pub tail_share: f64,
    /// Extra time of a request in the slow tail.
    pub tail_extra: Duration,
    /// Probability in [0, 1] that a prediction turns out correct once its label arrives.
    pub accuracy: f64,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            error_rate: 0.0,
            latency: Duration::from_millis(40),
            latency_sigma: 0.25,
            tail_share: 0.0,
            tail_extra: Duration::ZERO,
            accuracy: 0.95,
        }
    }
}

impl Knobs {
    /// Checks the ranges; every way of building knobs goes through the parsers below, but
    /// embedders can fill the struct directly.
    pub fn validate(&self) -> Result<(), ParseError> {
        check_probability("error-rate", self.error_rate)?;
        check_probability("accuracy", self.accuracy)?;
        check_probability("latency-tail share", self.tail_share)?;
        check_sigma(self.latency_sigma)?;
        if self.latency > MAX_LATENCY || self.tail_extra > MAX_LATENCY {
            return Err(ParseError(format!(
                "latency: expected at most {}",
                humantime::format_duration(MAX_LATENCY)
            )));
        }
        Ok(())
    }

    /// Applies one change.
    pub fn apply(&mut self, setting: &Setting) {
        match *setting {
            Setting::ErrorRate(v) => self.error_rate = v,
            Setting::Latency(d) => self.latency = d,
            Setting::LatencySigma(s) => self.latency_sigma = s,
            Setting::LatencyTail { share, extra } => {
                self.tail_share = share;
                self.tail_extra = extra;
            }
            Setting::Accuracy(v) => self.accuracy = v,
        }
    }

    /// The knobs as `GET /admin/config` shows them.
    pub fn view(&self) -> KnobsView {
        KnobsView {
            error_rate: self.error_rate,
            latency_ms: self.latency.as_secs_f64() * 1000.0,
            latency_sigma: self.latency_sigma,
            tail_share: self.tail_share,
            tail_ms: self.tail_extra.as_secs_f64() * 1000.0,
            accuracy: self.accuracy,
        }
    }

    /// Applies a `PUT /admin/config` body; all fields are checked before any is applied, so
    /// a bad body changes nothing.
    pub fn update(&mut self, u: &KnobsUpdate) -> Result<(), ParseError> {
        let mut next = self.clone();
        if let Some(v) = &u.error_rate {
            next.error_rate = v.probability("error_rate")?;
        }
        if let Some(v) = &u.accuracy {
            next.accuracy = v.probability("accuracy")?;
        }
        if let Some(v) = &u.tail_share {
            next.tail_share = v.probability("tail_share")?;
        }
        if let Some(ms) = u.latency_ms {
            next.latency = millis("latency_ms", ms)?;
        }
        if let Some(ms) = u.tail_ms {
            next.tail_extra = millis("tail_ms", ms)?;
        }
        if let Some(s) = u.latency_sigma {
            next.latency_sigma = s;
        }
        next.validate()?;
        *self = next;
        Ok(())
    }
}

/// The knobs in JSON, rates as fractions and times in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KnobsView {
    pub error_rate: f64,
    pub latency_ms: f64,
    pub latency_sigma: f64,
    pub tail_share: f64,
    pub tail_ms: f64,
    pub accuracy: f64,
}

/// The body of `PUT /admin/config`: any subset of the knobs. Rates are fractions (`0.05`) or
/// percentages as text (`"5%"`). Unknown fields are rejected so that a typo is not ignored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnobsUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_sigma: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_share: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<Rate>,
}

/// A probability given as a number (`0.05`) or as text (`"5%"`, `"0.05"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Rate {
    Number(f64),
    Text(String),
}

impl Rate {
    fn probability(&self, what: &str) -> Result<f64, ParseError> {
        match self {
            Rate::Number(v) => check_probability(what, *v),
            Rate::Text(s) => parse_rate(s).map_err(|e| ParseError(format!("{what}: {e}"))),
        }
    }
}

impl From<f64> for Rate {
    fn from(v: f64) -> Self {
        Rate::Number(v)
    }
}

fn millis(what: &str, ms: f64) -> Result<Duration, ParseError> {
    if !(0.0..=MAX_LATENCY.as_secs_f64() * 1000.0).contains(&ms) {
        return Err(ParseError(format!(
            "{what}: expected milliseconds from 0 to {}, found {ms}",
            MAX_LATENCY.as_millis()
        )));
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

fn check_probability(what: &str, v: f64) -> Result<f64, ParseError> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(ParseError(format!(
            "{what}: expected a fraction from 0 to 1 or a percentage up to 100%, found {v}"
        )))
    }
}

fn check_sigma(s: f64) -> Result<f64, ParseError> {
    // Beyond 3 the log-normal's mean is e^4.5 = 90 times its median: no longer a latency
    // distribution anyone would want to simulate, and most likely a unit mistake.
    if (0.0..=3.0).contains(&s) {
        Ok(s)
    } else {
        Err(ParseError(format!(
            "latency-sigma: expected a number from 0 to 3, found {s}"
        )))
    }
}

/// Parses a probability: `5%`, `0.5%` or a plain fraction `0.05`.
pub fn parse_rate(s: &str) -> Result<f64, ParseError> {
    let t = s.trim();
    let bad = || {
        ParseError(format!(
            "expected a percentage like 5% or a fraction like 0.05, found {s:?}"
        ))
    };
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map_err(|_| bad())? / 100.0,
        None => t.parse::<f64>().map_err(|_| bad())?,
    };
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(ParseError(format!(
            "expected a value from 0% to 100%, found {s:?}"
        )))
    }
}

/// Parses a latency like `40ms` or `1s`.
pub fn parse_latency(s: &str) -> Result<Duration, ParseError> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| ParseError(format!("expected a duration like 40ms, found {s:?} ({e})")))?;
    if d > MAX_LATENCY {
        return Err(ParseError(format!(
            "expected a latency of at most {}, found {s:?}",
            humantime::format_duration(MAX_LATENCY)
        )));
    }
    Ok(d)
}

/// Parses the log-normal sigma, a plain number from 0 to 3.
pub fn parse_sigma(s: &str) -> Result<f64, ParseError> {
    let v = s
        .trim()
        .parse::<f64>()
        .map_err(|_| ParseError(format!("expected a number like 0.25, found {s:?}")))?;
    check_sigma(v)
}

/// Parses a slow tail, `SHARE:EXTRA` such as `2%:300ms` (2 % of requests take 300 ms longer),
/// or `none`.
pub fn parse_tail(s: &str) -> Result<(f64, Duration), ParseError> {
    let t = s.trim();
    if t == "none" || t == "0" {
        return Ok((0.0, Duration::ZERO));
    }
    let Some((share, extra)) = t.split_once(':') else {
        return Err(ParseError(format!(
            "expected SHARE:EXTRA like 2%:300ms, or none, found {s:?}"
        )));
    };
    Ok((parse_rate(share)?, parse_latency(extra)?))
}

/// One knob change, as written `KNOB=VALUE` in a schedule.
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    ErrorRate(f64),
    Latency(Duration),
    LatencySigma(f64),
    LatencyTail { share: f64, extra: Duration },
    Accuracy(f64),
}

/// The knob names a schedule understands; the same as the flags without `--`.
pub const KNOB_NAMES: &str = "error-rate, latency, latency-sigma, latency-tail, accuracy";

/// Parses `KNOB=VALUE`, for example `error-rate=5%`.
pub fn parse_setting(s: &str) -> Result<Setting, ParseError> {
    let Some((knob, value)) = s.split_once('=') else {
        return Err(ParseError(format!(
            "expected KNOB=VALUE like error-rate=5%, found {s:?}"
        )));
    };
    let in_knob = |e: ParseError| ParseError(format!("{}: {}", knob.trim(), e.0));
    match knob.trim() {
        "error-rate" => parse_rate(value).map(Setting::ErrorRate).map_err(in_knob),
        "latency" => parse_latency(value).map(Setting::Latency).map_err(in_knob),
        "latency-sigma" => parse_sigma(value)
            .map(Setting::LatencySigma)
            .map_err(in_knob),
        "latency-tail" => parse_tail(value)
            .map(|(share, extra)| Setting::LatencyTail { share, extra })
            .map_err(in_knob),
        "accuracy" => parse_rate(value).map(Setting::Accuracy).map_err(in_knob),
        other => Err(ParseError(format!(
            "unknown knob {other:?}; expected one of {KNOB_NAMES}"
        ))),
    }
}

/// Changes that take effect a fixed time after the simulator starts.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleEntry {
    /// Offset from the start of the server.
    pub at: Duration,
    /// Applied in order, all at once.
    pub settings: Vec<Setting>,
}

/// A list of timed changes, parsed from `OFFSET:KNOB=VALUE[,KNOB=VALUE...][;...]`, for example
/// `2m:error-rate=5%;4m:latency=120ms,latency-tail=5%:1s`. Entries come out sorted by offset.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Schedule(pub Vec<ScheduleEntry>);

impl std::str::FromStr for Schedule {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let mut entries = Vec::new();
        for entry in s.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let in_entry = |e: ParseError| ParseError(format!("schedule entry {entry:?}: {}", e.0));
            let Some((offset, changes)) = entry.split_once(':') else {
                return Err(in_entry(ParseError(
                    "expected OFFSET:KNOB=VALUE like 2m:error-rate=5%".to_string(),
                )));
            };
            let at = humantime::parse_duration(offset.trim()).map_err(|e| {
                in_entry(ParseError(format!(
                    "expected an offset like 2m or 90s, found {offset:?} ({e})"
                )))
            })?;
            let settings = changes
                .split(',')
                .map(parse_setting)
                .collect::<Result<Vec<_>, _>>()
                .map_err(in_entry)?;
            entries.push(ScheduleEntry { at, settings });
        }
        if entries.is_empty() {
            return Err(ParseError(format!(
                "expected at least one entry like 2m:error-rate=5%, found {s:?}"
            )));
        }
        // Stable, so two entries at the same offset apply in the order written.
        entries.sort_by_key(|e| e.at);
        Ok(Schedule(entries))
    }
}
