//! The nginx router against a real nginx that includes the file the router writes.
use crate::support::fraud_target as target;

use crate::support::{
    ChildGuard, count_answers, find_binary, free_port, http_client, serve_name, terminate,
    wait_for, wait_for_port,
};
use canaryd::router::{NginxRouter, Router, RouterError};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Upstream servers for versions v1 (`stable`) and v2 (`canary`).
async fn servers() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("v1".to_string(), serve_name("stable").await.to_string()),
        ("v2".to_string(), serve_name("canary").await.to_string()),
    ])
}

fn router(file: PathBuf, reload: &[&str], servers: &BTreeMap<String, String>) -> NginxRouter {
    NginxRouter::new(
        file,
        reload.iter().map(|s| s.to_string()).collect(),
        "fraud",
        servers.clone(),
    )
    .expect("valid nginx router")
}

/// A running nginx under a prefix in a tempdir, proxying its port to upstream `fraud`.
pub struct Nginx {
    child: ChildGuard,
    _dir: tempfile::TempDir,
    pub weights: PathBuf,
    /// The command that reloads this nginx.
    pub reload: Vec<String>,
    pub port: u16,
    /// The command that starts it.
    start: Vec<String>,
}

impl Nginx {
    /// Starts nginx after writing the weights file for `initial` through the router, as
    /// canaryd does before anything routes through it.
    pub async fn start(servers: &BTreeMap<String, String>, initial: f64) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        // Run as root, nginx's workers become `nobody` and must be able to enter the prefix.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let prefix = dir.path();
        std::fs::create_dir_all(prefix.join("canaryd")).expect("mkdir");
        let weights = prefix.join("canaryd/fraud.conf");
        let port = free_port();
        let p = prefix.display();
        let conf = format!(
            "daemon off;\n\
             worker_processes 1;\n\
             pid {p}/nginx.pid;\n\
             error_log {p}/error.log warn;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {p}/body;\n\
             \x20   proxy_temp_path {p}/proxy;\n\
             \x20   fastcgi_temp_path {p}/fastcgi;\n\
             \x20   uwsgi_temp_path {p}/uwsgi;\n\
             \x20   scgi_temp_path {p}/scgi;\n\
             \x20   include {w};\n\
             \x20   server {{\n\
             \x20       listen 127.0.0.1:{port};\n\
             \x20       location / {{ proxy_pass http://fraud; }}\n\
             \x20   }}\n\
             }}\n",
            w = weights.display()
        );
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let base: Vec<String> = vec![
            find_binary("nginx").display().to_string(),
            "-p".into(),
            prefix.display().to_string(),
            "-c".into(),
            conf_path.display().to_string(),
            "-e".into(),
            prefix.join("error.log").display().to_string(),
        ];
        router(weights.clone(), &["true"], servers)
            .apply(&target(initial))
            .await
            .expect("initial weights");
        let child = Nginx::spawn(&base, port).await;
        let mut reload = base.clone();
        reload.extend(["-s".to_string(), "reload".to_string()]);
        Nginx {
            child,
            _dir: dir,
            weights,
            reload,
            port,
            start: base,
        }
    }

    async fn spawn(start: &[String], port: u16) -> ChildGuard {
        // nginx logs to its error log; its workers must not hold the test's stdout open.
        let child = ChildGuard::spawn(
            Command::new(&start[0])
                .args(&start[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_for_port(port, Duration::from_secs(10)).await;
        child
    }

    /// Stops nginx, as a crash or an operator would.
    fn stop(&mut self) {
        terminate(&mut self.child);
    }

    /// Starts it again with the same configuration: it reads the weights file as it is now.
    async fn restart(&mut self) {
        self.child = Nginx::spawn(&self.start, self.port).await;
    }

    fn router(&self, servers: &BTreeMap<String, String>) -> NginxRouter {
        let reload: Vec<&str> = self.reload.iter().map(String::as_str).collect();
        router(self.weights.clone(), &reload, servers)
    }

    /// Waits until a batch of `n` requests is answered as `want` says; a reload takes effect
    /// when nginx's new workers start, a moment after the reload command returns.
    async fn wait_for_traffic(
        &self,
        what: &str,
        n: usize,
        want: impl Fn(&BTreeMap<String, usize>) -> bool,
    ) {
        let client = http_client();
        let url = format!("http://127.0.0.1:{}/", self.port);
        wait_for(what, Duration::from_secs(15), || {
            let (client, url, want) = (&client, &url, &want);
            async move {
                let counts = count_answers(client, url, n).await;
                want(&counts).then_some(())
            }
        })
        .await
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

#[tokio::test]
async fn nginx_weights_steer_real_traffic_after_reload() {
    let servers = servers().await;
    let nginx = Nginx::start(&servers, 0.0).await;
    let router = nginx.router(&servers);
    assert_eq!(router.kind(), "nginx");

    nginx
        .wait_for_traffic("at 0 % all 40 requests to reach stable", 40, |c| {
            c.get("stable") == Some(&40)
        })
        .await;
    assert_eq!(router.read(&target(0.0)).await.expect("read"), 0.0);
    let text = std::fs::read_to_string(&nginx.weights).expect("weights file");
    assert!(
        text.contains(&format!("server {} down;", servers["v2"])),
        "{text}"
    );

    router.apply(&target(100.0)).await.expect("apply 100 %");
    assert_eq!(router.read(&target(100.0)).await.expect("read"), 100.0);
    nginx
        .wait_for_traffic("at 100 % all 40 requests to reach the canary", 40, |c| {
            c.get("canary") == Some(&40)
        })
        .await;

    router.apply(&target(50.0)).await.expect("apply 50 %");
    assert_eq!(router.read(&target(50.0)).await.expect("read"), 50.0);
    nginx
        .wait_for_traffic("at 50 % both versions to answer 40 requests", 40, |c| {
            c.get("stable").is_some_and(|n| *n >= 10) && c.get("canary").is_some_and(|n| *n >= 10)
        })
        .await;

    router.apply(&target(0.0)).await.expect("apply 0 %");
    nginx
        .wait_for_traffic("back at 0 % all 40 requests to reach stable", 40, |c| {
            c.get("stable") == Some(&40)
        })
        .await;
    // Applying the same split again changes nothing and needs no reload.
    router.apply(&target(0.0)).await.expect("apply 0 % again");
    assert_eq!(router.read(&target(0.0)).await.expect("read"), 0.0);
}

#[tokio::test]
async fn nginx_failed_reload_is_rejected_with_stderr_and_the_file_is_put_back() {
    let servers = servers().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("fraud.conf");
    router(file.clone(), &["true"], &servers)
        .apply(&target(10.0))
        .await
        .expect("apply with `true`");
    let before = std::fs::read_to_string(&file).expect("weights file");

    let err = router(file.clone(), &["false"], &servers)
        .apply(&target(20.0))
        .await
        .expect_err("`false` reload");
    assert!(
        matches!(&err, RouterError::Rejected(m) if m.contains("false")),
        "{err}"
    );

    let noisy = [
        "sh",
        "-c",
        "echo 'nginx: [emerg] boom-from-reload' >&2; exit 3",
    ];
    let r = router(file.clone(), &noisy, &servers);
    let err = r.apply(&target(30.0)).await.expect_err("failing reload");
    assert!(
        matches!(&err, RouterError::Rejected(m) if m.contains("boom-from-reload")),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).expect("weights file"),
        before,
        "the accepted file is put back"
    );
    assert_eq!(r.read(&target(30.0)).await.expect("read"), 10.0);

    // A first apply whose reload fails leaves no file behind, as before it.
    let fresh = dir.path().join("fresh.conf");
    let err = router(fresh.clone(), &["false"], &servers)
        .apply(&target(5.0))
        .await
        .expect_err("failing reload");
    assert!(matches!(err, RouterError::Rejected(_)));
    assert!(!fresh.exists());

    let err = router(file.clone(), &["/nonexistent/reload-nginx"], &servers)
        .apply(&target(5.0))
        .await
        .expect_err("missing command");
    assert!(
        matches!(&err, RouterError::Config(m) if m.contains("/nonexistent/reload-nginx")),
        "{err}"
    );

    let slow = router(file.clone(), &["sleep", "30"], &servers)
        .with_reload_timeout(Duration::from_millis(300));
    let err = slow.apply(&target(5.0)).await.expect_err("hung reload");
    assert!(
        matches!(&err, RouterError::Unreachable(m) if m.contains("sleep 30")),
        "{err}"
    );

    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["fraud.conf"], "no temporary files are left behind");
}

/// UAT: a rollback while nginx was down put the canary's split back in the file, so the
/// nginx that came back served the canary until the next retry. A split that sends nothing to
/// the canary stays in the file; reads fail until nginx has loaded it, so the rollback is not
/// taken as done before.
#[tokio::test]
async fn a_rollback_nginx_could_not_reload_stays_for_its_next_start() {
    let servers = servers().await;
    let mut nginx = Nginx::start(&servers, 20.0).await;
    let router = nginx.router(&servers);
    router.apply(&target(20.0)).await.expect("apply 20 %");
    nginx.stop();
    let err = router.apply(&target(0.0)).await.expect_err("nginx is down");
    assert!(matches!(err, RouterError::Rejected(_)), "{err}");
    let err = router.read(&target(0.0)).await.expect_err("not loaded");
    assert!(err.to_string().contains("nginx has not loaded"), "{err}");
    // The file says so: a restarted daemon's router knows it too.
    let restarted = nginx.router(&servers);
    let err = restarted.read(&target(0.0)).await.expect_err("not loaded");
    assert!(err.to_string().contains("nginx has not loaded"), "{err}");
    nginx.restart().await;
    nginx
        .wait_for_traffic(
            "the restarted nginx to send all 40 requests to stable",
            40,
            |c| c.get("stable") == Some(&40),
        )
        .await;
    // Reads change nothing: still not taken until an apply reloads nginx.
    assert!(restarted.read(&target(0.0)).await.is_err());
    restarted
        .apply(&target(0.0))
        .await
        .expect("nginx reloads again");
    assert_eq!(restarted.read(&target(0.0)).await.expect("read"), 0.0);
    let text = std::fs::read_to_string(&nginx.weights).expect("weights file");
    assert!(!text.contains("not loaded"), "{text}");
}

/// Review: a split written but never reloaded (the daemon killed between the two, or its
/// apply given up on mid-reload) read as taken, so the rollout counted its step's time at a
/// weight nginx did not have. Until its reload has finished, the file reads as not taken.
#[tokio::test]
async fn a_split_whose_reload_never_finished_reads_as_not_taken() {
    let servers = servers().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("w.conf");
    let fine = router(file.clone(), &["true"], &servers);
    fine.apply(&target(10.0)).await.expect("apply 10 %");
    let text = std::fs::read_to_string(&file).expect("weights file");
    assert!(!text.contains("not loaded"), "the mark comes off: {text}");
    assert_eq!(fine.read(&target(10.0)).await.expect("read"), 10.0);
    // An apply of 50 % stopped while its reload runs, as a daemon killed then would.
    let slow = router(file.clone(), &["sleep", "30"], &servers);
    let stopped = tokio::time::timeout(Duration::from_millis(300), slow.apply(&target(50.0))).await;
    assert!(stopped.is_err(), "still reloading");
    for r in [&fine, &slow] {
        let err = r.read(&target(50.0)).await.expect_err("not loaded");
        assert!(
            err.to_string().contains("nginx has not loaded")
                && err.to_string().contains("its reload has not finished"),
            "{err}"
        );
    }
    fine.apply(&target(50.0)).await.expect("apply 50 % again");
    assert_eq!(fine.read(&target(50.0)).await.expect("read"), 50.0);
}

/// UAT: a reload command that hung was killed after its timeout, but what it had started
/// (`sh -c "sleep …; nginx -s reload"`) went on running.
#[tokio::test]
async fn a_hung_reload_command_is_killed_with_its_children() {
    let servers = servers().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("child.pid");
    let script = format!("sleep 60 & echo $! > {}; wait", pid_file.display());
    let slow = router(dir.path().join("w.conf"), &["sh", "-c", &script], &servers)
        .with_reload_timeout(Duration::from_secs(3));
    let err = slow.apply(&target(5.0)).await.expect_err("hung reload");
    assert!(
        matches!(&err, RouterError::Unreachable(m) if m.contains("did not finish")),
        "{err}"
    );
    let pid = std::fs::read_to_string(&pid_file).expect("the child's pid");
    let stat = format!("/proc/{}/stat", pid.trim());
    // Gone, or a zombie waiting for a reaper: not running either way.
    wait_for("the child killed", Duration::from_secs(10), || async {
        let state = std::fs::read_to_string(&stat).ok().and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
        });
        matches!(state.as_deref(), None | Some("Z" | "X")).then_some(())
    })
    .await;
}

