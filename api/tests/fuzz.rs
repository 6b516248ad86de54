//! Property tests over what the API server takes from clients: the manifest decoder and
//! validation, the protobuf decoder, the three patch engines, label and field selectors,
//! quantities and the body limits' scans. Whatever the input, none of them may panic; every
//! failure is an `ApiError` with a client error code. Case counts are bounded so the whole
//! file runs in seconds under `cargo test` (`SKIFF_FUZZ_CASES=20000` searches longer).

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use skiff_api::fields::FieldSelector;
use skiff_api::patch::{self, PatchKind};
use skiff_api::selector::Selector;
use skiff_api::{defaults, limits, protobuf, quantity, table, validation, ApiError, RESOURCES};

/// Cases per property; `SKIFF_FUZZ_CASES` runs more (a longer search, by hand).
fn cases() -> u32 {
    std::env::var("SKIFF_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// Keys the API's code looks for, so random objects reach past the first check.
const KEYS: &[&str] = &[
    "metadata",
    "name",
    "namespace",
    "labels",
    "annotations",
    "spec",
    "status",
    "containers",
    "image",
    "ports",
    "containerPort",
    "port",
    "env",
    "value",
    "replicas",
    "selector",
    "matchLabels",
    "matchExpressions",
    "template",
    "data",
    "binaryData",
    "stringData",
    "type",
    "finalizers",
    "ownerReferences",
    "uid",
    "resources",
    "limits",
    "requests",
    "cpu",
    "memory",
    "$patch",
    "$retainKeys",
    "$setElementOrder/containers",
    "$deleteFromPrimitiveList/finalizers",
    "key",
    "operator",
    "values",
    "nodeName",
    "volumes",
    "schedule",
    "jobTemplate",
    "rules",
    "verbs",
    "apiGroups",
    "roleRef",
    "subjects",
    "conditions",
    "x",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[a-z0-9./:=-]{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "",
            "100m",
            "1Gi",
            "0.5",
            "1e3",
            "-1",
            "Always",
            "IfNotPresent",
            "replace",
            "delete",
            "merge",
            "In",
            "NotIn",
            "Exists",
            "DoesNotExist",
            "*",
            "apps",
            "v1",
            "* * * * *",
            "web",
            "a:v1",
            "TCP",
            "1e309",
            "9999999999999999999Pi",
        ])
        .prop_map(|s| json!(s)),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS.to_vec()), inner), 0..6).prop_map(
                |kvs| {
                    Value::Object(
                        kvs.into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect::<Map<String, Value>>(),
                    )
                }
            ),
        ]
    })
}

