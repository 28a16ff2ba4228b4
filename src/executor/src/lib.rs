//! The task executor: the process in each sandbox pod that runs the shard's process task, and the
//! controller's client for it. Both sides share the wire types in [`wire`].
//!
//! This crate is the sidecar image's only code: it has no kube client, no WebAssembly engine and
//! no certificate generation, so the sidecar builds and ships small.
//!
//! Controller-side API:
//! - [`ExecutorClient::new`]`(signing_key)`, then [`ExecutorClient::set_tasks`]`(pod, &tasks)` and
//!   [`ExecutorClient::get_tasks`]`(pod)`, both returning the executor's task list with status,
//!   each request signed for that one pod ([`credential`]);
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
pub mod credential;
pub mod daemon;
pub mod http;
pub mod identity;
pub mod manager;
pub mod mounts;
pub mod reaper;
pub mod server;
pub mod shim;
pub mod store;
pub mod wire;

pub use client::{ExecutorClient, ExecutorError, PodRef};
pub use wire::{InvalidTask, Task};

/// The port the executor listens on in every pod (OpenSandbox's default).
pub const EXECUTOR_PORT: u16 = 5758;
/// Environment variable holding the executor's own pod UID (the downward API's `metadata.uid`):
/// it accepts only credentials signed for that pod.
pub const POD_UID_ENV: &str = "POD_UID";
/// Key of the controller's signing key (hex Ed25519 seed) in its Secret.
pub const SIGNING_KEY_SECRET_KEY: &str = "signing-key";
/// Where the sidecar keeps its state.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sandbox-task-executor";
/// The `emptyDir` volume mounted at [`DEFAULT_DATA_DIR`] in the sidecar.
pub const DATA_VOLUME_NAME: &str = "task-executor-data";
