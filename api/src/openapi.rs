//! The OpenAPI documents of the API: `/openapi/v2` (Swagger 2.0, one document) and one
//! OpenAPI 3.0 document per group version (`/openapi/v3/apis/apps/v1`).
//!
//! Schemas come from k8s-openapi's types (their `schemars` implementations), never written by
//! hand. The kinds come from one place: [`RESOURCES`] (through [`builtin_schema`], the one
//! table from a served kind to its type) plus the [`CustomKind`]s a caller hands to [`build`]
//! — a CustomResourceDefinition contributes its `openAPIV3Schema` that way.
//!
//! Added to the schemas as Kubernetes serves them:
//! - `x-kubernetes-group-version-kind` on every kind and its list (kubectl finds a kind's
//!   schema by it, for `explain` and for client-side validation);
//! - `x-kubernetes-patch-strategy` / `x-kubernetes-patch-merge-key` on lists the strategic
//!   merge patch merges by key ([`crate::patch::merge_key`]), so kubectl's client-side apply
//!   computes patches with the same keys the server merges with;
//! - list types and map keys where k8s-openapi's schemas carry them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{json, Map, Value};

use crate::resources::{Resource, RESOURCES};

/// Where v3 documents keep their schemas.
const V3_PREFIX: &str = "#/components/schemas/";
/// Where the v2 document keeps them.
const V2_PREFIX: &str = "#/definitions/";

/// A kind in the documents: where it is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kind {
    /// API group; `""` is the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    /// The path segment (`deployments`).
    pub plural: String,
    pub namespaced: bool,
    pub has_status: bool,
    pub has_scale: bool,
    /// Only created and answered (reviews): a POST and nothing else.
    pub create_only: bool,
}

impl Kind {
    /// The kind a built-in resource is served as.
    pub fn of(r: &Resource) -> Kind {
        Kind {
            group: r.group.into(),
            version: r.version.into(),
            kind: r.kind.into(),
            plural: r.plural.into(),
            namespaced: r.namespaced,
            has_status: r.has_status,
            has_scale: r.has_scale,
            create_only: r.create_only,
        }
    }

    /// The document's key under `/openapi/v3/`: `api/v1` or `apis/apps/v1`.
    pub fn document(&self) -> String {
        document_key(&self.group, &self.version)
    }

    fn prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    fn gvk(&self) -> Value {
        json!({"group": self.group, "version": self.version, "kind": self.kind})
    }

