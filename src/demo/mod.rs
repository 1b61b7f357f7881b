//! `canaryd demo`: the whole thing, live, on this machine.
//!
//! Starts a real Prometheus (with the project's `prometheus.yml` and recording rules) and a real
//! HAProxy, three simulated model versions (stable v1, a good canary v2, a bad canary v3), a
//! load generator sending traffic through HAProxy with delayed feedback, and the daemon itself.
//! It shows a good canary walked through its steps and promoted, then — by editing the policy
//! file, as a user would — a bad canary rolled back, and prints a summary. Everything it
//! started stops when it ends, on Ctrl-C too (child processes are killed when dropped).

pub mod procs;

use crate::sim::{self, Knobs, LoadConfig, LoadStats, SimConfig};
use anyhow::{Context, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Fixed loopback ports, the ones the shipped `prometheus.yml` scrapes.
const PROMETHEUS_PORT: u16 = 9090;
const API_PORT: u16 = 9850;
const SIM_PORTS: [(&str, u16); 3] = [("v1", 9861), ("v2", 9862), ("v3", 9863)];
const HAPROXY_PORT: u16 = 9870;
/// The demo's whole run may not take longer than this.
const DEMO_LIMIT: Duration = Duration::from_secs(170);

const PROMETHEUS_YML: &str = include_str!("../../prometheus.yml");
const RULES_YML: &str = include_str!("../../prometheus/rules.yml");

/// Options of `canaryd demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep everything running after the summary until Ctrl-C, to explore the API and metrics.
    #[arg(long)]
    pub keep: bool,
    /// Requests per second the load generator sends through HAProxy.
    #[arg(long, default_value_t = 60.0)]
    pub rps: f64,
}

