//! The command line, as clap definitions. Every `run` flag also has an environment variable
//! and a key in the optional config file (flag > environment > config file > default).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "canaryd",
    version,
    about = "Metrics-driven rollouts for machine-learning models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: judge every rollout in the policies directory and drive its router.
    Run(RunArgs),
    /// Validate policy files; exits 0 only when all are valid and no two share a rollout name
    /// or a router target.
    Check(CheckArgs),
    /// Show every rollout as a table, or one rollout's timeline with its evidence.
    Status(StatusArgs),
    /// Send all traffic to the canary now (skips the remaining steps and the gate).
    Promote(ActionArgs),
    /// Roll back now: all traffic to stable; also undoes a promotion (a promoted rollout).
    Abort(ActionArgs),
    /// Stop advancing (analyses continue and can still roll back).
    Pause(ActionArgs),
    /// Continue a paused rollout.
    Resume(ActionArgs),
    /// Start a rolled-back or failed rollout again from its first step.
    Retry(ActionArgs),
    /// The whole thing, live, on this machine: Prometheus, HAProxy, model versions, load and
    /// the daemon; a good canary promoted and a bad one rolled back.
    Demo(canaryd::demo::DemoArgs),
    /// Run the judging benchmark in virtual time.
    Bench(canaryd::bench::BenchArgs),
    /// Run a stand-in model server (or a load generator) for demos and tests.
    Sim(canaryd::sim::SimArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Optional YAML config file with keys policies, prometheus, listen, state,
    /// api_token_file, dry_run, insecure_no_auth, etcd, etcd_prefix, replica, lease_ttl,
    /// etcd_ca_file, etcd_cert_file, etcd_key_file, etcd_user, etcd_password_file. Its relative
    /// paths are read from its own directory.
    #[arg(long, env = "CANARYD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of policy files [default: ./policies].
    #[arg(long, env = "CANARYD_POLICIES")]
    pub policies: Option<PathBuf>,
    /// Prometheus used by policies that name none [default: http://127.0.0.1:9090].
    #[arg(long, env = "CANARYD_PROMETHEUS")]
    pub prometheus: Option<String>,
    #[command(flatten)]
    pub access: PrometheusAccess,
    /// Shortest range a query covers; at least four scrape intervals of your Prometheus.
    #[arg(long, env = "CANARYD_QUERY_MIN_RANGE", value_parser = min_range, default_value = "60s")]
    pub query_min_range: std::time::Duration,
    /// Address of the HTTP API, an IP address or a host name with a port [default:
    /// 127.0.0.1:9850].
    #[arg(long, env = "CANARYD_LISTEN")]
    pub listen: Option<String>,
    /// State store (SQLite file) [default: ./canaryd.db].
    #[arg(long, env = "CANARYD_STATE")]
    pub state: Option<PathBuf>,
    /// File holding the bearer token that operator actions must present.
    #[arg(long, env = "CANARYD_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Decide, but never change the routers' weights; the state is kept in memory only.
    /// `--dry-run=false` (or CANARYD_DRY_RUN=false) overrides the config file.
    #[arg(long, env = "CANARYD_DRY_RUN", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub dry_run: Option<bool>,
    /// Allow listening on a non-loopback address without an API token.
    /// `--insecure-no-auth=false` (or the variable) overrides the config file.
    #[arg(long, env = "CANARYD_INSECURE_NO_AUTH", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_no_auth: Option<bool>,
    /// Run as one replica of a highly available daemon: state in this etcd (client URL, like
    /// http://127.0.0.1:2379) instead of --state; the replica that holds the leadership runs
    /// the rollouts, the others stand by and take over when it stops.
    #[arg(long, env = "CANARYD_ETCD")]
    pub etcd: Option<String>,
    /// Key prefix of this daemon's data in etcd [default: /canaryd]; replicas that share it
    /// share the leadership and the state.
    #[arg(long, env = "CANARYD_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// PEM CA certificates to trust for an https etcd (besides the system's).
    #[arg(long, env = "CANARYD_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate for an etcd that requires one (--client-cert-auth); needs
    /// --etcd-key-file.
    #[arg(long, env = "CANARYD_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    /// PEM private key of --etcd-cert-file.
    #[arg(long, env = "CANARYD_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,
    /// User to sign in as, for an etcd with authentication enabled; needs
    /// --etcd-password-file. The user needs read and write access to the --etcd-prefix keys.
    #[arg(long, env = "CANARYD_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// A file holding the password of --etcd-user (one line).
    #[arg(long, env = "CANARYD_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
    /// This replica's name, shown to the others [default: the host name and process id].
    #[arg(long, env = "CANARYD_REPLICA")]
    pub replica: Option<String>,
    /// Lease of the leadership: a crashed leader is replaced after about this long [default: 10s].
    #[arg(long, env = "CANARYD_LEASE_TTL", value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<std::time::Duration>,
}

