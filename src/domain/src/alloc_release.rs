//! Release on request: the `sandbox.opensandbox.io/alloc-release` annotation a user or tool
//! writes on a pooled BatchSandbox, and the `alloc-released` record this controller keeps.
//!
//! Both hold `{"pods": ["<pod>", ...]}`, OpenSandbox's format. Releasing a pod scales in its
//! shard: the shard's task is stopped, its pod goes back through the pool's recycle strategy, and
//! the shard never gets a pod again.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

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

/// Shards to release now: those whose ledger entry names a pod the request lists. Entries already
/// cleared (released shards) never match.
pub fn shards_to_release(ledger: &[String], requested: &[String]) -> Vec<usize> {
    let requested: BTreeSet<&str> = requested.iter().map(String::as_str).collect();
    ledger
        .iter()
        .enumerate()
        .filter(|(_, pod)| !pod.is_empty() && requested.contains(pod.as_str()))
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
            shards_to_release(&ledger, &strings(&["p3", "p0", "zz"])),
            [0, 3]
        );
        assert!(shards_to_release(&ledger, &strings(&[""])).is_empty());
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

    proptest! {
        #[test]
        fn released_shards_hold_exactly_the_requested_pods(
            ledger in prop::collection::vec("[a-d]?", 0..8),
            requested in prop::collection::vec("[a-f]", 0..6),
        ) {
            let shards = shards_to_release(&ledger, &requested);
            for (i, pod) in ledger.iter().enumerate() {
                let wanted = !pod.is_empty() && requested.contains(pod);
                prop_assert_eq!(shards.contains(&i), wanted);
            }
        }
    }
}
