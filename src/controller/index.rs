//! Indexes over the reflector caches, so a reconcile's cost grows with its own pool or batch and
//! never with the cluster: pods by pool and by batch, batches by pool, and the batches whose
//! ledgers name each pod.
//!
//! The groupings of pods and batches hold the store's own `Arc`s, so a reconcile reads its pool's
//! objects without a lookup per name. They are kept from the watch events (the router sees every
//! one right after the store applied it, before it wakes a reconcile) and rebuilt from the store on
//! every `InitDone`, because a relist replaces the store without Delete events for objects that
//! vanished meanwhile. So the indexes show what the store shows; every store change passes
//! through here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::cached_pod::CachedPod;
use kube::ResourceExt;

use sandbox_domain::allocation::{self, AllocStatus};
use sandbox_domain::api::{BatchSandbox, Pool, names};
use sandbox_domain::pod_template;
use sandbox_domain::released::Released;

/// `namespace/name` of a namespaced object, or of a group (a pool, a batch).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// Members per group, where each object belongs to at most one group. `V` is what is kept of a
/// member beside its name: the cached object itself for pods and batches, nothing otherwise.
#[derive(Debug)]
pub struct Grouping<V = ()> {
    members: HashMap<Key, BTreeMap<String, V>>,
    group_of: HashMap<Key, Key>,
}

impl<V> Default for Grouping<V> {
    fn default() -> Self {
        Self {
            members: HashMap::new(),
            group_of: HashMap::new(),
        }
    }
}

impl<V: Clone> Grouping<V> {
    /// Puts the object `namespace/name` in `group` (none: in no group), out of any other, and
    /// keeps `value` for it.
    pub fn set(&mut self, namespace: &str, name: &str, group: Option<&str>, value: V) {
        let object = Key::new(namespace, name);
        let wanted = group.map(|g| Key::new(namespace, g));
        if self.group_of.get(&object) != wanted.as_ref() {
            self.remove(namespace, name);
            if let Some(group) = &wanted {
                self.group_of.insert(object, group.clone());
            }
        }
        if let Some(group) = wanted {
            let members = self.members.entry(group).or_default();
            match members.get_mut(name) {
                Some(kept) => *kept = value,
                None => {
                    members.insert(name.to_string(), value);
                }
            }
        }
    }

    pub fn remove(&mut self, namespace: &str, name: &str) {
        if let Some(group) = self.group_of.remove(&Key::new(namespace, name))
            && let Some(members) = self.members.get_mut(&group)
        {
            members.remove(name);
            if members.is_empty() {
                self.members.remove(&group);
            }
        }
    }

