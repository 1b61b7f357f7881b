//! The rollout engine: a state machine driven by one pure function, [`decide`].
//!
//! **This module performs no I/O, never awaits and never reads the clock.**

mod decide;
mod state;
mod window;

pub use decide::{Action, Decision, decide, fmt_pct};
#[cfg(test)]
pub(crate) use state::sample;
pub use state::{Phase, RolloutState, WeightChange};
pub use window::analysis_window;
