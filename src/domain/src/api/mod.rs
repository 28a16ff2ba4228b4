//! The custom resource types of `sandbox.opensandbox.io/v1alpha1`, and the label, annotation and
//! finalizer names that the controller, the webhook and OpenSandbox's own tools agree on.

mod batchsandbox;
mod crd;
pub mod names;
mod pool;
mod schema;
mod task;

pub use batchsandbox::{
    BatchSandbox, BatchSandboxPhase, BatchSandboxSpec, BatchSandboxStatus, TaskResourcePolicy,
};
pub use crd::{all_crds, crd_file_name, render_crd_yaml};
pub use pool::{
    CapacitySpec, Pool, PoolSpec, PoolStatus, RecycleStrategy, RecycleType, ScaleStrategy,
    UpdateStrategy,
};
pub use task::{EnvVar, ProcessTask, TaskSpec, TaskTemplateSpec};

/// The API group of every kind here.
pub const GROUP: &str = "sandbox.opensandbox.io";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
