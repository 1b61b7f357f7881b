//! Leader election for a highly available daemon: several replicas share one etcd, one leads
//! and runs the rollouts, the others stand by and take over when its lease expires.
//!
//! A replica leads while it holds the key `<prefix>/leader`, attached to a lease it keeps
//! alive. The key's create revision is the leadership's *term*: every write of the leader's
//! state is a transaction that first checks the key still has that create revision, so a
//! replica that lost the key (its lease expired while it was stalled or cut off) cannot write
//! again, even if it does not know yet (fenced writes). Before touching traffic, the leader also
//! checks that its term cannot have expired by its own clock: a lease renewed at `t` lives on
//! the server until at least `t + ttl`, and the replica counts its term as over at
//! `t + ttl − ttl/6`.

use crate::etcd::{Compare, Etcd, EtcdError, Op};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// What this replica is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not leading: `leader` is the replica that does, when known.
    Standby {
        leader: Option<String>,
    },
    Leader,
}

/// A leadership term this replica holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Term {
    /// Create revision of the leader key: the fencing token of every write.
    pub revision: i64,
    lease: i64,
    /// Until when the lease is certainly alive by this replica's clock.
    valid_until: Instant,
}

impl Term {
    /// Until when the lease is certainly alive by this replica's clock: no other replica can
    /// lead before then.
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }
}

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    /// Key prefix of this daemon's data in etcd, like `/canaryd`.
    pub prefix: String,
    /// This replica's name, shown to the others.
    pub replica: String,
    /// Time to live of the leader's lease: a crashed leader is replaced after about this long.
    pub ttl: Duration,
}

/// The election and this replica's place in it. Shared by the store (for fencing) and the
/// daemon (to run the rollouts only while leading).
pub struct Leadership {
    etcd: Etcd,
    key: String,
    config: ElectionConfig,
    term: Mutex<Option<Term>>,
    role: watch::Sender<Role>,
    /// The last etcd error of the election, until a round succeeds: why no replica may be
    /// known to lead.
    error: Mutex<Option<String>>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("key", &self.key)
            .field("replica", &self.config.replica)
            .field("role", &*self.role.borrow())
            .finish()
    }
}

impl Leadership {
    pub fn new(etcd: Etcd, config: ElectionConfig) -> Arc<Leadership> {
        let (role, _) = watch::channel(Role::Standby { leader: None });
        Arc::new(Leadership {
            key: format!("{}/leader", config.prefix),
            etcd,
            config,
            term: Mutex::new(None),
            role,
            error: Mutex::new(None),
        })
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.config.replica
    }

