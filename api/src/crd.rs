//! CustomResourceDefinitions (`apiextensions.k8s.io/v1`): what a definition must be, the
//! resources it serves, and what its custom objects are checked and shown with.
//!
//! The built-in resources are a static table ([`crate::RESOURCES`]); the custom ones are a
//! [`CustomResources`] set built from the stored definitions, which the control plane swaps
//! whole (an `Arc`) when a definition changes, so a request for a built-in kind never looks
//! at it. Their [`Resource`]s are interned: the same definition gives the same `&'static`
//! resource each time, so redefining a kind does not grow memory.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceDefinitionVersion,
    CustomResourceSubresourceScale, JSONSchemaProps,
};
use serde_json::{json, Value};

use crate::error::{ApiError, Cause};
use crate::resources::Resource;
use crate::{cel, meta, schema, table, validation};

/// The API group of CustomResourceDefinitions.
pub const GROUP: &str = "apiextensions.k8s.io";
/// The finalizer that holds a definition being deleted until its objects are gone.
pub const CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

// ---- interning ----------------------------------------------------------------------------

fn intern_str(s: &str) -> &'static str {
    static STRS: OnceLock<Mutex<std::collections::HashSet<&'static str>>> = OnceLock::new();
    let mut set = STRS.get_or_init(Default::default).lock().expect("interned");
    if let Some(s) = set.get(s) {
        return s;
    }
    let leaked: &'static str = Box::leak(s.to_string().into_boxed_str());
    set.insert(leaked);
    leaked
}

fn intern(r: Resource) -> &'static Resource {
    static RES: OnceLock<Mutex<Vec<&'static Resource>>> = OnceLock::new();
    let mut all = RES.get_or_init(Default::default).lock().expect("interned");
    if let Some(found) = all.iter().find(|x| ***x == r) {
        return found;
    }
    let leaked: &'static Resource = Box::leak(Box::new(r));
    all.push(leaked);
    leaked
}

fn intern_names(names: &[String]) -> &'static [&'static str] {
    static SLICES: OnceLock<Mutex<Vec<&'static [&'static str]>>> = OnceLock::new();
    let v: Vec<&'static str> = names.iter().map(|n| intern_str(n)).collect();
    let mut all = SLICES
        .get_or_init(Default::default)
        .lock()
        .expect("interned");
    if let Some(found) = all.iter().find(|x| **x == v.as_slice()) {
        return found;
    }
    let leaked: &'static [&'static str] = Box::leak(v.into_boxed_slice());
    all.push(leaked);
    leaked
}

// ---- versions -----------------------------------------------------------------------------

