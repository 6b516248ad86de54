//! What every store back end must do, as functions over a fresh [`DynStore`], run against
//! the embedded SQLite store and against a real etcd (started on loopback ports of its own; skipped, saying so, only
//! when no `etcd` binary is installed).
//!
//! Revisions are compared for order, never counted: several stores under different prefixes
//! share one etcd, whose revision counts every write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use skiff_api::limits::MAX_OBJECT_BYTES;

use super::{DynStore, EventType, Op, StoreError};

fn obj(name: &str) -> Value {
    json!({"metadata": {"name": name}})
}

fn rv(v: &Value) -> u64 {
    skiff_api::meta::resource_version(v).expect("a resourceVersion")
}

fn create(key: &str, name: &str) -> Op {
    Op::Create {
        key: key.into(),
        value: obj(name),
    }
}

/// Creates stamp the revision; a second create, a stale update and a missing key are refused,
/// and a refused transaction changes nothing, also the ops before the failing one.
pub fn revisions_and_conflicts(s: DynStore) {
    let a = "/registry/pods/default/a";
    let before = s.revision();
    let c = s.txn(vec![create(a, "a")]).unwrap();
    assert!(c.revision > before);
    assert_eq!(rv(&c.objects[0]), c.revision);
    assert_eq!(rv(&s.get(a).unwrap().unwrap()), c.revision);
    assert_eq!(rv(&s.get_latest(a).unwrap().unwrap()), c.revision);
    assert!(matches!(
        s.txn(vec![create(a, "a")]),
        Err(StoreError::AlreadyExists(_))
    ));
    let c2 = s
        .txn(vec![Op::Update {
            key: a.into(),
            value: obj("a"),
            expect: Some(c.revision),
        }])
        .unwrap();
    assert!(c2.revision > c.revision);
    let stale = s.txn(vec![
        create("/registry/pods/default/b", "b"),
        Op::Update {
            key: a.into(),
            value: obj("a"),
            expect: Some(c.revision),
        },
    ]);
    match stale {
        Err(StoreError::Conflict {
            expected, current, ..
        }) => assert_eq!((expected, current), (c.revision, c2.revision)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(s.get("/registry/pods/default/b").unwrap().is_none());
    for op in [
        Op::Update {
            key: "/registry/pods/default/missing".into(),
            value: obj("missing"),
            expect: None,
        },
        Op::Delete {
            key: "/registry/pods/default/missing".into(),
            expect: None,
        },
    ] {
        assert!(matches!(s.txn(vec![op]), Err(StoreError::NotFound(_))));
    }
    // An update without an expected revision takes any.
    let c3 = s
        .txn(vec![Op::Update {
            key: a.into(),
            value: json!({"metadata": {"name": "a"}, "spec": {"x": 1}}),
            expect: None,
        }])
        .unwrap();
    let (items, at) = s.list("/registry/pods/").unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(rv(&items[0]), c3.revision);
    assert_eq!(items[0]["spec"]["x"], 1);
    assert!(at >= c3.revision);
    assert!(s.revision() >= c3.revision);
}

/// A transaction of several ops lands under one revision; a delete returns the object's last
/// state stamped with the delete's revision.
pub fn transactions_and_deletes(s: DynStore) {
    let keys: Vec<String> = (0..5)
        .map(|i| format!("/registry/configmaps/ns/c{i}"))
        .collect();
    let c = s
        .txn(keys.iter().map(|k| create(k, "c")).collect())
        .unwrap();
    assert_eq!(c.objects.len(), 5);
    for k in &keys {
        assert_eq!(rv(&s.get(k).unwrap().unwrap()), c.revision);
    }
    let d = s
        .txn(vec![Op::Delete {
            key: keys[0].clone(),
            expect: Some(c.revision),
        }])
        .unwrap();
    assert!(d.revision > c.revision);
    assert_eq!(rv(&d.objects[0]), d.revision);
    assert_eq!(d.objects[0]["metadata"]["name"], "c");
    assert!(s.get(&keys[0]).unwrap().is_none());
    // A listing is by prefix, and only that prefix.
    s.txn(vec![create("/registry/configmaps/other/x", "x")])
        .unwrap();
    assert_eq!(s.list("/registry/configmaps/ns/").unwrap().0.len(), 4);
    assert_eq!(s.list("/registry/configmaps/").unwrap().0.len(), 5);
    assert_eq!(s.list("/registry/secrets/").unwrap().0.len(), 0);
}

/// An object larger than the store keeps is refused and changes nothing.
pub fn objects_past_the_size_limit_are_refused(s: DynStore) {
    let key = "/registry/configmaps/default/big";
    let big = |n: usize| json!({"metadata": {"name": "big"}, "data": {"a": "x".repeat(n)}});
    let e = s
        .txn(vec![Op::Create {
            key: key.into(),
            value: big(MAX_OBJECT_BYTES),
        }])
        .unwrap_err();
    assert!(matches!(e, StoreError::TooLarge { .. }), "{e}");
    assert!(s.get(key).unwrap().is_none());
    s.txn(vec![Op::Create {
        key: key.into(),
        value: big(MAX_OBJECT_BYTES - 1000),
    }])
    .unwrap();
}

async fn next_event(w: &mut super::WatchStream) -> Arc<super::Event> {
    tokio::time::timeout(Duration::from_secs(10), w.recv())
        .await
        .expect("an event within 10 s")
        .expect("the watch stays open")
}

/// A watch resumes from a revision with every later event under its prefix, in order, then
/// follows live: creations, updates (with the object before them) and deletions.
pub async fn watches_resume_in_order(s: DynStore) {
    let mut revs = Vec::new();
    for i in 0..5 {
        let c = s
            .txn(vec![create(&format!("/registry/pods/default/p{i}"), "p")])
            .unwrap();
        revs.push(c.revision);
    }
    let mut w = s.watch("/registry/pods/", revs[1]).unwrap();
    for want in &revs[2..] {
        let ev = next_event(&mut w).await;
        assert_eq!((ev.kind, ev.revision), (EventType::Added, *want));
        assert_eq!(rv(&ev.object), *want);
    }
    // Other prefixes are not sent.
    s.txn(vec![create("/registry/services/default/x", "x")])
        .unwrap();
    let mut next = obj("p");
    next["spec"] = json!({"changed": true});
    let u = s
        .txn(vec![Op::Update {
            key: "/registry/pods/default/p1".into(),
            value: next,
            expect: Some(revs[1]),
        }])
        .unwrap();
    let ev = next_event(&mut w).await;
    assert_eq!((ev.kind, ev.revision), (EventType::Modified, u.revision));
    assert_eq!(ev.key, "/registry/pods/default/p1");
    assert_eq!(ev.object["spec"]["changed"], true);
    let prev = ev
        .prev
        .as_ref()
        .expect("an update carries the object before it");
    assert_eq!(rv(prev), revs[1]);
    assert!(prev.get("spec").is_none());
    let d = s
        .txn(vec![Op::Delete {
            key: "/registry/pods/default/p0".into(),
            expect: None,
        }])
        .unwrap();
    let ev = next_event(&mut w).await;
    assert_eq!((ev.kind, ev.revision), (EventType::Deleted, d.revision));
    assert_eq!(ev.key, "/registry/pods/default/p0");
    assert_eq!(rv(&ev.object), d.revision);
    assert!(ev.prev.is_none(), "a deletion's object is its last state");
    // Watches are counted while open.
    assert!(s.watchers() >= 1);
    drop(w);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.watchers() != 0 {
        assert!(Instant::now() < deadline, "a closed watch is still counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A watch from the current revision sees only what follows, with a transaction's events
/// together under its revision.
pub async fn a_watch_from_now_sees_what_follows(s: DynStore) {
    s.txn(vec![create("/registry/pods/default/old", "old")])
        .unwrap();
    let (_, at) = s.list("/registry/pods/").unwrap();
    let mut w = s.watch("/registry/pods/", at).unwrap();
    let c = s
        .txn(vec![
            create("/registry/pods/default/n1", "n1"),
            create("/registry/pods/default/n2", "n2"),
        ])
        .unwrap();
    let a = next_event(&mut w).await;
    let b = next_event(&mut w).await;
    assert_eq!((a.revision, b.revision), (c.revision, c.revision));
    let mut keys = vec![a.key.clone(), b.key.clone()];
    keys.sort();
    assert_eq!(
        keys,
        vec!["/registry/pods/default/n1", "/registry/pods/default/n2"]
    );
}

/// Concurrent writers all succeed, each under a revision of its own, and all is readable.
pub fn concurrent_writers_get_distinct_revisions(s: DynStore) {
    const WRITERS: usize = 16;
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                s.txn(vec![create(&format!("/registry/pods/default/w{i}"), "w")])
                    .unwrap()
                    .revision
            })
        })
        .collect();
    let mut revs: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    revs.sort();
    revs.dedup();
    assert_eq!(revs.len(), WRITERS, "two writes shared a revision");
    let (items, at) = s.list("/registry/pods/").unwrap();
    assert_eq!(items.len(), WRITERS);
    assert!(at >= *revs.last().unwrap());
}

/// Concurrent compare-and-swap updates of one key: exactly one wins each round.
pub fn optimistic_concurrency_has_one_winner(s: DynStore) {
    let key = "/registry/configmaps/default/counter";
    let first = s.txn(vec![create(key, "counter")]).unwrap().revision;
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                s.txn(vec![Op::Update {
                    key: key.into(),
                    value: obj("counter"),
                    expect: Some(first),
                }])
                .is_ok()
            })
        })
        .collect();
    let won = writers
        .into_iter()
        .map(|w| w.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(won, 1);
}

