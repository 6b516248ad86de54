//! Authentication and authorization, as Kubernetes' API server splits them.
//!
//! [`Authenticator`] turns a request's credentials into a [`UserInfo`]: the admin token
//! (`system:admin`, group `system:masters`), a client certificate signed by the cluster CA
//! (CN the user, O the groups: nodes are `system:node:NAME` in `system:nodes`), a
//! ServiceAccount token ([`super::tokens`]: `system:serviceaccount:NS:NAME`), or a join
//! token (a bootstrap identity in `system:bootstrappers` that may only join). Anything else
//! is 401.
//!
//! [`Authorizer`] decides what a user may do. [`default_authorizer`] chains the rules in use:
//! `system:masters` may do anything, every user may read discovery, bootstrappers may only
//! join, and nodes are held to [`NodeAuthorizer`] (Kubernetes' Node authorizer with the
//! NodeRestriction admission rules folded in), and everyone else to RBAC ([`super::rbac`]).

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use skiff_api::{ApiError, Resource};

use crate::registry::Registry;

pub const MASTERS: &str = "system:masters";
pub const NODES: &str = "system:nodes";
pub const BOOTSTRAPPERS: &str = "system:bootstrappers";
pub const AUTHENTICATED: &str = "system:authenticated";
/// The join endpoints (besides `GET /cacerts`, which needs no credential).
pub const NODE_CREDENTIAL_PATH: &str = "/v1-skiff/node-credential";
/// Where the Secrets of join tokens live, and their type (as kubeadm's bootstrap tokens).
pub const TOKEN_NAMESPACE: &str = "kube-system";
pub const BOOTSTRAP_TOKEN_TYPE: &str = "bootstrap.kubernetes.io/token";

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
    /// The user's uid, when the request names one (`Impersonate-Uid`).
    pub uid: Option<String>,
    /// Extra attributes (`Impersonate-Extra-KEY`), by key.
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    pub fn in_group(&self, g: &str) -> bool {
        self.groups.iter().any(|x| x == g)
    }

    /// The node a `system:node:NAME` user in `system:nodes` is.
    pub fn node_name(&self) -> Option<&str> {
        self.name
            .strip_prefix("system:node:")
            .filter(|n| !n.is_empty() && self.in_group(NODES))
    }
}

/// The subject of a verified client certificate, put in the request's extensions by the TLS
/// acceptor.
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    pub common_name: String,
    pub organizations: Vec<String>,
}

/// What a join token's credential part is (after the optional `K10<ca hash>::`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinCredential {
    /// `node:<secret>`: the server's own `node-token`, no expiry.
    Node(String),
    /// `<id>.<secret>`: a token made by `skiff token create` (a bootstrap token Secret).
    Bootstrap { id: String, secret: String },
}

/// Parses the credential of a join token: `K10<hash>::node:<secret>`, `K10<hash>::<id>.<secret>`
/// or the bare credential. None for anything else (an admin token, say).
pub fn parse_join_credential(token: &str) -> Option<JoinCredential> {
    let cred = match token.split_once("::") {
        Some((prefix, rest)) if prefix.starts_with("K10") => rest,
        Some(_) => return None,
        None => token,
    };
    if let Some(secret) = cred.strip_prefix("node:") {
        return (!secret.is_empty()).then(|| JoinCredential::Node(secret.to_string()));
    }
    let (id, secret) = cred.split_once('.')?;
    let ok = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    (ok(id, 6) && ok(secret, 16)).then(|| JoinCredential::Bootstrap {
        id: id.into(),
        secret: secret.into(),
    })
}

/// Compares secrets in time independent of where they first differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Turns credentials into a user.
pub struct Authenticator {
    /// Bearer tokens of `system:admin`.
    pub admin_tokens: Vec<String>,
    /// The secret of the server's own `node-token` (`K10…::node:<secret>`).
    pub node_token_secret: Option<String>,
    /// Issues and checks ServiceAccount tokens.
    pub tokens: Arc<super::tokens::TokenIssuer>,
}

