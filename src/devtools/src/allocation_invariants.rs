//! The allocation record's invariants, checked from outside the controller on what the API server
//! shows: pure functions of Pods, BatchSandboxes and Pools, returning typed findings.
//!
//! - No pod is named by the ledgers (`alloc-status`) of two batches, and no ledger names a pod
//!   twice: a pod serves at most one shard.
//! - A ledger only names pods of the batch's own pool.
//! - Once settled, a batch's status counts match its ledger.
//! - Nothing leaks: every pool pod is owned by its live Pool, every non-pooled pod by its live
//!   BatchSandbox.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use sandbox_controller::api::{BatchSandbox, Pool, names};
use sandbox_controller::domain::allocation::AllocStatus;

/// A broken invariant of the allocation record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Violation {
    /// One pod in the ledgers of two or more batches at once.
    PodHeldByTwoBatches { pod: String, batches: Vec<String> },
    /// One ledger naming the same pod for two shards.
    PodNamedTwiceInLedger { batch: String, pod: String },
    /// A ledger naming a pod that belongs to another pool (or to none).
    LedgerNamesForeignPod {
        batch: String,
        pod: String,
        batch_pool: String,
        pod_pool: Option<String>,
    },
    /// A ledger that cannot be read: its pods are unaccounted for.
    UnreadableLedger { batch: String, error: String },
    /// A settled batch whose status disagrees with its ledger.
    StatusMismatch {
        batch: String,
        field: &'static str,
        status: i32,
        expected: i32,
    },
}

impl Violation {
    /// A short name of the kind, for counting.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PodHeldByTwoBatches { .. } => "pod-held-by-two-batches",
            Self::PodNamedTwiceInLedger { .. } => "pod-named-twice-in-ledger",
            Self::LedgerNamesForeignPod { .. } => "ledger-names-foreign-pod",
            Self::UnreadableLedger { .. } => "unreadable-ledger",
            Self::StatusMismatch { .. } => "status-mismatch",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PodHeldByTwoBatches { pod, batches } => {
                write!(f, "pod {pod} is held by batches {}", batches.join(", "))
            }
            Self::PodNamedTwiceInLedger { batch, pod } => {
                write!(f, "batch {batch} names pod {pod} for two shards")
            }
            Self::LedgerNamesForeignPod {
                batch,
                pod,
                batch_pool,
                pod_pool,
            } => write!(
                f,
                "batch {batch} of pool {batch_pool} holds pod {pod} of pool {}",
                pod_pool.as_deref().unwrap_or("<none>")
            ),
            Self::UnreadableLedger { batch, error } => {
                write!(f, "batch {batch} has an unreadable ledger: {error}")
            }
            Self::StatusMismatch {
                batch,
                field,
                status,
                expected,
            } => write!(
                f,
                "batch {batch}: status.{field} is {status}, the ledger says {expected}"
            ),
        }
    }
}

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

/// The invariants that hold at every moment, whatever is in flight. `pods` and `pools` may lag
/// `batches`: no finding here depends on which pods exist right now, only on which pool a named
/// pod belongs to, and that never changes.
pub fn check(pods: &[Pod], batches: &[BatchSandbox], _pools: &[Pool]) -> Vec<Violation> {
    let pool_of: HashMap<String, Option<String>> = pods
        .iter()
        .map(|p| {
            (
                p.name_any(),
                p.labels().get(names::LABEL_POOL_NAME).cloned(),
            )
        })
        .collect();
    let mut violations = Vec::new();
    let mut holders: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let ledgers: Vec<(&BatchSandbox, AllocStatus)> = batches
        .iter()
        .filter_map(|b| match AllocStatus::of(b) {
            Ok(ledger) => Some((b, ledger)),
            Err(error) => {
                violations.push(Violation::UnreadableLedger {
                    batch: b.name_any(),
                    error: error.to_string(),
                });
                None
            }
        })
        .collect();
    for (batch, ledger) in &ledgers {
        let name = batch.name_any();
        let mut seen = BTreeSet::new();
        for pod in ledger.pods.iter().filter(|p| !p.is_empty()) {
            if !seen.insert(pod.as_str()) {
                violations.push(Violation::PodNamedTwiceInLedger {
                    batch: name.clone(),
                    pod: pod.clone(),
                });
                continue;
            }
            holders.entry(pod).or_default().push(name.clone());
            if let (Some(batch_pool), Some(pod_pool)) = (batch.pool_name(), pool_of.get(pod))
                && pod_pool.as_deref() != Some(batch_pool)
            {
                violations.push(Violation::LedgerNamesForeignPod {
                    batch: name.clone(),
                    pod: pod.clone(),
                    batch_pool: batch_pool.to_string(),
                    pod_pool: pod_pool.clone(),
                });
            }
        }
    }
    for (pod, mut batches) in holders {
        if batches.len() > 1 {
            batches.sort();
            violations.push(Violation::PodHeldByTwoBatches {
                pod: pod.to_string(),
                batches,
            });
        }
    }
    violations.sort();
    violations
}