    /// What is kept of the members of `namespace/group`, in name order.
    pub fn members(&self, namespace: &str, group: &str) -> Vec<V> {
        self.members
            .get(&Key::new(namespace, group))
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The names in `namespace/group`.
    pub fn names(&self, namespace: &str, group: &str) -> Vec<String> {
        self.members
            .get(&Key::new(namespace, group))
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn clear(&mut self) {
        self.members.clear();
        self.group_of.clear();
    }
}

/// A batch as its pool's rounds read it: the cached object, with its ledger and released shards
/// parsed once when the cache applied it rather than on every round of its pool.
#[derive(Clone, Debug)]
pub struct PoolBatch {
    pub batch: Arc<BatchSandbox>,
    /// Its ledger, or why it cannot be read (a corrupt ledger is never read as empty).
    pub ledger: Result<Arc<AllocStatus>, Arc<serde_json::Error>>,
    /// Shards released after their task finished.
    pub released: Arc<Released>,
}

impl PoolBatch {
    /// Whether its ledger shows every shard given a pod or released
    /// ([`allocation::Demand::fully_granted`]); an unreadable ledger shows nothing.
    pub fn fully_granted(&self) -> bool {
        self.ledger.as_ref().is_ok_and(|ledger| {
            allocation::Demand {
                replicas: self.batch.desired_replicas(),
                held: &ledger.pods,
                released: &self.released,
            }
            .fully_granted()
        })
    }

    pub fn of(batch: Arc<BatchSandbox>) -> Self {
        let released = Released::parse(
            batch
                .annotations()
                .get(names::ANNOTATION_TASK_RESULTS)
                .map(String::as_str),
        );
        Self {
            ledger: AllocStatus::of(&batch).map(Arc::new).map_err(Arc::new),
            released: Arc::new(released),
            batch,
        }
    }
}

/// Which batches' ledgers name each pod, per namespace; a batch whose ledger cannot be read may
/// hold any pod of its pool, so it is listed per pool instead.
#[derive(Debug, Default)]
pub struct Holders {
    by_pod: HashMap<Key, BTreeSet<String>>,
    ledger_of: HashMap<Key, Vec<String>>,
    unreadable: Grouping,
}

impl Holders {
    /// Records what `namespace/batch`'s ledger says now: `Ok(pods)`, or unreadable in `pool`.
    pub fn set(&mut self, namespace: &str, batch: &str, ledger: Result<Vec<String>, &str>) {
        self.remove(namespace, batch);
        match ledger {
            Ok(pods) => {
                for pod in &pods {
                    if !pod.is_empty() {
                        self.by_pod
                            .entry(Key::new(namespace, pod))
                            .or_default()
                            .insert(batch.to_string());
                    }
                }
                self.ledger_of.insert(Key::new(namespace, batch), pods);
            }
            Err(pool) => self.unreadable.set(namespace, batch, Some(pool), ()),
        }
    }

    pub fn remove(&mut self, namespace: &str, batch: &str) {
        self.unreadable.remove(namespace, batch);
        for pod in self
            .ledger_of
            .remove(&Key::new(namespace, batch))
            .unwrap_or_default()
        {
            let key = Key::new(namespace, &pod);
            if let Some(holders) = self.by_pod.get_mut(&key) {
                holders.remove(batch);
                if holders.is_empty() {
                    self.by_pod.remove(&key);
                }
            }
        }
    }

    /// Batches that may hold `namespace/pod` of `pool`: those whose ledger names it, and those
    /// of the pool whose ledger cannot be read.
    pub fn of(&self, namespace: &str, pod: &str, pool: &str) -> BTreeSet<String> {
        let mut batches = self
            .by_pod
            .get(&Key::new(namespace, pod))
            .cloned()
            .unwrap_or_default();
        batches.extend(self.unreadable.names(namespace, pool));
        batches
    }

    /// Whether a readable ledger in `namespace` names `pod`.
    pub fn named_by_readable(&self, namespace: &str, pod: &str) -> bool {
        self.by_pod.contains_key(&Key::new(namespace, pod))
    }

    fn clear(&mut self) {
        self.by_pod.clear();
        self.ledger_of.clear();
        self.unreadable.clear();
    }
}

/// The indexes, kept together under one lock.
#[derive(Debug, Default)]
pub struct Indexes {
    /// Pods by their pool label.
    pub pods_by_pool: Grouping<Arc<CachedPod>>,
    /// Pods by their batch label (a non-pooled batch's own pods).
    pub pods_by_batch: Grouping<Arc<CachedPod>>,
    /// Batches by the Pool they reference; those waiting for a Pool to be chosen are grouped
    /// under [`names::ANY_POOL`].
    pub batches_by_pool: Grouping<PoolBatch>,
    pub holders: Holders,
    /// Per batch, what its pool's allocation reads of it and what it is beside its status.
    batch_fingerprints: HashMap<Key, (u64, u64)>,
    /// Per pool, what its batches read of it and what it is beside its status.
    pool_fingerprints: HashMap<Key, (u64, u64)>,
    /// Per pod, what the reconcilers read of it.
    pod_fingerprints: HashMap<Key, u64>,
    /// Per pool, the revision of its template, worked out when its spec changes rather than in
    /// every round.
    pool_revisions: HashMap<Key, PoolRevision>,
}

/// A pool's template revision, with the object and generation it was worked out for.
#[derive(Debug)]
struct PoolRevision {
    uid: String,
    generation: i64,
    revision: String,
}

impl PoolRevision {
    /// Whether it was worked out from `pool`'s spec as it is: the same object, at the same
    /// generation (which the API server moves with every change of the spec).
    fn is_of(&self, pool: &Pool) -> bool {
        pool.metadata.uid.as_deref() == Some(self.uid.as_str())
            && pool.metadata.generation == Some(self.generation)
    }
}

/// What changed in a batch, as [`Indexes::batch_applied`] saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchChange {
    /// Its pool, replicas, ledger, released shards or deletion: what its pool allocates from.
    pub allocation: bool,
    /// Anything but its status (and resourceVersion).
    pub beyond_status: bool,
}

/// What changed in a pool, as [`Indexes::pool_applied`] saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolChange {
    /// What its batches read of it: its spec, its deletion, and whether it ran out of idle pods
    /// or room to grow.
    pub batches_read: bool,
    /// Anything but its status (and resourceVersion).
    pub beyond_status: bool,
}

