//! The reconcilers and their shared context.
//!
//! Both reconcilers read from one set of reflector stores (pods, batches, pools), so a fresh LIST
//! at start-up rebuilds everything. Events of every kind, deletions included, are routed to the
//! objects they affect and fed to kube-runtime's `applier`, which serialises reconciles per object.

mod adopt;
mod backoff;
mod batch;
mod cached_pod;
mod claims;
mod index;
mod metrics;
mod pacing;
mod pool;
mod pool_status;
mod recycled;
mod router;
mod selection;
mod served;
pub mod sidecar;
mod tasks;
mod writes;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt, future};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tracing::{info, warn};

use cached_pod::CachedPod;
use sandbox_domain::api::{BatchSandbox, Pool, names};
use sandbox_domain::endpoints::EndpointsFormat;
use sandbox_domain::pods;
use sandbox_policy::PolicyEngine;
use served::Served;

pub use metrics::ControllerMetrics;
pub use pacing::DEFAULT_POOL_STATUS_WRITES_PER_SECOND;
pub use writes::{Target as WriteTarget, WriteCounter};

/// How the controller behaves; set from the command line.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Watch and manage only this namespace (`None`: all namespaces).
    pub namespace: Option<String>,
    /// Reconciles running at once, per kind.
    pub concurrency: u16,
    pub endpoints_format: EndpointsFormat,
    /// Periodic re-check of every object, a safety net for missed events.
    pub resync: Duration,
    pub executor: ExecutorSettings,
    /// Allocation writes go out only while this is open (leader election: while the lease is
    /// provably held).
    pub fence: crate::runtime::leader::Fence,
    /// How long after its deletion a batch's cleanup waits for tasks to stop before it deletes
    /// their pods anyway.
    pub cleanup_deadline: Duration,
    /// Pool status writes that only move counts, per second, shared by all pools.
    pub pool_status_writes_per_second: u32,
}

/// Where pods get their task executor from, and how the controller talks to it.
#[derive(Clone, Debug)]
pub struct ExecutorSettings {
    /// Image of the injected `task-executor` sidecar.
    pub image: String,
    /// The key the controller signs each executor request with, for the one pod it goes to;
    /// sidecars get its public half. `None` runs them unauthenticated.
    pub signing_key: Option<Arc<sandbox_executor::credential::SigningKey>>,
    /// Which pool pods get the sidecar.
    pub pool_injection: PoolInjection,
}

/// Which pool pods get the task executor sidecar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PoolInjection {
    /// Every pool pod, so any pooled batch can run tasks.
    #[default]
    Always,
    /// Only pods of Pools annotated `sandbox.opensandbox.io/task-executor: "true"`.
    Annotated,
}

/// Annotation on a Pool that opts its pods into the task executor sidecar under
/// `--pool-executor-injection=annotated`.
pub const ANNOTATION_POOL_EXECUTOR: &str = "sandbox.opensandbox.io/task-executor";

impl Default for ExecutorSettings {
    fn default() -> Self {
        Self {
            image: "opensandbox/sandbox-task-executor:latest".into(),
            signing_key: None,
            pool_injection: PoolInjection::Always,
        }
    }
}

impl ExecutorSettings {
    /// Prepares a pod about to be created: with `inject`, adds the executor sidecar and marks the
    /// pod as one the controller talks to; without, makes sure it carries no such mark.
    pub fn prepare(&self, pod: &mut Pod, inject: bool) {
        let public_key = self.signing_key.as_ref().map(|k| k.public_key());
        sidecar::prepare_pod(pod, inject, &self.image, public_key.as_ref());
    }

    /// Whether pods of `pool` get the sidecar.
    pub fn for_pool(&self, pool: &Pool) -> bool {
        self.pool_injection == PoolInjection::Always
            || pool
                .annotations()
                .get(ANNOTATION_POOL_EXECUTOR)
                .map(String::as_str)
                == Some("true")
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            concurrency: 16,
            endpoints_format: EndpointsFormat::Auto,
            resync: Duration::from_secs(300),
            executor: ExecutorSettings::default(),
            fence: Default::default(),
            cleanup_deadline: Duration::from_secs(60),
            pool_status_writes_per_second: DEFAULT_POOL_STATUS_WRITES_PER_SECOND,
        }
    }
}

