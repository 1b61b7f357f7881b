//! The Grafana dashboards and the recording rules against a real Prometheus: every PromQL
//! expression in every dashboard (panel targets, annotations, variable queries) and every
//! recording rule is extracted, its template variables are replaced by concrete values, and the
//! Prometheus started here must parse it. `dashboard_queries` is the extraction a test with the
//! full demo running reuses to check that each query also returns data.

use crate::support::{ChildGuard, find_binary, free_port, wait_for, wait_for_port};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The repository root (where prometheus.yml and grafana/ live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every dashboard JSON in grafana/dashboards, sorted by file name, parsed.
pub fn dashboards() -> Vec<(String, Value)> {
    let dir = repo_root().join("grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", p.display()));
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, v)
        })
        .collect()
}

/// The panels of a dashboard that show data (rows left out, the panels inside rows included),
/// each with a human-readable location.
pub fn data_panels<'a>(file: &str, dashboard: &'a Value) -> Vec<(String, &'a Value)> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"]
        .as_array()
        .map(|a| a.iter().rev().collect())
        .unwrap_or_default();
    while let Some(p) = stack.pop() {
        if p["type"] == "row" {
            if let Some(children) = p["panels"].as_array() {
                stack.extend(children.iter().rev());
            }
            continue;
        }
        let title = p["title"].as_str().unwrap_or("(untitled)");
        out.push((format!("{file} › panel {:?} (id {})", title, p["id"]), p));
    }
    out
}

/// The template variables of the dashboards with the values `dashboard_queries` substitutes:
/// the demo's rollout, metric and model names, and fixed durations for Grafana's built-ins.
pub fn default_variables() -> BTreeMap<String, String> {
    [
        ("rollout", "demo-good"),
        ("metric", "error-rate"),
        ("model", "demo-model"),
        ("__rate_interval", "20s"),
        ("__interval", "5s"),
        ("__range", "5m"),
        ("__range_s", "300"),
        ("__range_ms", "300000"),
        ("__interval_ms", "5000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Replaces Grafana template variables (`$name`, `${name}`, `${name:format}`, `[[name]]`) with
/// the values in `vars`, longest names first so `$__range_s` is not read as `$__range`.
/// Panics on a variable that `vars` does not name, so a new variable cannot slip through
/// unsubstituted.
pub fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> String {
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(inner) = rest.strip_prefix("${") {
            let end = inner
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {expr:?}"));
            let name = inner[..end].split(':').next().unwrap();
            let v = vars
                .get(name)
                .unwrap_or_else(|| panic!("unknown variable ${{{name}}} in {expr:?}"));
            out.push_str(v);
            rest = &inner[end + 1..];
        } else if let Some(inner) = rest.strip_prefix("[[") {
            let end = inner
                .find("]]")
                .unwrap_or_else(|| panic!("unclosed [[ in {expr:?}"));
            let name = inner[..end].split(':').next().unwrap();
            let v = vars
                .get(name)
                .unwrap_or_else(|| panic!("unknown variable [[{name}]] in {expr:?}"));
            out.push_str(v);
            rest = &inner[end + 2..];
        } else if let Some(inner) = rest.strip_prefix('$') {
            let name = names
                .iter()
                .find(|n| {
                    inner.starts_with(n.as_str())
                        && !inner[n.len()..]
                            .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                })
                .unwrap_or_else(|| panic!("unknown variable at {rest:?} in {expr:?}"));
            out.push_str(&vars[name.as_str()]);
            rest = &inner[name.len()..];
        } else {
            // A '[' that does not open [[var]], e.g. a range selector.
            out.push('[');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The PromQL inside a Grafana Prometheus variable query: `label_values(sel, label)` and
/// `label_values(label)` query series, `query_result(q)` runs `q`; `label_names()` and
/// `metrics(regex)` are not PromQL and give `None`.
fn variable_promql(query: &str) -> Option<String> {
    let q = query.trim();
    if let Some(args) = q
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
    {
        // The selector is everything before the last comma outside braces.
        let mut depth = 0i32;
        let mut split = None;
        for (i, c) in args.char_indices() {
            match c {
                '{' | '(' => depth += 1,
                '}' | ')' => depth -= 1,
                ',' if depth == 0 => split = Some(i),
                _ => {}
            }
        }
        return split.map(|i| args[..i].trim().to_string());
    }
    q.strip_prefix("query_result(")
        .and_then(|s| s.strip_suffix(')'))
        .map(|s| s.trim().to_string())
}

/// Every PromQL expression of the dashboards and the recording rules, with the template
/// variables replaced by `vars`: (where it comes from, the query).
pub fn dashboard_queries_with(vars: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        for (at, panel) in data_panels(&file, &d) {
            for t in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    let at = format!("{at} › target {}", t["refId"].as_str().unwrap_or("?"));
                    out.push((at, substitute(expr, vars)));
                }
            }
        }
        for a in d["annotations"]["list"].as_array().into_iter().flatten() {
            let expr = a["target"]["expr"].as_str().or(a["expr"].as_str());
            if let Some(expr) = expr {
                let at = format!(
                    "{file} › annotation {:?}",
                    a["name"].as_str().unwrap_or("?")
                );
                out.push((at, substitute(expr, vars)));
            }
        }
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            if v["type"] != "query" {
                continue;
            }
            let query = v["query"].as_str().or(v["query"]["query"].as_str());
            if let Some(promql) = query.and_then(variable_promql) {
                let at = format!("{file} › variable ${}", v["name"].as_str().unwrap_or("?"));
                out.push((at, substitute(&promql, vars)));
            }
        }
    }
    for (at, expr) in recording_rules() {
        out.push((at, substitute(&expr, vars)));
    }
    out
}

/// `dashboard_queries_with(&default_variables())`.
pub fn dashboard_queries() -> Vec<(String, String)> {
    dashboard_queries_with(&default_variables())
}

/// The rule files prometheus.yml names, resolved against its directory as Prometheus does.
pub fn rule_files() -> Vec<PathBuf> {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("prometheus.yml")).expect("read prometheus.yml");
    let config: Value = serde_saphyr::from_str(&text).expect("prometheus.yml is YAML");
    config["rule_files"]
        .as_array()
        .expect("prometheus.yml has rule_files")
        .iter()
        .map(|f| root.join(f.as_str().expect("rule file path")))
        .collect()
}

