//! BatchSandbox status, derived only from what was observed: pods, their readiness, task states
//! and the pool's situation.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::conditions::{self, Desired};
use crate::api::BatchSandboxStatus;
use sandbox_decisions::tasks::TaskPhase;

/// One shard as observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardView {
    /// The shard's task finished and its pod was released on purpose: it is complete.
    pub released: bool,
    /// A live pod serves this shard.
    pub has_pod: bool,
    /// That pod is Running and Ready.
    pub ready: bool,
    pub task: TaskPhase,
}

/// Why a pooled batch may be unable to get pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolSituation {
    /// Not pooled, or the pool can serve.
    Fine,
    Missing {
        pool: String,
    },
    Terminating {
        pool: String,
    },
    /// The pool is at `poolMax` with no idle pod left.
    Exhausted {
        pool: String,
        pool_max: i32,
    },
    /// The API server rejected the write that allocates the pool's pods to the batch (RBAC, an
    /// admission webhook or policy); the allocation is retried with a backoff.
    AllocationRejected {
        pool: String,
        message: String,
    },
}

/// Everything the status is computed from.
#[derive(Clone, Debug)]
pub struct BatchView {
    pub generation: i64,
    pub pooled: bool,
    /// One entry per desired shard.
    pub shards: Vec<ShardView>,
    /// Live pods of the batch, including any above `replicas` still being removed.
    pub live_pods: u32,
    pub pool: PoolSituation,
    /// Set when a policy decision fell back.
    pub policy_degraded: Option<String>,
}

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_PROGRESSING: &str = "Progressing";
pub const CONDITION_POOL_UNAVAILABLE: &str = "PoolUnavailable";
/// True while a pooled batch waits for pods its pool cannot give: the pool is at `poolMax` with
/// no idle pod. OpenSandbox's name; its server answers 429 (capacity exhausted) on it.
pub const CONDITION_POOL_ALLOCATION_PENDING: &str = "PoolAllocationPending";
pub const CONDITION_TASK_FAILED: &str = "TaskFailed";
pub const CONDITION_POLICY_DEGRADED: &str = "PolicyDegraded";
/// True while a `poolRef: "*"` batch has no Pool chosen because none fits; the message says why
/// each Pool was rejected. Dropped once a Pool is chosen.
pub const CONDITION_POOL_SELECTION_PENDING: &str = "PoolSelectionPending";
/// Reason of [`CONDITION_POOL_SELECTION_PENDING`].
pub const REASON_NO_ELIGIBLE_POOL: &str = "NoEligiblePool";
/// The reason of `PoolUnavailable` while the API server rejects a batch's allocation. Each
/// rejection is reported by an event of its own, with its retry time.
pub const REASON_ALLOCATION_REJECTED: &str = "AllocationRejected";

/// The status of a `poolRef: "*"` batch for which no Pool fits: nothing delivered, and why.
pub fn selection_pending_status(
    generation: i64,
    desired: usize,
    why: &str,
    policy_degraded: Option<&str>,
    previous: &BatchSandboxStatus,
    now: &Time,
) -> BatchSandboxStatus {
    let desired_conditions = [
        Desired::new(
            CONDITION_READY,
            false,
            "SandboxesNotReady",
            format!("0/{desired} sandboxes ready: no Pool chosen yet"),
        ),
        Desired::new(
            CONDITION_POOL_SELECTION_PENDING,
            true,
            REASON_NO_ELIGIBLE_POOL,
            why,
        ),
        match policy_degraded {
            Some(reason) => Desired::new(CONDITION_POLICY_DEGRADED, true, "PolicyFallback", reason),
            None => Desired::new(CONDITION_POLICY_DEGRADED, false, "PoliciesHealthy", ""),
        },
    ];
    BatchSandboxStatus {
        observed_generation: generation,
        conditions: conditions::merge(&previous.conditions, &desired_conditions, now, generation),
        ..BatchSandboxStatus::default()
    }
}

