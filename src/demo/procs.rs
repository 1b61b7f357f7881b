//! Real servers the demo (and the end-to-end tests) start on loopback: Prometheus and HAProxy,
//! as child processes that die with the handle.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::{Child, Command};

/// Where Debian puts a server binary; `None` if it is not installed.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/bin"])
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

/// The binaries the demo needs, or a message saying exactly what to install.
pub fn require(names: &[(&str, &str)]) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for (bin, package) in names {
        match find_binary(bin) {
            Some(p) => found.push(p),
            None => missing.push(*package),
        }
    }
    if !missing.is_empty() {
        missing.dedup();
        bail!(
            "{} not installed; install with:\n    sudo apt-get install -y --no-install-recommends {}",
            missing.join(" and "),
            missing.join(" ")
        );
    }
    Ok(found)
}

/// A child process killed when dropped.
pub struct Server {
    pub name: &'static str,
    child: Child,
}

impl Server {
    /// Stops the process and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> anyhow::Result<Server> {
    let out =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdout(out)
        .stderr(err)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Server { name, child })
}

/// Waits until `url` answers 2xx, or fails naming the server and its log.
pub async fn wait_http(name: &str, url: &str, log: &Path, limit: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .user_agent(crate::USER_AGENT)
        .build()?;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            bail!(
                "{name} did not become ready at {url} within {limit:?}; last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts Prometheus with `config` (a path; rule files resolve relative to it), storing data
/// under `dir`, listening on 127.0.0.1:`port`.
pub async fn prometheus(config: &Path, dir: &Path, port: u16) -> anyhow::Result<Server> {
    let bin = require(&[("prometheus", "prometheus")])?.remove(0);
    let log = dir.join("prometheus.log");
    let data = dir.join("prometheus-data");
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--web.enable-lifecycle");
    let server = spawn("prometheus", &mut cmd, &log)?;
    wait_http(
        "prometheus",
        &format!("http://127.0.0.1:{port}/-/ready"),
        &log,
        Duration::from_secs(30),
    )
    .await?;
    Ok(server)
}

/// An HAProxy backend server: its name and address.
pub struct Backend<'a> {
    pub name: &'a str,
    pub addr: &'a str,
    /// Initial weight (HAProxy scale 0..256).
    pub weight: u32,
}

/// Starts HAProxy: a frontend on 127.0.0.1:`port` balancing over `servers` in backend
/// `backend`, and an admin runtime socket at `dir/admin.sock`.
pub async fn haproxy(
    dir: &Path,
    port: u16,
    backend: &str,
    servers: &[Backend<'_>],
) -> anyhow::Result<(Server, PathBuf)> {
    let bin = require(&[("haproxy", "haproxy")])?.remove(0);
    let socket = dir.join("admin.sock");
    let mut cfg = format!(
        "global\n    stats socket {} mode 600 level admin\n    log stderr local0 warning\n\n\
         defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\n\
         frontend models\n    bind 127.0.0.1:{port}\n    default_backend {backend}\n\n\
         backend {backend}\n    balance random\n",
        socket.display()
    );
    for s in servers {
        cfg.push_str(&format!(
            "    server {} {} weight {}\n",
            s.name, s.addr, s.weight
        ));
    }
    let conf = dir.join("haproxy.cfg");
    std::fs::write(&conf, cfg).with_context(|| format!("cannot write {}", conf.display()))?;
    let log = dir.join("haproxy.log");
    let mut cmd = Command::new(bin);
    cmd.arg("-db").arg("-f").arg(&conf);
    let mut server = spawn("haproxy", &mut cmd, &log)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists()
        || tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    {
        if !server.running() || tokio::time::Instant::now() >= deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("haproxy did not start; its log:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((server, socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_server_says_what_to_install() {
        let err = require(&[("canaryd-no-such-binary", "prometheus"), ("sh", "dash")])
            .expect_err("missing binary");
        let msg = err.to_string();
        assert!(msg.contains("prometheus not installed"), "{msg}");
        assert!(
            msg.contains("apt-get install -y --no-install-recommends prometheus"),
            "{msg}"
        );
        assert!(
            !msg.contains("dash"),
            "present binaries are not listed: {msg}"
        );
    }
}
