//! The BatchSandbox and Pool resources ([`api`]) and the rules on them: pure decisions with no
//! I/O and no kube client. Reconcilers and the webhook call into these.
#![forbid(unsafe_code)]

pub mod api;

pub mod admission;
pub mod alloc_release;
pub mod allocation;
mod annotation;
pub mod conditions;
pub mod endpoints;
pub mod invariants;
pub mod pod_template;
pub mod pods;
pub mod pool_plan;
pub mod recycle;
pub mod released;
pub mod status;