/// Every recording rule of the rule files: (where, expression).
pub fn recording_rules() -> Vec<(String, String)> {
    rules_of_kind("record")
        .into_iter()
        .map(|(file, group, name, expr)| (format!("{file} › group {group} › {name}"), expr))
        .collect()
}

/// Every alerting rule of the rule files: (name, expression).
pub fn alerting_rules() -> Vec<(String, String)> {
    rules_of_kind("alert")
        .into_iter()
        .map(|(_, _, name, expr)| (name, expr))
        .collect()
}

/// The rules with a `kind` key (`record` or `alert`): (file, group, name, expression).
fn rules_of_kind(kind: &str) -> Vec<(String, Value, String, String)> {
    let mut out = Vec::new();
    for path in rule_files() {
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let rules: Value = serde_saphyr::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for g in rules["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                if let (Some(name), Some(expr)) = (r[kind].as_str(), r["expr"].as_str()) {
                    out.push((
                        file.clone(),
                        g["name"].clone(),
                        name.to_string(),
                        expr.to_string(),
                    ));
                }
            }
        }
    }
    out
}

/// A Prometheus on a free loopback port with an empty TSDB in a tempdir, loading `rule_files`
/// and scraping nothing, or the given targets. Killed when dropped.
pub struct TestPrometheus {
    pub port: u16,
    pub child: ChildGuard,
    pub dir: tempfile::TempDir,
}

impl TestPrometheus {
    pub async fn start(rule_files: &[PathBuf]) -> TestPrometheus {
        TestPrometheus::scraping(rule_files, &[]).await
    }

