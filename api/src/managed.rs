//! Field ownership (`metadata.managedFields`) and server-side apply, as Kubernetes'
//! structured-merge-diff and the API server's field manager keep them.
//!
//! - A [`FieldSet`] is a tree of path elements in SMD's `FieldsV1` encoding: `f:name` for a
//!   field, `k:{"name":"app"}` for an element of a list keyed by its fields, `v:"x"` for an
//!   element of a set, `i:3` for an index; `.` marks a node that is itself a member.
//! - Every write records the fields it changed under its manager ([`ManagedFields::update`],
//!   operation `Update`), taking them away from the other managers.
//! - An apply ([`ManagedFields::apply`]) merges the applied configuration into the live object
//!   (lists by their type: atomic lists replaced, sets united, maps of elements merged by
//!   their keys), removes what the manager applied before and applies no longer unless
//!   another manager owns it, and refuses to change a field another manager owns
//!   ([`Conflict`]) unless forced, which takes the field over. Applying the value the field
//!   already has shares its ownership.
//!
//! How a list merges comes from a [`Shape`]: [`BuiltinShape`] takes the keys from the merge
//! keys the strategic merge patch uses (`crate::patch::merge_key`), with `protocol` added
//! to ports as Kubernetes' `x-kubernetes-list-map-keys` do; [`SchemaShape`] reads a custom
//! resource's `x-kubernetes-list-type`, `x-kubernetes-list-map-keys` and
//! `x-kubernetes-map-type`. Lists nothing says anything about are atomic.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The annotation kubectl's client-side apply keeps the applied configuration in.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// The manager that owns the fields of an object that had no managed fields before its
/// first apply.
pub const BEFORE_FIRST_APPLY: &str = "before-first-apply";
/// How many `Update` entries an object keeps; older ones are merged into
/// [`ANCIENT_CHANGES`].
pub const MAX_UPDATE_MANAGERS: usize = 10;
/// The entry the oldest `Update`s beyond [`MAX_UPDATE_MANAGERS`] are merged into.
pub const ANCIENT_CHANGES: &str = "ancient-changes";
/// The longest manager name Kubernetes accepts.
pub const MAX_MANAGER_LEN: usize = 128;

/// One step of a path through an object, as a [`Shape`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg<'a> {
    Field(&'a str),
    Item,
}

/// How a list merges and is owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListType {
    /// Replaced whole; owned as one field.
    Atomic,
    /// Scalars, each owned on its own (`v:`).
    Set,
    /// Objects identified by these fields (`k:`).
    Map(Vec<String>),
}