/// Errors a reconcile can end with; each is retried with per-object exponential backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error(
        "{object}: annotation {} is not valid JSON ({source}); refusing to guess which pods it holds",
        names::ANNOTATION_ALLOC_STATUS
    )]
    CorruptAllocStatus {
        object: String,
        source: serde_json::Error,
    },
    #[error(transparent)]
    ShardPatch(#[from] sandbox_domain::pod_template::ShardPatchError),
    #[error("a policy evaluation thread failed: {0}")]
    PolicyThread(#[from] tokio::task::JoinError),
    #[error("{0} write(s) lost an optimistic-concurrency race; retrying with fresh state")]
    Conflict(usize),
    #[error(transparent)]
    Fenced(#[from] crate::runtime::leader::Fenced),
}

impl Error {
    /// A write refused because the object changed since it was read (HTTP 409): the next
    /// reconcile, from the fresh object, decides again.
    pub fn is_lost_race(&self) -> bool {
        match self {
            Error::Conflict(_) => true,
            Error::Kube(kube::Error::Api(status)) => status.code == 409,
            _ => false,
        }
    }

    /// A write the API server definitely did not apply: refused with a client error (a lost
    /// race, forbidden, invalid, gone), or never sent (fenced). A timeout, a 5xx or a lost
    /// connection leaves the outcome unknown.
    pub fn is_definite_refusal(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(status)) => {
                (400..500).contains(&status.code) && status.code != 408
            }
            Error::Fenced(_) => true,
            _ => false,
        }
    }
}

/// Pod creations or deletions one reconcile has in flight at once.
const POD_WRITE_CONCURRENCY: usize = 32;

/// A namespaced API object the controller reads and writes through a typed `Api`.
pub trait NamespacedObject:
    Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> NamespacedObject for K where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
{
}

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub pods: Store<CachedPod>,
    pub batches: Store<BatchSandbox>,
    pub pools: Store<Pool>,
    pub policies: Arc<dyn PolicyEngine>,
    pub recorder: Recorder,
    pub config: ControllerConfig,
    /// Allocations written but maybe not yet visible in the batch cache.
    claims: claims::Claims,
    /// Grant writes sent and not yet answered.
    grants_in_flight: claims::InFlight,
    /// Batches whose grants the API server rejected, held back from their pools' plans.
    rejected_grants: claims::RejectedGrants,
    /// The caches indexed by pool and by batch, kept by the router.
    index: index::CacheIndex,
    /// When each pool's sizing and status writes run (behind its claims).
    pacing: pacing::Pacing,
    /// Idle pods each pool had left after its last allocation round (before the Pool status,
    /// written at most once per interval, shows them).
    idle_left: std::sync::Mutex<std::collections::HashMap<index::Key, usize>>,
    /// This process's token in the pods it makes ([`names::ANNOTATION_POD_MAKER`]).
    incarnation: String,
    /// Per pool, held pods missing from the pod cache that a fresh read found gone.
    held_pods_gone:
        std::sync::Mutex<std::collections::HashMap<index::Key, std::collections::HashSet<String>>>,
    /// Wakes a Pool reconcile from outside one (a grant write answered in the background).
    pool_wakeups: std::sync::OnceLock<mpsc::UnboundedSender<ObjectRef<Pool>>>,
    /// Wakes a BatchSandbox reconcile from outside one (its grant rejected in the background).
    batch_wakeups: std::sync::OnceLock<mpsc::UnboundedSender<ObjectRef<BatchSandbox>>>,
    /// The last readable ledger of every pooled batch, for when one turns unreadable.
    ledgers: claims::LastLedgers,
    /// Pods created or deleted but maybe not yet visible in the pod cache.
    expectations: claims::Expectations,
    /// Statuses written but maybe not yet visible in the cache.
    last_status: claims::LastStatus,
    pool_statuses: pool_status::LastPoolStatus,
    backoff: backoff::PerObjectBackoff,
    pub metrics: ControllerMetrics,
    /// Bounds background pod writes across all reconciles.
    pod_writes: tokio::sync::Semaphore,
    pod_names: std::sync::atomic::AtomicU64,
    pub executor: sandbox_executor::client::ExecutorClient,
    task_polls: tasks::TaskPolls,
    /// Batches (by uid) an expiry policy returned to their pool: their pods are recycled with
    /// `Restart` whatever the pool's strategy. Kept in memory only, never in the batch object,
    /// which its owner could edit to weaken the pool's strategy; after a restart the pool's
    /// strategy applies.
    returned_to_pool: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Copies of batches this process recycled pods from and wrote past (see `recycled`).
    recycled: recycled::RecycledCopies,
    /// Each batch's last shard-task and expiry answers, by uid: a batch reconciles about twice
    /// per claim with the same tasks, and asking a pure policy again would only spend a call.
    remembered: sandbox_policy::Remembered,
}

