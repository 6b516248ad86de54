//! ServiceAccount tokens, as Kubernetes issues and checks them.
//!
//! [`TokenKey`] is the signing key (ECDSA P-256, `DATA/sa.key`, 0600), made on first start.
//! [`TokenIssuer`] signs TokenRequest's JWTs (ES256) with Kubernetes' claims — `iss`, `sub`
//! `system:serviceaccount:NS:NAME`, `aud`, `exp`, `iat`, `nbf`, `jti` and the
//! `kubernetes.io` claim naming the namespace, the ServiceAccount and the Pod, Secret or Node
//! the token is bound to — and authenticates them: signature, time, audience, and the
//! ServiceAccount (and the bound object) still there with the uid the token names, so
//! deleting either revokes the token. A requested lifetime beyond
//! `--service-account-max-token-expiration` is shortened to it.
//! It also answers TokenReview and publishes its public key (`/openid/v1/jwks`, with
//! `/.well-known/openid-configuration` pointing at it).
//!
//! [`admit_pod`] is the ServiceAccount admission of pods: `serviceAccountName` defaults to
//! `default`, and a pod naming a ServiceAccount that does not exist is refused.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use k8s_openapi::api::authentication::v1::{
    TokenRequest, TokenRequestStatus, TokenReview, TokenReviewStatus, UserInfo as ReviewUser,
};
use k8s_openapi::api::core::v1::{Node, Pod, Secret, ServiceAccount};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use skiff_api::validation::typed;
use skiff_api::{ApiError, Resource};

use super::auth::{UserInfo, AUTHENTICATED};
use super::rbac::{service_account_groups, SERVICE_ACCOUNT_PREFIX};
pub use crate::controllers::serviceaccounts::DEFAULT_SERVICE_ACCOUNT;
use crate::registry::Registry;

/// The issuer (and default audience) of the tokens, as a kube-apiserver's default.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// A token's lifetime when the request names none (`expirationSeconds`), as Kubernetes.
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// The shortest lifetime a TokenRequest may ask for.
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
/// The longest (Kubernetes caps at 2^32 seconds).
pub const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;
/// Where the public keys are published, and the OpenID discovery document pointing there.
pub const JWKS_PATH: &str = "/openid/v1/jwks";
pub const OPENID_CONFIGURATION_PATH: &str = "/.well-known/openid-configuration";
/// Where the key lives in the data dir.
const KEY_FILE: &str = "sa.key";

/// Errors loading or making the signing key.
#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("service account key: {0}")]
    Key(#[from] rcgen::Error),
}

/// The service account signing key: ECDSA P-256.
pub struct TokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// The key ID: base64url of the SHA-256 of the public key's DER, as Kubernetes derives it.
    kid: String,
    /// The public point's coordinates, base64url (the JWK's `x`, `y`).
    x: String,
    y: String,
}

impl TokenKey {
    /// Loads `dir/sa.key`, or makes one there (0600).
    pub fn load_or_create(dir: &Path) -> Result<TokenKey, TokenKeyError> {
        let path = dir.join(KEY_FILE);
        let io = |source| TokenKeyError::Io {
            path: path.display().to_string(),
            source,
        };
        let pair = match std::fs::read_to_string(&path) {
            Ok(pem) => rcgen::KeyPair::from_pem(&pem)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                crate::server::write_private(&path, k.serialize_pem().as_bytes()).map_err(io)?;
                k
            }
            Err(e) => return Err(io(e)),
        };
        Ok(TokenKey::from_pair(&pair))
    }

    fn from_pair(pair: &rcgen::KeyPair) -> TokenKey {
        use rcgen::PublicKeyData;
        use sha2::Digest;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        // An uncompressed point: 0x04 || X || Y.
        let raw = pair.public_key_raw();
        let (x, y) = raw[1..].split_at((raw.len() - 1) / 2);
        let (x, y) = (b64(x), b64(y));
        TokenKey {
            encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            decoding: DecodingKey::from_ec_components(&x, &y).expect("a P-256 public key"),
            kid: b64(&sha2::Sha256::digest(pair.subject_public_key_info())),
            x,
            y,
        }
    }

    /// The JSON Web Key Set of the public key (`/openid/v1/jwks`).
    pub fn jwks(&self) -> Value {
        json!({"keys": [{"use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256",
                         "alg": "ES256", "x": self.x, "y": self.y}]})
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> Result<String, ApiError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| ApiError::internal(format!("signing a token: {e}")))
    }
}

