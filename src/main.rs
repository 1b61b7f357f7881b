//! canaryd's entry point: parse the command line, set up logging, run the command, map
//! failures to exit codes (0 ok; 1 a check failed or an action was refused; 2 usage, startup
//! or connection error).

mod cli;

use anyhow::Context;
use canaryd::client::Outcome;
use canaryd::text::out;
use clap::Parser;
use cli::{ActionArgs, Cli, Command, RunArgs};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => exit(run(args)),
        Command::Check(args) => check(&args),
        Command::Status(args) => outcome(with_runtime(async move {
            canaryd::client::status(&args.server, args.name.as_deref()).await
        })),
        Command::Promote(a) => action("promote", a),
        Command::Abort(a) => action("abort", a),
        Command::Pause(a) => action("pause", a),
        Command::Resume(a) => action("resume", a),
        Command::Retry(a) => action("retry", a),
        Command::Demo(args) => exit(canaryd::demo::run(&args)),
        Command::Bench(args) => exit(canaryd::bench::run(&args)),
        Command::Sim(args) => exit(canaryd::sim::run(&args)),
    }
}

/// Prints a command's error as a chain and maps it to exit code 2.
fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn outcome(result: anyhow::Result<Outcome>) -> ExitCode {
    match result {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Refused) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn with_runtime<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}

/// Reads a credentials file named by a flag (`what` names it in errors), as policies' own
/// credentials files are read: one line, line ends dropped.
fn read_token(what: &str, path: &Path) -> anyhow::Result<String> {
    use canaryd::policy::SecretFileError;
    match canaryd::policy::read_secret_file(path) {
        Ok(secret) => Ok(secret.expose().to_owned()),
        Err(SecretFileError::Unreadable(e)) => Err(anyhow::Error::new(e))
            .with_context(|| format!("cannot read the {what} file {}", path.display())),
        Err(SecretFileError::Malformed(found)) => anyhow::bail!(
            "the {what} file {} must hold one line, but holds {found}",
            path.display()
        ),
    }
}

fn action(name: &'static str, a: ActionArgs) -> ExitCode {
    outcome(with_runtime(async move {
        let token = match &a.api_token_file {
            Some(p) => Some(read_token("API token", p)?),
            None => std::env::var("CANARYD_API_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        };
        let who = a
            .who
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "cli".into());
        canaryd::client::act(&a.server, &a.name, name, token.as_deref(), &who, &a.reason).await
    }))
}

/// The optional config file of `canaryd run`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    policies: Option<PathBuf>,
    prometheus: Option<String>,
    listen: Option<String>,
    state: Option<PathBuf>,
    api_token_file: Option<PathBuf>,
    dry_run: Option<bool>,
    insecure_no_auth: Option<bool>,
    etcd: Option<String>,
    etcd_prefix: Option<String>,
    replica: Option<String>,
    /// Like `--lease-ttl`: `10s`.
    lease_ttl: Option<String>,
    etcd_ca_file: Option<PathBuf>,
    etcd_cert_file: Option<PathBuf>,
    etcd_key_file: Option<PathBuf>,
    etcd_user: Option<String>,
    etcd_password_file: Option<PathBuf>,
}

impl ConfigFile {
    /// Takes the file's relative paths from the file's directory, as most tools read their
    /// config files: the daemon may be started from anywhere.
    fn resolve_paths(&mut self, dir: &Path) {
        for path in [
            &mut self.policies,
            &mut self.state,
            &mut self.api_token_file,
            &mut self.etcd_ca_file,
            &mut self.etcd_cert_file,
            &mut self.etcd_key_file,
            &mut self.etcd_password_file,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
    }
}

/// Where a setting of `canaryd run` came from, to name it in errors.
enum Origin<'a> {
    /// The flag, or its environment variable: `--policies`.
    Flag(&'static str),
    /// The config file's key, and the file.
    File(&'static str, &'a Path),
    /// Neither: the default.
    Default,
}

impl std::fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Flag(flag) => {
                let env = flag
                    .trim_start_matches('-')
                    .replace('-', "_")
                    .to_uppercase();
                write!(f, "{flag} (or CANARYD_{env})")
            }
            Origin::File(key, file) => write!(f, "{key} in the config file {}", file.display()),
            Origin::Default => write!(f, "the default"),
        }
    }
}

