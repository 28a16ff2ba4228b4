//! What every policy answer must satisfy before the controller acts on it, and the fail-safe
//! decision used when it does not (or when the policy failed outright).

use alloc::format;
use alloc::string::String;

use crate::expiry::{BatchSnapshot, ExpiryDecision};
use crate::selection::{self, SelectionDecision, SelectionInput};
use crate::sizing::{self, PoolSnapshot, SizingDecision};
use crate::tasks::{ShardTaskInput, ShardTasks};

/// Longest recheck delay a policy may ask for, unless it is exactly the time left until
/// `expireTime` (what the default policy asks for, however far off that is).
pub const MAX_RECHECK_MS: u64 = 7 * 24 * 3600 * 1000;
/// How soon a batch is looked at again when its expiry policy failed.
pub const FALLBACK_RECHECK_MS: u64 = 30_000;
/// Longest `reason` a sizing policy may give; it ends up in events and logs.
pub const MAX_REASON_BYTES: usize = 1024;

/// A sizing decision is valid when its size lies within `[poolMin, poolMax]` (just `poolMax`
/// when the bounds conflict, as [`sizing::clamp_to_bounds`] decides).
pub fn check_sizing(pool: &PoolSnapshot, decision: &SizingDecision) -> Result<(), String> {
    let b = pool.bounds;
    if sizing::clamp_to_bounds(decision.desired_total, &b) != decision.desired_total {
        return Err(format!(
            "desired total {} is outside [poolMin {}, poolMax {}]",
            decision.desired_total, b.pool_min, b.pool_max
        ));
    }
    if decision.reason.len() > MAX_REASON_BYTES {
        return Err(format!(
            "reason is {} bytes long, more than {MAX_REASON_BYTES}",
            decision.reason.len()
        ));
    }
    Ok(())
}

/// Shard tasks are valid when there is exactly one slot per shard and every time limit is positive.
pub fn check_shard_tasks(batch: &ShardTaskInput, tasks: &ShardTasks) -> Result<(), String> {
    if tasks.len() != batch.replicas as usize {
        return Err(format!(
            "{} task slot(s) for {} shard(s)",
            tasks.len(),
            batch.replicas
        ));
    }
    for (index, task) in tasks.iter().enumerate() {
        if let Some(timeout) = task
            .as_ref()
            .and_then(|t| t.timeout_seconds)
            .filter(|t| *t <= 0)
        {
            return Err(format!(
                "shard {index}: timeoutSeconds {timeout} is not positive"
            ));
        }
        let names = task
            .as_ref()
            .and_then(|t| t.process.as_ref())
            .and_then(|p| p.env.as_ref());
        if names.is_some_and(|env| env.iter().any(|e| e.name.is_empty())) {
            return Err(format!("shard {index}: an env entry has an empty name"));
        }
    }
    Ok(())
}

/// A recheck delay is valid up to [`MAX_RECHECK_MS`], or when it is exactly the time left until
/// `expireTime`.
pub fn check_expiry(batch: &BatchSnapshot, decision: &ExpiryDecision) -> Result<(), String> {
    if let ExpiryDecision::Keep {
        recheck_after_ms: Some(ms),
    } = *decision
    {
        let until_expiry = batch
            .expire_time_unix_ms
            .and_then(|at| u64::try_from(at.saturating_sub(batch.now_unix_ms)).ok());
        if ms > MAX_RECHECK_MS && until_expiry != Some(ms) {
            return Err(format!(
                "recheck after {ms} ms is beyond {MAX_RECHECK_MS} ms and not the time left until expireTime"
            ));
        }
    }
    Ok(())
}

/// A selection is valid when the pool it names is one of the candidates and its reason is short
/// enough for a condition.
pub fn check_selection(input: &SelectionInput, decision: &SelectionDecision) -> Result<(), String> {
    if let Some(pool) = &decision.pool
        && !input.pools.iter().any(|p| &p.pool_name == pool)
    {
        return Err(format!(
            "chose {pool:?}, which is not one of the candidate pools"
        ));
    }
    if decision.reason.len() > selection::MAX_REASON_BYTES {
        return Err(format!(
            "reason is {} bytes long, more than {}",
            decision.reason.len(),
            selection::MAX_REASON_BYTES
        ));
    }
    Ok(())
}

/// Selection fallback: the built-in default, which always gives a valid answer.
pub fn fallback_selection(input: &SelectionInput) -> SelectionDecision {
    selection::least_allocated_fit(input)
}

/// Sizing fallback: keep the current size, brought within the bounds.
pub fn fallback_sizing(pool: &PoolSnapshot) -> SizingDecision {
    let desired_total = sizing::clamp_to_bounds(pool.total, &pool.bounds);
    SizingDecision {
        desired_total,
        reason: format!(
            "policy failed; keeping the current size {} within bounds",
            pool.total
        ),
    }
}