fn data_field(secret: &serde_json::Value, key: &str) -> Option<String> {
    use base64::Engine;
    if let Some(v) = secret["stringData"][key].as_str() {
        return Some(v.to_string());
    }
    let b = secret["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
    String::from_utf8(bytes).ok()
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    let mut e = ApiError::unauthorized();
    e.message = message.into();
    e
}

impl Authenticator {
    /// The user of a request that presented `bearer` (the `Authorization: Bearer` value) and
    /// `peer` (a verified client certificate). A certificate wins over a token.
    pub fn authenticate(
        &self,
        registry: &Registry,
        bearer: Option<&str>,
        peer: Option<&PeerCertificate>,
    ) -> Result<UserInfo, ApiError> {
        if let Some(p) = peer {
            let mut groups = p.organizations.clone();
            groups.extend(super::rbac::service_account_groups(&p.common_name));
            groups.push(AUTHENTICATED.into());
            return Ok(UserInfo {
                name: p.common_name.clone(),
                groups,
                ..Default::default()
            });
        }
        let Some(token) = bearer.map(str::trim).filter(|t| !t.is_empty()) else {
            return Err(ApiError::unauthorized());
        };
        if self.admin_tokens.iter().any(|k| same_secret(k, token)) {
            return Ok(UserInfo {
                name: "system:admin".into(),
                groups: vec![MASTERS.into(), AUTHENTICATED.into()],
                ..Default::default()
            });
        }
        if super::tokens::looks_like_jwt(token) {
            let audiences = &self.tokens.api_audiences;
            return match self.tokens.authenticate(registry, token, audiences) {
                Ok(t) => Ok(t.user),
                Err(e) => {
                    // Why, in the server's log only: the client is told `Unauthorized`.
                    tracing::debug!(reason = %e.message, "service account token refused");
                    Err(ApiError::unauthorized())
                }
            };
        }
        let bootstrap = |id: &str| UserInfo {
            name: format!("system:bootstrap:{id}"),
            groups: vec![BOOTSTRAPPERS.into(), AUTHENTICATED.into()],
            ..Default::default()
        };
        match parse_join_credential(token) {
            Some(JoinCredential::Node(secret)) => match &self.node_token_secret {
                Some(want) if same_secret(want, &secret) => Ok(bootstrap("node")),
                _ => Err(unauthorized("the join token is not valid for this cluster")),
            },
            Some(JoinCredential::Bootstrap { id, secret }) => {
                let secrets = Resource::lookup("secrets").expect("secrets");
                let name = format!("bootstrap-token-{id}");
                let obj = registry
                    .try_get(secrets, Some(TOKEN_NAMESPACE), &name)?
                    .filter(|s| s["type"] == BOOTSTRAP_TOKEN_TYPE)
                    .ok_or_else(|| unauthorized(format!("join token {id} is not known")))?;
                let want = data_field(&obj, "token-secret").unwrap_or_default();
                if !same_secret(&want, &secret)
                    || data_field(&obj, "usage-bootstrap-authentication").as_deref() != Some("true")
                {
                    return Err(unauthorized(format!("join token {id} is not valid")));
                }
                if let Some(exp) = data_field(&obj, "expiration") {
                    let exp = chrono::DateTime::parse_from_rfc3339(&exp)
                        .map_err(|_| unauthorized(format!("join token {id} is not valid")))?;
                    if exp <= chrono::Utc::now() {
                        return Err(unauthorized(format!(
                            "join token {id} expired at {}",
                            exp.to_rfc3339()
                        )));
                    }
                }
                if obj["metadata"]["deletionTimestamp"].is_string() {
                    return Err(unauthorized(format!("join token {id} is being deleted")));
                }
                Ok(bootstrap(&id))
            }
            None => Err(ApiError::unauthorized()),
        }
    }
}

/// What a request asks to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attributes {
    Resource(ResourceAttributes),
    NonResource { verb: String, path: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceAttributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub verb: String,
    pub group: String,
    /// The plural name (`pods`).
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    /// The object's name; for a create, the name in the body when known.
    pub name: Option<String>,
}

/// The Kubernetes verb of an HTTP method on a resource path.
pub fn verb(method: &http::Method, named: bool, watch: bool) -> &'static str {
    match *method {
        http::Method::GET | http::Method::HEAD if watch => "watch",
        http::Method::GET | http::Method::HEAD if named => "get",
        http::Method::GET | http::Method::HEAD => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if named => "delete",
        http::Method::DELETE => "deletecollection",
        _ => "unknown",
    }
}

/// An authorizer's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused, and no later authorizer is asked; the reason ends the 403's message.
    Deny(String),
    /// Not this authorizer's business: the next one decides.
    NoOpinion,
}

/// One way of deciding requests (Kubernetes' `authorizer.Authorizer`).
pub trait Authorizer: Send + Sync {
    fn authorize(&self, user: &UserInfo, attrs: &Attributes) -> Decision;
}

/// Asks each authorizer in turn; the first that allows or denies decides. When none has an
/// opinion the request is denied.
pub struct Chain(pub Vec<Box<dyn Authorizer>>);

impl Authorizer for Chain {
    fn authorize(&self, user: &UserInfo, attrs: &Attributes) -> Decision {
        for a in &self.0 {
            match a.authorize(user, attrs) {
                Decision::NoOpinion => continue,
                d => return d,
            }
        }
        Decision::NoOpinion
    }
}

/// `system:masters` may do anything.
pub struct Masters;

impl Authorizer for Masters {
    fn authorize(&self, user: &UserInfo, _: &Attributes) -> Decision {
        if user.in_group(MASTERS) {
            Decision::Allow
        } else {
            Decision::NoOpinion
        }
    }
}

/// What every authenticated user may read (Kubernetes' `system:discovery` and
/// `system:public-info-viewer`): discovery documents, health and version.
pub struct Discovery;

impl Authorizer for Discovery {
    fn authorize(&self, user: &UserInfo, attrs: &Attributes) -> Decision {
        let Attributes::NonResource { verb, path } = attrs else {
            return Decision::NoOpinion;
        };
        let public = matches!(
            path.as_str(),
            "/api"
                | "/apis"
                | "/version"
                | "/healthz"
                | "/livez"
                | "/readyz"
                | "/openapi/v3"
                | super::tokens::JWKS_PATH
                | super::tokens::OPENID_CONFIGURATION_PATH
        ) || path.starts_with("/api/")
            || path.starts_with("/apis/")
            || path.starts_with("/openapi/");
        if verb == "get" && public && user.in_group(AUTHENTICATED) {
            Decision::Allow
        } else {
            Decision::NoOpinion
        }
    }
}

/// A join token's bootstrap identity may only ask for its node credential.
pub struct Bootstrappers;

