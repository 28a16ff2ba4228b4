//! `BatchSandbox`: N identical sandboxes, from a pod template or from a warm Pool.
// kube's derive takes one `printcolumn(...)` per column; clippy reads the repeats as duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::task::TaskTemplateSpec;

/// The desired state of a BatchSandbox. Set `template` (non-pooled), `poolRef` (pooled), or
/// `poolRef: "*"` with `template` (pooled from a Pool the controller chooses to fit the template).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "sandbox.opensandbox.io",
    version = "v1alpha1",
    kind = "BatchSandbox",
    namespaced,
    shortname = "bsbx",
    status = "BatchSandboxStatus",
    doc = "BatchSandbox delivers a number of identical sandboxes, either created from its own pod template or allocated from a Pool of pre-warmed pods, optionally running one process task per sandbox.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas"
    ),
    printcolumn(
        name = "DESIRED",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "The desired number of sandboxes."
    ),
    printcolumn(
        name = "TOTAL",
        type_ = "integer",
        json_path = ".status.replicas",
        description = "The number of sandbox pods that exist."
    ),
    printcolumn(
        name = "ALLOCATED",
        type_ = "integer",
        json_path = ".status.allocated",
        description = "The number of sandboxes bound to a pod."
    ),
    printcolumn(
        name = "READY",
        type_ = "integer",
        json_path = ".status.ready",
        description = "The number of sandboxes whose pod is ready."
    ),
    printcolumn(
        name = "TASK_RUNNING",
        type_ = "integer",
        json_path = ".status.taskRunning",
        priority = 1,
        description = "The number of running tasks."
    ),
    printcolumn(
        name = "TASK_SUCCEED",
        type_ = "integer",
        json_path = ".status.taskSucceed",
        priority = 1,
        description = "The number of tasks that exited 0."
    ),
    printcolumn(
        name = "TASK_FAILED",
        type_ = "integer",
        json_path = ".status.taskFailed",
        priority = 1,
        description = "The number of tasks that failed or timed out."
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.template) || has(self.poolRef)", "message": "one of spec.template and spec.poolRef must be set"},
    {"rule": "!has(self.poolRef) || self.poolRef != '*' || has(self.template)", "message": "spec.poolRef \"*\" needs spec.template: the controller chooses a Pool whose pods fit it"},
    {"rule": "!has(self.template) || !has(self.poolRef) || self.poolRef == '*' || (oldSelf.hasValue() && has(oldSelf.value().template) && has(oldSelf.value().poolRef) && (oldSelf.value().poolRef == '*' || oldSelf.value().poolRef == self.poolRef))", "optionalOldSelf": true, "message": "spec.template cannot be set together with a named spec.poolRef (only a Pool the controller chose for spec.poolRef \"*\" keeps the template): set exactly one of them"},
    {"rule": "!has(self.poolRef) || !has(self.shardPatches) || size(self.shardPatches) == 0", "message": "spec.shardPatches applies to non-pooled batches only; a pooled batch cannot set it"},
]))]
pub struct BatchSandboxSpec {
    /// Number of sandboxes. Scaling down removes the highest shard indices first.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,

    /// Name of a Pool in the same namespace to allocate pre-warmed pods from, and immutable once
    /// set. `"*"` (which needs `template`) lets the controller choose: the least allocated Pool
    /// whose pods run the template's images, request at least its resources and match its node
    /// selector; the controller then writes the chosen name here, the one change allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf || oldSelf == '*'", "message": "spec.poolRef is immutable (except that \"*\" is replaced by the Pool chosen for it)"}]))]
    pub pool_ref: Option<String>,

    /// Pod template for non-pooled sandboxes: one pod `<name>-<index>` is created per shard.
    /// With `poolRef: "*"`, what the chosen Pool's pods must fit instead (no pods are created from
    /// it). Mutually exclusive with a named `poolRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PodTemplateSpec>,

    /// Per-shard strategic merge patches of `template`: entry i patches the pod of shard i.
    /// Non-pooled batches only; at most `replicas` entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::pod_template_patches")]
    pub shard_patches: Vec<serde_json::Value>,

    /// Absolute time (RFC 3339) at which the batch is deleted: pooled pods go back to their pool,
    /// non-pooled pods are deleted. Unset means the batch never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_time: Option<Time>,