/// What the ownership engine needs to know of a kind's shape.
pub trait Shape {
    /// The type of the list at `path`; `items` are its elements (or those of the other side).
    fn list_type(&self, path: &[Seg<'_>], items: &[Value]) -> ListType;
    /// Whether the object at `path` is replaced whole (`x-kubernetes-map-type: atomic`).
    fn atomic_map(&self, path: &[Seg<'_>]) -> bool;
}

/// The built-in kinds: list keys from the strategic merge patch's merge keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuiltinShape;

impl Shape for BuiltinShape {
    fn list_type(&self, path: &[Seg<'_>], items: &[Value]) -> ListType {
        let Some(Seg::Field(field)) = path.last() else {
            return ListType::Atomic;
        };
        if crate::patch::is_set_list(field) {
            return ListType::Set;
        }
        static NONE: Value = Value::Null;
        match crate::patch::merge_key(field, items.first().unwrap_or(&NONE)) {
            Some(key @ ("containerPort" | "port")) => {
                ListType::Map(vec![key.to_string(), "protocol".to_string()])
            }
            Some(key) => ListType::Map(vec![key.to_string()]),
            None => ListType::Atomic,
        }
    }

    fn atomic_map(&self, path: &[Seg<'_>]) -> bool {
        // Label selectors (`+structType=atomic`) and selector maps (`+mapType=atomic`).
        matches!(
            path.last(),
            Some(Seg::Field(
                "selector" | "nodeSelector" | "labelSelector" | "namespaceSelector"
            ))
        ) && path.len() > 1
    }
}

/// A custom resource's `openAPIV3Schema`; its `metadata` is a built-in object's.
#[derive(Debug, Clone, Copy)]
pub struct SchemaShape<'a> {
    pub schema: Option<&'a JSONSchemaProps>,
}

impl SchemaShape<'_> {
    fn at(&self, path: &[Seg<'_>]) -> Option<&JSONSchemaProps> {
        let mut s = self.schema?;
        for seg in path {
            s = match seg {
                Seg::Field(f) => match s.properties.as_ref().and_then(|p| p.get(*f)) {
                    Some(p) => p,
                    None => match s.additional_properties.as_ref()? {
                        JSONSchemaPropsOrBool::Schema(a) => a,
                        JSONSchemaPropsOrBool::Bool(_) => return None,
                    },
                },
                Seg::Item => match s.items.as_ref()? {
                    JSONSchemaPropsOrArray::Schema(i) => i,
                    JSONSchemaPropsOrArray::Schemas(v) => v.first()?,
                },
            };
        }
        Some(s)
    }
}

impl Shape for SchemaShape<'_> {
    fn list_type(&self, path: &[Seg<'_>], items: &[Value]) -> ListType {
        if path.first() == Some(&Seg::Field("metadata")) {
            return BuiltinShape.list_type(path, items);
        }
        let Some(s) = self.at(path) else {
            return ListType::Atomic;
        };
        match s.x_kubernetes_list_type.as_deref() {
            Some("set") => ListType::Set,
            Some("map") => ListType::Map(s.x_kubernetes_list_map_keys.clone().unwrap_or_default()),
            _ => ListType::Atomic,
        }
    }

    fn atomic_map(&self, path: &[Seg<'_>]) -> bool {
        if path.first() == Some(&Seg::Field("metadata")) {
            return BuiltinShape.atomic_map(path);
        }
        self.at(path)
            .is_some_and(|s| s.x_kubernetes_map_type.as_deref() == Some("atomic"))
    }
}

/// A set of field paths, as a tree of encoded path elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<String, FieldSet>,
}

impl FieldSet {
    pub fn is_empty(&self) -> bool {
        !self.member && self.children.is_empty()
    }

    fn child(&mut self, pe: String) -> &mut FieldSet {
        self.children.entry(pe).or_default()
    }

    /// Adds every member of `other`.
    pub fn union(&mut self, other: &FieldSet) {
        self.member |= other.member;
        for (k, v) in &other.children {
            self.child(k.clone()).union(v);
        }
    }

    /// The members of `self` that are not members of `other`.
    pub fn difference(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet {
            member: self.member && !other.member,
            children: BTreeMap::new(),
        };
        for (k, v) in &self.children {
            let d = match other.children.get(k) {
                Some(o) => v.difference(o),
                None => v.clone(),
            };
            if !d.is_empty() {
                out.children.insert(k.clone(), d);
            }
        }
        out
    }

    /// The members of both.
    pub fn intersection(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet {
            member: self.member && other.member,
            children: BTreeMap::new(),
        };
        for (k, v) in &self.children {
            if let Some(o) = other.children.get(k) {
                let i = v.intersection(o);
                if !i.is_empty() {
                    out.children.insert(k.clone(), i);
                }
            }
        }
        out
    }

    /// Whether `path` (encoded elements) is a member.
    pub fn has(&self, path: &[&str]) -> bool {
        match path.split_first() {
            None => self.member,
            Some((first, rest)) => self.children.get(*first).is_some_and(|c| c.has(rest)),
        }
    }

    /// Every member as Kubernetes prints a path: `.spec.containers[name="app"].image`.
    pub fn paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_paths(String::new(), &mut out);
        out
    }

    fn collect_paths(&self, prefix: String, out: &mut Vec<String>) {
        if self.member {
            out.push(prefix.clone());
        }
        for (k, v) in &self.children {
            v.collect_paths(format!("{prefix}{}", print_element(k)), out);
        }
    }

    /// The `fieldsV1` JSON of this set.
    pub fn to_fields_v1(&self) -> Value {
        let mut m = Map::new();
        if self.member && !self.children.is_empty() {
            m.insert(".".into(), Value::Object(Map::new()));
        }
        for (k, v) in &self.children {
            m.insert(k.clone(), v.to_fields_v1());
        }
        Value::Object(m)
    }

    /// Reads a `fieldsV1` object.
    pub fn from_fields_v1(v: &Value) -> Result<FieldSet, String> {
        let Value::Object(m) = v else {
            return Err("fieldsV1 must be an object".into());
        };
        let mut out = FieldSet {
            member: m.is_empty(),
            children: BTreeMap::new(),
        };
        for (k, v) in m {
            if k == "." {
                out.member = true;
                continue;
            }
            if !["f:", "k:", "v:", "i:"].iter().any(|p| k.starts_with(p)) {
                return Err(format!("unknown path element {k:?}"));
            }
            out.children.insert(k.clone(), FieldSet::from_fields_v1(v)?);
        }
        Ok(out)
    }
}

/// `f:spec` → `.spec`, `k:{"name":"a"}` → `[name="a"]`, `v:"x"` → `[="x"]`, `i:0` → `[0]`.
fn print_element(pe: &str) -> String {
    if let Some(f) = pe.strip_prefix("f:") {
        return format!(".{f}");
    }
    if let Some(k) = pe.strip_prefix("k:") {
        if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(k) {
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
            return format!("[{}]", parts.join(","));
        }
        return format!("[{k}]");
    }
    if let Some(v) = pe.strip_prefix("v:") {
        return format!("[={v}]");
    }
    if let Some(i) = pe.strip_prefix("i:") {
        return format!("[{i}]");
    }
    pe.to_string()
}

/// The `k:` element of a list item: its key fields as JSON sorted by name. A missing
/// `protocol` is `TCP`, Kubernetes' default for the ports it keys.
fn key_element(item: &Value, keys: &[String]) -> Option<String> {
    let mut sorted: Vec<&String> = keys.iter().collect();
    sorted.sort();
    let mut parts = Vec::with_capacity(sorted.len());
    for k in sorted {
        let v = match item.get(k.as_str()) {
            Some(v) if !v.is_null() => v.clone(),
            _ if k == "protocol" => Value::String("TCP".into()),
            _ => return None,
        };
        parts.push(format!("{}:{v}", Value::String(k.clone())));
    }
    Some(format!("k:{{{}}}", parts.join(",")))
}

/// The path element of each item of a list of this type (None for an atomic list).
fn item_elements(lt: &ListType, items: &[Value]) -> Option<Vec<String>> {
    match lt {
        ListType::Atomic => None,
        ListType::Set => Some(items.iter().map(|v| format!("v:{v}")).collect()),
        ListType::Map(keys) => Some(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| key_element(v, keys).unwrap_or_else(|| format!("i:{i}")))
                .collect(),
        ),
    }
}

/// Which part of an object a write's ownership covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The object without its status (kinds with a status subresource).
    Main,
    /// The whole object (kinds without a status subresource).
    All,
    /// Only the status (the `status` subresource).
    Status,
}

/// Fields nobody owns: the type, the identity and what the server sets.
fn skipped(path: &[Seg<'_>], key: &str, scope: Scope) -> bool {
    match path {
        [] => match key {
            "apiVersion" | "kind" => true,
            "status" => scope == Scope::Main,
            "metadata" => scope == Scope::Status,
            _ => scope == Scope::Status && key != "status",
        },
        [Seg::Field("metadata")] => matches!(
            key,
            "name"
                | "namespace"
                | "uid"
                | "resourceVersion"
                | "generation"
                | "creationTimestamp"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
                | "managedFields"
                | "selfLink"
        ),
        _ => false,
    }
}

struct Walker<'s> {
    shape: &'s dyn Shape,
    scope: Scope,
}

impl Walker<'_> {
    /// The fields of `v`, at `path`, into `out` (the node of `v`).
    fn value_set<'v>(&self, v: &'v Value, path: &mut Vec<Seg<'v>>, out: &mut FieldSet) {
        match v {
            Value::Object(m) if !m.is_empty() && !self.shape.atomic_map(path) => {
                for (k, cv) in m {
                    if skipped(path, k, self.scope) {
                        continue;
                    }
                    path.push(Seg::Field(k));
                    self.value_set(cv, path, out.child(format!("f:{k}")));
                    path.pop();
                }
            }
            Value::Array(items) => match item_elements(&self.shape.list_type(path, items), items) {
                None => out.member = true,
                Some(pes) => {
                    path.push(Seg::Item);
                    for (pe, item) in pes.into_iter().zip(items) {
                        let node = out.child(pe);
                        node.member = true;
                        if item.is_object() {
                            self.value_set(item, path, node);
                        }
                    }
                    path.pop();
                }
            },
            _ => out.member = true,
        }
    }

