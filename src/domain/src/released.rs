//! Shards released early under `taskResourcePolicyWhenCompleted: Release`.
//!
//! Once a shard's task has finished, its pod is deleted or returned to the pool, and with it the
//! executor that knew the task's result. The result is therefore recorded on the BatchSandbox
//! (annotation `sandbox.opensandbox.io/task-results`) before the pod goes, and the shard is never
//! given a pod again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use sandbox_decisions::tasks::TaskPhase;

/// Annotation holding the final task phase of every released shard.
pub use crate::api::names::ANNOTATION_TASK_RESULTS;

/// Final phase of each released shard, by shard index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Released(pub BTreeMap<usize, TaskPhase>);

impl Released {
    /// Parses the annotation; a missing or unreadable one releases nothing (the worst outcome of
    /// a hand-edited value is that a shard keeps its pod).
    pub fn parse(annotation: Option<&str>) -> Self {
        annotation
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default()
    }

    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).expect("a map of phases always serializes")
    }

    pub fn contains(&self, shard: usize) -> bool {
        self.0.contains_key(&shard)
    }

    pub fn phase(&self, shard: usize) -> Option<TaskPhase> {
        self.0.get(&shard).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_garbage() {
        let mut released = Released::default();
        released.0.insert(2, TaskPhase::Succeeded);
        released.0.insert(0, TaskPhase::Failed);
        let text = released.to_annotation();
        assert_eq!(text, r#"{"0":"Failed","2":"Succeeded"}"#);
        assert_eq!(Released::parse(Some(&text)), released);
        assert_eq!(Released::parse(Some("nonsense")), Released::default());
        assert!(
            Released::parse(Some(&text)).contains(2) && !Released::parse(Some(&text)).contains(1)
        );
    }
}
