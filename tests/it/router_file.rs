//! The file router and `from_policy`.
use crate::support::fraud_target as target;

use canaryd::router::{FileRouter, Router, RouterError, from_policy};
use canaryd::time::{ManualClock, Time};
use serde_json::{Value, json};
use std::sync::Arc;

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn file_round_trip_is_atomic_and_stamped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fraud.json");
    let clock = Arc::new(ManualClock::new(Time(1_767_225_600_000)));
    let r = FileRouter::new(path.clone(), clock.clone());
    assert_eq!(r.kind(), "file");

    // Nothing written yet: nothing can route to the canary.
    assert_eq!(r.read(&target(0.0)).await.expect("missing file"), 0.0);

    r.apply(&target(10.0)).await.expect("apply");
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    assert_eq!(
        doc,
        json!({"rollout": "fraud", "stable": "v1", "canary": "v2",
               "weights": {"v1": 90.0, "v2": 10.0}, "updated_at": "2026-01-01T00:00:00Z"})
    );
    assert_eq!(r.read(&target(10.0)).await.expect("read"), 10.0);

    clock.advance(std::time::Duration::from_secs(60));
    for w in [25.0, 50.0, 100.0, 0.0] {
        r.apply(&target(w)).await.expect("apply");
        assert_eq!(r.read(&target(w)).await.expect("read"), w);
    }
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    assert_eq!(doc["updated_at"], json!("2026-01-01T00:01:00Z"));
    assert_eq!(
        entries(dir.path()),
        ["fraud.json"],
        "no temporary files are left behind"
    );
}

/// Review: the atomic replace gave the file the temporary file's mode (0666 less the umask),
/// so a consumer allowed in by the file's own mode lost it at canaryd's first write.
#[tokio::test]
async fn a_rewritten_file_keeps_its_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fraud.json");
    let r = FileRouter::new(path.clone(), Arc::new(ManualClock::new(Time(0))));
    r.apply(&target(10.0)).await.expect("apply");
    let mode = 0o604;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    r.apply(&target(25.0)).await.expect("apply");
    let kept = std::fs::metadata(&path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(kept, mode, "{kept:o}");
}

#[tokio::test]
async fn file_errors_are_classified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fraud.json");
    let r = FileRouter::new(path.clone(), Arc::new(ManualClock::new(Time(0))));

    for corrupt in [
        "{\"rollout\": \"fraud\", \"weig",
        "[]",
        "{\"rollout\": \"fraud\"}",
    ] {
        std::fs::write(&path, corrupt).expect("write");
        let err = r.read(&target(0.0)).await.expect_err(corrupt);
        assert!(
            matches!(&err, RouterError::BadResponse(m) if m.contains("fraud.json")),
            "{corrupt}: {err}"
        );
    }
    std::fs::write(
        &path,
        r#"{"rollout": "other", "stable": "v1", "canary": "v2", "weights": {"v1": 95, "v2": 5}}"#,
    )
    .expect("write");
    let err = r
        .read(&target(0.0))
        .await
        .expect_err("another rollout's file");
    assert!(
        matches!(&err, RouterError::BadResponse(m) if m.contains("other")),
        "{err}"
    );

    let err = r.apply(&target(101.0)).await.expect_err("weight above 100");
    assert!(
        matches!(&err, RouterError::Config(m) if m.contains("101")),
        "{err}"
    );

    let nowhere = dir.path().join("no/such/dir/fraud.json");
    let err = FileRouter::new(nowhere, Arc::new(ManualClock::new(Time(0))))
        .apply(&target(5.0))
        .await
        .expect_err("missing directory");
    assert!(
        matches!(&err, RouterError::Config(m) if m.contains("no/such/dir")),
        "{err}"
    );
}

fn policy(router: &str) -> String {
    format!(
        "name: fraud\nstable: v1\ncanary: v2\nstrategy: {{steps: [10, 50], interval: 30s}}\n\
         metrics:\n  - {{name: errors, builtin: error_rate, max: 1%}}\nrouter:\n  {router}\n"
    )
}

#[test]
fn from_policy_builds_every_router() {
    let cases = [
        (
            "haproxy: {socket: /run/haproxy/admin.sock, backend: fraud, servers: {v1: a, v2: b}}",
            "haproxy",
        ),
        (
            "nginx: {weights_file: /tmp/x.conf, reload: [nginx, -s, reload], servers: {v1: 'h:1', v2: 'h:2'}}",
            "nginx",
        ),
        (
            "webhook: {url: 'http://router.internal/weights', timeout: 5s}",
            "webhook",
        ),
        ("file: {path: /var/lib/canaryd/fraud.json}", "file"),
    ];
    for (yaml, kind) in cases {
        let p = canaryd::policy::load_str("fraud.yaml", &policy(yaml))
            .unwrap_or_else(|e| panic!("{yaml}: {e}"));
        let r = from_policy(&p).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        assert_eq!(r.kind(), kind);
    }
}

/// UAT: a file another rollout left with all traffic on its stable (it moved to another
/// router) could never be taken by a new policy ("belongs to rollout …"). Such a file is free;
/// one that still sends the other rollout's canary traffic is not.
#[tokio::test]
async fn a_file_another_rollout_left_on_stable_is_free_and_one_with_its_canary_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.json");
    let r = FileRouter::new(path.clone(), Arc::new(ManualClock::new(Time(0))));
    let other = |canary_weight: f64| canaryd::router::Target {
        rollout: "alpha".into(),
        canary: "v9".into(),
        ..target(canary_weight)
    };
    r.apply(&other(10.0)).await.expect("apply");
    let err = r
        .read(&target(0.0))
        .await
        .expect_err("alpha's canary has traffic");
    assert!(
        err.to_string().contains("belongs to rollout \"alpha\""),
        "{err}"
    );
    r.apply(&other(0.0)).await.expect("apply");
    assert_eq!(r.read(&target(0.0)).await.expect("free"), 0.0);
    r.apply(&target(10.0)).await.expect("taken over");
    assert_eq!(r.read(&target(10.0)).await.expect("read"), 10.0);
}
