//! The Prometheus source: against an in-process fake for faults a real server cannot produce
//! on demand, and against a real Prometheus scraping an exporter whose counters the test moves.

use crate::support::{ChildGuard, find_binary, free_port, wait_for, wait_for_port};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use canaryd::observation::{MetricReading, Reading, Sample};
use canaryd::policy::Policy;
use canaryd::source::prometheus::Answer;
use canaryd::source::{
    Auth, ClientOptions, LiveOutcome, LiveSeries, MetricSource, PrometheusClient, PrometheusSource,
    QueryObserver, QueryRecord, Window,
};
use canaryd::time::{Clock, SystemClock, Time};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Shared helpers

fn policy(yaml: &str) -> Policy {
    canaryd::policy::load_str("test.yaml", yaml).unwrap_or_else(|e| panic!("{e}"))
}

/// A policy for model `m` with the given versions, metrics (YAML flow items) and extra keys.
fn policy_with(stable: &str, canary: &str, metrics: &[&str], extra: &str) -> Policy {
    let mut y = format!(
        "name: m\nmodel: m\nstable: {stable}\ncanary: {canary}\n\
         strategy: {{steps: [10, 50], interval: 30s}}\n\
         router: {{file: {{path: /tmp/canaryd-test-m.json}}}}\n{extra}metrics:\n"
    );
    for m in metrics {
        let _ = writeln!(y, "  - {m}");
    }
    policy(&y)
}

fn options(timeout_ms: u64, retries: u32) -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_millis(timeout_ms),
        retries,
        backoff: Duration::from_millis(20),
        ..ClientOptions::default()
    }
}

/// The counts the sequential judge differences are counts since the rollout began, from its
/// first seconds on: never widened to the shortest query range, which would add a previous
/// attempt's errors and, while that range slides, keep the counts from growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_since_the_rollout_began_exclude_what_came_before_and_keep_growing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exported: Exported = Arc::default();
    {
        let mut e = exported.lock().unwrap_or_else(|e| e.into_inner());
        for v in ["v1", "v2"] {
            let mut c = Counters::default();
            c.serve(0, [1, 0, 0, 0, 0, 0], 0, 0);
            e.insert(v, c);
        }
    }
    let (_prometheus, client) = scraped(dir.path(), &exported, 2.0).await;
    {
        // A previous attempt, seen by Prometheus: the canary failed 1,000 of 2,000 requests.
        let mut e = exported.lock().unwrap_or_else(|e| e.into_inner());
        for (v, errors) in [("v1", 0), ("v2", 1000)] {
            if let Some(c) = e.get_mut(v) {
                c.serve(errors, [2000, 0, 0, 0, 0, 0], 0, 0);
            }
        }
    }
    wait_for_value(&client, "the previous attempt scraped", REQUESTS, 4002.0).await;
    // The new attempt starts now: 10 requests per 100 ms per version, none failing.
    let load = steady_load(&exported, |c, _| c.serve(0, [10, 0, 0, 0, 0, 0], 0, 0));
    let started = Time(first_scrape_above(&client, 4002.0).await.0 - 500);
    // The daemon's default shortest range (60 s), far longer than the looks below.
    let source = PrometheusSource::new(client.clone());
    let p = policy_with("v1", "v2", &[ERROR_RATE], "");
    let mut last_total = 0.0;
    for look in 1..=3 {
        let at = Time(started.0 + 4_000 * look);
        scraped_until(&client, at).await;
        let window = Window {
            at,
            since: started,
            rollout_started: started,
        };
        let got = source.observe(&p, window).await;
        let canary = data(&got["errors"].canary);
        let counts = canary.cumulative.expect("counts since the rollout began");
        // About 100 requests a second since the start, and not one of them failed; the
        // previous attempt's 1,000 errors are not in them.
        assert_eq!(counts.bad, 0.0, "look {look}: {counts:?}");
        assert!(
            counts.total > last_total && counts.total < 100.0 * 4.0 * look as f64 * 1.5,
            "look {look}: {counts:?} after {last_total}"
        );
        last_total = counts.total;
    }
    load.abort();
}

/// One query record: (metric, attempts, error kind, whether it was a range query).
type Record = (String, u32, Option<&'static str>, bool);

/// Remembers every query record.
#[derive(Default)]
struct Recorder(Mutex<Vec<Record>>);

impl QueryObserver for Recorder {
    fn query_done(&self, r: &QueryRecord<'_>) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.push((
            r.metric.to_owned(),
            r.attempts,
            r.error.map(|e| e.kind()),
            r.range,
        ));
    }
}

