//! The webhook router against a small axum service that keeps the last split per rollout.
use crate::support::fraud_target as target;

use crate::support::free_port;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Redirect;
use axum::routing::get;
use axum::{Json, Router as Http};
use canaryd::router::{Router, RouterError, Target, WebhookRouter};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every body POSTed to `/weights`, oldest first.
pub type Posts = Arc<Mutex<Vec<Value>>>;

async fn record(State(posts): State<Posts>, Json(body): Json<Value>) -> StatusCode {
    posts.lock().expect("lock").push(body);
    StatusCode::OK
}

async fn latest(
    State(posts): State<Posts>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, StatusCode> {
    let posts = posts.lock().expect("lock");
    let name = q.get("rollout").ok_or(StatusCode::BAD_REQUEST)?;
    posts
        .iter()
        .rev()
        .find(|p| p["rollout"] == json!(name))
        .cloned()
        .map(Json)
        .ok_or(StatusCode::NOT_FOUND)
}

/// Starts the service on a bound loopback listener and returns its base URL.
pub async fn serve(posts: Posts) -> String {
    let app = Http::new()
        .route("/weights", get(latest).post(record))
        .route("/fail", get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }).post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }))
        .route("/garbage", get(|| async { "not json" }))
        .route("/other", get(|| async { Json(json!({"rollout": "other", "stable": "v1", "canary": "v2", "weights": {"v1": 100}})) }))
        .route("/hang", get(std::future::pending::<()>))
        .route(
            "/moved",
            get(|| async { Redirect::temporary("/weights") }).post(|| async { Redirect::to("/weights") }),
        )
        .route("/huge", get(|| async { " ".repeat(2 * 1024 * 1024) }))
        .with_state(posts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn router(url: &str) -> WebhookRouter {
    WebhookRouter::new(url, Duration::from_secs(2)).expect("valid webhook router")
}

#[tokio::test]
async fn webhook_posts_the_split_and_reads_it_back() {
    let posts = Posts::default();
    let base = serve(posts.clone()).await;
    let r = router(&format!("{base}/weights"));
    assert_eq!(r.kind(), "webhook");

    r.apply(&target(25.0)).await.expect("apply");
    let sent = posts.lock().expect("lock").last().cloned();
    assert_eq!(
        sent,
        Some(
            json!({"rollout": "fraud", "stable": "v1", "canary": "v2", "weights": {"v1": 75.0, "v2": 25.0}})
        )
    );
    assert_eq!(r.read(&target(25.0)).await.expect("read"), 25.0);

    r.apply(&target(100.0)).await.expect("apply");
    assert_eq!(r.read(&target(100.0)).await.expect("read"), 100.0);

    // A service still set up for the previous canary sends the new one nothing.
    let next = Target {
        canary: "v3".into(),
        ..target(0.0)
    };
    assert_eq!(r.read(&next).await.expect("read for a new canary"), 0.0);
}

#[tokio::test]
async fn webhook_errors_are_classified() {
    let base = serve(Posts::default()).await;

    let err = router(&format!("{base}/fail"))
        .apply(&target(5.0))
        .await
        .expect_err("500 on POST");
    assert!(
        matches!(&err, RouterError::Rejected(m) if m.contains("500") && m.contains("boom")),
        "{err}"
    );
    let err = router(&format!("{base}/fail"))
        .read(&target(5.0))
        .await
        .expect_err("500 on GET");
    assert!(
        matches!(&err, RouterError::Rejected(m) if m.contains("500")),
        "{err}"
    );
    // Nothing was ever applied for this rollout: the service says 404, which is no split, so
    // the canary gets nothing (and a rollout can start).
    let w = router(&format!("{base}/weights"))
        .read(&target(5.0))
        .await
        .expect("404 reads as no canary traffic");
    assert_eq!(w, 0.0);

    let err = router(&format!("{base}/garbage"))
        .read(&target(5.0))
        .await
        .expect_err("bad json");
    assert!(
        matches!(&err, RouterError::BadResponse(m) if m.contains("not json")),
        "{err}"
    );
    let err = router(&format!("{base}/other"))
        .read(&target(5.0))
        .await
        .expect_err("another rollout");
    assert!(
        matches!(&err, RouterError::BadResponse(m) if m.contains("other")),
        "{err}"
    );

    let hang =
        WebhookRouter::new(&format!("{base}/hang"), Duration::from_millis(300)).expect("valid");
    let err = hang.read(&target(5.0)).await.expect_err("timeout");
    assert!(matches!(err, RouterError::Unreachable(_)), "{err}");

    let closed = format!("http://127.0.0.1:{}", free_port());
    let err = router(&format!("{closed}/weights"))
        .apply(&target(5.0))
        .await
        .expect_err("nothing listening");
    assert!(
        matches!(&err, RouterError::Unreachable(m) if m.contains(&closed)),
        "{err}"
    );

    // A redirect is not the service taking the split: a POST followed as a GET would be.
    let err = router(&format!("{base}/moved"))
        .apply(&target(5.0))
        .await
        .expect_err("303 on POST");
    assert!(
        matches!(&err, RouterError::Rejected(m) if m.contains("303")),
        "{err}"
    );
    let err = router(&format!("{base}/moved"))
        .read(&target(5.0))
        .await
        .expect_err("307 on GET");
    assert!(
        matches!(&err, RouterError::Rejected(m) if m.contains("307")),
        "{err}"
    );

    let err = router(&format!("{base}/huge"))
        .read(&target(5.0))
        .await
        .expect_err("2 MiB answer");
    assert!(
        matches!(&err, RouterError::BadResponse(m) if m.contains("more than")),
        "{err}"
    );

    let err = WebhookRouter::new("ftp://x/", Duration::from_secs(1)).expect_err("scheme");
    assert!(
        matches!(&err, RouterError::Config(m) if m.contains("ftp://x")),
        "{err}"
    );
}

/// Regression (acceptance test): the router's errors carried its whole URL, and with it the
/// secrets a service may hand out in the path or query. They name the URL's origin only.
#[tokio::test]
async fn webhook_errors_name_the_origin_never_the_secrets_in_the_url() {
    let base = serve(Posts::default()).await;
    let secret = "?token=QUERYSECRET";
    let at = |path: &str| router(&format!("{base}{path}{secret}"));
    let mut errors = vec![
        at("/fail")
            .apply(&target(5.0))
            .await
            .expect_err("500 on POST"),
        at("/fail")
            .read(&target(5.0))
            .await
            .expect_err("500 on GET"),
        at("/garbage")
            .read(&target(5.0))
            .await
            .expect_err("bad json"),
        at("/other")
            .read(&target(5.0))
            .await
            .expect_err("another rollout"),
        at("/huge")
            .read(&target(5.0))
            .await
            .expect_err("2 MiB answer"),
        at("/moved")
            .apply(&target(5.0))
            .await
            .expect_err("303 on POST"),
        WebhookRouter::new(&format!("{base}/hang{secret}"), Duration::from_millis(300))
            .expect("valid")
            .read(&target(5.0))
            .await
            .expect_err("timeout"),
    ];
    let closed = format!("http://127.0.0.1:{}", free_port());
    let dead = router(&format!("{closed}/PATHSECRET/weights{secret}"));
    errors.push(
        dead.apply(&target(5.0))
            .await
            .expect_err("nothing listening"),
    );
    errors.push(
        dead.read(&target(5.0))
            .await
            .expect_err("nothing listening"),
    );
    errors.push(
        WebhookRouter::new("ftp://user:PASSSECRET@x/PATHSECRET", Duration::from_secs(1))
            .expect_err("scheme"),
    );
    let (dead_origin, last) = (errors.len() - 3, errors.len() - 1);
    for (i, e) in errors.iter().enumerate() {
        let m = e.to_string();
        assert!(!m.contains("SECRET"), "{m}");
        let origin = match i {
            i if i == last => "ftp://x",
            i if i >= dead_origin => &closed,
            _ => &base,
        };
        assert!(m.contains(&format!("webhook at {origin}")), "{m}");
    }
    // The reqwest error's causes are kept: they say why.
    assert!(
        errors[dead_origin].to_string().contains("onnect"),
        "{}",
        errors[dead_origin]
    );
    assert!(!format!("{dead:?}").contains("SECRET"), "{dead:?}");
}
