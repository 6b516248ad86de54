//! Lists as Kubernetes serves them: `limit` + `continue` pages cut from one snapshot,
//! `remainingItemCount`, `resourceVersion` + `resourceVersionMatch`, and the errors for a
//! continue token that is bad (400) or too old (410 with a fresh token), and for a
//! resourceVersion the store has not reached (504 after waiting a while).
//!
//! The first page of a paged list keeps the whole listing (its objects at one revision) for
//! [`KEEP`]; the pages after it are cut from that snapshot, so a client paging through sees
//! one consistent list even while objects change. The continue token names the snapshot's
//! revision and the key to start from, as Kubernetes' does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use skiff_api::fields::FieldSelector;
use skiff_api::selector::Selector;
use skiff_api::{meta, ApiError, Resource};

use crate::registry::Registry;

/// How long a snapshot stays to be paged through: Kubernetes' default compaction interval
/// (after which etcd no longer answers at that revision).
pub const KEEP: Duration = Duration::from_secs(300);
/// Snapshots kept at most; the oldest goes first.
const MAX_SNAPSHOTS: usize = 64;
/// How long a read waits for the store to reach a resourceVersion it was asked for, as the
/// Kubernetes watch cache does, before answering 504.
pub const WAIT_FOR_REVISION: Duration = Duration::from_secs(3);

/// A listing at one revision, sorted by key.
struct Snapshot {
    items: Arc<Vec<(String, Value)>>,
    taken: Instant,
}

/// The snapshots paged lists are cut from, by list prefix and revision.
#[derive(Default)]
pub struct Snapshots {
    kept: Mutex<HashMap<(String, u64), Snapshot>>,
}

/// What a list request asks for (its query parameters).
#[derive(Debug, Default, Clone)]
pub struct ListRequest {
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

/// One page: the items, and the list metadata to answer with.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Value>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<u64>,
}

impl Page {
    /// `metadata` of the list answer.
    pub fn list_meta(&self) -> Value {
        let mut m = json!({"resourceVersion": self.resource_version.to_string()});
        if let Some(c) = &self.continue_token {
            m["continue"] = json!(c);
        }
        if let Some(n) = self.remaining {
            m["remainingItemCount"] = json!(n);
        }
        m
    }
}

/// A continue token: the revision of the snapshot (-1: the latest, after an expired token)
/// and the key (relative to the list's prefix) to start from.
#[derive(Debug, PartialEq, Eq)]
struct Token {
    rv: i64,
    start: String,
}

fn encode_token(rv: i64, start: &str) -> String {
    let raw = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start}).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_token(s: &str) -> Result<Token, ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("invalid continue token: {why}"));
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    let raw = URL_SAFE_NO_PAD
        .decode(s)
        .or_else(|_| URL_SAFE.decode(s))
        .or_else(|_| STANDARD.decode(s))
        .map_err(|_| bad("continue key is not valid: illegal base64 data"))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad("continue key is not valid"))?;
    if v.get("v").and_then(Value::as_str) != Some("meta.k8s.io/v1") {
        return Err(bad(
            "continue key is not valid: server does not recognize this encoded key",
        ));
    }
    let rv = v.get("rv").and_then(Value::as_i64).unwrap_or(0);
    let start = v.get("start").and_then(Value::as_str).unwrap_or("");
    if rv == 0 || start.is_empty() || start.contains("..") || start.starts_with('/') {
        return Err(bad("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)"));
    }
    Ok(Token {
        rv,
        start: start.to_string(),
    })
}

/// The answer to an expired continue token: 410 with a token that continues from the same
/// key at the latest revision (the rest of the list is then not consistent with the first
/// pages, as Kubernetes says).
pub fn expired(start: &str) -> Value {
    let mut e = ApiError::gone("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.").to_status();
    e["metadata"] = json!({"continue": encode_token(-1, start)});
    e
}

