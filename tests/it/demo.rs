//! `canaryd demo` end to end, as a user runs it: it must promote the good canary and roll back
//! the bad one. While it is still up (`--keep`), every dashboard query and recording rule must
//! return data from the demo's Prometheus; Ctrl-C must then stop everything it started.
//!
//! The demo uses fixed ports (those of the shipped prometheus.yml), so this is the only test
//! that runs it.

use crate::dashboards::{dashboard_queries_with, default_variables};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

async fn query_range(client: &reqwest::Client, promql: &str) -> Value {
    let now: Value = client
        .get("http://127.0.0.1:9090/api/v1/query")
        .query(&[("query", "time()")])
        .send()
        .await
        .expect("prometheus answers")
        .json()
        .await
        .expect("json");
    let end: f64 = now["data"]["result"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("time()");
    client
        .get("http://127.0.0.1:9090/api/v1/query_range")
        .query(&[
            ("query", promql.to_string()),
            ("start", format!("{:.3}", end - 240.0)),
            ("end", format!("{end:.3}")),
            ("step", "2s".to_string()),
        ])
        .send()
        .await
        .unwrap_or_else(|e| panic!("{promql}: {e}"))
        .json()
        .await
        .expect("json")
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_promotes_the_good_canary_rolls_back_the_bad_and_feeds_every_dashboard() {
    let mut group = crate::support::GroupGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_canaryd"))
            .args(["demo", "--keep"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let child = &mut group.0;
    let stdout = child.0.stdout.take().expect("piped stdout");
    // Read the demo's output on a thread until it says it is waiting for Ctrl-C.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("demo | {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut output = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains("still running (--keep)");
                output.push(line);
                if done {
                    break;
                }
            }
            Err(_) => panic!("the demo did not reach its summary:\n{}", output.join("\n")),
        }
    }
    let text = output.join("\n");
    assert!(text.contains("demo passed"), "{text}");
    assert!(text.contains("good canary v2   promoted"), "{text}");
    assert!(text.contains("bad canary v3    rolled-back"), "{text}");

    // Prometheus scrapes every 5 s; the summary can come before it has seen the rollback.
    let probe = reqwest::Client::new();
    crate::support::wait_for(
        "Prometheus to scrape the rollback",
        Duration::from_secs(30),
        || {
            let probe = probe.clone();
            async move {
                let v: Value = probe
                    .get("http://127.0.0.1:9090/api/v1/query")
                    .query(&[(
                        "query",
                        "canaryd_rollout_phase{rollout=\"demo\",phase=\"rolled-back\"} == 1",
                    )])
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                (!v["data"]["result"].as_array()?.is_empty()).then_some(())
            }
        },
    )
    .await;

    // Every dashboard query and recording rule returns data for the demo's rollout.
    let mut vars = default_variables();
    vars.insert("rollout".into(), "demo".into());
    vars.insert("metric".into(), "error-rate".into());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut empty = Vec::new();
    let queries = dashboard_queries_with(&vars);
    assert!(queries.len() > 20, "only {} queries found", queries.len());
    for (at, q) in &queries {
        let body = query_range(&client, q).await;
        assert_eq!(body["status"], "success", "{at}: {q}: {body}");
        if body["data"]["result"]
            .as_array()
            .is_none_or(|r| r.is_empty())
        {
            empty.push(format!("{at}: {q}"));
        }
    }
    assert!(
        empty.is_empty(),
        "queries without data after the demo:\n{}",
        empty.join("\n")
    );

    // Ctrl-C stops the demo and everything it started.
    let pid = child.pid().to_string();
    let status = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = crate::support::wait_for("the demo to exit", Duration::from_secs(30), || {
        let r = child.0.try_wait().ok().flatten();
        async move { r }
    })
    .await;
    assert!(exit.success(), "demo exit status {exit:?}");
    for port in [9090u16, 9850, 9861, 9862, 9863, 9870] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} still in use after the demo stopped"
        );
    }
}