impl Recorder {
    fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn window_ending(at: Time, secs: i64) -> Window {
    Window {
        at,
        since: Time(at.0 - secs * 1000),
        rollout_started: Time(at.0 - secs * 1000),
    }
}

fn unavailable(r: &Reading) -> &str {
    match r {
        Reading::Unavailable { error } => error,
        other => panic!("expected unavailable, got {other:?}"),
    }
}

fn data(r: &Reading) -> &Sample {
    match r {
        Reading::Data(s) => s,
        other => panic!("expected data, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// In-process fake Prometheus

/// How the fake answers.
#[derive(Clone)]
enum Script {
    /// This status and body for the first `n` requests, then a vector with one sample per
    /// version (`v1` = 1, `v2` = 2) for anything after.
    FailFirst {
        n: usize,
        status: u16,
        body: &'static str,
    },
    /// Never answers.
    Hang,
    /// Never answers a query that contains this; answers as `FailFirst` past its failures
    /// anything else (a Prometheus that is up, with one query too heavy to finish).
    HangOn(&'static str),
    /// 401 unless the request's Authorization header is exactly this, like a Prometheus
    /// behind an authenticating proxy; a vector as `FailFirst` gives once past it.
    RequireAuth(String),
}

#[derive(Clone)]
struct Fake {
    script: Script,
    /// Query parameters and the Authorization header of every request.
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// One request the fake received: its query parameters and Authorization header.
type Seen = (HashMap<String, String>, Option<String>);

const OK_BODY: &str = r#"{"status":"success","data":{"resultType":"vector","result":[
    {"metric":{"version":"v1","outcome":"error"},"value":[1,"1"]},
    {"metric":{"version":"v1","outcome":"success"},"value":[1,"99"]},
    {"metric":{"version":"v2","outcome":"error"},"value":[1,"2"]},
    {"metric":{"version":"v2","outcome":"success"},"value":[1,"98"]}]}}"#;

async fn fake_query(
    State(fake): State<Fake>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let n = {
        let mut seen = fake.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.push((params, auth));
        seen.len()
    };
    match fake.script {
        Script::FailFirst {
            n: fail,
            status,
            body,
        } if n <= fail => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT),
            body.to_owned(),
        ),
        Script::FailFirst { .. } => (StatusCode::OK, OK_BODY.to_owned()),
        Script::Hang => std::future::pending().await,
        Script::HangOn(slow)
            if fake
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .last()
                .and_then(|(q, _)| q.get("query"))
                .is_some_and(|q| q.contains(slow)) =>
        {
            std::future::pending().await
        }
        Script::HangOn(_) => (StatusCode::OK, OK_BODY.to_owned()),
        Script::RequireAuth(want) => {
            let given = headers.get("authorization").and_then(|v| v.to_str().ok());
            if given == Some(want.as_str()) {
                (StatusCode::OK, OK_BODY.to_owned())
            } else {
                (StatusCode::UNAUTHORIZED, "Unauthorized".to_owned())
            }
        }
    }
}

/// Starts a fake on 127.0.0.1 and returns its URL and what it saw.
async fn start_fake(script: Script) -> (String, Fake) {
    let fake = Fake {
        script,
        seen: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/api/v1/query", get(fake_query))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake prometheus");
    let addr = listener.local_addr().expect("fake address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), fake)
}

const ERROR_RATE: &str = "{name: errors, builtin: error_rate, max: 5%}";

#[tokio::test]
async fn fake_5xx_is_retried_then_succeeds() {
    let (url, fake) = start_fake(Script::FailFirst {
        n: 2,
        status: 503,
        body: r#"{"status":"error","errorType":"unavailable","error":"not ready"}"#,
    })
    .await;
    let rec = Arc::new(Recorder::default());
    let client = PrometheusClient::new(&url, options(2000, 3)).expect("client");
    let source = PrometheusSource::new(client).with_observer(rec.clone());
    let p = policy_with("v1", "v2", &[ERROR_RATE], "");
    let at = Time(1_700_000_000_123);
    let got = source.observe(&p, window_ending(at, 600)).await;
    let r = &got["errors"];
    assert_eq!(data(&r.stable).value, Some(0.01));
    assert_eq!(data(&r.canary).value, Some(0.02));
    // Two queries (window, cumulative), the first two requests failed: 4 requests in all.
    let records = rec.take();
    let attempts: u32 = records.iter().map(|r| r.1).sum();
    assert_eq!(attempts, 4, "{records:?}");
    assert!(records.iter().all(|r| r.2.is_none()), "{records:?}");
    let seen = fake.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(seen.len(), 4);
    // The evaluation time is explicit, to the millisecond.
    assert!(
        seen.iter()
            .all(|(q, _)| q.get("time").map(String::as_str) == Some("1700000000.123"))
    );
    let queries: Vec<&str> = seen
        .iter()
        .filter_map(|(q, _)| q.get("query").map(String::as_str))
        .collect();
    assert!(queries.contains(
        &r#"sum by (version, outcome) (increase(model_requests_total{model="m",version=~"v1|v2"}[600s]))"#
    ));
}

#[tokio::test]
async fn fake_faults_are_classified_and_never_no_data() {
    // (script, retries, expected kind, text in the message, requests the fake should see)
    let cases = [
        (
            Script::FailFirst {
                n: usize::MAX,
                status: 500,
                body: "internal error",
            },
            2,
            "http",
            "answered http 500: \"internal error\"",
            3,
        ),
        (
            Script::FailFirst {
                n: usize::MAX,
                status: 200,
                body: "{\"status\":\"succ",
            },
            2,
            "bad-response",
            "not query API JSON",
            1,
        ),
        (
            Script::FailFirst {
                n: usize::MAX,
                status: 400,
                body: r#"{"status":"error","errorType":"bad_data","error":"1:12: parse error: unexpected \"}\""}"#,
            },
            2,
            "bad-query",
            "the policy's query is wrong: prometheus says bad_data: 1:12: parse error",
            1,
        ),
        (Script::Hang, 1, "timeout", "did not answer within 300ms", 2),
    ];
    for (script, retries, kind, text, requests) in cases {
        let (url, fake) = start_fake(script).await;
        let client = PrometheusClient::new(&url, options(300, retries)).expect("client");
        let source = PrometheusSource::new(client);
        // The second metric must not be asked once Prometheus looks down, and must not
        // read as no data either.
        let p = policy_with(
            "v1",
            "v2",
            &[
                "{name: first, query: 'sum(x{version=\"{{version}}\"})', max: 1}",
                "{name: second, builtin: accuracy, min: 90%}",
            ],
            "",
        );
        let got = source
            .observe(&p, window_ending(Time(1_700_000_000_000), 60))
            .await;
        for (name, r) in &got {
            for reading in [&r.stable, &r.canary] {
                let e = unavailable(reading);
                assert!(e.starts_with(kind), "{name}: {e}");
                if name == "first" {
                    assert!(e.contains(text), "{name}: {e:?} lacks {text:?}");
                    assert!(e.contains("metric first"), "{e}");
                }
            }
        }
        let seen = fake.seen.lock().unwrap_or_else(|e| e.into_inner()).len();
        // Two versions of the template, each retried while the failure is transient. The
        // accuracy metric is asked too unless Prometheus timed out and does not answer a
        // trivial query either (the probe: one request); its second query may be cancelled
        // once the first one failed.
        if kind == "timeout" {
            assert_eq!(seen, 2 * requests + 1, "{kind}");
        } else {
            assert!(
                seen > 2 * requests && seen <= 4 * requests,
                "{kind}: {seen}"
            );
        }
    }
}

/// Regression (review): one query that timed out made every later metric of the policy
/// unavailable without asking, so an error rate listed after a heavy query was never judged.
/// A Prometheus that answers a trivial query is up: the later metrics are asked.
#[tokio::test]
async fn one_slow_query_does_not_blind_the_metrics_after_it() {
    let (url, fake) = start_fake(Script::HangOn("heavy")).await;
    let client = PrometheusClient::new(&url, options(300, 0)).expect("client");
    let p = policy_with(
        "v1",
        "v2",
        &[
            "{name: first, query: 'sum(heavy{version=\"{{version}}\"})', max: 1}",
            ERROR_RATE,
        ],
        "",
    );
    let got = PrometheusSource::new(client)
        .observe(&p, window_ending(Time(1_700_000_000_000), 60))
        .await;
    assert!(unavailable(&got["first"].canary).starts_with("timeout"));
    assert_eq!(data(&got["errors"].stable).value, Some(0.01));
    assert_eq!(data(&got["errors"].canary).value, Some(0.02));
    let probes = fake
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(q, _)| q.get("query").map(String::as_str) == Some("vector(1)"))
        .count();
    assert_eq!(probes, 1, "probed once per observation");
}

/// Regression (review): an answer that came back but could not be read as the metric (here
/// a template query that returns four series, where one number was expected) left the metric
/// unavailable at every analysis while `canaryd_prometheus_query_errors_total` stayed flat.
#[tokio::test]
async fn an_unreadable_answer_counts_as_a_failed_query() {
    let (url, _fake) = start_fake(Script::FailFirst {
        n: 0,
        status: 200,
        body: "",
    })
    .await;
    let metrics =
        Arc::new(canaryd::metrics::Metrics::new(prometheus::Registry::new()).expect("metrics"));
    let client = PrometheusClient::new(&url, options(2000, 0)).expect("client");
    let source = PrometheusSource::new(client).with_observer(metrics.clone());
    let p = policy_with(
        "v1",
        "v2",
        &[
            "{name: ungrouped, query: 'x{version=\"{{version}}\"}', max: 1}",
            ERROR_RATE,
        ],
        "",
    );
    let got = source
        .observe(&p, window_ending(Time(1_700_000_000_000), 60))
        .await;
    assert!(unavailable(&got["ungrouped"].canary).contains("returned 4 series"));
    assert_eq!(data(&got["errors"].canary).value, Some(0.02));
    let text = metrics.render();
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("canaryd_prometheus_query_errors_total{"))
        .collect();
    assert_eq!(
        failed,
        [
            r#"canaryd_prometheus_query_errors_total{kind="bad-query",query="instant",rollout="m"} 1"#
        ],
        "{text}"
    );
}

