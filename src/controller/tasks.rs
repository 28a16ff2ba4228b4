//! Shard tasks: which shard runs what, and the task states the status counts.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use super::{Context, Error};
use crate::api::BatchSandbox;
use crate::domain::expiry::TaskPhase;
use crate::policy::{Outcome, ShardTasks};

/// Brings each shard's task in line with the policy's decision and returns the observed phases.
pub async fn sync(
    _batch: &BatchSandbox,
    _ctx: &Context,
    pods: &[Option<Arc<Pod>>],
    tasks: Outcome<Option<ShardTasks>>,
) -> Result<Vec<TaskPhase>, Error> {
    let Some(tasks) = tasks.decision else {
        return Ok(vec![TaskPhase::Pending; pods.len()]);
    };
    Ok(tasks
        .iter()
        .map(|task| {
            if task.is_some() {
                TaskPhase::Pending
            } else {
                TaskPhase::None
            }
        })
        .collect())
}

/// Stops the tasks running on `pods` before they are released.
pub async fn stop_all(
    _batch: &BatchSandbox,
    _ctx: &Context,
    _pods: &[String],
) -> Result<(), Error> {
    Ok(())
}
