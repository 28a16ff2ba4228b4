//! The decisions the controller delegates to policies: pool sizing, shard-task generation,
//! expiry and pool selection, and the sandboxed WebAssembly host that runs them.
//!
//! Reconcilers ask a [`PolicyEngine`] and apply the answer; they never compute a decision inline.
//! [`NativePolicies`] computes the decisions of `sandbox-decisions` natively (the fail-safe);
//! [`WasmPolicies`] runs every decision in a sandboxed WebAssembly component (the embedded
//! defaults, which are the same functions behind WIT adapters, or a custom policy loaded at
//! runtime by [`PolicyRegistry`]). Each decision kind is described once, in [`kind`].
#![forbid(unsafe_code)]

pub mod bindings;
pub mod cli;
pub mod embedded;
pub mod host;
pub mod kind;
pub mod metrics;
pub mod names;
pub mod registry;
pub mod remembered;
pub mod wasm;

#[cfg(test)]
mod tests;

pub use host::{CallClass, CallError, Limits, LoadError, WasmHost};
pub use kind::DecisionKind;
pub use metrics::{DegradedReason, PolicyMetrics};
pub use registry::{PolicyRegistry, RegistryConfig};
pub use remembered::Remembered;
pub use wasm::{PolicyInput, Source, WasmPolicies};

pub use sandbox_decisions::tasks::{ShardTaskInput, ShardTasks};

use sandbox_decisions::expiry::{BatchSnapshot, ExpiryDecision};
use sandbox_decisions::selection::{SelectionDecision, SelectionInput};
use sandbox_decisions::sizing::{PoolSnapshot, SizingDecision};

/// The four decisions, each a WIT interface with a world of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Decision {
    PoolSizing,
    ShardTasks,
    Expiry,
    PoolSelection,
}

impl Decision {
    pub const ALL: [Decision; 4] = [
        Decision::PoolSizing,
        Decision::ShardTasks,
        Decision::Expiry,
        Decision::PoolSelection,
    ];

    /// The interface name, also the suffix of the selecting annotation.
    pub fn name(self) -> &'static str {
        match self {
            Decision::PoolSizing => "pool-sizing",
            Decision::ShardTasks => "shard-tasks",
            Decision::Expiry => "expiry",
            Decision::PoolSelection => "pool-selection",
        }
    }

    /// The WIT world a component implements to make this decision.
    pub fn world(self) -> &'static str {
        match self {
            Decision::PoolSizing => "pool-sizing-policy",
            Decision::ShardTasks => "shard-tasks-policy",
            Decision::Expiry => "expiry-policy",
            Decision::PoolSelection => "pool-selection-policy",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == name || d.world() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One value per [`Decision`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PerDecision<T>([T; Decision::ALL.len()]);

impl<T> PerDecision<T> {
    /// A value for each decision, made by `make`.
    pub fn from_fn(mut make: impl FnMut(Decision) -> T) -> Self {
        Self(Decision::ALL.map(&mut make))
    }

    /// Like [`PerDecision::from_fn`], stopping at the first error.
    pub fn try_from_fn<E>(mut make: impl FnMut(Decision) -> Result<T, E>) -> Result<Self, E> {
        let mut values = Vec::with_capacity(Decision::ALL.len());
        for decision in Decision::ALL {
            values.push(make(decision)?);
        }
        match values.try_into() {
            Ok(values) => Ok(Self(values)),
            Err(_) => unreachable!("one value was made per decision"),
        }
    }
}

impl<T> std::ops::Index<Decision> for PerDecision<T> {
    type Output = T;

    fn index(&self, decision: Decision) -> &T {
        &self.0[decision.index()]
    }
}

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
    /// Which pool a BatchSandbox with `poolRef: "*"` takes; `decision.pool == None`: none fits now.
    fn pool_selection(
        &self,
        selector: PolicySelector<'_>,
        input: &SelectionInput,
    ) -> Outcome<SelectionDecision>;

    /// Whether a custom policy of this name is loaded or being loaded (for admission checks of
    /// the `policy.sandbox.opensandbox.io/*` annotations). Engines without custom policies know none.
    fn is_known(&self, _name: &str) -> bool {
        false
    }

    /// Ticks whenever a custom policy is loaded, fails to load or is removed, so the controller
    /// can re-decide for every object at once instead of at its next resync.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// The decisions of `sandbox-decisions`, computed natively: the engine that cannot fail.
#[derive(Clone, Copy, Debug, Default)]
pub struct NativePolicies;

impl PolicyEngine for NativePolicies {
    fn pool_sizing(&self, _: PolicySelector<'_>, pool: &PoolSnapshot) -> Outcome<SizingDecision> {
        Outcome::ok(kind::PoolSizing::native(pool))
    }

    fn shard_tasks(
        &self,
        _: PolicySelector<'_>,
        batch: &ShardTaskInput,
    ) -> Outcome<Option<ShardTasks>> {
        Outcome::ok(kind::ShardTasksKind::native(batch))
    }

    fn expiry(&self, _: PolicySelector<'_>, batch: &BatchSnapshot) -> Outcome<ExpiryDecision> {
        Outcome::ok(kind::Expiry::native(batch))
    }

    fn pool_selection(
        &self,
        _: PolicySelector<'_>,
        input: &SelectionInput,
    ) -> Outcome<SelectionDecision> {
        Outcome::ok(kind::PoolSelection::native(input))
    }
}
