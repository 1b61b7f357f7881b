//! Time as the decision core sees it: plain values handed in, never read from a clock.
//!
//! Only [`SystemClock`] reads the real clock; `clippy.toml` bans `SystemTime::now` and
//! `Instant::now` everywhere else so that pure code stays deterministic.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A point in time, milliseconds since the Unix epoch (UTC).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Time(pub i64);

impl Time {
    /// Milliseconds since the epoch.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// Seconds since the epoch, as Prometheus wants evaluation times.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }

    /// The time `d` later.
    pub fn plus(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// How long after `earlier` this is; zero if it is not after it.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }

    /// RFC 3339 text, for people.
    pub fn to_rfc3339(self) -> String {
        // RFC 3339 ends with the year 9999; a time after it (a clock far off, a corrupt
        // record) is shown as the number it is.
        const YEAR_10000: u64 = 253_402_300_800;
        let secs = u64::try_from(self.0.div_euclid(1000)).unwrap_or(0);
        if secs >= YEAR_10000 {
            return format!("{} ms after 1970", self.0);
        }
        let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
        humantime::format_rfc3339_seconds(t).to_string()
    }
}

/// Where the shell gets the time from; tests use a manual clock.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Time;
}

/// The real clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> Time {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that only moves when told to, for tests of the shell.
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    pub fn new(start: Time) -> Self {
        ManualClock(std::sync::atomic::AtomicI64::new(start.0))
    }
    pub fn advance(&self, d: Duration) {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Time {
        Time(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::Time;

    /// Regression (review): a time after the year 9999 made `canaryd status` panic.
    #[test]
    fn times_beyond_rfc3339_are_shown_not_panicked_on() {
        assert_eq!(Time(1_700_000_000_000).to_rfc3339(), "2023-11-14T22:13:20Z");
        assert_eq!(
            Time(253_402_300_799_000).to_rfc3339(),
            "9999-12-31T23:59:59Z"
        );
        assert_eq!(
            Time(253_402_300_800_000).to_rfc3339(),
            "253402300800000 ms after 1970"
        );
        assert_eq!(
            Time(i64::MAX).to_rfc3339(),
            format!("{} ms after 1970", i64::MAX)
        );
    }
}
