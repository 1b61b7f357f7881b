//! HAProxy through its runtime API (the `stats socket ... level admin` of its configuration),
//! over a unix socket or TCP.
//!
//! Each version maps to one server of one backend. The split is set with
//! `set weight <backend>/<server> <w>` and read back with `get weight <backend>/<server>`.
//! HAProxy weights are integers from 0 to 256, so a percentage becomes a pair of integers that
//! sums to 100, 200 or 256, whichever represents it best: whole percents are exact, anything
//! finer is within 1/512 of the target. Servers of versions that are neither stable nor canary
//! get weight 0. `read` reports the canary's weight over the sum of every configured server's
//! weight, so weight left on an old version shows up as a difference from the target; a
//! backend where every one of them has weight 0 sends nobody anything and reads as an error.
//! When the backend holds exactly the integers `apply` writes for the target, `read` returns
//! the target's percentage, so a split that integers can only approximate still reads back as
//! applied.
//!
//! Servers of the backend that no version names are not canaryd's to set, but they take their
//! share of the traffic: a canary at 60 % of the configured servers' weights gets 50 % once an
//! unnamed server has weight 20 beside them. `read` therefore lists the backend's servers
//! (`show stat <backend> 4 -1`) and fails, as a misconfigured router, while an unnamed server
//! could take traffic: an active (not `backup`) server, not in maintenance, with a weight above
//! 0. The error says what share it takes and what the canary really gets. Failing rather than
//! reporting the real share is deliberate: canaryd cannot move that share, so a read of 50 %
//! would only be re-applied forever, and a step's time must not count while the canary does
//! not get its step's weight. The rollout holds (and, past `router_deadline`, fails) with the
//! reason in its status until the server is named, set to weight 0 or put in maintenance.
//!
//! Runtime weights live in HAProxy's memory only: a reload or restart puts every server back
//! to the weight in the configuration file, unless the configuration loads a
//! `server-state-file` saved before the reload. canaryd copes either way, because every tick
//! reads the real weights and re-applies the split when they differ (level-triggered), so a
//! reload costs at most one interval at the configured weights.
//!
//! The runtime API answers each command on its own connection and closes it, so every command
//! is one connection, bounded by a timeout covering connect, write and read.

use super::{BoxFuture, Router, RouterError, Target, canary_share, check_target, integer_split};
use crate::text::quoted;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Totals the two weights may sum to; see the module comment.
const TOTALS: [u32; 3] = [100, 200, 256];
/// How long one runtime API command may take, connect to last byte.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// An answer longer than this is not one HAProxy gives to these commands: `show stat` of one
/// backend takes about 700 bytes per server, so this allows well over a thousand servers.
const MAX_ANSWER: u64 = 1024 * 1024;

/// Where the runtime API listens.
#[derive(Clone, Debug, PartialEq)]
pub enum Endpoint {
    Unix(String),
    /// `host:port`, resolved at every connect so a changed DNS entry is picked up.
    Tcp(String),
}

impl Endpoint {
    /// `tcp://host:port` and `host:port` (also `[v6]:port`) are TCP; `unix://path`, and anything
    /// else, is the path of a unix socket. A relative socket file named like `x:1` needs
    /// `unix://` or `./`.
    pub fn parse(s: &str) -> Result<Endpoint, RouterError> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            return match split_port(rest) {
                Some(_) => Ok(Endpoint::Tcp(rest.to_string())),
                None => Err(RouterError::Config(format!(
                    "haproxy socket {s:?}: expected tcp://host:port"
                ))),
            };
        }
        if let Some(rest) = s.strip_prefix("unix://") {
            return Ok(Endpoint::Unix(rest.to_string()));
        }
        if s.is_empty() {
            return Err(RouterError::Config("haproxy socket is empty".into()));
        }
        if !s.starts_with('/') && !s.starts_with('.') && split_port(s).is_some() {
            return Ok(Endpoint::Tcp(s.to_string()));
        }
        Ok(Endpoint::Unix(s.to_string()))
    }
}

fn split_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty() && !host.contains('/')).then_some((host, port))
}

/// Whether a backend or server name cannot be used in a runtime API command: spaces, `/` or
/// `;` would change the command's meaning.
pub fn unusable_name(n: &str) -> bool {
    n.is_empty() || n.contains(|c: char| c.is_whitespace() || c == '/' || c == ';')
}