    /// The fields added, changed and removed from `old` to `new`.
    fn compare<'v>(
        &self,
        old: &'v Value,
        new: &'v Value,
        path: &mut Vec<Seg<'v>>,
        c: &mut Comparison,
    ) {
        match (old, new) {
            (Value::Object(o), Value::Object(n)) if !self.shape.atomic_map(path) => {
                for (k, nv) in n {
                    if skipped(path, k, self.scope) {
                        continue;
                    }
                    path.push(Seg::Field(k));
                    let pe = format!("f:{k}");
                    match o.get(k) {
                        Some(ov) => {
                            let mut sub = Comparison::default();
                            self.compare(ov, nv, path, &mut sub);
                            c.nest(pe, sub);
                        }
                        None => self.value_set(nv, path, c.added.child(pe)),
                    }
                    path.pop();
                }
                for (k, ov) in o {
                    if n.contains_key(k) || skipped(path, k, self.scope) {
                        continue;
                    }
                    path.push(Seg::Field(k));
                    self.value_set(ov, path, c.removed.child(format!("f:{k}")));
                    path.pop();
                }
            }
            (Value::Array(o), Value::Array(n)) => {
                let sample = if n.is_empty() { o } else { n };
                let lt = self.shape.list_type(path, sample);
                let (Some(ope), Some(npe)) = (item_elements(&lt, o), item_elements(&lt, n)) else {
                    if o != n {
                        c.modified.member = true;
                    }
                    return;
                };
                let index: HashMap<&str, usize> = ope
                    .iter()
                    .enumerate()
                    .map(|(i, pe)| (pe.as_str(), i))
                    .collect();
                let mut seen = HashSet::new();
                path.push(Seg::Item);
                for (pe, item) in npe.iter().zip(n) {
                    seen.insert(pe.as_str());
                    match index.get(pe.as_str()) {
                        Some(&i) => {
                            let mut sub = Comparison::default();
                            if o[i].is_object() && item.is_object() {
                                self.compare(&o[i], item, path, &mut sub);
                            } else if o[i] != *item {
                                sub.modified.member = true;
                            }
                            c.nest(pe.clone(), sub);
                        }
                        None => {
                            let node = c.added.child(pe.clone());
                            node.member = true;
                            if item.is_object() {
                                self.value_set(item, path, node);
                            }
                        }
                    }
                }
                for (pe, item) in ope.iter().zip(o) {
                    if !seen.contains(pe.as_str()) {
                        let node = c.removed.child(pe.clone());
                        node.member = true;
                        if item.is_object() {
                            self.value_set(item, path, node);
                        }
                    }
                }
                path.pop();
            }
            _ if old == new => {}
            _ => {
                c.modified.member = true;
                // A struct that becomes a value (or the reverse) loses its fields.
                if old.is_object() && !self.shape.atomic_map(path) {
                    let mut gone = FieldSet::default();
                    self.value_set(old, path, &mut gone);
                    gone.member = false;
                    c.removed.union(&gone);
                }
            }
        }
    }

    /// `config` merged into `live` (None: nothing there yet).
    fn merge<'v>(
        &self,
        live: Option<&'v Value>,
        config: &'v Value,
        path: &mut Vec<Seg<'v>>,
    ) -> Value {
        match (live, config) {
            (Some(Value::Object(_)) | None, Value::Object(c)) if !self.shape.atomic_map(path) => {
                let l = live.and_then(Value::as_object);
                let mut out = l.cloned().unwrap_or_default();
                for (k, cv) in c {
                    if cv.is_null() {
                        out.remove(k);
                        continue;
                    }
                    path.push(Seg::Field(k));
                    let merged = self.merge(l.and_then(|l| l.get(k)), cv, path);
                    path.pop();
                    out.insert(k.clone(), merged);
                }
                Value::Object(out)
            }
            (Some(Value::Array(l)), Value::Array(c)) => {
                let lt = self.shape.list_type(path, if c.is_empty() { l } else { c });
                let (Some(lpe), Some(cpe)) = (item_elements(&lt, l), item_elements(&lt, c)) else {
                    return config.clone();
                };
                let mut out = l.clone();
                let mut index: HashMap<String, usize> =
                    lpe.into_iter().enumerate().map(|(i, pe)| (pe, i)).collect();
                path.push(Seg::Item);
                for (pe, item) in cpe.into_iter().zip(c) {
                    match index.get(&pe) {
                        Some(&i) => out[i] = self.merge(l.get(i), item, path),
                        None => {
                            index.insert(pe, out.len());
                            out.push(self.merge(None, item, path));
                        }
                    }
                }
                path.pop();
                Value::Array(out)
            }
            (None, Value::Array(c)) => {
                path.push(Seg::Item);
                let out = c.iter().map(|item| self.merge(None, item, path)).collect();
                path.pop();
                Value::Array(out)
            }
            _ => config.clone(),
        }
    }

    /// Removes from `v` the members of `remove` that nobody keeps (`keep`), and within
    /// kept nodes, recursively, the parts of them in `remove` and not in `keep`.
    fn prune<'r>(
        &self,
        v: &mut Value,
        remove: &'r FieldSet,
        keep: Option<&'r FieldSet>,
        path: &mut Vec<Seg<'r>>,
    ) {
        match v {
            Value::Object(m) => {
                for (pe, r) in &remove.children {
                    let Some(f) = pe.strip_prefix("f:") else {
                        continue;
                    };
                    let k = keep.and_then(|k| k.children.get(pe));
                    if r.member && k.is_none() {
                        m.remove(f);
                    } else if let Some(child) = m.get_mut(f) {
                        path.push(Seg::Field(f));
                        self.prune(child, r, k, path);
                        path.pop();
                    }
                }
            }
            Value::Array(items) => {
                let Some(pes) = item_elements(&self.shape.list_type(path, items), items) else {
                    return;
                };
                let mut drop = vec![false; items.len()];
                path.push(Seg::Item);
                for (i, pe) in pes.iter().enumerate() {
                    let Some(r) = remove.children.get(pe) else {
                        continue;
                    };
                    let k = keep.and_then(|k| k.children.get(pe));
                    if r.member && k.is_none() {
                        drop[i] = true;
                    } else {
                        self.prune(&mut items[i], r, k, path);
                    }
                }
                path.pop();
                let mut i = 0;
                items.retain(|_| {
                    i += 1;
                    !drop[i - 1]
                });
            }
            _ => {}
        }
    }
}

