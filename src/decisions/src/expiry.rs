//! Expiry: whether a batch has reached its `expireTime`. The default expiry policy is this
//! function behind a WIT adapter.

use alloc::string::String;
use alloc::vec::Vec;

use crate::tasks::TaskPhase;

/// What an expiry decision sees of a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BatchSnapshot {
    pub name: String,
    pub expire_time_unix_ms: Option<i64>,
    pub now_unix_ms: i64,
    pub pooled: bool,
    pub task_phases: Vec<TaskPhase>,
}

/// What to do with an expired batch's pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ExpireAction {
    /// Delete the batch; its pods are released as on deletion (the pool's
    /// `recycleStrategy.type`, or deleted when non-pooled).
    Delete,
    /// Delete the batch and return its pods to the pool whatever the pool's `recycleStrategy`
    /// says, recycled as with `type: Restart`: a pod goes back idle only once every process of
    /// its tasks is confirmed ended, and is deleted otherwise. Treated as `Delete` for non-pooled
    /// batches.
    ReturnToPool,
}

/// An expiry decision.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ExpiryDecision {
    /// Keep the batch; look again after this many milliseconds (`None`: only on change).
    Keep { recheck_after_ms: Option<u64> },
    /// Expire the batch now.
    Expire { action: ExpireAction },
}

/// Expire exactly at `expireTime`; before it, recheck when it falls due.
pub fn at_expire_time(batch: &BatchSnapshot) -> ExpiryDecision {
    match batch.expire_time_unix_ms {
        None => ExpiryDecision::Keep {
            recheck_after_ms: None,
        },
        Some(at) if at <= batch.now_unix_ms => ExpiryDecision::Expire {
            action: ExpireAction::Delete,
        },
        Some(at) => ExpiryDecision::Keep {
            recheck_after_ms: Some(u64::try_from(at - batch.now_unix_ms).unwrap_or(u64::MAX)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn expires_exactly_when_due(expire in prop::option::of(0i64..10_000), now in 0i64..10_000) {
            let batch = BatchSnapshot { expire_time_unix_ms: expire, now_unix_ms: now, ..Default::default() };
            match (expire, at_expire_time(&batch)) {
                (None, ExpiryDecision::Keep { recheck_after_ms: None }) => {}
                (Some(at), ExpiryDecision::Expire { .. }) => prop_assert!(at <= now),
                (Some(at), ExpiryDecision::Keep { recheck_after_ms: Some(ms) }) => prop_assert_eq!(at - now, ms as i64),
                (e, d) => prop_assert!(false, "unexpected {:?} for {:?}", d, e),
            }
        }
    }
}
