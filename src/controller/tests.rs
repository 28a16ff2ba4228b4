//! Reconcile tests against a recorded API server: the reconcilers run on caches filled with
//! fixtures, every request they send is recorded and answered, and the tests check exactly
//! which writes were made, with their preconditions.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::{Container, Pod, PodCondition, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};

use super::*;
use sandbox_domain::allocation::AllocStatus;
use sandbox_domain::api::{BatchSandboxSpec, CapacitySpec, PoolSpec, RecycleStrategy, RecycleType};

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
    faults: Arc<Mutex<BTreeMap<String, Fault>>>,
    versions: Arc<std::sync::atomic::AtomicU64>,
}

/// A fault injected into every request of one `METHOD path`.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The request takes effect, but its answer is lost (the connection resets).
    CommitThenLose,
    /// The request never gets an answer.
    Hang,
    /// The connection resets before the request takes effect.
    LoseBeforeCommit,
}

impl RecordedApi {
    fn client(&self) -> Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let api = api.clone();
            async move {
                let key = format!("{} {}", request.method(), request.uri().path());
                let fault = api.faults.lock().expect("faults").get(&key).copied();
                match fault {
                    Some(Fault::Hang) => std::future::pending().await,
                    Some(Fault::CommitThenLose) => {
                        api.answer(request).await;
                        Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "connection reset by peer",
                        ))
                    }
                    Some(Fault::LoseBeforeCommit) => Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "connection reset by peer",
                    )),
                    None => Ok(api.answer(request).await),
                }
            }
        });
        Client::new(service, "default")
    }

    fn fault(&self, method: &str, path: &str, fault: Option<Fault>) {
        let mut faults = self.faults.lock().expect("faults");
        let key = format!("{method} {path}");
        match fault {
            Some(fault) => faults.insert(key, fault),
            None => faults.remove(&key),
        };
    }

    /// The stored objects at `paths`, as `K`.
    fn stored<K: serde::de::DeserializeOwned>(&self, paths: &[String]) -> Vec<K> {
        let objects = self.objects.lock().expect("objects");
        paths
            .iter()
            .filter_map(|p| objects.get(p))
            .map(|v| serde_json::from_value(v.clone()).expect("a stored object reads back"))
            .collect()
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
            (None, "GET") => match self.objects.lock().expect("objects").get(&path) {
                Some(object) => (200, object.clone()),
                None => (404, not_found()),
            },
            (None, "PATCH") => {
                let mut objects = self.objects.lock().expect("objects");
                match objects.get_mut(path.trim_end_matches("/status")) {
                    // A resourceVersion in the patch is a precondition, as on a real API server.
                    Some(object)
                        if body.pointer("/metadata/resourceVersion").is_some_and(|v| {
                            Some(v) != object.pointer("/metadata/resourceVersion")
                        }) =>
                    {
                        (409, conflict())
                    }
                    Some(object) => {
                        json_patch::merge(object, &body);
                        let version = 1000
                            + self
                                .versions
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        object["metadata"]["resourceVersion"] = json!(version.to_string());
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

/// A cache holding `objects` (pods cut as the controller caches them).
fn store<K, T: Into<K>>(objects: Vec<T>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object.into()));
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
    let revision = sandbox_domain::pod_template::template_revision(&pool.spec.template);
    let mut pod = sandbox_domain::pod_template::pool_pod(
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

/// The `allocated` count of each Pool status write, in order.
fn pool_status_allocated(api: &RecordedApi) -> Vec<Value> {
    api.writes()
        .iter()
        .filter(|w| w.path == pool_status_path())
        .map(|w| w.body["status"]["allocated"].clone())
        .collect()
}

/// A Pool reconcile, and the grant writes it sent in the background until they are settled.
async fn reconcile_pool(pool: Arc<Pool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let result = pool::reconcile(pool, ctx.clone()).await;
    ctx.grants_in_flight.settled().await;
    result
}

/// Lets `ctx` wake Pool reconciles into the returned receiver, as the router's queue does.
fn pool_wakeups(ctx: &Context) -> mpsc::UnboundedReceiver<ObjectRef<Pool>> {
    let (tx, rx) = mpsc::unbounded_channel();
    ctx.pool_wakeups.set(tx).expect("wakeups are set once");
    rx
}

/// Lets `ctx` wake BatchSandbox reconciles into the returned receiver, as the router's queue does.
fn batch_wakeups(ctx: &Context) -> mpsc::UnboundedReceiver<ObjectRef<BatchSandbox>> {
    let (tx, rx) = mpsc::unbounded_channel();
    ctx.batch_wakeups.set(tx).expect("wakeups are set once");
    rx
}

fn methods_and_paths(writes: &[Request]) -> Vec<(String, String)> {
    writes
        .iter()
        .map(|w| (w.method.clone(), w.path.clone()))
        .collect()
}

/// A pool of three idle pods and a batch `claim` of two, stored in `api` and cached.
fn a_claim_for_two_of_three_idle_pods(api: &RecordedApi) -> (Pool, Vec<Pod>, Arc<Context>) {
    let pool = pool([0, 0, 3, 3]);
    let pods = vec![
        pool_pod(&pool, "p-a", "127.1.1.2"),
        pool_pod(&pool, "p-b", "127.1.1.3"),
        pool_pod(&pool, "p-c", "127.1.1.4"),
    ];
    let batch = pooled_batch("claim", 2, "7");
    api.object(batch_path("claim"), &batch);
    api.object(pool_path(), &pool);
    let ctx = context(api, pods.clone(), vec![batch], vec![pool.clone()]);
    (pool, pods, ctx)
}

/// The whole API cost of a healthy pooled claim: one conditional ledger write (carrying the
/// finalizer and the endpoints) from the Pool reconcile, then one status write from the batch's
/// own reconcile. No event, no Pool status write: those wait behind the claims.
#[tokio::test]
async fn a_healthy_pooled_claim_writes_its_ledger_and_its_status_and_nothing_else() {
    let api = RecordedApi::default();
    let (pool, pods, ctx) = a_claim_for_two_of_three_idle_pods(&api);

    let action = reconcile_pool(Arc::new(pool.clone()), ctx.clone())
        .await
        .expect("the reconcile succeeds");
    assert_eq!(
        action,
        Action::await_change(),
        "sizing and status wait behind the claim, until the grant's event"
    );

    let writes = api.writes();
    assert_eq!(
        methods_and_paths(&writes),
        [("PATCH".to_string(), batch_path("claim"))],
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

    // The batch's reconcile, once the cache shows the grant.
    let granted: BatchSandbox = api.stored(&[batch_path("claim")]).remove(0);
    let ctx = context(&api, pods, vec![granted.clone()], vec![pool]);
    batch::reconcile(Arc::new(granted), ctx)
        .await
        .expect("the batch reconcile succeeds");
    let writes = api.writes();
    assert_eq!(
        methods_and_paths(&writes[1..]),
        [(
            "PATCH".to_string(),
            format!("{}/status", batch_path("claim"))
        )],
        "{writes:#?}"
    );
    assert_eq!(writes[1].body["status"]["ready"], json!(2), "{writes:#?}");
}

/// Counts the shard-task and expiry decisions asked of it, and answers them natively.
#[derive(Default)]
struct CountingPolicies {
    shard_tasks: std::sync::atomic::AtomicUsize,
    expiry: std::sync::atomic::AtomicUsize,
}

impl PolicyEngine for CountingPolicies {
    fn pool_sizing(
        &self,
        s: sandbox_policy::PolicySelector<'_>,
        p: &sandbox_decisions::sizing::PoolSnapshot,
    ) -> sandbox_policy::Outcome<sandbox_decisions::sizing::SizingDecision> {
        sandbox_policy::NativePolicies.pool_sizing(s, p)
    }
    fn shard_tasks(
        &self,
        s: sandbox_policy::PolicySelector<'_>,
        b: &sandbox_policy::ShardTaskInput,
    ) -> sandbox_policy::Outcome<Option<sandbox_policy::ShardTasks>> {
        self.shard_tasks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        sandbox_policy::NativePolicies.shard_tasks(s, b)
    }
    fn expiry(
        &self,
        s: sandbox_policy::PolicySelector<'_>,
        b: &sandbox_decisions::expiry::BatchSnapshot,
    ) -> sandbox_policy::Outcome<sandbox_decisions::expiry::ExpiryDecision> {
        self.expiry
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        sandbox_policy::NativePolicies.expiry(s, b)
    }
    fn pool_selection(
        &self,
        s: sandbox_policy::PolicySelector<'_>,
        i: &sandbox_decisions::selection::SelectionInput,
    ) -> sandbox_policy::Outcome<sandbox_decisions::selection::SelectionDecision> {
        sandbox_policy::NativePolicies.pool_selection(s, i)
    }
}

impl CountingPolicies {
    fn asked(&self) -> (usize, usize) {
        (
            self.shard_tasks.load(std::sync::atomic::Ordering::Relaxed),
            self.expiry.load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

/// Policies are pure functions of their input: a batch reconciled again with the same tasks and
/// no expiry due is not asked about again, a changed batch is, and a batch re-created under the
/// same name (a new uid) starts afresh.
#[tokio::test]
async fn a_batch_reconciled_again_unchanged_asks_its_policies_nothing() {
    let api = RecordedApi::default();
    let (pool, pods, ctx) = a_claim_for_two_of_three_idle_pods(&api);
    reconcile_pool(Arc::new(pool.clone()), ctx)
        .await
        .expect("the granting round succeeds");
    let granted: BatchSandbox = api.stored(&[batch_path("claim")]).remove(0);

    let policies = Arc::new(CountingPolicies::default());
    let ctx = Arc::new(Context::new(
        api.client(),
        Stores {
            pods: store(pods),
            batches: store(vec![granted.clone()]),
            pools: store(vec![pool]),
        },
        policies.clone(),
        test_config(),
        ControllerMetrics::default(),
    ));
    for _ in 0..3 {
        batch::reconcile(Arc::new(granted.clone()), ctx.clone())
            .await
            .expect("the batch reconcile succeeds");
    }
    assert_eq!(policies.asked(), (1, 1), "asked once for three reconciles");

    let mut expiring = granted.clone();
    expiring.spec.expire_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_hours(1),
    ));
    batch::reconcile(Arc::new(expiring.clone()), ctx.clone())
        .await
        .expect("the batch reconcile succeeds");
    batch::reconcile(Arc::new(expiring), ctx.clone())
        .await
        .expect("the batch reconcile succeeds");
    assert_eq!(
        policies.asked(),
        (1, 2),
        "a new expireTime is asked about once; its answer stands until it is due"
    );

    let mut recreated = granted;
    recreated.metadata.uid = Some("another-uid".into());
    batch::reconcile(Arc::new(recreated), ctx.clone())
        .await
        .expect("the batch reconcile succeeds");
    assert_eq!(policies.asked(), (2, 3), "a new uid is a new batch");
}

/// Once its claims are served, a pool sizes itself and reports its status, in one write.
#[tokio::test]
async fn a_pool_reports_its_status_once_its_claims_are_served() {
    let api = RecordedApi::default();
    let pool = pool([0, 0, 3, 3]);
    let pods = vec![
        pool_pod(&pool, "p-a", "127.1.1.2"),
        pool_pod(&pool, "p-b", "127.1.1.3"),
        pool_pod(&pool, "p-c", "127.1.1.4"),
    ];
    let mut batch = pooled_batch("claim", 2, "7");
    batch.metadata.annotations = Some(BTreeMap::from([(
        names::ANNOTATION_ALLOC_STATUS.to_string(),
        r#"{"pods":["p-a","p-b"],"poolRef":"p"}"#.to_string(),
    )]));
    api.object(pool_path(), &pool);
    let ctx = context(&api, pods, vec![batch], vec![pool.clone()]);
    reconcile_pool(Arc::new(pool), ctx)
        .await
        .expect("the reconcile succeeds");
    let writes = api.writes();
    assert_eq!(
        methods_and_paths(&writes),
        [("PATCH".to_string(), pool_status_path())],
        "{writes:#?}"
    );
    let status = &writes[0].body["status"];
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

/// Behind claims served together, a pool's refill waits until every batch it granted reports
/// its pods: the status write is a claim's last, and the refill's pod writes would go to the API
/// server alongside it. The event of the last status awaited wakes the pool, once, and the round
/// it wakes refills. A claim that came alone is refilled once its grant is written.
#[tokio::test]
async fn a_pool_refills_behind_claims_served_together_only_once_each_reports_its_pods() {
    let api = RecordedApi::default();
    let (pool, ctx, mut feed) = two_claims_granted_together(&api).await;
    assert_eq!(
        methods_and_paths(&api.writes()),
        [
            ("PATCH".to_string(), batch_path("first")),
            ("PATCH".to_string(), batch_path("second")),
        ]
    );

    let (pools_tx, mut pools_rx) = mpsc::unbounded_channel();
    let (batches_tx, _batches_rx) = mpsc::unbounded_channel();
    let router = router::Router::new(ctx.clone(), pools_tx, batches_tx);
    let mut pool_wakeups = || std::iter::from_fn(|| pools_rx.try_recv().ok()).count();
    // The batch cache holds an event's copy before the router sees it, as the reflector's does.
    let mut status_event = |batch: BatchSandbox| {
        feed.0
            .apply_watcher_event(&watcher::Event::Apply(batch.clone()));
        router.batch_event(Ok(watcher::Event::Apply(batch)));
    };
    let report = |name: &str| {
        let (api, ctx) = (api.clone(), ctx.clone());
        let name = name.to_string();
        async move {
            let granted: BatchSandbox = api.stored(&[batch_path(&name)]).remove(0);
            batch::reconcile(Arc::new(granted), ctx)
                .await
                .expect("the batch reconcile succeeds");
            let reported: BatchSandbox = api.stored(&[batch_path(&name)]).remove(0);
            assert_eq!(reported.status.as_ref().map(|s| s.allocated), Some(1));
            reported
        }
    };

    // The grants' events: each ledger holds a pod, no status counts it yet. Then one batch
    // reports its pod, the other not yet.
    for name in ["first", "second"] {
        let granted: BatchSandbox = api.stored(&[batch_path(name)]).remove(0);
        assert!(granted.status.is_none());
        status_event(granted);
    }
    pool_wakeups();
    for reported in [None, Some("first")] {
        if let Some(name) = reported {
            status_event(report(name).await);
            assert_eq!(pool_wakeups(), 0, "a status still awaited: {reported:?}");
        }
        let writes_before = api.writes().len();
        let action = reconcile_pool(Arc::new(pool.clone()), ctx.clone())
            .await
            .expect("the round after the grants succeeds");
        assert_eq!(
            action,
            Action::requeue(pacing::STATUS_RECHECK),
            "reported: {reported:?}"
        );
        let writes = api.writes();
        assert_eq!(
            writes.len(),
            writes_before,
            "no refill, no pool status: {writes:#?}"
        );
    }

    // The last status awaited wakes the pool once; the round it wakes refills its buffer.
    let woken_by_status = ctx.metrics.pool_wakes(metrics::PoolWake::StatusReported);
    status_event(report("second").await);
    assert_eq!(pool_wakeups(), 1, "the last status awaited");
    assert_eq!(
        ctx.metrics.pool_wakes(metrics::PoolWake::StatusReported),
        woken_by_status + 1,
        "counted by its cause"
    );
    status_event(api.stored(&[batch_path("second")]).remove(0));
    assert_eq!(pool_wakeups(), 0, "the same status again wakes nothing");
    // Claims that came together are refilled after a quiet time since the last grant, which a
    // burst's statuses outlast; here they came within it.
    std::thread::sleep(pacing::CLAIM_QUIET);
    let writes_before = api.writes().len();
    reconcile_pool(Arc::new(pool.clone()), ctx.clone())
        .await
        .expect("the round after the statuses succeeds");
    let pods_path = format!("/api/v1/namespaces/{NS}/pods");
    assert_eq!(
        methods_and_paths(&api.writes()[writes_before..]),
        [
            ("POST".to_string(), pods_path),
            ("PATCH".to_string(), pool_status_path()),
        ]
    );
}

/// A status that lands while a round records what it waits for is not missed: the round reads
/// the cache again under the lock the router takes, so it sizes at once when the status it
/// would wait for is there already.
#[tokio::test]
async fn a_status_that_lands_while_the_round_looks_is_not_waited_for() {
    let api = RecordedApi::default();
    let (pool, ctx, mut feed) = two_claims_granted_together(&api).await;
    for name in ["first", "second"] {
        let granted: BatchSandbox = api.stored(&[batch_path(name)]).remove(0);
        feed.apply(&ctx, &granted);
        batch::reconcile(Arc::new(granted), ctx.clone())
            .await
            .expect("the batch reconcile succeeds");
    }
    // Both statuses are in the store, but the indexes the round gathers from still hold the
    // copies without them: the store is read again before the round waits.
    for name in ["first", "second"] {
        let reported: BatchSandbox = api.stored(&[batch_path(name)]).remove(0);
        feed.0.apply_watcher_event(&watcher::Event::Apply(reported));
    }
    // Past the quiet time after the grants, as a burst's statuses are.
    std::thread::sleep(pacing::CLAIM_QUIET);
    let writes_before = api.writes().len();
    let action = reconcile_pool(Arc::new(pool.clone()), ctx.clone())
        .await
        .expect("the round after the statuses succeeds");
    assert_ne!(action, Action::requeue(pacing::STATUS_RECHECK));
    let writes = api.writes();
    assert_eq!(
        writes[writes_before..]
            .iter()
            .filter(|w| w.method == "POST")
            .count(),
        1,
        "the refill: {writes:#?}"
    );
}

#[tokio::test]
async fn a_claim_that_came_alone_is_refilled_once_its_grant_is_written() {
    let api = RecordedApi::default();
    let pool = pool([2, 2, 2, 4]);
    let claim = pooled_batch("claim", 1, "7");
    api.object(batch_path("claim"), &claim);
    api.object(pool_path(), &pool);
    let (ctx, mut feed) = context_with_feed(
        &api,
        &pool,
        vec![
            pool_pod(&pool, "p-a", "127.1.1.2"),
            pool_pod(&pool, "p-b", "127.1.1.3"),
        ],
        vec![claim],
    );
    reconcile_pool(Arc::new(pool.clone()), ctx.clone())
        .await
        .expect("the granting round succeeds");
    let granted: BatchSandbox = api.stored(&[batch_path("claim")]).remove(0);
    assert!(granted.status.is_none());
    feed.apply(&ctx, &granted);
    reconcile_pool(Arc::new(pool), ctx)
        .await
        .expect("the round after the grant succeeds");
    let writes = api.writes();
    assert_eq!(
        methods_and_paths(&writes),
        [
            ("PATCH".to_string(), batch_path("claim")),
            ("POST".to_string(), format!("/api/v1/namespaces/{NS}/pods")),
            ("PATCH".to_string(), pool_status_path()),
        ],
        "{writes:#?}"
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

    let mut wakeups = pool_wakeups(&ctx);

    let result = reconcile_pool(Arc::new(pool.clone()), ctx.clone()).await;
    assert!(result.is_ok(), "{result:?}");
    // The pod is not counted as held: the next round may grant it again.
    assert!(ctx.claims.current(NS, |_| Some("7".to_string())).is_empty());
    assert!(
        !ctx.grants_in_flight.contains(&index::Key::new(NS, "claim")),
        "the batch is planned again"
    );
    assert_eq!(
        wakeups.try_recv().ok(),
        Some(ObjectRef::new("p").within(NS)),
        "the pool is woken to plan again"
    );
}

/// A round that grants waits for its grants' outcomes instead of looking again on a timer: a
/// committed grant's batch event wakes the pool, and a refused grant, for which no event comes,
/// wakes it itself.
#[tokio::test]
async fn a_granting_round_is_woken_by_each_grant_outcome_not_by_a_timer() {
    let pool = pool([0, 0, 2, 2]);
    let pods = vec![
        pool_pod(&pool, "p-a", "127.1.1.2"),
        pool_pod(&pool, "p-b", "127.1.1.3"),
    ];
    for (status, woken) in [(None, false), (Some(403), true)] {
        let api = RecordedApi::default();
        api.object(pool_path(), &pool);
        api.object(batch_path("claim"), &pooled_batch("claim", 1, "7"));
        if let Some(code) = status {
            api.reply(
                "PATCH",
                &batch_path("claim"),
                code,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": code, "message": "denied"}),
            );
        }
        let ctx = context(
            &api,
            pods.clone(),
            vec![pooled_batch("claim", 1, "7")],
            vec![pool.clone()],
        );
        let mut wakeups = pool_wakeups(&ctx);
        let action = reconcile_pool(Arc::new(pool.clone()), ctx)
            .await
            .expect("the round succeeds");
        assert_eq!(action, Action::await_change(), "refused: {status:?}");
        assert_eq!(
            wakeups.try_recv().ok(),
            woken.then(|| ObjectRef::new("p").within(NS)),
            "refused: {status:?}"
        );
    }
}

#[tokio::test]
async fn a_pool_at_its_size_that_reported_its_status_writes_nothing() {
    let pool = pool([1, 1, 1, 1]);
    let idle = pool_pod(&pool, "p-a", "127.1.1.2");
    let first = RecordedApi::default();
    first.object(pool_path(), &pool);
    let ctx = context(&first, vec![idle.clone()], vec![], vec![pool.clone()]);
    reconcile_pool(Arc::new(pool.clone()), ctx)
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
    reconcile_pool(Arc::new(reported), ctx)
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

/// A store and the writer that fills it, for tests that change the cache between reconciles.
fn writable_store<K, T: Into<K>>(objects: Vec<T>) -> (Store<K>, reflector::store::Writer<K>)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object.into()));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    (store, writer)
}

fn test_config() -> ControllerConfig {
    ControllerConfig {
        executor: ExecutorSettings {
            pool_injection: PoolInjection::Annotated,
            ..ExecutorSettings::default()
        },
        ..ControllerConfig::default()
    }
}

/// A batch cache a test changes as the watch would: each change lands in the store and in the
/// indexes, as the router applies it.
struct BatchFeed(reflector::store::Writer<BatchSandbox>);

impl BatchFeed {
    fn apply(&mut self, ctx: &Context, batch: &BatchSandbox) {
        self.0
            .apply_watcher_event(&watcher::Event::Apply(batch.clone()));
        ctx.index
            .with(|i| i.batch_applied(&Arc::new(batch.clone())));
    }
}

/// A context over `pool`, its `pods` and `batches`, whose batch cache the test feeds.
/// A pool of three idle pods (buffer 2..3) and the round that grants it two claims created
/// together, "first" and "second", one pod each; neither grant's status is written yet.
async fn two_claims_granted_together(api: &RecordedApi) -> (Pool, Arc<Context>, BatchFeed) {
    let pool = pool([2, 2, 3, 5]);
    let first = batch_created("first", 1, "7", 0);
    let second = batch_created("second", 1, "8", 1);
    api.object(batch_path("first"), &first);
    api.object(batch_path("second"), &second);
    api.object(pool_path(), &pool);
    let (ctx, feed) = context_with_feed(
        api,
        &pool,
        vec![
            pool_pod(&pool, "p-a", "127.1.1.2"),
            pool_pod(&pool, "p-b", "127.1.1.3"),
            pool_pod(&pool, "p-c", "127.1.1.4"),
        ],
        vec![first, second],
    );
    reconcile_pool(Arc::new(pool.clone()), ctx.clone())
        .await
        .expect("the granting round succeeds");
    (pool, ctx, feed)
}

fn context_with_feed(
    api: &RecordedApi,
    pool: &Pool,
    pods: Vec<Pod>,
    batches: Vec<BatchSandbox>,
) -> (Arc<Context>, BatchFeed) {
    let (batch_store, writer) = writable_store(batches);
    let ctx = Arc::new(context_from(
        api,
        Stores {
            pods: store(pods),
            batches: batch_store,
            pools: store(vec![pool.clone()]),
        },
        test_config(),
    ));
    (ctx, BatchFeed(writer))
}

fn context_from(api: &RecordedApi, stores: Stores, config: ControllerConfig) -> Context {
    Context::new(
        api.client(),
        stores,
        Arc::new(sandbox_policy::NativePolicies),
        config,
        ControllerMetrics::default(),
    )
}

/// Batch names each stored ledger gives every pod, across all `batches`.
fn holders(api: &RecordedApi, batches: &[&str]) -> BTreeMap<String, Vec<String>> {
    let paths: Vec<String> = batches.iter().map(|b| batch_path(b)).collect();
    let mut holders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for batch in api.stored::<BatchSandbox>(&paths) {
        let ledger = AllocStatus::of(&batch).expect("a readable ledger");
        for pod in ledger.pods {
            holders.entry(pod).or_default().push(batch.name_any());
        }
    }
    holders
}

fn batch_created(name: &str, replicas: i32, resource_version: &str, second: i64) -> BatchSandbox {
    let mut batch = pooled_batch(name, replicas, resource_version);
    batch.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + second).expect("a time"),
    ));
    batch
}

/// A grant write that committed but whose answer was lost keeps its pod held: a later round on
/// a cache that has not seen the write (a watch reconnecting) never gives that pod to another
/// batch, even when a new idle pod changes the plan.
#[tokio::test]
async fn a_grant_whose_answer_was_lost_is_never_handed_to_another_batch() {
    let api = RecordedApi::default();
    let pool = pool([0, 0, 1, 3]);
    let older = batch_created("older", 1, "7", 0);
    let newer = batch_created("newer", 1, "8", 1);
    api.object(batch_path("older"), &older);
    api.object(batch_path("newer"), &newer);
    api.object(pool_path(), &pool);
    api.fault("PATCH", &batch_path("older"), Some(Fault::CommitThenLose));
    let (pods, mut pod_writer) = writable_store(vec![pool_pod(&pool, "p-b", "127.1.1.3")]);
    let ctx = Arc::new(context_from(
        &api,
        Stores {
            pods,
            batches: store(vec![older, newer]),
            pools: store(vec![pool.clone()]),
        },
        test_config(),
    ));

    // Round 1: "older" gets p-b; the write lands but its answer is lost.
    let first = reconcile_pool(Arc::new(pool.clone()), ctx.clone()).await;
    assert_eq!(
        holders(&api, &["older", "newer"]),
        BTreeMap::from([("p-b".to_string(), vec!["older".to_string()])]),
        "the lost write committed ({first:?})"
    );
    api.fault("PATCH", &batch_path("older"), None);

    // Round 2: the batch cache is unchanged (its watch has not caught up); a new pod whose name
    // sorts first turned Ready, so "older" is planned p-a (and loses the race) and "newer" is next.
    let new_pod = CachedPod::from(pool_pod(&pool, "p-a", "127.1.1.2"));
    pod_writer.apply_watcher_event(&watcher::Event::Apply(new_pod.clone()));
    ctx.index
        .with(|i| i.pod_applied(&Arc::new(new_pod.clone())));
    let _ = reconcile_pool(Arc::new(pool.clone()), ctx.clone()).await;

    let holders = holders(&api, &["older", "newer"]);
    assert!(
        holders.values().all(|h| h.len() == 1),
        "a pod was handed out twice: {holders:?}"
    );
    let stored_pods = vec![
        pool_pod(&pool, "p-a", "127.1.1.2"),
        pool_pod(&pool, "p-b", "127.1.1.3"),
    ];
    let batches: Vec<BatchSandbox> = api.stored(&[batch_path("older"), batch_path("newer")]);
    let violations = sandbox_domain::invariants::check(
        &stored_pods,
        &batches,
        &[pool],
        sandbox_domain::invariants::Counts::Skip,
    );
    assert_eq!(violations, [], "{violations:#?}");
}

/// A pod the pool deleted, whose deletion's answer was lost, is not granted while the cache
/// still shows it live: it may be on its way out.
#[tokio::test]
async fn a_pod_whose_deletion_went_unanswered_is_not_granted() {
    let pool = pool([0, 0, 1, 1]);
    let api = RecordedApi::default();
    api.object(pool_path(), &pool);
    api.fault("DELETE", &pod_path("p-b"), Some(Fault::CommitThenLose));
    let (ctx, mut feed) = context_with_feed(
        &api,
        &pool,
        vec![
            pool_pod(&pool, "p-a", "127.1.1.2"),
            pool_pod(&pool, "p-b", "127.1.1.3"),
        ],
        vec![],
    );
    // One pod too many: p-b goes, and the answer is lost.
    let shrink = reconcile_pool(Arc::new(pool.clone()), ctx.clone()).await;
    let writes = methods_and_paths(&api.writes());
    assert!(
        writes.contains(&("DELETE".to_string(), pod_path("p-b"))),
        "p-b is deleted ({shrink:?}): {writes:#?}"
    );
    // Two claims arrive while the pod cache still shows p-b live and idle.
    for (name, second) in [("w1", 1), ("w2", 2)] {
        let claim = batch_created(name, 1, "7", second);
        api.object(batch_path(name), &claim);
        feed.apply(&ctx, &claim);
    }
    let _ = reconcile_pool(Arc::new(pool), ctx.clone()).await;
    let claimed = ctx.claims.current(NS, |_| Some("7".into()));
    assert_eq!(
        claimed,
        HashSet::from(["p-a".to_string()]),
        "only p-a is granted"
    );
}

/// The same for an orphan of another revision that the pool takes back by deleting it: once
/// its deletion is sent, it is not granted while the cache still shows it, and not deleted again.
#[tokio::test]
async fn an_orphan_whose_deletion_went_unanswered_is_not_granted() {
    let pool = pool([0, 0, 1, 1]);
    let mut orphan = pool_pod(&pool, "stale", "127.1.1.2");
    orphan.metadata.owner_references = None;
    orphan
        .metadata
        .labels
        .get_or_insert_default()
        .insert(names::LABEL_POOL_REVISION.into(), "old".into());
    let api = RecordedApi::default();
    api.object(pool_path(), &pool);
    api.object(pod_path("stale"), &orphan);
    api.fault("DELETE", &pod_path("stale"), Some(Fault::CommitThenLose));
    let (ctx, mut feed) = context_with_feed(&api, &pool, vec![orphan], vec![]);
    let first = reconcile_pool(Arc::new(pool.clone()), ctx.clone()).await;
    let deletions = |api: &RecordedApi| {
        methods_and_paths(&api.writes())
            .into_iter()
            .filter(|w| *w == ("DELETE".to_string(), pod_path("stale")))
            .count()
    };
    assert_eq!(deletions(&api), 1, "the orphan is deleted ({first:?})");
    api.fault("DELETE", &pod_path("stale"), None);
    // A claim arrives while the pod cache still shows the orphan live and idle.
    let claim = batch_created("w1", 1, "7", 1);
    api.object(batch_path("w1"), &claim);
    feed.apply(&ctx, &claim);
    let _ = reconcile_pool(Arc::new(pool), ctx.clone()).await;
    assert_eq!(
        ctx.claims.current(NS, |_| Some("7".into())),
        HashSet::new(),
        "the orphan on its way out is not granted"
    );
    assert_eq!(deletions(&api), 1, "nor deleted twice");
}

/// A fresh pooled batch whose grant its pool is already writing (the pool's round came before
/// the batch's own reconcile, so the pool has no idle pod left) writes no status: the write would
/// change its resourceVersion and make the conditional grant lose its race.
#[tokio::test]
async fn a_fresh_batch_whose_grant_is_being_written_writes_no_status() {
    let api = RecordedApi::default();
    let pool = pool([0, 0, 1, 1]);
    let claim = batch_created("claim", 1, "7", 0);
    api.object(batch_path("claim"), &claim);
    api.object(pool_path(), &pool);
    api.fault("PATCH", &batch_path("claim"), Some(Fault::Hang));
    let ctx = context(
        &api,
        vec![pool_pod(&pool, "p-a", "127.1.1.2")],
        vec![claim.clone()],
        vec![pool.clone()],
    );
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        pool::reconcile(Arc::new(pool), ctx.clone()),
    )
    .await
    .expect("the round returns while its write hangs")
    .expect("the round succeeds");
    assert!(ctx.grants_in_flight.contains(&index::Key::new(NS, "claim")));
    batch::reconcile(Arc::new(claim), ctx.clone())
        .await
        .expect("the batch reconciles");
    let writes = api.writes();
    assert!(
        !writes
            .iter()
            .any(|w| w.path == format!("{}/status", batch_path("claim"))),
        "no status write while the grant is in flight: {writes:#?}"
    );
}

/// A refused grant does not end the round: the other grants' outcomes are still recorded, so
/// their pods stay held while the cache lags.
#[tokio::test]
async fn every_grant_outcome_is_handled_after_a_refusal() {
    let api = RecordedApi::default();
    let pool = pool([0, 0, 2, 2]);
    let refused = batch_created("refused", 1, "7", 0);
    let granted = batch_created("granted", 1, "8", 1);
    api.object(batch_path("granted"), &granted);
    api.object(pool_path(), &pool);
    api.reply(
        "PATCH",
        &batch_path("refused"),
        403,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "denied"}),
    );
    let ctx = context(
        &api,
        vec![
            pool_pod(&pool, "p-a", "127.1.1.2"),
            pool_pod(&pool, "p-b", "127.1.1.3"),
        ],
        vec![refused, granted],
        vec![pool.clone()],
    );
    let _ = reconcile_pool(Arc::new(pool), ctx.clone()).await;
    let versions = |batch: &str| Some(if batch == "refused" { "7" } else { "8" }.to_string());
    assert_eq!(
        ctx.claims.current(NS, versions),
        HashSet::from(["p-b".to_string()]),
        "the granted pod stays claimed, the refused one is free"
    );
}