/// A Mann–Whitney policy's range query that fails or answers nonsense leaves the instant
/// reading intact with an empty series, and is reported to the observer as a failed query.
#[tokio::test]
async fn failed_series_query_keeps_the_instant_reading() {
    // (status and body of every range answer, expected error kind)
    let cases = [
        (404, "404 page not found", "http"),
        (200, "{\"status\":\"succ", "bad-response"),
        (
            200,
            r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"version":"v1"},"values":[[1,"many"]]}]}}"#,
            "bad-response",
        ),
        (
            200,
            r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
            "bad-response",
        ),
        (
            400,
            r#"{"status":"error","errorType":"bad_data","error":"exceeded maximum resolution"}"#,
            "bad-query",
        ),
    ];
    for (status, body, kind) in cases {
        let app = axum::Router::new()
            .route("/api/v1/query", get(|| async { OK_BODY }))
            .route(
                "/api/v1/query_range",
                get(move || async move {
                    (
                        StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT),
                        body,
                    )
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake prometheus");
        let url = format!("http://{}", listener.local_addr().expect("fake address"));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let rec = Arc::new(Recorder::default());
        let source =
            PrometheusSource::new(PrometheusClient::new(&url, options(2000, 0)).expect("client"))
                .with_observer(rec.clone());
        let p = policy_with(
            "v1",
            "v2",
            &[ERROR_RATE],
            "analysis: {method: mann-whitney}\n",
        );
        let got = source
            .observe(&p, window_ending(Time(1_700_000_000_000), 600))
            .await;
        let r = &got["errors"];
        for (reading, want) in [(&r.stable, 0.01), (&r.canary, 0.02)] {
            let s = data(reading);
            assert_eq!(s.value, Some(want), "{kind}");
            assert!(s.series.is_empty(), "{kind}: {s:?}");
        }
        let records = rec.take();
        let range: Vec<_> = records.iter().filter(|r| r.3).collect();
        assert_eq!(range.len(), 1, "{kind}: {records:?}");
        assert_eq!(range[0].2, Some(kind), "{records:?}");
        assert!(
            records.iter().filter(|r| !r.3).all(|r| r.2.is_none()),
            "{records:?}"
        );
        // `check --live` names the failed range query, and counts it as a failure: the
        // policy's method would judge without its series.
        let report = source
            .check_live(&p, window_ending(Time(1_700_000_000_000), 600))
            .await;
        assert!(report.has_errors(), "{kind}: {report}");
        let m = &report.metrics[0];
        assert!(
            matches!(&m.series, Some(LiveSeries::Error { kind: k, .. }) if *k == kind),
            "{kind}: {:?}",
            m.series
        );
        assert!(
            report.to_string().contains(&format!(
                "per-interval series (range query): error ({kind})"
            )),
            "{report}"
        );
        assert!(
            m.versions
                .iter()
                .all(|v| matches!(v.outcome, LiveOutcome::Data { .. })),
            "{report}"
        );
        server.abort();
    }
}

#[tokio::test]
async fn closed_port_is_unreachable() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let client = PrometheusClient::new(&url, options(1000, 1)).expect("client");
    let got = PrometheusSource::new(client)
        .observe(
            &policy_with("v1", "v2", &[ERROR_RATE], ""),
            window_ending(Time(1_000_000), 60),
        )
        .await;
    let e = unavailable(&got["errors"].canary);
    assert!(
        e.starts_with("unreachable: metric errors: cannot reach prometheus at http://127.0.0.1:"),
        "{e}"
    );
}

/// Regression: with Prometheus down, the log named only the first metric (the others fail
/// without being asked), once per query. One line per observation names them all.
#[tokio::test]
async fn failed_queries_are_logged_once_per_observation_naming_every_metric() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let url = format!("http://127.0.0.1:{}", free_port());
    let client = PrometheusClient::new(&url, options(1000, 0)).expect("client");
    let p = policy_with(
        "v1",
        "v2",
        &[
            ERROR_RATE,
            "{name: p99, builtin: latency, max: 250ms}",
            "{name: acc, builtin: accuracy, min: 90%}",
        ],
        "",
    );
    let got = PrometheusSource::new(client)
        .observe(&p, window_ending(Time(1_000_000), 60))
        .await;
    for metric in ["errors", "p99", "acc"] {
        unavailable(&got[metric].canary);
    }
    let text = logs.text();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("prometheus")).collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].contains("WARN")
            && lines[0].contains("prometheus queries failed for 3 of 3 metrics")
            && lines[0].contains("metrics=errors, p99, acc")
            && lines[0].contains("error=unreachable: cannot reach prometheus at"),
        "{text}"
    );
}

#[tokio::test]
async fn credentials_go_to_the_default_prometheus_only() {
    let (default_url, default_fake) = start_fake(Script::FailFirst {
        n: 0,
        status: 200,
        body: "",
    })
    .await;
    let (other_url, other_fake) = start_fake(Script::FailFirst {
        n: 0,
        status: 200,
        body: "",
    })
    .await;
    let cases = [
        (Auth::Bearer("s3cret".into()), "Bearer s3cret"),
        (
            Auth::Basic {
                user: "canaryd".into(),
                password: Some("pw".into()),
            },
            // base64("canaryd:pw")
            "Basic Y2FuYXJ5ZDpwdw==",
        ),
    ];
    for (auth, header) in cases {
        let opts = ClientOptions {
            auth: Some(auth),
            ..options(2000, 0)
        };
        let source = PrometheusSource::new(
            PrometheusClient::new(&format!("{default_url}/"), opts).expect("client"),
        );
        let w = window_ending(Time(1_000_000), 60);
        let own = policy_with("v1", "v2", &[ERROR_RATE], "");
        let elsewhere = policy_with(
            "v1",
            "v2",
            &[ERROR_RATE],
            &format!("prometheus: {{url: '{other_url}'}}\n"),
        );
        assert!(matches!(
            source.observe(&own, w).await["errors"].stable,
            Reading::Data(_)
        ));
        assert!(matches!(
            source.observe(&elsewhere, w).await["errors"].stable,
            Reading::Data(_)
        ));
        let auths = |f: &Fake| -> Vec<Option<String>> {
            std::mem::take(&mut *f.seen.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .map(|(_, a)| a)
                .collect()
        };
        assert_eq!(auths(&default_fake), vec![Some(header.to_owned()); 2]);
        assert_eq!(auths(&other_fake), vec![None, None]);
    }
}

/// The Authorization headers a fake has seen since last asked, oldest first.
fn auths(f: &Fake) -> Vec<Option<String>> {
    std::mem::take(&mut *f.seen.lock().unwrap_or_else(|e| e.into_inner()))
        .into_iter()
        .map(|(_, a)| a)
        .collect()
}

/// A fake that answers every query, counting as "no credentials required".
async fn open_fake() -> (String, Fake) {
    start_fake(Script::FailFirst {
        n: 0,
        status: 200,
        body: "",
    })
    .await
}

#[tokio::test]
async fn a_policys_credentials_go_to_its_own_prometheus_only() {
    const DAEMON: &str = "Bearer daemon-token-4d1c";
    let (default_url, default_fake) = open_fake().await;
    let (open_url, open_fake) = open_fake().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "policy-token-93e2\n").unwrap();
    std::fs::write(dir.path().join("password"), "policy-pw-0a7b\n").unwrap();
    let opts = ClientOptions {
        auth: Some(Auth::Bearer("daemon-token-4d1c".into())),
        ..options(2000, 0)
    };
    let source = PrometheusSource::new(PrometheusClient::new(&default_url, opts).expect("client"));
    let w = window_ending(Time(1_000_000), 60);
    // A policy file beside its credentials files, which it names relative to itself.
    let load = |prometheus: &str| {
        let file = dir.path().join("p.yaml");
        let text = format!(
            "name: m\nstable: v1\ncanary: v2\nstrategy: {{steps: [10, 50], interval: 30s}}\n\
             router: {{file: {{path: /tmp/canaryd-test-m.json}}}}\nmetrics: [{ERROR_RATE}]\n\
             prometheus: {prometheus}\n"
        );
        std::fs::write(&file, text).unwrap();
        canaryd::policy::load_file(&file).unwrap_or_else(|e| panic!("{e}"))
    };
    let cases = [
        (
            "{bearer_token_file: token}",
            "Bearer policy-token-93e2".to_owned(),
        ),
        (
            "{basic_auth: {username: team-b, password_file: password}}",
            // base64("team-b:policy-pw-0a7b")
            "Basic dGVhbS1iOnBvbGljeS1wdy0wYTdi".to_owned(),
        ),
    ];
    for (auth, header) in cases {
        let (url, fake) = start_fake(Script::RequireAuth(header.clone())).await;
        let with = load(&format!("{{url: '{url}', {}", &auth[1..]));
        let without = load(&format!("{{url: '{url}'}}"));
        // With its credentials the policy's Prometheus answers; it saw them and nothing else.
        let got = source.observe(&with, w).await;
        assert_eq!(data(&got["errors"].canary).value, Some(0.02), "{auth}");
        assert_eq!(auths(&fake), vec![Some(header.clone()); 2], "{auth}");
        // The same URL without them is refused: the daemon's token is not sent there.
        let got = source.observe(&without, w).await;
        let e = unavailable(&got["errors"].stable);
        assert!(e.contains("answered http 401"), "{e}");
        assert_eq!(auths(&fake), vec![None; 2], "{auth}");
    }
    // A policy with its own URL and no credentials sends none; the default Prometheus still
    // gets the daemon's, and never a policy's.
    let elsewhere = load(&format!("{{url: '{open_url}'}}"));
    assert!(matches!(
        source.observe(&elsewhere, w).await["errors"].stable,
        Reading::Data(_)
    ));
    assert_eq!(auths(&open_fake), vec![None; 2]);
    let default = policy_with("v1", "v2", &[ERROR_RATE], "");
    assert!(matches!(
        source.observe(&default, w).await["errors"].stable,
        Reading::Data(_)
    ));
    assert_eq!(auths(&default_fake), vec![Some(DAEMON.to_owned()); 2]);
}

