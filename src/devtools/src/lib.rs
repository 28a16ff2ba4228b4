//! Development tools that never ship in an image: the local executor runner, which gives kwok
//! pods real task executors on their loopback IPs, the claim benchmark (`sandbox-bench`), and the
//! fault suite (`sandbox-chaos`) with its fault-injecting proxy and allocation invariant checker.
#![forbid(unsafe_code)]

pub mod allocation_invariants;
pub mod bench;
pub mod fault_proxy;
pub mod runner;
