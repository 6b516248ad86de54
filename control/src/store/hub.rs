//! The bounded window of recent events and their fan-out to watchers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;

use super::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change. `object` is the object after it (for a deletion, its last state); `prev` is
/// the object before an update (None for creations and deletions: a deletion's object
/// already is its last state). Both are shared, not copied: the store's view, the window
/// and every in-process cache hold the same allocation.
#[derive(Debug, Clone)]
pub struct Event {
    pub revision: u64,
    pub kind: EventType,
    pub key: String,
    pub object: Arc<Value>,
    pub prev: Option<Arc<Value>>,
    /// Bytes of the object as stored (JSON): what the window counts against its byte bound.
    pub size: usize,
}

/// Receives events in revision order. Ends (returns None) when the watcher falls too far
/// behind to be served from the window; the caller then re-lists, as after a 410.
pub type WatchStream = mpsc::Receiver<Arc<Event>>;

struct Watcher {
    prefix: String,
    /// The revision the watch started after: events up to it are not sent again.
    after: u64,
    tx: mpsc::Sender<Arc<Event>>,
}

struct Inner {
    /// The events, oldest first, each with when it was published.
    window: VecDeque<(Instant, Arc<Event>)>,
    /// Sum of `size` over the window (an update counts twice: it keeps its `prev` alive).
    bytes: usize,
    /// Revision before the first event in the window: a watch may resume from here on.
    floor: u64,
    watchers: Vec<Watcher>,
}

/// Keeps the last events, at most `capacity` of them and `max_bytes` of their objects, none
/// older than `max_age`, and fans them out. The byte bound keeps a burst of large objects
/// (thousands of pods created and deleted) from holding hundreds of megabytes: a watcher
/// further behind re-lists. The age bound gives that memory back once the burst is over, as
/// Kubernetes' watch cache shrinks to the events of its last 75 s: an object deleted long ago
/// is held by nothing else, and decoded it takes several times the bytes it was counted at.
pub struct Hub {
    inner: Mutex<Inner>,
    capacity: usize,
    max_bytes: usize,
    max_age: Duration,
    per_watcher: usize,
}

fn weight(ev: &Event) -> usize {
    if ev.prev.is_some() {
        2 * ev.size
    } else {
        ev.size
    }
}

impl Inner {
    /// Drops the oldest events while the window is past a bound: more events than `capacity`,
    /// more bytes than `max_bytes` (the newest event stays whatever its size), or published
    /// before `oldest`.
    fn trim(&mut self, capacity: usize, max_bytes: usize, oldest: Option<Instant>) {
        while let Some((at, first)) = self.window.front() {
            let over = self.window.len() > capacity
                || (self.bytes > max_bytes && self.window.len() > 1)
                || oldest.is_some_and(|t| *at < t);
            if !over {
                break;
            }
            self.bytes -= weight(first);
            self.floor = first.revision;
            self.window.pop_front();
        }
    }
}

impl Hub {
    /// `start` is the store's revision when the hub was created: resuming from before it is 410.
    pub fn new(start: u64, capacity: usize, max_bytes: usize, max_age: Duration) -> Self {
        Hub {
            inner: Mutex::new(Inner {
                window: VecDeque::new(),
                bytes: 0,
                floor: start,
                watchers: Vec::new(),
            }),
            capacity,
            max_bytes,
            max_age,
            per_watcher: 4096,
        }
    }

    /// Records committed events. Called in revision order, once they are durable; never
    /// blocks (a watcher whose channel is full is dropped).
    pub fn publish(&self, events: Vec<Event>) {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("hub lock");
        inner.trim(self.capacity, self.max_bytes, now.checked_sub(self.max_age));
        for ev in events {
            let ev = Arc::new(ev);
            inner.bytes += weight(&ev);
            inner.window.push_back((now, ev.clone()));
            inner.trim(self.capacity, self.max_bytes, None);
            // A watcher that is full or gone is dropped: its stream ends and it re-lists.
            inner.watchers.retain(|w| {
                if ev.revision <= w.after || !ev.key.starts_with(&w.prefix) {
                    return !w.tx.is_closed();
                }
                w.tx.try_send(ev.clone()).is_ok()
            });
        }
    }

