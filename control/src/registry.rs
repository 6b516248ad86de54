//! The API's semantics over the store: what create, update, patch, delete and watch mean for a
//! Kubernetes object. The HTTP layer and the in-process controllers both call this, so a
//! controller's write is validated exactly like a user's.
//!
//! **A rejected write changes nothing**: every check runs before the one store transaction.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, RwLock};

use serde_json::{json, Value};
use skiff_api::crd::{CustomResources, Definition};
use skiff_api::fields::FieldSelector;
use skiff_api::managed::{BuiltinShape, ManagedFields, SchemaShape, Scope, Shape, Writer};
use skiff_api::patch::{self, PatchKind};
use skiff_api::selector::Selector;
use skiff_api::{defaults, events, meta, validation, ApiError, Cause, Resource};
use tokio::sync::mpsc;

use crate::store::{Committed, Durable, DynStore, EventType, Op, StoreError};

thread_local! {
    /// Set by [`deferring`]: the durability of the writes this thread committed meanwhile.
    static DEFERRED: std::cell::RefCell<Option<Vec<Durable>>> = const { std::cell::RefCell::new(None) };
    /// How many of the registry's serialised sections (see [`Serialised`]) this thread is in.
    static SERIALISED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs `f`, registry calls on this thread, so that their writes return once applied instead of
/// once durable; returns `f`'s result and a future that resolves once every one of them is
/// durable (or fails if one cannot be made so). Whoever acknowledges the writes awaits it
/// first, without holding a thread meanwhile. Writes in a serialised section (allocations,
/// evictions) still wait for durability there: the next writer reads what they wrote from the
/// readers' view. A registry call that reads its own write back must not run under this.
pub fn deferring<T>(f: impl FnOnce() -> T) -> (T, Durable) {
    struct Restore(Option<Vec<Durable>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            DEFERRED.with(|d| *d.borrow_mut() = outer);
        }
    }
    let restore = Restore(DEFERRED.with(|d| d.borrow_mut().replace(Vec::new())));
    let out = f();
    let pending = DEFERRED.with(|d| d.borrow_mut().take()).unwrap_or_default();
    drop(restore);
    let durable: Durable = Box::pin(async move {
        for p in pending {
            p.await?;
        }
        Ok(())
    });
    (out, durable)
}

/// A held registry lock whose section's writes are durable before it is released.
struct Serialised<'a> {
    _guard: std::sync::MutexGuard<'a, ()>,
}

impl<'a> Serialised<'a> {
    fn lock(m: &'a Mutex<()>) -> Self {
        let g = m.lock().expect("registry lock");
        SERIALISED.with(|n| n.set(n.get() + 1));
        Serialised { _guard: g }
    }
}

impl Drop for Serialised<'_> {
    fn drop(&mut self) {
        SERIALISED.with(|n| n.set(n.get() - 1));
    }
}

/// Where the allocation ranges' claim keys live (one per kind that allocates): every write
/// that may allocate updates its kind's key with a compare on its revision, so two servers
/// allocating at once cannot both commit the same address or port.
pub const RANGE_PREFIX: &str = "/registry/ranges/";

/// Cluster-wide settings the registry allocates from.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Service virtual IPs: a /16 given by its first two octets' network address.
    pub service_cidr: (Ipv4Addr, u8),
    /// Pod networks: cut into one block per node.
    pub pod_cidr: (Ipv4Addr, u8),
    /// Prefix length of each node's block (24: 253 pods per node).
    pub node_cidr_mask: u8,
    pub node_ports: (u16, u16),
    /// `tolerationSeconds` the DefaultTolerationSeconds admission gives new pods for the
    /// `not-ready` and `unreachable` NoExecute taints (`--default-not-ready-toleration-seconds`,
    /// `--default-unreachable-toleration-seconds`).
    pub default_not_ready_toleration_seconds: i64,
    pub default_unreachable_toleration_seconds: i64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            service_cidr: (Ipv4Addr::new(10, 96, 0, 0), 16),
            pod_cidr: (Ipv4Addr::new(10, 88, 0, 0), 16),
            node_cidr_mask: 24,
            node_ports: (30000, 32767),
            default_not_ready_toleration_seconds: 10,
            default_unreachable_toleration_seconds: 10,
        }
    }
}

/// A check of the object a user's write would store, run after validation and before the
/// store transaction (RBAC's escalation prevention): an error refuses the write.
pub trait WriteAdmission: Send + Sync + std::fmt::Debug {
    /// `old`: the stored object an update replaces (None on create).
    fn admit(&self, r: &Resource, old: Option<&Value>, obj: &Value) -> Result<(), ApiError>;
}

/// Options of a write.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    /// Unknown fields are an error (`fieldValidation=Strict`, the default).
    pub lenient: bool,
    /// The node (`system:node:NAME`) making the write: its own Node is held to
    /// NodeRestriction's rules ([`crate::apiserver::auth::admit_node_write`]).
    pub by_node: Option<String>,
    /// The writer's admission check, if any.
    pub admission: Option<Arc<dyn WriteAdmission>>,
    /// The manager the write's fields are recorded under (`fieldManager`, or derived from
    /// the client's `User-Agent`); None: the server's own controllers.
    pub field_manager: Option<String>,
    /// An apply takes the fields it conflicts on (`force=true`).
    pub force: bool,
}

/// The manager the in-process controllers' writes are recorded under.
pub const CONTROLLER_MANAGER: &str = "skiff-controller-manager";

impl WriteOptions {
    fn manager(&self) -> &str {
        self.field_manager.as_deref().unwrap_or(CONTROLLER_MANAGER)
    }
}

/// Options of a delete (`DeleteOptions`).
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    /// `Orphan`, `Background` (default) or `Foreground`.
    pub propagation: Option<String>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

/// The subresource a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    Main,
    Status,
    Scale,
}

/// How often a patch (or a delete without preconditions) is re-applied to the newest object
/// after losing a race with another writer before the conflict is returned…
const PATCH_TRIES: u32 = 64;
/// …unless it has been retrying for less than this: on a loaded machine a thread preempted
/// between its read and its write loses to a busy writer many times in a row. (Kubernetes'
/// storage retries such an update until it lands.)
const PATCH_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether a write that lost a race `tries` times since `started` is tried again.
fn retry_conflict(tries: u32, started: std::time::Instant) -> bool {
    tries < PATCH_TRIES || started.elapsed() < PATCH_RETRY_FOR
}

/// A watch event as the API sends it.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub kind: &'static str,
    pub object: Arc<Value>,
}

pub struct Registry {
    store: DynStore,
    config: ClusterConfig,
    /// Serialises allocations (service IPs, node ports, pod CIDRs) with their writes.
    alloc: Mutex<()>,
    /// Serialises evictions, so two cannot both spend a budget's last disruption.
    evictions: Mutex<()>,
    /// The custom resources served now, swapped whole when a definition changes; a request
    /// for a built-in resource never reads it.
    custom: RwLock<Arc<CustomResources>>,
    /// Serialises rebuilds of `custom`, so the last one swapped in read the newest definitions.
    custom_rebuild: Mutex<()>,
}

pub(crate) fn store_err(r: &Resource, name: &str, e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(_) => ApiError::not_found(&r.qualified(), name),
        StoreError::AlreadyExists(_) => ApiError::already_exists(&r.qualified(), name),
        StoreError::Conflict { .. } => ApiError::conflict(
            &r.qualified(),
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        ),
        StoreError::Expired { requested, oldest } => ApiError::gone(format!(
            "too old resource version: {requested} ({oldest})"
        )),
        StoreError::TooLarge { .. } => skiff_api::limits::object_too_large(),
        StoreError::Backend(m) => ApiError::internal(format!("storage error: {m}")),
    }
}

/// The managed fields a write sets itself (a client clearing or moving them, as kubectl
/// does when it moves from client-side to server-side apply): None when it sends none or
/// the stored ones unchanged.
fn sent_managed_fields(old: &Value, new: &Value) -> Result<Option<ManagedFields>, ApiError> {
    let sent = new.pointer("/metadata/managedFields");
    match sent {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(s) if Some(s) == old.pointer("/metadata/managedFields") => Ok(None),
        Some(s) => ManagedFields::decode(s).map(Some).map_err(|e| {
            ApiError::invalid(
                "Object",
                meta::name(old),
                vec![Cause::invalid("metadata.managedFields", "", &e)],
            )
        }),
    }
}

pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn random_suffix(n: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

impl Registry {
    pub fn new(store: DynStore, config: ClusterConfig) -> Arc<Self> {
        let reg = Arc::new(Registry {
            store,
            config,
            alloc: Mutex::new(()),
            evictions: Mutex::new(()),
            custom: RwLock::new(Arc::default()),
            custom_rebuild: Mutex::new(()),
        });
        if let Err(e) = reg.refresh_custom() {
            tracing::warn!(error = %e, "cannot read the custom resource definitions");
        }
        reg
    }

    // ---- custom resources ----------------------------------------------------------------

    /// The custom resources served now.
    pub fn custom(&self) -> Arc<CustomResources> {
        self.custom.read().expect("custom resources").clone()
    }

    /// The definition serving `r`, when `r` is a custom resource.
    pub fn definition(&self, r: &Resource) -> Option<Arc<Definition>> {
        if r.is_builtin() {
            return None;
        }
        self.custom().definition(r).cloned()
    }

    /// The resource served under `group/version` with this plural, built-in or custom.
    pub fn resource_by_path(
        &self,
        group: &str,
        version: &str,
        plural: &str,
    ) -> Option<&'static Resource> {
        Resource::by_path(group, version, plural)
            .or_else(|| self.custom().by_path(group, version, plural))
    }

    /// The resource of an object's `apiVersion` and `kind`, built-in or custom.
    pub fn resource_by_kind(&self, api_version: &str, kind: &str) -> Option<&'static Resource> {
        Resource::by_kind(api_version, kind).or_else(|| self.custom().by_kind(api_version, kind))
    }

    /// A resource by its qualified plural (`pods`, `deployments.apps`, `widgets.example.com`);
    /// a custom one in its preferred version.
    pub fn resource_by_qualified(&self, qualified: &str) -> Option<&'static Resource> {
        let (plural, group) = qualified.split_once('.').unwrap_or((qualified, ""));
        let same = |r: &&'static Resource| r.plural == plural && r.group == group;
        skiff_api::RESOURCES
            .iter()
            .find(same)
            .or_else(|| self.custom().resources().find(same))
    }

    /// The resource a stored object belongs to, from its `apiVersion`'s group and `kind`
    /// (a custom one in its preferred version, whatever version it is stored in).
    pub fn resource_of_object(&self, obj: &Value) -> Option<&'static Resource> {
        let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        let group = av.rsplit_once('/').map_or("", |(g, _)| g);
        let same = |r: &&'static Resource| r.group == group && r.kind == kind && !r.create_only;
        skiff_api::RESOURCES
            .iter()
            .find(same)
            .or_else(|| self.custom().resources().find(same))
    }

    /// A resource by any name a user types (`pods`, `deploy`, `widgets.example.com`).
    pub fn resource_lookup(&self, name: &str) -> Option<&'static Resource> {
        Resource::lookup(name).or_else(|| self.custom().lookup(name))
    }

    /// Every served resource that stores objects, one per stored kind (a custom resource
    /// in its preferred version).
    pub fn stored_resources(&self) -> Vec<&'static Resource> {
        let custom = self.custom();
        skiff_api::RESOURCES
            .iter()
            .filter(|r| !r.create_only && !events::is_events_v1(r))
            .chain(
                custom
                    .definitions()
                    .iter()
                    .filter_map(|d| d.resources().first().copied()),
            )
            .collect()
    }

    /// Rebuilds the served custom resources from the stored definitions whose names are
    /// accepted.
    pub fn refresh_custom(&self) -> Result<(), ApiError> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let _g = self.custom_rebuild.lock().expect("custom rebuild");
        let crds = Resource::lookup("customresourcedefinitions").expect("crds");
        let (items, _) = self
            .store
            .list(&crds.key_prefix())
            .map_err(|e| store_err(crds, "", e))?;
        let accepted: Vec<CustomResourceDefinition> = items
            .iter()
            .filter_map(|o| validation::typed::<CustomResourceDefinition>(o).ok())
            .filter(|c| {
                skiff_api::conditions::is_true(
                    c.status.as_ref().and_then(|s| s.conditions.as_deref()),
                    "NamesAccepted",
                )
            })
            .collect();
        *self.custom.write().expect("custom resources") = Arc::new(CustomResources::new(accepted));
        Ok(())
    }

    /// A custom object as served through `r`'s version (stored in the storage version).
    fn present(&self, r: &Resource, mut obj: Value) -> Value {
        // events.k8s.io's Events are the core ones in another shape.
        if events::is_events_v1(r) {
            return events::from_core(&obj).unwrap_or(obj);
        }
        if !r.is_builtin()
            && obj.get("apiVersion").and_then(Value::as_str) != Some(&r.api_version())
        {
            obj["apiVersion"] = json!(r.api_version());
        }
        obj
    }

    /// Decodes a built-in object into its type, or checks a custom one's fields against its
    /// schema: with strict field validation, an unknown field is an error.
    fn decode(&self, r: &Resource, obj: &Value, opts: &WriteOptions) -> Result<(), ApiError> {
        match self.definition(r) {
            Some(d) if !opts.lenient => d.check_unknown(r.version, obj),
            Some(_) => Ok(()),
            None => validation::decode(r, obj, !opts.lenient),
        }
    }

    /// The kind whose built-in rules apply to `r`: none for a custom resource, whatever
    /// its kind is called.
    fn builtin_kind(r: &Resource) -> &'static str {
        if r.is_builtin() {
            r.kind
        } else {
            ""
        }
    }

    pub fn store(&self) -> &DynStore {
        &self.store
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    // ---- reads ---------------------------------------------------------------------------

    pub fn get(&self, r: &Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.try_get(r, ns, name)?
            .ok_or_else(|| ApiError::not_found(&r.qualified(), name))
    }

    /// The object as readers see it, or with `latest` the newest applied version (which may
    /// still wait for its flush): what a write retried after a conflict starts from.
    fn read(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        latest: bool,
    ) -> Result<Option<Value>, ApiError> {
        let key = r.key(ns, name);
        let got = if latest {
            self.store.get_latest(&key)
        } else {
            self.store.get(&key)
        };
        Ok(got
            .map_err(|e| store_err(r, name, e))?
            .map(|o| self.present(r, o)))
    }

    pub fn try_get(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, ApiError> {
        Ok(self
            .store
            .get(&r.key(ns, name))
            .map_err(|e| store_err(r, name, e))?
            .map(|o| self.present(r, o)))
    }

    fn prefix(r: &Resource, ns: Option<&str>) -> String {
        match (r.namespaced, ns) {
            (true, Some(ns)) => format!("{}{ns}/", r.key_prefix()),
            _ => r.key_prefix(),
        }
    }

    /// Objects of `r` in `ns` (all namespaces when None) that match both selectors,
    /// and the revision the list is consistent with.
    pub fn list(
        &self,
        r: &Resource,
        ns: Option<&str>,
        labels: &Selector,
        fields: &FieldSelector,
    ) -> Result<(Vec<Value>, u64), ApiError> {
        let (items, rev) = self
            .store
            .list(&Self::prefix(r, ns))
            .map_err(|e| store_err(r, "", e))?;
        let items = items
            .into_iter()
            .filter(|o| labels.matches(&meta::labels(o)) && fields.matches(o))
            .map(|o| self.present(r, o))
            .collect();
        Ok((items, rev))
    }

    /// Events for `r` in `ns` after revision `from`, filtered by the selectors. An object that
    /// stops matching is reported DELETED and one that starts matching ADDED, as Kubernetes does.
    pub fn watch(
        &self,
        r: &Resource,
        ns: Option<&str>,
        from: u64,
        labels: Selector,
        fields: FieldSelector,
    ) -> Result<mpsc::Receiver<WatchEvent>, ApiError> {
        let mut raw = self
            .store
            .watch(&Self::prefix(r, ns), from)
            .map_err(|e| store_err(r, "", e))?;
        let (tx, rx) = mpsc::channel(256);
        let key_prefix = r.key_prefix();
        let namespaced = r.namespaced;
        // Custom objects are shown in the version watched.
        let served_as = (!r.is_builtin()).then(|| r.api_version());
        let events_v1 = events::is_events_v1(r);
        tokio::spawn(async move {
            let sel = |o: &Value| labels.matches(&meta::labels(o)) && fields.matches(o);
            loop {
                // A closed client ends the relay at once, whether or not events match it;
                // dropping `raw` then unsubscribes from the store.
                let ev = tokio::select! {
                    _ = tx.closed() => return,
                    ev = raw.recv() => match ev {
                        Some(ev) => ev,
                        None => return,
                    },
                };
                // A cluster-scoped prefix would also match deeper keys of other resources.
                if !namespaced && ev.key[key_prefix.len()..].contains('/') {
                    continue;
                }
                let now = sel(&ev.object);
                let before = ev.prev.as_deref().is_some_and(sel);
                let kind = match ev.kind {
                    EventType::Added if now => "ADDED",
                    EventType::Modified if now && before => "MODIFIED",
                    EventType::Modified if now => "ADDED",
                    EventType::Modified if before => "DELETED",
                    EventType::Deleted if before || now => "DELETED",
                    _ => continue,
                };
                let object = match &served_as {
                    _ if events_v1 => match events::from_core(&ev.object) {
                        Ok(o) => Arc::new(o),
                        Err(_) => ev.object.clone(),
                    },
                    Some(av) if ev.object.get("apiVersion").and_then(Value::as_str) != Some(av) => {
                        let mut o = Value::clone(&ev.object);
                        o["apiVersion"] = json!(av);
                        Arc::new(o)
                    }
                    _ => ev.object.clone(),
                };
                if tx.send(WatchEvent { kind, object }).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    // ---- writes --------------------------------------------------------------------------

    fn check_kind(r: &Resource, obj: &mut Value) -> Result<(), ApiError> {
        strip_nulls(obj);
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON or YAML object",
            ));
        }
        let av = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .map(String::from);
        let kind = obj.get("kind").and_then(Value::as_str).map(String::from);
        if let Some(kind) = &kind {
            if kind != r.kind {
                return Err(ApiError::bad_request(format!(
                    "the kind {kind:?} in the body does not match the resource {} of the request",
                    r.qualified()
                )));
            }
        }
        if let Some(av) = &av {
            if *av != r.api_version() {
                return Err(ApiError::bad_request(format!(
                    "the apiVersion {av:?} in the body does not match {} of the request",
                    r.api_version()
                )));
            }
        }
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(r.kind);
        Ok(())
    }

    fn ensure_namespace(&self, r: &Resource, ns: Option<&str>) -> Result<(), ApiError> {
        if !r.namespaced {
            return Ok(());
        }
        let ns = ns.ok_or_else(|| ApiError::bad_request("a namespace is required"))?;
        let nsr = Resource::lookup("namespaces").expect("namespaces");
        match self.try_get(nsr, None, ns)? {
            None => Err(ApiError::not_found("namespaces", ns)),
            Some(n) if meta::is_deleting(&n) => Err(ApiError {
                code: 403,
                reason: "Forbidden",
                message: format!("{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated", r.qualified(), meta::name(&n)),
                kind: None,
                name: None,
                group: None,
                causes: vec![],
            }),
            Some(_) => Ok(()),
        }
    }

    /// Creates an object. `ns` is the namespace of the request path.
    pub fn create(
        &self,
        r: &Resource,
        ns: Option<&str>,
        obj: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        self.create_managed(r, ns, obj, opts, None)
    }

    /// Creates an object; `managed`: the fields an apply that creates it recorded (None: the
    /// writer's `Update` of everything it set).
    fn create_managed(
        &self,
        r: &Resource,
        ns: Option<&str>,
        mut obj: Value,
        opts: &WriteOptions,
        managed: Option<ManagedFields>,
    ) -> Result<Value, ApiError> {
        Self::check_kind(r, &mut obj)?;
        if events::is_events_v1(r) {
            validation::decode(r, &obj, !opts.lenient)?;
            events::validate_create(&obj)?;
            let created = self.create(events::core_events(), ns, events::to_core(&obj)?, opts)?;
            return events::from_core(&created);
        }
        let def = self.definition(r);
        let kind = Self::builtin_kind(r);
        match &def {
            Some(d) if d.is_terminating() => {
                return Err(ApiError::method_not_allowed(&format!(
                    "create: the custom resource definition {} is terminating",
                    d.name()
                )))
            }
            Some(d) if !opts.lenient => d.check_unknown(r.version, &obj)?,
            Some(_) => {}
            None => validation::decode(r, &obj, !opts.lenient)?,
        }
        {
            let m = meta::metadata_mut(&mut obj);
            if r.namespaced {
                let path_ns = ns.unwrap_or("default");
                match m.get("namespace").and_then(Value::as_str) {
                    Some(body_ns) if !body_ns.is_empty() && body_ns != path_ns => {
                        return Err(ApiError::bad_request(format!(
                            "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({path_ns})"
                        )))
                    }
                    _ => {
                        m.insert("namespace".into(), json!(path_ns));
                    }
                }
            } else {
                m.remove("namespace");
            }
            if m.get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
            {
                if let Some(g) = m
                    .get("generateName")
                    .and_then(Value::as_str)
                    .filter(|g| !g.is_empty())
                {
                    let name = format!("{g}{}", random_suffix(5));
                    m.insert("name".into(), json!(name));
                }
            }
            m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            m.insert("creationTimestamp".into(), json!(now()));
            m.remove("resourceVersion");
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("managedFields");
            if r.has_status || r.has_scale || def.is_some() {
                m.insert("generation".into(), json!(1));
            }
        }
        if r.has_status && kind != "Node" {
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
        }
        defaults::apply(kind, &mut obj);
        if kind == "Node" {
            // Topology spread and anti-affinity by host need it; agents set it, bare Node
            // objects get their name.
            let name = meta::name(&obj).to_string();
            let labels = meta::metadata_mut(&mut obj)
                .entry("labels")
                .or_insert_with(|| json!({}));
            if let Some(l) = labels.as_object_mut() {
                l.entry("kubernetes.io/hostname").or_insert(json!(name));
            }
        }
        if kind == "Pod" {
            defaults::default_toleration_seconds(
                &mut obj,
                self.config.default_not_ready_toleration_seconds,
                self.config.default_unreachable_toleration_seconds,
            );
            let ns = meta::namespace(&obj).unwrap_or("default").to_string();
            crate::apiserver::tokens::admit_pod(self, &ns, &mut obj)?;
            crate::apiserver::podclasses::admit_pod(self, &mut obj)?;
        }
        match &def {
            Some(d) => d.admit(r.version, &mut obj, r.namespaced)?,
            None => validation::validate(r, &obj)?,
        }
        match managed {
            Some(m) => m.store(&mut obj),
            None => {
                let mut m = ManagedFields::default();
                self.record_update(r, &json!({}), &obj, &mut m, Sub::Main, opts);
                m.store(&mut obj);
            }
        }
        let ns = meta::namespace(&obj).map(String::from);
        let name = meta::name(&obj).to_string();
        self.ensure_namespace(r, ns.as_deref())?;
        // Only kinds that allocate need to be serialised with the writes of their kind.
        let _g = Self::allocates(r).then(|| Serialised::lock(&self.alloc));
        Self::node_restriction(r, None, &obj, opts)?;
        if let Some(a) = &opts.admission {
            a.admit(r, None, &obj)?;
        }
        let key = r.key(ns.as_deref(), &name);
        // Another server may allocate at the same time: the claim of the range makes one of
        // two such writes fail, and it is admitted again from what the other wrote.
        for attempt in 0.. {
            let claim = self.range_claim(r, None)?;
            let mut obj = obj.clone();
            self.admit(r, None, &mut obj)?;
            if opts.dry_run {
                return Ok(obj);
            }
            let op = Op::Create {
                key: key.clone(),
                value: obj,
            };
            match self.commit_claimed(r, &name, op, claim, attempt)? {
                Some(created) => return Ok(created),
                None => continue,
            }
        }
        unreachable!("the loop returns")
    }

    /// How many times a write that allocates is admitted again after another server's
    /// allocation raced it.
    const ALLOCATION_ATTEMPTS: usize = 20;

    /// The op that claims `r`'s allocation range for one write that may allocate (a Service's
    /// write, a Node's creation): the range key's revision is read before the admission
    /// lists what is taken, and the write commits only if no other allocation came between.
    /// None for writes that allocate nothing.
    fn range_claim(&self, r: &Resource, old: Option<&Value>) -> Result<Option<Op>, ApiError> {
        let claims = match r.kind {
            "Service" => true,
            "Node" => old.is_none(),
            _ => false,
        };
        if !claims {
            return Ok(None);
        }
        let key = format!("{RANGE_PREFIX}{}", r.plural);
        let value = json!({"metadata": {"name": r.plural}});
        // Read as the admission's listing reads (a back end may apply a write before readers
        // see it): a claim newer than the listing would let a stale listing commit.
        let cur = self.store.get(&key).map_err(|e| store_err(r, "", e))?;
        Ok(Some(match cur {
            Some(cur) => Op::Update {
                key,
                value,
                expect: meta::resource_version(&cur),
            },
            None => Op::Create { key, value },
        }))
    }

    /// Commits `op` with its range claim; None when the claim lost to another allocation
    /// (the caller admits the object again).
    fn commit_claimed(
        &self,
        r: &Resource,
        name: &str,
        op: Op,
        claim: Option<Op>,
        attempt: usize,
    ) -> Result<Option<Value>, ApiError> {
        let Some(claim) = claim else {
            return self.commit_one(r, name, op).map(Some);
        };
        match self.store.txn(vec![op, claim]) {
            Ok(c) => Ok(c.objects.into_iter().next()),
            Err(StoreError::Conflict { key, .. } | StoreError::AlreadyExists(key))
                if key.starts_with(RANGE_PREFIX) && attempt + 1 < Self::ALLOCATION_ATTEMPTS =>
            {
                // The other write may not be visible to readers yet: give it a moment.
                std::thread::sleep(std::time::Duration::from_millis(1 + attempt as u64));
                Ok(None)
            }
            Err(e) => Err(store_err(r, name, e)),
        }
    }

    /// Replaces an object (PUT). `sub` says whether spec or status is written.
    pub fn update(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        sub: Sub,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        if sub == Sub::Scale {
            return self.write_scale(r, ns, name, obj, opts);
        }
        Self::check_kind(r, &mut obj)?;
        self.decode(r, &obj, opts)?;
        if events::is_events_v1(r) {
            let core = events::to_core(&obj)?;
            let updated = self.update(events::core_events(), ns, name, core, sub, opts)?;
            return events::from_core(&updated);
        }
        if !meta::name(&obj).is_empty() && meta::name(&obj) != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta::name(&obj)
            )));
        }
        let old = self.get(r, ns, name)?;
        let expect = match meta::resource_version(&obj) {
            Some(rv) => Some(rv),
            None if obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty()) =>
            {
                return Err(ApiError::bad_request(
                    "metadata.resourceVersion must be a number",
                ))
            }
            None => meta::resource_version(&old),
        };
        let sent = sent_managed_fields(&old, &obj)?;
        let mut new = self.prepare_update(r, &old, obj, sub)?;
        self.track_update(r, &old, &mut new, sent, sub, opts);
        self.commit_update(r, ns, name, &old, new, expect, opts)
    }

    #[allow(clippy::too_many_arguments)]
    /// Applies a patch, retrying on a concurrent write (a patch has no resourceVersion
    /// unless it carries one), as Kubernetes' storage retries an update on the newest object
    /// until it lands: a busy writer (a controller's status) must not make users' patches fail.
    pub fn patch(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        kind: PatchKind,
        body: &Value,
        sub: Sub,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        let (mut tries, started) = (0, std::time::Instant::now());
        loop {
            tries += 1;
            // A retry starts from the newest applied version: the readers' view may still be
            // waiting for the flush of the write that caused the conflict.
            let old = match self.read(r, ns, name, tries > 1)? {
                Some(o) => o,
                None if kind == PatchKind::Apply && sub == Sub::Main => {
                    let mut managed = ManagedFields::default();
                    let mut obj =
                        self.apply_config(r, &json!({}), body, &mut managed, sub, opts)?;
                    meta::metadata_mut(&mut obj).insert("name".into(), json!(name));
                    return self.create_managed(r, ns, obj, opts, Some(managed));
                }
                None => return Err(ApiError::not_found(&r.qualified(), name)),
            };
            let result = if events::is_events_v1(r) {
                // Patched in the shape it was sent in, stored in the core one; the version
                // read is the one expected unless the patch names another.
                let mut patched = patch::apply(kind, &old, body)?;
                if patched.pointer("/metadata/resourceVersion").is_none() {
                    patched["metadata"]["resourceVersion"] =
                        old["metadata"]["resourceVersion"].clone();
                }
                self.update(r, ns, name, patched, sub, opts)
            } else if sub == Sub::Scale {
                let scale = self.scale_for(r, &old);
                let patched = patch::apply(kind, &scale, body)?;
                self.write_scale(r, ns, name, patched, opts)
            } else if kind == PatchKind::Apply {
                let mut managed = ManagedFields::of(&old).unwrap_or_default();
                let mut patched = self.apply_config(r, &old, body, &mut managed, sub, opts)?;
                Self::check_kind(r, &mut patched)?;
                self.decode(r, &patched, opts)?;
                let expect = match patched.pointer("/metadata/resourceVersion")
                    != old.pointer("/metadata/resourceVersion")
                {
                    true => meta::resource_version(&patched),
                    false => meta::resource_version(&old),
                };
                let mut new = self.prepare_update(r, &old, patched, sub)?;
                managed.store(&mut new);
                self.commit_update(r, ns, name, &old, new, expect, opts)
            } else {
                let patched = patch::apply(kind, &old, body)?;
                let mut patched = patched;
                let sent = sent_managed_fields(&old, &patched)?;
                Self::check_kind(r, &mut patched)?;
                self.decode(r, &patched, opts)?;
                let expect = match patched.pointer("/metadata/resourceVersion")
                    != old.pointer("/metadata/resourceVersion")
                {
                    true => meta::resource_version(&patched),
                    false => meta::resource_version(&old),
                };
                let mut new = self.prepare_update(r, &old, patched, sub)?;
                self.track_update(r, &old, &mut new, sent, sub, opts);
                self.commit_update(r, ns, name, &old, new, expect, opts)
            };
            match result {
                Err(e)
                    if e.code == 409
                        && e.reason == "Conflict"
                        && retry_conflict(tries, started)
                        && !body_has_rv(body) =>
                {
                    continue
                }
                other => return other,
            }
        }
    }

    // ---- field ownership ---------------------------------------------------------------

    /// Runs `f` with the shape `r`'s lists and maps merge by.
    fn with_shape<T>(&self, r: &Resource, f: impl FnOnce(&dyn Shape) -> T) -> T {
        match self.definition(r) {
            Some(d) => f(&SchemaShape {
                schema: d.schema(r.version),
            }),
            None => f(&BuiltinShape),
        }
    }

    fn writer<'a>(
        r: &Resource,
        sub: Sub,
        opts: &'a WriteOptions,
        av: &'a str,
        now: &'a str,
    ) -> Writer<'a> {
        Writer {
            manager: opts.manager(),
            api_version: av,
            subresource: match sub {
                Sub::Main => "",
                Sub::Status => "status",
                Sub::Scale => "scale",
            },
            scope: match sub {
                Sub::Status => Scope::Status,
                _ if r.has_status => Scope::Main,
                _ => Scope::All,
            },
            now,
        }
    }

    /// Records in `managed` the fields a write from `old` to `new` changed.
    fn record_update(
        &self,
        r: &Resource,
        old: &Value,
        new: &Value,
        managed: &mut ManagedFields,
        sub: Sub,
        opts: &WriteOptions,
    ) {
        let (av, now) = (r.api_version(), now());
        let w = Self::writer(r, sub, opts, &av, &now);
        self.with_shape(r, |s| managed.update(old, new, &w, s));
    }

    /// The managed fields of an update's result: those the writer sent when it changed
    /// them (`sent`), else the stored ones with the write's fields recorded. An object that
    /// has none is left untracked until its first apply, as Kubernetes does.
    fn track_update(
        &self,
        r: &Resource,
        old: &Value,
        new: &mut Value,
        sent: Option<ManagedFields>,
        sub: Sub,
        opts: &WriteOptions,
    ) {
        let mut managed = match sent {
            Some(m) => m,
            None => match ManagedFields::of(old) {
                Ok(m) if !m.entries.is_empty() => m,
                _ => {
                    if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove("managedFields");
                    }
                    return;
                }
            },
        };
        self.record_update(r, old, new, &mut managed, sub, opts);
        managed.store(new);
    }

    /// Server-side apply of `config` to `live`: the merged object, with `managed` updated,
    /// or 409 with the fields other managers own.
    fn apply_config(
        &self,
        r: &Resource,
        live: &Value,
        config: &Value,
        managed: &mut ManagedFields,
        sub: Sub,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        if !config.is_object() {
            return Err(ApiError::bad_request(
                "an apply configuration must be an object",
            ));
        }
        if config
            .pointer("/metadata/managedFields")
            .is_some_and(|m| !m.is_null())
        {
            return Err(ApiError::bad_request("metadata.managedFields must be nil"));
        }
        let (av, now) = (r.api_version(), now());
        let w = Self::writer(r, sub, opts, &av, &now);
        let merged = self
            .with_shape(r, |s| managed.apply(live, config, &w, opts.force, s))
            .map_err(|conflicts| {
                ApiError::apply_conflict(
                    skiff_api::managed::conflict_message(&conflicts),
                    conflicts
                        .into_iter()
                        .map(|c| Cause {
                            reason: "FieldManagerConflict".into(),
                            message: format!("conflict with {}", c.manager),
                            field: c.path,
                        })
                        .collect(),
                )
            })?;
        if skiff_api::patch::json_size_over(&merged, skiff_api::limits::MAX_OBJECT_BYTES) {
            return Err(skiff_api::limits::object_too_large());
        }
        Ok(merged)
    }

    /// Builds the object to store from the old one and the proposed one.
    fn prepare_update(
        &self,
        r: &Resource,
        old: &Value,
        mut new: Value,
        sub: Sub,
    ) -> Result<Value, ApiError> {
        let def = self.definition(r);
        let kind = Self::builtin_kind(r);
        if sub == Sub::Status {
            // Only status (and, for conditions the agent owns, nothing else) changes.
            let mut out = old.clone();
            out["status"] = new.get("status").cloned().unwrap_or(json!({}));
            if let Some(d) = &def {
                d.admit(r.version, &mut out, r.namespaced)?;
            }
            return Ok(out);
        }
        // Server-owned metadata is kept.
        {
            let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
            let m = meta::metadata_mut(&mut new);
            for k in [
                "uid",
                "creationTimestamp",
                "namespace",
                "name",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match old_meta.get(k) {
                    Some(v) => {
                        m.insert(k.into(), v.clone());
                    }
                    None => {
                        m.remove(k);
                    }
                }
            }
        }
        if r.has_status && kind != "Namespace" {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        }
        if let Some(d) = &def {
            d.admit(r.version, &mut new, r.namespaced)?;
            // A custom object's generation counts changes of anything but metadata and status.
            let body = |o: &Value| {
                let mut o = o.clone();
                if let Some(m) = o.as_object_mut() {
                    for k in ["metadata", "status", "apiVersion", "kind"] {
                        m.remove(k);
                    }
                }
                o
            };
            if body(old) != body(&new) {
                let g = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                meta::metadata_mut(&mut new).insert("generation".into(), json!(g + 1));
            }
            return Ok(new);
        }
        defaults::apply(kind, &mut new);
        if kind == "Pod" {
            // What admission set at creation stays, as Kubernetes' Priority plugin keeps it.
            for k in ["priority", "preemptionPolicy"] {
                if let (Some(v), Some(spec)) = (
                    old.pointer(&format!("/spec/{k}")),
                    new.get_mut("spec").and_then(Value::as_object_mut),
                ) {
                    spec.entry(k).or_insert_with(|| v.clone());
                }
            }
        }
        validation::validate(r, &new)?;
        validation::validate_update(r, old, &new)?;
        if (r.has_status || r.has_scale) && old.get("spec") != new.get("spec") {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            meta::metadata_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        Ok(new)
    }

    #[allow(clippy::too_many_arguments)]
    fn commit_update(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        old: &Value,
        new: Value,
        expect: Option<u64>,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        let _g = Self::allocates(r).then(|| Serialised::lock(&self.alloc));
        Self::node_restriction(r, Some(old), &new, opts)?;
        if let Some(a) = &opts.admission {
            a.admit(r, Some(old), &new)?;
        }
        let key = r.key(ns, name);
        for attempt in 0.. {
            let claim = self.range_claim(r, Some(old))?;
            let mut new = new.clone();
            self.admit(r, Some(old), &mut new)?;
            if opts.dry_run {
                return Ok(new);
            }
            // A write that changes nothing is not made, as Kubernetes' storage skips it: the
            // object keeps its resourceVersion and no watcher hears of it. A stale
            // resourceVersion is still a conflict.
            if expect.is_none_or(|rv| Some(rv) == meta::resource_version(old))
                && same_but_version(old, &new)
            {
                return Ok(old.clone());
            }
            let op = if empties_finalizers(old, &new) {
                Op::Delete {
                    key: key.clone(),
                    expect,
                }
            } else {
                Op::Update {
                    key: key.clone(),
                    value: new,
                    expect,
                }
            };
            if let Some(written) = self.commit_claimed(r, name, op, claim, attempt)? {
                return Ok(written);
            }
        }
        unreachable!("the loop returns")
    }

    fn write_scale(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        scale: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        if !r.has_scale {
            return Err(ApiError::not_found_path(&format!("{}/scale", r.plural)));
        }
        let replicas = scale
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .ok_or_else(|| {
                ApiError::invalid("Scale", name, vec![Cause::required("spec.replicas")])
            })?;
        if replicas < 0 {
            return Err(ApiError::invalid(
                "Scale",
                name,
                vec![Cause::invalid(
                    "spec.replicas",
                    replicas,
                    "must be greater than or equal to 0",
                )],
            ));
        }
        let old = self.get(r, ns, name)?;
        let expect = meta::resource_version(&scale).or(meta::resource_version(&old));
        let mut new = old.clone();
        let spec_path = self
            .definition(r)
            .and_then(|d| {
                d.scale(r.version)
                    .map(|s| pointer_of(&s.spec_replicas_path))
            })
            .unwrap_or_else(|| "/spec/replicas".into());
        set_at(&mut new, &spec_path, json!(replicas));
        let mut new = self.prepare_update(r, &old, new, Sub::Main)?;
        self.track_update(r, &old, &mut new, None, Sub::Scale, opts);
        let stored = self.commit_update(r, ns, name, &old, new, expect, opts)?;
        Ok(self.scale_for(r, &stored))
    }

    pub fn get_scale(&self, r: &Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        if !r.has_scale {
            return Err(ApiError::not_found_path(&format!("{}/scale", r.plural)));
        }
        Ok(self.scale_for(r, &self.get(r, ns, name)?))
    }

    /// The Scale of an object: from `spec.replicas` for the built-in kinds, from the paths
    /// a custom resource's `scale` subresource names for a custom one.
    fn scale_for(&self, r: &Resource, obj: &Value) -> Value {
        let Some(def) = self.definition(r) else {
            return scale_of(r, obj);
        };
        let Some(sc) = def.scale(r.version) else {
            return scale_of(r, obj);
        };
        let mut scale = scale_of(r, obj);
        scale["spec"]["replicas"] = obj
            .pointer(&pointer_of(&sc.spec_replicas_path))
            .cloned()
            .unwrap_or(json!(0));
        scale["status"]["replicas"] = obj
            .pointer(&pointer_of(&sc.status_replicas_path))
            .cloned()
            .unwrap_or(json!(0));
        scale["status"]["selector"] = sc
            .label_selector_path
            .as_deref()
            .and_then(|p| obj.pointer(&pointer_of(p)))
            .cloned()
            .unwrap_or(json!(""));
        scale
    }

    /// Deletes an object, honouring finalizers, graceful pod termination and propagation.
    /// Returns the object as it is after the call (gone, or marked for deletion).
    /// Evicts a pod (`pods/NAME/eviction`): a graceful delete, refused with 429 while the
    /// PodDisruptionBudget covering the pod allows no disruption. Pods that are pending,
    /// finished or already being deleted are deleted without asking, as Kubernetes does.
    pub fn evict(&self, ns: &str, name: &str, opts: &DeleteOptions) -> Result<Value, ApiError> {
        use k8s_openapi::api::core::v1::Pod;
        use k8s_openapi::api::policy::v1::PodDisruptionBudget;
        let pods_r = Resource::lookup("pods").expect("pods");
        let pdbs_r = Resource::lookup("poddisruptionbudgets").expect("pdbs");
        let _g = Serialised::lock(&self.evictions);
        let obj = self.get(pods_r, Some(ns), name)?;
        let pod: Pod = validation::typed(&obj)?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if pod.metadata.deletion_timestamp.is_some()
            || matches!(phase, Some("Pending" | "Succeeded" | "Failed"))
        {
            return self.delete(pods_r, Some(ns), name, opts);
        }
        let decode = |r: &Resource| -> Result<Vec<Value>, ApiError> {
            let (all, _) = self
                .store
                .list(&format!("{}{ns}/", r.key_prefix()))
                .map_err(|e| store_err(r, "", e))?;
            Ok(all)
        };
        let budgets: Vec<PodDisruptionBudget> = decode(pdbs_r)?
            .iter()
            .filter_map(|b| validation::typed::<PodDisruptionBudget>(b).ok())
            .filter(|b| skiff_api::disruption::covers(b, &pod))
            .collect();
        match budgets.as_slice() {
            [] => {}
            [b] => {
                let pods: Vec<Pod> = decode(pods_r)?
                    .iter()
                    .filter_map(|p| validation::typed::<Pod>(p).ok())
                    .collect();
                let scale = |kind: &str, name: &str| {
                    let r = Resource::by_kind("apps/v1", kind).filter(|r| r.has_scale)?;
                    let o = self.try_get(r, Some(ns), name).ok()??;
                    o.pointer("/spec/replicas")
                        .and_then(Value::as_i64)
                        .map(|n| n as i32)
                };
                if skiff_api::disruption::budget(b, &pods, scale).allowed <= 0 {
                    return Err(ApiError::too_many_requests(
                        "Cannot evict pod as it would violate the pod's disruption budget.",
                    ));
                }
            }
            _ => {
                return Err(ApiError::internal(
                    "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
                ))
            }
        }
        self.delete(pods_r, Some(ns), name, opts)
    }

    pub fn delete(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        if events::is_events_v1(r) {
            let out = self.delete(events::core_events(), ns, name, opts)?;
            return Ok(match out.get("kind").and_then(Value::as_str) {
                Some("Event") => events::from_core(&out)?,
                _ => out,
            });
        }
        // As the Kubernetes API server does, a delete without preconditions is retried when
        // the object changed between its read and its write (a controller's status update).
        // A retry starts from the newest applied version: the readers' view may still be
        // waiting for the flush of the write that caused the conflict.
        let (mut tries, started) = (0, std::time::Instant::now());
        loop {
            tries += 1;
            match self.delete_once(r, ns, name, opts, tries > 1) {
                Err(e)
                    if e.code == 409
                        && e.reason == "Conflict"
                        && retry_conflict(tries, started)
                        && opts.precondition_uid.is_none()
                        && opts.precondition_rv.is_none() =>
                {
                    continue
                }
                other => return other,
            }
        }
    }

    fn delete_once(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
        latest: bool,
    ) -> Result<Value, ApiError> {
        let old = self
            .read(r, ns, name, latest)?
            .ok_or_else(|| ApiError::not_found(&r.qualified(), name))?;
        if let Some(uid) = &opts.precondition_uid {
            if uid != meta::uid(&old) {
                return Err(ApiError::conflict(
                    &r.qualified(),
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta::uid(&old)
                    ),
                ));
            }
        }
        if let Some(rv) = &opts.precondition_rv {
            if Some(rv.as_str())
                != old
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
            {
                return Err(ApiError::conflict(
                    &r.qualified(),
                    name,
                    "Precondition failed: resourceVersion does not match",
                ));
            }
        }
        let mut finalizers = meta::finalizers(&old);
        match opts.propagation.as_deref() {
            Some("Foreground") => finalizers.push("foregroundDeletion".into()),
            Some("Orphan") => finalizers.push("orphan".into()),
            _ => {}
        }
        let kind = Self::builtin_kind(r);
        if kind == "Namespace" {
            finalizers.push("kubernetes".into());
        }
        // A definition's objects go before it does (the garbage collector's work).
        if kind == "CustomResourceDefinition" {
            finalizers.push(skiff_api::crd::CLEANUP_FINALIZER.into());
        }
        let grace = opts
            .grace_period_seconds
            .or_else(|| {
                old.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(0);
        // A pod running on a node is stopped by its agent first; the agent then deletes it.
        let graceful = kind == "Pod"
            && grace > 0
            && old
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty());
        let key = r.key(ns, name);
        let expect = meta::resource_version(&old);
        let dedup: BTreeSet<String> = finalizers.iter().cloned().collect();
        if dedup.is_empty() && !graceful {
            if opts.dry_run {
                return Ok(old);
            }
            return self.commit_one(r, name, Op::Delete { key, expect });
        }
        if meta::is_deleting(&old) {
            // Already terminating: a shorter grace period may still be asked for.
            let cur = old
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if !(graceful && grace < cur) && opts.grace_period_seconds != Some(0) {
                return Ok(old);
            }
            if opts.grace_period_seconds == Some(0) && dedup.is_empty() {
                return self.commit_one(r, name, Op::Delete { key, expect });
            }
        }
        let mut new = old.clone();
        {
            let m = meta::metadata_mut(&mut new);
            m.insert("deletionTimestamp".into(), json!(now()));
            m.insert(
                "deletionGracePeriodSeconds".into(),
                json!(if graceful { grace } else { 0 }),
            );
            if !dedup.is_empty() {
                m.insert(
                    "finalizers".into(),
                    json!(finalizers.into_iter().collect::<BTreeSet<_>>()),
                );
            }
        }
        if kind == "Namespace" {
            new["status"]["phase"] = json!("Terminating");
        }
        if opts.dry_run {
            return Ok(new);
        }
        self.commit_one(
            r,
            name,
            Op::Update {
                key,
                value: new,
                expect,
            },
        )
    }

    /// Commits one op and returns the object it wrote (for a delete, its last state).
    /// Deletes objects without finalizers or grace (expiring Events), each only if it is
    /// still at the resourceVersion it was seen with, in one transaction. Should one have
    /// changed or gone meanwhile, each is tried alone and those that changed are kept.
    /// Returns how many were deleted.
    pub fn delete_unchanged(
        &self,
        r: &Resource,
        seen: &[(String, String, u64)],
    ) -> Result<usize, ApiError> {
        let op = |(ns, name, rv): &(String, String, u64)| Op::Delete {
            key: r.key(r.namespaced.then_some(ns.as_str()), name),
            expect: Some(*rv),
        };
        match self.commit(seen.iter().map(op).collect()) {
            Ok(_) => return Ok(seen.len()),
            Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
            Err(e) => return Err(store_err(r, "", e)),
        }
        let mut deleted = 0;
        for s in seen {
            match self.commit(vec![op(s)]) {
                Ok(_) => deleted += 1,
                Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
                Err(e) => return Err(store_err(r, &s.1, e)),
            }
        }
        Ok(deleted)
    }

    /// The one way the registry writes the store: durable when it returns, unless under
    /// [`deferring`] and outside a serialised section.
    fn commit(&self, ops: Vec<Op>) -> Result<Committed, StoreError> {
        let defer = SERIALISED.with(|n| n.get() == 0) && DEFERRED.with(|d| d.borrow().is_some());
        if !defer {
            return self.store.txn(ops);
        }
        let (committed, durable) = self.store.txn_deferred(ops)?;
        DEFERRED.with(|d| {
            if let Some(pending) = d.borrow_mut().as_mut() {
                pending.push(durable);
            }
        });
        Ok(committed)
    }

    fn commit_one(&self, r: &Resource, name: &str, mut op: Op) -> Result<Value, ApiError> {
        // A custom object is stored in its definition's storage version.
        if let Some(def) = self.definition(r) {
            let av = format!("{}/{}", r.group, def.storage_version());
            if let Op::Create { value, .. } | Op::Update { value, .. } = &mut op {
                value["apiVersion"] = json!(av);
            }
        }
        let definition = r.is_builtin() && r.group == skiff_api::crd::GROUP;
        // A definition's write is durable before the served resources are rebuilt from the
        // store's durable view.
        let c = if definition {
            self.store.txn(vec![op])
        } else {
            self.commit(vec![op])
        }
        .map_err(|e| store_err(r, name, e))?;
        let obj = c.objects.into_iter().next().expect("one op, one object");
        if definition {
            self.refresh_custom()?;
        }
        Ok(self.present(r, obj))
    }

    /// Removes a finalizer from an object; when it was the last one of an object being
    /// deleted whose grace period is over, the object is deleted (see [`empties_finalizers`]).
    pub fn remove_finalizer(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        finalizer: &str,
    ) -> Result<(), ApiError> {
        let old = self.get(r, ns, name)?;
        let mut new = old.clone();
        let left: Vec<String> = meta::finalizers(&old)
            .into_iter()
            .filter(|f| f != finalizer)
            .collect();
        meta::metadata_mut(&mut new).insert("finalizers".into(), json!(left));
        let expect = meta::resource_version(&old);
        let op = if empties_finalizers(&old, &new) {
            Op::Delete {
                key: r.key(ns, name),
                expect,
            }
        } else {
            Op::Update {
                key: r.key(ns, name),
                value: new,
                expect,
            }
        };
        self.commit_one(r, name, op).map(|_| ())
    }

    /// Binds pods to nodes in one transaction (the scheduler's write). Pods that changed
    /// since they were read make the whole batch fail with 409; the scheduler retries them.
    pub fn bind_all(&self, binds: Vec<(Value, String)>) -> Result<u64, ApiError> {
        let pods = Resource::lookup("pods").expect("pods");
        let ops: Vec<Op> = binds
            .into_iter()
            .map(|(mut pod, node)| {
                let expect = meta::resource_version(&pod);
                pod["spec"]["nodeName"] = json!(node);
                scheduled(&mut pod);
                Op::Update {
                    key: pods.key(meta::namespace(&pod), meta::name(&pod)),
                    value: pod,
                    expect,
                }
            })
            .collect();
        if ops.is_empty() {
            return Ok(self.store.revision());
        }
        self.commit(ops)
            .map(|c| c.revision)
            .map_err(|e| store_err(pods, "", e))
    }

    // ---- admission: allocations -------------------------------------------------------------

    /// Whether admitting `r` allocates from a shared range (service IPs and node ports, pod
    /// CIDRs): such writes hold `alloc` until they are committed, so two never take the same.
    fn allocates(r: &Resource) -> bool {
        matches!(Self::builtin_kind(r), "Service" | "Node")
    }

    /// A node writing its own Node: the labels and taints it may not change.
    fn node_restriction(
        r: &Resource,
        old: Option<&Value>,
        new: &Value,
        opts: &WriteOptions,
    ) -> Result<(), ApiError> {
        let Some(node) = opts
            .by_node
            .as_deref()
            .filter(|_| Self::builtin_kind(r) == "Node")
        else {
            return Ok(());
        };
        let typed = |v: &Value| {
            serde_json::from_value::<k8s_openapi::api::core::v1::Node>(v.clone())
                .map_err(|e| ApiError::bad_request(format!("node: {e}")))
        };
        let old = old.map(typed).transpose()?;
        crate::apiserver::auth::admit_node_write(node, old.as_ref(), &typed(new)?)
    }

    fn admit(&self, r: &Resource, old: Option<&Value>, obj: &mut Value) -> Result<(), ApiError> {
        match Self::builtin_kind(r) {
            "Service" => self.admit_service(old, obj),
            "Node" if old.is_none() => self.admit_node(obj),
            "CustomResourceDefinition" => self.admit_definition(obj),
            _ => Ok(()),
        }
    }

    /// A definition's status, as Kubernetes' controllers keep it: the names accepted (or
    /// the name another definition already uses), `NamesAccepted` and `Established`, the
    /// versions objects were stored in, and `Terminating` once it is being deleted.
    fn admit_definition(&self, obj: &mut Value) -> Result<(), ApiError> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
            CustomResourceDefinition, CustomResourceDefinitionCondition as Cond,
        };
        use skiff_api::conditions::{self, Condition};
        let mut crd: CustomResourceDefinition = validation::typed(obj)?;
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(chrono::Utc::now().timestamp())
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        );
        let conflict = self.custom().name_conflict(&crd);
        let mut status = crd.status.take().unwrap_or_default();
        let mut conds = status.conditions.take().unwrap_or_default();
        match conflict {
            None => {
                status.accepted_names = Some(crd.spec.names.clone());
                conditions::set(
                    &mut conds,
                    Cond::new(
                        "NamesAccepted",
                        "True",
                        "NoConflicts",
                        "no conflicts found",
                        &now,
                    ),
                    &now,
                );
                conditions::set(
                    &mut conds,
                    Cond::new(
                        "Established",
                        "True",
                        "InitialNamesAccepted",
                        "the initial names have been accepted",
                        &now,
                    ),
                    &now,
                );
            }
            Some(why) => {
                conditions::set(
                    &mut conds,
                    Cond::new("NamesAccepted", "False", "NameConflict", &why, &now),
                    &now,
                );
                conditions::set(
                    &mut conds,
                    Cond::new(
                        "Established",
                        "False",
                        "NotAccepted",
                        "not all names are accepted",
                        &now,
                    ),
                    &now,
                );
            }
        }
        if crd.metadata.deletion_timestamp.is_some() {
            conditions::set(
                &mut conds,
                Cond::new(
                    "Terminating",
                    "True",
                    "InstanceDeletionInProgress",
                    "CustomResource deletion is in progress",
                    &now,
                ),
                &now,
            );
        }
        status.conditions = Some(conds);
        let mut stored = status.stored_versions.take().unwrap_or_default();
        if let Some(v) = crd.spec.versions.iter().find(|v| v.storage) {
            if !stored.contains(&v.name) {
                stored.push(v.name.clone());
            }
        }
        status.stored_versions = Some(stored);
        obj["status"] = serde_json::to_value(status)
            .map_err(|e| ApiError::internal(format!("definition status: {e}")))?;
        Ok(())
    }

    fn admit_service(&self, old: Option<&Value>, obj: &mut Value) -> Result<(), ApiError> {
        if let Some(old) = old {
            patch_allocated_values(old, obj);
        }
        let svcs = Resource::lookup("services").expect("services");
        let (all, _) = self
            .store
            .list(&svcs.key_prefix())
            .map_err(|e| store_err(svcs, "", e))?;
        let me = (
            meta::namespace(obj).unwrap_or("").to_string(),
            meta::name(obj).to_string(),
        );
        let others: Vec<&Value> = all
            .iter()
            .filter(|s| {
                (
                    meta::namespace(s).unwrap_or("").to_string(),
                    meta::name(s).to_string(),
                ) != me
            })
            .collect();
        let name = meta::name(obj).to_string();
        let ty = obj
            .pointer("/spec/type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string();
        if ty == "ExternalName" {
            return Ok(());
        }
        // Cluster IP.
        let used_ips = strings_at(others.iter().copied(), "/spec/clusterIP");
        let requested = obj
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let ip = if requested == "None" {
            "None".to_string()
        } else if !requested.is_empty() {
            let ip: Ipv4Addr = requested.parse().map_err(|_| {
                ApiError::invalid(
                    "Service",
                    &name,
                    vec![Cause::invalid(
                        "spec.clusterIP",
                        &requested,
                        "must be a valid IP address",
                    )],
                )
            })?;
            if !in_cidr(ip, self.config.service_cidr) {
                return Err(ApiError::invalid(
                    "Service",
                    &name,
                    vec![Cause::invalid(
                        "spec.clusterIP",
                        &requested,
                        "provided IP is not in the valid range",
                    )],
                ));
            }
            if used_ips.contains(&requested) {
                return Err(ApiError::invalid(
                    "Service",
                    &name,
                    vec![Cause::invalid(
                        "spec.clusterIP",
                        &requested,
                        "provided IP is already allocated",
                    )],
                ));
            }
            requested
        } else {
            let (base, bits) = self.config.service_cidr;
            let size = 1u32 << (32 - bits);
            let base = u32::from(base);
            (2..size - 1)
                .map(|i| Ipv4Addr::from(base + i).to_string())
                .find(|ip| !used_ips.contains(ip))
                .ok_or_else(|| ApiError::internal("no service IP left to allocate"))?
        };
        obj["spec"]["clusterIP"] = json!(ip);
        if ip != "None" {
            obj["spec"]["clusterIPs"] = json!([ip]);
            obj["spec"]["ipFamilies"] = json!(["IPv4"]);
            obj["spec"]["ipFamilyPolicy"] = json!("SingleStack");
        }
        // Node ports.
        let wants_node_ports = ty == "NodePort" || ty == "LoadBalancer";
        let mut used_ports: BTreeSet<i64> = others
            .iter()
            .flat_map(|s| {
                s.pointer("/spec/ports")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|p| p.get("nodePort").and_then(Value::as_i64))
            .collect();
        let (lo, hi) = (
            self.config.node_ports.0 as i64,
            self.config.node_ports.1 as i64,
        );
        let mut causes = Vec::new();
        if let Some(ports) = obj.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
            for (i, p) in ports.iter_mut().enumerate() {
                if !wants_node_ports {
                    if let Some(m) = p.as_object_mut() {
                        m.remove("nodePort");
                    }
                    continue;
                }
                match p.get("nodePort").and_then(Value::as_i64) {
                    Some(np) if !(lo..=hi).contains(&np) => causes.push(Cause::invalid(format!("spec.ports[{i}].nodePort"), np, &format!("provided port is not in the valid range. The range of valid ports is {lo}-{hi}"))),
                    Some(np) if used_ports.contains(&np) => causes.push(Cause::invalid(format!("spec.ports[{i}].nodePort"), np, "provided port is already allocated")),
                    Some(np) => {
                        used_ports.insert(np);
                    }
                    None => {
                        // A free one (a port the service had was patched in above).
                        let start = lo + rand::random::<u16>() as i64 % (hi - lo + 1);
                        let pick = (0..=(hi - lo)).map(|d| lo + (start - lo + d) % (hi - lo + 1)).find(|p| !used_ports.contains(p));
                        match pick {
                            Some(np) => {
                                used_ports.insert(np);
                                p["nodePort"] = json!(np);
                            }
                            None => causes.push(Cause::invalid(format!("spec.ports[{i}].nodePort"), "", "no node port left to allocate")),
                        }
                    }
                }
            }
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid("Service", &name, causes));
        }
        if obj.get("status").is_none() {
            obj["status"] = json!({"loadBalancer": {}});
        }
        Ok(())
    }

    fn admit_node(&self, obj: &mut Value) -> Result<(), ApiError> {
        if obj
            .pointer("/spec/podCIDR")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
        {
            return Ok(());
        }
        let nodes = Resource::lookup("nodes").expect("nodes");
        let (all, _) = self
            .store
            .list(&nodes.key_prefix())
            .map_err(|e| store_err(nodes, "", e))?;
        let used = strings_at(&all, "/spec/podCIDR");
        let (base, bits) = self.config.pod_cidr;
        let mask = self.config.node_cidr_mask.clamp(bits, 30);
        let count = 1u32 << (mask - bits);
        let cidr = (0..count)
            .map(|i| {
                format!(
                    "{}/{mask}",
                    Ipv4Addr::from(u32::from(base) + (i << (32 - mask)))
                )
            })
            .find(|c| !used.contains(c))
            .ok_or_else(|| ApiError::internal("no pod CIDR left to allocate"))?;
        obj["spec"]["podCIDR"] = json!(cidr);
        obj["spec"]["podCIDRs"] = json!([cidr]);
        Ok(())
    }
}

