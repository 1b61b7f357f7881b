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

/// A value quoted back in an error: its JSON text, cut as policy errors cut theirs.
fn found(v: &Value) -> String {
    let text = v.to_string();
    let n = text.chars().count();
    if n <= crate::text::MAX_QUOTED {
        text
    } else {
        format!("{} ({n} characters)", crate::text::cut(&text))
    }
}

/// A JSON value like [`Value`], but an object with a key twice is an error rather than
/// keeping the last (which is what `serde_json::Value` does).
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        strict_elements(seq).map(Value::Array)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some((k, Strict(v))) = map.next_entry::<String, Strict>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format!(
                    "key {k:?} appears twice in one object"
                )));
            }
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// A sequence's elements, each read as `Strict` does.
fn strict_elements<'de, A: serde::de::SeqAccess<'de>>(mut seq: A) -> Result<Vec<Value>, A::Error> {
    let mut out = Vec::new();
    while let Some(Strict(v)) = seq.next_element()? {
        out.push(v);
    }
    Ok(out)
}

/// The top level of a scenario file, every entry kept (duplicate names included, so that
/// they can be reported by name).
enum Top {
    /// Scenarios by name, in the file's order.
    Object(Vec<(String, Value)>),
    Array(Vec<Value>),
}

impl<'de> serde::Deserialize<'de> for Top {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TopVisitor)
    }
}

struct TopVisitor;

impl<'de> serde::de::Visitor<'de> for TopVisitor {
    type Value = Top;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of scenarios by name or an array of scenarios")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Top, A::Error> {
        strict_elements(seq).map(Top::Array)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let mut out = Vec::new();
        while let Some((k, Strict(v))) = map.next_entry::<String, Strict>()? {
            out.push((k, v));
        }
        Ok(Top::Object(out))
    }
}

