//! The route table: request path → [`Route`]. Built off to the side by the
//! [`Registry`](crate::registry::Registry) and published with one atomic
//! swap, so a handshake always sees either the old table or the new one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{Limits, OriginRule};
use crate::instance::Instance;

/// One served path (plus its aliases).
#[derive(Debug)]
pub struct Route {
    /// The primary path.
    pub path: Arc<str>,
    pub instance: Arc<Instance>,
    /// `None`: any Origin is accepted, including `null`.
    pub allowed_origins: Option<Vec<OriginRule>>,
    pub limits: Limits,
    /// The codec's limits (ws.rs), from `limits`.
    pub ws_config: crate::ws::Config,
    /// A version on probation (rollout.rs): the same route with the
    /// canary's instance, and its share of new connections.
    pub canary: Option<(Arc<Route>, u8)>,
    /// New connections since the canary started, for the split. Shared
    /// with the registry so a republished table continues the count.
    picked: Arc<AtomicU64>,
    /// With a canary: this route without it, which `pick` gives the stable
    /// share, so their sessions do not keep the canary's instance alive
    /// after a rollback (it must be destroyed once its connections moved
    /// back or closed).
    stable: Option<Arc<Route>>,
}

impl Route {
    pub fn new(
        path: Arc<str>,
        instance: Arc<Instance>,
        allowed_origins: Option<Vec<OriginRule>>,
        limits: Limits,
    ) -> Route {
        let ws_config = ws_config(&limits);
        Route {
            path,
            instance,
            allowed_origins,
            limits,
            ws_config,
            canary: None,
            picked: Arc::default(),
            stable: None,
        }
    }

    /// This route, with `canary` taking `percent` of new connections;
    /// `picked` counts the connections split so far.
    pub fn with_canary(
        mut self,
        canary: Arc<Instance>,
        percent: u8,
        picked: Arc<AtomicU64>,
    ) -> Route {
        self.picked = picked;
        let c = Route::new(
            self.path.clone(),
            canary,
            self.allowed_origins.clone(),
            self.limits.clone(),
        );
        self.canary = Some((Arc::new(c), percent));
        self.stable = Some(Arc::new(Route::new(
            self.path.clone(),
            self.instance.clone(),
            self.allowed_origins.clone(),
            self.limits.clone(),
        )));
        self
    }

    /// The route a new connection is served by: the canary's for its share
    /// of connections (an even, deterministic split: see
    /// [`crate::rollout::to_canary`]), this one otherwise.
    pub fn pick(self: &Arc<Route>) -> Arc<Route> {
        match &self.canary {
            Some((c, percent)) => {
                let n = self.picked.fetch_add(1, Ordering::Relaxed);
                if crate::rollout::to_canary(n, *percent) {
                    c.clone()
                } else {
                    self.stable.clone().unwrap_or_else(|| self.clone())
                }
            }
            None => self.clone(),
        }
    }

    /// Whether a request's `Origin` header passes this route's allowlist.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        let Some(allowed) = &self.allowed_origins else {
            return true;
        };
        let Some(origin) = origin else {
            // A non-browser client sends no Origin; an allowlist exists to
            // restrict browsers, so it requires one.
            return false;
        };
        match OriginRule::parse(origin) {
            Ok(o) => allowed.contains(&o),
            Err(_) => false,
        }
    }
}

/// The codec's limits for a route.
pub fn ws_config(limits: &Limits) -> crate::ws::Config {
    crate::ws::Config {
        max_frame_size: limits.max_frame_size,
        max_message_size: limits.max_message_size,
    }
}

/// Path → route. Aliases map to the same `Arc<Route>`.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub routes: HashMap<Arc<str>, Arc<Route>>,
}

impl RouteTable {
    /// The route serving `path` exactly (no prefix matching, no decoding, as
    /// in pywebsocket).
    pub fn get(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.get(path)
    }

    /// Distinct routes, sorted by primary path.
    pub fn primary_routes(&self) -> Vec<&Arc<Route>> {
        let mut v: Vec<_> = self
            .routes
            .iter()
            .filter(|(k, r)| **k == r.path)
            .map(|(_, r)| r)
            .collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }
}
