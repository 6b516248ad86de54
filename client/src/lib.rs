//! skiff-client: talks to a skiff (or any Kubernetes) API server over HTTP.
//!
//! [`Client`] is the transport (kubeconfig, bearer token, `Status` errors, watch streams);
//! [`typed`] its typed calls (`client.get::<Pod>(ns, name)`, `watch::<Service>`, …);
//! [`verbs`] builds what the kubectl-like verbs send (deployments, services, rollbacks).

pub mod balancer;
pub mod exec;
pub mod kubeconfig;
pub mod token;
pub mod typed;
pub mod verbs;

pub use typed::{DeleteParams, Event, Kind, ListParams, ObjectList, Patch};

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use skiff_api::{ApiError, Resource};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a `Status`.
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("cannot reach the API server at {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Usage(String),
}

impl ClientError {
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

/// A watch event from the server.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub kind: String,
    pub object: Value,
}

/// A client and every clone of it share one transport: [`Client::set_identity`] swaps the
/// client certificate for all of them (a node renewing its certificate while it runs), and
/// requests from then on go out with the new one. They also share the API servers they may
/// talk to ([`balancer::Servers`]): when the current one cannot be reached, a request goes to
/// the next, and every clone follows.
#[derive(Clone)]
pub struct Client {
    http: Arc<RwLock<reqwest::Client>>,
    /// What the transport is built from, kept to rebuild it with another identity.
    tls: Arc<TlsSettings>,
    servers: Arc<balancer::Servers>,
    token: Option<String>,
    /// The namespace of the current context.
    pub namespace: String,
}

/// What a client's transport trusts, apart from the identity it presents.
struct TlsSettings {
    ca_pem: Option<String>,
    insecure: bool,
}

