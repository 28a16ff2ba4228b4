//! Release on request: the `sandbox.opensandbox.io/alloc-release` annotation a user or tool
//! writes on a pooled BatchSandbox, and the `alloc-released` record this controller keeps.
//!
//! Both hold `{"pods": ["<pod>", ...]}`, OpenSandbox's format. Releasing a pod scales in its
//! shard: the shard's task is stopped, its pod goes back through the pool's recycle strategy, and
//! the shard never gets a pod again.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::released::Released;

/// The pods listed in an `alloc-release` or `alloc-released` annotation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodList {
    #[serde(default)]
    pub pods: Vec<String>,
}

impl PodList {
    /// Parses an annotation; a missing one lists nothing.
    pub fn parse(annotation: Option<&str>) -> Result<Self, serde_json::Error> {
        crate::annotation::parse_json(annotation)
    }

    pub fn to_annotation(&self) -> String {
        crate::annotation::to_json(self)
    }

    /// This list with `more` added, each pod once, in first-seen order.
    pub fn with(&self, more: impl IntoIterator<Item = String>) -> Self {
        let mut pods = self.pods.clone();
        for pod in more {
            if !pods.contains(&pod) {
                pods.push(pod);
            }
        }
        Self { pods }
    }
}

/// Shards whose pod is let go now: those whose pod the request names, and those already marked
/// released (a finished task's shard under `Release`, or a request's shard marked by an earlier
/// reconcile) whose ledger entry still names a pod. In order, each once.
pub fn shards_to_let_go(
    ledger: &[String],
    requested: &[String],
    released: &Released,
) -> Vec<usize> {
    let requested: BTreeSet<&str> = requested.iter().map(String::as_str).collect();
    ledger
        .iter()
        .enumerate()
        .filter(|(shard, pod)| {
            !pod.is_empty() && (requested.contains(pod.as_str()) || released.contains(*shard))
        })
        .map(|(shard, _)| shard)
        .collect()
}

/// Requested pods that are not the batch's: in neither its ledger nor its released record.
pub fn foreign_pods<'a>(
    requested: &'a [String],
    ledger: &[String],
    released: &[String],
) -> Vec<&'a str> {
    requested
        .iter()
        .filter(|pod| !ledger.contains(pod) && !released.contains(pod))
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sandbox_decisions::tasks::TaskPhase;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_opensandbox_format_and_adds_without_duplicates() {
        let list = PodList::parse(Some(r#"{"pods":["a","b"]}"#)).unwrap();
        assert_eq!(list.pods, ["a", "b"]);
        assert_eq!(
            list.with(strings(&["b", "c"])).to_annotation(),
            r#"{"pods":["a","b","c"]}"#
        );
        assert_eq!(PodList::parse(None).unwrap(), PodList::default());
        assert!(PodList::parse(Some("nonsense")).is_err());
    }

    #[test]
    fn releases_the_shards_holding_requested_pods() {
        let ledger = strings(&["p0", "", "p2", "p3"]);
        assert_eq!(
            shards_to_let_go(&ledger, &strings(&["p3", "p0", "zz"]), &Released::default()),
            [0, 3]
        );
        assert!(shards_to_let_go(&ledger, &strings(&[""]), &Released::default()).is_empty());
    }

    #[test]
    fn pods_outside_ledger_and_record_are_foreign() {
        let ledger = strings(&["p0", ""]);
        let released = strings(&["p1"]);
        assert_eq!(
            foreign_pods(&strings(&["p0", "p1", "x"]), &ledger, &released),
            ["x"]
        );
    }

    #[test]
    fn lets_go_of_requested_shards_and_marked_shards_still_holding_a_pod() {
        let ledger = strings(&["p0", "", "p2", "p3", "p4"]);
        let mut released = Released::default();
        released.0.insert(1, TaskPhase::Succeeded);
        released.0.insert(2, TaskPhase::Failed);
        released.0.insert(3, TaskPhase::None);
        assert_eq!(
            shards_to_let_go(&ledger, &strings(&["p3", "p0"]), &released),
            [0, 2, 3],
            "shard 1 holds no pod any more; shard 4 is neither requested nor marked"
        );
    }

    proptest! {
        #[test]
        fn shards_let_go_are_requested_or_marked_and_hold_a_pod(
            ledger in prop::collection::vec("[a-d]?", 0..8),
            requested in prop::collection::vec("[a-f]", 0..6),
            marked in prop::collection::btree_set(0usize..8, 0..4),
        ) {
            let released = Released(marked.iter().map(|&i| (i, TaskPhase::Succeeded)).collect());
            let shards = shards_to_let_go(&ledger, &requested, &released);
            prop_assert!(shards.windows(2).all(|w| w[0] < w[1]));
            for (i, pod) in ledger.iter().enumerate() {
                let wanted = !pod.is_empty() && (requested.contains(pod) || marked.contains(&i));
                prop_assert_eq!(shards.contains(&i), wanted);
            }
        }
    }
}
