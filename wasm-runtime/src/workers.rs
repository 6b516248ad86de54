//! The threads wasm HTTP requests run on: one single-threaded tokio runtime per core. A
//! connection is given to one of them and stays there with every instance it runs, so a
//! request never waits for a wake-up from another thread; a guest that runs long yields at
//! each epoch tick, so the other requests of its thread go on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;

struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

fn workers() -> &'static Workers {
    static WORKERS: OnceLock<Workers> = OnceLock::new();
    WORKERS.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let handles = (0..n)
            .filter_map(|i| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| tracing::error!(error = %e, "cannot start a wasm worker thread"))
                    .ok()?;
                let handle = rt.handle().clone();
                std::thread::Builder::new()
                    .name(format!("skiff-wasm-{i}"))
                    .spawn(move || rt.block_on(std::future::pending::<()>()))
                    .map_err(|e| tracing::error!(error = %e, "cannot start a wasm worker thread"))
                    .ok()?;
                Some(handle)
            })
            .collect();
        Workers {
            handles,
            next: AtomicUsize::new(0),
        }
    })
}

/// The worker for the next connection (round-robin); the current runtime if none could be
/// started.
pub(crate) fn next() -> Handle {
    let w = workers();
    if w.handles.is_empty() {
        return Handle::current();
    }
    w.handles[w.next.fetch_add(1, Ordering::Relaxed) % w.handles.len()].clone()
}
