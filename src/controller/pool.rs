//! Pool reconciler: the only writer that hands pool pods to batches. It keeps the pool's size
//! where the sizing policy says, rolls idle pods to a new template, and drains on deletion.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tracing::{debug, info, warn};

use super::cached_pod::CachedPod;
use super::index::{Key, PoolBatch};
use super::metrics::PoolWake;
use super::pacing::{AwaitedStatus, Claims, Sizing, StatusChange, StatusWrite};
use super::{Context, Error, ledger_of, object_name, policy_selector};
use sandbox_decisions::sizing::{AllocationEvent, Bounds, PoolSnapshot};
use sandbox_domain::allocation::{self, AllocStatus, Demand, Grant};
use sandbox_domain::api::{BatchSandbox, Pool, PoolStatus, names};
use sandbox_domain::conditions::{self, Desired};
use sandbox_domain::endpoints;
use sandbox_domain::pod_template;
use sandbox_domain::pods;
use sandbox_domain::pool_plan::{self, MaxUnavailable, PoolCounts, PoolPod};
use sandbox_domain::released::Released;
use sandbox_policy::Decision;

pub async fn reconcile(pool: Arc<Pool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = ObjectRef::from_obj(pool.as_ref()).erase();
    let started = std::time::Instant::now();
    let result = reconcile_pool(&pool, &ctx).await;
    ctx.metrics
        .reconciled("Pool", started.elapsed(), result.as_ref().map(|_| ()));
    if result.is_ok() {
        ctx.backoff.on_success(&key);
    }
    result
}

/// What the reconcile sees of a pool.
struct Observed {
    namespace: String,
    name: String,
    revision: String,
    /// The pool's pods (owned by this pool object), terminating ones included, in name order.
    pods: Vec<Arc<CachedPod>>,
    /// Batches that reference this pool and whose ledgers can be read, oldest first.
    batches: Vec<LedgeredBatch>,
    /// Pods held by any batch's ledger or claimed by a write not yet seen.
    held: HashSet<String>,
    /// Pods this process deleted that the cache still shows as live.
    deleting: HashSet<String>,
    /// Pods this process created that the cache does not show yet.
    unseen_creations: u32,
}

/// A batch of the pool with its readable ledger, as the cache index parsed them.
struct LedgeredBatch {
    batch: Arc<BatchSandbox>,
    ledger: Arc<AllocStatus>,
    released: Arc<Released>,
}

impl Observed {
    fn gather(pool: &Pool, ctx: &Context) -> Result<Self, Error> {
        let namespace = pool.namespace().unwrap_or_default();
        let name = pool.name_any();
        let uid = pool.uid().unwrap_or_default();
        // Owned pods, and pods labelled with the pool that nothing owns: a pool deleted with
        // `--cascade=orphan` strips its pods' owner references, and they must still be drained.
        let pods: Vec<Arc<CachedPod>> = ctx
            .pool_pods(&namespace, &name)
            .into_iter()
            .filter(|p| {
                p.owner_references().iter().any(|o| o.uid == uid) || p.owner_references().is_empty()
            })
            .collect();
        // The index keeps each pool's pods in a map by name, so they come in name order, which
        // the round's binary searches rely on.
        debug_assert!(pods.is_sorted_by(|a, b| pods::pod_name(a) < pods::pod_name(b)));
        let mut batches = Vec::new();
        let mut unreadable = Vec::new();
        for PoolBatch {
            batch,
            ledger,
            released,
        } in ctx.pool_batches(&namespace, &name)
        {
            match ledger {
                Ok(ledger) => {
                    ctx.ledgers.remember(&batch, &ledger);
                    batches.push(LedgeredBatch {
                        batch,
                        ledger,
                        released,
                    });
                }
                // One unreadable ledger must not stall the pool: its batch is left out (it
                // reports the problem itself), and the pods it last held stay held.
                Err(error) => {
                    debug!(batch = %object_name(batch.as_ref()), %error, "leaving a batch with an unreadable ledger out of allocation");
                    unreadable.push(batch);
                }
            }
        }
        batches.sort_by(|a, b| creation_order(&a.batch).cmp(&creation_order(&b.batch)));
        let seen_held = allocation::held_pods(batches.iter().map(|b| b.ledger.as_ref()));
        let mut held: HashSet<String> = seen_held.iter().map(|p| p.to_string()).collect();
        for batch in &unreadable {
            held.extend(ctx.pods_an_unreadable_ledger_may_hold(batch, &name));
        }
        held.extend(ctx.claims.current(&namespace, |batch| {
            ctx.batches
                .get(&ObjectRef::new(batch).within(&namespace))
                .and_then(|b| b.resource_version())
        }));

        let cached = |name: &str| position_of(&pods, name).ok().map(|i| &pods[i]);
        let (unseen_creations, deleting) = ctx.expectations.pending(
            &format!("{namespace}/{name}"),
            |pod| cached(pod).is_some(),
            |pod| cached(pod).is_some_and(|p| !pods::is_terminating(p)),
        );
        Ok(Self {
            revision: ctx.index.with(|i| i.pool_revision(pool)),
            namespace,
            name,
            pods,
            batches,
            held,
            deleting,
            unseen_creations,
        })
    }

