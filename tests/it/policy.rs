//! Policy files: the invalid corpus with the exact errors each must produce, the valid
//! fixtures, the shipped examples in `policies/`, and `canaryd check` end to end.
//!
//! Run with `CANARYD_BLESS=1` to rewrite the `.errors` files from the current messages after
//! a deliberate change; review the diff as a user would read it.

use canaryd::policy::{
    self, MetricKind, OnNoData, PrometheusAuth, RouterConfig, StrategyKind, ToleranceKind,
    WebhookEvent,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The YAML files of a directory under the crate root, sorted, as relative paths.
fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| Path::new(dir).join(p.file_name().unwrap()))
        .collect();
    files.sort();
    files
}

/// Validates a file by its path relative to the crate root, as a user in the repository
/// would type it (cargo runs integration tests from the crate root).
fn load(rel: &Path) -> Result<policy::Policy, policy::PolicyError> {
    assert!(root().join(rel).is_file(), "{} is missing", rel.display());
    policy::load_file(rel)
}

fn canaryd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn every_invalid_policy_reports_exactly_its_errors() {
    let bless = std::env::var_os("CANARYD_BLESS").is_some();
    let files = yaml_files("tests/data/invalid");
    assert!(
        files.len() >= 25,
        "the corpus has only {} files",
        files.len()
    );
    let mut mismatches = Vec::new();
    for f in &files {
        let err = match load(f) {
            Ok(_) => {
                mismatches.push(format!("{}: validated, but must not", f.display()));
                continue;
            }
            Err(e) => e,
        };
        let got = format!("{err}\n");
        let expected_file = root().join(f.with_extension("errors"));
        if bless {
            std::fs::write(&expected_file, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&expected_file)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_file.display()));
        if got != want {
            mismatches.push(format!("{}:\n--- want\n{want}--- got\n{got}", f.display()));
        }
        // Whatever the message, it says where and what: `file:line:col: [path: ]expected …`.
        let prefix = format!("{}:", f.display());
        for line in got.lines() {
            let rest = line
                .strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("{line:?} does not name the file"));
            let mut parts = rest.splitn(3, ':');
            let (l, c) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(
                l.parse::<u64>().is_ok_and(|n| n >= 1) && c.parse::<u64>().is_ok_and(|n| n >= 1),
                "{line:?} has no line and column"
            );
            assert!(
                line.contains("expected")
                    || line.contains("invalid YAML")
                    || line.contains("unknown field"),
                "{line:?} does not say what was expected"
            );
        }
    }
    // An `.errors` file without its policy would be a case that silently stopped running.
    for e in std::fs::read_dir(root().join("tests/data/invalid")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "errors") {
            let yaml = path.with_extension("yaml");
            if !yaml.is_file() {
                mismatches.push(format!("{}: no policy beside it", path.display()));
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn every_problem_of_a_file_is_reported_at_once() {
    let err = load(Path::new("tests/data/invalid/multiple-errors.yaml")).unwrap_err();
    assert!(err.problems.len() >= 8, "{err}");
    // In file order, so the user can fix them top to bottom.
    let positions: Vec<_> = err
        .problems
        .iter()
        .map(|p| (p.pos.line, p.pos.column))
        .collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted);
}

#[test]
fn valid_fixtures_validate() {
    let files = yaml_files("tests/data/valid");
    assert!(!files.is_empty());
    for f in files {
        if let Err(e) = load(&f) {
            panic!("{} must validate:\n{e}", f.display());
        }
    }
}

#[test]
fn defaults_fill_what_a_minimal_policy_leaves_out() {
    let p = load(Path::new("tests/data/valid/minimal.yaml")).unwrap();
    assert_eq!(p.model, p.name, "model defaults to the name");
    let s = &p.strategy;
    assert_eq!(
        s.kind,
        StrategyKind::Canary {
            steps: vec![10.0, 50.0]
        }
    );
    assert_eq!(s.interval, Duration::from_secs(30));
    assert_eq!(s.min_step_duration, Duration::from_secs(60));
    assert_eq!(s.failure_limit, 2);
    assert_eq!(s.progress_deadline, Duration::from_secs(7200));
    assert_eq!(s.on_no_data, OnNoData::Hold);
    assert!(!s.manual_promotion);
    assert_eq!(s.post_promotion_watch, Duration::ZERO);
    assert_eq!(s.router_deadline, Duration::from_secs(300));
    assert_eq!(p.metrics[0].min_samples, 100, "builtins need 100 events");
    assert!(!p.metrics[0].critical);
    assert!(p.webhooks.is_empty());
    assert_eq!(p.convention, policy::Convention::default());
}

#[test]
fn units_are_read_the_way_design_md_says() {
    let p = load(Path::new("tests/data/valid/every-field.yaml")).unwrap();
    let m = |name: &str| p.metric(name).unwrap_or_else(|| panic!("no metric {name}"));
    let err = &m("error-rate").bounds;
    assert_eq!(
        err.max.as_ref().map(|b| (b.value, b.written.as_str())),
        Some((0.01, "1%"))
    );
    let inc = err.max_increase.as_ref().unwrap();
    assert_eq!(inc.kind, ToleranceKind::Absolute);
    assert!((inc.amount - 0.005).abs() < 1e-12, "0.5pp is 0.005");
    assert!((inc.upper(0.01) - 0.015).abs() < 1e-12);
    let lat = m("p99-latency");
    assert_eq!(lat.kind, MetricKind::Latency { quantile: 0.99 });
    assert_eq!(
        lat.bounds.max.as_ref().unwrap().value,
        0.25,
        "250ms is 0.25 s"
    );
    let rel = lat.bounds.max_increase.as_ref().unwrap();
    assert_eq!(
        (rel.kind, rel.written.as_str()),
        (ToleranceKind::Relative, "10%")
    );
    assert!((rel.upper(0.2) - 0.22).abs() < 1e-12, "10% of stable");
    let delta = m("p50-latency").bounds.max_increase.as_ref().unwrap();
    assert_eq!(delta.kind, ToleranceKind::Absolute);
    assert!(
        (delta.amount - 0.02).abs() < 1e-12,
        "20ms is an absolute delta"
    );
    let acc = m("accuracy");
    assert_eq!(acc.bounds.min.as_ref().unwrap().value, 0.92);
    assert!((acc.bounds.max_decrease.as_ref().unwrap().lower(0.95) - 0.94).abs() < 1e-12);
    assert_eq!((acc.min_samples, acc.critical), (500, true));
    let conv = m("conversion");
    assert!(
        matches!(&conv.kind, MetricKind::Query { template } if template.contains("{{window}}"))
    );
    assert_eq!(conv.bounds.min.as_ref().unwrap().value, 0.03);
    assert_eq!(
        conv.min_samples, 0,
        "a raw query has no event count by default"
    );
    assert_eq!(
        m("bare").bounds.max.as_ref().unwrap().value,
        0.5,
        "a bare number is itself"
    );

    assert_eq!(p.analysis.confidence, 0.99);
    assert!(p.strategy.manual_promotion);
    assert_eq!(p.strategy.on_no_data, OnNoData::Fail);
    assert_eq!(
        p.strategy.post_promotion_watch,
        Duration::from_secs(15 * 60)
    );
    assert_eq!(p.strategy.interval, Duration::from_secs(90), "1m30s");
    match &p.router {
        RouterConfig::Haproxy {
            socket,
            backend,
            servers,
        } => {
            assert_eq!(
                (socket.as_str(), backend.as_str()),
                ("/run/haproxy/admin.sock", "fraud")
            );
            assert_eq!(servers.get("v2").map(String::as_str), Some("canary"));
        }
        other => panic!("router {other:?}"),
    }
    let events: Vec<WebhookEvent> = p.webhooks.iter().map(|w| w.on).collect();
    assert_eq!(
        events,
        vec![WebhookEvent::ConfirmPromotion, WebhookEvent::Rollback]
    );
    assert_eq!(p.webhooks[0].timeout, Duration::from_secs(10));
    let prom = p.prometheus.as_ref().unwrap();
    assert_eq!(prom.url, "http://prometheus.internal:9090");
    // The token file is named relative to the policy file, and its line end is not the token's.
    match &prom.auth {
        Some(PrometheusAuth::Bearer { token_file, token }) => {
            assert_eq!(
                token_file,
                Path::new("tests/data/valid/secrets/prometheus.token")
            );
            assert_eq!(token.expose(), "every-field-token-7f3a");
        }
        other => panic!("auth {other:?}"),
    }
    // Neither the policy's debug form nor its JSON holds the token.
    let json = serde_json::to_string(&p).unwrap();
    for shown in [format!("{p:?}"), json] {
        assert!(!shown.contains("every-field-token"), "{shown}");
        assert!(shown.contains("secrets/prometheus.token"), "{shown}");
    }
    assert_eq!(p.convention.requests, "http_requests_total");
    assert_eq!(p.convention.version_label, "release");
}

#[test]
fn shipped_example_policies_all_validate() {
    // Users copy these files; one that stops validating is a broken example, so this fails
    // the build instead of the user's first `canaryd check`.
    let files = yaml_files("policies");
    assert!(files.len() >= 4, "policies/ ships {} examples", files.len());
    for f in &files {
        if let Err(e) = load(f) {
            panic!("shipped policy {} no longer validates:\n{e}", f.display());
        }
    }
    let (code, out, err) = canaryd(&["check", "policies"]);
    assert_eq!(code, 0, "canaryd check policies:\n{out}{err}");
    assert_eq!(out.lines().count(), files.len(), "{out}");
    assert!(out.lines().all(|l| l.ends_with(": ok")), "{out}");
}

#[test]
fn shipped_examples_cover_the_four_kinds_of_rollout() {
    let load_one = |name: &str| load(&Path::new("policies").join(name)).unwrap();
    let fraud = load_one("fraud-detector.yaml");
    let kinds: Vec<&str> = fraud.metrics.iter().map(|m| m.kind.label()).collect();
    for builtin in ["error_rate", "latency", "accuracy"] {
        assert!(kinds.contains(&builtin), "fraud-detector lacks {builtin}");
    }
    assert_eq!(fraud.router.kind(), "haproxy");
    let all: Vec<policy::Policy> = yaml_files("policies")
        .iter()
        .map(|f| load(f).unwrap())
        .collect();
    assert!(
        all.iter()
            .any(|p| p.strategy.is_blue_green() && p.router.kind() == "nginx"),
        "a blue-green example on nginx"
    );
    assert!(
        all.iter().any(|p| p.router.kind() == "file"
            && p.metrics
                .iter()
                .any(|m| matches!(m.kind, MetricKind::Query { .. }))),
        "a custom PromQL example on the file router"
    );
    assert!(
        all.iter().any(|p| p.strategy.manual_promotion
            && p.router.kind() == "webhook"
            && p.webhooks
                .iter()
                .any(|w| w.on == WebhookEvent::ConfirmPromotion)
            && p.webhooks.iter().any(|w| w.on == WebhookEvent::Rollback)),
        "a manual-promotion example with webhooks on the webhook router"
    );
}

#[test]
fn check_exits_zero_when_all_files_are_valid() {
    let (code, out, _) = canaryd(&[
        "check",
        "tests/data/valid/minimal.yaml",
        "tests/data/valid/every-field.yaml",
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        "tests/data/valid/minimal.yaml: ok\ntests/data/valid/every-field.yaml: ok\n"
    );
}

#[test]
fn check_never_prints_a_prometheus_secret() {
    // The corpus's files name a token file that exists and one whose contents are refused:
    // neither secret may reach the output, valid or not.
    let (code, out, err) = canaryd(&[
        "check",
        "tests/data/valid/every-field.yaml",
        "tests/data/invalid/prometheus-auth-both.yaml",
        "tests/data/invalid/prometheus-token-file-two-lines.yaml",
        "tests/data/invalid/prometheus-basic-auth-problems.yaml",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("every-field.yaml: ok"), "{out}");
    for secret in [
        "every-field-token",
        "corpus-token",
        "line-5c1d",
        "line-88e0",
        "hunter2",
    ] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret}: {out}{err}"
        );
    }
}

