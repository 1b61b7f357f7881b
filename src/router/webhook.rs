//! A routing service of the user's own behind one URL.
//!
//! `apply` POSTs `{rollout, stable, canary, weights: {<stable>: percent, <canary>: percent}}`
//! and any 2xx answer means the split is in place. `read` GETs the same URL with
//! `?rollout=<name>` and expects the same shape back; the canary's share is its weight over the
//! sum of all weights given, and a canary the answer does not mention gets no traffic. Both
//! calls are bounded by the configured timeout.
//!
//! Messages name the endpoint by its origin only: services hand out URLs with secrets in the
//! path or query, and router errors reach the log, the API and `canaryd status`.

use super::{BoxFuture, Router, RouterError, Target, WeightsDoc, check_target};
use crate::policy::url_origin;
use crate::source::prometheus::error_chain;
use std::time::Duration;

/// How much of an error answer's body a message carries.
const MAX_BODY_SHOWN: usize = 512;
/// A weights document is a few hundred bytes; anything past this is not one.
const MAX_BODY: usize = 1024 * 1024;

/// Sets and reads the split through an HTTP endpoint.
pub struct WebhookRouter {
    /// The endpoint, for POST and GET alike.
    url: reqwest::Url,
    /// The endpoint as messages name it: `the webhook at <origin>`.
    shown: String,
    /// The client, with the configured timeout on every request.
    client: reqwest::Client,
}

impl std::fmt::Debug for WebhookRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRouter")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

impl WebhookRouter {
    pub fn new(url: &str, timeout: Duration) -> Result<WebhookRouter, RouterError> {
        let shown = format!("the webhook at {}", url_origin(url));
        let parsed =
            reqwest::Url::parse(url).map_err(|e| RouterError::Config(format!("{shown}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(RouterError::Config(format!(
                "{shown}: expected an http or https URL"
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(crate::USER_AGENT)
            // A redirected POST turns into a GET and would read as success without applying.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                RouterError::Config(format!("a client for {shown}: {}", error_chain(&e)))
            })?;
        Ok(WebhookRouter {
            url: parsed,
            shown,
            client,
        })
    }

    /// A request that got no (whole) HTTP answer: connection refused, DNS, timeout. Reqwest's
    /// message names the URL, so it is left out; its causes say what happened.
    fn transport_error(&self, what: &str, e: reqwest::Error) -> RouterError {
        RouterError::Unreachable(format!(
            "{} did not answer the {what}: {}",
            self.shown,
            error_chain(&e.without_url())
        ))
    }

    async fn refusal(&self, what: &str, mut resp: reqwest::Response) -> RouterError {
        let status = resp.status();
        // The body only decorates the message, so a failure to read it is not worth reporting.
        let body = body_limited(&mut resp, MAX_BODY)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        let body: String = String::from_utf8_lossy(&body)
            .trim()
            .chars()
            .take(MAX_BODY_SHOWN)
            .collect();
        RouterError::Rejected(format!(
            "{} answered the {what} with {status}: {body:?}",
            self.shown
        ))
    }
}

/// The body, or `None` once it grows past `limit`; the service is not trusted to be small.
async fn body_limited(
    resp: &mut reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

impl Router for WebhookRouter {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn apply<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<(), RouterError>> {
        Box::pin(async move {
            check_target(target)?;
            let doc = WeightsDoc::for_target(target);
            let resp = self
                .client
                .post(self.url.clone())
                .json(&doc)
                .send()
                .await
                .map_err(|e| self.transport_error("POST", e))?;
            if !resp.status().is_success() {
                return Err(self.refusal("POST", resp).await);
            }
            Ok(())
        })
    }

    fn read<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<f64, RouterError>> {
        Box::pin(async move {
            let mut resp = self
                .client
                .get(self.url.clone())
                .query(&[("rollout", target.rollout.as_str())])
                .send()
                .await
                .map_err(|e| self.transport_error("GET", e))?;
            // A router that has never been told a split for this rollout routes nothing to
            // its canary; saying so with 404 is the natural answer, not a failure.
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(0.0);
            }
            if !resp.status().is_success() {
                return Err(self.refusal("GET", resp).await);
            }
            // A body cut off by the timeout is a transport failure, not a bad document.
            let body = body_limited(&mut resp, MAX_BODY)
                .await
                .map_err(|e| self.transport_error("GET", e))?
                .ok_or_else(|| {
                    RouterError::BadResponse(format!(
                        "{} answered the GET with more than {MAX_BODY} bytes",
                        self.shown
                    ))
                })?;
            let doc: WeightsDoc = serde_json::from_slice(&body).map_err(|e| {
                let shown: String = String::from_utf8_lossy(&body)
                    .chars()
                    .take(MAX_BODY_SHOWN)
                    .collect();
                RouterError::BadResponse(format!(
                    "{} answered the GET with {shown:?}, not a weights document: {e}",
                    self.shown
                ))
            })?;
            doc.canary_share(target, &format!("the split {} reports", self.shown))
        })
    }
}
