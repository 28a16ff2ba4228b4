//! OpenSandbox's Pool and BatchSandbox knobs against the real control plane: growth paced by
//! `scaleStrategy`, rollouts paced by `updateStrategy`, the eviction label, and release on
//! request through `alloc-release`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use sandbox_domain::alloc_release::PodList;
use sandbox_domain::api::names;

use crate::controller::ledger;
use crate::fixtures;
use crate::harness::{TestEnv, env};

const T: Duration = Duration::from_secs(90);

/// What a watch of a pool's pods saw: per live pod, whether it is Ready and its revision.
#[derive(Default)]
struct PodHistory {
    live: BTreeMap<String, (bool, String)>,
    /// Most live pods not Ready at any one moment.
    most_not_ready: usize,
    /// Fewest live Ready pods at any one moment once the pool was full (`track_ready_from`).
    fewest_ready: Option<usize>,
    track_ready: bool,
}

impl PodHistory {
    fn saw(&mut self, pod: &Pod) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            self.live.remove(&name);
        } else {
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let revision = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(names::LABEL_POOL_REVISION))
                .cloned()
                .unwrap_or_default();
            self.live.insert(name, (ready, revision));
        }
        let not_ready = self.live.values().filter(|(ready, _)| !ready).count();
        self.most_not_ready = self.most_not_ready.max(not_ready);
        if self.track_ready {
            let ready = self.live.len() - not_ready;
            self.fewest_ready = Some(self.fewest_ready.map_or(ready, |f| f.min(ready)));
        }
    }
}

/// Watches the pods of pool `pool` in the background, recording every change.
fn watch_pool_pods(
    env: &TestEnv,
    pool: &str,
) -> (Arc<Mutex<PodHistory>>, tokio::task::JoinHandle<()>) {
    let history = Arc::new(Mutex::new(PodHistory::default()));
    let config = watcher::Config::default().labels(&format!("{}={pool}", names::LABEL_POOL_NAME));
    let mut events = watcher(env.pods(), config).boxed();
    let seen = history.clone();
    let task = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let mut history = seen.lock().expect("history lock");
            match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                    history.saw(&pod)
                }
                Ok(watcher::Event::Delete(pod)) => {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    history.live.remove(&name);
                }
                Ok(_) | Err(_) => {}
            }
        }
    });
    (history, task)
}

