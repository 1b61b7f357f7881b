//! What a policy's values mean: units, ranges, and rules across fields. Collects every
//! problem of a file before reporting.

use super::raw::{self, At, Problem, RawMetric, RawPolicy, Scalar};
use super::tree::{self, Pos};
use super::*;
use crate::text::quoted;
use std::fmt;
use std::path::Path;

/// The longest duration a policy may give: longer than any rollout should take, and short
/// enough that no arithmetic on times can overflow.
const MAX_DURATION: Duration = Duration::from_secs(31_557_600);
/// The longest webhook timeout: a promotion gate and a webhook router are asked within an
/// analysis, which an operator's abort waits for (the API gives up after 45 s).
const MAX_TIMEOUT: Duration = Duration::from_secs(30);

/// What a router's `servers` map holds, for its errors.
struct ServerKind {
    /// The map's values, in "a mapping of version to …".
    what: &'static str,
    /// A usable value, in "expected …".
    usable: &'static str,
    unusable: fn(&str) -> bool,
}

/// The method used when a policy names none.
pub const DEFAULT_METHOD: Method = Method::Sequential;

/// Methods whose judges exist in this build.
pub fn method_available(m: Method) -> bool {
    matches!(
        m,
        Method::Threshold | Method::Sequential | Method::MannWhitney
    )
}

/// Every problem of one policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The file as the user named it.
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: ", self.file, p.pos.line, p.pos.column)?;
            if !p.path.is_empty() {
                write!(f, "{}: ", p.path)?;
            }
            write!(f, "{}", p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

/// Where a webhook's secret belongs instead of its URL's user or password.
const WEBHOOK_SECRET: &str =
    "put a secret in its path or query instead: only the URL's origin is shown";

/// The most a credentials file may hold; a token or password is far shorter, and a path to a
/// device or a log file must not be read whole.
const MAX_SECRET_BYTES: u64 = 64 << 10;

/// Why a credentials file could not be used.
#[derive(Debug)]
pub enum SecretFileError {
    /// Missing, unreadable, or not a regular file.
    Unreadable(std::io::Error),
    /// Read, but not one line of text: what was found instead.
    Malformed(String),
}

/// Reads a credentials file (a token or a password) the one way every credentials file is
/// read, for policies and command-line flags alike: a regular file (a FIFO would block, a
/// device never ends) of at most 64 KiB holding one line of UTF-8 text. Line ends at the end
/// are dropped; anything else, spaces included, is part of the secret.
pub fn read_secret_file(path: &std::path::Path) -> Result<Secret, SecretFileError> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::metadata(path)
        .and_then(|m| {
            if m.is_file() {
                Ok(())
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        })
        .and_then(|()| std::fs::File::open(path))
        .and_then(|f| f.take(MAX_SECRET_BYTES + 1).read_to_end(&mut bytes))
        .map_err(SecretFileError::Unreadable)?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(SecretFileError::Malformed(format!(
            "more than {MAX_SECRET_BYTES} bytes"
        )));
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| SecretFileError::Malformed("text that is not UTF-8".to_owned()))?;
    let text = text.trim_end_matches(['\n', '\r']);
    if text.is_empty() {
        Err(SecretFileError::Malformed("an empty file".to_owned()))
    } else if text.contains(char::is_control) {
        Err(SecretFileError::Malformed(
            "more than one line, or control characters".to_owned(),
        ))
    } else {
        Ok(Secret::new(text.to_owned()))
    }
}

/// The shortest `strategy.interval` a policy may have: every analysis queries Prometheus once
/// per metric and version and writes to the state store.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Reads and validates a policy file, and reads the credentials files it names (relative
/// paths are taken from the policy file's directory).
pub fn load_file(path: &Path) -> Result<Policy, PolicyError> {
    load_path(path, true, MIN_INTERVAL)
}

/// As [`load_file`], with another floor than [`MIN_INTERVAL`] for `strategy.interval`: the
/// daemon's own tests run whole rollouts in a second.
pub fn load_file_with_min_interval(
    path: &Path,
    min_interval: Duration,
) -> Result<Policy, PolicyError> {
    load_path(path, true, min_interval)
}

/// As [`load_file`], but the credentials files are not read, only their paths checked: for
/// `canaryd check` where the secrets are not (a CI machine). The policy's secrets are empty.
pub fn load_file_without_secrets(path: &Path) -> Result<Policy, PolicyError> {
    load_path(path, false, MIN_INTERVAL)
}

