//! Routing backends: tell a router what share of traffic the canary gets, and read back what
//! it really has. One small implementation per backend behind the object-safe [`Router`].
//!
//! Every backend is level-triggered: `read` reports what the router really has now, so the
//! controller can re-apply after anything that lost the split (an HAProxy reload, a restored
//! file, a webhook service that restarted). `apply` is idempotent.

pub mod file;
pub mod haproxy;
pub mod nginx;
pub mod webhook;

pub use file::FileRouter;
pub use haproxy::HaproxyRouter;
pub use nginx::NginxRouter;
pub use webhook::WebhookRouter;

use crate::policy::{Policy, RouterConfig};
use crate::time::SystemClock;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

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
    Ok(match &policy.router {
        RouterConfig::Haproxy {
            socket,
            backend,
            servers,
        } => Box::new(HaproxyRouter::new(socket, backend, servers.clone())?),
        RouterConfig::Nginx {
            weights_file,
            reload,
            upstream,
            servers,
        } => Box::new(NginxRouter::new(
            weights_file.clone(),
            reload.clone(),
            upstream,
            servers.clone(),
        )?),
        RouterConfig::Webhook { url, timeout } => Box::new(WebhookRouter::new(url, *timeout)?),
        RouterConfig::File { path } => {
            Box::new(FileRouter::new(path.clone(), Arc::new(SystemClock)))
        }
    })
}

/// Refuses targets no backend can represent, before anything is changed.
pub(crate) fn check_target(target: &Target) -> Result<(), RouterError> {
    if !target.canary_weight.is_finite() || !(0.0..=100.0).contains(&target.canary_weight) {
        return Err(RouterError::Config(format!(
            "canary weight {} for rollout {:?} is outside 0..=100 percent",
            target.canary_weight, target.rollout
        )));
    }
    // With one version in both roles, "the canary's share" has no meaning, and a read-back
    // could never match the target; refuse instead of guessing.
    if target.stable == target.canary {
        return Err(RouterError::Config(format!(
            "rollout {:?} names version {:?} as both stable and canary",
            target.rollout, target.stable
        )));
    }
    Ok(())
}

/// Integer weights `(stable, canary)` for a canary share in percent, for routers that only take
/// integers. The pair sums to one of `totals`, the one that represents `percent` most closely
/// (the first on a tie), so whole percents are exact with a total of 100. A share strictly
/// between 0 and 100 never rounds to zero on either side: a 0.1 % canary must still see some
/// traffic, and stable must not be switched off before promotion.
pub(crate) fn integer_split(percent: f64, totals: &[u32]) -> (u32, u32) {
    let mut best: Option<(f64, u32, u32)> = None;
    for &total in totals {
        let t = f64::from(total);
        // `percent` is checked to be within 0..=100, so the product fits in a u32.
        let mut canary = (percent * t / 100.0).round() as u32;
        if percent > 0.0 && canary == 0 {
            canary = 1;
        }
        if percent < 100.0 && canary >= total {
            canary = total.saturating_sub(1);
        }
        let error = (f64::from(canary) * 100.0 / t - percent).abs();
        if best.is_none_or(|(e, _, _)| error < e) {
            best = Some((error, total - canary, canary));
        }
    }
    best.map_or((100, 0), |(_, s, c)| (s, c))
}

/// The canary's share in percent given every version's weight; `None` when nothing has any
/// weight, because then no version gets traffic and there is no share to report.
pub(crate) fn canary_share<'a>(
    canary_weight: f64,
    all_weights: impl IntoIterator<Item = &'a f64>,
) -> Option<f64> {
    let total: f64 = all_weights.into_iter().sum();
    (total > 0.0).then(|| canary_weight * 100.0 / total)
}

/// The JSON document the webhook and file routers exchange: who the rollout is and each
/// version's percent of traffic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct WeightsDoc {
    pub rollout: String,
    pub stable: String,
    pub canary: String,
    /// Version label to percent of traffic.
    pub weights: BTreeMap<String, f64>,
    /// When canaryd wrote the document (RFC 3339); only the file router sets it. Read back as
    /// any JSON value, since a webhook service may stamp its answers its own way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<serde_json::Value>,
}

impl WeightsDoc {
    pub fn for_target(target: &Target) -> WeightsDoc {
        let mut weights = BTreeMap::new();
        weights.insert(target.stable.clone(), 100.0 - target.canary_weight);
        weights.insert(target.canary.clone(), target.canary_weight);
        WeightsDoc {
            rollout: target.rollout.clone(),
            stable: target.stable.clone(),
            canary: target.canary.clone(),
            weights,
            updated_at: None,
        }
    }

