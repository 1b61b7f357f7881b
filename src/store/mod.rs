//! Durable state: one row per rollout and an append-only decision log, in SQLite.
//!
//! A decision is written, with the state it leads to, in one transaction **before** the router
//! is told, and marked applied once the router confirmed. A crash at any point therefore
//! leaves either the old state (the decision is taken again) or the new one, unapplied (the
//! router is told again); both are safe because applying a weight is idempotent.
//!
//! The log keeps a bounded number of decisions per rollout (`DEFAULT_DECISIONS_KEPT` unless
//! the store is opened with another limit): each `record` deletes, in its own transaction,
//! that rollout's decisions older than the newest ones kept, except those not yet marked
//! applied that no applied decision has superseded; a rollout's latest decision always stays.

use crate::judge::MetricReport;
use crate::rollout::{Decision, RolloutState};
use crate::time::Time;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex};

pub mod etcd;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state store: corrupt record for rollout {rollout}: {detail}")]
    Corrupt { rollout: String, detail: String },
    #[error("state store: {0}")]
    Etcd(#[from] crate::etcd::EtcdError),
    /// A highly available daemon that does not (or no longer) lead may not write.
    #[error("state store: this replica does not lead: {0}")]
    NotLeader(String),
}

/// One entry of the decision log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Increasing id; pages of the log are addressed by it.
    pub id: i64,
    pub rollout: String,
    pub at: Time,
    pub action: String,
    pub phase: String,
    pub step: usize,
    pub weight: f64,
    pub attempt: u32,
    pub stable: String,
    pub canary: String,
    pub reason: String,
    pub who: Option<String>,
    pub why: Option<String>,
    pub reports: Vec<MetricReport>,
    /// Whether the router confirmed the weight of this decision.
    pub applied: bool,
}

impl DecisionRecord {
    /// The log entry of decision `d`, taken at `now`, with id `id`, not yet applied.
    pub fn of(id: i64, d: &Decision, now: Time) -> DecisionRecord {
        DecisionRecord {
            id,
            rollout: d.state.name.clone(),
            at: now,
            action: d.action.as_str().into(),
            phase: d.state.phase.as_str().into(),
            step: d.state.step,
            weight: d.weight,
            attempt: d.state.attempt,
            stable: d.state.stable.clone(),
            canary: d.state.canary.clone(),
            reason: d.reason.clone(),
            who: d.who.clone(),
            why: d.why.clone(),
            reports: d.reports.clone(),
            applied: false,
        }
    }
}

/// A rollout's stored state and whether its last decision reached the router.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRollout {
    pub state: RolloutState,
    pub applied: bool,
}

/// Decisions kept per rollout unless the store is opened with another limit: at one decision
/// per analysis every 30 s, about three and a half days of a continuously analysed rollout.
pub const DEFAULT_DECISIONS_KEPT: usize = 10_000;

/// The store. Cheap to clone; calls block briefly (on SQLite, or on etcd for a highly
/// available daemon), so async callers run them in `spawn_blocking`.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite(Sqlite),
    Etcd(etcd::EtcdStore),
}

