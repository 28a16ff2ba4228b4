//! Each decision kind, written once: its WIT world, its input and output, how the host calls a
//! guest for it, what its answer must satisfy, its fail-safe, and its native implementation.
//! The host and the engine are generic over [`DecisionKind`]; nothing else matches on decisions.

use sandbox_decisions::expiry::{self, BatchSnapshot, ExpiryDecision};
use sandbox_decisions::selection::{self, SelectionDecision, SelectionInput};
use sandbox_decisions::sizing::{self, PoolSnapshot, SizingDecision};
use sandbox_decisions::tasks::{self, ShardTaskInput, ShardTasks};
use sandbox_decisions::{Bridge, PolicyError, checks};
use wasmtime::Store;
use wasmtime::component::InstancePre;

use crate::Decision;
use crate::bindings::{
    expiry as expiry_wit, selection as selection_wit, shard, sizing as sizing_wit,
};
use crate::host::{CallState, Exports};

/// The result of calling into a guest: a wasmtime error (trap, limit) or the guest's own answer.
pub type GuestResult<T> = wasmtime::Result<Result<T, PolicyError>>;

/// One decision kind. Implemented by the marker types [`PoolSizing`], [`ShardTasksKind`],
/// [`Expiry`] and [`PoolSelection`].
pub trait DecisionKind: 'static {
    /// Which decision this is.
    const DECISION: Decision;
    /// What the decision sees.
    type Input: Send + Sync;
    /// What the engine returns for it (for shard tasks, `None` means "dispatch nothing now").
    type Output: Send;
    /// The typed pre-instance of this kind's world.
    type Pre: Clone + Send + Sync + 'static;

    /// Type-checks a component against this kind's world.
    fn pre(instance: InstancePre<CallState>) -> wasmtime::Result<Self::Pre>;
    /// This kind's pre-instance of a compiled component, if it implements the world.
    fn pre_of(exports: &Exports) -> Option<&Self::Pre>;
    /// Calls `validate-settings` in a fresh instance.
    fn validate_settings(
        pre: &Self::Pre,
        store: &mut Store<CallState>,
        settings: &str,
    ) -> GuestResult<()>;
    /// Calls `decide` in a fresh instance.
    fn call(
        pre: &Self::Pre,
        store: &mut Store<CallState>,
        settings: &str,
        input: &Self::Input,
    ) -> GuestResult<Self::Output>;
    /// What an answer must satisfy before the controller acts on it.
    fn check(input: &Self::Input, output: &Self::Output) -> Result<(), String>;
    /// The fail-safe answer, and what it does (for the degraded reason).
    fn fallback(input: &Self::Input) -> (Self::Output, String);
    /// The decision computed natively, the fail-safe engine.
    fn native(input: &Self::Input) -> Self::Output;
}

/// Lowers an input through an owned copy converted by the shared bridges.
fn with_bridged<I: Clone + Bridge<W>, W, R>(input: &I, call: impl FnOnce(&W) -> R) -> R {
    call(&input.clone().bridge())
}

/// `validate_settings` and `call` of a [`DecisionKind`]: instantiate, call the interface's export
/// with the input `$with_input` lowers (through [`with_bridged`], or from borrowed values), convert
/// the answer with the shared bridges. `$accept` turns the guest's decision into the kind's output.
macro_rules! guest_calls {
    ($interface:ident, $with_input:expr) => {
        guest_calls!($interface, $with_input, |answer| answer);
    };
    ($interface:ident, $with_input:expr, |$answer:ident| $accept:expr) => {
        fn validate_settings(
            pre: &Self::Pre,
            store: &mut Store<CallState>,
            settings: &str,
        ) -> GuestResult<()> {
            let instance = pre.instantiate(&mut *store)?;
            let answer = instance
                .$interface()
                .call_validate_settings(store, settings)?;
            Ok(answer.map_err(Bridge::bridge))
        }

        fn call(
            pre: &Self::Pre,
            store: &mut Store<CallState>,
            settings: &str,
            input: &Self::Input,
        ) -> GuestResult<Self::Output> {
            let instance = pre.instantiate(&mut *store)?;
            let answer = $with_input(input, |input| {
                instance.$interface().call_decide(store, settings, input)
            })?;
            Ok(answer.bridge().map(|$answer| $accept))
        }
    };
}

/// How many pods a Pool should hold.
pub enum PoolSizing {}

/// The task each shard of a BatchSandbox runs.
pub enum ShardTasksKind {}

/// Whether a BatchSandbox has reached its end.
pub enum Expiry {}

/// Which Pool a BatchSandbox with `poolRef: "*"` takes its pods from.
pub enum PoolSelection {}

impl DecisionKind for PoolSizing {
    const DECISION: Decision = Decision::PoolSizing;
    type Input = PoolSnapshot;
    type Output = SizingDecision;
    type Pre = sizing_wit::PoolSizingPolicyPre<CallState>;

    fn pre(instance: InstancePre<CallState>) -> wasmtime::Result<Self::Pre> {
        Self::Pre::new(instance)
    }

    fn pre_of(exports: &Exports) -> Option<&Self::Pre> {
        exports.pool_sizing.as_ref()
    }

