//! Counts of the API writes the controller makes, so the cost of a claim can be measured.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct WriteCounter {
    object: AtomicU64,
    status: AtomicU64,
    pods: AtomicU64,
    events: AtomicU64,
}

/// A snapshot of [`WriteCounter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Writes {
    /// Writes of BatchSandbox and Pool objects (metadata, finalizers, annotations, deletes).
    pub object: u64,
    /// Writes of the status subresource.
    pub status: u64,
    /// Pod creations and deletions.
    pub pods: u64,
    /// Events published.
    pub events: u64,
}

impl WriteCounter {
    pub fn object(&self) {
        self.object.fetch_add(1, Ordering::Relaxed);
    }
    pub fn status(&self) {
        self.status.fetch_add(1, Ordering::Relaxed);
    }
    pub fn pod(&self) {
        self.pods.fetch_add(1, Ordering::Relaxed);
    }
    pub fn event(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> Writes {
        Writes {
            object: self.object.load(Ordering::Relaxed),
            status: self.status.load(Ordering::Relaxed),
            pods: self.pods.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
        }
    }
}