/// The answer to a resourceVersion the store has not reached: 504 with the
/// `ResourceVersionTooLarge` cause and a retry hint, as Kubernetes answers.
pub fn too_large(requested: u64, current: u64) -> Value {
    let mut s = ApiError::timeout(format!(
        "Timeout: Too large resource version: {requested}, current: {current}"
    ))
    .to_status();
    s["details"] = json!({
        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
        "retryAfterSeconds": 1,
    });
    s
}

/// Why a list cannot be answered as an ordinary error: the caller renders these bodies.
#[derive(Debug)]
pub enum ListError {
    Api(ApiError),
    /// A full `Status` body with its code (410 with a fresh token, 504 with a retry hint).
    Status(u16, Value),
}

impl From<ApiError> for ListError {
    fn from(e: ApiError) -> Self {
        ListError::Api(e)
    }
}

fn invalid_options(causes: Vec<skiff_api::Cause>) -> ApiError {
    let mut e = ApiError::invalid("ListOptions", "", causes);
    e.group = Some("meta.k8s.io".into());
    e
}

/// Checks the list options as Kubernetes' `ValidateListOptions` does.
fn validate(req: &ListRequest) -> Result<(), ApiError> {
    let Some(m) = req
        .resource_version_match
        .as_deref()
        .filter(|m| !m.is_empty())
    else {
        return Ok(());
    };
    let mut causes = Vec::new();
    let rv = req.resource_version.as_deref().unwrap_or("");
    if rv.is_empty() {
        causes.push(skiff_api::Cause::forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
        ));
    }
    if req.continue_token.as_deref().is_some_and(|c| !c.is_empty()) {
        causes.push(skiff_api::Cause::forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden when continue is provided",
        ));
    }
    if m != "Exact" && m != "NotOlderThan" {
        causes.push(skiff_api::Cause {
            reason: "FieldValueNotSupported".into(),
            field: "resourceVersionMatch".into(),
            message: format!(
                "Unsupported value: \"{m}\": supported values: \"Exact\", \"NotOlderThan\", \"\""
            ),
        });
    }
    if m == "Exact" && rv == "0" {
        causes.push(skiff_api::Cause::forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
        ));
    }
    match causes.is_empty() {
        true => Ok(()),
        false => Err(invalid_options(causes)),
    }
}

/// Parses a resourceVersion parameter.
pub fn parse_rv(rv: &str) -> Result<u64, ApiError> {
    rv.parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))
}

