//! The allocation ledger: which pool pod serves which shard of which BatchSandbox.
//!
//! A pooled batch's shards are the entries of its `alloc-status` list, in shard order. The Pool
//! reconciler is the only writer that adds entries, so a plan made here from one consistent view
//! (the cache plus the claims this process wrote but has not yet seen back) never hands a pod to
//! two shards.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::api::{BatchSandbox, names};
use crate::pods;
use crate::released::Released;

/// The `sandbox.opensandbox.io/alloc-status` annotation, in OpenSandbox's format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocStatus {
    /// Pod names in shard order: entry i serves shard i.
    #[serde(default)]
    pub pods: Vec<String>,
    /// The Pool the pods came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_ref: Option<String>,
}

impl AllocStatus {
    /// Parses the annotation; a missing annotation is an empty ledger. A corrupt one is an error,
    /// because treating it as empty could hand its pods to someone else.
    pub fn parse(annotation: Option<&str>) -> Result<Self, serde_json::Error> {
        crate::annotation::parse_json(annotation)
    }

    pub fn to_annotation(&self) -> String {
        crate::annotation::to_json(self)
    }

    /// The ledger a batch carries (empty when it has none).
    pub fn of(batch: &BatchSandbox) -> Result<Self, serde_json::Error> {
        Self::parse(
            batch
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(names::ANNOTATION_ALLOC_STATUS))
                .map(String::as_str),
        )
    }
}

/// One pooled batch that may want pods, borrowed from its cached ledger: a round looks at every
/// batch of its pool, and most want nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand<'a> {
    /// Desired shard count.
    pub replicas: usize,
    /// The pods it holds now, in shard order.
    pub held: &'a [String],
    /// Shards released after their task finished: they never get a pod again.
    pub released: &'a Released,
}

impl Demand<'_> {
    /// Whether `shard` needs a pod: it is not released, and it has none or its pod is gone.
    fn needs_pod(&self, shard: usize, is_live: &impl Fn(&str) -> bool) -> bool {
        !self.released.contains(shard) && self.held.get(shard).is_none_or(|held| !is_live(held))
    }

    /// Whether every shard has been given a pod or released, whatever became of the pods since:
    /// the batch asks its pool for nothing its ledger does not already show.
    pub fn fully_granted(&self) -> bool {
        !(0..self.replicas).any(|shard| self.needs_pod(shard, &|held: &str| !held.is_empty()))
    }

    /// Shards holding a live pod, released ones left out: what the batch's status counts as
    /// allocated once it has caught up with this ledger.
    pub fn served(&self, is_live: impl Fn(&str) -> bool) -> usize {
        self.held
            .iter()
            .take(self.replicas)
            .enumerate()
            .filter(|(shard, held)| !self.released.contains(*shard) && is_live(held))
            .count()
    }
}

/// What one batch gets in this round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Index into the demands given to [`plan`].
    pub demand: usize,
    /// The batch's new pod list, in shard order.
    pub pods: Vec<String>,
    /// Pods newly handed to the batch in this round.
    pub granted: Vec<String>,
}

/// The outcome of one allocation round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub grants: Vec<Grant>,
    /// Shards still without a live pod after this round.
    pub unmet: u32,
}

/// Hands idle pods to batches in the order given (callers pass oldest batch first).
///
/// - `is_live(pod)`: the pod exists and can still serve; a held pod that is not live is replaced
///   in place, so surviving shards keep their pods and indices.
/// - `idle`: pods free to allocate, most preferred first. Each is used at most once.
///
/// Lists stay dense: a shard beyond the end of a list is only added once all before it are.
pub fn plan(demands: &[Demand], is_live: impl Fn(&str) -> bool, idle: &[impl AsRef<str>]) -> Plan {
    let mut free = idle.iter();
    let mut plan = Plan::default();
    for (index, demand) in demands.iter().enumerate() {
        if !(0..demand.replicas).any(|shard| demand.needs_pod(shard, &is_live)) {
            continue;
        }
        let mut pods = demand.held.to_vec();
        let mut granted = Vec::new();
        for shard in 0..demand.replicas {
            if demand.released.contains(shard) {
                if shard >= pods.len() {
                    pods.push(String::new());
                }
                continue;
            }
            if !demand.needs_pod(shard, &is_live) {
                continue;
            }
            match free.next().map(|pod| pod.as_ref().to_string()) {
                Some(pod) => {
                    granted.push(pod.clone());
                    if shard < pods.len() {
                        pods[shard] = pod;
                    } else {
                        pods.push(pod);
                    }
                }
                None => plan.unmet += 1,
            }
        }
        if !granted.is_empty() {
            plan.grants.push(Grant {
                demand: index,
                pods,
                granted,
            });
        }
    }
    plan
}

