//! nginx through an upstream block in a file of its own, which the nginx configuration
//! `include`s in its `http` block, and a reload command.
//!
//! canaryd owns the whole file and writes one `upstream` block with one `server` line per
//! version:
//!
//! ```text
//! upstream fraud {
//!     server 10.0.0.1:8080 weight=95;  # v1
//!     server 10.0.0.2:8080 weight=5;  # v2
//!     server 10.0.0.3:8080 down;  # v0
//! }
//! ```
//!
//! nginx weights are integers of at least 1 (there is no documented maximum; canaryd writes
//! pairs summing to 100, 1000 or 10000, so whole percents are exact). A version that must get
//! no traffic cannot have weight 0, so its line is marked `down`, which nginx accepts in every
//! balancing method and which sends that server nothing; stable and canary never both end up
//! `down`, so the upstream always has a server.
//!
//! The file is replaced atomically with its first line marking it `NOT_LOADED`, then the reload
//! command runs and must exit 0, and then the mark is taken off (another atomic replace). So a
//! file whose reload never ran (the daemon killed in between, a write that failed after its
//! rename) or failed reads as not taken. If the reload fails the previous file is put back, so
//! that the file, which is what `read` reports, never claims a split that nginx did not take;
//! except a split that sends nothing to the canary (a rollback), which stays for nginx's next
//! start, marked until an apply of it reloads nginx. `read` therefore reflects the
//! configuration canaryd last had accepted, not nginx's live state: `nginx -s reload` only signals the master process and
//! exits 0 even when the new configuration is invalid, so reload with
//! `[sh, -c, "nginx -t && nginx -s reload"]` to have a bad configuration reported.

use super::file::{read_error, read_if_exists, remove_durably, write_atomic, write_error};
use super::{BoxFuture, Router, RouterError, Target, canary_share, check_target, integer_split};
use crate::text::quoted;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// Totals the stable and canary weights may sum to; see the module comment.
const TOTALS: [u32; 3] = [100, 1000, 10000];
/// How long the reload command may run.
const DEFAULT_RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of the reload command's stderr an error carries, in characters: enough for nginx's
/// few lines of `nginx -t`, short enough for one log line.
const MAX_STDERR: usize = 600;

/// Writes one upstream block and reloads nginx.
#[derive(Debug)]
pub struct NginxRouter {
    /// The include file canaryd owns.
    weights_file: PathBuf,
    /// Command and arguments that make nginx load the file.
    reload: Vec<String>,
    /// Name of the upstream block.
    upstream: String,
    /// Version label to `host:port`.
    servers: BTreeMap<String, String>,
    /// Bound on the reload command.
    reload_timeout: Duration,
    /// The file content nginx last reloaded successfully from this process. Serialises applies,
    /// and lets an unchanged split skip the reload, which would otherwise restart nginx's
    /// workers on every tick.
    reloaded: tokio::sync::Mutex<Option<String>>,
}

/// First line of a file that holds a split nginx has not been made to load: written before
/// the reload and taken off after it, and kept on a rollback whose reload failed (left for
/// nginx's next start). nginx ignores it as a comment; `read` reports the split not taken until
/// an apply of it reloads nginx. In the file, so that a restarted daemon or an edited router
/// knows it too.
const NOT_LOADED: &str = "# canaryd: nginx has not loaded this file yet: ";

/// Whether an upstream name or server address cannot be written into the include file:
/// characters that would end a directive or start a block or comment in nginx syntax.
pub fn unusable_token(s: &str) -> bool {
    s.is_empty() || s.contains(|c: char| c.is_whitespace() || ";{}#'\"\\$".contains(c))
}

impl NginxRouter {
    pub fn new(
        weights_file: PathBuf,
        reload: Vec<String>,
        upstream: &str,
        servers: BTreeMap<String, String>,
    ) -> Result<NginxRouter, RouterError> {
        let bad = unusable_token;
        if bad(upstream) {
            return Err(RouterError::Config(format!(
                "nginx upstream name {upstream:?} is not usable"
            )));
        }
        if let Some((v, a)) = servers.iter().find(|(_, a)| bad(a)) {
            return Err(RouterError::Config(format!(
                "nginx server address {a:?} of version {v:?} is not usable"
            )));
        }
        let mut seen = BTreeMap::new();
        for (v, a) in &servers {
            if let Some(other) = seen.insert(a, v) {
                return Err(RouterError::Config(format!(
                    "versions {other:?} and {v:?} both use nginx server {a:?}; each version needs its own"
                )));
            }
        }
        if reload.is_empty() {
            return Err(RouterError::Config(
                "the nginx reload command is empty".into(),
            ));
        }
        Ok(NginxRouter {
            weights_file,
            reload,
            upstream: upstream.to_string(),
            servers,
            reload_timeout: DEFAULT_RELOAD_TIMEOUT,
            reloaded: tokio::sync::Mutex::new(None),
        })
    }

