//! The allocation invariants, checked over a snapshot of the cluster.
//!
//! [`check`] takes every pod, BatchSandbox and Pool of interest (typically one namespace, listed
//! from the API server or taken from the controller's caches) and returns every way the snapshot
//! breaks the allocation contract. It is pure, so unit tests, end-to-end tests and fault-injection
//! suites all judge a state the same way: an empty result means the ledgers are sound.
//!
//! The invariants:
//! - a ledger (`sandbox.opensandbox.io/alloc-status`) is readable JSON;
//! - a ledger names no pod twice;
//! - every pod a ledger names (non-empty entry) that exists is a pod of the batch's pool: labelled
//!   with that pool's name and owned by no other Pool object (a pod on its way out, terminating
//!   or finished, is still its pool's);
//! - no pod is named by the ledgers of two batches;
//! - a pool's reported `status.allocated` and `status.total` match its pods (only checked when
//!   `counts` is [`Counts::Check`]: the status trails the pods by one reconcile, so callers compare
//!   counts only once the system has settled);
//! - once settled, a pooled batch's `status.replicas` and `status.allocated` match its spec and
//!   its ledger ([`batch_status_mismatches`]).
//!
//! A batch being deleted still counts as a holder: its pods stay its own until its finalizer has
//! released them. No finding depends on which pods exist right now, only on which pool a named
//! pod belongs to (which never changes), so pods and pools may lag the batches.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::allocation::{self, AllocStatus};
#[cfg(test)]
use crate::api::names;
use crate::api::{BatchSandbox, Pool};
use crate::pods;

/// Whether [`check`] compares the pools' reported counts with their pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counts {
    /// Compare `status.total` and `status.allocated` with the pods (for a settled system).
    Check,
    /// Skip the comparison (while writes are still in flight).
    Skip,
}

/// One broken invariant. Objects are named `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("BatchSandbox {batch}: alloc-status is not a readable ledger: {reason}")]
    UnreadableLedger { batch: String, reason: String },
    #[error("BatchSandbox {batch}: its ledger names pod {pod} more than once")]
    PodTwiceInOneLedger { batch: String, pod: String },
    #[error("pod {pod} is held by several BatchSandboxes: {batches:?}")]
    PodInSeveralLedgers { pod: String, batches: Vec<String> },
    #[error(
        "BatchSandbox {batch}: its ledger names pod {pod}, which is not a pod of its pool {pool}"
    )]
    ForeignPodInLedger {
        batch: String,
        pod: String,
        pool: String,
    },
    #[error("Pool {pool}: status.{field} is {reported} but its pods say {actual}")]
    CountMismatch {
        pool: String,
        field: &'static str,
        reported: i64,
        actual: i64,
    },
    #[error(
        "BatchSandbox {batch}: status.{field} is {reported} but its spec and ledger say {expected}"
    )]
    StatusMismatch {
        batch: String,
        field: &'static str,
        reported: i64,
        expected: i64,
    },
}

impl Violation {
    /// A short name of the kind, for counting.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnreadableLedger { .. } => "unreadable-ledger",
            Self::PodTwiceInOneLedger { .. } => "pod-twice-in-one-ledger",
            Self::PodInSeveralLedgers { .. } => "pod-in-several-ledgers",
            Self::ForeignPodInLedger { .. } => "foreign-pod-in-ledger",
            Self::CountMismatch { .. } => "pool-count-mismatch",
            Self::StatusMismatch { .. } => "batch-status-mismatch",
        }
    }
}