/// Regression (acceptance test): a webhook's URL with a user and password was accepted, and
/// the URL was shown whole. `check` refuses the credentials and never shows a webhook URL's
/// user, password, path or query, which can all hold secrets.
#[test]
fn check_never_prints_a_webhook_urls_secrets() {
    let (code, out, err) = canaryd(&["check", "tests/data/invalid/webhook-credentials.yaml"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("webhooks[0].url: expected a URL without a user name or password"),
        "{out}"
    );
    for secret in [
        "hunter2", "s3cr3t", "alice", "tok123", "XXXX", "ml ops", "/hook",
    ] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret}: {out}{err}"
        );
    }
}

/// Secrets in a webhook URL's path or query (a Slack hook, `?token=`) are how many services
/// authenticate: they are accepted and kept as written, and only the origin is ever shown.
#[test]
fn webhook_urls_may_hold_secrets_in_their_path_and_query() {
    let slack = "https://hooks.slack.com/services/T0/B0/XXXX";
    let gate = "http://127.0.0.1:22080/gate/p4th-s3cret?token=tok123";
    let router = "https://traffic.internal/v1/splits/fraud?key=k3y";
    let text = format!(
        "name: demo\nstable: v1\ncanary: v2\nstrategy: {{steps: [10, 50]}}\n\
         metrics:\n  - {{name: errors, builtin: error_rate, max: 1%}}\n\
         router:\n  webhook: {{url: '{router}'}}\n\
         webhooks:\n  - {{on: promote, url: '{slack}'}}\n  - {{on: confirm-promotion, url: '{gate}'}}\n"
    );
    let p = policy::load_str("demo.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    let urls: Vec<&str> = p.webhooks.iter().map(|w| w.url.as_str()).collect();
    assert_eq!(urls, [slack, gate]);
    assert!(
        matches!(&p.router, RouterConfig::Webhook { url, .. } if url == router),
        "{:?}",
        p.router
    );
    assert_eq!(policy::url_origin(slack), "https://hooks.slack.com");
    assert_eq!(policy::url_origin(gate), "http://127.0.0.1:22080");
}
#[test]
fn check_without_secrets_checks_paths_but_reads_no_credentials_file() {
    let missing = "tests/data/invalid/prometheus-token-file-missing.yaml";
    let (code, out, _) = canaryd(&["check", missing]);
    assert_eq!(code, 1, "the daemon would refuse it: {out}");
    let (code, out, err) = canaryd(&["check", "--no-secrets", missing]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, format!("{missing}: ok\n"));
    // Everything else is still checked.
    let (code, out, _) = canaryd(&[
        "check",
        "--no-secrets",
        "tests/data/invalid/prometheus-auth-both.yaml",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("expected either bearer_token_file or basic_auth"),
        "{out}"
    );
    // And there is nothing to skip when Prometheus is asked.
    let (code, _, err) = canaryd(&["check", "--no-secrets", "--live", missing]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--no-secrets"), "{err}");
}

#[tokio::test]
async fn a_credentials_path_that_is_not_a_regular_file_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("token");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let policy = dir.path().join("p.yaml");
    std::fs::write(
        &policy,
        "name: p\nstable: v1\ncanary: v2\nstrategy: {steps: [10, 50]}\n\
         metrics: [{name: e, builtin: error_rate, max: 1%}]\n\
         router: {file: {path: /tmp/p.json}}\n\
         prometheus: {url: 'http://127.0.0.1:9', bearer_token_file: token}\n",
    )
    .unwrap();
    // Opening a FIFO without a writer blocks: the check must not even try.
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .arg("check")
        .arg(&policy)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(20), run)
        .await
        .expect("canaryd check blocked on a FIFO")
        .unwrap();
    let (status, out) = (output.status, String::from_utf8_lossy(&output.stdout));
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("prometheus.bearer_token_file: expected a readable file")
            && out.contains("not a regular file"),
        "{out}"
    );
}