/// Kubernetes' version priority: GA before beta before alpha, higher numbers first, then
/// versions of other shapes in lexical order.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn parse(v: &str) -> Option<(u64, u8, u64)> {
        let rest = v.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let major = digits.parse().ok()?;
        let tail = &rest[digits.len()..];
        if tail.is_empty() {
            return Some((major, 2, 0));
        }
        for (word, rank) in [("beta", 1), ("alpha", 0)] {
            if let Some(n) = tail.strip_prefix(word) {
                return Some((major, rank, n.parse().ok()?));
            }
        }
        None
    }
    match (parse(a), parse(b)) {
        (Some((ma, ra, na)), Some((mb, rb, nb))) => rb.cmp(&ra).then(mb.cmp(&ma)).then(nb.cmp(&na)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

// ---- one definition -----------------------------------------------------------------------

/// A served definition: the stored CustomResourceDefinition and its resources.
#[derive(Debug)]
pub struct Definition {
    pub crd: CustomResourceDefinition,
    storage: String,
    /// One per served version, in priority order.
    resources: Vec<&'static Resource>,
    /// The compiled `x-kubernetes-validations` of each version's schema.
    rules: HashMap<String, cel::Rules>,
}

impl Definition {
    pub fn new(crd: CustomResourceDefinition) -> Self {
        let spec = &crd.spec;
        let mut versions: Vec<&CustomResourceDefinitionVersion> =
            spec.versions.iter().filter(|v| v.served).collect();
        versions.sort_by(|a, b| compare_versions(&a.name, &b.name));
        let singular = spec
            .names
            .singular
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| spec.names.kind.to_ascii_lowercase());
        let short = intern_names(spec.names.short_names.as_deref().unwrap_or(&[]));
        let resources = versions
            .iter()
            .map(|v| {
                let sub = v.subresources.as_ref();
                intern(Resource {
                    group: intern_str(&spec.group),
                    version: intern_str(&v.name),
                    plural: intern_str(&spec.names.plural),
                    singular: intern_str(&singular),
                    kind: intern_str(&spec.names.kind),
                    namespaced: spec.scope == "Namespaced",
                    short_names: short,
                    has_status: sub.is_some_and(|s| s.status.is_some()),
                    has_scale: sub.is_some_and(|s| s.scale.is_some()),
                    create_only: false,
                    wire: None,
                })
            })
            .collect();
        let storage = spec
            .versions
            .iter()
            .find(|v| v.storage)
            .map(|v| v.name.clone())
            .unwrap_or_default();
        let rules = spec
            .versions
            .iter()
            .filter_map(|v| {
                let s = v.schema.as_ref()?.open_api_v3_schema.as_ref()?;
                Some((v.name.clone(), cel::Rules::compile(s)))
            })
            .collect();
        Definition {
            crd,
            storage,
            resources,
            rules,
        }
    }

    pub fn name(&self) -> &str {
        self.crd.metadata.name.as_deref().unwrap_or("")
    }

    /// The version objects are stored in.
    pub fn storage_version(&self) -> &str {
        &self.storage
    }

    /// The served resources, the preferred version first.
    pub fn resources(&self) -> &[&'static Resource] {
        &self.resources
    }

    pub fn version(&self, v: &str) -> Option<&CustomResourceDefinitionVersion> {
        self.crd.spec.versions.iter().find(|x| x.name == v)
    }

    /// The `openAPIV3Schema` of a version.
    pub fn schema(&self, v: &str) -> Option<&JSONSchemaProps> {
        self.version(v)?
            .schema
            .as_ref()?
            .open_api_v3_schema
            .as_ref()
    }

    /// The `scale` subresource of a version, if it has one.
    pub fn scale(&self, v: &str) -> Option<&CustomResourceSubresourceScale> {
        self.version(v)?.subresources.as_ref()?.scale.as_ref()
    }

    pub fn is_terminating(&self) -> bool {
        self.crd.metadata.deletion_timestamp.is_some()
    }

    /// `Kind.group`, as Kubernetes names a custom kind in messages.
    pub fn qualified_kind(&self) -> String {
        format!("{}.{}", self.crd.spec.names.kind, self.crd.spec.group)
    }

    /// With strict field validation, a field the version's schema does not know is a 400
    /// (as for built-in kinds); otherwise it is pruned.
    pub fn check_unknown(&self, version: &str, obj: &Value) -> Result<(), ApiError> {
        let Some(s) = self.schema(version) else {
            return Ok(());
        };
        let unknown = schema::unknown_fields(s, obj);
        if unknown.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field {f:?}"))
            .collect();
        Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            list.join(", ")
        )))
    }

    /// Prunes, defaults and validates a custom object written through `version`; `old` is
    /// the stored object on updates (for transition rules).
    pub fn admit(
        &self,
        version: &str,
        obj: &mut Value,
        old: Option<&Value>,
        namespaced: bool,
    ) -> Result<(), ApiError> {
        if let Some(s) = self.schema(version) {
            schema::prune(s, obj);
            schema::apply_defaults(s, obj);
        }
        let mut causes = validation::validate_metadata(obj, namespaced);
        if let Some(s) = self.schema(version) {
            schema::validate(s, obj, "", &mut causes);
            // As Kubernetes, rules run only on objects the schema accepts.
            if causes.is_empty() {
                if let Some(r) = self.rules.get(version) {
                    r.validate(s, obj, old, &mut causes);
                }
            }
        }
        if causes.is_empty() {
            return Ok(());
        }
        let mut e = ApiError::invalid(&self.qualified_kind(), meta::name(obj), causes);
        e.kind = Some(self.crd.spec.names.kind.clone());
        e.group = Some(self.crd.spec.group.clone());
        Err(e)
    }

    /// The printer columns of a version: its `additionalPrinterColumns`, or Age.
    fn columns(&self, version: &str) -> Vec<CustomResourceColumnDefinition> {
        let declared = self
            .version(version)
            .and_then(|v| v.additional_printer_columns.clone())
            .unwrap_or_default();
        if !declared.is_empty() {
            return declared;
        }
        vec![CustomResourceColumnDefinition {
            name: "Age".into(),
            type_: "date".into(),
            json_path: ".metadata.creationTimestamp".into(),
            ..Default::default()
        }]
    }

    /// A `meta.k8s.io/v1` Table of custom objects, with the version's printer columns.
    pub fn table(
        &self,
        version: &str,
        objects: &[Value],
        resource_version: &str,
        now_unix: i64,
    ) -> Value {
        let cols = self.columns(version);
        let mut defs = vec![json!({"name": "Name", "type": "string", "format": "name",
            "description": "Name must be unique within a namespace.", "priority": 0})];
        for c in &cols {
            defs.push(json!({"name": c.name, "type": c.type_,
                "format": c.format.clone().unwrap_or_default(),
                "description": c.description.clone().unwrap_or_default(),
                "priority": c.priority.unwrap_or(0)}));
        }
        let rows: Vec<Value> = objects
            .iter()
            .map(|o| {
                let mut cells = vec![json!(meta::name(o))];
                for c in &cols {
                    cells.push(cell(c, o, now_unix));
                }
                json!({"cells": cells, "object": o})
            })
            .collect();
        json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
               "metadata": {"resourceVersion": resource_version},
               "columnDefinitions": defs, "rows": rows})
    }
}

