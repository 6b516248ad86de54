//! A pod's ServiceAccount token, as the kubelet projects it: unless the pod (or its
//! ServiceAccount) says `automountServiceAccountToken: false`, the agent asks for a token
//! bound to the pod (TokenRequest), writes `token` (0600), `ca.crt` and `namespace` (0644)
//! into the pod's `serviceaccount` directory, and every container sees that directory
//! read-only at [`MOUNT_PATH`] — bind-mounted into OCI containers, preopened for wasm ones.
//! The token is asked for again at 80% of its lifetime; each file is replaced by a rename, so
//! a reader never sees half a token. Containers also get the API Service's variables
//! (`KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`, ...): with the files, what
//! in-cluster clients need.
//!
//! The ServiceAccount's `automountServiceAccountToken` and the API Service are read through
//! the node's [`ApiFacts`], which keeps each for a few seconds: a wave of pod starts costs
//! the API one read of each, not one per pod, and each pod start only its TokenRequest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Pod, Service, ServiceAccount};
use skiff_api::pod_service_account as service_account;
use skiff_client::Client;

use super::{name_of, ns_of, uid_of, Shared};

/// Where containers find the token, the cluster CA and their namespace.
pub const MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The lifetime asked for (the kubelet's default).
const LIFETIME_SECONDS: i64 = 3600;
/// How soon a failed refresh is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// How long a ServiceAccount's `automountServiceAccountToken` read from the API is used: a
/// change to it reaches the pods a node starts within this, as a change reaches the
/// Kubernetes API server's admission through its informer.
const AUTOMOUNT_FRESH: Duration = Duration::from_secs(5);
/// How long the API Service's variables read from the API are used (its cluster IP and
/// ports are fixed when the cluster is made).
const API_ENV_FRESH: Duration = Duration::from_secs(30);

/// What pod starts read from the API that seldom changes, shared by a node's pod workers and
/// kept for a short while. Concurrent starts that find nothing fresh wait for one read.
#[derive(Default)]
pub struct ApiFacts {
    /// (namespace, ServiceAccount) → whether its pods mount a token, and when read.
    automount: tokio::sync::Mutex<HashMap<(String, String), (Instant, bool)>>,
    /// The API Service's variables, and when read.
    api_env: tokio::sync::Mutex<Option<(Instant, Arc<Env>)>>,
}

/// Environment variables, in order.
pub(super) type Env = Vec<(String, String)>;

impl ApiFacts {
    /// Whether pods of ServiceAccount `ns/sa` mount a token when they do not say.
    async fn automount(&self, client: &Client, ns: &str, sa: &str) -> Result<bool, String> {
        let mut known = self.automount.lock().await;
        let key = (ns.to_string(), sa.to_string());
        if let Some((at, v)) = known.get(&key) {
            if at.elapsed() < AUTOMOUNT_FRESH {
                return Ok(*v);
            }
        }
        let account = client
            .get::<ServiceAccount>(Some(ns), sa)
            .await
            .map_err(|e| format!("cannot read service account {ns}/{sa}: {e}"))?;
        let v = account.automount_service_account_token != Some(false);
        let now = Instant::now();
        known.retain(|_, (at, _)| at.elapsed() < AUTOMOUNT_FRESH);
        known.insert(key, (now, v));
        Ok(v)
    }

    /// The API Service's variables ([`api_service_env`]).
    async fn api_env(&self, client: &Client) -> Result<Arc<Env>, String> {
        let mut known = self.api_env.lock().await;
        if let Some((at, v)) = known.as_ref() {
            if at.elapsed() < API_ENV_FRESH {
                return Ok(v.clone());
            }
        }
        let v = Arc::new(api_service_env(client).await?);
        *known = Some((Instant::now(), v.clone()));
        Ok(v)
    }
}

/// The pod's own say on mounting its token, if it has one.
pub fn pod_automount(pod: &Pod) -> Option<bool> {
    pod.spec
        .as_ref()
        .and_then(|s| s.automount_service_account_token)
}

/// The directory of the pod's projected token files.
pub fn dir(pod_dir: &Path) -> PathBuf {
    pod_dir.join("serviceaccount")
}

/// A token and how long it lives, in seconds.
struct Issued {
    token: String,
    lifetime: Duration,
}

/// A pod's request for a token of its ServiceAccount bound to it: all the refresh task keeps
/// of the pod.
struct TokenAsk {
    /// `ns/name` of the pod, for the log.
    pod: String,
    /// `ns/sa`, for errors.
    account: String,
    path: String,
    body: serde_json::Value,
}

impl TokenAsk {
    fn for_pod(pod: &Pod) -> Result<TokenAsk, String> {
        let (ns, sa) = (ns_of(pod), service_account(pod));
        let body = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(LIFETIME_SECONDS),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(name_of(pod).to_string()),
                    uid: Some(uid_of(pod).to_string()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(TokenAsk {
            pod: format!("{ns}/{}", name_of(pod)),
            account: format!("{ns}/{sa}"),
            path: format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"),
            body: serde_json::to_value(&body).map_err(|e| e.to_string())?,
        })
    }
}

/// Asks the API for a token.
async fn request(client: &Client, ask: &TokenAsk) -> Result<Issued, String> {
    let account = &ask.account;
    let answer = client
        .post_path(&ask.path, &ask.body)
        .await
        .map_err(|e| format!("cannot get a token for service account {account}: {e}"))?;
    let answer: TokenRequest = serde_json::from_value(answer)
        .map_err(|e| format!("the token request for service account {account} returned {e}"))?;
    let token = answer
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            format!("the token request for service account {account} returned no token")
        })?;
    let seconds = answer
        .spec
        .and_then(|s| s.expiration_seconds)
        .unwrap_or(LIFETIME_SECONDS)
        .max(1);
    Ok(Issued {
        token,
        lifetime: Duration::from_secs(seconds as u64),
    })
}

