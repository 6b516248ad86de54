//! Event expiry. An Event is kept for the event TTL after it last happened (one hour by
//! default, as Kubernetes' `--event-ttl`), and at most `max` Events are kept in all, the
//! oldest going first: a node that churns pods records several Events per pod, and without a
//! bound they would grow the store, and the server's memory, for as long as it runs.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use serde::Deserialize;
use skiff_api::ApiError;

use super::api;
use crate::registry::Registry;

/// Events deleted per store transaction.
const BATCH: usize = 256;

pub struct EventExpiry {
    pub reg: Arc<Registry>,
    pub ttl: Duration,
    /// Events kept at most; 0: no limit.
    pub max: usize,
}

/// When an Event last happened: `lastTimestamp`, else `eventTime` (events.k8s.io), else when
/// it was created. Seconds since the epoch.
fn last_seen(ev: &Event) -> i64 {
    ev.last_timestamp
        .as_ref()
        .map(|t| t.0)
        .or(ev.event_time.as_ref().map(|t| t.0))
        .or(ev.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .map(|t| t.as_second())
        .unwrap_or(0)
}

/// Which Events go, given (last seen, key) for each: those older than `ttl` at `now`, and the
/// oldest beyond `max`.
fn expired<K: Clone + Ord>(mut seen: Vec<(i64, K)>, now: i64, ttl: Duration, max: usize) -> Vec<K> {
    seen.sort();
    let over = if max == 0 {
        0
    } else {
        seen.len().saturating_sub(max)
    };
    let oldest_kept = now - ttl.as_secs() as i64;
    seen.into_iter()
        .enumerate()
        .filter(|(i, (t, _))| *i < over || *t < oldest_kept)
        .map(|(_, (_, k))| k)
        .collect()
}

impl EventExpiry {
    /// One pass; returns how many Events were deleted.
    pub fn check(&self) -> Result<usize, ApiError> {
        let events = api::resource::<Event>();
        let (items, _) = self
            .reg
            .store()
            .list_shared(&events.key_prefix())
            .map_err(|e| crate::registry::store_err(events, "", e))?;
        let seen = items
            .iter()
            .map(|raw| {
                // One that does not decode counts as as old as can be.
                let ev = Event::deserialize(&**raw).unwrap_or_default();
                let m = &ev.metadata;
                let key = (
                    m.namespace.clone().unwrap_or_else(|| "default".into()),
                    m.name.clone().unwrap_or_default(),
                    api::revision(m),
                );
                (last_seen(&ev), key)
            })
            .collect();
        drop(items);
        let gone = expired(seen, chrono::Utc::now().timestamp(), self.ttl, self.max);
        let mut deleted = 0;
        for batch in gone.chunks(BATCH) {
            deleted += self.reg.delete_unchanged(events, batch)?;
        }
        if deleted > 0 {
            tracing::debug!(deleted, "expired events deleted");
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn old_events_and_the_oldest_beyond_the_limit_go() {
        let ttl = Duration::from_secs(3600);
        let now = 10_000;
        let seen = vec![
            (now - 4000, "old"),
            (now - 10, "b"),
            (now - 20, "a"),
            (now, "c"),
        ];
        assert_eq!(expired(seen.clone(), now, ttl, 0), vec!["old"]);
        // At most two: the TTL takes "old", the limit "a" (the oldest of the rest).
        assert_eq!(expired(seen.clone(), now, ttl, 2), vec!["old", "a"]);
        assert!(expired(seen, now, ttl, 10).len() == 1);
    }

    #[test]
    fn an_event_is_as_old_as_its_last_occurrence() {
        let ev = json!({"lastTimestamp": "2026-01-01T00:10:00Z",
                        "metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}});
        let created = json!({"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}});
        let micro = json!({"eventTime": "2026-01-01T00:00:00.123456Z"});
        let seen = |v| last_seen(&serde_json::from_value(v).unwrap());
        assert_eq!(seen(ev) - seen(created.clone()), 600);
        assert_eq!(seen(micro), seen(created));
    }
}
