//! BatchSandbox reconciler: creates and removes a non-pooled batch's pods, shrinks a pooled
//! batch's ledger, expires batches, keeps endpoints and status current, and cleans up on deletion.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{DeleteParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tracing::{debug, info, warn};

use super::cached_pod::CachedPod;
use super::recycled::RecycledCopy;
use super::tasks::{StopOutcome, still_stopping};
use super::{
    Context, Error, POD_WRITE_CONCURRENCY, ledger_of, object_name, policy_selector, released_of,
};
use sandbox_decisions::expiry::{BatchSnapshot, ExpireAction, ExpiryDecision};
use sandbox_decisions::tasks::TaskPhase;
use sandbox_domain::alloc_release::{self, PodList};
use sandbox_domain::allocation::{self, AllocStatus};
use sandbox_domain::api::{BatchSandbox, Pool, RecycleType, TaskResourcePolicy, names};
use sandbox_domain::conditions::{self, Desired};
use sandbox_domain::recycle::{RecycleAction, effective_recycle_type, recycle_action};
use sandbox_domain::released::{ANNOTATION_TASK_RESULTS, Released};
use sandbox_domain::status::{self, BatchView, PoolSituation, ShardView};
use sandbox_domain::{endpoints, pod_template, pods};
use sandbox_policy::Decision;
use sandbox_policy::ShardTaskInput;
use std::time::Duration;

pub async fn reconcile(batch: Arc<BatchSandbox>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = ObjectRef::from_obj(batch.as_ref()).erase();
    let started = std::time::Instant::now();
    let result = reconcile_batch(&batch, &ctx).await;
    ctx.metrics.reconciled(
        "BatchSandbox",
        started.elapsed(),
        result.as_ref().map(|_| ()),
    );
    if result.is_ok() {
        ctx.backoff.on_success(&key);
    }
    result
}

/// A batch's shards as observed: shard i's pod, if any.
struct Shards {
    pods: Vec<Option<Arc<CachedPod>>>,
    /// Live pods of the batch, including ones above `replicas` still going away.
    live: u32,
    /// Removed shards whose tasks are still stopping; their pods go once the tasks are gone.
    stopping: bool,
}

/// Condition on a pooled batch whose `alloc-status` annotation cannot be read.
pub const CONDITION_LEDGER_UNREADABLE: &str = "LedgerUnreadable";

/// How often to look again while tasks are being stopped.
const STOP_POLL: Duration = Duration::from_millis(250);

async fn reconcile_batch(batch: &BatchSandbox, ctx: &Context) -> Result<Action, Error> {
    match ctx.recycled.of(batch) {
        RecycledCopy::Current => {}
        // Recycled from and written past: those pods may be another batch's by now. The watch
        // brings the newer copy (or the batch's removal), and with it a reconcile.
        RecycledCopy::WrittenPast => return Ok(Action::await_change()),
        // The write past it went unanswered: the API server tells whether it committed.
        RecycledCopy::MaybeWrittenPast => {
            if !still_current(batch, ctx).await? {
                return Ok(Action::await_change());
            }
        }
    }
    if batch.metadata.deletion_timestamp.is_some() {
        return cleanup(batch, ctx).await;
    }
    if batch.awaits_pool_selection() {
        return super::selection::reconcile(batch, ctx).await;
    }

    // A pooled batch's ledger, read once for the whole reconcile.
    let pooled = match batch.pool_name() {
        Some(pool) => match ledger_of(batch) {
            Ok(ledger) => Some((pool, ledger)),
            Err(error) => return report_unreadable_ledger(batch, ctx, &error).await,
        },
        None => None,
    };
    let released = released_of(batch);
    if let Some((_, ledger)) = &pooled
        && let Some(action) = release_shards(batch, ctx, ledger, &released).await?
    {
        return Ok(action);
    }
    let shards = match pooled {
        Some((pool, ledger)) => pooled_shards(batch, ctx, pool, ledger).await?,
        None => own_pods(batch, ctx, &released).await?,
    };
    write_endpoints(batch, ctx, &shards).await?;
    let report = task_phases(batch, ctx, &shards, &released).await?;
    // Expiry sees the observed task phases, so a policy can grant running tasks a grace period.
    let expiry = decide_expiry(batch, ctx, &report.phases).await?;
    let recheck = match expiry.decision {
        ExpiryDecision::Expire { action } => return expire(batch, ctx, action).await,
        ExpiryDecision::Keep { recheck_after_ms } => recheck_after_ms.map(Duration::from_millis),
    };
    if batch.spec.task_resource_policy_when_completed == Some(TaskResourcePolicy::Release)
        && release_finished(batch, ctx, &shards, &report, &released).await?
    {
        // The write above triggers a fresh reconcile with the new ledger.
        return Ok(Action::await_change());
    }
    let degraded = expiry.degraded.or(report.degraded);
    write_status(batch, ctx, &shards, &report.phases, &released, degraded).await?;

    let resync = ctx.config.resync;
    let next = [
        recheck,
        report.recheck,
        shards.stopping.then_some(STOP_POLL),
    ]
    .into_iter()
    .flatten()
    .fold(resync, Duration::min);
    Ok(Action::requeue(next))
}