/// A name and uid, as the `kubernetes.io` claim holds objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub name: String,
    pub uid: String,
}

/// The `kubernetes.io` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaim {
    pub namespace: String,
    pub serviceaccount: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<ObjectRef>,
}

/// The claims of a ServiceAccount token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaim,
}

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenUser {
    pub user: UserInfo,
    /// The ServiceAccount's uid.
    pub uid: String,
    /// The bound pod, if any (the `authentication.kubernetes.io/pod-name`/`pod-uid` extras).
    pub pod: Option<ObjectRef>,
    /// The bound node, if any (the `authentication.kubernetes.io/node-name`/`node-uid` extras).
    pub node: Option<ObjectRef>,
    /// The token's ID (the `authentication.kubernetes.io/credential-id` extra).
    pub jti: String,
}

/// Whether a bearer token looks like a JWT (three base64url parts, a JSON header).
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

/// Issues and checks ServiceAccount tokens.
pub struct TokenIssuer {
    pub key: Arc<TokenKey>,
    pub issuer: String,
    /// The API server's audiences: a token must name one of them to be accepted as a
    /// credential (`--api-audiences`, by default the issuer).
    pub api_audiences: Vec<String>,
    /// The longest lifetime a TokenRequest gets; a longer one asked for is shortened
    /// (`--service-account-max-token-expiration`; None: only Kubernetes' 2^32 s bound).
    pub max_expiration_seconds: Option<i64>,
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    let mut e = ApiError::unauthorized();
    e.message = message.into();
    e
}

impl TokenIssuer {
    pub fn new(key: Arc<TokenKey>) -> TokenIssuer {
        TokenIssuer {
            key,
            issuer: ISSUER.into(),
            api_audiences: vec![ISSUER.into()],
            max_expiration_seconds: None,
        }
    }