/// The status for `view`, keeping transition times from `previous`.
pub fn batch_status(
    view: &BatchView,
    previous: &BatchSandboxStatus,
    now: &Time,
) -> BatchSandboxStatus {
    let count = |f: &dyn Fn(&ShardView) -> bool| view.shards.iter().filter(|s| f(s)).count() as i32;
    // Released shards are done: they count toward neither the pods wanted nor the pods held.
    let desired = count(&|s| !s.released);
    let allocated = count(&|s| !s.released && s.has_pod);
    let ready = count(&|s| !s.released && s.has_pod && s.ready);
    let phase = |p: TaskPhase| count(&move |s: &ShardView| s.task == p);
    let failed_shards: Vec<String> = view
        .shards
        .iter()
        .enumerate()
        .filter(|(_, s)| s.task == TaskPhase::Failed)
        .map(|(i, _)| i.to_string())
        .collect();

    let mut desired_conditions = vec![
        if ready == desired {
            Desired::new(
                CONDITION_READY,
                true,
                "AllSandboxesReady",
                format!("{ready}/{desired} sandboxes ready"),
            )
        } else {
            Desired::new(
                CONDITION_READY,
                false,
                "SandboxesNotReady",
                format!("{ready}/{desired} sandboxes ready"),
            )
        },
        progressing(view, desired, allocated, ready),
    ];
    if view.pooled {
        let (unavailable, exhausted) = pool_conditions(&view.pool);
        desired_conditions.push(unavailable);
        desired_conditions.push(exhausted);
    }
    desired_conditions.push(if failed_shards.is_empty() {
        Desired::new(CONDITION_TASK_FAILED, false, "NoTaskFailed", "")
    } else {
        Desired::new(
            CONDITION_TASK_FAILED,
            true,
            "TaskFailed",
            format!("task failed on shard(s) {}", failed_shards.join(", ")),
        )
    });
    desired_conditions.push(match &view.policy_degraded {
        Some(reason) => Desired::new(
            CONDITION_POLICY_DEGRADED,
            true,
            "PolicyFallback",
            reason.clone(),
        ),
        None => Desired::new(CONDITION_POLICY_DEGRADED, false, "PoliciesHealthy", ""),
    });

    BatchSandboxStatus {
        observed_generation: view.generation,
        replicas: view.live_pods as i32,
        allocated,
        ready,
        task_pending: phase(TaskPhase::Pending),
        task_running: phase(TaskPhase::Running),
        task_succeed: phase(TaskPhase::Succeeded),
        task_failed: phase(TaskPhase::Failed),
        task_unknown: phase(TaskPhase::Unknown),
        conditions: conditions::merge(
            &previous.conditions,
            &desired_conditions,
            now,
            view.generation,
        ),
        // OpenSandbox sets these only when pausing or resuming, which this controller refuses.
        phase: None,
        pause_observed_generation: None,
    }
}

/// Whether two statuses say the same thing, ignoring condition transition times.
pub fn equivalent(a: &BatchSandboxStatus, b: &BatchSandboxStatus) -> bool {
    let counts = |s: &BatchSandboxStatus| BatchSandboxStatus {
        conditions: vec![],
        ..s.clone()
    };
    counts(a) == counts(b) && conditions::same(&a.conditions, &b.conditions)
}

/// Conditions that say a pooled batch cannot get its pods (`PoolUnavailable`, `PoolAllocationPending`)
/// and are True in `next` but were not in `previous`: each such transition is worth a Warning
/// event, once, not one per reconcile.
pub fn allocation_problems_begun<'a>(
    previous: &BatchSandboxStatus,
    next: &'a BatchSandboxStatus,
) -> Vec<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let is_true = |status: &BatchSandboxStatus, type_: &str| {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    };
    next.conditions
        .iter()
        .filter(|c| {
            matches!(
                c.type_.as_str(),
                CONDITION_POOL_UNAVAILABLE | CONDITION_POOL_ALLOCATION_PENDING
            ) && c.status == "True"
                && c.reason != REASON_ALLOCATION_REJECTED
                && !is_true(previous, &c.type_)
        })
        .collect()
}

fn progressing(view: &BatchView, desired: i32, allocated: i32, ready: i32) -> Desired {
    let excess = view.live_pods as i32 - desired;
    if allocated < desired {
        Desired::new(
            CONDITION_PROGRESSING,
            true,
            "Allocating",
            format!("{allocated}/{desired} sandboxes have a pod"),
        )
    } else if ready < desired {
        Desired::new(
            CONDITION_PROGRESSING,
            true,
            "Starting",
            format!("{ready}/{desired} sandboxes ready"),
        )
    } else if excess > 0 {
        Desired::new(
            CONDITION_PROGRESSING,
            true,
            "ScalingDown",
            format!("{excess} sandbox(es) being removed"),
        )
    } else {
        Desired::new(
            CONDITION_PROGRESSING,
            false,
            "Complete",
            format!("{desired} sandboxes delivered"),
        )
    }
}