impl Authorizer for Bootstrappers {
    fn authorize(&self, user: &UserInfo, attrs: &Attributes) -> Decision {
        if !user.in_group(BOOTSTRAPPERS) {
            return Decision::NoOpinion;
        }
        match attrs {
            Attributes::NonResource { verb, path }
                if verb == "create" && path == NODE_CREDENTIAL_PATH =>
            {
                Decision::Allow
            }
            _ => Decision::Deny("a join token may only be used to join a node".into()),
        }
    }
}

/// An object a node may read because one of its pods refers to it.
#[derive(Debug, Clone, Copy)]
pub enum Ref<'a> {
    ServiceAccount(&'a str),
    ConfigMap(&'a str),
    Secret(&'a str),
    Claim(&'a str),
}

/// What the node authorizer needs to know about the cluster: pods, where they are bound and
/// what they refer to ([`super::nodegraph::PodGraph`] keeps it from a watch).
pub trait NodeGraph: Send + Sync {
    /// Whether the pod `ns/name` is bound to `node`.
    fn pod_on(&self, node: &str, ns: &str, name: &str) -> bool;
    /// Whether a pod in `ns` bound to `node` refers to `r`.
    fn refers(&self, node: &str, ns: &str, r: Ref<'_>) -> bool;
}

/// The registry answers by reading the store: a pod, or every pod of a namespace.
impl NodeGraph for Registry {
    fn pod_on(&self, node: &str, ns: &str, name: &str) -> bool {
        let pods = Resource::lookup("pods").expect("pods");
        let Ok(Some(p)) = self.try_get(pods, Some(ns), name) else {
            return false;
        };
        p.pointer("/spec/nodeName")
            .and_then(serde_json::Value::as_str)
            == Some(node)
    }

    fn refers(&self, node: &str, ns: &str, r: Ref<'_>) -> bool {
        let pods = Resource::lookup("pods").expect("pods");
        let Ok((items, _)) = self.list(
            pods,
            Some(ns),
            &skiff_api::selector::Selector::everything(),
            &skiff_api::fields::FieldSelector::parse(&format!("spec.nodeName={node}"))
                .unwrap_or_default(),
        ) else {
            return false;
        };
        items
            .iter()
            .filter_map(super::nodegraph::decode)
            .filter_map(|(_, _, refs)| refs)
            .any(|p| p.node == node && p.has(r))
    }
}

/// The ConfigMaps and Secrets a pod names (volumes, projected volumes, env, envFrom, image
/// pull secrets): what its node may read.
pub fn pod_references(pod: &Pod) -> (HashSet<String>, HashSet<String>) {
    let (mut cms, mut secrets) = (HashSet::new(), HashSet::new());
    let Some(spec) = &pod.spec else {
        return (cms, secrets);
    };
    for v in spec.volumes.iter().flatten() {
        if let Some(c) = &v.config_map {
            cms.insert(c.name.clone());
        }
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.insert(s);
        }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(c) = &src.config_map {
                cms.insert(c.name.clone());
            }
            if let Some(s) = &src.secret {
                secrets.insert(s.name.clone());
            }
        }
    }
    for s in spec.image_pull_secrets.iter().flatten() {
        secrets.insert(s.name.clone());
    }
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for c in containers {
        for e in c.env.iter().flatten() {
            if let Some(from) = &e.value_from {
                if let Some(r) = &from.config_map_key_ref {
                    cms.insert(r.name.clone());
                }
                if let Some(r) = &from.secret_key_ref {
                    secrets.insert(r.name.clone());
                }
            }
        }
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                cms.insert(r.name.clone());
            }
            if let Some(r) = &e.secret_ref {
                secrets.insert(r.name.clone());
            }
        }
    }
    (cms, secrets)
}

/// Kubernetes' Node authorizer with NodeRestriction's rules: a node reads what its agent and
/// proxy need, and writes only its own Node, its own Lease, the pods bound to it and Events.
pub struct NodeAuthorizer {
    pub graph: Arc<dyn NodeGraph>,
}

const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

