//! The HAProxy router against a real haproxy with three servers behind one backend.
use crate::support::fraud_target as target;

use crate::support::{
    ChildGuard, count_answers, find_binary, free_port, http_client, serve_name, terminate,
    wait_for, wait_for_port,
};
use canaryd::router::{HaproxyRouter, Router, RouterError, Target};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running haproxy: `stable`, `canary` and `old` servers in backend `be`, each answering
/// with its own name, and the runtime API on a unix socket and on TCP.
struct Haproxy {
    child: ChildGuard,
    dir: tempfile::TempDir,
    sock: PathBuf,
    tcp_port: u16,
    http_port: u16,
}

impl Haproxy {
    async fn start() -> Haproxy {
        let stable = serve_name("stable").await;
        let canary = serve_name("canary").await;
        let old = serve_name("old").await;
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("admin.sock");
        let tcp_port = free_port();
        let http_port = free_port();
        let cfg = format!(
            "global\n\
             \x20   nbthread 1\n\
             \x20   stats socket {sock} level admin\n\
             \x20   stats socket ipv4@127.0.0.1:{tcp_port} level admin\n\
             defaults\n\
             \x20   mode http\n\
             \x20   timeout connect 2s\n\
             \x20   timeout client 10s\n\
             \x20   timeout server 10s\n\
             frontend fe\n\
             \x20   bind 127.0.0.1:{http_port}\n\
             \x20   default_backend be\n\
             backend be\n\
             \x20   balance roundrobin\n\
             \x20   server stable {stable} weight 1\n\
             \x20   server canary {canary} weight 1\n\
             \x20   server old {old} weight 1\n",
            sock = sock.display()
        );
        let cfg_path = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg_path, cfg).expect("write haproxy.cfg");
        let child = ChildGuard::spawn(
            Command::new(find_binary("haproxy"))
                // Master-worker mode, so that a test can reload it the way operators do.
                .arg("-W")
                .arg("-q")
                .arg("-db")
                .arg("-f")
                .arg(&cfg_path),
        );
        wait_for_port(http_port, Duration::from_secs(10)).await;
        wait_for_port(tcp_port, Duration::from_secs(10)).await;
        let s = sock.clone();
        wait_for("the haproxy unix socket", Duration::from_secs(10), || {
            let s = s.clone();
            async move { tokio::net::UnixStream::connect(&s).await.ok().map(|_| ()) }
        })
        .await;
        Haproxy {
            child,
            dir,
            sock,
            tcp_port,
            http_port,
        }
    }

    fn router(&self, socket: &str, backend: &str, canary_server: &str) -> HaproxyRouter {
        let servers = BTreeMap::from([
            ("v0".to_string(), "old".to_string()),
            ("v1".to_string(), "stable".to_string()),
            ("v2".to_string(), canary_server.to_string()),
        ]);
        HaproxyRouter::new(socket, backend, servers).expect("valid haproxy router")
    }

    fn unix_router(&self) -> HaproxyRouter {
        self.router(&self.sock.display().to_string(), "be", "canary")
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.http_port)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// One runtime API command sent by the test itself, to check what haproxy really has.
async fn runtime(sock: &Path, cmd: &str) -> String {
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .expect("connect to haproxy socket");
    s.write_all(format!("{cmd}\n").as_bytes())
        .await
        .expect("write command");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read answer");
    out
}

