//! The process-task shape shared by `taskTemplate` and each entry of `shardTaskPatches`. The types
//! live with the shard-task decision that merges them.

pub use sandbox_decisions::tasks::{EnvVar, ProcessTask, TaskSpec, TaskTemplateSpec};