    /// The OpenID discovery document (`/.well-known/openid-configuration`) of an API server
    /// reached at `advertise`.
    pub fn openid_configuration(&self, advertise: &str) -> Value {
        json!({
            "issuer": self.issuer,
            "jwks_uri": format!("https://{advertise}{JWKS_PATH}"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    }

    /// Who `token` speaks for, when it is a valid token for one of `audiences`: signed by this
    /// issuer's key, within its times, and its ServiceAccount (and bound Pod) still there with
    /// the uids it names. Any failure is a 401 whose message says why (the API answers only
    /// `Unauthorized`; TokenReview says more).
    pub fn authenticate(
        &self,
        registry: &Registry,
        token: &str,
        audiences: &[String],
    ) -> Result<TokenUser, ApiError> {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(audiences);
        v.validate_nbf = true;
        v.leeway = 0;
        v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.key.decoding, &v)
            .map_err(|e| unauthorized(format!("invalid bearer token: {e}")))?;
        let c = data.claims;
        let k = &c.kubernetes;
        let want_sub = format!(
            "{SERVICE_ACCOUNT_PREFIX}{}:{}",
            k.namespace, k.serviceaccount.name
        );
        if c.sub != want_sub {
            return Err(unauthorized("invalid bearer token: subject mismatch"));
        }
        let sa = get::<ServiceAccount>(registry, &k.namespace, &k.serviceaccount.name)?
            .filter(|sa| sa.metadata.deletion_timestamp.is_none())
            .ok_or_else(|| {
                unauthorized(format!(
                    "service account {}/{} has been deleted",
                    k.namespace, k.serviceaccount.name
                ))
            })?;
        if sa.metadata.uid.as_deref() != Some(k.serviceaccount.uid.as_str()) {
            return Err(unauthorized(format!(
                "service account UID ({}) does not match claim ({})",
                sa.metadata.uid.as_deref().unwrap_or(""),
                k.serviceaccount.uid
            )));
        }
        // The bound object, if any, must still be there with the uid the token names.
        let bound = |kind: &str, what: &str, r: &ObjectRef, found: Option<Option<String>>| {
            let Some(uid) = found else {
                return Err(unauthorized(format!("{kind} {what} has been deleted")));
            };
            if uid.as_deref() != Some(r.uid.as_str()) {
                return Err(unauthorized(format!(
                    "{kind} UID ({}) does not match claim ({})",
                    uid.as_deref().unwrap_or(""),
                    r.uid
                )));
            }
            Ok(())
        };
        if let Some(p) = &k.pod {
            let found = get::<Pod>(registry, &k.namespace, &p.name)?.map(|o| o.metadata.uid);
            bound("pod", &format!("{}/{}", k.namespace, p.name), p, found)?;
        }
        if let Some(s) = &k.secret {
            let found = get::<Secret>(registry, &k.namespace, &s.name)?.map(|o| o.metadata.uid);
            bound("secret", &format!("{}/{}", k.namespace, s.name), s, found)?;
        }
        if let Some(n) = &k.node {
            let found = get_node(registry, &n.name)?.map(|o| o.metadata.uid);
            bound("node", &n.name, n, found)?;
        }
        let mut groups = service_account_groups(&c.sub);
        groups.push(AUTHENTICATED.into());
        Ok(TokenUser {
            user: UserInfo {
                name: c.sub,
                groups,
                ..Default::default()
            },
            uid: k.serviceaccount.uid.clone(),
            pod: k.pod.clone(),
            node: k.node.clone(),
            jti: c.jti,
        })
    }

    /// Answers a TokenRequest (`POST .../serviceaccounts/NAME/token`) by `user`: a token for
    /// the ServiceAccount `ns/name`, bound to a Pod, a Secret or a Node when the request says
    /// so. A node may ask only for tokens bound to pods bound to it (NodeRestriction).
    pub fn request(
        &self,
        registry: &Registry,
        user: &UserInfo,
        ns: &str,
        name: &str,
        body: &Value,
    ) -> Result<Value, ApiError> {
        let mut req: TokenRequest = typed(body)?;
        let spec = req.spec.get_or_insert_with(Default::default);
        let sa = get::<ServiceAccount>(registry, ns, name)?
            .filter(|sa| sa.metadata.deletion_timestamp.is_none())
            .ok_or_else(|| ApiError::not_found("serviceaccounts", name))?;
        let invalid = |field: &str, value: String, why: &str| {
            ApiError::invalid(
                "TokenRequest",
                name,
                vec![skiff_api::Cause::invalid(field, value, why)],
            )
        };
        let mut seconds = spec
            .expiration_seconds
            .unwrap_or(DEFAULT_EXPIRATION_SECONDS);
        if seconds < MIN_EXPIRATION_SECONDS {
            return Err(invalid(
                "spec.expirationSeconds",
                seconds.to_string(),
                "may not specify a duration less than 10 minutes",
            ));
        }
        if seconds > MAX_EXPIRATION_SECONDS {
            return Err(invalid(
                "spec.expirationSeconds",
                seconds.to_string(),
                "may not specify a duration larger than 2^32 seconds",
            ));
        }
        if let Some(max) = self.max_expiration_seconds.filter(|m| *m > 0) {
            // As Kubernetes: shortened, not refused.
            seconds = seconds.min(max);
        }
        let (mut pod_ref, mut secret_ref, mut node_ref) = (None, None, None);
        if let Some(b) = &spec.bound_object_ref {
            let kind = b.kind.as_deref().unwrap_or("");
            let bname = b.name.as_deref().unwrap_or("");
            let api_version = b.api_version.as_deref().unwrap_or("v1");
            if user.node_name().is_some() && kind != "Pod" {
                return Err(node_forbidden(
                    name,
                    "node requested token not bound to a pod",
                ));
            }
            let (uid, plural) = match (api_version, kind) {
                ("v1", "Pod") => {
                    let pod = get::<Pod>(registry, ns, bname)?
                        .ok_or_else(|| ApiError::not_found("pods", bname))?;
                    let pod_sa = pod_service_account(&pod);
                    if pod_sa != name {
                        return Err(ApiError::bad_request(format!(
                            "cannot bind token for serviceaccount \"{name}\" to pod running with different serviceaccount name."
                        )));
                    }
                    if let Some(node) = user.node_name() {
                        let on = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
                        if on != Some(node) {
                            return Err(node_forbidden(
                                name,
                                &format!("node requested token bound to a pod scheduled on a different node ({})", on.unwrap_or("")),
                            ));
                        }
                    }
                    (pod.metadata.uid.unwrap_or_default(), "pods")
                }
                ("v1", "Secret") => {
                    let secret = get::<Secret>(registry, ns, bname)?
                        .ok_or_else(|| ApiError::not_found("secrets", bname))?;
                    (secret.metadata.uid.unwrap_or_default(), "secrets")
                }
                ("v1", "Node") => {
                    let node = get_node(registry, bname)?
                        .ok_or_else(|| ApiError::not_found("nodes", bname))?;
                    (node.metadata.uid.unwrap_or_default(), "nodes")
                }
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "cannot bind token to object of type {api_version}, Kind={kind}"
                    )))
                }
            };
            if b.uid.as_deref().is_some_and(|u| !u.is_empty() && u != uid) {
                return Err(ApiError::conflict(
                    plural,
                    bname,
                    &format!(
                        "the UID in the bound object reference ({}) does not match the UID in record ({uid}). The object might have been deleted and then recreated",
                        b.uid.as_deref().unwrap_or("")
                    ),
                ));
            }
            let r = Some(ObjectRef {
                name: bname.to_string(),
                uid,
            });
            match kind {
                "Pod" => pod_ref = r,
                "Secret" => secret_ref = r,
                _ => node_ref = r,
            }
        } else if user.node_name().is_some() {
            return Err(node_forbidden(
                name,
                "node requested token not bound to a pod",
            ));
        }
        let audiences = spec
            .audiences
            .clone()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| self.api_audiences.clone());
        let now = chrono::Utc::now();
        let exp = now + chrono::Duration::seconds(seconds);
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: format!("{SERVICE_ACCOUNT_PREFIX}{ns}:{name}"),
            aud: audiences.clone(),
            exp: exp.timestamp(),
            iat: now.timestamp(),
            nbf: now.timestamp(),
            jti: uuid::Uuid::new_v4().to_string(),
            kubernetes: KubernetesClaim {
                namespace: ns.to_string(),
                serviceaccount: ObjectRef {
                    name: name.to_string(),
                    uid: sa.metadata.uid.clone().unwrap_or_default(),
                },
                pod: pod_ref,
                node: node_ref,
                secret: secret_ref,
            },
        };
        let token = self.key.sign(&claims)?;
        req.metadata.name = Some(name.to_string());
        req.metadata.namespace = Some(ns.to_string());
        req.metadata.creation_timestamp = Some(time_of(now.timestamp()));
        spec.audiences = Some(audiences);
        spec.expiration_seconds = Some(seconds);
        req.status = Some(TokenRequestStatus {
            token: Some(token),
            expiration_timestamp: Some(time_of(exp.timestamp())),
        });
        let mut out = serde_json::to_value(&req)
            .map_err(|e| ApiError::internal(format!("encoding a token request: {e}")))?;
        out["apiVersion"] = json!("authentication.k8s.io/v1");
        out["kind"] = json!("TokenRequest");
        Ok(out)
    }

    /// Answers a TokenReview: whether `spec.token` is valid for `spec.audiences` (by default
    /// the API's), and whom it names.
    pub fn review(&self, registry: &Registry, body: &Value) -> Result<Value, ApiError> {
        let mut review: TokenReview = typed(body)?;
        let token = review.spec.token.clone();
        let wanted = review
            .spec
            .audiences
            .clone()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| self.api_audiences.clone());
        let status = if !looks_like_jwt(&token) {
            TokenReviewStatus {
                authenticated: Some(false),
                error: Some("invalid bearer token".into()),
                ..Default::default()
            }
        } else {
            match self.authenticate(registry, &token, &wanted) {
                Ok(t) => {
                    let mut extra = std::collections::BTreeMap::new();
                    extra.insert(
                        "authentication.kubernetes.io/credential-id".to_string(),
                        vec![format!("JTI={}", t.jti)],
                    );
                    for (what, r) in [("pod", &t.pod), ("node", &t.node)] {
                        if let Some(r) = r {
                            extra.insert(
                                format!("authentication.kubernetes.io/{what}-name"),
                                vec![r.name.clone()],
                            );
                            extra.insert(
                                format!("authentication.kubernetes.io/{what}-uid"),
                                vec![r.uid.clone()],
                            );
                        }
                    }
                    TokenReviewStatus {
                        authenticated: Some(true),
                        audiences: Some(wanted),
                        user: Some(ReviewUser {
                            username: Some(t.user.name),
                            uid: Some(t.uid),
                            groups: Some(t.user.groups),
                            extra: Some(extra),
                        }),
                        error: None,
                    }
                }
                Err(e) => TokenReviewStatus {
                    authenticated: Some(false),
                    error: Some(e.message),
                    ..Default::default()
                },
            }
        };
        review.status = Some(status);
        let mut out = serde_json::to_value(&review)
            .map_err(|e| ApiError::internal(format!("encoding a token review: {e}")))?;
        out["apiVersion"] = json!("authentication.k8s.io/v1");
        out["kind"] = json!("TokenReview");
        Ok(out)
    }
}

