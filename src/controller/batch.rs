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
use tracing::info;

use super::pool::policy_selector;
use super::{Context, Error, object_name};
use crate::api::{BatchSandbox, BatchSandboxStatus, PodRecyclePolicy, Pool, names};
use crate::domain::allocation::AllocStatus;
use crate::domain::expiry::{BatchSnapshot, ExpireAction, ExpiryDecision, TaskPhase};
use crate::domain::status::{self, BatchView, PoolSituation, ShardView};
use crate::domain::{conditions, endpoints, pod_template, pods};
use crate::policy::ShardTaskInput;

const POD_WRITE_CONCURRENCY: usize = 32;

pub async fn reconcile(batch: Arc<BatchSandbox>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = ObjectRef::from_obj(batch.as_ref()).erase();
    let result = reconcile_batch(&batch, &ctx).await;
    if result.is_ok() {
        ctx.backoff.on_success(&key);
    }
    result
}

/// A batch's shards as observed: shard i's pod, if any.
struct Shards {
    pods: Vec<Option<Arc<Pod>>>,
    /// Live pods of the batch, including ones above `replicas` still going away.
    live: u32,
}

async fn reconcile_batch(batch: &BatchSandbox, ctx: &Context) -> Result<Action, Error> {
    if batch.metadata.deletion_timestamp.is_some() {
        return cleanup(batch, ctx).await;
    }

    let expiry = decide_expiry(batch, ctx).await?;
    let recheck = match expiry.decision {
        ExpiryDecision::Expire { action } => return expire(batch, ctx, action).await,
        ExpiryDecision::Keep { recheck_after_ms } => {
            recheck_after_ms.map(std::time::Duration::from_millis)
        }
    };

    let shards = match batch.pool_name() {
        Some(pool) => pooled_shards(batch, ctx, pool).await?,
        None => own_pods(batch, ctx).await?,
    };
    write_endpoints(batch, ctx, &shards).await?;
    let task_phases = task_phases(batch, ctx, &shards).await?;
    write_status(batch, ctx, &shards, &task_phases, expiry.degraded).await?;

    let resync = ctx.config.resync;
    Ok(Action::requeue(recheck.map_or(resync, |r| r.min(resync))))
}

async fn decide_expiry(
    batch: &BatchSandbox,
    ctx: &Context,
) -> Result<crate::policy::Outcome<ExpiryDecision>, Error> {
    let snapshot = BatchSnapshot {
        name: batch.name_any(),
        expire_time_unix_ms: batch
            .spec
            .expire_time
            .as_ref()
            .map(|t| t.0.as_millisecond()),
        now_unix_ms: Timestamp::now().as_millisecond(),
        pooled: batch.pool_name().is_some(),
        task_phases: vec![],
    };
    let selector = policy_selector(batch, "expiry");
    ctx.decide(move |p| p.expiry(selector.as_deref(), &snapshot))
        .await
}

/// Deletes an expired batch; its finalizer then releases the pods.
async fn expire(
    batch: &BatchSandbox,
    ctx: &Context,
    action: ExpireAction,
) -> Result<Action, Error> {
    let ns = batch.namespace().unwrap_or_default();
    if action == ExpireAction::ReturnToPool && batch.pool_name().is_some() {
        let patch =
            json!({"metadata": {"annotations": {names::ANNOTATION_RELEASE_POLICY: "Reuse"}}});
        ctx.merge_patch::<BatchSandbox>(&ns, &batch.name_any(), &patch)
            .await?;
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
    ctx.writes.object();
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
async fn own_pods(batch: &BatchSandbox, ctx: &Context) -> Result<Shards, Error> {
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
    for index in 0..replicas {
        match by_index.get(&index) {
            None => to_create.push(pod_template::batch_pod(
                &name,
                index,
                &template,
                batch.spec.shard_patches.get(index),
                owner.clone(),
            )?),
            // A finished pod can never serve again: replace it (it is recreated once gone).
            Some(pod) if pods::is_finished(pod) && !pods::is_terminating(pod) => {
                to_delete.push(pods::pod_name(pod).to_string())
            }
            Some(_) => {}
        }
    }
    let excess: Vec<String> = by_index
        .range(replicas..)
        .filter(|(_, p)| !pods::is_terminating(p))
        .map(|(_, p)| pods::pod_name(p).to_string())
        .collect();
    to_delete.extend(excess.iter().cloned());

    if !to_create.is_empty() {
        let created = to_create.len();
        let results: Vec<Result<Pod, kube::Error>> =
            stream::iter(to_create.into_iter().map(|pod| ctx.create_pod(&ns, pod)))
                .buffer_unordered(POD_WRITE_CONCURRENCY)
                .collect()
                .await;
        results.into_iter().collect::<Result<Vec<_>, _>>()?;
        ctx.event(
            batch,
            EventType::Normal,
            "PodsCreated",
            format!("created {created} sandbox pod(s)"),
        )
        .await;
    }
    delete_all(ctx, &ns, &to_delete).await?;
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
    let live = by_index.values().filter(|p| pods::is_live(p)).count() as u32;
    let pods = (0..replicas)
        .map(|i| by_index.get(&i).filter(|p| pods::is_live(p)).cloned())
        .collect();
    Ok(Shards { pods, live })
}

fn owned_pods_by_index(batch: &BatchSandbox, ctx: &Context) -> BTreeMap<usize, Arc<Pod>> {
    let ns = batch.namespace();
    let name = batch.name_any();
    let uid = batch.uid().unwrap_or_default();
    ctx.pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace() == ns
                && p.labels().get(names::LABEL_BATCH_NAME) == Some(&name)
                && p.owner_references().iter().any(|o| o.uid == uid)
        })
        .filter_map(|p| Some((p.labels().get(names::LABEL_POD_INDEX)?.parse().ok()?, p)))
        .collect()
}