    /// `readAppsV1NamespacedDeployment`-style operation ids, as Kubernetes names them.
    fn operation(&self, verb: &str, suffix: &str) -> String {
        let gv: String = self
            .group
            .split('.')
            .next()
            .unwrap_or("")
            .split('-')
            .chain([self.version.as_str()])
            .map(capitalized)
            .collect();
        let gv = if self.group.is_empty() {
            format!("Core{gv}")
        } else {
            gv
        };
        let scope = if self.namespaced { "Namespaced" } else { "" };
        format!("{verb}{gv}{scope}{}{suffix}", self.kind)
    }
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// The key of a group version's v3 document: `api/v1` or `apis/apps/v1`.
pub fn document_key(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// A kind whose schema comes from outside the built-in types: a CustomResourceDefinition's
/// `openAPIV3Schema` for one served version. The schema is self-contained (no `$ref`).
#[derive(Debug, Clone)]
pub struct CustomKind {
    pub kind: Kind,
    pub schema: Value,
}

/// The definition name Kubernetes gives a custom kind: the group's labels reversed, then
/// the version and kind (`com.example.stable.v1.CronTab` for `stable.example.com/v1`).
pub fn custom_definition_name(group: &str, version: &str, kind: &str) -> String {
    let reversed: Vec<&str> = group.split('.').rev().collect();
    format!("{}.{version}.{kind}", reversed.join("."))
}

/// The schema of a built-in kind, from its k8s-openapi type; `None` for a kind this table
/// does not know (a test holds every entry of [`RESOURCES`] to having one).
pub fn builtin_schema(r: &Resource, g: &mut SchemaGenerator) -> Option<schemars::Schema> {
    use k8s_openapi::api::{
        apps, authentication, authorization, batch, coordination, core, discovery, events, policy,
        rbac, storage,
    };
    Some(match (r.group, r.kind) {
        ("", "Namespace") => g.subschema_for::<core::v1::Namespace>(),
        ("", "Node") => g.subschema_for::<core::v1::Node>(),
        ("", "Pod") => g.subschema_for::<core::v1::Pod>(),
        ("", "Service") => g.subschema_for::<core::v1::Service>(),
        ("", "Endpoints") => g.subschema_for::<core::v1::Endpoints>(),
        ("", "Event") => g.subschema_for::<core::v1::Event>(),
        ("", "ConfigMap") => g.subschema_for::<core::v1::ConfigMap>(),
        ("", "Secret") => g.subschema_for::<core::v1::Secret>(),
        ("", "ServiceAccount") => g.subschema_for::<core::v1::ServiceAccount>(),
        ("", "PersistentVolumeClaim") => g.subschema_for::<core::v1::PersistentVolumeClaim>(),
        ("", "PersistentVolume") => g.subschema_for::<core::v1::PersistentVolume>(),
        ("apps", "Deployment") => g.subschema_for::<apps::v1::Deployment>(),
        ("apps", "ReplicaSet") => g.subschema_for::<apps::v1::ReplicaSet>(),
        ("apps", "DaemonSet") => g.subschema_for::<apps::v1::DaemonSet>(),
        ("apps", "StatefulSet") => g.subschema_for::<apps::v1::StatefulSet>(),
        ("apps", "ControllerRevision") => g.subschema_for::<apps::v1::ControllerRevision>(),
        ("batch", "Job") => g.subschema_for::<batch::v1::Job>(),
        ("batch", "CronJob") => g.subschema_for::<batch::v1::CronJob>(),
        ("policy", "PodDisruptionBudget") => g.subschema_for::<policy::v1::PodDisruptionBudget>(),
        ("coordination.k8s.io", "Lease") => g.subschema_for::<coordination::v1::Lease>(),
        ("discovery.k8s.io", "EndpointSlice") => g.subschema_for::<discovery::v1::EndpointSlice>(),
        ("events.k8s.io", "Event") => g.subschema_for::<events::v1::Event>(),
        ("storage.k8s.io", "StorageClass") => g.subschema_for::<storage::v1::StorageClass>(),
        ("rbac.authorization.k8s.io", "Role") => g.subschema_for::<rbac::v1::Role>(),
        ("rbac.authorization.k8s.io", "RoleBinding") => g.subschema_for::<rbac::v1::RoleBinding>(),
        ("rbac.authorization.k8s.io", "ClusterRole") => g.subschema_for::<rbac::v1::ClusterRole>(),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => {
            g.subschema_for::<rbac::v1::ClusterRoleBinding>()
        }
        ("authorization.k8s.io", "SelfSubjectAccessReview") => {
            g.subschema_for::<authorization::v1::SelfSubjectAccessReview>()
        }
        ("authorization.k8s.io", "SelfSubjectRulesReview") => {
            g.subschema_for::<authorization::v1::SelfSubjectRulesReview>()
        }
        ("authorization.k8s.io", "SubjectAccessReview") => {
            g.subschema_for::<authorization::v1::SubjectAccessReview>()
        }
        ("authorization.k8s.io", "LocalSubjectAccessReview") => {
            g.subschema_for::<authorization::v1::LocalSubjectAccessReview>()
        }
        ("authentication.k8s.io", "SelfSubjectReview") => {
            g.subschema_for::<authentication::v1::SelfSubjectReview>()
        }
        ("authentication.k8s.io", "TokenReview") => {
            g.subschema_for::<authentication::v1::TokenReview>()
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => g.subschema_for::<
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        >(),
        _ => return None,
    })
}

/// Names of the shared definitions every document may refer to.
const STATUS: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Status";
const DELETE_OPTIONS: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions";
const WATCH_EVENT: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.WatchEvent";
const LIST_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta";
const PATCH: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Patch";
const SCALE: &str = "io.k8s.api.autoscaling.v1.Scale";

/// The built-in kinds with their definition names, and every definition (v3 form, with the
/// Kubernetes extensions), generated once per process.
struct Builtin {
    kinds: Vec<(Kind, String)>,
    definitions: Map<String, Value>,
}

fn builtin() -> &'static Builtin {
    static B: OnceLock<Builtin> = OnceLock::new();
    B.get_or_init(|| {
        let mut g = SchemaSettings::openapi3()
            .with(|s| s.meta_schema = None)
            .into_generator();
        let mut kinds = Vec::new();
        for r in RESOURCES {
            let Some(schema) = builtin_schema(r, &mut g) else {
                continue;
            };
            if let Some(name) = ref_name(schema.as_value(), V3_PREFIX) {
                kinds.push((Kind::of(r), name.to_string()));
            }
        }
        use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
        g.subschema_for::<meta::Status>();
        g.subschema_for::<meta::DeleteOptions>();
        g.subschema_for::<meta::WatchEvent<k8s_openapi::api::core::v1::Pod>>();
        g.subschema_for::<meta::ListMeta>();
        g.subschema_for::<meta::Patch>();
        g.subschema_for::<k8s_openapi::api::autoscaling::v1::Scale>();
        let mut definitions = g.take_definitions(true);
        annotate_patch_strategies(&mut definitions);
        metadata_not_required(&mut definitions);
        for (kind, name) in &kinds {
            if let Some(Value::Object(def)) = definitions.get_mut(name) {
                def.insert(
                    "x-kubernetes-group-version-kind".into(),
                    json!([kind.gvk()]),
                );
            }
        }
        if let Some(Value::Object(def)) = definitions.get_mut(SCALE) {
            def.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": "autoscaling", "version": "v1", "kind": "Scale"}]),
            );
        }
        Builtin { kinds, definitions }
    })
}

/// k8s-openapi's types hold `metadata` as a plain `ObjectMeta`, so their schemas require it;
/// Kubernetes' never do (a TokenReview or SubjectAccessReview is sent without one), and
/// kubectl's client-side validation would refuse such objects.
fn metadata_not_required(defs: &mut Map<String, Value>) {
    for def in defs.values_mut() {
        let Some(Value::Array(required)) = def.get_mut("required") else {
            continue;
        };
        required.retain(|f| f != "metadata");
        if required.is_empty() {
            if let Value::Object(d) = def {
                d.remove("required");
            }
        }
    }
}

/// The definition name a `$ref` points to.
fn ref_name<'a>(schema: &'a Value, prefix: &str) -> Option<&'a str> {
    let r = schema.get("$ref").and_then(Value::as_str).or_else(|| {
        schema
            .get("allOf")?
            .as_array()?
            .iter()
            .find_map(|s| s.get("$ref")?.as_str())
    })?;
    r.strip_prefix(prefix)
}

