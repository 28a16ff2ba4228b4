//! A pod as the controller caches it: only what the reconcilers read, decoded straight from the
//! API server's JSON.
//!
//! A served pod is mostly what no reconcile reads: managedFields, volumes, environment,
//! resources, tolerations, container statuses. Decoding all of it into a [`Pod`] and cutting it
//! afterwards allocated every string and map of it for every watch event, and the decoding was
//! the largest part of the controller's CPU after the Pool rounds. [`CachedPod`] is decoded from
//! a wire shape that names only the fields kept; serde skips the rest of the JSON without
//! building anything. The controller writes pods only with merge patches and whole new pods,
//! never from the cache, so a cut pod is never sent back.

use std::ops::Deref;

use k8s_openapi::api::core::v1::{Container, Pod, PodCondition, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sandbox_domain::api::names::{self, EXECUTOR_CONTAINER_NAME};
use sandbox_domain::pods;
use serde::Deserialize;

use super::served::WireMeta;

/// A pod cut down to what the reconcilers read: its metadata without managedFields, its task
/// executor if it runs one (a container or init container named [`EXECUTOR_CONTAINER_NAME`],
/// with its restart policy, which tells a native sidecar), its phase, the type and status of its
/// `Ready` condition, and its IPs. Every other container and condition is dropped: a container
/// as k8s-openapi types it takes 2 KiB even when only its name is set, and at 10,000 pods the
/// pods' own containers and other conditions took about a fifth of the controller's memory.
///
/// What every Pool round asks of each of its pods (ready? finished? marked for eviction?) is
/// answered once, when the pod is decoded, and kept beside it: a round reads a flag instead of
/// walking the pod's conditions and labels on the heap.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CachedPod {
    pod: Pod,
    running_and_ready: bool,
    finished: bool,
    evicted: bool,
    /// Its pool-revision label: compared with the pool's revision for every pod in every round.
    pool_revision: Option<Box<str>>,
}

impl Deref for CachedPod {
    type Target = Pod;

    fn deref(&self) -> &Pod {
        &self.pod
    }
}

impl CachedPod {
    /// Keeps `pod` (already cut) with its facts.
    fn new(pod: Pod) -> Self {
        CachedPod {
            running_and_ready: pods::is_running_and_ready(&pod),
            finished: pods::is_finished(&pod),
            evicted: pod
                .metadata
                .labels
                .as_ref()
                .is_some_and(|labels| labels.contains_key(names::LABEL_EVICT)),
            pool_revision: pod
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(names::LABEL_POOL_REVISION))
                .map(|revision| revision.as_str().into()),
            pod,
        }
    }

    /// Running with its Ready condition true ([`pods::is_running_and_ready`]).
    pub fn is_running_and_ready(&self) -> bool {
        self.running_and_ready
    }

    /// Succeeded or Failed: it can never run again ([`pods::is_finished`]).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Still a live sandbox: neither terminating nor finished ([`pods::is_live`]).
    pub fn is_live(&self) -> bool {
        !pods::is_terminating(&self.pod) && !self.finished
    }

    /// Labelled for eviction from its pool ([`names::LABEL_EVICT`]).
    pub fn is_evicted(&self) -> bool {
        self.evicted
    }

    /// The template revision of its pool it was made from ([`names::LABEL_POOL_REVISION`]).
    pub fn pool_revision(&self) -> Option<&str> {
        self.pool_revision.as_deref()
    }
}

impl From<Pod> for CachedPod {
    /// Cuts a whole pod (one built in a test, or read some other way) to what is cached.
    fn from(pod: Pod) -> Self {
        let Pod {
            mut metadata,
            spec,
            status,
        } = pod;
        metadata.managed_fields = None;
        let containers = |list: Vec<Container>| {
            kept_containers(list.into_iter().map(|c| (c.name, c.restart_policy)))
        };
        CachedPod::new(Pod {
            metadata,
            spec: spec.map(|spec| PodSpec {
                containers: containers(spec.containers),
                init_containers: spec.init_containers.map(containers),
                ..PodSpec::default()
            }),
            status: status.map(|status| PodStatus {
                phase: status.phase,
                conditions: status
                    .conditions
                    .map(|list| kept_conditions(list.into_iter().map(|c| (c.type_, c.status)))),
                pod_ip: status.pod_ip,
                pod_ips: status.pod_ips,
                ..PodStatus::default()
            }),
        })
    }
}

