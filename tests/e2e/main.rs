//! End-to-end tests against a real local Kubernetes control plane
//! (deploy/local/cluster.sh). One test binary; one module per area.
//!
//! Run with `make test`, or `cargo test --test e2e` (the harness starts the
//! control plane itself when none is running, and stops it on exit).

mod fixtures;
mod harness;

mod batch;
mod controller;
mod crds;
mod deploy;
mod executor;
mod local_executors;
mod policy;
mod pool_strategies;
mod recycle;
mod sdk;
mod selection;
mod tasks;
mod webhook;
