//! Pure decisions: no I/O, no kube client. Reconcilers and the webhook call into these.

pub mod admission;
pub mod alloc_release;
pub mod allocation;
pub mod conditions;
pub mod endpoints;
pub mod invariants;
pub mod pod_template;
pub mod pods;
pub mod pool_plan;
pub mod released;
pub mod status;
