//! Fair shares of the API between clients, after Kubernetes' API Priority and Fairness in
//! small: each client (its authenticated user, else its address) has a token bucket of
//! requests and a cap on open watches; beyond either it is answered 429 `TooManyRequests`
//! with `Retry-After`, which client-go and kubectl honour by waiting and retrying.
//!
//! Requests fall in three classes, as APF's priority levels:
//! - `system:masters` is exempt (APF's `exempt` level): the admin's kubectl and tools;
//! - nodes (`system:nodes`) have their own class, so a noisy user cannot take their share:
//!   heartbeats and status updates never wait behind a flood (APF's `system` level);
//! - everyone else, and requests with no user (by address), share the workload class.
//!
//! Each class has its own seats (requests being handled at once; watches are long-running
//! and take none), so a class that is full turns away only its own requests. The control
//! plane's own loops (controllers, scheduler, garbage collection) read and write the registry
//! in-process and never pass through here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::{UserInfo, MASTERS, NODES};

/// Requests per second a client may keep up (`--client-qps`). Above kubectl's own limit
/// (50/s, burst 300) and client-go's default (5/s, burst 10), so neither ever meets it.
pub const CLIENT_QPS: f64 = 100.0;
/// Requests a client may send at once after a quiet spell (`--client-burst`).
pub const CLIENT_BURST: u32 = 400;
/// Requests per second one node may keep up, and its burst. A pod start costs its agent
/// about seven requests (a TokenRequest, three status writes, three events), and an agent
/// starts up to about 60 wasm pods a second: a node starting pods as fast as it can stays
/// within this, and its heartbeats with it. A node beyond it is answered 429 with
/// `Retry-After`, which the agent's client honours.
pub const NODE_QPS: f64 = 500.0;
pub const NODE_BURST: u32 = 1000;
/// Requests of the workload class handled at once (Kubernetes' `--max-requests-inflight`).
pub const WORKLOAD_SEATS: usize = 400;
/// Requests of nodes handled at once, apart from the workload class's seats.
pub const NODE_SEATS: usize = 200;
/// Watches one client may hold open at once (`--max-watches-per-client`): a controller
/// watches a few dozen kinds at most.
pub const MAX_WATCHES_PER_CLIENT: usize = 100;
/// Clients tracked before buckets that have refilled are forgotten (they would admit as a new
/// one does, so nothing is lost).
const MAX_TRACKED: usize = 16_384;

/// How requests are shared out.
#[derive(Debug, Clone)]
pub struct FairnessConfig {
    /// Off: every request is admitted (benchmarks compare with it).
    pub enabled: bool,
    pub client_qps: f64,
    pub client_burst: u32,
    pub node_qps: f64,
    pub node_burst: u32,
    pub workload_seats: usize,
    pub node_seats: usize,
    pub max_watches_per_client: usize,
}

impl Default for FairnessConfig {
    fn default() -> Self {
        FairnessConfig {
            enabled: true,
            client_qps: CLIENT_QPS,
            client_burst: CLIENT_BURST,
            node_qps: NODE_QPS,
            node_burst: NODE_BURST,
            workload_seats: WORKLOAD_SEATS,
            node_seats: NODE_SEATS,
            max_watches_per_client: MAX_WATCHES_PER_CLIENT,
        }
    }
}

/// A client's share of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Exempt,
    Node,
    Workload,
}

/// Who a request is counted against: its user, else the address it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Client {
    pub class: Class,
    key: String,
}

impl Client {
    pub fn user(user: &UserInfo) -> Client {
        let class = if user.in_group(MASTERS) {
            Class::Exempt
        } else if user.in_group(NODES) {
            Class::Node
        } else {
            Class::Workload
        };
        Client {
            class,
            key: format!("user:{}", user.name),
        }
    }

    pub fn address(ip: std::net::IpAddr) -> Client {
        Client {
            class: Class::Workload,
            key: format!("address:{ip}"),
        }
    }
}

/// A token bucket: `rate` tokens a second up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: rate.max(f64::MIN_POSITIVE),
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = self.at.max(now);
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Full again by `now` (nothing lost if forgotten).
    fn full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }
}

/// A 429 answer: what was exceeded and when to come back.
#[derive(Debug, Clone, PartialEq)]
pub struct TooManyRequests {
    pub message: String,
    pub retry_after: Duration,
}

impl TooManyRequests {
    /// Whole seconds, at least 1 (`Retry-After` has no fractions).
    pub fn retry_after_seconds(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }

    /// 429 with a `TooManyRequests` Status (`details.retryAfterSeconds`) and `Retry-After`.
    pub fn response(&self) -> Response {
        let secs = self.retry_after_seconds();
        let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": "TooManyRequests",
            "details": {"retryAfterSeconds": secs}, "code": 429});
        let mut r = super::json_response(StatusCode::TOO_MANY_REQUESTS, &status);
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        r
    }
}

/// A request being handled: holds its class's seat until dropped.
#[derive(Debug)]
pub struct Admitted {
    _seat: Option<OwnedSemaphorePermit>,
}

/// An open watch, counted against its client until dropped.
#[derive(Debug)]
pub struct WatchSlot {
    fairness: Arc<Fairness>,
    key: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut w = self
            .fairness
            .watches
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = w.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.key);
            }
        }
    }
}

/// The buckets, seats and watch counts of all clients.
#[derive(Debug)]
pub struct Fairness {
    config: FairnessConfig,
    buckets: Mutex<HashMap<String, TokenBucket>>,
    watches: Mutex<HashMap<String, usize>>,
    workload_seats: Arc<Semaphore>,
    node_seats: Arc<Semaphore>,
}

impl Fairness {
    pub fn new(config: FairnessConfig) -> Arc<Self> {
        Arc::new(Fairness {
            workload_seats: Arc::new(Semaphore::new(config.workload_seats)),
            node_seats: Arc::new(Semaphore::new(config.node_seats)),
            config,
            buckets: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
        })
    }

    /// Admits one request of `client` (`long_running`: a watch, which takes no seat).
    pub fn admit(&self, client: &Client, long_running: bool) -> Result<Admitted, TooManyRequests> {
        self.admit_at(client, long_running, Instant::now())
    }