#[derive(Debug, Default)]
struct Comparison {
    added: FieldSet,
    modified: FieldSet,
    removed: FieldSet,
}

impl Comparison {
    fn nest(&mut self, pe: String, sub: Comparison) {
        for (into, from) in [
            (&mut self.added, sub.added),
            (&mut self.modified, sub.modified),
            (&mut self.removed, sub.removed),
        ] {
            if !from.is_empty() {
                into.children.insert(pe.clone(), from);
            }
        }
    }

    fn changed(&self) -> FieldSet {
        let mut s = self.added.clone();
        s.union(&self.modified);
        s
    }
}

/// `Apply` or `Update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    Apply,
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// One manager's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub manager: String,
    pub operation: Operation,
    pub api_version: String,
    pub time: Option<String>,
    pub subresource: String,
    pub fields: FieldSet,
}

impl Entry {
    /// How Kubernetes names this manager in a conflict.
    fn describe(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            s = format!("{s} with subresource {:?}", self.subresource);
        }
        if self.operation == Operation::Update {
            s = match &self.time {
                Some(t) => format!("{s} using {} at {t}", self.api_version),
                None => format!("{s} using {}", self.api_version),
            };
        }
        s
    }
}

/// A `managedFields` entry as stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    manager: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    operation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fields_type: Option<String>,
    #[serde(default, rename = "fieldsV1", skip_serializing_if = "Option::is_none")]
    fields_v1: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subresource: Option<String>,
}

/// A field another manager owns, which an apply would change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The manager as Kubernetes prints it: `"a"`, or `"b" using apps/v1` for an update.
    pub manager: String,
    /// `.spec.replicas`.
    pub path: String,
}

/// Kubernetes' message for the conflicts of an apply.
pub fn conflict_message(conflicts: &[Conflict]) -> String {
    if let [c] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            c.manager, c.path
        );
    }
    let mut by: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for c in conflicts {
        by.entry(&c.manager).or_default().push(&c.path);
    }
    let mut lines = Vec::new();
    for (m, paths) in by {
        lines.push(format!("conflicts with {m}:"));
        lines.extend(paths.iter().map(|p| format!("- {p}")));
    }
    format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        lines.join("\n")
    )
}

/// Who writes, and what part of the object.
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    pub manager: &'a str,
    /// The version the object is written in (`apps/v1`).
    pub api_version: &'a str,
    /// `""`, `status` or `scale`.
    pub subresource: &'a str,
    pub scope: Scope,
    /// The write's time, RFC 3339.
    pub now: &'a str,
}

/// An object's `metadata.managedFields`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManagedFields {
    pub entries: Vec<Entry>,
}

impl ManagedFields {
    /// Reads the `managedFields` of `obj` (none: empty).
    pub fn of(obj: &Value) -> Result<Self, String> {
        match obj.pointer("/metadata/managedFields") {
            None | Some(Value::Null) => Ok(Self::default()),
            Some(v) => Self::decode(v),
        }
    }

    /// Reads a `managedFields` list. An entry with nothing in it is dropped (a list of one
    /// empty entry is how a client clears them).
    pub fn decode(v: &Value) -> Result<Self, String> {
        let wire = Vec::<WireEntry>::deserialize(v).map_err(|e| format!("managedFields: {e}"))?;
        let mut entries = Vec::new();
        for (i, w) in wire.into_iter().enumerate() {
            let Some(manager) = w.manager.clone() else {
                if w.fields_v1.is_none() && w.operation.is_none() {
                    continue;
                }
                return Err(format!("managedFields[{i}]: manager is required"));
            };
            let operation = match w.operation.as_deref() {
                Some("Apply") => Operation::Apply,
                Some("Update") => Operation::Update,
                other => {
                    return Err(format!(
                        "managedFields[{i}]: operation must be Apply or Update, got {other:?}"
                    ))
                }
            };
            if w.fields_type.as_deref().is_some_and(|t| t != "FieldsV1") {
                return Err(format!("managedFields[{i}]: fieldsType must be FieldsV1"));
            }
            let fields = match &w.fields_v1 {
                Some(f) => FieldSet::from_fields_v1(f)
                    .map_err(|e| format!("managedFields[{i}].fieldsV1: {e}"))?,
                None => FieldSet::default(),
            };
            entries.push(Entry {
                manager,
                operation,
                api_version: w.api_version.unwrap_or_default(),
                time: w.time,
                subresource: w.subresource.unwrap_or_default(),
                fields,
            });
        }
        Ok(ManagedFields { entries })
    }