fn hash_of(value: impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// A hash of an object's spec (by its generation) and metadata, without its status.
fn object_fingerprint(meta: &ObjectMeta) -> u64 {
    hash_of((
        &meta.uid,
        meta.generation,
        &meta.labels,
        &meta.annotations,
        &meta.finalizers,
        meta.deletion_timestamp
            .as_ref()
            .map(|t| t.0.as_nanosecond()),
    ))
}

/// A hash of what a pool's batches read of it: whether it exists as this object, its spec (by
/// its generation), its deletion, and its status's headroom (out of idle pods, exhausted).
fn pool_fingerprint(pool: &Pool) -> u64 {
    let status = pool.status.clone().unwrap_or_default();
    hash_of((
        &pool.metadata.uid,
        pool.metadata.generation,
        pool.metadata.deletion_timestamp.is_some(),
        status.headroom(pool.spec.capacity_spec.pool_max),
    ))
}

/// A hash of the fields of a batch its pool's allocation reads.
fn allocation_fingerprint(batch: &BatchSandbox, fully_granted: bool) -> u64 {
    let annotation = |key: &str| batch.annotations().get(key).cloned();
    hash_of((
        &batch.spec.pool_ref,
        batch.spec.replicas,
        // A batch going away changes its pool's round only if it still wanted pods: one fully
        // granted keeps holding them until it gives them back, by a write of its ledger or the
        // removal of its finalizer, which its pool sees.
        batch.metadata.deletion_timestamp.is_some() && !fully_granted,
        annotation(names::ANNOTATION_ALLOC_STATUS),
        annotation(names::ANNOTATION_TASK_RESULTS),
    ))
}

/// A hash of what the reconcilers read of a pod: its identity, labels, annotations and owners,
/// its deletion, phase, readiness and IP. A scheduler's binding, container status details and
/// the other conditions are none of their business, so such an update wakes nothing.
fn pod_fingerprint(pod: &Pod) -> u64 {
    let status = pod.status.as_ref();
    hash_of((
        &pod.metadata.uid,
        &pod.metadata.labels,
        &pod.metadata.annotations,
        pod.owner_references()
            .iter()
            .map(|o| (&o.uid, o.controller))
            .collect::<Vec<_>>(),
        pod.metadata.deletion_timestamp.is_some(),
        status.and_then(|s| s.phase.as_deref()),
        sandbox_domain::pods::is_running_and_ready(pod),
        sandbox_domain::pods::pod_ip(pod),
    ))
}

impl Indexes {
    /// Records a pod as the cache now shows it. Returns whether what the reconcilers read of it
    /// changed.
    pub fn pod_applied(&mut self, pod: &Arc<CachedPod>) -> bool {
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let fingerprint = pod_fingerprint(pod);
        let changed = self
            .pod_fingerprints
            .insert(Key::new(&ns, &name), fingerprint)
            != Some(fingerprint);
        let labels = pod.labels();
        self.pods_by_pool.set(
            &ns,
            &name,
            labels.get(names::LABEL_POOL_NAME).map(String::as_str),
            pod.clone(),
        );
        self.pods_by_batch.set(
            &ns,
            &name,
            labels.get(names::LABEL_BATCH_NAME).map(String::as_str),
            pod.clone(),
        );
        changed
    }

    /// Whether the indexes hold the pod `namespace/name`.
    pub fn knows_pod(&self, namespace: &str, name: &str) -> bool {
        self.pod_fingerprints
            .contains_key(&Key::new(namespace, name))
    }

    pub fn pod_deleted(&mut self, pod: &Pod) {
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        self.pods_by_pool.remove(&ns, &name);
        self.pods_by_batch.remove(&ns, &name);
        self.pod_fingerprints.remove(&Key::new(&ns, &name));
    }

    pub fn pods_relisted<'a>(&mut self, pods: impl IntoIterator<Item = &'a Arc<CachedPod>>) {
        self.pods_by_pool.clear();
        self.pods_by_batch.clear();
        self.pod_fingerprints.clear();
        for pod in pods {
            self.pod_applied(pod);
        }
    }

    /// Records a batch as the cache now shows it, and says what changed: a status write, the most
    /// frequent change, concerns neither the batch's reconcile (which wrote it) nor its pool.
    pub fn batch_applied(&mut self, batch: &Arc<BatchSandbox>) -> BatchChange {
        let (ns, name) = (batch.namespace().unwrap_or_default(), batch.name_any());
        let read = PoolBatch::of(batch.clone());
        let fingerprints = (
            allocation_fingerprint(batch, read.fully_granted()),
            object_fingerprint(&batch.metadata),
        );
        let previous = self
            .batch_fingerprints
            .insert(Key::new(&ns, &name), fingerprints);
        let changed = BatchChange {
            allocation: previous.map(|p| p.0) != Some(fingerprints.0),
            beyond_status: previous.map(|p| p.1) != Some(fingerprints.1),
        };
        let group = batch
            .pool_name()
            .or_else(|| batch.awaits_pool_selection().then_some(names::ANY_POOL));
        match batch.pool_name() {
            Some(pool) => self.holders.set(
                &ns,
                &name,
                read.ledger
                    .as_ref()
                    .map(|l| l.pods.clone())
                    .map_err(|_| pool),
            ),
            None => self.holders.remove(&ns, &name),
        }
        self.batches_by_pool.set(&ns, &name, group, read);
        changed
    }

    pub fn batch_deleted(&mut self, batch: &BatchSandbox) {
        let (ns, name) = (batch.namespace().unwrap_or_default(), batch.name_any());
        self.batches_by_pool.remove(&ns, &name);
        self.holders.remove(&ns, &name);
        self.batch_fingerprints.remove(&Key::new(&ns, &name));
    }

    /// Records a pool as the cache now shows it. Returns whether what its batches read of it
    /// changed: its own status writes, which only count pods, mostly do not.
    pub fn pool_applied(&mut self, pool: &Pool) -> PoolChange {
        let key = Key::new(&pool.namespace().unwrap_or_default(), &pool.name_any());
        let fingerprints = (pool_fingerprint(pool), object_fingerprint(&pool.metadata));
        let known = self
            .pool_revisions
            .get(&key)
            .is_some_and(|kept| kept.is_of(pool));
        if let (false, Some(uid), Some(generation)) =
            (known, &pool.metadata.uid, pool.metadata.generation)
        {
            self.pool_revisions.insert(
                key.clone(),
                PoolRevision {
                    uid: uid.clone(),
                    generation,
                    revision: pod_template::template_revision(&pool.spec.template),
                },
            );
        }
        let previous = self.pool_fingerprints.insert(key, fingerprints);
        PoolChange {
            batches_read: previous.map(|p| p.0) != Some(fingerprints.0),
            beyond_status: previous.map(|p| p.1) != Some(fingerprints.1),
        }
    }

    pub fn pool_deleted(&mut self, pool: &Pool) {
        let key = Key::new(&pool.namespace().unwrap_or_default(), &pool.name_any());
        self.pool_revisions.remove(&key);
        self.pool_fingerprints.remove(&key);
    }

    /// The revision of `pool`'s template ([`pod_template::template_revision`]), from what was
    /// worked out when the cache applied this spec of it, or worked out now.
    pub fn pool_revision(&self, pool: &Pool) -> String {
        let key = Key::new(&pool.namespace().unwrap_or_default(), &pool.name_any());
        match self.pool_revisions.get(&key) {
            Some(kept) if kept.is_of(pool) => kept.revision.clone(),
            _ => pod_template::template_revision(&pool.spec.template),
        }
    }

    pub fn batches_relisted<'a>(
        &mut self,
        batches: impl IntoIterator<Item = &'a Arc<BatchSandbox>>,
    ) {
        self.batches_by_pool.clear();
        self.holders.clear();
        self.batch_fingerprints.clear();
        for batch in batches {
            self.batch_applied(batch);
        }
    }
}

