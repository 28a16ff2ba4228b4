//! The objects the bench creates, and watch-driven trackers of BatchSandboxes and Pools that
//! waits are made on (every wait is a condition on watched state with a deadline).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use sandbox_domain::api::{BatchSandbox, Pool, names};
use serde_json::json;
use tokio::sync::watch;

/// Image of the pool pods (kwok runs no container; the image is never pulled).
const POOL_IMAGE: &str = "opensandbox/code-interpreter:v1.0.1";

pub fn pool(name: &str, buffer_min: i32, buffer_max: i32, pool_min: i32, pool_max: i32) -> Pool {
    serde_json::from_value(json!({
        "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "Pool", "metadata": {"name": name},
        "spec": {"template": {"spec": {"containers": [{"name": "sandbox", "image": POOL_IMAGE}]}},
                 "capacitySpec": {"bufferMin": buffer_min, "bufferMax": buffer_max, "poolMin": pool_min, "poolMax": pool_max}}
    }))
    .expect("valid Pool")
}

pub fn pooled(name: &str, pool: &str, replicas: i32) -> BatchSandbox {
    serde_json::from_value(json!({
        "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox", "metadata": {"name": name},
        "spec": {"replicas": replicas, "poolRef": pool}
    }))
    .expect("valid BatchSandbox")
}

pub fn non_pooled(name: &str, replicas: i32) -> BatchSandbox {
    serde_json::from_value(json!({
        "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox", "metadata": {"name": name},
        "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "sandbox", "image": "nginx:latest"}]}}}
    }))
    .expect("valid BatchSandbox")
}

/// Pods a kwok node holds (as the local control plane's nodes).
pub const PODS_PER_NODE: usize = 250;

/// A kwok-managed node like those of `deploy/local/cluster.sh`, with its own pod CIDR
/// `127.2.<index>.0/24` (outside the 127.1.0.0/16 the cluster's nodes use).
pub fn kwok_node(name: &str, index: u8) -> Node {
    let cidr = format!("127.2.{index}.0/24");
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"type": "kwok", "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name,
                       "kubernetes.io/os": "linux", "kubernetes.io/role": "agent",
                       "node-role.kubernetes.io/agent": "", "sandbox-bench": "true"}
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": PODS_PER_NODE.to_string()},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": PODS_PER_NODE.to_string()}
        }
    }))
    .expect("valid Node")
}

/// Pods a Ready node may hold.
pub fn node_pod_capacity(node: &Node) -> usize {
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let schedulable = !node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    if !(ready && schedulable) {
        return 0;
    }
    status
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get("pods"))
        .and_then(|q| q.0.parse().ok())
        .unwrap_or(0)
}

/// Nodes to add so that `capacity` pods plus `needed` more fit.
pub fn nodes_to_add(capacity: usize, in_use: usize, needed: usize) -> usize {
    let free = capacity.saturating_sub(in_use);
    needed.saturating_sub(free).div_ceil(PODS_PER_NODE)
}

/// What marks a foreign controller left on the probe Pool, if any: a finalizer or a status.
/// Only a controller that reconciles the namespace writes either.
pub fn foreign_marks(pool: &Pool) -> Option<String> {
    if let Some(f) = pool.finalizers().first() {
        return Some(format!("finalizer {f}"));
    }
    pool.status.as_ref().map(|_| "a status".to_owned())
}

/// Watched state of the BatchSandboxes of the bench namespace.
#[derive(Default)]
pub struct Batches {
    /// When each batch first appeared in the watch.
    pub first_seen: HashMap<String, Instant>,
    /// When each batch first held a pod and an endpoint for every replica.
    pub complete: HashMap<String, Instant>,
    /// `status.ready` as last seen.
    pub ready: HashMap<String, i32>,
    /// When each batch's `status.ready` first counted every replica.
    pub status_ready: HashMap<String, Instant>,
    /// Batches that exist now.
    pub present: HashSet<String>,
}