    /// Scrapes `targets` (`host:port`, job `canaryd`) every second.
    pub async fn scraping(rule_files: &[PathBuf], targets: &[String]) -> TestPrometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n",
        );
        for f in rule_files {
            config.push_str(&format!("  - {:?}\n", f.display().to_string()));
        }
        if targets.is_empty() {
            config.push_str("scrape_configs: []\n");
        } else {
            config.push_str(&format!(
                "scrape_configs:\n  - job_name: canaryd\n    static_configs:\n      - targets: {targets:?}\n"
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write config");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = ChildGuard::spawn(
            Command::new(find_binary("prometheus"))
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        );
        let mut p = TestPrometheus { port, child, dir };
        wait_for_port(port, Duration::from_secs(30)).await;
        let url = p.url("/-/ready");
        wait_for("Prometheus to be ready", Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                let r = reqwest::get(&url).await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        assert!(p.child.alive(), "Prometheus exited:\n{}", p.log());
        p
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Runs an instant query; returns the HTTP status and the JSON body.
    pub async fn query(&self, client: &reqwest::Client, promql: &str) -> (u16, Value) {
        let r = client
            .get(self.url("/api/v1/query"))
            .query(&[("query", promql)])
            .send()
            .await
            .unwrap_or_else(|e| panic!("query {promql:?}: {e}"));
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Prometheus' own clock (`time()`), in Unix seconds, so tests need not read the system clock.
    pub async fn now(&self, client: &reqwest::Client) -> f64 {
        let (status, body) = self.query(client, "time()").await;
        assert_eq!(status, 200, "time(): {body}");
        body["data"]["result"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("time() returned {body}"))
    }

    /// Runs a range query over the last `span` (by Prometheus' clock) with `step`; returns the
    /// HTTP status and the JSON body. For queries such as the decision annotations
    /// (`increase(...[30s]) > 0`) that only have data around the moment something happened.
    pub async fn query_range(
        &self,
        client: &reqwest::Client,
        promql: &str,
        span: Duration,
        step: Duration,
    ) -> (u16, Value) {
        let end = self.now(client).await;
        let start = end - span.as_secs_f64();
        let r = client
            .get(self.url("/api/v1/query_range"))
            .query(&[
                ("query", promql.to_string()),
                ("start", format!("{start:.3}")),
                ("end", format!("{end:.3}")),
                ("step", format!("{}s", step.as_secs().max(1))),
            ])
            .send()
            .await
            .unwrap_or_else(|e| panic!("query_range {promql:?}: {e}"));
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        (status, body)
    }
}

#[test]
fn every_dashboard_panel_has_a_promql_query() {
    let dashboards = dashboards();
    let names: Vec<&str> = dashboards.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"canaryd-overview.json") && names.contains(&"canaryd-rollout.json"),
        "dashboards found: {names:?}"
    );
    let mut bare = Vec::new();
    let mut panels = 0;
    for (file, d) in &dashboards {
        for (at, p) in data_panels(file, d) {
            panels += 1;
            let exprs = p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()))
                .count();
            if exprs == 0 {
                bare.push(at);
            }
        }
    }
    assert!(panels >= 10, "only {panels} panels in the dashboards");
    assert!(bare.is_empty(), "panels without a PromQL target: {bare:#?}");

    let queries = dashboard_queries();
    for (at, q) in &queries {
        assert!(!q.contains('$'), "{at}: unsubstituted variable in {q:?}");
    }
    // Each of the things the rollout dashboard must show is queried somewhere.
    for needle in [
        "canaryd_rollout_phase",
        "canaryd_rollout_canary_weight",
        "canaryd_rollout_step",
        "canaryd_decisions_total",
        "canaryd_analysis_value",
        "canaryd_analysis_bound",
        "canaryd_analysis_log_evalue",
        "canaryd_analysis_log_evalue_threshold",
        "canaryd_prometheus_query_duration_seconds",
        "canaryd_prometheus_query_errors_total",
        "canaryd_router_call_duration_seconds",
        "canaryd_router_errors_total",
        "canaryd_policy_invalid",
        "canaryd_invalid_policy_files",
        "canaryd_leader",
        "model_version:model_request_error_ratio:rate1m",
        "model_version:model_request_duration_seconds:p99_1m",
        "model_version:model_prediction_accuracy:ratio5m",
    ] {
        assert!(
            queries
                .iter()
                .any(|(at, q)| !at.contains("rules.yml") && q.contains(needle)),
            "no dashboard query uses {needle}"
        );
    }
    assert!(
        queries
            .iter()
            .any(|(at, q)| at.contains("annotation") && q.contains("canaryd_decisions_total")),
        "decisions are not annotations"
    );
}

