//! The allocation record's invariants as the fault suite checks them from outside the controller,
//! on what the API server shows. The invariants themselves are the controller's own
//! ([`sandbox_domain::invariants`]: one pod in at most one ledger, once per ledger,
//! only pods of the batch's pool, readable ledgers, settled status counts); this module adds what
//! only an outside observer needs: [`leaks`] (pods nothing live owns) and [`converged`].

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use sandbox_domain::allocation::AllocStatus;
use sandbox_domain::api::{BatchSandbox, Pool, names};
use sandbox_domain::invariants::{self, Counts};

pub use sandbox_domain::invariants::Violation;

/// A pod nothing live accounts for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Leak {
    /// A pool pod whose owning Pool is gone (or that has no owner at all).
    PoolPodWithoutPool { pod: String, pool: String },
    /// A pod of a BatchSandbox that is gone.
    BatchPodWithoutBatch { pod: String, batch: String },
    /// A pod this controller manages that has no owner reference at all.
    ManagedPodWithoutOwner { pod: String },
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PoolPodWithoutPool { pod, pool } => {
                write!(f, "pod {pod} of pool {pool} is owned by no live Pool")
            }
            Self::BatchPodWithoutBatch { pod, batch } => {
                write!(f, "pod {pod} of batch {batch} outlives its BatchSandbox")
            }
            Self::ManagedPodWithoutOwner { pod } => write!(f, "pod {pod} has no owner"),
        }
    }
}

/// The invariants that hold at every moment, whatever is in flight (`pods` and `pools` may lag
/// `batches`).
pub fn check(pods: &[Pod], batches: &[BatchSandbox], pools: &[Pool]) -> Vec<Violation> {
    invariants::check(pods, batches, pools, Counts::Skip)
}

/// [`check`], plus what holds once nothing is in flight: every pooled batch's status counts what
/// it asked for and the pods its ledger holds. The pools' counts are judged separately (after
/// release), since they trail the batches by a reconcile.
pub fn check_settled(pods: &[Pod], batches: &[BatchSandbox], pools: &[Pool]) -> Vec<Violation> {
    let mut violations = check(pods, batches, pools);
    violations.extend(invariants::batch_status_mismatches(batches));
    violations
}

/// Pods nothing accounts for: no existing Pool or BatchSandbox owns them. Terminating pods are on
/// their way out and never count.
pub fn leaks(pods: &[Pod], batches: &[BatchSandbox], pools: &[Pool]) -> Vec<Leak> {
    // A deleting Pool still owns its pods: it drains them before it goes.
    let pool_uids: BTreeSet<String> = pools.iter().filter_map(|p| p.uid()).collect();
    let batch_uids: BTreeSet<String> = batches.iter().filter_map(|b| b.uid()).collect();
    let mut leaks = Vec::new();
    for pod in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let name = pod.name_any();
        let owners: Vec<&str> = pod
            .owner_references()
            .iter()
            .map(|o| o.uid.as_str())
            .collect();
        if let Some(pool) = pod.labels().get(names::LABEL_POOL_NAME) {
            if !owners.iter().any(|uid| pool_uids.contains(*uid)) {
                leaks.push(Leak::PoolPodWithoutPool {
                    pod: name,
                    pool: pool.clone(),
                });
            }
        } else if let Some(batch) = pod.labels().get(names::LABEL_BATCH_NAME) {
            if !owners.iter().any(|uid| batch_uids.contains(*uid)) {
                leaks.push(Leak::BatchPodWithoutBatch {
                    pod: name,
                    batch: batch.clone(),
                });
            }
        } else if pod
            .labels()
            .get(names::LABEL_MANAGED_BY)
            .map(String::as_str)
            == Some(names::MANAGED_BY)
            && owners.is_empty()
        {
            leaks.push(Leak::ManagedPodWithoutOwner { pod: name });
        }
    }
    leaks.sort();
    leaks
}

