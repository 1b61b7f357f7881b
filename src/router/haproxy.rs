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
/// An answer longer than this is not one HAProxy gives to these commands.
const MAX_ANSWER: u64 = 64 * 1024;

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
        // Names with spaces, `/` or `;` would change the meaning of the command line.
        let bad = |n: &str| {
            n.is_empty() || n.contains(|c: char| c.is_whitespace() || c == '/' || c == ';')
        };
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
                Err(RouterError::Unreachable(format!(
                    "haproxy socket {:?}: no answer to {cmd:?} within {:?}",
                    self.endpoint, self.timeout
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
            // Integer weights cannot hold every percentage. When the backend has exactly the
            // weights `apply` sets for this target, report the target itself, so that a 0.3 %
            // step held as 1/256 does not look like a drifted split and get re-applied on every
            // tick.
            if check_target(target).is_ok() {
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
                RouterError::BadResponse(format!(
                    "every server of haproxy backend {} has weight 0, so no version gets traffic",
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
