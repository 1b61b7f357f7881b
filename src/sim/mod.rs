//! `canaryd sim`: a stand-in model server that exports the model-server metric convention of
//! DESIGN.md, and a load generator that drives it through a router.
//!
//! # The server
//!
//! `canaryd sim --version v2 [--listen 127.0.0.1:9860] [--model fraud-detector] [knobs]`
//!
//! - `POST /predict`, optional JSON body `{"id": "..."}` (other fields are ignored): sleeps a
//!   drawn latency, then either fails with HTTP 500 `{"error", "version"}` or answers
//!   `{"id", "version", "prediction"}` (`id` made up when none was sent). Whether the
//!   prediction is correct is drawn at once and remembered under its id, at most `--memory` of
//!   them, oldest forgotten first.
//! - `POST /feedback` `{"id": "..."}`: the ground-truth label of that prediction has arrived;
//!   counts it in `model_predictions_scored_total{correct="true"|"false"}` and forgets it.
//!   An id this version never served, already scored or forgotten gets 404.
//! - `GET /metrics`: `model_requests_total{model,version,outcome}`,
//!   `model_request_duration_seconds{model,version}` (default buckets 5 ms to 10 s) and
//!   `model_predictions_scored_total{model,version,correct}`, every label combination present
//!   at 0 from the start.
//! - `GET /healthz`; `GET /admin/config` shows the knobs; `PUT /admin/config` changes any of
//!   them at once, JSON `{"error_rate": 0.05 or "5%", "latency_ms": 120, "latency_sigma": 0.3,
//!   "tail_share": "2%", "tail_ms": 500, "accuracy": "90%"}`; a bad body (400) changes nothing.
//!   The admin API has no authentication: the simulator is a test fixture, keep it on loopback.
//!
//! # Knobs
//!
//! | flag | meaning | default |
//! |---|---|---|
//! | `--error-rate 2%` | probability of HTTP 500 (also `0.02`) | `0%` |
//! | `--latency 40ms` | median of the log-normal service time | `40ms` |
//! | `--latency-sigma 0.25` | sigma of its logarithm; 0 = always the median | `0.25` |
//! | `--latency-tail 2%:300ms` | that share of requests takes that much longer | `none` |
//! | `--accuracy 95%` | probability a prediction is scored correct | `95%` |
//! | `--schedule SPEC` | timed changes, see below; repeatable | none |
//! | `--sleep-scale 1` | factor on the real sleep; the histogram records the unscaled draw | `1` |
//!
//! A schedule is `OFFSET:KNOB=VALUE[,KNOB=VALUE...]` entries separated by `;`, offsets from the
//! server's start, knob names as the flags: `--schedule "2m:error-rate=5%;4m:latency=120ms"`.
//!
//! # The load generator
//!
//! `canaryd sim --load --target http://127.0.0.1:8080 [--rps 20] [--duration 60s]
//! [--requests N] [--concurrency 64] [--feedback-share 50%] [--feedback-delay 5s]
//! [--feedback v1=http://127.0.0.1:9861 ...]`
//!
//! Posts `/predict` to the target (the router's frontend) at a steady rate with at most
//! `--concurrency` in flight. For a share of the successful predictions it posts `/feedback`
//! `--feedback-delay` later **directly to the server of the version that answered**, found by
//! the `version` in the answer and the `--feedback VERSION=URL` map. Sending feedback through a
//! weighted router would land on the wrong version most of the time (which answers 404), and
//! routing it by a header would tie the generator to one router's configuration; the map works
//! with any router. A version missing from the map gets its feedback through the target, which
//! is right only when the target is a single server. Progress goes to stderr once a second, a
//! summary to stdout at the end.
//!
//! # Embedding
//!
//! [`serve`] takes a bound listener and a shutdown future; [`update_knobs`] changes a running
//! simulator's knobs over HTTP; [`load`] and [`load_with_progress`] run the generator until
//! done or shut down and return [`LoadStats`].

mod knobs;
mod load;
mod server;

pub use knobs::{
    Knobs, KnobsUpdate, KnobsView, ParseError, Rate, Schedule, ScheduleEntry, Setting,
    parse_latency, parse_rate, parse_setting, parse_sigma, parse_tail,
};
pub use load::{LoadConfig, LoadStats, VersionStats, load, load_with_progress};
pub use server::{SimConfig, router, serve, update_knobs};

use anyhow::Context as _;
use std::time::Duration;

