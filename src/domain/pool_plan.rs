//! What a Pool reconcile does to its pods: how many to create and which idle ones to delete, given
//! the size the sizing policy asked for. Allocated pods are never chosen for deletion here.

/// One pool pod as the plan sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPod {
    pub name: String,
    /// Held by a BatchSandbox (or claimed by a write this process has in flight).
    pub allocated: bool,
    /// Running and Ready.
    pub ready: bool,
    /// Finished or failed: it can never serve again.
    pub dead: bool,
    /// Created from the pool's current template.
    pub current_revision: bool,
}

/// Counts derived from the pool's pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Pods that count toward the pool's size: live pods plus creations not yet seen.
    pub total: u32,
    pub allocated: u32,
    /// Idle pods that are Running and Ready.
    pub available: u32,
    /// Idle pods still starting, including creations not yet seen.
    pub pending: u32,
}

/// The pod changes to make.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodChanges {
    pub create: u32,
    pub delete: Vec<String>,
}

/// Counts of the pool's live pods. `unseen_creations` are pods created but not yet in the cache.
pub fn counts(pods: &[PoolPod], unseen_creations: u32) -> PoolCounts {
    let live = pods.iter().filter(|p| !p.dead);
    let mut counts = PoolCounts {
        pending: unseen_creations,
        total: unseen_creations,
        ..Default::default()
    };
    for pod in live {
        counts.total += 1;
        if pod.allocated {
            counts.allocated += 1;
        } else if pod.ready {
            counts.available += 1;
        } else {
            counts.pending += 1;
        }
    }
    counts
}

/// The changes that bring the pool to `desired_total` pods, then roll idle pods of an old
/// template forward a few at a time.
pub fn changes(pods: &[PoolPod], unseen_creations: u32, desired_total: u32) -> PodChanges {
    let counts = counts(pods, unseen_creations);
    // Dead idle pods never serve again; remove them whatever the size (they do not count toward it).
    let mut delete: Vec<String> = pods
        .iter()
        .filter(|p| p.dead && !p.allocated)
        .map(|p| p.name.clone())
        .collect();

    if desired_total > counts.total {
        return PodChanges {
            create: desired_total - counts.total,
            delete,
        };
    }

    let mut idle: Vec<&PoolPod> = pods.iter().filter(|p| !p.dead && !p.allocated).collect();
    // Cheapest to lose first: not ready, then an old template, then by name (stable).
    idle.sort_by_key(|p| {
        (
            p.ready,
            p.current_revision,
            std::cmp::Reverse(p.name.clone()),
        )
    });
    let surplus = (counts.total - desired_total) as usize;
    let shrink: Vec<String> = idle.iter().take(surplus).map(|p| p.name.clone()).collect();
    if !shrink.is_empty() {
        delete.extend(shrink);
        return PodChanges { create: 0, delete };
    }

    // Template rollout: replace old idle pods gradually, only once the previous step's
    // replacements are ready, so available capacity never drops by more than a step.
    let replacements_starting = unseen_creations > 0
        || pods
            .iter()
            .any(|p| !p.dead && !p.allocated && p.current_revision && !p.ready);
    if !replacements_starting {
        let step = (idle.len() / 4).max(1);
        delete.extend(
            idle.iter()
                .filter(|p| !p.current_revision)
                .take(step)
                .map(|p| p.name.clone()),
        );
    }
    PodChanges { create: 0, delete }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pod(name: &str, allocated: bool, ready: bool, current: bool) -> PoolPod {
        PoolPod {
            name: name.into(),
            allocated,
            ready,
            dead: false,
            current_revision: current,
        }
    }

    #[test]
    fn grows_to_the_desired_size_counting_unseen_creations() {
        let pods = vec![pod("a", false, true, true)];
        assert_eq!(
            changes(&pods, 2, 10),
            PodChanges {
                create: 7,
                delete: vec![]
            }
        );
    }

    #[test]
    fn shrinks_idle_pods_only_preferring_unready_ones() {
        let pods = vec![
            pod("a", true, true, true),
            pod("b", false, true, true),
            pod("c", false, false, true),
        ];
        assert_eq!(changes(&pods, 0, 2).delete, ["c"]);
        assert_eq!(
            changes(&pods, 0, 0).delete,
            ["c", "b"],
            "allocated pods are never deleted"
        );
    }

    #[test]
    fn rolls_old_idle_pods_a_step_at_a_time() {
        let pods: Vec<PoolPod> = (0..8)
            .map(|i| pod(&format!("old{i}"), false, true, false))
            .collect();
        let step = changes(&pods, 0, 8);
        assert_eq!((step.create, step.delete.len()), (0, 2));
        // While a replacement starts, no further old pod goes.
        let mut with_new = pods.clone();
        with_new.push(pod("new", false, false, true));
        assert!(changes(&with_new, 0, 9).delete.is_empty());
    }

    #[test]
    fn dead_idle_pods_are_removed_and_replaced() {
        let mut dead = pod("d", false, false, true);
        dead.dead = true;
        let pods = vec![dead, pod("a", false, true, true)];
        assert_eq!(
            changes(&pods, 0, 2),
            PodChanges {
                create: 1,
                delete: vec!["d".into()]
            }
        );
    }

    proptest! {
        #[test]
        fn never_deletes_allocated_pods_and_lands_on_the_desired_size(
            spec in prop::collection::vec((any::<bool>(), any::<bool>(), any::<bool>()), 0..30),
            unseen in 0u32..5,
            desired in 0u32..40,
        ) {
            let pods: Vec<PoolPod> = spec.iter().enumerate()
                .map(|(i, &(a, r, c))| pod(&format!("p{i}"), a, r, c)).collect();
            let result = changes(&pods, unseen, desired);
            for name in &result.delete {
                let p = pods.iter().find(|p| &p.name == name).unwrap();
                prop_assert!(!p.allocated);
            }
            let before = counts(&pods, unseen);
            let after = before.total + result.create - result.delete.len() as u32;
            if result.create > 0 { prop_assert_eq!(after, desired); }
            prop_assert!(after >= before.allocated);
            // Without a rollout (all pods current), shrinking stops exactly at the desired size, or
            // at what cannot be deleted: allocated pods and creations not yet seen.
            if spec.iter().all(|&(_, _, current)| current) && desired < before.total {
                prop_assert_eq!(after, desired.max(before.allocated + unseen));
            }
        }
    }
}