/// Expiry fallback: keep the batch and look again soon.
pub fn fallback_expiry() -> ExpiryDecision {
    ExpiryDecision::Keep {
        recheck_after_ms: Some(FALLBACK_RECHECK_MS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sizing::Bounds;
    use crate::tasks::{ProcessTask, TaskSpec};
    use alloc::vec;
    use proptest::prelude::*;

    fn pool(total: u32, pool_min: u32, pool_max: u32) -> PoolSnapshot {
        PoolSnapshot {
            total,
            bounds: Bounds {
                buffer_min: 1,
                buffer_max: 2,
                pool_min,
                pool_max,
            },
            ..Default::default()
        }
    }

    fn decision(desired_total: u32) -> SizingDecision {
        SizingDecision {
            desired_total,
            reason: String::new(),
        }
    }

    #[test]
    fn sizing_outside_the_bounds_is_rejected() {
        let p = pool(0, 2, 5);
        assert!(check_sizing(&p, &decision(1)).is_err());
        assert!(check_sizing(&p, &decision(6)).is_err());
        assert!(check_sizing(&p, &decision(2)).is_ok() && check_sizing(&p, &decision(5)).is_ok());
        // Conflicting bounds: only poolMax is valid.
        let conflict = pool(0, 5, 3);
        assert!(check_sizing(&conflict, &decision(3)).is_ok());
        assert!(check_sizing(&conflict, &decision(4)).is_err());
    }

    #[test]
    fn an_overlong_reason_is_rejected() {
        let d = SizingDecision {
            desired_total: 3,
            reason: "x".repeat(MAX_REASON_BYTES + 1),
        };
        assert!(check_sizing(&pool(0, 2, 5), &d).is_err());
    }

    #[test]
    fn shard_tasks_need_one_slot_per_shard_and_positive_timeouts() {
        let batch = ShardTaskInput {
            replicas: 2,
            ..Default::default()
        };
        assert!(check_shard_tasks(&batch, &vec![None, None]).is_ok());
        assert!(check_shard_tasks(&batch, &vec![None]).is_err());
        assert!(check_shard_tasks(&batch, &vec![None, None, None]).is_err());
        let bad = TaskSpec {
            process: Some(ProcessTask::default()),
            timeout_seconds: Some(0),
        };
        assert!(check_shard_tasks(&batch, &vec![None, Some(bad)]).is_err());
    }

    #[test]
    fn a_recheck_is_bounded_unless_it_is_the_time_to_expiry() {
        let far = BatchSnapshot {
            expire_time_unix_ms: Some(i64::MAX),
            now_unix_ms: 0,
            ..Default::default()
        };
        let until = u64::try_from(i64::MAX).unwrap_or(u64::MAX);
        assert!(
            check_expiry(
                &far,
                &ExpiryDecision::Keep {
                    recheck_after_ms: Some(until)
                }
            )
            .is_ok()
        );
        assert!(
            check_expiry(
                &far,
                &ExpiryDecision::Keep {
                    recheck_after_ms: Some(MAX_RECHECK_MS + 1)
                }
            )
            .is_err()
        );
        assert!(
            check_expiry(
                &far,
                &ExpiryDecision::Keep {
                    recheck_after_ms: Some(MAX_RECHECK_MS)
                }
            )
            .is_ok()
        );
        assert!(
            check_expiry(
                &far,
                &ExpiryDecision::Keep {
                    recheck_after_ms: None
                }
            )
            .is_ok()
        );
    }

    #[test]
    fn a_selection_must_name_a_candidate_and_keep_its_reason_short() {
        let input = SelectionInput {
            pools: vec![selection::CandidatePool {
                pool_name: "p".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let choose = |pool: Option<&str>, reason: String| SelectionDecision {
            pool: pool.map(Into::into),
            reason,
        };
        assert!(check_selection(&input, &choose(Some("p"), String::new())).is_ok());
        assert!(check_selection(&input, &choose(None, String::new())).is_ok());
        assert!(check_selection(&input, &choose(Some("q"), String::new())).is_err());
        let long = "x".repeat(selection::MAX_REASON_BYTES + 1);
        assert!(check_selection(&input, &choose(None, long)).is_err());
    }

    proptest! {
        #[test]
        fn native_selections_always_pass_validation(input in crate::selection::tests::arb_input()) {
            prop_assert!(check_selection(&input, &selection::least_allocated_fit(&input)).is_ok());
            prop_assert!(check_selection(&input, &fallback_selection(&input)).is_ok());
        }

        #[test]
        fn the_sizing_fallback_is_always_valid(total in 0u32..200, pool_min in 0u32..100, pool_max in 0u32..100) {
            let p = pool(total, pool_min, pool_max);
            prop_assert!(check_sizing(&p, &fallback_sizing(&p)).is_ok());
        }

        #[test]
        fn native_decisions_always_pass_validation(
            total in 0u32..200, allocated in 0u32..200, unmet in 0u32..100,
            buffer_min in 0u32..50, buffer_max in 0u32..50, pool_min in 0u32..100, pool_max in 0u32..100,
            expire in proptest::option::of(-1_000_000_000_000i64..4_000_000_000_000), now in 0i64..2_000_000_000_000,
        ) {
            let p = PoolSnapshot { total, allocated, unmet_demand: unmet, bounds: Bounds { buffer_min, buffer_max, pool_min, pool_max }, ..Default::default() };
            prop_assert!(check_sizing(&p, &sizing::buffer_sizing(&p)).is_ok());
            let b = BatchSnapshot { expire_time_unix_ms: expire, now_unix_ms: now, ..Default::default() };
            prop_assert!(check_expiry(&b, &crate::expiry::at_expire_time(&b)).is_ok());
            prop_assert!(check_expiry(&b, &fallback_expiry()).is_ok());
        }
    }
}