    guest_calls!(
        opensandbox_policy_pool_sizing,
        with_bridged::<_, sizing_wit::wit::PoolSnapshot, _>
    );

    fn check(pool: &PoolSnapshot, decision: &SizingDecision) -> Result<(), String> {
        checks::check_sizing(pool, decision)
    }

    fn fallback(pool: &PoolSnapshot) -> (SizingDecision, String) {
        let decision = checks::fallback_sizing(pool);
        let what = format!(
            "kept the current size within bounds ({})",
            decision.desired_total
        );
        (decision, what)
    }

    fn native(pool: &PoolSnapshot) -> SizingDecision {
        sizing::buffer_sizing(pool)
    }
}

impl DecisionKind for ShardTasksKind {
    const DECISION: Decision = Decision::ShardTasks;
    type Input = ShardTaskInput;
    type Output = Option<ShardTasks>;
    type Pre = shard::ShardTasksPolicyPre<CallState>;

    fn pre(instance: InstancePre<CallState>) -> wasmtime::Result<Self::Pre> {
        Self::Pre::new(instance)
    }

    fn pre_of(exports: &Exports) -> Option<&Self::Pre> {
        exports.shard_tasks.as_ref()
    }

    guest_calls!(
        opensandbox_policy_shard_tasks,
        with_bridged::<_, shard::wit::BatchInput, _>,
        |tasks| Some(tasks)
    );

    fn check(batch: &ShardTaskInput, tasks: &Option<ShardTasks>) -> Result<(), String> {
        tasks
            .as_ref()
            .map_or(Ok(()), |tasks| checks::check_shard_tasks(batch, tasks))
    }

    fn fallback(_: &ShardTaskInput) -> (Option<ShardTasks>, String) {
        (None, "dispatched no tasks; retrying with backoff".into())
    }

    fn native(batch: &ShardTaskInput) -> Option<ShardTasks> {
        Some(tasks::template_merge(batch))
    }
}

impl DecisionKind for Expiry {
    const DECISION: Decision = Decision::Expiry;
    type Input = BatchSnapshot;
    type Output = ExpiryDecision;
    type Pre = expiry_wit::ExpiryPolicyPre<CallState>;

    fn pre(instance: InstancePre<CallState>) -> wasmtime::Result<Self::Pre> {
        Self::Pre::new(instance)
    }

    fn pre_of(exports: &Exports) -> Option<&Self::Pre> {
        exports.expiry.as_ref()
    }

    guest_calls!(
        opensandbox_policy_expiry,
        with_bridged::<_, expiry_wit::wit::BatchSnapshot, _>
    );

    fn check(batch: &BatchSnapshot, decision: &ExpiryDecision) -> Result<(), String> {
        checks::check_expiry(batch, decision)
    }

    fn fallback(_: &BatchSnapshot) -> (ExpiryDecision, String) {
        let what = format!(
            "kept the batch; rechecking in {} s",
            checks::FALLBACK_RECHECK_MS / 1000
        );
        (checks::fallback_expiry(), what)
    }

    fn native(batch: &BatchSnapshot) -> ExpiryDecision {
        expiry::at_expire_time(batch)
    }
}

impl DecisionKind for PoolSelection {
    const DECISION: Decision = Decision::PoolSelection;
    type Input = SelectionInput;
    type Output = SelectionDecision;
    type Pre = selection_wit::PoolSelectionPolicyPre<CallState>;

    fn pre(instance: InstancePre<CallState>) -> wasmtime::Result<Self::Pre> {
        Self::Pre::new(instance)
    }

    fn pre_of(exports: &Exports) -> Option<&Self::Pre> {
        exports.pool_selection.as_ref()
    }

    guest_calls!(opensandbox_policy_pool_selection, selection_wit::with_input);

    fn check(input: &SelectionInput, decision: &SelectionDecision) -> Result<(), String> {
        checks::check_selection(input, decision)
    }

    fn fallback(input: &SelectionInput) -> (SelectionDecision, String) {
        let decision = checks::fallback_selection(input);
        let what = match &decision.pool {
            Some(pool) => format!("the built-in default chose {pool:?}"),
            None => "the built-in default found no pool".into(),
        };
        (decision, what)
    }

    fn native(input: &SelectionInput) -> SelectionDecision {
        selection::least_allocated_fit(input)
    }
}

/// Runs `$body` with `$kind` bound to the [`DecisionKind`] of the runtime value `$decision`: the
/// one place a [`Decision`] is turned back into its type.
#[macro_export]
#[doc(hidden)]
macro_rules! with_kind {
    ($decision:expr, |$kind:ident| $body:expr) => {
        match $decision {
            $crate::Decision::PoolSizing => {
                type $kind = $crate::kind::PoolSizing;
                $body
            }
            $crate::Decision::ShardTasks => {
                type $kind = $crate::kind::ShardTasksKind;
                $body
            }
            $crate::Decision::Expiry => {
                type $kind = $crate::kind::Expiry;
                $body
            }
            $crate::Decision::PoolSelection => {
                type $kind = $crate::kind::PoolSelection;
                $body
            }
        }
    };
}
