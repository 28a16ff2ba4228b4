//! What this process wrote but may not have seen back through its watches yet.
//!
//! A reflector lags the API server by a few milliseconds. Without these records, a reconcile that
//! runs before its own previous write is visible would count an allocated pod as idle (and hand it
//! out twice) or create pods it already created. Entries expire once the cache shows the write, or
//! after a bound, which is safe: expiry only ever makes a pod look allocated or pending for longer.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const HORIZON: Duration = Duration::from_secs(60);

/// Pods granted to batches by this process, keyed by namespace.
#[derive(Default)]
pub struct Claims {
    inner: Mutex<HashMap<String, Vec<(String, Instant)>>>,
}

impl Claims {
    pub fn record(&self, namespace: &str, pods: impl IntoIterator<Item = String>) {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .entry(namespace.to_string())
            .or_default()
            .extend(pods.into_iter().map(|p| (p, now)));
    }

    /// The claimed pods of a namespace, after dropping those the cache now shows as held
    /// (`seen_held`) and those past the horizon.
    pub fn current(&self, namespace: &str, seen_held: &HashSet<&str>) -> HashSet<String> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entries) = inner.get_mut(namespace) else {
            return HashSet::new();
        };
        entries.retain(|(pod, at)| at.elapsed() < HORIZON && !seen_held.contains(pod.as_str()));
        entries.iter().map(|(pod, _)| pod.clone()).collect()
    }
}

/// Pod creations and deletions per owner (`namespace/name`) not yet seen in the pod cache.
#[derive(Default)]
pub struct Expectations {
    inner: Mutex<HashMap<String, Expected>>,
}

#[derive(Default)]
struct Expected {
    created: Vec<(String, Instant)>,
    deleted: Vec<(String, Instant)>,
}

impl Expectations {
    pub fn created(&self, owner: &str, pod: String) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .entry(owner.to_string())
            .or_default()
            .created
            .push((pod, Instant::now()));
    }

    /// Forgets a creation that failed.
    pub fn creation_failed(&self, owner: &str, pod: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(expected) = inner.get_mut(owner) {
            expected.created.retain(|(p, _)| p != pod);
        }
    }

    pub fn deleted(&self, owner: &str, pod: String) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .entry(owner.to_string())
            .or_default()
            .deleted
            .push((pod, Instant::now()));
    }

    /// Returns (creations not yet in the cache, deletions whose pod the cache still shows as live).
    /// `live` holds the names of the owner's pods the cache shows as live (not terminating).
    /// `known` holds all names in the cache, terminating or not.
    pub fn pending(
        &self,
        owner: &str,
        known: &HashSet<&str>,
        live: &HashSet<&str>,
    ) -> (u32, HashSet<String>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(expected) = inner.get_mut(owner) else {
            return (0, HashSet::new());
        };
        expected
            .created
            .retain(|(pod, at)| at.elapsed() < HORIZON && !known.contains(pod.as_str()));
        expected
            .deleted
            .retain(|(pod, at)| at.elapsed() < HORIZON && live.contains(pod.as_str()));
        let deleting = expected.deleted.iter().map(|(p, _)| p.clone()).collect();
        (expected.created.len() as u32, deleting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_clear_once_seen() {
        let claims = Claims::default();
        claims.record("ns", ["a".to_string(), "b".to_string()]);
        assert_eq!(claims.current("ns", &HashSet::new()).len(), 2);
        assert_eq!(
            claims.current("ns", &HashSet::from(["a"])),
            HashSet::from(["b".to_string()])
        );
        assert!(claims.current("other", &HashSet::new()).is_empty());
    }

    #[test]
    fn expectations_clear_once_observed() {
        let e = Expectations::default();
        e.created("ns/p", "p-1".into());
        e.deleted("ns/p", "p-0".into());
        let (unseen, deleting) =
            e.pending("ns/p", &HashSet::from(["p-0"]), &HashSet::from(["p-0"]));
        assert_eq!((unseen, deleting.len()), (1, 1));
        let (unseen, deleting) =
            e.pending("ns/p", &HashSet::from(["p-1"]), &HashSet::from(["p-1"]));
        assert_eq!((unseen, deleting.len()), (0, 0));
    }
}

/// The status this process last wrote per BatchSandbox (by uid). A reconcile that runs before its
/// own status write is back in the cache would otherwise write the same status again.
#[derive(Default)]
pub struct LastStatus {
    inner: Mutex<HashMap<String, (crate::api::BatchSandboxStatus, Instant)>>,
}

impl LastStatus {
    pub fn wrote_same(&self, uid: &str, status: &crate::api::BatchSandboxStatus) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.get(uid).is_some_and(|(last, at)| {
            at.elapsed() < HORIZON && crate::domain::status::equivalent(last, status)
        })
    }

    pub fn record(&self, uid: String, status: crate::api::BatchSandboxStatus) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.retain(|_, (_, at)| at.elapsed() < HORIZON);
        inner.insert(uid, (status, Instant::now()));
    }
}
