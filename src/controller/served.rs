//! Objects as the watches decode them: metadata without managedFields.
//!
//! managedFields are most of a served object's metadata (one entry per writer, each a tree of
//! field names), and nothing in the controller reads them. Decoding them into an [`ObjectMeta`]
//! and clearing them before caching still built every map and string of them for every watch
//! event; decoded through [`WireMeta`], serde skips them without building anything.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::marker::PhantomData;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::runtime::watcher::Event;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use sandbox_domain::api::{BatchSandbox, BatchSandboxSpec, BatchSandboxStatus};
use sandbox_domain::api::{Pool, PoolSpec, PoolStatus};

/// Every field of [`ObjectMeta`] but managedFields.
#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WireMeta {
    annotations: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    deletion_grace_period_seconds: Option<i64>,
    deletion_timestamp: Option<Time>,
    finalizers: Option<Vec<String>>,
    generate_name: Option<String>,
    generation: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    name: Option<String>,
    namespace: Option<String>,
    owner_references: Option<Vec<OwnerReference>>,
    resource_version: Option<String>,
    self_link: Option<String>,
    uid: Option<String>,
}

impl From<WireMeta> for ObjectMeta {
    fn from(meta: WireMeta) -> Self {
        // Every field named, so a field ObjectMeta gains is a decision here, not a default.
        ObjectMeta {
            annotations: meta.annotations,
            creation_timestamp: meta.creation_timestamp,
            deletion_grace_period_seconds: meta.deletion_grace_period_seconds,
            deletion_timestamp: meta.deletion_timestamp,
            finalizers: meta.finalizers,
            generate_name: meta.generate_name,
            generation: meta.generation,
            labels: meta.labels,
            managed_fields: None,
            name: meta.name,
            namespace: meta.namespace,
            owner_references: meta.owner_references,
            resource_version: meta.resource_version,
            self_link: meta.self_link,
            uid: meta.uid,
        }
    }
}

fn without_managed_fields<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<ObjectMeta, D::Error> {
    WireMeta::deserialize(deserializer).map(Into::into)
}

/// A custom resource of ours: its spec and status, and how to put it together again.
pub trait CustomObject: kube::Resource<DynamicType = ()> + Sized {
    type Spec: DeserializeOwned + Clone + Debug + Send + Sync + 'static;
    type Status: DeserializeOwned + Clone + Debug + Send + Sync + 'static;

    fn assemble(metadata: ObjectMeta, spec: Self::Spec, status: Option<Self::Status>) -> Self;
}

/// `impl CustomObject for $kind` with the struct kube's derive made of it.
macro_rules! custom_object {
    ($kind:ty, $spec:ty, $status:ty) => {
        impl CustomObject for $kind {
            type Spec = $spec;
            type Status = $status;

            fn assemble(metadata: ObjectMeta, spec: $spec, status: Option<$status>) -> Self {
                Self {
                    metadata,
                    spec,
                    status,
                }
            }
        }
    };
}

custom_object!(BatchSandbox, BatchSandboxSpec, BatchSandboxStatus);
custom_object!(Pool, PoolSpec, PoolStatus);

/// `K` as its watch decodes it, before it is cached as `K` ([`Served::into_object`]). Requests
/// for it go to `K`'s API.
#[derive(Deserialize)]
#[serde(bound(deserialize = ""))]
pub struct Served<K: CustomObject> {
    #[serde(deserialize_with = "without_managed_fields")]
    metadata: ObjectMeta,
    spec: K::Spec,
    #[serde(default)]
    status: Option<K::Status>,
    #[serde(skip)]
    object: PhantomData<fn() -> K>,
}

impl<K: CustomObject> Served<K> {
    pub fn into_object(self) -> K {
        K::assemble(self.metadata, self.spec, self.status)
    }
}

// By hand: derived, both would ask `K` itself to be Clone and Debug.
impl<K: CustomObject> Clone for Served<K> {
    fn clone(&self) -> Self {
        Self {
            metadata: self.metadata.clone(),
            spec: self.spec.clone(),
            status: self.status.clone(),
            object: PhantomData,
        }
    }
}

impl<K: CustomObject> Debug for Served<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("metadata", &self.metadata)
            .field("spec", &self.spec)
            .field("status", &self.status)
            .finish()
    }
}