impl TlsSettings {
    fn transport(&self, identity_pem: Option<&str>) -> Result<reqwest::Client, ClientError> {
        // The API server records the fields a write sets under this name (`skiff`).
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("skiff/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(30))
            .use_rustls_tls();
        if let Some(ca) = &self.ca_pem {
            let cert = reqwest::Certificate::from_pem(ca.as_bytes())
                .map_err(|e| ClientError::Config(format!("bad CA certificate: {e}")))?;
            b = b.add_root_certificate(cert);
        }
        if let Some(pem) = identity_pem {
            let id = reqwest::Identity::from_pem(pem.as_bytes())
                .map_err(|e| ClientError::Config(format!("bad client certificate: {e}")))?;
            b = b.identity(id);
        }
        if self.insecure {
            b = b.danger_accept_invalid_certs(true);
        }
        b.build().map_err(|e| ClientError::Config(e.to_string()))
    }
}

/// The path of a collection or object.
pub fn path(r: &Resource, ns: Option<&str>, name: Option<&str>) -> String {
    let base = if r.group.is_empty() {
        format!("/api/{}", r.version)
    } else {
        format!("/apis/{}/{}", r.group, r.version)
    };
    let mut p = base;
    if r.namespaced {
        if let Some(ns) = ns {
            p.push_str(&format!("/namespaces/{ns}"));
        }
    }
    p.push('/');
    p.push_str(r.plural);
    if let Some(n) = name {
        p.push('/');
        p.push_str(n);
    }
    p
}

pub fn encode_query(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Client {
    /// A client for `server` (one URL, or several separated by commas: the servers of one
    /// cluster, tried in turn); `ca_pem` is the CA their certificates must chain to.
    pub fn new(
        server: &str,
        token: Option<String>,
        namespace: &str,
        ca_pem: Option<&str>,
        insecure: bool,
    ) -> Result<Self, ClientError> {
        Self::build(server, token, None, namespace, ca_pem, insecure)
    }

    /// A client that authenticates with a client certificate: `identity_pem` holds the
    /// certificate and its private key (PEM).
    pub fn with_identity(
        server: &str,
        identity_pem: &str,
        namespace: &str,
        ca_pem: &str,
    ) -> Result<Self, ClientError> {
        Self::build(
            server,
            None,
            Some(identity_pem),
            namespace,
            Some(ca_pem),
            false,
        )
    }

    fn build(
        server: &str,
        token: Option<String>,
        identity_pem: Option<&str>,
        namespace: &str,
        ca_pem: Option<&str>,
        insecure: bool,
    ) -> Result<Self, ClientError> {
        let tls = TlsSettings {
            ca_pem: ca_pem.map(String::from),
            insecure,
        };
        let http = tls.transport(identity_pem)?;
        Ok(Client {
            http: Arc::new(RwLock::new(http)),
            tls: Arc::new(tls),
            servers: Arc::new(balancer::Servers::parse(server)?),
            token,
            namespace: namespace.to_string(),
        })
    }

    /// Authenticates with another client certificate (`identity_pem`: certificate and key,
    /// PEM) from now on, in this client and every clone of it. Requests already sent (a watch
    /// in progress) keep their connection; new requests use new connections.
    pub fn set_identity(&self, identity_pem: &str) -> Result<(), ClientError> {
        let http = self.tls.transport(Some(identity_pem))?;
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = http;
        Ok(())
    }

    /// From a kubeconfig file (see [`kubeconfig::load`]).
    pub fn from_kubeconfig(path: Option<&std::path::Path>) -> Result<Self, ClientError> {
        Self::from_kubeconfig_at(path, None)
    }

    /// From a kubeconfig file, talking to `servers` (one URL or a comma-separated list, as
    /// kubectl's `--server`) instead of the kubeconfig's `server:` when given.
    pub fn from_kubeconfig_at(
        path: Option<&std::path::Path>,
        servers: Option<&str>,
    ) -> Result<Self, ClientError> {
        let mut kc = kubeconfig::load(path)?;
        if let Some(s) = servers.filter(|s| !s.trim().is_empty()) {
            kc.server = s.to_string();
        }
        let identity = match (&kc.client_cert_pem, &kc.client_key_pem) {
            (Some(c), Some(k)) => Some(format!("{}\n{}", c.trim_end(), k)),
            _ => None,
        };
        Self::build(
            &kc.server,
            kc.token,
            identity.as_deref(),
            &kc.namespace,
            kc.ca_pem.as_deref(),
            kc.insecure,
        )
    }

    /// The API server requests go to now.
    pub fn server(&self) -> String {
        self.servers.current().to_string()
    }

    /// Every API server this client may talk to, in the order given.
    pub fn servers(&self) -> &[String] {
        self.servers.urls()
    }

    /// The bearer token this client presents.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let http = self.http.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut r = http.request(method, format!("{}{path}", self.servers.current()));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// Sends a request ([`Client::send_once`]); one the server turned away for now (429 with
    /// `Retry-After`: its share of the API is spent) is sent again after the wait it names,
    /// at most [`THROTTLED_TRIES`] times, as client-go does. A 429 without `Retry-After` (an
    /// eviction a disruption budget forbids) is the caller's to handle.
    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let (http, req) = rb.build_split();
        let mut req = req.map_err(|e| ClientError::Transport {
            url: self.server(),
            reason: root_cause(&e),
        })?;
        let mut throttled = 0;
        loop {
            let again = (throttled < THROTTLED_TRIES)
                .then(|| req.try_clone())
                .flatten();
            let resp = self.send_once(&http, req).await?;
            match (again, retry_after(&resp)) {
                (Some(next), Some(wait)) => {
                    throttled += 1;
                    tracing::debug!(url = %resp.url(), ?wait, throttled, "the API server asked to try again later");
                    tokio::time::sleep(wait).await;
                    req = next;
                }
                _ => return self.answer(resp).await,
            }
        }
    }

    /// Sends a request to the current server, or, when it cannot be reached, to the others in
    /// turn ([`balancer::Servers::candidates`]). A request that may have reached a server
    /// (the connection broke after it was sent) is sent again elsewhere only when it is a read.
    async fn send_once(
        &self,
        http: &reqwest::Client,
        req: reqwest::Request,
    ) -> Result<reqwest::Response, ClientError> {
        let tail = match req.url().query() {
            Some(q) => format!("{}?{q}", req.url().path()),
            None => req.url().path().to_string(),
        };
        let read = *req.method() == reqwest::Method::GET || *req.method() == reqwest::Method::HEAD;
        let urls = self.servers.urls();
        let mut tried = Vec::new();
        let mut pending = Some(req);
        let mut last_error = String::new();
        let candidates = self.servers.candidates();
        for (k, &i) in candidates.iter().enumerate() {
            let Some(base) = pending.take() else { break };
            // A copy for the next server, while this one is tried (bodies here are bytes).
            if k + 1 < candidates.len() {
                pending = base.try_clone();
            }
            let mut r = base;
            let url = format!("{}{tail}", urls[i]);
            *r.url_mut() = reqwest::Url::parse(&url).map_err(|e| ClientError::Transport {
                url: urls[i].clone(),
                reason: e.to_string(),
            })?;
            tried.push(urls[i].as_str());
            match http.execute(r).await {
                Ok(resp) => {
                    self.servers.succeeded(i);
                    return Ok(resp);
                }
                Err(e) => {
                    self.servers.failed(i);
                    last_error = root_cause(&e);
                    if !(e.is_connect() || read) {
                        break;
                    }
                }
            }
        }
        Err(ClientError::Transport {
            url: tried.join(", "),
            reason: last_error,
        })
    }

    async fn answer(&self, resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
        if resp.status().is_success() || resp.status() == reqwest::StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp);
        }
        let code = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if v.get("kind").and_then(Value::as_str) == Some("Status") {
            Err(ClientError::Api(ApiError::from_status(code, &v)))
        } else {
            Err(ClientError::Api(ApiError::from_status(
                code,
                &serde_json::json!({"message": format!("the server answered {code}: {}", String::from_utf8_lossy(&body).trim())}),
            )))
        }
    }

    async fn json(&self, rb: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let resp = self.send(rb).await?;
        resp.json().await.map_err(|e| ClientError::Transport {
            url: self.server(),
            reason: e.to_string(),
        })
    }

    /// POSTs `body` to a path outside the resource space (e.g. the join endpoint).
    pub async fn post_path(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.json(self.req(reqwest::Method::POST, path).json(body))
            .await
    }

    pub async fn get_path(&self, path: &str) -> Result<Value, ClientError> {
        self.json(self.req(reqwest::Method::GET, path)).await
    }

    /// One object of a kind known only at run time.
    pub async fn get_dyn(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Value, ClientError> {
        self.get_path(&path(r, ns, Some(name))).await
    }

    pub async fn list_dyn(
        &self,
        r: &Resource,
        ns: Option<&str>,
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Value, ClientError> {
        let mut p = path(r, ns, None);
        let q = typed::ListParams {
            label_selector: label_selector.map(String::from),
            field_selector: field_selector.map(String::from),
        }
        .query();
        if !q.is_empty() {
            p = format!("{p}?{}", q.join("&"));
        }
        self.get_path(&p).await
    }

    pub async fn create_dyn(
        &self,
        r: &Resource,
        ns: Option<&str>,
        obj: &Value,
    ) -> Result<Value, ClientError> {
        self.create_dyn_path(&path(r, ns, None), obj).await
    }

    async fn create_dyn_path<T: serde::Serialize + ?Sized>(
        &self,
        path: &str,
        obj: &T,
    ) -> Result<Value, ClientError> {
        self.json(self.req(reqwest::Method::POST, path).json(obj))
            .await
    }

    async fn put_value(&self, path: &str, obj: &Value) -> Result<Value, ClientError> {
        self.json(self.req(reqwest::Method::PUT, path).json(obj))
            .await
    }

    pub async fn replace_dyn(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        obj: &Value,
    ) -> Result<Value, ClientError> {
        self.put_value(&path(r, ns, Some(name)), obj).await
    }

    pub async fn replace_status_dyn(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        obj: &Value,
    ) -> Result<Value, ClientError> {
        self.put_value(&format!("{}/status", path(r, ns, Some(name))), obj)
            .await
    }

    /// `content_type` is one of the patch media types (`application/merge-patch+json`, …).
    pub async fn patch_dyn(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        content_type: &str,
        body: &Value,
    ) -> Result<Value, ClientError> {
        let mut p = path(r, ns, Some(name));
        if let Some(s) = sub {
            p = format!("{p}/{s}");
        }
        self.patch_raw(&p, content_type, body).await
    }

    async fn patch_path(&self, path: &str, patch: &typed::Patch) -> Result<Value, ClientError> {
        self.patch_raw(path, patch.content_type(), patch.body())
            .await
    }

    async fn patch_raw(
        &self,
        path: &str,
        content_type: &str,
        body: &Value,
    ) -> Result<Value, ClientError> {
        let rb = self
            .req(reqwest::Method::PATCH, path)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(serde_json::to_vec(body).unwrap_or_default());
        self.json(rb).await
    }

    pub async fn delete_dyn(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
        propagation: Option<&str>,
        grace: Option<i64>,
    ) -> Result<Value, ClientError> {
        let params = DeleteParams {
            propagation: propagation.map(str::to_string),
            grace_period_seconds: grace,
            precondition_uid: None,
        };
        self.delete_path(&path(r, ns, Some(name)), &params).await
    }

    async fn delete_path(&self, path: &str, params: &DeleteParams) -> Result<Value, ClientError> {
        let mut body = serde_json::json!({"kind": "DeleteOptions", "apiVersion": "v1"});
        if let Some(p) = &params.propagation {
            body["propagationPolicy"] = p.as_str().into();
        }
        if let Some(g) = params.grace_period_seconds {
            body["gracePeriodSeconds"] = g.into();
        }
        if let Some(uid) = &params.precondition_uid {
            body["preconditions"] = serde_json::json!({ "uid": uid });
        }
        self.json(self.req(reqwest::Method::DELETE, path).json(&body))
            .await
    }

    /// Evicts a pod (`pods/NAME/eviction`, policy/v1): a graceful delete the API may refuse
    /// with 429 while a disruption budget forbids it.
    pub async fn evict(&self, ns: &str, name: &str) -> Result<Value, ClientError> {
        let pods = Resource::lookup("pods").expect("pods");
        let body = serde_json::json!({"apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": name, "namespace": ns}});
        self.json(
            self.req(
                reqwest::Method::POST,
                &format!("{}/eviction", path(pods, Some(ns), Some(name))),
            )
            .json(&body),
        )
        .await
    }

    /// Raw bytes of a GET (e.g. pod logs).
    pub async fn get_raw(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        self.send(self.req(reqwest::Method::GET, path)).await
    }

    /// Watches a collection from `resource_version` (all current objects first when None).
    pub async fn watch_dyn(
        &self,
        r: &Resource,
        ns: Option<&str>,
        resource_version: Option<&str>,
        field_selector: Option<&str>,
        label_selector: Option<&str>,
    ) -> Result<impl futures::Stream<Item = Result<WatchEvent, ClientError>>, ClientError> {
        let mut q = Vec::new();
        if let Some(rv) = resource_version {
            q.push(format!("resourceVersion={rv}"));
        }
        if let Some(f) = field_selector {
            q.push(format!("fieldSelector={}", encode_query(f)));
        }
        if let Some(l) = label_selector {
            q.push(format!("labelSelector={}", encode_query(l)));
        }
        self.watch_path(&path(r, ns, None), &q).await
    }

    /// Watches the collection at `path` with `query` (`key=value`, already encoded).
    async fn watch_path(
        &self,
        path: &str,
        query: &[String],
    ) -> Result<impl futures::Stream<Item = Result<WatchEvent, ClientError>>, ClientError> {
        let mut p = format!("{path}?watch=true");
        for q in query {
            p.push('&');
            p.push_str(q);
        }
        let resp = self.send(self.req(reqwest::Method::GET, &p)).await?;
        let server = self.server();
        let mut buf = Vec::<u8>::new();
        let bytes = resp.bytes_stream();
        Ok(bytes
            .map(move |chunk| {
                let chunk = chunk.map_err(|e| ClientError::Transport {
                    url: server.clone(),
                    reason: e.to_string(),
                })?;
                buf.extend_from_slice(&chunk);
                let mut events = Vec::new();
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let v: Value =
                        serde_json::from_slice(&line).map_err(|e| ClientError::Transport {
                            url: server.clone(),
                            reason: format!("bad watch event: {e}"),
                        })?;
                    let kind = v["type"].as_str().unwrap_or("").to_string();
                    if kind == "ERROR" {
                        let code = v["object"]["code"].as_u64().unwrap_or(500) as u16;
                        return Err(ClientError::Api(ApiError::from_status(code, &v["object"])));
                    }
                    events.push(Ok(WatchEvent {
                        kind,
                        object: v["object"].clone(),
                    }));
                }
                Ok(futures::stream::iter(events))
            })
            .flat_map(|r: Result<_, ClientError>| match r {
                Ok(s) => s.left_stream(),
                Err(e) => futures::stream::iter(vec![Err(e)]).right_stream(),
            }))
    }
}