/// Every violation of the allocation invariants in the snapshot (see the module docs), in a
/// stable order. Objects of different namespaces never refer to each other.
pub fn check(
    pods: &[Pod],
    batches: &[BatchSandbox],
    pools: &[Pool],
    counts: Counts,
) -> Vec<Violation> {
    let mut violations = Vec::new();
    let pod_by_key: BTreeMap<String, &Pod> = pods
        .iter()
        .map(|p| (key(p.namespace(), pods::pod_name(p)), p))
        .collect();
    // pod key -> holders
    let mut holders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for batch in batches {
        let Some(pool_name) = batch.pool_name() else {
            continue;
        };
        let batch_key = key(batch.namespace(), &batch.name_any());
        let ledger = match AllocStatus::of(batch) {
            Ok(ledger) => ledger,
            Err(error) => {
                violations.push(Violation::UnreadableLedger {
                    batch: batch_key,
                    reason: error.to_string(),
                });
                continue;
            }
        };
        let pool = pools
            .iter()
            .find(|p| p.namespace() == batch.namespace() && p.name_any() == pool_name);
        let mut seen = BTreeSet::new();
        for pod in ledger.pods.iter().filter(|p| !p.is_empty()) {
            if !seen.insert(pod.as_str()) {
                violations.push(Violation::PodTwiceInOneLedger {
                    batch: batch_key.clone(),
                    pod: pod.clone(),
                });
                continue;
            }
            let pod_key = key(batch.namespace(), pod);
            if let Some(object) = pod_by_key.get(&pod_key)
                && !is_of_pool(object, pool_name, pool)
            {
                violations.push(Violation::ForeignPodInLedger {
                    batch: batch_key.clone(),
                    pod: pod.clone(),
                    pool: pool_name.to_string(),
                });
            }
            holders.entry(pod_key).or_default().push(batch_key.clone());
        }
    }
    for (pod, batches) in &holders {
        if batches.len() > 1 {
            violations.push(Violation::PodInSeveralLedgers {
                pod: pod.clone(),
                batches: batches.clone(),
            });
        }
    }
    if counts == Counts::Check {
        for pool in pools {
            let Some(status) = &pool.status else { continue };
            let pool_key = key(pool.namespace(), &pool.name_any());
            let live: Vec<&Pod> = pods
                .iter()
                .filter(|p| is_pool_pod(p, &pool.name_any(), Some(pool)))
                .collect();
            let allocated = live
                .iter()
                .filter(|p| holders.contains_key(&key(p.namespace(), pods::pod_name(p))))
                .count();
            for (field, reported, actual) in [
                ("total", status.total, live.len()),
                ("allocated", status.allocated, allocated),
            ] {
                if i64::from(reported) != actual as i64 {
                    violations.push(Violation::CountMismatch {
                        pool: pool_key.clone(),
                        field,
                        reported: reported.into(),
                        actual: actual as i64,
                    });
                }
            }
        }
    }
    violations
}

/// Every settled pooled batch whose status does not count what it asked for and what its ledger
/// holds: `status.replicas` is `spec.replicas`, `status.allocated` the shards below `replicas`
/// that hold a pod. Only meaningful once nothing is in flight (the status trails the ledger by one
/// reconcile). Unreadable ledgers are [`check`]'s finding, not this one's.
pub fn batch_status_mismatches(batches: &[BatchSandbox]) -> Vec<Violation> {
    let mut violations = Vec::new();
    for batch in batches.iter().filter(|b| b.pool_name().is_some()) {
        let Ok(ledger) = AllocStatus::of(batch) else {
            continue;
        };
        let held = ledger
            .pods
            .iter()
            .take(batch.desired_replicas())
            .filter(|p| !p.is_empty())
            .count();
        let status = batch.status.clone().unwrap_or_default();
        for (field, reported, expected) in [
            ("replicas", status.replicas, i64::from(batch.spec.replicas)),
            ("allocated", status.allocated, held as i64),
        ] {
            if i64::from(reported) != expected {
                violations.push(Violation::StatusMismatch {
                    batch: key(batch.namespace(), &batch.name_any()),
                    field,
                    reported: reported.into(),
                    expected,
                });
            }
        }
    }
    violations
}

/// Whether `pod` belongs to the pool named `pool_name`, live or on its way out: labelled with it
/// and owned by no other controller (the Pool object itself, when known).
fn is_of_pool(pod: &Pod, pool_name: &str, pool: Option<&Pool>) -> bool {
    let labelled = pod
        .labels()
        .get(crate::api::names::LABEL_POOL_NAME)
        .map(String::as_str)
        == Some(pool_name);
    let uid = pool.and_then(|p| p.metadata.uid.as_deref());
    let owned = match pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
    {
        None => true,
        Some(owner) => {
            owner.kind == "Pool"
                && owner.name == pool_name
                && uid.is_none_or(|uid| owner.uid == uid)
        }
    };
    labelled && owned && pool.is_none_or(|p| p.namespace() == pod.namespace())
}

/// Whether `pod` is a live pod of the pool named `pool_name` (see
/// [`allocation::belongs_to_pool`]), and in the Pool's namespace when the Pool is known.
pub fn is_pool_pod(pod: &Pod, pool_name: &str, pool: Option<&Pool>) -> bool {
    let uid = pool.and_then(|p| p.metadata.uid.as_deref());
    allocation::belongs_to_pool(pod, pool_name, uid)
        && pool.is_none_or(|p| p.namespace() == pod.namespace())
}