/// Replaces `dir/name` with `bytes` at `mode`, by a rename.
fn write_file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = dir.join(format!(".tmp-{name}"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

fn write_token(dir: &Path, token: &str) -> Result<(), String> {
    write_file(dir, "token", token.as_bytes(), 0o600)
        .map_err(|e| format!("cannot write the service account token: {e}"))
}

/// Whether `container` sees the pod's token: unless it mounts a volume of its own at
/// [`MOUNT_PATH`].
pub(super) fn wants_token(container: &Container) -> bool {
    !container
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.mount_path.trim_end_matches('/') == MOUNT_PATH)
}

/// The pod's token directory ([`project`]ed once per pod; tried again after a failure).
pub(super) async fn pod_dir_once(
    shared: &Shared,
    pod_dir: &Path,
) -> Result<Option<PathBuf>, String> {
    shared
        .token_dir
        .get_or_try_init(|| project(shared, pod_dir))
        .await
        .cloned()
}

/// Projects the pod's token into `pod_dir` and keeps it fresh: the directory to mount, or
/// None when the pod does not mount one. A token left by an earlier run of the agent is used
/// while the API cannot be reached (and renewed once it can).
async fn project(shared: &Shared, pod_dir: &Path) -> Result<Option<PathBuf>, String> {
    let (ctx, pod) = (&shared.ctx, &shared.pod);
    let dir = dir(pod_dir);
    let automount = match pod_automount(pod) {
        Some(a) => a,
        None => {
            let (ns, sa) = (ns_of(pod), service_account(pod));
            match ctx.api_facts.automount(&ctx.client, ns, sa).await {
                Ok(a) => a,
                // Offline with a token from before: the pod mounted one then.
                Err(_) if dir.join("token").is_file() => true,
                Err(e) => return Err(e),
            }
        }
    };
    if !automount {
        return Ok(None);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca = std::fs::read(ctx.data_dir.join("pki").join("ca.crt"))
        .map_err(|e| format!("cannot read the cluster CA: {e}"))?;
    let namespace = ns_of(pod).as_bytes();
    write_file(&dir, "ca.crt", &ca, 0o644)
        .and_then(|_| write_file(&dir, "namespace", namespace, 0o644))
        .map_err(|e| format!("cannot write the service account files: {e}"))?;
    let ask = TokenAsk::for_pod(pod)?;
    let first = match request(&ctx.client, &ask).await {
        Ok(issued) => {
            write_token(&dir, &issued.token)?;
            issued.lifetime.mul_f64(0.8)
        }
        Err(_) if dir.join("token").is_file() => RETRY,
        Err(e) => return Err(e),
    };
    let (client, refreshed) = (ctx.client.clone(), dir.clone());
    let task = tokio::spawn(async move {
        let mut wait = first;
        loop {
            tokio::time::sleep(wait).await;
            wait = match request(&client, &ask).await.and_then(|issued| {
                write_token(&refreshed, &issued.token)?;
                Ok(issued.lifetime.mul_f64(0.8))
            }) {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(pod = %ask.pod, error = %e, "service account token not refreshed");
                    RETRY
                }
            };
        }
    });
    shared.keep_token_refresh(task);
    Ok(Some(dir))
}

/// The variables the kubelet gives every container for the API's Service
/// (`default/kubernetes`), which in-cluster clients read with the token files:
/// `KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT` and the Docker-link style rest.
async fn api_service_env(client: &Client) -> Result<Vec<(String, String)>, String> {
    let svc = client
        .get::<Service>(Some("default"), "kubernetes")
        .await
        .map_err(|e| e.to_string())?;
    let spec = svc.spec.unwrap_or_default();
    let ip = spec
        .cluster_ip
        .filter(|ip| !ip.is_empty() && ip != "None")
        .ok_or("the kubernetes service has no cluster IP")?;
    let mut env = vec![("KUBERNETES_SERVICE_HOST".to_string(), ip.clone())];
    let ports = spec.ports.unwrap_or_default();
    if let Some(first) = ports.first() {
        env.push(("KUBERNETES_SERVICE_PORT".into(), first.port.to_string()));
        let proto = first.protocol.as_deref().unwrap_or("TCP");
        env.push((
            "KUBERNETES_PORT".into(),
            format!("{}://{ip}:{}", proto.to_lowercase(), first.port),
        ));
    }
    for p in &ports {
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) {
            env.push((
                format!(
                    "KUBERNETES_SERVICE_PORT_{}",
                    name.to_uppercase().replace('-', "_")
                ),
                p.port.to_string(),
            ));
        }
        let prefix = format!("KUBERNETES_PORT_{}_{}", p.port, proto.to_uppercase());
        env.push((
            prefix.clone(),
            format!("{}://{ip}:{}", proto.to_lowercase(), p.port),
        ));
        env.push((format!("{prefix}_PROTO"), proto.to_lowercase()));
        env.push((format!("{prefix}_PORT"), p.port.to_string()));
        env.push((format!("{prefix}_ADDR"), ip.clone()));
    }
    Ok(env)
}