    fn admit_at(
        &self,
        client: &Client,
        long_running: bool,
        now: Instant,
    ) -> Result<Admitted, TooManyRequests> {
        if !self.config.enabled || client.class == Class::Exempt {
            return Ok(Admitted { _seat: None });
        }
        let (rate, burst, seats) = match client.class {
            Class::Node => (
                self.config.node_qps,
                self.config.node_burst,
                &self.node_seats,
            ),
            _ => (
                self.config.client_qps,
                self.config.client_burst,
                &self.workload_seats,
            ),
        };
        {
            let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
            if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&client.key) {
                buckets.retain(|_, b| !b.full(now));
            }
            let bucket = buckets
                .entry(client.key.clone())
                .or_insert_with(|| TokenBucket::new(rate, burst, now));
            bucket.take(now).map_err(|wait| TooManyRequests {
                message: format!(
                    "too many requests from {}, please try again later",
                    client.key
                ),
                retry_after: wait,
            })?;
        }
        if long_running {
            return Ok(Admitted { _seat: None });
        }
        match seats.clone().try_acquire_owned() {
            Ok(seat) => Ok(Admitted { _seat: Some(seat) }),
            Err(_) => Err(TooManyRequests {
                message: "too many requests are being handled, please try again later".into(),
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Counts one more open watch of `client`, within [`FairnessConfig::max_watches_per_client`].
    pub fn watch(self: &Arc<Self>, client: &Client) -> Result<Option<WatchSlot>, TooManyRequests> {
        if !self.config.enabled || client.class == Class::Exempt {
            return Ok(None);
        }
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let n = w.entry(client.key.clone()).or_insert(0);
        if *n >= self.config.max_watches_per_client {
            return Err(TooManyRequests {
                message: format!(
                    "too many open watches from {} (at most {}), please try again later",
                    client.key, self.config.max_watches_per_client
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        *n += 1;
        Ok(Some(WatchSlot {
            fairness: self.clone(),
            key: client.key.clone(),
        }))
    }
}

/// Keeps `slot` until the response's body is dropped (the watch ends).
pub fn hold_until_done(resp: Response, slot: Option<WatchSlot>) -> Response {
    let Some(slot) = slot else {
        return resp;
    };
    resp.map(|body| {
        axum::body::Body::new(Held {
            inner: body,
            _slot: slot,
        })
    })
}

struct Held {
    inner: axum::body::Body,
    _slot: WatchSlot,
}

impl axum::body::HttpBody for Held {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> Client {
        Client::user(&UserInfo {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5, t0);
        for _ in 0..5 {
            b.take(t0).unwrap();
        }
        let wait = b.take(t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // A tenth of a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(100);
        b.take(t1).unwrap();
        assert!(b.take(t1).is_err());
        // Never more than the burst, however long the quiet.
        let t2 = t1 + Duration::from_secs(3600);
        assert!(b.full(t2));
        for _ in 0..5 {
            b.take(t2).unwrap();
        }
        assert!(b.take(t2).is_err());
    }

    #[test]
    fn a_noisy_client_is_limited_and_others_are_not() {
        let f = Fairness::new(FairnessConfig {
            client_qps: 1.0,
            client_burst: 3,
            ..FairnessConfig::default()
        });
        let t0 = Instant::now();
        let (noisy, quiet) = (user("alice", &[]), user("bob", &[]));
        for _ in 0..3 {
            f.admit_at(&noisy, false, t0).unwrap();
        }
        let refused = f.admit_at(&noisy, false, t0).unwrap_err();
        assert_eq!(refused.retry_after_seconds(), 1);
        let resp = refused.response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        f.admit_at(&quiet, false, t0).unwrap();
        // The admin is exempt, nodes draw on their own buckets.
        let admin = user("system:admin", &[MASTERS]);
        let node = user("system:node:n1", &[NODES]);
        assert_eq!(node.class, Class::Node);
        for _ in 0..100 {
            f.admit_at(&admin, false, t0).unwrap();
        }
        for _ in 0..10 {
            f.admit_at(&node, false, t0).unwrap();
        }
    }

    #[test]
    fn a_full_class_turns_away_only_its_own_requests() {
        let f = Fairness::new(FairnessConfig {
            workload_seats: 2,
            node_seats: 1,
            ..FairnessConfig::default()
        });
        let t0 = Instant::now();
        let held: Vec<_> = (0..2)
            .map(|i| f.admit_at(&user(&format!("u{i}"), &[]), false, t0).unwrap())
            .collect();
        assert!(f.admit_at(&user("u3", &[]), false, t0).is_err());
        // Watches take no seat; nodes have their own.
        f.admit_at(&user("u3", &[]), true, t0).unwrap();
        let node = user("system:node:n1", &[NODES]);
        let seat = f.admit_at(&node, false, t0).unwrap();
        assert!(f.admit_at(&node, false, t0).is_err());
        drop(seat);
        f.admit_at(&node, false, t0).unwrap();
        drop(held);
        f.admit_at(&user("u3", &[]), false, t0).unwrap();
    }

    #[test]
    fn watches_are_capped_per_client_and_freed_when_they_end() {
        let f = Fairness::new(FairnessConfig {
            max_watches_per_client: 2,
            ..FairnessConfig::default()
        });
        let alice = user("alice", &[]);
        let w1 = f.watch(&alice).unwrap();
        let _w2 = f.watch(&alice).unwrap();
        let refused = f.watch(&alice).unwrap_err();
        assert!(refused.message.contains("watches"), "{}", refused.message);
        assert!(f.watch(&user("bob", &[])).unwrap().is_some());
        drop(w1);
        assert!(f.watch(&alice).unwrap().is_some());
        // Unauthenticated clients count by address.
        let ip = Client::address("10.0.0.9".parse().unwrap());
        assert_eq!(ip.class, Class::Workload);
        assert!(f.watch(&ip).unwrap().is_some());
    }

    #[test]
    fn refilled_buckets_are_forgotten_when_too_many_clients_are_tracked() {
        let f = Fairness::new(FairnessConfig::default());
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED {
            f.admit_at(
                &Client::address(std::net::IpAddr::from([10, 0, (i >> 8) as u8, i as u8])),
                true,
                t0,
            )
            .unwrap();
        }
        assert_eq!(f.buckets.lock().unwrap().len(), MAX_TRACKED);
        let later = t0 + Duration::from_secs(60);
        f.admit_at(&user("new", &[]), true, later).unwrap();
        assert_eq!(f.buckets.lock().unwrap().len(), 1);
    }

    /// Figures, not a check: what admitting a request costs.
    /// `cargo test -p skiff-control --release --lib admit_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "prints figures"]
    fn admit_cost() {
        let f = Fairness::new(FairnessConfig {
            client_qps: 1e12,
            client_burst: u32::MAX,
            ..FairnessConfig::default()
        });
        let clients: Vec<Client> = (0..1000)
            .map(|i| user(&format!("u{i}"), &["dev"]))
            .collect();
        const N: usize = 1_000_000;
        let t = Instant::now();
        for i in 0..N {
            drop(f.admit(&clients[i % clients.len()], false).unwrap());
        }
        eprintln!(
            "admit: {:?} a request ({} clients)",
            t.elapsed() / N as u32,
            clients.len()
        );
    }
}