impl NodeAuthorizer {
    fn decide(&self, node: &str, a: &ResourceAttributes) -> Decision {
        let no_relation = || {
            Decision::Deny(format!(
                "no relationship found between node '{node}' and this object"
            ))
        };
        let read = matches!(a.verb.as_str(), "get" | "list" | "watch");
        let name = a.name.as_deref().unwrap_or("");
        let sub = a.subresource.as_deref();
        match (a.group.as_str(), a.resource.as_str()) {
            ("", "nodes") => match (a.verb.as_str(), sub) {
                (_, None) if read => Decision::Allow,
                ("create" | "delete", None) | ("update" | "patch", None | Some("status")) => {
                    if name == node {
                        Decision::Allow
                    } else {
                        Decision::Deny(format!(
                            "node \"{node}\" is not allowed to modify node \"{name}\""
                        ))
                    }
                }
                _ => no_relation(),
            },
            ("", "pods") => match (a.verb.as_str(), sub) {
                (_, None) if read => Decision::Allow,
                ("update" | "patch", Some("status")) | ("delete", None) => {
                    let ns = a.namespace.as_deref().unwrap_or("");
                    if self.graph.pod_on(node, ns, name) {
                        Decision::Allow
                    } else {
                        no_relation()
                    }
                }
                _ => no_relation(),
            },
            ("", "services" | "endpoints") | ("discovery.k8s.io", "endpointslices")
                if read && sub.is_none() =>
            {
                Decision::Allow
            }
            ("", kind @ ("configmaps" | "secrets")) if a.verb == "get" && sub.is_none() => {
                let ns = a.namespace.as_deref().unwrap_or("");
                let r = if kind == "configmaps" {
                    Ref::ConfigMap(name)
                } else {
                    Ref::Secret(name)
                };
                let referenced = self.graph.refers(node, ns, r);
                if referenced {
                    Decision::Allow
                } else {
                    no_relation()
                }
            }
            // The ServiceAccounts its pods run as, and tokens for them (the token request
            // itself must be bound to one of its pods: `tokens::TokenIssuer::request`).
            ("", "serviceaccounts")
                if (a.verb == "get" && sub.is_none())
                    || (a.verb == "create" && sub == Some("token")) =>
            {
                let ns = a.namespace.as_deref().unwrap_or("");
                let runs_as = self.graph.refers(node, ns, Ref::ServiceAccount(name));
                if runs_as {
                    Decision::Allow
                } else {
                    no_relation()
                }
            }
            // Volumes by name: whether a volume directory on the node is still wanted.
            ("", "persistentvolumes") if a.verb == "get" && sub.is_none() => Decision::Allow,
            // The claims its pods use (to find their volumes).
            ("", "persistentvolumeclaims") if a.verb == "get" && sub.is_none() => {
                let ns = a.namespace.as_deref().unwrap_or("");
                let referenced = self.graph.refers(node, ns, Ref::Claim(name));
                if referenced {
                    Decision::Allow
                } else {
                    no_relation()
                }
            }
            ("" | "events.k8s.io", "events")
                if matches!(a.verb.as_str(), "create" | "update" | "patch") =>
            {
                Decision::Allow
            }
            ("coordination.k8s.io", "leases")
                if a.namespace.as_deref() == Some(NODE_LEASE_NAMESPACE)
                    && sub.is_none()
                    && matches!(
                        a.verb.as_str(),
                        "get" | "create" | "update" | "patch" | "delete"
                    ) =>
            {
                if name == node {
                    Decision::Allow
                } else {
                    Decision::Deny(format!(
                        "node \"{node}\" is not allowed to modify the lease of \"{name}\""
                    ))
                }
            }
            _ => no_relation(),
        }
    }
}

impl Authorizer for NodeAuthorizer {
    fn authorize(&self, user: &UserInfo, attrs: &Attributes) -> Decision {
        let Some(node) = user.node_name() else {
            return Decision::NoOpinion;
        };
        match attrs {
            Attributes::Resource(a) => self.decide(node, a),
            // Renewing its certificates: the handler holds a node to its own name.
            Attributes::NonResource { verb, path }
                if verb == "create" && path == NODE_CREDENTIAL_PATH =>
            {
                Decision::Allow
            }
            Attributes::NonResource { .. } => Decision::NoOpinion,
        }
    }
}

/// The authorizers in use, in order; RBAC (over `rbac`'s roles and bindings) last.
pub fn default_authorizer(graph: Arc<dyn NodeGraph>, rbac: Arc<super::rbac::RbacCaches>) -> Chain {
    Chain(vec![
        Box::new(Masters),
        Box::new(Discovery),
        Box::new(Bootstrappers),
        Box::new(NodeAuthorizer { graph }),
        Box::new(super::rbac::Rbac(rbac)),
    ])
}

// ---- NodeRestriction admission on a node's own Node ---------------------------------------

/// The labels a kubelet may set on its own Node (Kubernetes' `kubeletapis.IsKubeletLabel`):
/// these keys, and any key under `kubelet.kubernetes.io` or `node.kubernetes.io` (or a
/// subdomain of them).
const KUBELET_LABELS: &[&str] = &[
    "kubernetes.io/hostname",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
];
const KUBELET_LABEL_NAMESPACES: &[&str] = &["kubelet.kubernetes.io", "node.kubernetes.io"];
const NODE_RESTRICTION_NAMESPACE: &str = "node-restriction.kubernetes.io";

fn label_namespace(key: &str) -> &str {
    key.split_once('/').map_or("", |(ns, _)| ns)
}

/// `ns` is `domain` or a subdomain of it.
fn in_domain(ns: &str, domain: &str) -> bool {
    ns == domain
        || ns
            .strip_suffix(domain)
            .is_some_and(|rest| rest.ends_with('.'))
}

/// Whether a node may set, change or remove the label `key` on its own Node: not under
/// `node-restriction.kubernetes.io`, and of the `kubernetes.io`/`k8s.io` labels only the
/// kubelet's own.
pub fn node_may_set_label(key: &str) -> bool {
    let ns = label_namespace(key);
    if in_domain(ns, NODE_RESTRICTION_NAMESPACE) {
        return false;
    }
    let kubernetes = in_domain(ns, "kubernetes.io") || in_domain(ns, "k8s.io");
    let kubelet = KUBELET_LABELS.contains(&key)
        || KUBELET_LABEL_NAMESPACES
            .iter()
            .any(|allowed| in_domain(ns, allowed));
    !kubernetes || kubelet
}

