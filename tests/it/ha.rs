//! The highly available daemon against a real etcd started on 127.0.0.1: the etcd store keeps
//! what the SQLite store keeps, only the leader writes (fenced by its term), and when the
//! leader crashes another replica continues its rollouts at the step they had reached.

use crate::daemon::{FakeRouter, FakeSource, Mode, POLICY};
use crate::support::{ChildGuard, find_binary, free_port, wait_for, wait_for_port};
use canaryd::daemon::{DaemonConfig, HaConfig};
use canaryd::etcd::{Etcd, EtcdTls, Op};
use canaryd::ha::{ElectionConfig, Leadership, Role};
use canaryd::rollout::{Action, Decision, Phase, RolloutState};
use canaryd::router::Router;
use canaryd::source::MetricSource;
use canaryd::store::{Store, StoreError, etcd::EtcdStore};
use canaryd::time::Time;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An etcd of its own, on free loopback ports, with its data in a temporary directory.
struct EtcdServer {
    url: String,
    child: Option<ChildGuard>,
    dir: tempfile::TempDir,
    peer_url: String,
    tls: bool,
}

fn start_etcd() -> EtcdServer {
    start_etcd_with(false)
}

/// The test TLS material for etcd.
fn tls_file(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tls-etcd")
        .join(name)
}

/// An etcd; with `tls`, served over https and requiring a client certificate signed by the
/// test CA.
fn start_etcd_with(tls: bool) -> EtcdServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let (client, peer) = (free_port(), free_port());
    let scheme = if tls { "https" } else { "http" };
    let mut server = EtcdServer {
        url: format!("{scheme}://127.0.0.1:{client}"),
        child: None,
        dir,
        peer_url: format!("http://127.0.0.1:{peer}"),
        tls,
    };
    server.spawn();
    server
}

impl EtcdServer {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("log file");
        let mut cmd = Command::new(find_binary("etcd"));
        cmd.args(["--name", "test", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &format!("test={}", self.peer_url)])
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        if self.tls {
            cmd.arg("--cert-file")
                .arg(tls_file("server.pem"))
                .arg("--key-file")
                .arg(tls_file("server.key"))
                .arg("--trusted-ca-file")
                .arg(tls_file("ca.pem"))
                .arg("--client-cert-auth");
        }
        self.child = Some(ChildGuard::spawn(&mut cmd));
    }

    /// Stops etcd and starts it again on the same data and ports.
    fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.0.kill();
            let _ = child.0.wait();
        }
        self.spawn();
    }
}

async fn etcd_ready(server: &EtcdServer) -> Etcd {
    etcd_ready_with(server, &EtcdTls::default()).await
}

async fn etcd_ready_with(server: &EtcdServer, tls: &EtcdTls) -> Etcd {
    let port = server
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    wait_for_port(port, Duration::from_secs(20)).await;
    let etcd = Etcd::with_tls(&server.url, Duration::from_secs(2), tls).expect("client");
    wait_for("etcd to answer", Duration::from_secs(20), || {
        let etcd = etcd.clone();
        async move { etcd.get("/ping").await.ok().map(|_| ()) }
    })
    .await;
    etcd
}

fn election(replica: &str, ttl: Duration) -> ElectionConfig {
    ElectionConfig {
        prefix: "/canaryd-test".into(),
        replica: replica.into(),
        ttl,
    }
}

async fn wait_role(l: &Leadership, want: Role) {
    let mut rx = l.watch();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|r| *r == want))
        .await
        .unwrap_or_else(|_| panic!("{} never became {want:?}", l.replica()))
        .expect("election running");
}

fn state(name: &str, step: usize, weight: f64) -> RolloutState {
    let policy = canaryd::policy::load_str(
        "p.yaml",
        &crate::daemon::process_policy().replace("name: demo", &format!("name: {name}")),
    )
    .expect("policy");
    let mut s = RolloutState::new(&policy);
    s.phase = Phase::Progressing;
    s.step = step;
    s.weight = weight;
    s
}

fn decision(s: RolloutState, action: Action) -> Decision {
    Decision {
        action,
        weight: s.weight,
        reason: format!("step {}", s.step),
        who: None,
        why: None,
        reports: vec![],
        state: s,
    }
}