/// A setting from its flag (or environment variable), else from the config file, with where it
/// came from.
fn setting<'a, T>(
    flag: Option<T>,
    file: Option<T>,
    flag_name: &'static str,
    key: &'static str,
    config: Option<&'a Path>,
) -> (Option<T>, Origin<'a>) {
    match (flag, file, config) {
        (Some(v), _, _) => (Some(v), Origin::Flag(flag_name)),
        (None, Some(v), Some(config)) => (Some(v), Origin::File(key, config)),
        _ => (None, Origin::Default),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    // Colours only on a terminal: a log file or journal would keep the escape codes.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let file: ConfigFile = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the config file {}", p.display()))?;
            let mut file =
                config_file(&text).map_err(|e| anyhow::anyhow!("{}:{e}", p.display()))?;
            file.resolve_paths(p.parent().unwrap_or(Path::new("")));
            file
        }
        None => ConfigFile::default(),
    };
    let config = args.config.as_deref();
    let (policies, policies_from) = setting(
        args.policies,
        file.policies,
        "--policies",
        "policies",
        config,
    );
    let policies = policies.unwrap_or_else(|| "policies".into());
    let prometheus = match (args.prometheus, file.prometheus) {
        (Some(url), _) => {
            check_prometheus_url(&url, "--prometheus (or CANARYD_PROMETHEUS)")?;
            url
        }
        (None, Some(url)) => {
            let config = args
                .config
                .as_deref()
                .map_or_else(String::new, |p| format!(" {}", p.display()));
            check_prometheus_url(&url, &format!("prometheus in the config file{config}"))?;
            url
        }
        (None, None) => "http://127.0.0.1:9090".into(),
    };
    let (listen, listen_from) = setting(args.listen, file.listen, "--listen", "listen", config);
    let listen = listen.unwrap_or_else(|| "127.0.0.1:9850".into());
    let (state, state_from) = setting(args.state, file.state, "--state", "state", config);
    let state_given = state.is_some();
    let state = state.unwrap_or_else(|| "canaryd.db".into());
    let query_min_range = args.query_min_range;
    let token = match setting(
        args.api_token_file,
        file.api_token_file,
        "--api-token-file",
        "api_token_file",
        config,
    ) {
        (Some(p), from) => Some(read_token("API token", &p).with_context(|| from.to_string())?),
        (None, _) => None,
    };
    // The flag or its variable, when given, wins over the file either way.
    let dry_run = args.dry_run.or(file.dry_run).unwrap_or(false);
    // The flag's default applies unless the flag, its variable or the file gives one.
    let (lease_ttl, lease_from) = match (args.lease_ttl, file.lease_ttl, config) {
        (Some(t), _, _) => (t, Origin::Flag("--lease-ttl")),
        (None, Some(text), Some(config)) => (
            humantime::parse_duration(&text).map_err(|e| {
                anyhow::anyhow!(
                    "lease_ttl in the config file {}: expected a duration like 10s, found {} ({e})",
                    config.display(),
                    canaryd::text::quoted(&text)
                )
            })?,
            Origin::File("lease_ttl", config),
        ),
        _ => (Duration::from_secs(10), Origin::Default),
    };
    let (etcd, etcd_from) = setting(args.etcd, file.etcd, "--etcd", "etcd", config);
    let ha_settings = HaSettings {
        prefix: setting(
            args.etcd_prefix,
            file.etcd_prefix,
            "--etcd-prefix",
            "etcd_prefix",
            config,
        ),
        replica: setting(args.replica, file.replica, "--replica", "replica", config),
        lease_ttl: (lease_ttl, lease_from),
        ca_file: setting(
            args.etcd_ca_file,
            file.etcd_ca_file,
            "--etcd-ca-file",
            "etcd_ca_file",
            config,
        ),
        cert_file: setting(
            args.etcd_cert_file,
            file.etcd_cert_file,
            "--etcd-cert-file",
            "etcd_cert_file",
            config,
        ),
        key_file: setting(
            args.etcd_key_file,
            file.etcd_key_file,
            "--etcd-key-file",
            "etcd_key_file",
            config,
        ),
        user: setting(
            args.etcd_user,
            file.etcd_user,
            "--etcd-user",
            "etcd_user",
            config,
        ),
        password_file: setting(
            args.etcd_password_file,
            file.etcd_password_file,
            "--etcd-password-file",
            "etcd_password_file",
            config,
        ),
        config,
    };
    let ha = ha_config(etcd.map(|url| (url, etcd_from)), ha_settings)?;
    if let Some((_, etcd_from)) = &ha
        && state_given
    {
        anyhow::bail!(
            "{state_from} and {etcd_from} exclude each other: a highly available daemon keeps \
             its state in etcd"
        );
    }
    let ha = ha.map(|(ha, _)| ha);
    let options = client_options(&args.access)?;
    let insecure = args
        .insecure_no_auth
        .or(file.insecure_no_auth)
        .unwrap_or(false);
    if !policies.is_dir() {
        let why = if policies.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        match policies_from {
            Origin::Default => anyhow::bail!(
                "the policies directory {} {why} (give --policies DIR)",
                policies.display()
            ),
            from => anyhow::bail!(
                "{from}: the policies directory {} {why}",
                policies.display()
            ),
        }
    }
    let addrs = listen_addresses(&listen).with_context(|| listen_from.to_string())?;
    canaryd::daemon::check_listen(&listen, &addrs, token.is_some(), insecure).map_err(|e| {
        match listen_from {
            Origin::Default => e,
            from => e.context(from.to_string()),
        }
    })?;
    with_runtime(async move {
        // The first address of a name that can be bound, as a client connecting to the name
        // tries them in turn.
        let listener = tokio::net::TcpListener::bind(addrs.as_slice())
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        // The address really listened on (`--listen 127.0.0.1:0` picks a port).
        let addr = listener.local_addr().unwrap_or(addrs[0]);
        let metrics = canaryd::metrics::Metrics::new(prometheus_registry())?;
        let config = canaryd::daemon::DaemonConfig {
            policies: policies.clone(),
            state: state.clone(),
            token,
            dry_run,
            poll: Duration::from_secs(2),
            clock: Arc::new(canaryd::time::SystemClock),
            routers: Arc::new(canaryd::router::from_policy),
            sources: canaryd::source::factory(
                &prometheus,
                options,
                query_min_range,
                Some(Arc::new(metrics.clone())),
            )?,
            metrics: Some(metrics),
            ha: ha.clone(),
        };
        // Everything that can fail at startup has been checked before the daemon says it runs.
        let daemon = canaryd::daemon::Daemon::open(config, canaryd::daemon::Limits::default())
            .map_err(|e| match (&ha, &state_from) {
                (None, Origin::Flag(_) | Origin::File(..)) => e.context(state_from.to_string()),
                _ => e,
            })?;
        match &ha {
            None => {
                if dry_run {
                    tracing::info!(%addr, policies = %policies.display(), %prometheus, "canaryd running a dry run: the routers are never changed, and the state is kept in memory only (--state is not used)")
                } else {
                    tracing::info!(%addr, policies = %policies.display(), state = %state.display(), %prometheus, "canaryd running")
                }
            }
            Some(ha) => {
                tracing::info!(%addr, policies = %policies.display(), etcd = %ha.etcd, prefix = %ha.election.prefix, replica = %ha.election.replica, %prometheus, dry_run, "canaryd running as a replica; it runs the rollouts while it leads")
            }
        }
        daemon.serve(listener, canaryd::daemon::signals()).await
    })
}