    /// The role, as it changes.
    pub fn watch(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Why the election cannot reach etcd, while it cannot.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The key whose create revision fences writes.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The current term, if this replica leads and its lease cannot have expired yet.
    pub fn term(&self) -> Option<Term> {
        let term = *self.term.lock().unwrap_or_else(|p| p.into_inner());
        term.filter(|t| Instant::now() < t.valid_until)
    }

    fn set_term(&self, term: Option<Term>) {
        *self.term.lock().unwrap_or_else(|p| p.into_inner()) = term;
    }

    fn set_role(&self, role: Role) {
        self.role.send_if_modified(|r| {
            if *r == role {
                false
            } else {
                *r = role;
                true
            }
        });
    }

    /// How long a renewal at some moment keeps the term certain: the lease's TTL less a
    /// sixth for clock drift.
    fn certain_for(&self) -> Duration {
        // etcd counts leases in whole seconds, and `Etcd::grant` rounds down.
        let ttl = Duration::from_secs(self.config.ttl.as_secs().max(1));
        ttl - ttl / 6
    }

    /// Campaigns, leads and stands by until `stop` turns true; then gives the leadership up
    /// at once (revoking the lease) so another replica takes over without waiting for it to
    /// expire.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let pause = (self.config.ttl / 3).max(Duration::from_millis(100));
        let mut lease: Option<i64> = None;
        while !*stop.borrow() {
            let began = Instant::now();
            let result = self.round(&mut lease).await;
            let error = result.as_ref().err().map(ToString::to_string);
            let previous = std::mem::replace(
                &mut *self.error.lock().unwrap_or_else(|p| p.into_inner()),
                error.clone(),
            );
            match (&error, previous) {
                // Said once per new error, not at every round.
                (Some(e), last) if last.as_ref() != Some(e) => {
                    tracing::warn!(replica = %self.config.replica, error = %e, "leader election: etcd call failed; retrying")
                }
                (None, Some(_)) => {
                    tracing::info!(replica = %self.config.replica, "leader election: etcd answers again")
                }
                _ => {}
            }
            if error.is_some() && self.term().is_none() {
                self.lose("etcd unreachable");
            }
            // Rounds start every `pause`, however long one took, so slow answers do not let
            // the term run out between renewals.
            tokio::select! {
                _ = tokio::time::sleep(pause.saturating_sub(began.elapsed())) => {}
                r = stop.changed() => if r.is_err() { break },
            }
        }
        let held = self
            .term
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.lease);
        self.set_term(None);
        self.set_role(Role::Standby { leader: None });
        if let Some(l) = held.or(lease) {
            match self.etcd.revoke(l).await {
                Ok(()) if held.is_some() => {
                    tracing::info!(replica = %self.config.replica, "leadership given up")
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(replica = %self.config.replica, error = %e, "cannot revoke the lease; another replica takes over when it expires")
                }
            }
        }
    }

    /// One step of the election: renew the lease, then lead, keep leading or learn who does.
    async fn round(&self, lease: &mut Option<i64>) -> Result<(), EtcdError> {
        let sent = Instant::now();
        let id = match *lease {
            Some(id) => match self.etcd.keep_alive(id).await? {
                Some(_) => id,
                None => {
                    // The lease expired (this replica stalled, or etcd lost it): whatever it
                    // held is gone.
                    *lease = None;
                    self.lose("lease expired");
                    return Ok(());
                }
            },
            None => {
                let id = self.etcd.grant(self.config.ttl).await?;
                *lease = Some(id);
                id
            }
        };
        let valid_until = sent + self.certain_for();
        let held = *self.term.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = held.filter(|t| t.lease == id) {
            // The renewal keeps the key, and the term, alive: extend it at once.
            self.set_term(Some(Term { valid_until, ..t }));
            // Still ours? The key may have been deleted by hand.
            let now = self.etcd.get(&self.key).await?;
            if now.is_some_and(|kv| kv.create_revision == t.revision) {
                return Ok(());
            }
            self.lose("the leader key is gone");
        }
        let res = self
            .etcd
            .txn(
                &[Compare::CreateRevision(self.key.clone(), 0)],
                &[Op::Put {
                    key: self.key.clone(),
                    value: self.config.replica.as_bytes().to_vec(),
                    lease: Some(id),
                }],
                &[Op::Get {
                    key: self.key.clone(),
                }],
            )
            .await?;
        if res.succeeded {
            self.set_term(Some(Term {
                revision: res.revision,
                lease: id,
                valid_until,
            }));
            tracing::info!(replica = %self.config.replica, term = res.revision, "leading");
            self.set_role(Role::Leader);
        } else {
            let holder = res.gets.first().and_then(|kvs| kvs.first());
            if let Some(kv) = holder.filter(|kv| kv.lease == id && kv.create_revision > 0) {
                // The key is still on this replica's live lease: its term had only ended by
                // its own clock (a slow round). It leads again, under the same term.
                self.set_term(Some(Term {
                    revision: kv.create_revision,
                    lease: id,
                    valid_until,
                }));
                tracing::info!(replica = %self.config.replica, term = kv.create_revision, "leading again");
                self.set_role(Role::Leader);
                return Ok(());
            }
            let leader = holder.map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
            if leader.as_deref() == Some(self.config.replica.as_str())
                && self.role()
                    != (Role::Standby {
                        leader: leader.clone(),
                    })
            {
                tracing::warn!(replica = %self.config.replica, "another replica leads under this replica's name (or, right after a restart, this replica's previous process, until its lease runs out): give every replica its own --replica");
            }
            self.set_role(Role::Standby { leader });
        }
        Ok(())
    }

    fn lose(&self, why: &str) {
        let had = self
            .term
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some();
        if had {
            tracing::warn!(replica = %self.config.replica, why, "leadership lost");
        }
        self.set_role(Role::Standby { leader: None });
    }
}