    /// The `managedFields` list, in Kubernetes' order (operation, time, manager).
    pub fn encode(&self) -> Value {
        let mut entries: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| !e.fields.is_empty())
            .collect();
        entries.sort_by(|a, b| {
            (
                a.operation,
                &a.time,
                &a.manager,
                &a.api_version,
                &a.subresource,
            )
                .cmp(&(
                    b.operation,
                    &b.time,
                    &b.manager,
                    &b.api_version,
                    &b.subresource,
                ))
        });
        Value::Array(
            entries
                .into_iter()
                .map(|e| {
                    serde_json::to_value(WireEntry {
                        manager: Some(e.manager.clone()),
                        operation: Some(e.operation.as_str().into()),
                        api_version: Some(e.api_version.clone()),
                        time: e.time.clone(),
                        fields_type: Some("FieldsV1".into()),
                        fields_v1: Some(e.fields.to_fields_v1()),
                        subresource: (!e.subresource.is_empty()).then(|| e.subresource.clone()),
                    })
                    .unwrap_or(Value::Null)
                })
                .collect(),
        )
    }

    /// Writes these entries into `obj`'s metadata (none: the field is removed).
    pub fn store(&self, obj: &mut Value) {
        let encoded = self.encode();
        let Some(m) = obj
            .as_object_mut()
            .map(|o| {
                o.entry("metadata")
                    .or_insert_with(|| Value::Object(Map::new()))
            })
            .and_then(Value::as_object_mut)
        else {
            return;
        };
        if encoded.as_array().is_some_and(|a| a.is_empty()) {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), encoded);
        }
    }

    fn position(&self, w: &Writer<'_>, op: Operation) -> Option<usize> {
        self.entries.iter().position(|e| {
            e.manager == w.manager
                && e.operation == op
                && e.subresource == w.subresource
                && (op == Operation::Apply || e.api_version == w.api_version)
        })
    }

    /// Sets the fields of `w`'s entry. Its time is the write's when the write `changed`
    /// the object or the entry's fields, as Kubernetes keeps it: a write that changes
    /// nothing leaves the entry as it was.
    fn set(&mut self, w: &Writer<'_>, op: Operation, fields: FieldSet, changed: bool) {
        match self.position(w, op) {
            Some(i) => {
                let e = &mut self.entries[i];
                if changed || e.fields != fields || e.api_version != w.api_version {
                    e.fields = fields;
                    e.api_version = w.api_version.to_string();
                    e.time = Some(w.now.to_string());
                }
            }
            None => self.entries.push(Entry {
                manager: w.manager.to_string(),
                operation: op,
                api_version: w.api_version.to_string(),
                time: Some(w.now.to_string()),
                subresource: w.subresource.to_string(),
                fields,
            }),
        }
        self.entries.retain(|e| !e.fields.is_empty());
        self.cap_updates(w);
    }

    /// At most [`MAX_UPDATE_MANAGERS`] `Update` entries: the oldest are merged into
    /// `ancient-changes`, as Kubernetes keeps them.
    fn cap_updates(&mut self, w: &Writer<'_>) {
        let updates = |m: &Self| {
            m.entries
                .iter()
                .filter(|e| e.operation == Operation::Update)
                .count()
        };
        while updates(self) > MAX_UPDATE_MANAGERS {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.operation == Operation::Update && e.manager != ANCIENT_CHANGES)
                .min_by(|(_, a), (_, b)| a.time.cmp(&b.time))
                .map(|(i, _)| i)
            else {
                return;
            };
            let gone = self.entries.remove(oldest);
            match self
                .entries
                .iter_mut()
                .find(|e| e.manager == ANCIENT_CHANGES && e.operation == Operation::Update)
            {
                Some(a) => a.fields.union(&gone.fields),
                None => self.entries.push(Entry {
                    manager: ANCIENT_CHANGES.into(),
                    operation: Operation::Update,
                    api_version: gone.api_version,
                    time: Some(w.now.to_string()),
                    subresource: String::new(),
                    fields: gone.fields,
                }),
            }
        }
    }

    /// Records a write from `old` (`{}` for a create) to `new` by `w`: the fields it added
    /// or changed become its own and no one else's; those it removed no one's.
    pub fn update(&mut self, old: &Value, new: &Value, w: &Writer<'_>, shape: &dyn Shape) {
        let walker = Walker {
            shape,
            scope: w.scope,
        };
        let mut c = Comparison::default();
        walker.compare(old, new, &mut Vec::new(), &mut c);
        let changed = c.changed();
        if changed.is_empty() && c.removed.is_empty() {
            return;
        }
        let mut gone = changed.clone();
        gone.union(&c.removed);
        let me = self.position(w, Operation::Update);
        for (i, e) in self.entries.iter_mut().enumerate() {
            if Some(i) != me {
                e.fields = e.fields.difference(&gone);
            }
        }
        let mut mine = me
            .map(|i| self.entries[i].fields.clone())
            .unwrap_or_default();
        mine.union(&changed);
        let mine = mine.difference(&c.removed);
        self.set(w, Operation::Update, mine, true);
    }

    /// Applies `config` by `w` to `live`: the merged object, or the conflicts with other
    /// managers (none when `force`, which takes the fields over).
    pub fn apply(
        &mut self,
        live: &Value,
        config: &Value,
        w: &Writer<'_>,
        force: bool,
        shape: &dyn Shape,
    ) -> Result<Value, Vec<Conflict>> {
        let walker = Walker {
            shape,
            scope: w.scope,
        };
        let mut config = config.clone();
        if let Some(m) = config.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("managedFields");
        }
        // An object nobody tracked yet: its fields belong to `before-first-apply`.
        if self.entries.is_empty() && live.as_object().is_some_and(|o| !o.is_empty()) {
            let mut fields = FieldSet::default();
            walker.value_set(live, &mut Vec::new(), &mut fields);
            self.set(
                &Writer {
                    manager: BEFORE_FIRST_APPLY,
                    ..*w
                },
                Operation::Update,
                fields,
                true,
            );
        }
        let mut merged = walker.merge(Some(live), &config, &mut Vec::new());
        let mut applied = FieldSet::default();
        walker.value_set(&config, &mut Vec::new(), &mut applied);
        let me = self.position(w, Operation::Apply);
        if let Some(i) = me {
            let before = &self.entries[i].fields;
            let remove = before.difference(&applied);
            if !remove.is_empty() {
                let mut keep = applied.clone();
                for (j, e) in self.entries.iter().enumerate() {
                    if j != i {
                        keep.union(&e.fields);
                    }
                }
                walker.prune(&mut merged, &remove, Some(&keep), &mut Vec::new());
            }
        }
        let mut c = Comparison::default();
        walker.compare(live, &merged, &mut Vec::new(), &mut c);
        let changed = c.changed();
        let mut conflicts = Vec::new();
        let mut taken = Vec::new();
        for (j, e) in self.entries.iter().enumerate() {
            if Some(j) == me {
                continue;
            }
            let clash = e.fields.intersection(&changed);
            if !clash.is_empty() {
                conflicts.extend(clash.paths().into_iter().map(|path| Conflict {
                    manager: e.describe(),
                    path,
                }));
                taken.push((j, clash));
            }
        }
        let allowed =
            force || (w.manager == "kubectl" && allowed_by_last_applied(live, &conflicts, &walker));
        if !conflicts.is_empty() && !allowed {
            return Err(conflicts);
        }
        for (j, clash) in taken {
            self.entries[j].fields = self.entries[j].fields.difference(&clash);
        }
        // Fields removed by the merge (pruned) are owned by no one any more.
        for (j, e) in self.entries.iter_mut().enumerate() {
            if Some(j) != me && !c.removed.is_empty() {
                e.fields = e.fields.difference(&c.removed);
            }
        }
        let changed = !c.changed().is_empty() || !c.removed.is_empty();
        self.set(w, Operation::Apply, applied, changed);
        // kubectl's server-side apply keeps a client-side apply's record up to date.
        if w.manager == "kubectl" {
            if let Some(a) = merged
                .pointer_mut("/metadata/annotations")
                .and_then(Value::as_object_mut)
                .filter(|a| a.contains_key(LAST_APPLIED))
            {
                a.insert(LAST_APPLIED.into(), Value::String(config.to_string()));
            }
        }
        Ok(merged)
    }
}