    fn owner_key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Pods that still count: not terminating and not being deleted by us.
    fn live_pods(&self) -> impl Iterator<Item = &Arc<CachedPod>> {
        self.pods
            .iter()
            .filter(|p| !pods::is_terminating(p) && !self.deleting.contains(pods::pod_name(p)))
    }

    fn pod(&self, name: &str) -> Option<&Arc<CachedPod>> {
        self.position(name).ok().map(|i| &self.pods[i])
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        position_of(&self.pods, name)
    }

    fn usable(&self, name: &str) -> bool {
        self.pod(name).is_some_and(|p| {
            !pods::is_terminating(p) && !self.deleting.contains(name) && p.is_live()
        })
    }

    /// Idle Running+Ready pods, current template first, each in name order.
    fn idle_ready(&self) -> Vec<&str> {
        let mut idle: Vec<(bool, &str)> = self
            .live_pods()
            .filter(|p| {
                p.is_live()
                    && p.is_running_and_ready()
                    && !p.is_evicted()
                    && !self.held.contains(pods::pod_name(p))
            })
            .map(|p| (!self.is_current(p), pods::pod_name(p)))
            .collect();
        // Stable: the pods come in name order.
        idle.sort_by_key(|&(stale, _)| stale);
        idle.into_iter().map(|(_, name)| name).collect()
    }

    fn is_current(&self, pod: &CachedPod) -> bool {
        pod.pool_revision() == Some(self.revision.as_str())
    }

    fn pod_ip(&self, name: &str) -> Option<&str> {
        self.pod(name).and_then(|p| pods::pod_ip(p))
    }

    fn key(&self) -> Key {
        Key::new(&self.namespace, &self.name)
    }

    /// The batches whose status counts fewer pods than their ledger serves: their status
    /// writes are still to come.
    fn statuses_behind_ledgers(&self) -> Vec<AwaitedStatus> {
        self.batches
            .iter()
            .filter(|b| b.batch.metadata.deletion_timestamp.is_none())
            .filter_map(|b| {
                let served = Demand {
                    replicas: b.batch.desired_replicas(),
                    held: &b.ledger.pods,
                    released: &b.released,
                }
                .served(|pod| self.usable(pod));
                (reported_pods(&b.batch) < served).then(|| AwaitedStatus {
                    batch: b.batch.name_any(),
                    allocated: served,
                })
            })
            .collect()
    }
}

/// The pods a batch's status counts as allocated.
pub(super) fn reported_pods(batch: &BatchSandbox) -> usize {
    let allocated = batch.status.as_ref().map_or(0, |s| s.allocated);
    usize::try_from(allocated).unwrap_or(0)
}