/// The addresses `--listen` names: an IP address with a port, or a host name with a port
/// (`localhost:9850`) resolved once, at start.
fn listen_addresses(listen: &str) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs;
    let expected = "is not an address like 127.0.0.1:9850 or a host name with a port like \
                    localhost:9850";
    let quoted = canaryd::text::quoted(listen);
    let addrs: Vec<_> = listen
        .to_socket_addrs()
        .with_context(|| format!("{quoted} {expected}"))?
        .collect();
    anyhow::ensure!(
        !addrs.is_empty(),
        "{quoted} {expected}: the name resolves to no address"
    );
    Ok(addrs)
}

/// The config file's settings, or `line:column: message` for people (the file name goes in
/// front), as policy errors are shown.
/// The config file's keys, as `ConfigFile` names them.
const CONFIG_KEYS: [&str; 16] = [
    "policies",
    "prometheus",
    "listen",
    "state",
    "api_token_file",
    "dry_run",
    "insecure_no_auth",
    "etcd",
    "etcd_prefix",
    "replica",
    "lease_ttl",
    "etcd_ca_file",
    "etcd_cert_file",
    "etcd_key_file",
    "etcd_user",
    "etcd_password_file",
];

fn config_file(text: &str) -> Result<ConfigFile, String> {
    use canaryd::policy::tree::{self, Value};
    // The keys first, from the parsed document: serde names neither the field a wrong value
    // belongs to nor the key a misspelt one was meant to be.
    let keys: Vec<tree::Key> = match tree::parse(text) {
        Ok(tree::Node {
            value: Value::Map(entries),
            ..
        }) => entries.into_iter().map(|(k, _)| k).collect(),
        _ => Vec::new(),
    };
    for k in &keys {
        if !CONFIG_KEYS.contains(&k.name.as_str()) {
            let hint = canaryd::policy::raw::closest(&k.name, &CONFIG_KEYS)
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            return Err(format!(
                "{}:{}: unknown field `{}`{hint}, expected one of: {}",
                k.pos.line,
                k.pos.column,
                k.name,
                CONFIG_KEYS.join(", ")
            ));
        }
    }
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.duplicate_keys = serde_saphyr::options::DuplicateKeyPolicy::Error;
    options.with_snippet = false;
    serde_saphyr::from_str_with_options::<ConfigFile>(text, options).map_err(|e| {
        let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
        let message = e.to_string();
        let message = message.lines().next().unwrap_or_default();
        // The position is in front already.
        let message = message.trim_start_matches("error: ");
        let message = match message.split_once(": ") {
            Some((head, rest)) if head.starts_with("line ") && head.contains(" column ") => rest,
            _ => message,
        };
        let message = match message.rfind(" at line ") {
            Some(i) if message[i..].contains(", column ") => &message[..i],
            _ => message,
        };
        let message = message.replace(
            "invalid boolean (strict mode expects true/false)",
            "expected true or false",
        );
        // The field whose value it is: the last key at or before the error.
        let field = keys
            .iter()
            .rfind(|k| (k.pos.line, k.pos.column) <= (line, column))
            .map(|k| format!("{}: ", k.name))
            .unwrap_or_default();
        format!("{line}:{column}: {field}{message}")
    })
}