/// An object of some kind, shaped enough (metadata, name) to reach the kind's checks.
fn object() -> impl Strategy<Value = (usize, Value)> {
    (0..RESOURCES.len(), value(), value(), "[a-z]{1,8}").prop_map(|(i, spec, rest, name)| {
        let mut obj = match rest {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        obj.insert(
            "metadata".into(),
            json!({"name": name, "namespace": "default"}),
        );
        obj.insert("spec".into(), spec);
        (i, Value::Object(obj))
    })
}

fn client_error(e: &ApiError) -> bool {
    (400..500).contains(&e.code)
}

fn json_patch_op() -> impl Strategy<Value = Value> {
    let paths = prop::sample::select(vec![
        "",
        "/",
        "/metadata",
        "/metadata/name",
        "/spec",
        "/spec/containers",
        "/spec/containers/0",
        "/spec/containers/-",
        "/spec/containers/99",
        "/x",
        "/x/y",
        "/data/a",
        "/a~1b",
        "/~0",
        "/spec/replicas",
        "/-",
        "/spec/containers/00",
        "/spec/containers/-1",
    ]);
    (
        prop::sample::select(vec![
            "add", "remove", "replace", "move", "copy", "test", "bad",
        ]),
        paths.clone(),
        paths,
        value(),
    )
        .prop_map(|(op, path, from, v)| json!({"op": op, "path": path, "from": from, "value": v}))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Decoding, validating, defaulting and tabling any object of any kind.
    #[test]
    fn manifests_decode_validate_and_default_without_panics((i, obj) in object(), strict in any::<bool>()) {
        let r = &RESOURCES[i];
        if let Err(e) = validation::decode(r, &obj, strict) {
            prop_assert!(client_error(&e), "{}: {e:?}", r.kind);
        }
        let mut defaulted = obj.clone();
        defaults::apply(r.kind, &mut defaulted);
        if let Err(e) = validation::validate(r, &defaulted) {
            prop_assert!(client_error(&e), "{}: {e:?}", r.kind);
        }
        if let Err(e) = validation::validate_update(r, &obj, &defaulted) {
            prop_assert!(client_error(&e), "{}: {e:?}", r.kind);
        }
        let _ = table::to_table(r.kind, &[obj], "1", 0);
    }

    /// The protobuf decoder on any bytes after the magic, and on mutated real bodies.
    #[test]
    fn protobuf_bodies_decode_or_fail_cleanly(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        name in prop::sample::select(vec![
            "api.core.v1.Pod", "api.core.v1.Secret", "api.apps.v1.Deployment",
            "api.core.v1.ConfigMap", "apimachinery.pkg.runtime.RawExtension",
            "apimachinery.pkg.api.resource.Quantity", "apimachinery.pkg.apis.meta.v1.Time",
            "api.core.v1.Service", "api.batch.v1.CronJob", "nothing.at.all",
        ]),
    ) {
        let mut body = protobuf::MAGIC.to_vec();
        body.extend_from_slice(&bytes);
        if let Err(e) = protobuf::decode_object(&body) {
            prop_assert!(client_error(&e), "{e:?}");
        }
        if let Err(e) = protobuf::message(name, &bytes) {
            prop_assert!(client_error(&e), "{e:?}");
        }
    }

    /// Merge, strategic and apply patches of any shape on any object.
    #[test]
    fn merge_and_strategic_patches_never_panic(target in value(), p in value()) {
        for kind in [PatchKind::Merge, PatchKind::Strategic, PatchKind::Apply] {
            if let Err(e) = patch::apply(kind, &target, &p) {
                prop_assert!(client_error(&e), "{kind:?}: {e:?}");
            }
        }
    }

    /// JSON patches of any operations, and any value sent as one.
    #[test]
    fn json_patches_never_panic(
        target in value(),
        ops in prop::collection::vec(json_patch_op(), 0..8),
        junk in value(),
    ) {
        if let Err(e) = patch::apply(PatchKind::Json, &target, &Value::Array(ops)) {
            prop_assert!(client_error(&e), "{e:?}");
        }
        if let Err(e) = patch::apply(PatchKind::Json, &target, &junk) {
            prop_assert!(client_error(&e), "{e:?}");
        }
    }

    /// Label and field selectors: any query string parses or is a 400, and a parsed one can
    /// be matched against any object.
    #[test]
    fn selectors_parse_or_fail_cleanly(
        s in "[a-z0-9=!,() ._/-]{0,40}|(in|notin|!|=|==|!=|,|\\(|\\)| |a|b|x.y/z|-)*",
        obj in value(),
    ) {
        match Selector::parse(&s) {
            Ok(sel) => {
                let labels = [("a".to_string(), "b".to_string())].into_iter().collect();
                let _ = sel.matches(&labels);
            }
            Err(e) => prop_assert_eq!(e.code, 400, "{:?}", s),
        }
        match FieldSelector::parse(&s) {
            Ok(sel) => {
                let _ = sel.matches(&obj);
            }
            Err(e) => prop_assert_eq!(e.code, 400, "{:?}", s),
        }
    }

    /// Quantities: any text parses to a number or to nothing.
    #[test]
    fn quantities_parse_or_not(q in "\\PC{0,12}|[0-9.+eE-]{0,8}(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi|e[0-9-]{0,4}|E[0-9]{0,3})?") {
        let _ = quantity::cpu_millis(&q);
        let _ = quantity::bytes(&q);
    }

    /// The depth scans take any bytes.
    #[test]
    fn depth_scans_take_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = limits::check_json_depth(&bytes);
        let _ = limits::check_yaml_depth(&bytes);
    }
}
