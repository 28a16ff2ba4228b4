//! Development tools that never ship in an image: the local executor runner, which gives kwok
//! pods real task executors on their loopback IPs, and the claim benchmark (`sandbox-bench`).
#![forbid(unsafe_code)]

pub mod runner;