/// One cell: the column's JSONPath on the object; dates as ages, as Kubernetes shows them.
fn cell(c: &CustomResourceColumnDefinition, o: &Value, now_unix: i64) -> Value {
    let Some(v) = json_path(o, &c.json_path) else {
        return Value::Null;
    };
    match (c.type_.as_str(), &v) {
        ("date", Value::String(s)) => json!(table::age(Some(s), now_unix)),
        ("integer" | "number" | "boolean", Value::Number(_) | Value::Bool(_)) => v,
        (_, Value::String(_)) => v,
        (_, Value::Null) => Value::Null,
        _ => json!(v.to_string()),
    }
}

/// The first value at a simple JSONPath (`.spec.replicas`, `.items[0].name`,
/// `.status.conditions[?(@.type=="Ready")].status`), as printer columns use them.
pub fn json_path(obj: &Value, path: &str) -> Option<Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let mut cur = vec![obj.clone()];
    let mut rest = path.trim_start_matches('$');
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let key = &r[..end];
            rest = &r[end..];
            if key.is_empty() {
                continue;
            }
            cur = cur.iter().filter_map(|v| v.get(key).cloned()).collect();
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = find_close(r)?;
            let inner = &r[..end];
            rest = &r[end + 1..];
            cur = select(cur, inner);
        } else {
            return None;
        }
    }
    cur.into_iter().next()
}

/// The index of the `]` closing a bracket whose content starts `r` (quotes respected).
fn find_close(r: &str) -> Option<usize> {
    let mut quote = None;
    for (i, ch) in r.char_indices() {
        match (quote, ch) {
            (Some(q), c) if c == q => quote = None,
            (None, '"' | '\'') => quote = Some(ch),
            (None, ']') => return Some(i),
            _ => {}
        }
    }
    None
}

fn select(cur: Vec<Value>, inner: &str) -> Vec<Value> {
    let inner = inner.trim();
    if inner == "*" {
        return cur
            .into_iter()
            .flat_map(|v| match v {
                Value::Array(a) => a,
                Value::Object(m) => m.into_iter().map(|(_, x)| x).collect(),
                _ => vec![],
            })
            .collect();
    }
    if let Ok(i) = inner.parse::<i64>() {
        return cur
            .into_iter()
            .filter_map(|v| {
                let a = v.as_array()?;
                let idx = if i < 0 { a.len() as i64 + i } else { i };
                a.get(usize::try_from(idx).ok()?).cloned()
            })
            .collect();
    }
    if let Some(key) = inner
        .strip_prefix('\'')
        .and_then(|k| k.strip_suffix('\''))
        .or_else(|| inner.strip_prefix('"').and_then(|k| k.strip_suffix('"')))
    {
        return cur.iter().filter_map(|v| v.get(key).cloned()).collect();
    }
    // A filter: ?(@.a.b=="x") or ?(@.a!="x").
    let Some(expr) = inner
        .strip_prefix("?(")
        .and_then(|e| e.strip_suffix(')'))
        .map(str::trim)
    else {
        return vec![];
    };
    let (lhs, op, rhs) = match expr.split_once("==") {
        Some((l, r)) => (l, true, r),
        None => match expr.split_once("!=") {
            Some((l, r)) => (l, false, r),
            None => return vec![],
        },
    };
    let want = rhs.trim().trim_matches(['"', '\'']);
    let lhs = lhs.trim().trim_start_matches('@');
    cur.into_iter()
        .flat_map(|v| match v {
            Value::Array(a) => a,
            other => vec![other],
        })
        .filter(|item| {
            let got = json_path(item, lhs).map(|v| match v {
                Value::String(s) => s,
                other => other.to_string(),
            });
            (got.as_deref() == Some(want)) == op
        })
        .collect()
}