impl<K: CustomObject> kube::Resource for Served<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The same event about the object `decode` makes of the one received.
pub fn decoded<W, K>(event: Event<W>, decode: fn(W) -> K) -> Event<K> {
    match event {
        Event::Apply(object) => Event::Apply(decode(object)),
        Event::Delete(object) => Event::Delete(decode(object)),
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(decode(object)),
        Event::InitDone => Event::InitDone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::{Resource, ResourceExt};

    fn json_of(object: &impl serde::Serialize) -> serde_json::Value {
        serde_json::to_value(object).unwrap()
    }

    fn served_batch_json() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
            "metadata": {
                "name": "b", "namespace": "ns", "uid": "u-1", "resourceVersion": "7",
                "generation": 2, "creationTimestamp": "2026-12-05T00:00:00Z",
                "labels": {"team": "a"},
                "annotations": {"sandbox.opensandbox.io/alloc-status": "{\"pods\":[\"p-1\"]}"},
                "finalizers": ["pool.sandbox.opensandbox.io/pool-allocation"],
                "managedFields": [{"manager": "sandbox-controller", "operation": "Update",
                    "apiVersion": "sandbox.opensandbox.io/v1alpha1", "time": "2026-12-05T00:00:01Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:annotations": {"f:sandbox.opensandbox.io/alloc-status": {}}}}}]
            },
            "spec": {"replicas": 1, "poolRef": "warm", "expireTime": "2026-12-05T01:00:00Z"},
            "status": {"observedGeneration": 2, "replicas": 1, "allocated": 1, "ready": 1}
        })
    }

    /// A pooled batch as the API server served it once granted and reported, with the
    /// managedFields of both writes (about half of its bytes).
    const SERVED_BATCH: &[u8] = include_bytes!("testdata/served-batch.json");

    #[test]
    fn a_served_batch_decodes_as_the_whole_one_without_managed_fields() {
        let fixtures = [
            served_batch_json(),
            serde_json::from_slice(SERVED_BATCH).unwrap(),
        ];
        for json in fixtures {
            let mut whole: BatchSandbox = serde_json::from_value(json.clone()).unwrap();
            assert!(!whole.managed_fields().is_empty(), "the fixture has some");
            let served: Served<BatchSandbox> = serde_json::from_value(json).unwrap();
            let decoded = served.into_object();
            assert!(decoded.metadata.managed_fields.is_none());
            whole.metadata.managed_fields = None;
            assert_eq!(json_of(&decoded), json_of(&whole));
        }
    }

    #[test]
    fn a_served_pool_without_status_decodes_without_one() {
        let json = serde_json::json!({
            "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool",
            "metadata": {"name": "warm", "namespace": "ns", "managedFields": [{"manager": "kubectl"}]},
            "spec": {
                "template": {"spec": {"containers": [{"name": "app", "image": "python:3.12"}]}},
                "capacitySpec": {"bufferMin": 1, "bufferMax": 2, "poolMin": 0, "poolMax": 5}
            }
        });
        let mut whole: Pool = serde_json::from_value(json.clone()).unwrap();
        whole.metadata.managed_fields = None;
        let decoded = serde_json::from_value::<Served<Pool>>(json)
            .unwrap()
            .into_object();
        assert_eq!(json_of(&decoded), json_of(&whole));
        assert!(decoded.status.is_none());
    }

    #[test]
    fn requests_for_a_served_object_go_to_its_kinds_api() {
        assert_eq!(
            Served::<BatchSandbox>::url_path(&(), Some("ns")),
            BatchSandbox::url_path(&(), Some("ns"))
        );
        assert_eq!(
            Served::<Pool>::url_path(&(), None),
            Pool::url_path(&(), None)
        );
    }

    #[test]
    fn events_keep_their_kind_when_decoded() {
        let json = served_batch_json();
        let served = || serde_json::from_value::<Served<BatchSandbox>>(json.clone()).unwrap();
        let name = |e: &Event<BatchSandbox>| match e {
            Event::Apply(b) => format!("apply {}", b.name_any()),
            Event::Delete(b) => format!("delete {}", b.name_any()),
            Event::InitApply(b) => format!("init-apply {}", b.name_any()),
            Event::Init => "init".into(),
            Event::InitDone => "init-done".into(),
        };
        let events = [
            Event::Init,
            Event::InitApply(served()),
            Event::InitDone,
            Event::Apply(served()),
            Event::Delete(served()),
        ];
        let decoded: Vec<String> = events
            .into_iter()
            .map(|e| name(&decoded(e, Served::into_object)))
            .collect();
        assert_eq!(
            decoded,
            ["init", "init-apply b", "init-done", "apply b", "delete b"]
        );
    }
}