/// Sets and reads server weights of one HAProxy backend.
#[derive(Debug)]
pub struct HaproxyRouter {
    /// Where the runtime API listens.
    endpoint: Endpoint,
    /// The backend holding one server per version.
    backend: String,
    /// Version label to server name.
    servers: BTreeMap<String, String>,
    /// Bound on each runtime API command.
    timeout: Duration,
}

impl HaproxyRouter {
    pub fn new(
        socket: &str,
        backend: &str,
        servers: BTreeMap<String, String>,
    ) -> Result<HaproxyRouter, RouterError> {
        let bad = unusable_name;
        if bad(backend) {
            return Err(RouterError::Config(format!(
                "haproxy backend name {backend:?} is not usable"
            )));
        }
        if let Some((v, s)) = servers.iter().find(|(_, s)| bad(s)) {
            return Err(RouterError::Config(format!(
                "haproxy server name {s:?} of version {v:?} is not usable"
            )));
        }
        // One server cannot carry two versions' weights, and a read could not tell them apart.
        let mut seen = BTreeMap::new();
        for (v, s) in &servers {
            if let Some(other) = seen.insert(s, v) {
                return Err(RouterError::Config(format!(
                    "versions {other:?} and {v:?} both use haproxy server {s:?}; each version needs its own"
                )));
            }
        }
        Ok(HaproxyRouter {
            endpoint: Endpoint::parse(socket)?,
            backend: backend.to_string(),
            servers,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Changes the bound on each runtime API command (5 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> HaproxyRouter {
        self.timeout = timeout;
        self
    }

    fn server(&self, version: &str) -> Result<&str, RouterError> {
        self.servers
            .get(version)
            .map(String::as_str)
            .ok_or_else(|| {
                RouterError::Config(format!(
                    "no haproxy server is configured for version {version:?} (servers: {:?})",
                    self.servers
                ))
            })
    }

    /// Sends one command and returns HAProxy's answer.
    async fn command(&self, cmd: &str) -> Result<String, RouterError> {
        let work = async {
            match &self.endpoint {
                Endpoint::Unix(path) => {
                    let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                        RouterError::Unreachable(format!("haproxy socket {path}: {e}"))
                    })?;
                    exchange(stream, cmd, path).await
                }
                Endpoint::Tcp(addr) => {
                    let stream = tokio::net::TcpStream::connect(addr.as_str())
                        .await
                        .map_err(|e| {
                            RouterError::Unreachable(format!("haproxy socket {addr}: {e}"))
                        })?;
                    exchange(stream, cmd, addr).await
                }
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                let (Endpoint::Unix(at) | Endpoint::Tcp(at)) = &self.endpoint;
                Err(RouterError::Unreachable(format!(
                    "haproxy socket {at}: no answer to {cmd:?} within {}",
                    humantime::format_duration(self.timeout)
                )))
            })
    }

    async fn set_weight(&self, server: &str, weight: u32) -> Result<(), RouterError> {
        let cmd = format!("set weight {}/{server} {weight}", self.backend);
        let answer = self.command(&cmd).await?;
        parse_set_answer(&cmd, &answer)
    }

    async fn get_weight(&self, server: &str) -> Result<u32, RouterError> {
        let cmd = format!("get weight {}/{server}", self.backend);
        let answer = self.command(&cmd).await?;
        parse_get_answer(&cmd, &answer)
    }

    /// The backend's servers as `show stat` lists them.
    async fn stat(&self) -> Result<Vec<StatServer>, RouterError> {
        // Type 4: servers only, not the backend's own line.
        let cmd = format!("show stat {} 4 -1", self.backend);
        let answer = self.command(&cmd).await?;
        parse_stat_answer(&cmd, &answer, &self.backend)
    }

    /// The servers in `stat` that no version names and that could take traffic now: active
    /// (not `backup`), not in maintenance, with a weight above 0; with their weights.
    fn unmanaged_servers(&self, stat: &[StatServer]) -> Vec<(String, u32)> {
        stat.iter()
            .filter(|s| !s.backup && !s.maintenance && s.weight > 0)
            .filter(|s| !self.servers.values().any(|m| *m == s.name))
            .map(|s| (s.name.clone(), s.weight))
            .collect()
    }
}

/// One server of a backend as `show stat` lists it.
#[derive(Debug, PartialEq)]
struct StatServer {
    name: String,
    weight: u32,
    /// A `backup` server, which gets traffic only when no active server is up.
    backup: bool,
    /// In maintenance (`MAINT`, `MAINT (via …)`, `MAINT (resolution)`): gets no traffic.
    maintenance: bool,
    /// Takes new requests now: not in maintenance, not draining (`DRAIN`, `NOLB`), not down
    /// by its health check (`DOWN`, `DOWN 1/2`). `UP`, `UP 1/3` and `no check` serve.
    serving: bool,
}

/// `show stat` answers CSV: a header line `# pxname,svname,...` naming the columns (their
/// number and order change between HAProxy versions), then one line per proxy or server.
/// Lines of other proxies, and the backend's own line, are skipped.
fn parse_stat_answer(
    cmd: &str,
    answer: &str,
    backend: &str,
) -> Result<Vec<StatServer>, RouterError> {
    let text = answer.trim();
    let Some(header) = text.lines().next().and_then(|l| l.strip_prefix("# ")) else {
        return Err(if is_error_text(text) {
            RouterError::Rejected(format!("haproxy answered {cmd:?} with {}", quoted(text)))
        } else {
            RouterError::BadResponse(format!(
                "haproxy answered {cmd:?} with {}, expected CSV with a `# pxname,svname,...` \
                 header",
                quoted(text)
            ))
        });
    };
    let columns: Vec<&str> = header.split(',').collect();
    let column = |name: &str| {
        columns.iter().position(|c| *c == name).ok_or_else(|| {
            RouterError::BadResponse(format!("haproxy answered {cmd:?} without a {name} column"))
        })
    };
    let (px, sv, status, weight, bck) = (
        column("pxname")?,
        column("svname")?,
        column("status")?,
        column("weight")?,
        column("bck")?,
    );
    let mut servers = Vec::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').collect();
        let field = |i: usize| fields.get(i).copied().unwrap_or("");
        if field(px) != backend || matches!(field(sv), "BACKEND" | "FRONTEND") {
            continue;
        }
        let weight = field(weight).parse::<u32>().map_err(|_| {
            RouterError::BadResponse(format!(
                "haproxy answered {cmd:?} with {}, whose weight is not a number",
                quoted(line)
            ))
        })?;
        let status = field(status);
        let maintenance = status.starts_with("MAINT");
        servers.push(StatServer {
            name: field(sv).to_owned(),
            weight,
            backup: field(bck) == "1",
            maintenance,
            serving: !maintenance
                && !["DRAIN", "NOLB", "DOWN"]
                    .iter()
                    .any(|s| status.starts_with(s)),
        });
    }
    Ok(servers)
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    cmd: &str,
    at: &str,
) -> Result<String, RouterError> {
    let io = |e: std::io::Error| RouterError::Unreachable(format!("haproxy socket {at}: {e}"));
    stream
        .write_all(format!("{cmd}\n").as_bytes())
        .await
        .map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut buf = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(io)?;
    if buf.len() as u64 > MAX_ANSWER {
        return Err(RouterError::BadResponse(format!(
            "haproxy answered {cmd:?} with more than {MAX_ANSWER} bytes"
        )));
    }
    String::from_utf8(buf).map_err(|_| {
        RouterError::BadResponse(format!(
            "haproxy answered {cmd:?} with bytes that are not UTF-8"
        ))
    })
}

/// `set weight` answers nothing (an empty line) on success and one line of text otherwise:
/// "No such backend.", "No such server.", "Permission denied", a static-algorithm refusal.
/// Every such text is a refusal; nothing else counts as success.
fn parse_set_answer(cmd: &str, answer: &str) -> Result<(), RouterError> {
    let text = answer.trim();
    if text.is_empty() {
        Ok(())
    } else {
        Err(RouterError::Rejected(format!(
            "haproxy answered {cmd:?} with {}",
            quoted(text)
        )))
    }
}

/// `get weight` answers `<current> (initial <configured>)`.
fn parse_get_answer(cmd: &str, answer: &str) -> Result<u32, RouterError> {
    let text = answer.trim();
    let parsed = text.split_once(" (initial ").and_then(|(cur, rest)| {
        let initial = rest.strip_suffix(')')?;
        initial.parse::<u32>().ok()?;
        cur.parse::<u32>().ok()
    });
    match parsed {
        Some(w) if w <= 256 => Ok(w),
        Some(_) => Err(RouterError::BadResponse(format!(
            "haproxy answered {cmd:?} with {}, a weight above 256",
            quoted(text)
        ))),
        // An answer that is one line of words is HAProxy refusing the command ("No such
        // server.", "Permission denied"); anything else is not an answer we know.
        None if is_error_text(text) => Err(RouterError::Rejected(format!(
            "haproxy answered {cmd:?} with {}",
            quoted(text)
        ))),
        None => Err(RouterError::BadResponse(format!(
            "haproxy answered {cmd:?} with {}, expected \"<weight> (initial <weight>)\"",
            quoted(text)
        ))),
    }
}

fn is_error_text(text: &str) -> bool {
    !text.is_empty()
        && !text.contains('\n')
        && text.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && !text.chars().any(|c| c.is_ascii_digit())
}

impl HaproxyRouter {
    /// Why a backend with servers no version names cannot be read as the rollout's split: what
    /// they take, what the canary really gets, and how to fix it.
    fn unmanaged_error(
        &self,
        unmanaged: &[(String, u32)],
        managed: &BTreeMap<&str, u32>,
        canary_server: &str,
    ) -> RouterError {
        let canary = f64::from(managed.get(canary_server).copied().unwrap_or(0));
        let managed_total: f64 = managed.values().map(|w| f64::from(*w)).sum();
        let unmanaged_total: f64 = unmanaged.iter().map(|(_, w)| f64::from(*w)).sum();
        let total = managed_total + unmanaged_total;
        let pct = |w: f64| crate::rollout::fmt_pct((w * 100.0 / total).round());
        let listed: Vec<String> = unmanaged
            .iter()
            .map(|(name, w)| format!("{name} (weight {w})"))
            .collect();
        let (first, _) = &unmanaged[0];
        let managed_share = if managed_total > 0.0 {
            crate::rollout::fmt_pct((canary * 100.0 / managed_total).round())
        } else {
            "0".to_owned()
        };
        RouterError::Config(format!(
            "haproxy backend {} has servers that no version in router.haproxy.servers names, \
             with weights above 0: {}. They take {}% of the traffic, so the canary gets {}%, not \
             the {managed_share}% it has among the named servers. Name each in \
             router.haproxy.servers \
             (canaryd then sets it to 0 while it is neither stable nor canary), or take it out \
             of the backend (`set weight {}/{first} 0`, or `set server {}/{first} state maint`)",
            self.backend,
            listed.join(", "),
            pct(unmanaged_total),
            pct(canary),
            self.backend,
            self.backend,
        ))
    }
}

impl Router for HaproxyRouter {
    fn kind(&self) -> &'static str {
        "haproxy"
    }