/// [`Indexes`] shared between the router (which keeps them) and the reconcilers (which read them).
#[derive(Debug, Default)]
pub struct CacheIndex {
    inner: Mutex<Indexes>,
}

impl CacheIndex {
    /// Runs `f` on the indexes under their lock.
    pub fn with<T>(&self, f: impl FnOnce(&mut Indexes) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn pod(name: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    fn cached(pod: Pod) -> Arc<CachedPod> {
        Arc::new(CachedPod::from(pod))
    }

    /// Pool `ns/p` with room for two pods.
    fn pool_of_two() -> Pool {
        let mut pool = Pool::new("p", sandbox_domain::api::PoolSpec::default());
        pool.metadata.namespace = Some("ns".into());
        pool.spec.capacity_spec.pool_max = 2;
        pool
    }

    fn batch(name: &str, pool_ref: &str, ledger: Option<&str>) -> BatchSandbox {
        let mut batch = BatchSandbox::new(
            name,
            sandbox_domain::api::BatchSandboxSpec {
                replicas: 1,
                pool_ref: Some(pool_ref.into()),
                ..Default::default()
            },
        );
        batch.metadata.namespace = Some("ns".into());
        batch.metadata.annotations = ledger
            .map(|l| BTreeMap::from([(names::ANNOTATION_ALLOC_STATUS.to_string(), l.to_string())]));
        batch
    }

    #[test]
    fn a_cached_pod_has_the_fingerprint_of_the_whole_pod_it_was_cut_from() {
        let served: Pod =
            serde_json::from_slice(super::super::cached_pod::SERVED_POOL_POD).expect("a pod");
        let cached = CachedPod::from(served.clone());
        assert_eq!(pod_fingerprint(&cached), pod_fingerprint(&served));

        let size = |pod: &Pod| serde_json::to_vec(pod).map(|b| b.len()).unwrap_or_default();
        assert!(
            size(&cached) * 2 < size(&served),
            "cached {} bytes of the served {}",
            size(&cached),
            size(&served)
        );
    }

    #[test]
    fn a_pod_change_counts_only_if_a_reconciler_reads_it() {
        use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};
        let mut index = Indexes::default();
        let mut pending = pod("a", &[(names::LABEL_POOL_NAME, "p")]);
        pending.status = Some(PodStatus {
            phase: Some("Pending".into()),
            ..PodStatus::default()
        });
        assert!(
            index.pod_applied(&cached(pending.clone())),
            "a new pod is a change"
        );
        assert!(
            !index.pod_applied(&cached(pending.clone())),
            "the same pod again is none"
        );

        // The scheduler binds it: nothing a reconciler reads.
        pending.spec = Some(PodSpec {
            node_name: Some("node-1".into()),
            ..PodSpec::default()
        });
        pending.status = Some(PodStatus {
            phase: Some("Pending".into()),
            conditions: Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        assert!(
            !index.pod_applied(&cached(pending.clone())),
            "a binding is no change"
        );

        let mut ready = pending.clone();
        let status = ready.status.as_mut().expect("a status");
        status.phase = Some("Running".into());
        status.pod_ip = Some("127.1.1.2".into());
        status.conditions = Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..PodCondition::default()
        }]);
        assert!(
            index.pod_applied(&cached(ready.clone())),
            "running, ready and an IP are a change"
        );

        let mut terminating = ready.clone();
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert!(
            index.pod_applied(&cached(terminating.clone())),
            "a deletion is a change"
        );

        let mut relabelled = ready.clone();
        relabelled
            .labels_mut()
            .insert(names::LABEL_EVICT.into(), "true".into());
        assert!(
            index.pod_applied(&cached(relabelled.clone())),
            "a label is a change"
        );

        index.pod_deleted(&relabelled);
        assert!(
            index.pod_applied(&cached(relabelled.clone())),
            "a pod seen again after a delete is new"
        );
    }

