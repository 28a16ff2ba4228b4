//! Pool selection for BatchSandboxes with `poolRef: "*"`: the pool-selection decision picks a Pool
//! of the batch's namespace whose pods fit its template, and its name is written into
//! `spec.poolRef` (conditional on the batch's resourceVersion). From then on the batch is an
//! ordinary pooled batch. While no Pool fits, the batch carries a `PoolSelectionPending` condition
//! saying why; every Pool change wakes it (see the router), so a Pool that starts to fit is taken
//! without any edit of the batch.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use serde_json::json;
use tracing::info;

use super::{Context, Error, object_name, policy_selector};
use sandbox_decisions::expiry::ExpiryDecision;
use sandbox_decisions::selection::{
    BatchRequirements, CandidatePool, ContainerRequirements, Label, PodRequirements,
    ResourceRequest, SelectionInput,
};
use sandbox_decisions::sizing::Bounds;
use sandbox_domain::api::{BatchSandbox, Pool};
use sandbox_domain::status;
use sandbox_policy::Decision;

/// Event reasons.
const EVENT_POOL_SELECTED: &str = "PoolSelected";
const EVENT_NO_ELIGIBLE_POOL: &str = status::REASON_NO_ELIGIBLE_POOL;

/// Chooses a Pool for a batch with `poolRef: "*"`, or reports why none fits.
pub(super) async fn reconcile(batch: &BatchSandbox, ctx: &Context) -> Result<Action, Error> {
    // An expired batch goes whether or not it ever got a Pool.
    let expiry = super::batch::decide_expiry(batch, ctx, &[]).await?;
    let recheck = match expiry.decision {
        ExpiryDecision::Expire { action } => return super::batch::expire(batch, ctx, action).await,
        ExpiryDecision::Keep { recheck_after_ms } => recheck_after_ms.map(Duration::from_millis),
    };
    let ns = batch.namespace().unwrap_or_default();
    let pools: Vec<std::sync::Arc<Pool>> = ctx
        .pools
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let input = selection_input(batch, pools.iter().map(AsRef::as_ref));
    let selector = policy_selector(batch, Decision::PoolSelection);
    let outcome = ctx
        .decide(selector, move |p, s| p.pool_selection(s, &input))
        .await?;
    let degraded = outcome.degraded.or(expiry.degraded);
    let decision = outcome.decision;
    let Some(pool) = decision.pool else {
        report_no_fit(batch, ctx, &decision.reason, degraded.as_deref()).await?;
        // Pool changes wake the batch; the resync is only the safety net.
        let next = recheck.map_or(ctx.config.resync, |r| r.min(ctx.config.resync));
        return Ok(Action::requeue(next));
    };
    let patch = json!({
        "metadata": {"resourceVersion": batch.resource_version()},
        "spec": {"poolRef": pool},
    });
    match ctx
        .merge_patch::<BatchSandbox>(&ns, &batch.name_any(), &patch)
        .await
    {
        Ok(_) => {}
        // Changed since it was read: decide again on the fresh object.
        Err(kube::Error::Api(status)) if status.code == 409 => return Err(Error::Conflict(1)),
        Err(error) => return Err(error.into()),
    }
    info!(batch = %object_name(batch), %pool, reason = %decision.reason, "pool selected");
    if let Some(reason) = degraded {
        ctx.event(batch, EventType::Warning, "PolicyDegraded", reason)
            .await;
    }
    ctx.event(
        batch,
        EventType::Normal,
        EVENT_POOL_SELECTED,
        format!("chose Pool {pool}: {}", decision.reason),
    )
    .await;
    // The write wakes the batch again, now an ordinary pooled batch.
    Ok(Action::await_change())
}

/// Writes the `PoolSelectionPending` status, and an event when the reason is new.
async fn report_no_fit(
    batch: &BatchSandbox,
    ctx: &Context,
    why: &str,
    degraded: Option<&str>,
) -> Result<(), Error> {
    let previous = batch.status.clone().unwrap_or_default();
    let status = status::selection_pending_status(
        batch.metadata.generation.unwrap_or_default(),
        batch.desired_replicas(),
        why,
        degraded,
        &previous,
        &Time(Timestamp::now()),
    );
    let uid = batch.uid().unwrap_or_default();
    if status::equivalent(&status, &previous) || ctx.last_status.wrote_same(&uid, &status) {
        return Ok(());
    }
    let reported_before = previous.conditions.iter().any(|c| {
        c.type_ == status::CONDITION_POOL_SELECTION_PENDING
            && c.status == "True"
            && c.message == why
    });
    ctx.patch_status::<BatchSandbox>(
        &batch.namespace().unwrap_or_default(),
        &batch.name_any(),
        json!({ "status": &status }),
    )
    .await?;
    ctx.last_status.record(uid, status);
    if !reported_before {
        ctx.event(
            batch,
            EventType::Warning,
            EVENT_NO_ELIGIBLE_POOL,
            why.to_string(),
        )
        .await;
    }
    Ok(())
}