fn load_path(
    path: &Path,
    read_secrets: bool,
    min_interval: Duration,
) -> Result<Policy, PolicyError> {
    let file = display_path(path);
    match std::fs::read_to_string(path) {
        Ok(text) => load_in(
            &file,
            &text,
            path.parent().unwrap_or(Path::new("")),
            read_secrets,
            min_interval,
        ),
        Err(e) => Err(PolicyError {
            file,
            problems: vec![Problem {
                pos: Pos { line: 1, column: 1 },
                path: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        }),
    }
}

/// Validates a policy's text; `file` names it in messages. Credentials files the policy names
/// are read, relative paths from the current directory, as the text has no file of its own.
pub fn load_str(file: &str, text: &str) -> Result<Policy, PolicyError> {
    load_in(file, text, Path::new(""), true, MIN_INTERVAL)
}

/// The fields of a policy file as written, if it parses as YAML.
fn read_raw(path: &Path) -> Option<RawPolicy> {
    let text = std::fs::read_to_string(path).ok()?;
    let doc = tree::parse(&text).ok()?;
    Some(raw::read(&doc).0)
}

/// The rollout name a policy file gives, valid or not: to find an invalid policy by the name
/// its rollout would have.
pub fn declared_name(path: &Path) -> Option<String> {
    read_raw(path)?.name.map(|n| n.value)
}

/// One problem of a policy file at a field found by `field` (the document's start if the file
/// no longer parses or lacks it).
fn problem_at(
    path: &Path,
    field: impl FnOnce(RawPolicy) -> Option<(Pos, String)>,
    fallback: &str,
    message: String,
) -> PolicyError {
    let (pos, field) = read_raw(path)
        .and_then(field)
        .unwrap_or_else(|| (Pos { line: 1, column: 1 }, fallback.to_owned()));
    PolicyError {
        file: display_path(path),
        problems: vec![Problem {
            pos,
            path: field,
            message,
        }],
    }
}

/// The error for a policy file whose rollout name another file already uses: at the
/// position of its `name` field (the document's start if the file no longer parses).
pub fn name_clash(path: &Path, name: &str, other: &str) -> PolicyError {
    problem_at(
        path,
        |raw| raw.name.map(|n| (n.pos, "name".to_owned())),
        "name",
        format!(
            "rollout {name:?} is already defined by {other}; every policy file needs its own name"
        ),
    )
}

/// The error for a policy file whose router drives what another policy's already drives: at
/// the field that names the target (`router.haproxy.backend`, `router.nginx.weights_file` or
/// `router.file.path`). `other` is the other policy's rollout name and `other_file` its file.
pub fn router_clash(
    path: &Path,
    target: &RouterTarget,
    other: &str,
    other_file: &str,
) -> PolicyError {
    problem_at(
        path,
        |raw| {
            let r = raw.router?.value;
            let at = match (r.haproxy, r.nginx, r.file) {
                (Some(h), _, _) => h.value.backend,
                (_, Some(n), _) => n.value.weights_file,
                (_, _, Some(f)) => f.value.path,
                _ => None,
            }?;
            Some((at.pos, at.path))
        },
        "router",
        format!(
            "{target} is already routed by rollout {other:?} of {other_file}; two rollouts on \
             one router target undo each other's weights, so each needs its own"
        ),
    )
}

/// Validates a policy's text whose relative credentials paths start at `dir`.
fn load_in(
    file: &str,
    text: &str,
    dir: &Path,
    read_secrets: bool,
    min_interval: Duration,
) -> Result<Policy, PolicyError> {
    let doc = tree::parse(text).map_err(|e| PolicyError {
        file: file.to_owned(),
        problems: vec![Problem {
            pos: e.pos.unwrap_or(Pos { line: 1, column: 1 }),
            path: String::new(),
            message: format!("invalid YAML: {}", yaml_message(&e.message)),
        }],
    })?;
    let (raw, mut problems) = raw::read(&doc);
    // A document that is not a mapping has no fields at all: reporting each required field
    // as missing too would bury the one problem the user has to fix.
    if !matches!(doc.value, tree::Value::Map(_)) {
        if matches!(doc.value, tree::Value::Null) {
            // An empty or comment-only file: point at its start, not at its end.
            for p in &mut problems {
                p.pos = Pos { line: 1, column: 1 };
            }
        }
        return Err(PolicyError {
            file: file.to_owned(),
            problems,
        });
    }
    let mut v = Validator {
        problems: Vec::new(),
        doc_pos: doc.pos,
        reported: problems.iter().map(|p| p.path.clone()).collect(),
        dir: dir.to_owned(),
        read_secrets,
        min_interval,
    };
    let policy = v.policy(&raw);
    problems.append(&mut v.problems);
    problems.sort_by_key(|p| (p.pos.line, p.pos.column));
    match policy {
        Some(p) if problems.is_empty() => Ok(p),
        _ => Err(PolicyError {
            file: file.to_owned(),
            problems,
        }),
    }
}

/// The parser's message in the user's terms: one line, without the position the message
/// already starts with, and without advice meant for programmers using the parser.
fn yaml_message(raw: &str) -> String {
    let line = raw.lines().next().unwrap_or(raw).trim();
    let line = match line.rfind(" at line ") {
        Some(i) if line[i..].contains(", column ") => &line[..i],
        _ => line,
    };
    if let Some(rest) = line.strip_prefix("duplicate mapping key: ") {
        let key = rest
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(rest);
        return format!(
            "duplicate key `{}`; each key may appear once in a mapping",
            key.trim()
        );
    }
    if line.starts_with("multiple YAML documents detected") {
        return "expected one policy per file, found a second YAML document (---)".into();
    }
    line.to_owned()
}

struct Validator {
    problems: Vec<Problem>,
    doc_pos: Pos,
    /// Field paths the first pass already reported (wrong type, say): such a field is
    /// present, so it must not be reported as missing too.
    reported: Vec<String>,
    /// Where relative credentials paths start: the policy file's directory.
    dir: PathBuf,
    /// Whether credentials files are read (else only their paths are checked).
    read_secrets: bool,
    /// The shortest `strategy.interval` accepted.
    min_interval: Duration,
}

/// A parsed duration and whether it was valid.
fn parse_duration(s: &str) -> Option<Duration> {
    humantime::parse_duration(s.trim()).ok()
}

impl Validator {
    fn err<T>(&mut self, at: &At<T>, message: String) {
        self.problems.push(Problem {
            pos: at.pos,
            path: at.path.clone(),
            message,
        });
    }

    fn missing(&mut self, pos: Pos, path: &str, what: &str) {
        if self.reported.iter().any(|r| r == path) {
            return;
        }
        self.problems.push(Problem {
            pos,
            path: path.to_owned(),
            message: format!("expected {what}, found none (the field is missing)"),
        });
    }

    fn required<'a, T>(
        &mut self,
        v: &'a Option<At<T>>,
        parent: Pos,
        path: &str,
        what: &str,
    ) -> Option<&'a At<T>> {
        if v.is_none() {
            self.missing(parent, path, what);
        }
        v.as_ref()
    }

    /// A webhook's timeout: a positive duration of at most `MAX_TIMEOUT`, or the default.
    fn timeout(&mut self, v: &Option<At<String>>, default: Duration) -> Duration {
        let d = self.duration(v, default);
        if let Some(at) = v
            && d > MAX_TIMEOUT
        {
            self.err(
                at,
                format!(
                    "expected a timeout of at most {} (a promotion gate or a router is asked \
                     within an analysis, and an operator's abort waits for it), found {}",
                    humantime::format_duration(MAX_TIMEOUT),
                    quoted(&at.value)
                ),
            );
            return default;
        }
        d
    }

    /// A positive duration, or the default when absent.
    fn duration(&mut self, v: &Option<At<String>>, default: Duration) -> Duration {
        let Some(at) = v else { return default };
        match parse_duration(&at.value) {
            Some(d) if d.is_zero() => {
                self.err(
                    at,
                    format!(
                        "expected a duration above zero, found {}",
                        quoted(&at.value)
                    ),
                );
                default
            }
            Some(d) if d > MAX_DURATION => {
                self.err(
                    at,
                    format!(
                        "expected a duration of at most {}, found {}",
                        humantime::format_duration(MAX_DURATION),
                        quoted(&at.value)
                    ),
                );
                default
            }
            Some(d) => d,
            // A bare number is the usual slip: say that the unit is what is missing.
            None if at.value.trim().parse::<f64>().is_ok() => {
                self.err(
                    at,
                    format!(
                        "expected a duration with a unit, like 30s or 1m30s, found {}",
                        crate::text::cut(at.value.trim())
                    ),
                );
                default
            }
            None => {
                self.err(
                    at,
                    format!(
                        "expected a duration like 30s or 1m30s, found {}",
                        quoted(&at.value)
                    ),
                );
                default
            }
        }
    }

    fn identifier(&mut self, at: &At<String>, what: &str) {
        let ok = !at.value.is_empty()
            && at.value.len() <= 63
            && at
                .value
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            self.err(
                at,
                format!(
                    "expected {what} of lowercase letters, digits and dashes (at most 63), found {}",
                    quoted(&at.value)
                ),
            );
        }
    }

    fn label_value(&mut self, at: &At<String>) {
        if at.value.trim().is_empty() || at.value.contains(['"', '\\', '\n']) {
            self.err(
                at,
                format!(
                    "expected a label value without quotes or backslashes, found {}",
                    quoted(&at.value)
                ),
            );
        }
    }

    /// An http(s) URL. It is shown by its origin only: its user, password, path and query
    /// can hold secrets, and `canaryd check` prints its messages to CI logs.
    fn url(&mut self, at: &At<String>) {
        let v = &at.value;
        let origin = url_origin(v);
        let shown = if origin.len() < v.len() {
            format!("{origin}/…")
        } else {
            origin
        };
        let rest = v
            .strip_prefix("http://")
            .or_else(|| v.strip_prefix("https://"));
        if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
            self.err(
                at,
                format!(
                    "expected an http:// or https:// URL, found {}",
                    quoted(&shown)
                ),
            );
        } else if v.contains(char::is_whitespace) {
            // A copy-paste accident, never a reachable endpoint.
            self.err(
                at,
                format!(
                    "expected an http:// or https:// URL without whitespace, found whitespace \
                     in {}",
                    quoted(&shown)
                ),
            );
        } else if let Err(e) = reqwest::Url::parse(v) {
            self.err(
                at,
                format!("expected a valid URL, found {} ({e})", quoted(&shown)),
            );
        }
    }

    /// Refuses a URL with a user name or password in it: reqwest would send them, and they
    /// would show wherever the URL does. `instead` says where such a secret belongs.
    fn no_credentials(&mut self, at: &At<String>, instead: &str) {
        if url_has_credentials(&at.value) {
            self.err(
                at,
                format!(
                    "expected a URL without a user name or password ({instead}), found \
                     credentials in it"
                ),
            );
        }
    }

    fn policy(&mut self, raw: &RawPolicy) -> Option<Policy> {
        let top = self.doc_pos;
        let name = self.required(&raw.name, top, "name", "the rollout's name");
        if let Some(n) = name {
            self.identifier(n, "a name");
        }
        if let Some(m) = &raw.model {
            self.label_value(m);
        }
        let stable = self.required(
            &raw.stable,
            top,
            "stable",
            "the stable version's label value",
        );
        let canary = self.required(
            &raw.canary,
            top,
            "canary",
            "the canary version's label value",
        );
        for v in [stable, canary].into_iter().flatten() {
            self.label_value(v);
        }
        if let (Some(s), Some(c)) = (stable, canary)
            && s.value == c.value
        {
            self.err(
                c,
                format!(
                    "expected a version different from stable, found {} for both",
                    quoted(&c.value)
                ),
            );
        }
        let strategy = self.strategy(raw);
        let analysis = self.analysis(raw);
        let metrics = self.metrics(raw);
        let router = self.router(raw, stable, canary, name);
        let webhooks = self.webhooks(raw);
        let prometheus = raw.prometheus.as_ref().and_then(|p| self.prometheus(p));
        let convention = self.series(raw);
        Some(Policy {
            name: name?.value.clone(),
            model: raw.model.as_ref().or(name)?.value.clone(),
            stable: stable?.value.clone(),
            canary: canary?.value.clone(),
            strategy: strategy?,
            analysis: analysis?,
            metrics: metrics?,
            router: router?,
            webhooks,
            prometheus,
            convention,
        })
    }

    /// The policy's own Prometheus and its credentials, whose files are read here.
    fn prometheus(&mut self, p: &At<raw::RawPrometheus>) -> Option<PrometheusConfig> {
        let r = &p.value;
        let url = self.required(
            &r.url,
            p.pos,
            &format!("{}.url", p.path),
            "Prometheus's URL",
        );
        if let Some(u) = url {
            self.url(u);
            // The URL is also shown in messages and by `check --live`: secrets belong in files.
            self.no_credentials(u, "use basic_auth with a password_file");
        }
        let bearer = r.bearer_token_file.as_ref().map(|t| {
            let token = self.secret(t, "the bearer token");
            token.map(|token| PrometheusAuth::Bearer {
                token_file: self.dir.join(&t.value),
                token,
            })
        });
        let basic = r.basic_auth.as_ref().map(|b| {
            let path = &b.path;
            let user = self.required(
                &b.value.username,
                b.pos,
                &format!("{path}.username"),
                "the user name for basic authentication",
            );
            // RFC 7617: the user-id of basic authentication cannot contain a colon.
            if let Some(u) = user
                && (u.value.is_empty()
                    || u.value.contains(':')
                    || u.value.contains(char::is_control))
            {
                self.err(
                    u,
                    format!(
                        "expected a user name without colons or control characters, found {}",
                        quoted(&u.value)
                    ),
                );
            }
            let file = self.required(
                &b.value.password_file,
                b.pos,
                &format!("{path}.password_file"),
                "the path of a file holding the password",
            );
            let password = file.and_then(|f| self.secret(f, "the password"));
            Some(PrometheusAuth::Basic {
                username: user?.value.clone(),
                password_file: self.dir.join(&file?.value),
                password: password?,
            })
        });
        let auth = match (bearer, basic) {
            (Some(_), Some(_)) => {
                self.err(
                    p,
                    "expected either bearer_token_file or basic_auth, found both".into(),
                );
                return None;
            }
            (Some(a), None) | (None, Some(a)) => Some(a?),
            (None, None) => None,
        };
        Some(PrometheusConfig {
            url: url?.value.trim_end_matches('/').to_owned(),
            auth,
        })
    }

    /// Reads a credentials file named at `at`, resolved against the policy's directory. The
    /// content never appears in a message; a trailing line end is not part of the secret.
    fn secret(&mut self, at: &At<String>, what: &str) -> Option<Secret> {
        if at.value.trim().is_empty() {
            self.err(
                at,
                format!("expected the path of a file holding {what}, found an empty path"),
            );
            return None;
        }
        let path = self.dir.join(&at.value);
        if !self.read_secrets {
            return Some(Secret::new(String::new()));
        }
        match read_secret_file(&path) {
            Ok(secret) => Some(secret),
            Err(SecretFileError::Unreadable(e)) => {
                self.err(
                    at,
                    format!(
                        "expected a readable file holding {what}, but cannot read {}: {e}",
                        path.display()
                    ),
                );
                None
            }
            Err(SecretFileError::Malformed(found)) => {
                self.err(
                    at,
                    format!(
                        "expected {what} on one line in {}, found {found}",
                        path.display()
                    ),
                );
                None
            }
        }
    }

    fn strategy(&mut self, raw: &RawPolicy) -> Option<Strategy> {
        let s = self.required(
            &raw.strategy,
            self.doc_pos,
            "strategy",
            "a strategy section",
        )?;
        let r = &s.value;
        let kind_name = r.kind.as_ref().map_or("canary", |k| k.value.as_str());
        let interval = self.duration(&r.interval, Duration::from_secs(30));
        let min_step_duration = self.duration(&r.min_step_duration, Duration::from_secs(60));
        let progress_deadline = self.duration(&r.progress_deadline, Duration::from_secs(2 * 3600));
        let post_promotion_watch = self.duration(&r.post_promotion_watch, Duration::ZERO);
        let router_deadline = self.duration(&r.router_deadline, Duration::from_secs(300));
        let failure_limit = match &r.failure_limit {
            None => 2,
            Some(f) if f.value >= 1 && f.value <= 1000 => f.value as u32,
            Some(f) => {
                self.err(
                    f,
                    format!("expected a whole number from 1 to 1000, found {}", f.value),
                );
                2
            }
        };
        let on_no_data = match r.on_no_data.as_ref().map(|o| (o, o.value.as_str())) {
            None | Some((_, "hold")) => OnNoData::Hold,
            Some((_, "fail")) => OnNoData::Fail,
            Some((_, "pass")) => OnNoData::Pass,
            Some((o, other)) => {
                let hint = did_you_mean(other, &["hold", "fail", "pass"]);
                self.err(
                    o,
                    format!("expected hold, fail or pass, found {}{hint}", quoted(other)),
                );
                OnNoData::Hold
            }
        };
        let kind = match kind_name {
            "canary" => {
                if let Some(b) = &r.bake {
                    self.err(
                        b,
                        format!(
                            "expected no bake in a canary strategy (bake is for blue-green; \
                             canary steps last min_step_duration), found {}",
                            quoted(&b.value)
                        ),
                    );
                }
                let steps = self.steps(r, s);
                steps.map(|steps| StrategyKind::Canary { steps })
            }
            "blue-green" => {
                if let Some(st) = &r.steps {
                    self.err(
                        st,
                        format!(
                            "expected no steps in a blue-green strategy (it switches all traffic \
                             at once), found {} step{}",
                            st.value.len(),
                            if st.value.len() == 1 { "" } else { "s" }
                        ),
                    );
                }
                if let Some(m) = &r.min_step_duration {
                    self.err(
                        m,
                        format!(
                            "expected no min_step_duration in a blue-green strategy (use bake), \
                             found {}",
                            quoted(&m.value)
                        ),
                    );
                }
                let path = format!("{}.bake", s.path);
                if r.bake.is_none() {
                    self.missing(s.pos, &path, "how long to watch the new version, like 10m");
                }
                let bake = self.duration(&r.bake, Duration::from_secs(600));
                Some(StrategyKind::BlueGreen { bake })
            }
            other => {
                if let Some(k) = &r.kind {
                    let hint = did_you_mean(other, &["canary", "blue-green"]);
                    self.err(
                        k,
                        format!(
                            "expected canary or blue-green, found {}{hint}",
                            quoted(other)
                        ),
                    );
                }
                None
            }
        };
        // Said whether or not the steps or the kind are right, so that one run of `check`
        // lists every mistake.
        if let Some(iv) = &r.interval
            && interval < self.min_interval
        {
            self.err(
                iv,
                format!(
                    "expected at least {} (every analysis queries Prometheus for each metric \
                     and writes to the state store), found {}",
                    humantime::format_duration(self.min_interval),
                    quoted(&iv.value)
                ),
            );
        } else if let Some(iv) = &r.interval
            && interval > progress_deadline
        {
            self.err(
                iv,
                format!(
                    "expected an interval shorter than progress_deadline, found {}",
                    quoted(&iv.value)
                ),
            );
        }
        let kind = kind?;
        let strategy = Strategy {
            kind,
            interval,
            min_step_duration,
            failure_limit,
            progress_deadline,
            on_no_data,
            manual_promotion: r.manual_promotion.as_ref().is_some_and(|m| m.value),
            post_promotion_watch,
            router_deadline,
        };
        // A deadline shorter than the steps themselves can never be met: every rollout of
        // the policy would be rolled back. The default deadline counts too, so the problem is
        // reported where the user can see it: at the deadline if written, else at whatever
        // made the steps long.
        let n = strategy.steps().len();
        let per_step = strategy.step_duration();
        let needed = u32::try_from(n).ok().and_then(|n| per_step.checked_mul(n));
        if needed.is_none_or(|needed| progress_deadline < needed) {
            let total = needed.map_or("longer than any deadline".to_owned(), |d| {
                humantime::format_duration(d).to_string()
            });
            let what = format!(
                "{n} step{} of at least {} each ({total})",
                if n == 1 { "" } else { "s" },
                humantime::format_duration(per_step)
            );
            let length = if strategy.is_blue_green() {
                &r.bake
            } else {
                &r.min_step_duration
            };
            if let Some(pd) = &r.progress_deadline {
                self.err(
                    pd,
                    format!(
                        "expected at least {total} ({n} step{} of at least {} each), found {}",
                        if n == 1 { "" } else { "s" },
                        humantime::format_duration(per_step),
                        quoted(&pd.value)
                    ),
                );
            } else if let Some(at) = length.as_ref() {
                self.err(
                    at,
                    format!(
                        "expected steps that fit in the default progress_deadline of {}, found {what}; \
                         set strategy.progress_deadline",
                        humantime::format_duration(progress_deadline)
                    ),
                );
            } else if let Some(st) = &r.steps {
                self.err(
                    st,
                    format!(
                        "expected steps that fit in the default progress_deadline of {}, found {what}; \
                         set strategy.progress_deadline",
                        humantime::format_duration(progress_deadline)
                    ),
                );
            }
        }
        Some(strategy)
    }

    fn steps(&mut self, r: &raw::RawStrategy, s: &At<raw::RawStrategy>) -> Option<Vec<f64>> {
        let path = format!("{}.steps", s.path);
        let steps = self.required(
            &r.steps,
            s.pos,
            &path,
            "a list of canary weights in percent, like [1, 5, 25]",
        )?;
        let item = format!("{path}[");
        if self.reported.iter().any(|r| r.starts_with(&item)) {
            // A step that is not a number was reported already; what is left of the list
            // (possibly nothing) says nothing more.
            return None;
        }
        if steps.value.is_empty() {
            self.err(
                steps,
                "expected at least one step, found an empty list".into(),
            );
            return None;
        }
        let mut ok = true;
        // Only weights in range count as the previous step, so one bad number is reported
        // once and does not make every later step look out of order.
        let mut prev = 0.0;
        for st in &steps.value {
            if !(st.value > 0.0 && st.value <= 100.0) {
                self.err(
                    st,
                    format!(
                        "expected a percentage above 0 and at most 100, found {}%",
                        st.value
                    ),
                );
                ok = false;
            } else if st.value <= prev {
                self.err(
                    st,
                    format!(
                        "expected steps strictly increasing, found {}% after {}%",
                        st.value, prev
                    ),
                );
                ok = false;
            } else {
                prev = st.value;
            }
        }
        ok.then(|| steps.value.iter().map(|s| s.value).collect())
    }

    fn analysis(&mut self, raw: &RawPolicy) -> Option<Analysis> {
        let mut a = Analysis {
            method: DEFAULT_METHOD,
            confidence: 0.95,
        };
        let Some(r) = &raw.analysis else {
            return Some(a);
        };
        if let Some(m) = &r.value.method {
            let method = match m.value.as_str() {
                "sequential" => Some(Method::Sequential),
                "threshold" => Some(Method::Threshold),
                "mann-whitney" => Some(Method::MannWhitney),
                _ => None,
            };
            match method {
                Some(mm) if method_available(mm) => a.method = mm,
                Some(_) => self.err(
                    m,
                    format!(
                        "expected threshold ({:?} is not available in this build)",
                        m.value
                    ),
                ),
                None => {
                    let hint = did_you_mean(&m.value, &["sequential", "threshold", "mann-whitney"]);
                    self.err(
                        m,
                        format!(
                            "expected sequential, threshold or mann-whitney, found {}{hint}",
                            quoted(&m.value)
                        ),
                    )
                }
            }
        }
        if let Some(c) = &r.value.confidence {
            match fraction(&c.value) {
                Some(v) if (0.5..1.0).contains(&v) => a.confidence = v,
                _ => self.err(c, format!("expected a confidence from 0.5 up to (not including) 1, like 0.95 or 95%, found {}", found(&c.value))),
            }
        }
        Some(a)
    }

    fn metrics(&mut self, raw: &RawPolicy) -> Option<Vec<MetricSpec>> {
        let list = self.required(
            &raw.metrics,
            self.doc_pos,
            "metrics",
            "a list of metrics to judge",
        )?;
        if list.value.is_empty() {
            self.err(
                list,
                "expected at least one metric, found an empty list".into(),
            );
            return None;
        }
        let mut out = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        let mut ok = true;
        for m in &list.value {
            if let Some(n) = &m.value.name {
                if seen.contains(&n.value.as_str()) {
                    self.err(
                        n,
                        format!(
                            "expected a unique metric name, found {} twice",
                            quoted(&n.value)
                        ),
                    );
                    ok = false;
                }
                seen.push(&n.value);
            }
            match self.metric(m) {
                Some(spec) => out.push(spec),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn metric(&mut self, m: &At<RawMetric>) -> Option<MetricSpec> {
        let r = &m.value;
        let name = self.required(
            &r.name,
            m.pos,
            &format!("{}.name", m.path),
            "the metric's name",
        );
        if let Some(n) = name {
            let ok = !n.value.is_empty()
                && n.value
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !ok {
                self.err(
                    n,
                    format!("expected a metric name of lowercase letters, digits, dashes and underscores, found {}", quoted(&n.value)),
                );
            }
        }
        // A kind whose details are wrong (a quantile out of range, a broken template) is still
        // known well enough to check the bounds' units, so that every problem of the metric is
        // reported at once; `kind_ok` keeps the metric from validating.
        let mut kind_ok = true;
        let kind = match (&r.builtin, &r.query) {
            (Some(b), Some(q)) => {
                self.err(
                    q,
                    format!(
                        "expected either builtin or query, found both (builtin {})",
                        quoted(&b.value)
                    ),
                );
                None
            }
            (None, None) => {
                self.missing(
                    m.pos,
                    &format!("{}.builtin", m.path),
                    "builtin (error_rate, latency, accuracy) or query",
                );
                None
            }
            (Some(b), None) => match b.value.as_str() {
                "error_rate" => Some(MetricKind::ErrorRate),
                "accuracy" => Some(MetricKind::Accuracy),
                "latency" => {
                    let quantile = match r.quantile.as_ref().map(|q| (q, fraction(&q.value))) {
                        None => 0.99,
                        Some((_, Some(v))) if v > 0.0 && v < 1.0 => v,
                        Some((q, _)) => {
                            self.err(
                                q,
                                format!(
                                    "expected a quantile between 0 and 1, like 0.99 or 99%, found {}",
                                    found(&q.value)
                                ),
                            );
                            kind_ok = false;
                            0.99
                        }
                    };
                    Some(MetricKind::Latency { quantile })
                }
                other => {
                    let hint = did_you_mean(other, &["error_rate", "latency", "accuracy"]);
                    self.err(
                        b,
                        format!(
                            "expected error_rate, latency or accuracy, found {}{hint}",
                            quoted(other)
                        ),
                    );
                    None
                }
            },
            (None, Some(q)) => {
                kind_ok = self.template(q);
                Some(MetricKind::Query {
                    template: q.value.trim().to_owned(),
                })
            }
        };
        if let (Some(q), Some(k)) = (&r.quantile, &kind)
            && !matches!(k, MetricKind::Latency { .. })
        {
            self.err(
                q,
                format!(
                    "expected no quantile on {} metric (quantile is for latency), found {}",
                    article(k.label()),
                    found(&q.value)
                ),
            );
        }
        let min_samples = match &r.min_samples {
            None => match kind {
                Some(MetricKind::Query { .. }) => 0,
                _ => 100,
            },
            // A raw query answers one number per version, not a count of events, so any
            // minimum above one could never be met and the metric would never be judged.
            Some(s) if matches!(kind, Some(MetricKind::Query { .. })) => {
                self.err(
                    s,
                    format!(
                        "expected no min_samples on a query metric (a query's value carries no \
                         event count; guard the query itself, e.g. with `and sum(...) > 100`), \
                         found {}",
                        s.value
                    ),
                );
                0
            }
            Some(s) if s.value >= 0 => s.value as u64,
            Some(s) => {
                self.err(
                    s,
                    format!("expected a whole number of at least 0, found {}", s.value),
                );
                0
            }
        };
        let kind = kind?;
        let bounds = self.bounds(r, m, &kind);
        if !kind_ok {
            return None;
        }
        Some(MetricSpec {
            name: name?.value.clone(),
            kind,
            bounds: bounds?,
            min_samples,
            critical: r.critical.as_ref().is_some_and(|c| c.value),
        })
    }

    /// Checks a raw PromQL template's `{{...}}` variables.
    fn template(&mut self, q: &At<String>) -> bool {
        let text = &q.value;
        let mut rest = text.as_str();
        let mut ok = true;
        let mut has_version = false;
        while let Some(start) = rest.find("{{") {
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                self.err(
                    q,
                    "expected `}}` closing a template variable, found an unclosed `{{`".into(),
                );
                return false;
            };
            let var = after[..end].trim();
            match var {
                "version" => has_version = true,
                "model" | "window" => {}
                other => {
                    self.err(q, format!("expected template variables {{{{version}}}}, {{{{model}}}} or {{{{window}}}}, found {{{{{}}}}}", crate::text::cut(other)));
                    ok = false;
                }
            }
            rest = &after[end + 2..];
        }
        if text.trim().is_empty() {
            self.err(q, "expected a PromQL query, found empty text".into());
            return false;
        }
        if !has_version {
            self.err(
                q,
                "expected the query to select a version with {{version}}, found none".into(),
            );
            ok = false;
        }
        ok
    }

    fn bounds(&mut self, r: &RawMetric, m: &At<RawMetric>, kind: &MetricKind) -> Option<Bounds> {
        let unit = kind.unit();
        let mut ok = true;
        let mut abs = |v: &mut Self, b: &Option<At<Scalar>>| -> Option<Bound> {
            let at = b.as_ref()?;
            match absolute(&at.value, unit) {
                Ok(value) => Some(Bound {
                    value,
                    written: show(&at.value),
                }),
                Err(msg) => {
                    v.err(at, msg);
                    ok = false;
                    None
                }
            }
        };
        let max = abs(self, &r.max);
        let min = abs(self, &r.min);
        let mut tol = |v: &mut Self, b: &Option<At<Scalar>>, decrease: bool| -> Option<Tolerance> {
            let at = b.as_ref()?;
            match tolerance(&at.value, unit, decrease) {
                Ok(t) => Some(t),
                Err(msg) => {
                    v.err(at, msg);
                    ok = false;
                    None
                }
            }
        };
        let max_increase = tol(self, &r.max_increase, false);
        let max_decrease = tol(self, &r.max_decrease, true);
        // Direction: for an error rate or a latency only going up hurts; for accuracy only down.
        let direction = |v: &mut Self, b: &Option<At<Scalar>>, field: &str, better: &str| {
            if let Some(at) = b {
                v.err(
                    at,
                    format!(
                        "expected no {field} on {} metric, where {better} is better, found {}; \
                         bound it in the other direction",
                        article(kind.label()),
                        found(&at.value)
                    ),
                );
            }
        };
        match kind {
            MetricKind::ErrorRate | MetricKind::Latency { .. } => {
                direction(self, &r.max_decrease, "max_decrease", "lower");
                direction(self, &r.min, "min", "lower");
            }
            MetricKind::Accuracy => {
                direction(self, &r.max_increase, "max_increase", "higher");
                direction(self, &r.max, "max", "higher");
            }
            MetricKind::Query { .. } => {}
        }
        if let (Some(lo), Some(hi), Some(at)) = (&min, &max, &r.min)
            && lo.value > hi.value
        {
            self.err(
                at,
                format!(
                    "expected min at most max ({}), found {}",
                    hi.written, lo.written
                ),
            );
            ok = false;
        }
        if r.max.is_none()
            && r.min.is_none()
            && r.max_increase.is_none()
            && r.max_decrease.is_none()
        {
            self.problems.push(Problem {
                pos: m.pos,
                path: m.path.clone(),
                message: "expected at least one bound (max, min, max_increase or max_decrease), \
                          found none"
                    .into(),
            });
            ok = false;
        }
        ok.then_some(Bounds {
            min,
            max,
            max_increase,
            max_decrease,
        })
    }

    fn router(
        &mut self,
        raw: &RawPolicy,
        stable: Option<&At<String>>,
        canary: Option<&At<String>>,
        name: Option<&At<String>>,
    ) -> Option<RouterConfig> {
        let r = self.required(
            &raw.router,
            self.doc_pos,
            "router",
            "one of haproxy, nginx, webhook, file",
        )?;
        let v = &r.value;
        let count = [
            v.haproxy.is_some(),
            v.nginx.is_some(),
            v.webhook.is_some(),
            v.file.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if count != 1 {
            let found: Vec<&str> = [
                ("haproxy", v.haproxy.is_some()),
                ("nginx", v.nginx.is_some()),
                ("webhook", v.webhook.is_some()),
                ("file", v.file.is_some()),
            ]
            .iter()
            .filter(|(_, set)| *set)
            .map(|(k, _)| *k)
            .collect();
            let found = if found.is_empty() {
                "none".to_owned()
            } else {
                format!("{count}: {}", found.join(" and "))
            };
            self.err(
                r,
                format!("expected exactly one of haproxy, nginx, webhook, file, found {found}"),
            );
            return None;
        }
        let versions: Vec<&At<String>> = [stable, canary].into_iter().flatten().collect();
        if let Some(h) = &v.haproxy {
            let p = &h.path;
            let socket = self.required(
                &h.value.socket,
                h.pos,
                &format!("{p}.socket"),
                "the runtime API socket path or host:port",
            );
            let backend = self.required(
                &h.value.backend,
                h.pos,
                &format!("{p}.backend"),
                "the backend's name",
            );
            if self.not_blank(socket, "a socket path or host:port")
                && let Some(sock) = socket
                && crate::router::haproxy::Endpoint::parse(&sock.value).is_err()
            {
                self.err(
                    sock,
                    format!(
                        "expected tcp://host:port or a socket path, found {}",
                        quoted(&sock.value)
                    ),
                );
            }
            if self.not_blank(backend, "a backend name")
                && let Some(b) = backend
                && crate::router::haproxy::unusable_name(&b.value)
            {
                self.err(
                    b,
                    format!(
                        "expected a backend name without spaces, / or ;, found {}",
                        quoted(&b.value)
                    ),
                );
            }
            let servers = self.servers(
                &h.value.servers,
                h,
                &versions,
                ServerKind {
                    what: "HAProxy server names",
                    usable: "a server name without spaces, / or ;",
                    unusable: crate::router::haproxy::unusable_name,
                },
            );
            return Some(RouterConfig::Haproxy {
                socket: socket?.value.clone(),
                backend: backend?.value.clone(),
                servers: servers?,
            });
        }
        if let Some(g) = &v.nginx {
            let p = &g.path;
            let file = self.required(
                &g.value.weights_file,
                g.pos,
                &format!("{p}.weights_file"),
                "the path of the upstream include file",
            );
            let reload = self.required(
                &g.value.reload,
                g.pos,
                &format!("{p}.reload"),
                "the reload command, like [nginx, -s, reload]",
            );
            if let Some(rl) = reload
                && rl.value.is_empty()
            {
                self.err(
                    rl,
                    "expected a command and its arguments, found an empty list".into(),
                );
            }
            self.not_blank(file, "a file path");
            let servers = self.servers(
                &g.value.servers,
                g,
                &versions,
                ServerKind {
                    what: "host:port addresses",
                    usable: "a host:port address without spaces or any of ;{}#'\"\\$",
                    unusable: crate::router::nginx::unusable_token,
                },
            );
            let upstream = match &g.value.upstream {
                Some(u) => {
                    if crate::router::nginx::unusable_token(&u.value) {
                        self.err(
                            u,
                            format!(
                                "expected an upstream name without spaces or any of ;{{}}#'\"\\$, \
                                 found {}",
                                quoted(&u.value)
                            ),
                        );
                    }
                    u.value.clone()
                }
                None => name.map(|n| n.value.clone()).unwrap_or_default(),
            };
            return Some(RouterConfig::Nginx {
                weights_file: PathBuf::from(&file?.value),
                reload: reload?.value.iter().map(|a| a.value.clone()).collect(),
                upstream,
                servers: servers?,
            });
        }
        if let Some(wh) = &v.webhook {
            let url = self.required(
                &wh.value.url,
                wh.pos,
                &format!("{}.url", wh.path),
                "the router's URL",
            );
            if let Some(u) = url {
                self.url(u);
                self.no_credentials(u, WEBHOOK_SECRET);
            }
            let timeout = self.timeout(&wh.value.timeout, Duration::from_secs(5));
            return Some(RouterConfig::Webhook {
                url: url?.value.clone(),
                timeout,
            });
        }
        let f = v.file.as_ref()?;
        let path = self.required(
            &f.value.path,
            f.pos,
            &format!("{}.path", f.path),
            "the weights file's path",
        )?;
        if !self.not_blank(Some(path), "a file path") {
            return None;
        }
        Some(RouterConfig::File {
            path: PathBuf::from(&path.value),
        })
    }

    /// Reports a value that is empty or only spaces; true when it is not.
    fn not_blank(&mut self, at: Option<&At<String>>, what: &str) -> bool {
        match at {
            Some(at) if at.value.trim().is_empty() => {
                self.err(at, format!("expected {what}, found an empty string"));
                false
            }
            _ => true,
        }
    }

    fn servers<T>(
        &mut self,
        servers: &Option<At<BTreeMap<String, At<String>>>>,
        parent: &At<T>,
        versions: &[&At<String>],
        kind: ServerKind,
    ) -> Option<BTreeMap<String, String>> {
        let what = kind.what;
        let path = format!("{}.servers", parent.path);
        let s = self.required(
            servers,
            parent.pos,
            &path,
            &format!("a mapping of version to {what}"),
        )?;
        let mut ok = true;
        let present: Vec<String> = s.value.keys().map(|k| quoted(k)).collect();
        let present = if present.is_empty() {
            "no entries".to_owned()
        } else {
            format!("entries for {} only", present.join(", "))
        };
        for v in versions {
            if !s.value.contains_key(&v.value) {
                self.err(
                    s,
                    format!(
                        "expected an entry for version {}, found {present}",
                        quoted(&v.value)
                    ),
                );
                ok = false;
            }
        }
        // One server cannot carry two versions' weights, and a read could not tell them apart.
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for (version, server) in &s.value {
            if (kind.unusable)(&server.value) {
                self.err(
                    server,
                    format!("expected {}, found {}", kind.usable, quoted(&server.value)),
                );
                ok = false;
            } else if let Some(other) = seen.insert(&server.value, version) {
                self.err(
                    server,
                    format!(
                        "expected a server of its own for version {}, found {}, which \
                         version {} uses too",
                        quoted(version),
                        quoted(&server.value),
                        quoted(other)
                    ),
                );
                ok = false;
            }
        }
        ok.then(|| {
            s.value
                .iter()
                .map(|(k, v)| (k.clone(), v.value.clone()))
                .collect()
        })
    }

    fn webhooks(&mut self, raw: &RawPolicy) -> Vec<Webhook> {
        let mut out = Vec::new();
        let Some(list) = &raw.webhooks else {
            return out;
        };
        for h in &list.value {
            let on = self.required(
                &h.value.on,
                h.pos,
                &format!("{}.on", h.path),
                "an event, like rollback or confirm-promotion",
            );
            let event = on.and_then(|o| {
                let e = WebhookEvent::ALL
                    .iter()
                    .find(|(n, _)| *n == o.value)
                    .map(|(_, e)| *e);
                if e.is_none() {
                    let names: Vec<&str> = WebhookEvent::ALL.iter().map(|(n, _)| *n).collect();
                    let hint = did_you_mean(&o.value, &names);
                    self.err(
                        o,
                        format!(
                            "expected one of {}, found {}{hint}",
                            names.join(", "),
                            quoted(&o.value)
                        ),
                    );
                }
                e
            });
            let url = self.required(
                &h.value.url,
                h.pos,
                &format!("{}.url", h.path),
                "the URL to POST to",
            );
            if let Some(u) = url {
                self.url(u);
                self.no_credentials(u, WEBHOOK_SECRET);
            }
            let timeout = self.timeout(&h.value.timeout, Duration::from_secs(10));
            if let (Some(on), Some(url)) = (event, url) {
                out.push(Webhook {
                    on,
                    url: url.value.clone(),
                    timeout,
                });
            }
        }
        out
    }

    fn series(&mut self, raw: &RawPolicy) -> Convention {
        let mut c = Convention::default();
        let Some(s) = &raw.series else { return c };
        for (key, at) in &s.value {
            let (slot, kind) = match key.as_str() {
                "requests" => (&mut c.requests, SeriesName::Metric),
                "duration" => (&mut c.duration, SeriesName::Metric),
                "scored" => (&mut c.scored, SeriesName::Metric),
                "model_label" => (&mut c.model_label, SeriesName::Label),
                "version_label" => (&mut c.version_label, SeriesName::Label),
                "outcome_label" => (&mut c.outcome_label, SeriesName::Label),
                "correct_label" => (&mut c.correct_label, SeriesName::Label),
                "error_value" => (&mut c.error_value, SeriesName::LabelValue),
                _ => (&mut c.correct_value, SeriesName::LabelValue),
            };
            let v = &at.value;
            match kind {
                SeriesName::Metric if !is_metric_name(v) => {
                    self.err(
                        at,
                        format!(
                            "expected a Prometheus metric name of [a-zA-Z_:][a-zA-Z0-9_:]*, found {}", quoted(v)
                        ),
                    );
                    continue;
                }
                SeriesName::Label if v.starts_with("__") => {
                    self.err(
                        at,
                        format!(
                            "expected a label name of the model server's series, found {} (names that begin with \"__\" are Prometheus's own)", quoted(v)
                        ),
                    );
                    continue;
                }
                SeriesName::Label if !is_label_name(v) => {
                    self.err(
                        at,
                        format!(
                            "expected a Prometheus label name of [a-zA-Z_][a-zA-Z0-9_]* (colons are for metric names only), found {}", quoted(v)
                        ),
                    );
                    continue;
                }
                SeriesName::LabelValue => self.label_value(at),
                _ => {}
            }
            *slot = v.clone();
        }
        c
    }
}

/// What a `series` entry names, which decides the characters it may have.
enum SeriesName {
    Metric,
    Label,
    LabelValue,
}

/// Prometheus's metric-name syntax, `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn is_metric_name(s: &str) -> bool {
    prometheus_name(s, true)
}

/// Prometheus's label-name syntax, `[a-zA-Z_][a-zA-Z0-9_]*`: colons are reserved for
/// recording rules' metric names, and a selector with one in a label name does not parse.
fn is_label_name(s: &str) -> bool {
    prometheus_name(s, false)
}

fn prometheus_name(s: &str, colons: bool) -> bool {
    let ok = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || (colons && ch == ':');
    !s.is_empty() && s.chars().all(ok) && !s.starts_with(|ch: char| ch.is_ascii_digit())
}

/// ` (did you mean "x"?)` when a misspelt value is close to one of the allowed ones.
fn did_you_mean(found: &str, allowed: &[&str]) -> String {
    raw::closest(found, allowed)
        .map(|c| format!(" (did you mean {c:?}?)"))
        .unwrap_or_default()
}

/// "an error_rate", "a latency": the builtin's name with its article.
fn article(label: &str) -> String {
    let vowel = label.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {label}", if vowel { "an" } else { "a" })
}

/// A scalar as the `found` of a message: text quoted, numbers as they are.
fn found(s: &Scalar) -> String {
    match s {
        Scalar::Num(n) => format!("{n}"),
        Scalar::Text(t) => quoted(t),
    }
}

/// A scalar shown back the way the user wrote it.
fn show(s: &Scalar) -> String {
    match s {
        Scalar::Num(n) => format!("{n}"),
        Scalar::Text(t) => t.clone(),
    }
}

/// What a bound's text says.
enum Amount {
    Number(f64),
    Percent(f64),
    Points(f64),
    Seconds(f64),
}

fn amount(s: &Scalar) -> Option<Amount> {
    match s {
        Scalar::Num(n) => Some(Amount::Number(*n)),
        Scalar::Text(t) => {
            let t = t.trim();
            if let Some(p) = t.strip_suffix("pp") {
                return p.trim().parse().ok().map(Amount::Points);
            }
            if let Some(p) = t.strip_suffix('%') {
                return p.trim().parse().ok().map(Amount::Percent);
            }
            if let Ok(n) = t.parse::<f64>() {
                return Some(Amount::Number(n));
            }
            parse_duration(t).map(|d| Amount::Seconds(d.as_secs_f64()))
        }
    }
}

/// A bare number on a latency is in seconds; from this many on it was almost surely meant in
/// milliseconds (`max: 250`), and a unit must say so.
const BARE_SECONDS_SLIP: f64 = 10.0;

fn bare_seconds(expected: &str, found: &str, n: f64) -> String {
    format!(
        "expected {expected} (a bare number on latency is in seconds: this would be {n} s), \
         found {found}"
    )
}

fn absolute(s: &Scalar, unit: Unit) -> Result<f64, String> {
    let found = found(s);
    let value = match (amount(s), unit) {
        (None, Unit::Seconds) => {
            return Err(format!("expected a duration like 250ms, found {found}"));
        }
        (None, _) => {
            return Err(format!(
                "expected a number or a percentage like 1%, found {found}"
            ));
        }
        (Some(Amount::Points(_)), _) => {
            return Err(format!(
                "expected an absolute bound (pp is for max_increase/max_decrease), found {found}"
            ));
        }
        (Some(Amount::Seconds(_)), Unit::Ratio) => {
            return Err(format!(
                "expected a rate like 1% or 0.01 (a duration makes no sense for a rate), found {found}"
            ));
        }
        (Some(Amount::Percent(_)), Unit::Seconds) => {
            return Err(format!(
                "expected a duration like 250ms (a percentage makes no sense for latency), found {found}"
            ));
        }
        (Some(Amount::Number(n)), Unit::Seconds) if n >= BARE_SECONDS_SLIP => {
            return Err(bare_seconds("a duration like 250ms or 30s", &found, n));
        }
        (Some(Amount::Seconds(v)), _) => v,
        (Some(Amount::Percent(p)), _) => p / 100.0,
        (Some(Amount::Number(n)), _) => n,
    };
    if !value.is_finite() {
        return Err(format!("expected a finite number, found {found}"));
    }
    match unit {
        Unit::Ratio if !(0.0..=1.0).contains(&value) => {
            Err(format!("expected a rate from 0% to 100%, found {found}"))
        }
        Unit::Seconds if value <= 0.0 => {
            Err(format!("expected a duration above zero, found {found}"))
        }
        _ => Ok(value),
    }
}

fn tolerance(s: &Scalar, unit: Unit, decrease: bool) -> Result<Tolerance, String> {
    let found = found(s);
    let (kind, amount) = match (amount(s), unit) {
        (None, _) => {
            return Err(format!(
                "expected a relative bound like 10%, {} found {found}",
                if unit == Unit::Seconds {
                    "or a duration like 20ms,"
                } else {
                    "or points like 0.5pp,"
                }
            ));
        }
        (Some(Amount::Percent(p)), _) => (ToleranceKind::Relative, p / 100.0),
        (Some(Amount::Points(_)), Unit::Seconds) => {
            return Err(format!(
                "expected 10% or a duration like 20ms (percentage points make no sense for latency), found {found}"
            ));
        }
        (Some(Amount::Points(p)), _) => (ToleranceKind::Absolute, p / 100.0),
        (Some(Amount::Seconds(_)), Unit::Ratio) => {
            return Err(format!(
                "expected 10% or 0.5pp (a duration makes no sense for a rate), found {found}"
            ));
        }
        (Some(Amount::Number(n)), Unit::Seconds) if n >= BARE_SECONDS_SLIP => {
            return Err(bare_seconds(
                "a relative bound like 10% or a duration like 20ms",
                &found,
                n,
            ));
        }
        (Some(Amount::Seconds(v)), _) => (ToleranceKind::Absolute, v),
        (Some(Amount::Number(n)), _) => (ToleranceKind::Absolute, n),
    };
    if !amount.is_finite() || amount < 0.0 {
        return Err(format!(
            "expected a tolerance of at least zero, found {found}"
        ));
    }
    if decrease && kind == ToleranceKind::Relative && amount >= 1.0 {
        return Err(format!(
            "expected a relative decrease below 100%, found {found}"
        ));
    }
    if unit == Unit::Ratio && kind == ToleranceKind::Absolute && amount > 1.0 {
        // A bare number on a rate is a difference in its own units: `10` is +1000pp, and
        // `10%` was probably meant.
        return Err(format!(
            "expected at most 100pp (a bare number is a difference of the rate itself: 0.005 \
             is 0.5pp; for a relative tolerance write 10%), found {found}"
        ));
    }
    Ok(Tolerance {
        kind,
        amount,
        written: show(s),
    })
}

/// A number written as a fraction (`0.95`) or a percentage (`95%`).
fn fraction(v: &Scalar) -> Option<f64> {
    match v {
        Scalar::Num(n) => Some(*n),
        Scalar::Text(t) => t
            .trim()
            .strip_suffix('%')
            .and_then(|p| p.trim().parse::<f64>().ok())
            .map(|p| p / 100.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid policy whose last line opens the `series` section; its entries are on line 13.
    const BASE: &str = "name: demo
stable: v1
canary: v2
strategy:
  steps: [10, 50]
  interval: 30s
  min_step_duration: 1m
metrics:
  - {name: errors, builtin: error_rate, max: 1%}
router:
  file: {path: /dev/null}
series:
";

    #[test]
    fn steps_may_carry_their_percent_sign() {
        let text = BASE
            .replace("steps: [10, 50]", "steps: [10%, 25 %, 50]")
            .replace("series:\n", "");
        let p = load_str("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.strategy.kind,
            StrategyKind::Canary {
                steps: vec![10.0, 25.0, 50.0]
            }
        );
        // A percent sign does not make a word a number.
        let e = load_str("p.yaml", &text.replace("10%", "ten%")).expect_err("not a number");
        assert!(e.to_string().contains("steps[0]: expected a number"), "{e}");
    }

    fn with_series(key: &str, value: &str) -> Result<Policy, PolicyError> {
        load_str("p.yaml", &format!("{BASE}  {key}: '{value}'\n"))
    }

    fn field<'a>(c: &'a Convention, key: &str) -> &'a str {
        match key {
            "requests" => &c.requests,
            "duration" => &c.duration,
            "scored" => &c.scored,
            "model_label" => &c.model_label,
            "version_label" => &c.version_label,
            "outcome_label" => &c.outcome_label,
            "correct_label" => &c.correct_label,
            "error_value" => &c.error_value,
            "correct_value" => &c.correct_value,
            other => panic!("no series key {other}"),
        }
    }

    #[test]
    fn series_names_that_prometheus_accepts_are_taken() {
        let cases = [
            ("requests", "http_requests_total"),
            ("requests", "job:http_requests:rate5m"),
            ("duration", "_private_seconds"),
            ("scored", ":leading_colon"),
            ("model_label", "_model"),
            ("version_label", "release"),
            ("outcome_label", "code2"),
            ("correct_label", "Correct"),
            ("error_value", "5xx"),
            ("correct_value", "a:b c"),
        ];
        for (key, value) in cases {
            match with_series(key, value) {
                Ok(p) => assert_eq!(field(&p.convention, key), value, "{key}: {value:?}"),
                Err(e) => panic!("{key}: {value:?} was rejected: {e}"),
            }
        }
    }

    #[test]
    fn series_names_that_prometheus_rejects_are_reported_where_they_are() {
        const LABEL: &str = "expected a Prometheus label name of [a-zA-Z_][a-zA-Z0-9_]* (colons are for metric names only)";
        const METRIC: &str = "expected a Prometheus metric name of [a-zA-Z_:][a-zA-Z0-9_:]*";
        let cases = [
            ("version_label", "app:version", LABEL),
            ("model_label", ":model", LABEL),
            ("outcome_label", "1outcome", LABEL),
            ("correct_label", "is-correct", LABEL),
            ("version_label", "versión", LABEL),
            ("model_label", "", LABEL),
            ("requests", "http-requests-total", METRIC),
            ("duration", "9_seconds", METRIC),
            ("scored", "scored total", METRIC),
            ("requests", "", METRIC),
        ];
        for (key, value, expected) in cases {
            let err = match with_series(key, value) {
                Ok(_) => panic!("{key}: {value:?} was accepted"),
                Err(e) => e,
            };
            let want = Problem {
                // The value, after two spaces of indentation, the key and ": ".
                pos: Pos {
                    line: 13,
                    column: 3 + key.len() as u64 + 2,
                },
                path: format!("series.{key}"),
                message: format!("{expected}, found {value:?}"),
            };
            assert_eq!(err.problems, [want], "{key}: {value:?}");
        }
    }

    /// `BASE` without its `series:` line, with a `prometheus` section, in `dir/p.yaml`.
    fn with_prometheus(dir: &Path, section: &str) -> Result<Policy, PolicyError> {
        let text = BASE.replace("series:\n", &format!("prometheus:\n{section}"));
        let file = dir.join("p.yaml");
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("{e}"));
        load_file(&file)
    }

    fn auth(p: &Policy) -> &PrometheusAuth {
        match p.prometheus.as_ref().and_then(|c| c.auth.as_ref()) {
            Some(a) => a,
            None => panic!("no credentials in {p:?}"),
        }
    }

    #[test]
    fn credentials_files_are_read_from_the_policy_files_directory() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let d = dir.path();
        std::fs::create_dir(d.join("secrets")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.join("secrets/token"), "tok-1\r\n").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.join("password"), " pass word ").unwrap_or_else(|e| panic!("{e}"));

        let p = with_prometheus(
            d,
            "  url: http://prom:9090/\n  bearer_token_file: secrets/token\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.prometheus.as_ref().map(|c| c.url.as_str()),
            Some("http://prom:9090")
        );
        // A CRLF line end is not part of the token.
        assert_eq!(
            auth(&p),
            &PrometheusAuth::Bearer {
                token_file: d.join("secrets/token"),
                token: Secret::new("tok-1".into()),
            }
        );

        // An absolute path is taken as it is; spaces inside a password are the password's.
        let absolute = d.join("password");
        let p = with_prometheus(
            d,
            &format!(
                "  url: http://prom:9090\n  basic_auth: {{username: ops, password_file: '{}'}}\n",
                absolute.display()
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            auth(&p),
            &PrometheusAuth::Basic {
                username: "ops".into(),
                password_file: absolute,
                password: Secret::new(" pass word ".into()),
            }
        );
        assert!(!format!("{p:?}").contains("pass word"));

        // Without credentials there are none.
        let p = with_prometheus(d, "  url: http://prom:9090\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.prometheus.and_then(|c| c.auth), None);
    }

    #[test]
    fn secrets_are_never_printed_nor_serialised() {
        let a = PrometheusAuth::Basic {
            username: "ops".into(),
            password_file: PathBuf::from("/etc/pw"),
            password: Secret::new("hunter2".into()),
        };
        let json = serde_json::to_string(&a).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            json,
            r#"{"kind":"basic","username":"ops","password_file":"/etc/pw"}"#
        );
        assert!(!format!("{a:?}").contains("hunter2"));
        assert_eq!(format!("{:?}", Secret::new("x".into())), "<redacted>");
    }

    #[test]
    fn a_missing_credentials_file_names_the_field_and_the_path() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let err = match with_prometheus(
            dir.path(),
            "  url: http://prom:9090\n  bearer_token_file: gone.token\n",
        ) {
            Ok(p) => panic!("validated: {p:?}"),
            Err(e) => e,
        };
        let file = dir.path().join("p.yaml");
        assert_eq!(
            err.to_string(),
            format!(
                "{}:14:22: prometheus.bearer_token_file: expected a readable file holding the \
                 bearer token, but cannot read {}: No such file or directory (os error 2)",
                file.display(),
                dir.path().join("gone.token").display()
            )
        );
    }

    #[test]
    fn a_bad_label_name_reads_as_file_line_column_field_and_message() {
        let err = with_series("version_label", "app:version").unwrap_err();
        assert_eq!(
            err.to_string(),
            "p.yaml:13:18: series.version_label: expected a Prometheus label name of \
             [a-zA-Z_][a-zA-Z0-9_]* (colons are for metric names only), found \"app:version\""
        );
    }
}