/// Marks list properties the strategic merge patch merges by key (or as a set).
fn annotate_patch_strategies(defs: &mut Map<String, Value>) {
    // Field names of every definition, to tell which merge key a list's elements carry.
    let fields: BTreeMap<String, Value> = defs
        .iter()
        .map(|(name, def)| {
            let sample: Map<String, Value> = def
                .get("properties")
                .and_then(Value::as_object)
                .map(|p| p.keys().map(|k| (k.clone(), Value::Null)).collect())
                .unwrap_or_default();
            (name.clone(), Value::Object(sample))
        })
        .collect();
    for def in defs.values_mut() {
        let Some(Value::Object(props)) = def.get_mut("properties") else {
            continue;
        };
        for (field, prop) in props.iter_mut() {
            let Some(prop) = prop.as_object_mut() else {
                continue;
            };
            if prop.get("type").and_then(Value::as_str) != Some("array") {
                continue;
            }
            if crate::patch::is_set_list(field) {
                prop.insert("x-kubernetes-patch-strategy".into(), json!("merge"));
                continue;
            }
            let Some(sample) = prop
                .get("items")
                .and_then(|i| ref_name(i, V3_PREFIX))
                .and_then(|n| fields.get(n))
            else {
                continue;
            };
            if let Some(key) = crate::patch::merge_key(field, sample) {
                // Only where the elements have that field (addresses of Endpoints do not).
                if sample.get(key).is_some() {
                    prop.insert("x-kubernetes-patch-strategy".into(), json!("merge"));
                    prop.insert("x-kubernetes-patch-merge-key".into(), json!(key));
                }
            }
        }
    }
}

