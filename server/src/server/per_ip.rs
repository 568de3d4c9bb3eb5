//! Per-client-address admission: at most `max_connections_per_ip` open
//! sockets and a handshake token bucket (`handshake_rate_per_ip` per second,
//! `handshake_burst_per_ip` at once) per address.
//!
//! An IPv4 address is one client; IPv6 addresses are grouped by /64, since
//! one subscriber (or one attacker) is routinely given a whole /64.
//! Addresses in `per_ip_exempt` (loopback by default, where a local reverse
//! proxy or load generator sits) are not tracked at all: behind a proxy
//! every client has the proxy's address, so caps per client belong there.
//!
//! The table itself is bounded: it tracks at most `max_connections + 4096`
//! addresses. Addresses with open sockets number at most `max_connections`;
//! when the table is full, addresses without open sockets are forgotten
//! (first those whose bucket has refilled, which lose nothing), so a client
//! with many addresses costs a bounded amount of memory.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::{self, Deserialize, Deserializer};

use crate::config::Limits;

/// Room for addresses without open sockets, whose buckets we remember.
const IDLE_ROOM: usize = 4096;

/// A network in `per_ip_exempt`: `127.0.0.0/8`, `::1`, `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let bad = || {
            format!(
                "`{s}` is not an address or network; write e.g. \"127.0.0.0/8\", \"::1\" or \"10.1.2.3\""
            )
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let net: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(format!("`{s}`: the prefix length is at most {max}"));
        }
        Ok(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse(&s).map_err(de::Error::custom)
    }
}

/// The default `per_ip_exempt`: loopback.
pub fn default_exempt() -> Vec<Cidr> {
    vec![
        Cidr::parse("127.0.0.0/8").expect("valid"),
        Cidr::parse("::1").expect("valid"),
    ]
}

/// An IPv4-mapped IPv6 address (a dual-stack listener) is its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The key an address is counted under: IPv4 whole, IPv6 by /64.
pub fn key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        v4 => v4,
    }
}

#[derive(Debug)]
struct Entry {
    conns: usize,
    tokens: f64,
    last: Instant,
}

/// The outcome of [`PerIp::admit`].
#[derive(Debug)]
pub enum Verdict {
    /// Go on; the guard (none for exempt addresses) gives the place back.
    Admit(Option<ConnGuard>),
    /// Out of handshake tokens: 429.
    TooFast,
    /// At `max_connections_per_ip`: 503.
    TooMany,
}

/// The per-address table.
#[derive(Debug)]
pub struct PerIp {
    max_conns: usize,
    rate: f64,
    burst: f64,
    exempt: Vec<Cidr>,
    capacity: usize,
    map: Mutex<HashMap<IpAddr, Entry>>,
}

impl PerIp {
    pub fn new(l: &Limits) -> PerIp {
        PerIp::with_capacity(l, l.max_connections.saturating_add(IDLE_ROOM))
    }

