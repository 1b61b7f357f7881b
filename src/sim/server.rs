//! The simulated model server: HTTP handlers, the random draws, the remembered predictions and
//! the metrics in the model-server convention.

use super::knobs::{Knobs, KnobsUpdate, KnobsView, ScheduleEntry};
use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Deserialize;
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Everything a simulated model version needs to start.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The `model` label of every series.
    pub model: String,
    /// The `version` label of every series, also returned with each prediction.
    pub version: String,
    /// The starting knobs.
    pub knobs: Knobs,
    /// Changes applied at fixed offsets after the server starts.
    pub schedule: Vec<ScheduleEntry>,
    /// Factor on the time a request really sleeps. The histogram always records the drawn,
    /// unscaled latency, so tests can set 0 and still check the latency distribution without
    /// waiting for it.
    pub sleep_scale: f64,
    /// How many unscored predictions are remembered for `/feedback`; the oldest are forgotten
    /// first, so a load generator that never sends feedback cannot exhaust memory.
    pub memory: usize,
    /// Seed of the random draws; `None` picks a different one each run.
    pub seed: Option<u64>,
}

impl SimConfig {
    /// Default knobs (no errors, 40 ms median latency, 95 % accuracy), no schedule, real sleeps.
    pub fn new(model: impl Into<String>, version: impl Into<String>) -> Self {
        SimConfig {
            model: model.into(),
            version: version.into(),
            knobs: Knobs::default(),
            schedule: Vec::new(),
            sleep_scale: 1.0,
            memory: 100_000,
            seed: None,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.model.trim().is_empty(),
            "model: expected a name, found an empty string"
        );
        anyhow::ensure!(
            !self.version.trim().is_empty(),
            "version: expected a name, found an empty string"
        );
        anyhow::ensure!(
            self.sleep_scale.is_finite() && (0.0..=1000.0).contains(&self.sleep_scale),
            "sleep-scale: expected a number from 0 to 1000, found {}",
            self.sleep_scale
        );
        anyhow::ensure!(
            self.memory >= 1,
            "memory: expected at least 1 remembered prediction"
        );
        self.knobs.validate()?;
        Ok(())
    }
}

/// The longest prediction id accepted; ids are kept in memory until scored.
const MAX_ID_LEN: usize = 256;

/// Serves the simulator on `listener` until `shutdown` completes, applying `config.schedule`
/// relative to the moment it is called. In-flight requests are finished before it returns.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    shutdown: F,
) -> anyhow::Result<()>
where
    F: Future + Send + 'static,
{
    let schedule = config.schedule.clone();
    let sim = Sim::new(config)?;
    let scheduler = tokio::spawn(run_schedule(sim.clone(), schedule));
    let result = axum::serve(listener, sim.router())
        .with_graceful_shutdown(async move {
            shutdown.await;
        })
        .await;
    scheduler.abort();
    result.context("serving the simulated model")
}

/// Changes the knobs of the simulator at `base` (like `http://127.0.0.1:9861`) through
/// `PUT /admin/config`, and returns them as they are now. This is how a demo turns a canary bad.
pub async fn update_knobs(
    client: &reqwest::Client,
    base: &str,
    update: &KnobsUpdate,
) -> anyhow::Result<KnobsView> {
    let url = format!("{}/admin/config", base.trim_end_matches('/'));
    let resp = client
        .put(&url)
        .json(update)
        .send()
        .await
        .with_context(|| format!("PUT {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        anyhow::bail!("PUT {url}: {status}: {}", body.trim());
    }
    resp.json()
        .await
        .with_context(|| format!("PUT {url}: reading the knobs"))
}

/// The simulator's routes without a socket or schedule, for `Router::oneshot` tests.
pub fn router(config: SimConfig) -> anyhow::Result<Router> {
    Ok(Sim::new(config)?.router())
}

async fn run_schedule(sim: Sim, schedule: Vec<ScheduleEntry>) {
    let start = tokio::time::Instant::now();
    for entry in schedule {
        tokio::time::sleep_until(start + entry.at).await;
        let mut knobs = sim.0.knobs();
        for s in &entry.settings {
            knobs.apply(s);
        }
        tracing::info!(version = %sim.0.version, at = ?entry.at, knobs = ?knobs.view(), "schedule changed the knobs");
    }
}

/// A cheap handle on the shared state of one simulated version.
#[derive(Clone)]
struct Sim(Arc<Shared>);

struct Shared {
    version: String,
    sleep_scale: f64,
    knobs: Mutex<Knobs>,
    rng: Mutex<SmallRng>,
    memory: Mutex<Memory>,
    metrics: Metrics,
    /// Numbers the ids of predictions requested without one.
    next_id: AtomicU64,
}

/// A lock that survives a panic elsewhere: every critical section here leaves its data
/// consistent, so a poisoned lock carries nothing wrong.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn knobs(&self) -> MutexGuard<'_, Knobs> {
        lock(&self.knobs)
    }
}