// ---- the set ------------------------------------------------------------------------------

/// The custom resources served now: one [`Definition`] per established definition.
#[derive(Debug, Default)]
pub struct CustomResources {
    defs: Vec<Arc<Definition>>,
}

impl CustomResources {
    pub fn new(crds: Vec<CustomResourceDefinition>) -> Self {
        CustomResources {
            defs: crds
                .into_iter()
                .map(|c| Arc::new(Definition::new(c)))
                .collect(),
        }
    }

    pub fn definitions(&self) -> &[Arc<Definition>] {
        &self.defs
    }

    /// Every served resource (each served version of each definition).
    pub fn resources(&self) -> impl Iterator<Item = &'static Resource> + '_ {
        self.defs.iter().flat_map(|d| d.resources.iter().copied())
    }

    /// The definition serving `r` (any of its versions).
    pub fn definition(&self, r: &Resource) -> Option<&Arc<Definition>> {
        self.defs
            .iter()
            .find(|d| d.crd.spec.group == r.group && d.crd.spec.names.plural == r.plural)
    }

    pub fn by_path(&self, group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
        self.resources()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<&'static Resource> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.resources()
            .find(|r| r.group == group && r.version == version && r.kind == kind)
    }

    /// A name as a user types it (`widgets`, `widget`, `Widget`, a short name, or any of
    /// them qualified with the group), resolved to the preferred version.
    pub fn lookup(&self, name: &str) -> Option<&'static Resource> {
        let lower = name.to_ascii_lowercase();
        let (base, group) = match lower.split_once('.') {
            Some((b, g)) => (b, Some(g)),
            None => (lower.as_str(), None),
        };
        self.resources().find(|r| {
            (r.plural == base
                || r.singular == base
                || r.kind.eq_ignore_ascii_case(base)
                || r.short_names.contains(&base))
                && group.is_none_or(|g| g == r.group)
        })
    }

    /// The served API groups and their versions, the preferred first.
    pub fn groups(&self) -> BTreeMap<&str, Vec<&'static str>> {
        let mut out: BTreeMap<&str, Vec<&'static str>> = BTreeMap::new();
        for d in &self.defs {
            let vs = out.entry(d.crd.spec.group.as_str()).or_default();
            for r in &d.resources {
                if !vs.contains(&r.version) {
                    vs.push(r.version);
                }
            }
        }
        for vs in out.values_mut() {
            vs.sort_by(|a, b| compare_versions(a, b));
        }
        out
    }

    /// The `openAPIV3Schema` of every kind served in `group/version`, for OpenAPI documents.
    pub fn openapi_v3_schemas(
        &self,
        group: &str,
        version: &str,
    ) -> Vec<(&'static Resource, &JSONSchemaProps)> {
        self.defs
            .iter()
            .filter(|d| d.crd.spec.group == group)
            .filter_map(|d| {
                let r = d.resources.iter().find(|r| r.version == version)?;
                Some((*r, d.schema(version)?))
            })
            .collect()
    }

    /// The names of `crd` another served definition already uses (`"widgets" is already in
    /// use`), as Kubernetes' names controller finds them.
    pub fn name_conflict(&self, crd: &CustomResourceDefinition) -> Option<String> {
        let me = crd.metadata.name.as_deref().unwrap_or("");
        let n = &crd.spec.names;
        let singular = n.singular.clone().unwrap_or_default();
        let list_kind = n.list_kind.clone().unwrap_or_default();
        for d in self.defs.iter().filter(|d| d.name() != me) {
            if d.crd.spec.group != crd.spec.group {
                continue;
            }
            let o = &d.crd.spec.names;
            let o_names: Vec<&str> = [o.plural.as_str(), o.singular.as_deref().unwrap_or("")]
                .into_iter()
                .chain(o.short_names.iter().flatten().map(String::as_str))
                .filter(|s| !s.is_empty())
                .collect();
            for mine in [n.plural.as_str(), singular.as_str()]
                .into_iter()
                .chain(n.short_names.iter().flatten().map(String::as_str))
                .filter(|s| !s.is_empty())
            {
                if o_names.contains(&mine) {
                    return Some(format!("{mine:?} is already in use"));
                }
            }
            let o_kinds = [o.kind.as_str(), o.list_kind.as_deref().unwrap_or("")];
            for mine in [n.kind.as_str(), list_kind.as_str()]
                .into_iter()
                .filter(|s| !s.is_empty())
            {
                if o_kinds.contains(&mine) {
                    return Some(format!("{mine:?} is already in use"));
                }
            }
        }
        None
    }
}

