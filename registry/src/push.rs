//! Pushing wasm: a module or component to a registry in the CNCF wasm layout, with
//! `oci-wasm`. Behind the `push` feature, off by default: `oci-wasm` links `wit-component`,
//! which only the CLI needs and the control plane must not link.

use crate::client::{auth, client_for, parse_reference};
use crate::media::is_component;
use crate::RegistryError;

fn registry_err(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Registry(e.to_string())
}

/// Pushes a wasm module or component to `image` in the CNCF wasm layout; returns the manifest
/// URL.
pub async fn push_wasm(
    bytes: Vec<u8>,
    image: &str,
    insecure: &[String],
) -> Result<String, RegistryError> {
    let reference = parse_reference(image)?;
    let component = is_component(&bytes).ok_or_else(|| {
        RegistryError::Registry(format!(
            "cannot push to {image}: the file is not a wasm module or component"
        ))
    })?;
    let (config, layer) = if component {
        oci_wasm::WasmConfig::from_raw_component(bytes, None).map_err(registry_err)?
    } else {
        oci_wasm::WasmConfig::from_raw_module(bytes, None).map_err(registry_err)?
    };
    let client = oci_wasm::WasmClient::new(client_for(&reference, insecure));
    let resp = client
        .push(&reference, &auth(&reference), layer, config, None)
        .await
        .map_err(registry_err)?;
    Ok(resp.manifest_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn what_is_not_wasm_is_refused_before_any_request() {
        // Nothing listens on this port: a refusal that reached the network would say so.
        let err = push_wasm(b"#!/bin/sh\n".to_vec(), "127.0.0.1:1/app:v1", &[])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a wasm module"), "{err}");
    }
}