/// Parses a scenario file's text: an object of scenarios by name (or an array of scenarios
/// with a `name` each). Every problem is reported, not only the first. Names must be unique
/// and not empty; scenarios come back in name order for the object form, in the file's order
/// for the array form.
pub fn parse(file: &str, text: &str) -> Result<Vec<Scenario>, ScenarioError> {
    let fail = |problems: Vec<String>| ScenarioError {
        file: file.to_owned(),
        problems,
    };
    let top: Top = serde_json::from_str(text).map_err(|e| {
        // Valid JSON of the wrong shape (or with a key twice) is not "invalid JSON".
        fail(vec![if e.is_data() {
            e.to_string()
        } else {
            format!("invalid JSON: {e}")
        }])
    })?;
    let mut problems = Vec::new();
    // (name, where it is for messages, the scenario, whether the name is the object's key)
    let entries: Vec<(String, String, Value, bool)> = match top {
        Top::Object(mut pairs) => {
            // Name order, as a `serde_json::Map` would give (stable: duplicates keep theirs).
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            pairs
                .into_iter()
                .map(|(k, v)| (k.clone(), k, v, true))
                .collect()
        }
        Top::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let label = format!("#{i}");
                let name = match v.get("name") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => {
                        problems.push(format!(
                            "{label}.name: expected a string, found {}",
                            found(other)
                        ));
                        label.clone()
                    }
                    None if v.is_object() => {
                        problems.push(format!(
                            "{label}.name: missing; each scenario of an array needs a name"
                        ));
                        label.clone()
                    }
                    None => label.clone(),
                };
                (name, label, v, false)
            })
            .collect(),
    };
    if entries.is_empty() {
        return Err(fail(vec![
            "expected at least one scenario, found none".into(),
        ]));
    }
    for (name, label, _, keyed) in &entries {
        if name.trim().is_empty() {
            problems.push(if *keyed {
                format!("a scenario's name (its key) is blank: {name:?}")
            } else {
                format!("{label}.name: blank ({name:?}); a scenario needs a name")
            });
        }
    }
    let mut seen: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for (name, _, _, _) in &entries {
        *seen.entry(name).or_default() += 1;
    }
    for (name, count) in seen.iter().filter(|(_, c)| **c > 1) {
        problems.push(format!(
            "scenario {name:?} is defined {count} times; names must be unique"
        ));
    }
    let mut out = Vec::new();
    for (name, _, v, keyed) in &entries {
        match v {
            Value::Object(m) => {
                if *keyed {
                    match m.get("name") {
                        None | Some(Value::Null) => {}
                        Some(Value::String(inner)) if inner == name => {}
                        Some(other) => problems.push(format!(
                            "{name}.name: expected the scenario's key {name:?} or nothing, found {}",
                            found(other)
                        )),
                    }
                }
                if let Some(s) = scenario(name, m, &mut problems) {
                    out.push(s);
                }
            }
            other => problems.push(format!(
                "{name}: expected an object of scenario fields, found {}",
                found(other)
            )),
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
    // Checked on the fields as written, so that an invalid one is reported once, as invalid.
    let given = |k: &str| m.get(k).is_some_and(|v| !v.is_null());
    match (given("p_c_late"), given("onset_min")) {
        (true, false) => problems.push(format!(
            "{name}.p_c_late: needs onset_min (the minute from which the canary's error \
             probability is p_c_late)"
        )),
        (false, true) => problems.push(format!(
            "{name}.onset_min: needs p_c_late (the canary's error probability from that minute)"
        )),
        _ => {}
    }
    let lat_missing_c = match m.get("lat_missing_c") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Array(a)) if a.len() == 2 => match (a[0].as_f64(), a[1].as_f64()) {
            (Some(x), Some(_)) if x < 0.0 => {
                problems.push(format!(
                    "{name}.lat_missing_c: expected [from, to] minutes with 0 <= from, found {}",
                    found(v)
                ));
                None
            }
            (Some(x), Some(y)) if x > y => {
                problems.push(format!(
                    "{name}.lat_missing_c: expected [from, to] minutes with from <= to, found {}",
                    found(v)
                ));
                None
            }
            (Some(x), Some(y)) => Some((x, y)),
            _ => {
                let bad = a.iter().find(|e| !e.is_number()).unwrap_or(v);
                problems.push(format!(
                    "{name}.lat_missing_c: expected [from, to] as two numbers of minutes, found {} in {}",
                    found(bad),
                    found(v)
                ));
                None
            }
        },
        Some(other) => {
            problems.push(format!(
                "{name}.lat_missing_c: expected [from, to] minutes, found {}",
                found(other)
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
    let expected = match m.get("expected") {
        Some(Value::String(s)) if s == "promote" => Some(Expected::Promote),
        Some(Value::String(s)) if s == "rollback" => Some(Expected::Rollback),
        Some(other) => {
            problems.push(format!(
                "{name}.expected: expected promote or rollback, found {}",
                found(other)
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

    fn problems(text: &str) -> String {
        match parse("t.json", text) {
            Ok(s) => panic!("accepted {text}: {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn duplicate_names_are_refused_in_both_forms() {
        let text = problems(
            r#"[{"name": "a", "expected": "promote"}, {"name": "a", "expected": "rollback"}]"#,
        );
        assert!(
            text.contains("t.json: scenario \"a\" is defined 2 times"),
            "{text}"
        );
        // serde_json's map would keep only the last of these.
        let text = problems(
            r#"{"a": {"expected": "promote"}, "b": {"expected": "promote"}, "a": {"expected": "rollback"}}"#,
        );
        assert_eq!(
            text, "t.json: scenario \"a\" is defined 2 times; names must be unique",
            "{text}"
        );
    }

    #[test]
    fn a_field_twice_in_a_scenario_is_refused() {
        let text = problems(r#"{"a": {"expected": "promote", "p_c": 0.01, "p_c": 0.5}}"#);
        assert!(
            text.starts_with("t.json: key \"p_c\" appears twice in one object at line 1"),
            "{text}"
        );
    }

    #[test]
    fn names_must_not_be_blank_and_must_agree_with_the_key() {
        let text = problems(r#"{"": {"expected": "promote"}}"#);
        assert!(
            text.contains("t.json: a scenario's name (its key) is blank: \"\""),
            "{text}"
        );
        let text = problems(r#"[{"name": " ", "expected": "promote"}]"#);
        assert!(text.contains("t.json: #0.name: blank"), "{text}");
        let text = problems(r#"[{"expected": "promote"}]"#);
        assert!(text.contains("t.json: #0.name: missing"), "{text}");
        let text = problems(r#"[{"name": 7, "expected": "promote"}]"#);
        assert!(
            text.contains("#0.name: expected a string, found 7"),
            "{text}"
        );
        let text = problems(r#"{"a": {"name": "b", "expected": "promote"}}"#);
        assert!(
            text.contains(
                "t.json: a.name: expected the scenario's key \"a\" or nothing, found \"b\""
            ),
            "{text}"
        );
        // The same name as the key is fine, and so is an array with names.
        let s = parse("t.json", r#"{"a": {"name": "a", "expected": "promote"}}"#).expect("valid");
        assert_eq!(s[0].name, "a");
        let s = parse(
            "t.json",
            r#"[{"name": "z", "expected": "promote"}, {"name": "y", "expected": "rollback"}]"#,
        )
        .expect("valid");
        assert_eq!((s[0].name.as_str(), s[1].name.as_str()), ("z", "y"));
    }

    #[test]
    fn wrong_types_are_reported_as_found() {
        let text = problems(r#"{"a": {"expected": 1}}"#);
        assert_eq!(
            text,
            "t.json: a.expected: expected promote or rollback, found 1"
        );
        let text = problems(r#"{"a": {"expected": "promote", "lat_missing_c": ["0", 5]}}"#);
        assert_eq!(
            text,
            "t.json: a.lat_missing_c: expected [from, to] as two numbers of minutes, found \"0\" in [\"0\",5]"
        );
        let text = problems(r#"{"a": {"expected": "promote", "lat_missing_c": [10, 5]}}"#);
        assert!(text.contains("with from <= to, found [10,5]"), "{text}");
        let text = problems(r#"{"a": 5}"#);
        assert!(
            text.contains("a: expected an object of scenario fields, found 5"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_series_cannot_start_before_minute_zero() {
        let text = problems(r#"{"a": {"expected": "promote", "lat_missing_c": [-5, 5]}}"#);
        assert_eq!(
            text,
            "t.json: a.lat_missing_c: expected [from, to] minutes with 0 <= from, found [-5,5]"
        );
    }

    #[test]
    fn a_late_error_rate_needs_its_onset_and_back() {
        let text = problems(r#"{"a": {"expected": "rollback", "p_c_late": 0.05}}"#);
        assert!(
            text.starts_with("t.json: a.p_c_late: needs onset_min"),
            "{text}"
        );
        let text = problems(r#"{"a": {"expected": "rollback", "onset_min": 10}}"#);
        assert!(
            text.starts_with("t.json: a.onset_min: needs p_c_late"),
            "{text}"
        );
        // An invalid one is reported as invalid, once.
        let text = problems(r#"{"a": {"expected": "rollback", "p_c_late": 2, "onset_min": 10}}"#);
        assert_eq!(
            text,
            "t.json: a.p_c_late: expected a number from 0 to 1, found 2"
        );
        let s = parse(
            "t.json",
            r#"{"a": {"expected": "rollback", "p_c_late": 0.05, "onset_min": 10}}"#,
        )
        .expect("valid");
        assert_eq!(s[0].onset(), 10.0);
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