/// NodeRestriction's rules for a node writing its own Node (`old`: None on create): the labels
/// it adds, changes or removes must be ones [`node_may_set_label`] allows, and after creation
/// it may not change its taints. The error is Kubernetes' 403, e.g. `nodes "n1" is forbidden:
/// is not allowed to modify labels: node-restriction.kubernetes.io/x`.
pub fn admit_node_write(node: &str, old: Option<&Node>, new: &Node) -> Result<(), ApiError> {
    let empty = Default::default();
    let new_labels = new.metadata.labels.as_ref().unwrap_or(&empty);
    let old_labels = old
        .and_then(|o| o.metadata.labels.as_ref())
        .unwrap_or(&empty);
    let mut modified: Vec<&String> = new_labels
        .iter()
        .filter(|(k, v)| old_labels.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .chain(old_labels.keys().filter(|k| !new_labels.contains_key(*k)))
        .filter(|k| !node_may_set_label(k))
        .collect();
    modified.sort();
    modified.dedup();
    let refuse = |message: String| {
        let mut e = ApiError::unauthorized();
        e.code = 403;
        e.reason = "Forbidden";
        e.message = format!(
            "nodes \"{}\" is forbidden: {message}",
            new.metadata.name.as_deref().unwrap_or(node)
        );
        e
    };
    let list = || {
        modified
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match old {
        None if !modified.is_empty() => Err(refuse(format!(
            "node \"{node}\" is not allowed to set the following labels: {}",
            list()
        ))),
        None => Ok(()),
        Some(old) => {
            let taints = |n: &Node| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.taints.clone())
                    .unwrap_or_default()
            };
            if taints(old) != taints(new) {
                return Err(refuse(format!(
                    "node \"{node}\" is not allowed to modify taints"
                )));
            }
            if !modified.is_empty() {
                return Err(refuse(format!(
                    "is not allowed to modify labels: {}",
                    list()
                )));
            }
            Ok(())
        }
    }
}

