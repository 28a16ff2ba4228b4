//! Per-object exponential backoff for failed reconciles (kube-rs' reference controller requeues
//! every failure after a flat delay; a flapping object should instead back off on its own).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tracing::{debug, warn};

use super::Error;

#[derive(Default)]
pub struct PerObjectBackoff {
    failures: Mutex<HashMap<ObjectRef<kube::api::DynamicObject>, usize>>,
}

impl PerObjectBackoff {
    /// Records a failure and returns when to retry.
    pub fn on_error(&self, object: &ObjectRef<kube::api::DynamicObject>, error: &Error) -> Action {
        if error.is_lost_race() {
            // Resolved by fresh state, which arrives within milliseconds; routine under
            // optimistic concurrency (a user's edit or delete landing beside our own write), so
            // neither a warning nor a step of the backoff.
            debug!(object = %object, %error, retry_in = ?LOST_RACE_RETRY, "reconcile lost a write race");
            return Action::requeue(LOST_RACE_RETRY);
        }
        let attempt = {
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let count = failures.entry(object.clone()).or_default();
            *count += 1;
            *count
        };
        let delay = delay_for(attempt);
        warn!(object = %object, %error, attempt, retry_in = ?delay, "reconcile failed");
        Action::requeue(delay)
    }

    /// Forgets the failures of an object that reconciled successfully.
    pub fn on_success(&self, object: &ObjectRef<kube::api::DynamicObject>) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(object);
    }
}

/// When a reconcile that lost a write race runs again.
const LOST_RACE_RETRY: Duration = Duration::from_millis(50);

/// Longest delay between retries of one object.
pub const MAX_DELAY: Duration = Duration::from_secs(300);

/// The `attempt`-th delay (1-based): 200 ms doubling, each with a random jitter of up to the
/// delay itself (backon's), never more than [`MAX_DELAY`]: the doubling stops at half of it.
pub(super) fn delay_for(attempt: usize) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(MAX_DELAY / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1))
        .unwrap_or(MAX_DELAY)
        .min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_200_ms_with_jitter_below_twice_the_step() {
        for attempt in 1..=10 {
            let step = Duration::from_millis(200) * 2u32.pow(attempt as u32 - 1);
            let delay = delay_for(attempt);
            assert!(
                delay >= step && delay < step * 2,
                "attempt {attempt}: {delay:?} outside [{step:?}, {:?})",
                step * 2
            );
        }
    }

    #[test]
    fn a_lost_write_race_is_retried_at_once_and_does_not_step_the_backoff() {
        let backoff = PerObjectBackoff::default();
        let object = ObjectRef::<sandbox_domain::api::BatchSandbox>::new("b")
            .within("team")
            .erase();
        let status = |code: u16, reason: &str| {
            kube::Error::Api(Box::new(
                kube::core::Status::failure(reason, reason).with_code(code),
            ))
        };
        for error in [Error::Kube(status(409, "Conflict")), Error::Conflict(2)] {
            assert_eq!(
                backoff.on_error(&object, &error),
                Action::requeue(LOST_RACE_RETRY)
            );
        }
        let failures =
            |b: &PerObjectBackoff| b.failures.lock().expect("failures").get(&object).copied();
        assert_eq!(failures(&backoff), None, "lost races are no failures");
        backoff.on_error(&object, &Error::Kube(status(503, "ServiceUnavailable")));
        assert_eq!(
            failures(&backoff),
            Some(1),
            "a real failure steps the backoff"
        );
    }

    #[test]
    fn delays_never_exceed_the_cap() {
        for attempt in [11, 12, 20, 60, 1000] {
            let delay = delay_for(attempt);
            assert!(
                delay >= MAX_DELAY / 2 && delay <= MAX_DELAY,
                "attempt {attempt}: {delay:?}"
            );
        }
    }
}
