//! The process-task shape shared by `taskTemplate` and each entry of `shardTaskPatches`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A task to run inside a sandbox once it is ready.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct TaskTemplateSpec {
    /// What the task runs and for how long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<TaskSpec>,
}

/// The task's process and its time limit.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSpec {
    /// The process to run in the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessTask>,
    /// Longest run time in seconds. At the limit the task executor sends SIGTERM, then SIGKILL
    /// after a grace period. Unset means no limit. Must be greater than 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
}

/// A process started directly (never through a shell), so arguments are passed literally.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessTask {
    /// The executable and any leading arguments. Required after `taskTemplate` and this shard's
    /// patch are merged; a shard patch that sets it replaces the template's command whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Arguments after the command. A shard patch that sets them replaces the template's list whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Environment variables. A shard patch merges with the template's list by `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
    /// Working directory of the process. Defaults to the task executor's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

/// One environment variable of a task.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct EnvVar {
    /// Variable name: letters, digits, `_`, `-` and `.`, not starting with a digit.
    pub name: String,
    /// Variable value. Empty when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}