/// Oldest first, by name among batches created in the same second; borrowed, as a round sorts
/// every batch of its pool.
fn creation_order(batch: &BatchSandbox) -> (Option<Timestamp>, &str) {
    (
        batch.metadata.creation_timestamp.as_ref().map(|t| t.0),
        batch.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Where the pod `name` is in `pods` (in name order), or where it would go.
fn position_of(pods: &[Arc<CachedPod>], name: &str) -> Result<usize, usize> {
    pods.binary_search_by(|p| pods::pod_name(p).cmp(name))
}

async fn reconcile_pool(pool: &Pool, ctx: &Arc<Context>) -> Result<Action, Error> {
    let mut observed = Observed::gather(pool, ctx)?;
    if pool.metadata.deletion_timestamp.is_some() {
        ctx.pacing.forget(&observed.key());
        ctx.held_pods_gone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&observed.key());
        return drain(pool, ctx, &observed).await;
    }
    if !pool.finalizers().iter().any(|f| f == names::FINALIZER_POOL) {
        ctx.add_finalizer::<Pool>(pool, names::FINALIZER_POOL)
            .await?;
    }

    // Pods a Pool deleted with `--cascade=orphan` left behind: adopted, or replaced.
    let adopted = super::adopt::orphans(
        pool,
        ctx,
        &observed.pods,
        &observed.held,
        &observed.deleting,
        &observed.revision,
    );
    observed.deleting.extend(adopted.await?);
    confirm_held_pods_missing_from_cache(ctx, &mut observed, pool).await?;
    // Claims first, and nothing else while they are being served: grants go out without waiting
    // for each other, and sizing (refills) and the status wait behind them (see `pacing`).
    let round = allocate(ctx, &mut observed)?;
    let key = observed.key();
    let (claims, behind) = if round.unmet > 0 {
        (Claims::Short, Vec::new())
    } else if round.granted > 0 {
        let batches = round.batches;
        (Claims::Granted { batches }, Vec::new())
    } else if ctx.grants_in_flight.busy(&key) {
        (Claims::Writing, Vec::new())
    } else {
        (Claims::Reporting, observed.statuses_behind_ledgers())
    };
    let now = std::time::Instant::now();
    let sizing = ctx.pacing.with(&key, |pace| {
        // Read again under the lock the router takes to tell the pool a status came: one that
        // landed since the round gathered its view is seen here or finds the round's record.
        let behind: Vec<AwaitedStatus> = behind
            .into_iter()
            .filter(|awaited| {
                ctx.batches
                    .get(&ObjectRef::new(&awaited.batch).within(&observed.namespace))
                    .is_some_and(|batch| reported_pods(&batch) < awaited.allocated)
            })
            .collect();
        let claims = match claims {
            Claims::Reporting if behind.is_empty() => Claims::Served,
            claims => claims,
        };
        pace.sizing_awaiting(now, claims, behind)
    });
    if let Sizing::Defer(recheck) = sizing {
        // Each grant sent in this round wakes its pool when it ends: committed, by its batch's
        // watch event (the ledger changed); otherwise by an explicit wake-up. A timed look is
        // left for grants of earlier rounds, whose answer may come after their event, and for
        // the end of the quiet time after the last claim. Behind statuses, the event of the
        // last one awaited wakes the pool.
        return Ok(if round.granted > 0 {
            Action::await_change()
        } else {
            Action::requeue(recheck)
        });
    }
    // The round's view of its pods serves sizing and the status alike: neither changes it.
    let plan = plan_pods(&observed);
    let counts = pool_plan::counts(&plan, observed.unseen_creations);
    let degraded = resize(pool, ctx, &observed, &plan, counts, round.unmet).await?;
    let status_due = write_status(pool, ctx, &observed, counts, degraded, None).await?;
    Ok(Action::requeue(
        status_due.map_or(ctx.config.resync, |due| due.min(ctx.config.resync)),
    ))
}

/// Held pods the pod cache does not show are read afresh before the round plans. The pod cache
/// lags the batch cache at times (a watch reconnecting, a stalled connection), and a round that
/// took such a pod for lost would refill its shard and drop it from the ledger unrecycled: once
/// the cache caught up it would be idle, with its previous holder's processes still in it. A
/// pod that exists is added to what the round sees; only one the API server says is gone (or is
/// not this pool's) is replaced. Names confirmed gone are remembered per pool while a ledger still
/// names them, so a shard waiting for a replacement costs one read, not one per round.
async fn confirm_held_pods_missing_from_cache(
    ctx: &Context,
    observed: &mut Observed,
    pool: &Pool,
) -> Result<(), Error> {
    let missing: HashSet<String> = observed
        .batches
        .iter()
        .filter(|b| b.batch.metadata.deletion_timestamp.is_none())
        .flat_map(|b| b.ledger.pods.iter())
        .filter(|name| !name.is_empty() && observed.pod(name).is_none())
        .cloned()
        .collect();
    let known_gone = {
        let mut gone = ctx.held_pods_gone.lock().unwrap_or_else(|e| e.into_inner());
        let entry = gone.entry(observed.key()).or_default();
        // Forget names no ledger waits on any more, or that the cache shows again.
        entry.retain(|name| missing.contains(name));
        entry.clone()
    };
    let uid = pool.uid();
    let mut newly_gone = Vec::new();
    for name in missing.difference(&known_gone) {
        match ctx
            .api::<CachedPod>(&observed.namespace)
            .get_opt(name)
            .await?
        {
            Some(pod) if allocation::belongs_to_pool(&pod, &observed.name, uid.as_deref()) => {
                debug!(pool = %observed.owner_key(), pod = %name, "a held pod the cache does not show yet stays held");
                if let Err(at) = observed.position(name) {
                    observed.pods.insert(at, Arc::new(pod));
                }
            }
            _ => newly_gone.push(name.clone()),
        }
    }
    if !newly_gone.is_empty() {
        ctx.held_pods_gone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(observed.key())
            .or_default()
            .extend(newly_gone);
    }
    Ok(())
}

/// What one allocation round did.
struct Round {
    /// Pods granted (their writes are in flight).
    granted: usize,
    /// Batches granted pods.
    batches: usize,
    /// Shards still without a pod.
    unmet: u32,
}

/// Hands idle pods to batches that want them. The grant writes are sent in the background, each
/// settled on its own (see [`settle_grant`]): a round never waits for the API server, so the next
/// one can serve the claims that arrived meanwhile.
fn allocate(ctx: &Arc<Context>, observed: &mut Observed) -> Result<Round, Error> {
    let now = std::time::Instant::now();
    ctx.grants_in_flight.refresh(&observed.key(), |batch| {
        ctx.batches
            .get(&ObjectRef::new(batch).within(&observed.namespace))
            .and_then(|b| b.resource_version())
    });
    let wanting: Vec<&LedgeredBatch> = observed
        .batches
        .iter()
        .filter(|b| b.batch.metadata.deletion_timestamp.is_none())
        .filter(|b| {
            let key = Key::new(&observed.namespace, &b.batch.name_any());
            !ctx.grants_in_flight.contains(&key) && !ctx.rejected_grants.held_back(&key, now)
        })
        .collect();
    let demands: Vec<Demand> = wanting
        .iter()
        .map(|b| Demand {
            replicas: b.batch.desired_replicas(),
            held: &b.ledger.pods,
            released: &b.released,
        })
        .collect();
    let idle = observed.idle_ready();
    let plan = allocation::plan(&demands, |pod| observed.usable(pod), &idle);
    let granted: usize = plan.grants.iter().map(|g| g.granted.len()).sum();
    ctx.idle_left
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(observed.key(), idle.len().saturating_sub(granted));
    if plan.grants.is_empty() {
        return Ok(Round {
            granted: 0,
            batches: 0,
            unmet: plan.unmet,
        });
    }
    // A replica that cannot prove its lease plans nothing; each write checks again right before
    // it is sent.
    ctx.config.fence.check()?;

    // Claimed before the writes go out: a write whose outcome is unknown must keep its pods
    // held, or the next round could hand them to another batch.
    for grant in &plan.grants {
        let batch = wanting[grant.demand].batch.clone();
        ctx.claims.record(
            &observed.namespace,
            &batch.name_any(),
            &batch.resource_version().unwrap_or_default(),
            grant.granted.iter().cloned(),
        );
        observed.held.extend(grant.granted.iter().cloned());
        let patch = grant_patch(ctx, observed, &batch, grant);
        let batch_key = Key::new(&observed.namespace, &batch.name_any());
        ctx.grants_in_flight
            .start(batch_key.clone(), observed.key());
        let (ctx, pool, grant) = (ctx.clone(), observed.key(), grant.clone());
        tokio::spawn(async move {
            let settled = settle_grant(&ctx, &pool, &batch, &grant, patch).await;
            let version = batch.resource_version().unwrap_or_default();
            ctx.grants_in_flight.answered(
                &batch_key,
                matches!(settled, Settled::Committed).then_some(version),
            );
            match settled {
                // Its batch's watch event wakes the pool.
                Settled::Committed => ctx.rejected_grants.committed(&batch_key),
                // No event comes: the pods are free again, and the round that deferred sizing
                // behind this grant left no timed look.
                Settled::Refused => ctx.wake_pool(&pool.namespace, &pool.name, PoolWake::Grant),
                // The same write would be rejected again: the batch waits out its backoff,
                // and its owner learns why it gets no pods.
                Settled::Rejected(message) => {
                    let delay = ctx.rejected_grants.rejected(
                        batch_key,
                        std::time::Instant::now(),
                        message.clone(),
                    );
                    warn!(batch = %object_name(batch.as_ref()), %message, retry_in = ?delay, "grant rejected by the API server; the batch is held back");
                    ctx.event(
                        batch.as_ref(),
                        EventType::Warning,
                        "AllocationRejected",
                        format!(
                            "the API server rejected the allocation of {} pod(s) from pool {}: {message}; retrying in {} ms",
                            grant.granted.len(),
                            pool.name,
                            delay.as_millis()
                        ),
                    )
                    .await;
                    // Its status tells why it has no pods (its first reconcile may have left
                    // the status to the grant). The pods are free again and sizing waited
                    // behind this grant: the pool's other batches need not wait out the backoff.
                    ctx.wake_batch(&pool.namespace, &batch.name_any());
                    ctx.wake_pool(&pool.namespace, &pool.name, PoolWake::Grant);
                    tokio::time::sleep(delay).await;
                    ctx.wake_pool(&pool.namespace, &pool.name, PoolWake::Grant);
                }
                // The batch changed: its pool plans it again from the new state (its event may
                // have come while this write was in flight, when it was left out).
                Settled::LostRace => ctx.wake_pool(&pool.namespace, &pool.name, PoolWake::Grant),
                Settled::Unknown => {
                    tokio::time::sleep(UNKNOWN_GRANT_RETRY).await;
                    ctx.wake_pool(&pool.namespace, &pool.name, PoolWake::Grant);
                }
            }
        });
    }
    debug!(pool = %observed.owner_key(), granted, unmet = plan.unmet, "allocation round");
    Ok(Round {
        granted,
        batches: plan.grants.len(),
        unmet: plan.unmet,
    })
}

/// How long a grant whose outcome is unknown waits before its pool plans the batch again.
const UNKNOWN_GRANT_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// How a grant write ended, for what comes next.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Settled {
    Committed,
    /// Refused because the batch changed since the cache showed it.
    LostRace,
    /// Refused because of this process or the batch's moment (fenced, the batch gone or moved
    /// on): planning it again from fresh state may succeed.
    Refused,
    /// Rejected by the API server for what it is (forbidden, invalid, denied by an admission
    /// webhook), with the server's message: the same write would be rejected again.
    Rejected(String),
    /// Not known: the claim stays until the cache moves past the version written against.
    Unknown,
}