/// Runs a store call where blocking is allowed, as the daemon does.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("store task")
}

/// The etcd store keeps what the SQLite store keeps (state, log, applied marks, retention),
/// and refuses every write from a replica that does not lead, or no longer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_keeps_state_and_log_and_only_the_leader_writes() {
    let server = start_etcd();
    let etcd = etcd_ready(&server).await;
    let ttl = Duration::from_secs(2);
    let a = Leadership::new(etcd.clone(), election("a", ttl));
    let b = Leadership::new(etcd.clone(), election("b", ttl));
    let (stop_a, rx) = tokio::sync::watch::channel(false);
    let run_a = tokio::spawn(a.clone().run(rx));
    wait_role(&a, Role::Leader).await;
    let (stop_b, rx) = tokio::sync::watch::channel(false);
    let run_b = tokio::spawn(b.clone().run(rx));
    wait_role(
        &b,
        Role::Standby {
            leader: Some("a".into()),
        },
    )
    .await;

    let store_a =
        Store::etcd(EtcdStore::new(etcd.clone(), "/canaryd-test", a.clone(), 3).expect("store"));
    let store_b =
        Store::etcd(EtcdStore::new(etcd.clone(), "/canaryd-test", b.clone(), 3).expect("store"));
    assert!(store_a.may_write() && !store_b.may_write());

    // Five decisions, each applied but the last: the log keeps the newest three.
    let mut ids = Vec::new();
    for step in 0..5 {
        let s = store_a.clone();
        let d = decision(
            state("demo", step, 10.0 * (step + 1) as f64),
            Action::Advance,
        );
        let id = blocking(move || s.record(&d, Time(1_000 + step as i64)))
            .await
            .expect("record");
        if step < 4 {
            let s = store_a.clone();
            blocking(move || s.mark_applied("demo", id))
                .await
                .expect("mark");
        }
        ids.push(id);
    }
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "{ids:?}");
    let s = store_b.clone();
    let (loaded, names, log) = blocking(move || {
        (
            s.load("demo").expect("load"),
            s.names().expect("names"),
            s.decisions("demo", 100, None).expect("decisions"),
        )
    })
    .await;
    // Any replica reads what the leader wrote.
    let loaded = loaded.expect("stored");
    assert_eq!(loaded.state.step, 4);
    assert!(!loaded.applied, "the last decision was not applied");
    assert_eq!(names, vec!["demo".to_owned()]);
    let steps: Vec<usize> = log.iter().map(|d| d.step).collect();
    assert_eq!(steps, vec![4, 3, 2], "newest first, three kept");
    assert_eq!(
        log.iter().map(|d| d.applied).collect::<Vec<_>>(),
        vec![false, true, true]
    );
    // Pages: below an id.
    let s = store_b.clone();
    let before = ids[3];
    let page = blocking(move || s.decisions("demo", 1, Some(before)).expect("page")).await;
    assert_eq!(page.iter().map(|d| d.step).collect::<Vec<_>>(), vec![2]);

    // The standby cannot write.
    let s = store_b.clone();
    let d = decision(state("demo", 1, 5.0), Action::Rollback);
    let refused = blocking(move || s.record(&d, Time(9_000))).await;
    assert!(
        matches!(refused, Err(StoreError::NotLeader(_))),
        "{refused:?}"
    );

    // The leader is cut off without giving up (its election task dies, its lease runs out):
    // b takes over, and a's store refuses to write even before a hears about it.
    run_a.abort();
    let _ = run_a.await;
    wait_role(&b, Role::Leader).await;
    assert!(!store_a.may_write(), "a's term ran out by its own clock");
    let s = store_a.clone();
    let d = decision(state("demo", 1, 5.0), Action::Rollback);
    let refused = blocking(move || s.record(&d, Time(9_000))).await;
    assert!(
        matches!(refused, Err(StoreError::NotLeader(_))),
        "{refused:?}"
    );
    // The new leader continues the same log.
    let s = store_b.clone();
    let d = decision(state("demo", 4, 50.0), Action::Hold);
    let id = blocking(move || s.record(&d, Time(10_000)))
        .await
        .expect("b records");
    assert!(id > ids[4]);
    let _ = stop_a.send(true);
    let _ = stop_b.send(true);
    run_b.await.expect("b stops");
    // Giving up revokes the lease: the leader key is gone at once.
    assert!(
        etcd.get("/canaryd-test/leader")
            .await
            .expect("get")
            .is_none()
    );
}