pub(super) async fn decide_expiry(
    batch: &BatchSandbox,
    ctx: &Context,
    task_phases: &[TaskPhase],
) -> Result<sandbox_policy::Outcome<ExpiryDecision>, Error> {
    let snapshot = BatchSnapshot {
        name: batch.name_any(),
        expire_time_unix_ms: batch
            .spec
            .expire_time
            .as_ref()
            .map(|t| t.0.as_millisecond()),
        now_unix_ms: Timestamp::now().as_millisecond(),
        pooled: batch.pool_name().is_some(),
        task_phases: task_phases.to_vec(),
    };
    let selector = policy_selector(batch, Decision::Expiry);
    let uid = batch.uid();
    if let Some(uid) = &uid
        && let Some(standing) = ctx.remembered.expiry(uid, selector.as_deref(), &snapshot)
    {
        return Ok(sandbox_policy::Outcome::ok(standing));
    }
    let asked = snapshot.clone();
    let outcome = ctx
        .decide(selector.clone(), move |p, s| p.expiry(s, &asked))
        .await?;
    if let Some(uid) = &uid {
        ctx.remembered
            .remember_expiry(uid, selector.as_deref(), &snapshot, &outcome);
    }
    Ok(outcome)
}

/// Whether `copy`, whose pods were recycled before a write past it that went unanswered, is
/// still the batch's current state: then that write did not commit, and the copy is acted on.
async fn still_current(copy: &BatchSandbox, ctx: &Context) -> Result<bool, Error> {
    let fresh = ctx
        .api::<BatchSandbox>(&copy.namespace().unwrap_or_default())
        .get_opt(&copy.name_any())
        .await?;
    let current = fresh.is_some_and(|fresh| {
        fresh.uid() == copy.uid() && fresh.resource_version() == copy.resource_version()
    });
    if current {
        ctx.recycled.not_written_past(copy);
    } else {
        ctx.recycled.written_past(copy);
    }
    Ok(current)
}

/// Deletes an expired batch; its finalizer then releases the pods.
pub(super) async fn expire(
    batch: &BatchSandbox,
    ctx: &Context,
    action: ExpireAction,
) -> Result<Action, Error> {
    let ns = batch.namespace().unwrap_or_default();
    if action == ExpireAction::ReturnToPool && batch.pool_name().is_some() {
        ctx.mark_returned_to_pool(batch);
    }
    let expire_time = batch
        .spec
        .expire_time
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    ctx.event(
        batch,
        EventType::Normal,
        "Expired",
        format!("expireTime {expire_time} reached; deleting"),
    )
    .await;
    info!(batch = %object_name(batch), %expire_time, "expired");
    ctx.metrics.writes.count(super::WriteTarget::BatchObject);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: batch.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match ctx
        .api::<BatchSandbox>(&ns)
        .delete(&batch.name_any(), &params)
        .await
    {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(Action::await_change()),
        Err(error) => Err(error.into()),
    }
}

/// Non-pooled: pods `<name>-<index>` for every shard, none above `replicas`.
async fn own_pods(
    batch: &BatchSandbox,
    ctx: &Context,
    released: &Released,
) -> Result<Shards, Error> {
    if !batch
        .finalizers()
        .iter()
        .any(|f| f == names::FINALIZER_BATCH)
    {
        ctx.add_finalizer(batch, names::FINALIZER_BATCH).await?;
    }
    let ns = batch.namespace().unwrap_or_default();
    let name = batch.name_any();
    let by_index = owned_pods_by_index(batch, ctx);
    let replicas = batch.desired_replicas();
    let template = batch.spec.template.clone().unwrap_or_default();
    let owner = ctx.owner_reference(batch);

    let mut to_create = Vec::new();
    let mut to_delete = Vec::new();
    let with_executor = uses_tasks(batch);
    for index in 0..replicas {
        match by_index.get(&index) {
            None if released.contains(index) => {}
            None => {
                let mut pod = pod_template::batch_pod(
                    &name,
                    index,
                    &template,
                    batch.spec.shard_patches.get(index),
                    owner.clone(),
                )?;
                ctx.config.executor.prepare(&mut pod, with_executor);
                to_create.push(pod)
            }
            // A finished pod can never serve again: replace it (it is recreated once gone).
            Some(pod) if pod.is_finished() && !pods::is_terminating(pod) => {
                to_delete.push(pods::pod_name(pod).to_string())
            }
            Some(_) => {}
        }
    }
    let excess_pods: Vec<Arc<CachedPod>> = by_index
        .range(replicas..)
        .filter(|(_, p)| !pods::is_terminating(p))
        .map(|(_, p)| p.clone())
        .collect();
    // Tasks of removed shards stop before their pods go.
    let stopping =
        !excess_pods.is_empty() && still_stopping(&super::tasks::stop(ctx, &excess_pods).await);
    let excess: Vec<String> = if stopping {
        vec![]
    } else {
        excess_pods
            .iter()
            .map(|p| pods::pod_name(p).to_string())
            .collect()
    };
    to_delete.extend(excess.iter().cloned());

    if !to_create.is_empty() {
        let created = to_create.len();
        let results: Vec<Result<(), kube::Error>> =
            stream::iter(to_create.into_iter().map(|pod| ctx.create_pod(&ns, pod)))
                .buffer_unordered(POD_WRITE_CONCURRENCY)
                .collect()
                .await;
        results.into_iter().collect::<Result<(), _>>()?;
        ctx.event(
            batch,
            EventType::Normal,
            "PodsCreated",
            format!("created {created} sandbox pod(s)"),
        )
        .await;
    }
    delete_all(ctx, batch, &to_delete).await?;
    if !excess.is_empty() {
        ctx.event(
            batch,
            EventType::Normal,
            "ScaledDown",
            format!("removed shard pod(s) {}", excess.join(", ")),
        )
        .await;
    }

    let by_index = owned_pods_by_index(batch, ctx);
    let live = by_index.values().filter(|p| p.is_live()).count() as u32;
    let pods = (0..replicas)
        .map(|i| by_index.get(&i).filter(|p| p.is_live()).cloned())
        .collect();
    Ok(Shards {
        pods,
        live,
        stopping,
    })
}

