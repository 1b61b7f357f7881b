//! Routing backends: tell a router what share of traffic the canary gets, and read back what
//! it really has. One small implementation per backend behind the object-safe [`Router`].

use crate::policy::{Policy, RouterConfig};
use std::future::Future;
use std::pin::Pin;

/// A boxed future, so that the traits at the edges stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The traffic split the router must have for one rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub rollout: String,
    pub stable: String,
    pub canary: String,
    /// Percent of traffic to the canary, 0 to 100; stable gets the rest, and every other
    /// version the router knows gets none.
    pub canary_weight: f64,
}

/// Why a router call failed. `kind()` is the label of the router-error metric.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The router could not be reached (connection refused, socket missing, timeout).
    #[error("router unreachable: {0}")]
    Unreachable(String),
    /// The router answered but refused or failed the change.
    #[error("router rejected the change: {0}")]
    Rejected(String),
    /// The router's answer could not be understood.
    #[error("unexpected answer from the router: {0}")]
    BadResponse(String),
    /// The configuration cannot work (a version without a server, say).
    #[error("router misconfigured: {0}")]
    Config(String),
}

impl RouterError {
    pub fn kind(&self) -> &'static str {
        match self {
            RouterError::Unreachable(_) => "unreachable",
            RouterError::Rejected(_) => "rejected",
            RouterError::BadResponse(_) => "bad-response",
            RouterError::Config(_) => "config",
        }
    }
}

/// A routing backend.
pub trait Router: Send + Sync {
    /// `haproxy`, `nginx`, `webhook` or `file`.
    fn kind(&self) -> &'static str;
    /// Sets the split. Idempotent: applying the same target twice is harmless.
    fn apply<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<(), RouterError>>;
    /// The canary's share of traffic in percent as the router has it now.
    fn read<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<f64, RouterError>>;
}

/// Builds the router a policy names.
pub fn from_policy(policy: &Policy) -> Result<Box<dyn Router>, RouterError> {
    match &policy.router {
        other => Err(RouterError::Config(format!(
            "the {} router is not built yet",
            RouterConfig::kind(other)
        ))),
    }
}