impl Store {
    /// Opens (creating if needed) the SQLite store at `path`; `:memory:` for tests. Keeps
    /// `DEFAULT_DECISIONS_KEPT` decisions per rollout.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with_retention(path, DEFAULT_DECISIONS_KEPT)
    }

    /// Opens the SQLite store keeping the newest `decisions_kept` decisions of each rollout (a
    /// limit below one counts as one), plus any older one not yet applied that no applied
    /// decision has superseded. A store that holds more (a lower limit than last time) is
    /// trimmed at each rollout's next decision.
    pub fn open_with_retention(path: &Path, decisions_kept: usize) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Sqlite(Sqlite::open(path, decisions_kept)?),
        })
    }

    /// The store kept in etcd, written only while this replica leads.
    pub fn etcd(store: etcd::EtcdStore) -> Store {
        Store {
            backend: Backend::Etcd(store),
        }
    }

    /// This store for the rollouts of one leadership term (`revision`): it refuses to write
    /// once that term is over, even if this replica leads again. SQLite has no terms.
    pub fn for_term(&self, revision: i64) -> Store {
        match &self.backend {
            Backend::Sqlite(_) => self.clone(),
            Backend::Etcd(e) => Store {
                backend: Backend::Etcd(e.for_term(revision)),
            },
        }
    }

    /// Whether this replica may change state and traffic now: always for SQLite; for etcd,
    /// only while it holds a leadership term it is sure has not expired.
    pub fn may_write(&self) -> bool {
        match &self.backend {
            Backend::Sqlite(_) => true,
            Backend::Etcd(e) => e.may_write(),
        }
    }

    /// Until when a write (or a router call, which changes what the store records) is
    /// certainly this daemon's alone: the end of a replica's leadership term; `None` for a
    /// store without terms.
    pub fn writes_until(&self) -> Option<tokio::time::Instant> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Etcd(e) => Some(e.writes_until()),
        }
    }

    /// Records a decision and the state it leads to, atomically, as not yet applied, and
    /// trims the rollout's log to the retention limit in the same transaction.
    /// Returns the decision's id.
    pub fn record(&self, d: &Decision, now: Time) -> Result<i64, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.record(d, now),
            Backend::Etcd(e) => e.record(d, now),
        }
    }

    /// Marks a decision (and its rollout's state) as confirmed by the router.
    pub fn mark_applied(&self, rollout: &str, decision_id: i64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.mark_applied(rollout, decision_id),
            Backend::Etcd(e) => e.mark_applied(rollout, decision_id),
        }
    }

    /// One rollout's stored state.
    pub fn load(&self, name: &str) -> Result<Option<StoredRollout>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.load(name),
            Backend::Etcd(e) => e.load(name),
        }
    }

    /// Names of every stored rollout.
    pub fn names(&self) -> Result<Vec<String>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.names(),
            Backend::Etcd(e) => e.names(),
        }
    }

    /// A page of a rollout's decision log, newest first, with ids below `before` if given.
    pub fn decisions(
        &self,
        rollout: &str,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Vec<DecisionRecord>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.decisions(rollout, limit, before),
            Backend::Etcd(e) => e.decisions(rollout, limit, before),
        }
    }
}

