//! The event loops that run connections: one single-threaded tokio runtime
//! per worker thread, the way nginx runs one event loop per worker process.
//!
//! Every worker accepts from the same listening socket and serves what it
//! accepted on its own thread for the connection's whole life: its HTTP
//! handshake, its session and every wake-up of it. Nothing is handed from
//! one thread to another, so a handshake costs no socket re-registration and
//! no cross-thread wake-up, and a worker stalled by a slow callback simply
//! stops taking new clients while the others go on.
//!
//! Accepting from a shared socket alone balances badly: epoll tends to wake
//! the same waiter, and one worker ends up with most connections. So a
//! worker that holds clearly more connections than the least loaded one
//! ([`Balance::wait_turn`]) stops accepting until the others catch up or
//! its own connections close; nginx's `accept_disabled` does the same.
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
use tokio::sync::{Notify, oneshot};

/// The worker threads and their runtimes.
pub struct Workers {
    workers: Vec<Worker>,
    balance: Arc<Balance>,
}

struct Worker {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Open connections per worker, which decides who accepts next.
#[derive(Debug)]
pub struct Balance {
    loads: Box<[AtomicUsize]>,
    /// Woken whenever a load changes, for workers waiting their turn.
    changed: Notify,
}

/// Counts one connection against its worker until dropped.
#[derive(Debug)]
pub struct LoadGuard {
    balance: Arc<Balance>,
    worker: usize,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.balance.loads[self.worker].fetch_sub(1, Ordering::Relaxed);
        self.balance.changed.notify_waiters();
    }
}

impl Balance {
    /// How far a worker may run ahead of the least loaded one before it
    /// stops accepting: a few connections, or an eighth more. Some slack lets
    /// whichever worker is idle take a burst of clients at once; the bound
    /// keeps long-lived connections spread over all the loops.
    fn slack(min: usize) -> usize {
        4 + min / 8
    }

    fn may_accept(&self, me: usize) -> bool {
        let mine = self.loads[me].load(Ordering::Relaxed);
        let min = self
            .loads
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        mine <= min + Self::slack(min)
    }

    /// Returns once worker `me` may accept the next connection. The least
    /// loaded worker always may, so some worker is always accepting.
    pub async fn wait_turn(&self, me: usize) {
        if self.loads.len() == 1 {
            return;
        }
        loop {
            // Register before checking, so a change between the check and
            // the wait is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.may_accept(me) {
                return;
            }
            changed.await;
        }
    }

    /// Counts one more connection on worker `me` until the guard drops.
    pub fn count(self: &Arc<Self>, me: usize) -> LoadGuard {
        self.loads[me].fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
        LoadGuard {
            balance: self.clone(),
            worker: me,
        }
    }
}

impl Workers {
    /// Starts `n` worker threads (at least one), named `wshd-worker-<i>`.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let n = n.max(1);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
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
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        let balance = Arc::new(Balance {
            loads: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            changed: Notify::new(),
        });
        Ok(Workers { workers, balance })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The runtime of worker `i`.
    pub fn handle(&self, i: usize) -> &Handle {
        &self.workers[i].handle
    }

    /// The connection counts the workers share.
    pub fn balance(&self) -> &Arc<Balance> {
        &self.balance
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

#[cfg(test)]
mod tests {
    use super::*;

    fn balance(n: usize) -> Arc<Balance> {
        Arc::new(Balance {
            loads: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            changed: Notify::new(),
        })
    }

    #[test]
    fn a_worker_far_ahead_stops_accepting_until_the_others_catch_up() {
        let b = balance(2);
        let mut held: Vec<LoadGuard> = (0..4).map(|_| b.count(0)).collect();
        assert!(b.may_accept(0), "within the slack of 4");
        held.push(b.count(0));
        assert!(!b.may_accept(0), "5 ahead of an empty worker");
        assert!(b.may_accept(1), "the least loaded worker always may");
        let other = b.count(1);
        assert!(b.may_accept(0), "caught up to within the slack");
        drop(other);
        assert!(!b.may_accept(0));
        held.pop();
        assert!(
            b.may_accept(0),
            "its own connections closing lets it accept again"
        );
        assert_eq!(b.loads[0].load(Ordering::Relaxed), 4);
    }

    #[test]
    fn the_slack_grows_with_the_load() {
        let b = balance(2);
        let _a: Vec<LoadGuard> = (0..1000).map(|_| b.count(1)).collect();
        let _b: Vec<LoadGuard> = (0..1129).map(|_| b.count(0)).collect();
        assert!(b.may_accept(0), "1129 <= 1000 + 4 + 125");
        let _c = b.count(0);
        assert!(!b.may_accept(0), "1130 > 1129");
    }

    #[tokio::test]
    async fn a_waiting_worker_is_woken_when_its_turn_comes() {
        let b = balance(2);
        let held: Vec<LoadGuard> = (0..5).map(|_| b.count(0)).collect();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.wait_turn(0).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "worker 0 is 5 ahead and must wait");
        let _other = b.count(1);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken by the other worker's new connection")
            .unwrap();
        drop(held);
    }
}
