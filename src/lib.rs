//! canaryd: a metrics-driven rollout controller for machine-learning models.
//!
//! See ARCHITECTURE.md for the map of this crate and its invariants.

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
pub mod time;