fn time_of(secs: i64) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    use k8s_openapi::jiff::Timestamp;
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

fn node_forbidden(name: &str, why: &str) -> ApiError {
    let mut e = ApiError::unauthorized();
    e.code = 403;
    e.reason = "Forbidden";
    e.message = format!("serviceaccounts \"{name}\" is forbidden: {why}");
    e
}

fn get<K: serde::de::DeserializeOwned + k8s_openapi::Resource>(
    registry: &Registry,
    ns: &str,
    name: &str,
) -> Result<Option<K>, ApiError> {
    let r = Resource::lookup(K::URL_PATH_SEGMENT).expect("a served resource");
    registry
        .try_get(r, Some(ns), name)?
        .map(|v| {
            serde_json::from_value(v)
                .map_err(|e| ApiError::internal(format!("decode {}: {e}", K::KIND)))
        })
        .transpose()
}

/// A Node by name (cluster-scoped), if it exists.
fn get_node(registry: &Registry, name: &str) -> Result<Option<Node>, ApiError> {
    let r = Resource::lookup("nodes").expect("nodes");
    registry
        .try_get(r, None, name)?
        .map(|v| {
            serde_json::from_value(v).map_err(|e| ApiError::internal(format!("decode Node: {e}")))
        })
        .transpose()
}