/// Whether `pod` is a pod of the Pool named `pool_name` (uid `pool_uid`, when the Pool object is
/// known), so that a ledger entry naming it may be dispatched to or deleted: it is live, labelled
/// with the pool, made by this controller, and either owned by that Pool or by nothing at all (a
/// pool deleted with `--cascade=orphan` leaves its pods without owners). A ledger is only an
/// annotation; this is what keeps an entry naming someone else's pod from being acted on.
pub fn belongs_to_pool(pod: &Pod, pool_name: &str, pool_uid: Option<&str>) -> bool {
    let labels = pod.labels();
    let labelled = labels.get(names::LABEL_POOL_NAME).map(String::as_str) == Some(pool_name)
        && labels.get(names::LABEL_MANAGED_BY).map(String::as_str) == Some(names::MANAGED_BY);
    let owners = pod.owner_references();
    let owned = match owners.iter().find(|o| o.controller == Some(true)) {
        None => owners.is_empty(),
        Some(owner) => {
            owner.kind == "Pool"
                && owner.name == pool_name
                && pool_uid.is_none_or(|uid| owner.uid == uid)
        }
    };
    labelled && owned && pods::is_live(pod)
}

/// Every pod any of the given ledgers holds.
pub fn held_pods<'a>(ledgers: impl IntoIterator<Item = &'a AllocStatus>) -> BTreeSet<&'a str> {
    ledgers
        .into_iter()
        .flat_map(|l| l.pods.iter().map(String::as_str))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    use sandbox_decisions::tasks::TaskPhase;

    const NONE_RELEASED: &Released = &Released(std::collections::BTreeMap::new());

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    #[test]
    fn a_demand_is_fully_granted_once_every_shard_got_a_pod_or_was_released() {
        let released = Released(std::collections::BTreeMap::from([(
            1,
            TaskPhase::Succeeded,
        )]));
        let demand = |replicas: usize, held: &[&str], released: &Released| {
            let held: Vec<String> = held.iter().map(|p| p.to_string()).collect();
            Demand {
                replicas,
                held: &held,
                released,
            }
            .fully_granted()
        };
        assert!(demand(0, &[], NONE_RELEASED), "no shards");
        assert!(demand(2, &["a", "b"], NONE_RELEASED));
        assert!(demand(1, &["a", "b"], NONE_RELEASED), "scaled down");
        assert!(
            !demand(2, &["a"], NONE_RELEASED),
            "a shard without an entry"
        );
        assert!(
            !demand(2, &["a", ""], NONE_RELEASED),
            "a shard whose entry was cleared"
        );
        assert!(
            demand(2, &["a", ""], &released),
            "the cleared shard was released"
        );
        assert!(
            demand(2, &["a"], &released),
            "the missing shard was released"
        );
    }

    #[test]
    fn served_counts_live_pods_of_shards_kept_and_not_released() {
        let released = Released(std::collections::BTreeMap::from([(
            1,
            TaskPhase::Succeeded,
        )]));
        let held = names("p", 5);
        let demand = Demand {
            replicas: 4,
            held: &held,
            released: &released,
        };
        // p1 is released, p2 is gone, p4 is beyond the replicas (being scaled in).
        assert_eq!(demand.served(|pod| pod != "p2"), 2);
        assert_eq!(
            Demand {
                replicas: 4,
                held: &[String::new(), "p1".into()],
                released: NONE_RELEASED,
            }
            .served(|pod| !pod.is_empty()),
            1,
            "a shard without a pod is not served"
        );
    }

    #[test]
    fn fills_new_batches_in_order_until_idle_runs_out() {
        let demands = vec![
            Demand {
                replicas: 2,
                released: NONE_RELEASED,
                held: &[],
            },
            Demand {
                replicas: 3,
                released: NONE_RELEASED,
                held: &[],
            },
        ];
        let plan = plan(&demands, |_| true, &names("p", 4));
        assert_eq!(plan.grants[0].pods, ["p0", "p1"]);
        assert_eq!(plan.grants[1].pods, ["p2", "p3"]);
        assert_eq!(plan.unmet, 1);
    }

    #[test]
    fn a_lost_pod_is_replaced_in_place() {
        let held = names("h", 3);
        let demands = vec![Demand {
            replicas: 3,
            released: NONE_RELEASED,
            held: &held,
        }];
        let plan = plan(&demands, |p| p != "h1", &names("p", 1));
        assert_eq!(plan.grants[0].pods, ["h0", "p0", "h2"]);
        assert_eq!(plan.grants[0].granted, ["p0"]);
    }

    #[test]
    fn satisfied_and_oversized_batches_get_nothing() {
        let held = names("h", 3);
        let demands = vec![Demand {
            replicas: 1,
            released: NONE_RELEASED,
            held: &held,
        }];
        assert_eq!(plan(&demands, |_| true, &names("p", 2)), Plan::default());
    }

    #[test]
    fn released_shards_never_get_a_pod_again() {
        let held = ["h0".to_string(), String::new()];
        let released = Released([(1, TaskPhase::Succeeded)].into());
        let demands = vec![Demand {
            replicas: 3,
            held: &held,
            released: &released,
        }];
        let plan = plan(&demands, |p| p == "h0", &names("p", 3));
        assert_eq!(plan.grants[0].pods, ["h0", "", "p0"]);
        assert_eq!(plan.unmet, 0);
    }

    #[test]
    fn annotation_round_trips_in_opensandbox_format() {
        let status = AllocStatus {
            pods: names("p", 2),
            pool_ref: Some("fast-pool".into()),
        };
        assert_eq!(
            status.to_annotation(),
            r#"{"pods":["p0","p1"],"poolRef":"fast-pool"}"#
        );
        assert_eq!(
            AllocStatus::parse(Some(&status.to_annotation())).unwrap(),
            status
        );
        assert_eq!(AllocStatus::parse(None).unwrap(), AllocStatus::default());
        assert!(AllocStatus::parse(Some("{not json")).is_err());
    }

    proptest! {
        /// The ledger invariant: no pod ever serves two shards, across all batches.
        #[test]
        fn no_pod_is_ever_allocated_twice(
            specs in prop::collection::vec((0usize..6, 0usize..5, prop::collection::btree_set(0usize..6, 0..3)), 0..8),
            idle_count in 0usize..20,
            dead in prop::collection::hash_set(0usize..40, 0..10),
        ) {
            // Held pods are distinct across batches, as the ledger guarantees on input.
            let mut next = 0;
            let ledgers: Vec<(usize, Vec<String>, Released)> = specs.iter().map(|(replicas, held, released)| {
                let pods = (next..next + held).map(|i| format!("h{i}")).collect();
                next += held;
                let released = Released(released.iter().map(|&s| (s, TaskPhase::Succeeded)).collect());
                (*replicas, pods, released)
            }).collect();
            let demands: Vec<Demand> = ledgers.iter().map(|(replicas, held, released)| {
                Demand { replicas: *replicas, held, released }
            }).collect();
            let is_live = |p: &str| !p.strip_prefix('h').and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| dead.contains(&n));
            let idle = names("p", idle_count);
            let result = plan(&demands, is_live, &idle);

            let mut finals: Vec<Vec<String>> = demands.iter().map(|d| d.held.to_vec()).collect();
            for grant in &result.grants { finals[grant.demand] = grant.pods.clone(); }
            let mut seen = HashSet::new();
            for pods in &finals {
                for pod in pods.iter().filter(|p| !p.is_empty()) { prop_assert!(seen.insert(pod.clone()), "{} allocated twice", pod); }
            }
            // A released shard never gets a pod; a batch granted nothing was left as it was.
            for grant in &result.grants {
                let demand = &demands[grant.demand];
                for (shard, pod) in grant.pods.iter().enumerate() {
                    if demand.released.contains(shard) {
                        let before = demand.held.get(shard).cloned().unwrap_or_default();
                        prop_assert_eq!(pod, &before);
                    }
                }
                prop_assert!(!grant.granted.is_empty());
            }
            // Every batch with a shard that needs a pod got one, unless idle ran out first.
            for (index, demand) in demands.iter().enumerate() {
                let needy = (0..demand.replicas).any(|s| demand.needs_pod(s, &is_live));
                let granted = result.grants.iter().any(|g| g.demand == index);
                prop_assert!(!needy || granted || result.unmet > 0);
                prop_assert!(needy || !granted);
            }
            // Every granted pod came from the idle list.
            for grant in &result.grants {
                for pod in &grant.granted { prop_assert!(idle.contains(pod)); }
            }
            // Demand is either met or idle ran out.
            let granted: usize = result.grants.iter().map(|g| g.granted.len()).sum();
            prop_assert!(result.unmet == 0 || granted == idle_count);
            // Met in full, each ledger serves every shard not released: the count its
            // batch's status reports once it has caught up.
            if result.unmet == 0 {
                let live_after = |p: &str| !p.is_empty() && (idle.iter().any(|i| i == p) || is_live(p));
                for (demand, pods) in demands.iter().zip(&finals) {
                    let kept = (0..demand.replicas).filter(|s| !demand.released.contains(*s)).count();
                    let after = Demand { held: pods, ..*demand };
                    prop_assert_eq!(after.served(live_after), kept);
                }
            }
        }
    }
}
