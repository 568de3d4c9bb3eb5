//! Canary rollout, automatic rollback and quarantine: the per-route state
//! machine, the policy it follows, and the fault counters ([`Health`]) each
//! instance keeps.
//!
//! A route serves one *stable* version and, during a rollout, a *canary*:
//!
//! ```text
//!            offer(new), percent = 100          offer(new), 0 < percent < 100
//!  Serving ─────────────────────────▶ Serving   Serving ──────────────▶ Canary
//!                                                Canary ── period over, under every threshold ──▶ Serving(new)  (promote)
//!                                                Canary ── a threshold crossed, or percent = 0 ──▶ Serving(old)  (rollback)
//!                                                Canary ── percent = 100 (SIGHUP) ───────────────▶ Serving(new)  (promote)
//! ```
//!
//! The machine is generic over the version handle so its rules are unit
//! tested without loading handlers; the registry drives it with
//! `Arc<Instance>` and turns each [`Step`] into one log line, a new route
//! table, and the retirement of what is no longer served.
//!
//! An automatic rollback (a threshold crossed) drains the canary's open
//! connections at once (Close 1012 spread over `drain_window`): the version
//! is known bad, and its bytes are not rolled out again until the file
//! changes. A manual rollback drains them after `drain_timeout`, like any
//! replaced version, and leaves the bytes eligible. Where both versions
//! support connection handover (ABI 1.2 `on_export`/`on_import`), the
//! canary's connections move back to the stable version instead
//! ([`handover_back`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use wshd_handler_api::abi::{WSHD_ERR_LIMIT, WSHD_ERR_PANIC, WSHD_OK};

use crate::config::RawRollout;

/// What a route's rollout follows. Defaults keep today's behaviour: a new
/// version takes every new connection at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Share of new connections for a canary, 0..=100 (default 100).
    pub canary_percent: u8,
    /// How long a canary runs before promotion (default 5 min).
    pub canary_period: Duration,
    /// A canary is rolled back when a count goes above its maximum.
    pub max_panics: u64,
    pub max_1011_closes: u64,
    pub max_5xx_handshakes: u64,
    /// Quarantine after more than this many faults (panics and failed
    /// callbacks) within `quarantine_window` (defaults 20 in 1 min).
    pub quarantine_faults: usize,
    pub quarantine_window: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            canary_percent: 100,
            canary_period: Duration::from_secs(300),
            max_panics: 0,
            max_1011_closes: 10,
            max_5xx_handshakes: 10,
            quarantine_faults: 20,
            quarantine_window: Duration::from_secs(60),
        }
    }
}

impl Policy {
    /// This policy with the keys `raw` sets replaced.
    pub fn overlay(&self, raw: &RawRollout) -> Policy {
        Policy {
            canary_percent: raw.canary_percent.map_or(self.canary_percent, |p| p.0),
            canary_period: raw.canary_period.map_or(self.canary_period, |d| d.0),
            max_panics: raw.max_panics.map_or(self.max_panics, u64::from),
            max_1011_closes: raw.max_1011_closes.map_or(self.max_1011_closes, u64::from),
            max_5xx_handshakes: raw
                .max_5xx_handshakes
                .map_or(self.max_5xx_handshakes, u64::from),
            quarantine_faults: raw
                .quarantine_faults
                .map_or(self.quarantine_faults, |c| c.0),
            quarantine_window: raw
                .quarantine_window
                .map_or(self.quarantine_window, |d| d.0),
        }
    }
}

/// Counts of what went wrong in one instance. Recorded by `instance.rs`
/// around each callback (only on failure: the hot path pays one branch).
#[derive(Debug, Default)]
pub struct Health {
    panics: AtomicU64,
    /// Every failed `on_open`/`on_message`: the connection closes with 1011
    /// (panics included).
    closes_1011: AtomicU64,
    handshakes_5xx: AtomicU64,
    /// When the last faults happened, at most `FAULT_HISTORY` of them.
    recent: Mutex<VecDeque<Instant>>,
    /// Woken on every fault so the registry evaluates thresholds at once.
    alarm: OnceLock<Arc<Notify>>,
}

/// Fault times kept per instance; `quarantine_faults` is capped to fit.
pub const FAULT_HISTORY: usize = 1024;

/// A snapshot of [`Health`]'s counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub panics: u64,
    pub closes_1011: u64,
    pub handshakes_5xx: u64,
}

impl Health {
    /// Wakes `alarm` on every fault from now on.
    pub fn set_alarm(&self, alarm: Arc<Notify>) {
        let _ = self.alarm.set(alarm);
    }