/// Whether `new` is `old` but perhaps for `metadata.resourceVersion`: an update that would
/// store nothing new.
fn same_but_version(old: &Value, new: &Value) -> bool {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return old == new;
    };
    o.len() == n.len()
        && o.iter().all(|(k, v)| match (k.as_str(), n.get(k)) {
            ("metadata", Some(nm)) => match (v.as_object(), nm.as_object()) {
                (Some(om), Some(nm)) => {
                    let rest = |m: &serde_json::Map<String, Value>| {
                        m.iter().filter(|(k, _)| *k != "resourceVersion").count()
                    };
                    rest(om) == rest(nm)
                        && om
                            .iter()
                            .filter(|(k, _)| *k != "resourceVersion")
                            .all(|(k, v)| nm.get(k) == Some(v))
                }
                _ => v == nm,
            },
            (_, Some(nv)) => v == nv,
            (_, None) => false,
        })
}

/// Whether an update from `old` to `new` finishes a deletion, as Kubernetes' store decides it
/// (`shouldDeleteDuringUpdate`): the object is being deleted, the update removes its last
/// finalizer, and no grace period is pending (a pod on a node has one until its kubelet
/// finishes with a zero grace period). Any other update of a deleting object is an update.
pub fn empties_finalizers(old: &Value, new: &Value) -> bool {
    let grace_over = old
        .pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64)
        .is_none_or(|g| g == 0);
    meta::is_deleting(old)
        && !meta::finalizers(old).is_empty()
        && meta::finalizers(new).is_empty()
        && grace_over
}

