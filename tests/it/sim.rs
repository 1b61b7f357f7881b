//! `canaryd sim`: the stand-in model server and the load generator, run in-process on
//! 127.0.0.1:0, plus the command line and one scrape by a real Prometheus.

use crate::support::{ChildGuard, find_binary, free_port, wait_for, wait_for_port};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use canaryd::sim::{self, LoadConfig, Schedule, SimConfig};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::oneshot;
use tower::ServiceExt as _;

/// A simulator serving in the background; dropping it shuts the server down.
struct Running {
    base: String,
    _stop: oneshot::Sender<()>,
}

async fn start(config: SimConfig) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        if let Err(e) = sim::serve(listener, config, stopped).await {
            panic!("sim stopped: {e:#}");
        }
    });
    Running {
        base: format!("http://{addr}"),
        _stop: stop,
    }
}

/// A simulator that answers at once and draws from a fixed seed, so the statistical tests
/// are repeatable; their tolerances are wide enough for any seed all the same.
fn fast(version: &str) -> SimConfig {
    let mut c = SimConfig::new("fraud", version);
    c.sleep_scale = 0.0;
    c.seed = Some(20240601);
    c
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn predict(c: &reqwest::Client, base: &str, id: &str) -> (StatusCode, Value) {
    let r = c
        .post(format!("{base}/predict"))
        .json(&json!({ "id": id }))
        .send()
        .await
        .expect("predict");
    let status = r.status();
    (status, r.json().await.expect("predict answers JSON"))
}

async fn scrape(c: &reqwest::Client, base: &str) -> String {
    let r = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/plain"), "content type {ct}");
    r.text().await.expect("metrics text")
}

/// One sample of the text exposition format: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
        let value: f64 = value.parse().expect("sample value is a number");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let labels = body
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once("=\"").expect("label is k=\"v\"");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.push((name, labels, value));
    }
    out
}

/// The value of the one sample named `name` whose labels include `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one sample {name}{labels:?}, found {found:?} in\n{text}"
    );
    found[0]
}

fn requests(text: &str, version: &str, outcome: &str) -> f64 {
    value(
        text,
        "model_requests_total",
        &[
            ("model", "fraud"),
            ("version", version),
            ("outcome", outcome),
        ],
    )
}

fn scored(text: &str, version: &str, correct: &str) -> f64 {
    value(
        text,
        "model_predictions_scored_total",
        &[
            ("model", "fraud"),
            ("version", version),
            ("correct", correct),
        ],
    )
}

fn bucket(text: &str, le: &str) -> f64 {
    value(text, "model_request_duration_seconds_bucket", &[("le", le)])
}