/// Runs each conformance function against a back end made by `$store`: an expression giving
/// a fresh store and what must live as long as it (its directory, its etcd), or None to skip.
macro_rules! conformance_tests {
    ($store:expr) => {
        #[test]
        fn revisions_and_conflicts() {
            if let Some((s, _keep)) = $store {
                crate::store::conformance::revisions_and_conflicts(s);
            }
        }
        #[test]
        fn transactions_and_deletes() {
            if let Some((s, _keep)) = $store {
                crate::store::conformance::transactions_and_deletes(s);
            }
        }
        #[test]
        fn objects_past_the_size_limit_are_refused() {
            if let Some((s, _keep)) = $store {
                crate::store::conformance::objects_past_the_size_limit_are_refused(s);
            }
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn watches_resume_in_order() {
            if let Some((s, _keep)) = $store {
                crate::store::conformance::watches_resume_in_order(s).await;
            }
        }
        #[tokio::test]
        async fn a_watch_from_now_sees_what_follows() {
            if let Some((s, _keep)) = $store {
                crate::store::conformance::a_watch_from_now_sees_what_follows(s).await;
            }
        }
        #[test]
        fn concurrent_writers_get_distinct_revisions() {
            if let Some((s, _keep)) = $store {
                crate::store::conformance::concurrent_writers_get_distinct_revisions(s);
            }
        }
        #[test]
        fn optimistic_concurrency_has_one_winner() {
            if let Some((s, _keep)) = $store {
                crate::store::conformance::optimistic_concurrency_has_one_winner(s);
            }
        }
    };
}

mod sqlite {
    use super::super::sqlite::SqliteStore;
    use super::super::DynStore;

    /// A store in a temporary directory, removed after the test.
    fn store() -> Option<(DynStore, tempfile::TempDir)> {
        let dir = tempfile::tempdir().unwrap();
        let s: DynStore = std::sync::Arc::new(SqliteStore::open(dir.path()).unwrap());
        Some((s, dir))
    }

    conformance_tests!(store());
}

mod etcd {
    use super::super::etcd::EtcdStore;
    use super::super::DynStore;
    use crate::store::etcd::testing::{shared_etcd, unique_prefix};

    /// A store under a prefix of its own on the test process' etcd.
    fn store() -> Option<(DynStore, ())> {
        let etcd = shared_etcd()?;
        let mut config = etcd.config();
        config.prefix = unique_prefix();
        let s: DynStore = std::sync::Arc::new(EtcdStore::connect(&config).unwrap());
        Some((s, ()))
    }

    conformance_tests!(store());
}
