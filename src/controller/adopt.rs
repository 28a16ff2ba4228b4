//! Orphaned pool pods: pods labelled with a pool that no object owns, as a Pool deleted with
//! `kubectl delete pool --cascade=orphan` leaves them. When a Pool of that name exists again, its
//! reconcile takes them back: a pod of the Pool's current template revision, or one a batch still
//! holds, is adopted (an owner reference to the live Pool, conditional on the pod's
//! resourceVersion); an idle pod of another revision is deleted (conditional on its uid and
//! resourceVersion), and the pool warms a current one in its place.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{DeleteParams, Preconditions};
use serde_json::json;
use tracing::{debug, info};

use super::cached_pod::CachedPod;
use super::{Context, Error};
use sandbox_domain::api::{Pool, names};
use sandbox_domain::pods;

/// What to do with one orphan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orphan {
    Adopt,
    Delete,
}

/// The decision for a pod of `pool` without owner references (`None`: not an orphan to handle:
/// owned, terminating, or not labelled with this pool). `held`: whether a batch's ledger names
/// it, asked only of an orphan. Every pool pod passes through here on every round, and nearly all
/// are owned, so that is looked at first.
pub fn decide(
    pod: &Pod,
    pool_name: &str,
    revision: &str,
    held: impl FnOnce() -> bool,
) -> Option<Orphan> {
    if !pod.owner_references().is_empty() || pods::is_terminating(pod) {
        return None;
    }
    let labels = pod.labels();
    let orphan = labels.get(names::LABEL_POOL_NAME).map(String::as_str) == Some(pool_name)
        && labels.get(names::LABEL_MANAGED_BY).map(String::as_str) == Some(names::MANAGED_BY);
    if !orphan {
        return None;
    }
    let current = labels.get(names::LABEL_POOL_REVISION).map(String::as_str) == Some(revision);
    // A held pod serves a batch: it is never deleted here, whatever its revision; once released
    // it is recycled like any pod of the pool.
    Some(if current || held() {
        Orphan::Adopt
    } else {
        Orphan::Delete
    })
}

/// Adopts or deletes the orphans among `pool_pods` (see the module docs), leaving alone those
/// whose deletion was already sent (`deleting`). Returns the pods it deleted, which no longer
/// count for the pool; like every deletion of a pool pod, each counts as being deleted from the
/// moment it is sent (see [`Context::delete_pool_pod`]), so one whose answer is lost is never
/// taken for idle. A write that loses a race (the pod changed or went meanwhile) is left to the
/// next reconcile, which the pod's change triggers.
pub async fn orphans(
    pool: &Pool,
    ctx: &Context,
    pool_pods: &[Arc<CachedPod>],
    held: &HashSet<String>,
    deleting: &HashSet<String>,
    revision: &str,
) -> Result<Vec<String>, Error> {
    let namespace = pool.namespace().unwrap_or_default();
    let pool_name = pool.name_any();
    let mut deleted = Vec::new();
    for pod in pool_pods {
        let name = pods::pod_name(pod);
        let Some(decision) = decide(pod, &pool_name, revision, || held.contains(name)) else {
            continue;
        };
        if deleting.contains(name) {
            continue;
        }
        ctx.config.fence.check()?;
        let result = match decision {
            Orphan::Adopt => {
                let patch = json!({"metadata": {
                    "resourceVersion": pod.resource_version(),
                    "ownerReferences": [ctx.owner_reference(pool)],
                }});
                ctx.merge_patch::<Pod>(&namespace, name, &patch)
                    .await
                    .map(|_| ())
                    .map_err(Error::from)
            }
            Orphan::Delete => {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: pod.uid(),
                        resource_version: pod.resource_version(),
                    }),
                    ..DeleteParams::default()
                };
                ctx.delete_pool_pod(&namespace, &pool_name, name, &params)
                    .await
            }
        };
        match result {
            Ok(()) => {
                info!(pool = %format!("{namespace}/{pool_name}"), pod = %name, action = ?decision, "orphaned pool pod taken back");
                if decision == Orphan::Delete {
                    deleted.push(name.to_string());
                }
            }
            Err(Error::Kube(kube::Error::Api(status)))
                if status.code == 409 || status.code == 404 =>
            {
                debug!(pod = %name, %status.message, "orphan changed meanwhile; left to the next round");
            }
            Err(error) => return Err(error),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use std::collections::BTreeMap;

    fn orphan(revision: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p-a".into()),
                labels: Some(BTreeMap::from([
                    (names::LABEL_POOL_NAME.to_string(), "p".to_string()),
                    (
                        names::LABEL_MANAGED_BY.to_string(),
                        names::MANAGED_BY.to_string(),
                    ),
                    (names::LABEL_POOL_REVISION.to_string(), revision.to_string()),
                ])),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn current_or_held_orphans_are_adopted_and_idle_stale_ones_deleted() {
        assert_eq!(
            decide(&orphan("r1"), "p", "r1", || false),
            Some(Orphan::Adopt)
        );
        assert_eq!(
            decide(&orphan("r0"), "p", "r1", || false),
            Some(Orphan::Delete)
        );
        assert_eq!(
            decide(&orphan("r0"), "p", "r1", || true),
            Some(Orphan::Adopt)
        );
        assert_eq!(
            decide(&orphan("r1"), "q", "r1", || false),
            None,
            "another pool's"
        );
        let mut owned = orphan("r0");
        owned.metadata.owner_references = Some(vec![OwnerReference {
            kind: "Pool".into(),
            name: "p".into(),
            uid: "old".into(),
            ..OwnerReference::default()
        }]);
        assert_eq!(decide(&owned, "p", "r1", || false), None, "owned");
        let mut leaving = orphan("r0");
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(decide(&leaving, "p", "r1", || false), None, "terminating");
    }
}