/// Log lines written while it is the thread's default subscriber, every level.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

#[tokio::test]
async fn the_daemon_reads_a_policys_prometheus_with_its_token_and_never_shows_it() {
    const TOKEN: &str = "policy-token-c58f";
    // The test's runtime has one thread, so every task of the daemon logs through this.
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (default_url, default_fake) = open_fake().await;
    let (url, fake) = start_fake(Script::RequireAuth(format!("Bearer {TOKEN}"))).await;
    let (dir, policies) = own_prometheus_policy(&url);
    std::fs::write(policies.join("prometheus.token"), format!("{TOKEN}\n")).unwrap();
    let opts = ClientOptions {
        auth: Some(Auth::Bearer("daemon-token-e601".into())),
        ..options(2000, 0)
    };
    let sources = canaryd::source::factory(&default_url, opts, Duration::from_secs(5), None)
        .expect("source factory");
    let d = crate::daemon::Daemon::start_real(dir.path(), sources).await;
    // Answered: an analysis with both versions' values from the policy's Prometheus.
    d_wait_answered(&d).await;
    let seen = auths(&fake);
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|a| a.as_deref() == Some(&*format!("Bearer {TOKEN}"))),
        "{seen:?}"
    );
    assert!(
        auths(&default_fake).is_empty(),
        "the default Prometheus was asked"
    );

    let mut shown = String::new();
    for path in [
        "/api/v1/rollouts",
        "/api/v1/rollouts/demo",
        "/api/v1/rollouts/demo/decisions",
        "/metrics",
    ] {
        let r = reqwest::get(format!("{}{path}", d.url)).await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        shown.push_str(&r.text().await.unwrap());
    }
    assert!(shown.contains("\"demo\""), "{shown}");
    d.stop().await;
    let logs = logs.text();
    assert!(
        logs.contains("policy loaded"),
        "no logs were captured:\n{logs}"
    );
    for (what, text) in [("the API", &shown), ("the logs", &logs)] {
        assert!(!text.contains(TOKEN), "{what} hold the policy's token");
        assert!(
            !text.contains("daemon-token-e601"),
            "{what} hold the daemon's token"
        );
    }
}

#[tokio::test]
async fn a_created_or_rotated_token_file_is_picked_up_without_editing_the_policy() {
    const TOKEN: &str = "rotated-token-7a1d";
    let (default_url, _default_fake) = open_fake().await;
    let (url, fake) = start_fake(Script::RequireAuth(format!("Bearer {TOKEN}"))).await;
    let (dir, policies) = own_prometheus_policy(&url);
    let token_file = policies.join("prometheus.token");
    let sources =
        canaryd::source::factory(&default_url, options(2000, 0), Duration::from_secs(5), None)
            .expect("source factory");
    let d = crate::daemon::Daemon::start_real(dir.path(), sources).await;
    // No token file yet: the policy is invalid, and says which field it cannot read.
    wait_for(
        "the missing token file reported",
        Duration::from_secs(10),
        || async {
            let (status, v) = d.get("/api/v1/rollouts").await;
            let invalid = v["invalid_policies"].to_string();
            (status == 200 && invalid.contains("prometheus.bearer_token_file")).then_some(())
        },
    )
    .await;
    // The file appears, with a token Prometheus refuses: the policy now runs.
    std::fs::write(&token_file, "stale-token\n").unwrap();
    wait_for("the stale token sent", Duration::from_secs(10), || async {
        let (status, _) = d.get("/api/v1/rollouts/demo").await;
        let sent = auths(&fake)
            .iter()
            .any(|a| a.as_deref() == Some("Bearer stale-token"));
        (status == 200 && sent).then_some(())
    })
    .await;
    // Rotated in place, the policy file untouched: the next analyses use the new token.
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    d_wait_answered(&d).await;
    d.stop().await;
}

#[tokio::test]
async fn check_live_authenticates_to_the_default_prometheus_with_the_flags() {
    const TOKEN: &str = "check-token-93b0";
    let (url, fake) = start_fake(Script::RequireAuth(format!("Bearer {TOKEN}"))).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let policy = write_check_policy(dir.path());
    let check = |with_token: bool| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_canaryd"));
        cmd.args(["check", "--live", "--prometheus", &url])
            .env_remove("CANARYD_PROMETHEUS_TOKEN_FILE")
            .env_remove("CANARYD_PROMETHEUS_USER");
        if with_token {
            cmd.arg("--prometheus-token-file").arg(&token);
        }
        cmd.arg(&policy).kill_on_drop(true).output()
    };
    let without = tokio::time::timeout(Duration::from_secs(30), check(false))
        .await
        .expect("check finishes")
        .expect("check runs");
    assert_eq!(without.status.code(), Some(1), "{without:?}");
    let out = String::from_utf8_lossy(&without.stdout);
    assert!(out.contains("401"), "the refusal is shown: {out}");
    assert!(
        out.contains("live check failed: Prometheus could not answer a query"),
        "why it exits 1 is said: {out}"
    );
    let with = tokio::time::timeout(Duration::from_secs(30), check(true))
        .await
        .expect("check finishes")
        .expect("check runs");
    let out = String::from_utf8_lossy(&with.stdout);
    assert_eq!(with.status.code(), Some(0), "{out}");
    assert!(
        auths(&fake)
            .iter()
            .any(|a| a.as_deref() == Some(&*format!("Bearer {TOKEN}"))),
        "the token was sent"
    );
    assert!(!out.contains(TOKEN), "the token is not printed: {out}");
}

/// `demo.yaml` in `dir`: one error-rate metric, a weights file beside it; for `check --live`.
fn write_check_policy(dir: &std::path::Path) -> std::path::PathBuf {
    let policy = dir.join("demo.yaml");
    std::fs::write(
        &policy,
        format!(
            "name: demo\nstable: v1\ncanary: v2\nstrategy: {{steps: [10, 50]}}\n\
             metrics: [{ERROR_RATE}]\n\
             router: {{file: {{path: '{}'}}}}\n",
            dir.join("weights.json").display()
        ),
    )
    .unwrap();
    policy
}