impl Batches {
    fn apply(&mut self, batch: &BatchSandbox, now: Instant) {
        let name = batch.name_any();
        self.first_seen.entry(name.clone()).or_insert(now);
        self.present.insert(name.clone());
        if let Some(status) = &batch.status {
            self.ready.insert(name.clone(), status.ready);
            if batch.spec.replicas > 0 && status.ready >= batch.spec.replicas {
                self.status_ready.entry(name.clone()).or_insert(now);
            }
        }
        let want = usize::try_from(batch.spec.replicas).unwrap_or(0);
        if want > 0 && held_pods(batch) == want && endpoints(batch) == want {
            self.complete.entry(name).or_insert(now);
        }
    }

    fn delete(&mut self, batch: &BatchSandbox) {
        self.present.remove(&batch.name_any());
    }
}

/// Entries of the `alloc-status` ledger (OpenSandbox's `{"pods": [...]}`).
pub fn held_pods(batch: &BatchSandbox) -> usize {
    json_list_len(batch, names::ANNOTATION_ALLOC_STATUS, Some("pods"))
}

/// Entries of the endpoints annotation.
pub fn endpoints(batch: &BatchSandbox) -> usize {
    json_list_len(batch, names::ANNOTATION_ENDPOINTS, None)
}

fn json_list_len(batch: &BatchSandbox, annotation: &str, field: Option<&str>) -> usize {
    let Some(text) = batch.annotations().get(annotation) else {
        return 0;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return 0;
    };
    let list = match field {
        Some(f) => value.get(f),
        None => Some(&value),
    };
    list.and_then(|l| l.as_array()).map_or(0, Vec::len)
}

/// Pool status counts as last seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounts {
    pub total: i32,
    pub allocated: i32,
    pub available: i32,
}

/// Watched state of the Pools of the bench namespace.
#[derive(Default)]
pub struct Pools {
    pub counts: HashMap<String, PoolCounts>,
}

/// Watched pods of the bench namespace: those being deleted.
#[derive(Default)]
pub struct Pods {
    pub terminating: HashSet<String>,
}

pub fn watch_pods(
    api: Api<k8s_openapi::api::core::v1::Pod>,
) -> (watch::Receiver<Pods>, tokio::task::JoinHandle<()>) {
    spawn_watch(
        api,
        |s: &mut Pods, p: &k8s_openapi::api::core::v1::Pod, _| {
            if p.metadata.deletion_timestamp.is_some() {
                s.terminating.insert(p.name_any());
            }
        },
        |s: &mut Pods, p: &k8s_openapi::api::core::v1::Pod| {
            s.terminating.remove(&p.name_any());
        },
    )
}

/// Starts a watch of `api` that keeps `state` up to date through `on_apply` / `on_delete`; the
/// returned receiver is notified on every change.
fn spawn_watch<K, S>(
    api: Api<K>,
    on_apply: fn(&mut S, &K, Instant),
    on_delete: fn(&mut S, &K),
) -> (watch::Receiver<S>, tokio::task::JoinHandle<()>)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    S: Default + Send + Sync + 'static,
{
    let (tx, rx) = watch::channel(S::default());
    let task = tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = stream.next().await {
            let now = Instant::now();
            match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    tx.send_modify(|s| on_apply(s, &o, now))
                }
                Ok(watcher::Event::Delete(o)) => tx.send_modify(|s| on_delete(s, &o)),
                Ok(_) => {}
                Err(e) => tracing::warn!("watch error: {e}"),
            }
        }
    });
    (rx, task)
}

pub fn watch_batches(
    api: Api<BatchSandbox>,
) -> (watch::Receiver<Batches>, tokio::task::JoinHandle<()>) {
    spawn_watch(api, Batches::apply, Batches::delete)
}

pub fn watch_pools(api: Api<Pool>) -> (watch::Receiver<Pools>, tokio::task::JoinHandle<()>) {
    spawn_watch(
        api,
        |s: &mut Pools, p: &Pool, _| {
            let counts = p
                .status
                .as_ref()
                .map_or_else(PoolCounts::default, |st| PoolCounts {
                    total: st.total,
                    allocated: st.allocated,
                    available: st.available,
                });
            s.counts.insert(p.name_any(), counts);
        },
        |s: &mut Pools, p: &Pool| {
            s.counts.remove(&p.name_any());
        },
    )
}

