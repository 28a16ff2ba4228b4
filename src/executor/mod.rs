//! The task executor: the process in each sandbox pod that runs the shard's process task, and the
//! controller's client for it. Both sides share the wire types in [`wire`].
//!
//! Controller-side API:
//! - [`ExecutorClient::new`]`(token)`, then [`ExecutorClient::set_tasks`]`(pod_ip, &tasks)` and
//!   [`ExecutorClient::get_tasks`]`(pod_ip)`, both returning the executor's task list with status;
//! - [`Task::from_spec`] turns a merged shard [`crate::api::TaskSpec`] into a wire task, and
//!   [`Task::phase`] maps a reported task to the [`crate::domain::expiry::TaskPhase`] the status
//!   counts;
//! - [`inject_sidecar`] adds the executor container to a pod template.

pub mod auth;
pub mod client;
pub mod command;
pub mod command_api;
#[cfg(test)]
mod command_tests;
pub mod daemon;
pub mod http;
pub mod manager;
pub mod mounts;
pub mod runner;
pub mod server;
pub mod shim;
pub mod sidecar;
pub mod store;
pub mod wire;

pub use client::{ExecutorClient, ExecutorError};
pub use sidecar::{has_executor, inject_sidecar};
pub use wire::{InvalidTask, Task};

/// The port the executor listens on in every pod (OpenSandbox's default).
pub const EXECUTOR_PORT: u16 = 5758;
/// Name of the executor's container in a pod.
pub const EXECUTOR_CONTAINER_NAME: &str = "task-executor";
/// Environment variable holding the bearer token, for the executor and the tools around it.
pub const TOKEN_ENV: &str = "SANDBOX_EXECUTOR_TOKEN";
/// Key of the token in the Secret named by [`inject_sidecar`]'s `token_secret`.
pub const TOKEN_SECRET_KEY: &str = "token";
/// Where the sidecar keeps its state.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sandbox-task-executor";
/// The `emptyDir` volume mounted at [`DEFAULT_DATA_DIR`] in the sidecar.
pub const DATA_VOLUME_NAME: &str = "task-executor-data";