/// Sends one grant and acts on its outcome: the claim stays on success or an unknown outcome and
/// goes on a definite refusal.
async fn settle_grant(
    ctx: &Context,
    pool: &Key,
    batch: &BatchSandbox,
    grant: &Grant,
    patch: serde_json::Value,
) -> Settled {
    let namespace = &pool.namespace;
    let version = batch.resource_version().unwrap_or_default();
    let outcome = match write_grant(ctx, namespace, batch, &patch).await {
        Ok(()) => GrantOutcome::Committed,
        Err(error) if error.is_definite_refusal() => GrantOutcome::Refused(error),
        Err(error) => resolve(ctx, namespace, batch, grant, error).await,
    };
    match outcome {
        GrantOutcome::Committed => {
            let complete =
                grant.pods.iter().filter(|p| !p.is_empty()).count() >= batch.desired_replicas();
            if let (true, Some(created)) = (complete, &batch.metadata.creation_timestamp) {
                let waited = Timestamp::now().duration_since(created.0);
                ctx.metrics
                    .claimed(namespace, &pool.name, waited.try_into().unwrap_or_default());
            }
            Settled::Committed
        }
        GrantOutcome::Refused(error) => {
            debug!(%error, batch = %batch.name_any(), "grant refused; its pods are free again");
            ctx.claims
                .refused(namespace, &batch.name_any(), &version, &grant.granted);
            if error.is_lost_race() {
                Settled::LostRace
            } else if let Some(message) = rejection(&error) {
                Settled::Rejected(message)
            } else {
                Settled::Refused
            }
        }
        GrantOutcome::Unknown(error) => {
            warn!(%error, batch = %batch.name_any(), "grant outcome unknown; its pods stay held until the cache shows the batch");
            Settled::Unknown
        }
    }
}