/// Whether a batch has everything it asked for: all shards allocated and ready, status current.
pub fn converged(batch: &BatchSandbox) -> bool {
    let want = batch.spec.replicas;
    let Some(status) = &batch.status else {
        return want == 0;
    };
    let generation = batch.metadata.generation.unwrap_or_default();
    let ledger_ok = match batch.pool_name() {
        None => true,
        Some(_) => AllocStatus::of(batch).is_ok_and(|l| {
            l.pods.iter().filter(|p| !p.is_empty()).count() == batch.desired_replicas()
        }),
    };
    ledger_ok
        && status.observed_generation >= generation
        && status.replicas == want
        && status.ready == want
        && (batch.pool_name().is_none() || status.allocated == want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox_domain::api::BatchSandboxStatus;
    use serde_json::json;

    fn pool_pod(name: &str, pool: &str, owner_uid: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {names::LABEL_POOL_NAME: pool, names::LABEL_MANAGED_BY: names::MANAGED_BY},
                         "ownerReferences": [{"apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool", "name": pool, "uid": owner_uid}]}
        }))
        .unwrap()
    }

    fn batch(name: &str, pool: Option<&str>, replicas: i32, ledger: &[&str]) -> BatchSandbox {
        let mut spec = json!({"replicas": replicas});
        let mut annotations = json!({});
        if let Some(pool) = pool {
            spec["poolRef"] = json!(pool);
            annotations[names::ANNOTATION_ALLOC_STATUS] =
                json!(json!({"pods": ledger, "poolRef": pool}).to_string());
        } else {
            spec["template"] = json!({"spec": {"containers": [{"name": "c", "image": "i"}]}});
        }
        serde_json::from_value(json!({
            "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
            "metadata": {"name": name, "uid": format!("uid-{name}"), "annotations": annotations, "generation": 1},
            "spec": spec
        }))
        .unwrap()
    }

    fn pool(name: &str, uid: &str) -> Pool {
        serde_json::from_value(json!({
            "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool",
            "metadata": {"name": name, "uid": uid},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
                     "capacitySpec": {"bufferMin": 1, "bufferMax": 2, "poolMin": 1, "poolMax": 3}}
        }))
        .unwrap()
    }

    fn with_status(mut b: BatchSandbox, replicas: i32, allocated: i32, ready: i32) -> BatchSandbox {
        b.status = Some(BatchSandboxStatus {
            observed_generation: 1,
            replicas,
            allocated,
            ready,
            ..Default::default()
        });
        b
    }

    #[test]
    fn the_controllers_invariants_are_checked_as_the_api_server_shows_them() {
        let pods = [pool_pod("p0", "a", "u"), pool_pod("p1", "other", "v")];
        let batches = [
            batch("b1", Some("a"), 1, &["p0"]),
            batch("b0", Some("a"), 2, &["p1", "p0"]),
        ];
        let kinds: Vec<&str> = check(&pods, &batches, &[pool("a", "u")])
            .iter()
            .map(Violation::kind)
            .collect();
        assert_eq!(kinds, ["foreign-pod-in-ledger", "pod-in-several-ledgers"]);
    }

    #[test]
    fn settled_status_must_count_the_ledger() {
        let good = with_status(batch("b0", Some("a"), 2, &["p0", "p1"]), 2, 2, 2);
        assert_eq!(check_settled(&[], std::slice::from_ref(&good), &[]), []);
        let stale = with_status(batch("b1", Some("a"), 2, &["p2", "p3"]), 2, 1, 1);
        assert_eq!(
            check_settled(&[], &[good, stale], &[]),
            [Violation::StatusMismatch {
                batch: "/b1".into(),
                field: "allocated",
                reported: 1,
                expected: 2
            }]
        );
    }

    #[test]
    fn convergence_needs_a_full_ledger_and_a_ready_status() {
        assert!(converged(&with_status(
            batch("b", Some("a"), 2, &["p0", "p1"]),
            2,
            2,
            2
        )));
        assert!(!converged(&with_status(
            batch("b", Some("a"), 2, &["p0"]),
            2,
            2,
            2
        )));
        assert!(!converged(&with_status(
            batch("b", Some("a"), 2, &["p0", "p1"]),
            2,
            2,
            1
        )));
        assert!(!converged(&batch("b", Some("a"), 1, &[])));
        assert!(converged(&with_status(batch("n", None, 2, &[]), 2, 0, 2)));
    }

    #[test]
    fn leaks_are_pods_without_a_live_owner() {
        let live_pool = pool("a", "ua");
        let mut deleting_pool = pool("d", "ud");
        deleting_pool.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let owned = pool_pod("p0", "a", "ua");
        let orphan = pool_pod("p1", "gone", "ugone");
        let draining = pool_pod("p2", "d", "ud");
        let batch_pod: Pod = serde_json::from_value(json!({"metadata": {"name": "n0",
            "labels": {names::LABEL_BATCH_NAME: "nb"},
            "ownerReferences": [{"apiVersion": "v", "kind": "BatchSandbox", "name": "nb", "uid": "uid-nb"}]}}))
        .unwrap();
        let bare: Pod = serde_json::from_value(json!({"metadata": {"name": "x",
            "labels": {names::LABEL_MANAGED_BY: names::MANAGED_BY}}}))
        .unwrap();
        let pods = [owned, orphan, draining, batch_pod.clone(), bare];
        assert_eq!(
            leaks(
                &pods,
                &[batch("nb", None, 1, &[])],
                &[live_pool.clone(), deleting_pool.clone()]
            ),
            [
                Leak::PoolPodWithoutPool {
                    pod: "p1".into(),
                    pool: "gone".into()
                },
                Leak::ManagedPodWithoutOwner { pod: "x".into() },
            ]
        );
        // The batch gone, its pod leaks.
        assert!(
            leaks(&[batch_pod], &[], &[live_pool]).contains(&Leak::BatchPodWithoutBatch {
                pod: "n0".into(),
                batch: "nb".into()
            })
        );
    }
}