/// UAT: after a promotion of v2 over v1, the next rollout (v2 to v3, `servers` naming v2 and
/// v3 only) could not start: the file's `down` line for v1 was "not one of the configured"
/// servers. A server that gets nothing is harmless; one that gets traffic is still refused.
#[tokio::test]
async fn the_next_rollout_reads_the_file_the_last_one_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("fraud.conf");
    let first = BTreeMap::from([
        ("v1".to_string(), "127.0.0.1:1".to_string()),
        ("v2".to_string(), "127.0.0.1:2".to_string()),
    ]);
    router(file.clone(), &["true"], &first)
        .apply(&target(100.0))
        .await
        .expect("promote v2");
    let next = BTreeMap::from([
        ("v2".to_string(), "127.0.0.1:2".to_string()),
        ("v3".to_string(), "127.0.0.1:3".to_string()),
    ]);
    let t = canaryd::router::Target {
        rollout: "fraud".into(),
        stable: "v2".into(),
        canary: "v3".into(),
        canary_weight: 0.0,
    };
    let r = router(file.clone(), &["true"], &next);
    assert_eq!(r.read(&t).await.expect("the file v2's promotion left"), 0.0);
    // v1 with traffic is another matter: nothing would take it away.
    router(file.clone(), &["true"], &first)
        .apply(&target(50.0))
        .await
        .expect("v1 at 50 %");
    let err = r.read(&t).await.expect_err("v1 still serves");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

