//! Reconcile tests against a recorded API server: the reconcilers run on caches filled with
//! fixtures, every request they send is recorded and answered, and the tests check exactly
//! which writes were made, with their preconditions.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::{Container, Pod, PodCondition, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};

use super::*;
use crate::api::{BatchSandboxSpec, CapacitySpec, PoolSpec};

/// One request the reconciler sent.
#[derive(Clone, Debug)]
struct Request {
    method: String,
    path: String,
    body: Value,
}

/// An API server that records every request and answers it: with a fixed reply set for
/// `METHOD path`; a patch by merging it into the stored object (status patches into the object
/// they belong to); a create by echoing the new object; anything else with 404.
#[derive(Clone, Default)]
struct RecordedApi {
    requests: Arc<Mutex<Vec<Request>>>,
    replies: Arc<Mutex<BTreeMap<String, (u16, Value)>>>,
    objects: Arc<Mutex<BTreeMap<String, Value>>>,
}

impl RecordedApi {
    fn client(&self) -> Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.answer(request).await) }
        });
        Client::new(service, "default")
    }

    /// Stores `object` at `path`, for patches to merge into.
    fn object<K: serde::Serialize>(&self, path: String, object: &K) {
        let value = serde_json::to_value(object).expect("a fixture serializes");
        self.objects.lock().expect("objects").insert(path, value);
    }

    /// Replies `status` with `body` to `method` on `path` (without the query).
    fn reply(&self, method: &str, path: &str, status: u16, body: Value) {
        self.replies
            .lock()
            .expect("replies")
            .insert(format!("{method} {path}"), (status, body));
    }

    async fn answer(&self, request: http::Request<kube::client::Body>) -> http::Response<String> {
        let method = request.method().to_string();
        let path = request.uri().path().to_string();
        let bytes = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        self.requests.lock().expect("requests").push(Request {
            method: method.clone(),
            path: path.clone(),
            body: body.clone(),
        });
        let canned = self
            .replies
            .lock()
            .expect("replies")
            .get(&format!("{method} {path}"))
            .cloned();
        let (status, reply) = match (canned, method.as_str()) {
            (Some(canned), _) => canned,
            (None, "POST") => (200, body),
            (None, "PATCH") => {
                let mut objects = self.objects.lock().expect("objects");
                match objects.get_mut(path.trim_end_matches("/status")) {
                    Some(object) => {
                        json_patch::merge(object, &body);
                        (200, object.clone())
                    }
                    None => (404, not_found()),
                }
            }
            (None, _) => (404, not_found()),
        };
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(reply.to_string())
            .expect("a response")
    }

    /// The writes so far (everything but reads), in the order they were sent.
    fn writes(&self) -> Vec<Request> {
        self.requests
            .lock()
            .expect("requests")
            .iter()
            .filter(|r| r.method != "GET")
            .cloned()
            .collect()
    }
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn conflict() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"})
}

const NS: &str = "team";

fn store<K>(objects: Vec<K>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

fn context(
    api: &RecordedApi,
    pods: Vec<Pod>,
    batches: Vec<BatchSandbox>,
    pools: Vec<Pool>,
) -> Arc<Context> {
    let config = ControllerConfig {
        executor: ExecutorSettings {
            pool_injection: PoolInjection::Annotated,
            ..ExecutorSettings::default()
        },
        ..ControllerConfig::default()
    };
    Arc::new(Context::new(
        api.client(),
        Stores {
            pods: store(pods),
            batches: store(batches),
            pools: store(pools),
        },
        Arc::new(sandbox_policy::NativePolicies),
        config,
        ControllerMetrics::default(),
    ))
}

fn meta(name: &str, uid: &str, resource_version: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        uid: Some(uid.into()),
        resource_version: Some(resource_version.into()),
        ..ObjectMeta::default()
    }
}