/// [`check`], plus what holds once nothing is in flight: every pooled batch's status counts the
/// pods its ledger holds.
pub fn check_settled(pods: &[Pod], batches: &[BatchSandbox], pools: &[Pool]) -> Vec<Violation> {
    let mut violations = check(pods, batches, pools);
    for batch in batches.iter().filter(|b| b.pool_name().is_some()) {
        let Ok(ledger) = AllocStatus::of(batch) else {
            continue;
        };
        let held = ledger
            .pods
            .iter()
            .take(batch.desired_replicas())
            .filter(|p| !p.is_empty())
            .count() as i32;
        let status = batch.status.clone().unwrap_or_default();
        for (field, value, expected) in [
            ("replicas", status.replicas, batch.spec.replicas),
            ("allocated", status.allocated, held),
        ] {
            if value != expected {
                violations.push(Violation::StatusMismatch {
                    batch: batch.name_any(),
                    field,
                    status: value,
                    expected,
                });
            }
        }
    }
    violations.sort();
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
    use sandbox_controller::api::BatchSandboxStatus;
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
    fn disjoint_ledgers_are_clean() {
        let pods = [pool_pod("p0", "a", "u"), pool_pod("p1", "a", "u")];
        let batches = [
            batch("b0", Some("a"), 1, &["p0"]),
            batch("b1", Some("a"), 1, &["p1"]),
        ];
        assert_eq!(check(&pods, &batches, &[pool("a", "u")]), []);
    }

    #[test]
    fn a_pod_in_two_ledgers_is_a_violation() {
        let pods = [pool_pod("p0", "a", "u")];
        let batches = [
            batch("b1", Some("a"), 1, &["p0"]),
            batch("b0", Some("a"), 2, &["x", "p0"]),
        ];
        assert_eq!(
            check(&pods, &batches, &[]),
            [Violation::PodHeldByTwoBatches {
                pod: "p0".into(),
                batches: vec!["b0".into(), "b1".into()]
            }]
        );
    }

    #[test]
    fn a_pod_named_twice_in_one_ledger_is_a_violation_and_released_shards_are_not() {
        let batches = [
            batch("b0", Some("a"), 3, &["p0", "p1", "p0"]),
            batch("b1", Some("a"), 3, &["", "p2", ""]),
        ];
        assert_eq!(
            check(&[], &batches, &[]),
            [Violation::PodNamedTwiceInLedger {
                batch: "b0".into(),
                pod: "p0".into()
            }]
        );
    }

    #[test]
    fn a_pod_of_another_pool_is_a_violation() {
        let pods = [pool_pod("p0", "other", "u")];
        let batches = [batch("b0", Some("a"), 1, &["p0"])];
        assert_eq!(
            check(&pods, &batches, &[]),
            [Violation::LedgerNamesForeignPod {
                batch: "b0".into(),
                pod: "p0".into(),
                batch_pool: "a".into(),
                pod_pool: Some("other".into())
            }]
        );
    }

    #[test]
    fn an_unreadable_ledger_is_a_violation() {
        let mut b = batch("b0", Some("a"), 1, &[]);
        b.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(names::ANNOTATION_ALLOC_STATUS.into(), "{not json".into());
        assert_eq!(check(&[], &[b], &[])[0].kind(), "unreadable-ledger");
    }

    #[test]
    fn settled_status_must_count_the_ledger() {
        let good = with_status(batch("b0", Some("a"), 2, &["p0", "p1"]), 2, 2, 2);
        assert_eq!(check_settled(&[], std::slice::from_ref(&good), &[]), []);
        let stale = with_status(batch("b1", Some("a"), 2, &["p2", "p3"]), 2, 1, 1);
        assert_eq!(
            check_settled(&[], &[good, stale], &[]),
            [Violation::StatusMismatch {
                batch: "b1".into(),
                field: "allocated",
                status: 1,
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