fn key(namespace: Option<String>, name: &str) -> String {
    format!("{}/{name}", namespace.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BatchSandboxSpec, PoolSpec, PoolStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use std::collections::BTreeMap as Map;

    fn pool(name: &str) -> Pool {
        let mut pool = Pool::new(name, PoolSpec::default());
        pool.metadata.namespace = Some("ns".into());
        pool.metadata.uid = Some(format!("{name}-uid"));
        pool
    }

    fn pod(name: &str, pool: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some(Map::from([
                    (names::LABEL_POOL_NAME.into(), pool.into()),
                    (names::LABEL_MANAGED_BY.into(), names::MANAGED_BY.into()),
                ])),
                owner_references: Some(vec![OwnerReference {
                    kind: "Pool".into(),
                    name: pool.into(),
                    uid: format!("{pool}-uid"),
                    controller: Some(true),
                    ..OwnerReference::default()
                }]),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    fn batch(name: &str, pool: &str, ledger: &str) -> BatchSandbox {
        let mut batch = BatchSandbox::new(
            name,
            BatchSandboxSpec {
                replicas: 1,
                pool_ref: Some(pool.into()),
                ..BatchSandboxSpec::default()
            },
        );
        batch.metadata.namespace = Some("ns".into());
        batch.metadata.annotations = Some(Map::from([(
            names::ANNOTATION_ALLOC_STATUS.into(),
            ledger.into(),
        )]));
        batch
    }

    #[test]
    fn a_sound_snapshot_has_no_violations() {
        let pods = [pod("a", "p"), pod("b", "p")];
        let batches = [batch("x", "p", r#"{"pods":["a"]}"#)];
        assert_eq!(check(&pods, &batches, &[pool("p")], Counts::Skip), []);
    }

    #[test]
    fn every_kind_of_violation_is_reported() {
        let pods = [pod("a", "p"), pod("b", "p"), pod("q1", "q")];
        let batches = [
            batch("x", "p", r#"{"pods":["a","a"]}"#),
            batch("y", "p", r#"{"pods":["a","q1"]}"#),
            batch("z", "p", "{"),
        ];
        let mut reported = pool("p");
        reported.status = Some(PoolStatus {
            total: 5,
            allocated: 1,
            ..PoolStatus::default()
        });
        let violations = check(&pods, &batches, &[reported, pool("q")], Counts::Check);
        assert!(violations.contains(&Violation::PodTwiceInOneLedger {
            batch: "ns/x".into(),
            pod: "a".into()
        }));
        assert!(violations.contains(&Violation::PodInSeveralLedgers {
            pod: "ns/a".into(),
            batches: vec!["ns/x".into(), "ns/y".into()]
        }));
        assert!(violations.contains(&Violation::ForeignPodInLedger {
            batch: "ns/y".into(),
            pod: "q1".into(),
            pool: "p".into()
        }));
        assert!(
            violations
                .iter()
                .any(|v| matches!(v, Violation::UnreadableLedger { batch, .. } if batch == "ns/z"))
        );
        assert!(violations.contains(&Violation::CountMismatch {
            pool: "ns/p".into(),
            field: "total",
            reported: 5,
            actual: 2
        }));
        assert_eq!(violations.len(), 5, "{violations:#?}");
    }

    #[test]
    fn a_terminating_pod_of_the_pool_is_still_its_own() {
        let mut leaving = pod("a", "p");
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let batches = [batch("x", "p", r#"{"pods":["a"]}"#)];
        assert_eq!(check(&[leaving], &batches, &[pool("p")], Counts::Skip), []);
    }

    #[test]
    fn settled_batch_status_must_count_spec_and_ledger() {
        let with_status = |mut b: BatchSandbox, replicas: i32, allocated: i32| {
            b.status = Some(crate::api::BatchSandboxStatus {
                replicas,
                allocated,
                ..Default::default()
            });
            b
        };
        let mut two = batch("x", "p", r#"{"pods":["a","","b"]}"#);
        two.spec.replicas = 2;
        assert_eq!(
            batch_status_mismatches(&[with_status(two.clone(), 2, 1)]),
            []
        );
        assert_eq!(
            batch_status_mismatches(&[with_status(two, 2, 2)]),
            [Violation::StatusMismatch {
                batch: "ns/x".into(),
                field: "allocated",
                reported: 2,
                expected: 1
            }]
        );
        assert_eq!(
            batch_status_mismatches(&[batch("y", "p", "{")]),
            [],
            "an unreadable ledger is check's finding"
        );
    }

    #[test]
    fn a_pod_of_a_recreated_pool_of_the_same_name_is_foreign() {
        let mut stale = pod("a", "p");
        stale.metadata.owner_references = Some(vec![OwnerReference {
            kind: "Pool".into(),
            name: "p".into(),
            uid: "old-uid".into(),
            controller: Some(true),
            ..OwnerReference::default()
        }]);
        let violations = check(
            &[stale],
            &[batch("x", "p", r#"{"pods":["a"]}"#)],
            &[pool("p")],
            Counts::Skip,
        );
        assert_eq!(violations.len(), 1, "{violations:#?}");
    }
}
