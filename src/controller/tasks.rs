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

use super::cached_pod::CachedPod;
use super::sidecar::has_injected_executor;
use super::{Context, Error};
use sandbox_decisions::tasks::TaskPhase;
use sandbox_domain::api::{BatchSandbox, TaskSpec};
use sandbox_domain::pods;
pub use sandbox_domain::recycle::StopOutcome;
use sandbox_executor::ExecutorError;
use sandbox_executor::PodRef;
use sandbox_executor::wire::Task;
use sandbox_policy::{Outcome, ShardTasks};

/// What task sync saw.
pub struct TaskReport {
    /// Phase per shard (`None` for shards without a task).
    pub phases: Vec<TaskPhase>,
    /// Per shard: whether the executor's answer confirmed that every process of every task on
    /// the shard's pod has ended (what a finished shard's pod needs to go back to a pool under
    /// `Restart`).
    pub all_ended: Vec<bool>,
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
    pods: &[Option<Arc<CachedPod>>],
    released: &sandbox_domain::released::Released,
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
            all_ended: vec![false; pods.len()],
            degraded,
            recheck: Some(Duration::from_secs(5)),
        });
    };
    let shard_phases = pods.iter().enumerate().map(|(index, pod)| {
        let task = tasks.get(index).cloned().flatten();
        async move {
            if let Some(phase) = released.phase(index) {
                return (phase, false);
            }
            match (task, pod) {
                (None, _) => (TaskPhase::None, false),
                (Some(_), None) => (TaskPhase::Pending, false),
                (Some(spec), Some(pod)) => dispatch(batch, ctx, index, &spec, pod).await,
            }
        }
    });
    let (phases, all_ended): (Vec<TaskPhase>, Vec<bool>) =
        join_all(shard_phases).await.into_iter().unzip();
    let recheck = ctx
        .task_polls
        .next_poll(&batch.uid().unwrap_or_default(), &phases);
    Ok(TaskReport {
        phases,
        all_ended,
        degraded,
        recheck,
    })
}

/// Sets the shard's task on its pod; returns the task's phase and whether every task the
/// executor lists has ended with all its processes.
async fn dispatch(
    batch: &BatchSandbox,
    ctx: &Context,
    index: usize,
    spec: &TaskSpec,
    pod: &Pod,
) -> (TaskPhase, bool) {
    let Some(ip) = pods::pod_ip(pod).filter(|_| pods::is_running_and_ready(pod)) else {
        return (TaskPhase::Pending, false);
    };
    if !has_injected_executor(pod) {
        // Without an executor the task can never run; say so instead of waiting silently.
        ctx.event(batch, EventType::Warning, "NoTaskExecutor", format!("shard {index}: pod {} has no task-executor injected by the controller; see --pool-executor-injection", pods::pod_name(pod))).await;
        return (TaskPhase::Unknown, false);
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
            return (TaskPhase::Failed, false);
        }
    };
    let target = PodRef {
        ip,
        uid: pod.metadata.uid.as_deref().unwrap_or_default(),
    };
    match ctx.executor.set_tasks(target, &[task]).await {
        Ok(list) => {
            let phase = list
                .iter()
                .find(|t| t.name == name)
                .map_or(TaskPhase::Pending, Task::phase);
            (phase, list.iter().all(Task::all_processes_ended))
        }
        Err(error) => {
            debug!(%error, shard = index, "executor not reachable; task state unknown");
            (TaskPhase::Unknown, false)
        }
    }
}

/// Stops every task on each of `pods` (an empty task list) and says, per pod, whether the
/// executor confirmed that every process of every task has ended. Only that positive answer
/// counts as clean: a pod without an executor or an IP, an executor that cannot be reached,
/// refuses us or answers nonsense, all leave it unconfirmed (deleting the pod still ends
/// everything in it).
pub async fn stop(ctx: &Context, pods: &[Arc<CachedPod>]) -> Vec<StopOutcome> {
    let stops = pods.iter().map(|pod| async move {
        if !has_injected_executor(pod) {
            return StopOutcome::Unconfirmed("the pod has no task executor".into());
        }
        let Some(ip) = pods::pod_ip(pod) else {
            return StopOutcome::Unconfirmed("the pod has no IP to reach its task executor".into());
        };
        let target = PodRef {
            ip,
            uid: pod.metadata.uid.as_deref().unwrap_or_default(),
        };
        let outcome = classify_stop(ctx.executor.set_tasks(target, &[]).await);
        if let StopOutcome::Unconfirmed(why) = &outcome {
            warn!(pod = pods::pod_name(pod), reason = %why, "cannot confirm the pod's tasks ended");
        }
        outcome
    });
    join_all(stops).await
}