/// Pooled: the ledger's pods; shards above `replicas` are released and dropped from the ledger.
async fn pooled_shards(batch: &BatchSandbox, ctx: &Context, pool: &str) -> Result<Shards, Error> {
    let ns = batch.namespace().unwrap_or_default();
    let ledger = ledger_of(batch)?;
    let replicas = batch.desired_replicas();
    if ledger.pods.len() > replicas {
        let released = ledger.pods[replicas..].to_vec();
        release(batch, ctx, &released).await?;
        let kept = AllocStatus {
            pods: ledger.pods[..replicas].to_vec(),
            pool_ref: Some(pool.to_string()),
        };
        let ips: Vec<Option<String>> = kept
            .pods
            .iter()
            .map(|p| pod_named(ctx, &ns, p).and_then(|p| pods::pod_ip(&p).map(str::to_string)))
            .collect();
        let ips: Vec<Option<&str>> = ips.iter().map(Option::as_deref).collect();
        let patch = json!({"metadata": {
            "resourceVersion": batch.resource_version(),
            "annotations": {
                names::ANNOTATION_ALLOC_STATUS: kept.to_annotation(),
                names::ANNOTATION_ENDPOINTS: endpoints::render(&ips, ctx.config.endpoints_format),
            }
        }});
        ctx.merge_patch::<BatchSandbox>(&ns, &batch.name_any(), &patch)
            .await?;
        ctx.event(
            batch,
            EventType::Normal,
            "ScaledDown",
            format!("released {} pod(s) to pool {pool}", released.len()),
        )
        .await;
    }
    let shown = ledger.pods.len().min(replicas);
    let mut shard_pods: Vec<Option<Arc<Pod>>> = ledger.pods[..shown]
        .iter()
        .map(|p| pod_named(ctx, &ns, p).filter(|p| pods::is_live(p)))
        .collect();
    let live = shard_pods.iter().flatten().count() as u32;
    shard_pods.resize(replicas, None);
    Ok(Shards {
        pods: shard_pods,
        live,
    })
}

fn ledger_of(batch: &BatchSandbox) -> Result<AllocStatus, Error> {
    AllocStatus::parse(
        batch
            .annotations()
            .get(names::ANNOTATION_ALLOC_STATUS)
            .map(String::as_str),
    )
    .map_err(|source| Error::CorruptAllocStatus {
        object: object_name(batch),
        source,
    })
}

fn pod_named(ctx: &Context, ns: &str, name: &str) -> Option<Arc<Pod>> {
    ctx.pods.get(&ObjectRef::new(name).within(ns))
}

/// Gives pooled pods back: deleted under the `Delete` recycle policy (the pool warms fresh ones),
/// left in place under `Reuse` if still Running and Ready (they turn idle once the ledger drops
/// them), deleted otherwise.
async fn release(batch: &BatchSandbox, ctx: &Context, released: &[String]) -> Result<(), Error> {
    let ns = batch.namespace().unwrap_or_default();
    let reuse = recycle_policy(batch, ctx) == PodRecyclePolicy::Reuse;
    let doomed: Vec<String> = released
        .iter()
        .filter(|name| {
            !reuse
                || !pod_named(ctx, &ns, name)
                    .is_some_and(|p| pods::is_live(&p) && pods::is_running_and_ready(&p))
        })
        .cloned()
        .collect();
    delete_all(ctx, &ns, &doomed).await
}