    #[test]
    fn a_pod_moves_between_groups_as_its_labels_change_and_leaves_on_delete() {
        let mut index = Indexes::default();
        index.pod_applied(&cached(pod("a", &[(names::LABEL_POOL_NAME, "p")])));
        index.pod_applied(&cached(pod("b", &[(names::LABEL_POOL_NAME, "p")])));
        assert_eq!(index.pods_by_pool.names("ns", "p"), ["a", "b"]);
        assert!(index.pods_by_pool.names("other", "p").is_empty());

        index.pod_applied(&cached(pod("a", &[(names::LABEL_POOL_NAME, "q")])));
        assert_eq!(index.pods_by_pool.names("ns", "p"), ["b"]);
        assert_eq!(index.pods_by_pool.names("ns", "q"), ["a"]);

        index.pod_applied(&cached(pod("b", &[(names::LABEL_BATCH_NAME, "web")])));
        assert!(index.pods_by_pool.names("ns", "p").is_empty());
        assert_eq!(index.pods_by_batch.names("ns", "web"), ["b"]);

        index.pod_deleted(&pod("b", &[]));
        assert!(index.pods_by_batch.names("ns", "web").is_empty());
    }

    #[test]
    fn a_group_hands_out_its_members_in_name_order() {
        let mut index = Indexes::default();
        for name in ["c", "a", "b"] {
            index.pod_applied(&cached(pod(name, &[(names::LABEL_POOL_NAME, "p")])));
        }
        let members: Vec<String> = index
            .pods_by_pool
            .members("ns", "p")
            .iter()
            .map(|p| p.name_any())
            .collect();
        assert_eq!(members, ["a", "b", "c"]);
    }