/// An API server that holds `batch` and `pool` and answers each patch of the batch (a grant)
/// with 403 Forbidden, "denied by policy" (as RBAC or an admission policy would).
fn api_refusing_grants_to(batch: &BatchSandbox, pool: &Pool) -> RecordedApi {
    let api = RecordedApi::default();
    let name = batch.name_any();
    api.object(batch_path(&name), batch);
    api.object(pool_path(), pool);
    api.reply(
        "PATCH",
        &batch_path(&name),
        403,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "denied by policy"}),
    );
    api
}

/// A grant the API server rejects for what it is (here a 403) would be rejected again: the batch
/// is held back from its pool's plans for a backoff instead of being granted again at the pace
/// of the pool's rounds, and a Warning event tells its owner why it gets no pods; the pool's
/// other batches are served meanwhile.
#[tokio::test]
async fn a_rejected_grant_is_not_sent_again_before_its_backoff() {
    let pool = pool([0, 0, 2, 2]);
    let denied = batch_created("denied", 1, "7", 0);
    let api = api_refusing_grants_to(&denied, &pool);
    let (ctx, mut feed) = context_with_feed(
        &api,
        &pool,
        vec![
            pool_pod(&pool, "p-a", "127.1.1.2"),
            pool_pod(&pool, "p-b", "127.1.1.3"),
        ],
        vec![denied],
    );
    let _wakeups = pool_wakeups(&ctx);
    let _ = pool::reconcile(Arc::new(pool.clone()), ctx.clone()).await;
    wait_for_writes(&api, "the rejection's event", |writes| {
        writes
            .iter()
            .any(|w| w.method == "POST" && w.body["reason"] == "AllocationRejected")
    })
    .await;
    let patches = |api: &RecordedApi, batch: &str| {
        methods_and_paths(&api.writes())
            .into_iter()
            .filter(|w| *w == ("PATCH".to_string(), batch_path(batch)))
            .count()
    };
    assert_eq!(patches(&api, "denied"), 1);

    // The next rounds come at once (a new claim arrives): the rejected batch is not planned.
    let other = batch_created("other", 1, "8", 1);
    api.object(batch_path("other"), &other);
    feed.apply(&ctx, &other);
    let _ = pool::reconcile(Arc::new(pool.clone()), ctx.clone()).await;
    wait_for_writes(&api, "other's grant", |writes| {
        writes.iter().any(|w| w.path == batch_path("other"))
    })
    .await;
    let _ = pool::reconcile(Arc::new(pool), ctx.clone()).await;
    // The backoff's first step is at least 200 ms; these rounds ran within it.
    assert!(
        ctx.rejected_grants
            .held_back(&index::Key::new(NS, "denied"), std::time::Instant::now()),
        "the rounds above took longer than the first backoff step"
    );
    ctx.grants_in_flight.settled().await;
    assert_eq!(
        patches(&api, "denied"),
        1,
        "the rejected grant is not sent again during its backoff: {:#?}",
        methods_and_paths(&api.writes())
    );
}