fn recycle_policy(batch: &BatchSandbox, ctx: &Context) -> PodRecyclePolicy {
    if batch
        .annotations()
        .get(names::ANNOTATION_RELEASE_POLICY)
        .map(String::as_str)
        == Some("Reuse")
    {
        return PodRecyclePolicy::Reuse;
    }
    let ns = batch.namespace().unwrap_or_default();
    batch
        .pool_name()
        .and_then(|pool| ctx.pools.get(&ObjectRef::<Pool>::new(pool).within(&ns)))
        .map(|pool| pool.spec.recycle_policy())
        .unwrap_or_default()
}

async fn delete_all(ctx: &Context, ns: &str, names: &[String]) -> Result<(), Error> {
    let results: Vec<Result<(), kube::Error>> =
        stream::iter(names.iter().map(|name| ctx.delete_pod(ns, name)))
            .buffer_unordered(POD_WRITE_CONCURRENCY)
            .collect()
            .await;
    results.into_iter().collect::<Result<(), _>>()?;
    Ok(())
}

/// Deletion: stop tasks, release or delete pods, then let the object go.
async fn cleanup(batch: &BatchSandbox, ctx: &Context) -> Result<Action, Error> {
    if !batch
        .finalizers()
        .iter()
        .any(|f| f == names::FINALIZER_BATCH)
    {
        return Ok(Action::await_change());
    }
    let ns = batch.namespace().unwrap_or_default();
    let pods: Vec<String> = match batch.pool_name() {
        Some(_) => ledger_of(batch)?.pods,
        None => owned_pods_by_index(batch, ctx)
            .values()
            .map(|p| pods::pod_name(p).to_string())
            .collect(),
    };
    super::tasks::stop_all(batch, ctx, &pods).await?;
    match batch.pool_name() {
        Some(_) => release(batch, ctx, &pods).await?,
        None => delete_all(ctx, &ns, &pods).await?,
    }
    ctx.remove_finalizer(batch, names::FINALIZER_BATCH).await?;
    info!(batch = %object_name(batch), pods = pods.len(), "cleaned up");
    Ok(Action::await_change())
}

async fn write_endpoints(
    batch: &BatchSandbox,
    ctx: &Context,
    shards: &Shards,
) -> Result<(), Error> {
    let ips: Vec<Option<&str>> = shards
        .pods
        .iter()
        .map(|p| p.as_deref().and_then(pods::pod_ip))
        .collect();
    let rendered = endpoints::render(&ips, ctx.config.endpoints_format);
    if batch.annotations().get(names::ANNOTATION_ENDPOINTS) != Some(&rendered) {
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
) -> Result<Vec<TaskPhase>, Error> {
    let input = ShardTaskInput {
        batch_name: batch.name_any(),
        replicas: shards.pods.len() as u32,
        task_template: batch.spec.task_template.clone(),
        shard_patches: batch.spec.shard_task_patches.clone(),
    };
    let selector = policy_selector(batch, "shard-tasks");
    let outcome = ctx
        .decide(move |p| p.shard_tasks(selector.as_deref(), &input))
        .await?;
    super::tasks::sync(batch, ctx, shards_pods(shards), outcome).await
}

fn shards_pods(shards: &Shards) -> &[Option<Arc<Pod>>] {
    &shards.pods
}

async fn write_status(
    batch: &BatchSandbox,
    ctx: &Context,
    shards: &Shards,
    task_phases: &[TaskPhase],
    expiry_degraded: Option<String>,
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
        .map(|(pod, task)| ShardView {
            has_pod: pod.is_some(),
            ready: pod.as_deref().is_some_and(pods::is_running_and_ready),
            task,
        })
        .collect();
    let view = BatchView {
        generation: batch.metadata.generation.unwrap_or_default(),
        pooled: batch.pool_name().is_some(),
        live_pods: shards.live,
        pool: pool_situation(batch, ctx, &shard_views),
        policy_degraded: expiry_degraded,
        shards: shard_views,
    };
    let previous = batch.status.clone().unwrap_or_default();
    let status = status::batch_status(&view, &previous, &Time(Timestamp::now()));
    let unchanged = BatchSandboxStatus {
        conditions: vec![],
        ..status.clone()
    } == BatchSandboxStatus {
        conditions: vec![],
        ..previous.clone()
    } && conditions::same(&status.conditions, &previous.conditions);
    if !unchanged {
        ctx.patch_status::<BatchSandbox>(
            &batch.namespace().unwrap_or_default(),
            &batch.name_any(),
            json!({ "status": status }),
        )
        .await?;
    }
    Ok(())
}

fn pool_situation(batch: &BatchSandbox, ctx: &Context, shards: &[ShardView]) -> PoolSituation {
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
            if short && status.total >= pool_max && status.available == 0 {
                PoolSituation::Exhausted { pool, pool_max }
            } else {
                PoolSituation::Fine
            }
        }
    }
}
