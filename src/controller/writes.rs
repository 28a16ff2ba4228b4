//! Counts of the API writes the controller makes, by target, so the cost of a claim can be
//! measured (`/metrics`, and the `sandbox-bench` figures).

use std::sync::atomic::{AtomicU64, Ordering};

/// What a write went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    BatchObject,
    BatchStatus,
    PoolObject,
    PoolStatus,
    Pod,
    Event,
}

impl Target {
    const ALL: [Target; 6] = [
        Target::BatchObject,
        Target::BatchStatus,
        Target::PoolObject,
        Target::PoolStatus,
        Target::Pod,
        Target::Event,
    ];

    /// The `target` label value in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Target::BatchObject => "batchsandbox",
            Target::BatchStatus => "batchsandbox_status",
            Target::PoolObject => "pool",
            Target::PoolStatus => "pool_status",
            Target::Pod => "pod",
            Target::Event => "event",
        }
    }

    /// The target for a write to an object (or its status) of `kind`.
    pub fn for_kind(kind: &str, status: bool) -> Self {
        match (kind, status) {
            ("Pool", false) => Target::PoolObject,
            ("Pool", true) => Target::PoolStatus,
            ("Pod", _) => Target::Pod,
            (_, false) => Target::BatchObject,
            (_, true) => Target::BatchStatus,
        }
    }
}

#[derive(Default, Debug)]
pub struct WriteCounter {
    counts: [AtomicU64; 6],
}

impl WriteCounter {
    pub fn count(&self, target: Target) {
        self.counts[Target::ALL.iter().position(|t| *t == target).unwrap_or(0)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Every target with its count so far.
    pub fn snapshot(&self) -> Vec<(Target, u64)> {
        Target::ALL
            .iter()
            .zip(&self.counts)
            .map(|(t, c)| (*t, c.load(Ordering::Relaxed)))
            .collect()
    }
}