async fn wait_pool_full(env: &TestEnv, pool: &str, n: i32) {
    env.wait_for(
        &format!("Pool {pool} with {n} available pods"),
        T,
        || async {
            let status = env.pool(pool).await.and_then(|p| p.status);
            let counts = status.as_ref().map(|s| (s.total, s.available));
            if counts == Some((n, n)) {
                Ok(())
            } else {
                Err(format!("{counts:?}"))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn growth_is_limited_by_scale_strategy_max_unavailable() {
    let env = env("scale-strategy").await;
    let (history, watch) = watch_pool_pods(&env, "grow");
    let _controller = env.start_controller(&[]);
    // 25% of the desired 8 pods: at most 2 starting at once.
    env.apply(
        &fixtures::pool("grow", [0, 0, 8, 8])
            .spec_field("scaleStrategy:\n  maxUnavailable: \"25%\"")
            .yaml(),
    );
    wait_pool_full(&env, "grow", 8).await;
    watch.abort();
    let history = history.lock().unwrap();
    assert_eq!(history.live.len(), 8, "the watch saw the whole pool");
    assert!(
        history.most_not_ready <= 2,
        "{} pods were starting at once; scaleStrategy.maxUnavailable is 25% of 8 = 2",
        history.most_not_ready
    );
    assert!(history.most_not_ready >= 1, "the watch saw pods start");
}

#[tokio::test(flavor = "multi_thread")]
async fn rollout_is_limited_by_update_strategy_and_status_counts_updated_pods() {
    let env = env("update-strategy").await;
    let _controller = env.start_controller(&[]);
    env.apply(
        &fixtures::pool("roll", [0, 0, 8, 8])
            .spec_field("updateStrategy:\n  maxUnavailable: 1")
            .yaml(),
    );
    wait_pool_full(&env, "roll", 8).await;
    let old = env.pool("roll").await.unwrap().status.unwrap();
    assert_eq!(old.updated, 8);

    let (history, watch) = watch_pool_pods(&env, "roll");
    env.wait_for("the watch to list the pool", T, || async {
        history.lock().unwrap().live.len() == 8
    })
    .await;
    history.lock().unwrap().track_ready = true;
    env.kubectl_ok(&["patch", "pool", "roll", "--type=json", "-p",
        r#"[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"opensandbox/code-interpreter:v2"}]"#]);
    let new_revision = env
        .wait_for("every pod on the new template", T, || async {
            let status = env.pool("roll").await?.status?;
            (status.revision != old.revision && status.updated == 8 && status.available == 8)
                .then_some(status.revision)
        })
        .await;
    watch.abort();
    let history = history.lock().unwrap();
    assert!(
        history.live.values().all(|(_, rev)| rev == &new_revision),
        "{:?}",
        history.live
    );
    assert_eq!(
        history.fewest_ready,
        Some(7),
        "with updateStrategy.maxUnavailable 1, one pod at a time is out of service"
    );

    let table = env.kubectl_ok(&["get", "pool", "roll"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "TOTAL", "ALLOCATED", "AVAILABLE", "UPDATED", "AGE"]
    );
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row[1..5], ["8", "0", "8", "8"]);
}

fn pooled_batch_yaml(name: &str, pool: &str, replicas: i32) -> String {
    format!(
        "apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: BatchSandbox\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  poolRef: {pool}\n"
    )
}

fn label_evict(env: &TestEnv, pod: &str) {
    env.kubectl_ok(&["label", "pod", pod, &format!("{}=true", names::LABEL_EVICT)]);
}

async fn pod_is_live(env: &TestEnv, pod: &str) -> bool {
    env.pods()
        .get_opt(pod)
        .await
        .expect("reading pod")
        .is_some_and(|p| p.metadata.deletion_timestamp.is_none())
}

#[tokio::test(flavor = "multi_thread")]
async fn evict_label_drains_idle_pods_at_once_and_allocated_ones_once_released() {
    let env = env("evict-label").await;
    let _controller = env.start_controller(&[]);
    // Noop: a released healthy pod would go back to the pool as idle, unless evicted.
    env.apply(&fixtures::pool("ev", [2, 4, 3, 10]).recycle("Noop").yaml());
    wait_pool_full(&env, "ev", 3).await;
    env.apply(&pooled_batch_yaml("holder", "ev", 1));
    let held = ledger(&env.wait_batch_ready("holder", 1, T).await)[0].clone();
    let selector = format!("{}=ev", names::LABEL_POOL_NAME);
    let idle = env
        .wait_for("an idle Running pod", T, || async {
            env.live_pods(&selector)
                .await
                .into_iter()
                .filter_map(|p| p.metadata.name)
                .find(|name| name != &held)
        })
        .await;

    // The allocated pod first, then the idle one: once the idle one is gone, the pool has acted
    // on both labels.
    label_evict(&env, &held);
    label_evict(&env, &idle);
    env.wait_for("the evicted idle pod to go", T, || async {
        !pod_is_live(&env, &idle).await
    })
    .await;
    assert!(
        pod_is_live(&env, &held).await,
        "an allocated pod is never evicted"
    );
    let batch = env.batch("holder").await.unwrap();
    assert_eq!(
        ledger(&batch),
        std::slice::from_ref(&held),
        "the batch keeps its pod"
    );
    // The evicted idle pod is replaced: the buffer refills.
    env.wait_for("the buffer to refill", T, || async {
        let status = env.pool("ev").await?.status?;
        (status.available >= 2 && status.allocated == 1).then_some(())
    })
    .await;

    // Released, the evicted pod is not returned to the pool (Noop) but deleted, and never
    // handed to another batch.
    env.kubectl_ok(&["scale", "batchsandbox", "holder", "--replicas=0"]);
    env.wait_for("the released evicted pod to go", T, || async {
        !pod_is_live(&env, &held).await
    })
    .await;
    env.apply(&pooled_batch_yaml("next", "ev", 2));
    let next = ledger(&env.wait_batch_ready("next", 2, T).await);
    assert!(!next.contains(&held) && !next.contains(&idle), "{next:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn alloc_release_scales_in_the_named_shards_and_records_them_as_released() {
    let env = env("alloc-release").await;
    let _controller = env.start_controller(&[]);
    env.apply(&fixtures::pool("rel", [2, 6, 4, 10]).yaml());
    wait_pool_full(&env, "rel", 4).await;
    env.apply(&pooled_batch_yaml("three", "rel", 3));
    let held = ledger(&env.wait_batch_ready("three", 3, T).await);
    assert_eq!(held.len(), 3);

    let request = format!(r#"{{"pods":["{}"]}}"#, held[1]);
    env.kubectl_ok(&[
        "annotate",
        "batchsandbox",
        "three",
        &format!("{}={request}", names::ANNOTATION_ALLOC_RELEASE),
    ]);
    let batch = env
        .wait_for("shard 1 released", T, || async {
            let batch = env.batch("three").await?;
            let status = batch.status.clone()?;
            (ledger(&batch)[1].is_empty() && status.allocated == 2 && status.ready == 2)
                .then_some(batch)
        })
        .await;
    assert_eq!(
        ledger(&batch),
        [held[0].clone(), String::new(), held[2].clone()]
    );
    let released = batch
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(names::ANNOTATION_ALLOC_RELEASED))
        .map(|text| PodList::parse(Some(text)).expect("alloc-released is JSON"));
    assert_eq!(released.map(|r| r.pods), Some(vec![held[1].clone()]));
    let ready = batch
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.message.as_str()),
        ("True", "2/2 sandboxes ready")
    );
    // The pod was recycled per the pool's policy (Delete) ...
    env.wait_for("the released pod to go", T, || async {
        !pod_is_live(&env, &held[1]).await
    })
    .await;
    // ... and the shard is never refilled, however long the pool has idle pods.
    env.wait_for("the pool to settle with idle pods", T, || async {
        let status = env.pool("rel").await?.status?;
        (status.allocated == 2 && status.available >= 2).then_some(())
    })
    .await;
    let batch = env.batch("three").await.unwrap();
    assert!(ledger(&batch)[1].is_empty(), "{:?}", ledger(&batch));
    let events = env.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=three,reason=PodsReleased",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(events.contains(&held[1]), "{events}");
}

/// Pods a Pool leaves behind when it is deleted with `--cascade=orphan` (and its finalizer taken
/// off while no controller runs) are taken back by a Pool re-created under the same name: those
/// of its template revision are adopted (owner reference to the new Pool, same pods), those of
/// another revision are deleted and replaced.
#[tokio::test(flavor = "multi_thread")]
async fn orphaned_pool_pods_are_adopted_by_a_recreated_pool_or_replaced() {
    let env = env("orphan-adoption").await;
    let mut controller = env.start_controller(&[]);
    let same = fixtures::pool("same", [0, 4, 2, 2]);
    let changed = fixtures::pool("changed", [0, 4, 2, 2]);
    env.apply(&same.yaml());
    env.apply(&changed.yaml());
    let pods_of = |pool: &'static str| {
        let env = &env;
        async move {
            env.live_pods(&format!("{}={pool}", names::LABEL_POOL_NAME))
                .await
        }
    };
    let uids = |pods: &[Pod]| -> Vec<String> {
        let mut uids: Vec<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        uids.sort();
        uids
    };
    for pool in ["same", "changed"] {
        env.wait_for(&format!("{pool} to have 2 pods"), T, || async {
            (pods_of(pool).await.len() == 2).then_some(())
        })
        .await;
    }
    let same_before = uids(&pods_of("same").await);
    let changed_before = uids(&pods_of("changed").await);

    // The pools go with --cascade=orphan while no controller runs: the garbage collector strips
    // the pods' owner references, then the finalizer is taken off by hand.
    controller.kill();
    env.kubectl_ok(&[
        "delete",
        "pool",
        "same",
        "changed",
        "--cascade=orphan",
        "--wait=false",
    ]);
    env.wait_for("the pods to be orphaned", T, || async {
        let all = [pods_of("same").await, pods_of("changed").await].concat();
        (all.len() == 4
            && all.iter().all(|p| {
                p.metadata
                    .owner_references
                    .as_deref()
                    .unwrap_or_default()
                    .is_empty()
            }))
        .then_some(())
    })
    .await;
    for pool in ["same", "changed"] {
        env.kubectl_ok(&[
            "patch",
            "pool",
            pool,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ]);
    }
    env.wait_for("both pools to be gone", T, || async {
        (env.pool("same").await.is_none() && env.pool("changed").await.is_none()).then_some(())
    })
    .await;

    // Re-created: one with the same template, one with another image.
    controller.restart();
    env.apply(&same.yaml());
    env.apply(&changed.image("opensandbox/code-interpreter:v1.0.2").yaml());
    let same_uid = env
        .pool("same")
        .await
        .and_then(|p| p.metadata.uid)
        .expect("a uid");
    let changed_uid = env
        .pool("changed")
        .await
        .and_then(|p| p.metadata.uid)
        .expect("a uid");
    let owned_by = |pods: &[Pod], uid: &str| {
        pods.iter().all(|p| {
            p.metadata
                .owner_references
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true))
        })
    };
    env.wait_for("the same-template orphans to be adopted", T, || async {
        let pods = pods_of("same").await;
        (owned_by(&pods, &same_uid) && pods.len() == 2).then_some(())
    })
    .await;
    assert_eq!(
        uids(&pods_of("same").await),
        same_before,
        "the very same pods were adopted"
    );
    env.wait_for("the other-template orphans to be replaced", T, || async {
        let pods = pods_of("changed").await;
        let now = uids(&pods);
        (pods.len() == 2
            && owned_by(&pods, &changed_uid)
            && now.iter().all(|uid| !changed_before.contains(uid)))
        .then_some(())
    })
    .await;
}
