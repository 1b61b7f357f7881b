//! Shared helpers for integration tests: free ports, child processes that die with the test,
//! and waiting for a condition instead of sleeping.
#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

/// A loopback port that was free a moment ago (bind to port 0, read it, release it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Finds a server binary on PATH or in /usr/sbin, where Debian puts haproxy and nginx.
pub fn find_binary(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/usr/sbin", "/usr/bin", "/sbin"]) {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed; run .ci/run or apt-get install {name}")
}

/// A child process killed (and reaped) when dropped, so a failing test leaves nothing behind.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard(cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
    }
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

/// A child in its own process group, whose whole group is killed when dropped: for programs
/// that start servers of their own (the demo), which would outlive a plain kill.
pub struct GroupGuard(pub ChildGuard);

impl GroupGuard {
    pub fn spawn(cmd: &mut Command) -> GroupGuard {
        use std::os::unix::process::CommandExt;
        GroupGuard(ChildGuard::spawn(cmd.process_group(0)))
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.pid());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `limit` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub async fn wait_for_port(port: u16, limit: Duration) {
    wait_for(
        &format!("127.0.0.1:{port} to accept connections"),
        limit,
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await
}

/// Starts an HTTP server on 127.0.0.1 that answers every request with `name`, standing in for
/// one model version behind a router. Bound before it returns, so nothing races for its port.
pub async fn serve_name(name: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let app = axum::Router::new().fallback(move || async move { name });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// An HTTP client for tests: no proxy from the environment, a fresh connection per request (so
/// a load balancer decides every request anew), bounded.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("build reqwest client")
}

/// Sends `n` GET requests to `url` one after another and counts the answers by body.
pub async fn count_answers(
    client: &reqwest::Client,
    url: &str,
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let body = match client.get(url).send().await {
            Ok(r) if r.status().is_success() => {
                r.text().await.unwrap_or_else(|e| format!("error: {e}"))
            }
            Ok(r) => format!("status {}", r.status()),
            Err(e) => format!("error: {e}"),
        };
        *counts.entry(body).or_insert(0) += 1;
    }
    counts
}

/// Sends SIGTERM and waits up to five seconds for the process to exit. For servers with
/// worker processes (nginx, haproxy -W): the master stops its workers on SIGTERM, while the
/// SIGKILL of [`ChildGuard`]'s drop would orphan them.
pub fn terminate(child: &mut ChildGuard) {
    let pid = child.pid().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .is_ok_and(|s| s.success());
    for _ in 0..250 {
        if !sent || !child.alive() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The split of the router tests' rollout `fraud` (stable v1, canary v2) at a canary weight.
pub fn fraud_target(canary_weight: f64) -> canaryd::router::Target {
    canaryd::router::Target {
        rollout: "fraud".into(),
        stable: "v1".into(),
        canary: "v2".into(),
        canary_weight,
    }
}