/// `env` (the container's own) after the API Service's variables, which it overrides. The
/// variables are fixed once per pod; while the API cannot be reached they are left out.
pub(super) async fn with_api_env(
    shared: &Shared,
    env: Vec<(String, String)>,
) -> Vec<(String, String)> {
    let api = match shared
        .api_env
        .get_or_try_init(|| shared.ctx.api_facts.api_env(&shared.ctx.client))
        .await
    {
        Ok(v) => v.to_vec(),
        Err(e) => {
            tracing::debug!(pod = %name_of(&shared.pod), error = %e, "no API service variables");
            Vec::new()
        }
    };
    let mut out: Vec<(String, String)> = api
        .into_iter()
        .filter(|(k, _)| !env.iter().any(|(o, _)| o == k))
        .collect();
    out.extend(env);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn files_are_replaced_whole_with_their_modes() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        write_token(d.path(), "a").unwrap();
        write_token(d.path(), "bb").unwrap();
        write_file(d.path(), "namespace", b"team", 0o644).unwrap();
        let mode = |n: &str| {
            std::fs::metadata(d.path().join(n))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(
            std::fs::read_to_string(d.path().join("token")).unwrap(),
            "bb"
        );
        assert_eq!(mode("token"), 0o600);
        assert_eq!(mode("namespace"), 0o644);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// A wave of pod starts reads a ServiceAccount and the API Service once each; what
    /// could not be read is asked for again by the next start.
    #[tokio::test]
    async fn pod_starts_share_one_read_of_each_fact() {
        let (url, seen) = crate::fake_api::serve(|_, path| match path {
            "/api/v1/namespaces/default/serviceaccounts/quiet" => (
                200,
                json!({"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": {"name": "quiet"}, "automountServiceAccountToken": false}),
            ),
            "/api/v1/namespaces/team/serviceaccounts/default" => (
                200,
                json!({"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": {"name": "default"}}),
            ),
            "/api/v1/namespaces/default/services/kubernetes" => (
                200,
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kubernetes"},
                       "spec": {"clusterIP": "10.96.0.1",
                                "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}}),
            ),
            _ => (500, crate::fake_api::status(500)),
        })
        .await;
        let client = Client::new(&url, None, "default", None, false).unwrap();
        let facts = ApiFacts::default();
        let starts = (0..20).map(|_| facts.automount(&client, "default", "quiet"));
        let all = futures::future::join_all(starts).await;
        assert!(all.iter().all(|a| *a == Ok(false)), "{all:?}");
        assert_eq!(facts.automount(&client, "team", "default").await, Ok(true));
        let env = futures::future::join_all((0..20).map(|_| facts.api_env(&client))).await;
        let env = env[19].as_ref().unwrap();
        assert!(env.contains(&("KUBERNETES_SERVICE_HOST".into(), "10.96.0.1".into())));
        assert!(env.contains(&("KUBERNETES_SERVICE_PORT_HTTPS".into(), "443".into())));
        for _ in 0..2 {
            let e = facts.automount(&client, "default", "broken").await;
            assert!(e.unwrap_err().contains("service account default/broken"));
        }
        let seen = seen.lock().unwrap().clone();
        let paths: Vec<_> = seen.iter().map(|r| r.split(' ').nth(1).unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/api/v1/namespaces/default/serviceaccounts/quiet",
                "/api/v1/namespaces/team/serviceaccounts/default",
                "/api/v1/namespaces/default/services/kubernetes",
                "/api/v1/namespaces/default/serviceaccounts/broken",
                "/api/v1/namespaces/default/serviceaccounts/broken",
            ]
        );
    }

    #[test]
    fn pods_run_as_their_service_account_or_default() {
        let pod = |spec: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
        };
        let c = json!([{"name": "c", "image": "i"}]);
        assert_eq!(service_account(&pod(json!({"containers": c}))), "default");
        let p = pod(json!({"containers": c, "serviceAccountName": "bot",
                           "automountServiceAccountToken": false}));
        assert_eq!(service_account(&p), "bot");
        assert_eq!(pod_automount(&p), Some(false));
    }
}