    /// Changes the bound on the reload command (10 s by default).
    pub fn with_reload_timeout(mut self, timeout: Duration) -> NginxRouter {
        self.reload_timeout = timeout;
        self
    }

    fn address(&self, version: &str) -> Result<&str, RouterError> {
        self.servers
            .get(version)
            .map(String::as_str)
            .ok_or_else(|| {
                RouterError::Config(format!(
                    "no nginx server is configured for version {version:?} (servers: {:?})",
                    self.servers
                ))
            })
    }

    fn render(&self, target: &Target) -> Result<String, RouterError> {
        let (stable_w, canary_w) = integer_split(target.canary_weight, &TOTALS);
        let mut lines = vec![
            (
                self.address(&target.stable)?,
                stable_w,
                target.stable.as_str(),
            ),
            (
                self.address(&target.canary)?,
                canary_w,
                target.canary.as_str(),
            ),
        ];
        for (version, addr) in &self.servers {
            if version != &target.stable && version != &target.canary {
                lines.push((addr, 0, version));
            }
        }
        let mut out = format!(
            "# Written by canaryd for rollout {:?}: stable {}, canary {} at {} %.\n\
             # canaryd owns this file and rewrites it whenever it changes the split.\n\
             upstream {} {{\n",
            target.rollout, target.stable, target.canary, target.canary_weight, self.upstream
        );
        for (addr, weight, version) in lines {
            let state = if weight == 0 {
                "down".to_string()
            } else {
                format!("weight={weight}")
            };
            out.push_str(&format!("    server {addr} {state};  # {version}\n"));
        }
        out.push_str("}\n");
        Ok(out)
    }

    /// Runs the reload command; a non-zero exit is a refusal carrying the command's stderr.
    async fn run_reload(&self) -> Result<(), RouterError> {
        let shown = self.reload.join(" ");
        let mut cmd = tokio::process::Command::new(&self.reload[0]);
        cmd.args(&self.reload[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so that a command that hangs goes with everything it
            // started (`sh -c "nginx -t && nginx -s reload"` leaves children behind).
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| {
            RouterError::Config(format!(
                "cannot run the nginx reload command {shown:?}: {e}"
            ))
        })?;
        let group = child.id();
        let output = match tokio::time::timeout(self.reload_timeout, child.wait_with_output()).await
        {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                return Err(RouterError::Unreachable(format!(
                    "nginx reload command {shown:?} failed to run: {e}"
                )));
            }
            // Dropping the future kills the command (kill_on_drop); its children too.
            Err(_) => {
                if let Some(pgid) = group.and_then(|g| libc::pid_t::try_from(g).ok()) {
                    // SAFETY: kill(2) with a negative pid signals the process group the
                    // command was started in above; it touches no memory of this process.
                    unsafe {
                        libc::kill(-pgid, libc::SIGKILL);
                    }
                }
                return Err(RouterError::Unreachable(format!(
                    "nginx reload command {shown:?} did not finish within {}",
                    humantime::format_duration(self.reload_timeout)
                )));
            }
        };
        if output.status.success() {
            return Ok(());
        }
        let stderr = one_line(&String::from_utf8_lossy(&output.stderr), MAX_STDERR);
        let stderr = if stderr.is_empty() {
            "nothing on stderr".to_owned()
        } else {
            stderr
        };
        Err(RouterError::Rejected(format!(
            "nginx reload command {shown:?} exited with {}: {stderr}",
            output.status
        )))
    }
}

/// A command's output as one line, so that a log entry or an API error stays one line: its
/// non-empty lines, trimmed, joined with "; ", and cut to its last `max` characters (the
/// reason is usually at the end) behind an ellipsis.
fn one_line(output: &str, max: usize) -> String {
    let line = output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match line.char_indices().rev().nth(max.saturating_sub(1)) {
        Some((i, _)) if i > 0 => format!("…{}", &line[i..]),
        _ => line,
    }
}

/// One `server` line of the file canaryd writes: the address and its weight, 0 when `down`.
fn parse_server_line(line: &str) -> Option<(&str, u32)> {
    let body = line.split_once('#').map_or(line, |(b, _)| b).trim();
    let body = body.strip_prefix("server ")?.strip_suffix(';')?;
    let mut words = body.split_whitespace();
    let addr = words.next()?;
    let state = words.next()?;
    if words.next().is_some() {
        return None;
    }
    let weight = if state == "down" {
        0
    } else {
        state
            .strip_prefix("weight=")?
            .parse()
            .ok()
            .filter(|w| *w >= 1)?
    };
    Some((addr, weight))
}