/// The API server's message when it rejected a write for what it is, rather than for the
/// moment it came at (a lost race, a gone batch, a timeout, throttling).
fn rejection(error: &Error) -> Option<String> {
    match error {
        Error::Kube(kube::Error::Api(status))
            if (400..500).contains(&status.code)
                && !matches!(status.code, 404 | 408 | 409 | 429) =>
        {
            Some(status.message.clone())
        }
        _ => None,
    }
}

/// What became of one grant write.
enum GrantOutcome {
    /// The batch holds the pods (the write succeeded, or a fresh read shows it committed).
    Committed,
    /// The write did not and never will take effect.
    Refused(Error),
    /// Not known yet; the claim stays until the cache moves past the version written against.
    Unknown(Error),
}

/// Settles an ambiguous grant write with a fresh read of the batch. The write was conditional on
/// the batch's resourceVersion: if the batch has moved on without the granted pods, it can never
/// commit; if it still shows that version, the write may yet land and the claim stays.
async fn resolve(
    ctx: &Context,
    namespace: &str,
    batch: &BatchSandbox,
    grant: &Grant,
    error: Error,
) -> GrantOutcome {
    let fresh = match ctx
        .api::<BatchSandbox>(namespace)
        .get_opt(&batch.name_any())
        .await
    {
        Ok(fresh) => fresh,
        Err(read_error) => {
            debug!(%read_error, "could not read the batch to settle a grant");
            return GrantOutcome::Unknown(error);
        }
    };
    let Some(fresh) = fresh else {
        return GrantOutcome::Refused(error);
    };
    if fresh.resource_version() == batch.resource_version() {
        return GrantOutcome::Unknown(error);
    }
    let holds_all = ledger_of(&fresh).is_ok_and(|ledger| {
        grant
            .granted
            .iter()
            .all(|pod| ledger.pods.iter().any(|p| p == pod))
    });
    if holds_all {
        GrantOutcome::Committed
    } else {
        GrantOutcome::Refused(error)
    }
}

/// One write per batch: its new ledger, its endpoints and the cleanup finalizer, conditional on
/// the batch's resourceVersion, so a concurrent writer (a scale-down, another leader) makes it
/// fail rather than be overwritten.
fn grant_patch(
    ctx: &Context,
    observed: &Observed,
    batch: &BatchSandbox,
    grant: &Grant,
) -> serde_json::Value {
    let ledger = AllocStatus {
        pods: grant.pods.clone(),
        pool_ref: Some(observed.name.clone()),
    };
    let ips: Vec<Option<&str>> = grant.pods.iter().map(|p| observed.pod_ip(p)).collect();
    let mut finalizers = batch.finalizers().to_vec();
    if !finalizers.iter().any(|f| f == names::FINALIZER_BATCH) {
        finalizers.push(names::FINALIZER_BATCH.to_string());
    }
    json!({
        "metadata": {
            "resourceVersion": batch.resource_version(),
            "finalizers": finalizers,
            "annotations": {
                names::ANNOTATION_ALLOC_STATUS: ledger.to_annotation(),
                names::ANNOTATION_ENDPOINTS: endpoints::render(&ips, ctx.config.endpoints_format.for_labels(batch.labels())),
            }
        }
    })
}

async fn write_grant(
    ctx: &Context,
    namespace: &str,
    batch: &BatchSandbox,
    patch: &serde_json::Value,
) -> Result<(), Error> {
    // Fenced right before the write: a replica that can no longer prove its lease must not
    // hand out pods a successor may be handing out too.
    ctx.config.fence.check()?;
    ctx.merge_patch::<BatchSandbox>(namespace, &batch.name_any(), patch)
        .await?;
    Ok(())
}

