//! A small client of etcd's v3 API through its JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`,
//! `/v3/lease/grant`, `/v3/lease/keepalive`, `/v3/lease/revoke`), which every etcd since 3.4
//! serves on its client port. Only what the HA store and the leader election need: ranges,
//! compare-and-swap transactions and leases. Keys and values travel base64-encoded; 64-bit
//! integers come back as JSON strings.
//!
//! An etcd with authentication enabled gets a user and password ([`EtcdAuth`]): the client
//! asks `/v3/auth/authenticate` for a token, sends it in the `Authorization` header, and asks
//! for a new one when etcd says it has expired (simple tokens expire after `--auth-token-ttl`
//! of disuse, and whenever etcd restarts).

use crate::source::prometheus::error_chain as chain;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// No answer: connection refused, timeout, reset.
    #[error("cannot reach etcd at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// etcd answered with an error status.
    #[error("etcd at {url} answered http {status}: {message}")]
    Http {
        url: String,
        status: u16,
        message: String,
    },
    /// The client cannot be set up: not a URL, or TLS files that cannot be read or used.
    #[error("etcd at {url}: {reason}")]
    Config { url: String, reason: String },
    /// The answer was not the gateway's JSON.
    #[error("etcd at {url} sent an answer that cannot be read: {reason}")]
    BadResponse { url: String, reason: String },
}

/// One key and its value as etcd stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key (0 for none).
    pub create_revision: i64,
    /// Revision of the key's last change.
    pub mod_revision: i64,
    /// The lease the key is attached to (0 for none).
    pub lease: i64,
}

/// A condition of a transaction; all must hold for its success branch to run.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key was created at this revision (0: the key does not exist).
    CreateRevision(String, i64),
    /// The key was last changed at this revision (0: the key does not exist).
    ModRevision(String, i64),
}

/// An operation of a transaction.
#[derive(Clone, Debug)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        /// Attach the key to this lease: it is deleted when the lease expires.
        lease: Option<i64>,
    },
    /// Deletes the keys in `[from, to)`.
    DeleteRange {
        from: String,
        to: String,
    },
    Get {
        key: String,
    },
}

/// What a transaction did.
#[derive(Clone, Debug, PartialEq)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store's revision after the transaction (its own, if it wrote).
    pub revision: i64,
    /// The keys each `Get` of the branch that ran found, in order.
    pub gets: Vec<Vec<Kv>>,
}

/// How a range is read.
#[derive(Clone, Debug, Default)]
pub struct RangeOptions {
    /// At most this many keys (0: all).
    pub limit: i64,
    /// Newest key first (by key order).
    pub descending: bool,
}

/// TLS settings for an etcd served over https: a CA to trust (besides the system's), and a
/// client certificate for etcd's `--client-cert-auth`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM certificate (chain) of this client; needs `key_file`.
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
}

/// A user of an etcd with authentication enabled (`etcdctl auth enable`).
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("user", &self.user)
            .field("password", &"<secret>")
            .finish()
    }
}

/// A user's credentials and the token etcd gave for them last.
#[derive(Debug)]
struct Session {
    auth: EtcdAuth,
    token: Mutex<Option<String>>,
}

/// The client. Cheap to clone; clones share one authentication token.
#[derive(Clone, Debug)]
pub struct Etcd {
    http: reqwest::Client,
    url: String,
    session: Option<Arc<Session>>,
}

/// The first key after every key that starts with `prefix`, for prefix ranges.
pub fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0xff {
            bytes.push(last + 1);
            return String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    // Every byte 0xff: the range reaches the end of the key space.
    "\0".to_owned()
}