impl Router for NginxRouter {
    fn kind(&self) -> &'static str {
        "nginx"
    }

    fn apply<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<(), RouterError>> {
        Box::pin(async move {
            check_target(target)?;
            let content = self.render(target)?;
            let path = &self.weights_file;
            let mut reloaded = self.reloaded.lock().await;
            let previous = read_if_exists(path)
                .await
                .map_err(|e| read_error(path, e))?;
            let on_disk = previous.as_deref().map(String::from_utf8_lossy);
            if reloaded.as_deref() == Some(content.as_str())
                && on_disk.as_deref() == Some(content.as_str())
            {
                return Ok(());
            }
            *reloaded = None;
            let pending = format!("{NOT_LOADED}its reload has not finished\n{content}");
            write_atomic(path, pending.into_bytes())
                .await
                .map_err(|e| write_error(path, e))?;
            if let Err(e) = self.run_reload().await {
                if target.canary_weight == 0.0 {
                    // A rollback stays on disk: a stopped nginx that starts again, or a reload
                    // by anyone, then sends nothing to the canary. Marked, so that reads fail
                    // until a reload of it succeeds and the rollback is not taken as done
                    // before that.
                    let marked = format!(
                        "{NOT_LOADED}{}\n{content}",
                        one_line(&e.to_string(), MAX_STDERR)
                    );
                    return Err(match write_atomic(path, marked.into_bytes()).await {
                        Ok(()) => e,
                        Err(we) => RouterError::Unreachable(format!(
                            "{e}; and marking {} as not loaded failed: {we}",
                            path.display()
                        )),
                    });
                }
                let restored = match previous {
                    Some(bytes) => write_atomic(path, bytes).await,
                    None => remove_durably(path).await,
                };
                return Err(match restored {
                    Ok(()) => e,
                    Err(re) => RouterError::Unreachable(format!(
                        "{e}; and putting back the previous {} failed too: {re}",
                        path.display()
                    )),
                });
            }
            // Loaded: the mark comes off. If that write fails, the file still reads as not
            // taken, and the next apply writes and reloads it again.
            write_atomic(path, content.clone().into_bytes())
                .await
                .map_err(|e| write_error(path, e))?;
            *reloaded = Some(content);
            Ok(())
        })
    }

    fn read<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<f64, RouterError>> {
        Box::pin(async move {
            let path = &self.weights_file;
            let canary_addr = self.address(&target.canary)?;
            // No file yet: canaryd never applied a split, so nginx cannot be sending the canary
            // traffic through this upstream.
            let Some(bytes) = read_if_exists(path)
                .await
                .map_err(|e| read_error(path, e))?
            else {
                return Ok(0.0);
            };
            let bad = |why: String| {
                RouterError::BadResponse(format!("nginx weights file {}: {why}", path.display()))
            };
            let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
            if let Some(marked) = text.strip_prefix(NOT_LOADED) {
                // A split nginx has not loaded (a rollback it could not load, or a file whose
                // reload never finished): not taken until an apply of it reloads nginx (a
                // rollout applies again at every analysis). Reads change nothing: a dry run or
                // a replica no longer leading reads too.
                let why = marked.lines().next().unwrap_or_default();
                return Err(RouterError::Unreachable(format!(
                    "nginx has not loaded {}: {why}",
                    path.display()
                )));
            }
            let mut lines = text
                .lines()
                .enumerate()
                .map(|(i, l)| (i + 1, l.trim()))
                .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
            let header = format!("upstream {} {{", self.upstream);
            match lines.next() {
                Some((_, l)) if l == header => {}
                other => {
                    return Err(bad(format!(
                        "expected {header:?} first, found {}",
                        other.map_or_else(|| "nothing".to_owned(), |(_, l)| quoted(l))
                    )));
                }
            }
            let mut weights = Vec::new();
            let mut canary = 0.0;
            let mut closed = false;
            for (n, line) in lines {
                if closed {
                    return Err(bad(format!(
                        "line {n}: unexpected {} after the upstream block",
                        quoted(line)
                    )));
                }
                if line == "}" {
                    closed = true;
                    continue;
                }
                let (addr, w) = parse_server_line(line).ok_or_else(|| {
                    bad(format!(
                        "line {n}: expected \"server <host:port> weight=<n>|down;\", found {}",
                        quoted(line)
                    ))
                })?;
                if !self.servers.values().any(|a| a == addr) {
                    // A server the policy no longer names (the version before the last
                    // promotion, now neither stable nor canary) that gets nothing is harmless;
                    // the next apply leaves it out.
                    if w == 0 {
                        continue;
                    }
                    return Err(bad(format!(
                        "line {n}: server {} is not one of the configured {:?}",
                        quoted(addr),
                        self.servers
                    )));
                }
                if addr == canary_addr {
                    canary = f64::from(w);
                }
                weights.push(f64::from(w));
            }
            if !closed {
                return Err(bad("the upstream block is not closed".into()));
            }
            canary_share(canary, &weights).ok_or_else(|| bad("every server is down".into()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lines() {
        assert_eq!(
            parse_server_line("server 127.0.0.1:1 weight=5;  # v1"),
            Some(("127.0.0.1:1", 5))
        );
        assert_eq!(parse_server_line("server h:1 down;"), Some(("h:1", 0)));
        for bad in [
            "server h:1 weight=0;",
            "server h:1 weight=5",
            "server h:1;",
            "server h:1 weight=x;",
            "server h:1 weight=1 backup;",
        ] {
            assert_eq!(parse_server_line(bad), None, "{bad}");
        }
    }

    #[test]
    fn command_output_becomes_one_line_cut_from_the_front() {
        let cases = [
            ("", 10, ""),
            ("  \n\n", 10, ""),
            ("one\n", 10, "one"),
            (" a \r\n\n b\n", 10, "a; b"),
            ("abcdef\nghij", 8, "…ef; ghij"),
            ("abc", 3, "abc"),
            ("ééééé", 3, "…ééé"),
        ];
        for (output, max, want) in cases {
            assert_eq!(one_line(output, max), want, "{output:?} {max}");
        }
    }

    /// Regression: the reload command's stderr went into the error as it was, so one log
    /// entry spanned several lines.
    #[test]
    fn a_failed_reload_is_reported_on_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = "echo 'nginx: the configuration file /etc/nginx/nginx.conf syntax is ok' >&2; \
                      echo 'nginx: configuration file /etc/nginx/nginx.conf test is successful' >&2; \
                      echo >&2; \
                      echo 'nginx: [error] invalid PID number \"\" in \"/run/nginx.pid\"' >&2; \
                      exit 1";
        let servers = BTreeMap::from([
            ("v1".to_string(), "h:1".to_string()),
            ("v2".to_string(), "h:2".to_string()),
        ]);
        let r = NginxRouter::new(
            dir.path().join("weights.conf"),
            vec!["sh".into(), "-c".into(), script.into()],
            "up",
            servers,
        );
        let r = match r {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let e = match rt.block_on(r.run_reload()) {
            Err(RouterError::Rejected(e)) => e,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.ends_with(
                "exited with exit status: 1: \
                 nginx: the configuration file /etc/nginx/nginx.conf syntax is ok; \
                 nginx: configuration file /etc/nginx/nginx.conf test is successful; \
                 nginx: [error] invalid PID number \"\" in \"/run/nginx.pid\""
            ),
            "{e}"
        );
        let silent = NginxRouter::new(
            dir.path().join("weights.conf"),
            vec!["false".into()],
            "up",
            BTreeMap::from([("v1".to_string(), "h:1".to_string())]),
        );
        let silent = match silent {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        match rt.block_on(silent.run_reload()) {
            Err(RouterError::Rejected(e)) => assert!(e.ends_with(": nothing on stderr"), "{e}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn rendered_file_reads_back_and_zero_is_down() {
        let servers = BTreeMap::from([
            ("v0".to_string(), "h:0".to_string()),
            ("v1".to_string(), "h:1".to_string()),
            ("v2".to_string(), "h:2".to_string()),
        ]);
        let r = NginxRouter::new("x".into(), vec!["true".into()], "up", servers);
        let r = match r {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let t = Target {
            rollout: "r".into(),
            stable: "v1".into(),
            canary: "v2".into(),
            canary_weight: 0.0,
        };
        let text = r.render(&t).unwrap_or_default();
        assert!(text.contains("server h:2 down;"), "{text}");
        assert!(text.contains("server h:0 down;"), "{text}");
        assert!(text.contains("server h:1 weight=100;"), "{text}");
        let t = Target {
            canary_weight: 12.5,
            ..t
        };
        let text = r.render(&t).unwrap_or_default();
        assert!(
            text.contains("server h:1 weight=875;") && text.contains("server h:2 weight=125;"),
            "{text}"
        );
    }
}
