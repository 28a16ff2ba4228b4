//! Leader election over a coordination.k8s.io Lease, so that only one replica reconciles.
//!
//! A replica that loses the lease stops at once (the process exits and its Deployment restarts it
//! as a follower), so two replicas never write allocations at the same time.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;
use tracing::info;

/// Settings of the lease.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
}

/// Blocks until this instance holds the lease; returns a receiver that turns `false` if it is lost.
pub async fn acquire(
    client: Client,
    config: &LeaderConfig,
) -> anyhow::Result<watch::Receiver<bool>> {
    let seconds = config.lease_duration.as_secs();
    let manager = LeaseManagerBuilder::new(client, &config.lease_name)
        .with_namespace(&config.namespace)
        .with_parameters(LeaseParams::new(
            &config.identity,
            seconds.max(3),
            seconds.max(3) / 3,
        ))
        .build()
        .await?;
    let (mut leading, _task) = manager.watch().await;
    info!(lease = %config.lease_name, identity = %config.identity, "waiting for leadership");
    while !*leading.borrow_and_update() {
        leading.changed().await?;
    }
    info!(lease = %config.lease_name, identity = %config.identity, "leading");
    Ok(leading)
}

/// Resolves when leadership is lost (or the lease task ends).
pub async fn lost(mut leading: watch::Receiver<bool>) {
    loop {
        if leading.changed().await.is_err() || !*leading.borrow_and_update() {
            return;
        }
    }
}
