//! Issue 3 end to end with real servers on 127.0.0.1: a real Prometheus scraping simulated
//! model servers (the metric convention), a real HAProxy or nginx (or the webhook and file
//! routers), load sent through the router, and the daemon deciding from what Prometheus says.

use crate::daemon::Daemon;
use crate::support::{ChildGuard, free_port, wait_for};
use canaryd::demo::procs::{self, Backend};
use canaryd::router::{FileRouter, HaproxyRouter, NginxRouter, Router, Target};
use canaryd::sim::{self, KnobsUpdate, LoadConfig, SimConfig};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const MODEL: &str = "m";

/// Simulated model versions and a Prometheus scraping them every second.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub prom_port: u16,
    prometheus: Option<procs::Server>,
    /// Version → base URL of its sim.
    pub sims: BTreeMap<String, String>,
    /// Version → host:port of its sim.
    pub addrs: BTreeMap<String, String>,
    stop: watch::Sender<bool>,
}

impl Stack {
    pub async fn start(versions: &[&str]) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("policies")).expect("mkdir");
        let (stop, rx) = watch::channel(false);
        let mut sims = BTreeMap::new();
        let mut addrs = BTreeMap::new();
        for v in versions {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = l.local_addr().expect("addr").to_string();
            let mut cfg = SimConfig::new(MODEL, *v);
            // Latency is drawn and recorded, but requests are not slowed down.
            cfg.sleep_scale = 0.0;
            cfg.seed = Some(7);
            let mut r = rx.clone();
            tokio::spawn(sim::serve(l, cfg, async move {
                let _ = r.wait_for(|s| *s).await;
            }));
            sims.insert(v.to_string(), format!("http://{addr}"));
            addrs.insert(v.to_string(), addr);
        }
        let targets: Vec<String> = addrs.values().map(|a| format!("\"{a}\"")).collect();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: model\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .expect("write prometheus.yml");
        let mut stack = Stack {
            dir,
            prom_port: free_port(),
            prometheus: None,
            sims,
            addrs,
            stop,
        };
        stack.start_prometheus().await;
        stack
    }

    pub async fn start_prometheus(&mut self) {
        let config = self.dir.path().join("prometheus.yml");
        let p = procs::prometheus(&config, self.dir.path(), self.prom_port)
            .await
            .expect("prometheus starts");
        self.prometheus = Some(p);
    }

    pub async fn stop_prometheus(&mut self) {
        if let Some(p) = self.prometheus.take() {
            p.stop().await;
        }
    }

    pub fn prometheus_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.prom_port)
    }

    /// The daemon's Prometheus source for this stack: short ranges for 1 s scrapes, one quick
    /// attempt per query so an outage shows at once.
    pub fn sources(&self) -> canaryd::controller::SourceFactory {
        let options = canaryd::source::ClientOptions {
            timeout: Duration::from_secs(2),
            retries: 0,
            ..Default::default()
        };
        canaryd::source::factory(
            &self.prometheus_url(),
            options,
            Duration::from_secs(4),
            None,
        )
        .expect("source")
    }

    /// Sends `rps` predictions per second to `target` until the stack is dropped.
    pub fn load(&self, target: &str, rps: f64) {
        let mut cfg = LoadConfig::new(target);
        cfg.rps = rps;
        cfg.feedback_share = 0.0;
        cfg.timeout = Duration::from_secs(2);
        cfg.seed = Some(11);
        let mut r = self.stop.subscribe();
        tokio::spawn(sim::load(cfg, async move {
            let _ = r.wait_for(|s| *s).await;
        }));
    }

    pub async fn set_error_rate(&self, version: &str, rate: f64) {
        let update = KnobsUpdate {
            error_rate: Some(rate.into()),
            ..Default::default()
        };
        sim::update_knobs(&reqwest::Client::new(), &self.sims[version], &update)
            .await
            .expect("update knobs");
    }

    pub fn write_policy(&self, file: &str, text: &str) {
        std::fs::write(self.dir.path().join("policies").join(file), text).expect("write policy");
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A policy judged on the error rate with fixed thresholds, stepping 20 → 50 → 100.
fn policy(
    name: &str,
    stable: &str,
    canary: &str,
    router: &str,
    steps: &str,
    min_step: &str,
    extra: &str,
) -> String {
    format!(
        "name: {name}\nmodel: {MODEL}\nstable: {stable}\ncanary: {canary}\nstrategy:\n  steps: {steps}\n  interval: 1s\n  min_step_duration: {min_step}\n  failure_limit: 2\n  progress_deadline: 3h\n{extra}analysis: {{method: threshold}}\nmetrics:\n  - {{name: errors, builtin: error_rate, max: 5%, min_samples: 20}}\nrouter:\n{router}\n"
    )
}

fn target(rollout: &str, stable: &str, canary: &str) -> Target {
    Target {
        rollout: rollout.into(),
        stable: stable.into(),
        canary: canary.into(),
        canary_weight: 0.0,
    }
}

/// Versions that answered `n` predictions sent to `url`.
async fn answers(url: &str, n: usize) -> BTreeMap<String, usize> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let mut out = BTreeMap::new();
    for _ in 0..n {
        if let Ok(r) = client.post(format!("{url}/predict")).send().await
            && let Ok(v) = r.json::<Value>().await
            && let Some(version) = v["version"].as_str()
        {
            *out.entry(version.to_owned()).or_default() += 1;
        }
    }
    out
}