impl Sim {
    fn new(config: SimConfig) -> anyhow::Result<Sim> {
        config.validate()?;
        let seed = config.seed.unwrap_or_else(random_seed);
        let metrics = Metrics::new(&config.model, &config.version)
            .context("registering the simulator's metrics")?;
        Ok(Sim(Arc::new(Shared {
            version: config.version,
            sleep_scale: config.sleep_scale,
            knobs: Mutex::new(config.knobs),
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            memory: Mutex::new(Memory::new(config.memory)),
            metrics,
            next_id: AtomicU64::new(1),
        })))
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/predict", post(predict))
            .route("/feedback", post(feedback))
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/admin/config", get(get_config).put(put_config))
            .with_state(self.clone())
    }
}

/// A seed that differs per run. The crate's `rand` has no OS entropy feature; the standard
/// library's hasher keys are drawn from the OS for exactly this kind of use.
pub(crate) fn random_seed() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The random outcome of one request, drawn under one lock.
struct Draw {
    fail: bool,
    latency: Duration,
    correct: bool,
    score: f64,
}

impl Shared {
    fn draw(&self) -> Draw {
        let k = self.knobs().clone();
        let mut rng = lock(&self.rng);
        // Box-Muller: one standard normal from two uniforms; 1 - u keeps the log finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random();
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let mut secs = k.latency.as_secs_f64() * (k.latency_sigma * z).exp();
        if rng.random::<f64>() < k.tail_share {
            secs += k.tail_extra.as_secs_f64();
        }
        let latency = Duration::try_from_secs_f64(secs)
            .unwrap_or(super::knobs::MAX_LATENCY)
            .min(super::knobs::MAX_LATENCY);
        Draw {
            // `<` makes 0 % never fail and 100 % always fail, since `random` is in [0, 1).
            fail: rng.random::<f64>() < k.error_rate,
            latency,
            correct: rng.random::<f64>() < k.accuracy,
            score: rng.random(),
        }
    }
}

/// Correctness of predictions not scored yet, bounded, oldest forgotten first.
struct Memory {
    capacity: usize,
    /// id → (sequence number of the prediction, whether it will turn out correct).
    by_id: HashMap<String, (u64, bool)>,
    /// Ids in arrival order. A scored or re-predicted id leaves a stale entry here, recognised
    /// by its sequence number, so eviction never forgets a newer prediction with the same id.
    order: VecDeque<(String, u64)>,
    seq: u64,
}

impl Memory {
    fn new(capacity: usize) -> Self {
        Memory {
            capacity,
            by_id: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
        }
    }

    fn remember(&mut self, id: String, correct: bool) {
        self.seq += 1;
        self.by_id.insert(id.clone(), (self.seq, correct));
        self.order.push_back((id, self.seq));
        while self.order.len() > self.capacity {
            if let Some((old, seq)) = self.order.pop_front()
                && self.by_id.get(&old).is_some_and(|(s, _)| *s == seq)
            {
                self.by_id.remove(&old);
            }
        }
    }

    /// Whether the prediction was correct; each prediction is scored once.
    fn score(&mut self, id: &str) -> Option<bool> {
        self.by_id.remove(id).map(|(_, correct)| correct)
    }
}

/// The model-server convention of DESIGN.md, on a registry of its own.
struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    scored: IntCounterVec,
    model: String,
    version: String,
}

