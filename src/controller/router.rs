//! Maps every watch event to the reconciles it should trigger. Deletions are routed too (a pod
//! deleted by hand must wake its pool and its batch), which kube-runtime's shared streams skip.
//!
//! The router also keeps the cache indexes (see `index`): each event updates them before it wakes
//! anything, so a reconcile it wakes finds the object there; a relist rebuilds them.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Resource, ResourceExt};
use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

use super::Context;
use super::cached_pod::CachedPod;
use super::index::{BatchChange, Key, PoolChange};
use super::metrics::PoolWake;
use sandbox_domain::api::{BatchSandbox, Pool, names};

/// The store's own copy of an object the reflector just applied, so the indexes share it; the
/// event's copy only if the store no longer has it.
fn cached<K>(store: &Store<K>, obj: K) -> Arc<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .get(&ObjectRef::from_obj(&obj))
        .unwrap_or_else(|| Arc::new(obj))
}

/// The key a pool pod's expectations are kept under (`namespace/pool`), if it is a pool's.
fn pool_owner(pod: &Pod) -> Option<String> {
    let pool = pod.labels().get(names::LABEL_POOL_NAME)?;
    Some(format!("{}/{pool}", pod.namespace().unwrap_or_default()))
}

#[derive(Clone)]
pub struct Router {
    ctx: Arc<Context>,
    pools: UnboundedSender<ObjectRef<Pool>>,
    batches: UnboundedSender<ObjectRef<BatchSandbox>>,
}

impl Router {
    pub fn new(
        ctx: Arc<Context>,
        pools: UnboundedSender<ObjectRef<Pool>>,
        batches: UnboundedSender<ObjectRef<BatchSandbox>>,
    ) -> Self {
        Self {
            ctx,
            pools,
            batches,
        }
    }

    pub fn pod_event(&self, event: Result<Event<CachedPod>, watcher::Error>) {
        match event {
            Ok(Event::Apply(pod)) => {
                let cached = cached(&self.ctx.pods, pod);
                let (ns, name) = (cached.namespace().unwrap_or_default(), cached.name_any());
                let (known, changed) = self
                    .ctx
                    .index
                    .with(|i| (i.knows_pod(&ns, &name), i.pod_applied(&cached)));
                if changed {
                    let wake_pool = if known {
                        !self.counted_as_deleting(&cached)
                    } else {
                        !self.counted_as_starting(&cached)
                    };
                    self.pod_changed(&cached, wake_pool);
                }
            }
            Ok(Event::Delete(pod)) => {
                self.ctx.index.with(|i| i.pod_deleted(&pod));
                self.pod_changed(&pod, true);
            }
            Ok(Event::InitDone) => {
                let pods = self.ctx.pods.state();
                self.ctx.index.with(|i| i.pods_relisted(pods.iter()));
                self.everything();
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "pod watch error; retrying"),
        }
    }

    pub fn batch_event(&self, event: Result<Event<BatchSandbox>, watcher::Error>) {
        match event {
            Ok(Event::Apply(batch)) => {
                let cached = cached(&self.ctx.batches, batch);
                let change = self.ctx.index.with(|i| i.batch_applied(&cached));
                self.batch_changed(&cached, change);
                self.status_reported(&cached);
            }
            Ok(Event::Delete(batch)) => {
                self.ctx.index.with(|i| i.batch_deleted(&batch));
                self.ctx.recycled.forget(&batch);
                if let Some(uid) = batch.uid() {
                    self.ctx.remembered.forget(&uid);
                }
                self.batch_changed(
                    &batch,
                    BatchChange {
                        allocation: true,
                        beyond_status: true,
                    },
                );
            }
            Ok(Event::InitDone) => {
                let batches = self.ctx.batches.state();
                self.ctx.index.with(|i| i.batches_relisted(batches.iter()));
                self.ctx.recycled.forget_all_but(&batches);
                self.ctx
                    .remembered
                    .forget_all_but(&batches.iter().filter_map(|b| b.uid()).collect());
                self.everything();
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "BatchSandbox watch error; retrying"),
        }
    }

    /// Wakes the batch unless only its status changed (its own reconcile wrote it), and its
    /// pool if what the pool allocates from changed.
    fn batch_changed(&self, batch: &BatchSandbox, change: BatchChange) {
        let ns = batch.namespace().unwrap_or_default();
        if change.beyond_status {
            self.batch(&ns, &batch.name_any());
        }
        if let (true, Some(pool)) = (change.allocation, batch.pool_name()) {
            self.pool(&ns, pool, PoolWake::Batch);
        }
    }

