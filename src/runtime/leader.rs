//! Leader election over a coordination.k8s.io Lease, so that only one replica reconciles.
//!
//! A replica that loses the lease stops at once (the process exits and its Deployment restarts it
//! as a follower). Losing it is noticed late when renewals merely stall (an API server that hangs,
//! a partition), so every allocation write is also fenced: a [`Fence`] is open only while this
//! replica can prove, from the Lease as last read, that it renewed within the renew deadline
//! (two thirds of the lease duration). Another replica can take over only once the full duration
//! has passed, so the leader stops writing before a successor can start.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Settings of the lease.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
}

impl LeaderConfig {
    /// How long after its last renewal the leader may still write: two thirds of the lease.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration.max(Duration::from_secs(3)) * 2 / 3
    }

    /// How often the lease is read to keep the fence open.
    fn proof_interval(&self) -> Duration {
        (self.renew_deadline() / 10).max(Duration::from_millis(200))
    }
}

/// Whether allocation writes may go out. Without leader election it is always open; with it, it
/// is open until a deadline that each proof of the lease moves forward. Clones share the state.
#[derive(Clone, Debug, Default)]
pub struct Fence {
    /// `None`: no leader election. Otherwise the instant the last proof runs out (`None` inside:
    /// never proven or revoked).
    until: Option<Arc<Mutex<Option<Instant>>>>,
}

/// The fence is closed: the lease can no longer be proven.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "this replica can no longer prove it holds the leader lease; allocation writes are stopped"
)]
pub struct Fenced;

impl Fence {
    /// A fence that starts closed and opens with each proof (leader election on).
    pub fn leased() -> Self {
        Self {
            until: Some(Arc::new(Mutex::new(None))),
        }
    }

    /// Opens the fence until `until` (never shortens it: proofs may arrive out of order).
    pub fn prove_until(&self, until: Instant) {
        if let Some(state) = &self.until {
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            *state = Some(state.map_or(until, |current| current.max(until)));
        }
    }

    /// Closes the fence at once (the lease is someone else's).
    pub fn revoke(&self) {
        if let Some(state) = &self.until {
            *state.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Ok while writes may go out.
    pub fn check(&self) -> Result<(), Fenced> {
        let Some(state) = &self.until else {
            return Ok(());
        };
        match *state.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(until) if Instant::now() < until => Ok(()),
            _ => Err(Fenced),
        }
    }
}

/// What a read of the Lease proves: `Some(instant)` until which this replica may still write, or
/// `None` when the lease is not (or no longer provably) held by `identity`. The renew time is the
/// leader's own wall clock (it wrote it), so comparing it with this process's clock is sound.
pub fn proven_until(
    lease: &Lease,
    identity: &str,
    renew_deadline: Duration,
    now_wall: SystemTime,
    now: Instant,
) -> Option<Instant> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref()?.0;
    let renewed =
        SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(renewed.as_nanosecond()).ok()?);
    let deadline = renewed + renew_deadline;
    let left = deadline.duration_since(now_wall).ok()?;
    Some(now + left)
}

/// Keeps `fence` open while reads of the Lease prove this replica renewed it recently. Runs until
/// dropped. A read that fails or hangs proves nothing, so the fence closes at the deadline.
pub async fn prove(client: Client, config: LeaderConfig, fence: Fence) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let deadline = config.renew_deadline();
    let mut interval = tokio::time::interval(config.proof_interval());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let read = tokio::time::timeout(deadline, api.get(&config.lease_name)).await;
        match read {
            Ok(Ok(lease)) => match proven_until(
                &lease,
                &config.identity,
                deadline,
                SystemTime::now(),
                Instant::now(),
            ) {
                Some(until) => fence.prove_until(until),
                None => {
                    if fence.check().is_ok() {
                        warn!(lease = %config.lease_name, "the lease no longer shows a recent renewal by this replica; stopping allocation writes");
                    }
                    fence.revoke();
                }
            },
            Ok(Err(error)) => debug!(%error, "reading the leader lease failed"),
            Err(_) => debug!("reading the leader lease timed out"),
        }
    }
}

