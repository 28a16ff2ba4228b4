//! What a Pool reconcile does to its pods: how many to create and which idle ones to delete, given
//! the size the sizing policy asked for. Allocated pods are never chosen for deletion here.
//!
//! Two budgets pace the changes, both `maxUnavailable` values in OpenSandbox's sense (an absolute
//! number or a percentage, rounded up, at least 1, default 25%):
//! - growth (`scaleStrategy`): new pods are created only while fewer than the budget of idle pods
//!   are starting, the percentage taken of the desired size;
//! - rollout (`updateStrategy`): a Ready idle pod of an old template is deleted only while fewer
//!   than the budget of idle pods are starting, the percentage taken of the pool's pods. Old idle
//!   pods that are not Ready serve no one and go at once.
//!
//! Idle pods labelled for eviction go at once too, whatever the budgets, and are replaced.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// `maxUnavailable` when a pool does not set it.
pub const DEFAULT_MAX_UNAVAILABLE: &str = "25%";

/// Why a `maxUnavailable` value cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaxUnavailableError {
    #[error("must be >= 0")]
    Negative,
    #[error("must be an integer or a percentage such as \"25%\"")]
    NotAPercentage,
    #[error("must be a percentage from 0% to 100%")]
    PercentOutOfRange,
}

/// A parsed `maxUnavailable`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxUnavailable {
    Count(u32),
    Percent(u32),
}

impl MaxUnavailable {
    /// Reads an int-or-string value: a non-negative integer, or `"N%"` with N from 0 to 100.
    pub fn parse(value: &IntOrString) -> Result<Self, MaxUnavailableError> {
        match value {
            IntOrString::Int(n) => u32::try_from(*n)
                .map(Self::Count)
                .map_err(|_| MaxUnavailableError::Negative),
            IntOrString::String(text) => {
                let digits = text
                    .strip_suffix('%')
                    .ok_or(MaxUnavailableError::NotAPercentage)?;
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(MaxUnavailableError::NotAPercentage);
                }
                match digits.parse::<u32>() {
                    Ok(percent) if percent <= 100 => Ok(Self::Percent(percent)),
                    _ => Err(MaxUnavailableError::PercentOutOfRange),
                }
            }
        }
    }

    /// The value a pool uses: its own if set and valid, else the default. (Admission refuses
    /// invalid values; one stored before the webhook ran falls back to the default.)
    pub fn resolve(value: Option<&IntOrString>) -> Self {
        value
            .and_then(|v| Self::parse(v).ok())
            .unwrap_or(Self::Percent(25))
    }

    /// The budget out of `total` pods: a count as is, a percentage rounded up (as Kubernetes'
    /// `GetScaledValueFromIntOrPercent` with `roundUp`), and never below 1 so that progress is
    /// always possible.
    pub fn budget(self, total: u32) -> u32 {
        let scaled = match self {
            Self::Count(n) => n,
            Self::Percent(p) => (u64::from(p) * u64::from(total)).div_ceil(100) as u32,
        };
        scaled.max(1)
    }
}

/// The pacing of one pool's changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacing {
    /// `scaleStrategy.maxUnavailable`.
    pub scale: MaxUnavailable,
    /// `updateStrategy.maxUnavailable`.
    pub update: MaxUnavailable,
}

impl Default for Pacing {
    fn default() -> Self {
        Self {
            scale: MaxUnavailable::Percent(25),
            update: MaxUnavailable::Percent(25),
        }
    }
}

/// One pool pod as the plan sees it, borrowing its name from the cached pod: a round plans every
/// pod of its pool, and only the names it deletes are copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPod<'a> {
    pub name: &'a str,
    /// Held by a BatchSandbox (or claimed by a write this process has in flight).
    pub allocated: bool,
    /// Running and Ready.
    pub ready: bool,
    /// Finished or failed: it can never serve again.
    pub dead: bool,
    /// Created from the pool's current template.
    pub current_revision: bool,
    /// Labelled for eviction by an operator.
    pub evict: bool,
}

