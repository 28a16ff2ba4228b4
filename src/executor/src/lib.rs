//! The task executor: the process in each sandbox pod that runs the shard's process task, and the
//! controller's client for it. Both sides share the wire types in [`wire`].
//!
//! This crate is the sidecar image's only code: it has no kube client, no WebAssembly engine and
//! no certificate generation, so the sidecar builds and ships small.
//!
//! Controller-side API:
//! - [`ExecutorClient::new`]`(token)`, then [`ExecutorClient::set_tasks`]`(pod_ip, &tasks)` and
//!   [`ExecutorClient::get_tasks`]`(pod_ip)`, both returning the executor's task list with status;
//! - [`Task::from_spec`] turns a merged shard [`sandbox_decisions::tasks::TaskSpec`] into a wire task, and
//!   [`Task::phase`] maps a reported task to the [`sandbox_decisions::tasks::TaskPhase`] the status
//!   counts.
//!
//! The controller adds the executor container to pod templates (`controller::sidecar`).

#![forbid(unsafe_code)]

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
pub mod reaper;
pub mod server;
pub mod shim;
pub mod store;
pub mod wire;

pub use client::{ExecutorClient, ExecutorError};
pub use wire::{InvalidTask, Task};

/// The port the executor listens on in every pod (OpenSandbox's default).
pub const EXECUTOR_PORT: u16 = 5758;
/// Name of the executor's container in a pod.
pub const EXECUTOR_CONTAINER_NAME: &str = "task-executor";
/// Environment variable holding the bearer token, for the executor and the tools around it.
pub const TOKEN_ENV: &str = "SANDBOX_EXECUTOR_TOKEN";
/// Key of the token in the Secret that the controller's sidecar injection names.
pub const TOKEN_SECRET_KEY: &str = "token";
/// Where the sidecar keeps its state.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sandbox-task-executor";
/// The `emptyDir` volume mounted at [`DEFAULT_DATA_DIR`] in the sidecar.
pub const DATA_VOLUME_NAME: &str = "task-executor-data";