    /// Wakes the batch's pool if its sizing waits for statuses and this was the last of them.
    fn status_reported(&self, batch: &BatchSandbox) {
        let Some(pool) = batch.pool_name() else {
            return;
        };
        let ns = batch.namespace().unwrap_or_default();
        if self.ctx.pacing.status_reported(
            &Key::new(&ns, pool),
            &batch.name_any(),
            super::pool::reported_pods(batch),
        ) {
            self.pool(&ns, pool, PoolWake::StatusReported);
        }
    }

    pub fn pool_event(&self, event: Result<Event<Pool>, watcher::Error>) {
        match event {
            Ok(Event::Apply(pool)) => {
                let change = self.ctx.index.with(|i| i.pool_applied(&pool));
                self.pool_changed(&pool, change);
            }
            Ok(Event::Delete(pool)) => {
                self.ctx.index.with(|i| i.pool_deleted(&pool));
                self.pool_changed(
                    &pool,
                    PoolChange {
                        batches_read: true,
                        beyond_status: true,
                    },
                );
            }
            Ok(Event::InitDone) => self.everything(),
            Ok(_) => {}
            Err(error) => warn!(%error, "Pool watch error; retrying"),
        }
    }

    /// Wakes the pool unless only its status changed: its own rounds write it, and a round
    /// reads it only to tell whether it must write it again. Wakes its batches when what they
    /// read of it changed (its own status writes mostly only count pods), and the batches
    /// waiting for a Pool to be chosen, which compare every pool's counts: this one may fit now.
    fn pool_changed(&self, pool: &Pool, change: PoolChange) {
        let ns = pool.namespace().unwrap_or_default();
        let name = pool.name_any();
        if change.beyond_status {
            self.pool(&ns, &name, PoolWake::Pool);
        }
        let groups: &[&str] = if change.batches_read {
            &[name.as_str(), names::ANY_POOL]
        } else {
            &[names::ANY_POOL]
        };
        for group in groups {
            for batch in self.ctx.batches_of_pool(&ns, group) {
                self.batch(&ns, &batch.name_any());
            }
        }
    }

    /// A pod first seen that its pool created and counts already, as a creation not yet seen,
    /// and that is still starting: its appearance changes nothing the pool's round computes
    /// (counts, sizing, idle pods), so it need not wake the pool; turning ready does.
    fn counted_as_starting(&self, pod: &CachedPod) -> bool {
        let starting = !pod.is_running_and_ready()
            && !pod.is_finished()
            && !sandbox_domain::pods::is_terminating(pod);
        starting
            && pool_owner(pod).is_some_and(|owner| {
                self.ctx
                    .expectations
                    .expects_creation(&owner, &pod.name_any())
            })
    }

    /// A pod turned terminating by a deletion this process sent: every round since the deletion
    /// was sent counts it as being deleted. A round of the pool that sent it planned with it; a
    /// batch that gave it back follows its deletions with a write the pool watches (its ledger,
    /// or the removal of its finalizer). So only the pod's removal wakes the pool again. A
    /// deletion that has not taken effect (the pod not terminating) still wakes it.
    fn counted_as_deleting(&self, pod: &CachedPod) -> bool {
        sandbox_domain::pods::is_terminating(pod)
            && pool_owner(pod).is_some_and(|owner| {
                self.ctx
                    .expectations
                    .expects_deletion(&owner, &pod.name_any())
            })
    }

    fn pod_changed(&self, pod: &Pod, wake_pool: bool) {
        let ns = pod.namespace().unwrap_or_default();
        let labels = pod.labels();
        if let Some(batch) = labels.get(names::LABEL_BATCH_NAME) {
            self.batch(&ns, batch);
        }
        if let Some(pool) = labels.get(names::LABEL_POOL_NAME) {
            if wake_pool {
                self.pool(&ns, pool, PoolWake::Pod);
            }
            // The batches whose ledgers name it; a corrupt ledger may hold it too: wake that
            // batch as well, so it reports the corruption.
            let holders = self
                .ctx
                .index
                .with(|i| i.holders.of(&ns, &pod.name_any(), pool));
            for batch in holders {
                self.batch(&ns, &batch);
            }
        }
    }

    /// After a (re)list, or a change of policies, every object is looked at again.
    pub(super) fn everything(&self) {
        for pool in self.ctx.pools.state() {
            self.ctx.metrics.pool_woken(PoolWake::Everything);
            let _ = self.pools.send(ObjectRef::from_obj(pool.as_ref()));
        }
        for batch in self.ctx.batches.state() {
            let _ = self.batches.send(ObjectRef::from_obj(batch.as_ref()));
        }
    }

    fn pool(&self, ns: &str, name: &str, cause: PoolWake) {
        self.ctx.metrics.pool_woken(cause);
        let _ = self.pools.send(ObjectRef::new(name).within(ns));
    }

    fn batch(&self, ns: &str, name: &str) {
        let _ = self.batches.send(ObjectRef::new(name).within(ns));
    }
}
