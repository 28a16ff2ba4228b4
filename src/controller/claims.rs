//! What this process wrote but may not have seen back through its watches yet.
//!
//! A reflector lags the API server by a few milliseconds, and by much longer while its watch
//! reconnects. Without these records, a reconcile that runs before its own previous write is
//! visible would count an allocated pod as idle (and hand it out twice) or create pods it already
//! created.
//!
//! A grant is claimed *before* its write is sent, against the batch resourceVersion the write is
//! conditional on, and the claim ends only on evidence: the write was refused outright, a fresh
//! read proved it can never commit, or the batch cache has moved past that resourceVersion (so the
//! cache itself shows the write, or a later state, or the batch's deletion). Never on a clock: a
//! stalled watch would otherwise make unseen grants look idle.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long pod expectations and recorded statuses last. They only make the controller wait or
/// skip a redundant write, so a bound is safe for them, unlike for claims.
const HORIZON: Duration = Duration::from_secs(60);

/// One granted pod whose write is not yet known to be refused or visible in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Claim {
    pod: String,
    batch: String,
    /// The batch resourceVersion the grant was conditional on.
    resource_version: String,
}

/// Pods granted to batches by this process, keyed by namespace.
#[derive(Default)]
pub struct Claims {
    inner: Mutex<HashMap<String, Vec<Claim>>>,
}

impl Claims {
    /// Claims `pods` for a write to `batch` conditional on `resource_version`. Call before sending.
    pub fn record(
        &self,
        namespace: &str,
        batch: &str,
        resource_version: &str,
        pods: impl IntoIterator<Item = String>,
    ) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .entry(namespace.to_string())
            .or_default()
            .extend(pods.into_iter().map(|pod| Claim {
                pod,
                batch: batch.to_string(),
                resource_version: resource_version.to_string(),
            }));
    }

    /// Drops the claims on `pods` of the write to `batch` at `resource_version`: it was refused,
    /// or a fresh read showed it can no longer commit.
    pub fn refused(&self, namespace: &str, batch: &str, resource_version: &str, pods: &[String]) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(claims) = inner.get_mut(namespace) {
            claims.retain(|c| {
                !(c.batch == batch
                    && c.resource_version == resource_version
                    && pods.contains(&c.pod))
            });
        }
    }

    /// The claimed pods of a namespace, after dropping the claims the batch cache has caught up
    /// with. `cached_version(batch)` is the resourceVersion the cache shows for a batch (`None`:
    /// the cache shows no such batch, so it has seen it deleted).
    pub fn current(
        &self,
        namespace: &str,
        cached_version: impl Fn(&str) -> Option<String>,
    ) -> HashSet<String> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(claims) = inner.get_mut(namespace) else {
            return HashSet::new();
        };
        claims.retain(|c| cached_version(&c.batch).as_deref() == Some(c.resource_version.as_str()));
        claims.iter().map(|c| c.pod.clone()).collect()
    }
}

/// The last readable ledger of each pooled batch (by uid). A ledger that turns unreadable names no
/// pods anyone can trust, but the pods it held before must not look idle: they stay held as last
/// seen (for as long as this process runs) until the batch is fixed or gone.
#[derive(Default)]
pub struct LastLedgers {
    inner: Mutex<HashMap<String, Vec<String>>>,
}

impl LastLedgers {
    pub fn remember(
        &self,
        batch: &sandbox_domain::api::BatchSandbox,
        ledger: &sandbox_domain::allocation::AllocStatus,
    ) {
        let Some(uid) = batch.metadata.uid.clone() else {
            return;
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.get(&uid) {
            Some(known) if *known == ledger.pods => {}
            _ => {
                inner.insert(uid, ledger.pods.clone());
            }
        }
    }

    /// The pods the last readable ledger of `batch` this process saw named (`None`: it never saw
    /// one).
    pub fn last_known(&self, batch: &sandbox_domain::api::BatchSandbox) -> Option<Vec<String>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        batch
            .metadata
            .uid
            .as_ref()
            .and_then(|uid| inner.get(uid))
            .map(|pods| pods.iter().filter(|p| !p.is_empty()).cloned().collect())
    }

    pub fn forget(&self, uid: &str) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
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

    /// Whether `pod` is a creation of `owner` not yet seen: its owner's rounds count it already,
    /// as starting.
    pub fn expects_creation(&self, owner: &str, pod: &str) -> bool {
        self.expects(owner, pod, |expected| &expected.created)
    }

    /// Whether `pod` is a deletion `owner` sent that has not run out: the pool's rounds count the
    /// pod as being deleted from the moment it was sent, whatever the cache shows of it.
    pub fn expects_deletion(&self, owner: &str, pod: &str) -> bool {
        self.expects(owner, pod, |expected| &expected.deleted)
    }

