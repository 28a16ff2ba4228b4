//! metav1.Condition bookkeeping: a condition's `lastTransitionTime` moves only when its status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A condition as a decision states it; time and generation are filled in by [`merge`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// The new condition list: `desired` conditions in the given order, each keeping its previous
/// transition time when its status has not changed. Conditions of other types are dropped.
pub fn merge(
    previous: &[Condition],
    desired: &[Desired],
    now: &Time,
    generation: i64,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" }.to_string();
            let last_transition_time = previous
                .iter()
                .find(|c| c.type_ == d.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: d.type_.to_string(),
                status,
                reason: d.reason.clone(),
                message: d.message.clone(),
                last_transition_time,
                observed_generation: Some(generation),
            }
        })
        .collect()
}

/// Whether two condition lists say the same thing (ignoring transition times).
pub fn same(a: &[Condition], b: &[Condition]) -> bool {
    same_states(a, b) && a.iter().zip(b).all(|(x, y)| x.message == y.message)
}

/// Whether two condition lists report the same states: types, statuses, reasons and observed
/// generations, messages aside (a message may carry counts that change all the time).
pub fn same_states(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.observed_generation == y.observed_generation
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let first = merge(
            &[],
            &[Desired::new("Ready", false, "Starting", "")],
            &time(1),
            1,
        );
        let same_status = merge(
            &first,
            &[Desired::new("Ready", false, "StillStarting", "x")],
            &time(2),
            1,
        );
        assert_eq!(same_status[0].last_transition_time, time(1));
        let flipped = merge(
            &same_status,
            &[Desired::new("Ready", true, "AllReady", "")],
            &time(3),
            2,
        );
        assert_eq!(flipped[0].last_transition_time, time(3));
        assert!(!same(&first, &flipped));
    }

    #[test]
    fn states_differ_by_status_reason_or_generation_not_by_message() {
        let ready = |status: bool, reason: &str, message: &str, generation: i64| {
            merge(
                &[],
                &[Desired::new("Ready", status, reason, message)],
                &time(1),
                generation,
            )
        };
        let base = ready(true, "BufferFilled", "3 idle", 1);
        assert!(same_states(
            &base,
            &ready(true, "BufferFilled", "4 idle", 1)
        ));
        assert!(!same(&base, &ready(true, "BufferFilled", "4 idle", 1)));
        assert!(!same_states(
            &base,
            &ready(false, "BufferFilled", "3 idle", 1)
        ));
        assert!(!same_states(&base, &ready(true, "WarmingUp", "3 idle", 1)));
        assert!(!same_states(
            &base,
            &ready(true, "BufferFilled", "3 idle", 2)
        ));
        assert!(!same_states(&base, &[]));
    }
}