#[tokio::test]
async fn haproxy_weights_steer_real_traffic() {
    let h = Haproxy::start().await;
    let router = h.unix_router();
    let client = http_client();
    assert_eq!(router.kind(), "haproxy");

    // Before canaryd touches it, every server has its configured weight of 1.
    assert_eq!(router.read(&target(0.0)).await.expect("read"), 100.0 / 3.0);

    router.apply(&target(0.0)).await.expect("apply 0 %");
    assert_eq!(
        runtime(&h.sock, "get weight be/stable").await.trim(),
        "100 (initial 1)"
    );
    assert_eq!(
        runtime(&h.sock, "get weight be/canary").await.trim(),
        "0 (initial 1)"
    );
    assert_eq!(
        runtime(&h.sock, "get weight be/old").await.trim(),
        "0 (initial 1)"
    );
    assert_eq!(router.read(&target(0.0)).await.expect("read"), 0.0);
    let counts = count_answers(&client, &h.url(), 200).await;
    assert_eq!(
        counts.get("stable"),
        Some(&200),
        "at 0 % only stable answers: {counts:?}"
    );

    router.apply(&target(50.0)).await.expect("apply 50 %");
    assert_eq!(router.read(&target(50.0)).await.expect("read"), 50.0);
    let counts = count_answers(&client, &h.url(), 200).await;
    // Round robin over equal weights alternates; 60 of 200 leaves room for any interleaving
    // of haproxy's scheduler without ever passing for a broken split.
    let stable = counts.get("stable").copied().unwrap_or(0);
    let canary = counts.get("canary").copied().unwrap_or(0);
    assert!(
        stable >= 60 && canary >= 60 && stable + canary == 200,
        "at 50 % both answer: {counts:?}"
    );

    router.apply(&target(100.0)).await.expect("apply 100 %");
    assert_eq!(router.read(&target(100.0)).await.expect("read"), 100.0);
    let counts = count_answers(&client, &h.url(), 100).await;
    assert_eq!(
        counts.get("canary"),
        Some(&100),
        "at 100 % only the canary answers: {counts:?}"
    );

    // Whole percents are exact. A finer one is held as the nearest integers (0.3 % as 1 of
    // 256) and reads back as the target while those integers are in place, and as what the
    // integers really give once anything else changes them.
    router.apply(&target(5.0)).await.expect("apply 5 %");
    assert_eq!(router.read(&target(5.0)).await.expect("read"), 5.0);
    router.apply(&target(0.3)).await.expect("apply 0.3 %");
    assert_eq!(
        runtime(&h.sock, "get weight be/canary").await.trim(),
        "1 (initial 1)"
    );
    assert_eq!(
        runtime(&h.sock, "get weight be/stable").await.trim(),
        "255 (initial 1)"
    );
    assert_eq!(router.read(&target(0.3)).await.expect("read"), 0.3);
    assert_eq!(runtime(&h.sock, "set weight be/canary 2").await.trim(), "");
    assert_eq!(
        router.read(&target(0.3)).await.expect("read"),
        200.0 / 257.0
    );
}

#[tokio::test]
async fn haproxy_over_tcp_and_a_reload_resets_weights_until_reapplied() {
    let h = Haproxy::start().await;
    let with_scheme = h.router(&format!("tcp://127.0.0.1:{}", h.tcp_port), "be", "canary");
    let bare = h.router(&format!("127.0.0.1:{}", h.tcp_port), "be", "canary");
    with_scheme
        .apply(&target(25.0))
        .await
        .expect("apply over tcp://");
    assert_eq!(
        bare.read(&target(25.0)).await.expect("read over host:port"),
        25.0
    );
    assert_eq!(
        runtime(&h.sock, "get weight be/canary").await.trim(),
        "25 (initial 1)"
    );

    // A real reload (SIGUSR2 to the master) starts a new worker with the configuration's
    // weights; the next read sees them, which is what makes the controller re-apply. The
    // master binds its listeners before it installs its signal handlers and ignores a USR2
    // that comes in between, so the signal is repeated every second until the reload shows.
    let master = h.child.pid().to_string();
    let polls = std::cell::Cell::new(0u32);
    wait_for(
        "the reloaded haproxy to report its configured weights",
        Duration::from_secs(10),
        || {
            let n = polls.replace(polls.get() + 1);
            let (master, bare) = (&master, &bare);
            async move {
                if n.is_multiple_of(20) {
                    let status = Command::new("kill")
                        .args(["-USR2", master])
                        .status()
                        .expect("run kill");
                    assert!(status.success(), "kill -USR2 {master}: {status}");
                }
                bare.read(&target(25.0))
                    .await
                    .ok()
                    .filter(|w| *w == 100.0 / 3.0)
            }
        },
    )
    .await;
    assert_eq!(bare.read(&target(25.0)).await.expect("read"), 100.0 / 3.0);
    bare.apply(&target(25.0)).await.expect("re-apply");
    assert_eq!(bare.read(&target(25.0)).await.expect("read"), 25.0);
}

