//! Several API servers behind one client, as k3s's agent load balancer: every request goes to
//! the current server, and sticks to it while it answers; a server that cannot be reached is
//! put in backoff (jittered, doubling, capped) and the request goes to the next one in turn, so
//! a node's watches, heartbeats and status writes move to a live server when theirs dies.
//!
//! The clones of a client share one [`Servers`], so they all move together. A server in backoff
//! is tried last rather than never: a request tries each server at most once, the live ones
//! first, and fails only when none answered.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::ClientError;

/// The first pause after a server could not be reached.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// The longest pause, however often a server failed.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The pause before a server that failed `failures` times in a row is preferred again:
/// 0.5 s doubling to 30 s, each within ±20 % so that many nodes do not come back at once.
pub fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let d = BACKOFF_INITIAL
        .saturating_mul(1 << (failures - 1).min(10))
        .min(BACKOFF_MAX);
    d.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
}

/// The API servers a client may talk to, and which one it talks to now.
#[derive(Debug)]
pub struct Servers {
    urls: Vec<String>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    current: usize,
    /// Per server: failures in a row, and until when it is in backoff.
    failures: Vec<u32>,
    retry_at: Vec<Option<Instant>>,
}

impl Servers {
    /// From one URL or a comma-separated list (`https://10.0.0.1:6443,https://10.0.0.2:6443`).
    pub fn parse(list: &str) -> Result<Servers, ClientError> {
        let urls: Vec<String> = list
            .split(',')
            .map(|s| s.trim().trim_end_matches('/'))
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if urls.is_empty() {
            return Err(ClientError::Config("no API server URL given".into()));
        }
        for u in &urls {
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(ClientError::Config(format!(
                    "API server URL {u:?} must start with https://"
                )));
            }
        }
        let n = urls.len();
        Ok(Servers {
            urls,
            state: Mutex::new(State {
                current: 0,
                failures: vec![0; n],
                retry_at: vec![None; n],
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The server requests go to now.
    pub fn current(&self) -> &str {
        &self.urls[self.state().current]
    }

    /// The order one request tries the servers in: the current one, then the others in turn
    /// after it; those in backoff after all the others, the soonest out of backoff first.
    pub fn candidates(&self) -> Vec<usize> {
        let st = self.state();
        let now = Instant::now();
        let n = self.urls.len();
        let order = (0..n).map(|k| (st.current + k) % n);
        let (mut live, mut waiting): (Vec<usize>, Vec<usize>) =
            order.partition(|&i| st.retry_at[i].is_none_or(|t| t <= now));
        waiting.sort_by_key(|&i| st.retry_at[i]);
        live.append(&mut waiting);
        live
    }

    /// Server `i` answered: it becomes the current one (and stays so while it answers).
    pub fn succeeded(&self, i: usize) {
        let mut st = self.state();
        st.failures[i] = 0;
        st.retry_at[i] = None;
        if st.current != i {
            tracing::info!(from = %self.urls[st.current], to = %self.urls[i], "switched to another API server");
            st.current = i;
        }
    }

    /// Server `i` could not be reached: it goes into backoff, and when it was the current one,
    /// the next server not in backoff becomes current.
    pub fn failed(&self, i: usize) {
        let mut st = self.state();
        st.failures[i] = st.failures[i].saturating_add(1);
        let pause = backoff(st.failures[i]);
        let now = Instant::now();
        st.retry_at[i] = Some(now + pause);
        let n = self.urls.len();
        if n > 1 && st.current == i {
            let next = (1..n)
                .map(|k| (i + k) % n)
                .find(|&j| st.retry_at[j].is_none_or(|t| t <= now))
                .unwrap_or((i + 1) % n);
            st.current = next;
        }
        // One line when a server stops answering, not one for every request while it is down.
        if n > 1 && st.failures[i] == 1 {
            tracing::warn!(server = %self.urls[i], "API server unreachable; requests go to the next one");
        } else if n > 1 {
            tracing::debug!(server = %self.urls[i], failures = st.failures[i], retry_in = ?pause, "API server still unreachable");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_or_many() {
        let s = Servers::parse("https://a:6443/, https://b:6443").unwrap();
        assert_eq!(s.urls(), ["https://a:6443", "https://b:6443"]);
        assert_eq!(s.current(), "https://a:6443");
        assert!(Servers::parse(" , ").is_err());
        assert!(Servers::parse("a:6443").is_err());
    }

    #[test]
    fn moves_on_from_a_dead_server_and_sticks_to_a_live_one() {
        let s = Servers::parse("https://a,https://b,https://c").unwrap();
        assert_eq!(s.candidates(), [0, 1, 2]);
        s.failed(0);
        // The next one is current; the failed one is tried last.
        assert_eq!(s.current(), "https://b");
        assert_eq!(s.candidates(), [1, 2, 0]);
        s.succeeded(1);
        assert_eq!(s.current(), "https://b");
        // b dies too: c, then the two in backoff.
        s.failed(1);
        assert_eq!(s.current(), "https://c");
        let c = s.candidates();
        assert_eq!(c[0], 2);
        assert_eq!(c.len(), 3);
        // a answers again: it is current, and c is not preferred over it any more.
        s.succeeded(0);
        assert_eq!(s.candidates()[0], 0);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        assert_eq!(backoff(0), Duration::ZERO);
        for (n, base) in [(1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (40, 30.0)] {
            let d = backoff(n).as_secs_f64();
            assert!(d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9, "{n}: {d}");
        }
    }
}
