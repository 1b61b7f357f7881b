//! Durable state: one row per rollout and an append-only decision log, in SQLite.
//!
//! A decision is written, with the state it leads to, in one transaction **before** the router
//! is told, and marked applied once the router confirmed. A crash at any point therefore
//! leaves either the old state (the decision is taken again) or the new one, unapplied (the
//! router is told again); both are safe because applying a weight is idempotent.

use crate::judge::MetricReport;
use crate::rollout::{Decision, RolloutState};
use crate::time::Time;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex};

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

/// A rollout's stored state and whether its last decision reached the router.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRollout {
    pub state: RolloutState,
    pub applied: bool,
}

/// The store. Cheap to clone; calls block briefly on SQLite, so async callers run them in
/// `spawn_blocking`.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: String,
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

impl Store {
    /// Opens (creating if needed) the store at `path`; `:memory:` for tests.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
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
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: shown,
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

    /// Records a decision and the state it leads to, atomically, as not yet applied.
    /// Returns the decision's id.
    pub fn record(&self, d: &Decision, now: Time) -> Result<i64, StoreError> {
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
    pub fn mark_applied(&self, rollout: &str, decision_id: i64) -> Result<(), StoreError> {
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
    pub fn load(&self, name: &str) -> Result<Option<StoredRollout>, StoreError> {
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
    pub fn names(&self) -> Result<Vec<String>, StoreError> {
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
    pub fn decisions(
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
        let mut s = RolloutState {
            name: name.into(),
            stable: "v1".into(),
            canary: "v2".into(),
            phase,
            paused_from: None,
            step,
            weight,
            safe_weight: 0.0,
            attempt: 1,
            started_at: Some(Time(1)),
            step_started_at: Some(Time(1)),
            promoted_at: None,
            phase_since: None,
            consecutive_failures: 0,
            seen_data: Default::default(),
            baseline: Default::default(),
            memory: Default::default(),
            weight_history: vec![],
            analyses: 0,
            message: String::new(),
        };
        s.message = format!("at {weight}");
        s
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
