//! Host timers (ABI 1.2): `set_timer(ctx, conn, delay_ms)` calls the
//! handler's `on_timer` once, later; `cancel_timer` takes it back.
//!
//! Handlers otherwise start a thread per timer (or one that sleeps and
//! sends), which breaks the connection's ordering guarantees. Here:
//! * A timer for a **connection** does not call the handler when it fires:
//!   it marks the connection ([`ConnTimers::fired`]) and wakes its session,
//!   which calls `on_timer` between messages, like any other callback of
//!   that connection (never concurrently with them, on the blocking pool
//!   for MAY_BLOCK handlers). It belongs to the connection's instance and
//!   never fires into another handler version; it is dropped when the
//!   connection closes.
//! * A timer for the **instance** (conn 0) runs `on_timer` with a NULL
//!   state on its own task, and is dropped when the instance is destroyed.
//!
//! Every timer is one tokio task (a few hundred bytes) that sleeps until
//! its deadline; cancelling aborts it. Pending timers are capped per
//! connection and per instance (`[timers]` in the config), so a handler
//! cannot grow this without bound.
//!
//! A timer is "pending" from `set_timer` until `on_timer` is called for it
//! (or it is cancelled or dropped): the entry in [`Timers::pending`] is
//! what `cancel_timer` removes, so a timer cancelled after it fired but
//! before its session ran it is not delivered.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, MutexGuard, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use wshd_handler_api::abi::{
    WSHD_ERR_CLOSED, WSHD_ERR_INVALID, WSHD_ERR_LIMIT, WSHD_ERR_REVOKED, WSHD_ERR_STATE,
    WSHD_ERR_UNSUPPORTED, WSHD_OK, wshd_conn_id,
};

use crate::host_api::HostCtx;
use crate::mailbox::ConnShared;

/// Default `[timers] max_per_connection`.
pub const DEFAULT_MAX_PER_CONNECTION: usize = 64;
/// Default `[timers] max_per_instance` (timers set with conn 0).
pub const DEFAULT_MAX_PER_INSTANCE: usize = 1024;
/// The longest delay: a year. Longer ones are refused (`WSHD_ERR_INVALID`)
/// rather than overflowing the clock.
pub const MAX_DELAY_MS: u64 = 365 * 24 * 3600 * 1000;

/// One connection's timers, kept in its [`ConnShared`](crate::mailbox::ConnShared).
#[derive(Debug, Default)]
pub struct ConnTimers {
    /// Allocated at the connection's first timer: most never set one, and
    /// this is part of every connection.
    lists: Option<Box<Lists>>,
    /// The connection closed: no new timers.
    closed: bool,
}

#[derive(Debug, Default)]
struct Lists {
    /// Pending timer ids (set, not yet delivered or cancelled).
    ids: Vec<u64>,
    /// Ids that fired, in firing order, for the session to deliver.
    fired: Vec<u64>,
}

impl ConnTimers {
    fn lists(&mut self) -> &mut Lists {
        self.lists.get_or_insert_default()
    }

    /// Forgets every timer; returns the pending ids.
    fn clear(&mut self) -> Vec<u64> {
        self.lists.take().map(|l| l.ids).unwrap_or_default()
    }
}

#[derive(Debug)]
struct Pending {
    ctx: &'static HostCtx,
    /// The connection it is for; `None` for an instance timer.
    conn: Option<Arc<ConnShared>>,
    abort: Option<tokio::task::AbortHandle>,
}

/// Every pending timer on the server.
#[derive(Debug)]
pub struct Timers {
    pending: DashMap<u64, Pending>,
    next: AtomicU64,
    max_per_connection: AtomicUsize,
    max_per_instance: AtomicUsize,
}

/// The server's timers. Timer ids are unique across the process.
pub fn global() -> &'static Timers {
    static TIMERS: OnceLock<Timers> = OnceLock::new();
    TIMERS.get_or_init(|| Timers::new(DEFAULT_MAX_PER_CONNECTION, DEFAULT_MAX_PER_INSTANCE))
}

fn lock(shared: &ConnShared) -> MutexGuard<'_, ConnTimers> {
    shared.timers.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_ids(ctx: &HostCtx) -> MutexGuard<'_, Vec<u64>> {
    ctx.timers.lock().unwrap_or_else(|p| p.into_inner())
}