    fn with_capacity(l: &Limits, capacity: usize) -> PerIp {
        PerIp {
            max_conns: l.max_connections_per_ip,
            rate: l.handshake_rate_per_ip,
            burst: l.handshake_burst_per_ip as f64,
            exempt: l.per_ip_exempt.clone(),
            capacity,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a handshake token and a connection place for `ip`.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Verdict {
        if self.exempt.iter().any(|c| c.contains(ip)) {
            return Verdict::Admit(None);
        }
        let key = key(ip);
        let mut map = self.lock();
        if !map.contains_key(&key) && map.len() >= self.capacity {
            self.evict(&mut map, now);
            if map.len() >= self.capacity {
                // Every tracked address holds a socket: the server is full.
                return Verdict::TooMany;
            }
        }
        let e = map.entry(key).or_insert(Entry {
            conns: 0,
            tokens: self.burst,
            last: now,
        });
        self.refill(e, now);
        if e.conns >= self.max_conns {
            return Verdict::TooMany;
        }
        if e.tokens < 1.0 {
            return Verdict::TooFast;
        }
        e.tokens -= 1.0;
        e.conns += 1;
        Verdict::Admit(Some(ConnGuard {
            table: self.clone(),
            key,
        }))
    }

    fn refill(&self, e: &mut Entry, now: Instant) {
        let secs = now.saturating_duration_since(e.last).as_secs_f64();
        e.tokens = (e.tokens + secs * self.rate).min(self.burst);
        e.last = now;
    }

    /// Forgets addresses without sockets: first those that lose nothing
    /// (bucket full again), then, if that freed nothing, all of them.
    fn evict(&self, map: &mut HashMap<IpAddr, Entry>, now: Instant) {
        let full_after = Duration::from_secs_f64(self.burst / self.rate.max(f64::MIN_POSITIVE));
        let before = map.len();
        map.retain(|_, e| e.conns > 0 || now.saturating_duration_since(e.last) < full_after);
        if map.len() == before {
            map.retain(|_, e| e.conns > 0);
        }
    }
}

/// One open socket counted against its address; dropping it gives the
/// place back.
#[derive(Debug)]
pub struct ConnGuard {
    table: Arc<PerIp>,
    key: IpAddr,
}

impl ConnGuard {
    /// The address key (IPv4 whole, IPv6 /64) this place is counted under.
    pub fn address(&self) -> IpAddr {
        self.key
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut map = self.table.lock();
        if let Some(e) = map.get_mut(&self.key) {
            e.conns = e.conns.saturating_sub(1);
        }
    }
}

/// A log line that appears at most once a second, saying how many were
/// suppressed since the last one.
#[derive(Debug, Default)]
pub struct RateLog {
    state: Mutex<Option<(Instant, u64)>>,
}

impl RateLog {
    /// Calls `log(suppressed)` unless a line went out less than a second
    /// ago; then only counts.
    pub fn hit(&self, log: impl FnOnce(u64)) {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *s {
            Some((last, n)) if now.duration_since(*last) < Duration::from_secs(1) => *n += 1,
            Some((last, n)) => {
                let suppressed = *n;
                *last = now;
                *n = 0;
                drop(s);
                log(suppressed);
            }
            None => {
                *s = Some((now, 0));
                drop(s);
                log(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, rate: f64, burst: usize) -> Limits {
        Limits {
            max_connections_per_ip: max,
            handshake_rate_per_ip: rate,
            handshake_burst_per_ip: burst,
            per_ip_exempt: vec![],
            ..Limits::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs() {
        let lo = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(lo.contains(ip("127.9.9.9")));
        assert!(lo.contains(ip("::ffff:127.0.0.1")));
        assert!(!lo.contains(ip("128.0.0.1")));
        assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));
        assert!(!Cidr::parse("::1").unwrap().contains(ip("::2")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("localhost").is_err());
    }

    #[test]
    fn ipv6_is_grouped_by_64() {
        assert_eq!(
            key(ip("2001:db8:1:2:aaaa::1")),
            key(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(key(ip("2001:db8:1:2::1")), key(ip("2001:db8:1:3::1")));
        assert_eq!(key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        // A whole /64 shares one cap.
        let t = Arc::new(PerIp::new(&limits(2, 100.0, 100)));
        let now = Instant::now();
        let _a = t.admit(ip("2001:db8::1"), now);
        let _b = t.admit(ip("2001:db8::2"), now);
        assert!(matches!(t.admit(ip("2001:db8::3"), now), Verdict::TooMany));
    }

    #[test]
    fn connections_are_capped_and_given_back() {
        let t = Arc::new(PerIp::new(&limits(2, 100.0, 100)));
        let now = Instant::now();
        let a = t.admit(ip("10.0.0.1"), now);
        let _b = t.admit(ip("10.0.0.1"), now);
        assert!(matches!(t.admit(ip("10.0.0.1"), now), Verdict::TooMany));
        assert!(matches!(
            t.admit(ip("10.0.0.2"), now),
            Verdict::Admit(Some(_))
        ));
        drop(a);
        assert!(matches!(
            t.admit(ip("10.0.0.1"), now),
            Verdict::Admit(Some(_))
        ));
    }

    #[test]
    fn handshakes_are_rate_limited_with_a_burst() {
        let t = Arc::new(PerIp::new(&limits(1000, 2.0, 3)));
        let now = Instant::now();
        for _ in 0..3 {
            assert!(matches!(t.admit(ip("10.0.0.1"), now), Verdict::Admit(_)));
        }
        assert!(matches!(t.admit(ip("10.0.0.1"), now), Verdict::TooFast));
        // Half a second at 2/s buys one more.
        let later = now + Duration::from_millis(500);
        assert!(matches!(t.admit(ip("10.0.0.1"), later), Verdict::Admit(_)));
        assert!(matches!(t.admit(ip("10.0.0.1"), later), Verdict::TooFast));
    }

    #[test]
    fn exempt_addresses_are_not_tracked() {
        let mut l = limits(1, 0.001, 1);
        l.per_ip_exempt = default_exempt();
        let t = Arc::new(PerIp::new(&l));
        let now = Instant::now();
        for _ in 0..10 {
            assert!(matches!(
                t.admit(ip("127.0.0.1"), now),
                Verdict::Admit(None)
            ));
            assert!(matches!(t.admit(ip("::1"), now), Verdict::Admit(None)));
        }
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn the_rate_log_counts_what_it_suppresses() {
        let log = RateLog::default();
        let mut lines = Vec::new();
        for _ in 0..1000 {
            log.hit(|n| lines.push(n));
        }
        // A thousand hits within about a second: one line, or two if the
        // second began during the loop, the second one counting the rest.
        assert!(matches!(lines.as_slice(), [0] | [0, _]), "{lines:?}");
        // The next line after a quiet second reports the suppressed ones.
        *log.state.lock().unwrap() = Some((Instant::now() - Duration::from_secs(2), 7));
        log.hit(|n| lines.push(n));
        assert_eq!(lines.last(), Some(&7));
    }

    #[test]
    fn many_addresses_cannot_grow_the_table() {
        let t = Arc::new(PerIp::with_capacity(&limits(10, 0.001, 5), 100));
        let now = Instant::now();
        let mut held = Vec::new();
        // 50 addresses keep a socket open; 100,000 others come and go.
        for i in 0..50u32 {
            held.push(t.admit(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), now));
        }
        for i in 0..100_000u32 {
            let v = t.admit(IpAddr::from((0x0b00_0000 + i).to_be_bytes()), now);
            assert!(matches!(v, Verdict::Admit(Some(_))), "{i}: {v:?}");
            assert!(t.tracked() <= 100);
        }
        // The ones holding sockets are still counted.
        drop(held);
        assert!(t.tracked() <= 100);
        let map = t.lock();
        assert!(map.values().filter(|e| e.conns > 0).count() == 0);
    }
}