/// How many times a request the server turned away for now is sent again.
pub const THROTTLED_TRIES: u32 = 10;
/// The longest wait taken from a `Retry-After`, whatever the server names.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(30);

/// The wait a 429 answer asks for (`Retry-After` in seconds, capped at [`RETRY_AFTER_MAX`],
/// up to a fifth more so clients turned away together do not come back together).
fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    if resp.status() != reqwest::StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let secs: u64 = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let wait = Duration::from_secs(secs.max(1)).min(RETRY_AFTER_MAX);
    Some(wait.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 1.0..1.2)))
}

/// The CA certificate (PEM) a server hands out at `GET /cacerts`, fetched WITHOUT checking the
/// server's certificate: the caller must check what it got (against a join token's hash) before
/// trusting it or sending any secret.
pub async fn fetch_ca_unverified(server: &str) -> Result<String, ClientError> {
    let servers = balancer::Servers::parse(server)?;
    let mut last = None;
    for url in servers.urls() {
        match fetch_ca_from(url).await {
            Ok(ca) => return Ok(ca),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Config("no API server URL given".into())))
}

async fn fetch_ca_from(server: &str) -> Result<String, ClientError> {
    let transport = |reason: String| ClientError::Transport {
        url: server.to_string(),
        reason,
    };
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let resp = http
        .get(format!("{server}/cacerts"))
        .send()
        .await
        .map_err(|e| transport(root_cause(&e)))?;
    if !resp.status().is_success() {
        return Err(transport(format!(
            "GET /cacerts answered {}",
            resp.status().as_u16()
        )));
    }
    resp.text().await.map_err(|e| transport(e.to_string()))
}