fn owned_pods_by_index(batch: &BatchSandbox, ctx: &Context) -> BTreeMap<usize, Arc<CachedPod>> {
    let ns = batch.namespace();
    let name = batch.name_any();
    let uid = batch.uid().unwrap_or_default();
    ctx.batch_pods(&ns.unwrap_or_default(), &name)
        .into_iter()
        .filter(|p| p.owner_references().iter().any(|o| o.uid == uid))
        .filter_map(|p| Some((p.labels().get(names::LABEL_POD_INDEX)?.parse().ok()?, p)))
        .collect()
}

/// Pooled: the ledger's pods; shards above `replicas` are released and dropped from the ledger.
async fn pooled_shards(
    batch: &BatchSandbox,
    ctx: &Context,
    pool: &str,
    ledger: AllocStatus,
) -> Result<Shards, Error> {
    let ns = batch.namespace().unwrap_or_default();
    let replicas = batch.desired_replicas();
    // Only entries that are pods of the pool are given back; others are dropped untouched.
    let released = ledger_pods(batch, ctx, ledger.pods.iter().skip(replicas)).await?;
    let stopping = !released.is_empty()
        && !stop_and_recycle(batch, ctx, &released, recycle_type(batch, ctx)).await?;
    if ledger.pods.len() > replicas && !stopping {
        let kept = AllocStatus {
            pods: ledger.pods[..replicas].to_vec(),
            pool_ref: Some(pool.to_string()),
        };
        let ips: Vec<Option<String>> = kept
            .pods
            .iter()
            .map(|p| held_pod(batch, ctx, p).and_then(|p| pods::pod_ip(&p).map(str::to_string)))
            .collect();
        let ips: Vec<Option<&str>> = ips.iter().map(Option::as_deref).collect();
        let patch = json!({"metadata": {
            "resourceVersion": batch.resource_version(),
            "annotations": {
                names::ANNOTATION_ALLOC_STATUS: kept.to_annotation(),
                names::ANNOTATION_ENDPOINTS: endpoints::render(&ips, ctx.config.endpoints_format.for_labels(batch.labels())),
            }
        }});
        let written = ctx
            .merge_patch::<BatchSandbox>(&ns, &batch.name_any(), &patch)
            .await;
        ctx.recycled.after_write(batch, written)?;
        ctx.event(
            batch,
            EventType::Normal,
            "ScaledDown",
            format!("released {} pod(s) to pool {pool}", released.len()),
        )
        .await;
    }
    let shown = ledger.pods.len().min(replicas);
    let mut shard_pods: Vec<Option<Arc<CachedPod>>> = ledger.pods[..shown]
        .iter()
        .map(|p| held_pod(batch, ctx, p))
        .collect();
    let live = shard_pods.iter().flatten().count() as u32;
    shard_pods.resize(replicas, None);
    Ok(Shards {
        pods: shard_pods,
        live,
        stopping,
    })
}

/// The pod a pooled batch's ledger entry names, if it is a live pod of the batch's pool. The
/// ledger is an annotation: an entry naming any other pod is never dispatched to nor deleted.
fn held_pod(batch: &BatchSandbox, ctx: &Context, name: &str) -> Option<Arc<CachedPod>> {
    pod_named(ctx, &batch.namespace().unwrap_or_default(), name)
        .filter(|pod| is_pool_pod_of(batch, ctx, pod))
}

fn is_pool_pod_of(batch: &BatchSandbox, ctx: &Context, pod: &Pod) -> bool {
    let Some(pool) = batch.pool_name() else {
        return false;
    };
    let ns = batch.namespace().unwrap_or_default();
    let pool_uid = ctx
        .pools
        .get(&ObjectRef::<Pool>::new(pool).within(&ns))
        .and_then(|p| p.uid());
    allocation::belongs_to_pool(pod, pool, pool_uid.as_deref())
}

/// The pods of the pool that the ledger entries `names` hold, for giving them back. The pod
/// cache lags the batch cache at times (a watch reconnecting, a stalled connection), and a pod
/// the batch holds must never be let go unrecycled because the cache does not show it yet: an
/// entry the cache does not know is read afresh, and only a pod the API server says is gone is
/// passed over.
async fn ledger_pods<'a>(
    batch: &BatchSandbox,
    ctx: &Context,
    names: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<Arc<CachedPod>>, Error> {
    let ns = batch.namespace().unwrap_or_default();
    let mut held = Vec::new();
    for name in names.into_iter().filter(|n| !n.is_empty()) {
        let pod = match pod_named(ctx, &ns, name) {
            Some(cached) => Some(cached),
            None => ctx.api::<CachedPod>(&ns).get_opt(name).await?.map(Arc::new),
        };
        if let Some(pod) = pod.filter(|pod| is_pool_pod_of(batch, ctx, pod)) {
            held.push(pod);
        }
    }
    Ok(held)
}