/// `n` sequential predictions with ids `{prefix}-{i}`; returns how many failed with 500.
async fn send(c: &reqwest::Client, base: &str, prefix: &str, n: usize) -> usize {
    let mut errors = 0;
    for i in 0..n {
        let (status, body) = predict(c, base, &format!("{prefix}-{i}")).await;
        match status {
            StatusCode::OK => {}
            StatusCode::INTERNAL_SERVER_ERROR => errors += 1,
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    errors
}

/// Whether `k` successes of `n` trials are within 6 standard deviations of `p`: wide enough
/// never to fail by chance, narrow enough to catch a wrong rate.
fn within_binomial(k: f64, n: f64, p: f64) -> bool {
    let sd = (n * p * (1.0 - p)).sqrt();
    (k - n * p).abs() <= 6.0 * sd
}

#[tokio::test]
async fn metrics_expose_the_convention_at_zero_from_the_start() {
    let s = start(fast("v2")).await;
    let c = client();
    let text = scrape(&c, &s.base).await;
    for outcome in ["success", "error"] {
        assert_eq!(requests(&text, "v2", outcome), 0.0);
    }
    for correct in ["true", "false"] {
        assert_eq!(scored(&text, "v2", correct), 0.0);
    }
    assert_eq!(
        value(
            &text,
            "model_request_duration_seconds_count",
            &[("version", "v2")]
        ),
        0.0
    );
    let les: Vec<String> = samples(&text)
        .into_iter()
        .filter(|(n, _, _)| n == "model_request_duration_seconds_bucket")
        .map(|(_, l, _)| l["le"].clone())
        .collect();
    assert_eq!(
        les,
        [
            "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf"
        ]
    );
    // Exactly the convention's label names, nothing more.
    for (name, labels, _) in samples(&text) {
        let keys: Vec<&str> = labels.keys().map(String::as_str).collect();
        let expected: &[&str] = match name.as_str() {
            "model_requests_total" => &["model", "outcome", "version"],
            "model_predictions_scored_total" => &["correct", "model", "version"],
            "model_request_duration_seconds_bucket" => &["le", "model", "version"],
            "model_request_duration_seconds_sum" | "model_request_duration_seconds_count" => {
                &["model", "version"]
            }
            other => panic!("unexpected series {other}"),
        };
        assert_eq!(keys, expected, "labels of {name}");
    }
    let health = c
        .get(format!("{}/healthz", s.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn counters_and_histogram_move_as_requests_are_served() {
    let s = start(fast("v1")).await;
    let c = client();
    assert_eq!(send(&c, &s.base, "a", 20).await, 0);
    // No body at all is a valid request too; the server makes up an id.
    let r = c
        .post(format!("{}/predict", s.base))
        .send()
        .await
        .expect("predict");
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["version"], "v1");
    assert!(
        body["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{body}"
    );
    assert!(body["prediction"].is_number(), "{body}");
    let text = scrape(&c, &s.base).await;
    assert_eq!(requests(&text, "v1", "success"), 21.0);
    assert_eq!(requests(&text, "v1", "error"), 0.0);
    assert_eq!(
        value(&text, "model_request_duration_seconds_count", &[]),
        21.0
    );
    assert!(value(&text, "model_request_duration_seconds_sum", &[]) > 0.0);
}

#[tokio::test]
async fn error_rates_of_zero_and_one_hundred_percent_are_exact() {
    let c = client();
    for (rate, expected) in [(1.0, 50), (0.0, 0)] {
        let mut config = fast("v2");
        config.knobs.error_rate = rate;
        let s = start(config).await;
        assert_eq!(
            send(&c, &s.base, "e", 50).await,
            expected,
            "error rate {rate}"
        );
        let text = scrape(&c, &s.base).await;
        assert_eq!(requests(&text, "v2", "error"), expected as f64);
        assert_eq!(requests(&text, "v2", "success"), (50 - expected) as f64);
    }
}

#[tokio::test]
async fn error_rate_of_half_lands_within_binomial_tolerance() {
    let mut config = fast("v2");
    config.knobs.error_rate = 0.5;
    let s = start(config).await;
    let c = client();
    let errors = send(&c, &s.base, "h", 400).await as f64;
    assert!(
        within_binomial(errors, 400.0, 0.5),
        "{errors} errors of 400 at 50 %"
    );
    let text = scrape(&c, &s.base).await;
    assert_eq!(requests(&text, "v2", "error"), errors);
    assert_eq!(requests(&text, "v2", "success"), 400.0 - errors);
}

#[tokio::test]
async fn latency_histogram_centres_on_the_configured_median() {
    let mut config = fast("v2");
    config.knobs.latency = Duration::from_millis(35);
    config.knobs.latency_sigma = 0.1;
    let s = start(config).await;
    let c = client();
    send(&c, &s.base, "l", 200).await;
    let text = scrape(&c, &s.base).await;
    // ln(25/35)/0.1 = -3.4 sd and ln(50/35)/0.1 = +3.6 sd: all but a few in (25 ms, 50 ms].
    let around = bucket(&text, "0.05") - bucket(&text, "0.025");
    assert!(around >= 190.0, "{around} of 200 in (0.025, 0.05]\n{text}");
    let mean = value(&text, "model_request_duration_seconds_sum", &[]) / 200.0;
    assert!((0.030..0.040).contains(&mean), "mean latency {mean}");
}

#[tokio::test]
async fn latency_tail_moves_its_share_into_the_slow_buckets() {
    let mut config = fast("v2");
    config.knobs.latency = Duration::from_millis(20);
    config.knobs.latency_sigma = 0.0;
    config.knobs.tail_share = 0.25;
    config.knobs.tail_extra = Duration::from_millis(1500);
    let s = start(config).await;
    let c = client();
    send(&c, &s.base, "t", 400).await;
    let text = scrape(&c, &s.base).await;
    let fast_ones = bucket(&text, "0.025");
    let slow_ones = bucket(&text, "2.5") - bucket(&text, "1");
    assert_eq!(
        fast_ones + slow_ones,
        400.0,
        "every request is either 20 ms or 1.52 s\n{text}"
    );
    assert!(
        within_binomial(slow_ones, 400.0, 0.25),
        "{slow_ones} of 400 in the tail at 25 %"
    );
}

#[tokio::test]
async fn requests_really_take_the_drawn_latency_at_sleep_scale_one() {
    let mut config = SimConfig::new("fraud", "v2");
    config.knobs.latency = Duration::from_millis(60);
    config.knobs.latency_sigma = 0.0;
    let s = start(config).await;
    let c = client();
    let began = tokio::time::Instant::now();
    let (status, _) = predict(&c, &s.base, "slow").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        began.elapsed() >= Duration::from_millis(60),
        "answered after {:?}",
        began.elapsed()
    );
}

#[tokio::test]
async fn feedback_scores_predictions_at_the_configured_accuracy() {
    let c = client();
    for (accuracy, n) in [(1.0, 50), (0.0, 50), (0.7, 400)] {
        let mut config = fast("v2");
        config.knobs.accuracy = accuracy;
        let s = start(config).await;
        send(&c, &s.base, "f", n).await;
        let mut correct = 0;
        for i in 0..n {
            let r = c
                .post(format!("{}/feedback", s.base))
                .json(&json!({ "id": format!("f-{i}") }))
                .send()
                .await
                .expect("feedback");
            assert_eq!(r.status(), StatusCode::OK);
            let body: Value = r.json().await.expect("json");
            assert_eq!(body["version"], "v2");
            if body["correct"] == json!(true) {
                correct += 1;
            }
        }
        let text = scrape(&c, &s.base).await;
        assert_eq!(scored(&text, "v2", "true"), correct as f64);
        assert_eq!(scored(&text, "v2", "false"), (n - correct) as f64);
        if accuracy == 1.0 || accuracy == 0.0 {
            assert_eq!(correct as f64, accuracy * n as f64, "accuracy {accuracy}");
        } else {
            assert!(
                within_binomial(correct as f64, n as f64, accuracy),
                "{correct} of {n} at {accuracy}"
            );
        }
    }
}

async fn oneshot(app: &axum::Router, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn feedback_for_an_unknown_or_already_scored_id_is_404() {
    let app = sim::router(fast("v2")).expect("router");
    let (status, _) = oneshot(&app, "POST", "/feedback", r#"{"id": "never-predicted"}"#).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = oneshot(
        &app,
        "POST",
        "/predict",
        r#"{"id": "p1", "features": [1, 2]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = oneshot(&app, "POST", "/feedback", r#"{"id": "p1"}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = oneshot(&app, "POST", "/feedback", r#"{"id": "p1"}"#).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a prediction is scored once: {body}"
    );
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("p1")),
        "{body}"
    );
}

#[tokio::test]
async fn malformed_bodies_are_400_with_a_reason() {
    let app = sim::router(fast("v2")).expect("router");
    for (uri, body) in [
        ("/predict", "{not json"),
        ("/predict", r#"{"id": 42}"#),
        ("/predict", r#"{"id": ""}"#),
        ("/feedback", ""),
        ("/feedback", r#"{"label": 1}"#),
    ] {
        let (status, answer) = oneshot(&app, "POST", uri, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {body}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{uri} {body}: {answer}"
        );
    }
    let long = format!(r#"{{"id": "{}"}}"#, "x".repeat(300));
    assert_eq!(
        oneshot(&app, "POST", "/predict", &long).await.0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn memory_forgets_the_oldest_predictions_first() {
    let mut config = fast("v2");
    config.memory = 2;
    let app = sim::router(config).expect("router");
    for id in ["a", "b", "c"] {
        assert_eq!(
            oneshot(&app, "POST", "/predict", &json!({ "id": id }).to_string())
                .await
                .0,
            StatusCode::OK
        );
    }
    assert_eq!(
        oneshot(&app, "POST", "/feedback", r#"{"id": "a"}"#).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        oneshot(&app, "POST", "/feedback", r#"{"id": "b"}"#).await.0,
        StatusCode::OK
    );
    assert_eq!(
        oneshot(&app, "POST", "/feedback", r#"{"id": "c"}"#).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn admin_config_changes_knobs_at_runtime_and_rejects_bad_values_whole() {
    let s = start(fast("v2")).await;
    let c = client();
    assert_eq!(send(&c, &s.base, "before", 20).await, 0);
    let r = c
        .put(format!("{}/admin/config", s.base))
        .json(&json!({ "error_rate": "100%", "latency_ms": 120 }))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::OK);
    let view: Value = r.json().await.expect("json");
    assert_eq!(view["error_rate"], json!(1.0));
    assert_eq!(view["latency_ms"], json!(120.0));
    assert_eq!(send(&c, &s.base, "after", 20).await, 20);
    let text = scrape(&c, &s.base).await;
    assert!(
        bucket(&text, "0.05") <= 20.0,
        "the later requests drew around 120 ms\n{text}"
    );

    for bad in [
        json!({ "error_rate": 1.5, "accuracy": 0.5 }),
        json!({ "accuracy": "ninety" }),
        json!({ "error_rat": 0.1 }),
        json!({ "latency_ms": -1 }),
        json!({ "latency_sigma": 9 }),
    ] {
        let r = c
            .put(format!("{}/admin/config", s.base))
            .json(&bad)
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        let body: Value = r.json().await.expect("json");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    let now: Value = c
        .get(format!("{}/admin/config", s.base))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(
        now["error_rate"],
        json!(1.0),
        "a rejected update changes nothing"
    );
    assert_eq!(
        now["accuracy"],
        json!(0.95),
        "a rejected update changes nothing"
    );
}

#[test]
fn schedules_parse_or_say_what_is_wrong() {
    let ok: Schedule = "2m:error-rate=5%; 4m:latency=120ms,latency-tail=5%:1s ;90s:accuracy=0.9"
        .parse()
        .expect("valid schedule");
    let offsets: Vec<u64> = ok.0.iter().map(|e| e.at.as_secs()).collect();
    assert_eq!(offsets, [90, 120, 240], "sorted by offset");
    assert_eq!(ok.0[1].settings, [sim::Setting::ErrorRate(0.05)]);
    assert_eq!(
        ok.0[2].settings,
        [
            sim::Setting::Latency(Duration::from_millis(120)),
            sim::Setting::LatencyTail {
                share: 0.05,
                extra: Duration::from_secs(1)
            }
        ]
    );
    assert_eq!(ok.0[0].settings, [sim::Setting::Accuracy(0.9)]);
    let sigma: Schedule = "1s:latency-sigma=0.5".parse().expect("valid");
    assert_eq!(sigma.0[0].settings, [sim::Setting::LatencySigma(0.5)]);

    for (bad, says) in [
        ("", "at least one entry"),
        ("error-rate=5%", "OFFSET:KNOB=VALUE"),
        ("soon:error-rate=5%", "expected an offset like 2m"),
        ("2m:error-rat=5%", "unknown knob \"error-rat\""),
        ("2m:error-rate", "KNOB=VALUE"),
        (
            "2m:error-rate=150%",
            "error-rate: expected a value from 0% to 100%",
        ),
        ("2m:latency=fast", "latency: expected a duration like 40ms"),
        ("2m:latency-tail=5%", "SHARE:EXTRA"),
        ("2m:latency-sigma=-1", "latency-sigma"),
        ("2m:error-rate=5%;3m:accuracy=lots", "\"3m:accuracy=lots\""),
    ] {
        let err = bad.parse::<Schedule>().expect_err(bad).to_string();
        assert!(
            err.contains(says),
            "{bad:?}: {err:?} should contain {says:?}"
        );
    }
}

#[tokio::test]
async fn schedule_changes_knobs_over_time() {
    let mut config = fast("v2");
    config.schedule = "200ms:error-rate=100%;1h:accuracy=0%"
        .parse::<Schedule>()
        .expect("schedule")
        .0;
    let s = start(config).await;
    let c = client();
    wait_for(
        "the scheduled error rate to take effect",
        Duration::from_secs(10),
        || {
            let c = c.clone();
            let base = s.base.clone();
            async move {
                (predict(&c, &base, "sched").await.0 == StatusCode::INTERNAL_SERVER_ERROR)
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(send(&c, &s.base, "s", 20).await, 20);
    let now: Value = c
        .get(format!("{}/admin/config", s.base))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(now["accuracy"], json!(0.95), "the 1h entry is not due yet");
}

/// A round-robin stand-in for HAProxy: each request, `/feedback` included, goes to the next
/// backend, so feedback sent through it would mostly reach the wrong version.
async fn round_robin(backends: Vec<String>) -> (String, oneshot::Sender<()>) {
    use axum::extract::State;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = Arc::new((client(), backends, AtomicUsize::new(0)));
    let app = axum::Router::new().route(
        "/{*path}",
        axum::routing::post(
            |State(st): State<Arc<(reqwest::Client, Vec<String>, AtomicUsize)>>,
             uri: axum::http::Uri,
             body: axum::body::Bytes| async move {
                let i = st.2.fetch_add(1, Ordering::Relaxed) % st.1.len();
                let r =
                    st.0.post(format!("{}{}", st.1[i], uri.path()))
                        .body(body)
                        .send()
                        .await
                        .expect("backend");
                let status = StatusCode::from_u16(r.status().as_u16()).expect("status");
                (status, r.bytes().await.expect("backend body"))
            },
        ),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app.with_state(state))
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .expect("proxy");
    });
    (format!("http://{addr}"), stop)
}

#[tokio::test]
async fn load_generator_drives_two_versions_and_sends_feedback_to_each() {
    let mut stable = fast("v1");
    stable.knobs.accuracy = 1.0;
    let (v1, v2) = (start(stable).await, start(fast("v2")).await);
    // Turned bad while running, the way the demo does it.
    let update = sim::KnobsUpdate {
        error_rate: Some(0.2.into()),
        accuracy: Some(sim::Rate::Text("0%".into())),
        ..Default::default()
    };
    let now = sim::update_knobs(&client(), &v2.base, &update)
        .await
        .expect("update knobs");
    assert_eq!((now.error_rate, now.accuracy), (0.2, 0.0));
    let bad = sim::KnobsUpdate {
        accuracy: Some(2.0.into()),
        ..Default::default()
    };
    let err = sim::update_knobs(&client(), &v2.base, &bad)
        .await
        .expect_err("accuracy 2");
    assert!(format!("{err:#}").contains("400"), "{err:#}");
    let (router, _stop) = round_robin(vec![v1.base.clone(), v2.base.clone()]).await;

    let mut config = LoadConfig::new(router);
    config.rps = 400.0;
    config.requests = Some(300);
    config.feedback_share = 1.0;
    config.feedback_delay = Duration::from_millis(50);
    config.feedback_urls = BTreeMap::from([
        ("v1".to_string(), v1.base.clone()),
        ("v2".to_string(), v2.base.clone()),
    ]);
    config.seed = Some(3);
    let stats = tokio::time::timeout(
        Duration::from_secs(60),
        sim::load(config, std::future::pending::<()>()),
    )
    .await
    .expect("a bounded run ends by itself")
    .expect("load");

    assert_eq!(stats.sent, 300);
    assert_eq!(stats.failed, 0);
    assert_eq!(stats.answered(), 300);
    assert_eq!(stats.feedback_failed, 0, "{stats:?}");
    let (s1, s2) = (&stats.versions["v1"], &stats.versions["v2"]);
    assert_eq!(s1.success + s1.error, 150, "round robin: {stats:?}");
    assert_eq!(s2.success + s2.error, 150, "round robin: {stats:?}");
    assert_eq!(s1.error, 0);
    assert!(
        s2.error > 0 && within_binomial(s2.error as f64, 150.0, 0.2),
        "{stats:?}"
    );
    assert_eq!(
        (s1.scored, s2.scored),
        (s1.success, s2.success),
        "every success scored once"
    );

    let c = client();
    let (m1, m2) = (scrape(&c, &v1.base).await, scrape(&c, &v2.base).await);
    assert_eq!(requests(&m1, "v1", "success"), s1.success as f64);
    assert_eq!(requests(&m2, "v2", "error"), s2.error as f64);
    assert_eq!(
        scored(&m1, "v1", "true"),
        s1.success as f64,
        "v1 is always right"
    );
    assert_eq!(
        scored(&m2, "v2", "false"),
        s2.success as f64,
        "v2 is always wrong"
    );
    assert_eq!(scored(&m2, "v2", "true"), 0.0);
}

#[tokio::test]
async fn load_generator_paces_its_rate_and_stops_on_shutdown() {
    let s = start(fast("v1")).await;
    let mut config = LoadConfig::new(s.base.clone());
    config.rps = 50.0;
    config.feedback_share = 0.0;
    let (tx, mut rx) = tokio::sync::watch::channel(sim::LoadStats::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let began = tokio::time::Instant::now();
    let run = tokio::spawn(sim::load_with_progress(config, stopped, tx));
    rx.wait_for(|s| s.answered() >= 25)
        .await
        .expect("progress is published");
    let elapsed = began.elapsed();
    // 25 answers at 50/s take about half a second; far less would mean no pacing.
    assert!(
        elapsed >= Duration::from_millis(400),
        "25 answers after {elapsed:?}"
    );
    stop.send(()).expect("load still running");
    let stats = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("stops promptly")
        .expect("joins")
        .expect("load");
    assert!(stats.sent >= 25 && stats.failed == 0, "{stats:?}");
}

#[tokio::test]
async fn load_generator_skips_ticks_instead_of_exceeding_its_concurrency() {
    let mut config = SimConfig::new("fraud", "v1");
    config.knobs.latency = Duration::from_millis(300);
    config.knobs.latency_sigma = 0.0;
    let s = start(config).await;
    let mut config = LoadConfig::new(s.base.clone());
    config.rps = 50.0;
    config.concurrency = 1;
    config.duration = Some(Duration::from_millis(700));
    config.feedback_share = 0.0;
    let stats = sim::load(config, std::future::pending::<()>())
        .await
        .expect("load");
    // One at a time, 300 ms each: at most 3 sent in 700 ms; the other ~32 ticks are skipped.
    assert!((1..=3).contains(&stats.sent), "{stats:?}");
    assert!(stats.skipped >= 15, "{stats:?}");
}

#[tokio::test]
async fn load_generator_rejects_a_bad_configuration() {
    for (edit, says) in [
        (
            Box::new(|c: &mut LoadConfig| c.rps = 0.0) as Box<dyn Fn(&mut LoadConfig)>,
            "rps",
        ),
        (
            Box::new(|c: &mut LoadConfig| c.target = "localhost:80".into()),
            "target",
        ),
        (
            Box::new(|c: &mut LoadConfig| c.feedback_share = 2.0),
            "feedback-share",
        ),
    ] {
        let mut config = LoadConfig::new("http://127.0.0.1:9");
        edit(&mut config);
        let err = sim::load(config, std::future::ready(()))
            .await
            .expect_err(says);
        assert!(format!("{err:#}").contains(says), "{err:#}");
    }
}

fn canaryd() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
}

#[tokio::test]
async fn cli_rejects_bad_flags_with_clear_errors() {
    for (args, says) in [
        (
            vec!["--version", "v2", "--error-rate", "150%"],
            "expected a value from 0% to 100%",
        ),
        (
            vec!["--version", "v2", "--latency", "fast"],
            "expected a duration like 40ms",
        ),
        (
            vec!["--version", "v2", "--schedule", "2m:bogus=1"],
            "unknown knob \"bogus\"",
        ),
        (
            vec!["--version", "v2", "--latency-tail", "5%"],
            "SHARE:EXTRA",
        ),
        (vec!["--listen", "127.0.0.1:0"], "--version"),
        (vec!["--load"], "--target"),
        (
            vec!["--load", "--target", "http://x", "--feedback", "v1"],
            "VERSION=URL",
        ),
        (
            vec!["--version", "v2", "--rps", "5"],
            "cannot be used with '--rps <RPS>'",
        ),
        (
            vec!["--version", "v2", "--feedback-share", "5%"],
            "cannot be used",
        ),
        (
            vec!["--version", "v2", "--listen", "not-an-address"],
            "listening on not-an-address",
        ),
    ] {
        let out = canaryd()
            .arg("sim")
            .args(&args)
            .output()
            .expect("run canaryd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(says),
            "{args:?}: {stderr:?} should contain {says:?}"
        );
    }
}

#[tokio::test]
async fn cli_serves_generates_load_and_exits_cleanly() {
    let port = free_port();
    let mut server = ChildGuard::spawn(canaryd().stderr(std::process::Stdio::null()).args([
        "sim",
        "--version",
        "v3",
        "--model",
        "fraud",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--sleep-scale",
        "0",
    ]));
    wait_for_port(port, Duration::from_secs(20)).await;
    let base = format!("http://127.0.0.1:{port}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args([
            "sim",
            "--load",
            "--target",
            &base,
            "--rps",
            "100",
            "--requests",
            "40",
        ])
        .args([
            "--feedback-share",
            "100%",
            "--feedback-delay",
            "10ms",
            "--feedback",
            &format!("v3={base}"),
        ])
        .output()
        .await
        .expect("run load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("sent 40 answered 40") && stdout.contains("v3: ok"),
        "{stdout}"
    );
    let text = scrape(&client(), &base).await;
    assert_eq!(
        requests(&text, "v3", "success") + requests(&text, "v3", "error"),
        40.0
    );
    assert_eq!(
        scored(&text, "v3", "true") + scored(&text, "v3", "false"),
        requests(&text, "v3", "success")
    );

    // SIGTERM is the daemon-manager's stop; the server must exit 0 on it.
    let pid = server.pid().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = wait_for(
        "the sim to exit on SIGTERM",
        Duration::from_secs(10),
        || {
            let done = server.0.try_wait().expect("try_wait");
            async move { done }
        },
    )
    .await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_sim() {
    let prometheus = find_binary("prometheus");
    let s = start(fast("v2")).await;
    let c = client();
    send(&c, &s.base, "p", 5).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let target = s.base.trim_start_matches("http://");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: sim\n    static_configs: [{{targets: ['{target}']}}]\n"
        ),
    )
    .expect("write config");
    let port = free_port();
    let _prom = ChildGuard::spawn(
        std::process::Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    wait_for_port(port, Duration::from_secs(30)).await;
    let url = format!("http://127.0.0.1:{port}/api/v1/query");
    let total = wait_for("Prometheus to scrape model_requests_total", Duration::from_secs(60), || {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let r = c
                .get(&url)
                .query(&[("query", "sum by (version) (model_requests_total{model=\"fraud\",outcome=\"success\"})")])
                .send()
                .await
                .ok()?;
            let v: Value = r.json().await.ok()?;
            let result = v["data"]["result"].as_array()?.first()?.clone();
            (result["metric"]["version"] == "v2").then(|| result["value"][1].as_str().map(str::to_string))?
        }
    })
    .await;
    assert_eq!(total, "5");
}

/// The simulator's log, written to a file, is plain text like the daemon's.
#[tokio::test]
async fn the_simulators_log_has_no_colour_codes_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sim.log");
    let port = free_port();
    let _server = ChildGuard::spawn(
        canaryd()
            .env_remove("RUST_LOG")
            .stderr(std::fs::File::create(&log).unwrap())
            .args(["sim", "--version", "v2", "--listen"])
            .arg(format!("127.0.0.1:{port}")),
    );
    wait_for_port(port, Duration::from_secs(20)).await;
    let put = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{port}/admin/config"))
        .body(r#"{"error_rate": "3%"}"#)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let text = wait_for(
        "the knob change logged",
        Duration::from_secs(10),
        || async {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains("knobs changed").then_some(text)
        },
    )
    .await;
    assert!(!text.contains('\x1b'), "escape codes in the log: {text:?}");
}
