//! The event loops that run connections: one single-threaded tokio runtime
//! per worker thread, the way nginx runs one event loop per worker process.
//!
//! The accept loop runs on the control runtime (with signals, reloads and
//! the registry) and hands each accepted socket to the least busy worker,
//! where it stays for its whole life: its HTTP handshake, its session and
//! every wake-up of it happen on that one thread.
//!
//! Why not tokio's work-stealing runtime: with it, a message's wake-up often
//! lands on the other thread, and idle workers are woken to look for work to
//! steal. On the 32-byte echo benchmark those cross-thread wake-ups (futex,
//! eventfd, scheduler switches) cost more than everything wshd itself does
//! per message; measured on this machine, a single-threaded runtime spends
//! 1.2–1.5× less CPU per message than a two-thread work-stealing one. The
//! trade-off is nginx's: a handler that blocks its callback stalls the other
//! connections of its worker, not just its own. Handlers that block must say
//! so (`WSHD_HANDLER_MAY_BLOCK`), and then run on the blocking pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The worker threads and their runtimes.
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    /// Connections assigned to this worker and not finished yet.
    load: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Counts one connection against its worker until dropped.
#[derive(Debug)]
pub struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Starts `n` worker threads (at least one), named `wshd-worker-<i>`.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut workers = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("wshd-worker-{i}-blocking"))
                .build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("wshd-worker-{i}"))
                .spawn(move || {
                    // A current-thread runtime runs its tasks only inside
                    // block_on: park here until told to stop.
                    let _ = rt.block_on(stopped);
                    // Don't wait for handler threads still sleeping in a
                    // MAY_BLOCK callback: the process is exiting.
                    rt.shutdown_timeout(Duration::from_millis(100));
                })?;
            workers.push(Worker {
                handle,
                load: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Workers { workers })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Picks the worker with the fewest open connections and counts one more
    /// on it. Connections are long-lived, so balancing by what is open now
    /// beats round-robin: a worker whose clients left gets the next ones.
    pub fn assign(&self) -> (&Handle, LoadGuard) {
        let w = self
            .workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
            .expect("at least one worker");
        w.load.fetch_add(1, Ordering::Relaxed);
        (&w.handle, LoadGuard(w.load.clone()))
    }

    /// Stops the event loops and joins their threads. Tasks still running on
    /// them are dropped.
    pub fn stop(&mut self) {
        for w in &mut self.workers {
            if let Some(s) = w.stop.take() {
                let _ = s.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}