fn root_cause(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s = inner.to_string();
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A fake API server on loopback that answers the first `throttle` requests 429 (with
    /// `Retry-After: 1` when `retry_after`), the rest 201 with the body it was sent. Returns
    /// its URL and the bodies seen.
    async fn fake_api(throttle: usize, retry_after: bool) -> (String, Arc<Mutex<Vec<String>>>) {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let log = log.clone();
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            let n = {
                                let mut log = log.lock().unwrap();
                                log.push(String::from_utf8_lossy(&body).into_owned());
                                log.len()
                            };
                            let mut answer = hyper::Response::builder();
                            let body = if n <= throttle {
                                answer = answer.status(429);
                                if retry_after {
                                    answer = answer.header("retry-after", "1");
                                }
                                serde_json::json!({"kind": "Status", "status": "Failure",
                                    "reason": "TooManyRequests", "code": 429,
                                    "message": "too many requests"})
                                .to_string()
                                .into()
                            } else {
                                answer = answer.status(201);
                                body
                            };
                            Ok::<_, hyper::Error>(
                                answer
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(body))
                                    .expect("a valid response"),
                            )
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(conn), svc),
                );
            }
        });
        (url, seen)
    }

    /// A write the server turned away with `Retry-After` is sent again, whole, after the wait
    /// it named, and its answer is the caller's.
    #[tokio::test]
    async fn a_throttled_request_is_sent_again_after_the_wait_named() {
        let (url, seen) = fake_api(2, true).await;
        let client = Client::new(&url, None, "default", None, false).unwrap();
        let body = serde_json::json!({"kind": "TokenRequest", "n": 7});
        let t = std::time::Instant::now();
        let answer = client.post_path("/api/v1/x", &body).await.unwrap();
        assert_eq!(answer, body);
        assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
        let sent = body.to_string();
        assert!(seen.iter().all(|b| *b == sent), "{seen:?}");
    }

    /// A 429 without `Retry-After` (an eviction a disruption budget forbids) is answered to
    /// the caller at once.
    #[tokio::test]
    async fn a_429_without_retry_after_is_the_callers() {
        let (url, seen) = fake_api(1, false).await;
        let client = Client::new(&url, None, "default", None, false).unwrap();
        let err = client
            .post_path("/api/v1/x", &serde_json::json!({}))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Api(ref e) if e.code == 429),
            "{err}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}
