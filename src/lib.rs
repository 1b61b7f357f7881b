//! canaryd: a metrics-driven rollout controller for machine-learning models.
//!
//! See ARCHITECTURE.md for the map of this crate and its invariants.

pub mod judge;
pub mod observation;
pub mod policy;
pub mod rollout;
pub mod time;
pub mod router;
pub mod source;
pub mod bench;
pub mod sim;
pub mod store;
pub mod metrics;
pub mod controller;
pub mod api;
pub mod daemon;
pub mod client;