fn forget(list: &mut Vec<u64>, id: u64) {
    if let Some(pos) = list.iter().position(|&t| t == id) {
        list.swap_remove(pos);
    }
}

impl Timers {
    /// An empty set with these caps. The server uses [`global`]; a timer
    /// that fires is delivered through it.
    pub fn new(max_per_connection: usize, max_per_instance: usize) -> Timers {
        Timers {
            pending: DashMap::new(),
            next: AtomicU64::new(1),
            max_per_connection: AtomicUsize::new(max_per_connection),
            max_per_instance: AtomicUsize::new(max_per_instance),
        }
    }

    /// Sets the caps (at startup and on every config reload).
    pub fn configure(&self, max_per_connection: usize, max_per_instance: usize) {
        self.max_per_connection
            .store(max_per_connection, Ordering::Relaxed);
        self.max_per_instance
            .store(max_per_instance, Ordering::Relaxed);
    }

    /// Timers set and not yet delivered, cancelled or dropped.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// `set_timer`: the new timer's id, or an ABI status.
    pub fn set(
        &self,
        ctx: &'static HostCtx,
        conn: wshd_conn_id,
        delay_ms: u64,
    ) -> Result<u64, i32> {
        if ctx.is_revoked() {
            return Err(WSHD_ERR_REVOKED);
        }
        if !ctx.has_on_timer.load(Ordering::Relaxed) {
            return Err(WSHD_ERR_UNSUPPORTED);
        }
        let Some(rt) = ctx.rt.clone() else {
            return Err(WSHD_ERR_UNSUPPORTED);
        };
        if delay_ms > MAX_DELAY_MS {
            return Err(WSHD_ERR_INVALID);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if conn != 0 {
            let shared = ctx.own_conn(conn).ok_or(WSHD_ERR_CLOSED)?;
            let mut mine = lock(&shared);
            if mine.closed {
                return Err(WSHD_ERR_CLOSED);
            }
            if mine.lists().ids.len() >= self.max_per_connection.load(Ordering::Relaxed) {
                return Err(WSHD_ERR_LIMIT);
            }
            mine.lists().ids.push(id);
            self.pending.insert(
                id,
                Pending {
                    ctx,
                    conn: Some(shared.clone()),
                    abort: None,
                },
            );
        } else {
            let mut mine = lock_ids(ctx);
            if mine.len() >= self.max_per_instance.load(Ordering::Relaxed) {
                return Err(WSHD_ERR_LIMIT);
            }
            mine.push(id);
            self.pending.insert(
                id,
                Pending {
                    ctx,
                    conn: None,
                    abort: None,
                },
            );
        }
        let task = rt.spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            global().fire(id).await;
        });
        match self.pending.get_mut(&id) {
            Some(mut p) => p.abort = Some(task.abort_handle()),
            // Cancelled (or already delivered) before we got here.
            None => task.abort(),
        }
        Ok(id)
    }

    /// The deadline of timer `id` passed.
    async fn fire(&self, id: u64) {
        let Some((ctx, conn)) = self.pending.get(&id).map(|p| (p.ctx, p.conn.clone())) else {
            return; // cancelled
        };
        match conn {
            Some(shared) => {
                {
                    let mut mine = lock(&shared);
                    if !mine.closed {
                        mine.lists().fired.push(id);
                    }
                }
                shared.timer_fired.store(true, Ordering::Release);
                shared.wakeup.wake();
                tracing::debug!(route = %ctx.route, timer = id, "timer due; runs between the connection's callbacks");
            }
            None => {
                if !self.take(id) {
                    return;
                }
                let inst = ctx.target.get().and_then(std::sync::Weak::upgrade);
                match inst {
                    Some(inst) => inst.instance_timer(id).await,
                    None => tracing::debug!(
                        route = %ctx.route,
                        timer = id,
                        "timer fired after its handler instance was destroyed; dropped"
                    ),
                }
            }
        }
    }

    /// Takes timer `id` out of the pending set right before its `on_timer`
    /// call: `false` if it was cancelled or dropped meanwhile.
    pub fn take(&self, id: u64) -> bool {
        let Some((_, p)) = self.pending.remove(&id) else {
            return false;
        };
        match &p.conn {
            Some(shared) => {
                if let Some(l) = lock(shared).lists.as_mut() {
                    forget(&mut l.ids, id);
                }
            }
            None => forget(&mut lock_ids(p.ctx), id),
        }
        true
    }

    /// `cancel_timer`: `WSHD_OK` if timer `id` of instance `ctx` was
    /// pending (it will not be delivered), else `WSHD_ERR_STATE`.
    pub fn cancel(&self, ctx: &HostCtx, id: u64) -> i32 {
        let owned = |_: &u64, p: &Pending| std::ptr::eq(p.ctx, ctx);
        let Some((_, p)) = self.pending.remove_if(&id, owned) else {
            return WSHD_ERR_STATE;
        };
        if let Some(a) = &p.abort {
            a.abort();
        }
        match &p.conn {
            Some(shared) => {
                if let Some(l) = lock(shared).lists.as_mut() {
                    forget(&mut l.ids, id);
                }
            }
            None => forget(&mut lock_ids(p.ctx), id),
        }
        WSHD_OK
    }

    /// Drops every timer of a connection that is closing and refuses new
    /// ones. Called once by the session when it ends.
    pub fn drop_conn(&self, shared: &ConnShared) {
        let ids = {
            let mut mine = lock(shared);
            mine.closed = true;
            mine.clear()
        };
        self.abort_all(&ids);
    }

    /// The connection moved to another handler version (handover): the old
    /// version's pending and fired timers for it are dropped, so none fires
    /// into the new version; the new version may set its own.
    pub fn moved(&self, shared: &ConnShared) {
        let ids = { lock(shared).clear() };
        self.abort_all(&ids);
    }

    /// Drops the instance timers of a destroyed instance.
    pub fn drop_instance(&self, ctx: &HostCtx) {
        let ids = std::mem::take(&mut *lock_ids(ctx));
        self.abort_all(&ids);
    }

    fn abort_all(&self, ids: &[u64]) {
        for id in ids {
            if let Some((_, p)) = self.pending.remove(id)
                && let Some(a) = p.abort
            {
                a.abort();
            }
        }
    }
}