/// How to authenticate to the default Prometheus (a policy's own Prometheus has its own
/// credentials in the policy).
#[derive(Debug, clap::Args)]
pub struct PrometheusAccess {
    /// File holding a bearer token for Prometheus.
    #[arg(long, env = "CANARYD_PROMETHEUS_TOKEN_FILE")]
    pub prometheus_token_file: Option<PathBuf>,
    /// User for HTTP basic authentication to Prometheus (password from --prometheus-password-file).
    #[arg(long, env = "CANARYD_PROMETHEUS_USER")]
    pub prometheus_user: Option<String>,
    /// File holding the basic-auth password for Prometheus.
    #[arg(long, env = "CANARYD_PROMETHEUS_PASSWORD_FILE")]
    pub prometheus_password_file: Option<PathBuf>,
    /// PEM file of extra CA certificates to trust for an https Prometheus.
    #[arg(long, env = "CANARYD_PROMETHEUS_CA_FILE")]
    pub prometheus_ca_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Policy files (or directories of them).
    #[arg(required = true)]
    pub policies: Vec<PathBuf>,
    /// Also run every query once against Prometheus and report what returns no data.
    #[arg(long)]
    pub live: bool,
    /// Check credentials files' paths without reading them (a CI machine without the
    /// secrets); the daemon will still need them.
    #[arg(long, conflicts_with = "live")]
    pub no_secrets: bool,
    /// Prometheus for --live, for policies that name none.
    #[arg(
        long,
        env = "CANARYD_PROMETHEUS",
        default_value = "http://127.0.0.1:9090"
    )]
    pub prometheus: String,
    #[command(flatten)]
    pub access: PrometheusAccess,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// A rollout's name, for its timeline.
    pub name: Option<String>,
    /// The daemon's API (http:// is assumed when no scheme is given).
    #[arg(long, env = "CANARYD_SERVER", default_value = "http://127.0.0.1:9850")]
    pub server: String,
}

#[derive(Debug, clap::Args)]
pub struct ActionArgs {
    /// The rollout's name.
    pub name: String,
    /// The daemon's API (http:// is assumed when no scheme is given).
    #[arg(long, env = "CANARYD_SERVER", default_value = "http://127.0.0.1:9850")]
    pub server: String,
    /// File holding the API token, when the daemon requires one. Without this flag (or
    /// CANARYD_API_TOKEN_FILE), the token itself is taken from the CANARYD_API_TOKEN
    /// environment variable.
    #[arg(long, env = "CANARYD_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Why, recorded with the decision.
    #[arg(long, short = 'm', default_value = "")]
    pub reason: String,
    /// Who, recorded with the decision [default: $USER, or `cli` when it is unset].
    #[arg(long)]
    pub who: Option<String>,
}

/// `--query-min-range`: a duration of at least two seconds (a rate over a shorter range
/// finds fewer than two samples at any scrape interval Prometheus allows) and at most a day.
fn min_range(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(2) || d > std::time::Duration::from_secs(86_400) {
        return Err(format!(
            "expected a duration from 2s to 1day (four scrape intervals of your Prometheus), found {s}"
        ));
    }
    Ok(d)
}
