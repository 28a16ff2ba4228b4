//! Shard tasks: dispatch to each shard's own pod, observe their states, stop them before pods
//! go, and release finished shards under `taskResourcePolicyWhenCompleted: Release`.
//!
//! The executor in each pod holds exactly one task, that of the shard the pod serves, so setting
//! a pod's task list to `[task of shard i]` is idempotent and also stops anything a previous
//! holder of a reused pool pod left behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::{debug, warn};

use super::sidecar::has_injected_executor;
use super::{Context, Error};
use crate::api::{BatchSandbox, TaskSpec};
use crate::domain::pods;
use sandbox_decisions::tasks::TaskPhase;
use sandbox_executor::PodRef;
use sandbox_executor::wire::Task;
use sandbox_policy::{Outcome, ShardTasks};

/// What task sync saw.
pub struct TaskReport {
    /// Phase per shard (`None` for shards without a task).
    pub phases: Vec<TaskPhase>,
    /// Set when the shard-task policy fell back.
    pub degraded: Option<String>,
    /// When to look again while tasks are active.
    pub recheck: Option<Duration>,
}

/// The executor task name of shard `index`: unique per batch object, so a reused pool pod never
/// mistakes an old batch's task for its own.
pub fn task_name(batch: &BatchSandbox, index: usize) -> String {
    let uid = batch.uid().unwrap_or_default();
    format!("{}-{}-{index}", batch.name_any(), &uid[..uid.len().min(8)])
}

/// Dispatches each shard's task to its pod (as soon as the pod is Ready) and reads back phases.
pub async fn sync(
    batch: &BatchSandbox,
    ctx: &Context,
    pods: &[Option<Arc<Pod>>],
    released: &crate::domain::released::Released,
    tasks: Outcome<Option<ShardTasks>>,
) -> Result<TaskReport, Error> {
    let Outcome { decision, degraded } = tasks;
    let Some(tasks) = decision else {
        // The policy failed: dispatch nothing, look again with backoff.
        let phases = pods
            .iter()
            .enumerate()
            .map(|(i, _)| released.phase(i).unwrap_or(TaskPhase::Pending))
            .collect();
        return Ok(TaskReport {
            phases,
            degraded,
            recheck: Some(Duration::from_secs(5)),
        });
    };
    let shard_phases = pods.iter().enumerate().map(|(index, pod)| {
        let task = tasks.get(index).cloned().flatten();
        async move {
            if let Some(phase) = released.phase(index) {
                return phase;
            }
            match (task, pod) {
                (None, _) => TaskPhase::None,
                (Some(_), None) => TaskPhase::Pending,
                (Some(spec), Some(pod)) => dispatch(batch, ctx, index, &spec, pod).await,
            }
        }
    });
    let phases: Vec<TaskPhase> = join_all(shard_phases).await;
    let recheck = ctx
        .task_polls
        .next_poll(&batch.uid().unwrap_or_default(), &phases);
    Ok(TaskReport {
        phases,
        degraded,
        recheck,
    })
}

async fn dispatch(
    batch: &BatchSandbox,
    ctx: &Context,
    index: usize,
    spec: &TaskSpec,
    pod: &Pod,
) -> TaskPhase {
    let Some(ip) = pods::pod_ip(pod).filter(|_| pods::is_running_and_ready(pod)) else {
        return TaskPhase::Pending;
    };
    if !has_injected_executor(pod) {
        // Without an executor the task can never run; say so instead of waiting silently. An
        // executor the controller did not inject is never sent a request.
        ctx.event(batch, EventType::Warning, "NoTaskExecutor", format!("shard {index}: pod {} has no task-executor injected by the controller; see --pool-executor-injection", pods::pod_name(pod))).await;
        return TaskPhase::Unknown;
    }
    let name = task_name(batch, index);
    let task = match Task::from_spec(&name, spec) {
        Ok(task) => task,
        Err(error) => {
            ctx.event(
                batch,
                EventType::Warning,
                "InvalidTask",
                format!("shard {index}: {error}"),
            )
            .await;
            return TaskPhase::Failed;
        }
    };
    let target = PodRef {
        ip,
        uid: pod.metadata.uid.as_deref().unwrap_or_default(),
    };
    match ctx.executor.set_tasks(target, &[task]).await {
        Ok(list) => list
            .iter()
            .find(|t| t.name == name)
            .map_or(TaskPhase::Pending, Task::phase),
        Err(error) => {
            debug!(%error, shard = index, "executor not reachable; task state unknown");
            TaskPhase::Unknown
        }
    }
}

/// Stops every task on `pods` (an empty task list) and reports whether all have terminated.
/// Pods without an executor, or whose executor cannot be reached, have nothing this controller
/// can stop gracefully; deleting the pod stops them.
pub async fn stop(ctx: &Context, pods: &[Arc<Pod>]) -> bool {
    let stops = pods.iter().filter(|p| has_injected_executor(p)).filter_map(|p| pods::pod_ip(p).map(|ip| (p, ip))).map(|(pod, ip)| async move {
        let target = PodRef { ip, uid: pod.metadata.uid.as_deref().unwrap_or_default() };
        match ctx.executor.set_tasks(target, &[]).await {
            Ok(remaining) => remaining.is_empty(),
            Err(error) => {
                warn!(%error, pod = pods::pod_name(pod), "cannot reach the executor to stop tasks; the pod's deletion stops them");
                true
            }
        }
    });
    join_all(stops).await.into_iter().all(|stopped| stopped)
}

/// Adaptive polling of task states while tasks are active: quick after a change, slower while
/// nothing moves (250 ms doubling to 5 s), none once every task is settled.
#[derive(Default)]
pub struct TaskPolls {
    inner: Mutex<HashMap<String, PollState>>,
}

/// Last phases seen, the current interval, and when.
type PollState = (Vec<TaskPhase>, Duration, Instant);

const FIRST_POLL: Duration = Duration::from_millis(250);
const SLOWEST_POLL: Duration = Duration::from_secs(5);

impl TaskPolls {
    fn next_poll(&self, uid: &str, phases: &[TaskPhase]) -> Option<Duration> {
        let active = phases.iter().any(|p| {
            matches!(
                p,
                TaskPhase::Pending | TaskPhase::Running | TaskPhase::Unknown
            )
        });
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.retain(|_, (_, _, at)| at.elapsed() < Duration::from_secs(600));
        if !active {
            inner.remove(uid);
            return None;
        }
        let interval = match inner.get(uid) {
            Some((last, interval, _)) if last == phases => (*interval * 2).min(SLOWEST_POLL),
            _ => FIRST_POLL,
        };
        inner.insert(uid.to_string(), (phases.to_vec(), interval, Instant::now()));
        Some(interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_backs_off_while_nothing_changes_and_stops_when_settled() {
        let polls = TaskPolls::default();
        let running = [TaskPhase::Running];
        assert_eq!(polls.next_poll("u", &running), Some(FIRST_POLL));
        assert_eq!(polls.next_poll("u", &running), Some(FIRST_POLL * 2));
        assert_eq!(
            polls.next_poll("u", &[TaskPhase::Failed, TaskPhase::Running]),
            Some(FIRST_POLL)
        );
        for _ in 0..10 {
            polls.next_poll("u", &[TaskPhase::Failed, TaskPhase::Running]);
        }
        assert_eq!(
            polls.next_poll("u", &[TaskPhase::Failed, TaskPhase::Running]),
            Some(SLOWEST_POLL)
        );
        assert_eq!(polls.next_poll("u", &[TaskPhase::Succeeded]), None);
    }
}