    /// A callback that ends the connection on failure (`on_open`,
    /// `on_message`) returned `rc`. `WSHD_ERR_LIMIT` (a server-enforced cap
    /// or the handler's own "full", see `host_api::callback_outcome`) is
    /// not the version's fault: a client that fills a cap must not be able
    /// to veto a canary.
    pub fn callback(&self, rc: i32) {
        if rc == WSHD_OK || rc == WSHD_ERR_LIMIT {
            return;
        }
        if rc == WSHD_ERR_PANIC {
            self.panics.fetch_add(1, Ordering::Relaxed);
        }
        self.closes_1011.fetch_add(1, Ordering::Relaxed);
        self.fault();
    }

    /// A callback whose result changes nothing (`on_close`) returned `rc`:
    /// only a panic counts.
    pub fn panicked_if(&self, rc: i32) {
        if rc == WSHD_ERR_PANIC {
            self.panics.fetch_add(1, Ordering::Relaxed);
            self.fault();
        }
    }

    /// A handshake was answered with `status` (the handler's rejection, or
    /// 500 when its `on_handshake` failed). 503 is a handler saying it is
    /// full (a chat room at capacity): a refusal the client can retry, not a
    /// fault, so it does not count.
    pub fn handshake(&self, status: u16) {
        if status >= 500 && status != 503 {
            self.handshakes_5xx.fetch_add(1, Ordering::Relaxed);
            if let Some(a) = self.alarm.get() {
                a.notify_one();
            }
        }
    }

    fn fault(&self) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == FAULT_HISTORY {
                recent.pop_front();
            }
            recent.push_back(Instant::now());
        }
        if let Some(a) = self.alarm.get() {
            a.notify_one();
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            panics: self.panics.load(Ordering::Relaxed),
            closes_1011: self.closes_1011.load(Ordering::Relaxed),
            handshakes_5xx: self.handshakes_5xx.load(Ordering::Relaxed),
        }
    }

    /// Faults within `window` before `now`.
    pub fn faults_within(&self, window: Duration, now: Instant) -> usize {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .iter()
            .rev()
            .take_while(|t| now.saturating_duration_since(**t) <= window)
            .count()
    }
}

/// Whether connection number `n` (0, 1, 2, ... per route) goes to a canary
/// that takes `percent` of new connections. Deterministic and even: of any
/// 100 consecutive connections exactly `percent` go to the canary, spread
/// out rather than in a block.
pub fn to_canary(n: u64, percent: u8) -> bool {
    let p = u64::from(percent.min(100));
    (n + 1) * p / 100 != n * p / 100
}

/// Whether a version with `faults` within the window must be quarantined.
pub fn quarantine_due(faults: usize, policy: &Policy) -> bool {
    faults > policy.quarantine_faults.min(FAULT_HISTORY - 1)
}

/// A version on probation.
#[derive(Debug, Clone)]
pub struct Canary<V> {
    pub version: V,
    pub percent: u8,
    pub until: Instant,
}

/// One route's versions.
#[derive(Debug, Clone)]
pub struct Rollout<V> {
    pub stable: V,
    pub canary: Option<Canary<V>>,
}

/// What [`Rollout::offer`] did with a new version.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<V> {
    /// It serves every new connection now; `old` (and a canary it
    /// replaced, if any) are to be retired.
    Switched { old: V, replaced_canary: Option<V> },
    /// It is a canary now; a previous canary, if any, is to be retired.
    Canary { replaced_canary: Option<V> },
    /// `canary_percent = 0`: new versions are not rolled out.
    Refused,
}

/// A transition that happened; the caller logs it and republishes.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<V> {
    /// The canary became the stable version; `old` is to be retired.
    Promoted { old: V, why: String },
    /// The canary is gone; `canary` is to be handed over back or drained.
    /// `automatic`: a threshold was crossed, so its bytes are known bad
    /// and are not rolled out again; a manual rollback (canary_percent 0,
    /// the file put back) leaves them eligible.
    RolledBack {
        canary: V,
        why: String,
        automatic: bool,
    },
}

impl<V: Clone> Rollout<V> {
    pub fn new(stable: V) -> Rollout<V> {
        Rollout {
            stable,
            canary: None,
        }
    }

    /// The newest version: the canary if there is one.
    pub fn newest(&self) -> &V {
        self.canary.as_ref().map_or(&self.stable, |c| &c.version)
    }