impl PoolPod<'_> {
    /// Whether the pod is going whatever the size: it is finished, or idle and labelled for
    /// eviction. Such pods do not count toward the pool's size, so they are replaced.
    pub fn doomed(&self) -> bool {
        self.dead || (self.evict && !self.allocated)
    }
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
    /// Pods, allocated or not, on the current template (creations not yet seen included).
    pub updated: u32,
}

/// The pod changes to make.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodChanges {
    pub create: u32,
    pub delete: Vec<String>,
}

/// Counts of the pool's live pods. `unseen_creations` are pods created but not yet in the cache.
pub fn counts(pods: &[PoolPod], unseen_creations: u32) -> PoolCounts {
    let live = pods.iter().filter(|p| !p.doomed());
    let mut counts = PoolCounts {
        pending: unseen_creations,
        total: unseen_creations,
        updated: unseen_creations,
        ..Default::default()
    };
    for pod in live {
        counts.total += 1;
        if pod.current_revision {
            counts.updated += 1;
        }
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

/// The changes that bring the pool to `desired_total` pods, paced by `pacing`, then roll idle
/// pods of an old template forward.
pub fn changes(
    pods: &[PoolPod],
    unseen_creations: u32,
    desired_total: u32,
    pacing: Pacing,
) -> PodChanges {
    let counts = counts(pods, unseen_creations);
    // Dead idle pods never serve again, and evicted idle pods must not; remove them whatever the
    // size (they do not count toward it, so they are replaced).
    let mut delete: Vec<String> = pods
        .iter()
        .filter(|p| p.doomed() && !p.allocated)
        .map(|p| p.name.to_string())
        .collect();

    if desired_total > counts.total {
        // Growth: at most `scale` budget of idle pods starting at once.
        let budget = pacing.scale.budget(desired_total);
        let create = (desired_total - counts.total).min(budget.saturating_sub(counts.pending));
        return PodChanges { create, delete };
    }

    let mut idle: Vec<&PoolPod> = pods
        .iter()
        .filter(|p| !p.doomed() && !p.allocated)
        .collect();
    // Cheapest to lose first: not ready, then an old template, then by name (stable).
    idle.sort_by_key(|p| (p.ready, p.current_revision, std::cmp::Reverse(p.name)));
    let surplus = (counts.total - desired_total) as usize;
    let shrink: Vec<String> = idle
        .iter()
        .take(surplus)
        .map(|p| p.name.to_string())
        .collect();
    if !shrink.is_empty() {
        delete.extend(shrink);
        return PodChanges { create: 0, delete };
    }

    // Template rollout. Old idle pods that are not Ready go at once (they serve no one); Ready
    // ones only while fewer than the `update` budget of idle pods are starting, so available
    // capacity never drops by more than the budget. Replacements come in the next rounds, when
    // the pool is below its size.
    let budget = pacing.update.budget(counts.total);
    let mut room = budget.saturating_sub(counts.pending);
    for pod in idle.iter().filter(|p| !p.current_revision) {
        if !pod.ready {
            delete.push(pod.name.to_string());
        } else if room > 0 {
            delete.push(pod.name.to_string());
            room -= 1;
        }
    }
    PodChanges { create: 0, delete }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pod(name: &str, allocated: bool, ready: bool, current: bool) -> PoolPod<'_> {
        PoolPod {
            name,
            allocated,
            ready,
            dead: false,
            current_revision: current,
            evict: false,
        }
    }

    /// Pacing that never limits (budgets larger than any test pool).
    fn unpaced() -> Pacing {
        Pacing {
            scale: MaxUnavailable::Count(1000),
            update: MaxUnavailable::Count(1000),
        }
    }

    fn int(n: i32) -> IntOrString {
        IntOrString::Int(n)
    }

    fn text(s: &str) -> IntOrString {
        IntOrString::String(s.into())
    }

    #[test]
    fn grows_to_the_desired_size_counting_unseen_creations() {
        let pods = vec![pod("a", false, true, true)];
        assert_eq!(
            changes(&pods, 2, 10, unpaced()),
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
        assert_eq!(changes(&pods, 0, 2, unpaced()).delete, ["c"]);
        assert_eq!(
            changes(&pods, 0, 0, unpaced()).delete,
            ["c", "b"],
            "allocated pods are never deleted"
        );
    }

    #[test]
    fn rolls_old_idle_pods_within_the_update_budget() {
        let names: Vec<String> = (0..8).map(|i| format!("old{i}")).collect();
        let pods: Vec<PoolPod> = names
            .iter()
            .map(|name| pod(name, false, true, false))
            .collect();
        // Default 25% of 8 pods: 2 at once.
        let step = changes(&pods, 0, 8, Pacing::default());
        assert_eq!((step.create, step.delete.len()), (0, 2));
        let one = Pacing {
            update: MaxUnavailable::Count(1),
            ..Pacing::default()
        };
        assert_eq!(changes(&pods, 0, 8, one).delete.len(), 1);
        let all = Pacing {
            update: MaxUnavailable::Percent(100),
            ..Pacing::default()
        };
        assert_eq!(changes(&pods, 0, 8, all).delete.len(), 8);
        // While a replacement starts, it uses the budget: with 1, no further old pod goes.
        let mut with_new = pods.clone();
        with_new.push(pod("new", false, false, true));
        assert!(changes(&with_new, 0, 9, one).delete.is_empty());
        // Unseen creations are starting replacements too.
        assert!(changes(&pods, 1, 9, one).delete.is_empty());
    }

    #[test]
    fn old_idle_pods_that_are_not_ready_go_whatever_the_budget() {
        let names: Vec<String> = (0..4).map(|i| format!("old{i}")).collect();
        let mut pods: Vec<PoolPod> = names
            .iter()
            .map(|name| pod(name, false, false, false))
            .collect();
        pods.push(pod("ready-old", false, true, false));
        pods.push(pod("held-old", true, true, false));
        let one = Pacing {
            update: MaxUnavailable::Count(1),
            ..Pacing::default()
        };
        let step = changes(&pods, 0, 6, one);
        assert_eq!(step.delete, ["old3", "old2", "old1", "old0"]);
    }

    #[test]
    fn growth_keeps_starting_pods_within_the_scale_budget() {
        let two = Pacing {
            scale: MaxUnavailable::Count(2),
            ..Pacing::default()
        };
        assert_eq!(changes(&[], 0, 10, two).create, 2);
        // Two already starting (one seen, one not): nothing more until one is Ready.
        let starting = vec![pod("s", false, false, true)];
        assert_eq!(changes(&starting, 1, 10, two).create, 0);
        let ready = vec![pod("r", false, true, true)];
        assert_eq!(changes(&ready, 1, 10, two).create, 1);
        // Default 25% of the desired 10, rounded up: 3.
        assert_eq!(changes(&[], 0, 10, Pacing::default()).create, 3);
        // Never more than the pool needs.
        assert_eq!(changes(&ready, 0, 2, unpaced()).create, 1);
    }

    #[test]
    fn evicted_idle_pods_go_and_are_replaced_allocated_ones_stay() {
        let mut evicted = pod("e", false, true, true);
        evicted.evict = true;
        let mut held = pod("h", true, true, true);
        held.evict = true;
        let pods = vec![evicted, held, pod("a", false, true, true)];
        let c = counts(&pods, 0);
        assert_eq!((c.total, c.allocated, c.available), (2, 1, 1));
        assert_eq!(
            changes(&pods, 0, 3, unpaced()),
            PodChanges {
                create: 1,
                delete: vec!["e".into()]
            }
        );
    }

    #[test]
    fn max_unavailable_parses_ints_and_percentages() {
        assert_eq!(MaxUnavailable::parse(&int(3)), Ok(MaxUnavailable::Count(3)));
        assert_eq!(MaxUnavailable::parse(&int(0)), Ok(MaxUnavailable::Count(0)));
        assert_eq!(
            MaxUnavailable::parse(&text("0%")),
            Ok(MaxUnavailable::Percent(0))
        );
        assert_eq!(
            MaxUnavailable::parse(&text("100%")),
            Ok(MaxUnavailable::Percent(100))
        );
        assert_eq!(
            MaxUnavailable::parse(&int(-1)),
            Err(MaxUnavailableError::Negative)
        );
        assert_eq!(
            MaxUnavailable::parse(&text("101%")),
            Err(MaxUnavailableError::PercentOutOfRange)
        );
        for bad in ["", "%", "25", "-5%", "2.5%", "abc%", " 5%"] {
            assert_eq!(
                MaxUnavailable::parse(&text(bad)),
                Err(MaxUnavailableError::NotAPercentage),
                "{bad:?}"
            );
        }
        assert_eq!(MaxUnavailable::resolve(None), MaxUnavailable::Percent(25));
        assert_eq!(
            MaxUnavailable::resolve(Some(&text("x"))),
            MaxUnavailable::Percent(25)
        );
        assert_eq!(
            MaxUnavailable::parse(&text(DEFAULT_MAX_UNAVAILABLE)),
            Ok(MaxUnavailable::Percent(25))
        );
    }

    #[test]
    fn budgets_round_percentages_up_and_never_drop_below_one() {
        // Kubernetes' GetScaledValueFromIntOrPercent(roundUp=true): ceil(p * total / 100).
        assert_eq!(MaxUnavailable::Percent(25).budget(10), 3);
        assert_eq!(MaxUnavailable::Percent(25).budget(8), 2);
        assert_eq!(MaxUnavailable::Percent(25).budget(1), 1);
        assert_eq!(MaxUnavailable::Percent(33).budget(100), 33);
        assert_eq!(MaxUnavailable::Percent(100).budget(7), 7);
        assert_eq!(MaxUnavailable::Percent(0).budget(50), 1);
        assert_eq!(MaxUnavailable::Percent(50).budget(0), 1);
        assert_eq!(MaxUnavailable::Count(0).budget(10), 1);
        assert_eq!(MaxUnavailable::Count(4).budget(2), 4);
    }

    #[test]
    fn dead_idle_pods_are_removed_and_replaced() {
        let mut dead = pod("d", false, false, true);
        dead.dead = true;
        let pods = vec![dead, pod("a", false, true, true)];
        assert_eq!(
            changes(&pods, 0, 2, unpaced()),
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
            let names: Vec<String> = (0..spec.len()).map(|i| format!("p{i}")).collect();
            let pods: Vec<PoolPod> = spec.iter().zip(&names)
                .map(|(&(a, r, c), name)| pod(name, a, r, c)).collect();
            let result = changes(&pods, unseen, desired, unpaced());
            for name in &result.delete {
                let p = pods.iter().find(|p| p.name == name).unwrap();
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

        #[test]
        fn starting_pods_never_exceed_the_budgets_and_allocated_pods_stay(
            spec in prop::collection::vec((any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()), 0..30),
            unseen in 0u32..5,
            desired in 0u32..40,
            scale in 0u32..6,
            update in 0u32..6,
        ) {
            let names: Vec<String> = (0..spec.len()).map(|i| format!("p{i}")).collect();
            let pods: Vec<PoolPod> = spec.iter().zip(&names)
                .map(|(&(a, r, c, e), name)| PoolPod { evict: e, ..pod(name, a, r, c) })
                .collect();
            let pacing = Pacing { scale: MaxUnavailable::Count(scale), update: MaxUnavailable::Count(update) };
            let result = changes(&pods, unseen, desired, pacing);
            let before = counts(&pods, unseen);
            for name in &result.delete {
                let p = pods.iter().find(|p| p.name == name).unwrap();
                prop_assert!(!p.allocated, "allocated pods are never deleted");
            }
            // Every idle evicted pod goes.
            for p in pods.iter().filter(|p| p.evict && !p.allocated) {
                prop_assert!(result.delete.iter().any(|d| d == p.name));
            }
            // Growth never pushes the starting pods past the scale budget (unless already there).
            if result.create > 0 {
                prop_assert!(before.pending + result.create <= scale.max(1));
            }
            // A rollout takes Ready idle pods out only within the update budget.
            let ready_old_deleted = result.delete.iter()
                .filter(|n| pods.iter().any(|p| p.name == n.as_str() && p.ready && !p.current_revision && !p.doomed()))
                .count() as u32;
            let shrinking = desired < before.total;
            if !shrinking {
                prop_assert!(before.pending + ready_old_deleted <= update.max(1).max(before.pending));
            }
        }
    }
}
