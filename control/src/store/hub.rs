//! The bounded window of recent events and their fan-out to watchers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

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

/// One change. `prev` is the object before the change (None for creations).
#[derive(Debug, Clone)]
pub struct Event {
    pub revision: u64,
    pub kind: EventType,
    pub key: String,
    pub object: Value,
    pub prev: Option<Value>,
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
    window: VecDeque<Arc<Event>>,
    /// Revision before the first event in the window: a watch may resume from here on.
    floor: u64,
    watchers: Vec<Watcher>,
}

/// Keeps the last `capacity` events and fans them out.
pub struct Hub {
    inner: Mutex<Inner>,
    capacity: usize,
    per_watcher: usize,
}

impl Hub {
    /// `start` is the store's revision when the hub was created: resuming from before it is 410.
    pub fn new(start: u64, capacity: usize) -> Self {
        Hub {
            inner: Mutex::new(Inner {
                window: VecDeque::new(),
                floor: start,
                watchers: Vec::new(),
            }),
            capacity,
            per_watcher: 4096,
        }
    }

    /// Records committed events. Called in revision order, once they are durable; never
    /// blocks (a watcher whose channel is full is dropped).
    pub fn publish(&self, events: Vec<Event>) {
        let mut inner = self.inner.lock().expect("hub lock");
        for ev in events {
            let ev = Arc::new(ev);
            inner.window.push_back(ev.clone());
            if inner.window.len() > self.capacity {
                if let Some(old) = inner.window.pop_front() {
                    inner.floor = old.revision;
                }
            }
            // A watcher that is full or gone is dropped: its stream ends and it re-lists.
            inner.watchers.retain(|w| {
                if ev.revision <= w.after || !ev.key.starts_with(&w.prefix) {
                    return !w.tx.is_closed();
                }
                w.tx.try_send(ev.clone()).is_ok()
            });
        }
    }

    /// Subscribes to events under `prefix` after `from`; `current` is the store's revision.
    /// Events up to `from` that are published later (a listing may run ahead of the hub)
    /// are not sent.
    pub fn watch(&self, prefix: &str, from: u64, current: u64) -> Result<WatchStream, StoreError> {
        let mut inner = self.inner.lock().expect("hub lock");
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