/// A token for this process's start: its pid and the time, to the nanosecond.
fn incarnation() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}", std::process::id())
}

/// The caches a [`Context`] reads.
pub struct Stores {
    pub pods: Store<CachedPod>,
    pub batches: Store<BatchSandbox>,
    pub pools: Store<Pool>,
}

impl Context {
    pub fn new(
        client: Client,
        stores: Stores,
        policies: Arc<dyn PolicyEngine>,
        config: ControllerConfig,
        metrics: ControllerMetrics,
    ) -> Self {
        let reporter = Reporter {
            controller: names::MANAGED_BY.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let status_writes_per_second = config.pool_status_writes_per_second;
        let index = index::CacheIndex::default();
        index.with(|index| {
            index.pods_relisted(stores.pods.state().iter());
            index.batches_relisted(stores.batches.state().iter());
        });
        Context {
            remembered: sandbox_policy::Remembered::new(policies.as_ref()),
            recorder: Recorder::new(client.clone(), reporter),
            executor: sandbox_executor::client::ExecutorClient::new(
                config.executor.signing_key.clone(),
            ),
            client,
            pods: stores.pods,
            batches: stores.batches,
            pools: stores.pools,
            policies,
            config,
            claims: Default::default(),
            grants_in_flight: Default::default(),
            rejected_grants: Default::default(),
            index,
            pacing: pacing::Pacing::new(status_writes_per_second),
            idle_left: Default::default(),
            held_pods_gone: Default::default(),
            incarnation: incarnation(),
            pool_wakeups: Default::default(),
            batch_wakeups: Default::default(),
            ledgers: Default::default(),
            expectations: Default::default(),
            last_status: Default::default(),
            pool_statuses: Default::default(),
            backoff: Default::default(),
            metrics,
            pod_writes: tokio::sync::Semaphore::new(32),
            pod_names: Default::default(),
            task_polls: Default::default(),
            returned_to_pool: Default::default(),
            recycled: Default::default(),
        }
    }

    /// Queues a reconcile of `pool` (a no-op before the reconcilers run).
    fn wake_pool(&self, namespace: &str, pool: &str, cause: metrics::PoolWake) {
        self.metrics.pool_woken(cause);
        if let Some(wakeups) = self.pool_wakeups.get() {
            let _ = wakeups.send(ObjectRef::new(pool).within(namespace));
        }
    }

    /// Queues a reconcile of `batch` (a no-op before the reconcilers run).
    fn wake_batch(&self, namespace: &str, batch: &str) {
        if let Some(wakeups) = self.batch_wakeups.get() {
            let _ = wakeups.send(ObjectRef::new(batch).within(namespace));
        }
    }

    /// Pods of `pool` in `namespace` in the cache (by their pool label).
    fn pool_pods(&self, namespace: &str, pool: &str) -> Vec<Arc<CachedPod>> {
        self.index.with(|i| i.pods_by_pool.members(namespace, pool))
    }

    /// Pods labelled with batch `batch` in `namespace` in the cache.
    fn batch_pods(&self, namespace: &str, batch: &str) -> Vec<Arc<CachedPod>> {
        self.index
            .with(|i| i.pods_by_batch.members(namespace, batch))
    }

    /// Batches in `namespace` in the cache that reference `pool` ([`names::ANY_POOL`]: those
    /// waiting for a Pool to be chosen).
    fn batches_of_pool(&self, namespace: &str, pool: &str) -> Vec<Arc<BatchSandbox>> {
        self.pool_batches(namespace, pool)
            .into_iter()
            .map(|b| b.batch)
            .collect()
    }

    /// [`Self::batches_of_pool`] with their ledgers as read when the cache applied them.
    fn pool_batches(&self, namespace: &str, pool: &str) -> Vec<index::PoolBatch> {
        self.index
            .with(|i| i.batches_by_pool.members(namespace, pool))
    }

    /// The pods of `pool` that `batch`, whose ledger cannot be read, may hold. If this process
    /// saw a readable version of the ledger, the pods it named. If not (the ledger turned
    /// unreadable before this process started), every pod of the pool that no readable ledger
    /// names and that this process did not make: a pod it made can only have been granted by
    /// it, and it never grants to a batch whose ledger it has not read.
    fn pods_an_unreadable_ledger_may_hold(&self, batch: &BatchSandbox, pool: &str) -> Vec<String> {
        let namespace = batch.namespace().unwrap_or_default();
        let named_elsewhere = |pod: &str| {
            self.index
                .with(|i| i.holders.named_by_readable(&namespace, pod))
        };
        if let Some(known) = self.ledgers.last_known(batch) {
            return known.into_iter().filter(|p| !named_elsewhere(p)).collect();
        }
        self.pool_pods(&namespace, pool)
            .iter()
            .filter(|p| !self.made_here(p))
            .map(|p| pods::pod_name(p).to_string())
            .filter(|p| !named_elsewhere(p))
            .collect()
    }

    /// Whether this process made `pod` (see [`names::ANNOTATION_POD_MAKER`]).
    fn made_here(&self, pod: &Pod) -> bool {
        pod.annotations().get(names::ANNOTATION_POD_MAKER) == Some(&self.incarnation)
    }

    /// Idle pods `pool` had left after its last allocation round, if it had one.
    fn idle_left(&self, namespace: &str, pool: &str) -> Option<usize> {
        self.idle_left
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&index::Key::new(namespace, pool))
            .copied()
    }

