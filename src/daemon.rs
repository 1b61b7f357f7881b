//! `canaryd run`: wires the store, metrics, rollout tasks and the API together.
//! `serve` takes a bound listener and a shutdown future, so tests run the daemon on
//! 127.0.0.1:0 in-process.

use crate::api::{self, ApiState};
use crate::controller::{self, Registry, RouterFactory, Shared, SourceFactory};
use crate::metrics::Metrics;
use crate::store::{self, Store};
use crate::time::Clock;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tokio::sync::watch;

/// How long an API client may take to send a request's line and headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on what clients and history may cost. `canaryd run` uses the defaults; tests
/// shorten them.
#[derive(Clone, Debug)]
pub struct Limits {
    /// How long the API waits for a request's line and headers, counted from when it starts
    /// waiting for them, on a new connection or an idle kept-alive one. A slower client is
    /// disconnected, so one that trickles headers forever (slowloris) holds neither a
    /// connection nor the shutdown.
    pub header_read_timeout: Duration,
    /// Decisions kept in the log per rollout; see `Store::open_with_retention`.
    pub decisions_kept: usize,
    /// The shortest `strategy.interval` a policy may have: `policy::MIN_INTERVAL`, lower only
    /// in tests that run whole rollouts in a second.
    pub min_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            decisions_kept: store::DEFAULT_DECISIONS_KEPT,
            min_interval: crate::policy::MIN_INTERVAL,
        }
    }
}

/// Everything `serve` needs besides the listener.
pub struct DaemonConfig {
    pub policies: PathBuf,
    pub state: PathBuf,
    pub token: Option<String>,
    pub dry_run: bool,
    /// How often the policies directory is scanned for edits.
    pub poll: Duration,
    pub clock: Arc<dyn Clock>,
    pub routers: RouterFactory,
    pub sources: SourceFactory,
    /// The metrics registry; a fresh one when `None`. Given when the source must report to it.
    pub metrics: Option<Metrics>,
    /// Run as one replica of a highly available daemon, with state in etcd (`state` is then
    /// unused); `None` for the embedded SQLite store.
    pub ha: Option<HaConfig>,
}

/// Where a highly available daemon keeps its state and elects its leader.
#[derive(Clone, Debug)]
pub struct HaConfig {
    /// etcd's client URL, like `http://127.0.0.1:2379`.
    pub etcd: String,
    /// For an https etcd: CA and client certificate.
    pub tls: crate::etcd::EtcdTls,
    /// For an etcd with authentication enabled: the user canaryd signs in as.
    pub auth: Option<crate::etcd::EtcdAuth>,
    pub election: crate::ha::ElectionConfig,
}

/// Runs the daemon until `shutdown` completes, then stops every rollout after its current
/// tick. The store commits every decision as it is taken, so there is nothing left to flush.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: DaemonConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(listener, config, Limits::default(), shutdown).await
}

/// `serve` with the given limits instead of the defaults.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    config: DaemonConfig,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Daemon::open(config, limits)?
        .serve(listener, shutdown)
        .await
}

/// A daemon whose store is open, not yet serving: `canaryd run` opens it before it says the
/// daemon runs, so a bad `--state` is one clear startup error.
pub struct Daemon {
    config: DaemonConfig,
    limits: Limits,
    store: Store,
    /// The election of a highly available daemon.
    leadership: Option<Arc<crate::ha::Leadership>>,
    /// The lock on a SQLite state, held until the daemon ends.
    state_lock: Option<std::fs::File>,
}

impl Daemon {
    /// Opens the state store: the SQLite file `config.state` (an in-memory one for a dry
    /// run, which must not leave progress for a real daemon to resume), or, for a highly
    /// available daemon, etcd (no request is sent yet: etcd may come up after the daemon). Must be called
    /// inside the tokio runtime that will serve.
    pub fn open(config: DaemonConfig, limits: Limits) -> anyhow::Result<Daemon> {
        anyhow::ensure!(
            !(config.dry_run && config.ha.is_some()),
            "--dry-run and --etcd exclude each other: a dry run keeps its state in memory, and a replica's is shared with the others"
        );
        let mut state_lock = None;
        let (store, leadership) = match &config.ha {
            Some(ha) => {
                // Every etcd call must give up well within a third of the lease, so that a
                // stalled call never outlives the leadership term it was made in.
                let timeout = (ha.election.ttl / 4).max(Duration::from_millis(200));
                let mut etcd = crate::etcd::Etcd::with_tls(&ha.etcd, timeout, &ha.tls)
                    .map_err(|e| anyhow::anyhow!("--etcd: {e}"))?;
                if let Some(auth) = &ha.auth {
                    etcd = etcd.with_auth(auth.clone());
                }
                let leadership = crate::ha::Leadership::new(etcd.clone(), ha.election.clone());
                let store = Store::etcd(store::etcd::EtcdStore::new(
                    etcd,
                    &ha.election.prefix,
                    leadership.clone(),
                    limits.decisions_kept,
                )?);
                (store, Some(leadership))
            }
            // A dry run keeps its made-up progress in memory: stored, it would be resumed
            // by the next real daemon, which would then push the dry run's weights to the
            // router at once.
            None if config.dry_run => (
                Store::open_with_retention(Path::new(":memory:"), limits.decisions_kept)?,
                None,
            ),
            None => {
                state_lock = Some(lock_state(&config.state)?);
                (open_store(&config.state, limits.decisions_kept)?, None)
            }
        };
        Ok(Daemon {
            config,
            limits,
            store,
            leadership,
            state_lock,
        })
    }