    /// Task run in every sandbox once it is ready. Shard i runs this template merged with
    /// `shardTaskPatches[i]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_template: Option<TaskTemplateSpec>,

    /// Per-shard patches of `taskTemplate`: entry i applies to shard i. Scalars and the command and
    /// args lists replace the template's; env merges by name. A shard with neither a template nor a
    /// patch runs no task. At most `replicas` entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shard_task_patches: Vec<TaskTemplateSpec>,

    /// What happens to a sandbox once its task has finished (succeeded or failed): `Retain` keeps
    /// it until the batch is deleted; `Release` frees it at once (back to the pool, or deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_resource_policy_when_completed: Option<TaskResourcePolicy>,

    /// OpenSandbox's pause/resume switch (`true` pauses the sandboxes into image snapshots,
    /// `false` resumes them). Not supported by this controller, which takes no snapshots:
    /// `true` is refused at admission; `false` and unset mean the same, running sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "!self", "message": "pause/resume is not supported by this controller (it takes no image snapshots); leave spec.pause unset or false"}]))]
    pub pause: Option<bool>,
}

fn default_replicas() -> i32 {
    1
}

/// What to do with a sandbox whose task has completed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TaskResourcePolicy {
    /// Keep the sandbox until the batch is deleted.
    #[default]
    Retain,
    /// Release the sandbox as soon as its task completes.
    Release,
}

/// The observed state of a BatchSandbox, derived from the pods and tasks the controller sees.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchSandboxStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default)]
    pub observed_generation: i64,
    /// Number of sandbox pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Number of shards bound to a pod (for pooled batches: pods allocated from the pool).
    #[serde(default)]
    pub allocated: i32,
    /// Number of shards whose pod is Running and Ready.
    #[serde(default)]
    pub ready: i32,
    /// Number of shards with a task that has not started yet.
    #[serde(default)]
    pub task_pending: i32,
    /// Number of shards whose task is running.
    #[serde(default)]
    pub task_running: i32,
    /// Number of shards whose task exited 0.
    #[serde(default)]
    pub task_succeed: i32,
    /// Number of shards whose task exited non-zero, was killed or timed out.
    #[serde(default)]
    pub task_failed: i32,
    /// Number of shards whose task state cannot be read (for example, the executor is unreachable).
    #[serde(default)]
    pub task_unknown: i32,
    /// Conditions: Ready, Progressing, PoolAllocationPending (the pool is at `poolMax` with no idle
    /// pod), PoolUnavailable, TaskFailed, PolicyDegraded, and PoolSelectionPending while a
    /// `poolRef: "*"` batch waits for a Pool that fits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::schema::conditions")]
    pub conditions: Vec<Condition>,
    /// OpenSandbox's lifecycle phase (`Pending`, `Succeed`, `Pausing`, `Paused`, `Resuming`,
    /// `Failed`), which its controller sets only on its pause/resume path. This controller does
    /// not pause, so it leaves the field unset; read the conditions instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BatchSandboxPhase>,
    /// The `metadata.generation` whose `spec.pause` was last acted on (OpenSandbox's pause/resume
    /// bookkeeping). Unset here, since pause is not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_observed_generation: Option<i64>,
}

/// OpenSandbox's BatchSandbox lifecycle phases.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BatchSandboxPhase {
    /// Sandboxes are being created or allocated.
    Pending,
    /// At least one sandbox is available.
    Succeed,
    /// A pause is in progress.
    Pausing,
    /// The sandboxes are paused into snapshots.
    Paused,
    /// A resume is in progress.
    Resuming,
    /// Pause or resume failed.
    Failed,
}

impl BatchSandbox {
    /// The Pool this batch allocates from, if it is pooled and its Pool is known (not `"*"`).
    pub fn pool_name(&self) -> Option<&str> {
        self.spec
            .pool_ref
            .as_deref()
            .filter(|pool| *pool != super::names::ANY_POOL)
    }

    /// Whether the batch waits for the controller to choose its Pool (`poolRef: "*"`).
    pub fn awaits_pool_selection(&self) -> bool {
        self.spec.pool_ref.as_deref() == Some(super::names::ANY_POOL)
    }

    /// Desired shard count; a negative value (rejected at admission) counts as zero.
    pub fn desired_replicas(&self) -> usize {
        usize::try_from(self.spec.replicas).unwrap_or(0)
    }
}