/// Kubernetes' 403 for a refused request, e.g. `nodes "n2" is forbidden: User
/// "system:node:n1" cannot patch resource "nodes" in API group "" at the cluster scope: …`.
pub fn forbidden(user: &UserInfo, attrs: &Attributes, reason: &str) -> ApiError {
    let mut e = ApiError::unauthorized();
    e.code = 403;
    e.reason = "Forbidden";
    let tail = if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    };
    match attrs {
        Attributes::Resource(a) => {
            let qualified = if a.group.is_empty() {
                a.resource.clone()
            } else {
                format!("{}.{}", a.resource, a.group)
            };
            let what = match &a.name {
                Some(n) if !n.is_empty() => format!("{qualified} \"{n}\""),
                _ => qualified,
            };
            let resource = match &a.subresource {
                Some(s) => format!("{}/{s}", a.resource),
                None => a.resource.clone(),
            };
            let scope = match &a.namespace {
                Some(ns) => format!("in the namespace \"{ns}\""),
                None => "at the cluster scope".into(),
            };
            e.message = format!(
                "{what} is forbidden: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}{tail}",
                user.name, a.verb, a.group
            );
            e.kind = Some(a.resource.clone());
            e.name = a.name.clone();
            e.group = Some(a.group.clone());
        }
        Attributes::NonResource { verb, path } => {
            e.message = format!(
                "forbidden: User \"{}\" cannot {verb} path \"{path}\"{tail}",
                user.name
            );
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    struct FakeGraph(HashMap<(String, String), Pod>);

    impl NodeGraph for FakeGraph {
        fn pod_on(&self, node: &str, ns: &str, name: &str) -> bool {
            self.0
                .get(&(ns.to_string(), name.to_string()))
                .and_then(super::super::nodegraph::PodRefs::of)
                .is_some_and(|p| p.node == node)
        }
        fn refers(&self, node: &str, ns: &str, r: Ref<'_>) -> bool {
            self.0
                .iter()
                .filter(|((n, _), _)| n == ns)
                .filter_map(|(_, p)| super::super::nodegraph::PodRefs::of(p))
                .any(|p| p.node == node && p.has(r))
        }
    }

    fn pod(name: &str, node: &str, spec: serde_json::Value) -> ((String, String), Pod) {
        let mut s = spec;
        s["nodeName"] = json!(node);
        if s.get("containers").is_none() {
            s["containers"] = json!([{"name": "c", "image": "i"}]);
        }
        let p: Pod = serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": "default"}, "spec": s}),
        )
        .unwrap();
        (("default".into(), name.into()), p)
    }

    fn authorizer() -> Chain {
        let graph = FakeGraph(HashMap::from([
            pod(
                "a",
                "n1",
                json!({"volumes": [{"name": "v", "configMap": {"name": "cm-a"}}],
                       "containers": [{"name": "c", "image": "i",
                         "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "sec-a", "key": "k"}}}]}]}),
            ),
            pod(
                "b",
                "n2",
                json!({"volumes": [{"name": "v", "configMap": {"name": "cm-b"}}]}),
            ),
        ]));
        default_authorizer(Arc::new(graph), super::super::rbac::RbacCaches::new())
    }

    fn node(n: &str) -> UserInfo {
        UserInfo {
            name: format!("system:node:{n}"),
            groups: vec![NODES.into(), AUTHENTICATED.into()],
            ..Default::default()
        }
    }

    fn res(
        verb: &str,
        resource: &str,
        sub: Option<&str>,
        ns: Option<&str>,
        name: Option<&str>,
    ) -> Attributes {
        let (group, resource) = match resource.split_once('.') {
            Some((r, g)) => (g.to_string(), r.to_string()),
            None => (String::new(), resource.to_string()),
        };
        Attributes::Resource(ResourceAttributes {
            verb: verb.into(),
            group,
            resource,
            subresource: sub.map(String::from),
            namespace: ns.map(String::from),
            name: name.map(String::from),
        })
    }

    #[test]
    fn a_node_writes_only_its_own_node() {
        let a = authorizer();
        let n1 = node("n1");
        for (verb, sub) in [
            ("patch", None),
            ("patch", Some("status")),
            ("update", None),
            ("update", Some("status")),
            ("create", None),
        ] {
            assert_eq!(
                a.authorize(&n1, &res(verb, "nodes", sub, None, Some("n1"))),
                Decision::Allow,
                "{verb} {sub:?}"
            );
            assert!(matches!(
                a.authorize(&n1, &res(verb, "nodes", sub, None, Some("n2"))),
                Decision::Deny(_)
            ));
        }
        assert_eq!(
            a.authorize(&n1, &res("list", "nodes", None, None, None)),
            Decision::Allow
        );
        assert!(matches!(
            a.authorize(&n1, &res("delete", "nodes", None, None, Some("n2"))),
            Decision::Deny(_)
        ));
        assert_eq!(
            a.authorize(&n1, &res("delete", "nodes", None, None, Some("n1"))),
            Decision::Allow
        );
        assert!(matches!(
            a.authorize(&n1, &res("deletecollection", "nodes", None, None, None)),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn join_tokens_authenticate_as_bootstrappers_until_they_expire() {
        use crate::registry::{ClusterConfig, WriteOptions};
        use crate::store::sqlite::SqliteStore;
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("store")).unwrap());
        let reg = Registry::new(store, ClusterConfig::default());
        crate::server::bootstrap(&reg, "127.0.0.1:6443".parse().unwrap()).unwrap();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let secrets = Resource::lookup("secrets").unwrap();
        for (id, exp) in [
            ("abcdef", chrono::Utc::now() + chrono::Duration::hours(1)),
            ("zzzzzz", chrono::Utc::now() - chrono::Duration::seconds(1)),
        ] {
            reg.create(
                secrets,
                Some(TOKEN_NAMESPACE),
                json!({"metadata": {"name": format!("bootstrap-token-{id}")}, "type": BOOTSTRAP_TOKEN_TYPE,
                       "data": {"token-id": b64(id), "token-secret": b64("0123456789abcdef"),
                                "usage-bootstrap-authentication": b64("true"),
                                "expiration": b64(&exp.to_rfc3339())}}),
                &WriteOptions::default(),
            )
            .unwrap();
        }
        let key = super::super::tokens::TokenKey::load_or_create(dir.path()).unwrap();
        let authn = Authenticator {
            admin_tokens: vec!["admin-t".into()],
            node_token_secret: Some("nodesecret".into()),
            tokens: Arc::new(super::super::tokens::TokenIssuer::new(Arc::new(key))),
        };
        let hash = "f".repeat(64);
        let user = |t: &str| authn.authenticate(&reg, Some(t), None);
        assert!(user("admin-t").unwrap().in_group(MASTERS));
        let u = user(&format!("K10{hash}::abcdef.0123456789abcdef")).unwrap();
        assert_eq!(u.name, "system:bootstrap:abcdef");
        assert!(u.in_group(BOOTSTRAPPERS) && !u.in_group(MASTERS));
        assert_eq!(
            user(&format!("K10{hash}::node:nodesecret")).unwrap().name,
            "system:bootstrap:node"
        );
        let e = user("zzzzzz.0123456789abcdef").unwrap_err();
        assert_eq!(e.code, 401);
        assert!(e.message.contains("expired"), "{}", e.message);
        for bad in [
            "abcdef.0123456789abcdee",
            "qqqqqq.0123456789abcdef",
            "node:other",
            "admin-x",
        ] {
            assert_eq!(user(bad).unwrap_err().code, 401, "{bad}");
        }
        assert_eq!(authn.authenticate(&reg, None, None).unwrap_err().code, 401);
        // A verified client certificate names the user.
        let peer = PeerCertificate {
            common_name: "system:node:n1".into(),
            organizations: vec![NODES.into()],
        };
        let u = authn.authenticate(&reg, None, Some(&peer)).unwrap();
        assert_eq!(u.node_name(), Some("n1"));
    }

    #[test]
    fn a_node_updates_only_pods_bound_to_it() {
        let a = authorizer();
        let n1 = node("n1");
        let ns = Some("default");
        assert_eq!(
            a.authorize(&n1, &res("patch", "pods", Some("status"), ns, Some("a"))),
            Decision::Allow
        );
        assert_eq!(
            a.authorize(&n1, &res("delete", "pods", None, ns, Some("a"))),
            Decision::Allow
        );
        for attrs in [
            res("patch", "pods", Some("status"), ns, Some("b")),
            res("delete", "pods", None, ns, Some("b")),
            res("patch", "pods", None, ns, Some("a")),
            res("create", "pods", None, ns, None),
            res("delete", "pods", None, ns, Some("missing")),
        ] {
            assert!(
                matches!(a.authorize(&n1, &attrs), Decision::Deny(_)),
                "{attrs:?}"
            );
        }
        for verb in ["get", "list", "watch"] {
            assert_eq!(
                a.authorize(&n1, &res(verb, "pods", None, None, None)),
                Decision::Allow
            );
            assert_eq!(
                a.authorize(&n1, &res(verb, "services", None, None, None)),
                Decision::Allow
            );
            assert_eq!(
                a.authorize(&n1, &res(verb, "endpoints", None, ns, None)),
                Decision::Allow
            );
        }
    }

    #[test]
    fn a_node_reads_only_what_its_pods_reference() {
        let a = authorizer();
        let n1 = node("n1");
        let ns = Some("default");
        assert_eq!(
            a.authorize(&n1, &res("get", "configmaps", None, ns, Some("cm-a"))),
            Decision::Allow
        );
        assert_eq!(
            a.authorize(&n1, &res("get", "secrets", None, ns, Some("sec-a"))),
            Decision::Allow
        );
        for attrs in [
            res("get", "configmaps", None, ns, Some("cm-b")),
            res("get", "secrets", None, ns, Some("cm-a")),
            res("list", "secrets", None, ns, None),
            res("get", "secrets", None, Some("kube-system"), Some("sec-a")),
            res("update", "configmaps", None, ns, Some("cm-a")),
            res("get", "deployments.apps", None, ns, Some("x")),
        ] {
            assert!(
                matches!(a.authorize(&n1, &attrs), Decision::Deny(_)),
                "{attrs:?}"
            );
        }
        // The ServiceAccount its pods run as, and tokens for it.
        assert_eq!(
            a.authorize(
                &n1,
                &res("get", "serviceaccounts", None, ns, Some("default"))
            ),
            Decision::Allow
        );
        assert_eq!(
            a.authorize(
                &n1,
                &res(
                    "create",
                    "serviceaccounts",
                    Some("token"),
                    ns,
                    Some("default")
                )
            ),
            Decision::Allow
        );
        for attrs in [
            res("get", "serviceaccounts", None, ns, Some("builder")),
            res(
                "create",
                "serviceaccounts",
                Some("token"),
                ns,
                Some("builder"),
            ),
            res("update", "serviceaccounts", None, ns, Some("default")),
            res("list", "serviceaccounts", None, ns, None),
            res(
                "create",
                "serviceaccounts",
                Some("token"),
                Some("kube-system"),
                Some("default"),
            ),
        ] {
            assert!(
                matches!(a.authorize(&n1, &attrs), Decision::Deny(_)),
                "{attrs:?}"
            );
        }
        assert_eq!(
            a.authorize(&n1, &res("create", "events", None, ns, None)),
            Decision::Allow
        );
        assert_eq!(
            a.authorize(
                &n1,
                &res(
                    "update",
                    "leases.coordination.k8s.io",
                    None,
                    Some("kube-node-lease"),
                    Some("n1")
                )
            ),
            Decision::Allow
        );
        assert!(matches!(
            a.authorize(
                &n1,
                &res(
                    "update",
                    "leases.coordination.k8s.io",
                    None,
                    Some("kube-node-lease"),
                    Some("n2")
                )
            ),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn masters_may_do_anything_and_bootstrappers_only_join() {
        let a = authorizer();
        let admin = UserInfo {
            name: "system:admin".into(),
            groups: vec![MASTERS.into()],
            ..Default::default()
        };
        assert_eq!(
            a.authorize(&admin, &res("list", "secrets", None, None, None)),
            Decision::Allow
        );
        let boot = UserInfo {
            name: "system:bootstrap:abcdef".into(),
            groups: vec![BOOTSTRAPPERS.into(), AUTHENTICATED.into()],
            ..Default::default()
        };
        let join = Attributes::NonResource {
            verb: "create".into(),
            path: NODE_CREDENTIAL_PATH.into(),
        };
        assert_eq!(a.authorize(&boot, &join), Decision::Allow);
        // A node renews its own certificates there (the handler checks the name).
        assert_eq!(a.authorize(&node("n1"), &join), Decision::Allow);
        let stranger_path = Attributes::NonResource {
            verb: "get".into(),
            path: "/metrics".into(),
        };
        assert_eq!(
            a.authorize(&node("n1"), &stranger_path),
            Decision::NoOpinion
        );
        assert!(matches!(
            a.authorize(
                &boot,
                &res("list", "secrets", None, Some("kube-system"), None)
            ),
            Decision::Deny(_)
        ));
        // A client certificate naming a node but not in system:nodes is no node.
        let stranger = UserInfo {
            name: "system:node:n1".into(),
            groups: vec![AUTHENTICATED.into()],
            ..Default::default()
        };
        assert_eq!(
            a.authorize(&stranger, &res("get", "pods", None, None, Some("a"))),
            Decision::NoOpinion
        );
    }

    #[test]
    fn refusals_read_as_kubernetes_writes_them() {
        let e = forbidden(
            &node("n1"),
            &res("patch", "nodes", None, None, Some("n2")),
            "node \"n1\" is not allowed to modify node \"n2\"",
        );
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "nodes \"n2\" is forbidden: User \"system:node:n1\" cannot patch resource \"nodes\" in API group \"\" at the cluster scope: node \"n1\" is not allowed to modify node \"n2\""
        );
        let e = forbidden(
            &node("n1"),
            &res("list", "secrets", None, Some("kube-system"), None),
            "",
        );
        assert_eq!(
            e.message,
            "secrets is forbidden: User \"system:node:n1\" cannot list resource \"secrets\" in API group \"\" in the namespace \"kube-system\""
        );
        let e = forbidden(
            &node("n1"),
            &res("patch", "pods", Some("status"), Some("default"), Some("b")),
            "x",
        );
        assert!(e.message.starts_with("pods \"b\" is forbidden: User \"system:node:n1\" cannot patch resource \"pods/status\" in API group \"\" in the namespace \"default\""), "{}", e.message);
    }

    #[test]
    fn join_credentials_are_parsed() {
        let hash = "a".repeat(64);
        assert_eq!(
            parse_join_credential(&format!("K10{hash}::node:s3cret")),
            Some(JoinCredential::Node("s3cret".into()))
        );
        assert_eq!(
            parse_join_credential(&format!("K10{hash}::abcdef.0123456789abcdef")),
            Some(JoinCredential::Bootstrap {
                id: "abcdef".into(),
                secret: "0123456789abcdef".into()
            })
        );
        assert_eq!(
            parse_join_credential("abcdef.0123456789abcdef"),
            Some(JoinCredential::Bootstrap {
                id: "abcdef".into(),
                secret: "0123456789abcdef".into()
            })
        );
        for bad in [
            "skiff-0123",
            "K10x::node:",
            "abcdef.short",
            "ABCDEF.0123456789abcdef",
            "x::node:s",
        ] {
            assert_eq!(parse_join_credential(bad), None, "{bad}");
        }
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
    fn node_obj(labels: &[(&str, &str)], taints: serde_json::Value) -> Node {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": labels},
            "spec": {"taints": taints}
        }))
        .unwrap()
    }

    #[test]
    fn a_node_sets_only_kubelet_labels_on_itself() {
        for allowed in [
            "kubernetes.io/hostname",
            "kubernetes.io/arch",
            "kubernetes.io/os",
            "beta.kubernetes.io/os",
            "beta.kubernetes.io/instance-type",
            "topology.kubernetes.io/zone",
            "topology.kubernetes.io/region",
            "node.kubernetes.io/instance-type",
            "node.kubernetes.io/anything",
            "kubelet.kubernetes.io/x",
            "sub.node.kubernetes.io/y",
            "skiff.dev/wasm",
            "example.com/team",
            "plain",
        ] {
            assert!(node_may_set_label(allowed), "{allowed}");
        }
        for refused in [
            "node-restriction.kubernetes.io/x",
            "a.node-restriction.kubernetes.io/x",
            "node-role.kubernetes.io/master",
            "kubernetes.io/other",
            "k8s.io/x",
            "foo.k8s.io/x",
            "example.kubernetes.io/x",
        ] {
            assert!(!node_may_set_label(refused), "{refused}");
        }
        // Not fooled by a look-alike domain.
        assert!(node_may_set_label("evilkubernetes.io/x"));
    }

    #[test]
    fn node_restriction_refuses_label_and_taint_changes() {
        let none = serde_json::Value::Null;
        let base = node_obj(
            &[
                ("kubernetes.io/hostname", "n1"),
                ("node-restriction.kubernetes.io/pool", "a"),
            ],
            none.clone(),
        );
        // Unchanged restricted labels and allowed changes pass.
        let ok = node_obj(
            &[
                ("kubernetes.io/hostname", "n1"),
                ("node-restriction.kubernetes.io/pool", "a"),
                ("team", "x"),
            ],
            none.clone(),
        );
        admit_node_write("n1", Some(&base), &ok).unwrap();
        // Adding, changing and removing a restricted label are refused.
        for next in [
            node_obj(
                &[
                    ("kubernetes.io/hostname", "n1"),
                    ("node-restriction.kubernetes.io/pool", "a"),
                    ("node-restriction.kubernetes.io/x", "1"),
                ],
                none.clone(),
            ),
            node_obj(
                &[
                    ("kubernetes.io/hostname", "n1"),
                    ("node-restriction.kubernetes.io/pool", "b"),
                ],
                none.clone(),
            ),
            node_obj(&[("kubernetes.io/hostname", "n1")], none.clone()),
        ] {
            let e = admit_node_write("n1", Some(&base), &next).unwrap_err();
            assert_eq!(e.code, 403);
            assert!(e.message.starts_with("nodes \"n1\" is forbidden: is not allowed to modify labels: node-restriction.kubernetes.io/"), "{}", e.message);
        }
        // Two at once, listed sorted (removing kubernetes.io/hostname is the kubelet's right).
        let two = node_obj(
            &[
                ("node-role.kubernetes.io/master", ""),
                ("k8s.io/a", "1"),
                ("node-restriction.kubernetes.io/pool", "a"),
            ],
            none.clone(),
        );
        let e = admit_node_write("n1", Some(&base), &two).unwrap_err();
        assert_eq!(e.message, "nodes \"n1\" is forbidden: is not allowed to modify labels: k8s.io/a, node-role.kubernetes.io/master");
        // On create: the same labels refused, with the create message; taints allowed.
        let created = node_obj(
            &[("node-restriction.kubernetes.io/x", "1")],
            serde_json::json!([{"key": "k", "effect": "NoSchedule"}]),
        );
        let e = admit_node_write("n1", None, &created).unwrap_err();
        assert_eq!(e.message, "nodes \"n1\" is forbidden: node \"n1\" is not allowed to set the following labels: node-restriction.kubernetes.io/x");
        let tainted = node_obj(
            &[("kubernetes.io/hostname", "n1")],
            serde_json::json!([{"key": "k", "effect": "NoSchedule"}]),
        );
        admit_node_write("n1", None, &tainted).unwrap();
        // After creation taints are not the node's to change: not added, not removed.
        let e = admit_node_write(
            "n1",
            Some(&tainted),
            &node_obj(&[("kubernetes.io/hostname", "n1")], none.clone()),
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "nodes \"n1\" is forbidden: node \"n1\" is not allowed to modify taints"
        );
        assert!(admit_node_write("n1", Some(&ok), &tainted).is_err());
        admit_node_write("n1", Some(&tainted), &tainted).unwrap();
    }
}