    /// Runs the daemon until `shutdown` completes, as `serve` does.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Daemon {
            config,
            limits,
            store,
            leadership,
            state_lock: _held_until_the_daemon_ends,
        } = self;
        let metrics = match config.metrics {
            Some(m) => m,
            None => Metrics::new(prometheus::Registry::new())?,
        };
        let views = controller::Views::default();
        let registry = Registry::default();
        let policy_errors = controller::PolicyErrors::default();
        let ready = Arc::new(AtomicBool::new(false));
        // The client of the policies' webhooks and promotion gates.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .user_agent(crate::USER_AGENT)
            .build()?;
        let shared = Shared {
            store: store.clone(),
            metrics: metrics.clone(),
            clock: config.clock,
            views: views.clone(),
            routers: config.routers,
            sources: config.sources,
            http,
            dry_run: config.dry_run,
            min_interval: limits.min_interval,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // Every task of the daemon lives in this set, so that dropping `serve` (a crash in
        // tests) ends them all with it.
        let mut tasks = tokio::task::JoinSet::new();
        let rollouts = Rollouts {
            shared,
            registry: registry.clone(),
            policy_errors: policy_errors.clone(),
            policies: config.policies,
            poll: config.poll,
            ready: ready.clone(),
        };
        match &leadership {
            None => {
                rollouts.shared.metrics.set_leader(true);
                tasks.spawn(rollouts.run(stop_rx.clone()));
            }
            Some(l) => {
                // The election ends after the rollouts: a leader gives its term up (revoking
                // the lease, so another replica takes over at once) only once its tasks have
                // stopped.
                let (election_tx, election_rx) = watch::channel(false);
                tasks.spawn(l.clone().run(election_rx));
                let lead = lead(l.clone(), rollouts, stop_rx.clone());
                tasks.spawn(async move {
                    lead.await;
                    let _ = election_tx.send(true);
                });
            }
        }
        let app = api::router(ApiState {
            views,
            registry,
            store,
            metrics,
            policy_errors,
            ready,
            token: config.token,
            leadership: leadership.clone(),
        });
        let mut server = tokio::spawn(serve_api(
            listener,
            app,
            limits.header_read_timeout,
            stop_rx,
        ));
        // Aborted with `serve` itself, like the tasks in the set.
        let _server_guard = AbortOnDrop(server.abort_handle());
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight ticks");
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        (&mut server).await?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Refuses to serve the API where anyone could act without a token: `listen` (as the user gave
/// it: `127.0.0.1:9850`, or a host name with a port such as `localhost:9850`) resolves to
/// `addrs`, and unless each of them is a loopback address, the API needs a token (`token`) or
/// an explicit `insecure` (`--insecure-no-auth`). A name is judged by what it resolves to,
/// every address of it, since the listener may bind any of them.
pub fn check_listen(
    listen: &str,
    addrs: &[std::net::SocketAddr],
    token: bool,
    insecure: bool,
) -> anyhow::Result<()> {
    let public: Vec<String> = addrs
        .iter()
        .filter(|a| !a.ip().is_loopback())
        .map(ToString::to_string)
        .collect();
    if public.is_empty() || token || insecure {
        return Ok(());
    }
    let shown = if public.len() == 1 && public[0] == listen {
        listen.to_owned()
    } else {
        format!("{listen} ({})", public.join(", "))
    };
    anyhow::bail!(
        "refusing to listen on {shown} without an API token: give --api-token-file (or \
         api_token_file in the config file), or --insecure-no-auth (insecure_no_auth) if the \
         network is trusted"
    )
}

/// Locks the SQLite state for this daemon alone (`<state>.lock`, an exclusive `flock`, let go
/// when the process ends however it ends). Two daemons on one state would each drive the same
/// routers from their own memory: one rolls back, the other puts its weight back.
fn lock_state(path: &Path) -> anyhow::Result<std::fs::File> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let lock = path.with_file_name(name);
    // A missing directory is reported by `open_store`, with its reasons.
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
    {
        Ok(f) => f,
        // The state's own path is wrong (a missing directory, a file where one should be):
        // `open_store` says how.
        Err(e) => {
            open_store(path, 1)?;
            anyhow::bail!("cannot open the state's lock file {}: {e}", lock.display())
        }
    };
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another canaryd uses the state {} (it holds {}): stop it first, or give this one \
             another state; two daemons on one state would undo each other's traffic changes",
            path.display(),
            lock.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("cannot lock the state's lock file {}: {e}", lock.display())
        }
    }
}