/// Polls the rollout and the router's own weights until `phase`; returns the distinct
/// weights the router reported, in order.
async fn follow(
    d: &Daemon,
    name: &str,
    phase: &str,
    router: &dyn Router,
    t: &Target,
    limit: Duration,
) -> Vec<f64> {
    let deadline = tokio::time::Instant::now() + limit;
    // Splits the router held: a reading counts once it is read twice in a row, because a
    // router that raises one server before lowering the other passes through a split for the
    // moment between its two commands (HAProxy: 50 % → 66.7 % → 100 %).
    let mut seen: Vec<f64> = Vec::new();
    let mut last: Option<f64> = None;
    loop {
        let now = router.read(t).await.ok().map(|w| (w * 10.0).round() / 10.0);
        if let Some(w) = now.filter(|w| last == Some(*w) && seen.last() != Some(w)) {
            seen.push(w);
        }
        last = now;
        let (_, v) = d.get(&format!("/api/v1/rollouts/{name}")).await;
        if v["phase"] == phase && v["canary"] == t.canary.as_str() {
            // The rollout reached its phase after the router confirmed the split: held.
            if let Ok(w) = router.read(t).await {
                let w = (w * 10.0).round() / 10.0;
                if seen.last() != Some(&w) {
                    seen.push(w);
                }
            }
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} not {phase} within {limit:?}: {v}\nrouter weights seen: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The non-hold actions of a rollout's decision log, oldest first.
async fn actions(d: &Daemon, name: &str) -> Vec<(String, f64)> {
    let (_, log) = d
        .get(&format!("/api/v1/rollouts/{name}/decisions?limit=500"))
        .await;
    log["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .rev()
        .filter(|d| d["action"] != "hold")
        .map(|d| {
            (
                d["action"].as_str().unwrap_or("?").to_owned(),
                d["weight"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn haproxy_follows_every_step_to_promotion_then_rolls_back_a_bad_canary() {
    let stack = Stack::start(&["v1", "v2", "v3"]).await;
    let port = free_port();
    let backends: Vec<Backend> = ["v1", "v2", "v3"]
        .iter()
        .map(|v| Backend {
            name: v,
            addr: &stack.addrs[*v],
            weight: if *v == "v1" { 100 } else { 0 },
        })
        .collect();
    let (_haproxy, socket) = procs::haproxy(stack.dir.path(), port, MODEL, &backends)
        .await
        .expect("haproxy");
    let frontend = format!("http://127.0.0.1:{port}");
    stack.load(&frontend, 80.0);
    let servers = "{v1: v1, v2: v2, v3: v3}";
    let router = format!(
        "  haproxy: {{socket: {}, backend: {MODEL}, servers: {servers}}}",
        socket.display()
    );
    stack.write_policy(
        "e2e.yaml",
        &policy("e2e", "v1", "v2", &router, "[20, 50]", "4s", ""),
    );
    let d = Daemon::start_real(stack.dir.path(), stack.sources()).await;

    let names: BTreeMap<String, String> = ["v1", "v2", "v3"]
        .iter()
        .map(|v| (v.to_string(), v.to_string()))
        .collect();
    let socket_path = socket.display().to_string();
    let reader = HaproxyRouter::new(&socket_path, MODEL, names).expect("reader");
    let seen = follow(
        &d,
        "e2e",
        "promoted",
        &reader,
        &target("e2e", "v1", "v2"),
        Duration::from_secs(90),
    )
    .await;
    let steps: Vec<f64> = seen.into_iter().filter(|w| *w > 0.0).collect();
    assert_eq!(
        steps,
        vec![20.0, 50.0, 100.0],
        "HAProxy's weights, read over its runtime socket"
    );
    let got = answers(&frontend, 40).await;
    assert_eq!(
        got.get("v2"),
        Some(&40),
        "after promotion HAProxy sends everything to v2: {got:?}"
    );

    // A bad canary: its errors rise once it has its first step's traffic.
    stack.write_policy(
        "e2e.yaml",
        &policy("e2e", "v2", "v3", &router, "[20, 50]", "4s", ""),
    );
    let t = target("e2e", "v2", "v3");
    wait_for("v3 at its first step", Duration::from_secs(30), || async {
        let w = reader.read(&t).await.ok()?;
        ((w - 20.0).abs() < 0.5).then_some(())
    })
    .await;
    stack.set_error_rate("v3", 0.3).await;
    let v = d
        .wait_phase_for("e2e", "rolled-back", Duration::from_secs(60))
        .await;
    assert_eq!(v["canary"], "v3");
    assert_eq!(reader.read(&t).await.expect("read"), 0.0);
    let got = answers(&frontend, 60).await;
    assert_eq!(
        got.get("v3"),
        None,
        "HAProxy sends the rolled-back canary nothing: {got:?}"
    );
    let acts = actions(&d, "e2e").await;
    let rollback = acts
        .iter()
        .rposition(|(a, _)| a == "rollback")
        .expect("a rollback decision");
    assert!(
        acts[..rollback]
            .iter()
            .any(|(a, w)| a == "start" && *w == 20.0),
        "{acts:?}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_promotes_a_good_canary_through_its_weights_file_and_reload() {
    let stack = Stack::start(&["v1", "v2"]).await;
    let nginx = crate::router_nginx::Nginx::start(&stack.addrs, 0.0).await;
    let frontend = format!("http://127.0.0.1:{}", nginx.port);
    stack.load(&frontend, 60.0);
    let reload = serde_json::to_string(&nginx.reload).expect("json");
    let router = format!(
        "  nginx:\n    weights_file: {}\n    reload: {reload}\n    upstream: fraud\n    servers: {{v1: \"{}\", v2: \"{}\"}}",
        nginx.weights.display(),
        stack.addrs["v1"],
        stack.addrs["v2"]
    );
    stack.write_policy(
        "web.yaml",
        &policy("web", "v1", "v2", &router, "[20, 50]", "4s", ""),
    );
    let d = Daemon::start_real(stack.dir.path(), stack.sources()).await;
    let servers: BTreeMap<String, String> = stack.addrs.clone();
    let reader = NginxRouter::new(nginx.weights.clone(), vec!["true".into()], "fraud", servers)
        .expect("reader");
    let seen = follow(
        &d,
        "web",
        "promoted",
        &reader,
        &target("web", "v1", "v2"),
        Duration::from_secs(90),
    )
    .await;
    let steps: Vec<f64> = seen.into_iter().filter(|w| *w > 0.0).collect();
    assert_eq!(
        steps,
        vec![20.0, 50.0, 100.0],
        "the weights file followed each step"
    );
    wait_for(
        "nginx to send everything to v2",
        Duration::from_secs(15),
        || async {
            let got = answers(&frontend, 20).await;
            (got.get("v2") == Some(&20)).then_some(())
        },
    )
    .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_and_file_routers_promote_a_good_canary() {
    let stack = Stack::start(&["v1", "v2"]).await;
    stack.load(&stack.sims["v1"], 40.0);
    stack.load(&stack.sims["v2"], 40.0);
    let posts = crate::router_webhook::Posts::default();
    let hook = crate::router_webhook::serve(posts.clone()).await;
    let file = stack.dir.path().join("weights.json");
    stack.write_policy(
        "hook.yaml",
        &policy(
            "hook",
            "v1",
            "v2",
            &format!("  webhook: {{url: \"{hook}/weights\"}}"),
            "[20, 50]",
            "3s",
            "",
        ),
    );
    stack.write_policy(
        "file.yaml",
        &policy(
            "file",
            "v1",
            "v2",
            &format!("  file: {{path: {}}}", file.display()),
            "[20, 50]",
            "3s",
            "",
        ),
    );
    let d = Daemon::start_real(stack.dir.path(), stack.sources()).await;
    d.wait_phase_for("hook", "promoted", Duration::from_secs(90))
        .await;
    d.wait_phase_for("file", "promoted", Duration::from_secs(90))
        .await;
    let mut posted: Vec<f64> = Vec::new();
    for p in posts.lock().expect("lock").iter() {
        let w = p["weights"]["v2"].as_f64().expect("canary weight posted");
        if posted.last() != Some(&w) {
            posted.push(w);
        }
        assert_eq!(p["rollout"], "hook");
    }
    assert_eq!(
        posted,
        vec![20.0, 50.0, 100.0],
        "the webhook was told each step"
    );
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("weights file")).expect("json");
    assert_eq!(doc["weights"]["v2"], 100.0, "{doc}");
    assert_eq!(doc["weights"]["v1"], 0.0, "{doc}");
    let reader = FileRouter::new(file, Arc::new(canaryd::time::SystemClock));
    assert_eq!(
        reader
            .read(&target("file", "v1", "v2"))
            .await
            .expect("read"),
        100.0
    );
    for name in ["hook", "file"] {
        let acts: Vec<String> = actions(&d, name)
            .await
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        assert_eq!(acts, ["start", "advance", "promote", "settle"], "{name}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn blue_green_with_the_sequential_judge_switches_a_bad_version_back_and_promotes_a_good_one()
{
    // Regression: the sequential judge counted stable's events only from the switch, after
    // which stable has no traffic, so it held for want of stable's data ("gathering data:
    // canary 19138 and stable 40 events of 50 needed"): a good version was never promoted,
    // and a bad one kept all traffic until the progress deadline.
    let stack = Stack::start(&["v1", "v2"]).await;
    stack.set_error_rate("v1", 0.05).await;
    stack.set_error_rate("v2", 0.3).await;
    let nginx = crate::router_nginx::Nginx::start(&stack.addrs, 0.0).await;
    let frontend = format!("http://127.0.0.1:{}", nginx.port);
    stack.load(&frontend, 80.0);
    let reload = serde_json::to_string(&nginx.reload).expect("json");
    stack.write_policy(
        "bg.yaml",
        &format!(
            "name: bg\nmodel: {MODEL}\nstable: v1\ncanary: v2\nstrategy:\n  kind: blue-green\n  bake: 20s\n  interval: 1s\n  progress_deadline: 3h\nmetrics:\n  - {{name: errors, builtin: error_rate, max_increase: 50%, min_samples: 1000}}\nrouter:\n  nginx:\n    weights_file: {}\n    reload: {reload}\n    upstream: fraud\n    servers: {{v1: \"{}\", v2: \"{}\"}}\n",
            nginx.weights.display(),
            stack.addrs["v1"],
            stack.addrs["v2"]
        ),
    );
    let d = Daemon::start_real(stack.dir.path(), stack.sources()).await;
    let v = d
        .wait_phase_for("bg", "rolled-back", Duration::from_secs(90))
        .await;
    let (_, log) = d.get("/api/v1/rollouts/bg/decisions?limit=500").await;
    let rollback = log["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .find(|d| d["action"] == "rollback")
        .expect("a rollback");
    assert!(
        rollback["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("sequential test rejected the canary: errors"),
        "{rollback}\n{v}"
    );
    // Fixed, and tried again: after the bake, the new version is promoted on the evidence.
    stack.set_error_rate("v2", 0.05).await;
    let (status, body) = d
        .post("/api/v1/rollouts/bg/retry", None, r#"{"reason": "fixed"}"#)
        .await;
    assert_eq!(status, 200, "{body}");
    d.wait_phase_for("bg", "promoted", Duration::from_secs(120))
        .await;
    let acts: Vec<(String, f64)> = actions(&d, "bg").await;
    assert_eq!(
        acts.iter()
            .map(|(a, w)| (a.as_str(), *w))
            .collect::<Vec<_>>(),
        [
            ("start", 100.0),
            ("rollback", 0.0),
            ("settle", 0.0),
            ("retry", 0.0),
            ("start", 100.0),
            ("promote", 100.0),
            ("settle", 100.0)
        ],
    );
    d.stop().await;
}

fn run_daemon(dir: &Path, prometheus: &str, api_port: u16) -> ChildGuard {
    ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_canaryd"))
            .arg("run")
            .arg("--policies")
            .arg(dir.join("policies"))
            .arg("--state")
            .arg(dir.join("state.db"))
            .args([
                "--prometheus",
                prometheus,
                "--listen",
                &format!("127.0.0.1:{api_port}"),
                "--query-min-range",
                "4s",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )
}

async fn api(port: u16, path: &str) -> Option<Value> {
    let r = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    r.json().await.ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_rollout_resumes_at_the_same_step_with_the_log_intact() {
    let stack = Stack::start(&["v1", "v2"]).await;
    stack.load(&stack.sims["v1"], 40.0);
    stack.load(&stack.sims["v2"], 40.0);
    let file: PathBuf = stack.dir.path().join("weights.json");
    stack.write_policy(
        "k.yaml",
        &policy(
            "k",
            "v1",
            "v2",
            &format!("  file: {{path: {}}}", file.display()),
            "[10, 30, 60]",
            "6s",
            "",
        ),
    );
    let port = free_port();
    let mut daemon = run_daemon(stack.dir.path(), &stack.prometheus_url(), port);
    wait_for("step 2", Duration::from_secs(60), || async {
        let v = api(port, "/api/v1/rollouts/k").await?;
        (v["step"] == 2 && v["applied"] == true).then_some(())
    })
    .await;
    let before = api(port, "/api/v1/rollouts/k/decisions?limit=500")
        .await
        .expect("log");
    daemon.0.kill().expect("kill -9");
    let _ = daemon.0.wait();
    let router = FileRouter::new(file.clone(), Arc::new(canaryd::time::SystemClock));
    assert_eq!(
        router.read(&target("k", "v1", "v2")).await.expect("read"),
        30.0
    );

    let _daemon = run_daemon(stack.dir.path(), &stack.prometheus_url(), port);
    let v = wait_for("the restarted daemon", Duration::from_secs(20), || async {
        let v = api(port, "/api/v1/rollouts/k").await?;
        (v["name"] == "k").then_some(v)
    })
    .await;
    assert_eq!(v["step"], 2, "resumed at the step it was at: {v}");
    assert_eq!(v["weight"], 30.0);
    assert_eq!(v["state"]["attempt"], 1);
    let after = api(port, "/api/v1/rollouts/k/decisions?limit=500")
        .await
        .expect("log");
    let ids = |log: &Value| -> Vec<i64> {
        log["decisions"]
            .as_array()
            .expect("decisions")
            .iter()
            .filter_map(|d| d["id"].as_i64())
            .collect()
    };
    let kept: Vec<i64> = ids(&after)
        .into_iter()
        .filter(|id| ids(&before).contains(id))
        .collect();
    assert_eq!(
        kept,
        ids(&before),
        "every decision logged before the crash is still there"
    );

    wait_for(
        "promotion after the restart",
        Duration::from_secs(90),
        || async {
            let v = api(port, "/api/v1/rollouts/k").await?;
            (v["phase"] == "promoted").then_some(())
        },
    )
    .await;
    let log = api(port, "/api/v1/rollouts/k/decisions?limit=500")
        .await
        .expect("log");
    let steps: Vec<(String, f64)> = log["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .rev()
        .filter(|d| d["action"] != "hold")
        .map(|d| {
            (
                d["action"].as_str().unwrap_or("?").to_owned(),
                d["weight"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect();
    let expected: Vec<(String, f64)> = [
        ("start", 10.0),
        ("advance", 30.0),
        ("advance", 60.0),
        ("promote", 100.0),
        ("settle", 100.0),
    ]
    .iter()
    .map(|(a, w)| (a.to_string(), *w))
    .collect();
    assert_eq!(
        steps, expected,
        "no step skipped or repeated across the crash"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_outage_holds_the_step_without_failures_then_the_rollout_continues() {
    let mut stack = Stack::start(&["v1", "v2"]).await;
    stack.load(&stack.sims["v1"], 40.0);
    stack.load(&stack.sims["v2"], 40.0);
    let file = stack.dir.path().join("weights.json");
    stack.write_policy(
        "p.yaml",
        &policy(
            "p",
            "v1",
            "v2",
            &format!("  file: {{path: {}}}", file.display()),
            "[20, 50]",
            "10s",
            "",
        ),
    );
    let d = Daemon::start_real(stack.dir.path(), stack.sources()).await;
    wait_for(
        "a passing analysis at step 1",
        Duration::from_secs(30),
        || async {
            let (_, v) = d.get("/api/v1/rollouts/p").await;
            (v["step"] == 1 && v["recent_analyses"][0]["reports"][0]["verdict"] == "pass")
                .then_some(())
        },
    )
    .await;
    stack.stop_prometheus().await;
    let (_, v) = d.get("/api/v1/rollouts/p").await;
    let analyses = v["state"]["analyses"].as_u64().expect("analyses");
    let v = wait_for(
        "analyses while Prometheus is down",
        Duration::from_secs(30),
        || async {
            let (_, v) = d.get("/api/v1/rollouts/p").await;
            (v["state"]["analyses"].as_u64()? >= analyses + 6).then_some(v)
        },
    )
    .await;
    assert_eq!(v["step"], 1, "never advances while Prometheus is down: {v}");
    assert_eq!(v["phase"], "progressing");
    assert_eq!(
        v["state"]["consecutive_failures"], 0,
        "an outage is not a failure"
    );
    assert_eq!(
        v["recent_analyses"][0]["reports"][0]["verdict"], "unavailable",
        "{v}"
    );
    stack.start_prometheus().await;
    d.wait_phase_for("p", "promoted", Duration::from_secs(60))
        .await;
    d.stop().await;
}

/// A real HAProxy in front of the stack's v1 (all traffic) and v2 (none), with load at `rps`
/// through it: the server, its runtime socket, and the policy's `router:` lines for it.
async fn haproxy_v1_v2(stack: &Stack, rps: f64) -> (procs::Server, PathBuf, String) {
    let port = free_port();
    let backends = [("v1", 100), ("v2", 0)].map(|(name, weight)| Backend {
        name,
        addr: &stack.addrs[name],
        weight,
    });
    let (haproxy, socket) = procs::haproxy(stack.dir.path(), port, MODEL, &backends)
        .await
        .expect("haproxy");
    stack.load(&format!("http://127.0.0.1:{port}"), rps);
    let router = format!(
        "  haproxy: {{socket: {}, backend: {MODEL}, servers: {{v1: v1, v2: v2}}}}",
        socket.display()
    );
    (haproxy, socket, router)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_router_that_keeps_failing_ends_in_failed_with_traffic_left_in_place() {
    let stack = Stack::start(&["v1", "v2"]).await;
    let (haproxy, _socket, router) = haproxy_v1_v2(&stack, 60.0).await;
    stack.write_policy(
        "f.yaml",
        &policy(
            "f",
            "v1",
            "v2",
            &router,
            "[20, 50]",
            "1h",
            "  router_deadline: 3s\n",
        ),
    );
    let d = Daemon::start_real(stack.dir.path(), stack.sources()).await;
    wait_for(
        "the first step applied",
        Duration::from_secs(30),
        || async {
            let (_, v) = d.get("/api/v1/rollouts/f").await;
            (v["applied"] == true && v["weight"] == 20.0).then_some(())
        },
    )
    .await;
    haproxy.stop().await;
    let v = d
        .wait_phase_for("f", "failed", Duration::from_secs(30))
        .await;
    assert_eq!(
        v["weight"], 20.0,
        "traffic is left where it was last known to be safe: {v}"
    );
    assert!(
        v["router_error"]
            .as_str()
            .is_some_and(|e| e.contains("unreachable")),
        "{v}"
    );
    let metrics = reqwest::get(format!("{}/metrics", d.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let errors: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("canaryd_router_errors_total{")
                && l.contains("rollout=\"f\"")
                && l.contains("kind=\"unreachable\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("router error counter");
    assert!(
        errors >= 3.0,
        "failed calls were retried: {errors} errors counted"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_live_runs_every_query_once_and_names_what_fails() {
    let stack = Stack::start(&["v1", "v2"]).await;
    stack.load(&stack.sims["v1"], 40.0);
    let good = stack.dir.path().join("good.yaml");
    let file = stack.dir.path().join("w.json");
    let router = format!("  file: {{path: {}}}", file.display());
    std::fs::write(
        &good,
        policy("live", "v1", "v2", &router, "[20, 50]", "3s", ""),
    )
    .expect("write");
    let broken = stack.dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        policy("live", "v1", "v2", &router, "[20, 50]", "3s", "").replace(
            "  - {name: errors, builtin: error_rate, max: 5%, min_samples: 20}",
            "  - {name: errors, builtin: error_rate, max: 5%, min_samples: 20}\n  - {name: broken, query: 'sum(rate(model_requests_total{version=\"{{version}}\"}[{{window}}]) ((', max: 1}",
        ),
    )
    .expect("write");
    // Wait until Prometheus has two scrapes of stable's traffic, so `increase()` sees it.
    let url = stack.prometheus_url();
    wait_for("v1 scraped", Duration::from_secs(20), || async {
        let r = reqwest::get(format!(
            "{url}/api/v1/query?query=sum(increase(model_requests_total%7Bversion%3D%22v1%22%7D%5B1m%5D))%3E0"
        ))
        .await
        .ok()?;
        let v: Value = r.json().await.ok()?;
        (!v["data"]["result"].as_array()?.is_empty()).then_some(())
    })
    .await;
    let run = |p: &Path| {
        Command::new(env!("CARGO_BIN_EXE_canaryd"))
            .args(["check", "--live", "--prometheus", &stack.prometheus_url()])
            .arg(p)
            .output()
            .expect("run check")
    };
    let ok = run(&good);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{text}");
    assert!(text.contains("stable v1: data"), "{text}");
    assert!(!text.contains("note:"), "{text}");
    let bad = run(&broken);
    let text = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{text}");
    assert!(
        text.contains("broken") && text.contains("bad-query"),
        "{text}"
    );
    // Review: errors marked with a value the policy does not expect read as no errors at
    // all. Every query works, so the check passes, but it says what it found.
    let misnamed = stack.dir.path().join("misnamed.yaml");
    let extra = "series: {error_value: failure}\n";
    std::fs::write(
        &misnamed,
        policy("live", "v1", "v2", &router, "[20, 50]", "3s", extra),
    )
    .expect("write");
    let noted = run(&misnamed);
    let text = String::from_utf8_lossy(&noted.stdout);
    assert_eq!(noted.status.code(), Some(0), "{text}");
    assert!(
        text.contains(
            "note: no series has outcome=\"failure\" now (values: \"error\", \"success\")"
        ) && text.contains("series.error_value"),
        "{text}"
    );
}

/// A rollout's policy file deleted while the daemon lay dead (`kill -9`): the restarted daemon
/// still shows the rollout, stopped with its traffic on the canary, and `canaryd abort` sends
/// a real HAProxy's traffic back to stable.
#[tokio::test(flavor = "multi_thread")]
async fn after_kill_9_and_a_deleted_policy_the_restarted_daemon_still_aborts_on_haproxy() {
    let stack = Stack::start(&["v1", "v2"]).await;
    let (_haproxy, socket, router) = haproxy_v1_v2(&stack, 40.0).await;
    stack.write_policy(
        "h.yaml",
        &policy("h", "v1", "v2", &router, "[20, 50]", "1h", ""),
    );
    let names: BTreeMap<String, String> = ["v1", "v2"]
        .iter()
        .map(|v| (v.to_string(), v.to_string()))
        .collect();
    let reader = HaproxyRouter::new(&socket.display().to_string(), MODEL, names).expect("reader");
    let weight = || async { reader.read(&target("h", "v1", "v2")).await.ok() };
    let api_port = free_port();
    let mut daemon = run_daemon(stack.dir.path(), &stack.prometheus_url(), api_port);
    wait_for(
        "the first step on HAProxy",
        Duration::from_secs(60),
        || async { (weight().await == Some(20.0)).then_some(()) },
    )
    .await;
    daemon.0.kill().expect("kill -9");
    let _ = daemon.0.wait();
    std::fs::remove_file(stack.dir.path().join("policies/h.yaml")).expect("rm policy");

    let _daemon = run_daemon(stack.dir.path(), &stack.prometheus_url(), api_port);
    let v = wait_for("the stopped rollout", Duration::from_secs(20), || async {
        let v = api(api_port, "/api/v1/rollouts/h").await?;
        (v["stopped"] == true).then_some(v)
    })
    .await;
    assert_eq!(v["phase"], "progressing", "{v}");
    let server = format!("http://127.0.0.1:{api_port}");
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_canaryd"))
            .args(args)
            .args(["--server", &server])
            .output()
            .expect("canaryd runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, text) = cli(&["status", "h"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("no policy file defines this rollout")
            && text.contains("traffic left at 20% on the canary")
            && text.contains("`canaryd abort` still rolls it back"),
        "{text}"
    );
    assert_eq!(weight().await, Some(20.0), "traffic untouched");
    let (code, text) = cli(&["abort", "h", "--reason", "policy gone"]);
    assert_eq!(code, Some(0), "{text}");
    wait_for(
        "HAProxy back on stable",
        Duration::from_secs(20),
        || async { (weight().await == Some(0.0)).then_some(()) },
    )
    .await;
    let v = wait_for("rolled back", Duration::from_secs(20), || async {
        let v = api(api_port, "/api/v1/rollouts/h").await?;
        (v["phase"] == "rolled-back").then_some(v)
    })
    .await;
    assert_eq!(v["stopped"], true, "{v}");
}