/// The settings only a highly available daemon reads, each with where it was given.
struct HaSettings<'a> {
    prefix: (Option<String>, Origin<'a>),
    replica: (Option<String>, Origin<'a>),
    lease_ttl: (Duration, Origin<'a>),
    ca_file: (Option<PathBuf>, Origin<'a>),
    cert_file: (Option<PathBuf>, Origin<'a>),
    key_file: (Option<PathBuf>, Origin<'a>),
    user: (Option<String>, Origin<'a>),
    password_file: (Option<PathBuf>, Origin<'a>),
    /// The config file, if one is read: a setting that is missing is named as its flag and
    /// its key there.
    config: Option<&'a Path>,
}

impl HaSettings<'_> {
    /// How to give a setting that is missing.
    fn to_give(&self, flag: &str, key: &str) -> String {
        match self.config {
            Some(_) => format!("{flag} (or {key} in the config file)"),
            None => flag.to_owned(),
        }
    }
}

/// The highly available daemon's settings, when an etcd is given, with where the etcd was
/// given. Every mistake names where the setting came from: a flag, its variable, or the
/// config file's key.
fn ha_config<'a>(
    etcd: Option<(String, Origin<'a>)>,
    s: HaSettings<'a>,
) -> anyhow::Result<Option<(canaryd::daemon::HaConfig, Origin<'a>)>> {
    let Some((etcd, etcd_from)) = etcd else {
        let given: Vec<String> = [
            &s.prefix.1,
            &s.replica.1,
            &s.lease_ttl.1,
            &s.ca_file.1,
            &s.cert_file.1,
            &s.key_file.1,
            &s.user.1,
            &s.password_file.1,
        ]
        .into_iter()
        .filter(|from| !matches!(from, Origin::Default))
        .map(ToString::to_string)
        .collect();
        anyhow::ensure!(
            given.is_empty(),
            "{}: for a highly available daemon only: give {} too",
            given.join(", "),
            s.to_give("--etcd", "etcd")
        );
        return Ok(None);
    };
    // Each file is opened once here, so that an error names where it was given (the etcd
    // client reads them).
    let readable = |(path, from): &(Option<PathBuf>, Origin)| -> anyhow::Result<Option<PathBuf>> {
        if let Some(p) = path {
            std::fs::File::open(p)
                .with_context(|| format!("{from}: cannot read {}", p.display()))?;
        }
        Ok(path.clone())
    };
    let tls = canaryd::etcd::EtcdTls {
        ca_file: readable(&s.ca_file)?,
        cert_file: readable(&s.cert_file)?,
        key_file: readable(&s.key_file)?,
    };
    let pair = |(a, a_from): (bool, &Origin),
                (b, b_from): (bool, &Origin),
                (flag, key),
                (other_flag, other_key)| {
        match (a, b) {
            (true, false) => Err(anyhow::anyhow!(
                "{a_from} needs {}: the two go together",
                s.to_give(other_flag, other_key)
            )),
            (false, true) => Err(anyhow::anyhow!(
                "{b_from} needs {}: the two go together",
                s.to_give(flag, key)
            )),
            _ => Ok(()),
        }
    };
    pair(
        (s.cert_file.0.is_some(), &s.cert_file.1),
        (s.key_file.0.is_some(), &s.key_file.1),
        ("--etcd-cert-file", "etcd_cert_file"),
        ("--etcd-key-file", "etcd_key_file"),
    )?;
    pair(
        (s.user.0.is_some(), &s.user.1),
        (s.password_file.0.is_some(), &s.password_file.1),
        ("--etcd-user", "etcd_user"),
        ("--etcd-password-file", "etcd_password_file"),
    )?;
    let auth = match (&s.user, &s.password_file) {
        ((Some(user), user_from), (Some(path), path_from)) => {
            anyhow::ensure!(
                !user.trim().is_empty(),
                "{user_from}: expected a user name, found an empty one"
            );
            Some(canaryd::etcd::EtcdAuth {
                user: user.clone(),
                password: read_token("etcd password", path)
                    .with_context(|| path_from.to_string())?,
            })
        }
        _ => None,
    };
    http_url(
        &etcd,
        &format!("{etcd_from}: expected etcd's client URL like http://127.0.0.1:2379"),
    )?;
    let (prefix, prefix_from) = s.prefix;
    let prefix = prefix.unwrap_or_else(|| "/canaryd".into());
    anyhow::ensure!(
        prefix.starts_with('/') && prefix.len() > 1 && prefix.bytes().all(|b| b.is_ascii_graphic()),
        "{prefix_from}: expected a key prefix like /canaryd (a slash, then printable ASCII), \
         found {}",
        canaryd::text::quoted(&prefix)
    );
    let (replica, replica_from) = s.replica;
    let replica = match replica {
        Some(r) => r,
        None => {
            let host = std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "canaryd".into());
            format!("{host}-{}", std::process::id())
        }
    };
    anyhow::ensure!(
        !replica.trim().is_empty(),
        "{replica_from}: expected a name, found an empty one"
    );
    let (ttl, ttl_from) = s.lease_ttl;
    anyhow::ensure!(
        ttl >= Duration::from_secs(2),
        "{ttl_from}: expected at least 2s, found {}",
        humantime::format_duration(ttl)
    );
    Ok(Some((
        canaryd::daemon::HaConfig {
            etcd,
            tls,
            auth,
            election: canaryd::ha::ElectionConfig {
                prefix: prefix.trim_end_matches('/').to_owned(),
                replica,
                ttl,
            },
        },
        etcd_from,
    )))
}

/// Refuses a default Prometheus URL that no query could use, at startup and naming where it
/// was given (`from`), rather than failing every query later with "relative URL without a
/// base". The rules are a policy's `prometheus.url`'s.
fn check_prometheus_url(url: &str, from: &str) -> anyhow::Result<()> {
    let parsed = http_url(
        url,
        &format!("{from}: expected an http:// or https:// URL like http://127.0.0.1:9090"),
    )?;
    // The user name and password would be sent, and shown in the log; the URL is not echoed.
    anyhow::ensure!(
        parsed.username().is_empty() && parsed.password().is_none(),
        "{from}: expected a URL without a user name or password \
         (give --prometheus-user with --prometheus-password-file, or --prometheus-token-file)"
    );
    Ok(())
}

/// `url` parsed, when it is an http(s) URL with a host; otherwise the error `expected, found
/// ...`. A URL with a user name or password in it is not echoed.
fn http_url(url: &str, expected: &str) -> anyhow::Result<reqwest::Url> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| anyhow::anyhow!("{expected}, found {} ({e})", canaryd::text::quoted(url)))?;
    let shown = if parsed.username().is_empty() && parsed.password().is_none() {
        canaryd::text::quoted(url)
    } else {
        "a URL with a user name or password".to_owned()
    };
    anyhow::ensure!(
        matches!(parsed.scheme(), "http" | "https")
            && parsed.host_str().is_some_and(|h| !h.is_empty()),
        "{expected}, found {shown}"
    );
    Ok(parsed)
}

/// The Prometheus client's options from the command line's credentials flags.
fn client_options(
    access: &cli::PrometheusAccess,
) -> anyhow::Result<canaryd::source::ClientOptions> {
    let auth = match (&access.prometheus_token_file, &access.prometheus_user) {
        (Some(_), Some(_)) => {
            anyhow::bail!("give either --prometheus-token-file or --prometheus-user, not both")
        }
        (Some(t), None) => Some(canaryd::source::Auth::Bearer(read_token(
            "Prometheus token",
            t,
        )?)),
        (None, Some(user)) => Some(canaryd::source::Auth::Basic {
            user: user.clone(),
            password: access
                .prometheus_password_file
                .as_deref()
                .map(|p| read_token("Prometheus password", p))
                .transpose()?,
        }),
        (None, None) if access.prometheus_password_file.is_some() => {
            anyhow::bail!(
                "--prometheus-password-file needs --prometheus-user (the password's user)"
            )
        }
        (None, None) => None,
    };
    Ok(canaryd::source::ClientOptions {
        auth,
        ca_file: access.prometheus_ca_file.clone(),
        ..Default::default()
    })
}

/// Runs every query of every valid policy once, now, over the last five minutes, and prints
/// what each returned. Returns whether every query answered: no data is reported but is not an
/// error (a canary may have no traffic yet).
async fn live(
    prometheus: &str,
    options: canaryd::source::ClientOptions,
    policies: &[(PathBuf, canaryd::policy::Policy)],
) -> anyhow::Result<bool> {
    use canaryd::source::{PrometheusClient, PrometheusSource, Window};
    use canaryd::time::Clock;
    let source = PrometheusSource::new(PrometheusClient::new(prometheus, options)?);
    let now = canaryd::time::SystemClock.now();
    let mut answered = true;
    for (file, policy) in policies {
        let report = source
            .check_live(policy, Window::lookback(now, Duration::from_secs(300)))
            .await;
        out(&format!("{}: live check\n{report}", file.display()))?;
        if report.has_errors() {
            out(&format!(
                "{}: live check failed: Prometheus could not answer a query (see the errors above)\n",
                file.display()
            ))?;
            answered = false;
        }
    }
    Ok(answered)
}

/// `out`, and a failure to write said on stderr and counted as a failed check.
fn say(text: &str, ok: &mut bool) {
    if let Err(e) = out(text) {
        eprintln!("error: cannot write the output: {e}");
        *ok = false;
    }
}

fn prometheus_registry() -> prometheus::Registry {
    prometheus::Registry::new()
}

/// Policy files named on the command line; directories stand for their YAML files.
fn policy_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            out.extend(canaryd::controller::policy_files(p));
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// Why the daemon would not run `policy` (from `file`) beside the valid policies before it:
/// its rollout name, or its router target, is taken.
fn clash(
    file: &Path,
    policy: &canaryd::policy::Policy,
    valid: &[(PathBuf, canaryd::policy::Policy)],
) -> Option<canaryd::policy::PolicyError> {
    if let Some((first, _)) = valid.iter().find(|(_, q)| q.name == policy.name) {
        return Some(canaryd::policy::name_clash(
            file,
            &policy.name,
            &first.display().to_string(),
        ));
    }
    let target = policy.router.target()?;
    let (first, other) = valid
        .iter()
        .find(|(_, q)| q.router.target().as_ref() == Some(&target))?;
    Some(canaryd::policy::router_clash(
        file,
        &target,
        &other.name,
        &first.display().to_string(),
    ))
}

fn check(args: &cli::CheckArgs) -> ExitCode {
    let mut ok = true;
    // A directory without policies is almost always a wrong path; passing it silently would
    // let CI go green without checking anything.
    for dir in args.policies.iter().filter(|p| p.is_dir()) {
        if canaryd::controller::policy_files(dir).is_empty() {
            eprintln!(
                "{}: no policy files (*.yaml, *.yml) in this directory",
                dir.display()
            );
            ok = false;
        }
    }
    let mut valid = Vec::new();
    let load = if args.no_secrets {
        canaryd::policy::load_file_without_secrets
    } else {
        canaryd::policy::load_file
    };
    for file in policy_files(&args.policies) {
        match load(&file) {
            // The daemon runs one rollout per name and one per router target: a second file
            // with a name or a target already taken would never run.
            Ok(p) => match clash(&file, &p, &valid) {
                Some(e) => {
                    ok = false;
                    say(&format!("{e}\n"), &mut ok);
                }
                None => {
                    say(&format!("{}: ok\n", file.display()), &mut ok);
                    valid.push((file, p));
                }
            },
            Err(e) => {
                ok = false;
                say(&format!("{e}\n"), &mut ok);
            }
        }
    }
    if args.live && !valid.is_empty() {
        let run = check_prometheus_url(&args.prometheus, "--prometheus (or CANARYD_PROMETHEUS)")
            .and_then(|()| client_options(&args.access))
            .and_then(|options| with_runtime(live(&args.prometheus, options, &valid)));
        match run {
            Ok(true) => {}
            Ok(false) => ok = false,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key `CONFIG_KEYS` lets through is one the config file really has: a key missing
    /// from the list would be refused as unknown.
    #[test]
    fn every_config_key_is_read() {
        let text: String = CONFIG_KEYS
            .iter()
            .map(|k| {
                let v = match *k {
                    "dry_run" | "insecure_no_auth" => "false",
                    "lease_ttl" => "10s",
                    _ => "x",
                };
                format!("{k}: {v}\n")
            })
            .collect();
        if let Err(e) = config_file(&text) {
            panic!("{e}\n{text}");
        }
    }
}
