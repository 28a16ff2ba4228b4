//! Pool sizing: how many pods a pool should have, given what it holds and what is asked of it.
//! The default pool-sizing policy is this function behind a WIT adapter.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Capacity bounds of a pool, as plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Bounds {
    pub buffer_min: u32,
    pub buffer_max: u32,
    pub pool_min: u32,
    pub pool_max: u32,
}

/// One recent allocation: `count` pods claimed at `at_unix_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AllocationEvent {
    pub at_unix_ms: i64,
    pub count: u32,
}

/// What a sizing decision sees of a pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PoolSnapshot {
    pub pool_name: String,
    pub bounds: Bounds,
    /// Pods that exist and are not terminating, allocated or idle.
    pub total: u32,
    /// Pods allocated to BatchSandboxes.
    pub allocated: u32,
    /// Idle pods that are Running and Ready.
    pub available: u32,
    /// Idle pods still starting.
    pub pending: u32,
    /// Pods being deleted.
    pub terminating: u32,
    /// Shards of BatchSandboxes that want a pod from this pool and have none.
    pub unmet_demand: u32,
    /// Recent allocations, oldest first.
    pub recent_allocations: Vec<AllocationEvent>,
    pub now_unix_ms: i64,
}

/// The pool size a policy asks for, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SizingDecision {
    pub desired_total: u32,
    pub reason: String,
}

/// Buffer-based sizing: keep `bufferMin` idle pods beyond unmet demand, no more than `bufferMax`
/// idle, and between `poolMin` and `poolMax` pods in all. Allocated pods are never counted as
/// removable, so the result is at least `allocated` unless `poolMax` is lower.
pub fn buffer_sizing(pool: &PoolSnapshot) -> SizingDecision {
    let b = pool.bounds;
    let idle = pool.total.saturating_sub(pool.allocated);
    let wanted_idle = idle
        .max(b.buffer_min.saturating_add(pool.unmet_demand))
        .min(
            b.buffer_max
                .max(b.buffer_min)
                .saturating_add(pool.unmet_demand),
        );
    let wanted = pool.allocated.saturating_add(wanted_idle);
    let desired_total = clamp_to_bounds(wanted, &b);
    let reason = if desired_total < wanted {
        format!(
            "capped at poolMax {}: wanted {wanted} ({} allocated + {wanted_idle} idle)",
            b.pool_max, pool.allocated
        )
    } else if desired_total > wanted {
        format!("raised to poolMin {}", b.pool_min)
    } else if pool.unmet_demand > 0 {
        format!(
            "{} allocated + {} unmet demand + buffer",
            pool.allocated, pool.unmet_demand
        )
    } else {
        format!(
            "{} allocated + {wanted_idle} idle within buffer [{}, {}]",
            pool.allocated, b.buffer_min, b.buffer_max
        )
    };
    SizingDecision {
        desired_total,
        reason,
    }
}

/// `value` within `[poolMin, poolMax]`; `poolMax` wins if the bounds conflict.
pub fn clamp_to_bounds(value: u32, bounds: &Bounds) -> u32 {
    value.max(bounds.pool_min).min(bounds.pool_max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec_bounds() -> Bounds {
        Bounds {
            buffer_min: 5,
            buffer_max: 20,
            pool_min: 10,
            pool_max: 50,
        }
    }

    fn snapshot(total: u32, allocated: u32, unmet: u32) -> PoolSnapshot {
        PoolSnapshot {
            bounds: spec_bounds(),
            total,
            allocated,
            available: total - allocated,
            unmet_demand: unmet,
            ..Default::default()
        }
    }

    #[test]
    fn empty_pool_warms_to_pool_min() {
        assert_eq!(buffer_sizing(&snapshot(0, 0, 0)).desired_total, 10);
    }

    #[test]
    fn allocation_refills_the_buffer() {
        assert_eq!(buffer_sizing(&snapshot(10, 10, 0)).desired_total, 15);
    }

    #[test]
    fn unmet_demand_grows_the_pool_up_to_pool_max() {
        assert_eq!(buffer_sizing(&snapshot(15, 10, 10)).desired_total, 25);
        assert_eq!(buffer_sizing(&snapshot(40, 40, 30)).desired_total, 50);
    }

    #[test]
    fn idle_beyond_buffer_max_shrinks() {
        assert_eq!(buffer_sizing(&snapshot(40, 0, 0)).desired_total, 20);
    }

    proptest! {
        #[test]
        fn decision_is_within_bounds_and_serves_demand_when_it_can(
            buffer_min in 0u32..30, extra in 0u32..30, pool_min in 0u32..60, pool_extra in 0u32..60,
            allocated in 0u32..80, idle in 0u32..80, unmet in 0u32..80,
        ) {
            let bounds = Bounds { buffer_min, buffer_max: buffer_min + extra, pool_min, pool_max: pool_min + pool_extra };
            let pool = PoolSnapshot { bounds, total: allocated + idle, allocated, unmet_demand: unmet, ..Default::default() };
            let d = buffer_sizing(&pool).desired_total;
            prop_assert!(d >= bounds.pool_min && d <= bounds.pool_max);
            let needed = allocated + unmet + buffer_min;
            if needed <= bounds.pool_max {
                prop_assert!(d >= needed, "demand {} unserved by {}", needed, d);
            }
            // Never shrinks into allocated pods unless poolMax forces it.
            prop_assert!(d >= allocated.min(bounds.pool_max));
            // Idle stays within bufferMax plus the demand it is warming for, unless poolMin forces more.
            prop_assert!(d <= (allocated + buffer_min.max(bounds.buffer_max) + unmet).max(bounds.pool_min));
        }
    }
}
