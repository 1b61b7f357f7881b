//! The HTTP API: `fn router(state) -> axum::Router`. Handlers read snapshots and the store;
//! operator actions go to the rollout's task, which decides through `rollout::decide`.

use crate::controller::{self, OperateError, PolicyErrors, Registry, Views};
use crate::metrics::Metrics;
use crate::observation::OperatorAction;
use crate::store::Store;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest request body accepted (operator actions carry a short reason).
const BODY_LIMIT: usize = 16 * 1024;
/// Longest a request may take; an operator action waits for its rollout's current tick.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(45);
/// Largest page of the decision log.
const MAX_PAGE: usize = 500;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub views: Views,
    pub registry: Registry,
    pub store: Store,
    pub metrics: Metrics,
    pub policy_errors: PolicyErrors,
    pub ready: Arc<AtomicBool>,
    /// Bearer token required by POST actions; none means open (loopback only by default).
    pub token: Option<String>,
    /// The election of a highly available daemon; `None` for a single daemon.
    pub leadership: Option<Arc<crate::ha::Leadership>>,
}

/// A standby replica's role, for answers that depend on it: `None` when this daemon leads
/// or is not highly available.
fn standby(s: &ApiState) -> Option<Option<String>> {
    match s.leadership.as_ref()?.role() {
        crate::ha::Role::Leader => None,
        crate::ha::Role::Standby { leader } => Some(leader),
    }
}

fn leader_text(s: &ApiState, leader: &Option<String>) -> String {
    match (leader, s.leadership.as_ref().and_then(|l| l.error())) {
        (Some(l), _) => format!("the leader is {l}"),
        (None, Some(e)) => format!("no replica is known to lead: {e}"),
        (None, None) => "no replica leads yet".to_owned(),
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/rollouts", get(list))
        .route("/api/v1/rollouts/{name}", get(one))
        .route("/api/v1/rollouts/{name}/decisions", get(decisions))
        .route("/api/v1/rollouts/{name}/assign", get(assign))
        .route("/api/v1/rollouts/{name}/{action}", post(act))
        // Every error answers with the same JSON shape, unknown paths and methods included;
        // the method fallback applies to the routes above, so it comes after them.
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(timeout))
        .with_state(state)
}

/// Answers 503 instead of letting a request hang past `REQUEST_TIMEOUT`.
async fn timeout(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the request took too long"),
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint {}", uri.path()),
    )
}

/// The router adds the `Allow` header listing the methods the path takes.
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