/// Fills what an update of a Service leaves out with what was allocated for it, as
/// Kubernetes' `patchAllocatedValues` does, so resubmitting the same manifest (or a PUT that
/// never read the object) keeps its address and ports: the cluster IPs, each port's node port
/// (matched by port name; not one another port of the update already uses) and the health
/// check node port.
fn patch_allocated_values(old: &Value, new: &mut Value) {
    let ty = |s: &Value| {
        s.pointer("/spec/type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string()
    };
    let (old_ty, new_ty) = (ty(old), ty(new));
    if !new.get("spec").is_some_and(Value::is_object) {
        return;
    }
    let unset = |v: Option<&Value>| {
        v.is_none_or(|v| v.is_null() || v.as_str() == Some("") || v == &json!([]))
    };
    if old_ty != "ExternalName" && new_ty != "ExternalName" {
        for field in ["clusterIP", "clusterIPs"] {
            if let Some(v) = old
                .pointer(&format!("/spec/{field}"))
                .filter(|v| !unset(Some(v)))
            {
                if unset(new["spec"].get(field)) {
                    new["spec"][field] = v.clone();
                }
            }
        }
    }
    let node_ports = |t: &str| t == "NodePort" || t == "LoadBalancer";
    if node_ports(&old_ty) && node_ports(&new_ty) {
        let ports_of = |s: &Value| {
            s.pointer("/spec/ports")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let port_name = |p: &Value| p["name"].as_str().unwrap_or("").to_string();
        let node_port = |p: &Value| {
            p.get("nodePort")
                .and_then(Value::as_i64)
                .filter(|n| *n != 0)
        };
        let old_ports = ports_of(old);
        let mut taken: BTreeSet<i64> = ports_of(new).iter().filter_map(node_port).collect();
        if let Some(ports) = new.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
            for p in ports.iter_mut().filter(|p| node_port(p).is_none()) {
                let had = old_ports
                    .iter()
                    .find(|o| port_name(o) == port_name(p))
                    .and_then(node_port);
                if let Some(np) = had.filter(|np| !taken.contains(np)) {
                    p["nodePort"] = json!(np);
                    taken.insert(np);
                }
            }
        }
    }
    if old_ty == "LoadBalancer"
        && new_ty == "LoadBalancer"
        && unset(new["spec"].get("healthCheckNodePort"))
    {
        if let Some(hc) = old
            .pointer("/spec/healthCheckNodePort")
            .filter(|v| v.as_i64().is_some_and(|n| n != 0))
        {
            new["spec"]["healthCheckNodePort"] = hc.clone();
        }
    }
}

/// `.spec.replicas` → `/spec/replicas`: a simple JSONPath as a JSON pointer.
fn pointer_of(path: &str) -> String {
    path.split('.')
        .filter(|s| !s.is_empty())
        .fold(String::new(), |acc, s| format!("{acc}/{s}"))
}

/// Sets the value at a JSON pointer, making the objects on the way.
fn set_at(obj: &mut Value, pointer: &str, v: Value) {
    let mut cur = obj;
    let parts: Vec<&str> = pointer.split('/').skip(1).collect();
    for (i, p) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = json!({});
        }
        let m = cur.as_object_mut().expect("an object");
        if i + 1 == parts.len() {
            m.insert(p.to_string(), v);
            return;
        }
        cur = m.entry(p.to_string()).or_insert_with(|| json!({}));
    }
}

