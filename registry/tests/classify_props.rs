//! Property tests over how a pulled artifact is classified: whatever manifest a registry
//! answers with and whatever bytes its layer holds, classification never panics, and its
//! verdicts follow the documented rules (a wasm layer plus a wasm config or a single layer is
//! wasm; only the `\0asm` header makes a module or component). `SKIFF_FUZZ_CASES` runs more.

use oci_client::manifest::OciManifest;
use proptest::prelude::*;
use serde_json::{json, Value};
use skiff_registry::media::{is_component, is_wasm, WASM_CONFIG_TYPES, WASM_LAYER_TYPES};

fn cases() -> u32 {
    std::env::var("SKIFF_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// A media type: one of wasm's, one of a container image's, or anything.
fn media_type() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(WASM_LAYER_TYPES).prop_map(str::to_string),
        proptest::sample::select(WASM_CONFIG_TYPES).prop_map(str::to_string),
        Just("application/vnd.oci.image.layer.v1.tar+gzip".to_string()),
        Just("application/vnd.oci.image.config.v1+json".to_string()),
        ".{0,40}",
    ]
}

fn descriptor(media_type: String) -> Value {
    json!({"mediaType": media_type, "digest": format!("sha256:{}", "a".repeat(64)), "size": 1})
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn manifests_are_classified_by_the_documented_rule(
        config in media_type(),
        layers in proptest::collection::vec(media_type(), 0..5),
    ) {
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor(config.clone()),
            "layers": layers.iter().cloned().map(descriptor).collect::<Vec<_>>(),
        });
        let parsed: OciManifest = serde_json::from_value(manifest).expect("a well-formed manifest");
        let wasm_layer = layers.iter().any(|l| WASM_LAYER_TYPES.contains(&l.as_str()));
        let wasm_config = WASM_CONFIG_TYPES.contains(&config.as_str());
        prop_assert_eq!(is_wasm(&parsed), wasm_layer && (wasm_config || layers.len() == 1));
    }

    #[test]
    fn any_body_a_registry_sends_is_decoded_or_refused_cleanly(body in any::<Vec<u8>>()) {
        if let Ok(m) = serde_json::from_slice::<OciManifest>(&body) {
            let _ = is_wasm(&m);
        }
    }

    #[test]
    fn only_a_wasm_header_makes_a_module_or_component(bytes in any::<Vec<u8>>()) {
        if is_component(&bytes).is_some() {
            prop_assert!(bytes.len() >= 8 && bytes[..4] == *b"\0asm");
        }
    }

    #[test]
    fn wasm_headers_are_told_apart(version in any::<u8>(), layer in any::<u8>(), rest in any::<Vec<u8>>()) {
        let mut bytes = vec![0, b'a', b's', b'm', version, 0, layer, 0];
        bytes.extend(rest);
        let want = match (version, layer) {
            (1, 0) => Some(false),
            (_, 1) => Some(true),
            _ => None,
        };
        prop_assert_eq!(is_component(&bytes), want);
    }
}
