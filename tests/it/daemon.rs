//! The daemon shell end to end with in-memory router and metric source: the real store, API,
//! controller and decision core, with faults the fakes can produce on demand.

use crate::support::wait_for;
use canaryd::daemon::Limits;
use canaryd::observation::{Counts, MetricReading, Reading, Sample};
use canaryd::policy::Policy;
use canaryd::router::{BoxFuture, Router, RouterError, Target};
use canaryd::source::{MetricSource, Window};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A router whose weight lives in memory and that can be told to fail.
#[derive(Clone, Default)]
pub struct FakeRouter {
    pub weight: Arc<Mutex<f64>>,
    pub failing: Arc<Mutex<bool>>,
    /// Reads work, applies fail.
    pub refusing: Arc<Mutex<bool>>,
    /// Reads fail, applies work.
    pub unreadable: Arc<Mutex<bool>>,
    /// Applies wait while this is true, as a router that takes its time.
    pub stalled: Arc<Mutex<bool>>,
    pub applied: Arc<Mutex<Vec<f64>>>,
}

impl Router for FakeRouter {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn apply<'a>(&'a self, t: &'a Target) -> BoxFuture<'a, Result<(), RouterError>> {
        Box::pin(async move {
            while *self.stalled.lock().unwrap() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if *self.failing.lock().unwrap() {
                return Err(RouterError::Unreachable("fake router is down".into()));
            }
            if *self.refusing.lock().unwrap() {
                return Err(RouterError::Rejected("fake router refuses writes".into()));
            }
            *self.weight.lock().unwrap() = t.canary_weight;
            self.applied.lock().unwrap().push(t.canary_weight);
            Ok(())
        })
    }
    fn read<'a>(&'a self, _t: &'a Target) -> BoxFuture<'a, Result<f64, RouterError>> {
        Box::pin(async move {
            if *self.failing.lock().unwrap() {
                return Err(RouterError::Unreachable("fake router is down".into()));
            }
            if *self.unreadable.lock().unwrap() {
                return Err(RouterError::BadResponse("fake router reads garbage".into()));
            }
            Ok(*self.weight.lock().unwrap())
        })
    }
}

/// What the fake source answers for every metric.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Good,
    Bad,
    Down,
}

#[derive(Clone)]
pub struct FakeSource {
    pub mode: Arc<Mutex<Mode>>,
}

/// Looks taken by every fake source: the canary's counts grow with them, as a model
/// serving traffic does (promotion needs events from the last step itself).
static LOOKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn sample(rate: f64) -> Reading {
    let looks = LOOKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as f64;
    let total = 10_000.0 + 100.0 * looks;
    Reading::Data(Sample {
        value: Some(rate),
        window_events: 10_000.0,
        cumulative: Some(Counts {
            bad: rate * total,
            total,
        }),
        ..Default::default()
    })
}

impl MetricSource for FakeSource {
    fn observe<'a>(
        &'a self,
        policy: &'a Policy,
        _w: Window,
    ) -> BoxFuture<'a, BTreeMap<String, MetricReading>> {
        let mode = *self.mode.lock().unwrap();
        Box::pin(async move {
            policy
                .metrics
                .iter()
                .map(|m| {
                    let r = match mode {
                        Mode::Good => MetricReading {
                            stable: sample(0.001),
                            canary: sample(0.001),
                        },
                        Mode::Bad => MetricReading {
                            stable: sample(0.001),
                            canary: sample(0.2),
                        },
                        Mode::Down => MetricReading::unavailable("connection refused"),
                    };
                    (m.name.clone(), r)
                })
                .collect()
        })
    }
}

pub const POLICY: &str = "
name: demo
stable: v1
canary: v2
strategy:
  steps: [10, 50]
  interval: 50ms
  min_step_duration: 150ms
  failure_limit: 2
  progress_deadline: 1h
analysis: {method: threshold}
metrics:
  - {name: errors, builtin: error_rate, max: 1%}
router:
  file: {path: /dev/null}
";

/// `POLICY` whose rollout stays at its first step for an hour (and has three to finish): for
/// tests of what happens to a rollout under way.
pub fn held_policy() -> String {
    POLICY
        .replace("min_step_duration: 150ms", "min_step_duration: 1h")
        .replace("progress_deadline: 1h", "progress_deadline: 3h")
}

/// `policy` routed by the file router to `weights` instead of /dev/null.
pub fn file_routed(policy: &str, weights: &Path) -> String {
    policy.replace(
        "file: {path: /dev/null}",
        &format!("file: {{path: '{}'}}", weights.display()),
    )
}

/// A JSON file's document, or null while it cannot be read or parsed.
fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default()).unwrap_or(Value::Null)
}

/// `POLICY` for a real `canaryd run` process, which holds policies to `policy::MIN_INTERVAL`.
pub fn process_policy() -> String {
    POLICY.replace("interval: 50ms", "interval: 1s")
}

pub struct Daemon {
    pub url: String,
    pub router: FakeRouter,
    pub source: FakeSource,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Factories that hand every policy the same fake router and source.
fn factories(
    router: &FakeRouter,
    source: &FakeSource,
) -> (
    canaryd::controller::RouterFactory,
    canaryd::controller::SourceFactory,
) {
    let (r, s) = (router.clone(), source.clone());
    let routers: canaryd::controller::RouterFactory =
        Arc::new(move |_p| Ok(Box::new(r.clone()) as Box<dyn Router>));
    let sources: canaryd::controller::SourceFactory =
        Arc::new(move |_p| Arc::new(s.clone()) as Arc<dyn MetricSource>);
    (routers, sources)
}

impl Daemon {
    /// A daemon with real edges: the routers its policies name and the given source.
    /// A daemon with the real routers (policies name a file router) and a good fake source.
    pub async fn start_file_routed(dir: &Path) -> Daemon {
        let (_, source) = fakes(Mode::Good);
        let (_, sources) = factories(&FakeRouter::default(), &source);
        Daemon::start_real(dir, sources).await
    }

    pub async fn start_real(dir: &Path, sources: canaryd::controller::SourceFactory) -> Daemon {
        let (router, source) = fakes(Mode::Good);
        let routers: canaryd::controller::RouterFactory = Arc::new(canaryd::router::from_policy);
        Daemon::start_with(
            dir,
            router,
            source,
            None,
            routers,
            sources,
            test_limits(),
            false,
        )
        .await
    }

    pub async fn start(
        dir: &Path,
        router: FakeRouter,
        source: FakeSource,
        token: Option<&str>,
    ) -> Daemon {
        let (routers, sources) = factories(&router, &source);
        Daemon::start_with(
            dir,
            router,
            source,
            token,
            routers,
            sources,
            test_limits(),
            false,
        )
        .await
    }

    /// A daemon with the fake router and the given metric sources.
    pub async fn start_sourced(dir: &Path, sources: canaryd::controller::SourceFactory) -> Daemon {
        let (router, source) = fakes(Mode::Good);
        let (routers, _) = factories(&router, &source);
        let limits = test_limits();
        Daemon::start_with(dir, router, source, None, routers, sources, limits, false).await
    }

    /// `start` without a token, with the given limits instead of the defaults.
    pub async fn start_limited(
        dir: &Path,
        router: FakeRouter,
        source: FakeSource,
        limits: Limits,
    ) -> Daemon {
        let (routers, sources) = factories(&router, &source);
        Daemon::start_with(dir, router, source, None, routers, sources, limits, false).await
    }