/// kubectl's apply that conflicts only on fields of the configuration its client-side apply
/// recorded, still holding the values recorded there, may take them: kubectl moving from
/// client-side to server-side apply.
fn allowed_by_last_applied(live: &Value, conflicts: &[Conflict], walker: &Walker<'_>) -> bool {
    let Some(last) = live
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(LAST_APPLIED))
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
    else {
        return false;
    };
    let mut set = FieldSet::default();
    walker.value_set(&last, &mut Vec::new(), &mut set);
    let mut c = Comparison::default();
    walker.compare(&last, live, &mut Vec::new(), &mut c);
    let set = set.difference(&c.modified);
    let paths: HashSet<String> = set.paths().into_iter().collect();
    conflicts.iter().all(|c| paths.contains(&c.path))
}

/// The manager a write without `fieldManager` is recorded under: the client's
/// `User-Agent` up to its first `/`, as Kubernetes derives it.
pub fn manager_from_user_agent(user_agent: &str) -> String {
    let prefix = user_agent.split('/').next().unwrap_or("");
    prefix.chars().take(MAX_MANAGER_LEN).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn writer(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            api_version: "apps/v1",
            subresource: "",
            scope: Scope::Main,
            now: "2026-01-01T00:00:00Z",
        }
    }

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "labels": {"app": "web"}},
               "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                   {"name": "app", "image": image, "ports": [{"containerPort": 80}]}]}}}})
    }

    fn owners(m: &ManagedFields, path: &str) -> Vec<String> {
        m.entries
            .iter()
            .filter(|e| e.fields.paths().iter().any(|p| p == path))
            .map(|e| e.manager.clone())
            .collect()
    }

    #[test]
    fn fields_v1_round_trip_in_kubernetes_encoding() {
        let mut m = ManagedFields::default();
        let out = m
            .apply(
                &json!({}),
                &deployment(2, "a:1"),
                &writer("a"),
                false,
                &BuiltinShape,
            )
            .unwrap();
        assert_eq!(out["spec"]["replicas"], 2);
        let enc = m.encode();
        let f = &enc[0]["fieldsV1"];
        assert_eq!(enc[0]["manager"], "a");
        assert_eq!(enc[0]["operation"], "Apply");
        assert_eq!(enc[0]["fieldsType"], "FieldsV1");
        assert_eq!(f["f:spec"]["f:replicas"], json!({}));
        assert_eq!(f["f:metadata"]["f:labels"]["f:app"], json!({}));
        assert!(f["f:metadata"].get("f:name").is_none(), "{f}");
        assert!(f.get("f:kind").is_none());
        let c = &f["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"app\"}"];
        assert_eq!(c["."], json!({}));
        assert_eq!(c["f:image"], json!({}));
        assert_eq!(
            c["f:ports"]["k:{\"containerPort\":80,\"protocol\":\"TCP\"}"]["f:containerPort"],
            json!({})
        );
        assert_eq!(ManagedFields::decode(&enc).unwrap(), m);
        assert!(m.entries[0].fields.paths().contains(
            &".spec.template.spec.containers[name=\"app\"].ports[containerPort=80,protocol=\"TCP\"]"
                .to_string()
        ));
    }

    #[test]
    fn a_change_of_another_managers_field_conflicts_unless_forced() {
        let mut m = ManagedFields::default();
        let live = m
            .apply(
                &json!({}),
                &deployment(2, "a:1"),
                &writer("a"),
                false,
                &BuiltinShape,
            )
            .unwrap();
        let b = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                       "metadata": {"name": "web"}, "spec": {"replicas": 5}});
        let before = m.clone();
        let err = m
            .apply(&live, &b, &writer("b"), false, &BuiltinShape)
            .unwrap_err();
        assert_eq!(
            err,
            vec![Conflict {
                manager: "\"a\"".into(),
                path: ".spec.replicas".into()
            }]
        );
        assert_eq!(
            conflict_message(&err),
            "Apply failed with 1 conflict: conflict with \"a\": .spec.replicas"
        );
        assert_eq!(m, before, "a refused apply changes no ownership");
        let out = m
            .apply(&live, &b, &writer("b"), true, &BuiltinShape)
            .unwrap();
        assert_eq!(out["spec"]["replicas"], 5);
        assert_eq!(owners(&m, ".spec.replicas"), vec!["b"]);
        assert_eq!(
            owners(&m, ".spec.template.spec.containers[name=\"app\"].image"),
            vec!["a"]
        );
    }

    #[test]
    fn the_same_value_shares_ownership() {
        let mut m = ManagedFields::default();
        let live = m
            .apply(
                &json!({}),
                &deployment(2, "a:1"),
                &writer("a"),
                false,
                &BuiltinShape,
            )
            .unwrap();
        let b = json!({"spec": {"replicas": 2}});
        let out = m
            .apply(&live, &b, &writer("b"), false, &BuiltinShape)
            .unwrap();
        assert_eq!(out, live);
        let mut o = owners(&m, ".spec.replicas");
        o.sort();
        assert_eq!(o, vec!["a", "b"]);
        // Now a stops applying replicas: b still owns it, so it stays.
        let mut a2 = deployment(2, "a:1");
        a2["spec"].as_object_mut().unwrap().remove("replicas");
        let out = m
            .apply(&out, &a2, &writer("a"), false, &BuiltinShape)
            .unwrap();
        assert_eq!(out["spec"]["replicas"], 2);
        assert_eq!(owners(&m, ".spec.replicas"), vec!["b"]);
    }

    #[test]
    fn fields_no_longer_applied_are_removed() {
        let mut m = ManagedFields::default();
        let mut first = deployment(2, "a:1");
        first["metadata"]["labels"]["tier"] = json!("front");
        first["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "side", "image": "s:1"}));
        let live = m
            .apply(&json!({}), &first, &writer("a"), false, &BuiltinShape)
            .unwrap();
        // Another writer's label stays when a stops applying labels it never owned.
        let mut upd = live.clone();
        upd["metadata"]["labels"]["owner"] = json!("ops");
        m.update(&live, &upd, &writer("kubectl-label"), &BuiltinShape);
        assert_eq!(owners(&m, ".metadata.labels.owner"), vec!["kubectl-label"]);
        let out = m
            .apply(
                &upd,
                &deployment(2, "a:1"),
                &writer("a"),
                false,
                &BuiltinShape,
            )
            .unwrap();
        assert!(out["metadata"]["labels"].get("tier").is_none(), "{out}");
        assert_eq!(out["metadata"]["labels"]["owner"], "ops");
        let cs = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(cs.len(), 1, "{out}");
        assert!(owners(&m, ".metadata.labels.tier").is_empty());
    }

    #[test]
    fn keyed_lists_merge_by_their_keys() {
        let live = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}]}});
        let mut m = ManagedFields::default();
        m.update(&json!({}), &live, &writer("creator"), &BuiltinShape);
        let cfg = json!({"spec": {"containers": [
            {"name": "b", "image": "b:2"},
            {"name": "a", "env": [{"name": "Y", "value": "2"}]}]}});
        let err = m
            .apply(&live, &cfg, &writer("x"), false, &BuiltinShape)
            .unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].path, ".spec.containers[name=\"b\"].image");
        assert_eq!(
            err[0].manager,
            "\"creator\" using apps/v1 at 2026-01-01T00:00:00Z"
        );
        let out = m
            .apply(&live, &cfg, &writer("x"), true, &BuiltinShape)
            .unwrap();
        assert_eq!(
            out,
            json!({"spec": {"containers": [
                {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                {"name": "b", "image": "b:2"}]}})
        );
    }

    #[test]
    fn sets_unite_and_atomic_lists_replace() {
        let live = json!({"metadata": {"finalizers": ["a"]},
                          "spec": {"containers": [{"name": "c", "args": ["1", "2"]}]}});
        let mut m = ManagedFields::default();
        let cfg = json!({"metadata": {"finalizers": ["b"]},
                         "spec": {"containers": [{"name": "c", "args": ["3"]}]}});
        let out = m
            .apply(&live, &cfg, &writer("x"), false, &BuiltinShape)
            .unwrap_err();
        // `before-first-apply` owns what the object had.
        assert_eq!(out[0].path, ".spec.containers[name=\"c\"].args");
        let out = m
            .apply(&live, &cfg, &writer("x"), true, &BuiltinShape)
            .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(out["spec"]["containers"][0]["args"], json!(["3"]));
        let enc = m.encode();
        let x = enc
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["manager"] == "x")
            .unwrap();
        assert_eq!(
            x["fieldsV1"]["f:metadata"]["f:finalizers"]["v:\"b\""],
            json!({})
        );
        assert!(owners(&m, ".metadata.finalizers[=\"a\"]") == vec![BEFORE_FIRST_APPLY]);
    }

    #[test]
    fn crd_schemas_say_how_lists_merge() {
        let schema: JSONSchemaProps = serde_json::from_value(json!({
            "type": "object", "properties": {"spec": {"type": "object", "properties": {
                "items": {"type": "array", "x-kubernetes-list-type": "map",
                          "x-kubernetes-list-map-keys": ["id"],
                          "items": {"type": "object"}},
                "tags": {"type": "array", "x-kubernetes-list-type": "set",
                         "items": {"type": "string"}},
                "plain": {"type": "array", "items": {"type": "string"}},
                "sel": {"type": "object", "x-kubernetes-map-type": "atomic"}}}}}))
        .unwrap();
        let shape = SchemaShape {
            schema: Some(&schema),
        };
        let live = json!({"spec": {"items": [{"id": 1, "v": "a"}], "tags": ["x"], "plain": ["p"],
                                   "sel": {"a": "1", "b": "2"}}});
        let mut m = ManagedFields::default();
        m.update(&json!({}), &live, &writer("u"), &shape);
        let cfg = json!({"spec": {"items": [{"id": 2, "v": "b"}], "tags": ["y"], "plain": ["q"],
                                  "sel": {"a": "1"}}});
        let out = m.apply(&live, &cfg, &writer("x"), true, &shape).unwrap();
        assert_eq!(out["spec"]["items"].as_array().unwrap().len(), 2);
        assert_eq!(out["spec"]["tags"], json!(["x", "y"]));
        assert_eq!(out["spec"]["plain"], json!(["q"]));
        assert_eq!(out["spec"]["sel"], json!({"a": "1"}));
        assert_eq!(owners(&m, ".spec.items[id=2].v"), vec!["x"]);
        assert_eq!(owners(&m, ".spec.sel"), vec!["x"]);
    }

    #[test]
    fn updates_take_the_fields_they_change_and_keep_the_time_otherwise() {
        let mut m = ManagedFields::default();
        let live = m
            .apply(
                &json!({}),
                &deployment(2, "a:1"),
                &writer("a"),
                false,
                &BuiltinShape,
            )
            .unwrap();
        let mut edited = live.clone();
        edited["spec"]["replicas"] = json!(3);
        let w = Writer {
            now: "2026-01-02T00:00:00Z",
            ..writer("kubectl-edit")
        };
        m.update(&live, &edited, &w, &BuiltinShape);
        assert_eq!(owners(&m, ".spec.replicas"), vec!["kubectl-edit"]);
        let before = m.clone();
        let w = Writer {
            now: "2026-01-03T00:00:00Z",
            ..writer("kubectl-edit")
        };
        m.update(&edited, &edited, &w, &BuiltinShape);
        assert_eq!(m, before, "a write that changes nothing changes no entry");
        // A new value of a field it owns already: same fields, the write's time.
        let mut again = edited.clone();
        again["spec"]["replicas"] = json!(4);
        let w = Writer {
            now: "2026-01-04T00:00:00Z",
            ..writer("kubectl-edit")
        };
        m.update(&edited, &again, &w, &BuiltinShape);
        let e = m
            .entries
            .iter()
            .find(|e| e.manager == "kubectl-edit")
            .unwrap();
        assert_eq!(e.time.as_deref(), Some("2026-01-04T00:00:00Z"));
        let edited = again;
        // The status scope sees only the status.
        let mut st = edited.clone();
        st["status"] = json!({"replicas": 3});
        st["spec"]["replicas"] = json!(9);
        let w = Writer {
            subresource: "status",
            scope: Scope::Status,
            ..writer("controller")
        };
        m.update(&edited, &st, &w, &BuiltinShape);
        let e = m
            .entries
            .iter()
            .find(|e| e.manager == "controller")
            .unwrap();
        assert_eq!(e.fields.paths(), vec![".status.replicas"]);
        let enc = m.encode();
        let c = enc
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["manager"] == "controller")
            .unwrap();
        assert_eq!(c["subresource"], "status");
    }

    #[test]
    fn client_side_apply_fields_move_to_kubectl() {
        let mut live = deployment(2, "a:1");
        let last = deployment(2, "a:1").to_string();
        live["metadata"]["annotations"] = json!({ LAST_APPLIED: last });
        let mut m = ManagedFields::default();
        m.update(
            &json!({}),
            &live,
            &writer("kubectl-client-side-apply"),
            &BuiltinShape,
        );
        let out = m
            .apply(
                &live,
                &deployment(4, "a:1"),
                &writer("kubectl"),
                false,
                &BuiltinShape,
            )
            .unwrap();
        assert_eq!(out["spec"]["replicas"], 4);
        assert_eq!(owners(&m, ".spec.replicas"), vec!["kubectl"]);
        let rec: Value = serde_json::from_str(
            out["metadata"]["annotations"][LAST_APPLIED]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(rec["spec"]["replicas"], 4);
        // Another manager has no such record to lean on.
        let err = m
            .apply(
                &out,
                &json!({"spec": {"replicas": 1}}),
                &writer("z"),
                false,
                &BuiltinShape,
            )
            .unwrap_err();
        assert_eq!(err[0].manager, "\"kubectl\"");
    }

    #[test]
    fn update_managers_are_capped() {
        let mut m = ManagedFields::default();
        let mut obj = json!({"data": {}});
        for i in 0..12 {
            let mut next = obj.clone();
            next["data"][format!("k{i}")] = json!("v");
            let (name, now) = (format!("m{i:02}"), format!("2026-01-01T00:00:{i:02}Z"));
            let w = Writer {
                now: &now,
                ..writer(&name)
            };
            m.update(&obj, &next, &w, &BuiltinShape);
            obj = next;
        }
        assert_eq!(m.entries.len(), MAX_UPDATE_MANAGERS);
        assert_eq!(owners(&m, ".data.k0"), vec![ANCIENT_CHANGES]);
        assert_eq!(owners(&m, ".data.k2"), vec![ANCIENT_CHANGES]);
        assert_eq!(owners(&m, ".data.k3"), vec!["m03"]);
    }

    #[test]
    fn bad_fields_v1_is_an_error() {
        assert!(ManagedFields::decode(&json!([{"manager": "a", "operation": "Nope"}])).is_err());
        assert!(ManagedFields::decode(
            &json!([{"manager": "a", "operation": "Apply", "fieldsV1": {"x:y": {}}}])
        )
        .is_err());
        assert_eq!(
            ManagedFields::decode(&json!([{}])).unwrap().entries.len(),
            0
        );
        assert_eq!(
            manager_from_user_agent("kubectl/v1.31.0 (linux/amd64)"),
            "kubectl"
        );
    }
}