/// Applies the sizing policy. Returns the policy's degradation reason, if it fell back.
///
/// New pods are named here and expected at once, then created in the background: reconciles of
/// one pool are serial, and a refill must not hold up the next allocation round.
async fn resize(
    pool: &Pool,
    ctx: &Arc<Context>,
    observed: &Observed,
    plan_pods: &[PoolPod<'_>],
    counts: PoolCounts,
    unmet: u32,
) -> Result<Option<String>, Error> {
    let caps = pool.spec.capacity_spec;
    let snapshot = PoolSnapshot {
        pool_name: observed.name.clone(),
        bounds: Bounds {
            buffer_min: non_negative(caps.buffer_min),
            buffer_max: non_negative(caps.buffer_max),
            pool_min: non_negative(caps.pool_min),
            pool_max: non_negative(caps.pool_max),
        },
        total: counts.total,
        allocated: counts.allocated,
        available: counts.available,
        pending: counts.pending,
        terminating: (observed.pods.len() - observed.live_pods().count()) as u32,
        unmet_demand: unmet,
        recent_allocations: recent_allocations(observed),
        now_unix_ms: Timestamp::now().as_millisecond(),
    };
    let selector = policy_selector(pool, Decision::PoolSizing);
    let outcome = ctx
        .decide(selector, move |p, s| p.pool_sizing(s, &snapshot))
        .await?;
    let changes = pool_plan::changes(
        plan_pods,
        observed.unseen_creations,
        outcome.decision.desired_total,
        pacing(pool),
    );
    if changes.create > 0 || !changes.delete.is_empty() {
        info!(pool = %observed.owner_key(), create = changes.create, delete = changes.delete.len(), reason = %outcome.decision.reason, "resizing pool");
    }

    let owner = ctx.owner_reference(pool);
    for _ in 0..changes.create {
        let name = ctx.next_pod_name(&observed.name);
        let pod = pod_template::pool_pod(
            &observed.name,
            name.clone(),
            &pool.spec.template,
            &observed.revision,
            owner.clone(),
        );
        let owner_key = observed.owner_key();
        let mut pod = pod;
        pod.annotations_mut()
            .insert(names::ANNOTATION_POD_MAKER.into(), ctx.incarnation.clone());
        ctx.config
            .executor
            .prepare(&mut pod, ctx.config.executor.for_pool(pool));
        ctx.expectations.created(&owner_key, name.clone());
        let (ctx, namespace) = (ctx.clone(), observed.namespace.clone());
        tokio::spawn(async move {
            let _permit = ctx.pod_writes.acquire().await;
            if let Err(error) = ctx.create_pod(&namespace, pod).await {
                warn!(%error, pod = %name, "creating pool pod failed; the next round retries");
                ctx.expectations.creation_failed(&owner_key, &name);
            }
        });
    }
    delete_pods(ctx, observed, changes.delete).await?;

    if let Some(reason) = &outcome.degraded {
        ctx.event(pool, EventType::Warning, "PolicyDegraded", reason.clone())
            .await;
    }
    Ok(outcome.degraded)
}

fn plan_pods(observed: &Observed) -> Vec<PoolPod<'_>> {
    observed
        .live_pods()
        .map(|p| PoolPod {
            name: pods::pod_name(p),
            allocated: observed.held.contains(pods::pod_name(p)),
            ready: p.is_running_and_ready(),
            dead: p.is_finished(),
            current_revision: observed.is_current(p),
            evict: p.is_evicted(),
        })
        .collect()
}

/// An operator asked for this pod to be taken out of service (see [`names::LABEL_EVICT`]).
/// The pool's `scaleStrategy` and `updateStrategy` budgets.
fn pacing(pool: &Pool) -> pool_plan::Pacing {
    pool_plan::Pacing {
        scale: MaxUnavailable::resolve(pool.spec.scale_max_unavailable()),
        update: MaxUnavailable::resolve(pool.spec.update_max_unavailable()),
    }
}

/// Allocation history for sizing policies, derived from the batches themselves (their creation
/// time and how many pods they hold), so it survives restarts.
fn recent_allocations(observed: &Observed) -> Vec<AllocationEvent> {
    let mut events: Vec<AllocationEvent> = observed
        .batches
        .iter()
        .filter_map(|LedgeredBatch { batch, ledger, .. }| {
            let at = batch
                .metadata
                .creation_timestamp
                .as_ref()?
                .0
                .as_millisecond();
            (!ledger.pods.is_empty()).then_some(AllocationEvent {
                at_unix_ms: at,
                count: ledger.pods.len() as u32,
            })
        })
        .collect();
    events.sort_by_key(|e| e.at_unix_ms);
    let keep = events.len().saturating_sub(64);
    events.split_off(keep)
}

