//! The load generator: predictions at a steady rate through a router, and late feedback sent
//! straight to the version that served each prediction.

use anyhow::Context as _;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

/// What to send, how fast, and where feedback goes.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Base URL that `/predict` is posted to, normally the router's frontend.
    pub target: String,
    /// Predictions per second.
    pub rps: f64,
    /// Stop sending after this long; `None` runs until shutdown or `requests`.
    pub duration: Option<Duration>,
    /// Stop after this many predictions; `None` runs until shutdown or `duration`.
    pub requests: Option<u64>,
    /// Most predictions in flight at once. A tick that finds them all busy is skipped and
    /// counted, so a slow server shows up as skipped load instead of a silently lower rate.
    pub concurrency: usize,
    /// Share in [0, 1] of successful predictions whose label arrives later as feedback.
    pub feedback_share: f64,
    /// How long after its prediction the feedback is sent (labels arrive late).
    pub feedback_delay: Duration,
    /// Base URL of each version's own server, for feedback. A version not listed gets its
    /// feedback through `target`, which is right only when `target` is a single server.
    pub feedback_urls: BTreeMap<String, String>,
    /// Timeout of every HTTP request.
    pub timeout: Duration,
    /// Seed of the feedback draws and the id prefix; `None` picks one at random.
    pub seed: Option<u64>,
}

impl LoadConfig {
    /// 20 requests per second until shutdown, half of the successes scored 5 s later.
    pub fn new(target: impl Into<String>) -> Self {
        LoadConfig {
            target: target.into(),
            rps: 20.0,
            duration: None,
            requests: None,
            concurrency: 64,
            feedback_share: 0.5,
            feedback_delay: Duration::from_secs(5),
            feedback_urls: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            seed: None,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.target.starts_with("http://") || self.target.starts_with("https://"),
            "target: expected a URL like http://127.0.0.1:8080, found {:?}",
            self.target
        );
        for (version, url) in &self.feedback_urls {
            anyhow::ensure!(
                url.starts_with("http://") || url.starts_with("https://"),
                "feedback URL of version {version}: expected a URL like http://127.0.0.1:9861, found {url:?}"
            );
        }
        // The upper bound keeps the tick period well above the timer's resolution.
        anyhow::ensure!(
            self.rps > 0.0 && self.rps <= 10_000.0,
            "rps: expected a rate above 0 and at most 10000, found {}",
            self.rps
        );
        anyhow::ensure!(self.concurrency >= 1, "concurrency: expected at least 1");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.feedback_share),
            "feedback-share: expected a fraction from 0 to 1, found {}",
            self.feedback_share
        );
        Ok(())
    }
}

/// Counts of one version, as named by its responses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionStats {
    /// Predictions it served.
    pub success: u64,
    /// Predictions it failed (HTTP 5xx naming this version).
    pub error: u64,
    /// Feedback it accepted.
    pub scored: u64,
}

/// What the load generator did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadStats {
    /// Predictions sent.
    pub sent: u64,
    /// Per `version` named in the responses.
    pub versions: BTreeMap<String, VersionStats>,
    /// Predictions with no answer, or an answer that names no version (the router's own error).
    pub failed: u64,
    /// Ticks skipped because `concurrency` predictions were already in flight.
    pub skipped: u64,
    /// Feedback that was not accepted: refused (404 when it reached the wrong version) or
    /// unanswered.
    pub feedback_failed: u64,
}

impl LoadStats {
    /// Successes plus errors over all versions.
    pub fn answered(&self) -> u64 {
        self.versions.values().map(|v| v.success + v.error).sum()
    }
}

/// Runs load until `requests` or `duration` is reached (then waits for the feedback still due)
/// or until `shutdown` completes (then abandons whatever is in flight).
pub async fn load<F: Future>(config: LoadConfig, shutdown: F) -> anyhow::Result<LoadStats> {
    load_with_progress(config, shutdown, watch::Sender::new(LoadStats::default())).await
}