/// The demo's policy for a stable and a canary version.
pub fn policy(stable: &str, canary: &str, socket: &Path) -> String {
    format!(
        "# Written by `canaryd demo`; edit it while the demo runs and watch the daemon react.
name: demo
model: demo-model
stable: {stable}
canary: {canary}
strategy:
  kind: canary
  steps: [10, 25, 50]
  interval: 3s
  min_step_duration: 15s
  failure_limit: 2
  progress_deadline: 10m
  on_no_data: hold
analysis:
  method: {method}
  confidence: 0.95
metrics:
  - name: error-rate
    builtin: error_rate
    max: 5%
    max_increase: 2pp
    min_samples: 50
  - name: p99-latency
    builtin: latency
    quantile: 0.99
    max: 500ms
    min_samples: 50
  - name: accuracy
    builtin: accuracy
    min: 80%
    min_samples: 20
router:
  haproxy:
    socket: {socket}
    backend: demo-model
    servers: {{v1: v1, v2: v2, v3: v3}}
",
        method = crate::policy::validate::DEFAULT_METHOD.as_str(),
        socket = socket.display(),
    )
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn knobs(error_rate: f64, latency_ms: u64, accuracy: f64) -> Knobs {
    Knobs {
        error_rate,
        latency: Duration::from_millis(latency_ms),
        accuracy,
        ..Knobs::default()
    }
}

/// Runs the demo; returns an error (exit code 2) if it did not show what it should.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    procs::require(&[("prometheus", "prometheus"), ("haproxy", "haproxy")])?;
    let busy: Vec<String> = [PROMETHEUS_PORT, API_PORT, HAPROXY_PORT]
        .into_iter()
        .chain(SIM_PORTS.iter().map(|(_, p)| *p))
        .filter(|p| !port_free(*p))
        .map(|p| p.to_string())
        .collect();
    if !busy.is_empty() {
        bail!(
            "ports {} on 127.0.0.1 are in use; the demo needs them free (is a Prometheus, or another demo, running? `service prometheus stop` stops Debian's)",
            busy.join(", ")
        );
    }
    let dir = std::env::temp_dir().join(format!("canaryd-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let keep = args.keep;
    let rps = args.rps;
    let d = dir.clone();
    let result = runtime.block_on(async move {
        tokio::select! {
            r = tokio::time::timeout(DEMO_LIMIT + if keep { Duration::from_secs(86_400) } else { Duration::ZERO }, demo(&d, rps, keep)) => match r {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("the demo did not finish within {DEMO_LIMIT:?}")),
            },
            _ = tokio::signal::ctrl_c(), if !keep => {
                eprintln!("\ninterrupted: stopping everything the demo started");
                Ok(())
            }
        }
    });
    // Dropping the runtime aborts the in-process servers; child processes die with their handles.
    runtime.shutdown_timeout(Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

struct Phase {
    name: &'static str,
    /// How long the act took.
    took: Duration,
    /// Canary requests served during the act (from the load generator's counts).
    canary_requests: u64,
    outcome: String,
}

async fn demo(dir: &Path, rps: f64, keep: bool) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    // Registered now, not when first awaited, so a Ctrl-C right after the summary is not lost.
    let mut interrupt = if keep {
        Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .context("cannot watch for Ctrl-C")?,
        )
    } else {
        None
    };
    say(
        started,
        "starting three model versions: v1 (stable), v2 (good canary), v3 (bad canary: 12 % errors)",
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sims = Vec::new();
    for (version, port) in SIM_PORTS {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        let mut cfg = SimConfig::new("demo-model", version);
        cfg.knobs = match version {
            "v3" => knobs(0.12, 60, 0.93),
            _ => knobs(0.005, 40, 0.95),
        };
        let mut stop = stop_rx.clone();
        sims.push(tokio::spawn(sim::serve(listener, cfg, async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }

    say(
        started,
        "starting HAProxy on 127.0.0.1:9870 (all traffic to v1)",
    );
    let (haproxy, socket) = procs::haproxy(
        dir,
        HAPROXY_PORT,
        "demo-model",
        &[
            procs::Backend {
                name: "v1",
                addr: "127.0.0.1:9861",
                weight: 256,
            },
            procs::Backend {
                name: "v2",
                addr: "127.0.0.1:9862",
                weight: 0,
            },
            procs::Backend {
                name: "v3",
                addr: "127.0.0.1:9863",
                weight: 0,
            },
        ],
    )
    .await?;

    say(
        started,
        "starting Prometheus on 127.0.0.1:9090 with prometheus.yml and its recording rules",
    );
    let config = dir.join("prometheus.yml");
    std::fs::create_dir_all(dir.join("prometheus"))?;
    std::fs::write(&config, PROMETHEUS_YML)?;
    std::fs::write(dir.join("prometheus/rules.yml"), RULES_YML)?;
    let prometheus = procs::prometheus(&config, dir, PROMETHEUS_PORT).await?;

    say(
        started,
        &format!(
            "sending {rps} predictions/s through HAProxy, with labels arriving 3 s later for half of them"
        ),
    );
    let mut load_cfg = LoadConfig::new(format!("http://127.0.0.1:{HAPROXY_PORT}"));
    load_cfg.rps = rps;
    load_cfg.feedback_share = 0.5;
    load_cfg.feedback_delay = Duration::from_secs(3);
    load_cfg.feedback_urls = SIM_PORTS
        .iter()
        .map(|(v, p)| (v.to_string(), format!("http://127.0.0.1:{p}")))
        .collect::<BTreeMap<_, _>>();
    let (progress_tx, progress_rx) = watch::channel(LoadStats::default());
    let mut stop = stop_rx.clone();
    let load = tokio::spawn(sim::load_with_progress(
        load_cfg,
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
        progress_tx,
    ));

    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    let policy_file = policies.join("demo.yaml");
    std::fs::write(&policy_file, policy("v1", "v2", &socket))?;
    say(
        started,
        "starting canaryd on 127.0.0.1:9850 with policy demo: v1 -> v2 in steps of 10, 25, 50 %",
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", API_PORT)).await?;
    let metrics = crate::metrics::Metrics::new(prometheus::Registry::new())?;
    let daemon_cfg = crate::daemon::DaemonConfig {
        policies: policies.clone(),
        state: dir.join("canaryd.db"),
        token: None,
        dry_run: false,
        poll: Duration::from_millis(500),
        clock: Arc::new(crate::time::SystemClock),
        routers: Arc::new(crate::router::from_policy),
        sources: crate::source::factory(
            &format!("http://127.0.0.1:{PROMETHEUS_PORT}"),
            crate::source::ClientOptions::default(),
            // Four scrapes of the shipped prometheus.yml (5 s).
            Duration::from_secs(20),
            Some(Arc::new(metrics.clone())),
        )?,
        metrics: Some(metrics),
        ha: None,
    };
    let mut stop = stop_rx.clone();
    let daemon = tokio::spawn(crate::daemon::serve(listener, daemon_cfg, async move {
        let _ = stop.wait_for(|s| *s).await;
    }));

    let api = format!("http://127.0.0.1:{API_PORT}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .user_agent(crate::USER_AGENT)
        .build()?;
    let mut acts = Vec::new();

    let before = progress_rx.borrow().clone();
    let t = tokio::time::Instant::now();
    say(started, "act 1: a good canary (v2)");
    let outcome = follow(&client, &api, "v2", &["promoted"], started).await?;
    acts.push(Phase {
        name: "good canary v2",
        took: t.elapsed(),
        canary_requests: served(&progress_rx.borrow(), &before, "v2"),
        outcome: outcome.clone(),
    });
    let good_ok = outcome == "promoted";

    say(
        started,
        "act 2: editing the policy: stable v2, canary v3 (a bad canary)",
    );
    std::fs::write(&policy_file, policy("v2", "v3", &socket))?;
    let before = progress_rx.borrow().clone();
    let t = tokio::time::Instant::now();
    let outcome = follow(
        &client,
        &api,
        "v3",
        &["rolled-back", "promoted", "failed"],
        started,
    )
    .await?;
    acts.push(Phase {
        name: "bad canary v3",
        took: t.elapsed(),
        canary_requests: served(&progress_rx.borrow(), &before, "v3"),
        outcome: outcome.clone(),
    });
    let bad_ok = outcome == "rolled-back";

    // Decisions from the log, and one more scrape so the dashboards see the final state.
    let log: Value = client
        .get(format!("{api}/api/v1/rollouts/demo/decisions?limit=500"))
        .send()
        .await?
        .json()
        .await?;
    let mut by_action: BTreeMap<String, usize> = BTreeMap::new();
    for d in log["decisions"].as_array().into_iter().flatten() {
        *by_action
            .entry(d["action"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let stats = progress_rx.borrow().clone();

    println!("\n==== canaryd demo summary ====");
    for a in &acts {
        println!(
            "{:<16} {:<12} in {:>5.1}s, {} requests served by the canary",
            a.name,
            a.outcome,
            a.took.as_secs_f64(),
            a.canary_requests
        );
    }
    let actions: Vec<String> = by_action.iter().map(|(a, n)| format!("{a} {n}")).collect();
    println!("decisions:       {}", actions.join(", "));
    println!(
        "load:            {} predictions sent through HAProxy",
        stats.sent
    );
    for (v, s) in &stats.versions {
        println!(
            "  {v}: {} ok, {} errors, {} scored",
            s.success, s.error, s.scored
        );
    }
    // Everything below stops when the demo ends, unless it was asked to keep running.
    let where_ = if interrupt.is_some() {
        "where to look:  "
    } else {
        "with --keep, see"
    };
    println!("{where_} {api}/api/v1/rollouts/demo (status and evidence), {api}/metrics,");
    println!(
        "                 `canaryd status demo`, Prometheus at http://127.0.0.1:{PROMETHEUS_PORT}, dashboards in grafana/"
    );
    let verdict = if good_ok && bad_ok {
        println!("demo passed: the good canary was promoted and the bad one rolled back");
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "the demo did not go as it should: good canary {}, bad canary {}",
            acts.first().map_or("?", |a| a.outcome.as_str()),
            acts.get(1).map_or("?", |a| a.outcome.as_str())
        ))
    };
    if let Some(interrupt) = interrupt.as_mut() {
        println!("still running (--keep); Ctrl-C stops everything");
        interrupt.recv().await;
    }

    let _ = stop_tx.send(true);
    let _ = daemon.await;
    let _ = load.await;
    for s in sims {
        let _ = s.await;
    }
    prometheus.stop().await;
    haproxy.stop().await;
    verdict
}

/// Canary requests served between two load snapshots.
fn served(now: &LoadStats, before: &LoadStats, version: &str) -> u64 {
    let count = |s: &LoadStats| s.versions.get(version).map_or(0, |v| v.success + v.error);
    count(now).saturating_sub(count(before))
}

fn say(started: tokio::time::Instant, what: &str) {
    println!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
}

/// How long the demo stays silent while a rollout's state does not change, before it shows
/// the evidence behind it.
const EVIDENCE_EVERY: Duration = Duration::from_secs(10);

/// The last analysis's evidence per metric (the view's newest `recent_analyses`), briefly: the log e-values against harm and for
/// promotion, each of its threshold.
fn evidence_line(decision: &Value) -> Option<String> {
    let parts: Vec<String> = decision["reports"]
        .as_array()?
        .iter()
        .filter_map(|r| {
            let e = &r["evidence"];
            let harm = e["log_e_value"].as_f64()?;
            let threshold = e["log_threshold"].as_f64()?;
            let good = e["log_e_value_good"]
                .as_f64()
                .map(|g| format!(", good {g:.2}"))
                .unwrap_or_default();
            Some(format!(
                "{} harm {harm:.2}{good} of {threshold:.2}",
                r["metric"].as_str().unwrap_or("?")
            ))
        })
        .collect();
    (!parts.is_empty()).then(|| format!("log e-values: {}", parts.join("; ")))
}

/// Prints the rollout's progress until it reaches one of `ends` for `canary`; returns that phase.
async fn follow(
    client: &reqwest::Client,
    api: &str,
    canary: &str,
    ends: &[&str],
    started: tokio::time::Instant,
) -> anyhow::Result<String> {
    let url = format!("{api}/api/v1/rollouts/demo");
    let mut last = String::new();
    let mut said_at = tokio::time::Instant::now();
    loop {
        if let Ok(resp) = client.get(&url).send().await
            && let Ok(v) = resp.json::<Value>().await
            && v["canary"] == canary
        {
            let phase = v["phase"].as_str().unwrap_or("?").to_owned();
            let line = format!(
                "{} -> {}  {:<17} step {}/{}  weight {:>3}%  {}",
                v["stable"].as_str().unwrap_or("?"),
                canary,
                phase,
                v["step"],
                v["steps"].as_array().map_or(0, Vec::len),
                v["weight"].as_f64().unwrap_or(0.0),
                v["state"]["message"].as_str().unwrap_or("")
            );
            // Countdown messages change every second; show a line when anything else does.
            let key: String = line.chars().filter(|c| !c.is_ascii_digit()).collect();
            if key != last {
                say(started, &line);
                last = key;
                said_at = tokio::time::Instant::now();
            } else if said_at.elapsed() >= EVIDENCE_EVERY
                && let Some(evidence) = evidence_line(&v["recent_analyses"][0])
            {
                // Nothing changed for a while: show the evidence growing.
                say(started, &format!("  evidence: {evidence}"));
                said_at = tokio::time::Instant::now();
            }
            if ends.contains(&phase.as_str()) {
                return Ok(phase);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The path of the demo's temporary directory for a process, for tests that look at it.
pub fn workdir(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("canaryd-demo-{pid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acceptance test: the demo went silent for most of a minute while the evidence grew.
    #[test]
    fn the_evidence_line_shows_each_metrics_e_values() {
        let d = serde_json::json!({"reports": [
            {"metric": "error-rate", "evidence": {"log_e_value": 1.234, "log_threshold": 3.689,
                                                  "log_e_value_good": 0.5}},
            {"metric": "p99", "evidence": {"log_e_value": -0.2, "log_threshold": 3.689}},
            {"metric": "raw", "evidence": null},
        ]});
        assert_eq!(
            evidence_line(&d).as_deref(),
            Some("log e-values: error-rate harm 1.23, good 0.50 of 3.69; p99 harm -0.20 of 3.69")
        );
        assert_eq!(evidence_line(&serde_json::json!({"reports": []})), None);
        assert_eq!(evidence_line(&Value::Null), None);
    }
}
