//! The claim benchmark (`sandbox-bench`): scenes against a live cluster, the figures they
//! produce, and plots of their latency distributions.

pub mod metrics;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod run;
pub mod scene;
pub mod stats;