fn sandbox_template() -> k8s_openapi::api::core::v1::PodTemplateSpec {
    k8s_openapi::api::core::v1::PodTemplateSpec {
        metadata: None,
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "sandbox".into(),
                image: Some("busybox:1.36".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
    }
}

/// A pool at `[bufferMin, bufferMax, poolMin, poolMax]` that already carries its finalizer.
fn pool(capacity: [i32; 4]) -> Pool {
    let [buffer_min, buffer_max, pool_min, pool_max] = capacity;
    let mut pool = Pool::new(
        "p",
        PoolSpec {
            template: sandbox_template(),
            capacity_spec: CapacitySpec {
                buffer_min,
                buffer_max,
                pool_min,
                pool_max,
            },
            ..PoolSpec::default()
        },
    );
    pool.metadata = ObjectMeta {
        finalizers: Some(vec![names::FINALIZER_POOL.into()]),
        ..meta("p", "pool-uid", "100")
    };
    pool
}

/// An idle, Running and Ready pod of `pool` at `ip`.
fn pool_pod(pool: &Pool, name: &str, ip: &str) -> Pod {
    let revision = crate::domain::pod_template::template_revision(&pool.spec.template);
    let mut pod = crate::domain::pod_template::pool_pod(
        "p",
        name.into(),
        &pool.spec.template,
        &revision,
        pool.controller_owner_ref(&())
            .expect("a pool has an owner reference"),
    );
    pod.metadata.namespace = Some(NS.into());
    pod.metadata.uid = Some(format!("{name}-uid"));
    pod.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..PodCondition::default()
        }]),
        ..PodStatus::default()
    });
    pod
}

fn pooled_batch(name: &str, replicas: i32, resource_version: &str) -> BatchSandbox {
    let mut batch = BatchSandbox::new(
        name,
        BatchSandboxSpec {
            replicas,
            pool_ref: Some("p".into()),
            ..BatchSandboxSpec::default()
        },
    );
    batch.metadata = meta(name, &format!("{name}-uid"), resource_version);
    batch
}

fn batch_path(name: &str) -> String {
    format!("/apis/sandbox.opensandbox.io/v1alpha1/namespaces/{NS}/batchsandboxes/{name}")
}

fn pool_path() -> String {
    format!("/apis/sandbox.opensandbox.io/v1alpha1/namespaces/{NS}/pools/p")
}

fn pool_status_path() -> String {
    format!("{}/status", pool_path())
}

fn methods_and_paths(writes: &[Request]) -> Vec<(String, String)> {
    writes
        .iter()
        .map(|w| (w.method.clone(), w.path.clone()))
        .collect()
}

#[tokio::test]
async fn a_pooled_claim_is_one_conditional_batch_patch_and_one_pool_status_write() {
    let api = RecordedApi::default();
    let pool = pool([0, 0, 3, 3]);
    let pods = vec![
        pool_pod(&pool, "p-a", "127.1.1.2"),
        pool_pod(&pool, "p-b", "127.1.1.3"),
        pool_pod(&pool, "p-c", "127.1.1.4"),
    ];
    let batch = pooled_batch("claim", 2, "7");
    api.object(batch_path("claim"), &batch);
    api.object(pool_path(), &pool);
    let ctx = context(&api, pods, vec![batch], vec![pool.clone()]);

    pool::reconcile(Arc::new(pool), ctx.clone())
        .await
        .expect("the reconcile succeeds");

    let writes = api.writes();
    assert_eq!(
        methods_and_paths(&writes),
        [
            ("PATCH".to_string(), batch_path("claim")),
            ("PATCH".to_string(), pool_status_path()),
        ],
        "{writes:#?}"
    );
    let grant = &writes[0].body["metadata"];
    assert_eq!(
        grant["resourceVersion"], "7",
        "the grant is conditional on the batch"
    );
    assert_eq!(grant["finalizers"], json!([names::FINALIZER_BATCH]));
    let ledger: Value = serde_json::from_str(
        grant["annotations"][names::ANNOTATION_ALLOC_STATUS]
            .as_str()
            .expect("a ledger"),
    )
    .expect("the ledger is JSON");
    assert_eq!(ledger, json!({"pods": ["p-a", "p-b"], "poolRef": "p"}));
    assert_eq!(
        grant["annotations"][names::ANNOTATION_ENDPOINTS],
        r#"[{"sandbox_id":"0","ip":"127.1.1.2"},{"sandbox_id":"1","ip":"127.1.1.3"}]"#
    );
    let status = &writes[1].body["status"];
    assert_eq!(
        (
            status["total"].clone(),
            status["allocated"].clone(),
            status["available"].clone()
        ),
        (json!(3), json!(2), json!(1)),
        "{status}"
    );
}

