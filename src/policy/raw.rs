//! The policy file's shape: the only code that knows YAML field names.
//!
//! Turns the positioned tree into raw structs whose every value remembers where it was
//! written, reporting unknown keys and wrong types as it goes. What the values mean is
//! `validate.rs`'s business.

use super::tree::{Node, Pos, Value};
use std::collections::BTreeMap;

/// A value and where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct At<T> {
    pub value: T,
    pub pos: Pos,
    /// Field path, e.g. `metrics[1].max`.
    pub path: String,
}

/// A scalar kept as written, for values whose unit is decided later (`1%`, `250ms`, `0.5`).
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Num(f64),
    Text(String),
}

/// One problem found in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub pos: Pos,
    pub path: String,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct RawPolicy {
    pub name: Option<At<String>>,
    pub model: Option<At<String>>,
    pub stable: Option<At<String>>,
    pub canary: Option<At<String>>,
    pub strategy: Option<At<RawStrategy>>,
    pub analysis: Option<At<RawAnalysis>>,
    pub metrics: Option<At<Vec<At<RawMetric>>>>,
    pub router: Option<At<RawRouter>>,
    pub webhooks: Option<At<Vec<At<RawWebhook>>>>,
    pub prometheus: Option<At<RawPrometheus>>,
    pub series: Option<At<BTreeMap<String, At<String>>>>,
}

#[derive(Debug, Default)]
pub struct RawStrategy {
    pub kind: Option<At<String>>,
    pub steps: Option<At<Vec<At<f64>>>>,
    pub interval: Option<At<String>>,
    pub min_step_duration: Option<At<String>>,
    pub failure_limit: Option<At<i64>>,
    pub progress_deadline: Option<At<String>>,
    pub on_no_data: Option<At<String>>,
    pub manual_promotion: Option<At<bool>>,
    pub post_promotion_watch: Option<At<String>>,
    pub bake: Option<At<String>>,
    pub router_deadline: Option<At<String>>,
}

#[derive(Debug, Default)]
pub struct RawAnalysis {
    pub method: Option<At<String>>,
    pub confidence: Option<At<Scalar>>,
}

#[derive(Debug, Default)]
pub struct RawMetric {
    pub name: Option<At<String>>,
    pub builtin: Option<At<String>>,
    pub query: Option<At<String>>,
    pub quantile: Option<At<Scalar>>,
    pub max: Option<At<Scalar>>,
    pub min: Option<At<Scalar>>,
    pub max_increase: Option<At<Scalar>>,
    pub max_decrease: Option<At<Scalar>>,
    pub min_samples: Option<At<i64>>,
    pub critical: Option<At<bool>>,
}

#[derive(Debug, Default)]
pub struct RawRouter {
    pub haproxy: Option<At<RawHaproxy>>,
    pub nginx: Option<At<RawNginx>>,
    pub webhook: Option<At<RawWebhookRouter>>,
    pub file: Option<At<RawFileRouter>>,
}

#[derive(Debug, Default)]
pub struct RawHaproxy {
    pub socket: Option<At<String>>,
    pub backend: Option<At<String>>,
    pub servers: Option<At<BTreeMap<String, At<String>>>>,
}

#[derive(Debug, Default)]
pub struct RawNginx {
    pub weights_file: Option<At<String>>,
    pub reload: Option<At<Vec<At<String>>>>,
    pub upstream: Option<At<String>>,
    pub servers: Option<At<BTreeMap<String, At<String>>>>,
}

#[derive(Debug, Default)]
pub struct RawWebhookRouter {
    pub url: Option<At<String>>,
    pub timeout: Option<At<String>>,
}

#[derive(Debug, Default)]
pub struct RawFileRouter {
    pub path: Option<At<String>>,
}

#[derive(Debug, Default)]
pub struct RawWebhook {
    pub on: Option<At<String>>,
    pub url: Option<At<String>>,
    pub timeout: Option<At<String>>,
}

