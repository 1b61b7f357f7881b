//! Benchmark scenarios: the file format of shared/bench/scenarios.json, with defaults for
//! every field but `expected`, and errors that name the scenario and field.

use serde_json::{Map, Value};
use std::fmt;

/// The right outcome of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    Promote,
    Rollback,
}

impl Expected {
    pub fn as_str(self) -> &'static str {
        match self {
            Expected::Promote => "promote",
            Expected::Rollback => "rollback",
        }
    }
}

/// Delayed ground-truth labels of predictions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Accuracy {
    /// Share of predictions that ever get a label.
    pub coverage: f64,
    /// Mean of the exponential label delay, minutes.
    pub delay_mean_min: f64,
    /// Share of stable's and the canary's labelled predictions that are incorrect.
    pub q_s: f64,
    pub q_c: f64,
}

/// One simulated canary. Rates are per request, times in minutes, latency log-normal in s.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    pub name: String,
    pub total_rpm: f64,
    pub share: f64,
    pub realized_share: Option<f64>,
    pub p_s: f64,
    pub p_c: f64,
    pub p_c_late: Option<f64>,
    pub onset_min: Option<f64>,
    pub lat_mu: f64,
    pub lat_sigma: f64,
    pub lat_shift_c: f64,
    pub tail_frac_c: f64,
    pub tail_add_s: f64,
    pub overdispersion: f64,
    pub diurnal_amp: f64,
    pub load_err_coupling: f64,
    pub lat_missing_c: Option<(f64, f64)>,
    pub accuracy: Option<Accuracy>,
    pub expected: Expected,
}

impl Scenario {
    /// The minute from which the canary is bad (0 without an onset).
    pub fn onset(&self) -> f64 {
        match (self.p_c_late, self.onset_min) {
            (Some(_), Some(m)) => m,
            _ => 0.0,
        }
    }

    /// The canary's error probability at minute `t`, before load coupling.
    pub fn p_canary(&self, t_min: f64) -> f64 {
        match (self.p_c_late, self.onset_min) {
            (Some(late), Some(m)) if t_min >= m => late,
            _ => self.p_c,
        }
    }
}

/// What is wrong with a scenario file.
#[derive(Debug)]
pub struct ScenarioError {
    pub file: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {p}", self.file)?;
        }
        Ok(())
    }
}

impl std::error::Error for ScenarioError {}

const KNOWN: [&str; 21] = [
    "total_rpm",
    "share",
    "realized_share",
    "p_s",
    "p_c",
    "p_c_late",
    "onset_min",
    "lat_mu",
    "lat_sigma",
    "lat_shift_c",
    "tail_frac_c",
    "tail_add_s",
    "overdispersion",
    "diurnal_amp",
    "load_err_coupling",
    "lat_missing_c",
    "accuracy",
    "expected",
    "note",
    "description",
    "name",
];

/// Parses a scenario file's text: an object of scenarios by name (or an array of scenarios
/// with a `name` each). Every problem is reported, not only the first.
pub fn parse(file: &str, text: &str) -> Result<Vec<Scenario>, ScenarioError> {
    let fail = |problems: Vec<String>| ScenarioError {
        file: file.to_owned(),
        problems,
    };
    let root: Value =
        serde_json::from_str(text).map_err(|e| fail(vec![format!("invalid JSON: {e}")]))?;
    let entries: Vec<(String, &Value)> = match &root {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let name = v
                    .get("name")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("#{i}"), str::to_owned);
                (name, v)
            })
            .collect(),
        _ => {
            return Err(fail(vec![
                "expected an object of scenarios by name, found another JSON value".into(),
            ]));
        }
    };
    if entries.is_empty() {
        return Err(fail(vec![
            "expected at least one scenario, found none".into(),
        ]));
    }
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for (name, v) in entries {
        match v {
            Value::Object(m) => {
                if let Some(s) = scenario(&name, m, &mut problems) {
                    out.push(s);
                }
            }
            _ => problems.push(format!("{name}: expected an object of scenario fields")),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(fail(problems))
    }
}

/// Reads a scenario file.
pub fn load(path: &std::path::Path) -> Result<Vec<Scenario>, ScenarioError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
        file: file.clone(),
        problems: vec![format!("cannot read the file: {e}")],
    })?;
    parse(&file, &text)
}

struct Fields<'a> {
    name: &'a str,
    m: &'a Map<String, Value>,
    problems: &'a mut Vec<String>,
}

impl Fields<'_> {
    /// An optional number in `[lo, hi]`; `null` counts as absent.
    fn opt(&mut self, key: &str, lo: f64, hi: f64) -> Option<f64> {
        match self.m.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(x) if x.is_finite() && x >= lo && x <= hi => Some(x),
                _ => {
                    self.problems.push(format!(
                        "{}.{key}: expected a number from {lo} to {hi}, found {n}",
                        self.name
                    ));
                    None
                }
            },
            Some(other) => {
                self.problems.push(format!(
                    "{}.{key}: expected a number, found {other}",
                    self.name
                ));
                None
            }
        }
    }

    fn num(&mut self, key: &str, default: f64, lo: f64, hi: f64) -> f64 {
        self.opt(key, lo, hi).unwrap_or(default)
    }
}