async fn delete_pods(ctx: &Context, observed: &Observed, names: Vec<String>) -> Result<(), Error> {
    ctx.delete_pods(&observed.namespace, Some(&observed.name), &names)
        .await
}

/// A deleted pool: idle pods go at once; allocated ones stay with their batches until released.
/// The finalizer comes off when no pod is left.
async fn drain(pool: &Pool, ctx: &Context, observed: &Observed) -> Result<Action, Error> {
    if !pool.finalizers().iter().any(|f| f == names::FINALIZER_POOL) {
        return Ok(Action::await_change());
    }
    let idle: Vec<String> = observed
        .live_pods()
        .filter(|p| !observed.held.contains(pods::pod_name(p)))
        .map(|p| pods::pod_name(p).to_string())
        .collect();
    delete_pods(ctx, observed, idle).await?;

    if observed.pods.is_empty() && observed.unseen_creations == 0 {
        ctx.remove_finalizer::<Pool>(pool, names::FINALIZER_POOL)
            .await?;
        ctx.metrics.forget_pool(&observed.namespace, &observed.name);
        info!(pool = %observed.owner_key(), "pool drained; finalizer removed");
        return Ok(Action::await_change());
    }
    let holders: Vec<String> = observed
        .batches
        .iter()
        .filter(|b| b.ledger.pods.iter().any(|p| observed.usable(p)))
        .map(|b| b.batch.name_any())
        .collect();
    let allocated = observed
        .live_pods()
        .filter(|p| observed.held.contains(pods::pod_name(p)))
        .count();
    let message = if holders.is_empty() {
        format!("waiting for {} pod(s) to terminate", observed.pods.len())
    } else {
        format!(
            "waiting for {allocated} allocated pod(s) to be released by BatchSandbox(es) {}; {} pod(s) in all",
            holders.join(", "),
            observed.pods.len()
        )
    };
    let counts = pool_plan::counts(&plan_pods(observed), observed.unseen_creations);
    write_status(pool, ctx, observed, counts, None, Some(message)).await?;
    Ok(Action::requeue(ctx.config.resync))
}

/// Writes the pool's status if it changed, at most once per [`super::pacing::STATUS_INTERVAL`]
/// and, for a change of counts only, in a slot of the budget all pools share (a draining pool's
/// at once). Returns when a change held back is due.
async fn write_status(
    pool: &Pool,
    ctx: &Context,
    observed: &Observed,
    counts: PoolCounts,
    degraded: Option<String>,
    draining: Option<String>,
) -> Result<Option<std::time::Duration>, Error> {
    let paced = draining.is_none();
    ctx.metrics.pool_pods(
        &observed.namespace,
        &observed.name,
        counts.available,
        counts.allocated,
        counts.pending,
    );
    let none_yet = PoolStatus::default();
    let previous = pool.status.as_ref().unwrap_or(&none_yet);
    let generation = pool.metadata.generation.unwrap_or_default();
    let buffer_min = non_negative(pool.spec.capacity_spec.buffer_min);
    let mut desired = vec![if counts.available >= buffer_min {
        Desired::new(
            "Ready",
            true,
            "BufferFilled",
            format!(
                "{} idle pod(s) ready (bufferMin {buffer_min})",
                counts.available
            ),
        )
    } else {
        Desired::new(
            "Ready",
            false,
            "WarmingUp",
            format!(
                "{} of bufferMin {buffer_min} idle pod(s) ready",
                counts.available
            ),
        )
    }];
    desired.push(match degraded {
        Some(reason) => Desired::new("PolicyDegraded", true, "PolicyFallback", reason),
        None => Desired::new("PolicyDegraded", false, "PoliciesHealthy", ""),
    });
    if let Some(message) = draining {
        desired.push(Desired::new(
            "Terminating",
            true,
            "WaitingForRelease",
            message,
        ));
    }
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now());
    let status = PoolStatus {
        observed_generation: generation,
        revision: observed.revision.clone(),
        total: counts.total as i32,
        allocated: counts.allocated as i32,
        available: counts.available as i32,
        pending: counts.pending as i32,
        updated: counts.updated as i32,
        conditions: conditions::merge(&previous.conditions, &desired, &now, generation),
    };
    // The cached status may trail this process's own last write (a lagging watch): skipping on
    // it alone could leave a stale count in place, so the last write counts too.
    let uid = pool.uid().unwrap_or_default();
    let last_written = ctx.pool_statuses.last(&uid);
    let unchanged = same_status(&status, previous)
        && last_written
            .as_deref()
            .is_none_or(|last| same_status(&status, last));
    if unchanged {
        return Ok(None);
    }
    let change = status_change(
        &status,
        last_written.as_deref().unwrap_or(previous),
        pool.spec.capacity_spec.pool_max,
    );
    let now = std::time::Instant::now();
    if paced && let StatusWrite::After(due) = ctx.pacing.status(&observed.key(), now, change) {
        return Ok(Some(due));
    }
    let patch = json!({ "status": &status });
    ctx.pool_statuses.record(uid, status);
    ctx.patch_status::<Pool>(&observed.namespace, &observed.name, patch)
        .await?;
    ctx.pacing.with(&observed.key(), |p| {
        p.status_written(std::time::Instant::now())
    });
    Ok(None)
}