impl k8s_openapi::Resource for CachedPod {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Pod as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for CachedPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.pod.metadata
    }

    /// The trait asks for it; nothing changes a cached pod's metadata, whose labels the eviction
    /// fact was computed from.
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.pod.metadata
    }
}

impl<'de> Deserialize<'de> for CachedPod {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        WirePod::deserialize(deserializer).map(Into::into)
    }
}

/// The fields of a served pod that are kept; serde ignores every other field without
/// allocating for it.
#[derive(Deserialize)]
struct WirePod {
    #[serde(default)]
    metadata: WireMeta,
    #[serde(default)]
    spec: Option<WireSpec>,
    #[serde(default)]
    status: Option<WireStatus>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct WireSpec {
    containers: Option<Vec<WireContainer>>,
    init_containers: Option<Vec<WireContainer>>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct WireContainer {
    name: String,
    restart_policy: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct WireStatus {
    conditions: Option<Vec<WireCondition>>,
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<PodIP>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct WireCondition {
    #[serde(rename = "type")]
    type_: String,
    status: String,
}

/// The containers of a pod that are kept, from each one's name and restart policy: only the
/// executor, the one container any reconcile looks for ([`super::sidecar::has_executor`]).
fn kept_containers(list: impl IntoIterator<Item = (String, Option<String>)>) -> Vec<Container> {
    list.into_iter()
        .filter(|(name, _)| name == EXECUTOR_CONTAINER_NAME)
        .map(|(name, restart_policy)| Container {
            name,
            restart_policy,
            ..Container::default()
        })
        .collect()
}

/// The conditions of a pod that are kept, from each one's type and status: only `Ready`, the
/// one condition any reconcile reads ([`pods::is_running_and_ready`]).
fn kept_conditions(list: impl IntoIterator<Item = (String, String)>) -> Vec<PodCondition> {
    list.into_iter()
        .filter(|(type_, _)| type_ == "Ready")
        .map(|(type_, status)| PodCondition {
            type_,
            status,
            ..PodCondition::default()
        })
        .collect()
}

impl From<WirePod> for CachedPod {
    fn from(wire: WirePod) -> Self {
        let containers = |list: Option<Vec<WireContainer>>| {
            list.map(|list| kept_containers(list.into_iter().map(|c| (c.name, c.restart_policy))))
        };
        CachedPod::new(Pod {
            metadata: wire.metadata.into(),
            spec: wire.spec.map(|spec| PodSpec {
                containers: containers(spec.containers).unwrap_or_default(),
                init_containers: containers(spec.init_containers),
                ..PodSpec::default()
            }),
            status: wire.status.map(|status| PodStatus {
                phase: status.phase,
                conditions: status.conditions.map(|list: Vec<WireCondition>| {
                    kept_conditions(list.into_iter().map(|c| (c.type_, c.status)))
                }),
                pod_ip: status.pod_ip,
                pod_ips: status.pod_ips,
                ..PodStatus::default()
            }),
        })
    }
}

/// A pool pod of `sandbox-bench`'s normal scene as the API server served it (kwok running it),
/// managedFields included.
#[cfg(test)]
pub(crate) const SERVED_POOL_POD: &[u8] = include_bytes!("testdata/served-pool-pod.json");

#[cfg(test)]
mod tests {
    use super::super::sidecar::has_injected_executor;
    use super::*;
    use kube::ResourceExt;

    /// A pool pod as the API server serves it once kwok runs it, with the executor injected.
    fn served_pod_json() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "warm-x7k2p", "generateName": "warm-", "namespace": "ns", "uid": "u-1",
                "resourceVersion": "42", "generation": 1,
                "creationTimestamp": "2026-12-05T00:00:00Z",
                "deletionTimestamp": "2026-12-05T00:01:00Z", "deletionGracePeriodSeconds": 30,
                "finalizers": ["example.com/keep"],
                "labels": {(names::LABEL_POOL_NAME): "warm", (names::LABEL_POOL_REVISION): "abc"},
                "annotations": {(super::super::sidecar::ANNOTATION_EXECUTOR_INJECTED): "true"},
                "ownerReferences": [{"apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool",
                    "name": "warm", "uid": "pool-uid", "controller": true, "blockOwnerDeletion": true}],
                "managedFields": [{"manager": "kwok", "operation": "Update", "apiVersion": "v1",
                    "time": "2026-12-05T00:00:01Z", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:status": {"f:conditions": {}, "f:podIP": {}}}}]
            },
            "spec": {
                "containers": [{
                    "name": "app", "image": "python:3.12", "command": ["sleep", "infinity"],
                    "env": [{"name": "A", "value": "1"}],
                    "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}},
                    "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets"}]
                }],
                "initContainers": [{"name": "task-executor", "image": "executor:1", "restartPolicy": "Always",
                    "ports": [{"containerPort": 5758}]}],
                "volumes": [{"name": "kube-api-access", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
                "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                    "effect": "NoExecute", "tolerationSeconds": 300}],
                "nodeName": "kwok-node-0", "schedulerName": "default-scheduler"
            },
            "status": {
                "phase": "Running", "podIP": "127.1.0.9", "podIPs": [{"ip": "127.1.0.9"}],
                "hostIP": "127.0.0.1", "qosClass": "Burstable", "startTime": "2026-12-05T00:00:00Z",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-05T00:00:02Z"}
                ],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                    "image": "python:3.12", "imageID": "sha256:0", "state": {"running": {}}}]
            }
        })
    }

    #[test]
    fn decoding_a_served_pod_keeps_exactly_what_cutting_the_whole_pod_keeps() {
        let json = served_pod_json();
        let whole: Pod = serde_json::from_value(json.clone()).expect("a pod");
        let decoded: CachedPod = serde_json::from_value(json).expect("a cached pod");
        assert_eq!(decoded, CachedPod::from(whole.clone()));
        // Every metadata field but managedFields survives, set or not.
        assert_eq!(
            decoded.metadata,
            ObjectMeta {
                managed_fields: None,
                ..whole.metadata
            }
        );
    }

    #[test]
    fn a_pod_as_the_api_server_served_it_decodes_like_the_whole_pod_cut() {
        let whole: Pod = serde_json::from_slice(SERVED_POOL_POD).expect("a pod");
        assert!(whole.metadata.managed_fields.is_some());
        let decoded: CachedPod = serde_json::from_slice(SERVED_POOL_POD).expect("a cached pod");
        assert!(decoded.is_running_and_ready());
        assert_eq!(decoded, CachedPod::from(whole));
    }

    /// What decoding costs, as a watch event and as an answer to a create: `cargo test --release
    /// -p sandbox-controller --lib decoding_cost -- --ignored --nocapture` prints it.
    #[test]
    #[ignore = "a benchmark: prints figures, asserts nothing about time"]
    fn decoding_cost() {
        let event = [
            br#"{"type":"MODIFIED","object":"#.as_slice(),
            SERVED_POOL_POD,
            b"}",
        ]
        .concat();
        let per_call = |f: &dyn Fn()| {
            const CALLS: u32 = 20_000;
            let started = std::time::Instant::now();
            for _ in 0..CALLS {
                f();
            }
            started.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS)
        };
        for round in 1..=5 {
            let whole_then_cut = per_call(&|| {
                let event: kube::core::WatchEvent<Pod> =
                    serde_json::from_slice(&event).expect("an event");
                if let kube::core::WatchEvent::Modified(pod) = event {
                    std::hint::black_box(CachedPod::from(pod));
                }
            });
            let cached = per_call(&|| {
                let event: kube::core::WatchEvent<CachedPod> =
                    serde_json::from_slice(&event).expect("an event");
                std::hint::black_box(event);
            });
            let answer_decoded = per_call(&|| {
                std::hint::black_box(
                    serde_json::from_slice::<Pod>(SERVED_POOL_POD).expect("a pod"),
                );
            });
            let answer_skipped = per_call(&|| {
                std::hint::black_box(
                    serde_json::from_slice::<serde::de::IgnoredAny>(SERVED_POOL_POD).expect("JSON"),
                );
            });
            println!(
                "round {round}: watch event {whole_then_cut:.2} µs whole then cut, \
                 {cached:.2} µs as cached ({:.2}×); answer {answer_decoded:.2} µs decoded, \
                 {answer_skipped:.2} µs skipped ({:.2}×)",
                cached / whole_then_cut,
                answer_skipped / answer_decoded
            );
        }
    }

    #[test]
    fn a_pod_without_spec_or_status_and_with_nulls_decodes_like_the_whole_pod() {
        for json in [
            serde_json::json!({"metadata": {"name": "bare"}}),
            serde_json::json!({"metadata": {"name": "nulls", "labels": null, "ownerReferences": null},
                "spec": {"containers": [{"name": "app"}], "initContainers": null},
                "status": {"phase": null, "conditions": null, "podIPs": null}}),
            serde_json::json!({"metadata": {"name": "empty"}, "spec": {"containers": []}, "status": {}}),
        ] {
            let whole: Pod = serde_json::from_value(json.clone()).expect("a pod");
            let decoded: CachedPod = serde_json::from_value(json).expect("a cached pod");
            assert_eq!(decoded, CachedPod::from(whole));
        }
    }

    /// The served pod changed one way each: every fact is true for some and false for others, and
    /// some carry a pool revision and one none.
    fn pods_in_every_state() -> Vec<serde_json::Value> {
        let edit = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut pod = served_pod_json();
            change(&mut pod);
            pod
        };
        let not_deleted = |pod: &mut serde_json::Value| {
            let metadata = pod["metadata"].as_object_mut().expect("metadata");
            metadata.remove("deletionTimestamp");
            metadata.remove("deletionGracePeriodSeconds");
        };
        vec![
            served_pod_json(),
            edit(&|pod| not_deleted(pod)),
            edit(&|pod| {
                not_deleted(pod);
                pod["status"]["phase"] = "Pending".into();
            }),
            edit(&|pod| {
                not_deleted(pod);
                pod["status"]["conditions"][1]["status"] = "False".into();
            }),
            edit(&|pod| {
                not_deleted(pod);
                pod["status"]["phase"] = "Succeeded".into();
            }),
            edit(&|pod| pod["status"]["phase"] = "Failed".into()),
            edit(&|pod| {
                not_deleted(pod);
                pod["metadata"]["labels"][names::LABEL_EVICT] = "true".into();
            }),
            edit(&|pod| {
                pod.as_object_mut().expect("a pod").remove("status");
            }),
            edit(&|pod| {
                let labels = pod["metadata"]["labels"].as_object_mut().expect("labels");
                labels.remove(names::LABEL_POOL_REVISION);
            }),
            // The executor as an init container that is not a native sidecar, and as a container.
            edit(&|pod| {
                let init = &mut pod["spec"]["initContainers"][0];
                init.as_object_mut()
                    .expect("a container")
                    .remove("restartPolicy");
            }),
            edit(&|pod| {
                let executor = pod["spec"]["initContainers"][0].clone();
                pod["spec"]
                    .as_object_mut()
                    .expect("a spec")
                    .remove("initContainers");
                let containers = pod["spec"]["containers"]
                    .as_array_mut()
                    .expect("containers");
                containers.push(executor);
            }),
        ]
    }

    #[test]
    fn the_facts_kept_beside_a_pod_agree_with_the_predicates_on_the_whole_pod() {
        let mut seen = std::collections::BTreeSet::new();
        let mut seen_revisions = std::collections::BTreeSet::new();
        for json in pods_in_every_state() {
            let whole: Pod = serde_json::from_value(json.clone()).expect("a pod");
            let decoded: CachedPod = serde_json::from_value(json).expect("a cached pod");
            let facts = [
                (
                    "ready",
                    decoded.is_running_and_ready(),
                    pods::is_running_and_ready(&whole),
                ),
                ("finished", decoded.is_finished(), pods::is_finished(&whole)),
                ("live", decoded.is_live(), pods::is_live(&whole)),
                (
                    "evicted",
                    decoded.is_evicted(),
                    whole.labels().contains_key(names::LABEL_EVICT),
                ),
                (
                    "executor",
                    has_injected_executor(&decoded),
                    has_injected_executor(&whole),
                ),
            ];
            for (fact, kept, computed) in facts {
                assert_eq!(kept, computed, "{fact} of {}", pods::pod_name(&whole));
                seen.insert((fact, kept));
            }
            assert_eq!(
                decoded.pool_revision(),
                whole
                    .labels()
                    .get(names::LABEL_POOL_REVISION)
                    .map(String::as_str),
                "pool revision of {}",
                pods::pod_name(&whole)
            );
            seen_revisions.insert(decoded.pool_revision().map(str::to_owned));
            assert_eq!(decoded, CachedPod::from(whole));
        }
        assert_eq!(seen.len(), 10, "each fact seen true and false: {seen:?}");
        assert_eq!(
            seen_revisions.len(),
            2,
            "a revision and none: {seen_revisions:?}"
        );
    }

    #[test]
    fn a_cached_pod_keeps_everything_the_reconcilers_read_and_little_else() {
        let cached: CachedPod = serde_json::from_value(served_pod_json()).expect("a cached pod");
        assert!(sandbox_domain::pods::is_running_and_ready(&cached));
        assert_eq!(sandbox_domain::pods::pod_ip(&cached), Some("127.1.0.9"));
        assert!(super::super::sidecar::has_injected_executor(&cached));
        let spec = cached.spec.as_ref().expect("a spec");
        assert!(spec.containers.is_empty(), "the app container is not kept");
        let init = spec.init_containers.as_ref().expect("init containers");
        assert_eq!(
            init,
            &[Container {
                name: EXECUTOR_CONTAINER_NAME.into(),
                restart_policy: Some("Always".into()),
                ..Container::default()
            }],
            "the executor, with its restart policy alone"
        );
        assert_eq!(spec.volumes, None);
        assert_eq!(spec.node_name, None);
        let status = cached.status.as_ref().expect("a status");
        assert_eq!(
            status.conditions.as_deref(),
            Some(
                &[PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..PodCondition::default()
                }][..]
            ),
            "the Ready condition's type and status alone"
        );
        assert_eq!(status.container_statuses, None);
        assert_eq!(status.host_ip, None);
        assert_eq!(cached.metadata.managed_fields, None);
    }

    #[test]
    fn a_watch_event_and_a_list_decode_into_cached_pods() {
        let event: kube::core::WatchEvent<CachedPod> = serde_json::from_value(
            serde_json::json!({"type": "MODIFIED", "object": served_pod_json()}),
        )
        .expect("a watch event");
        let kube::core::WatchEvent::Modified(pod) = event else {
            panic!("a modified event, got {event:?}");
        };
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("42"));

        let list: kube::core::ObjectList<CachedPod> = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "43"},
            "items": [served_pod_json()]
        }))
        .expect("a pod list");
        assert_eq!(list.items.len(), 1);
        assert_eq!(list.items[0].metadata.name.as_deref(), Some("warm-x7k2p"));
    }
}
