//! Per-object exponential backoff for failed reconciles (kube-rs' reference controller requeues
//! every failure after a flat delay; a flapping object should instead back off on its own).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tracing::warn;

use super::Error;

#[derive(Default)]
pub struct PerObjectBackoff {
    failures: Mutex<HashMap<ObjectRef<kube::api::DynamicObject>, usize>>,
}

impl PerObjectBackoff {
    /// Records a failure and returns when to retry.
    pub fn on_error(&self, object: &ObjectRef<kube::api::DynamicObject>, error: &Error) -> Action {
        let attempt = {
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let count = failures.entry(object.clone()).or_default();
            *count += 1;
            *count
        };
        let delay = match error {
            // A lost race is resolved by fresh state, which arrives within milliseconds.
            Error::Conflict(_) => Duration::from_millis(50),
            _ => delay_for(attempt),
        };
        warn!(object = %object, %error, attempt, retry_in = ?delay, "reconcile failed");
        Action::requeue(delay)
    }

    /// Forgets the failures of an object that reconciled successfully.
    pub fn on_success(&self, object: &ObjectRef<kube::api::DynamicObject>) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(object);
    }
}

/// The `attempt`-th delay (1-based): 200 ms doubling up to 5 minutes, with jitter.
fn delay_for(attempt: usize) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(300))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1))
        .unwrap_or(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        assert!(delay_for(1) < Duration::from_millis(500));
        assert!(delay_for(6) >= Duration::from_millis(6400));
        assert!(delay_for(60) <= Duration::from_secs(600));
    }
}