    /// Whether it sends everything to its stable version (and is well formed): its rollout
    /// no longer holds any traffic on it.
    pub fn released(&self) -> bool {
        self.weights
            .get(&self.stable)
            .is_some_and(|w| *w > 0.0 && w.is_finite())
            && self
                .weights
                .iter()
                .all(|(v, w)| *v == self.stable || *w == 0.0)
    }

    /// The canary's share of traffic this document describes, checked against the rollout it
    /// is read for. `source` names where it came from, for messages. A canary the document does
    /// not mention gets no traffic, which is what a router still set up for the previous canary
    /// sends it.
    pub fn canary_share(&self, target: &Target, source: &str) -> Result<f64, RouterError> {
        if self.rollout != target.rollout {
            return Err(RouterError::BadResponse(format!(
                "{source} belongs to rollout {:?}, not {:?}: another rollout, or this policy \
                 under its name before a rename, owns this router. Give each rollout its own \
                 router target; after a rename, `canaryd abort {}` sends all traffic to stable \
                 and takes the router over",
                self.rollout, target.rollout, target.rollout
            )));
        }
        if let Some((version, w)) = self
            .weights
            .iter()
            .find(|(_, w)| !w.is_finite() || **w < 0.0)
        {
            return Err(RouterError::BadResponse(format!(
                "{source} gives version {version:?} the weight {w}, expected a number >= 0"
            )));
        }
        let canary = self.weights.get(&target.canary).copied().unwrap_or(0.0);
        canary_share(canary, self.weights.values()).ok_or_else(|| {
            RouterError::BadResponse(format!(
                "{source} gives no version any traffic: {:?}",
                self.weights
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_split_is_exact_for_whole_percents_and_never_starves_a_side() {
        let haproxy = [100, 200, 256];
        let cases: &[(f64, (u32, u32))] = &[
            (0.0, (100, 0)),
            (1.0, (99, 1)),
            (50.0, (50, 50)),
            (100.0, (0, 100)),
            (0.5, (199, 1)),
            (0.01, (255, 1)),
            (99.99, (1, 255)),
        ];
        for &(pct, want) in cases {
            assert_eq!(integer_split(pct, &haproxy), want, "{pct} %");
        }
    }

    #[test]
    fn weights_doc_share_is_normalised_and_checks_the_rollout() {
        let t = Target {
            rollout: "r".into(),
            stable: "v1".into(),
            canary: "v2".into(),
            canary_weight: 0.0,
        };
        let mut doc = WeightsDoc::for_target(&Target {
            canary_weight: 25.0,
            ..t.clone()
        });
        assert_eq!(doc.canary_share(&t, "x").ok(), Some(25.0));
        doc.weights.insert("v2".into(), 50.0);
        doc.weights.insert("v1".into(), 150.0);
        assert_eq!(doc.canary_share(&t, "x").ok(), Some(25.0));
        doc.weights.remove("v2");
        assert_eq!(doc.canary_share(&t, "x").ok(), Some(0.0));
        doc.weights.insert("v1".into(), 0.0);
        assert!(matches!(
            doc.canary_share(&t, "x"),
            Err(RouterError::BadResponse(_))
        ));
        doc.weights.insert("v1".into(), f64::NAN);
        assert!(matches!(
            doc.canary_share(&t, "x"),
            Err(RouterError::BadResponse(_))
        ));
        doc.rollout = "other".into();
        assert!(matches!(
            doc.canary_share(&t, "x"),
            Err(RouterError::BadResponse(_))
        ));
    }

    #[test]
    fn targets_outside_the_range_or_with_one_version_are_refused() {
        let t = Target {
            rollout: "r".into(),
            stable: "v1".into(),
            canary: "v2".into(),
            canary_weight: 10.0,
        };
        assert!(check_target(&t).is_ok());
        for w in [-1.0, 100.5, f64::NAN, f64::INFINITY] {
            let bad = Target {
                canary_weight: w,
                ..t.clone()
            };
            assert!(
                matches!(check_target(&bad), Err(RouterError::Config(_))),
                "{w}"
            );
        }
        let same = Target {
            canary: "v1".into(),
            ..t
        };
        assert!(matches!(check_target(&same), Err(RouterError::Config(_))));
    }
}