impl Etcd {
    /// A client of the etcd whose client URL is `url` (`http://127.0.0.1:2379`); every
    /// request gives up after `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Etcd, EtcdError> {
        Etcd::with_tls(url, timeout, &EtcdTls::default())
    }

    /// `new`, with TLS settings for an https etcd.
    pub fn with_tls(url: &str, timeout: Duration, tls: &EtcdTls) -> Result<Etcd, EtcdError> {
        let url = url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&url).map_err(|e| EtcdError::Config {
            url: url.clone(),
            reason: format!("not a URL: {e}"),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(EtcdError::Config {
                url,
                reason: "expected an http:// or https:// URL".into(),
            });
        }
        let config = |reason: String| EtcdError::Config {
            url: url.clone(),
            reason,
        };
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path)
                .map_err(|e| config(format!("cannot read the {what} {}: {e}", path.display())))
        };
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(crate::USER_AGENT);
        if let Some(path) = &tls.ca_file {
            let certs = reqwest::Certificate::from_pem_bundle(&read(path, "CA file")?)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    config(format!(
                        "the CA file {} holds no PEM certificate",
                        path.display()
                    ))
                })?;
            builder = builder.tls_certs_merge(certs);
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = read(key, "client key")?;
                pem.push(b'\n');
                pem.extend(read(cert, "client certificate")?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    config(format!(
                        "the client certificate {} and key {} are not a PEM certificate and its key: {}",
                        cert.display(),
                        key.display(),
                        chain(&e)
                    ))
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(config(
                    "a client certificate needs its key, and a key its certificate".into(),
                ));
            }
        }
        let http = builder.build().map_err(|e| config(chain(&e)))?;
        Ok(Etcd {
            http,
            url,
            session: None,
        })
    }

    /// This client, authenticating as `auth` to an etcd that has authentication enabled.
    pub fn with_auth(mut self, auth: EtcdAuth) -> Etcd {
        self.session = Some(Arc::new(Session {
            auth,
            token: Mutex::new(None),
        }));
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One request, with the authentication token when there is a user: a token etcd no
    /// longer knows is replaced once and the request sent again (etcd refused it unread).
    async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let Some(session) = &self.session else {
            return self.post(path, &body, None).await;
        };
        let mut renewed = false;
        loop {
            let cached = session.token.lock().map(|t| t.clone()).unwrap_or_default();
            let token = match cached {
                Some(t) => t,
                None => {
                    let t = self.authenticate(&session.auth).await?;
                    renewed = true;
                    if let Ok(mut slot) = session.token.lock() {
                        *slot = Some(t.clone());
                    }
                    t
                }
            };
            match self.post(path, &body, Some(&token)).await {
                // Unauthenticated: the token expired, or etcd restarted and forgot it.
                Err(EtcdError::Http { status: 401, .. }) if !renewed => {}
                other => return other,
            }
            // Forget the stale token unless another request already replaced it.
            if let Ok(mut slot) = session.token.lock()
                && slot.as_deref() == Some(token.as_str())
            {
                *slot = None;
            }
            renewed = true;
        }
    }

    /// A token for `auth`, from `/v3/auth/authenticate`.
    async fn authenticate(&self, auth: &EtcdAuth) -> Result<String, EtcdError> {
        let body = json!({"name": auth.user, "password": auth.password});
        let v = self
            .post("/v3/auth/authenticate", &body, None)
            .await
            .map_err(|e| match e {
                EtcdError::Http {
                    url,
                    status,
                    message,
                } => EtcdError::Http {
                    url,
                    status,
                    message: format!("authenticating as {:?}: {message}", auth.user),
                },
                e => e,
            })?;
        v.get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                self.bad(format!(
                    "no token in the answer to authenticating as {:?}",
                    auth.user
                ))
            })
    }

    async fn post(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<Value, EtcdError> {
        let mut request = self.http.post(format!("{}{path}", self.url)).json(body);
        if let Some(token) = token {
            request = request.header(reqwest::header::AUTHORIZATION, token);
        }
        let res = request.send().await.map_err(|e| EtcdError::Unreachable {
            url: self.url.clone(),
            reason: chain(&e),
        })?;
        let status = res.status();
        let text = res.text().await.map_err(|e| EtcdError::Unreachable {
            url: self.url.clone(),
            reason: e.to_string(),
        })?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    v.get("message")
                        .or_else(|| v.get("error"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| text.chars().take(200).collect());
            return Err(EtcdError::Http {
                url: self.url.clone(),
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_str(&text).map_err(|e| self.bad(format!("{e}")))
    }

    fn bad(&self, reason: String) -> EtcdError {
        EtcdError::BadResponse {
            url: self.url.clone(),
            reason,
        }
    }

    /// Grants a lease of `ttl` (whole seconds, at least one); returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/grant", json!({"TTL": ttl.as_secs().max(1)}))
            .await?;
        int(v.get("ID")).ok_or_else(|| self.bad(format!("no lease id in {v}")))
    }

    /// Renews a lease; returns its remaining time to live, `None` when it has expired.
    pub async fn keep_alive(&self, lease: i64) -> Result<Option<Duration>, EtcdError> {
        let v = self
            .call("/v3/lease/keepalive", json!({"ID": lease.to_string()}))
            .await?;
        // The gateway streams keep-alive answers: one `{"result": ...}` object here, or an
        // `{"error": ...}` one (with HTTP 200) when etcd could not renew it. Only a result
        // without a time to live says the lease is gone.
        if let Some(e) = v.get("error") {
            return Err(self.bad(format!("lease keep-alive failed: {e}")));
        }
        let r = v
            .get("result")
            .ok_or_else(|| self.bad(format!("no keep-alive result in {v}")))?;
        Ok(int(r.get("TTL"))
            .filter(|t| *t > 0)
            .map(|t| Duration::from_secs(t.unsigned_abs())))
    }

    /// Ends a lease now, deleting its keys.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", json!({"ID": lease.to_string()}))
            .await
            .map(|_| ())
    }

    /// The value of one key.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let v = self
            .call("/v3/kv/range", json!({"key": B64.encode(key)}))
            .await?;
        Ok(self.kvs(&v)?.into_iter().next())
    }

    /// The keys in `[from, to)`.
    pub async fn range(
        &self,
        from: &str,
        to: &str,
        options: RangeOptions,
    ) -> Result<Vec<Kv>, EtcdError> {
        let mut body = json!({
            "key": B64.encode(from),
            "range_end": B64.encode(to),
            "limit": options.limit.to_string(),
        });
        if options.descending {
            body["sort_order"] = json!("DESCEND");
            body["sort_target"] = json!("KEY");
        }
        let v = self.call("/v3/kv/range", body).await?;
        self.kvs(&v)
    }

    /// Runs `success` if every compare holds, else `failure`, atomically.
    pub async fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResult, EtcdError> {
        let compare: Vec<Value> = compare
            .iter()
            .map(|c| match c {
                Compare::CreateRevision(k, r) => json!({
                    "key": B64.encode(k), "target": "CREATE", "result": "EQUAL",
                    "create_revision": r.to_string(),
                }),
                Compare::ModRevision(k, r) => json!({
                    "key": B64.encode(k), "target": "MOD", "result": "EQUAL",
                    "mod_revision": r.to_string(),
                }),
            })
            .collect();
        let ops = |ops: &[Op]| -> Vec<Value> {
            ops.iter()
                .map(|o| match o {
                    Op::Put { key, value, lease } => {
                        let mut put = json!({"key": B64.encode(key), "value": B64.encode(value)});
                        if let Some(l) = lease {
                            put["lease"] = json!(l.to_string());
                        }
                        json!({ "request_put": put })
                    }
                    Op::DeleteRange { from, to } => json!({"request_delete_range": {
                        "key": B64.encode(from), "range_end": B64.encode(to),
                    }}),
                    Op::Get { key } => json!({"request_range": {"key": B64.encode(key)}}),
                })
                .collect()
        };
        let v = self
            .call(
                "/v3/kv/txn",
                json!({"compare": compare, "success": ops(success), "failure": ops(failure)}),
            )
            .await?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        // Every answer carries the store's revision; without it a term could not be known.
        let revision = int(v.get("header").and_then(|h| h.get("revision")))
            .filter(|r| *r > 0)
            .ok_or_else(|| self.bad(format!("no revision in the transaction's answer {v}")))?;
        let mut gets = Vec::new();
        for r in v
            .get("responses")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if let Some(range) = r.get("response_range") {
                gets.push(self.kvs(range)?);
            }
        }
        Ok(TxnResult {
            succeeded,
            revision,
            gets,
        })
    }

    fn kvs(&self, v: &Value) -> Result<Vec<Kv>, EtcdError> {
        let Some(items) = v.get("kvs").and_then(Value::as_array) else {
            return Ok(Vec::new());
        };
        items
            .iter()
            .map(|kv| {
                let decode = |field: &str| -> Result<Vec<u8>, EtcdError> {
                    match kv.get(field).and_then(Value::as_str) {
                        None => Ok(Vec::new()),
                        Some(s) => B64
                            .decode(s)
                            .map_err(|e| self.bad(format!("{field} is not base64: {e}"))),
                    }
                };
                Ok(Kv {
                    key: String::from_utf8_lossy(&decode("key")?).into_owned(),
                    value: decode("value")?,
                    create_revision: int(kv.get("create_revision")).unwrap_or(0),
                    mod_revision: int(kv.get("mod_revision")).unwrap_or(0),
                    lease: int(kv.get("lease")).unwrap_or(0),
                })
            })
            .collect()
    }
}

/// A 64-bit integer the gateway sent as a string (or, for small ones, a number).
fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_are_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end("/canaryd/"), "/canaryd0");
        assert_eq!(prefix_end("a"), "b");
        assert_eq!(prefix_end(""), "\0");
    }

    #[test]
    fn integers_come_as_strings_or_numbers() {
        assert_eq!(
            int(Some(&json!("9007199254740993"))),
            Some(9_007_199_254_740_993)
        );
        assert_eq!(int(Some(&json!(5))), Some(5));
        assert_eq!(int(Some(&json!("x"))), None);
        assert_eq!(int(None), None);
    }
}