#[tokio::test]
async fn nginx_read_reports_the_file_and_refuses_files_it_did_not_write() {
    let servers = servers().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("fraud.conf");
    let r = router(file.clone(), &["true"], &servers);
    assert_eq!(r.read(&target(0.0)).await.expect("missing file"), 0.0);

    r.apply(&target(12.5)).await.expect("apply");
    assert_eq!(r.read(&target(12.5)).await.expect("read"), 12.5);

    let (v1, v2) = (&servers["v1"], &servers["v2"]);
    let cases = [
        format!("upstream other {{\n server {v1} weight=1;\n}}\n"),
        format!("upstream fraud {{\n server {v1} weight=1;\n"),
        format!("upstream fraud {{\n server {v1} weight=0;\n}}\n"),
        "upstream fraud {\n server 10.9.9.9:1 weight=1;\n}\n".to_string(),
        format!("upstream fraud {{\n server {v1} down;\n server {v2} down;\n}}\n"),
        "not nginx at all".to_string(),
    ];
    for text in cases {
        std::fs::write(&file, &text).expect("write");
        let err = r.read(&target(0.0)).await.expect_err(&text);
        assert!(
            matches!(&err, RouterError::BadResponse(m) if m.contains("fraud.conf")),
            "{text:?}: {err}"
        );
    }

    let err = NginxRouter::new(file, vec!["true".into()], "fraud; evil", servers)
        .expect_err("bad upstream name");
    assert!(
        matches!(&err, RouterError::Config(m) if m.contains("fraud; evil")),
        "{err}"
    );
}
