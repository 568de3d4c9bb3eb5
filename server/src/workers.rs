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
//!
//! **One blocked worker must not stall the others' connections** (#23).
//! tokio left two ways for it to happen, both closed here:
//! - A task woken from a worker goes to that worker's LIFO slot, which no
//!   other worker may steal: the runtime is built without the slot.
//! - Only a parked worker polls the I/O driver. A worker that wakes from
//!   the driver with a single ready task runs it without waking anyone; if
//!   that task then blocks in a callback, every other worker sleeps on its
//!   condition variable and no one sees new socket events until it returns
//!   (measured: an open `/echo` waited the full 3 s of another route's
//!   sleeping callback). The [`Watchdog`] sees a poll that has lasted a
//!   tick and spawns an empty task from outside the runtime, which wakes a
//!   sleeping worker; that worker takes the free driver and serves the
//!   connections that are ready.

#[cfg(not(tokio_unstable))]
compile_error!(
    "wshd needs `--cfg tokio_unstable` for tokio's `disable_lifo_slot` \
     (see workers.rs). .cargo/config.toml sets it; if you set RUSTFLAGS \
     yourself, add `--cfg tokio_unstable` to it."
);

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// With more than one worker: wakes a sleeping worker while another is
    /// stuck in one poll.
    watchdog: Option<Watchdog>,
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
            // tokio runs a task woken from a worker next on that same worker
            // (its LIFO slot), and no other worker may steal it from there.
            // When the worker then enters a callback that blocks, a ready
            // connection parked in the slot waits for it while the other
            // workers idle: a C handler sleeping 5 s in `on_message` delayed
            // an open `/echo` on another route by 4.8 s (#23). Without the
            // slot, every woken task goes to the stealable local queue and
            // wakes a parked worker to take it. The price, measured in an
            // A/B of release builds (handshake workload, 2 workers, shared
            // cores, 3 rounds): about 5 % more CPU per handshake cycle, the
            // spawn of each new connection now waking the other worker;
            // the 32-byte echo did not get slower. The watchdog below alone
            // covers the driver case but not a task the blocking callback
            // itself woke (a publish or send to another connection, then a
            // slow call), which would sit in the slot until it returns.
            b.disable_lifo_slot();
            b
        };
        let polls = (threads > 1).then(|| PollClock::install(&mut builder, threads));
        let rt = builder.enable_all().thread_name("wshd-worker").build()?;
        let handle = rt.handle().clone();
        let watchdog = match polls {
            Some(polls) => Some(Watchdog::start(polls, handle.clone())?),
            None => None,
        };
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
            watchdog,
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
        if let Some(w) = self.watchdog.take() {
            w.stop();
        }
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

/// How long one poll may run before the [`Watchdog`] wakes another worker:
/// a stuck poll is seen after one to two ticks.
const WATCH_TICK: Duration = Duration::from_millis(20);

/// One counter per worker thread, bumped before and after every task poll:
/// odd while the thread is inside a poll.
struct PollClock {
    slots: Box<[AtomicU64]>,
    next: AtomicUsize,
}

thread_local! {
    /// This thread's slot in its runtime's [`PollClock`] (`usize::MAX`:
    /// not claimed yet).
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

impl PollClock {
    /// Adds the poll hooks to `builder`. Each costs a thread-local read and
    /// an uncontended atomic add on the thread's own cache line per poll.
    fn install(builder: &mut tokio::runtime::Builder, threads: usize) -> Arc<PollClock> {
        let clock = Arc::new(PollClock {
            slots: (0..threads).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicUsize::new(0),
        });
        let (before, after) = (clock.clone(), clock.clone());
        builder
            .on_before_task_poll(move |_| before.tick())
            .on_after_task_poll(move |_| after.tick());
        clock
    }

    fn tick(&self) {
        let mut i = SLOT.get();
        if i == usize::MAX {
            // Only worker threads poll tasks, and each claims one slot.
            i = self.next.fetch_add(1, Ordering::Relaxed);
            SLOT.set(i);
        }
        if let Some(slot) = self.slots.get(i) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A plain thread that looks at the [`PollClock`] every [`WATCH_TICK`] and,
/// while some worker has been inside the same poll since the last look,
/// spawns an empty task onto the runtime. A spawn from outside the runtime
/// wakes a sleeping worker, which then polls the I/O driver that the stuck
/// worker is not polling.
struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Watchdog {
    fn start(clock: Arc<PollClock>, handle: Handle) -> std::io::Result<Watchdog> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wshd-watchdog".into())
            .spawn(move || {
                let mut seen = vec![0u64; clock.slots.len()];
                while !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(WATCH_TICK);
                    let mut stuck = false;
                    for (slot, last) in clock.slots.iter().zip(seen.iter_mut()) {
                        let now = slot.load(Ordering::Relaxed);
                        stuck |= now % 2 == 1 && now == *last;
                        *last = now;
                    }
                    if stuck {
                        handle.spawn(async {});
                    }
                }
            })?;
        Ok(Watchdog { stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}