/// Waits until `condition` holds on the watched state, at most `timeout`.
pub async fn wait_for<S>(
    rx: &mut watch::Receiver<S>,
    what: &str,
    timeout: Duration,
    condition: impl FnMut(&S) -> bool,
) -> anyhow::Result<()> {
    match tokio::time::timeout(timeout, rx.wait_for(condition)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => bail!("the watch behind '{what}' ended"),
        Err(_) => bail!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Polls `probe` until it holds, at most `timeout`; for conditions no watch can show (an HTTP
/// endpoint's readiness).
pub async fn poll_until<F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if probe().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_with(annotations: serde_json::Value, replicas: i32) -> BatchSandbox {
        serde_json::from_value(json!({
            "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
            "metadata": {"name": "b", "annotations": annotations},
            "spec": {"replicas": replicas, "poolRef": "p"}
        }))
        .unwrap()
    }

    #[test]
    fn complete_needs_pods_and_endpoints_for_every_replica() {
        let now = Instant::now();
        let mut state = Batches::default();
        state.apply(&batch_with(json!({}), 2), now);
        assert!(state.first_seen.contains_key("b") && state.present.contains("b"));
        let half = batch_with(
            json!({names::ANNOTATION_ALLOC_STATUS: r#"{"pods":["p1","p2"]}"#,
                   names::ANNOTATION_ENDPOINTS: r#"["127.1.1.1"]"#}),
            2,
        );
        state.apply(&half, now);
        assert!(!state.complete.contains_key("b"));
        let full = batch_with(
            json!({names::ANNOTATION_ALLOC_STATUS: r#"{"pods":["p1","p2"]}"#,
                   names::ANNOTATION_ENDPOINTS: r#"["127.1.1.1","127.1.1.2"]"#}),
            2,
        );
        let later = now + Duration::from_millis(5);
        state.apply(&full, later);
        assert_eq!(state.complete["b"], later);
        assert_eq!(state.first_seen["b"], now);
        state.delete(&full);
        assert!(!state.present.contains("b"));
    }

    #[test]
    fn status_ready_is_when_status_first_counts_every_replica() {
        let now = Instant::now();
        let mut state = Batches::default();
        let with_ready = |ready: i32| {
            let mut batch = batch_with(json!({}), 2);
            batch.status = Some(sandbox_domain::api::BatchSandboxStatus {
                ready,
                ..Default::default()
            });
            batch
        };
        state.apply(&batch_with(json!({}), 2), now);
        state.apply(&with_ready(1), now + Duration::from_millis(1));
        assert!(!state.status_ready.contains_key("b"));
        let ready_at = now + Duration::from_millis(2);
        state.apply(&with_ready(2), ready_at);
        state.apply(&with_ready(2), now + Duration::from_millis(3));
        assert_eq!(state.status_ready["b"], ready_at);
    }

    #[test]
    fn probe_pool_marks() {
        let mut probe = pool("probe", 0, 0, 0, 0);
        assert_eq!(foreign_marks(&probe), None);
        probe.metadata.finalizers = Some(vec![names::FINALIZER_POOL.to_owned()]);
        assert_eq!(
            foreign_marks(&probe),
            Some(format!("finalizer {}", names::FINALIZER_POOL))
        );
        probe.metadata.finalizers = None;
        probe.status = Some(Default::default());
        assert_eq!(foreign_marks(&probe), Some("a status".to_owned()));
    }

    #[test]
    fn node_capacity_and_nodes_to_add() {
        let mut node = kwok_node("n", 3);
        assert_eq!(
            node.spec.as_ref().unwrap().pod_cidr.as_deref(),
            Some("127.2.3.0/24")
        );
        assert_eq!(node_pod_capacity(&node), 0, "not Ready yet");
        node.status.as_mut().unwrap().conditions = Some(vec![
            serde_json::from_value(json!({"type": "Ready", "status": "True"})).unwrap(),
        ]);
        assert_eq!(node_pod_capacity(&node), PODS_PER_NODE);
        assert_eq!(nodes_to_add(500, 10, 400), 0);
        assert_eq!(nodes_to_add(500, 10, 10_000), 39);
        assert_eq!(nodes_to_add(500, 600, 1), 1);
    }
}
