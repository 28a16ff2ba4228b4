//! Hand-written schema fragments where the derived ones cannot express Kubernetes' extensions.

use schemars::{Schema, SchemaGenerator, json_schema};

/// `metav1.Condition` list, merged by `type` under server-side apply.
pub fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let item =
        generator.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>();
    json_schema!({
        "type": "array",
        "description": "Latest observations of the object's state, one per condition type.",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

/// A list of free-form objects (strategic merge patches of a pod template).
pub fn pod_template_patches(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "description": "Per-shard pod template patches, applied by index as strategic merge patches: entry i patches the pod of shard i. Non-pooled batches only.",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        },
    })
}