    /// Whether `which` of `owner`'s expectations names `pod` and has not run out.
    fn expects(
        &self,
        owner: &str,
        pod: &str,
        which: impl Fn(&Expected) -> &Vec<(String, Instant)>,
    ) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.get(owner).is_some_and(|expected| {
            which(expected)
                .iter()
                .any(|(p, at)| p == pod && at.elapsed() < HORIZON)
        })
    }

    /// Forgets a creation that failed.
    pub fn creation_failed(&self, owner: &str, pod: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(expected) = inner.get_mut(owner) {
            expected.created.retain(|(p, _)| p != pod);
        }
    }

    /// Forgets a deletion the API server refused: the pod stays.
    pub fn deletion_failed(&self, owner: &str, pod: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(expected) = inner.get_mut(owner) {
            expected.deleted.retain(|(p, _)| p != pod);
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
    /// `live` says whether the cache shows the owner's pod of that name live (not terminating);
    /// `known` whether it shows it at all, terminating or not.
    pub fn pending(
        &self,
        owner: &str,
        known: impl Fn(&str) -> bool,
        live: impl Fn(&str) -> bool,
    ) -> (u32, HashSet<String>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(expected) = inner.get_mut(owner) else {
            return (0, HashSet::new());
        };
        expected
            .created
            .retain(|(pod, at)| at.elapsed() < HORIZON && !known(pod));
        expected
            .deleted
            .retain(|(pod, at)| at.elapsed() < HORIZON && live(pod));
        let deleting = expected.deleted.iter().map(|(p, _)| p.clone()).collect();
        (expected.created.len() as u32, deleting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_end_on_evidence_never_on_age() {
        let claims = Claims::default();
        claims.record("ns", "x", "7", ["a".to_string()]);
        claims.record("ns", "y", "3", ["b".to_string()]);
        claims.record("ns", "z", "5", ["c".to_string()]);
        let stale = |batch: &str| {
            Some(
                match batch {
                    "x" => "7",
                    "y" => "3",
                    _ => "5",
                }
                .to_string(),
            )
        };
        assert_eq!(
            claims.current("ns", stale).len(),
            3,
            "the cache shows none yet"
        );
        claims.refused("ns", "z", "5", &["other".to_string()]);
        assert_eq!(
            claims.current("ns", stale).len(),
            3,
            "only the refused pods go"
        );
        claims.refused("ns", "z", "5", &["c".to_string()]);
        // x's write is in the cache; y's batch is still at the version the write was made against.
        let caught_up = |batch: &str| (batch != "x").then(|| "3".to_string()).or(Some("8".into()));
        assert_eq!(
            claims.current("ns", caught_up),
            HashSet::from(["b".to_string()])
        );
        // The cache has seen y deleted.
        assert!(claims.current("ns", |_| None).is_empty());
        assert!(claims.current("other", stale).is_empty());
    }

    #[test]
    fn expectations_clear_once_observed() {
        let e = Expectations::default();
        e.created("ns/p", "p-1".into());
        e.deleted("ns/p", "p-0".into());
        let (unseen, deleting) = e.pending("ns/p", |p| p == "p-0", |p| p == "p-0");
        assert_eq!((unseen, deleting.len()), (1, 1));
        let (unseen, deleting) = e.pending("ns/p", |p| p == "p-1", |p| p == "p-1");
        assert_eq!((unseen, deleting.len()), (0, 0));
    }

    #[test]
    fn a_refused_deletion_is_forgotten_while_the_pod_is_still_live() {
        let e = Expectations::default();
        e.deleted("ns/p", "p-0".into());
        e.deleted("ns/p", "p-1".into());
        e.deletion_failed("ns/p", "p-0");
        let (_, deleting) = e.pending("ns/p", |_| true, |_| true);
        assert_eq!(deleting, HashSet::from(["p-1".to_string()]));
    }
}

/// The status this process last wrote per BatchSandbox (by uid). A reconcile that runs before its
/// own status write is back in the cache would otherwise write the same status again.
#[derive(Default)]
pub struct LastStatus {
    inner: Mutex<HashMap<String, (sandbox_domain::api::BatchSandboxStatus, Instant)>>,
}

impl LastStatus {
    pub fn wrote_same(&self, uid: &str, status: &sandbox_domain::api::BatchSandboxStatus) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.get(uid).is_some_and(|(last, at)| {
            at.elapsed() < HORIZON && sandbox_domain::status::equivalent(last, status)
        })
    }

    pub fn record(&self, uid: String, status: sandbox_domain::api::BatchSandboxStatus) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.retain(|_, (_, at)| at.elapsed() < HORIZON);
        inner.insert(uid, (status, Instant::now()));
    }
}

/// Batches whose grant the API server rejected (forbidden, invalid, denied by an admission
/// webhook): each is left out of its pool's plans until its retry time, which backs off per
/// batch, so a write that would be rejected again is not sent at the pace of the pool's rounds.
/// A grant that commits forgets the batch's rejections; so does a quiet spell of
/// [`super::backoff::MAX_DELAY`] after its last retry time.
#[derive(Default)]
pub struct RejectedGrants {
    inner: Mutex<HashMap<super::index::Key, Rejection>>,
}

struct Rejection {
    attempts: usize,
    retry_at: Instant,
    /// What the API server said, for the batch's status.
    message: String,
}

impl Rejection {
    /// A batch left alone this long after its retry was due is no longer retried by its pool.
    fn forgotten(&self, now: Instant) -> bool {
        self.retry_at + super::backoff::MAX_DELAY <= now
    }
}

impl RejectedGrants {
    /// Records a rejection of `batch`'s grant at `now`, for `message`; returns how long the batch
    /// is held back.
    pub fn rejected(&self, batch: super::index::Key, now: Instant, message: String) -> Duration {
        let mut inner = self.lock();
        inner.retain(|_, r| !r.forgotten(now));
        let attempts = inner.get(&batch).map_or(0, |r| r.attempts) + 1;
        let delay = super::backoff::delay_for(attempts);
        inner.insert(
            batch,
            Rejection {
                attempts,
                retry_at: now + delay,
                message,
            },
        );
        delay
    }

    /// Whether `batch` is held back from its pool's plans at `now`.
    pub fn held_back(&self, batch: &super::index::Key, now: Instant) -> bool {
        self.lock().get(batch).is_some_and(|r| r.retry_at > now)
    }

    /// What the API server said when it last rejected `batch`'s grant, until a grant of it
    /// commits or the rejection is forgotten.
    pub fn rejection(&self, batch: &super::index::Key, now: Instant) -> Option<String> {
        self.lock()
            .get(batch)
            .filter(|r| !r.forgotten(now))
            .map(|r| r.message.clone())
    }

    pub fn committed(&self, batch: &super::index::Key) {
        self.lock().remove(batch);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<super::index::Key, Rejection>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Grant writes in flight, by batch (`namespace/name`), with the pool that sent each: sent and
/// not yet answered, or committed and not yet visible in the batch cache. Such a batch is left
/// out of its pool's next plans: its cached ledger is about to be superseded, and planning it from
/// that ledger would ask for pods it already has (and size the pool for them).
#[derive(Default)]
pub struct InFlight {
    inner: Mutex<HashMap<super::index::Key, Grant>>,
    answered: tokio::sync::Notify,
}

struct Grant {
    pool: super::index::Key,
    /// `None` while the write is unanswered; then the resourceVersion it was conditional on.
    committed_against: Option<String>,
}

impl InFlight {
    pub fn start(&self, batch: super::index::Key, pool: super::index::Key) {
        self.lock().insert(
            batch,
            Grant {
                pool,
                committed_against: None,
            },
        );
    }

    /// The write to `batch` was answered: it committed against `committed_against`, or (`None`)
    /// it did not or may not have (the claims decide what its pods are).
    pub fn answered(&self, batch: &super::index::Key, committed_against: Option<String>) {
        let mut inner = self.lock();
        match committed_against {
            Some(version) => {
                if let Some(grant) = inner.get_mut(batch) {
                    grant.committed_against = Some(version);
                }
            }
            None => {
                inner.remove(batch);
            }
        }
        drop(inner);
        self.answered.notify_waiters();
    }

    /// Forgets the committed grants of `pool` the batch cache has caught up with:
    /// `cached_version(batch)` is the resourceVersion the cache shows (`None`: no such batch).
    pub fn refresh(
        &self,
        pool: &super::index::Key,
        cached_version: impl Fn(&str) -> Option<String>,
    ) {
        self.lock().retain(|batch, grant| {
            grant.pool != *pool
                || match &grant.committed_against {
                    None => true,
                    Some(version) => cached_version(&batch.name).as_ref() == Some(version),
                }
        });
    }

    pub fn contains(&self, batch: &super::index::Key) -> bool {
        self.lock().contains_key(batch)
    }

    /// Whether `pool` has grant writes in flight.
    pub fn busy(&self, pool: &super::index::Key) -> bool {
        self.lock().values().any(|g| g.pool == *pool)
    }

    /// Resolves once every grant write sent has been answered.
    #[cfg(test)]
    pub async fn settled(&self) {
        loop {
            let notified = self.answered.notified();
            if self.lock().values().all(|g| g.committed_against.is_some()) {
                return;
            }
            notified.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<super::index::Key, Grant>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod in_flight_tests {
    use super::super::index::Key;
    use super::*;

    #[test]
    fn a_committed_grant_stays_in_flight_until_the_cache_shows_a_newer_batch() {
        let flights = InFlight::default();
        let pool = Key::new("ns", "p");
        let (a, b, c) = (
            Key::new("ns", "a"),
            Key::new("ns", "b"),
            Key::new("ns", "c"),
        );
        flights.start(a.clone(), pool.clone());
        flights.start(b.clone(), pool.clone());
        flights.start(c.clone(), Key::new("ns", "other"));
        flights.answered(&a, Some("7".into()));
        flights.answered(&b, None);
        assert!(
            !flights.contains(&b),
            "a refused or unknown grant is no longer in flight"
        );
        flights.refresh(&pool, |_| Some("7".into()));
        assert!(
            flights.contains(&a),
            "the cache still shows the version written against"
        );
        assert!(flights.busy(&pool));
        flights.refresh(&pool, |_| Some("8".into()));
        assert!(!flights.contains(&a), "the cache shows the write");
        assert!(!flights.busy(&pool));
        assert!(flights.contains(&c), "another pool's grants are its own");
        flights.refresh(&Key::new("ns", "other"), |_| None);
        assert!(flights.contains(&c), "an unanswered write stays in flight");
        flights.answered(&c, Some("3".into()));
        flights.refresh(&Key::new("ns", "other"), |_| None);
        assert!(!flights.contains(&c), "the cache shows the batch deleted");
    }
}

#[cfg(test)]
mod rejected_tests {
    use super::super::index::Key;
    use super::*;

    #[test]
    fn a_rejected_batch_is_held_back_for_a_growing_delay_until_a_grant_commits() {
        let rejected = RejectedGrants::default();
        let batch = Key::new("ns", "b");
        let start = Instant::now();
        assert!(!rejected.held_back(&batch, start));
        let first = rejected.rejected(batch.clone(), start, "denied".into());
        assert!(rejected.held_back(&batch, start + first / 2));
        assert!(!rejected.held_back(&batch, start + first));
        assert!(
            !rejected.held_back(&Key::new("ns", "other"), start),
            "only the rejected batch"
        );
        let later = start + first;
        let second = rejected.rejected(batch.clone(), later, "denied".into());
        let third = rejected.rejected(batch.clone(), later + second, "denied".into());
        // 200 ms doubling, each with up to its own size of jitter.
        assert!(first < Duration::from_millis(400), "{first:?}");
        assert!(second >= Duration::from_millis(400), "{second:?}");
        assert!(third >= Duration::from_millis(800), "{third:?}");
        rejected.committed(&batch);
        assert!(!rejected.held_back(&batch, later + second));
        let after_commit = rejected.rejected(batch.clone(), later + second, "denied".into());
        assert!(
            after_commit < Duration::from_millis(400),
            "a commit starts the backoff over: {after_commit:?}"
        );
    }

    #[test]
    fn the_last_rejection_is_told_until_a_grant_commits() {
        let rejected = RejectedGrants::default();
        let batch = Key::new("ns", "b");
        let start = Instant::now();
        assert_eq!(rejected.rejection(&batch, start), None);
        let first = rejected.rejected(batch.clone(), start, "forbidden".into());
        assert_eq!(
            rejected.rejection(&batch, start + first * 2).as_deref(),
            Some("forbidden"),
            "also once its retry is due: it has not succeeded"
        );
        rejected.rejected(batch.clone(), start + first, "denied by policy".into());
        assert_eq!(
            rejected.rejection(&batch, start + first).as_deref(),
            Some("denied by policy")
        );
        assert_eq!(rejected.rejection(&Key::new("ns", "other"), start), None);
        rejected.committed(&batch);
        assert_eq!(rejected.rejection(&batch, start + first), None);
    }

    #[test]
    fn rejections_are_forgotten_after_a_quiet_spell() {
        let rejected = RejectedGrants::default();
        let batch = Key::new("ns", "b");
        let start = Instant::now();
        let first = rejected.rejected(batch.clone(), start, "denied".into());
        let quiet = start + first + super::super::backoff::MAX_DELAY;
        assert_eq!(rejected.rejection(&batch, quiet), None, "forgotten");
        let again = rejected.rejected(batch.clone(), quiet, "denied".into());
        assert!(again < Duration::from_millis(400), "{again:?}");
    }
}