impl Metrics {
    fn new(model: &str, version: &str) -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "model_requests_total",
                "Prediction requests served, by outcome.",
            ),
            &["model", "version", "outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "model_request_duration_seconds",
                "Time taken to serve a prediction request.",
            ),
            &["model", "version"],
        )?;
        let scored = IntCounterVec::new(
            Opts::new(
                "model_predictions_scored_total",
                "Predictions whose ground-truth label has arrived, by whether they were correct.",
            ),
            &["model", "version", "correct"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(scored.clone()))?;
        // Every series exists from the first scrape, so rates are defined (zero) before the
        // first error or the first label, and "no data" only ever means a missing target.
        for outcome in ["success", "error"] {
            requests.with_label_values(&[model, version, outcome]);
        }
        for correct in ["true", "false"] {
            scored.with_label_values(&[model, version, correct]);
        }
        duration.with_label_values(&[model, version]);
        Ok(Metrics {
            registry,
            requests,
            duration,
            scored,
            model: model.to_string(),
            version: version.to_string(),
        })
    }

    fn request(&self, outcome: &str, latency: Duration) {
        self.requests
            .with_label_values(&[&self.model, &self.version, outcome])
            .inc();
        self.duration
            .with_label_values(&[&self.model, &self.version])
            .observe(latency.as_secs_f64());
    }

    fn scored(&self, correct: bool) {
        let label = if correct { "true" } else { "false" };
        self.scored
            .with_label_values(&[&self.model, &self.version, label])
            .inc();
    }
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": message })),
    )
        .into_response()
}

/// The parts of a prediction request the simulator reads; other fields (the features a real
/// model would use) are accepted and ignored.
#[derive(Deserialize, Default)]
struct PredictRequest {
    id: Option<String>,
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!(
            "id: expected 1 to {MAX_ID_LEN} bytes, found {}",
            id.len()
        ));
    }
    Ok(())
}

async fn predict(State(sim): State<Sim>, body: Bytes) -> Response {
    let sim = &sim.0;
    let req: PredictRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PredictRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return bad_request(format!(
                    "expected a JSON object like {{\"id\": \"42\"}}: {e}"
                ));
            }
        }
    };
    if let Some(id) = &req.id
        && let Err(e) = check_id(id)
    {
        return bad_request(e);
    }
    let draw = sim.draw();
    if sim.sleep_scale > 0.0 {
        // Never panics: the scale is at most 1000 and a draw is capped far below overflow.
        let pause = Duration::try_from_secs_f64(draw.latency.as_secs_f64() * sim.sleep_scale)
            .unwrap_or(Duration::MAX);
        tokio::time::sleep(pause).await;
    }
    if draw.fail {
        sim.metrics.request("error", draw.latency);
        let body = json!({ "error": "simulated failure", "version": sim.version });
        return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response();
    }
    sim.metrics.request("success", draw.latency);
    let id = req.id.unwrap_or_else(|| {
        format!(
            "{}-{}",
            sim.version,
            sim.next_id.fetch_add(1, Ordering::Relaxed)
        )
    });
    lock(&sim.memory).remember(id.clone(), draw.correct);
    axum::Json(json!({ "id": id, "version": sim.version, "prediction": draw.score }))
        .into_response()
}

#[derive(Deserialize)]
struct FeedbackRequest {
    id: String,
}

async fn feedback(State(sim): State<Sim>, body: Bytes) -> Response {
    let sim = &sim.0;
    let req: FeedbackRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return bad_request(format!(
                "expected a JSON object like {{\"id\": \"42\"}}: {e}"
            ));
        }
    };
    let Some(correct) = lock(&sim.memory).score(&req.id) else {
        let body = json!({
            "error": format!("no unscored prediction with id {:?} on version {}", req.id, sim.version),
            "version": sim.version,
        });
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    };
    sim.metrics.scored(correct);
    axum::Json(json!({ "id": req.id, "version": sim.version, "correct": correct })).into_response()
}

async fn metrics(State(sim): State<Sim>) -> Response {
    let families = sim.0.metrics.registry.gather();
    match prometheus::TextEncoder::new().encode_to_string(&families) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response(),
    }
}

async fn get_config(State(sim): State<Sim>) -> Response {
    axum::Json(sim.0.knobs().view()).into_response()
}

async fn put_config(State(sim): State<Sim>, body: Bytes) -> Response {
    let update: KnobsUpdate = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => {
            return bad_request(format!(
                "expected a JSON object with any of error_rate, latency_ms, latency_sigma, tail_share, tail_ms, accuracy: {e}"
            ));
        }
    };
    let mut knobs = sim.0.knobs();
    if let Err(e) = knobs.update(&update) {
        return bad_request(e.0);
    }
    let view = knobs.view();
    drop(knobs);
    tracing::info!(version = %sim.0.version, knobs = ?view, "knobs changed through the admin API");
    axum::Json(view).into_response()
}