/// Lets go of the pods of shards being released: those a user's `alloc-release` request names
/// (scaled in: tasks stopped, pods recycled by the pool's recycle strategy, shards never
/// refilled), and those already marked released whose ledger entry still names a pod (a finished
/// task's shard under `taskResourcePolicyWhenCompleted: Release`). Returns the action to take
/// when it did something or must wait for tasks to stop.
///
/// A pod leaves the ledger only once its recycle is done: first the shards are marked released
/// (so the pool never refills them, while the ledger still holds their pods), then their tasks
/// are stopped and each pod deleted or judged fit to return, and only then does the ledger let go
/// of it. A recycle that fails leaves the pod held, never idle with its previous holder's
/// processes.
async fn release_shards(
    batch: &BatchSandbox,
    ctx: &Context,
    ledger: &AllocStatus,
    released: &Released,
) -> Result<Option<Action>, Error> {
    let annotation = |key: &str| batch.annotations().get(key).map(String::as_str);
    let requested = match PodList::parse(annotation(names::ANNOTATION_ALLOC_RELEASE)) {
        Ok(request) => request.pods,
        Err(error) => {
            // Admission refuses such values; one written around it is ignored, loudly.
            warn!(batch = %object_name(batch), %error, "unreadable alloc-release annotation; ignored");
            vec![]
        }
    };
    let mut ledger = ledger.clone();
    let shards = alloc_release::shards_to_let_go(&ledger.pods, &requested, released);
    if shards.is_empty() {
        return Ok(None);
    }
    let ns = batch.namespace().unwrap_or_default();

    // 1. Mark the shards released, conditional on the resourceVersion: they are never refilled
    //    nor dispatched to again, and their pods stay held by the ledger meanwhile.
    if shards.iter().any(|&shard| !released.contains(shard)) {
        let mut results = released.clone();
        for &shard in &shards {
            results.0.entry(shard).or_insert(TaskPhase::None);
        }
        let patch = json!({"metadata": {
            "resourceVersion": batch.resource_version(),
            "annotations": {ANNOTATION_TASK_RESULTS: results.to_annotation()}
        }});
        ctx.merge_patch::<BatchSandbox>(&ns, &batch.name_any(), &patch)
            .await?;
        // The write triggers the next step with the new state.
        return Ok(Some(Action::await_change()));
    }

    // 2. Stop their tasks and recycle their pods.
    let pod_names: Vec<String> = shards.iter().map(|&i| ledger.pods[i].clone()).collect();
    let pod_objects = ledger_pods(batch, ctx, &pod_names).await?;
    let outcomes = super::tasks::stop(ctx, &pod_objects).await;
    if still_stopping(&outcomes) {
        return Ok(Some(Action::requeue(STOP_POLL)));
    }
    if !recycle(
        batch,
        ctx,
        &pod_objects,
        &outcomes,
        recycle_type(batch, ctx),
    )
    .await?
    {
        return Ok(Some(Action::requeue(STOP_POLL)));
    }

    // 3. Only now let the ledger go of them (conditional on the resourceVersion). Pods released
    //    on request are recorded as such.
    for &shard in &shards {
        ledger.pods[shard].clear();
    }
    // (shard, pod) of each shard let go, as released on request or after its task finished.
    type LetGo = Vec<(usize, String)>;
    let (on_request, finished): (LetGo, LetGo) = shards
        .iter()
        .copied()
        .zip(pod_names)
        .partition(|(_, pod)| requested.contains(pod));
    let done = PodList::parse(annotation(names::ANNOTATION_ALLOC_RELEASED))
        .unwrap_or_default()
        .with(on_request.iter().map(|(_, pod)| pod.clone()));
    let patch = json!({"metadata": {
        "resourceVersion": batch.resource_version(),
        "annotations": {
            names::ANNOTATION_ALLOC_STATUS: ledger.to_annotation(),
            names::ANNOTATION_ALLOC_RELEASED: done.to_annotation(),
        }
    }});
    let written = ctx
        .merge_patch::<BatchSandbox>(&ns, &batch.name_any(), &patch)
        .await;
    ctx.recycled.after_write(batch, written)?;
    let listed = |shards: &[(usize, String)]| {
        let pods: Vec<&str> = shards.iter().map(|(_, pod)| pod.as_str()).collect();
        let indexes: Vec<String> = shards.iter().map(|(shard, _)| shard.to_string()).collect();
        (pods.join(", "), indexes.join(", "))
    };
    if !on_request.is_empty() {
        let (pods, shards) = listed(&on_request);
        ctx.event(
            batch,
            EventType::Normal,
            "PodsReleased",
            format!("released pod(s) {pods} of shard(s) {shards} on request"),
        )
        .await;
        info!(batch = %object_name(batch), %pods, "released on request");
    }
    if !finished.is_empty() {
        let (_, shards) = listed(&finished);
        ctx.event(
            batch,
            EventType::Normal,
            "ShardsReleased",
            format!("task finished on shard(s) {shards}; released their pods"),
        )
        .await;
    }
    Ok(Some(Action::await_change()))
}