/// Like [`load`], publishing the counts on `progress` as they change, for live displays.
pub async fn load_with_progress<F: Future>(
    config: LoadConfig,
    shutdown: F,
    progress: watch::Sender<LoadStats>,
) -> anyhow::Result<LoadStats> {
    config.validate()?;
    let client = reqwest::Client::builder()
        .timeout(config.timeout)
        .user_agent(crate::USER_AGENT)
        .build()
        .context("building the HTTP client")?;
    let mut rng = SmallRng::seed_from_u64(config.seed.unwrap_or_else(super::server::random_seed));
    // Ids unique across runs, so two load generators against one sim do not score each
    // other's predictions.
    let run: u32 = rng.random();
    let shared = Arc::new(Shared {
        client,
        predict_url: format!("{}/predict", config.target.trim_end_matches('/')),
        config: config.clone(),
        stats: progress,
    });
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let mut tasks = JoinSet::new();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rps));
    // Catch up after a stall of the runtime so the average rate holds; `concurrency` bounds
    // the burst.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let deadline = config.duration.map(|d| tokio::time::Instant::now() + d);
    let until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(shutdown, until_deadline);
    let mut n: u64 = 0;
    let mut interrupted = false;
    loop {
        if config.requests.is_some_and(|max| n >= max) {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => { interrupted = true; break; }
            _ = &mut until_deadline => break,
            _ = ticker.tick() => {}
        }
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.stats.send_modify(|s| s.skipped += 1);
            continue;
        };
        n += 1;
        let id = format!("load-{run:08x}-{n}");
        let wants_feedback = rng.random::<f64>() < config.feedback_share;
        shared.stats.send_modify(|s| s.sent += 1);
        tasks.spawn(shared.clone().predict(id, wants_feedback, permit));
    }
    if !interrupted {
        // Feedback still due is part of the run; it ends within feedback_delay + timeout.
        tokio::select! {
            _ = &mut shutdown => {}
            _ = async { while tasks.join_next().await.is_some() {} } => {}
        }
    }
    tasks.abort_all();
    Ok(shared.stats.borrow().clone())
}

struct Shared {
    client: reqwest::Client,
    predict_url: String,
    config: LoadConfig,
    /// The one copy of the counts; readers of the watch see them live.
    stats: watch::Sender<LoadStats>,
}

/// The parts of a `/predict` answer (or its error body) the generator reads.
#[derive(Deserialize)]
struct Answer {
    version: Option<String>,
}

impl Shared {
    async fn predict(
        self: Arc<Self>,
        id: String,
        wants_feedback: bool,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let answer = self
            .client
            .post(&self.predict_url)
            .json(&serde_json::json!({ "id": id }))
            .send()
            .await;
        let (ok, version) = match answer {
            Ok(resp) => {
                let ok = resp.status().is_success();
                let version = resp.json::<Answer>().await.ok().and_then(|a| a.version);
                (ok, version)
            }
            Err(e) => {
                tracing::debug!(error = %e, "prediction request failed");
                (false, None)
            }
        };
        drop(permit);
        let Some(version) = version else {
            self.stats.send_modify(|s| s.failed += 1);
            return;
        };
        self.stats.send_modify(|s| {
            let v = s.versions.entry(version.clone()).or_default();
            if ok { v.success += 1 } else { v.error += 1 }
        });
        if ok && wants_feedback {
            tokio::time::sleep(self.config.feedback_delay).await;
            self.feedback(&id, &version).await;
        }
    }

    async fn feedback(&self, id: &str, version: &str) {
        let base = self
            .config
            .feedback_urls
            .get(version)
            .unwrap_or(&self.config.target);
        let url = format!("{}/feedback", base.trim_end_matches('/'));
        let accepted = match self
            .client
            .post(&url)
            .json(&serde_json::json!({ "id": id }))
            .send()
            .await
        {
            Ok(resp) => resp.status().is_success(),
            Err(e) => {
                tracing::debug!(error = %e, "feedback request failed");
                false
            }
        };
        self.stats.send_modify(|s| {
            if accepted {
                s.versions.entry(version.to_string()).or_default().scored += 1;
            } else {
                s.feedback_failed += 1;
            }
        });
    }
}
