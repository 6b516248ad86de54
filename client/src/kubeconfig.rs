//! Reading a kubeconfig: `--kubeconfig`, else `KUBECONFIG`, else `~/.kube/config`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::ClientError;

/// What the client needs from a kubeconfig's current context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeConfig {
    pub server: String,
    pub token: Option<String>,
    pub namespace: String,
    /// The cluster CA (PEM) from `certificate-authority-data` or `certificate-authority`.
    pub ca_pem: Option<String>,
    pub insecure: bool,
    /// The user's client certificate and key (PEM), from `client-certificate(-data)` and
    /// `client-key(-data)`.
    pub client_cert_pem: Option<String>,
    pub client_key_pem: Option<String>,
}

/// The kubeconfig file to read.
pub fn resolve(path: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = path {
        return Some(p.to_path_buf());
    }
    if let Ok(k) = std::env::var("KUBECONFIG") {
        if let Some(first) = k.split(':').find(|s| !s.is_empty()) {
            return Some(PathBuf::from(first));
        }
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config"))
}

pub fn load(path: Option<&Path>) -> Result<KubeConfig, ClientError> {
    let p = resolve(path).ok_or_else(|| {
        ClientError::Config("no kubeconfig: pass --kubeconfig or set KUBECONFIG".into())
    })?;
    let text = std::fs::read_to_string(&p).map_err(|e| {
        ClientError::Config(format!("cannot read kubeconfig {}: {e} (start a cluster with `skiff up`, or pass --kubeconfig)", p.display()))
    })?;
    parse(&text).map_err(|e| ClientError::Config(format!("kubeconfig {}: {e}", p.display())))
}

pub fn parse(text: &str) -> Result<KubeConfig, String> {
    let v: Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let current = v["current-context"].as_str().unwrap_or("");
    let find = |list: &str, name: &str| -> Option<Value> {
        v[list]
            .as_array()?
            .iter()
            .find(|e| e["name"].as_str() == Some(name))
            .cloned()
    };
    let ctx = find("contexts", current)
        .or_else(|| v["contexts"].as_array().and_then(|a| a.first().cloned()))
        .ok_or("no context")?;
    let cluster = find("clusters", ctx["context"]["cluster"].as_str().unwrap_or(""))
        .ok_or("the context's cluster is missing")?;
    let user = find("users", ctx["context"]["user"].as_str().unwrap_or(""));
    let server = cluster["cluster"]["server"]
        .as_str()
        .ok_or("the cluster has no server")?
        .to_string();
    let c = &cluster["cluster"];
    let ca_pem = match (
        c["certificate-authority-data"].as_str(),
        c["certificate-authority"].as_str(),
    ) {
        (Some(data), _) => {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| format!("certificate-authority-data: {e}"))?;
            Some(String::from_utf8(bytes).map_err(|e| format!("certificate-authority-data: {e}"))?)
        }
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| format!("certificate-authority {file}: {e}"))?,
        ),
        (None, None) => None,
    };
    let u = user.as_ref().map(|u| &u["user"]);
    let pem_field = |data: &str, file: &str| -> Result<Option<String>, String> {
        let Some(u) = u else { return Ok(None) };
        match (u[data].as_str(), u[file].as_str()) {
            (Some(d), _) => {
                use base64::Engine;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(d.trim())
                    .map_err(|e| format!("{data}: {e}"))?;
                Ok(Some(
                    String::from_utf8(bytes).map_err(|e| format!("{data}: {e}"))?,
                ))
            }
            (None, Some(f)) => Ok(Some(
                std::fs::read_to_string(f).map_err(|e| format!("{file} {f}: {e}"))?,
            )),
            (None, None) => Ok(None),
        }
    };
    let client_cert_pem = pem_field("client-certificate-data", "client-certificate")?;
    let client_key_pem = pem_field("client-key-data", "client-key")?;
    Ok(KubeConfig {
        client_cert_pem,
        client_key_pem,
        ca_pem,
        insecure: c["insecure-skip-tls-verify"].as_bool().unwrap_or(false),
        server,
        token: user.and_then(|u| u["user"]["token"].as_str().map(String::from)),
        namespace: ctx["context"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_current_context() {
        let kc = parse("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:6443\nusers:\n- name: u\n  user:\n    token: t0k\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n    namespace: apps\ncurrent-context: x\n").unwrap();
        assert_eq!(
            kc,
            KubeConfig {
                server: "http://127.0.0.1:6443".into(),
                token: Some("t0k".into()),
                namespace: "apps".into(),
                ca_pem: None,
                insecure: false,
                client_cert_pem: None,
                client_key_pem: None,
            }
        );
        assert!(parse("clusters: []").is_err());
    }

    #[test]
    fn reads_a_client_certificate() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let kc = parse(&format!("clusters:\n- name: c\n  cluster:\n    server: https://h:6443\nusers:\n- name: u\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n", b64("CERT"), b64("KEY"))).unwrap();
        assert_eq!(kc.client_cert_pem.as_deref(), Some("CERT"));
        assert_eq!(kc.client_key_pem.as_deref(), Some("KEY"));
        assert_eq!(kc.token, None);
    }
}
