//! Pods built from templates: a non-pooled batch's shard pods and a pool's warm pods.

use std::collections::BTreeMap;

use k8s_openapi::DeepMerge;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use sha2::{Digest, Sha256};

use crate::api::names;

/// A shard patch that is not a valid partial pod template.
#[derive(Debug, thiserror::Error)]
#[error("spec.shardPatches[{index}] is not a valid pod template patch: {source}")]
pub struct ShardPatchError {
    pub index: usize,
    #[source]
    pub source: serde_json::Error,
}

/// Pod `<batch>-<index>`: the template with `shardPatches[index]` merged in.
///
/// The patch merges like a strategic merge patch: maps merge, lists with a merge key (containers
/// and env by `name`, ports by `containerPort`, ...) merge entry by entry, other lists are replaced.
pub fn batch_pod(
    batch: &str,
    index: usize,
    template: &PodTemplateSpec,
    shard_patch: Option<&serde_json::Value>,
    owner: OwnerReference,
) -> Result<Pod, ShardPatchError> {
    let mut merged = template.clone();
    if let Some(patch) = shard_patch {
        merged.merge_from(parse_patch(patch).map_err(|source| ShardPatchError { index, source })?);
    }
    let mut labels = managed_labels(&merged);
    labels.insert(names::LABEL_BATCH_NAME.into(), batch.into());
    labels.insert(names::LABEL_POD_INDEX.into(), index.to_string());
    Ok(pod_from(
        merged,
        ObjectMeta {
            name: Some(format!("{batch}-{index}")),
            labels: Some(labels),
            ..meta_owned_by(owner)
        },
    ))
}

/// A warm pod `name` for `pool`. The controller names pool pods itself (see [`pool_pod_name`]),
/// so it can expect them before the API server confirms their creation.
pub fn pool_pod(
    pool: &str,
    name: String,
    template: &PodTemplateSpec,
    revision: &str,
    owner: OwnerReference,
) -> Pod {
    let mut labels = managed_labels(template);
    labels.insert(names::LABEL_POOL_NAME.into(), pool.into());
    labels.insert(names::LABEL_POOL_REVISION.into(), revision.into());
    pod_from(
        template.clone(),
        ObjectMeta {
            name: Some(name),
            labels: Some(labels),
            ..meta_owned_by(owner)
        },
    )
}

/// `<pool>-<5 characters>`, like the API server's `generateName`, unique with overwhelming
/// probability for a given `seed` (a counter and clock in practice).
pub fn pool_pod_name(pool: &str, seed: &[u8]) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let digest = Sha256::digest(seed);
    let suffix: String = digest
        .iter()
        .take(5)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    format!("{pool}-{suffix}")
}

/// A short, stable hash of a pool template: pods made from it carry it as their revision.
pub fn template_revision(template: &PodTemplateSpec) -> String {
    let canonical = serde_json::to_vec(template).expect("a pod template always serializes");
    hex::encode(&Sha256::digest(&canonical)[..5])
}

fn parse_patch(patch: &serde_json::Value) -> Result<PodTemplateSpec, serde_json::Error> {
    // `containers` is required in a full PodSpec but usually absent from a patch; an empty list
    // merges as "no change".
    let mut patch = patch.clone();
    if let Some(spec) = patch.get_mut("spec").and_then(|s| s.as_object_mut()) {
        spec.entry("containers")
            .or_insert_with(|| serde_json::json!([]));
    }
    serde_json::from_value(patch)
}

fn managed_labels(template: &PodTemplateSpec) -> BTreeMap<String, String> {
    let mut labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert(names::LABEL_MANAGED_BY.into(), names::MANAGED_BY.into());
    labels
}

fn meta_owned_by(owner: OwnerReference) -> ObjectMeta {
    ObjectMeta {
        owner_references: Some(vec![owner]),
        ..Default::default()
    }
}

fn pod_from(template: PodTemplateSpec, mut meta: ObjectMeta) -> Pod {
    let template_meta = template.metadata.unwrap_or_default();
    meta.annotations = template_meta.annotations;
    Pod {
        metadata: meta,
        spec: template.spec,
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template() -> PodTemplateSpec {
        serde_json::from_value(json!({
            "metadata": {"labels": {"app": "sbx"}},
            "spec": {"containers": [
                {"name": "main", "image": "nginx:latest", "env": [{"name": "A", "value": "1"}]},
                {"name": "side", "image": "busybox"}
            ]}
        }))
        .unwrap()
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: "X".into(),
            name: "b".into(),
            uid: "u".into(),
            controller: Some(true),
            ..Default::default()
        }
    }

    #[test]
    fn shard_patch_merges_containers_by_name() {
        let patch = json!({"spec": {"containers": [{"name": "main", "image": "nginx:1.27", "env": [{"name": "B", "value": "2"}]}]}});
        let pod = batch_pod("b", 2, &template(), Some(&patch), owner()).unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.containers.len(), 2, "the untouched container stays");
        let main = &spec.containers[0];
        assert_eq!(main.image.as_deref(), Some("nginx:1.27"));
        let env: Vec<_> = main.env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert_eq!(env, ["A", "B"]);
        assert_eq!(pod.metadata.name.as_deref(), Some("b-2"));
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(labels[names::LABEL_POD_INDEX], "2");
        assert_eq!(labels["app"], "sbx");
    }

    #[test]
    fn patch_of_labels_only_is_fine_and_bad_patches_name_their_index() {
        let patch = json!({"metadata": {"labels": {"shard": "x"}}});
        assert!(batch_pod("b", 0, &template(), Some(&patch), owner()).is_ok());
        let bad = json!({"spec": {"containers": "nope"}});
        let err = batch_pod("b", 4, &template(), Some(&bad), owner()).unwrap_err();
        assert!(err.to_string().starts_with("spec.shardPatches[4]"));
    }

    #[test]
    fn pool_pod_names_look_generated_and_differ_by_seed() {
        let a = pool_pod_name("fast-pool", b"1");
        assert!(
            a.starts_with("fast-pool-") && a.len() == "fast-pool-".len() + 5,
            "{a}"
        );
        assert_ne!(a, pool_pod_name("fast-pool", b"2"));
    }

    #[test]
    fn revision_changes_with_the_template() {
        let mut other = template();
        other.spec.as_mut().unwrap().containers[0].image = Some("nginx:2".into());
        assert_ne!(template_revision(&template()), template_revision(&other));
        assert_eq!(
            template_revision(&template()),
            template_revision(&template())
        );
    }
}