impl ConnShared {
    /// Whether a timer of this connection fired and waits for the session.
    pub fn has_fired_timers(&self) -> bool {
        self.timer_fired.load(Ordering::Relaxed)
    }

    /// How many fired timers wait for the session (for tests).
    #[cfg(test)]
    pub fn take_fired_timers_peek(&self) -> usize {
        lock(self).lists.as_ref().map_or(0, |l| l.fired.len())
    }

    /// The timers of this connection that fired since the last call, in
    /// firing order (usually none: one atomic load).
    pub fn take_fired_timers(&self) -> Vec<u64> {
        if !self.timer_fired.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.timer_fired.store(false, Ordering::Relaxed);
        lock(self)
            .lists
            .as_mut()
            .map(|l| std::mem::take(&mut l.fired))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_api::new_host_api;
    use crate::mailbox::Connections;

    #[tokio::test]
    async fn the_instance_cap_refuses_and_destroy_drops_its_timers() {
        let t = Timers::new(2, 2);
        let conns = std::sync::Arc::new(Connections::default());
        let a = new_host_api(77, "t".into(), "/t".into(), conns);
        a.ctx.has_on_timer.store(true, Ordering::Relaxed);
        let first = t.set(a.ctx, 0, 60_000).unwrap();
        t.set(a.ctx, 0, 60_000).unwrap();
        assert_eq!(t.set(a.ctx, 0, 60_000), Err(WSHD_ERR_LIMIT));
        assert_eq!(t.cancel(a.ctx, first), WSHD_OK);
        t.set(a.ctx, 0, 60_000).unwrap();
        assert_eq!(t.set(a.ctx, 0, MAX_DELAY_MS + 1), Err(WSHD_ERR_INVALID));
        assert_eq!(t.pending(), 2);
        t.drop_instance(a.ctx);
        assert_eq!(t.pending(), 0, "destroy drops the instance's timers");
    }
}
