//! canaryd: a metrics-driven rollout controller for machine-learning models.
//!
//! See ARCHITECTURE.md for the map of this crate and its invariants.

/// The `User-Agent` of every HTTP request canaryd makes (Prometheus, etcd, routers, webhooks,
/// the promotion gate, the command line's API calls), so the receiver's logs say who asked.
pub const USER_AGENT: &str = concat!("canaryd/", env!("CARGO_PKG_VERSION"));

pub mod api;
pub mod bench;
pub mod client;
pub mod controller;
pub mod daemon;
pub mod demo;
pub mod etcd;
pub mod ha;
pub mod judge;
pub mod metrics;
pub mod observation;
pub mod policy;
pub mod rollout;
pub mod router;
pub mod sim;
pub mod source;
pub mod store;
pub mod text;
pub mod time;