    /// A new version is ready for this route.
    pub fn offer(&mut self, new: V, policy: &Policy, now: Instant) -> Offer<V> {
        match policy.canary_percent {
            0 => Offer::Refused,
            100 => {
                let replaced_canary = self.canary.take().map(|c| c.version);
                let old = std::mem::replace(&mut self.stable, new);
                Offer::Switched {
                    old,
                    replaced_canary,
                }
            }
            percent => {
                let replaced_canary = self
                    .canary
                    .replace(Canary {
                        version: new,
                        percent,
                        until: now + policy.canary_period,
                    })
                    .map(|c| c.version);
                Offer::Canary { replaced_canary }
            }
        }
    }

    /// Checks a running canary against its thresholds and its period.
    pub fn evaluate(&mut self, counts: Counts, policy: &Policy, now: Instant) -> Option<Step<V>> {
        let c = self.canary.as_ref()?;
        let crossed = [
            ("panics", counts.panics, policy.max_panics, "max_panics"),
            (
                "1011 closes",
                counts.closes_1011,
                policy.max_1011_closes,
                "max_1011_closes",
            ),
            (
                "5xx handshakes",
                counts.handshakes_5xx,
                policy.max_5xx_handshakes,
                "max_5xx_handshakes",
            ),
        ]
        .into_iter()
        .find(|(_, n, max, _)| n > max);
        if let Some((what, n, max, key)) = crossed {
            return Some(self.roll_back(format!("{what}: {n}, more than {key} = {max}"), true));
        }
        if now >= c.until {
            return Some(self.promote(format!(
                "canary period of {:?} passed under every threshold",
                policy.canary_period
            )));
        }
        None
    }

    /// A config reload changed the policy: 100 promotes a running canary,
    /// 0 rolls it back, any other share applies to it from now on.
    pub fn reconfigure(&mut self, policy: &Policy) -> Option<Step<V>> {
        self.canary.as_ref()?;
        match policy.canary_percent {
            100 => Some(self.promote("canary_percent set to 100 (manual promote)".into())),
            0 => Some(self.roll_back("canary_percent set to 0 (manual rollback)".into(), false)),
            p => {
                if let Some(c) = self.canary.as_mut() {
                    c.percent = p;
                }
                None
            }
        }
    }

    /// Ends a canary in favour of the stable version.
    pub fn roll_back(&mut self, why: String, automatic: bool) -> Step<V> {
        let canary = self.canary.take().expect("a canary to roll back").version;
        Step::RolledBack {
            canary,
            why,
            automatic,
        }
    }

    fn promote(&mut self, why: String) -> Step<V> {
        let c = self.canary.take().expect("a canary to promote");
        let old = std::mem::replace(&mut self.stable, c.version);
        Step::Promoted { old, why }
    }

    /// When [`Rollout::evaluate`] must run again even if nothing faults.
    pub fn deadline(&self) -> Option<Instant> {
        self.canary.as_ref().map(|c| c.until)
    }
}

/// Whether connections of `from` can be handed over to `to`: both have
/// `on_export` and `on_import` (ABI 1.2) and they are different instances.
pub fn can_hand_over(from: &crate::instance::Instance, to: &crate::instance::Instance) -> bool {
    from.id != to.id && from.supports_handover() && to.supports_handover()
}