/// The list definition of a kind (`io.k8s.api.apps.v1.DeploymentList`).
fn list_definition(kind: &Kind, item: &str) -> Value {
    json!({
        "description": format!("{}List is a list of {}.", kind.kind, kind.kind),
        "type": "object",
        "properties": {
            "apiVersion": {"description": "APIVersion defines the versioned schema of this representation of an object.", "type": "string"},
            "items": {"description": format!("List of {}.", kind.plural), "type": "array",
                      "items": {"allOf": [{"$ref": format!("{V3_PREFIX}{item}")}], "default": {}}},
            "kind": {"description": "Kind is a string value representing the REST resource this object represents.", "type": "string"},
            "metadata": {"allOf": [{"$ref": format!("{V3_PREFIX}{LIST_META}")}], "default": {},
                         "description": "Standard list metadata."},
        },
        "required": ["items"],
        "x-kubernetes-group-version-kind": [{"group": kind.group, "version": kind.version, "kind": format!("{}List", kind.kind)}],
    })
}

/// The documents, built and ready to serialise.
#[derive(Debug, Clone)]
pub struct Documents {
    /// The Swagger 2.0 document of every kind (`/openapi/v2`).
    pub v2: Value,
    /// One OpenAPI 3.0 document per group version, by [`document_key`].
    pub v3: BTreeMap<String, Value>,
}

/// Builds the documents for the built-in kinds and `custom` (a custom kind replaces a
/// built-in one of the same group, version and kind).
pub fn build(custom: &[CustomKind]) -> Documents {
    let b = builtin();
    let mut definitions = b.definitions.clone();
    let mut kinds: Vec<(Kind, String)> = b
        .kinds
        .iter()
        .filter(|(k, _)| {
            !custom.iter().any(|c| {
                c.kind.group == k.group && c.kind.version == k.version && c.kind.kind == k.kind
            })
        })
        .cloned()
        .collect();
    for c in custom {
        let name = custom_definition_name(&c.kind.group, &c.kind.version, &c.kind.kind);
        let mut schema = c.schema.clone();
        if let Value::Object(def) = &mut schema {
            def.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([c.kind.gvk()]),
            );
        }
        definitions.insert(name.clone(), schema);
        kinds.push((c.kind.clone(), name));
    }
    for (kind, name) in &kinds {
        if !kind.create_only {
            definitions.insert(format!("{name}List"), list_definition(kind, name));
        }
    }

    let mut by_doc: BTreeMap<String, Vec<&(Kind, String)>> = BTreeMap::new();
    for k in &kinds {
        by_doc.entry(k.0.document()).or_default().push(k);
    }
    let mut v3 = BTreeMap::new();
    for (key, ks) in &by_doc {
        let mut paths = Map::new();
        let mut roots: Vec<String> = vec![
            STATUS.into(),
            DELETE_OPTIONS.into(),
            WATCH_EVENT.into(),
            PATCH.into(),
        ];
        for (kind, name) in ks {
            paths.extend(kind_paths(kind, name, Flavor::V3));
            roots.push(name.clone());
            if !kind.create_only {
                roots.push(format!("{name}List"));
            }
            if kind.has_scale {
                roots.push(SCALE.into());
            }
        }
        let schemas = closure(&definitions, &roots);
        v3.insert(
            key.clone(),
            json!({
                "openapi": "3.0.0",
                "info": {"title": "Kubernetes", "version": "v1.37.0"},
                "paths": paths,
                "components": {"schemas": schemas},
            }),
        );
    }

    let mut paths = Map::new();
    for (kind, name) in &kinds {
        paths.extend(kind_paths(kind, name, Flavor::V2));
    }
    let v2_defs: Map<String, Value> = definitions
        .iter()
        .map(|(n, d)| (n.clone(), to_v2(d.clone())))
        .collect();
    let v2 = json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.37.0"},
        "paths": paths,
        "definitions": v2_defs,
        "securityDefinitions": {"BearerToken": {"type": "apiKey", "name": "authorization", "in": "header",
                                "description": "Bearer Token authentication"}},
        "security": [{"BearerToken": []}],
    });
    Documents { v2, v3 }
}