/// Whether any pod still has tasks stopping.
pub fn still_stopping(outcomes: &[StopOutcome]) -> bool {
    outcomes.contains(&StopOutcome::Stopping)
}

/// Reads an executor's answer to `POST /setTasks []`. The executor drops a task from its list
/// only once the task's processes are all confirmed ended, so an empty list (or one whose every
/// task carries `allProcessesEnded`) is the confirmation; a task still running means stopping;
/// a terminated task without the confirmation, or any failure to get an answer, is not
/// confirmed.
pub fn classify_stop(answer: Result<Vec<Task>, ExecutorError>) -> StopOutcome {
    let tasks = match answer {
        Ok(tasks) => tasks,
        Err(error) => return StopOutcome::Unconfirmed(error.to_string()),
    };
    if tasks.iter().all(Task::all_processes_ended) {
        return StopOutcome::Confirmed;
    }
    if tasks.iter().any(|t| !t.is_terminated()) {
        return StopOutcome::Stopping;
    }
    let unconfirmed: Vec<String> = tasks
        .iter()
        .filter(|t| !t.all_processes_ended())
        .map(|t| {
            let reason = t
                .process_status
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map(|t| t.reason.as_str())
                .unwrap_or_default();
            format!("{} ({reason})", t.name)
        })
        .collect();
    StopOutcome::Unconfirmed(format!(
        "the executor cannot confirm that every process of task(s) {} ended",
        unconfirmed.join(", ")
    ))
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
    use sandbox_executor::wire::{
        Process, ProcessStatus, REASON_LOST, REASON_STOPPED, Running, Terminated,
    };

    fn endpoint() -> std::net::SocketAddr {
        "127.0.0.1:5758".parse().unwrap()
    }

    fn task(name: &str, status: Option<ProcessStatus>) -> Task {
        Task {
            name: name.into(),
            process: Some(Process {
                command: vec!["sleep".into()],
                ..Process::default()
            }),
            process_status: status,
            ..Task::default()
        }
    }

    fn terminated(reason: &str, all_processes_ended: bool) -> Option<ProcessStatus> {
        Some(ProcessStatus {
            terminated: Some(Terminated {
                exit_code: 143,
                reason: reason.into(),
                all_processes_ended,
                ..Terminated::default()
            }),
            ..ProcessStatus::default()
        })
    }

    #[test]
    fn only_a_positive_answer_confirms_a_stop() {
        assert_eq!(classify_stop(Ok(vec![])), StopOutcome::Confirmed);
        assert_eq!(
            classify_stop(Ok(vec![task("a", terminated(REASON_STOPPED, true))])),
            StopOutcome::Confirmed
        );
        let running = Some(ProcessStatus {
            running: Some(Running { started_at: None }),
            ..ProcessStatus::default()
        });
        assert_eq!(
            classify_stop(Ok(vec![
                task("a", running),
                task("b", terminated(REASON_LOST, false))
            ])),
            StopOutcome::Stopping
        );
        assert_eq!(
            classify_stop(Ok(vec![task("a", None)])),
            StopOutcome::Stopping
        );
        let StopOutcome::Unconfirmed(why) =
            classify_stop(Ok(vec![task("a", terminated(REASON_LOST, false))]))
        else {
            panic!("a terminated task without confirmation is not clean");
        };
        assert!(why.contains("a (Lost)"), "{why}");
    }

    #[test]
    fn failures_to_get_an_answer_are_never_confirmation() {
        let failures = [
            ExecutorError::Timeout {
                endpoint: endpoint(),
                after: Duration::from_secs(3),
            },
            ExecutorError::Unauthorized {
                endpoint: endpoint(),
                message: "bad token".into(),
            },
            ExecutorError::Status {
                endpoint: endpoint(),
                status: 503,
                message: "overloaded".into(),
            },
            ExecutorError::BadResponse {
                endpoint: endpoint(),
                reason: "expected a JSON array".into(),
            },
            ExecutorError::InvalidAddress("not-an-ip".into()),
        ];
        for failure in failures {
            let text = failure.to_string();
            assert_eq!(
                classify_stop(Err(failure)),
                StopOutcome::Unconfirmed(text.clone()),
                "{text}"
            );
        }
    }

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