/// What the decision sees: the batch's template requirements and every candidate Pool's, sorted
/// by name.
pub(super) fn selection_input<'a>(
    batch: &BatchSandbox,
    pools: impl IntoIterator<Item = &'a Pool>,
) -> SelectionInput {
    let mut pools: Vec<CandidatePool> = pools.into_iter().map(candidate).collect();
    pools.sort_by(|a, b| a.pool_name.cmp(&b.pool_name));
    SelectionInput {
        batch: BatchRequirements {
            batch_name: batch.name_any(),
            replicas: u32::try_from(batch.desired_replicas()).unwrap_or(u32::MAX),
            template: batch
                .spec
                .template
                .as_ref()
                .map(requirements)
                .unwrap_or_default(),
        },
        pools,
    }
}

fn candidate(pool: &Pool) -> CandidatePool {
    let caps = pool.spec.capacity_spec;
    let status = pool.status.clone().unwrap_or_default();
    let count = |n: i32| u32::try_from(n).unwrap_or(0);
    CandidatePool {
        pool_name: pool.name_any(),
        labels: labels(pool.labels()),
        template: requirements(&pool.spec.template),
        bounds: Bounds {
            buffer_min: count(caps.buffer_min),
            buffer_max: count(caps.buffer_max),
            pool_min: count(caps.pool_min),
            pool_max: count(caps.pool_max),
        },
        total: count(status.total),
        allocated: count(status.allocated),
        idle: count(status.available),
    }
}

fn labels(map: &BTreeMap<String, String>) -> Vec<Label> {
    map.iter().map(|(k, v)| Label::new(k, v)).collect()
}

/// A pod template's containers (image and requests) and node selector.
fn requirements(template: &PodTemplateSpec) -> PodRequirements {
    let Some(spec) = template.spec.as_ref() else {
        return PodRequirements::default();
    };
    PodRequirements {
        containers: spec
            .containers
            .iter()
            .map(|c| ContainerRequirements {
                image: c.image.clone().unwrap_or_default(),
                requests: c
                    .resources
                    .as_ref()
                    .and_then(|r| r.requests.as_ref())
                    .map(|requests| {
                        requests
                            .iter()
                            .map(|(name, quantity)| ResourceRequest {
                                name: name.clone(),
                                quantity: quantity.0.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect(),
        node_selector: spec.node_selector.as_ref().map(labels).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox_decisions::selection::least_allocated_fit;

    fn batch(value: serde_json::Value) -> BatchSandbox {
        serde_json::from_value(value).expect("a BatchSandbox")
    }

    fn pool(value: serde_json::Value) -> Pool {
        serde_json::from_value(value).expect("a Pool")
    }

    #[test]
    fn templates_become_requirements_and_the_default_reads_them_right() {
        let b = batch(json!({
            "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
            "metadata": {"name": "b", "namespace": "ns"},
            "spec": {"replicas": 2, "poolRef": "*", "template": {"spec": {
                "nodeSelector": {"zone": "a"},
                "containers": [{"name": "main", "image": "python:3.12",
                    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}]}}}
        }));
        let p = |name: &str, cpu: &str, allocated: i32| {
            pool(json!({
                "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool",
                "metadata": {"name": name, "namespace": "ns", "labels": {"zone": "a"}},
                "spec": {
                    "template": {"spec": {"containers": [{"name": "sandbox", "image": "python:3.12",
                        "resources": {"requests": {"cpu": cpu, "memory": "2Gi"}}}]}},
                    "capacitySpec": {"bufferMin": 1, "bufferMax": 5, "poolMin": 0, "poolMax": 10}
                },
                "status": {"total": 4, "allocated": allocated, "available": 4 - allocated}
            }))
        };
        let pools = [p("small", "250m", 0), p("busy", "1", 3), p("calm", "1", 1)];
        let input = selection_input(&b, &pools);
        assert_eq!(input.batch.replicas, 2);
        assert_eq!(
            input.batch.template.node_selector,
            vec![Label::new("zone", "a")]
        );
        assert_eq!(
            input
                .pools
                .iter()
                .map(|p| p.pool_name.as_str())
                .collect::<Vec<_>>(),
            ["busy", "calm", "small"]
        );
        assert_eq!(input.pools[1].bounds.pool_max, 10);
        assert_eq!(
            (
                input.pools[1].total,
                input.pools[1].allocated,
                input.pools[1].idle
            ),
            (4, 1, 3)
        );
        let decision = least_allocated_fit(&input);
        assert_eq!(
            decision.pool.as_deref(),
            Some("calm"),
            "{}",
            decision.reason
        );
        assert!(
            decision.reason.contains("small: requests cpu 250m < 500m"),
            "{}",
            decision.reason
        );
    }
}