    /// Drops the events older than the window's age as of `now`. Publishing does it too; a
    /// store with nothing to publish calls this now and then, so an idle window empties.
    pub fn prune(&self, now: Instant) {
        let mut inner = self.inner.lock().expect("hub lock");
        inner.trim(self.capacity, self.max_bytes, now.checked_sub(self.max_age));
    }

    /// Events in the window.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().expect("hub lock").window.len()
    }

    /// Subscribes to events under `prefix` after `from`; `current` is the store's revision.
    /// Events up to `from` that are published later (a listing may run ahead of the hub)
    /// are not sent.
    pub fn watch(&self, prefix: &str, from: u64, current: u64) -> Result<WatchStream, StoreError> {
        let mut inner = self.inner.lock().expect("hub lock");
        inner.trim(
            self.capacity,
            self.max_bytes,
            Instant::now().checked_sub(self.max_age),
        );
        // Watches that were closed go now, not at the next event they would have received.
        inner.watchers.retain(|w| !w.tx.is_closed());
        if from < inner.floor && from < current {
            return Err(StoreError::Expired {
                requested: from,
                oldest: inner.floor,
            });
        }
        let backlog: Vec<Arc<Event>> = inner
            .window
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.revision > from && e.key.starts_with(prefix))
            .cloned()
            .collect();
        let (tx, rx) = mpsc::channel(self.per_watcher.max(backlog.len() + 64));
        for e in backlog {
            tx.try_send(e).expect("channel sized for the backlog");
        }
        inner.watchers.push(Watcher {
            prefix: prefix.to_string(),
            after: from,
            tx,
        });
        Ok(rx)
    }

    /// Open watches (closed ones are removed first).
    pub fn watcher_count(&self) -> usize {
        let mut inner = self.inner.lock().expect("hub lock");
        inner.watchers.retain(|w| !w.tx.is_closed());
        inner.watchers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(revision: u64, size: usize, update: bool) -> Event {
        let object = Arc::new(json!({"metadata": {"name": "p"}}));
        Event {
            revision,
            kind: if update {
                EventType::Modified
            } else {
                EventType::Added
            },
            key: format!("/registry/pods/default/p{revision}"),
            prev: update.then(|| object.clone()),
            object,
            size,
        }
    }

    #[tokio::test]
    async fn the_window_is_bounded_by_bytes_as_well_as_events() {
        // Room for 100 events but only 10 KB: ten 1 KB creations, or five 1 KB updates.
        let hub = Hub::new(0, 100, 10_000, Duration::from_secs(3600));
        hub.publish((1..=20).map(|r| event(r, 1_000, false)).collect());
        assert!(matches!(
            hub.watch("/registry/pods/", 9, 20),
            Err(StoreError::Expired { oldest: 10, .. })
        ));
        let mut w = hub.watch("/registry/pods/", 10, 20).unwrap();
        for want in 11..=20 {
            assert_eq!(w.recv().await.unwrap().revision, want);
        }
        hub.publish((21..=30).map(|r| event(r, 1_000, true)).collect());
        assert!(hub.watch("/registry/pods/", 24, 30).is_err());
        assert!(hub.watch("/registry/pods/", 25, 30).is_ok());
        // One event larger than the bound is still kept: the newest can always be resumed from.
        hub.publish(vec![event(31, 50_000, false)]);
        assert!(hub.watch("/registry/pods/", 30, 31).is_ok());
    }

    #[tokio::test]
    async fn events_older_than_the_window_age_go_even_when_nothing_is_published() {
        let age = Duration::from_secs(75);
        let hub = Hub::new(0, 100, 1 << 20, age);
        hub.publish((1..=10).map(|r| event(r, 1_000, r > 1)).collect());
        let published = Instant::now();
        hub.prune(published + age / 2);
        assert_eq!(hub.len(), 10, "events younger than the age stay");
        assert!(hub.watch("/registry/pods/", 0, 10).is_ok());
        hub.prune(published + age + Duration::from_secs(1));
        assert_eq!(hub.len(), 0, "events older than the age are dropped");
        assert!(matches!(
            hub.watch("/registry/pods/", 5, 10),
            Err(StoreError::Expired { oldest: 10, .. })
        ));
        // The newest revision can still be watched from.
        let mut w = hub.watch("/registry/pods/", 10, 10).unwrap();
        hub.publish(vec![event(11, 1_000, false)]);
        assert_eq!(w.recv().await.unwrap().revision, 11);
    }
}
