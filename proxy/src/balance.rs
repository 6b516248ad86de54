//! Choosing an endpoint.
//!
//! **Least outstanding requests, ties broken round-robin.** A skiff service mixes wasm and
//! OCI pods whose cost per request differs several-fold, and edge nodes differ in speed: an
//! endpoint that answers slower accumulates requests in flight and is chosen less, where
//! plain round-robin would keep feeding it its full share. When the endpoints are idle
//! (every count equal), the round-robin start makes consecutive requests visit every
//! endpoint in turn. Endpoint lists are small (replicas of one service), so the choice scans
//! them all instead of sampling two.
//!
//! An endpoint that refuses a connection sits out for [`EJECT_FOR`] (passive health
//! checking); one that does not answer within the connect timeout (a pod on a node that went
//! dark) sits out for [`EJECT_TIMED_OUT_FOR`], long enough for the control plane to notice the
//! node and take its endpoints away, so no further request waits on it. If every endpoint is
//! out, they are all tried anyway.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;

use crate::serve::Body;

/// How long an endpoint that refused a connection stays out of rotation.
pub const EJECT_FOR: Duration = Duration::from_secs(2);
/// How long an endpoint whose connection timed out stays out of rotation.
pub const EJECT_TIMED_OUT_FOR: Duration = Duration::from_secs(15);
/// Idle upstream connections kept per endpoint.
const MAX_IDLE: usize = 64;

/// One endpoint address and what the proxy knows about it. Shared by every route that
/// names it, and kept while any does, so counts and pooled connections survive updates.
pub struct Backend {
    pub addr: SocketAddr,
    inflight: AtomicUsize,
    down_until: Mutex<Option<Instant>>,
    idle: Mutex<Vec<SendRequest<Body>>>,
}

impl Backend {
    pub fn new(addr: SocketAddr) -> Backend {
        Backend {
            addr,
            inflight: AtomicUsize::new(0),
            down_until: Mutex::new(None),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Counts a request (or connection) in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Takes the endpoint out of rotation for [`EJECT_FOR`] (it refused a connection).
    pub fn eject(&self) {
        self.eject_for(EJECT_FOR);
    }

    /// Takes the endpoint out of rotation for `d`, unless it is already out for longer.
    pub fn eject_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut down = self.down_until.lock().expect("down");
        if down.is_none_or(|t| t < until) {
            *down = Some(until);
        }
    }

    /// Whether the endpoint is out of rotation now.
    pub fn is_ejected(&self) -> bool {
        self.is_down(Instant::now())
    }

    fn is_down(&self, now: Instant) -> bool {
        matches!(*self.down_until.lock().expect("down"), Some(t) if t > now)
    }

    /// A pooled connection that can take a request now, if any.
    pub fn take_idle(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().expect("idle");
        while let Some(s) = idle.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    pub fn put_idle(&self, s: SendRequest<Body>) {
        let mut idle = self.idle.lock().expect("idle");
        if idle.len() < MAX_IDLE {
            idle.push(s);
        }
    }
}

pub struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of one frontend at one moment. Replaced whole when endpoints change.
pub struct Route {
    pub backends: Vec<Arc<Backend>>,
    next: AtomicUsize,
}

impl Route {
    pub fn new(backends: Vec<Arc<Backend>>) -> Route {
        Route {
            backends,
            next: AtomicUsize::new(0),
        }
    }

    /// The endpoint for the next request, skipping those in `tried`.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut best: Option<(&Arc<Backend>, (bool, usize))> = None;
        for i in 0..n {
            let b = &self.backends[(start + i) % n];
            if tried.contains(&b.addr) {
                continue;
            }
            let rank = (b.is_down(now), b.inflight());
            if best.as_ref().is_none_or(|(_, r)| rank < *r) {
                best = Some((b, rank));
            }
        }
        best.map(|(b, _)| b.clone())
    }

    pub fn get(&self, addr: SocketAddr) -> Option<Arc<Backend>> {
        self.backends.iter().find(|b| b.addr == addr).cloned()
    }
}

/// `sessionAffinity: ClientIP`: a client keeps its endpoint while it is in rotation and the
/// client came back within the timeout.
pub struct Affinity {
    timeout: Duration,
    table: Mutex<HashMap<IpAddr, (SocketAddr, Instant)>>,
}

impl Affinity {
    pub fn new(timeout: Duration) -> Affinity {
        Affinity {
            timeout,
            table: Mutex::new(HashMap::new()),
        }
    }