/// The definitions `roots` need, transitively.
fn closure(defs: &Map<String, Value>, roots: &[String]) -> Map<String, Value> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.to_vec();
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some(def) = defs.get(&name) {
            refs(def, &mut |r| {
                if let Some(n) = r.strip_prefix(V3_PREFIX) {
                    todo.push(n.to_string());
                }
            });
        }
    }
    seen.into_iter()
        .filter_map(|n| defs.get(&n).map(|d| (n, d.clone())))
        .collect()
}

fn refs(v: &Value, f: &mut impl FnMut(&str)) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => f(r),
                    _ => refs(v, f),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, f)),
        _ => {}
    }
}

/// A v3 schema in the v2 dialect: `#/definitions/` references, a lone `allOf` reference
/// turned back into `$ref` beside its description, no `nullable`.
fn to_v2(v: Value) -> Value {
    match v {
        Value::Object(mut m) => {
            if let Some(Value::Array(all)) = m.get("allOf") {
                if all.len() == 1 && all[0].get("$ref").is_some() {
                    let r = all[0]["$ref"].clone();
                    m.remove("allOf");
                    m.remove("default");
                    m.insert("$ref".into(), r);
                }
            }
            m.remove("nullable");
            Value::Object(
                m.into_iter()
                    .map(|(k, v)| match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => {
                            let r = r.replace(V3_PREFIX, V2_PREFIX);
                            (k, Value::String(r))
                        }
                        (_, v) => (k, to_v2(v)),
                    })
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.into_iter().map(to_v2).collect()),
        v => v,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    V2,
    V3,
}

impl Flavor {
    fn reference(self, name: &str) -> Value {
        match self {
            Flavor::V2 => json!({"$ref": format!("{V2_PREFIX}{name}")}),
            Flavor::V3 => json!({"$ref": format!("{V3_PREFIX}{name}")}),
        }
    }

    fn param(self, name: &str, at: &str, ty: &str) -> Value {
        let mut p = json!({"name": name, "in": at, "uniqueItems": true});
        if at == "path" {
            p["required"] = json!(true);
        }
        match self {
            Flavor::V2 => p["type"] = json!(ty),
            Flavor::V3 => p["schema"] = json!({"type": ty, "uniqueItems": true}),
        }
        p
    }

    /// An operation on `kind` answering `answer`, taking `body` when it has one.
    fn op(
        self,
        kind: &Kind,
        action: &str,
        id: String,
        params: Vec<Value>,
        body: Option<&str>,
        answer: &str,
    ) -> Value {
        let media = [
            "application/json",
            "application/yaml",
            "application/vnd.kubernetes.protobuf",
        ];
        let mut op = json!({
            "operationId": id,
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": kind.gvk(),
        });
        let mut params = params;
        match self {
            Flavor::V2 => {
                if let Some(b) = body {
                    params.insert(
                        0,
                        json!({"name": "body", "in": "body", "required": true,
                                           "schema": self.reference(b)}),
                    );
                    op["consumes"] = json!(["*/*"]);
                }
                op["produces"] = json!(media);
                op["responses"] = json!({"200": {"description": "OK", "schema": self.reference(answer)},
                                         "401": {"description": "Unauthorized"}});
                op["schemes"] = json!(["https"]);
            }
            Flavor::V3 => {
                if let Some(b) = body {
                    op["requestBody"] = json!({"required": true,
                        "content": {"*/*": {"schema": self.reference(b)}}});
                }
                let content: Map<String, Value> = media
                    .iter()
                    .map(|m| (m.to_string(), json!({"schema": self.reference(answer)})))
                    .collect();
                op["responses"] = json!({"200": {"description": "OK", "content": content},
                                         "401": {"description": "Unauthorized"}});
            }
        }
        op["parameters"] = Value::Array(params);
        op
    }
}

/// The paths of one kind, with their operations and parameters.
fn kind_paths(kind: &Kind, name: &str, f: Flavor) -> Map<String, Value> {
    let q = |n: &str, ty: &str| f.param(n, "query", ty);
    let write = || {
        vec![
            q("dryRun", "string"),
            q("fieldManager", "string"),
            q("fieldValidation", "string"),
        ]
    };
    let scope = if kind.namespaced {
        "/namespaces/{namespace}"
    } else {
        ""
    };
    let collection = format!("{}{scope}/{}", kind.prefix(), kind.plural);
    let mut scope_params = vec![q("pretty", "string")];
    if kind.namespaced {
        scope_params.insert(0, f.param("namespace", "path", "string"));
    }
    let mut out = Map::new();
    if kind.create_only {
        let post = f.op(
            kind,
            "post",
            kind.operation("create", ""),
            write(),
            Some(name),
            name,
        );
        out.insert(
            collection,
            json!({"post": post, "parameters": scope_params}),
        );
        return out;
    }
    let list_params = vec![
        q("allowWatchBookmarks", "boolean"),
        q("continue", "string"),
        q("fieldSelector", "string"),
        q("labelSelector", "string"),
        q("limit", "integer"),
        q("resourceVersion", "string"),
        q("resourceVersionMatch", "string"),
        q("sendInitialEvents", "boolean"),
        q("timeoutSeconds", "integer"),
        q("watch", "boolean"),
    ];
    let delete_params = || {
        vec![
            q("dryRun", "string"),
            q("gracePeriodSeconds", "integer"),
            q("propagationPolicy", "string"),
        ]
    };
    let list = format!("{name}List");
    let mut patch_params = write();
    patch_params.push(q("force", "boolean"));
    out.insert(
        collection.clone(),
        json!({
            "get": f.op(kind, "list", kind.operation("list", ""), list_params, None, &list),
            "post": f.op(kind, "post", kind.operation("create", ""), write(), Some(name), name),
            "delete": f.op(kind, "deletecollection", kind.operation("deleteCollection", ""),
                           delete_params(), Some(DELETE_OPTIONS), STATUS),
            "parameters": scope_params.clone(),
        }),
    );
    let mut item_params = vec![f.param("name", "path", "string")];
    item_params.extend(scope_params);
    out.insert(
        format!("{collection}/{{name}}"),
        json!({
            "get": f.op(kind, "get", kind.operation("read", ""), vec![], None, name),
            "put": f.op(kind, "put", kind.operation("replace", ""), write(), Some(name), name),
            "patch": f.op(kind, "patch", kind.operation("patch", ""), patch_params.clone(), Some(PATCH), name),
            "delete": f.op(kind, "delete", kind.operation("delete", ""), delete_params(), Some(DELETE_OPTIONS), STATUS),
            "parameters": item_params.clone(),
        }),
    );
    for (sub, answer, present) in [
        ("status", name, kind.has_status),
        ("scale", SCALE, kind.has_scale),
    ] {
        if !present {
            continue;
        }
        let s = capitalized(sub);
        out.insert(
            format!("{collection}/{{name}}/{sub}"),
            json!({
                "get": f.op(kind, "get", kind.operation("read", &s), vec![], None, answer),
                "put": f.op(kind, "put", kind.operation("replace", &s), write(), Some(answer), answer),
                "patch": f.op(kind, "patch", kind.operation("patch", &s), patch_params.clone(), Some(PATCH), answer),
                "parameters": item_params.clone(),
            }),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_kind_has_a_schema() {
        let mut g = SchemaSettings::openapi3().into_generator();
        for r in RESOURCES {
            assert!(
                builtin_schema(r, &mut g).is_some(),
                "{} has no schema",
                r.kind
            );
        }
    }

    #[test]
    fn documents_carry_schemas_and_extensions() {
        let docs = build(&[]);
        let apps = &docs.v3["apis/apps/v1"];
        let schemas = &apps["components"]["schemas"];
        let deploy = &schemas["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            deploy["x-kubernetes-group-version-kind"],
            json!([{"group": "apps", "version": "v1", "kind": "Deployment"}])
        );
        // What `kubectl explain deployment.spec.replicas` reads.
        let spec = &schemas["io.k8s.api.apps.v1.DeploymentSpec"];
        assert_eq!(spec["properties"]["replicas"]["type"], "integer");
        // Every reference resolves inside the document.
        refs(apps, &mut |r| {
            let n = r.strip_prefix(V3_PREFIX).expect("a components reference");
            assert!(schemas.get(n).is_some(), "{n} is missing");
        });
        // No kind requires `metadata`, as in Kubernetes' documents; what does require stays.
        let review = &docs.v3["apis/authentication.k8s.io/v1"]["components"]["schemas"]
            ["io.k8s.api.authentication.v1.TokenReview"];
        assert_eq!(review["required"], json!(["spec"]), "{review}");
        // Containers merge by name, as the strategic merge patch does.
        let pod_spec = &schemas["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
        assert_eq!(pod_spec["x-kubernetes-patch-merge-key"], "name");
        assert_eq!(pod_spec["x-kubernetes-patch-strategy"], "merge");
        let ports = &schemas["io.k8s.api.core.v1.Container"]["properties"]["ports"];
        assert_eq!(ports["x-kubernetes-patch-merge-key"], "containerPort");
        let svc_ports = &docs.v3["api/v1"]["components"]["schemas"]
            ["io.k8s.api.core.v1.ServiceSpec"]["properties"]["ports"];
        assert_eq!(svc_ports["x-kubernetes-patch-merge-key"], "port");
        // The operations name the kind and the server-side field validation.
        let post = &apps["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments"]["post"];
        assert_eq!(
            post["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(post["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "fieldValidation"));
        assert!(docs.v3["apis/authentication.k8s.io/v1"]["paths"]
            .get("/apis/authentication.k8s.io/v1/tokenreviews")
            .is_some());
    }

    #[test]
    fn v2_uses_definitions_references() {
        let docs = build(&[]);
        let defs = &docs.v2["definitions"];
        let deploy = &defs["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            deploy["properties"]["spec"]["$ref"],
            "#/definitions/io.k8s.api.apps.v1.DeploymentSpec"
        );
        refs(&docs.v2, &mut |r| {
            let n = r.strip_prefix(V2_PREFIX).expect("a definitions reference");
            assert!(defs.get(n).is_some(), "{n} is missing");
        });
    }

    #[test]
    fn custom_kinds_join_their_group_version() {
        let kind = Kind {
            group: "stable.example.com".into(),
            version: "v1".into(),
            kind: "CronTab".into(),
            plural: "crontabs".into(),
            namespaced: true,
            has_status: false,
            has_scale: false,
            create_only: false,
        };
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object",
                            "properties": {"cronSpec": {"type": "string"}}}}});
        let docs = build(&[CustomKind { kind, schema }]);
        let doc = &docs.v3["apis/stable.example.com/v1"];
        let def = &doc["components"]["schemas"]["com.example.stable.v1.CronTab"];
        assert_eq!(def["x-kubernetes-group-version-kind"][0]["kind"], "CronTab");
        assert!(doc["paths"]
            .get("/apis/stable.example.com/v1/namespaces/{namespace}/crontabs/{name}")
            .is_some());
        assert!(docs.v2["definitions"]
            .get("com.example.stable.v1.CronTabList")
            .is_some());
    }
}
