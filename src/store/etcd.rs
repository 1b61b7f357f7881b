//! The state store of a highly available daemon, in etcd: the same records as the SQLite
//! store, written only by the leader and fenced by its term (see `crate::ha`).
//!
//! Keys, under the daemon's prefix:
//!
//! * `rollouts/<name>`: `{state, last_id, last_applied_id}` as JSON (the state is applied when
//!   its decision, the newest, is);
//! * `decisions/<name>/<id>`: one decision record as JSON, the id zero-padded to 20 digits so
//!   that key order is id order.
//!
//! Every write is one transaction that also checks the leader key's create revision (the
//! term) and the rollout key's modification revision (no lost update), so a decision, the state
//! it leads to and the log's trimming land together or not at all, and only from the replica
//! that leads. Ids count up per rollout.

use super::{DecisionRecord, StoreError, StoredRollout};
use crate::etcd::{Compare, Etcd, Op, RangeOptions, prefix_end};
use crate::ha::Leadership;
use crate::rollout::{Decision, RolloutState};
use crate::time::Time;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::Arc;

/// The etcd store. Cheap to clone. Its calls block on etcd requests, so they must run where
/// blocking is allowed (`spawn_blocking`, as every caller of the store does), inside the
/// runtime the store was created in.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
    /// The leadership term this store writes for, once bound (`for_term`): the rollouts of
    /// one term must not write under the next one, which may have decided otherwise.
    term: Option<i64>,
}

struct Inner {
    etcd: Etcd,
    prefix: String,
    leadership: Arc<Leadership>,
    decisions_kept: usize,
    runtime: tokio::runtime::Handle,
}

/// A rollout's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    state: RolloutState,
    /// The newest decision's id.
    last_id: i64,
    /// The newest decision the router confirmed (0: none).
    last_applied_id: i64,
}