#[derive(Debug, Default)]
pub struct RawPrometheus {
    pub url: Option<At<String>>,
    pub bearer_token_file: Option<At<String>>,
    pub basic_auth: Option<At<RawBasicAuth>>,
}

#[derive(Debug, Default)]
pub struct RawBasicAuth {
    pub username: Option<At<String>>,
    pub password_file: Option<At<String>>,
}

/// The keys of the `series` section (model-server convention overrides).
pub const SERIES_KEYS: [&str; 9] = [
    "requests",
    "duration",
    "scored",
    "model_label",
    "version_label",
    "outcome_label",
    "error_value",
    "correct_label",
    "correct_value",
];

/// Collects problems while walking the tree.
struct Walker {
    problems: Vec<Problem>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl Walker {
    fn problem(&mut self, pos: Pos, path: &str, message: String) {
        self.problems.push(Problem {
            pos,
            path: path.to_owned(),
            message,
        });
    }

    /// Visits a mapping's entries; keys not in `allowed` are reported.
    fn map<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        allowed: &[&str],
        mut f: impl FnMut(&mut Self, &str, &'n Node, String),
    ) -> bool {
        let Value::Map(entries) = &node.value else {
            let found = node.value.describe();
            self.problem(node.pos, path, format!("expected a mapping, found {found}"));
            return false;
        };
        for (key, value) in entries {
            let p = join(path, &key.name);
            if allowed.contains(&key.name.as_str()) {
                f(self, &key.name, value, p);
            } else {
                let hint = closest(&key.name, allowed)
                    .map(|c| format!(" (did you mean `{c}`?)"))
                    .unwrap_or_default();
                // A long key (a file that is not a policy) is shown by its start.
                self.problem(
                    key.pos,
                    &join(path, &crate::text::cut(&key.name)),
                    format!(
                        "unknown field `{}`{hint}, expected one of: {}",
                        crate::text::cut(&key.name),
                        allowed.join(", ")
                    ),
                );
            }
        }
        true
    }

    /// A duration's text. A number there is a duration without its unit, which the
    /// validator says (`expected a duration with a unit`), not a label to quote.
    fn duration(&mut self, node: &Node, path: String) -> Option<At<String>> {
        match &node.value {
            Value::Float(f) => Some(At {
                value: f.to_string(),
                pos: node.pos,
                path,
            }),
            _ => self.string(node, path),
        }
    }

    /// A command-line word: text, or a bare `true`, `false` or whole number (a fraction
    /// would not stay as written, so it must be quoted, as `string` says).
    fn word(&mut self, node: &Node, path: String) -> Option<At<String>> {
        let value = match &node.value {
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            _ => return self.string(node, path),
        };
        Some(At {
            value,
            pos: node.pos,
            path,
        })
    }

    fn string(&mut self, node: &Node, path: String) -> Option<At<String>> {
        let value = match &node.value {
            Value::Str(s) => s.clone(),
            // Version labels and names such as `2` are text to Prometheus.
            Value::Int(i) => i.to_string(),
            // YAML reads `1.10` as the number 1.1: the label would not be the one written.
            Value::Float(f) => {
                self.problem(
                    node.pos,
                    &path,
                    format!(
                        "expected text, found the number {}; quote it (like \"1.10\") so that \
                         it stays as written",
                        crate::text::cut(&f.to_string())
                    ),
                );
                return None;
            }
            other => {
                let found = other.describe();
                self.problem(node.pos, &path, format!("expected text, found {found}"));
                return None;
            }
        };
        Some(At {
            value,
            pos: node.pos,
            path,
        })
    }

    fn number(&mut self, node: &Node, path: String) -> Option<At<f64>> {
        let value = match &node.value {
            Value::Int(i) => *i as f64,
            Value::Float(f) => *f,
            other => {
                let found = other.describe();
                self.problem(node.pos, &path, format!("expected a number, found {found}"));
                return None;
            }
        };
        Some(At {
            value,
            pos: node.pos,
            path,
        })
    }

    /// A number of percent, written bare (`25`) or with its sign (`25%`), as traffic
    /// weights are.
    fn percent(&mut self, node: &Node, path: String) -> Option<At<f64>> {
        if let Value::Str(text) = &node.value
            && let Some(x) = text
                .trim()
                .strip_suffix('%')
                .and_then(|n| n.trim().parse::<f64>().ok())
        {
            return Some(At {
                value: x,
                pos: node.pos,
                path,
            });
        }
        self.number(node, path)
    }

    fn integer(&mut self, node: &Node, path: String) -> Option<At<i64>> {
        match &node.value {
            Value::Int(i) => Some(At {
                value: *i,
                pos: node.pos,
                path,
            }),
            other => {
                let found = other.describe();
                self.problem(
                    node.pos,
                    &path,
                    format!("expected a whole number, found {found}"),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, path: String) -> Option<At<bool>> {
        match &node.value {
            Value::Bool(b) => Some(At {
                value: *b,
                pos: node.pos,
                path,
            }),
            other => {
                let found = other.describe();
                // `"false"` in quotes is text, and `yes`/`no` are text in YAML 1.2.
                let hint = match other {
                    Value::Str(t) if matches!(t.trim(), "true" | "false") => {
                        " (without the quotes)"
                    }
                    Value::Str(t)
                        if matches!(
                            t.trim().to_ascii_lowercase().as_str(),
                            "yes" | "no" | "on" | "off"
                        ) =>
                    {
                        " (YAML reads yes, no, on and off as text here)"
                    }
                    _ => "",
                };
                self.problem(
                    node.pos,
                    &path,
                    format!("expected true or false{hint}, found {found}"),
                );
                None
            }
        }
    }

    fn scalar(&mut self, node: &Node, path: String) -> Option<At<Scalar>> {
        let value = match &node.value {
            Value::Int(i) => Scalar::Num(*i as f64),
            Value::Float(f) => Scalar::Num(*f),
            Value::Str(s) => Scalar::Text(s.clone()),
            other => {
                let found = other.describe();
                self.problem(
                    node.pos,
                    &path,
                    format!("expected a number, percentage or duration, found {found}"),
                );
                return None;
            }
        };
        Some(At {
            value,
            pos: node.pos,
            path,
        })
    }

    fn seq<T>(
        &mut self,
        node: &Node,
        path: String,
        mut item: impl FnMut(&mut Self, &Node, String) -> Option<T>,
    ) -> Option<At<Vec<T>>> {
        let Value::Seq(items) = &node.value else {
            let found = node.value.describe();
            self.problem(node.pos, &path, format!("expected a list, found {found}"));
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, n) in items.iter().enumerate() {
            if let Some(v) = item(self, n, format!("{path}[{i}]")) {
                out.push(v);
            }
        }
        Some(At {
            value: out,
            pos: node.pos,
            path,
        })
    }

    fn string_map(
        &mut self,
        node: &Node,
        path: String,
    ) -> Option<At<BTreeMap<String, At<String>>>> {
        let Value::Map(entries) = &node.value else {
            let found = node.value.describe();
            self.problem(
                node.pos,
                &path,
                format!("expected a mapping, found {found}"),
            );
            return None;
        };
        let mut out = BTreeMap::new();
        for (key, value) in entries {
            if let Some(v) = self.string(value, join(&path, &key.name)) {
                out.insert(key.name.clone(), v);
            }
        }
        Some(At {
            value: out,
            pos: node.pos,
            path,
        })
    }

    fn at<T: Default>(
        &mut self,
        node: &Node,
        path: String,
        allowed: &[&str],
        mut f: impl FnMut(&mut Self, &mut T, &str, &Node, String),
    ) -> Option<At<T>> {
        let mut value = T::default();
        let ok = self.map(node, &path, allowed, |w, k, n, p| f(w, &mut value, k, n, p));
        ok.then_some(At {
            value,
            pos: node.pos,
            path,
        })
    }
}

/// The closest allowed word to a misspelt one, if it is close: at most one edit per three
/// characters, so that short unrelated words (`id`, `on`) are not offered as corrections.
pub fn closest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|a| (edit_distance(key, a), *a))
        .filter(|(d, a)| *d > 0 && *d * 3 <= a.len().max(key.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Reads a policy document; returns what could be read and every problem met.
pub fn read(doc: &Node) -> (RawPolicy, Vec<Problem>) {
    let mut w = Walker {
        problems: Vec::new(),
    };
    let mut raw = RawPolicy::default();
    const TOP: [&str; 11] = [
        "name",
        "model",
        "stable",
        "canary",
        "strategy",
        "analysis",
        "metrics",
        "router",
        "webhooks",
        "prometheus",
        "series",
    ];
    if matches!(doc.value, Value::Null) {
        w.problem(
            doc.pos,
            "",
            "expected a policy (a mapping with name, stable, canary, strategy, metrics and \
             router), found an empty file"
                .into(),
        );
        return (raw, w.problems);
    }
    if !matches!(doc.value, Value::Map(_)) {
        let found = doc.value.describe();
        w.problem(
            doc.pos,
            "",
            format!(
                "expected a policy (a mapping with name, stable, canary, strategy, metrics \
                 and router), found {found}"
            ),
        );
        return (raw, w.problems);
    }
    w.map(doc, "", &TOP, |w, key, n, p| match key {
        "name" => raw.name = w.string(n, p),
        "model" => raw.model = w.string(n, p),
        "stable" => raw.stable = w.string(n, p),
        "canary" => raw.canary = w.string(n, p),
        "strategy" => raw.strategy = strategy(w, n, p),
        "analysis" => {
            raw.analysis = w.at(
                n,
                p,
                &["method", "confidence"],
                |w, a: &mut RawAnalysis, k, n, p| match k {
                    "method" => a.method = w.string(n, p),
                    _ => a.confidence = w.scalar(n, p),
                },
            )
        }
        "metrics" => raw.metrics = w.seq(n, p, metric),
        "router" => raw.router = router(w, n, p),
        "webhooks" => {
            raw.webhooks = w.seq(n, p, |w, n, p| {
                w.at(
                    n,
                    p,
                    &["on", "url", "timeout"],
                    |w, h: &mut RawWebhook, k, n, p| match k {
                        "on" => h.on = w.string(n, p),
                        "url" => h.url = w.string(n, p),
                        _ => h.timeout = w.duration(n, p),
                    },
                )
            })
        }
        "prometheus" => raw.prometheus = prometheus(w, n, p),
        _ => {
            let mut series = BTreeMap::new();
            let ok = w.map(n, &p, &SERIES_KEYS, |w, k, n, p| {
                if let Some(v) = w.string(n, p) {
                    series.insert(k.to_owned(), v);
                }
            });
            if ok {
                raw.series = Some(At {
                    value: series,
                    pos: n.pos,
                    path: p,
                });
            }
        }
    });
    (raw, w.problems)
}

fn strategy(w: &mut Walker, n: &Node, p: String) -> Option<At<RawStrategy>> {
    const KEYS: [&str; 11] = [
        "kind",
        "steps",
        "interval",
        "min_step_duration",
        "failure_limit",
        "progress_deadline",
        "on_no_data",
        "manual_promotion",
        "post_promotion_watch",
        "bake",
        "router_deadline",
    ];
    w.at(n, p, &KEYS, |w, s: &mut RawStrategy, k, n, p| match k {
        "kind" => s.kind = w.string(n, p),
        "steps" => s.steps = w.seq(n, p, |w, n, p| w.percent(n, p)),
        "interval" => s.interval = w.duration(n, p),
        "min_step_duration" => s.min_step_duration = w.duration(n, p),
        "failure_limit" => s.failure_limit = w.integer(n, p),
        "progress_deadline" => s.progress_deadline = w.duration(n, p),
        "on_no_data" => s.on_no_data = w.string(n, p),
        "manual_promotion" => s.manual_promotion = w.boolean(n, p),
        "post_promotion_watch" => s.post_promotion_watch = w.duration(n, p),
        "bake" => s.bake = w.duration(n, p),
        _ => s.router_deadline = w.duration(n, p),
    })
}

fn metric(w: &mut Walker, n: &Node, p: String) -> Option<At<RawMetric>> {
    const KEYS: [&str; 10] = [
        "name",
        "builtin",
        "query",
        "quantile",
        "max",
        "min",
        "max_increase",
        "max_decrease",
        "min_samples",
        "critical",
    ];
    w.at(n, p, &KEYS, |w, m: &mut RawMetric, k, n, p| match k {
        "name" => m.name = w.string(n, p),
        "builtin" => m.builtin = w.string(n, p),
        "query" => m.query = w.string(n, p),
        "quantile" => m.quantile = w.scalar(n, p),
        "max" => m.max = w.scalar(n, p),
        "min" => m.min = w.scalar(n, p),
        "max_increase" => m.max_increase = w.scalar(n, p),
        "max_decrease" => m.max_decrease = w.scalar(n, p),
        "min_samples" => m.min_samples = w.integer(n, p),
        _ => m.critical = w.boolean(n, p),
    })
}

fn router(w: &mut Walker, n: &Node, p: String) -> Option<At<RawRouter>> {
    w.at(
        n,
        p,
        &["haproxy", "nginx", "webhook", "file"],
        |w, r: &mut RawRouter, k, n, p| match k {
            "haproxy" => {
                r.haproxy = w.at(
                    n,
                    p,
                    &["socket", "backend", "servers"],
                    |w, h: &mut RawHaproxy, k, n, p| match k {
                        "socket" => h.socket = w.string(n, p),
                        "backend" => h.backend = w.string(n, p),
                        _ => h.servers = w.string_map(n, p),
                    },
                )
            }
            "nginx" => {
                const KEYS: [&str; 4] = ["weights_file", "reload", "upstream", "servers"];
                r.nginx = w.at(n, p, &KEYS, |w, g: &mut RawNginx, k, n, p| match k {
                    "weights_file" => g.weights_file = w.string(n, p),
                    // `[true]` is the `true` command, not a boolean.
                    "reload" => g.reload = w.seq(n, p, |w, n, p| w.word(n, p)),
                    "upstream" => g.upstream = w.string(n, p),
                    _ => g.servers = w.string_map(n, p),
                })
            }
            "webhook" => {
                r.webhook = w.at(
                    n,
                    p,
                    &["url", "timeout"],
                    |w, h: &mut RawWebhookRouter, k, n, p| match k {
                        "url" => h.url = w.string(n, p),
                        _ => h.timeout = w.duration(n, p),
                    },
                )
            }
            _ => {
                r.file = w.at(n, p, &["path"], |w, f: &mut RawFileRouter, _, n, p| {
                    f.path = w.string(n, p)
                })
            }
        },
    )
}

fn prometheus(w: &mut Walker, n: &Node, p: String) -> Option<At<RawPrometheus>> {
    w.at(
        n,
        p,
        &["url", "bearer_token_file", "basic_auth"],
        |w, r: &mut RawPrometheus, k, n, p| match k {
            "url" => r.url = w.string(n, p),
            "bearer_token_file" => r.bearer_token_file = w.string(n, p),
            _ => {
                r.basic_auth = w.at(
                    n,
                    p,
                    &["username", "password_file"],
                    |w, b: &mut RawBasicAuth, k, n, p| match k {
                        "username" => b.username = w.string(n, p),
                        _ => b.password_file = w.string(n, p),
                    },
                )
            }
        },
    )
}