/// Options of `canaryd sim`.
#[derive(Clone, Debug, clap::Args)]
#[command(
    after_help = "Schedule: OFFSET:KNOB=VALUE[,KNOB=VALUE...] entries separated by ';', for example \
    --schedule \"2m:error-rate=5%;4m:latency=120ms,latency-tail=5%:1s\". Knobs change at runtime with \
    PUT /admin/config {\"error_rate\": \"5%\", \"latency_ms\": 120}. In --load mode, feedback goes straight to \
    the server of the version that answered (--feedback VERSION=URL), not through the router."
)]
pub struct SimArgs {
    /// The `version` label this server reports.
    #[arg(long, required_unless_present = "load", conflicts_with = "load")]
    pub version: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9860", conflicts_with = "load")]
    pub listen: String,
    /// The `model` label this server reports.
    #[arg(long, default_value = "fraud-detector", conflicts_with = "load")]
    pub model: String,
    /// Probability that a prediction fails with HTTP 500: 2% or 0.02.
    #[arg(long, default_value = "0%", value_parser = parse_rate, conflicts_with = "load")]
    pub error_rate: f64,
    /// Median latency (log-normal).
    #[arg(long, default_value = "40ms", value_parser = parse_latency, conflicts_with = "load")]
    pub latency: Duration,
    /// Spread of the latency: the standard deviation of its logarithm (0 to 3).
    #[arg(long, default_value = "0.25", value_parser = parse_sigma, conflicts_with = "load")]
    pub latency_sigma: f64,
    /// Slow tail as SHARE:EXTRA: 2%:300ms makes 2 % of requests 300 ms slower.
    #[arg(long, default_value = "none", value_parser = parse_tail, conflicts_with = "load")]
    pub latency_tail: (f64, Duration),
    /// Probability that a prediction is scored correct when its feedback arrives.
    #[arg(long, default_value = "95%", value_parser = parse_rate, conflicts_with = "load")]
    pub accuracy: f64,
    /// Timed knob changes, like "2m:error-rate=5%;4m:latency=120ms"; repeatable.
    #[arg(long, value_parser = clap::value_parser!(Schedule), conflicts_with = "load")]
    pub schedule: Vec<Schedule>,
    /// Factor on the time requests really sleep (0 = answer at once); metrics show the unscaled latency.
    #[arg(long, default_value_t = 1.0, conflicts_with = "load")]
    pub sleep_scale: f64,
    /// Unscored predictions remembered for feedback.
    #[arg(long, default_value_t = 100_000, conflicts_with = "load")]
    pub memory: usize,
    /// Seed of the random draws (a random one by default).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Generate load instead of serving.
    // The load-only flags below conflict with --version rather than `requires = "load"`:
    // a boolean flag always has a value (false), so clap considers any requirement on it met.
    // Serving always needs --version, so the conflict rejects them outside --load.
    #[arg(long, help_heading = "Load generator")]
    pub load: bool,
    /// Base URL that predictions are posted to, normally the router.
    #[arg(
        long,
        required_if_eq("load", "true"),
        conflicts_with = "version",
        help_heading = "Load generator"
    )]
    pub target: Option<String>,
    /// Predictions per second.
    #[arg(
        long,
        default_value_t = 20.0,
        conflicts_with = "version",
        help_heading = "Load generator"
    )]
    pub rps: f64,
    /// Stop after this long (default: until Ctrl-C or --requests).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "version", help_heading = "Load generator")]
    pub duration: Option<Duration>,
    /// Stop after this many predictions.
    #[arg(long, conflicts_with = "version", help_heading = "Load generator")]
    pub requests: Option<u64>,
    /// Most predictions in flight; ticks beyond it are skipped and counted.
    #[arg(
        long,
        default_value_t = 64,
        conflicts_with = "version",
        help_heading = "Load generator"
    )]
    pub concurrency: usize,
    /// Share of successful predictions that get feedback.
    #[arg(long, default_value = "50%", value_parser = parse_rate, conflicts_with = "version", help_heading = "Load generator")]
    pub feedback_share: f64,
    /// Delay between a prediction and its feedback.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, conflicts_with = "version", help_heading = "Load generator")]
    pub feedback_delay: Duration,
    /// Where a version's feedback goes, VERSION=URL; repeatable.
    #[arg(long = "feedback", value_parser = parse_feedback_url, conflicts_with = "version", help_heading = "Load generator")]
    pub feedback_urls: Vec<(String, String)>,
    /// Timeout of each request.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, conflicts_with = "version", help_heading = "Load generator")]
    pub timeout: Duration,
}