#[tokio::test]
async fn haproxy_refusals_and_missing_sockets_are_classified() {
    let h = Haproxy::start().await;
    let sock = h.sock.display().to_string();

    let err = h
        .router(&sock, "nope", "canary")
        .apply(&target(10.0))
        .await
        .expect_err("unknown backend");
    assert!(
        matches!(&err, RouterError::Rejected(m) if m.contains("No such backend") && m.contains("nope")),
        "{err}"
    );

    let ghost = h.router(&sock, "be", "ghost");
    let err = ghost
        .apply(&target(10.0))
        .await
        .expect_err("unknown server");
    assert!(
        matches!(&err, RouterError::Rejected(m) if m.contains("No such server") && m.contains("ghost")),
        "{err}"
    );
    let err = ghost.read(&target(10.0)).await.expect_err("unknown server");
    assert!(
        matches!(&err, RouterError::Rejected(m) if m.contains("ghost")),
        "{err}"
    );

    let router = h.unix_router();
    let err = router
        .apply(&Target {
            canary: "v9".into(),
            ..target(10.0)
        })
        .await
        .expect_err("version without a server");
    assert!(
        matches!(&err, RouterError::Config(m) if m.contains("v9")),
        "{err}"
    );

    // Every server at 0: no version gets traffic, so there is no share to report.
    for server in ["stable", "canary", "old"] {
        runtime(&h.sock, &format!("set weight be/{server} 0")).await;
    }
    let err = router.read(&target(0.0)).await.expect_err("all weights 0");
    assert!(
        matches!(&err, RouterError::BadResponse(m) if m.contains("weight 0")),
        "{err}"
    );

    let missing = h.dir.path().join("missing.sock").display().to_string();
    let err = h
        .router(&missing, "be", "canary")
        .read(&target(0.0))
        .await
        .expect_err("no socket");
    assert!(
        matches!(&err, RouterError::Unreachable(m) if m.contains("missing.sock")),
        "{err}"
    );

    let closed = format!("127.0.0.1:{}", free_port());
    let err = h
        .router(&closed, "be", "canary")
        .apply(&target(0.0))
        .await
        .expect_err("nothing listening");
    assert!(
        matches!(&err, RouterError::Unreachable(m) if m.contains(&closed)),
        "{err}"
    );
}