fn pod_named(ctx: &Context, ns: &str, name: &str) -> Option<Arc<CachedPod>> {
    ctx.pods.get(&ObjectRef::new(name).within(ns))
}

/// Stops the tasks on the `released` pods and, once none is still stopping, deletes or returns
/// each pod as `strategy` says (pods that are returned turn idle once the batch no longer lists
/// them). Returns false, changing nothing, while tasks are still stopping. Non-pooled pods
/// always go with [`RecycleType::Delete`].
async fn stop_and_recycle(
    batch: &BatchSandbox,
    ctx: &Context,
    released: &[Arc<CachedPod>],
    strategy: RecycleType,
) -> Result<bool, Error> {
    let outcomes = super::tasks::stop(ctx, released).await;
    recycle(batch, ctx, released, &outcomes, strategy).await
}

/// Applies `strategy` to `pods` given what stopping their tasks showed; see [`stop_and_recycle`].
async fn recycle(
    batch: &BatchSandbox,
    ctx: &Context,
    pods: &[Arc<CachedPod>],
    outcomes: &[StopOutcome],
    strategy: RecycleType,
) -> Result<bool, Error> {
    let actions: Vec<(&Arc<CachedPod>, RecycleAction)> = pods
        .iter()
        .zip(outcomes)
        .map(|(pod, stop)| {
            let healthy = pod.is_live() && pod.is_running_and_ready();
            (pod, recycle_action(strategy, stop, healthy))
        })
        .collect();
    if actions.iter().any(|(_, a)| *a == RecycleAction::Wait) {
        return Ok(false);
    }
    let mut doomed = Vec::new();
    for (pod, action) in actions {
        let name = pods::pod_name(pod).to_string();
        match action {
            RecycleAction::Delete => doomed.push(name),
            RecycleAction::DeleteUnconfirmed(why) => {
                let note = format!(
                    "pod {name} deleted instead of returned to pool {}: {why}",
                    batch.pool_name().unwrap_or_default()
                );
                ctx.event(
                    batch,
                    EventType::Warning,
                    "RecycleUnconfirmed",
                    note.clone(),
                )
                .await;
                if let Some(pool) = pool_of(batch, ctx) {
                    ctx.event(
                        pool.as_ref(),
                        EventType::Warning,
                        "RecycleUnconfirmed",
                        note,
                    )
                    .await;
                }
                doomed.push(name);
            }
            RecycleAction::ReturnIdle | RecycleAction::Wait => {}
        }
    }
    delete_all(ctx, batch, &doomed).await?;
    // Say on the Pool what became of the pods, so `kubectl describe pool` shows where they went.
    if let (false, Some(pool)) = (pods.is_empty(), pool_of(batch, ctx)) {
        let kept = pods.len() - doomed.len();
        ctx.event(
            pool.as_ref(),
            EventType::Normal,
            "Recycled",
            format!(
                "BatchSandbox {} gave back {} pod(s): {kept} idle again, {} deleted",
                batch.name_any(),
                pods.len(),
                doomed.len()
            ),
        )
        .await;
    }
    Ok(true)
}

fn pool_of(batch: &BatchSandbox, ctx: &Context) -> Option<Arc<Pool>> {
    let ns = batch.namespace().unwrap_or_default();
    batch
        .pool_name()
        .and_then(|pool| ctx.pools.get(&ObjectRef::<Pool>::new(pool).within(&ns)))
}

/// How this batch's pods are recycled: non-pooled ones are deleted; pooled ones follow their
/// pool's strategy, except that a batch an expiry policy returned to its pool (`ReturnToPool`)
/// gets `Restart`: back to the pool, but only once its processes are confirmed ended.
fn recycle_type(batch: &BatchSandbox, ctx: &Context) -> RecycleType {
    effective_recycle_type(
        batch.pool_name().is_some(),
        ctx.returned_to_pool(batch),
        pool_of(batch, ctx).map(|pool| pool.spec.recycle_type()),
    )
}

/// Deletes `batch`'s pods `names`. A pooled batch's pods are its pool's: they count for the pool
/// as being deleted from the moment the deletion is sent (see [`Context::delete_pool_pod`]), as
/// the ledger may let go of them, or the batch be gone, before the pod cache shows them go.
async fn delete_all(ctx: &Context, batch: &BatchSandbox, names: &[String]) -> Result<(), Error> {
    let ns = batch.namespace().unwrap_or_default();
    ctx.delete_pods(&ns, batch.pool_name(), names).await
}