#[test]
fn check_exits_one_and_prints_every_error_when_any_file_is_invalid() {
    let bad = "tests/data/invalid/multiple-errors.yaml";
    let (code, out, _) = canaryd(&["check", "tests/data/valid/minimal.yaml", bad]);
    assert_eq!(code, 1, "{out}");
    let want = std::fs::read_to_string(root().join(bad).with_extension("errors")).unwrap();
    assert_eq!(out, format!("tests/data/valid/minimal.yaml: ok\n{want}"));
}

#[test]
fn check_reads_a_directory_and_reports_unreadable_files() {
    let (code, out, _) = canaryd(&["check", "tests/data/invalid"]);
    assert_eq!(code, 1);
    assert!(out.contains("tests/data/invalid/empty.yaml:1:1: "), "{out}");
    assert!(!out.contains(": ok"), "{out}");

    let (code, out, _) = canaryd(&["check", "tests/data/no-such-policy.yaml"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("tests/data/no-such-policy.yaml:1:1: cannot read the file"),
        "{out}"
    );
}

#[test]
fn check_fails_on_a_directory_without_policies() {
    // Regression: `canaryd check` on an empty directory (a typo'd path in CI, say) printed
    // nothing and exited 0, as if every policy had passed.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let (code, out, err) = canaryd(&["check", path]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no policy files"), "{err}");
}

#[test]
fn a_huge_duration_is_reported_not_a_crash() {
    // Regression: the steps' total length was computed with `Duration * u32`, which panics on
    // overflow, so `canaryd check` crashed on a policy with an absurd min_step_duration.
    let text = std::fs::read_to_string(root().join("tests/data/valid/minimal.yaml")).unwrap();
    let text = text.replace(
        "steps: [10, 50]",
        "steps: [10, 50]\n  min_step_duration: 500000000000years",
    );
    let err = policy::load_str("huge.yaml", &text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("strategy.min_step_duration: expected a duration of at most 1year"),
        "{err}"
    );
}

#[test]
fn the_default_deadline_counts_when_steps_are_long() {
    // Regression: with progress_deadline left at its default (2h), three one-hour steps
    // validated, and every rollout of the policy was rolled back at the deadline.
    let err = load(Path::new(
        "tests/data/invalid/default-deadline-shorter-than-steps.yaml",
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("default progress_deadline of 2h"), "{err}");
}

#[test]
fn an_empty_file_is_one_error_not_seven() {
    // Regression: an empty file reported "the file is empty" and then every required field
    // as missing, burying the one thing to fix.
    for f in ["empty.yaml", "comments-only.yaml", "not-a-mapping.yaml"] {
        let err = load(&Path::new("tests/data/invalid").join(f)).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(
            (err.problems[0].pos.line, err.problems[0].pos.column),
            (1, 1),
            "{err}"
        );
    }
}

#[test]
fn a_duplicate_key_names_the_key_in_the_users_terms() {
    // Regression: the parser's advice to programmers ("set DuplicateKeyPolicy in Options")
    // reached users verbatim.
    let err = load(Path::new("tests/data/invalid/duplicate-key.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("duplicate key `name`"), "{err}");
    assert!(!err.contains("DuplicateKeyPolicy"), "{err}");
    assert!(
        !err.contains(" at line "),
        "the position is given once: {err}"
    );
}

/// Two files with one rollout name: the daemon would run only one of them, so `check` fails
/// the second, at its `name`, naming the first.
#[test]
fn check_refuses_a_rollout_name_defined_twice() {
    let dir = tempfile::tempdir().unwrap();
    let minimal = std::fs::read_to_string(root().join("tests/data/valid/minimal.yaml")).unwrap();
    std::fs::write(dir.path().join("a.yaml"), &minimal).unwrap();
    std::fs::write(dir.path().join("b.yaml"), &minimal).unwrap();
    let d = dir.path().display().to_string();
    let (code, out, _) = canaryd(&["check", &d]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("{d}/a.yaml: ok")), "{out}");
    let name_line = minimal
        .lines()
        .position(|l| l.starts_with("name:"))
        .unwrap()
        + 1;
    assert!(
        out.contains(&format!(
            "{d}/b.yaml:{name_line}:7: name: rollout \"minimal\" is already defined by {d}/a.yaml"
        )),
        "{out}"
    );
    // Another name (and its own router file), and both pass.
    std::fs::write(
        dir.path().join("b.yaml"),
        minimal
            .replace("name: minimal", "name: other")
            .replace("minimal.json", "other.json"),
    )
    .unwrap();
    let (code, out, _) = canaryd(&["check", &d]);
    assert_eq!(code, 0, "{out}");
}

/// Two policies driving one router target undo each other's weights at every interval (UAT:
/// fraud-a and fraud-b on one HAProxy backend flipped its weights every 2 s, both reported
/// healthy). `check` fails the second, at the field naming the target, naming the first file;
/// webhook routers are exempt, as their payload names the rollout.
#[test]
fn check_refuses_two_policies_on_one_router_target() {
    let haproxy = |socket: &str, backend: &str| {
        format!(
            "  haproxy:\n    socket: {socket}\n    backend: {backend}\n    servers: {{v1: a, v2: b}}"
        )
    };
    let nginx = |file: &str| {
        format!(
            "  nginx:\n    weights_file: {file}\n    reload: [nginx, -s, reload]\n    servers: {{v1: '127.0.0.1:1', v2: '127.0.0.1:2'}}"
        )
    };
    let file = |path: &str| format!("  file:\n    path: {path}");
    let webhook = |url: &str| format!("  webhook:\n    url: {url}");
    // (first router, second router, the second's refused field and its column, if refused)
    let cases = [
        (
            haproxy("127.0.0.1:9999", "fraud"),
            haproxy("tcp://127.0.0.1:9999", "fraud"),
            Some(("router.haproxy.backend", 14)),
        ),
        (
            haproxy("/run/haproxy.sock", "fraud"),
            haproxy("unix:///run/haproxy.sock", "fraud"),
            Some(("router.haproxy.backend", 14)),
        ),
        (
            haproxy("/run/haproxy.sock", "fraud"),
            haproxy("/run/haproxy.sock", "fraud-b"),
            None,
        ),
        (
            haproxy("/run/haproxy.sock", "fraud"),
            haproxy("/run/other.sock", "fraud"),
            None,
        ),
        (
            nginx("weights/fraud.conf"),
            nginx("./weights/fraud.conf"),
            Some(("router.nginx.weights_file", 19)),
        ),
        (
            nginx("/etc/nginx/fraud.conf"),
            file("/etc/nginx/fraud.conf"),
            Some(("router.file.path", 11)),
        ),
        (
            file("/tmp/fraud.json"),
            file("/tmp/fraud.json"),
            Some(("router.file.path", 11)),
        ),
        (file("/tmp/fraud.json"), file("/tmp/fraud-b.json"), None),
        // UAT: the same target written another way ran twice, each undoing the other.
        (
            haproxy("localhost:9999", "fraud"),
            haproxy("127.0.0.1:9999", "fraud"),
            Some(("router.haproxy.backend", 14)),
        ),
        (
            file("/tmp/fraud.json"),
            file("/tmp/nowhere/../fraud.json"),
            Some(("router.file.path", 11)),
        ),
        (
            nginx("weights/fraud.conf"),
            file(&root().join("weights/fraud.conf").display().to_string()),
            Some(("router.file.path", 11)),
        ),
        (
            webhook("https://router.internal/split"),
            webhook("https://router.internal/split"),
            None,
        ),
    ];
    for (first, second, refused) in cases {
        let dir = tempfile::tempdir().unwrap();
        let policy = |name: &str, canary: &str, router: &str| {
            format!(
                "name: {name}\nstable: v1\ncanary: {canary}\nstrategy:\n  steps: [10, 50]\nmetrics:\n  - {{name: errors, builtin: error_rate, max: 1%}}\nrouter:\n{router}\n"
            )
        };
        let b = policy("fraud-b", "v2", &second);
        std::fs::write(
            dir.path().join("fraud-a.yaml"),
            policy("fraud-a", "v2", &first),
        )
        .unwrap();
        std::fs::write(dir.path().join("fraud-b.yaml"), &b).unwrap();
        let d = dir.path().display().to_string();
        let (code, out, _) = canaryd(&["check", &d]);
        assert!(out.contains(&format!("{d}/fraud-a.yaml: ok")), "{out}");
        match refused {
            Some((field, column)) => {
                assert_eq!(code, 1, "{first} / {second}: {out}");
                let key = field.rsplit('.').next().unwrap();
                let line = b
                    .lines()
                    .position(|l| l.trim_start().starts_with(&format!("{key}:")))
                    .unwrap()
                    + 1;
                let at = format!("{d}/fraud-b.yaml:{line}:{column}: {field}: ");
                assert!(
                    out.lines()
                        .any(|l| l.starts_with(&at) && l.contains(&format!("{d}/fraud-a.yaml"))),
                    "expected {at}… naming fraud-a.yaml: {out}"
                );
            }
            None => assert_eq!(code, 0, "{first} / {second}: {out}"),
        }
    }
}

/// Review: `confidence: 95%` was accepted but `quantile: 99%` refused.
#[test]
fn a_quantile_may_be_written_as_a_percentage() {
    let text = std::fs::read_to_string(root().join("tests/data/valid/minimal.yaml")).unwrap();
    let text = text.replace(
        "builtin: error_rate\n    max: 1%",
        "builtin: latency\n    quantile: 99.9%\n    max: 250ms",
    );
    let p = policy::load_str("q.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    match p.metrics[0].kind {
        canaryd::policy::MetricKind::Latency { quantile } => {
            assert!((quantile - 0.999).abs() < 1e-12, "{quantile}")
        }
        ref k => panic!("not a latency metric: {k:?}"),
    }
}

/// UAT: `canaryd status NAME | head -1` panicked ("failed printing to stdout: Broken pipe").
/// A reader that goes away ends the output quietly, with the command's own exit code.
#[test]
fn a_closed_stdout_is_no_panic() {
    // A pipe whose reader is gone before the command writes its first line.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args(["check", "--no-secrets"])
        .args(std::iter::repeat_n("policies/fraud-detector.yaml", 3))
        .current_dir(root())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

/// UAT: `canaryd check … > /dev/full` exited 0 with nothing written. An output that cannot be
/// written, other than a reader that went away, fails the command and says why.
#[test]
fn an_unwritable_stdout_fails_the_check() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        panic!("/dev/full is missing on this machine");
    };
    let out = Command::new(env!("CARGO_BIN_EXE_canaryd"))
        .args(["check", "--no-secrets", "policies/fraud-detector.yaml"])
        .current_dir(root())
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write the output"), "{stderr}");
}

/// UAT: `reload: [true]` (the `true` command, read by YAML as a boolean) was refused as "an
/// empty list".
#[test]
fn a_reload_command_may_be_a_bare_word_yaml_reads_otherwise() {
    let text = "name: m\nstable: v1\ncanary: v2\nstrategy: {steps: [10, 50]}\nmetrics:\n  - {name: errors, builtin: error_rate, max: 1%}\nrouter:\n  nginx:\n    weights_file: /tmp/w.conf\n    reload: [true]\n    servers: {v1: '127.0.0.1:1', v2: '127.0.0.1:2'}\n";
    let p = policy::load_str("r.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    match p.router {
        policy::RouterConfig::Nginx { reload, .. } => assert_eq!(reload, ["true"]),
        other => panic!("{other:?}"),
    }
}
