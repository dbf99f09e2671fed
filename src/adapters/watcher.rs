//! Keeps the registry in sync with the adapters folder: filesystem events (`notify`) trigger a
//! rescan at once, and a periodic rescan catches whatever events miss (network filesystems,
//! overflowed queues). Runs on its own thread, never on the engine's or the HTTP workers'.

use super::registry::{Registry, SETTLE};
use notify::{RecursiveMode, Watcher};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Starts the watcher thread; it lives as long as the process.
pub fn spawn(registry: Arc<Registry>, interval: Duration) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = tx.send(());
        }
    })
    .map_err(std::io::Error::other)?;
    if let Err(e) = watcher.watch(registry.root(), RecursiveMode::Recursive) {
        tracing::warn!(error = %e, "filesystem events unavailable; relying on the periodic rescan");
    }
    std::thread::Builder::new().name("loraplex-adapter-watcher".into()).spawn(move || {
        let _watcher = watcher; // keep it alive with the thread
        loop {
            match rx.recv_timeout(interval) {
                // Let a burst of events (a folder being copied) go quiet before scanning, so
                // that half-copied states do not become versions; a folder written without
                // pause for longer than the cap is scanned anyway.
                Ok(()) => {
                    let cap = std::time::Instant::now() + 20 * SETTLE;
                    while rx.recv_timeout(SETTLE).is_ok() && std::time::Instant::now() < cap {}
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let changed = registry.rescan();
            if !changed.is_empty() {
                tracing::info!(?changed, "adapters folder changed");
            }
        }
    })?;
    Ok(())
}
