//! Every HTTP client canaryd builds names itself: `User-Agent: canaryd/<version>`.

use axum::http::HeaderMap;
use canaryd::router::Router;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The path and `User-Agent` of every request received.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A server that records every request and answers `{}`.
async fn recorder() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = axum::Router::new().fallback({
        let seen = seen.clone();
        move |uri: axum::http::Uri, headers: HeaderMap| {
            let seen = seen.clone();
            async move {
                let agent = headers
                    .get("user-agent")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((uri.path().to_owned(), agent));
                "{}"
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test]
async fn every_client_sends_canaryds_user_agent() {
    let (url, seen) = recorder().await;
    let want = format!("canaryd/{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(canaryd::USER_AGENT, want);

    // The answers are not what each client expects; only the requests matter here.
    let webhook =
        canaryd::router::WebhookRouter::new(&format!("{url}/weights"), Duration::from_secs(2))
            .expect("webhook router");
    let _ = webhook.apply(&crate::support::fraud_target(10.0)).await;
    let prometheus =
        canaryd::source::PrometheusClient::new(&url, canaryd::source::ClientOptions::default())
            .expect("prometheus client");
    let _ = prometheus
        .query(None, "up", canaryd::time::Time(1_000_000))
        .await;
    let etcd = canaryd::etcd::Etcd::new(&url, Duration::from_secs(2)).expect("etcd client");
    let _ = etcd.get("/canaryd/leader").await;
    let _ = canaryd::client::status(&url, None).await;

    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for path in [
        "/weights",
        "/api/v1/query",
        "/v3/kv/range",
        "/api/v1/rollouts",
    ] {
        assert!(
            seen.iter().any(|(p, _)| p == path),
            "no request to {path}: {seen:?}"
        );
    }
    for (path, agent) in &seen {
        assert_eq!(agent.as_deref(), Some(want.as_str()), "{path}");
    }
}