/// etcd itself refuses a write whose term no longer holds the leader key, even when the
/// replica has not noticed yet; a store bound to an earlier term of the same replica may not
/// write either; and decisions never applied are kept beyond the retention limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_is_enforced_by_etcd_and_by_term_and_unapplied_decisions_stay() {
    let server = start_etcd();
    let etcd = etcd_ready(&server).await;
    // A long lease: the election's next round is ten seconds away, so the replica does not
    // notice what happens to its key below.
    let a = Leadership::new(etcd.clone(), election("a", Duration::from_secs(30)));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(a.clone().run(rx));
    wait_role(&a, Role::Leader).await;
    let first = a.term().expect("a term").revision;
    let store =
        Store::etcd(EtcdStore::new(etcd.clone(), "/canaryd-test", a.clone(), 3).expect("store"));
    // Five decisions, none applied (a router outage): all stay, beyond the limit of three.
    for step in 0..5 {
        let s = store.clone();
        let d = decision(state("outage", step, 10.0), Action::Hold);
        blocking(move || s.record(&d, Time(1_000)))
            .await
            .expect("record");
    }
    let s = store.clone();
    let log = blocking(move || s.decisions("outage", 100, None).expect("log")).await;
    assert_eq!(log.len(), 5, "{log:?}");
    // The leader key is deleted and created anew behind a's back (as when its lease expired
    // and another replica won): a still believes it leads, but etcd refuses its write.
    let delete = Op::DeleteRange {
        from: "/canaryd-test/leader".into(),
        to: "/canaryd-test/leader\0".into(),
    };
    etcd.txn(&[], std::slice::from_ref(&delete), &[])
        .await
        .expect("delete the key");
    etcd.txn(
        &[],
        &[Op::Put {
            key: "/canaryd-test/leader".into(),
            value: b"someone-else".to_vec(),
            lease: None,
        }],
        &[],
    )
    .await
    .expect("create it anew");
    assert!(store.may_write(), "a has not noticed");
    let s = store.clone();
    let d = decision(state("outage", 5, 10.0), Action::Rollback);
    let refused = blocking(move || s.record(&d, Time(2_000))).await;
    assert!(
        matches!(refused, Err(StoreError::NotLeader(_))),
        "{refused:?}"
    );
    // A store bound to a term refuses once that term is over, even when the replica leads
    // again: a later term of a, after it gave the first one up.
    let _ = stop.send(true);
    run.await.expect("stopped");
    etcd.txn(&[], &[delete], &[]).await.expect("clear the key");
    let (stop, rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(a.clone().run(rx));
    wait_role(&a, Role::Leader).await;
    let second = a.term().expect("a term").revision;
    assert_ne!(first, second);
    let old_task = store.for_term(first);
    let new_task = store.for_term(second);
    assert!(!old_task.may_write() && new_task.may_write());
    let d = decision(state("outage", 5, 10.0), Action::Rollback);
    let refused = blocking({
        let d = d.clone();
        move || old_task.record(&d, Time(3_000))
    })
    .await;
    assert!(
        matches!(refused, Err(StoreError::NotLeader(_))),
        "{refused:?}"
    );
    blocking(move || new_task.record(&d, Time(3_000)))
        .await
        .expect("the new term writes");
    let _ = stop.send(true);
    run.await.expect("stopped");
}