fn parse_feedback_url(s: &str) -> Result<(String, String), ParseError> {
    match s.split_once('=') {
        Some((v, url))
            if !v.trim().is_empty()
                && (url.starts_with("http://") || url.starts_with("https://")) =>
        {
            Ok((v.trim().to_string(), url.to_string()))
        }
        _ => Err(ParseError(format!(
            "expected VERSION=URL like v1=http://127.0.0.1:9861, found {s:?}"
        ))),
    }
}

impl SimArgs {
    /// The server configuration these flags describe.
    pub fn sim_config(&self) -> anyhow::Result<SimConfig> {
        let version = self
            .version
            .clone()
            .context("--version is required to serve")?;
        let mut schedule: Vec<ScheduleEntry> = self
            .schedule
            .iter()
            .flat_map(|s| s.0.iter().cloned())
            .collect();
        schedule.sort_by_key(|e| e.at);
        let (tail_share, tail_extra) = self.latency_tail;
        Ok(SimConfig {
            model: self.model.clone(),
            version,
            knobs: Knobs {
                error_rate: self.error_rate,
                latency: self.latency,
                latency_sigma: self.latency_sigma,
                tail_share,
                tail_extra,
                accuracy: self.accuracy,
            },
            schedule,
            sleep_scale: self.sleep_scale,
            memory: self.memory,
            seed: self.seed,
        })
    }

    /// The load generator configuration these flags describe.
    pub fn load_config(&self) -> anyhow::Result<LoadConfig> {
        let target = self
            .target
            .clone()
            .context("--target is required with --load")?;
        Ok(LoadConfig {
            target,
            rps: self.rps,
            duration: self.duration,
            requests: self.requests,
            concurrency: self.concurrency,
            feedback_share: self.feedback_share,
            feedback_delay: self.feedback_delay,
            feedback_urls: self.feedback_urls.iter().cloned().collect(),
            timeout: self.timeout,
            seed: self.seed,
        })
    }
}

/// Runs the simulated model server, or the load generator with `--load`, until done or
/// interrupted (SIGINT or SIGTERM).
pub fn run(args: &SimArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The binary may already have installed a subscriber; then that one is used.
    // Colours only on a terminal, as for `canaryd run`.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if args.load {
        rt.block_on(run_load(args))
    } else {
        rt.block_on(run_server(args))
    }
}

async fn run_server(args: &SimArgs) -> anyhow::Result<()> {
    let config = args.sim_config()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    eprintln!(
        "canaryd sim: model {} version {} on http://{addr} (error rate {}, latency {}, accuracy {})",
        config.model,
        config.version,
        percent(config.knobs.error_rate),
        humantime::format_duration(config.knobs.latency),
        percent(config.knobs.accuracy),
    );
    serve(listener, config, crate::daemon::signals()).await
}

async fn run_load(args: &SimArgs) -> anyhow::Result<()> {
    let config = args.load_config()?;
    let (tx, mut rx) = tokio::sync::watch::channel(LoadStats::default());
    let start = tokio::time::Instant::now();
    let printer = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.tick().await;
        loop {
            every.tick().await;
            let stats = rx.borrow_and_update().clone();
            eprintln!("{:>4}s {}", start.elapsed().as_secs(), summary(&stats));
        }
    });
    eprintln!(
        "canaryd sim --load: {} predictions/s to {}",
        config.rps, config.target
    );
    let result = load_with_progress(config, crate::daemon::signals(), tx).await;
    printer.abort();
    let stats = result?;
    println!(
        "after {:.1}s: {}",
        start.elapsed().as_secs_f64(),
        summary(&stats)
    );
    Ok(())
}

/// One line: totals, then each version's successes, errors and scored feedback.
fn summary(s: &LoadStats) -> String {
    let mut line = format!(
        "sent {} answered {} failed {} skipped {}",
        s.sent,
        s.answered(),
        s.failed,
        s.skipped
    );
    for (version, v) in &s.versions {
        line.push_str(&format!(
            " | {version}: ok {} err {} scored {}",
            v.success, v.error, v.scored
        ));
    }
    if s.feedback_failed > 0 {
        line.push_str(&format!(" | feedback failed {}", s.feedback_failed));
    }
    line
}

fn percent(v: f64) -> String {
    format!("{}%", (v * 10_000.0).round() / 100.0)
}