#[test]
fn substitution_covers_grafana_variable_forms() {
    let vars = default_variables();
    assert_eq!(
        substitute(
            r#"rate(x{rollout="$rollout",m="${metric}",v="[[model]]"}[$__rate_interval]) + y[$__range] + $__range_s"#,
            &vars
        ),
        r#"rate(x{rollout="demo-good",m="error-rate",v="demo-model"}[20s]) + y[5m] + 300"#
    );
    assert_eq!(
        substitute("x{a=~\"${metric:regex}\"}[1m]", &vars),
        "x{a=~\"error-rate\"}[1m]"
    );
    let unknown = std::panic::catch_unwind(|| substitute("x{a=\"$nope\"}", &default_variables()));
    assert!(unknown.is_err(), "an unknown variable must not pass");
    assert_eq!(
        variable_promql("label_values(canaryd_analysis_value{rollout=\"$rollout\"}, metric)")
            .as_deref(),
        Some("canaryd_analysis_value{rollout=\"$rollout\"}")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_and_recording_rule_parses_in_prometheus() {
    let rules = rule_files();
    assert!(!rules.is_empty(), "prometheus.yml names no rule files");
    let prom = TestPrometheus::start(&rules).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // The rule files load: every group is there and every rule is healthy once evaluated.
    let alerts = alerting_rules();
    assert!(
        alerts.iter().any(|(name, _)| name == "CanarydNoLeader"),
        "{alerts:?}"
    );
    let expected = recording_rules().len() + alerts.len();
    assert!(expected > alerts.len(), "no recording rules");
    let rules_url = prom.url("/api/v1/rules");
    let loaded = wait_for(
        "every recording rule loaded and evaluated",
        Duration::from_secs(20),
        || {
            let (client, url) = (client.clone(), rules_url.clone());
            async move {
                let body: Value = client.get(&url).send().await.ok()?.json().await.ok()?;
                let rules: Vec<(String, String)> = body["data"]["groups"]
                    .as_array()?
                    .iter()
                    .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                    .map(|r| {
                        (
                            r["name"].as_str().unwrap_or("").to_string(),
                            r["health"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect();
                (rules.len() == expected && rules.iter().all(|(_, h)| h != "unknown"))
                    .then_some(rules)
            }
        },
    )
    .await;
    let unhealthy: Vec<_> = loaded.iter().filter(|(_, h)| h != "ok").collect();
    assert!(unhealthy.is_empty(), "unhealthy rules: {unhealthy:?}");

    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    let mut failures = Vec::new();
    for (at, q) in &queries {
        let (status, body) = prom.query(&client, q).await;
        if status != 200 || body["status"] != "success" {
            failures.push(format!(
                "{at}\n    {q}\n    -> HTTP {status}: {} {}",
                body["errorType"], body["error"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} queries rejected by Prometheus:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );

    // The check can fail: a broken expression is rejected as bad_data.
    let (status, body) = prom
        .query(&client, "sum by (rollout (canaryd_rollout_phase)")
        .await;
    assert_eq!(
        (status, body["errorType"].as_str()),
        (400, Some("bad_data"))
    );
    let (status, body) = prom
        .query_range(
            &client,
            "sum by (rollout) (canaryd_rollout_phase",
            Duration::from_secs(60),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(
        (status, body["errorType"].as_str()),
        (400, Some("bad_data"))
    );
    let (status, body) = prom
        .query_range(
            &client,
            "vector(1)",
            Duration::from_secs(60),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("success")));
    assert_eq!(
        body["data"]["result"][0]["values"].as_array().map(Vec::len),
        Some(13)
    );
}

/// Serves `text` (shared, so a test can change it) as `/metrics` on a loopback port.
async fn serve_metrics(text: std::sync::Arc<std::sync::Mutex<String>>) -> String {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = text.lock().unwrap().clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], text) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the exporter");
    let addr = listener.local_addr().expect("exporter address").to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The value of an instant query's first series, if it has one.
async fn value(prom: &TestPrometheus, client: &reqwest::Client, promql: &str) -> Option<f64> {
    let (_, body) = prom.query(client, promql).await;
    body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// Regression (UAT): the decision annotations used `changes(...)`, which also counts a counter's
/// reset, so every daemon restart drew false marks. A counter that went back to zero (`b`, a
/// restart) marks nothing; one that went up (`a`, a rollback after the restart) is marked.
#[tokio::test(flavor = "multi_thread")]
async fn decision_annotations_mark_decisions_not_daemon_restarts() {
    let counters = |a: u32, b: u32| {
        format!(
            "# TYPE canaryd_decisions_total counter\n\
             canaryd_decisions_total{{rollout=\"a\",action=\"rollback\"}} {a}\n\
             canaryd_decisions_total{{rollout=\"b\",action=\"rollback\"}} {b}\n"
        )
    };
    let text = std::sync::Arc::new(std::sync::Mutex::new(counters(0, 1)));
    let target = serve_metrics(text.clone()).await;
    let prom = TestPrometheus::scraping(&[], &[target]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    wait_for(
        "two scrapes before the restart",
        Duration::from_secs(20),
        || async {
            let n = value(
                &prom,
                &client,
                "count_over_time(canaryd_decisions_total{rollout=\"b\"}[1m])",
            )
            .await?;
            (n >= 2.0).then_some(())
        },
    )
    .await;
    *text.lock().unwrap() = counters(1, 0);
    wait_for(
        "a scrape after the restart",
        Duration::from_secs(20),
        || async {
            let a = value(&prom, &client, "canaryd_decisions_total{rollout=\"a\"}").await?;
            (a == 1.0).then_some(())
        },
    )
    .await;
    let mut marked = Vec::new();
    for rollout in ["a", "b"] {
        let mut vars = default_variables();
        vars.insert("rollout".into(), rollout.into());
        for (at, q) in dashboard_queries_with(&vars) {
            if !at.contains("annotation") {
                continue;
            }
            let (status, body) = prom.query(&client, &q).await;
            assert_eq!(status, 200, "{at}: {q}: {body}");
            for series in body["data"]["result"].as_array().into_iter().flatten() {
                let marked_rollout = series["metric"]["rollout"].as_str().unwrap_or("?");
                marked.push((marked_rollout.to_owned(), at.clone()));
            }
        }
    }
    assert!(
        marked.iter().all(|(rollout, _)| rollout != "b"),
        "a counter reset is marked: {marked:#?}"
    );
    assert!(
        marked.iter().any(|(rollout, _)| rollout == "a"),
        "the rollback is not marked: {marked:#?}"
    );
}

/// Regression (UAT): a new policy file that is broken or refused was listed under
/// `invalid_policies`, but nothing in /metrics counted it, so neither the "Invalid policies"
/// panel nor the `CanarydPolicyInvalid` alert saw it. The daemon, scraped by a Prometheus with
/// the shipped rules, has one valid policy and one new file with an unknown key.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_invalid_policy_file_shows_on_the_panel_and_raises_the_alert() {
    use crate::daemon::{Daemon, FakeRouter, FakeSource, Mode, POLICY, setup};
    let dir = setup(POLICY);
    std::fs::write(
        dir.path().join("policies/other.yaml"),
        POLICY
            .replace("name: demo", "name: other")
            .replace("failure_limit", "failure_limt"),
    )
    .unwrap();
    let source = FakeSource {
        mode: std::sync::Arc::new(std::sync::Mutex::new(Mode::Good)),
    };
    let d = Daemon::start(dir.path(), FakeRouter::default(), source, None).await;
    let target = d.url.trim_start_matches("http://").to_owned();
    let prom = TestPrometheus::scraping(&rule_files(), &[target]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let alerts = prom.url("/api/v1/alerts");
    let alert = wait_for(
        "CanarydPolicyInvalid to be pending",
        Duration::from_secs(30),
        || async {
            let body: Value = client.get(&alerts).send().await.ok()?.json().await.ok()?;
            body["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| a["labels"]["alertname"] == "CanarydPolicyInvalid")
                .cloned()
        },
    )
    .await;
    assert_eq!(
        alert["value"].as_str().map(str::parse::<f64>),
        Some(Ok(1.0)),
        "{alert}"
    );
    let (at, panel) = dashboard_queries()
        .into_iter()
        .find(|(at, _)| at.contains("canaryd-overview.json › panel \"Invalid policies\""))
        .expect("the overview's Invalid policies panel");
    assert_eq!(
        value(&prom, &client, &panel).await,
        Some(1.0),
        "{at}: {panel}"
    );
    d.stop().await;
}