    /// `start` with `--dry-run`.
    pub async fn start_dry(dir: &Path, router: FakeRouter, source: FakeSource) -> Daemon {
        let (routers, sources) = factories(&router, &source);
        let limits = test_limits();
        Daemon::start_with(dir, router, source, None, routers, sources, limits, true).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_with(
        dir: &Path,
        router: FakeRouter,
        source: FakeSource,
        token: Option<&str>,
        routers: canaryd::controller::RouterFactory,
        sources: canaryd::controller::SourceFactory,
        limits: Limits,
        dry_run: bool,
    ) -> Daemon {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let config = canaryd::daemon::DaemonConfig {
            policies: dir.join("policies"),
            state: dir.join("state.db"),
            token: token.map(str::to_owned),
            dry_run,
            poll: Duration::from_millis(50),
            clock: Arc::new(canaryd::time::SystemClock),
            routers,
            sources,
            metrics: None,
            ha: None,
        };
        let handle = tokio::spawn(canaryd::daemon::serve_with(
            listener,
            config,
            limits,
            async move {
                let _ = rx.await;
            },
        ));
        let d = Daemon {
            url,
            router,
            source,
            stop: Some(tx),
            handle: Some(handle),
        };
        let ready = format!("{}/readyz", d.url);
        wait_for("daemon ready", Duration::from_secs(10), || {
            let ready = ready.clone();
            async move {
                let r = reqwest::get(&ready).await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        d
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = reqwest::get(format!("{}{path}", self.url)).await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .body(body.to_owned());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn wait_phase(&self, name: &str, phase: &str) -> Value {
        self.wait_phase_for(name, phase, Duration::from_secs(15))
            .await
    }

    /// Asserts that the API lists no invalid or refused policy file.
    pub async fn assert_no_invalid_policies(&self) {
        let (_, list) = self.get("/api/v1/rollouts").await;
        assert_eq!(list["invalid_policies"], serde_json::json!([]), "{list}");
    }

    /// Waits until the rollout is shown stopped (its policy file deleted); its view.
    pub async fn wait_stopped(&self, name: &str) -> Value {
        let path = format!("/api/v1/rollouts/{name}");
        wait_for(
            &format!("{name} stopped"),
            Duration::from_secs(10),
            || async {
                let (s, v) = self.get(&path).await;
                (s == 200 && v["stopped"] == true).then_some(v)
            },
        )
        .await
    }

    pub async fn wait_phase_for(&self, name: &str, phase: &str, limit: Duration) -> Value {
        let path = format!("/api/v1/rollouts/{name}");
        wait_for(&format!("{name} to be {phase}"), limit, || async {
            let (s, v) = self.get(&path).await;
            (s == 200 && v["phase"] == phase).then_some(v)
        })
        .await
    }

    /// Asks for operator `action` on rollout `name`, which must be refused (409): the reason.
    pub async fn refused(&self, name: &str, action: &str) -> String {
        let (status, body) = self
            .post(&format!("/api/v1/rollouts/{name}/{action}"), None, "{}")
            .await;
        assert_eq!(status, 409, "{body}");
        body["error"].as_str().unwrap_or_default().to_owned()
    }

    /// Waits until a text field of rollout `name`'s view contains `text`.
    pub async fn wait_text(&self, name: &str, field: &str, text: &str) -> Value {
        let path = format!("/api/v1/rollouts/{name}");
        let what = format!("{name}'s {field} to say {text:?}");
        wait_for(&what, Duration::from_secs(10), || async {
            let (_, v) = self.get(&path).await;
            v[field].as_str()?.contains(text).then_some(v)
        })
        .await
    }
}

/// The daemon's limits for tests: policies may analyse every few milliseconds, so that whole
/// rollouts run in a second (`policy::MIN_INTERVAL` is for production).
pub fn test_limits() -> Limits {
    Limits {
        min_interval: Duration::from_millis(10),
        ..Limits::default()
    }
}

pub fn setup(policy: &str) -> tempfile::TempDir {
    let dir = policies_dir();
    std::fs::write(dir.path().join("policies/demo.yaml"), policy).unwrap();
    dir
}

/// A daemon's directory with an empty `policies` directory in it.
pub fn policies_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    dir
}

fn fakes(mode: Mode) -> (FakeRouter, FakeSource) {
    (
        FakeRouter::default(),
        FakeSource {
            mode: Arc::new(Mutex::new(mode)),
        },
    )
}

#[tokio::test]
async fn good_canary_walks_every_step_and_is_promoted() {
    let dir = setup(POLICY);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    let v = d.wait_phase("demo", "promoted").await;
    assert_eq!(v["weight"], 100.0);
    assert_eq!(*d.router.applied.lock().unwrap(), vec![10.0, 50.0, 100.0]);
    let (_, log) = d.get("/api/v1/rollouts/demo/decisions?limit=500").await;
    let actions: Vec<&str> = log["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|d| d["action"].as_str().unwrap())
        .filter(|a| *a != "hold")
        .collect();
    assert_eq!(actions, ["start", "advance", "promote", "settle"]);
    let (_, m) = (
        200,
        reqwest::get(format!("{}/metrics", d.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert!(
        m.contains("canaryd_rollout_phase{phase=\"promoted\",rollout=\"demo\"} 1"),
        "{m}"
    );
    assert!(m.contains("canaryd_decisions_total{action=\"promote\",rollout=\"demo\"} 1"));
    assert!(m.contains(
        "canaryd_analysis_value{metric=\"errors\",rollout=\"demo\",version=\"canary\"} 0.001"
    ));
    d.stop().await;
}

#[tokio::test]
async fn the_decision_log_keeps_only_the_newest_decisions_the_daemon_is_told_to() {
    let dir = setup(POLICY);
    let (router, source) = fakes(Mode::Good);
    let limits = Limits {
        decisions_kept: 3,
        ..test_limits()
    };
    let d = Daemon::start_limited(dir.path(), router, source, limits).await;
    d.wait_phase("demo", "promoted").await;
    let (status, log) = d.get("/api/v1/rollouts/demo/decisions?limit=500").await;
    assert_eq!(status, 200);
    let log = log["decisions"].as_array().unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e["action"].as_str().unwrap()).collect();
    // The walk records start, advance, promote and settle (and analyses): more than three.
    assert_eq!(actions.first(), Some(&"settle"), "{actions:?}");
    assert!(!actions.contains(&"start"), "{actions:?}");
    assert!(
        log.iter().skip(3).all(|e| e["applied"] == false),
        "only unapplied decisions may outlive the limit: {log:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_second_file_for_a_running_rollout_waits_and_starts_when_the_first_goes() {
    let dir = setup(POLICY);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    d.wait_phase("demo", "promoted").await;
    // The same rollout name in a second file: refused while demo.yaml runs it.
    let second = dir.path().join("policies/zz-demo-copy.yaml");
    std::fs::write(&second, POLICY.replace("canary: v2", "canary: v3")).unwrap();
    wait_for("the clash reported", Duration::from_secs(10), || async {
        let (_, v) = d.get("/api/v1/rollouts").await;
        v["invalid_policies"]
            .to_string()
            .contains("is already defined by")
            .then_some(())
    })
    .await;
    // It names the field's line and column and the file that holds the name.
    let (_, v) = d.get("/api/v1/rollouts").await;
    let shown = v["invalid_policies"].to_string();
    let first = dir.path().join("policies/demo.yaml").display().to_string();
    assert!(
        shown.contains(&format!(
            "zz-demo-copy.yaml:2:7: name: rollout \\\"demo\\\" is already defined by {first}"
        )),
        "{shown}"
    );
    // Still reported after a later scan (one that loaded another file), not dropped once said.
    let other = POLICY
        .replace("name: demo", "name: other")
        .replace("/dev/null", "/dev/null/other");
    std::fs::write(dir.path().join("policies/other.yaml"), other).unwrap();
    wait_for("a later scan", Duration::from_secs(10), || async {
        (d.get("/api/v1/rollouts/other").await.0 == 200).then_some(())
    })
    .await;
    let (_, v) = d.get("/api/v1/rollouts").await;
    assert!(
        v["invalid_policies"]
            .to_string()
            .contains("already defined"),
        "{v}"
    );
    // The first file goes: the second one's rollout (v3) takes the name.
    std::fs::remove_file(dir.path().join("policies/demo.yaml")).unwrap();
    wait_for(
        "the second file's rollout",
        Duration::from_secs(10),
        || async {
            let (status, v) = d.get("/api/v1/rollouts/demo").await;
            (status == 200 && v["canary"] == "v3").then_some(())
        },
    )
    .await;
    let (_, v) = d.get("/api/v1/rollouts").await;
    assert_eq!(v["invalid_policies"], serde_json::json!([]), "{v}");
    d.stop().await;
}

/// A slowloris: a client that opens connections and never finishes a request's headers.
#[tokio::test]
async fn clients_that_never_finish_their_headers_are_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let timeout = Duration::from_millis(200);
    let dir = setup(POLICY);
    let (router, source) = fakes(Mode::Good);
    let limits = Limits {
        header_read_timeout: timeout,
        ..test_limits()
    };
    let d = Daemon::start_limited(dir.path(), router, source, limits).await;
    let addr = d.url.trim_start_matches("http://").to_owned();

    // One client sends nothing at all; the other trickles an endless header, a byte at a time.
    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    // Meanwhile the API answers everyone else.
    let (status, _) = d.get("/api/v1/rollouts").await;
    assert_eq!(status, 200);

    let limit = Duration::from_secs(5);
    let trickled = tokio::time::timeout(limit, async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut buf = [0u8; 256];
        loop {
            tokio::select! {
                r = slow.read(&mut buf) => return r.map(|n| buf[..n].to_vec()),
                _ = tick.tick() => {
                    // A write may fail once the server has gone; the read then reports it.
                    let _ = slow.write_all(b"a").await;
                }
            }
        }
    })
    .await
    .expect("the server still held the trickling connection after 5 s");
    // An error is a reset (the server closed while a trickled byte was unread): a close too.
    if let Ok(bytes) = trickled {
        assert!(
            bytes.is_empty(),
            "expected the connection closed, got {:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let mut buf = [0u8; 16];
    let silent_read = tokio::time::timeout(limit, silent.read(&mut buf))
        .await
        .expect("the server still held the silent connection after 5 s");
    assert!(matches!(silent_read, Ok(0) | Err(_)), "{silent_read:?}");
    // Closed by the timeout, not by anything sooner.
    assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());

    // A slow client does not hold the shutdown either.
    let mut lingering = TcpStream::connect(&addr).await.unwrap();
    lingering.write_all(b"GET /healthz HT").await.unwrap();
    tokio::time::timeout(limit, d.stop())
        .await
        .expect("shutdown waited for a client that never finished its headers");
    drop(lingering);
}

#[tokio::test]
async fn bad_canary_is_rolled_back_after_failure_limit() {
    let dir = setup(POLICY);
    let (router, source) = fakes(Mode::Bad);
    let d = Daemon::start(dir.path(), router, source, None).await;
    d.wait_phase("demo", "rolled-back").await;
    assert_eq!(*d.router.weight.lock().unwrap(), 0.0);
    let (_, log) = d.get("/api/v1/rollouts/demo/decisions").await;
    let rb = log["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["action"] == "rollback")
        .unwrap();
    assert!(rb["reason"].as_str().unwrap().contains("errors"), "{rb}");
    assert_eq!(rb["reports"][0]["verdict"], "fail");
    d.stop().await;
}

#[tokio::test]
async fn unavailable_source_holds_without_failures_then_continues() {
    let dir = setup(POLICY);
    let (router, source) = fakes(Mode::Down);
    let d = Daemon::start(dir.path(), router, source, None).await;
    let v = d.wait_phase("demo", "progressing").await;
    // Many intervals of an unreachable source: still step 1, no failure counted.
    let path = "/api/v1/rollouts/demo";
    wait_for(
        "several unavailable analyses",
        Duration::from_secs(10),
        || async {
            let (_, v) = d.get(path).await;
            (v["state"]["analyses"].as_u64()? >= 6).then_some(())
        },
    )
    .await;
    let (_, v2) = d.get(path).await;
    assert_eq!(v2["step"], 1, "{v2}");
    assert_eq!(v2["state"]["consecutive_failures"], 0);
    assert_eq!(v["weight"], 10.0);
    // The timeline says why each metric is unavailable, not only which.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args(["status", "demo", "--server", &d.url])
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("metrics unavailable: errors")
            && text.contains("why: canary unavailable: connection refused"),
        "{text}"
    );
    *d.source.mode.lock().unwrap() = Mode::Good;
    d.wait_phase("demo", "promoted").await;
    d.stop().await;
}

#[tokio::test]
async fn restart_resumes_at_the_recorded_step() {
    let dir = setup(&held_policy());
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router.clone(), source.clone(), None).await;
    d.wait_phase("demo", "progressing").await;
    let (_, before) = d.get("/api/v1/rollouts/demo/decisions?limit=500").await;
    d.stop().await;
    // A new daemon on the same store: same step, same attempt, no second start.
    let d = Daemon::start(dir.path(), router, source, None).await;
    let v = d.wait_phase("demo", "progressing").await;
    assert_eq!(v["step"], 1);
    assert_eq!(v["state"]["attempt"], 1);
    let (_, after) = d.get("/api/v1/rollouts/demo/decisions?limit=500").await;
    let starts = after["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["action"] == "start")
        .count();
    assert_eq!(starts, 1);
    assert!(
        after["decisions"].as_array().unwrap().len()
            >= before["decisions"].as_array().unwrap().len()
    );
    d.stop().await;
}

/// UAT: an abort the state store could not record (etcd down) but the router took was undone
/// by the next leader, or the same replica leading again, which resumed from the store and
/// raised the canary back to its step. A rollout read back from the store that finds the
/// router sending the canary less than recorded pauses there; resume brings the step back.
#[tokio::test]
async fn a_resumed_rollout_never_raises_a_router_found_lower_on_its_own() {
    let dir = setup(&held_policy());
    let d = started_at_ten_percent(dir.path()).await;
    let (router, source) = (d.router.clone(), d.source.clone());
    d.stop().await;
    // Taken by the router, never recorded.
    *router.weight.lock().unwrap() = 0.0;
    let d = Daemon::start(dir.path(), router.clone(), source, None).await;
    let v = d.wait_phase("demo", "paused").await;
    assert_eq!(v["weight"], 0.0, "{v}");
    let said = v["state"]["message"].as_str().unwrap_or("");
    assert!(
        said.contains(
            "the router sends 0% to the canary, where the last recorded decision set 10%"
        ),
        "{v}"
    );
    assert!(
        router
            .applied
            .lock()
            .unwrap()
            .iter()
            .all(|w| *w == 0.0 || *w == 10.0)
    );
    let (_, log) = d.get("/api/v1/rollouts/demo/decisions?limit=50").await;
    let paused = log["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["action"] == "pause")
        .count();
    assert_eq!(paused, 1, "{log}");
    assert_eq!(*router.weight.lock().unwrap(), 0.0);
    let (status, body) = d.post("/api/v1/rollouts/demo/resume", None, "{}").await;
    assert_eq!(status, 200, "{body}");
    wait_for("the step's 10 % again", Duration::from_secs(5), || async {
        (*router.weight.lock().unwrap() == 10.0).then_some(())
    })
    .await;
    let v = d.wait_phase("demo", "progressing").await;
    assert_eq!(v["weight"], 10.0, "{v}");
    d.stop().await;
}

/// A daemon with fakes (a good canary) whose rollout runs at 10 % on the router.
async fn started_at_ten_percent(dir: &Path) -> Daemon {
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir, router, source, None).await;
    d.wait_phase("demo", "progressing").await;
    wait_for("weight 10 applied", Duration::from_secs(5), || async {
        (*d.router.weight.lock().unwrap() == 10.0).then_some(())
    })
    .await;
    d
}

/// `POLICY` with a router that may fail for 300 ms before the rollout fails.
fn short_router_deadline() -> String {
    POLICY.replace(
        "progress_deadline: 1h",
        "progress_deadline: 1h\n  router_deadline: 300ms",
    )
}

#[tokio::test]
async fn failing_router_ends_in_failed_after_its_deadline_leaving_traffic() {
    let dir = setup(&short_router_deadline());
    let d = started_at_ten_percent(dir.path()).await;
    *d.router.failing.lock().unwrap() = true;
    let v = d.wait_phase("demo", "failed").await;
    assert_eq!(
        v["weight"], 10.0,
        "traffic stays where it was last known to be safe"
    );
    assert!(
        v["router_error"]
            .as_str()
            .unwrap()
            .contains("fake router is down")
    );
    // An operator can still roll back once the router is back.
    *d.router.failing.lock().unwrap() = false;
    let (s, _) = d.post("/api/v1/rollouts/demo/abort", None, "").await;
    assert_eq!(s, 200);
    d.wait_phase("demo", "rolled-back").await;
    assert_eq!(*d.router.weight.lock().unwrap(), 0.0);
    d.stop().await;
}

/// UAT: while a router took its time over an abort (a hung reload, retried), the API went on
/// showing the phase from before the abort for a minute and more. A decision shows at once,
/// as not yet applied, while the router is being told.
#[tokio::test]
async fn a_decision_shows_while_the_router_takes_its_time() {
    let dir = setup(&held_policy());
    let d = started_at_ten_percent(dir.path()).await;
    *d.router.stalled.lock().unwrap() = true;
    let url = d.url.clone();
    let abort = tokio::spawn(async move {
        crate::support::http_client()
            .post(format!("{url}/api/v1/rollouts/demo/abort"))
            .body("{}")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    let v = wait_for("the rollback shown", Duration::from_secs(10), || async {
        let (_, v) = d.get("/api/v1/rollouts/demo").await;
        (v["phase"] == "rolling-back").then_some(v)
    })
    .await;
    assert_eq!(v["applied"], false, "{v}");
    assert_eq!(
        *d.router.weight.lock().unwrap(),
        10.0,
        "the router has not taken it yet"
    );
    *d.router.stalled.lock().unwrap() = false;
    assert_eq!(abort.await.unwrap().unwrap(), 200);
    d.wait_phase("demo", "rolled-back").await;
    d.stop().await;
}

/// UAT: a webhook router whose GET was broken but whose POST worked held the rollout as
/// "router failing" for ever, while the API showed no router error and the table no warning:
/// each working write wiped the read's error and its deadline. A router canaryd cannot read is
/// failing, whatever its writes do.
#[tokio::test]
async fn a_router_that_takes_writes_but_cannot_be_read_is_failing() {
    let dir = setup(&short_router_deadline());
    let d = started_at_ten_percent(dir.path()).await;
    *d.router.unreadable.lock().unwrap() = true;
    let v = d.wait_phase("demo", "failed").await;
    let error = v["router_error"].as_str().unwrap_or_default();
    assert!(error.contains("reads garbage"), "{v}");
    let (_, list) = d.get("/api/v1/rollouts").await;
    let table = canaryd::client::table(&list);
    assert!(table.contains("reads garbage"), "{table}");
    d.stop().await;
}

/// A router that answers reads but refuses writes is as failing as one that is down: the
/// rollout fails after the deadline. A failed rollout then leaves the router alone (someone
/// reset it to stable: canaryd does not put the canary back), but still judges the canary and
/// rolls it back when it turns bad.
#[tokio::test]
async fn a_router_that_refuses_writes_fails_the_rollout_which_then_leaves_it_alone_but_judges() {
    let (hook, seen) = hooks(Arc::new(Mutex::new(200))).await;
    // The first step lasts long enough for the router to refuse before the advance (it
    // advanced before, on a loaded machine, and took 50 %).
    let policy = short_router_deadline()
        .replace("min_step_duration: 150ms", "min_step_duration: 2s")
        .replace(
            "router:",
            &format!("webhooks:\n  - {{on: failed, url: '{hook}/failed'}}\nrouter:"),
        );
    let dir = setup(&policy);
    let d = started_at_ten_percent(dir.path()).await;
    *d.router.refusing.lock().unwrap() = true;
    let v = d.wait_phase("demo", "failed").await;
    assert_eq!(v["weight"], 10.0, "the last weight the router took: {v}");
    let error = v["router_error"].as_str().unwrap_or_default();
    assert!(error.contains("refuses writes"), "{v}");
    // The `failed` event says the router did not take the weight, and why.
    let event = wait_for("the failed event", Duration::from_secs(5), || async {
        seen.lock()
            .unwrap()
            .iter()
            .find(|e| e["event"] == "failed")
            .cloned()
    })
    .await;
    assert_eq!(event["applied"], false, "{event}");
    let why = event["router_error"].as_str().unwrap_or_default();
    assert!(why.contains("refuses writes"), "{event}");
    // Someone resets the router to stable.
    let applied = d.router.applied.lock().unwrap().len();
    *d.router.refusing.lock().unwrap() = false;
    *d.router.weight.lock().unwrap() = 0.0;
    let analyses = |v: &Value| v["state"]["analyses"].as_u64().unwrap_or_default();
    let seen = analyses(&d.get("/api/v1/rollouts/demo").await.1);
    let v = wait_for("three more analyses", Duration::from_secs(10), || async {
        let (_, v) = d.get("/api/v1/rollouts/demo").await;
        (analyses(&v) >= seen + 3).then_some(v)
    })
    .await;
    assert_eq!(v["phase"], "failed", "{v}");
    assert_eq!(
        *d.router.weight.lock().unwrap(),
        0.0,
        "a failed rollout does not push the canary back"
    );
    assert!(v["router_error"].is_null(), "the router works again: {v}");
    assert_eq!(v["router_weight"], 0.0, "{v}");
    assert_eq!(d.router.applied.lock().unwrap().len(), applied);
    // The canary turns bad: it is rolled back.
    *d.source.mode.lock().unwrap() = Mode::Bad;
    d.wait_phase("demo", "rolled-back").await;
    let (_, log) = d.get("/api/v1/rollouts/demo/decisions?limit=500").await;
    let rollback = log["decisions"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["action"] == "rollback"))
        .cloned()
        .unwrap_or_default();
    let reason = rollback["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("failed rollout: "), "{log}");
    assert_eq!(*d.router.weight.lock().unwrap(), 0.0);
    d.stop().await;
}

#[tokio::test]
async fn api_actions_need_the_token_and_bad_requests_change_nothing() {
    let dir = setup(&held_policy());
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, Some("s3cret")).await;
    d.wait_phase("demo", "progressing").await;
    let (s, _) = d.post("/api/v1/rollouts/demo/pause", None, "").await;
    assert_eq!(s, 401);
    let (s, _) = d
        .post("/api/v1/rollouts/demo/pause", Some("wrong"), "")
        .await;
    assert_eq!(s, 403);
    let (s, _) = d
        .post("/api/v1/rollouts/demo/explode", Some("s3cret"), "")
        .await;
    assert_eq!(s, 404);
    let (s, _) = d
        .post("/api/v1/rollouts/demo/pause", Some("s3cret"), "{not json")
        .await;
    assert_eq!(s, 400);
    let (s, _) = d
        .post("/api/v1/rollouts/nope/pause", Some("s3cret"), "")
        .await;
    assert_eq!(s, 404);
    let (s, _) = d
        .post("/api/v1/rollouts/demo/resume", Some("s3cret"), "")
        .await;
    assert_eq!(s, 409, "resume of a rollout that is not paused is refused");
    let (_, v) = d.get("/api/v1/rollouts/demo").await;
    assert_eq!(
        v["phase"], "progressing",
        "nothing above changed the rollout"
    );
    // Refusals are answered, not logged as decisions: they would bury the rollout's history.
    for _ in 0..5 {
        let (s, _) = d
            .post("/api/v1/rollouts/demo/resume", Some("s3cret"), "")
            .await;
        assert_eq!(s, 409);
    }
    let (_, log) = d.get("/api/v1/rollouts/demo/decisions?limit=500").await;
    let actions: Vec<&str> = log["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["action"].as_str())
        .collect();
    assert!(!actions.contains(&"reject"), "{actions:?}");
    let (_, v) = d.get("/api/v1/rollouts/demo").await;
    assert_ne!(v["last_decision"]["action"], "reject", "{v}");
    let big = format!("{{\"reason\": \"{}\"}}", "x".repeat(20_000));
    let (s, v) = d
        .post("/api/v1/rollouts/demo/pause", Some("s3cret"), &big)
        .await;
    assert_eq!(s, 413);
    assert!(v["error"].is_string(), "413 answers JSON: {v}");
    // Acceptance test: a body that is not a JSON object was answered in serde's words about
    // an internal type ("invalid length 0, expected struct ActionBody with 2 elements").
    for (body, found) in [
        ("[]", "an array"),
        ("\"stop\"", "a string"),
        ("7", "a number"),
    ] {
        let (s, v) = d
            .post("/api/v1/rollouts/demo/pause", Some("s3cret"), body)
            .await;
        assert_eq!(s, 400, "{body}: {v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.ends_with(&format!("found {found}")), "{body}: {e}");
        assert!(!e.contains("ActionBody"), "{e}");
    }
    // The scheme's name is case-insensitive (RFC 7235); a wrong action shows it got past it.
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/rollouts/demo/explode", d.url))
        .header("authorization", "bearer s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404, "lower-case bearer is accepted");
    let (s, rec) = d
        .post(
            "/api/v1/rollouts/demo/pause",
            Some("s3cret"),
            r#"{"who": "alice", "reason": "looking at dashboards"}"#,
        )
        .await;
    assert_eq!(s, 200, "{rec}");
    assert_eq!(rec["action"], "pause");
    assert_eq!(rec["who"], "alice (token)");
    assert_eq!(rec["why"], "looking at dashboards");
    d.wait_phase("demo", "paused").await;
    let (s, _) = d
        .post("/api/v1/rollouts/demo/promote", Some("s3cret"), "")
        .await;
    assert_eq!(s, 200);
    d.wait_phase("demo", "promoted").await;
    // Read endpoints stay open.
    let (s, list) = d.get("/api/v1/rollouts").await;
    assert_eq!(s, 200);
    assert_eq!(list["rollouts"][0]["name"], "demo");
    let (s, a) = d.get("/api/v1/rollouts/demo/assign?key=alice").await;
    assert_eq!(s, 200);
    assert_eq!(
        a["version"], "v2",
        "after promotion every key is on the canary"
    );
    let (s, _) = d.get("/api/v1/rollouts/demo/assign").await;
    assert_eq!(s, 400);
    let (s, _) = d.get("/api/v1/rollouts/demo/decisions?limit=abc").await;
    assert_eq!(s, 400);
    let (s, _) = d.get("/api/v1/rollouts/demo/decisions?limit=0").await;
    assert_eq!(s, 400);
    let (s, v) = d.get("/api/v1/rollouts/demo/decisions?before=-5").await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = d.get("/api/v1/rollouts/demo/assign?key=a&key=b").await;
    assert_eq!(s, 400);
    assert_eq!(v["error"], "expected exactly one key, found 2");
    let (s, v) = d.get("/api/v1/nothing-here").await;
    assert_eq!(s, 404);
    assert!(v["error"].is_string(), "unknown paths answer JSON: {v}");
    let (s, v) = d.get("/api/v1/rollouts/demo/pause").await;
    assert_eq!(s, 405);
    assert!(v["error"].is_string(), "wrong methods answer JSON: {v}");
    d.stop().await;
}

#[tokio::test]
async fn policy_edits_apply_bad_edits_are_rejected_and_deletion_stops() {
    let dir = setup(&held_policy());
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    d.wait_phase("demo", "progressing").await;
    let file = dir.path().join("policies/demo.yaml");
    std::fs::write(&file, "name: demo\nstable: v1\ncanary: [\n").unwrap();
    let v = wait_for(
        "the bad edit to be reported",
        Duration::from_secs(10),
        || async {
            let (_, v) = d.get("/api/v1/rollouts/demo").await;
            v["policy_error"].as_str().is_some().then_some(v)
        },
    )
    .await;
    assert!(
        v["policy_error"].as_str().unwrap().contains("demo.yaml:"),
        "{v}"
    );
    assert_eq!(
        v["phase"], "progressing",
        "the last good version keeps running"
    );
    // A valid edit with a new canary starts a new rollout of it.
    let new = held_policy().replace("canary: v2", "canary: v3");
    std::fs::write(&file, new).unwrap();
    wait_for("the new canary", Duration::from_secs(10), || async {
        let (_, v) = d.get("/api/v1/rollouts/demo").await;
        (v["canary"] == "v3" && v["phase"] == "progressing" && v["policy_error"].is_null())
            .then_some(())
    })
    .await;
    let weight = *d.router.weight.lock().unwrap();
    std::fs::remove_file(&file).unwrap();
    d.wait_stopped("demo").await;
    assert_eq!(
        *d.router.weight.lock().unwrap(),
        weight,
        "deleting a policy leaves traffic as it is"
    );
    d.stop().await;
}

/// Received event bodies, and the status code the receiver answers with.
type HookState = (Arc<Mutex<Vec<Value>>>, Arc<Mutex<u16>>);

/// A tiny webhook receiver: records every POST body to any path, answers with the status in
/// `answer`.
async fn hooks(answer: Arc<Mutex<u16>>) -> (String, Arc<Mutex<Vec<Value>>>) {
    use axum::extract::State;
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/{*path}",
            axum::routing::post(
                |State((seen, answer)): State<HookState>,
                 headers: axum::http::HeaderMap,
                 axum::Json(mut body): axum::Json<Value>| async move {
                    // Kept with the event, for the test to check who sent it.
                    body["user_agent"] = headers
                        .get("user-agent")
                        .and_then(|v| v.to_str().ok())
                        .into();
                    seen.lock().unwrap().push(body);
                    axum::http::StatusCode::from_u16(*answer.lock().unwrap()).unwrap()
                },
            ),
        )
        .with_state((seen.clone(), answer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test]
async fn a_closed_promotion_gate_holds_and_event_webhooks_are_called() {
    let answer = Arc::new(Mutex::new(503u16));
    let (url, seen) = hooks(answer.clone()).await;
    let policy = format!(
        "{POLICY}webhooks:\n  - {{on: confirm-promotion, url: \"{url}/gate\", timeout: 1s}}\n  - {{on: promote, url: \"{url}/promoted\"}}\n  - {{on: advance, url: \"{url}/advanced\"}}\n"
    );
    let dir = setup(&policy);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    let v = wait_for(
        "the gate to hold the promotion",
        Duration::from_secs(15),
        || async {
            let (_, v) = d.get("/api/v1/rollouts/demo").await;
            v["state"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("promotion gate closed"))
                .then_some(v)
        },
    )
    .await;
    assert_eq!(v["phase"], "progressing", "a closed gate never promotes");
    assert_eq!(v["weight"], 50.0);
    *answer.lock().unwrap() = 200;
    d.wait_phase("demo", "promoted").await;
    let events: Vec<String> = wait_for("the promote event", Duration::from_secs(5), || async {
        let events: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap_or("?").to_owned())
            .collect();
        events.contains(&"promote".to_string()).then_some(events)
    })
    .await;
    assert!(
        events.iter().filter(|e| *e == "confirm-promotion").count() >= 2,
        "{events:?}"
    );
    assert!(events.contains(&"advance".to_string()), "{events:?}");
    for e in seen.lock().unwrap().iter() {
        if e["event"] == "promote" {
            assert_eq!(e["applied"], true, "sent once the router took it: {e}");
            assert_eq!(e["weight"], 100.0, "{e}");
        }
    }
    let want = format!("canaryd/{}", env!("CARGO_PKG_VERSION"));
    for e in seen.lock().unwrap().iter() {
        assert_eq!(e["user_agent"], want.as_str(), "{e}");
    }
    d.stop().await;
}

/// UAT: the confirm-promotion gate was asked at every analysis of the last step, before its
/// time was up, and a gate slow to answer held back every analysis, a rollback's too. It is
/// asked only when everything else would promote.
#[tokio::test]
async fn the_promotion_gate_is_asked_only_when_it_decides() {
    let (url, seen) = hooks(Arc::new(Mutex::new(200))).await;
    let policy = format!(
        "{}webhooks:\n  - {{on: confirm-promotion, url: \"{url}/gate\", timeout: 1s}}\n",
        held_policy().replace("steps: [10, 50]", "steps: [10]")
    );
    let dir = setup(&policy);
    let d = started_at_ten_percent(dir.path()).await;
    let analyses = |v: &Value| v["state"]["analyses"].as_u64().unwrap_or_default();
    let before = analyses(&d.get("/api/v1/rollouts/demo").await.1);
    wait_for(
        "five analyses at the last step",
        Duration::from_secs(10),
        || async {
            let (_, v) = d.get("/api/v1/rollouts/demo").await;
            (analyses(&v) >= before + 5).then_some(())
        },
    )
    .await;
    let asked = seen.lock().unwrap().len();
    assert_eq!(asked, 0, "asked before the step's time was up");
    d.stop().await;
}

/// Regression (review): with two confirm-promotion gates only the first was asked, so a second
/// gate's "no" was never heard. Every gate must say yes.
#[tokio::test]
async fn every_promotion_gate_must_open() {
    let (yes, _) = hooks(Arc::new(Mutex::new(200))).await;
    let second = Arc::new(Mutex::new(503u16));
    let (no, asked) = hooks(second.clone()).await;
    let policy = format!(
        "{POLICY}webhooks:\n  - {{on: confirm-promotion, url: \"{yes}/gate\", timeout: 1s}}\n  - {{on: confirm-promotion, url: \"{no}/gate\", timeout: 1s}}\n"
    );
    let dir = setup(&policy);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    let refused = format!("promotion gate closed: the webhook at {no} answered 503");
    let v = wait_for(
        "the second gate to hold the promotion",
        Duration::from_secs(15),
        || async {
            let (_, v) = d.get("/api/v1/rollouts/demo").await;
            v["state"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&refused))
                .then_some(v)
        },
    )
    .await;
    assert_eq!(v["phase"], "progressing", "one closed gate never promotes");
    assert!(!asked.lock().unwrap().is_empty());
    *second.lock().unwrap() = 200;
    d.wait_phase("demo", "promoted").await;
    d.stop().await;
}

/// A confirm-promotion gate's URL at `base` with secrets in its path and query, as a service
/// that authenticates its callers that way (a Slack hook, `?token=`) hands it out.
fn secret_gate_policy(base: &str) -> String {
    format!(
        "{POLICY}webhooks:\n  - {{on: confirm-promotion, url: \"{base}/hooks/PATHSECRET/gate?token=QUERYSECRET\", timeout: 1s}}\n"
    )
}

/// Regression (acceptance test): a closed gate's reason held the gate's whole URL, and with it
/// the secrets in its path and query, in the decision log, the API and `canaryd status`. Only
/// the URL's origin is shown, whether the gate refuses or cannot be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_gate_shows_its_origin_never_the_secrets_in_its_url() {
    let (url, seen) = hooks(Arc::new(Mutex::new(403))).await;
    let dir = setup(&secret_gate_policy(&url));
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    let message = |v: &Value| v["state"]["message"].as_str().unwrap_or("").to_owned();
    let v = wait_for("the gate to refuse", Duration::from_secs(15), || async {
        let (_, v) = d.get("/api/v1/rollouts/demo").await;
        message(&v).contains("promotion gate closed").then_some(v)
    })
    .await;
    let refused = format!("promotion gate closed: the webhook at {url} answered 403 Forbidden");
    assert_eq!(message(&v), refused);
    assert!(
        !seen.lock().unwrap().is_empty(),
        "the gate was asked, at the URL with its secrets"
    );

    // The gate moves to where nothing listens: reqwest's error names the URL, which must not
    // reach the reason either.
    let dead = format!("http://127.0.0.1:{}", crate::support::free_port());
    std::fs::write(
        dir.path().join("policies/demo.yaml"),
        secret_gate_policy(&dead),
    )
    .unwrap();
    let unreachable = format!("promotion gate closed: the webhook at {dead} did not answer: ");
    let v = wait_for(
        "the gate to be unreachable",
        Duration::from_secs(15),
        || async {
            let (_, v) = d.get("/api/v1/rollouts/demo").await;
            message(&v).contains(&dead).then_some(v)
        },
    )
    .await;
    assert!(message(&v).starts_with(&unreachable), "{v}");
    assert_eq!(v["phase"], "progressing", "a closed gate never promotes");

    let (_, log) = d.get("/api/v1/rollouts/demo/decisions?limit=500").await;
    let log = log.to_string();
    assert!(
        log.contains(&refused) && log.contains(&unreachable),
        "{log}"
    );
    let (_, list) = d.get("/api/v1/rollouts").await;
    let status = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
            .args(["status"])
            .args(args)
            .args(["--server", &d.url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The commands block this thread; the daemon answers on another.
    let (table, timeline) = tokio::task::block_in_place(|| (status(&[]), status(&["demo"])));
    assert!(timeline.contains(&refused), "{timeline}");
    for (what, text) in [
        ("the rollout", v.to_string()),
        ("the rollouts", list.to_string()),
        ("the decision log", log),
        ("canaryd status", table),
        ("canaryd status demo", timeline),
    ] {
        assert!(!text.contains("SECRET"), "{what} shows a secret: {text}");
    }
    d.stop().await;
}

/// Regression (acceptance test): the log named a failed event webhook by its whole URL.
#[tokio::test]
async fn a_failed_event_webhook_is_logged_by_its_origin_only() {
    let (refusing, _) = hooks(Arc::new(Mutex::new(403))).await;
    let dead = format!("http://127.0.0.1:{}", crate::support::free_port());
    let policy = format!(
        "{}webhooks:\n  - {{on: rollout, url: \"{dead}/hooks/PATHSECRET?token=QUERYSECRET\"}}\n  - {{on: rollout, url: \"{refusing}/hooks/PATHSECRET?token=QUERYSECRET\"}}\n",
        process_policy().replace("/dev/null", "weights.json")
    );
    let dir = setup(&policy);
    let log = dir.path().join("canaryd.log");
    // Prometheus is a closed port: the start needs only the router, and calls the hooks.
    let mut child = spawn_logging_daemon(dir.path(), &log);
    let text = wait_for("both webhooks to fail", Duration::from_secs(15), || async {
        let text = std::fs::read_to_string(&log).ok()?;
        (text.contains("webhook failed") && text.contains("webhook refused the event"))
            .then_some(text)
    })
    .await;
    child.kill().await.unwrap();
    assert!(!text.contains("SECRET"), "{text}");
    let failed = text.lines().find(|l| l.contains("webhook failed")).unwrap();
    assert!(failed.contains(&format!("webhook={dead} ")), "{failed}");
    assert!(failed.contains("event=rollout"), "{failed}");
    let refused = text
        .lines()
        .find(|l| l.contains("webhook refused the event"))
        .unwrap();
    assert!(
        refused.contains(&format!("webhook={refusing} ")),
        "{refused}"
    );
}

// Multi-threaded: the commands block one thread while the daemon answers on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_actions_from_the_command_line() {
    let dir = setup(&held_policy());
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    d.wait_phase("demo", "progressing").await;
    let bin = env!("CARGO_BIN_EXE_canaryd");
    let run = |args: &[&str]| std::process::Command::new(bin).args(args).output().unwrap();
    // An address without a scheme is taken as http://.
    let addr = d.url.strip_prefix("http://").unwrap();
    let table = run(&["status", "--server", addr]);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("demo") && text.contains("progressing") && text.contains("10%"),
        "{text}"
    );
    let pause = run(&["pause", "demo", "--server", addr, "-m", "checking"]);
    assert!(
        pause.status.success(),
        "{}",
        String::from_utf8_lossy(&pause.stderr)
    );
    d.wait_phase("demo", "paused").await;
    let timeline = run(&["status", "demo", "--server", addr]);
    let text = String::from_utf8_lossy(&timeline.stdout);
    assert!(text.contains("pause") && text.contains("errors"), "{text}");
    // Refused (not paused any more after resume) and unknown rollouts exit 1.
    let resume = run(&["resume", "demo", "--server", addr]);
    assert_eq!(resume.status.code(), Some(0));
    // The weight as decisions write it, and the reason after a colon.
    let said = String::from_utf8_lossy(&resume.stdout);
    assert!(
        said.starts_with("demo: resume -> progressing at 10%: resumed by an operator"),
        "{said}"
    );
    assert_eq!(
        run(&["resume", "demo", "--server", &d.url]).status.code(),
        Some(1)
    );
    assert_eq!(
        run(&["abort", "nope", "--server", &d.url]).status.code(),
        Some(1)
    );
    d.stop().await;
    // Nobody listening: exit 2.
    let port = crate::support::free_port();
    assert_eq!(
        run(&["status", "--server", &format!("http://127.0.0.1:{port}")])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn run_refuses_a_public_address_without_a_token() {
    let dir = setup(POLICY);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args(["run", "--listen", "0.0.0.0:0", "--policies"])
        .arg(dir.path().join("policies"))
        .arg("--state")
        .arg(dir.path().join("s.db"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without an API token"), "{err}");
}

/// Regression: `--listen localhost:20055` was refused as "invalid socket address syntax". A
/// host name is resolved, and the daemon listens on what it resolves to.
#[tokio::test]
async fn run_listens_on_a_host_name() {
    let dir = setup(POLICY);
    let log = dir.path().join("canaryd.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args(["run", "--listen", "localhost:0", "--policies"])
        .arg(dir.path().join("policies"))
        .arg("--state")
        .arg(dir.path().join("s.db"))
        .env_remove("CANARYD_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let line = wait_for("the daemon to run", Duration::from_secs(15), || async {
        let text = std::fs::read_to_string(&log).ok()?;
        assert!(!text.starts_with("error:"), "{text}");
        text.lines()
            .find(|l| l.contains("canaryd running"))
            .map(str::to_owned)
    })
    .await;
    child.kill().await.unwrap();
    let addr: std::net::SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{line}");
}

/// The rule that a public API needs a token holds for what a name resolves to: a name with any
/// address that is not loopback is a public address.
#[test]
fn a_listen_name_is_judged_by_every_address_it_resolves_to() {
    use canaryd::daemon::check_listen;
    let addrs = |list: &[&str]| -> Vec<std::net::SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    };
    let loopback = addrs(&["127.0.0.1:9850", "[::1]:9850"]);
    assert!(check_listen("localhost:9850", &loopback, false, false).is_ok());
    for public in [
        addrs(&["10.0.0.5:9850"]),
        addrs(&["127.0.0.1:9850", "10.0.0.5:9850"]),
    ] {
        let err = check_listen("api.internal:9850", &public, false, false)
            .expect_err("a public address without a token")
            .to_string();
        assert!(
            err.contains(
                "refusing to listen on api.internal:9850 (10.0.0.5:9850) without an API token"
            ),
            "{err}"
        );
        assert!(check_listen("api.internal:9850", &public, true, false).is_ok());
        assert!(check_listen("api.internal:9850", &public, false, true).is_ok());
    }
    let err = check_listen("0.0.0.0:9850", &addrs(&["0.0.0.0:9850"]), false, false)
        .expect_err("the unspecified address is public");
    assert!(
        err.to_string()
            .starts_with("refusing to listen on 0.0.0.0:9850 without"),
        "{err}"
    );
}

/// A policy renamed mid-rollout finds the weights file still owned by its old name: it does
/// not touch the traffic, says so and how to take the file over, and `abort` does that.
#[tokio::test]
async fn a_renamed_policy_explains_the_owned_router_and_abort_takes_it_over() {
    let dir = policies_dir();
    let weights = dir.path().join("weights.json");
    // The old rollout's last split: 10 % on the canary.
    std::fs::write(
        &weights,
        r#"{"rollout": "demo", "stable": "v1", "canary": "v2", "weights": {"v1": 90, "v2": 10}}"#,
    )
    .unwrap();
    let policy = POLICY.replace("name: demo", "name: demo-renamed").replace(
        "file: {path: /dev/null}",
        &format!("file: {{path: '{}'}}", weights.display()),
    );
    std::fs::write(dir.path().join("policies/demo.yaml"), policy).unwrap();
    let (_, source) = fakes(Mode::Good);
    let (_, sources) = factories(&FakeRouter::default(), &source);
    let d = Daemon::start_real(dir.path(), sources).await;
    let v = wait_for("the router error", Duration::from_secs(10), || async {
        let (status, v) = d.get("/api/v1/rollouts/demo-renamed").await;
        let e = v["router_error"].as_str().unwrap_or("").to_owned();
        (status == 200 && e.contains("belongs to rollout \"demo\"")).then_some(v)
    })
    .await;
    assert!(
        v["router_error"]
            .as_str()
            .is_some_and(|e| e.contains("canaryd abort demo-renamed")),
        "{v}"
    );
    let untouched = std::fs::read_to_string(&weights).unwrap();
    assert!(untouched.contains("\"rollout\": \"demo\""), "{untouched}");
    assert_ne!(v["phase"], "progressing", "{v}");

    let (status, body) = d
        .post("/api/v1/rollouts/demo-renamed/abort", None, "{}")
        .await;
    assert_eq!(status, 200, "{body}");
    let doc: Value = wait_for("the file taken over", Duration::from_secs(10), || async {
        let text = std::fs::read_to_string(&weights).ok()?;
        let doc: Value = serde_json::from_str(&text).ok()?;
        (doc["rollout"] == "demo-renamed").then_some(doc)
    })
    .await;
    assert_eq!(doc["weights"]["v2"], 0.0, "{doc}");
    assert_eq!(doc["weights"]["v1"], 100.0, "{doc}");
    d.stop().await;
}

/// `canaryd run` with `args` after `--listen 127.0.0.1:0 --policies DIR`, no config or
/// Prometheus from the environment; its exit code and stderr. A daemon that starts instead of
/// failing is killed after 30 s and fails the test.
async fn run_daemon_expecting_failure(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let policies = dir.join("policies");
    let mut all = vec!["--policies", policies.to_str().unwrap()];
    all.extend_from_slice(args);
    run_expecting_failure(dir, &all).await
}

/// `canaryd run --listen 127.0.0.1:0` (unless `args` has a `--listen`) with `args`, from `dir`,
/// no config, state or Prometheus from the environment; as `run_daemon_expecting_failure`.
async fn run_expecting_failure(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let listen: &[&str] = if args.contains(&"--listen") {
        &[]
    } else {
        &["--listen", "127.0.0.1:0"]
    };
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .arg("run")
        .args(listen)
        .args(args)
        .current_dir(dir)
        .env_remove("CANARYD_POLICIES")
        .env_remove("CANARYD_API_TOKEN_FILE")
        .env_remove("CANARYD_PROMETHEUS")
        .env_remove("CANARYD_CONFIG")
        .env_remove("CANARYD_STATE")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("canaryd run to exit")
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn run_refuses_a_prometheus_that_is_not_a_url_before_it_runs() {
    let dir = setup(POLICY);
    let state = dir.path().join("s.db");
    let state = state.to_str().unwrap();
    let (code, err) =
        run_daemon_expecting_failure(dir.path(), &["--state", state, "--prometheus", "notaurl"])
            .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--prometheus") && err.contains("\"notaurl\""),
        "the error names the flag and the value: {err}"
    );
    assert!(!err.contains("canaryd running"), "{err}");
    let (code, err) = run_daemon_expecting_failure(
        dir.path(),
        &[
            "--state",
            state,
            "--prometheus",
            "http://ops:pw@127.0.0.1:9090",
        ],
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("pw@"), "the password is not shown: {err}");
    let config = dir.path().join("canaryd.yaml");
    std::fs::write(&config, "prometheus: 127.0.0.1:9090\n").unwrap();
    let (code, err) = run_daemon_expecting_failure(
        dir.path(),
        &["--state", state, "--config", config.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("prometheus in the config file") && err.contains("canaryd.yaml"),
        "{err}"
    );
    assert!(!Path::new(state).exists(), "nothing was started");
}

/// A config file's mistakes read like a policy's: `file:line:column: message`, once; and the
/// highly available daemon's flags are checked before anything starts.
#[tokio::test]
async fn run_reports_config_file_and_etcd_mistakes_with_their_place() {
    let dir = setup(POLICY);
    let state = dir.path().join("s.db");
    let state = state.to_str().unwrap();
    let config = dir.path().join("canaryd.yaml");
    let shown = config.display().to_string();
    let cases = [
        (
            "polices: x\n",
            format!("{shown}:1:1: unknown field `polices` (did you mean `policies`?)"),
        ),
        (
            "dry_run: yes\n",
            format!("{shown}:1:10: dry_run: expected true or false"),
        ),
        (
            "state: ./s.db\nlisten: [1, 2]\n",
            format!("{shown}:2:9: listen: "),
        ),
        (
            "etcd: http://127.0.0.1:1\nlease_ttl: soon\n",
            format!("lease_ttl in the config file {shown}: expected a duration like 10s"),
        ),
        (
            "etcd: 127.0.0.1:2379\n",
            format!("etcd in the config file {shown}: expected etcd's client URL"),
        ),
        (
            "etcd: http://127.0.0.1:1\netcd_ca_file: /nonexistent/ca.pem\n",
            format!("etcd_ca_file in the config file {shown}: cannot read /nonexistent/ca.pem"),
        ),
        (
            "etcd: http://127.0.0.1:1\netcd_user: u\netcd_password_file: /nonexistent/pw\n",
            format!("etcd_password_file in the config file {shown}: "),
        ),
        (
            "etcd: http://127.0.0.1:1\nlease_ttl: 1s\n",
            format!("lease_ttl in the config file {shown}: expected at least 2s"),
        ),
        (
            "etcd: http://127.0.0.1:1\netcd_prefix: canaryd\n",
            format!("etcd_prefix in the config file {shown}: expected a key prefix"),
        ),
        (
            "replica: a\n",
            format!("replica in the config file {shown}: for a highly available daemon only"),
        ),
        (
            "etcd: http://127.0.0.1:1\netcd_user: u\n",
            format!(
                "etcd_user in the config file {shown} needs --etcd-password-file (or \
                 etcd_password_file in the config file)"
            ),
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&config, text).unwrap();
        let (code, err) = run_daemon_expecting_failure(
            dir.path(),
            &["--state", state, "--config", config.to_str().unwrap()],
        )
        .await;
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(&want), "{want} in: {err}");
        assert_eq!(err.matches(&shown).count(), 1, "said once: {err}");
        assert!(!err.contains("<input>"), "{err}");
    }
    let flags: [(&[&str], &str); 10] = [
        (
            &["--listen", "0.0.0.0:0"],
            "--listen (or CANARYD_LISTEN): refusing to listen on 0.0.0.0:0 without an API token",
        ),
        (
            &["--listen", "nonsense"],
            "--listen (or CANARYD_LISTEN): \"nonsense\" is not an address",
        ),
        (
            &["--etcd", "127.0.0.1:2379"],
            "--etcd (or CANARYD_ETCD): expected etcd's client URL",
        ),
        (
            &["--prometheus-password-file", "/nonexistent/password"],
            "--prometheus-password-file needs --prometheus-user",
        ),
        (
            &["--etcd", "http://127.0.0.1:1", "--etcd-user", "cd"],
            "--etcd-user (or CANARYD_ETCD_USER) needs --etcd-password-file: the two go together",
        ),
        (
            &[
                "--etcd",
                "http://127.0.0.1:1",
                "--etcd-user",
                "cd",
                "--etcd-password-file",
                "/nonexistent/password",
            ],
            "cannot read the etcd password file /nonexistent/password",
        ),
        (
            &["--replica", "a", "--lease-ttl", "5s"],
            "--replica (or CANARYD_REPLICA), --lease-ttl (or CANARYD_LEASE_TTL): for a highly \
             available daemon only: give --etcd too",
        ),
        (
            &["--etcd-ca-file", "/nonexistent/ca.pem"],
            "give --etcd too",
        ),
        (
            &["--etcd", "http://127.0.0.1:1", "--lease-ttl", "1s"],
            "--lease-ttl (or CANARYD_LEASE_TTL): expected at least 2s",
        ),
        (
            &["--etcd", "http://127.0.0.1:1"],
            "--state (or CANARYD_STATE) and --etcd (or CANARYD_ETCD) exclude each other",
        ),
    ];
    for (args, want) in flags {
        let mut all = vec!["--state", state];
        all.extend_from_slice(args);
        let (code, err) = run_daemon_expecting_failure(dir.path(), &all).await;
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("canaryd running"), "{err}");
    }
}

/// Review: two daemons on one SQLite state each drove the same routers from their own
/// memory, so one's rollback was undone by the other's weight. The second is refused, and
/// the state is free again once the first has stopped.
#[tokio::test]
async fn a_second_daemon_on_the_same_state_is_refused() {
    let dir = setup(POLICY);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router.clone(), source.clone(), None).await;
    d.wait_phase("demo", "progressing").await;
    let state = dir.path().join("state.db");
    let state = state.to_str().unwrap();
    let (code, err) = run_daemon_expecting_failure(dir.path(), &["--state", state]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("another canaryd uses the state {state}")),
        "{err}"
    );
    assert!(!err.contains("canaryd running"), "{err}");
    d.stop().await;
    let again = Daemon::start(dir.path(), router, source, None).await;
    again.wait_phase("demo", "progressing").await;
    again.stop().await;
}

#[tokio::test]
async fn run_with_a_missing_state_directory_fails_once_naming_it() {
    let dir = setup(POLICY);
    let state = dir.path().join("missing/s.db");
    let (code, err) =
        run_daemon_expecting_failure(dir.path(), &["--state", state.to_str().unwrap()]).await;
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err.trim(),
        format!(
            "error: --state (or CANARYD_STATE): cannot open the state store {}: the directory {} \
             does not exist",
            state.display(),
            dir.path().join("missing").display()
        ),
        "one error, before the daemon says it runs"
    );
}

/// Regression: a config file's relative `policies` was read from the working directory, and
/// the error said `(give --policies DIR)` although no flag was given. Relative paths of the
/// config file start at its directory.
#[tokio::test]
async fn run_reads_the_config_file_s_relative_paths_from_its_directory() {
    let dir = setup(POLICY);
    std::fs::create_dir(dir.path().join("conf")).unwrap();
    let config = dir.path().join("conf/canaryd.yaml");
    std::fs::write(&config, "policies: ../policies\nstate: ../s.db\n").unwrap();
    let log = dir.path().join("canaryd.log");
    let prometheus = format!("http://127.0.0.1:{}", crate::support::free_port());
    // Started from `dir`, where `../policies` is not the policies directory.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--prometheus",
            &prometheus,
        ])
        .arg("--config")
        .arg(&config)
        .current_dir(dir.path())
        .env_remove("CANARYD_POLICIES")
        .env_remove("CANARYD_STATE")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for("the daemon to run", Duration::from_secs(15), || async {
        let text = std::fs::read_to_string(&log).ok()?;
        assert!(!text.starts_with("error:"), "{text}");
        text.contains("canaryd running").then_some(())
    })
    .await;
    child.kill().await.unwrap();
    assert!(dir.path().join("s.db").is_file(), "the state beside conf/");

    // A wrong path names where it came from: the config file, or the flag.
    let shown = config.display();
    let cases: [(&str, &[&str], String); 4] = [
        (
            "policies: missing\n",
            &[],
            format!(
                "error: policies in the config file {shown}: the policies directory {} does not exist",
                dir.path().join("conf/missing").display()
            ),
        ),
        (
            "policies: ../policies\nstate: ../canaryd.log/s.db\n",
            &[],
            format!(
                "error: state in the config file {shown}: cannot open the state store {}: {} is \
                 not a directory",
                dir.path().join("conf/../canaryd.log/s.db").display(),
                dir.path().join("conf/../canaryd.log").display()
            ),
        ),
        (
            "policies: ../policies\napi_token_file: token\n",
            &["--state", "s.db"],
            format!(
                "error: api_token_file in the config file {shown}: cannot read the API token \
                 file {}",
                dir.path().join("conf/token").display()
            ),
        ),
        (
            "policies: ../policies\n",
            &["--policies", "missing"],
            "error: --policies (or CANARYD_POLICIES): the policies directory missing does not \
             exist"
                .to_owned(),
        ),
    ];
    for (text, flags, want) in cases {
        std::fs::write(&config, text).unwrap();
        let mut args = vec!["--config", config.to_str().unwrap()];
        args.extend_from_slice(flags);
        let (code, err) = run_expecting_failure(dir.path(), &args).await;
        assert_eq!(code, Some(2), "{err}");
        assert!(err.starts_with(&want), "{want}\nnot at the start of: {err}");
        assert!(!err.contains("give --policies"), "{err}");
    }
}

/// Regression: `--state ./token/x.db` with `./token` a file said that the directory did not
/// exist.
#[tokio::test]
async fn run_with_a_file_in_the_state_path_says_it_is_not_a_directory() {
    let dir = setup(POLICY);
    let file = dir.path().join("token");
    std::fs::write(&file, "secret\n").unwrap();
    for state in [file.join("s.db"), file.join("deeper/s.db")] {
        let (code, err) =
            run_daemon_expecting_failure(dir.path(), &["--state", state.to_str().unwrap()]).await;
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.trim().starts_with(&format!(
                "error: --state (or CANARYD_STATE): cannot open the state store {}: {} is not a \
                 directory",
                state.display(),
                file.display()
            )),
            "{err}"
        );
    }
}

/// The real `canaryd run` on `dir`'s policies and a SQLite state there, its log in `log`, with
/// Prometheus a closed port (a start needs only the router).
fn spawn_logging_daemon(dir: &Path, log: &Path) -> tokio::process::Child {
    let prometheus = format!("http://127.0.0.1:{}", crate::support::free_port());
    tokio::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--prometheus",
            &prometheus,
        ])
        .arg("--policies")
        .arg(dir.join("policies"))
        .arg("--state")
        .arg(dir.join("s.db"))
        .current_dir(dir)
        .env_remove("CANARYD_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The real daemon's log, through a pipe: plain text, and an automatic decision (the start,
/// which needs only the router; Prometheus is a closed port) names nobody.
#[tokio::test]
async fn the_log_is_plain_text_and_automatic_decisions_name_nobody() {
    let dir = setup(&process_policy().replace("/dev/null", "weights.json"));
    let log = dir.path().join("canaryd.log");
    let mut child = spawn_logging_daemon(dir.path(), &log);
    let text = wait_for("the start decision", Duration::from_secs(15), || async {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("action=\"start\"").then_some(text)
    })
    .await;
    child.kill().await.unwrap();
    assert!(text.contains("canaryd running"), "{text}");
    assert!(!text.contains('\x1b'), "escape codes in the log: {text:?}");
    let start = text
        .lines()
        .find(|l| l.contains("action=\"start\""))
        .unwrap();
    assert!(!start.contains("who="), "{start}");
}

#[test]
fn operator_commands_say_where_the_token_comes_from() {
    for command in ["promote", "abort", "pause", "resume", "retry"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
            .args([command, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            help.contains("CANARYD_API_TOKEN environment variable"),
            "{command} --help: {help}"
        );
    }
}

/// After a restart (or on the replica that took over) the API shows each rollout's last
/// decision from the store at once, even for a rollout that decides nothing new.
#[tokio::test]
async fn a_restarted_daemon_shows_the_stored_last_decision() {
    let dir = setup(POLICY);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router.clone(), source.clone(), None).await;
    d.wait_phase("demo", "promoted").await;
    let (_, log) = d.get("/api/v1/rollouts/demo/decisions?limit=1").await;
    let newest = log["decisions"][0].clone();
    d.stop().await;

    let d = Daemon::start(dir.path(), router, source, None).await;
    let (_, list) = d.get("/api/v1/rollouts").await;
    let last = &list["rollouts"][0]["last_decision"];
    // The stored one, or (if the daemon decided since) a newer one: never none.
    assert!(
        last["id"]
            .as_i64()
            .is_some_and(|id| Some(id) >= newest["id"].as_i64()),
        "{list} after {newest}"
    );
    assert!(
        last["action"].is_string() && last["reason"].is_string(),
        "{list}"
    );
    d.stop().await;
}

/// A rollout whose stored state cannot be read is not started over (that could move traffic
/// the old state had settled): the API says why, and the daemon tries again at every scan, so
/// the rollout runs as soon as the state is readable (for etcd: reachable) again.
#[tokio::test]
async fn an_unreadable_stored_state_is_reported_and_retried() {
    let dir = setup(POLICY);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router.clone(), source.clone(), None).await;
    d.wait_phase("demo", "promoted").await;
    d.stop().await;
    let db = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
    let good: String = db
        .query_row("SELECT state FROM rollouts WHERE name = 'demo'", [], |r| {
            r.get(0)
        })
        .unwrap();
    db.execute(
        "UPDATE rollouts SET state = '{not json' WHERE name = 'demo'",
        [],
    )
    .unwrap();

    let d = Daemon::start(dir.path(), router, source, None).await;
    wait_for(
        "the unreadable state reported",
        Duration::from_secs(10),
        || async {
            let (_, v) = d.get("/api/v1/rollouts").await;
            v["invalid_policies"]
                .to_string()
                .contains("its stored state cannot be read")
                .then_some(())
        },
    )
    .await;
    assert_eq!(d.get("/api/v1/rollouts/demo").await.0, 404);
    // Readable again: the next scan starts it where it was.
    db.execute(
        "UPDATE rollouts SET state = ?1 WHERE name = 'demo'",
        rusqlite::params![good],
    )
    .unwrap();
    let v = d.wait_phase("demo", "promoted").await;
    assert_eq!(v["phase"], "promoted");
    d.assert_no_invalid_policies().await;
    d.stop().await;
}

/// An abort settles as soon as the router confirms it, not an interval later, so a `retry`
/// right after it is accepted.
#[tokio::test]
async fn retry_right_after_an_abort_is_accepted() {
    let slow = POLICY.replace("interval: 50ms", "interval: 1h");
    let dir = setup(&slow);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    d.wait_phase("demo", "progressing").await;
    let (status, body) = d.post("/api/v1/rollouts/demo/abort", None, "{}").await;
    assert_eq!(status, 200, "{body}");
    d.wait_phase_for("demo", "rolled-back", Duration::from_secs(10))
        .await;
    let (status, body) = d.post("/api/v1/rollouts/demo/retry", None, "{}").await;
    assert_eq!(status, 200, "{body}");
    d.stop().await;
}

/// A policy edited to another router mid-rollout: the old router sends all traffic to stable
/// (nobody drives it any more), and the new one takes the rollout's weight.
#[tokio::test]
async fn a_rollout_moved_to_another_router_leaves_the_old_one_on_stable() {
    let dir = policies_dir();
    let (old, new) = (dir.path().join("old.json"), dir.path().join("new.json"));
    let policy = |path: &Path| {
        held_policy().replace(
            "file: {path: /dev/null}",
            &format!("file: {{path: '{}'}}", path.display()),
        )
    };
    let file = dir.path().join("policies/demo.yaml");
    std::fs::write(&file, policy(&old)).unwrap();
    let (_, source) = fakes(Mode::Good);
    let (_, sources) = factories(&FakeRouter::default(), &source);
    let d = Daemon::start_real(dir.path(), sources).await;
    let canary = |path: &Path| -> Option<f64> {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        doc["weights"]["v2"].as_f64()
    };
    wait_for("10% on the old router", Duration::from_secs(10), || async {
        (canary(&old) == Some(10.0)).then_some(())
    })
    .await;
    std::fs::write(&file, policy(&new)).unwrap();
    wait_for("10% on the new router", Duration::from_secs(10), || async {
        (canary(&new) == Some(10.0)).then_some(())
    })
    .await;
    assert_eq!(
        canary(&old),
        Some(0.0),
        "the old router sends all to stable"
    );
    let (_, v) = d.get("/api/v1/rollouts/demo").await;
    assert_eq!(v["phase"], "progressing", "{v}");
    d.stop().await;

    // The same edit while the daemon is down: the restarted daemon releases the router the
    // traffic was last set on.
    let (third, sources) = (dir.path().join("third.json"), sources_of(&source));
    std::fs::write(&file, policy(&third)).unwrap();
    let d = Daemon::start_real(dir.path(), sources).await;
    wait_for(
        "10% on the third router",
        Duration::from_secs(10),
        || async { (canary(&third) == Some(10.0)).then_some(()) },
    )
    .await;
    assert_eq!(
        canary(&new),
        Some(0.0),
        "the router from before the restart sends all to stable"
    );
    let (_, v) = d.get("/api/v1/rollouts/demo").await;
    assert!(v["state"].get("router").is_none(), "{v}");
    d.stop().await;
}

/// An edit of a router's settings that keeps its traffic where it is (here a webhook's
/// timeout) is no move to another router: the rollout's canary never drops to 0 % on the way,
/// neither live nor when the daemon restarts after the edit.
#[tokio::test]
async fn a_router_settings_edit_keeps_the_canary_weight() {
    let posts = crate::router_webhook::Posts::default();
    let hook = crate::router_webhook::serve(posts.clone()).await;
    let dir = policies_dir();
    let policy = |timeout: &str| {
        held_policy().replace(
            "file: {path: /dev/null}",
            &format!("webhook: {{url: '{hook}/weights', timeout: {timeout}}}"),
        )
    };
    let file = dir.path().join("policies/demo.yaml");
    std::fs::write(&file, policy("2s")).unwrap();
    let (_, source) = fakes(Mode::Good);
    let canary = |p: &Value| p["weights"]["v2"].as_f64();
    let posted = || posts.lock().unwrap().iter().map(canary).collect::<Vec<_>>();
    // A few analyses after the edit was taken: a release of the router would come before them.
    let analysed_after_edit = async |d: &Daemon, steps: Value| {
        let v = wait_for("the edit taken", Duration::from_secs(10), || async {
            let (_, v) = d.get("/api/v1/rollouts/demo").await;
            (v["steps"] == steps).then_some(v)
        })
        .await;
        let n = v["state"]["analyses"].as_u64().unwrap();
        wait_for(
            "analyses after the edit",
            Duration::from_secs(10),
            || async {
                let (_, v) = d.get("/api/v1/rollouts/demo").await;
                (v["state"]["analyses"].as_u64() >= Some(n + 3)).then_some(())
            },
        )
        .await;
    };
    let d = Daemon::start_real(dir.path(), sources_of(&source)).await;
    wait_for("10% posted", Duration::from_secs(10), || async {
        posted().contains(&Some(10.0)).then_some(())
    })
    .await;
    // The last live edit is a sane timeout: the router stored before the restart must work.
    for (timeout, last) in [("1500us", 60), ("3s", 70)] {
        let edited = policy(timeout).replace("steps: [10, 50]", &format!("steps: [10, {last}]"));
        std::fs::write(&file, edited).unwrap();
        analysed_after_edit(&d, serde_json::json!([10.0, f64::from(last)])).await;
    }
    d.stop().await;
    std::fs::write(&file, policy("4s")).unwrap();
    let d = Daemon::start_real(dir.path(), sources_of(&source)).await;
    analysed_after_edit(&d, serde_json::json!([10.0, 50.0])).await;
    let (_, v) = d.get("/api/v1/rollouts/demo").await;
    assert_eq!(v["phase"], "progressing", "{v}");
    d.stop().await;
    let all = posted();
    assert!(
        all.contains(&Some(10.0)) && !all.contains(&Some(0.0)),
        "{all:?}"
    );
}

fn sources_of(source: &FakeSource) -> canaryd::controller::SourceFactory {
    factories(&FakeRouter::default(), source).1
}

/// Regression (UAT): after an edit moved a rollout from the file router to HAProxy, the API
/// and `canaryd status` still said `"router": "file"` while traffic (and /metrics) had moved.
/// Every field of the view that comes from the policy follows the edit.
#[tokio::test]
async fn the_view_shows_the_router_an_edit_moved_the_rollout_to() {
    let policy = held_policy();
    let dir = setup(&policy);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    let v = d.wait_phase("demo", "progressing").await;
    assert_eq!(v["router"], "file", "{v}");
    let edited = policy.replace("steps: [10, 50]", "steps: [10, 60]").replace(
        "  file: {path: /dev/null}",
        "  haproxy:\n    socket: 127.0.0.1:9999\n    backend: demo\n    servers: {v1: a, v2: b}",
    );
    std::fs::write(dir.path().join("policies/demo.yaml"), edited).unwrap();
    // The edited steps show that the edit has been taken.
    let v = wait_for("the edit taken", Duration::from_secs(10), || async {
        let (_, v) = d.get("/api/v1/rollouts/demo").await;
        (v["steps"] == serde_json::json!([10.0, 60.0])).then_some(v)
    })
    .await;
    assert_eq!(v["router"], "haproxy", "{v}");
    let (_, log) = d.get("/api/v1/rollouts/demo/decisions").await;
    let status = canaryd::client::timeline(&v, &log);
    assert!(status.contains("haproxy router]"), "{status}");
    d.stop().await;
}

/// A source that holds one rollout's observations until `open` turns true, so that a test can
/// act while that rollout's task is in the middle of a tick. `alive` counts the sources of that
/// rollout that still exist: its task's, and the factory's template.
#[derive(Clone)]
struct HeldSource {
    inner: FakeSource,
    open: tokio::sync::watch::Receiver<bool>,
    /// Observations of the held rollout begun so far.
    entered: Arc<std::sync::atomic::AtomicUsize>,
    _alive: Arc<()>,
}

impl MetricSource for HeldSource {
    fn observe<'a>(
        &'a self,
        policy: &'a Policy,
        w: Window,
    ) -> BoxFuture<'a, BTreeMap<String, MetricReading>> {
        Box::pin(async move {
            self.entered
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut open = self.open.clone();
            let _ = open.wait_for(|o| *o).await;
            self.inner.observe(policy, w).await
        })
    }
}

/// UAT: with Prometheus hung, an operator's abort waited for the analysis under way (20 s;
/// up to the 30 s an action waits). A command interrupts an analysis that is still asking its
/// source, which has changed nothing yet.
#[tokio::test]
async fn an_abort_does_not_wait_for_an_analysis_stuck_on_its_source() {
    let dir = setup(&held_policy());
    let (d, open) = stuck_in_an_analysis(dir.path()).await;
    let (status, body) = d.post("/api/v1/rollouts/demo/abort", None, "{}").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(*d.router.weight.lock().unwrap(), 0.0);
    d.wait_phase("demo", "rolled-back").await;
    let _ = open.send(true);
    d.stop().await;
}

/// Review: a policy file deleted while an analysis waited on Prometheus stopped the rollout
/// only after that analysis, which could still advance it. The deletion cuts it short.
#[tokio::test]
async fn a_deleted_policy_stops_an_analysis_stuck_on_its_source() {
    let dir = setup(POLICY);
    let (d, open) = stuck_in_an_analysis(dir.path()).await;
    std::fs::remove_file(dir.path().join("policies/demo.yaml")).unwrap();
    d.wait_stopped("demo").await;
    let _ = open.send(true);
    let (_, v) = d.get("/api/v1/rollouts/demo").await;
    assert_eq!(v["weight"], 10.0, "{v}");
    assert_eq!(*d.router.weight.lock().unwrap(), 10.0);
    d.stop().await;
}

/// A daemon whose rollout `demo` is progressing at its first step and in the middle of an
/// analysis that waits on its source until the sender says `true`.
async fn stuck_in_an_analysis(dir: &Path) -> (Daemon, tokio::sync::watch::Sender<bool>) {
    let (open_tx, open) = tokio::sync::watch::channel(true);
    let held = HeldSource {
        inner: fakes(Mode::Good).1,
        open,
        entered: Arc::default(),
        _alive: Arc::new(()),
    };
    let entered = held.entered.clone();
    let d = Daemon::start_sourced(
        dir,
        Arc::new(move |_| Arc::new(held.clone()) as Arc<dyn MetricSource>),
    )
    .await;
    d.wait_phase("demo", "progressing").await;
    wait_for("10% applied", Duration::from_secs(10), || async {
        (*d.router.weight.lock().unwrap() == 10.0).then_some(())
    })
    .await;
    open_tx.send(false).unwrap();
    let before = entered.load(std::sync::atomic::Ordering::SeqCst);
    wait_for(
        "an analysis stuck on its source",
        Duration::from_secs(10),
        || async { (entered.load(std::sync::atomic::Ordering::SeqCst) > before).then_some(()) },
    )
    .await;
    (d, open_tx)
}

/// Regression (UAT): `search` renamed to `search2` and back to `search` left a ghost `search2`
/// (idle, "the router is failing") in the API and `canaryd status` until a restart. The
/// `search2` task was stopped in the middle of a tick and published its view after the scan
/// had removed it. A renamed rollout whose router the new name takes must go away.
#[tokio::test]
async fn a_policy_renamed_and_renamed_back_leaves_no_ghost_of_the_other_name() {
    let policy = held_policy().replace("name: demo", "name: search");
    let dir = policies_dir();
    let file = dir.path().join("policies/search.yaml");
    std::fs::write(&file, &policy).unwrap();
    let (router, source) = fakes(Mode::Good);
    let (open_tx, open) = tokio::sync::watch::channel(false);
    let alive = Arc::new(());
    let held = HeldSource {
        inner: source.clone(),
        open,
        entered: Arc::default(),
        _alive: alive.clone(),
    };
    let entered = held.entered.clone();
    // This test's handle and the factory's template.
    let unused = Arc::strong_count(&alive);
    let plain = source.clone();
    let sources: canaryd::controller::SourceFactory = Arc::new(move |p| {
        if p.name == "search2" {
            Arc::new(held.clone()) as Arc<dyn MetricSource>
        } else {
            Arc::new(plain.clone()) as Arc<dyn MetricSource>
        }
    });
    let (routers, _) = factories(&router, &source);
    let d = Daemon::start_with(
        dir.path(),
        router,
        source,
        None,
        routers,
        sources,
        test_limits(),
        false,
    )
    .await;
    d.wait_phase("search", "progressing").await;

    std::fs::write(&file, policy.replace("name: search", "name: search2")).unwrap();
    wait_for(
        "search2's task in the middle of a tick",
        Duration::from_secs(10),
        || async { (entered.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(()) },
    )
    .await;
    std::fs::write(&file, &policy).unwrap();
    // search2 stops, and hands the router back to search once its tick ends (now); then its
    // task ends, and search resumes.
    open_tx.send(true).unwrap();
    wait_for("search2's task to end", Duration::from_secs(10), || async {
        (Arc::strong_count(&alive) == unused).then_some(())
    })
    .await;
    d.wait_phase("search", "progressing").await;
    let list = wait_for("search2 to be gone", Duration::from_secs(5), || async {
        let (_, list) = d.get("/api/v1/rollouts").await;
        let names: Vec<&str> = list["rollouts"]
            .as_array()?
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        (names == ["search"]).then_some(list.clone())
    })
    .await;
    assert_eq!(list["invalid_policies"], serde_json::json!([]), "{list}");
    assert_eq!(d.get("/api/v1/rollouts/search2").await.0, 404);
    d.stop().await;
}

/// Regression (UAT): a deleted policy's rollout vanished from the API and `canaryd status`
/// although its router may still send the canary its share (deleting a policy stops the rollout
/// without touching traffic). It stays listed, stopped, saying where traffic was left, until
/// the policy comes back and it resumes.
#[tokio::test]
async fn a_deleted_policy_stays_listed_as_stopped_with_its_traffic_until_it_returns() {
    let policy = held_policy();
    let dir = setup(&policy);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    d.wait_phase("demo", "progressing").await;
    let file = dir.path().join("policies/demo.yaml");
    std::fs::remove_file(&file).unwrap();
    let v = d.wait_stopped("demo").await;
    assert_eq!(v["phase"], "progressing", "{v}");
    let note = v["policy_error"].as_str().unwrap_or_default();
    assert!(
        note.contains(&format!("policy file {} deleted", file.display()))
            && note.contains("rollout stopped, traffic left at 10%"),
        "{v}"
    );
    assert_eq!(*d.router.weight.lock().unwrap(), 10.0, "traffic untouched");
    // Its series stay too, as the API keeps it (regression, UAT: they were dropped).
    assert_series_at_first_step(&d).await;
    // `canaryd status` shows it, as a stopped rollout rather than a rejected edit.
    let (_, list) = d.get("/api/v1/rollouts").await;
    let table = canaryd::client::table(&list);
    assert!(
        table.contains("rollout stopped, traffic left at 10%")
            && !table.contains("policy edit rejected"),
        "{table}"
    );
    // Nothing drives it: operator actions are refused with the reason.
    let refused = d.refused("demo", "pause").await;
    assert!(refused.contains("deleted"), "{refused}");
    // The policy comes back, under another file name: the rollout resumes where it was.
    let back = dir.path().join("policies/demo-back.yaml");
    std::fs::write(&back, &policy).unwrap();
    let v = wait_for("the rollout resumed", Duration::from_secs(10), || async {
        let (s, v) = d.get("/api/v1/rollouts/demo").await;
        (s == 200 && v["stopped"] == false && v["policy_error"].is_null()).then_some(v)
    })
    .await;
    assert_eq!(v["phase"], "progressing", "{v}");
    assert_eq!(v["step"], 1, "{v}");
    assert_eq!(v["file"], back.display().to_string(), "{v}");
    d.assert_no_invalid_policies().await;
    d.stop().await;
}

/// Regression (review): a deleted policy's rollout refused `abort` ("nothing runs it"), so the
/// canary kept its share with no way back but restoring the file, against "rollback stays
/// reachable from every state". Its task now stays to serve `abort` with the router it last
/// had, and hands that router over when another policy takes it (UAT: the file router then
/// still named the old rollout, and the new one could not read it). Real file router.
#[tokio::test]
async fn a_deleted_policys_rollout_can_still_be_aborted_until_another_takes_its_router() {
    let dir = policies_dir();
    let weights = dir.path().join("weights.json");
    let policy = file_routed(&held_policy(), &weights);
    std::fs::write(policy_file(&dir, "demo"), &policy).unwrap();
    let d = Daemon::start_file_routed(dir.path()).await;
    let read = || read_json(&weights);
    d.wait_phase("demo", "progressing").await;
    std::fs::remove_file(policy_file(&dir, "demo")).unwrap();
    let v = d.wait_stopped("demo").await;
    let note = v["policy_error"].as_str().unwrap_or_default();
    assert!(note.contains("`canaryd abort` still rolls it back"), "{v}");
    assert_eq!(read()["weights"]["v2"], 10.0, "traffic untouched");
    let (status, body) = d
        .post(
            "/api/v1/rollouts/demo/abort",
            None,
            r#"{"who": "ops", "reason": "file gone"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["action"], "rollback", "{body}");
    assert_eq!(body["who"], "ops", "{body}");
    let v = d.wait_phase("demo", "rolled-back").await;
    assert_eq!(read()["weights"]["v2"], 0.0, "the router took the rollback");
    assert_eq!(v["stopped"], true, "{v}");
    let note = v["policy_error"].as_str().unwrap_or_default();
    assert!(
        note.contains("traffic left at 0%")
            && note.contains("`canaryd retry` to run it again")
            && !note.contains("abort"),
        "{v}"
    );

    // Another rollout on the same weights file: the stopped one hands the file over and ends,
    // and the new one starts from it.
    std::fs::write(policy_file(&dir, "demo"), &policy).unwrap();
    wait_for("demo back", Duration::from_secs(10), || async {
        let (_, v) = d.get("/api/v1/rollouts/demo").await;
        (v["stopped"] == false).then_some(())
    })
    .await;
    let (status, body) = d.post("/api/v1/rollouts/demo/retry", None, "{}").await;
    assert_eq!(status, 200, "{body}");
    wait_for("demo at 10 % again", Duration::from_secs(10), || async {
        (read()["weights"]["v2"] == 10.0).then_some(())
    })
    .await;
    std::fs::remove_file(policy_file(&dir, "demo")).unwrap();
    d.wait_stopped("demo").await;
    let other = policy
        .replace("name: demo", "name: other")
        .replace("canary: v2", "canary: v3");
    std::fs::write(policy_file(&dir, "other"), other).unwrap();
    d.wait_phase("other", "progressing").await;
    let doc = read();
    assert_eq!(doc["rollout"], "other", "{doc}");
    assert_eq!(doc["weights"]["v3"], 10.0, "{doc}");
    assert!(
        doc["weights"].get("v2").is_none(),
        "the old canary gets nothing: {doc}"
    );
    wait_for(
        "the stopped rollout gone",
        Duration::from_secs(10),
        || async { (d.get("/api/v1/rollouts/demo").await.0 == 404).then_some(()) },
    )
    .await;
    d.assert_no_invalid_policies().await;
    d.stop().await;
}

/// Review: a running policy edited onto the router of a deleted policy's rollout lost its
/// file's entry while the stopped rollout handed the router over, and was then refused as a
/// clash with its own rollout, for good. It now takes the router over and runs on.
#[tokio::test]
async fn a_running_policy_edited_onto_a_stopped_rollouts_router_takes_it_over() {
    let dir = policies_dir();
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    std::fs::write(policy_file(&dir, "x"), named_on("x", "v2", &a)).unwrap();
    std::fs::write(policy_file(&dir, "y"), named_on("y", "v3", &b)).unwrap();
    let d = Daemon::start_file_routed(dir.path()).await;
    d.wait_phase("x", "progressing").await;
    d.wait_phase("y", "progressing").await;
    std::fs::remove_file(policy_file(&dir, "x")).unwrap();
    d.wait_stopped("x").await;
    std::fs::write(policy_file(&dir, "y"), named_on("y", "v3", &a)).unwrap();
    let doc = wait_for("y on a.json", Duration::from_secs(10), || async {
        let doc = read_json(&a);
        (doc["rollout"] == "y" && doc["weights"]["v3"] == 10.0).then_some(doc)
    })
    .await;
    assert!(doc["weights"].get("v2").is_none(), "{doc}");
    wait_for("x gone", Duration::from_secs(10), || async {
        (d.get("/api/v1/rollouts/x").await.0 == 404).then_some(())
    })
    .await;
    // v3 at 10 % on a.json is y's own write, after it loaded its edit: refused by nothing.
    d.assert_no_invalid_policies().await;
    let (_, v) = d.get("/api/v1/rollouts/y").await;
    assert!(v["policy_error"].is_null(), "{v}");
    assert_eq!(v["phase"], "progressing", "{v}");
    d.stop().await;
}

/// Regression (UAT): `canaryd status nd` answered `no rollout named "nd"` for a policy that was
/// invalid from the start; it points to the policy's error instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_rollout_whose_policy_is_invalid_shows_the_policy_error() {
    let dir = policies_dir();
    let file = dir.path().join("policies/nd.yaml");
    std::fs::write(
        &file,
        POLICY
            .replace("name: demo", "name: nd")
            .replace("failure_limit", "failure_limt"),
    )
    .unwrap();
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    let (_, list) = wait_for("the invalid policy", Duration::from_secs(10), || async {
        let (s, v) = d.get("/api/v1/rollouts").await;
        (v["invalid_policies"].as_array()?.len() == 1).then_some((s, v))
    })
    .await;
    assert_eq!(list["invalid_policies"][0]["name"], "nd", "{list}");
    let (status, body) = d.get("/api/v1/rollouts/nd").await;
    assert_eq!(status, 404, "{body}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args(["status", "nd", "--server", &d.url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rollout \"nd\" is not running")
            && err.contains(&format!("{}:", file.display()))
            && err.contains("failure_limt"),
        "{err}"
    );
    d.stop().await;
}

/// Regression (UAT): fraud-a (v1 → v2) and fraud-b (v1 → v3) on one HAProxy backend flipped
/// its weights every 2 s, both reported healthy. The second policy on a router target is
/// refused like a second file with a taken name, and the first keeps running.
#[tokio::test]
async fn a_second_policy_on_a_router_target_is_refused_and_the_first_keeps_running() {
    let haproxy = |name: &str, canary: &str, socket: &str, backend: &str| {
        held_policy()
            .replace("name: demo", &format!("name: {name}"))
            .replace("canary: v2", &format!("canary: {canary}"))
            .replace(
                "  file: {path: /dev/null}",
                &format!(
                    "  haproxy:\n    socket: {socket}\n    backend: {backend}\n    servers: {{v1: a, v2: b, v3: c}}"
                ),
            )
    };
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let a = haproxy("fraud-a", "v2", "127.0.0.1:9999", "fraud");
    // The same HAProxy, written another way.
    let b = haproxy("fraud-b", "v3", "tcp://127.0.0.1:9999", "fraud");
    std::fs::write(policies.join("fraud-a.yaml"), &a).unwrap();
    std::fs::write(policies.join("fraud-b.yaml"), &b).unwrap();
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    d.wait_phase("fraud-a", "progressing").await;
    let backend_line = b.lines().position(|l| l.contains("backend:")).unwrap() + 1;
    let expected = format!(
        "{}:{backend_line}:14: router.haproxy.backend: ",
        policies.join("fraud-b.yaml").display()
    );
    let first = policies.join("fraud-a.yaml").display().to_string();
    let shown = wait_for("fraud-b refused", Duration::from_secs(10), || async {
        let (_, v) = d.get("/api/v1/rollouts").await;
        let shown = v["invalid_policies"][0]["error"].as_str()?.to_owned();
        shown.contains(&expected).then_some(shown)
    })
    .await;
    assert!(shown.contains(&first), "{shown}");
    assert_eq!(d.get("/api/v1/rollouts/fraud-b").await.0, 404);
    // Its own backend: it runs.
    let own = b.replace("backend: fraud", "backend: fraud-b");
    std::fs::write(policies.join("fraud-b.yaml"), &own).unwrap();
    d.wait_phase("fraud-b", "progressing").await;
    d.assert_no_invalid_policies().await;
    // An edit onto fraud-a's backend is refused; the last good version keeps running.
    std::fs::write(policies.join("fraud-b.yaml"), &b).unwrap();
    let v = wait_for("the edit refused", Duration::from_secs(10), || async {
        let (_, v) = d.get("/api/v1/rollouts/fraud-b").await;
        v["policy_error"]
            .as_str()
            .is_some_and(|e| e.contains(&expected))
            .then_some(v)
    })
    .await;
    assert_eq!(v["phase"], "progressing", "{v}");
    let (_, a_view) = d.get("/api/v1/rollouts/fraud-a").await;
    assert_eq!(a_view["phase"], "progressing", "{a_view}");
    assert!(a_view["policy_error"].is_null(), "{a_view}");
    d.stop().await;
}

/// The daemon's /metrics text.
async fn metrics_text(d: &Daemon) -> String {
    reqwest::get(format!("{}/metrics", d.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Regression (UAT): `canaryd_policy_invalid` counts running rollouts only, so new policy files
/// that were broken or refused (listed under `invalid_policies`) showed nowhere in /metrics.
/// `canaryd_invalid_policy_files` counts every file that list holds.
#[tokio::test]
async fn every_invalid_or_refused_policy_file_is_counted_in_the_metrics() {
    let policy = held_policy();
    let dir = setup(&policy);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    d.wait_phase("demo", "progressing").await;
    assert!(
        metrics_text(&d)
            .await
            .contains("\ncanaryd_invalid_policy_files 0\n")
    );
    let policies = dir.path().join("policies");
    // A YAML error, an unknown key, and a second file for the running rollout's name.
    std::fs::write(policies.join("broken.yaml"), "name: broken\nstable: [\n").unwrap();
    std::fs::write(
        policies.join("typo.yaml"),
        policy
            .replace("name: demo", "name: typo")
            .replace("failure_limit", "failure_limt"),
    )
    .unwrap();
    std::fs::write(policies.join("twin.yaml"), &policy).unwrap();
    wait_for("three files counted", Duration::from_secs(10), || async {
        metrics_text(&d)
            .await
            .contains("\ncanaryd_invalid_policy_files 3\n")
            .then_some(())
    })
    .await;
    let (_, list) = d.get("/api/v1/rollouts").await;
    assert_eq!(list["invalid_policies"].as_array().map(Vec::len), Some(3));
    // A bad edit of the running rollout is one more file in the list, as in the metric.
    std::fs::write(
        policies.join("demo.yaml"),
        policy.replace("failure_limit", "failure_limt"),
    )
    .unwrap();
    wait_for("four files counted", Duration::from_secs(10), || async {
        metrics_text(&d)
            .await
            .contains("\ncanaryd_invalid_policy_files 4\n")
            .then_some(())
    })
    .await;
    for f in ["broken.yaml", "typo.yaml", "twin.yaml"] {
        std::fs::remove_file(policies.join(f)).unwrap();
    }
    std::fs::write(policies.join("demo.yaml"), &policy).unwrap();
    wait_for("none counted", Duration::from_secs(10), || async {
        metrics_text(&d)
            .await
            .contains("\ncanaryd_invalid_policy_files 0\n")
            .then_some(())
    })
    .await;
    d.stop().await;
}

/// A deleted policy file whose last edit was refused is not invalid any more: nothing lists it
/// under `invalid_policies`, and `canaryd_policy_invalid` goes back to 0 rather than stay at 1
/// (and keep `CanarydPolicyInvalid`'s old form firing) until the file returns.
#[tokio::test]
async fn a_deleted_policy_whose_edit_was_refused_is_not_counted_invalid() {
    let policy = held_policy();
    let dir = setup(&policy);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    d.wait_phase("demo", "progressing").await;
    let file = dir.path().join("policies/demo.yaml");
    std::fs::write(&file, policy.replace("failure_limit", "failure_limt")).unwrap();
    let invalid = "canaryd_policy_invalid{rollout=\"demo\"}";
    wait_for("the edit refused", Duration::from_secs(10), || async {
        metrics_text(&d)
            .await
            .contains(&format!("{invalid} 1"))
            .then_some(())
    })
    .await;
    std::fs::remove_file(&file).unwrap();
    d.wait_stopped("demo").await;
    let m = metrics_text(&d).await;
    assert!(m.contains(&format!("{invalid} 0")), "{m}");
    assert!(m.contains("\ncanaryd_invalid_policy_files 0\n"), "{m}");
    d.stop().await;
}

/// Regression (UAT): `canaryd_decisions_total{action="reject"}` stayed at 0: a refused
/// operator action returned before it was counted. It stays out of the decision log (on
/// purpose) but is counted.
#[tokio::test]
async fn a_refused_action_is_counted_but_kept_out_of_the_decision_log() {
    let policy = held_policy();
    let dir = setup(&policy);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    d.wait_phase("demo", "progressing").await;
    let (status, body) = d.post("/api/v1/rollouts/demo/resume", None, "{}").await;
    assert_eq!(status, 409, "{body}");
    let m = metrics_text(&d).await;
    assert!(
        m.contains("canaryd_decisions_total{action=\"reject\",rollout=\"demo\"} 1"),
        "{m}"
    );
    let (_, log) = d.get("/api/v1/rollouts/demo/decisions?limit=500").await;
    assert!(
        log["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["action"] != "reject"),
        "{log}"
    );
    d.stop().await;
}

/// Regression (UAT): after an edit of `steps` the weight went from 60% to 20% with a `hold`
/// decision, and the log said nothing: only non-hold decisions were logged. Every decision that
/// moves traffic is (Prometheus is a closed port here, so the rollout holds at its first step).
#[tokio::test]
async fn a_hold_that_moves_traffic_is_logged() {
    let dir = setup(&process_policy().replace("/dev/null", "weights.json"));
    let log = dir.path().join("canaryd.log");
    let mut child = spawn_logging_daemon(dir.path(), &log);
    wait_for("the start decision", Duration::from_secs(15), || async {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("action=\"start\"").then_some(())
    })
    .await;
    std::fs::write(
        dir.path().join("policies/demo.yaml"),
        process_policy()
            .replace("/dev/null", "weights.json")
            .replace("steps: [10, 50]", "steps: [5, 50]"),
    )
    .unwrap();
    let weights = dir.path().join("weights.json");
    wait_for(
        "the weight brought down",
        Duration::from_secs(15),
        || async {
            let doc: Value = serde_json::from_str(&std::fs::read_to_string(&weights).ok()?).ok()?;
            (doc["weights"]["v2"].as_f64() == Some(5.0)).then_some(())
        },
    )
    .await;
    // The decision is logged before the router hears of it.
    let text = std::fs::read_to_string(&log).unwrap();
    child.kill().await.unwrap();
    let hold = text
        .lines()
        .find(|l| l.contains("action=\"hold\"") && l.contains("the policy's steps changed"));
    assert!(hold.is_some(), "{text}");
    assert!(hold.unwrap().contains("weight=5"), "{text}");
}

/// An alert webhook that is briefly unavailable (503) gets the event again.
#[tokio::test]
async fn an_alert_webhook_that_answers_503_gets_the_event_again() {
    let answer = Arc::new(Mutex::new(503));
    let (url, seen) = hooks(answer.clone()).await;
    let policy = POLICY.replace(
        "router:",
        &format!("webhooks:\n  - {{on: rollout, url: '{url}/rollout'}}\nrouter:"),
    );
    let dir = setup(&policy);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router, source, None).await;
    let rollouts = || {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "rollout")
            .count()
    };
    wait_for("the first delivery", Duration::from_secs(10), || async {
        (rollouts() >= 1).then_some(())
    })
    .await;
    *answer.lock().unwrap() = 200;
    wait_for("the event sent again", Duration::from_secs(10), || async {
        (rollouts() >= 2).then_some(())
    })
    .await;
    d.stop().await;
}

#[tokio::test]
async fn a_dry_run_leaves_the_router_and_the_state_file_alone() {
    // Regression: a dry run recorded its made-up progress in the state file, and the next
    // real daemon resumed it and sent the dry run's 100% to the router at once.
    let dir = setup(POLICY);
    let (router, source) = fakes(Mode::Good);
    *router.weight.lock().unwrap() = 30.0;
    let d = Daemon::start_dry(dir.path(), router.clone(), source.clone()).await;
    let v = d.wait_phase("demo", "promoted").await;
    assert_eq!(v["dry_run"], true, "{v}");
    assert_eq!(v["weight"], 100.0, "{v}");
    // The router is read, so the view shows where traffic really is, and that the router
    // cannot be read once it fails.
    assert_eq!(v["router_weight"], 30.0, "{v}");
    // Its start said where the router already sent traffic, as a real start would.
    let (_, log) = d.get("/api/v1/rollouts/demo/decisions?limit=500").await;
    let start = log["decisions"]
        .as_array()
        .and_then(|l| l.iter().find(|r| r["action"] == "start"))
        .cloned()
        .unwrap_or_default();
    assert!(
        start["reason"].as_str().unwrap_or_default().contains("30%"),
        "{start}"
    );
    *router.failing.lock().unwrap() = true;
    d.wait_text("demo", "router_error", "fake router is down")
        .await;
    *router.failing.lock().unwrap() = false;
    d.stop().await;
    assert!(
        router.applied.lock().unwrap().is_empty(),
        "a dry run changed the router"
    );
    assert!(
        !dir.path().join("state.db").exists(),
        "a dry run wrote the state file"
    );
    // A real daemon then starts the rollout from its first step.
    let d = Daemon::start(dir.path(), router.clone(), source, None).await;
    wait_for("a weight applied", Duration::from_secs(10), || async {
        (!router.applied.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    assert_eq!(router.applied.lock().unwrap()[0], 10.0);
    let (_, v) = d.get("/api/v1/rollouts/demo").await;
    assert_eq!(v["dry_run"], false, "{v}");
    d.stop().await;
}

/// UAT: an abort that neither the state store recorded nor the router took was answered
/// "applied all the same". It says the router has not taken it yet, and the rollout goes on
/// telling the router until it does.
#[tokio::test]
async fn an_abort_neither_recorded_nor_taken_says_so_and_keeps_trying() {
    let dir = setup(&held_policy());
    let d = started_at_ten_percent(dir.path()).await;
    // Another process holds the database's write lock: every write fails once the store's
    // busy timeout (5 s) runs out.
    let lock = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    *d.router.failing.lock().unwrap() = true;
    let (status, body) = d.post("/api/v1/rollouts/demo/abort", None, "{}").await;
    assert_eq!(status, 503, "{body}");
    let said = body["error"].as_str().unwrap_or("");
    assert!(
        said.contains("has not taken it yet") && !said.contains("applied all the same"),
        "{body}"
    );
    assert_eq!(*d.router.weight.lock().unwrap(), 10.0);
    *d.router.failing.lock().unwrap() = false;
    // Each record waits out the store's 5 s busy timeout first.
    d.wait_phase_for("demo", "rolled-back", Duration::from_secs(40))
        .await;
    assert_eq!(*d.router.weight.lock().unwrap(), 0.0);
    lock.execute_batch("COMMIT").unwrap();
    d.stop().await;
}

/// Review: with the store failing, a new candidate's first step was compared with the
/// weight the last candidate ended at (100 % once promoted), so it reached the router without
/// a record. A new candidate's traffic is all new.
#[tokio::test]
async fn a_new_candidate_the_store_cannot_record_gets_no_traffic() {
    let dir = setup(POLICY);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router.clone(), source, None).await;
    d.wait_phase("demo", "promoted").await;
    assert_eq!(*router.weight.lock().unwrap(), 100.0);
    let lock = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let next = POLICY
        .replace("stable: v1", "stable: v2")
        .replace("canary: v2", "canary: v3");
    std::fs::write(policy_file(&dir, "demo"), next).unwrap();
    let v = wait_for("the store error shown", Duration::from_secs(30), || async {
        let (_, v) = d.get("/api/v1/rollouts/demo").await;
        v["store_error"].is_string().then_some(v)
    })
    .await;
    assert!(v["store_error"].as_str().unwrap().contains("locked"), "{v}");
    assert_eq!(*router.weight.lock().unwrap(), 100.0, "{v}");
    lock.execute_batch("COMMIT").unwrap();
    wait_for(
        "the new candidate's first step",
        Duration::from_secs(30),
        || async { (*router.weight.lock().unwrap() == 10.0).then_some(()) },
    )
    .await;
    d.stop().await;
}

#[tokio::test]
async fn a_state_store_that_refuses_writes_blocks_more_traffic_but_not_an_abort() {
    // Regression: with the state store failing, nothing showed it, and neither a rollback
    // nor an operator's abort reached the router ("rollback stays reachable").
    let policy = POLICY.replace("min_step_duration: 150ms", "min_step_duration: 2s");
    let dir = setup(&policy);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router.clone(), source, None).await;
    wait_for("10% applied", Duration::from_secs(10), || async {
        (*router.weight.lock().unwrap() == 10.0).then_some(())
    })
    .await;
    // Another process holds the database's write lock: every write fails once the store's
    // busy timeout (5 s) runs out.
    let lock = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let v = wait_for("the store error shown", Duration::from_secs(30), || async {
        let (_, v) = d.get("/api/v1/rollouts/demo").await;
        v["store_error"].is_string().then_some(v)
    })
    .await;
    assert!(v["store_error"].as_str().unwrap().contains("locked"), "{v}");
    // The step's time is up, but an advance it cannot record does not reach the router.
    assert_eq!(*router.weight.lock().unwrap(), 10.0);
    assert_eq!(v["weight"], 10.0, "{v}");
    let (status, body) = d
        .post(
            "/api/v1/rollouts/demo/abort",
            None,
            r#"{"reason": "disk trouble"}"#,
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("taken all the same"),
        "{body}"
    );
    assert_eq!(body["taken"], true, "{body}");
    assert_eq!(body["recorded"], false, "{body}");
    assert_eq!(
        *router.weight.lock().unwrap(),
        0.0,
        "the abort reached the router"
    );
    let (_, metrics) = {
        let r = reqwest::get(format!("{}/metrics", d.url)).await.unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert!(
        metrics.lines().any(
            |l| l.starts_with("canaryd_store_errors_total{rollout=\"demo\"}") && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
    // Once the store works again, the state in memory is recorded: a restart resumes the
    // rollback, not the step.
    lock.execute_batch("COMMIT").unwrap();
    wait_for("the store error gone", Duration::from_secs(30), || async {
        let (_, v) = d.get("/api/v1/rollouts/demo").await;
        v["store_error"].is_null().then_some(())
    })
    .await;
    // UAT: the abort itself, with who gave it and why, was missing from the log.
    let (_, log) = d.get("/api/v1/rollouts/demo/decisions?limit=50").await;
    let aborts: Vec<&Value> = log["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["action"] == "rollback" && d["why"] == "disk trouble")
        .collect();
    assert_eq!(aborts.len(), 1, "{log}");
    d.stop().await;
    let store = canaryd::store::Store::open(&dir.path().join("state.db")).unwrap();
    let stored = store.load("demo").unwrap().unwrap();
    assert!(
        matches!(
            stored.state.phase,
            canaryd::rollout::Phase::RollingBack | canaryd::rollout::Phase::RolledBack
        ),
        "{:?}",
        stored.state.phase
    );
    assert_eq!(stored.state.weight, 0.0);
}

/// Answers with as many canary events as its window is long in hundredths of a second (100
/// requests a second, none of them failing), and remembers the longest window it was asked for.
#[derive(Clone, Default)]
struct TrafficSource {
    longest_ms: Arc<Mutex<i64>>,
}

impl MetricSource for TrafficSource {
    fn observe<'a>(
        &'a self,
        policy: &'a Policy,
        w: Window,
    ) -> BoxFuture<'a, BTreeMap<String, MetricReading>> {
        Box::pin(async move {
            let span = w.at.0 - w.since.0;
            {
                let mut longest = self.longest_ms.lock().unwrap();
                *longest = (*longest).max(span);
            }
            let events = (span / 10) as f64;
            let reading = |events: f64| {
                Reading::Data(Sample {
                    value: Some(0.0),
                    window_events: events,
                    ..Default::default()
                })
            };
            policy
                .metrics
                .iter()
                .map(|m| {
                    let r = MetricReading {
                        stable: reading(events * 10.0),
                        canary: reading(events),
                    };
                    (m.name.clone(), r)
                })
                .collect()
        })
    }
}

/// A step's worth (`min_step_duration`) with fewer canary events than `min_samples` is read
/// over the whole step instead: at low traffic a capped window never holds enough, and the
/// rollout would hold until its deadline.
#[tokio::test]
async fn a_metric_too_thin_for_a_steps_worth_is_read_over_the_whole_step() {
    // A step's worth (150 ms) holds at most 15 events; 40 take 400 ms of the step.
    let dir = setup(&POLICY.replace("max: 1%}", "max: 1%, min_samples: 40}"));
    let source = TrafficSource::default();
    let s = source.clone();
    let sources: canaryd::controller::SourceFactory =
        Arc::new(move |_p| Arc::new(s.clone()) as Arc<dyn MetricSource>);
    let d = Daemon::start_sourced(dir.path(), sources).await;
    let v = d
        .wait_phase_for("demo", "promoted", Duration::from_secs(20))
        .await;
    assert_eq!(v["weight"], 100.0, "{v}");
    let longest = *source.longest_ms.lock().unwrap();
    assert!(longest >= 400, "the longest window was {longest} ms");
    d.stop().await;
}

/// `held_policy()` for rollout `name` with canary `canary` on the file router at `weights`.
fn named_on(name: &str, canary: &str, weights: &Path) -> String {
    let p = held_policy()
        .replace("name: demo", &format!("name: {name}"))
        .replace("canary: v2", &format!("canary: {canary}"));
    file_routed(&p, weights)
}

/// A daemon with the real routers whose rollout `name` (v1 to v2, in `policies/{name}.yaml`)
/// runs at its first step on the file router at `weights` in the daemon's directory.
/// `demo`'s gauges in /metrics say it is progressing at its first step, at 10 %.
async fn assert_series_at_first_step(d: &Daemon) {
    let m = metrics_text(d).await;
    for series in [
        "canaryd_rollout_phase{phase=\"progressing\",rollout=\"demo\"} 1",
        "canaryd_rollout_canary_weight{rollout=\"demo\"} 10",
        "canaryd_rollout_step{rollout=\"demo\"} 1",
    ] {
        assert!(m.contains(series), "{series} missing from\n{m}");
    }
}

/// The policy file of rollout `name` in a `policies_dir`.
fn policy_file(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
    dir.path().join(format!("policies/{name}.yaml"))
}

async fn on_file_router(name: &str, weights: &str) -> (tempfile::TempDir, Daemon) {
    let dir = policies_dir();
    let policy = named_on(name, "v2", &dir.path().join(weights));
    std::fs::write(policy_file(&dir, name), policy).unwrap();
    let d = Daemon::start_file_routed(dir.path()).await;
    d.wait_phase(name, "progressing").await;
    (dir, d)
}

/// Review: a daemon restarted after a rollout's policy file was deleted forgot the rollout, so
/// its canary kept its share and `abort` answered "no such rollout". The stored state now
/// keeps the policy that last drove the rollout: the rollout starts stopped, through the router
/// it last had, and `abort` rolls it back. Real file router.
#[tokio::test]
async fn a_rollout_whose_file_was_deleted_while_the_daemon_was_down_can_still_be_aborted() {
    let (dir, d) = on_file_router("demo", "weights.json").await;
    let weights = dir.path().join("weights.json");
    let policy = file_routed(&held_policy(), &weights);
    let file = dir.path().join("policies/demo.yaml");
    d.stop().await;
    std::fs::remove_file(&file).unwrap();

    let d = Daemon::start_file_routed(dir.path()).await;
    let v = d.wait_stopped("demo").await;
    assert_eq!(v["phase"], "progressing", "{v}");
    assert_eq!(v["file"], file.display().to_string(), "{v}");
    assert!(v["state"].get("policy").is_none(), "not for people: {v}");
    let note = v["policy_error"].as_str().unwrap_or_default();
    assert!(
        note.contains(&format!(
            "no policy file defines this rollout (its last was {})",
            file.display()
        )) && note.contains("traffic left at 10%")
            && note.contains("`canaryd abort` still rolls it back; restore the file"),
        "{v}"
    );
    assert_eq!(
        read_json(&weights)["weights"]["v2"],
        10.0,
        "traffic untouched"
    );
    // Its series are there, as for a file deleted while the daemon runs (UAT: none).
    assert_series_at_first_step(&d).await;
    let (status, body) = d.post("/api/v1/rollouts/demo/pause", None, "{}").await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = d.post("/api/v1/rollouts/demo/abort", None, "{}").await;
    assert_eq!(status, 200, "{body}");
    d.wait_phase("demo", "rolled-back").await;
    assert_eq!(read_json(&weights)["weights"]["v2"], 0.0, "rolled back");
    d.stop().await;

    // Done: a later restart leaves it out, until its file is back.
    let d = Daemon::start_file_routed(dir.path()).await;
    let (status, body) = d.get("/api/v1/rollouts/demo").await;
    assert_eq!(status, 404, "{body}");
    std::fs::write(&file, &policy).unwrap();
    let v = d.wait_phase("demo", "rolled-back").await;
    assert_eq!(v["stopped"], false, "{v}");
    d.stop().await;
}

/// A rollout under way whose file has errors when the daemon starts is not run by that file;
/// it starts stopped, says so, still serves `abort`, and resumes once the file is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_whose_file_has_errors_at_startup_starts_stopped_and_resumes_when_fixed() {
    let dir = setup(&held_policy());
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router.clone(), source.clone(), None).await;
    let before = d.wait_phase("demo", "progressing").await;
    d.stop().await;
    let file = dir.path().join("policies/demo.yaml");
    std::fs::write(
        &file,
        held_policy().replace("failure_limit", "failure_limt"),
    )
    .unwrap();

    let d = Daemon::start(dir.path(), router, source, None).await;
    let v = d.wait_stopped("demo").await;
    let note = v["policy_error"].as_str().unwrap_or_default();
    assert!(
        note.contains(&format!("policy file {} has errors", file.display()))
            && note.contains("`canaryd abort` still rolls it back; fix the file to resume it"),
        "{v}"
    );
    let (_, list) = d.get("/api/v1/rollouts").await;
    assert_eq!(list["invalid_policies"][0]["name"], "demo", "{list}");
    let refused = d.refused("demo", "pause").await;
    assert!(refused.contains("fix the file to resume it"), "{refused}");
    assert_eq!(*d.router.weight.lock().unwrap(), 10.0, "traffic untouched");
    // `canaryd status`, of all rollouts or of this one, shows the file's errors themselves
    // (UAT: both hid them behind the note).
    for args in [vec!["status"], vec!["status", "demo"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
            .args(&args)
            .args(["--server", &d.url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("has errors") && text.contains("failure_limt"),
            "{args:?}: {text}"
        );
    }

    std::fs::write(&file, held_policy()).unwrap();
    let v = wait_for("the rollout resumed", Duration::from_secs(10), || async {
        let (s, v) = d.get("/api/v1/rollouts/demo").await;
        (s == 200 && v["stopped"] == false).then_some(v)
    })
    .await;
    assert_eq!(v["phase"], "progressing", "{v}");
    assert_eq!(v["step"], 1, "{v}");
    assert_eq!(v["state"]["attempt"], 1, "{v}");
    assert_eq!(
        v["state"]["started_at"], before["state"]["started_at"],
        "resumed, not started again: {v}"
    );
    let (status, body) = d.post("/api/v1/rollouts/demo/pause", None, "{}").await;
    assert_eq!(status, 200, "{body}");
    d.stop().await;
}

/// Review: a stopped rollout that had handed its router over still had it recorded as its
/// own, so when its policy came back with another router it set the old one, now another
/// rollout's, to stable. The hand-over is recorded; the router is left to its new owner.
#[tokio::test]
async fn a_rollout_that_handed_its_router_over_leaves_it_alone_when_it_returns_elsewhere() {
    let (dir, d) = on_file_router("x", "a.json").await;
    let [a, c] = ["a.json", "c.json"].map(|f| dir.path().join(f));
    std::fs::remove_file(policy_file(&dir, "x")).unwrap();
    d.wait_stopped("x").await;
    std::fs::write(policy_file(&dir, "y"), named_on("y", "v3", &a)).unwrap();
    d.wait_phase("y", "progressing").await;
    wait_for("x gone", Duration::from_secs(10), || async {
        (d.get("/api/v1/rollouts/x").await.0 == 404).then_some(())
    })
    .await;
    // y stops too, so that nothing but x could write a.json from here on.
    std::fs::remove_file(policy_file(&dir, "y")).unwrap();
    d.wait_stopped("y").await;
    let before = read_json(&a);
    assert_eq!(before["rollout"], "y", "{before}");
    std::fs::write(policy_file(&dir, "x"), named_on("x", "v2", &c)).unwrap();
    let v = d.wait_phase("x", "progressing").await;
    assert_eq!(v["stopped"], false, "{v}");
    wait_for("x on c.json", Duration::from_secs(10), || async {
        (read_json(&c)["weights"]["v2"] == 10.0).then_some(())
    })
    .await;
    assert_eq!(read_json(&a), before, "a.json is y's");
    d.stop().await;

    // After a restart y is back on a.json, stopped, and x stays on c.json.
    let d = Daemon::start_file_routed(dir.path()).await;
    d.wait_phase("x", "progressing").await;
    let v = d.wait_stopped("y").await;
    assert_eq!(v["phase"], "progressing", "{v}");
    assert_eq!(read_json(&a), before, "a.json is y's");
    d.stop().await;
}

/// UAT: a policy written on a stopped rollout's file router while the daemon was down was
/// stuck ("the weights file belongs to rollout x"), the stopped rollout was not listed, and
/// after the new policy's file went too, a restart brought back the old rollout on the router
/// rather than the new one. The new policy now takes the router over at the restart, as it
/// does live, and the old rollout gives it up for good.
#[tokio::test]
async fn a_router_taken_while_the_daemon_was_down_is_handed_over_at_the_restart() {
    let (dir, d) = on_file_router("x", "w.json").await;
    let w = dir.path().join("w.json");
    d.stop().await;
    std::fs::remove_file(policy_file(&dir, "x")).unwrap();
    std::fs::write(policy_file(&dir, "b"), named_on("b", "v3", &w)).unwrap();

    let d = Daemon::start_file_routed(dir.path()).await;
    let doc = wait_for("b on w.json", Duration::from_secs(10), || async {
        let doc = read_json(&w);
        (doc["rollout"] == "b" && doc["weights"]["v3"] == 10.0).then_some(doc)
    })
    .await;
    assert!(doc["weights"].get("v2").is_none(), "{doc}");
    let v = d.wait_phase("b", "progressing").await;
    assert!(v["router_error"].is_null(), "{v}");
    wait_for("x gone", Duration::from_secs(10), || async {
        (d.get("/api/v1/rollouts/x").await.0 == 404).then_some(())
    })
    .await;
    d.stop().await;

    std::fs::remove_file(policy_file(&dir, "b")).unwrap();
    let d = Daemon::start_file_routed(dir.path()).await;
    let v = d.wait_stopped("b").await;
    assert_eq!(v["phase"], "progressing", "{v}");
    let (status, body) = d.get("/api/v1/rollouts/x").await;
    assert_eq!(status, 404, "x gave the router up: {body}");
    let (status, body) = d.post("/api/v1/rollouts/b/abort", None, "{}").await;
    assert_eq!(status, 200, "{body}");
    d.wait_phase("b", "rolled-back").await;
    let doc = read_json(&w);
    assert_eq!(
        (&doc["rollout"], &doc["weights"]["v3"]),
        (&"b".into(), &0.0.into()),
        "{doc}"
    );
    d.stop().await;
}

/// UAT: a rollout renamed in its file (onto another router) vanished from the list while its
/// canary kept its share, and `abort` answered "no rollout". It stays, stopped, as if its file
/// were deleted; a file with errors that gives its name says so, until that file goes.
#[tokio::test]
async fn a_renamed_rollout_stays_stopped_and_abortable_and_says_why() {
    let (dir, d) = on_file_router("x", "a.json").await;
    let [a, b] = ["a.json", "b.json"].map(|f| dir.path().join(f));
    std::fs::write(policy_file(&dir, "x"), named_on("y", "v3", &b)).unwrap();
    d.wait_phase("y", "progressing").await;
    let v = d.wait_stopped("x").await;
    let note = v["policy_error"].as_str().unwrap_or_default();
    assert!(
        note.contains(&format!(
            "policy file {} renamed it to y",
            policy_file(&dir, "x").display()
        )) && note.contains("`canaryd abort` still rolls it back"),
        "{v}"
    );
    assert_eq!(read_json(&a)["weights"]["v2"], 10.0, "traffic untouched");

    std::fs::write(
        policy_file(&dir, "bad"),
        named_on("x", "v2", &a).replace("failure_limit", "fl"),
    )
    .unwrap();
    wait_for("x's file with errors", Duration::from_secs(10), || async {
        let (_, v) = d.get("/api/v1/rollouts/x").await;
        let note = v["policy_error"].as_str()?;
        note.contains(&format!(
            "policy file {} has errors",
            policy_file(&dir, "bad").display()
        ))
        .then_some(())
    })
    .await;
    let invalid = "canaryd_policy_invalid{rollout=\"x\"}";
    assert!(metrics_text(&d).await.contains(&format!("{invalid} 1")));
    // The file now gives another name (review: x kept saying it had errors).
    let other = named_on("zz", "v2", &a).replace("failure_limit", "fl");
    std::fs::write(policy_file(&dir, "bad"), other).unwrap();
    let gone = format!(
        "{}, which had errors, no longer gives",
        policy_file(&dir, "bad").display()
    );
    d.wait_text("x", "policy_error", &format!("policy file {gone}"))
        .await;
    assert!(metrics_text(&d).await.contains(&format!("{invalid} 0")));
    std::fs::write(
        policy_file(&dir, "bad"),
        named_on("x", "v2", &a).replace("failure_limit", "fl"),
    )
    .unwrap();
    d.wait_text("x", "policy_error", "has errors").await;
    std::fs::remove_file(policy_file(&dir, "bad")).unwrap();
    d.wait_text("x", "policy_error", &gone).await;

    assert!(metrics_text(&d).await.contains(&format!("{invalid} 0")));
    let (status, body) = d.post("/api/v1/rollouts/x/abort", None, "{}").await;
    assert_eq!(status, 200, "{body}");
    d.wait_phase("x", "rolled-back").await;
    assert_eq!(read_json(&a)["weights"]["v2"], 0.0, "rolled back");
    assert_eq!(read_json(&b)["weights"]["v3"], 10.0, "y untouched");
    d.stop().await;
}

/// Review: a rollout brought up stopped read its router once, and a router that was down then
/// counted as failing ever since: when the file came back days later, the rollout went to
/// `failed` at its first tick instead of setting its weight again.
#[tokio::test]
async fn a_router_down_at_startup_does_not_fail_the_rollout_when_its_file_returns() {
    let policy = held_policy().replace(
        "progress_deadline: 3h",
        "progress_deadline: 3h\n  router_deadline: 1ms",
    );
    let dir = setup(&policy);
    let (router, source) = fakes(Mode::Good);
    let d = Daemon::start(dir.path(), router.clone(), source.clone(), None).await;
    d.wait_phase("demo", "progressing").await;
    d.stop().await;
    let file = dir.path().join("policies/demo.yaml");
    std::fs::remove_file(&file).unwrap();
    *router.failing.lock().unwrap() = true;

    let d = Daemon::start(dir.path(), router.clone(), source, None).await;
    d.wait_stopped("demo").await;
    // The router comes back as configured at its start: all traffic on stable. Found lower
    // than recorded after a restart, it is not raised on its own (an abort the store could
    // not record looks the same): the rollout pauses rather than fails, and resume sets its
    // weight again.
    *router.weight.lock().unwrap() = 0.0;
    *router.failing.lock().unwrap() = false;
    std::fs::write(&file, &policy).unwrap();
    d.wait_phase("demo", "paused").await;
    let (status, body) = d.post("/api/v1/rollouts/demo/resume", None, "{}").await;
    assert_eq!(status, 200, "{body}");
    wait_for("the weight set again", Duration::from_secs(10), || async {
        (*router.weight.lock().unwrap() == 10.0).then_some(())
    })
    .await;
    let (_, v) = d.get("/api/v1/rollouts/demo").await;
    assert_eq!(v["phase"], "progressing", "{v}");
    d.stop().await;
}

/// UAT: a restart let files that were refused while the daemon ran win by coming first in the
/// directory: a second file giving a running rollout's name took the rollout over (to its own
/// router), and an edit onto another rollout's router took that router. Each rollout's own
/// file keeps its name and router across the restart; the refused files stay refused.
#[tokio::test]
async fn files_refused_before_a_restart_stay_refused_after_it() {
    let dir = policies_dir();
    let [w1, w2, w3] = ["w1.json", "w2.json", "w3.json"].map(|f| dir.path().join(f));
    std::fs::write(policy_file(&dir, "z-alpha"), named_on("alpha", "v2", &w1)).unwrap();
    std::fs::write(policy_file(&dir, "beta"), named_on("beta", "v3", &w2)).unwrap();
    let d = Daemon::start_file_routed(dir.path()).await;
    d.wait_phase("alpha", "progressing").await;
    d.wait_phase("beta", "progressing").await;
    // Both refused: alpha's name is z-alpha.yaml's, w1 is alpha's.
    std::fs::write(policy_file(&dir, "a-dup"), named_on("alpha", "v2", &w3)).unwrap();
    std::fs::write(policy_file(&dir, "beta"), named_on("beta", "v3", &w1)).unwrap();
    let refused = || async {
        let (_, list) = d.get("/api/v1/rollouts").await;
        (list["invalid_policies"].as_array()?.len() == 2).then_some(())
    };
    wait_for("both refused", Duration::from_secs(10), refused).await;
    d.stop().await;

    let d = Daemon::start_file_routed(dir.path()).await;
    let v = d.wait_phase("alpha", "progressing").await;
    assert_eq!(
        v["file"],
        policy_file(&dir, "z-alpha").display().to_string(),
        "{v}"
    );
    assert_eq!(v["stopped"], false, "{v}");
    let v = d.wait_stopped("beta").await;
    let note = v["policy_error"].as_str().unwrap_or_default();
    assert!(
        note.contains(&format!(
            "policy file {} has errors",
            policy_file(&dir, "beta").display()
        )),
        "{v}"
    );
    let (_, list) = d.get("/api/v1/rollouts").await;
    let mut files: Vec<&str> = list["invalid_policies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["file"].as_str())
        .collect();
    files.sort_unstable();
    let want =
        [policy_file(&dir, "a-dup"), policy_file(&dir, "beta")].map(|f| f.display().to_string());
    assert_eq!(files, want, "{list}");
    let (doc1, doc2) = (read_json(&w1), read_json(&w2));
    assert_eq!(
        (&doc1["rollout"], &doc1["weights"]["v2"]),
        (&"alpha".into(), &10.0.into())
    );
    assert_eq!(
        (&doc2["rollout"], &doc2["weights"]["v3"]),
        (&"beta".into(), &10.0.into())
    );
    assert!(!w3.exists(), "nothing ran on w3");
    d.stop().await;
}

/// Review: at a restart with a rollout's own file broken and a second file giving its name,
/// the note pointed to the second file (which could never resume it), and the broken file
/// kept the name after it stopped giving it, so the second file stayed refused.
#[tokio::test]
async fn a_broken_own_file_holds_the_name_only_while_it_gives_it() {
    let dir = policies_dir();
    let [w1, w3] = ["w1.json", "w3.json"].map(|f| dir.path().join(f));
    std::fs::write(policy_file(&dir, "z-alpha"), named_on("alpha", "v2", &w1)).unwrap();
    let d = Daemon::start_file_routed(dir.path()).await;
    d.wait_phase("alpha", "progressing").await;
    d.stop().await;
    let broken = |name: &str| named_on(name, "v2", &w1).replace("failure_limit", "fl");
    std::fs::write(policy_file(&dir, "z-alpha"), broken("alpha")).unwrap();
    std::fs::write(policy_file(&dir, "a-dup"), named_on("alpha", "v2", &w3)).unwrap();

    let d = Daemon::start_file_routed(dir.path()).await;
    let v = d.wait_stopped("alpha").await;
    let note = v["policy_error"].as_str().unwrap_or_default();
    let own = format!(
        "policy file {} has errors",
        policy_file(&dir, "z-alpha").display()
    );
    assert!(note.contains(&own), "{v}");
    assert!(!w3.exists(), "a-dup.yaml is refused");
    // The broken file gives another name now: a-dup.yaml is alpha's file.
    std::fs::write(policy_file(&dir, "z-alpha"), broken("other")).unwrap();
    let v = wait_for("alpha from a-dup.yaml", Duration::from_secs(10), || async {
        let (_, v) = d.get("/api/v1/rollouts/alpha").await;
        (v["stopped"] == false).then_some(v)
    })
    .await;
    assert_eq!(
        v["file"],
        policy_file(&dir, "a-dup").display().to_string(),
        "{v}"
    );
    wait_for("alpha on w3", Duration::from_secs(10), || async {
        (read_json(&w3)["weights"]["v2"] == 10.0).then_some(())
    })
    .await;
    d.stop().await;
}

/// UAT: a rollout renamed (onto another router) while the daemon was down came back as "no
/// policy file defines this rollout"; its last file says what became of it.
#[tokio::test]
async fn a_rollout_renamed_while_the_daemon_was_down_says_so() {
    let (dir, d) = on_file_router("alpha", "a.json").await;
    d.stop().await;
    let file = dir.path().join("policies/alpha.yaml");
    std::fs::write(&file, named_on("beta", "v3", &dir.path().join("b.json"))).unwrap();
    let d = Daemon::start_file_routed(dir.path()).await;
    d.wait_phase("beta", "progressing").await;
    let v = d.wait_stopped("alpha").await;
    let note = v["policy_error"].as_str().unwrap_or_default();
    let renamed = format!("policy file {} renamed it to beta", file.display());
    assert!(note.contains(&renamed), "{v}");
    d.stop().await;
}
