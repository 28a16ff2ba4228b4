//! What happens to a pooled pod its BatchSandbox gives back, given the Pool's recycle strategy
//! and what stopping the pod's tasks showed.

use crate::api::RecycleType;

/// What stopping the tasks on one pod showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// The pod's executor confirmed that every process of every task it ran has ended.
    Confirmed,
    /// The executor answered and tasks are still ending; ask again shortly.
    Stopping,
    /// Nothing confirms that the tasks' processes ended (executor unreachable or refusing,
    /// nonsense answer, no pod IP, no executor, a task whose processes may live on); the text
    /// says why.
    Unconfirmed(String),
}

/// What to do with one released pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecycleAction {
    /// Tasks are still stopping: leave the pod with its holder for now and look again.
    Wait,
    /// Delete the pod; the pool warms a fresh one.
    Delete,
    /// Delete the pod because `Restart` could not confirm that the previous holder's processes
    /// ended; the text says why (it goes into an Event).
    DeleteUnconfirmed(String),
    /// Leave the pod in place: it turns idle once its holder no longer lists it.
    ReturnIdle,
}

/// The strategy a batch's released pods get: non-pooled pods are always deleted; a batch an
/// expiry policy returned to its pool (`ReturnToPool`) gets `Restart` whatever its pool says,
/// since returning is the point and only `Restart` returns with confirmation; any other pooled
/// batch gets its pool's strategy (`Delete` when the pool is gone).
pub fn effective_recycle_type(
    pooled: bool,
    returned_to_pool: bool,
    pool_type: Option<RecycleType>,
) -> RecycleType {
    match (pooled, returned_to_pool) {
        (false, _) => RecycleType::Delete,
        (true, true) => RecycleType::Restart,
        (true, false) => pool_type.unwrap_or_default(),
    }
}

/// The recycle decision for one pod. `healthy`: the pod is Running, Ready and not terminating,
/// so it can serve again; an unhealthy pod is deleted whatever the strategy.
pub fn recycle_action(strategy: RecycleType, stop: &StopOutcome, healthy: bool) -> RecycleAction {
    if *stop == StopOutcome::Stopping {
        // Every strategy lets the tasks stop before the pod changes hands or goes.
        return RecycleAction::Wait;
    }
    match strategy {
        RecycleType::Delete => RecycleAction::Delete,
        RecycleType::Restart => match stop {
            StopOutcome::Confirmed if healthy => RecycleAction::ReturnIdle,
            StopOutcome::Confirmed | StopOutcome::Stopping => RecycleAction::Delete,
            StopOutcome::Unconfirmed(why) => RecycleAction::DeleteUnconfirmed(why.clone()),
        },
        // Returned as is: what the executor could not stop may live on.
        RecycleType::Noop if healthy => RecycleAction::ReturnIdle,
        RecycleType::Noop => RecycleAction::Delete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unconfirmed() -> StopOutcome {
        StopOutcome::Unconfirmed("executor unreachable".into())
    }

    #[test]
    fn delete_always_deletes_once_tasks_stopped() {
        for stop in [StopOutcome::Confirmed, unconfirmed()] {
            for healthy in [true, false] {
                assert_eq!(
                    recycle_action(RecycleType::Delete, &stop, healthy),
                    RecycleAction::Delete
                );
            }
        }
    }

    #[test]
    fn restart_returns_a_pod_only_with_confirmation() {
        assert_eq!(
            recycle_action(RecycleType::Restart, &StopOutcome::Confirmed, true),
            RecycleAction::ReturnIdle
        );
        assert_eq!(
            recycle_action(RecycleType::Restart, &unconfirmed(), true),
            RecycleAction::DeleteUnconfirmed("executor unreachable".into())
        );
        assert_eq!(
            recycle_action(RecycleType::Restart, &StopOutcome::Confirmed, false),
            RecycleAction::Delete
        );
    }

    #[test]
    fn noop_returns_a_healthy_pod_whatever_the_stop_showed() {
        assert_eq!(
            recycle_action(RecycleType::Noop, &unconfirmed(), true),
            RecycleAction::ReturnIdle
        );
        assert_eq!(
            recycle_action(RecycleType::Noop, &StopOutcome::Confirmed, false),
            RecycleAction::Delete
        );
    }

    #[test]
    fn return_to_pool_means_restart_and_non_pooled_pods_are_deleted() {
        for pool_type in [None, Some(RecycleType::Delete), Some(RecycleType::Noop)] {
            assert_eq!(
                effective_recycle_type(true, true, pool_type),
                RecycleType::Restart
            );
            assert_eq!(
                effective_recycle_type(false, true, pool_type),
                RecycleType::Delete
            );
        }
        assert_eq!(
            effective_recycle_type(true, false, Some(RecycleType::Noop)),
            RecycleType::Noop
        );
        assert_eq!(
            effective_recycle_type(true, false, None),
            RecycleType::Delete
        );
    }

    fn any_strategy() -> impl Strategy<Value = RecycleType> {
        prop_oneof![
            Just(RecycleType::Delete),
            Just(RecycleType::Restart),
            Just(RecycleType::Noop)
        ]
    }

    fn any_stop() -> impl Strategy<Value = StopOutcome> {
        prop_oneof![
            Just(StopOutcome::Confirmed),
            Just(StopOutcome::Stopping),
            "[a-z ]{0,12}".prop_map(StopOutcome::Unconfirmed),
        ]
    }

    proptest! {
        /// A pod changes hands only once no task is stopping any more, never unhealthy, and
        /// under `Restart` only with confirmation.
        #[test]
        fn a_pod_returns_only_when_safe(strategy in any_strategy(), stop in any_stop(), healthy: bool) {
            let action = recycle_action(strategy, &stop, healthy);
            if stop == StopOutcome::Stopping {
                prop_assert_eq!(action, RecycleAction::Wait);
            } else if action == RecycleAction::ReturnIdle {
                prop_assert!(healthy);
                prop_assert!(strategy != RecycleType::Delete);
                prop_assert!(strategy != RecycleType::Restart || stop == StopOutcome::Confirmed);
            }
        }
    }
}