    pub fn pick(
        &self,
        route: &Route,
        client: IpAddr,
        tried: &[SocketAddr],
    ) -> Option<Arc<Backend>> {
        let now = Instant::now();
        let mut t = self.table.lock().expect("affinity");
        if let Some((addr, seen)) = t.get(&client).copied() {
            if now.duration_since(seen) < self.timeout && !tried.contains(&addr) {
                if let Some(b) = route.get(addr).filter(|b| !b.is_down(now)) {
                    t.insert(client, (addr, now));
                    return Some(b);
                }
            }
        }
        let b = route.pick(tried)?;
        if t.len() > 65_536 {
            let timeout = self.timeout;
            t.retain(|_, (_, seen)| now.duration_since(*seen) < timeout);
        }
        t.insert(client, (b.addr, now));
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(n: u16) -> Route {
        Route::new(
            (0..n)
                .map(|i| {
                    Arc::new(Backend::new(SocketAddr::from((
                        [10, 88, 0, 2 + i as u8],
                        80,
                    ))))
                })
                .collect(),
        )
    }

    #[test]
    fn idle_endpoints_are_visited_in_turn() {
        let r = route(3);
        let picks: Vec<_> = (0..6).map(|_| r.pick(&[]).unwrap().addr.ip()).collect();
        let mut first: Vec<_> = picks[..3].to_vec();
        first.sort();
        first.dedup();
        assert_eq!(first.len(), 3, "{picks:?}");
        assert_eq!(picks[..3], picks[3..]);
    }

    #[test]
    fn busy_endpoints_are_avoided() {
        let r = route(3);
        let busy = r.backends[0].begin();
        let _busy2 = r.backends[0].begin();
        let _one = r.backends[1].begin();
        for _ in 0..5 {
            assert_eq!(r.pick(&[]).unwrap().addr, r.backends[2].addr);
        }
        drop(busy);
    }

    #[test]
    fn ejected_and_tried_endpoints_are_skipped() {
        let r = route(2);
        r.backends[0].eject();
        for _ in 0..4 {
            assert_eq!(r.pick(&[]).unwrap().addr, r.backends[1].addr);
        }
        assert_eq!(
            r.pick(&[r.backends[1].addr]).unwrap().addr,
            r.backends[0].addr,
            "an ejected endpoint is still tried when nothing else is left"
        );
        assert!(r.pick(&[r.backends[0].addr, r.backends[1].addr]).is_none());
        assert!(route(0).pick(&[]).is_none());
    }

    #[test]
    fn client_ip_affinity_sticks_until_the_endpoint_leaves() {
        let r = route(3);
        let a = Affinity::new(Duration::from_secs(60));
        let client: IpAddr = "10.88.0.50".parse().unwrap();
        let first = a.pick(&r, client, &[]).unwrap().addr;
        for _ in 0..5 {
            assert_eq!(a.pick(&r, client, &[]).unwrap().addr, first);
        }
        let other: IpAddr = "10.88.0.51".parse().unwrap();
        assert_ne!(a.pick(&r, other, &[]).unwrap().addr, first);
        let smaller = Route::new(
            r.backends
                .iter()
                .filter(|b| b.addr != first)
                .cloned()
                .collect(),
        );
        let moved = a.pick(&smaller, client, &[]).unwrap().addr;
        assert_ne!(moved, first);
        assert_eq!(a.pick(&smaller, client, &[]).unwrap().addr, moved);
    }
}