fn pool_conditions(pool: &PoolSituation) -> (Desired, Desired) {
    let available = Desired::new(CONDITION_POOL_UNAVAILABLE, false, "PoolAvailable", "");
    let not_exhausted = Desired::new(
        CONDITION_POOL_ALLOCATION_PENDING,
        false,
        "PoolHasCapacity",
        "",
    );
    match pool {
        PoolSituation::Fine => (available, not_exhausted),
        PoolSituation::Missing { pool } => (
            Desired::new(
                CONDITION_POOL_UNAVAILABLE,
                true,
                "PoolNotFound",
                format!("Pool {pool:?} does not exist in this namespace"),
            ),
            not_exhausted,
        ),
        PoolSituation::Terminating { pool } => (
            Desired::new(
                CONDITION_POOL_UNAVAILABLE,
                true,
                "PoolTerminating",
                format!("Pool {pool:?} is being deleted; no new pods are allocated"),
            ),
            not_exhausted,
        ),
        PoolSituation::AllocationRejected { pool, message } => (
            Desired::new(
                CONDITION_POOL_UNAVAILABLE,
                true,
                REASON_ALLOCATION_REJECTED,
                format!(
                    "the API server rejected the allocation of Pool {pool:?}'s pods: {message}; retrying with a backoff"
                ),
            ),
            not_exhausted,
        ),
        PoolSituation::Exhausted { pool, pool_max } => (
            available,
            Desired::new(
                CONDITION_POOL_ALLOCATION_PENDING,
                true,
                "PoolCapacityExhausted",
                format!(
                    "Pool {pool:?} is at poolMax ({pool_max}) with no idle pod; waiting for capacity to free up"
                ),
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap())
    }

    #[test]
    fn a_batch_waiting_for_a_pool_says_why_and_keeps_its_transition_time() {
        let why = "0/1 pools fit: small: requests cpu 250m < 500m";
        let first =
            selection_pending_status(2, 3, why, None, &BatchSandboxStatus::default(), &now());
        let pending = first
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_POOL_SELECTION_PENDING)
            .expect("the pending condition");
        assert_eq!(
            (
                pending.status.as_str(),
                pending.reason.as_str(),
                pending.message.as_str()
            ),
            ("True", REASON_NO_ELIGIBLE_POOL, why)
        );
        assert_eq!(
            (first.replicas, first.allocated, first.observed_generation),
            (0, 0, 2)
        );
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap());
        let again = selection_pending_status(2, 3, why, None, &first, &later);
        assert!(equivalent(&first, &again));
        assert_eq!(again.conditions[1].last_transition_time, now());
        let degraded = selection_pending_status(2, 3, why, Some("policy failed"), &first, &later);
        assert!(!equivalent(&first, &degraded));
    }

    fn shard(has_pod: bool, ready: bool, task: TaskPhase) -> ShardView {
        ShardView {
            released: false,
            has_pod,
            ready,
            task,
        }
    }

    fn view(shards: Vec<ShardView>) -> BatchView {
        let live_pods = shards.iter().filter(|s| s.has_pod).count() as u32;
        BatchView {
            generation: 3,
            pooled: false,
            shards,
            live_pods,
            pool: PoolSituation::Fine,
            policy_degraded: None,
        }
    }

    fn condition<'a>(
        s: &'a BatchSandboxStatus,
        t: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        s.conditions.iter().find(|c| c.type_ == t).expect(t)
    }

    #[test]
    fn spec_task_batch_counts() {
        let s = batch_status(
            &view(vec![shard(true, true, TaskPhase::Succeeded); 3]),
            &Default::default(),
            &now(),
        );
        assert_eq!(
            (
                s.replicas,
                s.allocated,
                s.ready,
                s.task_succeed,
                s.task_running,
                s.task_failed
            ),
            (3, 3, 3, 3, 0, 0)
        );
        assert_eq!(condition(&s, "Ready").status, "True");
        assert_eq!(condition(&s, "Progressing").status, "False");
        assert_eq!(s.observed_generation, 3);
    }

    #[test]
    fn released_shards_are_complete_and_keep_their_result() {
        let mut done = shard(false, false, TaskPhase::Succeeded);
        done.released = true;
        let s = batch_status(
            &view(vec![done, shard(true, true, TaskPhase::Running)]),
            &Default::default(),
            &now(),
        );
        assert_eq!(
            (s.allocated, s.ready, s.task_succeed, s.task_running),
            (1, 1, 1, 1)
        );
        assert_eq!(condition(&s, "Ready").status, "True");
    }

    #[test]
    fn shards_without_a_task_are_not_pending() {
        let s = batch_status(
            &view(vec![shard(true, true, TaskPhase::None); 4]),
            &Default::default(),
            &now(),
        );
        assert_eq!(s.task_pending, 0);
    }

    #[test]
    fn failures_and_exhaustion_show_as_conditions() {
        let mut v = view(vec![
            shard(true, true, TaskPhase::Failed),
            shard(false, false, TaskPhase::Pending),
        ]);
        v.pooled = true;
        v.pool = PoolSituation::Exhausted {
            pool: "p".into(),
            pool_max: 2,
        };
        let s = batch_status(&v, &Default::default(), &now());
        assert_eq!(
            condition(&s, "TaskFailed").message,
            "task failed on shard(s) 0"
        );
        let pending = condition(&s, "PoolAllocationPending");
        assert_eq!(
            (pending.status.as_str(), pending.reason.as_str()),
            ("True", "PoolCapacityExhausted")
        );
        assert!(
            pending.message.contains("poolMax (2)"),
            "{}",
            pending.message
        );
        assert_eq!(condition(&s, "Progressing").reason, "Allocating");
    }

    #[test]
    fn a_rejected_allocation_makes_the_pool_unavailable_with_the_servers_words() {
        let mut v = view(vec![shard(false, false, TaskPhase::None)]);
        v.pooled = true;
        v.pool = PoolSituation::AllocationRejected {
            pool: "p".into(),
            message: "admission webhook \"deny.example.com\" denied the request".into(),
        };
        let s = batch_status(&v, &Default::default(), &now());
        let unavailable = condition(&s, "PoolUnavailable");
        assert_eq!(
            (unavailable.status.as_str(), unavailable.reason.as_str()),
            ("True", "AllocationRejected")
        );
        assert!(
            unavailable.message.contains("Pool \"p\"")
                && unavailable.message.contains("deny.example.com"),
            "{}",
            unavailable.message
        );
        let pending = condition(&s, "PoolAllocationPending");
        assert_eq!(
            (pending.status.as_str(), pending.reason.as_str()),
            ("False", "PoolHasCapacity"),
            "not a matter of capacity"
        );
    }

    #[test]
    fn allocation_problems_are_reported_once_when_they_begin() {
        let mut v = view(vec![shard(false, false, TaskPhase::None)]);
        v.pooled = true;
        let fine = batch_status(&v, &Default::default(), &now());
        assert!(allocation_problems_begun(&Default::default(), &fine).is_empty());

        v.pool = PoolSituation::Exhausted {
            pool: "p".into(),
            pool_max: 2,
        };
        let exhausted = batch_status(&v, &fine, &now());
        let begun = allocation_problems_begun(&fine, &exhausted);
        assert_eq!(begun.len(), 1);
        assert_eq!(
            (begun[0].type_.as_str(), begun[0].reason.as_str()),
            ("PoolAllocationPending", "PoolCapacityExhausted")
        );
        // Still exhausted: nothing new.
        let again = batch_status(&v, &exhausted, &now());
        assert!(allocation_problems_begun(&exhausted, &again).is_empty());

        // The pool goes: a different problem begins, the old one ends.
        v.pool = PoolSituation::Missing { pool: "p".into() };
        let missing = batch_status(&v, &again, &now());
        let begun = allocation_problems_begun(&again, &missing);
        assert_eq!(begun.len(), 1);
        assert_eq!(begun[0].reason, "PoolNotFound");

        // A rejected allocation has an event of its own per rejection.
        v.pool = PoolSituation::AllocationRejected {
            pool: "p".into(),
            message: "denied".into(),
        };
        let rejected = batch_status(&v, &fine, &now());
        assert!(allocation_problems_begun(&fine, &rejected).is_empty());

        // Other conditions turning True are not allocation problems.
        let mut failing = view(vec![shard(true, true, TaskPhase::Failed)]);
        failing.pooled = true;
        let failed = batch_status(&failing, &fine, &now());
        assert!(allocation_problems_begun(&fine, &failed).is_empty());
    }

    proptest! {
        #[test]
        fn counts_are_consistent(spec in prop::collection::vec((any::<bool>(), any::<bool>(), 0usize..6), 0..30)) {
            const PHASES: [TaskPhase; 6] = [TaskPhase::None, TaskPhase::Pending, TaskPhase::Running, TaskPhase::Succeeded, TaskPhase::Failed, TaskPhase::Unknown];
            let shards: Vec<ShardView> = spec.iter().map(|&(p, r, t)| shard(p, r, PHASES[t])).collect();
            let s = batch_status(&view(shards.clone()), &Default::default(), &now());
            prop_assert!(s.ready <= s.allocated && s.allocated <= shards.len() as i32);
            let with_task = shards.iter().filter(|s| s.task != TaskPhase::None).count() as i32;
            prop_assert_eq!(s.task_pending + s.task_running + s.task_succeed + s.task_failed + s.task_unknown, with_task);
            prop_assert_eq!(condition(&s, "Ready").status == "True", s.ready == shards.len() as i32);
        }
    }
}