async fn readyz(State(s): State<ApiState>) -> Response {
    if let Some(leader) = standby(&s) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("standby: {}\n", leader_text(&s, &leader)),
        )
            .into_response();
    }
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "loading state and policies\n",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn list(State(s): State<ApiState>) -> Response {
    let rollouts: Vec<serde_json::Value> = s
        .views
        .read()
        .map(|v| {
            v.values()
                .map(|r| {
                    json!({
                        "name": r.name,
                        "file": r.file,
                        "model": r.model,
                        "phase": r.phase,
                        "stable": r.stable,
                        "canary": r.canary,
                        "weight": r.weight,
                        "step": r.step,
                        "steps": r.steps,
                        "method": r.method,
                        "last_decision": r.last_decision,
                        "applied": r.applied,
                        "router": r.router,
                        "router_weight": r.router_weight,
                        "router_error": r.router_error,
                        "policy_error": r.policy_error,
                        "stopped": r.stopped,
                        "dry_run": r.dry_run,
                        "store_error": r.store_error,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let invalid: Vec<serde_json::Value> = s
        .policy_errors
        .read()
        .map(|e| {
            e.iter()
                .map(|(f, p)| json!({"file": f, "name": p.name, "error": p.error}))
                .collect()
        })
        .unwrap_or_default();
    let mut body = json!({"rollouts": rollouts, "invalid_policies": invalid});
    if let Some(l) = &s.leadership {
        let (role, leader) = match l.role() {
            crate::ha::Role::Leader => ("leader", Some(l.replica().to_owned())),
            crate::ha::Role::Standby { leader } => ("standby", leader),
        };
        body["replica"] = json!({"name": l.replica(), "role": role, "leader": leader});
    }
    Json(body).into_response()
}

/// Axum's own answer to a path it cannot decode (not UTF-8) is plain text.
fn bad_path(r: &PathRejection) -> Response {
    error(r.status(), r.body_text())
}

async fn one(State(s): State<ApiState>, name: Result<Path<String>, PathRejection>) -> Response {
    let name = match name {
        Ok(Path(n)) => n,
        Err(r) => return bad_path(&r),
    };
    match s.views.read().ok().and_then(|v| v.get(&name).cloned()) {
        Some(v) => Json(v).into_response(),
        None => no_rollout(&s, &name),
    }
}

/// The answer for a name no rollout has: 404, pointing to the error of a policy file that
/// gives this name but runs no rollout (invalid from the start, or refused), if there is one.
fn no_rollout(s: &ApiState, name: &str) -> Response {
    if let Some(leader) = standby(s) {
        // Only the leader runs rollouts: "no rollout named" would send people looking for a
        // mistake in the name.
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "this replica is on standby and runs no rollouts, {name:?} included; {}",
                leader_text(s, &leader)
            ),
        );
    }
    let invalid = s.policy_errors.read().ok().and_then(|e| {
        e.iter()
            .find(|(_, p)| p.name.as_deref() == Some(name))
            .map(|(file, p)| format!("its policy file {file} was not accepted:\n{}", p.error))
    });
    match invalid {
        Some(why) => error(
            StatusCode::NOT_FOUND,
            format!("rollout {name:?} is not running: {why}"),
        ),
        None => error(StatusCode::NOT_FOUND, format!("no rollout named {name:?}")),
    }
}

#[derive(Deserialize)]
struct Page {
    limit: Option<usize>,
    before: Option<i64>,
}

async fn decisions(
    State(s): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    page: Result<Query<Page>, QueryRejection>,
) -> Response {
    let name = match name {
        Ok(Path(n)) => n,
        Err(r) => return bad_path(&r),
    };
    let Ok(Query(page)) = page else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected ?limit=N&before=ID with whole numbers",
        );
    };
    let limit = page.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return error(
            StatusCode::BAD_REQUEST,
            format!("expected limit from 1 to {MAX_PAGE}, found {limit}"),
        );
    }
    // Decision ids start at 1, so no decision is older than 0 or less: such a page would be
    // empty, which reads as "no decisions" rather than as the mistake it is.
    if let Some(before) = page.before.filter(|b| *b < 1) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "expected before to be a decision id (1 or more, as in next_before), found {before}"
            ),
        );
    }
    let known = s
        .views
        .read()
        .map(|v| v.contains_key(&name))
        .unwrap_or(false);
    let store = s.store.clone();
    let n = name.clone();
    let res = tokio::task::spawn_blocking(move || store.decisions(&n, limit, page.before)).await;
    match res {
        Ok(Ok(list)) if !list.is_empty() || known => {
            let next = (list.len() == limit)
                .then(|| list.last().map(|d| d.id))
                .flatten();
            Json(json!({"decisions": list, "next_before": next})).into_response()
        }
        Ok(Ok(_)) => no_rollout(&s, &name),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The bucket of a key in 0..10,000: FNV-1a over the rollout's name and the key, so that
/// different rollouts choose different users and the answer never changes for a pair.
pub fn bucket(rollout: &str, key: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in rollout.bytes().chain([0u8]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Fold the high bits in: FNV's low bits alone are poorly mixed for short keys.
    ((h ^ (h >> 32)) % 10_000) as u32
}

/// Whether a bucket is on the canary at a weight (percent): buckets below weight × 100 are,
/// so a key on the canary stays there while the weight grows.
pub fn on_canary(bucket: u32, weight: f64) -> bool {
    f64::from(bucket) < weight * 100.0
}

/// Longest key `assign` takes, in bytes.
const MAX_KEY: usize = 1024;

/// The one `key` of an `assign` query, or why there is not exactly one usable key. Other
/// parameters are ignored.
fn assign_key(params: Vec<(String, String)>) -> Result<String, String> {
    let mut keys = params
        .into_iter()
        .filter(|(k, _)| k == "key")
        .map(|(_, v)| v);
    match (keys.next(), keys.count()) {
        (None, _) => Err("expected ?key=USER".into()),
        (Some(_), more) if more > 0 => Err(format!("expected exactly one key, found {}", more + 1)),
        (Some(k), _) if k.is_empty() || k.len() > MAX_KEY => Err(format!(
            "expected a key of 1 to {MAX_KEY} bytes, found {}",
            k.len()
        )),
        (Some(k), _) => Ok(k),
    }
}

async fn assign(
    State(s): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let name = match name {
        Ok(Path(n)) => n,
        Err(r) => return bad_path(&r),
    };
    let key = match q
        .map_err(|r| r.body_text())
        .and_then(|Query(p)| assign_key(p))
    {
        Ok(k) => k,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let Some(view) = s.views.read().ok().and_then(|v| v.get(&name).cloned()) else {
        return no_rollout(&s, &name);
    };
    // A dry run changes no traffic, this assignment included: everyone stays on stable.
    let weight = if view.dry_run { 0.0 } else { view.weight };
    let b = bucket(&name, &key);
    let canary = on_canary(b, weight);
    let version = if canary { &view.canary } else { &view.stable };
    Json(json!({
        "rollout": name,
        "key": key,
        "version": version,
        "bucket": b,
        "weight": weight,
        "phase": view.phase,
        "dry_run": view.dry_run,
    }))
    .into_response()
}

/// Compares in time independent of where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// The credentials of an `Authorization: Bearer …` header. The scheme's name is
/// case-insensitive (RFC 7235 section 2.1), so `bearer` and `BEARER` are the same scheme.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    /// Who asks, as the caller says; recorded with the decision.
    who: Option<String>,
    /// Why, recorded with the decision.
    reason: Option<String>,
}

async fn act(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let (name, action) = match path {
        Ok(Path(p)) => p,
        Err(r) => return bad_path(&r),
    };
    if let Some(token) = &s.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        match given {
            None => {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    Json(json!({"error": "a bearer token is required"})),
                )
                    .into_response();
            }
            Some(g) if !constant_time_eq(g.trim().as_bytes(), token.as_bytes()) => {
                tracing::warn!(rollout = %name, action = %action, "operator action refused: wrong token");
                return error(StatusCode::FORBIDDEN, "wrong token");
            }
            Some(_) => {}
        }
    }
    if let Some(leader) = standby(&s) {
        // Only the leader runs rollouts: a standby would answer "no rollout named ...".
        let next = if leader.is_some() {
            "send operator actions there"
        } else {
            "no replica acts on a rollout until one leads; traffic stays where it is"
        };
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "this replica is on standby and runs no rollouts; {}: {next}",
                leader_text(&s, &leader)
            ),
        );
    }
    let Some(op) = OperatorAction::parse(&action) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown action {action:?}; expected promote, abort, pause, resume or retry"),
        );
    };
    let body = match body {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("expected a body of at most {BODY_LIMIT} bytes"),
            );
        }
        Err(r) => return error(r.status(), r.body_text()),
    };
    let parsed: ActionBody = if body.iter().all(u8::is_ascii_whitespace) {
        ActionBody::default()
    } else {
        let like = "a JSON body like {\"who\": \"alice\", \"reason\": \"...\"}";
        // Parsed as any JSON first: a body that is not an object gets "found an array", not
        // serde's words about the struct it was meant for.
        let parsed = serde_json::from_slice::<Value>(&body)
            .map_err(|e| format!("expected {like}: {e}"))
            .and_then(|v| match v {
                Value::Object(_) => {
                    serde_json::from_value(v).map_err(|e| format!("expected {like}: {e}"))
                }
                other => Err(format!(
                    "expected {like}, found {}",
                    match other {
                        Value::Array(_) => "an array",
                        Value::String(_) => "a string",
                        Value::Number(_) => "a number",
                        Value::Bool(_) => "a boolean",
                        _ => "null",
                    }
                )),
            });
        match parsed {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        }
    };
    let who = parsed.who.unwrap_or_else(|| "api".into());
    let why = parsed.reason.unwrap_or_default();
    if who.chars().count() > 200 || why.chars().count() > 2000 {
        return error(
            StatusCode::BAD_REQUEST,
            "who is limited to 200 and reason to 2000 characters",
        );
    }
    let who = if s.token.is_some() {
        format!("{who} (token)")
    } else {
        who
    };
    match controller::operate(&s.registry, &name, op, who, why).await {
        Ok(rec) => Json(rec).into_response(),
        Err(OperateError::NotFound) => {
            // A stopped rollout is still shown, but nothing runs it to act on.
            let stopped = s.views.read().ok().and_then(|v| {
                v.get(&name)
                    .filter(|r| r.stopped)
                    .map(|r| r.policy_error.clone().unwrap_or_default())
            });
            match stopped {
                Some(why) => error(
                    StatusCode::CONFLICT,
                    format!("rollout {name:?} is stopped, nothing runs it: {why}"),
                ),
                None => no_rollout(&s, &name),
            }
        }
        Err(OperateError::Rejected(reason)) => error(StatusCode::CONFLICT, reason),
        Err(e @ OperateError::Busy) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        // Taken, but whether it was recorded is unknown: not "refused".
        Err(e @ OperateError::Unconfirmed) => error(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
        // Not recorded: `taken` says whether the router has the action all the same.
        Err(OperateError::Unrecorded { why, taken }) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": why, "recorded": false, "taken": taken})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn state(ready: bool, token: Option<&str>) -> ApiState {
        let policy = crate::policy::load_str(
            "t.yaml",
            "name: r\nstable: v1\ncanary: v2\nstrategy: {steps: [10, 50]}\nanalysis: {method: threshold}\nmetrics: [{name: e, builtin: error_rate, max: 1%}]\nrouter: {file: {path: /tmp/x}}\n",
        )
        .expect("valid test policy");
        let mut st = crate::rollout::RolloutState::new(&policy);
        st.weight = 10.0;
        let view = crate::controller::view_of(&policy, "t.yaml", &st);
        let views = Views::default();
        views.write().expect("lock").insert("r".into(), view);
        ApiState {
            views,
            registry: Registry::default(),
            store: Store::open(std::path::Path::new(":memory:")).expect("store"),
            metrics: Metrics::new(prometheus::Registry::new()).expect("metrics"),
            policy_errors: PolicyErrors::default(),
            ready: Arc::new(AtomicBool::new(ready)),
            token: token.map(str::to_owned),
            leadership: None,
        }
    }

    async fn call(
        s: ApiState,
        method: &str,
        uri: &str,
        auth: Option<&str>,
    ) -> (StatusCode, String) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = router(s)
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readiness_follows_the_flag() {
        assert_eq!(
            call(state(false, None), "GET", "/readyz", None).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            call(state(true, None), "GET", "/readyz", None).await.0,
            StatusCode::OK
        );
        assert_eq!(
            call(state(false, None), "GET", "/healthz", None).await.0,
            StatusCode::OK
        );
    }

    /// `canaryd status` (the table) reads the list: what it shows of each rollout beyond its
    /// phase (the router's real weight, a dry run, a failing store) must be in it.
    #[tokio::test]
    async fn the_list_holds_what_the_status_table_shows() {
        let s = state(true, None);
        if let Ok(mut views) = s.views.write()
            && let Some(r) = views.get_mut("r")
        {
            r.router_weight = Some(30.0);
            r.dry_run = true;
            r.store_error = Some("disk full".into());
        }
        let (_, body) = call(s, "GET", "/api/v1/rollouts", None).await;
        let table = crate::client::table(&serde_json::from_str(&body).expect("json"));
        for shown in ["10% (router: 30%)", "dry run", "disk full"] {
            assert!(table.contains(shown), "{shown} in {table}");
        }
    }

    #[tokio::test]
    async fn reads_list_show_and_assign() {
        let (s, body) = call(state(true, None), "GET", "/api/v1/rollouts", None).await;
        assert_eq!(s, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["rollouts"][0]["name"], "r");
        assert_eq!(v["rollouts"][0]["weight"], 10.0);
        assert_eq!(
            call(state(true, None), "GET", "/api/v1/rollouts/nope", None)
                .await
                .0,
            StatusCode::NOT_FOUND
        );
        let (s, body) = call(
            state(true, None),
            "GET",
            "/api/v1/rollouts/r/assign?key=bob",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let expected = if on_canary(bucket("r", "bob"), 10.0) {
            "v2"
        } else {
            "v1"
        };
        assert_eq!(v["version"], expected);
        assert_eq!(
            call(
                state(true, None),
                "GET",
                "/api/v1/rollouts/r/assign?key=",
                None
            )
            .await
            .0,
            StatusCode::BAD_REQUEST
        );
    }

    /// A name no rollout runs: pointed to the policy file that gives it, if one is refused; a
    /// stopped rollout refuses actions with why it stopped.
    #[tokio::test]
    async fn a_missing_rollout_points_to_its_policy_error_and_a_stopped_one_says_why() {
        let s = state(true, None);
        s.policy_errors.write().expect("lock").insert(
            "p/nd.yaml".into(),
            crate::controller::InvalidPolicy {
                name: Some("nd".into()),
                error: "p/nd.yaml:3:1: strategy: expected a mapping".into(),
            },
        );
        let (status, body) = call(s.clone(), "GET", "/api/v1/rollouts/nd", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            v["error"],
            "rollout \"nd\" is not running: its policy file p/nd.yaml was not accepted:\n\
             p/nd.yaml:3:1: strategy: expected a mapping"
        );
        let (_, body) = call(s.clone(), "GET", "/api/v1/rollouts", None).await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["invalid_policies"][0]["name"], "nd", "{v}");
        let (status, body) = call(s.clone(), "POST", "/api/v1/rollouts/nd/pause", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("p/nd.yaml:3:1"), "{body}");
        let (_, body) = call(s.clone(), "GET", "/api/v1/rollouts/other", None).await;
        assert!(body.contains("no rollout named \\\"other\\\""), "{body}");

        if let Some(r) = s.views.write().expect("lock").get_mut("r") {
            r.stopped = true;
            r.policy_error = Some("policy file t.yaml deleted: rollout stopped".into());
        }
        let (status, body) = call(s.clone(), "POST", "/api/v1/rollouts/r/pause", None).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert!(body.contains("t.yaml deleted"), "{body}");
        let (_, body) = call(s, "GET", "/api/v1/rollouts", None).await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["rollouts"][0]["stopped"], true, "{v}");
    }

    #[tokio::test]
    async fn actions_check_the_token_before_anything_else() {
        let s = state(true, Some("tok"));
        let cases = [
            ("POST", None, StatusCode::UNAUTHORIZED),
            ("POST", Some("Bearer nope"), StatusCode::FORBIDDEN),
            ("POST", Some("Basic tok"), StatusCode::UNAUTHORIZED),
            // With the right token, a rollout without a running task is not found.
            ("POST", Some("Bearer tok"), StatusCode::NOT_FOUND),
            // RFC 7235: the scheme's name is case-insensitive.
            ("POST", Some("bearer tok"), StatusCode::NOT_FOUND),
            ("POST", Some("BEARER tok"), StatusCode::NOT_FOUND),
            ("POST", Some("bearer nope"), StatusCode::FORBIDDEN),
            ("POST", Some("Bearertok"), StatusCode::UNAUTHORIZED),
            ("GET", Some("Bearer tok"), StatusCode::METHOD_NOT_ALLOWED),
        ];
        for (method, auth, want) in cases {
            let (got, body) = call(s.clone(), method, "/api/v1/rollouts/r/abort", auth).await;
            assert_eq!(got, want, "{method} with {auth:?}: {body}");
        }
    }

    /// Sends `req` and returns the status, the `Allow` header and the body as JSON.
    async fn send(
        s: ApiState,
        req: Request<Body>,
    ) -> (StatusCode, Option<String>, serde_json::Value) {
        let resp = router(s).oneshot(req).await.expect("infallible");
        let status = resp.status();
        let allow = resp
            .headers()
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "{status}: body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&body)
            )
        });
        (status, allow, json)
    }

    #[tokio::test]
    async fn every_error_is_json_with_its_status() {
        let get = |uri: &str| {
            Request::builder()
                .uri(uri)
                .body(Body::empty())
                .expect("request")
        };
        let (status, _, body) = send(state(true, None), get("/api/v1/nope")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "no such endpoint /api/v1/nope");
        let (status, _, body) = send(state(true, None), get("/nope")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"].is_string(), "{body}");

        let (status, allow, body) = send(state(true, None), get("/api/v1/rollouts/r/abort")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(allow.as_deref(), Some("POST"));
        assert_eq!(body["error"], "/api/v1/rollouts/r/abort does not take GET");
        let delete = Request::builder()
            .method("DELETE")
            .uri("/api/v1/rollouts")
            .body(Body::empty())
            .expect("request");
        let (status, allow, body) = send(state(true, None), delete).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(allow.is_some_and(|a| a.contains("GET")));
        assert!(body["error"].is_string(), "{body}");

        let big = format!("{{\"reason\": \"{}\"}}", "x".repeat(BODY_LIMIT));
        let post = Request::builder()
            .method("POST")
            .uri("/api/v1/rollouts/r/pause")
            .body(Body::from(big))
            .expect("request");
        let (status, _, body) = send(state(true, None), post).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            body["error"],
            format!("expected a body of at most {BODY_LIMIT} bytes")
        );

        // A path that does not decode to UTF-8.
        let (status, _, body) = send(state(true, None), get("/api/v1/rollouts/%FF")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body["error"].is_string(), "{body}");
    }

    #[tokio::test]
    async fn a_page_before_no_decision_is_refused() {
        for before in ["-5", "0"] {
            let uri = format!("/api/v1/rollouts/r/decisions?before={before}");
            let (status, body) = call(state(true, None), "GET", &uri, None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "before={before}: {body}");
            assert!(
                body.contains("expected before to be a decision id") && body.contains(before),
                "{body}"
            );
        }
        let (status, body) = call(
            state(true, None),
            "GET",
            "/api/v1/rollouts/r/decisions?before=1",
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// A dry run changes no traffic: the assignment, which is a router to whoever asks it,
    /// sends every key to stable while the rollout shows the weight it would have set.
    #[tokio::test]
    async fn a_dry_run_assigns_every_key_to_stable() {
        let s = state(true, None);
        if let Ok(mut views) = s.views.write()
            && let Some(r) = views.get_mut("r")
        {
            r.weight = 100.0;
            r.dry_run = true;
        }
        for key in ["a", "b", "c", "d", "e"] {
            let uri = format!("/api/v1/rollouts/r/assign?key={key}");
            let (_, body) = call(s.clone(), "GET", &uri, None).await;
            let v: serde_json::Value = serde_json::from_str(&body).expect("json");
            assert_eq!(
                (&v["version"], &v["dry_run"]),
                (&json!("v1"), &json!(true)),
                "{v}"
            );
        }
    }

    #[tokio::test]
    async fn assign_says_what_is_wrong_with_the_key() {
        let cases = [
            ("?key=a&key=b", "expected exactly one key, found 2"),
            ("", "expected ?key=USER"),
            ("?user=a", "expected ?key=USER"),
            ("?key=", "expected a key of 1 to 1024 bytes, found 0"),
        ];
        for (query, want) in cases {
            let uri = format!("/api/v1/rollouts/r/assign{query}");
            let (status, body) = call(state(true, None), "GET", &uri, None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).expect("json");
            assert_eq!(v["error"], want, "{query}");
        }
        let long = format!("/api/v1/rollouts/r/assign?key={}", "k".repeat(MAX_KEY + 1));
        let (status, body) = call(state(true, None), "GET", &long, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let (status, body) = call(
            state(true, None),
            "GET",
            "/api/v1/rollouts/r/assign?key=bob&other=1",
            None,
        )
        .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "other parameters are ignored: {body}"
        );
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket("r", "alice"), bucket("r", "alice"));
        assert_ne!(bucket("r", "alice"), bucket("other", "alice"));
        let on: usize = (0..10_000)
            .filter(|i| on_canary(bucket("r", &format!("user-{i}")), 10.0))
            .count();
        // 10 % of 10,000 keys, binomial sd 30: ±200 cannot flake.
        assert!(
            (800..=1200).contains(&on),
            "{on} keys on the canary at 10 %"
        );
    }

    #[test]
    fn assignment_is_monotone_in_weight() {
        for i in 0..2000 {
            let b = bucket("r", &format!("k{i}"));
            let mut was = false;
            for w in [0.0, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0] {
                let now = on_canary(b, w);
                assert!(
                    !was || now,
                    "key k{i} left the canary when the weight rose to {w}"
                );
                was = now;
            }
            assert!(on_canary(b, 100.0) && !on_canary(b, 0.0));
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