#[tokio::test]
async fn a_lost_grant_race_records_no_claim_and_is_retried() {
    let api = RecordedApi::default();
    api.reply("PATCH", &batch_path("claim"), 409, conflict());
    let pool = pool([0, 0, 2, 2]);
    let pods = vec![
        pool_pod(&pool, "p-a", "127.1.1.2"),
        pool_pod(&pool, "p-b", "127.1.1.3"),
    ];
    api.object(pool_path(), &pool);
    let ctx = context(
        &api,
        pods,
        vec![pooled_batch("claim", 1, "7")],
        vec![pool.clone()],
    );

    let result = pool::reconcile(Arc::new(pool.clone()), ctx.clone()).await;
    assert!(matches!(result, Err(Error::Conflict(1))), "{result:?}");
    // The pod is not counted as held: the next round may grant it again.
    let pods: HashSet<&str> = ["p-a", "p-b"].into();
    assert!(ctx.claims.current(NS, &pods).is_empty());
    let statuses = api
        .writes()
        .iter()
        .filter(|w| w.path == pool_status_path())
        .count();
    assert_eq!(statuses, 1, "the pool's status is still written");
}

#[tokio::test]
async fn a_pool_at_its_size_that_reported_its_status_writes_nothing() {
    let pool = pool([1, 1, 1, 1]);
    let idle = pool_pod(&pool, "p-a", "127.1.1.2");
    let first = RecordedApi::default();
    first.object(pool_path(), &pool);
    let ctx = context(&first, vec![idle.clone()], vec![], vec![pool.clone()]);
    pool::reconcile(Arc::new(pool.clone()), ctx)
        .await
        .expect("the first reconcile succeeds");
    let writes = first.writes();
    assert_eq!(
        methods_and_paths(&writes),
        [("PATCH".to_string(), pool_status_path())],
        "only the status is new: {writes:#?}"
    );

    // The same pool, now showing the status it wrote, in a fresh process.
    let mut reported = pool.clone();
    reported.status =
        Some(serde_json::from_value(writes[0].body["status"].clone()).expect("a pool status"));
    let second = RecordedApi::default();
    second.object(pool_path(), &reported);
    let ctx = context(&second, vec![idle], vec![], vec![reported.clone()]);
    pool::reconcile(Arc::new(reported), ctx)
        .await
        .expect("the second reconcile succeeds");
    assert_eq!(methods_and_paths(&second.writes()), []);
}

#[tokio::test]
async fn a_new_template_batch_gets_its_finalizer_then_its_pods_then_its_status() {
    let api = RecordedApi::default();
    let mut batch = BatchSandbox::new(
        "web",
        BatchSandboxSpec {
            replicas: 2,
            template: Some(sandbox_template()),
            ..BatchSandboxSpec::default()
        },
    );
    batch.metadata = meta("web", "web-uid", "11");
    api.object(batch_path("web"), &batch);
    let ctx = context(&api, vec![], vec![batch.clone()], vec![]);

    batch::reconcile(Arc::new(batch), ctx)
        .await
        .expect("the reconcile succeeds");

    let writes = api.writes();
    let pods_path = format!("/api/v1/namespaces/{NS}/pods");
    let events_path = format!("/apis/events.k8s.io/v1/namespaces/{NS}/events");
    let shape = methods_and_paths(&writes);
    assert_eq!(
        shape,
        [
            ("PATCH".to_string(), batch_path("web")),
            ("POST".to_string(), pods_path.clone()),
            ("POST".to_string(), pods_path),
            ("POST".to_string(), events_path),
            ("PATCH".to_string(), format!("{}/status", batch_path("web"))),
        ],
        "{writes:#?}"
    );
    assert_eq!(
        writes[0].body,
        json!({"metadata": {"resourceVersion": "11", "finalizers": [names::FINALIZER_BATCH]}}),
        "the finalizer is added conditionally, before any pod exists"
    );
    let mut names: Vec<&str> = writes[1..3]
        .iter()
        .map(|w| w.body["metadata"]["name"].as_str().expect("a pod name"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["web-0", "web-1"]);
    for pod in &writes[1..3] {
        let owners: Vec<OwnerReference> =
            serde_json::from_value(pod.body["metadata"]["ownerReferences"].clone())
                .expect("owner references");
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].uid.as_str(), owners[0].controller),
            ("web-uid", Some(true)),
            "every pod is owned by its batch"
        );
    }
}