/// A rejected grant wakes its batch, whose status then tells why it has no pods, in the API
/// server's words (its first reconcile left the status to the grant). Once a grant commits, the
/// batch holds its pods and the condition goes.
#[tokio::test]
async fn a_rejected_grant_is_told_in_its_batchs_status() {
    let pool = pool([0, 0, 1, 1]);
    let denied = batch_created("denied", 1, "7", 0);
    let api = api_refusing_grants_to(&denied, &pool);
    let (ctx, _feed) = context_with_feed(
        &api,
        &pool,
        vec![pool_pod(&pool, "p-a", "127.1.1.2")],
        vec![denied.clone()],
    );
    let _pools = pool_wakeups(&ctx);
    let mut batches = batch_wakeups(&ctx);
    let _ = pool::reconcile(Arc::new(pool), ctx.clone()).await;
    let woken = tokio::time::timeout(std::time::Duration::from_secs(30), batches.recv())
        .await
        .ok()
        .flatten()
        .expect("the batch is woken");
    assert_eq!(woken.name, "denied");

    batch::reconcile(Arc::new(denied.clone()), ctx.clone())
        .await
        .expect("the reconcile succeeds");
    let status_writes: Vec<serde_json::Value> = api
        .writes()
        .into_iter()
        .filter(|w| w.method == "PATCH" && w.path == format!("{}/status", batch_path("denied")))
        .map(|w| w.body)
        .collect();
    assert_eq!(status_writes.len(), 1, "{status_writes:#?}");
    let unavailable = status_writes[0]["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "PoolUnavailable"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(unavailable["status"], "True", "{unavailable}");
    assert_eq!(unavailable["reason"], "AllocationRejected");
    assert!(
        unavailable["message"]
            .as_str()
            .is_some_and(|m| m.contains("denied by policy")),
        "{unavailable}"
    );

    // A batch holding its pods is told of no rejection, whatever the record says (its ledger's
    // event may come before the answer to the grant that committed).
    use sandbox_decisions::tasks::TaskPhase;
    use sandbox_domain::status::{PoolSituation, ShardView};
    let shard = |has_pod| ShardView {
        released: false,
        has_pod,
        ready: has_pod,
        task: TaskPhase::None,
    };
    assert_eq!(
        batch::pool_situation(&denied, &ctx, &[shard(true)]),
        PoolSituation::Fine
    );
    assert!(matches!(
        batch::pool_situation(&denied, &ctx, &[shard(false)]),
        PoolSituation::AllocationRejected { .. }
    ));
    ctx.rejected_grants
        .committed(&index::Key::new(NS, "denied"));
    assert_eq!(
        batch::pool_situation(&denied, &ctx, &[shard(false)]),
        PoolSituation::Fine,
        "a grant committed since"
    );
}

/// A batch whose ledger cannot be read is left out; the rest of its pool is served.
#[tokio::test]
async fn an_unreadable_ledger_does_not_stall_its_pool() {
    let api = RecordedApi::default();
    let pool = pool([0, 0, 2, 2]);
    let mut corrupt = batch_created("corrupt", 1, "5", 0);
    corrupt.metadata.annotations = Some(BTreeMap::from([(
        names::ANNOTATION_ALLOC_STATUS.to_string(),
        "{".to_string(),
    )]));
    let healthy = batch_created("healthy", 1, "7", 1);
    api.object(batch_path("healthy"), &healthy);
    api.object(pool_path(), &pool);
    let (pods, mut pod_writer) = writable_store(vec![pool_pod(&pool, "p-a", "127.1.1.2")]);
    let ctx = Arc::new(context_from(
        &api,
        Stores {
            pods,
            batches: store(vec![corrupt, healthy]),
            pools: store(vec![pool.clone()]),
        },
        test_config(),
    ));
    made_here(&ctx, &mut pod_writer, pool_pod(&pool, "p-b", "127.1.1.3"));
    let result = reconcile_pool(Arc::new(pool), ctx).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        holders(&api, &["healthy"]),
        BTreeMap::from([("p-b".to_string(), vec!["healthy".to_string()])]),
        "the pod this process made is granted; the older one, which the unreadable ledger may \
         hold, is not"
    );
}