/// Regression: a server of the backend that no version names took its share unseen. With it
/// at weight 20 beside a 40/60 split, canaryd read 60 % while the canary got 50 %.
#[tokio::test]
async fn haproxy_read_fails_while_a_server_no_version_names_takes_traffic() {
    let h = Haproxy::start().await;
    // `old` is in the backend but not in the policy's servers.
    let servers = BTreeMap::from([
        ("v1".to_string(), "stable".to_string()),
        ("v2".to_string(), "canary".to_string()),
    ]);
    let router = HaproxyRouter::new(&h.sock.display().to_string(), "be", servers).expect("valid");
    router.apply(&target(60.0)).await.expect("apply 60 %");
    assert_eq!(runtime(&h.sock, "set weight be/old 20").await.trim(), "");
    let err = router
        .read(&target(60.0))
        .await
        .expect_err("an unnamed server takes traffic");
    let RouterError::Config(message) = &err else {
        panic!("{err}")
    };
    for want in [
        "old (weight 20)",
        "They take 17% of the traffic",
        "the canary gets 50%, not the 60% it has among the named servers",
        "set weight be/old 0",
    ] {
        assert!(message.contains(want), "{want:?} not in: {message}");
    }
    // canaryd does not touch a server it was not given.
    router.apply(&target(60.0)).await.expect("apply 60 %");
    assert_eq!(
        runtime(&h.sock, "get weight be/old").await.trim(),
        "20 (initial 1)"
    );
    // In maintenance, or at weight 0, it takes nothing, and the split reads as it is.
    assert_eq!(
        runtime(&h.sock, "set server be/old state maint")
            .await
            .trim(),
        ""
    );
    assert_eq!(router.read(&target(60.0)).await.expect("read"), 60.0);
    assert_eq!(
        runtime(&h.sock, "set server be/old state ready")
            .await
            .trim(),
        ""
    );
    assert!(router.read(&target(60.0)).await.is_err());
    assert_eq!(runtime(&h.sock, "set weight be/old 0").await.trim(), "");
    assert_eq!(router.read(&target(60.0)).await.expect("read"), 60.0);
}

/// Review: a server in maintenance or draining takes no requests whatever its weight, but
/// was read by its weight: with stable in maintenance HAProxy sent everything to the canary
/// while canaryd read the step's 20 %.
#[tokio::test]
async fn haproxy_read_counts_a_server_in_maintenance_or_drain_as_taking_nothing() {
    let h = Haproxy::start().await;
    let router = h.unix_router();
    router.apply(&target(20.0)).await.expect("apply 20 %");
    assert_eq!(router.read(&target(20.0)).await.expect("read"), 20.0);
    for state in ["maint", "drain"] {
        let cmd = format!("set server be/stable state {state}");
        assert_eq!(runtime(&h.sock, &cmd).await.trim(), "");
        assert_eq!(
            router.read(&target(20.0)).await.expect("read"),
            100.0,
            "{state}"
        );
        assert_eq!(
            runtime(&h.sock, "set server be/stable state ready")
                .await
                .trim(),
            ""
        );
        assert_eq!(router.read(&target(20.0)).await.expect("read"), 20.0);
    }
    assert_eq!(
        runtime(&h.sock, "set server be/canary state maint")
            .await
            .trim(),
        ""
    );
    assert_eq!(router.read(&target(20.0)).await.expect("read"), 0.0);
    assert_eq!(
        runtime(&h.sock, "set server be/stable state maint")
            .await
            .trim(),
        ""
    );
    let err = router
        .read(&target(20.0))
        .await
        .expect_err("no server takes requests");
    assert!(
        err.to_string()
            .contains("in maintenance, draining or down: canary, stable")
            || err
                .to_string()
                .contains("in maintenance, draining or down: stable, canary"),
        "{err}"
    );
}

#[tokio::test]
async fn haproxy_silent_socket_times_out() {
    // A listener that accepts and never answers stands in for a hung haproxy.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let servers = BTreeMap::from([
        ("v1".to_string(), "a".to_string()),
        ("v2".to_string(), "b".to_string()),
    ]);
    let shared = BTreeMap::from([
        ("v1".to_string(), "a".to_string()),
        ("v2".to_string(), "a".to_string()),
    ]);
    let err = HaproxyRouter::new(&addr.to_string(), "be", shared)
        .expect_err("one server for two versions");
    assert!(
        matches!(&err, RouterError::Config(m) if m.contains("\"a\"")),
        "{err}"
    );
    let router = HaproxyRouter::new(&addr.to_string(), "be", servers)
        .expect("valid")
        .with_timeout(Duration::from_millis(300));
    let err = router.read(&target(0.0)).await.expect_err("silent socket");
    assert!(
        matches!(&err, RouterError::Unreachable(m) if m.contains("within")),
        "{err}"
    );
}