/// Removes `null` members: the API never stores them (a null means "unset").
pub fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// The string values at `pointer` in `objs` (the addresses or ranges already taken).
fn strings_at<'a>(objs: impl IntoIterator<Item = &'a Value>, pointer: &str) -> BTreeSet<String> {
    objs.into_iter()
        .filter_map(|o| o.pointer(pointer).and_then(Value::as_str).map(String::from))
        .collect()
}

fn body_has_rv(body: &Value) -> bool {
    body.pointer("/metadata/resourceVersion").is_some()
}

fn in_cidr(ip: Ipv4Addr, (base, bits): (Ipv4Addr, u8)) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    u32::from(ip) & mask == u32::from(base) & mask
}

/// The `autoscaling/v1` Scale of a scalable object.
pub fn scale_of(r: &Resource, obj: &Value) -> Value {
    let selector = obj
        .pointer("/spec/selector")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .and_then(|ls| Selector::from_label_selector(&ls).ok())
        .map(|s| s.to_string())
        .unwrap_or_default();
    let _ = r;
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta::name(obj),
            "namespace": meta::namespace(obj),
            "uid": meta::uid(obj),
            "resourceVersion": obj.pointer("/metadata/resourceVersion"),
            "creationTimestamp": obj.pointer("/metadata/creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector,
        }
    })
}