/// Deletion: stop tasks, release or delete pods, then let the object go.
///
/// Bounded: once `cleanup_deadline` has passed since the deletion, tasks that still have not
/// stopped have their pods deleted (never recycled) and the finalizer comes off. A pooled batch
/// whose ledger cannot be read cannot prove which pods it holds: every pod it may hold is
/// deleted (see [`Context::pods_an_unreadable_ledger_may_hold`]).
async fn cleanup(batch: &BatchSandbox, ctx: &Context) -> Result<Action, Error> {
    if !batch
        .finalizers()
        .iter()
        .any(|f| f == names::FINALIZER_BATCH)
    {
        return Ok(Action::await_change());
    }
    let pod_objects: Vec<Arc<CachedPod>> = match batch.pool_name() {
        Some(pool) => match ledger_of(batch) {
            Ok(ledger) => ledger_pods(batch, ctx, &ledger.pods).await?,
            // Which pods it holds cannot be proven: those it may hold are deleted, never
            // returned to the pool, where they would turn idle with its sandboxes still in them.
            Err(error) => {
                let suspects = ctx.pods_an_unreadable_ledger_may_hold(batch, pool);
                let suspects: Vec<String> = ledger_pods(batch, ctx, &suspects)
                    .await?
                    .iter()
                    .map(|p| pods::pod_name(p).to_string())
                    .collect();
                ctx.event(
                    batch,
                    EventType::Warning,
                    "LedgerUnreadable",
                    format!(
                        "{error}; deleting the {} pod(s) of pool {pool} it may hold: {}",
                        suspects.len(),
                        suspects.join(", ")
                    ),
                )
                .await;
                delete_all(ctx, batch, &suspects).await?;
                vec![]
            }
        },
        None => owned_pods_by_index(batch, ctx).into_values().collect(),
    };
    let pods: Vec<String> = pod_objects
        .iter()
        .map(|p| pods::pod_name(p).to_string())
        .collect();
    // Tasks stop first; pods are released or deleted only once they have.
    let outcomes = super::tasks::stop(ctx, &pod_objects).await;
    if still_stopping(&outcomes) {
        let Some(overdue) = cleanup_overdue(batch, ctx.config.cleanup_deadline) else {
            return Ok(Action::requeue(STOP_POLL));
        };
        ctx.event(
            batch,
            EventType::Warning,
            "CleanupForced",
            format!(
                "tasks did not stop within {}s of deletion; deleting their pods ({})",
                ctx.config.cleanup_deadline.as_secs(),
                pods.join(", ")
            ),
        )
        .await;
        info!(batch = %object_name(batch), overdue_s = overdue.as_secs(), "cleanup forced");
        delete_all(ctx, batch, &pods).await?;
    } else {
        recycle(
            batch,
            ctx,
            &pod_objects,
            &outcomes,
            recycle_type(batch, ctx),
        )
        .await?;
        if batch.pool_name().is_none() {
            // Non-pooled pods the cache does not show yet go too.
            delete_all(ctx, batch, &pods).await?;
        }
    }
    release_finalizer(batch, ctx).await?;
    ctx.forget_returned_to_pool(batch);
    if let Some(uid) = batch.uid() {
        ctx.ledgers.forget(&uid);
    }
    info!(batch = %object_name(batch), pods = pods.len(), "cleaned up");
    Ok(Action::await_change())
}

/// Takes the batch's finalizer off once its cleanup is done, conditional on its resourceVersion.
/// A batch that changed meanwhile only where the cleanup does not look (its status, written by
/// an earlier reconcile while the deletion came in, is the usual case) is read afresh and the
/// finalizer taken off that copy: a second cleanup would only find its pods gone, reading each
/// from the API server. A changed ledger or finalizer list is a lost race, cleaned up again.
async fn release_finalizer(batch: &BatchSandbox, ctx: &Context) -> Result<(), Error> {
    let conflict = match ctx.remove_finalizer(batch, names::FINALIZER_BATCH).await {
        Err(kube::Error::Api(status)) if status.code == 409 => kube::Error::Api(status),
        other => return ctx.recycled.after_write(batch, other),
    };
    let ns = batch.namespace().unwrap_or_default();
    let Some(fresh) = ctx
        .api::<BatchSandbox>(&ns)
        .get_opt(&batch.name_any())
        .await?
    else {
        return Ok(());
    };
    let ledger = |b: &BatchSandbox| b.annotations().get(names::ANNOTATION_ALLOC_STATUS).cloned();
    let unchanged_for_cleanup = fresh.uid() == batch.uid()
        && fresh.metadata.deletion_timestamp.is_some()
        && fresh.finalizers() == batch.finalizers()
        && ledger(&fresh) == ledger(batch);
    if !unchanged_for_cleanup {
        return Err(conflict.into());
    }
    let removed = ctx.remove_finalizer(&fresh, names::FINALIZER_BATCH).await;
    ctx.recycled.after_write(&fresh, removed)?;
    // The copy the cleanup acted on is older than the one just written past.
    ctx.recycled.written_past(batch);
    Ok(())
}

/// How far past its cleanup deadline a batch being deleted is (`None`: not yet past it).
fn cleanup_overdue(batch: &BatchSandbox, deadline: Duration) -> Option<Duration> {
    let deleted = batch.metadata.deletion_timestamp.as_ref()?.0;
    let since: Duration = Timestamp::now()
        .duration_since(deleted)
        .try_into()
        .unwrap_or_default();
    since.checked_sub(deadline)
}

/// A pooled batch whose ledger cannot be read: nothing is dispatched or released for it (its
/// pods stay held as last seen), and its status says why. The rest of its pool carries on.
async fn report_unreadable_ledger(
    batch: &BatchSandbox,
    ctx: &Context,
    error: &Error,
) -> Result<Action, Error> {
    let previous = batch.status.clone().unwrap_or_default();
    let generation = batch.metadata.generation.unwrap_or_default();
    let desired = [Desired::new(
        CONDITION_LEDGER_UNREADABLE,
        true,
        "UnreadableAllocStatus",
        error.to_string(),
    )];
    let now = Time(Timestamp::now());
    let mut conditions: Vec<_> = previous
        .conditions
        .iter()
        .filter(|c| c.type_ != CONDITION_LEDGER_UNREADABLE)
        .cloned()
        .collect();
    conditions.extend(conditions::merge(
        &previous.conditions,
        &desired,
        &now,
        generation,
    ));
    if !conditions::same(&conditions, &previous.conditions) {
        ctx.event(
            batch,
            EventType::Warning,
            "LedgerUnreadable",
            error.to_string(),
        )
        .await;
        ctx.patch_status::<BatchSandbox>(
            &batch.namespace().unwrap_or_default(),
            &batch.name_any(),
            json!({"status": {"conditions": conditions}}),
        )
        .await?;
    }
    Ok(Action::requeue(ctx.config.resync))
}

