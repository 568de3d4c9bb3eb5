//! The runtime that serves connections: one tokio work-stealing runtime with
//! `workers` threads (one per core by default), separate from the control
//! runtime that handles signals and reloads (main.rs).
//!
//! Every connection is a task on it: its HTTP handshake, then its session.
//! A task may be polled by any of the worker threads, never by two at once,
//! which is what the ABI promises handlers: callbacks for one connection
//! never overlap, and may come from different threads.
//!
//! Why not one single-threaded event loop per core, the nginx model, with
//! each connection pinned to the loop that accepted it: wshd ran that way
//! until it was measured against this design on the same machine, with the
//! benchmark in `bench/` (bench/README.md has the figures). Pinned loops
//! cost 5–9 % more CPU per message when the server is saturated and 2–40 %
//! more when it is not, for raw tokio-tungstenite and for wshd alike:
//! - Saturated, on a machine whose cores are shared (with a load generator,
//!   or any other busy process), a pinned loop that the kernel preempts
//!   holds up every connection on it, and the other loop runs dry, sleeps and
//!   is woken again. Here an idle thread takes over the ready connections of
//!   a preempted one.
//! - Paced traffic, where messages arrive faster than one thread sleeps and
//!   wakes but slower than it can serve them: each pinned loop sleeps and
//!   wakes for its own share, while here one thread waits on the I/O driver,
//!   serves what is ready, and wakes a second only when there is more work
//!   than it can take.
//!
//! For handlers: a callback that blocks holds a worker thread, and enough of
//! them stall every connection. Handlers that block must say so
//! (`WSHD_F_MAY_BLOCK`) and then run on the blocking pool.

use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The connection runtime and the thread that owns it.
pub struct Workers {
    handle: Handle,
    threads: usize,
    stop: Option<oneshot::Sender<()>>,
    owner: Option<JoinHandle<()>>,
}

impl Workers {
    /// Starts a runtime with `n` worker threads (at least one), named
    /// `wshd-worker`.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let threads = n.max(1);
        // One thread has no one to share work with: tokio's single-threaded
        // scheduler does the same job without the work-stealing bookkeeping,
        // and runs on the owner thread below.
        let mut builder = if threads == 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads);
            b
        };
        let rt = builder.enable_all().thread_name("wshd-worker").build()?;
        let handle = rt.handle().clone();
        rt.spawn(pace_timer_wheel());
        let (stop, stopped) = oneshot::channel::<()>();
        // A runtime cannot be dropped from inside another one (the control
        // runtime calls `stop`), so a plain thread owns it and shuts it down.
        let owner = std::thread::Builder::new()
            .name(
                if threads == 1 {
                    "wshd-worker"
                } else {
                    "wshd-workers"
                }
                .into(),
            )
            .spawn(move || {
                let _ = rt.block_on(stopped);
                // Don't wait for handler threads still sleeping in a
                // MAY_BLOCK callback: the process is exiting.
                rt.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok(Workers {
            handle,
            threads,
            stop: Some(stop),
            owner: Some(owner),
        })
    }

    /// How many worker threads run.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The connection runtime.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Stops the runtime and joins its threads. Tasks still running on it
    /// are dropped.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.owner.take() {
            let _ = t.join();
        }
    }
}

/// How often the timer wheel is visited whatever else is armed.
const WHEEL_PACE: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`WHEEL_PACE`] on the connection runtime, for
/// its whole life.
///
/// Why: every session arms a timer when it starts and re-arms it when it
/// closes. tokio wakes its I/O driver (an `eventfd` write, and a context
/// switch when another worker is parked in `epoll_wait`) whenever a timer
/// is armed earlier than the earliest one the driver last saw, or when the
/// driver last saw none. Short connections hit that on every open and
/// close: two wake-ups per handshake cycle, a quarter of the cycle's CPU in
/// the handshake benchmark (bench/README.md). With this timer always due
/// within a second, sessions' deadlines (seconds away) are later than the
/// driver's next wake and arming them costs no wake-up; the price is one
/// timer firing per second.
async fn pace_timer_wheel() {
    let mut tick = tokio::time::interval(WHEEL_PACE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}