    #[test]
    fn a_group_hands_out_the_latest_version_of_each_member() {
        let mut index = Indexes::default();
        let pending = cached(pod("a", &[(names::LABEL_POOL_NAME, "p")]));
        index.pod_applied(&pending);
        let mut running = pod("a", &[(names::LABEL_POOL_NAME, "p")]);
        running.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        });
        let running = cached(running);
        index.pod_applied(&running);
        let members = index.pods_by_pool.members("ns", "p");
        assert_eq!(members.len(), 1);
        assert!(
            Arc::ptr_eq(&members[0], &running),
            "the update replaced the cached pod"
        );

        let claim = Arc::new(batch("x", "p", None));
        index.batch_applied(&claim);
        let granted = Arc::new(batch("x", "p", Some(r#"{"pods":["a"]}"#)));
        index.batch_applied(&granted);
        let batches = index.batches_by_pool.members("ns", "p");
        assert_eq!(batches.len(), 1);
        assert!(
            Arc::ptr_eq(&batches[0].batch, &granted),
            "the update replaced the cached batch"
        );
        assert_eq!(
            batches[0].ledger.as_ref().map(|l| l.pods.clone()).ok(),
            Some(vec!["a".to_string()]),
            "its ledger was read again with it"
        );
    }

    #[test]
    fn a_pool_batch_carries_its_parsed_ledger_and_released_shards() {
        let mut index = Indexes::default();
        let mut released = batch("r", "p", Some(r#"{"pods":["a",""]}"#));
        released.annotations_mut().insert(
            names::ANNOTATION_TASK_RESULTS.into(),
            r#"{"1":"Succeeded"}"#.into(),
        );
        index.batch_applied(&Arc::new(released));
        index.batch_applied(&Arc::new(batch("c", "p", Some("{corrupt"))));
        let batches = index.batches_by_pool.members("ns", "p");
        let [corrupt, read] = batches.as_slice() else {
            panic!("two batches in pool p: {batches:?}");
        };
        assert!(
            corrupt.ledger.is_err(),
            "a corrupt ledger is not read as empty"
        );
        assert_eq!(
            read.ledger.as_ref().map(|l| l.pods.clone()).ok(),
            Some(vec!["a".to_string(), String::new()])
        );
        assert!(read.released.contains(1) && !read.released.contains(0));
    }

    #[test]
    fn a_status_write_is_no_change_for_the_batch_nor_its_pool() {
        let mut index = Indexes::default();
        let both = BatchChange {
            allocation: true,
            beyond_status: true,
        };
        let mut claim = batch("x", "p", None);
        assert_eq!(
            index.batch_applied(&Arc::new(claim.clone())),
            both,
            "a new batch"
        );
        claim.status = Some(Default::default());
        claim.metadata.resource_version = Some("2".into());
        assert_eq!(
            index.batch_applied(&Arc::new(claim.clone())),
            BatchChange {
                allocation: false,
                beyond_status: false
            },
            "a status write"
        );
        claim
            .metadata
            .labels
            .get_or_insert_default()
            .insert("team".into(), "a".into());
        assert_eq!(
            index.batch_applied(&Arc::new(claim.clone())),
            BatchChange {
                allocation: false,
                beyond_status: true
            },
            "a label"
        );
        claim.spec.replicas = 2;
        claim.metadata.generation = Some(2);
        assert_eq!(
            index.batch_applied(&Arc::new(claim.clone())),
            both,
            "a scale-up"
        );
        claim.metadata.annotations.get_or_insert_default().insert(
            names::ANNOTATION_TASK_RESULTS.into(),
            r#"{"0":"Succeeded"}"#.into(),
        );
        assert_eq!(
            index.batch_applied(&Arc::new(claim.clone())),
            both,
            "a released shard"
        );
        claim.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert_eq!(
            index.batch_applied(&Arc::new(claim.clone())),
            both,
            "a deletion"
        );
        index.batch_deleted(&claim);
        assert_eq!(
            index.batch_applied(&Arc::new(claim.clone())),
            both,
            "known again after its Delete"
        );
    }

    #[test]
    fn a_pool_status_write_wakes_its_batches_only_when_the_pool_runs_out_or_turns_exhausted() {
        let mut index = Indexes::default();
        let mut pool = pool_of_two();
        let batches_read = |index: &mut Indexes, pool: &Pool| index.pool_applied(pool).batches_read;
        assert!(batches_read(&mut index, &pool), "a new pool");
        let counts = |total, available| sandbox_domain::api::PoolStatus {
            total,
            available,
            ..Default::default()
        };
        pool.status = Some(counts(1, 1));
        assert!(batches_read(&mut index, &pool), "an idle pod");
        pool.status = Some(counts(1, 2));
        assert!(!batches_read(&mut index, &pool), "only counts changed");
        pool.status = Some(counts(1, 0));
        assert!(batches_read(&mut index, &pool), "no idle pod left");
        pool.status = Some(counts(2, 0));
        assert!(batches_read(&mut index, &pool), "exhausted");
        pool.status = Some(counts(2, 1));
        assert!(batches_read(&mut index, &pool), "no longer exhausted");
        pool.status = Some(counts(2, 2));
        assert!(!batches_read(&mut index, &pool), "only counts changed");
        pool.status = Some(counts(1, 1));
        assert!(
            !batches_read(&mut index, &pool),
            "below poolMax again, with an idle pod left"
        );
        pool.metadata.generation = Some(2);
        assert!(batches_read(&mut index, &pool), "a spec change");
        index.pool_deleted(&pool);
        assert!(
            batches_read(&mut index, &pool),
            "known again after its Delete"
        );
    }

    #[test]
    fn only_what_a_pool_is_beside_its_status_counts_as_changing_the_pool_itself() {
        let mut index = Indexes::default();
        let mut pool = pool_of_two();
        let itself = |index: &mut Indexes, pool: &Pool| index.pool_applied(pool).beyond_status;
        assert!(itself(&mut index, &pool), "a new pool");
        pool.status = Some(sandbox_domain::api::PoolStatus {
            total: 2,
            ..Default::default()
        });
        pool.metadata.resource_version = Some("2".into());
        assert!(!itself(&mut index, &pool), "a status write");
        pool.status = None;
        assert!(!itself(&mut index, &pool), "the status cleared");
        type Change = (&'static str, fn(&mut ObjectMeta));
        let changes: [Change; 5] = [
            ("a spec change", |m| m.generation = Some(2)),
            ("an annotation", |m| {
                m.annotations = Some(BTreeMap::from([("policy".into(), "custom".into())]))
            }),
            ("a label", |m| {
                m.labels = Some(BTreeMap::from([("team".into(), "a".into())]))
            }),
            ("a finalizer", |m| {
                m.finalizers = Some(vec!["example.com/keep".into()])
            }),
            ("its deletion", |m| {
                m.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ))
            }),
        ];
        for (what, change) in changes {
            change(&mut pool.metadata);
            assert!(itself(&mut index, &pool), "{what}");
            assert!(!itself(&mut index, &pool), "{what}, seen again");
        }
        index.pool_deleted(&pool);
        assert!(itself(&mut index, &pool), "known again after its Delete");
    }

    #[test]
    fn a_pool_revision_is_worked_out_when_its_spec_is_applied_and_kept_for_that_generation() {
        use sandbox_domain::pod_template::template_revision;
        let mut index = Indexes::default();
        let mut pool = pool_of_two();
        pool.metadata.uid = Some("u1".into());
        pool.metadata.generation = Some(1);
        let image = |pool: &mut Pool, image: &str| {
            pool.spec.template.spec = Some(k8s_openapi::api::core::v1::PodSpec {
                containers: vec![k8s_openapi::api::core::v1::Container {
                    name: "c".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            });
        };
        image(&mut pool, "a");
        let first = template_revision(&pool.spec.template);
        index.pool_applied(&pool);
        assert_eq!(index.pool_revision(&pool), first);
        // Kept, not worked out again: the same object at the same generation. (The API server
        // moves the generation with every spec change; a changed template under the same
        // generation only shows which revision is read.)
        let mut same_generation = pool.clone();
        image(&mut same_generation, "b");
        assert_eq!(index.pool_revision(&same_generation), first);
        // A newer spec the index has not applied yet, and another object of the same name, are
        // worked out from what the reconcile holds.
        let mut newer = same_generation.clone();
        newer.metadata.generation = Some(2);
        let second = template_revision(&newer.spec.template);
        assert_ne!(first, second);
        assert_eq!(index.pool_revision(&newer), second);
        let mut other_object = same_generation.clone();
        other_object.metadata.uid = Some("u2".into());
        assert_eq!(index.pool_revision(&other_object), second);
        index.pool_applied(&newer);
        assert_eq!(index.pool_revision(&newer), second);
        index.pool_deleted(&newer);
        assert_eq!(
            index.pool_revision(&same_generation),
            second,
            "forgotten on delete"
        );
    }

    /// A relist drops objects that vanished while the watch was down, without Delete events.
    #[test]
    fn a_relist_forgets_what_it_no_longer_lists() {
        let mut index = Indexes::default();
        index.pod_applied(&cached(pod("gone", &[(names::LABEL_POOL_NAME, "p")])));
        index.batch_applied(&Arc::new(batch("gone", "p", Some(r#"{"pods":["gone"]}"#))));
        let kept = pod("kept", &[(names::LABEL_POOL_NAME, "p")]);
        index.pods_relisted([&cached(kept.clone())]);
        let kept_batch = batch("kept", "p", Some(r#"{"pods":["kept"]}"#));
        index.batches_relisted([&Arc::new(kept_batch.clone())]);
        assert_eq!(index.pods_by_pool.names("ns", "p"), ["kept"]);
        assert_eq!(index.batches_by_pool.names("ns", "p"), ["kept"]);
        assert!(index.holders.of("ns", "gone", "p").is_empty());
        assert_eq!(
            index.holders.of("ns", "kept", "p"),
            BTreeSet::from(["kept".to_string()])
        );
    }

    #[test]
    fn holders_follow_each_ledger_and_unreadable_ones_may_hold_any_pod_of_their_pool() {
        let mut index = Indexes::default();
        index.batch_applied(&Arc::new(batch("x", "p", Some(r#"{"pods":["a","b"]}"#))));
        index.batch_applied(&Arc::new(batch("y", "p", None)));
        index.batch_applied(&Arc::new(batch("choosing", names::ANY_POOL, None)));
        assert_eq!(index.batches_by_pool.names("ns", "p"), ["x", "y"]);
        assert_eq!(
            index.batches_by_pool.names("ns", names::ANY_POOL),
            ["choosing"]
        );
        assert_eq!(
            index.holders.of("ns", "a", "p"),
            BTreeSet::from(["x".to_string()])
        );

        // x gives back a; y's ledger turns unreadable.
        index.batch_applied(&Arc::new(batch("x", "p", Some(r#"{"pods":["","b"]}"#))));
        index.batch_applied(&Arc::new(batch("y", "p", Some("{"))));
        assert_eq!(
            index.holders.of("ns", "a", "p"),
            BTreeSet::from(["y".to_string()])
        );
        assert_eq!(
            index.holders.of("ns", "b", "p"),
            BTreeSet::from(["x".to_string(), "y".to_string()])
        );
        assert_eq!(
            index.holders.of("ns", "b", "q"),
            BTreeSet::from(["x".to_string()]),
            "an unreadable ledger may hold pods of its own pool only"
        );

        index.batch_deleted(&batch("x", "p", None));
        index.batch_applied(&Arc::new(batch("y", "p", Some(r#"{"pods":[]}"#))));
        assert!(index.holders.of("ns", "b", "p").is_empty());
        assert_eq!(index.batches_by_pool.names("ns", "p"), ["y"]);
    }
}