// ---- the definition itself ----------------------------------------------------------------

/// Defaults of a definition, as Kubernetes fills them in.
pub fn apply_defaults(obj: &mut Value) {
    let Some(spec) = obj.get_mut("spec").filter(|s| s.is_object()) else {
        return;
    };
    if spec.get("conversion").is_none() {
        spec["conversion"] = json!({"strategy": "None"});
    }
    if let Some(names) = spec.get_mut("names").filter(|n| n.is_object()) {
        let kind = names["kind"].as_str().unwrap_or("").to_string();
        if names.get("singular").is_none() && !kind.is_empty() {
            names["singular"] = json!(kind.to_ascii_lowercase());
        }
        if names.get("listKind").is_none() && !kind.is_empty() {
            names["listKind"] = json!(format!("{kind}List"));
        }
    }
}

fn is_dns1035_label(s: &str) -> bool {
    validation::is_dns1123_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

/// What a definition must be. `builtin_groups` are the groups built-in kinds are served
/// in, which no definition may take.
pub fn validate_definition(crd: &CustomResourceDefinition, builtin_groups: &[&str]) -> Vec<Cause> {
    let mut c = Vec::new();
    let spec = &crd.spec;
    let n = &spec.names;
    let name = crd.metadata.name.as_deref().unwrap_or("");
    if name != format!("{}.{}", n.plural, spec.group) {
        c.push(Cause::invalid(
            "metadata.name",
            format!("{name:?}"),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    if spec.group.is_empty() {
        c.push(Cause::required("spec.group"));
    } else if !validation::is_dns1123_subdomain(&spec.group) {
        c.push(Cause::invalid(
            "spec.group",
            format!("{:?}", spec.group),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        ));
    } else if !spec.group.contains('.') {
        c.push(Cause::invalid(
            "spec.group",
            format!("{:?}", spec.group),
            "should be a domain with at least one dot",
        ));
    } else if builtin_groups.contains(&spec.group.as_str()) {
        c.push(Cause::invalid(
            "spec.group",
            format!("{:?}", spec.group),
            "is served by built-in resources",
        ));
    }
    if spec.scope != "Namespaced" && spec.scope != "Cluster" {
        c.push(Cause {
            reason: "FieldValueNotSupported".into(),
            field: "spec.scope".into(),
            message: format!(
                "Unsupported value: {:?}: supported values: \"Cluster\", \"Namespaced\"",
                spec.scope
            ),
        });
    }
    let names: [(&str, &str); 3] = [
        ("spec.names.plural", n.plural.as_str()),
        ("spec.names.singular", n.singular.as_deref().unwrap_or("")),
        ("spec.names.kind", n.kind.as_str()),
    ];
    for (field, v) in names {
        if v.is_empty() {
            if field != "spec.names.singular" {
                c.push(Cause::required(field));
            }
            continue;
        }
        let ok = if field == "spec.names.kind" {
            v.starts_with(|ch: char| ch.is_ascii_alphabetic())
                && v.chars().all(|ch| ch.is_ascii_alphanumeric())
        } else {
            is_dns1035_label(v)
        };
        if !ok {
            c.push(Cause::invalid(
                field,
                format!("{v:?}"),
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character",
            ));
        }
    }
    for (i, s) in n.short_names.iter().flatten().enumerate() {
        if !is_dns1035_label(s) {
            c.push(Cause::invalid(
                format!("spec.names.shortNames[{i}]"),
                format!("{s:?}"),
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character",
            ));
        }
    }
    if spec.preserve_unknown_fields == Some(true) {
        c.push(Cause::invalid(
            "spec.preserveUnknownFields",
            "true",
            "must be false in order to use defaults in the schema",
        ));
    }
    if spec.versions.is_empty() {
        c.push(Cause::required("spec.versions"));
    }
    let storage = spec.versions.iter().filter(|v| v.storage).count();
    if !spec.versions.is_empty() && storage != 1 {
        c.push(Cause::invalid(
            "spec.versions",
            format!(
                "[{}]",
                spec.versions
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            "must have exactly one version marked as storage version",
        ));
    }
    if !spec.versions.is_empty() && !spec.versions.iter().any(|v| v.served) {
        c.push(Cause::invalid(
            "spec.versions",
            "[]",
            "must have at least one version marked as served",
        ));
    }
    for (i, v) in spec.versions.iter().enumerate() {
        let at = format!("spec.versions[{i}]");
        if !validation::is_dns1123_label(&v.name) {
            c.push(Cause::invalid(
                format!("{at}.name"),
                format!("{:?}", v.name),
                "must be a DNS-1035 label",
            ));
        }
        if spec.versions[..i].iter().any(|o| o.name == v.name) {
            c.push(Cause::duplicate(
                format!("{at}.name"),
                format!("{:?}", v.name),
            ));
        }
        match v
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
        {
            None => c.push(Cause {
                reason: "FieldValueRequired".into(),
                field: format!("{at}.schema.openAPIV3Schema"),
                message: "Required value: schemas are required".into(),
            }),
            Some(s) => {
                let path = format!("{at}.schema.openAPIV3Schema");
                c.extend(schema::structural_errors(s, &path));
                c.extend(cel::compile_errors(s, &path));
            }
        }
        if let Some(scale) = v.subresources.as_ref().and_then(|s| s.scale.as_ref()) {
            let paths = [
                (
                    "specReplicasPath",
                    Some(&scale.spec_replicas_path),
                    ".spec.",
                ),
                (
                    "statusReplicasPath",
                    Some(&scale.status_replicas_path),
                    ".status.",
                ),
                ("labelSelectorPath", scale.label_selector_path.as_ref(), ""),
            ];
            for (field, p, prefix) in paths {
                let Some(p) = p else { continue };
                let shape = p.starts_with(".spec.") || p.starts_with(".status.");
                if !shape || !p.starts_with(prefix) {
                    c.push(Cause::invalid(
                        format!("{at}.subresources.scale.{field}"),
                        format!("{p:?}"),
                        &format!(
                            "should be a json path under {}",
                            if prefix.is_empty() {
                                ".spec or .status"
                            } else {
                                prefix.trim_end_matches('.')
                            }
                        ),
                    ));
                }
            }
        }
        for (j, col) in v.additional_printer_columns.iter().flatten().enumerate() {
            let f = format!("{at}.additionalPrinterColumns[{j}]");
            if col.name.is_empty() {
                c.push(Cause::required(format!("{f}.name")));
            }
            if !matches!(
                col.type_.as_str(),
                "integer" | "number" | "string" | "boolean" | "date"
            ) {
                c.push(Cause {
                    reason: "FieldValueNotSupported".into(),
                    field: format!("{f}.type"),
                    message: format!("Unsupported value: {:?}: supported values: \"boolean\", \"date\", \"integer\", \"number\", \"string\"", col.type_),
                });
            }
            if col.json_path.is_empty() {
                c.push(Cause::required(format!("{f}.jsonPath")));
            }
        }
    }
    c
}

/// What an update of a definition may not change.
pub fn validate_definition_update(
    old: &CustomResourceDefinition,
    new: &CustomResourceDefinition,
) -> Vec<Cause> {
    let mut c = Vec::new();
    if old.spec.group != new.spec.group {
        c.push(Cause::invalid(
            "spec.group",
            format!("{:?}", new.spec.group),
            "field is immutable",
        ));
    }
    if old.spec.scope != new.spec.scope {
        c.push(Cause::invalid(
            "spec.scope",
            format!("{:?}", new.spec.scope),
            "field is immutable",
        ));
    }
    if old.spec.names.plural != new.spec.names.plural {
        c.push(Cause::invalid(
            "spec.names.plural",
            format!("{:?}", new.spec.names.plural),
            "field is immutable",
        ));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd(v: Value) -> CustomResourceDefinition {
        serde_json::from_value(v).unwrap()
    }

    fn widgets() -> CustomResourceDefinition {
        crd(
            json!({"metadata": {"name": "widgets.example.com"}, "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wg"]},
            "versions": [
                {"name": "v1beta1", "served": true, "storage": false,
                 "schema": {"openAPIV3Schema": {"type": "object"}}},
                {"name": "v1", "served": true, "storage": true,
                 "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}},
                 "additionalPrinterColumns": [
                    {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
                    {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}],
                 "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"replicas": {"type": "integer"}}},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}]}}),
        )
    }

    #[test]
    fn a_definition_serves_each_version_preferred_first() {
        let set = CustomResources::new(vec![widgets()]);
        let r = set.lookup("wg").unwrap();
        assert_eq!((r.kind, r.version), ("Widget", "v1"));
        assert!(r.has_status && r.has_scale && r.namespaced);
        let beta = set.by_path("example.com", "v1beta1", "widgets").unwrap();
        assert!(!beta.has_scale);
        assert_eq!(set.definition(beta).unwrap().storage_version(), "v1");
        assert_eq!(set.lookup("widgets.example.com").unwrap().version, "v1");
        assert!(set.lookup("widgets.other.com").is_none());
        assert_eq!(set.groups()["example.com"], vec!["v1", "v1beta1"]);
        // The same definition interns to the same resource.
        let again = CustomResources::new(vec![widgets()]);
        assert!(std::ptr::eq(r, again.lookup("wg").unwrap()));
    }

    #[test]
    fn versions_sort_as_kubernetes_does() {
        let mut v = vec!["v1alpha1", "v2", "foo", "v1beta2", "v1", "v1beta1", "v10"];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            v,
            ["v10", "v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]
        );
    }

    #[test]
    fn printer_columns_read_json_paths() {
        let set = CustomResources::new(vec![widgets()]);
        let d = &set.definitions()[0];
        let o = json!({"metadata": {"name": "a"}, "spec": {"replicas": 3},
            "status": {"conditions": [{"type": "Synced", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        let t = d.table("v1", &[o], "5", 0);
        assert_eq!(t["rows"][0]["cells"], json!(["a", 3, "True"]));
        assert_eq!(t["columnDefinitions"][1]["name"], "Replicas");
        let t = d.table("v1beta1", &[json!({"metadata": {"name": "b"}})], "5", 0);
        assert_eq!(t["columnDefinitions"][1]["name"], "Age");
    }

    #[test]
    fn definitions_are_checked() {
        assert!(validate_definition(&widgets(), &["apps"]).is_empty());
        let mut bad = widgets();
        bad.metadata.name = Some("nope".into());
        bad.spec.group = "apps".into();
        bad.spec.scope = "Everywhere".into();
        bad.spec.versions[0].storage = true;
        bad.spec.versions[0].schema = None;
        let fields: Vec<String> = validate_definition(&bad, &["apps"])
            .into_iter()
            .map(|c| c.field)
            .collect();
        for f in [
            "metadata.name",
            "spec.group",
            "spec.scope",
            "spec.versions",
            "spec.versions[0].schema.openAPIV3Schema",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} not in {fields:?}");
        }
        let set = CustomResources::new(vec![widgets()]);
        let mut other = widgets();
        other.metadata.name = Some("gadgets.example.com".into());
        other.spec.names.plural = "gadgets".into();
        other.spec.names.singular = Some("gadget".into());
        other.spec.names.kind = "Gadget".into();
        assert_eq!(
            set.name_conflict(&other).unwrap(),
            "\"wg\" is already in use"
        );
        other.spec.names.short_names = None;
        assert!(set.name_conflict(&other).is_none());
    }
}