/// The embedded store: SQLite in one file.
#[derive(Clone)]
struct Sqlite {
    conn: Arc<Mutex<Connection>>,
    path: String,
    /// How many of a rollout's newest decisions `record` keeps (at least one); older ones
    /// are deleted once applied or superseded by an applied one.
    decisions_kept: usize,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rollouts (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    applied INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout TEXT NOT NULL,
    at INTEGER NOT NULL,
    action TEXT NOT NULL,
    phase TEXT NOT NULL,
    step INTEGER NOT NULL,
    weight REAL NOT NULL,
    attempt INTEGER NOT NULL,
    stable TEXT NOT NULL,
    canary TEXT NOT NULL,
    reason TEXT NOT NULL,
    who TEXT,
    why TEXT,
    reports TEXT NOT NULL,
    applied INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS decisions_by_rollout ON decisions (rollout, id);
";

impl Sqlite {
    fn open(path: &Path, decisions_kept: usize) -> Result<Sqlite, StoreError> {
        let shown = path.display().to_string();
        let err = |source| StoreError::Sqlite {
            path: shown.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        // WAL with synchronous=FULL: a committed decision survives a crash or power loss.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Sqlite {
            conn: Arc::new(Mutex::new(conn)),
            path: shown,
            decisions_kept: decisions_kept.max(1),
        })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back), so a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a decision and the state it leads to, atomically, as not yet applied, and
    /// trims the rollout's log to the retention limit in the same transaction.
    /// Returns the decision's id.
    fn record(&self, d: &Decision, now: Time) -> Result<i64, StoreError> {
        let state = serde_json::to_string(&d.state).map_err(|e| StoreError::Corrupt {
            rollout: d.state.name.clone(),
            detail: e.to_string(),
        })?;
        let reports = serde_json::to_string(&d.reports).unwrap_or_else(|_| "[]".into());
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO decisions (rollout, at, action, phase, step, weight, attempt, stable, canary, reason, who, why, reports)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                d.state.name,
                now.0,
                d.action.as_str(),
                d.state.phase.as_str(),
                d.state.step as i64,
                d.weight,
                d.state.attempt,
                d.state.stable,
                d.state.canary,
                d.reason,
                d.who,
                d.why,
                reports
            ],
        )
        .map_err(|e| self.err(e))?;
        let id = tx.last_insert_rowid();
        // The cut-off is the newest decision beyond the limit (none while the log is shorter,
        // and then `id <= NULL` deletes nothing). Unapplied decisions newer than the newest
        // applied one stay: they are the record of a weight the router may not have. Older
        // ones were superseded by a decision the router did take, so a long router outage
        // cannot grow the log for good.
        tx.execute(
            "DELETE FROM decisions WHERE rollout = ?1 AND id <= (
                 SELECT id FROM decisions WHERE rollout = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)
             AND (applied = 1 OR id < (
                 SELECT MAX(id) FROM decisions WHERE rollout = ?1 AND applied = 1))",
            params![
                d.state.name,
                i64::try_from(self.decisions_kept).unwrap_or(i64::MAX)
            ],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO rollouts (name, state, applied, updated_at) VALUES (?1, ?2, 0, ?3)
             ON CONFLICT(name) DO UPDATE SET state = excluded.state, applied = 0, updated_at = excluded.updated_at",
            params![d.state.name, state, now.0],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(id)
    }

    /// Marks a decision (and its rollout's state) as confirmed by the router.
    fn mark_applied(&self, rollout: &str, decision_id: i64) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE decisions SET applied = 1 WHERE id = ?1",
            params![decision_id],
        )
        .map_err(|e| self.err(e))?;
        // Only the latest decision's application makes the stored state applied.
        tx.execute(
            "UPDATE rollouts SET applied = 1 WHERE name = ?1
             AND ?2 = (SELECT MAX(id) FROM decisions WHERE rollout = ?1)",
            params![rollout, decision_id],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// One rollout's stored state.
    fn load(&self, name: &str) -> Result<Option<StoredRollout>, StoreError> {
        let conn = self.lock();
        let row: Option<(String, bool)> = conn
            .query_row(
                "SELECT state, applied FROM rollouts WHERE name = ?1",
                params![name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        row.map(|(json, applied)| {
            serde_json::from_str(&json)
                .map(|state| StoredRollout { state, applied })
                .map_err(|e| StoreError::Corrupt {
                    rollout: name.to_owned(),
                    detail: e.to_string(),
                })
        })
        .transpose()
    }

    /// Names of every stored rollout.
    fn names(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT name FROM rollouts ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// A page of a rollout's decision log, newest first, with ids below `before` if given.
    fn decisions(
        &self,
        rollout: &str,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Vec<DecisionRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT id, rollout, at, action, phase, step, weight, attempt, stable, canary, reason, who, why, reports, applied
                 FROM decisions WHERE rollout = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                params![rollout, before.unwrap_or(i64::MAX), limit as i64],
                |r| {
                    let reports: String = r.get(13)?;
                    Ok(DecisionRecord {
                        id: r.get(0)?,
                        rollout: r.get(1)?,
                        at: Time(r.get(2)?),
                        action: r.get(3)?,
                        phase: r.get(4)?,
                        step: r.get::<_, i64>(5)?.max(0) as usize,
                        weight: r.get(6)?,
                        attempt: r.get(7)?,
                        stable: r.get(8)?,
                        canary: r.get(9)?,
                        reason: r.get(10)?,
                        who: r.get(11)?,
                        why: r.get(12)?,
                        // An unreadable evidence blob must not hide the rest of the log.
                        reports: serde_json::from_str(&reports).unwrap_or_default(),
                        applied: r.get(14)?,
                    })
                },
            )
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Action, Phase};

    fn state(name: &str, phase: Phase, step: usize, weight: f64) -> RolloutState {
        crate::rollout::sample(name, phase, step, weight)
    }

    fn decision(s: RolloutState, action: Action) -> Decision {
        Decision {
            action,
            weight: s.weight,
            state: s,
            reports: vec![],
            reason: "because".into(),
            who: None,
            why: None,
        }
    }

    #[test]
    fn record_then_reopen_keeps_state_and_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let store = Store::open(&path).unwrap();
            let id1 = store
                .record(
                    &decision(state("a", Phase::Progressing, 0, 1.0), Action::Start),
                    Time(10),
                )
                .unwrap();
            store.mark_applied("a", id1).unwrap();
            store
                .record(
                    &decision(state("a", Phase::Progressing, 1, 5.0), Action::Advance),
                    Time(20),
                )
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let got = store.load("a").unwrap().unwrap();
        assert_eq!(got.state.step, 1);
        assert_eq!(got.state.weight, 5.0);
        assert!(!got.applied, "the advance was never confirmed");
        let log = store.decisions("a", 10, None).unwrap();
        assert_eq!(
            log.iter().map(|d| d.action.as_str()).collect::<Vec<_>>(),
            ["advance", "start"]
        );
        assert!(log[1].applied && !log[0].applied);
        let older = store.decisions("a", 10, Some(log[0].id)).unwrap();
        assert_eq!(older.len(), 1);
        assert_eq!(store.names().unwrap(), ["a"]);
        assert!(store.load("missing").unwrap().is_none());
    }

    /// Records an applied decision of rollout `name` at step `step`; returns its id.
    fn applied(store: &Store, name: &str, step: usize) -> i64 {
        let d = decision(
            state(name, Phase::Progressing, step, step as f64),
            Action::Advance,
        );
        let id = store.record(&d, Time(step as i64)).unwrap();
        store.mark_applied(name, id).unwrap();
        id
    }

    fn ids(log: &[DecisionRecord]) -> Vec<i64> {
        log.iter().map(|d| d.id).collect()
    }

    #[test]
    fn retention_keeps_the_newest_decisions_of_each_rollout_and_paging_still_works() {
        let store = Store::open_with_retention(Path::new(":memory:"), 5).unwrap();
        let mut a = Vec::new();
        let mut b = Vec::new();
        for step in 0..12 {
            a.push(applied(&store, "a", step));
            // Rollout b logs as many decisions as the limit allows, interleaved with a's.
            if step % 2 == 0 && b.len() < 5 {
                b.push(applied(&store, "b", step));
            }
        }
        let newest: Vec<i64> = a[7..].iter().rev().copied().collect();
        assert_eq!(ids(&store.decisions("a", 100, None).unwrap()), newest);
        let first = store.decisions("a", 2, None).unwrap();
        assert_eq!(ids(&first), newest[..2]);
        let second = store.decisions("a", 2, Some(first[1].id)).unwrap();
        assert_eq!(ids(&second), newest[2..4]);
        let last = store.decisions("a", 2, Some(second[1].id)).unwrap();
        assert_eq!(ids(&last), newest[4..]);
        assert!(
            store
                .decisions("a", 2, Some(last[0].id))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            ids(&store.decisions("b", 100, None).unwrap()),
            b.iter().rev().copied().collect::<Vec<_>>(),
            "another rollout's log is not trimmed by a's decisions"
        );
        let a_state = store.load("a").unwrap().unwrap();
        assert_eq!(a_state.state.step, 11);
        assert!(a_state.applied);
    }

    #[test]
    fn retention_keeps_unapplied_decisions_until_superseded_and_always_the_latest() {
        let store = Store::open_with_retention(Path::new(":memory:"), 2).unwrap();
        let record = |step: usize| {
            let d = decision(
                state("a", Phase::Progressing, step, step as f64),
                Action::Advance,
            );
            store.record(&d, Time(step as i64)).unwrap()
        };
        let old_applied = applied(&store, "a", 0);
        // The router is failing: these three never reach it, and none is trimmed while no
        // later decision has been applied.
        let unapplied = [record(1), record(2), record(3)];
        let log = store.decisions("a", 100, None).unwrap();
        assert_eq!(ids(&log), [unapplied[2], unapplied[1], unapplied[0]]);
        assert!(!log.iter().any(|d| d.id == old_applied));
        // The router is back: the unapplied decisions it superseded go like any other.
        let kept = [applied(&store, "a", 4), applied(&store, "a", 5)];
        let log = store.decisions("a", 100, None).unwrap();
        assert_eq!(ids(&log), [kept[1], kept[0]]);
        // The latest decision is kept before it is applied, and applying it still works.
        let latest = record(6);
        let log = store.decisions("a", 100, None).unwrap();
        assert_eq!(ids(&log), [latest, kept[1]]);
        store.mark_applied("a", latest).unwrap();
        assert!(store.load("a").unwrap().unwrap().applied);
    }

    #[test]
    fn a_limit_of_zero_still_keeps_the_latest_decision_and_a_lower_limit_trims_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let store = Store::open(&path).unwrap();
            for step in 0..4 {
                applied(&store, "a", step);
            }
            assert_eq!(store.decisions("a", 100, None).unwrap().len(), 4);
        }
        let store = Store::open_with_retention(&path, 0).unwrap();
        let latest = applied(&store, "a", 4);
        assert_eq!(ids(&store.decisions("a", 100, None).unwrap()), [latest]);
    }

    #[test]
    fn applying_an_old_decision_does_not_mark_a_newer_state_applied() {
        let store = Store::open(Path::new(":memory:")).unwrap();
        let id1 = store
            .record(
                &decision(state("a", Phase::Progressing, 0, 1.0), Action::Start),
                Time(10),
            )
            .unwrap();
        store
            .record(
                &decision(state("a", Phase::Progressing, 1, 5.0), Action::Advance),
                Time(20),
            )
            .unwrap();
        store.mark_applied("a", id1).unwrap();
        assert!(!store.load("a").unwrap().unwrap().applied);
    }
}