/// Sets `PodScheduled=True` on a stored pod (the bind), through `skiff_api::conditions`;
/// the rest of the pod is left as stored.
fn scheduled(pod: &mut Value) {
    use k8s_openapi::api::core::v1::PodCondition;
    use skiff_api::conditions::{self, Condition};
    if !pod.get("status").is_some_and(Value::is_object) {
        pod["status"] = json!({});
    }
    let mut conds: Vec<PodCondition> = pod["status"]
        .get("conditions")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(chrono::Utc::now().timestamp())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    );
    conditions::set(
        &mut conds,
        PodCondition::new("PodScheduled", "True", "", "", &now),
        &now,
    );
    pod["status"]["conditions"] = serde_json::to_value(conds).unwrap_or_default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::Store;
    use std::time::Duration;

    fn registry() -> (tempfile::TempDir, Arc<SqliteStore>, Arc<Registry>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let reg = Registry::new(store.clone(), ClusterConfig::default());
        crate::server::bootstrap(&reg, "127.0.0.1:6443".parse().unwrap()).unwrap();
        (dir, store, reg)
    }

    /// Two registries on one store (two API servers on one datastore) creating Services and
    /// NodePorts at once never hand out the same cluster IP or node port.
    #[test]
    fn two_servers_allocating_at_once_never_collide() {
        let (_dir, store, first) = registry();
        let second = Registry::new(store.clone(), ClusterConfig::default());
        let svc = Resource::lookup("services").unwrap();
        let writers: Vec<_> = [first, second]
            .into_iter()
            .enumerate()
            .flat_map(|(r, reg)| {
                (0..2).map(move |t| {
                    let reg = reg.clone();
                    std::thread::spawn(move || {
                        for i in 0..10 {
                            reg.create(
                                svc,
                                Some("default"),
                                json!({"metadata": {"name": format!("s{r}-{t}-{i}")},
                                       "spec": {"type": "NodePort", "ports": [{"port": 80}]}}),
                                &WriteOptions::default(),
                            )
                            .unwrap();
                        }
                    })
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let (all, _) = store.list(&svc.key_prefix()).unwrap();
        let ips = strings_at(&all, "/spec/clusterIP");
        let mut ports: Vec<i64> = all
            .iter()
            .filter_map(|s| s.pointer("/spec/ports/0/nodePort").and_then(Value::as_i64))
            .collect();
        assert_eq!(ips.len(), all.len(), "two services share a cluster IP");
        let made = ports.len();
        ports.sort();
        ports.dedup();
        assert_eq!(
            (made, ports.len()),
            (40, 40),
            "two services share a node port"
        );
    }

    /// An update or patch that changes nothing keeps the resourceVersion and is not written,
    /// as in Kubernetes; a stale resourceVersion is still a conflict, and a
    /// real change still writes.
    #[test]
    fn writes_that_change_nothing_keep_the_version() {
        let (_dir, _store, reg) = registry();
        let cm = Resource::lookup("configmaps").unwrap();
        let opts = WriteOptions::default();
        let made = reg
            .create(
                cm,
                Some("default"),
                json!({"metadata": {"name": "c", "labels": {"a": "1"}}, "data": {"k": "v"}}),
                &opts,
            )
            .unwrap();
        let rv = meta::resource_version(&made);
        let same = reg
            .update(cm, Some("default"), "c", made.clone(), Sub::Main, &opts)
            .unwrap();
        assert_eq!(meta::resource_version(&same), rv, "a no-op update wrote");
        let patched = reg
            .patch(
                cm,
                Some("default"),
                "c",
                PatchKind::Merge,
                &json!({"data": {"k": "v"}}),
                Sub::Main,
                &opts,
            )
            .unwrap();
        assert_eq!(meta::resource_version(&patched), rv, "a no-op patch wrote");
        let mut stale = made.clone();
        stale["metadata"]["resourceVersion"] = json!("1");
        let err = reg
            .update(cm, Some("default"), "c", stale, Sub::Main, &opts)
            .unwrap_err();
        assert_eq!(err.code, 409, "a stale no-op update: {}", err.message);
        let changed = reg
            .patch(
                cm,
                Some("default"),
                "c",
                PatchKind::Merge,
                &json!({"data": {"k": "w"}}),
                Sub::Main,
                &opts,
            )
            .unwrap();
        assert_ne!(
            meta::resource_version(&changed),
            rv,
            "a change was not written"
        );
        assert_eq!(changed.pointer("/data/k"), Some(&json!("w")));
    }

    /// Creates Deployments `names` and starts a thread patching their status, round robin,
    /// until the returned flag is set.
    fn busy_status_writer(
        reg: &Arc<Registry>,
        names: Vec<String>,
    ) -> (
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    ) {
        let deploy = Resource::lookup("deployments").unwrap();
        for name in &names {
            reg.create(
                deploy,
                Some("default"),
                json!({"metadata": {"name": name}, "spec": {"replicas": 1,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                                 "spec": {"containers": [{"name": "c", "image": "x"}]}}}}),
                &WriteOptions::default(),
            )
            .unwrap();
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (reg, stop) = (reg.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let _ = reg.patch(
                        deploy,
                        Some("default"),
                        &names[i % names.len()],
                        PatchKind::Merge,
                        &json!({"status": {"observedGeneration": i}}),
                        Sub::Status,
                        &WriteOptions::default(),
                    );
                }
            })
        };
        (stop, writer)
    }

    /// Deletes racing a busy status writer all succeed: a retry starts from the newest write,
    /// not from the readers' view that may still wait for that write's flush.
    #[test]
    fn deletes_racing_status_writes_all_succeed() {
        let (_dir, _store, reg) = registry();
        let deploy = Resource::lookup("deployments").unwrap();
        let names: Vec<String> = (0..40).map(|i| format!("web-{i}")).collect();
        let (stop, writer) = busy_status_writer(&reg, names.clone());
        let failed: Vec<String> = names
            .iter()
            .filter_map(|name| {
                reg.delete(deploy, Some("default"), name, &DeleteOptions::default())
                    .err()
                    .map(|e| e.message)
            })
            .collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        assert!(
            failed.is_empty(),
            "{} deletes failed: {:?}",
            failed.len(),
            failed.first()
        );
    }

    /// A patch retried after a conflict starts from the newest write, not from the readers'
    /// view that may still wait for that write's flush: patches racing a busy status writer
    /// all succeed (kubectl's `rollout pause` failed with 409 after five stale retries).
    #[test]
    fn patches_racing_status_writes_all_succeed() {
        let (_dir, _store, reg) = registry();
        let deploy = Resource::lookup("deployments").unwrap();
        let (stop, writer) = busy_status_writer(&reg, vec!["web".to_string()]);
        let failed: Vec<String> = (0..100)
            .filter_map(|i| {
                reg.patch(
                    deploy,
                    Some("default"),
                    "web",
                    PatchKind::Merge,
                    &json!({"metadata": {"labels": {"round": i.to_string()}}}),
                    Sub::Main,
                    &WriteOptions::default(),
                )
                .err()
                .map(|e| e.message)
            })
            .collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        assert!(
            failed.is_empty(),
            "{} patches failed: {:?}",
            failed.len(),
            failed.first()
        );
    }

    #[tokio::test]
    async fn evictions_respect_the_disruption_budget_and_pods_get_default_tolerations() {
        let (_dir, _store, reg) = registry();
        let pods = Resource::lookup("pods").unwrap();
        let opts = WriteOptions::default();
        let rs = reg
            .create(
                Resource::lookup("rs").unwrap(),
                Some("default"),
                json!({"metadata": {"name": "web"}, "spec": {"replicas": 3,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                                 "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}}),
                &opts,
            )
            .unwrap();
        let owner = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web",
                            "uid": meta::uid(&rs), "controller": true}]);
        for i in 0..3 {
            let p = reg
                .create(
                    pods,
                    Some("default"),
                    json!({"metadata": {"name": format!("web-{i}"), "labels": {"app": "web"}, "ownerReferences": owner},
                           "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x:1"}]}}),
                    &opts,
                )
                .unwrap();
            let tolerations = p["spec"]["tolerations"].as_array().unwrap();
            assert_eq!(tolerations.len(), 2, "{tolerations:?}");
            let mut running = p.clone();
            running["status"] = json!({"phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}]});
            reg.update(
                pods,
                Some("default"),
                &format!("web-{i}"),
                running,
                Sub::Status,
                &opts,
            )
            .unwrap();
        }
        // Without a budget: evicted.
        reg.evict("default", "web-0", &DeleteOptions::default())
            .unwrap();
        let pdbs = Resource::lookup("pdb").unwrap();
        reg.create(
            pdbs,
            Some("default"),
            json!({"metadata": {"name": "web"},
                   "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}}),
            &opts,
        )
        .unwrap();
        // web-0 is terminating: the ReplicaSet's 3 are expected, 2 are healthy, and at most one
        // may be unavailable: no further eviction.
        let e = reg
            .evict("default", "web-2", &DeleteOptions::default())
            .unwrap_err();
        assert_eq!(e.code, 429, "{e}");
        assert!(e.message.contains("disruption budget"), "{e}");
        // Already terminating: evicting again is a plain delete.
        reg.evict("default", "web-0", &DeleteOptions::default())
            .unwrap();
    }

    #[tokio::test]
    async fn closed_selector_watches_are_removed() {
        let (_dir, store, reg) = registry();
        let cms = Resource::lookup("configmaps").unwrap();
        let before = store.watchers();
        for _ in 0..500 {
            let rx = reg
                .watch(
                    cms,
                    Some("default"),
                    store.revision(),
                    Selector::parse("nomatch=x").unwrap(),
                    FieldSelector::default(),
                )
                .unwrap();
            drop(rx);
        }
        // No event matches those watches: their closing alone must release them.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.watchers() != before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for the closed watches to go: {} subscribed, {before} before",
                store.watchers()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Under `deferring`, a write returns once applied, its durability a future to await; a
    /// write that allocates (a Service's cluster IP) still returns only once durable.
    #[test]
    fn deferred_writes_return_before_their_commit() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (_dir, store, reg) = registry();
        let hold = Arc::new(AtomicBool::new(true));
        {
            let hold = hold.clone();
            store.set_flush_hook(move |_, _| {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while hold.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
        let cms = Resource::lookup("configmaps").unwrap();
        let (created, durable) = deferring(|| {
            reg.create(
                cms,
                Some("default"),
                json!({"metadata": {"name": "d"}}),
                &WriteOptions::default(),
            )
        });
        let created = created.unwrap();
        let key = "/registry/configmaps/default/d";
        // Applied but held before its commit: readers do not see it yet.
        assert!(store.get(key).unwrap().is_none());
        hold.store(false, Ordering::SeqCst);
        futures::executor::block_on(durable).unwrap();
        assert_eq!(
            store.get(key).unwrap().unwrap()["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
        // An allocating write waits for its commit inside the allocation lock.
        hold.store(true, Ordering::SeqCst);
        let release = {
            let hold = hold.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                hold.store(false, Ordering::SeqCst);
            })
        };
        let svcs = Resource::lookup("services").unwrap();
        let (created, _durable) = deferring(|| {
            reg.create(
                svcs,
                Some("default"),
                json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}),
                &WriteOptions::default(),
            )
        });
        created.unwrap();
        assert!(store
            .get(&svcs.key(Some("default"), "s"))
            .unwrap()
            .is_some());
        release.join().unwrap();
    }

    fn widget_definition(name: &str, plural: &str, kind: &str, scope: &str) -> Value {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": {"group": "example.com", "scope": scope,
                "names": {"plural": plural, "kind": kind, "shortNames": ["wg"]},
                "versions": [
                    {"name": "v1", "served": true, "storage": true,
                     "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "properties": {
                            "size": {"type": "string", "default": "small"}}}}}}},
                    {"name": "v2", "served": true, "storage": false,
                     "schema": {"openAPIV3Schema": {"type": "object",
                        "x-kubernetes-preserve-unknown-fields": true}}}]}})
    }

    #[test]
    fn definitions_serve_custom_objects_in_every_version() {
        let (_dir, store, reg) = registry();
        let crds = Resource::lookup("crds").unwrap();
        let opts = WriteOptions::default();
        let crd = reg
            .create(
                crds,
                None,
                widget_definition("widgets.example.com", "widgets", "Widget", "Namespaced"),
                &opts,
            )
            .unwrap();
        assert_eq!(crd["status"]["acceptedNames"]["kind"], "Widget");
        assert_eq!(crd["spec"]["names"]["singular"], "widget");
        let v1 = reg
            .resource_by_path("example.com", "v1", "widgets")
            .unwrap();
        let v2 = reg
            .resource_by_path("example.com", "v2", "widgets")
            .unwrap();
        assert!(v1.namespaced && !v1.is_builtin());
        // Created through v2, stored in v1, shown in the version asked for.
        let made = reg
            .create(
                v2,
                Some("default"),
                json!({"apiVersion": "example.com/v2", "kind": "Widget",
                "metadata": {"name": "a"}, "spec": {"extra": 1}}),
                &WriteOptions {
                    lenient: true,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(made["apiVersion"], "example.com/v2");
        let stored = store.get(&v1.key(Some("default"), "a")).unwrap().unwrap();
        assert_eq!(stored["apiVersion"], "example.com/v1");
        assert_eq!(
            reg.get(v1, Some("default"), "a").unwrap()["apiVersion"],
            "example.com/v1"
        );
        // A patch through v1 starts from the object in v1.
        let patched = reg
            .patch(
                v1,
                Some("default"),
                "a",
                PatchKind::Merge,
                &json!({"spec": {"size": "large"}}),
                Sub::Main,
                &WriteOptions {
                    lenient: true,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(patched["spec"]["size"], "large");
        // A cluster-scoped definition whose names another one uses is not served.
        let clash = reg
            .create(
                crds,
                None,
                widget_definition("gadgets.example.com", "gadgets", "Gadget", "Cluster"),
                &opts,
            )
            .unwrap();
        assert_eq!(
            clash["status"]["conditions"][0]["status"], "False",
            "{clash}"
        );
        assert!(reg
            .resource_by_path("example.com", "v1", "gadgets")
            .is_none());
        let mut fixed = widget_definition("things.example.com", "things", "Thing", "Cluster");
        fixed["spec"]["names"]["shortNames"] = json!([]);
        reg.create(crds, None, fixed, &opts).unwrap();
        let things = reg.resource_by_path("example.com", "v1", "things").unwrap();
        assert!(!things.namespaced);
        reg.create(
            things,
            None,
            json!({"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "t"}}),
            &opts,
        )
        .unwrap();
        // Deleting a definition waits for its objects (the collector's work).
        let deleting = reg
            .delete(crds, None, "widgets.example.com", &DeleteOptions::default())
            .unwrap();
        assert!(
            meta::finalizers(&deleting).contains(&skiff_api::crd::CLEANUP_FINALIZER.to_string())
        );
        let e = reg
            .create(
                v1,
                Some("default"),
                json!({"metadata": {"name": "b"}}),
                &opts,
            )
            .unwrap_err();
        assert_eq!(e.code, 405, "{e}");
    }

    #[test]
    fn concurrent_creates_share_a_flush() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        const WRITERS: u64 = 8;
        let (_dir, store, reg) = registry();
        let start = store.revision();
        let flushes = Arc::new(AtomicUsize::new(0));
        {
            let flushes = flushes.clone();
            store.set_flush_hook(move |s, _| {
                if flushes.fetch_add(1, Ordering::SeqCst) == 0 {
                    // Hold the first flush until every create has been applied (or 10 s passed).
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    while s.applied_revision() < start + WRITERS
                        && std::time::Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            });
        }
        let cms = Resource::lookup("configmaps").unwrap();
        let writers: Vec<_> = (0..WRITERS)
            .map(|i| {
                let reg = reg.clone();
                std::thread::spawn(move || {
                    reg.create(
                        cms,
                        Some("default"),
                        json!({"metadata": {"name": format!("cm-{i}")}}),
                        &WriteOptions::default(),
                    )
                    .unwrap();
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let n = flushes.load(Ordering::SeqCst);
        assert!(n <= 2, "{WRITERS} concurrent creates took {n} flushes");
        assert_eq!(store.revision(), start + WRITERS);
    }

    fn manager_opts(m: &str, force: bool, dry_run: bool) -> WriteOptions {
        WriteOptions {
            field_manager: Some(m.into()),
            force,
            dry_run,
            ..Default::default()
        }
    }

    fn ssa_deployment(replicas: Option<i64>, labels: Value) -> Value {
        let mut d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": labels},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}});
        if let Some(r) = replicas {
            d["spec"]["replicas"] = json!(r);
        }
        d
    }

    fn managers(obj: &Value) -> Vec<(String, String)> {
        let mut m: Vec<(String, String)> = obj["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["manager"].as_str().unwrap_or("").to_string(),
                    e["operation"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        m.sort();
        m
    }

    /// Apply through the registry: created with an `Apply` entry, a conflicting apply is 409
    /// with a cause per field, a dry run stores nothing, `force` takes the field, a dropped
    /// label goes, and updates and status writes are recorded as `Update`s.
    #[test]
    fn server_side_apply_through_the_registry() {
        let (_dir, _store, reg) = registry();
        let deploy = Resource::lookup("deployments").unwrap();
        let ns = Some("default");
        let apply = |body: &Value, opts: &WriteOptions| {
            reg.patch(deploy, ns, "web", PatchKind::Apply, body, Sub::Main, opts)
        };
        let made = apply(
            &ssa_deployment(Some(2), json!({"app": "web", "tier": "front"})),
            &manager_opts("a", false, false),
        )
        .unwrap();
        assert_eq!(managers(&made), vec![("a".into(), "Apply".into())]);
        let b = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                       "metadata": {"name": "web"}, "spec": {"replicas": 4}});
        let e = apply(&b, &manager_opts("b", false, false)).unwrap_err();
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        assert_eq!(
            e.message,
            "Apply failed with 1 conflict: conflict with \"a\": .spec.replicas"
        );
        assert_eq!(e.causes[0].reason, "FieldManagerConflict");
        assert_eq!(e.causes[0].field, ".spec.replicas");
        let dry = apply(&b, &manager_opts("b", true, true)).unwrap();
        assert_eq!(dry["spec"]["replicas"], 4);
        assert_eq!(reg.get(deploy, ns, "web").unwrap()["spec"]["replicas"], 2);
        let forced = apply(&b, &manager_opts("b", true, false)).unwrap();
        assert_eq!(forced["spec"]["replicas"], 4);
        let again = apply(
            &ssa_deployment(None, json!({"app": "web"})),
            &manager_opts("a", false, false),
        )
        .unwrap();
        assert!(again["metadata"]["labels"].get("tier").is_none(), "{again}");
        assert_eq!(again["spec"]["replicas"], 4);
        // A merge patch by another manager, and a status write.
        let patched = reg
            .patch(
                deploy,
                ns,
                "web",
                PatchKind::Merge,
                &json!({"metadata": {"labels": {"team": "x"}}}),
                Sub::Main,
                &manager_opts("kubectl-patch", false, false),
            )
            .unwrap();
        let status = reg
            .patch(
                deploy,
                ns,
                "web",
                PatchKind::Merge,
                &json!({"status": {"observedGeneration": 3}}),
                Sub::Status,
                &WriteOptions::default(),
            )
            .unwrap();
        assert_eq!(
            managers(&status),
            vec![
                ("a".into(), "Apply".into()),
                ("b".into(), "Apply".into()),
                ("kubectl-patch".into(), "Update".into()),
                (CONTROLLER_MANAGER.into(), "Update".into()),
            ]
        );
        let entry = status["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["manager"] == CONTROLLER_MANAGER)
            .unwrap()
            .clone();
        assert_eq!(entry["subresource"], "status");
        assert_eq!(
            entry["fieldsV1"],
            json!({"f:status": {"f:observedGeneration": {}}})
        );
        // The same status again rewrites no entry.
        let same = reg
            .patch(
                deploy,
                ns,
                "web",
                PatchKind::Merge,
                &json!({"status": {"observedGeneration": 3}}),
                Sub::Status,
                &WriteOptions::default(),
            )
            .unwrap();
        assert_eq!(
            same["metadata"]["managedFields"],
            status["metadata"]["managedFields"]
        );
        assert!(patched["metadata"]["labels"]["team"] == "x");
        // Managed fields a client sends are kept when valid, refused when not.
        let mut cleared = reg.get(deploy, ns, "web").unwrap();
        cleared["metadata"]["managedFields"] = json!([{}]);
        let out = reg
            .update(
                deploy,
                ns,
                "web",
                cleared,
                Sub::Main,
                &WriteOptions::default(),
            )
            .unwrap();
        assert!(out["metadata"].get("managedFields").is_none(), "{out}");
        let mut bad = reg.get(deploy, ns, "web").unwrap();
        bad["metadata"]["managedFields"] = json!([{"manager": "x", "operation": "Delete"}]);
        let e = reg
            .update(deploy, ns, "web", bad, Sub::Main, &WriteOptions::default())
            .unwrap_err();
        assert_eq!(e.code, 422, "{e:?}");
    }

    /// What recording managed fields costs a write: creates, merge patches and status writes
    /// of Deployments, each next to the same writes of an object whose fields are not
    /// tracked (its managed fields cleared) and the engine's own share of a create.
    /// `cargo test --workspace --lib -- --ignored managed_fields_write_cost --nocapture`
    #[test]
    #[ignore]
    fn managed_fields_write_cost() {
        use std::time::Instant;
        let (_dir, _store, reg) = registry();
        let deploy = Resource::lookup("deployments").unwrap();
        let ns = Some("default");
        let n = 300;
        let opts = manager_opts("bench", false, false);
        let body = |i: usize| {
            let mut d = ssa_deployment(Some(1), json!({"app": "web"}));
            d["metadata"]["name"] = json!(format!("d{i}"));
            d
        };
        let t = Instant::now();
        for i in 0..n {
            reg.create(deploy, ns, body(i), &opts).unwrap();
        }
        let create = t.elapsed() / n as u32;
        let t = Instant::now();
        for i in 0..n {
            let mut m = ManagedFields::default();
            let w = Registry::writer(deploy, Sub::Main, &opts, "apps/v1", "2026-01-01T00:00:00Z");
            m.update(&json!({}), &body(i), &w, &BuiltinShape);
            std::hint::black_box(m.encode());
        }
        let engine = t.elapsed() / n as u32;
        // d1 keeps its managed fields, d0 has none (untracked).
        let mut cleared = reg.get(deploy, ns, "d0").unwrap();
        cleared["metadata"]["managedFields"] = json!([{}]);
        reg.update(deploy, ns, "d0", cleared, Sub::Main, &opts)
            .unwrap();
        // Alternated, so both see the same store and machine.
        let per = |sub: Sub| {
            let (mut tracked, mut plain) = (Duration::ZERO, Duration::ZERO);
            for i in 0..n {
                let p = match sub {
                    Sub::Status => json!({"status": {"observedGeneration": i}}),
                    _ => json!({"metadata": {"labels": {"n": i.to_string()}}}),
                };
                for (name, total) in [("d1", &mut tracked), ("d0", &mut plain)] {
                    let t = Instant::now();
                    reg.patch(deploy, ns, name, PatchKind::Merge, &p, sub, &opts)
                        .unwrap();
                    *total += t.elapsed();
                }
            }
            (tracked / n as u32, plain / n as u32)
        };
        let (patch_tracked, patch_plain) = per(Sub::Main);
        // The engine's share of a tracked patch: read the entries, record, write them back.
        let cur = reg.get(deploy, ns, "d1").unwrap();
        let t = Instant::now();
        for i in 0..n {
            let mut next = cur.clone();
            next["metadata"]["labels"]["n"] = json!(format!("x{i}"));
            reg.track_update(deploy, &cur, &mut next, None, Sub::Main, &opts);
            std::hint::black_box(next);
        }
        let patch_engine = t.elapsed() / n as u32;
        let (status_tracked, status_plain) = per(Sub::Status);
        println!("create: {create:?} per Deployment, of which recording its fields {engine:?}");
        println!(
            "merge patch: {patch_tracked:?} tracked (recording {patch_engine:?}), {patch_plain:?} untracked (baseline)"
        );
        println!("status write: {status_tracked:?} tracked, {status_plain:?} untracked (baseline)");
    }
}