/// How many open connections of `from` (a rolled-back canary) are handed
/// back to `to` (the stable version) instead of draining: all of them when
/// both versions support connection handover, none otherwise. The move
/// itself is the same as for any retired version (`Registry::retire` hands
/// them over, each session moves between two messages); one whose export
/// or import fails stays and drains.
pub fn handover_back(from: &crate::instance::Instance, to: &crate::instance::Instance) -> usize {
    if can_hand_over(from, to) {
        from.live.load(Ordering::Relaxed)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(percent: u8) -> Policy {
        Policy {
            canary_percent: percent,
            canary_period: Duration::from_secs(60),
            max_panics: 0,
            max_1011_closes: 2,
            max_5xx_handshakes: 1,
            ..Policy::default()
        }
    }

    #[test]
    fn split_is_exact_and_spread() {
        let n = (0..1000).filter(|&n| to_canary(n, 10)).count();
        assert_eq!(n, 100);
        // Spread: never two canary connections in a row at 10%.
        assert!((0..1000).all(|n| !(to_canary(n, 10) && to_canary(n + 1, 10))));
        assert_eq!((0..100).filter(|&n| to_canary(n, 0)).count(), 0);
        assert_eq!((0..100).filter(|&n| to_canary(n, 100)).count(), 100);
        assert_eq!((0..1000).filter(|&n| to_canary(n, 33)).count(), 330);
    }

    #[test]
    fn default_switches_at_once() {
        let mut r = Rollout::new("v1");
        let now = Instant::now();
        assert_eq!(
            r.offer("v2", &Policy::default(), now),
            Offer::Switched {
                old: "v1",
                replaced_canary: None
            }
        );
        assert_eq!(r.stable, "v2");
        assert!(r.canary.is_none() && r.deadline().is_none());
    }

    #[test]
    fn canary_promoted_after_its_period() {
        let p = policy(10);
        let mut r = Rollout::new("v1");
        let t0 = Instant::now();
        assert_eq!(
            r.offer("v2", &p, t0),
            Offer::Canary {
                replaced_canary: None
            }
        );
        assert_eq!(*r.newest(), "v2");
        assert_eq!(r.deadline(), Some(t0 + p.canary_period));
        let ok = Counts {
            closes_1011: 2,
            handshakes_5xx: 1,
            ..Counts::default()
        };
        assert_eq!(r.evaluate(ok, &p, t0 + Duration::from_secs(59)), None);
        match r.evaluate(ok, &p, t0 + p.canary_period) {
            Some(Step::Promoted { old: "v1", .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(r.stable, "v2");
        assert!(r.canary.is_none());
    }

    #[test]
    fn each_threshold_rolls_back() {
        let p = policy(10);
        let t0 = Instant::now();
        for (counts, word) in [
            (
                Counts {
                    panics: 1,
                    ..Default::default()
                },
                "max_panics",
            ),
            (
                Counts {
                    closes_1011: 3,
                    ..Default::default()
                },
                "max_1011_closes",
            ),
            (
                Counts {
                    handshakes_5xx: 2,
                    ..Default::default()
                },
                "max_5xx_handshakes",
            ),
        ] {
            let mut r = Rollout::new("v1");
            r.offer("v2", &p, t0);
            match r.evaluate(counts, &p, t0) {
                Some(Step::RolledBack {
                    canary: "v2",
                    why,
                    automatic: true,
                }) => assert!(why.contains(word), "{why}"),
                other => panic!("{other:?}"),
            }
            assert_eq!(r.stable, "v1");
            assert!(r.canary.is_none());
        }
    }

    #[test]
    fn manual_promote_and_rollback_through_the_percentage() {
        let t0 = Instant::now();
        let mut r = Rollout::new("v1");
        r.offer("v2", &policy(10), t0);
        assert_eq!(r.reconfigure(&policy(25)), None);
        assert_eq!(r.canary.as_ref().unwrap().percent, 25);
        assert!(matches!(
            r.reconfigure(&policy(100)),
            Some(Step::Promoted { old: "v1", .. })
        ));
        assert_eq!(r.stable, "v2");
        r.offer("v3", &policy(10), t0);
        assert!(matches!(
            r.reconfigure(&policy(0)),
            Some(Step::RolledBack {
                canary: "v3",
                automatic: false,
                ..
            })
        ));
        assert_eq!(r.stable, "v2");
        assert_eq!(r.offer("v4", &policy(0), t0), Offer::Refused);
        assert_eq!(r.stable, "v2");
    }

    #[test]
    fn a_newer_canary_replaces_the_running_one() {
        let t0 = Instant::now();
        let mut r = Rollout::new("v1");
        r.offer("v2", &policy(10), t0);
        assert_eq!(
            r.offer("v3", &policy(10), t0),
            Offer::Canary {
                replaced_canary: Some("v2")
            }
        );
        assert_eq!(
            r.offer("v4", &policy(100), t0),
            Offer::Switched {
                old: "v1",
                replaced_canary: Some("v3")
            }
        );
    }

    #[test]
    fn health_counts_and_window() {
        let h = Health::default();
        h.callback(WSHD_OK);
        assert_eq!(h.counts(), Counts::default());
        h.callback(WSHD_ERR_PANIC);
        h.callback(wshd_handler_api::abi::WSHD_ERR_HANDLER);
        // A server limit, or the handler's own "full": not a fault.
        h.callback(WSHD_ERR_LIMIT);
        h.panicked_if(WSHD_ERR_PANIC);
        h.handshake(403);
        h.handshake(503);
        h.handshake(500);
        assert_eq!(
            h.counts(),
            Counts {
                panics: 2,
                closes_1011: 2,
                handshakes_5xx: 1
            }
        );
        let now = Instant::now();
        assert_eq!(h.faults_within(Duration::from_secs(60), now), 3);
        let later = now + Duration::from_secs(120);
        assert_eq!(h.faults_within(Duration::from_secs(60), later), 0);
        let p = Policy {
            quarantine_faults: 2,
            ..Policy::default()
        };
        assert!(quarantine_due(3, &p) && !quarantine_due(2, &p));
    }
}
