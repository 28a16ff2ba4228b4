//! The three decisions the controller delegates: pool sizing, shard-task generation and expiry.
//!
//! Reconcilers ask a [`PolicyEngine`] and apply the answer; they never compute a decision inline.
//! [`NativePolicies`] is the built-in implementation and the reference the WebAssembly defaults
//! are proven against; [`WasmPolicies`] runs every decision in a sandboxed WebAssembly component
//! (the embedded defaults, or a custom policy loaded at runtime by [`PolicyRegistry`]).

pub mod bindings;
pub mod builtin;
pub mod cli;
pub mod host;
pub mod metrics;
pub mod registry;
pub mod validate;
pub mod wasm;

#[cfg(test)]
mod tests;

pub use host::{CallError, Decision, Limits, LoadError, WasmHost};
pub use registry::{PolicyRegistry, RegistryConfig};
pub use wasm::{PolicyInput, Source, WasmPolicies};

use crate::api::{TaskSpec, TaskTemplateSpec};
use crate::domain::expiry::{self, BatchSnapshot, ExpiryDecision};
use crate::domain::sizing::{self, PoolSnapshot, SizingDecision};
use crate::domain::tasks;

/// What shard-task generation sees of a batch.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardTaskInput {
    pub batch_name: String,
    pub replicas: u32,
    pub task_template: Option<TaskTemplateSpec>,
    pub shard_patches: Vec<TaskTemplateSpec>,
}

/// The tasks of a batch, one slot per shard (`None`: that shard runs no task).
pub type ShardTasks = Vec<Option<TaskSpec>>;

/// Which policy an object selected for one decision (`None`: the default).
pub type PolicySelector<'a> = Option<&'a str>;

/// A decision and, when the selected policy failed and a fallback was used, why.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome<T> {
    pub decision: T,
    /// Set when the decision is a fallback: the reason goes into a `PolicyDegraded` condition
    /// and a Warning event.
    pub degraded: Option<String>,
}

impl<T> Outcome<T> {
    pub fn ok(decision: T) -> Self {
        Self {
            decision,
            degraded: None,
        }
    }
}

/// Decides for the reconcilers. Implementations must never panic and always return a decision
/// within the spec's bounds; calls may block briefly, so async callers run them on a blocking thread.
pub trait PolicyEngine: Send + Sync + 'static {
    fn pool_sizing(
        &self,
        selector: PolicySelector<'_>,
        pool: &PoolSnapshot,
    ) -> Outcome<SizingDecision>;
    /// `decision == None` means "dispatch nothing for now and retry with backoff".
    fn shard_tasks(
        &self,
        selector: PolicySelector<'_>,
        batch: &ShardTaskInput,
    ) -> Outcome<Option<ShardTasks>>;
    fn expiry(
        &self,
        selector: PolicySelector<'_>,
        batch: &BatchSnapshot,
    ) -> Outcome<ExpiryDecision>;

    /// Whether a custom policy of this name is loaded or being loaded (for admission checks of
    /// the `policy.sandbox.opensandbox.io/*` annotations). Engines without custom policies know none.
    fn is_known(&self, _name: &str) -> bool {
        false
    }

    /// Counters in the Prometheus text format, for `/metrics`.
    fn metrics_text(&self) -> String {
        String::new()
    }

    /// Ticks whenever a custom policy is loaded, fails to load or is removed, so the controller
    /// can re-decide for every object at once instead of at its next resync.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// The built-in decisions, computed in Rust.
#[derive(Clone, Copy, Debug, Default)]
pub struct NativePolicies;

impl NativePolicies {
    pub fn shard_tasks_of(batch: &ShardTaskInput) -> ShardTasks {
        tasks::shard_tasks(
            batch.replicas as usize,
            batch.task_template.as_ref(),
            &batch.shard_patches,
        )
    }
}

impl PolicyEngine for NativePolicies {
    fn pool_sizing(&self, _: PolicySelector<'_>, pool: &PoolSnapshot) -> Outcome<SizingDecision> {
        Outcome::ok(sizing::buffer_sizing(pool))
    }

    fn shard_tasks(
        &self,
        _: PolicySelector<'_>,
        batch: &ShardTaskInput,
    ) -> Outcome<Option<ShardTasks>> {
        Outcome::ok(Some(Self::shard_tasks_of(batch)))
    }

    fn expiry(&self, _: PolicySelector<'_>, batch: &BatchSnapshot) -> Outcome<ExpiryDecision> {
        Outcome::ok(expiry::at_expire_time(batch))
    }
}