/// Adds `pod` to the pod cache as one `ctx`'s process made.
fn made_here(ctx: &Context, pods: &mut reflector::store::Writer<CachedPod>, mut pod: Pod) {
    pod.annotations_mut().insert(
        names::ANNOTATION_POD_MAKER.to_string(),
        ctx.incarnation.clone(),
    );
    let pod = CachedPod::from(pod);
    pods.apply_watcher_event(&watcher::Event::Apply(pod.clone()));
    ctx.index.with(|i| i.pod_applied(&Arc::new(pod.clone())));
}

/// A ledger this process saw readable and then unreadable holds what it last named, and only
/// that: the pool's other pods are granted as usual.
#[tokio::test]
async fn a_ledger_turned_unreadable_holds_the_pods_it_last_named() {
    let api = RecordedApi::default();
    let pool = pool([0, 0, 2, 2]);
    let readable = with_ledger(batch_created("turned", 1, "5", 0), &["p-a"]);
    let healthy = batch_created("healthy", 1, "7", 1);
    api.object(batch_path("healthy"), &healthy);
    api.object(pool_path(), &pool);
    let (ctx, mut feed) = context_with_feed(
        &api,
        &pool,
        vec![
            pool_pod(&pool, "p-a", "127.1.1.2"),
            pool_pod(&pool, "p-b", "127.1.1.3"),
        ],
        vec![readable.clone()],
    );
    // The first round sees the ledger readable.
    reconcile_pool(Arc::new(pool.clone()), ctx.clone())
        .await
        .expect("the first round succeeds");
    let mut corrupt = readable;
    corrupt
        .annotations_mut()
        .insert(names::ANNOTATION_ALLOC_STATUS.to_string(), "{".to_string());
    corrupt.metadata.resource_version = Some("6".into());
    for batch in [corrupt, healthy] {
        feed.apply(&ctx, &batch);
    }
    reconcile_pool(Arc::new(pool), ctx)
        .await
        .expect("the second round succeeds");
    assert_eq!(
        holders(&api, &["healthy"]),
        BTreeMap::from([("p-b".to_string(), vec!["healthy".to_string()])]),
    );
}

/// The batch with the unreadable ledger reports it in a condition, and its deletion completes:
/// the pods it may hold are deleted first, never returned to the pool (this process never saw
/// the ledger readable, so those are the pool's pods created before it began watching that no
/// readable ledger names).
#[tokio::test]
async fn a_batch_with_an_unreadable_ledger_reports_it_and_can_still_be_deleted() {
    let pool = pool([0, 0, 3, 3]);
    let mut corrupt = batch_created("corrupt", 1, "5", 0);
    corrupt.metadata.annotations = Some(BTreeMap::from([(
        names::ANNOTATION_ALLOC_STATUS.to_string(),
        "{".to_string(),
    )]));
    let api = RecordedApi::default();
    api.object(batch_path("corrupt"), &corrupt);
    let ctx = context(
        &api,
        vec![pool_pod(&pool, "p-a", "127.1.1.2")],
        vec![corrupt.clone()],
        vec![pool.clone()],
    );
    batch::reconcile(Arc::new(corrupt.clone()), ctx)
        .await
        .expect("the reconcile reports instead of failing");
    let status = api
        .writes()
        .into_iter()
        .find(|w| w.path == format!("{}/status", batch_path("corrupt")))
        .expect("a status write");
    assert_eq!(
        status.body["status"]["conditions"][0]["type"],
        batch::CONDITION_LEDGER_UNREADABLE
    );

    let mut deleting = corrupt;
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    deleting.metadata.finalizers = Some(vec![names::FINALIZER_BATCH.into()]);
    let other = with_ledger(batch_created("other", 1, "9", 1), &["p-held"]);
    let api = RecordedApi::default();
    api.object(batch_path("corrupt"), &deleting);
    let (pods, mut pod_writer) = writable_store(vec![
        pool_pod(&pool, "p-a", "127.1.1.2"),
        pool_pod(&pool, "p-held", "127.1.1.3"),
    ]);
    let ctx = Arc::new(context_from(
        &api,
        Stores {
            pods,
            batches: store(vec![deleting.clone(), other]),
            pools: store(vec![pool]),
        },
        test_config(),
    ));
    let pool = ctx.pools.state()[0].as_ref().clone();
    made_here(&ctx, &mut pod_writer, pool_pod(&pool, "p-new", "127.1.1.4"));
    batch::reconcile(Arc::new(deleting), ctx)
        .await
        .expect("the cleanup completes");
    let writes = methods_and_paths(&api.writes());
    let pod_writes: Vec<_> = writes.iter().filter(|w| w.1.contains("/pods")).collect();
    assert_eq!(
        pod_writes,
        [&("DELETE".to_string(), pod_path("p-a"))],
        "only the older pod no readable ledger names is deleted: {writes:#?}"
    );
    assert_pod_deleted_before_finalizer(&writes, "p-a", "corrupt");
}

/// Asserts that `writes` delete `pod` before they patch `batch` (its finalizer coming off).
fn assert_pod_deleted_before_finalizer(writes: &[(String, String)], pod: &str, batch: &str) {
    let position =
        |method: &str, path: String| writes.iter().position(|(m, p)| m == method && *p == path);
    let deleted = position("DELETE", pod_path(pod));
    let finalizer = position("PATCH", batch_path(batch));
    assert!(
        matches!((deleted, finalizer), (Some(d), Some(f)) if d < f),
        "{pod} is deleted before {batch}'s finalizer comes off: {writes:#?}"
    );
}

/// A ledger is only an annotation: entries naming pods that are not the pool's (another batch's
/// pod, another pool's pod) are neither dispatched to nor deleted when the batch goes.
#[tokio::test]
async fn forged_ledger_entries_are_never_deleted() {
    let pool = pool([0, 0, 1, 1]);
    let mut other_pool = pool.clone();
    other_pool.metadata = ObjectMeta {
        uid: Some("other-pool-uid".into()),
        ..meta("q", "other-pool-uid", "1")
    };
    let mut foreign = pool_pod(&other_pool, "q-a", "127.1.1.9");
    foreign
        .metadata
        .labels
        .get_or_insert_default()
        .insert(names::LABEL_POOL_NAME.into(), "q".into());
    let mut victim = pool_pod(&pool, "victim-0", "127.1.1.8");
    victim.metadata.labels = Some(BTreeMap::from([
        (names::LABEL_BATCH_NAME.to_string(), "victim".to_string()),
        (
            names::LABEL_MANAGED_BY.to_string(),
            names::MANAGED_BY.to_string(),
        ),
    ]));
    victim.metadata.owner_references = Some(vec![OwnerReference {
        kind: "BatchSandbox".into(),
        name: "victim".into(),
        uid: "victim-uid".into(),
        controller: Some(true),
        ..OwnerReference::default()
    }]);
    let mut thief = batch_created("thief", 2, "5", 0);
    thief.metadata.annotations = Some(BTreeMap::from([(
        names::ANNOTATION_ALLOC_STATUS.to_string(),
        r#"{"pods":["victim-0","q-a"],"poolRef":"p"}"#.to_string(),
    )]));
    thief.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    thief.metadata.finalizers = Some(vec![names::FINALIZER_BATCH.into()]);
    let api = RecordedApi::default();
    api.object(batch_path("thief"), &thief);
    let ctx = context(
        &api,
        vec![victim, foreign],
        vec![thief.clone()],
        vec![pool, other_pool],
    );
    batch::reconcile(Arc::new(thief), ctx)
        .await
        .expect("the cleanup completes");
    let writes = api.writes();
    assert!(
        writes.iter().all(|w| w.method != "DELETE"),
        "a pod outside the pool was deleted: {writes:#?}"
    );
    assert!(
        writes.iter().any(|w| w.path == batch_path("thief")),
        "the finalizer still comes off: {writes:#?}"
    );
}

