//! Watches the config file for `pfwd serve`. The file's directory is watched, not the file: an editor that saves by
//! writing a new file and renaming it over the old one, and a Kubernetes ConfigMap update (which swaps the `..data`
//! symlink the file points through), replace the inode a file watch would follow. Every event in the directory is a
//! hint; the agent reads the file and acts only when its text changed.

use std::path::Path;

use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;

use super::Trigger;

/// Starts watching; events are sent as [`Trigger::File`] until the returned watcher is dropped.
pub(super) fn watch(config: &Path, tx: UnboundedSender<Trigger>) -> Result<notify::RecommendedWatcher> {
    let dir = match config.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => ".".into(),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(e) if e.kind.is_access() => {}
        Ok(_) => drop(tx.send(Trigger::File)),
        Err(e) => log::warn!("watching the config file: {e}"),
    })
    .context("creating a file watcher (inotify)")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {} for changes to {}", dir.display(), config.display()))?;
    Ok(watcher)
}