/// One replica of a highly available daemon, in this process, with the shared fake router.
struct Replica {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// The replica's own metrics, as text.
async fn metrics(r: &Replica) -> String {
    reqwest::get(format!("{}/metrics", r.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

impl Replica {
    async fn start(
        dir: &Path,
        name: &str,
        etcd: &str,
        router: &FakeRouter,
        source: &FakeSource,
    ) -> Replica {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (r, s) = (router.clone(), source.clone());
        let config = DaemonConfig {
            policies: dir.join("policies"),
            state: dir.join(format!("unused-{name}.db")),
            token: None,
            dry_run: false,
            poll: Duration::from_millis(50),
            clock: Arc::new(canaryd::time::SystemClock),
            routers: Arc::new(move |_p| Ok(Box::new(r.clone()) as Box<dyn Router>)),
            sources: Arc::new(move |_p| Arc::new(s.clone()) as Arc<dyn MetricSource>),
            metrics: None,
            ha: Some(HaConfig {
                etcd: etcd.to_owned(),
                tls: Default::default(),
                auth: None,
                election: election(name, Duration::from_secs(2)),
            }),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(canaryd::daemon::serve_with(
            listener,
            config,
            crate::daemon::test_limits(),
            async move {
                let _ = rx.await;
            },
        ));
        let health = format!("{url}/healthz");
        wait_for("replica up", Duration::from_secs(10), || {
            let health = health.clone();
            async move {
                reqwest::get(&health)
                    .await
                    .ok()?
                    .status()
                    .is_success()
                    .then_some(())
            }
        })
        .await;
        Replica {
            url,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = reqwest::get(format!("{}{path}", self.url))
            .await
            .expect("get");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Ends the replica as a crash would: no shutdown, no lease revoked.
    async fn crash(mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
            let _ = h.await;
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("join").expect("serve");
        }
    }
}

/// The leader crashes in the middle of a rollout: the other replica takes over within about a
/// lease and continues from the stored step (it neither restarts the rollout nor moves traffic
/// back), and the rollout ends promoted with one decision log across both leaders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leaders_rollout_continues_on_the_standby_at_the_same_step() {
    let server = start_etcd();
    etcd_ready(&server).await;
    let dir = crate::daemon::policies_dir();
    // Long enough steps that the rollout is mid-way when the leader crashes.
    let policy = POLICY
        .replace("steps: [10, 50]", "steps: [10, 20, 30, 40, 50]")
        .replace("min_step_duration: 150ms", "min_step_duration: 1500ms");
    std::fs::write(dir.path().join("policies/demo.yaml"), policy).expect("policy");
    let router = FakeRouter::default();
    let source = FakeSource {
        mode: Arc::new(Mutex::new(Mode::Good)),
    };
    let a = Replica::start(dir.path(), "a", &server.url, &router, &source).await;
    let step_reached = wait_for(
        "a to lead and reach the second step",
        Duration::from_secs(20),
        || async {
            let (s, v) = a.get("/api/v1/rollouts/demo").await;
            (s == 200 && v["step"].as_u64().is_some_and(|x| x >= 2)).then_some(v["step"].as_u64())
        },
    )
    .await;
    let b = Replica::start(dir.path(), "b", &server.url, &router, &source).await;
    // The standby runs nothing.
    let (_, list) = b.get("/api/v1/rollouts").await;
    assert_eq!(list["rollouts"], serde_json::json!([]), "{list}");
    assert!(metrics(&b).await.contains("\ncanaryd_leader 0\n"));
    assert!(metrics(&a).await.contains("\ncanaryd_leader 1\n"));
    let weight_at_crash = *router.weight.lock().unwrap_or_else(|e| e.into_inner());
    a.crash().await;

    let v = wait_for("b to take over", Duration::from_secs(20), || async {
        let (s, v) = b.get("/api/v1/rollouts/demo").await;
        (s == 200).then_some(v)
    })
    .await;
    assert!(metrics(&b).await.contains("\ncanaryd_leader 1\n"));
    // It continues where a was: not from the first step.
    assert!(v["step"].as_u64() >= step_reached, "{v}");
    let v = wait_for(
        "the rollout promoted by b",
        Duration::from_secs(30),
        || async {
            let (s, v) = b.get("/api/v1/rollouts/demo").await;
            (s == 200 && v["phase"] == "promoted").then_some(v)
        },
    )
    .await;
    assert_eq!(v["phase"], "promoted");
    // Traffic only ever grew: b went on from a's weight, never back to an earlier step.
    let applied = router
        .applied
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert!(
        applied.windows(2).all(|w| w[1] >= w[0]),
        "weights applied: {applied:?}"
    );
    assert!(applied.contains(&weight_at_crash), "{applied:?}");
    // One log: a's start and b's promotion.
    let (_, log) = b.get("/api/v1/rollouts/demo/decisions?limit=500").await;
    let actions: Vec<&str> = log["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .filter_map(|d| d["action"].as_str())
        .collect();
    assert!(actions.contains(&"start"), "{actions:?}");
    assert!(actions.contains(&"promote"), "{actions:?}");
    assert_eq!(
        actions.iter().filter(|a| **a == "start").count(),
        1,
        "the rollout was not started again: {actions:?}"
    );
    b.stop().await;
}

/// The leader crashes while a rollout whose policy file was deleted stands stopped at 10 %:
/// the replica that takes over finds it in etcd with no file, shows it stopped, and its
/// `abort` still rolls the canary back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_rollout_stays_abortable_on_the_replica_that_takes_over() {
    let server = start_etcd();
    etcd_ready(&server).await;
    let dir = crate::daemon::policies_dir();
    let file = dir.path().join("policies/demo.yaml");
    std::fs::write(&file, crate::daemon::held_policy()).expect("policy");
    let router = FakeRouter::default();
    let source = FakeSource {
        mode: Arc::new(Mutex::new(Mode::Good)),
    };
    let a = Replica::start(dir.path(), "a", &server.url, &router, &source).await;
    wait_for("a leads demo at 10 %", Duration::from_secs(20), || async {
        let (s, v) = a.get("/api/v1/rollouts/demo").await;
        (s == 200 && v["applied"] == true && v["weight"] == 10.0).then_some(())
    })
    .await;
    let b = Replica::start(dir.path(), "b", &server.url, &router, &source).await;
    std::fs::remove_file(&file).expect("rm policy");
    wait_for("a shows demo stopped", Duration::from_secs(10), || async {
        let (_, v) = a.get("/api/v1/rollouts/demo").await;
        (v["stopped"] == true).then_some(())
    })
    .await;
    a.crash().await;

    let v = wait_for("b shows demo stopped", Duration::from_secs(20), || async {
        let (s, v) = b.get("/api/v1/rollouts/demo").await;
        (s == 200 && v["stopped"] == true).then_some(v)
    })
    .await;
    assert_eq!(v["phase"], "progressing", "{v}");
    let note = v["policy_error"].as_str().unwrap_or_default();
    assert!(note.contains("no policy file defines this rollout"), "{v}");
    assert_eq!(
        *router.weight.lock().unwrap_or_else(|e| e.into_inner()),
        10.0,
        "traffic untouched"
    );
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/rollouts/demo/abort", b.url))
        .body("{}")
        .send()
        .await
        .expect("abort");
    assert_eq!(r.status().as_u16(), 200);
    wait_for("b rolled demo back", Duration::from_secs(10), || async {
        let (_, v) = b.get("/api/v1/rollouts/demo").await;
        (v["phase"] == "rolled-back").then_some(())
    })
    .await;
    assert_eq!(
        *router.weight.lock().unwrap_or_else(|e| e.into_inner()),
        0.0,
        "rolled back on the router"
    );
    b.stop().await;
}

/// `canaryd run --etcd` as real processes: the standby says who leads and refuses operator
/// actions; `kill -9` of the leader hands its rollout, at its step, to the standby, which then
/// drives the router (here, a weights file). No Prometheus: the rollout starts and holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_process_hands_the_rollout_to_the_standby() {
    let server = start_etcd();
    etcd_ready(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    let weights = dir.path().join("weights.json");
    let policy = crate::daemon::process_policy().replace(
        "file: {path: /dev/null}",
        &format!("file: {{path: '{}'}}", weights.display()),
    );
    std::fs::write(policies.join("demo.yaml"), policy).expect("policy");
    let closed = format!("http://127.0.0.1:{}", free_port());
    let start = |name: &str| {
        let port = free_port();
        let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).expect("log");
        let child = ChildGuard::spawn(
            Command::new(env!("CARGO_BIN_EXE_canaryd"))
                .args(["run", "--policies"])
                .arg(&policies)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--prometheus", &closed])
                .args(["--etcd", &server.url, "--etcd-prefix", "/ha-e2e"])
                .args(["--replica", name, "--lease-ttl", "2s"])
                .env_remove("CANARYD_CONFIG")
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
        );
        (child, format!("http://127.0.0.1:{port}"))
    };
    let get = |url: String| async move {
        let r = reqwest::get(&url).await.ok()?;
        let status = r.status().as_u16();
        let text = r.text().await.ok()?;
        Some((status, text))
    };
    let canary_weight = || -> Option<f64> {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&weights).ok()?).ok()?;
        doc["weights"]["v2"].as_f64()
    };

    let (a, a_url) = start("a");
    wait_for(
        "a to lead and start the rollout",
        Duration::from_secs(30),
        || {
            let url = format!("{a_url}/api/v1/rollouts/demo");
            async move {
                let (status, text) = get(url).await?;
                let v: Value = serde_json::from_str(&text).ok()?;
                (status == 200 && v["phase"] == "progressing" && canary_weight() == Some(10.0))
                    .then_some(())
            }
        },
    )
    .await;
    let (_b, b_url) = start("b");
    let (status, text) = wait_for("b to answer as a standby", Duration::from_secs(30), || {
        let url = format!("{b_url}/readyz");
        async move {
            get(url)
                .await
                .filter(|(s, t)| *s == 503 && t.contains("the leader is"))
        }
    })
    .await;
    assert!(text.contains("standby: the leader is a"), "{status} {text}");
    let refused = reqwest::Client::new()
        .post(format!("{b_url}/api/v1/rollouts/demo/abort"))
        .send()
        .await
        .expect("post");
    assert_eq!(refused.status().as_u16(), 503);
    let body: Value = refused.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("the leader is a")),
        "{body}"
    );

