//! A JSON file that another system (a sidecar, an Envoy control plane, a script) reads to route
//! traffic: `{rollout, stable, canary, weights: {<version>: percent}, updated_at}`.
//!
//! The file is replaced atomically (a temporary file in the same directory, fsync, rename,
//! fsync of the directory), so a reader sees the old split or the new one, never half a file,
//! and a crash leaves one of the two on disk.
//!
//! A missing file reads as canary weight 0: canaryd has not written a split yet, so whatever
//! reads the file has nothing that sends traffic to the canary. A file that exists but cannot
//! be parsed is an error, not 0, because then the reader's state is unknown.

use super::{BoxFuture, Router, RouterError, Target, WeightsDoc, check_target};
use crate::time::Clock;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes and reads one rollout's weights file.
pub struct FileRouter {
    /// The file other systems read.
    path: PathBuf,
    /// Stamps `updated_at`; injected so tests control it.
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for FileRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileRouter")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl FileRouter {
    pub fn new(path: PathBuf, clock: Arc<dyn Clock>) -> FileRouter {
        FileRouter { path, clock }
    }
}

impl Router for FileRouter {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn apply<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<(), RouterError>> {
        Box::pin(async move {
            check_target(target)?;
            let mut doc = WeightsDoc::for_target(target);
            doc.updated_at = Some(self.clock.now().to_rfc3339().into());
            let mut text = serde_json::to_string_pretty(&doc).map_err(|e| {
                RouterError::Config(format!(
                    "cannot encode the weights for {}: {e}",
                    self.path.display()
                ))
            })?;
            text.push('\n');
            write_atomic(&self.path, text.into_bytes())
                .await
                .map_err(|e| write_error(&self.path, e))
        })
    }

    fn read<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<f64, RouterError>> {
        Box::pin(async move {
            let Some(bytes) = read_if_exists(&self.path)
                .await
                .map_err(|e| read_error(&self.path, e))?
            else {
                return Ok(0.0);
            };
            let doc: WeightsDoc = serde_json::from_slice(&bytes).map_err(|e| {
                RouterError::BadResponse(format!(
                    "weights file {} is not a weights document: {e}",
                    self.path.display()
                ))
            })?;
            if doc.rollout != target.rollout && doc.released() {
                // Another rollout left it with all traffic on its stable (it moved to another
                // router, or rolled back): nothing of it to protect. This rollout's canary
                // gets what the file sends it (nothing, unless it is that stable), and its
                // next apply takes the file over.
                let canary = doc.weights.get(&target.canary).copied().unwrap_or(0.0);
                return Ok(super::canary_share(canary, doc.weights.values()).unwrap_or(0.0));
            }
            doc.canary_share(target, &format!("weights file {}", self.path.display()))
        })
    }
}

/// A missing directory or a permission problem will not go away by retrying: the path is wrong.
pub(crate) fn write_error(path: &Path, e: std::io::Error) -> RouterError {
    let msg = format!("cannot write {}: {e}", path.display());
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
            RouterError::Config(msg)
        }
        _ => RouterError::Unreachable(msg),
    }
}

pub(crate) fn read_error(path: &Path, e: std::io::Error) -> RouterError {
    let msg = format!("cannot read {}: {e}", path.display());
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => RouterError::Config(msg),
        _ => RouterError::Unreachable(msg),
    }
}

/// The file's bytes, or `None` when it does not exist.
pub(crate) async fn read_if_exists(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match tokio::fs::read(path).await {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `bytes` so that readers and crashes see the old file or the new one:
/// write a temporary file next to it (same file system, so the rename is atomic), fsync it,
/// rename it over `path`, fsync the directory so the rename itself survives a crash.
pub(crate) async fn write_atomic(path: &Path, bytes: Vec<u8>) -> std::io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || write_atomic_blocking(&path, &bytes))
        .await
        .map_err(std::io::Error::other)?
}

/// Distinguishes temporary files of concurrent writers in one process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn write_atomic_blocking(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    // A dot file, so that globbing includes like `include canaryd/*.conf` never pick it up.
    let tmp = dir.join(format!(
        ".{}.canaryd-{}-{seq}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The file it replaces keeps its permissions: a reader running as another user (the
        // file router's consumer) must still be able to read it after canaryd's first write.
        match std::fs::metadata(path) {
            Ok(old) => f.set_permissions(old.permissions())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        // The temporary file may or may not exist depending on where the write failed.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes `path` and makes the removal durable; a file that is already gone is fine.
pub(crate) async fn remove_durably(path: &Path) -> std::io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::File::open(dir)?.sync_all()
    })
    .await
    .map_err(std::io::Error::other)?
}