/// Opens the store with one error naming the path and the reason. SQLite's own message repeats
/// itself down the error chain and does not say that a missing directory is the usual cause.
fn open_store(path: &Path, decisions_kept: usize) -> anyhow::Result<Store> {
    Store::open_with_retention(path, decisions_kept).map_err(|e| {
        let why = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
                // A file where a directory of the path should be (`./token/x.db` with
                // `./token` a file) is named, rather than said not to exist.
                match dir.ancestors().find(|a| a.exists()) {
                    Some(file) if !file.as_os_str().is_empty() && !file.is_dir() => {
                        format!("{} is not a directory", file.display())
                    }
                    _ => format!("the directory {} does not exist", dir.display()),
                }
            }
            _ => std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string),
        };
        anyhow::anyhow!("cannot open the state store {}: {why}", path.display())
    })
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What `controller::run` needs, to start it again for every leadership term.
#[derive(Clone)]
struct Rollouts {
    shared: Shared,
    registry: Registry,
    policy_errors: controller::PolicyErrors,
    policies: PathBuf,
    poll: Duration,
    ready: Arc<AtomicBool>,
}

impl Rollouts {
    fn for_term(&self, revision: i64) -> Rollouts {
        let mut term = self.clone();
        term.shared.store = term.shared.store.for_term(revision);
        term
    }

    /// Runs every policy's rollout until `stop` turns true.
    fn run(&self, stop: watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
        controller::run(
            self.shared.clone(),
            self.registry.clone(),
            self.policy_errors.clone(),
            self.policies.clone(),
            self.poll,
            self.ready.clone(),
            stop,
        )
    }
}

/// Runs the rollouts during each leadership term of this replica, and stops them (each after
/// its current tick) when the term ends; the next term starts again from the stored state.
async fn lead(
    leadership: Arc<crate::ha::Leadership>,
    rollouts: Rollouts,
    mut stop: watch::Receiver<bool>,
) {
    let mut role = leadership.watch();
    loop {
        // Stand by until this replica leads.
        let term = loop {
            if *stop.borrow() {
                return;
            }
            let leading = *role.borrow_and_update() == crate::ha::Role::Leader;
            if let Some(term) = leadership.term().filter(|_| leading) {
                break term;
            }
            // A role of leader whose term already ran out by this replica's clock waits for
            // the election's next round, which renews the term or steps down.
            tokio::select! {
                r = role.changed() => if r.is_err() { return },
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)), if leading => {}
            }
        };
        tracing::info!(
            replica = leadership.replica(),
            term = term.revision,
            "running the rollouts"
        );
        rollouts.shared.metrics.set_leader(true);
        let (term_tx, term_rx) = watch::channel(false);
        // The tasks of this term write (and touch the router) for this term only: a task still
        // finishing its tick when the term ends cannot write under a later term of this replica.
        let run = rollouts.for_term(term.revision).run(term_rx);
        tokio::pin!(run);
        let not_leading = async {
            while role.changed().await.is_ok() {
                // A new term, even of this replica, ends this one: its tasks could not write.
                let other_term = leadership
                    .term()
                    .is_some_and(|t| t.revision != term.revision);
                if *role.borrow_and_update() != crate::ha::Role::Leader || other_term {
                    break;
                }
            }
        };
        tokio::select! {
            () = &mut run => continue,
            () = not_leading => {
                tracing::warn!(replica = leadership.replica(), "no longer leading: stopping the rollouts");
            }
            _ = stop.changed() => {}
        }
        // The term is over now, whatever the tasks still finish.
        rollouts.shared.metrics.set_leader(false);
        let _ = term_tx.send(true);
        run.await;
    }
}

/// Serves the API until `stop` turns true (or its sender is gone), then lets every open
/// connection finish its request and waits for them.
///
/// This is `axum::serve` plus a header read timeout, which `axum::serve` has no setting for:
/// without one, a client that never finishes its headers holds its connection, and the
/// graceful shutdown waiting for it, forever. Only HTTP/1 is spoken (as with axum's `http1`
/// feature), so the timeout runs from the moment a connection waits for a request; a server
/// that first sniffs for the HTTP/2 preface would wait for those bytes without one.
async fn serve_api(
    mut listener: tokio::net::TcpListener,
    app: axum::Router,
    header_read_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    // Every connection task holds a receiver; once all are dropped, every connection is done.
    let (open_tx, open_rx) = watch::channel(());
    loop {
        let (stream, peer) = tokio::select! {
            // axum's accept retries failed accepts (after a pause on running out of file
            // descriptors) instead of returning them.
            conn = axum::serve::Listener::accept(&mut listener) => conn,
            () = stopped(&mut stop) => break,
        };
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let mut stop = stop.clone();
        let open = open_rx.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // Timeouts, resets and malformed requests are the client's business.
                tracing::debug!(%peer, error = %e, "api connection ended with an error");
            }
            drop(open);
        });
    }
    drop(listener);
    drop(open_rx);
    open_tx.closed().await;
}

/// Completes once `stop` turns true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Completes on SIGINT or SIGTERM.
pub async fn signals() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