    // `canaryd status NAME` on the standby says who runs the rollout.
    let out = Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args(["status", "demo", "--server", &b_url])
        .output()
        .expect("status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "replica b is on standby and runs no rollouts; ask the leader, a (for \"demo\")"
        ) && !err.contains("ask it for"),
        "{err}"
    );
    // Asked for the rollout itself, the standby says who runs it rather than "no rollout".
    let (status, text) = get(format!("{b_url}/api/v1/rollouts/demo"))
        .await
        .expect("rollout");
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("on standby and runs no rollouts, \\\"demo\\\" included; the leader is a"),
        "{text}"
    );
    // An operator action from the command line is refused (exit 1), naming the leader.
    let out = Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args(["pause", "demo", "--server", &b_url])
        .output()
        .expect("pause");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refused") && err.contains("the leader is a"),
        "{err}"
    );
    // The standby reads the shared decision log. Each etcd call gives up after a quarter of
    // the 2 s lease, which a loaded CI machine's etcd can exceed once: asked again then.
    let text = wait_for(
        "the standby to read the decision log",
        Duration::from_secs(10),
        || async {
            let (status, text) =
                get(format!("{b_url}/api/v1/rollouts/demo/decisions?limit=500")).await?;
            (status == 200).then_some(text)
        },
    )
    .await;
    assert!(text.contains("\"action\":\"start\""), "{text}");

    drop(a); // SIGKILL: no shutdown, the lease is left to expire.
    let v: Value = wait_for(
        "b to take the rollout over",
        Duration::from_secs(30),
        || {
            let url = format!("{b_url}/api/v1/rollouts/demo");
            async move {
                let (status, text) = get(url).await?;
                (status == 200)
                    .then(|| serde_json::from_str(&text).ok())
                    .flatten()
            }
        },
    )
    .await;
    assert_eq!(v["phase"], "progressing", "{v}");
    assert_eq!(v["step"], 1, "{v}");
    assert_eq!(
        canary_weight(),
        Some(10.0),
        "traffic stayed where a left it"
    );
    let (_, text) = get(format!("{b_url}/api/v1/rollouts/demo/decisions?limit=500"))
        .await
        .expect("decisions");
    let log: Value = serde_json::from_str(&text).expect("json");
    let starts = log["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .filter(|d| d["action"] == "start")
        .count();
    assert_eq!(starts, 1, "the rollout was not started again: {log}");
    // The new leader drives the router: an abort takes the canary's traffic away.
    let aborted = reqwest::Client::new()
        .post(format!("{b_url}/api/v1/rollouts/demo/abort"))
        .send()
        .await
        .expect("post");
    assert_eq!(aborted.status().as_u16(), 200);
    wait_for(
        "the canary's traffic gone",
        Duration::from_secs(10),
        || async { (canary_weight() == Some(0.0)).then_some(()) },
    )
    .await;
}

