//! Image references and the registry clients that reach them: plain HTTP for loopback and
//! insecure registries, HTTPS for the rest; anonymous access.

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::RegistryError;

/// Parses an image reference (`busybox`, `127.0.0.1:5000/app:v1`, `repo@sha256:…`), the
/// defaults (`docker.io`, `library/`, `latest`) filled in as registries expect.
pub fn parse_reference(image: &str) -> Result<Reference, RegistryError> {
    image
        .parse::<Reference>()
        .map_err(|e| RegistryError::Reference(image.to_string(), e.to_string()))
}

/// A registry client: plain HTTP for loopback and insecure registries.
pub fn client_for(reference: &Reference, insecure: &[String]) -> Client {
    let registry = reference.resolve_registry().to_string();
    let protocol = if is_insecure(&registry, insecure) {
        ClientProtocol::HttpsExcept(vec![registry])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        ..Default::default()
    })
}

/// The credentials sent to the registry of `reference`: none; pulls and pushes are anonymous.
pub fn auth(_reference: &Reference) -> RegistryAuth {
    RegistryAuth::Anonymous
}

/// Registries reached over plain HTTP: loopback ones, and those listed as insecure.
pub fn is_insecure(registry: &str, insecure: &[String]) -> bool {
    let host = registry
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(registry);
    host == "localhost"
        || host.starts_with("127.")
        || host == "[::1]"
        || insecure.iter().any(|r| r == registry || r == host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_plain_http() {
        assert!(is_insecure("127.0.0.1:5000", &[]));
        assert!(is_insecure("localhost:5000", &[]));
        assert!(!is_insecure("registry.example:5000", &[]));
        assert!(!is_insecure("ghcr.io", &[]));
    }

    #[test]
    fn listed_registries_are_plain_http_by_host_or_host_and_port() {
        assert!(is_insecure(
            "registry.example:5000",
            &["registry.example".into()]
        ));
        assert!(is_insecure(
            "edge-registry:5000",
            &["edge-registry:5000".into()]
        ));
        assert!(!is_insecure(
            "edge-registry:5001",
            &["edge-registry:5000".into()]
        ));
    }

    #[test]
    fn references_are_normalised_and_bad_ones_refused() {
        let r = parse_reference("busybox").unwrap();
        assert_eq!(r.resolve_registry(), "index.docker.io");
        assert_eq!(r.repository(), "library/busybox");
        assert_eq!(r.tag(), Some("latest"));
        let r = parse_reference("127.0.0.1:5000/app:v1").unwrap();
        assert_eq!(r.resolve_registry(), "127.0.0.1:5000");
        assert_eq!(r.tag(), Some("v1"));
        assert!(matches!(
            parse_reference("Not A Reference"),
            Err(RegistryError::Reference(..))
        ));
    }
}
