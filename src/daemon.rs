//! `canaryd run`: wires the store, metrics, rollout tasks and the API together.
//! `serve` takes a bound listener and a shutdown future, so tests run the daemon on
//! 127.0.0.1:0 in-process.

use crate::api::{self, ApiState};
use crate::controller::{self, Registry, RouterFactory, Shared, SourceFactory};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::time::Clock;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

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
}

/// Runs the daemon until `shutdown` completes, then stops every rollout after its current
/// tick. The store commits every decision as it is taken, so there is nothing left to flush.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: DaemonConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = Store::open(&config.state)?;
    let metrics = match config.metrics {
        Some(m) => m,
        None => Metrics::new(prometheus::Registry::new())?,
    };
    let views = controller::Views::default();
    let registry = Registry::default();
    let policy_errors = controller::PolicyErrors::default();
    let ready = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
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
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let rollouts = tokio::spawn(controller::run(
        shared,
        registry.clone(),
        policy_errors.clone(),
        config.policies,
        config.poll,
        ready.clone(),
        stop_rx.clone(),
    ));
    let app = api::router(ApiState {
        views,
        registry,
        store,
        metrics,
        policy_errors,
        ready,
        token: config.token,
    });
    let mut api_stop = stop_rx;
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = api_stop.wait_for(|s| *s).await;
    });
    let server = tokio::spawn(async move { server.await });
    shutdown.await;
    tracing::info!("shutting down: finishing in-flight ticks");
    let _ = stop_tx.send(true);
    let _ = rollouts.await;
    match server.await {
        Ok(r) => r?,
        Err(e) => return Err(e.into()),
    }
    tracing::info!("stopped");
    Ok(())
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
