//! What this process last said of each Pool's status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sandbox_domain::api::PoolStatus;

/// The status this process last sent per Pool (by uid), recorded before the write goes out. A
/// reconcile whose cached Pool still shows an older status must not take it for the current one.
#[derive(Default)]
pub struct LastPoolStatus {
    /// Shared, so every round of a pool can compare against it without a copy.
    inner: Mutex<HashMap<String, Arc<PoolStatus>>>,
}

impl LastPoolStatus {
    pub fn last(&self, uid: &str) -> Option<Arc<PoolStatus>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.get(uid).cloned()
    }

    pub fn record(&self, uid: String, status: PoolStatus) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.insert(uid, Arc::new(status));
    }
}
