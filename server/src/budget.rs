//! The server-wide budget for unfinished incoming messages
//! (`max_buffered_bytes`).
//!
//! A connection keeps a partly received frame, and the frames of a
//! fragmented message, until the message is complete (ws.rs). A client that
//! sends most of a big frame and then stops holds that memory for as long
//! as the connection lives. The codec knows exactly how many bytes it holds
//! for unfinished messages and publishes the count here.
//!
//! Cost on the hot path: a connection publishes its count ([`Meter`]) only
//! when it moves by more than one read buffer or drops to zero, so small
//! messages never touch a shared atomic; the search for the connection
//! holding the most runs only when the total is over the budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;

use crate::mailbox::ConnShared;

/// The server-wide count of bytes held by unfinished messages.
#[derive(Debug)]
pub struct Budget {
    /// `max_buffered_bytes`.
    limit: u64,
    /// The sum of every connection's published count.
    total: AtomicU64,
    /// Connections that have published a count at least once, by id. A
    /// connection registers on its first big message, so one that only
    /// ever sends small messages costs nothing here.
    holders: DashMap<u64, Arc<Holder>>,
    /// A sweep is running; others that find the total over the budget
    /// meanwhile leave the work to it.
    sweeping: AtomicBool,
}

/// One connection's published count, shared with the sweep.
#[derive(Debug)]
struct Holder {
    held: AtomicU64,
    /// The sweep picked this connection: its session must free its buffers
    /// and close with 1009.
    over: AtomicBool,
    /// Wakes the session so it sees `over`.
    shared: Arc<ConnShared>,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit: limit as u64,
            total: AtomicU64::new(0),
            holders: DashMap::new(),
            sweeping: AtomicBool::new(false),
        }
    }

    /// Bytes currently counted against the budget.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Picks the connections holding the most until the rest fit the
    /// budget, and wakes each so it closes and frees what it holds. Only
    /// called when the total is over the budget.
    fn sweep(&self) {
        if self.sweeping.swap(true, Ordering::Acquire) {
            return;
        }
        let mut live: Vec<(u64, Arc<Holder>)> = Vec::new();
        let mut sum = 0u64;
        for h in self.holders.iter() {
            // Connections picked before still hold their bytes until their
            // sessions run: they are on their way out, so they do not count.
            if h.over.load(Ordering::Relaxed) {
                continue;
            }
            let held = h.held.load(Ordering::Relaxed);
            if held > 0 {
                sum += held;
                live.push((held, h.value().clone()));
            }
        }
        if sum > self.limit {
            live.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
            for (held, h) in live {
                if sum <= self.limit {
                    break;
                }
                sum -= held;
                h.over.store(true, Ordering::Relaxed);
                h.shared.wakeup.wake();
            }
        }
        self.sweeping.store(false, Ordering::Release);
    }
}

/// One connection's side of the budget: publishes what the connection
/// holds and tells it when it was picked to go.
#[derive(Debug)]
pub struct Meter {
    budget: Arc<Budget>,
    id: u64,
    shared: Arc<ConnShared>,
    /// Registered in the budget once the connection first published.
    holder: Option<Arc<Holder>>,
    /// The count last published.
    published: u64,
    /// Changes smaller than this are not published: the read buffer every
    /// connection has anyway.
    granule: u64,
}

impl Meter {
    pub fn new(budget: Arc<Budget>, id: u64, shared: Arc<ConnShared>, granule: usize) -> Meter {
        Meter {
            budget,
            id,
            shared,
            holder: None,
            published: 0,
            granule: granule.max(1) as u64,
        }
    }

    /// Records that the connection now holds `held` bytes of unfinished
    /// messages. Cheap unless the count moved by a read buffer or more.
    pub fn update(&mut self, held: u64) {
        let moved = held.abs_diff(self.published);
        if moved == 0 || (held != 0 && moved < self.granule) {
            return;
        }
        let holder = match &self.holder {
            Some(h) => h,
            None => {
                if held == 0 {
                    return;
                }
                let h = Arc::new(Holder {
                    held: AtomicU64::new(0),
                    over: AtomicBool::new(false),
                    shared: self.shared.clone(),
                });
                self.budget.holders.insert(self.id, h.clone());
                self.holder.insert(h)
            }
        };
        holder.held.store(held, Ordering::Relaxed);
        let total = if held > self.published {
            let d = held - self.published;
            self.budget.total.fetch_add(d, Ordering::Relaxed) + d
        } else {
            let d = self.published - held;
            self.budget.total.fetch_sub(d, Ordering::Relaxed) - d
        };
        self.published = held;
        if total > self.budget.limit {
            self.budget.sweep();
        }
    }

    /// Whether the budget picked this connection to close.
    pub fn over(&self) -> bool {
        self.holder
            .as_ref()
            .is_some_and(|h| h.over.load(Ordering::Relaxed))
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if self.holder.is_some() {
            self.update(0);
            self.budget.holders.remove(&self.id);
        }
    }
}