/// A password file named by a flag is read as a policy's is: spaces are part of the password,
/// only the line end goes; a file of two lines is refused with the flag's name, not used.
#[tokio::test]
async fn flag_credentials_files_keep_their_spaces_and_must_be_one_line() {
    // base64("team-c: spaced pw ")
    let header = "Basic dGVhbS1jOiBzcGFjZWQgcHcg".to_owned();
    let (url, fake) = start_fake(Script::RequireAuth(header.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = write_check_policy(dir.path());
    let check = |password: &str| {
        let file = dir.path().join("password");
        std::fs::write(&file, password).unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_canaryd"));
        cmd.args(["check", "--live", "--prometheus", &url])
            .args(["--prometheus-user", "team-c", "--prometheus-password-file"])
            .arg(&file)
            .env_remove("CANARYD_PROMETHEUS_TOKEN_FILE")
            .arg(&policy)
            .kill_on_drop(true)
            .output()
    };
    let run = |password: &'static str| async move {
        tokio::time::timeout(Duration::from_secs(30), check(password))
            .await
            .expect("check finishes")
            .expect("check runs")
    };
    let spaced = run(" spaced pw \r\n").await;
    let out = String::from_utf8_lossy(&spaced.stdout);
    assert_eq!(spaced.status.code(), Some(0), "{out}");
    assert!(auths(&fake).contains(&Some(header)), "{:?}", auths(&fake));
    assert!(
        !out.contains("spaced pw"),
        "the password is not printed: {out}"
    );

    let two_lines = run("spaced pw\nsecond line\n").await;
    let err = String::from_utf8_lossy(&two_lines.stderr);
    assert_ne!(two_lines.status.code(), Some(0), "{err}");
    assert!(
        err.contains("Prometheus password file") && err.contains("one line"),
        "{err}"
    );
    assert!(
        !err.contains("second line"),
        "the password is not printed: {err}"
    );
    assert!(
        auths(&fake).is_empty(),
        "nothing was sent with a refused file"
    );
}

/// A daemon directory whose one policy, `demo`, reads its own Prometheus at `url` with the
/// bearer token in `policies/prometheus.token` (not written here).
fn own_prometheus_policy(url: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let policy = format!(
        "name: demo\nstable: v1\ncanary: v2\n\
         strategy: {{steps: [10, 50], interval: 50ms, min_step_duration: 100ms}}\n\
         analysis: {{method: threshold}}\nmetrics: [{ERROR_RATE}]\n\
         router: {{file: {{path: '{}'}}}}\n\
         prometheus: {{url: '{url}', bearer_token_file: prometheus.token}}\n",
        dir.path().join("weights.json").display()
    );
    std::fs::write(policies.join("demo.yaml"), policy).unwrap();
    (dir, policies)
}

/// Waits until the rollout's latest analysis holds both versions' error rates.
async fn d_wait_answered(d: &crate::daemon::Daemon) {
    wait_for("an analysis with data", Duration::from_secs(10), || async {
        let (status, v) = d.get("/api/v1/rollouts/demo").await;
        let report = &v["recent_analyses"][0]["reports"][0];
        (status == 200 && report["stable"] == 0.01 && report["canary"] == 0.02).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus scraping a tiny exporter

/// Finite bucket boundaries of the exporter's latency histogram.
const LE: [f64; 5] = [0.05, 0.1, 0.25, 0.5, 1.0];

/// What the exporter serves for one version.
#[derive(Clone, Debug, Default)]
struct Counters {
    success: u64,
    errors: u64,
    /// Observations per finite bucket (not cumulative), then above the largest.
    per_bucket: [u64; 6],
    correct: u64,
    incorrect: u64,
}

impl Counters {
    fn requests(&self) -> u64 {
        self.success + self.errors
    }

    /// Cumulative bucket counts, `+Inf` last.
    fn cumulative(&self) -> Vec<u64> {
        self.per_bucket
            .iter()
            .scan(0, |acc, n| {
                *acc += n;
                Some(*acc)
            })
            .collect()
    }

    /// Serves `n` requests (`errors` of them failed) whose latencies fall in the buckets as
    /// `spread` (per bucket, last = above 1 s) says, and scores `correct`/`incorrect`.
    fn serve(&mut self, errors: u64, spread: [u64; 6], correct: u64, incorrect: u64) {
        let n: u64 = spread.iter().sum();
        self.errors += errors;
        self.success += n - errors;
        for (b, k) in self.per_bucket.iter_mut().zip(spread) {
            *b += k;
        }
        self.correct += correct;
        self.incorrect += incorrect;
    }
}

type Exported = Arc<Mutex<BTreeMap<&'static str, Counters>>>;

/// The model-server convention in Prometheus's text format.
fn render(state: &BTreeMap<&'static str, Counters>) -> String {
    let mut s = String::new();
    s.push_str("# TYPE model_requests_total counter\n");
    for (v, c) in state {
        for (outcome, n) in [("success", c.success), ("error", c.errors)] {
            let _ = writeln!(
                s,
                "model_requests_total{{model=\"m\",version=\"{v}\",outcome=\"{outcome}\"}} {n}"
            );
        }
    }
    s.push_str("# TYPE model_request_duration_seconds histogram\n");
    for (v, c) in state {
        let cum = c.cumulative();
        let les = LE
            .iter()
            .map(|le| le.to_string())
            .chain(["+Inf".to_owned()]);
        for (le, n) in les.zip(&cum) {
            let _ = writeln!(
                s,
                "model_request_duration_seconds_bucket{{model=\"m\",version=\"{v}\",le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "model_request_duration_seconds_sum{{model=\"m\",version=\"{v}\"}} 0"
        );
        let _ = writeln!(
            s,
            "model_request_duration_seconds_count{{model=\"m\",version=\"{v}\"}} {}",
            cum[5]
        );
    }
    s.push_str("# TYPE model_predictions_scored_total counter\n");
    for (v, c) in state {
        for (correct, n) in [("true", c.correct), ("false", c.incorrect)] {
            let _ = writeln!(
                s,
                "model_predictions_scored_total{{model=\"m\",version=\"{v}\",correct=\"{correct}\"}} {n}"
            );
        }
    }
    s
}

async fn start_exporter(state: Exported) -> u16 {
    let app = axum::Router::new().route(
        "/metrics",
        get(|State(s): State<Exported>| async move {
            let text = render(&s.lock().unwrap_or_else(|e| e.into_inner()));
            ([("content-type", "text/plain; version=0.0.4")], text)
        }),
    );
    let app = app.with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind exporter");
    let port = listener.local_addr().expect("exporter address").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

/// Starts Prometheus scraping the exporter every second; returns it and its URL.
fn start_prometheus(dir: &std::path::Path, exporter: u16) -> (ChildGuard, u16) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: model\n    static_configs:\n      - targets: ['127.0.0.1:{exporter}']\n"
        ),
    )
    .expect("write prometheus.yml");
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
    let child = ChildGuard::spawn(
        Command::new(find_binary("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log),
    );
    (child, port)
}

/// The first value of an instant query evaluated now, if it has one.
async fn value_now(client: &PrometheusClient, promql: &str) -> Option<f64> {
    match client.query(None, promql, SystemClock.now()).await.result {
        Ok(Answer::Vector(v)) => v.first().map(|s| s.value),
        Ok(Answer::Scalar(x)) => Some(x),
        Err(_) => None,
    }
}

/// Waits until an instant query evaluated now answers `want`.
/// An exporter serving `exported` and a Prometheus scraping it every second, once Prometheus
/// has scraped the requests already in `exported` (`requests` of them).
async fn scraped(
    dir: &std::path::Path,
    exported: &Exported,
    requests: f64,
) -> (ChildGuard, PrometheusClient) {
    let exporter = start_exporter(exported.clone()).await;
    let (prometheus, port) = start_prometheus(dir, exporter);
    wait_for_port(port, Duration::from_secs(20)).await;
    let url = format!("http://127.0.0.1:{port}");
    let client = PrometheusClient::new(&url, options(3000, 1)).expect("client");
    wait_for_value(
        &client,
        "prometheus to scrape the exporter",
        REQUESTS,
        requests,
    )
    .await;
    (prometheus, client)
}

/// Every 100 ms, `batch` serves each version's next requests, until the task is aborted.
fn steady_load(
    exported: &Exported,
    batch: impl Fn(&mut Counters, &str) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let exported = exported.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let mut e = exported.lock().unwrap_or_else(|e| e.into_inner());
            for v in ["v1", "v2"] {
                if let Some(c) = e.get_mut(v) {
                    batch(c, v);
                }
            }
        }
    })
}

/// The time of the first scrape that saw more than `requests` requests.
async fn first_scrape_above(client: &PrometheusClient, requests: f64) -> Time {
    let ts = wait_for(
        "traffic to be scraped",
        Duration::from_secs(10),
        || async move {
            let sum = value_now(client, REQUESTS).await?;
            let ts = value_now(client, LAST_SCRAPE).await?;
            (sum > requests).then_some(ts)
        },
    )
    .await;
    Time((ts * 1000.0).round() as i64)
}

/// Waits until Prometheus has scraped the exporter at or after `at`.
async fn scraped_until(client: &PrometheusClient, at: Time) {
    wait_for("a later scrape", Duration::from_secs(30), || async move {
        let ts = value_now(client, LAST_SCRAPE).await?;
        (ts * 1000.0 >= at.0 as f64).then_some(())
    })
    .await;
}

const REQUESTS: &str = "sum(model_requests_total{model=\"m\"})";
const LAST_SCRAPE: &str = "max(timestamp(model_requests_total{model=\"m\"}))";

async fn wait_for_value(client: &PrometheusClient, what: &str, promql: &str, want: f64) {
    wait_for(what, Duration::from_secs(20), || async move {
        (value_now(client, promql).await == Some(want)).then_some(())
    })
    .await;
}

/// Prometheus's `histogram_quantile` over cumulative counts (`+Inf` last), for expectations.
fn histogram_quantile(q: f64, cumulative: &[f64]) -> f64 {
    let total = cumulative[cumulative.len() - 1];
    let rank = q * total;
    let b = cumulative[..cumulative.len() - 1]
        .iter()
        .position(|c| *c >= rank)
        .unwrap_or(cumulative.len() - 1);
    if b == cumulative.len() - 1 {
        return LE[LE.len() - 1];
    }
    let (start, below) = if b == 0 {
        (0.0, 0.0)
    } else {
        (LE[b - 1], cumulative[b - 1])
    };
    start + (LE[b] - start) * (rank - below) / (cumulative[b] - below)
}

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs().max(1e-12)
}

/// Asserts that a count read through `increase()` matches what was served. Extrapolation to
/// the ends of the range only ever adds (the series start at zero, or the window begins half
/// a scrape before its first sample), by at most about one scrape interval's share.
fn assert_count(what: &str, got: f64, served: u64, most: f64) {
    let served = served as f64;
    assert!(
        got >= served * 0.98 && got <= served * most,
        "{what}: read {got}, served {served} (allowed up to x{most})"
    );
}

const METRICS: [&str; 5] = [
    "{name: error-rate, builtin: error_rate, max: 5%}",
    "{name: p90, builtin: latency, quantile: 0.9, max: 250ms}",
    "{name: p50, builtin: latency, quantile: 0.5, max_increase: 10%}",
    "{name: accuracy, builtin: accuracy, min: 80%}",
    "{name: error-share, query: 'sum(increase(model_requests_total{model=\"{{model}}\",version=\"{{version}}\",outcome=\"error\"}[{{window}}])) / sum(increase(model_requests_total{model=\"{{model}}\",version=\"{{version}}\"}[{{window}}]))', max: 5%}",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_reads_both_versions() {
    let test_started = SystemClock.now();
    let dir = tempfile::tempdir().expect("tempdir");
    let exported: Exported = Arc::default();
    {
        // Every series exists, at zero, before Prometheus first scrapes: `increase()` then
        // counts the whole rollout.
        let mut e = exported.lock().unwrap_or_else(|e| e.into_inner());
        e.insert("v1", Counters::default());
        e.insert("v2", Counters::default());
    }
    let exporter = start_exporter(exported.clone()).await;
    let (mut prometheus, port) = start_prometheus(dir.path(), exporter);
    let url = format!("http://127.0.0.1:{port}");
    wait_for_port(port, Duration::from_secs(20)).await;
    let rec = Arc::new(Recorder::default());
    let client = PrometheusClient::new(&url, options(3000, 1)).expect("client");
    // A 1 s scrape interval allows ranges much shorter than the production minimum.
    let source = PrometheusSource::new(client.clone())
        .with_min_range(Duration::from_secs(3))
        .with_observer(rec.clone());

    wait_for_value(
        &client,
        "prometheus to scrape the zeros",
        "count(model_requests_total{model=\"m\"})",
        4.0,
    )
    .await;

    // Phase 1: before the step. Every series (each bucket too) moves, so that each is above
    // zero when the window begins and `increase()` extrapolates them all alike.
    {
        let mut e = exported.lock().unwrap_or_else(|e| e.into_inner());
        let v1 = e.get_mut("v1").expect("v1");
        v1.serve(4, [100, 60, 30, 8, 2, 0], 90, 10);
        let v2 = e.get_mut("v2").expect("v2");
        v2.serve(10, [40, 60, 60, 30, 8, 2], 80, 20);
    }
    wait_for_value(
        &client,
        "phase 1 to be scraped",
        "sum(model_requests_total{model=\"m\"})",
        400.0,
    )
    .await;
    let first = value_now(&client, "max(timestamp(model_requests_total{model=\"m\"}))")
        .await
        .expect("timestamp of phase 1");
    // The step begins half a scrape before the first sample holding phase 1, so the window
    // starts from phase 1's counts and contains nothing of phase 1 itself.
    let since = Time((first * 1000.0).round() as i64 - 500);
    let phase1 = exported.lock().unwrap_or_else(|e| e.into_inner()).clone();

    // Phase 2: the step under analysis. The canary gets worse on every metric.
    {
        let mut e = exported.lock().unwrap_or_else(|e| e.into_inner());
        let v1 = e.get_mut("v1").expect("v1");
        v1.serve(1, [50, 30, 15, 4, 1, 0], 45, 5);
        let v2 = e.get_mut("v2").expect("v2");
        v2.serve(10, [10, 20, 30, 30, 0, 10], 35, 15);
    }
    let total = exported.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // A ten-second window keeps the extrapolation at its ends small against what it counts.
    let window_secs = 10;
    wait_for(
        "ten seconds of phase 2 to be scraped",
        Duration::from_secs(20),
        || {
            let client = &client;
            async move {
                let sum = value_now(client, "sum(model_requests_total{model=\"m\"})").await?;
                let ts =
                    value_now(client, "max(timestamp(model_requests_total{model=\"m\"}))").await?;
                (sum == 600.0 && ts * 1000.0 >= (since.0 + window_secs * 1000 - 600) as f64)
                    .then_some(())
            }
        },
    )
    .await;
    let at = Time(since.0 + window_secs * 1000);
    let window = Window {
        at,
        since,
        rollout_started: test_started,
    };
    let p = policy_with("v1", "v2", &METRICS, "");
    let got = source.observe(&p, window).await;
    let queries = rec.take();
    assert_eq!(queries.len(), 2 + 3 + 3 + 2 + 2, "{queries:?}");
    assert!(queries.iter().all(|q| q.2.is_none()), "{queries:?}");

    for (i, version) in ["v1", "v2"].into_iter().enumerate() {
        let pick = |r: &MetricReading| {
            if i == 0 {
                r.stable.clone()
            } else {
                r.canary.clone()
            }
        };
        let (before, all) = (&phase1[version], &total[version]);
        let step = |f: fn(&Counters) -> u64| f(all) - f(before);
        let ctx = |what: &str| format!("{version} {what}");

        let e = pick(&got["error-rate"]);
        let e = data(&e);
        let want = step(|c| c.errors) as f64 / step(Counters::requests) as f64;
        assert!(
            close(e.value.unwrap_or(-1.0), want, 0.01),
            "{}: {:?} vs {want}",
            ctx("error rate"),
            e.value
        );
        assert_count(
            &ctx("window requests"),
            e.window_events,
            step(Counters::requests),
            1.2,
        );
        let c = e.cumulative.expect("cumulative counts");
        assert_count(&ctx("requests"), c.total, all.requests(), 1.15);
        assert!(
            close(
                c.bad / c.total,
                all.errors as f64 / all.requests() as f64,
                0.01
            ),
            "{}: {c:?}",
            ctx("errors")
        );

        let a = pick(&got["accuracy"]);
        let a = data(&a);
        let want = step(|c| c.correct) as f64 / step(|c| c.correct + c.incorrect) as f64;
        assert!(
            close(a.value.unwrap_or(-1.0), want, 0.01),
            "{}: {:?} vs {want}",
            ctx("accuracy"),
            a.value
        );
        let c = a.cumulative.expect("cumulative scored");
        let scored = all.correct + all.incorrect;
        assert_count(&ctx("scored"), c.total, scored, 1.15);
        assert!(
            close(c.bad / c.total, all.incorrect as f64 / scored as f64, 0.01),
            "{}: {c:?}",
            ctx("incorrect")
        );

        let window_hist: Vec<f64> = all
            .cumulative()
            .iter()
            .zip(before.cumulative())
            .map(|(a, b)| (a - b) as f64)
            .collect();
        for (metric, q) in [("p90", 0.9), ("p50", 0.5)] {
            let l = pick(&got[metric]);
            let l = data(&l);
            let want = histogram_quantile(q, &window_hist);
            assert!(
                close(l.value.unwrap_or(-1.0), want, 0.01),
                "{}: {:?} vs {want}",
                ctx(metric),
                l.value
            );
            assert_count(
                &ctx("latency window requests"),
                l.window_events,
                step(Counters::requests),
                1.2,
            );
            assert_eq!(l.buckets.len(), LE.len(), "{}", ctx("finite buckets"));
        }
        // p90 has `max: 250ms`: requests above the 0.25 boundary are slow.
        let l = pick(&got["p90"]);
        let l = data(&l);
        assert_eq!(l.slow_le, Some(0.25));
        let cum = all.cumulative();
        let c = l.cumulative.expect("latency counts");
        assert_count(&ctx("latency requests"), c.total, cum[5], 1.15);
        let slow = (cum[5] - cum[2]) as f64 / cum[5] as f64;
        assert!(
            close(c.bad / c.total, slow, 0.01),
            "{}: {c:?} vs {slow}",
            ctx("slow share")
        );

        let s = pick(&got["error-share"]);
        let s = data(&s);
        let want = step(|c| c.errors) as f64 / step(Counters::requests) as f64;
        assert!(
            close(s.value.unwrap_or(-1.0), want, 0.01),
            "{}: {:?}",
            ctx("raw query"),
            s.value
        );
        assert_eq!(s.window_events, 1.0);
    }
    // p50 has no absolute bound: the boundary nearest stable's median in the window.
    let stable_p50 = data(&got["p50"].stable).value.unwrap_or(-1.0);
    let nearest = LE
        .iter()
        .copied()
        .min_by(|a, b| (a - stable_p50).abs().total_cmp(&(b - stable_p50).abs()))
        .unwrap_or(0.0);
    assert_eq!(data(&got["p50"].canary).slow_le, Some(nearest));

    // A version that serves nothing reads as no data, never as a number or an error.
    let absent = policy_with("v1", "v3", &METRICS, "");
    let got = source.observe(&absent, window).await;
    for (name, r) in &got {
        assert!(
            matches!(r.stable, Reading::Data(_)),
            "{name}: {:?}",
            r.stable
        );
        assert_eq!(r.canary, Reading::NoData, "{name}");
    }

    // A policy naming its own Prometheus is read from it, whatever the default is.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let elsewhere =
        PrometheusSource::new(PrometheusClient::new(&dead, options(1000, 0)).expect("client"))
            .with_min_range(Duration::from_secs(3));
    let own = policy_with(
        "v1",
        "v2",
        &METRICS[..1],
        &format!("prometheus: {{url: '{url}'}}\n"),
    );
    let got = elsewhere.observe(&own, window).await;
    assert!(
        matches!(got["error-rate"].canary, Reading::Data(_)),
        "{got:?}"
    );

    // A raw query Prometheus cannot parse names the metric and blames the policy.
    let broken = policy_with(
        "v1",
        "v2",
        &[
            METRICS[0],
            "{name: broken, query: 'sum(rate(model_requests_total{version=\"{{version}}\"}[{{window}}])', max: 1}",
        ],
        "",
    );
    let got = source.observe(&broken, window).await;
    let e = unavailable(&got["broken"].canary);
    assert!(
        e.starts_with(
            "bad-query: metric broken: the policy's query is wrong: prometheus says bad_data"
        ),
        "{e}"
    );
    assert!(
        e.contains(r#"query: sum(rate(model_requests_total{version="v2"}[10s])"#),
        "{e}"
    );
    // A broken metric does not take the others down.
    assert!(matches!(got["error-rate"].canary, Reading::Data(_)));

    // `check --live` reports each metric and version.
    let report = source.check_live(&broken, window).await;
    assert!(report.has_errors());
    let outcome = |m: usize, v: usize| &report.metrics[m].versions[v].outcome;
    assert!(
        matches!(outcome(0, 1), LiveOutcome::Data { .. }),
        "{report:#?}"
    );
    assert!(
        matches!(
            outcome(1, 0),
            LiveOutcome::Error {
                kind: "bad-query",
                ..
            }
        ),
        "{report:#?}"
    );
    let text = report.to_string();
    assert!(
        text.contains("broken (query)") && text.contains("error (bad-query)"),
        "{text}"
    );
    let report = source.check_live(&absent, window).await;
    assert!(!report.has_errors(), "{report}");
    assert!(
        report
            .metrics
            .iter()
            .all(|m| m.versions[1].outcome == LiveOutcome::NoData),
        "{report}"
    );
    rec.take();

    // With Prometheus gone, every reading is unavailable: never no data, never a number.
    let _ = prometheus.0.kill();
    let _ = prometheus.0.wait();
    assert!(!prometheus.alive());
    let got = source.observe(&p, window).await;
    assert_eq!(got.len(), METRICS.len());
    for (name, r) in &got {
        for reading in [&r.stable, &r.canary] {
            let e = unavailable(reading);
            assert!(e.starts_with("unreachable: "), "{name}: {e}");
        }
    }
    // Only the first metric's queries were sent; the rest knew Prometheus was down.
    let sent = rec.take();
    assert!(!sent.is_empty());
    assert!(
        sent.iter()
            .all(|r| r.0 == "error-rate" && r.2 == Some("unreachable")),
        "{sent:?}"
    );
}

/// A Prometheus behind TLS signed by a private CA is reachable with `ca_file`, and only so.
#[tokio::test]
async fn real_prometheus_over_tls_with_a_private_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls");
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            tls.join("server.pem").display(),
            tls.join("server.key").display()
        ),
    )
    .expect("write web.yml");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(&config, "global: {scrape_interval: 1s}\n").expect("write prometheus.yml");
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("prometheus log");
    let _prometheus = ChildGuard::spawn(
        Command::new(find_binary("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--web.config.file={}", web.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log),
    );
    wait_for_port(port, Duration::from_secs(20)).await;
    let url = format!("https://127.0.0.1:{port}");
    let trusting = PrometheusClient::new(
        &url,
        ClientOptions {
            ca_file: Some(tls.join("ca.pem")),
            ..options(2000, 0)
        },
    )
    .expect("client with the test CA");
    let answer = wait_for(
        "prometheus to answer over tls",
        Duration::from_secs(20),
        || {
            let client = &trusting;
            async move {
                client
                    .query(None, "vector(1)", SystemClock.now())
                    .await
                    .result
                    .ok()
            }
        },
    )
    .await;
    assert!(
        matches!(&answer, Answer::Vector(v) if v.len() == 1 && v[0].value == 1.0),
        "{answer:?}"
    );
    let untrusting = PrometheusClient::new(&url, options(2000, 0)).expect("client");
    match untrusting
        .query(None, "vector(1)", SystemClock.now())
        .await
        .result
    {
        Err(e) => {
            assert_eq!(e.kind(), "unreachable", "{e}");
            assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
        }
        Ok(a) => panic!("an unknown CA was trusted: {a:?}"),
    }
}

/// A Mann–Whitney policy's live reading carries each version's per-interval series, read with
/// one range query per metric; the values per interval are what the exporter served. A
/// sequential policy's reading sends no range query and has no series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_series_for_mann_whitney() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exported: Exported = Arc::default();
    // Every batch a version serves has the same error share, latency bucket and accuracy, so
    // each interval's value is known exactly whatever the interval holds.
    let batch = |c: &mut Counters, version: &str, times: u64| {
        for _ in 0..times {
            if version == "v1" {
                // 10 % errors, every latency in (0.05, 0.1], 90 % correct.
                c.serve(1, [0, 10, 0, 0, 0, 0], 9, 1);
            } else {
                // 20 % errors, every latency in (0.25, 0.5], 70 % correct.
                c.serve(2, [0, 0, 0, 10, 0, 0], 7, 3);
            }
        }
    };
    {
        // The history before the step differs from every batch (half errors, all latencies
        // at most 0.05 s, half correct), so a value that reached back before the step would
        // show. It is large, so `increase()` never extrapolates a series down to zero.
        let mut e = exported.lock().unwrap_or_else(|e| e.into_inner());
        for v in ["v1", "v2"] {
            let mut c = Counters::default();
            c.serve(500, [1000, 0, 0, 0, 0, 0], 500, 500);
            e.insert(v, c);
        }
    }
    let (_prometheus, client) = scraped(dir.path(), &exported, 2000.0).await;
    // Steady traffic on both versions from now on.
    let load = steady_load(&exported, move |c, v| batch(c, v, 1));
    // The step begins half a scrape before the first sample with traffic; twelve seconds of
    // it make six two-second intervals.
    let since = Time(first_scrape_above(&client, 2000.0).await.0 - 500);
    let at = Time(since.0 + 12_000);
    scraped_until(&client, at).await;
    load.abort();
    let window = Window {
        at,
        since,
        rollout_started: since,
    };
    let rec = Arc::new(Recorder::default());
    // A 1 s scrape interval allows three-second ranges, and so two-second intervals.
    let source = PrometheusSource::new(client.clone())
        .with_min_range(Duration::from_secs(3))
        .with_observer(rec.clone());
    let metrics = [
        "{name: error-rate, builtin: error_rate, max_increase: 1pp}",
        "{name: p50, builtin: latency, quantile: 0.5, max_increase: 10%}",
        "{name: accuracy, builtin: accuracy, max_decrease: 1pp}",
        "{name: error-share, query: 'sum(increase(model_requests_total{model=\"{{model}}\",version=\"{{version}}\",outcome=\"error\"}[{{window}}])) / sum(increase(model_requests_total{model=\"{{model}}\",version=\"{{version}}\"}[{{window}}]))', max: 50%}",
    ];
    // (metric, stable's value per interval, canary's)
    let want = [
        ("error-rate", 0.1, 0.2),
        // Prometheus interpolates within the bucket: the middle of (0.05, 0.1] and (0.25, 0.5].
        ("p50", 0.075, 0.375),
        ("accuracy", 0.9, 0.7),
        ("error-share", 0.1, 0.2),
    ];

    let mw = policy_with("v1", "v2", &metrics, "analysis: {method: mann-whitney}\n");
    let got = source.observe(&mw, window).await;
    for (metric, stable, canary) in want {
        for (reading, value) in [(&got[metric].stable, stable), (&got[metric].canary, canary)] {
            let s = data(reading);
            assert!(
                close(s.value.unwrap_or(-1.0), value, 1e-6),
                "{metric}: window value {:?} vs {value}",
                s.value
            );
            // Six intervals fit in the window; a scrape lost to a busy machine may leave one
            // without the two samples `increase()` needs, hardly more.
            assert!(
                (5..=6).contains(&s.series.len()),
                "{metric}: series {:?}",
                s.series
            );
            assert!(
                s.series.iter().all(|x| close(*x, value, 1e-6)),
                "{metric}: series {:?} vs {value}",
                s.series
            );
        }
    }
    let records = rec.take();
    assert!(records.iter().all(|r| r.2.is_none()), "{records:?}");
    let ranges: Vec<&str> = records
        .iter()
        .filter(|r| r.3)
        .map(|r| r.0.as_str())
        .collect();
    // One range query per builtin metric, one per version for the raw query.
    assert_eq!(ranges.len(), 5, "{records:?}");
    for (metric, _, _) in want {
        assert!(ranges.contains(&metric), "{metric}: {records:?}");
    }

    // `check --live` reports each metric's range query with its intervals per version.
    let report = source.check_live(&mw, window).await;
    let _ = rec.take();
    assert!(!report.has_errors(), "{report}");
    for m in &report.metrics {
        assert!(
            matches!(
                m.series,
                Some(LiveSeries::Intervals {
                    stable: 5..=6,
                    canary: 5..=6
                })
            ),
            "{}: {:?}",
            m.name,
            m.series
        );
    }
    assert!(
        report
            .to_string()
            .contains("per-interval series (range query): stable "),
        "{report}"
    );

    // The default (sequential) method sends the same instant queries and no range query.
    let sequential = policy_with("v1", "v2", &metrics, "");
    let got = source.observe(&sequential, window).await;
    let records = rec.take();
    assert_eq!(records.len(), 2 + 3 + 2 + 2, "{records:?}");
    assert!(records.iter().all(|r| !r.3 && r.2.is_none()), "{records:?}");
    for (metric, stable, canary) in want {
        for (reading, value) in [(&got[metric].stable, stable), (&got[metric].canary, canary)] {
            let s = data(reading);
            assert!(close(s.value.unwrap_or(-1.0), value, 1e-6), "{metric}");
            assert!(s.series.is_empty(), "{metric}: {:?}", s.series);
        }
    }
    let report = source.check_live(&sequential, window).await;
    assert!(
        report.metrics.iter().all(|m| m.series.is_none()),
        "{report}"
    );
    assert!(!report.to_string().contains("per-interval"), "{report}");
}