async fn write_endpoints(
    batch: &BatchSandbox,
    ctx: &Context,
    shards: &Shards,
) -> Result<(), Error> {
    let ips: Vec<Option<&str>> = shards
        .pods
        .iter()
        .map(|p| p.as_deref().and_then(|p| pods::pod_ip(p)))
        .collect();
    let rendered = endpoints::render(&ips, ctx.config.endpoints_format.for_labels(batch.labels()));
    let current = batch.annotations().get(names::ANNOTATION_ENDPOINTS);
    let both_empty = current.is_none() && ips.iter().all(Option::is_none);
    if current != Some(&rendered) && !both_empty {
        let patch = json!({"metadata": {"annotations": {names::ANNOTATION_ENDPOINTS: rendered}}});
        ctx.merge_patch::<BatchSandbox>(
            &batch.namespace().unwrap_or_default(),
            &batch.name_any(),
            &patch,
        )
        .await?;
    }
    Ok(())
}

/// Task phase per shard (`None` for shards without a task).
async fn task_phases(
    batch: &BatchSandbox,
    ctx: &Context,
    shards: &Shards,
    released: &Released,
) -> Result<super::tasks::TaskReport, Error> {
    let input = ShardTaskInput {
        batch_name: batch.name_any(),
        replicas: shards.pods.len() as u32,
        task_template: batch.spec.task_template.clone(),
        shard_patches: batch.spec.shard_task_patches.clone(),
    };
    let selector = policy_selector(batch, Decision::ShardTasks);
    let uid = batch.uid();
    let remembered = uid
        .as_deref()
        .and_then(|uid| ctx.remembered.shard_tasks(uid, selector.as_deref(), &input));
    let outcome = match remembered {
        Some(tasks) => sandbox_policy::Outcome::ok(Some(tasks)),
        None => {
            let asked = input.clone();
            let outcome = ctx
                .decide(selector.clone(), move |p, s| p.shard_tasks(s, &asked))
                .await?;
            if let Some(uid) = &uid {
                ctx.remembered
                    .remember_shard_tasks(uid, selector.as_deref(), &input, &outcome);
            }
            outcome
        }
    };
    super::tasks::sync(batch, ctx, &shards.pods, released, outcome).await
}

/// Whether any shard has a task (then non-pooled pods get the task executor).
fn uses_tasks(batch: &BatchSandbox) -> bool {
    batch.spec.task_template.is_some() || !batch.spec.shard_task_patches.is_empty()
}

/// Releases shards whose task has finished (`Release` policy): records their results on the
/// batch first, conditional on its resourceVersion, which marks the shards released. A template
/// batch's pods are then deleted; a pooled batch's are recycled and let go of by the next
/// reconcile ([`release_shards`]). Returns whether anything was released.
async fn release_finished(
    batch: &BatchSandbox,
    ctx: &Context,
    shards: &Shards,
    report: &super::tasks::TaskReport,
    released: &Released,
) -> Result<bool, Error> {
    let finished: Vec<(usize, TaskPhase, Arc<CachedPod>)> = report
        .phases
        .iter()
        .enumerate()
        .filter(|(i, p)| {
            matches!(p, TaskPhase::Succeeded | TaskPhase::Failed) && !released.contains(*i)
        })
        .filter_map(|(i, p)| Some((i, *p, shards.pods.get(i)?.clone()?)))
        .collect();
    if finished.is_empty() {
        return Ok(false);
    }
    let ns = batch.namespace().unwrap_or_default();
    let mut results = released.clone();
    for (i, phase, _) in &finished {
        results.0.insert(*i, *phase);
    }
    let patch = json!({"metadata": {
        "resourceVersion": batch.resource_version(),
        "annotations": {ANNOTATION_TASK_RESULTS: results.to_annotation()}
    }});
    ctx.merge_patch::<BatchSandbox>(&ns, &batch.name_any(), &patch)
        .await?;
    // A pool's pod stays held by the ledger until it is recycled: the next reconcile, from the
    // copy with the shards marked, lets go of it (`release_shards`), as for a release on request.
    if batch.pool_name().is_some() {
        return Ok(true);
    }

    // The finished task was the pod's only one: the answer that reported it finished also said
    // whether all its processes ended, so no stop call is needed.
    let pods_released: Vec<Arc<CachedPod>> = finished.iter().map(|(_, _, p)| p.clone()).collect();
    let outcomes: Vec<StopOutcome> = finished
        .iter()
        .map(|(i, _, _)| {
            if report.all_ended.get(*i).copied().unwrap_or(false) {
                StopOutcome::Confirmed
            } else {
                StopOutcome::Unconfirmed(format!(
                    "the executor did not confirm that every process of shard {i}'s task ended"
                ))
            }
        })
        .collect();
    recycle(
        batch,
        ctx,
        &pods_released,
        &outcomes,
        recycle_type(batch, ctx),
    )
    .await?;
    let shards_released: Vec<String> = finished.iter().map(|(i, _, _)| i.to_string()).collect();
    ctx.event(
        batch,
        EventType::Normal,
        "ShardsReleased",
        format!(
            "task finished on shard(s) {}; released their pods",
            shards_released.join(", ")
        ),
    )
    .await;
    Ok(true)
}