/// Whether `status` differs from `before` in more than counts (see [`StatusChange`]). Running
/// out of idle pods counts as more (with or without room to grow): the pool's batches report it.
fn status_change(status: &PoolStatus, before: &PoolStatus, pool_max: i32) -> StatusChange {
    if status.observed_generation == before.observed_generation
        && status.revision == before.revision
        && conditions::same_states(&status.conditions, &before.conditions)
        && status.headroom(pool_max) == before.headroom(pool_max)
    {
        StatusChange::Counts
    } else {
        StatusChange::State
    }
}

/// Whether two statuses say the same (condition timestamps aside). Compared in place: every
/// round of every pool asks, and most find nothing to write.
fn same_status(a: &PoolStatus, b: &PoolStatus) -> bool {
    // Destructured, so a new field cannot be left out of the comparison.
    let PoolStatus {
        observed_generation,
        revision,
        total,
        allocated,
        available,
        pending,
        updated,
        conditions,
    } = a;
    *observed_generation == b.observed_generation
        && *revision == b.revision
        && *total == b.total
        && *allocated == b.allocated
        && *available == b.available
        && *pending == b.pending
        && *updated == b.updated
        && conditions::same(conditions, &b.conditions)
}

fn non_negative(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_about_the_write_itself_are_rejections() {
        let answer = |code: u16| {
            Error::Kube(kube::Error::Api(Box::new(
                kube::core::Status::failure("no", "Reason").with_code(code),
            )))
        };
        for code in [400, 403, 422] {
            assert_eq!(rejection(&answer(code)), Some("no".to_string()), "{code}");
        }
        // The moment, not the write: a gone batch, a timeout, a lost race, throttling, the
        // server's own trouble.
        for code in [404, 408, 409, 429, 500, 503] {
            assert_eq!(rejection(&answer(code)), None, "{code}");
        }
    }

    fn status(total: i32, allocated: i32, available: i32) -> PoolStatus {
        PoolStatus {
            observed_generation: 1,
            revision: "r1".into(),
            total,
            allocated,
            available,
            conditions: conditions::merge(
                &[],
                &[Desired::new(
                    "Ready",
                    true,
                    "BufferFilled",
                    format!("{available} idle"),
                )],
                &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
                1,
            ),
            ..PoolStatus::default()
        }
    }

    #[test]
    fn only_counts_moving_within_the_same_headroom_is_a_counts_change() {
        let before = status(10, 3, 7);
        assert_eq!(
            status_change(&status(10, 4, 6), &before, 20),
            StatusChange::Counts,
            "a condition message carrying the count is still counts"
        );
        assert_eq!(
            status_change(&status(10, 10, 0), &before, 20),
            StatusChange::State,
            "out of idle pods"
        );
        assert_eq!(
            status_change(&status(20, 3, 17), &before, 20),
            StatusChange::Counts,
            "reaching poolMax with idle pods left"
        );
        let out_of_idle = status(10, 10, 0);
        assert_eq!(
            status_change(&status(20, 20, 0), &out_of_idle, 20),
            StatusChange::State,
            "out of idle pods, and now at poolMax: exhausted"
        );
        let mut next_generation = status(10, 3, 7);
        next_generation.observed_generation = 2;
        assert_eq!(
            status_change(&next_generation, &before, 20),
            StatusChange::State
        );
        let mut new_revision = status(10, 3, 7);
        new_revision.revision = "r2".into();
        assert_eq!(
            status_change(&new_revision, &before, 20),
            StatusChange::State
        );
        let mut not_ready = status(10, 3, 7);
        not_ready.conditions[0].status = "False".into();
        assert_eq!(status_change(&not_ready, &before, 20), StatusChange::State);
    }

    #[test]
    fn statuses_are_the_same_only_if_every_field_but_condition_times_is() {
        let before = status(10, 3, 7);
        let mut later = before.clone();
        later.conditions[0].last_transition_time =
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::from_second(60).unwrap(),
            );
        assert!(same_status(&later, &before), "a transition time alone");
        type Change = (&'static str, fn(&mut PoolStatus));
        let changes: [Change; 9] = [
            ("observedGeneration", |s| s.observed_generation = 2),
            ("revision", |s| s.revision = "r2".into()),
            ("total", |s| s.total = 11),
            ("allocated", |s| s.allocated = 4),
            ("available", |s| s.available = 6),
            ("pending", |s| s.pending = 1),
            ("updated", |s| s.updated = 1),
            ("a condition's message", |s| {
                s.conditions[0].message = "8 idle".into()
            }),
            ("a condition more", |s| {
                s.conditions.push(s.conditions[0].clone())
            }),
        ];
        for (what, change) in changes {
            let mut changed = before.clone();
            change(&mut changed);
            assert!(!same_status(&changed, &before), "{what}");
            assert!(!same_status(&before, &changed), "{what}, the other way");
        }
    }
}