/// A fake task executor on 127.0.0.1 that answers every call with `tasks` (JSON).
async fn fake_executor(tasks: String) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the fake executor");
    let port = listener.local_addr().expect("an address").port();
    let tasks = hyper::body::Bytes::from(tasks);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tasks = tasks.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    let tasks = tasks.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(tasks))
                                .expect("a response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// A context caching `pod`, `batch` and `pool`, whose task executors answer on 127.0.0.1:`port`.
fn context_with_executor(
    api: &RecordedApi,
    pod: &Pod,
    batch: &BatchSandbox,
    pool: &Pool,
    port: u16,
) -> Arc<Context> {
    let mut ctx = context_from(
        api,
        Stores {
            pods: store(vec![pod.clone()]),
            batches: store(vec![batch.clone()]),
            pools: store(vec![pool.clone()]),
        },
        test_config(),
    );
    ctx.executor = sandbox_executor::client::ExecutorClient::new(None).with_port(port);
    Arc::new(ctx)
}

/// A fake task executor whose tasks never stop: every call answers one task being deleted.
async fn stubborn_executor() -> u16 {
    fake_executor(
        r#"[{"name":"t","deletionTimestamp":"2026-01-01T00:00:00Z","process":{"command":["sleep","inf"]}}]"#
            .into(),
    )
    .await
}

/// Under `taskResourcePolicyWhenCompleted: Release`, a pooled shard whose task finished has its
/// result recorded first while the ledger still holds its pod; the next reconcile recycles the
/// pod (under `Delete`, deletes it) and only then lets the ledger go of it. Let go first, the
/// pod would look idle to the pool, with the finished task's files in it, until its deletion
/// reached the cache.
#[tokio::test]
async fn a_finished_shard_keeps_its_pod_held_until_the_pod_is_recycled() {
    let pool = pool([0, 0, 1, 1]);
    let config = test_config();
    let mut held = pool_pod(&pool, "p-a", "127.0.0.1");
    config.executor.prepare(&mut held, true);
    let mut batch = with_ledger(batch_created("fin", 1, "5", 0), &["p-a"]);
    batch.spec.task_template = Some(
        serde_json::from_value(json!({"spec": {"process": {"command": ["true"]}}}))
            .expect("a task template"),
    );
    batch.spec.task_resource_policy_when_completed =
        Some(sandbox_domain::api::TaskResourcePolicy::Release);
    // As the grant wrote it, so the reconciles' only writes are the release's.
    batch.annotations_mut().insert(
        names::ANNOTATION_ENDPOINTS.into(),
        r#"[{"sandbox_id":"0","ip":"127.0.0.1"}]"#.into(),
    );
    let finished = json!([{
        "name": tasks::task_name(&batch, 0),
        "process": {"command": ["true"]},
        "processStatus": {"terminated": {"exitCode": 0, "reason": "Completed", "allProcessesEnded": true}},
    }]);
    let port = fake_executor(finished.to_string()).await;
    let api = RecordedApi::default();
    api.object(batch_path("fin"), &batch);
    let reconcile = |copy: BatchSandbox| {
        let ctx = context_with_executor(&api, &held, &copy, &pool, port);
        batch::reconcile(Arc::new(copy), ctx)
    };
    let stored = || -> BatchSandbox { api.stored(&[batch_path("fin")]).remove(0) };

    reconcile(batch)
        .await
        .expect("the first reconcile succeeds");
    let marked = stored();
    assert_eq!(
        marked.annotations().get(names::ANNOTATION_TASK_RESULTS),
        Some(&r#"{"0":"Succeeded"}"#.to_string()),
        "the result is recorded"
    );
    assert_eq!(
        AllocStatus::of(&marked).expect("a ledger").pods,
        ["p-a"],
        "the ledger still holds the pod"
    );
    let writes = api.writes();
    assert!(
        writes.iter().all(|w| w.method != "DELETE"),
        "nothing is deleted yet: {writes:#?}"
    );

    let before = writes.len();
    reconcile(marked)
        .await
        .expect("the second reconcile succeeds");
    let writes = methods_and_paths(&api.writes()[before..]);
    assert_pod_deleted_before_finalizer(&writes, "p-a", "fin");
    assert_eq!(
        AllocStatus::of(&stored()).expect("a ledger").pods,
        [""],
        "then the ledger lets go"
    );
}

/// A task that ignores SIGTERM pins its batch only until the cleanup deadline: then its pod is
/// deleted (not recycled), a Warning event says so, and the finalizer comes off.
#[tokio::test]
async fn a_cleanup_past_its_deadline_deletes_the_pods_of_tasks_that_do_not_stop() {
    let pool = pool([0, 0, 1, 1]);
    let config = test_config();
    let mut held = pool_pod(&pool, "p-a", "127.0.0.1");
    config.executor.prepare(&mut held, true);
    let mut batch = batch_created("stuck", 1, "5", 0);
    batch.metadata.annotations = Some(BTreeMap::from([(
        names::ANNOTATION_ALLOC_STATUS.to_string(),
        r#"{"pods":["p-a"],"poolRef":"p"}"#.to_string(),
    )]));
    batch.metadata.finalizers = Some(vec![names::FINALIZER_BATCH.into()]);
    let port = stubborn_executor().await;
    let mut outcomes = Vec::new();
    let mut deleting_for_pool = Vec::new();
    for deleted_ago in [1, 120] {
        let mut deleting = batch.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(
                    k8s_openapi::jiff::Timestamp::now().as_second() - deleted_ago,
                )
                .expect("a time"),
            ));
        let api = RecordedApi::default();
        api.object(batch_path("stuck"), &deleting);
        let ctx = context_with_executor(&api, &held, &deleting, &pool, port);
        batch::reconcile(Arc::new(deleting), ctx.clone())
            .await
            .expect("the cleanup reconcile succeeds");
        outcomes.push(api.writes());
        let (_, deleting) = ctx
            .expectations
            .pending(&format!("{NS}/p"), |_| true, |_| true);
        deleting_for_pool.push(deleting);
    }
    let [before, after] = &outcomes[..] else {
        unreachable!()
    };
    assert_eq!(
        deleting_for_pool,
        [HashSet::new(), HashSet::from(["p-a".to_string()])],
        "the forced deletion counts for the pool as one from the moment it is sent"
    );
    assert!(
        before.is_empty(),
        "within the deadline the cleanup waits for the tasks: {before:#?}"
    );
    let shape: Vec<(String, String)> = methods_and_paths(after);
    assert!(
        shape.contains(&(
            "DELETE".to_string(),
            format!("/api/v1/namespaces/{NS}/pods/p-a")
        )),
        "{after:#?}"
    );
    assert!(
        after
            .iter()
            .any(|w| w.body["reason"] == "CleanupForced" && w.body["type"] == "Warning"),
        "{after:#?}"
    );
    let finalizer = after
        .iter()
        .find(|w| w.path == batch_path("stuck"))
        .expect("the finalizer comes off");
    assert_eq!(finalizer.body["metadata"]["finalizers"], json!([]));
}

/// A pool deleted with `--cascade=orphan` leaves its pods without owners: the drain still finds
/// them by label and deletes the idle ones before the Pool goes.
#[tokio::test]
async fn a_pool_deleted_with_orphaned_pods_still_drains_them() {
    let mut pool = pool([0, 0, 1, 1]);
    pool.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    let mut orphan = pool_pod(&pool, "p-a", "127.1.1.2");
    orphan.metadata.owner_references = None;
    let api = RecordedApi::default();
    api.object(pool_path(), &pool);
    let ctx = context(&api, vec![orphan], vec![], vec![pool.clone()]);
    reconcile_pool(Arc::new(pool), ctx)
        .await
        .expect("the drain succeeds");
    let writes = api.writes();
    assert!(
        methods_and_paths(&writes).contains(&(
            "DELETE".to_string(),
            format!("/api/v1/namespaces/{NS}/pods/p-a")
        )),
        "{writes:#?}"
    );
    assert!(
        writes.iter().all(|w| w.path != pool_path()),
        "the finalizer stays until the orphan is gone: {writes:#?}"
    );
}