/// Waits (on this blocking thread) until the store has reached `rv`, for
/// [`WAIT_FOR_REVISION`] at most; the 504 body when it does not.
pub fn wait_for_revision(reg: &Registry, rv: u64) -> Result<(), ListError> {
    let deadline = Instant::now() + WAIT_FOR_REVISION;
    loop {
        let current = reg.store().revision();
        if current >= rv {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ListError::Status(504, too_large(rv, current)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Snapshots {
    pub fn new() -> Arc<Snapshots> {
        Arc::new(Snapshots::default())
    }

    fn get(&self, prefix: &str, rv: u64) -> Option<Arc<Vec<(String, Value)>>> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.get(&(prefix.to_string(), rv))
            .filter(|s| s.taken.elapsed() < KEEP)
            .map(|s| s.items.clone())
    }

    fn keep(&self, prefix: &str, rv: u64, items: Arc<Vec<(String, Value)>>) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|_, s| s.taken.elapsed() < KEEP);
        kept.entry((prefix.to_string(), rv)).or_insert(Snapshot {
            items,
            taken: Instant::now(),
        });
        while kept.len() > MAX_SNAPSHOTS {
            let oldest = kept
                .iter()
                .min_by_key(|(_, s)| s.taken)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => kept.remove(&k),
                None => break,
            };
        }
    }

    /// Lists `r` in `ns` as `req` asks, filtered by the selectors (run on a blocking thread:
    /// it may wait for the store to reach a requested revision).
    pub fn list(
        &self,
        reg: &Registry,
        r: &Resource,
        ns: Option<&str>,
        labels: &Selector,
        fields: &FieldSelector,
        req: &ListRequest,
    ) -> Result<Page, ListError> {
        validate(req)?;
        let prefix = r.key(ns, "");
        let token = req
            .continue_token
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(decode_token)
            .transpose()?;
        let rv = req.resource_version.as_deref().unwrap_or("");
        let (items, rev, start) = match token {
            Some(t) => {
                if !rv.is_empty() && rv != "0" {
                    return Err(ApiError::bad_request(
                        "specifying resource version is not allowed when using continue",
                    )
                    .into());
                }
                if t.rv < 0 {
                    let (items, rev) = self.listing(reg, r, ns)?;
                    (items, rev, t.start)
                } else {
                    let Some(items) = self.get(&prefix, t.rv as u64) else {
                        return Err(ListError::Status(410, expired(&t.start)));
                    };
                    (items, t.rv as u64, t.start)
                }
            }
            None => {
                let exact = req.resource_version_match.as_deref() == Some("Exact");
                let wanted = match rv {
                    "" | "0" => None,
                    rv => Some(parse_rv(rv)?),
                };
                if let Some(w) = wanted {
                    wait_for_revision(reg, w)?;
                }
                if req.limit.is_none_or(|l| l == 0) && !exact {
                    // The whole list, now: no snapshot to key and keep.
                    let (items, rev) = reg.list(r, ns, labels, fields)?;
                    return Ok(Page {
                        items,
                        resource_version: rev,
                        continue_token: None,
                        remaining: None,
                    });
                }
                let (items, rev) = self.listing(reg, r, ns)?;
                match wanted {
                    Some(w) if exact && w != rev => match self.get(&prefix, w) {
                        Some(kept) => (kept, w, String::new()),
                        None => {
                            return Err(ApiError::gone(format!(
                                "too old resource version: {w} ({rev})"
                            ))
                            .into())
                        }
                    },
                    _ => (items, rev, String::new()),
                }
            }
        };
        let filtered = !labels.is_empty() || !fields.is_empty();
        let mut matching = items
            .iter()
            .filter(|(k, _)| start.is_empty() || k.as_str() >= start.as_str())
            .filter(|(_, o)| labels.matches(&meta::labels(o)) && fields.matches(o));
        let limit = req.limit.filter(|l| *l > 0);
        let mut out = Vec::new();
        let mut last_key = None;
        for (k, o) in matching.by_ref() {
            if limit.is_some_and(|l| out.len() >= l) {
                // One more matches: there is a next page.
                let remaining = 1 + matching.count() as u64;
                let next = format!("{}\0", last_key.unwrap_or(k));
                self.keep(&prefix, rev, items.clone());
                return Ok(Page {
                    items: out,
                    resource_version: rev,
                    continue_token: Some(encode_token(rev as i64, &next)),
                    remaining: (!filtered).then_some(remaining),
                });
            }
            out.push(o.clone());
            last_key = Some(k);
        }
        Ok(Page {
            items: out,
            resource_version: rev,
            continue_token: None,
            remaining: None,
        })
    }

    /// Every object of `r` in `ns` now, keyed (relative to the list's prefix) and sorted.
    #[allow(clippy::type_complexity)]
    fn listing(
        &self,
        reg: &Registry,
        r: &Resource,
        ns: Option<&str>,
    ) -> Result<(Arc<Vec<(String, Value)>>, u64), ApiError> {
        let (items, rev) = reg.list(r, ns, &Selector::default(), &FieldSelector::default())?;
        let prefix = r.key(ns, "");
        let mut keyed: Vec<(String, Value)> = items
            .into_iter()
            .map(|o| {
                let key = r.key(meta::namespace(&o), meta::name(&o));
                let rel = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
                (rel, o)
            })
            .collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((Arc::new(keyed), rev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let t = encode_token(42, "default/web-3\0");
        assert_eq!(
            decode_token(&t).unwrap(),
            Token {
                rv: 42,
                start: "default/web-3\0".into()
            }
        );
        for bad in ["!!!", "e30=", &encode_token(0, "a")] {
            let e = decode_token(bad).unwrap_err();
            assert_eq!(e.code, 400, "{bad}");
        }
    }

    #[test]
    fn expired_and_too_large_answer_as_kubernetes() {
        let e = expired("default/b\0");
        assert_eq!(e["code"], 410);
        assert_eq!(e["reason"], "Expired");
        let fresh = decode_token(e["metadata"]["continue"].as_str().unwrap()).unwrap();
        assert_eq!(fresh.rv, -1);
        assert_eq!(fresh.start, "default/b\0");
        let t = too_large(10, 5);
        assert_eq!(t["code"], 504);
        assert_eq!(t["reason"], "Timeout");
        assert_eq!(
            t["details"]["causes"][0]["reason"],
            "ResourceVersionTooLarge"
        );
        assert_eq!(t["details"]["retryAfterSeconds"], 1);
    }

    #[test]
    fn pages_come_from_one_snapshot() {
        use crate::registry::{ClusterConfig, WriteOptions};
        use crate::store::sqlite::SqliteStore;

        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(
            Arc::new(SqliteStore::open(dir.path()).unwrap()),
            ClusterConfig::default(),
        );
        let opts = WriteOptions::default();
        let res = |p: &str| Resource::lookup(p).unwrap();
        reg.create(
            res("namespaces"),
            None,
            json!({"metadata": {"name": "a"}}),
            &opts,
        )
        .unwrap();
        let cms = res("configmaps");
        for i in 0..5 {
            let cm = json!({"metadata": {"name": format!("cm-{i}")}});
            reg.create(cms, Some("a"), cm, &opts).unwrap();
        }
        let snaps = Snapshots::new();
        let (all, none) = (Selector::default(), FieldSelector::default());
        let mut req = ListRequest {
            limit: Some(2),
            ..Default::default()
        };
        let first = snaps.list(&reg, cms, Some("a"), &all, &none, &req).unwrap();
        assert_eq!(first.items.len(), 2);
        assert_eq!(first.remaining, Some(3));
        // Changes after the first page are not seen by the next ones.
        reg.create(cms, Some("a"), json!({"metadata": {"name": "cm-9"}}), &opts)
            .unwrap();
        reg.delete(cms, Some("a"), "cm-3", &Default::default())
            .unwrap();
        let mut names: Vec<String> = first
            .items
            .iter()
            .map(|o| meta::name(o).to_string())
            .collect();
        let mut token = first.continue_token.clone();
        while let Some(t) = token {
            req.continue_token = Some(t);
            let page = snaps.list(&reg, cms, Some("a"), &all, &none, &req).unwrap();
            assert_eq!(page.resource_version, first.resource_version);
            names.extend(page.items.iter().map(|o| meta::name(o).to_string()));
            token = page.continue_token;
        }
        assert_eq!(names, ["cm-0", "cm-1", "cm-2", "cm-3", "cm-4"]);
        // A token whose snapshot is gone: 410 with a token that goes on from the latest state.
        snaps.kept.lock().unwrap().clear();
        req.continue_token = first.continue_token.clone();
        let Err(ListError::Status(410, status)) =
            snaps.list(&reg, cms, Some("a"), &all, &none, &req)
        else {
            panic!("an expired token is 410");
        };
        req.continue_token = status["metadata"]["continue"].as_str().map(String::from);
        let rest = snaps.list(&reg, cms, Some("a"), &all, &none, &req).unwrap();
        let rest: Vec<&str> = rest.items.iter().map(meta::name).collect();
        assert_eq!(rest, ["cm-2", "cm-4"]);
    }

    #[test]
    fn list_options_are_validated() {
        let req = |rv: &str, m: &str, c: &str| ListRequest {
            limit: None,
            continue_token: Some(c.into()),
            resource_version: Some(rv.into()),
            resource_version_match: Some(m.into()),
        };
        assert!(validate(&req("5", "NotOlderThan", "")).is_ok());
        assert!(validate(&req("5", "Exact", "")).is_ok());
        for (rv, m, c) in [
            ("", "Exact", ""),
            ("0", "Exact", ""),
            ("5", "Newest", ""),
            ("5", "Exact", "t"),
        ] {
            assert_eq!(
                validate(&req(rv, m, c)).unwrap_err().code,
                422,
                "{rv} {m} {c}"
            );
        }
    }
}