/// An etcd that requires TLS and a client certificate: the replica leads with the CA and its
/// certificate given by the flags; without its certificate, or without the CA, etcd cannot be
/// used, and the error says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_leads_through_an_etcd_that_requires_client_certificates() {
    let server = start_etcd_with(true);
    let tls = EtcdTls {
        ca_file: Some(tls_file("ca.pem")),
        cert_file: Some(tls_file("client.pem")),
        key_file: Some(tls_file("client.key")),
    };
    etcd_ready_with(&server, &tls).await;
    let without_cert = EtcdTls {
        ca_file: tls.ca_file.clone(),
        ..EtcdTls::default()
    };
    let without_ca = EtcdTls {
        ca_file: None,
        ..tls.clone()
    };
    for (what, t) in [
        ("no client certificate", without_cert),
        ("no CA", without_ca),
    ] {
        let etcd = Etcd::with_tls(&server.url, Duration::from_secs(2), &t).expect("client");
        let e = etcd.get("/x").await.expect_err(what);
        assert!(e.to_string().contains("cannot reach etcd"), "{what}: {e}");
    }
    let bad = EtcdTls {
        key_file: None,
        ..tls.clone()
    };
    // A mistake in the settings is no unreachable etcd.
    let e = Etcd::with_tls(&server.url, Duration::from_secs(2), &bad).expect_err("no key");
    assert!(
        e.to_string().contains("needs its key") && !e.to_string().contains("cannot reach"),
        "{e}"
    );

    // The real binary, with the flags.
    let dir = crate::daemon::policies_dir();
    std::fs::write(
        dir.path().join("policies/demo.yaml"),
        crate::daemon::process_policy(),
    )
    .expect("policy");
    let port = free_port();
    let _replica = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_canaryd"))
            .args(["run", "--policies"])
            .arg(dir.path().join("policies"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--prometheus", &format!("http://127.0.0.1:{}", free_port())])
            .args([
                "--etcd",
                &server.url,
                "--replica",
                "tls-a",
                "--lease-ttl",
                "2s",
            ])
            .arg("--etcd-ca-file")
            .arg(tls_file("ca.pem"))
            .arg("--etcd-cert-file")
            .arg(tls_file("client.pem"))
            .arg("--etcd-key-file")
            .arg(tls_file("client.key"))
            .env_remove("CANARYD_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    wait_leads_demo(port).await;
}

/// Waits until the replica whose API is on `port` leads and runs the `demo` rollout.
async fn wait_leads_demo(port: u16) {
    wait_for(
        "the replica to lead the demo rollout",
        Duration::from_secs(30),
        || async move {
            let v: Value = reqwest::get(format!("http://127.0.0.1:{port}/api/v1/rollouts"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["replica"]["role"] == "leader" && v["rollouts"][0]["name"] == "demo").then_some(())
        },
    )
    .await;
}

/// Calls one endpoint of etcd's gateway as `token` (none before authentication is enabled).
async fn gateway(url: &str, path: &str, body: Value, token: Option<&str>) -> Value {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/v3/{path}"))
        .json(&body);
    if let Some(t) = token {
        req = req.header("Authorization", t);
    }
    let res = req.send().await.expect("etcd answers");
    let status = res.status();
    let v: Value = res.json().await.expect("json");
    assert!(status.is_success(), "{path}: {status} {v}");
    v
}

/// An etcd with authentication enabled: canaryd signs in with a user and password, may use
/// only the keys its role grants, gets a new token when etcd forgot the old one (a restart),
/// and the real binary leads with `--etcd-user` and `--etcd-password-file`; a wrong password
/// is shown on `/readyz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_signs_in_to_an_etcd_with_authentication() {
    use base64::Engine as _;
    use canaryd::etcd::EtcdAuth;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut server = start_etcd();
    etcd_ready(&server).await;
    let url = server.url.clone();
    let prefix = "/canaryd-test";
    for (path, body) in [
        (
            "auth/user/add",
            serde_json::json!({"name": "root", "password": "root-pw"}),
        ),
        (
            "auth/user/grant",
            serde_json::json!({"user": "root", "role": "root"}),
        ),
        ("auth/role/add", serde_json::json!({"name": "canaryd"})),
        (
            "auth/role/grant",
            serde_json::json!({"name": "canaryd", "perm": {"permType": "READWRITE",
                "key": b64(prefix), "range_end": b64(&canaryd::etcd::prefix_end(prefix))}}),
        ),
        (
            "auth/user/add",
            serde_json::json!({"name": "cd", "password": "s3cret pw"}),
        ),
        (
            "auth/user/grant",
            serde_json::json!({"user": "cd", "role": "canaryd"}),
        ),
        ("auth/enable", serde_json::json!({})),
    ] {
        gateway(&url, path, body, None).await;
    }
    let client = |password: &str| {
        Etcd::new(&url, Duration::from_secs(2))
            .expect("client")
            .with_auth(EtcdAuth {
                user: "cd".into(),
                password: password.into(),
            })
    };
    // Without a user, and with a wrong password, etcd refuses, and the error says why.
    let anonymous = Etcd::new(&url, Duration::from_secs(2)).expect("client");
    let e = anonymous.get("/canaryd-test/x").await.expect_err("no user");
    assert!(e.to_string().contains("user name is empty"), "{e}");
    let e = client("wrong")
        .get("/canaryd-test/x")
        .await
        .expect_err("wrong password");
    assert!(
        e.to_string().contains("authenticating as \"cd\"")
            && e.to_string().contains("authentication failed"),
        "{e}"
    );
    // The right password: reads and writes under the granted prefix, nothing else.
    let etcd = client("s3cret pw");
    let put = |key: &str, value: &str| Op::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        lease: None,
    };
    etcd.txn(&[], &[put("/canaryd-test/x", "1")], &[])
        .await
        .expect("write under the prefix");
    let e = etcd
        .txn(&[], &[put("/elsewhere", "1")], &[])
        .await
        .expect_err("outside the granted keys");
    assert!(e.to_string().contains("permission denied"), "{e}");
    // etcd forgets its tokens when it restarts: the client signs in again by itself.
    server.restart();
    let value = wait_for(
        "etcd back, read with a new token",
        Duration::from_secs(20),
        || {
            let etcd = etcd.clone();
            async move { etcd.get("/canaryd-test/x").await.ok().flatten() }
        },
    )
    .await;
    assert_eq!(value.value, b"1");

    // The real binary, with the flags; and one with a wrong password.
    let dir = crate::daemon::policies_dir();
    std::fs::write(
        dir.path().join("policies/demo.yaml"),
        crate::daemon::process_policy(),
    )
    .expect("policy");
    std::fs::write(dir.path().join("password"), "s3cret pw\n").expect("password");
    std::fs::write(dir.path().join("wrong"), "wrong\n").expect("password");
    let replica = |name: &str, password: &str, port: u16| {
        ChildGuard::spawn(
            Command::new(env!("CARGO_BIN_EXE_canaryd"))
                .args(["run", "--policies"])
                .arg(dir.path().join("policies"))
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--prometheus", &format!("http://127.0.0.1:{}", free_port())])
                .args(["--etcd", &url, "--etcd-prefix", prefix])
                .args(["--replica", name, "--lease-ttl", "2s", "--etcd-user", "cd"])
                .arg("--etcd-password-file")
                .arg(dir.path().join(password))
                .env_remove("CANARYD_CONFIG")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )
    };
    let (good, bad) = (free_port(), free_port());
    let _good = replica("auth-a", "password", good);
    let _bad = replica("auth-b", "wrong", bad);
    wait_leads_demo(good).await;
    let why = wait_for(
        "the replica with a wrong password to say so",
        Duration::from_secs(30),
        || async move {
            let res = reqwest::get(format!("http://127.0.0.1:{bad}/readyz"))
                .await
                .ok()?;
            let status = res.status().as_u16();
            let text = res.text().await.ok()?;
            (status == 503 && text.contains("authentication failed")).then_some(text)
        },
    )
    .await;
    assert!(why.contains("\"cd\""), "{why}");
}