/// A controller whose lease renewal is blocked stops writing allocations within the renew
/// deadline: the fence closes when the last proven renewal is that old, and a reconcile then
/// sends no grant.
#[tokio::test]
async fn a_controller_whose_lease_renewal_is_blocked_stops_writing_within_the_renew_deadline() {
    use crate::runtime::leader::{self, Fence, LeaderConfig};
    let leader_config = LeaderConfig {
        namespace: NS.into(),
        lease_name: "sandbox-controller".into(),
        identity: "me".into(),
        lease_duration: std::time::Duration::from_secs(3),
    };
    let deadline = leader_config.renew_deadline();
    let lease_path =
        format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/sandbox-controller");
    let api = RecordedApi::default();
    let renew = {
        let (api, lease_path) = (api.clone(), lease_path.clone());
        move || {
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "sandbox-controller", "namespace": NS},
                "spec": {"holderIdentity": "me", "leaseDurationSeconds": 3,
                         "renewTime": k8s_openapi::jiff::Timestamp::now().to_string()}});
            api.object(lease_path.clone(), &lease);
            std::time::Instant::now()
        }
    };
    renew();
    // The lease manager's renewals, until they are blocked.
    let blocked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let last_renewal = Arc::new(Mutex::new(std::time::Instant::now()));
    let renewer = tokio::spawn({
        let (blocked, last_renewal) = (blocked.clone(), last_renewal.clone());
        async move {
            while !blocked.load(std::sync::atomic::Ordering::SeqCst) {
                *last_renewal.lock().expect("renewal") = renew();
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        }
    });
    let fence = Fence::leased();
    let prover = tokio::spawn(leader::prove(api.client(), leader_config, fence.clone()));

    let pool = pool([0, 0, 2, 2]);
    let setup = |api: &RecordedApi, name: &str| {
        api.object(batch_path(name), &batch_created(name, 1, "7", 0));
        api.object(pool_path(), &pool);
        let mut config = test_config();
        config.fence = fence.clone();
        Arc::new(context_from(
            api,
            Stores {
                pods: store(vec![
                    pool_pod(&pool, "p-a", "127.1.1.2"),
                    pool_pod(&pool, "p-b", "127.1.1.3"),
                ]),
                batches: store(vec![batch_created(name, 1, "7", 0)]),
                pools: store(vec![pool.clone()]),
            },
            config,
        ))
    };
    let wait = |what: &'static str, open: bool| {
        let fence = fence.clone();
        async move {
            let limit = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while fence.check().is_ok() != open {
                assert!(std::time::Instant::now() < limit, "{what}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    wait("the fence opens once the lease is read", true).await;
    // Renewals keep it open past the deadline.
    tokio::time::sleep(deadline + std::time::Duration::from_millis(500)).await;
    assert!(fence.check().is_ok(), "a renewing leader stays unfenced");
    let writer = RecordedApi::default();
    reconcile_pool(Arc::new(pool.clone()), setup(&writer, "before"))
        .await
        .expect("a proven leader allocates");
    assert!(
        writer
            .writes()
            .iter()
            .any(|w| w.path == batch_path("before"))
    );

    // Renewals stop landing, and every read of the lease now hangs.
    blocked.store(true, std::sync::atomic::Ordering::SeqCst);
    renewer.await.expect("the renewer stops");
    api.fault("GET", &lease_path, Some(Fault::Hang));
    let last = *last_renewal.lock().expect("renewal");
    wait("the fence closes", false).await;
    let closed_after = last.elapsed();
    assert!(
        closed_after <= deadline + std::time::Duration::from_millis(250),
        "writes stopped {closed_after:?} after the last renewal; the renew deadline is {deadline:?}"
    );
    let fenced = RecordedApi::default();
    let result = reconcile_pool(Arc::new(pool.clone()), setup(&fenced, "after")).await;
    assert!(matches!(result, Err(Error::Fenced(_))), "{result:?}");
    assert!(
        fenced
            .writes()
            .iter()
            .all(|w| w.path != batch_path("after")),
        "a fenced controller sent a grant: {:#?}",
        fenced.writes()
    );
    prover.abort();
}

/// Waits, for at most ten seconds, until `done` holds of the writes `api` recorded.
async fn wait_for_writes(api: &RecordedApi, what: &str, done: impl Fn(&[Request]) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done(&api.writes()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {:#?}",
            api.writes()
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// A round never waits for the API server: while one grant write hangs, the next round serves a
/// newer claim at once, leaves the batch whose write is in flight out of its plan, and never
/// hands out the pod that write claimed.
#[tokio::test]
async fn a_round_does_not_wait_for_grant_writes_and_never_grants_a_batch_twice() {
    let api = RecordedApi::default();
    let pool = pool([0, 0, 3, 3]);
    let slow = batch_created("slow", 1, "7", 0);
    let fast = batch_created("fast", 1, "8", 1);
    api.object(batch_path("slow"), &slow);
    api.object(batch_path("fast"), &fast);
    api.object(pool_path(), &pool);
    api.fault("PATCH", &batch_path("slow"), Some(Fault::Hang));
    let (ctx, mut feed) = context_with_feed(
        &api,
        &pool,
        vec![
            pool_pod(&pool, "p-a", "127.1.1.2"),
            pool_pod(&pool, "p-b", "127.1.1.3"),
            pool_pod(&pool, "p-c", "127.1.1.4"),
        ],
        vec![slow],
    );
    let bounded = |ctx: Arc<Context>| {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            pool::reconcile(Arc::new(pool.clone()), ctx),
        )
    };
    bounded(ctx.clone())
        .await
        .expect("the round returns while its write hangs")
        .expect("the round succeeds");
    assert!(ctx.grants_in_flight.contains(&index::Key::new(NS, "slow")));

    // A newer claim arrives; the round after it runs while slow's write still hangs.
    feed.apply(&ctx, &fast);
    bounded(ctx.clone())
        .await
        .expect("the second round returns while the first write hangs")
        .expect("the second round succeeds");
    wait_for_writes(&api, "fast's grant", |writes| {
        writes.iter().any(|w| w.path == batch_path("fast"))
    })
    .await;

    // The hanging request is never answered (nor recorded): only fast's write went through.
    let writes = api.writes();
    assert_eq!(
        methods_and_paths(&writes),
        [("PATCH".to_string(), batch_path("fast"))],
        "{writes:#?}"
    );
    let ledger: Value = serde_json::from_str(
        writes[0].body["metadata"]["annotations"][names::ANNOTATION_ALLOC_STATUS]
            .as_str()
            .expect("a ledger"),
    )
    .expect("the ledger is JSON");
    assert!(
        ctx.grants_in_flight.contains(&index::Key::new(NS, "slow")),
        "slow's write is still in flight, and slow was not planned again"
    );
    let versions = |batch: &str| Some(if batch == "slow" { "7" } else { "8" }.to_string());
    assert!(ctx.claims.current(NS, versions).contains("p-a"));
    assert_eq!(
        ledger["pods"],
        json!(["p-b"]),
        "the pod claimed by the hanging write is not handed out again"
    );
}

fn pod_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/pods/{name}")
}

fn with_ledger(mut batch: BatchSandbox, pods: &[&str]) -> BatchSandbox {
    batch.metadata.annotations = Some(BTreeMap::from([(
        names::ANNOTATION_ALLOC_STATUS.to_string(),
        AllocStatus {
            pods: pods.iter().map(|p| p.to_string()).collect(),
            pool_ref: Some("p".into()),
        }
        .to_annotation(),
    )]));
    batch.metadata.finalizers = Some(vec![names::FINALIZER_BATCH.into()]);
    batch
}

/// A batch deleted while the pod cache does not show its pod yet (a pod watch reconnecting or
/// stalled while the batch watch runs on) still has that pod recycled: under `Delete` it is
/// deleted before the finalizer comes off, never left behind to turn idle with the previous
/// holder's processes.
#[tokio::test]
async fn a_deleted_batch_recycles_a_held_pod_its_pod_cache_does_not_show_yet() {
    let pool = pool([0, 0, 1, 1]);
    let mut deleting = with_ledger(batch_created("gone", 1, "5", 0), &["p-a"]);
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let api = RecordedApi::default();
    api.object(batch_path("gone"), &deleting);
    api.object(pod_path("p-a"), &pool_pod(&pool, "p-a", "127.1.1.2"));
    let ctx = context(&api, vec![], vec![deleting.clone()], vec![pool]);
    batch::reconcile(Arc::new(deleting), ctx)
        .await
        .expect("the cleanup completes");
    let writes = methods_and_paths(&api.writes());
    assert_pod_deleted_before_finalizer(&writes, "p-a", "gone");
}

/// A batch of a pool (recycling with `Noop` unless told), in caches the test moves on between
/// reconciles.
struct StaleCopyScene {
    pool: Pool,
    api: RecordedApi,
    ctx: Arc<Context>,
    pods: reflector::store::Writer<CachedPod>,
    batches: reflector::store::Writer<BatchSandbox>,
}

impl StaleCopyScene {
    fn new(batch: &BatchSandbox, pods: &[(&str, &str)]) -> Self {
        Self::recycling(RecycleType::Noop, batch, pods)
    }

    fn recycling(strategy: RecycleType, batch: &BatchSandbox, pods: &[(&str, &str)]) -> Self {
        let mut pool = pool([0, 0, 2, 2]);
        pool.spec.recycle_strategy = Some(RecycleStrategy {
            type_: Some(strategy),
        });
        let api = RecordedApi::default();
        api.object(batch_path(&batch.name_any()), batch);
        api.object(pool_path(), &pool);
        let (pod_store, pod_writer) = writable_store(
            pods.iter()
                .map(|(name, ip)| pool_pod(&pool, name, ip))
                .collect(),
        );
        let (batch_store, batch_writer) = writable_store(vec![batch.clone()]);
        let ctx = Arc::new(context_from(
            &api,
            Stores {
                pods: pod_store,
                batches: batch_store,
                pools: store(vec![pool.clone()]),
            },
            test_config(),
        ));
        Self {
            pool,
            api,
            ctx,
            pods: pod_writer,
            batches: batch_writer,
        }
    }

    /// The pool hands `pod` to a new batch, and the pod turns unready: a recycle under `Noop`
    /// would now delete it under its new holder.
    fn hand_on_and_fail(&mut self, pod: &str, ip: &str) {
        let next = with_ledger(batch_created("next", 1, "90", 1), &[pod]);
        self.batches
            .apply_watcher_event(&watcher::Event::Apply(next));
        let mut unready = pool_pod(&self.pool, pod, ip);
        unready.status.get_or_insert_default().conditions = Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "False".into(),
            ..PodCondition::default()
        }]);
        self.pods
            .apply_watcher_event(&watcher::Event::Apply(CachedPod::from(unready)));
    }

    /// Reconciles `copy` once more; asserts it writes nothing.
    async fn rerun_writes_nothing(&self, copy: &BatchSandbox) {
        let before = methods_and_paths(&self.api.writes());
        let rerun = batch::reconcile(Arc::new(copy.clone()), self.ctx.clone()).await;
        assert_eq!(
            methods_and_paths(&self.api.writes()),
            before,
            "the run from the stale copy writes nothing"
        );
        rerun.expect("the stale run succeeds");
    }
}

/// A cleanup run again from a copy of the batch that still shows the finalizer this process took
/// off (the cache has not seen the removal yet; the reconcile was queued by an earlier event)
/// does nothing: its pods went back to the pool in the first run and may be another batch's by
/// now.
#[tokio::test]
async fn a_cleanup_from_a_copy_older_than_its_own_finalizer_removal_does_nothing() {
    let mut deleting = with_ledger(batch_created("gone", 1, "5", 0), &["p-a"]);
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let mut scene = StaleCopyScene::new(&deleting, &[("p-a", "127.1.1.2")]);
    batch::reconcile(Arc::new(deleting.clone()), scene.ctx.clone())
        .await
        .expect("the cleanup completes");
    let first = methods_and_paths(&scene.api.writes());
    assert!(
        first.contains(&("PATCH".to_string(), batch_path("gone")))
            && !first.iter().any(|(m, _)| m == "DELETE"),
        "the first run returns the pod and takes the finalizer off: {first:#?}"
    );
    scene.hand_on_and_fail("p-a", "127.1.1.2");
    scene.rerun_writes_nothing(&deleting).await;
}

/// A batch deleted while an earlier reconcile's status write was landing: the cleanup's
/// conditional finalizer removal loses to that write. The batch, read afresh, differs only in
/// its status, so the finalizer comes off that copy at once, without a second cleanup; both
/// copies are remembered as recycled from. A changed ledger instead is a lost race.
#[tokio::test]
async fn a_cleanup_outrun_only_by_a_status_write_takes_the_finalizer_off_the_fresh_copy() {
    let mut deleting = with_ledger(batch_created("gone", 1, "5", 0), &["p-a"]);
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let pool = pool([0, 0, 1, 1]);
    for (ledger_moved, expect_done) in [(false, true), (true, false)] {
        let mut fresh = deleting.clone();
        fresh.metadata.resource_version = Some("6".into());
        fresh.status = Some(Default::default());
        if ledger_moved {
            fresh = with_ledger(fresh, &["p-a", "p-b"]);
        }
        let api = RecordedApi::default();
        api.object(batch_path("gone"), &fresh);
        let ctx = context(
            &api,
            vec![pool_pod(&pool, "p-a", "127.1.1.2")],
            vec![deleting.clone()],
            vec![pool.clone()],
        );
        let result = batch::reconcile(Arc::new(deleting.clone()), ctx.clone()).await;
        let writes = methods_and_paths(&api.writes());
        let count = |method: &str, path: &str| {
            writes
                .iter()
                .filter(|(m, p)| m == method && p == path)
                .count()
        };
        assert_eq!(count("DELETE", &pod_path("p-a")), 1, "{writes:#?}");
        if expect_done {
            result.expect("the cleanup completes");
            assert_eq!(
                count("PATCH", &batch_path("gone")),
                2,
                "the lost removal, then the one on the fresh copy: {writes:#?}"
            );
            let stored: BatchSandbox = api.stored(&[batch_path("gone")]).remove(0);
            assert!(stored.finalizers().is_empty(), "the finalizer is off");
            for copy in [&deleting, &fresh] {
                assert_eq!(ctx.recycled.of(copy), recycled::RecycledCopy::WrittenPast);
            }
        } else {
            let error = result.expect_err("a changed ledger is a lost race");
            assert!(error.is_lost_race(), "{error}");
            assert_eq!(count("PATCH", &batch_path("gone")), 1, "{writes:#?}");
            assert_eq!(ctx.recycled.of(&deleting), recycled::RecycledCopy::Current);
        }
    }
}

/// The same for a scale-down: once its ledger write let a pod go, a reconcile from the copy
/// before that write does not recycle the pod again.
#[tokio::test]
async fn a_scale_down_from_a_copy_older_than_its_own_ledger_write_does_nothing() {
    let shrinking = with_ledger(batch_created("shrink", 1, "5", 0), &["p-a", "p-b"]);
    let mut scene = StaleCopyScene::new(&shrinking, &[("p-a", "127.1.1.2"), ("p-b", "127.1.1.3")]);
    batch::reconcile(Arc::new(shrinking.clone()), scene.ctx.clone())
        .await
        .expect("the scale-down completes");
    let writes = scene.api.writes();
    assert!(
        writes.iter().any(|w| w.path == batch_path("shrink")
            && w.body["metadata"]["annotations"][names::ANNOTATION_ALLOC_STATUS]
                .as_str()
                .is_some_and(|l| !l.contains("p-b")))
            && writes.iter().all(|w| w.method != "DELETE"),
        "the first run returns p-b and drops it from the ledger: {writes:#?}"
    );
    scene.hand_on_and_fail("p-b", "127.1.1.3");
    scene.rerun_writes_nothing(&shrinking).await;
}

/// A pod a batch's recycle deletes is not idle to its pool once the ledger lets go of it, even
/// while the pod cache still shows it live (the batch watch ahead of the pod watch).
#[tokio::test]
async fn a_pod_deleted_by_a_recycle_is_never_idle_while_the_cache_lags() {
    let shrinking = with_ledger(batch_created("shrink", 1, "5", 0), &["p-a", "p-b"]);
    let StaleCopyScene {
        pool,
        api,
        ctx,
        batches: mut batch_writer,
        ..
    } = StaleCopyScene::recycling(
        RecycleType::Delete,
        &shrinking,
        &[("p-a", "127.1.1.2"), ("p-b", "127.1.1.3")],
    );
    batch::reconcile(Arc::new(shrinking), ctx.clone())
        .await
        .expect("the scale-down completes");
    let writes = methods_and_paths(&api.writes());
    assert!(
        writes.contains(&("DELETE".to_string(), pod_path("p-b"))),
        "p-b is deleted (Delete strategy): {writes:#?}"
    );
    // The batch watch brings the ledger without p-b; the pod watch has not shown the deletion.
    let shrunk: BatchSandbox = api.stored(&[batch_path("shrink")]).remove(0);
    batch_writer.apply_watcher_event(&watcher::Event::Apply(shrunk.clone()));
    ctx.index.with(|i| i.batch_applied(&Arc::new(shrunk)));
    reconcile_pool(Arc::new(pool), ctx.clone())
        .await
        .expect("the pool reconciles");
    assert_eq!(ctx.idle_left(NS, "p"), Some(0), "p-b is not idle");
}

/// A scale-down whose ledger write went unanswered: whether it committed is asked of the API
/// server before the copy is acted on again. Committed, the rerun from the old copy only reads;
/// lost before it took effect, the rerun recycles and writes again.
#[tokio::test]
async fn a_scale_down_whose_ledger_write_went_unanswered_reads_before_acting_again() {
    for fault in [Fault::CommitThenLose, Fault::LoseBeforeCommit] {
        let shrinking = with_ledger(batch_created("shrink", 1, "5", 0), &["p-a", "p-b"]);
        let scene = StaleCopyScene::new(&shrinking, &[("p-a", "127.1.1.2"), ("p-b", "127.1.1.3")]);
        scene.api.fault("PATCH", &batch_path("shrink"), Some(fault));
        batch::reconcile(Arc::new(shrinking.clone()), scene.ctx.clone())
            .await
            .expect_err("the ledger write goes unanswered");
        assert_eq!(
            scene.ctx.recycled.of(&shrinking),
            recycled::RecycledCopy::MaybeWrittenPast,
            "{fault:?}"
        );
        scene.api.fault("PATCH", &batch_path("shrink"), None);
        let before = scene.api.writes().len();
        batch::reconcile(Arc::new(shrinking.clone()), scene.ctx.clone())
            .await
            .expect("the rerun succeeds");
        let rerun = methods_and_paths(&scene.api.writes()[before..]);
        let ledger_written = rerun.contains(&("PATCH".to_string(), batch_path("shrink")));
        let stored: BatchSandbox = scene.api.stored(&[batch_path("shrink")]).remove(0);
        assert_eq!(
            AllocStatus::of(&stored).expect("a ledger").pods,
            ["p-a"],
            "{fault:?}: p-b is let go once"
        );
        match fault {
            Fault::CommitThenLose => {
                assert!(
                    rerun.is_empty(),
                    "committed: the rerun only reads: {rerun:#?}"
                );
                assert_eq!(
                    scene.ctx.recycled.of(&shrinking),
                    recycled::RecycledCopy::WrittenPast
                );
            }
            _ => assert!(
                ledger_written,
                "lost: the rerun writes the ledger again: {rerun:#?}"
            ),
        }
    }
}

/// The same for a pod released on request (`alloc-release`): once the ledger let it go, a
/// reconcile from the copy before that write does not stop or recycle it again.
#[tokio::test]
async fn a_release_from_a_copy_older_than_its_own_ledger_write_does_nothing() {
    let mut releasing = with_ledger(batch_created("rel", 2, "5", 0), &["p-a", "p-b"]);
    let annotations = releasing.metadata.annotations.get_or_insert_default();
    annotations.insert(
        names::ANNOTATION_ALLOC_RELEASE.into(),
        r#"{"pods":["p-b"]}"#.into(),
    );
    annotations.insert(
        names::ANNOTATION_TASK_RESULTS.into(),
        r#"{"1":"None"}"#.into(),
    );
    let mut scene = StaleCopyScene::new(&releasing, &[("p-a", "127.1.1.2"), ("p-b", "127.1.1.3")]);
    batch::reconcile(Arc::new(releasing.clone()), scene.ctx.clone())
        .await
        .expect("the release completes");
    let stored: Vec<BatchSandbox> = scene.api.stored(&[batch_path("rel")]);
    assert_eq!(
        AllocStatus::of(&stored[0]).expect("a ledger").pods,
        ["p-a", ""],
        "the first run lets p-b go"
    );
    scene.hand_on_and_fail("p-b", "127.1.1.3");
    scene.rerun_writes_nothing(&releasing).await;
}

/// The same for a scale-down: a released shard's pod the cache does not show is recycled before
/// the ledger lets go of it.
#[tokio::test]
async fn a_scale_down_recycles_a_released_pod_its_pod_cache_does_not_show_yet() {
    let pool = pool([0, 0, 2, 2]);
    let batch = with_ledger(batch_created("shrink", 1, "5", 0), &["p-a", "p-b"]);
    let api = RecordedApi::default();
    api.object(batch_path("shrink"), &batch);
    api.object(pod_path("p-b"), &pool_pod(&pool, "p-b", "127.1.1.3"));
    let ctx = context(
        &api,
        vec![pool_pod(&pool, "p-a", "127.1.1.2")],
        vec![batch.clone()],
        vec![pool],
    );
    let _ = batch::reconcile(Arc::new(batch), ctx).await;
    let writes = api.writes();
    let deleted = writes
        .iter()
        .position(|w| w.method == "DELETE" && w.path == pod_path("p-b"));
    let shrunk = writes.iter().position(|w| {
        w.path == batch_path("shrink")
            && w.body["metadata"]["annotations"][names::ANNOTATION_ALLOC_STATUS]
                .as_str()
                .is_some_and(|l| !l.contains("p-b"))
    });
    assert!(
        matches!((deleted, shrunk), (Some(d), Some(s)) if d < s),
        "p-b is deleted before the ledger drops it: {writes:#?}"
    );
}

/// A reconcile whose cached Pool still shows an older status than this process last wrote (the
/// pool watch lagging) writes the new counts: otherwise a pod released meanwhile would stay
/// counted as allocated until the next change of the pool.
#[tokio::test]
async fn a_pool_status_trailing_in_the_cache_does_not_hide_new_counts() {
    let pool = pool([0, 0, 1, 1]);
    let idle = pool_pod(&pool, "p-a", "127.1.1.2");
    // The status of the pool with its one pod idle, as an earlier reconcile reported it.
    let first = RecordedApi::default();
    first.object(pool_path(), &pool);
    pool::reconcile(
        Arc::new(pool.clone()),
        context(&first, vec![idle.clone()], vec![], vec![pool.clone()]),
    )
    .await
    .expect("the first reconcile succeeds");
    let mut idle_reported = pool.clone();
    idle_reported.status = Some(
        serde_json::from_value(first.writes()[0].body["status"].clone()).expect("a pool status"),
    );

    // A batch holds the pod: the count goes to 1 (the cache goes on showing the idle status).
    let holder = with_ledger(batch_created("holder", 1, "5", 0), &["p-a"]);
    let api = RecordedApi::default();
    api.object(pool_path(), &idle_reported);
    let (batches, mut batch_writer) = writable_store(vec![holder.clone()]);
    let ctx = Arc::new(context_from(
        &api,
        Stores {
            pods: store(vec![idle]),
            batches,
            pools: store(vec![idle_reported.clone()]),
        },
        // Status writes are paced; this test is about what is compared, not when.
        ControllerConfig {
            pool_status_writes_per_second: u32::MAX,
            ..test_config()
        },
    ));
    pool::reconcile(Arc::new(idle_reported.clone()), ctx.clone())
        .await
        .expect("the reconcile succeeds");
    // The batch is gone; the pool cache still shows the old idle status.
    batch_writer.apply_watcher_event(&watcher::Event::Delete(holder.clone()));
    ctx.index.with(|i| i.batch_deleted(&holder));
    ctx.pacing.forget(&index::Key::new(
        NS,
        &kube::ResourceExt::name_any(&idle_reported),
    ));
    pool::reconcile(Arc::new(idle_reported), ctx)
        .await
        .expect("the reconcile succeeds");
    assert_eq!(
        pool_status_allocated(&api),
        [json!(1), json!(0)],
        "the release is reported"
    );
}

/// A Pool status that only moves counts waits for its slot of the budget all pools share, and
/// its reconcile comes back for it; one that flips a condition is written at once.
#[tokio::test]
async fn a_counts_only_pool_status_waits_for_the_shared_budget_a_condition_flip_does_not() {
    // One of two idle pods is taken. bufferMin 0: the pool stays Ready with an idle pod left;
    // bufferMin 2: it is not Ready any more.
    for (buffer_min, flips) in [(0, false), (2, true)] {
        let pool = pool([buffer_min, 2, 2, 2]);
        let idle = vec![
            pool_pod(&pool, "p-a", "127.1.1.2"),
            pool_pod(&pool, "p-b", "127.1.1.3"),
        ];
        let first = RecordedApi::default();
        first.object(pool_path(), &pool);
        pool::reconcile(
            Arc::new(pool.clone()),
            context(&first, idle.clone(), vec![], vec![pool.clone()]),
        )
        .await
        .expect("the first reconcile succeeds");
        let mut reported = pool.clone();
        reported.status = Some(
            serde_json::from_value(first.writes()[0].body["status"].clone())
                .expect("a pool status"),
        );

        let holder = with_ledger(batch_created("holder", 1, "5", 0), &["p-a"]);
        let api = RecordedApi::default();
        api.object(pool_path(), &reported);
        let config = ControllerConfig {
            pool_status_writes_per_second: 1,
            ..test_config()
        };
        let ctx = Arc::new(context_from(
            &api,
            Stores {
                pods: store(idle),
                batches: store(vec![holder]),
                pools: store(vec![reported.clone()]),
            },
            config.clone(),
        ));
        // Another pool has just taken the budget's slot.
        let now = std::time::Instant::now();
        let other = index::Key::new(NS, "other");
        assert_eq!(
            ctx.pacing.status(&other, now, pacing::StatusChange::Counts),
            pacing::StatusWrite::Now
        );
        let action = pool::reconcile(Arc::new(reported), ctx.clone())
            .await
            .expect("the reconcile succeeds");
        let status_writes = pool_status_allocated(&api);
        if flips {
            assert_eq!(status_writes, [json!(1)], "the flip to WarmingUp goes out");
        } else {
            assert_eq!(status_writes, Vec::<Value>::new(), "the counts wait");
            assert_ne!(
                action,
                Action::requeue(config.resync),
                "the reconcile comes back for its slot"
            );
            let key = index::Key::new(NS, "p");
            match ctx.pacing.status(
                &key,
                std::time::Instant::now(),
                pacing::StatusChange::Counts,
            ) {
                pacing::StatusWrite::After(due) => assert!(
                    due <= std::time::Duration::from_secs(1),
                    "the pool holds the next slot: {due:?}"
                ),
                pacing::StatusWrite::Now => {
                    panic!("the slot after the other pool's is not due yet")
                }
            }
        }
    }
}

/// Pods a Pool of the same name left behind (deleted with `--cascade=orphan`) are taken back by
/// the live Pool: current-revision and held ones adopted (conditional owner reference), idle ones
/// of another revision deleted (conditional on uid and resourceVersion).
#[tokio::test]
async fn orphaned_pool_pods_are_adopted_or_deleted() {
    let pool = pool([0, 0, 3, 3]);
    let orphan = |name: &str, revision: &str| {
        let mut pod = pool_pod(&pool, name, "127.1.1.2");
        pod.metadata.owner_references = None;
        pod.metadata.resource_version = Some(format!("{name}-rv"));
        pod.metadata
            .labels
            .get_or_insert_default()
            .insert(names::LABEL_POOL_REVISION.into(), revision.into());
        pod
    };
    let revision = sandbox_domain::pod_template::template_revision(&pool.spec.template);
    let pods = vec![
        orphan("current", &revision),
        orphan("stale", "old"),
        orphan("held-stale", "old"),
    ];
    let holder = with_ledger(batch_created("holder", 1, "5", 0), &["held-stale"]);
    let api = RecordedApi::default();
    api.object(pool_path(), &pool);
    for pod in &pods {
        api.object(pod_path(sandbox_domain::pods::pod_name(pod)), pod);
    }
    let ctx = context(&api, pods, vec![holder], vec![pool.clone()]);
    let _ = pool::reconcile(Arc::new(pool), ctx).await;
    let writes = api.writes();
    let to = |method: &str, pod: &str| {
        writes
            .iter()
            .find(|w| w.method == method && w.path == pod_path(pod))
            .cloned()
    };
    for adopted in ["current", "held-stale"] {
        let patch =
            to("PATCH", adopted).unwrap_or_else(|| panic!("{adopted} adopted: {writes:#?}"));
        assert_eq!(
            patch.body["metadata"]["resourceVersion"],
            format!("{adopted}-rv")
        );
        assert_eq!(
            patch.body["metadata"]["ownerReferences"][0]["uid"],
            "pool-uid"
        );
        assert!(to("DELETE", adopted).is_none(), "{adopted} is kept");
    }
    let deleted = to("DELETE", "stale").expect("the idle stale orphan is deleted");
    assert_eq!(deleted.body["preconditions"]["uid"], "stale-uid");
    assert_eq!(deleted.body["preconditions"]["resourceVersion"], "stale-rv");
    assert!(to("PATCH", "stale").is_none());
}

/// An `alloc-release` request lets the ledger go of a pod only once its recycle is done: the
/// shard is first marked released (its pod still held), then the pod is deleted (`Delete`), and
/// only then is the ledger entry cleared. A deletion that fails leaves the pod in the ledger,
/// so it never turns idle with the previous holder's processes.
#[tokio::test]
async fn alloc_release_frees_a_pod_from_the_ledger_only_after_its_recycle() {
    let pool = pool([0, 0, 2, 2]);
    let mut batch = with_ledger(batch_created("rel", 2, "5", 0), &["p-a", "p-b"]);
    batch.metadata.annotations.get_or_insert_default().insert(
        names::ANNOTATION_ALLOC_RELEASE.into(),
        r#"{"pods":["p-b"]}"#.into(),
    );
    let pods = vec![
        pool_pod(&pool, "p-a", "127.1.1.2"),
        pool_pod(&pool, "p-b", "127.1.1.3"),
    ];
    let api = RecordedApi::default();
    api.object(batch_path("rel"), &batch);
    let round = |batch: BatchSandbox| {
        let ctx = context(&api, pods.clone(), vec![batch.clone()], vec![pool.clone()]);
        async move {
            let _ = batch::reconcile(Arc::new(batch), ctx).await;
        }
    };
    let ledger_of_stored = || {
        let stored: Vec<BatchSandbox> = api.stored(&[batch_path("rel")]);
        (
            AllocStatus::of(&stored[0]).expect("a ledger").pods,
            stored[0].clone(),
        )
    };

    // 1. The shard is marked released; the ledger still holds p-b and nothing is deleted.
    round(batch).await;
    let (ledger, marked) = ledger_of_stored();
    assert_eq!(ledger, ["p-a", "p-b"]);
    assert_eq!(
        marked.annotations().get(names::ANNOTATION_TASK_RESULTS),
        Some(&r#"{"1":"None"}"#.to_string())
    );
    assert!(api.writes().iter().all(|w| w.method != "DELETE"));

    // 2. The deletion fails: p-b stays in the ledger.
    api.reply(
        "DELETE",
        &pod_path("p-b"),
        500,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "message": "boom"}),
    );
    round(marked.clone()).await;
    assert_eq!(
        ledger_of_stored().0,
        ["p-a", "p-b"],
        "a failed recycle keeps the pod held"
    );

    // 3. The deletion goes through, then the ledger lets go.
    api.replies
        .lock()
        .expect("replies")
        .remove(&format!("DELETE {}", pod_path("p-b")));
    let before = api.writes().len();
    round(marked).await;
    let writes = api.writes()[before..].to_vec();
    let deleted = writes
        .iter()
        .position(|w| w.method == "DELETE" && w.path == pod_path("p-b"));
    let cleared = writes.iter().position(|w| w.path == batch_path("rel"));
    assert!(
        matches!((deleted, cleared), (Some(d), Some(c)) if d < c),
        "the pod goes before the ledger lets go: {writes:#?}"
    );
    let (ledger, stored) = ledger_of_stored();
    assert_eq!(ledger, ["p-a", ""]);
    assert_eq!(
        stored.annotations().get(names::ANNOTATION_ALLOC_RELEASED),
        Some(&r#"{"pods":["p-b"]}"#.to_string())
    );
}

/// A held pod the pod cache does not show yet is read afresh and stays held: the round does not
/// refill its shard with an idle pod, which would drop it from the ledger unrecycled and leave it
/// idle, with its holder's processes, once the cache caught up.
#[tokio::test]
async fn a_held_pod_the_pod_cache_does_not_show_yet_is_not_replaced() {
    let pool = pool([0, 0, 2, 2]);
    let holder = with_ledger(batch_created("holder", 1, "5", 0), &["p-a"]);
    let api = RecordedApi::default();
    api.object(batch_path("holder"), &holder);
    api.object(pool_path(), &pool);
    api.object(pod_path("p-a"), &pool_pod(&pool, "p-a", "127.1.1.2"));
    let ctx = context(
        &api,
        vec![pool_pod(&pool, "p-b", "127.1.1.3")],
        vec![holder],
        vec![pool.clone()],
    );
    reconcile_pool(Arc::new(pool), ctx)
        .await
        .expect("the reconcile succeeds");
    assert_eq!(
        holders(&api, &["holder"]),
        BTreeMap::from([("p-a".to_string(), vec!["holder".to_string()])]),
        "the ledger still holds p-a: {:#?}",
        api.writes()
    );
    let ledger_writes: Vec<_> = api
        .writes()
        .into_iter()
        .filter(|w| w.path == batch_path("holder"))
        .collect();
    assert_eq!(ledger_writes.len(), 0, "{ledger_writes:#?}");
}

/// A held pod the API server confirms gone is replaced in place, and read only once while its
/// shard waits for a replacement.
#[tokio::test]
async fn a_held_pod_confirmed_gone_is_replaced_and_read_once() {
    let pool = pool([0, 0, 1, 1]);
    let holder = with_ledger(batch_created("holder", 1, "5", 0), &["p-gone"]);
    let api = RecordedApi::default();
    api.object(batch_path("holder"), &holder);
    api.object(pool_path(), &pool);
    // No idle pod at first: the shard waits, and the pool makes a replacement.
    let (pods, mut pod_writer) = writable_store::<CachedPod, CachedPod>(vec![]);
    let ctx = Arc::new(context_from(
        &api,
        Stores {
            pods,
            batches: store(vec![holder]),
            pools: store(vec![pool.clone()]),
        },
        test_config(),
    ));
    let _ = reconcile_pool(Arc::new(pool.clone()), ctx.clone()).await;
    let _ = reconcile_pool(Arc::new(pool.clone()), ctx.clone()).await;
    let reads = |api: &RecordedApi| {
        api.requests
            .lock()
            .expect("requests")
            .iter()
            .filter(|r| r.method == "GET" && r.path == pod_path("p-gone"))
            .count()
    };
    assert_eq!(reads(&api), 1, "the gone pod is read once over two rounds");

    // The replacement turns Ready: it takes the lost pod's place.
    let ready = CachedPod::from(pool_pod(&pool, "p-new", "127.1.1.4"));
    pod_writer.apply_watcher_event(&watcher::Event::Apply(ready.clone()));
    ctx.index.with(|i| i.pod_applied(&Arc::new(ready.clone())));
    reconcile_pool(Arc::new(pool), ctx)
        .await
        .expect("the reconcile succeeds");
    assert_eq!(
        holders(&api, &["holder"]),
        BTreeMap::from([("p-new".to_string(), vec!["holder".to_string()])]),
    );
}

/// A router over a test's context, with the Pool wakes it sends.
struct Routed {
    router: router::Router,
    pools: mpsc::UnboundedReceiver<ObjectRef<Pool>>,
    _batches: mpsc::UnboundedReceiver<ObjectRef<BatchSandbox>>,
}

impl Routed {
    fn new(ctx: &Arc<Context>) -> Self {
        let (pools_tx, pools) = mpsc::unbounded_channel();
        let (batches_tx, batches) = mpsc::unbounded_channel();
        Self {
            router: router::Router::new(ctx.clone(), pools_tx, batches_tx),
            pools,
            _batches: batches,
        }
    }

    fn pod(&self, event: watcher::Event<CachedPod>) {
        self.router.pod_event(Ok(event));
    }

    fn batch(&self, event: watcher::Event<BatchSandbox>) {
        self.router.batch_event(Ok(event));
    }

    /// The Pool wakes sent since the last call.
    fn pool_wakes(&mut self) -> usize {
        std::iter::from_fn(|| self.pools.try_recv().ok()).count()
    }
}

/// A pool pod this process just created appears in the cache still starting: its pool counted
/// it already (as a creation not yet seen), so nothing wakes the pool until it is ready. A pod
/// the pool did not expect, or one already gone, wakes it at once.
#[tokio::test]
async fn a_pool_is_not_woken_by_its_own_new_pod_until_the_pod_is_ready() {
    let api = RecordedApi::default();
    let pool = pool([0, 0, 1, 1]);
    let ctx = context(&api, vec![], vec![], vec![pool.clone()]);
    let mut routed = Routed::new(&ctx);
    let starting = |name: &str| {
        let mut pod = pool_pod(&pool, name, "127.1.1.2");
        pod.status = Some(PodStatus {
            phase: Some("Pending".into()),
            ..PodStatus::default()
        });
        CachedPod::from(pod)
    };

    ctx.expectations.created(&format!("{NS}/p"), "p-new".into());
    routed.pod(watcher::Event::Apply(starting("p-new")));
    assert_eq!(routed.pool_wakes(), 0, "its own starting pod");
    routed.pod(watcher::Event::Apply(CachedPod::from(pool_pod(
        &pool,
        "p-new",
        "127.1.1.2",
    ))));
    assert_eq!(routed.pool_wakes(), 1, "the pod turned ready");

    routed.pod(watcher::Event::Apply(starting("p-stranger")));
    assert_eq!(routed.pool_wakes(), 1, "a starting pod it did not create");

    ctx.expectations
        .created(&format!("{NS}/p"), "p-finished".into());
    let mut finished = pool_pod(&pool, "p-finished", "127.1.1.3");
    finished.status = Some(PodStatus {
        phase: Some("Failed".into()),
        ..PodStatus::default()
    });
    routed.pod(watcher::Event::Apply(CachedPod::from(finished)));
    assert_eq!(routed.pool_wakes(), 1, "its own pod, already finished");
}

/// A pool pod whose deletion this process sent is counted as being deleted by every round since:
/// its turning terminating wakes no round (the write that follows the deletion does), its
/// removal does. A pod deleted by someone else wakes the pool as it turns terminating, and so
/// does a change of a pod whose deletion has not taken effect.
#[tokio::test]
async fn a_pool_is_not_woken_by_a_pod_it_deleted_turning_terminating_only_by_its_removal() {
    let api = RecordedApi::default();
    let pool = pool([0, 0, 1, 1]);
    let ctx = context(&api, vec![], vec![], vec![pool.clone()]);
    let mut routed = Routed::new(&ctx);
    let terminating = |name: &str, ip: &str| {
        let mut pod = pool_pod(&pool, name, ip);
        pod.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        CachedPod::from(pod)
    };
    for (name, ip) in [("p-going", "127.1.1.2"), ("p-other", "127.1.1.3")] {
        routed.pod(watcher::Event::Apply(CachedPod::from(pool_pod(
            &pool, name, ip,
        ))));
    }
    assert_eq!(routed.pool_wakes(), 2, "two idle pods appear");

    ctx.expectations
        .deleted(&format!("{NS}/p"), "p-going".into());
    routed.pod(watcher::Event::Apply(CachedPod::from(pool_pod(
        &pool,
        "p-going",
        "127.1.1.9",
    ))));
    assert_eq!(
        routed.pool_wakes(),
        1,
        "a change before the deletion takes effect"
    );
    routed.pod(watcher::Event::Apply(terminating("p-going", "127.1.1.9")));
    assert_eq!(
        routed.pool_wakes(),
        0,
        "the pod it deleted turns terminating"
    );
    routed.pod(watcher::Event::Apply(terminating("p-other", "127.1.1.3")));
    assert_eq!(
        routed.pool_wakes(),
        1,
        "a pod someone else deleted turns terminating"
    );
    routed.pod(watcher::Event::Delete(terminating("p-going", "127.1.1.9")));
    assert_eq!(routed.pool_wakes(), 1, "the pod it deleted is removed");
}

/// A batch that starts going away while holding a pod for every shard asks its pool for nothing
/// new: it keeps its pods until it gives them back, and that write wakes the pool. One still
/// waiting for pods wakes the pool at once, as its demand is gone.
#[tokio::test]
async fn a_pool_is_woken_by_a_batch_going_away_only_if_it_still_wanted_pods() {
    let api = RecordedApi::default();
    let pool = pool([0, 0, 1, 1]);
    let ctx = context(&api, vec![], vec![], vec![pool]);
    let mut routed = Routed::new(&ctx);
    let going = |mut batch: BatchSandbox| {
        batch.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        batch.metadata.resource_version = Some("9".into());
        batch
    };
    let served = with_ledger(pooled_batch("served", 2, "5"), &["p-a", "p-b"]);
    let short = with_ledger(pooled_batch("short", 2, "5"), &["p-c"]);
    for batch in [&served, &short] {
        routed.batch(watcher::Event::Apply(batch.clone()));
    }
    assert_eq!(routed.pool_wakes(), 2, "two batches of the pool appear");

    routed.batch(watcher::Event::Apply(going(served.clone())));
    assert_eq!(
        routed.pool_wakes(),
        0,
        "a batch holding all its pods starts going away"
    );
    routed.batch(watcher::Event::Apply(going(short)));
    assert_eq!(
        routed.pool_wakes(),
        1,
        "a batch short of a pod starts going away"
    );
    routed.batch(watcher::Event::Delete(going(served)));
    assert_eq!(
        routed.pool_wakes(),
        1,
        "the batch that held its pods is gone"
    );
}

/// A pool's round reads its status only to tell whether to write it again, so its own status
/// write does not wake it; the batches waiting for a Pool to be chosen, which compare every
/// pool's counts, are woken by it. What the pool is beside its status (an annotation choosing a
/// policy, say) wakes it.
#[tokio::test]
async fn a_pool_is_not_woken_by_a_change_of_its_status_alone() {
    let api = RecordedApi::default();
    let pool = pool([0, 0, 1, 1]);
    let mut waiting = pooled_batch("waiting", 1, "5");
    waiting.spec.pool_ref = Some(names::ANY_POOL.into());
    waiting.spec.template = Some(sandbox_template());
    let ctx = context(&api, vec![], vec![waiting.clone()], vec![pool.clone()]);
    ctx.index.with(|i| i.batch_applied(&Arc::new(waiting)));
    let (pools_tx, mut pools_rx) = mpsc::unbounded_channel();
    let (batches_tx, mut batches_rx) = mpsc::unbounded_channel();
    let router = router::Router::new(ctx.clone(), pools_tx, batches_tx);
    fn woken<K: kube::Resource>(rx: &mut mpsc::UnboundedReceiver<ObjectRef<K>>) -> Vec<String>
    where
        K::DynamicType: Default,
    {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|r| r.name)
            .collect()
    }
    router.pool_event(Ok(watcher::Event::Apply(pool.clone())));
    assert_eq!(woken(&mut pools_rx), ["p"], "first seen");
    assert_eq!(woken(&mut batches_rx), ["waiting"]);

    let mut counted = pool.clone();
    counted.metadata.resource_version = Some("101".into());
    counted.status = Some(sandbox_domain::api::PoolStatus {
        total: 1,
        available: 1,
        ..sandbox_domain::api::PoolStatus::default()
    });
    router.pool_event(Ok(watcher::Event::Apply(counted.clone())));
    assert!(woken(&mut pools_rx).is_empty(), "its own status write");
    assert_eq!(woken(&mut batches_rx), ["waiting"], "a count to compare");

    counted.metadata.annotations = Some(BTreeMap::from([(
        "policy.sandbox.opensandbox.io/pool-sizing".to_string(),
        "custom".to_string(),
    )]));
    router.pool_event(Ok(watcher::Event::Apply(counted)));
    assert_eq!(woken(&mut pools_rx), ["p"], "an annotation");
}