impl EtcdStore {
    /// A store under `prefix`, fenced by `leadership`, keeping `decisions_kept` decisions per
    /// rollout as the SQLite store does. Must be created inside a tokio runtime.
    pub fn new(
        etcd: Etcd,
        prefix: &str,
        leadership: Arc<Leadership>,
        decisions_kept: usize,
    ) -> Result<EtcdStore, StoreError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            StoreError::Etcd(crate::etcd::EtcdError::Config {
                url: etcd.url().to_owned(),
                reason: format!("no async runtime for the etcd client: {e}"),
            })
        })?;
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                etcd,
                prefix: prefix.trim_end_matches('/').to_owned(),
                leadership,
                decisions_kept: decisions_kept.max(1),
                runtime,
            }),
            term: None,
        })
    }

    /// This store, writing only while the leadership term `revision` lasts.
    pub fn for_term(&self, revision: i64) -> EtcdStore {
        EtcdStore {
            inner: self.inner.clone(),
            term: Some(revision),
        }
    }

    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        self.inner.runtime.block_on(f)
    }

    fn rollout_key(&self, name: &str) -> String {
        format!("{}/rollouts/{name}", self.inner.prefix)
    }

    fn decisions_prefix(&self, name: &str) -> String {
        format!("{}/decisions/{name}/", self.inner.prefix)
    }

    fn decision_key(&self, name: &str, id: i64) -> String {
        format!("{}{id:020}", self.decisions_prefix(name))
    }

    pub fn may_write(&self) -> bool {
        self.fence().is_ok()
    }

    /// Until when this store's writes are certainly this replica's alone: the end of its
    /// leadership term, or now when it does not lead.
    pub fn writes_until(&self) -> tokio::time::Instant {
        match self.fence() {
            Ok(_) => self
                .inner
                .leadership
                .term()
                .map_or_else(tokio::time::Instant::now, |t| t.valid_until()),
            Err(_) => tokio::time::Instant::now(),
        }
    }

    /// The fencing compare of the term this store writes for, or why it may not write: no
    /// term, or not the one it is bound to.
    fn fence(&self) -> Result<Compare, StoreError> {
        let l = &self.inner.leadership;
        let term = l.term().ok_or_else(|| {
            StoreError::NotLeader(format!("replica {} holds no leadership term", l.replica()))
        })?;
        if self.term.is_some_and(|bound| bound != term.revision) {
            return Err(StoreError::NotLeader(format!(
                "replica {} leads in a later term than this rollout task's",
                l.replica()
            )));
        }
        Ok(Compare::CreateRevision(l.key().to_owned(), term.revision))
    }

    async fn read_record(&self, name: &str) -> Result<Option<(Record, i64)>, StoreError> {
        let Some(kv) = self.inner.etcd.get(&self.rollout_key(name)).await? else {
            return Ok(None);
        };
        let record: Record =
            serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt {
                rollout: name.to_owned(),
                detail: e.to_string(),
            })?;
        Ok(Some((record, kv.mod_revision)))
    }

    /// Runs a fenced write; a failed compare is a lost leadership or a concurrent writer.
    async fn write(&self, name: &str, mod_revision: i64, ops: Vec<Op>) -> Result<(), StoreError> {
        let fence = self.fence()?;
        let res = self
            .inner
            .etcd
            .txn(
                &[
                    fence,
                    Compare::ModRevision(self.rollout_key(name), mod_revision),
                ],
                &ops,
                &[],
            )
            .await?;
        if res.succeeded {
            Ok(())
        } else {
            Err(StoreError::NotLeader(format!(
                "the write for rollout {name} was refused: the leadership term ended or another replica wrote"
            )))
        }
    }

    fn encode<T: Serialize>(name: &str, v: &T) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(v).map_err(|e| StoreError::Corrupt {
            rollout: name.to_owned(),
            detail: e.to_string(),
        })
    }

    pub(super) fn record(&self, d: &Decision, now: Time) -> Result<i64, StoreError> {
        self.block(async {
            let name = &d.state.name;
            let (previous, mod_revision) = match self.read_record(name).await? {
                Some((r, m)) => (Some(r), m),
                None => (None, 0),
            };
            let last_id = previous.as_ref().map_or(0, |r| r.last_id);
            let last_applied_id = previous.as_ref().map_or(0, |r| r.last_applied_id);
            let id = last_id + 1;
            let entry = DecisionRecord::of(id, d, now);
            let record = Record {
                state: d.state.clone(),
                last_id: id,
                last_applied_id,
            };
            let mut ops = vec![
                Op::Put {
                    key: self.rollout_key(name),
                    value: Self::encode(name, &record)?,
                    lease: None,
                },
                Op::Put {
                    key: self.decision_key(name, id),
                    value: Self::encode(name, &entry)?,
                    lease: None,
                },
            ];
            // As in SQLite: decisions beyond the newest `decisions_kept` go once applied or
            // superseded by an applied one, that is, every id up to the newest applied one.
            let kept = i64::try_from(self.inner.decisions_kept).unwrap_or(i64::MAX);
            let cut = (id - kept).min(last_applied_id);
            if cut >= 1 {
                ops.push(Op::DeleteRange {
                    from: self.decisions_prefix(name),
                    to: self.decision_key(name, cut + 1),
                });
            }
            self.write(name, mod_revision, ops).await?;
            Ok(id)
        })
    }

    pub(super) fn mark_applied(&self, rollout: &str, decision_id: i64) -> Result<(), StoreError> {
        self.block(async {
            let Some((mut record, mod_revision)) = self.read_record(rollout).await? else {
                return Ok(());
            };
            let key = self.decision_key(rollout, decision_id);
            let mut ops = Vec::new();
            if let Some(kv) = self.inner.etcd.get(&key).await? {
                let mut entry: DecisionRecord =
                    serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt {
                        rollout: rollout.to_owned(),
                        detail: e.to_string(),
                    })?;
                entry.applied = true;
                ops.push(Op::Put {
                    key,
                    value: Self::encode(rollout, &entry)?,
                    lease: None,
                });
            }
            // The stored state is applied once its decision, the newest, is.
            record.last_applied_id = record.last_applied_id.max(decision_id);
            ops.push(Op::Put {
                key: self.rollout_key(rollout),
                value: Self::encode(rollout, &record)?,
                lease: None,
            });
            self.write(rollout, mod_revision, ops).await
        })
    }

    pub(super) fn load(&self, name: &str) -> Result<Option<StoredRollout>, StoreError> {
        self.block(async {
            Ok(self.read_record(name).await?.map(|(r, _)| StoredRollout {
                state: r.state,
                applied: r.last_applied_id == r.last_id,
            }))
        })
    }

    pub(super) fn names(&self) -> Result<Vec<String>, StoreError> {
        self.block(async {
            let prefix = format!("{}/rollouts/", self.inner.prefix);
            let kvs = self
                .inner
                .etcd
                .range(&prefix, &prefix_end(&prefix), RangeOptions::default())
                .await?;
            Ok(kvs
                .into_iter()
                .filter_map(|kv| kv.key.strip_prefix(&prefix).map(str::to_owned))
                .collect())
        })
    }

    pub(super) fn decisions(
        &self,
        rollout: &str,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Vec<DecisionRecord>, StoreError> {
        self.block(async {
            // Ids are contiguous per rollout (retention only removes the oldest), so the page
            // below `before` is the id range [before - limit, before): read it ascending (etcd
            // would read the whole log to sort it descending) and turn it round.
            let Some((record, _)) = self.read_record(rollout).await? else {
                return Ok(Vec::new());
            };
            let hi = before.map_or(record.last_id + 1, |b| b.min(record.last_id + 1));
            let lo = (hi - i64::try_from(limit).unwrap_or(i64::MAX)).max(1);
            if hi <= lo {
                return Ok(Vec::new());
            }
            let mut kvs = self
                .inner
                .etcd
                .range(
                    &self.decision_key(rollout, lo),
                    &self.decision_key(rollout, hi),
                    RangeOptions::default(),
                )
                .await?;
            kvs.reverse();
            // An unreadable entry must not hide the rest of the log.
            Ok(kvs
                .into_iter()
                .filter_map(|kv| match serde_json::from_slice(&kv.value) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        tracing::warn!(rollout, key = %kv.key, error = %e, "unreadable decision in etcd; skipped");
                        None
                    }
                })
                .collect())
        })
    }
}