fn scenario(name: &str, m: &Map<String, Value>, problems: &mut Vec<String>) -> Option<Scenario> {
    let before = problems.len();
    for k in m.keys() {
        if !KNOWN.contains(&k.as_str()) {
            problems.push(format!(
                "{name}.{k}: unknown field (expected one of {})",
                KNOWN.join(", ")
            ));
        }
    }
    let mut f = Fields { name, m, problems };
    let total_rpm = f.num("total_rpm", 20_000.0, 1e-6, 1e9);
    let share = f.num("share", 0.05, 1e-6, 1.0);
    let realized_share = f.opt("realized_share", 0.0, 1.0);
    let p_s = f.num("p_s", 0.01, 0.0, 1.0);
    let p_c = f.num("p_c", p_s, 0.0, 1.0);
    let p_c_late = f.opt("p_c_late", 0.0, 1.0);
    let onset_min = f.opt("onset_min", 0.0, 1e6);
    let lat_mu = f.num("lat_mu", 0.1f64.ln(), -50.0, 50.0);
    let lat_sigma = f.num("lat_sigma", 0.5, 1e-6, 10.0);
    let lat_shift_c = f.num("lat_shift_c", 0.0, -20.0, 20.0);
    let tail_frac_c = f.num("tail_frac_c", 0.0, 0.0, 1.0);
    let tail_add_s = f.num("tail_add_s", 1.0, 0.0, 1e6);
    let overdispersion = f.num("overdispersion", 1.0, 1.0, 1e6);
    let diurnal_amp = f.num("diurnal_amp", 0.0, 0.0, 1.0);
    let load_err_coupling = f.num("load_err_coupling", 0.0, -100.0, 100.0);
    let lat_missing_c = match m.get("lat_missing_c") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if a.len() == 2 => match (a[0].as_f64(), a[1].as_f64()) {
            (Some(x), Some(y)) if x.is_finite() && y.is_finite() && x <= y => Some((x, y)),
            _ => {
                problems.push(format!(
                    "{name}.lat_missing_c: expected [from, to] minutes with from <= to"
                ));
                None
            }
        },
        Some(other) => {
            problems.push(format!(
                "{name}.lat_missing_c: expected [from, to] minutes, found {other}"
            ));
            None
        }
    };
    let accuracy = match m.get("accuracy") {
        None | Some(Value::Null) => None,
        Some(Value::Object(a)) => {
            let an = format!("{name}.accuracy");
            for k in a.keys() {
                if !["coverage", "delay_mean_min", "q_s", "q_c"].contains(&k.as_str()) {
                    problems.push(format!(
                        "{an}.{k}: unknown field (expected coverage, delay_mean_min, q_s, q_c)"
                    ));
                }
            }
            let mut g = Fields {
                name: &an,
                m: a,
                problems,
            };
            let coverage = g.num("coverage", 1.0, 0.0, 1.0);
            let delay_mean_min = g.num("delay_mean_min", 0.0, 0.0, 1e6);
            let q_s = g.num("q_s", 0.1, 0.0, 1.0);
            let q_c = g.num("q_c", q_s, 0.0, 1.0);
            Some(Accuracy {
                coverage,
                delay_mean_min,
                q_s,
                q_c,
            })
        }
        Some(other) => {
            problems.push(format!(
                "{name}.accuracy: expected an object or null, found {other}"
            ));
            None
        }
    };
    let expected = match m.get("expected").and_then(Value::as_str) {
        Some("promote") => Some(Expected::Promote),
        Some("rollback") => Some(Expected::Rollback),
        Some(other) => {
            problems.push(format!(
                "{name}.expected: expected promote or rollback, found {other:?}"
            ));
            None
        }
        None => {
            problems.push(format!(
                "{name}.expected: missing; expected promote or rollback"
            ));
            None
        }
    };
    if problems.len() > before {
        return None;
    }
    Some(Scenario {
        name: name.to_owned(),
        total_rpm,
        share,
        realized_share,
        p_s,
        p_c,
        p_c_late,
        onset_min,
        lat_mu,
        lat_sigma,
        lat_shift_c,
        tail_frac_c,
        tail_add_s,
        overdispersion,
        diurnal_amp,
        load_err_coupling,
        lat_missing_c,
        accuracy,
        expected: expected?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_scenario_gets_defaults() {
        let s = parse("t.json", r#"{"a": {"expected": "promote"}}"#).expect("valid");
        assert_eq!(s[0].total_rpm, 20_000.0);
        assert_eq!(s[0].p_c, s[0].p_s);
        assert_eq!(s[0].accuracy, None);
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let e = parse(
            "t.json",
            r#"{"a": {"p_c": 2, "typo": 1}, "b": {"expected": "maybe"}}"#,
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("t.json: a.p_c: expected a number from 0 to 1, found 2"),
            "{text}"
        );
        assert!(text.contains("a.typo: unknown field"), "{text}");
        assert!(text.contains("a.expected: missing"), "{text}");
        assert!(
            text.contains("b.expected: expected promote or rollback, found \"maybe\""),
            "{text}"
        );
    }

    #[test]
    fn the_shared_scenarios_parse() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/bench/scenarios.json"
        );
        let text =
            std::fs::read_to_string(path).expect("a copy of the shared scenarios is in tests/data");
        let s = parse(path, &text).expect("the shared scenarios are valid");
        assert_eq!(s.len(), 15);
    }
}