async fn write_status(
    batch: &BatchSandbox,
    ctx: &Context,
    shards: &Shards,
    task_phases: &[TaskPhase],
    released: &Released,
    degraded: Option<String>,
) -> Result<(), Error> {
    let shard_views: Vec<ShardView> = shards
        .pods
        .iter()
        .zip(
            task_phases
                .iter()
                .copied()
                .chain(std::iter::repeat(TaskPhase::None)),
        )
        .enumerate()
        .map(|(index, (pod, task))| ShardView {
            released: released.contains(index),
            has_pod: pod.is_some(),
            ready: pod.as_deref().is_some_and(|p| p.is_running_and_ready()),
            task,
        })
        .collect();
    let view = BatchView {
        generation: batch.metadata.generation.unwrap_or_default(),
        pooled: batch.pool_name().is_some(),
        live_pods: shards.live,
        pool: pool_situation(batch, ctx, &shard_views),
        policy_degraded: degraded,
        shards: shard_views,
    };
    // A pooled batch its pool is about to serve: the pool's allocation write comes first, and a
    // status write now would only make that conditional write lose its race.
    if batch.status.is_none()
        && view.pooled
        && view.live_pods == 0
        && view.pool == PoolSituation::Fine
        && pool_can_serve(batch, ctx)
    {
        return Ok(());
    }
    let previous = batch.status.clone().unwrap_or_default();
    let status = status::batch_status(&view, &previous, &Time(Timestamp::now()));
    let uid = batch.uid().unwrap_or_default();
    let unchanged =
        status::equivalent(&status, &previous) || ctx.last_status.wrote_same(&uid, &status);
    if !unchanged {
        ctx.patch_status::<BatchSandbox>(
            &batch.namespace().unwrap_or_default(),
            &batch.name_any(),
            json!({ "status": &status }),
        )
        .await?;
        debug!(
            batch = %object_name(batch),
            replicas = status.replicas,
            allocated = status.allocated,
            ready = status.ready,
            conditions = ?status.conditions.iter().filter(|c| c.status == "True").map(|c| c.type_.as_str()).collect::<Vec<_>>(),
            first = batch.status.is_none(),
            "status written"
        );
        for problem in status::allocation_problems_begun(&previous, &status) {
            ctx.event(
                batch,
                EventType::Warning,
                &problem.reason,
                problem.message.clone(),
            )
            .await;
        }
        ctx.last_status.record(uid, status);
    }
    Ok(())
}

/// Whether the batch's pool has idle pods for all its shards right now: as its last allocation
/// round left them, or else as its status says.
fn pool_can_serve(batch: &BatchSandbox, ctx: &Context) -> bool {
    let ns = batch.namespace().unwrap_or_default();
    let Some(pool) = batch.pool_name() else {
        return false;
    };
    // Its grant is being written: the pool is serving it, and the idle pods the pool has left
    // no longer count the ones granted (the pool's round may come before this reconcile).
    if ctx
        .grants_in_flight
        .contains(&super::index::Key::new(&ns, &batch.name_any()))
    {
        return true;
    }
    if let Some(idle) = ctx.idle_left(&ns, pool) {
        let enough = idle >= batch.desired_replicas();
        if !enough {
            debug!(batch = %object_name(batch), idle, "its pool has too few idle pods left to serve it now");
        }
        return enough;
    }
    ctx.pools
        .get(&ObjectRef::<Pool>::new(pool).within(&ns))
        .and_then(|pool| pool.status.clone())
        .is_some_and(|status| status.available >= batch.spec.replicas)
}

pub(super) fn pool_situation(
    batch: &BatchSandbox,
    ctx: &Context,
    shards: &[ShardView],
) -> PoolSituation {
    let Some(pool_name) = batch.pool_name() else {
        return PoolSituation::Fine;
    };
    let ns = batch.namespace().unwrap_or_default();
    let pool = pool_name.to_string();
    match ctx
        .pools
        .get(&ObjectRef::<Pool>::new(pool_name).within(&ns))
    {
        None => PoolSituation::Missing { pool },
        Some(p) if p.metadata.deletion_timestamp.is_some() => PoolSituation::Terminating { pool },
        Some(p) => {
            let status = p.status.clone().unwrap_or_default();
            let short = shards.iter().any(|s| !s.has_pod);
            let pool_max = p.spec.capacity_spec.pool_max;
            let rejection = || {
                ctx.rejected_grants.rejection(
                    &super::index::Key::new(&ns, &batch.name_any()),
                    std::time::Instant::now(),
                )
            };
            if let Some(message) = short.then(rejection).flatten() {
                PoolSituation::AllocationRejected { pool, message }
            } else if short && status.headroom(pool_max).exhausted {
                PoolSituation::Exhausted { pool, pool_max }
            } else {
                PoolSituation::Fine
            }
        }
    }
}