/// A held lease: a receiver that turns `false` if it is lost, and the task renewing it.
pub struct Leadership {
    leading: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

/// How long a manager gets to take a Lease seen free before a fresh one is built.
const RELEASE_GRACE: Duration = Duration::from_secs(1);

/// Blocks until this instance holds the lease.
///
/// The lease manager, while another replica holds the lease, sleeps until that holder's lease
/// would run out. A holder that stops gracefully gives the lease up at once ([`Leadership::release`]),
/// so the Lease is also watched: when it turns free, a fresh manager (which reads the Lease anew)
/// takes it without waiting out the old holder's duration.
pub async fn acquire(client: Client, config: &LeaderConfig) -> anyhow::Result<Leadership> {
    let seconds = config.lease_duration.as_secs().max(3);
    info!(lease = %config.lease_name, identity = %config.identity, "waiting for leadership");
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    loop {
        let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
            .with_namespace(&config.namespace)
            // Renewed at half its life, well before the fence's renew deadline (two thirds).
            .with_parameters(LeaseParams::new(&config.identity, seconds, seconds / 2))
            .build()
            .await?;
        let acquired = tokio::select! {
            changed = manager.changed() => changed?,
            () = released(&api, &config.lease_name) => {
                // A manager that read the Lease free takes it on its own; one that read it held
                // waits out the old holder's duration, so after a short grace a fresh one reads it
                // anew (the grace bounds how often a free Lease rebuilds the manager).
                match tokio::time::timeout(RELEASE_GRACE, manager.changed()).await {
                    Ok(changed) => changed?,
                    Err(_) => {
                        debug!(lease = %config.lease_name, "the lease is free; trying to take it now");
                        false
                    }
                }
            }
        };
        if acquired {
            let (leading, task) = manager.watch().await;
            info!(lease = %config.lease_name, identity = %config.identity, "leading");
            return Ok(Leadership { leading, task });
        }
    }
}

/// Whether a Lease is free: no holder (a graceful release clears it).
pub fn is_released(lease: &Lease) -> bool {
    lease
        .spec
        .as_ref()
        .and_then(|spec| spec.holder_identity.as_deref())
        .is_none_or(str::is_empty)
}

/// Resolves once the Lease is seen free (or gone), including on the watch's first look: the
/// manager read the Lease before this watch started, and a holder that released in between must
/// not leave the manager waiting out a lease that is already free. Never resolves while the
/// Lease stays held; errors of the watch are retried by its backoff.
async fn released(api: &Api<Lease>, name: &str) {
    use futures::StreamExt;
    let changes = kube::runtime::watcher::watch_object(api.clone(), name);
    let mut changes = std::pin::pin!(kube::runtime::WatchStreamExt::default_backoff(changes));
    while let Some(change) = changes.next().await {
        let lease = match change {
            Ok(lease) => lease,
            Err(error) => {
                debug!(%error, "watching the leader lease failed; retrying");
                continue;
            }
        };
        if lease.as_ref().is_none_or(is_released) {
            return;
        }
    }
    std::future::pending().await
}

impl Leadership {
    /// Resolves when leadership is lost (or the lease task ends).
    pub async fn lost(&mut self) {
        loop {
            if self.leading.changed().await.is_err() || !*self.leading.borrow_and_update() {
                return;
            }
        }
    }

    /// Gives the lease up, so a successor (the next replica of a rolling update) takes over at
    /// once instead of after the lease runs out.
    pub async fn release(self) {
        let Leadership { leading, task } = self;
        drop(leading);
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => info!("leader lease released"),
            Ok(Ok(Err(error))) => warn!(%error, "releasing the leader lease failed"),
            Ok(Err(error)) => warn!(%error, "the lease task failed"),
            Err(_) => warn!("releasing the leader lease timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::Timestamp;

    fn lease(holder: &str, renewed_secs_ago: u64) -> Lease {
        let renewed = SystemTime::now() - Duration::from_secs(renewed_secs_ago);
        let nanos = renewed
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after the epoch")
            .as_nanos();
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(
                    Timestamp::from_nanosecond(nanos as i128).expect("a time"),
                )),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_recent_renewal_by_us_proves_the_lease_until_the_renew_deadline() {
        let (wall, now) = (SystemTime::now(), Instant::now());
        let deadline = Duration::from_secs(10);
        let until = proven_until(&lease("me", 4), "me", deadline, wall, now).expect("proven");
        let left = until - now;
        assert!(
            left <= Duration::from_millis(6_100) && left > Duration::from_secs(5),
            "{left:?}"
        );
        assert_eq!(
            proven_until(&lease("me", 11), "me", deadline, wall, now),
            None
        );
        assert_eq!(
            proven_until(&lease("you", 1), "me", deadline, wall, now),
            None
        );
    }

    #[test]
    fn a_fence_closes_when_its_proof_runs_out_or_is_revoked() {
        assert_eq!(Fence::default().check(), Ok(()), "no leader election");
        let fence = Fence::leased();
        assert_eq!(fence.check(), Err(Fenced), "closed until proven");
        fence.prove_until(Instant::now() + Duration::from_secs(60));
        assert_eq!(fence.clone().check(), Ok(()));
        fence.prove_until(Instant::now());
        assert_eq!(fence.check(), Ok(()), "a stale proof never shortens it");
        fence.revoke();
        assert_eq!(fence.check(), Err(Fenced));
        fence.prove_until(Instant::now());
        assert_eq!(fence.check(), Err(Fenced), "a proof that has run out");
    }
}