    /// Records that an expiry policy returned `batch` to its pool (see `returned_to_pool`).
    fn mark_returned_to_pool(&self, batch: &BatchSandbox) {
        if let Some(uid) = batch.uid() {
            self.returned_to_pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(uid);
        }
    }

    fn returned_to_pool(&self, batch: &BatchSandbox) -> bool {
        batch.uid().is_some_and(|uid| {
            self.returned_to_pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&uid)
        })
    }

    fn forget_returned_to_pool(&self, batch: &BatchSandbox) {
        if let Some(uid) = batch.uid() {
            self.returned_to_pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uid);
        }
    }

    fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: NamespacedObject,
    {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Publishes an event; failing to do so is logged, never fatal.
    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        self.metrics.writes.count(writes::Target::Event);
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(%error, reason, "could not publish event");
        }
    }

    /// A JSON merge patch of a namespaced object. Include `metadata.resourceVersion` in the patch
    /// to make it conditional.
    async fn merge_patch<K>(
        &self,
        namespace: &str,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<(), kube::Error>
    where
        K: NamespacedObject,
    {
        self.metrics
            .writes
            .count(writes::Target::for_kind(&K::kind(&()), false));
        let request = objects_request::<K>(namespace)
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .map_err(kube::Error::BuildRequest)?;
        self.client.request::<AnswerSkipped>(request).await?;
        Ok(())
    }

    async fn patch_status<K>(
        &self,
        namespace: &str,
        name: &str,
        patch: serde_json::Value,
    ) -> Result<(), kube::Error>
    where
        K: NamespacedObject,
    {
        self.metrics
            .writes
            .count(writes::Target::for_kind(&K::kind(&()), true));
        let request = objects_request::<K>(namespace)
            .patch_subresource(
                "status",
                name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .map_err(kube::Error::BuildRequest)?;
        self.client.request::<AnswerSkipped>(request).await?;
        Ok(())
    }

    /// Adds a finalizer, conditional on the object's resourceVersion.
    async fn add_finalizer<K>(&self, obj: &K, finalizer: &str) -> Result<(), kube::Error>
    where
        K: NamespacedObject,
    {
        let mut finalizers = obj.finalizers().to_vec();
        finalizers.push(finalizer.to_string());
        self.set_finalizers(obj, finalizers).await
    }

    /// Removes a finalizer, conditional on the object's resourceVersion.
    async fn remove_finalizer<K>(&self, obj: &K, finalizer: &str) -> Result<(), kube::Error>
    where
        K: NamespacedObject,
    {
        let finalizers = obj
            .finalizers()
            .iter()
            .filter(|f| *f != finalizer)
            .cloned()
            .collect();
        match self.set_finalizers(obj, finalizers).await {
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            other => other,
        }
    }

    async fn set_finalizers<K>(&self, obj: &K, finalizers: Vec<String>) -> Result<(), kube::Error>
    where
        K: NamespacedObject,
    {
        let patch = serde_json::json!({"metadata": {"resourceVersion": obj.resource_version(), "finalizers": finalizers}});
        self.merge_patch::<K>(
            &obj.namespace().unwrap_or_default(),
            &obj.name_any(),
            &patch,
        )
        .await?;
        Ok(())
    }

    /// Creates a pod; one that already exists (a cache lagging our own create) counts as created.
    async fn create_pod(&self, namespace: &str, pod: Pod) -> Result<(), kube::Error> {
        self.metrics.writes.count(writes::Target::Pod);
        let body = serde_json::to_vec(&pod).map_err(kube::Error::SerdeError)?;
        let request = objects_request::<Pod>(namespace)
            .create(&PostParams::default(), body)
            .map_err(kube::Error::BuildRequest)?;
        match self.client.request::<AnswerSkipped>(request).await {
            Err(kube::Error::Api(status)) if status.code == 409 && pod.metadata.name.is_some() => {
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    /// Deletes pods `names`, at most [`POD_WRITE_CONCURRENCY`] at a time; pods of `pool` go
    /// through [`Context::delete_pool_pod`].
    async fn delete_pods(
        &self,
        namespace: &str,
        pool: Option<&str>,
        names: &[String],
    ) -> Result<(), Error> {
        let results: Vec<Result<(), Error>> = futures::stream::iter(names.iter().cloned())
            .map(|name| async move {
                let params = DeleteParams::default();
                match pool {
                    Some(pool) => self.delete_pool_pod(namespace, pool, &name, &params).await,
                    None => Ok(self.delete_pod(namespace, &name, &params).await?),
                }
            })
            .buffer_unordered(POD_WRITE_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Deletes a pod of `pool`. It counts for the pool as being deleted from the moment its
    /// deletion is sent until the cache shows it go: a deletion whose answer is lost may have
    /// committed, and a round that took the pod for idle meanwhile would grant a pod on its way
    /// out. A deletion the API server refused is forgotten.
    async fn delete_pool_pod(
        &self,
        namespace: &str,
        pool: &str,
        name: &str,
        params: &DeleteParams,
    ) -> Result<(), Error> {
        let owner = format!("{namespace}/{pool}");
        self.expectations.deleted(&owner, name.to_string());
        let error = match self.delete_pod(namespace, name, params).await {
            Ok(()) => return Ok(()),
            Err(error) => Error::from(error),
        };
        if error.is_definite_refusal() {
            self.expectations.deletion_failed(&owner, name);
        }
        Err(error)
    }

    /// Deletes a pod; one already gone counts as deleted.
    async fn delete_pod(
        &self,
        namespace: &str,
        name: &str,
        params: &DeleteParams,
    ) -> Result<(), kube::Error> {
        self.metrics.writes.count(writes::Target::Pod);
        let request = objects_request::<Pod>(namespace)
            .delete(name, params)
            .map_err(kube::Error::BuildRequest)?;
        match self.client.request::<AnswerSkipped>(request).await {
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// A fresh name for a pod of `pool`, unique per process and start time.
    fn next_pod_name(&self, pool: &str) -> String {
        let n = self
            .pod_names
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        sandbox_domain::pod_template::pool_pod_name(
            pool,
            format!("{pool}/{}/{n}/{nanos}", std::process::id()).as_bytes(),
        )
    }

    /// A controller owner reference to `obj`, so the garbage collector removes what it owns.
    fn owner_reference<K: Resource<DynamicType = ()>>(&self, obj: &K) -> OwnerReference {
        obj.controller_owner_ref(&()).unwrap_or_default()
    }

    /// Runs a policy decision. An embedded default takes microseconds and runs right here; a
    /// custom policy (`selector` names one) may take up to its time limit, so it runs on a
    /// blocking thread and never holds up other reconciles.
    async fn decide<T: Send + 'static>(
        &self,
        selector: Option<String>,
        f: impl FnOnce(&dyn PolicyEngine, sandbox_policy::PolicySelector<'_>) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let policies = self.policies.clone();
        match selector {
            None => Ok(f(policies.as_ref(), None)),
            Some(name) => {
                Ok(tokio::task::spawn_blocking(move || f(policies.as_ref(), Some(&name))).await?)
            }
        }
    }
}

/// Starts the reflectors and both reconcilers; returns when `shutdown` resolves and in-flight
/// reconciles have finished.
pub async fn run(
    client: Client,
    policies: Arc<dyn PolicyEngine>,
    config: ControllerConfig,
    health: crate::runtime::health::Health,
    metrics: ControllerMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (pods_store, pods_writer) = reflector::store::<CachedPod>();
    let (batches_store, batches_writer) = reflector::store::<BatchSandbox>();
    let (pools_store, pools_writer) = reflector::store::<Pool>();
    let (pool_tx, pool_rx) = mpsc::unbounded_channel::<ObjectRef<Pool>>();
    let (batch_tx, batch_rx) = mpsc::unbounded_channel::<ObjectRef<BatchSandbox>>();

    let context = Arc::new(Context::new(
        client.clone(),
        Stores {
            pods: pods_store.clone(),
            batches: batches_store.clone(),
            pools: pools_store.clone(),
        },
        policies,
        config.clone(),
        metrics,
    ));
    let _ = context.pool_wakeups.set(pool_tx.clone());
    let _ = context.batch_wakeups.set(batch_tx.clone());
    let router = router::Router::new(context.clone(), pool_tx, batch_tx);

    let ns = config.namespace.as_deref();
    let pods_cfg = watcher::Config::default().labels(&format!(
        "{}={}",
        names::LABEL_MANAGED_BY,
        names::MANAGED_BY
    ));
    let pod_events = reflect(
        pods_writer,
        scoped(&client, ns),
        pods_cfg,
        // Pods are decoded as cached ([`CachedPod`]).
        std::convert::identity,
        router.clone(),
        router::Router::pod_event,
    );
    let batch_events = reflect(
        batches_writer,
        scoped::<Served<BatchSandbox>>(&client, ns),
        watcher::Config::default(),
        Served::into_object,
        router.clone(),
        router::Router::batch_event,
    );
    let pool_events = reflect(
        pools_writer,
        scoped::<Served<Pool>>(&client, ns),
        watcher::Config::default(),
        Served::into_object,
        router.clone(),
        router::Router::pool_event,
    );

    // Decisions need all three caches: a pool must never allocate from a partial view.
    let caches = {
        let stores = (
            pods_store.clone(),
            batches_store.clone(),
            pools_store.clone(),
        );
        async move {
            stores.0.wait_until_ready().await?;
            stores.1.wait_until_ready().await?;
            stores.2.wait_until_ready().await?;
            anyhow::Ok(())
        }
    };
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let reconcilers = async move {
        caches.await?;
        info!("caches synced; reconciling");
        health.set_synced(true);
        let ctrl_config = controller::Config::default().concurrency(config.concurrency);
        let pools = controller::applier(
            |pool, ctx| Box::pin(pool::reconcile(pool, ctx)),
            |pool: Arc<Pool>, error: &Error, ctx: Arc<Context>| {
                ctx.backoff
                    .on_error(&ObjectRef::from_obj(pool.as_ref()).erase(), error)
            },
            context.clone(),
            pools_store.clone(),
            queue(pool_rx, shutdown.clone()),
            ctrl_config.clone(),
        )
        .for_each(|result| {
            log_result(result);
            future::ready(())
        });
        let batches = controller::applier(
            |batch, ctx| Box::pin(batch::reconcile(batch, ctx)),
            |batch: Arc<BatchSandbox>, error: &Error, ctx: Arc<Context>| {
                ctx.backoff
                    .on_error(&ObjectRef::from_obj(batch.as_ref()).erase(), error)
            },
            context.clone(),
            batches_store.clone(),
            queue(batch_rx, shutdown.clone()),
            ctrl_config,
        )
        .for_each(|result| {
            log_result(result);
            future::ready(())
        });
        // A policy loaded, changed or removed may change any decision: decide again for all.
        let policy_changes = async move {
            if let Some(mut changes) = context.policies.changes() {
                while changes.changed().await.is_ok() {
                    info!("policies changed; re-reconciling every object");
                    router.everything();
                }
            }
            future::pending::<()>().await
        };
        tokio::select! {
            _ = future::join(pools, batches) => {}
            _ = policy_changes => {}
        }
        anyhow::Ok(())
    };
    tokio::select! {
        result = reconcilers => result?,
        _ = pod_events => anyhow::bail!("pod watch ended"),
        _ = batch_events => anyhow::bail!("BatchSandbox watch ended"),
        _ = pool_events => anyhow::bail!("Pool watch ended"),
    }
    info!("reconcilers stopped");
    Ok(())
}

/// Keeps `writer`'s store in sync with a watch of `api`, each object cut down by `trim` before
/// it is cached, handing every event to `route`.
/// Caches what `api`'s watch decodes, each object as `decode` makes it, and routes every event.
fn reflect<W, K>(
    writer: reflector::store::Writer<K>,
    api: Api<W>,
    config: watcher::Config,
    decode: fn(W) -> K,
    router: router::Router,
    route: fn(&router::Router, Result<watcher::Event<K>, watcher::Error>),
) -> impl std::future::Future<Output = ()>
where
    W: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let events = watcher(api, config)
        .default_backoff()
        .map_ok(move |event| served::decoded(event, decode));
    reflector::reflector(writer, events).for_each(move |event| {
        route(&router, event);
        future::ready(())
    })
}

/// The answer to a write, which nothing reads (the whole object, or a status): skipped, not
/// built.
type AnswerSkipped = serde::de::IgnoredAny;

/// Requests on the objects of kind `K` in `namespace`.
fn objects_request<K: NamespacedObject>(namespace: &str) -> kube::core::Request {
    kube::core::Request::new(K::url_path(&(), Some(namespace)))
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: NamespacedObject,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The reconcile queue: routed requests until shutdown, after which the applier drains.
fn queue<K: Resource + 'static>(
    rx: mpsc::UnboundedReceiver<ObjectRef<K>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl futures::Stream<Item = Result<ObjectRef<K>, std::convert::Infallible>> + Send
where
    K::DynamicType: Send,
{
    tokio_stream_from(rx).take_until(shutdown).map(Ok)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn log_result<K: Resource, Q: std::error::Error>(
    result: Result<(ObjectRef<K>, Action), controller::Error<Error, Q>>,
) where
    K::DynamicType: std::fmt::Debug,
{
    match result {
        // Objects deleted since they were queued are routine; a reconcile's own failure was
        // logged, with its object and retry, by the error policy.
        Ok(_)
        | Err(controller::Error::ObjectNotFound(_))
        | Err(controller::Error::ReconcilerFailed(..)) => {}
        Err(error) => warn!(%error, "reconcile failed"),
    }
}

/// Name and namespace of any namespaced object, for messages.
fn object_name<K: ResourceExt>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// A batch's allocation ledger; a corrupt one is an error, never read as empty.
fn ledger_of(batch: &BatchSandbox) -> Result<sandbox_domain::allocation::AllocStatus, Error> {
    sandbox_domain::allocation::AllocStatus::of(batch).map_err(|source| Error::CorruptAllocStatus {
        object: object_name(batch),
        source,
    })
}

/// The custom policy an object selected for `decision`, from its annotations.
fn policy_selector<K: ResourceExt>(obj: &K, decision: sandbox_policy::Decision) -> Option<String> {
    obj.annotations()
        .get(&format!(
            "{}{}",
            sandbox_domain::api::names::ANNOTATION_POLICY_PREFIX,
            decision.name()
        ))
        .cloned()
}

/// The shards of a batch released after their task finished.
fn released_of(batch: &BatchSandbox) -> sandbox_domain::released::Released {
    sandbox_domain::released::Released::parse(
        batch
            .annotations()
            .get(sandbox_domain::released::ANNOTATION_TASK_RESULTS)
            .map(String::as_str),
    )
}