pub use skiff_api::pod_service_account;

/// The ServiceAccount admission of a new pod (`obj`, in namespace `ns`): `serviceAccountName`
/// (and its deprecated twin `serviceAccount`) default to `default`, and a pod naming a
/// ServiceAccount that does not exist is refused with Kubernetes' 403. The `default`
/// ServiceAccount is not required to exist yet: its controller makes it as the namespace
/// appears, and a pod's token is asked for only when the pod starts.
pub fn admit_pod(registry: &Registry, ns: &str, obj: &mut Value) -> Result<(), ApiError> {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    let named = |k: &str| {
        spec.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(String::from)
    };
    let sa = named("serviceAccountName")
        .or_else(|| named("serviceAccount"))
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string());
    spec.insert("serviceAccountName".into(), json!(sa));
    spec.insert("serviceAccount".into(), json!(sa));
    if sa == DEFAULT_SERVICE_ACCOUNT {
        return Ok(());
    }
    if get::<ServiceAccount>(registry, ns, &sa)?.is_none() {
        let mut e = ApiError::unauthorized();
        e.code = 403;
        e.reason = "Forbidden";
        e.message = format!(
            "pods \"{}\" is forbidden: error looking up service account {ns}/{sa}: serviceaccount \"{sa}\" not found",
            skiff_api::meta::name(obj)
        );
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ClusterConfig, WriteOptions};
    use crate::store::sqlite::SqliteStore;

    fn registry(dir: &Path) -> Arc<Registry> {
        let store = Arc::new(SqliteStore::open(&dir.join("store")).unwrap());
        let reg = Registry::new(store, ClusterConfig::default());
        crate::server::bootstrap(&reg, "127.0.0.1:6443".parse().unwrap()).unwrap();
        reg
    }

    fn create(reg: &Registry, plural: &str, obj: Value) -> Value {
        let r = Resource::lookup(plural).unwrap();
        reg.create(r, Some("default"), obj, &WriteOptions::default())
            .unwrap()
    }

    fn admin() -> UserInfo {
        UserInfo {
            name: "system:admin".into(),
            groups: vec!["system:masters".into()],
            ..Default::default()
        }
    }

    fn token_of(answer: &Value) -> String {
        answer["status"]["token"].as_str().unwrap().to_string()
    }

    #[test]
    fn a_token_names_its_service_account_until_it_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let key = Arc::new(TokenKey::load_or_create(dir.path()).unwrap());
        let issuer = TokenIssuer::new(key.clone());
        let sa = create(
            &reg,
            "serviceaccounts",
            json!({"metadata": {"name": "bot"}}),
        );
        let answer = issuer
            .request(&reg, &admin(), "default", "bot", &json!({"spec": {}}))
            .unwrap();
        assert_eq!(answer["kind"], "TokenRequest");
        assert_eq!(answer["spec"]["expirationSeconds"], 3600);
        let token = token_of(&answer);
        let aud = issuer.api_audiences.clone();
        let who = issuer.authenticate(&reg, &token, &aud).unwrap();
        assert_eq!(who.user.name, "system:serviceaccount:default:bot");
        assert_eq!(
            who.user.groups,
            vec![
                "system:serviceaccounts",
                "system:serviceaccounts:default",
                "system:authenticated"
            ]
        );
        assert_eq!(who.uid, sa["metadata"]["uid"].as_str().unwrap());
        // The claims are Kubernetes'.
        let payload = token.split('.').nth(1).unwrap();
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["iss"], ISSUER);
        assert_eq!(claims["aud"], json!([ISSUER]));
        assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "bot");
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            3600
        );
        // Another audience is not the API's.
        let other = issuer
            .request(
                &reg,
                &admin(),
                "default",
                "bot",
                &json!({"spec": {"audiences": ["vault"]}}),
            )
            .unwrap();
        assert_eq!(
            issuer
                .authenticate(&reg, &token_of(&other), &aud)
                .unwrap_err()
                .code,
            401
        );
        issuer
            .authenticate(&reg, &token_of(&other), &["vault".to_string()])
            .unwrap();
        // A key loaded again is the same key.
        let again = TokenIssuer::new(Arc::new(TokenKey::load_or_create(dir.path()).unwrap()));
        again.authenticate(&reg, &token, &aud).unwrap();
        // Another key's signature, a changed payload, an expired token: 401.
        let other_dir = tempfile::tempdir().unwrap();
        let forger = TokenKey::load_or_create(other_dir.path()).unwrap();
        let mut claims: Claims = serde_json::from_value(claims).unwrap();
        let forged = forger.sign(&claims).unwrap();
        assert_eq!(
            issuer.authenticate(&reg, &forged, &aud).unwrap_err().code,
            401
        );
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        claims.sub = "system:serviceaccount:kube-system:default".into();
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&claims).unwrap());
        assert_eq!(
            issuer
                .authenticate(&reg, &parts.join("."), &aud)
                .unwrap_err()
                .code,
            401
        );
        claims.sub = "system:serviceaccount:default:bot".into();
        claims.exp = chrono::Utc::now().timestamp() - 1;
        let expired = key.sign(&claims).unwrap();
        let e = issuer.authenticate(&reg, &expired, &aud).unwrap_err();
        assert!(e.message.contains("Expired"), "{}", e.message);
        // Deleting the ServiceAccount revokes the token; one of the same name does not
        // bring it back.
        let sas = Resource::lookup("serviceaccounts").unwrap();
        reg.delete(sas, Some("default"), "bot", &Default::default())
            .unwrap();
        let e = issuer.authenticate(&reg, &token, &aud).unwrap_err();
        assert!(e.message.contains("deleted"), "{}", e.message);
        create(
            &reg,
            "serviceaccounts",
            json!({"metadata": {"name": "bot"}}),
        );
        let e = issuer.authenticate(&reg, &token, &aud).unwrap_err();
        assert!(e.message.contains("does not match"), "{}", e.message);
    }

    #[test]
    fn pod_bound_tokens_end_with_their_pod_and_nodes_get_only_their_pods_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let issuer = TokenIssuer::new(Arc::new(TokenKey::load_or_create(dir.path()).unwrap()));
        create(
            &reg,
            "serviceaccounts",
            json!({"metadata": {"name": "default"}}),
        );
        create(
            &reg,
            "pods",
            json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]}}),
        );
        let bound =
            json!({"spec": {"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p"}}});
        let node = |n: &str| UserInfo {
            name: format!("system:node:{n}"),
            groups: vec![super::super::auth::NODES.into()],
            ..Default::default()
        };
        let answer = issuer
            .request(&reg, &node("n1"), "default", "default", &bound)
            .unwrap();
        let aud = issuer.api_audiences.clone();
        let who = issuer.authenticate(&reg, &token_of(&answer), &aud).unwrap();
        assert_eq!(who.pod.as_ref().unwrap().name, "p");
        let e = issuer
            .request(&reg, &node("n2"), "default", "default", &bound)
            .unwrap_err();
        assert_eq!(e.code, 403, "{}", e.message);
        let e = issuer
            .request(
                &reg,
                &node("n1"),
                "default",
                "default",
                &json!({"spec": {}}),
            )
            .unwrap_err();
        assert_eq!(e.code, 403, "{}", e.message);
        // A pod of another ServiceAccount cannot carry this one's token.
        create(&reg, "serviceaccounts", json!({"metadata": {"name": "x"}}));
        assert_eq!(
            issuer
                .request(&reg, &admin(), "default", "x", &bound)
                .unwrap_err()
                .code,
            400
        );
        // Too short a lifetime is refused.
        let e = issuer
            .request(
                &reg,
                &admin(),
                "default",
                "x",
                &json!({"spec": {"expirationSeconds": 60}}),
            )
            .unwrap_err();
        assert_eq!(e.code, 422);
        // Deleting the pod revokes the token.
        let pods = Resource::lookup("pods").unwrap();
        reg.delete(
            pods,
            Some("default"),
            "p",
            &crate::registry::DeleteOptions {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        let e = issuer
            .authenticate(&reg, &token_of(&answer), &aud)
            .unwrap_err();
        assert!(e.message.contains("pod"), "{}", e.message);
        // TokenReview says so, and says who a good token is.
        let review = issuer
            .review(&reg, &json!({"spec": {"token": token_of(&answer)}}))
            .unwrap();
        assert_eq!(review["status"]["authenticated"], false);
        let good = issuer
            .request(&reg, &admin(), "default", "x", &json!({"spec": {}}))
            .unwrap();
        let review = issuer
            .review(&reg, &json!({"spec": {"token": token_of(&good)}}))
            .unwrap();
        assert_eq!(review["status"]["authenticated"], true);
        assert_eq!(
            review["status"]["user"]["username"],
            "system:serviceaccount:default:x"
        );
        let review = issuer
            .review(&reg, &json!({"spec": {"token": "nonsense"}}))
            .unwrap();
        assert_eq!(review["status"]["authenticated"], false);
    }

    /// Tokens bound to a Secret or a Node end with it; other kinds are refused; a lifetime
    /// beyond the server's maximum is shortened to it.
    #[test]
    fn secret_and_node_bound_tokens_end_with_their_object_and_lifetimes_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let mut issuer = TokenIssuer::new(Arc::new(TokenKey::load_or_create(dir.path()).unwrap()));
        issuer.max_expiration_seconds = Some(7200);
        create(
            &reg,
            "serviceaccounts",
            json!({"metadata": {"name": "bot"}}),
        );
        let secret = create(&reg, "secrets", json!({"metadata": {"name": "s"}}));
        let nodes = Resource::lookup("nodes").unwrap();
        let node = reg
            .create(
                nodes,
                None,
                json!({"metadata": {"name": "n1"}}),
                &WriteOptions::default(),
            )
            .unwrap();
        let aud = issuer.api_audiences.clone();
        let ask = |kind: &str, name: &str, uid: Option<&str>, seconds: i64| {
            issuer.request(
                &reg,
                &admin(),
                "default",
                "bot",
                &json!({"spec": {"expirationSeconds": seconds,
                    "boundObjectRef": {"kind": kind, "apiVersion": "v1", "name": name, "uid": uid}}}),
            )
        };
        let to_secret = ask("Secret", "s", secret["metadata"]["uid"].as_str(), 3600).unwrap();
        assert_eq!(to_secret["spec"]["expirationSeconds"], 3600);
        let to_node = ask("Node", "n1", node["metadata"]["uid"].as_str(), 86400).unwrap();
        assert_eq!(
            to_node["spec"]["expirationSeconds"], 7200,
            "shortened to the maximum"
        );
        issuer
            .authenticate(&reg, &token_of(&to_secret), &aud)
            .unwrap();
        let who = issuer
            .authenticate(&reg, &token_of(&to_node), &aud)
            .unwrap();
        assert_eq!(who.node.as_ref().unwrap().name, "n1");
        let review = issuer
            .review(&reg, &json!({"spec": {"token": token_of(&to_node)}}))
            .unwrap();
        assert_eq!(
            review["status"]["user"]["extra"]["authentication.kubernetes.io/node-name"],
            json!(["n1"])
        );
        // A wrong uid, an unknown kind.
        assert_eq!(
            ask("Secret", "s", Some("other"), 3600).unwrap_err().code,
            409
        );
        assert_eq!(ask("ConfigMap", "c", None, 3600).unwrap_err().code, 400);
        assert_eq!(ask("Secret", "missing", None, 3600).unwrap_err().code, 404);
        // Deleting the object revokes its tokens.
        let secrets = Resource::lookup("secrets").unwrap();
        reg.delete(secrets, Some("default"), "s", &Default::default())
            .unwrap();
        let e = issuer
            .authenticate(&reg, &token_of(&to_secret), &aud)
            .unwrap_err();
        assert!(
            e.message.contains("secret default/s has been deleted"),
            "{}",
            e.message
        );
        reg.delete(nodes, None, "n1", &Default::default()).unwrap();
        let e = issuer
            .authenticate(&reg, &token_of(&to_node), &aud)
            .unwrap_err();
        assert!(
            e.message.contains("node n1 has been deleted"),
            "{}",
            e.message
        );
    }

    #[test]
    fn pods_run_as_default_unless_they_name_an_existing_service_account() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let pod = |sa: Option<&str>| {
            let mut p = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
            if let Some(sa) = sa {
                p["spec"]["serviceAccountName"] = json!(sa);
            }
            p
        };
        let mut p = pod(None);
        admit_pod(&reg, "default", &mut p).unwrap();
        assert_eq!(p["spec"]["serviceAccountName"], "default");
        assert_eq!(p["spec"]["serviceAccount"], "default");
        let e = admit_pod(&reg, "default", &mut pod(Some("ghost"))).unwrap_err();
        assert_eq!(e.code, 403);
        assert!(
            e.message
                .contains("error looking up service account default/ghost"),
            "{}",
            e.message
        );
        create(
            &reg,
            "serviceaccounts",
            json!({"metadata": {"name": "ghost"}}),
        );
        admit_pod(&reg, "default", &mut pod(Some("ghost"))).unwrap();
        // Through the registry.
        let created = create(&reg, "pods", pod(None));
        assert_eq!(created["spec"]["serviceAccountName"], "default");
    }
}