    fn apply<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<(), RouterError>> {
        Box::pin(async move {
            check_target(target)?;
            let (stable_w, canary_w) = integer_split(target.canary_weight, &TOTALS);
            let mut plan = vec![
                (self.server(&target.stable)?, stable_w),
                (self.server(&target.canary)?, canary_w),
            ];
            for (version, server) in &self.servers {
                if version != &target.stable && version != &target.canary {
                    plan.push((server, 0));
                }
            }
            // Raise before lowering: moving all traffic from one server to the other must never
            // pass through a moment where both have weight 0 and HAProxy answers 503.
            plan.sort_by_key(|&(_, w)| std::cmp::Reverse(w));
            for (server, weight) in plan {
                self.set_weight(server, weight).await?;
            }
            Ok(())
        })
    }

    fn read<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<f64, RouterError>> {
        Box::pin(async move {
            let canary_server = self.server(&target.canary)?;
            let stable_server = self.server(&target.stable)?;
            let mut weights = BTreeMap::new();
            for server in self.servers.values() {
                weights.insert(server.as_str(), self.get_weight(server).await?);
            }
            let stat = self.stat().await?;
            let unmanaged = self.unmanaged_servers(&stat);
            if !unmanaged.is_empty() {
                return Err(self.unmanaged_error(&unmanaged, &weights, canary_server));
            }
            // A server put in maintenance or drain, or down by its health check, takes no
            // new requests whatever its weight: stable in maintenance sends all to the canary.
            let resting: Vec<&str> = stat
                .iter()
                .filter(|s| !s.serving && weights.contains_key(s.name.as_str()))
                .map(|s| s.name.as_str())
                .collect();
            for server in &resting {
                weights.insert(server, 0);
            }
            // Integer weights cannot hold every percentage. When the backend has exactly the
            // weights `apply` sets for this target, report the target itself, so that a 0.3 %
            // step held as 1/256 does not look like a drifted split and get re-applied on every
            // tick.
            if check_target(target).is_ok() && resting.is_empty() {
                let (s, c) = integer_split(target.canary_weight, &TOTALS);
                let exact = weights.iter().all(|(server, w)| {
                    *w == if *server == canary_server {
                        c
                    } else if *server == stable_server {
                        s
                    } else {
                        0
                    }
                });
                if exact {
                    return Ok(target.canary_weight);
                }
            }
            let canary = f64::from(weights.get(canary_server).copied().unwrap_or(0));
            let all: Vec<f64> = weights.values().map(|w| f64::from(*w)).collect();
            canary_share(canary, &all).ok_or_else(|| {
                let why = if resting.is_empty() {
                    String::new()
                } else {
                    format!(
                        " or takes no requests (in maintenance, draining or down: {})",
                        resting.join(", ")
                    )
                };
                RouterError::BadResponse(format!(
                    "every server of haproxy backend {} has weight 0{why}, so no version gets \
                     traffic",
                    self.backend
                ))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let cases = [
            (
                "/run/haproxy/admin.sock",
                Endpoint::Unix("/run/haproxy/admin.sock".into()),
            ),
            ("admin.sock", Endpoint::Unix("admin.sock".into())),
            ("unix://x:1", Endpoint::Unix("x:1".into())),
            ("./x:1", Endpoint::Unix("./x:1".into())),
            ("127.0.0.1:9999", Endpoint::Tcp("127.0.0.1:9999".into())),
            (
                "tcp://lb.internal:9999",
                Endpoint::Tcp("lb.internal:9999".into()),
            ),
            ("[::1]:9999", Endpoint::Tcp("[::1]:9999".into())),
        ];
        for (s, want) in cases {
            assert_eq!(Endpoint::parse(s).ok(), Some(want), "{s}");
        }
        for bad in ["", "tcp://nohost", "tcp://h:99999"] {
            assert!(
                matches!(Endpoint::parse(bad), Err(RouterError::Config(_))),
                "{bad}"
            );
        }
    }

    /// `show stat` as HAProxy 2.6 answers it, cut to the columns that matter plus one other
    /// (real answers have about a hundred).
    #[test]
    fn stat_answers() {
        let answer = "# pxname,svname,qcur,status,weight,act,bck,\n\
                      be,stable,0,UP,30,1,0,\n\
                      be,canary,0,no check,50,1,0,\n\
                      be,spare,0,UP,10,0,1,\n\
                      be,off,0,MAINT,10,1,0,\n\
                      be,draining,0,DRAIN,10,1,0,\n\
                      be,failing,0,DOWN 1/2,10,1,0,\n\
                      be,going,0,UP 1/3,10,1,0,\n\
                      be,BACKEND,0,UP,90,2,1,\n\
                      other,x,0,UP,5,1,0,\n\n";
        let servers = parse_stat_answer("c", answer, "be").expect("parsed");
        let server = |name: &str, weight, backup, maintenance, serving| StatServer {
            name: name.into(),
            weight,
            backup,
            maintenance,
            serving,
        };
        assert_eq!(
            servers,
            vec![
                server("stable", 30, false, false, true),
                server("canary", 50, false, false, true),
                server("spare", 10, true, false, true),
                server("off", 10, false, true, false),
                server("draining", 10, false, false, false),
                server("failing", 10, false, false, false),
                server("going", 10, false, false, true),
            ]
        );
        assert!(matches!(
            parse_stat_answer("c", "No such proxy.\n", "be"),
            Err(RouterError::Rejected(m)) if m.contains("No such proxy")
        ));
        for junk in ["", "1,2,3", "# pxname,svname,status,bck\nbe,a,UP,0"] {
            assert!(
                matches!(
                    parse_stat_answer("c", junk, "be"),
                    Err(RouterError::BadResponse(_))
                ),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn answers() {
        assert!(parse_set_answer("c", "\n").is_ok());
        assert!(parse_set_answer("c", "").is_ok());
        for refusal in [
            "No such server.\n",
            "No such backend.\n",
            "Permission denied\n",
        ] {
            assert!(
                matches!(parse_set_answer("c", refusal), Err(RouterError::Rejected(m)) if m.contains(refusal.trim()))
            );
        }
        assert_eq!(parse_get_answer("c", "128 (initial 1)\n").ok(), Some(128));
        assert_eq!(parse_get_answer("c", "0 (initial 100)\n\n").ok(), Some(0));
        assert!(matches!(
            parse_get_answer("c", "No such server.\n"),
            Err(RouterError::Rejected(_))
        ));
        for junk in [
            "",
            "128",
            "x (initial 1)",
            "300 (initial 1)",
            "1 (initial x)",
            "-1 (initial 1)",
        ] {
            assert!(
                matches!(
                    parse_get_answer("c", junk),
                    Err(RouterError::BadResponse(_))
                ),
                "{junk:?}"
            );
        }
    }
}
